//! The fast path for the usual JSON payload: one object whose planned fields are plain scalars.
//! It decodes what it fully understands and gives up on anything else, and the general walker
//! (`json.rs`, serde_json) then decodes the payload from the start.
//!
//! The invariant that makes the fallback safe: whatever this scanner accepts, serde_json accepts
//! too, with the same value for every planned field. So the scanner takes a strict subset of
//! JSON and gives up on
//! - an escape in a key or in a planned string (`\u` in a skipped string is read if it is not a
//!   surrogate, the other escapes always),
//! - invalid UTF-8 anywhere in a string (serde_json does not check skipped strings; giving up
//!   there too keeps the subset strict whatever serde_json does),
//! - an array or object as a planned value, or nested deeper than [`MAX_DEPTH`] in a skipped one,
//! - a planned number serde_json would not read exactly as this does (see [`Scanner::number`]),
//! - a value the plan refuses (wrong type, bad time): the general path names the error,
//! - any syntax error, so malformed payloads keep the reason they had.

use super::{key_head, FieldSink, FieldValue};

/// Skipped arrays and objects nested deeper than this go to the general walker, which skips them
/// without recursion.
const MAX_DEPTH: usize = 32;

/// Powers of ten that are exact in an f64.
const POW10: [f64; 23] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16,
    1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
];

/// Feeds the planned fields of a flat JSON object to `sink`. Returns false when the payload is
/// not one this scanner fully understands; the sink may then hold part of the payload, and the
/// caller decodes it again with the general walker.
///
/// Kept out of line: inlined into `FieldPlan::decode` (which LLVM began to do once the reading
/// types moved to `model`), a payload cost 2 % more instructions (callgrind, decode/json).
#[inline(never)]
pub(super) fn scan(payload: &[u8], sink: &mut FieldSink<'_, '_>) -> bool {
    scan_object(
        &mut Scanner {
            bytes: payload,
            pos: 0,
        },
        sink,
    )
    .is_some()
}

fn scan_object(s: &mut Scanner<'_>, sink: &mut FieldSink<'_, '_>) -> Option<()> {
    s.whitespace();
    s.eat(b'{')?;
    s.whitespace();
    if s.peek() == Some(b'}') {
        s.pos += 1;
    } else {
        loop {
            s.eat(b'"')?;
            let (key, head) = s.key()?;
            s.whitespace();
            s.eat(b':')?;
            s.whitespace();
            match sink.plan.resolve_with_head(key, head) {
                Some(slot) => {
                    let value = s.scalar()?;
                    if !sink.field(slot, value) {
                        return None;
                    }
                }
                None => s.skip_value(0)?,
            }
            s.whitespace();
            match s.next()? {
                b',' => s.whitespace(),
                b'}' => break,
                _ => return None,
            }
        }
    }
    s.whitespace();
    (s.pos == s.bytes.len()).then_some(())
}

struct Scanner<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Scanner<'a> {
    #[inline]
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    #[inline]
    fn next(&mut self) -> Option<u8> {
        let byte = self.peek()?;
        self.pos += 1;
        Some(byte)
    }

    #[inline]
    fn eat(&mut self, byte: u8) -> Option<()> {
        (self.next()? == byte).then_some(())
    }

    /// JSON's four whitespace bytes, as serde_json skips them.
    #[inline]
    fn whitespace(&mut self) {
        while let Some(b' ' | b'\n' | b'\t' | b'\r') = self.peek() {
            self.pos += 1;
        }
    }

    /// The eight bytes at `at`, little-endian, if the payload goes on that far.
    #[inline(always)]
    fn word_at(&self, at: usize) -> Option<u64> {
        let chunk = self.bytes.get(at..at + 8)?;
        Some(u64::from_le_bytes(chunk.try_into().unwrap_or_default()))
    }

    /// The raw bytes of a string whose opening quote was just read, up to the closing quote
    /// (consumed); their first eight bytes as [`key_head`] has them; and whether they are all
    /// ASCII. Stops with `None` at an escape or a control byte, which the caller handles or gives
    /// up on.
    #[inline(always)]
    fn plain_string(&mut self) -> Option<(&'a [u8], u64, bool)> {
        let start = self.pos;
        let mut at = start;
        let mut head = None;
        let mut high = 0u64;
        // Eight bytes at a time: one step passes a word with no quote, backslash or control byte.
        while let Some(word) = self.word_at(at) {
            let stop = stop_index(word);
            if stop < 8 {
                let kept = word & ((1 << (8 * stop)) - 1);
                let head = *head.get_or_insert(kept);
                high |= kept;
                at += stop;
                // `at` is in the payload: the word covered it.
                if self.bytes[at] != b'"' {
                    self.pos = at;
                    return None;
                }
                self.pos = at + 1;
                return Some((&self.bytes[start..at], head, high & HIGHS == 0));
            }
            head.get_or_insert(word);
            high |= word;
            at += 8;
        }
        self.plain_string_tail(start, at, high)
    }

    /// [`plain_string`](Self::plain_string) for the last few bytes of the payload, one at a time.
    #[cold]
    fn plain_string_tail(
        &mut self,
        start: usize,
        from: usize,
        high: u64,
    ) -> Option<(&'a [u8], u64, bool)> {
        let mut high = high & HIGHS != 0;
        for (at, &byte) in self.bytes.iter().enumerate().skip(from) {
            if byte == b'"' {
                self.pos = at + 1;
                let raw = &self.bytes[start..at];
                return Some((raw, key_head(raw), !high));
            }
            if byte == b'\\' || byte < 0x20 {
                self.pos = at;
                return None;
            }
            high |= byte >= 0x80;
        }
        None
    }

    /// A key (bytes that are valid UTF-8: the plan compares bytes) and its head.
    #[inline(always)]
    fn key(&mut self) -> Option<(&'a [u8], u64)> {
        match self.plain_string()? {
            (key, head, true) => Some((key, head)),
            (key, head, false) => Some((std::str::from_utf8(key).ok()?.as_bytes(), head)),
        }
    }

    /// A planned value: a string without escapes, a number, a boolean or null.
    fn scalar(&mut self) -> Option<FieldValue<'a>> {
        match self.peek()? {
            b'"' => {
                self.pos += 1;
                let (text, _, _) = self.plain_string()?;
                std::str::from_utf8(text).ok().map(FieldValue::Text)
            }
            b't' => self.word(b"true").map(|()| FieldValue::Bool(true)),
            b'f' => self.word(b"false").map(|()| FieldValue::Bool(false)),
            b'n' => self.word(b"null").map(|()| FieldValue::Null),
            _ => self.number().map(FieldValue::Number),
        }
    }

    fn word(&mut self, word: &[u8]) -> Option<()> {
        let end = self.pos + word.len();
        (self.bytes.get(self.pos..end)? == word).then(|| self.pos = end)
    }

    /// A planned number, read exactly as serde_json (without `float_roundtrip`) reads it:
    /// - an integer within u64 becomes `u64 as f64`, a negative one `i64 as f64` (`-0` is -0.0),
    ///   which is the conversion serde_json's visitor calls make;
    /// - a number with a fraction or an exponent is read only when its digits fit in 2^53 and its
    ///   decimal exponent is within +-22: both factors are then exact, one multiplication or
    ///   division rounds once, and the result is the correctly rounded value that serde_json
    ///   computes the same way (and that `float_roundtrip` would compute too).
    ///
    /// Anything else (more digits, a larger exponent, bad syntax) gives up.
    fn number(&mut self) -> Option<f64> {
        let negative = self.peek() == Some(b'-');
        if negative {
            self.pos += 1;
        }
        let start = self.pos;
        let mut significand = self.digits_value(0);
        let whole_digits = self.pos - start;
        // One leading zero only, as in JSON.
        if whole_digits == 0 || (whole_digits > 1 && self.bytes[start] == b'0') {
            return None;
        }
        let mut exponent: i32 = 0;
        let mut integer = true;
        if self.peek() == Some(b'.') {
            self.pos += 1;
            integer = false;
            let fraction = self.pos;
            significand = self.digits_value(significand);
            let fraction_digits = self.pos - fraction;
            if fraction_digits == 0 {
                return None;
            }
            exponent = -(fraction_digits as i32);
        }
        // Nineteen digits always fit in a u64; more give up (digits_value wraps).
        if self.pos - start - usize::from(!integer) > 19 {
            return None;
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.pos += 1;
            integer = false;
            let negative_exponent = match self.peek() {
                Some(b'-') => {
                    self.pos += 1;
                    true
                }
                Some(b'+') => {
                    self.pos += 1;
                    false
                }
                _ => false,
            };
            let digits = self.pos;
            let value = self.digits_value(0);
            // Beyond four digits the exponent is far outside the exact range anyway.
            if !(1..=4).contains(&(self.pos - digits)) {
                return None;
            }
            let value = value as i32;
            exponent += if negative_exponent { -value } else { value };
        }
        if integer {
            return Some(if !negative {
                significand as f64
            } else {
                // serde_json keeps a negative integer as i64 when it fits, else (and for -0)
                // negates the f64.
                let negated = (significand as i64).wrapping_neg();
                if negated >= 0 {
                    -(significand as f64)
                } else {
                    negated as f64
                }
            });
        }
        if significand > 1 << 53 {
            return None;
        }
        let power = *POW10.get(exponent.unsigned_abs() as usize)?;
        let magnitude = if exponent >= 0 {
            significand as f64 * power
        } else {
            significand as f64 / power
        };
        Some(if negative { -magnitude } else { magnitude })
    }

    /// Reads decimal digits onto `value` (wrapping: the caller counts the digits).
    #[inline(always)]
    fn digits_value(&mut self, mut value: u64) -> u64 {
        for &byte in &self.bytes[self.pos..] {
            let digit = byte.wrapping_sub(b'0');
            if digit > 9 {
                break;
            }
            value = value.wrapping_mul(10).wrapping_add(u64::from(digit));
            self.pos += 1;
        }
        value
    }

    /// Skips a value no rule reads, checking its syntax as strictly as JSON does.
    fn skip_value(&mut self, depth: usize) -> Option<()> {
        match self.peek()? {
            b'"' => {
                self.pos += 1;
                self.skip_string()
            }
            b't' => self.word(b"true"),
            b'f' => self.word(b"false"),
            b'n' => self.word(b"null"),
            b'[' | b'{' if depth >= MAX_DEPTH => None,
            b'[' => {
                self.pos += 1;
                self.whitespace();
                if self.peek() == Some(b']') {
                    self.pos += 1;
                    return Some(());
                }
                loop {
                    self.skip_value(depth + 1)?;
                    self.whitespace();
                    match self.next()? {
                        b',' => self.whitespace(),
                        b']' => return Some(()),
                        _ => return None,
                    }
                }
            }
            b'{' => {
                self.pos += 1;
                self.whitespace();
                if self.peek() == Some(b'}') {
                    self.pos += 1;
                    return Some(());
                }
                loop {
                    self.eat(b'"')?;
                    self.skip_string()?;
                    self.whitespace();
                    self.eat(b':')?;
                    self.whitespace();
                    self.skip_value(depth + 1)?;
                    self.whitespace();
                    match self.next()? {
                        b',' => self.whitespace(),
                        b'}' => return Some(()),
                        _ => return None,
                    }
                }
            }
            _ => self.skip_number(),
        }
    }

    /// Skips a string whose opening quote was just read: escapes are checked, and the raw bytes
    /// must be valid UTF-8 (escapes are ASCII, so they do not change that).
    fn skip_string(&mut self) -> Option<()> {
        let start = self.pos;
        // `plain_string` stops at an escape (read here) or a control byte (refused by `eat`).
        while self.plain_string().is_none() {
            self.eat(b'\\')?;
            match self.next()? {
                b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => {}
                b'u' => {
                    let hex = self.bytes.get(self.pos..self.pos + 4)?;
                    if !hex.iter().all(u8::is_ascii_hexdigit) {
                        return None;
                    }
                    let unit = hex
                        .iter()
                        .fold(0u32, |unit, &digit| unit << 4 | hex_value(digit));
                    // A surrogate, paired or not, is left to serde_json's judgment.
                    if (0xd800..0xe000).contains(&unit) {
                        return None;
                    }
                    self.pos += 4;
                }
                _ => return None,
            }
        }
        let raw = &self.bytes[start..self.pos - 1];
        if !raw.is_ascii() {
            std::str::from_utf8(raw).ok()?;
        }
        Some(())
    }

    /// Skips a number, checking only its syntax (serde_json does not read skipped numbers).
    fn skip_number(&mut self) -> Option<()> {
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        match self.next()? {
            b'0' => {
                if let Some(b'0'..=b'9') = self.peek() {
                    return None;
                }
            }
            b'1'..=b'9' => self.digits(),
            _ => return None,
        }
        if self.peek() == Some(b'.') {
            self.pos += 1;
            self.some_digits()?;
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.pos += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.pos += 1;
            }
            self.some_digits()?;
        }
        Some(())
    }

    fn digits(&mut self) {
        while let Some(b'0'..=b'9') = self.peek() {
            self.pos += 1;
        }
    }

    fn some_digits(&mut self) -> Option<()> {
        let start = self.pos;
        self.digits();
        (self.pos > start).then_some(())
    }
}

/// The value of an ASCII hex digit (checked by the caller).
fn hex_value(digit: u8) -> u32 {
    u32::from(match digit {
        b'0'..=b'9' => digit - b'0',
        b'a'..=b'f' => digit - b'a' + 10,
        _ => digit - b'A' + 10,
    })
}

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// The index of the first quote, backslash or control byte in `word` (little-endian), or 8.
/// Each test flags the first matching byte exactly; a borrow can only flag bytes above it.
#[inline(always)]
fn stop_index(word: u64) -> usize {
    let zero_in = |x: u64| x.wrapping_sub(ONES) & !x & HIGHS;
    let stop = zero_in(word ^ (ONES * u64::from(b'"')))
        | zero_in(word ^ (ONES * u64::from(b'\\')))
        | (word.wrapping_sub(ONES * 0x20) & !word & HIGHS);
    (stop.trailing_zeros() / 8) as usize
}

#[cfg(test)]
mod tests {
    use super::super::json;
    use super::*;
    use crate::config::{Format, TimeUnit};
    use crate::decode::{DecodeError, Decoded, DiscreteValue, FieldPlan};
    use proptest::prelude::*;

    /// Two metrics that share their first eight bytes, one with a non-ASCII name, and two
    /// discrete fields.
    fn plan() -> FieldPlan {
        FieldPlan::of(
            Format::Json,
            vec![
                "temperature".into(),
                "humidity".into(),
                "temperature_max".into(),
                "température".into(),
            ],
            Some(("ts".into(), TimeUnit::Ms)),
            Some("seq".into()),
        )
        .with_discrete(vec!["mode".into(), "door".into()])
    }

    /// A decoded payload compared bit for bit (-0.0 is not 0.0 here).
    type View = (
        Option<i64>,
        Option<u64>,
        Vec<Option<u64>>,
        Vec<Option<DiscreteValue>>,
    );

    fn view(decoded: &Decoded) -> View {
        (
            decoded.ts,
            decoded.seq,
            decoded.values.iter().map(|v| v.map(f64::to_bits)).collect(),
            decoded
                .discrete
                .iter()
                .map(|slot| slot.get().map(DiscreteValue::from))
                .collect(),
        )
    }

    /// What the scanner alone makes of `payload`; `None` when it gives up.
    fn fast(payload: &[u8]) -> Option<View> {
        let plan = plan();
        let mut out = Decoded::for_plan(&plan);
        let mut sink = FieldSink {
            plan: &plan,
            out: &mut out,
            error: None,
        };
        let taken = scan(payload, &mut sink);
        assert!(
            !taken || sink.error.is_none(),
            "the scanner took a payload the plan refused"
        );
        taken.then(|| view(&out))
    }

    /// Through `walk` (scanner, then serde_json when it gives up), or through serde_json alone.
    fn walked(payload: &[u8], general_only: bool) -> Result<View, DecodeError> {
        let plan = plan();
        let mut out = Decoded::for_plan(&plan);
        let mut sink = FieldSink {
            plan: &plan,
            out: &mut out,
            error: None,
        };
        let result = if general_only {
            json::walk_general(payload, &mut sink)
        } else {
            json::walk(payload, &mut sink)
        };
        match (sink.error, result) {
            (Some(error), _) | (None, Err(error)) => Err(error),
            (None, Ok(())) => Ok(view(&out)),
        }
    }

    /// The scanner's contract: what it takes, serde_json reads the same; with the fallback, the
    /// result (value or error) is serde_json's. Returns whether the scanner took the payload.
    fn check(payload: &[u8]) -> bool {
        let text = String::from_utf8_lossy(payload);
        let general = walked(payload, true);
        assert_eq!(walked(payload, false), general, "{text}");
        match fast(payload) {
            Some(view) => {
                assert_eq!(Ok(view), general, "the scanner disagrees: {text}");
                true
            }
            None => false,
        }
    }

    fn temperature(payload: &str) -> Option<f64> {
        walked(payload.as_bytes(), false).ok()?.2[0].map(f64::from_bits)
    }

    #[test]
    fn takes_the_usual_payload() {
        let payload =
            br#"{"battery":3.9,"humidity":40.0,"seq":17,"temperature":26.5,"ts":1732600000000}"#;
        assert!(check(payload));
        assert_eq!(
            temperature(std::str::from_utf8(payload).unwrap()),
            Some(26.5)
        );
    }

    #[test]
    fn takes_whitespace_of_every_kind() {
        assert!(check(
            b" \t\r\n{ \"ts\" :\t1 ,\n\"temperature\"\r\n:  -2.5e1\t} \n"
        ));
        assert!(check(b"{}"));
        assert!(check(b" { } "));
    }

    #[test]
    fn skips_nested_values_and_strings_with_escapes() {
        assert!(check(
            br#"{"meta": {"fw": "1.2", "tags": [1, -2.5e3, {"x": null}, [], {}, true, false]},
                "note": "a \"quoted\" \\ line\n\t\/ \u00e9\u20AC", "ts": 1, "temperature": 21.5}"#
        ));
        // Deeper than the scanner recurses: serde_json skips it.
        let deep = format!(
            r#"{{"ts": 1, "temperature": 1, "meta": {}1{}}}"#,
            "[".repeat(40),
            "]".repeat(40)
        );
        assert!(!check(deep.as_bytes()));
    }

    #[test]
    fn reads_unicode_keys_and_values() {
        assert!(check(
            "{\"température\": 20.5, \"mode\": \"chaud ☀\", \"ünplanned\": \"ß\", \"ts\": 1}"
                .as_bytes()
        ));
        // Invalid UTF-8 in a skipped string: serde_json takes it, the scanner leaves it to it.
        assert!(!check(
            b"{\"note\": \"\xff\", \"ts\": 1, \"temperature\": 2}"
        ));
        // In a key or a planned string, serde_json refuses it.
        assert!(!check(b"{\"\xff\": 1, \"ts\": 1, \"temperature\": 2}"));
        assert!(!check(
            b"{\"mode\": \"\xc3\", \"ts\": 1, \"temperature\": 2}"
        ));
    }

    #[test]
    fn tells_apart_names_that_share_their_first_eight_bytes() {
        let payload = br#"{"temperat": 1, "temperature": 2, "temperature_max": 3, "temperature_": 4, "ts": 1}"#;
        assert!(check(payload));
        let (_, _, values, _) = walked(payload, false).unwrap();
        let values: Vec<_> = values.iter().map(|v| v.map(f64::from_bits)).collect();
        assert_eq!(values, [Some(2.0), None, Some(3.0), None]);
    }

    #[test]
    fn leaves_escaped_keys_and_planned_strings_to_serde_json() {
        assert!(!check(br#"{"temp\u0065rature": 1, "ts": 1}"#));
        assert_eq!(
            temperature(r#"{"temp\u0065rature": 1, "ts": 1}"#),
            Some(1.0)
        );
        assert!(!check(br#"{"mode": "a\nb", "ts": 1, "temperature": 1}"#));
        // A surrogate, even a valid pair, in a skipped string.
        assert!(!check(
            br#"{"note": "\ud83d\ude00", "ts": 1, "temperature": 1}"#
        ));
        assert!(!check(br#"{"note": "\ud800", "ts": 1, "temperature": 1}"#));
    }

    #[test]
    fn reads_numbers_as_serde_json_does() {
        let taken = [
            "0",
            "-0",
            "-0.0",
            "1e3",
            "1E+3",
            "2.5e-3",
            "-12.75",
            "0.1",
            "1e22",
            "1732600000000",
            "123456789012345678",
            // Integers beyond 2^53 round once, in the same conversion serde_json makes.
            "9007199254740993",
            "-9223372036854775808",
            "-9223372036854775809",
            "9999999999999999999",
        ];
        let left = [
            // 20 digits, exponents beyond 22, digits beyond 2^53 with a fraction.
            "18446744073709551615",
            "1e23",
            "1.7976931348623157e308",
            "5e-324",
            "0.30000000000000004",
            "4.972960719115451e-135",
            "1e00001",
        ];
        for number in taken {
            let payload = format!(r#"{{"ts": 1, "temperature": {number}}}"#);
            assert!(check(payload.as_bytes()), "{number} was not taken");
        }
        for number in left {
            let payload = format!(r#"{{"ts": 1, "temperature": {number}}}"#);
            assert!(!check(payload.as_bytes()), "{number} was taken");
        }
        assert_eq!(
            temperature(r#"{"ts": 1, "temperature": -0}"#).map(f64::to_bits),
            Some((-0.0f64).to_bits())
        );
    }

    #[test]
    fn refuses_what_json_refuses() {
        for payload in [
            "",
            "{",
            "[]",
            "{\"ts\": 1,}",
            "{\"ts\": 01}",
            "{\"ts\": 1.}",
            "{\"ts\": .5}",
            "{\"ts\": 1e}",
            "{\"ts\": +1}",
            "{\"ts\": 1} x",
            "{\"ts\": 1 \"temperature\": 2}",
            "{\"ts\": tru}",
            "{\"ts\": 1, \"meta\": [1,]}",
            "{\"ts\": 1, \"meta\": {\"a\" 1}}",
            "{\"ts\": 1, \"note\": \"a\u{1}b\"}",
            "{\"ts\": 1, \"note\": \"\\x\"}",
            "{\"ts\": 1, \"note\": \"\\u12G4\"}",
            "{'ts': 1}",
        ] {
            assert!(!check(payload.as_bytes()), "{payload}");
            assert!(walked(payload.as_bytes(), false).is_err(), "{payload}");
        }
    }

    #[test]
    fn leaves_refused_values_to_serde_json_which_names_the_error() {
        for (payload, reason) in [
            (r#"{"ts": 1, "temperature": "hot"}"#, "wrong_type"),
            (r#"{"ts": 1, "temperature": [1]}"#, "wrong_type"),
            (r#"{"ts": "yesterday", "temperature": 1}"#, "bad_timestamp"),
            (r#"{"ts": 1, "seq": -1, "temperature": 1}"#, "wrong_type"),
            (r#"{"ts": 1, "mode": 1.5}"#, "wrong_type"),
            // The semantic error comes first, even with bad syntax after it.
            (r#"{"ts": 1, "temperature": "hot", ]"#, "wrong_type"),
        ] {
            assert!(!check(payload.as_bytes()), "{payload}");
            let err = walked(payload.as_bytes(), false).unwrap_err();
            assert_eq!(err.reason(), reason, "{payload}");
        }
    }

    #[test]
    fn later_duplicates_win_as_in_serde_json() {
        let payload =
            br#"{"temperature": 1, "mode": "a", "temperature": 2, "mode": null, "ts": 1}"#;
        assert!(check(payload));
        let (_, _, values, discrete) = walked(payload, false).unwrap();
        assert_eq!(values[0].map(f64::from_bits), Some(2.0));
        assert_eq!(discrete[0], None);
    }

    #[test]
    fn truncated_payloads_fail_as_before() {
        let payload = r#"{"meta": {"tags": [1, "x\"y"]}, "note": "é", "seq": 3, "mode": "auto", "ts": 1.5e3, "temperature": -0.25}"#;
        assert!(check(payload.as_bytes()));
        for end in 0..payload.len() {
            let cut = &payload.as_bytes()[..end];
            check(cut);
            if std::str::from_utf8(cut).is_ok() {
                assert_eq!(
                    walked(cut, false).map_err(|e| e.reason()),
                    Err("malformed"),
                    "{end}"
                );
            }
        }
    }

    const NUMBER: &str = "-?(0|[1-9][0-9]{0,20})(\\.[0-9]{1,20})?([eE][+-]?[0-9]{1,4})?";
    /// Numbers around the edge of what the scanner reads itself (2^53, exponent 22).
    const NEAR_EXACT: &str = "-?(0|[1-9][0-9]{0,8})(\\.[0-9]{1,8})?([eE][+-]?[12]?[0-9])?";

    /// A JSON value as text: scalars of many forms, and nested values a few levels deep.
    fn value_text() -> impl Strategy<Value = String> {
        let string = prop_oneof![
            "[a-z0-9 é☀]{0,12}",
            "([a-z]|\\\\[\"\\\\/bfnrt]|\\\\u[0-9a-fA-F]{4}){0,6}",
        ]
        .prop_map(|inner| format!("\"{inner}\""));
        let scalar = prop_oneof![
            4 => NUMBER.prop_map(String::from),
            2 => string,
            1 => prop_oneof![Just("true"), Just("false"), Just("null")].prop_map(String::from),
        ];
        scalar.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4)
                    .prop_map(|items| format!("[{}]", items.join(", "))),
                proptest::collection::vec(("[a-z]{1,3}", inner), 0..4).prop_map(|entries| {
                    let body: Vec<_> = entries
                        .iter()
                        .map(|(k, v)| format!("\"{k}\":{v}"))
                        .collect();
                    format!("{{{}}}", body.join(","))
                }),
            ]
        })
    }

    /// A field: mostly a planned one with a value of its type (so most objects decode), else
    /// any key (planned, near-planned, escaped, non-ASCII) with any value.
    fn field_text() -> impl Strategy<Value = (String, String)> {
        let numeric = proptest::sample::select(vec![
            "ts",
            "temperature",
            "humidity",
            "temperature_max",
            "température",
        ]);
        let discrete = proptest::sample::select(vec!["mode", "door"]);
        let any_key = prop_oneof![
            4 => proptest::sample::select(vec![
                "ts", "seq", "temperature", "humidity", "temperature_max", "température", "mode",
                "door", "battery", "temperat", "meta",
            ])
            .prop_map(String::from),
            1 => "([a-zé]|\\\\u00[6-7][0-9a-f]){1,12}",
        ];
        prop_oneof![
            3 => (numeric, prop_oneof![NUMBER, NEAR_EXACT]).prop_map(|(k, v)| (k.to_owned(), v)),
            1 => ("[0-9]{1,19}").prop_map(|v| ("seq".to_owned(), v)),
            1 => (discrete, prop_oneof![
                "\"[a-z é]{0,8}\"",
                Just("true".to_owned()),
                Just("null".to_owned()),
                "-?[0-9]{1,5}",
            ])
            .prop_map(|(k, v)| (k.to_owned(), v)),
            2 => (any_key, value_text()),
        ]
    }

    fn object_text() -> impl Strategy<Value = String> {
        let space = "[ \t\r\n]{0,2}";
        proptest::collection::vec((field_text(), space, space), 0..8).prop_map(|fields| {
            let body: Vec<_> = fields
                .iter()
                .map(|((key, value), before, after)| {
                    format!("{before}\"{key}\"{after}:{before}{value}{after}")
                })
                .collect();
            format!("{{{}}}", body.join(","))
        })
    }

    proptest! {
        #[test]
        fn the_scanner_agrees_with_serde_json_on_flat_objects(text in object_text()) {
            check(text.as_bytes());
        }

        #[test]
        fn the_scanner_agrees_with_serde_json_on_damaged_objects(
            text in object_text(),
            cut in any::<prop::sample::Index>(),
            byte in any::<u8>(),
        ) {
            let mut bytes = text.into_bytes();
            let at = cut.index(bytes.len() + 1);
            check(&bytes[..at]);
            if at < bytes.len() {
                bytes[at] = byte;
                check(&bytes);
            }
        }
    }
}
