//! Session windows: a device's readings closer than `gap` in event time form one session, which
//! ends `gap` after its last reading, or `max_length` after its first. Out-of-order readings may
//! bridge two open sessions into one. Firing, lateness, quarantine and idle close work as for
//! the other kinds (see [`super`]).
//!
//! A fired session keeps its bounds: a late reading inside them (within allowed lateness)
//! updates its aggregates; one outside them starts a session of its own, or is late if that
//! session's end has already passed the watermark.

use super::{LateReason, Pane, WindowSpec};
use crate::decode::{Origin, Reading};
use crate::model::event::WindowClose;
use crate::operators::{Operator, Output};
use serde::{Deserialize, Serialize};

/// A built session-window rule.
#[derive(Debug, Clone)]
pub struct SessionWindows {
    spec: WindowSpec,
    gap_ms: i64,
    max_length_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Session {
    pane: Pane,
    /// Event time of the session's newest reading.
    last: i64,
}

/// Per-device state: open sessions and fired ones kept for lateness, ordered by start.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SessionState {
    sessions: Vec<Session>,
    watermark: Option<i64>,
    last_arrival_ms: i64,
}

impl SessionWindows {
    /// `max_length_ms` of `i64::MAX` means no maximum.
    pub fn new(spec: WindowSpec, gap_ms: i64, max_length_ms: i64) -> Self {
        Self {
            spec,
            gap_ms: gap_ms.max(1),
            max_length_ms: max_length_ms.max(1),
        }
    }

    fn end_of(&self, start: i64, last: i64) -> i64 {
        last.saturating_add(self.gap_ms)
            .min(start.saturating_add(self.max_length_ms))
    }

    /// Whether `a` and `b` are close enough to be one session, and short enough together.
    fn joins(&self, a: &Session, b: &Session) -> bool {
        let (start, last) = (a.pane.start.min(b.pane.start), a.last.max(b.last));
        b.pane.start < a.last.saturating_add(self.gap_ms)
            && a.pane.start < b.last.saturating_add(self.gap_ms)
            && last - start < self.max_length_ms
    }

    fn advance(
        &self,
        state: &mut SessionState,
        origin: &Origin,
        cause: Option<&Reading<'_>>,
        watermark: i64,
        closed_by: WindowClose,
        out: &mut Output,
    ) {
        state.watermark = Some(watermark);
        for session in state.sessions.iter_mut().filter(|s| !s.pane.fired) {
            if session.pane.end <= watermark || closed_by != WindowClose::Watermark {
                session.pane.fired = true;
                let pane = &session.pane;
                self.spec
                    .emit(pane.start, pane, origin, cause, closed_by, out);
            }
        }
        let before = state.sessions.len();
        let lateness = self.spec.lateness_ms;
        state
            .sessions
            .retain(|s| !s.pane.fired || s.pane.end.saturating_add(lateness) > watermark);
        out.open_windows_delta -= (before - state.sessions.len()) as i64;
    }
}

impl Operator for SessionWindows {
    type State = SessionState;

    fn on_reading(&self, state: &mut SessionState, reading: &Reading<'_>, out: &mut Output) {
        let spec = &self.spec;
        if spec.is_future(reading) {
            spec.reject(reading, LateReason::Future, state.watermark, out);
            return;
        }
        state.last_arrival_ms = state.last_arrival_ms.max(reading.arrival_ms);
        let ts = reading.ts;
        let watermark = state.watermark;
        if spec.has_metric(reading) {
            if watermark.is_some_and(|wm| ts.saturating_add(self.gap_ms) <= wm) {
                // Its own session would already have closed: only a fired session holding it,
                // still within lateness, can take it.
                let lateness = spec.lateness_ms;
                let held = state.sessions.iter_mut().find(|s| {
                    s.pane.fired
                        && s.pane.start <= ts
                        && ts < s.pane.end
                        && watermark.is_some_and(|wm| s.pane.end.saturating_add(lateness) > wm)
                });
                match held {
                    Some(session) => {
                        spec.add(&mut session.pane, reading);
                        session.pane.updates += 1;
                        let pane = &session.pane;
                        spec.emit(
                            pane.start,
                            pane,
                            reading.origin,
                            Some(reading),
                            WindowClose::Watermark,
                            out,
                        );
                    }
                    None => spec.reject(reading, LateReason::Late, watermark, out),
                }
            } else {
                let mut merged = Session {
                    pane: spec.new_pane(ts, self.end_of(ts, ts)),
                    last: ts,
                };
                spec.add(&mut merged.pane, reading);
                let mut i = 0;
                while i < state.sessions.len() {
                    let other = &state.sessions[i];
                    if !other.pane.fired && self.joins(other, &merged) {
                        let other = state.sessions.remove(i);
                        out.open_windows_delta -= 1;
                        merged.pane.start = merged.pane.start.min(other.pane.start);
                        merged.last = merged.last.max(other.last);
                        merged.pane.readings += other.pane.readings;
                        merged.pane.accumulators.merge(&other.pane.accumulators);
                    } else {
                        i += 1;
                    }
                }
                merged.pane.end = self.end_of(merged.pane.start, merged.last);
                if state.sessions.len() >= spec.max_open_windows {
                    // Nothing merged (a merge frees a slot): refuse rather than grow.
                    spec.reject(reading, LateReason::WindowLimit, watermark, out);
                } else {
                    let index = state
                        .sessions
                        .partition_point(|s| s.pane.start <= merged.pane.start);
                    state.sessions.insert(index, merged);
                    out.open_windows_delta += 1;
                }
            }
        }
        let candidate = ts.saturating_sub(spec.out_of_orderness_ms);
        if watermark.is_none_or(|wm| candidate > wm) {
            self.advance(
                state,
                reading.origin,
                Some(reading),
                candidate,
                WindowClose::Watermark,
                out,
            );
        }
    }

    fn wants_ticks(&self) -> bool {
        self.spec.idle_timeout_ms.is_some()
    }

    fn on_tick(&self, state: &mut SessionState, origin: &Origin, now_ms: i64, out: &mut Output) {
        if !self.spec.is_idle(state.last_arrival_ms, now_ms) {
            return;
        }
        let open_end = state
            .sessions
            .iter()
            .filter(|s| !s.pane.fired)
            .map(|s| s.pane.end)
            .max();
        let Some(last_end) = open_end else {
            return;
        };
        let watermark = state.watermark.map_or(last_end, |wm| wm.max(last_end));
        self.advance(
            state,
            origin,
            None,
            watermark,
            WindowClose::IdleTimeout,
            out,
        );
    }

    fn on_close(&self, state: &mut SessionState, origin: &Origin, out: &mut Output) {
        if !self.spec.flush_on_shutdown {
            return;
        }
        for session in state.sessions.drain(..) {
            out.open_windows_delta -= 1;
            if !session.pane.fired {
                let pane = &session.pane;
                self.spec
                    .emit(pane.start, pane, origin, None, WindowClose::Shutdown, out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{bounds, config, fired, spec};
    use super::*;
    use crate::operators::test_support::{origin, reading};
    use std::time::Duration;

    fn session(
        gap_s: i64,
        max_length_s: Option<i64>,
        shape: impl FnOnce(&mut crate::config::WindowConfig),
    ) -> SessionWindows {
        let config = config(|c| {
            c.gap = Some(Duration::from_secs(gap_s as u64));
            shape(c);
        });
        SessionWindows::new(
            spec(&config),
            gap_s * 1000,
            max_length_s.map_or(i64::MAX, |s| s * 1000),
        )
    }

    fn feed(op: &SessionWindows, state: &mut SessionState, readings: &[(i64, f64)]) -> Output {
        let origin = origin("d1");
        let mut out = Output::default();
        for &(ts, value) in readings {
            op.on_reading(state, &reading(&origin, ts, &[Some(value)]), &mut out);
        }
        out
    }

    #[test]
    fn a_gap_without_readings_closes_the_session_at_last_plus_gap() {
        let op = session(5, None, |_| {});
        let mut state = SessionState::default();
        let out = feed(
            &op,
            &mut state,
            &[(0, 1.0), (3_000, 2.0), (7_000, 3.0), (12_000, 4.0)],
        );
        // 0, 3, 7 are each < 5 s apart; 12 is exactly 5 s after 7: a new session, and the
        // watermark (12 s) reaches the first session's end (7 + 5 = 12 s).
        assert_eq!(bounds(&out), vec![(0, 12_000, 3)]);
        assert_eq!(state.sessions.len(), 1);
    }

    #[test]
    fn max_length_cuts_a_busy_session() {
        let op = session(5, Some(10), |_| {});
        let mut state = SessionState::default();
        let readings: Vec<(i64, f64)> = (0..8).map(|i| (i * 2_000, 1.0)).collect();
        let out = feed(&op, &mut state, &readings);
        // 0..8 s in the first session; 10 s would make it 10 s long: it starts the next one.
        assert_eq!(bounds(&out), vec![(0, 10_000, 5)]);
        assert_eq!(state.sessions[0].pane.start, 10_000);
    }

    #[test]
    fn an_out_of_order_reading_bridges_two_sessions_into_one() {
        let op = session(5, None, |c| {
            c.max_out_of_orderness = Duration::from_secs(20)
        });
        let mut state = SessionState::default();
        let out = feed(&op, &mut state, &[(0, 1.0), (8_000, 3.0), (4_000, 2.0)]);
        assert!(out.events.is_empty());
        assert_eq!(state.sessions.len(), 1);
        assert_eq!(out.open_windows_delta, 1);
        let out = feed(&op, &mut state, &[(40_000, 0.0)]);
        let f = fired(&out);
        assert_eq!((f[0].start, f[0].end, f[0].count), (0, 13_000, 3));
        assert_eq!(f[0].metric.as_ref().unwrap().avg, 2.0);
    }

    #[test]
    fn a_late_reading_inside_a_fired_session_updates_it_within_lateness() {
        let op = session(5, None, |c| c.allowed_lateness = Duration::from_secs(10));
        let mut state = SessionState::default();
        let out = feed(
            &op,
            &mut state,
            &[(0, 1.0), (4_000, 1.0), (15_000, 1.0), (2_000, 4.0)],
        );
        let f = fired(&out);
        assert_eq!(
            f.iter()
                .map(|f| (f.start, f.end, f.count, f.update))
                .collect::<Vec<_>>(),
            vec![(0, 9_000, 2, 0), (0, 9_000, 3, 1)]
        );
        assert_eq!(out.events[0].id, out.events[1].id);
        // Past 9 s + 10 s of lateness, the session is gone.
        let out = feed(&op, &mut state, &[(30_000, 1.0), (3_000, 1.0)]);
        assert_eq!(out.late, 1);
    }

    #[test]
    fn idle_timeout_closes_an_open_session() {
        let op = session(60, None, |c| c.idle_timeout = Some(Duration::from_secs(5)));
        let origin = origin("d1");
        let mut state = SessionState::default();
        let mut out = feed(&op, &mut state, &[(1_000, 1.0)]);
        op.on_tick(&mut state, &origin, 5_999, &mut out);
        assert!(out.events.is_empty());
        op.on_tick(&mut state, &origin, 6_000, &mut out);
        let f = fired(&out);
        assert_eq!(
            (f[0].start, f[0].end, f[0].closed_by),
            (1_000, 61_000, WindowClose::IdleTimeout)
        );
    }
}
