//! The [`Sink`] of every service that one task of its own talks to (webhooks, AMQP, PostgreSQL,
//! NATS): a small hand-over queue to that task, and its [`Progress`] (whether the service takes
//! events, how many are confirmed, which it refused), shared with the delivery driver.

use super::{Refused, Sink};
use crate::route::Outgoing;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// What the task reports to the driver.
pub struct Progress {
    name: String,
    up: AtomicBool,
    /// Events handed over with `confirm` that are done, in hand-over order.
    confirmed: AtomicU64,
    refused: Mutex<Vec<Refused>>,
}

impl Progress {
    /// Counts `events` as done (those handed over with `confirm`); call it in hand-over order.
    pub fn confirm<'a>(&self, events: impl IntoIterator<Item = &'a Outgoing>) {
        let count = events.into_iter().filter(|event| event.confirm).count() as u64;
        self.confirmed.fetch_add(count, Ordering::Relaxed);
    }

    /// Refuses `events` for good: their dead letters are queued before they count as done, so
    /// no snapshot can drop an event without its dead letter.
    pub fn refuse(&self, events: Vec<Outgoing>, reason: &'static str, detail: &str) {
        let count = events.iter().filter(|event| event.confirm).count() as u64;
        self.refused
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(events.into_iter().map(|event| Refused {
                event,
                reason,
                detail: detail.to_owned(),
            }));
        self.confirmed.fetch_add(count, Ordering::Relaxed);
    }

    /// The service takes events (again).
    pub fn up(&self) {
        if !self.up.swap(true, Ordering::Relaxed) {
            tracing::info!(sink = %self.name, "the sink's service takes events again");
        }
    }

    /// The service does not take events now: new ones wait in the outbox.
    pub fn down(&self) {
        self.up.store(false, Ordering::Relaxed);
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Why an event can never be delivered by this sink, if it cannot.
pub type Refusal = Box<dyn Fn(&Outgoing) -> Option<&'static str> + Send>;

/// A sink whose deliveries a task of its own makes.
pub struct QueuedSink {
    queue: mpsc::Sender<Outgoing>,
    progress: Arc<Progress>,
    refusal: Refusal,
    task: JoinHandle<()>,
}

impl QueuedSink {
    /// Spawns `deliver` with the receiving end of a hand-over queue of `capacity` events.
    pub fn start<F>(
        name: &str,
        capacity: usize,
        refusal: Refusal,
        deliver: impl FnOnce(mpsc::Receiver<Outgoing>, Arc<Progress>) -> F,
    ) -> Self
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let (queue, events) = mpsc::channel(capacity.max(1));
        let progress = Arc::new(Progress {
            name: name.to_owned(),
            up: AtomicBool::new(true),
            confirmed: AtomicU64::new(0),
            refused: Mutex::new(Vec::new()),
        });
        let task = tokio::spawn(deliver(events, progress.clone()));
        Self {
            queue,
            progress,
            refusal,
            task,
        }
    }
}

impl Sink for QueuedSink {
    fn is_ready(&self) -> bool {
        self.progress.up.load(Ordering::Relaxed)
    }

    fn refuses(&self, event: &Outgoing) -> Option<&'static str> {
        (self.refusal)(event)
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
        self.progress.confirmed.load(Ordering::Relaxed)
    }

    fn take_refused(&mut self) -> Vec<Refused> {
        std::mem::take(
            &mut *self
                .progress
                .refused
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    async fn close(self) {
        // The driver has waited for confirmations already; the task ends with its queue.
        drop(self.queue);
        if tokio::time::timeout(Duration::from_secs(1), self.task)
            .await
            .is_err()
        {
            tracing::debug!(sink = %self.progress.name, "the sink's task did not stop within 1 s");
        }
    }
}
