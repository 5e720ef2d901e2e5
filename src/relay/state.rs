//! What both directions of the session share: requests in flight, batches being gathered,
//! the server-to-host id map, held calls, what the host can do; and how the proxy answers,
//! audits and reports on its own.

use std::borrow::Cow;

use super::from_host::ToolCall;
use super::held::HeldCall;
use super::*;

// === shared state ===

/// A host request sent upstream and not yet answered.
pub(super) struct Pending {
    /// What the answer is read for on the way back.
    pub(super) expect: Expect,
    /// The batch the request came in, if any.
    pub(super) batch: Option<u64>,
}

pub(super) enum Expect {
    /// Nothing: the answer goes to the host as it is.
    Plain,
    /// `tools/list`: annotations are learned (and blocked tools maybe hidden).
    ToolsList,
    /// `initialize`: the negotiated protocol version.
    Initialize,
    /// A guarded `tools/call`, with what its answer needs, when it needs anything.
    ToolsCall(Option<Box<CallTrack>>),
}

/// What the answer to a forwarded `tools/call` is read for.
#[derive(Default)]
pub(super) struct CallTrack {
    /// For the service's events.
    pub(super) tool: String,
    /// A 2026-07-28 call a human approved: if the upstream asks for more input, its
    /// `requestState` is sealed with the approval, so the retry is not asked about again.
    pub(super) grant: Option<(String, String)>,
    /// The progress token whose later notifications are shifted past the proxy's own.
    pub(super) progress: Option<String>,
}

/// Who sent a request the host is answering.
pub(super) enum Origin {
    /// The server, under its own id.
    Upstream(Id),
    /// The proxy itself (an approval prompt), waiting on the channel.
    Proxy(oneshot::Sender<HostReply>),
}

/// The host's answer to a request of the proxy's own.
#[derive(Debug)]
pub(super) enum HostReply {
    Result(Value),
    Error(Value),
}

/// Server→host requests in flight, and the proxy's own: the host sees `"apie:<n>"` for both,
/// from one counter, so the two can never collide.
#[derive(Default)]
pub(super) struct Outbound {
    pub(super) last: u64,
    /// Host-side id → who asked.
    pub(super) by_host_id: HashMap<Id, Origin>,
}

impl Outbound {
    /// A fresh host-side id for a request from `origin`.
    pub(super) fn issue(&mut self, origin: Origin) -> Id {
        self.last += 1;
        let id = Id::String(format!("apie:{}", self.last).into());
        self.by_host_id.insert(id.clone(), origin);
        id
    }

    pub(super) fn remap(&mut self, server_id: &Id) -> Id {
        self.issue(Origin::Upstream(server_id.clone()))
    }

    /// The host-side id of a server request still in flight.
    pub(super) fn host_id_of(&self, server_id: &Id) -> Option<Id> {
        self.by_host_id
            .iter()
            .find(|(_, origin)| matches!(origin, Origin::Upstream(s) if s == server_id))
            .map(|(h, _)| h.clone())
    }
}

/// What the host said about itself in `initialize` (legacy sessions).
#[derive(Default, Debug)]
pub(super) struct HostInfo {
    /// It declared form elicitation (`elicitation: {}` or `{form: …}`).
    pub(super) elicitation: bool,
    /// The version the server answered `initialize` with.
    pub(super) protocol: Option<String>,
    /// `notifications/initialized` was seen: requests to the host are allowed from here on.
    pub(super) initialized: bool,
}

impl HostInfo {
    /// The proxy may send `elicitation/create` (MCP-NOTES §5.1).
    pub(super) fn can_elicit(&self) -> bool {
        self.elicitation
            && self.initialized
            && self.protocol.as_deref().is_some_and(|v| v >= "2025-06-18")
    }
}

/// `raw` with its top-level `id` replaced.
pub(super) fn with_id(raw: &[u8], id: &Id) -> Option<Bytes> {
    let text = std::str::from_utf8(raw).ok()?;
    jsonrpc::replace_member(text, "id", &id.to_json()).map(Bytes::from)
}

/// Responses being gathered for a batch the host sent.
pub(super) struct Batch {
    /// How many responses the batch gets; unknown until every element was handled.
    pub(super) expected: Option<usize>,
    pub(super) responses: Vec<Bytes>,
    /// Requests the host cancelled: they will get no response.
    pub(super) cancelled: usize,
}

/// What both readers need.
pub(super) struct Shared {
    pub(super) guard: Guard,
    pub(super) mode: Mode,
    pub(super) audit: Arc<Audit>,
    pub(super) codes: ErrorCodes,
    pub(super) block_response: BlockResponse,
    pub(super) run_id: String,
    pub(super) agent_key: String,
    pub(super) server: String,
    /// Who writes this session's audit records.
    pub(super) session: audit::Session,
    /// Host requests in flight upstream, by id.
    pub(super) pending: Mutex<HashMap<Id, Pending>>,
    pub(super) batches: Mutex<(u64, HashMap<u64, Batch>)>,
    /// Server→host requests in flight, by the id the host saw (SPEC §7: remapped, so requests
    /// the proxy itself sends the host can never collide with the server's).
    pub(super) outbound: Mutex<Outbound>,
    /// The guard service, when an API key is set (and the mode is not off).
    pub(super) remote: Option<remote::Service>,
    pub(super) failure_mode: FailureMode,
    pub(super) redactor: Redactor,
    /// Approval channels in order of preference.
    pub(super) channels: Vec<ApprovalChannel>,
    /// The local approval queue, when `approvals.channels` lists `local`.
    pub(super) queue: Option<approval::Queue>,
    pub(super) approval_timeout: Duration,
    pub(super) approval_poll: Duration,
    pub(super) sealer: approval::state::Sealer,
    pub(super) max_pending_calls: usize,
    /// Calls waiting on the service or a human, by the host's id: cancelling ends the wait.
    pub(super) held: Mutex<HashMap<Id, CancellationToken>>,
    pub(super) host: Mutex<HostInfo>,
    /// Progress tokens of approved calls → how far the proxy's own progress went.
    pub(super) progress: Mutex<HashMap<String, f64>>,
    /// The tasks waiting on held calls, so shutdown can let them clean up.
    pub(super) held_tasks: Mutex<Vec<JoinHandle<()>>>,
    /// Our stdout.
    pub(super) to_host: Arc<Outlet>,
    /// The server's stdin.
    pub(super) to_upstream: Arc<Outlet>,
    /// The runtime that held calls wait on (the readers are threads of their own).
    pub(super) runtime: tokio::runtime::Handle,
    /// The session is ending: the host reader forwards nothing more.
    pub(super) closing: AtomicBool,
}

impl Shared {
    /// Must be called on the runtime.
    pub(super) fn new(
        config: Config,
        audit: Arc<Audit>,
        to_host: Arc<Outlet>,
        to_upstream: Arc<Outlet>,
    ) -> Shared {
        let queue = if config.mode == Mode::Enforce
            && config.approval_channels.contains(&ApprovalChannel::Local)
        {
            approval::Queue::open_default()
                .inspect_err(|e| tracing::warn!("local approvals unavailable: {e}"))
                .ok()
        } else {
            None
        };
        let remote = match (&config.guard.api_key, config.mode) {
            (Some(key), Mode::Enforce | Mode::Monitor) => {
                let identity = remote::Identity {
                    agent_key: config.agent_key.clone(),
                    agent_name: config.agent_name.clone(),
                    server: config.server_name.clone(),
                    run_id: config.run_id.clone(),
                    environment: config.environment.clone(),
                    mode: config.mode.as_str(),
                };
                remote::Service::new(&config.guard, key, identity)
                    .inspect_err(|e| tracing::error!("guard service unavailable: {e}"))
                    .ok()
            }
            _ => None,
        };
        Shared {
            remote,
            failure_mode: config.guard_failure_mode,
            redactor: Redactor::new(&config.redact_keys),
            channels: config.approval_channels.clone(),
            queue,
            approval_timeout: config.approval_timeout,
            approval_poll: config.approval_poll_interval,
            sealer: approval::state::Sealer::new(),
            max_pending_calls: config.max_pending_calls,
            held: Mutex::new(HashMap::new()),
            host: Mutex::new(HostInfo::default()),
            progress: Mutex::new(HashMap::new()),
            held_tasks: Mutex::new(Vec::new()),
            mode: config.mode,
            audit,
            codes: config.error_codes,
            block_response: config.block_response,
            run_id: config.run_id.clone(),
            agent_key: config.agent_key.clone(),
            server: config.server_name.clone(),
            session: audit::Session::new(
                &config.run_id,
                &config.agent_key,
                &config.server_name,
                config.mode.as_str(),
            ),
            guard: Guard::new(config),
            pending: Mutex::new(HashMap::new()),
            batches: Mutex::new((0, HashMap::new())),
            outbound: Mutex::new(Outbound::default()),
            to_host,
            to_upstream,
            runtime: tokio::runtime::Handle::current(),
            closing: AtomicBool::new(false),
        }
    }

    pub(super) fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<Id, Pending>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn batches(&self) -> std::sync::MutexGuard<'_, (u64, HashMap<u64, Batch>)> {
        self.batches.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn held(&self) -> std::sync::MutexGuard<'_, HashMap<Id, CancellationToken>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn host(&self) -> std::sync::MutexGuard<'_, HostInfo> {
        self.host.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn progress(&self) -> std::sync::MutexGuard<'_, HashMap<String, f64>> {
        self.progress.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues an event for the service about `tool`, when there is a service and it takes
    /// events; `what` is only built then.
    pub(super) fn event(&self, tool: Option<&str>, what: impl FnOnce() -> What) {
        if let Some(remote) = self.remote.as_ref().filter(|r| r.takes_events()) {
            remote.event(tool, what());
        }
    }

    pub(super) fn held_tasks(&self) -> std::sync::MutexGuard<'_, Vec<JoinHandle<()>>> {
        self.held_tasks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ends every wait for a human (the session is over): each cleans up its queue entry and
    /// drops its way to the upstream.
    pub(super) async fn cancel_held(&self) {
        for (_, cancel) in self.held().drain() {
            cancel.cancel();
        }
        let tasks: Vec<_> = self.held_tasks().drain(..).collect();
        for mut task in tasks {
            if tokio::time::timeout(upstream::GRACE, &mut task)
                .await
                .is_err()
            {
                task.abort();
                let _ = task.await;
            }
        }
    }

    pub(super) fn outbound(&self) -> std::sync::MutexGuard<'_, Outbound> {
        self.outbound.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a message for the host, or adds it to its batch (see [`Outlet`]: the reader
    /// threads write what they queued before they wait for input, tasks call [`Shared::flush`]).
    pub(super) fn reply(&self, batch: Option<u64>, msg: Bytes) {
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
                    self.to_host.push(array);
                }
            }
            None => self.to_host.push(msg),
        }
    }

    /// Writes what a task queued for the host and the server, without blocking the runtime,
    /// and what it audited.
    pub(super) async fn flush(&self) {
        self.to_upstream.flush_async().await;
        self.to_host.flush_async().await;
        self.audit.flush();
    }

    /// One request of batch `batch` was cancelled by the host and gets no response: the rest of
    /// the batch must not wait for it.
    pub(super) fn cancelled_in_batch(&self, batch: Option<u64>) {
        let Some(b) = batch else { return };
        let done = {
            let mut batches = self.batches();
            if let Some(acc) = batches.1.get_mut(&b) {
                acc.cancelled += 1;
            }
            take_if_complete(&mut batches.1, b)
        };
        if let Some(array) = done {
            self.to_host.push(array);
        }
    }

    /// Answers every request still pending: the server will not.
    pub(super) fn fail_pending(&self) {
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
                self.to_host.push(msg);
            }
        }
    }
}

/// Removes batch `b` and returns its response array once every response is in.
pub(super) fn take_if_complete(batches: &mut HashMap<u64, Batch>, b: u64) -> Option<Bytes> {
    let acc = batches.get(&b)?;
    if acc.expected != Some(acc.responses.len() + acc.cancelled) {
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

// === answers and audit ===

impl Shared {
    /// Audits what became of a call.
    pub(super) fn audit_call(&self, held: &HeldCall<'_>, outcome: &str) {
        self.audit_call_with(held, outcome, None, None, None)
    }

    /// Audits what became of a call, with the approval it waited on and, where the
    /// evaluation's own reason is not the whole story, another reason.
    pub(super) fn audit_call_with(
        &self,
        held: &HeldCall<'_>,
        outcome: &str,
        approval_id: Option<&str>,
        status: Option<&str>,
        reason: Option<&str>,
    ) {
        if !self.audit.enabled() {
            return;
        }
        let eval = &held.eval;
        let reason = reason.map_or_else(|| eval.reason(), Cow::Borrowed);
        self.audit.write(&Record {
            request_id: Some(&held.id),
            tool: &eval.meta.name,
            risk_level: Some(eval.meta.risk.as_str()),
            decision: Some(eval.decision.as_str()),
            rule: eval.rule(),
            guardrail: eval.guardrail(),
            reason: Some(&reason),
            approval_id,
            status,
            latency_ms: held.started.elapsed().as_secs_f64() * 1000.0,
            arguments_sha256: Some(&held.digest),
            ..self.record(outcome)
        });
    }

    pub(super) fn audit_dropped(&self, params: Option<Params<'_>>) {
        if self.mode == Mode::Off || !self.audit.enabled() {
            return;
        }
        let call = ToolCall::read(params).ok();
        let digest = call.as_ref().map(|c| guard::arguments_digest(&c.arguments));
        self.audit.write(&Record {
            tool: call.as_ref().map_or("", |c| &c.name),
            reason: Some("tools/call sent as a notification (no id)"),
            arguments_sha256: digest.as_deref(),
            ..self.record("dropped")
        });
    }

    /// An audit record of this session with nothing but the `outcome` filled in.
    pub(super) fn record<'a>(&'a self, outcome: &'a str) -> Record<'a> {
        Record::new(&self.session, outcome)
    }

    /// The answer to a blocked call (SPEC §7).
    pub(super) fn blocked(&self, held: &HeldCall<'_>) -> Bytes {
        let eval = &held.eval;
        let service = eval.service.as_deref();
        let data = json!({
            "kind": "guard_blocked",
            "reason": eval.reason(),
            "decision_id": service.and_then(|s| s.decision_id.as_deref()),
            "policy_decision": eval.decision.as_str(),
            "effective_decision": eval.enforced.as_str(),
            "enforcement_action": service.map_or("block", |s| s.enforcement_action.as_str()),
            "mode": service.and_then(|s| s.mode.as_deref()).unwrap_or(self.mode.as_str()),
            "matched_guardrail": eval.guardrail(),
            "rule": eval.rule(),
            "tool": held.call.name,
        });
        self.refusal(
            &held.id,
            &held.call,
            self.codes.blocked,
            "Action blocked by Apie guardrail",
            data,
        )
    }

    /// Refuses a call that needed an approval it did not get (-32002), and audits it.
    pub(super) fn deny(
        &self,
        held: &HeldCall<'_>,
        status: Status,
        approval_id: Option<&str>,
        reason: &str,
    ) {
        self.audit_call_with(
            held,
            "denied",
            approval_id,
            Some(status.as_str()),
            Some(reason),
        );
        self.event(Some(&held.call.name), || What::Denied {
            status: status.as_str(),
            reason: reason.to_owned(),
        });
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
        self.reply(held.batch, msg)
    }

    /// A refusal as the configured `blockResponse`: a JSON-RPC error, or a tool result with
    /// `isError: true` whose text is the same `{code, message, data}`.
    pub(super) fn refusal(
        &self,
        id: &Id,
        call: &ToolCall<'_>,
        code: i64,
        message: &str,
        data: Value,
    ) -> Bytes {
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
