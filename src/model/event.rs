//! Derived events: what operators emit and what weir publishes (schema v1, see the README).

use super::reading::{DiscreteValue, Origin};
use crate::config::Aggregate;
use crate::model::trace::TraceContext;
use std::sync::Arc;
use std::time::Instant;

/// Version of the published event schema; bumped only on incompatible changes.
pub const SCHEMA_VERSION: u32 = 1;

/// Every `kind` a derived event can have ([`EventBody::kind`]), in the enum's order: what the
/// README's schema table must list (tests/schema.rs), and what consumers can match on.
pub const KINDS: &[&str] = &[
    "state_change",
    "window",
    "late",
    "report",
    "change",
    "liveness",
    "rate_of_change",
    "stuck",
    "anomaly",
    "flapping",
];

/// One derived event, before routing and encoding.
#[derive(Debug, Clone, PartialEq)]
pub struct DerivedEvent {
    /// Deterministic: the same input stream yields the same ids, so consumers can deduplicate.
    pub id: EventId,
    /// Index of the rule in the engine's plan (for routing).
    pub rule_index: usize,
    pub rule: Arc<str>,
    /// The device and the topic segments of the reading stream it came from.
    pub origin: Origin,
    /// Event time, ms since the epoch: the reading's for a state change, the window's end for a
    /// window.
    pub ts: i64,
    pub body: EventBody,
    /// The reading that caused the event; absent for windows flushed at shutdown.
    pub cause: Option<Cause>,
    /// When the causing reading arrived, for the arrival-to-publish latency histogram.
    pub arrival: Option<Instant>,
}

/// The kind-specific part of an event.
#[derive(Debug, Clone, PartialEq)]
pub enum EventBody {
    StateChange {
        metric: Arc<str>,
        from: Arc<str>,
        to: Arc<str>,
        value: f64,
    },
    Window {
        start: i64,
        end: i64,
        metrics: Vec<WindowMetric>,
        /// Which aggregates the rule asked for, in its order.
        aggregates: Arc<[Aggregate]>,
        /// Why the window was emitted; anything but the watermark makes it partial.
        closed_by: WindowClose,
        /// 0 for the first emission of a window; n for its n-th correction by late readings
        /// (same `id`, so consumers upsert).
        update: u32,
    },
    /// A reading a window rule could not apply, published on the rule's late topic.
    Late {
        /// `late` (its windows are past allowed lateness), `future` (stamped too far ahead of
        /// the gateway clock) or `window_limit` (the device has too many open windows).
        reason: &'static str,
        /// The device's watermark when the reading arrived.
        watermark: Option<i64>,
        /// The reading's values of the rule's metrics.
        values: Vec<(Arc<str>, f64)>,
    },
    /// Deadband: a value worth reporting (moved past the band, first seen, or heartbeat).
    Report {
        metric: Arc<str>,
        value: f64,
        /// The last value reported before this one.
        previous: Option<f64>,
        /// `first`, `deadband` or `heartbeat`.
        reason: &'static str,
    },
    /// A discrete (string, bool, integer) field changed.
    Change {
        field: Arc<str>,
        /// `None` for the first value of a device (with `emit_initial`).
        from: Option<DiscreteValue>,
        to: DiscreteValue,
    },
    /// Liveness: a device went `offline` or came back `online`.
    Liveness {
        from: &'static str,
        to: &'static str,
        /// `timeout`, `never_seen`, `status` or `reading`.
        reason: &'static str,
        /// Processing time (ms) the device was last heard from; `None` if never.
        last_seen: Option<i64>,
    },
    /// Rate of change crossed its bound (`normal` -> `exceeded`) or came back.
    RateOfChange {
        metric: Arc<str>,
        from: &'static str,
        to: &'static str,
        value: f64,
        /// dvalue/dt in the metric's unit per second.
        rate_per_s: f64,
        /// The span the rate was taken over, ms.
        over_ms: i64,
    },
    /// A value stopped changing for the configured time (`moving` -> `stuck`) or moved again.
    Stuck {
        metric: Arc<str>,
        from: &'static str,
        to: &'static str,
        value: f64,
        /// Event time since which the value has not changed.
        since: i64,
    },
    /// A value far from the rolling mean of the previous readings.
    Anomaly {
        metric: Arc<str>,
        value: f64,
        mean: f64,
        stddev: f64,
        z: f64,
    },
    /// Flapping suppression started (`settled` -> `flapping`) or ended.
    Flapping {
        /// The metric or field whose state flaps.
        metric: Arc<str>,
        from: &'static str,
        to: &'static str,
        /// The detector's current state.
        state: Arc<str>,
        /// Transitions seen within the flapping window.
        changes: u32,
    },
}

/// What made a window emit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowClose {
    /// The device's watermark passed the window's end (or a count window filled up).
    Watermark,
    /// The device sent nothing for `idle_timeout` (processing time).
    IdleTimeout,
    /// weir stopped cleanly with `on_shutdown = "flush"`.
    Shutdown,
}

impl WindowClose {
    /// The `closed_by` field; `None` for a complete window.
    pub fn label(self) -> Option<&'static str> {
        match self {
            WindowClose::Watermark => None,
            WindowClose::IdleTimeout => Some("idle_timeout"),
            WindowClose::Shutdown => Some("shutdown"),
        }
    }
}

impl EventBody {
    /// The `kind` field of the schema.
    pub fn kind(&self) -> &'static str {
        match self {
            EventBody::StateChange { .. } => "state_change",
            EventBody::Window { .. } => "window",
            EventBody::Late { .. } => "late",
            EventBody::Report { .. } => "report",
            EventBody::Change { .. } => "change",
            EventBody::Liveness { .. } => "liveness",
            EventBody::RateOfChange { .. } => "rate_of_change",
            EventBody::Stuck { .. } => "stuck",
            EventBody::Anomaly { .. } => "anomaly",
            EventBody::Flapping { .. } => "flapping",
        }
    }
}

/// Aggregates of one metric over a window, finished (see `operators::window::aggregates`).
/// NaN marks an undefined value (written as `null`).
#[derive(Debug, Clone, PartialEq)]
pub struct WindowMetric {
    pub name: Arc<str>,
    pub count: u64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
    pub avg: f64,
    pub stddev: f64,
    pub first: f64,
    pub last: f64,
    pub rate: f64,
    /// p50, p90, p95, p99.
    pub percentiles: [f64; 4],
}

impl WindowMetric {
    pub fn avg(&self) -> f64 {
        self.avg
    }

    pub fn aggregate(&self, aggregate: Aggregate) -> f64 {
        match aggregate {
            Aggregate::Count => self.count as f64,
            Aggregate::Sum => self.sum,
            Aggregate::Min => self.min,
            Aggregate::Max => self.max,
            Aggregate::Avg => self.avg,
            Aggregate::Stddev => self.stddev,
            Aggregate::First => self.first,
            Aggregate::Last => self.last,
            Aggregate::Delta => self.last - self.first,
            Aggregate::Rate => self.rate,
            Aggregate::P50 => self.percentiles[0],
            Aggregate::P90 => self.percentiles[1],
            Aggregate::P95 => self.percentiles[2],
            Aggregate::P99 => self.percentiles[3],
        }
    }
}

/// The reading that caused an event.
#[derive(Debug, Clone, PartialEq)]
pub struct Cause {
    /// The reading's origin, for its topic: shared with the reading, so naming the cause costs
    /// a count increment, not a copy of the topic.
    pub origin: Origin,
    pub ts: i64,
    pub seq: Option<u64>,
    /// The reading's W3C trace context (MQTT 5), shared by every event it causes.
    pub trace: Option<Arc<TraceContext>>,
}

impl Cause {
    /// The topic of the reading that caused the event.
    pub fn topic(&self) -> &str {
        self.origin.topic()
    }

    /// The cause naming `reading`.
    pub fn of(reading: &super::reading::Reading<'_>) -> Self {
        Self {
            origin: reading.origin.clone(),
            ts: reading.ts,
            seq: reading.seq,
            trace: reading.trace.cloned(),
        }
    }
}

/// A deterministic 64-bit event id, written as 16 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EventId(pub u64);

impl EventId {
    /// FNV-1a over the parts that identify an event. Stable across versions and platforms
    /// (unlike `std`'s hasher), which is what lets a replay reproduce ids.
    pub fn derive(parts: &[&[u8]]) -> Self {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for part in parts {
            for byte in part.iter().chain(&[0xff]) {
                hash ^= u64::from(*byte);
                hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
        EventId(hash)
    }
}

impl EventId {
    /// The 16 lowercase hex digits, without allocating or going through `fmt` (the encoder
    /// writes one per published event).
    pub fn hex(&self) -> [u8; 16] {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut out = [0u8; 16];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = DIGITS[((self.0 >> (60 - 4 * i)) & 0xf) as usize];
        }
        out
    }
}

impl std::fmt::Display for EventId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hex = self.hex();
        // Always ASCII.
        f.pad(std::str::from_utf8(&hex).unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::{EventBody, EventId, WindowClose, KINDS};
    use crate::model::reading::DiscreteValue;

    /// The place of `body`'s variant in the enum. No wildcard arm: a new variant does not
    /// compile until it has a place here, and then the test below wants a sample of it and its
    /// kind in `KINDS`.
    fn ordinal(body: &EventBody) -> usize {
        match body {
            EventBody::StateChange { .. } => 0,
            EventBody::Window { .. } => 1,
            EventBody::Late { .. } => 2,
            EventBody::Report { .. } => 3,
            EventBody::Change { .. } => 4,
            EventBody::Liveness { .. } => 5,
            EventBody::RateOfChange { .. } => 6,
            EventBody::Stuck { .. } => 7,
            EventBody::Anomaly { .. } => 8,
            EventBody::Flapping { .. } => 9,
        }
    }

    #[test]
    fn kinds_lists_the_kind_of_every_event_body_in_order() {
        let name = |s: &str| -> std::sync::Arc<str> { s.into() };
        let bodies = [
            EventBody::StateChange {
                metric: name("temperature"),
                from: name("normal"),
                to: name("hot"),
                value: 31.0,
            },
            EventBody::Window {
                start: 0,
                end: 10_000,
                metrics: Vec::new(),
                aggregates: Vec::new().into(),
                closed_by: WindowClose::Watermark,
                update: 0,
            },
            EventBody::Late {
                reason: "late",
                watermark: None,
                values: Vec::new(),
            },
            EventBody::Report {
                metric: name("temperature"),
                value: 21.0,
                previous: None,
                reason: "first",
            },
            EventBody::Change {
                field: name("door"),
                from: None,
                to: DiscreteValue::Bool(true),
            },
            EventBody::Liveness {
                from: "online",
                to: "offline",
                reason: "timeout",
                last_seen: None,
            },
            EventBody::RateOfChange {
                metric: name("pressure"),
                from: "normal",
                to: "exceeded",
                value: 112.0,
                rate_per_s: 1.2,
                over_ms: 10_000,
            },
            EventBody::Stuck {
                metric: name("temperature"),
                from: "moving",
                to: "stuck",
                value: 21.0,
                since: 0,
            },
            EventBody::Anomaly {
                metric: name("temperature"),
                value: 14.5,
                mean: 11.0,
                stddev: 1.0,
                z: 3.5,
            },
            EventBody::Flapping {
                metric: name("temperature"),
                from: "settled",
                to: "flapping",
                state: name("hot"),
                changes: 6,
            },
        ];
        assert_eq!(bodies.len(), KINDS.len());
        for (i, body) in bodies.iter().enumerate() {
            assert_eq!(ordinal(body), i, "sample {i} is not the enum's variant {i}");
            assert_eq!(body.kind(), KINDS[i]);
        }
    }

    #[test]
    fn id_is_written_as_sixteen_lowercase_hex_digits() {
        for id in [0, 0xabc, u64::MAX, 0x0123_4567_89ab_cdef] {
            assert_eq!(EventId(id).to_string(), format!("{id:016x}"));
            assert_eq!(&EventId(id).hex(), format!("{id:016x}").as_bytes());
        }
    }
}
