//! Liveness (deadman): a device silent for `timeout` of processing time becomes `offline`, and
//! `online` again on its next reading. Silence is checked by the engine's tick, so it fires with
//! no data arriving at all. Devices listed as expected in the config are tracked from start-up,
//! so one that never reports is reported offline too. With a `status` field (a retained status
//! or last-will topic), a status value such as `offline` takes the device offline at once.
//!
//! Out-of-order readings: liveness is about arrival, not event time, so every reading is a sign
//! of life whatever its timestamp.

use super::{millis, Operator, Output, RuleMeta};
use crate::config::LivenessConfig;
use crate::decode::{Discrete, Origin, Reading};
use crate::model::event::EventBody;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// A built liveness rule.
#[derive(Debug, Clone)]
pub struct Liveness {
    rule: RuleMeta,
    timeout_ms: Option<i64>,
    /// The status field's discrete slot and the values that mean offline.
    status: Option<(usize, Arc<[String]>)>,
}

/// Whether a device is online, as this rule last reported it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
enum Status {
    /// Not yet decided (expected but not yet timed out, or first seen).
    #[default]
    Unknown,
    Online,
    Offline,
}

impl Status {
    fn name(self) -> &'static str {
        match self {
            Status::Unknown => "unknown",
            Status::Online => "online",
            Status::Offline => "offline",
        }
    }
}

/// Per-device state. Times are processing time (ms), stamped by the tick.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LivenessState {
    /// Tracked by this rule: it sent a reading or the config expects it.
    known: bool,
    status: Status,
    /// A reading arrived since the last tick.
    seen: bool,
    /// When the device was last heard from (the tick after its reading).
    last_seen: Option<i64>,
    /// For an expected device never heard from: the first tick, where its silence starts.
    tracked_since: Option<i64>,
}

impl Liveness {
    /// Builds from validated config; `status_slot` is the status field's discrete slot.
    pub fn new(rule: RuleMeta, config: &LivenessConfig, status_slot: Option<usize>) -> Self {
        Self {
            rule,
            timeout_ms: config.timeout.map(millis),
            status: config
                .status
                .as_ref()
                .zip(status_slot)
                .map(|(status, slot)| (slot, status.offline.clone().into())),
        }
    }

    fn says_offline(&self, reading: &Reading<'_>) -> bool {
        let Some((slot, offline)) = &self.status else {
            return false;
        };
        match reading.discrete[*slot].get() {
            Some(Discrete::Text(text)) => offline.iter().any(|o| o == text),
            Some(Discrete::Bool(b)) => offline
                .iter()
                .any(|o| o == if b { "true" } else { "false" }),
            Some(Discrete::Int(i)) => offline.iter().any(|o| o.parse() == Ok(i)),
            None => false,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn event(
        &self,
        origin: &Origin,
        ts: i64,
        from: Status,
        to: Status,
        reason: &'static str,
        last_seen: Option<i64>,
        reading: Option<&Reading<'_>>,
        out: &mut Output,
    ) {
        out.events.push(self.rule.event(
            origin,
            ts,
            &[to.name().as_bytes()],
            EventBody::Liveness {
                from: from.name(),
                to: to.name(),
                reason,
                last_seen,
            },
            reading,
        ));
        if to == Status::Offline {
            out.offline += 1;
        } else if from == Status::Offline {
            out.offline -= 1;
        }
    }
}

impl Operator for Liveness {
    fn offline_devices(&self, state: &LivenessState) -> i64 {
        i64::from(state.status == Status::Offline)
    }

    type State = LivenessState;

    fn on_reading(&self, state: &mut LivenessState, reading: &Reading<'_>, out: &mut Output) {
        state.known = true;
        if self.says_offline(reading) {
            state.seen = false;
            if state.status != Status::Offline {
                let from = state.status;
                state.status = Status::Offline;
                self.event(
                    reading.origin,
                    reading.ts,
                    from,
                    Status::Offline,
                    "status",
                    state.last_seen,
                    Some(reading),
                    out,
                );
            }
            return;
        }
        state.seen = true;
        match state.status {
            // The first sign of life of a device is not news; coming back is.
            Status::Unknown => state.status = Status::Online,
            Status::Online => {}
            Status::Offline => {
                state.status = Status::Online;
                self.event(
                    reading.origin,
                    reading.ts,
                    Status::Offline,
                    Status::Online,
                    "reading",
                    state.last_seen,
                    Some(reading),
                    out,
                );
            }
        }
    }

    fn wants_ticks(&self) -> bool {
        self.timeout_ms.is_some()
    }

    fn on_tick(&self, state: &mut LivenessState, origin: &Origin, now_ms: i64, out: &mut Output) {
        if !state.known {
            return;
        }
        if std::mem::take(&mut state.seen) {
            state.last_seen = Some(now_ms);
        }
        let Some(timeout) = self.timeout_ms else {
            return;
        };
        // A device never heard from (expected) is silent since the first tick that saw it.
        let since = match state.last_seen {
            Some(last_seen) => last_seen,
            None => *state.tracked_since.get_or_insert(now_ms),
        };
        if state.status == Status::Offline || now_ms.saturating_sub(since) < timeout {
            return;
        }
        let from = state.status;
        state.status = Status::Offline;
        let reason = if state.last_seen.is_some() {
            "timeout"
        } else {
            "never_seen"
        };
        self.event(
            origin,
            now_ms,
            from,
            Status::Offline,
            reason,
            state.last_seen,
            None,
            out,
        );
    }

    fn on_expected(&self, state: &mut LivenessState) {
        state.known = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::StatusConfig;
    use crate::decode::DiscreteSlot;
    use crate::operators::test_support::{discrete_reading, origin};
    use std::time::Duration;

    fn liveness(timeout: Option<u64>, status: bool) -> Liveness {
        let config = LivenessConfig {
            timeout: timeout.map(Duration::from_secs),
            expected: Vec::new(),
            status: status.then(|| StatusConfig {
                field: "status".into(),
                offline: vec!["offline".into(), "lost".into()],
            }),
        };
        let rule = RuleMeta {
            index: 0,
            name: "alive".into(),
        };
        Liveness::new(rule, &config, status.then_some(0))
    }

    enum Step<'a> {
        Reading(i64, Option<&'a str>),
        Tick(i64),
    }
    use Step::{Reading as R, Tick as T};

    /// Every event as `from->to(reason)@ts`, and the net change of the offline gauge.
    fn run(op: &Liveness, state: &mut LivenessState, steps: &[Step<'_>]) -> (Vec<String>, i64) {
        let origin = origin("d1");
        let mut out = Output::default();
        for step in steps {
            match step {
                R(ts, status) => {
                    let slots = [status
                        .map(|s| DiscreteSlot::of(Discrete::Text(s)))
                        .unwrap_or_default()];
                    op.on_reading(state, &discrete_reading(&origin, *ts, &slots), &mut out);
                }
                T(now) => op.on_tick(state, &origin, *now, &mut out),
            }
        }
        let events = out
            .events
            .iter()
            .map(|e| match &e.body {
                EventBody::Liveness {
                    from, to, reason, ..
                } => format!("{from}->{to}({reason})@{}", e.ts),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        (events, out.offline)
    }

    #[test]
    fn silence_for_the_timeout_goes_offline_and_a_reading_comes_back_online() {
        let op = liveness(Some(30), false);
        let mut state = LivenessState::default();
        let (events, offline) = run(
            &op,
            &mut state,
            &[
                R(1, None),
                T(1_000),  // last seen 1 s
                T(30_999), // silent 29.999 s
                T(31_000), // 30 s: offline, with no reading at all
                T(60_000), // already offline: nothing more
                R(2, None),
                T(60_250),
                T(90_249),
                T(90_250),
            ],
        );
        assert_eq!(
            events,
            [
                "online->offline(timeout)@31000",
                "offline->online(reading)@2",
                "online->offline(timeout)@90250",
            ]
        );
        assert_eq!(offline, 1);
    }

    #[test]
    fn an_expected_device_that_never_reports_goes_offline() {
        let op = liveness(Some(10), false);
        let mut state = LivenessState::default();
        op.on_expected(&mut state);
        let (events, offline) = run(
            &op,
            &mut state,
            &[T(5_000), T(14_999), T(15_000), R(7, None), T(15_250)],
        );
        assert_eq!(
            events,
            [
                "unknown->offline(never_seen)@15000",
                "offline->online(reading)@7"
            ]
        );
        assert_eq!(offline, 0);
    }

    #[test]
    fn devices_neither_seen_nor_expected_are_not_reported() {
        let op = liveness(Some(10), false);
        let mut state = LivenessState::default();
        let (events, _) = run(&op, &mut state, &[T(0), T(100_000)]);
        assert!(events.is_empty());
    }

    #[test]
    fn a_status_message_takes_the_device_offline_at_once() {
        let op = liveness(None, true);
        let mut state = LivenessState::default();
        let (events, offline) = run(
            &op,
            &mut state,
            &[
                R(1, Some("online")),
                R(2, Some("lost")),
                R(3, Some("offline")),
                R(4, Some("online")),
                R(5, Some("offline")),
            ],
        );
        assert_eq!(
            events,
            [
                "online->offline(status)@2",
                "offline->online(reading)@4",
                "online->offline(status)@5",
            ]
        );
        assert_eq!(offline, 1);
        assert!(!op.wants_ticks());
    }

    #[test]
    fn out_of_order_readings_still_count_as_signs_of_life() {
        let op = liveness(Some(10), false);
        let mut state = LivenessState::default();
        let (events, _) = run(
            &op,
            &mut state,
            &[R(100, None), T(0), T(10_000), R(50, None), T(10_250)],
        );
        assert_eq!(
            events,
            [
                "online->offline(timeout)@10000",
                "offline->online(reading)@50"
            ]
        );
    }
}
