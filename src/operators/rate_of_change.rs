//! Rate of change: |dvalue/dt| between the current reading and the oldest one within `window`
//! (event time) above `max_per_second`. Edge-triggered: one event when a metric's rate goes
//! `normal` -> `exceeded`, one when it comes back.

use super::{admit, millis, Operator, Output, RuleMeta};
use crate::config::RateOfChangeConfig;
use crate::decode::Reading;
use crate::model::event::EventBody;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::sync::Arc;

/// Readings kept per device and metric; past it, the oldest go first (the window shrinks for
/// devices that publish faster than `MAX_SAMPLES` per window).
const MAX_SAMPLES: usize = 1024;

/// A built rate-of-change rule.
#[derive(Debug, Clone)]
pub struct RateOfChange {
    rule: RuleMeta,
    metrics: Vec<(Arc<str>, usize)>,
    window_ms: i64,
    max_per_second: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct MetricState {
    /// (ts, value) within the window, oldest first.
    samples: VecDeque<(i64, f64)>,
    exceeded: bool,
}

/// Per-device state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RateOfChangeState {
    last_ts: Option<i64>,
    metrics: Vec<MetricState>,
}

impl RateOfChange {
    pub fn new(rule: RuleMeta, config: &RateOfChangeConfig, slots: Vec<usize>) -> Self {
        Self {
            rule,
            metrics: config
                .metrics
                .iter()
                .map(|m| Arc::from(m.as_str()))
                .zip(slots)
                .collect(),
            window_ms: millis(config.window).max(1),
            max_per_second: config.max_per_second,
        }
    }
}

impl Operator for RateOfChange {
    type State = RateOfChangeState;

    fn on_reading(&self, state: &mut RateOfChangeState, reading: &Reading<'_>, out: &mut Output) {
        // A rate needs ordered samples; an older reading is ignored and counted.
        if !admit(
            &self.metrics,
            &mut state.last_ts,
            &mut state.metrics,
            reading,
            out,
        ) {
            return;
        }
        for ((metric, slot), ms) in self.metrics.iter().zip(&mut state.metrics) {
            let Some(value) = reading.values[*slot] else {
                continue;
            };
            let ts = reading.ts;
            ms.samples.push_back((ts, value));
            let horizon = ts.saturating_sub(self.window_ms);
            while ms.samples.front().is_some_and(|(t, _)| *t < horizon)
                || ms.samples.len() > MAX_SAMPLES
            {
                ms.samples.pop_front();
            }
            let Some(&(first_ts, first_value)) = ms.samples.front() else {
                continue;
            };
            if first_ts >= ts {
                continue;
            }
            let over_ms = ts - first_ts;
            let rate_per_s = (value - first_value) / (over_ms as f64 / 1000.0);
            let exceeded = rate_per_s.abs() > self.max_per_second;
            if exceeded == ms.exceeded {
                continue;
            }
            ms.exceeded = exceeded;
            let (from, to) = if exceeded {
                ("normal", "exceeded")
            } else {
                ("exceeded", "normal")
            };
            out.events.push(self.rule.event(
                reading.origin,
                ts,
                &[metric.as_bytes(), to.as_bytes()],
                EventBody::RateOfChange {
                    metric: metric.clone(),
                    from,
                    to,
                    value,
                    rate_per_s,
                    over_ms,
                },
                Some(reading),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operators::test_support::feed;
    use std::time::Duration;

    fn rate() -> RateOfChange {
        let config = RateOfChangeConfig {
            metrics: vec!["pressure".into()],
            window: Duration::from_secs(10),
            max_per_second: 1.0,
        };
        let rule = RuleMeta {
            index: 0,
            name: "surge".into(),
        };
        RateOfChange::new(rule, &config, vec![0])
    }

    fn run(readings: &[(i64, f64)]) -> (Vec<String>, Output) {
        let readings: Vec<_> = readings.iter().map(|(ts, v)| (*ts, [Some(*v)])).collect();
        feed(&rate(), &readings, |e| match &e.body {
            EventBody::RateOfChange {
                from,
                to,
                rate_per_s,
                over_ms,
                ..
            } => format!("{from}->{to}@{} rate={rate_per_s} over={over_ms}", e.ts),
            other => panic!("unexpected {other:?}"),
        })
    }

    #[test]
    fn emits_when_the_rate_over_the_window_crosses_the_bound_and_when_it_returns() {
        let (events, _) = run(&[
            (0, 100.0),
            (5_000, 104.0),  // 0.8/s over 5 s
            (10_000, 112.0), // 1.2/s over 10 s
            (15_000, 114.0), // 1.0/s over 10 s (from 104 at 5 s): not above
            (16_000, 90.0),  // from 112 at 10 s, the oldest within 10 s: -22 over 6 s
        ]);
        assert_eq!(
            events,
            [
                "normal->exceeded@10000 rate=1.2 over=10000",
                "exceeded->normal@15000 rate=1 over=10000",
                "normal->exceeded@16000 rate=-3.6666666666666665 over=6000",
            ]
        );
    }

    #[test]
    fn older_readings_are_ignored_and_counted() {
        let (events, out) = run(&[(10_000, 1.0), (1_000, 100.0), (11_000, 1.5)]);
        assert!(events.is_empty());
        assert_eq!(out.out_of_order, 1);
    }
}
