//! `example_server`: a small MCP stdio server to put behind `apie-mcp`.
//!
//! It is the example upstream shipped with the repo and the main fixture of the
//! integration tests. Every tool is fake: nothing touches the disk or the
//! network. Try it with
//!
//! ```sh
//! cargo build --examples
//! apie-mcp -- target/debug/examples/example_server
//! ```
//!
//! Behaviour worth knowing:
//! - It speaks both protocol eras, as rmcp picks them per process from the
//!   first message: `initialize` selects the legacy era, a request whose
//!   `_meta` names `2026-07-28` selects the modern (stateless) era.
//! - `EXAMPLE_SERVER_LOG=<path>`: append one line per received `tools/call`,
//!   `<tool> <arguments-json>` (compact JSON, `null` when the call had no
//!   `arguments`), before the tool runs. Keys keep their wire order when
//!   serde_json's `preserve_order` feature is on (as in apie-mcp's build) and
//!   are sorted otherwise.
//! - `EXAMPLE_SERVER_PARAMS_LOG=<path>`: append one line per received
//!   `tools/call`: its whole `params` as the server read them (compact JSON:
//!   `name`, `arguments`, and `inputResponses` / `requestState` when present).
//! - `confirm` (2026-07-28 only) answers with its own `input_required` result
//!   (input request key `example/confirm`, `requestState`
//!   `example-state.<text>`) and completes on the retry that echoes that state
//!   with an answer.
//! - `steps` sends `count` `notifications/progress` (1..=count, total `count`)
//!   on the call's progress token, if it has one, before answering.
//! - It prints a one-line banner to stderr at start; stdout carries only
//!   JSON-RPC.
//! - Bad input (wrong argument types, out-of-range sizes) gives a result with
//!   `isError: true`; an unknown tool gives a `-32602` protocol error.

use std::io::Write as _;

use rmcp::{
    ErrorData, RoleServer, ServerHandler, ServiceExt,
    handler::server::{
        router::tool::ToolRouter,
        tool::{InputResponses, RequestState, ToolCallContext},
        wrapper::Parameters,
    },
    model::{
        CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, ElicitRequestParams,
        ElicitationSchema, Implementation, InputRequiredResult, ProgressNotificationParam,
        ServerCapabilities, ServerConfig,
    },
    schemars::{self, JsonSchema},
    service::RequestContext,
    tool, tool_handler, tool_router,
    transport::stdio,
};
use serde::Deserialize;

/// Largest `big` payload it will produce.
const MAX_BIG_BYTES: u64 = 256 * 1024 * 1024;

#[derive(Debug, Deserialize, JsonSchema)]
struct TextArgs {
    /// The text to echo back.
    text: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
struct AddArgs {
    /// First addend.
    a: f64,
    /// Second addend.
    b: f64,
}

#[derive(Debug, Deserialize, JsonSchema)]
struct PathArgs {
    /// A file path (never touched: the tool is fake).
    path: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
struct DeployArgs {
    /// Name of the service to deploy.
    service: String,
    /// Target environment, e.g. staging or production.
    environment: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
struct RefundArgs {
    /// Amount to refund.
    amount: f64,
    /// Identifier of the charge to refund.
    charge_id: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
struct SlowArgs {
    /// How long to sleep, in milliseconds.
    ms: u64,
}

#[derive(Debug, Deserialize, JsonSchema)]
struct BigArgs {
    /// Exact length of the returned text, in bytes.
    bytes: u64,
}

#[derive(Debug, Deserialize, JsonSchema)]
struct MessageArgs {
    /// The question to show the user.
    message: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
struct StepsArgs {
    /// How many progress notifications to send.
    count: u32,
}

#[derive(Debug, Deserialize, JsonSchema)]
struct ExitArgs {
    /// Process exit code.
    code: i32,
}

#[derive(Debug, Clone)]
struct ExampleServer {
    tool_router: ToolRouter<Self>,
    log_path: Option<std::path::PathBuf>,
    params_log_path: Option<std::path::PathBuf>,
}

/// The `inputRequests` key `confirm` uses for its own question.
const CONFIRM_KEY: &str = "example/confirm";

fn text_result(text: impl Into<String>) -> CallToolResult {
    CallToolResult::success(vec![ContentBlock::text(text)])
}

fn error_result(text: impl Into<String>) -> CallToolResult {
    CallToolResult::error(vec![ContentBlock::text(text)])
}

/// Server→client requests exist only in the legacy era; 2026-07-28 forbids
/// them on stdio. Returns the error result to give in the modern era.
fn legacy_only(context: &RequestContext<RoleServer>, tool: &str) -> Option<CallToolResult> {
    let version = context.protocol_version()?;
    (!version.has_initialize()).then(|| {
        error_result(format!(
            "{tool} is unsupported in protocol {version}: servers may not send requests to the client"
        ))
    })
}

#[tool_router]
impl ExampleServer {
    fn new() -> Self {
        Self {
            tool_router: Self::tool_router(),
            log_path: std::env::var_os("EXAMPLE_SERVER_LOG").map(Into::into),
            params_log_path: std::env::var_os("EXAMPLE_SERVER_PARAMS_LOG").map(Into::into),
        }
    }

    #[tool(
        description = "Echo the given text back.",
        annotations(read_only_hint = true)
    )]
    fn echo(&self, Parameters(args): Parameters<TextArgs>) -> String {
        args.text
    }

    #[tool(description = "Add two numbers and return the sum as text.")]
    fn add(&self, Parameters(args): Parameters<AddArgs>) -> String {
        (args.a + args.b).to_string()
    }

    #[tool(
        description = "Read a file (fake: returns a placeholder, never touches disk).",
        annotations(read_only_hint = true)
    )]
    fn read_file(&self, Parameters(args): Parameters<PathArgs>) -> String {
        format!("contents of {}", args.path)
    }

    #[tool(
        description = "Delete a file (fake: nothing is deleted).",
        annotations(destructive_hint = true)
    )]
    fn delete_file(&self, Parameters(args): Parameters<PathArgs>) -> String {
        format!("deleted {}", args.path)
    }

    #[tool(description = "Deploy a service to an environment (fake).")]
    fn deploy_service(&self, Parameters(args): Parameters<DeployArgs>) -> String {
        format!("deployed {} to {}", args.service, args.environment)
    }

    #[tool(description = "Refund an amount on a charge (fake).")]
    fn refund(&self, Parameters(args): Parameters<RefundArgs>) -> CallToolResult {
        if !args.amount.is_finite() || args.amount < 0.0 {
            return error_result(format!("invalid amount {}", args.amount));
        }
        if args.charge_id.is_empty() {
            return error_result("charge_id must not be empty");
        }
        text_result(format!("refunded {}", args.amount))
    }

    #[tool(description = "Sleep for the given number of milliseconds, then answer.")]
    async fn slow(&self, Parameters(args): Parameters<SlowArgs>) -> String {
        tokio::time::sleep(std::time::Duration::from_millis(args.ms)).await;
        format!("slept {}", args.ms)
    }

    #[tool(description = "Return one text block of exactly `bytes` 'x' characters.")]
    fn big(&self, Parameters(args): Parameters<BigArgs>) -> CallToolResult {
        if args.bytes > MAX_BIG_BYTES {
            return error_result(format!("bytes must be at most {MAX_BIG_BYTES}"));
        }
        // The bound above keeps this within usize on every supported target.
        text_result("x".repeat(args.bytes as usize))
    }

    #[tool(
        description = "Ask the client for its roots (roots/list) and return its answer as JSON."
    )]
    async fn ask_roots(&self, context: RequestContext<RoleServer>) -> CallToolResult {
        if let Some(unsupported) = legacy_only(&context, "ask_roots") {
            return unsupported;
        }
        #[expect(
            deprecated,
            reason = "roots are deprecated by SEP-2577 but legacy hosts use them"
        )]
        let answer = context.peer.list_roots().await;
        match answer {
            Ok(result) => match serde_json::to_string(&result) {
                Ok(json) => text_result(json),
                Err(e) => error_result(format!("cannot encode roots: {e}")),
            },
            Err(e) => error_result(format!("roots/list failed: {e}")),
        }
    }

    #[tool(
        description = "Ask the user a yes/no question (elicitation/create) and return the answer as JSON."
    )]
    async fn ask_elicit(
        &self,
        Parameters(args): Parameters<MessageArgs>,
        context: RequestContext<RoleServer>,
    ) -> CallToolResult {
        if let Some(unsupported) = legacy_only(&context, "ask_elicit") {
            return unsupported;
        }
        let schema = match ElicitationSchema::builder()
            .required_bool_property("approve", |b| b.title("Approve"))
            .build()
        {
            Ok(schema) => schema,
            Err(e) => return error_result(format!("cannot build schema: {e}")),
        };
        let params = ElicitRequestParams::FormElicitationParams {
            meta: None,
            message: args.message,
            requested_schema: schema,
        };
        match context.peer.create_elicitation(params).await {
            Ok(result) => match serde_json::to_string(&result) {
                Ok(json) => text_result(json),
                Err(e) => error_result(format!("cannot encode elicitation result: {e}")),
            },
            Err(e) => error_result(format!("elicitation/create failed: {e}")),
        }
    }

    #[tool(
        description = "Ask the user to confirm (2026-07-28: an input_required result of its own), then answer."
    )]
    fn confirm(
        &self,
        Parameters(args): Parameters<TextArgs>,
        RequestState(state): RequestState,
        InputResponses(responses): InputResponses,
        context: RequestContext<RoleServer>,
    ) -> CallToolResponse {
        if context
            .protocol_version()
            .is_none_or(|version| version.has_initialize())
        {
            return error_result("confirm needs protocol 2026-07-28 (it answers input_required)")
                .into();
        }
        let expected = format!("example-state.{}", args.text);
        let answer = responses.as_ref().and_then(|r| r.get(CONFIRM_KEY));
        let Some(answer) = answer else {
            let question = serde_json::json!({
                "resultType": "input_required",
                "inputRequests": {CONFIRM_KEY: {
                    "method": "elicitation/create",
                    "params": {
                        "mode": "form",
                        "message": format!("Confirm {}?", args.text),
                        "requestedSchema": {
                            "type": "object",
                            "properties": {"ok": {"type": "boolean", "title": "OK"}},
                            "required": ["ok"],
                        },
                    },
                }},
                "requestState": expected,
            });
            return match serde_json::from_value::<InputRequiredResult>(question) {
                Ok(result) => result.into(),
                Err(e) => error_result(format!("cannot build input_required: {e}")).into(),
            };
        };
        if state.as_deref() != Some(expected.as_str()) {
            return error_result(format!("confirm: bad requestState {state:?}")).into();
        }
        let confirmed = answer["action"] == "accept" && answer["content"]["ok"] == true;
        if confirmed {
            text_result(format!("confirmed {}", args.text)).into()
        } else {
            text_result(format!("not confirmed {}", args.text)).into()
        }
    }

    #[tool(
        description = "Send `count` progress notifications on the call's progress token, then answer."
    )]
    async fn steps(
        &self,
        Parameters(args): Parameters<StepsArgs>,
        context: RequestContext<RoleServer>,
    ) -> CallToolResult {
        if let Some(token) = context.meta.get_progress_token() {
            for step in 1..=args.count {
                let progress = ProgressNotificationParam::new(token.clone(), f64::from(step))
                    .with_total(f64::from(args.count))
                    .with_message(format!("step {step}"));
                if let Err(e) = context.peer.notify_progress(progress).await {
                    return error_result(format!("cannot notify progress: {e}"));
                }
            }
        }
        text_result(format!("did {} steps", args.count))
    }

    #[tool(description = "Send notifications/tools/list_changed, then answer \"ok\".")]
    async fn changed(&self, context: RequestContext<RoleServer>) -> CallToolResult {
        match context.peer.notify_tool_list_changed().await {
            Ok(()) => text_result("ok"),
            Err(e) => error_result(format!("cannot notify: {e}")),
        }
    }

    #[tool(
        description = "Exit the server process immediately with the given code, without answering."
    )]
    fn exit(&self, Parameters(args): Parameters<ExitArgs>) -> String {
        std::process::exit(args.code)
    }
}

impl ExampleServer {
    fn log_call(&self, request: &CallToolRequestParams) {
        if let Some(path) = &self.log_path {
            let arguments = serde_json::to_string(&request.arguments)
                .unwrap_or_else(|e| format!("<unencodable: {e}>"));
            append_line(path, &format!("{} {}\n", request.name, arguments));
        }
        if let Some(path) = &self.params_log_path {
            let params = serde_json::to_string(request)
                .unwrap_or_else(|e| serde_json::json!({"unencodable": e.to_string()}).to_string());
            append_line(path, &format!("{params}\n"));
        }
    }
}

/// One write per line on an O_APPEND file, so lines never interleave.
fn append_line(path: &std::path::Path, line: &str) {
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut file| file.write_all(line.as_bytes()));
    if let Err(e) = written {
        eprintln!("example-server: cannot write {}: {e}", path.display());
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for ExampleServer {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_tool_list_changed()
                .build(),
        )
        .with_server_info(Implementation::new(
            "example-server",
            env!("CARGO_PKG_VERSION"),
        ))
        .with_instructions("A fake example upstream for apie-mcp; no tool has real effects.")
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        self.log_call(&request);
        let call = ToolCallContext::new(self, request, context);
        self.tool_router.call(call).await
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    eprintln!(
        "example-server {} (pid {}): MCP on stdio",
        env!("CARGO_PKG_VERSION"),
        std::process::id()
    );
    let service = ExampleServer::new().serve(stdio()).await?;
    service.waiting().await?;
    Ok(())
}
