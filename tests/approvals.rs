//! The local approval queue end to end (SPEC §6): the real `apie-mcp` in enforce mode in front
//! of `examples/example_server.rs`, with a call held for a human and answered (or not) by a
//! second `apie-mcp approvals …` process sharing the same `APIE_MCP_STATE_DIR`.
//!
//! Every test has its own state directory, so no test ever sees another's queue. The held call
//! is `deploy_service`: critical by name, which the default `riskDefaults` send to a human.
//! What the upstream really received is read from `EXAMPLE_SERVER_LOG`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};

use crate::util::{self, RawSession, finish, legacy_call, result_text, sorted_sha256};

const WAIT: Duration = util::DEFAULT_RECV_TIMEOUT;

/// The arguments of the held call.
fn prod() -> Value {
    json!({"service": "api", "environment": "production"})
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// A temp directory holding one test's config, audit log, the example server's call log and
/// the state directory (so the approval queue) of both the proxy and the `approvals` CLI.
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

    fn queue_dir(&self) -> PathBuf {
        self.state_dir().join("approvals")
    }

    /// An enforce-mode config in front of the example server (logging its calls), auditing to
    /// [`Self::audit_path`], with the default `approvals.channels` (guard, elicitation, local)
    /// and `riskDefaults`; the top-level keys of `extra` are added or replace the base ones.
    fn config(&self, extra: Value) -> PathBuf {
        let mut config = json!({
            "agentKey": "approvals-test-agent",
            "serverName": "ci",
            "mode": "enforce",
            "upstream": {
                "command": util::example_server_bin(),
                "env": {"EXAMPLE_SERVER_LOG": self.server_log()},
            },
            "audit": {"path": self.audit_path()},
        });
        if let Value::Object(extra) = extra {
            for (key, value) in extra {
                config[key] = value;
            }
        }
        util::write_config(self.path(), config)
    }

    /// `apie-mcp --config <config> args…` with this fixture's state directory and no guard
    /// service key, already through the legacy handshake (with no client capabilities, so no
    /// elicitation: the local queue is the channel).
    async fn proxy(&self, config: &Path, args: &[&str]) -> RawSession {
        let mut session = self.proxy_builder(config).args(args).spawn();
        session.initialize_legacy(json!({})).await;
        session
    }

    /// The names of the files in the queue directory (none when it does not exist).
    fn queue_files(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.queue_dir())
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    /// Waits (bounded) until the queue directory holds no file.
    async fn queue_drained(&self) {
        let deadline = Instant::now() + WAIT;
        while !self.queue_files().is_empty() {
            assert!(
                Instant::now() < deadline,
                "the queue still holds {:?}",
                self.queue_files()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Sends a `tools/call` the proxy will hold; returns once `approvals list` shows it, with its
/// approval id.
async fn hold(fx: &Fixture, proxy: &mut RawSession, id: impl Into<Value>) -> String {
    proxy.send(&legacy_call(id, "deploy_service", prod())).await;
    let (ids, listing) = fx.held(1, proxy).await;
    assert!(
        listing.contains("ci.deploy_service"),
        "the listing names the server and tool: {listing}"
    );
    ids.into_iter().next().expect("one held call")
}

/// Asserts `response` is the -32002 refusal of the held `deploy_service` call, with `kind` and
/// `status` ([`util::assert_not_approved`]); returns its `error.data`.
fn assert_not_approved(response: &Value, kind: &str, status: &str) -> Value {
    let data = util::assert_not_approved(response, kind, status);
    assert_eq!(data["tool"], "deploy_service", "{response}");
    data
}

// ---------------------------------------------------------------------------
// 1: approved from a second process
// ---------------------------------------------------------------------------

#[tokio::test]
async fn approve_from_a_second_process_forwards_the_held_call() {
    let fx = Fixture::new();
    let config = fx.config(json!({}));
    let mut proxy = fx.proxy(&config, &[]).await;

    let id = hold(&fx, &mut proxy, "deploy-1").await;
    assert!(id.starts_with("apr_"), "{id}");
    // The proxy names the id on stderr, for the human.
    assert!(
        proxy.stderr_text().contains(&id),
        "the id is not on stderr:\n{}",
        proxy.stderr_text()
    );
    // Held: the host has no answer and the server never saw the call.
    proxy.expect_silence(300).await;
    assert!(fx.server_tools().is_empty(), "{:?}", fx.server_tools());

    let approved = fx.answer(&["approve", &id]).await;
    assert!(
        approved.stdout.contains("approved") && approved.stdout.contains(&id),
        "{approved:?}"
    );
    let response = proxy.recv_until_id("deploy-1").await;
    assert_eq!(
        result_text(&response),
        "deployed api to production",
        "{response}"
    );
    assert_eq!(fx.server_tools(), ["deploy_service"]);
    fx.queue_drained().await;
    // Used once: the same approval cannot be given again.
    let again = fx.approvals(&["approve", &id]).await;
    assert_eq!(again.code, Some(1), "{again:?}");

    assert_eq!(finish(proxy).await.code(), Some(0));
}

// ---------------------------------------------------------------------------
// 2: rejected, with a reason
// ---------------------------------------------------------------------------

#[tokio::test]
async fn reject_with_a_reason_refuses_the_call() {
    let fx = Fixture::new();
    let config = fx.config(json!({}));
    let mut proxy = fx.proxy(&config, &[]).await;

    let id = hold(&fx, &mut proxy, 7).await;
    let rejected = fx
        .answer(&["reject", &id, "--reason", "not on a Friday"])
        .await;
    assert!(rejected.stdout.contains("rejected"), "{rejected:?}");

    let response = proxy.recv_until_id(7).await;
    let data = assert_not_approved(&response, "approval_denied", "rejected");
    assert_eq!(data["approval_id"], id.as_str(), "{response}");
    assert_eq!(data["reason"], "not on a Friday", "{response}");
    fx.queue_drained().await;

    assert_eq!(finish(proxy).await.code(), Some(0));
    assert!(
        fx.server_tools().is_empty(),
        "a rejected call reached the server: {:?}",
        fx.server_tools()
    );
}

// ---------------------------------------------------------------------------
// 3: nobody answers
// ---------------------------------------------------------------------------

#[tokio::test]
async fn unanswered_call_times_out_and_leaves_no_queue_entry() {
    let fx = Fixture::new();
    let config = fx.config(json!({"approvals": {"channels": ["local"]}}));
    let mut proxy = fx.proxy(&config, &["--approval-timeout", "300ms"]).await;

    let sent = Instant::now();
    proxy
        .send(&legacy_call("late", "deploy_service", prod()))
        .await;
    let response = proxy.recv_until_id("late").await;
    let waited = sent.elapsed();
    let data = assert_not_approved(&response, "approval_timeout", "timeout");
    let approval_id = data["approval_id"].as_str().expect("an approval id");
    assert!(approval_id.starts_with("apr_"), "{response}");
    assert!(
        waited >= Duration::from_millis(300),
        "answered after {waited:?}, before the timeout"
    );
    assert!(
        waited < Duration::from_secs(3),
        "a 300 ms timeout took {waited:?}"
    );
    assert!(
        fx.queue_files().is_empty(),
        "the queue still holds {:?} after the timeout",
        fx.queue_files()
    );
    let late = fx.approvals(&["approve", approval_id]).await;
    assert_eq!(late.code, Some(1), "{late:?}");

    assert_eq!(finish(proxy).await.code(), Some(0));
    assert!(fx.server_tools().is_empty(), "{:?}", fx.server_tools());
    let audit = fx.audit_of("late").await;
    assert_eq!(audit["outcome"], "denied", "{audit}");
    assert_eq!(audit["status"], "timeout", "{audit}");
    assert_eq!(audit["approvalId"], approval_id, "{audit}");
}

// ---------------------------------------------------------------------------
// 4: a held call does not stall other traffic
// ---------------------------------------------------------------------------

#[tokio::test]
async fn held_call_does_not_stall_other_traffic() {
    let fx = Fixture::new();
    let config = fx.config(json!({}));
    let mut proxy = fx.proxy(&config, &[]).await;

    let id = hold(&fx, &mut proxy, "held").await;
    let started = Instant::now();
    let echoed = proxy
        .call_tool("e", "echo", json!({"text": "still flowing"}))
        .await;
    assert_eq!(result_text(&echoed), "still flowing", "{echoed}");
    let pong = proxy.request("p", "ping", Value::Null).await;
    assert!(pong.get("result").is_some(), "{pong}");
    let quick = started.elapsed();
    assert!(
        quick < Duration::from_secs(2),
        "echo and ping took {quick:?} behind the held call"
    );
    // Nothing was said about the held call meanwhile.
    assert!(proxy.stashed().is_empty(), "{:?}", proxy.stashed());
    assert_eq!(fx.server_tools(), ["echo"]);

    fx.answer(&["approve", &id]).await;
    let response = proxy.recv_until_id("held").await;
    assert_eq!(result_text(&response), "deployed api to production");
    assert_eq!(fx.server_tools(), ["echo", "deploy_service"]);

    assert_eq!(finish(proxy).await.code(), Some(0));
}

// ---------------------------------------------------------------------------
// 5: the host cancels the held call
// ---------------------------------------------------------------------------

#[tokio::test]
async fn host_cancel_ends_the_wait_silently() {
    let fx = Fixture::new();
    let config = fx.config(json!({}));
    let mut proxy = fx.proxy(&config, &[]).await;

    let id = hold(&fx, &mut proxy, 5).await;
    proxy
        .send(&util::notification(
            "notifications/cancelled",
            json!({"requestId": 5, "reason": "the user gave up"}),
        ))
        .await;
    fx.queue_drained().await;
    // No answer for a cancelled request (and no error either).
    proxy.expect_silence(400).await;
    let late = fx.approvals(&["approve", &id]).await;
    assert_eq!(late.code, Some(1), "{late:?}");
    assert!(late.stderr.contains("no pending approval"), "{late:?}");

    // The session goes on.
    let echoed = proxy.call_tool(6, "echo", json!({"text": "next"})).await;
    assert_eq!(result_text(&echoed), "next", "{echoed}");
    proxy.expect_silence(200).await;

    assert_eq!(finish(proxy).await.code(), Some(0));
    assert_eq!(
        fx.server_tools(),
        ["echo"],
        "the cancelled call was forwarded"
    );
}

// ---------------------------------------------------------------------------
// 6: maxPendingCalls
// ---------------------------------------------------------------------------

#[tokio::test]
async fn calls_over_max_pending_are_refused_at_once() {
    let fx = Fixture::new();
    let config = fx.config(json!({"maxPendingCalls": 1}));
    let mut proxy = fx.proxy(&config, &[]).await;

    let id = hold(&fx, &mut proxy, 1).await;
    let sent = Instant::now();
    let refused = proxy
        .call_tool(
            2,
            "deploy_service",
            json!({"service": "web", "environment": "production"}),
        )
        .await;
    let took = sent.elapsed();
    assert_eq!(refused["error"]["code"], -32003, "{refused}");
    assert_eq!(
        refused["error"]["data"]["kind"], "too_many_pending_calls",
        "{refused}"
    );
    assert!(
        took < Duration::from_secs(1),
        "the refusal took {took:?}: it waited"
    );
    // The first call is still held, alone.
    let (ids, listing) = fx.list().await;
    assert_eq!(ids, std::slice::from_ref(&id), "{listing}");

    fx.answer(&["reject", &id]).await;
    let first = proxy.recv_until_id(1).await;
    let data = assert_not_approved(&first, "approval_denied", "rejected");
    // Rejected with no --reason: the reason is the guard's own.
    assert!(
        data["reason"]
            .as_str()
            .is_some_and(|r| r.contains("critical")),
        "{first}"
    );
    // With the slot free again, the next call is held (not refused).
    let again = hold(&fx, &mut proxy, 3).await;
    fx.answer(&["approve", &again]).await;
    let third = proxy.recv_until_id(3).await;
    assert_eq!(result_text(&third), "deployed api to production", "{third}");

    assert_eq!(finish(proxy).await.code(), Some(0));
    assert_eq!(fx.server_tools(), ["deploy_service"]);
    let audit = fx.audit_of(2).await;
    assert_eq!(audit["outcome"], "too_many_pending", "{audit}");
}

// ---------------------------------------------------------------------------
// 7: host EOF (and SIGTERM) while a call is held
// ---------------------------------------------------------------------------

#[tokio::test]
async fn host_eof_while_held_exits_promptly_and_clears_the_queue() {
    let fx = Fixture::new();
    let config = fx.config(json!({}));
    let mut proxy = fx.proxy(&config, &[]).await;
    let id = hold(&fx, &mut proxy, "held").await;

    let closed = Instant::now();
    proxy.close_stdin();
    let status = proxy.wait_exit(Duration::from_secs(5)).await;
    let took = closed.elapsed();
    assert_eq!(status.code(), Some(0), "{status}");
    assert!(took < Duration::from_secs(5), "exit took {took:?}");
    assert!(
        fx.queue_files().is_empty(),
        "the proxy left {:?} behind",
        fx.queue_files()
    );
    let late = fx.approvals(&["approve", &id]).await;
    assert_eq!(late.code, Some(1), "{late:?}");
    assert!(late.stderr.contains("no pending approval"), "{late:?}");
    assert!(fx.server_tools().is_empty(), "{:?}", fx.server_tools());
    let audit = fx.audit_of("held").await;
    assert_eq!(audit["outcome"], "cancelled", "{audit}");
    assert_eq!(audit["approvalId"], id.as_str(), "{audit}");
}

#[tokio::test]
async fn sigterm_while_held_exits_promptly_and_clears_the_queue() {
    let fx = Fixture::new();
    let config = fx.config(json!({}));
    let mut proxy = fx.proxy(&config, &[]).await;
    let id = hold(&fx, &mut proxy, "held").await;

    let pid = Pid::from_raw(i32::try_from(proxy.pid()).expect("pid fits"));
    kill(pid, Signal::SIGTERM).expect("SIGTERM the proxy");
    let status = proxy.wait_exit(Duration::from_secs(5)).await;
    assert_eq!(status.code(), Some(128 + 15), "{status}");
    assert!(
        fx.queue_files().is_empty(),
        "the proxy left {:?} behind",
        fx.queue_files()
    );
    let late = fx.approvals(&["approve", &id]).await;
    assert_eq!(late.code, Some(1), "{late:?}");
    assert!(fx.server_tools().is_empty(), "{:?}", fx.server_tools());
}

// ---------------------------------------------------------------------------
// Only enforce mode holds
// ---------------------------------------------------------------------------

#[tokio::test]
async fn monitor_mode_never_holds() {
    let fx = Fixture::new();
    let config = fx.config(json!({"mode": "monitor"}));
    let mut proxy = fx.proxy(&config, &[]).await;
    let response = proxy.call_tool(1, "deploy_service", prod()).await;
    assert_eq!(result_text(&response), "deployed api to production");
    assert!(fx.queue_files().is_empty(), "{:?}", fx.queue_files());
    assert_eq!(finish(proxy).await.code(), Some(0));
    let audit = fx.audit_of(1).await;
    assert_eq!(audit["outcome"], "would_require_approval", "{audit}");
    assert!(audit.get("approvalId").is_none(), "{audit}");
}

// ---------------------------------------------------------------------------
// 8: the CLI on its own
// ---------------------------------------------------------------------------

#[tokio::test]
async fn cli_with_an_empty_queue() {
    let fx = Fixture::new();
    let listed = fx.approvals(&["list"]).await;
    assert_eq!(listed.code, Some(0), "{listed:?}");
    assert!(
        listed.stdout.contains("no calls are waiting for approval"),
        "{listed:?}"
    );
    for verb in ["approve", "reject"] {
        let unknown = fx.approvals(&[verb, "apr_nope"]).await;
        assert_eq!(unknown.code, Some(1), "{verb}: {unknown:?}");
        assert!(
            unknown.stderr.contains("no pending approval apr_nope"),
            "{verb}: {unknown:?}"
        );
        assert!(unknown.stdout.is_empty(), "{verb}: {unknown:?}");
    }
    // Answering nothing writes nothing.
    assert!(fx.queue_files().is_empty(), "{:?}", fx.queue_files());
}

// ---------------------------------------------------------------------------
// 9: an approval is bound to its call
// ---------------------------------------------------------------------------

/// Writes `answer` as `<queue>/<id>.answer.json` the way the CLI does (temporary name, then
/// rename), so the proxy never reads half of it.
fn forge_answer(fx: &Fixture, id: &str, answer: &Value) {
    let path = fx.queue_dir().join(format!("{id}.answer.json"));
    let tmp = fx.queue_dir().join(format!("{id}.forged.tmp"));
    std::fs::write(&tmp, serde_json::to_vec(answer).unwrap()).expect("write the forged answer");
    std::fs::rename(&tmp, &path).expect("rename the forged answer into place");
}

#[tokio::test]
async fn a_forged_answer_for_other_arguments_does_not_release_the_call() {
    let fx = Fixture::new();
    let config = fx.config(json!({"approvalTimeoutMs": 1500}));
    let mut proxy = fx.proxy(&config, &[]).await;

    let id = hold(&fx, &mut proxy, "bound").await;
    // An approval of the same tool with other arguments (staging, not production).
    let forged = json!({
        "id": id,
        "argumentsSha256": sorted_sha256(&json!({"service": "api", "environment": "staging"})),
        "status": "approved",
        "reason": null,
    });
    forge_answer(&fx, &id, &forged);
    let response = proxy.recv_until_id("bound").await;
    let data = assert_not_approved(&response, "approval_timeout", "timeout");
    assert_eq!(data["approval_id"], id.as_str(), "{response}");
    fx.queue_drained().await;

    assert_eq!(finish(proxy).await.code(), Some(0));
    assert!(
        fx.server_tools().is_empty(),
        "a forged approval released the call: {:?}",
        fx.server_tools()
    );
}

// ---------------------------------------------------------------------------
// 10: audit
// ---------------------------------------------------------------------------

#[tokio::test]
async fn audit_lines_carry_the_approval_id_and_status() {
    let fx = Fixture::new();
    let config = fx.config(json!({"policies": [sums_need_a_human()]}));
    let mut proxy = fx.proxy(&config, &[]).await;

    let approved = hold(&fx, &mut proxy, "a").await;
    fx.answer(&["approve", &approved]).await;
    proxy.recv_until_id("a").await;

    let rejected = hold(&fx, &mut proxy, "r").await;
    fx.answer(&["reject", &rejected, "--reason", "no"]).await;
    proxy.recv_until_id("r").await;

    let cancelled = hold(&fx, &mut proxy, "c").await;
    proxy
        .send(&util::notification(
            "notifications/cancelled",
            json!({"requestId": "c"}),
        ))
        .await;
    fx.queue_drained().await;

    // Held by a rule rather than by risk: the listing and the audit line name the rule.
    proxy
        .send(&legacy_call("s", "add", json!({"a": 2, "b": 3})))
        .await;
    let (ids, listing) = fx.held(1, &proxy).await;
    assert!(
        listing.contains("ci.add") && listing.contains("rule sums-need-a-human"),
        "{listing}"
    );
    assert!(listing.contains("sums are checked by hand"), "{listing}");
    let by_rule = ids[0].clone();
    fx.answer(&["approve", &by_rule]).await;
    let sum = proxy.recv_until_id("s").await;
    assert_eq!(result_text(&sum), "5", "{sum}");

    let echoed = proxy.call_tool("e", "echo", json!({"text": "x"})).await;
    assert_eq!(result_text(&echoed), "x");
    assert_eq!(finish(proxy).await.code(), Some(0));

    for (request, approval, outcome, status) in [
        ("a", &approved, "approved", "approved"),
        ("r", &rejected, "denied", "rejected"),
        ("c", &cancelled, "cancelled", "cancelled"),
    ] {
        let line = fx.audit_of(request).await;
        assert_eq!(line["approvalId"], approval.as_str(), "{line}");
        assert_eq!(line["outcome"], outcome, "{line}");
        assert_eq!(line["status"], status, "{line}");
        assert_eq!(line["tool"], "deploy_service", "{line}");
        assert_eq!(line["decision"], "require_approval", "{line}");
        assert_eq!(line["riskLevel"], "critical", "{line}");
        assert_eq!(line["argumentsSha256"], sorted_sha256(&prod()), "{line}");
    }
    let line = fx.audit_of("s").await;
    assert_eq!(line["approvalId"], by_rule.as_str(), "{line}");
    assert_eq!(line["outcome"], "approved", "{line}");
    assert_eq!(line["status"], "approved", "{line}");
    assert_eq!(line["rule"], "sums-need-a-human", "{line}");
    assert_eq!(line["reason"], "sums are checked by hand", "{line}");
    // One approval id per held call.
    let mut ids = vec![&approved, &rejected, &cancelled, &by_rule];
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 4, "{ids:?}");
    // A call that was never held has neither.
    let line = fx.audit_of("e").await;
    assert_eq!(line["outcome"], "forwarded", "{line}");
    assert!(line.get("approvalId").is_none(), "{line}");
    assert!(line.get("status").is_none(), "{line}");
    assert_eq!(fx.server_tools(), ["deploy_service", "add", "echo"]);
}

/// A rule holding every `add` for a human (`add` itself is low risk).
fn sums_need_a_human() -> Value {
    json!({
        "name": "sums-need-a-human",
        "verbMatchers": [{"type": "verb", "value": "add"}],
        "action": {"type": "require_approval"},
        "reason": "sums are checked by hand",
    })
}

// ---------------------------------------------------------------------------
// Batches: a held call inside a batch
// ---------------------------------------------------------------------------

#[tokio::test]
async fn batch_with_a_held_call_is_answered_once_approved() {
    let fx = Fixture::new();
    let config = fx.config(json!({}));
    let mut proxy = fx.proxy(&config, &[]).await;

    proxy
        .send(&json!([
            legacy_call("b-held", "deploy_service", prod()),
            legacy_call("b-echo", "echo", json!({"text": "in the batch"})),
        ]))
        .await;
    let (ids, _) = fx.held(1, &proxy).await;
    // The batch is answered as one array, so nothing comes while one element is held.
    proxy.expect_silence(300).await;
    fx.answer(&["approve", &ids[0]]).await;
    let answer: Value = serde_json::from_str(&proxy.recv_line().await).expect("JSON");
    let answers = answer
        .as_array()
        .unwrap_or_else(|| panic!("not a batch answer: {answer}"));
    assert_eq!(answers.len(), 2, "{answer}");
    let of = |id: &str| {
        answers
            .iter()
            .find(|a| a["id"] == id)
            .unwrap_or_else(|| panic!("no answer to {id} in {answer}"))
    };
    assert_eq!(result_text(of("b-held")), "deployed api to production");
    assert_eq!(result_text(of("b-echo")), "in the batch");
    assert_eq!(finish(proxy).await.code(), Some(0));
}

#[tokio::test]
async fn batch_with_a_cancelled_held_call_still_answers_the_rest() {
    let fx = Fixture::new();
    let config = fx.config(json!({}));
    let mut proxy = fx.proxy(&config, &[]).await;

    proxy
        .send(&json!([
            legacy_call("b-held", "deploy_service", prod()),
            legacy_call("b-echo", "echo", json!({"text": "in the batch"})),
        ]))
        .await;
    fx.held(1, &proxy).await;
    proxy
        .send(&util::notification(
            "notifications/cancelled",
            json!({"requestId": "b-held"}),
        ))
        .await;
    fx.queue_drained().await;
    // The cancelled element gets no answer; the echo the server did answer must still reach
    // the host, in the batch's array.
    let Some(line) = proxy.try_recv_line(Duration::from_secs(2)).await else {
        panic!(
            "the echo's answer never came: the batch waits for the cancelled call\n--- proxy stderr ---\n{}",
            proxy.stderr_text()
        );
    };
    let answer: Value = serde_json::from_str(&line).expect("JSON");
    let answers = answer
        .as_array()
        .unwrap_or_else(|| panic!("not a batch answer: {answer}"));
    assert_eq!(answers.len(), 1, "{answer}");
    assert_eq!(answers[0]["id"], "b-echo", "{answer}");
    assert_eq!(result_text(&answers[0]), "in the batch");
    assert_eq!(finish(proxy).await.code(), Some(0));
    assert_eq!(fx.server_tools(), ["echo"]);
}
