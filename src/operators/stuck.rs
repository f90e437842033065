//! Stuck value: a metric that has not moved by more than `tolerance` for `for` (event time),
//! the signature of a frozen sensor that keeps publishing its last value. Edge-triggered:
//! `moving` -> `stuck` once, `stuck` -> `moving` when the value moves again. A sensor that stops
//! publishing altogether is liveness's job, not this one's.

use super::{admit, millis, Operator, Output, RuleMeta};
use crate::config::StuckConfig;
use crate::decode::Reading;
use crate::model::event::EventBody;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// A built stuck-value rule.
#[derive(Debug, Clone)]
pub struct Stuck {
    rule: RuleMeta,
    metrics: Vec<(Arc<str>, usize)>,
    hold_ms: i64,
    tolerance: f64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
struct MetricState {
    /// The value the metric has stayed at, and since when.
    reference: Option<(f64, i64)>,
    stuck: bool,
}

/// Per-device state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StuckState {
    last_ts: Option<i64>,
    metrics: Vec<MetricState>,
}

impl Stuck {
    pub fn new(rule: RuleMeta, config: &StuckConfig, slots: Vec<usize>) -> Self {
        Self {
            rule,
            metrics: config
                .metrics
                .iter()
                .map(|m| Arc::from(m.as_str()))
                .zip(slots)
                .collect(),
            hold_ms: millis(config.hold),
            tolerance: config.tolerance,
        }
    }
}

impl Operator for Stuck {
    type State = StuckState;

    fn on_reading(&self, state: &mut StuckState, reading: &Reading<'_>, out: &mut Output) {
        // "Unchanged for T" is measured in event time; an older reading is ignored and counted.
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
            let (transition, since) = match ms.reference {
                Some((reference, since)) if (value - reference).abs() <= self.tolerance => {
                    if ms.stuck || reading.ts.saturating_sub(since) < self.hold_ms {
                        continue;
                    }
                    ms.stuck = true;
                    (("moving", "stuck"), since)
                }
                Some((_, since)) => {
                    ms.reference = Some((value, reading.ts));
                    if !std::mem::take(&mut ms.stuck) {
                        continue;
                    }
                    (("stuck", "moving"), since)
                }
                None => {
                    ms.reference = Some((value, reading.ts));
                    continue;
                }
            };
            let (from, to) = transition;
            out.events.push(self.rule.event(
                reading.origin,
                reading.ts,
                &[metric.as_bytes(), to.as_bytes()],
                EventBody::Stuck {
                    metric: metric.clone(),
                    from,
                    to,
                    value,
                    since,
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

    fn run(tolerance: f64, readings: &[(i64, f64)]) -> (Vec<String>, Output) {
        let config = StuckConfig {
            metrics: vec!["temperature".into()],
            hold: Duration::from_secs(60),
            tolerance,
        };
        let rule = RuleMeta {
            index: 0,
            name: "frozen".into(),
        };
        let op = Stuck::new(rule, &config, vec![0]);
        let readings: Vec<_> = readings.iter().map(|(ts, v)| (*ts, [Some(*v)])).collect();
        feed(&op, &readings, |e| match &e.body {
            EventBody::Stuck {
                from, to, since, ..
            } => format!("{from}->{to}@{} since={since}", e.ts),
            other => panic!("unexpected {other:?}"),
        })
    }

    #[test]
    fn a_value_unchanged_for_the_hold_time_is_stuck_until_it_moves() {
        let (events, _) = run(
            0.0,
            &[
                (0, 20.0),
                (30_000, 21.0), // moved: reference is now 21 since 30 s
                (60_000, 21.0),
                (89_999, 21.0),
                (90_000, 21.0), // 60 s unchanged
                (120_000, 21.0),
                (130_000, 21.5),
            ],
        );
        assert_eq!(
            events,
            [
                "moving->stuck@90000 since=30000",
                "stuck->moving@130000 since=30000",
            ]
        );
    }

    #[test]
    fn changes_within_the_tolerance_do_not_count_as_moving() {
        let (events, _) = run(0.1, &[(0, 20.0), (30_000, 20.05), (60_000, 19.95)]);
        assert_eq!(events, ["moving->stuck@60000 since=0"]);
    }

    #[test]
    fn older_readings_are_ignored_and_counted() {
        let (events, out) = run(
            0.0,
            &[(0, 20.0), (70_000, 20.0), (10_000, 5.0), (80_000, 20.0)],
        );
        assert_eq!(events, ["moving->stuck@70000 since=0"]);
        assert_eq!(out.out_of_order, 1);
    }
}
