//! Payload decoding: bytes + topic -> [`Reading`]. Only the fields some rule needs are read; the
//! rest are skipped without allocating. Bad input yields a [`DecodeError`] with a reason label.

mod cbor;
mod flat_json;
mod json;
mod senml;

use crate::config::{Format, InputConfig, TimeUnit};
pub use crate::model::reading::{Discrete, DiscreteSlot, DiscreteValue, Origin, Reading};
use std::fmt;

/// A scalar payload value, borrowed from the payload where it is text.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FieldValue<'a> {
    Number(f64),
    Text(&'a str),
    Bool(bool),
    Null,
    /// An array or a map: never a valid metric, named in errors.
    Nested,
}

impl FieldValue<'_> {
    fn type_name(&self) -> &'static str {
        match self {
            FieldValue::Number(_) => "a number",
            FieldValue::Text(_) => "a string",
            FieldValue::Bool(_) => "a boolean",
            FieldValue::Null => "null",
            FieldValue::Nested => "an array or object",
        }
    }
}

/// Why a payload could not become a reading. Cheap to build: it is on the hot path when a device
/// floods garbage. The field, where there is one, is an index into the input's [`FieldPlan`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// Not valid JSON / CBOR at all, or trailing bytes after the value.
    Malformed,
    /// Valid, but the top level is not an object / map.
    NotAnObject,
    /// A field has the wrong type (e.g. a string where a number is needed).
    WrongType { field: Field, found: &'static str },
    /// A number that is NaN or infinite (CBOR can carry them).
    NotFinite { field: Field },
    /// None of the metrics the input's rules use is present.
    NoMetrics,
    /// The time field is absent, or its value cannot be read as a time in the configured unit.
    BadTimestamp,
    /// The topic is not valid UTF-8 or does not match the input's pattern.
    BadTopic,
    /// The payload exceeds the input's `max_payload_bytes`; it was not decoded.
    TooLarge,
    /// The event time is further ahead of the gateway clock than `max_clock_skew`.
    FutureTimestamp,
    /// Processing the reading panicked inside weir (a bug). It is skipped like a bad payload,
    /// so a message that trips a bug cannot stop a worker, or crash weir again each time the
    /// broker or the input log delivers it anew.
    Internal,
}

/// Which field of a [`FieldPlan`] an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Metric(u16),
    Discrete(u16),
    Time,
    Seq,
}

impl DecodeError {
    /// The bounded `reason` label of `weir_decode_errors_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::Malformed => "malformed",
            DecodeError::NotAnObject => "not_an_object",
            DecodeError::WrongType { .. } => "wrong_type",
            DecodeError::NotFinite { .. } => "not_finite",
            DecodeError::NoMetrics => "missing_field",
            DecodeError::BadTimestamp => "bad_timestamp",
            DecodeError::BadTopic => "bad_topic",
            DecodeError::TooLarge => "too_large",
            DecodeError::FutureTimestamp => "future_timestamp",
            DecodeError::Internal => "internal_error",
        }
    }

    /// Every reason label, so metrics can be pre-registered at zero.
    pub const REASONS: [&'static str; 10] = [
        "malformed",
        "not_an_object",
        "wrong_type",
        "not_finite",
        "missing_field",
        "bad_timestamp",
        "bad_topic",
        "too_large",
        "future_timestamp",
        "internal_error",
    ];

    /// A sentence for logs and dead letters.
    pub fn describe(&self, plan: &FieldPlan) -> String {
        let name = |field: &Field| match field {
            Field::Metric(i) => plan.metrics[*i as usize].clone(),
            Field::Discrete(i) => plan.discrete[*i as usize].clone(),
            Field::Time => plan.time.as_ref().map_or_else(String::new, |t| t.0.clone()),
            Field::Seq => plan.seq.clone().unwrap_or_default(),
        };
        match self {
            DecodeError::Malformed => format!("the payload is not valid {}", plan.format_name()),
            DecodeError::NotAnObject => "the payload is not an object of named fields".into(),
            DecodeError::WrongType {
                field: field @ Field::Discrete(_),
                found,
            } => format!(
                "field `{}` is {found}, expected a string, boolean or integer",
                name(field)
            ),
            DecodeError::WrongType { field, found } => {
                format!("field `{}` is {found}, expected a number", name(field))
            }
            DecodeError::NotFinite { field } => {
                format!("field `{}` is NaN or infinite", name(field))
            }
            DecodeError::NoMetrics => format!(
                "the payload has none of the fields the rules use ({})",
                plan.metrics
                    .iter()
                    .chain(&plan.discrete)
                    .map(String::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            DecodeError::BadTimestamp => match &plan.time {
                Some((field, unit)) => {
                    format!("field `{field}` is missing or is not a timestamp in unit {unit:?}")
                }
                None => "bad timestamp".into(),
            },
            DecodeError::BadTopic => "the topic does not match the input's pattern".into(),
            DecodeError::TooLarge => {
                "the payload is larger than the input's max_payload_bytes".into()
            }
            DecodeError::FutureTimestamp => {
                "the event time is further ahead of the gateway clock than max_clock_skew".into()
            }
            DecodeError::Internal => "processing this reading failed inside weir (a bug: please report it with the payload); the reading was skipped".into(),
        }
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.reason())
    }
}

/// What to read from an input's payloads: the metrics its rules use, the time and sequence fields.
///
/// Built by [`FieldPlan::new`] or [`FieldPlan::of`] (then [`with_discrete`](Self::with_discrete)),
/// which index the field names; the names are public to read, not to change afterwards.
#[derive(Debug, Clone)]
pub struct FieldPlan {
    pub format: Format,
    /// Metric fields, indexed by slot; operators refer to metrics by slot.
    pub metrics: Vec<String>,
    /// Discrete (string, bool, integer) fields, indexed by slot; kept apart from `metrics` so
    /// numeric decoding stays a plain `f64` per slot.
    pub discrete: Vec<String>,
    pub time: Option<(String, TimeUnit)>,
    pub seq: Option<String>,
    /// Every name above with its roles, for [`FieldPlan::resolve`].
    keys: Vec<Key>,
}

/// One field name of a plan, in the form a payload key is matched against: every key of every
/// payload is resolved, so this is on the hot path.
#[derive(Debug, Clone)]
struct Key {
    name: Box<[u8]>,
    /// The name's first eight bytes, little-endian, zero-padded: most keys are told apart here.
    head: u64,
    slot: Slot,
}

/// The first eight bytes of `key`, little-endian, zero-padded (as [`Key::head`]).
#[inline]
fn key_head(key: &[u8]) -> u64 {
    let mut word = [0u8; 8];
    for (to, from) in word.iter_mut().zip(key) {
        *to = *from;
    }
    u64::from_le_bytes(word)
}

/// The decoded content of one payload, before it is joined with its topic's device and labels.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Decoded {
    /// Event time, ms since the Unix epoch; `None` when the input has no time field.
    pub ts: Option<i64>,
    pub seq: Option<u64>,
    /// One slot per [`FieldPlan::metrics`]; `None` where the payload lacks the field.
    pub values: Vec<Option<f64>>,
    /// One slot per [`FieldPlan::discrete`].
    pub discrete: Vec<DiscreteSlot>,
}

impl Decoded {
    /// An empty buffer sized for `plan`, reused across payloads to avoid allocating.
    pub fn for_plan(plan: &FieldPlan) -> Self {
        Self {
            ts: None,
            seq: None,
            values: vec![None; plan.metrics.len()],
            discrete: vec![DiscreteSlot::default(); plan.discrete.len()],
        }
    }

    /// Whether any discrete slot holds a value.
    pub(crate) fn has_discrete(&self) -> bool {
        self.discrete.iter().any(|d| d.is_present())
    }

    fn clear(&mut self) {
        self.ts = None;
        self.seq = None;
        self.values.iter_mut().for_each(|v| *v = None);
        self.discrete.iter_mut().for_each(|d| d.clear());
    }
}

impl FieldPlan {
    /// The plan for an input whose rules use `metrics`.
    pub fn new(input: &InputConfig, metrics: Vec<String>) -> Self {
        Self::of(
            input.format,
            metrics,
            input.time.as_ref().map(|t| (t.field.clone(), t.unit)),
            input.seq_field.clone(),
        )
    }

    /// A plan reading `metrics`, the time field and the sequence field from payloads in `format`.
    pub fn of(
        format: Format,
        metrics: Vec<String>,
        time: Option<(String, TimeUnit)>,
        seq: Option<String>,
    ) -> Self {
        let mut plan = Self {
            format,
            metrics,
            discrete: Vec::new(),
            time,
            seq,
            keys: Vec::new(),
        };
        plan.index_keys();
        plan
    }

    /// Builds `keys`: one entry per distinct name, with all of its roles.
    fn index_keys(&mut self) {
        let mut keys: Vec<Key> = Vec::new();
        let mut add = |name: &str, set: &dyn Fn(&mut Slot)| {
            let index = match keys.iter().position(|key| &*key.name == name.as_bytes()) {
                Some(index) => index,
                None => {
                    keys.push(Key {
                        name: name.as_bytes().into(),
                        head: key_head(name.as_bytes()),
                        slot: Slot::default(),
                    });
                    keys.len() - 1
                }
            };
            set(&mut keys[index].slot);
        };
        if let Some((name, unit)) = &self.time {
            add(name, &|slot| slot.time = Some(*unit));
        }
        if let Some(name) = &self.seq {
            add(name, &|slot| slot.seq = true);
        }
        for (i, name) in self.metrics.iter().enumerate() {
            // The first of two equal names takes the slot, as `metric_slot` finds it.
            add(name, &|slot| {
                slot.metric.get_or_insert(i as u16);
            });
        }
        for (i, name) in self.discrete.iter().enumerate() {
            add(name, &|slot| {
                slot.discrete.get_or_insert(i as u16);
            });
        }
        self.keys = keys;
    }

    fn format_name(&self) -> &'static str {
        match self.format {
            Format::Json => "JSON",
            Format::Cbor => "CBOR",
            Format::Text => "UTF-8 text",
            Format::Senml => "SenML JSON",
            Format::SenmlCbor => "SenML CBOR",
        }
    }

    /// The same plan also reading the discrete fields `discrete`.
    pub fn with_discrete(mut self, discrete: Vec<String>) -> Self {
        self.discrete = discrete;
        self.index_keys();
        self
    }

    /// What `key` (its bytes) is to this plan, or `None` when no rule reads it. Walkers resolve
    /// each key once and hand the [`Slot`] to the sink.
    #[inline]
    pub(crate) fn resolve(&self, key: &[u8]) -> Option<Slot> {
        self.resolve_with_head(key, key_head(key))
    }

    /// [`resolve`](Self::resolve) with the key's [`key_head`] already at hand (a scanner can
    /// load it in one read).
    #[inline]
    fn resolve_with_head(&self, key: &[u8], head: u64) -> Option<Slot> {
        // Equal heads and lengths mean equal names up to eight bytes.
        self.keys
            .iter()
            .find(|k| {
                k.head == head
                    && k.name.len() == key.len()
                    && (key.len() <= 8 || k.name[8..] == key[8..])
            })
            .map(|k| k.slot)
    }

    /// Slot of a metric field.
    pub fn metric_slot(&self, name: &str) -> Option<usize> {
        self.metrics.iter().position(|m| m == name)
    }

    /// Slot of a discrete field.
    pub fn discrete_slot(&self, name: &str) -> Option<usize> {
        self.discrete.iter().position(|m| m == name)
    }

    /// Whether this input's payloads are SenML packs, which can hold several readings.
    pub fn is_pack(&self) -> bool {
        matches!(self.format, Format::Senml | Format::SenmlCbor)
    }

    /// Decodes a SenML pack into one reading per distinct time, oldest first; returns how many.
    /// `now_ms` resolves relative times (the arrival).
    ///
    /// # Errors
    /// As [`decode`](Self::decode).
    pub fn decode_pack(
        &self,
        payload: &[u8],
        now_ms: i64,
        out: &mut Vec<Decoded>,
    ) -> Result<usize, DecodeError> {
        senml::decode_pack(self, payload, self.format == Format::SenmlCbor, now_ms, out)
    }

    /// Decodes `payload` into `out` (cleared first).
    ///
    /// # Errors
    /// A [`DecodeError`] naming the reason; `out` is then unspecified.
    pub fn decode(&self, payload: &[u8], out: &mut Decoded) -> Result<(), DecodeError> {
        out.clear();
        let mut sink = FieldSink {
            plan: self,
            out,
            error: None,
        };
        let parsed = match self.format {
            Format::Json => json::walk(payload, &mut sink),
            Format::Cbor => cbor::walk(payload, &mut sink),
            // Packs go through `decode_pack`; a single-reading call takes the first reading.
            Format::Senml | Format::SenmlCbor => {
                let mut readings = Vec::new();
                senml::decode_pack(
                    self,
                    payload,
                    self.format == Format::SenmlCbor,
                    0,
                    &mut readings,
                )?;
                if let Some(first) = readings.into_iter().next() {
                    *sink.out = first;
                }
                Ok(())
            }
            Format::Text => match std::str::from_utf8(payload) {
                Ok(text) => {
                    if let Some(slot) = self.resolve(b"payload") {
                        sink.field(slot, FieldValue::Text(text.trim()));
                    }
                    Ok(())
                }
                Err(_) => Err(DecodeError::Malformed),
            },
        };
        if let Some(error) = sink.error {
            return Err(error);
        }
        parsed?;
        if self.time.is_some() && out.ts.is_none() {
            return Err(DecodeError::BadTimestamp);
        }
        let planned = !self.metrics.is_empty() || !self.discrete.is_empty();
        if planned
            && out.values.iter().all(Option::is_none)
            && out.discrete.iter().all(|d| !d.is_present())
        {
            return Err(DecodeError::NoMetrics);
        }
        Ok(())
    }
}

/// The roles of one payload field in a [`FieldPlan`]. A field may have several (a time field
/// that is also a metric), so each role is kept apart rather than as one enum.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Slot {
    /// The unit, when this is the time field.
    time: Option<TimeUnit>,
    seq: bool,
    metric: Option<u16>,
    discrete: Option<u16>,
}

/// Receives the top-level fields of a payload from a format walker and keeps the planned ones.
struct FieldSink<'p, 'o> {
    plan: &'p FieldPlan,
    out: &'o mut Decoded,
    /// The first semantic error; the walker stops at it.
    error: Option<DecodeError>,
}

impl FieldSink<'_, '_> {
    /// Takes the value of a wanted field, resolved by [`FieldPlan::resolve`]. Returns false to
    /// stop the walk on an error.
    #[inline(always)]
    fn field(&mut self, slot: Slot, value: FieldValue<'_>) -> bool {
        if let Some(unit) = slot.time {
            match timestamp_ms(value, unit) {
                Some(ts) => self.out.ts = Some(ts),
                None => {
                    self.error = Some(DecodeError::BadTimestamp);
                    return false;
                }
            }
            // A field may be both the time and a metric; fall through.
        }
        if slot.seq {
            match value {
                // `n as u64` truncates, so the round trip tells a whole number (without the
                // libm call `fract` is on baseline x86-64).
                FieldValue::Number(n) if (0.0..1.8e19).contains(&n) && (n as u64) as f64 == n => {
                    self.out.seq = Some(n as u64)
                }
                other => {
                    self.error = Some(DecodeError::WrongType {
                        field: Field::Seq,
                        found: other.type_name(),
                    });
                    return false;
                }
            }
        }
        if let Some(slot) = slot.metric {
            let field = Field::Metric(slot);
            match value {
                FieldValue::Number(n) if n.is_finite() => {
                    self.out.values[usize::from(slot)] = Some(n)
                }
                FieldValue::Number(_) => {
                    self.error = Some(DecodeError::NotFinite { field });
                    return false;
                }
                other => {
                    self.error = Some(DecodeError::WrongType {
                        field,
                        found: other.type_name(),
                    });
                    return false;
                }
            }
        }
        if let Some(slot) = slot.discrete {
            let target = &mut self.out.discrete[usize::from(slot)];
            match value {
                FieldValue::Bool(b) => target.set(Discrete::Bool(b)),
                FieldValue::Text(t) => target.set(Discrete::Text(t)),
                FieldValue::Number(n) if n.fract() == 0.0 && n.abs() < 9.0e15 => {
                    target.set(Discrete::Int(n as i64))
                }
                FieldValue::Null => target.clear(),
                other => {
                    self.error = Some(DecodeError::WrongType {
                        field: Field::Discrete(slot),
                        found: other.type_name(),
                    });
                    return false;
                }
            }
        }
        true
    }
}

/// Converts a time field to ms since the epoch.
#[inline]
fn timestamp_ms(value: FieldValue<'_>, unit: TimeUnit) -> Option<i64> {
    let ms = match (value, unit) {
        (FieldValue::Number(n), TimeUnit::S) => n * 1e3,
        (FieldValue::Number(n), TimeUnit::Ms) => n,
        (FieldValue::Number(n), TimeUnit::Us) => n / 1e3,
        (FieldValue::Number(n), TimeUnit::Ns) => n / 1e6,
        (FieldValue::Text(text), TimeUnit::Rfc3339) => return rfc3339_ms(text),
        _ => return None,
    };
    // Reject values that cannot be a time in ms as i64 (and NaN).
    (ms.is_finite() && ms.abs() < 9.2e18).then(|| floor_to_i64(ms))
}

fn rfc3339_ms(text: &str) -> Option<i64> {
    let time = humantime::parse_rfc3339_weak(text).ok()?;
    match time.duration_since(std::time::UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_millis()).ok(),
        Err(before) => i64::try_from(before.duration().as_millis())
            .ok()
            .map(|ms| -ms),
    }
}

/// `ms.floor() as i64` for |ms| < 9.2e18, without the libm call `floor` is on baseline x86-64:
/// the cast truncates toward zero, which is one too high for a negative fraction. (Beyond 2^53
/// every f64 is whole, so the comparison never sees a rounded `truncated`.)
fn floor_to_i64(ms: f64) -> i64 {
    let truncated = ms as i64;
    if (truncated as f64) > ms {
        truncated - 1
    } else {
        truncated
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TimeUnit;

    fn plan(format: Format) -> FieldPlan {
        FieldPlan::of(
            format,
            vec!["temperature".into(), "humidity".into()],
            Some(("ts".into(), TimeUnit::Ms)),
            Some("seq".into()),
        )
    }

    fn decode(format: Format, payload: &[u8]) -> Result<Decoded, DecodeError> {
        let plan = plan(format);
        let mut out = Decoded::for_plan(&plan);
        plan.decode(payload, &mut out).map(|()| out)
    }

    fn cbor_of(value: &serde_json::Value) -> Vec<u8> {
        let mut bytes = Vec::new();
        ciborium::into_writer(value, &mut bytes).unwrap();
        bytes
    }

    #[test]
    fn reads_planned_fields_and_skips_the_rest() {
        let payload = br#"{"ts": 1732600000000, "seq": 17, "temperature": 24.5, "humidity": 40.1,
            "battery": 3.9, "meta": {"fw": "1.2", "tags": [1, 2, {"x": null}]}}"#;
        for (format, bytes) in [
            (Format::Json, payload.to_vec()),
            (
                Format::Cbor,
                cbor_of(&serde_json::from_slice(payload).unwrap()),
            ),
        ] {
            let decoded = decode(format, &bytes).unwrap();
            assert_eq!(decoded.ts, Some(1_732_600_000_000), "{format:?}");
            assert_eq!(decoded.seq, Some(17));
            assert_eq!(decoded.values, vec![Some(24.5), Some(40.1)]);
        }
    }

    #[test]
    fn names_the_reason_for_bad_payloads() {
        let cases: [(&[u8], &str); 6] = [
            (b"{\"ts\": 1, \"temperature\": ", "malformed"),
            (b"[1, 2]", "not_an_object"),
            (br#"{"ts": 1, "temperature": "hot"}"#, "wrong_type"),
            (br#"{"ts": 1, "battery": 3.9}"#, "missing_field"),
            (br#"{"temperature": 20}"#, "bad_timestamp"),
            (
                br#"{"ts": "yesterday", "temperature": 20}"#,
                "bad_timestamp",
            ),
        ];
        for (payload, reason) in cases {
            let err = decode(Format::Json, payload).unwrap_err();
            assert_eq!(err.reason(), reason, "{}", String::from_utf8_lossy(payload));
        }
    }

    #[test]
    fn reads_discrete_fields_in_json_and_cbor() {
        let plan =
            plan(Format::Json).with_discrete(vec!["door".into(), "mode".into(), "code".into()]);
        let payload = br#"{"ts": 5, "door": true, "mode": "auto", "code": 42, "other": "x"}"#;
        for (format, bytes) in [
            (Format::Json, payload.to_vec()),
            (
                Format::Cbor,
                cbor_of(&serde_json::from_slice(payload).unwrap()),
            ),
        ] {
            let plan = FieldPlan {
                format,
                ..plan.clone()
            };
            let mut out = Decoded::for_plan(&plan);
            plan.decode(&bytes, &mut out).unwrap();
            let values: Vec<_> = out.discrete.iter().map(DiscreteSlot::get).collect();
            assert_eq!(
                values,
                [
                    Some(Discrete::Bool(true)),
                    Some(Discrete::Text("auto")),
                    Some(Discrete::Int(42))
                ],
                "{format:?}"
            );
        }
    }

    #[test]
    fn a_fractional_number_is_not_a_discrete_value() {
        let plan = plan(Format::Json).with_discrete(vec!["mode".into()]);
        let mut out = Decoded::for_plan(&plan);
        let err = plan
            .decode(br#"{"ts": 1, "mode": 1.5}"#, &mut out)
            .unwrap_err();
        assert_eq!(err.reason(), "wrong_type");
        assert!(err.describe(&plan).contains("`mode`"));
    }

    #[test]
    fn a_text_payload_is_the_field_payload() {
        let plan = FieldPlan::of(Format::Text, Vec::new(), None, None)
            .with_discrete(vec!["payload".into()]);
        let mut out = Decoded::for_plan(&plan);
        plan.decode(b"offline\n", &mut out).unwrap();
        assert_eq!(out.discrete[0].get(), Some(Discrete::Text("offline")));
        assert_eq!(
            plan.decode(&[0xff, 0xfe], &mut out).unwrap_err().reason(),
            "malformed"
        );
    }

    #[test]
    fn cbor_nan_is_not_finite() {
        let mut bytes = Vec::new();
        let value: Vec<(&str, f64)> = vec![("ts", 1.0), ("temperature", f64::NAN)];
        let map: std::collections::BTreeMap<&str, f64> = value.into_iter().collect();
        ciborium::into_writer(&map, &mut bytes).unwrap();
        assert_eq!(
            decode(Format::Cbor, &bytes).unwrap_err().reason(),
            "not_finite"
        );
    }

    #[test]
    fn converts_time_units() {
        assert_eq!(
            timestamp_ms(FieldValue::Number(1.5), TimeUnit::S),
            Some(1500)
        );
        assert_eq!(
            timestamp_ms(FieldValue::Number(2e6), TimeUnit::Us),
            Some(2000)
        );
        assert_eq!(timestamp_ms(FieldValue::Number(3e6), TimeUnit::Ns), Some(3));
        assert_eq!(
            timestamp_ms(
                FieldValue::Text("2024-11-26T05:46:40.5Z"),
                TimeUnit::Rfc3339
            ),
            Some(1_732_600_000_500)
        );
        assert_eq!(timestamp_ms(FieldValue::Text("1"), TimeUnit::Ms), None);
    }
}
