//! A fake Apie guard service for the integration tests: a real HTTP server (axum) on
//! `127.0.0.1:0`, running on the test's own tokio runtime, speaking the part of the Apie API the
//! proxy uses (APIE-WIRE §1.5–§1.7):
//!
//! | route | answer |
//! |---|---|
//! | `POST /v1/agents/identify` | [`ApieServer::set_identify_reply`] (default: a small agent record) |
//! | `POST /v1/guardrails/evaluate` | the next [`ApieServer::script_evaluate`] reply, else [`ApieServer::set_evaluate_default`] (default: allow) |
//! | `GET /v1/approvals/{id}/wait?timeout=<ms>` | `{"status": …}`, long-polling while the status is pending; or [`ApieServer::disable_wait`]'s status |
//! | `GET /v1/approvals/{id}` | `{"approval": {"id", "status"}}` |
//! | `POST /v1/approvals/{id}/cancel` | `{"status": "cancelled"}`; the approval becomes cancelled |
//! | `POST /v1/events` | the next [`ApieServer::script_events`] reply, else [`ApieServer::set_events_default`] (default: `{"warnings": []}`) |
//! | anything else | 404 |
//!
//! Every request is recorded before it is answered ([`Recorded`]: method, path, query, headers,
//! body, the status it was answered with, when it arrived), so tests can count requests that
//! never got their answer (timeouts) and inspect bodies and the `Authorization` header. The TCP
//! connections it accepted are counted too ([`ApieServer::connections`]).
//!
//! Approval statuses are scripted per approval id ([`ApieServer::script_approval`]): each
//! status read (`/wait` or `GET`) takes the next status of the sequence, and the last one stays.
//! A `/wait` that reads the last status while it is pending holds (long poll) until
//! [`ApieServer::set_approval`] changes it or the request's `timeout` elapses. An id never
//! scripted is pending. The empty status `""` is answered without a `status` field.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use axum::serve::ListenerExt as _;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::Notify;

/// How long [`ApieServer::wait_for`] and friends wait before failing the test.
pub const WAIT: Duration = Duration::from_secs(5);

/// The evaluate path.
pub const EVALUATE: &str = "/v1/guardrails/evaluate";
/// The identify path.
pub const IDENTIFY: &str = "/v1/agents/identify";
/// The events path.
pub const EVENTS: &str = "/v1/events";

/// `/v1/approvals/{id}/wait`.
pub fn wait_path(id: &str) -> String {
    format!("/v1/approvals/{id}/wait")
}

/// `/v1/approvals/{id}`.
pub fn approval_path(id: &str) -> String {
    format!("/v1/approvals/{id}")
}

/// `/v1/approvals/{id}/cancel`.
pub fn cancel_path(id: &str) -> String {
    format!("/v1/approvals/{id}/cancel")
}

// ---------------------------------------------------------------------------
// Replies
// ---------------------------------------------------------------------------

/// The body of a scripted [`Reply`].
#[derive(Clone, Debug)]
pub enum ReplyBody {
    /// Sent as `application/json`.
    Json(Value),
    /// Sent as is, as `text/html` (for "the body is not JSON").
    Raw(String),
}

/// One scripted HTTP answer: status code, body, and how long to wait before sending it.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub body: ReplyBody,
    pub delay: Duration,
    /// A `Location` header (for redirects).
    pub location: Option<String>,
}

impl Reply {
    /// 200 with a JSON body.
    pub fn json(body: Value) -> Reply {
        Reply::status(200, body)
    }

    /// `status` with a JSON body.
    pub fn status(status: u16, body: Value) -> Reply {
        Reply {
            status,
            body: ReplyBody::Json(body),
            delay: Duration::ZERO,
            location: None,
        }
    }

    /// A redirect to `location` (a path on this server, or any URL).
    pub fn redirect(status: u16, location: &str) -> Reply {
        Reply {
            location: Some(location.to_owned()),
            ..Reply::raw(status, "")
        }
    }

    /// `status` with a body that is not JSON.
    pub fn raw(status: u16, text: &str) -> Reply {
        Reply {
            status,
            body: ReplyBody::Raw(text.to_owned()),
            delay: Duration::ZERO,
            location: None,
        }
    }

    /// 200 `{"policy_decision": decision}` (any spelling, sent as given).
    pub fn decision(decision: &str) -> Reply {
        Reply::json(json!({"policy_decision": decision}))
    }

    /// 200 `require_approval` carrying the approval id as `approval_request.id`.
    pub fn require_approval(approval_id: &str) -> Reply {
        Reply::json(json!({
            "policy_decision": "require_approval",
            "effective_decision": "require_approval",
            "enforcement_action": "wait_for_approval",
            "reason": "a human must look at this",
            "decision_id": format!("dec_{approval_id}"),
            "approval_request": {"id": approval_id},
        }))
    }

    /// The same reply, sent after `ms` milliseconds.
    pub fn delayed(mut self, ms: u64) -> Reply {
        self.delay = Duration::from_millis(ms);
        self
    }

    fn into_response(self) -> Response {
        let (content_type, body) = match self.body {
            ReplyBody::Json(value) => ("application/json", value.to_string()),
            ReplyBody::Raw(text) => ("text/html; charset=utf-8", text),
        };
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = Response::new(Body::from(body));
        *response.status_mut() = status;
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        if let Some(location) = self.location.and_then(|l| HeaderValue::try_from(l).ok()) {
            response.headers_mut().insert(header::LOCATION, location);
        }
        response
    }
}

// ---------------------------------------------------------------------------
// Recorded requests
// ---------------------------------------------------------------------------

/// One request the server received.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    /// The raw query string, without `?`.
    pub query: Option<String>,
    /// Header names in lower case, values as text.
    pub headers: Vec<(String, String)>,
    /// The body as text (lossy UTF-8).
    pub body: String,
    /// The status code it was (or is being) answered with.
    pub answered: u16,
    /// When it arrived (before any scripted delay).
    pub at: Instant,
}

impl Recorded {
    /// The value of header `name` (case-insensitive), if sent.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body parsed as JSON; panics when it is not JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| {
            panic!(
                "{} {} sent a body that is not JSON ({e}): {:?}",
                self.method, self.path, self.body
            )
        })
    }

    /// The value of query parameter `key` (not percent-decoded), if present.
    pub fn query_param(&self, key: &str) -> Option<String> {
        self.query.as_deref()?.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (k == key).then(|| v.to_owned())
        })
    }
}

// ---------------------------------------------------------------------------
// The server
// ---------------------------------------------------------------------------

/// What the test scripted and what the server saw.
struct Script {
    evaluate: VecDeque<Reply>,
    evaluate_default: Reply,
    identify: Reply,
    events: VecDeque<Reply>,
    events_default: Reply,
    /// Status sequences per approval id; the last status stays.
    approvals: HashMap<String, VecDeque<String>>,
    /// `Some(status)`: `/wait` answers that status (e.g. 404: "no long poll here").
    wait_disabled: Option<u16>,
    requests: Vec<Recorded>,
}

struct Shared {
    script: Mutex<Script>,
    /// Woken whenever an approval status changes (long polls re-read it).
    approval_changed: Notify,
    /// TCP connections accepted.
    connections: AtomicUsize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Script> {
        self.script.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A fake Apie service; see the module documentation. Stops when dropped.
pub struct ApieServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ApieServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ApieServer {
    /// Binds `127.0.0.1:0` and serves on the current tokio runtime.
    pub async fn start() -> ApieServer {
        let shared = Arc::new(Shared {
            script: Mutex::new(Script {
                evaluate: VecDeque::new(),
                evaluate_default: Reply::json(json!({
                    "policy_decision": "allow",
                    "reason": "allowed by the fake service",
                    "decision_id": "dec_default",
                })),
                identify: Reply::json(json!({
                    "agent_id": "agt_test",
                    "agent_version_id": "agv_test",
                    "workspace_id": "ws_test",
                    "created": false,
                    "version_created": false,
                })),
                events: VecDeque::new(),
                events_default: Reply::json(json!({"warnings": []})),
                approvals: HashMap::new(),
                wait_disabled: None,
                requests: Vec::new(),
            }),
            approval_changed: Notify::new(),
            connections: AtomicUsize::new(0),
        });
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake Apie service");
        let addr = listener.local_addr().expect("local address");
        let listener = listener.tap_io({
            let shared = Arc::clone(&shared);
            move |_| {
                shared.connections.fetch_add(1, Ordering::SeqCst);
            }
        });
        let app = Router::new()
            .fallback(dispatch)
            .with_state(Arc::clone(&shared));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        ApieServer { addr, shared, task }
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>`, for `guard.baseUrl` or `APIE_BASE_URL`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    // --- scripting -------------------------------------------------------

    /// Queues the answer to the next evaluate request (queued replies are used in order, then
    /// the default).
    pub fn script_evaluate(&self, reply: Reply) {
        self.shared.lock().evaluate.push_back(reply);
    }

    /// The answer to evaluate requests when nothing is queued.
    pub fn set_evaluate_default(&self, reply: Reply) {
        self.shared.lock().evaluate_default = reply;
    }

    /// The answer to every identify request.
    pub fn set_identify_reply(&self, reply: Reply) {
        self.shared.lock().identify = reply;
    }

    /// Queues the answer to the next events request.
    pub fn script_events(&self, reply: Reply) {
        self.shared.lock().events.push_back(reply);
    }

    /// The answer to events requests when nothing is queued.
    pub fn set_events_default(&self, reply: Reply) {
        self.shared.lock().events_default = reply;
    }

    /// The statuses approval `id` reports, one per read (`/wait` or `GET`); the last one stays.
    /// `"pending"` and `""` (no `status` field at all) mean undecided.
    pub fn script_approval(&self, id: &str, statuses: &[&str]) {
        assert!(!statuses.is_empty(), "script at least one status");
        self.shared.lock().approvals.insert(
            id.to_owned(),
            statuses.iter().map(|s| (*s).to_owned()).collect(),
        );
        self.shared.approval_changed.notify_waiters();
    }

    /// Sets approval `id` to `status` from now on, waking any `/wait` holding on it.
    pub fn set_approval(&self, id: &str, status: &str) {
        self.script_approval(id, &[status]);
    }

    /// Makes `/wait` answer `status` (404, 405, 501…) with no body, as a service without long
    /// polling does.
    pub fn disable_wait(&self, status: u16) {
        self.shared.lock().wait_disabled = Some(status);
    }

    // --- what was received ------------------------------------------------

    /// Every request received so far, in arrival order.
    pub fn all_requests(&self) -> Vec<Recorded> {
        self.shared.lock().requests.clone()
    }

    /// The requests received so far whose path is exactly `path`, in arrival order.
    pub fn requests(&self, path: &str) -> Vec<Recorded> {
        self.shared
            .lock()
            .requests
            .iter()
            .filter(|r| r.path == path)
            .cloned()
            .collect()
    }

    /// How many TCP connections were accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// How many requests to `path` were received so far.
    pub fn count(&self, path: &str) -> usize {
        self.shared
            .lock()
            .requests
            .iter()
            .filter(|r| r.path == path)
            .count()
    }

    /// The `events` array of every `POST /v1/events` received, one entry per request (whatever
    /// it was answered).
    pub fn event_batches(&self) -> Vec<Vec<Value>> {
        self.requests(EVENTS)
            .iter()
            .map(|r| {
                r.json()["events"]
                    .as_array()
                    .unwrap_or_else(|| panic!("an events request without an events array: {r:?}"))
                    .clone()
            })
            .collect()
    }

    /// Every event received (all batches, in arrival order; a retried event appears again).
    pub fn events(&self) -> Vec<Value> {
        self.event_batches().into_iter().flatten().collect()
    }

    /// The events received in batches answered 2xx, each `event_id` once.
    pub fn delivered_events(&self) -> Vec<Value> {
        let mut seen = std::collections::HashSet::new();
        self.requests(EVENTS)
            .iter()
            .filter(|r| (200..300).contains(&r.answered))
            .flat_map(|r| r.json()["events"].as_array().cloned().unwrap_or_default())
            .filter(|e| seen.insert(e["event_id"].to_string()))
            .collect()
    }

    /// Waits (up to [`WAIT`]) until at least `n` requests to `path` arrived; returns them all.
    pub async fn wait_for(&self, path: &str, n: usize) -> Vec<Recorded> {
        self.wait_for_within(path, n, WAIT).await
    }

    /// [`Self::wait_for`] with an explicit limit.
    pub async fn wait_for_within(&self, path: &str, n: usize, limit: Duration) -> Vec<Recorded> {
        let deadline = Instant::now() + limit;
        loop {
            let found = self.requests(path);
            if found.len() >= n {
                return found;
            }
            if Instant::now() >= deadline {
                panic!(
                    "expected {n} request(s) to {path} within {limit:?}, got {}; everything received: {:#?}",
                    found.len(),
                    self.summary()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits (up to `limit`) until `done` holds for the events received so far; returns them.
    pub async fn wait_for_events(
        &self,
        limit: Duration,
        done: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        let deadline = Instant::now() + limit;
        loop {
            let events = self.events();
            if done(&events) {
                return events;
            }
            if Instant::now() >= deadline {
                panic!("the events never got there within {limit:?}: {events:#?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `METHOD path?query -> status` of every request, for failure messages.
    pub fn summary(&self) -> Vec<String> {
        self.all_requests()
            .iter()
            .map(|r| match &r.query {
                Some(q) => format!("{} {}?{} -> {}", r.method, r.path, q, r.answered),
                None => format!("{} {} -> {}", r.method, r.path, r.answered),
            })
            .collect()
    }
}

/// A base URL nothing listens on (a port bound and released at once): connections are refused.
pub async fn refused_url() -> String {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a port to release");
    let addr = listener.local_addr().expect("local address");
    drop(listener);
    format!("http://{addr}")
}

// ---------------------------------------------------------------------------
// Request handling
// ---------------------------------------------------------------------------

/// What to do with one request once it is recorded.
enum Plan {
    Reply(Reply),
    /// A `/wait` on approval `id` that found it pending: hold up to `timeout`.
    LongPoll {
        id: String,
        timeout: Duration,
    },
}

async fn dispatch(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    let method = parts.method.as_str().to_owned();
    let path = parts.uri.path().to_owned();
    let query = parts.uri.query().map(str::to_owned);
    let mut recorded = Recorded {
        method: method.clone(),
        path: path.clone(),
        query,
        headers: parts
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_ascii_lowercase(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body: String::from_utf8_lossy(&body).into_owned(),
        answered: 0,
        at: Instant::now(),
    };
    let plan = {
        let mut script = shared.lock();
        let plan = plan_reply(&mut script, &method, &path, &recorded);
        recorded.answered = match &plan {
            Plan::Reply(reply) => reply.status,
            Plan::LongPoll { .. } => 200,
        };
        script.requests.push(recorded);
        plan
    };
    match plan {
        Plan::Reply(reply) => {
            if !reply.delay.is_zero() {
                tokio::time::sleep(reply.delay).await;
            }
            reply.into_response()
        }
        Plan::LongPoll { id, timeout } => long_poll(&shared, &id, timeout).await,
    }
}

fn not_found() -> Reply {
    Reply::status(404, json!({"error": "not_found"}))
}

fn plan_reply(script: &mut Script, method: &str, path: &str, recorded: &Recorded) -> Plan {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let reply = match (method, segments.as_slice()) {
        ("POST", ["v1", "agents", "identify"]) => script.identify.clone(),
        ("POST", ["v1", "guardrails", "evaluate"]) => script
            .evaluate
            .pop_front()
            .unwrap_or_else(|| script.evaluate_default.clone()),
        ("POST", ["v1", "events"]) => script
            .events
            .pop_front()
            .unwrap_or_else(|| script.events_default.clone()),
        ("GET", ["v1", "approvals", id, "wait"]) => {
            if let Some(status) = script.wait_disabled {
                return Plan::Reply(Reply::raw(status, ""));
            }
            let (status, last) = take_status(script, id);
            if last && undecided(&status) {
                let ms = recorded
                    .query_param("timeout")
                    .and_then(|t| t.parse::<u64>().ok())
                    .unwrap_or(30_000);
                return Plan::LongPoll {
                    id: (*id).to_owned(),
                    timeout: Duration::from_millis(ms),
                };
            }
            Reply::json(wait_body(&status))
        }
        ("GET", ["v1", "approvals", id]) => {
            let (status, _) = take_status(script, id);
            Reply::json(approval_body(id, &status))
        }
        ("POST", ["v1", "approvals", id, "cancel"]) => {
            script
                .approvals
                .insert((*id).to_owned(), VecDeque::from(["cancelled".to_owned()]));
            Reply::json(json!({"id": id, "status": "cancelled"}))
        }
        _ => not_found(),
    };
    Plan::Reply(reply)
}

fn undecided(status: &str) -> bool {
    status.is_empty() || status == "pending"
}

/// The next status of approval `id` and whether it is the last of its sequence (which stays).
fn take_status(script: &mut Script, id: &str) -> (String, bool) {
    match script.approvals.get_mut(id) {
        Some(seq) if seq.len() > 1 => (seq.pop_front().unwrap_or_default(), false),
        Some(seq) => (seq.front().cloned().unwrap_or_default(), true),
        None => ("pending".to_owned(), true),
    }
}

fn current_status(script: &Script, id: &str) -> String {
    script
        .approvals
        .get(id)
        .and_then(|seq| seq.front().cloned())
        .unwrap_or_else(|| "pending".to_owned())
}

fn wait_body(status: &str) -> Value {
    if status.is_empty() {
        json!({})
    } else {
        json!({"status": status})
    }
}

fn approval_body(id: &str, status: &str) -> Value {
    if status.is_empty() {
        json!({"approval": {"id": id}})
    } else {
        json!({"approval": {"id": id, "status": status}})
    }
}

/// Holds a `/wait` until approval `id` is decided or `timeout` elapses; answers its status then.
async fn long_poll(shared: &Shared, id: &str, timeout: Duration) -> Response {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let changed = shared.approval_changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let status = current_status(&shared.lock(), id);
        if !undecided(&status) {
            return Reply::json(wait_body(&status)).into_response();
        }
        tokio::select! {
            () = &mut changed => {}
            () = tokio::time::sleep_until(deadline) => {
                return Reply::json(wait_body(&status)).into_response();
            }
        }
    }
}
