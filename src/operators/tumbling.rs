//! Tumbling windows: fixed, non-overlapping event-time windows per device, aligned to the epoch.
//! A window `[start, end)` fires when its device's watermark (newest event time seen for that
//! device minus `max_out_of_orderness`) reaches `end`; one device's clock never holds back another's.

use super::{Operator, Output, RuleMeta};
use crate::config::{Aggregate, TumblingConfig};
use crate::decode::{Origin, Reading};
use crate::event::{Cause, DerivedEvent, EventBody, EventId, WindowMetric};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// A built tumbling-window rule.
#[derive(Debug, Clone)]
pub struct Tumbling {
    rule: RuleMeta,
    size_ms: i64,
    out_of_orderness_ms: i64,
    /// Metric names and their slots in the input's field plan.
    metrics: Vec<(Arc<str>, usize)>,
    aggregates: Arc<[Aggregate]>,
}

/// Running aggregates of one metric.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
struct Accumulator {
    count: u64,
    sum: f64,
    min: f64,
    max: f64,
}

impl Default for Accumulator {
    fn default() -> Self {
        Self {
            count: 0,
            sum: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
        }
    }
}

impl Accumulator {
    fn add(&mut self, value: f64) {
        self.count += 1;
        self.sum += value;
        self.min = self.min.min(value);
        self.max = self.max.max(value);
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct OpenWindow {
    start: i64,
    /// One per rule metric, in the rule's order.
    accumulators: Vec<Accumulator>,
}

/// Per-device state: the open windows (ordered by start) and the watermark.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TumblingState {
    windows: Vec<OpenWindow>,
    /// Newest event time seen minus the allowed out-of-orderness; `None` before any reading.
    watermark: Option<i64>,
}

impl Tumbling {
    /// Builds from validated config; `slots` are the metrics' slots in the input's field plan.
    pub fn new(rule: RuleMeta, config: &TumblingConfig, slots: Vec<usize>) -> Self {
        Self {
            rule,
            size_ms: i64::try_from(config.size.as_millis())
                .unwrap_or(i64::MAX)
                .max(1),
            out_of_orderness_ms: i64::try_from(config.max_out_of_orderness.as_millis())
                .unwrap_or(i64::MAX),
            metrics: config
                .metrics
                .iter()
                .map(|m| Arc::from(m.as_str()))
                .zip(slots)
                .collect(),
            aggregates: config.aggregates.clone().into(),
        }
    }

    fn window_start(&self, ts: i64) -> i64 {
        ts - ts.rem_euclid(self.size_ms)
    }

    fn event(
        &self,
        window: OpenWindow,
        origin: &Arc<Origin>,
        cause: Option<(&Reading<'_>, Cause)>,
        partial: bool,
    ) -> DerivedEvent {
        let end = window.start.saturating_add(self.size_ms);
        let metrics = self
            .metrics
            .iter()
            .zip(&window.accumulators)
            .filter(|(_, acc)| acc.count > 0)
            .map(|((name, _), acc)| WindowMetric {
                name: name.clone(),
                count: acc.count,
                sum: acc.sum,
                min: acc.min,
                max: acc.max,
            })
            .collect();
        let (arrival, cause) = match cause {
            Some((reading, cause)) => (Some(reading.arrival), Some(cause)),
            None => (None, None),
        };
        DerivedEvent {
            id: EventId::derive(&[
                self.rule.name.as_bytes(),
                origin.device.as_bytes(),
                b"window",
                &window.start.to_be_bytes(),
            ]),
            rule_index: self.rule.index,
            rule: self.rule.name.clone(),
            origin: origin.clone(),
            ts: end,
            body: EventBody::Window {
                start: window.start,
                end,
                metrics,
                aggregates: self.aggregates.clone(),
                partial,
            },
            cause,
            arrival,
        }
    }
}

impl Operator for Tumbling {
    type State = TumblingState;

    fn on_reading(&self, state: &mut TumblingState, reading: &Reading<'_>, out: &mut Output) {
        let start = self.window_start(reading.ts);
        let end = start.saturating_add(self.size_ms);
        if state.watermark.is_some_and(|wm| end <= wm) {
            // Its window already fired; allowed lateness comes with the event-time windows work.
            out.late += 1;
            return;
        }
        let has_metric = self
            .metrics
            .iter()
            .any(|(_, slot)| reading.values[*slot].is_some());
        if has_metric {
            let index = match state.windows.binary_search_by_key(&start, |w| w.start) {
                Ok(index) => index,
                Err(index) => {
                    let window = OpenWindow {
                        start,
                        accumulators: vec![Accumulator::default(); self.metrics.len()],
                    };
                    state.windows.insert(index, window);
                    index
                }
            };
            let window = &mut state.windows[index];
            for ((_, slot), acc) in self.metrics.iter().zip(&mut window.accumulators) {
                if let Some(value) = reading.values[*slot] {
                    acc.add(value);
                }
            }
        }
        let candidate = reading.ts.saturating_sub(self.out_of_orderness_ms);
        if state.watermark.is_some_and(|wm| wm >= candidate) {
            return;
        }
        state.watermark = Some(candidate);
        let ready = state
            .windows
            .iter()
            .take_while(|w| w.start.saturating_add(self.size_ms) <= candidate)
            .count();
        for window in state.windows.drain(..ready) {
            let cause = Cause {
                topic: reading.origin.topic.clone(),
                ts: reading.ts,
                seq: reading.seq,
            };
            let event = self.event(window, reading.origin, Some((reading, cause)), false);
            out.events.push(event);
        }
    }

    fn open_windows(&self, state: &TumblingState) -> usize {
        state.windows.len()
    }

    fn on_close(&self, state: &mut TumblingState, origin: &Arc<Origin>, out: &mut Output) {
        for window in state.windows.drain(..) {
            out.events.push(self.event(window, origin, None, true));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operators::test_support::{origin, reading};
    use std::time::Duration;

    fn climate(out_of_orderness: Duration) -> Tumbling {
        let config = TumblingConfig {
            size: Duration::from_secs(10),
            metrics: vec!["temperature".into(), "humidity".into()],
            aggregates: vec![
                Aggregate::Count,
                Aggregate::Min,
                Aggregate::Max,
                Aggregate::Avg,
            ],
            max_out_of_orderness: out_of_orderness,
        };
        let rule = RuleMeta {
            index: 1,
            name: "climate".into(),
        };
        Tumbling::new(rule, &config, vec![0, 1])
    }

    fn windows(out: &Output) -> Vec<(i64, i64, Vec<WindowMetric>, bool)> {
        out.events
            .iter()
            .map(|e| match &e.body {
                EventBody::Window {
                    start,
                    end,
                    metrics,
                    partial,
                    ..
                } => (*start, *end, metrics.clone(), *partial),
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    }

    #[test]
    fn fires_when_the_devices_watermark_passes_the_end() {
        let op = climate(Duration::ZERO);
        let origin = origin("d1");
        let mut state = TumblingState::default();
        let mut out = Output::default();
        for (ts, t, h) in [(0, 20.0, 40.0), (4_000, 22.0, 42.0), (9_999, 24.0, 44.0)] {
            op.on_reading(
                &mut state,
                &reading(&origin, ts, &[Some(t), Some(h)]),
                &mut out,
            );
        }
        assert!(out.events.is_empty());
        op.on_reading(
            &mut state,
            &reading(&origin, 10_000, &[Some(30.0), None]),
            &mut out,
        );
        let fired = windows(&out);
        assert_eq!(fired.len(), 1);
        let (start, end, metrics, partial) = &fired[0];
        assert_eq!((*start, *end, *partial), (0, 10_000, false));
        assert_eq!(metrics[0].name.as_ref(), "temperature");
        assert_eq!(
            (metrics[0].count, metrics[0].min, metrics[0].max),
            (3, 20.0, 24.0)
        );
        assert_eq!(metrics[0].avg(), 22.0);
        assert_eq!(metrics[1].avg(), 42.0);
        assert_eq!(out.events[0].cause.as_ref().map(|c| c.ts), Some(10_000));
    }

    #[test]
    fn readings_for_fired_windows_are_late() {
        let op = climate(Duration::ZERO);
        let origin = origin("d1");
        let mut state = TumblingState::default();
        let mut out = Output::default();
        op.on_reading(
            &mut state,
            &reading(&origin, 1_000, &[Some(1.0), None]),
            &mut out,
        );
        op.on_reading(
            &mut state,
            &reading(&origin, 12_000, &[Some(2.0), None]),
            &mut out,
        );
        op.on_reading(
            &mut state,
            &reading(&origin, 9_000, &[Some(3.0), None]),
            &mut out,
        );
        assert_eq!(out.late, 1);
        assert_eq!(windows(&out)[0].2[0].count, 1);
    }

    #[test]
    fn out_of_orderness_keeps_windows_open_longer() {
        let op = climate(Duration::from_secs(2));
        let origin = origin("d1");
        let mut state = TumblingState::default();
        let mut out = Output::default();
        op.on_reading(
            &mut state,
            &reading(&origin, 9_000, &[Some(1.0), None]),
            &mut out,
        );
        op.on_reading(
            &mut state,
            &reading(&origin, 11_000, &[Some(2.0), None]),
            &mut out,
        );
        op.on_reading(
            &mut state,
            &reading(&origin, 8_000, &[Some(3.0), None]),
            &mut out,
        );
        assert!(out.events.is_empty());
        op.on_reading(
            &mut state,
            &reading(&origin, 12_000, &[Some(4.0), None]),
            &mut out,
        );
        let fired = windows(&out);
        assert_eq!(fired[0].2[0].count, 2);
        assert_eq!(out.late, 0);
    }

    #[test]
    fn close_flushes_open_windows_as_partial() {
        let op = climate(Duration::ZERO);
        let origin = origin("d1");
        let mut state = TumblingState::default();
        let mut out = Output::default();
        op.on_reading(
            &mut state,
            &reading(&origin, 1_000, &[Some(1.0), None]),
            &mut out,
        );
        op.on_close(&mut state, &origin, &mut out);
        let fired = windows(&out);
        assert_eq!(fired.len(), 1);
        assert!(fired[0].3);
        assert!(out.events[0].cause.is_none());
    }
}
