//! The AMQP sink (issue 16) against the machine's RabbitMQ, in a vhost of the test's own: events
//! in a queue bound to the exchange with their properties, `weir sinks init`, an unroutable
//! event dead-lettered, an outage through a TCP proxy the test cuts, fail-fast at start, and a
//! real Celery worker running a task per alert.

// The whole file talks to RabbitMQ through lapin (`amqp-sink` feature, in the default features).
#![cfg(feature = "amqp-sink")]

mod common;

use common::proxy::Proxy;
use common::services::Vhost;
use common::{config_from_text, start_weir_with, wait_until, Mosquitto, Subscriber};
use lapin::options::{BasicAckOptions, BasicGetOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

const SETTLE: Duration = Duration::from_secs(30);

fn rabbitmq() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 5672))
}

/// The example with the overheat rule's events going to the broker and to the exchange `weir`.
fn amqp_config(url: &str, extra: &str, routing: &str) -> String {
    common::example_with_overheat_outputs(
        &format!("[[rules.overheat.output]]\nsink = \"tasks\"\ntopic = \"{routing}\"\n\n[[rules.overheat.output]]\ntopic = \"alerts/{{site}}/{{device}}/overheat\""),
        &format!("[sinks.tasks]\nkind = \"amqp\"\nurl = \"{url}\"\nexchange = \"weir\"\nretry_initial = \"50ms\"\nretry_max = \"500ms\"\ntimeout = \"2s\"\n{extra}"),
    )
}

async fn init(text: &str, broker: &Mosquitto) -> Vec<String> {
    let config = config_from_text(broker, text, "amqp-init");
    let plan = weir::engine::Plan::build(&config).expect("plan");
    weir::sink::connect::init_all(&config, &plan)
        .await
        .unwrap_or_else(|err| panic!("{err:#}"))
}

/// A queue of the test bound to the exchange `weir` with `pattern`.
async fn bound_queue(vhost: &Vhost, pattern: &str) -> lapin::Channel {
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
        .expect("declare queue");
    channel
        .queue_bind(
            "alerts".into(),
            "weir".into(),
            pattern.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind queue");
    // The connection lives as long as the channel is used.
    std::mem::forget(connection);
    channel
}

/// Every message in the queue now: (message_id, routing key, type, persistent, body).
async fn drain(channel: &lapin::Channel) -> Vec<(String, String, String, bool, serde_json::Value)> {
    let mut out = Vec::new();
    while let Ok(Some(message)) = channel
        .basic_get("alerts".into(), BasicGetOptions::default())
        .await
    {
        let delivery = message.delivery;
        let properties = &delivery.properties;
        out.push((
            properties
                .message_id()
                .as_ref()
                .map(|s| s.to_string())
                .unwrap_or_default(),
            delivery.routing_key.to_string(),
            properties
                .kind()
                .as_ref()
                .map(|s| s.to_string())
                .unwrap_or_default(),
            *properties.delivery_mode() == Some(2),
            serde_json::from_slice(&delivery.data).expect("JSON body"),
        ));
        delivery
            .acker
            .ack(BasicAckOptions::default())
            .await
            .expect("ack");
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_reach_a_bound_queue_persistent_with_their_id_and_kind() {
    let broker = Mosquitto::start();
    let vhost = Vhost::create("amqp-ok");
    let text = amqp_config(&vhost.url(5672), "", "alerts/{site}/{device}/overheat");
    assert_eq!(
        init(&text, &broker).await,
        ["sink tasks: declared exchange weir (topic, durable)"]
    );
    assert_eq!(
        init(&text, &broker).await,
        ["sink tasks: found exchange weir"]
    );
    let channel = bound_queue(&vhost, "alerts.#").await;
    let mut config = config_from_text(&broker, &text, "amqp-ok");
    config.delivery.state_dir = Some(broker.scratch("state"));
    let weir = start_weir_with(config).await;
    let mut alerts = Subscriber::start(&broker, "alerts/#").await;
    common::publish_all(&broker, &common::crossings("dev-1", 0, 6)).await;
    let expected: Vec<String> = alerts
        .take(6)
        .await
        .iter()
        .map(|m| m.json()["id"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert!(
        wait_until(SETTLE, || weir
            .metrics
            .sink_confirmed
            .with_label_values(&["tasks"])
            .get()
            == 6)
        .await
    );
    let messages = drain(&channel).await;
    let ids: Vec<String> = messages.iter().map(|m| m.0.clone()).collect();
    assert_eq!(ids, expected, "every event, in order, message_id = id");
    for (id, key, kind, persistent, body) in &messages {
        assert_eq!(body["id"].as_str(), Some(id.as_str()));
        assert_eq!(key, "alerts.plant-1.dev-1.overheat");
        assert_eq!(kind, "state_change");
        assert!(persistent);
    }
    weir.stop().await.expect("weir stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unroutable_event_goes_to_the_dead_letter_topic() {
    let broker = Mosquitto::start();
    let vhost = Vhost::create("amqp-unroutable");
    // Nobody binds `nowhere.#`.
    let text = amqp_config(&vhost.url(5672), "", "nowhere/{device}");
    init(&text, &broker).await;
    let mut config = config_from_text(&broker, &text, "amqp-unroutable");
    config.delivery.state_dir = Some(broker.scratch("state"));
    let weir = start_weir_with(config).await;
    let mut dead = Subscriber::start(&broker, "weir/dead-letter/tasks/#").await;
    common::publish_all(&broker, &common::crossings("dev-1", 0, 1)).await;
    let letter = dead.take(1).await.remove(0);
    assert_eq!(letter.topic, "weir/dead-letter/tasks/unroutable");
    let letter = letter.json();
    assert!(
        letter["message"]
            .as_str()
            .unwrap_or_default()
            .contains("NO_ROUTE"),
        "{letter}"
    );
    assert_eq!(letter["event"]["device"], "dev-1");
    assert_eq!(
        weir.metrics
            .sink_dead_letters
            .with_label_values(&["tasks", "unroutable"])
            .get(),
        1
    );
    weir.stop().await.expect("weir stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_away_mid_stream_loses_no_event() {
    let broker = Mosquitto::start();
    let vhost = Vhost::create("amqp-outage");
    let proxy = Proxy::start(rabbitmq());
    let text = amqp_config(
        &vhost.url(proxy.port()),
        "",
        "alerts/{site}/{device}/overheat",
    );
    init(&text, &broker).await;
    let channel = bound_queue(&vhost, "alerts.#").await;
    let mut config = config_from_text(&broker, &text, "amqp-outage");
    config.delivery.state_dir = Some(broker.scratch("state"));
    let weir = start_weir_with(config).await;
    let mut alerts = Subscriber::start(&broker, "alerts/#").await;
    common::publish_all(&broker, &common::crossings("dev-1", 0, 4)).await;
    let mut expected: BTreeSet<String> = alerts
        .take(4)
        .await
        .iter()
        .map(|m| m.json()["id"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert!(
        wait_until(SETTLE, || weir
            .metrics
            .sink_confirmed
            .with_label_values(&["tasks"])
            .get()
            == 4)
        .await
    );

    proxy.cut();
    common::publish_all(&broker, &common::crossings("dev-1", 4, 4)).await;
    expected.extend(
        alerts
            .take(4)
            .await
            .iter()
            .map(|m| m.json()["id"].as_str().unwrap_or_default().to_owned()),
    );
    let metrics = weir.metrics.clone();
    assert!(
        wait_until(SETTLE, || metrics
            .sink_up
            .with_label_values(&["tasks"])
            .get()
            == 0
            && metrics.sink_retries.with_label_values(&["tasks"]).get() >= 1)
        .await,
        "the sink is down and retries"
    );
    proxy.restore();
    assert!(
        wait_until(SETTLE, || metrics
            .sink_confirmed
            .with_label_values(&["tasks"])
            .get()
            >= 8)
        .await,
        "every event confirmed after the outage"
    );
    let received: BTreeSet<String> = drain(&channel).await.into_iter().map(|m| m.0).collect();
    assert_eq!(
        received, expected,
        "every event in the queue (duplicates carry the same id)"
    );
    weir.stop().await.expect("weir stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_exchange_or_an_unreachable_broker_stops_weir_at_start() {
    let broker = Mosquitto::start();
    let vhost = Vhost::create("amqp-missing");
    let text = amqp_config(&vhost.url(5672), "", "alerts/{site}/{device}/overheat");
    let err = match weir::app::start(config_from_text(&broker, &text, "amqp-missing")).await {
        Ok(_) => panic!("weir started without its exchange"),
        Err(err) => format!("{err:#}"),
    };
    assert!(
        err.contains("sink `tasks` (amqp at amqp://guest:***@127.0.0.1:5672/"),
        "{err}"
    );
    assert!(
        err.contains("exchange weir cannot be used") && err.contains("weir sinks init"),
        "{err}"
    );
    assert!(
        !err.contains("guest:guest"),
        "no password in messages: {err}"
    );

    let proxy = Proxy::start(rabbitmq());
    proxy.cut();
    let text = amqp_config(
        &vhost.url(proxy.port()),
        "",
        "alerts/{site}/{device}/overheat",
    );
    let err = match weir::app::start(config_from_text(&broker, &text, "amqp-closed")).await {
        Ok(_) => panic!("weir started without RabbitMQ"),
        Err(err) => format!("{err:#}"),
    };
    assert!(
        err.contains("sink `tasks`") && err.contains("cannot connect"),
        "{err}"
    );
}

/// A Python venv with Celery, made once under the build's temp dir (a cache, like `target/`).
fn celery_venv() -> std::path::PathBuf {
    let venv = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("celery-venv");
    let celery = venv.join("bin/celery");
    if !celery.exists() {
        let made = std::process::Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .unwrap_or_else(|_| common::not_installed("python3", "python3-venv"));
        assert!(
            made.success(),
            "python3 -m venv failed (Debian package python3-venv)"
        );
        let installed = std::process::Command::new(venv.join("bin/pip"))
            .args(["install", "-q", "celery>=5.3,<6"])
            .status()
            .expect("run pip");
        assert!(
            installed.success(),
            "pip install celery failed (PyPI must be reachable)"
        );
    }
    celery
}

/// A real Celery worker, bound to the exchange weir publishes to, runs `alerts.handle` once per
/// alert with the event as its argument.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_celery_worker_runs_a_task_per_alert() {
    let celery = celery_venv();
    let broker = Mosquitto::start();
    let vhost = Vhost::create("amqp-celery");
    let dir = common::temp_dir("celery");
    let out = dir.join("events.jsonl");
    std::fs::write(
        dir.join("tasks.py"),
        r#"import json, os
from celery import Celery
from kombu import Exchange, Queue

app = Celery("tasks", broker=os.environ["BROKER"])
app.conf.task_queues = [Queue("weir-alerts", Exchange("weir", type="topic"), routing_key="alerts.#")]
app.conf.broker_connection_retry_on_startup = True

@app.task(name="alerts.handle")
def handle(event):
    with open(os.environ["OUT"], "a") as f:
        f.write(json.dumps(event) + "\n")
"#,
    )
    .expect("write tasks.py");
    let log = std::fs::File::create(dir.join("celery.log")).expect("log");
    let worker = common::KillOnDrop(
        std::process::Command::new(&celery)
            .args([
                "-A",
                "tasks",
                "worker",
                "--pool=solo",
                "-Q",
                "weir-alerts",
                "-l",
                "info",
            ])
            .args([
                "--without-heartbeat",
                "--without-mingle",
                "--without-gossip",
            ])
            .current_dir(&dir)
            .env("BROKER", vhost.url(5672))
            .env("OUT", &out)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start the celery worker"),
    );
    let ready = wait_until(Duration::from_secs(60), || {
        std::fs::read_to_string(dir.join("celery.log"))
            .unwrap_or_default()
            .contains("ready.")
    })
    .await;
    assert!(
        ready,
        "celery did not start:\n{}",
        std::fs::read_to_string(dir.join("celery.log")).unwrap_or_default()
    );

    let text = amqp_config(
        &vhost.url(5672),
        "message = \"celery\"\ncelery_task = \"alerts.handle\"\n",
        "alerts/{site}/{device}/overheat",
    );
    let mut config = config_from_text(&broker, &text, "amqp-celery");
    config.delivery.state_dir = Some(broker.scratch("state"));
    let weir = start_weir_with(config).await;
    let mut alerts = Subscriber::start(&broker, "alerts/#").await;
    common::publish_all(&broker, &common::crossings("dev-1", 0, 4)).await;
    let expected: Vec<String> = alerts
        .take(4)
        .await
        .iter()
        .map(|m| m.json()["id"].as_str().unwrap_or_default().to_owned())
        .collect();
    let ran = || {
        std::fs::read_to_string(&out)
            .unwrap_or_default()
            .lines()
            .map(|line| {
                let event: serde_json::Value = serde_json::from_str(line).expect("JSON line");
                event["id"].as_str().unwrap_or_default().to_owned()
            })
            .collect::<Vec<_>>()
    };
    assert!(
        wait_until(SETTLE, || ran().len() >= 4).await,
        "the worker ran {} tasks:\n{}",
        ran().len(),
        std::fs::read_to_string(dir.join("celery.log")).unwrap_or_default()
    );
    assert_eq!(
        ran(),
        expected,
        "one task per alert, with the event as its argument"
    );
    weir.stop().await.expect("weir stops");
    drop(worker);
}
