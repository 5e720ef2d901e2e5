//! A strict JSON parse for the parts of a message the guard evaluates.
//!
//! `serde_json::Value` silently keeps the last of two equal keys, and some servers match keys
//! ignoring case (Go's `encoding/json`, for one). If the guard and the upstream could read one
//! object two ways, `{"name":"safe","Name":"rm_rf"}` would slip past a rule. So every object met
//! here is refused when two of its keys are equal ignoring case; the guard then evaluates the one
//! reading every peer agrees on, and the original bytes can be forwarded as they are.
//!
//! What it builds is a [`Json`], whose strings are borrowed from the input where they can be.

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Number, Value};

use crate::json::Json;

/// True when `a` and `b` are equal ignoring case, Unicode-aware (`K` and the Kelvin sign,
/// `s` and the long s both count).
pub fn eq_ignore_case(a: &str, b: &str) -> bool {
    // The quick no (most keys compared are different): ASCII first characters that differ
    // ignoring case. The fold below maps each ASCII character to one ASCII character.
    if let (Some(x), Some(y)) = (a.as_bytes().first(), b.as_bytes().first())
        && x.is_ascii()
        && y.is_ascii()
        && !x.eq_ignore_ascii_case(y)
    {
        return false;
    }
    if a.is_ascii() && b.is_ascii() {
        return a.eq_ignore_ascii_case(b);
    }
    fold(a) == fold(b)
}

/// A case fold good enough for key comparison: lower-case of the upper-case.
fn fold(s: &str) -> String {
    s.to_uppercase().to_lowercase()
}

/// An object key, borrowed from the input when it has no escapes.
pub struct Key<'de>(pub Cow<'de, str>);

impl<'de> de::Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string key")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

/// The keys of one object seen so far, compared ignoring case.
///
/// Small objects (the common case) are checked by a linear scan over the keys as borrowed from
/// the input, kept on the stack; large ones switch to a set of folded keys, so a hostile object
/// with many keys costs linear time.
pub struct KeySet<'de> {
    /// Kept inline: an object's key set is made for every object parsed.
    small: smallvec::SmallVec<[Cow<'de, str>; SMALL]>,
    folded: Option<HashSet<String>>,
}

const SMALL: usize = 16;

impl Default for KeySet<'_> {
    fn default() -> Self {
        KeySet {
            small: smallvec::SmallVec::new(),
            folded: None,
        }
    }
}

impl<'de> KeySet<'de> {
    /// Adds `key` (a clone of a borrowed key costs nothing); returns the earlier key it
    /// clashes with, if any.
    pub fn insert(&mut self, key: Cow<'de, str>) -> Option<String> {
        if let Some(set) = &mut self.folded {
            let f = fold(&key);
            return if set.insert(f) {
                None
            } else {
                Some(key.to_string())
            };
        }
        if let Some(clash) = self.small.iter().find(|k| eq_ignore_case(k, &key)) {
            return Some(clash.to_string());
        }
        if self.small.len() == SMALL {
            let mut set: HashSet<String> = self.small.drain(..).map(|k| fold(&k)).collect();
            set.insert(fold(&key));
            self.folded = Some(set);
        } else {
            self.small.push(key);
        }
        None
    }
}

/// Parses `json`, refusing any object with two keys equal ignoring case.
///
/// The error says which key clashed, or why the JSON could not be read (for example nesting
/// deeper than serde_json's limit of 128, or a lone surrogate).
pub fn parse(json: &str) -> Result<Json<'_>, String> {
    // The one-pass reader, when it is sure; serde_json otherwise, which says what is wrong.
    if let Some(value) = crate::json::read::strict(json) {
        return Ok(value);
    }
    parse_by_serde(json)
}

/// [`parse`] through serde_json alone.
pub fn parse_by_serde(json: &str) -> Result<Json<'_>, String> {
    parse_with(json, StrictSeed { fold_case: true })
}

/// Parses `json` into a [`Value`], refusing any object with a key given twice (exactly).
/// For files people write, where `PATH` and `Path` may both be meant.
pub fn parse_exact(json: &str) -> Result<Value, String> {
    parse_with(json, StrictSeed { fold_case: false }).map(|j| j.to_value())
}

fn parse_with(json: &str, seed: StrictSeed) -> Result<Json<'_>, String> {
    let mut de = serde_json::Deserializer::from_str(json);
    let value = seed.deserialize(&mut de).map_err(message)?;
    de.end().map_err(message)?;
    Ok(value)
}

/// The error without serde_json's position, which would point into the middle of a line.
fn message(e: serde_json::Error) -> String {
    let text = e.to_string();
    match text.rsplit_once(" at line ") {
        Some((msg, _)) => msg.to_string(),
        None => text,
    }
}

/// How a clash is described.
pub fn clash_message(what: &str, key: &str, clash: &str) -> String {
    if key == clash {
        format!("duplicate {what} {key:?}")
    } else {
        format!("duplicate {what} {key:?} (same as {clash:?} ignoring case)")
    }
}

/// The strict parse as a seed, for a value met in the middle of a larger parse (see
/// [`crate::jsonrpc::Params::Call`]); refuses keys equal ignoring case, as [`parse`] does.
pub fn seed() -> StrictSeed {
    StrictSeed { fold_case: true }
}

#[derive(Clone, Copy)]
pub struct StrictSeed {
    fold_case: bool,
}

impl<'de> DeserializeSeed<'de> for StrictSeed {
    type Value = Json<'de>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Json<'de>, D::Error> {
        d.deserialize_any(StrictVisitor(self))
    }
}

struct StrictVisitor(StrictSeed);

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Json<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Json<'de>, E> {
        Ok(Json::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Json<'de>, E> {
        Ok(Json::Number(v.into()))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Json<'de>, E> {
        Ok(Json::Number(v.into()))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Json<'de>, E> {
        // As `Value::from(f64)`: serde_json's parser gives no non-finite number.
        Ok(Number::from_f64(v).map_or(Json::Null, Json::Number))
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Json<'de>, E> {
        Ok(Json::String(Cow::Borrowed(v)))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Json<'de>, E> {
        Ok(Json::String(Cow::Owned(v.to_owned())))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Json<'de>, E> {
        Ok(Json::String(Cow::Owned(v)))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Json<'de>, E> {
        Ok(Json::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json<'de>, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(self.0)? {
            items.push(item);
        }
        Ok(Json::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json<'de>, A::Error> {
        let mut keys = KeySet::default();
        let mut exact: HashSet<Cow<'de, str>> = HashSet::new();
        let mut members = Vec::new();
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            if self.0.fold_case {
                if let Some(clash) = keys.insert(key.clone()) {
                    return Err(de::Error::custom(clash_message("key", &key, &clash)));
                }
            } else if !exact.insert(key.clone()) {
                return Err(de::Error::custom(format!("key {key:?} given twice")));
            }
            let value = map.next_value_seed(self.0)?;
            members.push((key, value));
        }
        Ok(Json::Object(members))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_json_parses_like_serde_json() {
        for text in [
            r#"{"a":[1,-2,3.5,"x",null,true,{"b":{}}],"c":"\u00e9"}"#,
            r#"[-0, 0, -0.0, 1e300, 1E-300, 18446744073709551615, 18446744073709551616,
                -9223372036854775808, -9223372036854775809, 0.1, 2.5e+3, 123456789012345678901234567890]"#,
            r#"{"esc":"\"\\\/\b\f\n\r\t\u0000\ud83d\ude00","raw":"ünï ✓ 😀","":""}"#,
            r#" { "ws" : [ 1 , { } , [ ] ] } "#,
            r#""top""#,
            "17",
            "null",
        ] {
            assert_eq!(
                parse(text).unwrap().to_value(),
                serde_json::from_str::<Value>(text).unwrap(),
                "{text}"
            );
        }
        // Strings without escapes are borrowed from the input; keys too.
        let Json::Object(members) = parse(r#"{"k":"plain","e":"\u00e9"}"#).unwrap() else {
            panic!("not an object")
        };
        assert!(matches!(
            &members[0],
            (Cow::Borrowed("k"), Json::String(Cow::Borrowed("plain")))
        ));
        assert!(matches!(&members[1].1, Json::String(Cow::Owned(s)) if s == "é"));
    }

    #[test]
    fn duplicates_anywhere_are_refused() {
        for text in [
            r#"{"a":1,"a":2}"#,
            r#"{"a":1,"A":2}"#,
            r#"{"x":[{"path":"/tmp","PATH":"/etc"}]}"#,
            r#"{"n\u0061me":1,"name":2}"#,
            r#"{"k":1,"\u212a":2}"#,
            r#"{"s":1,"\u017f":2}"#,
        ] {
            let err = parse(text).unwrap_err();
            assert!(err.contains("duplicate key"), "{text}: {err}");
        }
    }

    #[test]
    fn large_objects_are_checked_in_linear_time() {
        let mut text = String::from("{");
        for i in 0..20_000 {
            text.push_str(&format!("\"k{i}\":{i},"));
        }
        text.push_str("\"K19999\":0}");
        assert!(parse(&text).unwrap_err().contains("duplicate key"));
    }

    #[test]
    fn keys_compare_ignoring_case_in_unicode() {
        for (a, b, equal) in [
            ("name", "Name", true),
            ("NAME", "name", true),
            ("name", "names", false),
            ("name", "came", false),
            ("", "", true),
            ("", "a", false),
            ("k", "\u{212a}", true),
            ("\u{212a}ey", "KEY", true),
            ("ss", "ß", true),
            ("s", "\u{17f}", true),
            ("é", "É", true),
            ("é", "e", false),
        ] {
            assert_eq!(eq_ignore_case(a, b), equal, "{a:?} {b:?}");
            assert_eq!(eq_ignore_case(b, a), equal, "{b:?} {a:?}");
        }
    }

    #[test]
    fn exact_mode_allows_case_variants_but_not_repeats() {
        assert!(parse_exact(r#"{"PATH":1,"Path":2}"#).is_ok());
        assert!(
            parse_exact(r#"{"a":{"b":1,"b":2}}"#)
                .unwrap_err()
                .contains("given twice")
        );
    }

    #[test]
    fn unreadable_json_is_an_error_not_a_panic() {
        assert!(parse(r#"{"a":"\ud800"}"#).is_err());
        let deep = "[".repeat(200) + &"]".repeat(200);
        assert!(parse(&deep).is_err());
        assert!(parse("{} x").is_err());
    }
}
