use super::*;
use crate::cli::RunArgs;

/// Resolves `json` (as if read from a file) with `args` and the environment `env`.
fn load_json(json: &str, args: &RunArgs, env: &dyn Env) -> Result<Config, ConfigError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("apie.mcp.json");
    std::fs::write(&path, json).unwrap();
    let mut args = args.clone();
    args.source.config = Some(path);
    load(&args, env)
}

fn ok(json: &str) -> Config {
    load_json(json, &RunArgs::default(), &[("HOME", "/h")]).unwrap()
}

fn err(json: &str) -> ConfigError {
    match load_json(json, &RunArgs::default(), &[("HOME", "/h")]) {
        Ok(_) => panic!("accepted: {json}"),
        Err(e) => e,
    }
}

const MIN: &str = r#""agentKey":"a","upstream":{"command":"srv"}"#;

fn with(fields: &str) -> String {
    format!("{{{MIN},{fields}}}")
}

#[test]
fn a_minimal_file_gets_every_default() {
    let c = ok(&format!("{{{MIN}}}"));
    assert_eq!(c.agent_key, "a");
    assert_eq!(c.agent_name, "a");
    assert_eq!(c.server_name, "srv");
    assert_eq!(c.mode, Mode::Monitor);
    assert_eq!(c.guard_failure_mode, FailureMode::FailOpen);
    assert_eq!(c.approval_timeout, Duration::from_secs(300));
    assert_eq!(c.approval_poll_interval, Duration::from_secs(2));
    assert_eq!(c.guard.base_url, DEFAULT_BASE_URL);
    assert_eq!(c.guard.api_key_env, "APIE_API_KEY");
    assert_eq!(c.guard.timeout, Duration::from_secs(5));
    assert_eq!(
        (c.guard.failure_threshold, c.guard.cooldown),
        (3, Duration::from_secs(30))
    );
    assert!(c.guard.events);
    assert_eq!(c.risk_defaults.decide(RiskLevel::Medium), Decision::Allow);
    assert_eq!(
        c.risk_defaults.decide(RiskLevel::High),
        Decision::RequireApproval
    );
    assert_eq!(c.redact_keys, DEFAULT_REDACT_KEYS);
    assert_eq!(c.approval_channels.len(), 3);
    assert_eq!(c.max_message_bytes, 64 * 1024 * 1024);
    assert_eq!(c.max_pending_calls, 1000);
    assert_eq!(
        c.error_codes,
        ErrorCodes {
            blocked: -32001,
            approval: -32002,
            guard_unavailable: -32003
        }
    );
    assert_eq!(c.block_response, BlockResponse::Error);
    assert!(
        c.run_id.starts_with("run_mcp_") && c.run_id.len() == 20,
        "{}",
        c.run_id
    );
    assert!(c.audit.unwrap().ends_with("apie-mcp/audit.jsonl"));
}

#[test]
fn every_field_is_read() {
    let c = ok(r#"{
        "agentKey": "k", "agentName": "Agent K", "serverName": "fs", "mode": "enforce",
        "environment": "production",
        "upstream": {"command": "npx", "args": ["-y", "pkg"], "env": {"A": "1"}, "cwd": "/tmp"},
        "guardFailureMode": "fail_closed", "approvalTimeoutMs": 600000,
        "approvalPollIntervalMs": 500,
        "guard": {"baseUrl": "http://127.0.0.1:9/", "apiKeyEnv": "MY_KEY", "timeoutMs": 100,
                  "circuitBreaker": {"failureThreshold": 5, "cooldownMs": 1000}, "events": false},
        "tools": {"read_*": {"riskLevel": "low"}, "nuke": {"riskLevel": "critical", "provider": "ops",
                  "action": {"type": "delete"}, "resource": {"type": "database_record"}}},
        "policies": [{"name": "r", "action": {"type": "warn"}}],
        "riskDefaults": {"low": "allow", "medium": "warn", "high": "block", "critical": "block"},
        "redactKeys": ["pin"], "approvals": {"channels": ["local", "guard"]},
        "audit": false, "hideBlockedTools": true, "maxMessageBytes": 4096, "maxPendingCalls": 7,
        "errorCodes": {"blocked": -31001, "approval": -31002, "guardUnavailable": -31003},
        "blockResponse": "toolResult"
    }"#);
    assert_eq!(
        (c.agent_name.as_str(), c.server_name.as_str()),
        ("Agent K", "fs")
    );
    assert_eq!(c.mode, Mode::Enforce);
    assert_eq!(c.environment.as_deref(), Some("production"));
    assert_eq!(c.upstream.args, ["-y", "pkg"]);
    assert_eq!(c.upstream.env, [("A".to_string(), "1".to_string())]);
    assert_eq!(c.upstream.cwd.as_deref(), Some(Path::new("/tmp")));
    assert_eq!(c.guard_failure_mode, FailureMode::FailClosed);
    assert_eq!(c.approval_timeout, Duration::from_secs(600));
    assert_eq!(c.approval_poll_interval, Duration::from_millis(500));
    assert_eq!(c.guard.base_url, "http://127.0.0.1:9");
    assert_eq!(c.guard.api_key_env, "MY_KEY");
    assert_eq!(c.guard.failure_threshold, 5);
    assert!(!c.guard.events);
    assert_eq!(c.tool_decls.len(), 2);
    assert_eq!(c.tool_decls[0].0, "read_*");
    assert_eq!(c.catalog.describe("nuke").risk, RiskLevel::Critical);
    assert_eq!(c.catalog.describe("read_x").risk, RiskLevel::Low);
    assert_eq!(c.policies.rules().len(), 1);
    assert_eq!(c.risk_defaults.decide(RiskLevel::Medium), Decision::Warn);
    assert_eq!(c.redact_keys, ["pin"]);
    assert_eq!(
        c.approval_channels,
        [ApprovalChannel::Local, ApprovalChannel::Guard]
    );
    assert_eq!(c.audit, None);
    assert!(c.hide_blocked_tools);
    assert_eq!((c.max_message_bytes, c.max_pending_calls), (4096, 7));
    assert_eq!(c.error_codes.approval, -31002);
    assert_eq!(c.block_response, BlockResponse::ToolResult);
}

#[test]
fn unknown_keys_and_bad_values_name_their_path() {
    for (json, path) in [
        (with(r#""mdoe":"enforce""#), "mdoe"),
        (with(r#""mode":"enforced""#), "mode"),
        (with(r#""mode":"""#), "mode"),
        (with(r#""guard":{"timeout":5}"#), "guard.timeout"),
        (
            with(r#""guard":{"circuitBreaker":{"threshold":1}}"#),
            "guard.circuitBreaker",
        ),
        (with(r#""guardFailureMode":"open""#), "guardFailureMode"),
        (
            with(r#""riskDefaults":{"high":"deny"}"#),
            "riskDefaults.high",
        ),
        (
            with(r#""approvals":{"channels":["email"]}"#),
            "approvals.channels[0]",
        ),
        (
            with(r#""approvals":{"channels":["local","local"]}"#),
            "approvals.channels[1]",
        ),
        (with(r#""blockResponse":"html""#), "blockResponse"),
        (with(r#""audit":{"file":"x"}"#), "audit"),
        (with(r#""maxMessageBytes":10"#), "maxMessageBytes"),
        (with(r#""maxPendingCalls":0"#), "maxPendingCalls"),
        (
            with(r#""errorCodes":{"blocked":-32601}"#),
            "errorCodes.blocked",
        ),
        (with(r#""redactKeys":["ok",""]"#), "redactKeys[1]"),
        (
            with(r#""policies":[{"name":"r","action":{"type":"blok"}}]"#),
            "policies[0].action.type",
        ),
        (
            with(
                r#""policies":[{"name":"r","conditions":[{"field":"args.x","operator":"like","value":1}],"action":{"type":"block"}}]"#,
            ),
            "policies[0].conditions[0].operator",
        ),
        (
            with(
                r#""policies":[{"name":"r","conditions":[{"field":"args.x","operator":"matches","value":"("}],"action":{"type":"block"}}]"#,
            ),
            "policies[0].conditions[0].value",
        ),
        (
            with(
                r#""policies":[{"name":"r","conditions":[{"field":"argz.x","operator":"exists"}],"action":{"type":"block"}}]"#,
            ),
            "policies[0].conditions[0].field",
        ),
        (
            with(r#""tools":{"x":{"riskLevel":"extreme"}}"#),
            "tools.x.riskLevel",
        ),
        (
            r#"{"agentKey":"a","upstream":{"command":"x","argv":[]}}"#.to_string(),
            "upstream",
        ),
        (with(r#""approvalTimeoutMs":0"#), "approvalTimeoutMs"),
        (with(r#""guard":{"baseUrl":"ftp://x"}"#), "guard.baseUrl"),
    ] {
        let e = err(&json);
        let got = e.path.clone().unwrap_or_default();
        assert!(got.starts_with(path), "{json}\n  want path {path}, got {e}");
    }
}

#[test]
fn agent_key_is_required_in_a_file() {
    let e = err(r#"{"upstream":{"command":"x"}}"#);
    assert_eq!(e.path.as_deref(), Some("agentKey"));
}

#[test]
fn variables_are_interpolated_and_missing_ones_refused() {
    let env = [("TOKEN", "t0k"), ("DIR", "/srv")];
    let c = load_json(
        r#"{"agentKey":"a","upstream":{"command":"${DIR}/bin","args":["--t=${TOKEN}","$${LIT}"]}}"#,
        &RunArgs::default(),
        &env,
    )
    .unwrap();
    assert_eq!(c.upstream.command, "/srv/bin");
    assert_eq!(c.upstream.args, ["--t=t0k", "${LIT}"]);
    let e = load_json(
        r#"{"agentKey":"a","upstream":{"command":"x","env":{"K":"${NOPE}"}}}"#,
        &RunArgs::default(),
        &env,
    )
    .unwrap_err();
    assert_eq!(e.path.as_deref(), Some("upstream.env.K"));
    assert!(e.message.contains("NOPE"));
}

#[test]
fn duplicate_keys_in_the_file_are_refused() {
    let e = err(r#"{"agentKey":"a","agentKey":"b","upstream":{"command":"x"}}"#);
    assert!(e.to_string().contains("given twice"), "{e}");
}

#[test]
fn apie_proxy_files_load_unchanged() {
    // The published proxy's spelling: releaseMode "guard".
    let c = ok(
        r#"{"agentKey":"a","serverName":"fs","releaseMode":"guard","environment":"production",
                  "redactKeys":["token"],"upstream":{"command":"npx","args":["-y","x"]}}"#,
    );
    assert_eq!(c.mode, Mode::Enforce);
    assert!(
        c.warnings
            .iter()
            .any(|w| w.contains("\"mode\": \"enforce\""))
    );
    let c = ok(r#"{"agentKey":"a","releaseMode":"monitor","upstream":{"command":"x"}}"#);
    assert_eq!(c.mode, Mode::Monitor);
    let e = err(
        r#"{"agentKey":"a","mode":"enforce","releaseMode":"monitor","upstream":{"command":"x"}}"#,
    );
    assert_eq!(e.path.as_deref(), Some("releaseMode"));
    let e = err(r#"{"agentKey":"a","releaseMode":"strict","upstream":{"command":"x"}}"#);
    assert_eq!(e.path.as_deref(), Some("releaseMode"));
}

const MULTI: &str = r#"{
    "agentKey": "top", "mode": "monitor", "environment": "staging",
    "servers": {
        "github": {"upstream": {"command": "gh-mcp"}, "mode": "enforce", "agentKey": "gh-agent",
                   "policies": [{"name": "gh", "action": {"type": "block"}}]},
        "fs": {"upstream": {"command": "fs-mcp", "args": ["/tmp"]}, "environment": "dev"}
    }
}"#;

#[test]
fn multi_server_files_need_a_pick_and_entries_override_the_top_level() {
    let pick = |name: &str| {
        let mut args = RunArgs::default();
        args.source.server = Some(name.into());
        load_json(MULTI, &args, &[("X", "1")])
    };
    let gh = pick("github").unwrap();
    assert_eq!(
        (gh.server_name.as_str(), gh.agent_key.as_str(), gh.mode),
        ("github", "gh-agent", Mode::Enforce)
    );
    assert_eq!(gh.environment.as_deref(), Some("staging"));
    assert_eq!(gh.policies.rules().len(), 1);
    let fs = pick("fs").unwrap();
    assert_eq!((fs.agent_key.as_str(), fs.mode), ("top", Mode::Monitor));
    assert_eq!(fs.environment.as_deref(), Some("dev"));
    assert_eq!(fs.upstream.command, "fs-mcp");
    assert_eq!(pick("nope").unwrap_err().path.as_deref(), Some("--server"));
    let e = err(MULTI);
    assert_eq!(e.path.as_deref(), Some("--server"));
    assert!(
        e.message.contains("github") && e.message.contains("fs"),
        "{e}"
    );
    // serverName picks the default entry, as in Apie's own proxy.
    let c = ok(&MULTI.replacen(
        "\"agentKey\": \"top\"",
        "\"agentKey\": \"top\", \"serverName\": \"fs\"",
        1,
    ));
    assert_eq!(c.server_name, "fs");
}

#[test]
fn the_command_line_overrides_the_file() {
    let mut args = RunArgs {
        mode: Some("shadow".into()),
        approval_timeout: Some("10m".into()),
        run_id: Some("run_given".into()),
        upstream: vec![
            "node".into(),
            "server.js".into(),
            "--port".into(),
            "1".into(),
        ],
        ..RunArgs::default()
    };
    let json = with(r#""mode":"enforce","upstream":{"command":"old","env":{"K":"v"}}"#).replacen(
        &format!("{MIN},"),
        "\"agentKey\":\"a\",",
        1,
    );
    let c = load_json(&json, &args, &[("HOME", "/h")]).unwrap();
    assert_eq!(c.mode, Mode::Monitor);
    assert_eq!(c.approval_timeout, Duration::from_secs(600));
    assert_eq!(c.run_id, "run_given");
    assert_eq!(c.upstream.command, "node");
    assert_eq!(c.upstream.args, ["server.js", "--port", "1"]);
    assert_eq!(c.upstream.env, [("K".to_string(), "v".to_string())]);

    args.upstream.clear();
    args.upstream_command = Some("py".into());
    args.upstream_args = vec!["-m".into(), "srv".into()];
    let c = load_json(&json, &args, &[("HOME", "/h")]).unwrap();
    assert_eq!(
        (c.upstream.command.as_str(), c.upstream.args.len()),
        ("py", 2)
    );

    for (field, value, path) in [
        ("mode", "guarded", "--mode"),
        ("mode", "", "--mode"),
        ("approval_timeout", "10 minutes", "--approval-timeout"),
        ("approval_timeout", "0", "--approval-timeout"),
    ] {
        let mut args = RunArgs::default();
        match field {
            "mode" => args.mode = Some(value.into()),
            _ => args.approval_timeout = Some(value.into()),
        }
        let e = load_json(&format!("{{{MIN}}}"), &args, &[("HOME", "/h")]).unwrap_err();
        assert_eq!(e.path.as_deref(), Some(path), "{value:?}: {e}");
    }
}

#[test]
fn no_file_runs_on_defaults_with_the_command_line_upstream() {
    let args = RunArgs {
        upstream: vec!["/usr/bin/my-server".into(), "--flag".into()],
        ..RunArgs::default()
    };
    // resolve() directly: locate() would also look for ./apie.mcp.json in the cwd.
    let c = resolve(
        RawFile::default(),
        None,
        &args,
        &[("APIE_RUN_ID", "run_env")],
    )
    .unwrap();
    assert_eq!(c.agent_key, "my-server");
    assert_eq!(c.server_name, "my-server");
    assert_eq!(c.mode, Mode::Monitor);
    assert_eq!(c.run_id, "run_env");
    let e = resolve(RawFile::default(), None, &RunArgs::default(), &[("X", "1")]).unwrap_err();
    assert!(e.message.contains("no upstream"), "{e}");
}

#[test]
fn durations_follow_the_documented_grammar() {
    for (text, ms) in [
        ("600000", 600_000),
        ("500ms", 500),
        ("90s", 90_000),
        ("10m", 600_000),
        ("1h", 3_600_000),
    ] {
        assert_eq!(
            parse_duration(text),
            Some(Duration::from_millis(ms)),
            "{text}"
        );
    }
    for text in [
        "",
        "ms",
        "1.5s",
        "-1",
        "10 m",
        "1d",
        "99999999999999999999h",
    ] {
        assert_eq!(parse_duration(text), None, "{text}");
    }
}

#[test]
fn the_api_key_comes_from_the_named_variable_and_an_empty_one_means_none() {
    let json = format!("{{{MIN}}}");
    let load = |env: &dyn Env| load_json(&json, &RunArgs::default(), env).unwrap();
    let c = load(&[("APIE_API_KEY", "k1")]);
    assert_eq!(c.guard.api_key, Some(ApiKey("k1".into())));
    assert_eq!(format!("{:?}", c.guard.api_key), "Some(ApiKey([REDACTED]))");
    assert_eq!(load(&[("APIE_API_KEY", "  ")]).guard.api_key, None);
    let custom = with(r#""guard":{"apiKeyEnv":"MY_KEY"}"#);
    let c = load_json(
        &custom,
        &RunArgs::default(),
        &[("APIE_API_KEY", "no"), ("MY_KEY", "yes")],
    )
    .unwrap();
    assert_eq!(c.guard.api_key, Some(ApiKey("yes".into())));
}

#[test]
fn an_api_key_a_header_cannot_carry_is_refused_at_load() {
    let json = format!("{{{MIN}}}");
    let load = |key: &str| load_json(&json, &RunArgs::default(), &[("APIE_API_KEY", key)]);
    let e = load("sk_live\n").unwrap_err();
    assert_eq!(e.path.as_deref(), Some("guard.apiKeyEnv"), "{e}");
    assert!(
        e.message
            .contains("$APIE_API_KEY holds a control character"),
        "{e}"
    );
    assert!(
        !e.to_string().contains("sk_live"),
        "the key is not shown: {e}"
    );
    assert!(load("sk\u{7f}").is_err());
    assert_eq!(
        load("sk live\tkey").unwrap().guard.api_key,
        Some(ApiKey("sk live\tkey".into()))
    );
}
