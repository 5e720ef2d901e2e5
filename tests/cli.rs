//! The command line (SPEC §2): how the upstream and the config are found, exit codes, config
//! errors (exit 64 with the JSON path, before anything is spawned), `check`, `--version`,
//! `--help`. Every run happens in its own temp directory, with the state directory inside it and
//! no `APIE_*` variable inherited from the environment running the tests.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::util::{self, RawSession, example_server_bin, proxy_bin, result_text};

const WAIT: Duration = util::DEFAULT_RECV_TIMEOUT;

/// What a finished `apie-mcp` run left behind.
struct Output {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Output {
    fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

/// A temp directory to run in; `state/` inside it is the state directory.
struct Dir {
    dir: tempfile::TempDir,
}

impl Dir {
    fn new() -> Dir {
        Dir {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn join(&self, name: &str) -> PathBuf {
        self.path().join(name)
    }

    fn server_log(&self) -> PathBuf {
        self.join("calls.log")
    }

    /// The tools the example server was called with (its `EXAMPLE_SERVER_LOG`).
    fn server_tools(&self) -> Vec<String> {
        std::fs::read_to_string(self.server_log())
            .unwrap_or_default()
            .lines()
            .map(|l| l.split(' ').next().unwrap_or_default().to_owned())
            .collect()
    }

    /// `env EXAMPLE_SERVER_LOG=<log> <example_server>`: the example server, given arguments,
    /// logging its calls here.
    fn logging_server(&self) -> Vec<String> {
        vec![
            "env".to_owned(),
            format!("EXAMPLE_SERVER_LOG={}", self.server_log().display()),
            example_server_bin().display().to_string(),
        ]
    }

    /// `apie-mcp args…` run here with stdin closed, waited for (bounded).
    async fn run<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.run_with(args, &[]).await
    }

    async fn run_with<I, S>(&self, args: I, env: &[(&str, &OsStr)]) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut command = tokio::process::Command::new(proxy_bin());
        command
            .args(args)
            .current_dir(self.path())
            .env_remove("APIE_MCP_CONFIG")
            .env_remove("APIE_API_KEY")
            .env_remove("APIE_RUN_ID")
            .env("XDG_STATE_HOME", self.join("state"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (key, value) in env {
            command.env(key, value);
        }
        let output = tokio::time::timeout(WAIT, command.output())
            .await
            .expect("apie-mcp did not exit in time")
            .expect("run apie-mcp");
        Output {
            status: output.status,
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// `apie-mcp args…` as a live session run here.
    fn session<I, S>(&self, args: I, env: &[(&str, &OsStr)]) -> RawSession
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut builder = RawSession::builder(proxy_bin())
            .args(args)
            .env_remove("APIE_MCP_CONFIG")
            .env_remove("APIE_API_KEY")
            .env_remove("APIE_RUN_ID")
            .env("XDG_STATE_HOME", self.join("state"))
            .current_dir(self.path());
        for (key, value) in env {
            builder = builder.env(key, value);
        }
        builder.spawn()
    }

    /// The default audit log, under the state directory.
    fn default_audit(&self) -> Vec<Value> {
        let path = self.join("state/apie-mcp/audit.jsonl");
        std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .lines()
            .map(|l| serde_json::from_str(l).expect("audit line is JSON"))
            .collect()
    }
}

/// A block rule on `*delete*` named `name`.
fn block_deletes(name: &str) -> Value {
    json!({
        "name": name,
        "verbMatchers": [{"type": "verb", "value": "*delete*"}],
        "action": {"type": "block"},
    })
}

/// Echo then delete_file; returns the rule that blocked delete_file, or None if it was
/// forwarded. Asserts echo works.
async fn echo_then_delete(session: &mut RawSession) -> Option<String> {
    session.initialize_legacy(json!({})).await;
    let echoed = session.call_tool(1, "echo", json!({"text": "hi"})).await;
    assert_eq!(result_text(&echoed), "hi", "{echoed}");
    let deleted = session
        .call_tool(2, "delete_file", json!({"path": "/x"}))
        .await;
    match deleted.get("error") {
        Some(error) => {
            assert_eq!(error["code"], -32001, "{deleted}");
            Some(
                error["data"]["rule"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
        }
        None => {
            assert_eq!(result_text(&deleted), "deleted /x", "{deleted}");
            None
        }
    }
}

async fn close(mut session: RawSession) -> ExitStatus {
    session.close_stdin();
    session.expect_eof(WAIT).await;
    session.wait_exit(WAIT).await
}

// ---------------------------------------------------------------------------
// Finding the upstream and the config
// ---------------------------------------------------------------------------

/// No config file anywhere: the defaults (§4.2), mode monitor, audit in the state directory.
#[tokio::test]
async fn double_dash_without_config_runs_in_monitor_mode() {
    let dir = Dir::new();
    let mut args = vec!["--".to_owned()];
    args.extend(dir.logging_server());
    let mut session = dir.session(&args, &[]);
    // delete_file is high risk → require_approval by default → forwarded in monitor mode.
    assert_eq!(echo_then_delete(&mut session).await, None);
    assert_eq!(close(session).await.code(), Some(0));
    assert_eq!(dir.server_tools(), ["echo", "delete_file"]);

    let audit = dir.default_audit();
    assert_eq!(audit.len(), 2, "{audit:?}");
    assert_eq!(audit[1]["tool"], "delete_file");
    assert_eq!(audit[1]["mode"], "monitor");
    assert_eq!(audit[1]["decision"], "require_approval");
    assert_eq!(audit[1]["outcome"], "would_require_approval");
    // With no file, agent and server are named after the upstream command.
    assert_eq!(audit[1]["agentKey"], "env");
    assert_eq!(audit[1]["server"], "env");
    let run_id = audit[1]["runId"].as_str().expect("runId");
    let hex = run_id.strip_prefix("run_mcp_").unwrap_or_default();
    assert!(
        hex.len() == 12 && hex.bytes().all(|b| b.is_ascii_hexdigit()),
        "default run id is run_mcp_<12 hex>, got {run_id}"
    );
}

/// Inspector passes the server without `--`, with its own hyphenated arguments.
#[tokio::test]
async fn inspector_form_without_double_dash() {
    let dir = Dir::new();
    // Nobody answers the local approval queue here: a short timeout denies at once.
    let mut args = vec![
        "--mode".to_owned(),
        "enforce".to_owned(),
        "--approval-timeout".to_owned(),
        "300ms".to_owned(),
    ];
    let mut server = dir.logging_server();
    // `env -u NAME …`: a hyphenated argument after the command belongs to the command.
    server.splice(1..1, ["-u".to_owned(), "APIE_TEST_UNSET".to_owned()]);
    args.extend(server);
    let mut session = dir.session(&args, &[]);
    session.initialize_legacy(json!({})).await;
    let echoed = session
        .call_tool(1, "echo", json!({"text": "inspected"}))
        .await;
    assert_eq!(result_text(&echoed), "inspected");
    // --mode before the command still applies: deploy is critical → require_approval →
    // held, and denied when the approval times out.
    let denied = session
        .call_tool(
            2,
            "deploy_service",
            json!({"service": "a", "environment": "b"}),
        )
        .await;
    assert_eq!(denied["error"]["code"], -32002, "{denied}");
    assert_eq!(close(session).await.code(), Some(0));
    assert_eq!(dir.server_tools(), ["echo"]);
}

/// `--upstream-command`/`--upstream-arg`, and a command after `--`, replace the config's
/// upstream; the rest of the config still applies.
#[tokio::test]
async fn command_line_upstream_overrides_config() {
    let dir = Dir::new();
    let marker = dir.join("config-upstream-ran");
    let config = util::write_config(
        dir.path(),
        json!({
            "agentKey": "cli-test",
            "mode": "enforce",
            "upstream": {"command": "touch", "args": [marker]},
            "audit": false,
            "policies": [block_deletes("config-rule")],
        }),
    );
    let server = dir.logging_server();
    let mut flags = vec![
        "--config".to_owned(),
        config.display().to_string(),
        "--upstream-command".to_owned(),
        server[0].clone(),
    ];
    for arg in &server[1..] {
        flags.push("--upstream-arg".to_owned());
        flags.push(arg.clone());
    }
    let mut positional = vec![
        "--config".to_owned(),
        config.display().to_string(),
        "--".to_owned(),
    ];
    positional.extend(server.iter().cloned());

    for args in [flags, positional] {
        let mut session = dir.session(&args, &[]);
        assert_eq!(
            echo_then_delete(&mut session).await.as_deref(),
            Some("config-rule"),
            "{args:?}"
        );
        assert_eq!(close(session).await.code(), Some(0), "{args:?}");
    }
    assert!(!marker.exists(), "the config's upstream was started");
    assert_eq!(dir.server_tools(), ["echo", "echo"]);
}

fn example_config(rule: &str) -> Value {
    json!({
        "agentKey": "cli-test",
        "mode": "enforce",
        "upstream": {"command": example_server_bin()},
        "audit": false,
        "policies": [block_deletes(rule)],
    })
}

/// `$APIE_MCP_CONFIG` is read, and wins over `./apie.mcp.json`.
#[tokio::test]
async fn apie_mcp_config_variable_is_honoured() {
    let dir = Dir::new();
    util::write_config_named(dir.path(), "apie.mcp.json", example_config("cwd-rule"));
    let elsewhere = Dir::new();
    let config = util::write_config(elsewhere.path(), example_config("env-rule"));
    let mut session = dir.session(
        std::iter::empty::<&str>(),
        &[("APIE_MCP_CONFIG", config.as_os_str())],
    );
    assert_eq!(
        echo_then_delete(&mut session).await.as_deref(),
        Some("env-rule")
    );
    assert_eq!(close(session).await.code(), Some(0));
}

/// `./apie.mcp.json` in the working directory is picked up; `$APIE_RUN_ID` names the run.
#[tokio::test]
async fn config_in_working_directory_is_picked_up() {
    let dir = Dir::new();
    let mut config = example_config("cwd-rule");
    config["audit"] = json!({"path": dir.join("audit.jsonl")});
    util::write_config_named(dir.path(), "apie.mcp.json", config);
    let mut session = dir.session(
        std::iter::empty::<&str>(),
        &[("APIE_RUN_ID", OsStr::new("run_from_env"))],
    );
    assert_eq!(
        echo_then_delete(&mut session).await.as_deref(),
        Some("cwd-rule")
    );
    assert_eq!(close(session).await.code(), Some(0));
    let audit = std::fs::read_to_string(dir.join("audit.jsonl")).expect("audit log");
    let lines: Vec<Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert!(
        lines.iter().all(|l| l["runId"] == "run_from_env"),
        "{audit}"
    );
}

// ---------------------------------------------------------------------------
// Config and usage errors
// ---------------------------------------------------------------------------

/// Every bad config or flag: exit 64, stderr names the field, stdout stays empty, and the
/// upstream (which would create a marker file) is never started.
#[tokio::test]
async fn config_errors_exit_64_before_spawning() {
    let dir = Dir::new();
    let marker = dir.join("upstream-ran");
    let upstream = json!({"command": "touch", "args": [marker]});
    let base = json!({"agentKey": "cli-test", "upstream": upstream, "audit": false});
    let with = |key: &str, value: Value| {
        let mut config = base.clone();
        config[key] = value;
        config
    };
    let bad_regex = with(
        "policies",
        json!([{"name": "r", "conditions": [{"field": "args.path", "operator": "matches",
                                           "value": "(unclosed"}], "action": {"type": "block"}}]),
    );
    // Parses, but compiles beyond `regex`'s size limit: found at load too, not at the first call.
    let huge_regex = with(
        "policies",
        json!([{"name": "r", "conditions": [{"field": "args.path", "operator": "matches",
                                           "value": "\\w{1000}{1000}"}], "action": {"type": "block"}}]),
    );
    let two_servers = json!({
        "agentKey": "cli-test",
        "audit": false,
        "servers": {"a": {"upstream": upstream}, "b": {"upstream": upstream}},
    });
    let cases: Vec<(&str, Value, Vec<&str>, Vec<&str>)> = vec![
        (
            "unknown key",
            with("mdoe", json!("enforce")),
            vec![],
            vec!["mdoe"],
        ),
        (
            "unknown nested key",
            with("guard", json!({"baseURL": "https://x"})),
            vec![],
            vec!["guard.baseURL"],
        ),
        (
            "bad mode",
            with("mode", json!("bogus")),
            vec![],
            vec!["mode", "bogus"],
        ),
        ("empty mode", with("mode", json!("")), vec![], vec!["mode"]),
        (
            "bad regex",
            bad_regex,
            vec![],
            vec!["policies[0].conditions[0].value"],
        ),
        (
            "regex beyond the size limit",
            huge_regex,
            vec![],
            vec!["policies[0].conditions[0].value", "size limit"],
        ),
        (
            "missing variable",
            with("agentName", json!("${APIE_TEST_SURELY_UNSET_VAR}")),
            vec![],
            vec!["agentName", "APIE_TEST_SURELY_UNSET_VAR"],
        ),
        (
            "--mode bogus",
            base.clone(),
            vec!["--mode", "bogus"],
            vec!["--mode"],
        ),
        (
            "--approval-timeout 10x",
            base.clone(),
            vec!["--approval-timeout", "10x"],
            vec!["--approval-timeout"],
        ),
        (
            "several servers, no --server",
            two_servers.clone(),
            vec![],
            vec!["--server"],
        ),
        (
            "unknown --server",
            two_servers,
            vec!["--server", "c"],
            vec!["--server"],
        ),
    ];
    for (what, config, extra, needles) in cases {
        let path = util::write_config(dir.path(), config);
        let mut args = vec!["--config", path.to_str().unwrap()];
        args.extend(extra);
        let out = dir.run(&args).await;
        assert_eq!(out.code(), Some(64), "{what}: stderr {}", out.stderr);
        assert_eq!(out.stdout, "", "{what}: stdout must stay empty");
        for needle in needles {
            assert!(
                out.stderr.contains(needle),
                "{what}: stderr does not name {needle:?}: {}",
                out.stderr
            );
        }
        assert!(!marker.exists(), "{what}: the upstream was started");
    }
}

#[tokio::test]
async fn missing_upstream_command_exits_127() {
    let dir = Dir::new();
    for command in ["/nonexistent/apie-test-server", "apie-test-no-such-command"] {
        let out = dir.run(["--", command]).await;
        assert_eq!(out.code(), Some(127), "{command}: {}", out.stderr);
        assert_eq!(out.stdout, "");
        assert!(
            out.stderr.contains(command),
            "{command}: stderr does not say which command: {}",
            out.stderr
        );
    }
    // Through a config file too.
    let config = util::write_config(
        dir.path(),
        json!({"agentKey": "a", "audit": false,
               "upstream": {"command": "/nonexistent/from-config"}}),
    );
    let out = dir.run(["--config", config.to_str().unwrap()]).await;
    assert_eq!(out.code(), Some(127), "{}", out.stderr);
    assert!(
        out.stderr.contains("/nonexistent/from-config"),
        "{}",
        out.stderr
    );
}

#[tokio::test]
async fn upstream_that_cannot_run_exits_126() {
    let dir = Dir::new();
    let script = dir.join("not-executable");
    std::fs::write(&script, "#!/bin/sh\n").unwrap();
    let out = dir.run(["--", script.to_str().unwrap()]).await;
    assert_eq!(out.code(), Some(126), "{}", out.stderr);
    assert_eq!(out.stdout, "");
    assert!(out.stderr.contains("not-executable"), "{}", out.stderr);
}

// ---------------------------------------------------------------------------
// check, --version, --help
// ---------------------------------------------------------------------------

#[tokio::test]
async fn check_prints_the_example_policy() {
    let dir = Dir::new();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("apie.mcp.json.example");
    let out = dir
        .run(["check".as_ref(), "--config".as_ref(), example.as_os_str()])
        .await;
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let text = &out.stdout;
    assert!(text.contains("rules"), "{text}");
    let at = |needle: &str| {
        text.find(needle)
            .unwrap_or_else(|| panic!("check output lacks {needle:?}:\n{text}"))
    };
    // The rules, in order, with their actions.
    assert!(at("no-deletes") < at("prod-pipelines"));
    assert!(at("prod-pipelines") < at("log-large-reads"));
    assert!(at("mode:") < at("no-deletes"));
    assert!(text.contains("enforce"), "{text}");
    assert!(text.contains("require_approval"), "{text}");
    // fail_closed, a short approval timeout, redaction on: nothing to warn about.
    assert!(!text.contains("fail_open"), "{text}");
}

#[tokio::test]
async fn check_warns_about_enforce_with_fail_open() {
    let dir = Dir::new();
    let marker = dir.join("upstream-ran");
    let config = util::write_config(
        dir.path(),
        json!({
            "agentKey": "cli-test",
            "mode": "enforce",
            "guardFailureMode": "fail_open",
            "upstream": {"command": "touch", "args": [marker]},
            "audit": false,
            "policies": [block_deletes("no-deletes")],
        }),
    );
    let out = dir
        .run(["check", "--config", config.to_str().unwrap()])
        .await;
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let text = &out.stdout;
    let rules = text
        .find("no-deletes")
        .unwrap_or_else(|| panic!("no rule listed:\n{text}"));
    let warnings = text
        .find("warnings")
        .unwrap_or_else(|| panic!("no warnings section:\n{text}"));
    assert!(rules < warnings, "{text}");
    assert!(text[warnings..].contains("fail_open"), "{text}");
    assert!(!marker.exists(), "check started the upstream");
}

#[tokio::test]
async fn check_on_a_bad_config_exits_64() {
    let dir = Dir::new();
    let config = util::write_config(
        dir.path(),
        json!({
            "agentKey": "cli-test",
            "upstream": {"command": "true"},
            "policies": [{"name": "r", "action": {"type": "block"},
                          "conditions": [{"field": "args.x", "operator": "matches", "value": "["}]}],
        }),
    );
    let out = dir
        .run(["check", "--config", config.to_str().unwrap()])
        .await;
    assert_eq!(out.code(), Some(64), "{}", out.stderr);
    assert_eq!(out.stdout, "");
    assert!(
        out.stderr.contains("policies[0].conditions[0].value"),
        "{}",
        out.stderr
    );
}

#[tokio::test]
async fn version_and_help() {
    let dir = Dir::new();
    let out = dir.run(["--version"]).await;
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    assert!(out.stdout.contains("apie-mcp"), "{}", out.stdout);
    assert!(
        out.stdout.contains(env!("CARGO_PKG_VERSION")),
        "{}",
        out.stdout
    );

    let out = dir.run(["--help"]).await;
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    for needle in [
        "--config",
        "--mode",
        "--upstream-command",
        "--run-id",
        "check",
    ] {
        assert!(
            out.stdout.contains(needle),
            "--help lacks {needle}:\n{}",
            out.stdout
        );
    }
}
