//! One client over rumqttc's MQTT 3.1.1 client (`rumqttc`) and its MQTT 5 client (`rumqttc::v5`),
//! chosen by `broker.protocol`. The source and the sink are written once against [`Client`],
//! [`EventLoop`] and [`Event`]; only this file knows which protocol is spoken.
//!
//! The two rumqttc clients have the same shape but distinct types (their `QoS`, `Publish` and
//! packets differ), so each type here is an enum over both, and the events are mapped into the
//! few cases weir acts on. The hot path (an incoming PUBLISH) stays a move of the topic and the
//! payload; MQTT 5 adds reading its user properties for a trace context.

use crate::model::message::Headers;
use crate::model::trace::{self, TraceContext};
use bytes::Bytes;
use rumqttc::v5;
use rumqttc::v5::mqttbytes::v5 as packet5;
use rumqttc::v5::mqttbytes::QoS as QoS5;
use rumqttc::QoS;

/// Connection options of either protocol (see `mqtt::connection_options`).
#[derive(Clone)]
pub enum Options {
    V4(Box<rumqttc::MqttOptions>),
    V5(Box<v5::MqttOptions>),
}

impl Options {
    /// Manual acks: an incoming QoS 1 message is acknowledged only by [`Client::ack`].
    pub fn set_manual_acks(&mut self, manual: bool) -> &mut Self {
        match self {
            Options::V4(options) => {
                options.set_manual_acks(manual);
            }
            Options::V5(options) => {
                options.set_manual_acks(manual);
            }
        }
        self
    }

    /// A clean session (3.1.1) or a clean start whose session ends with the connection (5).
    pub fn set_clean_session(&mut self, clean: bool) -> &mut Self {
        match self {
            Options::V4(options) => {
                options.set_clean_session(clean);
            }
            Options::V5(options) => {
                options.set_clean_start(clean);
                if clean {
                    options.set_session_expiry_interval(None);
                }
            }
        }
        self
    }
}

/// Creates a client and its event loop; `capacity` bounds the client's request queue. The event
/// loop does nothing until polled.
pub fn new(options: Options, capacity: usize) -> (Client, EventLoop) {
    match options {
        Options::V4(options) => {
            let (client, mut eventloop) = rumqttc::AsyncClient::new(*options, capacity);
            eventloop.set_network_options(super::network_options());
            (Client::V4(client), EventLoop::V4(Box::new(eventloop)))
        }
        Options::V5(mut options) => {
            options.set_network_options(super::network_options());
            let (client, eventloop) = v5::AsyncClient::new(*options, capacity);
            (Client::V5(client), EventLoop::V5(Box::new(eventloop)))
        }
    }
}

/// The handle that subscribes, publishes and acknowledges; cheap to clone.
#[derive(Clone, Debug)]
pub enum Client {
    V4(rumqttc::AsyncClient),
    V5(v5::AsyncClient),
}

/// A publish the client's request queue had no room for, handed back whole.
#[derive(Debug)]
pub struct Returned {
    pub topic: String,
    pub payload: Vec<u8>,
}

/// The request queue is closed: the event loop is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the MQTT event loop is gone")]
pub struct Closed;

impl Client {
    /// Queues one SUBSCRIBE for `filters` without waiting (so it cannot stall a poll loop).
    ///
    /// # Errors
    /// The request queue is full or closed.
    pub fn try_subscribe_many(&self, filters: &[(String, QoS)]) -> Result<(), Closed> {
        match self {
            Client::V4(client) => client
                .try_subscribe_many(
                    filters
                        .iter()
                        .map(|(path, qos)| rumqttc::SubscribeFilter::new(path.clone(), *qos)),
                )
                .map_err(|_| Closed),
            Client::V5(client) => client
                .try_subscribe_many(
                    filters
                        .iter()
                        .map(|(path, qos)| packet5::Filter::new(path.clone(), qos5(*qos))),
                )
                .map_err(|_| Closed),
        }
    }

    /// Acknowledges the QoS 1 message with packet id `pkid` (with manual acks) if the request
    /// queue has room; `Ok(false)` when it has none (try again once the event loop has run).
    ///
    /// # Errors
    /// The event loop is gone.
    pub fn try_ack(&self, pkid: u16) -> Result<bool, Closed> {
        match self {
            Client::V4(client) => {
                let mut publish = rumqttc::Publish::new("", QoS::AtLeastOnce, Vec::<u8>::new());
                publish.pkid = pkid;
                match client.try_ack(&publish) {
                    Ok(()) => Ok(true),
                    Err(rumqttc::ClientError::TryRequest(_)) => Ok(false),
                    Err(_) => Err(Closed),
                }
            }
            Client::V5(client) => {
                let mut publish =
                    packet5::Publish::new("", QoS5::AtLeastOnce, Vec::<u8>::new(), None);
                publish.pkid = pkid;
                match client.try_ack(&publish) {
                    Ok(()) => Ok(true),
                    Err(v5::ClientError::TryRequest(_)) => Ok(false),
                    Err(_) => Err(Closed),
                }
            }
        }
    }

    /// Queues one PUBLISH without waiting. With MQTT 5 it carries `headers` as properties; with
    /// 3.1.1 they are dropped, since the protocol has no place for them.
    ///
    /// # Errors
    /// The request queue is full (or closed): the topic and payload come back.
    pub fn try_publish(
        &self,
        topic: String,
        qos: QoS,
        retain: bool,
        payload: Vec<u8>,
        headers: &Headers,
    ) -> Result<(), Returned> {
        match self {
            Client::V4(client) => match client.try_publish(topic, qos, retain, payload) {
                Ok(()) => Ok(()),
                Err(
                    rumqttc::ClientError::TryRequest(rumqttc::Request::Publish(publish))
                    | rumqttc::ClientError::Request(rumqttc::Request::Publish(publish)),
                ) => Err(Returned {
                    topic: publish.topic,
                    payload: publish.payload.to_vec(),
                }),
                Err(_) => Err(Returned {
                    topic: String::new(),
                    payload: Vec::new(),
                }),
            },
            Client::V5(client) => {
                match client.try_publish_with_properties(
                    topic,
                    qos5(qos),
                    retain,
                    payload,
                    v5_properties(headers),
                ) {
                    Ok(()) => Ok(()),
                    Err(
                        v5::ClientError::TryRequest(v5::Request::Publish(publish))
                        | v5::ClientError::Request(v5::Request::Publish(publish)),
                    ) => Err(Returned {
                        topic: String::from_utf8_lossy(&publish.topic).into_owned(),
                        payload: publish.payload.to_vec(),
                    }),
                    Err(_) => Err(Returned {
                        topic: String::new(),
                        payload: Vec::new(),
                    }),
                }
            }
        }
    }

    /// Queues a DISCONNECT without waiting.
    ///
    /// # Errors
    /// The request queue is full or closed.
    pub fn try_disconnect(&self) -> Result<(), Closed> {
        match self {
            Client::V4(client) => client.try_disconnect().map_err(|_| Closed),
            Client::V5(client) => client.try_disconnect().map_err(|_| Closed),
        }
    }
}

/// The connection itself: it makes progress (keep-alives included) only while polled.
pub enum EventLoop {
    V4(Box<rumqttc::EventLoop>),
    V5(Box<v5::EventLoop>),
}

/// What the event loop reports, in the cases weir acts on.
#[derive(Debug)]
pub enum Event {
    /// A message on a subscribed topic.
    Message(Message),
    ConnAck {
        session_present: bool,
    },
    /// The broker answered a SUBSCRIBE; `granted` filters were accepted.
    SubAck {
        granted: usize,
    },
    /// The broker acknowledged one of our QoS 1 publishes.
    PubAck,
    /// Our DISCONNECT went out.
    Disconnected,
    Other,
}

/// An incoming PUBLISH.
#[derive(Debug)]
pub struct Message {
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    pub pkid: u16,
    /// The W3C trace context of its user properties (MQTT 5 only).
    pub trace: trace::Incoming,
}

/// A failed poll: the connection is down (rumqttc reconnects on the next poll).
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error(transparent)]
    V4(rumqttc::ConnectionError),
    #[error(transparent)]
    V5(v5::ConnectionError),
}

impl ConnectionError {
    /// The size of an incoming packet that was larger than the connection reads
    /// ([`EventLoop::set_incoming_limit`]): rumqttc drops the connection before reading it.
    pub fn oversized_packet(&self) -> Option<usize> {
        match self {
            ConnectionError::V4(rumqttc::ConnectionError::MqttState(
                rumqttc::StateError::Deserialization(
                    rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(size),
                ),
            )) => Some(*size),
            ConnectionError::V5(v5::ConnectionError::MqttState(
                v5::StateError::Deserialization(v5::mqttbytes::Error::PayloadSizeLimitExceeded {
                    pkt_size,
                    ..
                }),
            )) => Some(*pkt_size),
            _ => None,
        }
    }

    /// A sentence that says what to check (see `mqtt::describe`).
    pub fn describe(&self) -> String {
        match self {
            ConnectionError::V4(err) => super::describe(err),
            ConnectionError::V5(err) => super::describe_v5(err),
        }
    }
}

impl EventLoop {
    /// The largest incoming packet the next connection reads (its remaining length, in bytes).
    pub fn incoming_limit(&self) -> usize {
        match self {
            EventLoop::V4(eventloop) => eventloop.mqtt_options.max_packet_size(),
            EventLoop::V5(eventloop) => eventloop
                .options
                .max_packet_size()
                .map_or(usize::MAX, |max| max as usize),
        }
    }

    /// Sets the largest incoming packet from the next connection on; `outgoing` stays the
    /// limit of what weir sends. With MQTT 5 the limit is also announced in CONNECT, so the
    /// broker drops larger messages instead of sending them.
    pub fn set_incoming_limit(&mut self, incoming: usize, outgoing: usize) {
        match self {
            EventLoop::V4(eventloop) => {
                eventloop
                    .mqtt_options
                    .set_max_packet_size(incoming, outgoing);
            }
            EventLoop::V5(eventloop) => {
                let max = u32::try_from(incoming).unwrap_or(u32::MAX);
                eventloop.options.set_max_packet_size(Some(max));
            }
        }
    }

    /// The next event; reconnects first when the connection is down. Cancel-safe as rumqttc's
    /// own `poll` is: no state is held here across the await.
    ///
    /// # Errors
    /// The connection failed or was lost.
    pub async fn poll(&mut self) -> Result<Event, ConnectionError> {
        match self {
            EventLoop::V4(eventloop) => {
                use rumqttc::{Event as E, Packet as P};
                Ok(match eventloop.poll().await.map_err(ConnectionError::V4)? {
                    E::Incoming(P::Publish(publish)) => Event::Message(Message {
                        topic: publish.topic,
                        payload: publish.payload,
                        qos: publish.qos,
                        pkid: publish.pkid,
                        trace: trace::Incoming::Absent,
                    }),
                    E::Incoming(P::ConnAck(ack)) => Event::ConnAck {
                        session_present: ack.session_present,
                    },
                    E::Incoming(P::SubAck(ack)) => Event::SubAck {
                        granted: ack
                            .return_codes
                            .iter()
                            .filter(|code| matches!(code, rumqttc::SubscribeReasonCode::Success(_)))
                            .count(),
                    },
                    E::Incoming(P::PubAck(_)) => Event::PubAck,
                    E::Outgoing(rumqttc::Outgoing::Disconnect) => Event::Disconnected,
                    _ => Event::Other,
                })
            }
            EventLoop::V5(eventloop) => {
                use packet5::Packet as P;
                use v5::Event as E;
                Ok(match eventloop.poll().await.map_err(ConnectionError::V5)? {
                    E::Incoming(P::Publish(publish)) => {
                        let trace = publish.properties.as_ref().map_or(
                            trace::Incoming::Absent,
                            |properties| {
                                TraceContext::from_user_properties(&properties.user_properties)
                            },
                        );
                        Event::Message(Message {
                            // MQTT requires UTF-8 topics; a broken one cannot match an input.
                            topic: String::from_utf8(publish.topic.to_vec()).unwrap_or_else(
                                |err| String::from_utf8_lossy(err.as_bytes()).into_owned(),
                            ),
                            payload: publish.payload,
                            qos: qos4(publish.qos),
                            pkid: publish.pkid,
                            trace,
                        })
                    }
                    E::Incoming(P::ConnAck(ack)) => Event::ConnAck {
                        session_present: ack.session_present,
                    },
                    E::Incoming(P::SubAck(ack)) => Event::SubAck {
                        granted: ack
                            .return_codes
                            .iter()
                            .filter(|code| matches!(code, packet5::SubscribeReasonCode::Success(_)))
                            .count(),
                    },
                    E::Incoming(P::PubAck(_)) => Event::PubAck,
                    E::Outgoing(rumqttc::Outgoing::Disconnect) => Event::Disconnected,
                    _ => Event::Other,
                })
            }
        }
    }
}

/// An event's headers as MQTT 5 PUBLISH properties.
fn v5_properties(headers: &Headers) -> packet5::PublishProperties {
    let mut properties = packet5::PublishProperties {
        content_type: Some(headers.content_type.mime().to_owned()),
        correlation_data: headers.id.map(|id| Bytes::copy_from_slice(&id.hex())),
        ..Default::default()
    };
    if let Some(trace) = &headers.trace {
        properties
            .user_properties
            .push((trace::TRACEPARENT.to_owned(), trace.traceparent()));
        if let Some(state) = &trace.state {
            properties
                .user_properties
                .push((trace::TRACESTATE.to_owned(), state.to_string()));
        }
    }
    properties
}

fn qos5(qos: QoS) -> QoS5 {
    match qos {
        QoS::AtMostOnce => QoS5::AtMostOnce,
        QoS::AtLeastOnce => QoS5::AtLeastOnce,
        QoS::ExactlyOnce => QoS5::ExactlyOnce,
    }
}

fn qos4(qos: QoS5) -> QoS {
    match qos {
        QoS5::AtMostOnce => QoS::AtMostOnce,
        QoS5::AtLeastOnce => QoS::AtLeastOnce,
        QoS5::ExactlyOnce => QoS::ExactlyOnce,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::event::EventId;
    use crate::model::message::ContentType;

    #[test]
    fn mqtt_5_properties_carry_content_type_id_and_a_traceparent() {
        let trace = TraceContext::parse(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            Some("congo=t61"),
        )
        .unwrap();
        let properties = v5_properties(&Headers {
            id: Some(EventId(0xabc)),
            content_type: ContentType::Cbor,
            trace: Some(Box::new(trace.clone())),
        });
        assert_eq!(properties.content_type.as_deref(), Some("application/cbor"));
        assert_eq!(
            properties.correlation_data.as_deref(),
            Some(&b"0000000000000abc"[..])
        );
        assert_eq!(
            properties.user_properties,
            vec![
                ("traceparent".to_owned(), trace.traceparent()),
                ("tracestate".to_owned(), "congo=t61".to_owned())
            ]
        );
        let dead_letter = v5_properties(&Headers::default());
        assert_eq!(
            dead_letter.content_type.as_deref(),
            Some("application/json")
        );
        assert!(dead_letter.correlation_data.is_none() && dead_letter.user_properties.is_empty());
    }
}
