//! Restoring operator state from a snapshot keeps derived gauges right: a device that was offline
//! when the snapshot was taken is still counted offline after a restart. Engine-level, in process.

use serde_json::json;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;
use weir::config::Overrides;
use weir::engine::{Plan, RawMessage, Worker};
use weir::metrics::Metrics;

const T0: i64 = 1_732_600_000_000;

const CONFIG: &str = r#"
[broker]
url = "mqtt://127.0.0.1:1883"

[inputs.telemetry]
topic = "sensors/{site}/{device}/telemetry"

[inputs.telemetry.time]
field = "ts"
unit = "ms"

[rules.alive.liveness]
timeout = "2s"

[rules.alive.output]
topic = "status/{site}/{device}/{rule}"
"#;

fn worker(metrics: &Arc<Metrics>) -> Worker {
    let config = weir::config::parse(CONFIG, Path::new("restore.toml"), &Overrides::default())
        .unwrap_or_else(|err| panic!("{err}"));
    let plan = Arc::new(Plan::build(&config).expect("plan"));
    metrics.register_labels(
        plan.inputs.iter().map(|i| &*i.name),
        plan.rules
            .iter()
            .map(|r| (&*r.name, r.operator.event_kind())),
        &weir::engine::REASONS,
    );
    Worker::new(plan, metrics.clone())
}

#[test]
fn a_device_offline_at_the_snapshot_is_still_counted_offline_after_restore() {
    let metrics = Arc::new(Metrics::new());
    let mut before = worker(&metrics);
    let mut out = Vec::new();
    for device in ["d1", "d2"] {
        before.process(
            &RawMessage {
                input: 0,
                topic: format!("sensors/s1/{device}/telemetry"),
                payload: json!({"ts": T0, "temperature": 20.0})
                    .to_string()
                    .into_bytes()
                    .into(),
                arrival: Instant::now(),
                arrival_ms: T0,
                lsn: 0,
                trace: None,
            },
            &mut out,
        );
    }
    // Both are seen on the first tick, then silent past the timeout.
    before.tick(T0 + 250, &mut out);
    before.tick(T0 + 10_000, &mut out);
    let offline = |m: &Metrics| m.devices_offline.with_label_values(&["alive"]).get();
    assert_eq!(offline(&metrics), 2, "{out:?}");
    let saved = before.snapshot();

    let restarted = Arc::new(Metrics::new());
    let mut after = worker(&restarted);
    for device in &saved {
        after.restore(device);
    }
    assert_eq!(
        offline(&restarted),
        2,
        "restored offline devices are counted"
    );
}
