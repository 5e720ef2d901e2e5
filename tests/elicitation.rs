//! Human approval through MCP elicitation, in both protocol eras (SPEC §6–§7, MCP-NOTES §4–§5):
//! the real `apie-mcp` in enforce mode in front of `examples/example_server.rs`, with local rules
//! that hold some tools for a human and no guard service (`APIE_API_KEY` is removed).
//!
//! - Legacy sessions: the proxy asks the host with its own `elicitation/create` (id
//!   `"apie:<n>"`); hosts are rmcp clients ([`TestClient`]) or raw lines ([`RawSession`]).
//! - 2026-07-28 sessions: the held call is answered `input_required` and the host's retry is
//!   verified; hosts are raw lines (to forge, replay and tamper) or an rmcp client driving the
//!   rounds itself.
//!
//! What the upstream really received is read from `EXAMPLE_SERVER_LOG` (tool and arguments) and
//! `EXAMPLE_SERVER_PARAMS_LOG` (the whole `params`, so `inputResponses` and `requestState`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rmcp::model::{CallToolRequestParams, CallToolResult};
use rmcp::service::ServiceError;
use serde_json::{Value, json};

use crate::util::{
    self, ElicitAnswer, Era, META_CLIENT_CAPABILITIES, McpClient, RawSession, TestClient, connect,
    finish, modern_meta_with, notification, request, result_text,
};

/// The input request key of the proxy's own approval question (2026-07-28).
const APPROVAL_KEY: &str = "apie/approval";

/// The input request key the example server's `confirm` tool uses.
const CONFIRM_KEY: &str = "example/confirm";

/// The rule holding calls for a human, and its reason.
const RULE: &str = "needs-a-human";
const REASON: &str = "checked by hand";

/// Tools the default policy holds for a human.
const HELD: &[&str] = &["deploy_service", "delete_file", "steps"];

/// The arguments of the usual held call.
fn prod() -> Value {
    json!({"service": "api", "environment": "production"})
}

/// [`prod`] plus keys a human must never see the values of.
fn prod_with_secrets() -> Value {
    json!({
        "service": "api",
        "environment": "production",
        "api_token": "tok-hunter2-never-shown",
        "options": {"dbPassword": "pw-hunter3-never-shown", "region": "eu-west-1"},
    })
}

/// `needs-a-human` (require_approval) on `held`, then allow everything else, whatever its
/// inferred risk.
fn policies(held: &[&str]) -> Value {
    let matchers: Vec<Value> = held
        .iter()
        .map(|tool| json!({"type": "verb", "value": tool}))
        .collect();
    json!([
        {
            "name": RULE,
            "verbMatchers": matchers,
            "action": {"type": "require_approval"},
            "reason": REASON,
        },
        {"name": "the-rest-is-fine", "action": {"type": "allow"}},
    ])
}

// ---------------------------------------------------------------------------
// Fixture
// ---------------------------------------------------------------------------

/// One test's directory: config, audit log, the example server's logs and the proxy's state
/// directory (the local approval queue).
struct Fixture {
    scratch: util::Scratch,
}

impl std::ops::Deref for Fixture {
    type Target = util::Scratch;
    fn deref(&self) -> &util::Scratch {
        &self.scratch
    }
}

impl Fixture {
    fn new() -> Fixture {
        Fixture {
            scratch: util::Scratch::new(),
        }
    }

    fn params_log(&self) -> PathBuf {
        self.path().join("params.log")
    }

    /// The `params` of every `tools/call` the example server received, in order.
    fn server_params(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(self.params_log()).unwrap_or_default();
        text.lines()
            .map(|line| serde_json::from_str(line).expect("JSON params"))
            .collect()
    }

    /// An enforce-mode config in front of the example server with approvals on `channels` (no
    /// `approvals` key at all when empty: the default channels), [`policies`]`(HELD)`; the
    /// top-level keys of `extra` are added or replace the base ones.
    fn config(&self, channels: &[&str], extra: Value) -> PathBuf {
        let mut config = json!({
            "agentKey": "elicitation-test-agent",
            "serverName": "ci",
            "mode": "enforce",
            "upstream": {
                "command": util::example_server_bin(),
                "env": {
                    "EXAMPLE_SERVER_LOG": self.server_log(),
                    "EXAMPLE_SERVER_PARAMS_LOG": self.params_log(),
                },
            },
            "audit": {"path": self.audit_path()},
            "policies": policies(HELD),
            "approvals": {"channels": channels},
        });
        if channels.is_empty() {
            config
                .as_object_mut()
                .expect("an object")
                .remove("approvals");
        }
        if let Value::Object(extra) = extra {
            for (key, value) in extra {
                config[key] = value;
            }
        }
        util::write_config(self.path(), config)
    }

    /// `apie-mcp --config <config>` over raw lines, no handshake yet.
    fn raw(&self, config: &Path) -> RawSession {
        self.proxy_builder(config).spawn()
    }

    /// [`Self::raw`] through the legacy handshake (2025-11-25) of a host declaring elicitation.
    async fn raw_eliciting(&self, config: &Path) -> RawSession {
        let mut proxy = self.raw(config);
        handshake(&mut proxy, "2025-11-25", json!({"elicitation": {}}), true).await;
        proxy
    }

    /// `host` as an rmcp client of `apie-mcp --config <config>` in `era`.
    async fn connect(&self, host: TestClient, config: &Path, era: Era) -> McpClient {
        connect(host, self.proxy_command(config), era)
            .await
            .unwrap_or_else(|e| panic!("connect through the proxy ({era:?}): {e}"))
    }
}

// ---------------------------------------------------------------------------
// Wire helpers
// ---------------------------------------------------------------------------

/// Legacy handshake over raw lines with `protocolVersion` and `capabilities`; sends
/// `notifications/initialized` only when `initialized`. Returns the `initialize` result.
async fn handshake(
    proxy: &mut RawSession,
    version: &str,
    capabilities: Value,
    initialized: bool,
) -> Value {
    let params = json!({
        "protocolVersion": version,
        "capabilities": capabilities,
        "clientInfo": {"name": "elicitation-test-host", "version": "0.0.0"},
    });
    let response = proxy.request("init", "initialize", params).await;
    let result = response
        .get("result")
        .unwrap_or_else(|| panic!("initialize failed: {response}"))
        .clone();
    if initialized {
        proxy
            .send(&notification("notifications/initialized", Value::Null))
            .await;
    }
    result
}

/// The next message that is a request for `method` (stashed messages first); any other message
/// is pushed onto `others`.
async fn next_request(proxy: &mut RawSession, method: &str, others: &mut Vec<Value>) -> Value {
    loop {
        let message = proxy.recv().await;
        if message["method"] == method && message.get("id").is_some() {
            return message;
        }
        others.push(message);
    }
}

/// A JSON-RPC result for the host's side of a server→host request.
fn reply(id: &Value, result: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "result": result})
}

/// An `ElicitResult`: `accept` with `{"approve": approve}`, or `decline` / `cancel`.
fn elicit_result(action: &str, approve: Option<bool>) -> Value {
    match approve {
        Some(approve) => json!({"action": action, "content": {"approve": approve}}),
        None => json!({"action": action}),
    }
}

/// The id of one of the proxy's elicitations: `"apie:<n>"`; returns `n`.
fn apie_number(id: &Value) -> u64 {
    let text = id
        .as_str()
        .unwrap_or_else(|| panic!("server→host request id is not a string: {id}"));
    text.strip_prefix("apie:")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("server→host request id {text:?} is not \"apie:<n>\""))
}

/// A 2026-07-28 `tools/call` whose `_meta` declares `capabilities`; the keys of `extra` (e.g.
/// `inputResponses`, `requestState`, a `_meta` replacement) are added to `params`.
fn mcall(
    id: impl Into<Value>,
    name: &str,
    arguments: Value,
    capabilities: Value,
    extra: Value,
) -> Value {
    let mut params = json!({
        "name": name,
        "arguments": arguments,
        "_meta": modern_meta_with(capabilities),
    });
    if let Value::Object(extra) = extra {
        for (key, value) in extra {
            params[key] = value;
        }
    }
    request(id, "tools/call", params)
}

/// Client capabilities declaring elicitation (form).
fn eliciting() -> Value {
    json!({"elicitation": {"form": {}}})
}

/// The retry of an `input_required` round: `inputResponses` and the echoed `requestState`.
fn retry_with(key: &str, answer: Value, state: &str) -> Value {
    json!({"inputResponses": {key: answer}, "requestState": state})
}

/// Asserts `message` is a legacy `elicitation/create` from the proxy about `tool`, whose schema
/// asks exactly for one boolean `approve`; returns its `params`.
fn assert_approval_question(message: &Value, tool: &str) -> Value {
    assert_eq!(message["method"], "elicitation/create", "{message}");
    apie_number(&message["id"]);
    let params = message["params"].clone();
    assert_question_params(&params, tool);
    params
}

/// Sends a legacy `deploy_service` call with `arguments` and returns the proxy's approval
/// question about it, checked by [`assert_approval_question`]; other messages go to `others`.
async fn ask_legacy(
    proxy: &mut RawSession,
    id: impl Into<Value>,
    arguments: Value,
    others: &mut Vec<Value>,
) -> Value {
    proxy
        .send(&util::legacy_call(id, "deploy_service", arguments))
        .await;
    let question = next_request(proxy, "elicitation/create", others).await;
    assert_approval_question(&question, "deploy_service");
    question
}

/// The checks shared by both eras' approval questions (legacy `elicitation/create` params and
/// the 2026-07-28 input request's params).
fn assert_question_params(params: &Value, tool: &str) {
    let text = params["message"]
        .as_str()
        .unwrap_or_else(|| panic!("the question has no message: {params}"));
    assert!(text.starts_with("[apie-mcp]"), "{text:?}");
    assert!(
        text.contains(tool),
        "the question does not name {tool}: {text:?}"
    );
    let schema = &params["requestedSchema"];
    assert_eq!(schema["type"], "object", "{params}");
    let properties = schema["properties"]
        .as_object()
        .unwrap_or_else(|| panic!("no schema properties: {params}"));
    assert_eq!(
        properties.keys().collect::<Vec<_>>(),
        ["approve"],
        "the schema must ask for one boolean `approve` only: {params}"
    );
    assert_eq!(properties["approve"]["type"], "boolean", "{params}");
    assert_eq!(schema["required"], json!(["approve"]), "{params}");
}

/// Asserts `response` is the -32002 refusal of a held call to `tool` with `kind` and `status`
/// ([`util::assert_not_approved`]), naming its approval id, reason and rule; returns its
/// `error.data`.
fn assert_not_approved(response: &Value, tool: &str, kind: &str, status: &str) -> Value {
    let data = util::assert_not_approved(response, kind, status);
    assert_eq!(data["tool"], tool, "{response}");
    for key in ["approval_id", "reason", "rule"] {
        assert!(
            data.get(key).is_some(),
            "error data lacks {key}: {response}"
        );
    }
    data
}

/// Asserts `response` answers a 2026-07-28 call with the proxy's `input_required` result about
/// `tool`; returns its `requestState`.
fn assert_input_required(response: &Value, tool: &str) -> String {
    let result = &response["result"];
    assert_eq!(result["resultType"], "input_required", "{response}");
    let requests = result["inputRequests"]
        .as_object()
        .unwrap_or_else(|| panic!("no inputRequests: {response}"));
    assert_eq!(
        requests.keys().collect::<Vec<_>>(),
        [APPROVAL_KEY],
        "{response}"
    );
    let question = &requests[APPROVAL_KEY];
    assert_eq!(question["method"], "elicitation/create", "{response}");
    assert_eq!(question["params"]["mode"], "form", "{response}");
    assert_question_params(&question["params"], tool);
    let state = result["requestState"]
        .as_str()
        .unwrap_or_else(|| panic!("no requestState string: {response}"));
    assert!(state.starts_with("apie1."), "{state:?}");
    state.to_owned()
}

// ---------------------------------------------------------------------------
// rmcp helpers
// ---------------------------------------------------------------------------

fn call_params(name: &'static str, arguments: Value) -> CallToolRequestParams {
    let Value::Object(arguments) = arguments else {
        panic!("arguments must be an object")
    };
    CallToolRequestParams::new(name).with_arguments(arguments)
}

fn first_text(result: &CallToolResult) -> String {
    result
        .content
        .first()
        .and_then(|block| block.as_text())
        .map(|text| text.text.clone())
        .unwrap_or_else(|| panic!("no text block in {result:?}"))
}

/// Calls `deploy_service` with [`prod`] through an rmcp host; the JSON-RPC error it must fail
/// with, as the response a raw host would have seen, is the refusal with `kind` and `status`
/// ([`assert_not_approved`]). Returns its `error.data`.
async fn deploy_refused(client: &McpClient, kind: &str, status: &str) -> Value {
    let error = match client
        .call_tool(call_params("deploy_service", prod()))
        .await
    {
        Err(ServiceError::McpError(error)) => error,
        other => panic!("expected a JSON-RPC error, got {other:?}"),
    };
    let response = json!({"error": serde_json::to_value(&error).expect("error serializes")});
    assert_not_approved(&response, "deploy_service", kind, status)
}

// ---------------------------------------------------------------------------
// Legacy era, rmcp host
// ---------------------------------------------------------------------------

#[tokio::test]
async fn legacy_host_approves_in_the_host_and_the_call_is_forwarded() {
    let fx = Fixture::new();
    let config = fx.config(&["elicitation"], json!({}));
    let host = TestClient::new().with_elicit(ElicitAnswer::Approve);
    let log = host.log();
    let client = fx.connect(host, &config, Era::Legacy).await;

    let deployed = client
        .call_tool(call_params("deploy_service", prod_with_secrets()))
        .await
        .expect("approved in the host");
    assert_eq!(first_text(&deployed), "deployed api to production");
    assert_ne!(deployed.is_error, Some(true));

    let questions = log.elicitations();
    assert_eq!(questions.len(), 1, "{questions:?}");
    let params = serde_json::to_value(&questions[0]).expect("params serialize");
    assert_question_params(&params, "deploy_service");
    let text = params["message"].as_str().unwrap_or_default();
    assert!(
        text.contains(RULE),
        "the question does not name the rule: {text:?}"
    );
    assert!(
        text.contains(REASON),
        "the question does not give the reason: {text:?}"
    );
    assert!(
        text.contains("production"),
        "the arguments are not shown: {text:?}"
    );
    assert!(
        text.contains("eu-west-1"),
        "nested arguments are not shown: {text:?}"
    );
    assert!(
        !text.contains("hunter2") && !text.contains("hunter3"),
        "a secret reached the human: {text:?}"
    );
    assert!(text.contains("[REDACTED]"), "{text:?}");

    // Only the question is redacted: the upstream gets the real arguments.
    assert_eq!(
        fx.server_calls(),
        [("deploy_service".to_owned(), prod_with_secrets())]
    );
    // The session goes on.
    let echoed = client
        .call_tool(call_params("echo", json!({"text": "after"})))
        .await
        .expect("echo");
    assert_eq!(first_text(&echoed), "after");
    assert_eq!(log.elicitations().len(), 1, "echo needs nobody");
    client.close().await;

    let lines = fx.audit();
    let deploy = lines
        .iter()
        .find(|l| l["tool"] == "deploy_service")
        .unwrap_or_else(|| panic!("no audit line for the deploy: {lines:?}"));
    assert_eq!(deploy["outcome"], "approved", "{deploy}");
    assert_eq!(deploy["status"], "approved", "{deploy}");
    assert_eq!(deploy["decision"], "require_approval", "{deploy}");
    assert_eq!(deploy["rule"], RULE, "{deploy}");
}

/// A legacy rmcp host answering every approval question with `answer`: the held call is
/// refused -32002 with `status`, never forwarded, and the session goes on.
async fn legacy_host_refuses(answer: ElicitAnswer, status: &str) {
    let fx = Fixture::new();
    let config = fx.config(&["elicitation"], json!({}));
    let host = TestClient::new().with_elicit(answer);
    let log = host.log();
    let client = fx.connect(host, &config, Era::Legacy).await;

    let data = deploy_refused(&client, "approval_denied", status).await;
    assert_eq!(data["rule"], RULE, "{data}");
    assert_eq!(log.elicitations().len(), 1, "{:?}", log.elicitations());

    let echoed = client
        .call_tool(call_params("echo", json!({"text": "still here"})))
        .await
        .expect("echo");
    assert_eq!(first_text(&echoed), "still here");
    client.close().await;
    assert_eq!(
        fx.server_tools(),
        ["echo"],
        "a call refused by the human reached the server"
    );
    let lines = fx.audit();
    let deploy = lines
        .iter()
        .find(|l| l["tool"] == "deploy_service")
        .unwrap_or_else(|| panic!("no audit line for the deploy: {lines:?}"));
    assert_eq!(deploy["status"], status, "{deploy}");
    assert!(
        deploy["outcome"] != "approved" && deploy["outcome"] != "forwarded",
        "{deploy}"
    );
}

#[tokio::test]
async fn legacy_host_accepts_with_approve_false_and_the_call_is_rejected() {
    legacy_host_refuses(ElicitAnswer::Reject, "rejected").await;
}

#[tokio::test]
async fn legacy_host_declines_and_the_call_is_rejected() {
    legacy_host_refuses(ElicitAnswer::Decline, "rejected").await;
}

#[tokio::test]
async fn legacy_host_cancels_and_the_call_is_cancelled() {
    legacy_host_refuses(ElicitAnswer::Cancel, "cancelled").await;
}

#[tokio::test]
async fn legacy_host_accepting_without_approve_is_not_an_approval() {
    // `accept` with content that is not `approve: true` (here: the wrong key) approves nothing.
    legacy_host_refuses(ElicitAnswer::Accept(json!({"ok": true})), "rejected").await;
}

#[tokio::test]
async fn host_without_elicitation_falls_to_the_local_queue() {
    let fx = Fixture::new();
    let config = fx.config(&["elicitation", "local"], json!({}));
    // It would approve anything asked of it: only the local queue must be used.
    let host = TestClient::new()
        .without_elicitation()
        .with_elicit(ElicitAnswer::Approve);
    let log = host.log();
    let client = fx.connect(host, &config, Era::Legacy).await;

    let (deployed, ()) = tokio::join!(
        client.call_tool(call_params("deploy_service", prod())),
        async {
            let (ids, _) = fx.held(1, &client).await;
            assert!(
                fx.server_tools().is_empty(),
                "forwarded before the human answered"
            );
            fx.answer(&["approve", &ids[0]]).await;
        }
    );
    let deployed = deployed.expect("approved from the local queue");
    assert_eq!(first_text(&deployed), "deployed api to production");
    assert!(
        log.elicitations().is_empty(),
        "the proxy asked a host that declared no elicitation: {:?}",
        log.elicitations()
    );
    client.close().await;
    assert_eq!(fx.server_tools(), ["deploy_service"]);
}

#[tokio::test]
async fn host_without_elicitation_and_no_other_channel_is_refused_at_once() {
    let fx = Fixture::new();
    let config = fx.config(&["elicitation"], json!({}));
    let host = TestClient::new()
        .without_elicitation()
        .with_elicit(ElicitAnswer::Approve);
    let log = host.log();
    let client = fx.connect(host, &config, Era::Legacy).await;

    let started = Instant::now();
    let data = deploy_refused(&client, "approval_denied", "rejected").await;
    let took = started.elapsed();
    let reason = data["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("no approval channel is available"),
        "{data}"
    );
    assert!(took < Duration::from_secs(2), "the refusal took {took:?}");
    assert!(log.elicitations().is_empty(), "{:?}", log.elicitations());
    client.close().await;
    assert!(fx.server_tools().is_empty(), "{:?}", fx.server_tools());
}

// ---------------------------------------------------------------------------
// Legacy era, raw host
// ---------------------------------------------------------------------------

#[tokio::test]
async fn raw_host_sees_a_form_elicitation_with_redacted_arguments() {
    let fx = Fixture::new();
    let config = fx.config(&["elicitation"], json!({}));
    let mut proxy = fx.raw_eliciting(&config).await;

    let mut others = Vec::new();
    let question = ask_legacy(&mut proxy, 1, prod_with_secrets(), &mut others).await;
    let params = &question["params"];
    // 2025-11-25 was negotiated and `{}` means form: the request says so.
    assert_eq!(params["mode"], "form", "{question}");
    let raw = question.to_string();
    assert!(
        !raw.contains("hunter2") && !raw.contains("hunter3"),
        "a secret reached the host: {raw}"
    );
    assert!(others.is_empty(), "{others:?}");
    // Held: nothing forwarded while the human thinks.
    proxy.expect_silence(200).await;
    assert!(fx.server_tools().is_empty(), "{:?}", fx.server_tools());

    proxy
        .send(&reply(&question["id"], elicit_result("accept", Some(true))))
        .await;
    let response = proxy.recv_until_id(1).await;
    assert_eq!(
        result_text(&response),
        "deployed api to production",
        "{response}"
    );
    assert_eq!(finish(proxy).await.code(), Some(0));
    assert_eq!(
        fx.server_calls(),
        [("deploy_service".to_owned(), prod_with_secrets())]
    );
    let audit = fx.audit_of(1).await;
    assert_eq!(audit["outcome"], "approved", "{audit}");
}

#[tokio::test]
async fn protocol_2025_06_18_elicitation_has_no_mode() {
    let fx = Fixture::new();
    let config = fx.config(&["elicitation"], json!({}));
    let mut proxy = fx.raw(&config);
    let init = handshake(&mut proxy, "2025-06-18", json!({"elicitation": {}}), true).await;
    assert_eq!(init["protocolVersion"], "2025-06-18", "{init}");

    let mut others = Vec::new();
    let question = ask_legacy(&mut proxy, "d", prod(), &mut others).await;
    let params = &question["params"];
    assert!(
        params.get("mode").is_none(),
        "2025-06-18 has no elicitation modes: {question}"
    );
    proxy
        .send(&reply(&question["id"], elicit_result("decline", None)))
        .await;
    let response = proxy.recv_until_id("d").await;
    assert_not_approved(&response, "deploy_service", "approval_denied", "rejected");
    assert_eq!(finish(proxy).await.code(), Some(0));
    assert!(fx.server_tools().is_empty(), "{:?}", fx.server_tools());
}

#[tokio::test]
async fn protocol_before_2025_06_18_is_never_elicited() {
    let fx = Fixture::new();
    // A short timeout, so a proxy that does ask fails this test quickly (with status timeout).
    let config = fx.config(&["elicitation"], json!({"approvalTimeoutMs": 1000}));
    let mut proxy = fx.raw(&config);
    // The host claims elicitation, but 2025-03-26 has none.
    let init = handshake(&mut proxy, "2025-03-26", json!({"elicitation": {}}), true).await;
    assert_eq!(init["protocolVersion"], "2025-03-26", "{init}");

    let response = proxy.call_tool("d", "deploy_service", prod()).await;
    let data = assert_not_approved(&response, "deploy_service", "approval_denied", "rejected");
    assert!(
        data["reason"]
            .as_str()
            .is_some_and(|r| r.contains("no approval channel is available")),
        "{response}"
    );
    let stray: Vec<&Value> = proxy
        .stashed()
        .iter()
        .filter(|m| m["method"] == "elicitation/create")
        .collect();
    assert!(stray.is_empty(), "elicited in 2025-03-26: {stray:?}");
    assert_eq!(finish(proxy).await.code(), Some(0));
    assert!(fx.server_tools().is_empty(), "{:?}", fx.server_tools());
}

#[tokio::test]
async fn no_elicitation_before_notifications_initialized() {
    let fx = Fixture::new();
    // A short timeout, so a proxy that does ask fails this test quickly (with status timeout).
    let config = fx.config(&["elicitation"], json!({"approvalTimeoutMs": 1000}));
    let mut proxy = fx.raw(&config);
    // Declares elicitation, but never sends notifications/initialized.
    handshake(&mut proxy, "2025-11-25", json!({"elicitation": {}}), false).await;

    proxy
        .send(&util::legacy_call("d", "deploy_service", prod()))
        .await;
    let response = proxy.recv_until_id("d").await;
    assert_not_approved(&response, "deploy_service", "approval_denied", "rejected");
    let stray: Vec<&Value> = proxy
        .stashed()
        .iter()
        .filter(|m| m["method"] == "elicitation/create")
        .collect();
    assert!(stray.is_empty(), "elicited before initialized: {stray:?}");
    assert_eq!(finish(proxy).await.code(), Some(0));
    assert!(fx.server_tools().is_empty(), "{:?}", fx.server_tools());
}

#[tokio::test]
async fn elicitation_error_reply_falls_to_the_next_channel() {
    let fx = Fixture::new();
    let config = fx.config(&["elicitation", "local"], json!({}));
    let mut proxy = fx.raw_eliciting(&config).await;

    let mut others = Vec::new();
    let question = ask_legacy(&mut proxy, 1, prod(), &mut others).await;
    // A host that declared elicitation but cannot actually do it.
    proxy
        .send(&json!({
            "jsonrpc": "2.0",
            "id": question["id"],
            "error": {"code": -32601, "message": "Method not found"},
        }))
        .await;

    // Not an answer from a human: the call waits in the local queue now.
    let (ids, _) = fx.held(1, &proxy).await;
    assert!(
        proxy
            .try_recv_line(Duration::from_millis(200))
            .await
            .is_none(),
        "the host heard back before the local approval"
    );
    assert!(fx.server_tools().is_empty(), "{:?}", fx.server_tools());
    fx.answer(&["approve", &ids[0]]).await;
    let response = proxy.recv_until_id(1).await;
    assert_eq!(
        result_text(&response),
        "deployed api to production",
        "{response}"
    );
    assert_eq!(finish(proxy).await.code(), Some(0));
    assert_eq!(fx.server_tools(), ["deploy_service"]);
    assert!(others.is_empty(), "{others:?}");
}

// ---------------------------------------------------------------------------
// Id collisions: the upstream's server→host requests and the proxy's own
// ---------------------------------------------------------------------------

#[tokio::test]
async fn proxy_and_upstream_requests_to_the_host_never_collide() {
    let fx = Fixture::new();
    let config = fx.config(&["elicitation"], json!({}));
    let mut proxy = fx.raw(&config);
    handshake(
        &mut proxy,
        "2025-11-25",
        json!({"elicitation": {}, "roots": {}}),
        true,
    )
    .await;
    let mut others = Vec::new();
    let mut seen_ids: Vec<Value> = Vec::new();

    for round in 0..2 {
        // 1. The upstream asks the host a yes/no question with the same `approve` schema.
        proxy
            .send(&util::legacy_call(
                format!("ask-{round}"),
                "ask_elicit",
                json!({"message": format!("upstream question {round}")}),
            ))
            .await;
        let upstream_question = next_request(&mut proxy, "elicitation/create", &mut others).await;
        assert_eq!(
            upstream_question["params"]["message"],
            format!("upstream question {round}"),
            "{upstream_question}"
        );
        // 2. A held call: the proxy's own question, while the upstream's is outstanding.
        proxy
            .send(&util::legacy_call(
                format!("held-{round}"),
                "deploy_service",
                prod(),
            ))
            .await;
        let approval = next_request(&mut proxy, "elicitation/create", &mut others).await;
        assert_approval_question(&approval, "deploy_service");
        // 3. The upstream asks for roots too.
        proxy
            .send(&util::legacy_call(
                format!("roots-{round}"),
                "ask_roots",
                json!({}),
            ))
            .await;
        let roots = next_request(&mut proxy, "roots/list", &mut others).await;

        // Every server→host id is "apie:<n>" from one counter: distinct and increasing.
        let ids = [&upstream_question["id"], &approval["id"], &roots["id"]];
        let numbers: Vec<u64> = ids.iter().map(|id| apie_number(id)).collect();
        assert!(
            numbers.windows(2).all(|w| w[0] < w[1]),
            "ids {ids:?} are not from one increasing counter"
        );
        for id in ids {
            assert!(
                !seen_ids.contains(id),
                "id {id} was used twice: {seen_ids:?}"
            );
            seen_ids.push(id.clone());
        }

        // Answer in reverse order. Round 0: the upstream's question gets "yes" and the proxy's
        // "no"; round 1 the other way round. Each side must get its own answer.
        let (upstream_says, proxy_says) = if round == 0 {
            (
                elicit_result("accept", Some(true)),
                elicit_result("decline", None),
            )
        } else {
            (
                elicit_result("decline", None),
                elicit_result("accept", Some(true)),
            )
        };
        proxy
            .send(&reply(
                &roots["id"],
                json!({"roots": [{"uri": "file:///work/roots-check", "name": "r"}]}),
            ))
            .await;
        proxy.send(&reply(&approval["id"], proxy_says)).await;
        proxy
            .send(&reply(&upstream_question["id"], upstream_says.clone()))
            .await;

        let listed = proxy.recv_until_id(format!("roots-{round}")).await;
        assert!(
            result_text(&listed).contains("file:///work/roots-check"),
            "{listed}"
        );
        let asked = proxy.recv_until_id(format!("ask-{round}")).await;
        let upstream_got: Value =
            serde_json::from_str(&result_text(&asked)).expect("ask_elicit answers JSON");
        assert_eq!(upstream_got["action"], upstream_says["action"], "{asked}");
        if round == 0 {
            assert_eq!(upstream_got["content"]["approve"], true, "{asked}");
        }
        let held = proxy.recv_until_id(format!("held-{round}")).await;
        if round == 0 {
            assert_not_approved(&held, "deploy_service", "approval_denied", "rejected");
        } else {
            assert_eq!(result_text(&held), "deployed api to production", "{held}");
        }
    }
    assert_eq!(finish(proxy).await.code(), Some(0));
    // Round 0's deploy was refused; round 1's went through once approved, after the rest.
    assert_eq!(
        fx.server_tools(),
        [
            "ask_elicit",
            "ask_roots",
            "ask_elicit",
            "ask_roots",
            "deploy_service"
        ]
    );
    assert!(others.is_empty(), "unexpected messages: {others:?}");
}

// ---------------------------------------------------------------------------
// Host cancel, timeout, progress
// ---------------------------------------------------------------------------

#[tokio::test]
async fn host_cancel_of_a_held_call_cancels_the_elicitation() {
    let fx = Fixture::new();
    let config = fx.config(&["elicitation"], json!({}));
    let mut proxy = fx.raw_eliciting(&config).await;

    let mut others = Vec::new();
    let question = ask_legacy(&mut proxy, 5, prod(), &mut others).await;
    proxy
        .send(&notification(
            "notifications/cancelled",
            json!({"requestId": 5, "reason": "the user gave up"}),
        ))
        .await;

    // The host hears that the proxy's question is moot, and nothing about call 5.
    let cancelled = next_cancelled(&mut proxy, &mut others).await;
    assert_eq!(
        cancelled["params"]["requestId"], question["id"],
        "{cancelled}"
    );
    proxy.expect_silence(300).await;
    assert!(
        !others.iter().any(|m| m["id"] == 5),
        "the cancelled call was answered: {others:?}"
    );

    // A late answer to the cancelled question releases nothing.
    proxy
        .send(&reply(&question["id"], elicit_result("accept", Some(true))))
        .await;
    proxy.expect_silence(300).await;
    let echoed = proxy.call_tool(6, "echo", json!({"text": "next"})).await;
    assert_eq!(result_text(&echoed), "next", "{echoed}");
    assert!(
        !proxy.stashed().iter().any(|m| m["id"] == 5),
        "{:?}",
        proxy.stashed()
    );
    assert_eq!(finish(proxy).await.code(), Some(0));
    assert_eq!(
        fx.server_tools(),
        ["echo"],
        "the cancelled call was forwarded"
    );
    let audit = fx.audit_of(5).await;
    assert_eq!(audit["outcome"], "cancelled", "{audit}");
}

/// The next `notifications/cancelled` (stashed messages first); others go to `others`.
async fn next_cancelled(proxy: &mut RawSession, others: &mut Vec<Value>) -> Value {
    loop {
        let message = proxy.recv().await;
        if message["method"] == "notifications/cancelled" && message.get("id").is_none() {
            return message;
        }
        others.push(message);
    }
}

#[tokio::test]
async fn unanswered_elicitation_times_out_and_is_cancelled_at_the_host() {
    let fx = Fixture::new();
    let config = fx.config(&["elicitation"], json!({"approvalTimeoutMs": 300}));
    let mut proxy = fx.raw_eliciting(&config).await;

    let sent = Instant::now();
    let mut others = Vec::new();
    let question = ask_legacy(&mut proxy, "late", prod(), &mut others).await;
    // Nobody answers.
    let response = proxy.recv_until_id("late").await;
    let waited = sent.elapsed();
    assert_not_approved(&response, "deploy_service", "approval_timeout", "timeout");
    assert!(
        waited >= Duration::from_millis(300),
        "answered after {waited:?}, before the timeout"
    );
    assert!(
        waited < Duration::from_secs(3),
        "a 300 ms timeout took {waited:?}"
    );
    let cancelled = next_cancelled(&mut proxy, &mut others).await;
    assert_eq!(
        cancelled["params"]["requestId"], question["id"],
        "{cancelled}"
    );

    // Answering now changes nothing.
    proxy
        .send(&reply(&question["id"], elicit_result("accept", Some(true))))
        .await;
    proxy.expect_silence(300).await;
    assert_eq!(finish(proxy).await.code(), Some(0));
    assert!(fx.server_tools().is_empty(), "{:?}", fx.server_tools());
    let audit = fx.audit_of("late").await;
    assert_eq!(audit["status"], "timeout", "{audit}");
}

#[tokio::test]
async fn rmcp_host_sees_its_hanging_elicitation_cancelled_on_timeout() {
    let fx = Fixture::new();
    let config = fx.config(&["elicitation"], json!({"approvalTimeoutMs": 300}));
    let host = TestClient::new().with_elicit(ElicitAnswer::Hang);
    let log = host.log();
    let client = fx.connect(host, &config, Era::Legacy).await;
    deploy_refused(&client, "approval_timeout", "timeout").await;
    // rmcp ends the handler's wait when the proxy's notifications/cancelled arrives.
    let deadline = Instant::now() + Duration::from_secs(2);
    while log.elicitations_cancelled() == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        log.elicitations_cancelled(),
        1,
        "the host's question was never cancelled"
    );
    client.close().await;
    assert!(fx.server_tools().is_empty(), "{:?}", fx.server_tools());
}

#[tokio::test]
async fn held_call_with_a_progress_token_gets_increasing_progress() {
    let fx = Fixture::new();
    let config = fx.config(&["elicitation"], json!({}));
    let mut proxy = fx.raw_eliciting(&config).await;

    proxy.send(&steps_with_progress("p", "tok-p")).await;
    let mut others = Vec::new();
    let question = next_request(&mut proxy, "elicitation/create", &mut others).await;
    assert_approval_question(&question, "steps");
    // The hold's first progress notification comes when the hold begins.
    let deadline = Instant::now() + Duration::from_secs(2);
    while !others.iter().any(is_progress) {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(line) = proxy.try_recv_line(left).await else {
            panic!("no notifications/progress while held; got {others:?}");
        };
        others.push(serde_json::from_str(&line).expect("JSON"));
    }
    proxy
        .send(&reply(&question["id"], elicit_result("accept", Some(true))))
        .await;
    let response = proxy.recv_until_id("p").await;
    assert_eq!(result_text(&response), "did 3 steps", "{response}");
    others.extend(proxy.take_stashed());

    let progress: Vec<&Value> = others.iter().filter(|m| is_progress(m)).collect();
    for message in &progress {
        assert_eq!(message["params"]["progressToken"], "tok-p", "{message}");
    }
    let values: Vec<f64> = progress
        .iter()
        .map(|m| m["params"]["progress"].as_f64().expect("numeric progress"))
        .collect();
    assert!(
        values.windows(2).all(|w| w[0] < w[1]),
        "progress must strictly increase: {values:?}"
    );
    // One from the hold (n = 1), then the upstream's three shifted by 1.
    assert_eq!(values, [1.0, 2.0, 3.0, 4.0], "{progress:?}");
    for message in &progress[1..] {
        assert_eq!(
            message["params"]["total"], 4.0,
            "total shifted too: {message}"
        );
    }
    assert_eq!(
        progress[3]["params"]["message"], "step 3",
        "{:?}",
        progress[3]
    );
    assert_eq!(finish(proxy).await.code(), Some(0));
    assert_eq!(fx.server_tools(), ["steps"]);
}

/// A legacy `steps` call (`count` 3) that asks for progress under `token`.
fn steps_with_progress(id: impl Into<Value>, token: impl Into<Value>) -> Value {
    request(
        id,
        "tools/call",
        json!({
            "name": "steps",
            "arguments": {"count": 3},
            "_meta": {"progressToken": token.into()},
        }),
    )
}

fn is_progress(message: &Value) -> bool {
    message["method"] == "notifications/progress"
}

// ---------------------------------------------------------------------------
// 2026-07-28: input_required
// ---------------------------------------------------------------------------

/// Sends a 2026-07-28 `tools/call` from a host declaring elicitation ([`mcall`] with
/// [`eliciting`] and `extra`) and returns the response to it.
async fn call_eliciting(
    proxy: &mut RawSession,
    id: &str,
    tool: &str,
    arguments: Value,
    extra: Value,
) -> Value {
    proxy
        .send(&mcall(id, tool, arguments, eliciting(), extra))
        .await;
    proxy.recv_until_id(id).await
}

/// Sends a modern call declaring elicitation, asserts the proxy's `input_required` answer and
/// returns its `requestState`.
async fn ask_modern(proxy: &mut RawSession, id: &str, tool: &str, arguments: Value) -> String {
    let response = call_eliciting(proxy, id, tool, arguments, json!({})).await;
    assert_input_required(&response, tool)
}

/// Sends the retry of a modern call with `answer` to the proxy's question and `state`.
async fn retry_modern(
    proxy: &mut RawSession,
    id: &str,
    tool: &str,
    arguments: Value,
    answer: Value,
    state: &str,
) -> Value {
    call_eliciting(
        proxy,
        id,
        tool,
        arguments,
        retry_with(APPROVAL_KEY, answer, state),
    )
    .await
}

/// Asserts no call the upstream received carries anything of the proxy's own round.
fn assert_no_proxy_round_reached_the_upstream(fx: &Fixture) {
    for params in fx.server_params() {
        assert!(
            params["inputResponses"].get(APPROVAL_KEY).is_none(),
            "the proxy's answer reached the upstream: {params}"
        );
        assert!(
            !params["requestState"]
                .as_str()
                .is_some_and(|s| s.starts_with("apie1.")),
            "the proxy's requestState reached the upstream: {params}"
        );
    }
}

#[tokio::test]
async fn modern_call_is_answered_input_required_and_the_approved_retry_is_forwarded_once() {
    let fx = Fixture::new();
    let config = fx.config(&["elicitation"], json!({}));
    let mut proxy = fx.raw(&config);

    let state = ask_modern(&mut proxy, "m1", "deploy_service", prod_with_secrets()).await;
    assert!(fx.server_tools().is_empty(), "forwarded before approval");
    let audit = fx.audit_of("m1").await;
    assert_eq!(audit["outcome"], "approval_requested", "{audit}");

    let response = retry_modern(
        &mut proxy,
        "m2",
        "deploy_service",
        prod_with_secrets(),
        elicit_result("accept", Some(true)),
        &state,
    )
    .await;
    assert_eq!(
        result_text(&response),
        "deployed api to production",
        "{response}"
    );
    assert_ne!(
        response["result"]["resultType"], "input_required",
        "{response}"
    );
    proxy.expect_silence(200).await;
    assert_eq!(finish(proxy).await.code(), Some(0));

    assert_eq!(
        fx.server_calls(),
        [("deploy_service".to_owned(), prod_with_secrets())],
        "forwarded exactly once, with the real arguments"
    );
    let received = fx.server_params();
    assert_eq!(received.len(), 1, "{received:?}");
    assert!(
        received[0].get("requestState").is_none(),
        "the upstream got a requestState: {}",
        received[0]
    );
    assert!(
        received[0]["inputResponses"].get(APPROVAL_KEY).is_none(),
        "the upstream got the proxy's inputResponses: {}",
        received[0]
    );
    let audit = fx.audit_of("m2").await;
    assert_eq!(audit["outcome"], "approved", "{audit}");
}

#[tokio::test]
async fn modern_question_redacts_secret_arguments() {
    let fx = Fixture::new();
    let config = fx.config(&["elicitation"], json!({}));
    let mut proxy = fx.raw(&config);
    let response = call_eliciting(
        &mut proxy,
        "m",
        "deploy_service",
        prod_with_secrets(),
        json!({}),
    )
    .await;
    assert_input_required(&response, "deploy_service");
    let text = response["result"]["inputRequests"][APPROVAL_KEY]["params"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        text.contains("production") && text.contains(RULE),
        "{text:?}"
    );
    // Not in the question, and not readable from the state either.
    let raw = response.to_string();
    assert!(
        !raw.contains("hunter2") && !raw.contains("hunter3"),
        "a secret reached the host: {raw}"
    );
    assert_eq!(finish(proxy).await.code(), Some(0));
}

#[tokio::test]
async fn modern_refusals_are_never_forwarded() {
    let fx = Fixture::new();
    let config = fx.config(&["elicitation"], json!({}));
    let mut proxy = fx.raw(&config);
    for (n, (answer, status)) in [
        (elicit_result("decline", None), "rejected"),
        (elicit_result("accept", Some(false)), "rejected"),
        (elicit_result("cancel", None), "cancelled"),
    ]
    .into_iter()
    .enumerate()
    {
        let state = ask_modern(&mut proxy, &format!("ask-{n}"), "deploy_service", prod()).await;
        let response = retry_modern(
            &mut proxy,
            &format!("retry-{n}"),
            "deploy_service",
            prod(),
            answer,
            &state,
        )
        .await;
        assert_not_approved(&response, "deploy_service", "approval_denied", status);
    }
    assert_eq!(finish(proxy).await.code(), Some(0));
    assert!(fx.server_tools().is_empty(), "{:?}", fx.server_tools());
}

/// `state` with the character in the middle replaced by another one of the same class.
fn tampered(state: &str) -> String {
    let mut chars: Vec<char> = state.chars().collect();
    let mut at = chars.len() / 2;
    while !chars[at].is_ascii_alphanumeric() {
        at += 1;
    }
    chars[at] = match chars[at] {
        'A' => 'B',
        'a' => 'b',
        '0' => '1',
        c if c.is_ascii_digit() => '0',
        c if c.is_ascii_uppercase() => 'A',
        _ => 'a',
    };
    let forged: String = chars.into_iter().collect();
    assert_ne!(forged, state);
    forged
}

#[tokio::test]
async fn modern_forged_and_tampered_states_are_denied() {
    let fx = Fixture::new();
    let config = fx.config(&["elicitation"], json!({}));
    let mut proxy = fx.raw(&config);
    let state = ask_modern(&mut proxy, "ask", "deploy_service", prod()).await;

    let forgeries = [
        "not-a-state".to_owned(),
        "apie1.Zm9yZ2Vk.bm90IGEgbWFj".to_owned(),
        format!("{state}x"),
        tampered(&state),
    ];
    for (n, forged) in forgeries.iter().enumerate() {
        let response = retry_modern(
            &mut proxy,
            &format!("forged-{n}"),
            "deploy_service",
            prod(),
            elicit_result("accept", Some(true)),
            forged,
        )
        .await;
        let data = assert_not_approved(&response, "deploy_service", "approval_denied", "rejected");
        assert!(data.get("approval_id").is_some(), "{response}");
    }
    // The proxy's answer with no state at all: nothing binds it to a call.
    let stateless = call_eliciting(
        &mut proxy,
        "stateless",
        "deploy_service",
        prod(),
        json!({"inputResponses": {APPROVAL_KEY: elicit_result("accept", Some(true))}}),
    )
    .await;
    if stateless.get("error").is_some() {
        assert_not_approved(&stateless, "deploy_service", "approval_denied", "rejected");
    } else {
        assert_input_required(&stateless, "deploy_service");
    }
    assert!(
        fx.server_tools().is_empty(),
        "a forged state released the call: {:?}",
        fx.server_tools()
    );
    // The genuine state still works: the forgeries were refused for what they are.
    let response = retry_modern(
        &mut proxy,
        "genuine",
        "deploy_service",
        prod(),
        elicit_result("accept", Some(true)),
        &state,
    )
    .await;
    assert_eq!(
        result_text(&response),
        "deployed api to production",
        "{response}"
    );
    assert_eq!(finish(proxy).await.code(), Some(0));
    assert_eq!(fx.server_tools(), ["deploy_service"]);
}

#[tokio::test]
async fn modern_state_is_single_use() {
    let fx = Fixture::new();
    let config = fx.config(&["elicitation"], json!({}));
    let mut proxy = fx.raw(&config);
    let state = ask_modern(&mut proxy, "ask", "deploy_service", prod()).await;
    let first = retry_modern(
        &mut proxy,
        "once",
        "deploy_service",
        prod(),
        elicit_result("accept", Some(true)),
        &state,
    )
    .await;
    assert_eq!(result_text(&first), "deployed api to production", "{first}");

    let replayed = retry_modern(
        &mut proxy,
        "twice",
        "deploy_service",
        prod(),
        elicit_result("accept", Some(true)),
        &state,
    )
    .await;
    assert_not_approved(&replayed, "deploy_service", "approval_denied", "rejected");
    assert_eq!(finish(proxy).await.code(), Some(0));
    assert_eq!(
        fx.server_tools(),
        ["deploy_service"],
        "the replay was forwarded"
    );
}

#[tokio::test]
async fn modern_state_is_bound_to_the_tool_and_arguments() {
    let fx = Fixture::new();
    let config = fx.config(&["elicitation"], json!({}));
    let mut proxy = fx.raw(&config);
    let state = ask_modern(&mut proxy, "ask", "deploy_service", prod()).await;

    let staging = json!({"service": "api", "environment": "staging"});
    let other_args = retry_modern(
        &mut proxy,
        "other-args",
        "deploy_service",
        staging,
        elicit_result("accept", Some(true)),
        &state,
    )
    .await;
    assert_not_approved(&other_args, "deploy_service", "approval_denied", "rejected");

    // Same arguments, one more key.
    let mut extended = prod();
    extended["force"] = json!(true);
    let more_args = retry_modern(
        &mut proxy,
        "more-args",
        "deploy_service",
        extended,
        elicit_result("accept", Some(true)),
        &state,
    )
    .await;
    assert_not_approved(&more_args, "deploy_service", "approval_denied", "rejected");

    // Another tool that needs a human too.
    let other_tool = retry_modern(
        &mut proxy,
        "other-tool",
        "delete_file",
        json!({"path": "/srv/api"}),
        elicit_result("accept", Some(true)),
        &state,
    )
    .await;
    assert_not_approved(&other_tool, "delete_file", "approval_denied", "rejected");

    assert_eq!(finish(proxy).await.code(), Some(0));
    assert!(
        fx.server_tools().is_empty(),
        "a state released another call: {:?}",
        fx.server_tools()
    );
}

#[tokio::test]
async fn modern_state_expires() {
    let fx = Fixture::new();
    let config = fx.config(&["elicitation"], json!({"approvalTimeoutMs": 300}));
    let mut proxy = fx.raw(&config);
    let state = ask_modern(&mut proxy, "ask", "deploy_service", prod()).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let response = retry_modern(
        &mut proxy,
        "late",
        "deploy_service",
        prod(),
        elicit_result("accept", Some(true)),
        &state,
    )
    .await;
    assert_not_approved(&response, "deploy_service", "approval_denied", "expired");
    assert_eq!(finish(proxy).await.code(), Some(0));
    assert!(fx.server_tools().is_empty(), "{:?}", fx.server_tools());
}

#[tokio::test]
async fn modern_call_without_elicitation_falls_to_the_local_queue() {
    let fx = Fixture::new();
    let config = fx.config(&["elicitation", "local"], json!({}));
    let mut proxy = fx.raw(&config);
    // Elicitation is declared per request: this one declares none.
    proxy
        .send(&mcall("m", "deploy_service", prod(), json!({}), json!({})))
        .await;
    let (ids, _) = fx.held(1, &proxy).await;
    assert!(
        proxy
            .try_recv_line(Duration::from_millis(200))
            .await
            .is_none(),
        "the host was answered while the call waits in the local queue"
    );
    fx.answer(&["approve", &ids[0]]).await;
    let response = proxy.recv_until_id("m").await;
    assert_eq!(
        result_text(&response),
        "deployed api to production",
        "{response}"
    );
    assert_eq!(finish(proxy).await.code(), Some(0));
    assert_eq!(fx.server_tools(), ["deploy_service"]);
}

#[tokio::test]
async fn modern_call_without_elicitation_and_no_other_channel_is_refused() {
    let fx = Fixture::new();
    let config = fx.config(&["elicitation"], json!({}));
    let mut proxy = fx.raw(&config);
    // An earlier request declaring elicitation does not count for this one.
    let echoed = call_eliciting(
        &mut proxy,
        "first",
        "echo",
        json!({"text": "hi"}),
        json!({}),
    )
    .await;
    assert_eq!(result_text(&echoed), "hi", "{echoed}");

    let mut params = json!({"name": "deploy_service", "arguments": prod()});
    params["_meta"] = modern_meta_with(json!({"roots": {}}));
    assert!(
        params["_meta"][META_CLIENT_CAPABILITIES]
            .get("elicitation")
            .is_none()
    );
    proxy.send(&request("m", "tools/call", params)).await;
    let response = proxy.recv_until_id("m").await;
    assert_ne!(
        response["result"]["resultType"], "input_required",
        "{response}"
    );
    let data = assert_not_approved(&response, "deploy_service", "approval_denied", "rejected");
    assert!(
        data["reason"]
            .as_str()
            .is_some_and(|r| r.contains("no approval channel is available")),
        "{response}"
    );
    assert_eq!(finish(proxy).await.code(), Some(0));
    assert_eq!(fx.server_tools(), ["echo"]);
}

#[tokio::test]
async fn rmcp_modern_host_drives_the_approval_round_itself() {
    let fx = Fixture::new();
    let config = fx.config(&["elicitation"], json!({}));
    let host = TestClient::new().with_elicit(ElicitAnswer::Approve);
    let log = host.log();
    let client = fx.connect(host, &config, Era::Modern).await;
    let deployed = client
        .call_tool(call_params("deploy_service", prod()))
        .await
        .expect("approved by the host's own MRTR round");
    assert_eq!(first_text(&deployed), "deployed api to production");
    let questions = log.elicitation_messages();
    assert_eq!(questions.len(), 1, "{questions:?}");
    assert!(questions[0].starts_with("[apie-mcp]"), "{questions:?}");
    client.close().await;
    assert_eq!(fx.server_tools(), ["deploy_service"]);
    assert_no_proxy_round_reached_the_upstream(&fx);
}

#[tokio::test]
async fn rmcp_modern_host_declining_gets_the_refusal() {
    let fx = Fixture::new();
    let config = fx.config(&["elicitation"], json!({}));
    let host = TestClient::new().with_elicit(ElicitAnswer::Decline);
    let client = fx.connect(host, &config, Era::Modern).await;
    deploy_refused(&client, "approval_denied", "rejected").await;
    client.close().await;
    assert!(fx.server_tools().is_empty(), "{:?}", fx.server_tools());
}

// ---------------------------------------------------------------------------
// 2026-07-28: an upstream with input_required rounds of its own
// ---------------------------------------------------------------------------

/// Asserts `response` is the example server's own `input_required` answer to `confirm` with
/// `{"text": "x"}` (its one question, `Confirm x?`); returns its `requestState`.
fn assert_upstream_question(response: &Value) -> String {
    let result = &response["result"];
    assert_eq!(result["resultType"], "input_required", "{response}");
    let requests = result["inputRequests"]
        .as_object()
        .unwrap_or_else(|| panic!("no inputRequests: {response}"));
    assert_eq!(
        requests.keys().collect::<Vec<_>>(),
        [CONFIRM_KEY],
        "{response}"
    );
    assert_eq!(
        requests[CONFIRM_KEY]["params"]["message"], "Confirm x?",
        "{response}"
    );
    result["requestState"]
        .as_str()
        .unwrap_or_else(|| panic!("no requestState: {response}"))
        .to_owned()
}

/// Asserts the upstream received two calls, the second being the retry of its own round: its
/// own `requestState`, and the host's `answer` as the only `inputResponses`.
fn assert_upstream_got_its_round(fx: &Fixture, answer: &Value) {
    let received = fx.server_params();
    assert_eq!(received.len(), 2, "{received:?}");
    assert_eq!(
        received[1]["requestState"], "example-state.x",
        "{received:?}"
    );
    assert_eq!(
        received[1]["inputResponses"],
        json!({CONFIRM_KEY: answer}),
        "{received:?}"
    );
}

#[tokio::test]
async fn upstream_input_required_passes_through_untouched() {
    let fx = Fixture::new();
    let config = fx.config(&["elicitation"], json!({}));
    let mut proxy = fx.raw(&config);

    let first = call_eliciting(&mut proxy, "c1", "confirm", json!({"text": "x"}), json!({})).await;
    let state = assert_upstream_question(&first);
    assert_eq!(state, "example-state.x", "{first}");

    let answer = json!({"action": "accept", "content": {"ok": true}});
    let second = call_eliciting(
        &mut proxy,
        "c2",
        "confirm",
        json!({"text": "x"}),
        retry_with(CONFIRM_KEY, answer.clone(), "example-state.x"),
    )
    .await;
    assert_eq!(result_text(&second), "confirmed x", "{second}");
    assert_eq!(finish(proxy).await.code(), Some(0));

    assert_upstream_got_its_round(&fx, &answer);
    let audit = fx.audit();
    assert!(
        audit.iter().all(|l| l["outcome"] == "forwarded"),
        "{audit:?}"
    );
}

#[tokio::test]
async fn upstream_input_required_behind_the_proxys_approval_completes() {
    // `confirm` needs the human's approval and then asks its own question: an rmcp host
    // answering every question drives all the rounds and the call completes.
    let fx = Fixture::new();
    let config = fx.config(
        &["elicitation"],
        json!({"policies": policies(&["confirm"])}),
    );
    let host =
        TestClient::new().with_elicit(ElicitAnswer::Accept(json!({"approve": true, "ok": true})));
    let log = host.log();
    let client = fx.connect(host, &config, Era::Modern).await;
    let confirmed = client
        .call_tool(call_params("confirm", json!({"text": "x"})))
        .await
        .expect("approved, then confirmed");
    assert_eq!(first_text(&confirmed), "confirmed x");
    let questions = log.elicitation_messages();
    assert!(
        questions.iter().any(|q| q.starts_with("[apie-mcp]")),
        "{questions:?}"
    );
    assert!(questions.iter().any(|q| q == "Confirm x?"), "{questions:?}");
    client.close().await;

    let received = fx.server_params();
    let last = received
        .last()
        .unwrap_or_else(|| panic!("nothing reached the upstream"));
    assert_eq!(last["requestState"], "example-state.x", "{received:?}");
    assert_eq!(
        last["inputResponses"][CONFIRM_KEY]["content"]["ok"], true,
        "{received:?}"
    );
    assert_no_proxy_round_reached_the_upstream(&fx);
}

#[tokio::test]
async fn progress_of_a_call_never_held_is_not_shifted() {
    let fx = Fixture::new();
    let config = fx.config(
        &["elicitation"],
        json!({"policies": policies(&["deploy_service"])}),
    );
    let mut proxy = fx.raw_eliciting(&config).await;
    proxy.send(&steps_with_progress(7, 70)).await;
    let response = proxy.recv_until_id(7).await;
    assert_eq!(result_text(&response), "did 3 steps", "{response}");
    let progress: Vec<Value> = proxy
        .take_stashed()
        .into_iter()
        .filter(is_progress)
        .collect();
    let seen: Vec<(Value, Value, Value)> = progress
        .iter()
        .map(|m| {
            let p = &m["params"];
            (
                p["progressToken"].clone(),
                p["progress"].clone(),
                p["total"].clone(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            (json!(70), json!(1.0), json!(3.0)),
            (json!(70), json!(2.0), json!(3.0)),
            (json!(70), json!(3.0), json!(3.0)),
        ],
        "{progress:?}"
    );
    assert_eq!(finish(proxy).await.code(), Some(0));
}

// ---------------------------------------------------------------------------
// More than one held call; channels by default; modes; limits
// ---------------------------------------------------------------------------

#[tokio::test]
async fn two_held_calls_get_their_own_questions_and_answers() {
    let fx = Fixture::new();
    let config = fx.config(&["elicitation"], json!({}));
    let mut proxy = fx.raw_eliciting(&config).await;
    let mut others = Vec::new();

    proxy
        .send(&util::legacy_call("a", "deploy_service", prod()))
        .await;
    let question_a = next_request(&mut proxy, "elicitation/create", &mut others).await;
    let staging = json!({"service": "web", "environment": "staging"});
    proxy
        .send(&util::legacy_call("b", "deploy_service", staging.clone()))
        .await;
    let question_b = next_request(&mut proxy, "elicitation/create", &mut others).await;
    assert_ne!(question_a["id"], question_b["id"]);
    // Each question is about its own call.
    let text_b = question_b["params"]["message"].as_str().unwrap_or_default();
    assert!(
        text_b.contains("staging") && !text_b.contains("production"),
        "{text_b:?}"
    );

    // The second is approved first; the first is declined.
    proxy
        .send(&reply(
            &question_b["id"],
            elicit_result("accept", Some(true)),
        ))
        .await;
    let b = proxy.recv_until_id("b").await;
    assert_eq!(result_text(&b), "deployed web to staging", "{b}");
    proxy
        .send(&reply(&question_a["id"], elicit_result("decline", None)))
        .await;
    let a = proxy.recv_until_id("a").await;
    assert_not_approved(&a, "deploy_service", "approval_denied", "rejected");
    assert_eq!(finish(proxy).await.code(), Some(0));
    assert_eq!(
        fx.server_calls(),
        [("deploy_service".to_owned(), staging)],
        "only the approved call reached the server"
    );
    assert!(others.is_empty(), "{others:?}");
}

#[tokio::test]
async fn default_channels_without_a_guard_service_ask_the_host() {
    let fx = Fixture::new();
    // No `approvals` key: guard (unusable without a key), elicitation, local.
    let config = fx.config(&[], json!({}));
    let host = TestClient::new().with_elicit(ElicitAnswer::Approve);
    let log = host.log();
    let client = fx.connect(host, &config, Era::Legacy).await;
    let deployed = client
        .call_tool(call_params("deploy_service", prod()))
        .await
        .expect("approved in the host");
    assert_eq!(first_text(&deployed), "deployed api to production");
    assert_eq!(log.elicitations().len(), 1, "{:?}", log.elicitations());
    let (queued, listing) = fx.list().await;
    assert!(queued.is_empty(), "the local queue was used too: {listing}");
    client.close().await;
    assert_eq!(fx.server_tools(), ["deploy_service"]);
}

#[tokio::test]
async fn monitor_mode_never_asks_the_host() {
    let fx = Fixture::new();
    let config = fx.config(&["elicitation"], json!({"mode": "monitor"}));
    let host = TestClient::new().with_elicit(ElicitAnswer::Decline);
    let log = host.log();
    let client = fx.connect(host, &config, Era::Legacy).await;
    let deployed = client
        .call_tool(call_params("deploy_service", prod()))
        .await
        .expect("monitor forwards");
    assert_eq!(first_text(&deployed), "deployed api to production");
    assert!(log.elicitations().is_empty(), "{:?}", log.elicitations());
    client.close().await;
    assert_eq!(fx.server_tools(), ["deploy_service"]);
    let lines = fx.audit();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["outcome"], "would_require_approval", "{lines:?}");
}

#[tokio::test]
async fn modern_monitor_mode_never_answers_input_required() {
    let fx = Fixture::new();
    let config = fx.config(&["elicitation"], json!({"mode": "monitor"}));
    let mut proxy = fx.raw(&config);
    let response = call_eliciting(&mut proxy, "m", "deploy_service", prod(), json!({})).await;
    assert_eq!(
        result_text(&response),
        "deployed api to production",
        "{response}"
    );
    assert_eq!(finish(proxy).await.code(), Some(0));
    assert_eq!(fx.server_tools(), ["deploy_service"]);
}

#[tokio::test]
async fn a_call_waiting_on_the_host_counts_toward_max_pending_calls() {
    let fx = Fixture::new();
    let config = fx.config(&["elicitation"], json!({"maxPendingCalls": 1}));
    let mut proxy = fx.raw_eliciting(&config).await;
    let mut others = Vec::new();

    proxy
        .send(&util::legacy_call("a", "deploy_service", prod()))
        .await;
    let question = next_request(&mut proxy, "elicitation/create", &mut others).await;
    let started = Instant::now();
    let refused = proxy
        .call_tool("b", "delete_file", json!({"path": "/srv"}))
        .await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "the refusal waited"
    );
    assert_eq!(refused["error"]["code"], -32003, "{refused}");
    assert_eq!(
        refused["error"]["data"]["kind"], "too_many_pending_calls",
        "{refused}"
    );
    // Calls nobody has to decide on are not held, so not limited.
    let echoed = proxy.call_tool("e", "echo", json!({"text": "free"})).await;
    assert_eq!(result_text(&echoed), "free", "{echoed}");

    proxy
        .send(&reply(&question["id"], elicit_result("accept", Some(true))))
        .await;
    let a = proxy.recv_until_id("a").await;
    assert_eq!(result_text(&a), "deployed api to production", "{a}");
    assert_eq!(finish(proxy).await.code(), Some(0));
    assert_eq!(fx.server_tools(), ["echo", "deploy_service"]);
    let stray: Vec<&Value> = proxy_requests(&others).collect();
    assert!(stray.is_empty(), "{stray:?}");
}

/// The server→host requests among `messages`.
fn proxy_requests(messages: &[Value]) -> impl Iterator<Item = &Value> {
    messages
        .iter()
        .filter(|m| m.get("method").is_some() && m.get("id").is_some())
}

#[tokio::test]
async fn upstream_input_required_after_approval_is_not_a_reusable_pass() {
    // `confirm` needs the human's approval; once approved the upstream asks its own question.
    // The host's answer completes the call, once: the same retry again must not reach the
    // upstream without a human.
    let fx = Fixture::new();
    let config = fx.config(
        &["elicitation"],
        json!({"policies": policies(&["confirm"])}),
    );
    let mut proxy = fx.raw(&config);
    let text = json!({"text": "x"});

    let state = ask_modern(&mut proxy, "c1", "confirm", text.clone()).await;
    let second = retry_modern(
        &mut proxy,
        "c2",
        "confirm",
        text.clone(),
        elicit_result("accept", Some(true)),
        &state,
    )
    .await;
    // The upstream's own question reaches the host as it asked it.
    let upstream_state = assert_upstream_question(&second);

    let answer = json!({"action": "accept", "content": {"ok": true}});
    let final_retry = |id: &str| {
        mcall(
            id,
            "confirm",
            text.clone(),
            eliciting(),
            retry_with(CONFIRM_KEY, answer.clone(), &upstream_state),
        )
    };
    proxy.send(&final_retry("c3")).await;
    let third = proxy.recv_until_id("c3").await;
    assert_eq!(result_text(&third), "confirmed x", "{third}");
    assert_upstream_got_its_round(&fx, &answer);

    // The same retry once more: refused, or asked again; never forwarded.
    proxy.send(&final_retry("c4")).await;
    let replayed = proxy.recv_until_id("c4").await;
    if replayed.get("error").is_some() {
        assert_not_approved(&replayed, "confirm", "approval_denied", "rejected");
    } else {
        assert_input_required(&replayed, "confirm");
    }
    // And with other arguments: not this call's approval either.
    let other = call_eliciting(
        &mut proxy,
        "c5",
        "confirm",
        json!({"text": "y"}),
        retry_with(CONFIRM_KEY, answer.clone(), &upstream_state),
    )
    .await;
    if other.get("error").is_some() {
        assert_not_approved(&other, "confirm", "approval_denied", "rejected");
    } else {
        assert_input_required(&other, "confirm");
    }
    assert_eq!(finish(proxy).await.code(), Some(0));
    assert_eq!(
        fx.server_params().len(),
        2,
        "a replayed or altered retry reached the upstream: {:?}",
        fx.server_params()
    );
    assert_no_proxy_round_reached_the_upstream(&fx);
}

#[tokio::test]
async fn elicitation_error_reply_with_no_other_channel_is_refused() {
    let fx = Fixture::new();
    let config = fx.config(&["elicitation"], json!({}));
    let host = TestClient::new().with_elicit(ElicitAnswer::Error {
        code: -32601,
        message: "Method not found".to_owned(),
    });
    let log = host.log();
    let client = fx.connect(host, &config, Era::Legacy).await;
    let data = deploy_refused(&client, "approval_denied", "rejected").await;
    assert!(
        data["reason"]
            .as_str()
            .is_some_and(|r| r.contains("no approval channel is available")),
        "an error reply is not a human's answer: {data}"
    );
    assert_eq!(log.elicitations().len(), 1, "{:?}", log.elicitations());
    client.close().await;
    assert!(fx.server_tools().is_empty(), "{:?}", fx.server_tools());
}
