//! The relay: one session between the host (our stdin/stdout) and the upstream server.
//!
//! Each direction is read by a thread of its own that does the whole job of a line on the spot,
//! the way a bare byte relay would, with no hand-off between reading and writing:
//! - the **host reader** (`from_host`) classifies every line from the host; it forwards what it
//!   understood, answers what it refused, and puts every `tools/call` through the guard before
//!   forwarding;
//! - the **upstream reader** (`from_upstream`) does the same for the server's lines: responses
//!   are matched to the host's requests (to learn tool annotations from `tools/list` and to
//!   answer whatever is still pending if the server dies), and only JSON-RPC ever reaches our
//!   stdout;
//! - each output has one [`Outlet`]: whole messages are queued and written together when the
//!   reader that produced them is about to wait for more input, so lines never tear, each
//!   producer keeps its order, and a burst of lines costs one `writev`.
//!
//! The async runtime (one thread) holds everything that waits: calls on the guard service or a
//! human (`held`), the server's exit, signals, timers. [`run`] waits for the first of: host
//! EOF, our stdout closing, a signal, the server exiting, and then runs the one shutdown path.
//!
//! Forwarded messages are the original bytes of the line. What both readers and the held calls
//! share (`state`) sits behind short, uncontended locks, never held across an await or a
//! write; the submodules see this module's imports.

// foldhash: seeded per process, and several times faster than SipHash on the short keys of the
// maps used on every call.
use foldhash::{HashMap, HashMapExt};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use tokio_util::sync::CancellationToken;

use crate::approval::{self, Status};
use crate::audit::{self, Audit, Record};
use crate::config::{ApprovalChannel, BlockResponse, Config, ErrorCodes, FailureMode};
use crate::framing::{self, Frame, LineReader, Outlet};
use crate::guard::metadata::ListedTool;
use crate::guard::{self, Action, Guard, Mode};
use crate::json::Json;
use crate::jsonrpc::{self, Id, Kind, Message, Params, Parsed, Raw, Rejection, Reply, code};
use crate::redact::Redactor;
use crate::remote::{self, events, events::What};
use crate::stdio::{self, Input};
use crate::upstream::{self, Upstream};

mod from_host;
mod from_upstream;
mod held;
mod state;

use state::Shared;

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

    let max = config.max_message_bytes;
    let audit = Arc::new(audit);
    let shared = Arc::new(Shared::new(
        config,
        audit.clone(),
        Arc::new(stdio::stdout().behind(audit.clone())),
        Arc::new(child_stdin.behind(audit)),
    ));
    let mut host_reader = reader_thread("host reader", {
        let shared = shared.clone();
        move || from_host::host_loop(&shared, stdio::stdin(), max)
    });
    let mut upstream_reader = reader_thread("upstream reader", {
        let shared = shared.clone();
        move || from_upstream::upstream_loop(&shared, child_stdout, max)
    });

    let mut signals = Signals::new();
    let mut exited = None;
    let quit = tokio::select! {
        _ = &mut host_reader => Quit::HostClosed,
        _ = shared.to_host.broken() => Quit::HostClosed,
        sig = signals.recv() => Quit::Signal(sig),
        status = upstream.wait() => {
            exited = status.ok();
            Quit::UpstreamExited
        }
    };
    tracing::debug!(?quit, "session ending");

    // Stop reading the host, and close the server's stdin once what was queued for it is
    // written: the primary shutdown signal for a stdio server. The grace period runs from now:
    // a server that stopped reading cannot stretch it (it is signalled when the period ends,
    // whatever was still queued).
    shared.closing.store(true, Ordering::Release);
    shared.cancel_held().await;
    let drain = {
        let to_upstream = shared.to_upstream.clone();
        tokio::time::timeout(
            upstream::GRACE,
            tokio::task::spawn_blocking(move || to_upstream.close()),
        )
    };
    let status = match exited {
        Some(status) => {
            let _ = tokio::join!(drain, upstream.stop(upstream::GRACE));
            Some(status)
        }
        None => tokio::join!(drain, upstream.stop(upstream::GRACE)).1.ok(),
    };
    // The server is gone: read what it wrote last, then answer whatever it left unanswered.
    let _ = tokio::time::timeout(upstream::GRACE, &mut upstream_reader).await;
    shared.fail_pending();
    if let Some(remote) = &shared.remote {
        remote.close(upstream::GRACE).await;
    }
    // Likewise a host that stopped reading our stdout.
    let to_host = shared.to_host.clone();
    let _ = tokio::time::timeout(
        upstream::GRACE,
        tokio::task::spawn_blocking(move || to_host.close()),
    )
    .await;
    shared.audit.close();

    match quit {
        Quit::HostClosed => 0,
        Quit::Signal(sig) => 128u8.wrapping_add(sig as u8),
        Quit::UpstreamExited => status.map(upstream::exit_code).unwrap_or(1),
    }
}

/// Runs `job` on a thread of its own; the receiver resolves when it returns. A thread blocked
/// in `read` cannot be cancelled: one still running when the session ends goes with the process.
fn reader_thread(name: &str, job: impl FnOnce() + Send + 'static) -> oneshot::Receiver<()> {
    let (done, finished) = oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            job();
            let _ = done.send(());
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the {name} thread");
    }
    finished
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
