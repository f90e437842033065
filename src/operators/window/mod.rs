//! Windows per device, in event time: tumbling, hopping, session and count windows, sharing one
//! set of aggregates ([`aggregates`]), one percentile sketch ([`sketch`]) and one condition
//! language ([`condition`]).
//!
//! Semantics follow Apache Flink's, keyed per device:
//! - Each device has its own watermark: the newest event time seen for it minus
//!   `max_out_of_orderness`. A window fires when its device's watermark reaches its end, so a
//!   device with a bad clock, or a silent one, never holds back another device's windows.
//! - A fired window is kept for `allowed_lateness` past its end; a reading for it in that time
//!   re-emits the window with the same `id` and `update` counting up, so consumers upsert.
//! - A reading past lateness is `late`; one stamped more than `max_future_skew` ahead of the
//!   gateway clock (its arrival) is quarantined as `future` and does not move the watermark; one
//!   that would open more than `max_open_windows` windows for its device is refused as
//!   `window_limit`. All three are counted and, with a `late_topic`, published with the reason.
//! - `idle_timeout` (processing time, via `on_tick`) emits a silent device's open windows as
//!   partial and moves its watermark past them, so a later reading for them is late or an update,
//!   never a second window with the same id.

pub mod aggregates;
pub mod condition;
pub mod count;
pub mod hopping;
pub mod session;
pub mod sketch;
pub mod tumbling;

pub use crate::config::condition::{Condition, ConditionError};
pub use count::CountWindows;
pub use hopping::Hopping;
pub use session::SessionWindows;
pub use tumbling::Tumbling;

use super::{Operator, Output, RuleMeta};
use crate::config::{Aggregate, OnShutdown, WindowConfig};
use crate::decode::{Origin, Reading};
use crate::model::event::{Cause, DerivedEvent, EventBody, EventId, WindowClose};
use aggregates::{Accumulators, Basic};
use condition::WindowView;
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;
use std::sync::Arc;
use std::time::Duration;

/// Why a reading was not applied to its windows (the `reason` label and field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LateReason {
    Late,
    Future,
    WindowLimit,
}

impl LateReason {
    pub const ALL: [LateReason; 3] = [
        LateReason::Late,
        LateReason::Future,
        LateReason::WindowLimit,
    ];

    /// Every label, in the order of [`ALL`](Self::ALL).
    pub const LABELS: [&'static str; 3] = ["late", "future", "window_limit"];

    pub fn label(self) -> &'static str {
        match self {
            LateReason::Late => "late",
            LateReason::Future => "future",
            LateReason::WindowLimit => "window_limit",
        }
    }
}

pub(crate) fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// The settings every window kind shares, built from a validated [`WindowConfig`].
#[derive(Debug, Clone)]
pub struct WindowSpec {
    rule: RuleMeta,
    /// Metric names and their slots in the input's field plan.
    metrics: Vec<(Arc<str>, usize)>,
    aggregates: Arc<[Aggregate]>,
    /// Whether accumulators carry a percentile sketch (asked for, or used by `when`).
    percentiles: bool,
    /// Whether [`Basic`] accumulators suffice: the rule reads only count, sum, min, max, avg.
    basic: bool,
    out_of_orderness_ms: i64,
    lateness_ms: i64,
    future_skew_ms: i64,
    idle_timeout_ms: Option<i64>,
    publish_late: bool,
    when: Option<Arc<Condition>>,
    max_open_windows: usize,
    flush_on_shutdown: bool,
}

impl WindowSpec {
    /// Builds from validated config; `slots` are the metrics' slots in the input's field plan.
    ///
    /// # Errors
    /// The `when` condition does not parse (validation reports it with its line first).
    pub fn new(
        rule: RuleMeta,
        config: &WindowConfig,
        slots: Vec<usize>,
    ) -> Result<Self, ConditionError> {
        let when = config
            .when
            .as_deref()
            .map(|text| Condition::parse(text, &config.metrics))
            .transpose()?;
        let percentiles = config.aggregates.iter().any(|a| a.quantile().is_some())
            || when.as_ref().is_some_and(|c| c.uses_percentiles);
        Ok(Self {
            rule,
            metrics: config
                .metrics
                .iter()
                .map(|m| Arc::from(m.as_str()))
                .zip(slots)
                .collect(),
            aggregates: config.aggregates.clone().into(),
            basic: when.is_none()
                && config
                    .aggregates
                    .iter()
                    .all(|aggregate| Basic::TRACKS.contains(aggregate)),
            percentiles,
            out_of_orderness_ms: millis(config.max_out_of_orderness),
            lateness_ms: millis(config.allowed_lateness),
            future_skew_ms: millis(config.max_future_skew),
            idle_timeout_ms: config.idle_timeout.map(millis),
            publish_late: config.late_topic.is_some(),
            when: when.map(Arc::new),
            max_open_windows: config.max_open_windows.max(1),
            flush_on_shutdown: config.on_shutdown == OnShutdown::Flush,
        })
    }

    fn has_metric(&self, reading: &Reading<'_>) -> bool {
        self.metrics
            .iter()
            .any(|(_, slot)| reading.values[*slot].is_some())
    }

    /// Stamped further ahead of the gateway clock than `max_future_skew`.
    fn is_future(&self, reading: &Reading<'_>) -> bool {
        reading.ts > reading.arrival_ms.saturating_add(self.future_skew_ms)
    }

    fn is_idle(&self, last_arrival_ms: i64, now_ms: i64) -> bool {
        self.idle_timeout_ms
            .is_some_and(|idle| now_ms.saturating_sub(last_arrival_ms) >= idle)
    }

    fn new_pane(&self, start: i64, end: i64) -> Pane {
        Pane {
            start,
            end,
            readings: 0,
            accumulators: Accumulators::new(self.basic, self.percentiles, self.metrics.len()),
            fired: false,
            updates: 0,
        }
    }

    fn add(&self, pane: &mut Pane, reading: &Reading<'_>) {
        pane.readings += 1;
        for (metric, (_, slot)) in self.metrics.iter().enumerate() {
            if let Some(value) = reading.values[*slot] {
                pane.accumulators.add(metric, reading.ts, value);
            }
        }
    }

    /// Counts a reading that was not applied and, with a late topic, publishes it.
    fn reject(
        &self,
        reading: &Reading<'_>,
        reason: LateReason,
        watermark: Option<i64>,
        out: &mut Output,
    ) {
        match reason {
            LateReason::Late => out.late += 1,
            LateReason::Future => out.future += 1,
            LateReason::WindowLimit => out.window_limit += 1,
        }
        if !self.publish_late {
            return;
        }
        let origin = reading.origin;
        let values = self
            .metrics
            .iter()
            .filter_map(|(name, slot)| reading.values[*slot].map(|v| (name.clone(), v)))
            .collect();
        out.events.push(DerivedEvent {
            id: EventId::derive(&[
                self.rule.name.as_bytes(),
                origin.device().as_bytes(),
                b"late",
                &reading.ts.to_be_bytes(),
                &reading.seq.unwrap_or(0).to_be_bytes(),
            ]),
            rule_index: self.rule.index,
            rule: self.rule.name.clone(),
            origin: origin.clone(),
            ts: reading.ts,
            body: EventBody::Late {
                reason: reason.label(),
                watermark,
                values,
            },
            cause: Some(Cause::of(reading)),
            arrival: Some(reading.arrival),
        });
    }

    /// Emits a window if the rule's condition holds. `key` identifies the window within the
    /// device (its start for time windows): the event id derives from it, so updates share it.
    #[allow(clippy::too_many_arguments)]
    fn emit(
        &self,
        key: i64,
        pane: &Pane,
        origin: &Origin,
        cause: Option<&Reading<'_>>,
        closed_by: WindowClose,
        out: &mut Output,
    ) {
        if let Some(when) = &self.when {
            let view = WindowView {
                readings: pane.readings,
                accumulators: &pane.accumulators.full(),
            };
            if !when.holds(&view) {
                return;
            }
        }
        let metrics = self
            .metrics
            .iter()
            .enumerate()
            .filter(|(metric, _)| pane.accumulators.count(*metric) > 0)
            .map(|(metric, (name, _))| pane.accumulators.finish(metric, name))
            .collect();
        out.events.push(DerivedEvent {
            id: EventId::derive(&[
                self.rule.name.as_bytes(),
                origin.device().as_bytes(),
                b"window",
                &key.to_be_bytes(),
            ]),
            rule_index: self.rule.index,
            rule: self.rule.name.clone(),
            origin: origin.clone(),
            ts: pane.end,
            body: EventBody::Window {
                start: pane.start,
                end: pane.end,
                metrics,
                aggregates: self.aggregates.clone(),
                closed_by,
                update: pane.updates,
            },
            cause: cause.map(Cause::of),
            arrival: cause.map(|r| r.arrival),
        });
    }
}

/// One window of one device: its bounds and running aggregates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pane {
    start: i64,
    end: i64,
    /// Readings applied (with at least one of the rule's metrics).
    readings: u64,
    /// One per rule metric, in the rule's order.
    accumulators: Accumulators,
    /// Fired panes are kept until the watermark passes `end + allowed_lateness`.
    fired: bool,
    /// Re-emissions after firing.
    updates: u32,
}

impl Pane {
    /// Stack plus heap bytes of this pane (for the documented memory figure).
    pub fn bytes(&self) -> usize {
        std::mem::size_of::<Self>() + self.accumulators.bytes()
    }
}

/// Which windows of fixed bounds a timestamp belongs to (tumbling, hopping).
pub trait Assigner: Clone + Send + std::fmt::Debug + 'static {
    /// Calls `f(start, end)` for every window holding `ts`, oldest first.
    fn assign(&self, ts: i64, f: impl FnMut(i64, i64));
}

/// A window rule with fixed window bounds per timestamp; `A` says which bounds.
#[derive(Debug, Clone)]
pub struct TimeWindows<A> {
    spec: WindowSpec,
    assigner: A,
}

/// Per-device state of [`TimeWindows`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TimeWindowsState {
    /// Open panes and fired ones kept for lateness, ordered by start. A tumbling window holds
    /// one pane but for a moment at each boundary, so one is kept inline (no allocation of its
    /// own), and the panes move back inline once one is left (see `advance`). Written as a plain
    /// sequence, as the `Vec` it was.
    panes: SmallVec<[Pane; 1]>,
    /// Newest event time seen minus the out-of-orderness; `None` before any reading.
    watermark: Option<i64>,
    /// Wall-clock arrival of the device's latest reading: what the idle timer measures from.
    last_arrival_ms: i64,
}

impl TimeWindowsState {
    /// Panes held (open, or fired and kept for lateness).
    pub fn panes(&self) -> &[Pane] {
        &self.panes
    }
}

impl<A: Assigner> TimeWindows<A> {
    pub fn with(spec: WindowSpec, assigner: A) -> Self {
        Self { spec, assigner }
    }

    /// Fires every open pane whose end the watermark reached, then drops fired panes past
    /// lateness.
    fn advance(
        &self,
        state: &mut TimeWindowsState,
        origin: &Origin,
        cause: Option<&Reading<'_>>,
        watermark: i64,
        closed_by: WindowClose,
        out: &mut Output,
    ) {
        state.watermark = Some(watermark);
        for pane in state.panes.iter_mut().filter(|p| !p.fired) {
            if pane.end <= watermark || closed_by != WindowClose::Watermark {
                pane.fired = true;
                self.spec
                    .emit(pane.start, pane, origin, cause, closed_by, out);
            }
        }
        let lateness = self.spec.lateness_ms;
        let gone = |p: &Pane| p.fired && p.end.saturating_add(lateness) <= watermark;
        // Most readings move the watermark without closing a window: look before retaining.
        if !state.panes.iter().any(gone) {
            return;
        }
        let before = state.panes.len();
        state.panes.retain(|p| !gone(p));
        out.open_windows_delta -= (before - state.panes.len()) as i64;
        if state.panes.spilled() && state.panes.len() <= 1 {
            // Back inline: a tumbling window passes two panes at each boundary, and a heap
            // buffer kept for them would cost every device 128 bytes more for good.
            state.panes.shrink_to_fit();
        }
    }
}

impl<A: Assigner> Operator for TimeWindows<A> {
    type State = TimeWindowsState;

    fn on_reading(&self, state: &mut TimeWindowsState, reading: &Reading<'_>, out: &mut Output) {
        let spec = &self.spec;
        if spec.is_future(reading) {
            spec.reject(reading, LateReason::Future, state.watermark, out);
            return;
        }
        state.last_arrival_ms = state.last_arrival_ms.max(reading.arrival_ms);
        if spec.has_metric(reading) {
            let mut rejected = None;
            let watermark = state.watermark;
            self.assigner.assign(reading.ts, |start, end| {
                let fired = watermark.is_some_and(|wm| end <= wm);
                if fired && watermark.is_some_and(|wm| end.saturating_add(spec.lateness_ms) <= wm) {
                    rejected = Some(LateReason::Late);
                    return;
                }
                let index = match state.panes.binary_search_by_key(&start, |p| p.start) {
                    Ok(index) => index,
                    Err(_) if state.panes.len() >= spec.max_open_windows => {
                        rejected.get_or_insert(LateReason::WindowLimit);
                        return;
                    }
                    Err(index) => {
                        // Room for one more pane at a time up to two (a tumbling window holds
                        // one, two at a boundary) instead of the four a first push reserves.
                        if state.panes.len() == state.panes.capacity() && state.panes.len() < 2 {
                            state.panes.reserve_exact(1);
                        }
                        state.panes.insert(index, spec.new_pane(start, end));
                        out.open_windows_delta += 1;
                        state.panes[index].fired = fired;
                        index
                    }
                };
                let pane = &mut state.panes[index];
                spec.add(pane, reading);
                if fired {
                    // Within allowed lateness: correct the fired window. A window that fired
                    // empty (never opened) emits for the first time, as update 0.
                    if pane.readings > 1 {
                        pane.updates += 1;
                    }
                    spec.emit(
                        start,
                        pane,
                        reading.origin,
                        Some(reading),
                        WindowClose::Watermark,
                        out,
                    );
                }
            });
            if let Some(reason) = rejected {
                spec.reject(reading, reason, watermark, out);
            }
        }
        let candidate = reading.ts.saturating_sub(spec.out_of_orderness_ms);
        if state.watermark.is_none_or(|wm| candidate > wm) {
            self.advance(
                state,
                reading.origin,
                Some(reading),
                candidate,
                WindowClose::Watermark,
                out,
            );
        }
    }

    fn wants_ticks(&self) -> bool {
        self.spec.idle_timeout_ms.is_some()
    }

    fn on_tick(
        &self,
        state: &mut TimeWindowsState,
        origin: &Origin,
        now_ms: i64,
        out: &mut Output,
    ) {
        if !self.spec.is_idle(state.last_arrival_ms, now_ms) {
            return;
        }
        let Some(last_end) = state.panes.iter().filter(|p| !p.fired).map(|p| p.end).max() else {
            return;
        };
        let watermark = state.watermark.map_or(last_end, |wm| wm.max(last_end));
        self.advance(
            state,
            origin,
            None,
            watermark,
            WindowClose::IdleTimeout,
            out,
        );
    }

    fn on_close(&self, state: &mut TimeWindowsState, origin: &Origin, out: &mut Output) {
        if !self.spec.flush_on_shutdown {
            return;
        }
        for pane in state.panes.drain(..) {
            out.open_windows_delta -= 1;
            if !pane.fired {
                self.spec
                    .emit(pane.start, &pane, origin, None, WindowClose::Shutdown, out);
            }
        }
    }
}

/// Builders shared by the window kinds' unit tests.
#[cfg(test)]
pub(crate) mod test_support {
    use super::*;
    use crate::model::event::WindowMetric;

    /// A config with one metric `temperature` and the given shape keys filled in by `shape`.
    pub fn config(shape: impl FnOnce(&mut WindowConfig)) -> WindowConfig {
        let mut config = WindowConfig {
            size: None,
            slide: None,
            gap: None,
            max_length: None,
            length: None,
            every: None,
            metrics: vec!["temperature".into()],
            aggregates: vec![
                Aggregate::Count,
                Aggregate::Min,
                Aggregate::Max,
                Aggregate::Avg,
            ],
            max_out_of_orderness: Duration::ZERO,
            allowed_lateness: Duration::ZERO,
            max_future_skew: Duration::from_secs(300),
            idle_timeout: None,
            late_topic: None,
            when: None,
            max_open_windows: 1024,
            on_shutdown: OnShutdown::Flush,
        };
        shape(&mut config);
        config
    }

    pub fn spec(config: &WindowConfig) -> WindowSpec {
        let rule = RuleMeta {
            index: 0,
            name: "r".into(),
        };
        let slots = (0..config.metrics.len()).collect();
        WindowSpec::new(rule, config, slots).expect("valid condition")
    }

    /// A window event reduced to what tests compare.
    #[derive(Debug, Clone, PartialEq)]
    pub struct Fired {
        pub start: i64,
        pub end: i64,
        pub count: u64,
        pub closed_by: WindowClose,
        pub update: u32,
        pub metric: Option<WindowMetric>,
    }

    /// (start, end, count of the first metric) of each window event.
    pub fn fired(out: &Output) -> Vec<Fired> {
        out.events
            .iter()
            .filter_map(|e| match &e.body {
                EventBody::Window {
                    start,
                    end,
                    metrics,
                    closed_by,
                    update,
                    ..
                } => Some(Fired {
                    start: *start,
                    end: *end,
                    count: metrics.first().map_or(0, |m| m.count),
                    closed_by: *closed_by,
                    update: *update,
                    metric: metrics.first().cloned(),
                }),
                _ => None,
            })
            .collect()
    }

    /// (start, end, count) triples of the window events, for compact assertions.
    pub fn bounds(out: &Output) -> Vec<(i64, i64, u64)> {
        fired(out)
            .into_iter()
            .map(|f| (f.start, f.end, f.count))
            .collect()
    }

    /// Reasons of the late events.
    pub fn late_reasons(out: &Output) -> Vec<&'static str> {
        out.events
            .iter()
            .filter_map(|e| match &e.body {
                EventBody::Late { reason, .. } => Some(*reason),
                _ => None,
            })
            .collect()
    }
}
