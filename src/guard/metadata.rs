//! Tool metadata and risk (SPEC §4.1).
//!
//! This module owns everything the guard knows about a tool before looking at a call's
//! arguments: the [`RiskLevel`] vocabulary, the `tools` declarations of `apie.mcp.json`
//! ([`RawToolDecl`]), the name-inference table of the Apie proxy, the annotations learned from
//! `tools/list` results ([`ListedTool`]), and the [`ToolCatalog`] that combines them into one
//! [`ToolMeta`] per call. It also owns the `*`/`?` [`Glob`] matcher shared with the rule engine.
//!
//! Precedence: the first declared entry matching the tool (an exact-name entry before any glob
//! entry) wins for every field it declares, and a declared `riskLevel` is final. Fields it does
//! not declare come from the inference table (first matching row; default `execute` /
//! `internal_api` / `medium`), and the risk is the higher of the inferred risk and the
//! annotation risk (`readOnlyHint: true` → low, `destructiveHint: true` → high).

use std::collections::HashMap;
use std::fmt;
use std::sync::LazyLock;

use regex::RegexSet;
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};

// ---------------------------------------------------------------------------------------------
// Risk levels
// ---------------------------------------------------------------------------------------------

/// How dangerous a tool is, in increasing order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RiskLevel {
    Low,
    Medium,
    High,
    Critical,
}

const RISK_NAMES: &[&str] = &["low", "medium", "high", "critical"];

impl RiskLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            RiskLevel::Low => "low",
            RiskLevel::Medium => "medium",
            RiskLevel::High => "high",
            RiskLevel::Critical => "critical",
        }
    }

    /// Parses a risk level name, ASCII case-insensitively (`"HIGH"` is `High`).
    pub fn parse(s: &str) -> Option<RiskLevel> {
        [
            RiskLevel::Low,
            RiskLevel::Medium,
            RiskLevel::High,
            RiskLevel::Critical,
        ]
        .into_iter()
        .find(|r| r.as_str().eq_ignore_ascii_case(s))
    }
}

impl fmt::Display for RiskLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for RiskLevel {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct RiskVisitor;
        impl Visitor<'_> for RiskVisitor {
            type Value = RiskLevel;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("one of `low`, `medium`, `high`, `critical`")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RiskLevel, E> {
                RiskLevel::parse(v).ok_or_else(|| E::unknown_variant(v, RISK_NAMES))
            }
        }
        deserializer.deserialize_str(RiskVisitor)
    }
}

// ---------------------------------------------------------------------------------------------
// Globs
// ---------------------------------------------------------------------------------------------

/// A `*`/`?` wildcard pattern, matched ASCII case-insensitively. `*` matches any run of
/// characters (including none), `?` exactly one character; every other character is literal.
#[derive(Clone, Debug)]
pub struct Glob {
    source: Box<str>,
    kind: GlobKind,
    /// Cheap rejections checked before `kind`: the fewest bytes a match has, and the (lowercase)
    /// first and last bytes when the pattern starts or ends with a literal.
    min_len: usize,
    head: Option<u8>,
    tail: Option<u8>,
    has_dot: bool,
}

#[derive(Clone, Debug)]
enum GlobKind {
    /// No wildcard at all.
    Literal(Box<[u8]>),
    /// `*` alone (or only stars).
    Any,
    /// `lit*`
    Prefix(Box<[u8]>),
    /// `*lit`
    Suffix(Box<[u8]>),
    /// `*lit*`
    Contains(Box<[u8]>),
    /// Anything else: the general backtracking matcher.
    General(Box<[u8]>),
}

impl Glob {
    pub fn new(pattern: &str) -> Glob {
        // Stored ASCII-lowercased; the text is lowercased byte by byte while matching.
        let lowered = pattern.to_ascii_lowercase();
        let bytes = lowered.as_bytes();
        let is_wild = |b: &u8| *b == b'*' || *b == b'?';
        let kind = if !bytes.iter().any(is_wild) {
            GlobKind::Literal(bytes.into())
        } else if bytes.contains(&b'?') {
            GlobKind::General(bytes.into())
        } else if bytes.iter().all(|b| *b == b'*') {
            GlobKind::Any
        } else {
            let inner_start = bytes.iter().take_while(|b| **b == b'*').count();
            let inner_end = bytes.len() - bytes.iter().rev().take_while(|b| **b == b'*').count();
            let inner = &bytes[inner_start..inner_end];
            if inner.contains(&b'*') {
                GlobKind::General(bytes.into())
            } else {
                match (inner_start > 0, inner_end < bytes.len()) {
                    (false, true) => GlobKind::Prefix(inner.into()),
                    (true, false) => GlobKind::Suffix(inner.into()),
                    (true, true) => GlobKind::Contains(inner.into()),
                    // Unreachable (there is a star and none is inside), kept total.
                    (false, false) => GlobKind::General(bytes.into()),
                }
            }
        };
        let literal_byte = |b: Option<&u8>| b.copied().filter(|b| !is_wild(b));
        Glob {
            source: pattern.into(),
            kind,
            min_len: bytes.iter().filter(|b| **b != b'*').count(),
            head: literal_byte(bytes.first()),
            tail: literal_byte(bytes.last()),
            has_dot: bytes.contains(&b'.'),
        }
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// True when the pattern is only stars: it matches every name.
    pub fn matches_everything(&self) -> bool {
        matches!(self.kind, GlobKind::Any)
    }

    /// True when the pattern has no wildcard (it names exactly one tool).
    pub fn is_literal(&self) -> bool {
        matches!(self.kind, GlobKind::Literal(_))
    }

    #[inline]
    pub fn is_match(&self, text: &str) -> bool {
        let t = text.as_bytes();
        if t.len() < self.min_len
            || self
                .head
                .is_some_and(|h| t.first().map(u8::to_ascii_lowercase) != Some(h))
            || self
                .tail
                .is_some_and(|z| t.last().map(u8::to_ascii_lowercase) != Some(z))
        {
            return false;
        }
        self.match_kind(t)
    }

    /// Whether the glob matches a tool's bare `name` or its `qualified` name, which is
    /// `<server>.<name>` (as [`ToolCatalog::describe`] builds it; when the lengths say otherwise,
    /// `qualified` is matched as it is). A pattern without a dot or `?` cannot span the dot, so
    /// against the qualified name it can only match inside the server part (the name part was
    /// tested already): literals and suffixes never, prefixes and infixes in the shorter server.
    #[inline]
    pub fn matches_tool(&self, name: &str, server: &str, qualified: &str) -> bool {
        if self.is_match(name) {
            return true;
        }
        let split = !self.has_dot && qualified.len() == server.len() + 1 + name.len();
        match self.kind {
            GlobKind::Literal(_) | GlobKind::Suffix(_) if split => false,
            GlobKind::Prefix(_) | GlobKind::Contains(_) if split => self.is_match(server),
            GlobKind::Any => true,
            _ => self.is_match(qualified),
        }
    }

    fn match_kind(&self, t: &[u8]) -> bool {
        match &self.kind {
            GlobKind::Literal(l) => eq_lower(t, l),
            GlobKind::Any => true,
            GlobKind::Prefix(p) => t.get(..p.len()).is_some_and(|head| eq_lower(head, p)),
            GlobKind::Suffix(s) => t
                .len()
                .checked_sub(s.len())
                .is_some_and(|start| eq_lower(&t[start..], s)),
            GlobKind::Contains(c) => contains_ignore_ascii_case(t, c),
            GlobKind::General(p) => wildcard_match(p, t),
        }
    }
}

impl fmt::Display for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

/// `text` equals `lower` (already ASCII-lowercase), ignoring ASCII case.
fn eq_lower(text: &[u8], lower: &[u8]) -> bool {
    text.len() == lower.len()
        && text
            .iter()
            .zip(lower)
            .all(|(t, l)| t.to_ascii_lowercase() == *l)
}

/// `haystack` contains `needle` (already ASCII-lowercase), ignoring ASCII case.
fn contains_ignore_ascii_case(haystack: &[u8], needle: &[u8]) -> bool {
    let Some((&first, rest)) = needle.split_first() else {
        return true;
    };
    let Some(last_start) = haystack.len().checked_sub(needle.len()) else {
        return false;
    };
    haystack[..=last_start].iter().enumerate().any(|(i, b)| {
        b.to_ascii_lowercase() == first && eq_lower(&haystack[i + 1..i + needle.len()], rest)
    })
}

/// Length of the UTF-8 sequence starting with `lead` (1 for anything unexpected).
fn utf8_len(lead: u8) -> usize {
    match lead {
        0xF0..=0xFF => 4,
        0xE0..=0xEF => 3,
        0xC0..=0xDF => 2,
        _ => 1,
    }
}

/// Iterative `*`/`?` matcher with single-star backtracking; linear in practice, O(p·t) at worst.
/// `pattern` is ASCII-lowercase; `text` is valid UTF-8, so `?` and star backtracking step over
/// whole characters.
fn wildcard_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut pi, mut ti) = (0usize, 0usize);
    // (pattern index just after the last star, text index that star currently stops at)
    let mut star: Option<(usize, usize)> = None;
    while ti < text.len() {
        if let Some(&pc) = pattern.get(pi) {
            if pc == b'*' {
                pi += 1;
                star = Some((pi, ti));
                continue;
            }
            if pc == b'?' {
                pi += 1;
                ti = (ti + utf8_len(text[ti])).min(text.len());
                continue;
            }
            if pc == text[ti].to_ascii_lowercase() {
                pi += 1;
                ti += 1;
                continue;
            }
        }
        match star {
            Some((sp, st)) => {
                let next = (st + utf8_len(text[st])).min(text.len());
                star = Some((sp, next));
                pi = sp;
                ti = next;
            }
            None => return false,
        }
    }
    pattern[pi.min(pattern.len())..].iter().all(|&b| b == b'*')
}

// ---------------------------------------------------------------------------------------------
// Declarations as written
// ---------------------------------------------------------------------------------------------

/// One `tools` entry of apie.mcp.json, as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawToolDecl {
    pub risk_level: Option<RiskLevel>,
    pub provider: Option<String>,
    pub action: Option<RawActionDecl>,
    pub resource: Option<RawResourceDecl>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawActionDecl {
    #[serde(rename = "type")]
    pub kind: String,
    pub name: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawResourceDecl {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub environment: Option<String>,
    pub external_id: Option<String>,
}

/// A `tools` entry that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct MetadataError {
    /// The entry's key as written in the `tools` map.
    pub key: String,
    /// Path relative to the `tools` map, e.g. `["db.*"].action.type`.
    pub path: String,
    pub message: String,
}

// ---------------------------------------------------------------------------------------------
// What the upstream said
// ---------------------------------------------------------------------------------------------

/// What a `tools/list` result said about one tool.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ListedTool {
    pub name: String,
    #[serde(default)]
    pub annotations: Option<ToolAnnotations>,
}

/// The annotations the guard uses; other keys are ignored, and a hint that is not a boolean
/// counts as absent (an odd upstream must not make its whole tool list unreadable).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ToolAnnotations {
    #[serde(default, deserialize_with = "lenient_bool")]
    pub read_only_hint: Option<bool>,
    #[serde(default, deserialize_with = "lenient_bool")]
    pub destructive_hint: Option<bool>,
}

fn lenient_bool<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<bool>, D::Error> {
    let value = serde_json::Value::deserialize(deserializer)?;
    Ok(value.as_bool())
}

impl ToolAnnotations {
    /// The risk these annotations imply on their own, if any.
    fn risk(&self) -> Option<RiskLevel> {
        if self.destructive_hint == Some(true) {
            Some(RiskLevel::High)
        } else if self.read_only_hint == Some(true) {
            Some(RiskLevel::Low)
        } else {
            None
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Per-call facts
// ---------------------------------------------------------------------------------------------

/// Per-call facts about a tool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolMeta {
    /// The bare MCP tool name.
    pub name: String,
    /// `<serverName>.<name>`.
    pub qualified: String,
    /// Declared provider, else `mcp`.
    pub provider: String,
    pub risk: RiskLevel,
    pub action_type: String,
    /// Declared action name, else `qualified`.
    pub action_name: String,
    pub resource_type: String,
    /// The server name.
    pub resource_provider: String,
    /// Declared resource environment, else the config's `environment`.
    pub resource_environment: Option<String>,
    pub resource_external_id: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// The inference table (APIE-WIRE §1.4, the proxy's ordered table)
// ---------------------------------------------------------------------------------------------

struct InferRow {
    pattern: &'static str,
    action: &'static str,
    resource: &'static str,
    risk: RiskLevel,
}

const INFER_ROWS: [InferRow; 10] = [
    InferRow {
        pattern: r"deploy",
        action: "execute",
        resource: "deployment_event",
        risk: RiskLevel::Critical,
    },
    InferRow {
        pattern: r"pipeline",
        action: "execute",
        resource: "pipeline_run",
        risk: RiskLevel::High,
    },
    InferRow {
        pattern: r"secret",
        action: "read",
        resource: "secret",
        risk: RiskLevel::Critical,
    },
    InferRow {
        pattern: r"delete",
        action: "delete",
        resource: "unknown",
        risk: RiskLevel::High,
    },
    InferRow {
        pattern: r"send|message|email|slack|notify",
        action: "communicate",
        resource: "communication_event",
        risk: RiskLevel::Medium,
    },
    InferRow {
        pattern: r"ticket|issue",
        action: "read",
        resource: "work_item",
        risk: RiskLevel::Medium,
    },
    InferRow {
        pattern: r"change_request|pull_request|\bpr\b",
        action: "create",
        resource: "change_request",
        risk: RiskLevel::Medium,
    },
    InferRow {
        pattern: r"incident",
        action: "read",
        resource: "incident_signal",
        risk: RiskLevel::Medium,
    },
    InferRow {
        pattern: r"execute|run|trigger",
        action: "execute",
        resource: "internal_api",
        risk: RiskLevel::High,
    },
    InferRow {
        pattern: r"admin",
        action: "execute",
        resource: "internal_api",
        risk: RiskLevel::Critical,
    },
];

const DEFAULT_ROW: InferRow = InferRow {
    pattern: "",
    action: "execute",
    resource: "internal_api",
    risk: RiskLevel::Medium,
};

/// All rows in one set; the lowest matching index is the first matching row. The patterns are
/// constants covered by a test, so the empty fallback never happens in practice.
static INFER_SET: LazyLock<RegexSet> = LazyLock::new(|| {
    RegexSet::new(INFER_ROWS.iter().map(|r| format!("(?i:{})", r.pattern)))
        .unwrap_or_else(|_| RegexSet::empty())
});

/// Compiles the inference table now (see [`crate::guard::Guard::warm_up`]); a call that comes sooner
/// waits for the rest of the compilation.
pub fn prepare() {
    LazyLock::force(&INFER_SET);
}

fn infer(qualified: &str) -> &'static InferRow {
    INFER_SET
        .matches(qualified)
        .iter()
        .next()
        .and_then(|i| INFER_ROWS.get(i))
        .unwrap_or(&DEFAULT_ROW)
}

// ---------------------------------------------------------------------------------------------
// The catalog
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Declared {
    glob: Glob,
    risk: Option<RiskLevel>,
    provider: Option<String>,
    action_type: Option<String>,
    action_name: Option<String>,
    resource_type: Option<String>,
    resource_environment: Option<String>,
    resource_external_id: Option<String>,
}

/// Everything known about the tools of one server: declarations, inference and annotations.
#[derive(Debug, Clone)]
pub struct ToolCatalog {
    server_name: String,
    environment: Option<String>,
    declared: Vec<Declared>,
    /// Annotation risk per bare tool name, learned from `tools/list` results.
    annotated: HashMap<String, RiskLevel>,
}

fn non_empty(
    key: &str,
    field: &str,
    value: Option<String>,
) -> Result<Option<String>, MetadataError> {
    match value {
        Some(v) if v.trim().is_empty() => Err(MetadataError {
            key: key.to_owned(),
            path: format!("[{key:?}].{field}"),
            message: "must not be empty".to_owned(),
        }),
        other => Ok(other),
    }
}

impl ToolCatalog {
    /// `decls`: the `tools` map in file order. Keys are tool names or `*`/`?` globs, matched
    /// against the bare name and the qualified name. Invalid entries are an error naming the key.
    pub fn new(
        server_name: &str,
        environment: Option<&str>,
        decls: Vec<(String, RawToolDecl)>,
    ) -> Result<ToolCatalog, MetadataError> {
        let mut declared = Vec::with_capacity(decls.len());
        for (key, decl) in decls {
            if key.trim().is_empty() {
                return Err(MetadataError {
                    path: format!("[{key:?}]"),
                    key,
                    message: "a tool name or glob must not be empty".to_owned(),
                });
            }
            let provider = non_empty(&key, "provider", decl.provider)?;
            let (action_type, action_name) = match decl.action {
                Some(a) => (
                    non_empty(&key, "action.type", Some(a.kind))?,
                    non_empty(&key, "action.name", a.name)?,
                ),
                None => (None, None),
            };
            let (resource_type, resource_environment, resource_external_id) = match decl.resource {
                Some(r) => (
                    non_empty(&key, "resource.type", r.kind)?,
                    non_empty(&key, "resource.environment", r.environment)?,
                    non_empty(&key, "resource.externalId", r.external_id)?,
                ),
                None => (None, None, None),
            };
            declared.push(Declared {
                glob: Glob::new(&key),
                risk: decl.risk_level,
                provider,
                action_type,
                action_name,
                resource_type,
                resource_environment,
                resource_external_id,
            });
        }
        Ok(ToolCatalog {
            server_name: server_name.to_owned(),
            environment: environment.map(str::to_owned),
            declared,
            annotated: HashMap::new(),
        })
    }

    pub fn server_name(&self) -> &str {
        &self.server_name
    }

    /// The first declared entry naming the tool exactly, else the first glob entry matching it.
    fn declaration(&self, name: &str, qualified: &str) -> Option<&Declared> {
        let mut first_glob = None;
        for d in &self.declared {
            let literal = d.glob.is_literal();
            if !literal && first_glob.is_some() {
                continue;
            }
            if d.glob.matches_tool(name, &self.server_name, qualified) {
                if literal {
                    return Some(d);
                }
                first_glob = Some(d);
            }
        }
        first_glob
    }

    /// The facts about one call of `tool` (its bare MCP name).
    pub fn describe(&self, tool: &str) -> ToolMeta {
        let qualified = format!("{}.{}", self.server_name, tool);
        let row = infer(&qualified);
        let decl = self.declaration(tool, &qualified);
        let risk = match decl.and_then(|d| d.risk) {
            Some(declared) => declared,
            None => match self.annotated.get(tool) {
                Some(&annotated) => row.risk.max(annotated),
                None => row.risk,
            },
        };
        let pick = |declared: Option<&Option<String>>, inferred: &str| -> String {
            match declared {
                Some(Some(v)) => v.clone(),
                _ => inferred.to_owned(),
            }
        };
        ToolMeta {
            name: tool.to_owned(),
            provider: pick(decl.map(|d| &d.provider), "mcp"),
            risk,
            action_type: pick(decl.map(|d| &d.action_type), row.action),
            action_name: pick(decl.map(|d| &d.action_name), &qualified),
            resource_type: pick(decl.map(|d| &d.resource_type), row.resource),
            resource_provider: self.server_name.clone(),
            resource_environment: decl
                .and_then(|d| d.resource_environment.clone())
                .or_else(|| self.environment.clone()),
            resource_external_id: decl.and_then(|d| d.resource_external_id.clone()),
            qualified,
        }
    }

    /// Merges the annotations of one `tools/list` result page; pages accumulate, and a tool
    /// listed twice keeps the higher annotation risk.
    pub fn learn(&mut self, tools: &[ListedTool]) {
        for t in tools {
            let Some(risk) = t.annotations.as_ref().and_then(ToolAnnotations::risk) else {
                continue;
            };
            match self.annotated.get_mut(t.name.as_str()) {
                Some(known) => *known = (*known).max(risk),
                None => {
                    self.annotated.insert(t.name.clone(), risk);
                }
            }
        }
    }

    /// Forgets every learned annotation (`notifications/tools/list_changed`).
    pub fn forget(&mut self) {
        self.annotated.clear();
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A catalog for server `srv` in `production`, from `(key, decl)` pairs in file order.
    fn catalog(decls: &[(&str, serde_json::Value)]) -> ToolCatalog {
        let decls = decls
            .iter()
            .map(|(k, v)| {
                (
                    (*k).to_owned(),
                    serde_json::from_value(v.clone()).expect("decl"),
                )
            })
            .collect();
        ToolCatalog::new("srv", Some("production"), decls).expect("valid catalog")
    }

    fn listed(name: &str, ro: Option<bool>, destructive: Option<bool>) -> ListedTool {
        ListedTool {
            name: name.to_owned(),
            annotations: Some(ToolAnnotations {
                read_only_hint: ro,
                destructive_hint: destructive,
            }),
        }
    }

    // ----- risk levels -----

    #[test]
    fn risk_parse_and_order() {
        assert_eq!(RiskLevel::parse("HIGH"), Some(RiskLevel::High));
        assert_eq!(RiskLevel::parse("Critical"), Some(RiskLevel::Critical));
        assert_eq!(RiskLevel::parse("low"), Some(RiskLevel::Low));
        assert_eq!(RiskLevel::parse("severe"), None);
        assert_eq!(RiskLevel::parse(""), None);
        assert!(RiskLevel::Low < RiskLevel::Medium);
        assert!(RiskLevel::High < RiskLevel::Critical);
        assert_eq!(RiskLevel::Medium.as_str(), "medium");
        assert_eq!(
            serde_json::to_value(RiskLevel::Critical).unwrap(),
            json!("critical")
        );
    }

    #[test]
    fn risk_deserialize_any_case_and_error_lists_values() {
        let r: RiskLevel = serde_json::from_value(json!("MeDiUm")).unwrap();
        assert_eq!(r, RiskLevel::Medium);
        let err = serde_json::from_value::<RiskLevel>(json!("huge"))
            .unwrap_err()
            .to_string();
        for name in ["low", "medium", "high", "critical", "huge"] {
            assert!(err.contains(name), "{err}");
        }
        assert!(serde_json::from_value::<RiskLevel>(json!(3)).is_err());
    }

    // ----- globs -----

    #[test]
    fn glob_literal_and_classes() {
        assert!(Glob::new("read_file").is_match("READ_FILE"));
        assert!(!Glob::new("read_file").is_match("read_files"));
        assert!(Glob::new("*").is_match(""));
        assert!(Glob::new("**").is_match("anything"));
        assert!(Glob::new("stripe:*").is_match("stripe:create_charge"));
        assert!(Glob::new("stripe:*").is_match("stripe:"));
        assert!(!Glob::new("stripe:*").is_match("stripe"));
        assert!(Glob::new("*delete*").is_match("bulk_DELETE_rows"));
        assert!(Glob::new("*delete*").is_match("delete"));
        assert!(!Glob::new("*delete*").is_match("delet"));
        assert!(Glob::new("*_file").is_match("read_file"));
        assert!(!Glob::new("*_file").is_match("read_files"));
        assert!(Glob::new("filesystem.read_*").is_match("filesystem.read_text_file"));
        assert!(!Glob::new("filesystem.read_*").is_match("filesystem.write_file"));
    }

    #[test]
    fn glob_general_backtracking() {
        assert!(Glob::new("a*b*c").is_match("axxbyyc"));
        assert!(Glob::new("a*b*c").is_match("abc"));
        assert!(!Glob::new("a*b*c").is_match("axxbyy"));
        assert!(Glob::new("*a*a*a").is_match("aaaa"));
        assert!(!Glob::new("*a*a*a*b").is_match("aaaaaaaaaaaaaaaaaaaaaaaa"));
        assert!(Glob::new("?").is_match("x"));
        assert!(!Glob::new("?").is_match(""));
        assert!(!Glob::new("?").is_match("xy"));
        assert!(Glob::new("get_?").is_match("get_x"));
        assert!(Glob::new("?*").is_match("x"));
        assert!(!Glob::new("?*").is_match(""));
        assert!(Glob::new("a?c*").is_match("abcdef"));
        assert!(Glob::new("*.?").is_match("srv.x"));
        // `?` is one character, not one byte.
        assert!(Glob::new("caf?").is_match("café"));
        assert!(Glob::new("?af*").is_match("éaf"));
        assert!(!Glob::new("caf??").is_match("café"));
        assert!(Glob::new("*é*x").is_match("aébéx"));
        assert!(!Glob::new("").is_match("x"));
        assert!(Glob::new("").is_match(""));
    }

    /// Straightforward recursive reference for `*`/`?` globs over chars, ASCII case-insensitive.
    fn reference(p: &[char], t: &[char]) -> bool {
        match p.split_first() {
            None => t.is_empty(),
            Some(('*', rest)) => (0..=t.len()).any(|i| reference(rest, &t[i..])),
            Some(('?', rest)) => !t.is_empty() && reference(rest, &t[1..]),
            Some((c, rest)) => {
                t.first().is_some_and(|x| x.eq_ignore_ascii_case(c)) && reference(rest, &t[1..])
            }
        }
    }

    /// Every string of length 0..=max over `alphabet`.
    fn strings(alphabet: &[char], max: usize) -> Vec<String> {
        let mut out = vec![String::new()];
        let mut layer = vec![String::new()];
        for _ in 0..max {
            layer = layer
                .iter()
                .flat_map(|s| alphabet.iter().map(move |c| format!("{s}{c}")))
                .collect();
            out.extend(layer.iter().cloned());
        }
        out
    }

    #[test]
    fn glob_agrees_with_reference_exhaustively() {
        let patterns = strings(&['a', 'B', '*', '?', 'é'], 4);
        let texts = strings(&['a', 'A', 'b', 'é'], 5);
        for p in &patterns {
            let g = Glob::new(p);
            let pc: Vec<char> = p.chars().collect();
            for t in &texts {
                let tc: Vec<char> = t.chars().collect();
                assert_eq!(g.is_match(t), reference(&pc, &tc), "{p:?} vs {t:?}");
            }
        }
    }

    #[test]
    fn matches_tool_agrees_with_matching_both_names() {
        let patterns = [
            "read_file",
            "READ*",
            "*file",
            "*_fi*",
            "srv*",
            "*rv*",
            "sr",
            "*v.r*",
            "srv.read_file",
            "s?v*",
            "*",
            "?",
            "*.*",
            "*e",
            "srv.*",
            "*srv.read*",
            "r*d_f*e",
            "*ead_",
            "fs*",
        ];
        for (server, name) in [
            ("srv", "read_file"),
            ("SRV", "Read_File"),
            ("fs", "srv"),
            ("a.b", "c.d"),
            ("srv", ""),
            ("", "x"),
            ("café", "é"),
        ] {
            let qualified = format!("{server}.{name}");
            for p in patterns {
                let g = Glob::new(p);
                assert_eq!(
                    g.matches_tool(name, server, &qualified),
                    g.is_match(name) || g.is_match(&qualified),
                    "{p} vs {qualified}"
                );
            }
        }
    }

    // ----- inference table -----

    fn inferred(tool: &str) -> (String, String, RiskLevel) {
        let m = ToolCatalog::new("srv", None, vec![])
            .unwrap()
            .describe(tool);
        (m.action_type, m.resource_type, m.risk)
    }

    fn row(a: &str, r: &str, risk: RiskLevel) -> (String, String, RiskLevel) {
        (a.to_owned(), r.to_owned(), risk)
    }

    #[test]
    fn inference_table_compiles() {
        assert_eq!(INFER_SET.len(), INFER_ROWS.len());
    }

    #[test]
    fn inference_rows() {
        use RiskLevel::*;
        assert_eq!(
            inferred("deploy_app"),
            row("execute", "deployment_event", Critical)
        );
        assert_eq!(
            inferred("run_pipeline"),
            row("execute", "pipeline_run", High)
        );
        assert_eq!(inferred("get_secret"), row("read", "secret", Critical));
        assert_eq!(inferred("delete_file"), row("delete", "unknown", High));
        assert_eq!(
            inferred("post_message"),
            row("communicate", "communication_event", Medium)
        );
        assert_eq!(
            inferred("SlackPost"),
            row("communicate", "communication_event", Medium)
        );
        assert_eq!(inferred("list_issues"), row("read", "work_item", Medium));
        assert_eq!(
            inferred("create_pull_request"),
            row("create", "change_request", Medium)
        );
        assert_eq!(inferred("pr"), row("create", "change_request", Medium));
        assert_eq!(inferred("open-pr"), row("create", "change_request", Medium));
        assert_eq!(
            inferred("get_incident"),
            row("read", "incident_signal", Medium)
        );
        assert_eq!(
            inferred("trigger_job"),
            row("execute", "internal_api", High)
        );
        assert_eq!(
            inferred("admin_panel"),
            row("execute", "internal_api", Critical)
        );
        assert_eq!(
            inferred("read_file"),
            row("execute", "internal_api", Medium)
        );
    }

    #[test]
    fn inference_first_row_wins_and_word_boundaries() {
        use RiskLevel::*;
        // deploy (row 1) before delete (row 4).
        assert_eq!(
            inferred("delete_deployment"),
            row("execute", "deployment_event", Critical)
        );
        // delete (row 4) before admin (row 10): first row wins, not the highest risk.
        assert_eq!(inferred("admin_delete"), row("delete", "unknown", High));
        // `\bpr\b` does not match inside "prune" (but `run` does, row 9).
        assert_eq!(inferred("prune"), row("execute", "internal_api", High));
        // `_` is a word character: no boundary in "create_pr".
        assert_eq!(
            inferred("create_pr"),
            row("execute", "internal_api", Medium)
        );
        assert_eq!(inferred("express"), row("execute", "internal_api", Medium));
        // Case-insensitive.
        assert_eq!(
            inferred("DEPLOY"),
            row("execute", "deployment_event", Critical)
        );
    }

    #[test]
    fn inference_applies_to_the_qualified_name() {
        let c = ToolCatalog::new("deploy-bot", None, vec![]).unwrap();
        let m = c.describe("read_file");
        assert_eq!(m.resource_type, "deployment_event");
        assert_eq!(m.risk, RiskLevel::Critical);
        // "srv.pr": the dot is a word boundary.
        assert_eq!(inferred("pr").1, "change_request");
    }

    #[test]
    fn defaults_of_a_described_tool() {
        let c = ToolCatalog::new("fs", Some("staging"), vec![]).unwrap();
        let m = c.describe("read_file");
        assert_eq!(
            m,
            ToolMeta {
                name: "read_file".into(),
                qualified: "fs.read_file".into(),
                provider: "mcp".into(),
                risk: RiskLevel::Medium,
                action_type: "execute".into(),
                action_name: "fs.read_file".into(),
                resource_type: "internal_api".into(),
                resource_provider: "fs".into(),
                resource_environment: Some("staging".into()),
                resource_external_id: None,
            }
        );
        assert_eq!(c.server_name(), "fs");
    }

    // ----- declarations -----

    #[test]
    fn declared_entry_wins_field_by_field() {
        let c = catalog(&[(
            "deploy_app",
            json!({
                "riskLevel": "low",
                "provider": "vercel",
                "action": {"type": "create"},
                "resource": {"environment": "preview", "externalId": "prj_1"}
            }),
        )]);
        let m = c.describe("deploy_app");
        assert_eq!(m.risk, RiskLevel::Low);
        assert_eq!(m.provider, "vercel");
        assert_eq!(m.action_type, "create");
        assert_eq!(m.action_name, "srv.deploy_app");
        // resource.type not declared: inferred.
        assert_eq!(m.resource_type, "deployment_event");
        assert_eq!(m.resource_environment.as_deref(), Some("preview"));
        assert_eq!(m.resource_external_id.as_deref(), Some("prj_1"));
        assert_eq!(m.resource_provider, "srv");
    }

    #[test]
    fn declared_risk_is_final_over_annotations() {
        let mut c = catalog(&[("wipe", json!({"riskLevel": "low"}))]);
        c.learn(&[listed("wipe", None, Some(true))]);
        assert_eq!(c.describe("wipe").risk, RiskLevel::Low);
    }

    #[test]
    fn declared_provider_only_leaves_risk_to_inference_and_annotations() {
        let mut c = catalog(&[("read_file", json!({"provider": "local"}))]);
        assert_eq!(c.describe("read_file").risk, RiskLevel::Medium);
        c.learn(&[listed("read_file", None, Some(true))]);
        let m = c.describe("read_file");
        assert_eq!(m.risk, RiskLevel::High);
        assert_eq!(m.provider, "local");
        assert_eq!(m.action_type, "execute");
    }

    #[test]
    fn exact_entry_beats_earlier_glob_and_first_glob_wins() {
        let c = catalog(&[
            ("*file*", json!({"riskLevel": "high"})),
            ("*read*", json!({"riskLevel": "critical"})),
            ("srv.read_file", json!({"riskLevel": "low"})),
            ("read_file", json!({"riskLevel": "medium"})),
        ]);
        // Exact entries win over globs; the first exact one in file order.
        assert_eq!(c.describe("read_file").risk, RiskLevel::Low);
        // Only globs match: the first in file order.
        assert_eq!(c.describe("read_files").risk, RiskLevel::High);
        assert_eq!(c.describe("readme").risk, RiskLevel::Critical);
        // Nothing matches: inference.
        assert_eq!(c.describe("list").risk, RiskLevel::Medium);
    }

    #[test]
    fn glob_entries_match_the_qualified_name() {
        let c = catalog(&[(
            "srv.*",
            json!({"action": {"type": "read", "name": "custom"}}),
        )]);
        let m = c.describe("anything");
        assert_eq!(m.action_type, "read");
        assert_eq!(m.action_name, "custom");
        let other = ToolCatalog::new("other", None, vec![]).unwrap();
        assert_eq!(other.describe("anything").action_type, "execute");
    }

    #[test]
    fn invalid_entries_name_the_key() {
        let decl = |v: serde_json::Value| -> RawToolDecl { serde_json::from_value(v).unwrap() };
        let err = ToolCatalog::new(
            "s",
            None,
            vec![("x".into(), decl(json!({"action": {"type": " "}})))],
        )
        .unwrap_err();
        assert_eq!(err.key, "x");
        assert_eq!(err.path, "[\"x\"].action.type");
        let err = ToolCatalog::new("s", None, vec![("".into(), decl(json!({})))]).unwrap_err();
        assert_eq!(err.key, "");
        let err = ToolCatalog::new(
            "s",
            None,
            vec![("y".into(), decl(json!({"resource": {"environment": ""}})))],
        )
        .unwrap_err();
        assert!(err.to_string().contains("resource.environment"), "{err}");
    }

    #[test]
    fn raw_decl_rejects_unknown_keys_and_bad_risk() {
        assert!(serde_json::from_value::<RawToolDecl>(json!({"risk": "low"})).is_err());
        assert!(serde_json::from_value::<RawToolDecl>(json!({"riskLevel": "nope"})).is_err());
        assert!(
            serde_json::from_value::<RawToolDecl>(json!({"action": {"type": "x", "kind": 1}}))
                .is_err()
        );
        assert!(serde_json::from_value::<RawToolDecl>(json!({"action": {}})).is_err());
        let d: RawToolDecl = serde_json::from_value(json!({"riskLevel": "HIGH"})).unwrap();
        assert_eq!(d.risk_level, Some(RiskLevel::High));
    }

    // ----- annotations -----

    #[test]
    fn annotations_raise_but_never_lower() {
        let mut c = ToolCatalog::new("srv", None, vec![]).unwrap();
        c.learn(&[
            listed("read_file", Some(true), None),
            listed("deploy", Some(true), None),
            listed("wipe", Some(false), Some(true)),
            listed("plain", None, Some(false)),
        ]);
        assert_eq!(c.describe("read_file").risk, RiskLevel::Medium);
        assert_eq!(c.describe("deploy").risk, RiskLevel::Critical);
        assert_eq!(c.describe("wipe").risk, RiskLevel::High);
        assert_eq!(c.describe("plain").risk, RiskLevel::Medium);
    }

    #[test]
    fn annotations_accumulate_keep_max_and_forget() {
        let mut c = ToolCatalog::new("srv", None, vec![]).unwrap();
        c.learn(&[listed("a", None, Some(true))]);
        c.learn(&[listed("b", None, Some(true)), listed("a", Some(true), None)]);
        assert_eq!(c.describe("a").risk, RiskLevel::High);
        assert_eq!(c.describe("b").risk, RiskLevel::High);
        c.forget();
        assert_eq!(c.describe("a").risk, RiskLevel::Medium);
        assert_eq!(c.describe("b").risk, RiskLevel::Medium);
    }

    #[test]
    fn listed_tool_parsing_is_lenient() {
        let tools: Vec<ListedTool> = serde_json::from_value(json!([
            {"name": "a", "description": "x", "inputSchema": {}},
            {"name": "b", "annotations": {"destructiveHint": true, "title": "B"}},
            {"name": "c", "annotations": {"destructiveHint": "yes", "readOnlyHint": null}},
            {"name": "d", "annotations": null}
        ]))
        .unwrap();
        assert!(tools[0].annotations.is_none());
        assert_eq!(
            tools[1].annotations.as_ref().unwrap().destructive_hint,
            Some(true)
        );
        assert_eq!(
            tools[2].annotations.as_ref().unwrap().destructive_hint,
            None
        );
        assert!(tools[3].annotations.is_none());
        let mut c = ToolCatalog::new("srv", None, vec![]).unwrap();
        c.learn(&tools);
        assert_eq!(c.describe("b").risk, RiskLevel::High);
        assert_eq!(c.describe("c").risk, RiskLevel::Medium);
    }
}
