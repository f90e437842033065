//! Delivery of derived events to a [`Sink`] (MQTT: [`mqtt::MqttSink`]; webhooks, AMQP and
//! PostgreSQL beside it), with what every sink shares: the outbox, its cap and policy,
//! confirmations, dead letters, snapshots and the drain at shutdown. Each sink runs [`run`] as a
//! task of its own, with its own outbox, so a slow or dead sink holds up the others only as far
//! as its own outbox policy says (`block` stops the workers when it is full).
//!
//! The outbox holds derived events queued for the sink, and events handed over that must be
//! confirmed (MQTT: QoS 1, until the PUBACK; HTTP: a 2xx; AMQP: the publisher confirm;
//! PostgreSQL: the commit). Its size is capped (`outbox_max_messages`) and `outbox_when_full`
//! says what happens at the cap: `block` stops taking events from the workers (backpressure
//! reaches intake), `drop_oldest` / `drop_newest` drop and count. An event the sink can never
//! deliver (too large, an impossible topic) is counted and dropped rather than retried after
//! every reconnect, holding up everything behind it; an event the service refuses for good (an
//! HTTP 400, an unroutable AMQP message) goes to the dead-letter path.
//!
//! The outbox also completes snapshots: each worker passes its state down the same channel as its
//! events (a barrier), so when every worker's barrier has arrived, the outbox holds every event
//! derived before the barrier that the sink has not confirmed. Each sink sends its part; the
//! snapshot writer joins them.

// A sink kind whose client a build leaves out has no module; `connect` says which feature.
#[cfg(feature = "amqp-sink")]
pub mod amqp;
pub mod connect;
#[cfg(feature = "http-sink")]
pub mod http;
pub mod mqtt;
#[cfg(feature = "cluster")]
pub mod nats;
#[cfg(feature = "postgres-sink")]
pub mod postgres;
pub mod queued;

use crate::config::OutboxPolicy;
use crate::engine::snapshot::{DeviceSnapshot, Snapshot, SnapshotCommand, StoredMessage};
use crate::engine::{Plan, SinkInput};
use crate::metrics::{LatencyRecorder, Metrics, WarnLimit};
use crate::model::fence::Fence;
use crate::model::message::{ContentType, Headers};
use crate::model::trace::TraceContext;
use crate::route::Outgoing;
use prometheus::IntCounter;
use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Where derived events leave weir.
///
/// Called from one task. Confirmations are counted, in the order events were handed over: a
/// sink whose service confirms out of order counts the oldest run of confirmed events.
pub trait Sink: Send + 'static {
    /// Whether events are handed over now; while not (the service is away), they wait in the
    /// outbox, where its cap and policy apply.
    fn is_ready(&self) -> bool;

    /// Why `event` can never be delivered, if it cannot: it is dropped and counted instead of
    /// failing again after every reconnect.
    fn refuses(&self, event: &Outgoing) -> Option<&'static str>;

    /// Hands `event` over, or gives it back whole (`Some`) when the sink cannot take more now.
    fn offer(&mut self, event: Outgoing) -> Option<Outgoing>;

    /// How many of the events handed over with `confirm` have been confirmed so far, including
    /// those refused for good (see [`Sink::take_refused`]).
    fn confirmed(&self) -> u64;

    /// Events the service refused for good since the last call, for the dead-letter path.
    fn take_refused(&mut self) -> Vec<Refused> {
        Vec::new()
    }

    /// Ends the sink (disconnects), within a bound of its own.
    fn close(self) -> impl Future<Output = ()> + Send;
}

/// An event a sink's service refused for good, and why.
#[derive(Debug)]
pub struct Refused {
    pub event: Outgoing,
    /// A label for metrics and the dead-letter topic: `http_status`, `unroutable`, `rejected`.
    pub reason: &'static str,
    /// What the service said (cut to a few hundred bytes).
    pub detail: String,
}

/// How long the sink keeps trying to hand over and get acknowledged the last events at shutdown.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// How the sink is set up.
pub struct SinkOptions {
    /// The sink's name (`mqtt` for the broker's), in metrics, logs and snapshots.
    pub name: Arc<str>,
    pub outbox_max: usize,
    pub policy: OutboxPolicy,
    /// Number of workers, i.e. barriers that complete a snapshot.
    pub workers: usize,
    /// Where completed snapshots go (the store task); `None` without a state dir.
    pub snapshots: Option<mpsc::Sender<SnapshotCommand>>,
    /// Events restored from the last snapshot's outbox, published first.
    pub restored: Vec<Outgoing>,
    /// Where events the service refuses for good go: the broker sink's input, and the
    /// dead-letter topic (`{input}` is the sink's name, `{reason}` the reason). `None` for the
    /// broker's own sink, or without `dead_letter.topic` (they are then counted and logged).
    pub dead_letters: Option<(mpsc::Sender<SinkInput>, String)>,
    /// `[cluster]`: events are handed to the sink only while the instance's leases hold; once
    /// they lapse, it publishes nothing more (the partitions' next owner derives them again).
    pub fence: Option<Arc<Fence>>,
}

/// Events handed to the sink that it must confirm, oldest first, with the count of
/// confirmations already taken off.
#[derive(Default)]
struct Unconfirmed {
    events: VecDeque<Outgoing>,
    confirmed: u64,
}

impl Unconfirmed {
    /// Drops the events the sink has confirmed since the last call.
    fn update(&mut self, sink: &impl Sink, counters: &mut SinkCounters) {
        let confirmed = sink.confirmed();
        while self.confirmed < confirmed {
            let Some(event) = self.events.pop_front() else {
                break;
            };
            counters.acknowledged(&event);
            self.confirmed += 1;
        }
    }
}

/// The per-sink metric handles.
struct SinkCounters {
    sent: IntCounter,
    confirmed: IntCounter,
    up: prometheus::IntGauge,
    outbox: prometheus::IntGauge,
    /// The outbox size last added to the total over all sinks.
    outbox_counted: i64,
    latency: LatencyRecorder,
}

impl SinkCounters {
    fn new(name: &str, metrics: &Metrics) -> Self {
        metrics.register_sink(name);
        Self {
            sent: metrics.sink_sent.with_label_values(&[name]),
            confirmed: metrics.sink_confirmed.with_label_values(&[name]),
            up: metrics.sink_up.with_label_values(&[name]),
            outbox: metrics.sink_outbox.with_label_values(&[name]),
            outbox_counted: 0,
            latency: metrics.sink_latency.recorder(name),
        }
    }

    /// Counts an event the sink confirmed (or took without confirming), with its latency.
    fn acknowledged(&mut self, event: &Outgoing) {
        self.confirmed.inc();
        if event.rule.is_some() {
            let behind_us = wall_clock_us().saturating_sub(event.ts.saturating_mul(1000));
            if let Ok(behind_us) = u64::try_from(behind_us) {
                self.latency.record(Duration::from_micros(behind_us));
            }
        }
    }

    /// Sets the sink's outbox gauge and moves the total over all sinks by the difference.
    fn set_outbox(&mut self, len: usize, total: &prometheus::IntGauge) {
        let len = i64::try_from(len).unwrap_or(i64::MAX);
        self.outbox.set(len);
        total.add(len - self.outbox_counted);
        self.outbox_counted = len;
    }
}

fn stored(message: &Outgoing, sink: &str) -> StoredMessage {
    StoredMessage {
        sink: if sink == crate::config::BROKER_SINK {
            String::new()
        } else {
            sink.to_owned()
        },
        table: message.table.as_deref().map(str::to_owned),
        topic: message.topic.clone(),
        payload: message.payload.clone(),
        qos: u8::from(message.confirm),
        retain: message.retain,
        rule: message.rule.as_deref().unwrap_or_default().to_owned(),
        id: message.headers.id.map(|id| id.0),
        traceparent: message.headers.trace.as_ref().map(|t| t.traceparent()),
        tracestate: message
            .headers
            .trace
            .as_ref()
            .and_then(|t| t.state.as_deref().map(str::to_owned)),
    }
}

/// The outbox as a snapshot keeps it: the unconfirmed events, then the queued ones, in
/// publish order.
fn stored_outbox(
    unconfirmed: &Unconfirmed,
    queue: &VecDeque<Outgoing>,
    sink: &str,
) -> Vec<StoredMessage> {
    unconfirmed
        .events
        .iter()
        .chain(queue)
        .map(|message| stored(message, sink))
        .collect()
}

/// Rebuilds a restored outbox entry; `None` if its sink is no longer configured.
pub fn restore(message: StoredMessage, plan: &Plan) -> Option<Outgoing> {
    let sink = if message.sink.is_empty() {
        Plan::BROKER
    } else {
        plan.sink_index(&message.sink)?
    };
    let route = plan
        .rules
        .iter()
        .find(|r| *r.name == message.rule)
        .and_then(|rule| rule.routes.iter().find(|route| route.sink == sink));
    let rule = (!message.rule.is_empty()).then(|| Arc::from(message.rule.as_str()));
    let headers = Headers {
        id: message.id.map(crate::model::event::EventId),
        // Dead letters (no rule) are JSON.
        content_type: route.map_or(ContentType::Json, |route| route.content_type()),
        trace: message
            .traceparent
            .as_deref()
            .and_then(|parent| TraceContext::parse(parent, message.tracestate.as_deref()))
            .map(Box::new),
    };
    Some(Outgoing {
        rule,
        topic: message.topic,
        payload: message.payload,
        confirm: message.qos != 0,
        retain: message.retain,
        sink,
        table: message.table.map(Arc::from),
        arrival: None,
        ts: 0,
        headers,
    })
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

/// Where events are handed to the sink, and what is recorded when they are.
struct Handover<'a, S> {
    sink: &'a mut S,
    name: Arc<str>,
    unconfirmed: Unconfirmed,
    sink_counters: SinkCounters,
    metrics: &'a Metrics,
    /// One entry per rule name seen; a handful, so a scan (which matches the name's `Arc` by
    /// pointer first) beats hashing the name per event. Rules removed by a reload stay, bounded
    /// by the number of reloads times rules.
    counters: Vec<RuleCounters>,
    processing_latency: LatencyRecorder,
    refused_warnings: WarnLimit,
    fence: Option<Arc<Fence>>,
}

impl<S: Sink> Handover<'_, S> {
    /// Takes confirmed events off the outbox.
    fn update(&mut self) {
        self.unconfirmed
            .update(&*self.sink, &mut self.sink_counters);
    }

    /// Sends events the service refused for good to the dead-letter path.
    async fn dead_letter(&mut self, to: Option<&(mpsc::Sender<SinkInput>, String)>) {
        for refused in self.sink.take_refused() {
            self.metrics
                .sink_dead_letters
                .with_label_values(&[&self.name, refused.reason])
                .inc();
            if let Some(suppressed) = self.refused_warnings.allow(Instant::now()) {
                tracing::error!(
                    sink = %self.name,
                    topic = %refused.event.topic,
                    id = ?refused.event.headers.id,
                    reason = refused.reason,
                    detail = %refused.detail,
                    suppressed,
                    "the sink's service refused an event for good; it goes to the dead-letter path"
                );
            }
            let Some((broker, template)) = to else {
                continue;
            };
            let letter = sink_dead_letter(&self.name, template, refused);
            // Awaited, not dropped: the broker's sink never waits on this one, so this only
            // waits while the broker's outbox is full under `block`.
            if broker.send(SinkInput::Event(letter)).await.is_err() {
                tracing::error!(sink = %self.name, "the broker's sink is gone; a dead letter was lost");
            }
        }
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

    /// Whether `message` can be delivered at all; if not, it is counted and logged.
    fn deliverable(&mut self, message: &Outgoing) -> bool {
        let Some(problem) = self.sink.refuses(message) else {
            return true;
        };
        if let Some(rule) = &message.rule {
            self.metrics.publish_errors.with_label_values(&[rule]).inc();
        }
        if let Some(suppressed) = self.refused_warnings.allow(Instant::now()) {
            tracing::error!(
                topic = %message.topic,
                size = message.payload.len(),
                rule = message.rule.as_deref().unwrap_or("dead letter"),
                suppressed,
                "an event cannot be delivered and was dropped: {problem}"
            );
        }
        false
    }

    /// Whether the instance may publish: always, outside a cluster.
    fn fenced_in(&self) -> bool {
        self.fence.as_ref().is_none_or(|fence| fence.holds())
    }

    /// Hands queued events to the sink while it is ready, until it takes no more.
    fn run(&mut self, queue: &mut VecDeque<Outgoing>) {
        self.update();
        let ready = self.sink.is_ready();
        self.sink_counters.up.set(i64::from(ready));
        if !ready || !self.fenced_in() {
            return;
        }
        while let Some(message) = queue.pop_front() {
            if let Some(rule) = &message.rule {
                self.counters(rule).attempts.inc();
            }
            if !self.deliverable(&message) {
                continue;
            }
            // An event to be confirmed stays in the outbox until then, so the sink gets a
            // copy; any other is handed over as it is.
            let kept = message.confirm.then(|| message.clone());
            let (rule, arrival, ts) = (message.rule.clone(), message.arrival, message.ts);
            if let Some(returned) = self.sink.offer(message) {
                // The sink's queue is full: the event goes back to the front, whole.
                queue.push_front(returned);
                break;
            }
            self.sink_counters.sent.inc();
            if let Some(rule) = &rule {
                let rule = self.counters(rule);
                rule.published.inc();
                // Event times are whole ms; the clock is read in us so that sub-ms latencies
                // are not all rounded to zero.
                let behind_us = wall_clock_us().saturating_sub(ts.saturating_mul(1000));
                if let Ok(behind_us) = u64::try_from(behind_us) {
                    rule.event_latency.record(Duration::from_micros(behind_us));
                }
            }
            if let Some(arrival) = arrival {
                self.processing_latency.record(arrival.elapsed());
            }
            self.unconfirmed.events.extend(kept);
        }
    }

    /// Moves recorded latencies to the shared histograms (batched, so a scrape never waits on
    /// the publish path).
    fn flush(&mut self) {
        self.processing_latency.flush();
        self.sink_counters.latency.flush();
        self.counters
            .iter_mut()
            .for_each(|c| c.event_latency.flush());
    }
}

/// Delivers everything from `input` to `sink` until the workers close it, then drains and
/// closes the sink.
pub async fn run<S: Sink>(
    mut sink: S,
    options: SinkOptions,
    plan: Arc<Plan>,
    mut input: mpsc::Receiver<SinkInput>,
    metrics: Arc<Metrics>,
) {
    let counters: Vec<_> = plan
        .rules
        .iter()
        .map(|rule| RuleCounters::new(&rule.name, &metrics))
        .collect();
    let name = options.name.clone();
    let mut handover = Handover {
        sink: &mut sink,
        name: name.clone(),
        unconfirmed: Unconfirmed::default(),
        sink_counters: SinkCounters::new(&name, &metrics),
        metrics: &metrics,
        counters,
        processing_latency: metrics.processing_latency.recorder(""),
        refused_warnings: WarnLimit::new(crate::mqtt::RECONNECT_WARN_INTERVAL),
        fence: options.fence.clone(),
    };
    let dropped = |policy: &str| metrics.outbox_dropped.with_label_values(&[&name, policy]);

    let mut queue: VecDeque<Outgoing> = options.restored.into();
    // Per LSN: barriers in, devices, and the rules (every worker passed a reload at the same
    // LSN, so they agree).
    type Pending = (usize, Vec<DeviceSnapshot>, Vec<(String, u64)>);
    let mut barriers: BTreeMap<u64, Pending> = BTreeMap::new();
    let mut input_open = true;
    // The LSN and outbox size of the last snapshot, while no event has come in since it.
    let mut last_snapshot: Option<(u64, usize)> = None;

    while input_open {
        handover.update();
        let outbox_len = queue.len() + handover.unconfirmed.events.len();
        handover
            .sink_counters
            .set_outbox(outbox_len, &metrics.outbox_messages);
        let accepting = outbox_len < options.outbox_max || options.policy != OutboxPolicy::Block;
        // Confirmations and refusals arrive without an input to wake for.
        let waiting = !queue.is_empty() || !accepting || !handover.unconfirmed.events.is_empty();
        tokio::select! {
            received = input.recv(), if accepting => match received {
                None => input_open = false,
                Some(SinkInput::Event(message)) => {
                    last_snapshot = None;
                    if outbox_len >= options.outbox_max {
                        match options.policy {
                            OutboxPolicy::DropOldest => {
                                queue.pop_front();
                                dropped("drop_oldest").inc();
                                queue.push_back(message);
                            }
                            OutboxPolicy::DropNewest | OutboxPolicy::Block => {
                                dropped("drop_newest").inc();
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
                            // Refused events leave the outbox only with their dead letters on
                            // their way to the broker's sink.
                            handover.dead_letter(options.dead_letters.as_ref()).await;
                            handover.update();
                            let outbox = stored_outbox(&handover.unconfirmed, &queue, &name);
                            let part = Snapshot { lsn, devices, outbox, rules };
                            let outbox_len = part.outbox.len();
                            if snapshots.send(SnapshotCommand::Write(part)).await.is_err() {
                                tracing::error!("the snapshot writer is gone; state is no longer saved");
                            }
                            last_snapshot = Some((lsn, outbox_len));
                        }
                    }
                }
            },
            () = tokio::time::sleep(Duration::from_millis(5)), if waiting => {}
        }
        handover.run(&mut queue);
        handover.dead_letter(options.dead_letters.as_ref()).await;
        if input.is_empty() {
            handover.flush();
        }
    }

    // Input closed: hand over what is queued and wait for acknowledgements, within a bound.
    let dead_letters = options.dead_letters.as_ref();
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        loop {
            handover.run(&mut queue);
            handover.dead_letter(dead_letters).await;
            // Fenced out, nothing more may go: the partitions' next owner derives it again.
            if (queue.is_empty() && handover.unconfirmed.events.is_empty()) || !handover.fenced_in()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    handover.flush();
    handover.update();
    let unconfirmed = std::mem::take(&mut handover.unconfirmed);
    let left = queue.len() + unconfirmed.events.len();
    handover
        .sink_counters
        .set_outbox(left, &metrics.outbox_messages);
    drop(handover);
    // The final snapshot was taken before the drain; what the service acknowledged since must
    // not be delivered again at the next start.
    if let (Some((lsn, held)), Some(snapshots)) = (last_snapshot, &options.snapshots) {
        if left < held {
            let outbox = stored_outbox(&unconfirmed, &queue, &name);
            let sink = outbox_name(&name);
            let _ = snapshots
                .send(SnapshotCommand::ReplaceOutbox { lsn, sink, outbox })
                .await;
        }
    }
    if drained.is_err() {
        tracing::warn!(
            sink = %name,
            left,
            "the sink could not deliver everything within {DRAIN_TIMEOUT:?}; with a state dir, the last snapshot holds them"
        );
    }
    drop(options.dead_letters);
    sink.close().await;
}

/// How a snapshot names the sink `name`: empty for the broker's.
fn outbox_name(name: &str) -> String {
    if name == crate::config::BROKER_SINK {
        String::new()
    } else {
        name.to_owned()
    }
}

/// The dead letter of an event a sink's service refused: schema v1 JSON with the reason, what
/// the service said, and the event (as JSON when it is JSON, else base64).
fn sink_dead_letter(sink: &str, template: &str, refused: Refused) -> Outgoing {
    let Refused {
        event,
        reason,
        detail,
    } = refused;
    let mut body = serde_json::json!({
        "v": crate::model::event::SCHEMA_VERSION,
        "kind": "dead_letter",
        "sink": sink,
        "reason": reason,
        "message": detail,
        "topic": event.topic,
        "rule": event.rule.as_deref(),
        "id": event.headers.id.map(|id| id.to_string()),
    });
    match serde_json::from_slice::<serde_json::Value>(&event.payload) {
        Ok(json) => body["event"] = json,
        Err(_) => body["event_bytes"] = event.payload.len().into(),
    }
    Outgoing {
        topic: template
            .replace("{input}", sink)
            .replace("{reason}", reason),
        payload: serde_json::to_vec(&body).unwrap_or_default(),
        confirm: event.confirm,
        retain: false,
        sink: Plan::BROKER,
        table: None,
        rule: None,
        arrival: event.arrival,
        ts: event.ts,
        headers: Headers {
            trace: event.headers.trace,
            ..Headers::default()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::event::EventId;

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
            confirm: true,
            retain: false,
            sink: Plan::BROKER,
            table: None,
            rule: rule.clone(),
            arrival: None,
            ts: 0,
            headers: Headers {
                id: Some(EventId(0xabc)),
                content_type: ContentType::Json,
                trace: Some(Box::new(trace.child())),
            },
        };
        let restored = restore(stored(&event, "mqtt"), &plan).unwrap();
        assert_eq!(restored.rule, rule);
        assert_eq!(restored.headers, event.headers);

        let dead_letter = Outgoing {
            rule: None,
            headers: Headers::default(),
            ..event
        };
        let restored = restore(stored(&dead_letter, "mqtt"), &plan).unwrap();
        assert_eq!(restored.headers, Headers::default());

        // An event for a sink the config no longer has is not restored.
        let mut gone = stored(&dead_letter, "mqtt");
        gone.sink = "removed".into();
        assert!(restore(gone, &plan).is_none());
    }
}
