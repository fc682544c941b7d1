//! Features: what the models of later stages read about a room, computed
//! from what the encoders return and from the decoded audio, and kept per
//! room in event time — audio summaries per tick ([`audio`]) and each room's
//! bounded look-back window and per-segment sets ([`window`]).
//!
//! Not for: running encoders (`models`) or talking to Kafka (the features
//! operator in `operators` wires this to the runtime).

pub mod audio;
pub mod window;
