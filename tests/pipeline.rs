//! End to end through a real Mosquitto: readings published by a test client go through weir
//! (started in-process with `config/example.toml`) and the derived events it publishes are
//! compared field by field with what the reference scenario must produce.

mod common;

use common::{
    at_most_once_config, example_config, http_get, promtool_check, start_weir, start_weir_with,
    telemetry_topic, wait_until, Message, Mosquitto, Publisher, Subscriber, DEADLINE, T0,
};
use serde_json::{json, Value};
use weir::config::Layout;

const ALERTS: &str = "alerts/+/+/overheat";
const ROLLUPS: &str = "rollups/+/+/climate";

/// A reading of the reference scenario, as a device would publish it.
fn reading(ts: i64, seq: u64, temperature: f64, humidity: f64) -> Value {
    json!({"ts": ts, "seq": seq, "temperature": temperature, "humidity": humidity, "battery": 3.9})
}

/// The `overheat` event a reading at `ts` with `seq` must cause, without its id.
fn state_change(device: &str, ts: i64, seq: u64, from: &str, to: &str, value: f64) -> Value {
    json!({
        "v": 1,
        "kind": "state_change",
        "rule": "overheat",
        "device": device,
        "labels": {"site": "s1"},
        "ts": ts,
        "metric": "temperature",
        "from": from,
        "to": to,
        "value": value,
        "cause": {"topic": telemetry_topic("s1", device), "ts": ts, "seq": seq},
    })
}

/// Splits an event into its id (checked to be 16 hex digits) and the rest.
fn split_id(message: &Message) -> (String, Value) {
    let mut event = message.json();
    let id = event
        .as_object_mut()
        .and_then(|fields| fields.remove("id"))
        .unwrap_or_else(|| panic!("event without an id: {}", message.json()));
    let id = id.as_str().unwrap_or_default().to_owned();
    assert!(
        id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "id is not 16 hex digits: {id:?}"
    );
    (id, event)
}

/// Runs 25, 31, 29, 27, 31 for device `d1` through a fresh broker and weir; returns the alerts,
/// checked to be exactly three.
async fn run_hysteresis_sequence(tag: &str) -> Vec<Message> {
    let broker = Mosquitto::start();
    let weir = start_weir(&broker, tag).await;
    let mut alerts = Subscriber::start(&broker, ALERTS).await;
    let mut device = Publisher::start(&broker).await;

    for (i, temperature) in [25.0, 31.0, 29.0, 27.0, 31.0].into_iter().enumerate() {
        let ts = T0 + 1000 * i as i64;
        device
            .reading("s1", "d1", reading(ts, i as u64 + 1, temperature, 40.0))
            .await;
    }
    let messages = alerts.take(3).await;

    // Negative check: once all five readings went through the rules, nothing more may come.
    let decoded = weir
        .metrics
        .readings_decoded
        .with_label_values(&["telemetry"]);
    assert!(
        wait_until(DEADLINE, || decoded.get() == 5).await,
        "weir decoded {} of 5 readings",
        decoded.get()
    );
    alerts.assert_quiet().await;
    assert_eq!(
        weir.metrics
            .events_emitted
            .with_label_values(&["overheat", "state_change"])
            .get(),
        3
    );
    weir.stop().await.expect("weir stops cleanly");
    messages
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hysteresis_sequence_yields_hot_normal_hot() {
    let messages = run_hysteresis_sequence("hysteresis").await;

    let expected = [
        state_change("d1", T0 + 1000, 2, "normal", "hot", 31.0),
        state_change("d1", T0 + 3000, 4, "hot", "normal", 27.0),
        state_change("d1", T0 + 4000, 5, "normal", "hot", 31.0),
    ];
    let mut ids = Vec::new();
    for (message, expected) in messages.iter().zip(expected) {
        assert_eq!(message.topic, "alerts/s1/d1/overheat");
        let (id, event) = split_id(message);
        assert_eq!(event, expected);
        ids.push(id);
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3, "event ids are not distinct: {ids:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_input_on_a_fresh_weir_yields_the_same_event_ids() {
    let ids = |messages: Vec<Message>| -> Vec<String> {
        messages.iter().map(|m| split_id(m).0).collect()
    };
    let first = ids(run_hysteresis_sequence("replay-a").await);
    let second = ids(run_hysteresis_sequence("replay-b").await);
    assert_eq!(first, second);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_in_one_window_yield_one_exact_rollup() {
    let broker = Mosquitto::start();
    let weir = start_weir(&broker, "window").await;
    let mut rollups = Subscriber::start(&broker, ROLLUPS).await;
    let mut device = Publisher::start(&broker).await;

    // Values are exact in binary, so the average is too: (20.5 + 21.25 + 27.25) / 3 = 23.
    device.reading("s1", "d1", reading(T0, 1, 20.5, 40.5)).await;
    device
        .reading("s1", "d1", reading(T0 + 3000, 2, 21.25, 50.25))
        .await;
    device
        .reading("s1", "d1", reading(T0 + 7000, 3, 27.25, 44.25))
        .await;
    // The first reading at or past the window's end moves the device's watermark there.
    device
        .reading("s1", "d1", reading(T0 + 10_000, 4, 22.0, 41.0))
        .await;

    let messages = rollups.take(1).await;
    assert_eq!(messages[0].topic, "rollups/s1/d1/climate");
    let (_, event) = split_id(&messages[0]);
    assert_eq!(
        event,
        json!({
            "v": 1,
            "kind": "window",
            "rule": "climate",
            "device": "d1",
            "labels": {"site": "s1"},
            "ts": T0 + 10_000,
            "start": T0,
            "end": T0 + 10_000,
            "metrics": {
                "temperature": {"count": 3, "min": 20.5, "max": 27.25, "avg": 23.0},
                "humidity": {"count": 3, "min": 40.5, "max": 50.25, "avg": 45.0},
            },
            "cause": {"topic": telemetry_topic("s1", "d1"), "ts": T0 + 10_000, "seq": 4},
        })
    );

    let decoded = weir
        .metrics
        .readings_decoded
        .with_label_values(&["telemetry"]);
    assert!(wait_until(DEADLINE, || decoded.get() == 4).await);
    rollups.assert_quiet().await;
    weir.stop().await.expect("weir stops cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_state_dir_stop_publishes_open_windows_as_partial_without_cause() {
    let broker = Mosquitto::start();
    let weir = start_weir_with(at_most_once_config(&broker, "partial")).await;
    let mut rollups = Subscriber::start(&broker, ROLLUPS).await;
    let mut device = Publisher::start(&broker).await;

    device.reading("s1", "d1", reading(T0, 1, 24.0, 40.0)).await;
    // Only a temperature: the next window has no humidity, so its rollup must omit it.
    device
        .reading(
            "s1",
            "d1",
            json!({"ts": T0 + 12_000, "seq": 2, "temperature": 26.0}),
        )
        .await;
    let closed = rollups.take(1).await;
    assert_eq!(split_id(&closed[0]).1["end"], json!(T0 + 10_000));

    weir.stop().await.expect("weir stops cleanly");
    let flushed = rollups.take(1).await;
    assert_eq!(flushed[0].topic, "rollups/s1/d1/climate");
    let (_, event) = split_id(&flushed[0]);
    assert_eq!(
        event,
        json!({
            "v": 1,
            "kind": "window",
            "rule": "climate",
            "device": "d1",
            "labels": {"site": "s1"},
            "ts": T0 + 20_000,
            "start": T0 + 10_000,
            "end": T0 + 20_000,
            "metrics": {
                "temperature": {"count": 1, "min": 26.0, "max": 26.0, "avg": 26.0},
            },
            "partial": true,
            "closed_by": "shutdown",
        })
    );
    rollups.assert_quiet().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_payloads_are_counted_by_reason_and_skipped() {
    let broker = Mosquitto::start();
    let weir = start_weir(&broker, "malformed").await;
    let mut alerts = Subscriber::start(&broker, ALERTS).await;
    let mut device = Publisher::start(&broker).await;
    let topic = telemetry_topic("s1", "d1");

    device.reading("s1", "d1", reading(T0, 1, 25.0, 40.0)).await;
    device.publish(&topic, "not json").await;
    device
        .publish(
            &topic,
            json!({"ts": T0 + 1000, "temperature": "hot"}).to_string(),
        )
        .await;
    device.publish(&topic, "[1,2]").await;
    device
        .publish(&topic, json!({"ts": T0 + 2000}).to_string())
        .await;
    device
        .reading("s1", "d1", reading(T0 + 3000, 2, 31.0, 40.0))
        .await;

    let messages = alerts.take(1).await;
    let (_, event) = split_id(&messages[0]);
    assert_eq!(
        event,
        state_change("d1", T0 + 3000, 2, "normal", "hot", 31.0)
    );

    let metrics = &weir.metrics;
    assert!(
        wait_until(DEADLINE, || metrics.decode_errors_total() == 4).await,
        "decode errors: {}",
        metrics.decode_errors_total()
    );
    for reason in ["malformed", "wrong_type", "not_an_object", "missing_field"] {
        assert_eq!(
            metrics
                .decode_errors
                .with_label_values(&["telemetry", reason])
                .get(),
            1,
            "decode errors with reason {reason}"
        );
    }
    assert_eq!(metrics.readings_total(), 6);
    assert_eq!(
        metrics
            .readings_decoded
            .with_label_values(&["telemetry"])
            .get(),
        2
    );
    alerts.assert_quiet().await;
    weir.stop().await.expect("weir stops cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weir_reconnects_and_resubscribes_after_the_broker_restarts() {
    let mut broker = Mosquitto::start();
    let weir = start_weir(&broker, "restart").await;
    let metrics = weir.metrics.clone();

    let mut alerts = Subscriber::start(&broker, ALERTS).await;
    let mut device = Publisher::start(&broker).await;
    device.reading("s1", "d1", reading(T0, 1, 25.0, 40.0)).await;
    device
        .reading("s1", "d1", reading(T0 + 1000, 2, 31.0, 40.0))
        .await;
    let (_, before) = split_id(&alerts.take(1).await[0]);
    assert_eq!(
        before,
        state_change("d1", T0 + 1000, 2, "normal", "hot", 31.0)
    );
    drop((alerts, device));

    broker.stop();
    let source = metrics.mqtt_connected.with_label_values(&["source"]);
    assert!(
        wait_until(DEADLINE, || source.get() == 0).await,
        "weir still reports the source connected after the broker died"
    );
    assert!(wait_until(DEADLINE, || !metrics.is_ready()).await);
    assert_eq!(http_get(weir.http_addr, "/readyz").await.0, 503);

    broker.restart();
    assert!(
        wait_until(DEADLINE, || metrics.is_ready()).await,
        "weir did not reconnect and resubscribe within {DEADLINE:?} of the broker's restart"
    );
    assert_eq!(http_get(weir.http_addr, "/readyz").await.0, 200);

    // The old test clients lost their sessions with the broker; start new ones.
    let mut alerts = Subscriber::start(&broker, ALERTS).await;
    let mut device = Publisher::start(&broker).await;
    for (i, temperature) in [25.0, 31.0, 27.0].into_iter().enumerate() {
        let ts = T0 + 1000 * i as i64;
        device
            .reading("s1", "d2", reading(ts, i as u64 + 1, temperature, 40.0))
            .await;
    }
    let after: Vec<Value> = alerts.take(2).await.iter().map(|m| split_id(m).1).collect();
    assert_eq!(
        after,
        [
            state_change("d2", T0 + 1000, 2, "normal", "hot", 31.0),
            state_change("d2", T0 + 2000, 3, "hot", "normal", 27.0),
        ]
    );
    assert!(
        metrics.mqtt_reconnects.with_label_values(&["source"]).get() >= 1,
        "the source's reconnect was not counted"
    );
    weir.stop().await.expect("weir stops cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_serves_valid_prometheus_text_and_health_checks() {
    let broker = Mosquitto::start();
    let weir = start_weir(&broker, "http").await;
    assert_eq!(http_get(weir.http_addr, "/healthz").await.0, 200);
    assert_eq!(http_get(weir.http_addr, "/readyz").await.0, 200);

    let mut alerts = Subscriber::start(&broker, ALERTS).await;
    let mut device = Publisher::start(&broker).await;
    device.reading("s1", "d1", reading(T0, 1, 25.0, 40.0)).await;
    device
        .reading("s1", "d1", reading(T0 + 1000, 2, 31.0, 40.0))
        .await;
    alerts.take(1).await;
    // The latency is observed when the sink has published; that may trail our receipt.
    let latency = &weir.metrics.processing_latency;
    assert!(wait_until(DEADLINE, || latency.sample_count("") == 1).await);

    let (status, body) = http_get(weir.http_addr, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    for expected in [
        "weir_readings_received_total{input=\"telemetry\"} 2",
        "weir_processing_latency_seconds_bucket",
        "weir_processing_latency_seconds_count 1",
        "weir_mqtt_connected{connection=\"source\"} 1",
    ] {
        assert!(
            body.lines().any(|line| line.starts_with(expected)),
            "/metrics lacks {expected}:\n{body}"
        );
    }
    promtool_check(&body);
    weir.stop().await.expect("weir stops cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_windows_survive_a_restart_with_the_state_dir() {
    open_windows_survive_a_restart(Layout::Tasks, "survive").await;
}

/// With inline workers the final snapshot barrier is taken by intake itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn open_windows_survive_a_restart_with_inline_workers() {
    open_windows_survive_a_restart(Layout::Inline, "survive-inline").await;
}

/// Two readings open a window, weir stops (saving it), and after a restart two more close it:
/// the rollup covers all three readings of the window.
async fn open_windows_survive_a_restart(layout: Layout, tag: &str) {
    let broker = Mosquitto::start();
    let mut config = example_config(&broker, tag);
    config.pipeline.layout = layout;
    let weir = start_weir_with(config.clone()).await;
    let mut rollups = Subscriber::start(&broker, ROLLUPS).await;
    let mut device = Publisher::start(&broker).await;

    device.reading("s1", "d1", reading(T0, 1, 20.0, 40.0)).await;
    device
        .reading("s1", "d1", reading(T0 + 3_000, 2, 22.0, 42.0))
        .await;
    let decoded = weir.metrics.clone();
    assert!(
        wait_until(DEADLINE, || decoded
            .readings_decoded
            .with_label_values(&["telemetry"])
            .get()
            == 2)
        .await
    );
    // The window is open at shutdown: with a state dir it is saved, not flushed as partial.
    weir.stop().await.expect("weir stops cleanly");
    rollups.assert_quiet().await;

    let weir = start_weir_with(config).await;
    device
        .reading("s1", "d1", reading(T0 + 6_000, 3, 24.0, 44.0))
        .await;
    device
        .reading("s1", "d1", reading(T0 + 10_000, 4, 30.0, 50.0))
        .await;
    let closed = rollups.take(1).await;
    let (_, event) = split_id(&closed[0]);
    assert_eq!(
        event["metrics"]["temperature"],
        json!({"count": 3, "min": 20.0, "max": 24.0, "avg": 22.0}),
        "the rollup must include the readings from before the restart: {event}"
    );
    weir.stop().await.expect("weir stops cleanly");
}

/// GET `path` with an `Authorization` header; the status code.
async fn status_with_token(addr: std::net::SocketAddr, path: &str, token: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(
            format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\r\n")
                .as_bytes(),
        )
        .await
        .expect("send");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.expect("read");
    String::from_utf8_lossy(&response)
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_needs_the_bearer_token_when_one_is_set_and_metrics_stay_open() {
    let broker = Mosquitto::start();
    let mut config = example_config(&broker, "token");
    config.http.api_token_env = Some(weir::config::Secret::new("s3cret-token"));
    let weir = start_weir_with(config).await;
    let addr = weir.http_addr;
    assert_eq!(http_get(addr, "/api/rules").await.0, 401);
    assert_eq!(
        status_with_token(addr, "/api/rules", "wrong-token!").await,
        401
    );
    assert_eq!(
        status_with_token(addr, "/api/rules", "s3cret-token").await,
        200
    );
    assert_eq!(http_get(addr, "/metrics").await.0, 200);
    assert_eq!(http_get(addr, "/healthz").await.0, 200);
    weir.stop().await.expect("weir stops cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weir_top_shows_throughput_rules_and_connection_from_the_http_api() {
    let broker = Mosquitto::start();
    let weir = start_weir(&broker, "top").await;
    let mut device = Publisher::start(&broker).await;
    for (i, t) in [25.0, 31.0].iter().enumerate() {
        device
            .reading(
                "s1",
                "d1",
                reading(T0 + i as i64 * 1000, i as u64, *t, 40.0),
            )
            .await;
    }
    let metrics = weir.metrics.clone();
    assert!(wait_until(DEADLINE, || metrics.events_total() >= 1).await);
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["top", "--once", "--addr"])
        .arg(weir.http_addr.to_string())
        .output()
        .await
        .expect("run weir top");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(text.contains("intake up, publish up"), "{text}");
    assert!(text.contains("(total 2)"), "{text}");
    for rule in ["overheat", "climate"] {
        assert!(text.contains(rule), "{text}");
    }
    weir.stop().await.expect("weir stops cleanly");
}
