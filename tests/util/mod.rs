//! Integration-test harness for `apie-mcp`.
//!
//! - Binaries: [`proxy_bin`], [`example_bin`] (the `examples/` built next to
//!   the proxy; `cargo test` builds them, `cargo test --test X` does not).
//! - [`RawSession`]: drive a process (usually the proxy) line by line over its
//!   stdin/stdout, with stderr captured to a file.
//! - JSON-RPC builders: [`request`], [`notification`], [`legacy_call`],
//!   [`modern_meta`], [`modern_request`], [`modern_call`], plus result readers
//!   [`result_text`] and [`is_tool_error`].
//! - Config files: [`write_config`].
//! - rmcp host: [`connect`] spawns a command as an MCP client in either era and
//!   [`TestClient`] answers elicitation and roots the way a test asks.
//! - One test's directory: [`Scratch`] (config, audit log, the example server's call log,
//!   the state directory and the `approvals` CLI over it), plus [`finish`].
#![allow(dead_code)]
#![allow(
    deprecated,
    reason = "roots are deprecated by SEP-2577, but legacy hosts still answer roots/list"
)]

use std::collections::VecDeque;
use std::ffi::OsStr;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rmcp::model::{
    CancelledNotificationParam, ClientCapabilities, ClientConfig, ElicitRequestParams,
    ElicitResult, ElicitationAction, ElicitationCapability, ErrorCode, ErrorData, Implementation,
    ListRootsResult, ProgressNotificationParam, ProtocolVersion, Root,
};
use rmcp::service::{NotificationContext, RequestContext, RunningService};
use rmcp::transport::TokioChildProcess;
use rmcp::{
    ClientHandler, ClientLifecycleMode, ClientServiceExt as _, RoleClient, ServiceExt as _,
};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;

pub mod apie;
pub mod tls;

/// Legacy-era protocol version the harness sends in `initialize`.
pub const LEGACY_VERSION: &str = "2025-11-25";
/// The stateless protocol version (no `initialize`, `_meta` on every request).
pub const MODERN_VERSION: &str = "2026-07-28";
/// How long [`RawSession::recv`] and friends wait by default.
pub const DEFAULT_RECV_TIMEOUT: Duration = Duration::from_secs(10);
/// `_meta` key naming the request's protocol version (2026-07-28).
pub const META_PROTOCOL_VERSION: &str = "io.modelcontextprotocol/protocolVersion";
/// `_meta` key carrying the request's client capabilities (2026-07-28).
pub const META_CLIENT_CAPABILITIES: &str = "io.modelcontextprotocol/clientCapabilities";

// ---------------------------------------------------------------------------
// Binaries
// ---------------------------------------------------------------------------

/// The `apie-mcp` binary under test.
pub fn proxy_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_apie-mcp"))
}

/// `target/<profile>/examples/<name>`, next to the proxy binary.
///
/// Panics when it is missing: `cargo test` (with no target filter) builds the
/// examples, `cargo test --test tests` alone does not.
pub fn example_bin(name: &str) -> PathBuf {
    let proxy = proxy_bin();
    let profile_dir = proxy
        .parent()
        .expect("the proxy binary has a parent directory");
    let path = profile_dir
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.is_file(),
        "example binary {} is missing: run `cargo build --examples` (or a plain `cargo test`, \
         which builds examples) before running the integration tests",
        path.display()
    );
    path
}

/// The example upstream server (`examples/example_server.rs`).
pub fn example_server_bin() -> PathBuf {
    example_bin("example_server")
}

/// The TCP bridge upstream (`examples/socket_bridge.rs`).
pub fn socket_bridge_bin() -> PathBuf {
    example_bin("socket_bridge")
}

// ---------------------------------------------------------------------------
// JSON-RPC builders and readers
// ---------------------------------------------------------------------------

/// A JSON-RPC request; `params` is left out when it is `Value::Null`.
pub fn request(id: impl Into<Value>, method: &str, params: Value) -> Value {
    let mut message = json!({"jsonrpc": "2.0", "id": id.into(), "method": method});
    if !params.is_null() {
        message["params"] = params;
    }
    message
}

/// A JSON-RPC notification; `params` is left out when it is `Value::Null`.
pub fn notification(method: &str, params: Value) -> Value {
    let mut message = json!({"jsonrpc": "2.0", "method": method});
    if !params.is_null() {
        message["params"] = params;
    }
    message
}

/// A legacy-era `tools/call` request.
pub fn legacy_call(id: impl Into<Value>, name: &str, arguments: Value) -> Value {
    request(
        id,
        "tools/call",
        json!({"name": name, "arguments": arguments}),
    )
}

/// The `_meta` object every 2026-07-28 request must carry, with empty client
/// capabilities.
pub fn modern_meta() -> Value {
    modern_meta_with(json!({}))
}

/// [`modern_meta`] with the given client capabilities, e.g.
/// `json!({"elicitation": {"form": {}}})`.
pub fn modern_meta_with(client_capabilities: Value) -> Value {
    json!({
        META_PROTOCOL_VERSION: MODERN_VERSION,
        META_CLIENT_CAPABILITIES: client_capabilities,
    })
}

/// A 2026-07-28 request: `params` (an object, or null for none) gets
/// `_meta` = [`modern_meta`] merged in (keys already in `params._meta` win).
pub fn modern_request(id: impl Into<Value>, method: &str, params: Value) -> Value {
    let mut params = match params {
        Value::Null => json!({}),
        Value::Object(_) => params,
        other => panic!("modern_request params must be an object, got {other}"),
    };
    let mut meta = modern_meta();
    if let Some(Value::Object(existing)) = params.get("_meta") {
        for (key, value) in existing {
            meta[key] = value.clone();
        }
    }
    params["_meta"] = meta;
    request(id, method, params)
}

/// A 2026-07-28 `tools/call` request (with [`modern_meta`]).
pub fn modern_call(id: impl Into<Value>, name: &str, arguments: Value) -> Value {
    modern_request(
        id,
        "tools/call",
        json!({"name": name, "arguments": arguments}),
    )
}

/// The text blocks of a `tools/call` response (`result.content[*].text`),
/// concatenated. Panics when the response is not a result.
pub fn result_text(response: &Value) -> String {
    let content = response["result"]["content"]
        .as_array()
        .unwrap_or_else(|| panic!("not a tools/call result: {response}"));
    content
        .iter()
        .filter_map(|block| block["text"].as_str())
        .collect()
}

/// Asserts `response` is the -32002 refusal of a held call (`Action not approved: <status>`)
/// with `data.kind` and `data.status`; returns its `error.data` for the checks a suite adds.
pub fn assert_not_approved(response: &Value, kind: &str, status: &str) -> Value {
    let error = &response["error"];
    assert_eq!(error["code"], -32002, "{response}");
    assert_eq!(
        error["message"],
        format!("Action not approved: {status}"),
        "{response}"
    );
    let data = &error["data"];
    assert_eq!(data["kind"], kind, "{response}");
    assert_eq!(data["status"], status, "{response}");
    data.clone()
}

/// Whether a `tools/call` response is a result with `isError: true`.
pub fn is_tool_error(response: &Value) -> bool {
    response["result"]["isError"] == json!(true)
}

/// Whether a message is a response (has `result` or `error`, no `method`).
pub fn is_response(message: &Value) -> bool {
    message.get("method").is_none()
        && (message.get("result").is_some() || message.get("error").is_some())
}

// ---------------------------------------------------------------------------
// Config files
// ---------------------------------------------------------------------------

/// Writes `config` as pretty JSON to `dir/apie-mcp.json` and returns the path.
pub fn write_config(dir: &Path, config: Value) -> PathBuf {
    write_config_named(dir, "apie-mcp.json", config)
}

/// Writes `config` as pretty JSON to `dir/name` and returns the path.
pub fn write_config_named(dir: &Path, name: &str, config: Value) -> PathBuf {
    let path = dir.join(name);
    let text = serde_json::to_string_pretty(&config).expect("config serializes");
    std::fs::write(&path, text)
        .unwrap_or_else(|e| panic!("cannot write config {}: {e}", path.display()));
    path
}

// ---------------------------------------------------------------------------
// RawSession
// ---------------------------------------------------------------------------

/// Builds a [`RawSession`]: program, arguments, environment and working
/// directory.
pub struct SessionBuilder {
    command: Command,
    label: String,
    cwd_tempdir: bool,
    recv_timeout: Duration,
}

impl SessionBuilder {
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.command.arg(arg);
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.command.args(args);
        self
    }

    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.command.env(key, value);
        self
    }

    pub fn envs<I, K, V>(mut self, vars: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        self.command.envs(vars);
        self
    }

    pub fn env_remove(mut self, key: impl AsRef<OsStr>) -> Self {
        self.command.env_remove(key);
        self
    }

    /// Start from an empty environment (then add what the test needs).
    pub fn env_clear(mut self) -> Self {
        self.command.env_clear();
        self
    }

    /// Run in `dir` (instead of the session's own tempdir or the test's cwd).
    pub fn current_dir(mut self, dir: impl AsRef<Path>) -> Self {
        self.command.current_dir(dir);
        self.cwd_tempdir = false;
        self
    }

    /// Run in a fresh tempdir owned by the session ([`RawSession::dir`]),
    /// removed when the session drops.
    pub fn cwd_tempdir(mut self) -> Self {
        self.cwd_tempdir = true;
        self
    }

    /// Default timeout of `recv*` calls (10 s unless set).
    pub fn recv_timeout(mut self, timeout: Duration) -> Self {
        self.recv_timeout = timeout;
        self
    }

    /// Spawns the process. Must run inside a tokio runtime.
    pub fn spawn(mut self) -> RawSession {
        isolate_state(&mut self.command);
        let dir = self
            .cwd_tempdir
            .then(|| tempfile::tempdir().expect("create session tempdir"));
        if let Some(dir) = &dir {
            self.command.current_dir(dir.path());
        }
        let stderr_file = tempfile::NamedTempFile::new().expect("create stderr capture file");
        let stderr_handle = stderr_file
            .as_file()
            .try_clone()
            .expect("clone stderr capture file");
        self.command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr_handle))
            .kill_on_drop(true);
        let mut child = self
            .command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {}: {e}", self.label));
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout);
            loop {
                let mut line = Vec::new();
                match reader.read_until(b'\n', &mut line).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        if line.last() == Some(&b'\n') {
                            line.pop();
                        }
                        let line = String::from_utf8_lossy(&line).into_owned();
                        if tx.send(line).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        RawSession {
            child,
            stdin,
            lines,
            stdout_eof: false,
            stash: VecDeque::new(),
            stderr_file,
            dir,
            label: self.label,
            recv_timeout: self.recv_timeout,
        }
    }
}

/// A process driven line by line: newline-delimited JSON-RPC on its stdin and
/// stdout, stderr captured to a temp file ([`RawSession::stderr_text`]).
///
/// The process is killed when the session drops. Every `recv*` call panics on
/// timeout (default 10 s) or stdout EOF, and the panic message includes the
/// captured stderr.
pub struct RawSession {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::UnboundedReceiver<String>,
    stdout_eof: bool,
    /// Parsed messages set aside by `recv_until_id`, in arrival order.
    stash: VecDeque<Value>,
    stderr_file: tempfile::NamedTempFile,
    dir: Option<tempfile::TempDir>,
    label: String,
    recv_timeout: Duration,
}

/// Outcome of waiting for one stdout line.
enum Next {
    Line(String),
    Eof,
    Timeout,
}

impl RawSession {
    /// A builder for `program` (no arguments yet, inherits the environment,
    /// runs in the test's cwd).
    pub fn builder(program: impl AsRef<OsStr>) -> SessionBuilder {
        let program = program.as_ref();
        SessionBuilder {
            command: Command::new(program),
            label: Path::new(program)
                .file_name()
                .unwrap_or(program)
                .to_string_lossy()
                .into_owned(),
            cwd_tempdir: false,
            recv_timeout: DEFAULT_RECV_TIMEOUT,
        }
    }

    /// Spawns `program args…` in the test's cwd.
    pub fn spawn<I, S>(program: impl AsRef<OsStr>, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Self::builder(program).args(args).spawn()
    }

    /// Spawns `apie-mcp args…` in a fresh tempdir ([`RawSession::dir`]).
    pub fn proxy<I, S>(args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Self::builder(proxy_bin()).args(args).cwd_tempdir().spawn()
    }

    /// Spawns the example server directly (no proxy).
    pub fn example_server() -> Self {
        Self::builder(example_server_bin()).spawn()
    }

    /// The session's own tempdir, when it was spawned with one.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_ref().map(tempfile::TempDir::path)
    }

    pub fn pid(&self) -> u32 {
        self.child
            .id()
            .expect("the process has not been reaped yet")
    }

    pub fn set_recv_timeout(&mut self, timeout: Duration) {
        self.recv_timeout = timeout;
    }

    /// Everything the process (and any child sharing its stderr) wrote to
    /// stderr so far.
    pub fn stderr_text(&self) -> String {
        let bytes = std::fs::read(self.stderr_file.path()).unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Path of the file capturing stderr.
    pub fn stderr_path(&self) -> &Path {
        self.stderr_file.path()
    }

    fn fail(&self, what: &str) -> ! {
        panic!(
            "{}: {what}\n--- stderr of {} (pid {:?}) ---\n{}--- end of stderr ---",
            self.label,
            self.label,
            self.child.id(),
            self.stderr_text()
        )
    }

    // --- writing ---------------------------------------------------------

    /// Writes raw bytes to stdin (nothing appended). Errors when stdin is
    /// closed or the process is gone (broken pipe).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| std::io::Error::other("stdin already closed"))?;
        stdin.write_all(bytes).await?;
        stdin.flush().await
    }

    /// Writes `line` plus `\n`. Panics when the write fails.
    pub async fn send_line(&mut self, line: &str) {
        let mut bytes = Vec::with_capacity(line.len() + 1);
        bytes.extend_from_slice(line.as_bytes());
        bytes.push(b'\n');
        if let Err(e) = self.send_raw(&bytes).await {
            self.fail(&format!("cannot write to stdin: {e}"));
        }
    }

    /// Writes `message` as one compact JSON line.
    pub async fn send(&mut self, message: &Value) {
        let line = serde_json::to_string(message).expect("message serializes");
        self.send_line(&line).await;
    }

    /// Closes stdin (EOF for the process).
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    // --- reading ---------------------------------------------------------

    async fn next_line(&mut self, timeout: Duration) -> Next {
        if self.stdout_eof {
            return Next::Eof;
        }
        match tokio::time::timeout(timeout, self.lines.recv()).await {
            Ok(Some(line)) => Next::Line(line),
            Ok(None) => {
                self.stdout_eof = true;
                Next::Eof
            }
            Err(_) => Next::Timeout,
        }
    }

    /// The next stdout line (without its `\n`; a `\r` is kept), waiting up to
    /// the session's timeout. Ignores messages stashed by `recv_until_id`.
    pub async fn recv_line(&mut self) -> String {
        let timeout = self.recv_timeout;
        self.recv_line_within(timeout).await
    }

    /// [`Self::recv_line`] with an explicit timeout.
    pub async fn recv_line_within(&mut self, timeout: Duration) -> String {
        match self.next_line(timeout).await {
            Next::Line(line) => line,
            Next::Eof => self.fail("stdout closed while waiting for a line"),
            Next::Timeout => self.fail(&format!("no stdout line within {timeout:?}")),
        }
    }

    /// The next line, or `None` on timeout or EOF (never panics).
    pub async fn try_recv_line(&mut self, timeout: Duration) -> Option<String> {
        match self.next_line(timeout).await {
            Next::Line(line) => Some(line),
            Next::Eof | Next::Timeout => None,
        }
    }

    fn parse(&self, line: &str) -> Value {
        serde_json::from_str(line)
            .unwrap_or_else(|e| self.fail(&format!("stdout line is not JSON ({e}): {line:?}")))
    }

    /// The next message: stashed ones first (in arrival order), then the next
    /// stdout line parsed as JSON.
    pub async fn recv(&mut self) -> Value {
        if let Some(message) = self.stash.pop_front() {
            return message;
        }
        let line = self.recv_line().await;
        self.parse(&line)
    }

    /// The response (`result` or `error`, no `method`) whose `id` equals `id`.
    /// Other messages (notifications, server→client requests, other
    /// responses) are stashed; see [`Self::stashed`] and [`Self::recv`].
    pub async fn recv_until_id(&mut self, id: impl Into<Value>) -> Value {
        let id = id.into();
        if let Some(pos) = self
            .stash
            .iter()
            .position(|m| is_response(m) && m.get("id") == Some(&id))
        {
            return self.stash.remove(pos).expect("position is in range");
        }
        let deadline = tokio::time::Instant::now() + self.recv_timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let line = match self.next_line(left).await {
                Next::Line(line) => line,
                Next::Eof => self.fail(&format!(
                    "stdout closed while waiting for the response to id {id}; stashed: {:?}",
                    self.stash
                )),
                Next::Timeout => self.fail(&format!(
                    "no response to id {id} within {:?}; stashed: {:?}",
                    self.recv_timeout, self.stash
                )),
            };
            let message = self.parse(&line);
            if is_response(&message) && message.get("id") == Some(&id) {
                return message;
            }
            self.stash.push_back(message);
        }
    }

    /// Messages set aside by [`Self::recv_until_id`] and not yet consumed.
    pub fn stashed(&self) -> &VecDeque<Value> {
        &self.stash
    }

    /// Takes every stashed message.
    pub fn take_stashed(&mut self) -> Vec<Value> {
        self.stash.drain(..).collect()
    }

    /// Asserts that no stdout line arrives within `ms` (EOF counts as
    /// silence). Stashed messages are not considered.
    pub async fn expect_silence(&mut self, ms: u64) {
        match self.next_line(Duration::from_millis(ms)).await {
            Next::Line(line) => self.fail(&format!("expected silence for {ms} ms, got {line}")),
            Next::Eof | Next::Timeout => {}
        }
    }

    /// Asserts that stdout reaches EOF within `timeout` with no further line.
    pub async fn expect_eof(&mut self, timeout: Duration) {
        match self.next_line(timeout).await {
            Next::Eof => {}
            Next::Line(line) => self.fail(&format!("expected stdout EOF, got {line}")),
            Next::Timeout => self.fail(&format!("stdout still open after {timeout:?}")),
        }
    }

    // --- process ---------------------------------------------------------

    /// Waits for the process to exit; panics (with stderr) after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(Ok(status)) => status,
            Ok(Err(e)) => self.fail(&format!("wait failed: {e}")),
            Err(_) => self.fail(&format!("still running after {timeout:?}")),
        }
    }

    /// The exit status if the process has already exited.
    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// Sends SIGKILL (no-op if it already exited).
    pub fn kill(&mut self) {
        let _ = self.child.start_kill();
    }

    // --- MCP conveniences --------------------------------------------------

    /// Sends `request(id, method, params)` and returns the matching response
    /// message (whole: check `result` / `error` yourself).
    pub async fn request(&mut self, id: impl Into<Value>, method: &str, params: Value) -> Value {
        let id = id.into();
        self.send(&request(id.clone(), method, params)).await;
        self.recv_until_id(id).await
    }

    /// Legacy handshake: `initialize` (id 0, protocolVersion 2025-11-25, the
    /// given client capabilities) then `notifications/initialized`. Returns
    /// the `initialize` result; panics on an error response.
    pub async fn initialize_legacy(&mut self, capabilities: Value) -> Value {
        let params = json!({
            "protocolVersion": LEGACY_VERSION,
            "capabilities": capabilities,
            "clientInfo": {"name": "apie-test-host", "version": "0.0.0"},
        });
        let response = self.request(0, "initialize", params).await;
        let Some(result) = response.get("result") else {
            self.fail(&format!("initialize failed: {response}"));
        };
        let result = result.clone();
        self.send(&notification("notifications/initialized", Value::Null))
            .await;
        result
    }

    /// A legacy `tools/call`; returns the whole response message.
    pub async fn call_tool(&mut self, id: impl Into<Value>, name: &str, arguments: Value) -> Value {
        let id = id.into();
        self.send(&legacy_call(id.clone(), name, arguments)).await;
        self.recv_until_id(id).await
    }

    /// A 2026-07-28 `tools/call` (with [`modern_meta`]); returns the whole
    /// response message.
    pub async fn call_tool_modern(
        &mut self,
        id: impl Into<Value>,
        name: &str,
        arguments: Value,
    ) -> Value {
        let id = id.into();
        self.send(&modern_call(id.clone(), name, arguments)).await;
        self.recv_until_id(id).await
    }

    /// A 2026-07-28 request of any method; returns the whole response.
    pub async fn request_modern(
        &mut self,
        id: impl Into<Value>,
        method: &str,
        params: Value,
    ) -> Value {
        let id = id.into();
        self.send(&modern_request(id.clone(), method, params)).await;
        self.recv_until_id(id).await
    }
}

// ---------------------------------------------------------------------------
// rmcp host
// ---------------------------------------------------------------------------

/// Which lifecycle an rmcp client uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Era {
    /// `initialize` / `notifications/initialized` (protocol from the handler's
    /// `get_info`, 2025-11-25 for [`TestClient`]).
    Legacy,
    /// `server/discover` then per-request `_meta` (2026-07-28).
    Modern,
}

/// A `tokio::process::Command` for `program args…`.
pub fn command<I, S>(program: impl AsRef<OsStr>, args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut command = Command::new(program);
    command.args(args);
    isolate_state(&mut command);
    command
}

/// Points the proxy's state directory (the local approval queue) at one temporary directory
/// for the whole test run, unless the test chose its own: tests never touch the user's queue.
/// Also drops `APIE_API_KEY` and `APIE_BASE_URL` unless the test set them: no test ever talks
/// to a real guard service.
pub fn isolate_state(command: &mut Command) {
    static STATE: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    let chosen = |name: &str| command.as_std().get_envs().any(|(k, _)| k == name);
    let state_chosen = chosen("APIE_MCP_STATE_DIR");
    let service_chosen = ["APIE_API_KEY", "APIE_BASE_URL"].map(chosen);
    if !state_chosen {
        let dir = STATE.get_or_init(|| tempfile::tempdir().expect("create state tempdir"));
        command.env("APIE_MCP_STATE_DIR", dir.path());
    }
    for (name, chosen) in ["APIE_API_KEY", "APIE_BASE_URL"]
        .into_iter()
        .zip(service_chosen)
    {
        if !chosen {
            command.env_remove(name);
        }
    }
}

/// `apie-mcp args…`.
pub fn proxy_command<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    command(proxy_bin(), args)
}

/// The example server on its own.
pub fn example_server_command() -> Command {
    Command::new(example_server_bin())
}

/// A running rmcp client connected to a spawned process. Derefs to
/// [`RunningService`], so `list_tools`, `call_tool`, `peer_info`, `service()`
/// work directly.
pub struct McpClient<H: ClientHandler = TestClient> {
    service: RunningService<RoleClient, H>,
    pid: Option<u32>,
    stderr: Arc<Mutex<Vec<u8>>>,
}

impl<H: ClientHandler> Deref for McpClient<H> {
    type Target = RunningService<RoleClient, H>;

    fn deref(&self) -> &Self::Target {
        &self.service
    }
}

impl<H: ClientHandler> McpClient<H> {
    /// Pid of the spawned process.
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// What the process wrote to stderr so far.
    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().expect("stderr lock")).into_owned()
    }

    /// Closes the connection: closes the child's stdin, waits up to 3 s for
    /// it to exit, then SIGTERM, then SIGKILL (rmcp's graceful shutdown).
    pub async fn close(mut self) {
        let _ = self.service.close().await;
    }

    /// The underlying rmcp service.
    pub fn into_inner(self) -> RunningService<RoleClient, H> {
        self.service
    }
}

/// Spawns `command` (stdin/stdout piped, stderr captured) and runs `handler`
/// as an MCP client over it in the given era.
pub async fn connect<H: ClientHandler>(
    handler: H,
    command: Command,
    era: Era,
) -> anyhow::Result<McpClient<H>> {
    let (transport, stderr) = TokioChildProcess::builder(command)
        .stderr(Stdio::piped())
        .spawn()?;
    let pid = transport.id();
    let captured = Arc::new(Mutex::new(Vec::new()));
    if let Some(mut stderr) = stderr {
        let captured = Arc::clone(&captured);
        tokio::spawn(async move {
            let mut buf = [0u8; 8192];
            loop {
                match stderr.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => captured
                        .lock()
                        .expect("stderr lock")
                        .extend_from_slice(&buf[..n]),
                }
            }
        });
    }
    let service = match era {
        Era::Legacy => handler.serve(transport).await,
        Era::Modern => {
            handler
                .serve_with_lifecycle(
                    transport,
                    ClientLifecycleMode::Discover {
                        preferred_versions: vec![ProtocolVersion::V_2026_07_28],
                    },
                )
                .await
        }
    };
    let service = match service {
        Ok(service) => service,
        Err(e) => {
            // Let the stderr reader catch up with a process that just died.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let stderr =
                String::from_utf8_lossy(&captured.lock().expect("stderr lock")).into_owned();
            anyhow::bail!("MCP client startup failed ({era:?}): {e}\n--- stderr ---\n{stderr}");
        }
    };
    Ok(McpClient {
        service,
        pid,
        stderr: captured,
    })
}

/// How [`TestClient`] answers `elicitation/create` (legacy request or modern
/// MRTR input request alike).
#[derive(Clone, Debug)]
pub enum ElicitAnswer {
    /// `accept` with `{"approve": true}`.
    Approve,
    /// `accept` with `{"approve": false}`.
    Reject,
    /// `accept` with the given content.
    Accept(Value),
    /// `decline`.
    Decline,
    /// `cancel`.
    Cancel,
    /// A JSON-RPC error (e.g. -32601, as a host without elicitation answers).
    Error { code: i32, message: String },
    /// Never answers (until the request is cancelled).
    Hang,
    /// Waits, then answers.
    Delay(Duration, Box<ElicitAnswer>),
}

/// A root for [`RootsAnswer::Roots`].
pub fn root(uri: &str, name: &str) -> Root {
    Root::new(uri).with_name(name)
}

/// How [`TestClient`] answers `roots/list`.
#[derive(Clone, Debug)]
pub enum RootsAnswer {
    Roots(Vec<Root>),
    Error { code: i32, message: String },
}

/// What a [`TestClient`] saw; shared (via `Arc`) between clones.
#[derive(Debug, Default)]
pub struct ClientLog {
    elicitations: Mutex<Vec<ElicitRequestParams>>,
    elicitations_cancelled: AtomicUsize,
    roots_requests: AtomicUsize,
    tool_list_changed: AtomicUsize,
    cancelled: Mutex<Vec<CancelledNotificationParam>>,
    progress: Mutex<Vec<ProgressNotificationParam>>,
}

impl ClientLog {
    /// Every elicitation request received, in order.
    pub fn elicitations(&self) -> Vec<ElicitRequestParams> {
        self.elicitations.lock().expect("log lock").clone()
    }

    /// The `message` of every elicitation received, in order.
    pub fn elicitation_messages(&self) -> Vec<String> {
        self.elicitations()
            .into_iter()
            .map(|params| match params {
                ElicitRequestParams::FormElicitationParams { message, .. }
                | ElicitRequestParams::UrlElicitationParams { message, .. } => message,
                _ => String::new(),
            })
            .collect()
    }

    /// Elicitations that were cancelled while [`ElicitAnswer::Hang`]ing or
    /// delaying.
    pub fn elicitations_cancelled(&self) -> usize {
        self.elicitations_cancelled.load(Ordering::SeqCst)
    }

    pub fn roots_requests(&self) -> usize {
        self.roots_requests.load(Ordering::SeqCst)
    }

    pub fn tool_list_changed(&self) -> usize {
        self.tool_list_changed.load(Ordering::SeqCst)
    }

    /// `notifications/cancelled` received from the server side.
    pub fn cancelled(&self) -> Vec<CancelledNotificationParam> {
        self.cancelled.lock().expect("log lock").clone()
    }

    /// `notifications/progress` received from the server side.
    pub fn progress(&self) -> Vec<ProgressNotificationParam> {
        self.progress.lock().expect("log lock").clone()
    }
}

/// A configurable host: declares elicitation (form) and roots by default,
/// approves elicitations, lists one root, and records what it sees in
/// [`TestClient::log`].
#[derive(Clone, Debug)]
pub struct TestClient {
    pub elicit: ElicitAnswer,
    pub roots: RootsAnswer,
    pub capabilities: ClientCapabilities,
    /// Sent in the legacy `initialize` (2025-11-25 by default).
    pub protocol_version: ProtocolVersion,
    pub log: Arc<ClientLog>,
}

impl Default for TestClient {
    fn default() -> Self {
        Self::new()
    }
}

impl TestClient {
    pub fn new() -> Self {
        let capabilities = ClientCapabilities::builder()
            .enable_roots()
            .enable_elicitation_with(ElicitationCapability::new().with_form(Default::default()))
            .build();
        Self {
            elicit: ElicitAnswer::Approve,
            roots: RootsAnswer::Roots(vec![root("file:///tmp/apie-test-root", "test-root")]),
            capabilities,
            protocol_version: ProtocolVersion::V_2025_11_25,
            log: Arc::default(),
        }
    }

    pub fn with_elicit(mut self, answer: ElicitAnswer) -> Self {
        self.elicit = answer;
        self
    }

    pub fn with_roots(mut self, answer: RootsAnswer) -> Self {
        self.roots = answer;
        self
    }

    /// Replaces the declared client capabilities.
    pub fn with_capabilities(mut self, capabilities: ClientCapabilities) -> Self {
        self.capabilities = capabilities;
        self
    }

    /// Declares no elicitation capability (like Inspector CLI). Elicitation
    /// requests are still answered per [`Self::elicit`].
    pub fn without_elicitation(mut self) -> Self {
        self.capabilities.elicitation = None;
        self
    }

    pub fn with_protocol_version(mut self, version: ProtocolVersion) -> Self {
        self.protocol_version = version;
        self
    }

    /// The shared log (clone it before handing the client to [`connect`]).
    pub fn log(&self) -> Arc<ClientLog> {
        Arc::clone(&self.log)
    }
}

fn error_data(code: i32, message: &str) -> ErrorData {
    ErrorData::new(ErrorCode(code), message.to_owned(), None)
}

fn elicit_result(answer: &ElicitAnswer) -> Result<ElicitResult, ErrorData> {
    Ok(match answer {
        ElicitAnswer::Approve => {
            ElicitResult::new(ElicitationAction::Accept).with_content(json!({"approve": true}))
        }
        ElicitAnswer::Reject => {
            ElicitResult::new(ElicitationAction::Accept).with_content(json!({"approve": false}))
        }
        ElicitAnswer::Accept(content) => {
            ElicitResult::new(ElicitationAction::Accept).with_content(content.clone())
        }
        ElicitAnswer::Decline => ElicitResult::new(ElicitationAction::Decline),
        ElicitAnswer::Cancel => ElicitResult::new(ElicitationAction::Cancel),
        ElicitAnswer::Error { code, message } => return Err(error_data(*code, message)),
        ElicitAnswer::Hang | ElicitAnswer::Delay(..) => {
            unreachable!("waiting answers are resolved before this point")
        }
    })
}

impl ClientHandler for TestClient {
    fn get_info(&self) -> ClientConfig {
        ClientConfig::new(
            self.capabilities.clone(),
            Implementation::new("apie-test-host", "0.0.0"),
        )
        .with_protocol_version(self.protocol_version.clone())
    }

    async fn create_elicitation(
        &self,
        request: ElicitRequestParams,
        context: RequestContext<RoleClient>,
    ) -> Result<ElicitResult, ErrorData> {
        self.log
            .elicitations
            .lock()
            .expect("log lock")
            .push(request);
        let mut answer = &self.elicit;
        loop {
            match answer {
                ElicitAnswer::Hang => {
                    context.ct.cancelled().await;
                    self.log
                        .elicitations_cancelled
                        .fetch_add(1, Ordering::SeqCst);
                    return Err(error_data(-32800, "request cancelled"));
                }
                ElicitAnswer::Delay(delay, then) => {
                    tokio::select! {
                        () = tokio::time::sleep(*delay) => answer = then,
                        () = context.ct.cancelled() => {
                            self.log.elicitations_cancelled.fetch_add(1, Ordering::SeqCst);
                            return Err(error_data(-32800, "request cancelled"));
                        }
                    }
                }
                other => return elicit_result(other),
            }
        }
    }

    async fn list_roots(
        &self,
        _context: RequestContext<RoleClient>,
    ) -> Result<ListRootsResult, ErrorData> {
        self.log.roots_requests.fetch_add(1, Ordering::SeqCst);
        match &self.roots {
            RootsAnswer::Roots(roots) => Ok(ListRootsResult::new(roots.clone())),
            RootsAnswer::Error { code, message } => Err(error_data(*code, message)),
        }
    }

    async fn on_tool_list_changed(&self, _context: NotificationContext<RoleClient>) {
        self.log.tool_list_changed.fetch_add(1, Ordering::SeqCst);
    }

    async fn on_cancelled(
        &self,
        params: CancelledNotificationParam,
        _context: NotificationContext<RoleClient>,
    ) {
        self.log.cancelled.lock().expect("log lock").push(params);
    }

    async fn on_progress(
        &self,
        params: ProgressNotificationParam,
        _context: NotificationContext<RoleClient>,
    ) {
        self.log.progress.lock().expect("log lock").push(params);
    }
}

/// SHA-256 (hex) of `value` as compact JSON with every object's keys sorted: the proxy's
/// `argumentsSha256`, computed independently of the proxy's own code.
pub fn sorted_sha256(value: &Value) -> String {
    use sha2::{Digest as _, Sha256};
    fn sorted(value: &Value) -> Value {
        match value {
            Value::Object(map) => {
                let mut entries: Vec<(&String, &Value)> = map.iter().collect();
                entries.sort_by(|a, b| a.0.cmp(b.0));
                Value::Object(
                    entries
                        .into_iter()
                        .map(|(k, v)| (k.clone(), sorted(v)))
                        .collect(),
                )
            }
            Value::Array(items) => Value::Array(items.iter().map(sorted).collect()),
            other => other.clone(),
        }
    }
    let text = serde_json::to_string(&sorted(value)).unwrap();
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

// ---------------------------------------------------------------------------
// One test's directory: config, audit log, state directory, `approvals` CLI
// ---------------------------------------------------------------------------

/// Closes the host's stdin and waits (bounded) for the proxy to exit.
pub async fn finish(mut proxy: RawSession) -> ExitStatus {
    proxy.close_stdin();
    proxy.wait_exit(DEFAULT_RECV_TIMEOUT).await
}

/// A running process whose stderr a failed wait shows: a [`RawSession`] or an [`McpClient`].
pub trait CapturedStderr {
    /// What the process wrote to stderr so far.
    fn stderr_text(&self) -> String;
}

impl CapturedStderr for RawSession {
    fn stderr_text(&self) -> String {
        RawSession::stderr_text(self)
    }
}

impl<H: ClientHandler> CapturedStderr for McpClient<H> {
    fn stderr_text(&self) -> String {
        McpClient::stderr_text(self)
    }
}

/// What a run of `apie-mcp approvals …` printed, and how it exited.
#[derive(Debug)]
pub struct Answered {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// A temporary directory for one test: the config, the audit log, the example server's call
/// log (`EXAMPLE_SERVER_LOG`) and the state directory (so the local approval queue) of both the
/// proxy and the `approvals` CLI live here. Test fixtures wrap it.
pub struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Scratch {
        Scratch {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn audit_path(&self) -> PathBuf {
        self.path().join("audit.jsonl")
    }

    pub fn server_log(&self) -> PathBuf {
        self.path().join("calls.log")
    }

    /// `APIE_MCP_STATE_DIR` of the proxies [`Self::proxy_builder`] and [`Self::proxy_command`]
    /// start and of [`Self::approvals`]: the local approval queue lives here.
    pub fn state_dir(&self) -> PathBuf {
        self.path().join("state")
    }

    /// Points `command` at this test: run in [`Self::path`] with [`Self::state_dir`] and an
    /// `XDG_STATE_HOME` of its own, without `APIE_API_KEY`, `APIE_BASE_URL` or
    /// `APIE_MCP_CONFIG` (a test adds them back with `.env`).
    fn scope(&self, command: &mut Command) {
        command
            .env_remove("APIE_API_KEY")
            .env_remove("APIE_BASE_URL")
            .env_remove("APIE_MCP_CONFIG")
            .env("APIE_MCP_STATE_DIR", self.state_dir())
            .env("XDG_STATE_HOME", self.path().join("xdg-state"))
            .current_dir(self.path());
    }

    /// `apie-mcp --config <config>` over raw lines, scoped to this test (see [`Self::scope`]);
    /// not spawned yet, so no handshake either.
    pub fn proxy_builder(&self, config: &Path) -> SessionBuilder {
        let mut builder = RawSession::builder(proxy_bin()).arg("--config").arg(config);
        self.scope(&mut builder.command);
        builder
    }

    /// `apie-mcp --config <config>` as a command for an rmcp host ([`connect`]), scoped to this
    /// test (see [`Self::scope`]).
    pub fn proxy_command(&self, config: &Path) -> Command {
        let mut command = proxy_command(["--config".as_ref(), config.as_os_str()]);
        self.scope(&mut command);
        command
    }

    /// `apie-mcp approvals args…`: a second process sharing the proxy's state directory.
    pub async fn approvals(&self, args: &[&str]) -> Answered {
        let mut command = Command::new(proxy_bin());
        command.arg("approvals").args(args).kill_on_drop(true);
        self.scope(&mut command);
        let out = tokio::time::timeout(DEFAULT_RECV_TIMEOUT, command.output())
            .await
            .unwrap_or_else(|_| {
                panic!("`apie-mcp approvals {args:?}` still running after {DEFAULT_RECV_TIMEOUT:?}")
            })
            .expect("run apie-mcp approvals");
        Answered {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// `approvals list`, asserted to succeed: the ids it lists (in its order) and its output.
    pub async fn list(&self) -> (Vec<String>, String) {
        let listed = self.approvals(&["list"]).await;
        assert_eq!(listed.code, Some(0), "approvals list: {listed:?}");
        let ids = listed
            .stdout
            .lines()
            .filter(|line| line.starts_with("apr_"))
            .filter_map(|line| line.split_whitespace().next())
            .map(str::to_owned)
            .collect();
        (ids, listed.stdout)
    }

    /// Waits (bounded) until `approvals list` shows exactly `n` held calls; returns their ids
    /// and the listing. The id comes from what a human sees, never from the queue's file names.
    pub async fn held(&self, n: usize, proxy: &impl CapturedStderr) -> (Vec<String>, String) {
        let deadline = Instant::now() + DEFAULT_RECV_TIMEOUT;
        loop {
            let (ids, text) = self.list().await;
            if ids.len() == n {
                return (ids, text);
            }
            assert!(
                ids.len() < n && Instant::now() < deadline,
                "expected {n} held calls, `approvals list` says:\n{text}\n--- proxy stderr ---\n{}",
                proxy.stderr_text()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// `approvals approve|reject ID …`, asserted to succeed.
    pub async fn answer(&self, args: &[&str]) -> Answered {
        let answered = self.approvals(args).await;
        assert_eq!(answered.code, Some(0), "approvals {args:?}: {answered:?}");
        answered
    }

    /// The calls the example server received, in order: tool and arguments.
    pub fn server_calls(&self) -> Vec<(String, Value)> {
        let text = std::fs::read_to_string(self.server_log()).unwrap_or_default();
        text.lines()
            .map(|line| {
                let (tool, arguments) = line.split_once(' ').expect("`<tool> <arguments>`");
                let arguments = serde_json::from_str(arguments).expect("JSON arguments");
                (tool.to_owned(), arguments)
            })
            .collect()
    }

    /// The tools the example server was called with, in order.
    pub fn server_tools(&self) -> Vec<String> {
        self.server_calls().into_iter().map(|(t, _)| t).collect()
    }

    /// The audit line of the call with host id `id`, waiting (bounded) for it to be written.
    pub async fn audit_of(&self, id: impl Into<Value>) -> Value {
        let id = id.into();
        let deadline = Instant::now() + DEFAULT_RECV_TIMEOUT;
        loop {
            let lines = self.audit();
            let mine: Vec<&Value> = lines.iter().filter(|l| l["requestId"] == id).collect();
            match mine.as_slice() {
                [one] => return (*one).clone(),
                [] if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                other => panic!("expected one audit line for request {id}, got {other:?}"),
            }
        }
    }

    pub fn audit_text(&self) -> String {
        std::fs::read_to_string(self.audit_path()).unwrap_or_default()
    }

    /// The audit lines written so far, each checked to be one JSON object.
    pub fn audit(&self) -> Vec<Value> {
        self.audit_text()
            .lines()
            .map(|line| {
                let value: Value = serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("audit line is not JSON ({e}): {line:?}"));
                assert!(value.is_object(), "audit line is not an object: {line}");
                value
            })
            .collect()
    }
}
