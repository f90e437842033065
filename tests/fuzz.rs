//! Fuzzing with proptest: the JSON and CBOR decoders and the config parser get arbitrary bytes
//! and near-valid input (truncated, bit-flipped, deeply nested, huge numbers, NaN and infinity,
//! invalid UTF-8). None may panic; well-formed payloads must decode as a naive reference says;
//! config errors must point inside the text.
//!
//! The case count per property comes from `WEIR_FUZZ_CASES` (256 by default, so CI stays fast).
//! A long run: `WEIR_FUZZ_CASES=1000000 cargo test --release --test fuzz`.

use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, FileFailurePersistence};
use std::path::Path;
use weir::config::{Format, Overrides, TimeUnit, EXAMPLE};
use weir::decode::{DecodeError, Decoded, FieldPlan};

fn cases() -> u32 {
    std::env::var("WEIR_FUZZ_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(256)
}

fn fuzz_config() -> ProptestConfig {
    ProptestConfig {
        cases: cases(),
        // Shrinking a failure from a million-case run can take long; a few thousand steps
        // still give a small counterexample.
        max_shrink_iters: 4096,
        // Failing seeds are kept beside this file and replayed first on the next run.
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "tests/fuzz.proptest-regressions",
        ))),
        ..ProptestConfig::default()
    }
}

/// The reference scenario's plan: two metrics, a time field in ms and a sequence field.
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

/// What any successful decode must satisfy, whatever the input.
fn check_invariants(result: &Result<Decoded, DecodeError>) {
    if let Ok(decoded) = result {
        assert!(decoded.ts.is_some(), "a reading without its time field");
        assert!(
            decoded.values.iter().any(Option::is_some),
            "a reading without metrics"
        );
        for value in decoded.values.iter().flatten() {
            assert!(value.is_finite(), "a non-finite metric passed: {value}");
        }
    }
}

/// A top-level field value, as the reference decoder sees it.
#[derive(Debug, Clone)]
enum Value {
    Number(f64),
    Text(String),
    Bool(bool),
    Null,
    /// An array or a map with `depth` levels.
    Nested(usize),
}

const KEYS: [&str; 6] = ["ts", "seq", "temperature", "humidity", "battery", "meta"];

fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => any::<f64>().prop_map(Value::Number),
        2 => (-1e6f64..1e6).prop_map(Value::Number),
        2 => any::<i64>().prop_map(|n| Value::Number(n as f64)),
        1 => prop_oneof![Just(1e300), Just(-1e300), Just(1.8e19), Just(9.3e18), Just(f64::MAX)]
            .prop_map(Value::Number),
        1 => "\\PC{0,12}".prop_map(Value::Text),
        1 => any::<bool>().prop_map(Value::Bool),
        1 => Just(Value::Null),
        // Below the CBOR reader's depth limit (64); deeper nesting has its own property.
        1 => (1usize..60).prop_map(Value::Nested),
    ]
}

/// Top-level fields with unique keys, in the order they are encoded.
fn fields() -> impl Strategy<Value = Vec<(String, Value)>> {
    proptest::collection::btree_map(proptest::sample::select(KEYS.to_vec()), value(), 0..6)
        .prop_map(|map| map.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
}

/// What a payload must decode to: time, sequence number, and the two metrics.
type Expected = (Option<i64>, Option<u64>, [Option<f64>; 2]);

/// The naive reference: walk the fields in order, stop at the first bad planned one.
fn reference(fields: &[(String, Value)]) -> Result<Expected, &'static str> {
    let (mut ts, mut seq, mut values) = (None, None, [None, None]);
    for (key, value) in fields {
        match (key.as_str(), value) {
            ("ts", Value::Number(n)) if n.is_finite() && n.abs() < 9.2e18 => {
                ts = Some(n.floor() as i64)
            }
            ("ts", _) => return Err("bad_timestamp"),
            ("seq", Value::Number(n)) if *n >= 0.0 && n.fract() == 0.0 && *n < 1.8e19 => {
                seq = Some(*n as u64)
            }
            ("seq", _) => return Err("wrong_type"),
            ("temperature" | "humidity", Value::Number(n)) if !n.is_finite() => {
                return Err("not_finite")
            }
            ("temperature" | "humidity", Value::Number(n)) => {
                values[usize::from(key == "humidity")] = Some(*n)
            }
            ("temperature" | "humidity", _) => return Err("wrong_type"),
            _ => {}
        }
    }
    if ts.is_none() {
        return Err("bad_timestamp");
    }
    if values.iter().all(Option::is_none) {
        return Err("missing_field");
    }
    Ok((ts, seq, values))
}

fn assert_matches_reference(fields: &[(String, Value)], result: Result<Decoded, DecodeError>) {
    match (reference(fields), result) {
        (Ok((ts, seq, values)), Ok(decoded)) => {
            assert_eq!(decoded.ts, ts, "{fields:?}");
            assert_eq!(decoded.seq, seq, "{fields:?}");
            assert_eq!(decoded.values, values.to_vec(), "{fields:?}");
        }
        (Err(reason), Err(err)) => assert_eq!(err.reason(), reason, "{fields:?}"),
        (expected, got) => panic!("{fields:?}: reference {expected:?}, decoder {got:?}"),
    }
}

fn json_value(value: &Value) -> String {
    match value {
        // JSON has no NaN or infinity; serde_json writes null for them.
        Value::Number(n) => serde_json::to_string(n).unwrap_or_else(|_| "null".into()),
        Value::Text(text) => serde_json::to_string(text).expect("strings serialize"),
        Value::Bool(b) => b.to_string(),
        Value::Null => "null".into(),
        Value::Nested(depth) => {
            let depth = (*depth).min(100); // serde_json refuses more than 128 levels
            format!(
                "{}1{}",
                "[{\"a\":".repeat(depth / 2) + &"[".repeat(depth % 2),
                "]".repeat(depth % 2) + &"}]".repeat(depth / 2)
            )
        }
    }
}

fn json_document(fields: &[(String, Value)]) -> String {
    let body: Vec<String> = fields
        .iter()
        .map(|(k, v)| format!("{:?}: {}", k, json_value(v)))
        .collect();
    format!("{{{}}}", body.join(", "))
}

/// What the JSON text says, with NaN/inf turned into null as serde_json writes them.
fn as_written_in_json(fields: &[(String, Value)]) -> Vec<(String, Value)> {
    fields
        .iter()
        .map(|(k, v)| match v {
            Value::Number(n) if !n.is_finite() => (k.clone(), Value::Null),
            Value::Number(n) => {
                // serde_json writes the shortest exact form, but without its `float_roundtrip`
                // feature it reads some 17-digit numbers back one ULP off (found by this test:
                // 4.972960719115451e-135 reads as 4.9729607191154513e-135). The reference takes
                // the number as serde_json reads it; the walker is what is checked here.
                let text = serde_json::to_string(n).expect("finite numbers serialize");
                let read: f64 =
                    serde_json::from_str(&text).expect("serde_json reads its own output");
                (k.clone(), Value::Number(read))
            }
            other => (k.clone(), other.clone()),
        })
        .collect()
}

fn cbor_value(value: &Value) -> ciborium::Value {
    use ciborium::Value as C;
    match value {
        Value::Number(n) if n.fract() == 0.0 && n.abs() < 9e15 => C::Integer((*n as i64).into()),
        Value::Number(n) => C::Float(*n),
        Value::Text(text) => C::Text(text.clone()),
        Value::Bool(b) => C::Bool(*b),
        Value::Null => C::Null,
        Value::Nested(depth) => {
            let mut nested = C::Integer(1.into());
            for level in 0..*depth {
                nested = if level % 2 == 0 {
                    C::Array(vec![nested])
                } else {
                    C::Map(vec![(C::Text("a".into()), nested)])
                };
            }
            nested
        }
    }
}

fn cbor_document(fields: &[(String, Value)]) -> Vec<u8> {
    let map = ciborium::Value::Map(
        fields
            .iter()
            .map(|(k, v)| (ciborium::Value::Text(k.clone()), cbor_value(v)))
            .collect(),
    );
    let mut bytes = Vec::new();
    ciborium::into_writer(&map, &mut bytes).expect("CBOR encodes");
    bytes
}

/// Near-valid damage to a well-formed payload.
#[derive(Debug, Clone)]
enum Damage {
    Truncate(prop::sample::Index),
    FlipBit(prop::sample::Index, u8),
    Insert(prop::sample::Index, Vec<u8>),
    /// Invalid UTF-8 (a lone continuation byte, an overlong form, a surrogate) at some place.
    BadUtf8(prop::sample::Index, usize),
    Duplicate(prop::sample::Index, prop::sample::Index),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        any::<prop::sample::Index>().prop_map(Damage::Truncate),
        (any::<prop::sample::Index>(), 0u8..8).prop_map(|(i, b)| Damage::FlipBit(i, b)),
        (
            any::<prop::sample::Index>(),
            proptest::collection::vec(any::<u8>(), 1..8)
        )
            .prop_map(|(i, bytes)| Damage::Insert(i, bytes)),
        (any::<prop::sample::Index>(), 0usize..4).prop_map(|(i, k)| Damage::BadUtf8(i, k)),
        (any::<prop::sample::Index>(), any::<prop::sample::Index>())
            .prop_map(|(a, b)| Damage::Duplicate(a, b)),
    ]
}

fn apply(mut bytes: Vec<u8>, damages: &[Damage]) -> Vec<u8> {
    const BAD_UTF8: [&[u8]; 4] = [b"\x80", b"\xc0\xaf", b"\xed\xa0\x80", b"\xff\xfe"];
    for damage in damages {
        let len = bytes.len();
        match damage {
            Damage::Truncate(i) => bytes.truncate(i.index(len + 1)),
            Damage::FlipBit(i, bit) if len > 0 => bytes[i.index(len)] ^= 1 << bit,
            Damage::FlipBit(..) => {}
            Damage::Insert(i, extra) => {
                let at = i.index(len + 1);
                bytes.splice(at..at, extra.iter().copied());
            }
            Damage::BadUtf8(i, which) => {
                let at = i.index(len + 1);
                bytes.splice(at..at, BAD_UTF8[*which].iter().copied());
            }
            Damage::Duplicate(a, b) if len > 0 => {
                let (x, y) = (a.index(len), b.index(len));
                let (start, end) = (x.min(y), x.max(y) + 1);
                let copy = bytes[start..end].to_vec();
                bytes.splice(end..end, copy);
            }
            Damage::Duplicate(..) => {}
        }
    }
    bytes
}

proptest! {
    #![proptest_config(fuzz_config())]

    #[test]
    fn json_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        check_invariants(&decode(Format::Json, &bytes));
    }

    #[test]
    fn cbor_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        check_invariants(&decode(Format::Cbor, &bytes));
    }

    #[test]
    fn well_formed_json_decodes_as_the_reference_says(fields in fields()) {
        let text = json_document(&fields);
        assert_matches_reference(&as_written_in_json(&fields), decode(Format::Json, text.as_bytes()));
    }

    #[test]
    fn well_formed_cbor_decodes_as_the_reference_says(fields in fields()) {
        // CBOR carries NaN and infinity, and ciborium writes the narrowest exact float width.
        assert_matches_reference(&fields, decode(Format::Cbor, &cbor_document(&fields)));
    }

    #[test]
    fn damaged_json_never_panics(fields in fields(), damages in proptest::collection::vec(damage(), 1..4)) {
        let bytes = apply(json_document(&fields).into_bytes(), &damages);
        check_invariants(&decode(Format::Json, &bytes));
    }

    #[test]
    fn damaged_cbor_never_panics(fields in fields(), damages in proptest::collection::vec(damage(), 1..4)) {
        let bytes = apply(cbor_document(&fields), &damages);
        check_invariants(&decode(Format::Cbor, &bytes));
    }

    #[test]
    fn deep_nesting_is_refused_without_overflowing_the_stack(depth in 0usize..100_000, planned in any::<bool>(), open in 0u8..4) {
        let key = if planned { "temperature" } else { "meta" };
        let (json_open, cbor_open): (&str, &[u8]) = match open {
            0 => ("[", &[0x81]),             // array of one
            1 => ("{\"a\":", &[0xa1, 0x61, b'a']), // map of one
            2 => ("[1,", &[0x9f, 0x01]),     // indefinite array
            _ => ("[", &[0xc1]),             // a tag
        };
        let json = format!("{{\"ts\": 1, \"{key}\": {}", json_open.repeat(depth));
        check_invariants(&decode(Format::Json, json.as_bytes()));
        let mut cbor = vec![0xa2, 0x62, b't', b's', 0x01];
        cbor.push(0x60 + key.len() as u8);
        cbor.extend_from_slice(key.as_bytes());
        for _ in 0..depth {
            cbor.extend_from_slice(cbor_open);
        }
        cbor.push(0x01);
        check_invariants(&decode(Format::Cbor, &cbor));
    }

    #[test]
    fn huge_and_odd_json_numbers_never_panic(
        mantissa in "-?[0-9]{1,400}(\\.[0-9]{0,40})?",
        exponent in proptest::option::of(-2000i32..2000),
    ) {
        let number = match exponent {
            Some(e) => format!("{mantissa}e{e}"),
            None => mantissa,
        };
        for key in ["ts", "seq", "temperature"] {
            let text = format!("{{\"ts\": 1, \"{key}\": {number}, \"humidity\": 1}}");
            check_invariants(&decode(Format::Json, text.as_bytes()));
        }
    }

    #[test]
    fn cbor_floats_of_every_width_never_pass_when_not_finite(
        bits in any::<u64>(),
        width in 0u8..3,
        key in proptest::sample::select(vec!["ts", "seq", "temperature"]),
    ) {
        let mut cbor = vec![0xa2, 0x62, b't', b's', 0x01];
        cbor.push(0x60 + key.len() as u8);
        cbor.extend_from_slice(key.as_bytes());
        match width {
            0 => { cbor.push(0xf9); cbor.extend_from_slice(&(bits as u16).to_be_bytes()); }
            1 => { cbor.push(0xfa); cbor.extend_from_slice(&(bits as u32).to_be_bytes()); }
            _ => { cbor.push(0xfb); cbor.extend_from_slice(&bits.to_be_bytes()); }
        }
        check_invariants(&decode(Format::Cbor, &cbor));
    }
}

/// Damage to the config text, at character boundaries so the result stays a `&str`.
#[derive(Debug, Clone)]
enum Edit {
    Delete(prop::sample::Index, usize),
    Insert(prop::sample::Index, String),
    DuplicateLine(prop::sample::Index),
    SwapLines(prop::sample::Index, prop::sample::Index),
    Truncate(prop::sample::Index),
}

fn edit() -> impl Strategy<Value = Edit> {
    let token = prop_oneof![
        proptest::sample::select(vec![
            "[",
            "]",
            "[[",
            "]]",
            "=",
            "\"",
            "'''",
            "\"\"\"",
            "\n",
            "#",
            "{",
            "}",
            ",",
            ".",
            "\\",
            "\\u",
            "0x",
            "1e999",
            "-",
            "nan",
            "inf",
            "true",
            "1979-05-27T07:32:00Z",
            "\"10s\"",
            "\"0s\"",
            "\"1000000000000d\"",
            "[rules.x]",
            "[inputs.y]",
            "qos = 2",
            "{device}",
            "{",
            "+",
            "#",
            "\u{0}",
            "\u{feff}",
            "é",
            "日本",
            "\r\n",
            "\t",
        ])
        .prop_map(str::to_owned),
        "\\PC{0,16}",
        any::<String>(),
    ];
    prop_oneof![
        (any::<prop::sample::Index>(), 1usize..40).prop_map(|(i, n)| Edit::Delete(i, n)),
        (any::<prop::sample::Index>(), token).prop_map(|(i, t)| Edit::Insert(i, t)),
        any::<prop::sample::Index>().prop_map(Edit::DuplicateLine),
        (any::<prop::sample::Index>(), any::<prop::sample::Index>())
            .prop_map(|(a, b)| Edit::SwapLines(a, b)),
        any::<prop::sample::Index>().prop_map(Edit::Truncate),
    ]
}

/// The byte offset of the `index`-th character boundary (0..=len).
fn boundary(text: &str, index: &prop::sample::Index) -> usize {
    let boundaries: Vec<usize> = text
        .char_indices()
        .map(|(i, _)| i)
        .chain(std::iter::once(text.len()))
        .collect();
    boundaries[index.index(boundaries.len())]
}

fn apply_edits(edits: &[Edit]) -> String {
    let mut text = EXAMPLE.to_owned();
    for edit in edits {
        match edit {
            Edit::Delete(at, n) => {
                let start = boundary(&text, at);
                let end = text[start..]
                    .char_indices()
                    .nth(*n)
                    .map_or(text.len(), |(i, _)| start + i);
                text.replace_range(start..end, "");
            }
            Edit::Insert(at, token) => {
                let at = boundary(&text, at);
                text.insert_str(at, token);
            }
            Edit::DuplicateLine(i) => {
                let mut lines: Vec<&str> = text.split('\n').collect();
                let line = lines[i.index(lines.len())];
                lines.insert(i.index(lines.len()), line);
                text = lines.join("\n");
            }
            Edit::SwapLines(a, b) => {
                let mut lines: Vec<&str> = text.split('\n').collect();
                let len = lines.len();
                lines.swap(a.index(len), b.index(len));
                text = lines.join("\n");
            }
            Edit::Truncate(at) => {
                let at = boundary(&text, at);
                text.truncate(at);
            }
        }
    }
    text
}

/// Parses `text`; an error must name places inside it.
fn check_config(text: &str) {
    let lines: Vec<&str> = text.split('\n').collect();
    match weir::config::parse(text, Path::new("fuzz.toml"), &Overrides::default()) {
        Ok(_) => {}
        Err(err) => {
            let problems = err.problems();
            assert!(!problems.is_empty(), "an error without problems: {err}");
            for problem in problems {
                assert!(!problem.message.is_empty(), "an empty message: {err}");
                if let Some((line, col)) = problem.line_col {
                    assert!(
                        line >= 1 && line <= lines.len(),
                        "line {line} outside 1..={}: {err}",
                        lines.len()
                    );
                    let width = lines[line - 1].chars().count();
                    assert!(
                        col >= 1 && col <= width + 1,
                        "column {col} outside line {line} ({width} chars): {err}"
                    );
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(fuzz_config())]

    #[test]
    fn config_mutations_never_panic_and_errors_point_inside(edits in proptest::collection::vec(edit(), 1..6)) {
        check_config(&apply_edits(&edits));
    }

    #[test]
    fn arbitrary_text_never_panics_the_config_parser(text in any::<String>()) {
        check_config(&text);
    }
}
