//! Routing: a derived event becomes an MQTT message: its topic from the rule's template, its
//! payload in schema v1 (JSON or CBOR, same fields), and its headers (content type,
//! event id, and the event's span in the trace of the reading that caused it).

mod encode;
mod json;

pub use encode::{encode, EventView};

use crate::config::topic::TopicTemplate;
use crate::config::Format;
use crate::model::event::DerivedEvent;
pub use crate::model::message::Outgoing;
use crate::model::message::{ContentType, Headers};

/// Where and how a rule's events are published.
#[derive(Debug, Clone)]
pub struct Route {
    pub template: TopicTemplate,
    /// The sink must confirm delivery (MQTT: QoS 1); the event stays in the outbox until then.
    pub confirm: bool,
    pub retain: bool,
    pub format: Format,
    /// Index of the sink in `Plan::sinks`.
    pub sink: usize,
    /// The table its rows go to, for a postgres sink.
    pub table: std::sync::Arc<str>,
}

impl Route {
    /// The MQTT 5 content type of the rule's payloads.
    pub fn content_type(&self) -> ContentType {
        match self.format {
            Format::Cbor => ContentType::Cbor,
            _ => ContentType::Json,
        }
    }

    /// Renders the topic and encodes the payload of one event. An event whose reading carried a
    /// trace context gets its own span in that trace.
    pub fn apply(&self, event: &DerivedEvent) -> Outgoing {
        let mut topic = String::with_capacity(64);
        self.template
            .render_with(|i| event.origin.segment(i), &event.rule, &mut topic);
        Outgoing {
            topic,
            payload: encode(event, self.format),
            confirm: self.confirm,
            retain: self.retain,
            sink: self.sink,
            table: Some(self.table.clone()),
            rule: Some(event.rule.clone()),
            arrival: event.arrival,
            ts: event.ts,
            headers: Headers {
                id: Some(event.id),
                content_type: self.content_type(),
                trace: event
                    .cause
                    .as_ref()
                    .and_then(|cause| cause.trace.as_deref())
                    .map(|trace| Box::new(trace.child())),
            },
        }
    }
}
