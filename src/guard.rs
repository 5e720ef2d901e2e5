//! The guard: decides what happens to one `tools/call`.
//!
//! It owns the decision vocabulary ([`Decision`], [`Mode`]) and the pipeline that turns a call
//! into a [`Verdict`]: tool metadata ([`metadata`]), then local rules ([`rules`]) and, when
//! nothing matches, `riskDefaults`; then the mode table of SPEC §1.

pub mod metadata;
pub mod rules;

use serde::{Deserialize, Serialize};

/// What a guard (a local rule, `riskDefaults`, or the service) says about a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    Allow,
    Warn,
    Block,
    RequireApproval,
}

impl Decision {
    /// Orders decisions from the most permissive to the strictest.
    pub fn strictness(self) -> u8 {
        match self {
            Decision::Allow => 0,
            Decision::Warn => 1,
            Decision::RequireApproval => 2,
            Decision::Block => 3,
        }
    }

    /// The stricter of two decisions.
    pub fn stricter(self, other: Decision) -> Decision {
        if other.strictness() > self.strictness() {
            other
        } else {
            self
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Warn => "warn",
            Decision::Block => "block",
            Decision::RequireApproval => "require_approval",
        }
    }
}

/// How decisions are applied (SPEC §1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Enforce,
    /// Also spelled `shadow`.
    Monitor,
    Off,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Monitor => "monitor",
            Mode::Off => "off",
        }
    }

    /// Parses a mode name; `shadow` is an alias of `monitor`. Unknown or empty names are `None`.
    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "enforce" => Some(Mode::Enforce),
            "monitor" | "shadow" => Some(Mode::Monitor),
            "off" => Some(Mode::Off),
            _ => None,
        }
    }
}

// === the pipeline ===

use foldhash::{HashMap, HashMapExt};
use std::borrow::Cow;
use std::sync::{Arc, Mutex, RwLock};

use crate::config::{Config, RiskDefaults};
use crate::json::Json;
use crate::remote::verdict::Verdict;
use metadata::{ListedTool, ToolCatalog, ToolMeta};
use rules::{CallFacts, RuleSet, Runtime};

/// Who made a decision.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// A local rule: its name, and what a person reads about it (see [`rules::Rule`]).
    Rule {
        name: Arc<str>,
        explanation: Arc<str>,
    },
    /// `riskDefaults`, for the tool's risk level.
    RiskDefault,
}

/// A decision about one call, with what it was based on.
#[derive(Debug, Clone)]
pub struct Evaluation {
    pub meta: Arc<ToolMeta>,
    /// The policy decision: what the audit log and the service's events report.
    pub decision: Decision,
    /// What enforce mode acts on: the policy decision, or the service's effective decision.
    pub enforced: Decision,
    /// The local decision's origin.
    pub source: Source,
    /// The service's verdict, when it was asked.
    pub service: Option<Box<Verdict>>,
}

impl Evaluation {
    pub fn rule(&self) -> Option<&str> {
        match &self.source {
            Source::Rule { name, .. } => Some(name),
            Source::RiskDefault => None,
        }
    }

    /// Whether the service has a say: a local `allow` or `block` rule is final (SPEC §4).
    pub fn needs_service(&self) -> bool {
        match self.source {
            Source::Rule { .. } => {
                matches!(self.decision, Decision::Warn | Decision::RequireApproval)
            }
            Source::RiskDefault => true,
        }
    }

    /// Takes the service's verdict. A matched local `warn` or `require_approval` rule stays a
    /// floor: the service can make a call stricter than the local policy, never laxer.
    pub fn take_verdict(&mut self, verdict: Verdict) {
        let floor = match self.source {
            Source::Rule { .. } => Some(self.decision),
            Source::RiskDefault => None,
        };
        let raise = |d: Decision| floor.map_or(d, |f| f.stricter(d));
        self.decision = raise(verdict.policy);
        self.enforced = raise(verdict.effective);
        self.service = Some(Box::new(verdict));
    }

    /// What the mode table makes of this evaluation: enforce acts on the enforced decision,
    /// monitor reports the policy decision.
    pub fn action(&self, mode: Mode) -> Action {
        match mode {
            Mode::Enforce => action(mode, self.enforced),
            _ => action(mode, self.decision),
        }
    }

    /// The service guardrail that matched, if any.
    pub fn guardrail(&self) -> Option<&str> {
        self.service.as_ref()?.matched_guardrail.as_deref()
    }

    /// A reason a person can read: the service's, else the rule's own, else what decided.
    pub fn reason(&self) -> Cow<'_, str> {
        if let Some(service) = &self.service {
            return match &service.reason {
                Some(reason) => Cow::Borrowed(reason),
                None => format!("the guard service decided {}", self.decision.as_str()).into(),
            };
        }
        match &self.source {
            Source::Rule { explanation, .. } => Cow::Borrowed(explanation),
            Source::RiskDefault => format!(
                "no rule matched; riskDefaults for {} risk is {}",
                self.meta.risk.as_str(),
                self.decision.as_str()
            )
            .into(),
        }
    }
}

/// What the mode table (SPEC §1) makes of an evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Send the call upstream; `outcome` is what the audit log says.
    Forward { outcome: &'static str },
    /// Answer with the blocked error.
    Block,
    /// Hold the call for a human.
    AskApproval,
}

/// Applies the mode table to a decision.
pub fn action(mode: Mode, decision: Decision) -> Action {
    match (mode, decision) {
        (Mode::Off, _) | (_, Decision::Allow | Decision::Warn) => Action::Forward {
            outcome: "forwarded",
        },
        (Mode::Enforce, Decision::Block) => Action::Block,
        (Mode::Enforce, Decision::RequireApproval) => Action::AskApproval,
        (Mode::Monitor, Decision::Block) => Action::Forward {
            outcome: "would_block",
        },
        (Mode::Monitor, Decision::RequireApproval) => Action::Forward {
            outcome: "would_require_approval",
        },
    }
}

/// The local guard: tool metadata, rules and defaults for one session.
pub struct Guard {
    pub mode: Mode,
    policies: RuleSet,
    risk_defaults: RiskDefaults,
    runtime: Runtime,
    catalog: RwLock<ToolCatalog>,
    /// What is known of each tool called so far: its facts and the rules that select it, built
    /// once, not per call. Emptied whenever the catalog learns or forgets, and when it grows
    /// past [`METAS_KEPT`].
    metas: Mutex<HashMap<String, Known>>,
    hide_blocked_tools: bool,
    /// [`Guard::warm_up`] has started.
    warmed: std::sync::Once,
}

/// Most tools whose facts are kept (a host could name endless made-up tools).
const METAS_KEPT: usize = 4096;

/// A tool's facts and the rules that select it.
#[derive(Clone)]
struct Known {
    meta: Arc<ToolMeta>,
    selection: Arc<rules::Selection>,
}

impl Guard {
    /// Starts compiling, on a thread of its own, what the first calls would otherwise wait for:
    /// the tool-name inference table and the rules' regex groups (one thread for both, so that
    /// start-up keeps the other core). The relay calls it once the first answer is on its way to
    /// the host, so that it does not compete with start-up; calls after the first do nothing.
    pub fn warm_up(&self) {
        self.warmed.call_once(|| {
            let groups = self.policies.preparer();
            let _ = std::thread::Builder::new()
                .name("warm-up".into())
                .spawn(move || {
                    metadata::prepare();
                    groups();
                });
        });
    }

    pub fn new(config: Config) -> Guard {
        Guard {
            mode: config.mode,
            risk_defaults: config.risk_defaults,
            runtime: Runtime {
                mode: config.mode.as_str().to_string(),
                agent_key: config.agent_key,
                server: config.server_name,
                environment: config.environment,
                run_id: config.run_id,
            },
            hide_blocked_tools: config.hide_blocked_tools,
            warmed: std::sync::Once::new(),
            policies: config.policies,
            catalog: RwLock::new(config.catalog),
            metas: Mutex::new(HashMap::new()),
        }
    }

    pub fn describe(&self, tool: &str) -> Arc<ToolMeta> {
        self.known(tool).meta
    }

    fn known(&self, tool: &str) -> Known {
        // Computed under the cache's lock, so a `learn` cannot be overtaken by a stale entry.
        let mut metas = self.metas();
        if let Some(known) = metas.get(tool) {
            return known.clone();
        }
        let meta = self.catalog().describe(tool);
        let known = Known {
            selection: Arc::new(self.policies.select(&meta)),
            meta: Arc::new(meta),
        };
        if metas.len() >= METAS_KEPT {
            metas.clear();
        }
        metas.insert(tool.to_owned(), known.clone());
        known
    }

    fn metas(&self) -> std::sync::MutexGuard<'_, HashMap<String, Known>> {
        self.metas.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Local rules first; `riskDefaults` when none matches.
    pub fn evaluate(&self, tool: &str, args: &Json<'_>) -> Evaluation {
        let Known { meta, selection } = self.known(tool);
        let facts = CallFacts {
            tool: &meta,
            args,
            runtime: &self.runtime,
        };
        let (decision, source) = match self.policies.evaluate_selected(&selection, &facts) {
            Some(rule) => (
                rule.decision,
                Source::Rule {
                    name: rule.name.clone(),
                    explanation: rule.explanation.clone(),
                },
            ),
            None => (self.risk_defaults.decide(meta.risk), Source::RiskDefault),
        };
        Evaluation {
            meta,
            decision,
            enforced: decision,
            source,
            service: None,
        }
    }

    /// True when `hideBlockedTools` should drop this tool from `tools/list`: only in enforce
    /// mode, and only when every possible call of it would be blocked.
    pub fn hides(&self, tool: &str) -> bool {
        if !self.hide_blocked_tools || self.mode != Mode::Enforce {
            return false;
        }
        let meta = self.describe(tool);
        let fallback = Some(self.risk_defaults.decide(meta.risk));
        self.policies.always_blocks(&meta, &self.runtime, fallback)
    }

    pub fn hide_blocked_tools(&self) -> bool {
        self.hide_blocked_tools && self.mode == Mode::Enforce
    }

    /// Learns annotations from a `tools/list` result.
    pub fn learn(&self, tools: &[ListedTool]) {
        if let Ok(mut catalog) = self.catalog.write() {
            catalog.learn(tools);
        }
        self.metas().clear();
    }

    /// Forgets learned annotations (`notifications/tools/list_changed`).
    pub fn forget(&self) {
        if let Ok(mut catalog) = self.catalog.write() {
            catalog.forget();
        }
        self.metas().clear();
    }

    fn catalog(&self) -> std::sync::RwLockReadGuard<'_, ToolCatalog> {
        // A poisoned lock only means a panic elsewhere; the catalog itself is still whole.
        self.catalog.read().unwrap_or_else(|e| e.into_inner())
    }
}

/// SHA-256 of the arguments in canonical form (object keys sorted, no whitespace), hex.
///
/// The canonical text is written into a buffer kept per thread and hashed at once: feeding the
/// hasher piece by piece cost more than the hashing.
pub fn arguments_digest(args: &Json<'_>) -> String {
    use sha2::{Digest, Sha256};
    thread_local! {
        static TEXT: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let digest = TEXT.with_borrow_mut(|text| {
        text.clear();
        write_canonical(args, text);
        let digest = Sha256::digest(&*text);
        // Don't keep a large call's text for the rest of the session.
        if text.capacity() > 64 * 1024 {
            *text = Vec::new();
        }
        digest
    });
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut hex = [0u8; 64];
    for (pair, b) in hex.chunks_exact_mut(2).zip(digest) {
        pair[0] = HEX[usize::from(b >> 4)];
        pair[1] = HEX[usize::from(b & 0xf)];
    }
    // Hex digits are ASCII: the conversion cannot fail.
    std::str::from_utf8(&hex).unwrap_or_default().to_owned()
}

/// Appends `value` as canonical JSON: object keys sorted (by their bytes), no whitespace,
/// strings and numbers as `serde_json` writes them.
fn write_canonical(value: &Json<'_>, out: &mut Vec<u8>) {
    use crate::jsonrpc::write_str;
    match value {
        Json::Object(members) => {
            let mut entries: smallvec::SmallVec<[&(Cow<'_, str>, Json<'_>); 16]> =
                members.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            out.push(b'{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_str(out, k);
                out.push(b':');
                write_canonical(v, out);
            }
            out.push(b'}');
        }
        Json::Array(items) => {
            out.push(b'[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(v, out);
            }
            out.push(b']');
        }
        Json::String(s) => write_str(out, s),
        Json::Null => out.extend_from_slice(b"null"),
        Json::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Json::Number(n) => {
            // Writing into a Vec cannot fail.
            let _ = serde_json::to_writer(&mut *out, n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn the_mode_table_is_spec_section_1() {
        use Decision::*;
        let fwd = |outcome| Action::Forward { outcome };
        let table = [
            (Mode::Enforce, Allow, fwd("forwarded")),
            (Mode::Enforce, Warn, fwd("forwarded")),
            (Mode::Enforce, Block, Action::Block),
            (Mode::Enforce, RequireApproval, Action::AskApproval),
            (Mode::Monitor, Allow, fwd("forwarded")),
            (Mode::Monitor, Warn, fwd("forwarded")),
            (Mode::Monitor, Block, fwd("would_block")),
            (
                Mode::Monitor,
                RequireApproval,
                fwd("would_require_approval"),
            ),
            (Mode::Off, Allow, fwd("forwarded")),
            (Mode::Off, Warn, fwd("forwarded")),
            (Mode::Off, Block, fwd("forwarded")),
            (Mode::Off, RequireApproval, fwd("forwarded")),
        ];
        for (mode, decision, want) in table {
            assert_eq!(action(mode, decision), want, "{mode:?} × {decision:?}");
        }
    }

    fn guard(config: &str) -> Guard {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("apie.mcp.json");
        std::fs::write(&path, config).unwrap();
        let mut args = crate::cli::RunArgs::default();
        args.source.config = Some(path);
        Guard::new(crate::config::load(&args, &[("HOME", "/h")]).unwrap())
    }

    #[test]
    fn learned_annotations_reach_calls_described_before() {
        let g = guard(r#"{"agentKey":"a","upstream":{"command":"srv"}}"#);
        assert_eq!(g.describe("tidy").risk, metadata::RiskLevel::Medium);
        let listed: Vec<ListedTool> = serde_json::from_value(serde_json::json!([
            {"name": "tidy", "annotations": {"destructiveHint": true}}
        ]))
        .unwrap();
        g.learn(&listed);
        assert_eq!(g.describe("tidy").risk, metadata::RiskLevel::High);
        g.forget();
        assert_eq!(g.describe("tidy").risk, metadata::RiskLevel::Medium);
    }

    #[test]
    fn the_service_raises_a_local_rule_but_never_lowers_it() {
        let g = guard(
            r#"{"agentKey":"a","upstream":{"command":"srv"},"mode":"enforce","policies":[
                {"name":"big","verbMatchers":[{"type":"verb","value":"refund"}],"action":{"type":"require_approval"}}]}"#,
        );
        let verdict = |d: &str| {
            crate::remote::verdict::Verdict::parse(&serde_json::json!({"decision": d})).unwrap()
        };
        let mut e = g.evaluate("refund", &Json::Object(Vec::new()));
        assert!(e.needs_service());
        e.take_verdict(verdict("allow"));
        assert_eq!(e.action(Mode::Enforce), Action::AskApproval);
        let mut e = g.evaluate("refund", &Json::Object(Vec::new()));
        e.take_verdict(verdict("block"));
        assert_eq!(e.action(Mode::Enforce), Action::Block);
        // No rule matched: the service decides alone.
        let mut e = g.evaluate("echo", &Json::Object(Vec::new()));
        assert!(e.needs_service());
        e.take_verdict(verdict("warn"));
        assert_eq!(e.decision, Decision::Warn);
    }

    #[test]
    fn modes_parse_with_the_shadow_alias_and_nothing_else() {
        assert_eq!(Mode::parse("shadow"), Some(Mode::Monitor));
        assert_eq!(Mode::parse("enforce"), Some(Mode::Enforce));
        for bad in ["", "Enforce", "guard", "block"] {
            assert_eq!(Mode::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_digest_ignores_key_order_and_whitespace() {
        let parse = |text| crate::jsonrpc::strict::parse(text).unwrap();
        let a = parse(r#"{"b":1,"a":{"y":[1,2],"x":"s"}}"#);
        let b = parse(r#"{ "a": {"x":"s","y":[1, 2]}, "b": 1 }"#);
        assert_eq!(arguments_digest(&a), arguments_digest(&b));
        assert_ne!(arguments_digest(&a), arguments_digest(&parse(r#"{"b":2}"#)));
        assert_eq!(
            arguments_digest(&Json::Object(Vec::new())),
            "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
        );
    }

    #[test]
    fn the_digest_is_of_serde_jsons_text_with_sorted_keys() {
        use sha2::{Digest, Sha256};
        // The reference: the value rebuilt with its keys inserted in order, written by serde.
        fn sorted(v: &Value) -> Value {
            match v {
                Value::Object(map) => {
                    let mut keys: Vec<&String> = map.keys().collect();
                    keys.sort();
                    Value::Object(
                        keys.into_iter()
                            .map(|k| (k.clone(), sorted(&map[k])))
                            .collect(),
                    )
                }
                Value::Array(items) => Value::Array(items.iter().map(sorted).collect()),
                other => other.clone(),
            }
        }
        let text = r#"{"z":[1,-2,3.5,1e300,18446744073709551615,-9223372036854775808,0.1,true,null],
                "a":{"q\"uote":"back\\slash","ctl":"\u0001\n\t","":"","é":"ünï ✓ 😀"},
                "B":{"nested":[{"y":1,"x":[]},{}]},"tab\tkey":"\u007f","c":"plain"}"#;
        let args: Value = serde_json::from_str(text).unwrap();
        let reference = |v: &Value| -> String {
            let text = serde_json::to_string(&sorted(v)).unwrap();
            Sha256::digest(text.as_bytes())
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect()
        };
        // As the proxy reads a call (strings borrowed unless escaped), and from a `Value`.
        let parsed = crate::jsonrpc::strict::parse(text).unwrap();
        assert_eq!(arguments_digest(&parsed), reference(&args));
        assert_eq!(arguments_digest(&Json::from(&args)), reference(&args));
        // Objects beyond the 16 entries sorted on the stack.
        let wide: Value = (0..40)
            .rev()
            .map(|i| (format!("k{i}"), Value::from(i)))
            .collect();
        assert_eq!(arguments_digest(&Json::from(&wide)), reference(&wide));
    }
}
