//! Window operators of a rule (`[rules.NAME.tumbling]`, `.hopping`, `.session`, `.count`): one
//! table shape for every kind, the aggregates, and the checks of each kind's shape keys.

use crate::config::validate::Problems;
use crate::config::{duration, opt_duration};
use serde::Deserialize;
use std::time::Duration;

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

fn default_future_skew() -> Duration {
    Duration::from_secs(300)
}
fn default_max_open_windows() -> usize {
    1024
}
fn default_aggregates() -> Vec<Aggregate> {
    vec![
        Aggregate::Count,
        Aggregate::Min,
        Aggregate::Max,
        Aggregate::Avg,
    ]
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

pub(super) fn check_window(path: &str, kind: &str, w: &WindowConfig, problems: &mut Problems) {
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
        if let Err(err) = crate::config::condition::Condition::parse(when, &w.metrics) {
            problems.add_at(format!("{path}.when"), err.offset, err.message);
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::test_support::{line_of, problem_after};
    use crate::config::{parse, OnShutdown, Overrides, EXAMPLE};
    use std::path::Path;
    use std::time::Duration;

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
}
