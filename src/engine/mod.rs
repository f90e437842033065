//! The engine: the [`Plan`] built from a validated config (inputs, field plans, rules, routes),
//! and the [`worker`] that runs every rule over the readings of the devices it owns.
//!
//! Devices are sharded across workers by a hash of (input, device), so each device's readings
//! are processed in order by one worker and the workers use the cores in parallel.

pub mod dedup;
pub mod layout;
pub mod snapshot;

/// Every `reason` label the engine's stages can report, for [`Metrics::register_labels`].
///
/// [`Metrics::register_labels`]: crate::metrics::Metrics::register_labels
pub const REASONS: crate::metrics::Reasons = crate::metrics::Reasons {
    decode: &crate::decode::DecodeError::REASONS,
    late: &crate::operators::window::LateReason::LABELS,
};
pub mod worker;

pub use crate::model::message::RawMessage;
pub use layout::Workers;
pub use worker::{Reload, SinkInput, Worker, WorkerInput};

use crate::config::topic::{TopicPattern, TopicTemplate};
use crate::config::{Config, RuleConfig, WindowConfig};
use crate::decode::{FieldPlan, Origin};
use crate::operators::window::{millis, WindowSpec};
use crate::operators::{
    Anomaly, Change, CountWindows, Deadband, Hopping, Hysteresis, Liveness, RateOfChange, RuleMeta,
    SessionWindows, Stuck, Tumbling,
};
use crate::route::Route;
use anyhow::Context as _;
use std::sync::Arc;

/// Everything the workers and the source need to know about the config, built once.
#[derive(Debug)]
pub struct Plan {
    pub inputs: Vec<InputPlan>,
    pub rules: Vec<RulePlan>,
    /// Where events can go: the `[broker]` first ([`Plan::BROKER`]), then `[sinks.*]` by name.
    pub sinks: Vec<SinkPlan>,
    /// Devices a worker tracks before refusing new ones.
    pub max_devices_per_worker: usize,
    pub when_device_limit: crate::config::DeviceLimitPolicy,
    /// Recent readings remembered per device to drop redeliveries.
    pub dedup_horizon: usize,
    /// Dead-letter topic (`{input}` and `{reason}` replaced), if dead letters are published.
    pub dead_letter_topic: Option<String>,
    /// Dead letters are confirmed by the sink (QoS 1) or not.
    pub dead_letter_confirm: bool,
    /// True with a state dir: open state is snapshotted at shutdown instead of flushed as partial.
    pub durable_state: bool,
    /// Devices the config expects (liveness), registered by the worker that owns each at start.
    pub expected: Vec<ExpectedDevice>,
}

/// A sink that outputs name.
#[derive(Debug, Clone)]
pub struct SinkPlan {
    pub name: Arc<str>,
    pub kind: crate::config::SinkKind,
}

/// A device named in a liveness rule's `expected` list.
#[derive(Debug, Clone)]
pub struct ExpectedDevice {
    pub input: usize,
    pub rule: usize,
    /// Its topic segments, in the order of the input pattern's names.
    pub segments: Vec<String>,
}

impl ExpectedDevice {
    /// The device's id segment.
    pub fn device<'a>(&'a self, plan: &Plan) -> &'a str {
        &self.segments[plan.inputs[self.input].device_index]
    }

    /// The origin the device's events carry until it publishes (then its real topic's).
    pub fn origin(&self, plan: &Plan) -> Origin {
        let input = &plan.inputs[self.input];
        Origin::new(
            input.names.clone(),
            input.device_index,
            &input.pattern.fill(&self.segments),
            &self.segments,
        )
    }
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
    /// The subscription's QoS level (0 or 1): the MQTT source's business, kept as the number.
    pub qos: u8,
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
    /// One per output, in the order of the config; every event goes to each.
    pub routes: Vec<Route>,
    /// Where a window rule publishes late and quarantined readings (`late_topic`), on the sink
    /// of its first output.
    pub late_route: Option<Route>,
    /// `where`: (segment index, allowed values); empty means every device of the input.
    pub scope: Vec<(usize, Vec<Arc<str>>)>,
    /// Hash of the rule's definition ([`crate::config::Fingerprints`]): state saved under
    /// another fingerprint belongs to an older definition and is not restored.
    pub fingerprint: u64,
}

impl RulePlan {
    /// Whether the rule applies to readings from `origin`.
    pub fn in_scope(&self, origin: &Origin) -> bool {
        self.scope.iter().all(|(index, values)| {
            origin
                .segment(*index)
                .is_some_and(|segment| values.iter().any(|v| **v == *segment))
        })
    }

    fn in_scope_segments(&self, segments: &[String]) -> bool {
        self.scope.iter().all(|(index, values)| {
            segments
                .get(*index)
                .is_some_and(|segment| values.iter().any(|v| **v == **segment))
        })
    }
}

/// The built operator of a rule.
#[derive(Debug, Clone)]
pub enum OperatorPlan {
    /// Also runs `thresholds` rules (multi-level).
    Hysteresis(Hysteresis),
    Tumbling(Tumbling),
    Hopping(Hopping),
    Session(SessionWindows),
    Count(CountWindows),
    Deadband(Deadband),
    Change(Change),
    Liveness(Liveness),
    RateOfChange(RateOfChange),
    Stuck(Stuck),
    Anomaly(Anomaly),
}

impl OperatorPlan {
    /// The operator's name, as in the config table (`/api/rules` shows it).
    pub fn operator_name(&self) -> &'static str {
        match self {
            OperatorPlan::Hysteresis(_) => "hysteresis",
            OperatorPlan::Tumbling(_) => "tumbling",
            OperatorPlan::Hopping(_) => "hopping",
            OperatorPlan::Session(_) => "session",
            OperatorPlan::Count(_) => "count",
            OperatorPlan::Deadband(_) => "deadband",
            OperatorPlan::Change(_) => "change",
            OperatorPlan::Liveness(_) => "liveness",
            OperatorPlan::RateOfChange(_) => "rate_of_change",
            OperatorPlan::Stuck(_) => "stuck",
            OperatorPlan::Anomaly(_) => "anomaly",
        }
    }

    /// The `kind` of the events this operator mainly emits.
    pub fn event_kind(&self) -> &'static str {
        self.event_kinds()[0]
    }

    /// Every `kind` this operator can emit (flapping suppression adds `flapping`).
    pub fn event_kinds(&self) -> &'static [&'static str] {
        match self {
            OperatorPlan::Hysteresis(_) => &["state_change", "flapping"],
            OperatorPlan::Tumbling(_)
            | OperatorPlan::Hopping(_)
            | OperatorPlan::Session(_)
            | OperatorPlan::Count(_) => &["window"],
            OperatorPlan::Deadband(_) => &["report"],
            OperatorPlan::Change(_) => &["change", "flapping"],
            OperatorPlan::Liveness(_) => &["liveness"],
            OperatorPlan::RateOfChange(_) => &["rate_of_change"],
            OperatorPlan::Stuck(_) => &["stuck"],
            OperatorPlan::Anomaly(_) => &["anomaly"],
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

/// The runtime operator of one rule, with its fields resolved to slots of the input's plan.
fn build_operator(
    name: &str,
    rule: &RuleConfig,
    meta: RuleMeta,
    fields: &FieldPlan,
) -> anyhow::Result<OperatorPlan> {
    let slot = |metric: &str| {
        fields
            .metric_slot(metric)
            .with_context(|| format!("rule {name}: metric {metric} not planned"))
    };
    let slots = |metrics: &[String]| metrics.iter().map(|m| slot(m)).collect::<Result<_, _>>();
    let discrete_slot = |field: &str| {
        fields
            .discrete_slot(field)
            .with_context(|| format!("rule {name}: field {field} not planned"))
    };
    Ok(if let Some(h) = &rule.hysteresis {
        OperatorPlan::Hysteresis(Hysteresis::new(meta, h, slot(&h.metric)?))
    } else if let Some(t) = &rule.thresholds {
        OperatorPlan::Hysteresis(Hysteresis::thresholds(meta, t, slot(&t.metric)?))
    } else if let Some((kind, w)) = window_of(rule) {
        build_window(kind, meta, w, slots(&w.metrics)?)?
    } else if let Some(d) = &rule.deadband {
        OperatorPlan::Deadband(Deadband::new(meta, d, slots(&d.metrics)?))
    } else if let Some(c) = &rule.change {
        let slots = c
            .fields
            .iter()
            .map(|f| discrete_slot(f))
            .collect::<Result<_, _>>()?;
        OperatorPlan::Change(Change::new(meta, c, slots))
    } else if let Some(l) = &rule.liveness {
        let status = l
            .status
            .as_ref()
            .map(|s| discrete_slot(&s.field))
            .transpose()?;
        OperatorPlan::Liveness(Liveness::new(meta, l, status))
    } else if let Some(r) = &rule.rate_of_change {
        OperatorPlan::RateOfChange(RateOfChange::new(meta, r, slots(&r.metrics)?))
    } else if let Some(s) = &rule.stuck {
        OperatorPlan::Stuck(Stuck::new(meta, s, slots(&s.metrics)?))
    } else if let Some(a) = &rule.anomaly {
        OperatorPlan::Anomaly(Anomaly::new(meta, a, slots(&a.metrics)?))
    } else {
        anyhow::bail!("rule {name} has no operator")
    })
}

impl Plan {
    /// The index of the `[broker]`'s sink in [`Plan::sinks`]; dead letters go there.
    pub const BROKER: usize = 0;

    /// The index of the sink named `name`.
    pub fn sink_index(&self, name: &str) -> Option<usize> {
        self.sinks.iter().position(|s| *s.name == *name)
    }

    /// Each rule's name with each kind of event it emits (a rule's pairs next to each other,
    /// in plan order): the label values of the per-rule metrics.
    pub fn rule_kinds(&self) -> impl Iterator<Item = (&str, &'static str)> {
        self.rules.iter().flat_map(|r| {
            r.operator
                .event_kinds()
                .iter()
                .map(move |kind| (&*r.name, *kind))
        })
    }

    /// Each rule's name and definition fingerprint, as a snapshot records them.
    pub fn fingerprints(&self) -> Vec<(String, u64)> {
        self.rules
            .iter()
            .map(|rule| (rule.name.to_string(), rule.fingerprint))
            .collect()
    }

    /// Builds the plan from a config that passed validation.
    ///
    /// # Errors
    /// Only if the config was not validated (validation reports the same problems with lines).
    pub fn build(config: &Config) -> anyhow::Result<Self> {
        let input_names: Vec<&String> = config.inputs.keys().collect();
        // Metrics each input must decode: the union of what its rules use, in first-use order.
        let mut metrics: Vec<Vec<String>> = vec![Vec::new(); input_names.len()];
        let mut discrete: Vec<Vec<String>> = vec![Vec::new(); input_names.len()];
        let mut rule_inputs = Vec::new();
        for (name, rule) in &config.rules {
            let (input_name, _) = config
                .input_of(rule)
                .with_context(|| format!("rule {name} has no input"))?;
            let input = input_names
                .iter()
                .position(|n| n.as_str() == input_name)
                .with_context(|| format!("rule {name}: unknown input"))?;
            if rule.operator_kinds().len() != 1 {
                anyhow::bail!("rule {name} needs exactly one operator");
            }
            for metric in rule.metrics() {
                if !metrics[input].contains(metric) {
                    metrics[input].push(metric.clone());
                }
            }
            for field in rule.discrete_fields() {
                if !discrete[input].contains(field) {
                    discrete[input].push(field.clone());
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
                fields: FieldPlan::new(input, std::mem::take(&mut metrics[index]))
                    .with_discrete(std::mem::take(&mut discrete[index])),
                qos: config.effective_qos(input.qos),
                max_payload_bytes: input.max_payload_bytes,
                max_clock_skew_ms: i64::try_from(input.max_clock_skew.as_millis())
                    .unwrap_or(i64::MAX),
                rules: Vec::new(),
            });
        }

        let sinks: Vec<SinkPlan> = std::iter::once(SinkPlan {
            name: crate::config::BROKER_SINK.into(),
            kind: crate::config::SinkKind::Mqtt,
        })
        .chain(config.sinks.iter().map(|(name, sink)| SinkPlan {
            name: name.as_str().into(),
            kind: sink.kind,
        }))
        .collect();
        let mut rules: Vec<RulePlan> = Vec::new();
        let mut expected = Vec::new();
        for (index, ((name, rule), input)) in config.rules.iter().zip(rule_inputs).enumerate() {
            let meta = RuleMeta {
                index,
                name: name.as_str().into(),
            };
            let fields = &inputs[input].fields;
            let operator = build_operator(name, rule, meta, fields)?;
            let mut routes = Vec::new();
            for (at, output) in rule.output.list.iter().enumerate() {
                let path = rule.output.path(name, at);
                // An http or postgres output may leave the topic out: its events carry the
                // rule's name there.
                let topic = output.topic.as_deref().unwrap_or("{rule}");
                let template = TopicTemplate::parse(topic, &inputs[input].pattern)
                    .map_err(|e| anyhow::anyhow!("{path}.topic: {e}"))?;
                let sink_name = output.sink.as_deref().unwrap_or(crate::config::BROKER_SINK);
                let sink = sinks
                    .iter()
                    .position(|s: &SinkPlan| *s.name == *sink_name)
                    .with_context(|| format!("{path}.sink: no sink `{sink_name}`"))?;
                routes.push(Route {
                    template,
                    confirm: config.effective_qos(output.qos) > 0,
                    retain: output.retain,
                    format: output.format,
                    sink,
                    table: output.table.clone().unwrap_or_else(|| name.clone()).into(),
                });
            }
            let pattern = &inputs[input].pattern;
            let mut scope = Vec::new();
            for (segment, values) in &rule.scope {
                let at = pattern
                    .name_index(segment)
                    .with_context(|| format!("rules.{name}.where.{segment} is not a segment"))?;
                scope.push((
                    at,
                    values
                        .values()
                        .iter()
                        .map(|v| Arc::from(v.as_str()))
                        .collect(),
                ));
            }
            let late_topic =
                window_of(rule).and_then(|(kind, w)| Some((kind, w.late_topic.as_ref()?)));
            let late_route = match late_topic {
                Some((kind, topic)) => Some(Route {
                    template: TopicTemplate::parse(topic, &inputs[input].pattern)
                        .map_err(|e| anyhow::anyhow!("rules.{name}.{kind}.late_topic: {e}"))?,
                    confirm: routes[0].confirm,
                    retain: false,
                    format: routes[0].format,
                    sink: routes[0].sink,
                    table: routes[0].table.clone(),
                }),
                None => None,
            };
            inputs[input].rules.push(index);
            rules.push(RulePlan {
                name: name.as_str().into(),
                fingerprint: config.fingerprints.rules.get(name).copied().unwrap_or(0),
                input,
                operator,
                routes,
                late_route,
                scope,
            });
            if let Some(liveness) = &rule.liveness {
                let names = inputs[input].pattern.names();
                for device in &liveness.expected {
                    let segments: Vec<String> = names
                        .iter()
                        .map(|n| device.get(n).cloned().unwrap_or_default())
                        .collect();
                    if rules[index].in_scope_segments(&segments) {
                        expected.push(ExpectedDevice {
                            input,
                            rule: index,
                            segments,
                        });
                    }
                }
            }
        }
        Ok(Self {
            inputs,
            rules,
            sinks,
            max_devices_per_worker: config.pipeline.max_devices_per_worker,
            when_device_limit: config.pipeline.when_device_limit,
            dedup_horizon: config.delivery.dedup_horizon,
            dead_letter_topic: config.dead_letter.topic.clone(),
            dead_letter_confirm: config.effective_qos(None) > 0,
            durable_state: config.delivery.state_dir.is_some(),
            expected,
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
        let hash =
            crate::model::event::EventId::derive(&[&input.to_le_bytes(), device.as_bytes()]).0;
        (hash % workers.max(1) as u64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{parse, Overrides, EXAMPLE};
    use std::path::Path;

    #[test]
    fn the_detectors_example_plans_its_expected_device_lists() {
        let text = include_str!("../../config/detectors.toml");
        let config = parse(text, Path::new("d.toml"), &Overrides::default()).unwrap();
        let plan = Plan::build(&config).unwrap();
        assert_eq!(plan.expected.len(), 2);
    }

    #[test]
    fn a_window_with_a_late_topic_gets_a_late_route() {
        let text = EXAMPLE.replace(
            "[rules.climate.output]",
            "late_topic = \"late/{site}/{device}/{rule}\"\n\n[rules.climate.output]",
        );
        let config = parse(&text, Path::new("x.toml"), &Overrides::default()).unwrap();
        let plan = Plan::build(&config).unwrap();
        assert!(plan.rules.iter().any(|r| r.late_route.is_some()));
    }

    #[test]
    fn each_output_of_a_rule_gets_a_route_to_its_sink() {
        let text = EXAMPLE.replace(
            "[rules.overheat.output]\ntopic",
            "[[rules.overheat.output]]\nsink = \"tickets\"\n\n[[rules.overheat.output]]\ntopic",
        ) + "\n[sinks.tickets]\nkind = \"http\"\nurl = \"http://127.0.0.1:9/hook\"\n";
        let config = parse(&text, Path::new("x.toml"), &Overrides::default()).unwrap();
        let plan = Plan::build(&config).unwrap();
        let rule = plan.rules.iter().find(|r| &*r.name == "overheat").unwrap();
        let sinks: Vec<&str> = rule
            .routes
            .iter()
            .map(|r| &*plan.sinks[r.sink].name)
            .collect();
        assert_eq!(sinks, ["tickets", "mqtt"]);
        assert_eq!(plan.sink_index("tickets"), Some(1));
        // Without a topic, an http output's events carry the rule's name there.
        assert_eq!(&*rule.routes[0].table, "overheat");
    }
}
