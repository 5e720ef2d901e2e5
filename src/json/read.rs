//! A one-pass JSON reader for the lines the proxy reads on every call.
//!
//! It checks the text and builds what the proxy needs from it, a strict [`Json`] tree or the
//! span of a value, in the same pass, with no serde visitor in between: through serde_json,
//! classifying a `tools/call` and reading its params cost more than the rest of the call's
//! handling.
//!
//! It only ever says yes when it is sure. Whatever it returns is what serde_json makes of the
//! same text (the tests hold it to that over generated and mangled lines); anything else (an
//! error of any kind, a fraction or exponent, an integer beyond 64 bits, nesting deeper than
//! [`MAX_DEPTH`], two keys that clash) is `None`, and the caller reads the text with serde_json,
//! which accepts or refuses it and says why. So this module decides nothing on its own: it is a
//! shortcut past serde_json for the common, well-formed case.

use std::borrow::Cow;

use serde_json::Number;

use super::Json;
use crate::jsonrpc::strict::KeySet;

/// Deepest nesting read here; deeper text is left to serde_json (whose own limit is 127).
pub const MAX_DEPTH: usize = 64;

/// Objects no deeper than [`ROOMY_DEPTH`] start with room for this many members. In a line the
/// envelope is at depth 1, a `tools/call`'s params at 2 and its arguments at 3: most tools'
/// arguments then fit without the reallocation that growing from four members takes (a
/// `realloc` and its copy, some 500 instructions). Deeper objects, which can be many, grow as
/// usual.
const ROOMY: usize = 8;
const ROOMY_DEPTH: usize = 3;

/// A cursor over JSON text. Every method that reads returns `None` where serde_json would have to
/// decide (see the module docs); the reader is then of no further use.
pub struct Reader<'a> {
    text: &'a str,
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(text: &'a str) -> Reader<'a> {
        Reader { text, pos: 0 }
    }

    fn bytes(&self) -> &'a [u8] {
        self.text.as_bytes()
    }

    /// Skips JSON whitespace and returns the next byte, without taking it.
    pub fn peek(&mut self) -> Option<u8> {
        let bytes = self.bytes();
        while let Some(&b) = bytes.get(self.pos) {
            if !matches!(b, b' ' | b'\n' | b'\t' | b'\r') {
                return Some(b);
            }
            self.pos += 1;
        }
        None
    }

    /// Takes `byte`, after whitespace.
    pub fn eat(&mut self, byte: u8) -> Option<()> {
        (self.peek()? == byte).then(|| self.pos += 1)
    }

    /// Whether only whitespace is left.
    pub fn at_end(&mut self) -> bool {
        self.peek().is_none()
    }

    /// Reads the next member of an object whose `{` has been taken: its key, with the `:` after
    /// it taken too, or `None` at the `}` (taken). `first` says whether a member came before.
    pub fn member(&mut self, first: bool) -> Option<Option<Cow<'a, str>>> {
        match self.peek()? {
            b'}' => {
                self.pos += 1;
                return Some(None);
            }
            b',' if !first => self.pos += 1,
            _ if first => {}
            _ => return None,
        }
        if self.peek()? != b'"' {
            return None;
        }
        let key = self.string()?;
        self.eat(b':')?;
        Some(Some(key))
    }

    /// Reads any value and returns its text (as a `serde_json::value::RawValue` would hold it).
    pub fn raw(&mut self, depth: usize) -> Option<&'a str> {
        self.peek()?;
        let start = self.pos;
        self.skip(depth)?;
        Some(&self.text[start..self.pos])
    }

    /// Checks any value and goes past it, as serde_json checks a value it ignores: string
    /// escapes are checked for form, not for lone surrogates.
    pub fn skip(&mut self, depth: usize) -> Option<()> {
        match self.peek()? {
            b'"' => self.string_end(),
            b'{' => {
                let depth = deeper(depth)?;
                self.pos += 1;
                let mut first = true;
                while self.member_start(first, b'}')? {
                    if self.peek()? != b'"' {
                        return None;
                    }
                    self.string_end()?;
                    self.eat(b':')?;
                    self.skip(depth)?;
                    first = false;
                }
                Some(())
            }
            b'[' => {
                let depth = deeper(depth)?;
                self.pos += 1;
                let mut first = true;
                while self.member_start(first, b']')? {
                    self.skip(depth)?;
                    first = false;
                }
                Some(())
            }
            b'-' | b'0'..=b'9' => self.number_end().map(drop),
            _ => self.literal().map(drop),
        }
    }

    /// Reads any value into a [`Json`], refusing (with `None`) an object with two keys equal
    /// ignoring case, as [`crate::jsonrpc::strict::parse`] does.
    pub fn value(&mut self, depth: usize) -> Option<Json<'a>> {
        match self.peek()? {
            b'"' => self.string().map(Json::String),
            b'{' => {
                let depth = deeper(depth)?;
                self.pos += 1;
                let mut keys = KeySet::default();
                let mut members = if depth <= ROOMY_DEPTH {
                    Vec::with_capacity(ROOMY)
                } else {
                    Vec::new()
                };
                while let Some(key) = self.member(members.is_empty())? {
                    if keys.insert(key.clone()).is_some() {
                        return None;
                    }
                    let value = self.value(depth)?;
                    members.push((key, value));
                }
                Some(Json::Object(members))
            }
            b'[' => {
                let depth = deeper(depth)?;
                self.pos += 1;
                let mut items = Vec::new();
                while self.member_start(items.is_empty(), b']')? {
                    items.push(self.value(depth)?);
                }
                Some(Json::Array(items))
            }
            b'-' | b'0'..=b'9' => self.number(),
            _ => self.literal(),
        }
    }

    /// Before an element of an array or object whose opening bracket has been taken: `false`
    /// (with `close` taken) at its end, `true` when an element follows (its `,` taken).
    fn member_start(&mut self, first: bool, close: u8) -> Option<bool> {
        match self.peek()? {
            b if b == close => {
                self.pos += 1;
                Some(false)
            }
            b',' if !first => {
                self.pos += 1;
                // `[1,]` and `{"a":1,}`: serde_json says "trailing comma".
                (self.peek()? != close).then_some(true)
            }
            _ => first.then_some(true),
        }
    }

    /// `true`, `false` or `null`.
    fn literal(&mut self) -> Option<Json<'a>> {
        let rest = &self.bytes()[self.pos..];
        let (json, len) = if rest.starts_with(b"true") {
            (Json::Bool(true), 4)
        } else if rest.starts_with(b"false") {
            (Json::Bool(false), 5)
        } else if rest.starts_with(b"null") {
            (Json::Null, 4)
        } else {
            return None;
        };
        self.pos += len;
        Some(json)
    }

    /// A number, as serde_json reads it: integers here, fractions, exponents and integers
    /// beyond 64 bits through serde_json itself (its float conversion is its own).
    fn number(&mut self) -> Option<Json<'a>> {
        let start = self.pos;
        let integer = self.number_end()?;
        let text = &self.text[start..self.pos];
        let number = match integer {
            Some(0) if text.starts_with('-') => None,
            Some(n) if text.starts_with('-') => {
                i64::try_from(-i128::from(n)).ok().map(Number::from)
            }
            Some(n) => Some(Number::from(n)),
            None => None,
        };
        match number {
            Some(n) => Some(Json::Number(n)),
            // `-0` is a float to serde_json, and floats are its to convert.
            None => match text.parse::<Number>() {
                Ok(n) => Some(Json::Number(n)),
                Err(_) => None,
            },
        }
    }

    /// Checks a number's grammar and goes past it; its magnitude when it is an integer that fits
    /// 64 bits (`Some(None)` for any other number).
    fn number_end(&mut self) -> Option<Option<u64>> {
        let bytes = self.bytes();
        let digits = |pos: &mut usize| {
            let from = *pos;
            while bytes.get(*pos).is_some_and(u8::is_ascii_digit) {
                *pos += 1;
            }
            *pos - from
        };
        let mut pos = self.pos;
        if bytes.get(pos) == Some(&b'-') {
            pos += 1;
        }
        let int_start = pos;
        let int_len = digits(&mut pos);
        // One leading zero, and only on its own.
        if int_len == 0 || (int_len > 1 && bytes[int_start] == b'0') {
            return None;
        }
        let mut integer = true;
        if bytes.get(pos) == Some(&b'.') {
            pos += 1;
            if digits(&mut pos) == 0 {
                return None;
            }
            integer = false;
        }
        if matches!(bytes.get(pos), Some(b'e' | b'E')) {
            pos += 1;
            if matches!(bytes.get(pos), Some(b'+' | b'-')) {
                pos += 1;
            }
            if digits(&mut pos) == 0 {
                return None;
            }
            integer = false;
        }
        self.pos = pos;
        if !integer || int_len > 19 {
            return Some(None);
        }
        let mut n: u64 = 0;
        for &d in &bytes[int_start..int_start + int_len] {
            n = n * 10 + u64::from(d - b'0');
        }
        Some(Some(n))
    }

    /// A string at the cursor (`"` next), decoded: borrowed when it has no escapes. A lone
    /// surrogate is `None`, as serde_json refuses it in a string.
    pub fn string(&mut self) -> Option<Cow<'a, str>> {
        let start = self.pos + 1;
        let at = special(self.bytes(), start);
        if self.bytes().get(at) == Some(&b'"') {
            self.pos = at + 1;
            return Some(Cow::Borrowed(&self.text[start..at]));
        }
        let mut out = String::with_capacity(at - start + 16);
        out.push_str(&self.text[start..at]);
        self.pos = at;
        self.string_rest(Some(&mut out))?;
        Some(Cow::Owned(out))
    }

    /// Goes past a string (`"` next) after checking it.
    fn string_end(&mut self) -> Option<()> {
        let at = special(self.bytes(), self.pos + 1);
        self.pos = at;
        if self.bytes().get(at) == Some(&b'"') {
            self.pos += 1;
            return Some(());
        }
        self.string_rest(None)
    }

    /// The rest of a string from an escape (or whatever else stopped the scan), decoded into
    /// `out` when there is one.
    fn string_rest(&mut self, mut out: Option<&mut String>) -> Option<()> {
        let bytes = self.bytes();
        loop {
            match *bytes.get(self.pos)? {
                b'"' => {
                    self.pos += 1;
                    return Some(());
                }
                b'\\' => {
                    let escaped = *bytes.get(self.pos + 1)?;
                    self.pos += 2;
                    let ch = match escaped {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => {
                            let unit = self.hex4()?;
                            match &mut out {
                                None => '\0',
                                Some(_) => self.code_point(unit)?,
                            }
                        }
                        _ => return None,
                    };
                    if let Some(out) = &mut out {
                        out.push(ch);
                    }
                }
                // The only other byte a scan stops at is a control character, which
                // serde_json refuses inside a string.
                _ => return None,
            }
            let at = special(bytes, self.pos);
            if let Some(out) = &mut out {
                out.push_str(&self.text[self.pos..at]);
            }
            self.pos = at;
        }
    }

    /// Four hex digits after `\u`.
    fn hex4(&mut self) -> Option<u16> {
        let hex = self.bytes().get(self.pos..self.pos + 4)?;
        let mut unit = 0u16;
        for &h in hex {
            unit = unit * 16 + u16::from((h as char).to_digit(16)? as u8);
        }
        self.pos += 4;
        Some(unit)
    }

    /// The character of a `\u` escape, reading its low surrogate when it is a high one.
    fn code_point(&mut self, unit: u16) -> Option<char> {
        match unit {
            0xD800..=0xDBFF => {
                if self.bytes().get(self.pos..self.pos + 2) != Some(b"\\u") {
                    return None;
                }
                self.pos += 2;
                let low = self.hex4()?;
                if !(0xDC00..=0xDFFF).contains(&low) {
                    return None;
                }
                let c = 0x10000 + ((u32::from(unit) - 0xD800) << 10) + (u32::from(low) - 0xDC00);
                char::from_u32(c)
            }
            0xDC00..=0xDFFF => None,
            _ => char::from_u32(u32::from(unit)),
        }
    }
}

/// One step deeper, if that is still within [`MAX_DEPTH`].
fn deeper(depth: usize) -> Option<usize> {
    (depth < MAX_DEPTH).then_some(depth + 1)
}

/// Where the first byte from `from` on that ends a plain run inside a string is: `"`, `\` or a
/// control character (or the end of `bytes`). Eight bytes at a time.
fn special(bytes: &[u8], from: usize) -> usize {
    const ONES: u64 = u64::from_le_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_le_bytes([0x80; 8]);
    let mut pos = from;
    while let Some(chunk) = bytes.get(pos..pos + 8) {
        let x = u64::from_le_bytes(chunk.try_into().unwrap_or_default());
        // High bit of a byte set where it is below 0x20, or equal to `"` or `\` (the lowest
        // such byte is exact; borrows only disturb the bytes above it).
        let below = |x: u64, n: u8| x.wrapping_sub(ONES * u64::from(n)) & !x & HIGH;
        let hits = below(x, 0x20) | below(x ^ (ONES * 0x22), 1) | below(x ^ (ONES * 0x5c), 1);
        if hits != 0 {
            return pos + (hits.trailing_zeros() / 8) as usize;
        }
        pos += 8;
    }
    while let Some(&b) = bytes.get(pos) {
        if b < 0x20 || b == b'"' || b == b'\\' {
            return pos;
        }
        pos += 1;
    }
    pos
}

/// All of `text` as one strict value (see [`Reader::value`]).
pub fn strict(text: &str) -> Option<Json<'_>> {
    let mut reader = Reader::new(text);
    let value = reader.value(0)?;
    reader.at_end().then_some(value)
}

/// Generated and mangled JSON text, for holding the reader to serde_json.
#[cfg(test)]
pub(crate) mod generate {
    /// A small deterministic generator (xorshift64*), so failures replay.
    pub struct Gen {
        state: u64,
        /// Whether strings and numbers may be ones serde_json refuses (or, for a lone
        /// surrogate, refuses to decode).
        pub faults: bool,
    }

    impl Gen {
        pub fn new(seed: u64) -> Gen {
            Gen {
                state: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
                faults: true,
            }
        }

        pub fn next(&mut self) -> u64 {
            self.state ^= self.state >> 12;
            self.state ^= self.state << 25;
            self.state ^= self.state >> 27;
            self.state.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        pub fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        pub fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
            items[self.below(items.len())]
        }

        /// Optional whitespace, as JSON allows it between tokens.
        pub fn ws(&mut self, out: &mut String) {
            if self.below(4) == 0 {
                out.push_str(self.pick(&[" ", "\n", "\t", "\r", "  ", " \r\n "]));
            }
        }

        /// A string literal: plain text, escapes of every kind, non-ASCII, the odd bad one.
        pub fn string(&mut self, out: &mut String) {
            // The pieces after the first `GOOD` are faults.
            const GOOD: usize = 29;
            out.push('"');
            for _ in 0..self.below(8) {
                let pieces: &[&str] = &[
                    "a",
                    "name",
                    "Path",
                    "PATH",
                    "x y",
                    "/etc/passwd",
                    "é",
                    "ü✓",
                    "😀",
                    "\u{212a}",
                    "\u{17f}",
                    "ß",
                    "0123456789abcdef",
                    "\\\"",
                    "\\\\",
                    "\\/",
                    "\\b",
                    "\\f",
                    "\\n",
                    "\\r",
                    "\\t",
                    "\\u0041",
                    "\\u00e9",
                    "\\u212a",
                    "\\ud83d\\ude00",
                    "\\uD834\\uDD1E",
                    "\\u0000",
                    "\\u001f",
                    "{\\\"k\\\":1}",
                    "\\ud800",
                    "\\udc00",
                    "\\ud800\\u0041",
                    "\\x",
                    "\\u12",
                    "\u{1}",
                    "\t",
                ];
                let pieces = if self.faults { pieces } else { &pieces[..GOOD] };
                out.push_str(self.pick(pieces));
            }
            out.push('"');
        }

        pub fn number(&mut self, out: &mut String) {
            let n = self.next();
            match self.below(12) {
                0 => out.push_str(&(n % 1000).to_string()),
                1 => out.push_str(&format!("-{}", n % 1000)),
                2 => out.push_str(&n.to_string()),
                3 => out.push_str(&(n as i64).to_string()),
                4 => out.push_str(&format!("{}.{}", n % 100, n % 7)),
                5 => out.push_str(&format!("{}e{}", n % 100, (n % 700) as i64 - 350)),
                6 => out.push_str(&format!("-{}.{}E+{}", n % 10, n % 1000, n % 30)),
                7 => out.push_str(self.pick(&[
                    "0",
                    "-0",
                    "-0.0",
                    "0.0",
                    "1e400",
                    "-1e400",
                    "1e-400",
                    "1E5",
                    "9223372036854775807",
                    "9223372036854775808",
                    "-9223372036854775808",
                    "-9223372036854775809",
                    "18446744073709551615",
                    "18446744073709551616",
                    "9999999999999999999",
                    "10000000000000000000",
                    "-9999999999999999999",
                    "123456789012345678901234567890",
                    "0.1",
                    "2.5e+3",
                    "5e-324",
                    "1.7976931348623157e308",
                ])),
                // Not numbers: serde_json refuses each.
                8 if self.faults => out
                    .push_str(self.pick(&["01", "-", "1.", ".5", "+1", "1e", "1e+", "-01", "00"])),
                _ => out.push_str(&(n % 100_000).to_string()),
            }
        }

        /// Any value, nested at most `depth` more levels.
        pub fn value(&mut self, out: &mut String, depth: usize) {
            let kinds = if depth == 0 { 4 } else { 7 };
            match self.below(kinds) {
                0 => self.string(out),
                1 => self.number(out),
                2 => out.push_str(self.pick(&["true", "false", "null"])),
                3 => self.string(out),
                4 | 5 => self.object(out, depth - 1),
                _ => {
                    out.push('[');
                    for i in 0..self.below(4) {
                        if i > 0 {
                            out.push(',');
                        }
                        self.ws(out);
                        self.value(out, depth - 1);
                        self.ws(out);
                    }
                    out.push(']');
                }
            }
        }

        /// An object whose keys sometimes repeat or clash ignoring case.
        pub fn object(&mut self, out: &mut String, depth: usize) {
            out.push('{');
            for i in 0..self.below(5) {
                if i > 0 {
                    out.push(',');
                }
                self.ws(out);
                if !self.faults {
                    // Keys that cannot clash.
                    out.push_str(&format!("\"{}{i}\"", self.pick(&["k", "path", "é", ""])));
                } else if self.below(3) == 0 {
                    self.string(out);
                } else {
                    let key = self.pick(&[
                        "a",
                        "b",
                        "name",
                        "Name",
                        "path",
                        "n\\u0061me",
                        "k",
                        "\\u212a",
                        "",
                    ]);
                    out.push('"');
                    out.push_str(key);
                    out.push('"');
                }
                self.ws(out);
                out.push(':');
                self.ws(out);
                self.value(out, depth);
                self.ws(out);
            }
            out.push('}');
        }

        /// `text`, and a mangled copy of it when that is still UTF-8.
        pub fn and_mangled(&mut self, text: String) -> Vec<String> {
            let mangled = self.mangle(&text);
            std::iter::once(text).chain(mangled).collect()
        }

        /// `text` with a few bytes inserted, removed or replaced by JSON's own punctuation, or
        /// cut short; `None` when that broke the UTF-8.
        pub fn mangle(&mut self, text: &str) -> Option<String> {
            let mut bytes = text.as_bytes().to_vec();
            for _ in 0..1 + self.below(3) {
                let at = self.below(bytes.len() + 1);
                let punctuation = b"{}[]\",:\\ 0-.eE1tfnu\x01";
                let b = punctuation[self.below(punctuation.len())];
                match self.below(4) {
                    0 => bytes.insert(at, b),
                    1 if at < bytes.len() => {
                        bytes.remove(at);
                    }
                    2 if at < bytes.len() => bytes[at] = b,
                    _ => bytes.truncate(at),
                }
            }
            String::from_utf8(bytes).ok()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::generate::Gen;
    use super::*;
    use crate::jsonrpc::strict;
    use serde_json::value::RawValue;

    /// What the reader makes of `text` as one strict value must be what serde_json makes of it;
    /// returns whether the reader was sure.
    fn check_strict(text: &str) -> bool {
        let Some(fast) = strict(text) else {
            return false;
        };
        match strict::parse_by_serde(text) {
            Ok(slow) => assert_eq!(fast, slow, "{text}"),
            Err(e) => panic!("the reader accepted what serde_json refuses ({e}): {text}"),
        }
        true
    }

    /// What the reader skips must be what serde_json reads as a raw value, span for span.
    fn check_skip(text: &str) -> bool {
        let mut reader = Reader::new(text);
        let Some(raw) = reader.raw(0).filter(|_| reader.at_end()) else {
            return false;
        };
        match serde_json::from_str::<&RawValue>(text) {
            Ok(slow) => assert_eq!(raw, slow.get(), "{text}"),
            Err(e) => panic!("the reader skipped what serde_json refuses ({e}): {text}"),
        }
        true
    }

    #[test]
    fn generated_and_mangled_values_read_as_serde_json_reads_them() {
        let mut generate = Gen::new(4);
        let (mut sure, mut skipped, mut total) = (0, 0, 0);
        for _ in 0..20_000 {
            let mut text = String::new();
            generate.ws(&mut text);
            generate.value(&mut text, 4);
            generate.ws(&mut text);
            for text in generate.and_mangled(text) {
                total += 1;
                sure += usize::from(check_strict(&text));
                skipped += usize::from(check_skip(&text));
            }
        }
        // The generator makes plenty of both kinds: the reader must not just say "not sure".
        assert!(sure > total / 5, "sure of {sure} of {total}");
        assert!(skipped > total / 4, "skipped {skipped} of {total}");
    }

    #[test]
    fn plain_values_are_read_without_serde() {
        for text in [
            r#"{"a":[1,-2,"x",null,true,false,{"b":{}}],"c":"\u00e9\ud83d\ude00\"\\\/\b\f\n\r\t"}"#,
            r#" { "ws" : [ 1 , { } , [ ] ] } "#,
            r#""top""#,
            "18446744073709551615",
            "-9223372036854775808",
            "[]",
        ] {
            assert!(check_strict(text), "{text}");
            assert!(check_skip(text), "{text}");
        }
        // That strings without escapes are borrowed is tested through `strict::parse`.
    }

    #[test]
    fn what_serde_json_must_decide_is_left_to_it() {
        for text in [
            // Errors of every kind.
            "",
            "{",
            "[1,]",
            r#"{"a":1,}"#,
            "01",
            "1.",
            "-",
            "tru",
            "nul",
            r#"{"a" 1}"#,
            r#""\x""#,
            "\"\u{1}\"",
            r#""\u12""#,
            "[1 2]",
            "{} x",
            r#"{1:2}"#,
            // Lone surrogates in a string that is read, clashing keys, a float out of range,
            // and nesting past the reader's depth.
            r#""\ud800""#,
            r#""\udc00""#,
            r#""\ud800\u0041""#,
            r#"{"a":1,"A":2}"#,
            r#"{"k":1,"\u212a":2}"#,
            "1e400",
        ] {
            assert!(strict(text).is_none(), "{text}");
        }
        // Numbers that are not plain 64-bit integers are converted by serde_json itself.
        for text in [
            "1.5",
            "-0",
            "1e3",
            "18446744073709551616",
            "-9223372036854775809",
            "5e-324",
        ] {
            assert!(check_strict(text), "{text}");
        }
        let deep = "[".repeat(MAX_DEPTH + 1) + &"]".repeat(MAX_DEPTH + 1);
        assert!(strict(&deep).is_none());
        let mut reader = Reader::new(&deep);
        assert!(reader.raw(0).is_none());
        // Skipping, as serde_json skips, lets a lone surrogate by.
        assert!(check_skip(r#"["\ud800"]"#));
    }

    #[test]
    fn the_plain_run_scan_stops_at_the_first_special_byte() {
        let specials = [b'"', b'\\', 0x00, 0x1f];
        for len in 0..24 {
            for at in 0..len {
                for &special_byte in &specials {
                    let mut bytes = vec![b'a'; len];
                    // Bytes that look close to the specials, before and after.
                    for (i, b) in bytes.iter_mut().enumerate() {
                        *b = [b'a', 0x20, 0x21, 0x23, 0x5b, 0x5d, 0xc3, 0x7f][i % 8];
                    }
                    bytes[at] = special_byte;
                    assert_eq!(special(&bytes, 0), at, "{bytes:?}");
                }
                let plain = vec![b'z'; len];
                assert_eq!(special(&plain, at), len);
            }
        }
    }
}
