//! Redaction: what leaves the proxy (guard requests, events, approval prompts) never carries the
//! values of argument keys that look secret (`redactKeys`, SPEC §3).
//!
//! A key matches when it contains any of the configured needles, ignoring case; its value, at
//! any depth and inside arrays, becomes `"[REDACTED]"`. The upstream always gets the real
//! arguments: redaction works on a copy.

use serde_json::Value;

use crate::json::Json;

/// What a redacted value is replaced by.
pub const REDACTED: &str = "[REDACTED]";

/// The compiled `redactKeys` list.
#[derive(Debug, Clone)]
pub struct Redactor {
    needles: Vec<String>,
}

impl Redactor {
    pub fn new(keys: &[String]) -> Redactor {
        Redactor {
            needles: keys.iter().map(|k| k.to_lowercase()).collect(),
        }
    }

    /// True when values under `key` are secret: the key, lower-cased, contains a needle.
    pub fn is_secret(&self, key: &str) -> bool {
        if self.needles.is_empty() {
            return false;
        }
        // An ASCII key lower-cases to ASCII letter by letter, so it is compared in place, with
        // nothing allocated (a needle that is not ASCII cannot be inside it). An empty needle
        // is in every key, as `contains` has it (the config refuses one, `new` does not).
        if key.is_ascii() {
            let key = key.as_bytes();
            return self.needles.iter().any(|needle| {
                let needle = needle.as_bytes();
                needle.is_empty()
                    || key
                        .windows(needle.len())
                        .any(|w| w.eq_ignore_ascii_case(needle))
            });
        }
        let key = key.to_lowercase();
        self.needles.iter().any(|needle| key.contains(needle))
    }

    /// `value` as it may leave the proxy: serialises with every secret key's value replaced,
    /// without copying anything.
    pub fn view<'a>(&'a self, value: &'a Json<'a>) -> Redacted<'a> {
        Redacted {
            value,
            redactor: self,
        }
    }

    /// A copy of `value` with every secret key's value replaced.
    pub fn redact(&self, value: &Json<'_>) -> Value {
        match value {
            Json::Object(members) => Value::Object(
                members
                    .iter()
                    .map(|(k, v)| {
                        let v = if self.is_secret(k) {
                            Value::String(REDACTED.into())
                        } else {
                            self.redact(v)
                        };
                        (k.to_string(), v)
                    })
                    .collect(),
            ),
            Json::Array(items) => Value::Array(items.iter().map(|v| self.redact(v)).collect()),
            other => other.to_value(),
        }
    }
}

/// A value that serialises redacted ([`Redactor::view`]).
pub struct Redacted<'a> {
    value: &'a Json<'a>,
    redactor: &'a Redactor,
}

impl serde::Serialize for Redacted<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{SerializeMap, SerializeSeq};
        match self.value {
            Json::Object(members) => {
                let mut out = serializer.serialize_map(Some(members.len()))?;
                for (k, v) in members {
                    if self.redactor.is_secret(k) {
                        out.serialize_entry(k, REDACTED)?;
                    } else {
                        out.serialize_entry(k, &self.redactor.view(v))?;
                    }
                }
                out.end()
            }
            Json::Array(items) => {
                let mut out = serializer.serialize_seq(Some(items.len()))?;
                for v in items {
                    out.serialize_element(&self.redactor.view(v))?;
                }
                out.end()
            }
            other => other.serialize(serializer),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn defaults() -> Redactor {
        Redactor::new(&crate::config::DEFAULT_REDACT_KEYS.map(String::from))
    }

    #[test]
    fn secret_keys_are_replaced_at_any_depth_and_in_arrays() {
        let args = json!({
            "user": "ada",
            "Password": "hunter2",
            "auth": {"accessToken": "t", "scope": "read"},
            "items": [{"client_secret": "s", "id": 1}, "plain"],
            "APIKEY": {"nested": "whole value goes"},
        });
        assert_eq!(
            defaults().redact(&Json::from(&args)),
            json!({
                "user": "ada",
                "Password": REDACTED,
                "auth": {"accessToken": REDACTED, "scope": "read"},
                "items": [{"client_secret": REDACTED, "id": 1}, "plain"],
                "APIKEY": REDACTED,
            })
        );
    }

    #[test]
    fn the_view_serialises_exactly_like_the_copy() {
        let args = json!({"a": [{"token": 1, "b": {"Secret": [1, 2]}}], "c": null, "pw": "x"});
        let r = defaults();
        let args = Json::from(&args);
        assert_eq!(
            serde_json::to_string(&r.view(&args)).unwrap(),
            r.redact(&args).to_string()
        );
    }

    #[test]
    fn keys_match_as_their_lower_case_contains_a_needle() {
        let needles: Vec<String> = "token password secret apiKey ssn \u{212A}ey straße ıd"
            .split(' ')
            .map(String::from)
            .collect();
        let r = Redactor::new(&needles);
        let keys = "t tok token TOKEN accessToken x_ToKeN_y pass PassWord1 apikey APIKEY api_key \
                    my-ssn SSN key KEY \u{212A}EY STRASSE Straße STRAẞE id ID İD ıd tokeN\u{e9} \
                    \u{e9}password";
        let keys = keys.split(' ').filter(|k| !k.is_empty()).chain([""]);
        for key in keys {
            let lower = key.to_lowercase();
            let expected = r.needles.iter().any(|n| lower.contains(n.as_str()));
            assert_eq!(r.is_secret(key), expected, "{key:?}");
        }
        assert!(
            r.is_secret("Kelvin_key"),
            "the Kelvin sign's needle lower-cases to ASCII"
        );
        assert!(!r.is_secret("STRASSE"), "no full case folding, as before");
        let empty = Redactor::new(&[String::new()]);
        assert!(empty.is_secret("id") && empty.is_secret("") && empty.is_secret("é"));
    }

    #[test]
    fn a_custom_list_replaces_the_defaults_and_an_empty_one_redacts_nothing() {
        let args = json!({"password": "p", "ssn": "123", "SSN_last4": "3"});
        let custom = Redactor::new(&["ssn".to_string()]);
        assert_eq!(
            custom.redact(&Json::from(&args)),
            json!({"password": "p", "ssn": REDACTED, "SSN_last4": REDACTED})
        );
        assert_eq!(Redactor::new(&[]).redact(&Json::from(&args)), args);
    }
}
