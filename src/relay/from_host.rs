//! Host → upstream: every line the host sends is classified, refused or forwarded; every
//! `tools/call` goes through the guard first. A call the local rules settle is forwarded or
//! refused on the spot; one that must wait (for the guard service or a human) goes to a task of
//! its own on the runtime ([`held`]), so nothing else waits with it.

use std::borrow::Cow;
use std::os::fd::AsFd;

use super::held::{self, HeldCall};
use super::state::{Batch, Expect, HostReply, Origin, Pending, take_if_complete, with_id};
use super::*;

// === host → upstream ===

/// The host reader thread: runs until the host closes our stdin or the session ends.
pub(super) fn host_loop(shared: &Arc<Shared>, input: Input, max: usize) {
    let watch = input.watch();
    let mut reader = LineReader::new(input, max);
    let host = HostSide { shared };
    // Outputs that do not take what the host sent do not stop the reading at once: the host's
    // EOF and cancellations are still seen (up to a backlog, see `Outlet`).
    let idle = || {
        match &watch {
            Some(fd) => {
                shared.to_upstream.flush_unless_readable(fd.as_fd());
                shared.to_host.flush_unless_readable(fd.as_fd());
            }
            None => {
                shared.to_upstream.flush();
                shared.to_host.flush();
            }
        }
        // Records of calls that sent nothing (a `tools/call` notification, dropped).
        shared.audit.flush();
    };
    loop {
        let frame = reader.next(&idle);
        if shared.closing.load(Ordering::Acquire) {
            break;
        }
        match frame {
            Ok(Some(Frame::Line(line))) => {
                host.line(line);
                if reader.early_write() {
                    shared.to_upstream.write_ready();
                }
            }
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
                shared.reply(None, r.to_response().into());
            }
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(error = %e, "reading stdin failed");
                break;
            }
        }
    }
    idle();
    tracing::debug!("host closed its stdin");
}

pub(super) struct HostSide<'a> {
    pub(super) shared: &'a Arc<Shared>,
}

impl HostSide<'_> {
    pub(super) fn line(&self, line: Bytes) {
        match jsonrpc::classify(&line) {
            Parsed::Message(msg) => {
                let raw = line.clone();
                self.message(msg, raw, None)
            }
            Parsed::Rejected(r) => self.refuse(&r, None),
            Parsed::Batch(items) => self.batch(&items),
        }
    }

    pub(super) fn refuse(&self, r: &Rejection, batch: Option<u64>) {
        tracing::warn!(code = r.code, id = ?r.id, "refused host message: {}", r.message);
        self.shared.reply(batch, r.to_response().into());
    }

    /// A batch: every element is handled as if it came alone; the responses go back as one
    /// array once all are in (none if the batch held no requests).
    pub(super) fn batch(&self, items: &[Raw<'_>]) {
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
            match jsonrpc::classify_element(*item) {
                Ok(msg) => {
                    if matches!(msg.kind, Kind::Request { .. }) {
                        expected += 1;
                    }
                    let raw = Bytes::copy_from_slice(item.get().as_bytes());
                    self.message(msg, raw, Some(b));
                }
                Err(r) => {
                    expected += 1;
                    self.refuse(&r, Some(b));
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
            self.shared.to_host.push(array);
        }
    }

    pub(super) fn message(&self, msg: Message<'_>, raw: Bytes, batch: Option<u64>) {
        let params = msg.raw_params();
        // The message's id moves on with it (into the pending map, or the held call).
        match msg.kind {
            Kind::Request { id, method } if method == "tools/call" => {
                self.tools_call(id, msg.params, raw, batch)
            }
            Kind::Notification { method } if method == "tools/call" => {
                tracing::warn!("dropped a tools/call sent as a notification (no id)");
                self.shared.audit_dropped(msg.params);
            }
            Kind::Request { id, method } => {
                let expect = match method.as_ref() {
                    "tools/list" => Expect::ToolsList,
                    "initialize" => {
                        self.shared.host().elicitation = declares_form_elicitation(params);
                        Expect::Initialize
                    }
                    _ => Expect::Plain,
                };
                self.shared.pending().insert(id, Pending { expect, batch });
                self.forward(raw);
            }
            Kind::Notification { method } if method == "notifications/cancelled" => {
                let id = cancelled_id(params);
                // A held call the server never saw: end the wait here, answer nothing.
                if let Some(cancel) = id.as_ref().and_then(|id| self.shared.held().remove(id)) {
                    cancel.cancel();
                    return;
                }
                // The host no longer wants an answer: do not invent one if the server dies, and
                // do not hold the rest of its batch back for it.
                let pending = id.and_then(|id| self.shared.pending().remove(&id));
                if let Some(p) = pending {
                    self.shared.cancelled_in_batch(p.batch);
                }
                self.forward(raw)
            }
            Kind::Response { id, body } => {
                let origin = self.shared.outbound().by_host_id.remove(&id);
                match origin {
                    Some(Origin::Upstream(server_id)) => match with_id(&raw, &server_id) {
                        Some(raw) => self.forward(raw),
                        None => {
                            tracing::warn!(%id, "dropped a host response that could not be renumbered")
                        }
                    },
                    Some(Origin::Proxy(waiter)) => {
                        let reply = match body {
                            Reply::Result(r) => HostReply::Result(parse_value(r)),
                            Reply::Error(e) => HostReply::Error(parse_value(e)),
                        };
                        let _ = waiter.send(reply);
                    }
                    None => tracing::warn!(%id, "dropped a host response to no request in flight"),
                }
            }
            Kind::Notification { method } => {
                if method == "notifications/initialized" {
                    self.shared.host().initialized = true;
                }
                self.forward(raw)
            }
        }
    }

    pub(super) fn forward(&self, raw: Bytes) {
        self.shared.to_upstream.push(raw);
    }

    /// Guards one `tools/call`: what is forwarded is the very line that was evaluated.
    pub(super) fn tools_call(
        &self,
        id: Id,
        params: Option<Params<'_>>,
        raw: Bytes,
        batch: Option<u64>,
    ) {
        let started = Instant::now();
        let call = match ToolCall::read(params) {
            Ok(call) => call,
            Err(r) => {
                let r = Rejection { id: Some(id), ..r };
                return self.refuse(&r, batch);
            }
        };
        let shared = self.shared;
        if shared.mode == Mode::Off {
            return self.forward_call(id, raw, batch, None);
        }
        let eval = shared.guard.evaluate(&call.name, &call.arguments);
        let ask_service = shared.remote.is_some() && eval.needs_service();
        let action = eval.action(shared.mode);
        // The digest goes to the audit log, the service, and binds approvals; skip it when none.
        let digest = if shared.audit.enabled()
            || ask_service
            || action == Action::AskApproval
            || call.resumes()
        {
            guard::arguments_digest(&call.arguments)
        } else {
            String::new()
        };
        let held = HeldCall {
            id,
            call,
            eval,
            digest,
            raw,
            batch,
            started,
        };
        shared.event(Some(&held.call.name), || What::Called);
        if held.call.resumes() {
            return held::resume(shared, held);
        }
        if ask_service || action == Action::AskApproval {
            return self.hold(held, ask_service);
        }
        held::conclude(shared, held, action)
    }

    /// Hands a call that must wait to a task of its own, so everything else keeps flowing.
    pub(super) fn hold(&self, held: HeldCall<'_>, ask_service: bool) {
        let shared = self.shared;
        if shared.held().len() >= shared.max_pending_calls {
            tracing::warn!(
                limit = shared.max_pending_calls,
                "maxPendingCalls reached: refused"
            );
            shared.audit_call(&held, "too_many_pending");
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
            return shared.reply(held.batch, msg);
        }
        let held = HeldCall {
            call: held.call.into_owned(),
            ..held
        };
        let cancel = CancellationToken::new();
        shared.held().insert(held.id.clone(), cancel.clone());
        let task = shared
            .runtime
            .spawn(held::wait(self.shared.clone(), held, ask_service, cancel));
        let mut tasks = shared.held_tasks();
        tasks.retain(|t| !t.is_finished());
        tasks.push(task);
    }

    pub(super) fn forward_call(
        &self,
        id: Id,
        raw: Bytes,
        batch: Option<u64>,
        track: Option<Box<state::CallTrack>>,
    ) {
        self.shared.pending().insert(
            id,
            Pending {
                expect: Expect::ToolsCall(track),
                batch,
            },
        );
        self.forward(raw)
    }
}

/// The `requestId` of a `notifications/cancelled`.
pub(super) fn cancelled_id(params: Option<Raw<'_>>) -> Option<Id> {
    #[derive(Deserialize)]
    struct Cancelled<'a> {
        #[serde(rename = "requestId", borrow)]
        request_id: &'a RawValue,
    }
    let params: Cancelled<'_> = serde_json::from_str(params?.get()).ok()?;
    Id::from_raw(params.request_id.into())
}

/// A JSON value the parser already accepted.
fn parse_value(raw: Raw<'_>) -> Value {
    serde_json::from_str(raw.get()).unwrap_or(Value::Null)
}

/// Whether `initialize` params declare form elicitation.
fn declares_form_elicitation(params: Option<Raw<'_>>) -> bool {
    params.is_some_and(|p| offers_form(parse_value(p).pointer("/capabilities/elicitation")))
}

/// An elicitation capability the proxy's form can use: `{}` (form only, as in 2025-06-18) or
/// `{form: …}`; a host offering only `url` cannot show it.
fn offers_form(elicitation: Option<&Value>) -> bool {
    match elicitation {
        Some(Value::Object(modes)) => modes.is_empty() || modes.contains_key("form"),
        _ => false,
    }
}

/// The parts of a `tools/call` the guard reads, parsed strictly (see [`jsonrpc::strict`]); the
/// arguments borrow from the line until the call has to wait ([`ToolCall::into_owned`]).
pub(super) struct ToolCall<'a> {
    pub(super) name: Cow<'a, str>,
    /// Always an object.
    pub(super) arguments: Json<'a>,
    /// The call came from a 2026-07-28 client (its `_meta` carries the protocol version).
    pub(super) modern: bool,
    /// A 2026-07-28 client that declared elicitation on this very request.
    pub(super) elicitation: bool,
    /// `_meta.progressToken`.
    pub(super) progress_token: Option<Value>,
    /// `requestState` (2026-07-28 retries).
    pub(super) request_state: Option<String>,
    /// `inputResponses` (2026-07-28 retries).
    pub(super) input_responses: Option<serde_json::Map<String, Value>>,
}

impl ToolCall<'_> {
    /// A 2026-07-28 retry that answers the proxy's own approval question.
    pub(super) fn resumes(&self) -> bool {
        self.request_state
            .as_deref()
            .is_some_and(|s| s.starts_with(approval::state::PREFIX))
            || self
                .input_responses
                .as_ref()
                .is_some_and(|r| r.contains_key(approval::prompt::INPUT_KEY))
    }

    /// The same call, owning its arguments: for a call that waits in a task.
    pub(super) fn into_owned(self) -> ToolCall<'static> {
        ToolCall {
            name: Cow::Owned(self.name.into_owned()),
            arguments: self.arguments.into_owned(),
            ..self
        }
    }
}

impl<'a> ToolCall<'a> {
    pub(super) fn read(params: Option<Params<'a>>) -> Result<ToolCall<'a>, Rejection> {
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
        let value = match params {
            Params::Call(value) => value,
            Params::Raw(raw) => jsonrpc::strict::parse(raw.get()).map_err(|e| {
                Rejection::invalid(
                    None,
                    format!("Invalid Request: tools/call params refused: {e}"),
                )
            })?,
        };
        let Json::Object(members) = value else {
            return Err(invalid_params(
                "Invalid params: params must be an object".into(),
            ));
        };
        let mut name = None;
        let mut arguments = None;
        let mut meta = None;
        let mut request_state = None;
        let mut input_responses = None;
        for (key, value) in members {
            let slot = match &*key {
                "name" => &mut name,
                "arguments" => &mut arguments,
                "_meta" => &mut meta,
                "requestState" => &mut request_state,
                "inputResponses" => &mut input_responses,
                other => {
                    for member in [
                        "name",
                        "arguments",
                        "_meta",
                        "requestState",
                        "inputResponses",
                    ] {
                        if jsonrpc::strict::eq_ignore_case(other, member) {
                            return Err(Rejection::invalid(
                                None,
                                format!(
                                    "Invalid Request: params member {other:?} must be spelled {member:?}"
                                ),
                            ));
                        }
                    }
                    continue;
                }
            };
            *slot = Some(value);
        }
        let name = match name {
            Some(Json::String(name)) => name,
            _ => {
                return Err(invalid_params(
                    "Invalid params: name must be a string".into(),
                ));
            }
        };
        let arguments = match arguments {
            None => Json::Object(Vec::new()),
            Some(args @ Json::Object(_)) => args,
            Some(_) => {
                return Err(invalid_params(
                    "Invalid params: arguments must be an object".into(),
                ));
            }
        };
        let meta = meta.as_ref();
        let modern = meta
            .and_then(|m| m.get("io.modelcontextprotocol/protocolVersion"))
            .is_some();
        let elicitation = offers_form(
            meta.and_then(|m| m.get("io.modelcontextprotocol/clientCapabilities"))
                .and_then(|c| c.get("elicitation"))
                .map(Json::to_value)
                .as_ref(),
        );
        let progress_token = meta
            .and_then(|m| m.get("progressToken"))
            .filter(|t| {
                matches!(t, Json::String(_))
                    || matches!(t, Json::Number(n) if n.is_i64() || n.is_u64())
            })
            .map(Json::to_value);
        let request_state = match request_state {
            Some(Json::String(s)) => Some(s.into_owned()),
            _ => None,
        };
        let input_responses = input_responses.as_ref().and_then(Json::to_map);
        Ok(ToolCall {
            name,
            arguments,
            modern,
            elicitation,
            progress_token,
            request_state,
            input_responses,
        })
    }
}
