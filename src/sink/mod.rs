//! MQTT publishing on its own connection, so a slow publish never stalls intake. The event loop is
//! polled by a dedicated task (never publish from the polling task: that deadlocks under load);
//! the sink task hands each message to the client in the order the workers produced it.
//!
//! While the broker is away, rumqttc keeps queued publishes and sends them after reconnecting;
//! when its bounded request queue is full, the sink waits, and backpressure reaches the workers.

use crate::engine::Plan;
use crate::metrics::{Connection, Metrics};
use crate::mqtt::{Backoff, ConnectFailures};
use crate::route::Outgoing;
use crate::source::wall_clock_ms;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// How long the sink keeps trying to hand over the last messages at shutdown.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

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
        let mut failures = ConnectFailures::default();
        let mut connected = false;
        loop {
            let event = tokio::select! {
                _ = stop_rx.changed() => break,
                event = eventloop.poll() => event,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    connected = true;
                    backoff.reset();
                    failures.reset();
                    poll_metrics.set_connected(Connection::Sink, true);
                    tracing::info!("sink connected to the broker");
                }
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => break,
                Ok(_) => {}
                Err(err) => {
                    if connected {
                        tracing::warn!(%err, "sink lost the broker connection; reconnecting");
                        connected = false;
                        poll_metrics.set_connected(Connection::Sink, false);
                    } else {
                        failures.report(Connection::Sink.label(), &err);
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

    let counters: Vec<_> = plan
        .rules
        .iter()
        .map(|rule| {
            (
                metrics.events_published.with_label_values(&[&rule.name]),
                metrics.publish_errors.with_label_values(&[&rule.name]),
                metrics.event_latency.with_label_values(&[&rule.name]),
            )
        })
        .collect();
    while let Some(message) = input.recv().await {
        let (published, errors, event_latency) = &counters[message.rule_index];
        let arrival = message.arrival;
        let ts = message.ts;
        match client
            .publish(message.topic, message.qos, message.retain, message.payload)
            .await
        {
            Ok(()) => {
                published.inc();
                if let Some(arrival) = arrival {
                    metrics.observe_latency(arrival.elapsed());
                }
                let behind_ms = wall_clock_ms().saturating_sub(ts);
                if behind_ms >= 0 {
                    event_latency.observe(behind_ms as f64 / 1e3);
                }
            }
            Err(err) => {
                errors.inc();
                tracing::error!(%err, "could not hand an event to the broker connection");
            }
        }
    }
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
