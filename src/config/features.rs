//! The parts of weir that are cargo features, whether this build has each, and the problem a
//! config reports when it uses one this build was made without.
//!
//! A gateway build leaves out the sinks and the cluster client it does not use (each brings a
//! client library of a megabyte or more; README, "Footprint"). Leaving one out must never turn
//! a config's section into a silent no-op: the config fails to load, at the key that needs the
//! feature, with the way to get a build that has it.

use super::validate::Problems;
use super::Config;

/// A part of weir a build may leave out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Feature {
    /// The cargo feature's name.
    pub name: &'static str,
    /// What it adds, as a config's reader knows it (`amqp sinks: RabbitMQ`).
    pub what: &'static str,
    /// Whether this binary was built with it.
    pub built: bool,
}

/// `kind = "http"` sinks (webhooks).
pub const HTTP_SINK: Feature = Feature {
    name: "http-sink",
    what: "http sinks: webhooks",
    built: cfg!(feature = "http-sink"),
};

/// `kind = "amqp"` sinks (RabbitMQ).
pub const AMQP_SINK: Feature = Feature {
    name: "amqp-sink",
    what: "amqp sinks: RabbitMQ",
    built: cfg!(feature = "amqp-sink"),
};

/// `kind = "postgres"` sinks.
pub const POSTGRES_SINK: Feature = Feature {
    name: "postgres-sink",
    what: "postgres sinks",
    built: cfg!(feature = "postgres-sink"),
};

/// `[cluster]` and `kind = "nats"` sinks (the NATS client).
pub const CLUSTER: Feature = Feature {
    name: "cluster",
    what: "[cluster] and nats sinks: NATS JetStream",
    built: cfg!(feature = "cluster"),
};

/// `weir demo`'s embedded broker.
pub const DEMO: Feature = Feature {
    name: "demo",
    what: "`weir demo`'s embedded MQTT broker",
    built: cfg!(feature = "demo"),
};

/// `observability.otlp_endpoint`.
pub const OTLP: Feature = Feature {
    name: "otlp",
    what: "OTLP export",
    built: cfg!(feature = "otlp"),
};

/// Every feature, in the order `weir --version` lists those built in (src/build.rs).
pub const ALL: [Feature; 6] = [HTTP_SINK, AMQP_SINK, POSTGRES_SINK, CLUSTER, DEMO, OTLP];

impl Feature {
    /// What to tell whoever needs this feature of a build without it: what is missing, and how
    /// to build a weir that has it.
    pub fn missing(self) -> String {
        format!(
            "this weir was built without the `{name}` cargo feature ({what}); build one with it: `cargo install --locked --path . --features {name}` (the default features have all but otlp)",
            name = self.name,
            what = self.what,
        )
    }

    /// [`Feature::missing`], and the other way out (`remove the sink`).
    pub fn missing_or(self, otherwise: &str) -> String {
        format!("{}, or {otherwise}", self.missing())
    }
}

/// The features `config` needs that `built` says this build lacks, each at the key that needs
/// it. `validate` passes [`Feature::built`]; the tests pretend a build without any.
pub(super) fn check_features(
    config: &Config,
    built: impl Fn(Feature) -> bool,
    problems: &mut Problems,
) {
    for (name, sink) in &config.sinks {
        if let Some(feature) = sink.kind.feature().filter(|f| !built(*f)) {
            problems.add(
                format!("sinks.{name}.kind"),
                feature.missing_or("remove the sink and the outputs that name it"),
            );
        }
    }
    if config.cluster.is_some() && !built(CLUSTER) {
        problems.add("cluster", CLUSTER.missing_or("remove [cluster]"));
    }
    if config.observability.otlp_endpoint.is_some() && !built(OTLP) {
        problems.add(
            "observability.otlp_endpoint",
            OTLP.missing_or("remove the key"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::error::ConfigError;
    use crate::config::test_support::line_of;
    use crate::config::{parse, Overrides, EXAMPLE};
    use std::path::Path;

    /// The example with a sink of every kind, `[cluster]` and an OTLP endpoint.
    fn everything() -> String {
        format!(
            "{EXAMPLE}
[sinks.hook]
kind = \"http\"
url = \"http://127.0.0.1:9/hook\"

[sinks.tasks]
kind = \"amqp\"
url = \"amqp://127.0.0.1:5672/%2f\"
exchange = \"weir\"

[sinks.rows]
kind = \"postgres\"
url = \"postgres://weir@127.0.0.1:5432/weir\"

[sinks.hub]
kind = \"nats\"
url = \"nats://127.0.0.1:4222\"

[cluster]
servers = [\"nats://127.0.0.1:4222\"]

[observability]
otlp_endpoint = \"http://127.0.0.1:4319\"
"
        )
    }

    #[test]
    fn each_feature_knows_whether_this_build_has_it() {
        assert_eq!(HTTP_SINK.built, cfg!(feature = "http-sink"));
        assert_eq!(AMQP_SINK.built, cfg!(feature = "amqp-sink"));
        assert_eq!(POSTGRES_SINK.built, cfg!(feature = "postgres-sink"));
        assert_eq!(CLUSTER.built, cfg!(feature = "cluster"));
        assert_eq!(DEMO.built, cfg!(feature = "demo"));
        assert_eq!(OTLP.built, cfg!(feature = "otlp"));
    }

    #[test]
    fn a_config_needing_features_a_build_lacks_names_each_at_its_line() {
        let text = everything();
        let config: crate::config::Config = toml::from_str(&text).unwrap();
        let mut problems = Problems::default();
        check_features(&config, |_| false, &mut problems);
        let err = ConfigError::invalid(
            Path::new("weir.toml"),
            &text,
            &Overrides::default(),
            problems.into_vec(),
        );
        let found: Vec<_> = err
            .problems()
            .iter()
            .map(|p| (p.path.as_str(), p.line_col.map(|lc| lc.0)))
            .collect();
        // Sinks in name order, as the config's map holds them.
        let expected = [
            ("sinks.hook.kind", line_of(&text, "kind = \"http\"")),
            ("sinks.hub.kind", line_of(&text, "kind = \"nats\"")),
            ("sinks.rows.kind", line_of(&text, "kind = \"postgres\"")),
            ("sinks.tasks.kind", line_of(&text, "kind = \"amqp\"")),
            ("cluster", line_of(&text, "[cluster]")),
            (
                "observability.otlp_endpoint",
                line_of(&text, "otlp_endpoint = \"http://127.0.0.1:4319"),
            ),
        ];
        let expected: Vec<_> = expected.iter().map(|(p, l)| (*p, Some(*l))).collect();
        assert_eq!(found, expected, "{err}");
        let rendered = err.to_string();
        let amqp = line_of(&text, "kind = \"amqp\"");
        assert!(
            rendered.contains(&format!("weir.toml:{amqp}")),
            "file and line: {rendered}"
        );
        assert!(
            rendered.contains("without the `amqp-sink` cargo feature")
                && rendered.contains("--features amqp-sink"),
            "{rendered}"
        );
    }

    /// The real build's answer: a config loads exactly when this build has what it uses (run
    /// with the default features by `cargo test`, and without them by `.ci/run`).
    #[test]
    fn a_config_loads_only_if_this_build_has_its_features() {
        let text = everything();
        let result = parse(&text, Path::new("weir.toml"), &Overrides::default());
        let missing: Vec<String> = match &result {
            Ok(_) => Vec::new(),
            Err(err) => err.problems().iter().map(|p| p.path.clone()).collect(),
        };
        let expected: Vec<&str> = [
            ("sinks.hook.kind", HTTP_SINK),
            ("sinks.hub.kind", CLUSTER),
            ("sinks.rows.kind", POSTGRES_SINK),
            ("sinks.tasks.kind", AMQP_SINK),
            ("cluster", CLUSTER),
            ("observability.otlp_endpoint", OTLP),
        ]
        .into_iter()
        .filter(|(_, feature)| !feature.built)
        .map(|(path, _)| path)
        .collect();
        assert_eq!(missing, expected, "{result:?}");
    }
}
