//! The JSON-RPC 2.0 envelope, as the proxy sees it.
//!
//! Every line in either direction is classified here, in one pass over its bytes, into a
//! [`Message`] (request, notification or response), a batch, or a rejection that says which
//! JSON-RPC error answers it (SPEC §7, bad-input table). The members the proxy does not need are
//! kept as borrowed raw JSON, so pass-through traffic is forwarded as the original bytes and never
//! re-serialised.
//!
//! Invariants enforced here, so that what the proxy evaluates is what every peer would read:
//! - `jsonrpc` is exactly `"2.0"`; ids are strings or integers (never `null`, fractions, bools);
//! - no two envelope keys are equal ignoring case, and no key is a case variant of an envelope
//!   member (`"Method"`), since some peers match member names case-insensitively;
//! - a message is exactly one of request, notification, response.
//!
//! [`strict`] holds the deep, duplicate-rejecting parse used for `tools/call` params.

pub mod strict;

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::json::read::Reader;

// === ids ===

/// A request id: a string or an integer (MCP forbids `null` and fractions).
///
/// Numbers keep their literal text, so ids beyond 64 bits survive; strings are kept decoded, so
/// `"a"` and `"\u0061"` are the same id.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Id {
    Number(Box<str>),
    String(Box<str>),
}

impl Id {
    /// Reads an id from its raw JSON, or `None` when it is not a string or an integer.
    pub fn from_raw(raw: Raw<'_>) -> Option<Id> {
        let text = raw.get();
        match text.as_bytes().first()? {
            b'"' => raw
                .plain_str()
                .map(Cow::Borrowed)
                .or_else(|| serde_json::from_str::<String>(text).ok().map(Cow::Owned))
                .map(|s| Id::String(s.into())),
            _ if is_integer_literal(text) => Some(Id::Number(text.into())),
            _ => None,
        }
    }

    /// The id as JSON text.
    pub fn to_json(&self) -> String {
        let mut text = Vec::new();
        self.write_json(&mut text);
        // JSON written from a `str` is UTF-8.
        String::from_utf8(text).unwrap_or_default()
    }

    /// The id as plain text: a string's own characters, a number's digits.
    pub fn as_text(&self) -> &str {
        match self {
            Id::Number(text) | Id::String(text) => text,
        }
    }

    /// The id as a JSON value (for audit records and synthesised messages).
    pub fn to_value(&self) -> serde_json::Value {
        match self {
            Id::Number(n) => serde_json::from_str(n).unwrap_or(serde_json::Value::Null),
            Id::String(s) => serde_json::Value::String(s.to_string()),
        }
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_json())
    }
}

impl Serialize for Id {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            // Integer literal text is valid JSON; it is emitted as it came (`-0` too, and
            // integers beyond 64 bits), through the integer when that reads back the same.
            Id::Number(n) => match (n.parse::<i64>(), n.parse::<u64>()) {
                (Ok(i), _) if &**n != "-0" => s.serialize_i64(i),
                (_, Ok(u)) => s.serialize_u64(u),
                _ => match RawValue::from_string(n.to_string()) {
                    Ok(raw) => raw.serialize(s),
                    Err(e) => Err(serde::ser::Error::custom(e)),
                },
            },
            Id::String(v) => s.serialize_str(v),
        }
    }
}

/// `-?(0|[1-9][0-9]*)`: a JSON number with no fraction and no exponent.
fn is_integer_literal(text: &str) -> bool {
    let digits = text.strip_prefix('-').unwrap_or(text);
    !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && (digits == "0" || !digits.starts_with('0'))
}

// === error codes ===

/// JSON-RPC error codes the proxy emits on its own account.
pub mod code {
    pub const PARSE_ERROR: i64 = -32700;
    pub const INVALID_REQUEST: i64 = -32600;
    pub const METHOD_NOT_FOUND: i64 = -32601;
    pub const INVALID_PARAMS: i64 = -32602;
    pub const INTERNAL_ERROR: i64 = -32603;
}

// === classification ===

/// One classified line.
#[derive(Debug)]
pub enum Parsed<'a> {
    Message(Message<'a>),
    /// A JSON array: each element is classified on its own by the caller.
    Batch(Vec<Raw<'a>>),
    Rejected(Rejection),
}

/// A well-formed JSON-RPC message.
#[derive(Debug)]
pub struct Message<'a> {
    pub kind: Kind<'a>,
    /// `params`, when present.
    pub params: Option<Params<'a>>,
}

/// A message's `params`.
#[derive(Debug)]
pub enum Params<'a> {
    /// As raw JSON.
    Raw(Raw<'a>),
    /// A `tools/call`'s params, parsed strictly ([`strict::parse`]) as the line was read, when
    /// `method` came before them (the usual order): the guard reads them without a second pass.
    Call(crate::json::Json<'a>),
}

impl<'a> Params<'a> {
    /// The raw JSON; `None` for params already parsed (only a `tools/call`'s are).
    pub fn raw(&self) -> Option<Raw<'a>> {
        match self {
            Params::Raw(raw) => Some(*raw),
            Params::Call(_) => None,
        }
    }
}

#[derive(Debug)]
pub enum Kind<'a> {
    Request { id: Id, method: Cow<'a, str> },
    Notification { method: Cow<'a, str> },
    Response { id: Id, body: Reply<'a> },
}

/// The body of a response.
#[derive(Debug)]
pub enum Reply<'a> {
    Result(Raw<'a>),
    Error(Raw<'a>),
}

/// A JSON value's text as it stands in the line: checked to be JSON, not read further.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Raw<'a>(&'a str);

impl<'a> Raw<'a> {
    pub fn get(self) -> &'a str {
        self.0
    }

    /// A string without escapes, as the slice between its quotes.
    fn plain_str(self) -> Option<&'a str> {
        let inner = self.0.strip_prefix('"')?.strip_suffix('"')?;
        (!inner.contains('\\')).then_some(inner)
    }
}

impl<'a> From<&'a RawValue> for Raw<'a> {
    fn from(raw: &'a RawValue) -> Raw<'a> {
        Raw(raw.get())
    }
}

impl<'a> Message<'a> {
    /// `params` as raw JSON (see [`Params::raw`]).
    pub fn raw_params(&self) -> Option<Raw<'a>> {
        self.params.as_ref().and_then(Params::raw)
    }

    pub fn method(&self) -> Option<&str> {
        match &self.kind {
            Kind::Request { method, .. } | Kind::Notification { method } => Some(method),
            Kind::Response { .. } => None,
        }
    }

    pub fn id(&self) -> Option<&Id> {
        match &self.kind {
            Kind::Request { id, .. } | Kind::Response { id, .. } => Some(id),
            Kind::Notification { .. } => None,
        }
    }
}

/// Why a line was refused, and the error that answers it.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    pub code: i64,
    pub message: Cow<'static, str>,
    /// The id, when one could be read; the answer carries it (and omits `id` otherwise).
    pub id: Option<Id>,
}

impl Rejection {
    fn parse_error(detail: impl fmt::Display) -> Rejection {
        Rejection {
            code: code::PARSE_ERROR,
            message: format!("Parse error: {detail}").into(),
            id: None,
        }
    }

    pub fn invalid(id: Option<Id>, message: impl Into<Cow<'static, str>>) -> Rejection {
        Rejection {
            code: code::INVALID_REQUEST,
            message: message.into(),
            id,
        }
    }

    /// The JSON-RPC error response for this rejection.
    pub fn to_response(&self) -> Vec<u8> {
        error_response(self.id.as_ref(), self.code, &self.message, None)
    }
}

/// Classifies one line (without its newline).
pub fn classify(line: &[u8]) -> Parsed<'_> {
    // UTF-8 is checked once, over the whole line; the members are then borrowed as they are
    // (from bytes, serde_json would check each of them again).
    let text = match std::str::from_utf8(line) {
        Ok(text) => text,
        Err(e) => return Parsed::Rejected(Rejection::parse_error(e)),
    };
    if let Some(msg) = classify_plain(text) {
        return Parsed::Message(msg);
    }
    let parsed = classify_text(text, true);
    // Anything wrong, read again without parsing `tools/call` params on the way, so every
    // refusal says what it always said (and carries the id, wherever it stands in the line).
    if let Parsed::Rejected(_) = parsed {
        return classify_text(text, false);
    }
    parsed
}

fn classify_text(text: &str, read_call_params: bool) -> Parsed<'_> {
    let mut de = serde_json::Deserializer::from_str(text);
    let top = TopLevelSeed { read_call_params }
        .deserialize(&mut de)
        .and_then(|top| de.end().map(|()| top));
    match top {
        Ok(TopLevel::Object(fields)) => fields.into_parsed(),
        Ok(TopLevel::Array(items)) if items.is_empty() => {
            Parsed::Rejected(Rejection::invalid(None, "Invalid Request: empty batch"))
        }
        Ok(TopLevel::Array(items)) => Parsed::Batch(items.into_iter().map(Raw::from).collect()),
        Ok(TopLevel::Other) => Parsed::Rejected(Rejection::invalid(
            None,
            "Invalid Request: not a JSON-RPC message",
        )),
        Err(e) if e.classify() == serde_json::error::Category::Data => {
            Parsed::Rejected(Rejection::invalid(None, format!("Invalid Request: {e}")))
        }
        Err(e) => Parsed::Rejected(Rejection::parse_error(e)),
    }
}

/// The usual line, read in one pass without serde ([`crate::json::read`]): an object of the
/// envelope's members, each given once and spelled exactly, that is a well-formed message.
/// `None` for anything else, which serde_json then reads (and refuses, saying why, if it must).
fn classify_plain(text: &str) -> Option<Message<'_>> {
    let mut reader = Reader::new(text);
    reader.eat(b'{')?;
    let mut fields = Fields::default();
    let mut first = true;
    while let Some(key) = reader.member(first)? {
        first = false;
        let slot = match &*key {
            "jsonrpc" => &mut fields.jsonrpc,
            "id" => &mut fields.id,
            "method" => &mut fields.method,
            "params" if fields.params.is_none() => {
                // As the serde path: strictly, on the way, when `method` came first.
                let call = fields.method.is_some_and(|m| m.get() == "\"tools/call\"");
                fields.params = Some(if call {
                    Params::Call(reader.value(1)?)
                } else {
                    Params::Raw(Raw(reader.raw(1)?))
                });
                continue;
            }
            "result" => &mut fields.result,
            "error" => &mut fields.error,
            // Another member, one given twice, or a key with escapes.
            _ => return None,
        };
        if slot.is_some() || matches!(key, Cow::Owned(_)) {
            return None;
        }
        *slot = Some(Raw(reader.raw(1)?));
    }
    if !reader.at_end() {
        return None;
    }
    match fields.into_parsed() {
        Parsed::Message(msg) => Some(msg),
        _ => None,
    }
}

/// Classifies one element of a batch (a nested array is not a JSON-RPC message).
pub fn classify_element(raw: Raw<'_>) -> Result<Message<'_>, Rejection> {
    match classify(raw.get().as_bytes()) {
        Parsed::Message(msg) => Ok(msg),
        Parsed::Rejected(r) => Err(r),
        Parsed::Batch(_) => Err(Rejection::invalid(None, "Invalid Request: nested batch")),
    }
}

const MEMBERS: [&str; 6] = ["jsonrpc", "id", "method", "params", "result", "error"];

enum TopLevel<'a> {
    Object(Fields<'a>),
    Array(Vec<&'a RawValue>),
    Other,
}

/// The envelope members, each as raw JSON, plus what was wrong with the object's keys.
#[derive(Default)]
struct Fields<'a> {
    jsonrpc: Option<Raw<'a>>,
    id: Option<Raw<'a>>,
    method: Option<Raw<'a>>,
    params: Option<Params<'a>>,
    result: Option<Raw<'a>>,
    error: Option<Raw<'a>>,
    key_problem: Option<String>,
}

impl<'a> Fields<'a> {
    fn into_parsed(self) -> Parsed<'a> {
        let id = match self.id {
            None => None,
            Some(raw) => match Id::from_raw(raw) {
                Some(id) => Some(id),
                None => {
                    return Parsed::Rejected(Rejection::invalid(
                        None,
                        "Invalid Request: id must be a string or an integer",
                    ));
                }
            },
        };
        let reject = |msg: String| Parsed::Rejected(Rejection::invalid(id.clone(), msg));
        if let Some(problem) = self.key_problem {
            return reject(format!("Invalid Request: {problem}"));
        }
        if self.jsonrpc.map(Raw::get) != Some("\"2.0\"") {
            return reject("Invalid Request: jsonrpc must be \"2.0\"".into());
        }
        let structured = match &self.params {
            None
            | Some(Params::Call(crate::json::Json::Object(_) | crate::json::Json::Array(_))) => {
                true
            }
            Some(Params::Call(_)) => false,
            Some(Params::Raw(raw)) => matches!(raw.get().as_bytes().first(), Some(b'{' | b'[')),
        };
        if !structured {
            return reject("Invalid Request: params must be an object or an array".into());
        }
        match (self.method, self.result, self.error) {
            (Some(method), None, None) => {
                // (serde_json reads a `Cow<str>` as owned, escapes or not.)
                let method = match method.plain_str() {
                    Some(plain) => Cow::Borrowed(plain),
                    None => match serde_json::from_str::<String>(method.get()) {
                        Ok(method) => Cow::Owned(method),
                        Err(_) => return reject("Invalid Request: method must be a string".into()),
                    },
                };
                let kind = match id {
                    Some(id) => Kind::Request { id, method },
                    None => Kind::Notification { method },
                };
                Parsed::Message(Message {
                    kind,
                    params: self.params,
                })
            }
            (None, Some(result), None) | (None, None, Some(result)) => {
                let Some(id) = id else {
                    return reject("Invalid Request: a response needs an id".into());
                };
                // The id moves into the message (every answer passes here); only a refusal
                // copies it.
                let refuse = |why: &str| {
                    Parsed::Rejected(Rejection::invalid(
                        Some(id.clone()),
                        format!("Invalid Request: {why}"),
                    ))
                };
                if self.params.is_some() {
                    return refuse("a response has no params");
                }
                let body = if self.error.is_some() {
                    if !result.get().starts_with('{') {
                        return refuse("error must be an object");
                    }
                    Reply::Error(result)
                } else {
                    Reply::Result(result)
                };
                Parsed::Message(Message {
                    kind: Kind::Response { id, body },
                    params: None,
                })
            }
            (None, None, None) => reject("Invalid Request: no method, result or error".into()),
            _ => reject("Invalid Request: method, result and error are exclusive".into()),
        }
    }
}

/// Reads a top-level value; with `read_call_params`, the params of a `tools/call` whose
/// `method` came first are parsed strictly on the way ([`Params::Call`]).
struct TopLevelSeed {
    read_call_params: bool,
}

impl<'de> DeserializeSeed<'de> for TopLevelSeed {
    type Value = TopLevel<'de>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<TopLevel<'de>, D::Error> {
        struct V {
            read_call_params: bool,
        }
        impl<'de> Visitor<'de> for V {
            type Value = TopLevel<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON-RPC message")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
                let mut fields = Fields::default();
                let mut keys = strict::KeySet::default();
                while let Some(key) = map.next_key::<strict::Key<'de>>()? {
                    let key = key.0;
                    if fields.key_problem.is_none()
                        && let Some(clash) = keys.insert(key.clone())
                    {
                        fields.key_problem = Some(strict::clash_message("member", &key, &clash));
                    }
                    let slot = match &*key {
                        "jsonrpc" => &mut fields.jsonrpc,
                        "id" => &mut fields.id,
                        "method" => &mut fields.method,
                        "params"
                            if self.read_call_params
                                && fields.params.is_none()
                                && fields.method.is_some_and(|m| m.get() == "\"tools/call\"") =>
                        {
                            let params = map.next_value_seed(strict::seed())?;
                            fields.params = Some(Params::Call(params));
                            continue;
                        }
                        "params" => {
                            let raw: &'de RawValue = map.next_value()?;
                            fields.params = Some(Params::Raw(raw.into()));
                            continue;
                        }
                        "result" => &mut fields.result,
                        "error" => &mut fields.error,
                        other => {
                            if fields.key_problem.is_none()
                                && let Some(m) =
                                    MEMBERS.iter().find(|m| strict::eq_ignore_case(m, other))
                            {
                                fields.key_problem =
                                    Some(format!("member {other:?} must be spelled {m:?}"));
                            }
                            map.next_value::<de::IgnoredAny>()?;
                            continue;
                        }
                    };
                    let raw: &'de RawValue = map.next_value()?;
                    *slot = Some(raw.into());
                }
                Ok(TopLevel::Object(fields))
            }
            fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<Self::Value, S::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element::<&'de RawValue>()? {
                    items.push(item);
                }
                Ok(TopLevel::Array(items))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
                Ok(TopLevel::Other)
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
                Ok(TopLevel::Other)
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
                Ok(TopLevel::Other)
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
                Ok(TopLevel::Other)
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
                Ok(TopLevel::Other)
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(TopLevel::Other)
            }
        }
        d.deserialize_any(V {
            read_call_params: self.read_call_params,
        })
    }
}

// === rewriting messages ===

/// Rewrites one member of a JSON object, keeping every other member's bytes as they are.
/// `value` is JSON text. `None` when `object` is not a JSON object or lacks the member.
pub fn replace_member(object: &str, member: &str, value: &str) -> Option<String> {
    struct Members<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);
    impl<'de: 'a, 'a> Deserialize<'de> for Members<'a> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V<'a>(std::marker::PhantomData<&'a ()>);
            impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
                type Value = Members<'a>;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("an object")
                }
                fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Members<'a>, M::Error> {
                    let mut members = Vec::new();
                    while let Some(strict::Key(key)) = map.next_key::<strict::Key<'de>>()? {
                        members.push((key, map.next_value::<&'de RawValue>()?));
                    }
                    Ok(Members(members))
                }
            }
            d.deserialize_map(V(std::marker::PhantomData))
        }
    }
    let Members(members) = serde_json::from_str(object).ok()?;
    if !members.iter().any(|(k, _)| k == member) {
        return None;
    }
    let mut out = String::with_capacity(object.len() + value.len());
    out.push('{');
    for (i, (key, raw)) in members.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&serde_json::to_string(key).ok()?);
        out.push(':');
        out.push_str(if key == member { value } else { raw.get() });
    }
    out.push('}');
    Some(out)
}

// === building messages ===

#[derive(Serialize)]
struct ErrorObject<'a> {
    code: i64,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a serde_json::Value>,
}

#[derive(Serialize)]
struct ErrorResponse<'a> {
    jsonrpc: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a Id>,
    error: ErrorObject<'a>,
}

#[derive(Serialize)]
struct ResultResponse<'a, T: Serialize> {
    jsonrpc: &'static str,
    id: &'a Id,
    result: &'a T,
}

// === writing JSON by hand ===

/// Appends `s` as a JSON string literal, byte for byte as `serde_json` writes it. Most strings
/// need no escape and are copied at once; the rest go through `serde_json`.
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    if needs_escape(s.as_bytes()) {
        // Writing into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, s);
    } else {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    }
}

/// Whether any byte is one JSON escapes in a string: a control character, `"` or `\\`.
/// Every byte is looked at, without stopping at the first: the compiler makes that a vector
/// loop, which for the short strings written here (names, ids, reasons) took a third of the
/// time of an eight-byte scan with its tail handled byte by byte.
fn needs_escape(bytes: &[u8]) -> bool {
    let hits = |b: u8| u8::from(b < 0x20) | u8::from(b == b'"') | u8::from(b == b'\\');
    bytes.iter().fold(0, |any, &b| any | hits(b)) != 0
}

impl Id {
    /// Appends the id as JSON, the same text as its [`Serialize`] impl writes.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        match self {
            // Integer literal text, as it came (see `Serialize`).
            Id::Number(n) => out.extend_from_slice(n.as_bytes()),
            Id::String(s) => write_str(out, s),
        }
    }
}

/// A JSON-RPC error response; `id` is omitted (never `null`) when unknown.
pub fn error_response(
    id: Option<&Id>,
    code: i64,
    message: &str,
    data: Option<&serde_json::Value>,
) -> Vec<u8> {
    let response = ErrorResponse {
        jsonrpc: "2.0",
        id,
        error: ErrorObject {
            code,
            message,
            data,
        },
    };
    serde_json::to_vec(&response).unwrap_or_default()
}

/// A JSON-RPC success response.
pub fn result_response<T: Serialize>(id: &Id, result: &T) -> Vec<u8> {
    serde_json::to_vec(&ResultResponse {
        jsonrpc: "2.0",
        id,
        result,
    })
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::json::read::generate::Gen;

    /// A JSON-RPC line as hosts and servers write them, and the odd one they should not.
    fn generated_line(g: &mut Gen) -> String {
        let mut members: Vec<String> = Vec::new();
        let value = |g: &mut Gen| {
            let mut v = String::new();
            g.value(&mut v, 3);
            v
        };
        // In each list, what follows the first `good` is wrong.
        let good = |g: &Gen, n: usize, all: usize| if g.faults { all } else { n };
        if g.faults && g.below(12) == 0 {
            // No `jsonrpc`.
        } else {
            let versions = ["\"2.0\"", "\"1.0\"", "2", "\"2\\u002e0\""];
            let n = g.below(good(g, 1, 4));
            members.push(format!("\"jsonrpc\":{}", versions[n]));
        }
        let ids = [
            "1",
            "-7",
            "0",
            "\"a\"",
            "\"x\\u0041\"",
            "99999999999999999999999",
            "1.5",
            "null",
        ];
        let id = match g.below(good(g, 5, 7)) {
            0 => None,
            6 => Some(value(g)),
            _ => Some(ids[g.below(good(g, 6, 8))].to_string()),
        };
        if let Some(id) = &id {
            members.push(format!("\"id\":{id}"));
        }
        match g.below(4) {
            0 | 1 => {
                let methods = [
                    "\"tools/call\"",
                    "\"tools/call\"",
                    "\"tools/list\"",
                    "\"tools\\/call\"",
                    "\"initialize\"",
                    "5",
                ];
                let method = methods[g.below(good(g, 5, 6))];
                members.push(format!("\"method\":{method}"));
                if g.below(5) != 0 {
                    let mut params = String::new();
                    match g.below(good(g, 2, 3)) {
                        2 => params = value(g),
                        _ => {
                            params.push_str("{\"name\":");
                            g.string(&mut params);
                            params.push_str(",\"arguments\":");
                            g.object(&mut params, 2);
                            params.push('}');
                        }
                    }
                    members.push(format!("\"params\":{params}"));
                }
            }
            2 => members.push(format!("\"result\":{}", value(g))),
            _ => members.push(format!("\"error\":{}", value(g))),
        }
        let extra = if g.faults { g.below(10) } else { 9 };
        match extra {
            0 => members.push(format!("\"extra\":{}", value(g))),
            1 => members.push(format!("\"Method\":{}", value(g))),
            2 => members.push(format!("\"id\":{}", value(g))),
            3 => members.push(format!("\"params\":{}", value(g))),
            4 => members.push(format!("\"m\\u0065thod\":{}", value(g))),
            _ => {}
        }
        // Any order: `params` before `method` is read the other way.
        for i in (1..members.len()).rev() {
            members.swap(i, g.below(i + 1));
        }
        let mut line = String::new();
        g.ws(&mut line);
        line.push('{');
        for (i, m) in members.iter().enumerate() {
            if i > 0 {
                line.push(',');
            }
            g.ws(&mut line);
            line.push_str(m);
            g.ws(&mut line);
        }
        line.push('}');
        g.ws(&mut line);
        line
    }

    #[test]
    fn the_one_pass_classification_is_the_serde_one() {
        let mut g = Gen::new(7);
        let (mut sure, mut calls, mut total) = (0, 0, 0);
        for i in 0..20_000 {
            g.faults = i % 2 == 0;
            let line = generated_line(&mut g);
            for text in g.and_mangled(line) {
                total += 1;
                let Some(fast) = classify_plain(&text) else {
                    continue;
                };
                sure += 1;
                calls += usize::from(matches!(fast.params, Some(Params::Call(_))));
                match classify_text(&text, true) {
                    Parsed::Message(slow) => {
                        assert_eq!(format!("{fast:?}"), format!("{slow:?}"), "{text}")
                    }
                    other => panic!("read as a message, serde_json says {other:?}: {text}"),
                }
            }
        }
        assert!(sure > total / 5, "sure of {sure} of {total}");
        assert!(calls > total / 50, "{calls} tools/call params of {total}");
    }

    #[test]
    fn strings_are_written_as_serde_writes_them() {
        // Every byte value that can start or sit in a string, at every offset of a chunk.
        let mut samples = vec![String::new(), "plain text of some length".into()];
        for c in (0u8..=0x7f)
            .map(char::from)
            .chain(['é', '✓', '😀', '\u{2028}'])
        {
            for at in 0..10 {
                let mut s: String = "abcdefghij".chars().take(at).collect();
                s.push(c);
                s.push_str("klmnopq");
                samples.push(s);
            }
        }
        for s in samples {
            let mut mine = Vec::new();
            write_str(&mut mine, &s);
            assert_eq!(mine, serde_json::to_vec(&s).unwrap(), "{s:?}");
        }
    }

    #[test]
    fn ids_are_written_back_exactly_as_they_came() {
        for text in [
            "7",
            "-3",
            "-0",
            "9223372036854775807",
            "18446744073709551615",
            "-123456789012345678901234567890",
            r#""a\"b""#,
        ] {
            let raw = RawValue::from_string(text.to_string()).unwrap();
            let id = Id::from_raw((&*raw).into()).expect(text);
            assert_eq!(serde_json::to_string(&id).unwrap(), text);
        }
    }

    fn rejected(line: &str) -> Rejection {
        match classify(line.as_bytes()) {
            Parsed::Rejected(r) => r,
            other => panic!("{line} was accepted: {other:?}"),
        }
    }

    fn message(line: &str) -> Message<'_> {
        match classify(line.as_bytes()) {
            Parsed::Message(m) => m,
            other => panic!("{line} was not a message: {other:?}"),
        }
    }

    #[test]
    fn a_calls_params_and_arguments_start_with_room_for_eight_members_and_deeper_objects_grow() {
        use crate::json::Json;
        let m = message(
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"t","arguments":{"a":1,"b":{"c":2}}}}"#,
        );
        let Some(Params::Call(Json::Object(params))) = &m.params else {
            panic!("params not parsed: {:?}", m.params)
        };
        let Json::Object(arguments) = &params[1].1 else {
            panic!("arguments: {params:?}")
        };
        let Json::Object(deeper) = &arguments[1].1 else {
            panic!("b: {arguments:?}")
        };
        assert!(params.capacity() >= 8 && arguments.capacity() >= 8);
        assert!(deeper.capacity() < 8, "{}", deeper.capacity());
    }

    #[test]
    fn tools_call_params_are_parsed_on_the_way_only_when_method_comes_first() {
        let m = message(r#"{"jsonrpc":"2.0","method":"tools/call","params":{"b":[1]},"id":1}"#);
        assert!(
            matches!(&m.params, Some(Params::Call(v)) if v.eq_value(&serde_json::json!({"b": [1]})))
        );
        // Params before the method, or another method's: raw, as they came.
        let m = message(r#"{"jsonrpc":"2.0","id":1,"params":{"b" : 1},"method":"tools/call"}"#);
        assert_eq!(m.raw_params().unwrap().get(), r#"{"b" : 1}"#);
        let m = message(r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{"b":1,"B":2}}"#);
        assert_eq!(m.raw_params().unwrap().get(), r#"{"b":1,"B":2}"#);
        // Params the strict parse refuses: the message is still a request with its id, and its
        // params raw, so the guard refuses the call itself, as when they came first.
        for line in [
            r#"{"jsonrpc":"2.0","method":"tools/call","params":{"b":1,"B":2},"id":9}"#,
            r#"{"jsonrpc":"2.0","method":"tools/call","params":{"s":"\ud800"},"id":9}"#,
        ] {
            let m = message(line);
            assert!(
                matches!(&m.kind, Kind::Request { id, .. } if id.as_text() == "9"),
                "{line}"
            );
            assert!(m.raw_params().is_some(), "{line}");
        }
        // Not params that are not an object or an array.
        let r = rejected(r#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":5}"#);
        assert_eq!(
            (r.code, r.id),
            (code::INVALID_REQUEST, Some(Id::Number("3".into())))
        );
    }

    #[test]
    fn requests_notifications_and_responses_are_told_apart() {
        let m = message(r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"a":1}}"#);
        assert!(
            matches!(&m.kind, Kind::Request { id: Id::Number(n), method } if &**n == "7" && method == "tools/call")
        );
        assert!(
            matches!(&m.params, Some(Params::Call(v)) if v.eq_value(&serde_json::json!({"a": 1})))
        );

        let m = message(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#);
        assert!(matches!(m.kind, Kind::Notification { .. }));

        let m = message(r#"{"jsonrpc":"2.0","id":"x","result":{}}"#);
        assert!(matches!(
            m.kind,
            Kind::Response {
                body: Reply::Result(_),
                ..
            }
        ));

        let m = message(r#"{"jsonrpc":"2.0","id":-3,"error":{"code":1,"message":"m"}}"#);
        assert!(matches!(
            m.kind,
            Kind::Response {
                body: Reply::Error(_),
                ..
            }
        ));
    }

    #[test]
    fn ids_keep_their_form() {
        let m = message(r#"{"jsonrpc":"2.0","id":123456789012345678901234567890,"method":"x"}"#);
        assert_eq!(m.id().unwrap().to_json(), "123456789012345678901234567890");
        let m = message(r#"{"jsonrpc":"2.0","id":"\u0061","method":"x"}"#);
        assert_eq!(m.id(), Some(&Id::String("a".into())));
        let m = message(r#"{"jsonrpc":"2.0","id":-1,"method":"x"}"#);
        assert_eq!(m.id().unwrap().to_json(), "-1");
    }

    #[test]
    fn bad_ids_are_invalid_requests_without_id() {
        for id in ["null", "1.5", "1e3", "true", "{}", "[]", "-0.0"] {
            let line = format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"x"}}"#);
            let r = match classify(line.as_bytes()) {
                Parsed::Rejected(r) => r,
                other => panic!("{line}: {other:?}"),
            };
            assert_eq!(r.code, code::INVALID_REQUEST, "{line}");
            assert_eq!(r.id, None, "{line}");
        }
    }

    #[test]
    fn non_json_is_a_parse_error_without_id() {
        for line in ["not json", "{\"jsonrpc\":", "{} {}", "\u{fffd}"] {
            let r = rejected(line);
            assert_eq!(r.code, code::PARSE_ERROR, "{line}");
            assert!(
                !String::from_utf8(r.to_response())
                    .unwrap()
                    .contains("\"id\"")
            );
        }
        let r = match classify(b"{\"jsonrpc\":\"2.0\",\"method\":\"\xff\"}") {
            Parsed::Rejected(r) => r,
            other => panic!("{other:?}"),
        };
        assert_eq!(r.code, code::PARSE_ERROR);
    }

    #[test]
    fn wrong_shapes_are_invalid_requests() {
        for line in [
            "42",
            "\"str\"",
            "null",
            "[]",
            r#"{"id":1,"method":"x"}"#,
            r#"{"jsonrpc":"1.0","id":1,"method":"x"}"#,
            r#"{"jsonrpc":2.0,"id":1,"method":"x"}"#,
            r#"{"jsonrpc":"2.0","id":1}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"x","result":{}}"#,
            r#"{"jsonrpc":"2.0","id":1,"result":{},"error":{}}"#,
            r#"{"jsonrpc":"2.0","result":{}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":5}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"x","params":3}"#,
            r#"{"jsonrpc":"2.0","id":1,"error":"boom"}"#,
        ] {
            assert_eq!(rejected(line).code, code::INVALID_REQUEST, "{line}");
        }
    }

    #[test]
    fn invalid_requests_keep_a_readable_id() {
        let r = rejected(r#"{"jsonrpc":"1.0","id":9,"method":"x"}"#);
        assert_eq!(r.id, Some(Id::Number("9".into())));
        assert_eq!(
            String::from_utf8(r.to_response()).unwrap(),
            r#"{"jsonrpc":"2.0","id":9,"error":{"code":-32600,"message":"Invalid Request: jsonrpc must be \"2.0\""}}"#
        );
    }

    #[test]
    fn a_response_keeps_its_id_and_a_malformed_one_is_refused_with_it_and_why() {
        let m = message(r#"{"jsonrpc":"2.0","id":"r1","error":{"code":1,"message":"no"}}"#);
        assert!(
            matches!(&m.kind, Kind::Response { id, body: Reply::Error(_) } if *id == Id::String("r1".into()))
        );
        for (line, id, why) in [
            (
                r#"{"jsonrpc":"2.0","result":{},"params":{}}"#,
                None,
                "a response needs an id",
            ),
            (
                r#"{"jsonrpc":"2.0","id":3,"result":{},"params":{}}"#,
                Some("3"),
                "a response has no params",
            ),
            (
                r#"{"jsonrpc":"2.0","id":4,"error":"boom"}"#,
                Some("4"),
                "error must be an object",
            ),
        ] {
            let r = rejected(line);
            assert_eq!(r.id, id.map(|n| Id::Number(n.into())), "{line}");
            assert_eq!(r.message, format!("Invalid Request: {why}"), "{line}");
        }
    }

    #[test]
    fn duplicate_and_case_variant_members_are_refused() {
        for line in [
            r#"{"jsonrpc":"2.0","id":1,"id":2,"method":"x"}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"a","method":"b"}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"a","Method":"b"}"#,
            r#"{"jsonrpc":"2.0","id":1,"Method":"tools/call"}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"x","PARAMS":{}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"x","extra":1,"EXTRA":2}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"x","me\u0074hod":"y"}"#,
        ] {
            assert_eq!(rejected(line).code, code::INVALID_REQUEST, "{line}");
        }
    }

    #[test]
    fn unknown_members_pass() {
        let m = message(r#"{"jsonrpc":"2.0","id":1,"method":"x","extension":{"a":[1]}}"#);
        assert_eq!(m.method(), Some("x"));
    }

    #[test]
    fn batches_are_split_and_nested_batches_refused() {
        let Parsed::Batch(items) = classify(br#"[{"jsonrpc":"2.0","method":"a"},[1]]"#) else {
            panic!("not a batch")
        };
        assert_eq!(items.len(), 2);
        assert!(classify_element(items[0]).is_ok());
        assert_eq!(
            classify_element(items[1]).unwrap_err().code,
            code::INVALID_REQUEST
        );
    }

    #[test]
    fn one_member_is_rewritten_and_the_rest_kept_byte_for_byte() {
        let line = r#"{"jsonrpc":"2.0", "id" : 0,"method":"roots/list","params":{"n":1.0}}"#;
        assert_eq!(
            replace_member(line, "id", r#""apie:1""#).unwrap(),
            r#"{"jsonrpc":"2.0","id":"apie:1","method":"roots/list","params":{"n":1.0}}"#
        );
        assert_eq!(replace_member(line, "result", "1"), None);
        assert_eq!(replace_member("[1]", "id", "1"), None);
    }

    #[test]
    fn responses_are_built_without_null_ids() {
        let body = error_response(None, -32700, "Parse error", None);
        assert_eq!(
            String::from_utf8(body).unwrap(),
            r#"{"jsonrpc":"2.0","error":{"code":-32700,"message":"Parse error"}}"#
        );
        let id = Id::Number("18446744073709551617".into());
        let body = result_response(&id, &serde_json::json!({}));
        assert_eq!(
            String::from_utf8(body).unwrap(),
            r#"{"jsonrpc":"2.0","id":18446744073709551617,"result":{}}"#
        );
    }
}
