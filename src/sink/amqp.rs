//! The AMQP 0-9-1 sink (`kind = "amqp"`, RabbitMQ): publishes each event to one exchange with
//! the routing key of its topic (`/` as `.`: `alerts.plant-1.dev-7.overheat`), persistent,
//! `mandatory`, with `message_id` = the event id, its content type, and its kind as `type`.
//!
//! Publisher confirms are on: up to `batch` events are published ahead of their confirms, which
//! are taken in order. A message the broker returns (no queue is bound for its routing key) is
//! refused for good and goes to the dead-letter path; a nack, a lost channel or a lost
//! connection sends every unconfirmed event again, in order, after a backoff (they keep their
//! `message_id`, for consumers to deduplicate).
//!
//! With `message = "celery"` the message is a Celery task (protocol 2) calling `celery_task`
//! with the event as its one argument, so a Celery worker runs a task per event.

use super::queued::{Progress, QueuedSink, Refusal};
use crate::config::{AmqpMessage, SinkConfig};
use crate::metrics::Metrics;
use crate::mqtt::Backoff;
use crate::route::Outgoing;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
    PublisherConfirm,
};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Opens a connection and a channel in confirm mode.
async fn open(settings: &SinkConfig) -> anyhow::Result<(Connection, Channel)> {
    let url = url_with_password(settings)?;
    let connect = Connection::connect(&url, ConnectionProperties::default());
    let connection = tokio::time::timeout(settings.timeout, connect)
        .await
        .map_err(|_| anyhow::anyhow!("the broker did not answer within {:?}", settings.timeout))?
        .map_err(|err| anyhow::anyhow!("cannot connect: {err}"))?;
    let channel = connection
        .create_channel()
        .await
        .map_err(|err| anyhow::anyhow!("cannot open a channel: {err}"))?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|err| anyhow::anyhow!("the broker refuses publisher confirms: {err}"))?;
    Ok((connection, channel))
}

/// The URL with the password of `password_file`, if one is set.
fn url_with_password(settings: &SinkConfig) -> anyhow::Result<String> {
    let Some(file) = &settings.password_file else {
        return Ok(settings.url.clone());
    };
    let password = std::fs::read_to_string(file).map_err(|err| {
        anyhow::anyhow!("cannot read the password file {}: {err}", file.display())
    })?;
    let password = password.trim_end_matches(['\r', '\n']);
    let (scheme, rest) = settings
        .url
        .split_once("://")
        .unwrap_or(("amqp", &settings.url));
    let (userinfo, host) = rest.split_once('@').unwrap_or(("guest", rest));
    let user = userinfo.split(':').next().unwrap_or("guest");
    Ok(format!(
        "{scheme}://{user}:{}@{host}",
        percent_encode(password)
    ))
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn exchange_kind(settings: &SinkConfig) -> ExchangeKind {
    match settings.exchange_type.as_deref() {
        Some("direct") => ExchangeKind::Direct,
        Some("fanout") => ExchangeKind::Fanout,
        Some("headers") => ExchangeKind::Headers,
        _ => ExchangeKind::Topic,
    }
}

/// `weir sinks init` for an amqp sink: declares the exchange (durable) unless it exists.
///
/// # Errors
/// The broker cannot be reached, or the exchange exists with another type.
pub async fn init(name: &str, settings: &SinkConfig) -> anyhow::Result<Vec<String>> {
    let exchange = settings.exchange.clone().unwrap_or_default();
    let (connection, channel) = open(settings).await?;
    let passive = ExchangeDeclareOptions {
        passive: true,
        ..ExchangeDeclareOptions::default()
    };
    let found = channel
        .exchange_declare(
            exchange.as_str().into(),
            exchange_kind(settings),
            passive,
            FieldTable::default(),
        )
        .await
        .is_ok();
    let line = if found {
        format!("found exchange {exchange}")
    } else {
        // A failed passive declare closes the channel: declare on a new one.
        let channel = connection
            .create_channel()
            .await
            .map_err(|err| anyhow::anyhow!("sink {name}: cannot open a channel: {err}"))?;
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        let kind = exchange_kind(settings);
        let kind_name = format!("{kind:?}").to_lowercase();
        channel
            .exchange_declare(
                exchange.as_str().into(),
                kind,
                durable,
                FieldTable::default(),
            )
            .await
            .map_err(|err| {
                anyhow::anyhow!("sink {name}: cannot declare exchange {exchange}: {err}")
            })?;
        format!("declared exchange {exchange} ({kind_name}, durable)")
    };
    let _ = connection.close(200, "init done".into()).await;
    Ok(vec![line])
}

/// Connects and checks that the exchange exists; then a task of the sink's own publishes.
///
/// # Errors
/// The broker cannot be reached, or the exchange does not exist (the message says how to
/// create it).
pub async fn connect(
    name: &str,
    settings: &SinkConfig,
    metrics: Arc<Metrics>,
) -> anyhow::Result<QueuedSink> {
    let exchange = settings.exchange.clone().unwrap_or_default();
    let (connection, channel) = open(settings).await?;
    let passive = ExchangeDeclareOptions {
        passive: true,
        ..ExchangeDeclareOptions::default()
    };
    if let Err(err) = channel
        .exchange_declare(
            exchange.as_str().into(),
            exchange_kind(settings),
            passive,
            FieldTable::default(),
        )
        .await
    {
        anyhow::bail!(
            "exchange {exchange} cannot be used ({err}); run `weir sinks init --config FILE` or declare it"
        );
    }
    let batch = settings.batch_size();
    let publisher = |events, progress| {
        Publisher {
            link: Some((connection, channel)),
            settings: settings.clone(),
            exchange,
            batch,
            progress,
            backoff: Backoff::new(settings.retry_initial, settings.retry_max),
            retries: metrics.sink_retries.with_label_values(&[name]),
        }
        .run(events)
    };
    let long_key: Refusal = Box::new(|event: &Outgoing| {
        (routing_key(&event.topic).len() > 255)
            .then_some("its routing key is longer than 255 bytes")
    });
    Ok(QueuedSink::start(name, batch * 2, long_key, publisher))
}

/// The routing key of a topic: `/` as `.`.
fn routing_key(topic: &str) -> String {
    topic.replace('/', ".")
}

/// The task that owns the connection.
struct Publisher {
    link: Option<(Connection, Channel)>,
    settings: SinkConfig,
    exchange: String,
    batch: usize,
    progress: Arc<Progress>,
    backoff: Backoff,
    retries: prometheus::IntCounter,
}

impl Publisher {
    async fn run(mut self, mut events: mpsc::Receiver<Outgoing>) {
        // Published, awaiting their confirms, in publish order.
        let mut in_flight: VecDeque<(Outgoing, Option<PublisherConfirm>)> = VecDeque::new();
        let mut open = true;
        while open || !in_flight.is_empty() {
            while open && in_flight.len() < self.batch {
                let next = if in_flight.is_empty() {
                    events.recv().await
                } else {
                    match events.try_recv() {
                        Ok(event) => Some(event),
                        Err(mpsc::error::TryRecvError::Empty) => break,
                        Err(mpsc::error::TryRecvError::Disconnected) => None,
                    }
                };
                match next {
                    Some(event) => {
                        let confirm = self.publish(&event).await;
                        in_flight.push_back((event, confirm));
                    }
                    None => open = false,
                }
            }
            let Some((event, confirm)) = in_flight.pop_front() else {
                continue;
            };
            let outcome = match confirm {
                Some(confirm) => match tokio::time::timeout(self.settings.timeout, confirm).await {
                    Ok(Ok(Confirmation::Ack(None) | Confirmation::NotRequested)) => Ok(None),
                    Ok(Ok(Confirmation::Ack(Some(returned)))) => Ok(Some(format!(
                        "returned by the broker: {} {} (no queue is bound for routing key {})",
                        returned.reply_code,
                        returned.reply_text,
                        routing_key(&event.topic)
                    ))),
                    Ok(Ok(Confirmation::Nack(_))) => Err("the broker nacked it".to_owned()),
                    Ok(Err(err)) => Err(err.to_string()),
                    Err(_) => Err(format!("no confirm within {:?}", self.settings.timeout)),
                },
                None => Err("the publish could not be sent".to_owned()),
            };
            match outcome {
                Ok(returned) => {
                    match returned {
                        Some(detail) => self.progress.refuse(vec![event], "unroutable", &detail),
                        None => self.progress.confirm([&event]),
                    }
                    self.progress.up();
                    self.backoff.reset();
                }
                Err(err) => {
                    self.progress.down();
                    let delay = self.backoff.next_delay();
                    tracing::warn!(sink = %self.progress.name(), %err, ?delay, "an event was not confirmed; publishing it and the ones after it again");
                    // The channel (or the connection) may be broken: start a new one.
                    if let Some((connection, _)) = self.link.take() {
                        let _ = tokio::time::timeout(
                            Duration::from_millis(500),
                            connection.close(200, "reconnecting".into()),
                        )
                        .await;
                    }
                    tokio::time::sleep(delay).await;
                    let again: Vec<Outgoing> = std::iter::once(event)
                        .chain(in_flight.drain(..).map(|(event, _)| event))
                        .collect();
                    for event in again {
                        self.retries.inc();
                        let confirm = self.publish(&event).await;
                        in_flight.push_back((event, confirm));
                    }
                }
            }
        }
        if let Some((connection, _)) = self.link.take() {
            let _ = connection.close(200, "weir stops".into()).await;
        }
    }

    /// Publishes `event` on the channel (opening one if there is none); `None` if it could not
    /// be sent.
    async fn publish(&mut self, event: &Outgoing) -> Option<PublisherConfirm> {
        if self.link.is_none() {
            match open(&self.settings).await {
                Ok(link) => self.link = Some(link),
                Err(err) => {
                    tracing::debug!(sink = %self.progress.name(), %err, "cannot reconnect yet");
                    return None;
                }
            }
        }
        let (_, channel) = self.link.as_ref()?;
        let (body, properties) = message(event, &self.settings);
        let options = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        let published = channel
            .basic_publish(
                self.exchange.as_str().into(),
                routing_key(&event.topic).as_str().into(),
                options,
                &body,
                properties,
            )
            .await;
        match published {
            Ok(confirm) => Some(confirm),
            Err(err) => {
                tracing::debug!(sink = %self.progress.name(), %err, "publish failed");
                self.link = None;
                None
            }
        }
    }
}

/// The body and properties of `event`'s message.
fn message(event: &Outgoing, settings: &SinkConfig) -> (Vec<u8>, BasicProperties) {
    let id = event.headers.id.map(|id| id.to_string());
    let kind = event_kind(&event.payload);
    let mut headers = FieldTable::default();
    if let Some(rule) = &event.rule {
        headers.insert("weir-rule".into(), AMQPValue::LongString((**rule).into()));
    }
    if let Some(trace) = &event.headers.trace {
        headers.insert(
            "traceparent".into(),
            AMQPValue::LongString(trace.traceparent().into()),
        );
    }
    let mut properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_timestamp(u64::try_from(event.ts / 1000).unwrap_or(0));
    if let Some(id) = &id {
        properties = properties.with_message_id(ShortString::from(id.as_str()));
    }
    if let Some(kind) = &kind {
        properties = properties.with_type(ShortString::from(kind.as_str()));
    }
    if settings.message == Some(AmqpMessage::Celery) {
        let task = settings.celery_task.clone().unwrap_or_default();
        let task_id = celery_task_id(id.as_deref().unwrap_or("0000000000000000"));
        let event_json: serde_json::Value =
            serde_json::from_slice(&event.payload).unwrap_or(serde_json::Value::Null);
        let argsrepr = format!("({event_json},)");
        for (key, value) in [
            ("lang", "py".to_owned()),
            ("task", task),
            ("id", task_id.clone()),
            ("root_id", task_id.clone()),
            ("argsrepr", argsrepr.chars().take(1024).collect()),
            ("kwargsrepr", "{}".to_owned()),
            ("origin", "weir".to_owned()),
        ] {
            headers.insert(key.into(), AMQPValue::LongString(value.into()));
        }
        for key in ["parent_id", "group", "eta", "expires", "timelimit"] {
            headers.insert(key.into(), AMQPValue::Void);
        }
        headers.insert("retries".into(), AMQPValue::LongLongInt(0));
        let body = serde_json::json!([
            [event_json],
            {},
            {"callbacks": null, "errbacks": null, "chain": null, "chord": null}
        ]);
        let properties = properties
            .with_headers(headers)
            .with_content_type("application/json".into())
            .with_content_encoding("utf-8".into())
            .with_correlation_id(ShortString::from(task_id.as_str()));
        return (serde_json::to_vec(&body).unwrap_or_default(), properties);
    }
    let properties = properties
        .with_headers(headers)
        .with_content_type(ShortString::from(event.headers.content_type.mime()));
    (event.payload.clone(), properties)
}

/// The event's `kind`, read from its JSON (CBOR events carry none here).
fn event_kind(payload: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Kind {
        kind: String,
    }
    serde_json::from_slice::<Kind>(payload).ok().map(|k| k.kind)
}

/// A UUID-shaped task id made from the event id, so a redelivered event has the same task id.
fn celery_task_id(event_id: &str) -> String {
    let hex: String = format!("{event_id:0>16}{event_id:0>16}")
        .chars()
        .take(32)
        .collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}
