//! Features: what the models of later stages read about a room, computed
//! from what the encoders return and from the decoded audio, and kept per
//! room in event time — audio summaries per tick ([`audio`]) and each room's
//! bounded look-back window and per-segment sets ([`window`]) — and the flat
//! row a tick's features make for the highlight model ([`row`]).
//!
//! Not for: running encoders (`models`) or talking to Kafka (the features
//! operator in `operators` wires this to the runtime).

pub mod audio;
pub mod row;
pub mod window;
