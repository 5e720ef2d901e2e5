//! The relay: one session between the host (our stdin/stdout) and the upstream server.
//!
//! Tasks, each with one job:
//! - the **host reader** classifies every line from the host; it forwards what it understood,
//!   answers what it refused, and puts every `tools/call` through the guard before forwarding;
//! - the **upstream reader** does the same for the server's lines: responses are matched to the
//!   host's requests (to learn tool annotations from `tools/list` and to answer whatever is
//!   still pending if the server dies), and only JSON-RPC ever reaches our stdout;
//! - one **writer** per output ([`framing::write_loop`]), fed by a channel, so lines never tear
//!   and each direction keeps its order;
//! - [`run`] itself waits for the first of: host EOF, a signal, the server exiting, and then
//!   runs the one shutdown path.
//!
//! The host side lives in [`from_host`], the upstream side in [`from_upstream`], calls that wait
//! (on the guard service or a human) in [`held`], and what they share in [`state`]; the
//! submodules see this module's imports.
//!
//! Forwarded messages are the original bytes of the line. The state both readers share
//! ([`Shared`]) sits behind short, uncontended locks and is never held across an await.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use tokio_util::sync::CancellationToken;

use crate::approval::{self, Status};
use crate::audit::{self, Audit, Record};
use crate::config::{ApprovalChannel, BlockResponse, Config, ErrorCodes, FailureMode};
use crate::framing::{self, Frame, LineReader};
use crate::guard::metadata::ListedTool;
use crate::guard::{self, Action, Guard, Mode};
use crate::jsonrpc::{self, Id, Kind, Message, Parsed, Rejection, Reply, code};
use crate::redact::Redactor;
use crate::remote;
use crate::upstream::{self, Upstream};

mod from_host;
mod from_upstream;
mod held;
mod state;

use from_host::host_loop;
use from_upstream::upstream_loop;
use state::Shared;

/// Capacity of each output queue; a full queue pushes back on the reader that feeds it.
const QUEUE: usize = 1024;

/// Why the session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Quit {
    HostClosed,
    Signal(i32),
    UpstreamExited,
}

/// Runs the proxy until the session ends; returns the process exit code.
pub async fn run(config: Config, audit: Audit) -> u8 {
    let (mut upstream, child_stdin, child_stdout) = match Upstream::spawn(&config.upstream) {
        Ok(parts) => parts,
        Err(e) => {
            tracing::error!("{e}");
            return e.exit_code();
        }
    };
    tracing::info!(
        pid = upstream.pid(),
        command = %config.upstream.command,
        mode = config.mode.as_str(),
        server = %config.server_name,
        "upstream started"
    );

    let (to_host, host_rx) = mpsc::channel::<Bytes>(QUEUE);
    let (to_upstream, upstream_rx) = mpsc::channel::<Bytes>(QUEUE);
    let mut host_writer = tokio::spawn(framing::write_loop(crate::stdio::stdout(), host_rx));
    let upstream_writer = tokio::spawn(framing::write_loop(child_stdin, upstream_rx));

    let max = config.max_message_bytes;
    let shared = Arc::new(Shared::new(config, audit, to_host));
    let mut host_reader = tokio::spawn(host_loop(shared.clone(), to_upstream, max));
    let mut upstream_reader = tokio::spawn(upstream_loop(
        shared.clone(),
        LineReader::new(child_stdout, max),
    ));

    let mut signals = Signals::new();
    let mut exited = None;
    let mut host_gone = false;
    let mut host_read = false;
    let quit = tokio::select! {
        _ = &mut host_reader => {
            host_read = true;
            Quit::HostClosed
        }
        _ = &mut host_writer => {
            host_gone = true;
            Quit::HostClosed
        }
        sig = signals.recv() => Quit::Signal(sig),
        status = upstream.wait() => {
            exited = status.ok();
            Quit::UpstreamExited
        }
    };
    tracing::debug!(?quit, "session ending");

    // Stop reading the host: that drops the last sender to the upstream writer, which then
    // closes the server's stdin, the primary shutdown signal for a stdio server. The grace
    // period runs from now, while the queue drains: a server that stopped reading cannot stretch
    // it (its stdin is closed when the period ends, with whatever was still queued).
    if !host_read {
        host_reader.abort();
        let _ = host_reader.await;
    }
    shared.cancel_held().await;
    let mut upstream_writer = upstream_writer;
    let drain = async {
        if tokio::time::timeout(upstream::GRACE, &mut upstream_writer)
            .await
            .is_err()
        {
            upstream_writer.abort();
        }
    };
    let status = match exited {
        Some(status) => {
            let _ = tokio::join!(drain, upstream.stop(upstream::GRACE));
            Some(status)
        }
        None => tokio::join!(drain, upstream.stop(upstream::GRACE)).1.ok(),
    };
    // The server is gone: read what it wrote last, then answer whatever it left unanswered.
    if tokio::time::timeout(upstream::GRACE, &mut upstream_reader)
        .await
        .is_err()
    {
        upstream_reader.abort();
        let _ = upstream_reader.await;
    }
    shared.fail_pending().await;
    if let Some(remote) = &shared.remote {
        remote.close(upstream::GRACE).await;
    }
    let Shared { to_host, audit, .. } = match Arc::try_unwrap(shared) {
        Ok(shared) => shared,
        Err(_) => {
            tracing::error!("session state still shared at exit");
            return 1;
        }
    };
    drop(to_host);
    // Likewise a host that stopped reading our stdout.
    if !host_gone
        && tokio::time::timeout(upstream::GRACE, &mut host_writer)
            .await
            .is_err()
    {
        host_writer.abort();
    }
    let mut audit = audit;
    audit.close();

    match quit {
        Quit::HostClosed => 0,
        Quit::Signal(sig) => 128u8.wrapping_add(sig as u8),
        Quit::UpstreamExited => status.map(upstream::exit_code).unwrap_or(1),
    }
}

// === signals ===

/// SIGTERM, SIGINT and SIGHUP, any of which ends the session the same way as host EOF.
struct Signals {
    term: Option<tokio::signal::unix::Signal>,
    int: Option<tokio::signal::unix::Signal>,
    hup: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn new() -> Signals {
        use tokio::signal::unix::{SignalKind, signal};
        Signals {
            term: signal(SignalKind::terminate()).ok(),
            int: signal(SignalKind::interrupt()).ok(),
            hup: signal(SignalKind::hangup()).ok(),
        }
    }

    /// The next signal's number.
    async fn recv(&mut self) -> i32 {
        async fn next(s: &mut Option<tokio::signal::unix::Signal>) {
            match s {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            _ = next(&mut self.term) => 15,
            _ = next(&mut self.int) => 2,
            _ = next(&mut self.hup) => 1,
        }
    }
}
