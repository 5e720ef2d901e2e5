//! Reading the service's answer to `evaluate` as tolerantly as Apie's own parser (APIE-WIRE
//! §1.6), with the decision spellings of other guard products mapped — but, unlike Apie's
//! proxy, a missing or unknown decision is a failure, never an allow.

use serde_json::Value;

use crate::guard::Decision;

/// What the service decided about one call.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// `policy_decision`, else `decision`.
    pub policy: Decision,
    /// `effective_decision`, else the policy decision.
    pub effective: Decision,
    pub enforcement_action: String,
    pub mode: Option<String>,
    pub reason: Option<String>,
    pub decision_id: Option<String>,
    /// `approval_request.id`, else `approval_id`.
    pub approval_id: Option<String>,
    /// `matched_guardrails[0].key`.
    pub matched_guardrail: Option<String>,
}

/// Why a body is not a verdict.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Unreadable {
    #[error("the response is not a JSON object")]
    NotAnObject,
    #[error("the response has no decision")]
    NoDecision,
    #[error("unknown decision {0:?}")]
    UnknownDecision(String),
}

/// A decision in any known spelling (case-insensitive).
pub fn normalize(spelling: &str) -> Option<Decision> {
    let s = spelling.trim().to_ascii_lowercase();
    let decision = match s.as_str() {
        "allow" | "allowed" | "approve" | "auto_approve" | "permit" | "proceed" => Decision::Allow,
        "warn" | "notify" | "watch" | "log" | "log_only" => Decision::Warn,
        "block" | "deny" | "denied" | "forbid" | "auto_deny" => Decision::Block,
        "require_approval" | "requires_review" | "ask" | "escalate" | "route_to_human"
        | "wait_for_approval" | "hold" => Decision::RequireApproval,
        _ => return None,
    };
    Some(decision)
}

/// What Apie calls the enforcement of a decision.
pub fn enforcement_action(decision: Decision) -> &'static str {
    match decision {
        Decision::Allow => "proceed",
        Decision::Warn => "warn",
        Decision::Block => "block",
        Decision::RequireApproval => "wait_for_approval",
    }
}

impl Verdict {
    pub fn parse(body: &Value) -> Result<Verdict, Unreadable> {
        let Value::Object(map) = body else {
            return Err(Unreadable::NotAnObject);
        };
        let decision = |key: &str| -> Result<Option<Decision>, Unreadable> {
            match map.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => normalize(s)
                    .map(Some)
                    .ok_or_else(|| Unreadable::UnknownDecision(s.clone())),
                Some(other) => Err(Unreadable::UnknownDecision(other.to_string())),
            }
        };
        let policy = match decision("policy_decision")? {
            Some(d) => d,
            None => decision("decision")?.ok_or(Unreadable::NoDecision)?,
        };
        let effective = decision("effective_decision")?.unwrap_or(policy);
        let approval_id = map
            .get("approval_request")
            .and_then(|a| a.get("id"))
            .and_then(text)
            .or_else(|| map.get("approval_id").and_then(text));
        let matched_guardrail = map
            .get("matched_guardrails")
            .and_then(Value::as_array)
            .and_then(|g| g.first())
            .and_then(|g| g.get("key").and_then(text).or_else(|| text(g)));
        Ok(Verdict {
            policy,
            effective,
            enforcement_action: map
                .get("enforcement_action")
                .and_then(text)
                .unwrap_or_else(|| enforcement_action(effective).to_string()),
            mode: map.get("mode").and_then(text),
            reason: map.get("reason").and_then(text),
            decision_id: map.get("decision_id").and_then(text),
            approval_id,
            matched_guardrail,
        })
    }
}

/// A string, or a number written as one; ids come both ways.
fn text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_current_shape_is_read_whole() {
        let v = Verdict::parse(&json!({
            "policy_decision": "require_approval",
            "effective_decision": "require_approval",
            "enforcement_action": "wait_for_approval",
            "mode": "enforce",
            "reason": "prod deploys need a human",
            "decision_id": "dec_1",
            "approval_request": {"id": "apr_9"},
            "approval_id": "ignored",
            "matched_guardrails": [{"key": "prod-deploys"}, {"key": "other"}],
        }))
        .unwrap();
        assert_eq!(
            v,
            Verdict {
                policy: Decision::RequireApproval,
                effective: Decision::RequireApproval,
                enforcement_action: "wait_for_approval".into(),
                mode: Some("enforce".into()),
                reason: Some("prod deploys need a human".into()),
                decision_id: Some("dec_1".into()),
                approval_id: Some("apr_9".into()),
                matched_guardrail: Some("prod-deploys".into()),
            }
        );
    }

    #[test]
    fn the_old_shape_and_other_products_spellings_are_understood() {
        let v = Verdict::parse(&json!({"decision": "DENY", "approval_id": 42})).unwrap();
        assert_eq!(
            (v.policy, v.effective, v.enforcement_action.as_str()),
            (Decision::Block, Decision::Block, "block")
        );
        assert_eq!(v.approval_id.as_deref(), Some("42"));
        for (spelling, want) in [
            ("notify", Decision::Warn),
            ("requires_review", Decision::RequireApproval),
            ("route_to_human", Decision::RequireApproval),
            ("permit", Decision::Allow),
            (" Allowed ", Decision::Allow),
            ("auto_deny", Decision::Block),
        ] {
            assert_eq!(normalize(spelling), Some(want), "{spelling}");
        }
    }

    #[test]
    fn effective_decision_overrides_and_policy_wins_over_decision() {
        let v = Verdict::parse(&json!({
            "policy_decision": "block", "decision": "allow", "effective_decision": "allow"
        }))
        .unwrap();
        assert_eq!((v.policy, v.effective), (Decision::Block, Decision::Allow));
        assert_eq!(v.enforcement_action, "proceed");
    }

    #[test]
    fn missing_or_unknown_decisions_are_failures_not_allows() {
        assert_eq!(
            Verdict::parse(&json!({"reason": "x"})),
            Err(Unreadable::NoDecision)
        );
        assert_eq!(
            Verdict::parse(&json!({"decision": "maybe"})),
            Err(Unreadable::UnknownDecision("maybe".into()))
        );
        assert_eq!(
            Verdict::parse(&json!({"decision": "allow", "effective_decision": "perhaps"})),
            Err(Unreadable::UnknownDecision("perhaps".into()))
        );
        assert_eq!(
            Verdict::parse(&json!({"decision": true})),
            Err(Unreadable::UnknownDecision("true".into()))
        );
        assert_eq!(
            Verdict::parse(&json!(["allow"])),
            Err(Unreadable::NotAnObject)
        );
    }
}
