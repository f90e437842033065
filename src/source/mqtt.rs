//! The MQTT source: one rumqttc connection (3.1.1 or 5) that subscribes to the inputs' filters on
//! every (re)connect, reconnects with jittered backoff, turns PUBLISHes into [`Incoming`]s and
//! acknowledges them only on the connection that delivered them.

use crate::metrics::{Connection, Metrics, WarnLimit};
use crate::model::port::{AckToken, Acked, Acker, Closed, Delivery, Incoming, Source};
use crate::mqtt::client::{self, Client, ConnectionError, Event};
use crate::mqtt::{Backoff, ConnectFailures, RECONNECT_WARN_INTERVAL};
use rumqttc::QoS;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long closing keeps the connection served for the last acknowledgements.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Intake over MQTT.
pub struct MqttSource {
    client: Client,
    eventloop: client::EventLoop,
    /// Bumped at every CONNACK; part of each ack token, so an ack is never sent on a later
    /// connection, where its packet id means another message (the broker redelivers instead).
    generation: Arc<AtomicU64>,
    filters: Vec<(String, QoS)>,
    /// `broker.max_packet_bytes`: what a connection normally reads (see [`Self::oversized`]).
    packet_limit: usize,
    backoff: Backoff,
    failures: ConnectFailures,
    connected: bool,
    /// The SUBSCRIBE of this connection is still to be queued: the request queue was full
    /// (acks fill it after a backlog), so it is tried again at every event until it goes.
    subscribe_pending: bool,
    /// When the next connection attempt may start, after a failure.
    retry_at: Option<tokio::time::Instant>,
    /// A flapping broker logs one line per interval; the reconnect counter counts them all.
    lost_warnings: WarnLimit,
    metrics: Arc<Metrics>,
}

impl MqttSource {
    /// A source subscribing to `filters` once connected; it connects when first asked for a
    /// delivery. With `manual_acks`, QoS 1 messages are acknowledged only through its acker.
    pub fn new(
        mut options: client::Options,
        manual_acks: bool,
        filters: Vec<(String, QoS)>,
        metrics: Arc<Metrics>,
    ) -> Self {
        options.set_manual_acks(manual_acks);
        let (client, eventloop) = client::new(options, 1024);
        let packet_limit = eventloop.incoming_limit();
        Self {
            client,
            eventloop,
            generation: Arc::new(AtomicU64::new(0)),
            filters,
            packet_limit,
            backoff: Backoff::default(),
            failures: ConnectFailures::default(),
            connected: false,
            subscribe_pending: false,
            retry_at: None,
            lost_warnings: WarnLimit::new(RECONNECT_WARN_INTERVAL),
            metrics,
        }
    }

    /// Queues the SUBSCRIBE if it is owed and the request queue has room.
    fn subscribe(&mut self) {
        // try_subscribe never waits, so it cannot stall the intake loop.
        self.subscribe_pending = self.client.try_subscribe_many(&self.filters).is_err();
    }

    fn delivery(&mut self, event: Result<Event, ConnectionError>) -> Delivery {
        if self.subscribe_pending && self.connected {
            self.subscribe();
        }
        match event {
            Ok(Event::Message(mut publish)) => {
                if crate::mqtt::publish_size(&publish.topic, publish.payload.len())
                    > self.packet_limit
                {
                    // The oversized message the limit was raised for: it goes on as too_large
                    // (every input's max_payload_bytes is below the packet limit) with what
                    // fits the limit, so the log never holds more; later connections read only
                    // up to the limit again.
                    publish.payload = bytes::Bytes::copy_from_slice(
                        &publish.payload[..publish.payload.len().min(self.packet_limit)],
                    );
                    self.eventloop
                        .set_incoming_limit(self.packet_limit, self.packet_limit);
                }
                let ack = (publish.qos != QoS::AtMostOnce).then(|| {
                    AckToken(
                        self.generation.load(Ordering::Relaxed) << 16 | u64::from(publish.pkid),
                    )
                });
                Delivery::Message(Incoming {
                    topic: publish.topic,
                    payload: publish.payload,
                    trace: publish.trace,
                    ack,
                    position: None,
                    received_ms: None,
                })
            }
            Ok(Event::ConnAck { session_present }) => {
                self.connected = true;
                self.generation.fetch_add(1, Ordering::Relaxed);
                self.backoff.reset();
                self.failures.reset();
                self.metrics.set_connected(Connection::Source, true);
                tracing::info!(
                    session_present,
                    "source connected to the broker; subscribing"
                );
                self.subscribe();
                if self.subscribe_pending {
                    tracing::debug!(
                        "the request queue is full; subscribing as soon as it has room"
                    );
                }
                Delivery::Other
            }
            Ok(Event::SubAck { granted }) => {
                if granted < self.filters.len() {
                    tracing::error!(
                        granted,
                        requested = self.filters.len(),
                        "the broker refused some subscriptions; check its ACLs"
                    );
                }
                self.metrics.set_subscribed(granted);
                tracing::info!(filters = granted, "subscribed");
                Delivery::Other
            }
            Ok(_) => Delivery::Other,
            Err(err) => {
                if let Some(size) = err.oversized_packet() {
                    self.oversized(size);
                }
                if self.connected {
                    if let Some(suppressed) = self.lost_warnings.allow(Instant::now()) {
                        tracing::warn!(%err, suppressed, "source lost the broker connection; reconnecting");
                    }
                    self.metrics.set_connected(Connection::Source, false);
                    self.connected = false;
                } else {
                    self.failures.report(Connection::Source.label(), &err);
                }
                self.metrics
                    .mqtt_reconnects
                    .with_label_values(&[Connection::Source.label()])
                    .inc();
                // rumqttc reconnects at once on the next poll; the backoff is ours.
                self.retry_at = Some(tokio::time::Instant::now() + self.backoff.next_delay());
                Delivery::Lost
            }
        }
    }

    /// An incoming packet larger than `broker.max_packet_bytes` dropped the connection: rumqttc
    /// refuses to read it. A persistent session's broker delivers the same message again first
    /// thing on the next connection, and it would drop that one too, forever (a poison
    /// message). So the next connection reads packets up to this one's size: the message
    /// arrives, is dead-lettered as too_large and acknowledged, and the limit goes back down
    /// after it. Reading it costs its size in memory once (MQTT caps a packet at 256 MiB); with
    /// MQTT 5 the broker knows the limit from CONNECT and drops such messages itself.
    fn oversized(&mut self, size: usize) {
        self.metrics.mqtt_oversized_packets.inc();
        tracing::warn!(
            size,
            limit = self.packet_limit,
            "an incoming packet is larger than broker.max_packet_bytes and dropped the connection; reading it once on the next connection to dead-letter it as too_large"
        );
        self.eventloop
            .set_incoming_limit(size.max(self.packet_limit), self.packet_limit);
    }
}

impl Source for MqttSource {
    type Acker = MqttAcker;

    fn try_next(&mut self) -> Option<Delivery> {
        use futures_util::FutureExt as _;
        if self.retry_at.is_some() {
            return None;
        }
        let event = self.eventloop.poll().now_or_never()?;
        Some(self.delivery(event))
    }

    async fn next(&mut self) -> Delivery {
        if let Some(at) = self.retry_at {
            // Cancel-safe: the deadline stays until it has passed.
            tokio::time::sleep_until(at).await;
            self.retry_at = None;
        }
        let event = self.eventloop.poll().await;
        self.delivery(event)
    }

    fn acker(&self) -> MqttAcker {
        MqttAcker {
            client: self.client.clone(),
            generation: self.generation.clone(),
        }
    }

    async fn close(mut self, acks_sent: Option<tokio::sync::oneshot::Receiver<()>>) {
        if self.connected {
            // Keep polling while the last acks are sent, so they reach the broker on this
            // connection; messages arriving now are left unacked and the broker redelivers them
            // after a restart.
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
                if let Some(done) = acks_sent {
                    let mut done = std::pin::pin!(done);
                    loop {
                        tokio::select! {
                            _ = &mut done => break,
                            event = self.eventloop.poll() => if event.is_err() { return; },
                        }
                    }
                }
                let _ = self.client.try_disconnect();
                while let Ok(event) = self.eventloop.poll().await {
                    if matches!(event, Event::Disconnected) {
                        break;
                    }
                }
            })
            .await;
        }
        self.metrics.set_connected(Connection::Source, false);
    }
}

/// Sends an MQTT source's acks, each only on the connection that delivered its message.
pub struct MqttAcker {
    client: Client,
    generation: Arc<AtomicU64>,
}

impl Acker for MqttAcker {
    fn try_ack(&self, token: AckToken) -> Result<Acked, Closed> {
        if token.0 >> 16 != self.generation.load(Ordering::Relaxed) {
            // Delivered on an earlier connection: the broker sends it again instead.
            return Ok(Acked::Stale);
        }
        let pkid = (token.0 & 0xFFFF) as u16;
        match self.client.try_ack(pkid).map_err(|_| Closed)? {
            true => Ok(Acked::Sent),
            false => Ok(Acked::Later),
        }
    }
}
