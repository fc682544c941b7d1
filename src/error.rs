//! The shared vocabulary of failure: whose fault an error is and whether a
//! retry can help. Each module defines its own `thiserror` enum and maps its
//! variants onto [`Fault`] so that the runtime can decide uniformly what to do
//! (dead-letter the input, retry the external call, or stop).
//!
//! Not for: carrying context strings; that is each module's error's job.

/// Whose fault an error is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The input record is bad; it goes to the dead-letter topic. Never retried.
    Input,
    /// An external system (broker, tool, file system) failed.
    External,
    /// A bug or broken invariant in onair itself.
    Internal,
}

/// Implemented by every error enum of the crate.
pub trait Classify {
    /// Whose fault it is.
    fn fault(&self) -> Fault;
    /// Whether trying the same operation again may succeed.
    fn retryable(&self) -> bool {
        false
    }
}

/// Formats an error with its whole `source()` chain, `a: b: c`.
pub fn chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        out.push_str(": ");
        out.push_str(&e.to_string());
        cur = e.source();
    }
    out
}
