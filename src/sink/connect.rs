//! Connects every sink of a plan at start (so a sink that cannot be reached fails `weir run` with
//! a message that says which and why), then runs each in a delivery task of its own.

use super::mqtt::MqttSink;
use super::queued::QueuedSink;
use super::{run, SinkInput, SinkOptions};
use crate::config::{BrokerConfig, Config, SinkConfig, SinkKind};
use crate::engine::Plan;
use crate::metrics::Metrics;
use anyhow::Context as _;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// A sink connected (or, for the broker, connecting in the background), before its task runs.
pub enum Connected {
    Mqtt(MqttSink),
    /// Webhooks, AMQP, PostgreSQL and NATS: a task of their own talks to the service.
    Service(QueuedSink),
}

impl Connected {
    /// Connects to every sink of `plan`, in its order: the broker's first (it connects in the
    /// background and retries, as intake does), then `[sinks.*]`, each checked now.
    ///
    /// # Errors
    /// A sink cannot be reached or its settings cannot be used; the message names the sink.
    pub async fn all(
        config: &Config,
        plan: &Plan,
        metrics: &Arc<Metrics>,
    ) -> anyhow::Result<Vec<Connected>> {
        let mut connected = Vec::with_capacity(plan.sinks.len());
        let mut broker = config.broker.clone();
        if let Some(url) = &config.broker.publish_url {
            broker.url.clone_from(url);
        }
        let options = crate::mqtt::connection_options(&broker, "-out")?;
        connected.push(Connected::Mqtt(MqttSink::start(
            options,
            config.pipeline.queue_capacity,
            broker.max_packet_bytes,
            metrics.clone(),
        )));
        for (index, sink) in plan.sinks.iter().enumerate().skip(1) {
            let settings = &config.sinks[&*sink.name];
            let tables = tables_of(plan, index);
            let one = Self::connect(&sink.name, settings, tables, config, metrics)
                .await
                .with_context(|| {
                    format!(
                        "sink `{}` ({} at {}) cannot be used",
                        sink.name,
                        settings.kind.name(),
                        settings.redacted_url()
                    )
                })?;
            connected.push(one);
        }
        Ok(connected)
    }

    async fn connect(
        name: &str,
        settings: &SinkConfig,
        tables: Vec<String>,
        config: &Config,
        metrics: &Arc<Metrics>,
    ) -> anyhow::Result<Connected> {
        match settings.kind {
            SinkKind::Mqtt => {
                let mut broker = BrokerConfig::new(settings.url.clone());
                broker.ca_file.clone_from(&settings.ca_file);
                broker.protocol = config.broker.protocol;
                broker.clean_session = config.broker.clean_session;
                crate::mqtt::try_connect(&broker, settings.timeout).await?;
                let options = crate::mqtt::connection_options(&broker, &format!("-{name}"))?;
                Ok(Connected::Mqtt(MqttSink::start(
                    options,
                    config.pipeline.queue_capacity,
                    broker.max_packet_bytes,
                    metrics.clone(),
                )))
            }
            SinkKind::Amqp => {
                #[cfg(feature = "amqp-sink")]
                return Ok(Connected::Service(
                    super::amqp::connect(name, settings, metrics.clone()).await?,
                ));
                #[cfg(not(feature = "amqp-sink"))]
                Err(not_built(settings.kind))
            }
            SinkKind::Postgres => {
                #[cfg(feature = "postgres-sink")]
                return Ok(Connected::Service(
                    super::postgres::connect(name, settings, tables, metrics.clone()).await?,
                ));
                #[cfg(not(feature = "postgres-sink"))]
                {
                    drop(tables);
                    Err(not_built(settings.kind))
                }
            }
            SinkKind::Http => {
                #[cfg(feature = "http-sink")]
                return Ok(Connected::Service(
                    super::http::connect(name, settings, metrics.clone()).await?,
                ));
                #[cfg(not(feature = "http-sink"))]
                Err(not_built(settings.kind))
            }
            SinkKind::Nats => {
                #[cfg(feature = "cluster")]
                return Ok(Connected::Service(
                    super::nats::connect(name, settings, metrics.clone()).await?,
                ));
                #[cfg(not(feature = "cluster"))]
                Err(not_built(settings.kind))
            }
        }
    }

    /// Runs the sink's delivery task until the workers close `input`.
    pub fn spawn(
        self,
        options: SinkOptions,
        plan: Arc<Plan>,
        input: mpsc::Receiver<SinkInput>,
        metrics: Arc<Metrics>,
    ) -> JoinHandle<()> {
        match self {
            Connected::Mqtt(sink) => tokio::spawn(run(sink, options, plan, input, metrics)),
            Connected::Service(sink) => tokio::spawn(run(sink, options, plan, input, metrics)),
        }
    }
}

/// `weir sinks init`: creates what each sink needs and is missing (AMQP exchanges, PostgreSQL
/// tables), and says, one line per thing, what it created and what it found.
///
/// # Errors
/// A sink cannot be reached, or refuses the change; the message names the sink.
pub async fn init_all(config: &Config, plan: &Plan) -> anyhow::Result<Vec<String>> {
    let mut lines = Vec::new();
    for (index, sink) in plan.sinks.iter().enumerate().skip(1) {
        let settings = &config.sinks[&*sink.name];
        let tables = tables_of(plan, index);
        let done = match settings.kind {
            SinkKind::Mqtt | SinkKind::Http | SinkKind::Nats => {
                vec![format!(
                    "nothing to create for a {} sink",
                    settings.kind.name()
                )]
            }
            #[cfg(feature = "postgres-sink")]
            SinkKind::Postgres => super::postgres::init(&sink.name, settings, &tables).await?,
            #[cfg(feature = "amqp-sink")]
            SinkKind::Amqp => super::amqp::init(&sink.name, settings).await?,
            #[cfg(not(all(feature = "postgres-sink", feature = "amqp-sink")))]
            kind => {
                drop(tables);
                return Err(not_built(kind));
            }
        };
        lines.extend(
            done.into_iter()
                .map(|line| format!("sink {}: {line}", sink.name)),
        );
    }
    if lines.is_empty() {
        lines.push("no [sinks.*] in the config; the broker needs nothing created".into());
    }
    Ok(lines)
}

/// The error for a sink kind this build was made without. Validation refuses such a config
/// first, at the sink's line; this keeps a config built in code from passing unnoticed.
#[cfg(not(all(
    feature = "http-sink",
    feature = "amqp-sink",
    feature = "postgres-sink",
    feature = "cluster"
)))]
fn not_built(kind: SinkKind) -> anyhow::Error {
    let missing = kind.feature().map_or_else(
        || format!("this weir cannot deliver to {} sinks", kind.name()),
        |feature| feature.missing_or("remove the sink"),
    );
    anyhow::anyhow!(missing)
}

/// The tables the outputs to sink `index` write to, each once.
pub fn tables_of(plan: &Plan, index: usize) -> Vec<String> {
    let mut tables: Vec<String> = plan
        .rules
        .iter()
        .flat_map(|rule| &rule.routes)
        .filter(|route| route.sink == index)
        .map(|route| route.table.to_string())
        .collect();
    tables.sort();
    tables.dedup();
    tables
}
