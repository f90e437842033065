//! CBOR payloads (RFC 8949): a small reader for the top-level map that decodes only planned fields
//! and skips everything else in place.
//!
//! Why not ciborium here: it only exposes `DeserializeOwned` entry points, so a plan-dependent seed
//! cannot be passed and every key would be copied. ciborium still encodes weir's CBOR output.

use super::{DecodeError, FieldSink, FieldValue};

/// Nesting deeper than this is rejected as malformed rather than risking the stack.
const MAX_DEPTH: usize = 64;

/// Feeds the planned top-level fields of a CBOR map to `sink`.
///
/// Inlined into its one caller, `FieldPlan::decode`: out of line (as LLVM chose once the code
/// around it moved) a payload cost 3 % more instructions (callgrind, decode/cbor).
#[inline]
pub(super) fn walk(payload: &[u8], sink: &mut FieldSink<'_, '_>) -> Result<(), DecodeError> {
    let mut reader = Reader {
        bytes: payload,
        pos: 0,
    };
    let head = reader.head_skipping_tags()?;
    let len = match head {
        Head { major: 5, arg, .. } => arg,
        _ => {
            // Consume the item so trailing garbage is still told apart from a non-map.
            reader.skip_from(head, 0)?;
            return Err(DecodeError::NotAnObject);
        }
    };
    let mut remaining = len;
    loop {
        match remaining {
            Some(0) => break,
            Some(ref mut n) => *n -= 1,
            None => {
                if reader.peek()? == 0xff {
                    reader.pos += 1;
                    break;
                }
            }
        }
        let key_head = reader.head_skipping_tags()?;
        let key = match key_head {
            Head {
                major: 3,
                arg: Some(len),
                ..
            } => Some(reader.bytes(len)?),
            other => {
                reader.skip_from(other, 1)?;
                None
            }
        };
        let wanted = key.and_then(|k| sink.plan.resolve(k));
        // A key the plan knows equals one of its names, so it is valid UTF-8; any other text
        // key is checked as before (ASCII first, which is cheap and nearly always so).
        if let (Some(key), None) = (key, wanted) {
            if !key.is_ascii() && std::str::from_utf8(key).is_err() {
                return Err(DecodeError::Malformed);
            }
        }
        let value_head = reader.head_skipping_tags()?;
        match wanted {
            Some(slot) => {
                let value = reader.scalar(value_head)?;
                if !sink.field(slot, value) {
                    return Ok(());
                }
            }
            None => reader.skip_from(value_head, 1)?,
        }
    }
    if reader.pos == payload.len() {
        Ok(())
    } else {
        Err(DecodeError::Malformed)
    }
}

/// An item's major type and argument (`None` for indefinite length).
#[derive(Debug, Clone, Copy)]
struct Head {
    major: u8,
    /// The low five bits of the initial byte: for major type 7 they tell float width.
    info: u8,
    arg: Option<u64>,
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn peek(&self) -> Result<u8, DecodeError> {
        self.bytes
            .get(self.pos)
            .copied()
            .ok_or(DecodeError::Malformed)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(n).ok_or(DecodeError::Malformed)?;
        let slice = self
            .bytes
            .get(self.pos..end)
            .ok_or(DecodeError::Malformed)?;
        self.pos = end;
        Ok(slice)
    }

    fn head(&mut self) -> Result<Head, DecodeError> {
        let initial = self.take(1)?[0];
        let major = initial >> 5;
        let info = initial & 0x1f;
        let arg = match info {
            0..=23 => Some(u64::from(info)),
            24 => Some(u64::from(self.take(1)?[0])),
            25 => Some(u64::from(u16::from_be_bytes(
                self.take(2)?.try_into().unwrap_or_default(),
            ))),
            26 => Some(u64::from(u32::from_be_bytes(
                self.take(4)?.try_into().unwrap_or_default(),
            ))),
            27 => Some(u64::from_be_bytes(
                self.take(8)?.try_into().unwrap_or_default(),
            )),
            31 if matches!(major, 2..=5 | 7) => None,
            _ => return Err(DecodeError::Malformed),
        };
        Ok(Head { major, info, arg })
    }

    fn head_skipping_tags(&mut self) -> Result<Head, DecodeError> {
        for _ in 0..MAX_DEPTH {
            let head = self.head()?;
            if head.major != 6 {
                return Ok(head);
            }
        }
        Err(DecodeError::Malformed)
    }

    fn text(&mut self, len: u64) -> Result<&'a str, DecodeError> {
        std::str::from_utf8(self.bytes(len)?).map_err(|_| DecodeError::Malformed)
    }

    /// The bytes of a string of `len` bytes whose head was just read, not yet checked as UTF-8.
    fn bytes(&mut self, len: u64) -> Result<&'a [u8], DecodeError> {
        let len = usize::try_from(len).map_err(|_| DecodeError::Malformed)?;
        self.take(len)
    }

    /// Reads a value whose head was just read; arrays, maps and chunked strings are skipped and
    /// reported as [`FieldValue::Nested`] / unusable text.
    fn scalar(&mut self, head: Head) -> Result<FieldValue<'a>, DecodeError> {
        Ok(match (head.major, head.arg) {
            (0, Some(n)) => FieldValue::Number(n as f64),
            (1, Some(n)) => FieldValue::Number(-1.0 - n as f64),
            (3, Some(len)) => FieldValue::Text(self.text(len)?),
            (7, Some(arg)) => Self::float_or_simple(head, arg),
            _ => {
                self.skip_from(head, 1)?;
                FieldValue::Nested
            }
        })
    }

    /// Major type 7: floats (by the width in `info`) and the simple values.
    fn float_or_simple(head: Head, arg: u64) -> FieldValue<'a> {
        match (head.info, arg) {
            (20, _) => FieldValue::Bool(false),
            (21, _) => FieldValue::Bool(true),
            (22 | 23, _) => FieldValue::Null,
            (25, bits) => FieldValue::Number(half_to_f64(bits as u16)),
            (26, bits) => FieldValue::Number(f64::from(f32::from_bits(bits as u32))),
            (27, bits) => FieldValue::Number(f64::from_bits(bits)),
            _ => FieldValue::Nested,
        }
    }

    /// Skips the rest of an item whose head was just read.
    fn skip_from(&mut self, head: Head, depth: usize) -> Result<(), DecodeError> {
        if depth > MAX_DEPTH {
            return Err(DecodeError::Malformed);
        }
        match (head.major, head.arg) {
            (0 | 1 | 7, Some(_)) => Ok(()),
            (2 | 3, Some(len)) => {
                self.take(usize::try_from(len).map_err(|_| DecodeError::Malformed)?)?;
                Ok(())
            }
            (4, Some(n)) => {
                for _ in 0..n {
                    let inner = self.head()?;
                    self.skip_from(inner, depth + 1)?;
                }
                Ok(())
            }
            (5, Some(n)) => {
                for _ in 0..n.saturating_mul(2) {
                    let inner = self.head()?;
                    self.skip_from(inner, depth + 1)?;
                }
                Ok(())
            }
            (6, Some(_)) => {
                let inner = self.head()?;
                self.skip_from(inner, depth + 1)
            }
            (2..=5, None) => loop {
                if self.peek()? == 0xff {
                    self.pos += 1;
                    return Ok(());
                }
                let inner = self.head()?;
                self.skip_from(inner, depth + 1)?;
            },
            // A lone break (0xff) outside an indefinite item.
            _ => Err(DecodeError::Malformed),
        }
    }
}

/// IEEE 754 half precision to f64.
fn half_to_f64(bits: u16) -> f64 {
    let sign = if bits & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exponent = i32::from((bits >> 10) & 0x1f);
    let fraction = f64::from(bits & 0x3ff);
    sign * match exponent {
        0 => fraction * 2f64.powi(-24),
        31 if fraction == 0.0 => f64::INFINITY,
        31 => f64::NAN,
        // 2^(e - 15) built from its bits (exact, like `powi`, without the call).
        e => (1.0 + fraction / 1024.0) * f64::from_bits(((e - 15 + 1023) as u64) << 52),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_floats_convert() {
        assert_eq!(half_to_f64(0x3c00), 1.0);
        assert_eq!(half_to_f64(0xc000), -2.0);
        assert_eq!(half_to_f64(0x7bff), 65504.0);
        assert!(half_to_f64(0x7e00).is_nan());
    }

    #[test]
    fn every_half_float_converts_as_the_powi_formula_does() {
        for bits in 0..=u16::MAX {
            let sign = if bits & 0x8000 != 0 { -1.0 } else { 1.0 };
            let exponent = i32::from((bits >> 10) & 0x1f);
            let fraction = f64::from(bits & 0x3ff);
            let expected = sign
                * match exponent {
                    0 => fraction * 2f64.powi(-24),
                    31 if fraction == 0.0 => f64::INFINITY,
                    31 => f64::NAN,
                    e => (1.0 + fraction / 1024.0) * 2f64.powi(e - 15),
                };
            let got = half_to_f64(bits);
            assert!(
                got.to_bits() == expected.to_bits() || (got.is_nan() && expected.is_nan()),
                "{bits:#06x}: {got} vs {expected}"
            );
        }
    }

    #[test]
    fn an_unplanned_key_that_is_not_utf8_is_still_malformed() {
        use crate::config::{Format, TimeUnit};
        use crate::decode::{Decoded, FieldPlan};
        let plan = FieldPlan::of(
            Format::Cbor,
            vec!["temperature".into()],
            Some(("ts".into(), TimeUnit::Ms)),
            None,
        );
        let mut out = Decoded::for_plan(&plan);
        // {"ts": 1, "temperature": 2, <key>: 3}
        let with_key = |key: &[u8]| {
            let mut bytes = vec![0xa3, 0x62, b't', b's', 0x01, 0x6b];
            bytes.extend_from_slice(b"temperature");
            bytes.push(0x02);
            bytes.push(0x60 + key.len() as u8);
            bytes.extend_from_slice(key);
            bytes.push(0x03);
            bytes
        };
        assert_eq!(plan.decode(&with_key("é".as_bytes()), &mut out), Ok(()));
        assert_eq!(
            plan.decode(&with_key(&[0xff, 0xfe]), &mut out),
            Err(DecodeError::Malformed)
        );
    }
}
