//! The Apie guard service over HTTP (SPEC §5, APIE-WIRE §1.5–§1.7): identify, evaluate, the
//! approval long-poll, and events.
//!
//! One pooled keep-alive client serves every request, each with a hard deadline and the Bearer
//! key. [`Service::evaluate`] goes through the circuit breaker ([`breaker`]) and reads answers
//! tolerantly ([`verdict`]); every way it can go wrong is a [`Failure`], and what a failure does
//! to the call (`guardFailureMode`) is the relay's business. Events ([`events`]) are queued and
//! sent off the call path.

pub mod breaker;
pub mod events;
pub mod tls;
pub mod verdict;

use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::header::HeaderValue;
use reqwest::{Method, Url};
use serde_json::{Value, json};

use crate::approval::Status;
use crate::config::{ApiKey, GuardService};
use breaker::Breaker;
use events::{Event, Events, What};
use verdict::Verdict;

/// Longest single `/wait` long poll; the wait is repeated until the approval's deadline.
pub const LONG_POLL_MAX: Duration = Duration::from_secs(30);

/// What the proxy reports about itself.
pub const FRAMEWORK: &str = "apie-mcp";
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// How a request to the service failed (SPEC §5's failure classes).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Failure {
    #[error("cannot reach the guard service: {0}")]
    Connect(String),
    #[error("the guard service did not answer within {0} ms")]
    Timeout(u128),
    #[error("the guard service answered HTTP {status}{}", body_hint(.body))]
    Status { status: u16, body: String },
    #[error("the guard service's answer is not a JSON object: {0}")]
    BadBody(String),
    #[error("the guard service's answer has no usable decision: {0}")]
    UnknownDecision(String),
    #[error("the guard service is not asked: its circuit is open after repeated failures")]
    CircuitOpen,
}

fn body_hint(body: &str) -> String {
    if body.is_empty() {
        String::new()
    } else {
        format!(": {body}")
    }
}

impl Failure {
    /// The failure class, as in error `data.failure`.
    pub fn class(&self) -> &'static str {
        match self {
            Failure::Connect(_) => "connect",
            Failure::Timeout(_) => "timeout",
            Failure::Status { .. } => "http_status",
            Failure::BadBody(_) => "bad_body",
            Failure::UnknownDecision(_) => "unknown_decision",
            Failure::CircuitOpen => "circuit_open",
        }
    }

    pub fn http_status(&self) -> Option<u16> {
        match self {
            Failure::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// 401, 403 and 404 mean the key or the URL is wrong, not that the service is down; so
    /// does a redirect (never followed: the key is not sent on to another address).
    pub fn is_config_error(&self) -> bool {
        matches!(self.http_status(), Some(300..=399 | 401 | 403 | 404))
    }

    /// The audit outcome of a call this failure decided.
    pub fn outcome(&self) -> &'static str {
        match self {
            Failure::CircuitOpen => "circuit_open",
            _ => "guard_failed",
        }
    }
}

/// Where requests go and how: shared by the calls and the event sender.
#[derive(Clone)]
pub(crate) struct Endpoint {
    /// The client, or why it could not be built: each request then fails as a [`Failure::Connect`],
    /// which `guardFailureMode` decides like any other.
    http: Arc<Result<reqwest::Client, String>>,
    base: Url,
    /// `Authorization: Bearer <key>`, made once and marked sensitive (kept out of debug output).
    auth: HeaderValue,
    timeout: Duration,
}

impl Endpoint {
    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    async fn post(&self, path: &str, body: &Value, timeout: Duration) -> Result<Value, Failure> {
        let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        self.post_to(&self.url(&segments), body, timeout).await
    }

    /// POSTs JSON serialised straight from `body` to a ready-made URL.
    async fn post_to(
        &self,
        url: &Url,
        body: &impl serde::Serialize,
        timeout: Duration,
    ) -> Result<Value, Failure> {
        // An evaluate body is most of a kilobyte: one allocation, not a doubling series.
        let mut bytes = Vec::with_capacity(1024);
        serde_json::to_writer(&mut bytes, body).map_err(|e| Failure::BadBody(e.to_string()))?;
        self.send(Method::POST, url.clone(), Some(bytes.into()), timeout)
            .await
    }

    /// Sends one request (a JSON `body`, if any) and reads the JSON answer.
    async fn send(
        &self,
        method: Method,
        url: Url,
        body: Option<bytes::Bytes>,
        timeout: Duration,
    ) -> Result<Value, Failure> {
        let client = self
            .http
            .as_ref()
            .as_ref()
            .map_err(|e| Failure::Connect(format!("cannot build the HTTP client: {e}")))?;
        let mut request = client.request(method, url);
        if let Some(body) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body);
        }
        let transport = |e: reqwest::Error| {
            if e.is_timeout() {
                Failure::Timeout(timeout.as_millis())
            } else {
                Failure::Connect(error_chain(&e))
            }
        };
        let response = request
            .header(reqwest::header::AUTHORIZATION, self.auth.clone())
            .timeout(timeout)
            .send()
            .await
            .map_err(transport)?;
        let status = response.status();
        let body = response.bytes().await.map_err(transport)?;
        if !status.is_success() {
            let text = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
            return Err(Failure::Status {
                status: status.as_u16(),
                body: text,
            });
        }
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(Value::Null);
        }
        let value: Value =
            serde_json::from_slice(&body).map_err(|e| Failure::BadBody(e.to_string()))?;
        Ok(value)
    }
}

/// The one pooled keep-alive client of a session. Building it takes microseconds: the TLS roots
/// it may need are loaded apart ([`tls`]).
fn http_client(
    connect_timeout: Duration,
    roots: Arc<tls::Roots>,
) -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .user_agent(concat!("apie-mcp/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(connect_timeout)
        .pool_idle_timeout(Duration::from_secs(90))
        // A redirect is a failure (see `Failure::is_config_error`): the key is never sent on to
        // another address.
        .redirect(reqwest::redirect::Policy::none())
        .tls_backend_preconfigured(tls::client_config(roots))
        .build()
        .map_err(|e| error_chain(&e))
}

/// reqwest's own message names only the outermost error; the cause is further down.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Who the proxy is, in every request body and event.
#[derive(Debug, Clone)]
pub struct Identity {
    pub agent_key: String,
    pub server: String,
    pub agent_name: String,
    pub run_id: String,
    pub environment: Option<String>,
    pub mode: &'static str,
}

/// The guard service client of one session.
pub struct Service {
    endpoint: Endpoint,
    /// `POST /v1/guardrails/evaluate`, built once.
    evaluate_url: Url,
    breaker: Breaker,
    events: Option<Events>,
    identity: Identity,
    sequence: std::sync::atomic::AtomicU64,
}

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("guard.baseUrl {0:?} is not a URL")]
    BadUrl(String),
    #[error("the API key holds characters an HTTP header cannot carry")]
    BadKey,
}

impl Service {
    /// A client for `config`. Registers the agent and starts the event sender in the
    /// background, so call it inside the runtime.
    pub fn new(
        config: &GuardService,
        key: &ApiKey,
        identity: Identity,
    ) -> Result<Service, SetupError> {
        let base = Url::parse(&config.base_url)
            .map_err(|_| SetupError::BadUrl(config.base_url.clone()))?;
        let roots = tls::Roots::new(Arc::new(rustls::crypto::ring::default_provider()));
        if base.scheme() == "https" {
            let roots = roots.clone();
            tokio::task::spawn_blocking(move || roots.preload());
        }
        let http = Arc::new(http_client(config.timeout, roots));
        let mut auth =
            HeaderValue::try_from(format!("Bearer {}", key.0)).map_err(|_| SetupError::BadKey)?;
        auth.set_sensitive(true);
        let endpoint = Endpoint {
            http,
            base,
            auth,
            timeout: config.timeout,
        };
        // Identify goes first, in the background.
        tokio::spawn(identify(endpoint.clone(), identity.clone()));
        Ok(Service {
            evaluate_url: endpoint.url(&["v1", "guardrails", "evaluate"]),
            events: config
                .events
                .then(|| Events::start(endpoint.clone(), identity.clone())),
            breaker: Breaker::new(config.failure_threshold, config.cooldown),
            endpoint,
            identity,
            sequence: Default::default(),
        })
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// `POST /v1/guardrails/evaluate` through the circuit breaker.
    pub async fn evaluate(&self, body: &impl serde::Serialize) -> Result<Verdict, Failure> {
        let permit = self
            .breaker
            .admit(Instant::now())
            .ok_or(Failure::CircuitOpen)?;
        let result = self
            .endpoint
            .post_to(&self.evaluate_url, body, self.endpoint.timeout)
            .await
            .and_then(|value| {
                Verdict::parse(&value).map_err(|e| match e {
                    verdict::Unreadable::NotAnObject => Failure::BadBody(e.to_string()),
                    _ => Failure::UnknownDecision(e.to_string()),
                })
            });
        match &result {
            Ok(_) => permit.success(),
            Err(e) => {
                if e.is_config_error() {
                    tracing::error!(
                        "guard service configuration error (check the API key and guard.baseUrl): {e}"
                    );
                }
                if permit.failure(Instant::now()) {
                    tracing::error!("guard service circuit opened after repeated failures: {e}");
                }
            }
        }
        result
    }

    /// Waits for a service approval until `deadline`: long polls on `/wait`, or polls every
    /// `poll` where `/wait` is not supported. Returns [`Status::Timeout`] at the deadline.
    pub async fn wait_approval(&self, id: &str, deadline: Instant, poll: Duration) -> Status {
        let mut long_poll = true;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Status::Timeout;
            }
            let asked = Instant::now();
            if long_poll {
                let chunk = left.min(LONG_POLL_MAX);
                let mut url = self.endpoint.url(&["v1", "approvals", id, "wait"]);
                url.query_pairs_mut()
                    .append_pair("timeout", &chunk.as_millis().to_string());
                match self
                    .endpoint
                    .send(Method::GET, url, None, chunk + self.endpoint.timeout)
                    .await
                {
                    Ok(body) => {
                        if let Some(status) = approval_status(&body) {
                            return status;
                        }
                        // Still pending: ask again, but never in a tight loop.
                        if asked.elapsed() < chunk / 2 {
                            sleep_within(poll, deadline).await;
                        }
                    }
                    Err(Failure::Status {
                        status: 404 | 405 | 501,
                        ..
                    }) => {
                        tracing::debug!("the service has no /wait: polling approval {id}");
                        long_poll = false;
                    }
                    Err(e) => {
                        tracing::warn!("waiting on approval {id}: {e}");
                        sleep_within(poll, deadline).await;
                    }
                }
            } else {
                let url = self.endpoint.url(&["v1", "approvals", id]);
                match self
                    .endpoint
                    .send(Method::GET, url, None, self.endpoint.timeout)
                    .await
                {
                    Ok(body) => {
                        if let Some(status) = approval_status(&body) {
                            return status;
                        }
                    }
                    Err(e) => tracing::warn!("polling approval {id}: {e}"),
                }
                sleep_within(poll, deadline).await;
            }
        }
    }

    /// `POST /v1/approvals/{id}/cancel`, best effort.
    pub async fn cancel_approval(&self, id: &str) {
        let url = self.endpoint.url(&["v1", "approvals", id, "cancel"]);
        let body = Some(bytes::Bytes::from_static(b"{}"));
        if let Err(e) = self
            .endpoint
            .send(Method::POST, url, body, self.endpoint.timeout)
            .await
        {
            tracing::warn!("cancelling approval {id} failed: {e}");
        }
    }

    /// Whether events are sent (`guard.events`).
    pub fn takes_events(&self) -> bool {
        self.events.is_some()
    }

    /// Queues an event: what happened to `tool` (or to none), numbered and timed now.
    pub fn event(&self, tool: Option<&str>, what: What) {
        let Some(events) = &self.events else { return };
        let sequence = self
            .sequence
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        events.push(Event {
            what,
            tool: tool.map(str::to_owned),
            sequence,
            at: std::time::SystemTime::now(),
        });
    }

    /// Sends the events still queued (shutdown).
    pub async fn close(&self, within: Duration) {
        if let Some(events) = &self.events {
            events.close(within).await;
        }
    }
}

/// `POST /v1/agents/identify`; a failure is logged, never fatal.
async fn identify(endpoint: Endpoint, id: Identity) {
    let body = json!({
        "agent": {"key": id.agent_key, "name": id.agent_name},
        "runtime": {
            "environment": id.environment,
            "framework": FRAMEWORK,
            "language": "rust",
            "sdk_version": VERSION,
        },
        "mode": id.mode,
        "source": "mcp_proxy",
    });
    match endpoint
        .post("/v1/agents/identify", &body, endpoint.timeout)
        .await
    {
        Ok(_) => tracing::debug!("registered with the guard service"),
        Err(e) if e.is_config_error() => tracing::error!(
            "guard service configuration error (check the API key and guard.baseUrl): identify: {e}"
        ),
        Err(e) => tracing::warn!("identify failed: {e}"),
    }
}

async fn sleep_within(interval: Duration, deadline: Instant) {
    let left = deadline.saturating_duration_since(Instant::now());
    tokio::time::sleep(interval.min(left)).await;
}

/// The status in a `/wait` or `GET /v1/approvals/{id}` answer, if it is final.
pub fn approval_status(body: &Value) -> Option<Status> {
    let status = body
        .get("status")
        .or_else(|| body.get("approval").and_then(|a| a.get("status")))
        .and_then(Value::as_str)?;
    match status.trim().to_ascii_lowercase().as_str() {
        "approved" | "approve" | "allowed" | "allow" => Some(Status::Approved),
        "rejected" | "reject" | "denied" | "deny" | "declined" => Some(Status::Rejected),
        "expired" => Some(Status::Expired),
        "cancelled" | "canceled" => Some(Status::Cancelled),
        "timeout" | "timed_out" => Some(Status::Timeout),
        "pending" | "" => None,
        other => {
            tracing::debug!("approval status {other:?} read as still pending");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn approval_statuses_are_read_from_either_shape() {
        assert_eq!(
            approval_status(&json!({"status": "approved"})),
            Some(Status::Approved)
        );
        assert_eq!(
            approval_status(&json!({"approval": {"status": "Denied"}})),
            Some(Status::Rejected)
        );
        assert_eq!(
            approval_status(&json!({"status": "canceled"})),
            Some(Status::Cancelled)
        );
        assert_eq!(approval_status(&json!({"status": "pending"})), None);
        assert_eq!(approval_status(&json!({"approval": {}})), None);
        assert_eq!(approval_status(&json!({})), None);
    }

    #[test]
    fn failures_name_their_class_and_configuration_errors() {
        let status = |status| Failure::Status {
            status,
            body: String::new(),
        };
        assert!(status(401).is_config_error());
        assert!(status(404).is_config_error());
        assert!(!status(503).is_config_error());
        assert_eq!(status(429).class(), "http_status");
        assert_eq!(Failure::Timeout(5).class(), "timeout");
        assert_eq!(Failure::CircuitOpen.outcome(), "circuit_open");
        assert_eq!(Failure::Connect("x".into()).outcome(), "guard_failed");
    }
}
