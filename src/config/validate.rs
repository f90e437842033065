//! Semantic checks on a parsed config: every problem is collected with its path, so one run of
//! `weir check` reports them all.

use super::broker::check_broker;
use super::delivery::{check_dead_letter, check_delivery};
use super::inputs::check_inputs;
use super::observability::check_observability;
use super::pipeline::check_pipeline;
use super::topic::{TopicPattern, TopicTemplate};
use super::{
    AnomalyConfig, ChangeConfig, Config, DeadbandConfig, DeliveryMode, FlappingConfig, Format,
    HysteresisConfig, InputConfig, LivenessConfig, RateOfChangeConfig, RuleConfig, StuckConfig,
    ThresholdsConfig, WindowConfig,
};
use std::collections::BTreeMap;
use std::time::Duration;

/// One semantic problem: the dotted path of the key and a sentence saying what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub message: String,
    /// Byte offset inside the key's string value (e.g. a `when` condition), for the column.
    pub offset: Option<usize>,
}

/// Where the checks of every section put what they find, in the order found.
#[derive(Default)]
pub(super) struct Problems(Vec<Problem>);

impl Problems {
    pub(super) fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            path: path.into(),
            message: message.into(),
            offset: None,
        });
    }

    /// A problem at byte `offset` inside the key's string value.
    pub(super) fn add_at(
        &mut self,
        path: impl Into<String>,
        offset: usize,
        message: impl Into<String>,
    ) {
        self.0.push(Problem {
            path: path.into(),
            message: message.into(),
            offset: Some(offset),
        });
    }
}

/// Checks what serde cannot: ranges, cross-references, and values a dependency would panic on.
///
/// Problems come out in the order of these calls; `weir check` output and tests rely on it.
pub fn validate(config: &Config) -> Vec<Problem> {
    let mut problems = Problems::default();
    check_broker(&config.broker, &mut problems);
    check_pipeline(&config.pipeline, &mut problems);
    check_at_least_once(config, &mut problems);
    check_delivery(&config.delivery, &mut problems);
    check_dead_letter(&config.dead_letter, &mut problems);
    check_inputs(
        &config.inputs,
        config.broker.max_packet_bytes,
        &mut problems,
    );
    check_rules(&config.rules, &config.inputs, &mut problems);
    check_field_types(config, &mut problems);
    check_observability(&config.observability, &mut problems);
    problems.0
}

/// What `at_least_once` asks of the other sections: a state dir to log inputs to, a broker
/// session that outlives a reconnect, and QoS 1 on every subscription and publication.
fn check_at_least_once(config: &Config, problems: &mut Problems) {
    if config.delivery.mode != DeliveryMode::AtLeastOnce {
        return;
    }
    if config.delivery.state_dir.is_none() {
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

/// A payload field is read either as a number (metrics) or as a discrete value (change, status),
/// not both: one reading would fail the other rule's type check.
fn check_field_types(config: &Config, problems: &mut Problems) {
    for (name, rule) in &config.rules {
        let Some((input_name, _)) = config.input_of(rule) else {
            continue;
        };
        for field in rule.discrete_fields() {
            let numeric = config.rules.iter().find(|(_, other)| {
                config.input_of(other).map(|(i, _)| i) == Some(input_name)
                    && other.metrics().contains(&field)
            });
            if let Some((other, _)) = numeric {
                problems.add(
                    format!("rules.{name}"),
                    format!(
                        "field `{field}` is read as a discrete value here and as a number by rule `{other}` on the same input; a field has one type"
                    ),
                );
            }
        }
    }
}

fn check_rules(
    rules: &BTreeMap<String, RuleConfig>,
    inputs: &BTreeMap<String, InputConfig>,
    problems: &mut Problems,
) {
    if rules.is_empty() {
        problems.add(
            "rules",
            "define at least one rule, e.g. [rules.overheat] with a [rules.overheat.hysteresis] table",
        );
    }
    for (name, rule) in rules {
        check_rule(name, rule, inputs, problems);
    }
}

fn check_rule(
    name: &str,
    rule: &RuleConfig,
    inputs: &BTreeMap<String, InputConfig>,
    problems: &mut Problems,
) {
    let path = format!("rules.{name}");
    if name.is_empty() || name.contains(['/', '+', '#']) {
        problems.add(
            &path,
            "a rule name must be non-empty and free of `/`, `+` and `#` (it can appear in topics)",
        );
    }
    let input = match (&rule.input, inputs.len()) {
        (Some(input_name), _) => match inputs.get(input_name) {
            Some(input) => Some(input),
            None => {
                let known: Vec<&str> = inputs.keys().map(String::as_str).collect();
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
        (None, 1) => inputs.values().next(),
        (None, _) => {
            problems.add(
                format!("{path}.input"),
                "is required when there is more than one input; name the input this rule reads",
            );
            None
        }
    };

    let chosen = rule.operator_kinds();
    match chosen.len() {
        0 => problems.add(
            &path,
            "has no operator; add one table such as [rules.NAME.hysteresis], [rules.NAME.tumbling], [rules.NAME.deadband], [rules.NAME.change], [rules.NAME.liveness], [rules.NAME.rate_of_change], [rules.NAME.stuck], [rules.NAME.anomaly] or [rules.NAME.thresholds]",
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
    let windows = [
        ("tumbling", &rule.tumbling),
        ("hopping", &rule.hopping),
        ("session", &rule.session),
        ("count", &rule.count),
    ];
    for (kind, window) in windows {
        if let Some(w) = window {
            check_window(&format!("{path}.{kind}"), kind, w, problems);
            if let (Some(topic), Some(input)) = (&w.late_topic, input) {
                if let Ok(pattern) = TopicPattern::parse(&input.topic) {
                    if let Err(err) = TopicTemplate::parse(topic, &pattern) {
                        problems.add(format!("{path}.{kind}.late_topic"), err.0);
                    }
                }
            }
        }
    }
    if let Some(t) = &rule.thresholds {
        check_thresholds(&format!("{path}.thresholds"), t, problems);
    }
    if let Some(d) = &rule.deadband {
        check_deadband(&format!("{path}.deadband"), d, problems);
    }
    if let Some(c) = &rule.change {
        check_change(&format!("{path}.change"), c, problems);
    }
    if let Some(r) = &rule.rate_of_change {
        check_rate_of_change(&format!("{path}.rate_of_change"), r, problems);
    }
    if let Some(s) = &rule.stuck {
        check_stuck(&format!("{path}.stuck"), s, problems);
    }
    if let Some(a) = &rule.anomaly {
        check_anomaly(&format!("{path}.anomaly"), a, problems);
    }
    let pattern = input.and_then(|input| TopicPattern::parse(&input.topic).ok());
    if let Some(l) = &rule.liveness {
        check_liveness(&format!("{path}.liveness"), l, pattern.as_ref(), problems);
    }
    if let Some(pattern) = &pattern {
        for (segment, values) in &rule.scope {
            if pattern.name_index(segment).is_none() {
                problems.add(
                    format!("{path}.where.{segment}"),
                    format!(
                        "`{segment}` is not a named segment of `{}`; scope by one of: {}",
                        pattern.as_str(),
                        pattern.names().join(", ")
                    ),
                );
            }
            if values.values().is_empty() {
                problems.add(format!("{path}.where.{segment}"), "list at least one value");
            }
        }
    }

    let output = &rule.output;
    if output.qos.is_some_and(|qos| qos > 1) {
        problems.add(format!("{path}.output.qos"), "must be 0 or 1");
    }
    if matches!(
        output.format,
        Format::Text | Format::Senml | Format::SenmlCbor
    ) {
        problems.add(
            format!("{path}.output.format"),
            "events are published as `json` or `cbor`; `text` and SenML are for inputs only",
        );
    }
    if let Some(pattern) = &pattern {
        if let Err(err) = TopicTemplate::parse(&output.topic, pattern) {
            problems.add(format!("{path}.output.topic"), err.0);
        }
    }
}

fn check_metrics(path: &str, key: &str, metrics: &[String], problems: &mut Problems) {
    if metrics.is_empty() {
        problems.add(
            format!("{path}.{key}"),
            format!("list at least one payload field, e.g. {key} = [\"temperature\"]"),
        );
    }
    if metrics.iter().any(String::is_empty) {
        problems.add(format!("{path}.{key}"), "field names must not be empty");
    }
}

fn check_flapping(path: &str, flapping: Option<&FlappingConfig>, problems: &mut Problems) {
    let Some(f) = flapping else {
        return;
    };
    if f.max_changes == 0 {
        problems.add(
            format!("{path}.flapping.max_changes"),
            "must be at least 1 (transitions allowed within `within` before the device is flapping)",
        );
    }
    if f.within < Duration::from_millis(1) {
        problems.add(format!("{path}.flapping.within"), "must be at least 1ms");
    }
}

fn check_thresholds(path: &str, t: &ThresholdsConfig, problems: &mut Problems) {
    if t.metric.is_empty() {
        problems.add(format!("{path}.metric"), "must name a payload field");
    }
    if t.levels.is_empty() {
        problems.add(
            format!("{path}.levels"),
            "list at least one level, e.g. levels = [{ name = \"warning\", set_above = 70.0, reset_below = 65.0 }]",
        );
    }
    let mut names = vec![t.normal.as_str()];
    for (i, level) in t.levels.iter().enumerate() {
        let at = format!("{path}.levels[{i}]");
        if names.contains(&level.name.as_str()) {
            problems.add(
                format!("{at}.name"),
                format!(
                    "`{}` names two states; give each level its own name",
                    level.name
                ),
            );
        }
        names.push(&level.name);
        if !level.set_above.is_finite() || !level.reset_below.is_finite() {
            problems.add(&at, "set_above and reset_below must be finite numbers");
        }
        if level.reset_below > level.set_above {
            problems.add(
                format!("{at}.reset_below"),
                format!(
                    "must not be above set_above ({:?}); the gap between them is the hysteresis band",
                    level.set_above
                ),
            );
        }
        if let Some(previous) = i.checked_sub(1).map(|p| &t.levels[p]) {
            if level.set_above <= previous.set_above || level.reset_below <= previous.reset_below {
                problems.add(
                    &at,
                    format!(
                        "levels rise in order: set_above and reset_below must be above those of `{}`",
                        previous.name
                    ),
                );
            }
        }
    }
    check_flapping(path, t.flapping.as_ref(), problems);
}

fn check_deadband(path: &str, d: &DeadbandConfig, problems: &mut Problems) {
    check_metrics(path, "metrics", &d.metrics, problems);
    match (d.absolute, d.percent) {
        (None, None) => problems.add(
            path,
            "set `absolute` (in the metric's unit) or `percent` (of the last value emitted)",
        ),
        (Some(_), Some(_)) => problems.add(path, "set either `absolute` or `percent`, not both"),
        _ => {}
    }
    if d.absolute.is_some_and(|a| !(a.is_finite() && a >= 0.0)) {
        problems.add(format!("{path}.absolute"), "must be a finite number >= 0");
    }
    if d.percent.is_some_and(|p| !(p.is_finite() && p > 0.0)) {
        problems.add(format!("{path}.percent"), "must be a finite number > 0");
    }
    if d.max_silence.is_some_and(|s| s < Duration::from_millis(1)) {
        problems.add(format!("{path}.max_silence"), "must be at least 1ms");
    }
}

fn check_change(path: &str, c: &ChangeConfig, problems: &mut Problems) {
    check_metrics(path, "fields", &c.fields, problems);
    check_flapping(path, c.flapping.as_ref(), problems);
}

fn check_liveness(
    path: &str,
    l: &LivenessConfig,
    pattern: Option<&TopicPattern>,
    problems: &mut Problems,
) {
    if l.timeout.is_none() && l.status.is_none() {
        problems.add(
            path,
            "set `timeout` (silence after which a device is offline), `status`, or both",
        );
    }
    if l.timeout.is_some_and(|t| t < Duration::from_secs(1)) {
        problems.add(
            format!("{path}.timeout"),
            "must be at least 1s (silence is checked four times a second)",
        );
    }
    if let Some(status) = &l.status {
        if status.field.is_empty() {
            problems.add(format!("{path}.status.field"), "must name a payload field");
        }
        if status.offline.is_empty() {
            problems.add(
                format!("{path}.status.offline"),
                "list the values that mean offline, e.g. [\"offline\"]",
            );
        }
    }
    if !l.expected.is_empty() && l.timeout.is_none() {
        problems.add(
            format!("{path}.expected"),
            "needs a `timeout`: an expected device is offline once it stayed silent that long",
        );
    }
    let Some(pattern) = pattern else {
        return;
    };
    for (i, device) in l.expected.iter().enumerate() {
        let missing: Vec<&str> = pattern
            .names()
            .iter()
            .map(String::as_str)
            .filter(|name| !device.contains_key(*name))
            .collect();
        if !missing.is_empty() {
            problems.add(
                format!("{path}.expected[{i}]"),
                format!(
                    "give every named segment of `{}`; missing: {}",
                    pattern.as_str(),
                    missing.join(", ")
                ),
            );
        }
        for (name, value) in device {
            if pattern.name_index(name).is_none() {
                problems.add(
                    format!("{path}.expected[{i}].{name}"),
                    format!("`{name}` is not a named segment of `{}`", pattern.as_str()),
                );
            }
            if value.is_empty() || value.contains(['/', '+', '#']) {
                problems.add(
                    format!("{path}.expected[{i}].{name}"),
                    "must be a non-empty topic level without `/`, `+` or `#`",
                );
            }
        }
    }
}

fn check_rate_of_change(path: &str, r: &RateOfChangeConfig, problems: &mut Problems) {
    check_metrics(path, "metrics", &r.metrics, problems);
    if r.window < Duration::from_millis(1) {
        problems.add(format!("{path}.window"), "must be at least 1ms");
    }
    if !(r.max_per_second.is_finite() && r.max_per_second > 0.0) {
        problems.add(
            format!("{path}.max_per_second"),
            "must be a finite number > 0",
        );
    }
}

fn check_stuck(path: &str, s: &StuckConfig, problems: &mut Problems) {
    check_metrics(path, "metrics", &s.metrics, problems);
    if s.hold < Duration::from_millis(1) {
        problems.add(format!("{path}.for"), "must be at least 1ms");
    }
    if !(s.tolerance.is_finite() && s.tolerance >= 0.0) {
        problems.add(format!("{path}.tolerance"), "must be a finite number >= 0");
    }
}

fn check_anomaly(path: &str, a: &AnomalyConfig, problems: &mut Problems) {
    check_metrics(path, "metrics", &a.metrics, problems);
    if !(2..=100_000).contains(&a.readings) {
        problems.add(
            format!("{path}.readings"),
            "must be between 2 and 100000 (readings kept per device and metric)",
        );
    }
    if !(a.z_threshold.is_finite() && a.z_threshold > 0.0) {
        problems.add(format!("{path}.z_threshold"), "must be a finite number > 0");
    }
    if let Some(min) = a.min_readings {
        if min < 2 || min > a.readings {
            problems.add(
                format!("{path}.min_readings"),
                format!("must be between 2 and readings ({})", a.readings),
            );
        }
    }
}

fn check_hysteresis(path: &str, h: &HysteresisConfig, problems: &mut Problems) {
    check_flapping(path, h.flapping.as_ref(), problems);
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

/// Which shape keys each window kind needs (`true`) or accepts (`false`); others are refused.
fn shape_keys(kind: &str) -> &'static [(&'static str, bool)] {
    match kind {
        "tumbling" => &[("size", true)],
        "hopping" => &[("size", true), ("slide", true)],
        "session" => &[("gap", true), ("max_length", false)],
        _ => &[("length", true), ("every", false)],
    }
}

fn check_window(path: &str, kind: &str, w: &WindowConfig, problems: &mut Problems) {
    let present = [
        ("size", w.size.is_some()),
        ("slide", w.slide.is_some()),
        ("gap", w.gap.is_some()),
        ("max_length", w.max_length.is_some()),
        ("length", w.length.is_some()),
        ("every", w.every.is_some()),
    ];
    let keys = shape_keys(kind);
    for (key, is_present) in present {
        match keys.iter().find(|(k, _)| *k == key) {
            Some((_, true)) if !is_present => problems.add(
                format!("{path}.{key}"),
                format!("is required for a {kind} window"),
            ),
            None if is_present => {
                let valid: Vec<&str> = keys.iter().map(|(k, _)| *k).collect();
                problems.add(
                    format!("{path}.{key}"),
                    format!(
                        "is not a key of a {kind} window; its shape keys are {}",
                        valid.join(", ")
                    ),
                );
            }
            _ => {}
        }
    }
    for (key, value) in [
        ("size", w.size),
        ("slide", w.slide),
        ("gap", w.gap),
        ("max_length", w.max_length),
    ] {
        if value.is_some_and(|d| d < Duration::from_millis(1)) {
            problems.add(format!("{path}.{key}"), "must be at least 1ms");
        }
    }
    if let (Some(size), Some(slide)) = (w.size, w.slide) {
        if slide > size {
            problems.add(
                format!("{path}.slide"),
                format!(
                    "must not exceed size ({}); readings between windows would belong to none",
                    humantime::format_duration(size)
                ),
            );
        }
    }
    if w.length == Some(0) {
        problems.add(format!("{path}.length"), "must be at least 1");
    }
    if w.every == Some(0) {
        problems.add(format!("{path}.every"), "must be at least 1");
    }
    if w.metrics.is_empty() {
        problems.add(
            format!("{path}.metrics"),
            "list at least one payload field, e.g. metrics = [\"temperature\"]",
        );
    }
    if w.aggregates.is_empty() {
        problems.add(
            format!("{path}.aggregates"),
            "list at least one of count, sum, min, max, avg, stddev, first, last, delta, rate, p50, p90, p95, p99",
        );
    }
    if w.max_open_windows == 0 {
        problems.add(format!("{path}.max_open_windows"), "must be at least 1");
    }
    if w.idle_timeout.is_some_and(|d| d < Duration::from_secs(1)) {
        problems.add(
            format!("{path}.idle_timeout"),
            "must be at least 1s; the idle timer runs every 250ms",
        );
    }
    if kind == "count" && !w.allowed_lateness.is_zero() {
        problems.add(
            format!("{path}.allowed_lateness"),
            "does not apply to count windows, which count in arrival order; remove it",
        );
    }
    if let Some(when) = &w.when {
        if let Err(err) = super::condition::Condition::parse(when, &w.metrics) {
            problems.add_at(format!("{path}.when"), err.offset, err.message);
        }
    }
}
