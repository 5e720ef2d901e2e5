//! The local rule engine (SPEC §4).
//!
//! This module owns the `policies` rules: their shape as written ([`RawRule`]), their
//! compilation into a [`RuleSet`] (every glob, regex, number and field path is prepared once, and
//! a rule that could never match is a [`RuleError`] with its path), their evaluation against one
//! call ([`RuleSet::evaluate`], first match wins), the static question "is this tool blocked
//! whatever its arguments" ([`RuleSet::always_blocks`]), and the human-readable output of
//! `apie-mcp check` ([`Rule::describe`], [`RuleSet::warnings`]).
//!
//! Evaluation never panics and does not allocate, except once per field to build the searches
//! that evaluate its `matches` conditions together (`rules/sets.rs`): a missing field or a type
//! mismatch is "no match", except that the negative operators `not_equals`, `not_contains`,
//! `not_in` and `not_exists` match a missing field.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::fmt::{self, Write as _};

use std::sync::Arc;

use serde::{Deserialize, Deserializer};
use serde_json::{Number, Value};

use crate::json::Json;

use self::pattern::PatternRegex;
use self::sets::{Found, RegexGroup};
use super::Decision;
use super::metadata::{Glob, RiskLevel, ToolMeta};

mod pattern;
mod sets;
#[cfg(test)]
mod tests;

// ---------------------------------------------------------------------------------------------
// Rules as written
// ---------------------------------------------------------------------------------------------

/// One rule as written in `policies`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawRule {
    pub name: String,
    pub verb_matchers: Option<Vec<RawVerbMatcher>>,
    pub conditions: Option<Vec<RawCondition>>,
    pub action: RawRuleAction,
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVerbMatcher {
    #[serde(rename = "type")]
    pub kind: MatcherKind,
    pub value: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
pub enum MatcherKind {
    #[serde(rename = "verb")]
    Verb,
    #[serde(rename = "riskLevel")]
    RiskLevel,
    #[serde(rename = "provider")]
    Provider,
    #[serde(rename = "server")]
    Server,
}

impl MatcherKind {
    pub fn as_str(self) -> &'static str {
        match self {
            MatcherKind::Verb => "verb",
            MatcherKind::RiskLevel => "riskLevel",
            MatcherKind::Provider => "provider",
            MatcherKind::Server => "server",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCondition {
    pub field: String,
    pub operator: Operator,
    /// `Some(Value::Null)` for an explicit `"value": null`; `None` when the key is absent.
    #[serde(default, deserialize_with = "present_value")]
    pub value: Option<Value>,
}

fn present_value<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(deserializer).map(Some)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Operator {
    Equals,
    NotEquals,
    Greater,
    GreaterOrEqual,
    Less,
    LessOrEqual,
    Contains,
    NotContains,
    StartsWith,
    EndsWith,
    Matches,
    In,
    NotIn,
    Exists,
    NotExists,
}

impl Operator {
    pub fn as_str(self) -> &'static str {
        match self {
            Operator::Equals => "equals",
            Operator::NotEquals => "not_equals",
            Operator::Greater => "greater",
            Operator::GreaterOrEqual => "greater_or_equal",
            Operator::Less => "less",
            Operator::LessOrEqual => "less_or_equal",
            Operator::Contains => "contains",
            Operator::NotContains => "not_contains",
            Operator::StartsWith => "starts_with",
            Operator::EndsWith => "ends_with",
            Operator::Matches => "matches",
            Operator::In => "in",
            Operator::NotIn => "not_in",
            Operator::Exists => "exists",
            Operator::NotExists => "not_exists",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRuleAction {
    #[serde(rename = "type")]
    pub kind: RuleActionKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleActionKind {
    Allow,
    Warn,
    /// Same decision as `warn`.
    Notify,
    Block,
    RequireApproval,
}

impl RuleActionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RuleActionKind::Allow => "allow",
            RuleActionKind::Warn => "warn",
            RuleActionKind::Notify => "notify",
            RuleActionKind::Block => "block",
            RuleActionKind::RequireApproval => "require_approval",
        }
    }

    pub fn decision(self) -> Decision {
        match self {
            RuleActionKind::Allow => Decision::Allow,
            RuleActionKind::Warn | RuleActionKind::Notify => Decision::Warn,
            RuleActionKind::Block => Decision::Block,
            RuleActionKind::RequireApproval => Decision::RequireApproval,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Per-call input
// ---------------------------------------------------------------------------------------------

/// Runtime facts available to conditions under the `runtime.` root. Built once per session.
#[derive(Debug, Clone, Default)]
pub struct Runtime {
    pub mode: String,
    pub agent_key: String,
    pub server: String,
    pub environment: Option<String>,
    pub run_id: String,
}

/// Everything a rule may look at for one call.
#[derive(Debug, Clone, Copy)]
pub struct CallFacts<'a> {
    pub tool: &'a ToolMeta,
    pub args: &'a Json<'a>,
    pub runtime: &'a Runtime,
}

/// A rule that can never match, or cannot be understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct RuleError {
    /// Relative to the `policies` array, e.g. `[2].conditions[0].value`.
    pub path: String,
    pub message: String,
}

fn rule_error(path: String, message: impl Into<String>) -> RuleError {
    RuleError {
        path,
        message: message.into(),
    }
}

// ---------------------------------------------------------------------------------------------
// Compiled rules
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Matcher {
    Verb(Glob),
    Risk(RiskLevel),
    Provider(Box<str>),
    Server(Glob),
}

impl Matcher {
    fn matches(&self, tool: &ToolMeta) -> bool {
        match self {
            Matcher::Verb(g) => {
                g.matches_tool(&tool.name, &tool.resource_provider, &tool.qualified)
            }
            Matcher::Risk(r) => tool.risk == *r,
            Matcher::Provider(p) => tool.provider.eq_ignore_ascii_case(p),
            Matcher::Server(g) => g.is_match(&tool.resource_provider),
        }
    }

    fn matches_every_tool(&self) -> bool {
        match self {
            Matcher::Verb(g) | Matcher::Server(g) => g.matches_everything(),
            Matcher::Risk(_) | Matcher::Provider(_) => false,
        }
    }
}

impl fmt::Display for Matcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Matcher::Verb(g) => write!(f, "verb {:?}", g.as_str()),
            Matcher::Risk(r) => write!(f, "riskLevel {r}"),
            Matcher::Provider(p) => write!(f, "provider {p:?}"),
            Matcher::Server(g) => write!(f, "server {:?}", g.as_str()),
        }
    }
}

/// One step of an `args` path: an object key, and the array index it also spells, if any.
#[derive(Debug, Clone)]
struct Segment {
    key: Box<str>,
    index: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Field {
    /// An index into [`RuleSet::paths`]: identical paths are resolved once per call.
    Args(usize),
    ToolName,
    ToolQualifiedName,
    ToolProvider,
    ToolRiskLevel,
    ActionType,
    ActionName,
    ResourceType,
    ResourceProvider,
    ResourceEnvironment,
    ResourceExternalId,
    RuntimeMode,
    RuntimeAgentKey,
    RuntimeServer,
    RuntimeEnvironment,
    RuntimeRunId,
}

/// A resolved field: a fixed string fact, or a value inside the arguments.
#[derive(Clone, Copy)]
enum Val<'a> {
    Str(&'a str),
    Json(&'a Json<'a>),
}

impl<'a> Val<'a> {
    fn as_str(self) -> Option<&'a str> {
        match self {
            Val::Str(s) => Some(s),
            Val::Json(Json::String(s)) => Some(s),
            Val::Json(_) => None,
        }
    }
}

/// A number read from JSON or from a numeric string. Integers stay exact.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Num {
    Int(i128),
    Float(f64),
}

impl Num {
    fn as_f64(self) -> f64 {
        match self {
            Num::Int(i) => i as f64,
            Num::Float(f) => f,
        }
    }

    fn from_number(n: &Number) -> Option<Num> {
        if let Some(i) = n.as_i64() {
            Some(Num::Int(i128::from(i)))
        } else if let Some(u) = n.as_u64() {
            Some(Num::Int(i128::from(u)))
        } else {
            n.as_f64().filter(|f| f.is_finite()).map(Num::Float)
        }
    }

    /// `"500"`, `" 5e2 "`, `"-1.5"`; not `"NaN"`, `"inf"`, `""` or `"0x10"`.
    fn parse(s: &str) -> Option<Num> {
        let t = s.trim();
        if t.is_empty() {
            return None;
        }
        if let Ok(i) = t.parse::<i128>() {
            return Some(Num::Int(i));
        }
        t.parse::<f64>()
            .ok()
            .filter(|f| f.is_finite())
            .map(Num::Float)
    }

    /// A JSON number, or a string that reads as one.
    fn of_json(v: &Json<'_>) -> Option<Num> {
        match v {
            Json::Number(n) => Num::from_number(n),
            Json::String(s) => Num::parse(s),
            _ => None,
        }
    }

    fn of_val(v: Val<'_>) -> Option<Num> {
        match v {
            Val::Str(s) => Num::parse(s),
            Val::Json(j) => Num::of_json(j),
        }
    }

    fn compare(self, other: Num) -> Option<Ordering> {
        match (self, other) {
            (Num::Int(a), Num::Int(b)) => Some(a.cmp(&b)),
            _ => self.as_f64().partial_cmp(&other.as_f64()),
        }
    }
}

/// A configured comparison value, with its numeric reading prepared.
#[derive(Debug, Clone)]
struct Operand {
    json: Value,
    num: Option<Num>,
}

impl Operand {
    fn new(json: Value) -> Operand {
        let num = Num::of_json(&Json::from(&json));
        Operand { json, num }
    }
}

#[derive(Debug, Clone, Copy)]
enum NumOp {
    Greater,
    GreaterOrEqual,
    Less,
    LessOrEqual,
}

impl NumOp {
    fn accepts(self, ord: Ordering) -> bool {
        match self {
            NumOp::Greater => ord == Ordering::Greater,
            NumOp::GreaterOrEqual => ord != Ordering::Less,
            NumOp::Less => ord == Ordering::Less,
            NumOp::LessOrEqual => ord != Ordering::Greater,
        }
    }
}

#[derive(Debug, Clone)]
enum Test {
    Equals(Operand),
    NotEquals(Operand),
    Numeric(NumOp, Num),
    Contains(Operand),
    NotContains(Operand),
    StartsWith(Box<str>),
    EndsWith(Box<str>),
    Matches(Pattern),
    In(Box<[Operand]>),
    NotIn(Box<[Operand]>),
    Exists,
    NotExists,
}

/// A `matches` regex, and where the answer of its field's [`RegexGroup`] is found.
#[derive(Debug, Clone)]
struct Pattern {
    /// Shared by the rule and the evaluation view, so that it is built once.
    re: Arc<PatternRegex>,
    /// An index into [`RuleSet::groups`], or [`NO_GROUP`].
    group: usize,
    bit: u8,
}

/// The group of a pattern evaluated alone.
const NO_GROUP: usize = usize::MAX;

/// The part of a condition that evaluation reads.
#[derive(Debug, Clone)]
struct Check {
    field: Field,
    test: Test,
}

#[derive(Debug, Clone)]
struct Condition {
    /// Position in the rule's `conditions` as written (they are evaluated cheapest first).
    pos: usize,
    check: Check,
    operator: Operator,
    /// The field and value as written, for `describe`.
    field_src: String,
    value_src: Option<String>,
    reads_args: bool,
    /// `exists`/`not_exists` given a value they ignore (a `check` warning).
    value_ignored: bool,
}

/// Equality of `equals`, `in` and array `contains`: numeric when both sides read as numbers and
/// at least one is a JSON number; strict JSON equality otherwise.
fn equals(v: Val<'_>, o: &Operand) -> bool {
    let field_is_number = matches!(v, Val::Json(Json::Number(_)));
    if (field_is_number || o.json.is_number())
        && let (Some(a), Some(b)) = (Num::of_val(v), o.num)
    {
        return a.compare(b) == Some(Ordering::Equal);
    }
    match v {
        Val::Str(s) => o.json.as_str() == Some(s),
        Val::Json(j) => j.eq_value(&o.json),
    }
}

/// `Some(found)` for a string or array field, `None` for a type mismatch.
fn contains(v: Val<'_>, o: &Operand) -> Option<bool> {
    match v {
        Val::Json(Json::Array(items)) => Some(items.iter().any(|e| equals(Val::Json(e), o))),
        _ => {
            let s = v.as_str()?;
            let needle = o.json.as_str()?;
            Some(s.contains(needle))
        }
    }
}

/// A small stack buffer for rendering a JSON number as text without allocating.
struct StackText {
    buf: [u8; 64],
    len: usize,
}

impl fmt::Write for StackText {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len + s.len();
        let dst = self.buf.get_mut(self.len..end).ok_or(fmt::Error)?;
        dst.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// `f` of the text a regex reads in `v`: a string, or a number as JSON writes it; `None` for
/// other values.
fn with_text<R>(v: Val<'_>, f: impl FnOnce(&str) -> R) -> Option<R> {
    match v {
        Val::Json(Json::Number(n)) => {
            let mut text = StackText {
                buf: [0; 64],
                len: 0,
            };
            if write!(text, "{n}").is_ok()
                && let Ok(s) = std::str::from_utf8(&text.buf[..text.len])
            {
                Some(f(s))
            } else {
                Some(f(&n.to_string()))
            }
        }
        _ => v.as_str().map(f),
    }
}

fn regex_matches(re: &PatternRegex, v: Val<'_>) -> bool {
    with_text(v, |s| re.is_match(s)).unwrap_or(false)
}

/// How many distinct `args` paths are remembered per call; further paths are walked each time.
const CACHED_PATHS: usize = 16;

#[derive(Clone, Copy)]
enum Slot<'a> {
    Unknown,
    Missing,
    Found(&'a Json<'a>),
}

/// Most regex groups in a rule set (bits of a `u64` in [`Selection`]); the patterns of fields
/// beyond them are evaluated alone.
const MAX_GROUPS: usize = 8;
const _: () = assert!(MAX_GROUPS <= 64);

/// Per-call state of one evaluation: the `args` paths resolved so far, and the answers of the
/// regex groups searched so far. Lives on the stack.
struct Scratch<'a, 'p> {
    args: &'a Json<'a>,
    paths: &'p [Box<[Segment]>],
    slots: [Slot<'a>; CACHED_PATHS],
    groups: &'p [RegexGroup],
    /// Bit `g`: group `g` is worth a search in this call (its patterns are evaluated together).
    searching: u64,
    /// Bit `g`: `found[g]` holds group `g`'s answer.
    searched: u64,
    found: [Found; MAX_GROUPS],
}

impl<'a, 'p> Scratch<'a, 'p> {
    fn new(args: &'a Json<'a>, set: &'p RuleSet, searching: u64) -> Self {
        Scratch {
            args,
            paths: &set.paths,
            slots: [Slot::Unknown; CACHED_PATHS],
            groups: &set.groups,
            searching,
            searched: 0,
            found: [Found::default(); MAX_GROUPS],
        }
    }

    /// Whether `p` matches `v`, the value of its field: from its group's answer when the group is
    /// searched in this call, else by its own regex.
    #[inline]
    fn matches(&mut self, p: &Pattern, v: Val<'_>) -> bool {
        // The common case, kept small: every check inlines it.
        if p.group < MAX_GROUPS
            && self.searched & 1 << p.group != 0
            && let Some(hit) = self.found.get(p.group).and_then(|f| f.get(p.bit))
        {
            return hit;
        }
        self.search_or_match(p, v)
    }

    /// [`Scratch::matches`] when the group has not been searched yet, or is not searched in this
    /// call, or left `p` to its own regex.
    #[inline(never)]
    fn search_or_match(&mut self, p: &Pattern, v: Val<'_>) -> bool {
        let g = p.group;
        if g < MAX_GROUPS && self.searching & !self.searched & 1 << g != 0 {
            // The first pattern of the group read in this call searches for all of them.
            let found = match self.groups.get(g) {
                Some(group) => with_text(v, |s| group.search(s)).unwrap_or(Found::NO_MATCH),
                None => Found::default(),
            };
            if let Some(slot) = self.found.get_mut(g) {
                *slot = found;
                self.searched |= 1 << g;
            }
            if let Some(hit) = found.get(p.bit) {
                return hit;
            }
        }
        regex_matches(&p.re, v)
    }

    fn arg(&mut self, id: usize) -> Option<&'a Json<'a>> {
        let walk_path = |args, paths: &[Box<[Segment]>]| walk(args, paths.get(id)?);
        let Some(slot) = self.slots.get_mut(id) else {
            return walk_path(self.args, self.paths);
        };
        match *slot {
            Slot::Found(v) => Some(v),
            Slot::Missing => None,
            Slot::Unknown => {
                let found = walk_path(self.args, self.paths);
                *slot = found.map_or(Slot::Missing, Slot::Found);
                found
            }
        }
    }
}

/// Object key lookup: the exact key, else a key equal ignoring ASCII case.
fn lookup<'a>(members: &'a [(Cow<'a, str>, Json<'a>)], key: &str) -> Option<&'a Json<'a>> {
    let found =
        |same: fn(&str, &str) -> bool| members.iter().find(|(k, _)| same(k, key)).map(|(_, v)| v);
    found(|a, b| a == b).or_else(|| found(str::eq_ignore_ascii_case))
}

fn walk<'a>(mut v: &'a Json<'a>, path: &[Segment]) -> Option<&'a Json<'a>> {
    for seg in path {
        v = match v {
            Json::Object(members) => lookup(members, &seg.key)?,
            Json::Array(items) => items.get(seg.index?)?,
            _ => return None,
        };
    }
    Some(v)
}

fn resolve<'a>(
    field: &Field,
    call: &CallFacts<'a>,
    scratch: &mut Scratch<'a, '_>,
) -> Option<Val<'a>> {
    let tool = call.tool;
    let rt = call.runtime;
    Some(match field {
        Field::Args(id) => Val::Json(scratch.arg(*id)?),
        Field::ToolName => Val::Str(&tool.name),
        Field::ToolQualifiedName => Val::Str(&tool.qualified),
        Field::ToolProvider => Val::Str(&tool.provider),
        Field::ToolRiskLevel => Val::Str(tool.risk.as_str()),
        Field::ActionType => Val::Str(&tool.action_type),
        Field::ActionName => Val::Str(&tool.action_name),
        Field::ResourceType => Val::Str(&tool.resource_type),
        Field::ResourceProvider => Val::Str(&tool.resource_provider),
        Field::ResourceEnvironment => Val::Str(tool.resource_environment.as_deref()?),
        Field::ResourceExternalId => Val::Str(tool.resource_external_id.as_deref()?),
        Field::RuntimeMode => Val::Str(&rt.mode),
        Field::RuntimeAgentKey => Val::Str(&rt.agent_key),
        Field::RuntimeServer => Val::Str(&rt.server),
        Field::RuntimeEnvironment => Val::Str(rt.environment.as_deref()?),
        Field::RuntimeRunId => Val::Str(&rt.run_id),
    })
}

impl Condition {
    fn holds<'a>(&self, call: &CallFacts<'a>, scratch: &mut Scratch<'a, '_>) -> bool {
        self.check.holds(call, scratch)
    }
}

impl Check {
    fn holds<'a>(&self, call: &CallFacts<'a>, scratch: &mut Scratch<'a, '_>) -> bool {
        let Some(v) = resolve(&self.field, call, scratch) else {
            return matches!(
                self.test,
                Test::NotEquals(_) | Test::NotContains(_) | Test::NotIn(_) | Test::NotExists
            );
        };
        match &self.test {
            Test::Equals(o) => equals(v, o),
            Test::NotEquals(o) => !equals(v, o),
            Test::Numeric(op, rhs) => Num::of_val(v)
                .and_then(|lhs| lhs.compare(*rhs))
                .is_some_and(|ord| op.accepts(ord)),
            Test::Contains(o) => contains(v, o) == Some(true),
            Test::NotContains(o) => contains(v, o) == Some(false),
            Test::StartsWith(p) => v.as_str().is_some_and(|s| s.starts_with(&**p)),
            Test::EndsWith(p) => v.as_str().is_some_and(|s| s.ends_with(&**p)),
            Test::Matches(p) => scratch.matches(p, v),
            Test::In(list) => list.iter().any(|o| equals(v, o)),
            Test::NotIn(list) => !list.iter().any(|o| equals(v, o)),
            Test::Exists => true,
            Test::NotExists => false,
        }
    }
}

/// One compiled rule.
#[derive(Debug, Clone)]
pub struct Rule {
    pub name: Arc<str>,
    pub decision: Decision,
    pub reason: Option<String>,
    /// What a person reads about a call this rule decided: its `reason`, else which rule it
    /// was. Made once, so a decision only counts a reference.
    pub explanation: Arc<str>,
    index: usize,
    action: RuleActionKind,
    matchers: Option<Box<[Matcher]>>,
    conditions: Box<[Condition]>,
}

impl Rule {
    /// Position in the `policies` array.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The action as written (`notify` and `warn` both decide [`Decision::Warn`]).
    pub fn action(&self) -> RuleActionKind {
        self.action
    }

    fn selects(&self, tool: &ToolMeta) -> bool {
        match &self.matchers {
            None => true,
            Some(ms) => ms.iter().any(|m| m.matches(tool)),
        }
    }

    fn matches_every_call(&self) -> bool {
        self.conditions.is_empty()
            && self
                .matchers
                .as_ref()
                .is_none_or(|ms| ms.iter().any(Matcher::matches_every_tool))
    }

    /// One line for `check`: name, matchers, conditions, decision.
    pub fn describe(&self) -> String {
        let mut out = format!("{}: ", self.name.escape_debug());
        match &self.matchers {
            None => out.push_str("every tool"),
            Some(ms) => {
                for (i, m) in ms.iter().enumerate() {
                    if i > 0 {
                        out.push_str(" or ");
                    }
                    let _ = write!(out, "{m}");
                }
            }
        }
        let mut written: Vec<&Condition> = self.conditions.iter().collect();
        written.sort_by_key(|c| c.pos);
        for (i, c) in written.into_iter().enumerate() {
            out.push_str(if i == 0 { " if " } else { " and " });
            let _ = write!(
                out,
                "{} {}",
                c.field_src.escape_debug(),
                c.operator.as_str()
            );
            if let Some(v) = c.value_src.as_deref().filter(|_| !c.value_ignored) {
                let _ = write!(out, " {v}");
            }
        }
        let _ = write!(out, " -> {}", self.action.as_str());
        if let Some(reason) = &self.reason {
            let _ = write!(out, " ({:?})", reason);
        }
        out
    }
}

#[derive(Debug, Clone)]
struct HotRule {
    matchers: Option<std::ops::Range<usize>>,
    conditions: std::ops::Range<usize>,
}

/// The rules that select one tool (indices into the rule list, in order), and the regex groups
/// worth searching for it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    rules: Box<[u32]>,
    /// Bit `g`: the selected rules read at least two of group `g`'s patterns.
    groups: u64,
}

/// The compiled `policies`, in order.
#[derive(Debug, Clone, Default)]
pub struct RuleSet {
    rules: Vec<Rule>,
    /// The evaluation view: `hot[i]` is `rules[i]` as ranges into two flat arrays, so that a
    /// pass over the rules reads contiguous memory.
    hot: Vec<HotRule>,
    matchers: Vec<Matcher>,
    conditions: Vec<Check>,
    /// Every distinct `args` path the conditions read.
    paths: Vec<Box<[Segment]>>,
    /// The `matches` patterns of `conditions`, by field: each group's patterns are searched
    /// together once per call, not one by one. Shared with [`RuleSet::preparer`].
    groups: Arc<[RegexGroup]>,
    /// Bit `g`: group `g` has at least two patterns (a [`Selection`] of every rule).
    all_groups: u64,
}

impl RuleSet {
    pub fn compile(raw: Vec<RawRule>) -> Result<RuleSet, RuleError> {
        let mut paths = PathTable::default();
        let rules = raw
            .into_iter()
            .enumerate()
            .map(|(i, r)| compile_rule(i, r, &mut paths))
            .collect::<Result<Vec<_>, _>>();
        pattern::release();
        let rules = rules?;
        let mut matchers = Vec::new();
        let mut conditions = Vec::new();
        let hot = rules
            .iter()
            .map(|r| {
                let m = r.matchers.as_ref().map(|ms| {
                    let start = matchers.len();
                    matchers.extend(ms.iter().cloned());
                    start..matchers.len()
                });
                let start = conditions.len();
                conditions.extend(r.conditions.iter().map(|c| c.check.clone()));
                HotRule {
                    matchers: m,
                    conditions: start..conditions.len(),
                }
            })
            .collect();
        let groups = group_patterns(&mut conditions);
        let mut set = RuleSet {
            rules,
            hot,
            matchers,
            conditions,
            paths: paths.paths,
            groups: groups.into(),
            all_groups: 0,
        };
        set.all_groups = set.searching(&set.hot);
        Ok(set)
    }

    /// What builds the regex groups' searches and the patterns' own regexes, to run on another
    /// thread (see [`crate::guard::Guard::warm_up`]): a call that needs one before it is built
    /// waits for it, and nothing is built twice.
    pub fn preparer(&self) -> impl FnOnce() + Send + 'static {
        let groups = self.groups.clone();
        let patterns: Vec<Arc<PatternRegex>> = self
            .conditions
            .iter()
            .filter_map(|c| match &c.test {
                Test::Matches(p) => Some(p.re.clone()),
                _ => None,
            })
            .collect();
        move || {
            groups.iter().for_each(RegexGroup::prepare);
            patterns.iter().for_each(|p| p.prepare());
        }
    }

    /// The groups worth searching for these rules: those they read two patterns of or more.
    fn searching<'h>(&self, rules: impl IntoIterator<Item = &'h HotRule>) -> u64 {
        let mut read = [0u64; MAX_GROUPS];
        for h in rules {
            for check in self
                .conditions
                .get(h.conditions.clone())
                .unwrap_or_default()
            {
                if let Test::Matches(p) = &check.test
                    && let Some(bits) = read.get_mut(p.group)
                {
                    *bits |= sets::bit(p.bit);
                }
            }
        }
        read.iter()
            .enumerate()
            .filter(|(_, bits)| bits.count_ones() >= 2)
            .fold(0, |acc, (g, _)| acc | 1 << g)
    }

    /// The first rule matching the call.
    pub fn evaluate<'s>(&'s self, call: &CallFacts<'_>) -> Option<&'s Rule> {
        let mut scratch = Scratch::new(call.args, self, self.all_groups);
        let tool = call.tool;
        let position = self
            .hot
            .iter()
            .position(|h| self.selects_hot(h, tool) && self.conditions_hold(h, call, &mut scratch));
        self.rules.get(position?)
    }

    /// The rules whose matchers select `tool`, in order: they depend on the tool alone, so a
    /// caller that knows the tool can work this out once and use [`RuleSet::evaluate_selected`].
    pub fn select(&self, tool: &ToolMeta) -> Selection {
        let rules: Box<[u32]> = self
            .hot
            .iter()
            .enumerate()
            .filter(|(_, h)| self.selects_hot(h, tool))
            .map(|(i, _)| i as u32)
            .collect();
        let groups = self.searching(rules.iter().filter_map(|&i| self.hot.get(i as usize)));
        Selection { rules, groups }
    }

    /// [`RuleSet::evaluate`] for a tool whose [`Selection`] is known.
    pub fn evaluate_selected<'s>(
        &'s self,
        selection: &Selection,
        call: &CallFacts<'_>,
    ) -> Option<&'s Rule> {
        let mut scratch = Scratch::new(call.args, self, selection.groups);
        let first = selection.rules.iter().find(|&&i| {
            self.hot
                .get(i as usize)
                .is_some_and(|h| self.conditions_hold(h, call, &mut scratch))
        })?;
        self.rules.get(*first as usize)
    }

    fn selects_hot(&self, h: &HotRule, tool: &ToolMeta) -> bool {
        match &h.matchers {
            None => true,
            Some(range) => self
                .matchers
                .get(range.clone())
                .unwrap_or_default()
                .iter()
                .any(|m| m.matches(tool)),
        }
    }

    fn conditions_hold<'a>(
        &self,
        h: &HotRule,
        call: &CallFacts<'a>,
        scratch: &mut Scratch<'a, '_>,
    ) -> bool {
        self.conditions
            .get(h.conditions.clone())
            .unwrap_or_default()
            .iter()
            .all(|c| c.holds(call, scratch))
    }

    /// True when, for every possible `args`, the decision for this tool is `Block`. Rules whose
    /// matchers do not select the tool are skipped; a rule whose conditions do not read `args`
    /// is decided statically; a rule that reads `args` may or may not match, so it must block and
    /// so must everything after it. When no rule decides, `fallback` does (`None`: someone else
    /// decides, so not always blocked).
    pub fn always_blocks(
        &self,
        tool: &ToolMeta,
        runtime: &Runtime,
        fallback: Option<Decision>,
    ) -> bool {
        static NO_ARGS: Json<'static> = Json::Null;
        let call = CallFacts {
            tool,
            args: &NO_ARGS,
            runtime,
        };
        let mut scratch = Scratch::new(&NO_ARGS, self, 0);
        for rule in &self.rules {
            if !rule.selects(tool) {
                continue;
            }
            // A condition that does not read `args` is known now; if one fails, the rule
            // can never match this tool.
            let static_ok = rule
                .conditions
                .iter()
                .filter(|c| !c.reads_args)
                .all(|c| c.holds(&call, &mut scratch));
            if !static_ok {
                continue;
            }
            if !rule.conditions.iter().any(|c| c.reads_args) {
                return rule.decision == Decision::Block;
            }
            if rule.decision != Decision::Block {
                return false;
            }
        }
        fallback == Some(Decision::Block)
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Human-readable warnings for `apie-mcp check`.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (i, rule) in self.rules.iter().enumerate() {
            if let Some(first) = self.rules[..i].iter().find(|r| r.name == rule.name) {
                out.push(format!(
                    "rule [{i}] {:?} has the same name as rule [{}]; audit entries cannot tell them apart",
                    rule.name, first.index
                ));
            }
            if let Some(catch_all) = self.rules[..i].iter().find(|r| r.matches_every_call()) {
                out.push(format!(
                    "rule [{i}] {:?} can never match: rule [{}] {:?} before it matches every call",
                    rule.name, catch_all.index, catch_all.name
                ));
            }
            let mut ignored: Vec<&Condition> =
                rule.conditions.iter().filter(|c| c.value_ignored).collect();
            ignored.sort_by_key(|c| c.pos);
            for c in ignored {
                out.push(format!(
                    "rule [{i}] {:?}: conditions[{}] `{}` ignores its value",
                    rule.name,
                    c.pos,
                    c.operator.as_str()
                ));
            }
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Compilation
// ---------------------------------------------------------------------------------------------

/// Interns `args` paths so that each distinct one is resolved at most once per call.
#[derive(Default)]
struct PathTable {
    ids: std::collections::HashMap<String, usize>,
    paths: Vec<Box<[Segment]>>,
}

impl PathTable {
    fn intern(&mut self, src: &str, segments: Box<[Segment]>) -> usize {
        if let Some(&id) = self.ids.get(src) {
            return id;
        }
        let id = self.paths.len();
        self.paths.push(segments);
        self.ids.insert(src.to_owned(), id);
        id
    }
}

/// Puts each `matches` pattern of `conditions` in a group with the other patterns on its field,
/// a new group when the field's is full, up to [`MAX_GROUPS`].
fn group_patterns(conditions: &mut [Check]) -> Vec<RegexGroup> {
    let mut groups: Vec<RegexGroup> = Vec::new();
    // The group of each field that still has room.
    let mut open: std::collections::HashMap<Field, usize> = std::collections::HashMap::new();
    for check in conditions {
        let Test::Matches(p) = &mut check.test else {
            continue;
        };
        let pattern = p.re.as_str();
        let joined = open
            .get(&check.field)
            .and_then(|&g| Some((g, groups.get_mut(g)?.add(pattern)?)));
        let (g, bit) = match joined {
            Some(place) => place,
            None if groups.len() < MAX_GROUPS => {
                let mut group = RegexGroup::default();
                let Some(bit) = group.add(pattern) else {
                    continue;
                };
                groups.push(group);
                open.insert(check.field.clone(), groups.len() - 1);
                (groups.len() - 1, bit)
            }
            None => continue,
        };
        p.group = g;
        p.bit = bit;
    }
    groups
}

fn compile_rule(i: usize, raw: RawRule, paths: &mut PathTable) -> Result<Rule, RuleError> {
    if raw.name.trim().is_empty() {
        return Err(rule_error(format!("[{i}].name"), "must not be empty"));
    }
    let matchers = match raw.verb_matchers {
        None => None,
        Some(list) if list.is_empty() => {
            return Err(rule_error(
                format!("[{i}].verbMatchers"),
                "an empty list can never match; leave verbMatchers out to match every tool",
            ));
        }
        Some(list) => Some(
            list.into_iter()
                .enumerate()
                .map(|(j, m)| compile_matcher(format!("[{i}].verbMatchers[{j}].value"), m))
                .collect::<Result<Box<[_]>, _>>()?,
        ),
    };
    let mut conditions = raw
        .conditions
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(j, c)| compile_condition(&format!("[{i}].conditions[{j}]"), j, c, paths))
        .collect::<Result<Vec<_>, _>>()?;
    // All-of has no side effects: test the fixed facts before walking the arguments.
    conditions.sort_by_key(|c| c.reads_args);
    let explanation = match &raw.reason {
        Some(reason) => reason.as_str().into(),
        None => format!("matched rule {:?}", raw.name).into(),
    };
    Ok(Rule {
        name: raw.name.into(),
        decision: raw.action.kind.decision(),
        reason: raw.reason,
        explanation,
        index: i,
        action: raw.action.kind,
        matchers,
        conditions: conditions.into_boxed_slice(),
    })
}

fn compile_matcher(path: String, m: RawVerbMatcher) -> Result<Matcher, RuleError> {
    if m.value.trim().is_empty() {
        return Err(rule_error(path, "must not be empty"));
    }
    Ok(match m.kind {
        MatcherKind::Verb => Matcher::Verb(Glob::new(&m.value)),
        MatcherKind::Server => Matcher::Server(Glob::new(&m.value)),
        MatcherKind::Provider => Matcher::Provider(m.value.into()),
        MatcherKind::RiskLevel => match RiskLevel::parse(&m.value) {
            Some(r) => Matcher::Risk(r),
            None => {
                return Err(rule_error(
                    path,
                    format!(
                        "unknown risk level {:?}; expected low, medium, high or critical",
                        m.value
                    ),
                ));
            }
        },
    })
}

fn parse_field(src: &str, paths: &mut PathTable) -> Result<Field, String> {
    let mut parts = src.split('.');
    let root = parts.next().unwrap_or_default();
    let rest: Vec<&str> = parts.collect();
    if root.is_empty() || rest.iter().any(|s| s.is_empty()) {
        return Err(format!("{src:?} has an empty path segment"));
    }
    let fixed = |subs: &[(&[&str], Field)], names: &str| -> Result<Field, String> {
        match rest.as_slice() {
            [sub] => subs
                .iter()
                .find(|(spellings, _)| spellings.contains(sub))
                .map(|(_, f)| f.clone())
                .ok_or_else(|| format!("unknown field {src:?}; `{root}` has {names}")),
            [] => Err(format!("`{root}` needs a sub-field: {names}")),
            _ => Err(format!(
                "unknown field {src:?}; `{root}` has {names}, which have no sub-fields"
            )),
        }
    };
    match root {
        "args" => {
            let segments = rest
                .iter()
                .map(|s| Segment {
                    key: (*s).into(),
                    index: if s.bytes().all(|b| b.is_ascii_digit()) {
                        s.parse().ok()
                    } else {
                        None
                    },
                })
                .collect();
            Ok(Field::Args(paths.intern(src, segments)))
        }
        "tool" => fixed(
            &[
                (&["name"], Field::ToolName),
                (
                    &["qualifiedName", "qualified_name"],
                    Field::ToolQualifiedName,
                ),
                (&["provider"], Field::ToolProvider),
                (&["riskLevel", "risk_level"], Field::ToolRiskLevel),
            ],
            "name, qualifiedName, provider, riskLevel",
        ),
        "action" => fixed(
            &[
                (&["type"], Field::ActionType),
                (&["name"], Field::ActionName),
            ],
            "type, name",
        ),
        "resource" => fixed(
            &[
                (&["type"], Field::ResourceType),
                (&["provider"], Field::ResourceProvider),
                (&["environment"], Field::ResourceEnvironment),
                (&["externalId", "external_id"], Field::ResourceExternalId),
            ],
            "type, provider, environment, externalId",
        ),
        "runtime" => fixed(
            &[
                (&["mode"], Field::RuntimeMode),
                (&["agentKey", "agent_key"], Field::RuntimeAgentKey),
                (&["server"], Field::RuntimeServer),
                (&["environment"], Field::RuntimeEnvironment),
                (&["runId", "run_id"], Field::RuntimeRunId),
            ],
            "mode, agentKey, server, environment, runId",
        ),
        other => Err(format!(
            "unknown root {other:?} in {src:?}; a field starts with args, tool, action, resource or runtime"
        )),
    }
}

fn compile_condition(
    path: &str,
    pos: usize,
    raw: RawCondition,
    paths: &mut PathTable,
) -> Result<Condition, RuleError> {
    let field =
        parse_field(&raw.field, paths).map_err(|m| rule_error(format!("{path}.field"), m))?;
    let value_path = || format!("{path}.value");
    let op = raw.operator;
    let needs_value = |v: Option<Value>| -> Result<Value, RuleError> {
        v.ok_or_else(|| rule_error(value_path(), format!("`{}` needs a value", op.as_str())))
    };
    let value_src = raw.value.as_ref().map(Value::to_string);
    let mut value_ignored = false;
    let test = match op {
        Operator::Equals => Test::Equals(Operand::new(needs_value(raw.value)?)),
        Operator::NotEquals => Test::NotEquals(Operand::new(needs_value(raw.value)?)),
        Operator::Contains => Test::Contains(Operand::new(needs_value(raw.value)?)),
        Operator::NotContains => Test::NotContains(Operand::new(needs_value(raw.value)?)),
        Operator::Greater | Operator::GreaterOrEqual | Operator::Less | Operator::LessOrEqual => {
            let v = needs_value(raw.value)?;
            let n = Num::of_json(&Json::from(&v)).ok_or_else(|| {
                rule_error(
                    value_path(),
                    format!(
                        "`{}` needs a number or a numeric string, not {v}",
                        op.as_str()
                    ),
                )
            })?;
            let num_op = match op {
                Operator::Greater => NumOp::Greater,
                Operator::GreaterOrEqual => NumOp::GreaterOrEqual,
                Operator::Less => NumOp::Less,
                _ => NumOp::LessOrEqual,
            };
            Test::Numeric(num_op, n)
        }
        Operator::StartsWith | Operator::EndsWith => match needs_value(raw.value)? {
            Value::String(s) if op == Operator::StartsWith => Test::StartsWith(s.into()),
            Value::String(s) => Test::EndsWith(s.into()),
            other => {
                return Err(rule_error(
                    value_path(),
                    format!("`{}` needs a string, not {other}", op.as_str()),
                ));
            }
        },
        Operator::Matches => match needs_value(raw.value)? {
            Value::String(s) => Test::Matches(Pattern {
                re: Arc::new(PatternRegex::new(&s).map_err(|e| {
                    rule_error(value_path(), format!("invalid regular expression: {e}"))
                })?),
                group: NO_GROUP,
                bit: 0,
            }),
            other => {
                return Err(rule_error(
                    value_path(),
                    format!("`matches` needs a regular expression string, not {other}"),
                ));
            }
        },
        Operator::In | Operator::NotIn => match needs_value(raw.value)? {
            Value::Array(items) => {
                let list: Box<[Operand]> = items.into_iter().map(Operand::new).collect();
                if op == Operator::In {
                    Test::In(list)
                } else {
                    Test::NotIn(list)
                }
            }
            other => {
                return Err(rule_error(
                    value_path(),
                    format!("`{}` needs an array, not {other}", op.as_str()),
                ));
            }
        },
        Operator::Exists | Operator::NotExists => {
            value_ignored = raw.value.is_some();
            if op == Operator::Exists {
                Test::Exists
            } else {
                Test::NotExists
            }
        }
    };
    Ok(Condition {
        pos,
        reads_args: matches!(field, Field::Args(_)),
        check: Check { field, test },
        operator: op,
        field_src: raw.field,
        value_src,
        value_ignored,
    })
}
