//! `[cluster]`: reading telemetry from a NATS JetStream stream instead of an MQTT subscription,
//! so that several weir processes can share a fleet. Devices keep publishing over MQTT (to the
//! NATS server's MQTT listener); the server maps each reading's subject to a partition
//! (`<prefix>.<partition>.<topic with / as .>`, by `fnv1a32(device) % partitions`, the same
//! function as its `partition()` mapping), and the stream keeps them for replay.

use super::duration;
use super::validate::Problems;
use serde::Deserialize;
use std::path::PathBuf;
use std::time::Duration;

/// The `[cluster]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// NATS server URLs (`nats://host:4222`, `tls://host:4222`); several for a NATS cluster.
    pub servers: Vec<String>,
    /// A NATS credentials file (JWT and NKey seed), read at start.
    pub credentials_file: Option<PathBuf>,
    /// PEM file of the CA certificates that sign the servers' certificates (TLS).
    pub ca_file: Option<PathBuf>,
    /// The stream holding the partitioned readings.
    #[serde(default = "default_stream")]
    pub stream: String,
    /// The first subject token of a partitioned reading: `weir.17.sensors.plant-1.dev-7.telemetry`.
    #[serde(default = "default_prefix")]
    pub subject_prefix: String,
    /// The fixed partition count P; a device's partition is `fnv1a32(device) % P`. Changing it
    /// moves every device: choose it once, well above the largest instance count.
    #[serde(default = "default_partitions")]
    pub partitions: u32,
    /// The stream that captures derived events published to `nats` sinks.
    #[serde(default = "default_output_stream")]
    pub output_stream: String,
    /// Stream replicas (1 on one server; 3 on a 3-server NATS cluster).
    #[serde(default = "default_replicas")]
    pub replicas: usize,
    /// How long a member's heartbeat and a partition's claim live without renewal: a dead
    /// instance's partitions move after this. An instance trusts its claims for 3/4 of it.
    #[serde(default = "default_lease_ttl", deserialize_with = "duration")]
    pub lease_ttl: Duration,
    /// The output stream's duplicate window: an event re-emitted within it (same `Nats-Msg-Id`)
    /// is dropped by the server.
    #[serde(default = "default_dedup_window", deserialize_with = "duration")]
    pub dedup_window: Duration,
    /// This instance's name among the members (letters, digits, `-`, `_`); by default the host
    /// name and the process id, so a restarted process joins as a new member.
    pub member: Option<String>,
}

fn default_stream() -> String {
    "WEIR_READINGS".into()
}
fn default_prefix() -> String {
    "weir".into()
}
fn default_partitions() -> u32 {
    64
}
fn default_output_stream() -> String {
    "WEIR_EVENTS".into()
}
fn default_replicas() -> usize {
    1
}
fn default_lease_ttl() -> Duration {
    Duration::from_secs(10)
}
fn default_dedup_window() -> Duration {
    Duration::from_secs(120)
}

impl ClusterConfig {
    /// The subjects the readings stream captures: every partition's.
    pub fn stream_subject(&self) -> String {
        format!("{}.*.>", self.subject_prefix)
    }

    /// This instance's member name: `member`, or `<host name>-<pid>`.
    pub fn member_name(&self) -> String {
        if let Some(member) = &self.member {
            return member.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let host: String = host
            .trim()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '-'
                }
            })
            .collect();
        let host = if host.is_empty() {
            "weir".to_owned()
        } else {
            host
        };
        format!("{host}-{}", std::process::id())
    }

    /// The subject filter of partition `partition`.
    pub fn partition_subject(&self, partition: u32) -> String {
        format!("{}.{partition}.>", self.subject_prefix)
    }
}

/// The partition of `device`: FNV-1a (32 bit) of its bytes, modulo `partitions`, as NATS's
/// `partition()` subject mapping computes it for one token.
pub fn partition_of(device: &str, partitions: u32) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in device.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash % partitions.max(1)
}

/// Splits a partitioned subject (`weir.17.sensors.plant-1.dev-7.telemetry`) into its partition
/// and the MQTT topic it came from (`sensors/plant-1/dev-7/telemetry`).
pub fn split_subject(prefix: &str, subject: &str) -> Option<(u32, String)> {
    let rest = subject.strip_prefix(prefix)?.strip_prefix('.')?;
    let (partition, topic) = rest.split_once('.')?;
    Some((partition.parse().ok()?, subject_to_topic(topic)))
}

/// An MQTT topic as NATS's MQTT listener writes it as a subject: `/` becomes `.` (a `.` inside a
/// level is written `//`).
pub fn topic_to_subject(topic: &str) -> String {
    let mut subject = String::with_capacity(topic.len() + 4);
    for c in topic.chars() {
        match c {
            '/' => subject.push('.'),
            '.' => subject.push_str("//"),
            c => subject.push(c),
        }
    }
    subject
}

/// The reverse of [`topic_to_subject`].
pub fn subject_to_topic(subject: &str) -> String {
    subject
        .replace("//", "\u{0}")
        .replace('.', "/")
        .replace('\u{0}', ".")
}

/// The longest span of event time any rule of the config text keeps state over (windows,
/// lateness, hold times, timeouts): the stream must keep readings at least this long, plus the
/// snapshot interval, for a new owner to rebuild a partition from a snapshot and the stream.
pub fn state_horizon(rules: &toml::Table) -> Duration {
    fn walk(value: &toml::Value, longest: &mut Duration) {
        match value {
            toml::Value::String(text) => {
                if let Ok(span) = humantime::parse_duration(text) {
                    *longest = (*longest).max(span);
                }
            }
            toml::Value::Table(table) => table.values().for_each(|v| walk(v, longest)),
            toml::Value::Array(items) => items.iter().for_each(|v| walk(v, longest)),
            _ => {}
        }
    }
    let mut longest = Duration::ZERO;
    for value in rules.values() {
        walk(value, &mut longest);
    }
    longest
}

pub(super) fn check_cluster(cluster: &ClusterConfig, problems: &mut Problems) {
    if cluster.servers.is_empty() {
        problems.add(
            "cluster.servers",
            "name at least one NATS server, e.g. servers = [\"nats://127.0.0.1:4222\"]",
        );
    }
    for server in &cluster.servers {
        let scheme = server.split_once("://").map(|(scheme, _)| scheme);
        if !matches!(scheme, Some("nats" | "tls")) {
            problems.add(
                "cluster.servers",
                format!(
                    "`{}` is not a NATS URL; write nats://host:4222 (or tls://host:4222)",
                    super::redact_url(server)
                ),
            );
        }
    }
    if !(1..=1024).contains(&cluster.partitions) {
        problems.add("cluster.partitions", "must be between 1 and 1024, e.g. 64");
    }
    let token_ok = |name: &str| {
        !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    };
    if !token_ok(&cluster.subject_prefix) {
        problems.add(
            "cluster.subject_prefix",
            "must be one subject token (letters, digits, `_`, `-`), e.g. \"weir\"",
        );
    }
    for (key, name) in [
        ("cluster.stream", &cluster.stream),
        ("cluster.output_stream", &cluster.output_stream),
    ] {
        if !token_ok(name) {
            problems.add(key, "must be a stream name (letters, digits, `_`, `-`)");
        }
    }
    if cluster.stream == cluster.output_stream {
        problems.add(
            "cluster.output_stream",
            "must differ from cluster.stream: readings and events are kept apart",
        );
    }
    if cluster.lease_ttl < Duration::from_secs(2) || cluster.lease_ttl > Duration::from_secs(300) {
        problems.add(
            "cluster.lease_ttl",
            "must be between 2s and 5m: a dead instance's partitions move after it",
        );
    }
    if !matches!(cluster.replicas, 1 | 3 | 5) {
        problems.add("cluster.replicas", "must be 1, 3 or 5");
    }
    if let Some(member) = &cluster.member {
        let ok = !member.is_empty()
            && member.len() <= 64
            && member
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !ok {
            problems.add(
                "cluster.member",
                "must be 1 to 64 letters, digits, `-` or `_`, e.g. \"hub-a\"",
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_partition_is_the_one_nats_partition_mapping_gives() {
        // Seen from nats-server 2.9.10 with the mapping
        // "sensors.*.*.telemetry" -> "weir.{{partition(64,2)}}.sensors.{{wildcard(1)}}.{{wildcard(2)}}.telemetry".
        assert_eq!(partition_of("dev-7", 64), 28);
        assert_eq!(partition_of("dev-8", 64), 33);
    }

    #[test]
    fn a_partitioned_subject_gives_back_its_topic() {
        assert_eq!(
            split_subject("weir", "weir.28.sensors.plant-1.dev-7.telemetry"),
            Some((28, "sensors/plant-1/dev-7/telemetry".to_owned()))
        );
        assert_eq!(split_subject("weir", "other.28.x"), None);
        assert_eq!(topic_to_subject("a/b.c/d"), "a.b//c.d");
        assert_eq!(subject_to_topic("a.b//c.d"), "a/b.c/d");
    }

    #[test]
    fn the_horizon_is_the_longest_span_in_the_rules() {
        let rules: toml::Table = toml::from_str(
            "[a.tumbling]\nsize = \"10s\"\nallowed_lateness = \"2m\"\n[b.liveness]\ntimeout = \"30s\"\n[b.output]\ntopic = \"x\"\n",
        )
        .unwrap();
        assert_eq!(state_horizon(&rules), Duration::from_secs(120));
    }
}
