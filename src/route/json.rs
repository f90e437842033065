//! Schema v1 as JSON, written directly into the payload buffer: the hot path of routing.
//!
//! Through serde, an event cost about 7,000 instructions, most of them serde_json writing each
//! key and string in fragments between the bytes it might escape. Here the keys are byte
//! literals, a string that needs no escape is copied whole, and numbers go through serde_json's
//! own formatter, so the bytes are exactly what `serde_json::to_writer(EventView)` writes.
//! `EventView` (encode.rs) stays the reference and the CBOR encoding; the test
//! `writes_what_serde_json_writes_for_every_kind` compares the two, so a field added to one and
//! not the other fails it.

use crate::config::Aggregate;
use crate::decode::DiscreteValue;
use crate::model::event::{DerivedEvent, EventBody, WindowMetric, SCHEMA_VERSION};
use serde_json::ser::{CompactFormatter, Formatter};

/// Appends `event` as JSON to `out`.
pub fn write_event(event: &DerivedEvent, out: &mut Vec<u8>) {
    let mut w = Writer { out };
    w.raw(b"{\"v\":");
    w.u64(u64::from(SCHEMA_VERSION));
    w.raw(b",\"id\":\"");
    w.raw(&event.id.hex());
    w.raw(b"\",\"kind\":");
    w.string(event.body.kind());
    w.raw(b",\"rule\":");
    w.string(&event.rule);
    w.raw(b",\"device\":");
    w.string(event.origin.device());
    w.raw(b",\"labels\":{");
    for (i, (name, value)) in event.origin.labels().enumerate() {
        if i > 0 {
            w.raw(b",");
        }
        w.string(name);
        w.raw(b":");
        w.string(value);
    }
    w.raw(b"},\"ts\":");
    w.i64(event.ts);
    w.body(&event.body);
    if let Some(cause) = &event.cause {
        w.raw(b",\"cause\":{\"topic\":");
        w.string(cause.topic());
        w.raw(b",\"ts\":");
        w.i64(cause.ts);
        if let Some(seq) = cause.seq {
            w.raw(b",\"seq\":");
            w.u64(seq);
        }
        if let Some(trace) = &cause.trace {
            w.raw(b",\"trace_id\":");
            w.string(&trace.trace_id_hex());
        }
        w.raw(b"}");
    }
    w.raw(b"}");
}

/// Bytes a JSON string cannot hold as they are: control bytes, `"` and `\`.
static ESCAPE: [bool; 256] = {
    let mut table = [false; 256];
    let mut byte = 0;
    while byte < 0x20 {
        table[byte] = true;
        byte += 1;
    }
    table[b'"' as usize] = true;
    table[b'\\' as usize] = true;
    table
};

struct Writer<'a> {
    out: &'a mut Vec<u8>,
}

impl Writer<'_> {
    #[inline]
    fn raw(&mut self, bytes: &[u8]) {
        self.out.extend_from_slice(bytes);
    }

    /// `,"key":` for a key that needs no escape (every key of the schema).
    #[inline]
    fn key(&mut self, key: &str) {
        self.out.reserve(key.len() + 4);
        self.out.extend_from_slice(b",\"");
        self.out.extend_from_slice(key.as_bytes());
        self.out.extend_from_slice(b"\":");
    }

    /// A JSON string, escaped as serde_json escapes it.
    #[inline]
    fn string(&mut self, value: &str) {
        let bytes = value.as_bytes();
        if bytes.iter().any(|&byte| ESCAPE[usize::from(byte)]) {
            return self.escaped(bytes);
        }
        self.out.reserve(bytes.len() + 2);
        self.out.push(b'"');
        self.out.extend_from_slice(bytes);
        self.out.push(b'"');
    }

    /// serde_json's escapes: the short forms for `\b \t \n \f \r`, `\u00XX` for other control
    /// bytes, a backslash before `"` and `\`.
    #[cold]
    fn escaped(&mut self, bytes: &[u8]) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        self.out.push(b'"');
        let mut start = 0;
        for (i, &byte) in bytes.iter().enumerate() {
            let short = match byte {
                b'"' => b'"',
                b'\\' => b'\\',
                0x08 => b'b',
                b'\t' => b't',
                b'\n' => b'n',
                0x0c => b'f',
                b'\r' => b'r',
                0x00..=0x1f => b'u',
                _ => continue,
            };
            self.out.extend_from_slice(&bytes[start..i]);
            if short == b'u' {
                self.out.extend_from_slice(b"\\u00");
                self.out.push(HEX[usize::from(byte >> 4)]);
                self.out.push(HEX[usize::from(byte & 0xf)]);
            } else {
                self.out.extend_from_slice(&[b'\\', short]);
            }
            start = i + 1;
        }
        self.out.extend_from_slice(&bytes[start..]);
        self.out.push(b'"');
    }

    // Writing into a Vec cannot fail; serde_json's formatter writes numbers as serde_json does.
    fn i64(&mut self, value: i64) {
        let _ = CompactFormatter.write_i64(self.out, value);
    }

    fn u64(&mut self, value: u64) {
        let _ = CompactFormatter.write_u64(self.out, value);
    }

    /// A number, or `null` for NaN and the infinities, as serde_json writes an f64.
    fn f64(&mut self, value: f64) {
        if value.is_finite() {
            let _ = CompactFormatter.write_f64(self.out, value);
        } else {
            self.raw(b"null");
        }
    }

    fn discrete(&mut self, value: &DiscreteValue) {
        match value {
            DiscreteValue::Bool(b) => self.raw(if *b { b"true" } else { b"false" }),
            DiscreteValue::Int(i) => self.i64(*i),
            DiscreteValue::Text(text) => self.string(text),
        }
    }

    fn str_field(&mut self, key: &str, value: &str) {
        self.key(key);
        self.string(value);
    }

    fn f64_field(&mut self, key: &str, value: f64) {
        self.key(key);
        self.f64(value);
    }

    fn i64_field(&mut self, key: &str, value: i64) {
        self.key(key);
        self.i64(value);
    }

    /// The kind-specific fields, in `EventView`'s order.
    fn body(&mut self, body: &EventBody) {
        match body {
            EventBody::StateChange {
                metric,
                from,
                to,
                value,
            } => {
                self.str_field("metric", metric);
                self.str_field("from", from);
                self.str_field("to", to);
                self.f64_field("value", *value);
            }
            EventBody::Window {
                start,
                end,
                metrics,
                aggregates,
                closed_by,
                update,
            } => {
                self.i64_field("start", *start);
                self.i64_field("end", *end);
                self.key("metrics");
                self.window_metrics(metrics, aggregates);
                if let Some(label) = closed_by.label() {
                    self.raw(b",\"partial\":true");
                    self.str_field("closed_by", label);
                }
                if *update > 0 {
                    self.key("update");
                    self.u64(u64::from(*update));
                }
            }
            EventBody::Late {
                reason,
                watermark,
                values,
            } => {
                self.str_field("reason", reason);
                if let Some(watermark) = watermark {
                    self.i64_field("watermark", *watermark);
                }
                self.key("values");
                self.raw(b"{");
                for (i, (name, value)) in values.iter().enumerate() {
                    if i > 0 {
                        self.raw(b",");
                    }
                    self.string(name);
                    self.raw(b":");
                    self.f64(*value);
                }
                self.raw(b"}");
            }
            EventBody::Report {
                metric,
                value,
                previous,
                reason,
            } => {
                self.str_field("metric", metric);
                self.f64_field("value", *value);
                if let Some(previous) = previous {
                    self.f64_field("previous", *previous);
                }
                self.str_field("reason", reason);
            }
            EventBody::Change { field, from, to } => {
                self.str_field("field", field);
                if let Some(from) = from {
                    self.key("from");
                    self.discrete(from);
                }
                self.key("to");
                self.discrete(to);
            }
            EventBody::Liveness {
                from,
                to,
                reason,
                last_seen,
            } => {
                self.str_field("from", from);
                self.str_field("to", to);
                self.str_field("reason", reason);
                if let Some(last_seen) = last_seen {
                    self.i64_field("last_seen", *last_seen);
                }
            }
            EventBody::RateOfChange {
                metric,
                from,
                to,
                value,
                rate_per_s,
                over_ms,
            } => {
                self.str_field("metric", metric);
                self.str_field("from", from);
                self.str_field("to", to);
                self.f64_field("value", *value);
                self.f64_field("rate_per_s", *rate_per_s);
                self.i64_field("over_ms", *over_ms);
            }
            EventBody::Stuck {
                metric,
                from,
                to,
                value,
                since,
            } => {
                self.str_field("metric", metric);
                self.str_field("from", from);
                self.str_field("to", to);
                self.f64_field("value", *value);
                self.i64_field("since", *since);
            }
            EventBody::Anomaly {
                metric,
                value,
                mean,
                stddev,
                z,
            } => {
                self.str_field("metric", metric);
                self.f64_field("value", *value);
                self.f64_field("mean", *mean);
                self.f64_field("stddev", *stddev);
                self.f64_field("z", *z);
            }
            EventBody::Flapping {
                metric,
                from,
                to,
                state,
                changes,
            } => {
                self.str_field("metric", metric);
                self.str_field("from", from);
                self.str_field("to", to);
                self.str_field("state", state);
                self.key("changes");
                self.u64(u64::from(*changes));
            }
        }
    }

    /// `{"metric":{"count":n,"avg":x,...},...}` with the rule's aggregates in its order.
    fn window_metrics(&mut self, metrics: &[WindowMetric], aggregates: &[Aggregate]) {
        self.raw(b"{");
        for (i, metric) in metrics.iter().enumerate() {
            if i > 0 {
                self.raw(b",");
            }
            self.string(&metric.name);
            self.raw(b":{");
            for (j, &aggregate) in aggregates.iter().enumerate() {
                if j > 0 {
                    self.raw(b",");
                }
                self.string(aggregate.name());
                self.raw(b":");
                if aggregate == Aggregate::Count {
                    self.u64(metric.count);
                } else {
                    self.f64(metric.aggregate(aggregate));
                }
            }
            self.raw(b"}");
        }
        self.raw(b"}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::Origin;
    use crate::model::event::{Cause, EventId, WindowClose};
    use crate::route::EventView;
    use proptest::prelude::*;
    use std::sync::Arc;

    fn origin(site: &str, device: &str) -> Origin {
        Origin::new(
            vec!["site".to_owned(), "device".to_owned(), "line".to_owned()].into(),
            1,
            &format!("sensors/{site}/{device}/telemetry"),
            &[site, device, "l\\1"],
        )
    }

    /// An origin that is only a topic, for a cause.
    fn on_topic(topic: &str) -> Origin {
        Origin::new(Vec::new().into(), 0, topic, &[] as &[&str])
    }

    fn event(body: EventBody, cause: Option<Cause>, rule: &str, origin: Origin) -> DerivedEvent {
        DerivedEvent {
            id: EventId(0x0123_4567_89ab_cdef),
            rule_index: 0,
            rule: rule.into(),
            origin,
            ts: -1_732_600_000_000,
            body,
            cause,
            arrival: None,
        }
    }

    fn metric(name: &str, value: f64) -> WindowMetric {
        WindowMetric {
            name: name.into(),
            count: 3,
            sum: value * 3.0,
            min: value - 1.0,
            max: value + 1.0,
            avg: value,
            stddev: f64::NAN,
            first: 0.1,
            last: 1e21,
            rate: f64::INFINITY,
            percentiles: [1.5, f64::NAN, 2.5, -0.0],
        }
    }

    /// One event of every kind, with optional fields both present and absent.
    fn every_kind() -> Vec<DerivedEvent> {
        // With a sequence number the cause also carries a trace, so both shapes are covered.
        let cause = |seq: Option<u64>| {
            Some(Cause {
                origin: on_topic("sensors/s\"1/d\n1/telemetry"),
                ts: 17,
                seq,
                trace: seq.and_then(|_| {
                    crate::model::trace::TraceContext::parse(
                        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                        None,
                    )
                    .map(Arc::new)
                }),
            })
        };
        let arc = |s: &str| -> Arc<str> { s.into() };
        let bodies = vec![
            EventBody::StateChange {
                metric: arc("temperature"),
                from: arc("normal"),
                to: arc("hot"),
                value: 31.25,
            },
            EventBody::Window {
                start: 0,
                end: 10_000,
                metrics: vec![metric("temperature", 26.5), metric("hum\tidity", f64::NAN)],
                aggregates: Aggregate::ALL.to_vec().into(),
                closed_by: WindowClose::IdleTimeout,
                update: 2,
            },
            EventBody::Window {
                start: 0,
                end: 10_000,
                metrics: Vec::new(),
                aggregates: vec![Aggregate::Count, Aggregate::Avg].into(),
                closed_by: WindowClose::Watermark,
                update: 0,
            },
            EventBody::Late {
                reason: "late",
                watermark: Some(5),
                values: vec![(arc("temperature"), 1.0), (arc("humidity"), f64::NAN)],
            },
            EventBody::Late {
                reason: "future",
                watermark: None,
                values: Vec::new(),
            },
            EventBody::Report {
                metric: arc("temperature"),
                value: 0.1 + 0.2,
                previous: Some(-5e-324),
                reason: "deadband",
            },
            EventBody::Report {
                metric: arc("temperature"),
                value: 1.0,
                previous: None,
                reason: "first",
            },
            EventBody::Change {
                field: arc("door"),
                from: Some(DiscreteValue::Bool(false)),
                to: DiscreteValue::Text("half \u{1} open \u{7f} é".into()),
            },
            EventBody::Change {
                field: arc("mode"),
                from: None,
                to: DiscreteValue::Int(-42),
            },
            EventBody::Liveness {
                from: "online",
                to: "offline",
                reason: "timeout",
                last_seen: Some(99),
            },
            EventBody::Liveness {
                from: "offline",
                to: "online",
                reason: "reading",
                last_seen: None,
            },
            EventBody::RateOfChange {
                metric: arc("pressure"),
                from: "normal",
                to: "exceeded",
                value: 2.5,
                rate_per_s: -0.125,
                over_ms: 4000,
            },
            EventBody::Stuck {
                metric: arc("flow"),
                from: "moving",
                to: "stuck",
                value: 0.0,
                since: 123,
            },
            EventBody::Anomaly {
                metric: arc("vibration"),
                value: 9.5,
                mean: 1.0,
                stddev: 0.5,
                z: 17.0,
            },
            EventBody::Flapping {
                metric: arc("temperature"),
                from: "settled",
                to: "flapping",
                state: arc("hot"),
                changes: 4,
            },
        ];
        bodies
            .into_iter()
            .enumerate()
            .map(|(i, body)| {
                let cause = match i % 3 {
                    0 => cause(Some(7)),
                    1 => cause(None),
                    _ => None,
                };
                event(body, cause, "over\"heat", origin("s\u{1f}1", "d\n1"))
            })
            .collect()
    }

    fn assert_same_as_serde(event: &DerivedEvent) {
        let mut fast = Vec::new();
        write_event(event, &mut fast);
        let reference = serde_json::to_vec(&EventView(event)).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&fast),
            String::from_utf8_lossy(&reference)
        );
    }

    #[test]
    fn writes_what_serde_json_writes_for_every_kind() {
        for event in every_kind() {
            assert_same_as_serde(&event);
        }
    }

    #[test]
    fn writes_an_origin_without_labels_as_an_empty_object() {
        let topic = "d1";
        let origin = Origin::new(vec!["device".to_owned()].into(), 0, topic, &[topic]);
        let mut event = every_kind().remove(0);
        event.origin = origin;
        assert_same_as_serde(&event);
    }

    proptest! {
        #[test]
        fn writes_any_text_and_number_as_serde_json_does(
            text in "\\PC{0,16}|[\\x00-\\x7f]{0,16}",
            value in any::<f64>(),
            ts in any::<i64>(),
            seq in any::<u64>(),
        ) {
            let body = EventBody::StateChange {
                metric: text.as_str().into(),
                from: "normal".into(),
                to: text.as_str().into(),
                value,
            };
            let cause = Some(Cause { origin: on_topic(&text), ts, seq: Some(seq), trace: None });
            let mut event = event(body, cause, &text, origin(&text, &text));
            event.ts = ts;
            assert_same_as_serde(&event);
        }
    }
}
