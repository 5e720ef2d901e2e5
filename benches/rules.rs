//! Local rule evaluation alone (issue #4): 1, 10 and 100 rules, with and without regex
//! conditions, through the library's public API.
//!
//! ```sh
//! cargo bench --bench rules
//! APIE_BENCH_SCALE=0.1 cargo bench --bench rules    # shorter measurement
//! ```
//!
//! Every rule set is the worst case for its size: each of the first N-1 rules matches the tool
//! name (`bench.*`) and fails on its one condition, so every condition is evaluated; the last
//! rule allows. Without regexes the conditions rotate over `starts_with`, `greater`, `in`,
//! `contains`, `equals` and `ends_with` on four argument fields; with regexes every condition is
//! a `matches` (anchored and unanchored, some case-insensitive).
//!
//! Groups:
//! - `rules/evaluate`: [`RuleSet::evaluate`] only, the engine;
//! - `rules/guard`: [`Guard::evaluate`], what the proxy runs per call on the local path: tool
//!   facts ([`ToolCatalog::describe`]), then the rules, then `riskDefaults`;
//! - `per_call`: the other per-call work of the local path, for scale: the strict parse of
//!   `tools/call` params and the SHA-256 of the arguments (audit log, approvals, the service);
//! - `startup`: compiling 21 rules, a part of the proxy's start-up. The first
//!   [`ToolCatalog::new`] of the process also compiles the tool-name inference table once; that
//!   one-off cost is printed before the benchmarks run.

use std::time::Duration;

use apie_mcp::config::{self, file::RawFile};
use apie_mcp::guard::Guard;
use apie_mcp::guard::metadata::ToolCatalog;
use apie_mcp::guard::rules::{CallFacts, RawRule, RuleSet, Runtime};
use apie_mcp::json::Json;
use clap::Parser as _;
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use serde_json::{Value, json};

const SIZES: [usize; 3] = [1, 10, 100];

fn condition(i: usize, regex: bool) -> Value {
    if regex {
        let patterns = [
            format!("^/etc/{i}/"),
            format!("(?i)\\.(pem|key|p{i})$"),
            format!("(?i)drop\\s+table\\s+t{i}"),
            format!("^/home/[^/]+/\\.ssh{i}/"),
            format!("secret-{i}"),
        ];
        let fields = [
            "args.path",
            "args.path",
            "args.message",
            "args.path",
            "args.message",
        ];
        let k = i % patterns.len();
        json!({"field": fields[k], "operator": "matches", "value": patterns[k]})
    } else {
        match i % 6 {
            0 => {
                json!({"field": "args.path", "operator": "starts_with", "value": format!("/root/{i}")})
            }
            1 => json!({"field": "args.limit", "operator": "greater", "value": 10_000 + i}),
            2 => {
                json!({"field": "args.user", "operator": "in", "value": ["root", "admin", format!("u{i}")]})
            }
            3 => {
                json!({"field": "args.message", "operator": "contains", "value": format!("rm -rf {i}")})
            }
            4 => json!({"field": "args.limit", "operator": "equals", "value": 7 + i}),
            _ => {
                json!({"field": "args.path", "operator": "ends_with", "value": format!(".pem{i}")})
            }
        }
    }
}

/// `n` rules: `n - 1` that are evaluated in full and fail, then one `allow` that matches.
fn policies(n: usize, regex: bool) -> Value {
    let mut rules: Vec<Value> = (0..n - 1)
        .map(|i| {
            json!({"name": format!("r{i}"), "verbMatchers": [{"type": "verb", "value": "bench.*"}],
                   "conditions": [condition(i, regex)], "action": {"type": "block"}})
        })
        .collect();
    rules.push(
        json!({"name": "allow", "verbMatchers": [{"type": "verb", "value": "bench.*"}],
                      "action": {"type": "allow"}}),
    );
    Value::Array(rules)
}

fn arguments() -> Value {
    json!({"path": "/srv/data/reports/2026/q3/summary-1.csv", "limit": 100,
           "message": "hello from the benchmark", "tags": ["bench", "echo"], "n": 1})
}

fn runtime() -> Runtime {
    Runtime {
        mode: "enforce".into(),
        agent_key: "bench".into(),
        server: "bench".into(),
        environment: None,
        run_id: "run_mcp_0123456789ab".into(),
    }
}

fn guard(n: usize, regex: bool) -> Guard {
    let raw: RawFile = serde_json::from_value(json!({
        "agentKey": "bench",
        "serverName": "bench",
        "mode": "enforce",
        "policies": policies(n, regex),
        "audit": false,
    }))
    .expect("config file");
    let args = apie_mcp::cli::Cli::try_parse_from(["apie-mcp", "--", "bench_echo"])
        .expect("command line")
        .run;
    let env: [(&str, &str); 0] = [];
    Guard::new(config::resolve(raw, None, &args, &env).expect("config"))
}

fn rule_set(c: &mut Criterion) {
    let t = std::time::Instant::now();
    let first = ToolCatalog::new("bench", None, vec![]).expect("catalog");
    eprintln!(
        "first ToolCatalog::new (compiles the inference RegexSet): {:.2} ms",
        t.elapsed().as_secs_f64() * 1000.0
    );
    drop(first);
    let catalog = ToolCatalog::new("bench", None, vec![]).expect("catalog");
    let tool = catalog.describe("echo");
    let args = arguments();
    let args = Json::from(&args);
    let rt = runtime();
    let mut group = c.benchmark_group("rules/evaluate");
    for regex in [false, true] {
        for n in SIZES {
            let raw: Vec<RawRule> = serde_json::from_value(policies(n, regex)).expect("rules");
            let set = RuleSet::compile(raw).expect("compile");
            let facts = CallFacts {
                tool: &tool,
                args: &args,
                runtime: &rt,
            };
            assert_eq!(set.evaluate(&facts).map(|r| &*r.name), Some("allow"));
            let name = if regex { "regex" } else { "plain" };
            group.bench_with_input(BenchmarkId::new(name, n), &facts, |b, facts| {
                b.iter(|| std::hint::black_box(set.evaluate(std::hint::black_box(facts))))
            });
        }
    }
    group.finish();
}

fn guard_evaluate(c: &mut Criterion) {
    let args = arguments();
    let args = Json::from(&args);
    let mut group = c.benchmark_group("rules/guard");
    for regex in [false, true] {
        for n in SIZES {
            let g = guard(n, regex);
            assert_eq!(g.evaluate("echo", &args).rule(), Some("allow"));
            let name = if regex { "regex" } else { "plain" };
            group.bench_function(BenchmarkId::new(name, n), |b| {
                b.iter(|| std::hint::black_box(g.evaluate("echo", std::hint::black_box(&args))))
            });
        }
    }
    group.finish();
}

fn per_call(c: &mut Criterion) {
    let args = arguments();
    let params = json!({"name": "echo", "arguments": args}).to_string();
    let mut group = c.benchmark_group("per_call");
    group.bench_function("strict_parse_params", |b| {
        b.iter(|| apie_mcp::jsonrpc::strict::parse(std::hint::black_box(&params)))
    });
    group.bench_function("arguments_digest", |b| {
        let args = Json::from(&args);
        b.iter(|| apie_mcp::guard::arguments_digest(std::hint::black_box(&args)))
    });
    let line = format!(r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{params}}}"#);
    group.bench_function("classify_line", |b| {
        b.iter(|| {
            matches!(
                apie_mcp::jsonrpc::classify(std::hint::black_box(line.as_bytes())),
                apie_mcp::jsonrpc::Parsed::Message(_)
            )
        })
    });
    group.finish();
}

fn startup(c: &mut Criterion) {
    let mut group = c.benchmark_group("startup");
    for regex in [false, true] {
        let raw: Vec<RawRule> = serde_json::from_value(policies(21, regex)).expect("rules");
        let name = if regex {
            "compile_21_regex"
        } else {
            "compile_21_plain"
        };
        group.bench_function(name, |b| {
            b.iter(|| RuleSet::compile(std::hint::black_box(raw.clone())).expect("compile"))
        });
    }
    group.finish();
}

fn config() -> Criterion {
    let scale: f64 = std::env::var("APIE_BENCH_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1.0);
    let secs = |s: f64| Duration::from_secs_f64((s * scale).max(0.05));
    Criterion::default()
        .warm_up_time(secs(1.0))
        .measurement_time(secs(3.0))
        .sample_size(50)
        .configure_from_args()
}

criterion_group! {
    name = benches;
    config = config();
    targets = rule_set, guard_evaluate, per_call, startup
}
criterion_main!(benches);
