//! A reading as operators see it: who it comes from ([`Origin`]), its event time, values by slot
//! and discrete values. Decoding fills it; operators read it.

use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Instant;

/// Who a stream of readings comes from: the topic, the device, and the topic's named segments.
/// Built once per topic and shared by every reading and event from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub topic: Arc<str>,
    pub device: Arc<str>,
    /// Names of the pattern's segments (shared by all origins of an input).
    pub names: Arc<[String]>,
    /// Captured values, in the order of `names`.
    pub segments: Box<[Arc<str>]>,
    /// Which segment is the device.
    pub device_index: usize,
}

impl Origin {
    /// The topic's named segments other than the device: the event's `labels`.
    pub fn labels(&self) -> impl Iterator<Item = (&str, &str)> {
        self.names
            .iter()
            .zip(self.segments.iter())
            .enumerate()
            .filter(move |(i, _)| *i != self.device_index)
            .map(|(_, (name, value))| (name.as_str(), &**value))
    }
}

/// One decoded reading of one device, as operators see it.
#[derive(Debug, Clone, Copy)]
pub struct Reading<'a> {
    pub origin: &'a Arc<Origin>,
    /// Event time, ms since the epoch (arrival time when the input has no time field).
    pub ts: i64,
    pub seq: Option<u64>,
    /// Metric values by slot of the input's field plan (`decode::FieldPlan`).
    pub values: &'a [Option<f64>],
    /// Discrete (string, bool, integer) values by slot of the field plan's `discrete`.
    pub discrete: &'a [DiscreteSlot],
    pub arrival: Instant,
    /// Arrival as wall-clock ms since the epoch: what future timestamps are judged against.
    /// Operators get the gateway clock only through this (and `on_tick`); they never read it.
    pub arrival_ms: i64,
    /// The W3C trace context the message carried (MQTT 5), for the events' `cause`.
    pub trace: Option<&'a Arc<crate::model::trace::TraceContext>>,
}

/// A discrete field value as operators see it, borrowed from the decode buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Discrete<'a> {
    Bool(bool),
    Int(i64),
    Text(&'a str),
}

/// An owned discrete value, kept in operator state and carried by events. Built only when a
/// value changes, so a steady stream allocates nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum DiscreteValue {
    Bool(bool),
    Int(i64),
    Text(String),
}

impl DiscreteValue {
    pub fn is(&self, other: Discrete<'_>) -> bool {
        match (self, other) {
            (DiscreteValue::Bool(a), Discrete::Bool(b)) => *a == b,
            (DiscreteValue::Int(a), Discrete::Int(b)) => *a == b,
            (DiscreteValue::Text(a), Discrete::Text(b)) => a == b,
            _ => false,
        }
    }
}

impl From<Discrete<'_>> for DiscreteValue {
    fn from(value: Discrete<'_>) -> Self {
        match value {
            Discrete::Bool(b) => DiscreteValue::Bool(b),
            Discrete::Int(i) => DiscreteValue::Int(i),
            Discrete::Text(t) => DiscreteValue::Text(t.to_owned()),
        }
    }
}

/// One discrete slot of a decode buffer (`decode::Decoded`). Text goes into a buffer reused across payloads,
/// so decoding discrete fields does not allocate once the buffer has grown to fit.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DiscreteSlot {
    kind: SlotKind,
    text: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
enum SlotKind {
    #[default]
    Absent,
    Bool(bool),
    Int(i64),
    Text,
}

impl DiscreteSlot {
    /// The value, or `None` when the payload lacked the field (or it was null).
    pub fn get(&self) -> Option<Discrete<'_>> {
        match self.kind {
            SlotKind::Absent => None,
            SlotKind::Bool(b) => Some(Discrete::Bool(b)),
            SlotKind::Int(i) => Some(Discrete::Int(i)),
            SlotKind::Text => Some(Discrete::Text(&self.text)),
        }
    }

    /// Whether the payload had the field (not null).
    pub fn is_present(&self) -> bool {
        self.kind != SlotKind::Absent
    }

    /// Empties the slot for the next payload (keeping its text buffer).
    pub fn clear(&mut self) {
        self.kind = SlotKind::Absent;
    }

    /// A slot holding `value` (for tests and benches).
    pub fn of(value: Discrete<'_>) -> Self {
        let mut slot = Self::default();
        slot.set(value);
        slot
    }

    pub(crate) fn set(&mut self, value: Discrete<'_>) {
        self.kind = match value {
            Discrete::Bool(b) => SlotKind::Bool(b),
            Discrete::Int(i) => SlotKind::Int(i),
            Discrete::Text(t) => {
                self.text.clear();
                self.text.push_str(t);
                SlotKind::Text
            }
        };
    }
}
