//! Shutdown and process lifetime (SPEC §7 "Shutdown", §2 exit codes): host EOF and
//! SIGTERM/SIGINT/SIGHUP close the upstream's stdin first, late output still reaches the host, a
//! server that ignores everything is SIGKILLed, nothing is left behind in the upstream's process
//! group, and the proxy exits with the right code. Every stdout line of every session here must
//! be JSON. A module of the `tests` integration crate (`mod shutdown;` in `tests/tests.rs`).

use std::path::Path;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};

use crate::util::{RawSession, example_server_bin, proxy_bin, result_text, write_config};

/// Longest any proxy here may take to exit once told to (the slowest path, SIGKILL after two
/// 2-second grace periods, needs about 4 s).
const EXIT_LIMIT: Duration = Duration::from_secs(8);

/// `sh -c EXEC_WRAPPER sh DIR SERVER`: a shell wrapper that leaves a background grandchild and
/// `exec`s the server (the server keeps the shell's pid). Writes `DIR/server.pid` and
/// `DIR/grandchild.pid`.
const EXEC_WRAPPER: &str =
    r#"echo $$ > "$1/server.pid"; sleep 300 & echo $! > "$1/grandchild.pid"; exec "$2""#;

/// Like [`EXEC_WRAPPER`], but the shell stays the parent of the server, as `npx` and `uvx` do,
/// and writes `DIR/marker` with the server's exit status once it returns. The shell dies with a
/// SIGTERM to the group, so the marker says the server ended because its stdin was closed.
const NPX_WRAPPER: &str = r#"echo $$ > "$1/server.pid"; sleep 300 & echo $! > "$1/grandchild.pid"; "$2"; echo "exited $?" > "$1/marker""#;

// ---------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------

/// `(state, pgrp)` of a process from `/proc/<pid>/stat`; `None` when it does not exist.
fn proc_stat(pid: i32) -> Option<(String, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.to_owned();
    let pgrp = fields.nth(1)?.parse().ok()?;
    Some((state, pgrp))
}

/// Whether `pid` is a running process: absent or a zombie (`Z`, `X`) counts as gone. A killed
/// grandchild is reparented and may stay a zombie for as long as init does not reap it.
fn alive(pid: i32) -> bool {
    proc_stat(pid).is_some_and(|(state, _)| !matches!(state.as_str(), "Z" | "X"))
}

/// Live (not zombie) processes of process group `pgid`.
fn live_group_members(pgid: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| proc_stat(pid).is_some_and(|(_, pgrp)| pgrp == pgid) && alive(pid))
        .collect()
}

/// Waits (bounded) for a file a wrapper writes, then reads the pid in it.
async fn read_pid_file(path: &Path) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(text) = std::fs::read_to_string(path)
            && let Ok(pid) = text.trim().parse()
        {
            return pid;
        }
        assert!(
            Instant::now() < deadline,
            "{} never appeared (did the upstream start?)",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn signal_proxy(session: &RawSession, signal: Signal) {
    kill(Pid::from_raw(session.pid() as i32), signal)
        .unwrap_or_else(|e| panic!("cannot send {signal} to the proxy: {e}"));
}

/// Asserts that neither `pids` nor anything else in group `pgid` is still running.
fn assert_no_orphans(session: &RawSession, pgid: i32, pids: &[(&str, i32)]) {
    for (what, pid) in pids {
        assert!(
            !alive(*pid),
            "the {what} (pid {pid}) outlived the proxy: {:?}\n--- proxy stderr ---\n{}",
            proc_stat(*pid),
            session.stderr_text()
        );
    }
    let left = live_group_members(pgid);
    assert!(
        left.is_empty(),
        "processes of the upstream's group {pgid} outlived the proxy: {left:?}\n--- proxy stderr \
         ---\n{}",
        session.stderr_text()
    );
}

// ---------------------------------------------------------------------------
// Sessions
// ---------------------------------------------------------------------------

/// The proxy in front of `command args…`, from a config file in `dir` (monitor mode, no
/// audit), running in `dir`.
fn spawn_proxy(dir: &Path, command: &str, args: &[&str]) -> RawSession {
    let config = write_config(
        dir,
        json!({
            "agentKey": "shutdown-test",
            "mode": "monitor",
            "audit": false,
            "upstream": {"command": command, "args": args},
        }),
    );
    RawSession::builder(proxy_bin())
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "debug")
        .current_dir(dir)
        .spawn()
}

/// The proxy in front of `sh -c SCRIPT sh DIR EXAMPLE_SERVER`.
fn spawn_wrapped(dir: &Path, script: &str) -> RawSession {
    let server = example_server_bin();
    let dir_arg = dir.to_str().expect("utf-8 tempdir");
    let server_arg = server.to_str().expect("utf-8 example path");
    spawn_proxy(dir, "sh", &["-c", script, "sh", dir_arg, server_arg])
}

/// Reads stdout to EOF (bounded), asserting that every line is JSON; returns the messages.
async fn drain_json(session: &mut RawSession, limit: Duration) -> Vec<Value> {
    let deadline = Instant::now() + limit;
    let mut messages = Vec::new();
    while let Some(line) = session
        .try_recv_line(deadline.saturating_duration_since(Instant::now()))
        .await
    {
        let message = serde_json::from_str(&line).unwrap_or_else(|e| {
            panic!(
                "stdout line is not JSON ({e}): {line:?}\n--- proxy stderr ---\n{}",
                session.stderr_text()
            )
        });
        messages.push(message);
    }
    // EOF already seen: returns at once. Otherwise stdout is still open past the limit.
    session.expect_eof(Duration::ZERO).await;
    messages
}

/// Waits for the proxy to exit and returns its status and how long that took since `since`.
async fn exit_after(session: &mut RawSession, since: Instant) -> (ExitStatus, Duration) {
    let status = session.wait_exit(EXIT_LIMIT).await;
    (status, since.elapsed())
}

fn assert_code(session: &RawSession, status: ExitStatus, code: i32) {
    assert_eq!(
        status.code(),
        Some(code),
        "proxy exit status {status:?}, want code {code}\n--- proxy stderr ---\n{}",
        session.stderr_text()
    );
}

// ---------------------------------------------------------------------------
// Host EOF and signals, with a grandchild in the upstream's group
// ---------------------------------------------------------------------------

/// What ends the session.
#[derive(Clone, Copy, Debug)]
enum Trigger {
    HostEof,
    Signal(Signal),
}

/// Starts the example server behind `wrapper` (which leaves a `sleep 300` grandchild), checks
/// the session works, ends it with `trigger`, and checks the exit code, that stdout carried
/// JSON only, that nothing of the upstream's group survived, and that the server's stderr
/// reached the proxy's.
async fn grandchild_case(wrapper: &str, trigger: Trigger) -> (tempfile::TempDir, Duration) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut session = spawn_wrapped(dir.path(), wrapper);
    session.initialize_legacy(json!({})).await;
    let echo = session
        .call_tool(1, "echo", json!({"text": "still here"}))
        .await;
    assert_eq!(result_text(&echo), "still here", "{echo}");

    let server = read_pid_file(&dir.path().join("server.pid")).await;
    let grandchild = read_pid_file(&dir.path().join("grandchild.pid")).await;
    assert!(alive(server) && alive(grandchild), "the upstream is not up");
    assert_eq!(
        proc_stat(grandchild).map(|(_, pgrp)| pgrp),
        Some(server),
        "test premise: the grandchild shares the upstream's process group"
    );

    let start = Instant::now();
    let want = match trigger {
        Trigger::HostEof => {
            session.close_stdin();
            0
        }
        Trigger::Signal(signal) => {
            signal_proxy(&session, signal);
            128 + signal as i32
        }
    };
    let late = drain_json(&mut session, EXIT_LIMIT).await;
    assert!(
        late.is_empty(),
        "nothing was pending, yet the host got {late:?}"
    );
    let (status, elapsed) = exit_after(&mut session, start).await;
    assert_code(&session, status, want);
    assert!(
        elapsed < Duration::from_secs(5),
        "{trigger:?}: the proxy took {elapsed:?} to exit\n--- proxy stderr ---\n{}",
        session.stderr_text()
    );
    assert_no_orphans(
        &session,
        server,
        &[("upstream", server), ("grandchild", grandchild)],
    );
    let stderr = session.stderr_text();
    assert!(
        stderr.contains("example-server") && stderr.contains("MCP on stdio"),
        "the upstream's stderr banner did not reach the proxy's stderr:\n{stderr}"
    );
    (dir, elapsed)
}

/// The wrapper's marker: the server returned by itself (stdin EOF), not killed by a signal.
fn assert_server_saw_eof(dir: &Path, trigger: Trigger) {
    let marker = std::fs::read_to_string(dir.join("marker")).unwrap_or_else(|e| {
        panic!(
            "{trigger:?}: the wrapper never saw the server return ({e}): the upstream was \
             signalled instead of having its stdin closed"
        )
    });
    assert_eq!(marker.trim(), "exited 0", "{trigger:?}");
}

#[tokio::test]
async fn host_eof_stops_an_exec_wrapper_and_its_grandchild() {
    grandchild_case(EXEC_WRAPPER, Trigger::HostEof).await;
}

#[tokio::test]
async fn host_eof_closes_the_upstream_stdin_and_sweeps_an_npx_like_wrapper() {
    let trigger = Trigger::HostEof;
    let (dir, _) = grandchild_case(NPX_WRAPPER, trigger).await;
    assert_server_saw_eof(dir.path(), trigger);
}

#[tokio::test]
async fn sigterm_to_the_proxy_shuts_down_like_host_eof() {
    let trigger = Trigger::Signal(Signal::SIGTERM);
    let (dir, _) = grandchild_case(NPX_WRAPPER, trigger).await;
    assert_server_saw_eof(dir.path(), trigger);
}

#[tokio::test]
async fn sigint_to_the_proxy_shuts_down_like_host_eof() {
    let trigger = Trigger::Signal(Signal::SIGINT);
    let (dir, _) = grandchild_case(NPX_WRAPPER, trigger).await;
    assert_server_saw_eof(dir.path(), trigger);
}

#[tokio::test]
async fn sighup_to_the_proxy_shuts_down_like_host_eof() {
    let trigger = Trigger::Signal(Signal::SIGHUP);
    let (dir, _) = grandchild_case(NPX_WRAPPER, trigger).await;
    assert_server_saw_eof(dir.path(), trigger);
}

#[tokio::test]
async fn sigterm_stops_an_exec_wrapper_and_its_grandchild() {
    grandchild_case(EXEC_WRAPPER, Trigger::Signal(Signal::SIGTERM)).await;
}

// ---------------------------------------------------------------------------
// An upstream that ignores stdin EOF and SIGTERM
// ---------------------------------------------------------------------------

#[tokio::test]
async fn an_upstream_ignoring_eof_and_sigterm_is_sigkilled() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dir_arg = dir.path().to_str().expect("utf-8 tempdir");
    // Never reads stdin, never answers; its `sleep`s inherit the ignored SIGTERM.
    let script = r#"echo $$ > "$1/server.pid"; trap "" TERM; while true; do sleep 0.1; done"#;
    let mut session = spawn_proxy(dir.path(), "sh", &["-c", script, "sh", dir_arg]);
    let server = read_pid_file(&dir.path().join("server.pid")).await;
    // The trap is set right after the pid file is written; give the shell a moment.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(alive(server), "the upstream is not up");

    let start = Instant::now();
    session.close_stdin();
    let late = drain_json(&mut session, EXIT_LIMIT).await;
    assert!(late.is_empty(), "the host got {late:?}");
    let (status, elapsed) = exit_after(&mut session, start).await;
    assert_code(&session, status, 0);
    assert!(
        elapsed < Duration::from_secs(6),
        "the proxy took {elapsed:?} to get rid of a stubborn upstream\n--- proxy stderr ---\n{}",
        session.stderr_text()
    );
    assert_no_orphans(&session, server, &[("upstream", server)]);
}

// ---------------------------------------------------------------------------
// The upstream exits by itself
// ---------------------------------------------------------------------------

/// The proxy in front of `sh -c SCRIPT sh DIR`, which exits on its own; returns the proxy's
/// exit status once the session is over (stdout checked to be JSON only, and empty).
async fn self_exiting(dir: &Path, script: &str) -> (RawSession, ExitStatus, Duration) {
    let dir_arg = dir.to_str().expect("utf-8 tempdir");
    let start = Instant::now();
    let mut session = spawn_proxy(dir, "sh", &["-c", script, "sh", dir_arg]);
    let out = drain_json(&mut session, EXIT_LIMIT).await;
    assert!(out.is_empty(), "the host got {out:?}");
    let (status, elapsed) = exit_after(&mut session, start).await;
    (session, status, elapsed)
}

#[tokio::test]
async fn the_proxy_exits_with_the_upstreams_code() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (session, status, _) = self_exiting(dir.path(), "exit 5").await;
    assert_code(&session, status, 5);
}

#[tokio::test]
async fn an_upstream_killed_by_a_signal_gives_128_plus_n() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (session, status, _) = self_exiting(dir.path(), "kill -KILL $$").await;
    assert_code(&session, status, 128 + 9);
}

#[tokio::test]
async fn a_grandchild_left_by_an_exited_upstream_is_swept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let script = r#"echo $$ > "$1/server.pid"; sleep 300 & echo $! > "$1/grandchild.pid"; exit 4"#;
    let (session, status, elapsed) = self_exiting(dir.path(), script).await;
    assert_code(&session, status, 4);
    assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
    let server = read_pid_file(&dir.path().join("server.pid")).await;
    let grandchild = read_pid_file(&dir.path().join("grandchild.pid")).await;
    assert_no_orphans(&session, server, &[("grandchild", grandchild)]);
}

#[tokio::test]
async fn a_grandchild_ignoring_sigterm_left_by_an_exited_upstream_is_sigkilled() {
    let dir = tempfile::tempdir().expect("tempdir");
    let script = r#"echo $$ > "$1/server.pid"; (trap "" TERM; while true; do sleep 0.1; done) & echo $! > "$1/grandchild.pid"; sleep 0.2; exit 3"#;
    let (session, status, elapsed) = self_exiting(dir.path(), script).await;
    assert_code(&session, status, 3);
    assert!(elapsed < Duration::from_secs(7), "took {elapsed:?}");
    let server = read_pid_file(&dir.path().join("server.pid")).await;
    let grandchild = read_pid_file(&dir.path().join("grandchild.pid")).await;
    assert_no_orphans(&session, server, &[("grandchild", grandchild)]);
}

#[tokio::test]
async fn an_upstream_exiting_mid_call_answers_the_call_and_passes_its_code_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = example_server_bin();
    let mut session = spawn_proxy(
        dir.path(),
        server.to_str().expect("utf-8 example path"),
        &[],
    );
    session.initialize_legacy(json!({})).await;
    let start = Instant::now();
    let response = session.call_tool(7, "exit", json!({"code": 7})).await;
    assert_eq!(response["error"]["code"], json!(-32603), "{response}");
    assert_eq!(
        response["error"]["data"]["kind"],
        json!("upstream_exited"),
        "{response}"
    );
    let late = drain_json(&mut session, EXIT_LIMIT).await;
    assert!(late.is_empty(), "the host got {late:?}");
    let (status, elapsed) = exit_after(&mut session, start).await;
    assert_code(&session, status, 7);
    assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
}

#[tokio::test]
async fn after_host_eof_the_exit_code_is_0_whatever_the_upstream_returns() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut session = spawn_proxy(dir.path(), "sh", &["-c", "cat > /dev/null; exit 3"]);
    let start = Instant::now();
    session.close_stdin();
    let out = drain_json(&mut session, EXIT_LIMIT).await;
    assert!(out.is_empty(), "the host got {out:?}");
    let (status, _) = exit_after(&mut session, start).await;
    assert_code(&session, status, 0);
}

/// SPEC §7: after host EOF, SIGTERM comes at most 2 s later, even when the server has stopped
/// reading its stdin and a backlog of host messages is still queued for it.
#[tokio::test]
async fn an_upstream_that_stopped_reading_is_sigtermed_within_the_grace_period() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dir_arg = dir.path().to_str().expect("utf-8 tempdir");
    // Never reads stdin; leaves (exit 0) on SIGTERM.
    let script = r#"echo $$ > "$1/server.pid"; trap "exit 0" TERM; while true; do sleep 0.1; done"#;
    let mut session = spawn_proxy(dir.path(), "sh", &["-c", script, "sh", dir_arg]);
    let server = read_pid_file(&dir.path().join("server.pid")).await;
    // About 800 KB of pass-through notifications: more than the pipe to the server holds, less
    // than the proxy's queue, so the proxy takes them all and is left holding a backlog.
    let pad = "y".repeat(4000);
    let mut backlog = String::new();
    for _ in 0..200 {
        let message = crate::util::notification("notifications/apie-test", json!({"pad": pad}));
        backlog.push_str(&message.to_string());
        backlog.push('\n');
    }
    session
        .send_raw(backlog.as_bytes())
        .await
        .expect("the proxy takes the backlog");
    tokio::time::sleep(Duration::from_millis(300)).await;

    let start = Instant::now();
    session.close_stdin();
    drain_json(&mut session, EXIT_LIMIT).await;
    let (status, elapsed) = exit_after(&mut session, start).await;
    assert_code(&session, status, 0);
    assert_no_orphans(&session, server, &[("upstream", server)]);
    assert!(
        elapsed < Duration::from_millis(3500),
        "SIGTERM came {elapsed:?} after host EOF (SPEC: at most 2 s)\n--- proxy stderr ---\n{}",
        session.stderr_text()
    );
}

// ---------------------------------------------------------------------------
// Late output and stderr
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_call_in_flight_at_host_eof_still_gets_its_result() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = example_server_bin();
    let mut session = spawn_proxy(
        dir.path(),
        server.to_str().expect("utf-8 example path"),
        &[],
    );
    session.initialize_legacy(json!({})).await;
    session
        .send(&crate::util::legacy_call(9, "slow", json!({"ms": 300})))
        .await;
    let start = Instant::now();
    session.close_stdin();
    let out = drain_json(&mut session, EXIT_LIMIT).await;
    let response = out.iter().find(|m| m["id"] == json!(9)).unwrap_or_else(|| {
        panic!(
            "no response to the call in flight; the host got {out:?}\n--- proxy stderr \
                 ---\n{}",
            session.stderr_text()
        )
    });
    assert_eq!(result_text(response), "slept 300", "{response}");
    let (status, _) = exit_after(&mut session, start).await;
    assert_code(&session, status, 0);
}

#[tokio::test]
async fn output_written_after_the_upstream_saw_eof_reaches_the_host() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Answers only once its stdin is closed, a moment later.
    let script =
        r#"cat > /dev/null; sleep 0.3; echo '{"jsonrpc":"2.0","id":"late-1","result":{}}'"#;
    let mut session = spawn_proxy(dir.path(), "sh", &["-c", script]);
    session
        .send(&crate::util::request("late-1", "ping", Value::Null))
        .await;
    let start = Instant::now();
    session.close_stdin();
    let out = drain_json(&mut session, EXIT_LIMIT).await;
    assert_eq!(
        out,
        vec![json!({"jsonrpc": "2.0", "id": "late-1", "result": {}})],
        "--- proxy stderr ---\n{}",
        session.stderr_text()
    );
    let (status, _) = exit_after(&mut session, start).await;
    assert_code(&session, status, 0);
}

#[tokio::test]
async fn a_flood_on_the_upstreams_stderr_is_drained_and_never_stalls_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    // About 200 KB on stderr before the server starts: more than any pipe buffer.
    let script = r#"i=0; while [ $i -lt 2500 ]; do echo "stderr-flood $i ................................................................" >&2; i=$((i+1)); done; exec "$2""#;
    let mut session = spawn_wrapped(dir.path(), script);
    session.set_recv_timeout(Duration::from_secs(20));
    session.initialize_legacy(json!({})).await;
    let echo = session.call_tool(1, "echo", json!({"text": "after"})).await;
    assert_eq!(result_text(&echo), "after", "{echo}");
    session.close_stdin();
    drain_json(&mut session, EXIT_LIMIT).await;
    let status = session.wait_exit(EXIT_LIMIT).await;
    assert_code(&session, status, 0);
    let stderr = session.stderr_text();
    assert!(
        stderr.contains("stderr-flood 2499 ") && stderr.contains("MCP on stdio"),
        "the upstream's stderr did not all reach the proxy's ({} bytes)",
        stderr.len()
    );
}
