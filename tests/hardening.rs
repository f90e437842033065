//! Faults an operator meets on a gateway, each through a real Mosquitto: a poison message that
//! used to stop intake for every device, and a state dir whose disk fills and frees again.

mod common;

use common::*;
use serde_json::json;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// A reading of the reference scenario with its sequence number.
fn reading(seq: u64, temperature: f64) -> Vec<u8> {
    json!({"ts": T0 + seq as i64 * 100, "seq": seq, "temperature": temperature, "humidity": 40.0})
        .to_string()
        .into_bytes()
}

/// The value of one sample of `/metrics` (name with its labels, as Prometheus prints it).
async fn metric(weir: &weir::app::Running, sample: &str) -> Option<f64> {
    let (_, body) = http_get(weir.http_addr, "/metrics").await;
    body.lines().find_map(|line| {
        let value = line.strip_prefix(sample)?.strip_prefix(' ')?;
        value.trim().parse().ok()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_the_packet_limit_is_dead_lettered_once_and_intake_goes_on() {
    let broker = Mosquitto::start();
    // The example: at_least_once, a persistent session, max_packet_bytes = 262144.
    let weir = start_weir(&broker, "poison").await;
    let mut dead_letters = Subscriber::start(&broker, "weir/dead-letter/#").await;
    let mut alerts = Subscriber::start(&broker, "alerts/#").await;
    let mut publisher = Publisher::start(&broker).await;

    publisher
        .publish(&telemetry_topic("plant-1", "dev-big"), vec![b'x'; 300_000])
        .await;
    const DEVICES: u64 = 20;
    const PER_DEVICE: u64 = 20;
    for seq in 0..PER_DEVICE {
        for device in 0..DEVICES {
            // Each device's last reading is hot: one alert per device.
            let temperature = if seq + 1 == PER_DEVICE { 31.0 } else { 25.0 };
            publisher
                .publish_pipelined(
                    &telemetry_topic("plant-1", &format!("dev-{device}")),
                    reading(seq, temperature),
                    false,
                    64,
                )
                .await;
        }
    }
    publisher.flush().await;

    let decoded = weir
        .metrics
        .readings_decoded
        .with_label_values(&["telemetry"]);
    let good = DEVICES * PER_DEVICE;
    assert!(
        wait_until(DEADLINE, || decoded.get() >= good).await,
        "intake stopped behind the oversized message: {} of {good} readings decoded, {} source reconnects\n{}",
        decoded.get(),
        weir.metrics
            .mqtt_reconnects
            .with_label_values(&["source"])
            .get(),
        broker.log()
    );
    let letter = dead_letters
        .next(DEADLINE)
        .await
        .expect("a dead letter for the oversized message")
        .json();
    assert_eq!(letter["reason"], "too_large", "{letter}");
    assert_eq!(letter["topic"], telemetry_topic("plant-1", "dev-big"));
    assert!(
        letter["payload_bytes"].as_u64().unwrap_or(0) > 65_536,
        "{letter}"
    );
    let hot = alerts.take(DEVICES as usize).await;
    assert!(hot.iter().all(|m| m.json()["to"] == "hot"));
    assert!(
        wait_until(DEADLINE, || weir.metrics.inputs_acked.get() > good).await,
        "every input, the oversized one included, is acknowledged: {} acks",
        weir.metrics.inputs_acked.get()
    );
    // It cost one reconnect, not a loop, and was dead-lettered once.
    dead_letters.assert_quiet().await;
    let reconnects = weir
        .metrics
        .mqtt_reconnects
        .with_label_values(&["source"])
        .get();
    assert!(reconnects <= 1, "{reconnects} source reconnects");
    assert_eq!(
        metric(&weir, "weir_mqtt_oversized_packets_total").await,
        Some(1.0)
    );
    weir.stop().await.expect("clean stop");
}

/// A tmpfs mounted for one test; unmounted and removed on drop, also when the test fails.
struct SmallDisk {
    /// Removed (by its guard) after the drop below has unmounted it.
    mount: TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> Self {
        let mount = temp_dir("small-disk");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(mount.path())
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "cannot mount a tmpfs at {} (this test needs root, or CAP_SYS_ADMIN, to give the state dir a small disk)",
            mount.display()
        );
        Self { mount }
    }

    fn path(&self) -> &Path {
        &self.mount
    }

    fn resize(&self, size: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(self.mount.path())
            .status()
            .expect("run mount");
        assert!(status.success(), "cannot resize {}", self.mount.display());
    }

    /// Fills the disk to the last byte with a file of its own.
    fn fill(&self) {
        use std::io::Write;
        let mut file = std::fs::File::create(self.mount.join("filler")).expect("create filler");
        let block = vec![0u8; 4096];
        while file.write_all(&block).and_then(|()| file.flush()).is_ok() {}
        let _ = file.write_all(&[0]);
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.mount.path()).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intake_resumes_by_itself_when_the_state_dirs_disk_has_room_again() {
    let disk = SmallDisk::mount("1m");
    let broker = Mosquitto::start();
    let mut config = example_config(&broker, "disk");
    config.delivery.state_dir = Some(disk.path().join("state"));
    let weir = start_weir_with(config.clone()).await;
    let mut alerts = Subscriber::start(&broker, "alerts/#").await;
    let mut publisher = Publisher::start(&broker).await;

    disk.fill();
    const DEVICES: u64 = 10;
    const PER_DEVICE: u64 = 30;
    let mut published = Vec::new();
    for seq in 0..PER_DEVICE {
        for device in 0..DEVICES {
            let temperature = if seq + 1 == PER_DEVICE { 31.0 } else { 25.0 };
            let topic = telemetry_topic("plant-1", &format!("dev-{device}"));
            let payload = reading(seq, temperature);
            publisher
                .publish_pipelined(&topic, payload.clone(), false, 64)
                .await;
            published.push((topic, payload));
        }
    }
    publisher.flush().await;
    let total = DEVICES * PER_DEVICE;

    // While the disk is full: not ready, with the reason; the metric says so; nothing acked.
    assert!(
        eventually(DEADLINE, || async {
            let (status, body) = http_get(weir.http_addr, "/readyz").await;
            status == 503 && body.contains("input log")
        })
        .await,
        "/readyz did not report the full disk: {:?}",
        http_get(weir.http_addr, "/readyz").await
    );
    assert_eq!(metric(&weir, "weir_store_writable").await, Some(0.0));
    assert!(
        metric(&weir, "weir_store_write_errors_total{file=\"log\"}")
            .await
            .unwrap_or(0.0)
            >= 1.0
    );
    let acked_while_full = weir.metrics.inputs_acked.get();
    assert!(
        acked_while_full < total,
        "{acked_while_full} acks while the disk was full"
    );

    // The disk grows, as in the outage this test reproduces; weir goes on by itself.
    disk.resize("64m");
    assert!(
        wait_until(DEADLINE, || weir.metrics.inputs_acked.get() >= total).await,
        "acks did not resume: {} of {total} (readyz: {:?})",
        weir.metrics.inputs_acked.get(),
        http_get(weir.http_addr, "/readyz").await
    );
    let (status, body) = http_get(weir.http_addr, "/readyz").await;
    assert_eq!((status, body.as_str()), (200, "ready\n"));
    assert_eq!(metric(&weir, "weir_store_writable").await, Some(1.0));
    let hot = alerts.take(DEVICES as usize).await;
    assert!(hot.iter().all(|m| m.json()["to"] == "hot"));
    weir.stop().await.expect("clean stop");

    // Nothing was acknowledged before it was durable: every reading is in the log, once.
    let recovered =
        weir::store::log::recover(&disk.path().join("state").join("log"), 0).expect("read log");
    let mut logged: Vec<(String, Vec<u8>)> = recovered
        .records
        .into_iter()
        .map(|r| (r.topic, r.payload))
        .collect();
    logged.sort();
    published.sort();
    assert_eq!(logged.len(), published.len(), "{:?}", recovered.damage);
    assert_eq!(logged, published);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_that_cannot_be_written_leaves_the_previous_one_and_snapshots_resume() {
    let disk = SmallDisk::mount("1m");
    let broker = Mosquitto::start();
    let mut config = example_config(&broker, "snapshot-disk");
    config.delivery.state_dir = Some(disk.path().join("state"));
    // Snapshots every second, so some are due while the disk is full.
    config.delivery.snapshot_interval = Duration::from_secs(1);
    let weir = start_weir_with(config).await;
    let mut publisher = Publisher::start(&broker).await;
    publisher
        .reading(
            "plant-1",
            "dev-1",
            json!({"ts": T0, "seq": 0, "temperature": 25.0}),
        )
        .await;
    assert!(
        wait_until(DEADLINE, || weir.metrics.snapshots_written.get() >= 1).await,
        "a first snapshot"
    );
    disk.fill();
    // A snapshot that cannot be written is counted; the previous one stays, whole.
    assert!(
        eventually(DEADLINE, || async {
            metric(&weir, "weir_store_write_errors_total{file=\"snapshot\"}")
                .await
                .unwrap_or(0.0)
                >= 1.0
        })
        .await,
        "no failed snapshot counted"
    );
    let state = disk.path().join("state");
    assert!(weir::store::snapshot::load(&state).snapshot.is_some());
    assert!(
        !state.join("snapshot.tmp").exists(),
        "a partial snapshot left behind"
    );
    let snapshots_while_full = weir.metrics.snapshots_written.get();
    disk.resize("64m");
    assert!(
        wait_until(DEADLINE, || weir.metrics.snapshots_written.get()
            > snapshots_while_full)
        .await,
        "snapshots resume too"
    );
    weir.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_mqtt_5_the_broker_knows_the_packet_limit_and_drops_an_oversized_message_itself() {
    let broker = Mosquitto::start();
    let mut config = example_config(&broker, "poison-v5");
    config.broker.protocol = weir::config::Protocol::V5;
    let weir = start_weir_with(config).await;
    let mut alerts = Subscriber::start(&broker, "alerts/#").await;
    let mut publisher = Publisher::start(&broker).await;
    publisher
        .publish(&telemetry_topic("plant-1", "dev-big"), vec![b'x'; 300_000])
        .await;
    publisher
        .reading(
            "plant-1",
            "dev-1",
            json!({"ts": T0, "seq": 0, "temperature": 31.0}),
        )
        .await;
    let hot = alerts.take(1).await;
    assert_eq!(hot[0].json()["device"], "dev-1");
    let reconnects = weir
        .metrics
        .mqtt_reconnects
        .with_label_values(&["source"])
        .get();
    assert_eq!(
        reconnects, 0,
        "the oversized message reached weir's connection"
    );
    assert_eq!(
        metric(&weir, "weir_mqtt_oversized_packets_total").await,
        Some(0.0)
    );
    weir.stop().await.expect("clean stop");
}
