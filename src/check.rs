//! `apie-mcp check`: validate the config, print the effective policy and warn about settings
//! that are valid but probably not what the user meant. Exits 0 when the config is valid, 64
//! when it is not (with the same message the proxy would print).

use std::fmt::Write as _;
use std::io::Write as _;
use std::time::Duration;

use crate::cli::{CheckArgs, RunArgs};
use crate::config::{self, Config, FailureMode, ProcessEnv};
use crate::guard::Mode;
use crate::guard::metadata::RawToolDecl;

pub fn run(args: &CheckArgs) -> u8 {
    let run_args = RunArgs {
        source: args.source.clone(),
        ..RunArgs::default()
    };
    match config::load(&run_args, &ProcessEnv) {
        Ok(config) => {
            let text = report(&config);
            let _ = std::io::stdout().lock().write_all(text.as_bytes());
            0
        }
        Err(e) => {
            eprintln!("apie-mcp: {e}");
            crate::EXIT_USAGE
        }
    }
}

/// Warnings about a valid config.
pub fn warnings(config: &Config) -> Vec<String> {
    let mut out = config.warnings.clone();
    if config.mode == Mode::Enforce && config.guard_failure_mode == FailureMode::FailOpen {
        out.push(
            "mode is enforce but guardFailureMode is fail_open: when the guard service fails, \
             calls go through unchecked; set \"guardFailureMode\": \"fail_closed\""
                .into(),
        );
    }
    if config.mode == Mode::Enforce
        && config.guard.api_key.is_none()
        && config
            .approval_channels
            .iter()
            .all(|c| *c == config::ApprovalChannel::Guard)
    {
        out.push(format!(
            "approvals.channels has only \"guard\" but no guard service is used (${} is not \
             set): every call that needs approval will be refused",
            config.guard.api_key_env
        ));
    }
    if config.hide_blocked_tools && config.mode != Mode::Enforce {
        out.push(format!(
            "hideBlockedTools has no effect in {} mode (nothing is blocked)",
            config.mode.as_str()
        ));
    }
    if config.approval_timeout > Duration::from_secs(60) {
        out.push(format!(
            "approvalTimeoutMs is {} s: hosts built on the TypeScript SDK give up on a request \
             after 60 s unless progress resets their timer",
            config.approval_timeout.as_secs()
        ));
    }
    if config.environment.as_deref() == Some("production") && config.redact_keys.is_empty() {
        out.push(
            "environment is production and redactKeys is empty: arguments are sent unredacted"
                .into(),
        );
    }
    if config.guard.api_key.is_some()
        && config.guard.base_url.starts_with("http://")
        && !is_loopback(&config.guard.base_url)
    {
        out.push(format!(
            "guard.baseUrl {} is plain http: the API key would cross the network in clear",
            config.guard.base_url
        ));
    }
    out.extend(config.policies.warnings());
    out
}

fn is_loopback(url: &str) -> bool {
    let host = url
        .trim_start_matches("http://")
        .split(['/', ':'])
        .next()
        .unwrap_or("");
    host == "localhost" || host.starts_with("127.") || url.starts_with("http://[::1]")
}

/// One declared tool, as `risk high, provider cicd, action execute, resource pipeline_run`.
fn describe_decl(decl: &RawToolDecl) -> String {
    let mut parts = Vec::new();
    if let Some(risk) = decl.risk_level {
        parts.push(format!("risk {}", risk.as_str()));
    }
    if let Some(provider) = &decl.provider {
        parts.push(format!("provider {provider}"));
    }
    if let Some(action) = &decl.action {
        let name = action
            .name
            .as_deref()
            .map(|n| format!(" {n}"))
            .unwrap_or_default();
        parts.push(format!("action {}{name}", action.kind));
    }
    if let Some(r) = &decl.resource {
        let fields = [
            r.kind.as_deref(),
            r.environment.as_deref(),
            r.external_id.as_deref(),
        ];
        let text: Vec<&str> = fields.into_iter().flatten().collect();
        parts.push(format!("resource {}", text.join(" ")));
    }
    if parts.is_empty() {
        "(nothing declared)".into()
    } else {
        parts.join(", ")
    }
}

/// The effective policy, as text.
pub fn report(config: &Config) -> String {
    let mut s = String::new();
    let file = config
        .file
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "(none: defaults)".into());
    let _ = writeln!(s, "config:        {file}");
    let _ = writeln!(
        s,
        "agent:         {} ({})",
        config.agent_key, config.agent_name
    );
    let _ = writeln!(s, "server:        {}", config.server_name);
    let mut upstream = config.upstream.command.clone();
    for arg in &config.upstream.args {
        upstream.push(' ');
        upstream.push_str(arg);
    }
    let _ = writeln!(s, "upstream:      {upstream}");
    let _ = writeln!(s, "mode:          {}", config.mode.as_str());
    if let Some(env) = &config.environment {
        let _ = writeln!(s, "environment:   {env}");
    }
    let service = if config.guard.api_key.is_some() {
        format!(
            "{} (key from ${})",
            config.guard.base_url, config.guard.api_key_env
        )
    } else {
        format!(
            "not used (${} is not set): local rules only",
            config.guard.api_key_env
        )
    };
    let _ = writeln!(s, "guard service: {service}");
    let _ = writeln!(s, "on failure:    {}", config.guard_failure_mode.as_str());
    let _ = writeln!(
        s,
        "approvals:     {:?}, timeout {} ms",
        config.approval_channels,
        config.approval_timeout.as_millis()
    );
    let audit = config
        .audit
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "off".into());
    let _ = writeln!(s, "audit:         {audit}");
    let _ = writeln!(
        s,
        "error codes:   blocked {}, approval {}, guard unavailable {} (as {:?})",
        config.error_codes.blocked,
        config.error_codes.approval,
        config.error_codes.guard_unavailable,
        config.block_response
    );
    if !config.tool_decls.is_empty() {
        let _ = writeln!(s, "\ndeclared tools:");
        for (name, decl) in &config.tool_decls {
            let _ = writeln!(s, "  {name}: {}", describe_decl(decl));
        }
    }
    let _ = writeln!(s, "\nrules (first match wins):");
    if config.policies.rules().is_empty() {
        let _ = writeln!(s, "  (none)");
    }
    for (i, rule) in config.policies.rules().iter().enumerate() {
        let _ = writeln!(s, "  {}. {}", i + 1, rule.describe());
    }
    let d = &config.risk_defaults;
    let _ = writeln!(
        s,
        "  otherwise by risk: low → {}, medium → {}, high → {}, critical → {}",
        d.low.as_str(),
        d.medium.as_str(),
        d.high.as_str(),
        d.critical.as_str()
    );
    let warnings = warnings(config);
    if !warnings.is_empty() {
        let _ = writeln!(s, "\nwarnings:");
        for w in warnings {
            let _ = writeln!(s, "  - {w}");
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(json: &str, env: &dyn config::Env) -> Config {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("apie.mcp.json");
        std::fs::write(&path, json).unwrap();
        let mut args = RunArgs::default();
        args.source.config = Some(path);
        config::load(&args, env).unwrap()
    }

    #[test]
    fn a_guard_only_approval_channel_without_a_service_is_flagged() {
        let json = r#"{"agentKey":"a","upstream":{"command":"srv"},"mode":"enforce",
            "approvals":{"channels":["guard"]}}"#;
        let flagged = |env: &dyn config::Env| {
            warnings(&load(json, env))
                .iter()
                .any(|w| w.contains("only \"guard\""))
        };
        assert!(flagged(&[("HOME", "/h")]));
        assert!(!flagged(&[("HOME", "/h"), ("APIE_API_KEY", "k")]));
    }
}
