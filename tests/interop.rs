//! Interop with a third-party MCP server: `@modelcontextprotocol/server-everything` (the
//! TypeScript SDK's reference server, from npm) behind `apie-mcp` in enforce mode, driven by the
//! rmcp client and by raw lines in the legacy era. A module of the `tests` integration crate
//! (`mod interop;` in `tests/tests.rs`).
//!
//! `.ci/run` installs the server into `target/interop`; when it is missing the test runs the
//! same `npm install` itself (once per test process).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rmcp::model::CallToolRequestParams;
use rmcp::service::ServiceError;
use serde_json::{Value, json};

use crate::util::{
    self, ElicitAnswer, Era, LEGACY_VERSION, RawSession, TestClient, connect, is_response,
    proxy_bin, proxy_command, write_config,
};

/// The pinned package, exactly as `.ci/run` installs it.
const PACKAGE: &str = "@modelcontextprotocol/server-everything@2026.8.31";
/// Where `.ci/run` installs it, relative to the repo root.
const PREFIX: &str = "target/interop";
/// Its binary under [`PREFIX`].
const BIN: &str = "node_modules/.bin/mcp-server-everything";
/// `serverInfo.name` of that server.
const SERVER_NAME: &str = "mcp-servers/everything";
/// Put in the server's environment: `get-env` would print it, so it must never reach a host.
const CANARY: &str = "apie-interop-canary-5f0c1e";

/// The server's binary, installed with npm first if needed (once per process).
fn everything_bin() -> PathBuf {
    static INSTALLED: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    INSTALLED
        .get_or_init(install)
        .clone()
        .unwrap_or_else(|e| panic!("{e}"))
}

fn install() -> Result<PathBuf, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let bin = root.join(PREFIX).join(BIN);
    if bin.is_file() {
        return Ok(bin);
    }
    let output = std::process::Command::new("npm")
        .args([
            "install",
            "--silent",
            "--no-audit",
            "--no-fund",
            "--prefix",
            PREFIX,
            PACKAGE,
        ])
        .current_dir(root)
        .output()
        .map_err(|e| {
            format!(
                "the interop test needs {PACKAGE} in {PREFIX}, and cannot run npm to install it \
                 ({e}): install Node.js 20+ with npm, or run .ci/run"
            )
        })?;
    if !output.status.success() {
        return Err(format!(
            "`npm install --prefix {PREFIX} {PACKAGE}` failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    if !bin.is_file() {
        return Err(format!(
            "npm installed {PACKAGE} but {} is missing",
            bin.display()
        ));
    }
    Ok(bin)
}

/// The proxy's config: enforce mode, `get-env` blocked by a rule, approvals only by
/// elicitation, the server's environment carrying [`CANARY`].
fn config(dir: &Path) -> PathBuf {
    write_config(
        dir,
        json!({
            "agentKey": "interop-test",
            "serverName": "everything",
            "mode": "enforce",
            "audit": {"path": dir.join("audit.jsonl")},
            "approvalTimeoutMs": 5000,
            "approvals": {"channels": ["elicitation"]},
            "upstream": {
                "command": everything_bin(),
                "args": ["stdio"],
                "env": {"APIE_INTEROP_CANARY": CANARY},
            },
            "tools": {"trigger-elicitation-request": {"riskLevel": "low"}},
            "policies": [{
                "name": "no-env-dump",
                "verbMatchers": [{"type": "verb", "value": "everything.get-env"}],
                "action": {"type": "block"},
                "reason": "the server's environment holds credentials",
            }],
        }),
    )
}

fn call(name: &'static str, arguments: Value) -> CallToolRequestParams {
    let Value::Object(arguments) = arguments else {
        panic!("tool arguments must be an object");
    };
    CallToolRequestParams::new(name).with_arguments(arguments)
}

fn text_of(result: &rmcp::model::CallToolResult) -> String {
    result
        .content
        .iter()
        .filter_map(|block| block.as_text().map(|t| t.text.clone()))
        .collect()
}

/// The JSON-RPC error of a failed call (panics on anything else).
fn mcp_error(what: &str, outcome: Result<rmcp::model::CallToolResult, ServiceError>) -> Value {
    match outcome {
        Err(ServiceError::McpError(error)) => {
            serde_json::to_value(&error).expect("error data serializes")
        }
        Err(other) => panic!("{what}: expected a JSON-RPC error, got {other}"),
        Ok(result) => panic!("{what}: expected a JSON-RPC error, got result {result:?}"),
    }
}

#[tokio::test]
async fn everything_server_through_the_proxy_with_rmcp() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(dir.path());

    // The tools as the server lists them with nothing in between.
    let direct = connect(
        TestClient::new(),
        util::command(everything_bin(), ["stdio"]),
        Era::Legacy,
    )
    .await
    .expect("connect to the server directly");
    let direct_tools = direct.list_all_tools().await.expect("tools/list (direct)");
    direct.close().await;

    let host = TestClient::new().with_elicit(ElicitAnswer::Reject);
    let log = host.log();
    let mut command = proxy_command(["--config".as_ref(), config.as_os_str()]);
    command
        .current_dir(dir.path())
        .env("XDG_STATE_HOME", dir.path());
    let client = connect(host, command, Era::Legacy)
        .await
        .expect("connect through the proxy");
    let info = client.peer_info().expect("server info");
    assert_eq!(
        info.server_info.as_ref().map(|i| i.name.as_str()),
        Some(SERVER_NAME)
    );

    let tools = client.list_all_tools().await.expect("tools/list");
    let as_json = |tools: &[rmcp::model::Tool]| serde_json::to_value(tools).expect("tools");
    assert_eq!(
        as_json(&tools),
        as_json(&direct_tools),
        "tools/list changed on its way through the proxy"
    );
    let names: Vec<&str> = tools.iter().map(|t| t.name.as_ref()).collect();
    for name in [
        "echo",
        "get-sum",
        "get-env",
        "trigger-long-running-operation",
    ] {
        assert!(names.contains(&name), "{name} missing from {names:?}");
    }

    let echo = client
        .call_tool(call("echo", json!({"message": "through apie"})))
        .await
        .expect("echo");
    assert_eq!(text_of(&echo), "Echo: through apie");
    let sum = client
        .call_tool(call("get-sum", json!({"a": 2, "b": 40})))
        .await
        .expect("get-sum");
    assert!(text_of(&sum).contains("42"), "{sum:?}");

    let blocked = mcp_error(
        "get-env",
        client.call_tool(call("get-env", json!({}))).await,
    );
    assert_eq!(blocked["code"], json!(-32001), "{blocked}");
    assert_eq!(blocked["data"]["kind"], json!("guard_blocked"), "{blocked}");
    assert_eq!(blocked["data"]["rule"], json!("no-env-dump"), "{blocked}");
    assert!(
        blocked["data"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("credentials")),
        "{blocked}"
    );
    assert!(!blocked.to_string().contains(CANARY), "{blocked}");

    // `trigger` → high risk → riskDefaults: require_approval; the host rejects (or, with no
    // channel at hand, nobody approves).
    let held = mcp_error(
        "trigger-long-running-operation",
        client
            .call_tool(call(
                "trigger-long-running-operation",
                json!({"duration": 1, "steps": 1}),
            ))
            .await,
    );
    assert_eq!(held["code"], json!(-32002), "{held}");
    assert!(
        held["data"]["kind"]
            .as_str()
            .is_some_and(|k| k.starts_with("approval_")),
        "{held}"
    );

    // The server asks for the host's roots on its own, shortly after `initialized`.
    let deadline = Instant::now() + Duration::from_secs(5);
    while log.roots_requests() == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        log.roots_requests() > 0,
        "roots/list never reached the host"
    );
    let roots = client
        .call_tool(call("get-roots-list", json!({})))
        .await
        .expect("get-roots-list");
    assert!(
        text_of(&roots).contains("file:///tmp/apie-test-root"),
        "{roots:?}"
    );

    let stderr = client.stderr_text();
    assert!(!stderr.contains(CANARY), "the environment reached the logs");
    client.close().await;
}

// ---------------------------------------------------------------------------
// Raw lines
// ---------------------------------------------------------------------------

/// Every stdout line, raw and parsed, with server→host requests answered the way a host would:
/// `roots/list` with one root, `elicitation/create` declined.
struct Host {
    session: RawSession,
    lines: Vec<String>,
    roots_requests: Vec<Value>,
    elicitations: Vec<Value>,
    notifications: Vec<Value>,
}

const HOST_ROOT: &str = "file:///tmp/apie-interop-root";

impl Host {
    /// Reads one stdout line (bounded by `limit`; `None` on timeout or EOF), checks it, answers
    /// it if it is a server→host request, records it if it is a notification, and returns it
    /// (raw and parsed).
    async fn next(&mut self, limit: Duration) -> Option<(String, Value)> {
        let line = self.session.try_recv_line(limit).await?;
        assert!(
            !line.contains(CANARY),
            "the environment reached the host: {line}"
        );
        let message: Value = serde_json::from_str(&line).unwrap_or_else(|e| {
            panic!(
                "stdout line is not JSON ({e}): {line:?}\n--- proxy stderr ---\n{}",
                self.session.stderr_text()
            )
        });
        self.lines.push(line.clone());
        if !is_response(&message) {
            match (message["method"].as_str(), message.get("id")) {
                (Some("roots/list"), Some(id)) => {
                    let answer = json!({"jsonrpc": "2.0", "id": id,
                        "result": {"roots": [{"uri": HOST_ROOT, "name": "interop"}]}});
                    self.session.send(&answer).await;
                    self.roots_requests.push(message.clone());
                }
                (Some("elicitation/create"), Some(id)) => {
                    let answer =
                        json!({"jsonrpc": "2.0", "id": id, "result": {"action": "decline"}});
                    self.session.send(&answer).await;
                    self.elicitations.push(message.clone());
                }
                (Some(method), Some(_)) => panic!("unexpected server→host request {method}"),
                _ => self.notifications.push(message.clone()),
            }
        }
        Some((line, message))
    }

    /// Sends a request and waits (bounded) for its response (raw line and parsed), handling
    /// whatever comes in between.
    async fn request(&mut self, id: i64, method: &str, params: Value) -> (String, Value) {
        self.session.send(&util::request(id, method, params)).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some((line, message)) = self.next(left).await else {
                panic!(
                    "no response to {method} (id {id}) within 10 s\n--- proxy stderr ---\n{}",
                    self.session.stderr_text()
                );
            };
            if is_response(&message) {
                assert_eq!(message["id"], json!(id), "unexpected response {line}");
                return (line, message);
            }
        }
    }

    async fn call(&mut self, id: i64, name: &str, arguments: Value) -> Value {
        self.request(
            id,
            "tools/call",
            json!({"name": name, "arguments": arguments}),
        )
        .await
        .1
    }

    /// Reads (bounded) until a notification satisfying `pred` was seen.
    async fn wait_notification(&mut self, what: &str, pred: impl Fn(&Value) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.notifications.iter().any(&pred) {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some((line, message)) = self.next(left).await else {
                panic!(
                    "no {what} within 5 s; notifications: {:?}",
                    self.notifications
                );
            };
            assert!(!is_response(&message), "unexpected response {line}");
        }
    }
}

fn initialize_params() -> Value {
    json!({
        "protocolVersion": LEGACY_VERSION,
        "capabilities": {"roots": {"listChanged": true}, "elicitation": {"form": {}}},
        "clientInfo": {"name": "apie-interop-host", "version": "0.0.0"},
    })
}

/// The raw `tools/list` response line of the server itself, after the same handshake.
async fn direct_tools_list_line() -> String {
    let mut session = RawSession::spawn(everything_bin(), ["stdio"]);
    // Wait for the `initialize` answer, as the proxied session does: the server registers some
    // tools only once it knows the client's capabilities, and a burst races with that.
    session.request(0, "initialize", initialize_params()).await;
    session
        .send(&util::notification(
            "notifications/initialized",
            Value::Null,
        ))
        .await;
    session
        .send(&util::request(1, "tools/list", json!({})))
        .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = session.recv_line_within(left).await;
        let message: Value = serde_json::from_str(&line).expect("server line is JSON");
        if is_response(&message) && message["id"] == json!(1) {
            return line;
        }
    }
}

#[tokio::test]
async fn everything_server_through_the_proxy_with_raw_lines() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(dir.path());
    let direct_list = direct_tools_list_line().await;

    let session = RawSession::builder(proxy_bin())
        .arg("--config")
        .arg(&config)
        .env("XDG_STATE_HOME", dir.path())
        .current_dir(dir.path())
        .spawn();
    let mut host = Host {
        session,
        lines: Vec::new(),
        roots_requests: Vec::new(),
        elicitations: Vec::new(),
        notifications: Vec::new(),
    };

    let (_, init) = host.request(0, "initialize", initialize_params()).await;
    assert_eq!(
        init["result"]["serverInfo"]["name"],
        json!(SERVER_NAME),
        "{init}"
    );
    assert_eq!(init["result"]["protocolVersion"], json!(LEGACY_VERSION));
    host.session
        .send(&util::notification(
            "notifications/initialized",
            Value::Null,
        ))
        .await;

    // Pass-through traffic keeps its bytes.
    let (list_line, list) = host.request(1, "tools/list", json!({})).await;
    assert_eq!(
        list_line, direct_list,
        "tools/list changed on its way through the proxy"
    );
    assert!(
        list["result"]["tools"]
            .as_array()
            .is_some_and(|t| t.len() > 5)
    );

    let echo = host.call(2, "echo", json!({"message": "raw"})).await;
    assert_eq!(util::result_text(&echo), "Echo: raw", "{echo}");
    let sum = host.call(3, "get-sum", json!({"a": 1.5, "b": 2})).await;
    assert!(util::result_text(&sum).contains("3.5"), "{sum}");

    let blocked = host.call(4, "get-env", json!({})).await;
    assert_eq!(blocked["error"]["code"], json!(-32001), "{blocked}");
    assert_eq!(blocked["error"]["data"]["kind"], json!("guard_blocked"));
    assert_eq!(blocked["error"]["data"]["rule"], json!("no-env-dump"));

    let held = host
        .call(
            5,
            "trigger-long-running-operation",
            json!({"duration": 1, "steps": 1}),
        )
        .await;
    // The host declared elicitation, so the proxy asked it (and this host declines).
    assert_eq!(held["error"]["code"], json!(-32002), "{held}");
    assert_eq!(held["error"]["data"]["status"], json!("rejected"), "{held}");

    // The server's own roots/list request (sent 350 ms after `initialized`), answered by the
    // host through the proxy: the server confirms it with a log notification.
    host.wait_notification("roots confirmation", |n| {
        n["method"] == json!("notifications/message")
            && n["params"]["data"]
                .as_str()
                .is_some_and(|d| d.contains("1 root(s) received"))
    })
    .await;
    assert_eq!(host.roots_requests.len(), 1, "{:?}", host.roots_requests);
    let roots = host.call(6, "get-roots-list", json!({})).await;
    assert!(util::result_text(&roots).contains(HOST_ROOT), "{roots}");

    // A server→host request inside an allowed call (declared low risk in the config).
    let elicited = host.call(7, "trigger-elicitation-request", json!({})).await;
    assert!(elicited.get("result").is_some(), "{elicited}");
    let (ours, theirs): (Vec<&Value>, Vec<&Value>) = host.elicitations.iter().partition(|e| {
        e["params"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("[apie-mcp]"))
    });
    assert_eq!(
        (ours.len(), theirs.len()),
        (1, 1),
        "{:?}",
        host.elicitations
    );
    assert_ne!(ours[0]["id"], theirs[0]["id"], "ids must never collide");
    assert!(
        util::result_text(&elicited)
            .to_lowercase()
            .contains("decline"),
        "{elicited}"
    );

    host.session.close_stdin();
    let status = host.session.wait_exit(Duration::from_secs(8)).await;
    assert_eq!(status.code(), Some(0), "{}", host.session.stderr_text());
    while let Some(line) = host.session.try_recv_line(Duration::from_millis(200)).await {
        assert!(
            serde_json::from_str::<Value>(&line).is_ok(),
            "not JSON: {line}"
        );
        assert!(!line.contains(CANARY), "{line}");
    }
    assert!(!host.session.stderr_text().contains(CANARY));
}
