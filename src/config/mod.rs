//! The TOML configuration: serde types (shape), [`validate`] (meaning), and [`load`], which turns
//! every problem into a message naming the file, line and column.
//!
//! Config types are separate from runtime types: the engine builds its operators from a validated
//! [`Config`] (see `engine::Plan`). [`Secret`] and [`redact_url`] keep passwords and tokens out of
//! everything weir prints.

mod broker;
pub mod condition;
mod delivery;
pub mod endpoint;
mod error;
mod http;
mod inputs;
mod observability;
mod pipeline;
mod secret;
#[cfg(test)]
mod test_support;
pub mod topic;
mod validate;

pub use broker::{BrokerConfig, Protocol};
pub use delivery::{AckAfterConfig, DeadLetterConfig, DeliveryConfig, DeliveryMode, OutboxPolicy};
pub use error::{ConfigError, Located};
pub use http::HttpConfig;
pub use inputs::{Format, InputConfig, TimeConfig, TimeUnit};
pub use observability::ObservabilityConfig;
pub use pipeline::{DeviceLimitPolicy, PipelineConfig};
pub use secret::{redact_url, Secret, REDACTED};
pub use validate::Problem;

use inputs::default_format;
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
    pub output: OutputConfig,
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

/// Two-state hysteresis on one numeric metric.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HysteresisConfig {
    pub metric: String,
    /// The state becomes `active` when the value rises strictly above this.
    pub enter_above: f64,
    /// The state returns to `inactive` when the value falls strictly below this.
    pub exit_below: f64,
    #[serde(default = "default_active")]
    pub active: String,
    #[serde(default = "default_inactive")]
    pub inactive: String,
    /// The state a device starts in; `inactive` when absent.
    pub initial: Option<String>,
    /// Hold time (event time): a new state is entered only after its condition held this long.
    #[serde(rename = "for", default, deserialize_with = "duration")]
    pub hold: Duration,
    /// Holds transitions back while the device changes state too often.
    pub flapping: Option<FlappingConfig>,
}

/// Multi-level thresholds on one numeric metric (e.g. normal / warning / critical), each level
/// with its own set and reset value, plus hold time and flapping suppression.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThresholdsConfig {
    pub metric: String,
    /// Name of the state below every level.
    #[serde(default = "default_normal")]
    pub normal: String,
    /// Levels in rising order.
    pub levels: Vec<LevelConfig>,
    #[serde(rename = "for", default, deserialize_with = "duration")]
    pub hold: Duration,
    pub flapping: Option<FlappingConfig>,
}

/// One level of a [`ThresholdsConfig`].
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LevelConfig {
    pub name: String,
    /// The level is entered when the value rises strictly above this.
    pub set_above: f64,
    /// The level is left (downwards) when the value falls strictly below this.
    pub reset_below: f64,
}

/// Flapping suppression: more than `max_changes` transitions within `within` marks the device
/// `flapping`; its transitions are held back until it holds one state for `within`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlappingConfig {
    pub max_changes: usize,
    #[serde(deserialize_with = "duration")]
    pub within: Duration,
}

/// Report by exception: emit a value when it moved more than a band from the last one emitted.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadbandConfig {
    pub metrics: Vec<String>,
    /// Band in the metric's unit.
    pub absolute: Option<f64>,
    /// Band in percent of the last emitted value.
    pub percent: Option<f64>,
    /// Re-emit the current value when nothing was emitted for this long (event time).
    #[serde(default, deserialize_with = "opt_duration")]
    pub max_silence: Option<Duration>,
}

/// Discrete change: emit when a string, bool or integer field changes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChangeConfig {
    pub fields: Vec<String>,
    /// Also emit the first value seen for a device (with no `from`).
    #[serde(default)]
    pub emit_initial: bool,
    pub flapping: Option<FlappingConfig>,
}

/// Liveness (deadman): `offline` after `timeout` of silence (processing time), `online` again
/// on the next reading.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LivenessConfig {
    #[serde(default, deserialize_with = "opt_duration")]
    pub timeout: Option<Duration>,
    /// Devices reported offline even if they never send anything: the topic segments of each,
    /// e.g. `{ site = "plant-1", device = "dev-1" }`.
    #[serde(default)]
    pub expected: Vec<BTreeMap<String, String>>,
    /// A status field (a retained status or last-will message) that says `offline` directly.
    pub status: Option<StatusConfig>,
}

/// Where a device's own status is, for [`LivenessConfig`].
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusConfig {
    /// Payload field holding the status (`payload` for a `format = "text"` input).
    pub field: String,
    /// Values meaning offline; any other reading is a sign of life.
    #[serde(default = "default_offline_values")]
    pub offline: Vec<String>,
}

/// Rate of change: |dvalue/dt| over a window above a bound.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateOfChangeConfig {
    pub metrics: Vec<String>,
    /// The rate is taken between the current reading and the oldest within this window.
    #[serde(deserialize_with = "duration")]
    pub window: Duration,
    /// Bound on |dvalue/dt|, in the metric's unit per second.
    pub max_per_second: f64,
}

/// Stuck value: a value that has not changed (beyond `tolerance`) for `for`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StuckConfig {
    pub metrics: Vec<String>,
    #[serde(rename = "for", deserialize_with = "duration")]
    pub hold: Duration,
    #[serde(default)]
    pub tolerance: f64,
}

/// Anomaly: rolling z-score over the last `readings` readings above `z_threshold`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnomalyConfig {
    pub metrics: Vec<String>,
    /// How many past readings the mean and standard deviation are taken over.
    pub readings: usize,
    #[serde(default = "default_z_threshold")]
    pub z_threshold: f64,
    /// Readings needed before scoring starts; `readings` when absent.
    pub min_readings: Option<usize>,
    /// After an anomaly, further ones of the same metric are not emitted for this long (event time).
    #[serde(default, deserialize_with = "duration")]
    pub cooldown: Duration,
}

/// A tumbling window's table; the same keys serve every window kind.
pub type TumblingConfig = WindowConfig;

/// One window table: `[rules.NAME.tumbling]`, `.hopping`, `.session` or `.count`. The kinds share
/// every key but their shape keys (`size`, `slide`, `gap`, `max_length`, `length`, `every`);
/// validation says which shape keys a kind needs and refuses the others.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowConfig {
    /// Window length (tumbling, hopping).
    #[serde(default, deserialize_with = "opt_duration")]
    pub size: Option<Duration>,
    /// How far apart hopping windows start.
    #[serde(default, deserialize_with = "opt_duration")]
    pub slide: Option<Duration>,
    /// Silence (in event time) that closes a session.
    #[serde(default, deserialize_with = "opt_duration")]
    pub gap: Option<Duration>,
    /// Longest a session may last, from its first reading.
    #[serde(default, deserialize_with = "opt_duration")]
    pub max_length: Option<Duration>,
    /// Readings per count window.
    pub length: Option<usize>,
    /// A count window is emitted every this many readings (default: `length`).
    pub every: Option<usize>,
    pub metrics: Vec<String>,
    #[serde(default = "default_aggregates")]
    pub aggregates: Vec<Aggregate>,
    /// How far behind the newest reading of a device its watermark trails.
    #[serde(default, deserialize_with = "duration")]
    pub max_out_of_orderness: Duration,
    /// How long after firing a window still takes readings, re-emitted as updates.
    #[serde(default, deserialize_with = "duration")]
    pub allowed_lateness: Duration,
    /// Readings stamped further than this ahead of the gateway's clock are quarantined.
    #[serde(default = "default_future_skew", deserialize_with = "duration")]
    pub max_future_skew: Duration,
    /// Processing time without readings after which a device's open windows are emitted.
    #[serde(default, deserialize_with = "opt_duration")]
    pub idle_timeout: Option<Duration>,
    /// Topic template for late and quarantined readings; counted only when absent.
    pub late_topic: Option<String>,
    /// Condition over the window's aggregates; the window is emitted only when it holds.
    pub when: Option<String>,
    /// Open windows (and fired ones kept for lateness) per device and rule.
    #[serde(default = "default_max_open_windows")]
    pub max_open_windows: usize,
    #[serde(default)]
    pub on_shutdown: OnShutdown,
}

/// What a clean stop does with open windows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnShutdown {
    /// Emit them as partial windows.
    #[default]
    Flush,
    /// Leave them in the operator state, for the state snapshot to carry over a restart.
    Keep,
}

/// Aggregates a window can compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Aggregate {
    Count,
    Sum,
    Min,
    Max,
    Avg,
    /// Population standard deviation (Welford).
    Stddev,
    /// The value with the earliest event time.
    First,
    /// The value with the latest event time.
    Last,
    /// `last - first`.
    Delta,
    /// `delta` per second between the first and the last reading.
    Rate,
    P50,
    P90,
    P95,
    P99,
}

impl Aggregate {
    /// Every aggregate, in the order the README lists them.
    pub const ALL: [Aggregate; 14] = [
        Aggregate::Count,
        Aggregate::Sum,
        Aggregate::Min,
        Aggregate::Max,
        Aggregate::Avg,
        Aggregate::Stddev,
        Aggregate::First,
        Aggregate::Last,
        Aggregate::Delta,
        Aggregate::Rate,
        Aggregate::P50,
        Aggregate::P90,
        Aggregate::P95,
        Aggregate::P99,
    ];

    /// The name used in config, conditions and events.
    pub fn name(self) -> &'static str {
        match self {
            Aggregate::Count => "count",
            Aggregate::Sum => "sum",
            Aggregate::Min => "min",
            Aggregate::Max => "max",
            Aggregate::Avg => "avg",
            Aggregate::Stddev => "stddev",
            Aggregate::First => "first",
            Aggregate::Last => "last",
            Aggregate::Delta => "delta",
            Aggregate::Rate => "rate",
            Aggregate::P50 => "p50",
            Aggregate::P90 => "p90",
            Aggregate::P95 => "p95",
            Aggregate::P99 => "p99",
        }
    }

    /// The quantile of a percentile aggregate.
    pub fn quantile(self) -> Option<f64> {
        match self {
            Aggregate::P50 => Some(0.50),
            Aggregate::P90 => Some(0.90),
            Aggregate::P95 => Some(0.95),
            Aggregate::P99 => Some(0.99),
            _ => None,
        }
    }
}

/// Where a rule's derived events are published.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputConfig {
    /// Topic template over the input's named segments and `{rule}`.
    pub topic: String,
    /// 0 or 1; 1 under `at_least_once`, 0 otherwise, when absent.
    pub qos: Option<u8>,
    #[serde(default)]
    pub retain: bool,
    #[serde(default = "default_format")]
    pub format: Format,
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

    /// Worker count after resolving 0 to the number of cores.
    pub fn worker_count(&self) -> usize {
        match self.pipeline.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
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

fn default_normal() -> String {
    "normal".into()
}
fn default_offline_values() -> Vec<String> {
    vec!["offline".into()]
}
fn default_z_threshold() -> f64 {
    4.0
}
fn default_future_skew() -> Duration {
    Duration::from_secs(300)
}
fn default_max_open_windows() -> usize {
    1024
}
fn default_active() -> String {
    "active".into()
}
fn default_inactive() -> String {
    "inactive".into()
}
fn default_aggregates() -> Vec<Aggregate> {
    vec![
        Aggregate::Count,
        Aggregate::Min,
        Aggregate::Max,
        Aggregate::Avg,
    ]
}

#[cfg(test)]
mod tests {
    use super::test_support::{detectors_problem_after, line_of, problem_after, DETECTORS};
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
    fn exit_below_above_enter_names_its_line() {
        let (problem, text) = problem_after("exit_below = 28.0", "exit_below = 31.0");
        assert_eq!(problem.path, "rules.overheat.hysteresis.exit_below");
        assert_eq!(
            problem.line_col,
            Some((line_of(&text, "exit_below = 31.0"), 1))
        );
        assert!(problem.message.contains("must be below enter_above (30.0)"));
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
    fn a_bad_condition_names_the_line_and_the_column_inside_the_string() {
        let aggregates = "aggregates = [\"count\", \"min\", \"max\", \"avg\"]";
        let (problem, text) = problem_after(
            aggregates,
            &format!("{aggregates}\nwhen = \"avg(temprature) > 30\""),
        );
        assert_eq!(problem.path, "rules.climate.tumbling.when");
        // Column 13 is the `t` of `temprature`, after `when = "avg(`.
        assert_eq!(problem.line_col, Some((line_of(&text, "when = "), 13)));
        assert!(problem.message.contains("not one of this window's metrics"));
    }

    #[test]
    fn window_kinds_take_only_their_own_shape_keys() {
        let (problem, _) = problem_after("size = \"10s\"", "size = \"10s\"\nslide = \"5s\"");
        assert_eq!(problem.path, "rules.climate.tumbling.slide");
        assert!(
            problem.message.contains("shape keys are size"),
            "{}",
            problem.message
        );
        let (problem, _) = problem_after("[rules.climate.tumbling]", "[rules.climate.hopping]");
        assert_eq!(problem.path, "rules.climate.hopping.slide");
        assert!(problem.message.contains("required"), "{}", problem.message);
        let (problem, _) = problem_after(
            "[rules.climate.tumbling]\nsize = \"10s\"",
            "[rules.climate.session]\ngap = \"0s\"",
        );
        assert_eq!(problem.path, "rules.climate.session.gap");
    }

    #[test]
    fn every_window_kind_and_key_parses() {
        let windows = r#"
[rules.climate.hopping]
size = "1m"
slide = "10s"
metrics = ["temperature"]
aggregates = ["count", "sum", "min", "max", "avg", "stddev", "first", "last", "delta", "rate", "p50", "p90", "p95", "p99"]
max_out_of_orderness = "2s"
allowed_lateness = "30s"
max_future_skew = "1m"
idle_timeout = "2m"
late_topic = "late/{site}/{device}/{rule}"
when = "p95(temperature) > 30 or (count >= 5 and not rate(temperature) < 0)"
max_open_windows = 16
on_shutdown = "keep"
"#;
        let start = EXAMPLE.find("[rules.climate.tumbling]").unwrap();
        let end = EXAMPLE.find("[rules.climate.output]").unwrap();
        let text = format!("{}{windows}\n{}", &EXAMPLE[..start], &EXAMPLE[end..]);
        let config = parse(&text, Path::new("x.toml"), &Overrides::default()).unwrap();
        let hopping = config.rules["climate"].hopping.as_ref().unwrap();
        assert_eq!(hopping.aggregates.len(), 14);
        assert_eq!(hopping.on_shutdown, OnShutdown::Keep);
        assert_eq!(hopping.idle_timeout, Some(Duration::from_secs(120)));
        assert!(hopping.late_topic.is_some());
    }

    #[test]
    fn the_detectors_example_is_valid() {
        let config = parse(DETECTORS, Path::new("d.toml"), &Overrides::default()).unwrap();
        assert_eq!(config.rules.len(), 9);
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
    fn threshold_levels_must_rise_and_reset_below_their_set_value() {
        let (problem, text) = detectors_problem_after(
            "set_above = 90.0, reset_below = 85.0",
            "set_above = 60.0, reset_below = 55.0",
        );
        assert_eq!(problem.path, "rules.temperature_level.thresholds.levels[1]");
        assert_eq!(
            problem.line_col.map(|lc| lc.0),
            Some(line_of(&text, "set_above = 60.0"))
        );
        let (problem, _) = detectors_problem_after("reset_below = 65.0", "reset_below = 75.0");
        assert_eq!(
            problem.path,
            "rules.temperature_level.thresholds.levels[0].reset_below"
        );
    }

    #[test]
    fn a_hold_time_needs_a_unit_and_names_its_line() {
        let (problem, text) = detectors_problem_after("for = \"30s\"", "for = \"30\"");
        assert_eq!(
            problem.line_col.map(|lc| lc.0),
            Some(line_of(&text, "for = \"30\""))
        );
    }

    #[test]
    fn deadband_needs_exactly_one_band() {
        let (problem, _) =
            detectors_problem_after("absolute = 0.5 ", "percent = 1.0\nabsolute = 0.5 ");
        assert_eq!(problem.path, "rules.temperature_report.deadband");
        assert!(problem.message.contains("not both"));
    }

    #[test]
    fn expected_devices_name_every_segment() {
        let (problem, _) = detectors_problem_after(
            "{ site = \"plant-1\", device = \"press-2\" }",
            "{ device = \"press-2\" }",
        );
        assert_eq!(problem.path, "rules.alive.liveness.expected[1]");
        assert!(
            problem.message.contains("missing: site"),
            "{}",
            problem.message
        );
    }

    #[test]
    fn liveness_needs_a_timeout_or_a_status() {
        let (problem, _) = detectors_problem_after(
            "status = { field = \"payload\", offline = [\"offline\"] }",
            "",
        );
        assert_eq!(problem.path, "rules.last_will.liveness");
    }

    #[test]
    fn anomaly_window_and_flapping_bounds_are_checked() {
        let (problem, _) = detectors_problem_after("readings = 144", "readings = 1");
        assert_eq!(problem.path, "rules.odd_temperature.anomaly.readings");
        let (problem, _) = detectors_problem_after("max_changes = 5", "max_changes = 0");
        assert_eq!(
            problem.path,
            "rules.temperature_level.thresholds.flapping.max_changes"
        );
    }

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
