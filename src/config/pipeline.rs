//! `[pipeline]`: worker count and layout, channel capacity between stages, and the per-worker
//! device limit.

use super::duration;
use super::validate::Problems;
use serde::Deserialize;
use std::time::Duration;

/// Sizes of the stages between source and sink.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// Workers that run operators; devices are sharded across them by key hash. 0 means one
    /// per CPU core as tasks, and one when they run inline.
    #[serde(default)]
    pub workers: usize,
    /// Where the workers run: inline in the intake task, or as tasks of their own.
    #[serde(default)]
    pub layout: Layout,
    /// With inline workers, while readings arrive within a millisecond of each other: how long
    /// intake pauses after processing a socket read before it reads again, so that one wake-up
    /// takes several readings instead of one or two. A reading waits at most this long more;
    /// `0s` reads as soon as data arrives. Not with an input log (`at_least_once` and a state
    /// dir), whose acks the pause would hold up.
    #[serde(default = "default_read_pause", deserialize_with = "duration")]
    pub read_pause: Duration,
    /// Capacity of each bounded channel between stages (messages). When full, the stage before
    /// waits: backpressure reaches the broker connection rather than growing memory.
    #[serde(default = "default_queue_capacity")]
    pub queue_capacity: usize,
    /// Devices with state per worker; `when_device_limit` says what happens beyond it.
    #[serde(default = "default_max_devices")]
    pub max_devices_per_worker: usize,
    #[serde(default)]
    pub when_device_limit: DeviceLimitPolicy,
}

/// Where the workers run (`pipeline.layout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    /// Inline when the async runtime has one thread (the default on machines of two cores or
    /// fewer), tasks otherwise.
    #[default]
    Auto,
    /// In the intake task: each socket read's readings are processed to completion before the
    /// next read, with no hand-off between tasks. The least CPU per reading; the workers share
    /// one core with intake.
    Inline,
    /// Each worker a task of its own behind a bounded channel: workers use the cores in
    /// parallel, for rule sets heavier than one core's share.
    Tasks,
}

/// What a worker does with a new device when it already tracks `max_devices_per_worker`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceLimitPolicy {
    /// Forget the device least recently heard from (approximately: a clock sweep) and give its
    /// place to the new one; counted in `weir_devices_evicted_total`. A flood of new ids cannot
    /// grow memory, and real devices keep being served.
    #[default]
    EvictIdle,
    /// Refuse readings of new devices (counted, `reason="device_limit"`) until weir restarts.
    Refuse,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            workers: 0,
            layout: Layout::Auto,
            read_pause: default_read_pause(),
            queue_capacity: default_queue_capacity(),
            max_devices_per_worker: default_max_devices(),
            when_device_limit: DeviceLimitPolicy::default(),
        }
    }
}

fn default_queue_capacity() -> usize {
    4096
}
fn default_read_pause() -> Duration {
    Duration::from_micros(100)
}
fn default_max_devices() -> usize {
    100_000
}

/// The longest `read_pause`: beyond it the pause costs more latency than a wake-up saves.
const MAX_READ_PAUSE: Duration = Duration::from_millis(1);

pub(super) fn check_pipeline(pipeline: &PipelineConfig, problems: &mut Problems) {
    if pipeline.queue_capacity == 0 {
        problems.add(
            "pipeline.queue_capacity",
            "must be at least 1; 4096 suits most gateways",
        );
    }
    if pipeline.workers > 256 {
        problems.add(
            "pipeline.workers",
            "must be at most 256; use 0 for one worker per core",
        );
    }
    if pipeline.read_pause > MAX_READ_PAUSE {
        problems.add(
            "pipeline.read_pause",
            "must be at most 1ms: every reading may wait this long; 100us suits most gateways",
        );
    }
    if pipeline.max_devices_per_worker == 0 {
        problems.add("pipeline.max_devices_per_worker", "must be at least 1");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{parse, Overrides, EXAMPLE};
    use std::path::Path;

    #[test]
    fn a_read_pause_over_a_millisecond_is_refused_at_its_line() {
        let text = EXAMPLE.replace(r#"read_pause = "100us""#, r#"read_pause = "5ms""#);
        let err = parse(&text, Path::new("example.toml"), &Overrides::default()).unwrap_err();
        let problems = err.problems();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].path, "pipeline.read_pause");
        assert!(problems[0].message.contains("at most 1ms"));
        let line = text
            .lines()
            .position(|l| l.starts_with("read_pause"))
            .unwrap()
            + 1;
        assert_eq!(problems[0].line_col.map(|lc| lc.0), Some(line));
    }

    #[test]
    fn the_layout_and_the_pause_have_defaults_and_read_their_values() {
        let config = parse(EXAMPLE, Path::new("example.toml"), &Overrides::default()).unwrap();
        assert_eq!(config.pipeline.layout, Layout::Auto);
        assert_eq!(config.pipeline.read_pause, Duration::from_micros(100));
        let text = EXAMPLE.replace(
            r#"read_pause = "100us""#,
            "read_pause = \"0s\"\nlayout = \"tasks\"",
        );
        let config = parse(&text, Path::new("example.toml"), &Overrides::default()).unwrap();
        assert_eq!(config.pipeline.layout, Layout::Tasks);
        assert!(config.pipeline.read_pause.is_zero());
        // Inline workers default to one; tasks to one per core; a number is kept either way.
        assert_eq!(config.worker_count(true), 1);
        let mut config = config;
        config.pipeline.workers = 3;
        assert_eq!(
            (config.worker_count(true), config.worker_count(false)),
            (3, 3)
        );
    }
}
