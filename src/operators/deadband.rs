//! Deadband (report by exception, like Node-RED's filter node): a value is emitted when it moved
//! more than a band (absolute, or percent of the last value emitted) from the last value emitted
//! for the device; with `max_silence`, the current value is re-emitted anyway once nothing was
//! emitted for that long (a heartbeat, in event time, checked as readings arrive).

use super::{admit, millis, Operator, Output, RuleMeta};
use crate::config::DeadbandConfig;
use crate::decode::Reading;
use crate::model::event::EventBody;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// The band a value must leave to be reported.
#[derive(Debug, Clone, Copy)]
enum Band {
    Absolute(f64),
    Percent(f64),
}

/// A built deadband rule.
#[derive(Debug, Clone)]
pub struct Deadband {
    rule: RuleMeta,
    /// Metric names and their slots in the input's field plan.
    metrics: Vec<(Arc<str>, usize)>,
    band: Band,
    max_silence_ms: Option<i64>,
}

/// What was last reported for one metric.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
struct Reported {
    value: f64,
    ts: i64,
}

/// Per-device state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeadbandState {
    last_ts: Option<i64>,
    /// One per rule metric; `None` until the metric's first reading.
    reported: Vec<Option<Reported>>,
}

impl Deadband {
    /// Builds from validated config; `slots` are the metrics' slots in the input's field plan.
    pub fn new(rule: RuleMeta, config: &DeadbandConfig, slots: Vec<usize>) -> Self {
        let band = match (config.absolute, config.percent) {
            (_, Some(percent)) => Band::Percent(percent),
            (absolute, None) => Band::Absolute(absolute.unwrap_or(0.0)),
        };
        Self {
            rule,
            metrics: config
                .metrics
                .iter()
                .map(|m| Arc::from(m.as_str()))
                .zip(slots)
                .collect(),
            band,
            max_silence_ms: config.max_silence.map(millis),
        }
    }

    fn outside(&self, last: f64, value: f64) -> bool {
        let moved = (value - last).abs();
        match self.band {
            Band::Absolute(band) => moved > band,
            Band::Percent(percent) => moved > last.abs() * percent / 100.0,
        }
    }
}

impl Operator for Deadband {
    type State = DeadbandState;

    fn on_reading(&self, state: &mut DeadbandState, reading: &Reading<'_>, out: &mut Output) {
        // The band is relative to the last value reported; an older reading reported now would
        // make consumers see time run backwards. Ignored and counted.
        if !admit(
            &self.metrics,
            &mut state.last_ts,
            &mut state.reported,
            reading,
            out,
        ) {
            return;
        }
        for ((metric, slot), reported) in self.metrics.iter().zip(&mut state.reported) {
            let Some(value) = reading.values[*slot] else {
                continue;
            };
            let reason = match reported {
                None => "first",
                Some(last) if self.outside(last.value, value) => "deadband",
                Some(last)
                    if self
                        .max_silence_ms
                        .is_some_and(|s| reading.ts.saturating_sub(last.ts) >= s) =>
                {
                    "heartbeat"
                }
                Some(_) => continue,
            };
            out.events.push(self.rule.event(
                reading.origin,
                reading.ts,
                &[metric.as_bytes()],
                EventBody::Report {
                    metric: metric.clone(),
                    value,
                    previous: reported.map(|r| r.value),
                    reason,
                },
                Some(reading),
            ));
            *reported = Some(Reported {
                value,
                ts: reading.ts,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operators::test_support::feed;
    use std::time::Duration;

    fn deadband(absolute: Option<f64>, percent: Option<f64>, silence: Option<u64>) -> Deadband {
        let config = DeadbandConfig {
            metrics: vec!["temperature".into(), "humidity".into()],
            absolute,
            percent,
            max_silence: silence.map(Duration::from_secs),
        };
        let rule = RuleMeta {
            index: 0,
            name: "rbe".into(),
        };
        Deadband::new(rule, &config, vec![0, 1])
    }

    /// Every report as `metric=value(reason)@ts`.
    fn run(op: &Deadband, readings: &[(i64, Option<f64>, Option<f64>)]) -> (Vec<String>, Output) {
        let readings: Vec<_> = readings.iter().map(|(ts, t, h)| (*ts, [*t, *h])).collect();
        feed(op, &readings, |e| match &e.body {
            EventBody::Report {
                metric,
                value,
                reason,
                ..
            } => format!("{metric}={value}({reason})@{}", e.ts),
            other => panic!("unexpected {other:?}"),
        })
    }

    #[test]
    fn reports_only_moves_beyond_an_absolute_band_from_the_last_report() {
        let (reports, _) = run(
            &deadband(Some(0.5), None, None),
            &[
                (1, Some(20.0), None),
                (2, Some(20.4), None),
                (3, Some(20.5), None), // exactly the band: not beyond it
                (4, Some(20.6), None), // 0.6 from the last report (20.0)
                (5, Some(20.2), None),
                (6, Some(20.0), None), // 0.6 below 20.6
            ],
        );
        assert_eq!(
            reports,
            [
                "temperature=20(first)@1",
                "temperature=20.6(deadband)@4",
                "temperature=20(deadband)@6",
            ]
        );
    }

    #[test]
    fn a_percent_band_is_relative_to_the_last_report() {
        let (reports, _) = run(
            &deadband(None, Some(10.0), None),
            &[
                (1, Some(100.0), Some(50.0)),
                (2, Some(109.0), Some(56.0)),
                (3, Some(121.0), Some(56.0)),
            ],
        );
        assert_eq!(
            reports,
            [
                "temperature=100(first)@1",
                "humidity=50(first)@1",
                "humidity=56(deadband)@2",
                "temperature=121(deadband)@3",
            ]
        );
    }

    #[test]
    fn max_silence_re_emits_the_current_value_as_a_heartbeat() {
        let (reports, _) = run(
            &deadband(Some(1.0), None, Some(60)),
            &[
                (0, Some(20.0), None),
                (30_000, Some(20.1), None),
                (59_999, Some(20.2), None),
                (60_000, Some(20.3), None),
                (90_000, Some(20.3), None),
            ],
        );
        assert_eq!(
            reports,
            [
                "temperature=20(first)@0",
                "temperature=20.3(heartbeat)@60000"
            ]
        );
    }

    #[test]
    fn older_readings_are_ignored_and_counted() {
        let (reports, out) = run(
            &deadband(Some(0.5), None, None),
            &[
                (10, Some(20.0), None),
                (5, Some(30.0), None),
                (11, Some(20.1), None),
            ],
        );
        assert_eq!(reports, ["temperature=20(first)@10"]);
        assert_eq!(out.out_of_order, 1);
    }
}
