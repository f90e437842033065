//! The two pipeline layouts (`pipeline.layout`) through a real Mosquitto, on one runtime thread as
//! on a small gateway: workers inline in the intake task, with the read pause at its longest,
//! derive exactly the events that worker tasks derive, and they run their processing-time
//! timers. (That they keep open windows across a restart is in `tests/pipeline.rs`.)

mod common;

use common::{
    at_most_once_config, config_from_text, start_weir_with, wait_until, Message, Mosquitto,
    Publisher, Subscriber, DEADLINE, T0,
};
use serde_json::json;
use std::time::Duration;
use weir::config::Layout;

const DEVICES: u64 = 20;
const READINGS: u64 = 1_200;

/// The temperature of `device` at `step`: a wave across the example's overheat thresholds (30.0
/// up, 28.0 down), in tenths so that JSON carries it exactly.
fn temperature(device: u64, step: u64) -> f64 {
    let phase = (step + device * 7) % 40;
    let x = phase as f64 / 40.0 * std::f64::consts::TAU;
    (290.0 + 30.0 * x.sin()).round() / 10.0
}

/// The overheat rule's transitions over the readings: what the alerts must number.
fn expected_alerts() -> usize {
    let mut hot = [false; DEVICES as usize];
    let mut alerts = 0;
    for index in 0..READINGS {
        let (device, step) = (index % DEVICES, index / DEVICES);
        let value = temperature(device, step);
        let state = &mut hot[device as usize];
        if (!*state && value > 30.0) || (*state && value < 28.0) {
            *state = !*state;
            alerts += 1;
        }
    }
    alerts
}

/// Every message on `subscriber` until it is quiet for a second.
async fn drain(subscriber: &mut Subscriber) -> Vec<Message> {
    let mut messages = Vec::new();
    while let Some(message) = subscriber.next(Duration::from_secs(1)).await {
        messages.push(message);
    }
    messages
}

/// Runs the readings of [`DEVICES`] devices through a fresh broker and weir in `layout`, then
/// stops weir (flushing open windows as partial); every alert and rollup it published, sorted.
async fn events_through(layout: Layout, tag: &str) -> Vec<(String, Vec<u8>)> {
    let broker = Mosquitto::start();
    let mut config = at_most_once_config(&broker, tag);
    config.pipeline.layout = layout;
    config.pipeline.read_pause = Duration::from_millis(1);
    let weir = start_weir_with(config).await;
    let mut alerts = Subscriber::start(&broker, "alerts/#").await;
    let mut rollups = Subscriber::start(&broker, "rollups/#").await;
    let mut device = Publisher::start(&broker).await;
    for index in 0..READINGS {
        let (number, step) = (index % DEVICES, index / DEVICES);
        let reading = json!({
            "ts": T0 + 1000 * step as i64,
            "seq": step + 1,
            "temperature": temperature(number, step),
            "humidity": 40.0,
        });
        device
            .reading("s1", &format!("d{number:02}"), reading)
            .await;
    }
    let decoded = weir
        .metrics
        .readings_decoded
        .with_label_values(&["telemetry"]);
    assert!(
        wait_until(DEADLINE, || decoded.get() == READINGS).await,
        "{layout:?}: weir decoded {} of {READINGS} readings",
        decoded.get()
    );
    weir.stop().await.expect("weir stops cleanly");
    let alerts = drain(&mut alerts).await;
    let rollups = drain(&mut rollups).await;
    assert_eq!(alerts.len(), expected_alerts(), "{layout:?}: alerts");
    // Each device's 60 readings span one minute of event time: one closed window and the
    // partial one flushed at stop, at least.
    assert!(
        rollups.len() >= 2 * DEVICES as usize,
        "{layout:?}: {} rollups",
        rollups.len()
    );
    let mut events: Vec<_> = alerts
        .into_iter()
        .chain(rollups)
        .map(|m| (m.topic, m.payload.to_vec()))
        .collect();
    events.sort();
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn inline_workers_derive_exactly_what_worker_tasks_derive() {
    let inline = events_through(Layout::Inline, "inline").await;
    let tasks = events_through(Layout::Tasks, "tasks").await;
    assert_eq!(inline.len(), tasks.len());
    for (inline, tasks) in inline.iter().zip(&tasks) {
        assert_eq!(
            inline,
            tasks,
            "{}: {} against {}",
            inline.0,
            String::from_utf8_lossy(&inline.1),
            String::from_utf8_lossy(&tasks.1)
        );
    }
}

const LIVENESS: &str = r#"
[broker]
url = "mqtt://127.0.0.1:1883"

[pipeline]
layout = "inline"
read_pause = "1ms"

[inputs.telemetry]
topic = "sensors/{site}/{device}/telemetry"

[rules.alive]
input = "telemetry"

[rules.alive.liveness]
timeout = "1s"

[rules.alive.output]
topic = "status-events/{site}/{device}/{rule}"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn inline_workers_run_their_timers_while_no_reading_arrives() {
    let broker = Mosquitto::start();
    let weir = start_weir_with(config_from_text(&broker, LIVENESS, "inline-timers")).await;
    let mut events = Subscriber::start(&broker, "status-events/#").await;
    let mut device = Publisher::start(&broker).await;
    device
        .publish(
            "sensors/s1/d1/telemetry",
            json!({"temperature": 20.0}).to_string(),
        )
        .await;
    // Nothing arrives from here on: only the timers can see the silence.
    let offline = events.take(1).await;
    let offline = offline[0].json();
    assert_eq!(
        (&offline["to"], &offline["reason"]),
        (&json!("offline"), &json!("timeout"))
    );
    weir.stop().await.expect("weir stops cleanly");
}
