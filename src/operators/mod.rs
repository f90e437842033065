//! Operators: synchronous, I/O-free state machines, one file per kind. Each takes a reading for
//! one device (with that device's state) and pushes derived events into an [`Output`].
//!
//! An operator value holds the rule's immutable settings; its per-device mutable state is a
//! separate `State` value owned by the engine, so state can be counted, capped and (later)
//! snapshotted without the operator knowing.

pub mod anomaly;
pub mod change;
pub mod deadband;
pub mod flapping;
pub mod hysteresis;
pub mod liveness;
pub mod rate_of_change;
pub mod stuck;
pub mod window;

pub use anomaly::Anomaly;
pub use change::Change;
pub use deadband::Deadband;
pub use hysteresis::Hysteresis;
pub use liveness::Liveness;
pub use rate_of_change::RateOfChange;
pub use stuck::Stuck;
pub use window::{CountWindows, Hopping, SessionWindows, Tumbling};

use crate::decode::{Origin, Reading};
use crate::model::event::{Cause, DerivedEvent, EventBody, EventId};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::sync::Arc;

/// Where operators put what they produce.
#[derive(Debug, Default)]
pub struct Output {
    pub events: Vec<DerivedEvent>,
    /// Readings older than the last one seen for the device, ignored by order-sensitive operators.
    pub out_of_order: u64,
    /// Readings whose window had already fired (past allowed lateness).
    pub late: u64,
    /// Readings quarantined for a timestamp too far ahead of the gateway clock.
    pub future: u64,
    /// Readings refused because their device has too many open windows.
    pub window_limit: u64,
    /// Change in the number of windows held (open, or fired and kept for lateness).
    pub open_windows_delta: i64,
    /// Change in the number of devices this rule reports offline (liveness).
    pub offline: i64,
}

/// Identity of the rule an operator runs for, stamped on its events.
#[derive(Debug, Clone)]
pub struct RuleMeta {
    pub index: usize,
    pub name: Arc<str>,
}

impl RuleMeta {
    /// An event of this rule. Its id is derived from the rule, the device, the kind, `ts` and
    /// `key` (what tells apart events of one kind at one time: a metric, a target state), so a
    /// replay of the same readings yields the same ids.
    pub(crate) fn event(
        &self,
        origin: &Origin,
        ts: i64,
        key: &[&[u8]],
        body: EventBody,
        reading: Option<&Reading<'_>>,
    ) -> DerivedEvent {
        let ts_bytes = ts.to_be_bytes();
        // A fixed array rather than a Vec: events are built on the hot path.
        let mut parts: [&[u8]; 8] = [&[]; 8];
        parts[..4].copy_from_slice(&[
            self.name.as_bytes(),
            origin.device().as_bytes(),
            body.kind().as_bytes(),
            &ts_bytes,
        ]);
        let used = 4 + key.len().min(4);
        parts[4..used].copy_from_slice(&key[..used - 4]);
        DerivedEvent {
            id: EventId::derive(&parts[..used]),
            rule_index: self.index,
            rule: self.name.clone(),
            origin: origin.clone(),
            ts,
            body,
            cause: reading.map(Cause::of),
            arrival: reading.map(|r| r.arrival),
        }
    }
}

/// Drops readings older than the last one applied for the device (`last_ts`), counting them in
/// `out.out_of_order`; returns whether the reading may be applied. Equal timestamps are applied.
pub(crate) fn in_order(last_ts: &mut Option<i64>, ts: i64, out: &mut Output) -> bool {
    if last_ts.is_some_and(|last| ts < last) {
        out.out_of_order += 1;
        return false;
    }
    *last_ts = Some(ts);
    true
}

/// The common start of a detector that keeps state per metric: whether to apply `reading`.
/// Not when it carries none of `metrics` (name, slot), nor when it is older than the last reading
/// applied (counted in `out.out_of_order`). Otherwise `per_metric` is sized to one entry per
/// metric, new entries `Default`.
pub(crate) fn admit<T: Default>(
    metrics: &[(Arc<str>, usize)],
    last_ts: &mut Option<i64>,
    per_metric: &mut Vec<T>,
    reading: &Reading<'_>,
    out: &mut Output,
) -> bool {
    if metrics
        .iter()
        .all(|(_, slot)| reading.values[*slot].is_none())
    {
        return false;
    }
    if !in_order(last_ts, reading.ts, out) {
        return false;
    }
    if per_metric.len() < metrics.len() {
        per_metric.resize_with(metrics.len(), T::default);
    }
    true
}

/// Converts a config duration to ms, saturating.
pub(crate) fn millis(duration: std::time::Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// A rule's logic. Time comes in only through readings' timestamps and explicit arguments;
/// operators never read the clock.
pub trait Operator: Send + 'static {
    /// Per-device state; `Default` is the state of a device never seen. Serializable so that
    /// state can be snapshotted and restored across restarts.
    type State: Default + Send + Serialize + DeserializeOwned;

    /// Handles one reading of the device whose state is `state`.
    fn on_reading(&self, state: &mut Self::State, reading: &Reading<'_>, out: &mut Output);

    /// Whether [`on_tick`](Self::on_tick) does anything; the engine skips ticking otherwise.
    fn wants_ticks(&self) -> bool {
        false
    }

    /// Processing-time timer, called periodically for every device with `now_ms` (wall clock,
    /// ms since the epoch, or the virtual clock in replay). Drives what must happen when no
    /// reading arrives at all: idle windows closing, devices going offline.
    fn on_tick(&self, _state: &mut Self::State, _origin: &Origin, _now_ms: i64, _out: &mut Output) {
    }

    /// Registers a device the config expects (liveness reports it even if it never sends).
    fn on_expected(&self, _state: &mut Self::State) {}

    /// How many devices this state counts as offline (0 or 1), so the offline gauge stays right
    /// when states are restored from a snapshot or forgotten on eviction.
    fn offline_devices(&self, _state: &Self::State) -> i64 {
        0
    }

    /// Flushes what should flush when input ends (shutdown): called once per device.
    fn on_close(&self, _state: &mut Self::State, _origin: &Origin, _out: &mut Output) {}
}

/// Builders for operator unit tests.
#[cfg(test)]
pub(crate) mod test_support {
    use crate::decode::{Origin, Reading};
    use std::time::Instant;

    /// `value` in CBOR, as snapshots write it: for tests that state layouts stay readable.
    pub fn cbor(value: &impl serde::Serialize) -> Vec<u8> {
        let mut bytes = Vec::new();
        ciborium::into_writer(value, &mut bytes).expect("CBOR into a Vec");
        bytes
    }

    /// The origin of `sensors/s1/<device>/telemetry`.
    pub fn origin(device: &str) -> Origin {
        let topic = format!("sensors/s1/{device}/telemetry");
        Origin::new(
            vec!["site".to_owned(), "device".to_owned()].into(),
            1,
            &topic,
            &["s1", device],
        )
    }

    /// A reading with discrete values.
    pub fn discrete_reading<'a>(
        origin: &'a Origin,
        ts: i64,
        discrete: &'a [crate::decode::DiscreteSlot],
    ) -> Reading<'a> {
        Reading {
            origin,
            ts,
            seq: None,
            values: &[],
            discrete,
            arrival: Instant::now(),
            arrival_ms: ts,
            trace: None,
        }
    }

    /// Feeds readings (event time, one value per metric slot) of device `d1` through `operator`
    /// from a fresh state, and describes each event with `describe`.
    pub fn feed<O: super::Operator, const N: usize>(
        operator: &O,
        readings: &[(i64, [Option<f64>; N])],
        describe: impl Fn(&crate::model::event::DerivedEvent) -> String,
    ) -> (Vec<String>, super::Output) {
        let origin = origin("d1");
        let mut state = O::State::default();
        let mut out = super::Output::default();
        for (ts, values) in readings {
            operator.on_reading(&mut state, &reading(&origin, *ts, values), &mut out);
        }
        let events = out.events.iter().map(describe).collect();
        (events, out)
    }

    /// A reading at `ts` that arrived at `ts` on the gateway clock.
    pub fn reading<'a>(origin: &'a Origin, ts: i64, values: &'a [Option<f64>]) -> Reading<'a> {
        Reading {
            origin,
            ts,
            seq: None,
            values,
            discrete: &[],
            arrival: Instant::now(),
            arrival_ms: ts,
            trace: None,
        }
    }
}
