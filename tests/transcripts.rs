//! Replays every `fixtures/transcripts/*.jsonl` against the real binary.
//!
//! The test plays both ends: the host (the proxy's stdin and stdout) and the upstream, which is
//! `socket_bridge` relaying the proxy's pipes to a TCP socket the test holds. Each step either
//! sends a message or expects one; any difference, any missing message and any extra message
//! fails the replay. The format is documented in `fixtures/transcripts/README.md`.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, Uri};
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

/// Values captured by `"<=name>"` in an expectation, for `"<name>"` in later messages.
type Captures = HashMap<String, Value>;

/// `got` equals `want`, where the string `"<any>"` in `want` stands for any value (approval
/// ids are random) and `"<=name>"` stands for any value, which is captured under `name`.
fn same(got: &Value, want: &Value, captures: &mut Captures) -> bool {
    match (got, want) {
        (_, Value::String(s)) if s == "<any>" => true,
        (_, Value::String(s)) if s.starts_with("<=") && s.ends_with('>') => {
            captures.insert(s[2..s.len() - 1].to_string(), got.clone());
            true
        }
        (Value::Object(g), Value::Object(w)) => {
            g.len() == w.len()
                && w.iter()
                    .all(|(k, v)| g.get(k).is_some_and(|gv| same(gv, v, captures)))
        }
        (Value::Array(g), Value::Array(w)) => {
            g.len() == w.len() && g.iter().zip(w).all(|(g, w)| same(g, w, captures))
        }
        _ => got == want,
    }
}

/// `message` with every string `"<name>"` replaced by the value captured under `name`.
fn substitute(message: &Value, captures: &Captures) -> Value {
    match message {
        Value::String(s) if s.starts_with('<') && s.ends_with('>') => captures
            .get(&s[1..s.len() - 1])
            .cloned()
            .unwrap_or_else(|| message.clone()),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), substitute(v, captures)))
                .collect(),
        ),
        Value::Array(items) => {
            Value::Array(items.iter().map(|v| substitute(v, captures)).collect())
        }
        other => other.clone(),
    }
}

// === a scripted guard service ===

/// A request the service received.
struct Received {
    path: String,
    query: Option<String>,
    body: Value,
}

/// The guard service of a transcript: answers each path with the replies the transcript
/// queued for it (`service_reply`), and keeps what it received per path (`to_service`).
/// Unscripted requests get `500` for `evaluate` and `200 {}` elsewhere.
#[derive(Default)]
struct Service {
    replies: Mutex<HashMap<String, VecDeque<Value>>>,
    received: Mutex<HashMap<String, VecDeque<Received>>>,
}

impl Service {
    async fn start() -> (Arc<Service>, String) {
        let service = Arc::new(Service::default());
        let app = axum::Router::new()
            .fallback(answer)
            .with_state(service.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (service, url)
    }

    fn script(&self, reply: &Value) {
        let path = reply["path"].as_str().expect("service_reply needs a path");
        self.replies
            .lock()
            .unwrap()
            .entry(path.to_string())
            .or_default()
            .push_back(reply.clone());
    }

    async fn next(&self, path: &str, at: &str) -> Received {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(r) = self
                .received
                .lock()
                .unwrap()
                .get_mut(path)
                .and_then(VecDeque::pop_front)
            {
                return r;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{at}: the service got no request for {path}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

async fn answer(
    State(service): State<Arc<Service>>,
    uri: Uri,
    body: Bytes,
) -> (StatusCode, String) {
    let path = uri.path().to_string();
    let reply = service
        .replies
        .lock()
        .unwrap()
        .get_mut(&path)
        .and_then(VecDeque::pop_front);
    service
        .received
        .lock()
        .unwrap()
        .entry(path.clone())
        .or_default()
        .push_back(Received {
            path: path.clone(),
            query: uri.query().map(str::to_string),
            body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        });
    let Some(reply) = reply else {
        return if path.ends_with("/evaluate") {
            (StatusCode::INTERNAL_SERVER_ERROR, "unscripted".into())
        } else {
            (StatusCode::OK, "{}".into())
        };
    };
    if let Some(ms) = reply["delay_ms"].as_u64() {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let status = reply["status"].as_u64().unwrap_or(200) as u16;
    let body = match &reply["raw"] {
        Value::String(raw) => raw.clone(),
        _ => reply["body"].to_string(),
    };
    (StatusCode::from_u16(status).unwrap(), body)
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
    let service = if header["service"] == json!(true) {
        let (service, url) = Service::start().await;
        if !config["guard"].is_object() {
            config["guard"] = json!({});
        }
        config["guard"]["baseUrl"] = json!(url);
        Some(service)
    } else {
        None
    };
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
        .env_remove("APIE_BASE_URL")
        .current_dir(dir.path());
    host = match &service {
        Some(_) => host.env("APIE_API_KEY", "transcript-key"),
        None => host.env_remove("APIE_API_KEY"),
    };
    let mut host = host.spawn();
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
    let mut captures = Captures::new();

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
            "host" => host.send(&substitute(value, &captures)).await,
            "host_raw" => host.send_line(value.as_str().unwrap()).await,
            "upstream" => {
                let mut line = substitute(value, &captures).to_string();
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
                    same(&got, value, &mut captures),
                    "{at}: the host got\n  {got}\nnot\n  {value}"
                );
            }
            "to_upstream" => {
                let got = upstream.recv(&at).await;
                assert!(
                    same(&got, value, &mut captures),
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
                    contains(got, &substitute(value, &captures)),
                    "{at}: audit line {got}\n  lacks {value}"
                );
                audited += 1;
            }
            "service_reply" => service
                .as_ref()
                .unwrap_or_else(|| panic!("{at}: the header has no \"service\": true"))
                .script(value),
            "to_service" => {
                let service = service
                    .as_ref()
                    .unwrap_or_else(|| panic!("{at}: the header has no \"service\": true"));
                let path = value["path"].as_str().expect("to_service needs a path");
                let got = service.next(path, &at).await;
                let got = json!({"path": got.path, "query": got.query, "body": got.body});
                let want = json!({
                    "path": path,
                    "query": value.get("query").cloned().unwrap_or(json!("<any>")),
                    "body": value.get("body").cloned().unwrap_or(json!("<any>")),
                });
                assert!(
                    same(&got, &want, &mut captures),
                    "{at}: the service got\n  {got}\nnot\n  {want}"
                );
            }
            other => panic!("{at}: unknown step {other:?}"),
        }
    }

    // The end: the host hangs up; nothing else may reach either side, nor the service (but
    // for the start-up identify and the events, whose timing is the proxy's own).
    if let Some(service) = &service {
        let received = service.received.lock().unwrap();
        for (path, left) in received.iter() {
            if path != "/v1/agents/identify" && path != "/v1/events" && !left.is_empty() {
                panic!(
                    "{name}: the service got {} unexpected request(s) for {path}",
                    left.len()
                );
            }
        }
    }
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
