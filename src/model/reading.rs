//! A reading as operators see it: who it comes from ([`Origin`]), its event time, values by slot
//! and discrete values. Decoding fills it; operators read it.

use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Instant;
use triomphe::ThinArc;

/// Who a stream of readings comes from: the topic, the device, and the topic's named segments.
/// Built once per topic and shared by every reading and event from it; a clone is a count
/// increment.
///
/// A device's origin is the largest thing weir keeps per device, so it is one allocation of
/// the topic's length plus 44 bytes (the example's topics: 96 bytes in malloc chunks, where four
/// allocations took 256): the reference count (no weak count), the input's segment names (shared
/// by all origins of an input), and a buffer of spans and text. The text is the topic, followed by
/// any segment value that is not a range of it; the spans are the topic's and each segment's range
/// of the text. Segments the worker captures are levels of the topic, so each value is stored once.
#[derive(Clone)]
pub struct Origin(ThinArc<OriginHead, u8>);

/// The fixed part of an [`Origin`]'s allocation.
struct OriginHead {
    /// Names of the pattern's segments (shared by all origins of an input).
    names: Arc<[String]>,
    /// Which segment is the device.
    device_index: u32,
    segments: u16,
    /// Spans are pairs of u32 (the text is longer than a u16 reaches), else of u16. MQTT topics
    /// are at most 65,535 bytes, so the wide form is for other sources.
    wide: bool,
}

impl Origin {
    /// The origin of `topic`, whose segments (in the order of `names`) are `segments`; the
    /// device is segment `device_index`. A segment that is a sub-slice of `topic` (as the topic
    /// pattern's captures are) is stored as its range; any other is copied after the topic.
    pub fn new<S: AsRef<str>>(
        names: Arc<[String]>,
        device_index: usize,
        topic: &str,
        segments: &[S],
    ) -> Self {
        let base = topic.as_ptr() as usize;
        let mut text_len = topic.len();
        let mut spans = Vec::with_capacity(segments.len() + 1);
        spans.push((0, topic.len()));
        let mut appended: Vec<&str> = Vec::new();
        for segment in segments {
            let segment = segment.as_ref();
            let at = (segment.as_ptr() as usize).wrapping_sub(base);
            if at <= topic.len() && segment.len() <= topic.len() - at {
                spans.push((at, at + segment.len()));
            } else {
                spans.push((text_len, text_len + segment.len()));
                text_len += segment.len();
                appended.push(segment);
            }
        }
        let wide = text_len > usize::from(u16::MAX);
        let width = if wide { 8 } else { 4 };
        let mut bytes = Vec::with_capacity(spans.len() * width + text_len);
        for (start, end) in spans {
            if wide {
                bytes.extend_from_slice(&(start as u32).to_le_bytes());
                bytes.extend_from_slice(&(end as u32).to_le_bytes());
            } else {
                bytes.extend_from_slice(&(start as u16).to_le_bytes());
                bytes.extend_from_slice(&(end as u16).to_le_bytes());
            }
        }
        bytes.extend_from_slice(topic.as_bytes());
        for segment in appended {
            bytes.extend_from_slice(segment.as_bytes());
        }
        let head = OriginHead {
            names,
            device_index: u32::try_from(device_index).unwrap_or(u32::MAX),
            segments: u16::try_from(segments.len()).expect("a topic has fewer than 65,536 levels"),
            wide,
        };
        Self(ThinArc::from_header_and_slice(head, &bytes))
    }

    fn head(&self) -> &OriginHead {
        &self.0.header.header
    }

    /// Span `i` of the text: 0 is the topic, `1 + n` segment `n`. On the hot path (several
    /// calls per reading and per event), so each span is read as one word and checked once.
    #[inline]
    fn text(&self, i: usize) -> &str {
        let inner = &*self.0;
        let (head, bytes) = (&inner.header.header, &inner.slice);
        let spans = usize::from(head.segments) + 1;
        // A span is (start, end) as little-endian halves of one word.
        let (start, end, text) = if head.wide {
            let span = bytes
                .get(i * 8..i * 8 + 8)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map_or(0, u64::from_le_bytes);
            (
                (span & 0xffff_ffff) as usize,
                (span >> 32) as usize,
                spans * 8,
            )
        } else {
            let span = bytes
                .get(i * 4..i * 4 + 4)
                .and_then(|b| <[u8; 4]>::try_from(b).ok())
                .map_or(0, u32::from_le_bytes);
            ((span & 0xffff) as usize, (span >> 16) as usize, spans * 4)
        };
        let Some(bytes) = bytes.get(text + start..text + end) else {
            return "";
        };
        // SAFETY: the text is the bytes of `&str`s copied whole (the topic, then whole segment
        // values), and each span is either a whole appended value or the range of a `&str` that
        // was a sub-slice of the topic, so it starts and ends on character boundaries. The buffer
        // is never written after `new`, and slicing it above is bounds-checked.
        unsafe { std::str::from_utf8_unchecked(bytes) }
    }

    /// The topic the readings came on.
    #[inline]
    pub fn topic(&self) -> &str {
        self.text(0)
    }

    /// The device id: its segment of the topic.
    #[inline]
    pub fn device(&self) -> &str {
        self.segment(self.device_index()).unwrap_or("")
    }

    /// Which segment is the device.
    pub fn device_index(&self) -> usize {
        self.head().device_index as usize
    }

    /// Names of the pattern's segments.
    pub fn names(&self) -> &[String] {
        &self.head().names
    }

    /// Captured value `index`, in the order of [`names`](Self::names).
    #[inline]
    pub fn segment(&self, index: usize) -> Option<&str> {
        (index < usize::from(self.head().segments)).then(|| self.text(1 + index))
    }

    /// Every captured value, in the order of [`names`](Self::names).
    pub fn segments(&self) -> impl ExactSizeIterator<Item = &str> + '_ {
        (0..usize::from(self.head().segments)).map(|i| self.text(1 + i))
    }

    /// The topic's named segments other than the device: the event's `labels`.
    pub fn labels(&self) -> impl Iterator<Item = (&str, &str)> {
        let device = self.device_index();
        self.names()
            .iter()
            .zip(self.segments())
            .enumerate()
            .filter(move |(i, _)| *i != device)
            .map(|(_, (name, value))| (name.as_str(), value))
    }

    /// Whether both are the same allocation (not merely equal).
    #[inline]
    pub fn ptr_eq(a: &Origin, b: &Origin) -> bool {
        a.0.ptr() == b.0.ptr()
    }
}

impl PartialEq for Origin {
    fn eq(&self, other: &Self) -> bool {
        Origin::ptr_eq(self, other)
            || (self.topic() == other.topic()
                && self.device_index() == other.device_index()
                && self.names() == other.names()
                && self.segments().eq(other.segments()))
    }
}

impl Eq for Origin {}

impl std::fmt::Debug for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Origin")
            .field("topic", &self.topic())
            .field("device", &self.device())
            .field("names", &self.names())
            .field("segments", &self.segments().collect::<Vec<_>>())
            .finish()
    }
}

/// One decoded reading of one device, as operators see it.
#[derive(Debug, Clone, Copy)]
pub struct Reading<'a> {
    pub origin: &'a Origin,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Arc<[String]> {
        vec!["site".to_owned(), "device".to_owned()].into()
    }

    #[test]
    fn captured_segments_are_ranges_of_the_topic() {
        let topic = "sensors/plant-1/dev-7/telemetry";
        let origin = Origin::new(names(), 1, topic, &[&topic[8..15], &topic[16..21]]);
        assert_eq!(origin.topic(), topic);
        assert_eq!(origin.device(), "dev-7");
        assert_eq!(origin.segments().collect::<Vec<_>>(), ["plant-1", "dev-7"]);
        assert_eq!(origin.labels().collect::<Vec<_>>(), [("site", "plant-1")]);
        // Spans of 4 bytes each for the topic and two segments, then the topic alone.
        assert_eq!(origin.0.slice.len(), 3 * 4 + topic.len());
    }

    #[test]
    fn other_segment_values_are_kept_after_the_topic() {
        let origin = Origin::new(names(), 1, "sensors/+/d1/telemetry", &["ü-site", "d1"]);
        assert_eq!(origin.topic(), "sensors/+/d1/telemetry");
        assert_eq!(origin.segment(0), Some("ü-site"));
        assert_eq!(origin.device(), "d1");
        assert_eq!(origin.segment(2), None);
    }

    #[test]
    fn topics_longer_than_a_u16_reaches_keep_wide_spans() {
        let topic = format!("{}/é/dev-1", "x".repeat(70_000));
        let segments = [&topic[70_001..70_003], &topic[70_004..]];
        let origin = Origin::new(names(), 1, &topic, &segments);
        assert_eq!(origin.topic(), topic);
        assert_eq!(origin.segments().collect::<Vec<_>>(), ["é", "dev-1"]);
        assert_eq!(origin.device(), "dev-1");
    }

    #[test]
    fn equal_origins_compare_equal_and_clones_share_one_allocation() {
        let a = Origin::new(names(), 1, "s/d", &["s", "d"]);
        let b = Origin::new(names(), 1, "s/d", &["s", "d"]);
        assert_eq!(a, b);
        assert!(!Origin::ptr_eq(&a, &b));
        assert!(Origin::ptr_eq(&a, &a.clone()));
        assert_ne!(a, Origin::new(names(), 0, "s/d", &["s", "d"]));
    }
}
