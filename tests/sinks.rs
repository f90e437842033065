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
    common::example_with_overheat_outputs(
        "[[rules.overheat.output]]\nsink = \"backup\"\ntopic = \"copies/{site}/{device}/overheat\"\n\n[[rules.overheat.output]]\ntopic = \"alerts/{site}/{device}/overheat\"",
        &format!("[sinks.backup]\nkind = \"mqtt\"\nurl = \"{backup_url}\"\n{backup_extra}"),
    )
}

/// Readings of `devices` devices that cross the overheat threshold on every second reading,
/// step by step across the devices: [`common::crossings`] interleaved.
fn crossings(devices: usize, steps: usize) -> Vec<(String, Vec<u8>)> {
    (0..steps)
        .flat_map(|step| {
            (0..devices)
                .flat_map(move |device| common::crossings(&format!("dev-{device}"), step, 1))
        })
        .collect()
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
    // New readings, past the 20 steps above: a repeat of old ones would be dropped as
    // duplicates, and the 5 kept events may reach the backup before `copies` subscribed.
    for (topic, payload) in common::crossings("dev-0", 20, 2) {
        publisher.publish(&topic, payload).await;
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

/// Issue 16's fault test: weir is killed with SIGKILL while the webhook answers 503 and RabbitMQ
/// and PostgreSQL are unreachable (through proxies the test cuts; the machine's services are
/// never stopped). After a restart with everything back, every expected event has reached each
/// sink, copies carry the same id and body, and the table holds each event exactly once.
// Checks RabbitMQ's queues with lapin; needs every sink kind's feature (the default features).
#[cfg(all(
    feature = "http-sink",
    feature = "amqp-sink",
    feature = "postgres-sink"
))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weir_killed_while_every_sink_is_away_delivers_everything_after_the_restart() {
    use common::proxy::Proxy;
    use common::services::{Database, Vhost, Webhook};
    use lapin::options::{BasicAckOptions, BasicGetOptions, QueueBindOptions, QueueDeclareOptions};
    use lapin::types::FieldTable;
    use std::net::SocketAddr;
    use std::process::{Command, Stdio};

    let broker = Mosquitto::start_persistent_on(common::free_port());
    let hook = Webhook::start();
    let vhost = Vhost::create("all-sinks");
    let db = Database::create("all_sinks");
    let amqp = Proxy::start(SocketAddr::from(([127, 0, 0, 1], 5672)));
    let postgres = Proxy::start(SocketAddr::from(([127, 0, 0, 1], 5432)));

    let example = std::fs::read_to_string(common::EXAMPLE_CONFIG).expect("read example");
    let single = "[rules.overheat.output]\ntopic = \"alerts/{site}/{device}/overheat\"";
    let text = example
        .replace(
            single,
            "[[rules.overheat.output]]\nsink = \"hook\"\n\n[[rules.overheat.output]]\nsink = \"tasks\"\ntopic = \"alerts/{site}/{device}/overheat\"\n\n[[rules.overheat.output]]\nsink = \"rows\"\n\n[[rules.overheat.output]]\ntopic = \"alerts/{site}/{device}/overheat\"",
        )
        .replace("snapshot_interval = \"30s\"", "snapshot_interval = \"1s\"")
        + &format!(
            "\n[sinks.hook]\nkind = \"http\"\nurl = \"{}\"\nretry_max = \"300ms\"\n\n[sinks.tasks]\nkind = \"amqp\"\nurl = \"{}\"\nexchange = \"weir\"\nretry_max = \"300ms\"\ntimeout = \"2s\"\n\n[sinks.rows]\nkind = \"postgres\"\nurl = \"{}\"\nretry_max = \"300ms\"\ntimeout = \"2s\"\n",
            hook.url("/hook"),
            vhost.url(amqp.port()),
            db.url(postgres.port())
        );
    let dir = broker.scratch("all-sinks");
    std::fs::create_dir_all(&dir).expect("dir");
    let config_path = dir.join("weir.toml");
    std::fs::write(&config_path, &text).expect("write config");
    let init = Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["sinks", "init", "--config"])
        .arg(&config_path)
        .output()
        .expect("weir sinks init");
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );

    // The test's own queue, bound before anything is published.
    let connection =
        lapin::Connection::connect(&vhost.url(5672), lapin::ConnectionProperties::default())
            .await
            .expect("connect to RabbitMQ");
    let channel = connection.create_channel().await.expect("channel");
    channel
        .queue_declare(
            "alerts".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("queue");
    channel
        .queue_bind(
            "alerts".into(),
            "weir".into(),
            "alerts.#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");

    let metrics = SocketAddr::from(([127, 0, 0, 1], common::free_port()));
    let spawn = || {
        common::KillOnDrop(
            Command::new(env!("CARGO_BIN_EXE_weir"))
                .args(["run", "--config"])
                .arg(&config_path)
                .arg("--broker")
                .arg(broker.url())
                .arg("--metrics-addr")
                .arg(metrics.to_string())
                .arg("--state-dir")
                .arg(dir.join("state"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(
                    std::fs::File::options()
                        .create(true)
                        .append(true)
                        .open(dir.join("weir.log"))
                        .expect("log"),
                )
                .spawn()
                .expect("spawn weir"),
        )
    };
    let ready = || async {
        wait_until(common::DEADLINE, || {
            common::http_get_blocking(metrics, "/readyz").is_some_and(|r| r.contains(" 200 "))
        })
        .await
    };
    let mut weir = spawn();
    assert!(ready().await, "weir did not become ready");
    let mut alerts = Subscriber::start(&broker, "alerts/#").await;

    // Part one with every sink up; part two with all of them away, then SIGKILL.
    let readings = crossings(4, 10);
    let (first, second) = readings.split_at(readings.len() / 2);
    let mut publisher = Publisher::start(&broker).await;
    for (topic, payload) in first {
        publisher.publish(topic, payload.clone()).await;
    }
    let first_events = ids(&mut alerts, 20).await;
    let rows = || {
        db.query("SELECT count(*) FROM overheat")
            .trim()
            .parse::<usize>()
            .unwrap_or(0)
    };
    assert!(
        wait_until(SETTLE_ALL, || rows() >= 20).await,
        "part one reached the database"
    );

    hook.answer(503);
    amqp.cut();
    postgres.cut();
    for (topic, payload) in second {
        publisher.publish(topic, payload.clone()).await;
    }
    let second_events = ids(&mut alerts, 20).await;
    // Snapshots every second: the events wait in the sinks' outboxes, which a snapshot holds.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    drop(weir);

    hook.answer(200);
    amqp.restore();
    postgres.restore();
    weir = spawn();
    assert!(ready().await, "weir came back");
    let expected: BTreeSet<String> = first_events.union(&second_events).cloned().collect();
    assert_eq!(expected.len(), 40);

    let webhook_ids = || -> BTreeSet<String> {
        hook.requests()
            .iter()
            .filter(|(status, _)| *status == 200)
            .map(|(_, r)| r.header("Idempotency-Key").unwrap_or_default().to_owned())
            .collect()
    };
    assert!(
        wait_until(SETTLE_ALL, || webhook_ids().is_superset(&expected)).await,
        "the webhook got {} of 40",
        webhook_ids().intersection(&expected).count()
    );
    assert!(
        wait_until(SETTLE_ALL, || rows() >= 40).await,
        "the database got {} of 40 rows",
        rows()
    );
    let mut queued: Vec<(String, Vec<u8>)> = Vec::new();
    let deadline = std::time::Instant::now() + SETTLE_ALL;
    while std::time::Instant::now() < deadline {
        while let Ok(Some(message)) = channel
            .basic_get("alerts".into(), BasicGetOptions::default())
            .await
        {
            let delivery = message.delivery;
            let id = delivery
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.to_string())
                .unwrap_or_default();
            queued.push((id, delivery.data.clone()));
            delivery
                .acker
                .ack(BasicAckOptions::default())
                .await
                .expect("ack");
        }
        if queued
            .iter()
            .map(|(id, _)| id.clone())
            .collect::<BTreeSet<_>>()
            .is_superset(&expected)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let queued_ids: BTreeSet<String> = queued.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(queued_ids, expected, "RabbitMQ got every event");

    // Copies carry the same id and the same body.
    let mut first_copy: std::collections::HashMap<String, Vec<u8>> =
        std::collections::HashMap::new();
    for (id, body) in queued.iter().cloned().chain(
        hook.requests()
            .into_iter()
            .filter(|(status, _)| *status == 200)
            .map(|(_, r)| {
                (
                    r.header("Idempotency-Key").unwrap_or_default().to_owned(),
                    r.body,
                )
            }),
    ) {
        let kept = first_copy.entry(id.clone()).or_insert_with(|| body.clone());
        assert_eq!(*kept, body, "a copy of {id} differs");
    }
    let once = db.query("SELECT count(*), count(DISTINCT id) FROM overheat");
    assert_eq!(
        once.trim(),
        "40|40",
        "the table holds each event exactly once"
    );
    let duplicates_webhook = hook.requests().iter().filter(|(s, _)| *s == 200).count() - 40;
    println!(
        "after SIGKILL with every sink away: webhook {} duplicate(s), RabbitMQ {} duplicate(s), PostgreSQL 0 (by its key)",
        duplicates_webhook,
        queued.len() - 40
    );
    drop(weir);
    std::mem::drop(connection);
}

/// How long the two tests above and below wait for every sink to settle.
#[cfg(all(
    feature = "http-sink",
    feature = "amqp-sink",
    feature = "postgres-sink"
))]
const SETTLE_ALL: Duration = Duration::from_secs(60);

/// Events per second each sink kind delivers on this machine: 2,000 events wait in the sink's
/// outbox while its service is away, then the time from its return to the last confirmation.
/// Printed (`cargo test --test sinks throughput -- --nocapture`, or with `--release`), never
/// asserted: the machine is shared.
// Checks RabbitMQ's queues with lapin; needs every sink kind's feature (the default features).
#[cfg(all(
    feature = "http-sink",
    feature = "amqp-sink",
    feature = "postgres-sink"
))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throughput_per_sink_is_measured() {
    use common::proxy::Proxy;
    use common::services::{Database, Vhost, Webhook};
    use std::net::SocketAddr;
    const EVENTS: u64 = 2000;

    let only: Option<String> = std::env::var("WEIR_SINK_RATE").ok();
    for (kind, batch) in [("http", 1), ("http", 100), ("amqp", 256), ("postgres", 500)] {
        if only
            .as_deref()
            .is_some_and(|o| o != format!("{kind}{batch}"))
        {
            continue;
        }
        // 2,000 QoS 1 readings published faster than weir acknowledges them (after its log's
        // fsync): more than Mosquitto queues per client by default (1,000; it drops the rest).
        let broker = Mosquitto::start_with("max_queued_messages 100000\n");
        let hook = Webhook::start();
        let vhost = Vhost::create("rate");
        let db = Database::create("rate");
        let amqp = Proxy::start(SocketAddr::from(([127, 0, 0, 1], 5672)));
        let postgres = Proxy::start(SocketAddr::from(([127, 0, 0, 1], 5432)));
        let url = match kind {
            "http" => hook.url("/hook"),
            "amqp" => vhost.url(amqp.port()),
            _ => db.url(postgres.port()),
        };
        let example = std::fs::read_to_string(common::EXAMPLE_CONFIG).expect("read example");
        let single = "[rules.overheat.output]\ntopic = \"alerts/{site}/{device}/overheat\"";
        let text = example.replace(
            single,
            "[rules.overheat.output]\nsink = \"out\"\ntopic = \"alerts/{site}/{device}/overheat\"",
        ) + &format!(
            "\n[sinks.out]\nkind = \"{kind}\"\nurl = \"{url}\"\nbatch = {batch}\nretry_initial = \"20ms\"\nretry_max = \"100ms\"\n{}",
            if kind == "amqp" { "exchange = \"weir\"\n" } else { "" }
        );
        let mut config = config_from_text(&broker, &text, "rate");
        config.delivery.state_dir = Some(broker.scratch("state"));
        let plan = weir::engine::Plan::build(&config).expect("plan");
        weir::sink::connect::init_all(&config, &plan)
            .await
            .expect("init");
        if kind == "amqp" {
            // A queue for the events, so none is unroutable.
            let connection = lapin::Connection::connect(&vhost.url(5672), Default::default())
                .await
                .unwrap();
            let channel = connection.create_channel().await.unwrap();
            channel
                .queue_declare("q".into(), Default::default(), Default::default())
                .await
                .unwrap();
            channel
                .queue_bind(
                    "q".into(),
                    "weir".into(),
                    "#".into(),
                    Default::default(),
                    Default::default(),
                )
                .await
                .unwrap();
            let _ = connection.close(200, "bound".into()).await;
        }
        let weir = start_weir_with(config).await;
        hook.answer(503);
        amqp.cut();
        postgres.cut();
        let mut publisher = Publisher::start(&broker).await;
        for (topic, payload) in crossings(50, (EVENTS / 50) as usize) {
            publisher.publish(&topic, payload).await;
        }
        let metrics = weir.metrics.clone();
        let outbox = || metrics.sink_outbox.with_label_values(&["out"]).get() as u64;
        assert!(
            wait_until(SETTLE_ALL, || outbox() >= EVENTS).await,
            "outbox {}, received {}, emitted {}, dup {}",
            outbox(),
            metrics.readings_total(),
            metrics
                .events_emitted
                .with_label_values(&["overheat", "state_change"])
                .get(),
            metrics
                .duplicates_dropped
                .with_label_values(&["telemetry"])
                .get()
        );
        hook.answer(200);
        amqp.restore();
        postgres.restore();
        let confirmed = || metrics.sink_confirmed.with_label_values(&["out"]).get();
        // From the first confirmation, so the backoff before the first retry does not count.
        assert!(
            wait_until(SETTLE_ALL, || confirmed() > 0).await,
            "nothing confirmed"
        );
        let (started, from) = (std::time::Instant::now(), confirmed());
        assert!(
            wait_until(SETTLE_ALL, || confirmed() >= EVENTS).await,
            "confirmed {}",
            confirmed()
        );
        let took = started.elapsed();
        println!(
            "{kind} sink, batch {batch}: {} events in {took:?} after the first confirmation: {:.0} events/s",
            EVENTS - from,
            (EVENTS - from) as f64 / took.as_secs_f64()
        );
        weir.stop().await.expect("weir stops");
    }
}
