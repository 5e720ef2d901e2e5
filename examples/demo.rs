//! A scripted host session: runs `apie-mcp` in front of the example server and shows one
//! allowed call and one blocked call, line by line as they cross the wire.
//!
//! ```sh
//! cargo build --release --bins --examples && ./target/release/examples/demo
//! ```
#![allow(clippy::print_stdout)]

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde_json::{Value, json};

fn main() -> anyhow::Result<()> {
    // This example lives in target/<profile>/examples; the proxy is one level up.
    let examples = std::env::current_exe()?
        .parent()
        .map(PathBuf::from)
        .ok_or_else(|| anyhow::anyhow!("no parent directory"))?;
    let proxy = examples.join("../apie-mcp");
    let server = examples.join("example_server");
    for bin in [&proxy, &server] {
        anyhow::ensure!(
            bin.exists(),
            "{} is missing: run `cargo build --release --bins --examples` first",
            bin.display()
        );
    }
    let config = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/demo.mcp.json");

    println!("$ apie-mcp --config examples/demo.mcp.json -- example_server\n");
    let mut child = Command::new(&proxy)
        .arg("--config")
        .arg(&config)
        .arg("--")
        .arg(&server)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let mut stdin = child
        .stdin
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdin"))?;
    let mut stdout = BufReader::new(
        child
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdout"))?,
    );

    let mut exchange = |title: &str, message: Value| -> anyhow::Result<Option<Value>> {
        println!("== {title}");
        let line = message.to_string();
        println!("host  → {line}");
        writeln!(stdin, "{line}")?;
        stdin.flush()?;
        if message.get("id").is_none() {
            println!();
            return Ok(None);
        }
        let mut answer = String::new();
        stdout.read_line(&mut answer)?;
        println!("proxy ← {}\n", answer.trim_end());
        Ok(Some(serde_json::from_str(&answer)?))
    };

    exchange(
        "initialize (passed through)",
        json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-11-25", "capabilities": {},
            "clientInfo": {"name": "demo-host", "version": "1.0"}}}),
    )?;
    exchange(
        "initialized",
        json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
    )?;
    let echo = exchange(
        "an allowed call: echo",
        json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
               "params": {"name": "echo", "arguments": {"text": "hello through the guard"}}}),
    )?;
    let delete = exchange(
        "a blocked call: delete_file (rule no-deletes)",
        json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
               "params": {"name": "delete_file", "arguments": {"path": "/etc/passwd"}}}),
    )?;
    drop(stdin);
    let status = child.wait()?;

    let allowed = echo.as_ref().and_then(|m| m.get("result")).is_some();
    let code = delete
        .as_ref()
        .and_then(|m| m.pointer("/error/code"))
        .and_then(Value::as_i64);
    println!(
        "echo: {}; delete_file: {}; proxy exit: {status}",
        if allowed { "allowed" } else { "NOT allowed" },
        match code {
            Some(code) => format!("blocked with {code}"),
            None => "NOT blocked".into(),
        }
    );
    anyhow::ensure!(
        allowed && code == Some(-32001),
        "the demo did not go as expected"
    );
    Ok(())
}
