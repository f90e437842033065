//! The TOML configuration: serde types (shape), [`validate`] (meaning), and [`load`], which turns
//! every problem into a message naming the file, line and column.
//!
//! Config types are separate from runtime types: the engine builds its operators from a validated
//! [`Config`] (see `engine::Plan`). [`Secret`] and [`redact_url`] keep passwords and tokens out of
//! everything weir prints.
//!
//! Each section of the file has its own module, holding its serde shapes, their defaults and
//! the checks that only need that section:
//!
//! - `broker.rs`: `[broker]`, how to reach the MQTT broker (URLs, protocol, credentials, TLS).
//! - `http.rs`: `[http]`, where `/metrics` and the API listen, and the API's token.
//! - `pipeline.rs`: `[pipeline]`, workers, channel capacity and the device limit.
//! - `inputs.rs`: `[inputs.NAME]`, topic patterns, payload formats and event time.
//! - `rules/`: `[rules.NAME]`, scoping, one operator and the output; window kinds in
//!   `rules/windows.rs`, the other operators in `rules/detectors.rs`.
//! - `delivery.rs`: `[delivery]` and `[dead_letter]`, the delivery guarantee, state dir and outbox.
//! - `observability.rs`: `[observability]`, OTLP export.
//! - `cluster.rs`: `[cluster]`, the NATS JetStream stream that replaces the MQTT subscription
//!   when several instances share a fleet, and the partition function.
//! - `sinks.rs`: `[sinks.NAME]`, webhooks, AMQP exchanges, PostgreSQL and other brokers that
//!   rule outputs name.
//! - `features.rs`: which sinks and sections are cargo features, and the problem a config
//!   reports when it uses one this build was made without.
//!
//! Around them: `validate.rs` walks the sections and holds the checks that span several (what
//! `at_least_once` asks of the others; one type per payload field across rules); `error.rs`
//! places each problem in the file; `secret.rs` hides passwords and tokens; `endpoint.rs` parses
//! broker and OTLP URLs; `condition.rs` parses a window's `when`; `topic.rs` parses topic
//! patterns and templates; `test_support.rs` (tests only) edits the example configs for the
//! tests of every section. This file holds the root [`Config`], [`Overrides`], [`load`] and
//! [`parse`], [`Fingerprints`], and the duration parser every section uses.

mod broker;
pub mod cluster;
pub mod condition;
mod delivery;
pub mod endpoint;
mod error;
pub mod features;
mod http;
mod inputs;
mod observability;
mod pipeline;
mod rules;
mod secret;
pub mod sinks;
#[cfg(test)]
mod test_support;
pub mod topic;
mod validate;

pub use broker::{BrokerConfig, Protocol};
pub use cluster::ClusterConfig;
pub use delivery::{AckAfterConfig, DeadLetterConfig, DeliveryConfig, DeliveryMode, OutboxPolicy};
pub use error::{ConfigError, Located};
pub use http::HttpConfig;
pub use inputs::{Format, InputConfig, TimeConfig, TimeUnit};
pub use observability::ObservabilityConfig;
pub use pipeline::{DeviceLimitPolicy, Layout, PipelineConfig};
pub use rules::{
    Aggregate, AnomalyConfig, ChangeConfig, DeadbandConfig, FlappingConfig, HysteresisConfig,
    LevelConfig, LivenessConfig, OnShutdown, OutputConfig, Outputs, RateOfChangeConfig, RuleConfig,
    ScopeValues, StatusConfig, StuckConfig, ThresholdsConfig, TumblingConfig, WindowConfig,
};
pub use secret::{redact_url, Secret, REDACTED};
pub use sinks::{AmqpMessage, SinkConfig, SinkKind, BROKER_SINK};
pub use validate::Problem;

use serde::{Deserialize, Deserializer};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub broker: BrokerConfig,
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default)]
    pub pipeline: PipelineConfig,
    /// Inputs by name; each names a topic pattern and a payload format.
    pub inputs: BTreeMap<String, InputConfig>,
    /// Rules by name; the name appears in events, topics and metrics.
    #[serde(default)]
    pub rules: BTreeMap<String, RuleConfig>,
    #[serde(default)]
    pub delivery: DeliveryConfig,
    /// Reading from a NATS JetStream stream instead of an MQTT subscription (scale-out).
    pub cluster: Option<ClusterConfig>,
    /// Sinks besides the broker (webhooks, AMQP, PostgreSQL), by name.
    #[serde(default)]
    pub sinks: BTreeMap<String, SinkConfig>,
    #[serde(default)]
    pub dead_letter: DeadLetterConfig,
    #[serde(default)]
    pub observability: ObservabilityConfig,
    /// What the file said, hashed; set by [`parse`].
    #[serde(skip)]
    pub fingerprints: Fingerprints,
    /// The file it was loaded from ([`load`]), read again by a reload.
    #[serde(skip)]
    pub file: Option<PathBuf>,
    /// What replaced the file's values; a reload applies them again.
    #[serde(skip)]
    pub overrides: Overrides,
}

/// Hashes of what the file says, to tell which rules a reload changed, and whether a snapshot's
/// state was made by the same rule definitions. They hash the parsed TOML, so formatting,
/// comments and key order do not count, and neither does a default changing between versions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fingerprints {
    /// Per rule: its table together with the table of the input it reads (the input's fields
    /// and formats shape what the rule sees).
    pub rules: BTreeMap<String, u64>,
    /// Every other top-level section (`broker`, `inputs`, ...), by name.
    pub sections: BTreeMap<String, u64>,
}

impl Fingerprints {
    fn of(table: &toml::Table, config: &Config) -> Self {
        let empty = toml::Table::new();
        let section = |name: &str| match table.get(name) {
            Some(toml::Value::Table(section)) => section,
            _ => &empty,
        };
        let (inputs, rules) = (section("inputs"), section("rules"));
        let rules = config
            .rules
            .iter()
            .map(|(name, rule)| {
                let mut hash = Fnv::default();
                if let Some(value) = rules.get(name) {
                    hash.value(value);
                }
                if let Some((input, _)) = config.input_of(rule) {
                    hash.bytes(input.as_bytes());
                    if let Some(value) = inputs.get(input) {
                        hash.value(value);
                    }
                }
                (name.clone(), hash.0)
            })
            .collect();
        let sections = table
            .iter()
            .filter(|(key, _)| *key != "rules")
            .map(|(key, value)| {
                let mut hash = Fnv::default();
                hash.value(value);
                (key.clone(), hash.0)
            })
            .collect();
        Self { rules, sections }
    }

    /// The top-level sections other than `[rules]` that differ between the two.
    pub fn changed_sections(&self, other: &Self) -> Vec<String> {
        let mut names: Vec<&String> = self.sections.keys().chain(other.sections.keys()).collect();
        names.sort();
        names.dedup();
        names
            .into_iter()
            .filter(|name| self.sections.get(*name) != other.sections.get(*name))
            .cloned()
            .collect()
    }
}

/// FNV-1a over a canonical walk of TOML values (keys in sorted order, each item tagged).
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    fn bytes(&mut self, bytes: &[u8]) {
        for byte in bytes.iter().chain(&[0xff]) {
            self.0 ^= u64::from(*byte);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    fn value(&mut self, value: &toml::Value) {
        match value {
            toml::Value::String(s) => {
                self.bytes(b"s");
                self.bytes(s.as_bytes());
            }
            toml::Value::Integer(n) => {
                self.bytes(b"i");
                self.bytes(&n.to_le_bytes());
            }
            toml::Value::Float(x) => {
                self.bytes(b"f");
                self.bytes(&x.to_bits().to_le_bytes());
            }
            toml::Value::Boolean(b) => self.bytes(if *b { b"t" } else { b"F" }),
            toml::Value::Datetime(d) => {
                self.bytes(b"d");
                self.bytes(d.to_string().as_bytes());
            }
            toml::Value::Array(items) => {
                self.bytes(b"[");
                items.iter().for_each(|item| self.value(item));
                self.bytes(b"]");
            }
            toml::Value::Table(table) => {
                self.bytes(b"{");
                let mut keys: Vec<_> = table.keys().collect();
                keys.sort();
                for key in keys {
                    self.bytes(key.as_bytes());
                    self.value(&table[key]);
                }
                self.bytes(b"}");
            }
        }
    }
}

/// Values from the command line or environment that replace the file's.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--broker` / `WEIR_BROKER`.
    pub broker_url: Option<String>,
    /// `--metrics-addr` / `WEIR_METRICS_ADDR`.
    pub metrics_addr: Option<SocketAddr>,
    /// `--state-dir` / `WEIR_STATE_DIR`.
    pub state_dir: Option<PathBuf>,
    /// `WEIR_BROKER_PASSWORD` only (a flag would show in `ps`): replaces `broker.password` and
    /// `broker.password_file`.
    pub broker_password: Option<Secret>,
    /// `WEIR_API_TOKEN` only: replaces `http.api_token_file`.
    pub api_token: Option<Secret>,
}

impl Config {
    /// The input a rule reads: its `input`, or the only input there is.
    pub fn input_of<'a>(&'a self, rule: &'a RuleConfig) -> Option<(&'a str, &'a InputConfig)> {
        match &rule.input {
            Some(name) => self
                .inputs
                .get_key_value(name)
                .map(|(k, v)| (k.as_str(), v)),
            None if self.inputs.len() == 1 => {
                self.inputs.iter().next().map(|(k, v)| (k.as_str(), v))
            }
            None => None,
        }
    }

    /// Worker count after resolving 0: one per core as tasks, one inline (where more would
    /// share the one core anyway).
    pub fn worker_count(&self, inline: bool) -> usize {
        match (self.pipeline.workers, inline) {
            (0, true) => 1,
            (0, false) => std::thread::available_parallelism().map_or(1, |n| n.get()),
            (n, _) => n,
        }
    }

    fn apply(&mut self, overrides: &Overrides) {
        if let Some(url) = &overrides.broker_url {
            self.broker.url.clone_from(url);
        }
        if let Some(addr) = overrides.metrics_addr {
            self.http.listen = addr;
        }
        if let Some(token) = &overrides.api_token {
            self.http.api_token_env = Some(token.clone());
        }
        if let Some(dir) = &overrides.state_dir {
            self.delivery.state_dir = Some(dir.clone());
        }
        if let Some(password) = &overrides.broker_password {
            self.broker.password = Some(password.clone());
            self.broker.password_file = None;
        }
    }

    /// The QoS an input subscribes with, or an output publishes with, under the delivery mode.
    pub fn effective_qos(&self, configured: Option<u8>) -> u8 {
        configured.unwrap_or(match self.delivery.mode {
            DeliveryMode::AtLeastOnce => 1,
            DeliveryMode::AtMostOnce => 0,
        })
    }
}

/// The reference scenario `config/example.toml`, built in so `weir demo` runs from anywhere.
pub const EXAMPLE: &str = include_str!("../../config/example.toml");

/// Reads, parses and validates a config file, applying `overrides` before validation.
///
/// # Errors
/// [`ConfigError`] lists every problem found, each with file, line and column.
pub fn load(path: &Path, overrides: &Overrides) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        file: path.to_owned(),
        source,
    })?;
    let mut config = parse(&text, path, overrides)?;
    config.file = Some(path.to_owned());
    Ok(config)
}

/// Parses and validates config text; `file` is only used in messages.
///
/// # Errors
/// As [`load`].
pub fn parse(text: &str, file: &Path, overrides: &Overrides) -> Result<Config, ConfigError> {
    let mut config: Config =
        toml::from_str(text).map_err(|err| ConfigError::from_toml(file, text, &err))?;
    let table: toml::Table =
        toml::from_str(text).map_err(|err| ConfigError::from_toml(file, text, &err))?;
    config.fingerprints = Fingerprints::of(&table, &config);
    config.apply(overrides);
    config.overrides = overrides.clone();
    let problems = validate::validate(&config);
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(ConfigError::invalid(file, text, overrides, problems))
    }
}

/// As [`duration`], for optional keys (used with `#[serde(default)]`).
fn opt_duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Duration>, D::Error> {
    duration(deserializer).map(Some)
}

/// Deserializes `"10s"`, `"500ms"`, `"1m 30s"` into a [`Duration`].
fn duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(deserializer)?;
    humantime::parse_duration(&text).map_err(|err| {
        serde::de::Error::custom(format!(
            "`{text}` is not a duration ({err}); write it with a unit, like \"10s\", \"500ms\" or \"2m\""
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::test_support::{line_of, problem_after};
    use super::*;

    #[test]
    fn the_example_is_valid() {
        let config = parse(EXAMPLE, Path::new("example.toml"), &Overrides::default()).unwrap();
        assert_eq!(config.rules.len(), 2);
        assert_eq!(config.broker.keep_alive, Duration::from_secs(30));
    }

    fn fingerprints_of(text: &str) -> Fingerprints {
        parse(text, Path::new("example.toml"), &Overrides::default())
            .unwrap_or_else(|err| panic!("{err}"))
            .fingerprints
    }

    #[test]
    fn fingerprints_see_definitions_not_formatting() {
        let original = fingerprints_of(EXAMPLE);
        // Comments, spacing, number spelling and an inline table say the same thing.
        let reformatted = EXAMPLE
            .replace("enter_above = 30.0", "enter_above   =   30.00   # comment")
            .replace(
                "[rules.overheat.output]\n",
                "[rules.overheat.output] # where alerts go\n",
            );
        assert_eq!(fingerprints_of(&reformatted), original);

        let changed = fingerprints_of(&EXAMPLE.replace("enter_above = 30.0", "enter_above = 31.0"));
        assert_ne!(changed.rules["overheat"], original.rules["overheat"]);
        assert_eq!(changed.rules["climate"], original.rules["climate"]);
        assert!(original.changed_sections(&changed).is_empty());

        // An input change changes every rule reading it, and names its section.
        let input = fingerprints_of(&EXAMPLE.replace("seq_field = \"seq\"", "seq_field = \"n\""));
        assert_ne!(input.rules["overheat"], original.rules["overheat"]);
        assert_ne!(input.rules["climate"], original.rules["climate"]);
        assert_eq!(original.changed_sections(&input), ["inputs"]);
    }

    #[test]
    fn unknown_key_is_an_error_listing_the_valid_keys() {
        let (problem, text) = problem_after("exit_below = 28.0", "exit_belo = 28.0");
        assert_eq!(problem.line_col, Some((line_of(&text, "exit_belo ="), 1)));
        assert!(
            problem.message.contains("unknown field `exit_belo`"),
            "{}",
            problem.message
        );
        assert!(
            problem.message.contains("exit_below"),
            "{}",
            problem.message
        );
    }

    #[test]
    fn wrong_type_names_the_value() {
        let (problem, text) = problem_after("enter_above = 30.0", "enter_above = \"hot\"");
        assert_eq!(
            problem.line_col.map(|lc| lc.0),
            Some(line_of(&text, "enter_above"))
        );
        assert!(
            problem.message.contains("invalid type"),
            "{}",
            problem.message
        );
    }

    #[test]
    fn missing_required_key_is_named() {
        let (problem, _) = problem_after("metric = \"temperature\"\n", "");
        assert!(
            problem.message.contains("missing field `metric`"),
            "{}",
            problem.message
        );
    }

    #[test]
    fn durations_need_a_unit() {
        let (problem, text) = problem_after("size = \"10s\"", "size = \"10\"");
        assert_eq!(
            problem.line_col.map(|lc| lc.0),
            Some(line_of(&text, "size = \"10\""))
        );
        assert!(
            problem.message.contains("with a unit"),
            "{}",
            problem.message
        );
    }

    #[test]
    fn a_bad_broker_override_says_where_it_came_from() {
        let overrides = Overrides {
            broker_url: Some("tcp://x".into()),
            ..Overrides::default()
        };
        let err = parse(EXAMPLE, Path::new("example.toml"), &overrides).unwrap_err();
        let problem = &err.problems()[0];
        assert_eq!(problem.line_col, None);
        assert!(problem.message.contains("--broker"));
    }
}
