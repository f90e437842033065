//! Flapping suppression, shared by the state-emitting detectors (hysteresis, thresholds,
//! change): a device whose state changes more than `max_changes` times within `within` (event
//! time) is marked `flapping`, and its transitions are held back until it has held one state for
//! `within`. Kapacitor's `flapping` does the same with percentages of changes.

use crate::config::FlappingConfig;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// A rule's flapping settings.
#[derive(Debug, Clone, Copy)]
pub struct Flapping {
    max_changes: usize,
    within_ms: i64,
}

/// Per-device (per-field) flapping state: recent transition times, bounded by `max_changes + 1`,
/// and whether the device is flapping. One word: every device of a detector carries this state
/// and most rules have no flapping settings, so it is boxed, and `None` while there are no
/// changes and the device is not flapping. Written as the plain `{changes, flapping}` it was
/// before.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "FlapRecord", into = "FlapRecord")]
pub struct FlapState(Option<Box<FlapRecord>>);

/// How a [`FlapState`] is written in snapshots, and what its box holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct FlapRecord {
    changes: VecDeque<i64>,
    flapping: bool,
}

impl From<FlapRecord> for FlapState {
    fn from(record: FlapRecord) -> Self {
        Self((record.flapping || !record.changes.is_empty()).then(|| Box::new(record)))
    }
}

impl From<FlapState> for FlapRecord {
    fn from(state: FlapState) -> Self {
        state.0.map(|record| *record).unwrap_or_default()
    }
}

impl FlapState {
    fn is_flapping(&self) -> bool {
        self.0.as_ref().is_some_and(|record| record.flapping)
    }
}

/// What to do with a transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Not flapping: publish the transition.
    Publish,
    /// This transition made the device flapping: publish a `flapping` event instead.
    Started { changes: u32 },
    /// Already flapping: hold the transition back.
    Held,
}

impl Flapping {
    pub fn new(config: &FlappingConfig) -> Self {
        Self {
            max_changes: config.max_changes.max(1),
            within_ms: super::millis(config.within).max(1),
        }
    }

    /// Records a transition at event time `ts`.
    pub fn on_transition(&self, state: &mut FlapState, ts: i64) -> Verdict {
        let record = state.0.get_or_insert_with(Box::default);
        let changes = &mut record.changes;
        changes.push_back(ts);
        while changes
            .front()
            .is_some_and(|first| *first <= ts.saturating_sub(self.within_ms))
        {
            changes.pop_front();
        }
        while changes.len() > self.max_changes + 1 {
            changes.pop_front();
        }
        if record.flapping {
            Verdict::Held
        } else if changes.len() > self.max_changes {
            record.flapping = true;
            Verdict::Started {
                changes: changes.len() as u32,
            }
        } else {
            Verdict::Publish
        }
    }

    /// Called on every reading before its transition is evaluated: true when a flapping device
    /// has held its state for `within` by `ts`, which ends flapping.
    pub fn settles(&self, state: &mut FlapState, ts: i64) -> bool {
        let Some(record) = state.0.as_ref().filter(|_| state.is_flapping()) else {
            return false;
        };
        let quiet = record
            .changes
            .back()
            .is_none_or(|last| ts.saturating_sub(*last) >= self.within_ms);
        if quiet {
            // Not flapping, with no changes: the empty state.
            state.0 = None;
        }
        quiet
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn snapshots_keep_the_changes_as_a_plain_sequence() {
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        struct Unboxed {
            changes: VecDeque<i64>,
            flapping: bool,
        }
        use crate::operators::test_support::cbor;
        let mut state = FlapState::default();
        flapping().on_transition(&mut state, 5);
        let unboxed: Unboxed = ciborium::from_reader(&cbor(&state)[..]).unwrap();
        assert_eq!(unboxed.changes, [5]);
        let restored: FlapState = ciborium::from_reader(&cbor(&unboxed)[..]).unwrap();
        assert_eq!(restored, state);
        let quiet = Unboxed {
            changes: VecDeque::new(),
            flapping: false,
        };
        assert_eq!(cbor(&FlapState::default()), cbor(&quiet));
        let restored: FlapState = ciborium::from_reader(&cbor(&quiet)[..]).unwrap();
        assert_eq!(restored, FlapState::default());
    }

    fn flapping() -> Flapping {
        Flapping::new(&FlappingConfig {
            max_changes: 2,
            within: Duration::from_secs(10),
        })
    }

    #[test]
    fn more_than_max_changes_within_the_window_starts_flapping() {
        let f = flapping();
        let mut state = FlapState::default();
        assert_eq!(f.on_transition(&mut state, 0), Verdict::Publish);
        assert_eq!(f.on_transition(&mut state, 1_000), Verdict::Publish);
        assert_eq!(
            f.on_transition(&mut state, 2_000),
            Verdict::Started { changes: 3 }
        );
        assert_eq!(f.on_transition(&mut state, 3_000), Verdict::Held);
        assert!(!f.settles(&mut state, 12_999));
        assert!(f.settles(&mut state, 13_000));
        assert_eq!(f.on_transition(&mut state, 14_000), Verdict::Publish);
    }

    #[test]
    fn changes_spread_wider_than_the_window_never_flap() {
        let f = flapping();
        let mut state = FlapState::default();
        for ts in (0..10).map(|i| i * 6_000) {
            assert_eq!(f.on_transition(&mut state, ts), Verdict::Publish);
        }
    }
}
