//! A worker: owns the state of a shard of devices and runs every rule over their readings.
//! [`Worker::process`] is synchronous (decode, operators, routing), so replay and benches can
//! drive it directly; [`Worker::run`] is the async loop between the source and the sink.

use super::dedup::Recent;
use super::snapshot::DeviceSnapshot;
use super::{OperatorPlan, Plan};
use crate::config::DeviceLimitPolicy;
use crate::config::Format;
use crate::decode::{DecodeError, Decoded, Origin, Reading};
use crate::metrics::{Metrics, TapEvent, WarnLimit, WorkerStats};
use crate::model::event::{EventBody, EventId};
use crate::model::message::RawMessage;
use crate::operators::window::LateReason;
use crate::operators::{Operator, Output};
use crate::route::Outgoing;
use hashbrown::HashTable;
use prometheus::{IntCounter, IntGauge};
use std::hash::Hasher as _;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// What flows from the source to a worker.
#[derive(Debug)]
pub enum WorkerInput {
    Message(RawMessage),
    /// Snapshot this worker's state as of every message before `lsn`, and pass it to the sink.
    Barrier(u64),
    /// Switch to new rules between two messages ([`Worker::reload`]).
    Reload(Arc<Reload>),
}

/// What flows from the workers to each sink: derived events, and each worker's part of a
/// snapshot (the devices go to the broker's sink, every sink gets the barrier).
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

/// New rules for a running pipeline. The source sends it to every worker at the same point of
/// the input, as it does barriers, so a snapshot is never half old rules and half new.
#[derive(Debug)]
pub struct Reload {
    pub plan: Arc<Plan>,
    /// Rules whose definition did not change: they keep their state.
    pub kept: Vec<Arc<str>>,
}

/// How often processing-time timers run ([`Worker::tick`]).
pub const TICK_INTERVAL: Duration = Duration::from_millis(250);

/// The topic and device tables are looked up once per reading. SipHash (std's default) cost
/// ~250 instructions per 35-byte topic there; this multiply-rotate hash (FxHash, as in rustc)
/// costs ~30. It is not keyed, so a client allowed to publish on the input topics could craft
/// colliding topics; the tables are bounded by `max_devices_per_worker`, which bounds the harm.
#[derive(Default, Clone, Copy)]
struct FxHasher(u64);

impl std::hash::Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut word = [0u8; 8];
            word[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(word));
        }
    }

    fn write_u8(&mut self, n: u8) {
        self.add(u64::from(n));
    }

    fn write_u16(&mut self, n: u16) {
        self.add(u64::from(n));
    }

    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

impl FxHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

/// The hash of a topic in the topic table.
fn topic_hash(topic: &str) -> u64 {
    let mut hasher = FxHasher::default();
    hasher.write(topic.as_bytes());
    hasher.finish()
}

/// The hash of a device id of an input in the device table.
fn device_hash(input: u16, id: &str) -> u64 {
    let mut hasher = FxHasher::default();
    hasher.write_u16(input);
    hasher.write(id.as_bytes());
    hasher.finish()
}

/// Dense per-worker device number; indexes the rules' state vectors.
type DeviceId = usize;

/// A device number as the tables store it: 4 bytes. A worker never holds 2^32 devices (each
/// costs a few hundred bytes).
type Entry = u32;

/// A rule's operator with the per-device states of this worker's devices.
trait RuleRunner: Send {
    fn on_reading(&mut self, device: DeviceId, reading: &Reading<'_>, out: &mut Output);
    fn wants_ticks(&self) -> bool;
    fn on_tick(&mut self, device: DeviceId, origin: &Origin, now_ms: i64, out: &mut Output);
    fn on_close(&mut self, device: DeviceId, origin: &Origin, out: &mut Output);
    /// The device's state as CBOR, if it has any.
    fn save(&self, device: DeviceId) -> Option<Vec<u8>>;
    /// Replaces the device's state with a saved one.
    fn restore(&mut self, device: DeviceId, saved: &[u8], out: &mut Output) -> Result<(), String>;
    fn on_expected(&mut self, device: DeviceId);
    /// Forgets a device's state (its place is reused by another device).
    fn reset(&mut self, device: DeviceId, out: &mut Output);
    /// Gives up every device's state, to hand it to the same rule in a reloaded plan.
    fn take_states(&mut self) -> Box<dyn std::any::Any + Send>;
    /// Takes over states given up by [`RuleRunner::take_states`]; false if they are of another
    /// operator (then nothing changes).
    fn adopt_states(&mut self, states: Box<dyn std::any::Any + Send>) -> bool;
}

struct Keyed<O: Operator> {
    operator: O,
    /// Indexed by [`DeviceId`]; grown on a device's first reading.
    states: Vec<O::State>,
}

impl<O: Operator> Keyed<O> {
    fn boxed(operator: &O) -> Box<dyn RuleRunner>
    where
        O: Clone,
    {
        Box::new(Keyed {
            operator: operator.clone(),
            states: Vec::new(),
        })
    }

    fn state(&mut self, device: DeviceId) -> &mut O::State {
        if self.states.len() <= device {
            self.states.resize_with(device + 1, Default::default);
        }
        &mut self.states[device]
    }
}

impl<O: Operator> RuleRunner for Keyed<O> {
    fn on_reading(&mut self, device: DeviceId, reading: &Reading<'_>, out: &mut Output) {
        self.state(device);
        self.operator
            .on_reading(&mut self.states[device], reading, out);
    }

    fn reset(&mut self, device: DeviceId, out: &mut Output) {
        if let Some(state) = self.states.get_mut(device) {
            out.offline -= self.operator.offline_devices(state);
            *state = O::State::default();
        }
    }

    fn take_states(&mut self) -> Box<dyn std::any::Any + Send> {
        Box::new(std::mem::take(&mut self.states))
    }

    fn adopt_states(&mut self, states: Box<dyn std::any::Any + Send>) -> bool {
        match states.downcast::<Vec<O::State>>() {
            Ok(states) => {
                self.states = *states;
                true
            }
            Err(_) => false,
        }
    }

    fn on_expected(&mut self, device: DeviceId) {
        self.state(device);
        self.operator.on_expected(&mut self.states[device]);
    }

    fn wants_ticks(&self) -> bool {
        self.operator.wants_ticks()
    }

    fn on_tick(&mut self, device: DeviceId, origin: &Origin, now_ms: i64, out: &mut Output) {
        if let Some(state) = self.states.get_mut(device) {
            self.operator.on_tick(state, origin, now_ms, out);
        }
    }

    fn on_close(&mut self, device: DeviceId, origin: &Origin, out: &mut Output) {
        if let Some(state) = self.states.get_mut(device) {
            self.operator.on_close(state, origin, out);
        }
    }

    fn save(&self, device: DeviceId) -> Option<Vec<u8>> {
        let state = self.states.get(device)?;
        let mut bytes = Vec::new();
        ciborium::into_writer(state, &mut bytes).ok()?;
        Some(bytes)
    }

    fn restore(&mut self, device: DeviceId, saved: &[u8], out: &mut Output) -> Result<(), String> {
        let state: O::State = ciborium::from_reader(saved).map_err(|err| err.to_string())?;
        if self.states.len() <= device {
            self.states.resize_with(device + 1, Default::default);
        }
        out.offline += self.operator.offline_devices(&state)
            - self.operator.offline_devices(&self.states[device]);
        self.states[device] = state;
        Ok(())
    }
}

/// Counters of one rule, resolved once so the hot path does no label lookups.
struct RuleCounters {
    /// By event kind; an operator emits one or two kinds.
    emitted: Vec<(&'static str, IntCounter)>,
    /// Devices reported offline (liveness rules only).
    offline: Option<IntGauge>,
    late: IntCounter,
    future: IntCounter,
    window_limit: IntCounter,
    windows_open: IntGauge,
    out_of_order: IntCounter,
}

/// Counters of one input.
struct InputCounters {
    decoded: IntCounter,
    refused_device_limit: IntCounter,
    duplicates: IntCounter,
}

/// The state and logic of one shard of devices.
pub struct Worker {
    plan: Arc<Plan>,
    metrics: Arc<Metrics>,
    runners: Vec<Box<dyn RuleRunner>>,
    /// The device whose latest topic a topic is, so parsing a topic and building its origin
    /// happens once per topic. Holds bare device numbers, found by their origins' topics:
    /// exactly one entry per device, under its latest origin's topic and input (kept so by
    /// [`Worker::index`] and [`Worker::unindex`] wherever `device_origins` changes).
    topics: HashTable<Entry>,
    /// The device number of (input, device id), found the same way by the origin's device
    /// segment: one entry per device, and the id is stored only in the origin.
    devices: HashTable<Entry>,
    /// The latest origin of each device: what the tables find devices by, and what flushing at
    /// close names.
    device_origins: Vec<Origin>,
    /// The input of each device (inputs are numbered by `u16`, as in snapshots).
    device_inputs: Vec<u16>,
    /// What each device's recent readings were, to recognise redeliveries.
    recent: Vec<Recent>,
    /// Set when a known device is heard from again; the eviction sweep clears it and takes the
    /// first device it finds clear (the CLOCK approximation of least recently used).
    referenced: Vec<bool>,
    /// Where the eviction sweep stands.
    hand: usize,
    /// One reusable decode buffer per input.
    decoded: Vec<Decoded>,
    /// Reusable buffers for SenML packs, per input.
    packs: Vec<Vec<Decoded>>,
    output: Output,
    rule_counters: Vec<RuleCounters>,
    input_counters: Vec<InputCounters>,
    decode_warnings: WarnLimit,
    limit_warnings: WarnLimit,
    window_limit_warnings: WarnLimit,
    /// Where this worker reports its state sizes and newest event times.
    stats: Arc<WorkerStats>,
    /// Devices per input on this worker.
    input_devices: Vec<u64>,
    /// This worker's place among the workers (index, count), for the devices it owns.
    shard: (usize, usize),
    /// Newest event time seen per input on this worker (ms), mirrored in `stats`.
    newest_event_ms: Vec<i64>,
    ticks: u64,
}

impl Worker {
    pub fn new(plan: Arc<Plan>, metrics: Arc<Metrics>) -> Self {
        let runners = runners(&plan);
        let rule_counters = rule_counters(&plan, &metrics);
        let input_counters = plan
            .inputs
            .iter()
            .map(|input| InputCounters {
                decoded: metrics.readings_decoded.with_label_values(&[&input.name]),
                refused_device_limit: metrics
                    .readings_refused
                    .with_label_values(&[&input.name, "device_limit"]),
                duplicates: metrics.duplicates_dropped.with_label_values(&[&input.name]),
            })
            .collect();
        let decoded = decode_buffers(&plan);
        Self {
            runners,
            topics: HashTable::new(),
            devices: HashTable::new(),
            device_origins: Vec::new(),
            device_inputs: Vec::new(),
            recent: Vec::new(),
            referenced: Vec::new(),
            hand: 0,
            packs: vec![Vec::new(); plan.inputs.len()],
            decoded,
            output: Output::default(),
            rule_counters,
            input_counters,
            decode_warnings: WarnLimit::new(Duration::from_secs(10)),
            limit_warnings: WarnLimit::new(Duration::from_secs(60)),
            window_limit_warnings: WarnLimit::new(Duration::from_secs(60)),
            stats: metrics.worker_stats(plan.rules.len(), plan.inputs.len()),
            input_devices: vec![0; plan.inputs.len()],
            shard: (0, 1),
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

    /// Registers the devices the config expects (liveness `expected`) that this worker owns:
    /// worker `index` of `workers`, by [`Plan::shard`]. Call once, before the first tick.
    pub fn seed_expected(&mut self, index: usize, workers: usize) {
        self.shard = (index, workers);
        self.seed_expected_in(|_| true);
    }

    /// As [`Worker::seed_expected`], for the rules `wanted` picks (by index).
    fn seed_expected_in(&mut self, wanted: impl Fn(usize) -> bool) {
        let (index, workers) = self.shard;
        let plan = self.plan.clone();
        for expected in plan.expected.iter().filter(|e| wanted(e.rule)) {
            let name = expected.device(&plan);
            if Plan::shard(expected.input, name, workers) != index {
                continue;
            }
            let device = match self.find_device(expected.input, name) {
                Some(device) => device,
                None => match self.register(expected.input, expected.origin(&plan)) {
                    Some(device) => device,
                    None => continue,
                },
            };
            self.runners[expected.rule].on_expected(device);
        }
    }

    /// The device number of device `id` of `input`, if it is tracked.
    fn find_device(&self, input: usize, id: &str) -> Option<DeviceId> {
        let input = input as u16;
        let (origins, inputs) = (&self.device_origins, &self.device_inputs);
        self.devices
            .find(device_hash(input, id), |&d| {
                inputs[d as usize] == input && origins[d as usize].device() == id
            })
            .map(|&d| d as usize)
    }

    /// Enters `device` in both tables under its current origin and input.
    fn index(&mut self, device: DeviceId) {
        let (origins, inputs) = (&self.device_origins, &self.device_inputs);
        let origin = &origins[device];
        let entry = Entry::try_from(device).expect("fewer than 2^32 devices per worker");
        self.topics
            .insert_unique(topic_hash(origin.topic()), entry, |&d| {
                topic_hash(origins[d as usize].topic())
            });
        self.devices
            .insert_unique(device_hash(inputs[device], origin.device()), entry, |&d| {
                device_hash(inputs[d as usize], origins[d as usize].device())
            });
    }

    /// Takes `device` out of both tables (before its origin or input changes).
    fn unindex(&mut self, device: DeviceId) {
        let origin = &self.device_origins[device];
        let is = |&d: &Entry| d as usize == device;
        if let Ok(entry) = self.topics.find_entry(topic_hash(origin.topic()), is) {
            entry.remove();
        }
        let hash = device_hash(self.device_inputs[device], origin.device());
        if let Ok(entry) = self.devices.find_entry(hash, is) {
            entry.remove();
        }
    }

    /// Registers a new device (`origin.device()`) with its per-device tables; at the device limit
    /// it takes the place of an idle device (`evict_idle`) or is refused (`None`).
    fn register(&mut self, input: usize, origin: Origin) -> Option<DeviceId> {
        // Every tracked device has one place in `device_origins` (eviction reuses places).
        if self.device_origins.len() >= self.plan.max_devices_per_worker {
            return match self.plan.when_device_limit {
                DeviceLimitPolicy::Refuse => None,
                DeviceLimitPolicy::EvictIdle => Some(self.evict_for(input, origin)),
            };
        }
        let device = self.device_origins.len();
        self.device_origins.push(origin);
        self.device_inputs.push(input as u16);
        self.index(device);
        self.recent.push(Recent::default());
        // A new device earns its second chance only by being heard from again, so a flood of
        // one-shot ids evicts itself before it evicts devices that keep talking.
        self.referenced.push(false);
        self.metrics.devices_tracked.inc();
        self.input_devices[input] += 1;
        Some(device)
    }

    /// Forgets the first device the clock sweep finds idle and gives its place to a new one.
    fn evict_for(&mut self, input: usize, origin: Origin) -> DeviceId {
        let count = self.referenced.len();
        let victim = loop {
            let at = self.hand % count;
            self.hand = (at + 1) % count;
            if std::mem::take(&mut self.referenced[at]) {
                continue;
            }
            break at;
        };
        let old_input = usize::from(self.device_inputs[victim]);
        self.unindex(victim);
        for (rule, runner) in self.runners.iter_mut().enumerate() {
            runner.reset(victim, &mut self.output);
            if let Some(gauge) = &self.rule_counters[rule].offline {
                gauge.add(std::mem::take(&mut self.output.offline));
            }
        }
        self.recent[victim] = Recent::default();
        self.referenced[victim] = false;
        self.device_origins[victim] = origin;
        self.input_devices[old_input] -= 1;
        self.input_devices[input] += 1;
        self.device_inputs[victim] = input as u16;
        self.index(victim);
        self.metrics
            .devices_evicted
            .with_label_values(&[&self.plan.inputs[old_input].name])
            .inc();
        victim
    }

    /// The device and origin of a topic, registering a new device if there is room.
    fn resolve(&mut self, input: usize, topic: &str) -> Result<(DeviceId, Origin), Refusal> {
        let (origins, inputs) = (&self.device_origins, &self.device_inputs);
        let found = self.topics.find(topic_hash(topic), |&d| {
            inputs[d as usize] == input as u16 && origins[d as usize].topic() == topic
        });
        if let Some(&device) = found {
            let device = device as usize;
            self.referenced[device] = true;
            return Ok((device, self.device_origins[device].clone()));
        }
        let input_plan = &self.plan.inputs[input];
        let captures = input_plan
            .pattern
            .captures(topic)
            .ok_or(Refusal::Decode(DecodeError::BadTopic))?;
        let device_index = input_plan.device_index;
        // The captures are slices of `topic`, so the origin stores each as a range of it.
        let origin = Origin::new(input_plan.names.clone(), device_index, topic, &captures);
        let device = match self.find_device(input, captures[device_index]) {
            Some(device) => {
                // A known device on a new topic: its origin, and so its topic entry, changes.
                self.unindex(device);
                self.device_origins[device] = origin.clone();
                self.index(device);
                self.referenced[device] = true;
                device
            }
            None => self
                .register(input, origin.clone())
                .ok_or(Refusal::DeviceLimit)?,
        };
        Ok((device, origin))
    }

    /// Decodes one message, runs the input's rules, and appends the routed messages to `out`.
    pub fn process(&mut self, message: &RawMessage, out: &mut Vec<Outgoing>) {
        // The unit tests' stand-in for a bug that a particular reading trips.
        #[cfg(test)]
        if message.topic.contains("/trips-a-bug/") {
            panic!("a bug tripped by {}", message.topic);
        }
        let input = message.input;
        let topic = message.topic.as_str();
        if message.payload.len() > self.plan.inputs[input].max_payload_bytes {
            return self.decode_failed(message, DecodeError::TooLarge, out);
        }
        let (device, origin) = match self.resolve(input, topic) {
            Ok(found) => found,
            Err(Refusal::Decode(err)) => return self.decode_failed(message, err, out),
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
        let plan = self.plan.clone();
        let fields = &plan.inputs[input].fields;
        if fields.is_pack() {
            // A SenML pack: one reading per distinct time, oldest first.
            let mut pack = std::mem::take(&mut self.packs[input]);
            match fields.decode_pack(&message.payload, message.arrival_ms, &mut pack) {
                Ok(readings) => {
                    for decoded in &pack[..readings] {
                        self.apply(message, device, &origin, decoded, true, out);
                    }
                }
                Err(err) => self.decode_failed(message, err, out),
            }
            self.packs[input] = pack;
            return;
        }
        let mut decoded = std::mem::take(&mut self.decoded[input]);
        match fields.decode(&message.payload, &mut decoded) {
            Ok(()) => self.apply(message, device, &origin, &decoded, false, out),
            Err(err) => self.decode_failed(message, err, out),
        }
        self.decoded[input] = decoded;
    }

    /// Runs one decoded reading through the input's rules: the clock-skew check, redelivery
    /// detection, then every rule in scope. `in_pack` marks a reading that shares its payload with
    /// others (a SenML pack), so a payload hash alone does not identify it.
    fn apply(
        &mut self,
        message: &RawMessage,
        device: DeviceId,
        origin: &Origin,
        decoded: &Decoded,
        in_pack: bool,
        out: &mut Vec<Outgoing>,
    ) {
        let input = message.input;
        let plan = self.plan.clone();
        let input_plan = &plan.inputs[input];
        if decoded
            .ts
            .is_some_and(|ts| ts.saturating_sub(message.arrival_ms) > input_plan.max_clock_skew_ms)
        {
            return self.decode_failed(message, DecodeError::FutureTimestamp, out);
        }
        // Redelivered inputs (after a reconnect or a restart) are recognised by the device's
        // sequence number, or by payload hash when the payload carries its own time; without
        // either, two identical payloads may be two real readings, so nothing is dropped.
        let recent = &mut self.recent[device];
        let duplicate = match (decoded.seq, decoded.ts) {
            (Some(seq), _) => recent.seen_seq(seq),
            (None, Some(ts)) => {
                let hash = if in_pack {
                    EventId::derive(&[&message.payload, &ts.to_le_bytes()]).0
                } else {
                    EventId::derive(&[&message.payload]).0
                };
                recent.seen_hash(hash, self.plan.dedup_horizon)
            }
            (None, None) => false,
        };
        if duplicate {
            self.input_counters[input].duplicates.inc();
            return;
        }
        self.input_counters[input].decoded.inc();
        let ts = decoded.ts.unwrap_or(message.arrival_ms);
        if ts > self.newest_event_ms[input] {
            // This worker's own slot: a relaxed store that only a scrape reads.
            self.newest_event_ms[input] = ts;
            self.stats.newest_event_ms[input].store(ts, std::sync::atomic::Ordering::Relaxed);
        }
        let reading = Reading {
            origin,
            ts,
            seq: decoded.seq,
            values: &decoded.values,
            discrete: &decoded.discrete,
            arrival: message.arrival,
            arrival_ms: message.arrival_ms,
            trace: message.trace.as_ref(),
        };
        for &rule in &input_plan.rules {
            if !self.plan.rules[rule].in_scope(origin) {
                continue;
            }
            self.runners[rule].on_reading(device, &reading, &mut self.output);
            if self.output.window_limit > 0 {
                // Counted by drain_output as reason="window_limit"; logged here, rate-limited.
                if let Some(suppressed) = self.window_limit_warnings.allow(message.arrival) {
                    tracing::warn!(
                        rule = %self.plan.rules[rule].name,
                        device = %origin.device(),
                        suppressed,
                        "a device reached its open-window limit; readings that need a new window are refused (weir_readings_late_total{{reason=\"window_limit\"}}); check the device's clock or raise max_open_windows"
                    );
                }
            }
            self.drain(rule, out);
        }
    }

    /// Counts and routes what rule `rule` just produced.
    fn drain(&mut self, rule: usize, out: &mut Vec<Outgoing>) {
        drain_output(
            &self.plan,
            &self.metrics,
            &self.rule_counters[rule],
            &mut self.output,
            out,
        );
    }

    /// Runs the processing-time timers of every rule that has them, for every device, and
    /// reports this worker's state sizes (every fourth tick, about once a second).
    pub fn tick(&mut self, now_ms: i64, out: &mut Vec<Outgoing>) {
        if self.ticks.is_multiple_of(4) {
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
            self.drain(rule, out);
        }
    }

    /// Publishes devices per rule to this worker's [`WorkerStats`] (the newest event time goes
    /// there as readings arrive; open windows are kept by `weir_windows_open` directly); a scrape
    /// sums them over the workers.
    pub fn report_stats(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        for (rule, plan) in self.plan.rules.iter().enumerate() {
            self.stats.rule_devices[rule].store(self.input_devices[plan.input], Relaxed);
        }
    }

    /// Flushes every device's open state (windows) as input ends.
    pub fn close(&mut self, out: &mut Vec<Outgoing>) {
        for rule in 0..self.runners.len() {
            for (device, origin) in self.device_origins.iter().enumerate() {
                self.runners[rule].on_close(device, origin, &mut self.output);
            }
            self.drain(rule, out);
        }
    }

    /// [`process`](Self::process), with a panic contained to the reading that caused it: its
    /// partial events are dropped and it is dead-lettered as `internal_error`. A device's state
    /// may be left half-updated by the failed reading; that beats a worker that stops for every
    /// device, and a crash that the same message repeats after every restart.
    pub fn process_contained(&mut self, message: &RawMessage, out: &mut Vec<Outgoing>) {
        let before = out.len();
        let processed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.process(message, out);
        }));
        if processed.is_err() {
            out.truncate(before);
            tracing::error!(topic = %message.topic, lsn = message.lsn, "processing a reading panicked; it was skipped and dead-lettered");
            self.decode_failed(message, DecodeError::Internal, out);
        }
    }

    /// Counts, logs (rate-limited) and dead-letters an input that could not become a reading.
    fn decode_failed(&mut self, message: &RawMessage, err: DecodeError, out: &mut Vec<Outgoing>) {
        let input_plan = &self.plan.inputs[message.input];
        let reason = err.reason();
        let description = err.describe(&input_plan.fields);
        self.metrics
            .decode_errors
            .with_label_values(&[&input_plan.name, reason])
            .inc();
        tracing::trace!(input = %input_plan.name, topic = %message.topic, reason, "skipped a payload");
        if let Some(suppressed) = self.decode_warnings.allow(Instant::now()) {
            tracing::warn!(
                input = %input_plan.name,
                topic = %message.topic,
                reason,
                suppressed,
                "skipped a payload: {description}"
            );
        }
        if let Some(template) = &self.plan.dead_letter_topic {
            self.metrics
                .dead_letters
                .with_label_values(&[&input_plan.name, reason])
                .inc();
            out.push(Outgoing {
                topic: template
                    .replace("{input}", &input_plan.name)
                    .replace("{reason}", reason),
                payload: dead_letter_payload(&input_plan.name, message, reason, &description),
                confirm: self.plan.dead_letter_confirm,
                retain: false,
                sink: crate::engine::Plan::BROKER,
                table: None,
                rule: None,
                arrival: Some(message.arrival),
                ts: message.arrival_ms,
                headers: crate::model::message::Headers {
                    trace: message.trace.as_ref().map(|trace| Box::new(trace.child())),
                    ..Default::default()
                },
            });
        }
    }

    /// The state of every device as of now, for a snapshot.
    pub fn snapshot(&self) -> Vec<DeviceSnapshot> {
        self.device_origins
            .iter()
            .enumerate()
            .map(|(device, origin)| DeviceSnapshot {
                input: self.device_inputs[device],
                device: origin.device().to_string(),
                topic: origin.topic().to_string(),
                rules: self
                    .runners
                    .iter()
                    .zip(&self.plan.rules)
                    .filter_map(|(runner, rule)| {
                        runner
                            .save(device)
                            .map(|bytes| (rule.name.to_string(), bytes))
                    })
                    .collect(),
                recent: self.recent[device].clone(),
            })
            .collect()
    }

    /// Switches to the rules of `reload.plan`. Kept rules (same definition) carry on with their
    /// state; the others flush: their open windows fire into `out`, their gauges are taken
    /// back, and their state is dropped. New and changed rules start with no state. Devices, their
    /// dedup windows and the topic cache stay, since a reload never changes the inputs.
    pub fn reload(&mut self, reload: &Reload, out: &mut Vec<Outgoing>) {
        let old_plan = std::mem::replace(&mut self.plan, reload.plan.clone());
        let mut old_runners: Vec<Option<Box<dyn RuleRunner>>> = std::mem::take(&mut self.runners)
            .into_iter()
            .map(Some)
            .collect();
        let kept = |name: &str| reload.kept.iter().any(|k| &**k == name);
        for (index, rule) in old_plan.rules.iter().enumerate() {
            let Some(runner) = old_runners[index].as_mut().filter(|_| !kept(&rule.name)) else {
                continue;
            };
            for (device, origin) in self.device_origins.iter().enumerate() {
                runner.on_close(device, origin, &mut self.output);
                runner.reset(device, &mut self.output);
            }
            drain_output(
                &old_plan,
                &self.metrics,
                &self.rule_counters[index],
                &mut self.output,
                out,
            );
        }
        let plan = self.plan.clone();
        self.runners = runners(&plan);
        let mut fresh = vec![true; plan.rules.len()];
        for (index, rule) in plan.rules.iter().enumerate() {
            if !kept(&rule.name) {
                continue;
            }
            let Some(old) = old_plan.rules.iter().position(|r| r.name == rule.name) else {
                continue;
            };
            let Some(mut runner) = old_runners[old].take() else {
                continue;
            };
            fresh[index] = !self.runners[index].adopt_states(runner.take_states());
            if fresh[index] {
                tracing::error!(rule = %rule.name, "a kept rule's state did not fit its new plan; it starts fresh");
            }
        }
        self.rule_counters = rule_counters(&plan, &self.metrics);
        self.decoded = decode_buffers(&plan);
        self.metrics.retire_worker_stats(&self.stats);
        self.stats = self
            .metrics
            .worker_stats(plan.rules.len(), plan.inputs.len());
        for (input, newest) in self.newest_event_ms.iter().enumerate() {
            self.stats.newest_event_ms[input].store(*newest, std::sync::atomic::Ordering::Relaxed);
        }
        self.seed_expected_in(|rule| fresh[rule]);
        self.report_stats();
    }

    /// Restores one device from a snapshot. A rule whose saved state no longer fits (its
    /// definition changed) starts fresh for that device, with a warning.
    pub fn restore(&mut self, saved: &DeviceSnapshot) {
        let input = usize::from(saved.input);
        if input >= self.plan.inputs.len() {
            return;
        }
        let Ok((device, _)) = self.resolve(input, &saved.topic) else {
            tracing::warn!(topic = %saved.topic, "a saved device no longer matches its input; its state is dropped");
            return;
        };
        for (rule_name, bytes) in &saved.rules {
            let Some(rule) = self.plan.rules.iter().position(|r| &*r.name == rule_name) else {
                continue;
            };
            if let Err(err) = self.runners[rule].restore(device, bytes, &mut self.output) {
                tracing::warn!(rule = %rule_name, device = %saved.device, %err, "saved state does not fit the rule any more; starting fresh");
            }
            if let Some(gauge) = &self.rule_counters[rule].offline {
                gauge.add(std::mem::take(&mut self.output.offline));
            }
        }
        self.recent[device] = saved.recent.clone();
    }

    /// Applies one input from intake: processes a message (its events join `out`), or
    /// answers a snapshot barrier (after handing `out` to the sinks, so the snapshot follows
    /// every event derived before it), or switches rules. False when a sink is gone.
    pub async fn take(
        &mut self,
        input: WorkerInput,
        sinks: &[mpsc::Sender<SinkInput>],
        out: &mut Vec<Outgoing>,
    ) -> bool {
        match input {
            WorkerInput::Message(message) => self.process_contained(&message, out),
            WorkerInput::Barrier(lsn) => {
                if !send_all(sinks, out).await {
                    return false;
                }
                let mut devices = self.snapshot();
                let rules = self.plan.fingerprints();
                for to in sinks {
                    let devices = std::mem::take(&mut devices);
                    let rules = rules.clone();
                    let barrier = SinkInput::Barrier {
                        lsn,
                        devices,
                        rules,
                    };
                    if to.send(barrier).await.is_err() {
                        return false;
                    }
                }
            }
            WorkerInput::Reload(reload) => self.reload(&reload, out),
        }
        true
    }

    /// Runs the processing-time timers now and hands their events to the sinks; false when a
    /// sink is gone.
    pub async fn run_timers(
        &mut self,
        sinks: &[mpsc::Sender<SinkInput>],
        out: &mut Vec<Outgoing>,
    ) -> bool {
        self.tick(crate::model::time::wall_clock_ms(), out);
        send_all(sinks, out).await
    }

    /// Ends the worker as input ends: flushes open windows (or, with a state dir, leaves them to
    /// the final snapshot) and hands what is left to the sinks.
    pub async fn finish(mut self, sinks: &[mpsc::Sender<SinkInput>], out: &mut Vec<Outgoing>) {
        if !self.plan.durable_state {
            self.close(out);
        }
        self.report_stats();
        send_all(sinks, out).await;
    }

    /// The worker loop of the task layout ([`super::layout`]): reads batches from the source,
    /// takes them, sends routed messages to the sinks, and runs the timers; ends with
    /// [`Worker::finish`] when the source closes its channel.
    pub async fn run(
        mut self,
        mut input: mpsc::Receiver<WorkerInput>,
        sinks: Vec<mpsc::Sender<SinkInput>>,
    ) {
        let sink = &sinks[..];
        let mut batch = Vec::with_capacity(256);
        let mut out = Vec::with_capacity(256);
        let mut ticks = timer_interval();
        loop {
            tokio::select! {
                received = input.recv_many(&mut batch, 256) => {
                    if received == 0 {
                        break;
                    }
                    for item in batch.drain(..) {
                        if !self.take(item, sink, &mut out).await {
                            return;
                        }
                    }
                }
                _ = ticks.tick() => self.tick(crate::model::time::wall_clock_ms(), &mut out),
            }
            if !send_all(sink, &mut out).await {
                return;
            }
        }
        self.finish(sink, &mut out).await;
    }
}

/// The interval of the processing-time timers ([`TICK_INTERVAL`]); a late tick is not made up.
pub(super) fn timer_interval() -> tokio::time::Interval {
    let mut ticks = tokio::time::interval(TICK_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks
}

/// One runner per rule of `plan`, with no device state yet.
fn runners(plan: &Plan) -> Vec<Box<dyn RuleRunner>> {
    plan.rules
        .iter()
        .map(|rule| -> Box<dyn RuleRunner> {
            match &rule.operator {
                OperatorPlan::Hysteresis(op) => Keyed::boxed(op),
                OperatorPlan::Tumbling(op) => Keyed::boxed(op),
                OperatorPlan::Deadband(op) => Keyed::boxed(op),
                OperatorPlan::Change(op) => Keyed::boxed(op),
                OperatorPlan::Liveness(op) => Keyed::boxed(op),
                OperatorPlan::RateOfChange(op) => Keyed::boxed(op),
                OperatorPlan::Stuck(op) => Keyed::boxed(op),
                OperatorPlan::Anomaly(op) => Keyed::boxed(op),
                OperatorPlan::Hopping(op) => Keyed::boxed(op),
                OperatorPlan::Session(op) => Keyed::boxed(op),
                OperatorPlan::Count(op) => Keyed::boxed(op),
            }
        })
        .collect()
}

/// One decode buffer per input, shaped by the fields the plan's rules read.
fn decode_buffers(plan: &Plan) -> Vec<Decoded> {
    plan.inputs
        .iter()
        .map(|input| Decoded::for_plan(&input.fields))
        .collect()
}

/// The counters of every rule of `plan`.
fn rule_counters(plan: &Plan, metrics: &Metrics) -> Vec<RuleCounters> {
    plan.rules
        .iter()
        .map(|rule| RuleCounters {
            emitted: rule
                .operator
                .event_kinds()
                .iter()
                .map(|kind| {
                    (
                        *kind,
                        metrics
                            .events_emitted
                            .with_label_values(&[&*rule.name, kind]),
                    )
                })
                .collect(),
            offline: matches!(rule.operator, OperatorPlan::Liveness(_))
                .then(|| metrics.devices_offline.with_label_values(&[&rule.name])),
            late: metrics
                .readings_late
                .with_label_values(&[&rule.name, LateReason::Late.label()]),
            future: metrics
                .readings_late
                .with_label_values(&[&rule.name, LateReason::Future.label()]),
            window_limit: metrics
                .readings_late
                .with_label_values(&[&rule.name, LateReason::WindowLimit.label()]),
            windows_open: metrics.windows_open.with_label_values(&[&rule.name]),
            out_of_order: metrics
                .readings_out_of_order
                .with_label_values(&[&rule.name]),
        })
        .collect()
}

/// Sends each message of `out` to its sink and clears `out`; false when a sink is gone.
pub(super) async fn send_all(sinks: &[mpsc::Sender<SinkInput>], out: &mut Vec<Outgoing>) -> bool {
    for message in out.drain(..) {
        // The sinks are fixed while weir runs (a reload may change only rules), so the index is
        // always in range; the broker's sink takes anything that is not.
        let sink = sinks.get(message.sink).unwrap_or(&sinks[Plan::BROKER]);
        if sink.send(SinkInput::Event(message)).await.is_err() {
            return false;
        }
    }
    true
}

/// The JSON body of a dead letter: why, and what arrived (as text when it is UTF-8, else base64),
/// cut to 4 KiB.
fn dead_letter_payload(
    input: &str,
    message: &RawMessage,
    reason: &str,
    description: &str,
) -> Vec<u8> {
    const KEEP: usize = 4096;
    let payload = &message.payload[..message.payload.len().min(KEEP)];
    let mut body = serde_json::json!({
        "v": crate::model::event::SCHEMA_VERSION,
        "kind": "dead_letter",
        "input": input,
        "reason": reason,
        "message": description,
        "topic": message.topic,
        "received": message.arrival_ms,
        "payload_bytes": message.payload.len(),
    });
    match std::str::from_utf8(payload) {
        Ok(text) => body["payload"] = text.into(),
        Err(_) => body["payload_b64"] = base64(payload).into(),
    }
    if message.payload.len() > KEEP {
        body["truncated"] = true.into();
    }
    serde_json::to_vec(&body).unwrap_or_default()
}

/// Standard base64 with padding (RFC 4648).
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
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
    if output.future > 0 {
        counters.future.inc_by(std::mem::take(&mut output.future));
    }
    if output.window_limit > 0 {
        counters
            .window_limit
            .inc_by(std::mem::take(&mut output.window_limit));
    }
    if output.open_windows_delta != 0 {
        counters
            .windows_open
            .add(std::mem::take(&mut output.open_windows_delta));
    }
    if output.out_of_order > 0 {
        counters
            .out_of_order
            .inc_by(std::mem::take(&mut output.out_of_order));
    }
    let offline = std::mem::take(&mut output.offline);
    if let (Some(gauge), true) = (&counters.offline, offline != 0) {
        gauge.add(offline);
    }
    for event in output.events.drain(..) {
        let rule = &plan.rules[event.rule_index];
        if let EventBody::Late { .. } = event.body {
            // Already counted by reason above; published only where a late_topic is set.
            if let Some(route) = &rule.late_route {
                out.push(route.apply(&event));
            }
            continue;
        }
        let kind = event.body.kind();
        if let Some((_, counter)) = counters.emitted.iter().find(|(k, _)| *k == kind) {
            counter.inc();
        }
        tracing::trace!(
            id = %event.id,
            rule = %event.rule,
            device = %event.origin.device(),
            topic = %event.origin.topic(),
            cause_ts = event.cause.as_ref().map(|c| c.ts),
            "derived event"
        );
        let (first, others) = rule
            .routes
            .split_first()
            .expect("a rule has at least one output");
        let mut routed = first.apply(&event);
        if metrics.spans.is_on() {
            metrics.spans.record(&event, &mut routed);
        }
        if metrics.tap.is_watched() {
            let json = match first.format {
                Format::Cbor => {
                    String::from_utf8_lossy(&crate::route::encode(&event, Format::Json))
                        .into_owned()
                }
                _ => String::from_utf8_lossy(&routed.payload).into_owned(),
            };
            metrics.tap.offer(TapEvent {
                id: event.id.to_string(),
                rule: event.rule.clone(),
                // Copied: the tap is for a person watching, a few events a second at most.
                device: event.origin.device().into(),
                json,
            });
        }
        // Every output carries the same event: the same id and the same span.
        for route in others {
            let mut copy = route.apply(&event);
            copy.headers.trace.clone_from(&routed.headers.trace);
            out.push(copy);
        }
        out.push(routed);
    }
}

/// Why a message did not reach the rules.
#[derive(Debug)]
enum Refusal {
    Decode(DecodeError),
    DeviceLimit,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }

    fn example_worker(max_devices: usize) -> Worker {
        let mut config = crate::config::parse(
            crate::config::EXAMPLE,
            std::path::Path::new("example.toml"),
            &crate::config::Overrides::default(),
        )
        .unwrap();
        config.pipeline.max_devices_per_worker = max_devices;
        config.pipeline.when_device_limit = DeviceLimitPolicy::EvictIdle;
        let plan = Arc::new(Plan::build(&config).unwrap());
        Worker::new(plan, Arc::new(Metrics::new()))
    }

    fn reading(device: &str, ts: i64) -> RawMessage {
        RawMessage {
            input: 0,
            topic: format!("sensors/plant-1/{device}/telemetry"),
            payload: format!(r#"{{"ts": {ts}, "temperature": 20}}"#)
                .into_bytes()
                .into(),
            arrival: Instant::now(),
            arrival_ms: ts,
            lsn: 0,
            trace: None,
        }
    }

    #[test]
    fn a_device_stores_its_topic_id_and_labels_once() {
        let mut worker = example_worker(10);
        let mut out = Vec::new();
        for (device, ts) in [("dev-1", 1), ("dev-2", 1), ("dev-1", 2)] {
            worker.process(&reading(device, ts), &mut out);
        }
        let [one, _] = &worker.device_origins.clone()[..] else {
            panic!("two devices");
        };
        let (found, origin) = worker.resolve(0, one.topic()).unwrap();
        assert_eq!(found, 0);
        assert!(Origin::ptr_eq(&origin, one), "one origin per topic");
        assert_eq!(worker.find_device(0, "dev-1"), Some(0));
        let topic = one.topic().as_bytes().as_ptr_range();
        assert!(
            topic.contains(&one.device().as_ptr())
                && topic.contains(&one.segment(0).unwrap().as_ptr()),
            "the id and the labels are ranges of the topic"
        );
        assert_eq!((worker.topics.len(), worker.devices.len()), (2, 2));
    }

    #[test]
    fn a_device_on_a_new_topic_is_found_by_the_new_one_only() {
        let mut worker = example_worker(10);
        let mut out = Vec::new();
        worker.process(&reading("dev-1", 1), &mut out);
        let mut moved = reading("dev-1", 2);
        moved.topic = "sensors/plant-2/dev-1/telemetry".into();
        worker.process(&moved, &mut out);
        assert_eq!(worker.device_count(), 1);
        assert_eq!((worker.topics.len(), worker.devices.len()), (1, 1));
        assert_eq!(worker.device_origins[0].segment(0), Some("plant-2"));
        let (device, origin) = worker
            .resolve(0, "sensors/plant-2/dev-1/telemetry")
            .unwrap();
        assert!(device == 0 && Origin::ptr_eq(&origin, &worker.device_origins[0]));
    }

    #[test]
    fn an_evicted_device_leaves_no_key_behind() {
        let mut worker = example_worker(1);
        let mut out = Vec::new();
        worker.process(&reading("dev-1", 1), &mut out);
        worker.process(&reading("dev-2", 2), &mut out);
        assert_eq!(worker.device_count(), 1);
        assert_eq!(worker.find_device(0, "dev-1"), None);
        assert_eq!(worker.find_device(0, "dev-2"), Some(0));
        assert_eq!((worker.topics.len(), worker.devices.len()), (1, 1));
        assert_eq!(worker.device_origins[0].device(), "dev-2");
    }

    #[test]
    fn a_reading_that_panics_is_dead_lettered_and_the_worker_goes_on() {
        let mut worker = example_worker(10);
        let mut out = Vec::new();
        worker.process_contained(&reading("trips-a-bug", 1), &mut out);
        let [letter] = &out[..] else {
            panic!("one dead letter, got {out:?}");
        };
        assert_eq!(letter.topic, "weir/dead-letter/telemetry/internal_error");
        let body: serde_json::Value = serde_json::from_slice(&letter.payload).unwrap();
        assert_eq!(body["topic"], "sensors/plant-1/trips-a-bug/telemetry");
        out.clear();
        worker.process_contained(&reading("dev-1", 2), &mut out);
        assert_eq!(worker.device_count(), 1, "the next reading is processed");
        assert_eq!(
            worker
                .metrics
                .decode_errors
                .with_label_values(&["telemetry", "internal_error"])
                .get(),
            1
        );
    }
}
