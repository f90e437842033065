//! Criterion benches of each detector's hot path: `on_reading` over 10,000 readings of 1,000
//! devices (a wandering temperature, a door that sometimes changes), per-device state as the
//! engine keeps it; plus liveness's tick over 1,000 devices and the whole engine running every
//! rule of `config/detectors.toml`.
//!
//! Run: `cargo bench --bench detectors`.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use weir::config::{
    self, AnomalyConfig, ChangeConfig, DeadbandConfig, FlappingConfig, HysteresisConfig,
    LevelConfig, LivenessConfig, Overrides, RateOfChangeConfig, StuckConfig, ThresholdsConfig,
};
use weir::decode::{Discrete, DiscreteSlot, Origin, Reading};
use weir::engine::{Plan, RawMessage, Worker};
use weir::metrics::Metrics;
use weir::operators::{
    Anomaly, Change, Deadband, Hysteresis, Liveness, Operator, Output, RateOfChange, RuleMeta,
    Stuck,
};

#[path = "common/origins.rs"]
mod common_origins;

const DEVICES: usize = 1000;
const READINGS: usize = 10_000;
const T0: i64 = 1_732_600_000_000;

struct Input {
    device: usize,
    ts: i64,
    values: [Option<f64>; 1],
    discrete: [DiscreteSlot; 1],
}

fn origins() -> Vec<Origin> {
    common_origins::origins(DEVICES, 4)
}

/// Readings 1 s apart per device: temperature wandering 20..100, a door changing now and then.
fn inputs() -> Vec<Input> {
    (0..READINGS)
        .map(|i| {
            let step = (i / DEVICES) as i64;
            let temperature = 20.0 + ((i * 7919) % 800) as f64 / 10.0;
            let door = if (i * 31) % 7 == 0 { "open" } else { "closed" };
            Input {
                device: i % DEVICES,
                ts: T0 + step * 1000,
                values: [Some(temperature)],
                discrete: [DiscreteSlot::of(Discrete::Text(door))],
            }
        })
        .collect()
}

fn meta(name: &str) -> RuleMeta {
    RuleMeta {
        index: 0,
        name: name.into(),
    }
}

fn bench_operator<O: Operator>(c: &mut Criterion, name: &str, operator: O) {
    let origins = origins();
    let inputs = inputs();
    let arrival = Instant::now();
    let mut group = c.benchmark_group("detector");
    group.throughput(Throughput::Elements(READINGS as u64));
    group.bench_function(name, |b| {
        b.iter_batched_ref(
            || {
                let states: Vec<O::State> = (0..DEVICES).map(|_| O::State::default()).collect();
                (states, Output::default())
            },
            |(states, out)| {
                for input in &inputs {
                    let reading = Reading {
                        origin: &origins[input.device],
                        ts: input.ts,
                        seq: None,
                        values: &input.values,
                        discrete: &input.discrete,
                        arrival,
                        arrival_ms: input.ts,
                        trace: None,
                    };
                    operator.on_reading(&mut states[input.device], &reading, out);
                    black_box(out.events.len());
                    out.events.clear();
                }
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

fn flapping() -> Option<FlappingConfig> {
    Some(FlappingConfig {
        max_changes: 5,
        within: Duration::from_secs(60),
    })
}

fn detectors(c: &mut Criterion) {
    let metrics = vec!["temperature".to_owned()];
    bench_operator(
        c,
        "hysteresis_hold",
        Hysteresis::new(
            meta("overheat"),
            &HysteresisConfig {
                metric: "temperature".into(),
                enter_above: 60.0,
                exit_below: 55.0,
                active: "hot".into(),
                inactive: "normal".into(),
                initial: None,
                hold: Duration::from_secs(2),
                flapping: None,
            },
            0,
        ),
    );
    bench_operator(
        c,
        "thresholds_flapping",
        Hysteresis::thresholds(
            meta("levels"),
            &ThresholdsConfig {
                metric: "temperature".into(),
                normal: "normal".into(),
                levels: vec![
                    LevelConfig {
                        name: "warning".into(),
                        set_above: 70.0,
                        reset_below: 65.0,
                    },
                    LevelConfig {
                        name: "critical".into(),
                        set_above: 90.0,
                        reset_below: 85.0,
                    },
                ],
                hold: Duration::ZERO,
                flapping: flapping(),
            },
            0,
        ),
    );
    bench_operator(
        c,
        "deadband",
        Deadband::new(
            meta("report"),
            &DeadbandConfig {
                metrics: metrics.clone(),
                absolute: Some(5.0),
                percent: None,
                max_silence: Some(Duration::from_secs(60)),
            },
            vec![0],
        ),
    );
    bench_operator(
        c,
        "change",
        Change::new(
            meta("door"),
            &ChangeConfig {
                fields: vec!["door".into()],
                emit_initial: false,
                flapping: flapping(),
            },
            vec![0],
        ),
    );
    let liveness = Liveness::new(
        meta("alive"),
        &LivenessConfig {
            timeout: Some(Duration::from_secs(30)),
            expected: Vec::new(),
            status: None,
        },
        None,
    );
    bench_operator(c, "liveness", liveness.clone());
    bench_operator(
        c,
        "rate_of_change",
        RateOfChange::new(
            meta("surge"),
            &RateOfChangeConfig {
                metrics: metrics.clone(),
                window: Duration::from_secs(5),
                max_per_second: 20.0,
            },
            vec![0],
        ),
    );
    bench_operator(
        c,
        "stuck",
        Stuck::new(
            meta("frozen"),
            &StuckConfig {
                metrics: metrics.clone(),
                hold: Duration::from_secs(5),
                tolerance: 0.0,
            },
            vec![0],
        ),
    );
    bench_operator(
        c,
        "anomaly",
        Anomaly::new(
            meta("odd"),
            &AnomalyConfig {
                metrics,
                readings: 8,
                z_threshold: 3.0,
                min_readings: None,
                cooldown: Duration::ZERO,
            },
            vec![0],
        ),
    );

    // The processing-time timer: one tick over every device, all of them online.
    let origins = origins();
    let mut group = c.benchmark_group("detector");
    group.throughput(Throughput::Elements(DEVICES as u64));
    group.bench_function("liveness_tick", |b| {
        let mut states = vec![Default::default(); DEVICES];
        let mut out = Output::default();
        let values = [Some(1.0)];
        for (device, state) in states.iter_mut().enumerate() {
            let reading = Reading {
                origin: &origins[device],
                ts: T0,
                seq: None,
                values: &values,
                discrete: &[],
                arrival: Instant::now(),
                arrival_ms: T0,
                trace: None,
            };
            liveness.on_reading(state, &reading, &mut out);
        }
        let mut now = T0;
        b.iter(|| {
            now += 250;
            for (device, state) in states.iter_mut().enumerate() {
                // Keep every device online: a reading every tick.
                liveness.on_tick(state, &origins[device], now, &mut out);
            }
            black_box(out.events.len());
            out.events.clear();
        })
    });
    group.finish();
}

/// Decode + all nine rules of config/detectors.toml + routing, in one worker.
fn engine(c: &mut Criterion) {
    let path = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/detectors.toml"
    ));
    let config = config::load(path, &Overrides::default()).expect("detectors config is valid");
    let plan = Arc::new(Plan::build(&config).expect("detectors plan builds"));
    let metrics = Arc::new(Metrics::new());
    let messages: Vec<RawMessage> = inputs()
        .iter()
        .enumerate()
        .map(|(i, input)| {
            let payload = serde_json::json!({
                "ts": input.ts,
                "seq": i,
                "temperature": input.values[0],
                "pressure": 1.0 + (i % 10) as f64 / 100.0,
                "door": if (i * 31) % 7 == 0 { "open" } else { "closed" },
                "mode": "auto",
            });
            RawMessage {
                input: 0,
                topic: format!("sensors/plant-1/dev-{:04}/telemetry", input.device),
                payload: serde_json::to_vec(&payload).expect("json").into(),
                arrival: Instant::now(),
                // Arrived when stamped: no reading is refused as from the future.
                arrival_ms: input.ts,
                lsn: i as u64,
                trace: None,
            }
        })
        .collect();
    let mut group = c.benchmark_group("engine");
    group.throughput(Throughput::Elements(READINGS as u64));
    group.bench_function("json_all_detectors", |b| {
        b.iter_batched_ref(
            || {
                (
                    Worker::new(plan.clone(), metrics.clone()),
                    Vec::with_capacity(1024),
                )
            },
            |(worker, out)| {
                for message in &messages {
                    worker.process(message, out);
                    out.clear();
                }
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

criterion_group!(benches, detectors, engine);
criterion_main!(benches);
