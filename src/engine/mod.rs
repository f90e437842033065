//! The engine: the [`Plan`] built from a validated config (inputs, field plans, rules, routes),
//! and the [`worker`] that runs every rule over the readings of the devices it owns.
//!
//! Devices are sharded across workers by a hash of (input, device), so each device's readings
//! are processed in order by one worker and the workers use the cores in parallel.

pub mod worker;

pub use worker::{RawMessage, Worker};

use crate::config::Config;
use crate::decode::FieldPlan;
use crate::operators::{Hysteresis, RuleMeta, Tumbling};
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
}

/// The built operator of a rule.
#[derive(Debug, Clone)]
pub enum OperatorPlan {
    Hysteresis(Hysteresis),
    Tumbling(Tumbling),
}

impl OperatorPlan {
    /// The operator's name, as in the config table (`/api/rules` shows it).
    pub fn operator_name(&self) -> &'static str {
        match self {
            OperatorPlan::Hysteresis(_) => "hysteresis",
            OperatorPlan::Tumbling(_) => "tumbling",
        }
    }

    /// The `kind` of the events this operator emits.
    pub fn event_kind(&self) -> &'static str {
        match self {
            OperatorPlan::Hysteresis(_) => "state_change",
            OperatorPlan::Tumbling(_) => "window",
        }
    }
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
            let used: Vec<&String> = match (&rule.hysteresis, &rule.tumbling) {
                (Some(h), _) => vec![&h.metric],
                (None, Some(t)) => t.metrics.iter().collect(),
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
                qos: qos(input.qos),
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
            let operator = match (&rule.hysteresis, &rule.tumbling) {
                (Some(h), _) => {
                    OperatorPlan::Hysteresis(Hysteresis::new(meta, h, slot(&h.metric)?))
                }
                (None, Some(t)) => {
                    let slots = t
                        .metrics
                        .iter()
                        .map(|m| slot(m))
                        .collect::<Result<_, _>>()?;
                    OperatorPlan::Tumbling(Tumbling::new(meta, t, slots))
                }
                (None, None) => anyhow::bail!("rule {name} has no operator"),
            };
            let template = TopicTemplate::parse(&rule.output.topic, &inputs[input].pattern)
                .map_err(|e| anyhow::anyhow!("rules.{name}.output.topic: {e}"))?;
            inputs[input].rules.push(index);
            rules.push(RulePlan {
                name: name.as_str().into(),
                input,
                operator,
                route: Route {
                    template,
                    qos: qos(rule.output.qos),
                    retain: rule.output.retain,
                    format: rule.output.format,
                },
            });
        }
        Ok(Self {
            inputs,
            rules,
            max_devices_per_worker: config.pipeline.max_devices_per_worker,
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
