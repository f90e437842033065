//! The shape of a snapshot: every device's operator state and dedup horizon, and the outbox, as of
//! one LSN of the input log. The engine makes it (workers and the outbox), the store writes and
//! loads it.

use serde::{Deserialize, Serialize};

/// Everything needed to resume at [`Snapshot::lsn`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The first LSN this snapshot does not cover: recovery replays the log from here.
    pub lsn: u64,
    pub devices: Vec<DeviceSnapshot>,
    /// Events derived but not yet acknowledged by the broker, in publish order.
    pub outbox: Vec<StoredMessage>,
    /// The definition of each rule the state was made by (its fingerprint). Empty in snapshots
    /// written before rules had fingerprints; their states are restored by name alone.
    #[serde(default)]
    pub rules: Vec<(String, u64)>,
}

/// One device's state in every rule that has some.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeviceSnapshot {
    pub input: u16,
    pub device: String,
    /// The device's latest topic (its origin is rebuilt from it).
    pub topic: String,
    /// (rule name, CBOR-encoded operator state).
    pub rules: Vec<(String, Vec<u8>)>,
    /// What the device's recent readings were (to recognise redeliveries after the restart).
    pub recent: super::dedup::Recent,
}

/// A derived event not yet acknowledged by the broker.
///
/// The fields after `rule` are its MQTT 5 properties. They are optional, so a snapshot written
/// before they existed still loads (and one written with them has no new required field).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredMessage {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: u8,
    pub retain: bool,
    pub rule: String,
    /// The event id (correlation data); absent for dead letters. The content type is not
    /// stored: the rule's format gives it (JSON for dead letters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    /// The event's own span, as a W3C `traceparent`, so a republished event keeps its span id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracestate: Option<String>,
    /// The sink it is for, by name; empty for the broker's (and in snapshots from before there
    /// were other sinks).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sink: String,
    /// Its table (postgres sinks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<String>,
}

/// What the snapshot writer is asked to do.
#[derive(Debug)]
pub enum SnapshotCommand {
    /// One sink's part of a snapshot: the devices (from the broker's sink; the others send
    /// none) and that sink's outbox. The writer writes the snapshot once every sink's part for
    /// its LSN has come.
    Write(Snapshot),
    /// At shutdown, once sink `sink` (a name, empty for the broker's) has drained: its events
    /// that the snapshot at `lsn` held and that are still unacknowledged. Rewriting its part of
    /// the outbox keeps a clean restart from delivering again events the service already has.
    ReplaceOutbox {
        lsn: u64,
        sink: String,
        outbox: Vec<StoredMessage>,
    },
}
