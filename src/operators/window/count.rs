//! Count windows: the last `length` readings of a device, emitted every `every` readings (a
//! tumbling count window when `every == length`). Counted in arrival order, not event time:
//! there is no watermark and nothing is late; `start` and `end` are the oldest and newest
//! event times among the window's readings. `idle_timeout` emits what arrived since the last
//! emission as a partial window.

use super::{aggregates::Accumulators, Pane, WindowSpec};
use crate::decode::{Origin, Reading};
use crate::model::event::WindowClose;
use crate::operators::{Operator, Output};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// A built count-window rule.
#[derive(Debug, Clone)]
pub struct CountWindows {
    spec: WindowSpec,
    length: usize,
    every: u64,
}

/// Per-device state: the last `length` readings' times and values.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CountState {
    times: VecDeque<i64>,
    /// `metrics.len()` values per reading, oldest first.
    values: VecDeque<Option<f64>>,
    since_emit: u64,
    /// Readings seen: identifies each emission (the event id derives from it).
    seen: u64,
    last_arrival_ms: i64,
}

impl CountWindows {
    pub fn new(spec: WindowSpec, length: usize, every: usize) -> Self {
        Self {
            spec,
            length: length.max(1),
            every: every.max(1) as u64,
        }
    }

    fn emit(
        &self,
        state: &mut CountState,
        origin: &Origin,
        cause: Option<&Reading<'_>>,
        closed_by: WindowClose,
        out: &mut Output,
    ) {
        state.since_emit = 0;
        let (Some(&start), Some(&end)) = (state.times.iter().min(), state.times.iter().max())
        else {
            return;
        };
        let width = self.spec.metrics.len();
        let mut pane = Pane {
            start,
            end,
            readings: state.times.len() as u64,
            accumulators: Accumulators::new(self.spec.basic, self.spec.percentiles, width),
            fired: true,
            updates: 0,
        };
        for (i, &ts) in state.times.iter().enumerate() {
            for m in 0..width {
                if let Some(value) = state.values[i * width + m] {
                    pane.accumulators.add(m, ts, value);
                }
            }
        }
        self.spec
            .emit(state.seen as i64, &pane, origin, cause, closed_by, out);
    }
}

impl Operator for CountWindows {
    type State = CountState;

    fn on_reading(&self, state: &mut CountState, reading: &Reading<'_>, out: &mut Output) {
        if !self.spec.has_metric(reading) {
            return;
        }
        state.last_arrival_ms = state.last_arrival_ms.max(reading.arrival_ms);
        if state.times.len() == self.length {
            state.times.pop_front();
            state.values.drain(..self.spec.metrics.len());
        }
        state.times.push_back(reading.ts);
        state.values.extend(
            self.spec
                .metrics
                .iter()
                .map(|(_, slot)| reading.values[*slot]),
        );
        state.seen += 1;
        state.since_emit += 1;
        if state.since_emit >= self.every {
            self.emit(
                state,
                reading.origin,
                Some(reading),
                WindowClose::Watermark,
                out,
            );
        }
    }

    fn wants_ticks(&self) -> bool {
        self.spec.idle_timeout_ms.is_some()
    }

    fn on_tick(&self, state: &mut CountState, origin: &Origin, now_ms: i64, out: &mut Output) {
        if state.since_emit > 0 && self.spec.is_idle(state.last_arrival_ms, now_ms) {
            self.emit(state, origin, None, WindowClose::IdleTimeout, out);
        }
    }

    fn on_close(&self, state: &mut CountState, origin: &Origin, out: &mut Output) {
        if self.spec.flush_on_shutdown && state.since_emit > 0 {
            self.emit(state, origin, None, WindowClose::Shutdown, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{bounds, config, fired, spec};
    use super::*;
    use crate::operators::test_support::{origin, reading};
    use std::time::Duration;

    fn count(length: usize, every: usize) -> CountWindows {
        let config = config(|c| {
            c.length = Some(length);
            c.every = Some(every);
            c.idle_timeout = Some(Duration::from_secs(10));
        });
        CountWindows::new(spec(&config), length, every)
    }

    fn feed(op: &CountWindows, state: &mut CountState, n: i64) -> Output {
        let origin = origin("d1");
        let mut out = Output::default();
        for i in 1..=n {
            op.on_reading(
                state,
                &reading(&origin, i * 1000, &[Some(i as f64)]),
                &mut out,
            );
        }
        out
    }

    #[test]
    fn a_tumbling_count_window_emits_every_length_readings() {
        let op = count(3, 3);
        let mut state = CountState::default();
        let out = feed(&op, &mut state, 7);
        assert_eq!(bounds(&out), vec![(1_000, 3_000, 3), (4_000, 6_000, 3)]);
        let avgs: Vec<f64> = fired(&out)
            .iter()
            .map(|f| f.metric.as_ref().unwrap().avg)
            .collect();
        assert_eq!(avgs, vec![2.0, 5.0]);
    }

    #[test]
    fn a_sliding_count_window_emits_the_last_length_readings_every_m() {
        let op = count(4, 2);
        let mut state = CountState::default();
        let out = feed(&op, &mut state, 6);
        assert_eq!(
            bounds(&out),
            vec![(1_000, 2_000, 2), (1_000, 4_000, 4), (3_000, 6_000, 4)]
        );
        let ids: Vec<_> = out.events.iter().map(|e| e.id).collect();
        assert!(ids[0] != ids[1] && ids[1] != ids[2]);
    }

    #[test]
    fn idle_timeout_emits_what_arrived_since_the_last_emission() {
        let op = count(3, 3);
        let origin = origin("d1");
        let mut state = CountState::default();
        let mut out = feed(&op, &mut state, 4);
        assert_eq!(out.events.len(), 1);
        op.on_tick(&mut state, &origin, 4_000 + 9_999, &mut out);
        assert_eq!(out.events.len(), 1);
        op.on_tick(&mut state, &origin, 4_000 + 10_000, &mut out);
        let f = fired(&out);
        assert_eq!(
            (f[1].start, f[1].end, f[1].closed_by),
            (2_000, 4_000, WindowClose::IdleTimeout)
        );
        op.on_tick(&mut state, &origin, 100_000, &mut out);
        assert_eq!(out.events.len(), 2, "nothing new since: nothing to emit");
    }
}
