//! `[pipeline]`: worker count, channel capacity between stages, and the per-worker device limit.

use super::validate::Problems;
use serde::Deserialize;

/// Sizes of the stages between source and sink.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// Worker tasks that run operators; devices are sharded across them by key hash.
    /// 0 means one per CPU core.
    #[serde(default)]
    pub workers: usize,
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
            queue_capacity: default_queue_capacity(),
            max_devices_per_worker: default_max_devices(),
            when_device_limit: DeviceLimitPolicy::default(),
        }
    }
}

fn default_queue_capacity() -> usize {
    4096
}
fn default_max_devices() -> usize {
    100_000
}

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
    if pipeline.max_devices_per_worker == 0 {
        problems.add("pipeline.max_devices_per_worker", "must be at least 1");
    }
}
