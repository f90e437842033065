//! Semantic checks on a parsed config: every problem is collected with its path, so one run of
//! `weir check` reports them all.

use super::{
    BrokerConfig, Config, DeliveryMode, HysteresisConfig, InputConfig, RuleConfig, TumblingConfig,
};
use crate::mqtt::BrokerEndpoint;
use crate::topic::{TopicPattern, TopicTemplate};
use std::time::Duration;

/// One semantic problem: the dotted path of the key and a sentence saying what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub message: String,
}

#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            path: path.into(),
            message: message.into(),
        });
    }
}

/// Checks what serde cannot: ranges, cross-references, and values a dependency would panic on.
pub fn validate(config: &Config) -> Vec<Problem> {
    let mut problems = Problems::default();
    check_broker(&config.broker, &mut problems);
    if config.pipeline.queue_capacity == 0 {
        problems.add(
            "pipeline.queue_capacity",
            "must be at least 1; 4096 suits most gateways",
        );
    }
    if config.pipeline.workers > 256 {
        problems.add(
            "pipeline.workers",
            "must be at most 256; use 0 for one worker per core",
        );
    }
    if config.pipeline.max_devices_per_worker == 0 {
        problems.add("pipeline.max_devices_per_worker", "must be at least 1");
    }
    check_delivery(config, &mut problems);
    if config.inputs.is_empty() {
        problems.add(
            "inputs",
            "define at least one input, e.g. [inputs.telemetry] with topic = \"sensors/{site}/{device}/telemetry\"",
        );
    }
    for (name, input) in &config.inputs {
        check_input(
            &format!("inputs.{name}"),
            input,
            config.broker.max_packet_bytes,
            &mut problems,
        );
    }
    if config.rules.is_empty() {
        problems.add(
            "rules",
            "define at least one rule, e.g. [rules.overheat] with a [rules.overheat.hysteresis] table",
        );
    }
    for (name, rule) in &config.rules {
        check_rule(config, name, rule, &mut problems);
    }
    problems.0
}

fn check_delivery(config: &Config, problems: &mut Problems) {
    let delivery = &config.delivery;
    if delivery.mode == DeliveryMode::AtLeastOnce {
        if delivery.state_dir.is_none() {
            problems.add(
                "delivery.mode",
                "at_least_once acknowledges inputs only once they are on disk; set delivery.state_dir (or pass --state-dir)",
            );
        }
        if config.broker.clean_session {
            problems.add(
                "broker.clean_session",
                "must be false under at_least_once, so the broker keeps unacknowledged messages across reconnects",
            );
        }
        for (name, input) in &config.inputs {
            if input.qos == Some(0) {
                problems.add(
                    format!("inputs.{name}.qos"),
                    "is 0, which at_least_once cannot keep; remove it (1 is the default) or use mode = \"at_most_once\"",
                );
            }
        }
        for (name, rule) in &config.rules {
            if rule.output.qos == Some(0) {
                problems.add(
                    format!("rules.{name}.output.qos"),
                    "is 0, which at_least_once cannot keep; remove it (1 is the default) or use mode = \"at_most_once\"",
                );
            }
        }
    }
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
    if let Some(topic) = &config.dead_letter.topic {
        if topic.is_empty() || topic.contains(['+', '#']) {
            problems.add(
                "dead_letter.topic",
                "must be a topic without wildcards, e.g. \"weir/dead-letter/{input}/{reason}\"",
            );
        }
    }
}

fn check_broker(broker: &BrokerConfig, problems: &mut Problems) {
    if let Err(message) = BrokerEndpoint::parse(&broker.url) {
        problems.add("broker.url", message);
    }
    // rumqttc asserts that keep-alive is at least one second.
    if broker.keep_alive < Duration::from_secs(1) {
        problems.add(
            "broker.keep_alive",
            "must be at least 1s (MQTT counts keep-alive in whole seconds); 30s is a good default",
        );
    }
    if broker.keep_alive > Duration::from_secs(u16::MAX as u64) {
        problems.add("broker.keep_alive", "must be at most 65535s");
    }
    if broker.client_id.trim().is_empty() {
        problems.add(
            "broker.client_id",
            "must not be empty: a persistent session is found by its client id",
        );
    }
    if broker.client_id.len() > 200 {
        problems.add("broker.client_id", "must be at most 200 bytes");
    }
    if broker.max_packet_bytes < 1024 {
        problems.add(
            "broker.max_packet_bytes",
            "must be at least 1024 bytes; 262144 suits most telemetry",
        );
    }
    if broker.password.is_some() && broker.password_file.is_some() {
        problems.add(
            "broker.password_file",
            "is set together with password; keep one of them (password_file keeps the secret out of the config)",
        );
    }
    if broker.password.is_some() && broker.username.is_none() {
        problems.add(
            "broker.password",
            "is set without a username; MQTT sends a password only with a username",
        );
    }
    if broker.password_file.is_some() && broker.username.is_none() {
        problems.add(
            "broker.password_file",
            "is set without a username; MQTT sends a password only with a username",
        );
    }
    let tls = broker.url.starts_with("mqtts://");
    for (key, value) in [
        ("ca_file", &broker.ca_file),
        ("cert_file", &broker.cert_file),
        ("key_file", &broker.key_file),
    ] {
        if value.is_some() && !tls {
            problems.add(
                format!("broker.{key}"),
                format!("is only used with TLS; use an mqtts:// url or remove {key}"),
            );
        }
    }
    match (&broker.cert_file, &broker.key_file) {
        (Some(_), None) => problems.add(
            "broker.cert_file",
            "needs key_file too: a client certificate is presented with its private key",
        ),
        (None, Some(_)) => problems.add(
            "broker.key_file",
            "needs cert_file too: a private key is presented with its client certificate",
        ),
        _ => {}
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
    }
}

fn check_rule(config: &Config, name: &str, rule: &RuleConfig, problems: &mut Problems) {
    let path = format!("rules.{name}");
    if name.is_empty() || name.contains(['/', '+', '#']) {
        problems.add(
            &path,
            "a rule name must be non-empty and free of `/`, `+` and `#` (it can appear in topics)",
        );
    }
    let input = match (&rule.input, config.inputs.len()) {
        (Some(input_name), _) => match config.inputs.get(input_name) {
            Some(input) => Some(input),
            None => {
                let known: Vec<&str> = config.inputs.keys().map(String::as_str).collect();
                problems.add(
                    format!("{path}.input"),
                    format!(
                        "there is no input named `{input_name}`; known inputs: {}",
                        known.join(", ")
                    ),
                );
                None
            }
        },
        (None, 1) => config.inputs.values().next(),
        (None, _) => {
            problems.add(
                format!("{path}.input"),
                "is required when there is more than one input; name the input this rule reads",
            );
            None
        }
    };

    let kinds = [
        rule.hysteresis.is_some().then_some("hysteresis"),
        rule.tumbling.is_some().then_some("tumbling"),
    ];
    let chosen: Vec<&str> = kinds.into_iter().flatten().collect();
    match chosen.len() {
        0 => problems.add(
            &path,
            "has no operator; add one table such as [rules.NAME.hysteresis] or [rules.NAME.tumbling]",
        ),
        1 => {}
        _ => problems.add(
            &path,
            format!(
                "has {} operators ({}); a rule has exactly one, so split it into several rules",
                chosen.len(),
                chosen.join(", ")
            ),
        ),
    }
    if let Some(h) = &rule.hysteresis {
        check_hysteresis(&format!("{path}.hysteresis"), h, problems);
    }
    if let Some(t) = &rule.tumbling {
        check_tumbling(&format!("{path}.tumbling"), t, problems);
    }

    let output = &rule.output;
    if output.qos.is_some_and(|qos| qos > 1) {
        problems.add(format!("{path}.output.qos"), "must be 0 or 1");
    }
    if let Some(input) = input {
        if let Ok(pattern) = TopicPattern::parse(&input.topic) {
            if let Err(err) = TopicTemplate::parse(&output.topic, &pattern) {
                problems.add(format!("{path}.output.topic"), err.0);
            }
        }
    }
}

fn check_hysteresis(path: &str, h: &HysteresisConfig, problems: &mut Problems) {
    if h.metric.is_empty() {
        problems.add(format!("{path}.metric"), "must name a payload field");
    }
    if !h.enter_above.is_finite() {
        problems.add(format!("{path}.enter_above"), "must be a finite number");
    }
    if !h.exit_below.is_finite() {
        problems.add(format!("{path}.exit_below"), "must be a finite number");
    }
    if h.exit_below >= h.enter_above {
        problems.add(
            format!("{path}.exit_below"),
            format!(
                "must be below enter_above ({:?}); the gap between them is the hysteresis band",
                h.enter_above
            ),
        );
    }
    if h.active == h.inactive {
        problems.add(
            format!("{path}.inactive"),
            format!("must differ from active (`{}`)", h.active),
        );
    }
    if let Some(initial) = &h.initial {
        if initial != &h.active && initial != &h.inactive {
            problems.add(
                format!("{path}.initial"),
                format!(
                    "`{initial}` is not a state of this rule; use `{}` or `{}`",
                    h.inactive, h.active
                ),
            );
        }
    }
}

fn check_tumbling(path: &str, t: &TumblingConfig, problems: &mut Problems) {
    if t.size < Duration::from_millis(1) {
        problems.add(format!("{path}.size"), "must be at least 1ms");
    }
    if t.metrics.is_empty() {
        problems.add(
            format!("{path}.metrics"),
            "list at least one payload field, e.g. metrics = [\"temperature\"]",
        );
    }
    if t.aggregates.is_empty() {
        problems.add(
            format!("{path}.aggregates"),
            "list at least one of count, sum, min, max, avg",
        );
    }
}
