//! `[sinks.NAME]`: where derived events can go besides the broker: an HTTP webhook, an AMQP
//! exchange (RabbitMQ) or a PostgreSQL database, or a second MQTT broker. A rule's outputs name
//! them (`sink = "NAME"`); the broker of `[broker]` is the sink `mqtt`, which needs no table.
//!
//! One flat table per sink, with the keys of its `kind` (a key of another kind is an error that
//! says which kinds take it), so that every problem names the key to fix.

use super::validate::Problems;
use super::{duration, redact_url, OutboxPolicy};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// The name of the sink that is the `[broker]` (publishing to `broker.publish_url` if set).
pub const BROKER_SINK: &str = "mqtt";

/// What kind of service a sink delivers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SinkKind {
    /// An MQTT broker other than `[broker]`.
    Mqtt,
    /// POST to a webhook.
    Http,
    /// Publish to an AMQP 0-9-1 exchange (RabbitMQ).
    Amqp,
    /// Insert rows into PostgreSQL.
    Postgres,
    /// Publish to NATS subjects (captured by the `[cluster]` output stream), each with
    /// `Nats-Msg-Id` = the event id, so the server drops re-emitted events.
    Nats,
}

impl SinkKind {
    pub fn name(self) -> &'static str {
        match self {
            SinkKind::Mqtt => "mqtt",
            SinkKind::Http => "http",
            SinkKind::Amqp => "amqp",
            SinkKind::Postgres => "postgres",
            SinkKind::Nats => "nats",
        }
    }

    /// The cargo feature that brings this kind's client; `None` for MQTT, which every build has.
    pub fn feature(self) -> Option<super::features::Feature> {
        use super::features::{AMQP_SINK, CLUSTER, HTTP_SINK, POSTGRES_SINK};
        match self {
            SinkKind::Mqtt => None,
            SinkKind::Http => Some(HTTP_SINK),
            SinkKind::Amqp => Some(AMQP_SINK),
            SinkKind::Postgres => Some(POSTGRES_SINK),
            // The NATS sink publishes into the [cluster] output stream, with the same client.
            SinkKind::Nats => Some(CLUSTER),
        }
    }

    /// Whether an output to this kind needs a topic (MQTT: the topic; AMQP: the routing key).
    pub fn needs_topic(self) -> bool {
        matches!(self, SinkKind::Mqtt | SinkKind::Amqp | SinkKind::Nats)
    }
}

/// The message an AMQP sink publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AmqpMessage {
    /// The event itself (schema v1 JSON or CBOR), as the body.
    #[default]
    Event,
    /// A Celery task message (protocol 2) calling `celery_task` with the event as its one
    /// argument, so a Celery worker runs a task per event with no bridge in between.
    Celery,
}

/// One `[sinks.NAME]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    pub kind: SinkKind,
    /// `http(s)://…` (http), `amqp(s)://user:pass@host:port/vhost` (amqp),
    /// `postgres://user@host:port/db` (postgres), `mqtt(s)://host:port` (mqtt). A password in
    /// it is never printed; `password_file` keeps it out of the config.
    pub url: String,
    /// A file holding only the password for `url` (amqp, postgres), read at start.
    pub password_file: Option<PathBuf>,
    /// Events held for this sink while it is away or has not confirmed them;
    /// `delivery.outbox_max_messages` when absent.
    pub outbox_max_messages: Option<usize>,
    /// `block`, `drop_oldest` or `drop_newest`; `delivery.outbox_when_full` when absent.
    pub outbox_when_full: Option<OutboxPolicy>,
    /// How long one request, publish confirmation or insert may take before it counts as failed
    /// (and is retried).
    #[serde(default = "default_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
    /// The first wait before a retry; it doubles (with jitter) up to `retry_max`.
    #[serde(default = "default_retry_initial", deserialize_with = "duration")]
    pub retry_initial: Duration,
    #[serde(default = "default_retry_max", deserialize_with = "duration")]
    pub retry_max: Duration,
    /// Events per request (http: more than 1 posts a JSON array), per insert (postgres), or
    /// published before waiting for their confirms (amqp).
    pub batch: Option<usize>,
    /// PEM file of the CA certificates to trust (https, mqtts, tls://) instead of the system's
    /// roots.
    pub ca_file: Option<PathBuf>,

    // http
    /// Extra request headers (http).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// A file holding a bearer token sent as `Authorization: Bearer …` (http).
    pub bearer_token_file: Option<PathBuf>,
    /// The name of an environment variable holding the bearer token (http).
    pub bearer_token_env: Option<String>,

    // amqp
    /// The exchange events are published to (amqp); it must exist (`weir sinks init` declares it).
    pub exchange: Option<String>,
    /// The exchange's type when `weir sinks init` declares it: `topic` (default), `direct`,
    /// `fanout` or `headers`.
    pub exchange_type: Option<String>,
    /// `event` (default) or `celery` (amqp).
    pub message: Option<AmqpMessage>,
    /// The Celery task name (amqp with `message = "celery"`), e.g. `alerts.handle`.
    pub celery_task: Option<String>,
}

impl SinkConfig {
    /// Events per request / insert / confirm round, with the kind's default.
    pub fn batch_size(&self) -> usize {
        self.batch.unwrap_or(match self.kind {
            SinkKind::Postgres => 500,
            SinkKind::Amqp => 256,
            SinkKind::Nats => 256,
            SinkKind::Http | SinkKind::Mqtt => 1,
        })
    }

    /// Whether the files this sink reads at start can be read (`weir check` runs it; it does
    /// not connect). The error names the key and the file, never the content.
    pub fn check_files(&self) -> Result<(), String> {
        let files = [
            ("password_file", &self.password_file),
            ("bearer_token_file", &self.bearer_token_file),
            ("ca_file", &self.ca_file),
        ];
        for (key, file) in files {
            if let Some(file) = file {
                std::fs::metadata(file)
                    .and_then(|_| std::fs::File::open(file).map(drop))
                    .map_err(|err| format!("{key}: cannot read {}: {err}", file.display()))?;
            }
        }
        if let Some(var) = &self.bearer_token_env {
            if std::env::var_os(var).is_none() {
                return Err(format!(
                    "bearer_token_env: the environment variable {var} is not set here; weir run needs it"
                ));
            }
        }
        Ok(())
    }

    /// `url` with any password replaced, for messages and logs.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.url).into_owned()
    }
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_retry_initial() -> Duration {
    Duration::from_millis(200)
}
fn default_retry_max() -> Duration {
    Duration::from_secs(30)
}

/// Whether `name` can name a PostgreSQL table or column without quoting.
pub fn is_sql_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && name.len() <= 63
}

pub(super) fn check_sinks(sinks: &BTreeMap<String, SinkConfig>, problems: &mut Problems) {
    for (name, sink) in sinks {
        check_sink(name, sink, problems);
    }
}

fn check_sink(name: &str, sink: &SinkConfig, problems: &mut Problems) {
    let path = format!("sinks.{name}");
    if name == BROKER_SINK {
        problems.add(
            &path,
            "`mqtt` is the sink of [broker]; give this sink another name, e.g. [sinks.second_broker]",
        );
    }
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        problems.add(
            &path,
            "a sink name is letters, digits, `_` and `-` (it appears in metrics)",
        );
    }
    let kind = sink.kind;
    let schemes: &[&str] = match kind {
        SinkKind::Http => &["http", "https"],
        SinkKind::Amqp => &["amqp", "amqps"],
        SinkKind::Postgres => &["postgres", "postgresql"],
        SinkKind::Mqtt => &["mqtt", "mqtts", "tcp", "ssl"],
        SinkKind::Nats => &["nats", "tls"],
    };
    let scheme = sink.url.split_once("://").map(|(scheme, _)| scheme);
    if !scheme.is_some_and(|s| schemes.contains(&s)) {
        problems.add(
            format!("{path}.url"),
            format!(
                "`{}` is not a {} URL; write it as {}://host:port/…",
                sink.redacted_url(),
                kind.name(),
                schemes[0]
            ),
        );
    }
    if sink.outbox_max_messages == Some(0) {
        problems.add(format!("{path}.outbox_max_messages"), "must be at least 1");
    }
    if sink.batch == Some(0) || sink.batch.is_some_and(|b| b > 10_000) {
        problems.add(format!("{path}.batch"), "must be between 1 and 10000");
    }
    if sink.timeout.is_zero() {
        problems.add(
            format!("{path}.timeout"),
            "must be more than 0s, e.g. \"10s\"",
        );
    }
    if sink.retry_initial.is_zero() {
        problems.add(
            format!("{path}.retry_initial"),
            "must be more than 0s, e.g. \"200ms\"",
        );
    } else if sink.retry_initial > sink.retry_max {
        problems.add(
            format!("{path}.retry_max"),
            format!(
                "is below retry_initial ({}); raise retry_max or lower retry_initial",
                humantime::format_duration(sink.retry_initial)
            ),
        );
    }

    // Keys that only some kinds take.
    let only = |key: &str, present: bool, kinds: &[SinkKind], problems: &mut Problems| {
        if present && !kinds.contains(&kind) {
            let names: Vec<&str> = kinds.iter().map(|k| k.name()).collect();
            problems.add(
                format!("{path}.{key}"),
                format!(
                    "is not used by a {} sink (only by kind {}); remove it",
                    kind.name(),
                    names.join(" or ")
                ),
            );
        }
    };
    use SinkKind::{Amqp, Http, Mqtt, Nats, Postgres};
    only(
        "password_file",
        sink.password_file.is_some(),
        &[Amqp, Postgres],
        problems,
    );
    only(
        "batch",
        sink.batch.is_some(),
        &[Http, Amqp, Postgres, Nats],
        problems,
    );
    only(
        "ca_file",
        sink.ca_file.is_some(),
        &[Http, Mqtt, Nats],
        problems,
    );
    only("headers", !sink.headers.is_empty(), &[Http], problems);
    only(
        "bearer_token_file",
        sink.bearer_token_file.is_some(),
        &[Http],
        problems,
    );
    only(
        "bearer_token_env",
        sink.bearer_token_env.is_some(),
        &[Http],
        problems,
    );
    only("exchange", sink.exchange.is_some(), &[Amqp], problems);
    only(
        "exchange_type",
        sink.exchange_type.is_some(),
        &[Amqp],
        problems,
    );
    only("message", sink.message.is_some(), &[Amqp], problems);
    only("celery_task", sink.celery_task.is_some(), &[Amqp], problems);

    if sink.bearer_token_file.is_some() && sink.bearer_token_env.is_some() {
        problems.add(
            format!("{path}.bearer_token_env"),
            "is set together with bearer_token_file; keep one of them",
        );
    }
    for header in sink.headers.keys() {
        if header.eq_ignore_ascii_case("authorization") {
            problems.add(
                format!("{path}.headers"),
                "sets Authorization in the config; put the token in bearer_token_file or bearer_token_env, which are never printed",
            );
        }
        if header.is_empty()
            || !header
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
        {
            problems.add(
                format!("{path}.headers"),
                format!("`{header}` is not a header name (letters, digits, `-`)"),
            );
        }
    }
    if kind == Amqp && sink.url.starts_with("amqps://") {
        problems.add(
            format!("{path}.url"),
            "amqps:// needs TLS, which this build's AMQP client lacks; use amqp:// on a trusted network, or a TLS tunnel (stunnel, a sidecar) to the broker",
        );
    }
    if kind == Amqp {
        match sink.exchange.as_deref() {
            None => problems.add(
                format!("{path}.exchange"),
                "an amqp sink needs the exchange to publish to, e.g. exchange = \"weir.events\"",
            ),
            Some(exchange) if exchange.is_empty() || exchange.starts_with("amq.") && exchange != "amq.topic" => problems.add(
                format!("{path}.exchange"),
                "name an exchange of your own (the default exchange and amq.* other than amq.topic are not for events)",
            ),
            Some(_) => {}
        }
        if let Some(kind) = &sink.exchange_type {
            if !["topic", "direct", "fanout", "headers"].contains(&kind.as_str()) {
                problems.add(
                    format!("{path}.exchange_type"),
                    "must be topic, direct, fanout or headers",
                );
            }
        }
        let celery = sink.message == Some(AmqpMessage::Celery);
        match (&sink.celery_task, celery) {
            (None, true) => problems.add(
                format!("{path}.celery_task"),
                "message = \"celery\" needs the task's name, e.g. celery_task = \"alerts.handle\"",
            ),
            (Some(_), false) => problems.add(
                format!("{path}.celery_task"),
                "is only used with message = \"celery\"",
            ),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{parse, Overrides, EXAMPLE};
    use std::path::Path;

    fn with(extra: &str) -> Result<crate::config::Config, crate::config::ConfigError> {
        parse(
            &format!("{EXAMPLE}\n{extra}"),
            Path::new("weir.toml"),
            &Overrides::default(),
        )
    }

    fn problems(extra: &str) -> Vec<(String, String, usize)> {
        let text = format!("{EXAMPLE}\n{extra}");
        match parse(&text, Path::new("weir.toml"), &Overrides::default()) {
            Ok(_) => vec![],
            Err(err) => err
                .problems()
                .iter()
                .map(|p| {
                    (
                        p.path.clone(),
                        p.message.clone(),
                        p.line_col.map_or(0, |l| l.0),
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn a_webhook_sink_parses_with_defaults() {
        let config =
            with("[sinks.tickets]\nkind = \"http\"\nurl = \"http://127.0.0.1:8080/hook\"\n")
                .unwrap();
        let sink = &config.sinks["tickets"];
        assert_eq!(sink.batch_size(), 1);
        assert_eq!(sink.timeout, std::time::Duration::from_secs(10));
    }

    #[test]
    fn a_key_of_another_kind_names_the_kinds_that_take_it() {
        let found = problems(
            "[sinks.rows]\nkind = \"postgres\"\nurl = \"postgres://weir@127.0.0.1/weir\"\nexchange = \"x\"\n",
        );
        let problem = found.iter().find(|p| p.0 == "sinks.rows.exchange").unwrap();
        assert!(problem.1.contains("only by kind amqp"), "{problem:?}");
        assert!(problem.2 > 0, "the problem has a line: {problem:?}");
    }

    #[test]
    fn the_wrong_scheme_is_refused_without_printing_the_password() {
        let found = problems(
            "[sinks.tasks]\nkind = \"amqp\"\nurl = \"http://guest:hunter2@127.0.0.1/\"\nexchange = \"weir\"\n",
        );
        let problem = found.iter().find(|p| p.0 == "sinks.tasks.url").unwrap();
        assert!(!problem.1.contains("hunter2"), "{problem:?}");
    }

    #[test]
    fn an_amqp_sink_needs_an_exchange_and_celery_a_task() {
        let found = problems(
            "[sinks.tasks]\nkind = \"amqp\"\nurl = \"amqp://127.0.0.1\"\nmessage = \"celery\"\n",
        );
        let paths: Vec<&str> = found.iter().map(|p| p.0.as_str()).collect();
        assert!(paths.contains(&"sinks.tasks.exchange"), "{found:?}");
        assert!(paths.contains(&"sinks.tasks.celery_task"), "{found:?}");
    }

    #[test]
    fn the_broker_sink_name_is_taken() {
        let found = problems("[sinks.mqtt]\nkind = \"mqtt\"\nurl = \"mqtt://127.0.0.1:1884\"\n");
        assert!(found.iter().any(|p| p.0 == "sinks.mqtt"), "{found:?}");
    }

    /// The example with the overheat rule's one output table replaced by `outputs`.
    fn with_outputs(outputs: &str, sinks: &str) -> String {
        let single = "[rules.overheat.output]\ntopic = \"alerts/{site}/{device}/overheat\"\nqos = 1\nretain = false\nformat = \"json\"\n";
        assert!(EXAMPLE.contains(single));
        format!("{}\n{sinks}", EXAMPLE.replace(single, outputs))
    }

    #[test]
    fn a_rule_delivers_to_several_sinks() {
        let text = with_outputs(
            "[[rules.overheat.output]]\ntopic = \"alerts/{site}/{device}/overheat\"\n\n[[rules.overheat.output]]\nsink = \"tickets\"\n",
            "[sinks.tickets]\nkind = \"http\"\nurl = \"http://127.0.0.1:9/hook\"\n",
        );
        let config = parse(&text, Path::new("weir.toml"), &Overrides::default()).unwrap();
        let outputs = &config.rules["overheat"].output;
        assert!(outputs.many);
        assert_eq!(outputs.list[1].sink.as_deref(), Some("tickets"));
    }

    #[test]
    fn an_unknown_sink_names_the_output_and_the_known_sinks() {
        let text = with_outputs(
            "[[rules.overheat.output]]\ntopic = \"alerts/{site}/{device}/overheat\"\n\n[[rules.overheat.output]]\nsink = \"tikets\"\n",
            "[sinks.tickets]\nkind = \"http\"\nurl = \"http://127.0.0.1:9/hook\"\n",
        );
        let err = parse(&text, Path::new("weir.toml"), &Overrides::default()).unwrap_err();
        let problem = &err.problems()[0];
        assert_eq!(problem.path, "rules.overheat.output[1].sink");
        assert!(problem.message.contains("mqtt, tickets"), "{problem:?}");
        let line = problem.line_col.unwrap().0;
        assert_eq!(text.lines().nth(line - 1).unwrap(), "sink = \"tikets\"");
    }

    #[test]
    fn an_amqp_output_needs_a_routing_key() {
        let text = with_outputs(
            "[rules.overheat.output]\nsink = \"tasks\"\n",
            "[sinks.tasks]\nkind = \"amqp\"\nurl = \"amqp://127.0.0.1\"\nexchange = \"weir\"\n",
        );
        let err = parse(&text, Path::new("weir.toml"), &Overrides::default()).unwrap_err();
        assert_eq!(err.problems()[0].path, "rules.overheat.output.topic");
    }

    #[test]
    fn a_bearer_token_in_the_headers_is_refused() {
        let found = problems(
            "[sinks.t]\nkind = \"http\"\nurl = \"http://127.0.0.1/\"\nheaders = { Authorization = \"Bearer x\" }\n",
        );
        assert!(found.iter().any(|p| p.0 == "sinks.t.headers"), "{found:?}");
    }
}
