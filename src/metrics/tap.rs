//! The live tap: derived events, as JSON, fanned out to whoever watches `GET /api/events`.
//!
//! Workers offer each event only while a client is connected (one relaxed atomic load per event
//! otherwise). The channel is a bounded broadcast: a slow client lags and skips events, counted
//! in `weir_tap_events_skipped_total`; the pipeline never waits for a tap client.

use prometheus::{IntCounter, IntGauge};
use std::sync::Arc;
use tokio::sync::{broadcast, watch};

/// Events buffered for the slowest tap client before it skips.
pub const TAP_CAPACITY: usize = 1024;

/// One derived event as the tap shows it.
#[derive(Debug, Clone)]
pub struct TapEvent {
    pub id: String,
    pub rule: Arc<str>,
    pub device: Arc<str>,
    /// The event in schema v1 JSON, whatever the rule's output format.
    pub json: String,
}

/// The broadcast behind `/api/events`.
pub struct Tap {
    sender: broadcast::Sender<Arc<TapEvent>>,
    /// Connected clients; also what workers check before encoding anything for the tap.
    clients: IntGauge,
    skipped: IntCounter,
    closed: watch::Sender<bool>,
}

impl Tap {
    pub(super) fn new(clients: IntGauge, skipped: IntCounter) -> Self {
        Self {
            sender: broadcast::channel(TAP_CAPACITY).0,
            clients,
            skipped,
            closed: watch::channel(false).0,
        }
    }

    /// Whether anyone watches; workers skip building tap events when not.
    pub fn is_watched(&self) -> bool {
        self.clients.get() > 0
    }

    /// Offers an event to the connected clients; never waits.
    pub fn offer(&self, event: TapEvent) {
        let _ = self.sender.send(Arc::new(event));
    }

    /// A new client's receiver; the client counts as connected until the guard drops.
    pub fn subscribe(&self) -> TapSubscription {
        self.clients.inc();
        TapSubscription {
            events: self.sender.subscribe(),
            closed: self.closed.subscribe(),
            clients: self.clients.clone(),
            skipped: self.skipped.clone(),
        }
    }

    /// Ends every client's stream (at shutdown), so the HTTP server can finish.
    pub fn close(&self) {
        self.closed.send_replace(true);
    }
}

/// One client's view of the tap.
pub struct TapSubscription {
    events: broadcast::Receiver<Arc<TapEvent>>,
    closed: watch::Receiver<bool>,
    clients: IntGauge,
    skipped: IntCounter,
}

/// What a client receives next.
#[derive(Debug)]
pub enum TapItem {
    Event(Arc<TapEvent>),
    /// The client fell behind and this many events were skipped for it.
    Skipped(u64),
}

impl TapSubscription {
    /// The next event or skip notice; `None` once the tap is closed.
    pub async fn next(&mut self) -> Option<TapItem> {
        if *self.closed.borrow() {
            return None;
        }
        tokio::select! {
            _ = self.closed.changed() => None,
            received = self.events.recv() => match received {
                Ok(event) => Some(TapItem::Event(event)),
                Err(broadcast::error::RecvError::Lagged(skipped)) => {
                    self.skipped.inc_by(skipped);
                    Some(TapItem::Skipped(skipped))
                }
                Err(broadcast::error::RecvError::Closed) => None,
            },
        }
    }
}

impl Drop for TapSubscription {
    fn drop(&mut self) {
        self.clients.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(n: usize) -> TapEvent {
        TapEvent {
            id: format!("{n:016x}"),
            rule: "r".into(),
            device: "d".into(),
            json: "{}".into(),
        }
    }

    #[tokio::test]
    async fn a_slow_client_skips_and_the_skip_is_counted() {
        let skipped = IntCounter::new("skipped", "h").unwrap();
        let tap = Tap::new(IntGauge::new("clients", "h").unwrap(), skipped.clone());
        assert!(!tap.is_watched());
        let mut client = tap.subscribe();
        assert!(tap.is_watched());
        for n in 0..TAP_CAPACITY + 10 {
            tap.offer(event(n));
        }
        assert!(matches!(client.next().await, Some(TapItem::Skipped(10))));
        assert_eq!(skipped.get(), 10);
        match client.next().await {
            Some(TapItem::Event(event)) => assert_eq!(event.id, format!("{:016x}", 10)),
            other => panic!("{other:?}"),
        }
        tap.close();
        assert!(client.next().await.is_none());
        drop(client);
        assert!(!tap.is_watched());
    }
}
