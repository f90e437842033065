//! The MQTT sink: publishes on its own rumqttc connection (3.1.1 or 5), so a slow publish never
//! stalls intake. Its event loop is polled by a dedicated task (never publish from the polling
//! task: that deadlocks under load), which counts PUBACKs as confirmations: a broker
//! acknowledges one client's QoS 1 publishes in order, and rumqttc retransmits unacknowledged
//! ones itself after a reconnect.

use super::Sink;
use crate::metrics::{Connection, Metrics, WarnLimit};
use crate::mqtt::client::{self, Client, Event};
use crate::mqtt::{Backoff, ConnectFailures, RECONNECT_WARN_INTERVAL};
use crate::route::Outgoing;
use rumqttc::QoS;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Publishing over MQTT.
pub struct MqttSink {
    client: Client,
    /// Up while the poll task has a connection: events are handed over only then, so while it
    /// is down they wait in the outbox, where its cap and policy apply (rumqttc's own request
    /// queue is not counted).
    connected: Arc<AtomicBool>,
    /// PUBACKs received so far.
    confirmed: Arc<AtomicU64>,
    /// `broker.max_packet_bytes`: a larger PUBLISH would drop the connection, and rumqttc would
    /// send it again after every reconnect.
    max_packet: usize,
    stop: watch::Sender<bool>,
    poller: JoinHandle<()>,
}

impl MqttSink {
    /// Connects in the background (retrying with backoff) and starts confirming publishes.
    /// `request_capacity` bounds rumqttc's request queue.
    pub fn start(
        options: client::Options,
        request_capacity: usize,
        max_packet: usize,
        metrics: Arc<Metrics>,
    ) -> Self {
        let (client, eventloop) = client::new(options, request_capacity.max(10));
        let connected = Arc::new(AtomicBool::new(false));
        let confirmed = Arc::new(AtomicU64::new(0));
        let (stop, stop_rx) = watch::channel(false);
        let poller = tokio::spawn(poll(
            eventloop,
            stop_rx,
            connected.clone(),
            confirmed.clone(),
            metrics,
        ));
        Self {
            client,
            connected,
            confirmed,
            max_packet,
            stop,
            poller,
        }
    }
}

/// Polls the connection until stopped or disconnected: reconnects with backoff, counts PUBACKs.
async fn poll(
    mut eventloop: client::EventLoop,
    mut stop: watch::Receiver<bool>,
    up: Arc<AtomicBool>,
    confirmed: Arc<AtomicU64>,
    metrics: Arc<Metrics>,
) {
    let mut backoff = Backoff::default();
    let mut failures = ConnectFailures::default();
    let mut connected = false;
    // A flapping broker logs one line per interval; the reconnect counter counts them all.
    let mut lost_warnings = WarnLimit::new(RECONNECT_WARN_INTERVAL);
    loop {
        let event = tokio::select! {
            _ = stop.changed() => break,
            event = eventloop.poll() => event,
        };
        match event {
            Ok(Event::PubAck) => {
                confirmed.fetch_add(1, Ordering::Release);
            }
            Ok(Event::ConnAck { .. }) => {
                connected = true;
                up.store(true, Ordering::Release);
                backoff.reset();
                failures.reset();
                metrics.set_connected(Connection::Sink, true);
                tracing::info!("sink connected to the broker");
            }
            Ok(Event::Disconnected) => break,
            Ok(_) => {}
            Err(err) => {
                up.store(false, Ordering::Release);
                if connected {
                    if let Some(suppressed) = lost_warnings.allow(Instant::now()) {
                        tracing::warn!(%err, suppressed, "sink lost the broker connection; reconnecting");
                    }
                    connected = false;
                    metrics.set_connected(Connection::Sink, false);
                } else {
                    failures.report(Connection::Sink.label(), &err);
                }
                metrics
                    .mqtt_reconnects
                    .with_label_values(&[Connection::Sink.label()])
                    .inc();
                let delay = backoff.next_delay();
                tokio::select! {
                    _ = stop.changed() => break,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
    metrics.set_connected(Connection::Sink, false);
}

impl Sink for MqttSink {
    fn is_ready(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    fn refuses(&self, event: &Outgoing) -> Option<&'static str> {
        if crate::mqtt::publish_size(&event.topic, event.payload.len()) > self.max_packet {
            Some("it is larger than broker.max_packet_bytes")
        } else if event.topic.is_empty() || event.topic.contains(['+', '#', '\0']) {
            Some("its topic is empty or holds a wildcard or NUL")
        } else {
            None
        }
    }

    fn offer(&mut self, mut event: Outgoing) -> Option<Outgoing> {
        let topic = std::mem::take(&mut event.topic);
        let payload = std::mem::take(&mut event.payload);
        let qos = if event.confirm {
            QoS::AtLeastOnce
        } else {
            QoS::AtMostOnce
        };
        match self
            .client
            .try_publish(topic, qos, event.retain, payload, &event.headers)
        {
            Ok(()) => None,
            Err(returned) => {
                event.topic = returned.topic;
                event.payload = returned.payload;
                Some(event)
            }
        }
    }

    fn confirmed(&self) -> u64 {
        self.confirmed.load(Ordering::Acquire)
    }

    async fn close(self) {
        let _ = self.client.try_disconnect();
        let mut poller = self.poller;
        if tokio::time::timeout(Duration::from_secs(1), &mut poller)
            .await
            .is_err()
        {
            let _ = self.stop.send(true);
            let _ = poller.await;
        }
    }
}
