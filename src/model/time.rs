//! The wall clock, read in one place. Operators never read it: time is passed in, so replay can
//! run them on a virtual clock.

use std::time::{SystemTime, UNIX_EPOCH};

/// Wall-clock ms since the epoch, the arrival time of a reading.
pub fn wall_clock_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
