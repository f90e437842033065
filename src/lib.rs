//! weir: an event stream processor for IoT telemetry on edge gateways.
//!
//! A reading travels: a [`source`] (MQTT, or a NATS JetStream stream) hands raw messages to the
//! [`engine`], whose workers [`decode`] them into readings, run the [`operators`] (per-device
//! state machines) and [`route`] the derived events, which each [`sink`] (MQTT, NATS, ...)
//! delivers. The [`store`] makes intake
//! durable in between; [`metrics`] and [`telemetry`] watch it all.
//!
//! The modules form layers, bottom first. A module imports only its own layer and the ones
//! below (no cycles); the adapters stand each on their own. `tests/layers.rs` holds the code to
//! this map and fails, naming file and line, on an arrow upwards.
//!
//! - shapes: [`config`] (TOML types, validation with file and line, topic patterns, endpoint
//!   and condition parsers). Imports nothing of the runtime.
//! - model: [`model`] (what flows: raw messages, readings and their origins, derived events
//!   and their ids, trace context, encoded events with headers; the source and durability
//!   ports; the wall clock) and [`metrics`] (every metric defined once, latency recorders, the
//!   live tap, the span queue: the handles every stage records into).
//! - stages: [`decode`] (payload bytes + topic -> reading; bad input -> a reason), [`operators`]
//!   (one file per operator kind; reading in, events out, time passed in), [`route`] (event ->
//!   topic and payload, JSON or CBOR; no protocol types).
//! - engine: [`engine`] (the plan, the worker loop with per-device state, snapshots of it).
//! - protocols: [`mqtt`] (rumqttc's 3.1.1 and 5 clients behind one, connection options,
//!   reconnect backoff), [`nats`] (NATS connections for `[cluster]` and `nats` sinks).
//! - adapters: [`source`] (intake over the source port; `source::mqtt`, `source::jetstream`),
//!   [`sink`] (an outbox per sink over the sink port; `sink::mqtt`, `sink::nats`), [`store`] (input log and snapshots in the state dir),
//!   [`telemetry`] (HTTP endpoints: metrics, health, rules API, tap, reload; OTLP export),
//!   [`cluster`] (the NATS streams several instances share, `weir cluster init`; membership and
//!   partition claims; partition state in the object store).
//! - wiring: [`app`] (wires the stages; `app::hub` runs them in terms over the partitions a
//!   cluster instance holds), [`demo`] (embedded broker and device simulator),
//!   [`replay`] (the engine over recorded readings on a virtual clock; `weir record`), [`top`]
//!   (a terminal view of a running weir).
//!
//! Cargo features leave out what a gateway may not use (`config::features` lists them): the
//! webhook, AMQP and PostgreSQL sinks (`http-sink`, `amqp-sink`, `postgres-sink`), [`nats`],
//! [`cluster`], `source::jetstream`, `sink::nats` and `app::hub` (`cluster`), and the demo's
//! embedded broker (`demo`). All but OTLP export (`otlp`) are in the default.

pub mod app;
#[cfg(feature = "cluster")]
pub mod cluster;
pub mod config;
pub mod decode;
pub mod demo;
pub mod engine;
pub mod metrics;
pub mod model;
pub mod mqtt;
#[cfg(feature = "cluster")]
pub mod nats;
pub mod operators;
pub mod replay;
pub mod route;
pub mod sink;
pub mod source;
pub mod store;
pub mod telemetry;
pub mod top;
