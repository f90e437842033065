//! MQTT publishing on its own connection, so a slow publish never stalls intake. The event loop is
//! polled by a dedicated task (never publish from the polling task: that deadlocks under load);
//! the sink task hands each message to the client in the order the workers produced it.
//!
//! While the broker is away, rumqttc keeps queued publishes and sends them after reconnecting;
//! when its bounded request queue is full, the sink waits, and backpressure reaches the workers.

use crate::engine::Plan;
use crate::metrics::{Connection, LatencyRecorder, Metrics, WarnLimit};
use crate::mqtt::Backoff;
use crate::mqtt::RECONNECT_WARN_INTERVAL;
use crate::route::Outgoing;
use prometheus::IntCounter;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// How long the sink keeps trying to hand over the last messages at shutdown.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Wall-clock us since the epoch.
fn wall_clock_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// The per-rule handles of the publish loop, resolved once.
struct RuleCounters {
    attempts: IntCounter,
    published: IntCounter,
    errors: IntCounter,
    event_latency: LatencyRecorder,
}

/// Publishes everything from `input` until the workers close it, then disconnects.
pub async fn run(
    options: MqttOptions,
    plan: Arc<Plan>,
    mut input: mpsc::Receiver<Outgoing>,
    metrics: Arc<Metrics>,
    request_capacity: usize,
) {
    let (client, mut eventloop) = AsyncClient::new(options, request_capacity.max(10));
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let poll_metrics = metrics.clone();
    let poller = tokio::spawn(async move {
        let mut backoff = Backoff::default();
        let mut connected = false;
        // A flapping broker logs one line per interval; the reconnect counter counts them all.
        let mut lost_warnings = WarnLimit::new(RECONNECT_WARN_INTERVAL);
        loop {
            let event = tokio::select! {
                _ = stop_rx.changed() => break,
                event = eventloop.poll() => event,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    connected = true;
                    backoff.reset();
                    poll_metrics.set_connected(Connection::Sink, true);
                    tracing::info!("sink connected to the broker");
                }
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => break,
                Ok(_) => {}
                Err(err) => {
                    if connected {
                        if let Some(suppressed) = lost_warnings.allow(Instant::now()) {
                            tracing::warn!(%err, suppressed, "sink lost the broker connection; reconnecting");
                        }
                        connected = false;
                        poll_metrics.set_connected(Connection::Sink, false);
                    } else {
                        tracing::debug!(%err, "sink cannot reach the broker yet");
                    }
                    poll_metrics
                        .mqtt_reconnects
                        .with_label_values(&[Connection::Sink.label()])
                        .inc();
                    let delay = backoff.next_delay();
                    tokio::select! {
                        _ = stop_rx.changed() => break,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
        poll_metrics.set_connected(Connection::Sink, false);
    });

    let mut counters: Vec<_> = plan
        .rules
        .iter()
        .map(|rule| RuleCounters {
            attempts: metrics.publish_attempts.with_label_values(&[&rule.name]),
            published: metrics.events_published.with_label_values(&[&rule.name]),
            errors: metrics.publish_errors.with_label_values(&[&rule.name]),
            event_latency: metrics.event_latency.recorder(&rule.name),
        })
        .collect();
    let mut processing_latency = metrics.processing_latency.recorder("");
    while let Some(message) = input.recv().await {
        let rule = &mut counters[message.rule_index];
        let arrival = message.arrival;
        let ts = message.ts;
        rule.attempts.inc();
        match client
            .publish(message.topic, message.qos, message.retain, message.payload)
            .await
        {
            Ok(()) => {
                rule.published.inc();
                if let Some(arrival) = arrival {
                    processing_latency.record(arrival.elapsed());
                }
                // Event times are whole ms; the clock is read in us so that sub-ms latencies
                // are not all rounded to zero.
                let behind_us = wall_clock_us().saturating_sub(ts.saturating_mul(1000));
                if let Ok(behind_us) = u64::try_from(behind_us) {
                    rule.event_latency.record(Duration::from_micros(behind_us));
                }
            }
            Err(err) => {
                rule.errors.inc();
                tracing::error!(%err, "could not hand an event to the broker connection");
            }
        }
        // Latencies reach the shared histograms in batches: whenever the queue runs dry (and
        // every 1024 values), so a scrape never waits on the publish path.
        if input.is_empty() {
            processing_latency.flush();
            counters.iter_mut().for_each(|c| c.event_latency.flush());
        }
    }
    drop((processing_latency, counters));
    // Input closed: queue the DISCONNECT behind the publishes and give the poller time to send them.
    let _ = client.try_disconnect();
    let mut poller = poller;
    if tokio::time::timeout(DRAIN_TIMEOUT, &mut poller)
        .await
        .is_err()
    {
        tracing::warn!("sink could not flush within {DRAIN_TIMEOUT:?}; the broker is unreachable");
        let _ = stop_tx.send(true);
        let _ = poller.await;
    }
    tracing::info!("sink stopped");
}
