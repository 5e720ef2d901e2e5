//! The proxy end to end: the real `apie-mcp` binary over real pipes, in front of
//! `examples/example_server.rs` (or of `socket_bridge` when the test plays the upstream itself),
//! driven by rmcp clients of both eras and by raw JSON-RPC lines.
//!
//! What the upstream really received is read from `EXAMPLE_SERVER_LOG` (one line per
//! `tools/call` it saw) or from the bridge's socket; every line the host receives goes through
//! [`jsonrpc_line`], so any non-JSON-RPC byte on the proxy's stdout fails the test that saw it.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use rmcp::model::{CallToolRequestParams, CallToolResult, ErrorData};
use rmcp::service::ServiceError;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpListener;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use crate::util::{
    self, ElicitAnswer, Era, RawSession, TestClient, connect, is_response, is_tool_error,
    legacy_call, proxy_bin, result_text, sorted_sha256,
};

const WAIT: Duration = util::DEFAULT_RECV_TIMEOUT;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// Parses one line the host received and asserts it is JSON-RPC: a JSON object with
/// `"jsonrpc": "2.0"`, or a non-empty array of them (a batch answer). SPEC §2: stdout carries
/// JSON-RPC only, ever.
fn jsonrpc_line(line: &str) -> Value {
    let value: Value = serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("the host received a line that is not JSON ({e}): {line:?}"));
    let is_message = |m: &Value| m.is_object() && m["jsonrpc"] == "2.0";
    let ok = match &value {
        Value::Array(items) => !items.is_empty() && items.iter().all(is_message),
        other => is_message(other),
    };
    assert!(ok, "the host received JSON that is not JSON-RPC: {line:?}");
    value
}

/// The host's end of a proxy session over raw lines. Every line read is checked with
/// [`jsonrpc_line`]; responses waited for by id set other messages aside, in order.
struct Host {
    session: RawSession,
    stash: VecDeque<Value>,
    longest_line: usize,
}

impl Host {
    fn new(session: RawSession) -> Host {
        Host {
            session,
            stash: VecDeque::new(),
            longest_line: 0,
        }
    }

    async fn send(&mut self, message: &Value) {
        self.session.send(message).await;
    }

    async fn send_line(&mut self, line: &str) {
        self.session.send_line(line).await;
    }

    fn checked(&mut self, line: &str) -> Value {
        self.longest_line = self.longest_line.max(line.len());
        jsonrpc_line(line)
    }

    /// The next line, exactly as received (checked to be JSON-RPC).
    async fn recv_line(&mut self) -> String {
        assert!(
            self.stash.is_empty(),
            "recv_line with stashed messages: {:?}",
            self.stash
        );
        let line = self.session.recv_line().await;
        self.checked(&line);
        line
    }

    /// The next message: stashed ones first.
    async fn recv(&mut self) -> Value {
        if let Some(message) = self.stash.pop_front() {
            return message;
        }
        let line = self.session.recv_line().await;
        self.checked(&line)
    }

    /// The response whose id is `id`; anything else is stashed.
    async fn until_id(&mut self, id: impl Into<Value>) -> Value {
        let id = id.into();
        if let Some(pos) = self
            .stash
            .iter()
            .position(|m| is_response(m) && m["id"] == id)
        {
            return self.stash.remove(pos).expect("in range");
        }
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(line) = self.session.try_recv_line(left).await else {
                panic!(
                    "no response to id {id} within {WAIT:?}; stashed {:?}\n--- proxy stderr ---\n{}",
                    self.stash,
                    self.session.stderr_text()
                );
            };
            let message = self.checked(&line);
            if is_response(&message) && message["id"] == id {
                return message;
            }
            self.stash.push_back(message);
        }
    }

    async fn request(&mut self, id: impl Into<Value>, method: &str, params: Value) -> Value {
        let id = id.into();
        self.send(&util::request(id.clone(), method, params)).await;
        self.until_id(id).await
    }

    async fn call(&mut self, id: impl Into<Value>, name: &str, arguments: Value) -> Value {
        let id = id.into();
        self.send(&legacy_call(id.clone(), name, arguments)).await;
        self.until_id(id).await
    }

    /// Legacy handshake with the given client capabilities.
    async fn initialize(&mut self, capabilities: Value) -> Value {
        let response = self
            .request(
                0,
                "initialize",
                json!({
                    "protocolVersion": util::LEGACY_VERSION,
                    "capabilities": capabilities,
                    "clientInfo": {"name": "proxy-test-host", "version": "0.0.0"},
                }),
            )
            .await;
        assert!(response.get("result").is_some(), "initialize: {response}");
        self.send(&util::notification(
            "notifications/initialized",
            Value::Null,
        ))
        .await;
        response["result"].clone()
    }

    fn stderr(&self) -> String {
        self.session.stderr_text()
    }

    /// Closes stdin, checks every line still coming (until EOF) and waits for the exit.
    async fn finish(mut self) -> ExitStatus {
        self.session.close_stdin();
        self.drain_and_wait().await
    }

    /// Checks every remaining line until EOF, then waits for the proxy to exit.
    async fn drain_and_wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.session.try_recv_line(left).await {
                Some(line) => {
                    let message = self.checked(&line);
                    self.stash.push_back(message);
                }
                None => break,
            }
        }
        self.session.wait_exit(WAIT).await
    }
}

/// A temp directory holding a test's config, audit log and the example server's call log.
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

    /// A config in front of the example server (logging its calls), auditing to
    /// [`Self::audit_path`]; the top-level keys of `extra` are added or replace the base ones.
    fn config(&self, extra: Value) -> PathBuf {
        let upstream = json!({
            "command": util::example_server_bin(),
            "env": {"EXAMPLE_SERVER_LOG": self.server_log()},
        });
        self.config_with_upstream(upstream, extra)
    }

    fn config_with_upstream(&self, upstream: Value, extra: Value) -> PathBuf {
        let mut config = json!({
            "agentKey": "proxy-test-agent",
            "serverName": "files",
            "upstream": upstream,
            "audit": {"path": self.audit_path()},
        });
        if let Value::Object(extra) = extra {
            for (key, value) in extra {
                config[key] = value;
            }
        }
        util::write_config(self.path(), config)
    }

    /// `apie-mcp --config <config> args…`, run in the fixture's directory, with no guard
    /// service key and the state directory inside the fixture.
    fn host(&self, config: &Path, args: &[&str]) -> Host {
        let session = RawSession::builder(proxy_bin())
            .arg("--config")
            .arg(config)
            .args(args)
            .env_remove("APIE_API_KEY")
            .env_remove("APIE_MCP_CONFIG")
            .env("XDG_STATE_HOME", self.path().join("state"))
            .current_dir(self.path())
            .spawn();
        Host::new(session)
    }

    /// `apie-mcp --config <config> args…` as a tokio command (for rmcp clients).
    fn proxy_command(&self, config: &Path, args: &[&str]) -> tokio::process::Command {
        let mut command = util::proxy_command(["--config".as_ref(), config.as_os_str()]);
        command
            .args(args)
            .env_remove("APIE_API_KEY")
            .env_remove("APIE_MCP_CONFIG")
            .env("XDG_STATE_HOME", self.path().join("state"))
            .current_dir(self.path());
        command
    }

    /// Waits (bounded) until the audit log has at least `n` lines.
    async fn audit_at_least(&self, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + WAIT;
        loop {
            let lines = self.audit();
            if lines.len() >= n {
                return lines;
            }
            assert!(
                Instant::now() < deadline,
                "expected {n} audit lines, have {lines:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// A block rule on `*delete*`.
fn no_delete_rule() -> Value {
    json!({
        "name": "no-delete",
        "verbMatchers": [{"type": "verb", "value": "*delete*"}],
        "action": {"type": "block"},
        "reason": "deleting files is not allowed",
    })
}

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

/// The JSON-RPC error of an rmcp call that must have failed with one.
fn mcp_error(result: Result<CallToolResult, ServiceError>) -> ErrorData {
    match result {
        Err(ServiceError::McpError(error)) => error,
        other => panic!("expected a JSON-RPC error, got {other:?}"),
    }
}

/// The upstream played by the test, behind `socket_bridge`.
struct Bridge {
    lines: tokio::io::Lines<BufReader<OwnedReadHalf>>,
    write: OwnedWriteHalf,
}

impl Bridge {
    /// Binds a loopback listener; returns it and the upstream entry for the config.
    async fn listen() -> (TcpListener, Value) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let upstream = json!({"command": util::socket_bridge_bin(), "args": [addr]});
        (listener, upstream)
    }

    async fn accept(listener: TcpListener) -> Bridge {
        let (socket, _) = tokio::time::timeout(WAIT, listener.accept())
            .await
            .expect("the proxy never started the upstream")
            .expect("accept");
        let (read, write) = socket.into_split();
        Bridge {
            lines: BufReader::new(read).lines(),
            write,
        }
    }

    /// The next line the upstream received, exactly (without its newline).
    async fn recv_line(&mut self) -> String {
        match tokio::time::timeout(WAIT, self.lines.next_line()).await {
            Ok(Ok(Some(line))) => line,
            other => panic!("nothing reached the upstream: {other:?}"),
        }
    }

    async fn recv(&mut self) -> Value {
        let line = self.recv_line().await;
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("upstream got {line:?}: {e}"))
    }

    async fn send_line(&mut self, line: &str) {
        self.write
            .write_all(format!("{line}\n").as_bytes())
            .await
            .expect("write to the proxy");
    }

    async fn send(&mut self, message: &Value) {
        self.send_line(&message.to_string()).await;
    }
}

// ---------------------------------------------------------------------------
// 1, 2: rmcp clients of both eras
// ---------------------------------------------------------------------------

#[tokio::test]
async fn rmcp_legacy_client_allowed_blocked_and_denied() {
    let fx = Fixture::new();
    // Approvals only by elicitation, which this host rejects: the outcome is immediate.
    let config = fx.config(json!({
        "mode": "enforce",
        "policies": [no_delete_rule()],
        "approvals": {"channels": ["elicitation"]},
    }));

    // What the server itself lists, for comparison.
    let direct = connect(
        TestClient::new(),
        util::example_server_command(),
        Era::Legacy,
    )
    .await
    .expect("connect to the example server");
    let direct_tools = direct.list_all_tools().await.expect("tools/list");
    direct.close().await;

    // The host rejects any approval asked of it, so the outcome does not depend on which
    // approval channels exist.
    let host = TestClient::new().with_elicit(ElicitAnswer::Reject);
    let client = connect(host, fx.proxy_command(&config, &[]), Era::Legacy)
        .await
        .expect("connect through the proxy");

    let tools = client.list_all_tools().await.expect("tools/list");
    assert_eq!(
        serde_json::to_value(&tools).unwrap(),
        serde_json::to_value(&direct_tools).unwrap(),
        "tools/list (annotations included) must pass through unchanged"
    );
    let delete = tools.iter().find(|t| t.name == "delete_file").unwrap();
    assert_eq!(
        delete.annotations.as_ref().and_then(|a| a.destructive_hint),
        Some(true)
    );

    let echoed = client
        .call_tool(call_params("echo", json!({"text": "through the proxy"})))
        .await
        .expect("echo is allowed");
    assert_eq!(first_text(&echoed), "through the proxy");
    assert_ne!(echoed.is_error, Some(true));

    let blocked = mcp_error(
        client
            .call_tool(call_params("delete_file", json!({"path": "/etc/passwd"})))
            .await,
    );
    assert_eq!(blocked.code.0, -32001, "{blocked:?}");
    assert_eq!(blocked.message, "Action blocked by Apie guardrail");
    let data = blocked.data.expect("error data");
    assert_eq!(data["kind"], "guard_blocked", "{data}");
    assert_eq!(data["rule"], "no-delete", "{data}");
    assert_eq!(data["reason"], "deleting files is not allowed", "{data}");
    assert_eq!(data["tool"], "delete_file", "{data}");
    assert_eq!(data["mode"], "enforce", "{data}");
    // The Apie fields are all there (§7).
    assert_eq!(data["policy_decision"], "block", "{data}");
    assert_eq!(data["effective_decision"], "block", "{data}");
    assert_eq!(data["enforcement_action"], "block", "{data}");
    for key in ["decision_id", "matched_guardrail"] {
        assert!(data.get(key).is_some(), "data lacks {key}: {data}");
    }

    // deploy_service: critical by name inference → riskDefaults require_approval → denied.
    let denied = mcp_error(
        client
            .call_tool(call_params(
                "deploy_service",
                json!({"service": "api", "environment": "production"}),
            ))
            .await,
    );
    assert_eq!(denied.code.0, -32002, "{denied:?}");
    assert_eq!(denied.message, "Action not approved: rejected");
    let data = denied.data.expect("error data");
    assert_eq!(data["kind"], "approval_denied", "{data}");
    assert_eq!(data["status"], "rejected", "{data}");
    assert_eq!(data["tool"], "deploy_service", "{data}");

    // The session is still usable.
    let sum = client
        .call_tool(call_params("add", json!({"a": 2, "b": 3})))
        .await
        .expect("add");
    assert_eq!(first_text(&sum), "5");
    client.close().await;

    assert_eq!(fx.server_tools(), ["echo", "add"]);
    let audit = fx.audit_at_least(4).await;
    let outcomes: Vec<(&str, &str)> = audit
        .iter()
        .map(|l| (l["tool"].as_str().unwrap(), l["outcome"].as_str().unwrap()))
        .collect();
    assert_eq!(
        outcomes,
        [
            ("echo", "forwarded"),
            ("delete_file", "blocked"),
            ("deploy_service", "denied"),
            ("add", "forwarded"),
        ]
    );
    assert_eq!(audit[2]["riskLevel"], "critical");
}

#[tokio::test]
async fn rmcp_modern_client_allowed_and_blocked() {
    let fx = Fixture::new();
    let config = fx.config(json!({"mode": "enforce", "policies": [no_delete_rule()]}));
    let client = connect(
        TestClient::new(),
        fx.proxy_command(&config, &[]),
        Era::Modern,
    )
    .await
    .expect("server/discover through the proxy");
    let info = client.peer_info().expect("discover info");
    assert_eq!(
        info.protocol_version,
        rmcp::model::ProtocolVersion::V_2026_07_28
    );

    let tools = client.list_all_tools().await.expect("tools/list");
    assert!(tools.iter().any(|t| t.name == "delete_file"));

    let echoed = client
        .call_tool(call_params("echo", json!({"text": "modern"})))
        .await
        .expect("echo");
    assert_eq!(first_text(&echoed), "modern");

    let blocked = mcp_error(
        client
            .call_tool(call_params("delete_file", json!({"path": "/x"})))
            .await,
    );
    assert_eq!(blocked.code.0, -32001, "{blocked:?}");
    let data = blocked.data.expect("error data");
    assert_eq!(data["kind"], "guard_blocked", "{data}");
    assert_eq!(data["rule"], "no-delete", "{data}");
    assert_eq!(data["tool"], "delete_file", "{data}");
    client.close().await;

    assert_eq!(fx.server_tools(), ["echo"]);
}

// ---------------------------------------------------------------------------
// 3: every mode × decision cell
// ---------------------------------------------------------------------------

/// One rule per decision, each on its own harmless tool.
fn cell_policies() -> Value {
    json!([
        {"name": "r-allow", "verbMatchers": [{"type": "verb", "value": "echo"}],
         "action": {"type": "allow"}, "reason": "echo is fine"},
        {"name": "r-warn", "verbMatchers": [{"type": "verb", "value": "add"}],
         "action": {"type": "warn"}, "reason": "adding is noted"},
        {"name": "r-block", "verbMatchers": [{"type": "verb", "value": "read_file"}],
         "action": {"type": "block"}, "reason": "no reading"},
        {"name": "r-approve", "verbMatchers": [{"type": "verb", "value": "refund"}],
         "action": {"type": "require_approval"}, "reason": "refunds need a human"},
    ])
}

/// What a cell must produce.
enum Expect {
    /// Forwarded: the tool's own answer, audited with this outcome (None in off mode).
    Forwarded(&'static str, Option<&'static str>),
    /// Refused with this code and `data.kind`, audited with this outcome.
    Refused(i64, &'static str, &'static str),
}

/// Runs the four calls (allow, warn, block, require_approval) through a proxy whose config says
/// `config_mode` (and `args` on the command line), and checks answer, forwarding and audit.
async fn mode_cells(config_mode: &str, args: &[&str], audited_mode: &str, expect: [Expect; 4]) {
    let fx = Fixture::new();
    let config = fx.config(json!({
        "mode": config_mode,
        "policies": cell_policies(),
        // No host capability and no other channel: an approval cannot be obtained.
        "approvals": {"channels": ["elicitation"]},
    }));
    let mut host = fx.host(&config, args);
    host.initialize(json!({})).await;

    let calls = [
        ("echo", "allow", "r-allow", json!({"text": "e"})),
        ("add", "warn", "r-warn", json!({"a": 1, "b": 2})),
        ("read_file", "block", "r-block", json!({"path": "/r"})),
        (
            "refund",
            "require_approval",
            "r-approve",
            json!({"amount": 5, "charge_id": "ch_1"}),
        ),
    ];
    let mut forwarded = Vec::new();
    let mut audited = Vec::new();
    for (i, ((tool, decision, rule, arguments), expect)) in calls.iter().zip(&expect).enumerate() {
        let id = i as i64 + 1;
        let response = host.call(id, tool, arguments.clone()).await;
        let cell = format!("{config_mode} {args:?} × {decision}");
        match expect {
            Expect::Forwarded(text, outcome) => {
                assert_eq!(result_text(&response), *text, "{cell}: {response}");
                assert!(!is_tool_error(&response), "{cell}: {response}");
                forwarded.push(tool.to_string());
                if let Some(outcome) = outcome {
                    audited.push((id, *tool, *decision, *rule, *outcome));
                }
            }
            Expect::Refused(code, kind, outcome) => {
                assert_eq!(response["error"]["code"], *code, "{cell}: {response}");
                assert_eq!(
                    response["error"]["data"]["kind"], *kind,
                    "{cell}: {response}"
                );
                assert_eq!(
                    response["error"]["data"]["rule"], *rule,
                    "{cell}: {response}"
                );
                assert_eq!(
                    response["error"]["data"]["tool"], *tool,
                    "{cell}: {response}"
                );
                audited.push((id, *tool, *decision, *rule, *outcome));
            }
        }
    }
    let stderr = host.stderr();
    let status = host.finish().await;
    assert_eq!(status.code(), Some(0), "exit after stdin EOF\n{stderr}");

    assert_eq!(
        fx.server_tools(),
        forwarded,
        "{config_mode} {args:?}: what reached the upstream"
    );
    let audit = fx.audit();
    assert_eq!(
        audit.len(),
        audited.len(),
        "{config_mode} {args:?}: audit lines {audit:?}"
    );
    for (line, (id, tool, decision, rule, outcome)) in audit.iter().zip(&audited) {
        assert_eq!(line["requestId"], *id, "{line}");
        assert_eq!(line["tool"], *tool, "{line}");
        assert_eq!(line["decision"], *decision, "{line}");
        assert_eq!(line["rule"], *rule, "{line}");
        assert_eq!(line["outcome"], *outcome, "{line}");
        assert_eq!(line["mode"], audited_mode, "{line}");
    }
}

#[tokio::test]
async fn mode_enforce_cells() {
    mode_cells(
        "enforce",
        &[],
        "enforce",
        [
            Expect::Forwarded("e", Some("forwarded")),
            Expect::Forwarded("3", Some("forwarded")),
            Expect::Refused(-32001, "guard_blocked", "blocked"),
            Expect::Refused(-32002, "approval_denied", "denied"),
        ],
    )
    .await;
}

#[tokio::test]
async fn mode_monitor_cells() {
    mode_cells(
        "monitor",
        &[],
        "monitor",
        [
            Expect::Forwarded("e", Some("forwarded")),
            Expect::Forwarded("3", Some("forwarded")),
            Expect::Forwarded("contents of /r", Some("would_block")),
            Expect::Forwarded("refunded 5", Some("would_require_approval")),
        ],
    )
    .await;
}

/// `shadow` is monitor; given as `--mode`, it overrides the config's `enforce`.
#[tokio::test]
async fn mode_shadow_flag_cells() {
    mode_cells(
        "enforce",
        &["--mode", "shadow"],
        "monitor",
        [
            Expect::Forwarded("e", Some("forwarded")),
            Expect::Forwarded("3", Some("forwarded")),
            Expect::Forwarded("contents of /r", Some("would_block")),
            Expect::Forwarded("refunded 5", Some("would_require_approval")),
        ],
    )
    .await;
}

/// Off: everything forwarded, nothing evaluated or audited.
#[tokio::test]
async fn mode_off_cells() {
    mode_cells(
        "off",
        &[],
        "off",
        [
            Expect::Forwarded("e", None),
            Expect::Forwarded("3", None),
            Expect::Forwarded("contents of /r", None),
            Expect::Forwarded("refunded 5", None),
        ],
    )
    .await;
}

// ---------------------------------------------------------------------------
// 4: the upstream gets the very bytes the host sent
// ---------------------------------------------------------------------------

#[tokio::test]
async fn tools_call_is_forwarded_byte_for_byte() {
    let fx = Fixture::new();
    let (listener, upstream) = Bridge::listen().await;
    let config = fx.config_with_upstream(
        upstream,
        json!({
            "mode": "enforce",
            "policies": [{"name": "note-echo", "verbMatchers": [{"type": "verb", "value": "echo"}],
                          "action": {"type": "warn"}, "reason": "noted"}],
        }),
    );
    let mut host = fx.host(&config, &[]);
    let mut upstream = Bridge::accept(listener).await;

    let odd = r#"{ "params" : {"arguments":{"b":1, "a":"x"} ,"name":"echo"}, "id":9,"jsonrpc":"2.0","method":"tools/call"}"#;
    host.send_line(odd).await;
    let received = upstream.recv_line().await;
    assert_eq!(
        received, odd,
        "the upstream must receive the original bytes"
    );

    // The call was evaluated (not passed through unread).
    let audit = fx.audit_at_least(1).await;
    assert_eq!(audit[0]["requestId"], 9);
    assert_eq!(audit[0]["decision"], "warn");
    assert_eq!(audit[0]["outcome"], "forwarded");

    // The answer comes back untouched too.
    let answer = r#"{"result" : {"content":[{"type":"text","text":"x"}] ,"isError":false}, "id":9 ,"jsonrpc":"2.0"}"#;
    upstream.send_line(answer).await;
    assert_eq!(host.recv_line().await, answer);

    // And so does a non-tools/call request.
    let ping = r#"{"method":"ping" ,"jsonrpc":"2.0","id":"p-1" }"#;
    host.send_line(ping).await;
    assert_eq!(upstream.recv_line().await, ping);

    drop(upstream);
    let status = host.finish().await;
    assert!(status.code().is_some(), "{status}");
}

// ---------------------------------------------------------------------------
// 5: a slow call does not stall other traffic
// ---------------------------------------------------------------------------

#[tokio::test]
async fn slow_call_does_not_stall_other_traffic() {
    let fx = Fixture::new();
    let config = fx.config(json!({"mode": "enforce"}));
    let mut host = fx.host(&config, &[]);
    host.initialize(json!({})).await;

    host.send(&legacy_call("slow", "slow", json!({"ms": 1500})))
        .await;
    let sent = Instant::now();
    host.send(&util::request("p", "ping", Value::Null)).await;
    host.send(&legacy_call("e", "echo", json!({"text": "quick"})))
        .await;

    let mut order = Vec::new();
    let mut quick_done = None;
    while order.len() < 3 {
        let message = host.recv().await;
        assert!(is_response(&message), "{message}");
        let id = message["id"].as_str().unwrap().to_owned();
        if id == "e" {
            assert_eq!(result_text(&message), "quick");
        }
        if id == "slow" {
            assert_eq!(result_text(&message), "slept 1500");
        } else {
            quick_done = Some(sent.elapsed());
        }
        order.push(id);
    }
    // The server answers ping and echo concurrently, in either order; both before the slow call.
    assert_eq!(order[2], "slow", "{order:?}");
    let quick = quick_done.unwrap();
    assert!(
        quick < Duration::from_millis(1000),
        "ping and echo took {quick:?}: they waited for the slow call"
    );
    assert_eq!(host.finish().await.code(), Some(0));
}

// ---------------------------------------------------------------------------
// 6: hideBlockedTools
// ---------------------------------------------------------------------------

fn hide_config(fx: &Fixture, mode: &str, hide: bool) -> PathBuf {
    fx.config(json!({
        "mode": mode,
        "hideBlockedTools": hide,
        "policies": [
            no_delete_rule(),
            {"name": "no-big-refunds", "verbMatchers": [{"type": "verb", "value": "refund"}],
             "conditions": [{"field": "args.amount", "operator": "greater", "value": 100}],
             "action": {"type": "block"}},
        ],
    }))
}

async fn listed_tools(fx: &Fixture, config: &Path) -> Value {
    let mut host = fx.host(config, &[]);
    host.initialize(json!({})).await;
    let listed = host.request(1, "tools/list", Value::Null).await;
    assert_eq!(host.finish().await.code(), Some(0));
    listed["result"].clone()
}

fn tool_names(result: &Value) -> Vec<String> {
    result["tools"]
        .as_array()
        .unwrap_or_else(|| panic!("no tools in {result}"))
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn hide_blocked_tools() {
    // What the server lists on its own.
    let mut direct = RawSession::example_server();
    direct.initialize_legacy(json!({})).await;
    let direct_list = direct.request(1, "tools/list", Value::Null).await["result"].clone();
    direct.close_stdin();
    direct.wait_exit(WAIT).await;
    let all = tool_names(&direct_list);
    assert!(all.contains(&"delete_file".to_owned()));

    let fx = Fixture::new();
    // Enforce: delete_file (blocked by a static rule) is gone; refund (blocked only for some
    // amounts) stays; the rest is as the server sent it.
    let hidden = listed_tools(&fx, &hide_config(&fx, "enforce", true)).await;
    let names = tool_names(&hidden);
    let expected: Vec<String> = all
        .iter()
        .filter(|n| *n != "delete_file")
        .cloned()
        .collect();
    assert_eq!(names, expected);
    let by_name = |list: &Value, name: &str| {
        list["tools"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == name)
            .cloned()
    };
    assert_eq!(
        by_name(&hidden, "refund"),
        by_name(&direct_list, "refund"),
        "kept tools are unchanged"
    );

    // Monitor: nothing is blocked, nothing hidden: the list is the server's.
    let monitor = listed_tools(&fx, &hide_config(&fx, "monitor", true)).await;
    assert_eq!(monitor, direct_list);

    // Enforce without hideBlockedTools: nothing hidden either.
    let shown = listed_tools(&fx, &hide_config(&fx, "enforce", false)).await;
    assert_eq!(shown, direct_list);
}

// ---------------------------------------------------------------------------
// 7: blockResponse and errorCodes
// ---------------------------------------------------------------------------

#[tokio::test]
async fn block_response_tool_result() {
    for (codes, blocked_code) in [(json!(null), -32001), (json!({"blocked": -31001}), -31001)] {
        let fx = Fixture::new();
        let mut extra = json!({
            "mode": "enforce",
            "blockResponse": "toolResult",
            "policies": [no_delete_rule()],
        });
        if !codes.is_null() {
            extra["errorCodes"] = codes;
        }
        let config = fx.config(extra);
        let mut host = fx.host(&config, &[]);
        host.initialize(json!({})).await;
        let response = host.call(1, "delete_file", json!({"path": "/x"})).await;
        assert!(response.get("error").is_none(), "{response}");
        assert!(is_tool_error(&response), "{response}");
        let text = result_text(&response);
        let refusal: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("the result text is not JSON ({e}): {text}"));
        assert_eq!(refusal["code"], blocked_code, "{refusal}");
        assert_eq!(refusal["message"], "Action blocked by Apie guardrail");
        assert_eq!(refusal["data"]["kind"], "guard_blocked", "{refusal}");
        assert_eq!(refusal["data"]["rule"], "no-delete", "{refusal}");
        assert_eq!(refusal["data"]["tool"], "delete_file", "{refusal}");
        assert_eq!(host.finish().await.code(), Some(0));
        assert!(fx.server_tools().is_empty());
        assert_eq!(fx.audit()[0]["outcome"], "blocked");
    }
}

#[tokio::test]
async fn error_codes_move() {
    let fx = Fixture::new();
    let config = fx.config(json!({
        "mode": "enforce",
        "errorCodes": {"blocked": -31001, "approval": -31002, "guardUnavailable": -31003},
        "approvals": {"channels": ["elicitation"]},
        "policies": [no_delete_rule()],
    }));
    let mut host = fx.host(&config, &[]);
    host.initialize(json!({})).await;
    let blocked = host.call(1, "delete_file", json!({"path": "/x"})).await;
    assert_eq!(blocked["error"]["code"], -31001, "{blocked}");
    assert_eq!(blocked["error"]["data"]["kind"], "guard_blocked");
    let denied = host
        .call(
            2,
            "deploy_service",
            json!({"service": "api", "environment": "prod"}),
        )
        .await;
    assert_eq!(denied["error"]["code"], -31002, "{denied}");
    assert_eq!(denied["error"]["data"]["kind"], "approval_denied");
    assert_eq!(host.finish().await.code(), Some(0));
    assert!(fx.server_tools().is_empty());
}

// ---------------------------------------------------------------------------
// 8: risk from names and annotations
// ---------------------------------------------------------------------------

#[tokio::test]
async fn risk_defaults_apply_to_inferred_risk() {
    let fx = Fixture::new();
    let config = fx.config(json!({"mode": "enforce", "riskDefaults": {"high": "block"}}));
    let mut host = fx.host(&config, &[]);
    host.initialize(json!({})).await;
    let blocked = host.call(1, "delete_file", json!({"path": "/x"})).await;
    assert_eq!(blocked["error"]["code"], -32001, "{blocked}");
    assert_eq!(blocked["error"]["data"]["kind"], "guard_blocked");
    assert_eq!(blocked["error"]["data"]["rule"], Value::Null);
    let echoed = host.call(2, "echo", json!({"text": "fine"})).await;
    assert_eq!(result_text(&echoed), "fine");
    assert_eq!(host.finish().await.code(), Some(0));
    assert_eq!(fx.server_tools(), ["echo"]);
    let audit = fx.audit();
    assert_eq!(audit[0]["riskLevel"], "high", "{}", audit[0]);
    assert_eq!(audit[0]["decision"], "block");
    assert_eq!(audit[0]["outcome"], "blocked");
}

#[tokio::test]
async fn annotations_raise_risk_until_list_changed() {
    let fx = Fixture::new();
    let (listener, upstream) = Bridge::listen().await;
    let config = fx.config_with_upstream(
        upstream,
        json!({"mode": "enforce", "riskDefaults": {"high": "block"}}),
    );
    let mut host = fx.host(&config, &[]);
    let mut upstream = Bridge::accept(listener).await;

    // Before any tools/list, the harmless name is forwarded.
    host.send(&legacy_call(1, "frobnicate", json!({}))).await;
    let got = upstream.recv().await;
    assert_eq!(
        (got["id"].clone(), got["params"]["name"].clone()),
        (json!(1), json!("frobnicate"))
    );
    upstream
        .send(&json!({"jsonrpc": "2.0", "id": 1, "result": {"content": [{"type": "text", "text": "ok"}]}}))
        .await;
    assert_eq!(result_text(&host.until_id(1).await), "ok");

    // The server annotates it destructive.
    host.send(&util::request(2, "tools/list", Value::Null))
        .await;
    assert_eq!(upstream.recv().await["method"], "tools/list");
    let list = json!({"jsonrpc": "2.0", "id": 2, "result": {"tools": [
        {"name": "frobnicate", "inputSchema": {"type": "object"},
         "annotations": {"destructiveHint": true}},
        {"name": "delete_things", "inputSchema": {"type": "object"},
         "annotations": {"readOnlyHint": true}},
    ]}});
    upstream.send(&list).await;
    assert_eq!(host.until_id(2).await, list, "tools/list passes through");

    let blocked = host.call(3, "frobnicate", json!({})).await;
    assert_eq!(blocked["error"]["code"], -32001, "{blocked}");
    assert_eq!(blocked["error"]["data"]["kind"], "guard_blocked");
    // readOnlyHint never lowers what the name says (delete → high).
    let still = host.call(4, "delete_things", json!({})).await;
    assert_eq!(still["error"]["code"], -32001, "{still}");

    // list_changed forgets the annotations.
    upstream
        .send(&json!({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}))
        .await;
    let note = host.recv().await;
    assert_eq!(note["method"], "notifications/tools/list_changed");
    host.send(&legacy_call(5, "frobnicate", json!({}))).await;
    // The next thing the upstream sees is call 5: calls 3 and 4 never reached it.
    let got = upstream.recv().await;
    assert_eq!(
        (got["id"].clone(), got["params"]["name"].clone()),
        (json!(5), json!("frobnicate"))
    );
    upstream
        .send(&json!({"jsonrpc": "2.0", "id": 5, "result": {"content": [{"type": "text", "text": "ok"}]}}))
        .await;
    assert_eq!(result_text(&host.until_id(5).await), "ok");

    let audit = fx.audit_at_least(4).await;
    let risks: Vec<(&Value, &Value, &Value)> = audit
        .iter()
        .map(|l| (&l["requestId"], &l["riskLevel"], &l["outcome"]))
        .collect();
    assert_eq!(risks[1], (&json!(3), &json!("high"), &json!("blocked")));
    assert_eq!(risks[2], (&json!(4), &json!("high"), &json!("blocked")));
    assert_eq!(risks[3].0, &json!(5));
    assert_eq!(risks[3].2, &json!("forwarded"));
    assert_ne!(risks[3].1, &json!("high"));

    drop(upstream);
    host.finish().await;
}

// ---------------------------------------------------------------------------
// 9: the upstream exits mid-session
// ---------------------------------------------------------------------------

#[tokio::test]
async fn upstream_exit_fails_pending_requests_and_sets_exit_code() {
    let fx = Fixture::new();
    let config = fx.config(json!({"mode": "enforce"}));
    let mut host = fx.host(&config, &[]);
    host.initialize(json!({})).await;
    host.send(&legacy_call(1, "slow", json!({"ms": 5000})))
        .await;
    host.send(&legacy_call(2, "exit", json!({"code": 3}))).await;
    let started = Instant::now();

    for id in [1, 2] {
        let response = host.until_id(id).await;
        assert_eq!(response["error"]["code"], -32603, "{response}");
        assert_eq!(
            response["error"]["data"]["kind"], "upstream_exited",
            "{response}"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the pending slow call was answered only after {:?}",
        started.elapsed()
    );
    let status = host.drain_and_wait().await;
    assert_eq!(
        status.code(),
        Some(3),
        "the proxy exits with the upstream's code"
    );
    // (The server may exit before its slow task logged its call: only `exit` is certain.)
    assert!(fx.server_tools().contains(&"exit".to_owned()));
}

// ---------------------------------------------------------------------------
// 10: maxMessageBytes in both directions
// ---------------------------------------------------------------------------

#[tokio::test]
async fn max_message_bytes_both_directions() {
    let fx = Fixture::new();
    let config = fx.config(json!({"mode": "enforce", "maxMessageBytes": 4096}));
    let mut host = fx.host(&config, &[]);
    host.initialize(json!({})).await;

    // Host → proxy: refused with its id; the stream stays in sync.
    let long = "a".repeat(5000);
    let refused = host.call(7, "echo", json!({"text": long})).await;
    assert_eq!(refused["error"]["code"], -32600, "{refused}");
    let echoed = host.call(8, "echo", json!({"text": "after"})).await;
    assert_eq!(result_text(&echoed), "after");

    // Upstream → proxy: the host gets an error, never a partial line.
    let too_big = host.call(9, "big", json!({"bytes": 10_000})).await;
    assert_eq!(too_big["error"]["code"], -32603, "{too_big}");
    let small = host.call(10, "big", json!({"bytes": 100})).await;
    assert_eq!(result_text(&small).len(), 100);
    let echoed = host.call(11, "echo", json!({"text": "still fine"})).await;
    assert_eq!(result_text(&echoed), "still fine");

    let longest = host.longest_line;
    assert_eq!(host.finish().await.code(), Some(0));
    assert!(longest <= 4096, "the host got a {longest}-byte line");
    // The over-long host line never reached the server.
    assert_eq!(fx.server_tools(), ["echo", "big", "big", "echo"]);
}

// ---------------------------------------------------------------------------
// 12: the audit file
// ---------------------------------------------------------------------------

#[tokio::test]
async fn audit_lines_have_every_field_and_no_arguments() {
    const SECRET: &str = "sk-live-7f3c9a1e5b2d4c6f8a0b";
    const PASSWORD: &str = "hunter2-correct-horse-battery";
    let fx = Fixture::new();
    let config = fx.config(json!({"mode": "enforce", "policies": [no_delete_rule()]}));
    let mut host = Host::new(
        RawSession::builder(proxy_bin())
            .args(["--config".as_ref(), config.as_os_str()])
            .args(["--run-id", "run_test_audit_1"])
            .env_remove("APIE_API_KEY")
            .env("XDG_STATE_HOME", fx.path().join("state"))
            .env("RUST_LOG", "debug")
            .current_dir(fx.path())
            .spawn(),
    );
    host.initialize(json!({})).await;
    let echo_args = json!({"text": SECRET, "password": PASSWORD});
    let delete_args =
        json!({"path": format!("/srv/{SECRET}"), "zzz": 1, "aaa": [{"y": 2, "x": 1}]});
    let echoed = host.call("a-1", "echo", echo_args.clone()).await;
    assert_eq!(result_text(&echoed), SECRET);
    let blocked = host.call(2, "delete_file", delete_args.clone()).await;
    assert_eq!(blocked["error"]["code"], -32001);
    let stderr = host.stderr();
    assert_eq!(host.finish().await.code(), Some(0));

    let text = fx.audit_text();
    assert!(
        !text.contains(SECRET),
        "arguments in the audit log:\n{text}"
    );
    assert!(
        !text.contains(PASSWORD),
        "arguments in the audit log:\n{text}"
    );
    assert!(
        !stderr.contains(PASSWORD),
        "a redactKeys argument reached the logs:\n{stderr}"
    );
    let audit = fx.audit();
    assert_eq!(audit.len(), 2, "one line per evaluated call: {audit:?}");
    for line in &audit {
        for field in [
            "ts",
            "runId",
            "agentKey",
            "server",
            "mode",
            "requestId",
            "tool",
            "riskLevel",
            "decision",
            "outcome",
            "reason",
            "latencyMs",
            "argumentsSha256",
        ] {
            assert!(
                line.get(field).is_some(),
                "audit line lacks {field}: {line}"
            );
        }
        assert_eq!(line["runId"], "run_test_audit_1", "{line}");
        assert_eq!(line["agentKey"], "proxy-test-agent", "{line}");
        assert_eq!(line["server"], "files", "{line}");
        assert_eq!(line["mode"], "enforce", "{line}");
        let ts = line["ts"].as_str().expect("ts is a string");
        assert!(
            humantime_like(ts),
            "ts is not an RFC 3339 UTC timestamp: {ts}"
        );
        let latency = line["latencyMs"].as_f64().expect("latencyMs is a number");
        assert!((0.0..10_000.0).contains(&latency), "{line}");
    }
    assert_eq!(audit[0]["requestId"], "a-1");
    assert_eq!(audit[0]["tool"], "echo");
    assert_eq!(audit[0]["outcome"], "forwarded");
    assert_eq!(audit[0]["argumentsSha256"], sorted_sha256(&echo_args));
    assert_eq!(audit[1]["requestId"], 2);
    assert_eq!(audit[1]["tool"], "delete_file");
    assert_eq!(audit[1]["decision"], "block");
    assert_eq!(audit[1]["outcome"], "blocked");
    assert_eq!(audit[1]["rule"], "no-delete");
    assert_eq!(audit[1]["reason"], "deleting files is not allowed");
    assert_eq!(audit[1]["argumentsSha256"], sorted_sha256(&delete_args));
    // §8 lists `rule` (or `guardrail`) among the fields of every line, like `reason`: null when
    // no rule matched, not left out.
    for line in &audit {
        assert!(
            line.get("rule").is_some() || line.get("guardrail").is_some(),
            "audit line lacks rule/guardrail: {line}"
        );
    }
}

/// `YYYY-MM-DDTHH:MM:SS[.fff]Z`.
fn humantime_like(ts: &str) -> bool {
    let b = ts.as_bytes();
    b.len() >= 20
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && ts.ends_with('Z')
        && ts[..4].bytes().all(|c| c.is_ascii_digit())
}

/// Hosts built on Node hand their children a socket pair, not pipes, for stdio: the proxy must
/// drive those as well (and say nothing but JSON-RPC on them).
#[tokio::test]
async fn stdio_on_a_socket_pair_works_like_pipes() {
    use std::os::fd::OwnedFd;
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let theirs_out = theirs.try_clone().unwrap();
    let mut child = tokio::process::Command::new(crate::util::proxy_bin())
        .args(["--mode", "enforce", "--"])
        .arg(crate::util::example_server_bin())
        .env_remove("APIE_API_KEY")
        .env("APIE_MCP_STATE_DIR", std::env::temp_dir())
        .stdin(std::process::Stdio::from(OwnedFd::from(theirs)))
        .stdout(std::process::Stdio::from(OwnedFd::from(theirs_out)))
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    ours.set_nonblocking(true).unwrap();
    let stream = tokio::net::UnixStream::from_std(ours).unwrap();
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}});
    let call = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
        "params": {"name": "echo", "arguments": {"text": "over a socket"}}});
    write
        .write_all(format!("{init}\n{call}\n").as_bytes())
        .await
        .unwrap();
    let mut got = Vec::new();
    while got.len() < 2 {
        let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .expect("an answer in time")
            .unwrap()
            .expect("a line");
        got.push(serde_json::from_str::<Value>(&line).expect("JSON-RPC only"));
    }
    got.sort_by_key(|m| m["id"].as_i64());
    assert_eq!(got[0]["result"]["serverInfo"]["name"], "example-server");
    assert_eq!(got[1]["result"]["content"][0]["text"], "over a socket");
    // Hanging up ends the session cleanly.
    drop(write);
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("the proxy exits")
        .unwrap();
    assert_eq!(status.code(), Some(0));
}
