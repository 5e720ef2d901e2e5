//! The question put to a human inside the host (`elicitation`, SPEC §6): one form with a single
//! boolean, and how its answer reads. The same form serves the legacy `elicitation/create`
//! request and the 2026-07-28 `input_required` result.

use serde_json::{Value, json};

use super::Status;

/// The proxy's key in a 2026-07-28 `inputRequests` / `inputResponses` map.
pub const INPUT_KEY: &str = "apie/approval";

/// Every prompt starts with this, so a look-alike from the upstream is easy to tell apart.
pub const MARK: &str = "[apie-mcp]";

/// Longest argument excerpt shown in a prompt.
const ARGS_SHOWN: usize = 400;

/// What the human is asked.
pub struct Question<'a> {
    pub server: &'a str,
    pub tool: &'a str,
    /// Already redacted.
    pub arguments: &'a Value,
    pub rule: Option<&'a str>,
    pub reason: &'a str,
}

impl Question<'_> {
    pub fn message(&self) -> String {
        let mut args = self.arguments.to_string();
        if args.len() > ARGS_SHOWN {
            let mut end = ARGS_SHOWN;
            while !args.is_char_boundary(end) {
                end -= 1;
            }
            args.truncate(end);
            args.push('…');
        }
        let mut text = format!(
            "{MARK} Allow the tool call {}.{}?\nArguments: {args}\n",
            self.server, self.tool
        );
        if let Some(rule) = self.rule {
            text.push_str(&format!("Rule: {rule}\n"));
        }
        text.push_str(&format!("Reason: {}", self.reason));
        text
    }

    /// `elicitation/create` params. `mode` is left out for 2025-06-18 hosts, which predate it.
    pub fn params(&self, with_mode: bool) -> Value {
        let mut params = json!({
            "message": self.message(),
            "requestedSchema": {
                "type": "object",
                "properties": {
                    "approve": {
                        "type": "boolean",
                        "title": "Approve this call",
                        "description": format!("Let {}.{} run with these arguments", self.server, self.tool),
                    }
                },
                "required": ["approve"],
            },
        });
        if with_mode {
            params["mode"] = json!("form");
        }
        params
    }
}

/// Reads an `ElicitResult`: accept with `approve: true` approves; accept with anything else, or
/// decline, rejects; cancel cancels. `None` when it is not an elicitation answer at all.
pub fn read_answer(result: &Value) -> Option<Status> {
    match result.get("action")?.as_str()? {
        "accept" => {
            let approve = result.get("content").and_then(|c| c.get("approve"));
            Some(if approve == Some(&Value::Bool(true)) {
                Status::Approved
            } else {
                Status::Rejected
            })
        }
        "decline" => Some(Status::Rejected),
        "cancel" => Some(Status::Cancelled),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prompt_names_the_call_and_is_marked() {
        let q = Question {
            server: "ops",
            tool: "deploy_service",
            arguments: &json!({"service": "api", "token": "[REDACTED]"}),
            rule: Some("prod-deploys"),
            reason: "production needs a human",
        };
        let message = q.message();
        assert!(message.starts_with(MARK), "{message}");
        for part in [
            "ops.deploy_service",
            r#""service":"api""#,
            "[REDACTED]",
            "prod-deploys",
            "production needs a human",
        ] {
            assert!(message.contains(part), "{part} missing from {message}");
        }
        let params = q.params(true);
        assert_eq!(params["mode"], "form");
        assert_eq!(params["requestedSchema"]["required"], json!(["approve"]));
        assert!(q.params(false).get("mode").is_none());
    }

    #[test]
    fn long_arguments_are_cut_on_a_character_boundary() {
        let args = json!({"text": "é".repeat(500)});
        let q = Question {
            server: "s",
            tool: "t",
            arguments: &args,
            rule: None,
            reason: "r",
        };
        assert!(q.message().contains('…'));
        assert!(!q.message().contains("Rule:"));
    }

    #[test]
    fn answers_read_as_the_spec_says() {
        let cases = [
            (
                json!({"action": "accept", "content": {"approve": true}}),
                Some(Status::Approved),
            ),
            (
                json!({"action": "accept", "content": {"approve": false}}),
                Some(Status::Rejected),
            ),
            (
                json!({"action": "accept", "content": {"approve": "true"}}),
                Some(Status::Rejected),
            ),
            (json!({"action": "accept"}), Some(Status::Rejected)),
            (json!({"action": "decline"}), Some(Status::Rejected)),
            (json!({"action": "cancel"}), Some(Status::Cancelled)),
            (json!({"action": "maybe"}), None),
            (json!({}), None),
        ];
        for (answer, want) in cases {
            assert_eq!(read_answer(&answer), want, "{answer}");
        }
    }
}
