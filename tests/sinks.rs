//! Several sinks at once (issue 16): a rule delivers to each of its outputs, each sink has its
//! own outbox and policy, so one that is away holds up neither intake nor the other sinks, and
//! `weir sinks init` / `weir check` handle `[sinks.*]`. Real brokers only; the per-kind tests
//! are in `sink_http.rs`, `sink_amqp.rs` and `sink_postgres.rs`.

mod common;

use common::{config_from_text, start_weir_with, wait_until, Mosquitto, Publisher, Subscriber};
use std::collections::BTreeSet;
use std::time::Duration;

/// The example's overheat rule, delivering to the broker and to the sink `backup`.
fn two_broker_config(backup_url: &str, backup_extra: &str) -> String {
    let example = std::fs::read_to_string(common::EXAMPLE_CONFIG).expect("read example");
    let single = "[rules.overheat.output]\ntopic = \"alerts/{site}/{device}/overheat\"";
    assert!(
        example.contains(single),
        "the example's overheat output changed"
    );
    example.replace(
        single,
        "[[rules.overheat.output]]\nsink = \"backup\"\ntopic = \"copies/{site}/{device}/overheat\"\n\n[[rules.overheat.output]]\ntopic = \"alerts/{site}/{device}/overheat\"",
    ) + &format!("\n[sinks.backup]\nkind = \"mqtt\"\nurl = \"{backup_url}\"\n{backup_extra}")
}

/// Readings of `devices` devices that cross the overheat threshold on every second reading.
fn crossings(devices: usize, steps: usize) -> Vec<(String, Vec<u8>)> {
    let mut readings = Vec::new();
    for step in 0..steps {
        for device in 0..devices {
            let temperature = if step % 2 == 0 { 35.0 } else { 20.0 };
            let payload = serde_json::json!({
                "ts": common::T0 + step as i64 * 1000,
                "seq": step,
                "temperature": temperature,
            });
            readings.push((
                common::telemetry_topic("plant-1", &format!("dev-{device}")),
                payload.to_string().into_bytes(),
            ));
        }
    }
    readings
}

async fn ids(subscriber: &mut Subscriber, n: usize) -> BTreeSet<String> {
    subscriber
        .take(n)
        .await
        .iter()
        .map(|m| m.json()["id"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_reaches_both_brokers_with_the_same_id() {
    let broker = Mosquitto::start();
    let backup = Mosquitto::start();
    let mut config = config_from_text(&broker, &two_broker_config(&backup.url(), ""), "two");
    config.delivery.state_dir = Some(broker.scratch("state"));
    let weir = start_weir_with(config).await;
    let mut alerts = Subscriber::start(&broker, "alerts/#").await;
    let mut copies = Subscriber::start(&backup, "copies/#").await;
    let mut publisher = Publisher::start(&broker).await;
    // 3 devices x 4 steps: hot, normal, hot, normal = 4 transitions each.
    for (topic, payload) in crossings(3, 4) {
        publisher.publish(&topic, payload).await;
    }
    let from_broker = ids(&mut alerts, 12).await;
    let from_backup = ids(&mut copies, 12).await;
    assert_eq!(from_broker.len(), 12);
    assert_eq!(
        from_broker, from_backup,
        "each output carries the same events"
    );
    copies.assert_quiet().await;
    let confirmed = weir
        .metrics
        .sink_confirmed
        .with_label_values(&["backup"])
        .get();
    assert!(
        wait_until(common::DEADLINE, || weir
            .metrics
            .sink_confirmed
            .with_label_values(&["backup"])
            .get()
            >= 12)
        .await,
        "the backup broker's PUBACKs are counted per sink ({confirmed})"
    );
    weir.stop().await.expect("weir stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_that_is_away_drops_by_its_own_policy_and_holds_up_nothing_else() {
    let broker = Mosquitto::start();
    let mut backup = Mosquitto::start_persistent_on(common::free_port());
    let extra = "outbox_max_messages = 5\noutbox_when_full = \"drop_oldest\"\n";
    let mut config = config_from_text(&broker, &two_broker_config(&backup.url(), extra), "away");
    config.delivery.state_dir = Some(broker.scratch("state"));
    // A small outbox for the broker too: were the broker's sink held up by the backup's, intake
    // would stop and the alerts below would not arrive.
    config.pipeline.queue_capacity = 16;
    let weir = start_weir_with(config).await;
    let mut alerts = Subscriber::start(&broker, "alerts/#").await;
    let mut publisher = Publisher::start(&broker).await;
    backup.terminate();

    // 4 devices x 20 steps: 80 transitions, far more than the backup's outbox holds.
    for (topic, payload) in crossings(4, 20) {
        publisher.publish(&topic, payload).await;
    }
    let delivered = ids(&mut alerts, 80).await;
    assert_eq!(delivered.len(), 80, "the broker got every event");
    let metrics = &weir.metrics;
    assert!(
        wait_until(common::DEADLINE, || metrics
            .outbox_dropped
            .with_label_values(&["backup", "drop_oldest"])
            .get()
            >= 70)
        .await,
        "the backup's outbox kept its bound of 5 by dropping the oldest"
    );
    assert_eq!(
        metrics
            .outbox_dropped
            .with_label_values(&["mqtt", "drop_oldest"])
            .get(),
        0,
        "the broker's outbox dropped nothing"
    );
    assert_eq!(metrics.sink_outbox.with_label_values(&["backup"]).get(), 5);
    assert_eq!(metrics.sink_up.with_label_values(&["backup"]).get(), 0);

    // Back: the backup gets the newest events its outbox kept (QoS 1 from a clean restart of
    // its broker), and what follows.
    backup.start_again();
    let mut copies = Subscriber::start(&backup, "copies/#").await;
    assert!(
        wait_until(common::DEADLINE, || metrics
            .sink_up
            .with_label_values(&["backup"])
            .get()
            == 1)
        .await,
        "the backup sink came back"
    );
    for (topic, payload) in crossings(1, 2) {
        publisher.publish(&topic, payload.clone()).await;
    }
    assert!(
        copies.next(common::DEADLINE).await.is_some(),
        "events reach the backup again"
    );
    weir.stop().await.expect("weir stops");
}

#[test]
fn check_validates_sinks_without_connecting_and_sinks_init_says_what_it_did() {
    let dir = common::temp_dir("sinks-cli");
    let config = dir.join("weir.toml");
    // A port nothing listens on: `check` must not care, `sinks init` has nothing to create for
    // mqtt and http sinks.
    let text = two_broker_config("mqtt://127.0.0.1:9", "")
        + "\n[sinks.tickets]\nkind = \"http\"\nurl = \"http://127.0.0.1:9/hook\"\nbearer_token_file = \"missing-token\"\n";
    std::fs::write(&config, &text).expect("write config");
    let weir = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_weir"))
            .args(args)
            .arg(&config)
            .output()
            .expect("run weir")
    };
    let checked = weir(&["check", "--config"]);
    let stderr = String::from_utf8_lossy(&checked.stderr);
    assert!(!checked.status.success());
    assert!(
        stderr.contains("sinks.tickets: bearer_token_file: cannot read missing-token"),
        "{stderr}"
    );

    std::fs::write(dir.join("missing-token"), "s3cret\n").expect("write token");
    std::fs::write(
        &config,
        text.replace(
            "\"missing-token\"",
            &format!("{:?}", dir.join("missing-token")),
        ),
    )
    .expect("write config");
    let checked = weir(&["check", "--config"]);
    assert!(
        checked.status.success(),
        "{}",
        String::from_utf8_lossy(&checked.stderr)
    );
    assert!(String::from_utf8_lossy(&checked.stdout).contains("3 sinks"));

    let init = weir(&["sinks", "init", "--config"]);
    let stdout = String::from_utf8_lossy(&init.stdout);
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    assert!(
        stdout.contains("sink backup: nothing to create for a mqtt sink"),
        "{stdout}"
    );
    assert!(
        stdout.contains("sink tickets: nothing to create for a http sink"),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_that_cannot_be_reached_at_start_stops_weir_with_its_name() {
    let broker = Mosquitto::start();
    let closed = format!("mqtt://127.0.0.1:{}", common::free_port());
    let mut config = config_from_text(&broker, &two_broker_config(&closed, ""), "closed");
    config.sinks.get_mut("backup").expect("backup").timeout = Duration::from_secs(2);
    let err = match weir::app::start(config).await {
        Ok(_) => panic!("weir started with an unreachable sink"),
        Err(err) => format!("{err:#}"),
    };
    assert!(
        err.contains("sink `backup` (mqtt at mqtt://127.0.0.1:"),
        "{err}"
    );
}
