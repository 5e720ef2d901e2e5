//! [`Json`]: a JSON value that borrows its strings from the line it was read from.
//!
//! The guard reads every `tools/call`'s params; building a `serde_json::Value` for them (a map
//! with a hashed index per object, a `String` per key and per string) cost more than all the
//! rest of the call's handling. A `Json` keeps each object's members in a vector, in the order
//! they came, and each string as a slice of the line unless it had escapes. The strict parse
//! ([`crate::jsonrpc::strict`]) has already refused objects with two keys equal ignoring case,
//! so a key names one member. A call that has to wait is made [`Json::into_owned`].

pub mod read;

use std::borrow::Cow;

use serde_json::{Map, Number, Value};

/// One JSON value, strings borrowed where they could be.
#[derive(Debug, Clone, PartialEq)]
pub enum Json<'a> {
    Null,
    Bool(bool),
    Number(Number),
    String(Cow<'a, str>),
    Array(Vec<Json<'a>>),
    /// Members in the order they came.
    Object(Vec<(Cow<'a, str>, Json<'a>)>),
}

impl<'a> Json<'a> {
    /// The member `key` of an object (exactly).
    pub fn get(&self, key: &str) -> Option<&Json<'a>> {
        match self {
            Json::Object(members) => members.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Json::String(s) => Some(s),
            _ => None,
        }
    }

    /// The same value, owning all its strings.
    pub fn into_owned(self) -> Json<'static> {
        match self {
            Json::Null => Json::Null,
            Json::Bool(b) => Json::Bool(b),
            Json::Number(n) => Json::Number(n),
            Json::String(s) => Json::String(Cow::Owned(s.into_owned())),
            Json::Array(items) => Json::Array(items.into_iter().map(Json::into_owned).collect()),
            Json::Object(members) => Json::Object(
                members
                    .into_iter()
                    .map(|(k, v)| (Cow::Owned(k.into_owned()), v.into_owned()))
                    .collect(),
            ),
        }
    }

    pub fn to_value(&self) -> Value {
        match self {
            Json::Null => Value::Null,
            Json::Bool(b) => Value::Bool(*b),
            Json::Number(n) => Value::Number(n.clone()),
            Json::String(s) => Value::String(s.to_string()),
            Json::Array(items) => Value::Array(items.iter().map(Json::to_value).collect()),
            Json::Object(members) => Value::Object(
                members
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_value()))
                    .collect::<Map<String, Value>>(),
            ),
        }
    }

    /// The members of an object as a `serde_json` map; `None` for anything else.
    pub fn to_map(&self) -> Option<Map<String, Value>> {
        match self.to_value() {
            Value::Object(map) => Some(map),
            _ => None,
        }
    }

    /// Whether this is the JSON value `other`, as `serde_json` compares values (objects
    /// regardless of member order, `1` and `1.0` different).
    pub fn eq_value(&self, other: &Value) -> bool {
        match (self, other) {
            (Json::Null, Value::Null) => true,
            (Json::Bool(a), Value::Bool(b)) => a == b,
            (Json::Number(a), Value::Number(b)) => a == b,
            (Json::String(a), Value::String(b)) => a == b,
            (Json::Array(a), Value::Array(b)) => {
                a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.eq_value(y))
            }
            (Json::Object(a), Value::Object(b)) => {
                a.len() == b.len()
                    && a.iter()
                        .all(|(k, v)| b.get(k.as_ref()).is_some_and(|w| v.eq_value(w)))
            }
            _ => false,
        }
    }
}

/// A view of a `serde_json` value (strings borrowed), for callers that hold one.
impl<'a> From<&'a Value> for Json<'a> {
    fn from(value: &'a Value) -> Json<'a> {
        match value {
            Value::Null => Json::Null,
            Value::Bool(b) => Json::Bool(*b),
            Value::Number(n) => Json::Number(n.clone()),
            Value::String(s) => Json::String(Cow::Borrowed(s)),
            Value::Array(items) => Json::Array(items.iter().map(Json::from).collect()),
            Value::Object(map) => Json::Object(
                map.iter()
                    .map(|(k, v)| (Cow::Borrowed(k.as_str()), Json::from(v)))
                    .collect(),
            ),
        }
    }
}

impl serde::Serialize for Json<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{SerializeMap, SerializeSeq};
        match self {
            Json::Null => s.serialize_unit(),
            Json::Bool(b) => s.serialize_bool(*b),
            Json::Number(n) => n.serialize(s),
            Json::String(v) => s.serialize_str(v),
            Json::Array(items) => {
                let mut out = s.serialize_seq(Some(items.len()))?;
                for item in items {
                    out.serialize_element(item)?;
                }
                out.end()
            }
            Json::Object(members) => {
                let mut out = s.serialize_map(Some(members.len()))?;
                for (k, v) in members {
                    out.serialize_entry(k, v)?;
                }
                out.end()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> Value {
        json!({"s": "x\"y", "n": [1, -2, 3.5, null, true], "o": {"k": {}}, "e": []})
    }

    #[test]
    fn a_view_converts_back_and_serialises_as_the_value_does() {
        let v = sample();
        let j = Json::from(&v);
        assert_eq!(j.to_value(), v);
        assert_eq!(serde_json::to_string(&j).unwrap(), v.to_string());
        assert_eq!(j.clone().into_owned(), j);
        assert_eq!(j.to_map(), v.as_object().cloned());
        assert_eq!(Json::Null.to_map(), None);
    }

    #[test]
    fn equality_with_a_value_is_serde_jsons() {
        let v = sample();
        assert!(Json::from(&v).eq_value(&v));
        // Member order does not matter; number kinds and types do.
        let a = json!({"a": 1, "b": [2]});
        let b = json!({"b": [2], "a": 1});
        assert!(Json::from(&a).eq_value(&b));
        for (x, y) in [
            (json!(1), json!(1.0)),
            (json!("1"), json!(1)),
            (json!([1]), json!([1, 2])),
            (json!({"a": 1}), json!({"a": 1, "b": 2})),
            (json!({"a": 1}), json!({"b": 1})),
            (json!(null), json!(false)),
        ] {
            assert!(!Json::from(&x).eq_value(&y), "{x} {y}");
            assert_eq!(Json::from(&x).eq_value(&y), x == y);
        }
    }

    #[test]
    fn get_reads_an_objects_member_exactly() {
        let v = json!({"path": "/tmp", "n": 1});
        let j = Json::from(&v);
        assert_eq!(j.get("path").and_then(Json::as_str), Some("/tmp"));
        assert_eq!(j.get("PATH"), None);
        assert_eq!(Json::from(&json!([1])).get("path"), None);
    }
}
