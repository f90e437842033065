//! Operators: synchronous, I/O-free state machines, one file per kind. Each takes a reading for
//! one device (with that device's state) and pushes derived events into an [`Output`].
//!
//! An operator value holds the rule's immutable settings; its per-device mutable state is a
//! separate `State` value owned by the engine, so state can be counted, capped and (later)
//! snapshotted without the operator knowing.

pub mod hysteresis;
pub mod tumbling;

pub use hysteresis::Hysteresis;
pub use tumbling::Tumbling;

use crate::decode::{Origin, Reading};
use crate::event::DerivedEvent;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::sync::Arc;

/// Where operators put what they produce.
#[derive(Debug, Default)]
pub struct Output {
    pub events: Vec<DerivedEvent>,
    /// Readings older than the last one seen for the device, ignored by order-sensitive operators.
    pub out_of_order: u64,
    /// Readings whose window had already fired.
    pub late: u64,
}

/// Identity of the rule an operator runs for, stamped on its events.
#[derive(Debug, Clone)]
pub struct RuleMeta {
    pub index: usize,
    pub name: Arc<str>,
}

/// A rule's logic. Time comes in only through readings' timestamps and explicit arguments;
/// operators never read the clock.
pub trait Operator: Send + 'static {
    /// Per-device state; `Default` is the state of a device never seen. Serializable so that
    /// state can be snapshotted and restored across restarts.
    type State: Default + Send + Serialize + DeserializeOwned;

    /// Handles one reading of the device whose state is `state`.
    fn on_reading(&self, state: &mut Self::State, reading: &Reading<'_>, out: &mut Output);

    /// Whether [`on_tick`](Self::on_tick) does anything; the engine skips ticking otherwise.
    fn wants_ticks(&self) -> bool {
        false
    }

    /// Processing-time timer, called periodically for every device with `now_ms` (wall clock,
    /// ms since the epoch, or the virtual clock in replay). Drives what must happen when no
    /// reading arrives at all: idle windows closing, devices going offline.
    fn on_tick(
        &self,
        _state: &mut Self::State,
        _origin: &Arc<Origin>,
        _now_ms: i64,
        _out: &mut Output,
    ) {
    }

    /// Windows open in `state`, for `weir_windows_open` and `/api/rules`; 0 for operators
    /// without windows.
    fn open_windows(&self, _state: &Self::State) -> usize {
        0
    }

    /// Flushes what should flush when input ends (shutdown): called once per device.
    fn on_close(&self, _state: &mut Self::State, _origin: &Arc<Origin>, _out: &mut Output) {}
}

/// Builders for operator unit tests.
#[cfg(test)]
pub(crate) mod test_support {
    use crate::decode::{Origin, Reading};
    use std::sync::Arc;
    use std::time::Instant;

    /// The origin of `sensors/s1/<device>/telemetry`.
    pub fn origin(device: &str) -> Arc<Origin> {
        Arc::new(Origin {
            topic: format!("sensors/s1/{device}/telemetry").into(),
            device: device.into(),
            names: vec!["site".to_owned(), "device".to_owned()].into(),
            segments: vec!["s1".into(), device.into()].into_boxed_slice(),
            device_index: 1,
        })
    }

    pub fn reading<'a>(origin: &'a Arc<Origin>, ts: i64, values: &'a [Option<f64>]) -> Reading<'a> {
        Reading {
            origin,
            ts,
            seq: None,
            values,
            arrival: Instant::now(),
        }
    }
}
