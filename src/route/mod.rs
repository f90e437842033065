//! Routing: a derived event becomes an MQTT message: its topic from the rule's template, its
//! payload in schema v1 (JSON or CBOR, same fields).

mod encode;
mod json;

pub use encode::{encode, EventView};

use crate::config::Format;
use crate::event::DerivedEvent;
use crate::topic::TopicTemplate;
use std::time::Instant;

/// Where and how a rule's events are published.
#[derive(Debug, Clone)]
pub struct Route {
    pub template: TopicTemplate,
    pub qos: rumqttc::QoS,
    pub retain: bool,
    pub format: Format,
}

/// A message ready for the sink.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: rumqttc::QoS,
    pub retain: bool,
    /// Rule index, for per-rule publish metrics; `None` for dead letters.
    pub rule_index: Option<usize>,
    /// Arrival of the causing reading, for the latency histogram.
    pub arrival: Option<Instant>,
    /// Event time of the event, ms since the epoch.
    pub ts: i64,
}

impl Route {
    /// Renders the topic and encodes the payload of one event.
    pub fn apply(&self, event: &DerivedEvent) -> Outgoing {
        let mut topic = String::with_capacity(64);
        self.template
            .render_into(&event.origin.segments, &event.rule, &mut topic);
        Outgoing {
            topic,
            payload: encode(event, self.format),
            qos: self.qos,
            retain: self.retain,
            rule_index: Some(event.rule_index),
            arrival: event.arrival,
            ts: event.ts,
        }
    }
}
