//! MQTT intake: polls the rumqttc event loop continuously in its own task, subscribes on every
//! (re)connect, matches each message's topic to an input, stamps its arrival, and hands it to
//! the worker that owns its device through a bounded channel.
//!
//! Nothing slow happens in the poll loop: rumqttc sends keep-alives only from inside `poll()`.
//! When a worker's channel is full the loop waits for room (backpressure reaches the broker's
//! TCP window instead of growing memory); the wait is visible as `weir_queue_depth`.

use crate::engine::{Plan, RawMessage};
use crate::metrics::{Connection, Metrics, WarnLimit};
use crate::mqtt::Backoff;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, SubscribeFilter, SubscribeReasonCode};
use std::future::Future;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

/// Runs intake until `shutdown` resolves, then disconnects and returns, dropping the worker
/// channels so the workers flush and end.
pub async fn run(
    options: MqttOptions,
    plan: Arc<Plan>,
    workers: Vec<mpsc::Sender<RawMessage>>,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) {
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    let filters: Vec<SubscribeFilter> = plan
        .inputs
        .iter()
        .map(|input| SubscribeFilter::new(input.pattern.subscription_filter(), input.qos))
        .collect();
    let received: Vec<_> = plan
        .inputs
        .iter()
        .map(|input| {
            (
                metrics.readings_received.with_label_values(&[&input.name]),
                metrics.received_bytes.with_label_values(&[&input.name]),
            )
        })
        .collect();
    let mut backoff = Backoff::default();
    let mut connected = false;
    // A flapping broker logs one line per interval; the reconnect counter counts them all.
    let mut lost_warnings = WarnLimit::new(crate::mqtt::RECONNECT_WARN_INTERVAL);
    tokio::pin!(shutdown);
    loop {
        let event = tokio::select! {
            biased;
            () = &mut shutdown => break,
            event = eventloop.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                let arrival = Instant::now();
                let Some((input, device)) = plan.match_topic(&publish.topic) else {
                    metrics.readings_unmatched.inc();
                    continue;
                };
                let (count, bytes) = &received[input];
                count.inc();
                bytes.inc_by(publish.payload.len() as u64);
                let shard = Plan::shard(input, device, workers.len());
                let message = RawMessage {
                    input,
                    topic: publish.topic,
                    payload: publish.payload,
                    arrival,
                    arrival_ms: wall_clock_ms(),
                };
                if workers[shard].send(message).await.is_err() {
                    break;
                }
            }
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                connected = true;
                backoff.reset();
                metrics.set_connected(Connection::Source, true);
                tracing::info!(
                    session_present = ack.session_present,
                    "source connected to the broker; subscribing"
                );
                // try_subscribe never waits, so it cannot stall this loop.
                if let Err(err) = client.try_subscribe_many(filters.clone()) {
                    tracing::error!(%err, "could not queue the subscription");
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                let granted = ack
                    .return_codes
                    .iter()
                    .filter(|code| matches!(code, SubscribeReasonCode::Success(_)))
                    .count();
                if granted < filters.len() {
                    tracing::error!(
                        granted,
                        requested = filters.len(),
                        "the broker refused some subscriptions; check its ACLs"
                    );
                }
                metrics.set_subscribed(granted);
                tracing::info!(filters = granted, "subscribed");
            }
            Ok(_) => {}
            Err(err) => {
                if connected {
                    if let Some(suppressed) = lost_warnings.allow(Instant::now()) {
                        tracing::warn!(%err, suppressed, "source lost the broker connection; reconnecting");
                    }
                    metrics.set_connected(Connection::Source, false);
                    connected = false;
                } else {
                    tracing::debug!(%err, "source cannot reach the broker yet");
                }
                metrics
                    .mqtt_reconnects
                    .with_label_values(&[Connection::Source.label()])
                    .inc();
                let delay = backoff.next_delay();
                tokio::select! {
                    () = &mut shutdown => break,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
    if connected {
        let _ = client.try_disconnect();
        // Let the event loop write the DISCONNECT; bounded, since the broker may be gone.
        let _ = tokio::time::timeout(std::time::Duration::from_millis(500), async {
            while let Ok(event) = eventloop.poll().await {
                if matches!(event, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                    break;
                }
            }
        })
        .await;
    }
    metrics.set_connected(Connection::Source, false);
    tracing::info!("source stopped");
}

/// Wall-clock ms since the epoch, the arrival time of a reading.
pub fn wall_clock_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
