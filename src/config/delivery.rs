//! `[delivery]` and `[dead_letter]`: the delivery guarantee, the state dir, the outbox, and where
//! inputs that cannot become readings are published. What `at_least_once` asks of the other
//! sections is checked in `validate.rs`.

use super::duration;
use super::validate::Problems;
use serde::Deserialize;
use std::path::PathBuf;
use std::time::Duration;

/// What weir promises about each reading and event, and where it keeps state.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryConfig {
    #[serde(default)]
    pub mode: DeliveryMode,
    /// Where operator state, the input log and the outbox survive restarts. Required by
    /// `at_least_once`; optional (state snapshots only) with `at_most_once`.
    pub state_dir: Option<PathBuf>,
    /// When a logged input is acknowledged: `fsync` (after the group fsync that covers it;
    /// survives a power cut) or `write` (once written to the OS; survives a crash of weir, and
    /// the log is fsynced every `fsync_interval`).
    #[serde(default)]
    pub ack_after: AckAfterConfig,
    /// With `ack_after = "write"`: how often the input log is fsynced.
    #[serde(default = "default_fsync_interval", deserialize_with = "duration")]
    pub fsync_interval: Duration,
    /// How often operator state is snapshotted (which also bounds the input log replayed at start).
    #[serde(default = "default_snapshot_interval", deserialize_with = "duration")]
    pub snapshot_interval: Duration,
    /// Payload hashes remembered per device to drop redelivered inputs that carry no sequence
    /// number (those with one use a fixed 64-wide window over it).
    #[serde(default = "default_dedup_horizon")]
    pub dedup_horizon: usize,
    /// Derived events held while the broker is away (or has not acknowledged them yet).
    #[serde(default = "default_outbox_max")]
    pub outbox_max_messages: usize,
    #[serde(default)]
    pub outbox_when_full: OutboxPolicy,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            mode: DeliveryMode::default(),
            state_dir: None,
            ack_after: AckAfterConfig::default(),
            fsync_interval: default_fsync_interval(),
            snapshot_interval: default_snapshot_interval(),
            dedup_horizon: default_dedup_horizon(),
            outbox_max_messages: default_outbox_max(),
            outbox_when_full: OutboxPolicy::default(),
        }
    }
}

/// The delivery guarantee.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryMode {
    /// QoS 0 in and out: fastest; a reading or event in flight during a crash or outage may be lost.
    #[default]
    AtMostOnce,
    /// QoS 1 in and out, persistent session, inputs acknowledged only once logged to the state
    /// dir: nothing acknowledged is lost; duplicates carry the same event id.
    AtLeastOnce,
}

/// When a logged input counts as durable (see `DeliveryConfig::ack_after`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AckAfterConfig {
    #[default]
    Fsync,
    Write,
}

/// What the outbox does when it is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutboxPolicy {
    /// Stop taking events from the workers: backpressure reaches intake, nothing is dropped.
    #[default]
    Block,
    /// Drop the oldest queued event to make room (counted).
    DropOldest,
    /// Drop the new event (counted).
    DropNewest,
}

/// Where inputs that cannot become readings are published.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterConfig {
    /// Topic for dead letters; `{input}` and `{reason}` are replaced. Dead letters are only
    /// counted and logged when absent.
    pub topic: Option<String>,
}

fn default_fsync_interval() -> Duration {
    Duration::from_millis(10)
}
fn default_snapshot_interval() -> Duration {
    Duration::from_secs(30)
}
fn default_dedup_horizon() -> usize {
    32
}
fn default_outbox_max() -> usize {
    100_000
}

pub(super) fn check_delivery(delivery: &DeliveryConfig, problems: &mut Problems) {
    if delivery.fsync_interval > Duration::from_secs(10) {
        problems.add(
            "delivery.fsync_interval",
            "must be at most 10s: inputs wait this long for their acknowledgement",
        );
    }
    if delivery.snapshot_interval < Duration::from_secs(1) {
        problems.add("delivery.snapshot_interval", "must be at least 1s");
    }
    if delivery.outbox_max_messages == 0 {
        problems.add("delivery.outbox_max_messages", "must be at least 1");
    }
}

pub(super) fn check_dead_letter(dead_letter: &DeadLetterConfig, problems: &mut Problems) {
    if let Some(topic) = &dead_letter.topic {
        if topic.is_empty() || topic.contains(['+', '#']) {
            problems.add(
                "dead_letter.topic",
                "must be a topic without wildcards, e.g. \"weir/dead-letter/{input}/{reason}\"",
            );
        }
    }
}
