//! The wire schemas (generated from `proto/onair/v1/onair.proto`) and the
//! decoding of input records: content-type dispatch (protobuf or JSON),
//! size limits, schema checks, and deterministic output ids.
//!
//! Not for: media decoding (frames and samples come later, in `decode`), or
//! anything that needs state across records.

mod decode;
mod id;
mod json;

pub use decode::{decode_input, DecodeError, Event, InputKind, Limits, CONTENT_TYPE_HEADER};
pub use id::deterministic_id;

/// Types generated from `onair.proto` (package `onair.v1`).
#[allow(missing_docs, clippy::all)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/onair.v1.rs"));
}
pub use v1::*;

/// The schema version this build writes and the highest it reads.
pub const SCHEMA_VERSION: u32 = 1;
