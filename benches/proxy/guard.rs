//! A local guard service that answers at once, and counts what it is asked.
//!
//! `POST /v1/guardrails/evaluate` → `{"decision":"allow"}`; `POST /v1/agents/identify` and
//! `POST /v1/events` → `{}`. It counts the TCP connections it accepted and the requests per
//! endpoint, so the benchmark can check that the proxy keeps one connection alive and sends one
//! request per call. It runs on a one-thread runtime of its own, like a small local service.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::post;
use axum::serve::ListenerExt as _;

#[derive(Default)]
pub struct Counts {
    pub connections: AtomicU64,
    pub evaluate: AtomicU64,
    pub identify: AtomicU64,
    pub events: AtomicU64,
}

/// A snapshot of [`Counts`].
#[derive(Clone, Copy, Debug, Default)]
pub struct Snapshot {
    pub connections: u64,
    pub evaluate: u64,
    pub identify: u64,
    pub events: u64,
}

impl Snapshot {
    pub fn since(self, before: Snapshot) -> Snapshot {
        Snapshot {
            connections: self.connections - before.connections,
            evaluate: self.evaluate - before.evaluate,
            identify: self.identify - before.identify,
            events: self.events - before.events,
        }
    }
}

pub struct GuardServer {
    /// Where it listens; `guard.baseUrl` is `http://<addr>`.
    pub addr: std::net::SocketAddr,
    counts: Arc<Counts>,
}

impl GuardServer {
    pub fn start() -> GuardServer {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the guard");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("guard address");
        let counts = Arc::new(Counts::default());
        let c = counts.clone();
        std::thread::Builder::new()
            .name("guard".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("guard runtime");
                rt.block_on(serve(listener, c));
            })
            .expect("guard thread");
        GuardServer { addr, counts }
    }

    pub fn snapshot(&self) -> Snapshot {
        let c = &self.counts;
        Snapshot {
            connections: c.connections.load(Ordering::SeqCst),
            evaluate: c.evaluate.load(Ordering::SeqCst),
            identify: c.identify.load(Ordering::SeqCst),
            events: c.events.load(Ordering::SeqCst),
        }
    }
}

async fn serve(listener: std::net::TcpListener, counts: Arc<Counts>) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
    let accepted = counts.clone();
    let listener = listener.tap_io(move |tcp| {
        accepted.connections.fetch_add(1, Ordering::SeqCst);
        let _ = tcp.set_nodelay(true);
    });
    let (ev, id, evs) = (counts.clone(), counts.clone(), counts);
    let app = Router::new()
        .route(
            "/v1/guardrails/evaluate",
            post(move |_body: axum::body::Bytes| {
                ev.evaluate.fetch_add(1, Ordering::SeqCst);
                async { json(r#"{"decision":"allow"}"#) }
            }),
        )
        .route(
            "/v1/agents/identify",
            post(move |_body: axum::body::Bytes| {
                id.identify.fetch_add(1, Ordering::SeqCst);
                async { json("{}") }
            }),
        )
        .route(
            "/v1/events",
            post(move |_body: axum::body::Bytes| {
                evs.events.fetch_add(1, Ordering::SeqCst);
                async { json("{}") }
            }),
        );
    axum::serve(listener, app).await.expect("guard server");
}

fn json(body: &'static str) -> impl axum::response::IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
}

/// An evaluate request body of the size the proxy sends for an `echo` call.
const PROBE_BODY: &str = r#"{"agent_key":"bench","run_id":"run_mcp_0123456789ab","mode":"enforce","risk_level":"low","action":{"type":"read","name":"bench.echo"},"resource":{"type":"tool","provider":"bench","environment":null,"external_id":null},"tool":{"name":"bench.echo","provider":"mcp","riskLevel":"low"},"metadata":{"capture_source":"mcp_proxy","mcp":{"server":"bench","tool":"echo","arguments":{"path":"/srv/data/reports/2026/q3/summary-1.csv","limit":100,"message":"hello from the benchmark","tags":["bench","echo"],"n":1}}},"request_id":1,"arguments_hash":"0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0","runtime":{"framework":"apie-mcp","language":"rust","sdk_version":"0.1.0"}}"#;

/// Round trips of one keep-alive HTTP/1.1 connection from this process to the guard: the cost
/// of one evaluate request without the proxy. With a `pause`, the thread sleeps that long
/// before each request, as the proxy's runtime thread waits between calls (its caches and the
/// guard's go cold, and both threads are woken for each request). Returns the latencies in ns.
pub fn http_round_trips(addr: std::net::SocketAddr, n: usize, pause: Duration) -> Vec<u64> {
    let stream = TcpStream::connect(addr).expect("connect to the guard");
    stream.set_nodelay(true).expect("nodelay");
    let mut writer = stream.try_clone().expect("clone");
    let mut reader = BufReader::new(stream);
    let request = format!(
        "POST /v1/guardrails/evaluate HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
         authorization: Bearer bench-key\r\ncontent-length: {}\r\n\r\n{PROBE_BODY}",
        PROBE_BODY.len()
    );
    let mut samples = Vec::with_capacity(n);
    let mut line = String::new();
    let mut body = Vec::new();
    for _ in 0..n {
        idle(pause);
        let t = Instant::now();
        writer.write_all(request.as_bytes()).expect("send");
        let mut length = 0usize;
        loop {
            line.clear();
            reader.read_line(&mut line).expect("read");
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                length = v.trim().parse().expect("content-length");
            }
        }
        body.resize(length, 0);
        reader.read_exact(&mut body).expect("body");
        samples.push(t.elapsed().as_nanos() as u64);
    }
    samples
}

/// The same round trips through reqwest on a one-thread tokio runtime, built as the proxy
/// builds its client (no redirects, a deadline per request): what the HTTP stack itself costs
/// per evaluation, apart from the proxy's work around it. `pause` as for [`http_round_trips`]
/// (the runtime's thread sleeps). Returns the latencies in ns and the CPU time the thread
/// spent, in ns.
pub fn reqwest_round_trips(
    addr: std::net::SocketAddr,
    n: usize,
    pause: Duration,
) -> (Vec<u64>, u64) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let _ = rustls::crypto::ring::default_provider().install_default();
    rt.block_on(async {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("client");
        let url =
            reqwest::Url::parse(&format!("http://{addr}/v1/guardrails/evaluate")).expect("url");
        let mut samples = Vec::with_capacity(n);
        let cpu_before = thread_cpu_ns();
        for _ in 0..n {
            idle(pause);
            let t = Instant::now();
            let response = client
                .post(url.clone())
                .header("content-type", "application/json")
                .header("authorization", "Bearer bench-key")
                .timeout(Duration::from_secs(5))
                .body(PROBE_BODY)
                .send()
                .await
                .expect("send");
            let body = response.bytes().await.expect("body");
            let _: serde_json::Value = serde_json::from_slice(&body).expect("json");
            samples.push(t.elapsed().as_nanos() as u64);
        }
        (samples, thread_cpu_ns().saturating_sub(cpu_before))
    })
}

/// Sleeps for `pause`, if any (blocking the thread, runtime and all).
fn idle(pause: Duration) {
    if !pause.is_zero() {
        std::thread::sleep(pause);
    }
}

/// On-CPU time of the calling thread so far, ns (`/proc/thread-self/schedstat`).
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}
