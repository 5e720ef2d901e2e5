//! Calls that wait: for the guard service's verdict, then perhaps for a human (SPEC §5, §6).
//!
//! Each waiting call runs [`wait`] in a task of its own on the runtime, registered in the shared `held` map
//! under the host's id, so a host `notifications/cancelled` (or the end of the session) ends it
//! through its [`CancellationToken`]; every other message keeps flowing meanwhile. Whatever ends
//! the wait, the call leaves the map before it is answered or forwarded.
//!
//! The approval channels are tried in `approvals.channels` order, each skipped when it cannot
//! be used for this call: `guard` (the service's approval id), `elicitation` (a prompt in the
//! host: `elicitation/create` in legacy sessions, an `input_required` result in 2026-07-28
//! ones, whose retry comes back through [`resume`]), `local` (the queue files).

use std::time::Instant as StdInstant;

use super::from_host::ToolCall;
use super::state::{CallTrack, Expect, HostReply, Origin, Pending};
use super::*;
use crate::approval::prompt::{self, Question};
use crate::approval::state::{Grant, Refused};

/// How often a held call with a progress token tells the host it is still alive.
pub(super) const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// A guarded call, with everything needed to forward or refuse it later.
pub(super) struct HeldCall<'a> {
    pub(super) id: Id,
    pub(super) call: ToolCall<'a>,
    pub(super) eval: guard::Evaluation,
    pub(super) digest: String,
    /// The line as the host sent it: what is forwarded.
    pub(super) raw: Bytes,
    pub(super) batch: Option<u64>,
    pub(super) started: Instant,
}

/// How an approval ended.
enum Ending {
    Approved {
        approval_id: String,
    },
    Refused {
        status: Status,
        approval_id: Option<String>,
        reason: String,
    },
    Cancelled {
        approval_id: Option<String>,
    },
    /// The call was answered with an `input_required` result; its retry decides.
    Asked,
}

// === settled on the spot ===

/// Forwards or refuses a call the mode table has decided (nothing to wait for).
pub(super) fn conclude(shared: &Shared, held: HeldCall<'_>, action: Action) {
    let rule = held.eval.rule().unwrap_or("-");
    let tool = &held.call.name;
    match action {
        Action::Forward { outcome } => {
            shared.audit_call(&held, outcome);
            match outcome {
                "would_block" => {
                    tracing::warn!(%tool, rule, "would block in enforce mode: {}", held.eval.reason())
                }
                "would_require_approval" => {
                    tracing::warn!(%tool, rule, "would require approval in enforce mode: {}", held.eval.reason())
                }
                _ if held.eval.decision == guard::Decision::Warn => {
                    tracing::warn!(%tool, rule, "warn: {}", held.eval.reason())
                }
                _ => tracing::debug!(%tool, "allowed"),
            }
            forward(shared, held, None)
        }
        Action::Block => {
            shared.audit_call(&held, "blocked");
            tracing::warn!(%tool, rule, "blocked: {}", held.eval.reason());
            refused_event(shared, &held, "blocked");
            let msg = shared.blocked(&held);
            shared.reply(held.batch, msg)
        }
        Action::AskApproval => unreachable!("approvals wait in a task"),
    }
}

/// Sends a call upstream. A 2026-07-28 call approved by a human keeps its approval for the
/// upstream's own `input_required` rounds; a call the proxy sent progress for has the
/// upstream's progress shifted past the proxy's.
fn forward(shared: &Shared, held: HeldCall<'_>, approved: Option<f64>) {
    let mut track = CallTrack::default();
    if let Some(progressed) = approved {
        if held.call.modern {
            track.grant = Some((held.call.name.to_string(), held.digest.clone()));
        }
        if let Some(token) = &held.call.progress_token
            && progressed > 0.0
        {
            let token = token.to_string();
            shared.progress().insert(token.clone(), progressed);
            track.progress = Some(token);
        }
    }
    if shared.remote.as_ref().is_some_and(|r| r.takes_events()) {
        track.tool = held.call.name.to_string();
    }
    let track = (!track.tool.is_empty() || track.grant.is_some() || track.progress.is_some())
        .then(|| Box::new(track));
    shared.pending().insert(
        held.id,
        Pending {
            expect: Expect::ToolsCall(track),
            batch: held.batch,
        },
    );
    shared.to_upstream.push(held.raw);
}

fn refused_event(shared: &Shared, held: &HeldCall<'_>, outcome: &'static str) {
    shared.event(Some(&held.call.name), || What::Refused {
        outcome,
        reason: held.eval.reason().into_owned(),
    });
}

// === the wait ===

/// The task of one waiting call: asks the service when `ask_service`, then acts on the
/// decision, asking a human when it says so; and writes what that produced.
pub(super) async fn wait(
    shared: Arc<Shared>,
    held: HeldCall<'static>,
    ask_service: bool,
    cancel: CancellationToken,
) {
    decide(&shared, held, ask_service, &cancel).await;
    shared.flush().await;
}

async fn decide(
    shared: &Shared,
    mut held: HeldCall<'_>,
    ask_service: bool,
    cancel: &CancellationToken,
) {
    if ask_service && let Some(service) = &shared.remote {
        let body = evaluate_body(shared, &held);
        let verdict = tokio::select! {
            verdict = service.evaluate(&body) => verdict,
            _ = cancel.cancelled() => return cancelled(shared, &held, None),
        };
        match verdict {
            Ok(verdict) => {
                shared.event(Some(&held.call.name), || {
                    What::Evaluated(events::Decision {
                        policy: verdict.policy.as_str(),
                        effective: verdict.effective.as_str(),
                        enforcement_action: verdict.enforcement_action.clone(),
                        mode: shared.mode.as_str(),
                        reason: verdict.reason.clone(),
                    })
                });
                held.eval.take_verdict(verdict);
            }
            Err(failure) => {
                return guard_failed(shared, held, &failure);
            }
        }
    }
    match held.eval.action(shared.mode) {
        Action::AskApproval => approve(shared, held, cancel).await,
        action => {
            shared.held().remove(&held.id);
            conclude(shared, held, action)
        }
    }
}

/// The body of `POST /v1/guardrails/evaluate` (APIE-WIRE §1.6, plus `request_id`,
/// `arguments_hash` and `runtime`), borrowed from the call and serialised straight to the wire.
#[derive(serde::Serialize)]
struct EvaluateBody<'a> {
    agent_key: &'a str,
    run_id: &'a str,
    mode: &'static str,
    risk_level: &'static str,
    action: Named<'a>,
    resource: Resource<'a>,
    tool: Tool<'a>,
    metadata: Metadata<'a>,
    request_id: &'a Id,
    arguments_hash: &'a str,
    runtime: Runtime<'a>,
}

#[derive(serde::Serialize)]
struct Named<'a> {
    r#type: &'a str,
    name: &'a str,
}

#[derive(serde::Serialize)]
struct Resource<'a> {
    r#type: &'a str,
    provider: &'a str,
    environment: Option<&'a str>,
    external_id: Option<&'a str>,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct Tool<'a> {
    name: &'a str,
    provider: &'a str,
    risk_level: &'static str,
}

#[derive(serde::Serialize)]
struct Metadata<'a> {
    capture_source: &'static str,
    mcp: Mcp<'a>,
}

#[derive(serde::Serialize)]
struct Mcp<'a> {
    server: &'a str,
    tool: &'a str,
    arguments: crate::redact::Redacted<'a>,
}

#[derive(serde::Serialize)]
struct Runtime<'a> {
    framework: &'static str,
    language: &'static str,
    sdk_version: &'static str,
    environment: Option<&'a str>,
}

fn evaluate_body<'a>(shared: &'a Shared, held: &'a HeldCall<'_>) -> EvaluateBody<'a> {
    let meta = &*held.eval.meta;
    EvaluateBody {
        agent_key: &shared.agent_key,
        run_id: &shared.run_id,
        mode: shared.mode.as_str(),
        risk_level: meta.risk.as_str(),
        action: Named {
            r#type: &meta.action_type,
            name: &meta.action_name,
        },
        resource: Resource {
            r#type: &meta.resource_type,
            provider: &meta.resource_provider,
            environment: meta.resource_environment.as_deref(),
            external_id: meta.resource_external_id.as_deref(),
        },
        tool: Tool {
            name: &meta.qualified,
            provider: &meta.provider,
            risk_level: meta.risk.as_str(),
        },
        metadata: Metadata {
            capture_source: "mcp_proxy",
            mcp: Mcp {
                server: &shared.server,
                tool: &held.call.name,
                arguments: shared.redactor.view(&held.call.arguments),
            },
        },
        request_id: &held.id,
        arguments_hash: &held.digest,
        runtime: Runtime {
            framework: remote::FRAMEWORK,
            language: "rust",
            sdk_version: remote::VERSION,
            environment: shared
                .remote
                .as_ref()
                .and_then(|r| r.identity().environment.as_deref()),
        },
    }
}

/// The service could not decide: `guardFailureMode` does (monitor mode always forwards).
fn guard_failed(shared: &Shared, held: HeldCall<'_>, failure: &remote::Failure) {
    shared.held().remove(&held.id);
    let reason = failure.to_string();
    shared.audit_call_with(&held, failure.outcome(), None, None, Some(&reason));
    let refuse = match (shared.mode, shared.failure_mode) {
        (Mode::Enforce, FailureMode::FailClosed) => Some((
            shared.codes.blocked,
            "Action blocked: guard service unavailable",
        )),
        (Mode::Enforce, FailureMode::Throw) => {
            Some((shared.codes.guard_unavailable, "Guard service unavailable"))
        }
        _ => None,
    };
    let tool = &held.call.name;
    let Some((code, message)) = refuse else {
        tracing::warn!(%tool, failure = failure.class(), "guard service failed, call forwarded ({}): {reason}", shared.failure_mode.as_str());
        return forward(shared, held, None);
    };
    tracing::warn!(%tool, failure = failure.class(), "guard service failed, call refused ({}): {reason}", shared.failure_mode.as_str());
    let mut data = json!({
        "kind": "guard_unavailable",
        "failure": failure.class(),
        "reason": reason,
        "rule": held.eval.rule(),
        "tool": tool,
    });
    if let Some(status) = failure.http_status() {
        data["http_status"] = json!(status);
    }
    refused_event(shared, &held, failure.outcome());
    let msg = shared.refusal(&held.id, &held.call, code, message, data);
    shared.reply(held.batch, msg)
}

/// The host gave up on the call: no answer, nothing forwarded.
fn cancelled(shared: &Shared, held: &HeldCall<'_>, approval_id: Option<&str>) {
    shared.held().remove(&held.id);
    tracing::info!(tool = %held.call.name, "held call cancelled");
    shared.audit_call_with(held, "cancelled", approval_id, Some("cancelled"), None);
    shared.cancelled_in_batch(held.batch);
}

// === asking a human ===

async fn approve(shared: &Shared, held: HeldCall<'_>, cancel: &CancellationToken) {
    let deadline = StdInstant::now() + shared.approval_timeout;
    let mut progressed = 0.0;
    let ending = {
        let ask = ask(shared, &held, deadline, cancel);
        with_progress(shared, &held, &mut progressed, ask).await
    };
    let resolved =
        |approval_id: Option<&str>, status| resolved_event(shared, &held, approval_id, status);
    match ending {
        Ending::Approved { approval_id } => {
            shared.held().remove(&held.id);
            resolved(Some(&approval_id), Status::Approved);
            tracing::info!(tool = %held.call.name, approval = %approval_id, "approved");
            shared.audit_call_with(
                &held,
                "approved",
                Some(&approval_id),
                Some("approved"),
                None,
            );
            forward(shared, held, Some(progressed))
        }
        Ending::Refused {
            status,
            approval_id,
            reason,
        } => {
            shared.held().remove(&held.id);
            resolved(approval_id.as_deref(), status);
            tracing::warn!(tool = %held.call.name, approval = ?approval_id, status = status.as_str(), "not approved: {reason}");
            shared.deny(&held, status, approval_id.as_deref(), &reason)
        }
        Ending::Cancelled { approval_id } => {
            resolved(approval_id.as_deref(), Status::Cancelled);
            cancelled(shared, &held, approval_id.as_deref())
        }
        Ending::Asked => {}
    }
}

/// Runs `ask` while telling the host, on the call's progress token, that the call is alive:
/// once as soon as the wait begins and every [`PROGRESS_EVERY`] after.
async fn with_progress(
    shared: &Shared,
    held: &HeldCall<'_>,
    progressed: &mut f64,
    ask: impl Future<Output = Ending>,
) -> Ending {
    let Some(token) = &held.call.progress_token else {
        return ask.await;
    };
    tokio::pin!(ask);
    let mut ticks = tokio::time::interval(PROGRESS_EVERY);
    loop {
        tokio::select! {
            biased;
            ending = &mut ask => return ending,
            _ = ticks.tick() => {
                *progressed += 1.0;
                let note = json!({
                    "jsonrpc": "2.0",
                    "method": "notifications/progress",
                    "params": {
                        "progressToken": token,
                        "progress": *progressed,
                        "message": format!("{} Waiting for approval of {}", prompt::MARK, held.call.name),
                    },
                });
                shared.reply(None, Bytes::from(note.to_string()));
                shared.flush().await;
            }
        }
    }
}

/// Tries the channels in order; the first usable one decides.
async fn ask(
    shared: &Shared,
    held: &HeldCall<'_>,
    deadline: StdInstant,
    cancel: &CancellationToken,
) -> Ending {
    for channel in &shared.channels {
        match channel {
            ApprovalChannel::Guard => {
                let approval_id = held
                    .eval
                    .service
                    .as_ref()
                    .and_then(|v| v.approval_id.clone());
                if let (Some(service), Some(id)) = (&shared.remote, approval_id) {
                    return ask_service(shared, service, held, id, deadline, cancel).await;
                }
            }
            ApprovalChannel::Elicitation if held.call.modern => {
                if held.call.elicitation
                    && let Some(ending) = ask_in_result(shared, held)
                {
                    return ending;
                }
            }
            ApprovalChannel::Elicitation => {
                let can = shared.host().can_elicit();
                if can && let Some(ending) = ask_host(shared, held, deadline, cancel).await {
                    return ending;
                }
            }
            ApprovalChannel::Local => {
                if let Some(queue) = &shared.queue {
                    return ask_local(shared, queue, held, deadline, cancel).await;
                }
            }
        }
    }
    Ending::Refused {
        status: Status::Rejected,
        approval_id: None,
        reason: format!("{}; no approval channel is available", held.eval.reason()),
    }
}

fn requested_event(shared: &Shared, held: &HeldCall<'_>, approval_id: &str, channel: &'static str) {
    shared.event(Some(&held.call.name), || {
        let meta = &held.eval.meta;
        What::ApprovalRequested(Box::new(events::Request {
            approval_id: approval_id.to_owned(),
            channel,
            reason: held.eval.reason().into_owned(),
            action_type: meta.action_type.clone(),
            action_name: meta.action_name.clone(),
            resource_type: meta.resource_type.clone(),
            resource_provider: meta.resource_provider.clone(),
        }))
    });
}

fn resolved_event(shared: &Shared, held: &HeldCall<'_>, approval_id: Option<&str>, status: Status) {
    shared.event(Some(&held.call.name), || What::ApprovalResolved {
        approval_id: approval_id.map(str::to_owned),
        status: status.as_str(),
    });
}

/// How a channel's answer ends the wait; `reason` is the human's own, when they gave one.
fn not_approved(
    held: &HeldCall<'_>,
    status: Status,
    approval_id: Option<String>,
    reason: Option<String>,
) -> Ending {
    if status == Status::Approved {
        return Ending::Approved {
            approval_id: approval_id.unwrap_or_default(),
        };
    }
    let reason = reason.unwrap_or_else(|| match status {
        Status::Timeout => format!("{}; nobody answered in time", held.eval.reason()),
        _ => held.eval.reason().into_owned(),
    });
    Ending::Refused {
        status,
        approval_id,
        reason,
    }
}

/// `guard`: the service's approval, long-polled until the deadline; cancelled at the service
/// when the wait ends without an answer.
async fn ask_service(
    shared: &Shared,
    service: &remote::Service,
    held: &HeldCall<'_>,
    id: String,
    deadline: StdInstant,
    cancel: &CancellationToken,
) -> Ending {
    requested_event(shared, held, &id, "guard");
    tracing::warn!(tool = %held.call.name, approval = %id, "call held for approval on the guard service");
    let status = tokio::select! {
        status = service.wait_approval(&id, deadline, shared.approval_poll) => status,
        _ = cancel.cancelled() => {
            service.cancel_approval(&id).await;
            return Ending::Cancelled { approval_id: Some(id) };
        }
    };
    if status == Status::Timeout {
        service.cancel_approval(&id).await;
    }
    not_approved(held, status, Some(id), None)
}

/// `local`: the queue in the state directory, answered from any terminal.
async fn ask_local(
    shared: &Shared,
    queue: &approval::Queue,
    held: &HeldCall<'_>,
    deadline: StdInstant,
    cancel: &CancellationToken,
) -> Ending {
    let now = approval::now_ms();
    let left = deadline.saturating_duration_since(StdInstant::now());
    let request = approval::Request {
        id: approval::new_id(),
        tool: held.call.name.to_string(),
        server: shared.server.clone(),
        agent_key: shared.agent_key.clone(),
        arguments_sha256: held.digest.clone(),
        rule: held.eval.rule().map(str::to_string),
        reason: held.eval.reason().into_owned(),
        created_ms: now,
        expires_ms: now + left.as_millis() as u64,
        pid: std::process::id(),
    };
    if let Err(e) = queue.submit(&request) {
        tracing::error!(error = %e, "cannot queue the approval request");
        return Ending::Refused {
            status: Status::Rejected,
            approval_id: None,
            reason: format!(
                "{}; the local approval queue failed: {e}",
                held.eval.reason()
            ),
        };
    }
    requested_event(shared, held, &request.id, "local");
    tracing::warn!(
        tool = %held.call.name,
        rule = held.eval.rule().unwrap_or("-"),
        approval = %request.id,
        "call held for approval ({}): run `apie-mcp approvals approve {}` or `apie-mcp approvals reject {}`",
        request.reason, request.id, request.id
    );
    let (status, reason) = tokio::select! {
        answer = approval::wait_local(queue, &request, left) => answer,
        _ = cancel.cancelled() => return Ending::Cancelled { approval_id: Some(request.id) },
    };
    not_approved(held, status, Some(request.id), reason)
}

/// The question, with secrets redacted.
fn question<'a>(
    shared: &'a Shared,
    held: &'a HeldCall<'_>,
    arguments: &'a Value,
    reason: &'a str,
) -> Question<'a> {
    Question {
        server: &shared.server,
        tool: &held.call.name,
        arguments,
        rule: held.eval.rule(),
        reason,
    }
}

/// `elicitation` in a legacy session: `elicitation/create` to the host under a proxy id. An
/// error answer (or one that is not an elicitation result) means "try the next channel".
async fn ask_host(
    shared: &Shared,
    held: &HeldCall<'_>,
    deadline: StdInstant,
    cancel: &CancellationToken,
) -> Option<Ending> {
    let arguments = shared.redactor.redact(&held.call.arguments);
    let reason = held.eval.reason();
    let with_mode = shared.host().protocol.as_deref() != Some("2025-06-18");
    let params = question(shared, held, &arguments, &reason).params(with_mode);
    let (answer, answered) = oneshot::channel();
    let id = shared.outbound().issue(Origin::Proxy(answer));
    let approval_id = id.as_text().to_string();
    let request = json!({"jsonrpc": "2.0", "id": id.to_value(), "method": "elicitation/create", "params": params});
    shared.reply(None, Bytes::from(request.to_string()));
    shared.flush().await;
    requested_event(shared, held, &approval_id, "elicitation");
    tracing::warn!(tool = %held.call.name, approval = %approval_id, "call held: approval asked of the host (elicitation)");
    let withdraw = |why: &'static str| async move {
        shared.outbound().by_host_id.remove(&id);
        let note = json!({
            "jsonrpc": "2.0",
            "method": "notifications/cancelled",
            "params": {"requestId": id.to_value(), "reason": why},
        });
        shared.reply(None, Bytes::from(note.to_string()));
        shared.flush().await;
    };
    let deadline = tokio::time::Instant::from_std(deadline);
    tokio::select! {
        reply = answered => match reply {
            Ok(HostReply::Result(result)) => match prompt::read_answer(&result) {
                Some(status) => Some(not_approved(held, status, Some(approval_id), None)),
                None => {
                    tracing::warn!(answer = %result, "the host's elicitation answer is unreadable: next approval channel");
                    None
                }
            },
            Ok(HostReply::Error(error)) => {
                tracing::info!(%error, "the host refused the elicitation: next approval channel");
                None
            }
            Err(_) => None,
        },
        _ = tokio::time::sleep_until(deadline) => {
            withdraw("approval timed out").await;
            Some(not_approved(held, Status::Timeout, Some(approval_id), None))
        }
        _ = cancel.cancelled() => {
            withdraw("the call was cancelled").await;
            Some(Ending::Cancelled { approval_id: Some(approval_id) })
        }
    }
}

/// `elicitation` in a 2026-07-28 session: the call is answered with `input_required`, the
/// question under the proxy's key and a sealed `requestState`; the retry is [`resume`]d.
fn ask_in_result(shared: &Shared, held: &HeldCall<'_>) -> Option<Ending> {
    let foreign_state = held
        .call
        .request_state
        .clone()
        .filter(|s| !s.starts_with(approval::state::PREFIX));
    let grant = Grant {
        tool: held.call.name.to_string(),
        arguments_sha256: held.digest.clone(),
        expires_ms: approval::now_ms() + shared.approval_timeout.as_millis() as u64,
        nonce: approval::new_id(),
        approved: false,
        inner_state: foreign_state,
        inner_responses: held.call.input_responses.clone(),
    };
    let state = shared.sealer.seal(&grant)?;
    let arguments = shared.redactor.redact(&held.call.arguments);
    let reason = held.eval.reason();
    let params = question(shared, held, &arguments, &reason).params(true);
    let result = json!({
        "resultType": "input_required",
        "inputRequests": {prompt::INPUT_KEY: {"method": "elicitation/create", "params": params}},
        "requestState": state,
    });
    shared.held().remove(&held.id);
    requested_event(shared, held, &grant.nonce, "elicitation");
    tracing::warn!(tool = %held.call.name, approval = %grant.nonce, "call answered with input_required: approval asked of the host");
    shared.audit_call_with(
        held,
        "approval_requested",
        Some(&grant.nonce),
        Some("pending"),
        None,
    );
    let msg = jsonrpc::result_response(&held.id, &result);
    shared.reply(held.batch, msg.into());
    Some(Ending::Asked)
}

// === the 2026-07-28 retry ===

/// A retry that answers the proxy's `input_required`: the sealed state must open, name this
/// very call, and carry (or have been given) the human's yes; then the call goes upstream
/// without what the proxy added. A local rule that blocks still blocks.
pub(super) fn resume(shared: &Shared, held: HeldCall<'_>) {
    let opened = match &held.call.request_state {
        Some(state) if state.starts_with(approval::state::PREFIX) => {
            shared.sealer.open(state, approval::now_ms())
        }
        // Our answer key without our state: nothing to bind the answer to.
        _ => Err(Refused::Forged),
    };
    let grant = match opened {
        Ok(grant) if grant.tool == held.call.name && grant.arguments_sha256 == held.digest => grant,
        Ok(grant) => {
            let reason = "the approval was given for a different call";
            return shared.deny(&held, Status::Rejected, Some(&grant.nonce), reason);
        }
        Err(refused) => {
            let status = match refused {
                Refused::Expired => Status::Expired,
                Refused::Forged | Refused::Replayed => Status::Rejected,
            };
            tracing::warn!(tool = %held.call.name, "approval retry refused: {refused}");
            return shared.deny(&held, status, None, &refused.to_string());
        }
    };
    let status = if grant.approved {
        Status::Approved
    } else {
        held.call
            .input_responses
            .as_ref()
            .and_then(|r| r.get(prompt::INPUT_KEY))
            .and_then(prompt::read_answer)
            .unwrap_or(Status::Cancelled)
    };
    if !grant.approved {
        resolved_event(shared, &held, Some(&grant.nonce), status);
    }
    if status != Status::Approved {
        let reason = format!(
            "{}; the human answered {}",
            held.eval.reason(),
            status.as_str()
        );
        return shared.deny(&held, status, Some(&grant.nonce), &reason);
    }
    if held.eval.action(shared.mode) == Action::Block && !held.eval.needs_service() {
        return conclude(shared, held, Action::Block);
    }
    let Some(raw) = strip(&held.raw, &grant) else {
        let reason = "the approved call could not be rebuilt";
        return shared.deny(&held, Status::Rejected, Some(&grant.nonce), reason);
    };
    shared.audit_call_with(
        &held,
        "approved",
        Some(&grant.nonce),
        Some("approved"),
        None,
    );
    let held = HeldCall { raw, ..held };
    forward(shared, held, Some(0.0))
}

/// The retried line without the proxy's answer key and state, with the upstream's own
/// `requestState` and `inputResponses` (if the call carried them) put back.
fn strip(raw: &[u8], grant: &Grant) -> Option<Bytes> {
    let mut envelope: Value = serde_json::from_slice(raw).ok()?;
    let params = envelope.get_mut("params")?.as_object_mut()?;
    let mut responses = match params.remove("inputResponses") {
        Some(Value::Object(map)) => map,
        _ => serde_json::Map::new(),
    };
    responses.remove(prompt::INPUT_KEY);
    for (key, value) in grant.inner_responses.iter().flatten() {
        responses
            .entry(key.clone())
            .or_insert_with(|| value.clone());
    }
    if !responses.is_empty() {
        params.insert("inputResponses".into(), Value::Object(responses));
    }
    match &grant.inner_state {
        Some(state) => params.insert("requestState".into(), Value::String(state.clone())),
        None => params.remove("requestState"),
    };
    serde_json::to_vec(&envelope).ok().map(Bytes::from)
}

/// The upstream answered an approved 2026-07-28 call with its own `input_required`: its
/// `requestState` is sealed together with the approval, so the retry needs no second yes.
pub(super) fn carry_grant(
    shared: &Shared,
    id: &Id,
    result: Raw<'_>,
    grant: &(String, String),
) -> Option<Bytes> {
    let mut result: Value = serde_json::from_str(result.get()).ok()?;
    if result.get("resultType").and_then(Value::as_str) != Some("input_required") {
        return None;
    }
    let inner_state = result
        .get("requestState")
        .and_then(Value::as_str)
        .map(str::to_string);
    let sealed = shared.sealer.seal(&Grant {
        tool: grant.0.clone(),
        arguments_sha256: grant.1.clone(),
        expires_ms: approval::now_ms() + shared.approval_timeout.as_millis() as u64,
        nonce: approval::new_id(),
        approved: true,
        inner_state,
        inner_responses: None,
    })?;
    result["requestState"] = Value::String(sealed);
    Some(jsonrpc::result_response(id, &result).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(inner_state: Option<&str>, inner_responses: Option<Value>) -> Grant {
        Grant {
            tool: "deploy".into(),
            arguments_sha256: "abc".into(),
            expires_ms: u64::MAX,
            nonce: "apr_1".into(),
            approved: false,
            inner_state: inner_state.map(str::to_string),
            inner_responses: inner_responses.and_then(|v| v.as_object().cloned()),
        }
    }

    fn stripped(line: Value, grant: &Grant) -> Value {
        let raw = strip(line.to_string().as_bytes(), grant).expect("strips");
        serde_json::from_slice(&raw).unwrap()
    }

    #[test]
    fn the_retry_loses_only_what_the_proxy_added() {
        let line = json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {
            "name": "deploy", "arguments": {"a": 1},
            "inputResponses": {"apie/approval": {"action": "accept", "content": {"approve": true}}},
            "requestState": "apie1.x.y",
            "_meta": {"progressToken": 3},
        }});
        assert_eq!(
            stripped(line, &grant(None, None)),
            json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {
                "name": "deploy", "arguments": {"a": 1}, "_meta": {"progressToken": 3},
            }})
        );
    }

    #[test]
    fn the_upstreams_own_state_and_answers_are_put_back() {
        let line = json!({"jsonrpc": "2.0", "id": 8, "method": "tools/call", "params": {
            "name": "deploy", "arguments": {},
            "inputResponses": {"apie/approval": {"action": "accept", "content": {"approve": true}}},
            "requestState": "apie1.x.y",
        }});
        let g = grant(
            Some("upstream-state"),
            Some(json!({"confirm": {"action": "accept", "content": {"ok": true}}})),
        );
        assert_eq!(
            stripped(line, &g)["params"],
            json!({
                "name": "deploy", "arguments": {},
                "inputResponses": {"confirm": {"action": "accept", "content": {"ok": true}}},
                "requestState": "upstream-state",
            })
        );
    }
}
