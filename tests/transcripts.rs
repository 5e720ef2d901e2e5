//! Replays every `fixtures/transcripts/*.jsonl` against the real binary.
//!
//! The test plays both ends: the host (the proxy's stdin and stdout) and the upstream, which is
//! `socket_bridge` relaying the proxy's pipes to a TCP socket the test holds. Each step either
//! sends a message or expects one; any difference, any missing message and any extra message
//! fails the replay. The format is documented in `fixtures/transcripts/README.md`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use crate::util::{RawSession, proxy_bin, socket_bridge_bin};

const WAIT: Duration = Duration::from_secs(10);

fn transcripts() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/transcripts");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    files.sort();
    files
}

struct Upstream {
    lines: tokio::io::Lines<BufReader<OwnedReadHalf>>,
    write: OwnedWriteHalf,
}

impl Upstream {
    async fn recv(&mut self, what: &str) -> Value {
        match tokio::time::timeout(WAIT, self.lines.next_line()).await {
            Ok(Ok(Some(line))) => serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("{what}: upstream got non-JSON {line:?}: {e}")),
            other => panic!("{what}: nothing reached the upstream ({other:?})"),
        }
    }
}

/// The audit lines written so far.
fn audit_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `got` equals `want`, where the string `"<any>"` in `want` stands for any value (approval
/// ids are random).
fn same(got: &Value, want: &Value) -> bool {
    match (got, want) {
        (_, Value::String(s)) if s == "<any>" => true,
        (Value::Object(g), Value::Object(w)) => {
            g.len() == w.len()
                && w.iter()
                    .all(|(k, v)| g.get(k).is_some_and(|gv| same(gv, v)))
        }
        (Value::Array(g), Value::Array(w)) => {
            g.len() == w.len() && g.iter().zip(w).all(|(g, w)| same(g, w))
        }
        _ => got == want,
    }
}

/// Answers the one pending approval in `state` with `apie-mcp approvals ARGS… ID`.
async fn answer_approval(state: &Path, args: &[&str], at: &str) {
    let queue = state.join("approvals");
    let deadline = tokio::time::Instant::now() + WAIT;
    let id = loop {
        let pending: Vec<String> = std::fs::read_dir(&queue)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.ends_with(".json") && !n.ends_with(".answer.json"))
                    .collect()
            })
            .unwrap_or_default();
        match pending.as_slice() {
            [one] => break one.trim_end_matches(".json").to_string(),
            [] if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await
            }
            other => panic!("{at}: expected one pending approval, found {other:?}"),
        }
    };
    let (verb, rest) = args.split_first().unwrap();
    let out = tokio::process::Command::new(proxy_bin())
        .args(["approvals", verb, &id])
        .args(rest)
        .env("APIE_MCP_STATE_DIR", state)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{at}: approvals {verb} failed: {out:?}"
    );
}

/// `want` is contained in `got`: every field of `want` is there with the same value.
fn contains(got: &Value, want: &Value) -> bool {
    match (got, want) {
        (Value::Object(g), Value::Object(w)) => w
            .iter()
            .all(|(k, v)| g.get(k).is_some_and(|gv| contains(gv, v))),
        _ => got == want,
    }
}

async fn replay(path: &Path) {
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    let text = std::fs::read_to_string(path).unwrap();
    let mut steps = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let v: Value = serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("{name}:{}: not JSON: {e}", i + 1));
            (i + 1, v)
        });
    let (_, header) = steps.next().unwrap_or_else(|| panic!("{name}: empty"));
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let mut config = header["config"].clone();
    assert!(
        config.is_object(),
        "{name}: the first line needs a \"config\" object"
    );
    config["upstream"] = json!({"command": socket_bridge_bin(), "args": [addr]});
    config["audit"] = json!({"path": audit});
    let config_path = dir.path().join("apie.mcp.json");
    std::fs::write(&config_path, config.to_string()).unwrap();

    let mut args = vec!["--config".to_string(), config_path.display().to_string()];
    if let Some(extra) = header["args"].as_array() {
        args.extend(extra.iter().map(|a| a.as_str().unwrap().to_string()));
    }
    let state = dir.path().join("state");
    let mut host = RawSession::builder(proxy_bin())
        .args(&args)
        .env("APIE_MCP_STATE_DIR", &state)
        .env("RUST_LOG", "debug")
        .current_dir(dir.path())
        .spawn();
    let (socket, _) = tokio::time::timeout(WAIT, listener.accept())
        .await
        .unwrap_or_else(|_| panic!("{name}: the upstream never connected"))
        .unwrap();
    let (read, write) = socket.into_split();
    let mut upstream = Upstream {
        lines: BufReader::new(read).lines(),
        write,
    };
    let mut audited = 0;

    for (line_no, step) in steps {
        let at = format!("{name}:{line_no}");
        let obj = step
            .as_object()
            .unwrap_or_else(|| panic!("{at}: not an object"));
        let (key, value) = obj
            .iter()
            .find(|(k, _)| k.as_str() != "#")
            .map(|(k, v)| (k.as_str(), v))
            .unwrap_or(("#", &Value::Null));
        match key {
            "#" => {}
            "host" => host.send(value).await,
            "host_raw" => host.send_line(value.as_str().unwrap()).await,
            "upstream" => {
                let mut line = value.to_string();
                line.push('\n');
                upstream.write.write_all(line.as_bytes()).await.unwrap();
            }
            "upstream_raw" => {
                let line = format!("{}\n", value.as_str().unwrap());
                upstream.write.write_all(line.as_bytes()).await.unwrap();
            }
            "to_host" => {
                let got = host.recv().await;
                assert!(
                    same(&got, value),
                    "{at}: the host got\n  {got}\nnot\n  {value}"
                );
            }
            "to_upstream" => {
                let got = upstream.recv(&at).await;
                assert!(
                    same(&got, value),
                    "{at}: the upstream got\n  {got}\nnot\n  {value}"
                );
            }
            "approve" => answer_approval(&state, &["approve"], &at).await,
            "reject" => {
                answer_approval(
                    &state,
                    &["reject", "--reason", value.as_str().unwrap()],
                    &at,
                )
                .await
            }
            "audit" => {
                let deadline = tokio::time::Instant::now() + WAIT;
                let lines = loop {
                    let lines = audit_lines(&audit);
                    if lines.len() > audited || tokio::time::Instant::now() > deadline {
                        break lines;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                };
                let got = lines
                    .get(audited)
                    .unwrap_or_else(|| panic!("{at}: no audit line #{}", audited + 1));
                assert!(
                    contains(got, value),
                    "{at}: audit line {got}\n  lacks {value}"
                );
                audited += 1;
            }
            other => panic!("{at}: unknown step {other:?}"),
        }
    }

    // The end: the host hangs up; nothing else may reach either side.
    host.close_stdin();
    if let Ok(Ok(Some(line))) = tokio::time::timeout(WAIT, upstream.lines.next_line()).await {
        panic!("{name}: the upstream got an unexpected {line}");
    }
    drop(upstream);
    host.expect_eof(WAIT).await;
    let status = host.wait_exit(WAIT).await;
    assert_eq!(status.code(), Some(0), "{name}: exit status");
    let extra = audit_lines(&audit).len() - audited;
    assert_eq!(
        extra, 0,
        "{name}: {extra} audit line(s) not in the transcript"
    );
}

#[tokio::test]
async fn every_transcript_replays_exactly() {
    let files = transcripts();
    assert!(
        files.len() >= 10,
        "expected the transcript set, found {files:?}"
    );
    for file in files {
        replay(&file).await;
    }
}
