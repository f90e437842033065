//! Replay runs the same engine as a live weir: one generated stream, published through a real
//! Mosquitto into weir (two workers) and replayed by the `weir replay` binary, gives the same
//! derived events. Also `weir record` capturing live traffic into what replay reads, and
//! `weir test` on the golden cases of tests/fixtures/.

mod common;

use common::{
    config_from_text, start_weir_with, temp_dir, wait_until, KillOnDrop, Mosquitto, Publisher,
    Subscriber, DEADLINE, T0,
};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output, Stdio};

const WEIR: &str = env!("CARGO_BIN_EXE_weir");

/// Every detector and window kind that depends only on event time and order (no liveness, no
/// idle timeout: those follow the processing clock, which replay simulates). All output goes
/// under out/ so one subscriber sees it.
const CONFIG: &str = r#"
[broker]
url = "mqtt://127.0.0.1:1883"

[pipeline]
workers = 2

[dead_letter]
topic = "out/dead/{input}/{reason}"

[inputs.telemetry]
topic = "sensors/{site}/{device}/telemetry"
qos = 1
seq_field = "seq"

[inputs.telemetry.time]
field = "ts"
unit = "ms"

[rules.overheat.hysteresis]
metric = "temperature"
enter_above = 30.0
exit_below = 28.0
active = "hot"
inactive = "normal"

[rules.overheat.output]
topic = "out/alerts/{site}/{device}/{rule}"

[rules.level.thresholds]
metric = "temperature"
levels = [
  { name = "warm", set_above = 27.0, reset_below = 26.0 },
  { name = "hot", set_above = 31.0, reset_below = 30.0 },
]
for = "2s"
flapping = { max_changes = 4, within = "20s" }

[rules.level.output]
topic = "out/alerts/{site}/{device}/{rule}"

[rules.climate.tumbling]
size = "10s"
metrics = ["temperature", "humidity"]
aggregates = ["count", "min", "max", "avg", "p50"]
max_out_of_orderness = "2s"
allowed_lateness = "5s"

[rules.climate.output]
topic = "out/rollups/{site}/{device}/{rule}"
format = "cbor"

[rules.humidity.hopping]
size = "20s"
slide = "10s"
metrics = ["humidity"]
aggregates = ["avg", "max"]

[rules.humidity.output]
topic = "out/rollups/{site}/{device}/{rule}"

[rules.report.deadband]
metrics = ["temperature"]
absolute = 1.0

[rules.report.output]
topic = "out/reports/{site}/{device}/{rule}"

[rules.door.change]
fields = ["door"]
flapping = { max_changes = 3, within = "10s" }

[rules.door.output]
topic = "out/events/{site}/{device}/{rule}"

[rules.surge.rate_of_change]
metrics = ["temperature"]
window = "5s"
max_per_second = 1.0

[rules.surge.output]
topic = "out/alerts/{site}/{device}/{rule}"

[rules.frozen.stuck]
metrics = ["humidity"]
for = "15s"

[rules.frozen.output]
topic = "out/alerts/{site}/{device}/{rule}"

[rules.odd.anomaly]
metrics = ["temperature"]
readings = 20
z_threshold = 3.0

[rules.odd.output]
topic = "out/alerts/{site}/{device}/{rule}"
"#;

/// A deterministic stream: 4 devices on 2 sites, 90 s of one reading a second each, with
/// temperatures that cross every threshold, a door that opens and closes, a humidity sensor
/// that freezes, a spike, out-of-order and late readings, a redelivered duplicate, and two bad
/// payloads. Returns (topic, payload) in publish order.
fn stream() -> Vec<(String, String)> {
    let mut readings = Vec::new();
    let devices = [("s1", "d1"), ("s1", "d2"), ("s2", "d3"), ("s2", "d4")];
    for second in 0..90i64 {
        for (n, (site, device)) in devices.iter().enumerate() {
            let n = n as i64;
            let phase = (second + 7 * n) as f64 / 6.0;
            let mut temperature = (27.5 + 4.5 * phase.sin() + n as f64 * 0.3) * 10.0;
            temperature = temperature.round() / 10.0;
            if *device == "d2" && second == 40 {
                temperature = 45.0; // a spike: anomaly and rate of change
            }
            let humidity = if *device == "d3" && (30..60).contains(&second) {
                55.0 // frozen
            } else {
                (50.0 + 5.0 * (phase / 2.0).cos() * 10.0).round() / 10.0
            };
            let door = if *device == "d4" && (60..70).contains(&second) {
                ["open", "closed"][second as usize % 2] // a flapping door switch
            } else if (second / 13 + n) % 3 == 0 {
                "open"
            } else {
                "closed"
            };
            let payload = json!({
                "ts": T0 + second * 1000,
                "seq": second,
                "temperature": temperature,
                "humidity": humidity,
                "door": door,
            });
            readings.push((
                format!("sensors/{site}/{device}/telemetry"),
                payload.to_string(),
            ));
        }
    }
    // Out of order within max_out_of_orderness: swap two of d1's readings.
    let a = readings
        .iter()
        .position(|(t, p)| t.contains("/d1/") && p.contains("\"seq\":21,"))
        .expect("d1 seq 21");
    let b = readings
        .iter()
        .position(|(t, p)| t.contains("/d1/") && p.contains("\"seq\":22,"))
        .expect("d1 seq 22");
    readings.swap(a, b);
    // Late: within allowed lateness for d2 (an update), and past it for d4 (counted late).
    let late = |device: &str, site: &str, second: i64| {
        (
            format!("sensors/{site}/{device}/telemetry"),
            json!({"ts": T0 + second * 1000, "seq": 1000 + second, "temperature": 20.0, "humidity": 40.0})
                .to_string(),
        )
    };
    // d2's watermark at its reading of second 44 is 42 s: window [30 s, 40 s) has fired and is
    // kept until 45 s, so a reading stamped 38 s updates it.
    let after = readings
        .iter()
        .position(|(t, p)| t.contains("/d2/") && p.contains("\"seq\":44,"))
        .expect("d2 seq 44");
    readings.insert(after + 1, late("d2", "s1", 38));
    readings.push(late("d4", "s2", 3));
    // A redelivery (same payload again) and two payloads that cannot become readings.
    let again = readings[100].clone();
    readings.insert(101, again);
    readings.insert(150, ("sensors/s1/d1/telemetry".into(), "{not json".into()));
    readings.insert(200, ("sensors/s2/d3/telemetry".into(), "[1, 2]".into()));
    readings
}

fn canonical(topic: &str, payload: &Value) -> String {
    json!({"topic": topic, "payload": rounded(payload)}).to_string()
}

/// `value` with every fractional number cut to 12 significant digits. The engine computes the
/// same f64s live and in replay, but the live CBOR rule is decoded exactly (ciborium) while
/// replay's JSON text goes through serde_json's parser, which reads some 17-digit numbers one
/// ULP off (it lacks `float_roundtrip`); 12 digits hide that and nothing else.
fn rounded(value: &Value) -> Value {
    match value {
        Value::Number(n) if n.is_f64() => {
            Value::String(format!("{:.11e}", n.as_f64().unwrap_or_default()))
        }
        Value::Array(items) => Value::Array(items.iter().map(rounded).collect()),
        Value::Object(map) => {
            Value::Object(map.iter().map(|(k, v)| (k.clone(), rounded(v))).collect())
        }
        other => other.clone(),
    }
}

/// Derived events as a multiset of canonical lines, and dead letters as (topic, reason) counts;
/// a dead letter's `received` is its arrival time, which differs between the two runs.
type Outcome = (BTreeMap<String, usize>, BTreeMap<(String, String), usize>);

fn tally(events: impl IntoIterator<Item = (String, Value)>) -> Outcome {
    let mut derived = BTreeMap::new();
    let mut dead = BTreeMap::new();
    for (topic, payload) in events {
        if payload["kind"] == "dead_letter" {
            let reason = payload["reason"].as_str().unwrap_or_default().to_owned();
            *dead.entry((topic, reason)).or_insert(0) += 1;
        } else {
            *derived.entry(canonical(&topic, &payload)).or_insert(0) += 1;
        }
    }
    (derived, dead)
}

fn weir(args: &[&str]) -> Output {
    Command::new(WEIR)
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("WEIR_BROKER")
        .stdin(Stdio::null())
        .output()
        .expect("run weir")
}

fn stdout_lines(output: &Output) -> Vec<(String, Value)> {
    assert!(
        output.status.success(),
        "weir failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| {
            let line: Value = serde_json::from_str(line).expect("a JSON line");
            (
                line["topic"].as_str().expect("topic").to_owned(),
                line["payload"].clone(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_gives_the_same_events_as_a_live_run_through_mosquitto() {
    let readings = stream();

    // Live: the readings through a real broker into weir, then a clean stop (which flushes the
    // open windows as partial, as replay does at the end of input).
    let broker = Mosquitto::start();
    let config = config_from_text(&broker, CONFIG, "replay-live");
    let weir_live = start_weir_with(config).await;
    let metrics = weir_live.metrics.clone();
    let mut out = Subscriber::start(&broker, "out/#").await;
    let mut device = Publisher::start(&broker).await;
    for (topic, payload) in &readings {
        device
            .publish_pipelined(topic, payload.clone(), false, 32)
            .await;
    }
    device.flush().await;
    let seen = || {
        metrics.readings_total() >= readings.len() as u64
            && metrics
                .readings_decoded
                .with_label_values(&["telemetry"])
                .get()
                + metrics.decode_errors_total()
                + metrics
                    .duplicates_dropped
                    .with_label_values(&["telemetry"])
                    .get()
                == readings.len() as u64
    };
    assert!(
        wait_until(DEADLINE, seen).await,
        "weir did not process all {} readings",
        readings.len()
    );
    weir_live.stop().await.expect("weir stops cleanly");
    let published = metrics.events_total()
        + metrics
            .dead_letters
            .with_label_values(&["telemetry", "malformed"])
            .get()
        + metrics
            .dead_letters
            .with_label_values(&["telemetry", "not_an_object"])
            .get();
    let live: Vec<(String, Value)> = out
        .take(published as usize)
        .await
        .into_iter()
        .map(|m| {
            // The climate rule publishes CBOR; replay writes every event as JSON.
            let payload = serde_json::from_slice(&m.payload).unwrap_or_else(|_| {
                ciborium::from_reader(&m.payload[..]).expect("payload is JSON or CBOR")
            });
            (m.topic, payload)
        })
        .collect();
    out.assert_quiet().await;

    // Replay: the same readings as JSON lines, without arrival times, through `weir replay`.
    let dir = temp_dir("replay");
    let config_path = dir.join("config.toml");
    let input_path = dir.join("input.jsonl");
    std::fs::write(&config_path, CONFIG).expect("write config");
    let lines: Vec<String> = readings
        .iter()
        .map(|(topic, payload)| {
            let payload: Value =
                serde_json::from_str(payload).unwrap_or_else(|_| Value::String(payload.clone()));
            match payload {
                // The bad JSON goes in as text, byte for byte.
                Value::String(text) => json!({"topic": topic, "payload_text": text}).to_string(),
                payload => json!({"topic": topic, "payload": payload}).to_string(),
            }
        })
        .collect();
    std::fs::write(&input_path, lines.join("\n") + "\n").expect("write input");
    let output = weir(&[
        "replay",
        "--config",
        config_path.to_str().expect("utf-8 path"),
        "--input",
        input_path.to_str().expect("utf-8 path"),
    ]);
    let replayed = stdout_lines(&output);
    let summary = String::from_utf8_lossy(&output.stderr).into_owned();

    let (live_events, live_dead) = tally(live);
    let (replay_events, replay_dead) = tally(replayed);
    let kinds: BTreeMap<&str, usize> =
        live_events.keys().fold(BTreeMap::new(), |mut kinds, line| {
            let kind = [
                "state_change",
                "window",
                "report",
                "change",
                "rate_of_change",
                "stuck",
                "anomaly",
                "flapping",
            ]
            .into_iter()
            .find(|k| line.contains(&format!("\"kind\":\"{k}\"")))
            .unwrap_or("other");
            *kinds.entry(kind).or_insert(0) += 1;
            kinds
        });
    println!("live events by kind: {kinds:?}; replay: {summary}");
    // The scenario exercises every kind and the late path, so the comparison means something.
    for kind in [
        "state_change",
        "window",
        "report",
        "change",
        "rate_of_change",
        "stuck",
        "anomaly",
        "flapping",
    ] {
        assert!(
            kinds.contains_key(kind),
            "no {kind} event in the live run: {kinds:?}"
        );
    }
    assert!(
        live_events.keys().any(|line| line.contains("\"update\":1")),
        "no window update for a late reading"
    );
    assert!(live_events
        .keys()
        .any(|line| line.contains("\"partial\":true")));
    let only_live: Vec<&String> = live_events
        .keys()
        .filter(|k| live_events.get(*k) != replay_events.get(*k))
        .collect();
    let only_replay: Vec<&String> = replay_events
        .keys()
        .filter(|k| live_events.get(*k) != replay_events.get(*k))
        .collect();
    assert!(
        only_live.is_empty() && only_replay.is_empty(),
        "live and replay differ.\nonly live: {only_live:#?}\nonly replay: {only_replay:#?}"
    );
    assert_eq!(live_dead, replay_dead);
    assert_eq!(live_dead.values().sum::<usize>(), 2);
    assert!(summary.contains("2 dead letters"), "{summary}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_captures_live_traffic_that_replay_reads_back() {
    let broker = Mosquitto::start();
    let dir = temp_dir("record");
    let recording = dir.join("recorded.jsonl");
    let mut recorder = KillOnDrop(
        Command::new(WEIR)
            .args([
                "record",
                "--broker",
                &broker.url(),
                "--topic",
                "sensors/#",
                "--count",
                "3",
            ])
            .arg("--output")
            .arg(&recording)
            .env("WEIR_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start weir record"),
    );
    // Publish until the recorder is subscribed and has all three: it may miss the first ones
    // while it connects, so keep a device publishing.
    let mut device = Publisher::start(&broker).await;
    let cbor = {
        let mut bytes = Vec::new();
        ciborium::into_writer(&json!({"ts": T0, "temperature": 31.5}), &mut bytes).expect("cbor");
        bytes
    };
    let mut sent = 0;
    let done = loop {
        if let Some(status) = recorder.0.try_wait().expect("poll the recorder") {
            break status;
        }
        assert!(sent < 2000, "the recorder never finished");
        match sent % 3 {
            0 => {
                device
                    .publish(
                        "sensors/s1/d1/telemetry",
                        br#"{"ts": 1732600000000, "temperature": 25.0}"#.to_vec(),
                    )
                    .await
            }
            1 => {
                device
                    .publish("sensors/s1/d1/status", b"offline".to_vec())
                    .await
            }
            _ => {
                device
                    .publish("sensors/s1/d2/telemetry", cbor.clone())
                    .await
            }
        }
        sent += 1;
        // Pacing, not an assertion: let the recorder catch up between publishes.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert!(done.success(), "weir record failed");
    let text = std::fs::read_to_string(&recording).expect("read the recording");
    let records: Vec<weir::replay::Record> = text
        .lines()
        .map(|line| weir::replay::parse_line(line).expect("a record line"))
        .collect();
    assert_eq!(records.len(), 3, "{text}");
    for record in &records {
        assert!(record.received.is_some());
        let exact: &[u8] = match record.topic.as_str() {
            "sensors/s1/d1/telemetry" => br#"{"ts": 1732600000000, "temperature": 25.0}"#,
            "sensors/s1/d1/status" => b"offline",
            _ => &cbor,
        };
        assert_eq!(&record.payload[..], exact, "{text}");
    }
}

#[test]
fn golden_cases_in_tests_fixtures_pass() {
    let output = weir(&["test", "tests/fixtures"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("{stdout}");
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn weir_test_prints_a_diff_and_fails_when_events_differ() {
    let dir = temp_dir("golden");
    let case = dir.join("overheat");
    std::fs::create_dir_all(&case).expect("case dir");
    std::fs::write(
        case.join("config.toml"),
        r#"
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
"#,
    )
    .expect("config");
    let input: String = [25.0, 31.0, 27.0]
        .iter()
        .enumerate()
        .map(|(i, t)| {
            json!({"topic": "sensors/s1/d1/telemetry", "payload": {"ts": T0 + i as i64 * 1000, "temperature": t}})
                .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(case.join("input.jsonl"), input).expect("input");
    let dir_arg = dir.to_str().expect("utf-8 path");

    // --update writes the expected events; the case then passes.
    let update = weir(&["test", "--update", dir_arg]);
    assert!(update.status.success());
    let expected = std::fs::read_to_string(case.join("expected.jsonl")).expect("expected");
    assert_eq!(expected.lines().count(), 2, "{expected}");
    assert!(weir(&["test", dir_arg]).status.success());

    // Expect a different exit threshold: the second event moves, and the diff shows it.
    let edited = expected.replacen("\"to\":\"inactive\"", "\"to\":\"cold\"", 1);
    std::fs::write(case.join("expected.jsonl"), edited).expect("edit expected");
    let failed = weir(&["test", dir_arg]);
    let stdout = String::from_utf8_lossy(&failed.stdout);
    assert_eq!(failed.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("FAIL    overheat"), "{stdout}");
    assert!(
        stdout.contains("  - {") && stdout.contains("\"to\":\"cold\""),
        "{stdout}"
    );
    assert!(
        stdout.contains("  + {") && stdout.contains("\"to\":\"inactive\""),
        "{stdout}"
    );
    assert!(stdout.contains("1 cases: 0 passed, 1 failed"), "{stdout}");
    std::fs::remove_dir_all(&dir).ok();
    assert!(!Path::new(dir_arg).exists());
}
