//! Host → upstream: every line the host sends is classified, refused or forwarded; every
//! `tools/call` goes through the guard first, and calls that need a human wait in tasks of their
//! own.

use super::state::{Batch, Pending, take_if_complete, with_id};
use super::*;

// === host → upstream ===

pub(super) async fn host_loop(shared: Arc<Shared>, to_upstream: mpsc::Sender<Bytes>, max: usize) {
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

pub(super) struct HostSide<'a> {
    pub(super) shared: &'a Shared,
    pub(super) shared_arc: &'a Arc<Shared>,
    pub(super) to_upstream: &'a mpsc::Sender<Bytes>,
}

/// A call waiting for a human, with everything needed to forward or refuse it later.
pub(super) struct HeldCall {
    pub(super) id: Id,
    pub(super) call: ToolCall,
    pub(super) eval: Evaluation,
    pub(super) digest: String,
    pub(super) raw: Bytes,
    pub(super) batch: Option<u64>,
    pub(super) started: Instant,
}

/// The wait for one held call: forwards it if approved, answers -32002 otherwise, and ends
/// silently when the host cancels it (or the session ends).
pub(super) async fn wait_for_approval(
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
            shared.cancelled_in_batch(held.batch).await;
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
    pub(super) async fn line(&self, line: Bytes) {
        match jsonrpc::classify(&line) {
            Parsed::Message(msg) => {
                let raw = line.clone();
                self.message(msg, raw, None).await
            }
            Parsed::Rejected(r) => self.refuse(&r, None).await,
            Parsed::Batch(items) => self.batch(&items).await,
        }
    }

    pub(super) async fn refuse(&self, r: &Rejection, batch: Option<u64>) {
        tracing::warn!(code = r.code, id = ?r.id, "refused host message: {}", r.message);
        self.shared.reply(batch, r.to_response().into()).await;
    }

    /// A batch: every element is handled as if it came alone; the responses go back as one
    /// array once all are in (none if the batch held no requests).
    pub(super) async fn batch(&self, items: &[&RawValue]) {
        let b = {
            let mut batches = self.shared.batches();
            batches.0 += 1;
            let b = batches.0;
            batches.1.insert(
                b,
                Batch {
                    expected: None,
                    responses: Vec::new(),
                    cancelled: 0,
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

    pub(super) async fn message(&self, msg: Message<'_>, raw: Bytes, batch: Option<u64>) {
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
                // The host no longer wants an answer: do not invent one if the server dies, and
                // do not hold the rest of its batch back for it.
                let pending = id.and_then(|id| self.shared.pending().remove(&id));
                if let Some(p) = pending {
                    self.shared.cancelled_in_batch(p.batch).await;
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

    pub(super) async fn forward(&self, raw: Bytes) {
        let _ = self.to_upstream.send(raw).await;
    }

    /// Guards one `tools/call`: what is forwarded is the very line that was evaluated.
    pub(super) async fn tools_call(
        &self,
        id: &Id,
        params: Option<&RawValue>,
        raw: Bytes,
        batch: Option<u64>,
    ) {
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
        let action = guard::action(shared.mode, eval.decision);
        // The digest is for the audit log and for binding an approval; skip it when neither.
        let digest = if shared.audit.enabled() || action == Action::AskApproval {
            guard::arguments_digest(&call.arguments)
        } else {
            String::new()
        };
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
    pub(super) async fn hold(&self, held: HeldCall) {
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

    pub(super) async fn forward_call(&self, id: &Id, raw: Bytes, batch: Option<u64>) {
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
pub(super) fn cancelled_id(params: Option<&RawValue>) -> Option<Id> {
    #[derive(Deserialize)]
    struct Cancelled<'a> {
        #[serde(rename = "requestId", borrow)]
        request_id: &'a RawValue,
    }
    let params: Cancelled<'_> = serde_json::from_str(params?.get()).ok()?;
    Id::from_raw(params.request_id)
}

/// The parts of a `tools/call` the guard reads, parsed strictly (see [`jsonrpc::strict`]).
pub(super) struct ToolCall {
    pub(super) name: String,
    pub(super) arguments: Value,
    /// The call came from a 2026-07-28 client (its `_meta` carries the protocol version).
    pub(super) modern: bool,
}

impl ToolCall {
    pub(super) fn read(params: Option<&RawValue>) -> Result<ToolCall, Rejection> {
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
