//! Event-time windows end to end through a real Mosquitto: per-device watermarks (a device with
//! a skewed clock holds back no one), the idle timer closing a silent device's window with no
//! reading arriving, the late-data topic, and an hourly replay of a real sensor series (NAB)
//! compared with rollups computed independently from the CSV.

mod common;

use common::{start_weir_from_text, Mosquitto, Publisher, Subscriber, T0};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

const CONFIG: &str = r#"
[broker]
url = "mqtt://127.0.0.1:1883"

[pipeline]
workers = 2

[inputs.telemetry]
topic = "sensors/{site}/{device}/telemetry"
qos = 1

[inputs.telemetry.time]
field = "ts"
unit = "ms"

[rules.climate.tumbling]
size = "10s"
metrics = ["temperature"]
aggregates = ["count", "min", "max", "avg"]
idle_timeout = "1s"
late_topic = "late/{site}/{device}/{rule}"

[rules.climate.output]
topic = "rollups/{site}/{device}/{rule}"
qos = 1
"#;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The rollup's fields that the scenario fixes (id and cause checked separately).
fn window(message: &common::Message) -> (String, i64, Value) {
    let event = message.json();
    let device = event["device"].as_str().unwrap_or_default().to_owned();
    let start = event["start"].as_i64().unwrap_or_default();
    (device, start, event)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_skewed_device_holds_back_no_one_and_a_silent_one_is_closed_by_the_timer() {
    let broker = Mosquitto::start();
    let weir = start_weir_from_text(&broker, CONFIG, "windows").await;
    let mut rollups = Subscriber::start(&broker, "rollups/#").await;
    let mut late = Subscriber::start(&broker, "late/#").await;
    let mut devices = Publisher::start(&broker).await;

    // d2's clock runs an hour behind, and d2 then goes silent for good.
    let skewed = T0 - 3_600_000;
    devices
        .reading(
            "s1",
            "d2",
            json!({"ts": skewed + 1_000, "temperature": 50.0}),
        )
        .await;
    // d1's windows fire on d1's own watermark.
    for (ts, t) in [(T0 + 1_000, 20.0), (T0 + 5_000, 24.0), (T0 + 12_000, 30.0)] {
        devices
            .reading("s1", "d1", json!({"ts": ts, "temperature": t}))
            .await;
    }
    // A straggler for d1's fired window, then a reading stamped half an hour ahead of the gateway:
    // past the window's max_future_skew (5m), within the input's max_clock_skew (1h, beyond
    // which it would be dead-lettered before reaching any rule).
    devices
        .reading("s1", "d1", json!({"ts": T0 + 2_000, "temperature": 99.0}))
        .await;
    let future = now_ms() + 1_800_000;
    devices
        .reading("s1", "d1", json!({"ts": future, "temperature": 99.0}))
        .await;

    // Three windows: d1's first by its watermark; d1's second and d2's by the idle timer,
    // since no further reading arrives for either device.
    let mut got: BTreeMap<(String, i64), Value> = rollups
        .take(3)
        .await
        .iter()
        .map(|m| {
            let (device, start, event) = window(m);
            assert_eq!(m.topic, format!("rollups/s1/{device}/climate"));
            ((device, start), event)
        })
        .collect();
    let first = got.remove(&("d1".into(), T0)).expect("d1's first window");
    assert_eq!(first["end"], json!(T0 + 10_000));
    assert_eq!(
        first["metrics"]["temperature"],
        json!({"count": 2, "min": 20.0, "max": 24.0, "avg": 22.0})
    );
    assert_eq!(first["cause"]["ts"], json!(T0 + 12_000));
    assert!(first.get("partial").is_none(), "{first}");

    let second = got
        .remove(&("d1".into(), T0 + 10_000))
        .expect("d1's second window");
    assert_eq!(second["closed_by"], json!("idle_timeout"));
    assert_eq!(second["partial"], json!(true));
    assert_eq!(second["metrics"]["temperature"]["count"], json!(1));
    assert!(second.get("cause").is_none());

    let silent_start = skewed - skewed.rem_euclid(10_000);
    let silent = got
        .remove(&("d2".into(), silent_start))
        .expect("d2's window");
    assert_eq!(silent["closed_by"], json!("idle_timeout"));
    assert_eq!(silent["metrics"]["temperature"]["avg"], json!(50.0));
    assert!(got.is_empty(), "{got:?}");

    // The straggler and the future reading went to the late topic, with their reasons.
    let late = late.take(2).await;
    let reasons: Vec<Value> = late.iter().map(|m| m.json()["reason"].clone()).collect();
    assert_eq!(reasons, vec![json!("late"), json!("future")]);
    assert_eq!(late[0].topic, "late/s1/d1/climate");
    assert_eq!(late[0].json()["values"], json!({"temperature": 99.0}));
    assert_eq!(late[1].json()["ts"], json!(future));
    let counter = |reason: &str| {
        weir.metrics
            .readings_late
            .with_label_values(&["climate", reason])
            .get()
    };
    assert_eq!((counter("late"), counter("future")), (1, 1));
    rollups.assert_quiet().await;
    weir.stop().await.expect("weir stops cleanly");
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) as ms since the epoch.
fn epoch_ms(timestamp: &str) -> i64 {
    let n = |range: std::ops::Range<usize>| -> i64 {
        timestamp[range]
            .parse()
            .unwrap_or_else(|_| panic!("bad timestamp {timestamp}"))
    };
    let days = days_from_civil(n(0..4), n(5..7), n(8..10));
    ((days * 24 + n(11..13)) * 60 + n(14..16)) * 60_000 + n(17..19) * 1000
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_nab_series_gives_the_hourly_rollups_computed_from_the_csv() {
    // In the repository (tests/fixtures/nab, MIT), so a missing file is a failure, not a skip.
    let csv_path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/nab/machine_temperature_system_failure.csv"
    );
    let csv = std::fs::read_to_string(csv_path).unwrap_or_else(|err| {
        panic!(
            "cannot read {csv_path} ({err}); restore it with `git checkout -- tests/fixtures/nab`"
        )
    });
    let readings: Vec<(&str, i64, f64)> = csv
        .lines()
        .skip(1)
        .filter_map(|line| line.split_once(','))
        .map(|(ts, v)| (ts, epoch_ms(ts), v.parse().expect("a number")))
        .collect();
    // Expected hourly rollups, computed straight from the CSV.
    let mut expected: BTreeMap<i64, (u64, f64, f64, f64)> = BTreeMap::new();
    for &(_, ts, v) in &readings {
        let start = ts - ts.rem_euclid(3_600_000);
        let e = expected
            .entry(start)
            .or_insert((0, f64::MAX, f64::MIN, 0.0));
        *e = (e.0 + 1, e.1.min(v), e.2.max(v), e.3 + v);
    }

    let config = r#"
[broker]
url = "mqtt://127.0.0.1:1883"

[inputs.machines]
topic = "plant/{device}/temperature"
qos = 1

[inputs.machines.time]
field = "timestamp"
unit = "rfc3339"

[rules.hourly.tumbling]
size = "1h"
metrics = ["value"]
aggregates = ["count", "min", "max", "avg"]
idle_timeout = "3s"

[rules.hourly.output]
topic = "rollups/{device}/{rule}"
qos = 1
"#;
    let broker = Mosquitto::start();
    let weir = start_weir_from_text(&broker, config, "nab").await;
    let mut machine_rollups = Subscriber::start(&broker, "rollups/machine/hourly").await;
    let mut silent_rollups = Subscriber::start(&broker, "rollups/silent/hourly").await;
    let mut publisher = Publisher::start(&broker).await;

    // A second device sends two readings and then nothing: only the idle timer can close it.
    for (ts, v) in [
        ("2014-01-01T00:05:00Z", 60.0),
        ("2014-01-01T00:10:00Z", 70.0),
    ] {
        publisher
            .publish(
                "plant/silent/temperature",
                json!({"timestamp": ts, "value": v}).to_string(),
            )
            .await;
    }
    for &(ts, _, v) in &readings {
        let ts = format!("{}T{}Z", &ts[..10], &ts[11..]);
        publisher
            .publish(
                "plant/machine/temperature",
                json!({"timestamp": ts, "value": v}).to_string(),
            )
            .await;
    }

    let silent = silent_rollups.take(1).await[0].json();
    assert_eq!(silent["closed_by"], json!("idle_timeout"));
    assert_eq!(silent["start"], json!(epoch_ms("2014-01-01 00:00:00")));
    assert_eq!(
        silent["metrics"]["value"],
        json!({"count": 2, "min": 60.0, "max": 70.0, "avg": 65.0})
    );

    // Every hour fires on the machine's watermark except the last, which the idle timer closes.
    let got = machine_rollups.take(expected.len()).await;
    for (message, (start, (count, min, max, sum))) in got.iter().zip(&expected) {
        let event = message.json();
        assert_eq!(event["start"], json!(start), "{event}");
        let m = &event["metrics"]["value"];
        assert_eq!(m["count"], json!(count), "{event}");
        // serde_json (without `float_roundtrip`) may read a decimal 1 ulp off, so values are
        // compared to 1e-12 relative; the sums of a few dozen readings to 1e-9.
        let close = |got: &Value, want: f64, tolerance: f64| {
            let got = got.as_f64().unwrap_or(f64::NAN);
            assert!(
                (got - want).abs() <= tolerance * want.abs(),
                "{got} vs {want}: {event}"
            );
        };
        close(&m["min"], *min, 1e-12);
        close(&m["max"], *max, 1e-12);
        close(&m["avg"], sum / *count as f64, 1e-9);
    }
    let last = got.last().map(|m| m.json()).unwrap_or_default();
    assert_eq!(last["closed_by"], json!("idle_timeout"));
    assert!(got[..got.len() - 1]
        .iter()
        .all(|m| m.json().get("closed_by").is_none()));
    machine_rollups.assert_quiet().await;
    weir.stop().await.expect("weir stops cleanly");
}
