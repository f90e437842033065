//! Hot reload through a real Mosquitto: rules whose definition did not change keep their state,
//! changed and new rules start fresh, removed rules flush their open windows, a bad config is
//! refused while the old rules keep running, no reading is lost or counted twice while rules are
//! swapped, and `weir run` reloads on SIGHUP.

mod common;

use common::{
    free_port, http_get, http_post, temp_dir, unique, wait_until, KillOnDrop, Mosquitto, Publisher,
    Subscriber, DEADLINE,
};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Everything but the rules: one JSON input with event time and a sequence number, QoS 1 so the
/// broker never drops a reading on the way in.
fn head(broker: &Mosquitto, client_id: &str) -> String {
    format!(
        r#"
[broker]
url = "{url}"
client_id = "{client_id}"
clean_session = true

[delivery]
mode = "at_most_once"

[inputs.telemetry]
topic = "sensors/{{site}}/{{device}}/telemetry"
device = "device"
format = "json"
seq_field = "seq"
qos = 1

[inputs.telemetry.time]
field = "ts"
unit = "ms"
"#,
        url = broker.url()
    )
}

/// A hysteresis rule on `temperature` publishing to `alerts/{site}/{device}/NAME`.
fn hysteresis(name: &str, enter: f64, exit: f64) -> String {
    format!(
        r#"
[rules.{name}.hysteresis]
metric = "temperature"
enter_above = {enter:.1}
exit_below = {exit:.1}
active = "hot"
inactive = "normal"
initial = "normal"

[rules.{name}.output]
topic = "alerts/{{site}}/{{device}}/{name}"
qos = 1
"#
    )
}

/// An hour-long tumbling window counting readings, publishing to `rollups/{site}/{device}/NAME`.
fn hourly(name: &str) -> String {
    format!(
        r#"
[rules.{name}.tumbling]
size = "1h"
metrics = ["temperature"]
aggregates = ["count"]

[rules.{name}.output]
topic = "rollups/{{site}}/{{device}}/{name}"
qos = 1
"#
    )
}

/// Event times inside one hour that ended long ago, so no window closes by event time during a
/// test: windows fire only when flushed (rule removed, or weir stopping).
fn event_time(i: u64) -> u64 {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    (now_ms / 3_600_000 - 3) * 3_600_000 + i
}

fn reading(seq: u64, temperature: f64) -> Value {
    json!({"ts": event_time(seq), "seq": seq, "temperature": temperature})
}

/// Starts weir in-process from the config file `path` (so it can be reloaded), /metrics on a
/// free port.
async fn start_from_file(path: &Path) -> weir::app::Running {
    let overrides = weir::config::Overrides {
        metrics_addr: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
        ..weir::config::Overrides::default()
    };
    let config = weir::config::load(path, &overrides).unwrap_or_else(|err| panic!("{err}"));
    common::start_weir_with(config).await
}

fn write_config(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write the config file");
}

async fn reload(addr: SocketAddr) -> (u16, Value) {
    let (status, body) = http_post(addr, "/api/reload").await;
    let report = serde_json::from_str(&body).unwrap_or_else(|err| panic!("{err}: {body}"));
    (status, report)
}

fn names(report: &Value, key: &str) -> Vec<String> {
    report[key]
        .as_array()
        .unwrap_or_else(|| panic!("no {key} in {report}"))
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect()
}

fn metric(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}

fn state(message: &common::Message) -> String {
    message.json()["to"].as_str().unwrap_or_default().to_owned()
}

fn count(message: &common::Message) -> u64 {
    message.json()["metrics"]["temperature"]["count"]
        .as_u64()
        .unwrap_or_else(|| panic!("no count in {}", message.json()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_rules_keep_their_state_changed_and_new_start_fresh_removed_flush() {
    let broker = Mosquitto::start();
    let dir = temp_dir("reload-kept");
    let path = dir.join("weir.toml");
    let head = head(&broker, &unique("weir-reload-kept"));
    write_config(
        &path,
        &[
            head.clone(),
            hysteresis("overheat", 30.0, 28.0),
            hysteresis("limit", 50.0, 45.0),
            hourly("hourly"),
            hourly("doomed"),
        ]
        .concat(),
    );
    let weir = start_from_file(&path).await;
    let mut overheat = Subscriber::start(&broker, "alerts/+/+/overheat").await;
    let mut limit = Subscriber::start(&broker, "alerts/+/+/limit").await;
    let mut fresh = Subscriber::start(&broker, "alerts/+/+/fresh").await;
    let mut hourly_out = Subscriber::start(&broker, "rollups/+/+/hourly").await;
    let mut doomed = Subscriber::start(&broker, "rollups/+/+/doomed").await;
    let mut publisher = Publisher::start(&broker).await;

    publisher.reading("s1", "d1", reading(1, 31.0)).await;
    publisher.reading("s1", "d1", reading(2, 32.0)).await;
    let first = overheat.take(1).await;
    assert_eq!(state(&first[0]), "hot");

    // overheat and hourly unchanged; limit's thresholds changed; doomed removed; added and
    // fresh new. Rules are planned in name order, so the kept rules move: hourly from 1 to 2,
    // overheat from 3 to 4. (added never fires here: no reading reaches 60.)
    write_config(
        &path,
        &[
            head.clone(),
            hysteresis("added", 60.0, 55.0),
            hysteresis("fresh", 30.0, 28.0),
            hourly("hourly"),
            hysteresis("limit", 30.0, 28.0),
            hysteresis("overheat", 30.0, 28.0),
        ]
        .concat(),
    );
    let (status, report) = reload(weir.http_addr).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["ok"], json!(true), "{report}");
    assert_eq!(names(&report, "kept"), ["hourly", "overheat"]);
    assert_eq!(names(&report, "started"), ["added", "fresh", "limit"]);
    assert_eq!(names(&report, "removed"), ["doomed"]);

    // The removed window rule flushed its open window: both readings.
    let flushed = doomed.take(1).await;
    assert_eq!(count(&flushed[0]), 2, "{}", flushed[0].json());

    publisher.reading("s1", "d1", reading(3, 33.0)).await;
    // Changed and new rules start from their initial state, so 33 enters hot there...
    assert_eq!(state(&limit.take(1).await[0]), "hot");
    assert_eq!(state(&fresh.take(1).await[0]), "hot");
    // ... while the kept rule remembers d1 is already hot: no second alert.
    overheat.assert_quiet().await;
    publisher.reading("s1", "d1", reading(4, 20.0)).await;
    assert_eq!(state(&overheat.take(1).await[0]), "normal");
    assert_eq!(state(&limit.take(1).await[0]), "normal");
    assert_eq!(state(&fresh.take(1).await[0]), "normal");

    let (_, rules) = http_get(weir.http_addr, "/api/rules").await;
    let rules: Value = serde_json::from_str(&rules).unwrap();
    let listed: Vec<&str> = rules["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(listed, ["added", "fresh", "hourly", "limit", "overheat"]);
    let (_, metrics) = http_get(weir.http_addr, "/metrics").await;
    assert_eq!(
        metric(&metrics, r#"weir_config_reloads_total{result="applied"}"#),
        Some(1.0)
    );
    assert_eq!(
        metric(&metrics, "weir_config_last_reload_successful"),
        Some(1.0)
    );
    // The removed rule's open window was taken back from the gauge when it flushed.
    assert_eq!(
        metric(&metrics, r#"weir_windows_open{rule="doomed"}"#),
        Some(0.0)
    );

    // The kept window saw every reading, before and after the reload, in one window.
    weir.stop().await.expect("weir stops");
    let rollup = hourly_out.take(1).await;
    assert_eq!(count(&rollup[0]), 4, "{}", rollup[0].json());
    doomed.assert_quiet().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_config_is_refused_and_the_old_rules_keep_running() {
    let broker = Mosquitto::start();
    let dir = temp_dir("reload-bad");
    let path = dir.join("weir.toml");
    let head = head(&broker, &unique("weir-reload-bad"));
    let good = [head.clone(), hysteresis("overheat", 30.0, 28.0)].concat();
    write_config(&path, &good);
    let weir = start_from_file(&path).await;
    let mut alerts = Subscriber::start(&broker, "alerts/+/+/overheat").await;
    let mut publisher = Publisher::start(&broker).await;

    // Invalid: exit above enter. Refused with the file, the line and the fix.
    write_config(
        &path,
        &[head.clone(), hysteresis("overheat", 30.0, 35.0)].concat(),
    );
    let (status, report) = reload(weir.http_addr).await;
    assert_eq!(status, 422, "{report}");
    assert_eq!(report["ok"], json!(false));
    let error = report["error"].as_str().unwrap();
    assert!(
        error.contains(&format!("{}:", path.display())) && error.contains("must be below"),
        "{error}"
    );
    let (_, last) = http_get(weir.http_addr, "/api/reload").await;
    assert!(last.contains("must be below"), "{last}");

    // The old rule still runs.
    publisher.reading("s1", "d1", reading(1, 31.0)).await;
    assert_eq!(state(&alerts.take(1).await[0]), "hot");

    // A change outside [rules] needs a restart: refused, and it says so.
    let moved_input = head.replace("seq_field = \"seq\"", "seq_field = \"sequence\"");
    write_config(
        &path,
        &[moved_input, hysteresis("overheat", 40.0, 38.0)].concat(),
    );
    let (status, report) = reload(weir.http_addr).await;
    assert_eq!(status, 422, "{report}");
    let error = report["error"].as_str().unwrap();
    assert!(
        error.contains("[inputs] changed") && error.contains("restart"),
        "{error}"
    );
    let (_, metrics) = http_get(weir.http_addr, "/metrics").await;
    assert_eq!(
        metric(&metrics, r#"weir_config_reloads_total{result="refused"}"#),
        Some(2.0)
    );
    assert_eq!(
        metric(&metrics, "weir_config_last_reload_successful"),
        Some(0.0)
    );

    // Still the old thresholds: 29 is below 30 but not below 28, so d1 stays hot.
    publisher.reading("s1", "d1", reading(2, 29.0)).await;
    publisher.reading("s1", "d1", reading(3, 27.0)).await;
    assert_eq!(state(&alerts.take(1).await[0]), "normal");
    alerts.assert_quiet().await;

    // Fixed: applied.
    write_config(
        &path,
        &good.replace("exit_below = 28.0", "exit_below = 25.0"),
    );
    let (status, report) = reload(weir.http_addr).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(names(&report, "started"), ["overheat"]);
    let (_, metrics) = http_get(weir.http_addr, "/metrics").await;
    assert_eq!(
        metric(&metrics, "weir_config_last_reload_successful"),
        Some(1.0)
    );
    weir.stop().await.expect("weir stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_reading_is_lost_or_counted_twice_while_rules_are_swapped() {
    const DEVICES: u64 = 20;
    const MIN_ROUNDS: u64 = 100;
    const RELOADS: usize = 12;
    let broker = Mosquitto::start();
    let dir = temp_dir("reload-stream");
    let path = dir.join("weir.toml");
    let head = head(&broker, &unique("weir-reload-stream"));
    let config = move |enter: f64| {
        [
            head.clone(),
            hourly("counted"),
            hysteresis("flip", enter, 10.0),
        ]
        .concat()
    };
    write_config(&path, &config(40.0));
    let weir = start_from_file(&path).await;
    let mut rollups = Subscriber::start(&broker, "rollups/+/+/counted").await;
    let addr = weir.http_addr;
    let reloads_path: PathBuf = path.clone();
    // Reloads run while the readings stream in: each changes `flip`, which starts fresh, while
    // `counted` is kept.
    let reloader = tokio::spawn(async move {
        let mut applied = 0;
        for round in 0..RELOADS {
            write_config(&reloads_path, &config(40.0 + round as f64 + 1.0));
            let (status, report) = reload(addr).await;
            assert_eq!(status, 200, "{report}");
            assert_eq!(names(&report, "kept"), ["counted"]);
            applied += 1;
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        applied
    });
    // Rounds of one reading per device go on until the last reload is done.
    let mut publisher = Publisher::start(&broker).await;
    let mut rounds = 0;
    while rounds < MIN_ROUNDS || !reloader.is_finished() {
        rounds += 1;
        for device in 0..DEVICES {
            publisher
                .publish_pipelined(
                    &common::telemetry_topic("s1", &format!("d{device}")),
                    reading(rounds, 20.0).to_string(),
                    false,
                    200,
                )
                .await;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    publisher.flush().await;
    assert_eq!(reloader.await.expect("reloads"), RELOADS);
    let total = DEVICES * rounds;
    let decoded = {
        let metrics = weir.metrics.clone();
        let all_in = wait_until(DEADLINE, || {
            metrics
                .readings_decoded
                .with_label_values(&["telemetry"])
                .get()
                >= total
        })
        .await;
        assert!(all_in, "not every reading was decoded");
        metrics
            .readings_decoded
            .with_label_values(&["telemetry"])
            .get()
    };
    assert_eq!(decoded, total);
    weir.stop().await.expect("weir stops");
    let windows = rollups.take(DEVICES as usize).await;
    for window in &windows {
        assert_eq!(count(window), rounds, "{}", window.json());
    }
    rollups.assert_quiet().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weir_run_reloads_its_rules_on_sighup() {
    let broker = Mosquitto::start();
    let dir = temp_dir("reload-sighup");
    let path = dir.join("weir.toml");
    let head = head(&broker, &unique("weir-reload-sighup"));
    write_config(
        &path,
        &[head.clone(), hysteresis("overheat", 30.0, 28.0)].concat(),
    );
    let port = free_port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut child = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_weir"))
            .args(["run", "--config"])
            .arg(&path)
            .args(["--metrics-addr", &addr.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start weir run"),
    );
    let ready = common::eventually(DEADLINE, || async move {
        common::try_http_get(addr, "/readyz")
            .await
            .is_ok_and(|(status, _)| status == 200)
    })
    .await;
    assert!(ready, "weir run did not become ready");
    let mut alerts = Subscriber::start(&broker, "alerts/+/+/+").await;

    write_config(
        &path,
        &[
            head.clone(),
            hysteresis("overheat", 30.0, 28.0),
            hysteresis("added", 30.0, 28.0),
        ]
        .concat(),
    );
    let hangup = Command::new("kill")
        .args(["-HUP", &child.0.id().to_string()])
        .status()
        .expect("run kill");
    assert!(hangup.success());
    let applied = common::eventually(DEADLINE, || async move {
        let (_, body) = http_get(addr, "/api/reload").await;
        body.contains("\"ok\":true") && body.contains("\"started\":[\"added\"]")
    })
    .await;
    assert!(applied, "the SIGHUP reload was not reported by /api/reload");
    assert!(
        child.0.try_wait().unwrap().is_none(),
        "weir exited on SIGHUP"
    );

    let mut publisher = Publisher::start(&broker).await;
    publisher.reading("s1", "d1", reading(1, 31.0)).await;
    let mut topics: Vec<String> = alerts.take(2).await.into_iter().map(|m| m.topic).collect();
    topics.sort();
    assert_eq!(topics, ["alerts/s1/d1/added", "alerts/s1/d1/overheat"]);

    let _ = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status();
    let status = child.0.wait().expect("weir exits");
    assert!(status.success(), "weir run exited with {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_restores_the_state_of_unchanged_rules_only() {
    let broker = Mosquitto::start();
    let dir = temp_dir("reload-restart");
    let path = dir.join("weir.toml");
    let state_dir = dir.join("state");
    let head = head(&broker, &unique("weir-reload-restart")).replace(
        "mode = \"at_most_once\"",
        &format!(
            "mode = \"at_most_once\"\nstate_dir = \"{}\"",
            state_dir.display()
        ),
    );
    write_config(
        &path,
        &[
            head.clone(),
            hysteresis("steady", 30.0, 28.0),
            hysteresis("overheat", 30.0, 28.0),
        ]
        .concat(),
    );
    let mut alerts = Subscriber::start(&broker, "alerts/+/+/+").await;
    let mut publisher = Publisher::start(&broker).await;
    let weir = start_from_file(&path).await;
    publisher.reading("s1", "d1", reading(1, 31.0)).await;
    let metrics = weir.metrics.clone();
    let decoded = || {
        metrics
            .readings_decoded
            .with_label_values(&["telemetry"])
            .get()
    };
    assert!(wait_until(DEADLINE, || decoded() == 1).await);
    // Stopping at once takes the final snapshot (d1 is hot in both rules) while the two alerts
    // are still on their way, so it holds them; the sink then drains them, and brings the
    // snapshot's outbox up to date, so the restart publishes nothing again.
    weir.stop().await.expect("weir stops");
    assert_eq!(alerts.take(2).await.len(), 2);

    write_config(
        &path,
        &[
            head.clone(),
            hysteresis("steady", 30.0, 28.0),
            hysteresis("overheat", 30.0, 20.0),
        ]
        .concat(),
    );
    let weir = start_from_file(&path).await;
    publisher.reading("s1", "d1", reading(2, 33.0)).await;
    // The changed rule starts fresh, so 33 is a transition there; the unchanged one is still hot.
    let after = alerts.take(1).await.remove(0);
    assert_eq!(after.topic, "alerts/s1/d1/overheat");
    assert_eq!(state(&after), "hot");
    alerts.assert_quiet().await;
    publisher.reading("s1", "d1", reading(3, 25.0)).await;
    let after = alerts.take(1).await.remove(0);
    assert_eq!(after.topic, "alerts/s1/d1/steady");
    assert_eq!(state(&after), "normal");
    alerts.assert_quiet().await;

    // With a state dir, a reload is followed by a snapshot, so a crash after it never replays
    // readings the old rules handled through the new ones.
    let metrics = weir.metrics.clone();
    let written = metrics.snapshots_written.get();
    let (status, report) = reload(weir.http_addr).await;
    assert_eq!(status, 200, "{report}");
    assert!(
        wait_until(DEADLINE, || metrics.snapshots_written.get() > written).await,
        "no snapshot after the reload"
    );
    weir.stop().await.expect("weir stops");
}
