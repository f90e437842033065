//! Hopping windows: event-time windows of `size` starting every `slide`, aligned to the epoch, so
//! a reading belongs to `size / slide` windows when the slide divides the size. Each window
//! fires like a tumbling one (see [`super`]).

use super::{Assigner, TimeWindows, WindowSpec};

/// The assigner: every window `[k * slide, k * slide + size)` holding the timestamp.
#[derive(Debug, Clone)]
pub struct HoppingAssigner {
    size_ms: i64,
    slide_ms: i64,
}

impl Assigner for HoppingAssigner {
    fn assign(&self, ts: i64, mut f: impl FnMut(i64, i64)) {
        let last = ts - ts.rem_euclid(self.slide_ms);
        // The oldest start whose window still holds ts: start > ts - size.
        let mut start = last;
        while start - self.slide_ms > ts - self.size_ms {
            start -= self.slide_ms;
        }
        while start <= last {
            f(start, start.saturating_add(self.size_ms));
            start += self.slide_ms;
        }
    }
}

/// A built hopping-window rule.
pub type Hopping = TimeWindows<HoppingAssigner>;

impl Hopping {
    pub fn new(spec: WindowSpec, size_ms: i64, slide_ms: i64) -> Self {
        TimeWindows::with(
            spec,
            HoppingAssigner {
                size_ms: size_ms.max(1),
                slide_ms: slide_ms.max(1),
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{bounds, config, fired, spec};
    use super::super::TimeWindowsState;
    use super::*;
    use crate::operators::test_support::{origin, reading};
    use crate::operators::{Operator, Output};
    use std::time::Duration;

    fn hopping(size_s: u64, slide_s: u64) -> Hopping {
        let config = config(|c| {
            c.size = Some(Duration::from_secs(size_s));
            c.slide = Some(Duration::from_secs(slide_s));
        });
        Hopping::new(spec(&config), size_s as i64 * 1000, slide_s as i64 * 1000)
    }

    fn windows_of(op: &Hopping, ts: i64) -> Vec<(i64, i64)> {
        let mut found = Vec::new();
        op.assigner.assign(ts, |s, e| found.push((s, e)));
        found
    }

    #[test]
    fn a_reading_belongs_to_size_over_slide_windows_oldest_first() {
        let op = hopping(10, 5);
        assert_eq!(windows_of(&op, 7_000), vec![(0, 10_000), (5_000, 15_000)]);
        assert_eq!(windows_of(&op, 5_000), vec![(0, 10_000), (5_000, 15_000)]);
        assert_eq!(windows_of(&op, -1_000), vec![(-10_000, 0), (-5_000, 5_000)]);
        let op = hopping(10, 3);
        assert_eq!(
            windows_of(&op, 9_500),
            vec![
                (0, 10_000),
                (3_000, 13_000),
                (6_000, 16_000),
                (9_000, 19_000)
            ]
        );
    }

    #[test]
    fn overlapping_windows_each_fire_at_their_own_end() {
        let op = hopping(10, 5);
        let origin = origin("d1");
        let mut state = TimeWindowsState::default();
        let mut out = Output::default();
        for (ts, v) in [(1_000, 1.0), (6_000, 2.0), (11_000, 3.0), (16_000, 4.0)] {
            op.on_reading(&mut state, &reading(&origin, ts, &[Some(v)]), &mut out);
        }
        // Watermark 16 s: [-5,5) [0,10) [5,15) fired; [10,20) [15,25) still open.
        assert_eq!(
            bounds(&out),
            vec![(-5_000, 5_000, 1), (0, 10_000, 2), (5_000, 15_000, 2)]
        );
        let avgs: Vec<f64> = fired(&out)
            .iter()
            .map(|f| f.metric.as_ref().unwrap().avg)
            .collect();
        assert_eq!(avgs, vec![1.0, 1.5, 2.5]);
    }

    #[test]
    fn a_reading_late_for_its_older_window_still_counts_in_the_newer_one() {
        let op = hopping(10, 5);
        let origin = origin("d1");
        let mut state = TimeWindowsState::default();
        let mut out = Output::default();
        for (ts, v) in [(1_000, 1.0), (11_000, 3.0), (9_000, 5.0), (15_000, 0.0)] {
            op.on_reading(&mut state, &reading(&origin, ts, &[Some(v)]), &mut out);
        }
        // 9 s is late for [0,10) (fired at 11 s) but on time for [5,15).
        assert_eq!(out.late, 1);
        assert_eq!(bounds(&out).last(), Some(&(5_000, 15_000, 2)));
    }
}
