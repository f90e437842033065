//! Tumbling windows: fixed, non-overlapping event-time windows per device, aligned to the epoch.
//! A window `[start, end)` fires when its device's watermark reaches `end` (see [`super`]).

use super::{Assigner, TimeWindows, WindowSpec};

/// The assigner: one window of `size_ms` per timestamp.
#[derive(Debug, Clone)]
pub struct TumblingAssigner {
    size_ms: i64,
}

impl Assigner for TumblingAssigner {
    fn assign(&self, ts: i64, mut f: impl FnMut(i64, i64)) {
        let start = ts - ts.rem_euclid(self.size_ms);
        f(start, start.saturating_add(self.size_ms));
    }
}

/// A built tumbling-window rule.
pub type Tumbling = TimeWindows<TumblingAssigner>;

impl Tumbling {
    pub fn new(spec: WindowSpec, size_ms: i64) -> Self {
        TimeWindows::with(
            spec,
            TumblingAssigner {
                size_ms: size_ms.max(1),
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{bounds, config, fired, late_reasons, spec};
    use super::super::TimeWindowsState;
    use super::*;
    use crate::config::WindowConfig;
    use crate::model::event::WindowClose;
    use crate::operators::test_support::{origin, reading};
    use crate::operators::{Operator, Output};
    use std::time::Duration;

    fn tumbling(shape: impl FnOnce(&mut WindowConfig)) -> Tumbling {
        let config = config(|c| {
            c.size = Some(Duration::from_secs(10));
            shape(c);
        });
        Tumbling::new(spec(&config), 10_000)
    }

    /// Feeds (ts, temperature) readings of device d1, arriving at `ts` on the gateway clock.
    fn feed(op: &Tumbling, state: &mut TimeWindowsState, readings: &[(i64, f64)]) -> Output {
        let origin = origin("d1");
        let mut out = Output::default();
        for &(ts, value) in readings {
            op.on_reading(state, &reading(&origin, ts, &[Some(value)]), &mut out);
        }
        out
    }

    #[test]
    fn fires_when_the_devices_watermark_passes_the_end() {
        let op = tumbling(|_| {});
        let mut state = TimeWindowsState::default();
        let out = feed(&op, &mut state, &[(0, 20.0), (4_000, 22.0), (9_999, 24.0)]);
        assert!(out.events.is_empty());
        let out = feed(&op, &mut state, &[(10_000, 30.0)]);
        let f = &fired(&out)[0];
        assert_eq!((f.start, f.end, f.count), (0, 10_000, 3));
        let m = f.metric.as_ref().unwrap();
        assert_eq!((m.min, m.max, m.avg), (20.0, 24.0, 22.0));
        assert_eq!(out.events[0].cause.as_ref().map(|c| c.ts), Some(10_000));
        assert_eq!(f.closed_by, WindowClose::Watermark);
    }

    #[test]
    fn out_of_order_readings_within_the_bound_land_in_their_window() {
        let op = tumbling(|c| c.max_out_of_orderness = Duration::from_secs(2));
        let mut state = TimeWindowsState::default();
        let out = feed(
            &op,
            &mut state,
            &[(9_000, 1.0), (11_000, 2.0), (8_000, 3.0), (12_000, 4.0)],
        );
        // The watermark reached 10 s only with the reading at 12 s; 8 s was still on time.
        assert_eq!(bounds(&out), vec![(0, 10_000, 2)]);
        assert_eq!(out.late, 0);
    }

    #[test]
    fn readings_past_lateness_are_late_and_published_with_the_reason() {
        let op = tumbling(|c| c.late_topic = Some("late/{device}".into()));
        let mut state = TimeWindowsState::default();
        let out = feed(
            &op,
            &mut state,
            &[(1_000, 1.0), (12_000, 2.0), (9_000, 3.0)],
        );
        assert_eq!(out.late, 1);
        assert_eq!(bounds(&out), vec![(0, 10_000, 1)]);
        assert_eq!(late_reasons(&out), vec!["late"]);
    }

    #[test]
    fn a_late_reading_within_lateness_re_emits_the_window_as_an_update_with_the_same_id() {
        let op = tumbling(|c| c.allowed_lateness = Duration::from_secs(5));
        let mut state = TimeWindowsState::default();
        let out = feed(
            &op,
            &mut state,
            &[(1_000, 10.0), (10_500, 0.0), (2_000, 20.0), (3_000, 30.0)],
        );
        let f = fired(&out);
        assert_eq!(
            f.iter().map(|f| (f.count, f.update)).collect::<Vec<_>>(),
            vec![(1, 0), (2, 1), (3, 2)]
        );
        assert_eq!(f[2].metric.as_ref().unwrap().avg, 20.0);
        assert!(out.events.iter().all(|e| e.id == out.events[0].id));
        // Past end + lateness (10 s + 5 s) the window is gone: the reading is late.
        let out = feed(&op, &mut state, &[(15_000, 1.0), (4_000, 1.0)]);
        assert_eq!((out.late, fired(&out).len()), (1, 0));
        assert_eq!(state.panes().len(), 1, "only [10 s, 20 s) is still held");
    }

    #[test]
    fn a_future_timestamp_is_quarantined_without_moving_the_watermark() {
        let op = tumbling(|c| {
            c.max_future_skew = Duration::from_secs(60);
            c.late_topic = Some("late".into());
        });
        let origin = origin("d1");
        let mut state = TimeWindowsState::default();
        let mut out = Output::default();
        let mut at = |ts: i64, arrival_ms: i64, out: &mut Output| {
            let mut r = reading(&origin, ts, &[Some(1.0)]);
            r.arrival_ms = arrival_ms;
            op.on_reading(&mut state, &r, out);
        };
        at(1_000, 1_000, &mut out);
        // A clock a day ahead: quarantined, and the device's next readings are still on time.
        at(86_400_000, 2_000, &mut out);
        at(3_000, 3_000, &mut out);
        assert_eq!((out.future, out.late), (1, 0));
        assert_eq!(late_reasons(&out), vec!["future"]);
        at(10_000, 10_000, &mut out);
        assert_eq!(bounds(&out), vec![(0, 10_000, 2)]);
    }

    #[test]
    fn idle_timeout_closes_a_silent_devices_window_with_no_reading_at_all() {
        let op = tumbling(|c| c.idle_timeout = Some(Duration::from_secs(30)));
        assert!(op.wants_ticks());
        let origin = origin("d1");
        let mut state = TimeWindowsState::default();
        let mut out = feed(&op, &mut state, &[(1_000, 5.0), (2_000, 7.0)]);
        op.on_tick(&mut state, &origin, 31_999, &mut out);
        assert!(out.events.is_empty(), "29.999 s of silence is not idle yet");
        op.on_tick(&mut state, &origin, 32_000, &mut out);
        let f = fired(&out);
        assert_eq!((f[0].start, f[0].end, f[0].count), (0, 10_000, 2));
        assert_eq!(f[0].closed_by, WindowClose::IdleTimeout);
        assert!(out.events[0].cause.is_none());
        // The watermark moved past the closed window: a straggler for it is late, not a
        // second window with the same id.
        let out = feed(&op, &mut state, &[(3_000, 1.0)]);
        assert_eq!((out.late, out.events.len()), (1, 0));
        let mut out = Output::default();
        op.on_tick(&mut state, &origin, 100_000, &mut out);
        assert!(out.events.is_empty(), "nothing open, nothing to close");
    }

    #[test]
    fn one_devices_skewed_clock_does_not_hold_back_another() {
        let op = tumbling(|_| {});
        let (d1, d2) = (origin("d1"), origin("d2"));
        let (mut s1, mut s2) = (TimeWindowsState::default(), TimeWindowsState::default());
        let mut out = Output::default();
        // d2's clock is an hour behind; d1's windows fire on d1's own watermark.
        op.on_reading(
            &mut s2,
            &reading(&d2, 1_000 - 3_600_000, &[Some(1.0)]),
            &mut out,
        );
        op.on_reading(&mut s1, &reading(&d1, 1_000, &[Some(2.0)]), &mut out);
        op.on_reading(&mut s1, &reading(&d1, 10_000, &[Some(3.0)]), &mut out);
        assert_eq!(out.events.len(), 1);
        assert_eq!(out.events[0].origin.device(), "d1");
    }

    #[test]
    fn the_condition_suppresses_windows_where_it_does_not_hold() {
        let op = tumbling(|c| c.when = Some("avg(temperature) > 30 and count >= 2".into()));
        let mut state = TimeWindowsState::default();
        let out = feed(
            &op,
            &mut state,
            &[
                (0, 31.0),
                (1_000, 33.0),
                (10_000, 40.0),
                (20_000, 10.0),
                (21_000, 10.0),
            ],
        );
        // [0,10): avg 32, 2 readings: emitted. [10,20): one reading: suppressed.
        assert_eq!(bounds(&out), vec![(0, 10_000, 2)]);
    }

    #[test]
    fn a_device_at_its_window_limit_refuses_readings_for_new_windows() {
        let op = tumbling(|c| {
            c.max_open_windows = 2;
            c.max_out_of_orderness = Duration::from_secs(3600);
        });
        let mut state = TimeWindowsState::default();
        let out = feed(
            &op,
            &mut state,
            &[(0, 1.0), (10_000, 1.0), (20_000, 1.0), (5_000, 2.0)],
        );
        assert_eq!(out.window_limit, 1);
        assert_eq!(state.panes().len(), 2);
        assert_eq!(state.panes()[0].readings, 2);
        assert_eq!(out.open_windows_delta, 2);
    }

    #[test]
    fn close_flushes_open_windows_as_partial_unless_kept() {
        let op = tumbling(|_| {});
        let origin = origin("d1");
        let mut state = TimeWindowsState::default();
        let mut out = feed(&op, &mut state, &[(1_000, 1.0)]);
        op.on_close(&mut state, &origin, &mut out);
        let f = fired(&out);
        assert_eq!((f.len(), f[0].closed_by), (1, WindowClose::Shutdown));
        assert!(out.events[0].cause.is_none());

        let keep = tumbling(|c| c.on_shutdown = crate::config::OnShutdown::Keep);
        let mut state = TimeWindowsState::default();
        let mut out = feed(&keep, &mut state, &[(1_000, 1.0)]);
        keep.on_close(&mut state, &origin, &mut out);
        assert!(out.events.is_empty());
        assert_eq!(state.panes().len(), 1, "kept for the state snapshot");
    }

    #[test]
    fn an_open_tumbling_window_of_one_metric_takes_under_200_bytes() {
        let op = tumbling(|_| {});
        let mut state = TimeWindowsState::default();
        feed(&op, &mut state, &[(1_000, 1.0)]);
        let bytes = state.panes()[0].bytes();
        println!("bytes per open tumbling window (one metric, no percentiles): {bytes}");
        assert!(bytes < 200, "{bytes}");
    }

    #[test]
    fn panes_go_back_inline_after_a_boundary_and_snapshot_as_a_plain_sequence() {
        use crate::operators::window::Pane;
        use serde::{Deserialize, Serialize};

        /// The state as written before the panes were kept inline.
        #[derive(Serialize, Deserialize)]
        struct Plain {
            panes: Vec<Pane>,
            watermark: Option<i64>,
            last_arrival_ms: i64,
        }
        use crate::operators::test_support::cbor;

        let op = tumbling(|_| {});
        let mut state = TimeWindowsState::default();
        let out = feed(
            &op,
            &mut state,
            &[(1_000, 1.0), (2_000, 2.0), (12_000, 3.0)],
        );
        assert_eq!(bounds(&out), vec![(0, 10_000, 2)]);
        assert_eq!(state.panes().len(), 1);
        assert!(!state.panes.spilled(), "the one pane left is inline again");
        let plain: Plain = ciborium::from_reader(&cbor(&state)[..]).unwrap();
        assert_eq!(cbor(&plain), cbor(&state));
        // Restored windows keep full accumulators (aggregates.rs), written the same.
        let restored: TimeWindowsState = ciborium::from_reader(&cbor(&plain)[..]).unwrap();
        assert_eq!(cbor(&restored), cbor(&state));
    }
}
