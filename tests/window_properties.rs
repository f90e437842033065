//! Property test: tumbling windows as weir computes them (per-device watermarks, allowed
//! lateness with updates, flush at close) equal a naive reference that decides lateness from each
//! device's arrival order and recomputes every window from the full input sorted by event time.
//! Streams have several devices, disorder within and beyond the bound, duplicate timestamps and
//! gaps.

use proptest::prelude::*;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use weir::config::{Aggregate, OnShutdown, WindowConfig};
use weir::decode::{Origin, Reading};
use weir::model::event::EventBody;
use weir::operators::window::{TimeWindowsState, WindowSpec};
use weir::operators::{Operator, Output, RuleMeta, Tumbling};

const SIZE: i64 = 5_000;
const DEVICES: usize = 3;

/// (count, sum, min, max) of one window.
type Rollup = (u64, f64, f64, f64);

fn origin(device: usize) -> Origin {
    let name = format!("d{device}");
    Origin::new(
        vec!["site".to_owned(), "device".to_owned()].into(),
        1,
        &format!("sensors/s1/{name}/telemetry"),
        &["s1", &name],
    )
}

fn operator(out_of_orderness: i64, lateness: i64) -> Tumbling {
    let config = WindowConfig {
        size: Some(Duration::from_millis(SIZE as u64)),
        slide: None,
        gap: None,
        max_length: None,
        length: None,
        every: None,
        metrics: vec!["v".into()],
        aggregates: vec![
            Aggregate::Count,
            Aggregate::Sum,
            Aggregate::Min,
            Aggregate::Max,
        ],
        max_out_of_orderness: Duration::from_millis(out_of_orderness as u64),
        allowed_lateness: Duration::from_millis(lateness as u64),
        max_future_skew: Duration::from_secs(3600),
        idle_timeout: None,
        late_topic: None,
        when: None,
        max_open_windows: 1_000_000,
        on_shutdown: OnShutdown::Flush,
    };
    let rule = RuleMeta {
        index: 0,
        name: "p".into(),
    };
    Tumbling::new(WindowSpec::new(rule, &config, vec![0]).unwrap(), SIZE)
}

/// weir's final rollup per (device, window start) (the last emission wins: updates replace),
/// and its late count.
fn engine(
    stream: &[(usize, i64, f64)],
    ooo: i64,
    lateness: i64,
) -> (BTreeMap<(usize, i64), Rollup>, u64) {
    let op = operator(ooo, lateness);
    let origins: Vec<_> = (0..DEVICES).map(origin).collect();
    let mut states: Vec<TimeWindowsState> = (0..DEVICES).map(|_| Default::default()).collect();
    let mut out = Output::default();
    let arrival = Instant::now();
    for &(device, ts, value) in stream {
        let values = [Some(value)];
        let reading = Reading {
            origin: &origins[device],
            discrete: &[],
            ts,
            seq: None,
            values: &values,
            arrival,
            arrival_ms: ts,
            trace: None,
        };
        op.on_reading(&mut states[device], &reading, &mut out);
    }
    for (device, state) in states.iter_mut().enumerate() {
        op.on_close(state, &origins[device], &mut out);
    }
    let mut rollups = BTreeMap::new();
    for event in &out.events {
        if let EventBody::Window { start, metrics, .. } = &event.body {
            let device: usize = event.origin.device()[1..].parse().unwrap();
            let m = &metrics[0];
            rollups.insert((device, *start), (m.count, m.sum, m.min, m.max));
        }
    }
    (rollups, out.late)
}

/// The reference: a reading is late when its window's end plus lateness is at or below its
/// device's watermark (newest earlier event time minus the bound) on arrival; every other
/// reading lands in its window, recomputed from the readings sorted by event time.
fn reference(
    stream: &[(usize, i64, f64)],
    ooo: i64,
    lateness: i64,
) -> (BTreeMap<(usize, i64), Rollup>, u64) {
    let mut newest: Vec<Option<i64>> = vec![None; DEVICES];
    let mut kept = Vec::new();
    let mut late = 0;
    for &(device, ts, value) in stream {
        let start = ts.div_euclid(SIZE) * SIZE;
        let watermark = newest[device].map(|n| n - ooo);
        if watermark.is_some_and(|wm| start + SIZE + lateness <= wm) {
            late += 1;
        } else {
            kept.push((device, ts, value));
        }
        newest[device] = Some(newest[device].map_or(ts, |n| n.max(ts)));
    }
    kept.sort_by_key(|&(device, ts, _)| (device, ts));
    let mut rollups: BTreeMap<(usize, i64), Vec<f64>> = BTreeMap::new();
    for (device, ts, value) in kept {
        rollups
            .entry((device, ts.div_euclid(SIZE) * SIZE))
            .or_default()
            .push(value);
    }
    let rollups = rollups
        .into_iter()
        .map(|(key, values)| {
            let min = values.iter().copied().fold(f64::INFINITY, f64::min);
            let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            (key, (values.len() as u64, values.iter().sum(), min, max))
        })
        .collect();
    (rollups, late)
}

fn stream() -> impl Strategy<Value = Vec<(usize, i64, f64)>> {
    // A rising clock (300 ms a step) with offsets from 8 s behind to 1 s ahead: disorder within
    // and beyond the bound, duplicates (offsets collide) and gaps (runs of skipped devices).
    prop::collection::vec((0..DEVICES, -8_000i64..1_000, 0u8..50), 0..250).prop_map(|raw| {
        raw.into_iter()
            .enumerate()
            .map(|(i, (device, offset, value))| {
                let ts = 1_732_600_000_000 + i as i64 * 300 + offset / 500 * 500;
                (device, ts, f64::from(value))
            })
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn tumbling_windows_equal_the_naive_reference(
        stream in stream(),
        ooo in prop::sample::select(vec![0i64, 1_000, 3_000]),
        lateness in prop::sample::select(vec![0i64, 2_000, 6_000]),
    ) {
        let (got, got_late) = engine(&stream, ooo, lateness);
        let (want, want_late) = reference(&stream, ooo, lateness);
        prop_assert_eq!(got_late, want_late);
        prop_assert_eq!(got.len(), want.len());
        for ((key, g), (want_key, w)) in got.iter().zip(&want) {
            prop_assert_eq!(key, want_key);
            prop_assert_eq!((g.0, g.2, g.3), (w.0, w.2, w.3));
            // Sums of small integers are exact in any order.
            prop_assert_eq!(g.1, w.1);
        }
    }
}
