//! The NATS sink (`kind = "nats"`): publishes each event to the subject of its topic (`/` as
//! `.`, so MQTT subscribers of the NATS server's MQTT listener see the topic), into the
//! `[cluster]` output stream, with `Nats-Msg-Id` = the event id. The server drops a message
//! whose id it has seen within the stream's duplicate window, so an event that a restart or a
//! handover derives again is stored once.
//!
//! A task publishes up to `batch` events ahead of their acknowledgements and takes the
//! acknowledgements in order; a failed one is published again, with every event after it (the
//! ids make that safe), after a backoff.

use super::Sink;
use crate::config::cluster::topic_to_subject;
use crate::config::SinkConfig;
use crate::metrics::Metrics;
use crate::mqtt::Backoff;
use crate::route::Outgoing;
use async_nats::jetstream::context::PublishAckFuture;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Publishing to NATS JetStream.
pub struct NatsSink {
    queue: mpsc::Sender<Outgoing>,
    up: Arc<AtomicBool>,
    confirmed: Arc<AtomicU64>,
    max_payload: usize,
    task: JoinHandle<()>,
}

impl NatsSink {
    /// Connects (the servers are checked now; later outages are retried).
    ///
    /// # Errors
    /// No server answers within `timeout`, or a file in the settings cannot be used.
    pub async fn connect(
        name: &str,
        settings: &SinkConfig,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        let client = crate::nats::connect(
            std::slice::from_ref(&settings.url),
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
        let (queue, events) = mpsc::channel(batch);
        let up = Arc::new(AtomicBool::new(true));
        let confirmed = Arc::new(AtomicU64::new(0));
        let publisher = Publisher {
            jetstream,
            retries: metrics.sink_retries.with_label_values(&[name]),
            up: up.clone(),
            confirmed: confirmed.clone(),
            backoff: Backoff::new(settings.retry_initial, settings.retry_max),
            batch,
            name: name.to_owned(),
        };
        let task = tokio::spawn(publisher.run(events));
        Ok(Self {
            queue,
            up,
            confirmed,
            max_payload,
            task,
        })
    }
}

impl Sink for NatsSink {
    fn is_ready(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    fn refuses(&self, event: &Outgoing) -> Option<&'static str> {
        if event.payload.len() > self.max_payload {
            Some("the event is larger than the NATS server's max_payload")
        } else if event.topic.is_empty() || event.topic.contains(['+', '#', '*', '>', ' ']) {
            Some("its subject would be empty or contain a wildcard")
        } else {
            None
        }
    }

    fn offer(&mut self, event: Outgoing) -> Option<Outgoing> {
        match self.queue.try_send(event) {
            Ok(()) => None,
            Err(
                mpsc::error::TrySendError::Full(event) | mpsc::error::TrySendError::Closed(event),
            ) => Some(event),
        }
    }

    fn confirmed(&self) -> u64 {
        self.confirmed.load(Ordering::Relaxed)
    }

    async fn close(self) {
        drop(self.queue);
        if tokio::time::timeout(Duration::from_secs(1), self.task)
            .await
            .is_err()
        {
            tracing::debug!("the NATS sink's publisher did not stop within 1 s");
        }
    }
}

/// The task that owns the connection.
struct Publisher {
    jetstream: async_nats::jetstream::Context,
    retries: prometheus::IntCounter,
    up: Arc<AtomicBool>,
    confirmed: Arc<AtomicU64>,
    backoff: Backoff,
    batch: usize,
    name: String,
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
                    if event.confirm {
                        self.confirmed.fetch_add(1, Ordering::Relaxed);
                    }
                    if !self.up.swap(true, Ordering::Relaxed) {
                        tracing::info!(sink = %self.name, "NATS takes events again");
                    }
                    self.backoff.reset();
                }
                Err(err) => {
                    // Everything from this event on goes again, in order: the server drops the
                    // copies it already has by their ids.
                    self.up.store(false, Ordering::Relaxed);
                    let delay = self.backoff.next_delay();
                    tracing::warn!(sink = %self.name, %err, ?delay, "NATS did not acknowledge an event; publishing again");
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
