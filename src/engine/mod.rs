//! The engine: the [`Plan`] built from a validated config (inputs, field plans, rules, routes),
//! and the [`worker`] that runs every rule over the readings of the devices it owns.
//!
//! Devices are sharded across workers by a hash of (input, device), so each device's readings
//! are processed in order by one worker and the workers use the cores in parallel.

pub mod worker;

pub use worker::{RawMessage, Worker, WorkerInput};

use crate::config::Config;
use crate::config::{RuleConfig, WindowConfig};
use crate::decode::FieldPlan;
use crate::operators::window::{millis, WindowSpec};
use crate::operators::{CountWindows, Hopping, Hysteresis, RuleMeta, SessionWindows, Tumbling};
use crate::route::Route;
use crate::topic::{TopicPattern, TopicTemplate};
use anyhow::Context as _;
use std::sync::Arc;

/// Everything the workers and the source need to know about the config, built once.
#[derive(Debug)]
pub struct Plan {
    pub inputs: Vec<InputPlan>,
    pub rules: Vec<RulePlan>,
    /// Devices a worker tracks before refusing new ones.
    pub max_devices_per_worker: usize,
    /// Recent readings remembered per device to drop redeliveries.
    pub dedup_horizon: usize,
    /// Dead-letter topic (`{input}` and `{reason}` replaced), if dead letters are published.
    pub dead_letter_topic: Option<String>,
    pub dead_letter_qos: rumqttc::QoS,
    /// True with a state dir: open state is snapshotted at shutdown instead of flushed as partial.
    pub durable_state: bool,
}

/// One input: its pattern, how to decode its payloads, and the rules that read it.
#[derive(Debug)]
pub struct InputPlan {
    pub name: Arc<str>,
    pub pattern: TopicPattern,
    pub names: Arc<[String]>,
    /// Index of the device segment among the pattern's names.
    pub device_index: usize,
    pub fields: FieldPlan,
    pub qos: rumqttc::QoS,
    pub max_payload_bytes: usize,
    pub max_clock_skew_ms: i64,
    /// Indexes into [`Plan::rules`].
    pub rules: Vec<usize>,
}

/// One rule: its operator and its route.
#[derive(Debug)]
pub struct RulePlan {
    pub name: Arc<str>,
    pub input: usize,
    pub operator: OperatorPlan,
    pub route: Route,
    /// Where a window rule publishes late and quarantined readings (`late_topic`).
    pub late_route: Option<Route>,
}

/// The built operator of a rule.
#[derive(Debug, Clone)]
pub enum OperatorPlan {
    Hysteresis(Hysteresis),
    Tumbling(Tumbling),
    Hopping(Hopping),
    Session(SessionWindows),
    Count(CountWindows),
}

impl OperatorPlan {
    /// The `kind` of the events this operator emits.
    pub fn event_kind(&self) -> &'static str {
        match self {
            OperatorPlan::Hysteresis(_) => "state_change",
            OperatorPlan::Tumbling(_)
            | OperatorPlan::Hopping(_)
            | OperatorPlan::Session(_)
            | OperatorPlan::Count(_) => "window",
        }
    }
}

/// The window table of a rule, if its operator is a window, with its kind.
fn window_of(rule: &RuleConfig) -> Option<(&'static str, &WindowConfig)> {
    [
        ("tumbling", &rule.tumbling),
        ("hopping", &rule.hopping),
        ("session", &rule.session),
        ("count", &rule.count),
    ]
    .into_iter()
    .find_map(|(kind, window)| window.as_ref().map(|w| (kind, w)))
}

/// Builds a window operator of `kind` from its validated table.
fn build_window(
    kind: &str,
    meta: RuleMeta,
    w: &WindowConfig,
    slots: Vec<usize>,
) -> anyhow::Result<OperatorPlan> {
    let name = meta.name.clone();
    let spec = WindowSpec::new(meta, w, slots)
        .map_err(|e| anyhow::anyhow!("rules.{name}.{kind}.when: {}", e.message))?;
    let ms = |d: Option<std::time::Duration>| d.map_or(i64::MAX, millis);
    Ok(match kind {
        "tumbling" => OperatorPlan::Tumbling(Tumbling::new(spec, ms(w.size))),
        "hopping" => OperatorPlan::Hopping(Hopping::new(spec, ms(w.size), ms(w.slide))),
        "session" => OperatorPlan::Session(SessionWindows::new(spec, ms(w.gap), ms(w.max_length))),
        _ => {
            let length = w.length.unwrap_or(1);
            OperatorPlan::Count(CountWindows::new(spec, length, w.every.unwrap_or(length)))
        }
    })
}

fn qos(level: u8) -> rumqttc::QoS {
    match level {
        0 => rumqttc::QoS::AtMostOnce,
        1 => rumqttc::QoS::AtLeastOnce,
        _ => rumqttc::QoS::ExactlyOnce,
    }
}

impl Plan {
    /// Builds the plan from a config that passed validation.
    ///
    /// # Errors
    /// Only if the config was not validated (validation reports the same problems with lines).
    pub fn build(config: &Config) -> anyhow::Result<Self> {
        let input_names: Vec<&String> = config.inputs.keys().collect();
        // Metrics each input must decode: the union of what its rules use, in first-use order.
        let mut metrics: Vec<Vec<String>> = vec![Vec::new(); input_names.len()];
        let mut rule_inputs = Vec::new();
        for (name, rule) in &config.rules {
            let (input_name, _) = config
                .input_of(rule)
                .with_context(|| format!("rule {name} has no input"))?;
            let input = input_names
                .iter()
                .position(|n| n.as_str() == input_name)
                .with_context(|| format!("rule {name}: unknown input"))?;
            let used: Vec<&String> = match (&rule.hysteresis, window_of(rule)) {
                (Some(h), _) => vec![&h.metric],
                (None, Some((_, w))) => w.metrics.iter().collect(),
                (None, None) => anyhow::bail!("rule {name} has no operator"),
            };
            for metric in used {
                if !metrics[input].contains(metric) {
                    metrics[input].push(metric.clone());
                }
            }
            rule_inputs.push(input);
        }

        let mut inputs = Vec::new();
        for (index, (name, input)) in config.inputs.iter().enumerate() {
            let pattern = TopicPattern::parse(&input.topic)
                .map_err(|e| anyhow::anyhow!("inputs.{name}.topic: {e}"))?;
            let device_index = pattern
                .name_index(&input.device)
                .with_context(|| format!("inputs.{name}.device is not a segment"))?;
            inputs.push(InputPlan {
                name: name.as_str().into(),
                names: pattern.names().to_vec().into(),
                pattern,
                device_index,
                fields: FieldPlan::new(input, std::mem::take(&mut metrics[index])),
                qos: qos(config.effective_qos(input.qos)),
                max_payload_bytes: input.max_payload_bytes,
                max_clock_skew_ms: i64::try_from(input.max_clock_skew.as_millis())
                    .unwrap_or(i64::MAX),
                rules: Vec::new(),
            });
        }

        let mut rules = Vec::new();
        for (index, ((name, rule), input)) in config.rules.iter().zip(rule_inputs).enumerate() {
            let meta = RuleMeta {
                index,
                name: name.as_str().into(),
            };
            let fields = &inputs[input].fields;
            let slot = |metric: &str| {
                fields
                    .metric_slot(metric)
                    .with_context(|| format!("rule {name}: metric {metric} not planned"))
            };
            let operator = match (&rule.hysteresis, window_of(rule)) {
                (Some(h), _) => {
                    OperatorPlan::Hysteresis(Hysteresis::new(meta, h, slot(&h.metric)?))
                }
                (None, Some((kind, w))) => {
                    let slots = w
                        .metrics
                        .iter()
                        .map(|m| slot(m))
                        .collect::<Result<_, _>>()?;
                    build_window(kind, meta, w, slots)?
                }
                (None, None) => anyhow::bail!("rule {name} has no operator"),
            };
            let template = TopicTemplate::parse(&rule.output.topic, &inputs[input].pattern)
                .map_err(|e| anyhow::anyhow!("rules.{name}.output.topic: {e}"))?;
            let late_topic =
                window_of(rule).and_then(|(kind, w)| Some((kind, w.late_topic.as_ref()?)));
            let late_route = match late_topic {
                Some((kind, topic)) => Some(Route {
                    template: TopicTemplate::parse(topic, &inputs[input].pattern)
                        .map_err(|e| anyhow::anyhow!("rules.{name}.{kind}.late_topic: {e}"))?,
                    qos: qos(config.effective_qos(rule.output.qos)),
                    retain: false,
                    format: rule.output.format,
                }),
                None => None,
            };
            inputs[input].rules.push(index);
            rules.push(RulePlan {
                name: name.as_str().into(),
                input,
                operator,
                route: Route {
                    template,
                    qos: qos(config.effective_qos(rule.output.qos)),
                    retain: rule.output.retain,
                    format: rule.output.format,
                },
                late_route,
            });
        }
        Ok(Self {
            inputs,
            rules,
            max_devices_per_worker: config.pipeline.max_devices_per_worker,
            dedup_horizon: config.delivery.dedup_horizon,
            dead_letter_topic: config.dead_letter.topic.clone(),
            dead_letter_qos: qos(config.effective_qos(None)),
            durable_state: config.delivery.state_dir.is_some(),
        })
    }

    /// The input whose pattern matches `topic`, and the topic's device segment.
    pub fn match_topic<'t>(&self, topic: &'t str) -> Option<(usize, &'t str)> {
        self.inputs.iter().enumerate().find_map(|(index, input)| {
            input
                .pattern
                .capture(topic, input.device_index)
                .map(|device| (index, device))
        })
    }

    /// The worker that owns a device: a stable hash of input and device id, so a device's
    /// readings always go to the same worker and stay in order.
    pub fn shard(input: usize, device: &str, workers: usize) -> usize {
        let hash = crate::event::EventId::derive(&[&input.to_le_bytes(), device.as_bytes()]).0;
        (hash % workers.max(1) as u64) as usize
    }
}
