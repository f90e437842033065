//! Detectors end to end through a real Mosquitto: discrete change with scoping, deadband,
//! liveness (timeout with no data, an expected device that never reports, a plain-text last
//! will), and the NAB replay that measures the anomaly rule against labeled failure windows.

mod common;

use common::{config_at, start_weir_with, wait_until, Message, Mosquitto, Publisher, Subscriber};
use common::{DEADLINE, T0};
use serde_json::{json, Value};

/// Receives messages until `done` holds for what arrived, failing after [`DEADLINE`].
async fn collect_until(
    sub: &mut Subscriber,
    mut done: impl FnMut(&[Message]) -> bool,
) -> Vec<Message> {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut messages = Vec::new();
    while !done(&messages) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match sub.next(left).await {
            Some(message) => messages.push(message),
            None => panic!(
                "condition not met within {DEADLINE:?}; got: {:#?}",
                messages
                    .iter()
                    .map(|m| (
                        m.topic.clone(),
                        String::from_utf8_lossy(&m.payload).into_owned()
                    ))
                    .collect::<Vec<_>>()
            ),
        }
    }
    messages
}

/// The events on `topic`, in arrival order, without their ids.
fn on_topic(messages: &[Message], topic: &str) -> Vec<Value> {
    messages
        .iter()
        .filter(|m| m.topic == topic)
        .map(|m| {
            let mut event = m.json();
            let id = event.as_object_mut().and_then(|o| o.remove("id"));
            assert!(id.is_some_and(|id| id.as_str().is_some_and(|s| s.len() == 16)));
            event
        })
        .collect()
}

fn count(messages: &[Message], topic: &str) -> usize {
    messages.iter().filter(|m| m.topic == topic).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn change_deadband_and_liveness_through_a_real_broker() {
    let broker = Mosquitto::start();
    let weir = start_weir_with(config_at(
        &broker,
        "tests/fixtures/detectors/config.toml",
        "detectors",
    ))
    .await;
    let mut events = Subscriber::start(&broker, "events/#").await;
    let mut device = Publisher::start(&broker).await;

    let d1 = "sensors/plant-1/d1/telemetry";
    let d2 = "sensors/plant-2/d2/telemetry";
    for (i, (door, temperature)) in [("closed", 20.0), ("open", 20.2), ("open", 21.0)]
        .into_iter()
        .enumerate()
    {
        let reading = json!({"ts": T0 + 1000 * i as i64, "seq": i + 1, "door": door, "temperature": temperature});
        device.publish(d1, reading.to_string()).await;
    }
    // plant-2 is outside the door rule's `where`: its door changes are not reported.
    device
        .publish(d2, json!({"ts": T0, "door": "closed"}).to_string())
        .await;
    device
        .publish(d2, json!({"ts": T0 + 1, "door": "open"}).to_string())
        .await;

    // Silence: after 1 s every device is offline, with no data arriving; "ghost" never sent any.
    let alive = |device: &str| format!("events/{device}/alive");
    let messages = collect_until(&mut events, |m| {
        count(m, &alive("plant-1/d1")) == 1
            && count(m, &alive("plant-2/d2")) == 1
            && count(m, &alive("plant-1/ghost")) == 1
            && count(m, "events/plant-1/d1/temperature_report") == 2
            && count(m, "events/plant-1/d1/door") == 1
    })
    .await;

    let cause = |i: i64| json!({"topic": d1, "ts": T0 + 1000 * i, "seq": i + 1});
    assert_eq!(
        on_topic(&messages, "events/plant-1/d1/door"),
        [
            json!({"v": 1, "kind": "change", "rule": "door", "device": "d1", "labels": {"site": "plant-1"},
                "ts": T0 + 1000, "field": "door", "from": "closed", "to": "open", "cause": cause(1)})
        ]
    );
    assert_eq!(
        on_topic(&messages, "events/plant-1/d1/temperature_report"),
        [
            json!({"v": 1, "kind": "report", "rule": "temperature_report", "device": "d1",
                   "labels": {"site": "plant-1"}, "ts": T0, "metric": "temperature", "value": 20.0,
                   "reason": "first", "cause": cause(0)}),
            json!({"v": 1, "kind": "report", "rule": "temperature_report", "device": "d1",
                   "labels": {"site": "plant-1"}, "ts": T0 + 2000, "metric": "temperature", "value": 21.0,
                   "previous": 20.0, "reason": "deadband", "cause": cause(2)}),
        ]
    );
    let ghost = &on_topic(&messages, &alive("plant-1/ghost"))[0];
    assert_eq!(ghost["from"], "unknown");
    assert_eq!(ghost["to"], "offline");
    assert_eq!(ghost["reason"], "never_seen");
    assert_eq!(ghost["labels"], json!({"site": "plant-1"}));
    assert!(
        ghost.get("cause").is_none(),
        "a timeout has no causing reading: {ghost}"
    );
    let d1_offline = &on_topic(&messages, &alive("plant-1/d1"))[0];
    assert_eq!(
        (&d1_offline["from"], &d1_offline["to"]),
        (&json!("online"), &json!("offline"))
    );
    assert_eq!(d1_offline["reason"], "timeout");
    assert!(d1_offline["last_seen"].is_i64());
    let offline = weir.metrics.devices_offline.with_label_values(&["alive"]);
    assert!(
        wait_until(DEADLINE, || offline.get() == 3).await,
        "offline gauge: {}",
        offline.get()
    );

    // Back online with the next reading.
    device
        .publish(
            d1,
            json!({"ts": T0 + 5000, "seq": 9, "temperature": 21.1}).to_string(),
        )
        .await;
    let back = collect_until(&mut events, |m| count(m, &alive("plant-1/d1")) == 1).await;
    let back = &on_topic(&back, &alive("plant-1/d1"))[0];
    assert_eq!(
        (&back["from"], &back["to"], &back["reason"]),
        (&json!("offline"), &json!("online"), &json!("reading"))
    );
    assert_eq!(
        back["cause"],
        json!({"topic": d1, "ts": T0 + 5000, "seq": 9})
    );
    assert!(
        wait_until(DEADLINE, || offline.get() == 2).await,
        "offline gauge: {}",
        offline.get()
    );

    // A plain-text last will, retained: offline at once, then online again.
    device
        .publish_pipelined("status/plant-1/d7", "offline", true, 1)
        .await;
    device
        .publish_pipelined("status/plant-1/d7", "online", true, 1)
        .await;
    let will = collect_until(&mut events, |m| {
        count(m, &alive("plant-1/d7").replace("alive", "last_will")) == 2
    })
    .await;
    let will = on_topic(&will, "events/plant-1/d7/last_will");
    assert_eq!(
        will.iter()
            .map(|e| (e["from"].clone(), e["to"].clone(), e["reason"].clone()))
            .collect::<Vec<_>>(),
        [
            (json!("unknown"), json!("offline"), json!("status")),
            (json!("offline"), json!("online"), json!("reading")),
        ]
    );
    assert_eq!(will[0]["cause"]["topic"], "status/plant-1/d7");
    let text = weir.metrics.render();
    assert!(
        text.contains("weir_devices_offline{rule=\"alive\"}"),
        "{text}"
    );
    weir.stop().await.expect("weir stops cleanly");
}

/// Milliseconds since the epoch of `YYYY-MM-DD HH:MM:SS[.ffffff]` (UTC), as NAB writes times.
fn nab_ms(text: &str) -> i64 {
    let num = |range: std::ops::Range<usize>| -> i64 {
        text[range]
            .parse()
            .unwrap_or_else(|_| panic!("not a NAB time: {text:?}"))
    };
    let (y, m, d) = (num(0..4), num(5..7), num(8..10));
    let (hh, mm, ss) = (num(11..13), num(14..16), num(17..19));
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    ((days * 24 + hh) * 60 + mm) * 60_000 + ss * 1000
}

/// Precision and recall of alerts against labeled windows (inclusive): an alert inside a window
/// is a true positive; a window with at least one alert is detected.
#[derive(Debug, PartialEq)]
struct Score {
    alerts: usize,
    true_positives: usize,
    windows: usize,
    detected: usize,
}

impl Score {
    fn of(alerts: &[i64], windows: &[(i64, i64)]) -> Self {
        let inside = |ts: i64, (start, end): (i64, i64)| start <= ts && ts <= end;
        Self {
            alerts: alerts.len(),
            true_positives: alerts
                .iter()
                .filter(|ts| windows.iter().any(|w| inside(**ts, *w)))
                .count(),
            windows: windows.len(),
            detected: windows
                .iter()
                .filter(|w| alerts.iter().any(|ts| inside(*ts, **w)))
                .count(),
        }
    }

    fn precision(&self) -> f64 {
        self.true_positives as f64 / self.alerts.max(1) as f64
    }

    fn recall(&self) -> f64 {
        self.detected as f64 / self.windows.max(1) as f64
    }
}

#[test]
fn nab_times_and_scores_are_computed_right() {
    assert_eq!(nab_ms("1970-01-01 00:00:00"), 0);
    assert_eq!(nab_ms("2013-12-02 21:15:00"), 1_386_018_900_000);
    assert_eq!(nab_ms("2014-02-19 15:25:00.000000"), 1_392_823_500_000);
    let score = Score::of(&[5, 10, 20, 35, 99], &[(10, 20), (30, 40), (50, 60)]);
    assert_eq!(
        score,
        Score {
            alerts: 5,
            true_positives: 3,
            windows: 3,
            detected: 2
        }
    );
    assert_eq!(score.precision(), 0.6);
}

/// The NAB series and their labels, kept in the repository (MIT, see its LICENSE) so a clone
/// alone runs this test.
const NAB: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/nab");

/// A file of [`NAB`]; a missing one fails the test, since the data ships with the repository.
fn nab_file(name: &str) -> String {
    let path = format!("{NAB}/{name}");
    std::fs::read_to_string(&path).unwrap_or_else(|err| {
        panic!("cannot read {path} ({err}); it is part of the repository: restore it with `git checkout -- tests/fixtures/nab`")
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nab_machine_temperature_replay_finds_the_labeled_failures() {
    let csv = nab_file("machine_temperature_system_failure.csv");
    let labels = nab_file("labels.json");
    let labels: Value = serde_json::from_str(&labels).expect("labels.json is JSON");
    let windows: Vec<(i64, i64)> = labels["realKnownCause/machine_temperature_system_failure.csv"]
        .as_array()
        .expect("windows of the machine temperature series")
        .iter()
        .map(|w| {
            (
                nab_ms(w[0].as_str().unwrap_or_default()),
                nab_ms(w[1].as_str().unwrap_or_default()),
            )
        })
        .collect();
    let rows: Vec<(i64, f64)> = csv
        .lines()
        .skip(1)
        .filter(|line| !line.is_empty())
        .map(|line| {
            let (ts, value) = line.split_once(',').expect("timestamp,value");
            (nab_ms(ts), value.parse().expect("a number"))
        })
        .collect();
    assert_eq!(rows.len(), 22_695);

    let broker = Mosquitto::start();
    let weir = start_weir_with(config_at(&broker, "tests/fixtures/nab/anomaly.toml", "nab")).await;
    let mut anomalies = Subscriber::start(&broker, "anomalies/#").await;
    let mut device = Publisher::start(&broker).await;
    let decoded = weir.metrics.readings_decoded.with_label_values(&["nab"]);
    for (i, (ts, value)) in rows.iter().enumerate() {
        let payload = json!({"ts": ts, "value": value}).to_string();
        device
            .publish_pipelined("nab/machine_temperature/telemetry", payload, false, 64)
            .await;
        // Mosquitto queues at most 1000 QoS 1 messages for a slow subscriber and drops the rest
        // (max_queued_messages); keep the replay within that of what weir has decoded.
        if i % 128 == 127 {
            let floor = (i as u64).saturating_sub(512);
            assert!(
                wait_until(DEADLINE, || decoded.get() >= floor).await,
                "weir stalled at {} of {i} readings",
                decoded.get()
            );
        }
    }
    device.flush().await;
    assert!(
        wait_until(DEADLINE, || decoded.get() == rows.len() as u64).await,
        "weir decoded {} of {} readings",
        decoded.get(),
        rows.len()
    );
    let emitted = weir
        .metrics
        .events_emitted
        .with_label_values(&["machine_anomaly", "anomaly"])
        .get() as usize;
    let events = anomalies.take(emitted).await;
    anomalies.assert_quiet().await;
    weir.stop().await.expect("weir stops cleanly");

    let mut alerts = Vec::new();
    for event in &events {
        let event = event.json();
        assert_eq!(event["kind"], "anomaly");
        assert_eq!(event["cause"]["ts"], event["ts"]);
        alerts.push(event["ts"].as_i64().expect("ts"));
    }
    let score = Score::of(&alerts, &windows);
    println!(
        "NAB machine_temperature: {} alerts, {} inside a labeled window: precision {:.2}; {}/{} windows detected: recall {:.2}",
        score.alerts,
        score.true_positives,
        score.precision(),
        score.detected,
        score.windows,
        score.recall()
    );
    // Measured with tests/fixtures/nab/anomaly.toml: 5 alerts, 3 true positives, 3 of 4 windows.
    // The replay is deterministic (event time, one device), so these are floors, not flukes.
    assert!(score.alerts >= 1);
    assert!(score.precision() >= 0.6, "{score:?}");
    assert!(score.recall() >= 0.75, "{score:?}");
}
