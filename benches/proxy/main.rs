//! The proxy benchmark (issue #4): the same workloads driven three ways, alternating.
//!
//! ```sh
//! cargo bench --bench proxy                         # everything, a few minutes
//! APIE_BENCH_SCALE=0.1 cargo bench --bench proxy    # a quick look
//! ```
//!
//! The three ways to reach the same upstream (`examples/bench_echo.rs`, a minimal fast echo
//! server, so the middle is what is measured):
//! - **direct**: the host talks to `bench_echo` itself;
//! - **relay**: through `examples/bench_relay.rs`, a zero-work byte relay: the physical floor of
//!   having any process in between;
//! - **proxy**: through `apie-mcp` in enforce mode with 21 local rules (20 that do not match the
//!   call, some of them regexes, and one `allow` that does) and the audit log on, as it is by
//!   default. `proxy (no audit)` is the same with `audit: false`.
//!
//! Workloads: sequential `tools/call` round trips, pipelined calls (16 in flight), the guard
//! service path (a local HTTP guard that answers at once; beside it, the bench's own round trips
//! to that guard, on a blocking socket and through reqwest, back to back and after an idle
//! pause each), a 32 MiB tool result, and start-up.
//! Each workload runs in rounds; every round runs every way once, in an order rotated from round
//! to round, so that drift of the machine (other work, frequency, caches) falls on all ways
//! alike. Every run starts fresh processes and warms them up before measuring.
//!
//! Knobs (environment): `APIE_BENCH_SCALE` multiplies every count (default 1);
//! `APIE_BENCH_ROUNDS` (default 5); `APIE_BENCH_ONLY` a comma list of sections to run
//! (`seq,pipe,guard,big,startup`); `APIE_BENCH_BIG_MB` (default 32); `APIE_BENCH_KEEP=1` keeps
//! the scratch directory (configs, the processes' stderr) for a look afterwards;
//! `APIE_BENCH_PROXY=PATH` measures another build of the proxy (say, of another branch) in place
//! of the one cargo just built.
//!
//! The helper binaries are the examples `bench_echo` and `bench_relay` of the same profile; the
//! benchmark builds them with cargo when they are missing or older than their source.
//!
//! Under `cargo test` (which passes no `--bench`) it is a smoke test: every section once, at
//! tiny counts (`APIE_BENCH_SCALE` 0.02, one round, a 1 MiB result, unless the environment says
//! otherwise), so that a change which breaks the harness fails the test suite. Its figures, from
//! a debug build, mean nothing.

#![allow(clippy::print_stdout, reason = "a benchmark reports on stdout")]

mod guard;
mod process;
mod stats;

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use guard::GuardServer;
use process::{Launch, Proc, Usage, contains, echo_call};
use stats::{Table, fixed, median, micros, percentile, ratio, span, thousands};

/// Calls in flight in the pipelined workload.
const WINDOW: usize = 16;
/// How long the bench's own guard round trips wait before each request in their second run:
/// about what the rest of a guarded call takes through the proxy, during which its runtime
/// thread sleeps (the kernel's timer slack makes the sleep some 50 µs longer).
const GUARD_PAUSE: Duration = Duration::from_micros(25);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Way {
    Direct,
    Relay,
    Proxy,
    ProxyNoAudit,
    ProxyGuard,
    ProxyGuardEvents,
    /// The proxy's config with twenty more `matches` rules, for start-up only: each pattern is
    /// checked at load, so start-up grows with them.
    ProxyRegexes,
}

impl Way {
    fn label(self) -> &'static str {
        match self {
            Way::Direct => "direct",
            Way::Relay => "relay",
            Way::Proxy => "proxy",
            Way::ProxyNoAudit => "proxy (no audit)",
            Way::ProxyGuard => "proxy + guard",
            Way::ProxyGuardEvents => "proxy + guard + events",
            Way::ProxyRegexes => "proxy, 20 more regex rules",
        }
    }
}

struct Settings {
    rounds: usize,
    warmup: usize,
    seq_calls: usize,
    pipe_calls: usize,
    guard_calls: usize,
    big_reps: usize,
    big_bytes: usize,
    startup_reps: usize,
    only: Option<Vec<String>>,
}

impl Settings {
    /// The knobs from the environment; `smoke` changes their defaults to tiny counts.
    fn from_env(smoke: bool) -> Settings {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let scale: f64 = var("APIE_BENCH_SCALE")
            .map(|v| v.parse().expect("APIE_BENCH_SCALE is a number"))
            .unwrap_or(if smoke { 0.02 } else { 1.0 });
        let n = |base: usize| ((base as f64 * scale).round() as usize).max(1);
        Settings {
            rounds: var("APIE_BENCH_ROUNDS")
                .map(|v| v.parse().expect("APIE_BENCH_ROUNDS is a count"))
                .unwrap_or(if smoke { 1 } else { 5 })
                .max(1),
            warmup: n(300),
            seq_calls: n(4000),
            pipe_calls: n(20000),
            guard_calls: n(2000),
            big_reps: n(3),
            big_bytes: var("APIE_BENCH_BIG_MB")
                .map(|v| v.parse::<usize>().expect("APIE_BENCH_BIG_MB is a count"))
                .unwrap_or(if smoke { 1 } else { 32 })
                << 20,
            startup_reps: n(40),
            only: var("APIE_BENCH_ONLY")
                .map(|v| v.split(',').map(|s| s.trim().to_owned()).collect()),
        }
    }

    fn runs(&self, section: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|only| only.iter().any(|s| s == section))
    }
}

/// The binaries, the scratch directory and the guard.
struct Bench {
    echo: PathBuf,
    relay: PathBuf,
    proxy: PathBuf,
    dir: PathBuf,
    guard: GuardServer,
    configs: HashMap<Way, PathBuf>,
}

impl Bench {
    fn launch(&self, way: Way) -> Launch {
        let echo = self.echo.clone().into_os_string();
        let stderr = self.dir.join(format!("{:?}.stderr", way).to_lowercase());
        let (program, args, env) = match way {
            Way::Direct => (self.echo.clone(), vec![], vec![]),
            Way::Relay => (self.relay.clone(), vec![echo], vec![]),
            _ => {
                let config = self.configs[&way].clone().into_os_string();
                let mut env = vec![(
                    "APIE_MCP_STATE_DIR".to_owned(),
                    self.dir.join("state").display().to_string(),
                )];
                if matches!(way, Way::ProxyGuard | Way::ProxyGuardEvents) {
                    env.push(("APIE_API_KEY".to_owned(), "bench-key".to_owned()));
                }
                let args = vec![OsString::from("--config"), config, "--".into(), echo];
                (self.proxy.clone(), args, env)
            }
        };
        Launch {
            program,
            args,
            env,
            stderr,
        }
    }
}

// === configuration ===

/// The 20 rules that do not match an `echo` call: half of them are skipped on the tool name,
/// half match the name and fail on a condition (four of those on a regex), so the engine does
/// real work on every call.
fn rules_that_do_not_match() -> Vec<Value> {
    let by_name = [
        "*delete*",
        "*remove*",
        "stripe.*refund*",
        "*deploy*",
        "github.*merge*",
        "*drop_table*",
        "shell.*",
        "*secret*",
    ]
    .iter()
    .enumerate()
    .map(|(i, verb)| {
        json!({"name": format!("name-{i}"), "verbMatchers": [{"type": "verb", "value": verb}],
               "action": {"type": "block"}, "reason": "not from agents"})
    });
    let by_risk = ["high", "critical"].iter().map(|risk| {
        json!({"name": format!("risk-{risk}"), "verbMatchers": [{"type": "riskLevel", "value": risk}],
               "action": {"type": "require_approval"}})
    });
    let conditions = [
        json!({"field": "args.path", "operator": "matches", "value": "^/etc/(passwd|shadow)"}),
        json!({"field": "args.path", "operator": "matches", "value": "(?i)\\.(pem|key|p12)$"}),
        json!({"field": "args.message", "operator": "matches", "value": "(?i)drop\\s+table"}),
        json!({"field": "args.path", "operator": "matches", "value": "^/home/[^/]+/\\.ssh/"}),
        json!({"field": "args.path", "operator": "starts_with", "value": "/root"}),
        json!({"field": "args.limit", "operator": "greater", "value": 10000}),
        json!({"field": "args.user", "operator": "in", "value": ["root", "admin"]}),
        json!({"field": "args.message", "operator": "contains", "value": "rm -rf"}),
        json!({"field": "args.n", "operator": "less", "value": 0}),
        json!({"field": "runtime.environment", "operator": "equals", "value": "production"}),
    ];
    let by_condition = conditions.into_iter().enumerate().map(|(i, c)| {
        json!({"name": format!("cond-{i}"), "verbMatchers": [{"type": "verb", "value": "bench.*"}],
               "conditions": [c], "action": {"type": "block"}})
    });
    by_name.chain(by_risk).chain(by_condition).collect()
}

/// `n` rules with one `matches` condition each, none of which matches the bench's calls: the
/// patterns a policy for files, shells and SQL might hold, made distinct by a suffix.
fn regex_rules_that_do_not_match(n: usize) -> impl Iterator<Item = Value> {
    const PATTERNS: [(&str, &str); 10] = [
        ("args.path", "^/etc/(passwd|shadow|sudoers)"),
        ("args.path", "(?i)\\.(pem|key|p12|pfx)$"),
        ("args.message", "(?i)drop\\s+(table|database)"),
        ("args.path", "^/home/[^/]+/\\.(ssh|gnupg)/"),
        ("args.message", "(?i)truncate\\s+\\w+"),
        ("args.message", "(?i)aws_secret_access_key"),
        ("args.message", "(?i)\\bsudo\\b"),
        ("args.path", "^/var/lib/.*\\.db$"),
        ("args.message", "(?i)password\\s*="),
        ("args.message", "(?i)rm\\s+-rf\\s+/"),
    ];
    (0..n).map(|i| {
        let (field, pattern) = PATTERNS[i % PATTERNS.len()];
        let pattern = format!("{pattern}{}", "#".repeat(i / PATTERNS.len()));
        json!({"name": format!("regex-{i}"), "verbMatchers": [{"type": "verb", "value": "bench.*"}],
               "conditions": [{"field": field, "operator": "matches", "value": pattern}],
               "action": {"type": "block"}})
    })
}

fn write_config(dir: &Path, way: Way, guard_url: &str) -> PathBuf {
    let mut policies = rules_that_do_not_match();
    let service = matches!(way, Way::ProxyGuard | Way::ProxyGuardEvents);
    // A matching local `allow` is final and never asks the service: the guard runs leave it out,
    // so every call goes to the guard (and `riskDefaults` allows locally).
    if !service {
        policies.push(
            json!({"name": "allow-bench", "verbMatchers": [{"type": "verb", "value": "bench.*"}],
                             "action": {"type": "allow"}}),
        );
    }
    assert_eq!(policies.len(), if service { 20 } else { 21 });
    if way == Way::ProxyRegexes {
        policies.extend(regex_rules_that_do_not_match(20));
    }
    let mut config = json!({
        "agentKey": "bench",
        "serverName": "bench",
        "mode": "enforce",
        "policies": policies,
        "riskDefaults": {"low": "allow", "medium": "allow", "high": "allow", "critical": "allow"},
        "approvals": {"channels": ["elicitation"]},
        "audit": if way == Way::ProxyNoAudit {
            json!(false)
        } else {
            json!({"path": dir.join("audit.jsonl")})
        },
    });
    if service {
        config["guard"] = json!({"baseUrl": guard_url, "events": way == Way::ProxyGuardEvents});
    }
    let path = dir.join(format!("{:?}.json", way).to_lowercase());
    std::fs::write(&path, serde_json::to_vec_pretty(&config).expect("json")).expect("config");
    path
}

// === the helper binaries ===

/// `target/<profile>`, where the proxy binary cargo built for this benchmark lives.
fn profile_dir() -> PathBuf {
    let proxy = PathBuf::from(env!("CARGO_BIN_EXE_apie-mcp"));
    proxy.parent().expect("profile directory").to_path_buf()
}

/// The example binaries, built (in the benchmark's own profile) when missing or older than
/// their source.
fn example(name: &str) -> PathBuf {
    let dir = profile_dir();
    let bin = dir
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    let source = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(format!("{name}.rs"));
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let stale = match (modified(&bin), modified(&source)) {
        (Some(b), Some(s)) => b < s,
        _ => true,
    };
    if stale {
        // `target/debug` is the dev profile's (and `cargo test`'s); others are named as they are.
        let profile = match dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") | None => "dev",
            Some(other) => other,
        };
        eprintln!("building example {name} ({profile})");
        let target_dir = dir.parent().expect("target directory").to_path_buf();
        let status = std::process::Command::new(env!("CARGO"))
            .args(["build", "--profile", profile, "--example", name])
            .env("CARGO_TARGET_DIR", target_dir)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("run cargo");
        assert!(status.success(), "cargo build --example {name} failed");
    }
    bin
}

// === workloads ===

/// The ways of one section in round `r`'s order: rotated, so each way takes each position.
fn order(ways: &[Way], r: usize) -> Vec<Way> {
    let mut v = ways.to_vec();
    v.rotate_left(r % ways.len());
    v
}

#[derive(Default)]
struct Sequential {
    calls_per_s: Vec<f64>,
    latencies: Vec<u64>,
    /// CPU µs per call of the middle process (the echo itself when direct), per round.
    cpu: Vec<f64>,
    /// Its context switches per call, per round.
    switches: Vec<f64>,
}

impl Sequential {
    fn add(&mut self, calls: usize, cps: f64, lat: Vec<u64>, used: Usage) {
        self.calls_per_s.push(cps);
        self.latencies.extend(lat);
        self.cpu.push(used.cpu_ns as f64 / 1000.0 / calls as f64);
        self.switches.push(used.switches as f64 / calls as f64);
    }

    /// The way's figures over all its rounds.
    fn figures(&mut self) -> Figures {
        self.latencies.sort_unstable();
        Figures {
            cps: median(&self.calls_per_s),
            p50: micros(percentile(&self.latencies, 50.0)),
            p99: micros(percentile(&self.latencies, 99.0)),
        }
    }
}

/// Calls per second (the median round), and p50 and p99 latency in µs.
#[derive(Clone, Copy)]
struct Figures {
    cps: f64,
    p50: f64,
    p99: f64,
}

/// A row of the ratios `a / b` of each figure, then `blank` empty cells.
fn ratio_row(name: &str, a: Figures, b: Figures, blank: usize) -> Vec<String> {
    let mut row = vec![
        name.into(),
        ratio(a.cps, b.cps),
        ratio(a.p50, b.p50),
        ratio(a.p99, b.p99),
    ];
    row.extend(std::iter::repeat_n(String::new(), blank));
    row
}

fn sequential(b: &Bench, way: Way, warmup: usize, calls: usize) -> (f64, Vec<u64>, Usage) {
    let mut p = Proc::spawn(&b.launch(way));
    p.handshake();
    for i in 0..warmup {
        p.echo(1_000_000 + i as u64);
    }
    let mut lat = Vec::with_capacity(calls);
    let before = p.usage();
    let start = Instant::now();
    for i in 0..calls {
        let t = Instant::now();
        p.echo(i as u64);
        lat.push(t.elapsed().as_nanos() as u64);
    }
    let total = start.elapsed();
    let used = p.usage().since(before);
    p.finish();
    (calls as f64 / total.as_secs_f64(), lat, used)
}

/// One pipelined run.
struct PipeRun {
    calls_per_s: f64,
    /// The middle process's use (the echo itself when direct).
    middle: Usage,
    /// The whole flow's: the benchmark's own threads (the client), the middle and its server.
    flow: Usage,
    wall: Duration,
}

fn pipelined(b: &Bench, way: Way, warmup: usize, calls: usize) -> PipeRun {
    let mut p = Proc::spawn(&b.launch(way));
    p.handshake();
    for i in 0..warmup {
        p.echo(1_000_000 + i as u64);
    }
    let mut stdin = p.take_stdin();
    let (credit, credits) = mpsc::channel::<()>();
    let writer = std::thread::spawn(move || {
        use std::io::Write as _;
        let mut buf = Vec::with_capacity(512);
        for i in 0..calls {
            if credits.recv().is_err() {
                break;
            }
            echo_call(&mut buf, i as u64);
            stdin.write_all(&buf).expect("write a pipelined call");
        }
        stdin
    });
    // The client is this process: its main thread reads, the writer writes.
    let below = process::tree(p.pid);
    if way != Way::Direct && below.len() < 2 {
        eprintln!(
            "{}: no server process found below pid {} (/proc/*/task/*/children): the flow's CPU \
             leaves the server out",
            way.label(),
            p.pid
        );
    }
    let flow_pids = [below, vec![std::process::id()]].concat();
    let before = (p.usage(), process::usage_of(&flow_pids));
    let start = Instant::now();
    for _ in 0..WINDOW {
        let _ = credit.send(());
    }
    for _ in 0..calls {
        let line = p.recv();
        assert!(
            contains(line, b"\"result\"") && !contains(line, b"\"isError\":true"),
            "{}: unexpected answer {}",
            way.label(),
            String::from_utf8_lossy(&line[..line.len().min(300)])
        );
        let _ = credit.send(());
    }
    let wall = start.elapsed();
    // Taken before the writer is joined, while all its threads are alive to be counted.
    let middle = p.usage().since(before.0);
    let flow = process::usage_of(&flow_pids).since(before.1);
    p.give_stdin(writer.join().expect("writer"));
    p.finish();
    PipeRun {
        calls_per_s: calls as f64 / wall.as_secs_f64(),
        middle,
        flow,
        wall,
    }
}

struct Big {
    wall: Vec<f64>,
    peak: Vec<u64>,
    idle: Vec<u64>,
    line: usize,
}

fn big(b: &Bench, way: Way, bytes: usize) -> (Duration, u64, u64, usize) {
    let mut p = Proc::spawn(&b.launch(way));
    p.handshake();
    p.echo(1);
    let idle = p.peak_rss().unwrap_or(0);
    let request = format!(
        "{{\"jsonrpc\":\"2.0\",\"id\":\"big\",\"method\":\"tools/call\",\"params\":{{\"name\":\"big\",\"arguments\":{{\"bytes\":{bytes}}}}}}}\n"
    );
    let t = Instant::now();
    p.send(request.as_bytes());
    let len = p.recv().len();
    let wall = t.elapsed();
    assert!(
        len > bytes,
        "{}: short big answer ({len} bytes)",
        way.label()
    );
    // The process is still alive (its stdin is open): its high-water mark covers the relay.
    let peak = p.peak_rss().unwrap_or(0);
    p.finish();
    (wall, peak, idle, len)
}

fn startup(b: &Bench, way: Way) -> Duration {
    let launch = b.launch(way);
    let t = Instant::now();
    let mut p = Proc::spawn(&launch);
    p.send(process::INITIALIZE);
    p.recv();
    let elapsed = t.elapsed();
    p.finish();
    elapsed
}

// === the report ===

fn mb(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / (1024.0 * 1024.0))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// What crossing into the kernel costs on this machine right now: a system call that does
/// nothing (`getppid`) and an append of an audit record's size to a file in the scratch
/// directory, which the proxy makes once per call (or burst) with the audit log on. On a VM with
/// the CPU's side-channel mitigations these are a large part of the sequential section's
/// budget, and they drift with the machine's phase as the round trips do.
fn system_calls(dir: &Path) -> String {
    use std::io::Write as _;
    const N: u32 = 20_000;
    let t = Instant::now();
    for _ in 0..N {
        std::hint::black_box(std::os::unix::process::parent_id());
    }
    let empty = t.elapsed() / N;
    let path = dir.join("append-probe.jsonl");
    let record = [&[b'x'; 376][..], b"\n"].concat();
    let append = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut file| {
            let t = Instant::now();
            for _ in 0..N {
                file.write_all(&record)?;
            }
            Ok(t.elapsed() / N)
        });
    let _ = std::fs::remove_file(&path);
    let append = append.map_or_else(|e| format!("failed: {e}"), |d| format!("{d:.2?}"));
    format!(
        "an empty one {empty:.2?}, a {}-byte append to a file {append}",
        record.len()
    )
}

fn machine() -> String {
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = read("/proc/meminfo")
        .lines()
        .find(|l| l.starts_with("MemTotal"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or("?".into(), |kib| {
            format!("{:.1} GiB", kib as f64 / 1048576.0)
        });
    let kernel = read("/proc/sys/kernel/osrelease");
    format!("{cores} CPUs ({cpu}), {mem} RAM, Linux {}", kernel.trim())
}

fn load() -> String {
    read("/proc/loadavg")
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn git_head() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "?".into())
}

/// One line of the targets summary.
struct Target {
    what: String,
    measured: String,
    met: bool,
}

fn main() {
    // `cargo bench` passes `--bench`, `cargo test` nothing; a filter argument is not supported.
    let smoke = !std::env::args().any(|a| a == "--bench");
    let s = Settings::from_env(smoke);
    let dir = std::env::temp_dir().join(format!("apie-bench-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("state")).expect("scratch directory");
    let mut b = Bench {
        echo: example("bench_echo"),
        relay: example("bench_relay"),
        proxy: std::env::var_os("APIE_BENCH_PROXY")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_apie-mcp"))),
        guard: GuardServer::start(),
        configs: HashMap::new(),
        dir: dir.clone(),
    };
    for way in [
        Way::Proxy,
        Way::ProxyNoAudit,
        Way::ProxyGuard,
        Way::ProxyGuardEvents,
        Way::ProxyRegexes,
    ] {
        let path = write_config(&dir, way, &format!("http://{}", b.guard.addr));
        b.configs.insert(way, path);
    }
    let began = Instant::now();
    println!("apie-mcp proxy benchmark (commit {})", git_head());
    if smoke {
        println!("smoke run (no --bench): every section at tiny counts; the figures mean nothing");
    }
    if std::env::var_os("APIE_BENCH_PROXY").is_some() {
        println!("proxy binary: {}", b.proxy.display());
    }
    println!("machine: {}", machine());
    println!("system calls: {}", system_calls(&dir));
    println!("load average at start: {}", load());
    println!(
        "{} rounds, ways alternated; sequential {} calls, pipelined {} calls ({WINDOW} in flight), \
         guard {} calls, {} MiB x{}, start-up x{}; warm-up {} calls per run",
        s.rounds,
        s.seq_calls,
        s.pipe_calls,
        s.guard_calls,
        s.big_bytes >> 20,
        s.big_reps,
        s.startup_reps,
        s.warmup
    );
    println!(
        "proxy: enforce mode, 21 local rules (20 do not match, 4 of them regexes; 1 allow matches), \
         audit log on (the default) unless said"
    );
    let mut targets: Vec<Target> = Vec::new();

    if s.runs("seq") {
        let ways = [Way::Direct, Way::Relay, Way::Proxy, Way::ProxyNoAudit];
        let mut res: HashMap<Way, Sequential> = HashMap::new();
        for r in 0..s.rounds {
            for way in order(&ways, r) {
                let (cps, lat, used) = sequential(&b, way, s.warmup, s.seq_calls);
                res.entry(way).or_default().add(s.seq_calls, cps, lat, used);
            }
        }
        println!("\n== sequential tools/call round trips, local rules only ==");
        let mut t = Table::new(&[
            "way",
            "calls/s",
            "p50 µs",
            "p99 µs",
            "rounds calls/s min..max",
            "CPU µs/call",
            "switches/call",
        ]);
        let mut fig = HashMap::new();
        for way in ways {
            let e = res.get_mut(&way).expect("ran");
            let f = e.figures();
            fig.insert(way, f);
            t.row(vec![
                way.label().into(),
                thousands(f.cps),
                fixed(f.p50, 1),
                fixed(f.p99, 1),
                span(&e.calls_per_s),
                fixed(median(&e.cpu), 1),
                fixed(median(&e.switches), 1),
            ]);
        }
        for (name, way, base) in [
            ("proxy/relay", Way::Proxy, Way::Relay),
            ("proxy/direct", Way::Proxy, Way::Direct),
            ("proxy (no audit)/relay", Way::ProxyNoAudit, Way::Relay),
        ] {
            t.row(ratio_row(name, fig[&way], fig[&base], 1));
        }
        print!("{}", t.render());
        let r = fig[&Way::Proxy].cps / fig[&Way::Relay].cps;
        targets.push(Target {
            what: "sequential calls/s >= 0.9x relay".into(),
            measured: format!("{r:.2}x"),
            met: r >= 0.9,
        });
    }

    if s.runs("pipe") {
        let ways = [Way::Direct, Way::Relay, Way::Proxy, Way::ProxyNoAudit];
        let mut runs: HashMap<Way, Vec<PipeRun>> = HashMap::new();
        for r in 0..s.rounds {
            for way in order(&ways, r) {
                let run = pipelined(&b, way, s.warmup, s.pipe_calls);
                runs.entry(way).or_default().push(run);
            }
        }
        let calls = s.pipe_calls as f64;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        // Per way, the median over its rounds of a figure of each run.
        let per = |way: Way, f: &dyn Fn(&PipeRun) -> f64| {
            median(&runs[&way].iter().map(f).collect::<Vec<_>>())
        };
        let us_per_call = |ns: u64| ns as f64 / 1000.0 / calls;
        let flow_cpu = |r: &PipeRun| us_per_call(r.flow.cpu_ns);
        let busy = |r: &PipeRun| r.flow.cpu_ns as f64 / r.wall.as_nanos() as f64 / cores;
        println!("\n== pipelined tools/call, {WINDOW} in flight, local rules only ==");
        let mut t = Table::new(&[
            "way",
            "calls/s",
            "rounds min..max",
            "CPU µs/call",
            "switches/call",
            "CPU wait µs/call",
            "flow CPU µs/call",
            "CPUs busy",
        ]);
        let fig: HashMap<Way, f64> = ways
            .iter()
            .map(|w| (*w, per(*w, &|r| r.calls_per_s)))
            .collect();
        for way in ways {
            let cps: Vec<f64> = runs[&way].iter().map(|r| r.calls_per_s).collect();
            t.row(vec![
                way.label().into(),
                thousands(fig[&way]),
                span(&cps),
                fixed(per(way, &|r| us_per_call(r.middle.cpu_ns)), 1),
                fixed(per(way, &|r| r.middle.switches as f64 / calls), 2),
                fixed(per(way, &|r| us_per_call(r.middle.wait_ns)), 1),
                fixed(per(way, &flow_cpu), 1),
                format!("{:.0} %", per(way, &busy) * 100.0),
            ]);
        }
        for (name, way, base) in [
            ("proxy/relay", Way::Proxy, Way::Relay),
            ("proxy/direct", Way::Proxy, Way::Direct),
            ("proxy (no audit)/relay", Way::ProxyNoAudit, Way::Relay),
        ] {
            let mut row = vec![name.into(), ratio(fig[&way], fig[&base])];
            row.extend(std::iter::repeat_n(String::new(), 6));
            t.row(row);
        }
        print!("{}", t.render());
        println!(
            "CPU wait: the middle process's threads runnable but waiting for a CPU; flow CPU: the \
             client's, the middle's and the server's together; CPUs busy: the flow CPU over the \
             run's wall time and the machine's {cores} CPUs"
        );
        // What the target would take of the machine at the proxy's CPU cost per call.
        let goal = 0.9 * fig[&Way::Relay];
        for way in [Way::Proxy, Way::ProxyNoAudit] {
            let cost = per(way, &flow_cpu);
            println!(
                "at 0.9x the relay ({} calls/s), the {} flow's {:.1} µs of CPU a call would keep \
                 {:.0} % of the CPUs busy (the relay's flow kept {:.0} %, this one {:.0} %)",
                thousands(goal),
                way.label(),
                cost,
                goal * cost / 1e6 / cores * 100.0,
                per(Way::Relay, &busy) * 100.0,
                per(way, &busy) * 100.0,
            );
        }
        let r = fig[&Way::Proxy] / fig[&Way::Relay];
        targets.push(Target {
            what: "pipelined calls/s >= 0.9x relay".into(),
            measured: format!("{r:.2}x"),
            met: r >= 0.9,
        });
    }

    if s.runs("guard") {
        let ways = [
            Way::Direct,
            Way::Relay,
            Way::Proxy,
            Way::ProxyGuard,
            Way::ProxyGuardEvents,
        ];
        let mut res: HashMap<Way, Sequential> = HashMap::new();
        let mut counts: HashMap<Way, guard::Snapshot> = HashMap::new();
        let mut http: Vec<u64> = Vec::new();
        let mut stack: Vec<u64> = Vec::new();
        let mut stack_cpu = 0u64;
        // The same, each request after an idle pause, as the proxy sends them.
        let mut http_idle: Vec<u64> = Vec::new();
        let mut stack_idle: Vec<u64> = Vec::new();
        for r in 0..s.rounds {
            for way in order(&ways, r) {
                let before = b.guard.snapshot();
                let (cps, lat, used) = sequential(&b, way, s.warmup, s.guard_calls);
                let after = b.guard.snapshot().since(before);
                let c = counts.entry(way).or_default();
                c.connections += after.connections;
                c.evaluate += after.evaluate;
                c.identify += after.identify;
                c.events += after.events;
                res.entry(way)
                    .or_default()
                    .add(s.guard_calls, cps, lat, used);
            }
            let hot = Duration::ZERO;
            http.extend(guard::http_round_trips(b.guard.addr, s.guard_calls, hot));
            let (samples, cpu) = guard::reqwest_round_trips(b.guard.addr, s.guard_calls, hot);
            stack.extend(samples);
            stack_cpu += cpu;
            http_idle.extend(guard::http_round_trips(
                b.guard.addr,
                s.guard_calls,
                GUARD_PAUSE,
            ));
            let (samples, _) = guard::reqwest_round_trips(b.guard.addr, s.guard_calls, GUARD_PAUSE);
            stack_idle.extend(samples);
        }
        for samples in [&mut http, &mut stack, &mut http_idle, &mut stack_idle] {
            samples.sort_unstable();
        }
        let calls_per_run = (s.warmup + s.guard_calls) as f64;
        println!(
            "\n== guard-service path: sequential round trips, a local HTTP guard that answers at once =="
        );
        println!(
            "(proxy + guard: the 20 non-matching rules and no matching one, so every call is \
             evaluated by the service; guard.events off, then on)"
        );
        let mut t = Table::new(&[
            "way",
            "calls/s",
            "p50 µs",
            "p99 µs",
            "evaluate/call",
            "other requests/run",
            "connections/run",
            "CPU µs/call",
        ]);
        let mut fig = HashMap::new();
        for way in ways {
            let e = res.get_mut(&way).expect("ran");
            let f = e.figures();
            fig.insert(way, f);
            let c = counts[&way];
            let runs = s.rounds as f64;
            let service = matches!(way, Way::ProxyGuard | Way::ProxyGuardEvents);
            t.row(vec![
                way.label().into(),
                thousands(f.cps),
                fixed(f.p50, 1),
                fixed(f.p99, 1),
                if service {
                    fixed(c.evaluate as f64 / (calls_per_run * runs), 3)
                } else {
                    "-".into()
                },
                if service {
                    format!(
                        "{} identify, {} events",
                        fixed(c.identify as f64 / runs, 1),
                        fixed(c.events as f64 / runs, 1)
                    )
                } else {
                    "-".into()
                },
                if service {
                    fixed(c.connections as f64 / runs, 1)
                } else {
                    "-".into()
                },
                fixed(median(&e.cpu), 1),
            ]);
        }
        // The bench's own round trips: p50 and p99, and the CPU of the hot reqwest loop.
        let stack_cpu = fixed(stack_cpu as f64 / 1000.0 / stack.len().max(1) as f64, 1);
        for (label, samples, cpu) in [
            ("one keep-alive HTTP round trip", &http, String::new()),
            ("the same through reqwest + tokio", &stack, stack_cpu),
            (
                "one round trip after an idle pause",
                &http_idle,
                String::new(),
            ),
            ("the same through reqwest", &stack_idle, String::new()),
        ] {
            t.row(vec![
                label.into(),
                String::new(),
                fixed(micros(percentile(samples, 50.0)), 1),
                fixed(micros(percentile(samples, 99.0)), 1),
                String::new(),
                String::new(),
                String::new(),
                cpu,
            ]);
        }
        for (name, way, base) in [
            ("proxy+guard/relay", Way::ProxyGuard, Way::Relay),
            ("proxy+guard/direct", Way::ProxyGuard, Way::Direct),
            ("proxy+guard/proxy", Way::ProxyGuard, Way::Proxy),
        ] {
            t.row(ratio_row(name, fig[&way], fig[&base], 3));
        }
        print!("{}", t.render());
        let p50 = |samples: &[u64]| micros(percentile(samples, 50.0));
        let (http50, stack50) = (p50(&http), p50(&stack));
        let added = fig[&Way::ProxyGuard].p50 - fig[&Way::Proxy].p50;
        let added_events = fig[&Way::ProxyGuardEvents].p50 - fig[&Way::Proxy].p50;
        println!(
            "added by the guard service, p50: {} µs (events on: {} µs); one keep-alive HTTP round trip from the bench: {} µs ({} µs through reqwest); after an idle pause of {} µs: {} µs ({} µs through reqwest)",
            fixed(added, 1),
            fixed(added_events, 1),
            fixed(http50, 1),
            fixed(stack50, 1),
            GUARD_PAUSE.as_micros(),
            fixed(p50(&http_idle), 1),
            fixed(p50(&stack_idle), 1),
        );
        let g = counts[&Way::ProxyGuard];
        let per_call = g.evaluate as f64 / (calls_per_run * s.rounds as f64);
        let conns = g.connections as f64 / s.rounds as f64;
        let ge = counts[&Way::ProxyGuardEvents];
        let per_call_events = (ge.evaluate + ge.events) as f64 / (calls_per_run * s.rounds as f64);
        targets.push(Target {
            what: "guard path: 1 request per call, 1-2 connections".into(),
            measured: format!(
                "{per_call:.3} evaluate/call, {conns:.1} connections/run; with events {per_call_events:.3} requests/call"
            ),
            met: (per_call - 1.0).abs() < 1e-9 && (1.0..=2.0).contains(&conns),
        });
        targets.push(Target {
            what: "guard path adds <= one keep-alive HTTP round trip".into(),
            measured: format!(
                "+{} µs p50 vs {} µs round trip ({})",
                fixed(added, 1),
                fixed(http50, 1),
                ratio(added, http50)
            ),
            met: added <= http50 * 1.1,
        });
    }

    if s.runs("big") {
        let ways = [Way::Direct, Way::Relay, Way::Proxy];
        let mut res: HashMap<Way, Big> = HashMap::new();
        for r in 0..s.big_reps {
            for way in order(&ways, r) {
                let (wall, peak, idle, line) = big(&b, way, s.big_bytes);
                let e = res.entry(way).or_insert(Big {
                    wall: vec![],
                    peak: vec![],
                    idle: vec![],
                    line,
                });
                e.wall.push(stats::ms(wall));
                e.peak.push(peak);
                e.idle.push(idle);
            }
        }
        let size = res[&Way::Direct].line as u64;
        println!(
            "\n== a {} MiB tool result relayed (the answer line is {} bytes) ==",
            s.big_bytes >> 20,
            size
        );
        let mut t = Table::new(&[
            "way",
            "wall ms",
            "MB/s",
            "peak RSS MiB (of the middle process)",
            "peak/message",
            "RSS before MiB",
        ]);
        let mut fig = HashMap::new();
        for way in ways {
            let e = &res[&way];
            let wall = median(&e.wall);
            let peak = e.peak.iter().copied().max().unwrap_or(0);
            let idle = e.idle.iter().copied().max().unwrap_or(0);
            fig.insert(way, (wall, peak));
            t.row(vec![
                if way == Way::Direct {
                    "direct (the echo itself)".into()
                } else {
                    way.label().into()
                },
                fixed(wall, 1),
                fixed(size as f64 / 1e6 / (wall / 1000.0), 0),
                mb(peak),
                fixed(peak as f64 / size as f64, 2),
                mb(idle),
            ]);
        }
        t.row(vec![
            "proxy/relay".into(),
            ratio(fig[&Way::Proxy].0, fig[&Way::Relay].0),
            String::new(),
            ratio(fig[&Way::Proxy].1 as f64, fig[&Way::Relay].1 as f64),
            String::new(),
            String::new(),
        ]);
        t.row(vec![
            "proxy/direct".into(),
            ratio(fig[&Way::Proxy].0, fig[&Way::Direct].0),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
        ]);
        print!("{}", t.render());
        let r = fig[&Way::Proxy].1 as f64 / size as f64;
        targets.push(Target {
            what: format!(
                "{} MiB relayed with peak RSS <= 3x the message",
                s.big_bytes >> 20
            ),
            measured: format!("{} MiB = {r:.2}x", mb(fig[&Way::Proxy].1)),
            met: r <= 3.0,
        });
    }

    if s.runs("startup") {
        // With a guard service too (its HTTP client may load the system's root certificates), and
        // with more regex rules (checked at load).
        let ways = [
            Way::Direct,
            Way::Relay,
            Way::Proxy,
            Way::ProxyGuard,
            Way::ProxyRegexes,
        ];
        for way in ways {
            startup(&b, way); // page cache, dynamic loader caches
        }
        let mut res: HashMap<Way, Vec<f64>> = HashMap::new();
        for r in 0..s.startup_reps {
            for way in order(&ways, r) {
                res.entry(way)
                    .or_default()
                    .push(stats::ms(startup(&b, way)));
            }
        }
        println!(
            "\n== start-up: spawn to the first response (initialize), {} runs each ==",
            s.startup_reps
        );
        let mut t = Table::new(&["way", "median ms", "p90 ms", "min ms", "over direct ms"]);
        let direct = median(&res[&Way::Direct]);
        for way in ways {
            let mut v = res[&way].clone();
            v.sort_by(f64::total_cmp);
            let ns: Vec<u64> = v.iter().map(|x| (x * 1e6) as u64).collect();
            let med = median(&v);
            t.row(vec![
                way.label().into(),
                fixed(med, 2),
                fixed(percentile(&ns, 90.0) as f64 / 1e6, 2),
                fixed(v[0], 2),
                fixed(med - direct, 2),
            ]);
        }
        print!("{}", t.render());
        let over = median(&res[&Way::Proxy]) - direct;
        targets.push(Target {
            what: "start-up overhead <= 5 ms".into(),
            measured: format!("{over:.2} ms"),
            met: over <= 5.0,
        });
        let over = median(&res[&Way::ProxyRegexes]) - direct;
        targets.push(Target {
            what: "  the same with 20 more regex rules".into(),
            measured: format!("{over:.2} ms"),
            met: over <= 5.0,
        });
    }

    println!("\n== targets (issue #4) ==");
    let mut t = Table::new(&["target", "measured", "met"]);
    for target in &targets {
        t.row(vec![
            target.what.clone(),
            target.measured.clone(),
            if target.met { "yes" } else { "NO" }.into(),
        ]);
    }
    t.row(vec![
        "local rule evaluation <= 2 µs at 100 rules".into(),
        "see `cargo bench --bench rules`".into(),
        String::new(),
    ]);
    print!("{}", t.render());
    println!(
        "\nload average at end: {}; took {:.0} s",
        load(),
        began.elapsed().as_secs_f64()
    );
    if std::env::var_os("APIE_BENCH_KEEP").is_some() {
        println!("scratch directory kept: {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
}
