//! Criterion benches of the window operators, one per kind, driven directly (no decode, no
//! routing) over 10,000 devices with one reading per device per second of event time:
//! tumbling avg, hopping (1 min every 10 s: six windows per reading), session (5 s gap, a pause
//! every 20 s), count (10 readings), and a tumbling window with p50/p90/p95/p99.
//!
//! Run: `cargo bench --bench windows`. Figures are in the README.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use std::hint::black_box;
use std::time::{Duration, Instant};
use weir::config::{Aggregate, OnShutdown, WindowConfig};
use weir::decode::{Origin, Reading};
use weir::operators::window::WindowSpec;
use weir::operators::{
    CountWindows, Hopping, Operator, Output, RuleMeta, SessionWindows, Tumbling,
};

#[path = "common/origins.rs"]
mod common_origins;

const DEVICES: usize = 10_000;
/// Seconds of event time per device per iteration.
const STEPS: usize = 30;
const T0: i64 = 1_732_600_000_000;

fn config(aggregates: Vec<Aggregate>) -> WindowConfig {
    WindowConfig {
        size: None,
        slide: None,
        gap: None,
        max_length: None,
        length: None,
        every: None,
        metrics: vec!["temperature".into()],
        aggregates,
        max_out_of_orderness: Duration::from_secs(1),
        allowed_lateness: Duration::ZERO,
        max_future_skew: Duration::from_secs(300),
        idle_timeout: None,
        late_topic: None,
        when: None,
        max_open_windows: 1024,
        on_shutdown: OnShutdown::Flush,
    }
}

fn spec(aggregates: Vec<Aggregate>) -> WindowSpec {
    let rule = RuleMeta {
        index: 0,
        name: "bench".into(),
    };
    WindowSpec::new(rule, &config(aggregates), vec![0]).expect("no condition")
}

fn basic() -> Vec<Aggregate> {
    vec![
        Aggregate::Count,
        Aggregate::Min,
        Aggregate::Max,
        Aggregate::Avg,
    ]
}

fn origins() -> Vec<Origin> {
    common_origins::origins(DEVICES, 5)
}

/// (device, ts, value) in arrival order: each second, every device sends one reading; with
/// `pauses`, every 20th second is skipped (so sessions close).
fn stream(pauses: bool) -> Vec<(usize, i64, [Option<f64>; 1])> {
    let mut readings = Vec::with_capacity(DEVICES * STEPS);
    for step in 0..STEPS {
        if pauses && step % 20 == 19 {
            continue;
        }
        for device in 0..DEVICES {
            let ts = T0 + step as i64 * 1000;
            let value = 20.0 + ((device * 7919 + step * 31) % 100) as f64 / 10.0;
            readings.push((device, ts, [Some(value)]));
        }
    }
    readings
}

fn bench_kind<O: Operator>(c: &mut Criterion, name: &str, op: O, pauses: bool) {
    let origins = origins();
    let readings = stream(pauses);
    let arrival = Instant::now();
    let mut group = c.benchmark_group("windows");
    group.throughput(Throughput::Elements(readings.len() as u64));
    group.bench_function(name, |b| {
        b.iter_batched_ref(
            || {
                let states: Vec<O::State> = (0..DEVICES).map(|_| O::State::default()).collect();
                (states, Output::default())
            },
            |(states, out)| {
                for (device, ts, values) in &readings {
                    let reading = Reading {
                        origin: &origins[*device],
                        discrete: &[],
                        ts: *ts,
                        seq: None,
                        values,
                        arrival,
                        arrival_ms: *ts,
                        trace: None,
                    };
                    op.on_reading(&mut states[*device], &reading, out);
                    black_box(out.events.len());
                    out.events.clear();
                }
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

fn windows(c: &mut Criterion) {
    bench_kind(
        c,
        "tumbling_avg_10s",
        Tumbling::new(spec(basic()), 10_000),
        false,
    );
    bench_kind(
        c,
        "hopping_1m_every_10s",
        Hopping::new(spec(basic()), 60_000, 10_000),
        false,
    );
    bench_kind(
        c,
        "session_gap_5s",
        SessionWindows::new(spec(basic()), 5_000, i64::MAX),
        true,
    );
    bench_kind(
        c,
        "count_10",
        CountWindows::new(spec(basic()), 10, 10),
        false,
    );
    let percentiles = vec![
        Aggregate::P50,
        Aggregate::P90,
        Aggregate::P95,
        Aggregate::P99,
    ];
    bench_kind(
        c,
        "tumbling_percentiles_10s",
        Tumbling::new(spec(percentiles), 10_000),
        false,
    );
}

criterion_group!(benches, windows);
criterion_main!(benches);
