//! Schema v1 encoding. One `Serialize` impl serves CBOR and is the reference for JSON, which
//! `json.rs` writes directly for speed (a test holds the two to the same bytes).

use crate::config::Format;
use crate::model::event::{DerivedEvent, EventBody, SCHEMA_VERSION};
use serde::ser::{Serialize, SerializeMap, Serializer};

/// Encodes an event in `format`.
pub fn encode(event: &DerivedEvent, format: Format) -> Vec<u8> {
    let view = EventView(event);
    match format {
        // Serializing plain maps, strings and numbers into a Vec cannot fail.
        // Text and SenML are for inputs only (validation refuses them for outputs); JSON if one
        // ever gets here.
        Format::Json | Format::Text | Format::Senml | Format::SenmlCbor => {
            // Sized for a state change or a two-metric window, so encoding does not regrow.
            // Written directly, as serde_json would write `view` (see json.rs).
            let mut out = Vec::with_capacity(384);
            super::json::write_event(event, &mut out);
            out
        }
        Format::Cbor => {
            let mut out = Vec::with_capacity(384);
            let _ = ciborium::into_writer(&view, &mut out);
            out
        }
    }
}

/// Serializes a [`DerivedEvent`] as schema v1.
pub struct EventView<'a>(pub &'a DerivedEvent);

struct Labels<'a>(&'a DerivedEvent);

impl Serialize for Labels<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        for (name, value) in self.0.origin.labels() {
            map.serialize_entry(name, value)?;
        }
        map.end()
    }
}

struct CauseView<'a>(&'a crate::model::event::Cause);

impl Serialize for CauseView<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let cause = self.0;
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("topic", cause.topic())?;
        map.serialize_entry("ts", &cause.ts)?;
        if let Some(seq) = cause.seq {
            map.serialize_entry("seq", &seq)?;
        }
        if let Some(trace) = &cause.trace {
            map.serialize_entry("trace_id", &trace.trace_id_hex())?;
        }
        map.end()
    }
}

struct WindowMetrics<'a>(
    &'a [crate::model::event::WindowMetric],
    &'a [crate::config::Aggregate],
);

impl Serialize for WindowMetrics<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for metric in self.0 {
            map.serialize_entry(&*metric.name, &Aggregates(metric, self.1))?;
        }
        map.end()
    }
}

struct LateValues<'a>(&'a [(std::sync::Arc<str>, f64)]);

impl Serialize for LateValues<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (name, value) in self.0 {
            map.serialize_entry(&**name, value)?;
        }
        map.end()
    }
}

struct Aggregates<'a>(
    &'a crate::model::event::WindowMetric,
    &'a [crate::config::Aggregate],
);

impl Serialize for Aggregates<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use crate::config::Aggregate;
        let mut map = serializer.serialize_map(Some(self.1.len()))?;
        for &aggregate in self.1 {
            if aggregate == Aggregate::Count {
                map.serialize_entry("count", &self.0.count)?;
            } else {
                // Undefined values (NaN) are null in JSON and CBOR alike.
                let value = self.0.aggregate(aggregate);
                map.serialize_entry(aggregate.name(), &value.is_finite().then_some(value))?;
            }
        }
        map.end()
    }
}

impl Serialize for EventView<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let event = self.0;
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("v", &SCHEMA_VERSION)?;
        let id = event.id.hex();
        map.serialize_entry("id", std::str::from_utf8(&id).unwrap_or_default())?;
        map.serialize_entry("kind", event.body.kind())?;
        map.serialize_entry("rule", &*event.rule)?;
        map.serialize_entry("device", event.origin.device())?;
        map.serialize_entry("labels", &Labels(event))?;
        map.serialize_entry("ts", &event.ts)?;
        match &event.body {
            EventBody::StateChange {
                metric,
                from,
                to,
                value,
            } => {
                map.serialize_entry("metric", &**metric)?;
                map.serialize_entry("from", &**from)?;
                map.serialize_entry("to", &**to)?;
                map.serialize_entry("value", value)?;
            }
            EventBody::Window {
                start,
                end,
                metrics,
                aggregates,
                closed_by,
                update,
            } => {
                map.serialize_entry("start", start)?;
                map.serialize_entry("end", end)?;
                map.serialize_entry("metrics", &WindowMetrics(metrics, aggregates))?;
                if let Some(label) = closed_by.label() {
                    map.serialize_entry("partial", &true)?;
                    map.serialize_entry("closed_by", label)?;
                }
                if *update > 0 {
                    map.serialize_entry("update", update)?;
                }
            }
            EventBody::Late {
                reason,
                watermark,
                values,
            } => {
                map.serialize_entry("reason", reason)?;
                if let Some(watermark) = watermark {
                    map.serialize_entry("watermark", watermark)?;
                }
                map.serialize_entry("values", &LateValues(values))?;
            }
            EventBody::Report {
                metric,
                value,
                previous,
                reason,
            } => {
                map.serialize_entry("metric", &**metric)?;
                map.serialize_entry("value", value)?;
                if let Some(previous) = previous {
                    map.serialize_entry("previous", previous)?;
                }
                map.serialize_entry("reason", reason)?;
            }
            EventBody::Change { field, from, to } => {
                map.serialize_entry("field", &**field)?;
                if let Some(from) = from {
                    map.serialize_entry("from", from)?;
                }
                map.serialize_entry("to", to)?;
            }
            EventBody::Liveness {
                from,
                to,
                reason,
                last_seen,
            } => {
                map.serialize_entry("from", from)?;
                map.serialize_entry("to", to)?;
                map.serialize_entry("reason", reason)?;
                if let Some(last_seen) = last_seen {
                    map.serialize_entry("last_seen", last_seen)?;
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
                map.serialize_entry("metric", &**metric)?;
                map.serialize_entry("from", from)?;
                map.serialize_entry("to", to)?;
                map.serialize_entry("value", value)?;
                map.serialize_entry("rate_per_s", rate_per_s)?;
                map.serialize_entry("over_ms", over_ms)?;
            }
            EventBody::Stuck {
                metric,
                from,
                to,
                value,
                since,
            } => {
                map.serialize_entry("metric", &**metric)?;
                map.serialize_entry("from", from)?;
                map.serialize_entry("to", to)?;
                map.serialize_entry("value", value)?;
                map.serialize_entry("since", since)?;
            }
            EventBody::Anomaly {
                metric,
                value,
                mean,
                stddev,
                z,
            } => {
                map.serialize_entry("metric", &**metric)?;
                map.serialize_entry("value", value)?;
                map.serialize_entry("mean", mean)?;
                map.serialize_entry("stddev", stddev)?;
                map.serialize_entry("z", z)?;
            }
            EventBody::Flapping {
                metric,
                from,
                to,
                state,
                changes,
            } => {
                map.serialize_entry("metric", &**metric)?;
                map.serialize_entry("from", from)?;
                map.serialize_entry("to", to)?;
                map.serialize_entry("state", &**state)?;
                map.serialize_entry("changes", changes)?;
            }
        }
        if let Some(cause) = &event.cause {
            map.serialize_entry("cause", &CauseView(cause))?;
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::event::{Cause, EventId};
    use crate::operators::test_support::origin;

    fn state_change() -> DerivedEvent {
        let origin = origin("d1");
        DerivedEvent {
            id: EventId(0xabc),
            rule_index: 0,
            rule: "overheat".into(),
            ts: 1_732_600_000_000,
            body: EventBody::StateChange {
                metric: "temperature".into(),
                from: "normal".into(),
                to: "hot".into(),
                value: 31.0,
            },
            cause: Some(Cause {
                origin: origin.clone(),
                ts: 1_732_600_000_000,
                seq: Some(17),
                trace: None,
            }),
            origin,
            arrival: None,
        }
    }

    #[test]
    fn json_carries_schema_v1_fields() {
        let json: serde_json::Value =
            serde_json::from_slice(&encode(&state_change(), Format::Json)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "v": 1, "id": "0000000000000abc", "kind": "state_change", "rule": "overheat",
                "device": "d1", "labels": {"site": "s1"}, "ts": 1_732_600_000_000_i64,
                "metric": "temperature", "from": "normal", "to": "hot", "value": 31.0,
                "cause": {"topic": "sensors/s1/d1/telemetry", "ts": 1_732_600_000_000_i64, "seq": 17}
            })
        );
    }

    #[test]
    fn the_cause_names_the_readings_trace_id_only_when_it_had_one() {
        let mut event = state_change();
        let trace = crate::model::trace::TraceContext::parse(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            None,
        )
        .map(std::sync::Arc::new);
        if let Some(cause) = &mut event.cause {
            cause.trace = trace;
        }
        for format in [Format::Json, Format::Cbor] {
            let bytes = encode(&event, format);
            let json: serde_json::Value = match format {
                Format::Cbor => ciborium::from_reader(bytes.as_slice()).unwrap(),
                _ => serde_json::from_slice(&bytes).unwrap(),
            };
            assert_eq!(
                json["cause"]["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736",
                "{format:?}"
            );
        }
        let untraced: serde_json::Value =
            serde_json::from_slice(&encode(&state_change(), Format::Json)).unwrap();
        assert!(untraced["cause"].get("trace_id").is_none());
    }

    #[test]
    fn cbor_carries_the_same_fields_as_json() {
        let event = state_change();
        let from_cbor: serde_json::Value =
            ciborium::from_reader(encode(&event, Format::Cbor).as_slice()).unwrap();
        let from_json: serde_json::Value =
            serde_json::from_slice(&encode(&event, Format::Json)).unwrap();
        assert_eq!(from_cbor, from_json);
    }
}
