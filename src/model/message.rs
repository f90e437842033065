//! The messages that flow: a raw message on its way in, an encoded event on its way out.

use crate::model::event::EventId;
use crate::model::trace::TraceContext;
use bytes::Bytes;
use std::sync::Arc;
use std::time::Instant;

/// A message as it left its source, stamped on arrival and matched to an input by intake.
#[derive(Debug, Clone)]
pub struct RawMessage {
    pub input: usize,
    pub topic: String,
    pub payload: Bytes,
    pub arrival: Instant,
    /// Arrival as wall-clock ms since the epoch: the event time when the payload has none.
    pub arrival_ms: i64,
    /// Position in receive order (the input log's sequence number).
    pub lsn: u64,
    /// The W3C trace context it carried (MQTT 5), shared with the causes of its events; an
    /// untraced message pays one null pointer.
    pub trace: Option<Arc<TraceContext>>,
}

/// A derived event (or a dead letter) encoded for a sink: its routing key (the topic), payload
/// and headers.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub topic: String,
    pub payload: Vec<u8>,
    /// Kept in the outbox until the sink confirms delivery (MQTT: QoS 1), or handed over once
    /// (QoS 0).
    pub confirm: bool,
    pub retain: bool,
    /// The sink it goes to: an index into the plan's sinks, 0 for the broker.
    pub sink: usize,
    /// The table its row goes to (postgres sinks); the rule's name unless the output names one.
    pub table: Option<Arc<str>>,
    /// The rule that derived it, for per-rule publish metrics; `None` for dead letters. A name,
    /// not an index: a hot reload renumbers the rules while their events are still queued.
    pub rule: Option<Arc<str>>,
    /// Arrival of the causing reading, for the latency histogram.
    pub arrival: Option<Instant>,
    /// Event time of the event, ms since the epoch.
    pub ts: i64,
    pub headers: Headers,
}

/// What an event carries besides its payload, for sinks that have headers (MQTT 5 properties,
/// AMQP and HTTP headers). MQTT 3.1.1 has none, so there it is dropped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers {
    /// The event id (MQTT 5: correlation data, its 16 hex digits); `None` for dead letters.
    pub id: Option<EventId>,
    pub content_type: ContentType,
    /// The event's own span in the trace of the reading that caused it; sent as `traceparent`
    /// (and `tracestate`) user properties.
    pub trace: Option<Box<TraceContext>>,
}

/// The payload's MIME type.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ContentType {
    #[default]
    Json,
    Cbor,
}

impl ContentType {
    pub fn mime(self) -> &'static str {
        match self {
            ContentType::Json => "application/json",
            ContentType::Cbor => "application/cbor",
        }
    }
}
