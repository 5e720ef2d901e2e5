//! Upstream → host: only JSON-RPC reaches the host; responses are matched to the host's
//! requests (`tools/list` results are read on the way), server requests are renumbered.

use super::from_host::cancelled_id;
use super::held;
use super::state::{Expect, with_id};
use super::*;

// === upstream → host ===

/// The upstream reader thread: runs until the server closes its stdout.
pub(super) fn upstream_loop(shared: &Shared, input: Input, max: usize) {
    let mut reader = LineReader::new(input, max);
    // The guard's warm-up starts once the first answer is written: on two cores, compiling
    // beside the start-up delayed it.
    let answered = std::cell::Cell::new(false);
    let idle = || {
        shared.to_host.flush();
        if answered.get() {
            shared.guard.warm_up();
        }
    };
    loop {
        let frame = reader.next(&idle);
        answered.set(true);
        match frame {
            Ok(Some(Frame::Line(line))) => upstream_line(shared, line),
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
                    shared.reply(p.batch, msg.into());
                }
            }
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(error = %e, "reading the upstream's stdout failed");
                break;
            }
        }
    }
    shared.to_host.flush();
    tracing::debug!("upstream closed its stdout");
}

pub(super) fn upstream_line(shared: &Shared, line: Bytes) {
    match jsonrpc::classify(&line) {
        Parsed::Message(msg) => {
            let raw = line.clone();
            upstream_message(shared, msg, raw)
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
                        upstream_message(shared, msg, raw)
                    }
                    Err(r) => tracing::warn!("dropped an upstream batch element: {}", r.message),
                }
            }
        }
    }
}

pub(super) fn upstream_message(shared: &Shared, msg: Message<'_>, raw: Bytes) {
    match &msg.kind {
        Kind::Response { id, body } => {
            let pending = shared.pending().remove(id);
            let Some(p) = pending else {
                return shared.reply(None, raw);
            };
            let raw = match (p.expect, body) {
                (Expect::ToolsList, Reply::Result(result)) => {
                    tools_listed(shared, id, *result).unwrap_or(raw)
                }
                (Expect::Initialize, Reply::Result(result)) => {
                    shared.host().protocol = protocol_version(*result);
                    raw
                }
                (Expect::ToolsCall(Some(track)), body) => {
                    if let Some(token) = &track.progress {
                        shared.progress().remove(token);
                    }
                    if !track.tool.is_empty() {
                        shared.event(Some(&track.tool), || match body {
                            Reply::Result(_) => What::Completed,
                            Reply::Error(e) => RawValue::from_string(e.get().to_owned())
                                .map_or(What::Completed, What::Errored),
                        });
                    }
                    match (&track.grant, body) {
                        (Some(grant), Reply::Result(result)) => {
                            held::carry_grant(shared, id, *result, grant).unwrap_or(raw)
                        }
                        _ => raw,
                    }
                }
                _ => raw,
            };
            shared.reply(p.batch, raw)
        }
        Kind::Notification { method } if method == "notifications/cancelled" => {
            // The server gave up on one of its requests: name it as the host knows it.
            let remapped = cancelled_id(msg.raw_params()).and_then(|server_id| {
                let mut outbound = shared.outbound();
                let host_id = outbound.host_id_of(&server_id)?;
                outbound.by_host_id.remove(&host_id);
                let params = jsonrpc::replace_member(
                    msg.raw_params()?.get(),
                    "requestId",
                    &host_id.to_json(),
                )?;
                let text = std::str::from_utf8(&raw).ok()?;
                jsonrpc::replace_member(text, "params", &params).map(Bytes::from)
            });
            shared.reply(None, remapped.unwrap_or(raw))
        }
        Kind::Notification { method } => {
            let raw = match method.as_ref() {
                "notifications/tools/list_changed" => {
                    shared.guard.forget();
                    raw
                }
                "notifications/progress" => {
                    shift_progress(shared, msg.raw_params(), &raw).unwrap_or(raw)
                }
                _ => raw,
            };
            shared.reply(None, raw)
        }
        Kind::Request { id, .. } => {
            let host_id = shared.outbound().remap(id);
            match with_id(&raw, &host_id) {
                Some(raw) => shared.reply(None, raw),
                None => {
                    shared.outbound().by_host_id.remove(&host_id);
                    tracing::warn!(%id, "dropped an upstream request whose id could not be remapped");
                }
            }
        }
    }
}

/// The `protocolVersion` of an `initialize` result.
fn protocol_version(result: Raw<'_>) -> Option<String> {
    #[derive(Deserialize)]
    struct Init {
        #[serde(rename = "protocolVersion")]
        protocol_version: String,
    }
    serde_json::from_str::<Init>(result.get())
        .ok()
        .map(|i| i.protocol_version)
}

/// Progress on a token the proxy already reported on (while the call waited for a human)
/// continues past the proxy's last value, so it keeps increasing as the spec requires.
fn shift_progress(shared: &Shared, params: Option<Raw<'_>>, raw: &[u8]) -> Option<Bytes> {
    if shared.progress().is_empty() {
        return None;
    }
    let mut params: Value = serde_json::from_str(params?.get()).ok()?;
    let token = params.get("progressToken")?.to_string();
    let offset = *shared.progress().get(&token)?;
    for field in ["progress", "total"] {
        if let Some(n) = params.get(field).and_then(Value::as_f64) {
            params[field] = json!(n + offset);
        }
    }
    let text = std::str::from_utf8(raw).ok()?;
    jsonrpc::replace_member(text, "params", &params.to_string()).map(Bytes::from)
}

/// Reads a `tools/list` result: learns the annotations, and with `hideBlockedTools` returns the
/// rewritten response without the tools every call of which would be blocked.
pub(super) fn tools_listed(shared: &Shared, id: &Id, result: Raw<'_>) -> Option<Bytes> {
    #[derive(Deserialize)]
    struct Listing {
        tools: Vec<ListedTool>,
    }
    let listing: Listing = serde_json::from_str(result.get()).ok()?;
    shared.guard.learn(&listing.tools);
    shared.event(None, || {
        What::ToolsListed(listing.tools.iter().map(|t| t.name.clone()).collect())
    });
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
