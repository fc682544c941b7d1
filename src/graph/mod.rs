//! The gifting graph behind MMBee's graph-guided interest expansion: who gifted to
//! which streamer and how much ([`GiftGraph`], built incrementally from gift
//! events), which streamers share gifters ([`swing`] similarity), the node
//! embeddings a contrastive graph encoder learns over both ([`graphcl`], with the
//! `torch` feature), and the versioned tables an offline job writes and every
//! instance reads in full ([`GraphTables`], [`GraphSlot`]).
//!
//! Not for: scoring viewers (the MMBee operator reads the tables), keeping a user's
//! live history between two graph versions (user state does), or graphs of other
//! relations (follows, co-watching): edges here are gifts only.

pub mod gifts;
#[cfg(feature = "torch")]
pub mod graphcl;
pub mod job;
pub mod swing;
pub mod tables;

pub use gifts::{Edge, GiftGraph, SnapshotError};
pub use swing::{swing, SwingParams};
pub use tables::{GraphSlot, GraphTables, Neighbours, NodeKind, TablesError};
