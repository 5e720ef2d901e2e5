//! The integration-test crate: one binary, many modules.

mod direct;
mod transcripts;
mod util;
