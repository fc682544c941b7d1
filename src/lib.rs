//! onair: a real-time live-stream processing engine.
//!
//! The modules follow the dataflow: records come in through [`sources`] (Kafka
//! or the in-process [`simulator`]), are decoded against the wire [`schema`]
//! (media payloads by [`decode`]), run through per-partition tasks in the [`runtime`] that feed [`operators`]
//! holding per-room [`state`], and leave through [`sinks`]. [`metrics`] names
//! every series the engine exports; [`config`] reads pipeline files; [`cli`] is
//! the command line.
//!
//! Not here: model training (see `models/`), deployment (see `docker-compose.yml`).

pub mod cli;
pub mod config;
pub mod decode;
pub mod error;
pub mod features;
pub mod graph;
pub mod kafka;
pub mod metrics;
pub mod models;
pub mod operators;
pub mod runtime;
pub mod schema;
pub mod simulator;
pub mod sinks;
pub mod sources;
pub mod state;
