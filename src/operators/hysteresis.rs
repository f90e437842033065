//! Hysteresis: a two-state machine on one metric. It enters `active` when the value rises above
//! `enter_above` and returns to `inactive` only when it falls below `exit_below`, so a value
//! wobbling around one threshold does not flap.

use super::{Operator, Output, RuleMeta};
use crate::config::HysteresisConfig;
use crate::decode::Reading;
use crate::event::{Cause, DerivedEvent, EventBody, EventId};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// A built hysteresis rule.
#[derive(Debug, Clone)]
pub struct Hysteresis {
    rule: RuleMeta,
    metric: Arc<str>,
    slot: usize,
    enter_above: f64,
    exit_below: f64,
    active: Arc<str>,
    inactive: Arc<str>,
    initially_active: bool,
}

/// Per-device state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HysteresisState {
    /// `None` until the device's first reading with this metric.
    active: Option<bool>,
    /// Event time of the last reading applied; older readings are ignored.
    last_ts: Option<i64>,
}

impl Hysteresis {
    /// Builds from validated config; `slot` is the metric's slot in the input's field plan.
    pub fn new(rule: RuleMeta, config: &HysteresisConfig, slot: usize) -> Self {
        Self {
            rule,
            metric: config.metric.as_str().into(),
            slot,
            enter_above: config.enter_above,
            exit_below: config.exit_below,
            active: config.active.as_str().into(),
            inactive: config.inactive.as_str().into(),
            initially_active: config.initial.as_deref() == Some(config.active.as_str()),
        }
    }

    fn state_name(&self, active: bool) -> &Arc<str> {
        if active {
            &self.active
        } else {
            &self.inactive
        }
    }
}

impl Operator for Hysteresis {
    type State = HysteresisState;

    fn on_reading(&self, state: &mut HysteresisState, reading: &Reading<'_>, out: &mut Output) {
        let Some(value) = reading.values[self.slot] else {
            return;
        };
        // An older reading than one already applied would rewind the state machine; ignore it
        // (counted), since applying it late would emit transitions in the wrong order.
        if state.last_ts.is_some_and(|last| reading.ts < last) {
            out.out_of_order += 1;
            return;
        }
        state.last_ts = Some(reading.ts);
        let was_active = state.active.unwrap_or(self.initially_active);
        let is_active = if was_active {
            value >= self.exit_below
        } else {
            value > self.enter_above
        };
        state.active = Some(is_active);
        if is_active == was_active {
            return;
        }
        let to = self.state_name(is_active);
        let origin = reading.origin;
        out.events.push(DerivedEvent {
            id: EventId::derive(&[
                self.rule.name.as_bytes(),
                origin.device.as_bytes(),
                b"state_change",
                &reading.ts.to_be_bytes(),
                to.as_bytes(),
            ]),
            rule_index: self.rule.index,
            rule: self.rule.name.clone(),
            origin: origin.clone(),
            ts: reading.ts,
            body: EventBody::StateChange {
                metric: self.metric.clone(),
                from: self.state_name(was_active).clone(),
                to: to.clone(),
                value,
            },
            cause: Some(Cause {
                topic: origin.topic.clone(),
                ts: reading.ts,
                seq: reading.seq,
            }),
            arrival: Some(reading.arrival),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operators::test_support::{origin, reading};

    fn overheat() -> Hysteresis {
        let config = HysteresisConfig {
            metric: "temperature".into(),
            enter_above: 30.0,
            exit_below: 28.0,
            active: "hot".into(),
            inactive: "normal".into(),
            initial: Some("normal".into()),
        };
        Hysteresis::new(
            RuleMeta {
                index: 0,
                name: "overheat".into(),
            },
            &config,
            0,
        )
    }

    fn transitions(op: &Hysteresis, values: &[(i64, f64)]) -> (Vec<String>, Output) {
        let origin = origin("d1");
        let mut state = HysteresisState::default();
        let mut out = Output::default();
        for (ts, value) in values {
            op.on_reading(
                &mut state,
                &reading(&origin, *ts, &[Some(*value)]),
                &mut out,
            );
        }
        let names = out
            .events
            .iter()
            .map(|e| match &e.body {
                EventBody::StateChange { from, to, .. } => format!("{from}->{to}"),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        (names, out)
    }

    #[test]
    fn reference_sequence_gives_hot_normal_hot() {
        let (names, _) = transitions(
            &overheat(),
            &[(1, 25.0), (2, 31.0), (3, 29.0), (4, 27.0), (5, 31.0)],
        );
        assert_eq!(names, ["normal->hot", "hot->normal", "normal->hot"]);
    }

    #[test]
    fn first_reading_above_threshold_is_a_transition() {
        let (names, _) = transitions(&overheat(), &[(1, 35.0)]);
        assert_eq!(names, ["normal->hot"]);
    }

    #[test]
    fn exits_hot_only_below_exit_threshold() {
        let (names, _) = transitions(&overheat(), &[(1, 31.0), (2, 28.0), (3, 29.9), (4, 27.99)]);
        assert_eq!(names, ["normal->hot", "hot->normal"]);
    }

    #[test]
    fn thresholds_are_strict() {
        let (names, _) = transitions(&overheat(), &[(1, 30.0)]);
        assert!(names.is_empty());
    }

    #[test]
    fn older_readings_are_ignored_and_counted() {
        let (names, out) = transitions(&overheat(), &[(10, 25.0), (5, 40.0), (11, 26.0)]);
        assert!(names.is_empty());
        assert_eq!(out.out_of_order, 1);
    }

    #[test]
    fn ids_are_deterministic_and_distinct() {
        let seq = [(1, 25.0), (2, 31.0), (3, 27.0)];
        let (_, a) = transitions(&overheat(), &seq);
        let (_, b) = transitions(&overheat(), &seq);
        let ids: Vec<_> = a.events.iter().map(|e| e.id).collect();
        assert_eq!(ids, b.events.iter().map(|e| e.id).collect::<Vec<_>>());
        assert_ne!(ids[0], ids[1]);
    }
}
