//! A worker: owns the state of a shard of devices and runs every rule over their readings.
//! [`Worker::process`] is synchronous (decode, operators, routing), so replay and benches can
//! drive it directly; [`Worker::run`] is the async loop between the source and the sink.

use super::{OperatorPlan, Plan};
use crate::config::Format;
use crate::decode::{DecodeError, Decoded, Origin, Reading};
use crate::metrics::{Metrics, TapEvent, WarnLimit, WorkerStats};
use crate::operators::{Operator, Output};
use crate::route::Outgoing;
use bytes::Bytes;
use prometheus::IntCounter;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// A message as it left the broker, stamped on arrival and matched to an input by the source.
#[derive(Debug, Clone)]
pub struct RawMessage {
    pub input: usize,
    pub topic: String,
    pub payload: Bytes,
    pub arrival: Instant,
    /// Arrival as wall-clock ms since the epoch: the event time when the payload has none.
    pub arrival_ms: i64,
}

/// How often processing-time timers run ([`Worker::tick`]).
pub const TICK_INTERVAL: Duration = Duration::from_millis(250);

/// Dense per-worker device number; indexes the rules' state vectors.
type DeviceId = usize;

/// A rule's operator with the per-device states of this worker's devices.
trait RuleRunner: Send {
    fn on_reading(&mut self, device: DeviceId, reading: &Reading<'_>, out: &mut Output);
    fn wants_ticks(&self) -> bool;
    fn on_tick(&mut self, device: DeviceId, origin: &Arc<Origin>, now_ms: i64, out: &mut Output);
    fn on_close(&mut self, device: DeviceId, origin: &Arc<Origin>, out: &mut Output);
    /// Windows open over all devices (a scan; called about once a second).
    fn open_windows(&self) -> usize;
}

struct Keyed<O: Operator> {
    operator: O,
    /// Indexed by [`DeviceId`]; grown on a device's first reading.
    states: Vec<O::State>,
}

impl<O: Operator> RuleRunner for Keyed<O> {
    fn on_reading(&mut self, device: DeviceId, reading: &Reading<'_>, out: &mut Output) {
        if self.states.len() <= device {
            self.states.resize_with(device + 1, Default::default);
        }
        self.operator
            .on_reading(&mut self.states[device], reading, out);
    }

    fn wants_ticks(&self) -> bool {
        self.operator.wants_ticks()
    }

    fn on_tick(&mut self, device: DeviceId, origin: &Arc<Origin>, now_ms: i64, out: &mut Output) {
        if let Some(state) = self.states.get_mut(device) {
            self.operator.on_tick(state, origin, now_ms, out);
        }
    }

    fn on_close(&mut self, device: DeviceId, origin: &Arc<Origin>, out: &mut Output) {
        if let Some(state) = self.states.get_mut(device) {
            self.operator.on_close(state, origin, out);
        }
    }

    fn open_windows(&self) -> usize {
        self.states
            .iter()
            .map(|state| self.operator.open_windows(state))
            .sum()
    }
}

/// Counters of one rule, resolved once so the hot path does no label lookups.
struct RuleCounters {
    emitted: IntCounter,
    late: IntCounter,
    out_of_order: IntCounter,
}

/// Counters of one input.
struct InputCounters {
    decoded: IntCounter,
    refused_device_limit: IntCounter,
}

/// The state and logic of one shard of devices.
pub struct Worker {
    plan: Arc<Plan>,
    metrics: Arc<Metrics>,
    runners: Vec<Box<dyn RuleRunner>>,
    /// Topic -> (device, origin); a cache, so parsing a topic and building its origin happens
    /// once per topic. Cleared when it reaches its cap (it is rebuilt as readings arrive).
    origins: HashMap<Box<str>, (DeviceId, Arc<Origin>)>,
    /// (input, device id) -> dense device number. Capped at `max_devices_per_worker`.
    devices: HashMap<(usize, Box<str>), DeviceId>,
    /// The latest origin of each device, for flushing at close.
    device_origins: Vec<Arc<Origin>>,
    /// One reusable decode buffer per input.
    decoded: Vec<Decoded>,
    output: Output,
    rule_counters: Vec<RuleCounters>,
    input_counters: Vec<InputCounters>,
    decode_warnings: WarnLimit,
    limit_warnings: WarnLimit,
    /// Where this worker reports its state sizes and newest event times.
    stats: Arc<WorkerStats>,
    /// Devices per input on this worker.
    input_devices: Vec<u64>,
    /// Newest event time seen per input on this worker (ms), mirrored in `stats`.
    newest_event_ms: Vec<i64>,
    ticks: u64,
}

impl Worker {
    pub fn new(plan: Arc<Plan>, metrics: Arc<Metrics>) -> Self {
        let runners = plan
            .rules
            .iter()
            .map(|rule| -> Box<dyn RuleRunner> {
                match &rule.operator {
                    OperatorPlan::Hysteresis(op) => Box::new(Keyed {
                        operator: op.clone(),
                        states: Vec::new(),
                    }),
                    OperatorPlan::Tumbling(op) => Box::new(Keyed {
                        operator: op.clone(),
                        states: Vec::new(),
                    }),
                }
            })
            .collect();
        let rule_counters = plan
            .rules
            .iter()
            .map(|rule| RuleCounters {
                emitted: metrics
                    .events_emitted
                    .with_label_values(&[&rule.name, rule.operator.event_kind()]),
                late: metrics.readings_late.with_label_values(&[&rule.name]),
                out_of_order: metrics
                    .readings_out_of_order
                    .with_label_values(&[&rule.name]),
            })
            .collect();
        let input_counters = plan
            .inputs
            .iter()
            .map(|input| InputCounters {
                decoded: metrics.readings_decoded.with_label_values(&[&input.name]),
                refused_device_limit: metrics
                    .readings_refused
                    .with_label_values(&[&input.name, "device_limit"]),
            })
            .collect();
        let decoded = plan
            .inputs
            .iter()
            .map(|input| Decoded::for_plan(&input.fields))
            .collect();
        Self {
            runners,
            origins: HashMap::new(),
            devices: HashMap::new(),
            device_origins: Vec::new(),
            decoded,
            output: Output::default(),
            rule_counters,
            input_counters,
            decode_warnings: WarnLimit::new(Duration::from_secs(10)),
            limit_warnings: WarnLimit::new(Duration::from_secs(60)),
            stats: metrics.worker_stats(plan.rules.len(), plan.inputs.len()),
            input_devices: vec![0; plan.inputs.len()],
            newest_event_ms: vec![i64::MIN; plan.inputs.len()],
            ticks: 0,
            plan,
            metrics,
        }
    }

    /// Devices this worker tracks.
    pub fn device_count(&self) -> usize {
        self.device_origins.len()
    }

    /// The device and origin of a topic, registering a new device if there is room.
    fn resolve(&mut self, input: usize, topic: &str) -> Result<(DeviceId, Arc<Origin>), Refusal> {
        if let Some((device, origin)) = self.origins.get(topic) {
            return Ok((*device, origin.clone()));
        }
        let input_plan = &self.plan.inputs[input];
        let captures = input_plan
            .pattern
            .captures(topic)
            .ok_or(Refusal::Decode(DecodeError::BadTopic))?;
        let device_name = captures[input_plan.device_index];
        let device = match self.devices.get(&(input, device_name.into())) {
            Some(device) => *device,
            None => {
                if self.devices.len() >= self.plan.max_devices_per_worker {
                    return Err(Refusal::DeviceLimit);
                }
                let device = self.device_origins.len();
                self.devices.insert((input, device_name.into()), device);
                self.metrics.devices_tracked.inc();
                self.input_devices[input] += 1;
                device
            }
        };
        let origin = Arc::new(Origin {
            topic: topic.into(),
            device: device_name.into(),
            names: input_plan.names.clone(),
            segments: captures.iter().map(|s| Arc::from(*s)).collect(),
            device_index: input_plan.device_index,
        });
        if device == self.device_origins.len() {
            self.device_origins.push(origin.clone());
        } else {
            self.device_origins[device] = origin.clone();
        }
        if self.origins.len() >= self.plan.max_devices_per_worker.saturating_mul(2) {
            self.origins.clear();
        }
        self.origins.insert(topic.into(), (device, origin.clone()));
        Ok((device, origin))
    }

    /// Decodes one message, runs the input's rules, and appends the routed messages to `out`.
    pub fn process(&mut self, message: &RawMessage, out: &mut Vec<Outgoing>) {
        let input = message.input;
        let topic = message.topic.as_str();
        let (device, origin) = match self.resolve(input, topic) {
            Ok(found) => found,
            Err(Refusal::Decode(err)) => return self.decode_failed(input, topic, err),
            Err(Refusal::DeviceLimit) => {
                self.input_counters[input].refused_device_limit.inc();
                if let Some(suppressed) = self.limit_warnings.allow(message.arrival) {
                    tracing::warn!(
                        input = %self.plan.inputs[input].name,
                        topic,
                        limit = self.plan.max_devices_per_worker,
                        suppressed,
                        "device limit reached; readings of new devices are refused (raise pipeline.max_devices_per_worker)"
                    );
                }
                return;
            }
        };
        let input_plan = &self.plan.inputs[input];
        let decoded = &mut self.decoded[input];
        if let Err(err) = input_plan.fields.decode(&message.payload, decoded) {
            return self.decode_failed(input, topic, err);
        }
        self.input_counters[input].decoded.inc();
        let ts = decoded.ts.unwrap_or(message.arrival_ms);
        if ts > self.newest_event_ms[input] {
            // This worker's own slot: a relaxed store that only a scrape reads.
            self.newest_event_ms[input] = ts;
            self.stats.newest_event_ms[input].store(ts, std::sync::atomic::Ordering::Relaxed);
        }
        let reading = Reading {
            origin: &origin,
            ts,
            seq: decoded.seq,
            values: &decoded.values,
            arrival: message.arrival,
        };
        for &rule in &input_plan.rules {
            self.runners[rule].on_reading(device, &reading, &mut self.output);
            drain_output(
                &self.plan,
                &self.metrics,
                &self.rule_counters[rule],
                &mut self.output,
                out,
            );
        }
    }

    /// Runs the processing-time timers of every rule that has them, for every device, and
    /// reports this worker's state sizes (every fourth tick, about once a second).
    pub fn tick(&mut self, now_ms: i64, out: &mut Vec<Outgoing>) {
        if self.ticks % 4 == 0 {
            self.report_stats();
        }
        self.ticks += 1;
        for rule in 0..self.runners.len() {
            if !self.runners[rule].wants_ticks() {
                continue;
            }
            for (device, origin) in self.device_origins.iter().enumerate() {
                self.runners[rule].on_tick(device, origin, now_ms, &mut self.output);
            }
            drain_output(
                &self.plan,
                &self.metrics,
                &self.rule_counters[rule],
                &mut self.output,
                out,
            );
        }
    }

    /// Publishes devices and open windows per rule to this worker's [`WorkerStats`] (the newest
    /// event time goes there as readings arrive); a scrape sums them over the workers.
    pub fn report_stats(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        for (rule, runner) in self.runners.iter().enumerate() {
            let input = self.plan.rules[rule].input;
            self.stats.rule_devices[rule].store(self.input_devices[input], Relaxed);
            self.stats.rule_windows[rule].store(runner.open_windows() as u64, Relaxed);
        }
    }

    /// Flushes every device's open state (windows) as input ends.
    pub fn close(&mut self, out: &mut Vec<Outgoing>) {
        for rule in 0..self.runners.len() {
            for (device, origin) in self.device_origins.iter().enumerate() {
                self.runners[rule].on_close(device, origin, &mut self.output);
            }
            drain_output(
                &self.plan,
                &self.metrics,
                &self.rule_counters[rule],
                &mut self.output,
                out,
            );
        }
    }

    /// Counts and (rate-limited) logs a payload that could not become a reading.
    fn decode_failed(&mut self, input: usize, topic: &str, err: DecodeError) {
        let input_plan = &self.plan.inputs[input];
        self.metrics
            .decode_errors
            .with_label_values(&[&input_plan.name, err.reason()])
            .inc();
        tracing::trace!(input = %input_plan.name, topic, reason = err.reason(), "skipped a payload");
        if let Some(suppressed) = self.decode_warnings.allow(Instant::now()) {
            tracing::warn!(
                input = %input_plan.name,
                topic,
                reason = err.reason(),
                suppressed,
                "skipped a payload: {}",
                err.describe(&input_plan.fields)
            );
        }
    }

    /// The worker loop: reads batches from the source, sends routed messages to the sink, and
    /// flushes open windows when the source closes its channel.
    pub async fn run(
        mut self,
        mut input: mpsc::Receiver<RawMessage>,
        sink: mpsc::Sender<Outgoing>,
    ) {
        let mut batch = Vec::with_capacity(256);
        let mut out = Vec::with_capacity(256);
        let mut ticks = tokio::time::interval(TICK_INTERVAL);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                received = input.recv_many(&mut batch, 256) => {
                    if received == 0 {
                        break;
                    }
                    for message in batch.drain(..) {
                        self.process(&message, &mut out);
                    }
                }
                _ = ticks.tick() => self.tick(crate::source::wall_clock_ms(), &mut out),
            }
            for message in out.drain(..) {
                if sink.send(message).await.is_err() {
                    return;
                }
            }
        }
        self.close(&mut out);
        self.report_stats();
        for message in out.drain(..) {
            if sink.send(message).await.is_err() {
                return;
            }
        }
    }
}

/// Counts what an operator reported, routes the events it produced, and offers them to the live
/// tap while someone watches.
fn drain_output(
    plan: &Plan,
    metrics: &Metrics,
    counters: &RuleCounters,
    output: &mut Output,
    out: &mut Vec<Outgoing>,
) {
    if output.late > 0 {
        counters.late.inc_by(std::mem::take(&mut output.late));
    }
    if output.out_of_order > 0 {
        counters
            .out_of_order
            .inc_by(std::mem::take(&mut output.out_of_order));
    }
    for event in output.events.drain(..) {
        counters.emitted.inc();
        tracing::trace!(
            id = %event.id,
            rule = %event.rule,
            device = %event.origin.device,
            topic = %event.origin.topic,
            cause_ts = event.cause.as_ref().map(|c| c.ts),
            "derived event"
        );
        let route = &plan.rules[event.rule_index].route;
        let routed = route.apply(&event);
        if metrics.tap.is_watched() {
            let json = match route.format {
                Format::Json => String::from_utf8_lossy(&routed.payload).into_owned(),
                Format::Cbor => {
                    String::from_utf8_lossy(&crate::route::encode(&event, Format::Json))
                        .into_owned()
                }
            };
            metrics.tap.offer(TapEvent {
                id: event.id.to_string(),
                rule: event.rule.clone(),
                device: event.origin.device.clone(),
                json,
            });
        }
        out.push(routed);
    }
}

/// Why a message did not reach the rules.
enum Refusal {
    Decode(DecodeError),
    DeviceLimit,
}
