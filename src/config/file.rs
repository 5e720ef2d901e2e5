//! The shapes of `apie.mcp.json` as written (camelCase, every object closed to unknown keys).
//!
//! These types only describe the file; meaning and defaults are applied in [`super::resolve`].
//! A file written for Apie's own proxy fits them unchanged.

use std::fmt;
use std::marker::PhantomData;
use std::path::PathBuf;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};

use super::{ApprovalChannel, BlockResponse, ConfigError, FailureMode};
use crate::guard::metadata::RawToolDecl;
use crate::guard::rules::RawRule;
use crate::guard::{Decision, Mode};
use crate::upstream::UpstreamSpec;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawFile {
    /// Editors' schema hint; ignored.
    #[serde(rename = "$schema")]
    pub schema: Option<String>,
    pub agent_key: Option<String>,
    pub agent_name: Option<String>,
    pub server_name: Option<String>,
    pub mode: Option<RawMode>,
    pub release_mode: Option<String>,
    pub environment: Option<String>,
    pub upstream: Option<RawUpstream>,
    pub servers: Option<Ordered<RawServer>>,
    pub guard_failure_mode: Option<FailureMode>,
    pub approval_timeout_ms: Option<u64>,
    pub approval_poll_interval_ms: Option<u64>,
    pub guard: Option<RawGuard>,
    pub tools: Option<Ordered<RawToolDecl>>,
    pub policies: Option<Vec<RawRule>>,
    pub risk_defaults: Option<RawRiskDefaults>,
    pub redact_keys: Option<Vec<String>>,
    pub approvals: Option<RawApprovals>,
    pub audit: Option<RawAudit>,
    pub hide_blocked_tools: Option<bool>,
    pub max_message_bytes: Option<u64>,
    pub max_pending_calls: Option<u64>,
    pub error_codes: Option<RawErrorCodes>,
    pub block_response: Option<BlockResponse>,
}

/// One entry of `servers`: overrides the top level for that server.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawServer {
    pub upstream: Option<RawUpstream>,
    pub agent_key: Option<String>,
    pub agent_name: Option<String>,
    pub mode: Option<RawMode>,
    pub release_mode: Option<String>,
    pub environment: Option<String>,
    pub redact_keys: Option<Vec<String>>,
    pub approval_timeout_ms: Option<u64>,
    pub policies: Option<Vec<RawRule>>,
    pub tools: Option<Ordered<RawToolDecl>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RawMode {
    Enforce,
    #[serde(alias = "shadow")]
    Monitor,
    Off,
}

impl From<RawMode> for Mode {
    fn from(m: RawMode) -> Mode {
        match m {
            RawMode::Enforce => Mode::Enforce,
            RawMode::Monitor => Mode::Monitor,
            RawMode::Off => Mode::Off,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawUpstream {
    pub command: String,
    #[serde(default)]
    pub args: Vec<String>,
    pub env: Option<Ordered<String>>,
    pub cwd: Option<PathBuf>,
}

impl RawUpstream {
    pub fn to_spec(&self, path: &str) -> Result<UpstreamSpec, ConfigError> {
        let env = self.env.clone().map(|e| e.0).unwrap_or_default();
        if let Some((k, _)) = env.iter().find(|(k, _)| k.is_empty() || k.contains('=')) {
            return Err(ConfigError::at(
                format!("{path}.env"),
                format!("{k:?} is not a valid variable name"),
            ));
        }
        Ok(UpstreamSpec {
            command: self.command.clone(),
            args: self.args.clone(),
            env,
            cwd: self.cwd.clone(),
        })
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawGuard {
    pub base_url: Option<String>,
    pub api_key_env: Option<String>,
    pub timeout_ms: Option<u64>,
    pub circuit_breaker: Option<RawCircuitBreaker>,
    pub events: Option<bool>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawCircuitBreaker {
    pub failure_threshold: Option<u32>,
    pub cooldown_ms: Option<u64>,
}

/// A decision as written in `riskDefaults`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RawDecision {
    Allow,
    Warn,
    Notify,
    Block,
    RequireApproval,
}

impl From<RawDecision> for Decision {
    fn from(d: RawDecision) -> Decision {
        match d {
            RawDecision::Allow => Decision::Allow,
            RawDecision::Warn | RawDecision::Notify => Decision::Warn,
            RawDecision::Block => Decision::Block,
            RawDecision::RequireApproval => Decision::RequireApproval,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRiskDefaults {
    pub low: Option<RawDecision>,
    pub medium: Option<RawDecision>,
    pub high: Option<RawDecision>,
    pub critical: Option<RawDecision>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawApprovals {
    pub channels: Option<Vec<ApprovalChannel>>,
}

/// `audit`: `false` (off), `true` (default path) or `{path?}`.
#[derive(Debug, Clone, PartialEq)]
pub enum RawAudit {
    Enabled(bool),
    At { path: Option<PathBuf> },
}

impl<'de> Deserialize<'de> for RawAudit {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct At {
            path: Option<PathBuf>,
        }
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawAudit;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("false, true, or {\"path\": \"…\"}")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<RawAudit, E> {
                Ok(RawAudit::Enabled(v))
            }
            fn visit_map<M: MapAccess<'de>>(self, map: M) -> Result<RawAudit, M::Error> {
                let at = At::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(RawAudit::At { path: at.path })
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawErrorCodes {
    pub blocked: Option<i64>,
    pub approval: Option<i64>,
    pub guard_unavailable: Option<i64>,
}

/// A JSON object read as a list of entries in file order (order decides, e.g. for `tools`
/// globs). A key given twice is refused.
#[derive(Debug, Clone, Default)]
pub struct Ordered<T>(pub Vec<(String, T)>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Ordered<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Ordered<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Ordered<T>, M::Error> {
                let mut entries: Vec<(String, T)> = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    if entries.iter().any(|(k, _)| *k == key) {
                        return Err(de::Error::custom(format!("key {key:?} given twice")));
                    }
                    let value = map.next_value()?;
                    entries.push((key, value));
                }
                Ok(Ordered(entries))
            }
        }
        d.deserialize_map(V(PhantomData))
    }
}
