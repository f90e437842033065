//! Semantic checks on a parsed config: [`validate`] walks the sections, each checked in its own
//! module, and collects every problem with its path, so one run of `weir check` reports them all.
//! The checks that span sections live here.

use super::broker::check_broker;
use super::delivery::{check_dead_letter, check_delivery};
use super::inputs::check_inputs;
use super::observability::check_observability;
use super::pipeline::check_pipeline;
use super::rules::check_rules;
use super::{Config, DeliveryMode};

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

    pub(super) fn into_vec(self) -> Vec<Problem> {
        self.0
    }
}

/// Checks what serde cannot: ranges, cross-references, and values a dependency would panic on.
///
/// Problems come out in the order of these calls; `weir check` output and tests rely on it.
pub fn validate(config: &Config) -> Vec<Problem> {
    let mut problems = Problems::default();
    // First: a section this build cannot run matters more than how it is filled in.
    super::features::check_features(config, |feature| feature.built, &mut problems);
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
    check_rules(&config.rules, &config.inputs, &config.sinks, &mut problems);
    super::sinks::check_sinks(&config.sinks, &mut problems);
    if let Some(cluster) = &config.cluster {
        super::cluster::check_cluster(cluster, &mut problems);
    }
    check_field_types(config, &mut problems);
    check_observability(&config.observability, &mut problems);
    problems.into_vec()
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
        for (index, output) in rule.output.list.iter().enumerate() {
            if output.qos != Some(0) {
                continue;
            }
            problems.add(
                format!("{}.qos", rule.output.path(name, index)),
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

#[cfg(test)]
mod tests {
    use crate::config::test_support::{detectors_problem_after, problem_after};
    use crate::config::{parse, Overrides, EXAMPLE};
    use std::path::Path;

    #[test]
    fn a_field_is_either_a_number_or_a_discrete_value() {
        let (problem, _) =
            detectors_problem_after("fields = [\"door\", \"mode\"]", "fields = [\"pressure\"]");
        assert!(
            problem.message.contains("`pressure`"),
            "{}",
            problem.message
        );
        assert!(
            problem.message.contains("pressure_surge"),
            "{}",
            problem.message
        );
    }

    #[test]
    fn at_least_once_needs_a_state_dir_and_a_persistent_session() {
        let text = EXAMPLE
            .replace("state_dir = \"/var/lib/weir\"", "")
            .replace("clean_session = false", "clean_session = true");
        let err = parse(&text, Path::new("x.toml"), &Overrides::default()).unwrap_err();
        let paths: Vec<&str> = err.problems().iter().map(|p| p.path.as_str()).collect();
        assert_eq!(paths, ["delivery.mode", "broker.clean_session"], "{err}");
    }

    #[test]
    fn at_least_once_refuses_an_explicit_qos_0() {
        let (problem, _) = problem_after(
            "format = \"json\"\nseq_field",
            "format = \"json\"\nqos = 0\nseq_field",
        );
        assert_eq!(problem.path, "inputs.telemetry.qos");
        assert!(problem.message.contains("at_least_once"));
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = EXAMPLE
            .replace("exit_below = 28.0", "exit_below = 31.0")
            .replace("alerts/{site}/", "alerts/{zone}/")
            .replace("keep_alive = \"30s\"", "keep_alive = \"0s\"");
        let err = parse(&text, Path::new("x.toml"), &Overrides::default()).unwrap_err();
        assert_eq!(err.problems().len(), 3, "{err}");
        assert!(err.to_string().starts_with("x.toml has 3 problems:"));
    }
}
