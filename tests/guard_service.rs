//! The Apie guard service client end to end (issue #3; SPEC §5–§8, APIE-WIRE §1.5–§1.7, and
//! the behaviour contract): the real `apie-mcp` binary over real pipes in front of
//! `examples/example_server.rs`, with the guard service played by [`ApieServer`], a real HTTP
//! server inside the test.
//!
//! Every proxy here runs with an API key and `guard.baseUrl` pointing at its own fake service,
//! so the requests it makes can be counted and read. What the upstream really received is read
//! from `EXAMPLE_SERVER_LOG` ([`util::Scratch::server_calls`]); one test plays the upstream
//! itself behind `socket_bridge`, to send progress of its own.
//!
//! The server name is `files`, so the qualified names are `files.<tool>`. Without the service,
//! `add` and `echo` are medium risk (allowed by `riskDefaults`) and `deploy_service` is critical
//! (held for a human).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::util::apie::{
    self, ApieServer, EVALUATE, EVENTS, IDENTIFY, Reply, approval_path, cancel_path, wait_path,
};
use crate::util::tls::TlsFront;
use crate::util::{
    self, RawSession, assert_not_approved, finish, is_response, result_text, sorted_sha256,
};

const WAIT: Duration = util::DEFAULT_RECV_TIMEOUT;
/// The API key the proxies get in `APIE_API_KEY`.
const KEY: &str = "apie_test_key_3f9c2a";
const AGENT: &str = "guard-test-agent";
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The arguments of a `deploy_service` call.
fn prod() -> Value {
    json!({"service": "api", "environment": "production"})
}

// ---------------------------------------------------------------------------
// Fixture
// ---------------------------------------------------------------------------

/// One test's scratch directory (config, audit log, upstream call log, state directory) and its
/// fake Apie service.
struct Fixture {
    scratch: util::Scratch,
    apie: ApieServer,
}

impl std::ops::Deref for Fixture {
    type Target = util::Scratch;
    fn deref(&self) -> &util::Scratch {
        &self.scratch
    }
}

/// `base` with the top-level keys of `extra` added or replaced; `guard` is merged key by key,
/// and a `null` value removes the key.
fn merge(base: &mut Value, extra: Value) {
    let Value::Object(extra) = extra else {
        panic!("extra config must be an object")
    };
    for (key, value) in extra {
        match (key.as_str(), value) {
            ("guard", Value::Object(guard)) => {
                for (k, v) in guard {
                    if v.is_null() {
                        base["guard"].as_object_mut().unwrap().remove(&k);
                    } else {
                        base["guard"][k] = v;
                    }
                }
            }
            (_, Value::Null) => {
                base.as_object_mut().unwrap().remove(&key);
            }
            (_, value) => base[key] = value,
        }
    }
}

impl Fixture {
    async fn new() -> Fixture {
        Fixture {
            scratch: util::Scratch::new(),
            apie: ApieServer::start().await,
        }
    }

    /// An enforce-mode config in front of the example server (logging its calls), auditing to
    /// the scratch directory, with the guard service at this fixture's fake (2 s request
    /// timeout, a circuit breaker that does not trip unless a test says so); `extra` is merged
    /// in (see [`merge`]).
    fn config(&self, extra: Value) -> PathBuf {
        self.config_at(&self.apie.url(), extra)
    }

    /// [`Self::config`] with the guard service at `base_url`.
    fn config_at(&self, base_url: &str, extra: Value) -> PathBuf {
        let mut config = json!({
            "agentKey": AGENT,
            "serverName": "files",
            "mode": "enforce",
            "upstream": {
                "command": util::example_server_bin(),
                "env": {"EXAMPLE_SERVER_LOG": self.server_log()},
            },
            "audit": {"path": self.audit_path()},
            "guard": {
                "baseUrl": base_url,
                "timeoutMs": 2000,
                "circuitBreaker": {"failureThreshold": 1000},
            },
        });
        merge(&mut config, extra);
        util::write_config(self.path(), config)
    }

    /// A proxy with [`KEY`] through the legacy handshake (no client capabilities).
    async fn start_with(&self, config: &Path, args: &[&str]) -> RawSession {
        let mut proxy = self
            .proxy_builder(config)
            .args(args)
            .env("APIE_API_KEY", KEY)
            .spawn();
        proxy.initialize_legacy(json!({})).await;
        proxy
    }

    /// [`Self::config`] with `extra`, then [`Self::start_with`].
    async fn start(&self, extra: Value) -> RawSession {
        let config = self.config(extra);
        self.start_with(&config, &[]).await
    }

    /// Asserts the service was never asked about an approval (no `/v1/approvals…` request).
    fn assert_no_approval_requests(&self) {
        assert!(
            self.apie
                .all_requests()
                .iter()
                .all(|r| !r.path.starts_with("/v1/approvals")),
            "the service was asked about an approval: {:?}",
            self.apie.summary()
        );
    }

    /// The evaluate request bodies received so far.
    fn evaluations(&self) -> Vec<Value> {
        self.apie
            .requests(EVALUATE)
            .iter()
            .map(apie::Recorded::json)
            .collect()
    }
}

/// How many stderr lines of the proxy say "configuration error".
fn configuration_errors(proxy: &RawSession) -> usize {
    proxy
        .stderr_text()
        .lines()
        .filter(|l| l.contains("configuration error"))
        .count()
}

/// How many stderr lines of the proxy are warnings or errors.
fn warnings(proxy: &RawSession) -> usize {
    proxy
        .stderr_text()
        .lines()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            l.contains("warn") || l.contains("error")
        })
        .count()
}

/// Waits (bounded) until the proxy has written at least `n` warning or error lines.
async fn warnings_eventually(proxy: &RawSession, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(3);
    while warnings(proxy) < n {
        assert!(
            Instant::now() < deadline,
            "expected {n} warning lines on stderr:\n{}",
            proxy.stderr_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits (bounded) until `n` stderr lines of the proxy say "configuration error".
async fn configuration_errors_eventually(proxy: &RawSession, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(3);
    while configuration_errors(proxy) < n {
        assert!(
            Instant::now() < deadline,
            "expected {n} \"configuration error\" lines on stderr:\n{}",
            proxy.stderr_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Asserts the -32001 block answer for `tool`; returns `error.data`.
fn assert_blocked(response: &Value, tool: &str) -> Value {
    let error = &response["error"];
    assert_eq!(error["code"], -32001, "{response}");
    assert_eq!(
        error["message"], "Action blocked by Apie guardrail",
        "{response}"
    );
    let data = &error["data"];
    assert_eq!(data["kind"], "guard_blocked", "{response}");
    assert_eq!(data["tool"], tool, "{response}");
    data.clone()
}

/// Asserts the answer of a guard failure under `failure_mode` (`fail_closed` or `throw`) for
/// `tool`: code, message, `data.kind` and `data.failure`; returns `error.data`.
fn assert_unavailable(response: &Value, failure_mode: &str, failure: &str, tool: &str) -> Value {
    let error = &response["error"];
    let (code, message) = match failure_mode {
        "fail_closed" => (-32001, "Action blocked: guard service unavailable"),
        "throw" => (-32003, "Guard service unavailable"),
        other => panic!("{other} never refuses"),
    };
    assert_eq!(error["code"], code, "{failure_mode}/{failure}: {response}");
    assert_eq!(
        error["message"], message,
        "{failure_mode}/{failure}: {response}"
    );
    let data = &error["data"];
    assert_eq!(
        data["kind"], "guard_unavailable",
        "{failure_mode}/{failure}: {response}"
    );
    assert_eq!(
        data["failure"], failure,
        "{failure_mode}/{failure}: {response}"
    );
    assert_eq!(data["tool"], tool, "{failure_mode}/{failure}: {response}");
    assert!(
        data.as_object().is_some_and(|d| d.contains_key("rule")) && data["rule"].is_null(),
        "{failure_mode}/{failure}: data.rule must be null: {response}"
    );
    assert!(
        data["reason"].as_str().is_some_and(|r| !r.is_empty()),
        "{failure_mode}/{failure}: data.reason: {response}"
    );
    data.clone()
}

/// A legacy `deploy_service` call with [`prod`] that asks for progress under `token`.
fn deploy_with_progress(id: &str, token: &str) -> Value {
    util::request(
        id,
        "tools/call",
        json!({
            "name": "deploy_service",
            "arguments": prod(),
            "_meta": {"progressToken": token},
        }),
    )
}

/// Asserts `request` to the service carries [`KEY`] as its bearer token and a JSON body.
fn assert_keyed_json(request: &apie::Recorded) {
    assert_eq!(
        request.header("authorization"),
        Some(format!("Bearer {KEY}").as_str()),
        "{request:?}"
    );
    assert!(
        request
            .header("content-type")
            .is_some_and(|t| t.starts_with("application/json")),
        "{request:?}"
    );
}

/// Sends a `deploy_service` call that the service holds on `approval`; returns once the proxy
/// long-polls for it, with the `/wait` requests so far.
async fn held_on_the_service(
    fx: &Fixture,
    proxy: &mut RawSession,
    id: &str,
    approval: &str,
) -> Vec<apie::Recorded> {
    fx.apie.script_evaluate(Reply::require_approval(approval));
    proxy
        .send(&util::legacy_call(id, "deploy_service", prod()))
        .await;
    fx.apie.wait_for(&wait_path(approval), 1).await
}

/// The response (by id) once it arrives, asserting that `other` has not been answered first.
async fn recv_before(proxy: &mut RawSession, id: &str, other: &str) -> Value {
    let response = proxy.recv_until_id(id).await;
    assert!(
        !proxy
            .stashed()
            .iter()
            .any(|m| is_response(m) && m["id"] == other),
        "{other} was answered before {id}: {:?}",
        proxy.stashed()
    );
    response
}

// ---------------------------------------------------------------------------
// When the service is used at all; identify
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identify_is_sent_once_at_start_with_the_bearer_key() {
    let fx = Fixture::new().await;
    let mut proxy = fx
        .start(json!({"agentName": "Guard Test Agent", "environment": "staging"}))
        .await;

    let identify = fx.apie.wait_for(IDENTIFY, 1).await;
    let request = &identify[0];
    assert_eq!(request.method, "POST");
    assert_keyed_json(request);
    assert_eq!(
        request.json(),
        json!({
            "agent": {"key": AGENT, "name": "Guard Test Agent"},
            "runtime": {
                "environment": "staging",
                "framework": "apie-mcp",
                "language": "rust",
                "sdk_version": VERSION,
            },
            "mode": "enforce",
            "source": "mcp_proxy",
        })
    );

    let echoed = proxy.call_tool(1, "echo", json!({"text": "hi"})).await;
    assert_eq!(result_text(&echoed), "hi", "{echoed}");
    assert_keyed_json(&fx.apie.requests(EVALUATE)[0]);
    assert_eq!(finish(proxy).await.code(), Some(0));
    assert_eq!(fx.apie.count(IDENTIFY), 1, "{:?}", fx.apie.summary());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_api_key_env_names_the_key() {
    let fx = Fixture::new().await;
    let config = fx.config(json!({"mode": "monitor", "guard": {"apiKeyEnv": "ACME_APIE_TOKEN"}}));
    let mut proxy = fx
        .proxy_builder(&config)
        .env("ACME_APIE_TOKEN", "sk_custom_1")
        .env("APIE_API_KEY", "sk_not_this_one")
        .spawn();
    proxy.initialize_legacy(json!({})).await;

    let identify = fx.apie.wait_for(IDENTIFY, 1).await;
    assert_eq!(
        identify[0].header("authorization"),
        Some("Bearer sk_custom_1"),
        "{:?}",
        identify[0]
    );
    // No agentName: the key names the agent; no environment: null.
    assert_eq!(
        identify[0].json(),
        json!({
            "agent": {"key": AGENT, "name": AGENT},
            "runtime": {
                "environment": null,
                "framework": "apie-mcp",
                "language": "rust",
                "sdk_version": VERSION,
            },
            "mode": "monitor",
            "source": "mcp_proxy",
        })
    );
    let echoed = proxy.call_tool(1, "echo", json!({"text": "hi"})).await;
    assert_eq!(result_text(&echoed), "hi", "{echoed}");
    for request in fx.apie.all_requests() {
        assert_eq!(
            request.header("authorization"),
            Some("Bearer sk_custom_1"),
            "{request:?}"
        );
    }
    assert_eq!(fx.evaluations()[0]["mode"], "monitor");
    assert_eq!(finish(proxy).await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_key_the_service_is_never_used() {
    let fx = Fixture::new().await;
    // Were the service asked, every call would be blocked.
    fx.apie.set_evaluate_default(Reply::decision("block"));
    let cases: [(&str, Option<&str>, Value); 3] = [
        ("no APIE_API_KEY", None, json!({})),
        ("an empty APIE_API_KEY", Some(""), json!({})),
        (
            "APIE_API_KEY set but guard.apiKeyEnv names another variable",
            Some(KEY),
            json!({"guard": {"apiKeyEnv": "ACME_APIE_TOKEN"}}),
        ),
    ];
    for (i, (case, key, extra)) in cases.into_iter().enumerate() {
        let config = fx.config(extra);
        let mut builder = fx.proxy_builder(&config);
        if let Some(key) = key {
            builder = builder.env("APIE_API_KEY", key);
        }
        let mut proxy = builder.spawn();
        proxy.initialize_legacy(json!({})).await;
        let id = i as i64 + 1;
        let added = proxy.call_tool(id, "add", json!({"a": 1, "b": 2})).await;
        assert_eq!(result_text(&added), "3", "{case}: {added}");
        let line = fx.audit_of(id).await;
        assert_eq!(line["outcome"], "forwarded", "{case}: {line}");
        assert_eq!(line["decision"], "allow", "{case}: {line}");
        assert_eq!(finish(proxy).await.code(), Some(0), "{case}");
    }
    assert!(
        fx.apie.all_requests().is_empty(),
        "the service was called: {:?}",
        fx.apie.summary()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mode_off_never_calls_the_service() {
    let fx = Fixture::new().await;
    fx.apie.set_evaluate_default(Reply::decision("block"));
    let mut proxy = fx.start(json!({"mode": "off"})).await;
    let listed = proxy.request(1, "tools/list", Value::Null).await;
    assert!(listed["result"]["tools"].is_array(), "{listed}");
    let deployed = proxy.call_tool(2, "deploy_service", prod()).await;
    assert_eq!(result_text(&deployed), "deployed api to production");
    let added = proxy.call_tool(3, "add", json!({"a": 1, "b": 2})).await;
    assert_eq!(result_text(&added), "3");
    assert_eq!(finish(proxy).await.code(), Some(0));
    assert_eq!(fx.server_tools(), ["deploy_service", "add"]);
    // Not even identify or events, at start or at shutdown.
    assert!(
        fx.apie.all_requests().is_empty(),
        "mode off called the service: {:?}",
        fx.apie.summary()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apie_base_url_is_used_when_the_config_has_none() {
    let fx = Fixture::new().await;
    fx.apie.set_evaluate_default(Reply::decision("block"));
    let config = fx.config(json!({"guard": {"baseUrl": null}}));
    let mut proxy = fx
        .proxy_builder(&config)
        .env("APIE_API_KEY", KEY)
        // A trailing slash is harmless.
        .env("APIE_BASE_URL", format!("{}/", fx.apie.url()))
        .spawn();
    proxy.initialize_legacy(json!({})).await;
    let response = proxy.call_tool(1, "add", json!({"a": 1, "b": 2})).await;
    assert_blocked(&response, "add");
    assert_eq!(fx.apie.count(EVALUATE), 1, "{:?}", fx.apie.summary());
    assert_eq!(finish(proxy).await.code(), Some(0));
    assert!(fx.server_tools().is_empty());
}

/// A proxy with [`KEY`] whose only trusted roots are read from `roots` (`SSL_CERT_FILE`, as the
/// system's OpenSSL and rustls-native-certs read it; no `SSL_CERT_DIR`).
async fn start_with_roots(fx: &Fixture, config: &Path, roots: &Path) -> RawSession {
    let mut proxy = fx
        .proxy_builder(config)
        .env("APIE_API_KEY", KEY)
        .env("SSL_CERT_FILE", roots)
        .env_remove("SSL_CERT_DIR")
        .spawn();
    proxy.initialize_legacy(json!({})).await;
    proxy
}

/// [`start_with_roots`] trusting only the CA in `ca_pem`.
async fn start_trusting(fx: &Fixture, config: &Path, ca_pem: &str) -> RawSession {
    let roots = fx.path().join("roots.pem");
    std::fs::write(&roots, ca_pem).expect("write the trusted roots");
    start_with_roots(fx, config, &roots).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_service_is_trusted_through_the_system_roots() {
    let fx = Fixture::new().await;
    fx.apie.set_evaluate_default(Reply::decision("block"));
    let front = TlsFront::start(fx.apie.addr()).await;
    let config = fx.config_at(&front.url(), json!({}));
    let mut proxy = start_trusting(&fx, &config, front.ca_pem()).await;
    let response = proxy.call_tool(1, "add", json!({"a": 1, "b": 2})).await;
    assert_blocked(&response, "add");
    assert_eq!(fx.apie.count(EVALUATE), 1, "{:?}", fx.apie.summary());
    fx.apie.wait_for(IDENTIFY, 1).await;
    assert_eq!(finish(proxy).await.code(), Some(0));
    assert!(fx.server_tools().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_service_the_system_does_not_trust_is_never_sent_the_call() {
    let fx = Fixture::new().await;
    let front = TlsFront::start(fx.apie.addr()).await;
    let stranger = TlsFront::start(fx.apie.addr()).await;
    let config = fx.config_at(
        &front.url(),
        json!({"guardFailureMode": "fail_closed", "guard": {"events": false}}),
    );
    let mut proxy = start_trusting(&fx, &config, stranger.ca_pem()).await;
    let response = proxy.call_tool(1, "add", json!({"a": 1, "b": 2})).await;
    assert_unavailable(&response, "fail_closed", "connect", "add");
    assert!(
        proxy.stderr_text().contains("UnknownIssuer"),
        "the log names the certificate's fault:\n{}",
        proxy.stderr_text()
    );
    assert!(
        fx.apie.all_requests().is_empty(),
        "a request reached the service past an untrusted certificate: {:?}",
        fx.apie.summary()
    );
    assert_eq!(finish(proxy).await.code(), Some(0));
    assert!(fx.server_tools().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_http_service_never_loads_the_tls_roots() {
    let fx = Fixture::new().await;
    let config = fx.config(json!({}));
    let missing = fx.path().join("no-such-roots.pem");
    let mut proxy = start_with_roots(&fx, &config, &missing).await;
    let response = proxy.call_tool(1, "add", json!({"a": 1, "b": 2})).await;
    assert_eq!(result_text(&response), "3", "{response}");
    assert_eq!(fx.apie.count(EVALUATE), 1, "{:?}", fx.apie.summary());
    fx.apie.wait_for(IDENTIFY, 1).await;
    // Loading them would have logged the missing file (as the HTTPS case below shows).
    assert!(
        !proxy.stderr_text().contains("no-such-roots.pem") && warnings(&proxy) == 0,
        "{}",
        proxy.stderr_text()
    );
    assert_eq!(finish(proxy).await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_service_without_system_roots_is_a_connect_failure() {
    let fx = Fixture::new().await;
    let front = TlsFront::start(fx.apie.addr()).await;
    let config = fx.config_at(
        &front.url(),
        json!({"guardFailureMode": "fail_closed", "guard": {"events": false}}),
    );
    let missing = fx.path().join("no-such-roots.pem");
    let mut proxy = start_with_roots(&fx, &config, &missing).await;
    let response = proxy.call_tool(1, "add", json!({"a": 1, "b": 2})).await;
    assert_unavailable(&response, "fail_closed", "connect", "add");
    assert!(
        proxy.stderr_text().contains("no-such-roots.pem"),
        "the log names the missing roots:\n{}",
        proxy.stderr_text()
    );
    assert!(fx.apie.all_requests().is_empty(), "{:?}", fx.apie.summary());
    assert_eq!(finish(proxy).await.code(), Some(0));
    assert!(fx.server_tools().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_failing_identify_never_delays_traffic() {
    let fx = Fixture::new().await;
    fx.apie
        .set_identify_reply(Reply::status(500, json!({"error": "down"})).delayed(1000));
    let mut proxy = fx.start(json!({"guard": {"timeoutMs": 2000}})).await;
    let identify = fx.apie.wait_for(IDENTIFY, 1).await[0].clone();
    let echoed = proxy.call_tool(1, "echo", json!({"text": "now"})).await;
    let answered = Instant::now();
    assert_eq!(result_text(&echoed), "now", "{echoed}");
    assert!(
        answered < identify.at + Duration::from_millis(900),
        "the call was answered {:?} after identify started: it waited for identify",
        answered - identify.at
    );
    assert_eq!(fx.apie.count(EVALUATE), 1);
    // Identify failed (500 after 1 s): only logged, the session goes on.
    let after_failure = identify.at + Duration::from_millis(1150);
    tokio::time::sleep(after_failure.saturating_duration_since(Instant::now())).await;
    let added = proxy.call_tool(2, "add", json!({"a": 2, "b": 2})).await;
    assert_eq!(result_text(&added), "4", "{added}");
    assert_eq!(finish(proxy).await.code(), Some(0));
}

// ---------------------------------------------------------------------------
// The evaluate request
// ---------------------------------------------------------------------------

/// Arguments with secrets under the default `redactKeys`, at the top, nested and in arrays.
fn secret_laden() -> Value {
    json!({
        "service": "api",
        "environment": "production",
        "api_token": "tok-live-1",
        "Authorization": "Bearer upstream-secret",
        "options": {"dryRun": false, "DB_PASSWORD": "hunter2", "retries": 3},
        "targets": [
            {"host": "a", "clientSecret": "s3cr3t-a"},
            {"host": "b", "credentials": {"user": "u", "pass": "p4ss-b"}},
            {"host": "c", "apiKeyId": "key-c", "labels": ["x"]},
        ],
        "secrets": ["sec-1", "sec-2"],
        "note": "ship it",
    })
}

/// [`secret_laden`] as the service must see it.
fn secret_laden_redacted() -> Value {
    json!({
        "service": "api",
        "environment": "production",
        "api_token": "[REDACTED]",
        "Authorization": "[REDACTED]",
        "options": {"dryRun": false, "DB_PASSWORD": "[REDACTED]", "retries": 3},
        "targets": [
            {"host": "a", "clientSecret": "[REDACTED]"},
            {"host": "b", "credentials": "[REDACTED]"},
            {"host": "c", "apiKeyId": "[REDACTED]", "labels": ["x"]},
        ],
        "secrets": "[REDACTED]",
        "note": "ship it",
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evaluate_body_follows_the_contract() {
    let fx = Fixture::new().await;
    let config = fx.config(json!({
        "environment": "production",
        "tools": {"refund": {
            "riskLevel": "low",
            "provider": "stripe",
            "action": {"type": "refund", "name": "stripe.refund"},
            "resource": {"type": "charge", "environment": "test", "externalId": "ch_42"},
        }},
    }));
    let mut proxy = fx
        .start_with(&config, &["--run-id", "run_guard_body"])
        .await;

    // 1: inferred metadata, a string id, secrets everywhere.
    let deployed = proxy
        .call_tool("call-1", "deploy_service", secret_laden())
        .await;
    assert_eq!(
        result_text(&deployed),
        "deployed api to production",
        "{deployed}"
    );
    let bodies = fx.evaluations();
    assert_eq!(bodies.len(), 1, "{bodies:?}");
    assert_eq!(
        bodies[0],
        json!({
            "agent_key": AGENT,
            "run_id": "run_guard_body",
            "mode": "enforce",
            "risk_level": "critical",
            "action": {"type": "execute", "name": "files.deploy_service"},
            "resource": {
                "type": "deployment_event",
                "provider": "files",
                "environment": "production",
                "external_id": null,
            },
            "tool": {"name": "files.deploy_service", "provider": "mcp", "riskLevel": "critical"},
            "metadata": {
                "capture_source": "mcp_proxy",
                "mcp": {
                    "server": "files",
                    "tool": "deploy_service",
                    "arguments": secret_laden_redacted(),
                },
            },
            "request_id": "call-1",
            "arguments_hash": sorted_sha256(&secret_laden()),
            "runtime": {
                "framework": "apie-mcp",
                "language": "rust",
                "sdk_version": VERSION,
                "environment": "production",
            },
        })
    );
    // The upstream gets the real arguments; the audit's digest is the service's hash.
    assert_eq!(
        fx.server_calls(),
        [("deploy_service".to_owned(), secret_laden())]
    );
    let line = fx.audit_of("call-1").await;
    assert_eq!(
        line["argumentsSha256"], bodies[0]["arguments_hash"],
        "{line}"
    );

    // 2: an integer id, default metadata.
    let added = proxy
        .call_tool(42, "add", json!({"a": 1, "b": 2, "token": "tok-add-9"}))
        .await;
    assert_eq!(result_text(&added), "3", "{added}");
    let body = &fx.evaluations()[1];
    assert_eq!(body["request_id"], json!(42), "{body}");
    assert_eq!(body["risk_level"], "medium", "{body}");
    assert_eq!(
        body["action"],
        json!({"type": "execute", "name": "files.add"})
    );
    assert_eq!(body["resource"]["type"], "internal_api", "{body}");
    assert_eq!(
        body["tool"],
        json!({"name": "files.add", "provider": "mcp", "riskLevel": "medium"})
    );
    assert_eq!(
        body["metadata"]["mcp"]["arguments"],
        json!({"a": 1, "b": 2, "token": "[REDACTED]"})
    );
    assert_eq!(
        body["arguments_hash"],
        sorted_sha256(&json!({"a": 1, "b": 2, "token": "tok-add-9"}))
    );

    // 3: declared metadata wins.
    let refunded = proxy
        .call_tool(
            "call-3",
            "refund",
            json!({"amount": 5, "charge_id": "ch_42"}),
        )
        .await;
    assert_eq!(result_text(&refunded), "refunded 5", "{refunded}");
    let body = &fx.evaluations()[2];
    assert_eq!(body["risk_level"], "low", "{body}");
    assert_eq!(
        body["action"],
        json!({"type": "refund", "name": "stripe.refund"})
    );
    assert_eq!(body["resource"]["type"], "charge", "{body}");
    assert_eq!(body["resource"]["environment"], "test", "{body}");
    assert_eq!(body["resource"]["external_id"], "ch_42", "{body}");
    assert_eq!(
        body["tool"],
        json!({"name": "files.refund", "provider": "stripe", "riskLevel": "low"})
    );
    assert_eq!(body["metadata"]["mcp"]["tool"], "refund", "{body}");

    assert_eq!(finish(proxy).await.code(), Some(0));
    // No secret ever left the proxy (evaluate, identify, events at shutdown).
    for request in fx.apie.all_requests() {
        for secret in [
            "tok-live-1",
            "upstream-secret",
            "hunter2",
            "s3cr3t-a",
            "p4ss-b",
            "key-c",
            "sec-1",
            "tok-add-9",
        ] {
            assert!(
                !request.body.contains(secret),
                "{secret} sent to {}: {}",
                request.path,
                request.body
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_redact_keys_replace_the_defaults() {
    let fx = Fixture::new().await;
    let mut proxy = fx.start(json!({"redactKeys": ["ssn", "Card"]})).await;
    let arguments = json!({
        "text": "hello",
        "token": "visible-token",
        "SSN": "123-45-6789",
        "payment": {"card_number": "4111111111111111", "cvc": "123"},
        "people": [
            {"name": "x", "ssn_last4": "6789"},
            [{"CARD": "5500000000000004", "kind": "debit"}],
        ],
    });
    let echoed = proxy.call_tool(1, "echo", arguments.clone()).await;
    assert_eq!(result_text(&echoed), "hello", "{echoed}");
    let body = &fx.evaluations()[0];
    assert_eq!(
        body["metadata"]["mcp"]["arguments"],
        json!({
            "text": "hello",
            "token": "visible-token",
            "SSN": "[REDACTED]",
            "payment": {"card_number": "[REDACTED]", "cvc": "123"},
            "people": [
                {"name": "x", "ssn_last4": "[REDACTED]"},
                [{"CARD": "[REDACTED]", "kind": "debit"}],
            ],
        }),
        "{body}"
    );
    assert_eq!(body["arguments_hash"], sorted_sha256(&arguments), "{body}");
    assert_eq!(fx.server_calls(), [("echo".to_owned(), arguments)]);
    assert_eq!(finish(proxy).await.code(), Some(0));
}

// ---------------------------------------------------------------------------
// Decisions × modes
// ---------------------------------------------------------------------------

/// Every spelling the service may use, with the decision it means.
const SPELLINGS: &[(&str, &str)] = &[
    ("allow", "allow"),
    ("allowed", "allow"),
    ("approve", "allow"),
    ("auto_approve", "allow"),
    ("permit", "allow"),
    ("proceed", "allow"),
    ("Allow", "allow"),
    ("warn", "warn"),
    ("notify", "warn"),
    ("watch", "warn"),
    ("log", "warn"),
    ("log_only", "warn"),
    ("NOTIFY", "warn"),
    ("block", "block"),
    ("deny", "block"),
    ("denied", "block"),
    ("forbid", "block"),
    ("auto_deny", "block"),
    ("DENY", "block"),
    ("require_approval", "require_approval"),
    ("requires_review", "require_approval"),
    ("ask", "require_approval"),
    ("escalate", "require_approval"),
    ("route_to_human", "require_approval"),
    ("wait_for_approval", "require_approval"),
    ("hold", "require_approval"),
    ("Requires_Review", "require_approval"),
];

/// The service's answer for spelling number `i`.
fn service_says(i: usize, spelling: &str) -> Reply {
    Reply::json(json!({
        "policy_decision": spelling,
        "reason": format!("the service says {spelling}"),
        "decision_id": format!("dec_{i}"),
        "matched_guardrails": [{"key": "gr-spelling"}, {"key": "gr-second"}],
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_decision_spelling_in_enforce_mode() {
    let fx = Fixture::new().await;
    // The guard channel alone and no approval id: require_approval is refused at once.
    let mut proxy = fx
        .start(json!({"approvals": {"channels": ["guard"]}}))
        .await;
    let mut forwarded = Vec::new();
    for (i, (spelling, decision)) in SPELLINGS.iter().enumerate() {
        fx.apie.script_evaluate(service_says(i, spelling));
        let id = i as i64 + 1;
        let arguments = json!({"a": id, "b": 1});
        let response = proxy.call_tool(id, "add", arguments.clone()).await;
        let cell = format!("enforce × {spelling}");
        let line = fx.audit_of(id).await;
        assert_eq!(line["decision"], *decision, "{cell}: {line}");
        assert_eq!(line["guardrail"], "gr-spelling", "{cell}: {line}");
        match *decision {
            "allow" | "warn" => {
                assert_eq!(
                    result_text(&response),
                    (id + 1).to_string(),
                    "{cell}: {response}"
                );
                assert_eq!(line["outcome"], "forwarded", "{cell}: {line}");
                assert_eq!(
                    line["reason"],
                    format!("the service says {spelling}"),
                    "{cell}: {line}"
                );
                forwarded.push(("add".to_owned(), arguments));
            }
            "block" => {
                let data = assert_blocked(&response, "add");
                assert_eq!(
                    data["reason"],
                    format!("the service says {spelling}"),
                    "{cell}: {response}"
                );
                assert_eq!(
                    data["decision_id"],
                    format!("dec_{i}"),
                    "{cell}: {response}"
                );
                assert_eq!(data["policy_decision"], "block", "{cell}: {response}");
                assert_eq!(data["effective_decision"], "block", "{cell}: {response}");
                assert_eq!(
                    data["matched_guardrail"], "gr-spelling",
                    "{cell}: {response}"
                );
                assert!(data["rule"].is_null(), "{cell}: {response}");
                assert_eq!(line["outcome"], "blocked", "{cell}: {line}");
                assert_eq!(
                    line["reason"],
                    format!("the service says {spelling}"),
                    "{cell}: {line}"
                );
            }
            _ => {
                let data = assert_not_approved(&response, "approval_denied", "rejected");
                assert!(
                    data["reason"]
                        .as_str()
                        .is_some_and(|r| r.contains("no approval channel is available")),
                    "{cell}: {response}"
                );
                assert_eq!(data["tool"], "add", "{cell}: {response}");
                assert_eq!(line["outcome"], "denied", "{cell}: {line}");
            }
        }
        assert_eq!(
            fx.apie.count(EVALUATE),
            i + 1,
            "{cell}: one request per call"
        );
    }
    assert_eq!(finish(proxy).await.code(), Some(0));
    assert_eq!(fx.server_calls(), forwarded);
    fx.assert_no_approval_requests();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_decision_spelling_in_monitor_mode_forwards() {
    let fx = Fixture::new().await;
    let mut proxy = fx.start(json!({"mode": "monitor"})).await;
    let mut forwarded = Vec::new();
    for (i, (spelling, decision)) in SPELLINGS.iter().enumerate() {
        // Even with an approval id, monitor mode never waits on an approval.
        let mut reply = service_says(i, spelling);
        if let apie::ReplyBody::Json(body) = &mut reply.body {
            body["approval_request"] = json!({"id": format!("apr_monitor_{i}")});
        }
        fx.apie.script_evaluate(reply);
        let id = i as i64 + 1;
        let arguments = json!({"a": id, "b": 1});
        let response = proxy.call_tool(id, "add", arguments.clone()).await;
        let cell = format!("monitor × {spelling}");
        assert_eq!(
            result_text(&response),
            (id + 1).to_string(),
            "{cell}: {response}"
        );
        forwarded.push(("add".to_owned(), arguments));
        let line = fx.audit_of(id).await;
        let outcome = match *decision {
            "allow" | "warn" => "forwarded",
            "block" => "would_block",
            _ => "would_require_approval",
        };
        assert_eq!(line["outcome"], outcome, "{cell}: {line}");
        assert_eq!(line["decision"], *decision, "{cell}: {line}");
        assert_eq!(line["mode"], "monitor", "{cell}: {line}");
        assert!(
            line.get("approvalId").is_none_or(Value::is_null),
            "{cell}: {line}"
        );
    }
    assert!(fx.evaluations().iter().all(|b| b["mode"] == "monitor"));
    assert_eq!(finish(proxy).await.code(), Some(0));
    assert_eq!(fx.server_calls(), forwarded);
    fx.assert_no_approval_requests();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_answer_carries_the_service_fields() {
    let fx = Fixture::new().await;
    fx.apie.script_evaluate(Reply::json(json!({
        "policy_decision": "block",
        "effective_decision": "block",
        "enforcement_action": "block",
        "mode": "enforce",
        "reason": "prod deploys are frozen",
        "decision_id": "dec_77",
        "receipt_id": "rcpt_1",
        "matched_guardrails": [{"key": "prod-deploys"}, {"key": "other"}],
    })));
    let mut proxy = fx.start(json!({})).await;
    let response = proxy.call_tool("b", "deploy_service", prod()).await;
    let data = assert_blocked(&response, "deploy_service");
    for (field, value) in [
        ("reason", json!("prod deploys are frozen")),
        ("decision_id", json!("dec_77")),
        ("policy_decision", json!("block")),
        ("effective_decision", json!("block")),
        ("enforcement_action", json!("block")),
        ("mode", json!("enforce")),
        ("matched_guardrail", json!("prod-deploys")),
        ("rule", Value::Null),
        ("tool", json!("deploy_service")),
    ] {
        assert_eq!(data.get(field), Some(&value), "data.{field} in {response}");
    }
    let line = fx.audit_of("b").await;
    assert_eq!(line["outcome"], "blocked", "{line}");
    assert_eq!(line["decision"], "block", "{line}");
    assert_eq!(line["guardrail"], "prod-deploys", "{line}");
    assert_eq!(line["reason"], "prod deploys are frozen", "{line}");
    assert_eq!(finish(proxy).await.code(), Some(0));
    assert!(fx.server_tools().is_empty(), "{:?}", fx.server_tools());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn effective_decision_and_the_old_form_in_enforce_mode() {
    let fx = Fixture::new().await;
    let mut proxy = fx
        .start(json!({
            "guardFailureMode": "fail_closed",
            "approvals": {"channels": ["guard"]},
        }))
        .await;

    // The effective decision is enforced.
    fx.apie.script_evaluate(Reply::json(
        json!({"policy_decision": "block", "effective_decision": "allow", "reason": "override"}),
    ));
    let response = proxy.call_tool(1, "add", json!({"a": 1, "b": 1})).await;
    assert_eq!(result_text(&response), "2", "{response}");
    let line = fx.audit_of(1).await;
    assert_eq!(line["outcome"], "forwarded", "{line}");
    assert_eq!(
        line["decision"], "block",
        "the audit keeps the policy decision: {line}"
    );

    fx.apie.script_evaluate(Reply::json(
        json!({"policy_decision": "allow", "effective_decision": "deny", "reason": "effective"}),
    ));
    let response = proxy.call_tool(2, "add", json!({"a": 2, "b": 1})).await;
    let data = assert_blocked(&response, "add");
    assert_eq!(data["policy_decision"], "allow", "{response}");
    assert_eq!(data["effective_decision"], "block", "{response}");
    assert_eq!(data["reason"], "effective", "{response}");
    assert_eq!(fx.audit_of(2).await["outcome"], "blocked");

    fx.apie.script_evaluate(Reply::json(
        json!({"policy_decision": "allow", "effective_decision": "Route_To_Human"}),
    ));
    let response = proxy.call_tool(3, "add", json!({"a": 3, "b": 1})).await;
    assert_not_approved(&response, "approval_denied", "rejected");

    // An effective decision nobody knows is a guard failure.
    fx.apie.script_evaluate(Reply::json(
        json!({"policy_decision": "allow", "effective_decision": "sometimes"}),
    ));
    let response = proxy.call_tool(4, "add", json!({"a": 4, "b": 1})).await;
    assert_unavailable(&response, "fail_closed", "unknown_decision", "add");
    assert_eq!(fx.audit_of(4).await["outcome"], "guard_failed");

    // The older `{decision}`-only form.
    fx.apie.script_evaluate(Reply::json(json!({
        "decision": "deny",
        "reason": "old form",
        "decision_id": "dec_old",
        "matched_guardrails": [{"key": "legacy"}],
    })));
    let response = proxy.call_tool(5, "add", json!({"a": 5, "b": 1})).await;
    let data = assert_blocked(&response, "add");
    assert_eq!(data["reason"], "old form", "{response}");
    assert_eq!(data["decision_id"], "dec_old", "{response}");
    assert_eq!(data["policy_decision"], "block", "{response}");
    assert_eq!(data["matched_guardrail"], "legacy", "{response}");

    fx.apie.script_evaluate(Reply::json(
        json!({"decision": "allow", "reason": "old allow"}),
    ));
    let response = proxy.call_tool(6, "add", json!({"a": 6, "b": 1})).await;
    assert_eq!(result_text(&response), "7", "{response}");

    // policy_decision wins over decision.
    fx.apie.script_evaluate(Reply::json(
        json!({"policy_decision": "allow", "decision": "block"}),
    ));
    let response = proxy.call_tool(7, "add", json!({"a": 7, "b": 1})).await;
    assert_eq!(result_text(&response), "8", "{response}");
    fx.apie.script_evaluate(Reply::json(
        json!({"policy_decision": "block", "decision": "allow"}),
    ));
    let response = proxy.call_tool(8, "add", json!({"a": 8, "b": 1})).await;
    assert_blocked(&response, "add");

    assert_eq!(finish(proxy).await.code(), Some(0));
    let sums: Vec<Value> = fx
        .server_calls()
        .into_iter()
        .map(|(_, a)| a["a"].clone())
        .collect();
    assert_eq!(sums, [json!(1), json!(6), json!(7)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn effective_decision_in_monitor_mode_never_refuses() {
    let fx = Fixture::new().await;
    let mut proxy = fx.start(json!({"mode": "monitor"})).await;
    let cases = [
        (
            json!({"policy_decision": "allow", "effective_decision": "block"}),
            "forwarded",
        ),
        (
            json!({"policy_decision": "block", "effective_decision": "allow"}),
            "would_block",
        ),
        (
            json!({"policy_decision": "require_approval", "effective_decision": "allow",
                   "approval_request": {"id": "apr_never"}}),
            "would_require_approval",
        ),
    ];
    for (i, (reply, outcome)) in cases.into_iter().enumerate() {
        fx.apie.script_evaluate(Reply::json(reply.clone()));
        let id = i as i64 + 1;
        let response = proxy.call_tool(id, "add", json!({"a": id, "b": 0})).await;
        assert_eq!(
            result_text(&response),
            id.to_string(),
            "{reply}: {response}"
        );
        let line = fx.audit_of(id).await;
        assert_eq!(line["outcome"], outcome, "{reply}: {line}");
    }
    assert_eq!(finish(proxy).await.code(), Some(0));
    assert_eq!(fx.server_calls().len(), 3);
    assert_eq!(fx.apie.count(&wait_path("apr_never")), 0);
    assert_eq!(fx.apie.count(&approval_path("apr_never")), 0);
}

// ---------------------------------------------------------------------------
// Local rules and the service
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_allow_and_block_are_final_and_stricter_rules_are_a_floor() {
    let fx = Fixture::new().await;
    let mut proxy = fx
        .start(json!({
            "approvals": {"channels": ["guard"]},
            "policies": [
                {"name": "r-allow", "verbMatchers": [{"type": "verb", "value": "echo"}],
                 "action": {"type": "allow"}, "reason": "echo is fine"},
                {"name": "r-block", "verbMatchers": [{"type": "verb", "value": "read_file"}],
                 "action": {"type": "block"}, "reason": "no reading"},
                {"name": "r-approve", "verbMatchers": [{"type": "verb", "value": "add"}],
                 "action": {"type": "require_approval"}, "reason": "sums need a human"},
                {"name": "r-warn", "verbMatchers": [{"type": "verb", "value": "refund"}],
                 "action": {"type": "warn"}, "reason": "refunds are noted"},
            ],
        }))
        .await;
    // The service would block anything it is asked about.
    fx.apie.set_evaluate_default(Reply::decision("block"));

    // Local allow and block: no request at all.
    let echoed = proxy
        .call_tool(1, "echo", json!({"text": "local allow"}))
        .await;
    assert_eq!(result_text(&echoed), "local allow", "{echoed}");
    let read = proxy.call_tool(2, "read_file", json!({"path": "/r"})).await;
    let data = assert_blocked(&read, "read_file");
    assert_eq!(data["rule"], "r-block", "{read}");
    assert_eq!(data["reason"], "no reading", "{read}");
    assert_eq!(fx.apie.count(EVALUATE), 0, "{:?}", fx.apie.summary());
    assert_eq!(fx.audit_of(1).await["outcome"], "forwarded");
    assert_eq!(fx.audit_of(2).await["outcome"], "blocked");

    // Local require_approval over a service allow: still needs a human (none available).
    fx.apie.script_evaluate(Reply::decision("allow"));
    let added = proxy.call_tool(3, "add", json!({"a": 1, "b": 2})).await;
    let data = assert_not_approved(&added, "approval_denied", "rejected");
    assert_eq!(data["rule"], "r-approve", "{added}");
    assert_eq!(data["tool"], "add", "{added}");
    assert_eq!(fx.apie.count(EVALUATE), 1);

    // Local require_approval, service block: block wins.
    fx.apie.script_evaluate(Reply::decision("block"));
    let added = proxy.call_tool(4, "add", json!({"a": 1, "b": 2})).await;
    let data = assert_blocked(&added, "add");
    assert_eq!(data["rule"], "r-approve", "{added}");

    // Local warn, service allow: forwarded.
    fx.apie.script_evaluate(Reply::decision("allow"));
    let refunded = proxy
        .call_tool(5, "refund", json!({"amount": 5, "charge_id": "ch_1"}))
        .await;
    assert_eq!(result_text(&refunded), "refunded 5", "{refunded}");

    // Local warn, service block: blocked.
    fx.apie.script_evaluate(Reply::decision("deny"));
    let refunded = proxy
        .call_tool(6, "refund", json!({"amount": 6, "charge_id": "ch_1"}))
        .await;
    let data = assert_blocked(&refunded, "refund");
    assert_eq!(data["rule"], "r-warn", "{refunded}");

    // Local warn, service require_approval: require_approval.
    fx.apie.script_evaluate(Reply::decision("require_approval"));
    let refunded = proxy
        .call_tool(7, "refund", json!({"amount": 7, "charge_id": "ch_1"}))
        .await;
    assert_not_approved(&refunded, "approval_denied", "rejected");

    // No rule: the service decides, not riskDefaults (deploy_service is critical, which
    // riskDefaults would send to a human).
    fx.apie.script_evaluate(Reply::decision("allow"));
    let deployed = proxy.call_tool(8, "deploy_service", prod()).await;
    assert_eq!(
        result_text(&deployed),
        "deployed api to production",
        "{deployed}"
    );

    assert_eq!(fx.apie.count(EVALUATE), 6);
    assert_eq!(finish(proxy).await.code(), Some(0));
    assert_eq!(fx.server_tools(), ["echo", "refund", "deploy_service"]);
}

// ---------------------------------------------------------------------------
// Failures × guardFailureMode
// ---------------------------------------------------------------------------

/// One failure class played by the fake service.
struct FailureCase {
    name: &'static str,
    reply: Reply,
    failure: &'static str,
    http_status: Option<u16>,
    configuration_error: bool,
}

fn failure_cases() -> Vec<FailureCase> {
    let http = |status: u16, configuration_error: bool| FailureCase {
        name: "http",
        reply: Reply::status(status, json!({"error": format!("status {status}")})),
        failure: "http_status",
        http_status: Some(status),
        configuration_error,
    };
    let other = |name, reply, failure| FailureCase {
        name,
        reply,
        failure,
        http_status: None,
        configuration_error: false,
    };
    vec![
        http(500, false),
        http(503, false),
        http(429, false),
        other(
            "non-JSON body",
            Reply::raw(200, "<html><body>Bad gateway</body></html>"),
            "bad_body",
        ),
        other(
            "JSON that is not an object",
            Reply::json(json!(["allow"])),
            "bad_body",
        ),
        other(
            "unknown decision",
            Reply::json(json!({"policy_decision": "perhaps", "reason": "?"})),
            "unknown_decision",
        ),
        other(
            "missing decision",
            Reply::json(json!({"reason": "no decision here", "decision_id": "dec_x"})),
            "unknown_decision",
        ),
        other("empty body", Reply::raw(200, ""), "bad_body"),
        other("timeout", Reply::decision("allow").delayed(1500), "timeout"),
        // Configuration errors last: the stderr line must not appear before them.
        // A redirect is not followed (the key would go on to another address): were it
        // followed, the service would answer this very call with the next case's reply.
        FailureCase {
            name: "redirect",
            reply: Reply::redirect(307, "/v1/guardrails/evaluate"),
            ..http(307, true)
        },
        http(401, true),
        http(403, true),
        http(404, true),
    ]
}

/// Runs every failure class through one proxy in `failure_mode`, then a refused connection.
async fn failure_matrix(failure_mode: &str) {
    let fx = Fixture::new().await;
    let extra = json!({
        "guardFailureMode": failure_mode,
        "guard": {"timeoutMs": 300},
    });
    let mut proxy = fx.start(extra.clone()).await;
    let mut forwarded = Vec::new();
    for (i, case) in failure_cases().into_iter().enumerate() {
        let label = format!(
            "{failure_mode} × {} {}",
            case.name,
            case.http_status.map(|s| s.to_string()).unwrap_or_default()
        );
        let logged = configuration_errors(&proxy);
        let warned = warnings(&proxy);
        fx.apie.script_evaluate(case.reply);
        let id = i as i64 + 1;
        let arguments = json!({"a": id, "b": 0});
        let response = proxy.call_tool(id, "add", arguments.clone()).await;
        if failure_mode == "fail_open" {
            assert_eq!(
                result_text(&response),
                id.to_string(),
                "{label}: {response}"
            );
            forwarded.push(("add".to_owned(), arguments));
        } else {
            let data = assert_unavailable(&response, failure_mode, case.failure, "add");
            match case.http_status {
                Some(status) => assert_eq!(data["http_status"], status, "{label}: {response}"),
                None => assert!(!data["http_status"].is_number(), "{label}: {response}"),
            }
        }
        let line = fx.audit_of(id).await;
        assert_eq!(line["outcome"], "guard_failed", "{label}: {line}");
        assert_eq!(
            fx.apie.count(EVALUATE),
            i + 1,
            "{label}: one request per call"
        );
        // Every failure is said on stderr (fail_open included: the call went through unguarded).
        warnings_eventually(&proxy, warned + 1).await;
        if case.configuration_error {
            configuration_errors_eventually(&proxy, logged + 1).await;
        } else {
            assert_eq!(
                configuration_errors(&proxy),
                logged,
                "{label}: a configuration error was logged for a plain failure:\n{}",
                proxy.stderr_text()
            );
        }
    }
    assert_eq!(finish(proxy).await.code(), Some(0));
    assert_eq!(
        fx.server_calls(),
        forwarded,
        "{failure_mode}: what reached the upstream"
    );

    // Nothing listens at the base URL. (No events: retrying them against a closed port would
    // only make the shutdown slower.)
    let refused = apie::refused_url().await;
    let mut extra = extra;
    extra["guard"]["events"] = json!(false);
    let config = fx.config_at(&refused, extra);
    let mut proxy = fx.start_with(&config, &[]).await;
    let response = proxy
        .call_tool("refused", "echo", json!({"text": "x"}))
        .await;
    if failure_mode == "fail_open" {
        assert_eq!(
            result_text(&response),
            "x",
            "{failure_mode} × connect: {response}"
        );
    } else {
        assert_unavailable(&response, failure_mode, "connect", "echo");
    }
    let line = fx.audit_of("refused").await;
    assert_eq!(
        line["outcome"], "guard_failed",
        "{failure_mode} × connect: {line}"
    );
    assert_eq!(finish(proxy).await.code(), Some(0));
    let echoed = fx.server_tools().iter().filter(|t| *t == "echo").count();
    assert_eq!(
        echoed,
        usize::from(failure_mode == "fail_open"),
        "{failure_mode} × connect: {:?}",
        fx.server_tools()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_with_fail_open_forward() {
    failure_matrix("fail_open").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_with_fail_closed_refuse_with_the_block_code() {
    failure_matrix("fail_closed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_with_throw_refuse_with_the_unavailable_code() {
    failure_matrix("throw").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_in_monitor_mode_always_forward() {
    let fx = Fixture::new().await;
    let mut proxy = fx
        .start(json!({
            "mode": "monitor",
            "guardFailureMode": "fail_closed",
            "guard": {"circuitBreaker": {"failureThreshold": 1, "cooldownMs": 60000}},
        }))
        .await;
    fx.apie
        .set_evaluate_default(Reply::status(500, json!({"error": "down"})));
    let first = proxy.call_tool(1, "add", json!({"a": 1, "b": 1})).await;
    assert_eq!(result_text(&first), "2", "{first}");
    let second = proxy.call_tool(2, "add", json!({"a": 2, "b": 1})).await;
    assert_eq!(result_text(&second), "3", "{second}");
    assert_eq!(fx.audit_of(1).await["outcome"], "guard_failed");
    assert_eq!(fx.audit_of(2).await["outcome"], "circuit_open");
    assert_eq!(fx.apie.count(EVALUATE), 1, "{:?}", fx.apie.summary());
    assert_eq!(finish(proxy).await.code(), Some(0));
    assert_eq!(fx.server_tools(), ["add", "add"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_codes_follow_error_codes() {
    let fx = Fixture::new().await;
    fx.apie
        .set_evaluate_default(Reply::status(503, json!({"error": "down"})));
    for (mode, code) in [("fail_closed", -31001), ("throw", -31003)] {
        let mut proxy = fx
            .start(json!({
                "guardFailureMode": mode,
                "errorCodes": {"blocked": -31001, "approval": -31002, "guardUnavailable": -31003},
            }))
            .await;
        let response = proxy.call_tool(mode, "add", json!({"a": 1, "b": 1})).await;
        assert_eq!(response["error"]["code"], code, "{mode}: {response}");
        assert_eq!(
            response["error"]["data"]["kind"], "guard_unavailable",
            "{mode}: {response}"
        );
        assert_eq!(
            response["error"]["data"]["failure"], "http_status",
            "{mode}: {response}"
        );
        assert_eq!(finish(proxy).await.code(), Some(0));
    }
    assert!(fx.server_tools().is_empty());
}

// ---------------------------------------------------------------------------
// Circuit breaker
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn circuit_opens_after_the_threshold_and_a_probe_closes_or_reopens_it() {
    let fx = Fixture::new().await;
    let mut proxy = fx
        .start(json!({
            "guardFailureMode": "fail_closed",
            "guard": {"circuitBreaker": {"failureThreshold": 2, "cooldownMs": 300}},
        }))
        .await;
    let failing = Reply::status(500, json!({"error": "down"}));
    fx.apie.set_evaluate_default(failing.clone());
    let call = |id: i64| json!({"a": id, "b": 0});

    // Two failures reach the service, then it is left alone.
    for id in [1, 2] {
        let response = proxy.call_tool(id, "add", call(id)).await;
        assert_unavailable(&response, "fail_closed", "http_status", "add");
        assert_eq!(fx.audit_of(id).await["outcome"], "guard_failed");
    }
    for id in [3, 4] {
        let response = proxy.call_tool(id, "add", call(id)).await;
        assert_unavailable(&response, "fail_closed", "circuit_open", "add");
        assert_eq!(fx.audit_of(id).await["outcome"], "circuit_open");
    }
    assert_eq!(fx.apie.count(EVALUATE), 2, "{:?}", fx.apie.summary());

    // After the cooldown one probe goes out; it succeeds and the circuit closes.
    tokio::time::sleep(Duration::from_millis(450)).await;
    fx.apie.set_evaluate_default(Reply::decision("allow"));
    let probe = proxy.call_tool(5, "add", call(5)).await;
    assert_eq!(result_text(&probe), "5", "{probe}");
    assert_eq!(fx.apie.count(EVALUATE), 3);
    let closed = proxy.call_tool(6, "add", call(6)).await;
    assert_eq!(result_text(&closed), "6", "{closed}");
    assert_eq!(fx.apie.count(EVALUATE), 4);

    // Open again; this time the probe fails and the circuit re-opens for another cooldown.
    fx.apie.set_evaluate_default(failing);
    for id in [7, 8] {
        let response = proxy.call_tool(id, "add", call(id)).await;
        assert_unavailable(&response, "fail_closed", "http_status", "add");
    }
    let response = proxy.call_tool(9, "add", call(9)).await;
    assert_unavailable(&response, "fail_closed", "circuit_open", "add");
    assert_eq!(fx.apie.count(EVALUATE), 6);
    tokio::time::sleep(Duration::from_millis(450)).await;
    let response = proxy.call_tool(10, "add", call(10)).await;
    assert_unavailable(&response, "fail_closed", "http_status", "add");
    assert_eq!(fx.apie.count(EVALUATE), 7);
    let response = proxy.call_tool(11, "add", call(11)).await;
    assert_unavailable(&response, "fail_closed", "circuit_open", "add");
    assert_eq!(fx.apie.count(EVALUATE), 7, "{:?}", fx.apie.summary());
    assert_eq!(fx.audit_of(11).await["outcome"], "circuit_open");

    assert_eq!(finish(proxy).await.code(), Some(0));
    let sums: Vec<Value> = fx
        .server_calls()
        .into_iter()
        .map(|(_, a)| a["a"].clone())
        .collect();
    assert_eq!(sums, [json!(5), json!(6)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_the_probe_is_out_other_calls_get_circuit_open() {
    let fx = Fixture::new().await;
    let mut proxy = fx
        .start(json!({
            "guard": {"circuitBreaker": {"failureThreshold": 1, "cooldownMs": 300}},
        }))
        .await;
    // fail_open (the default): every call is forwarded, the audit tells them apart.
    fx.apie
        .script_evaluate(Reply::status(503, json!({"error": "unavailable"})));
    let first = proxy.call_tool(1, "echo", json!({"text": "1"})).await;
    assert_eq!(result_text(&first), "1", "{first}");
    let second = proxy.call_tool(2, "echo", json!({"text": "2"})).await;
    assert_eq!(result_text(&second), "2", "{second}");
    assert_eq!(fx.audit_of(1).await["outcome"], "guard_failed");
    assert_eq!(fx.audit_of(2).await["outcome"], "circuit_open");
    assert_eq!(fx.apie.count(EVALUATE), 1);

    tokio::time::sleep(Duration::from_millis(450)).await;
    fx.apie
        .script_evaluate(Reply::decision("allow").delayed(600));
    proxy
        .send(&util::legacy_call(
            "probe",
            "echo",
            json!({"text": "probe"}),
        ))
        .await;
    fx.apie.wait_for(EVALUATE, 2).await;
    // The probe is out: this call does not wait for it and asks nothing.
    proxy
        .send(&util::legacy_call(
            "meanwhile",
            "echo",
            json!({"text": "meanwhile"}),
        ))
        .await;
    let meanwhile = recv_before(&mut proxy, "meanwhile", "probe").await;
    assert_eq!(result_text(&meanwhile), "meanwhile", "{meanwhile}");
    assert_eq!(fx.audit_of("meanwhile").await["outcome"], "circuit_open");
    assert_eq!(fx.apie.count(EVALUATE), 2, "{:?}", fx.apie.summary());

    let probe = proxy.recv_until_id("probe").await;
    assert_eq!(result_text(&probe), "probe", "{probe}");
    assert_eq!(fx.audit_of("probe").await["outcome"], "forwarded");
    // Closed again.
    let after = proxy.call_tool(5, "echo", json!({"text": "5"})).await;
    assert_eq!(result_text(&after), "5", "{after}");
    assert_eq!(fx.apie.count(EVALUATE), 3);
    assert_eq!(fx.audit_of(5).await["outcome"], "forwarded");
    assert_eq!(finish(proxy).await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_decision_is_not_a_failure() {
    let fx = Fixture::new().await;
    let mut proxy = fx
        .start(json!({
            "guardFailureMode": "fail_closed",
            "guard": {"circuitBreaker": {"failureThreshold": 2, "cooldownMs": 60000}},
        }))
        .await;
    let failing = || Reply::status(500, json!({"error": "flaky"}));
    for reply in [
        failing(),
        Reply::decision("block"),
        failing(),
        Reply::decision("deny"),
        failing(),
    ] {
        fx.apie.script_evaluate(reply);
    }
    for id in 1..=5 {
        let response = proxy.call_tool(id, "add", json!({"a": id, "b": 0})).await;
        if id % 2 == 1 {
            assert_unavailable(&response, "fail_closed", "http_status", "add");
        } else {
            assert_blocked(&response, "add");
        }
    }
    // Never two failures in a row: every call reached the service.
    assert_eq!(fx.apie.count(EVALUATE), 5, "{:?}", fx.apie.summary());
    // The second consecutive failure opens it.
    fx.apie.script_evaluate(failing());
    let response = proxy.call_tool(6, "add", json!({"a": 6, "b": 0})).await;
    assert_unavailable(&response, "fail_closed", "http_status", "add");
    let response = proxy.call_tool(7, "add", json!({"a": 7, "b": 0})).await;
    assert_unavailable(&response, "fail_closed", "circuit_open", "add");
    assert_eq!(fx.apie.count(EVALUATE), 6);
    assert_eq!(finish(proxy).await.code(), Some(0));
    assert!(fx.server_tools().is_empty());
}

// ---------------------------------------------------------------------------
// Events
// ---------------------------------------------------------------------------

/// Checks the envelope every event must have (contract "Events").
fn assert_envelope(event: &Value, run_id: &str, environment: Value) {
    let uuid_v4 =
        regex::Regex::new(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
            .unwrap();
    let rfc3339 =
        regex::Regex::new(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")
            .unwrap();
    assert!(
        event["type"]
            .as_str()
            .is_some_and(|t| t.starts_with("agent.")),
        "{event}"
    );
    assert!(
        event["event_id"]
            .as_str()
            .is_some_and(|id| uuid_v4.is_match(&id.to_ascii_lowercase())),
        "event_id is not a v4 UUID: {event}"
    );
    assert_eq!(event["agent_key"], AGENT, "{event}");
    assert_eq!(event["run_id"], run_id, "{event}");
    assert!(
        event["timestamp"]
            .as_str()
            .is_some_and(|t| rfc3339.is_match(t)),
        "timestamp is not RFC 3339: {event}"
    );
    assert_eq!(event["environment"], environment, "{event}");
    assert!(event["sequence_number"].is_u64(), "{event}");
    assert_eq!(event["payload_summary"]["server"], "files", "{event}");
    assert_eq!(event["metadata"]["capture_source"], "mcp_proxy", "{event}");
}

/// How many events of each type.
fn count_types(events: &[Value]) -> std::collections::BTreeMap<String, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for event in events {
        *counts
            .entry(event["type"].as_str().unwrap_or("<none>").to_owned())
            .or_insert(0) += 1;
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_posted_with_the_listed_types_by_shutdown() {
    let fx = Fixture::new().await;
    let config = fx.config(json!({"environment": "staging"}));
    let mut proxy = fx.start_with(&config, &["--run-id", "run_events_1"]).await;

    let listed = proxy.request("list", "tools/list", Value::Null).await;
    assert!(listed["result"]["tools"].is_array(), "{listed}");
    // Allowed and answered: called, evaluated, completed.
    let echoed = proxy
        .call_tool("e", "echo", json!({"text": "hello", "password": "hunter2"}))
        .await;
    assert_eq!(result_text(&echoed), "hello");
    // Blocked by the service: called, evaluated, failed.
    fx.apie.script_evaluate(Reply::decision("block"));
    let blocked = proxy.call_tool("b", "add", json!({"a": 1, "b": 2})).await;
    assert_blocked(&blocked, "add");
    // Allowed, and the upstream answers with an error: called, evaluated, failed.
    let unknown = proxy.call_tool("u", "no_such_tool", json!({})).await;
    assert!(unknown.get("error").is_some(), "{unknown}");

    let status = finish(proxy).await;
    assert_eq!(status.code(), Some(0));
    let requests = fx.apie.requests(EVENTS);
    assert!(
        !requests.is_empty(),
        "no events were posted: {:?}",
        fx.apie.summary()
    );
    for request in &requests {
        assert_keyed_json(request);
        assert!(
            !request.body.contains("hunter2"),
            "an argument left in an event: {}",
            request.body
        );
    }
    let events = fx.apie.events();
    let expected: std::collections::BTreeMap<String, usize> = [
        ("agent.mcp.tools_listed", 1),
        ("agent.mcp.called", 3),
        ("agent.guardrail.evaluated", 3),
        ("agent.mcp.completed", 1),
        ("agent.mcp.failed", 2),
    ]
    .into_iter()
    .map(|(t, n)| (t.to_owned(), n))
    .collect();
    assert_eq!(count_types(&events), expected, "{events:#?}");
    for event in &events {
        assert_envelope(event, "run_events_1", json!("staging"));
    }
    let tools_of = |kind: &str| -> Vec<Value> {
        events
            .iter()
            .filter(|e| e["type"] == kind)
            .map(|e| e["payload_summary"]["tool"].clone())
            .collect()
    };
    for kind in ["agent.mcp.called", "agent.guardrail.evaluated"] {
        let mut tools = tools_of(kind);
        tools.sort_by_key(Value::to_string);
        assert_eq!(
            tools,
            [json!("add"), json!("echo"), json!("no_such_tool")],
            "{kind}: {events:#?}"
        );
    }
    assert_eq!(tools_of("agent.mcp.completed"), [json!("echo")]);
    let mut failed = tools_of("agent.mcp.failed");
    failed.sort_by_key(Value::to_string);
    assert_eq!(failed, [json!("add"), json!("no_such_tool")]);
    // Distinct ids and sequence numbers.
    let mut ids: Vec<String> = events.iter().map(|e| e["event_id"].to_string()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), events.len(), "{events:#?}");
    let mut sequence: Vec<u64> = events
        .iter()
        .filter_map(|e| e["sequence_number"].as_u64())
        .collect();
    sequence.sort_unstable();
    sequence.dedup();
    assert_eq!(sequence.len(), events.len(), "{events:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_batched_at_most_25_per_request() {
    let fx = Fixture::new().await;
    let mut proxy = fx.start(json!({})).await;
    for id in 1..=30 {
        let echoed = proxy
            .call_tool(id, "echo", json!({"text": id.to_string()}))
            .await;
        assert_eq!(result_text(&echoed), id.to_string());
    }
    assert_eq!(finish(proxy).await.code(), Some(0));
    let batches = fx.apie.event_batches();
    assert!(
        batches.iter().all(|b| !b.is_empty() && b.len() <= 25),
        "batch sizes {:?}",
        batches.iter().map(Vec::len).collect::<Vec<_>>()
    );
    let events = fx.apie.events();
    let counts = count_types(&events);
    assert_eq!(counts.get("agent.mcp.called"), Some(&30), "{counts:?}");
    assert_eq!(
        counts.get("agent.guardrail.evaluated"),
        Some(&30),
        "{counts:?}"
    );
    assert_eq!(counts.get("agent.mcp.completed"), Some(&30), "{counts:?}");
    assert!(
        batches.len() >= 4,
        "90 events in {} requests",
        batches.len()
    );
    let mut ids: Vec<String> = events.iter().map(|e| e["event_id"].to_string()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), events.len(), "an event was sent twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_events_when_disabled() {
    let fx = Fixture::new().await;
    let mut proxy = fx.start(json!({"guard": {"events": false}})).await;
    let listed = proxy.request("list", "tools/list", Value::Null).await;
    assert!(listed["result"]["tools"].is_array(), "{listed}");
    let echoed = proxy.call_tool(1, "echo", json!({"text": "quiet"})).await;
    assert_eq!(result_text(&echoed), "quiet");
    fx.apie.script_evaluate(Reply::decision("block"));
    let blocked = proxy.call_tool(2, "add", json!({"a": 1, "b": 1})).await;
    assert_blocked(&blocked, "add");
    assert_eq!(finish(proxy).await.code(), Some(0));
    assert_eq!(fx.apie.count(EVALUATE), 2);
    assert_eq!(fx.apie.count(EVENTS), 0, "{:?}", fx.apie.summary());
}

/// Issue #4: the service costs a call one request on a connection kept alive, never a
/// connection of its own; events go out in batches on at most one more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guarded_calls_and_event_batches_reuse_kept_alive_connections() {
    for events in [false, true] {
        let fx = Fixture::new().await;
        let mut proxy = fx.start(json!({"guard": {"events": events}})).await;
        let first = proxy.call_tool(0, "echo", json!({"text": "call 0"})).await;
        assert_eq!(result_text(&first), "call 0");
        // `identify` may still hold the first connection when the first evaluate goes out.
        let warm = fx.apie.connections();
        assert!((1..=2).contains(&warm), "{warm} connections for one call");
        const CALLS: u64 = 60;
        for i in 1..=CALLS {
            let text = format!("call {i}");
            let echoed = proxy.call_tool(i, "echo", json!({"text": text})).await;
            assert_eq!(result_text(&echoed), text, "{echoed}");
        }
        assert_eq!(fx.apie.count(EVALUATE), CALLS as usize + 1);
        if events {
            // Each call makes an event or more, 25 to a batch: at least two batches by now.
            fx.apie.wait_for(EVENTS, 2).await;
        }
        let extra = usize::from(events);
        assert!(
            fx.apie.connections() <= warm + extra,
            "events {events}: {} connections after {CALLS} more calls, {warm} after the first",
            fx.apie.connections()
        );
        assert_eq!(finish(proxy).await.code(), Some(0));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_events_endpoint_never_delays_or_fails_a_call() {
    let fx = Fixture::new().await;
    fx.apie
        .set_events_default(Reply::status(500, json!({"error": "events down"})).delayed(1500));
    let mut proxy = fx.start(json!({})).await;
    let started = Instant::now();
    let mut seen_events_at = None;
    let mut id = 0;
    // Calls every 150 ms, through the first flush and a little beyond.
    loop {
        id += 1;
        let sent = Instant::now();
        let echoed = proxy
            .call_tool(id, "echo", json!({"text": id.to_string()}))
            .await;
        let took = sent.elapsed();
        assert_eq!(result_text(&echoed), id.to_string(), "{echoed}");
        assert!(
            took < Duration::from_millis(1000),
            "call {id} took {took:?} while the events endpoint was failing"
        );
        if seen_events_at.is_none() && fx.apie.count(EVENTS) > 0 {
            seen_events_at = Some(id);
        }
        if seen_events_at.is_some_and(|at| id >= at + 3) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "no events request within 4 s: {:?}",
            fx.apie.summary()
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert_eq!(fx.server_tools().len(), id as usize);
    assert!(proxy.try_exit_status().is_none(), "the proxy died");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_flush_while_running_and_a_failed_batch_is_retried() {
    let fx = Fixture::new().await;
    fx.apie
        .script_events(Reply::status(503, json!({"error": "try again"})));
    let mut proxy = fx.start(json!({})).await;
    let echoed = proxy.call_tool(1, "echo", json!({"text": "once"})).await;
    assert_eq!(result_text(&echoed), "once");
    // No shutdown: the periodic flush (every 2 s) sends them, and the 503 is retried.
    let requests = fx
        .apie
        .wait_for_within(EVENTS, 2, Duration::from_millis(4500))
        .await;
    assert!(proxy.try_exit_status().is_none(), "the proxy exited");
    assert_eq!(requests[0].answered, 503);
    let first: Vec<Value> = requests[0].json()["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event_id"].clone())
        .collect();
    let delivered: Vec<Value> = fx
        .apie
        .delivered_events()
        .iter()
        .map(|e| e["event_id"].clone())
        .collect();
    assert!(!first.is_empty());
    for id in &first {
        assert!(
            delivered.contains(id),
            "event {id} of the failed batch was never delivered: {:?}",
            fx.apie.summary()
        );
    }
    let counts = count_types(&fx.apie.delivered_events());
    assert_eq!(counts.get("agent.mcp.called"), Some(&1), "{counts:?}");
    assert_eq!(finish(proxy).await.code(), Some(0));
}

// ---------------------------------------------------------------------------
// The guard approval channel
// ---------------------------------------------------------------------------

/// Enforce mode, the guard channel only, fast polling; `extra` merged in.
fn guard_channel(extra: Value) -> Value {
    let mut config = json!({
        "approvals": {"channels": ["guard"]},
        "approvalTimeoutMs": 4000,
        "approvalPollIntervalMs": 100,
    });
    if let (Value::Object(config), Value::Object(extra)) = (&mut config, extra) {
        config.extend(extra);
    }
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guard_approval_approved_through_the_long_poll() {
    let fx = Fixture::new().await;
    let mut proxy = fx.start(guard_channel(json!({}))).await;
    let waits = held_on_the_service(&fx, &mut proxy, "d1", "apr_svc_1").await;
    let timeout: u64 = waits[0]
        .query_param("timeout")
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("/wait without a numeric timeout: {:?}", waits[0]));
    assert!(timeout > 0 && timeout <= 4000, "{:?}", waits[0]);
    assert_eq!(waits[0].method, "GET");
    assert_eq!(
        waits[0].header("authorization"),
        Some(format!("Bearer {KEY}").as_str())
    );
    // Held: no answer, nothing forwarded.
    proxy.expect_silence(300).await;
    assert!(fx.server_tools().is_empty());

    fx.apie.set_approval("apr_svc_1", "approved");
    let response = proxy.recv_until_id("d1").await;
    assert_eq!(
        result_text(&response),
        "deployed api to production",
        "{response}"
    );
    assert_eq!(fx.server_calls(), [("deploy_service".to_owned(), prod())]);
    let line = fx.audit_of("d1").await;
    assert_eq!(line["outcome"], "approved", "{line}");
    assert_eq!(line["status"], "approved", "{line}");
    assert_eq!(line["approvalId"], "apr_svc_1", "{line}");
    assert_eq!(line["decision"], "require_approval", "{line}");

    assert_eq!(finish(proxy).await.code(), Some(0));
    assert_eq!(fx.apie.count(&cancel_path("apr_svc_1")), 0);
    let events = fx.apie.events();
    let requested: Vec<&Value> = events
        .iter()
        .filter(|e| e["type"] == "agent.approval.requested")
        .collect();
    let resolved: Vec<&Value> = events
        .iter()
        .filter(|e| e["type"] == "agent.approval.resolved")
        .collect();
    assert_eq!(requested.len(), 1, "{events:#?}");
    assert_eq!(resolved.len(), 1, "{events:#?}");
    assert_eq!(requested[0]["approval"]["approval_id"], "apr_svc_1");
    assert_eq!(requested[0]["approval"]["status"], "pending");
    assert_eq!(resolved[0]["approval"]["approval_id"], "apr_svc_1");
    assert_eq!(resolved[0]["approval"]["status"], "approved");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guard_approval_denials_through_the_long_poll() {
    let fx = Fixture::new().await;
    let mut proxy = fx.start(guard_channel(json!({}))).await;
    let cases = [
        ("rejected", "rejected"),
        ("expired", "expired"),
        ("cancelled", "cancelled"),
        ("denied", "rejected"),
        ("canceled", "cancelled"),
    ];
    for (i, (said, status)) in cases.into_iter().enumerate() {
        let approval = format!("apr_deny_{i}");
        fx.apie.script_approval(&approval, &[said]);
        if i % 2 == 0 {
            fx.apie.script_evaluate(Reply::require_approval(&approval));
        } else {
            // The older form: `decision` and `approval_id`.
            fx.apie.script_evaluate(Reply::json(json!({
                "decision": "requires_review",
                "reason": "old form",
                "approval_id": approval,
            })));
        }
        let id = format!("d{i}");
        let response = proxy.call_tool(id.as_str(), "deploy_service", prod()).await;
        let data = assert_not_approved(&response, "approval_denied", status);
        assert_eq!(data["approval_id"], approval.as_str(), "{said}: {response}");
        assert_eq!(data["tool"], "deploy_service", "{said}: {response}");
        assert!(
            data.as_object().is_some_and(|d| d.contains_key("rule")) && data["rule"].is_null(),
            "{said}: data.rule must be null: {response}"
        );
        let line = fx.audit_of(id.as_str()).await;
        assert_eq!(line["outcome"], "denied", "{said}: {line}");
        assert_eq!(line["status"], status, "{said}: {line}");
        assert_eq!(line["approvalId"], approval.as_str(), "{said}: {line}");
        assert!(
            fx.apie.count(&wait_path(&approval)) >= 1,
            "{:?}",
            fx.apie.summary()
        );
    }
    assert_eq!(finish(proxy).await.code(), Some(0));
    assert!(fx.server_tools().is_empty(), "{:?}", fx.server_tools());
    assert!(
        !fx.apie
            .all_requests()
            .iter()
            .any(|r| r.path.ends_with("/cancel")),
        "a decided approval was cancelled: {:?}",
        fx.apie.summary()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guard_approval_by_polling_when_the_long_poll_is_unsupported() {
    let fx = Fixture::new().await;
    let mut proxy = fx.start(guard_channel(json!({}))).await;
    for code in [404, 405, 501] {
        fx.apie.disable_wait(code);
        let approval = format!("apr_poll_{code}");
        // Pending, then no status at all (still pending), then approved.
        fx.apie
            .script_approval(&approval, &["pending", "", "approved"]);
        fx.apie.script_evaluate(Reply::require_approval(&approval));
        let id = format!("p{code}");
        let response = proxy.call_tool(id.as_str(), "deploy_service", prod()).await;
        assert_eq!(
            result_text(&response),
            "deployed api to production",
            "/wait {code}: {response}"
        );
        let gets = fx.apie.requests(&approval_path(&approval));
        assert_eq!(gets.len(), 3, "/wait {code}: {:?}", fx.apie.summary());
        for pair in gets.windows(2) {
            let gap = pair[1].at - pair[0].at;
            assert!(
                gap >= Duration::from_millis(70),
                "/wait {code}: polled again after {gap:?} (interval 100 ms)"
            );
        }
        assert_eq!(
            fx.apie.count(&wait_path(&approval)),
            1,
            "/wait {code}: the long poll was tried again: {:?}",
            fx.apie.summary()
        );
        let line = fx.audit_of(id.as_str()).await;
        assert_eq!(line["outcome"], "approved", "{line}");
    }
    // Rejected while polling.
    fx.apie
        .script_approval("apr_poll_no", &["pending", "rejected"]);
    fx.apie
        .script_evaluate(Reply::require_approval("apr_poll_no"));
    let response = proxy.call_tool("no", "deploy_service", prod()).await;
    let data = assert_not_approved(&response, "approval_denied", "rejected");
    assert_eq!(data["approval_id"], "apr_poll_no", "{response}");
    assert_eq!(finish(proxy).await.code(), Some(0));
    assert_eq!(fx.server_tools().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guard_approval_timeout_cancels_the_remote_approval() {
    let fx = Fixture::new().await;
    let mut proxy = fx
        .start(guard_channel(json!({"approvalTimeoutMs": 300})))
        .await;

    // Long poll: the service never decides.
    fx.apie.script_evaluate(Reply::require_approval("apr_slow"));
    let sent = Instant::now();
    let response = proxy.call_tool("t1", "deploy_service", prod()).await;
    let waited = sent.elapsed();
    let data = assert_not_approved(&response, "approval_timeout", "timeout");
    assert_eq!(data["approval_id"], "apr_slow", "{response}");
    assert_eq!(data["tool"], "deploy_service", "{response}");
    assert!(
        waited >= Duration::from_millis(280),
        "answered after {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(3),
        "a 300 ms timeout took {waited:?}"
    );
    for wait in fx.apie.requests(&wait_path("apr_slow")) {
        let timeout: u64 = wait
            .query_param("timeout")
            .and_then(|t| t.parse().ok())
            .unwrap_or(u64::MAX);
        assert!(
            timeout <= 300,
            "asked to wait longer than the time left: {wait:?}"
        );
    }
    let cancels = fx.apie.wait_for(&cancel_path("apr_slow"), 1).await;
    assert_eq!(cancels[0].method, "POST");
    assert_keyed_json(&cancels[0]);
    let line = fx.audit_of("t1").await;
    assert_eq!(line["outcome"], "denied", "{line}");
    assert_eq!(line["status"], "timeout", "{line}");
    assert_eq!(line["approvalId"], "apr_slow", "{line}");

    // Polling: same.
    fx.apie.disable_wait(404);
    fx.apie
        .script_evaluate(Reply::require_approval("apr_slow_poll"));
    let response = proxy.call_tool("t2", "deploy_service", prod()).await;
    assert_not_approved(&response, "approval_timeout", "timeout");
    fx.apie.wait_for(&cancel_path("apr_slow_poll"), 1).await;
    assert!(fx.apie.count(&approval_path("apr_slow_poll")) >= 1);

    assert_eq!(finish(proxy).await.code(), Some(0));
    assert!(fx.server_tools().is_empty(), "{:?}", fx.server_tools());
    let events = fx.apie.events();
    for approval in ["apr_slow", "apr_slow_poll"] {
        let resolved: Vec<&Value> = events
            .iter()
            .filter(|e| {
                e["type"] == "agent.approval.resolved" && e["approval"]["approval_id"] == approval
            })
            .collect();
        assert_eq!(resolved.len(), 1, "{approval}: {events:#?}");
        assert_eq!(resolved[0]["approval"]["status"], "timeout", "{approval}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_cancel_of_a_call_held_on_a_service_approval() {
    let fx = Fixture::new().await;
    let mut proxy = fx.start(guard_channel(json!({}))).await;
    held_on_the_service(&fx, &mut proxy, "c1", "apr_host_cancel").await;
    proxy
        .send(&util::notification(
            "notifications/cancelled",
            json!({"requestId": "c1", "reason": "the user gave up"}),
        ))
        .await;
    let cancels = fx.apie.wait_for(&cancel_path("apr_host_cancel"), 1).await;
    assert_eq!(cancels[0].method, "POST");
    // No answer for a cancelled request.
    proxy.expect_silence(300).await;
    let line = fx.audit_of("c1").await;
    assert_eq!(line["outcome"], "cancelled", "{line}");
    // The session goes on.
    let echoed = proxy.call_tool("e", "echo", json!({"text": "next"})).await;
    assert_eq!(result_text(&echoed), "next", "{echoed}");
    assert_eq!(finish(proxy).await.code(), Some(0));
    assert_eq!(
        fx.server_tools(),
        ["echo"],
        "the cancelled call was forwarded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_approval_without_an_id_falls_through_to_the_local_channel() {
    let fx = Fixture::new().await;
    let mut proxy = fx
        .start(guard_channel(
            json!({"approvals": {"channels": ["guard", "local"]}}),
        ))
        .await;
    fx.apie.script_evaluate(Reply::json(
        json!({"policy_decision": "require_approval", "reason": "ask someone"}),
    ));
    proxy
        .send(&util::legacy_call("l1", "deploy_service", prod()))
        .await;
    let (held, _) = fx.held(1, &proxy).await;
    let approval = &held[0];
    fx.answer(&["approve", approval]).await;
    let response = proxy.recv_until_id("l1").await;
    assert_eq!(
        result_text(&response),
        "deployed api to production",
        "{response}"
    );
    let line = fx.audit_of("l1").await;
    assert_eq!(line["outcome"], "approved", "{line}");
    assert_eq!(line["approvalId"], approval.as_str(), "{line}");
    assert_eq!(finish(proxy).await.code(), Some(0));
    fx.assert_no_approval_requests();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_approval_without_an_id_and_no_other_channel_is_rejected() {
    let fx = Fixture::new().await;
    let mut proxy = fx.start(guard_channel(json!({}))).await;
    fx.apie.script_evaluate(Reply::json(
        json!({"policy_decision": "require_approval", "reason": "ask someone"}),
    ));
    let sent = Instant::now();
    let response = proxy.call_tool("n1", "deploy_service", prod()).await;
    assert!(sent.elapsed() < Duration::from_secs(2), "it waited");
    let data = assert_not_approved(&response, "approval_denied", "rejected");
    assert!(
        data["reason"]
            .as_str()
            .is_some_and(|r| r.contains("no approval channel is available")),
        "{response}"
    );
    assert_eq!(data["tool"], "deploy_service", "{response}");
    assert_eq!(fx.audit_of("n1").await["outcome"], "denied");
    assert_eq!(finish(proxy).await.code(), Some(0));
    assert!(fx.server_tools().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_call_with_a_progress_token_gets_progress() {
    let fx = Fixture::new().await;
    let mut proxy = fx.start(guard_channel(json!({}))).await;
    fx.apie
        .script_evaluate(Reply::require_approval("apr_progress"));
    proxy.send(&deploy_with_progress("pg", "pt-1")).await;
    proxy.set_recv_timeout(Duration::from_secs(3));
    let first = proxy.recv().await;
    assert_eq!(first["method"], "notifications/progress", "{first}");
    assert_eq!(first["params"]["progressToken"], "pt-1", "{first}");
    assert_eq!(first["params"]["progress"].as_f64(), Some(1.0), "{first}");
    assert!(first["params"]["message"].is_string(), "{first}");
    fx.apie.wait_for(&wait_path("apr_progress"), 1).await;
    fx.apie.set_approval("apr_progress", "approved");
    let response = proxy.recv_until_id("pg").await;
    assert_eq!(
        result_text(&response),
        "deployed api to production",
        "{response}"
    );
    for message in proxy.take_stashed() {
        assert_eq!(message["method"], "notifications/progress", "{message}");
        assert_eq!(message["params"]["progressToken"], "pt-1", "{message}");
    }
    assert_eq!(finish(proxy).await.code(), Some(0));
}

/// The upstream played by the test, behind `socket_bridge`.
struct ScriptedUpstream {
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::net::tcp::OwnedReadHalf>>,
    write: tokio::net::tcp::OwnedWriteHalf,
}

impl ScriptedUpstream {
    /// Binds a loopback listener; returns it and the `upstream` entry for the config.
    async fn listen() -> (tokio::net::TcpListener, Value) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        (
            listener,
            json!({"command": util::socket_bridge_bin(), "args": [addr]}),
        )
    }

    async fn accept(listener: tokio::net::TcpListener) -> ScriptedUpstream {
        use tokio::io::AsyncBufReadExt as _;
        let (socket, _) = tokio::time::timeout(WAIT, listener.accept())
            .await
            .expect("the proxy never started the upstream")
            .expect("accept");
        let (read, write) = socket.into_split();
        ScriptedUpstream {
            lines: tokio::io::BufReader::new(read).lines(),
            write,
        }
    }

    /// The next message the upstream received.
    async fn recv(&mut self) -> Value {
        match tokio::time::timeout(WAIT, self.lines.next_line()).await {
            Ok(Ok(Some(line))) => serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("the upstream got {line:?}: {e}")),
            other => panic!("nothing reached the upstream: {other:?}"),
        }
    }

    async fn send(&mut self, message: &Value) {
        use tokio::io::AsyncWriteExt as _;
        self.write
            .write_all(format!("{message}\n").as_bytes())
            .await
            .expect("write to the proxy");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_progress_after_a_held_call_keeps_increasing() {
    let fx = Fixture::new().await;
    let (listener, upstream) = ScriptedUpstream::listen().await;
    let config = fx.config(guard_channel(json!({"upstream": upstream})));
    let mut proxy = fx.proxy_builder(&config).env("APIE_API_KEY", KEY).spawn();
    let mut server = ScriptedUpstream::accept(listener).await;

    // The handshake, through the proxy.
    proxy
        .send(&util::request(
            0,
            "initialize",
            json!({
                "protocolVersion": util::LEGACY_VERSION,
                "capabilities": {},
                "clientInfo": {"name": "guard-test-host", "version": "0.0.0"},
            }),
        ))
        .await;
    let initialize = server.recv().await;
    assert_eq!(initialize["method"], "initialize", "{initialize}");
    server
        .send(&json!({
            "jsonrpc": "2.0",
            "id": initialize["id"],
            "result": {
                "protocolVersion": util::LEGACY_VERSION,
                "capabilities": {"tools": {}},
                "serverInfo": {"name": "scripted-upstream", "version": "0.0.0"},
            },
        }))
        .await;
    let initialized = proxy.recv_until_id(0).await;
    assert!(initialized.get("result").is_some(), "{initialized}");
    proxy
        .send(&util::notification(
            "notifications/initialized",
            Value::Null,
        ))
        .await;
    assert_eq!(server.recv().await["method"], "notifications/initialized");

    // Held, with progress from the proxy.
    fx.apie
        .script_evaluate(Reply::require_approval("apr_shift"));
    proxy.send(&deploy_with_progress("sh", "pt-shift")).await;
    let first = proxy.recv().await;
    assert_eq!(first["method"], "notifications/progress", "{first}");
    fx.apie.wait_for(&wait_path("apr_shift"), 1).await;
    fx.apie.set_approval("apr_shift", "approved");

    // Forwarded; the upstream's own progress for the token comes after the proxy's.
    let call = server.recv().await;
    assert_eq!(call["method"], "tools/call", "{call}");
    assert_eq!(
        call["params"]["_meta"]["progressToken"], "pt-shift",
        "{call}"
    );
    server
        .send(&util::notification(
            "notifications/progress",
            json!({"progressToken": "pt-shift", "progress": 1, "total": 4, "message": "upstream working"}),
        ))
        .await;
    let mut proxy_progress = first["params"]["progress"].as_f64().expect("a number");
    let shifted = loop {
        let message = proxy.recv().await;
        assert_eq!(message["method"], "notifications/progress", "{message}");
        assert_eq!(message["params"]["progressToken"], "pt-shift", "{message}");
        if message["params"]["message"] == "upstream working" {
            break message;
        }
        proxy_progress = message["params"]["progress"].as_f64().expect("a number");
    };
    assert_eq!(
        shifted["params"]["progress"].as_f64(),
        Some(1.0 + proxy_progress),
        "after the proxy's progress {proxy_progress}: {shifted}"
    );
    assert_eq!(
        shifted["params"]["total"].as_f64(),
        Some(4.0 + proxy_progress),
        "{shifted}"
    );
    server
        .send(&json!({
            "jsonrpc": "2.0",
            "id": call["id"],
            "result": {"content": [{"type": "text", "text": "done"}]},
        }))
        .await;
    let response = proxy.recv_until_id("sh").await;
    assert_eq!(result_text(&response), "done", "{response}");

    proxy.close_stdin();
    drop(server);
    proxy.wait_exit(WAIT).await;
}

// ---------------------------------------------------------------------------
// Other traffic while a call waits
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_flows_while_a_call_waits_on_the_service() {
    let fx = Fixture::new().await;
    let mut proxy = fx.start(guard_channel(json!({}))).await;

    // Waiting on the evaluate request.
    fx.apie
        .script_evaluate(Reply::decision("allow").delayed(1000));
    proxy
        .send(&util::legacy_call(
            "slow-eval",
            "add",
            json!({"a": 1, "b": 2}),
        ))
        .await;
    fx.apie.wait_for(EVALUATE, 1).await;
    proxy
        .send(&util::request("l1", "tools/list", Value::Null))
        .await;
    let listed = recv_before(&mut proxy, "l1", "slow-eval").await;
    assert!(listed["result"]["tools"].is_array(), "{listed}");
    proxy
        .send(&util::legacy_call("e1", "echo", json!({"text": "flowing"})))
        .await;
    let echoed = recv_before(&mut proxy, "e1", "slow-eval").await;
    assert_eq!(result_text(&echoed), "flowing", "{echoed}");
    let held = proxy.recv_until_id("slow-eval").await;
    assert_eq!(result_text(&held), "3", "{held}");

    // Waiting on a service approval.
    held_on_the_service(&fx, &mut proxy, "held", "apr_flow").await;
    proxy
        .send(&util::request("l2", "tools/list", Value::Null))
        .await;
    let listed = recv_before(&mut proxy, "l2", "held").await;
    assert!(listed["result"]["tools"].is_array(), "{listed}");
    proxy.send(&util::request("p", "ping", Value::Null)).await;
    let pong = recv_before(&mut proxy, "p", "held").await;
    assert!(pong.get("result").is_some(), "{pong}");
    proxy
        .send(&util::legacy_call("e2", "echo", json!({"text": "still"})))
        .await;
    let echoed = recv_before(&mut proxy, "e2", "held").await;
    assert_eq!(result_text(&echoed), "still", "{echoed}");
    fx.apie.set_approval("apr_flow", "approved");
    let held = proxy.recv_until_id("held").await;
    assert_eq!(result_text(&held), "deployed api to production", "{held}");

    assert_eq!(finish(proxy).await.code(), Some(0));
    assert_eq!(fx.server_tools(), ["echo", "add", "echo", "deploy_service"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_pending_calls_counts_calls_waiting_on_the_service() {
    let fx = Fixture::new().await;
    let mut proxy = fx.start(json!({"maxPendingCalls": 1})).await;
    fx.apie
        .script_evaluate(Reply::decision("allow").delayed(1000));
    proxy
        .send(&util::legacy_call("first", "add", json!({"a": 1, "b": 2})))
        .await;
    fx.apie.wait_for(EVALUATE, 1).await;
    proxy
        .send(&util::legacy_call("second", "echo", json!({"text": "x"})))
        .await;
    let refused = recv_before(&mut proxy, "second", "first").await;
    assert_eq!(refused["error"]["code"], -32003, "{refused}");
    assert_eq!(
        refused["error"]["data"]["kind"], "too_many_pending_calls",
        "{refused}"
    );
    assert_eq!(fx.apie.count(EVALUATE), 1);
    let first = proxy.recv_until_id("first").await;
    assert_eq!(result_text(&first), "3", "{first}");
    assert_eq!(finish(proxy).await.code(), Some(0));
    assert_eq!(fx.server_tools(), ["add"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_cancel_while_waiting_on_the_service() {
    let fx = Fixture::new().await;
    let mut proxy = fx.start(json!({})).await;
    fx.apie
        .script_evaluate(Reply::decision("allow").delayed(500));
    proxy
        .send(&util::legacy_call("c", "add", json!({"a": 1, "b": 2})))
        .await;
    fx.apie.wait_for(EVALUATE, 1).await;
    proxy
        .send(&util::notification(
            "notifications/cancelled",
            json!({"requestId": "c"}),
        ))
        .await;
    // Not even once the service has answered.
    proxy.expect_silence(800).await;
    assert!(fx.server_tools().is_empty(), "{:?}", fx.server_tools());
    assert_eq!(fx.audit_of("c").await["outcome"], "cancelled");
    let echoed = proxy.call_tool("e", "echo", json!({"text": "next"})).await;
    assert_eq!(result_text(&echoed), "next", "{echoed}");
    assert_eq!(finish(proxy).await.code(), Some(0));
    assert_eq!(fx.server_tools(), ["echo"]);
}
