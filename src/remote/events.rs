//! Events for the service (`POST /v1/events`, SPEC §5, APIE-WIRE §1.7): queued without ever
//! waiting, sent in batches by one background task, so they never delay or fail a call.
//!
//! An [`Event`] is queued as plain data (what happened, to which tool, when, its sequence
//! number) and written as JSON only when its batch is sent, off the call path: building a
//! `serde_json::Value` per event used to cost more than the evaluate request itself.
//!
//! The queue is bounded (the oldest event is dropped when it is full), a batch holds at most
//! [`MAX_BATCH`] events, the task sends every [`FLUSH_EVERY`] or as soon as a batch is full,
//! retries a failed batch with backoff, and [`Events::close`] sends what is left at shutdown.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use serde::Serialize;
use serde_json::value::RawValue;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use reqwest::Method;

use super::{Endpoint, Identity};

pub const MAX_BATCH: usize = 25;
pub const MAX_QUEUE: usize = 5000;
pub const FLUSH_EVERY: Duration = Duration::from_secs(2);
pub const RETRIES: u32 = 3;
pub const RETRY_BASE: Duration = Duration::from_millis(250);

/// What happened, with what its event carries beyond the common fields.
#[derive(Debug)]
pub enum What {
    /// `agent.mcp.called`: a call reached the proxy.
    Called,
    /// `agent.mcp.completed`: the server answered with a result.
    Completed,
    /// `agent.mcp.failed`: the server answered with this `error` object.
    Errored(Box<RawValue>),
    /// `agent.mcp.failed`: the proxy refused the call (`outcome` as in the audit log).
    Refused {
        outcome: &'static str,
        reason: String,
    },
    /// `agent.mcp.failed`: the approval ended without a yes.
    Denied {
        status: &'static str,
        reason: String,
    },
    /// `agent.guardrail.evaluated`: the service's verdict.
    Evaluated(Decision),
    /// `agent.approval.requested`.
    ApprovalRequested(Box<Request>),
    /// `agent.approval.resolved`.
    ApprovalResolved {
        approval_id: Option<String>,
        status: &'static str,
    },
    /// `agent.mcp.tools_listed`: the tools a `tools/list` answer named.
    ToolsListed(Vec<String>),
}

impl What {
    pub fn kind(&self) -> &'static str {
        match self {
            What::Called => "agent.mcp.called",
            What::Completed => "agent.mcp.completed",
            What::Errored(_) | What::Refused { .. } | What::Denied { .. } => "agent.mcp.failed",
            What::Evaluated(_) => "agent.guardrail.evaluated",
            What::ApprovalRequested(_) => "agent.approval.requested",
            What::ApprovalResolved { .. } => "agent.approval.resolved",
            What::ToolsListed(_) => "agent.mcp.tools_listed",
        }
    }
}

/// The service's decision on a call, as `agent.guardrail.evaluated` reports it (and repeats in
/// its `metadata`).
#[derive(Debug, Serialize)]
pub struct Decision {
    #[serde(rename = "policyDecision")]
    pub policy: &'static str,
    #[serde(rename = "effectiveDecision")]
    pub effective: &'static str,
    #[serde(rename = "enforcementAction")]
    pub enforcement_action: String,
    pub mode: &'static str,
    pub reason: Option<String>,
}

/// An approval asked for: which one, on which channel, and for what.
#[derive(Debug)]
pub struct Request {
    pub approval_id: String,
    pub channel: &'static str,
    pub reason: String,
    pub action_type: String,
    pub action_name: String,
    pub resource_type: String,
    pub resource_provider: String,
}

/// One event as queued: written out only when its batch is sent.
#[derive(Debug)]
pub struct Event {
    pub what: What,
    /// The tool called, for the events of a call.
    pub tool: Option<String>,
    pub sequence: u64,
    pub at: SystemTime,
}

/// The JSON of one event: the common fields, then what `what` adds.
#[derive(Serialize)]
struct Wire<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    event_id: &'a str,
    agent_key: &'a str,
    run_id: &'a str,
    sequence_number: u64,
    timestamp: &'a str,
    environment: Option<&'a str>,
    payload_summary: Summary<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    decision: Option<&'a Decision>,
    #[serde(skip_serializing_if = "Option::is_none")]
    approval: Option<Approval<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    action: Option<Named<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    resource: Option<Provided<'a>>,
    metadata: Metadata<'a>,
}

#[derive(Serialize, Default)]
struct Summary<'a> {
    server: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool: Option<&'a str>,
    /// `null` in `completed`, the server's error in `failed`.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<Option<&'a RawValue>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    outcome: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    channel: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_count: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tools: Option<&'a [String]>,
}

#[derive(Serialize)]
struct Approval<'a> {
    approval_id: Option<&'a str>,
    status: &'a str,
    /// Only in `resolved`, where it is always `null`: the proxy does not know who answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    resolved_by: Option<()>,
}

#[derive(Serialize)]
struct Named<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    name: &'a str,
}

#[derive(Serialize)]
struct Provided<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    provider: &'a str,
}

#[derive(Serialize, Default)]
struct Metadata<'a> {
    capture_source: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    approval_id: Option<Option<&'a str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<Outcome>,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    decision: Option<&'a Decision>,
}

#[derive(Serialize)]
struct Outcome {
    status: &'static str,
}

impl Event {
    /// Appends this event's JSON, `event_id` made from 16 random bytes.
    fn write(&self, identity: &Identity, random: [u8; 16], out: &mut Vec<u8>) {
        let mut id = uuid::Uuid::encode_buffer();
        let event_id = uuid::Builder::from_random_bytes(random)
            .into_uuid()
            .hyphenated()
            .encode_lower(&mut id);
        let timestamp = crate::audit::rfc3339(self.at);
        let mut wire = Wire {
            kind: self.what.kind(),
            event_id,
            agent_key: &identity.agent_key,
            run_id: &identity.run_id,
            sequence_number: self.sequence,
            timestamp: &timestamp,
            environment: identity.environment.as_deref(),
            payload_summary: Summary {
                server: &identity.server,
                tool: self.tool.as_deref(),
                ..Summary::default()
            },
            decision: None,
            approval: None,
            action: None,
            resource: None,
            metadata: Metadata {
                capture_source: "mcp_proxy",
                ..Metadata::default()
            },
        };
        let (summary, metadata) = (&mut wire.payload_summary, &mut wire.metadata);
        match &self.what {
            What::Called => {}
            What::Completed => {
                summary.error = Some(None);
                metadata.result = Some(Outcome { status: "executed" });
            }
            What::Errored(error) => {
                summary.error = Some(Some(error));
                metadata.result = Some(Outcome { status: "failed" });
            }
            What::Refused { outcome, reason } => {
                summary.outcome = Some(outcome);
                metadata.reason = Some(reason);
            }
            What::Denied { status, reason } => {
                summary.status = Some(status);
                summary.reason = Some(reason);
            }
            What::Evaluated(decision) => {
                wire.decision = Some(decision);
                metadata.decision = Some(decision);
            }
            What::ApprovalRequested(request) => {
                summary.channel = Some(request.channel);
                wire.approval = Some(Approval {
                    approval_id: Some(&request.approval_id),
                    status: "pending",
                    resolved_by: None,
                });
                metadata.approval_id = Some(Some(&request.approval_id));
                metadata.reason = Some(&request.reason);
                wire.action = Some(Named {
                    kind: &request.action_type,
                    name: &request.action_name,
                });
                wire.resource = Some(Provided {
                    kind: &request.resource_type,
                    provider: &request.resource_provider,
                });
            }
            What::ApprovalResolved {
                approval_id,
                status,
            } => {
                wire.approval = Some(Approval {
                    approval_id: approval_id.as_deref(),
                    status,
                    resolved_by: Some(()),
                });
                metadata.approval_id = Some(approval_id.as_deref());
                metadata.status = Some(status);
            }
            What::ToolsListed(tools) => {
                summary.tool_count = Some(tools.len());
                summary.tools = Some(tools);
            }
        }
        // Writing plain data into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, &wire);
    }
}

/// The body of one `POST /v1/events`: `{"events":[...]}`.
fn batch_body(events: &[Event], identity: &Identity) -> Bytes {
    let mut random = vec![0u8; 16 * events.len()];
    // Without randomness, the sequence number and the clock still tell events apart.
    let fallback = getrandom::fill(&mut random).is_err();
    let mut body = Vec::with_capacity(64 + 640 * events.len());
    body.extend_from_slice(b"{\"events\":[");
    for (i, (event, chunk)) in events.iter().zip(random.chunks_exact(16)).enumerate() {
        let mut bytes: [u8; 16] = chunk.try_into().unwrap_or_default();
        if fallback {
            let nanos = event
                .at
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or_default();
            bytes[..8].copy_from_slice(&event.sequence.to_le_bytes());
            bytes[8..].copy_from_slice(&nanos.to_le_bytes());
        }
        if i > 0 {
            body.push(b',');
        }
        event.write(identity, bytes, &mut body);
    }
    body.extend_from_slice(b"]}");
    body.into()
}

struct Inner {
    queue: Mutex<VecDeque<Event>>,
    wake: Notify,
    closing: AtomicBool,
    dropped: AtomicU64,
}

impl Inner {
    fn queue(&self) -> std::sync::MutexGuard<'_, VecDeque<Event>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The next batch: a full one, or with `all` whatever is left.
    fn take_batch(&self, all: bool) -> Vec<Event> {
        let mut queue = self.queue();
        if queue.len() < MAX_BATCH && !all {
            return Vec::new();
        }
        let n = queue.len().min(MAX_BATCH);
        queue.drain(..n).collect()
    }
}

/// The event queue and its sender task.
pub struct Events {
    inner: Arc<Inner>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Events {
    /// Starts the sender task on the current runtime.
    pub(super) fn start(endpoint: Endpoint, identity: Identity) -> Events {
        let inner = Arc::new(Inner {
            queue: Mutex::new(VecDeque::new()),
            wake: Notify::new(),
            closing: AtomicBool::new(false),
            dropped: AtomicU64::new(0),
        });
        let task = tokio::spawn(send_loop(inner.clone(), endpoint, identity));
        Events {
            inner,
            task: Mutex::new(Some(task)),
        }
    }

    /// Queues an event; never waits.
    pub fn push(&self, event: Event) {
        let full = {
            let mut queue = self.inner.queue();
            if queue.len() >= MAX_QUEUE {
                queue.pop_front();
                self.inner.dropped.fetch_add(1, Ordering::Relaxed);
            }
            queue.push_back(event);
            queue.len() >= MAX_BATCH
        };
        if full {
            self.inner.wake.notify_one();
        }
    }

    /// Sends what is queued, giving up after `within`.
    pub async fn close(&self, within: Duration) {
        self.inner.closing.store(true, Ordering::Release);
        self.inner.wake.notify_one();
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(mut task) = task
            && tokio::time::timeout(within, &mut task).await.is_err()
        {
            task.abort();
            tracing::warn!(
                left = self.inner.queue().len(),
                "events not sent before exit"
            );
        }
    }
}

async fn send_loop(inner: Arc<Inner>, endpoint: Endpoint, identity: Identity) {
    let mut due = tokio::time::Instant::now() + FLUSH_EVERY;
    loop {
        if !inner.closing.load(Ordering::Acquire) {
            tokio::select! {
                _ = tokio::time::sleep_until(due) => {}
                _ = inner.wake.notified() => {}
            }
        }
        let closing = inner.closing.load(Ordering::Acquire);
        // Full batches go at once; a partial one waits for the timer (or the end).
        let timer = tokio::time::Instant::now() >= due;
        if timer {
            due = tokio::time::Instant::now() + FLUSH_EVERY;
        }
        loop {
            let batch = inner.take_batch(timer || closing);
            if batch.is_empty() {
                break;
            }
            let body = batch_body(&batch, &identity);
            send(&endpoint, body, batch.len(), &inner.closing).await;
        }
        let dropped = inner.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            tracing::warn!(dropped, "event queue full: oldest events dropped");
        }
        if closing {
            return;
        }
    }
}

/// Sends one batch, retrying with backoff; at shutdown once only, so a service that is down
/// does not hold the exit back.
async fn send(endpoint: &Endpoint, body: Bytes, count: usize, closing: &AtomicBool) {
    let url = endpoint.url(&["v1", "events"]);
    let mut delay = RETRY_BASE;
    for attempt in 0..=RETRIES {
        let request = endpoint.send(
            Method::POST,
            url.clone(),
            Some(body.clone()),
            endpoint.timeout,
        );
        match request.await {
            Ok(_) => return,
            Err(e) if attempt == RETRIES || closing.load(Ordering::Acquire) => {
                tracing::warn!(error = %e, events = count, "events dropped");
            }
            Err(e) => {
                tracing::debug!(error = %e, attempt, "sending events failed; retrying");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn identity(environment: Option<&str>) -> Identity {
        Identity {
            agent_key: "agent-1".into(),
            server: "files".into(),
            agent_name: "Agent".into(),
            run_id: "run_mcp_0123456789ab".into(),
            environment: environment.map(str::to_owned),
            mode: "enforce",
        }
    }

    fn event(tool: Option<&str>, what: What, sequence: u64) -> Event {
        Event {
            what,
            tool: tool.map(str::to_owned),
            sequence,
            at: SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_950_400_123),
        }
    }

    /// The batch's events with the two generated members checked and taken out.
    fn written(events: &[Event], identity: &Identity) -> Vec<Value> {
        let body: Value = serde_json::from_slice(&batch_body(events, identity)).unwrap();
        let Value::Object(mut body) = body else {
            panic!("not an object: {body}")
        };
        assert_eq!(body.len(), 1, "{body:?}");
        let Some(Value::Array(list)) = body.remove("events") else {
            panic!("no events: {body:?}")
        };
        let mut ids = std::collections::HashSet::new();
        list.into_iter()
            .map(|mut e| {
                let map = e.as_object_mut().unwrap();
                let id = map.shift_remove("event_id").unwrap();
                let id = uuid::Uuid::parse_str(id.as_str().unwrap()).unwrap();
                assert_eq!(id.get_version_num(), 4, "{id}");
                assert_eq!(id.get_variant(), uuid::Variant::RFC4122, "{id}");
                assert!(ids.insert(id), "event_id {id} repeated");
                assert_eq!(map["timestamp"], "2025-12-05T16:00:00.123Z");
                map.shift_remove("timestamp");
                e
            })
            .collect()
    }

    /// What every event starts with, `extra` merged in (`metadata` into `metadata`).
    fn expected(kind: &str, sequence: u64, extra: Value) -> Value {
        let mut e = json!({
            "type": kind,
            "agent_key": "agent-1",
            "run_id": "run_mcp_0123456789ab",
            "sequence_number": sequence,
            "environment": "staging",
            "metadata": {"capture_source": "mcp_proxy"},
        });
        for (k, v) in extra.as_object().unwrap() {
            match (k.as_str(), v) {
                ("metadata", Value::Object(more)) => {
                    e["metadata"].as_object_mut().unwrap().extend(more.clone())
                }
                _ => {
                    e[k] = v.clone();
                }
            }
        }
        e
    }

    #[test]
    fn every_kind_is_written_as_the_service_reads_it() {
        let decision = Decision {
            policy: "require_approval",
            effective: "allow",
            enforcement_action: "wait_for_approval".into(),
            mode: "monitor",
            reason: None,
        };
        let error = RawValue::from_string(r#"{"code": -32601, "message": "no"}"#.into()).unwrap();
        let cases = [
            (
                What::Called,
                json!({"payload_summary": {"server": "files", "tool": "read"}}),
            ),
            (
                What::Completed,
                json!({
                    "payload_summary": {"server": "files", "tool": "read", "error": null},
                    "metadata": {"result": {"status": "executed"}},
                }),
            ),
            (
                What::Errored(error),
                json!({
                    "payload_summary": {"server": "files", "tool": "read", "error": {"code": -32601, "message": "no"}},
                    "metadata": {"result": {"status": "failed"}},
                }),
            ),
            (
                What::Refused {
                    outcome: "blocked",
                    reason: "no \"deletes\"".into(),
                },
                json!({
                    "payload_summary": {"server": "files", "tool": "read", "outcome": "blocked"},
                    "metadata": {"reason": "no \"deletes\""},
                }),
            ),
            (
                What::Denied {
                    status: "timeout",
                    reason: "nobody answered".into(),
                },
                json!({"payload_summary": {"server": "files", "tool": "read", "status": "timeout", "reason": "nobody answered"}}),
            ),
            (
                What::Evaluated(decision),
                json!({
                    "payload_summary": {"server": "files", "tool": "read"},
                    "decision": {"policyDecision": "require_approval", "effectiveDecision": "allow", "enforcementAction": "wait_for_approval", "mode": "monitor", "reason": null},
                    "metadata": {"policyDecision": "require_approval", "effectiveDecision": "allow", "enforcementAction": "wait_for_approval", "mode": "monitor", "reason": null},
                }),
            ),
            (
                What::ApprovalRequested(Box::new(Request {
                    approval_id: "apr_1".into(),
                    channel: "guard",
                    reason: "deploys need a human".into(),
                    action_type: "write".into(),
                    action_name: "files.read".into(),
                    resource_type: "tool".into(),
                    resource_provider: "files".into(),
                })),
                json!({
                    "payload_summary": {"server": "files", "tool": "read", "channel": "guard"},
                    "approval": {"approval_id": "apr_1", "status": "pending"},
                    "metadata": {"approval_id": "apr_1", "reason": "deploys need a human"},
                    "action": {"type": "write", "name": "files.read"},
                    "resource": {"type": "tool", "provider": "files"},
                }),
            ),
            (
                What::ApprovalResolved {
                    approval_id: None,
                    status: "rejected",
                },
                json!({
                    "payload_summary": {"server": "files", "tool": "read"},
                    "approval": {"approval_id": null, "status": "rejected", "resolved_by": null},
                    "metadata": {"approval_id": null, "status": "rejected"},
                }),
            ),
        ];
        let mut events: Vec<Event> = Vec::new();
        let mut wanted = Vec::new();
        for (i, (what, extra)) in cases.into_iter().enumerate() {
            let kind = what.kind();
            events.push(event(Some("read"), what, i as u64 + 1));
            wanted.push(expected(kind, i as u64 + 1, extra));
        }
        events.push(event(
            None,
            What::ToolsListed(vec!["read".into(), "write".into()]),
            99,
        ));
        wanted.push(expected(
            "agent.mcp.tools_listed",
            99,
            json!({"payload_summary": {"server": "files", "tool_count": 2, "tools": ["read", "write"]}}),
        ));
        let got = written(&events, &identity(Some("staging")));
        assert_eq!(got.len(), wanted.len());
        for (got, wanted) in got.iter().zip(&wanted) {
            assert_eq!(got, wanted);
        }
        assert_eq!(
            [What::Completed.kind(), What::Called.kind()],
            ["agent.mcp.completed", "agent.mcp.called"]
        );
    }

    #[test]
    fn no_environment_is_null_and_an_empty_batch_is_an_empty_list() {
        let got = written(&[event(Some("t"), What::Called, 7)], &identity(None));
        assert_eq!(got[0]["environment"], Value::Null, "{}", got[0]);
        assert!(got[0].as_object().unwrap().contains_key("environment"));
        assert_eq!(&batch_body(&[], &identity(None))[..], b"{\"events\":[]}");
    }
}
