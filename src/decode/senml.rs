//! SenML packs (RFC 8428), JSON and CBOR: one payload carries a list of records, and records at
//! the same resolved time form one reading. Base fields (`bn`, `bt`, `bv`) carry forward to the
//! records after them, as the RFC resolves them.
//!
//! Fields are matched by each record's own name `n` (the base name is not part of it: the device
//! comes from the topic, as for other inputs). `v` is a number, `vs` a string, `vb` a boolean.
//! Times are seconds: `bt + t`; a resolved time below 2^28 is relative to now (the arrival).

use super::{DecodeError, Decoded, FieldPlan, FieldSink, FieldValue};
use serde_json::Value;

/// Resolved times below this (about 8.5 years of seconds) are relative to now (RFC 8428, 4.5.3).
const RELATIVE_LIMIT_S: f64 = 268_435_456.0;

/// One record with its base values resolved.
#[derive(Debug, Clone, PartialEq)]
struct Record {
    name: String,
    time_ms: i64,
    value: RecordValue,
}

#[derive(Debug, Clone, PartialEq)]
enum RecordValue {
    Number(f64),
    Text(String),
    Bool(bool),
    None,
}

/// A record's fields, whatever the encoding.
#[derive(Default)]
struct Raw {
    bn: Option<String>,
    bt: Option<f64>,
    bv: Option<f64>,
    n: Option<String>,
    v: Option<f64>,
    vs: Option<String>,
    vb: Option<bool>,
    t: Option<f64>,
}

fn raw_from_json(record: &Value) -> Result<Raw, DecodeError> {
    let object = record.as_object().ok_or(DecodeError::NotAnObject)?;
    let number = |key: &str| -> Result<Option<f64>, DecodeError> {
        match object.get(key) {
            None => Ok(None),
            Some(value) => value.as_f64().map(Some).ok_or(DecodeError::Malformed),
        }
    };
    let text = |key: &str| -> Result<Option<String>, DecodeError> {
        match object.get(key) {
            None => Ok(None),
            Some(value) => value
                .as_str()
                .map(|s| Some(s.to_owned()))
                .ok_or(DecodeError::Malformed),
        }
    };
    Ok(Raw {
        bn: text("bn")?,
        bt: number("bt")?,
        bv: number("bv")?,
        n: text("n")?,
        v: number("v")?,
        vs: text("vs")?,
        vb: match object.get("vb") {
            None => None,
            Some(value) => Some(value.as_bool().ok_or(DecodeError::Malformed)?),
        },
        t: number("t")?,
    })
}

fn raw_from_cbor(record: &ciborium::Value) -> Result<Raw, DecodeError> {
    let entries = record.as_map().ok_or(DecodeError::NotAnObject)?;
    let mut raw = Raw::default();
    for (label, value) in entries {
        // The RFC's integer labels; text labels are accepted too.
        let label: i128 = match label {
            ciborium::Value::Integer(i) => i128::from(*i),
            ciborium::Value::Text(t) => match t.as_str() {
                "bn" => -2,
                "bt" => -3,
                "bv" => -5,
                "n" => 0,
                "v" => 2,
                "vs" => 3,
                "vb" => 4,
                "t" => 6,
                _ => continue,
            },
            _ => continue,
        };
        let number = || -> Result<f64, DecodeError> {
            match value {
                ciborium::Value::Float(f) => Ok(*f),
                ciborium::Value::Integer(i) => Ok(i128::from(*i) as f64),
                _ => Err(DecodeError::Malformed),
            }
        };
        let text = || {
            value
                .as_text()
                .map(str::to_owned)
                .ok_or(DecodeError::Malformed)
        };
        match label {
            -2 => raw.bn = Some(text()?),
            -3 => raw.bt = Some(number()?),
            -5 => raw.bv = Some(number()?),
            0 => raw.n = Some(text()?),
            2 => raw.v = Some(number()?),
            3 => raw.vs = Some(text()?),
            4 => raw.vb = Some(value.as_bool().ok_or(DecodeError::Malformed)?),
            6 => raw.t = Some(number()?),
            _ => {}
        }
    }
    Ok(raw)
}

/// Resolves base fields over the pack, in order.
fn resolve(raws: Vec<Raw>, now_ms: i64) -> Result<Vec<Record>, DecodeError> {
    let (mut base_name, mut base_time, mut base_value) = (String::new(), 0.0, 0.0);
    let mut records = Vec::with_capacity(raws.len());
    for raw in raws {
        if let Some(bn) = raw.bn {
            base_name = bn;
        }
        if let Some(bt) = raw.bt {
            base_time = bt;
        }
        if let Some(bv) = raw.bv {
            base_value = bv;
        }
        let has_value = raw.v.is_some() || raw.vs.is_some() || raw.vb.is_some();
        let name = match raw.n {
            Some(n) => n,
            None if !base_name.is_empty() => base_name.clone(),
            // A record of base fields only sets them for the records after it.
            None if !has_value => continue,
            None => return Err(DecodeError::Malformed),
        };
        let seconds = base_time + raw.t.unwrap_or(0.0);
        let time_ms = if seconds.abs() < RELATIVE_LIMIT_S {
            now_ms.saturating_add((seconds * 1e3).round() as i64)
        } else {
            (seconds * 1e3).round() as i64
        };
        let value = match (raw.v, raw.vs, raw.vb) {
            (Some(v), _, _) => RecordValue::Number(base_value + v),
            (None, Some(s), _) => RecordValue::Text(s),
            (None, None, Some(b)) => RecordValue::Bool(b),
            (None, None, None) => RecordValue::None,
        };
        records.push(Record {
            name,
            time_ms,
            value,
        });
    }
    Ok(records)
}

/// Decodes a pack into one reading per distinct time, oldest first, reusing `out`'s buffers.
///
/// # Errors
/// As [`FieldPlan::decode`]: malformed packs, wrong types, none of the planned fields.
pub(super) fn decode_pack(
    plan: &FieldPlan,
    payload: &[u8],
    cbor: bool,
    now_ms: i64,
    out: &mut Vec<Decoded>,
) -> Result<usize, DecodeError> {
    let raws: Vec<Raw> = if cbor {
        let value: ciborium::Value =
            ciborium::from_reader(payload).map_err(|_| DecodeError::Malformed)?;
        value
            .as_array()
            .ok_or(DecodeError::NotAnObject)?
            .iter()
            .map(raw_from_cbor)
            .collect::<Result<_, _>>()?
    } else {
        let value: Value = serde_json::from_slice(payload).map_err(|_| DecodeError::Malformed)?;
        value
            .as_array()
            .ok_or(DecodeError::NotAnObject)?
            .iter()
            .map(raw_from_json)
            .collect::<Result<_, _>>()?
    };
    let mut records = resolve(raws, now_ms)?;
    records.sort_by_key(|r| r.time_ms);
    let mut readings = 0;
    let mut index = 0;
    while index < records.len() {
        let time_ms = records[index].time_ms;
        if out.len() <= readings {
            out.push(Decoded::for_plan(plan));
        }
        let decoded = &mut out[readings];
        decoded.clear();
        decoded.ts = Some(time_ms);
        let mut sink = FieldSink {
            plan,
            out: decoded,
            error: None,
        };
        while index < records.len() && records[index].time_ms == time_ms {
            let record = &records[index];
            if let Some(slot) = plan.resolve(record.name.as_bytes()) {
                let value = match &record.value {
                    RecordValue::Number(n) => FieldValue::Number(*n),
                    RecordValue::Text(s) => FieldValue::Text(s),
                    RecordValue::Bool(b) => FieldValue::Bool(*b),
                    RecordValue::None => FieldValue::Null,
                };
                if !sink.field(slot, value) {
                    return Err(sink.error.unwrap_or(DecodeError::Malformed));
                }
            }
            index += 1;
        }
        let planned = decoded.values.iter().any(Option::is_some) || decoded.has_discrete();
        if planned {
            readings += 1;
        }
    }
    if readings == 0 {
        return Err(DecodeError::NoMetrics);
    }
    Ok(readings)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Format;

    fn plan() -> FieldPlan {
        FieldPlan::of(
            Format::Senml,
            vec!["temperature".into(), "humidity".into()],
            None,
            None,
        )
        .with_discrete(vec!["door".into()])
    }

    #[test]
    fn records_at_one_time_form_one_reading_and_base_values_resolve() {
        let pack = serde_json::json!([
            {"bn": "urn:dev:mac:0024befffe804ff1:", "bt": 1.7326e9, "bv": 20.0, "n": "temperature", "v": 3.5},
            {"n": "humidity", "v": 20.0},
            {"n": "door", "vs": "open", "t": 10},
            {"n": "temperature", "v": 4.0, "t": 10}
        ]);
        let mut out = Vec::new();
        let readings =
            decode_pack(&plan(), pack.to_string().as_bytes(), false, 0, &mut out).unwrap();
        assert_eq!(readings, 2);
        assert_eq!(out[0].ts, Some(1_732_600_000_000));
        assert_eq!(out[0].values, vec![Some(23.5), Some(40.0)]);
        assert_eq!(out[1].ts, Some(1_732_600_010_000));
        assert_eq!(out[1].values, vec![Some(24.0), None]);
        assert!(out[1].has_discrete());
    }

    #[test]
    fn cbor_packs_use_the_rfc_integer_labels() {
        use ciborium::Value as V;
        let record = |pairs: Vec<(i64, V)>| {
            V::Map(
                pairs
                    .into_iter()
                    .map(|(k, v)| (V::Integer(k.into()), v))
                    .collect(),
            )
        };
        let pack = V::Array(vec![
            record(vec![
                (-3, V::Float(1.7326e9)),
                (0, V::Text("temperature".into())),
                (2, V::Float(21.5)),
            ]),
            record(vec![
                (0, V::Text("humidity".into())),
                (2, V::Integer(41.into())),
            ]),
        ]);
        let mut bytes = Vec::new();
        ciborium::into_writer(&pack, &mut bytes).unwrap();
        let mut out = Vec::new();
        assert_eq!(decode_pack(&plan(), &bytes, true, 0, &mut out), Ok(1));
        assert_eq!(out[0].values, vec![Some(21.5), Some(41.0)]);
    }

    #[test]
    fn relative_times_count_from_now() {
        let pack = serde_json::json!([{"n": "temperature", "v": 1.0, "t": -5}]);
        let mut out = Vec::new();
        decode_pack(
            &plan(),
            pack.to_string().as_bytes(),
            false,
            1_000_000,
            &mut out,
        )
        .unwrap();
        assert_eq!(out[0].ts, Some(995_000));
    }

    #[test]
    fn bad_packs_name_their_reason() {
        let mut out = Vec::new();
        let reason = |payload: &str, out: &mut Vec<Decoded>| {
            decode_pack(&plan(), payload.as_bytes(), false, 0, out)
                .unwrap_err()
                .reason()
        };
        assert_eq!(reason("{\"n\": 1}", &mut out), "not_an_object");
        assert_eq!(
            reason("[{\"n\": \"temperature\", \"v\": \"hot\"}]", &mut out),
            "malformed"
        );
        assert_eq!(
            reason("[{\"n\": \"pressure\", \"v\": 1}]", &mut out),
            "missing_field"
        );
        assert_eq!(reason("[1", &mut out), "malformed");
    }
}
