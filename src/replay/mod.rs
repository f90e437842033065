//! Replay: runs the live engine ([`Plan`], [`Worker`]) over recorded readings on a virtual
//! clock, for `weir replay`, `weir test` (golden cases) and files written by `weir record`.
//!
//! The clock is each record's `received` time (ms), or its event time when the record has none.
//! It never goes backwards, just as arrival times do not. Between records the worker's
//! processing-time timer runs once per [`TICK_INTERVAL`] of virtual time, so idle timeouts and
//! liveness fire as they would live. At the end of input, open windows are flushed as at a clean
//! shutdown. Only the clock differs from a live run: decode, operators and routing are the
//! same code.

pub mod golden;
pub mod record;

use crate::config::{Config, Format, TimeUnit};
use crate::decode::Decoded;
use crate::engine::worker::TICK_INTERVAL;
use crate::engine::{OperatorPlan, Plan, RawMessage, Worker};
use crate::metrics::Metrics;
use crate::operators::Operator;
use crate::route::Outgoing;
use anyhow::Context as _;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::io::BufRead;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One recorded MQTT message, as read from a JSON-lines or CSV file.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub topic: String,
    pub payload: Bytes,
    /// When it arrived, ms since the epoch; the virtual clock. `None`: the reading's event time.
    pub received: Option<i64>,
}

/// One line of the JSON-lines format. Exactly one of the payload keys is set.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Line<'a> {
    topic: String,
    /// A JSON payload, kept byte for byte as it is in the file.
    #[serde(borrow, default)]
    payload: Option<&'a RawValue>,
    /// Any payload (CBOR, binary), base64 (RFC 4648, standard alphabet).
    #[serde(default)]
    payload_b64: Option<String>,
    /// A plain-text payload (a status or last-will message such as `offline`).
    #[serde(default)]
    payload_text: Option<String>,
    /// A CBOR payload written as JSON, for readable fixtures: encoded to CBOR when read.
    #[serde(default)]
    payload_cbor: Option<serde_json::Value>,
    #[serde(default)]
    received: Option<i64>,
}

/// Parses one JSON line into a record.
///
/// # Errors
/// The line is not such an object, or it has no payload key or more than one.
pub fn parse_line(line: &str) -> anyhow::Result<Record> {
    let line: Line<'_> = serde_json::from_str(line).map_err(|err| {
        anyhow::anyhow!("{err}; expected {{\"topic\": \"...\", \"payload\": {{...}}}} with an optional \"received\" (ms), or payload_b64 / payload_text / payload_cbor instead of payload")
    })?;
    let payload = match (
        line.payload,
        line.payload_b64,
        line.payload_text,
        line.payload_cbor,
    ) {
        (Some(raw), None, None, None) => Bytes::copy_from_slice(raw.get().as_bytes()),
        (None, Some(b64), None, None) => {
            Bytes::from(base64_decode(&b64).context("payload_b64 is not valid base64")?)
        }
        (None, None, Some(text), None) => Bytes::from(text),
        (None, None, None, Some(value)) => {
            let mut bytes = Vec::new();
            ciborium::into_writer(&value, &mut bytes)
                .context("payload_cbor cannot be encoded as CBOR")?;
            Bytes::from(bytes)
        }
        _ => anyhow::bail!(
            "give exactly one of payload, payload_b64, payload_text and payload_cbor (the topic is {})",
            line.topic
        ),
    };
    Ok(Record {
        topic: line.topic,
        payload,
        received: line.received,
    })
}

/// Reads a JSON-lines file of records; blank lines and lines starting with `#` are skipped.
///
/// # Errors
/// The file cannot be read, or a line is malformed (the error names the file and line).
pub fn read_jsonl(path: &Path) -> anyhow::Result<Vec<Record>> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut records = Vec::new();
    for (index, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("cannot read {}", path.display()))?;
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        records.push(
            parse_line(trimmed).with_context(|| format!("{}:{}", path.display(), index + 1))?,
        );
    }
    Ok(records)
}

/// How CSV rows become readings.
#[derive(Debug, Clone)]
pub struct CsvOptions {
    /// The topic every row is published on, e.g. `sensors/nab/machine-1/telemetry`.
    pub topic: String,
    /// The column with the time: `YYYY-MM-DD HH:MM:SS[.fff]`, RFC 3339, or a number in `time_unit`.
    pub time_column: String,
    /// Unit of a numeric time column.
    pub time_unit: TimeUnit,
    /// The payload field the value column becomes; `None`: every other column, under its own name.
    pub metric: Option<String>,
    /// The column read for `metric`.
    pub value_column: String,
}

/// Reads a CSV file (a header line, then one reading per row; commas inside quotes are not
/// supported) into records, each stamped `received` = its row's time. The payload is a JSON
/// object whose time field is the one the matching input of `config` reads, in its unit.
///
/// # Errors
/// The file cannot be read, a column is missing, a time does not parse, or no input of the
/// config matches the topic.
pub fn read_csv(path: &Path, options: &CsvOptions, config: &Config) -> anyhow::Result<Vec<Record>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let plan = Plan::build(config)?;
    let (input, _) = plan.match_topic(&options.topic).with_context(|| {
        format!(
            "--csv-topic {} matches no input of the config; inputs read {}",
            options.topic,
            plan.inputs
                .iter()
                .map(|i| i.pattern.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )
    })?;
    let time_field = plan.inputs[input].fields.time.clone();
    let mut lines = text.lines().enumerate();
    let header: Vec<String> = lines
        .next()
        .map(|(_, l)| split_csv(l).map(str::to_owned).collect())
        .unwrap_or_default();
    let column = |name: &str| {
        header.iter().position(|h| h == name).with_context(|| {
            format!(
                "{}: no column {name}; the header has {}",
                path.display(),
                header.join(", ")
            )
        })
    };
    let time_at = column(&options.time_column)?;
    let fields: Vec<(usize, String)> = match &options.metric {
        Some(metric) => vec![(column(&options.value_column)?, metric.clone())],
        None => header
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != time_at)
            .map(|(i, h)| (i, h.clone()))
            .collect(),
    };
    let mut records = Vec::new();
    for (index, line) in lines {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), index + 1);
        let cells: Vec<&str> = split_csv(line).collect();
        let time = cells
            .get(time_at)
            .with_context(|| format!("{}: no {} cell", at(), options.time_column))?;
        let ts = parse_time(time, options.time_unit).with_context(at)?;
        let mut payload = serde_json::Map::new();
        for (column, field) in &fields {
            let cell = cells.get(*column).copied().unwrap_or_default();
            let value = match cell.parse::<f64>() {
                Ok(n) => serde_json::Value::from(n),
                Err(_) => serde_json::Value::from(cell),
            };
            payload.insert(field.clone(), value);
        }
        if let Some((field, unit)) = &time_field {
            payload.insert(field.clone(), time_value(ts, *unit));
        }
        records.push(Record {
            topic: options.topic.clone(),
            payload: Bytes::from(serde_json::to_vec(&payload)?),
            received: Some(ts),
        });
    }
    Ok(records)
}

fn split_csv(line: &str) -> impl Iterator<Item = &str> {
    line.split(',').map(|cell| cell.trim().trim_matches('"'))
}

/// A CSV time cell in ms since the epoch.
fn parse_time(text: &str, unit: TimeUnit) -> anyhow::Result<i64> {
    if let Ok(n) = text.parse::<f64>() {
        let ms = match unit {
            TimeUnit::S => n * 1e3,
            TimeUnit::Us => n / 1e3,
            TimeUnit::Ns => n / 1e6,
            TimeUnit::Ms | TimeUnit::Rfc3339 => n,
        };
        return Ok(ms.floor() as i64);
    }
    let time = humantime::parse_rfc3339_weak(text).map_err(|err| {
        anyhow::anyhow!("{text:?} is not a time ({err}); write YYYY-MM-DD HH:MM:SS (UTC), RFC 3339, or a number with --csv-time-unit")
    })?;
    Ok(match time.duration_since(std::time::UNIX_EPOCH) {
        Ok(after) => after.as_millis() as i64,
        Err(before) => -(before.duration().as_millis() as i64),
    })
}

/// `ts` (ms) as an input's time field in `unit`.
fn time_value(ts: i64, unit: TimeUnit) -> serde_json::Value {
    match unit {
        TimeUnit::S => serde_json::Value::from(ts as f64 / 1e3),
        TimeUnit::Ms => serde_json::Value::from(ts),
        TimeUnit::Us => serde_json::Value::from(ts.saturating_mul(1_000)),
        TimeUnit::Ns => serde_json::Value::from(ts.saturating_mul(1_000_000)),
        TimeUnit::Rfc3339 => {
            let time = std::time::UNIX_EPOCH + Duration::from_millis(ts.max(0) as u64);
            serde_json::Value::from(humantime::format_rfc3339_millis(time).to_string())
        }
    }
}

/// How fast the virtual clock runs.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReplayOptions {
    /// `None`: as fast as possible. `Some(x)`: x seconds of recorded time per second.
    pub speed: Option<f64>,
    /// Virtual time the timers keep running after the last record (to see devices go offline).
    pub tail: Duration,
}

/// A derived event (or dead letter) produced by replay: where live weir would publish it, and
/// its schema v1 payload as JSON, byte for byte what a live JSON rule publishes (parsing it
/// into numbers and writing it again could move a float by one ULP).
#[derive(Debug, Clone, serde::Serialize, Deserialize)]
pub struct Emitted {
    pub topic: String,
    pub payload: Box<RawValue>,
}

impl Emitted {
    /// The payload parsed, for looking at its fields.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(self.payload.get()).unwrap_or_default()
    }

    /// True for a dead letter (an input that could not become a reading).
    pub fn is_dead_letter(&self) -> bool {
        self.json()["kind"] == "dead_letter"
    }
}

/// What a replay did, for the closing line on stderr.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub records: u64,
    /// Records whose topic matched no input.
    pub unmatched: u64,
    pub events: u64,
    pub dead_letters: u64,
    /// Inputs that could not become readings (dead-lettered when the config has a topic for them).
    pub decode_errors: u64,
    /// Readings the window rules did not apply (late, future, window limit).
    pub late: u64,
    /// Readings older than the device's last, ignored by order-sensitive detectors.
    pub out_of_order: u64,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "replayed {} records ({} matched no input): {} events, {} dead letters, {} decode errors, {} late and {} out-of-order readings",
            self.records,
            self.unmatched,
            self.events,
            self.dead_letters,
            self.decode_errors,
            self.late,
            self.out_of_order
        )
    }
}

/// The plan for a replay: every rule's events as JSON, whatever the rule publishes live, so the
/// output is one readable format.
fn replay_plan(config: &Config) -> anyhow::Result<Plan> {
    let mut plan = Plan::build(config)?;
    for rule in &mut plan.rules {
        // One line per event: the first output's topic stands for all of them.
        rule.routes.truncate(1);
        rule.routes[0].format = Format::Json;
        if let Some(late) = &mut rule.late_route {
            late.format = Format::Json;
        }
    }
    // Open windows are flushed at the end of input, never left for a snapshot.
    plan.durable_state = false;
    Ok(plan)
}

/// Whether any rule has processing-time timers (liveness timeouts, window idle timeouts). If none
/// has, replay skips the ticks: over sparse data (one reading an hour) they are most of the work.
fn wants_ticks(plan: &Plan) -> bool {
    plan.rules.iter().any(|rule| match &rule.operator {
        OperatorPlan::Hysteresis(op) => op.wants_ticks(),
        OperatorPlan::Tumbling(op) => op.wants_ticks(),
        OperatorPlan::Hopping(op) => op.wants_ticks(),
        OperatorPlan::Session(op) => op.wants_ticks(),
        OperatorPlan::Count(op) => op.wants_ticks(),
        OperatorPlan::Deadband(op) => op.wants_ticks(),
        OperatorPlan::Change(op) => op.wants_ticks(),
        OperatorPlan::Liveness(op) => op.wants_ticks(),
        OperatorPlan::RateOfChange(op) => op.wants_ticks(),
        OperatorPlan::Stuck(op) => op.wants_ticks(),
        OperatorPlan::Anomaly(op) => op.wants_ticks(),
    })
}

/// Runs `records` through the engine built from `config` and hands every derived event and dead
/// letter to `emit`, in the order the engine produced them.
///
/// One worker runs every device: per-device results do not depend on sharding, and one worker
/// makes the order of the output deterministic.
///
/// # Errors
/// The config does not build (it was not validated), or `emit` failed.
pub fn replay(
    config: &Config,
    records: impl IntoIterator<Item = Record>,
    options: ReplayOptions,
    mut emit: impl FnMut(Emitted) -> anyhow::Result<()>,
) -> anyhow::Result<Summary> {
    let plan = Arc::new(replay_plan(config)?);
    let metrics = Arc::new(Metrics::new());
    let mut worker = Worker::new(plan.clone(), metrics.clone());
    worker.seed_expected(0, 1);
    let ticking = wants_ticks(&plan);
    let tick_ms = TICK_INTERVAL.as_millis() as i64;
    let mut decoded: Vec<Decoded> = plan
        .inputs
        .iter()
        .map(|input| Decoded::for_plan(&input.fields))
        .collect();
    let mut summary = Summary::default();
    let mut out: Vec<Outgoing> = Vec::new();
    let mut clock: Option<i64> = None;
    let mut next_tick = i64::MIN;
    let mut paced_from: Option<(Instant, i64)> = None;
    let mut lsn = 0u64;

    let mut drain = |out: &mut Vec<Outgoing>, summary: &mut Summary| -> anyhow::Result<()> {
        for message in out.drain(..) {
            let text = String::from_utf8(message.payload).map_err(|_| {
                anyhow::anyhow!(
                    "an event for {} is not UTF-8 (a bug in weir)",
                    message.topic
                )
            })?;
            let payload = RawValue::from_string(text).with_context(|| {
                format!("an event for {} is not JSON (a bug in weir)", message.topic)
            })?;
            let emitted = Emitted {
                topic: message.topic,
                payload,
            };
            if message.rule.is_none() {
                summary.dead_letters += 1;
            } else {
                summary.events += 1;
            }
            emit(emitted)?;
        }
        Ok(())
    };

    for record in records {
        summary.records += 1;
        let Some((input, _)) = plan.match_topic(&record.topic) else {
            summary.unmatched += 1;
            continue;
        };
        // The arrival time: as recorded, else the reading's own time, else the clock as it is.
        let at = record.received.or_else(|| {
            let buffer = &mut decoded[input];
            plan.inputs[input]
                .fields
                .decode(&record.payload, buffer)
                .ok()
                .and(buffer.ts)
        });
        let now = match (clock, at) {
            (Some(clock), Some(at)) => clock.max(at),
            (Some(clock), None) => clock,
            (None, Some(at)) => at,
            (None, None) => 0,
        };
        if clock.is_none() {
            next_tick = now;
        }
        clock = Some(now);
        if let Some(speed) = options.speed {
            let (started, first) = *paced_from.get_or_insert((Instant::now(), now));
            let due = Duration::from_secs_f64((now - first).max(0) as f64 / 1e3 / speed);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        if ticking {
            while next_tick <= now {
                worker.tick(next_tick, &mut out);
                next_tick += tick_ms;
            }
            drain(&mut out, &mut summary)?;
        }
        let message = RawMessage {
            input,
            topic: record.topic,
            payload: record.payload,
            arrival: Instant::now(),
            arrival_ms: now,
            lsn,
            trace: None,
        };
        lsn += 1;
        worker.process_contained(&message, &mut out);
        drain(&mut out, &mut summary)?;
    }
    if let (true, Some(clock)) = (ticking, clock) {
        let end = clock.saturating_add(options.tail.as_millis() as i64);
        while next_tick <= end {
            worker.tick(next_tick, &mut out);
            next_tick += tick_ms;
        }
        drain(&mut out, &mut summary)?;
    }
    worker.close(&mut out);
    drain(&mut out, &mut summary)?;
    summary.decode_errors = metrics.decode_errors_total();
    summary.late = sum(&metrics.readings_late);
    summary.out_of_order = sum(&metrics.readings_out_of_order);
    Ok(summary)
}

fn sum(counter: &prometheus::IntCounterVec) -> u64 {
    use prometheus::core::Collector;
    counter
        .collect()
        .iter()
        .flat_map(|family| family.get_metric())
        .map(|m| m.get_counter().get_value() as u64)
        .sum()
}

/// Standard base64 (RFC 4648) with padding, as `weir record` writes binary payloads.
pub fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Decodes standard base64, with or without padding; whitespace is ignored.
///
/// # Errors
/// A character outside the alphabet, or a length no encoder produces.
pub fn base64_decode(text: &str) -> anyhow::Result<Vec<u8>> {
    let value = |c: u8| -> anyhow::Result<u32> {
        Ok(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => anyhow::bail!("{:?} is not a base64 character", char::from(c)),
        }
        .into())
    };
    let digits: Vec<u8> = text.bytes().filter(|c| !c.is_ascii_whitespace()).collect();
    let digits = digits
        .strip_suffix(b"==")
        .or_else(|| digits.strip_suffix(b"="))
        .unwrap_or(&digits);
    if digits.len() % 4 == 1 {
        anyhow::bail!(
            "{} base64 digits cannot be a whole number of bytes",
            digits.len()
        );
    }
    let mut out = Vec::with_capacity(digits.len() * 3 / 4);
    for chunk in digits.chunks(4) {
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= value(*c)? << (18 - 6 * i);
        }
        out.extend_from_slice(&n.to_be_bytes()[1..chunk.len()]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
[broker]
url = "mqtt://127.0.0.1:1883"

[inputs.telemetry]
topic = "sensors/{site}/{device}/telemetry"

[inputs.telemetry.time]
field = "ts"
unit = "ms"

[rules.overheat.hysteresis]
metric = "temperature"
enter_above = 30.0
exit_below = 28.0

[rules.overheat.output]
topic = "alerts/{site}/{device}/{rule}"

[rules.climate.tumbling]
size = "10s"
metrics = ["temperature"]
aggregates = ["count", "max"]

[rules.climate.output]
topic = "rollups/{site}/{device}/{rule}"
format = "cbor"

[rules.alive.liveness]
timeout = "5s"

[rules.alive.output]
topic = "alive/{site}/{device}"
"#;

    const T0: i64 = 1_732_600_000_000;

    fn config() -> Config {
        crate::config::parse(CONFIG, Path::new("test.toml"), &Default::default())
            .unwrap_or_else(|err| panic!("{err}"))
    }

    fn reading(device: &str, ts: i64, temperature: f64) -> Record {
        Record {
            topic: format!("sensors/s1/{device}/telemetry"),
            payload: Bytes::from(format!(r#"{{"ts":{ts},"temperature":{temperature}}}"#)),
            received: None,
        }
    }

    fn run(records: Vec<Record>, options: ReplayOptions) -> (Vec<Emitted>, Summary) {
        let mut events = Vec::new();
        let summary = replay(&config(), records, options, |e| {
            events.push(e);
            Ok(())
        })
        .expect("replay");
        (events, summary)
    }

    #[test]
    fn base64_round_trips_every_length() {
        for len in 0..10u8 {
            let bytes: Vec<u8> = (0..len).map(|i| i.wrapping_mul(97)).collect();
            let text = base64_encode(&bytes);
            assert_eq!(base64_decode(&text).expect("decodes"), bytes);
            assert_eq!(
                base64_decode(text.trim_end_matches('=')).expect("unpadded"),
                bytes
            );
        }
        assert_eq!(base64_decode("aGk=").expect("decodes"), b"hi");
        assert!(base64_decode("a").is_err());
        assert!(base64_decode("a*==").is_err());
    }

    #[test]
    fn a_json_line_keeps_its_payload_byte_for_byte() {
        let record =
            parse_line(r#"{"topic": "t/1", "payload": {"b": 1.10, "a": 2}, "received": 5}"#)
                .expect("parses");
        assert_eq!(&record.payload[..], br#"{"b": 1.10, "a": 2}"#);
        assert_eq!(record.received, Some(5));
        let text = parse_line(r#"{"topic": "t/1", "payload_text": "offline"}"#).expect("parses");
        assert_eq!(&text.payload[..], b"offline");
        let cbor =
            parse_line(r#"{"topic": "t/1", "payload_cbor": {"door": "open"}}"#).expect("parses");
        let back: serde_json::Value =
            ciborium::from_reader(&cbor.payload[..]).expect("payload_cbor is CBOR");
        assert_eq!(back, serde_json::json!({"door": "open"}));
    }

    #[test]
    fn a_json_line_needs_exactly_one_payload() {
        let none = parse_line(r#"{"topic": "t/1"}"#).expect_err("no payload");
        assert!(none.to_string().contains("exactly one"), "{none}");
        assert!(parse_line(r#"{"topic": "t", "payload": {}, "payload_text": "x"}"#).is_err());
        let typo = parse_line(r#"{"topic": "t", "payload": {}, "recieved": 1}"#).expect_err("typo");
        assert!(typo.to_string().contains("recieved"), "{typo}");
    }

    #[test]
    fn replay_emits_transitions_windows_as_json_and_flushes_at_the_end() {
        let records = vec![
            reading("d1", T0, 25.0),
            reading("d1", T0 + 1_000, 31.0),
            reading("d1", T0 + 2_000, 29.0),
            reading("d1", T0 + 3_000, 27.0),
            reading("d1", T0 + 12_000, 26.0),
        ];
        let (events, summary) = run(records, ReplayOptions::default());
        // d1's 9 s pause also takes it offline and back (the liveness rule); left out here.
        let events: Vec<&Emitted> = events
            .iter()
            .filter(|e| e.json()["kind"] != "liveness")
            .collect();
        let kinds: Vec<(&str, String)> = events
            .iter()
            .map(|e| {
                (
                    e.topic.as_str(),
                    e.json()["kind"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect();
        assert_eq!(
            kinds,
            [
                ("alerts/s1/d1/overheat", "state_change".to_owned()),
                ("alerts/s1/d1/overheat", "state_change".to_owned()),
                // The CBOR rule's window comes out as JSON.
                ("rollups/s1/d1/climate", "window".to_owned()),
                ("rollups/s1/d1/climate", "window".to_owned()),
            ]
        );
        assert_eq!(events[2].json()["metrics"]["temperature"]["max"], 31.0);
        assert_eq!(events[3].json()["partial"], true);
        assert_eq!(summary.events, 6);
        assert_eq!(summary.records, 5);
    }

    #[test]
    fn the_virtual_clock_drives_liveness_timeouts() {
        // d2 keeps the clock moving; d1 falls silent after its first reading.
        let mut records = vec![reading("d1", T0, 20.0)];
        for s in 1..=10 {
            records.push(reading("d2", T0 + s * 1_000, 20.0));
        }
        let (events, _) = run(records, ReplayOptions::default());
        let offline: Vec<&Emitted> = events
            .iter()
            .filter(|e| e.json()["kind"] == "liveness")
            .collect();
        assert_eq!(offline.len(), 1, "{events:#?}");
        assert_eq!(offline[0].topic, "alive/s1/d1");
        assert_eq!(offline[0].json()["to"], "offline");
        // Heard from at the first tick (T0), silent for more than 5 s: the tick 250 ms later.
        assert_eq!(offline[0].json()["ts"], T0 + 5_250);
    }

    #[test]
    fn the_tail_keeps_the_clock_running_after_the_last_record() {
        let records = vec![reading("d1", T0, 20.0)];
        let (events, _) = run(records.clone(), ReplayOptions::default());
        assert!(events.iter().all(|e| e.json()["kind"] != "liveness"));
        let (events, _) = run(
            records,
            ReplayOptions {
                tail: Duration::from_secs(6),
                ..ReplayOptions::default()
            },
        );
        assert!(events.iter().any(|e| e.json()["kind"] == "liveness"));
    }

    #[test]
    fn unmatched_topics_and_bad_payloads_are_counted() {
        let records = vec![
            Record {
                topic: "other/topic".into(),
                payload: Bytes::from_static(b"{}"),
                received: None,
            },
            Record {
                topic: "sensors/s1/d1/telemetry".into(),
                payload: Bytes::from_static(b"not json"),
                received: Some(T0),
            },
        ];
        let (_, summary) = run(records, ReplayOptions::default());
        assert_eq!(summary.unmatched, 1);
        assert_eq!(summary.decode_errors, 1);
    }

    #[test]
    fn csv_rows_become_readings_in_the_inputs_time_field() {
        let dir = std::env::temp_dir().join(format!("weir-replay-csv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("series.csv");
        std::fs::write(
            &path,
            "timestamp,value\n2013-12-02 21:15:00,73.5\n2013-12-02 21:20:00,74\n",
        )
        .expect("write csv");
        let options = CsvOptions {
            topic: "sensors/nab/m1/telemetry".into(),
            time_column: "timestamp".into(),
            time_unit: TimeUnit::Ms,
            metric: Some("temperature".into()),
            value_column: "value".into(),
        };
        let records = read_csv(&path, &options, &config()).expect("reads");
        std::fs::remove_dir_all(&dir).ok();
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].received, Some(1_386_018_900_000));
        let payload: serde_json::Value = serde_json::from_slice(&records[0].payload).expect("JSON");
        assert_eq!(
            payload,
            serde_json::json!({"ts": 1_386_018_900_000_i64, "temperature": 73.5})
        );
    }
}
