//! Anomaly: rolling z-score. Each reading is scored against the mean and standard deviation of
//! the device's previous `readings` values of the metric; |z| above `z_threshold` is an
//! anomaly. After one, the metric stays quiet for `cooldown` (event time) so a long excursion
//! gives one alert rather than hundreds. Every reading joins the window after being scored, so a
//! lasting level shift becomes the new normal.

use super::{admit, millis, Operator, Output, RuleMeta};
use crate::config::AnomalyConfig;
use crate::decode::Reading;
use crate::model::event::EventBody;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::sync::Arc;

/// A built anomaly rule.
#[derive(Debug, Clone)]
pub struct Anomaly {
    rule: RuleMeta,
    metrics: Vec<(Arc<str>, usize)>,
    readings: usize,
    min_readings: usize,
    z_threshold: f64,
    cooldown_ms: i64,
}

/// The rolling window of one metric. Sums are of values minus `shift` (the first value seen),
/// which keeps the variance exact for large values with a small spread; they are recomputed
/// from the window every `readings` pushes so rounding cannot accumulate.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct MetricState {
    window: VecDeque<f64>,
    shift: f64,
    sum: f64,
    sum_sq: f64,
    pushes: usize,
    last_alert: Option<i64>,
}

impl MetricState {
    fn mean_stddev(&self) -> (f64, f64) {
        let n = self.window.len() as f64;
        let mean = self.sum / n;
        let variance = (self.sum_sq / n - mean * mean).max(0.0);
        (mean + self.shift, variance.sqrt())
    }

    fn push(&mut self, value: f64, capacity: usize) {
        if self.window.is_empty() && self.pushes == 0 {
            self.shift = value;
        }
        let x = value - self.shift;
        self.window.push_back(value);
        self.sum += x;
        self.sum_sq += x * x;
        if self.window.len() > capacity {
            if let Some(old) = self.window.pop_front() {
                let x = old - self.shift;
                self.sum -= x;
                self.sum_sq -= x * x;
            }
        }
        self.pushes += 1;
        if self.pushes.is_multiple_of(capacity) {
            let shift = self.shift;
            self.sum = self.window.iter().map(|v| v - shift).sum();
            self.sum_sq = self.window.iter().map(|v| (v - shift) * (v - shift)).sum();
        }
    }
}

/// Per-device state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AnomalyState {
    last_ts: Option<i64>,
    metrics: Vec<MetricState>,
}

impl Anomaly {
    pub fn new(rule: RuleMeta, config: &AnomalyConfig, slots: Vec<usize>) -> Self {
        Self {
            rule,
            metrics: config
                .metrics
                .iter()
                .map(|m| Arc::from(m.as_str()))
                .zip(slots)
                .collect(),
            readings: config.readings.max(2),
            min_readings: config.min_readings.unwrap_or(config.readings).max(2),
            z_threshold: config.z_threshold,
            cooldown_ms: millis(config.cooldown),
        }
    }
}

impl Operator for Anomaly {
    type State = AnomalyState;

    fn on_reading(&self, state: &mut AnomalyState, reading: &Reading<'_>, out: &mut Output) {
        // The window is "the previous N readings"; an older reading is ignored and counted.
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
            if ms.window.len() >= self.min_readings {
                let (mean, stddev) = ms.mean_stddev();
                let z = if stddev > 0.0 {
                    (value - mean) / stddev
                } else {
                    0.0
                };
                let cooled = ms
                    .last_alert
                    .is_none_or(|last| reading.ts.saturating_sub(last) >= self.cooldown_ms);
                if z.abs() > self.z_threshold && cooled {
                    ms.last_alert = Some(reading.ts);
                    out.events.push(self.rule.event(
                        reading.origin,
                        reading.ts,
                        &[metric.as_bytes()],
                        EventBody::Anomaly {
                            metric: metric.clone(),
                            value,
                            mean,
                            stddev,
                            z,
                        },
                        Some(reading),
                    ));
                }
            }
            ms.push(value, self.readings);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operators::test_support::feed;
    use std::time::Duration;

    fn anomaly(cooldown: Duration) -> Anomaly {
        let config = AnomalyConfig {
            metrics: vec!["temperature".into()],
            readings: 4,
            z_threshold: 3.0,
            min_readings: None,
            cooldown,
        };
        let rule = RuleMeta {
            index: 0,
            name: "odd".into(),
        };
        Anomaly::new(rule, &config, vec![0])
    }

    fn run(op: &Anomaly, values: &[(i64, f64)]) -> (Vec<String>, Output) {
        let readings: Vec<_> = values.iter().map(|(ts, v)| (*ts, [Some(*v)])).collect();
        feed(op, &readings, |e| match &e.body {
            EventBody::Anomaly {
                value,
                mean,
                stddev,
                z,
                ..
            } => format!("{value}@{} mean={mean} sd={stddev} z={z}", e.ts),
            other => panic!("unexpected {other:?}"),
        })
    }

    #[test]
    fn scores_each_reading_against_the_previous_readings() {
        // Window 10, 12, 10, 12: mean 11, population sd 1. 14.5 is z = 3.5; 13.9 afterwards is
        // scored against 12, 10, 12, 14.5.
        let (events, _) = run(
            &anomaly(Duration::ZERO),
            &[
                (1, 10.0),
                (2, 12.0),
                (3, 10.0),
                (4, 12.0),
                (5, 14.5),
                (6, 11.0),
                (7, 7.0),
            ],
        );
        assert_eq!(events, ["14.5@5 mean=11 sd=1 z=3.5"]);
    }

    #[test]
    fn nothing_is_scored_before_the_window_fills() {
        let (events, _) = run(
            &anomaly(Duration::ZERO),
            &[(1, 10.0), (2, 10.1), (3, 500.0)],
        );
        assert!(events.is_empty());
    }

    #[test]
    fn cooldown_keeps_one_excursion_to_one_alert() {
        let values: Vec<(i64, f64)> = [10.0, 12.0, 10.0, 12.0]
            .into_iter()
            .chain([100.0, 1000.0, 10_000.0, 100_000.0])
            .enumerate()
            .map(|(i, v)| (i as i64 * 1000, v))
            .collect();
        let (with, _) = run(&anomaly(Duration::from_secs(10)), &values);
        let (without, _) = run(&anomaly(Duration::ZERO), &values);
        assert_eq!(with.len(), 1);
        assert!(without.len() > 1, "{without:?}");
    }

    #[test]
    fn a_constant_signal_is_never_anomalous_and_large_values_keep_their_precision() {
        let base = 1.0e9;
        let mut values: Vec<(i64, f64)> = (0..100).map(|i| (i, base)).collect();
        values.push((100, base + 0.001));
        let (events, _) = run(&anomaly(Duration::ZERO), &values[..100]);
        assert!(events.is_empty());
        let mut wobble: Vec<(i64, f64)> = (0..8)
            .map(|i| (i, base + if i % 2 == 0 { 0.001 } else { -0.001 }))
            .collect();
        wobble.push((8, base + 0.0045));
        let (events, _) = run(&anomaly(Duration::ZERO), &wobble);
        assert_eq!(events.len(), 1, "{events:?}");
    }

    #[test]
    fn older_readings_are_ignored_and_counted() {
        let (_, out) = run(&anomaly(Duration::ZERO), &[(10, 1.0), (5, 2.0)]);
        assert_eq!(out.out_of_order, 1);
    }
}
