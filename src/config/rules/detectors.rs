//! Detector operators of a rule (hysteresis, thresholds, deadband, change, liveness, rate of
//! change, stuck, anomaly): their tables, shared flapping suppression, and their checks.

use crate::config::topic::TopicPattern;
use crate::config::validate::Problems;
use crate::config::{duration, opt_duration};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::time::Duration;

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

fn default_normal() -> String {
    "normal".into()
}
fn default_offline_values() -> Vec<String> {
    vec!["offline".into()]
}
fn default_z_threshold() -> f64 {
    4.0
}
fn default_active() -> String {
    "active".into()
}
fn default_inactive() -> String {
    "inactive".into()
}

pub(super) fn check_hysteresis(path: &str, h: &HysteresisConfig, problems: &mut Problems) {
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

pub(super) fn check_thresholds(path: &str, t: &ThresholdsConfig, problems: &mut Problems) {
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

pub(super) fn check_deadband(path: &str, d: &DeadbandConfig, problems: &mut Problems) {
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

pub(super) fn check_change(path: &str, c: &ChangeConfig, problems: &mut Problems) {
    check_metrics(path, "fields", &c.fields, problems);
    check_flapping(path, c.flapping.as_ref(), problems);
}

pub(super) fn check_liveness(
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

pub(super) fn check_rate_of_change(path: &str, r: &RateOfChangeConfig, problems: &mut Problems) {
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

pub(super) fn check_stuck(path: &str, s: &StuckConfig, problems: &mut Problems) {
    check_metrics(path, "metrics", &s.metrics, problems);
    if s.hold < Duration::from_millis(1) {
        problems.add(format!("{path}.for"), "must be at least 1ms");
    }
    if !(s.tolerance.is_finite() && s.tolerance >= 0.0) {
        problems.add(format!("{path}.tolerance"), "must be a finite number >= 0");
    }
}

pub(super) fn check_anomaly(path: &str, a: &AnomalyConfig, problems: &mut Problems) {
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

#[cfg(test)]
mod tests {
    use crate::config::test_support::{detectors_problem_after, line_of, problem_after, DETECTORS};
    use crate::config::{parse, Overrides};
    use std::path::Path;

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
    fn the_detectors_example_is_valid() {
        let config = parse(DETECTORS, Path::new("d.toml"), &Overrides::default()).unwrap();
        assert_eq!(config.rules.len(), 9);
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
}
