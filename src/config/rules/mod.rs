//! `[rules.NAME]`: a rule reads one input, optionally scoped by topic segments (`where`), runs
//! exactly one operator and publishes to its `output`. Window tables are in `windows.rs`, the
//! other operators (detectors) in `detectors.rs`.

mod detectors;
mod windows;

pub use detectors::{
    AnomalyConfig, ChangeConfig, DeadbandConfig, FlappingConfig, HysteresisConfig, LevelConfig,
    LivenessConfig, RateOfChangeConfig, StatusConfig, StuckConfig, ThresholdsConfig,
};
pub use windows::{Aggregate, OnShutdown, TumblingConfig, WindowConfig};

use super::inputs::default_format;
use super::sinks::{SinkConfig, SinkKind, BROKER_SINK};
use super::topic::{TopicPattern, TopicTemplate};
use super::validate::Problems;
use super::{Format, InputConfig};
use detectors::{
    check_anomaly, check_change, check_deadband, check_hysteresis, check_liveness,
    check_rate_of_change, check_stuck, check_thresholds,
};
use serde::Deserialize;
use std::collections::BTreeMap;
use windows::check_window;

/// A rule: exactly one operator kind (a sub-table named after it) and where its events go.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// The input whose readings this rule sees; optional when there is only one input.
    pub input: Option<String>,
    /// Scoping: the rule sees only readings whose named topic segments have one of these values,
    /// e.g. `where = { site = "plant-1" }` or `where = { site = ["plant-1", "plant-2"] }`.
    #[serde(rename = "where", default)]
    pub scope: BTreeMap<String, ScopeValues>,
    pub hysteresis: Option<HysteresisConfig>,
    pub thresholds: Option<ThresholdsConfig>,
    pub tumbling: Option<TumblingConfig>,
    pub hopping: Option<WindowConfig>,
    pub session: Option<WindowConfig>,
    pub count: Option<WindowConfig>,
    pub deadband: Option<DeadbandConfig>,
    pub change: Option<ChangeConfig>,
    pub liveness: Option<LivenessConfig>,
    pub rate_of_change: Option<RateOfChangeConfig>,
    pub stuck: Option<StuckConfig>,
    pub anomaly: Option<AnomalyConfig>,
    /// One `[rules.NAME.output]` table, or several (`[[rules.NAME.output]]`), each to a sink.
    pub output: Outputs,
}

impl RuleConfig {
    /// The operator kinds this rule configures (validation requires exactly one).
    pub fn operator_kinds(&self) -> Vec<&'static str> {
        [
            self.hysteresis.is_some().then_some("hysteresis"),
            self.thresholds.is_some().then_some("thresholds"),
            self.tumbling.is_some().then_some("tumbling"),
            self.hopping.is_some().then_some("hopping"),
            self.session.is_some().then_some("session"),
            self.count.is_some().then_some("count"),
            self.deadband.is_some().then_some("deadband"),
            self.change.is_some().then_some("change"),
            self.liveness.is_some().then_some("liveness"),
            self.rate_of_change.is_some().then_some("rate_of_change"),
            self.stuck.is_some().then_some("stuck"),
            self.anomaly.is_some().then_some("anomaly"),
        ]
        .into_iter()
        .flatten()
        .collect()
    }

    /// Numeric payload fields the rule's operator reads.
    pub fn metrics(&self) -> Vec<&String> {
        let mut used: Vec<&String> = Vec::new();
        if let Some(h) = &self.hysteresis {
            used.push(&h.metric);
        }
        if let Some(t) = &self.thresholds {
            used.push(&t.metric);
        }
        for list in [
            self.tumbling.as_ref().map(|t| &t.metrics),
            self.hopping.as_ref().map(|t| &t.metrics),
            self.session.as_ref().map(|t| &t.metrics),
            self.count.as_ref().map(|t| &t.metrics),
            self.deadband.as_ref().map(|d| &d.metrics),
            self.rate_of_change.as_ref().map(|r| &r.metrics),
            self.stuck.as_ref().map(|s| &s.metrics),
            self.anomaly.as_ref().map(|a| &a.metrics),
        ]
        .into_iter()
        .flatten()
        {
            used.extend(list);
        }
        used
    }

    /// Discrete (string, bool, integer) payload fields the rule's operator reads.
    pub fn discrete_fields(&self) -> Vec<&String> {
        let mut used: Vec<&String> = Vec::new();
        if let Some(c) = &self.change {
            used.extend(&c.fields);
        }
        if let Some(status) = self.liveness.as_ref().and_then(|l| l.status.as_ref()) {
            used.push(&status.field);
        }
        used
    }
}

/// One allowed value or a list of them, in a rule's `where`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum ScopeValues {
    One(String),
    Any(Vec<String>),
}

impl ScopeValues {
    pub fn values(&self) -> Vec<String> {
        match self {
            ScopeValues::One(value) => vec![value.clone()],
            ScopeValues::Any(values) => values.clone(),
        }
    }
}

/// Where a rule's derived events go: one output, or several (an event goes to each).
#[derive(Debug, Clone)]
pub struct Outputs {
    pub list: Vec<OutputConfig>,
    /// Written as an array of tables, so problems name `output[i]`.
    pub many: bool,
}

impl Outputs {
    /// The dotted path of output `index` of rule `rule`, as problems name it.
    pub fn path(&self, rule: &str, index: usize) -> String {
        if self.many {
            format!("rules.{rule}.output[{index}]")
        } else {
            format!("rules.{rule}.output")
        }
    }

    /// The first output (a rule has at least one): where late events and the API's
    /// `output_topic` come from.
    pub fn first(&self) -> &OutputConfig {
        &self.list[0]
    }
}

impl<'de> Deserialize<'de> for Outputs {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Outputs;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an output table ([rules.NAME.output]) or an array of them ([[rules.NAME.output]])")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Outputs, A::Error> {
                let one =
                    OutputConfig::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(Outputs {
                    list: vec![one],
                    many: false,
                })
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<Outputs, A::Error> {
                let list = Vec::<OutputConfig>::deserialize(
                    serde::de::value::SeqAccessDeserializer::new(seq),
                )?;
                if list.is_empty() {
                    return Err(serde::de::Error::custom("a rule needs at least one output"));
                }
                Ok(Outputs { list, many: true })
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// Where a rule's derived events are published.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputConfig {
    /// The `[sinks.NAME]` to deliver to; `mqtt` (the `[broker]`) when absent.
    pub sink: Option<String>,
    /// Topic template over the input's named segments and `{rule}`: the MQTT topic, or the AMQP
    /// routing key (with `/` as `.`). Optional for http (sent as the `Weir-Topic` header) and
    /// postgres (stored in the `topic` column).
    pub topic: Option<String>,
    /// The table rows go to (postgres); the rule's name when absent.
    pub table: Option<String>,
    /// 0 or 1; 1 under `at_least_once`, 0 otherwise, when absent.
    pub qos: Option<u8>,
    #[serde(default)]
    pub retain: bool,
    #[serde(default = "default_format")]
    pub format: Format,
}

pub(super) fn check_rules(
    rules: &BTreeMap<String, RuleConfig>,
    inputs: &BTreeMap<String, InputConfig>,
    sinks: &BTreeMap<String, SinkConfig>,
    problems: &mut Problems,
) {
    if rules.is_empty() {
        problems.add(
            "rules",
            "define at least one rule, e.g. [rules.overheat] with a [rules.overheat.hysteresis] table",
        );
    }
    for (name, rule) in rules {
        check_rule(name, rule, inputs, sinks, problems);
    }
}

fn check_rule(
    name: &str,
    rule: &RuleConfig,
    inputs: &BTreeMap<String, InputConfig>,
    sinks: &BTreeMap<String, SinkConfig>,
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

    for (index, output) in rule.output.list.iter().enumerate() {
        let path = rule.output.path(name, index);
        check_output(&path, output, pattern.as_ref(), sinks, problems);
    }
    let mut seen = Vec::new();
    for output in &rule.output.list {
        let sink = output.sink.as_deref().unwrap_or(BROKER_SINK);
        if seen.contains(&sink) {
            problems.add(
                format!("{path}.output"),
                format!("names sink `{sink}` twice; a rule delivers to each sink once"),
            );
        }
        seen.push(sink);
    }
}

fn check_output(
    path: &str,
    output: &OutputConfig,
    pattern: Option<&TopicPattern>,
    sinks: &BTreeMap<String, SinkConfig>,
    problems: &mut Problems,
) {
    if output.qos.is_some_and(|qos| qos > 1) {
        problems.add(format!("{path}.qos"), "must be 0 or 1");
    }
    if matches!(
        output.format,
        Format::Text | Format::Senml | Format::SenmlCbor
    ) {
        problems.add(
            format!("{path}.format"),
            "events are published as `json` or `cbor`; `text` and SenML are for inputs only",
        );
    }
    let kind = match output.sink.as_deref() {
        None | Some(BROKER_SINK) => Some(SinkKind::Mqtt),
        Some(name) => match sinks.get(name) {
            Some(sink) => Some(sink.kind),
            None => {
                let mut known: Vec<&str> = sinks.keys().map(String::as_str).collect();
                known.insert(0, BROKER_SINK);
                problems.add(
                    format!("{path}.sink"),
                    format!(
                        "no sink is named `{name}`; declare [sinks.{name}] or use one of: {}",
                        known.join(", ")
                    ),
                );
                None
            }
        },
    };
    match (&output.topic, kind) {
        (Some(topic), _) => {
            if let Some(pattern) = pattern {
                if let Err(err) = TopicTemplate::parse(topic, pattern) {
                    problems.add(format!("{path}.topic"), err.0);
                }
            }
        }
        (None, Some(kind)) if kind.needs_topic() => problems.add(
            format!("{path}.topic"),
            format!(
                "a {} output needs a topic template, e.g. topic = \"alerts/{{site}}/{{device}}/{{rule}}\"",
                kind.name()
            ),
        ),
        _ => {}
    }
    if let Some(table) = &output.table {
        if kind != Some(SinkKind::Postgres) {
            problems.add(
                format!("{path}.table"),
                "is only used by outputs to a postgres sink",
            );
        } else if !super::sinks::is_sql_identifier(table) {
            problems.add(
                format!("{path}.table"),
                "must be a lowercase SQL name (letters, digits, `_`; at most 63), e.g. table = \"overheat_events\"",
            );
        }
    }
    if kind == Some(SinkKind::Postgres) && output.format == Format::Cbor {
        problems.add(
            format!("{path}.format"),
            "a postgres output stores JSON; remove format",
        );
    }
}

#[cfg(test)]
mod tests {
    use crate::config::test_support::{detectors_problem_after, line_of, problem_after, DETECTORS};
    use crate::config::{parse, Overrides, EXAMPLE};
    use std::path::Path;

    #[test]
    fn template_segment_missing_from_the_pattern_is_named() {
        let (problem, text) = problem_after("alerts/{site}/", "alerts/{zone}/");
        assert_eq!(problem.path, "rules.overheat.output.topic");
        assert_eq!(
            problem.line_col.map(|lc| lc.0),
            Some(line_of(&text, "alerts/{zone}"))
        );
        assert!(problem.message.contains("{zone}"));
    }

    #[test]
    fn rule_input_must_exist() {
        let (problem, _) = problem_after("input = \"telemetry\"", "input = \"telemetri\"");
        assert_eq!(problem.path, "rules.overheat.input");
        assert!(problem.message.contains("known inputs: telemetry"));
    }

    #[test]
    fn a_rule_needs_exactly_one_operator() {
        let (problem, _) = problem_after("[rules.climate.tumbling]", "[rules.climate.other]");
        assert!(
            problem.message.contains("unknown field `other`"),
            "{}",
            problem.message
        );
        let text = EXAMPLE.replace(
            "[rules.overheat.output]",
            "[rules.overheat.tumbling]\nsize = \"1s\"\nmetrics = [\"x\"]\n\n[rules.overheat.output]",
        );
        let err = parse(&text, Path::new("x.toml"), &Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("has 2 operators"), "{err}");
    }

    #[test]
    fn scoping_by_a_segment_the_pattern_lacks_names_its_line() {
        let (problem, text) = detectors_problem_after("where = { site = ", "where = { zone = ");
        assert_eq!(problem.path, "rules.temperature_level.where.zone");
        assert_eq!(
            problem.line_col.map(|lc| lc.0),
            Some(line_of(&text, "where = { zone"))
        );
        assert!(
            problem.message.contains("site, device"),
            "{}",
            problem.message
        );
    }

    #[test]
    fn text_is_not_an_output_format() {
        let text = DETECTORS.replacen(
            "topic = \"reports/{site}/{device}/{rule}\"",
            "topic = \"reports/{site}/{device}/{rule}\"\nformat = \"text\"",
            1,
        );
        let err = parse(&text, Path::new("d.toml"), &Overrides::default()).unwrap_err();
        assert_eq!(
            err.problems()[0].path,
            "rules.temperature_report.output.format"
        );
    }
}
