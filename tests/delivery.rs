//! Fault tests for the delivery guarantees (issue 5), against real Mosquitto brokers that the tests
//! start, stop and restart: broker restarts mid-stream, weir killed with SIGKILL, a malformed-input
//! corpus, and an output broker that is down while events pile up in the outbox.
//!
//! The oracle for "nothing missing" is the engine itself run in-process over the same readings
//! without interruption: event ids are deterministic, so the sets of ids must be equal.

mod common;

use common::{
    example_config, free_port, start_weir_with, temp_dir, unique, wait_until, Mosquitto, Publisher,
    DEADLINE, EXAMPLE_CONFIG, T0,
};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;

/// How long a fault test may take to see every expected event after the input is published.
const SETTLE: Duration = Duration::from_secs(60);

/// A deterministic stream of the reference scenario: `devices` devices, `per_device` readings
/// each, interleaved, one second apart in event time, temperatures that cross both thresholds.
fn stream(devices: usize, per_device: usize) -> Vec<(String, Vec<u8>)> {
    const TEMPERATURES: [f64; 8] = [25.0, 31.0, 29.0, 27.0, 31.5, 33.0, 26.0, 24.0];
    let mut readings = Vec::with_capacity(devices * per_device);
    for step in 0..per_device {
        for device in 0..devices {
            let temperature = TEMPERATURES[(step + device) % TEMPERATURES.len()];
            let payload = json!({
                "ts": T0 + step as i64 * 1000,
                "seq": step,
                "temperature": temperature,
                "humidity": 40.0 + (step % 7) as f64,
            });
            readings.push((
                format!("sensors/plant-1/dev-{device}/telemetry"),
                payload.to_string().into_bytes(),
            ));
        }
    }
    readings
}

/// The ids of the events an uninterrupted run of the example config derives from `readings`.
fn expected_ids(readings: &[(String, Vec<u8>)]) -> BTreeSet<String> {
    let config = weir::config::load(Path::new(EXAMPLE_CONFIG), &Default::default())
        .unwrap_or_else(|err| panic!("{err}"));
    common::expected_ids(&config, readings, T0 + 1_000_000)
}

fn event_id(event: &Value) -> String {
    event["id"].as_str().unwrap_or_default().to_owned()
}

/// A subscriber with a persistent session (QoS 1): it keeps receiving across broker restarts, and
/// the broker queues for it while it reconnects. Collects every event it receives.
struct Collector {
    events: Arc<Mutex<Vec<Value>>>,
    task: JoinHandle<()>,
}

impl Collector {
    async fn start(port: u16, filters: &[&str]) -> Self {
        let mut options = MqttOptions::new(unique("collector"), "127.0.0.1", port);
        options
            .set_keep_alive(Duration::from_secs(5))
            .set_clean_session(false)
            .set_max_packet_size(1024 * 1024, 1024 * 1024);
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        let events: Arc<Mutex<Vec<Value>>> = Arc::default();
        let sink = events.clone();
        let filters: Vec<String> = filters.iter().map(|f| (*f).to_owned()).collect();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut ready_tx = Some(ready_tx);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(ack))) if !ack.session_present => {
                        for filter in &filters {
                            let _ = client.try_subscribe(filter.clone(), QoS::AtLeastOnce);
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(ready) = ready_tx.take() {
                            let _ = ready.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(publish))) => {
                        let event: Value =
                            serde_json::from_slice(&publish.payload).unwrap_or(Value::Null);
                        sink.lock().expect("collector lock").push(event);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        tokio::time::timeout(DEADLINE, ready_rx)
            .await
            .expect("collector subscribed in time")
            .expect("collector task alive");
        Self { events, task }
    }

    fn events(&self) -> Vec<Value> {
        self.events.lock().expect("collector lock").clone()
    }

    fn ids(&self) -> BTreeSet<String> {
        self.events().iter().map(event_id).collect()
    }

    /// Every received event must be one of `expected`, and all of `expected` must arrive within
    /// [`SETTLE`]. Duplicates are allowed, but must be identical to the first copy.
    async fn assert_exactly(&self, expected: &BTreeSet<String>) {
        let arrived = wait_until(SETTLE, || self.ids().is_superset(expected)).await;
        let received = self.ids();
        let missing: Vec<_> = expected.difference(&received).collect();
        let unexpected: Vec<_> = received.difference(expected).collect();
        assert!(
            arrived && unexpected.is_empty(),
            "{} expected, {} received; missing {missing:?}; unexpected {unexpected:?}",
            expected.len(),
            received.len()
        );
        let mut first: BTreeMap<String, Value> = BTreeMap::new();
        for event in self.events() {
            let copy = first
                .entry(event_id(&event))
                .or_insert_with(|| event.clone());
            assert_eq!(*copy, event, "a duplicate differs from the first copy");
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restarted_twice_mid_stream_loses_no_event() {
    let mut broker = Mosquitto::start_persistent_on(free_port());
    let weir = start_weir_with(example_config(&broker, "restarts")).await;
    let collector = Collector::start(broker.port(), &["alerts/#", "rollups/#"]).await;
    let mut publisher = Publisher::start(&broker).await;
    let readings = stream(4, 50);
    let expected = expected_ids(&readings);
    for (i, (topic, payload)) in readings.iter().enumerate() {
        if i == 60 || i == 140 {
            broker.terminate();
            broker.start_again();
        }
        publisher.publish(topic, payload.clone()).await;
    }
    collector.assert_exactly(&expected).await;
    assert!(
        weir.metrics
            .mqtt_reconnects
            .with_label_values(&["source"])
            .get()
            >= 2
    );
    weir.stop().await.expect("weir stops cleanly");
}

/// `weir run` as a child process on its own state dir, killable with SIGKILL.
struct WeirProcess {
    child: Child,
    log: PathBuf,
}

impl WeirProcess {
    fn spawn(
        broker: &Mosquitto,
        config: &Path,
        state_dir: &Path,
        metrics: SocketAddr,
        log: &Path,
    ) -> Self {
        let file = std::fs::File::options()
            .create(true)
            .append(true)
            .open(log)
            .expect("open weir log");
        let child = Command::new(env!("CARGO_BIN_EXE_weir"))
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(["run", "--config"])
            .arg(config)
            .arg("--broker")
            .arg(broker.url())
            .arg("--metrics-addr")
            .arg(metrics.to_string())
            .arg("--state-dir")
            .arg(state_dir)
            .env("WEIR_LOG", "info")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("clone log"))
            .stderr(file)
            .spawn()
            .expect("spawn weir");
        Self {
            child,
            log: log.to_owned(),
        }
    }

    /// SIGKILL: no shutdown code runs, like a power cut for the process.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for WeirProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A blocking HTTP/1.0 GET of `path` from a child weir; `None` while it is not serving.
fn get(metrics: SocketAddr, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(metrics).ok()?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    Some(response)
}

async fn ready(metrics: SocketAddr) -> bool {
    wait_until(DEADLINE, || {
        get(metrics, "/readyz")
            .is_some_and(|r| r.starts_with("HTTP/1.1 200") || r.starts_with("HTTP/1.0 200"))
    })
    .await
}

/// The value of an unlabelled counter in a child weir's /metrics.
fn counter(metrics: SocketAddr, name: &str) -> u64 {
    get(metrics, "/metrics")
        .and_then(|body| {
            body.lines()
                .find_map(|line| line.strip_prefix(name)?.trim().parse::<f64>().ok())
        })
        .map_or(0, |value| value as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weir_killed_with_sigkill_and_restarted_loses_no_event() {
    let broker = Mosquitto::start();
    let dir = temp_dir("sigkill");
    let state = dir.join("state");
    let log = dir.join("weir.log");
    // Snapshot every second, so restarts recover from a snapshot plus the log after it.
    let config = dir.join("weir.toml");
    let text = std::fs::read_to_string(EXAMPLE_CONFIG)
        .expect("read example")
        .replace("snapshot_interval = \"30s\"", "snapshot_interval = \"1s\"");
    std::fs::write(&config, text).expect("write config");
    let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut weir = WeirProcess::spawn(&broker, &config, &state, metrics, &log);
    assert!(ready(metrics).await, "weir did not become ready");
    let collector = Collector::start(broker.port(), &["alerts/#", "rollups/#"]).await;
    let mut publisher = Publisher::start(&broker).await;
    let readings = stream(4, 60);
    let expected = expected_ids(&readings);

    // Kill points drawn from a seed printed for reproduction.
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
        | 1;
    println!("kill points seed: {seed}");
    let mut rng = seed;
    let mut kill_points: Vec<usize> = (0..3)
        .map(|_| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng % readings.len() as u64) as usize
        })
        .collect();
    kill_points.sort_unstable();
    kill_points.dedup();
    println!("killing weir before readings {kill_points:?}");

    for (i, (topic, payload)) in readings.iter().enumerate() {
        if kill_points.contains(&i) {
            // Every other kill waits for a snapshot first, so both recovery paths run: the log
            // alone, and a snapshot plus the log after it.
            if i % 2 == 0 {
                let before = counter(metrics, "weir_snapshots_written_total");
                assert!(
                    wait_until(DEADLINE, || counter(
                        metrics,
                        "weir_snapshots_written_total"
                    ) > before)
                    .await,
                    "no snapshot was written"
                );
            }
            weir.kill();
            weir = WeirProcess::spawn(&broker, &config, &state, metrics, &log);
            assert!(ready(metrics).await, "weir did not come back");
        }
        publisher.publish(topic, payload.clone()).await;
    }
    let settled = wait_until(SETTLE, || collector.ids().is_superset(&expected)).await;
    if !settled {
        println!(
            "weir log:\n{}",
            std::fs::read_to_string(&weir.log).unwrap_or_default()
        );
    }
    collector.assert_exactly(&expected).await;
    let log_text = std::fs::read_to_string(&weir.log).unwrap_or_default();
    println!(
        "weir started {} times; {} restored from a snapshot; {} replayed the log",
        log_text.matches("weir started").count(),
        log_text.matches("restored state").count(),
        log_text.matches("replayed the input log").count()
    );
    assert_eq!(
        log_text.matches("weir started").count(),
        kill_points.len() + 1
    );
}

/// The example config with a CBOR input beside the JSON one, both with an overheat rule.
fn corpus_config(broker: &Mosquitto) -> weir::config::Config {
    let text = std::fs::read_to_string(EXAMPLE_CONFIG).expect("read example")
        + r#"
[inputs.cbor]
topic = "sensors/{site}/{device}/cbor"
format = "cbor"
seq_field = "seq"

[inputs.cbor.time]
field = "ts"
unit = "ms"

[rules.overheat_cbor]
input = "cbor"

[rules.overheat_cbor.hysteresis]
metric = "temperature"
enter_above = 30.0
exit_below = 28.0
active = "hot"
inactive = "normal"

[rules.overheat_cbor.output]
topic = "alerts/{site}/{device}/{rule}"
"#;
    let overrides = weir::config::Overrides {
        broker_url: Some(broker.url()),
        metrics_addr: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
        state_dir: Some(broker.scratch("corpus-state")),
        ..weir::config::Overrides::default()
    };
    let mut config = weir::config::parse(&text, Path::new("corpus.toml"), &overrides)
        .unwrap_or_else(|err| panic!("{err}"));
    config.broker.client_id = unique("weir-corpus");
    config
}

fn cbor(value: &[(&str, f64)]) -> Vec<u8> {
    let map: BTreeMap<&str, f64> = value.iter().copied().collect();
    let mut bytes = Vec::new();
    ciborium::into_writer(&map, &mut bytes).expect("cbor");
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_corpus_goes_to_dead_letters_and_every_good_reading_is_processed() {
    let broker = Mosquitto::start();
    let weir = start_weir_with(corpus_config(&broker)).await;
    let dead = Collector::start(broker.port(), &["weir/dead-letter/#"]).await;
    let alerts = Collector::start(broker.port(), &["alerts/#"]).await;
    let mut publisher = Publisher::start(&broker).await;
    let json_topic = "sensors/plant-1/bad/telemetry";
    let cbor_topic = "sensors/plant-1/bad/cbor";
    let now = weir::model::time::wall_clock_ms();
    // Deep nesting where a metric should be. (Nested values in fields no rule reads are skipped
    // without recursion, so they are valid.)
    let nested = format!(
        "{{\"ts\": {T0}, \"temperature\": {}{}}}",
        "[".repeat(5000),
        "]".repeat(5000)
    );
    let mut huge = format!("{{\"ts\": {T0}, \"temperature\": 20, \"pad\": \"");
    huge.push_str(&"x".repeat(70_000));
    huge.push_str("\"}");
    let corpus: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            json_topic,
            format!("{{\"ts\": {T0}, \"temperature\": 2").into_bytes(),
            "malformed",
        ),
        (json_topic, nested.into_bytes(), "wrong_type"),
        (
            json_topic,
            format!("{{\"ts\": {T0}, \"temperature\": 1e400}}").into_bytes(),
            "malformed",
        ),
        (
            json_topic,
            format!("{{\"ts\": {T0}, \"temperature\": \"hot\"}}").into_bytes(),
            "wrong_type",
        ),
        (
            json_topic,
            b"{\"ts\": 1, \"temperature\": \"\xff\xfe\"}".to_vec(),
            "malformed",
        ),
        (json_topic, huge.into_bytes(), "too_large"),
        (
            json_topic,
            format!("{{\"ts\": {}, \"temperature\": 20}}", now + 86_400_000).into_bytes(),
            "future_timestamp",
        ),
        (json_topic, b"[1, 2, 3]".to_vec(), "not_an_object"),
        (
            json_topic,
            format!("{{\"ts\": {T0}, \"battery\": 3.9}}").into_bytes(),
            "missing_field",
        ),
        (cbor_topic, vec![0xff, 0x00, 0x13], "malformed"),
        (cbor_topic, vec![0xbf, 0x62, b't', b's'], "malformed"),
        (
            cbor_topic,
            cbor(&[("ts", T0 as f64), ("temperature", f64::NAN)]),
            "not_finite",
        ),
        (
            cbor_topic,
            cbor(&[("ts", T0 as f64), ("temperature", f64::INFINITY)]),
            "not_finite",
        ),
    ];
    let good = |device: &str, seq: i64, temperature: f64| {
        (
            format!("sensors/plant-1/{device}/telemetry"),
            json!({"ts": T0 + seq * 1000, "seq": seq, "temperature": temperature}).to_string(),
        )
    };
    // A good reading after every bad one: 25 and 31 alternate, so each after the first is a
    // state change.
    let mut expected_alerts = corpus.len() - 1;
    let mut expected_dead: Vec<(String, String)> = Vec::new();
    for (i, (topic, payload, reason)) in corpus.iter().enumerate() {
        publisher.publish(topic, payload.clone()).await;
        expected_dead.push(((*reason).to_owned(), (*topic).to_owned()));
        let temperature = if i % 2 == 0 { 25.0 } else { 31.0 };
        let (good_topic, good_payload) = good("good", i as i64, temperature);
        publisher.publish(&good_topic, good_payload).await;
    }
    // The good CBOR device: 25 then 35 gives one alert on the CBOR rule.
    publisher
        .publish(
            "sensors/plant-1/good/cbor",
            cbor(&[("ts", T0 as f64), ("seq", 1.0), ("temperature", 25.0)]),
        )
        .await;
    publisher
        .publish(
            "sensors/plant-1/good/cbor",
            cbor(&[
                ("ts", (T0 + 1000) as f64),
                ("seq", 2.0),
                ("temperature", 35.0),
            ]),
        )
        .await;
    expected_alerts += 1;

    assert!(
        wait_until(SETTLE, || dead.events().len() >= expected_dead.len()
            && alerts.events().len() >= expected_alerts)
        .await,
        "dead letters {:#?}\nalerts {:#?}",
        dead.events(),
        alerts.events()
    );
    let mut got: Vec<(String, String)> = dead
        .events()
        .iter()
        .map(|letter| {
            assert_eq!(letter["kind"], "dead_letter");
            assert!(letter["message"].as_str().is_some_and(|m| !m.is_empty()));
            (
                letter["reason"].as_str().unwrap_or_default().to_owned(),
                letter["topic"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    got.sort();
    expected_dead.sort();
    assert_eq!(got, expected_dead);
    assert_eq!(
        alerts.events().len(),
        expected_alerts,
        "{:#?}",
        alerts.events()
    );
    assert!(weir.metrics.is_ready(), "weir kept running");
    assert_eq!(
        weir.metrics
            .dead_letters
            .with_label_values(&["telemetry", "too_large"])
            .get(),
        1
    );
    weir.stop().await.expect("weir stops cleanly");
}

/// Weir with events going to a second broker on `output_port`, which is down.
async fn weir_with_output_down(
    input: &Mosquitto,
    output_port: u16,
    tag: &str,
    outbox: usize,
    policy: weir::config::OutboxPolicy,
) -> weir::app::Running {
    let mut config = example_config(input, tag);
    config.broker.publish_url = Some(format!("mqtt://127.0.0.1:{output_port}"));
    config.delivery.outbox_max_messages = outbox;
    config.delivery.outbox_when_full = policy;
    start_weir_with(config).await
}

/// One device alternating 25 and 31: every reading after the first is a state change.
fn flapping(count: usize) -> Vec<(String, Vec<u8>)> {
    (0..count)
        .map(|i| {
            let temperature = if i % 2 == 0 { 25.0 } else { 31.0 };
            (
                "sensors/plant-1/flap/telemetry".to_owned(),
                json!({"ts": T0 + i as i64 * 100, "seq": i, "temperature": temperature})
                    .to_string()
                    .into_bytes(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_output_broker_down_a_blocking_outbox_holds_its_bound_then_delivers_all_in_order()
{
    let input = Mosquitto::start();
    let mut output = Mosquitto::start_persistent_on(free_port());
    // The collector's persistent session exists before the outage, so the restarted broker
    // queues for it whatever weir publishes first.
    let collector = Collector::start(output.port(), &["alerts/#"]).await;
    output.terminate();
    let weir = weir_with_output_down(&input, output.port(), "block", 20, Default::default()).await;
    let metrics = weir.metrics.clone();
    let mut publisher = Publisher::start(&input).await;
    let readings = flapping(80);
    let expected = expected_ids(&readings);
    assert_eq!(expected.len(), 79);
    for (topic, payload) in &readings {
        publisher.publish(topic, payload.clone()).await;
    }
    assert!(
        wait_until(DEADLINE, || metrics.outbox_messages.get() == 20).await,
        "the outbox should fill to its bound"
    );
    let mut peak = 0;
    for _ in 0..20 {
        peak = peak.max(metrics.outbox_messages.get());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(peak, 20, "the outbox never exceeds its bound");
    assert_eq!(
        metrics
            .outbox_dropped
            .with_label_values(&["mqtt", "drop_oldest"])
            .get(),
        0
    );

    output.start_again();
    collector.assert_exactly(&expected).await;
    // In order: each device's alerts arrive by increasing event time.
    let times: Vec<i64> = collector
        .events()
        .iter()
        .map(|e| e["ts"].as_i64().unwrap_or_default())
        .collect();
    let mut sorted = times.clone();
    sorted.sort_unstable();
    sorted.dedup();
    let mut deduped = times.clone();
    deduped.dedup();
    assert_eq!(deduped, sorted, "alerts out of order");
    weir.stop().await.expect("weir stops cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_output_broker_down_drop_oldest_keeps_the_newest_and_counts_the_rest() {
    let input = Mosquitto::start();
    let mut output = Mosquitto::start_persistent_on(free_port());
    let collector = Collector::start(output.port(), &["alerts/#"]).await;
    output.terminate();
    let weir = weir_with_output_down(
        &input,
        output.port(),
        "drop-oldest",
        20,
        weir::config::OutboxPolicy::DropOldest,
    )
    .await;
    let metrics = weir.metrics.clone();
    let mut publisher = Publisher::start(&input).await;
    let readings = flapping(80);
    for (topic, payload) in &readings {
        publisher.publish(topic, payload.clone()).await;
    }
    assert!(
        wait_until(DEADLINE, || metrics
            .readings_decoded
            .with_label_values(&["telemetry"])
            .get()
            == 80)
        .await,
        "decoded {}, duplicates {}",
        metrics
            .readings_decoded
            .with_label_values(&["telemetry"])
            .get(),
        metrics
            .duplicates_dropped
            .with_label_values(&["telemetry"])
            .get()
    );
    // Every event reaches the sink shortly after its reading is decoded.
    let dropped = || {
        metrics
            .outbox_dropped
            .with_label_values(&["mqtt", "drop_oldest"])
            .get()
    };
    assert!(
        wait_until(DEADLINE, || dropped() == 79 - 20).await,
        "dropped {}",
        dropped()
    );
    assert_eq!(metrics.outbox_messages.get(), 20);
    output.start_again();
    // The 20 newest state changes: readings 60..80.
    let newest = expected_ids(&readings).into_iter().collect::<BTreeSet<_>>();
    assert!(
        wait_until(SETTLE, || collector.events().len() >= 20).await,
        "the 20 queued events arrive; got {}; sink connected {}, outbox {}, published {}",
        collector.events().len(),
        metrics.mqtt_connected.with_label_values(&["sink"]).get(),
        metrics.outbox_messages.get(),
        metrics.events_total(),
    );
    let received = collector.events();
    assert_eq!(received.len(), 20, "{received:#?}");
    let first_ts = received
        .iter()
        .map(|e| e["ts"].as_i64().unwrap_or_default())
        .min();
    assert_eq!(first_ts, Some(T0 + 60 * 100), "the oldest were dropped");
    assert!(collector.ids().is_subset(&newest));
    weir.stop().await.expect("weir stops cleanly");
}
