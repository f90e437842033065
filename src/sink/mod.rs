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
use crate::metrics::{Connection, LatencyRecorder, Metrics, WarnLimit};
use crate::mqtt::client::{self, Client, ContentType, Event, Properties};
use crate::mqtt::{Backoff, ConnectFailures, RECONNECT_WARN_INTERVAL};
use crate::route::Outgoing;
use crate::store::writer::SnapshotCommand;
use crate::store::{DeviceSnapshot, Snapshot, StoredMessage};
use crate::trace::TraceContext;
use prometheus::IntCounter;
use rumqttc::QoS;
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// How long the sink keeps trying to hand over and get acknowledged the last events at shutdown.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// What flows from the workers to the sink.
#[derive(Debug)]
pub enum SinkInput {
    Event(Outgoing),
    /// One worker's state as of input `lsn`, made by the rules `rules` (name, fingerprint).
    Barrier {
        lsn: u64,
        devices: Vec<DeviceSnapshot>,
        rules: Vec<(String, u64)>,
    },
}

/// How the sink is set up.
pub struct SinkOptions {
    /// Connection options (MQTT 3.1.1 or 5).
    pub mqtt: client::Options,
    pub request_capacity: usize,
    /// `broker.max_packet_bytes` of the publishing connection.
    pub max_packet_bytes: usize,
    pub outbox_max: usize,
    pub policy: OutboxPolicy,
    /// Number of workers, i.e. barriers that complete a snapshot.
    pub workers: usize,
    /// Where completed snapshots go (the store task); `None` without a state dir.
    pub snapshots: Option<mpsc::Sender<SnapshotCommand>>,
    /// Events restored from the last snapshot's outbox, published first.
    pub restored: Vec<Outgoing>,
}

/// QoS 1 events handed to the connection and not yet acknowledged, oldest first. Shared with the
/// poll task, which pops one per PUBACK: a broker acknowledges one client's QoS 1 publishes in
/// order, and rumqttc retransmits unacknowledged ones itself after a reconnect.
type Unacked = Arc<Mutex<VecDeque<Outgoing>>>;

fn stored(message: &Outgoing) -> StoredMessage {
    StoredMessage {
        topic: message.topic.clone(),
        payload: message.payload.clone(),
        qos: message.qos as u8,
        retain: message.retain,
        rule: message.rule.as_deref().unwrap_or_default().to_owned(),
        id: message.properties.correlation.map(|id| id.0),
        traceparent: message.properties.trace.as_ref().map(|t| t.traceparent()),
        tracestate: message
            .properties
            .trace
            .as_ref()
            .and_then(|t| t.state.as_deref().map(str::to_owned)),
    }
}

/// The outbox as a snapshot keeps it: the unacknowledged events, then the queued ones, in
/// publish order.
fn stored_outbox(unacked: &Unacked, queue: &VecDeque<Outgoing>) -> Vec<StoredMessage> {
    let mut outbox: Vec<StoredMessage> = unacked
        .lock()
        .map(|u| u.iter().map(stored).collect())
        .unwrap_or_default();
    outbox.extend(queue.iter().map(stored));
    outbox
}

/// Rebuilds a restored outbox entry.
pub fn restore(message: StoredMessage, plan: &Plan) -> Outgoing {
    let rule_index = plan.rules.iter().position(|r| *r.name == message.rule);
    let rule = (!message.rule.is_empty()).then(|| Arc::from(message.rule.as_str()));
    let properties = Properties {
        correlation: message.id.map(crate::event::EventId),
        // Dead letters (no rule) are JSON.
        content_type: rule_index.map_or(ContentType::Json, |rule| {
            plan.rules[rule].route.content_type()
        }),
        trace: message
            .traceparent
            .as_deref()
            .and_then(|parent| TraceContext::parse(parent, message.tracestate.as_deref()))
            .map(Box::new),
    };
    Outgoing {
        rule,
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
        properties,
    }
}

/// Wall-clock us since the epoch.
fn wall_clock_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// The per-rule handles of the publish loop, resolved on a rule's first event.
struct RuleCounters {
    rule: Arc<str>,
    attempts: IntCounter,
    published: IntCounter,
    event_latency: LatencyRecorder,
}

impl RuleCounters {
    fn new(rule: &Arc<str>, metrics: &Metrics) -> Self {
        Self {
            rule: rule.clone(),
            attempts: metrics.publish_attempts.with_label_values(&[&**rule]),
            published: metrics.events_published.with_label_values(&[&**rule]),
            event_latency: metrics.event_latency.recorder(rule),
        }
    }
}

/// Where the sink hands events to the connection, and what it records when it does.
struct Handover<'a> {
    client: &'a Client,
    connected: &'a AtomicBool,
    unacked: &'a Unacked,
    metrics: &'a Metrics,
    /// One entry per rule name seen; a handful, so a scan (which matches the name's `Arc` by
    /// pointer first) beats hashing the name per event. Rules removed by a reload stay, bounded
    /// by the number of reloads times rules.
    counters: Vec<RuleCounters>,
    processing_latency: LatencyRecorder,
    /// `broker.max_packet_bytes`: a larger PUBLISH would drop the connection, and rumqttc would
    /// send it again after every reconnect.
    max_packet: usize,
    refused_warnings: WarnLimit,
}

impl Handover<'_> {
    /// Why `message` can never be published, if it cannot: it is counted, logged and dropped
    /// rather than handed to the connection, where it would fail again after every reconnect
    /// and hold up every event behind it.
    fn unpublishable(&mut self, message: &Outgoing) -> Option<&'static str> {
        // Remaining length of the PUBLISH: topic length, topic, packet id, payload.
        let size = 2 + message.topic.len() + 2 + message.payload.len();
        let problem = if size > self.max_packet {
            "it is larger than broker.max_packet_bytes"
        } else if message.topic.is_empty() || message.topic.contains(['+', '#', '\0']) {
            "its topic is empty or holds a wildcard or NUL"
        } else {
            return None;
        };
        if let Some(rule) = &message.rule {
            self.metrics.publish_errors.with_label_values(&[rule]).inc();
        }
        if let Some(suppressed) = self.refused_warnings.allow(Instant::now()) {
            tracing::error!(
                topic = %message.topic,
                size,
                rule = message.rule.as_deref().unwrap_or("dead letter"),
                suppressed,
                "an event cannot be published and was dropped: {problem}"
            );
        }
        Some(problem)
    }

    fn counters(&mut self, rule: &Arc<str>) -> &mut RuleCounters {
        let found = self
            .counters
            .iter()
            .position(|c| Arc::ptr_eq(&c.rule, rule) || c.rule == *rule);
        let index = found.unwrap_or_else(|| {
            self.counters.push(RuleCounters::new(rule, self.metrics));
            self.counters.len() - 1
        });
        &mut self.counters[index]
    }

    /// Hands queued events to the connection while it is up, until its request queue is full.
    fn run(&mut self, queue: &mut VecDeque<Outgoing>) {
        if !self.connected.load(Ordering::Acquire) {
            return;
        }
        while let Some(mut message) = queue.pop_front() {
            if let Some(rule) = &message.rule {
                self.counters(rule).attempts.inc();
            }
            if self.unpublishable(&message).is_some() {
                continue;
            }
            // A QoS 1 event stays in the outbox until its PUBACK, so the connection gets a copy;
            // a QoS 0 event is handed over as it is.
            let keep = message.qos != QoS::AtMostOnce;
            let (topic, payload) = if keep {
                (message.topic.clone(), message.payload.clone())
            } else {
                (
                    std::mem::take(&mut message.topic),
                    std::mem::take(&mut message.payload),
                )
            };
            if let Err(returned) = self.client.try_publish(
                topic,
                message.qos,
                message.retain,
                payload,
                &message.properties,
            ) {
                // The request queue is full: the event goes back to the front, whole.
                if !keep {
                    message.topic = returned.topic;
                    message.payload = returned.payload;
                }
                queue.push_front(message);
                break;
            }
            if let Some(rule) = &message.rule {
                let rule = self.counters(rule);
                rule.published.inc();
                // Event times are whole ms; the clock is read in us so that sub-ms latencies
                // are not all rounded to zero.
                let behind_us = wall_clock_us().saturating_sub(message.ts.saturating_mul(1000));
                if let Ok(behind_us) = u64::try_from(behind_us) {
                    rule.event_latency.record(Duration::from_micros(behind_us));
                }
            }
            if let Some(arrival) = message.arrival {
                self.processing_latency.record(arrival.elapsed());
            }
            if message.qos != QoS::AtMostOnce {
                if let Ok(mut unacked) = self.unacked.lock() {
                    unacked.push_back(message);
                }
            }
        }
    }

    /// Moves recorded latencies to the shared histograms (batched, so a scrape never waits on
    /// the publish path).
    fn flush(&mut self) {
        self.processing_latency.flush();
        self.counters
            .iter_mut()
            .for_each(|c| c.event_latency.flush());
    }
}

/// Publishes everything from `input` until the workers close it, then drains and disconnects.
pub async fn run(
    options: SinkOptions,
    plan: Arc<Plan>,
    mut input: mpsc::Receiver<SinkInput>,
    metrics: Arc<Metrics>,
) {
    let (client, mut eventloop) = client::new(options.mqtt, options.request_capacity.max(10));
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
        // A flapping broker logs one line per interval; the reconnect counter counts them all.
        let mut lost_warnings = WarnLimit::new(RECONNECT_WARN_INTERVAL);
        loop {
            let event = tokio::select! {
                _ = stop_rx.changed() => break,
                event = eventloop.poll() => event,
            };
            match event {
                Ok(Event::PubAck) => {
                    if let Ok(mut unacked) = poll_unacked.lock() {
                        unacked.pop_front();
                    }
                }
                Ok(Event::ConnAck { .. }) => {
                    connected = true;
                    poll_connected.store(true, Ordering::Release);
                    backoff.reset();
                    failures.reset();
                    poll_metrics.set_connected(Connection::Sink, true);
                    tracing::info!("sink connected to the broker");
                }
                Ok(Event::Disconnected) => break,
                Ok(_) => {}
                Err(err) => {
                    poll_connected.store(false, Ordering::Release);
                    if connected {
                        if let Some(suppressed) = lost_warnings.allow(Instant::now()) {
                            tracing::warn!(%err, suppressed, "sink lost the broker connection; reconnecting");
                        }
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
        .map(|rule| RuleCounters::new(&rule.name, &metrics))
        .collect();
    let mut handover = Handover {
        client: &client,
        connected: &connected,
        unacked: &unacked,
        metrics: &metrics,
        counters,
        processing_latency: metrics.processing_latency.recorder(""),
        max_packet: options.max_packet_bytes,
        refused_warnings: WarnLimit::new(RECONNECT_WARN_INTERVAL),
    };
    let mut queue: VecDeque<Outgoing> = options.restored.into();
    // Per LSN: barriers in, devices, and the rules (every worker passed a reload at the same
    // LSN, so they agree).
    type Pending = (usize, Vec<DeviceSnapshot>, Vec<(String, u64)>);
    let mut barriers: BTreeMap<u64, Pending> = BTreeMap::new();
    let unacked_len = |unacked: &Unacked| unacked.lock().map_or(0, |u| u.len());
    let mut input_open = true;
    // The LSN and outbox size of the last snapshot, while no event has come in since it.
    let mut last_snapshot: Option<(u64, usize)> = None;

    while input_open {
        let outbox_len = queue.len() + unacked_len(&unacked);
        metrics.outbox_messages.set(outbox_len as i64);
        let accepting = outbox_len < options.outbox_max || options.policy != OutboxPolicy::Block;
        tokio::select! {
            received = input.recv(), if accepting => match received {
                None => input_open = false,
                Some(SinkInput::Event(message)) => {
                    last_snapshot = None;
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
                Some(SinkInput::Barrier { lsn, devices, rules }) => {
                    let entry = barriers.entry(lsn).or_default();
                    entry.0 += 1;
                    entry.1.extend(devices);
                    entry.2 = rules;
                    if entry.0 >= options.workers {
                        let (_, devices, rules) = barriers.remove(&lsn).unwrap_or_default();
                        if let Some(snapshots) = &options.snapshots {
                            let outbox = stored_outbox(&unacked, &queue);
                            let snapshot = Snapshot { lsn, devices, outbox, rules };
                            let outbox_len = snapshot.outbox.len();
                            if snapshots.send(SnapshotCommand::Write(snapshot)).await.is_err() {
                                tracing::error!("the snapshot writer is gone; state is no longer saved");
                            }
                            last_snapshot = Some((lsn, outbox_len));
                        }
                    }
                }
            },
            () = tokio::time::sleep(Duration::from_millis(5)), if !queue.is_empty() || !accepting => {}
        }
        handover.run(&mut queue);
        if input.is_empty() {
            handover.flush();
        }
    }

    // Input closed: hand over what is queued and wait for acknowledgements, within a bound.
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        loop {
            handover.run(&mut queue);
            if queue.is_empty() && unacked_len(&unacked) == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    handover.flush();
    drop(handover);
    let left = queue.len() + unacked_len(&unacked);
    // The final snapshot was taken before the drain; what the broker acknowledged since must not
    // be published again at the next start.
    if let (Some((lsn, held)), Some(snapshots)) = (last_snapshot, &options.snapshots) {
        if left < held {
            let outbox = stored_outbox(&unacked, &queue);
            let _ = snapshots
                .send(SnapshotCommand::ReplaceOutbox { lsn, outbox })
                .await;
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventId;

    #[test]
    fn an_outbox_entry_keeps_its_id_content_type_and_span_through_a_snapshot() {
        let config = crate::config::parse(
            crate::config::EXAMPLE,
            std::path::Path::new("example.toml"),
            &crate::config::Overrides::default(),
        )
        .unwrap();
        let plan = Plan::build(&config).unwrap();
        let rule: Option<Arc<str>> = Some("overheat".into());
        let trace = TraceContext::parse(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            Some("congo=t61"),
        )
        .unwrap();
        let event = Outgoing {
            topic: "alerts/s1/d1/overheat".into(),
            payload: b"{}".to_vec(),
            qos: QoS::AtLeastOnce,
            retain: false,
            rule: rule.clone(),
            arrival: None,
            ts: 0,
            properties: Properties {
                correlation: Some(EventId(0xabc)),
                content_type: ContentType::Json,
                trace: Some(Box::new(trace.child())),
            },
        };
        let restored = restore(stored(&event), &plan);
        assert_eq!(restored.rule, rule);
        assert_eq!(restored.properties, event.properties);

        let dead_letter = Outgoing {
            rule: None,
            properties: Properties::default(),
            ..event
        };
        let restored = restore(stored(&dead_letter), &plan);
        assert_eq!(restored.properties, Properties::default());
    }
}
