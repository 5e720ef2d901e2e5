//! `apie-mcp` is an MCP stdio proxy that puts guardrails in front of any MCP server.
//!
//! A host launches it instead of the server; it spawns the server, relays newline-delimited
//! JSON-RPC both ways, and holds every `tools/call` until the guard has decided on it.
//!
//! # Layout
//! - [`cli`]: the command line as written (clap).
//! - [`config`]: `apie.mcp.json` and the flags, merged and validated before anything runs.
//! - [`jsonrpc`]: the JSON-RPC envelope: one-pass classification, ids, error answers.
//! - [`json`]: a JSON value that borrows its strings from the line: what the guard reads of a
//!   `tools/call`.
//! - [`framing`]: newline framing with a length cap; the one writer per output.
//! - [`stdio`]: the descriptors the relay's threads read and write (our stdin and stdout, the
//!   server's pipes).
//! - [`upstream`]: the server's process group, and the shutdown cascade.
//! - [`relay`]: the session: one reader thread per direction, guarded forwarding, and the async
//!   runtime for calls that wait.
//! - [`guard`]: decisions and the mode table; [`guard::metadata`] (tool facts and risk) and
//!   [`guard::rules`] (local rules).
//! - [`remote`]: the Apie guard service over HTTP: evaluate, circuit breaker, approvals, events.
//! - [`redact`]: secret-looking argument values, replaced in everything that leaves the proxy.
//! - [`approval`]: human approval: statuses, the local queue, elicitation prompts and sealed
//!   `requestState`s.
//! - [`audit`]: the JSONL audit log.
//! - [`check`]: `apie-mcp check`.

pub mod approval;
pub mod audit;
pub mod check;
pub mod cli;
pub mod config;
pub mod framing;
pub mod guard;
pub mod json;
pub mod jsonrpc;
pub mod redact;
pub mod relay;
pub mod remote;
pub mod stdio;
pub mod upstream;

use clap::Parser;

/// Exit code for usage and config errors (EX_USAGE).
pub const EXIT_USAGE: u8 = 64;

/// The whole program: parse the command line, then run the proxy or a subcommand.
/// Returns the process exit code.
pub fn main() -> u8 {
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_USAGE } else { 0 };
            // Help and version go to stdout, as users expect of `--help`; errors to stderr.
            let _ = e.print();
            return code;
        }
    };
    init_logging(cli.run.log_level.as_deref());
    match cli.command {
        Some(cli::Command::Check(args)) => check::run(&args),
        Some(cli::Command::Approvals(command)) => approval::cli(&command),
        None => proxy(cli.run),
    }
}

fn proxy(args: cli::RunArgs) -> u8 {
    let config = match config::load(&args, &config::ProcessEnv) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("apie-mcp: {e}");
            return EXIT_USAGE;
        }
    };
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    let audit = match &config.audit {
        Some(path) => match audit::Audit::open(path) {
            Ok(audit) => audit,
            Err(e) => {
                eprintln!("apie-mcp: audit: {e}");
                return EXIT_USAGE;
            }
        },
        None => audit::Audit::disabled(),
    };
    // One thread: the relay's readers are threads of their own (see `relay`); the runtime only
    // holds what waits (the guard service, humans, the server's exit, signals, timers).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("apie-mcp: cannot start the async runtime: {e}");
            return 1;
        }
    };
    let code = runtime.block_on(relay::run(config, audit));
    // A reader thread blocked in `read`, or a write on the blocking pool to a host that stopped
    // reading, cannot be cancelled: do not wait for them.
    runtime.shutdown_background();
    code
}

fn init_logging(level: Option<&str>) {
    use std::io::IsTerminal;
    use tracing_subscriber::filter::{LevelFilter, Targets};
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    // `--log-level`, else RUST_LOG: a level (`debug`) or `target=level` pairs (`apie_mcp=debug`).
    let spec = level
        .map(str::to_string)
        .or_else(|| std::env::var("RUST_LOG").ok());
    let filter = spec
        .and_then(|s| s.parse::<Targets>().ok())
        .unwrap_or_else(|| Targets::new().with_default(LevelFilter::INFO));
    let _ = tracing_subscriber::fmt()
        .with_max_level(LevelFilter::TRACE)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .finish()
        .with(filter)
        .try_init();
}
