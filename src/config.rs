//! Configuration: `apie.mcp.json` (SPEC §3) and the command line (SPEC §2), merged and validated
//! into one [`Config`] before anything is spawned.
//!
//! Loading runs in stages: read the file; replace `${VAR}` in every string; deserialise into the
//! raw shapes of [`file`](mod@file) (unknown keys and bad enum values are refused there, with the JSON path
//! of the field); pick the server entry; apply the command line; compile rules and tool
//! declarations. Every failure is a [`ConfigError`] that names the field, and the binary exits 64.

pub mod file;

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::cli::{RunArgs, Source};
use crate::guard::metadata::{RawToolDecl, RiskLevel, ToolCatalog};
use crate::guard::rules::RuleSet;
use crate::guard::{Decision, Mode};
use crate::upstream::UpstreamSpec;

use file::{RawFile, RawServer};

pub const DEFAULT_CONFIG_FILE: &str = "apie.mcp.json";
pub const DEFAULT_BASE_URL: &str = "https://api.apie.sh";
pub const DEFAULT_REDACT_KEYS: [&str; 7] = [
    "token",
    "password",
    "secret",
    "api_key",
    "apiKey",
    "authorization",
    "credential",
];

/// A config or usage error: `path` is the JSON path of the field (or the flag) at fault.
#[derive(Debug, thiserror::Error)]
#[error("{}{message}", path.as_deref().map(|p| format!("{p}: ")).unwrap_or_default())]
pub struct ConfigError {
    pub path: Option<String>,
    pub message: String,
}

impl ConfigError {
    pub fn at(path: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError {
            path: Some(path.into()),
            message: message.into(),
        }
    }

    pub fn general(message: impl Into<String>) -> ConfigError {
        ConfigError {
            path: None,
            message: message.into(),
        }
    }
}

/// What a guard failure does (SPEC §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureMode {
    FailOpen,
    FailClosed,
    Throw,
}

impl FailureMode {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureMode::FailOpen => "fail_open",
            FailureMode::FailClosed => "fail_closed",
            FailureMode::Throw => "throw",
        }
    }
}

/// How a refused call is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum BlockResponse {
    /// A JSON-RPC error.
    Error,
    /// A `CallToolResult` with `isError: true` carrying the same `{code, message, data}`.
    ToolResult,
}

/// Human-approval channels, in order of preference (SPEC §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApprovalChannel {
    Guard,
    Elicitation,
    Local,
}

/// The error codes the proxy answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorCodes {
    pub blocked: i64,
    pub approval: i64,
    pub guard_unavailable: i64,
}

/// The local decision when no rule matches, per risk level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RiskDefaults {
    pub low: Decision,
    pub medium: Decision,
    pub high: Decision,
    pub critical: Decision,
}

impl RiskDefaults {
    pub fn decide(&self, risk: RiskLevel) -> Decision {
        match risk {
            RiskLevel::Low => self.low,
            RiskLevel::Medium => self.medium,
            RiskLevel::High => self.high,
            RiskLevel::Critical => self.critical,
        }
    }
}

/// The Apie guard service settings (used when the API key variable is set).
#[derive(Debug, Clone, PartialEq)]
pub struct GuardService {
    pub base_url: String,
    pub api_key_env: String,
    /// The key read from `api_key_env`; `None` (unset or empty) means local rules only.
    pub api_key: Option<ApiKey>,
    pub timeout: Duration,
    pub failure_threshold: u32,
    pub cooldown: Duration,
    pub events: bool,
}

/// A secret that never shows in `Debug` output or logs.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(pub String);

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey([REDACTED])")
    }
}

/// The validated configuration of one proxy run.
#[derive(Debug)]
pub struct Config {
    /// The file it came from, if any.
    pub file: Option<PathBuf>,
    pub agent_key: String,
    pub agent_name: String,
    pub server_name: String,
    pub mode: Mode,
    pub environment: Option<String>,
    pub upstream: UpstreamSpec,
    pub guard_failure_mode: FailureMode,
    pub approval_timeout: Duration,
    pub approval_poll_interval: Duration,
    pub guard: GuardService,
    /// Declared tools, in file order.
    pub tool_decls: Vec<(String, RawToolDecl)>,
    pub catalog: ToolCatalog,
    pub policies: RuleSet,
    pub risk_defaults: RiskDefaults,
    pub redact_keys: Vec<String>,
    pub approval_channels: Vec<ApprovalChannel>,
    pub audit: Option<PathBuf>,
    pub hide_blocked_tools: bool,
    pub max_message_bytes: usize,
    pub max_pending_calls: usize,
    pub error_codes: ErrorCodes,
    pub block_response: BlockResponse,
    pub run_id: String,
    /// Things that are valid but probably not what the user meant.
    pub warnings: Vec<String>,
}

/// Reads environment variables; a trait so tests can pass a map.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
}

/// The process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl<const N: usize> Env for [(&str, &str); N] {
    fn var(&self, name: &str) -> Option<String> {
        self.iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_string())
    }
}

/// Finds the config file: `--config`, else `$APIE_MCP_CONFIG`, else `./apie.mcp.json` if present.
pub fn locate(source: &Source, env: &dyn Env) -> Option<PathBuf> {
    source
        .config
        .clone()
        .or_else(|| env.var("APIE_MCP_CONFIG").map(PathBuf::from))
        .or_else(|| {
            let default = PathBuf::from(DEFAULT_CONFIG_FILE);
            default.is_file().then_some(default)
        })
}

/// Reads and parses the config file into its raw form, with `${VAR}` replaced.
pub fn read_file(path: &Path, env: &dyn Env) -> Result<RawFile, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::general(format!("cannot read config {}: {e}", path.display())))?;
    let mut value = crate::jsonrpc::strict::parse_exact(&text)
        .map_err(|e| ConfigError::general(format!("{} is not valid JSON: {e}", path.display())))?;
    interpolate(&mut value, &mut String::new(), env)?;
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let message = e.into_inner().to_string();
        ConfigError::at(if path == "." { "$".into() } else { path }, message)
    })
}

/// Replaces `${VAR}` in every string value (and `$${` by a literal `${`).
fn interpolate(
    value: &mut serde_json::Value,
    path: &mut String,
    env: &dyn Env,
) -> Result<(), ConfigError> {
    use serde_json::Value;
    match value {
        Value::String(s) if s.contains("${") => *s = expand(s, path, env)?,
        Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                interpolate(item, path, env)?;
                path.truncate(len);
            }
        }
        Value::Object(map) => {
            for (key, item) in map.iter_mut() {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(key);
                interpolate(item, path, env)?;
                path.truncate(len);
            }
        }
        _ => {}
    }
    Ok(())
}

fn expand(s: &str, path: &str, env: &dyn Env) -> Result<String, ConfigError> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find('$') {
        out.push_str(&rest[..start]);
        let tail = &rest[start..];
        if let Some(after) = tail.strip_prefix("$${") {
            out.push_str("${");
            rest = after;
        } else if let Some(after) = tail.strip_prefix("${") {
            let Some(end) = after.find('}') else {
                return Err(ConfigError::at(path, "unterminated ${ in string"));
            };
            let name = &after[..end];
            if name.is_empty() {
                return Err(ConfigError::at(path, "empty ${} in string"));
            }
            let value = env.var(name).ok_or_else(|| {
                ConfigError::at(path, format!("environment variable {name} is not set"))
            })?;
            out.push_str(&value);
            rest = &after[end + 1..];
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// Parses a duration: a bare number of milliseconds, or a number with `ms`, `s`, `m` or `h`.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits.parse().ok()?;
    let ms = match unit {
        "" | "ms" => n,
        "s" => n.checked_mul(1000)?,
        "m" => n.checked_mul(60_000)?,
        "h" => n.checked_mul(3_600_000)?,
        _ => return None,
    };
    Some(Duration::from_millis(ms))
}

/// A fresh run id: `run_mcp_` and 12 hex digits.
pub fn new_run_id() -> String {
    let mut bytes = [0u8; 6];
    // Without randomness the clock still gives distinct runs.
    if getrandom::fill(&mut bytes).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        bytes.copy_from_slice(&nanos.to_le_bytes()[..6]);
    }
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("run_mcp_{hex}")
}

/// The default audit log: `<state dir>/apie-mcp/audit.jsonl`.
pub fn default_audit_path() -> Option<PathBuf> {
    dirs::state_dir()
        .or_else(dirs::data_local_dir)
        .map(|d| d.join("apie-mcp").join("audit.jsonl"))
}

fn mode_from_flag(flag: &str, text: &str) -> Result<Mode, ConfigError> {
    Mode::parse(text).ok_or_else(|| {
        ConfigError::at(
            flag,
            format!("unknown mode {text:?} (expected enforce, monitor, shadow or off)"),
        )
    })
}

fn release_mode(path: &str, text: &str, warnings: &mut Vec<String>) -> Result<Mode, ConfigError> {
    match text {
        "monitor" => Ok(Mode::Monitor),
        "enforce" => Ok(Mode::Enforce),
        "guard" => {
            warnings.push(format!(
                "{path}: \"guard\" is Apie's older name for enforce; prefer \"mode\": \"enforce\""
            ));
            Ok(Mode::Enforce)
        }
        other => Err(ConfigError::at(
            path,
            format!("unknown releaseMode {other:?} (expected monitor or guard)"),
        )),
    }
}

/// The file name of a command, for the default agent key and server name.
fn command_name(command: &str) -> String {
    Path::new(command)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| command.to_string())
}

/// Builds the validated config for a proxy run (or for `check`, which passes default run args).
pub fn load(args: &RunArgs, env: &dyn Env) -> Result<Config, ConfigError> {
    let file = locate(&args.source, env);
    let raw = match &file {
        Some(path) => read_file(path, env)?,
        None => RawFile::default(),
    };
    resolve(raw, file, args, env)
}

/// Merges the raw file with the command line and validates everything.
pub fn resolve(
    raw: RawFile,
    file: Option<PathBuf>,
    args: &RunArgs,
    env: &dyn Env,
) -> Result<Config, ConfigError> {
    let mut warnings = Vec::new();
    let (server_key, server) = pick_server(&raw, args.source.server.as_deref())?;
    let entry = |field: &str| match &server_key {
        Some(name) => format!("servers.{name}.{field}"),
        None => field.to_string(),
    };

    // The upstream: the command line wins over the file.
    let upstream = if let Some(command) = &args.upstream_command {
        UpstreamSpec {
            command: command.clone(),
            args: args.upstream_args.clone(),
            env: Vec::new(),
            cwd: None,
        }
    } else if let Some((command, rest)) = args.upstream.split_first() {
        if !args.upstream_args.is_empty() {
            return Err(ConfigError::at(
                "--upstream-arg",
                "goes with --upstream-command, not with a trailing command",
            ));
        }
        UpstreamSpec {
            command: command.clone(),
            args: rest.to_vec(),
            env: Vec::new(),
            cwd: None,
        }
    } else {
        match server.upstream.as_ref().or(raw.upstream.as_ref()) {
            Some(u) => u.to_spec(&entry("upstream"))?,
            None => {
                return Err(ConfigError::general(match &file {
                    Some(path) => format!(
                        "{}: no upstream: add \"upstream\": {{\"command\": …}} or pass one after --",
                        path.display()
                    ),
                    None => "no upstream server: run `apie-mcp [OPTIONS] -- COMMAND [ARGS…]` \
                             or give a config file with --config"
                        .to_string(),
                }));
            }
        }
    };
    // A command-line upstream keeps the file's env and cwd for the same server.
    let upstream = match (server.upstream.as_ref().or(raw.upstream.as_ref()), upstream) {
        (Some(u), mut spec) if args.upstream_command.is_some() || !args.upstream.is_empty() => {
            let from_file = u.to_spec(&entry("upstream"))?;
            spec.env = from_file.env;
            spec.cwd = from_file.cwd;
            spec
        }
        (_, spec) => spec,
    };
    if upstream.command.trim().is_empty() {
        return Err(ConfigError::at(
            entry("upstream.command"),
            "must not be empty",
        ));
    }

    let agent_key = match server.agent_key.clone().or(raw.agent_key.clone()) {
        Some(key) if key.trim().is_empty() => {
            return Err(ConfigError::at(entry("agentKey"), "must not be empty"));
        }
        Some(key) => key,
        None if file.is_some() => {
            return Err(ConfigError::at(
                "agentKey",
                "required: it identifies the agent to the guard service and in the audit log",
            ));
        }
        None => command_name(&upstream.command),
    };
    let agent_name = server
        .agent_name
        .clone()
        .or(raw.agent_name.clone())
        .unwrap_or_else(|| agent_key.clone());
    let server_name = match &server_key {
        Some(name) => name.clone(),
        None => raw
            .server_name
            .clone()
            .unwrap_or_else(|| command_name(&upstream.command)),
    };
    if server_name.is_empty() {
        return Err(ConfigError::at("serverName", "must not be empty"));
    }

    // Mode: flag over per-server over top level; `mode` and `releaseMode` must agree.
    let file_mode = {
        let mut pick =
            |mode: Option<Mode>, release: Option<&String>, at: &dyn Fn(&str) -> String| {
                let release = release
                    .map(|r| release_mode(&at("releaseMode"), r, &mut warnings))
                    .transpose()?;
                match (mode, release) {
                    (Some(m), Some(r)) if m != r => Err(ConfigError::at(
                        at("releaseMode"),
                        format!("says {} but mode says {}: keep one", r.as_str(), m.as_str()),
                    )),
                    (m, r) => Ok(m.or(r)),
                }
            };
        let top = pick(raw.mode.map(Into::into), raw.release_mode.as_ref(), &|f| {
            f.to_string()
        })?;
        let own = pick(
            server.mode.map(Into::into),
            server.release_mode.as_ref(),
            &entry,
        )?;
        own.or(top)
    };
    let flag_mode = match (&args.mode, &args.release_mode) {
        (Some(m), _) => Some(mode_from_flag("--mode", m)?),
        (None, Some(r)) => Some(release_mode("--release-mode", r, &mut warnings)?),
        (None, None) => None,
    };
    let mode = flag_mode.or(file_mode).unwrap_or(Mode::Monitor);

    let environment = server.environment.clone().or(raw.environment.clone());

    let approval_timeout = match &args.approval_timeout {
        Some(text) => parse_duration(text)
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                ConfigError::at(
                    "--approval-timeout",
                    format!("{text:?} is not a duration (e.g. 600000, 500ms, 90s, 10m, 1h)"),
                )
            })?,
        None => {
            let ms = server
                .approval_timeout_ms
                .or(raw.approval_timeout_ms)
                .unwrap_or(300_000);
            if ms == 0 {
                return Err(ConfigError::at(
                    entry("approvalTimeoutMs"),
                    "must be positive",
                ));
            }
            Duration::from_millis(ms)
        }
    };
    let poll_ms = raw.approval_poll_interval_ms.unwrap_or(2000);
    if poll_ms == 0 {
        return Err(ConfigError::at(
            "approvalPollIntervalMs",
            "must be positive",
        ));
    }

    let guard = {
        let g = raw.guard.clone().unwrap_or_default();
        let cb = g.circuit_breaker.unwrap_or_default();
        let base_url = g
            .base_url
            .or_else(|| env.var("APIE_BASE_URL"))
            .unwrap_or_else(|| DEFAULT_BASE_URL.to_string());
        if !(base_url.starts_with("https://") || base_url.starts_with("http://")) {
            return Err(ConfigError::at(
                "guard.baseUrl",
                format!("{base_url:?} is not an http(s) URL"),
            ));
        }
        let api_key_env = g.api_key_env.unwrap_or_else(|| "APIE_API_KEY".into());
        let service = GuardService {
            base_url: base_url.trim_end_matches('/').to_string(),
            api_key: env
                .var(&api_key_env)
                .filter(|key| !key.trim().is_empty())
                .map(ApiKey),
            api_key_env,
            timeout: Duration::from_millis(g.timeout_ms.unwrap_or(5000)),
            failure_threshold: cb.failure_threshold.unwrap_or(3),
            cooldown: Duration::from_millis(cb.cooldown_ms.unwrap_or(30_000)),
            events: g.events.unwrap_or(true),
        };
        if service.api_key_env.is_empty() {
            return Err(ConfigError::at("guard.apiKeyEnv", "must not be empty"));
        }
        // The key travels in an HTTP header, which cannot carry control characters.
        if let Some(key) = &service.api_key
            && key.0.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f)
        {
            return Err(ConfigError::at(
                "guard.apiKeyEnv",
                format!(
                    "${} holds a control character (a stray newline?), which an HTTP header cannot carry",
                    service.api_key_env
                ),
            ));
        }
        if service.timeout.is_zero() {
            return Err(ConfigError::at("guard.timeoutMs", "must be positive"));
        }
        if service.failure_threshold == 0 {
            return Err(ConfigError::at(
                "guard.circuitBreaker.failureThreshold",
                "must be at least 1",
            ));
        }
        service
    };

    let tool_decls: Vec<(String, RawToolDecl)> = server
        .tools
        .clone()
        .or(raw.tools.clone())
        .map(|t| t.0)
        .unwrap_or_default();
    let catalog = ToolCatalog::new(&server_name, environment.as_deref(), tool_decls.clone())
        .map_err(|e| ConfigError::at(format!("{}{}", entry("tools"), e.path), e.message))?;

    let policies = RuleSet::compile(
        server
            .policies
            .clone()
            .or(raw.policies.clone())
            .unwrap_or_default(),
    )
    .map_err(|e| ConfigError::at(format!("{}{}", entry("policies"), e.path), e.message))?;

    let risk_defaults = {
        let d = raw.risk_defaults.unwrap_or_default();
        RiskDefaults {
            low: d.low.map(Into::into).unwrap_or(Decision::Allow),
            medium: d.medium.map(Into::into).unwrap_or(Decision::Allow),
            high: d.high.map(Into::into).unwrap_or(Decision::RequireApproval),
            critical: d
                .critical
                .map(Into::into)
                .unwrap_or(Decision::RequireApproval),
        }
    };

    let redact_keys = server
        .redact_keys
        .clone()
        .or(raw.redact_keys.clone())
        .unwrap_or_else(|| DEFAULT_REDACT_KEYS.iter().map(|k| k.to_string()).collect());
    if let Some(i) = redact_keys.iter().position(|k| k.is_empty()) {
        return Err(ConfigError::at(
            format!("{}[{i}]", entry("redactKeys")),
            "an empty key would redact every argument",
        ));
    }

    let approval_channels = match raw.approvals.clone().and_then(|a| a.channels) {
        None => vec![
            ApprovalChannel::Guard,
            ApprovalChannel::Elicitation,
            ApprovalChannel::Local,
        ],
        Some(channels) => {
            for (i, c) in channels.iter().enumerate() {
                if channels[..i].contains(c) {
                    return Err(ConfigError::at(
                        format!("approvals.channels[{i}]"),
                        "listed twice",
                    ));
                }
            }
            channels
        }
    };

    let audit = match raw.audit.clone() {
        None | Some(file::RawAudit::Enabled(true)) => default_audit_path(),
        Some(file::RawAudit::Enabled(false)) => None,
        Some(file::RawAudit::At { path: Some(path) }) => Some(path),
        Some(file::RawAudit::At { path: None }) => default_audit_path(),
    };

    let max_message_bytes = raw.max_message_bytes.unwrap_or(64 * 1024 * 1024);
    if max_message_bytes < 1024 {
        return Err(ConfigError::at("maxMessageBytes", "must be at least 1024"));
    }
    let max_pending_calls = raw.max_pending_calls.unwrap_or(1000);
    if max_pending_calls == 0 {
        return Err(ConfigError::at("maxPendingCalls", "must be at least 1"));
    }

    let error_codes = {
        let c = raw.error_codes.unwrap_or_default();
        let codes = ErrorCodes {
            blocked: c.blocked.unwrap_or(-32001),
            approval: c.approval.unwrap_or(-32002),
            guard_unavailable: c.guard_unavailable.unwrap_or(-32003),
        };
        for (field, code) in [
            ("errorCodes.blocked", codes.blocked),
            ("errorCodes.approval", codes.approval),
            ("errorCodes.guardUnavailable", codes.guard_unavailable),
        ] {
            if code == -32700 || (-32603..=-32600).contains(&code) {
                return Err(ConfigError::at(
                    field,
                    format!("{code} is a standard JSON-RPC code; pick another"),
                ));
            }
            if i32::try_from(code).is_err() {
                return Err(ConfigError::at(field, "must fit in 32 bits"));
            }
        }
        codes
    };

    let run_id = match args.run_id.clone().or_else(|| env.var("APIE_RUN_ID")) {
        Some(id) if id.trim().is_empty() => {
            return Err(ConfigError::at("--run-id", "must not be empty"));
        }
        Some(id) => id,
        None => new_run_id(),
    };

    Ok(Config {
        file,
        agent_key,
        agent_name,
        server_name,
        mode,
        environment,
        upstream,
        guard_failure_mode: raw.guard_failure_mode.unwrap_or(FailureMode::FailOpen),
        approval_timeout,
        approval_poll_interval: Duration::from_millis(poll_ms),
        guard,
        tool_decls,
        catalog,
        policies,
        risk_defaults,
        redact_keys,
        approval_channels,
        audit,
        hide_blocked_tools: raw.hide_blocked_tools.unwrap_or(false),
        max_message_bytes: usize::try_from(max_message_bytes).unwrap_or(usize::MAX),
        max_pending_calls: usize::try_from(max_pending_calls).unwrap_or(usize::MAX),
        error_codes,
        block_response: raw.block_response.unwrap_or(BlockResponse::Error),
        run_id,
        warnings,
    })
}

/// Chooses the server entry: single-server files have none; `servers` files need `--server`
/// unless there is one entry or `serverName` names the default.
fn pick_server(
    raw: &RawFile,
    wanted: Option<&str>,
) -> Result<(Option<String>, RawServer), ConfigError> {
    let Some(servers) = &raw.servers else {
        return match wanted {
            Some(name) if raw.server_name.as_deref() != Some(name) => Err(ConfigError::at(
                "--server",
                format!("{name:?}: this config has no \"servers\" map"),
            )),
            _ => Ok((None, RawServer::default())),
        };
    };
    if raw.upstream.is_some() {
        return Err(ConfigError::at(
            "upstream",
            "with a \"servers\" map, each entry has its own upstream",
        ));
    }
    let names: Vec<&str> = servers.0.iter().map(|(k, _)| k.as_str()).collect();
    let name = match wanted.or(raw.server_name.as_deref()) {
        Some(name) => name,
        None if names.len() == 1 => names[0],
        None if names.is_empty() => return Err(ConfigError::at("servers", "is empty")),
        None => {
            return Err(ConfigError::at(
                "--server",
                format!(
                    "required: this config has several servers ({})",
                    names.join(", ")
                ),
            ));
        }
    };
    match servers.0.iter().find(|(k, _)| k == name) {
        Some((k, server)) => Ok((Some(k.clone()), server.clone())),
        None => Err(ConfigError::at(
            if wanted.is_some() {
                "--server"
            } else {
                "serverName"
            },
            format!("no server {name:?} in servers ({})", names.join(", ")),
        )),
    }
}

#[cfg(test)]
mod tests;
