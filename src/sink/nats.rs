//! The NATS sink (`kind = "nats"`): publishes each event to the subject of its topic (`/` as
//! `.`, so MQTT subscribers of the NATS server's MQTT listener see the topic), into the
//! `[cluster]` output stream, with `Nats-Msg-Id` = the event id. The server drops a message
//! whose id it has seen within the stream's duplicate window, so an event that a restart or a
//! handover derives again is stored once.
//!
//! A task publishes up to `batch` events ahead of their acknowledgements and takes the
//! acknowledgements in order; a failed one is published again, with every event after it (the
//! ids make that safe), after a backoff.

use super::queued::{Progress, QueuedSink, Refusal};
use crate::config::cluster::topic_to_subject;
use crate::config::SinkConfig;
use crate::metrics::Metrics;
use crate::mqtt::Backoff;
use crate::route::Outgoing;
use async_nats::jetstream::context::PublishAckFuture;
use std::collections::VecDeque;
use std::sync::Arc;
use tokio::sync::mpsc;

/// Connects (the servers are checked now; later outages are retried); then a task of the
/// sink's own publishes.
///
/// # Errors
/// No server answers within `timeout`, or a file in the settings cannot be used.
pub async fn connect(
    name: &str,
    settings: &SinkConfig,
    metrics: Arc<Metrics>,
) -> anyhow::Result<QueuedSink> {
    // Several servers of one NATS cluster are listed as NATS clients take them: "a,b,c".
    let servers: Vec<String> = settings
        .url
        .split(',')
        .map(|url| url.trim().to_owned())
        .collect();
    let client = crate::nats::connect(
        &servers,
        None,
        settings.ca_file.as_deref(),
        &format!("weir-sink-{name}"),
        settings.timeout,
    )
    .await?;
    let max_payload = client.server_info().max_payload;
    let mut jetstream = async_nats::jetstream::new(client);
    jetstream.set_timeout(settings.timeout);
    let batch = settings.batch_size();
    let publisher = |events, progress| {
        Publisher {
            jetstream,
            retries: metrics.sink_retries.with_label_values(&[name]),
            progress,
            backoff: Backoff::new(settings.retry_initial, settings.retry_max),
            batch,
        }
        .run(events)
    };
    let unpublishable: Refusal = Box::new(move |event: &Outgoing| {
        if event.payload.len() > max_payload {
            Some("the event is larger than the NATS server's max_payload")
        } else if event.topic.is_empty() || event.topic.contains(['+', '#', '*', '>', ' ']) {
            Some("its subject would be empty or contain a wildcard")
        } else {
            None
        }
    });
    Ok(QueuedSink::start(name, batch, unpublishable, publisher))
}

/// The task that owns the connection.
struct Publisher {
    jetstream: async_nats::jetstream::Context,
    retries: prometheus::IntCounter,
    progress: Arc<Progress>,
    backoff: Backoff,
    batch: usize,
}

impl Publisher {
    async fn run(mut self, mut events: mpsc::Receiver<Outgoing>) {
        // Published, awaiting the server's acknowledgement, in publish order.
        let mut in_flight: VecDeque<(Outgoing, Option<PublishAckFuture>)> = VecDeque::new();
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
                        let ack = self.publish(&event).await;
                        in_flight.push_back((event, ack));
                    }
                    None => open = false,
                }
            }
            let Some((event, ack)) = in_flight.pop_front() else {
                continue;
            };
            let result = match ack {
                Some(ack) => ack.await.map(|_| ()).map_err(|err| err.to_string()),
                None => Err("the publish could not be sent".to_owned()),
            };
            match result {
                Ok(()) => {
                    self.progress.confirm([&event]);
                    self.progress.up();
                    self.backoff.reset();
                }
                Err(err) => {
                    // Everything from this event on goes again, in order: the server drops the
                    // copies it already has by their ids.
                    self.progress.down();
                    let delay = self.backoff.next_delay();
                    tracing::warn!(sink = %self.progress.name(), %err, ?delay, "NATS did not acknowledge an event; publishing again");
                    tokio::time::sleep(delay).await;
                    let mut again: Vec<Outgoing> = std::iter::once(event)
                        .chain(in_flight.drain(..).map(|(event, _)| event))
                        .collect();
                    for event in again.drain(..) {
                        self.retries.inc();
                        let ack = self.publish(&event).await;
                        in_flight.push_back((event, ack));
                    }
                }
            }
        }
    }

    async fn publish(&self, event: &Outgoing) -> Option<PublishAckFuture> {
        let mut headers = async_nats::HeaderMap::new();
        if let Some(id) = event.headers.id {
            headers.insert("Nats-Msg-Id", id.to_string().as_str());
        }
        headers.insert("Content-Type", event.headers.content_type.mime());
        if let Some(rule) = &event.rule {
            headers.insert("Weir-Rule", &**rule);
        }
        if let Some(trace) = &event.headers.trace {
            headers.insert("traceparent", trace.traceparent().as_str());
            if let Some(state) = &trace.state {
                headers.insert("tracestate", &**state);
            }
        }
        self.jetstream
            .publish_with_headers(
                topic_to_subject(&event.topic),
                headers,
                event.payload.clone().into(),
            )
            .await
            .ok()
    }
}
