//! MQTT publishing on its own connection, so a slow publish never stalls intake. The event loop is
//! polled by a dedicated task (never publish from the polling task: that deadlocks under load).
//!
//! The sink owns the outbox: derived events queued for the broker, and QoS 1 events handed to the
//! connection but not yet acknowledged (PUBACK). Its size is capped (`delivery.outbox_max_messages`)
//! and `delivery.outbox_when_full` says what happens at the cap: `block` stops taking events from
//! the workers (backpressure reaches intake), `drop_oldest` / `drop_newest` drop and count.
//!
//! The sink also completes snapshots: each worker passes its state down the same channel as its
//! events (a barrier), so when every worker's barrier has arrived, the outbox holds every event
//! derived before the barrier that the broker has not acknowledged.

use crate::config::OutboxPolicy;
use crate::engine::Plan;
use crate::metrics::{Connection, Metrics};
use crate::mqtt::{Backoff, ConnectFailures};
use crate::route::Outgoing;
use crate::source::wall_clock_ms;
use crate::store::{DeviceSnapshot, Snapshot, StoredMessage};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// How long the sink keeps trying to hand over and get acknowledged the last events at shutdown.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// What flows from the workers to the sink.
#[derive(Debug)]
pub enum SinkInput {
    Event(Outgoing),
    /// One worker's state as of input `lsn`.
    Barrier {
        lsn: u64,
        devices: Vec<DeviceSnapshot>,
    },
}

/// How the sink is set up.
pub struct SinkOptions {
    pub mqtt: MqttOptions,
    pub request_capacity: usize,
    pub outbox_max: usize,
    pub policy: OutboxPolicy,
    /// Number of workers, i.e. barriers that complete a snapshot.
    pub workers: usize,
    /// Where completed snapshots go (the store task); `None` without a state dir.
    pub snapshots: Option<mpsc::Sender<Snapshot>>,
    /// Events restored from the last snapshot's outbox, published first.
    pub restored: Vec<Outgoing>,
}

/// QoS 1 events handed to the connection and not yet acknowledged, oldest first. Shared with the
/// poll task, which pops one per PUBACK: a broker acknowledges one client's QoS 1 publishes in
/// order, and rumqttc retransmits unacknowledged ones itself after a reconnect.
type Unacked = Arc<Mutex<VecDeque<Outgoing>>>;

fn stored(message: &Outgoing, plan: &Plan) -> StoredMessage {
    StoredMessage {
        topic: message.topic.clone(),
        payload: message.payload.clone(),
        qos: message.qos as u8,
        retain: message.retain,
        rule: message
            .rule_index
            .map(|i| plan.rules[i].name.to_string())
            .unwrap_or_default(),
    }
}

/// Rebuilds a restored outbox entry.
pub fn restore(message: StoredMessage, plan: &Plan) -> Outgoing {
    Outgoing {
        rule_index: plan.rules.iter().position(|r| *r.name == message.rule),
        topic: message.topic,
        payload: message.payload,
        qos: if message.qos == 0 {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        },
        retain: message.retain,
        arrival: None,
        ts: 0,
    }
}

/// Publishes everything from `input` until the workers close it, then drains and disconnects.
pub async fn run(
    options: SinkOptions,
    plan: Arc<Plan>,
    mut input: mpsc::Receiver<SinkInput>,
    metrics: Arc<Metrics>,
) {
    let (client, mut eventloop) = AsyncClient::new(options.mqtt, options.request_capacity.max(10));
    let unacked: Unacked = Arc::default();
    // Events are handed to the connection only while it is up; while it is down they stay in the
    // outbox, where the cap and the policy apply (rumqttc's own request queue is not counted).
    let connected = Arc::new(AtomicBool::new(false));
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let poll_metrics = metrics.clone();
    let poll_unacked = unacked.clone();
    let poll_connected = connected.clone();
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
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    if let Ok(mut unacked) = poll_unacked.lock() {
                        unacked.pop_front();
                    }
                }
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    connected = true;
                    poll_connected.store(true, Ordering::Release);
                    backoff.reset();
                    failures.reset();
                    poll_metrics.set_connected(Connection::Sink, true);
                    tracing::info!("sink connected to the broker");
                }
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => break,
                Ok(_) => {}
                Err(err) => {
                    poll_connected.store(false, Ordering::Release);
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
                metrics.event_latency.with_label_values(&[&rule.name]),
            )
        })
        .collect();
    let mut queue: VecDeque<Outgoing> = options.restored.into();
    let mut barriers: BTreeMap<u64, (usize, Vec<DeviceSnapshot>)> = BTreeMap::new();
    let unacked_len = |unacked: &Unacked| unacked.lock().map_or(0, |u| u.len());
    let mut input_open = true;

    // Hands queued events to the connection until its request queue is full.
    let hand_over = |queue: &mut VecDeque<Outgoing>| {
        if !connected.load(Ordering::Acquire) {
            return;
        }
        while let Some(message) = queue.front() {
            let result = client.try_publish(
                message.topic.clone(),
                message.qos,
                message.retain,
                message.payload.clone(),
            );
            if result.is_err() {
                break;
            }
            let Some(message) = queue.pop_front() else {
                break;
            };
            if let Some(rule) = message.rule_index {
                let (published, event_latency) = &counters[rule];
                published.inc();
                let behind_ms = wall_clock_ms().saturating_sub(message.ts);
                if behind_ms >= 0 {
                    event_latency.observe(behind_ms as f64 / 1e3);
                }
            }
            if let Some(arrival) = message.arrival {
                metrics.observe_latency(arrival.elapsed());
            }
            if message.qos != QoS::AtMostOnce {
                if let Ok(mut unacked) = unacked.lock() {
                    unacked.push_back(message);
                }
            }
        }
    };

    while input_open {
        let outbox_len = queue.len() + unacked_len(&unacked);
        metrics.outbox_messages.set(outbox_len as i64);
        let accepting = outbox_len < options.outbox_max || options.policy != OutboxPolicy::Block;
        tokio::select! {
            received = input.recv(), if accepting => match received {
                None => input_open = false,
                Some(SinkInput::Event(message)) => {
                    if outbox_len >= options.outbox_max {
                        match options.policy {
                            OutboxPolicy::DropOldest => {
                                queue.pop_front();
                                metrics.outbox_dropped.with_label_values(&["drop_oldest"]).inc();
                                queue.push_back(message);
                            }
                            OutboxPolicy::DropNewest | OutboxPolicy::Block => {
                                metrics.outbox_dropped.with_label_values(&["drop_newest"]).inc();
                            }
                        }
                    } else {
                        queue.push_back(message);
                    }
                }
                Some(SinkInput::Barrier { lsn, devices }) => {
                    let entry = barriers.entry(lsn).or_default();
                    entry.0 += 1;
                    entry.1.extend(devices);
                    if entry.0 >= options.workers {
                        let (_, devices) = barriers.remove(&lsn).unwrap_or_default();
                        if let Some(snapshots) = &options.snapshots {
                            let mut outbox: Vec<StoredMessage> = unacked
                                .lock()
                                .map(|u| u.iter().map(|m| stored(m, &plan)).collect())
                                .unwrap_or_default();
                            outbox.extend(queue.iter().map(|m| stored(m, &plan)));
                            let snapshot = Snapshot { lsn, devices, outbox };
                            if snapshots.send(snapshot).await.is_err() {
                                tracing::error!("the snapshot writer is gone; state is no longer saved");
                            }
                        }
                    }
                }
            },
            () = tokio::time::sleep(Duration::from_millis(5)), if !queue.is_empty() || !accepting => {}
        }
        hand_over(&mut queue);
    }

    // Input closed: hand over what is queued and wait for acknowledgements, within a bound.
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        loop {
            hand_over(&mut queue);
            if queue.is_empty() && unacked_len(&unacked) == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let left = queue.len() + unacked_len(&unacked);
    metrics.outbox_messages.set(left as i64);
    if drained.is_err() {
        tracing::warn!(
            left,
            "sink could not publish everything within {DRAIN_TIMEOUT:?}; with a state dir, the last snapshot holds them"
        );
    }
    let _ = client.try_disconnect();
    let mut poller = poller;
    if tokio::time::timeout(Duration::from_secs(1), &mut poller)
        .await
        .is_err()
    {
        let _ = stop_tx.send(true);
        let _ = poller.await;
    }
    tracing::info!("sink stopped");
}
