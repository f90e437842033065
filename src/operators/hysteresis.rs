//! Hysteresis: a state machine on one metric. In its two-state form it enters `active` when the
//! value rises above `enter_above` and returns to `inactive` only when it falls below
//! `exit_below`, so a value wobbling around one threshold does not flap. The same machine runs
//! multi-level thresholds (`normal` / `warning` / `critical`, each level with its own set and
//! reset value), with an optional hold time (`for`, event time) and flapping suppression.

use super::flapping::{FlapState, Flapping, Verdict};
use super::{in_order, millis, Operator, Output, RuleMeta};
use crate::config::{HysteresisConfig, ThresholdsConfig};
use crate::decode::Reading;
use crate::model::event::EventBody;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// A built hysteresis or thresholds rule.
#[derive(Debug, Clone)]
pub struct Hysteresis {
    rule: RuleMeta,
    metric: Arc<str>,
    slot: usize,
    /// State names: the base state, then one per level in rising order.
    states: Vec<Arc<str>>,
    /// `(set_above, reset_below)` of each level; level `i` is state `i + 1`.
    levels: Vec<(f64, f64)>,
    initial: u8,
    hold_ms: i64,
    flapping: Option<Flapping>,
}

/// Per-device state: 32 bytes, its options packed into one byte of flags (every device of the
/// rule carries it). Written in snapshots as [`HysteresisRecord`], its layout before it was
/// packed, so snapshots of either version restore in the other.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "HysteresisRecord", into = "HysteresisRecord")]
pub struct HysteresisState {
    /// Event time of the last reading applied (with [`LAST_TS`]); older readings are ignored.
    last_ts: i64,
    /// Since when `pending` has held (with [`PENDING`]).
    since: i64,
    flap: FlapState,
    /// Index into the rule's states (with [`LEVEL`]); unset until the device's first reading
    /// with this metric.
    level: u8,
    /// A state whose condition holds but not yet for `for` (with [`PENDING`]).
    pending: u8,
    /// The state last published (with [`PUBLISHED`]; differs from `level` only while
    /// flapping).
    published: u8,
    /// Which of the fields above are set.
    flags: u8,
}

const LEVEL: u8 = 1;
const LAST_TS: u8 = 2;
const PENDING: u8 = 4;
const PUBLISHED: u8 = 8;

impl HysteresisState {
    fn get<T>(&self, flag: u8, value: T) -> Option<T> {
        (self.flags & flag != 0).then_some(value)
    }

    fn set(&mut self, flag: u8, set: bool) {
        if set {
            self.flags |= flag;
        } else {
            self.flags &= !flag;
        }
    }

    fn level(&self) -> Option<u8> {
        self.get(LEVEL, self.level)
    }

    fn set_level(&mut self, level: u8) {
        self.level = level;
        self.set(LEVEL, true);
    }

    fn last_ts(&self) -> Option<i64> {
        self.get(LAST_TS, self.last_ts)
    }

    fn set_last_ts(&mut self, last_ts: Option<i64>) {
        self.last_ts = last_ts.unwrap_or(0);
        self.set(LAST_TS, last_ts.is_some());
    }

    fn pending(&self) -> Option<(u8, i64)> {
        self.get(PENDING, (self.pending, self.since))
    }

    fn set_pending(&mut self, pending: Option<(u8, i64)>) {
        (self.pending, self.since) = pending.unwrap_or((0, 0));
        self.set(PENDING, pending.is_some());
    }

    fn published(&self) -> Option<u8> {
        self.get(PUBLISHED, self.published)
    }

    fn set_published(&mut self, published: u8) {
        self.published = published;
        self.set(PUBLISHED, true);
    }
}

/// How a [`HysteresisState`] is written in snapshots: its fields before they were packed.
#[derive(Serialize, Deserialize)]
struct HysteresisRecord {
    level: Option<u8>,
    last_ts: Option<i64>,
    pending: Option<(u8, i64)>,
    published: Option<u8>,
    flap: FlapState,
}

impl From<HysteresisRecord> for HysteresisState {
    fn from(record: HysteresisRecord) -> Self {
        let mut state = Self {
            flap: record.flap,
            ..Self::default()
        };
        if let Some(level) = record.level {
            state.set_level(level);
        }
        state.set_last_ts(record.last_ts);
        state.set_pending(record.pending);
        if let Some(published) = record.published {
            state.set_published(published);
        }
        state
    }
}

impl From<HysteresisState> for HysteresisRecord {
    fn from(state: HysteresisState) -> Self {
        Self {
            level: state.level(),
            last_ts: state.last_ts(),
            pending: state.pending(),
            published: state.published(),
            flap: state.flap,
        }
    }
}

impl Hysteresis {
    /// Builds a two-state rule from validated config; `slot` is the metric's slot in the
    /// input's field plan.
    pub fn new(rule: RuleMeta, config: &HysteresisConfig, slot: usize) -> Self {
        Self {
            rule,
            metric: config.metric.as_str().into(),
            slot,
            states: vec![
                config.inactive.as_str().into(),
                config.active.as_str().into(),
            ],
            levels: vec![(config.enter_above, config.exit_below)],
            initial: u8::from(config.initial.as_deref() == Some(config.active.as_str())),
            hold_ms: millis(config.hold),
            flapping: config.flapping.as_ref().map(Flapping::new),
        }
    }

    /// Builds a multi-level rule from validated config.
    pub fn thresholds(rule: RuleMeta, config: &ThresholdsConfig, slot: usize) -> Self {
        Self {
            rule,
            metric: config.metric.as_str().into(),
            slot,
            states: std::iter::once(config.normal.as_str())
                .chain(config.levels.iter().map(|l| l.name.as_str()))
                .map(Arc::from)
                .collect(),
            levels: config
                .levels
                .iter()
                .map(|l| (l.set_above, l.reset_below))
                .collect(),
            initial: 0,
            hold_ms: millis(config.hold),
            flapping: config.flapping.as_ref().map(Flapping::new),
        }
    }

    /// The state `value` asks for, starting from `level`: up past every level whose `set_above`
    /// it exceeds, otherwise down past every level whose `reset_below` it is under.
    fn target(&self, level: u8, value: f64) -> u8 {
        let mut target = usize::from(level);
        while target < self.levels.len() && value > self.levels[target].0 {
            target += 1;
        }
        if target == usize::from(level) {
            while target > 0 && value < self.levels[target - 1].1 {
                target -= 1;
            }
        }
        target as u8
    }

    fn state_change(&self, from: u8, to: u8, value: f64, reading: &Reading<'_>, out: &mut Output) {
        let to_name = &self.states[usize::from(to)];
        out.events.push(self.rule.event(
            reading.origin,
            reading.ts,
            &[to_name.as_bytes()],
            EventBody::StateChange {
                metric: self.metric.clone(),
                from: self.states[usize::from(from)].clone(),
                to: to_name.clone(),
                value,
            },
            Some(reading),
        ));
    }

    fn flapping_event(
        &self,
        to: &'static str,
        state: u8,
        changes: u32,
        reading: &Reading<'_>,
        out: &mut Output,
    ) {
        out.events.push(self.rule.event(
            reading.origin,
            reading.ts,
            &[to.as_bytes()],
            EventBody::Flapping {
                metric: self.metric.clone(),
                from: if to == "flapping" {
                    "settled"
                } else {
                    "flapping"
                },
                to,
                state: self.states[usize::from(state)].clone(),
                changes,
            },
            Some(reading),
        ));
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
        let mut last_ts = state.last_ts();
        let applies = in_order(&mut last_ts, reading.ts, out);
        state.set_last_ts(last_ts);
        if !applies {
            return;
        }
        let level = state.level().unwrap_or(self.initial);
        state.set_level(level);
        let published = state.published().unwrap_or(level);
        state.set_published(published);
        if let Some(flapping) = &self.flapping {
            if flapping.settles(&mut state.flap, reading.ts) {
                self.flapping_event("settled", level, 0, reading, out);
                if published != level {
                    self.state_change(published, level, value, reading, out);
                    state.set_published(level);
                }
            }
        }
        let target = self.target(level, value);
        if target == level {
            state.set_pending(None);
            return;
        }
        let since = match state.pending() {
            Some((pending, since)) if pending == target => since,
            _ => {
                state.set_pending(Some((target, reading.ts)));
                reading.ts
            }
        };
        if reading.ts.saturating_sub(since) < self.hold_ms {
            return;
        }
        state.set_pending(None);
        state.set_level(target);
        let verdict = match &self.flapping {
            Some(flapping) => flapping.on_transition(&mut state.flap, reading.ts),
            None => Verdict::Publish,
        };
        match verdict {
            Verdict::Publish => {
                let from = state.published().unwrap_or(level);
                self.state_change(from, target, value, reading, out);
                state.set_published(target);
            }
            Verdict::Started { changes } => {
                self.flapping_event("flapping", target, changes, reading, out)
            }
            Verdict::Held => {}
        }
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
            hold: std::time::Duration::ZERO,
            flapping: None,
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
        let readings: Vec<_> = values.iter().map(|(ts, v)| (*ts, [Some(*v)])).collect();
        crate::operators::test_support::feed(op, &readings, |e| match &e.body {
            EventBody::StateChange { from, to, .. } => format!("{from}->{to}"),
            other => panic!("unexpected {other:?}"),
        })
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

    use crate::config::{FlappingConfig, LevelConfig};
    use std::time::Duration;

    fn levels(hold: Duration, flapping: Option<FlappingConfig>) -> Hysteresis {
        let config = ThresholdsConfig {
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
            hold,
            flapping,
        };
        let rule = RuleMeta {
            index: 0,
            name: "levels".into(),
        };
        Hysteresis::thresholds(rule, &config, 0)
    }

    /// Every event as `from->to@ts` (state changes) or `flapping:from->to@ts`.
    fn run(op: &Hysteresis, values: &[(i64, f64)]) -> Vec<String> {
        let readings: Vec<_> = values.iter().map(|(ts, v)| (*ts, [Some(*v)])).collect();
        let (events, _) = crate::operators::test_support::feed(op, &readings, |e| match &e.body {
            EventBody::StateChange { from, to, .. } => format!("{from}->{to}@{}", e.ts),
            EventBody::Flapping { from, to, .. } => format!("flapping:{from}->{to}@{}", e.ts),
            other => panic!("unexpected {other:?}"),
        });
        events
    }

    #[test]
    fn levels_rise_and_fall_past_their_own_set_and_reset_values() {
        let events = run(
            &levels(Duration::ZERO, None),
            &[
                (1, 60.0),
                (2, 71.0),
                (3, 95.0),
                (4, 87.0),
                (5, 84.0),
                (6, 66.0),
                (7, 64.0),
                (8, 99.0),
                (9, 10.0),
            ],
        );
        assert_eq!(
            events,
            [
                "normal->warning@2",
                "warning->critical@3",
                "critical->warning@5",
                "warning->normal@7",
                "normal->critical@8",
                "critical->normal@9",
            ]
        );
    }

    #[test]
    fn a_state_is_entered_only_after_its_condition_held_for_the_hold_time() {
        let events = run(
            &levels(Duration::from_secs(30), None),
            &[
                (0, 75.0),      // warning wanted since 0
                (10_000, 76.0), // held 10 s
                (20_000, 60.0), // back to normal before 30 s: nothing
                (25_000, 75.0), // wanted again since 25 s
                (54_999, 75.0), // 29.999 s
                (55_000, 75.0), // 30 s: enters warning
                (60_000, 50.0), // normal wanted since 60 s
                (90_000, 50.0), // 30 s: back to normal
            ],
        );
        assert_eq!(events, ["normal->warning@55000", "warning->normal@90000"]);
    }

    #[test]
    fn a_higher_level_restarts_the_hold() {
        let events = run(
            &levels(Duration::from_secs(10), None),
            &[(0, 75.0), (5_000, 95.0), (10_000, 95.0), (15_000, 95.0)],
        );
        assert_eq!(events, ["normal->critical@15000"]);
    }

    #[test]
    fn flapping_holds_transitions_back_until_the_device_settles() {
        let flapping = FlappingConfig {
            max_changes: 2,
            within: Duration::from_secs(60),
        };
        let events = run(
            &levels(Duration::ZERO, Some(flapping)),
            &[
                (0, 75.0),       // normal->warning
                (10_000, 60.0),  // warning->normal
                (20_000, 75.0),  // third change within 60 s: flapping
                (30_000, 60.0),  // held
                (40_000, 75.0),  // held
                (99_999, 75.0),  // last change at 40 s: not yet settled
                (100_000, 75.0), // settled; published state is normal, current is warning
                (110_000, 60.0), // an ordinary transition again
            ],
        );
        assert_eq!(
            events,
            [
                "normal->warning@0",
                "warning->normal@10000",
                "flapping:settled->flapping@20000",
                "flapping:flapping->settled@100000",
                "normal->warning@100000",
                "warning->normal@110000",
            ]
        );
    }

    #[test]
    fn settling_in_the_published_state_emits_no_state_change() {
        let flapping = FlappingConfig {
            max_changes: 1,
            within: Duration::from_secs(10),
        };
        let events = run(
            &levels(Duration::ZERO, Some(flapping)),
            &[(0, 75.0), (1_000, 60.0), (2_000, 75.0), (20_000, 75.0)],
        );
        assert_eq!(
            events,
            [
                "normal->warning@0",
                "flapping:settled->flapping@1000",
                "flapping:flapping->settled@20000",
            ]
        );
    }

    #[test]
    fn hold_time_ignores_older_readings() {
        let op = levels(Duration::from_secs(10), None);
        let origin = origin("d1");
        let mut state = HysteresisState::default();
        let mut out = Output::default();
        for (ts, value) in [(0, 75.0), (20_000, 75.0), (5_000, 10.0)] {
            op.on_reading(&mut state, &reading(&origin, ts, &[Some(value)]), &mut out);
        }
        assert_eq!(out.events.len(), 1);
        assert_eq!(out.out_of_order, 1);
    }

    /// The state's fields before they were packed, as the snapshots of earlier versions hold
    /// them.
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Unpacked {
        level: Option<u8>,
        last_ts: Option<i64>,
        pending: Option<(u8, i64)>,
        published: Option<u8>,
        flap: Flap,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Flap {
        changes: Vec<i64>,
        flapping: bool,
    }

    use crate::operators::test_support::cbor;

    #[test]
    fn snapshots_keep_the_unpacked_layout_both_ways() {
        let flapping = FlappingConfig {
            max_changes: 1,
            within: Duration::from_secs(10),
        };
        let op = levels(Duration::from_secs(5), Some(flapping));
        let origin = origin("d1");
        let mut state = HysteresisState::default();
        let mut out = Output::default();
        assert_eq!(
            cbor(&state),
            cbor(&Unpacked {
                level: None,
                last_ts: None,
                pending: None,
                published: None,
                flap: Flap {
                    changes: vec![],
                    flapping: false
                },
            })
        );
        // A transition held for `for`, then flapping, then a pending one.
        for (ts, value) in [
            (0, 75.0),
            (6_000, 75.0),
            (7_000, 10.0),
            (13_000, 10.0),
            (14_000, 75.0),
        ] {
            op.on_reading(&mut state, &reading(&origin, ts, &[Some(value)]), &mut out);
        }
        let unpacked: Unpacked = ciborium::from_reader(&cbor(&state)[..]).unwrap();
        assert_eq!(
            unpacked,
            Unpacked {
                level: Some(0),
                last_ts: Some(14_000),
                pending: Some((1, 14_000)),
                published: Some(1),
                flap: Flap {
                    changes: vec![6_000, 13_000],
                    flapping: true
                },
            }
        );
        let restored: HysteresisState = ciborium::from_reader(&cbor(&unpacked)[..]).unwrap();
        assert_eq!(restored, state);
        assert_eq!(std::mem::size_of::<HysteresisState>(), 32);
    }
}
