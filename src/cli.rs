//! The command line (SPEC §2), as written: clap derive structs and nothing else. Everything is
//! kept as text here; [`crate::config`] validates it together with the config file, so a bad
//! flag and a bad field get the same treatment (a message naming it, exit 64).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "apie-mcp",
    version,
    about = "An MCP stdio proxy that guards every tools/call of the server it runs",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate the config, print the effective policy and any warnings.
    Check(CheckArgs),
    /// The local approval queue: calls held for a human, answered from any terminal.
    #[command(subcommand)]
    Approvals(ApprovalsCommand),
}

#[derive(Debug, Clone, Subcommand)]
pub enum ApprovalsCommand {
    /// List the calls waiting for a human.
    List,
    /// Let a held call through.
    Approve {
        /// The approval id (apr_…), as the proxy printed it.
        id: String,
    },
    /// Refuse a held call.
    Reject {
        /// The approval id (apr_…), as the proxy printed it.
        id: String,
        /// Why, for the agent and the audit log.
        #[arg(long)]
        reason: Option<String>,
    },
}

/// Where the config comes from; shared by the proxy and `check`.
#[derive(Debug, Clone, Default, Args)]
pub struct Source {
    /// Config file [default: $APIE_MCP_CONFIG, else ./apie.mcp.json if present]
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Pick an entry of a multi-server config.
    #[arg(long, value_name = "NAME")]
    pub server: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub source: Source,
}

#[derive(Debug, Clone, Default, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub source: Source,
    /// enforce | monitor | shadow | off (overrides the config)
    #[arg(long, value_name = "MODE")]
    pub mode: Option<String>,
    /// Apie's older spelling: monitor | guard (= enforce)
    #[arg(long, value_name = "MODE", hide = true)]
    pub release_mode: Option<String>,
    /// How long a held call waits for a human: 600000, 500ms, 90s, 10m, 1h (a bare number is ms)
    #[arg(long, value_name = "DURATION")]
    pub approval_timeout: Option<String>,
    /// Override the config's upstream command.
    #[arg(long, value_name = "CMD")]
    pub upstream_command: Option<String>,
    /// An argument for --upstream-command (repeatable).
    #[arg(long = "upstream-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub upstream_args: Vec<String>,
    /// Run id for the audit log and the guard service [default: $APIE_RUN_ID, else run_mcp_<12 hex>]
    #[arg(long, value_name = "ID")]
    pub run_id: Option<String>,
    /// stderr log level: error | warn | info | debug | trace (RUST_LOG also works)
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,
    /// The upstream MCP server to run, after `--` (or directly, as Inspector passes it).
    #[arg(
        value_name = "UPSTREAM_COMMAND",
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    pub upstream: Vec<String>,
}
