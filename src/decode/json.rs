//! JSON payloads: the flat scanner first (`flat_json.rs`), else a walk of the top-level object
//! with serde_json, decoding only planned fields and skipping the rest with `IgnoredAny` (no
//! allocation for skipped values). The serde_json walk is the reference: it names every error.

use super::{flat_json, DecodeError, FieldSink, FieldValue, Slot};
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use std::fmt;

/// Feeds the planned top-level fields of a JSON object to `sink`.
pub(super) fn walk(payload: &[u8], sink: &mut FieldSink<'_, '_>) -> Result<(), DecodeError> {
    if flat_json::scan(payload, sink) {
        return Ok(());
    }
    // The scanner may have taken some fields before it gave up.
    sink.out.clear();
    sink.error = None;
    walk_general(payload, sink)
}

/// The serde_json walk alone (the fast path's reference in tests).
pub(super) fn walk_general(
    payload: &[u8],
    sink: &mut FieldSink<'_, '_>,
) -> Result<(), DecodeError> {
    let mut deserializer = serde_json::Deserializer::from_slice(payload);
    let result = de::Deserializer::deserialize_any(&mut deserializer, TopLevel { sink })
        .and_then(|()| deserializer.end());
    match result {
        Ok(()) => Ok(()),
        Err(err) if err.is_data() => Err(DecodeError::NotAnObject),
        Err(_) => Err(DecodeError::Malformed),
    }
}

struct TopLevel<'s, 'p, 'o> {
    sink: &'s mut FieldSink<'p, 'o>,
}

impl<'de> Visitor<'de> for TopLevel<'_, '_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let plan = self.sink.plan;
        while let Some(slot) = map.next_key_seed(KeySeed { plan })? {
            match slot {
                Some(slot) => map.next_value_seed(ValueSeed {
                    sink: &mut *self.sink,
                    slot,
                })?,
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}

/// Resolves a key to its [`Slot`] in the plan (without allocating it), or `None` to skip.
struct KeySeed<'p> {
    plan: &'p super::FieldPlan,
}

impl<'de> DeserializeSeed<'de> for KeySeed<'_> {
    type Value = Option<Slot>;

    fn deserialize<D: de::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl Visitor<'_> for KeySeed<'_> {
    type Value = Option<Slot>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a field name")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<Self::Value, E> {
        Ok(self.plan.resolve(key.as_bytes()))
    }
}

/// Decodes one wanted value and hands it to the sink for `slot`.
struct ValueSeed<'s, 'p, 'o> {
    sink: &'s mut FieldSink<'p, 'o>,
    slot: Slot,
}

impl ValueSeed<'_, '_, '_> {
    fn give<E: de::Error>(self, value: FieldValue<'_>) -> Result<(), E> {
        if self.sink.field(self.slot, value) {
            Ok(())
        } else {
            // The sink kept the precise error; this one only stops the walk.
            Err(E::custom("field rejected"))
        }
    }
}

impl<'de> DeserializeSeed<'de> for ValueSeed<'_, '_, '_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ValueSeed<'_, '_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a value")
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        self.give(FieldValue::Number(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.give(FieldValue::Number(v as f64))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.give(FieldValue::Number(v as f64))
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        self.give(FieldValue::Bool(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.give(FieldValue::Text(v))
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.give(FieldValue::Null)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        self.give(FieldValue::Nested)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        self.give(FieldValue::Nested)
    }
}
