//! `[inputs.NAME]`: the topic patterns weir subscribes to, the device segment, the payload
//! [`Format`] and where a payload keeps its event time.

use super::duration;
use super::topic::TopicPattern;
use super::validate::Problems;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::time::Duration;

/// Payload encodings weir reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Json,
    Cbor,
    /// Inputs only: the whole payload is one UTF-8 string, read as the field `payload` (e.g. a
    /// retained status or last-will message such as `offline`).
    Text,
    /// Inputs only: a SenML pack (RFC 8428) in JSON; records at one time form one reading.
    Senml,
    /// Inputs only: a SenML pack in CBOR, with the RFC's integer labels.
    #[serde(rename = "senml_cbor")]
    SenmlCbor,
}

/// One subscribed topic pattern and how to read its payloads.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputConfig {
    /// Topic pattern with named segments, e.g. `sensors/{site}/{device}/telemetry`.
    pub topic: String,
    /// The named segment that identifies the device (the key of all per-device state).
    #[serde(default = "default_device_segment")]
    pub device: String,
    #[serde(default = "default_format")]
    pub format: Format,
    /// QoS of the subscription (0 or 1); 1 under `at_least_once`, 0 otherwise, when absent.
    pub qos: Option<u8>,
    /// Where the event time is in the payload; arrival time is used when absent.
    pub time: Option<TimeConfig>,
    /// Payload field with a per-device sequence number, copied into each event's `cause` and used
    /// to recognise redelivered inputs.
    pub seq_field: Option<String>,
    /// Larger payloads are dead-lettered (reason `too_large`) without being decoded.
    #[serde(default = "default_max_payload_bytes")]
    pub max_payload_bytes: usize,
    /// A reading whose event time is further ahead of the gateway's clock than this is
    /// dead-lettered (reason `future_timestamp`): one bad device clock must not push its
    /// watermark into the future and make every later reading late.
    #[serde(default = "default_max_clock_skew", deserialize_with = "duration")]
    pub max_clock_skew: Duration,
}

/// The payload field carrying the event time, and its unit.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeConfig {
    pub field: String,
    pub unit: TimeUnit,
}

/// Unit of a timestamp field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TimeUnit {
    S,
    Ms,
    Us,
    Ns,
    /// An RFC 3339 string such as `2024-11-26T05:46:40.5Z`.
    Rfc3339,
}

fn default_max_clock_skew() -> Duration {
    Duration::from_secs(3600)
}
fn default_max_payload_bytes() -> usize {
    64 * 1024
}
fn default_device_segment() -> String {
    "device".into()
}

/// Also the default of a rule output's format.
pub(super) fn default_format() -> Format {
    Format::Json
}

/// `max_packet_bytes` is the broker's: each input's payload limit stays below it, so an oversized
/// payload is dead-lettered instead of breaking the connection.
pub(super) fn check_inputs(
    inputs: &BTreeMap<String, InputConfig>,
    max_packet_bytes: usize,
    problems: &mut Problems,
) {
    if inputs.is_empty() {
        problems.add(
            "inputs",
            "define at least one input, e.g. [inputs.telemetry] with topic = \"sensors/{site}/{device}/telemetry\"",
        );
    }
    for (name, input) in inputs {
        check_input(&format!("inputs.{name}"), input, max_packet_bytes, problems);
    }
}

fn check_input(path: &str, input: &InputConfig, max_packet_bytes: usize, problems: &mut Problems) {
    match TopicPattern::parse(&input.topic) {
        Ok(pattern) => {
            if pattern.name_index(&input.device).is_none() {
                problems.add(
                    format!("{path}.device"),
                    format!(
                        "`{}` is not a named segment of `{}`; name the level that identifies the device, e.g. `{{device}}`",
                        input.device, input.topic
                    ),
                );
            }
        }
        Err(err) => problems.add(format!("{path}.topic"), err.0),
    }
    if input.max_payload_bytes == 0 {
        problems.add(format!("{path}.max_payload_bytes"), "must be at least 1");
    }
    if input.max_payload_bytes >= max_packet_bytes {
        problems.add(
            format!("{path}.max_payload_bytes"),
            format!(
                "must be below broker.max_packet_bytes ({max_packet_bytes}): a larger packet breaks the connection instead of being dead-lettered"
            ),
        );
    }
    if input.qos.is_some_and(|qos| qos > 1) {
        problems.add(
            format!("{path}.qos"),
            "must be 0 or 1; weir deduplicates itself, so QoS 2 buys nothing",
        );
    }
    if let Some(time) = &input.time {
        if time.field.is_empty() {
            problems.add(format!("{path}.time.field"), "must name a payload field");
        }
        if input.format == Format::Text {
            problems.add(
                format!("{path}.time"),
                "a text payload is one string and has no time field; remove [time] (arrival time is used)",
            );
        }
        if matches!(input.format, Format::Senml | Format::SenmlCbor) {
            problems.add(
                format!("{path}.time"),
                "SenML records carry their own time (bt + t); remove [time]",
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::test_support::problem_after;

    #[test]
    fn device_segment_must_be_in_the_pattern() {
        let (problem, _) = problem_after("device = \"device\"", "device = \"sensor\"");
        assert_eq!(problem.path, "inputs.telemetry.device");
    }

    #[test]
    fn qos_2_is_refused() {
        let (problem, _) = problem_after("seq_field = \"seq\"", "qos = 2\nseq_field = \"seq\"");
        assert_eq!(problem.path, "inputs.telemetry.qos");
    }
}
