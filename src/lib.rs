//! weir: an event stream processor for IoT telemetry on edge gateways.
//!
//! A reading travels through the modules in this order:
//!
//! - [`source`]: subscribes over MQTT (rumqttc), matches the topic to an input and hands the raw
//!   payload to the worker that owns its device, through a bounded channel.
//! - [`decode`]: payload bytes (JSON or CBOR) + topic -> [`decode::Reading`]; bad input becomes a
//!   [`decode::DecodeError`] with a reason, counted and logged, never fatal.
//! - [`engine`]: the worker loop; keeps per-device operator state and runs every rule of the input.
//! - [`operators`]: one file per operator kind (hysteresis; tumbling, hopping, session and count
//!   windows under `operators::window`); synchronous state machines that turn readings (and
//!   watermarks, and timer ticks) into [`event::DerivedEvent`]s.
//! - [`route`]: derived event -> output topic (template) and payload (JSON or CBOR).
//! - [`sink`]: publishes over its own MQTT connection, so a slow publish never stalls intake.
//!
//! Around the path: [`config`] (TOML types and validation), [`topic`] (patterns and templates),
//! [`metrics`] (every metric defined once, latency histograms, the live tap of derived events,
//! and the HTTP endpoints: metrics, health, rules API, tap), [`mqtt`] (connection options
//! and reconnect backoff shared by source and sink, and one client over MQTT 3.1.1 and 5),
//! [`trace`] (W3C trace context from readings to events; OTLP span export with the `otlp`
//! feature), [`app`] (wires the stages together),
//! [`store`] (input log and snapshots in the state dir), [`demo`] (embedded broker and device
//! simulator), [`replay`] (the engine over recorded readings on a virtual clock: `weir replay`,
//! golden cases for `weir test`, and `weir record`), [`top`] (a terminal view of a running weir).

pub mod app;
pub mod config;
pub mod decode;
pub mod demo;
pub mod engine;
pub mod event;
pub mod metrics;
pub mod model;
pub mod mqtt;
pub mod operators;
pub mod replay;
pub mod route;
pub mod sink;
pub mod source;
pub mod store;
pub mod top;
pub mod trace;
