//! Bytes of state per device, measured in-process: a worker takes two readings from each of
//! 100,000 devices (so each has state in every rule and an open window), with the example's
//! rules, with each rule alone, and with none (what any device costs: its topic, origin, tables
//! and dedup window). The last case sends a third reading 10 s on, so every device has crossed
//! a window boundary (its first window fired, the next is open): what a device costs once it
//! has run for a while. Each case runs in a fresh process so freed memory of one does not hide
//! the growth of the next.
//!
//! Run: `cargo bench --bench memory [-- --devices 100000]`. Target (issue 7): RSS <= 64 MB at
//! 100,000 devices, so about 600 bytes per device for the example's two rules.
//!
//! Three figures per device: bytes the program asked the allocator for; the same rounded to
//! glibc malloc chunks (size + 8 rounded up to 16, at least 32), which is what the heap grows
//! by; and the growth of the process's RSS, which adds hash-table and vector slack that is
//! allocated but not yet touched, and fragmentation.

use std::alloc::{GlobalAlloc, Layout, System};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;
use weir::config::{self, Overrides};
use weir::engine::{Plan, RawMessage, Worker};
use weir::metrics::Metrics;

/// Counts live bytes on the way to the system allocator.
struct Counting;

static REQUESTED: AtomicUsize = AtomicUsize::new(0);
static CHUNKS: AtomicUsize = AtomicUsize::new(0);

fn chunk(size: usize) -> usize {
    ((size + 8 + 15) & !15).max(32)
}

fn grew(size: usize) {
    REQUESTED.fetch_add(size, Relaxed);
    CHUNKS.fetch_add(chunk(size), Relaxed);
}

fn shrank(size: usize) {
    REQUESTED.fetch_sub(size, Relaxed);
    CHUNKS.fetch_sub(chunk(size), Relaxed);
}

// SAFETY: every call is forwarded to `System` unchanged; only counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            grew(layout.size());
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            grew(layout.size());
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        shrank(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let moved = unsafe { System.realloc(ptr, layout, new_size) };
        if !moved.is_null() {
            shrank(layout.size());
            grew(new_size);
        }
        moved
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// (name, rules, readings per device). Readings are 1 s apart, but the third is 10 s after the
/// first: in the next window.
const CASES: [(&str, &[&str], i64); 5] = [
    (
        "both rules (overheat, climate)",
        &["overheat", "climate"],
        2,
    ),
    ("overheat (hysteresis) alone", &["overheat"], 2),
    (
        "climate (tumbling, 2 metrics x 4 aggregates) alone",
        &["climate"],
        2,
    ),
    ("no rules: topic, origin, tables, dedup", &[], 2),
    (
        "both rules, after a window boundary (3rd reading)",
        &["overheat", "climate"],
        3,
    ),
];

fn rss_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: usize = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn plan(rules: &[&str]) -> Plan {
    let mut config = config::parse(
        config::EXAMPLE,
        std::path::Path::new("config/example.toml"),
        &Overrides::default(),
    )
    .expect("the example config is valid");
    config
        .rules
        .retain(|name, _| rules.contains(&name.as_str()));
    Plan::build(&config).expect("the plan builds")
}

/// Runs one case in this process and prints its three figures per device.
fn measure(case: usize, devices: usize) {
    let (name, rules, readings) = CASES[case];
    let mut worker = Worker::new(Arc::new(plan(rules)), Arc::new(Metrics::new()));
    let mut out = Vec::with_capacity(1024);
    let (requested, chunks, rss) = (REQUESTED.load(Relaxed), CHUNKS.load(Relaxed), rss_bytes());
    let arrival = Instant::now();
    let ts0: i64 = 1_732_600_000_000;
    for step in 0..readings {
        for device in 0..devices {
            let ts = ts0 + if step < 2 { step * 1000 } else { 10_000 };
            let payload = format!(
                r#"{{"ts":{ts},"seq":{step},"temperature":{:.1},"humidity":41.5,"battery":3.9}}"#,
                26.0 + (device % 80) as f64 / 10.0
            );
            let message = RawMessage {
                lsn: 0,
                input: 0,
                topic: format!("sensors/plant-1/dev-{device:06}/telemetry"),
                payload: payload.into_bytes().into(),
                arrival,
                arrival_ms: ts0 + 3_600_000,
                trace: None,
            };
            worker.process(&message, &mut out);
            out.clear();
        }
    }
    assert_eq!(worker.device_count(), devices, "every device was taken");
    let per = |now: usize, then: usize| now.saturating_sub(then) as f64 / devices as f64;
    println!(
        "| {name:<52} | {:>9.0} | {:>9.0} | {:>9.0} |",
        per(REQUESTED.load(Relaxed), requested),
        per(CHUNKS.load(Relaxed), chunks),
        per(rss_bytes(), rss),
    );
    drop(worker);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse::<usize>().ok())
    };
    let devices = value("--devices").unwrap_or(100_000);
    if let Some(case) = value("--case") {
        return measure(case, devices);
    }
    println!("{devices} devices, two readings each; bytes per device");
    println!();
    println!(
        "| {:<52} | {:>9} | {:>9} | {:>9} |",
        "case", "requested", "malloc", "RSS"
    );
    println!("|---|---|---|---|");
    let exe = std::env::current_exe().expect("the bench knows its path");
    for case in 0..CASES.len() {
        let status = Command::new(&exe)
            .args([
                "--case",
                &case.to_string(),
                "--devices",
                &devices.to_string(),
            ])
            .status()
            .expect("the bench runs itself");
        assert!(status.success(), "case {case} failed");
    }
}
