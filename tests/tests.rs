//! The integration-test crate: one binary, many modules.

mod approvals;
mod cli;
mod direct;
mod elicitation;
mod guard_service;
mod interop;
mod proxy;
mod shutdown;
mod transcripts;
mod util;
