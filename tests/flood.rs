//! A flood of new device ids (issue 5, item 6): the engine keeps at most
//! `max_devices_per_worker` devices, evicts the idle ones (counted), keeps serving the devices that
//! keep talking, and its memory stays flat. Engine-level, in process: no broker is involved in
//! what is measured here.

use serde_json::json;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;
use weir::config::{self, Overrides};
use weir::engine::{Plan, RawMessage, Worker};
use weir::metrics::Metrics;

const CAP: usize = 1_000;
const FLOOD: usize = 100_000;
const T0: i64 = 1_732_600_000_000;

fn message(device: &str, ts: i64, temperature: f64) -> RawMessage {
    RawMessage {
        input: 0,
        topic: format!("sensors/plant-1/{device}/telemetry"),
        payload: json!({"ts": ts, "temperature": temperature})
            .to_string()
            .into_bytes()
            .into(),
        arrival: Instant::now(),
        arrival_ms: ts,
        lsn: 0,
        trace: None,
    }
}

/// Resident memory of this process, in KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

#[test]
fn a_flood_of_new_device_ids_evicts_idle_devices_and_keeps_memory_flat() {
    let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/config/example.toml"));
    let mut config =
        config::load(path, &Overrides::default()).unwrap_or_else(|err| panic!("{err}"));
    config.pipeline.max_devices_per_worker = CAP;
    let plan = Arc::new(Plan::build(&config).expect("plan"));
    let metrics = Arc::new(Metrics::new());
    let mut worker = Worker::new(plan, metrics.clone());
    let mut out = Vec::new();
    let mut alerts = Vec::new();

    // A real device goes hot before the flood and keeps reporting through it.
    worker.process(&message("boiler", T0, 35.0), &mut out);
    alerts.append(&mut out);
    let mut rss_after_warmup = 0;
    for i in 0..FLOOD {
        worker.process(&message(&format!("spoof-{i}"), T0 + 1, 20.0), &mut out);
        out.clear();
        if i % 100 == 0 {
            worker.process(&message("boiler", T0 + 1 + i as i64, 34.0), &mut out);
            alerts.append(&mut out);
        }
        if i == 10 * CAP {
            rss_after_warmup = rss_kib();
        }
    }
    let rss_end = rss_kib();

    assert_eq!(
        worker.device_count(),
        CAP,
        "never more devices than the cap"
    );
    let evicted = metrics
        .devices_evicted
        .with_label_values(&["telemetry"])
        .get();
    assert_eq!(
        evicted as usize,
        FLOOD + 1 - CAP,
        "every device past the cap evicted one"
    );
    // The boiler was never evicted: it stayed hot, so its only alert is the first one.
    let boiler: Vec<_> = alerts
        .iter()
        .filter(|m| m.topic == "alerts/plant-1/boiler/overheat")
        .collect();
    assert_eq!(boiler.len(), 1, "the talking device kept its state");
    // Memory is flat once the cap is reached: a few MB of allocator noise at most.
    let growth_kib = rss_end.saturating_sub(rss_after_warmup);
    println!(
        "rss after {} ids: {rss_after_warmup} KiB; after {FLOOD}: {rss_end} KiB (+{growth_kib} KiB); evicted {evicted}",
        10 * CAP
    );
    assert!(
        growth_kib < 16 * 1024,
        "memory grew by {growth_kib} KiB during the flood"
    );
}
