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

use crate::approval::{self, Status};
use crate::audit::{self, Audit, Record};
use crate::config::{ApprovalChannel, BlockResponse, Config, ErrorCodes};
use crate::framing::{self, Frame, LineReader};
use crate::guard::metadata::ListedTool;
use crate::guard::{self, Action, Evaluation, Guard, Mode};
use crate::jsonrpc::{self, Id, Kind, Message, Parsed, Rejection, Reply, code};
use crate::upstream::{self, Upstream};

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
    let mut host_writer = tokio::spawn(framing::write_loop(tokio::io::stdout(), host_rx));
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
    let quit = tokio::select! {
        _ = &mut host_reader => Quit::HostClosed,
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
    host_reader.abort();
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
    }
    shared.fail_pending().await;
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

// === shared state ===

/// A host request sent upstream and not yet answered.
struct Pending {
    /// `tools/list` results are read on the way back.
    lists_tools: bool,
    /// The batch the request came in, if any.
    batch: Option<u64>,
}

/// The id map for server→host requests: the host sees `"apie:<n>"`, the server its own id.
#[derive(Default)]
struct Outbound {
    last: u64,
    /// Host-side id → the server's id.
    by_host_id: HashMap<Id, Id>,
}

impl Outbound {
    fn remap(&mut self, server_id: &Id) -> Id {
        self.last += 1;
        let id = Id::String(format!("apie:{}", self.last).into());
        self.by_host_id.insert(id.clone(), server_id.clone());
        id
    }

    /// The host-side id of a server request still in flight.
    fn host_id_of(&self, server_id: &Id) -> Option<Id> {
        self.by_host_id
            .iter()
            .find(|(_, s)| *s == server_id)
            .map(|(h, _)| h.clone())
    }
}

/// `raw` with its top-level `id` replaced.
fn with_id(raw: &[u8], id: &Id) -> Option<Bytes> {
    let text = std::str::from_utf8(raw).ok()?;
    jsonrpc::replace_member(text, "id", &id.to_json()).map(Bytes::from)
}

/// Responses being gathered for a batch the host sent.
struct Batch {
    /// How many responses the batch gets; unknown until every element was handled.
    expected: Option<usize>,
    responses: Vec<Bytes>,
}

/// What both readers need.
struct Shared {
    guard: Guard,
    mode: Mode,
    audit: Audit,
    codes: ErrorCodes,
    block_response: BlockResponse,
    run_id: String,
    agent_key: String,
    server: String,
    /// Host requests in flight upstream, by id.
    pending: Mutex<HashMap<Id, Pending>>,
    batches: Mutex<(u64, HashMap<u64, Batch>)>,
    /// Server→host requests in flight, by the id the host saw (SPEC §7: remapped, so requests
    /// the proxy itself sends the host can never collide with the server's).
    outbound: Mutex<Outbound>,
    /// The local approval queue, when `approvals.channels` lists `local`.
    queue: Option<approval::Queue>,
    approval_timeout: Duration,
    max_pending_calls: usize,
    /// Calls held for a human, by the host's id: sending on the channel ends the wait.
    held: Mutex<HashMap<Id, oneshot::Sender<()>>>,
    /// The tasks waiting on held calls, so shutdown can let them clean up.
    held_tasks: Mutex<Vec<JoinHandle<()>>>,
    /// The host writer's queue. Held here so both readers (and shutdown) can answer the host.
    to_host: mpsc::Sender<Bytes>,
}

impl Shared {
    fn new(config: Config, audit: Audit, to_host: mpsc::Sender<Bytes>) -> Shared {
        let queue = if config.mode == Mode::Enforce
            && config.approval_channels.contains(&ApprovalChannel::Local)
        {
            approval::Queue::open_default()
                .inspect_err(|e| tracing::warn!("local approvals unavailable: {e}"))
                .ok()
        } else {
            None
        };
        Shared {
            queue,
            approval_timeout: config.approval_timeout,
            max_pending_calls: config.max_pending_calls,
            held: Mutex::new(HashMap::new()),
            held_tasks: Mutex::new(Vec::new()),
            mode: config.mode,
            audit,
            codes: config.error_codes,
            block_response: config.block_response,
            run_id: config.run_id.clone(),
            agent_key: config.agent_key.clone(),
            server: config.server_name.clone(),
            guard: Guard::new(config),
            pending: Mutex::new(HashMap::new()),
            batches: Mutex::new((0, HashMap::new())),
            outbound: Mutex::new(Outbound::default()),
            to_host,
        }
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<Id, Pending>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn batches(&self) -> std::sync::MutexGuard<'_, (u64, HashMap<u64, Batch>)> {
        self.batches.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<Id, oneshot::Sender<()>>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn held_tasks(&self) -> std::sync::MutexGuard<'_, Vec<JoinHandle<()>>> {
        self.held_tasks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ends every wait for a human (the session is over): each cleans up its queue entry and
    /// drops its way to the upstream.
    async fn cancel_held(&self) {
        for (_, cancel) in self.held().drain() {
            let _ = cancel.send(());
        }
        let tasks: Vec<_> = self.held_tasks().drain(..).collect();
        for task in tasks {
            let _ = tokio::time::timeout(upstream::GRACE, task).await;
        }
    }

    fn outbound(&self) -> std::sync::MutexGuard<'_, Outbound> {
        self.outbound.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends a message to the host, or adds it to its batch.
    async fn reply(&self, batch: Option<u64>, msg: Bytes) {
        match batch {
            Some(b) => {
                let done = {
                    let mut batches = self.batches();
                    match batches.1.get_mut(&b) {
                        Some(acc) => {
                            acc.responses.push(msg);
                            take_if_complete(&mut batches.1, b)
                        }
                        None => None,
                    }
                };
                if let Some(array) = done {
                    let _ = self.to_host.send(array).await;
                }
            }
            None => {
                let _ = self.to_host.send(msg).await;
            }
        }
    }

    /// Answers every request still pending: the server will not.
    async fn fail_pending(&self) {
        let pending: Vec<(Id, Pending)> = self.pending().drain().collect();
        for (id, p) in pending {
            let msg = jsonrpc::error_response(
                Some(&id),
                code::INTERNAL_ERROR,
                "Upstream MCP server exited",
                Some(&json!({"kind": "upstream_exited"})),
            );
            let msg = Bytes::from(msg);
            let done = match p.batch {
                Some(b) => {
                    let mut batches = self.batches();
                    if let Some(acc) = batches.1.get_mut(&b) {
                        acc.responses.push(msg);
                    }
                    take_if_complete(&mut batches.1, b)
                }
                None => Some(msg),
            };
            if let Some(msg) = done {
                let _ = self.to_host.send(msg).await;
            }
        }
    }
}

/// Removes batch `b` and returns its response array once every response is in.
fn take_if_complete(batches: &mut HashMap<u64, Batch>, b: u64) -> Option<Bytes> {
    let acc = batches.get(&b)?;
    if acc.expected != Some(acc.responses.len()) {
        return None;
    }
    let acc = batches.remove(&b)?;
    if acc.responses.is_empty() {
        return None;
    }
    let mut out = Vec::with_capacity(acc.responses.iter().map(|r| r.len() + 1).sum::<usize>() + 1);
    out.push(b'[');
    for (i, r) in acc.responses.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(r);
    }
    out.push(b']');
    Some(Bytes::from(out))
}

// === host → upstream ===

async fn host_loop(shared: Arc<Shared>, to_upstream: mpsc::Sender<Bytes>, max: usize) {
    let mut reader = LineReader::new(tokio::io::stdin(), max);
    let host = HostSide {
        shared: &shared,
        shared_arc: &shared,
        to_upstream: &to_upstream,
    };
    loop {
        match reader.next().await {
            Ok(Some(Frame::Line(line))) => host.line(line).await,
            Ok(Some(Frame::TooLong { head })) => {
                let id = framing::sniff_id(&head);
                tracing::warn!(
                    ?id,
                    limit = max,
                    "host message over maxMessageBytes refused"
                );
                let r = Rejection::invalid(
                    id,
                    format!("Invalid Request: message longer than maxMessageBytes ({max})"),
                );
                shared.reply(None, r.to_response().into()).await;
            }
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(error = %e, "reading stdin failed");
                break;
            }
        }
    }
    tracing::debug!("host closed its stdin");
}

struct HostSide<'a> {
    shared: &'a Shared,
    shared_arc: &'a Arc<Shared>,
    to_upstream: &'a mpsc::Sender<Bytes>,
}

/// A call waiting for a human, with everything needed to forward or refuse it later.
struct HeldCall {
    id: Id,
    call: ToolCall,
    eval: Evaluation,
    digest: String,
    raw: Bytes,
    batch: Option<u64>,
    started: Instant,
}

/// The wait for one held call: forwards it if approved, answers -32002 otherwise, and ends
/// silently when the host cancels it (or the session ends).
async fn wait_for_approval(
    shared: Arc<Shared>,
    to_upstream: mpsc::Sender<Bytes>,
    queue: approval::Queue,
    request: approval::Request,
    held: HeldCall,
    cancelled: oneshot::Receiver<()>,
) {
    let answer = tokio::select! {
        answer = approval::wait_local(&queue, &request, shared.approval_timeout) => Some(answer),
        _ = cancelled => None,
    };
    shared.held().remove(&held.id);
    let approval_id = Some(request.id.as_str());
    match answer {
        Some((Status::Approved, _)) => {
            tracing::info!(tool = %held.call.name, approval = %request.id, "approved: forwarded");
            shared.audit_call_with(
                &held.id,
                &held.eval,
                "approved",
                approval_id,
                Some("approved"),
                &held.digest,
                held.started,
            );
            shared.pending().insert(
                held.id.clone(),
                Pending {
                    lists_tools: false,
                    batch: held.batch,
                },
            );
            let _ = to_upstream.send(held.raw.clone()).await;
        }
        Some((status, reason)) => {
            let reason = reason.unwrap_or_else(|| match status {
                Status::Timeout => format!(
                    "{}; nobody answered within {} ms",
                    held.eval.reason(),
                    shared.approval_timeout.as_millis()
                ),
                _ => held.eval.reason(),
            });
            tracing::warn!(tool = %held.call.name, approval = %request.id, status = status.as_str(), "not approved");
            shared.deny(&held, status, approval_id, &reason).await;
        }
        None => {
            tracing::info!(tool = %held.call.name, approval = %request.id, "held call cancelled");
            shared.audit_call_with(
                &held.id,
                &held.eval,
                "cancelled",
                approval_id,
                Some("cancelled"),
                &held.digest,
                held.started,
            );
        }
    }
}

impl HostSide<'_> {
    async fn line(&self, line: Bytes) {
        match jsonrpc::classify(&line) {
            Parsed::Message(msg) => {
                let raw = line.clone();
                self.message(msg, raw, None).await
            }
            Parsed::Rejected(r) => self.refuse(&r, None).await,
            Parsed::Batch(items) => self.batch(&items).await,
        }
    }

    async fn refuse(&self, r: &Rejection, batch: Option<u64>) {
        tracing::warn!(code = r.code, id = ?r.id, "refused host message: {}", r.message);
        self.shared.reply(batch, r.to_response().into()).await;
    }

    /// A batch: every element is handled as if it came alone; the responses go back as one
    /// array once all are in (none if the batch held no requests).
    async fn batch(&self, items: &[&RawValue]) {
        let b = {
            let mut batches = self.shared.batches();
            batches.0 += 1;
            let b = batches.0;
            batches.1.insert(
                b,
                Batch {
                    expected: None,
                    responses: Vec::new(),
                },
            );
            b
        };
        let mut expected = 0;
        for item in items {
            match jsonrpc::classify_element(item) {
                Ok(msg) => {
                    if matches!(msg.kind, Kind::Request { .. }) {
                        expected += 1;
                    }
                    let raw = Bytes::copy_from_slice(item.get().as_bytes());
                    self.message(msg, raw, Some(b)).await;
                }
                Err(r) => {
                    expected += 1;
                    self.refuse(&r, Some(b)).await;
                }
            }
        }
        let done = {
            let mut batches = self.shared.batches();
            if let Some(acc) = batches.1.get_mut(&b) {
                acc.expected = Some(expected);
            }
            let done = take_if_complete(&mut batches.1, b);
            if expected == 0 {
                batches.1.remove(&b);
            }
            done
        };
        if let Some(array) = done {
            let _ = self.shared.to_host.send(array).await;
        }
    }

    async fn message(&self, msg: Message<'_>, raw: Bytes, batch: Option<u64>) {
        match &msg.kind {
            Kind::Request { id, method } if method == "tools/call" => {
                self.tools_call(id, msg.params, raw, batch).await
            }
            Kind::Notification { method } if method == "tools/call" => {
                tracing::warn!("dropped a tools/call sent as a notification (no id)");
                self.shared.audit_dropped(msg.params);
            }
            Kind::Request { id, method } => {
                self.shared.pending().insert(
                    id.clone(),
                    Pending {
                        lists_tools: method == "tools/list",
                        batch,
                    },
                );
                self.forward(raw).await;
            }
            Kind::Notification { method } if method == "notifications/cancelled" => {
                let id = cancelled_id(msg.params);
                // A held call the server never saw: end the wait here, answer nothing.
                if let Some(cancel) = id.as_ref().and_then(|id| self.shared.held().remove(id)) {
                    let _ = cancel.send(());
                    return;
                }
                // The host no longer wants an answer: do not invent one if the server dies.
                if let Some(id) = id {
                    self.shared.pending().remove(&id);
                }
                self.forward(raw).await
            }
            Kind::Response { id, .. } => {
                let server_id = self.shared.outbound().by_host_id.remove(id);
                match server_id.and_then(|server_id| with_id(&raw, &server_id)) {
                    Some(raw) => self.forward(raw).await,
                    None => tracing::warn!(%id, "dropped a host response to no request in flight"),
                }
            }
            Kind::Notification { .. } => self.forward(raw).await,
        }
    }

    async fn forward(&self, raw: Bytes) {
        let _ = self.to_upstream.send(raw).await;
    }

    /// Guards one `tools/call`: what is forwarded is the very line that was evaluated.
    async fn tools_call(&self, id: &Id, params: Option<&RawValue>, raw: Bytes, batch: Option<u64>) {
        let started = Instant::now();
        let call = match ToolCall::read(params) {
            Ok(call) => call,
            Err(r) => {
                let r = Rejection {
                    id: Some(id.clone()),
                    ..r
                };
                return self.refuse(&r, batch).await;
            }
        };
        let shared = self.shared;
        if shared.mode == Mode::Off {
            return self.forward_call(id, raw, batch).await;
        }
        let eval = shared.guard.evaluate(&call.name, &call.arguments);
        let digest = guard::arguments_digest(&call.arguments);
        let action = guard::action(shared.mode, eval.decision);
        let rule = eval.rule().unwrap_or("-");
        match action {
            Action::Forward { outcome } => {
                shared.audit_call(id, &eval, outcome, None, &digest, started);
                match outcome {
                    "would_block" => {
                        tracing::warn!(tool = %call.name, rule, "would block in enforce mode: {}", eval.reason())
                    }
                    "would_require_approval" => {
                        tracing::warn!(tool = %call.name, rule, "would require approval in enforce mode: {}", eval.reason())
                    }
                    _ if eval.decision == guard::Decision::Warn => {
                        tracing::warn!(tool = %call.name, rule, "warn: {}", eval.reason())
                    }
                    _ => tracing::debug!(tool = %call.name, "allowed"),
                }
                self.forward_call(id, raw, batch).await
            }
            Action::Block => {
                shared.audit_call(id, &eval, "blocked", None, &digest, started);
                tracing::warn!(tool = %call.name, rule, "blocked: {}", eval.reason());
                let msg = shared.blocked(id, &call, &eval);
                shared.reply(batch, msg).await
            }
            Action::AskApproval => {
                let held = HeldCall {
                    id: id.clone(),
                    call,
                    eval,
                    digest,
                    raw,
                    batch,
                    started,
                };
                self.hold(held).await
            }
        }
    }

    /// Holds a call for a human on the local queue; the wait runs in a task of its own, so
    /// everything else keeps flowing. Without a channel to ask on, the call is denied at once.
    async fn hold(&self, held: HeldCall) {
        let shared = self.shared;
        let Some(queue) = &shared.queue else {
            let reason = format!("{}; no approval channel is available", held.eval.reason());
            return shared.deny(&held, Status::Rejected, None, &reason).await;
        };
        if shared.held().len() >= shared.max_pending_calls {
            tracing::warn!(
                limit = shared.max_pending_calls,
                "maxPendingCalls reached: refused"
            );
            shared.audit_call(
                &held.id,
                &held.eval,
                "too_many_pending",
                None,
                &held.digest,
                held.started,
            );
            let data = json!({
                "kind": "too_many_pending_calls",
                "reason": format!("{} calls are already waiting (maxPendingCalls)", shared.max_pending_calls),
                "tool": held.call.name,
            });
            let msg = shared.refusal(
                &held.id,
                &held.call,
                shared.codes.guard_unavailable,
                "Too many calls waiting for approval",
                data,
            );
            return shared.reply(held.batch, msg).await;
        }
        let now = approval::now_ms();
        let request = approval::Request {
            id: approval::new_id(),
            tool: held.call.name.clone(),
            server: shared.server.clone(),
            agent_key: shared.agent_key.clone(),
            arguments_sha256: held.digest.clone(),
            rule: held.eval.rule().map(str::to_string),
            reason: held.eval.reason(),
            created_ms: now,
            expires_ms: now + shared.approval_timeout.as_millis() as u64,
            pid: std::process::id(),
        };
        if let Err(e) = queue.submit(&request) {
            tracing::error!(error = %e, "cannot queue the approval request");
            let reason = format!(
                "{}; the local approval queue failed: {e}",
                held.eval.reason()
            );
            return shared.deny(&held, Status::Rejected, None, &reason).await;
        }
        tracing::warn!(
            tool = %held.call.name,
            rule = held.eval.rule().unwrap_or("-"),
            approval = %request.id,
            "call held for approval ({}): run `apie-mcp approvals approve {}` or `apie-mcp approvals reject {}`",
            request.reason, request.id, request.id
        );
        let (cancel, cancelled) = oneshot::channel::<()>();
        shared.held().insert(held.id.clone(), cancel);
        let task = tokio::spawn(wait_for_approval(
            self.shared_arc.clone(),
            self.to_upstream.clone(),
            queue.clone(),
            request,
            held,
            cancelled,
        ));
        let mut tasks = shared.held_tasks();
        tasks.retain(|t| !t.is_finished());
        tasks.push(task);
    }

    async fn forward_call(&self, id: &Id, raw: Bytes, batch: Option<u64>) {
        self.shared.pending().insert(
            id.clone(),
            Pending {
                lists_tools: false,
                batch,
            },
        );
        self.forward(raw).await
    }
}

/// The `requestId` of a `notifications/cancelled`.
fn cancelled_id(params: Option<&RawValue>) -> Option<Id> {
    #[derive(Deserialize)]
    struct Cancelled<'a> {
        #[serde(rename = "requestId", borrow)]
        request_id: &'a RawValue,
    }
    let params: Cancelled<'_> = serde_json::from_str(params?.get()).ok()?;
    Id::from_raw(params.request_id)
}

/// The parts of a `tools/call` the guard reads, parsed strictly (see [`jsonrpc::strict`]).
struct ToolCall {
    name: String,
    arguments: Value,
    /// The call came from a 2026-07-28 client (its `_meta` carries the protocol version).
    modern: bool,
}

impl ToolCall {
    fn read(params: Option<&RawValue>) -> Result<ToolCall, Rejection> {
        let invalid_params = |message: String| Rejection {
            code: code::INVALID_PARAMS,
            message: message.into(),
            id: None,
        };
        let Some(params) = params else {
            return Err(invalid_params(
                "Invalid params: tools/call needs params".into(),
            ));
        };
        let mut value = jsonrpc::strict::parse(params.get()).map_err(|e| {
            Rejection::invalid(
                None,
                format!("Invalid Request: tools/call params refused: {e}"),
            )
        })?;
        let Some(object) = value.as_object_mut() else {
            return Err(invalid_params(
                "Invalid params: params must be an object".into(),
            ));
        };
        for key in object.keys() {
            for member in ["name", "arguments", "_meta"] {
                if key != member && jsonrpc::strict::eq_ignore_case(key, member) {
                    return Err(Rejection::invalid(
                        None,
                        format!(
                            "Invalid Request: params member {key:?} must be spelled {member:?}"
                        ),
                    ));
                }
            }
        }
        let name = match object.get("name") {
            Some(Value::String(name)) => name.clone(),
            _ => {
                return Err(invalid_params(
                    "Invalid params: name must be a string".into(),
                ));
            }
        };
        let arguments = match object.remove("arguments") {
            None => Value::Object(Default::default()),
            Some(args @ Value::Object(_)) => args,
            Some(_) => {
                return Err(invalid_params(
                    "Invalid params: arguments must be an object".into(),
                ));
            }
        };
        let modern = object
            .get("_meta")
            .and_then(|m| m.get("io.modelcontextprotocol/protocolVersion"))
            .is_some();
        Ok(ToolCall {
            name,
            arguments,
            modern,
        })
    }
}

// === answers and audit ===

impl Shared {
    fn audit_call(
        &self,
        id: &Id,
        eval: &Evaluation,
        outcome: &str,
        status: Option<&str>,
        digest: &str,
        started: Instant,
    ) {
        self.audit_call_with(id, eval, outcome, None, status, digest, started)
    }

    #[allow(clippy::too_many_arguments)]
    fn audit_call_with(
        &self,
        id: &Id,
        eval: &Evaluation,
        outcome: &str,
        approval_id: Option<&str>,
        status: Option<&str>,
        digest: &str,
        started: Instant,
    ) {
        if !self.audit.enabled() {
            return;
        }
        let reason = eval.reason();
        self.audit.write(&Record {
            request_id: Some(id.to_value()),
            tool: &eval.meta.name,
            risk_level: Some(eval.meta.risk.as_str()),
            decision: Some(eval.decision.as_str()),
            rule: eval.rule(),
            reason: Some(&reason),
            approval_id,
            status,
            latency_ms: started.elapsed().as_secs_f64() * 1000.0,
            arguments_sha256: Some(digest),
            ..self.record(outcome)
        });
    }

    fn audit_dropped(&self, params: Option<&RawValue>) {
        if self.mode == Mode::Off || !self.audit.enabled() {
            return;
        }
        let call = ToolCall::read(params).ok();
        let digest = call.as_ref().map(|c| guard::arguments_digest(&c.arguments));
        self.audit.write(&Record {
            tool: call.as_ref().map(|c| c.name.as_str()).unwrap_or(""),
            reason: Some("tools/call sent as a notification (no id)"),
            arguments_sha256: digest.as_deref(),
            ..self.record("dropped")
        });
    }

    /// An audit record of this session with nothing but the `outcome` filled in.
    fn record<'a>(&'a self, outcome: &'a str) -> Record<'a> {
        Record {
            ts: audit::now(),
            run_id: &self.run_id,
            agent_key: &self.agent_key,
            server: &self.server,
            mode: self.mode.as_str(),
            request_id: None,
            tool: "",
            risk_level: None,
            decision: None,
            outcome,
            rule: None,
            guardrail: None,
            reason: None,
            approval_id: None,
            status: None,
            latency_ms: 0.0,
            arguments_sha256: None,
        }
    }

    /// The answer to a blocked call (SPEC §7).
    fn blocked(&self, id: &Id, call: &ToolCall, eval: &Evaluation) -> Bytes {
        let data = json!({
            "kind": "guard_blocked",
            "reason": eval.reason(),
            "decision_id": null,
            "policy_decision": eval.decision.as_str(),
            "effective_decision": "block",
            "enforcement_action": "block",
            "mode": self.mode.as_str(),
            "matched_guardrail": null,
            "rule": eval.rule(),
            "tool": call.name,
        });
        self.refusal(
            id,
            call,
            self.codes.blocked,
            "Action blocked by Apie guardrail",
            data,
        )
    }

    /// Refuses a call that needed an approval it did not get (-32002), and audits it.
    async fn deny(&self, held: &HeldCall, status: Status, approval_id: Option<&str>, reason: &str) {
        self.audit_call_with(
            &held.id,
            &held.eval,
            "denied",
            approval_id,
            Some(status.as_str()),
            &held.digest,
            held.started,
        );
        let kind = if status == Status::Timeout {
            "approval_timeout"
        } else {
            "approval_denied"
        };
        let data = json!({
            "kind": kind,
            "approval_id": approval_id,
            "status": status.as_str(),
            "reason": reason,
            "rule": held.eval.rule(),
            "tool": held.call.name,
        });
        let message = format!("Action not approved: {}", status.as_str());
        let msg = self.refusal(&held.id, &held.call, self.codes.approval, &message, data);
        self.reply(held.batch, msg).await
    }

    /// A refusal as the configured `blockResponse`: a JSON-RPC error, or a tool result with
    /// `isError: true` whose text is the same `{code, message, data}`.
    fn refusal(&self, id: &Id, call: &ToolCall, code: i64, message: &str, data: Value) -> Bytes {
        match self.block_response {
            BlockResponse::Error => jsonrpc::error_response(Some(id), code, message, Some(&data)),
            BlockResponse::ToolResult => {
                let text = json!({"code": code, "message": message, "data": data}).to_string();
                let mut result = json!({
                    "content": [{"type": "text", "text": text}],
                    "isError": true,
                });
                if call.modern {
                    result["resultType"] = json!("complete");
                }
                jsonrpc::result_response(id, &result)
            }
        }
        .into()
    }
}

// === upstream → host ===

async fn upstream_loop<R: tokio::io::AsyncRead + Unpin>(
    shared: Arc<Shared>,
    mut reader: LineReader<R>,
) {
    loop {
        match reader.next().await {
            Ok(Some(Frame::Line(line))) => upstream_line(&shared, line).await,
            Ok(Some(Frame::TooLong { head })) => {
                let id = framing::sniff_id(&head);
                tracing::error!(?id, "upstream message over maxMessageBytes dropped");
                let pending = id.as_ref().and_then(|id| shared.pending().remove(id));
                if let (Some(id), Some(p)) = (id, pending) {
                    let msg = jsonrpc::error_response(
                        Some(&id),
                        code::INTERNAL_ERROR,
                        "Upstream response longer than maxMessageBytes",
                        Some(&json!({"kind": "upstream_message_too_long"})),
                    );
                    shared.reply(p.batch, msg.into()).await;
                }
            }
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(error = %e, "reading the upstream's stdout failed");
                break;
            }
        }
    }
    tracing::debug!("upstream closed its stdout");
}

async fn upstream_line(shared: &Shared, line: Bytes) {
    match jsonrpc::classify(&line) {
        Parsed::Message(msg) => {
            let raw = line.clone();
            upstream_message(shared, msg, raw).await
        }
        Parsed::Rejected(r) => {
            tracing::warn!(
                line = %String::from_utf8_lossy(&line[..line.len().min(200)]),
                "dropped upstream output that is not JSON-RPC: {}", r.message
            );
        }
        // A batch from the server: its elements go to the host one by one.
        Parsed::Batch(items) => {
            for item in items {
                match jsonrpc::classify_element(item) {
                    Ok(msg) => {
                        let raw = Bytes::copy_from_slice(item.get().as_bytes());
                        upstream_message(shared, msg, raw).await
                    }
                    Err(r) => tracing::warn!("dropped an upstream batch element: {}", r.message),
                }
            }
        }
    }
}

async fn upstream_message(shared: &Shared, msg: Message<'_>, raw: Bytes) {
    match &msg.kind {
        Kind::Response { id, body } => {
            let pending = shared.pending().remove(id);
            let Some(p) = pending else {
                return shared.reply(None, raw).await;
            };
            let raw = match body {
                Reply::Result(result) if p.lists_tools => {
                    tools_listed(shared, id, result).unwrap_or(raw)
                }
                _ => raw,
            };
            shared.reply(p.batch, raw).await
        }
        Kind::Notification { method } if method == "notifications/cancelled" => {
            // The server gave up on one of its requests: name it as the host knows it.
            let remapped = cancelled_id(msg.params).and_then(|server_id| {
                let mut outbound = shared.outbound();
                let host_id = outbound.host_id_of(&server_id)?;
                outbound.by_host_id.remove(&host_id);
                let params =
                    jsonrpc::replace_member(msg.params?.get(), "requestId", &host_id.to_json())?;
                let text = std::str::from_utf8(&raw).ok()?;
                jsonrpc::replace_member(text, "params", &params).map(Bytes::from)
            });
            shared.reply(None, remapped.unwrap_or(raw)).await
        }
        Kind::Notification { method } => {
            if method == "notifications/tools/list_changed" {
                shared.guard.forget();
            }
            shared.reply(None, raw).await
        }
        Kind::Request { id, .. } => {
            let host_id = shared.outbound().remap(id);
            match with_id(&raw, &host_id) {
                Some(raw) => shared.reply(None, raw).await,
                None => {
                    shared.outbound().by_host_id.remove(&host_id);
                    tracing::warn!(%id, "dropped an upstream request whose id could not be remapped");
                }
            }
        }
    }
}

/// Reads a `tools/list` result: learns the annotations, and with `hideBlockedTools` returns the
/// rewritten response without the tools every call of which would be blocked.
fn tools_listed(shared: &Shared, id: &Id, result: &RawValue) -> Option<Bytes> {
    #[derive(Deserialize)]
    struct Listing {
        tools: Vec<ListedTool>,
    }
    let listing: Listing = serde_json::from_str(result.get()).ok()?;
    shared.guard.learn(&listing.tools);
    if !shared.guard.hide_blocked_tools() {
        return None;
    }
    let hidden: Vec<&str> = listing
        .tools
        .iter()
        .filter(|t| shared.guard.hides(&t.name))
        .map(|t| t.name.as_str())
        .collect();
    if hidden.is_empty() {
        return None;
    }
    tracing::info!(?hidden, "hid tools that every call of would be blocked");
    let mut result: Value = serde_json::from_str(result.get()).ok()?;
    let tools = result.get_mut("tools")?.as_array_mut()?;
    tools.retain(|t| {
        t.get("name")
            .and_then(Value::as_str)
            .is_none_or(|name| !hidden.contains(&name))
    });
    Some(jsonrpc::result_response(id, &result).into())
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
