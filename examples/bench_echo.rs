//! `bench_echo`: the minimal, fast MCP upstream of the performance benchmark (`benches/proxy.rs`).
//!
//! Newline-delimited JSON-RPC over stdio, one thread, no MCP SDK: it parses each line once with
//! borrowed JSON and writes each answer with one buffered write, flushed per message, so that
//! whatever sits between it and the host is what a benchmark measures.
//!
//! - `initialize` → a fixed result (protocol `2025-06-18`, `tools` capability);
//! - `tools/list` → two tools, `echo` and `big`;
//! - `tools/call` `echo` → one text block holding the call's `arguments` as compact JSON;
//! - `tools/call` `big` with `{"bytes": N}` → one text block of N bytes (`x`), for the
//!   large-result case; the filler is built once and reused;
//! - `ping` → `{}`; any other request → -32601; notifications are ignored.
//!
//! ```sh
//! cargo build --release --examples
//! echo '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"a":1}}}' \
//!   | target/release/examples/bench_echo
//! ```

use std::borrow::Cow;
use std::io::{BufRead as _, BufReader, Write as _};

use serde::Deserialize;
use serde_json::value::RawValue;

/// Largest `big` result it produces.
const MAX_BIG: usize = 1 << 30;

#[derive(Deserialize)]
struct Request<'a> {
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    #[serde(borrow)]
    method: Cow<'a, str>,
    #[serde(borrow)]
    params: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct CallParams<'a> {
    #[serde(borrow)]
    name: Cow<'a, str>,
    #[serde(borrow)]
    arguments: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct BigArgs {
    bytes: usize,
}

const INITIALIZE: &str = r#"{"protocolVersion":"2025-06-18","capabilities":{"tools":{}},"serverInfo":{"name":"bench_echo","version":"0.1.0"}}"#;

const TOOLS: &str = r#"{"tools":[{"name":"echo","description":"Echoes its arguments back as text.","inputSchema":{"type":"object"},"annotations":{"readOnlyHint":true}},{"name":"big","description":"Returns a text result of `bytes` bytes.","inputSchema":{"type":"object","properties":{"bytes":{"type":"integer"}},"required":["bytes"]},"annotations":{"readOnlyHint":true}}]}"#;

fn main() -> std::io::Result<()> {
    let stdin = std::io::stdin();
    let mut input = BufReader::with_capacity(256 * 1024, stdin.lock());
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(256 * 1024, stdout.lock());
    let mut line = Vec::with_capacity(64 * 1024);
    let mut filler: Vec<u8> = Vec::new();
    loop {
        line.clear();
        if input.read_until(b'\n', &mut line)? == 0 {
            return Ok(());
        }
        let Ok(req) = serde_json::from_slice::<Request<'_>>(&line) else {
            continue;
        };
        // A notification gets no answer.
        let Some(id) = req.id else { continue };
        out.write_all(br#"{"jsonrpc":"2.0","id":"#)?;
        out.write_all(id.get().as_bytes())?;
        match req.method.as_ref() {
            "initialize" => result(&mut out, INITIALIZE)?,
            "tools/list" => result(&mut out, TOOLS)?,
            "ping" => result(&mut out, "{}")?,
            "tools/call" => call(&mut out, req.params, &mut filler)?,
            _ => error(&mut out, -32601, "Method not found")?,
        }
        out.write_all(b"}\n")?;
        out.flush()?;
    }
}

fn result(out: &mut impl std::io::Write, json: &str) -> std::io::Result<()> {
    out.write_all(br#","result":"#)?;
    out.write_all(json.as_bytes())
}

fn error(out: &mut impl std::io::Write, code: i32, message: &str) -> std::io::Result<()> {
    write!(
        out,
        r#","error":{{"code":{code},"message":{}}}"#,
        serde_json::to_string(message).unwrap_or_default()
    )
}

fn call(
    out: &mut impl std::io::Write,
    params: Option<&RawValue>,
    filler: &mut Vec<u8>,
) -> std::io::Result<()> {
    let Some(params) = params.and_then(|p| serde_json::from_str::<CallParams<'_>>(p.get()).ok())
    else {
        return error(out, -32602, "Invalid params");
    };
    let arguments = params.arguments.map_or("{}", RawValue::get);
    match params.name.as_ref() {
        "echo" => {
            out.write_all(br#","result":{"content":[{"type":"text","text":"#)?;
            serde_json::to_writer(&mut *out, arguments)?;
            out.write_all(br#"}],"isError":false}"#)
        }
        "big" => {
            let Ok(BigArgs { bytes }) = serde_json::from_str(arguments) else {
                return error(out, -32602, "big needs {\"bytes\": N}");
            };
            if bytes > MAX_BIG {
                return error(out, -32602, "big: too many bytes");
            }
            if filler.len() < bytes {
                filler.resize(bytes, b'x');
            }
            out.write_all(br#","result":{"content":[{"type":"text","text":""#)?;
            out.write_all(&filler[..bytes])?;
            out.write_all(br#""}],"isError":false}"#)
        }
        _ => error(out, -32602, "Unknown tool"),
    }
}
