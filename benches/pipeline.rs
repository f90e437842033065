//! Criterion benches of the in-process hot path: each decoder, and the whole engine (decode +
//! hysteresis + tumbling window + routing) over the reference scenario with 1,000 devices.
//!
//! Run: `cargo bench --bench pipeline`. Targets (issue 7): >= 3M readings/s per core through the
//! engine, CBOR decode faster than JSON.
//!
//! Instruction counts (stable where timings on a shared machine are not): `benches/callgrind.sh`
//! runs one pass of a case under callgrind, selected by `WEIR_BENCH_ONCE=<group/case>`.

use criterion::{criterion_group, BatchSize, Criterion, Throughput};
use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;
use weir::config::{self, Format, Overrides};
use weir::decode::{Decoded, FieldPlan};
use weir::engine::{Plan, RawMessage, Worker};
use weir::metrics::Metrics;

const DEVICES: usize = 1000;
const READINGS: usize = 10_000;

fn example_plan() -> Plan {
    let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/config/example.toml"));
    let config = config::load(path, &Overrides::default()).expect("example config is valid");
    Plan::build(&config).expect("example plan builds")
}

/// Reference payloads, 1 s apart per device: a pseudo-random temperature around the overheat
/// thresholds, which changes state on about a third of the readings (a stress case for routing).
fn payloads(format: Format) -> Vec<(String, Vec<u8>)> {
    payloads_with(format, READINGS, |i, _, _| {
        26.0 + ((i * 7919) % 60) as f64 / 10.0
    })
}

/// Payloads whose temperature follows a slow wave per device (period 60 readings, as in the e2e
/// bench): an alert on about 3 % of readings, a window closing on 10 %.
fn realistic_payloads() -> Vec<(String, Vec<u8>)> {
    payloads_with(Format::Json, 60 * DEVICES, |_, device, step| {
        let phase = (step as usize + device * 7) % 60;
        let x = phase as f64 / 60.0 * std::f64::consts::TAU;
        (290.0 + 30.0 * x.sin()).round() / 10.0
    })
}

fn payloads_with(
    format: Format,
    count: usize,
    temperature: impl Fn(usize, usize, i64) -> f64,
) -> Vec<(String, Vec<u8>)> {
    (0..count)
        .map(|i| {
            let device = i % DEVICES;
            let step = (i / DEVICES) as i64;
            let temperature = temperature(i, device, step);
            let value = serde_json::json!({
                "ts": 1_732_600_000_000_i64 + step * 1000,
                "seq": step,
                "temperature": temperature,
                "humidity": 40.0 + (i % 10) as f64,
                "battery": 3.9,
            });
            let payload = match format {
                Format::Json | Format::Text | Format::Senml | Format::SenmlCbor => {
                    serde_json::to_vec(&value).expect("json")
                }
                Format::Cbor => {
                    let mut out = Vec::new();
                    ciborium::into_writer(&value, &mut out).expect("cbor");
                    out
                }
            };
            (
                format!("sensors/plant-1/dev-{device:04}/telemetry"),
                payload,
            )
        })
        .collect()
}

fn decoders(c: &mut Criterion) {
    let plan = example_plan();
    let mut group = c.benchmark_group("decode");
    group.throughput(Throughput::Elements(READINGS as u64));
    for format in [Format::Json, Format::Cbor] {
        let mut fields: FieldPlan = plan.inputs[0].fields.clone();
        fields.format = format;
        let inputs = payloads(format);
        let mut decoded = Decoded::for_plan(&fields);
        group.bench_function(format!("{format:?}").to_lowercase(), |b| {
            b.iter(|| {
                for (_, payload) in &inputs {
                    let _ = black_box(fields.decode(payload, &mut decoded));
                }
            })
        });
    }
    group.finish();
}

fn raw_messages(payloads: Vec<(String, Vec<u8>)>) -> Vec<RawMessage> {
    payloads
        .into_iter()
        .enumerate()
        .map(|(lsn, (topic, payload))| RawMessage {
            lsn: lsn as u64,
            input: 0,
            topic,
            payload: payload.into(),
            arrival: Instant::now(),
            // Arrived an hour after the last reading's event time: none is refused as from the
            // future, none is late.
            arrival_ms: 1_732_600_000_000 + 3_600_000,
            trace: None,
        })
        .collect()
}

fn engine(c: &mut Criterion) {
    let plan = Arc::new(example_plan());
    let metrics = Arc::new(Metrics::new());
    let mut group = c.benchmark_group("engine");
    for (name, messages) in [
        (
            "json_hysteresis_tumbling",
            raw_messages(payloads(Format::Json)),
        ),
        (
            "json_realistic_alert_rate",
            raw_messages(realistic_payloads()),
        ),
    ] {
        // How many messages one pass publishes, so the figures can be compared.
        let mut worker = Worker::new(plan.clone(), metrics.clone());
        let mut out = Vec::new();
        let published: usize = messages
            .iter()
            .map(|message| {
                worker.process(message, &mut out);
                std::mem::take(&mut out).len()
            })
            .sum();
        eprintln!(
            "engine/{name}: {} readings, {:.3} published messages per reading",
            messages.len(),
            published as f64 / messages.len() as f64
        );
        group.throughput(Throughput::Elements(messages.len() as u64));
        group.bench_function(name, |b| {
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
    }
    group.finish();
}

/// One pass of one case, without criterion, for `valgrind --tool=callgrind --toggle-collect`:
/// the same payloads and the same fresh worker per pass as the criterion case.
fn once(case: &str) {
    let plan = Arc::new(example_plan());
    let metrics = Arc::new(Metrics::new());
    let (messages, readings) = match case {
        "decode/json" | "decode/cbor" => {
            let format = if case == "decode/json" {
                Format::Json
            } else {
                Format::Cbor
            };
            let mut fields: FieldPlan = plan.inputs[0].fields.clone();
            fields.format = format;
            let inputs = payloads(format);
            let mut decoded = Decoded::for_plan(&fields);
            for (_, payload) in &inputs {
                let _ = black_box(fields.decode(payload, &mut decoded));
            }
            println!("{case}: {} payloads", inputs.len());
            return;
        }
        "engine/json_hysteresis_tumbling" => {
            let messages = raw_messages(payloads(Format::Json));
            let len = messages.len();
            (messages, len)
        }
        "engine/json_realistic_alert_rate" => {
            let messages = raw_messages(realistic_payloads());
            let len = messages.len();
            (messages, len)
        }
        other => panic!("unknown case {other}"),
    };
    let mut worker = Worker::new(plan, metrics);
    let mut out = Vec::with_capacity(1024);
    for message in &messages {
        worker.process(message, &mut out);
        out.clear();
    }
    println!("{case}: {readings} readings");
}

criterion_group!(benches, decoders, engine);

fn main() {
    if let Ok(case) = std::env::var("WEIR_BENCH_ONCE") {
        return once(&case);
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
