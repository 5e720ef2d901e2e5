//! Fixture self-tests: the example server, the socket bridge and the harness,
//! exercised directly (no proxy in between). A module of the `tests`
//! integration crate (`mod direct;` in `tests/tests.rs`).

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::TcpListener;
use std::time::Duration;

use rmcp::model::{CallToolRequestParams, ProtocolVersion};
use serde_json::{Value, json};

use crate::util::{
    self, ElicitAnswer, Era, RawSession, RootsAnswer, TestClient, connect, is_tool_error,
    result_text,
};

fn args(value: Value) -> serde_json::Map<String, Value> {
    match value {
        Value::Object(map) => map,
        other => panic!("tool arguments must be an object, got {other}"),
    }
}

fn call(name: &'static str, arguments: Value) -> CallToolRequestParams {
    CallToolRequestParams::new(name).with_arguments(args(arguments))
}

fn first_text(result: &rmcp::model::CallToolResult) -> String {
    let block = result.content.first().expect("one content block");
    block
        .as_text()
        .map(|t| t.text.clone())
        .expect("a text block")
}

#[tokio::test]
async fn legacy_client_lists_and_calls_tools() {
    let client = connect(
        TestClient::new(),
        util::example_server_command(),
        Era::Legacy,
    )
    .await
    .expect("connect");

    let info = client.peer_info().expect("server info");
    assert_eq!(info.protocol_version, ProtocolVersion::V_2025_11_25);
    assert_eq!(
        info.server_info.as_ref().map(|i| i.name.as_str()),
        Some("example-server")
    );

    let tools = client.list_all_tools().await.expect("tools/list");
    let names: Vec<&str> = tools.iter().map(|t| t.name.as_ref()).collect();
    for expected in [
        "echo",
        "add",
        "read_file",
        "delete_file",
        "deploy_service",
        "refund",
        "slow",
        "big",
        "ask_roots",
        "ask_elicit",
        "confirm",
        "steps",
        "changed",
        "exit",
    ] {
        assert!(
            names.contains(&expected),
            "{expected} missing from {names:?}"
        );
    }
    let tool = |name: &str| tools.iter().find(|t| t.name == name).expect("tool");
    let echo = tool("echo").annotations.clone().expect("echo annotations");
    assert_eq!(echo.read_only_hint, Some(true));
    let delete = tool("delete_file")
        .annotations
        .clone()
        .expect("annotations");
    assert_eq!(delete.destructive_hint, Some(true));
    assert!(tool("echo").description.is_some());
    assert_eq!(
        tool("add").input_schema.get("type"),
        Some(&json!("object")),
        "schemars-generated input schema"
    );

    let echoed = client
        .call_tool(call("echo", json!({"text": "hello"})))
        .await
        .expect("echo");
    assert_eq!(first_text(&echoed), "hello");
    assert_ne!(echoed.is_error, Some(true));

    let sum = client
        .call_tool(call("add", json!({"a": 2, "b": 0.5})))
        .await
        .expect("add");
    assert_eq!(first_text(&sum), "2.5");

    let big = client
        .call_tool(call("big", json!({"bytes": 100_000})))
        .await
        .expect("big");
    let text = first_text(&big);
    assert_eq!(text.len(), 100_000);
    assert!(text.bytes().all(|b| b == b'x'));

    let bad = client
        .call_tool(call("add", json!({"a": "two", "b": 1})))
        .await
        .expect("bad input is a result, not a protocol error");
    assert_eq!(bad.is_error, Some(true));

    let unknown = client.call_tool(call("no_such_tool", json!({}))).await;
    assert!(unknown.is_err(), "unknown tool is a protocol error");

    client.close().await;
}

#[tokio::test]
async fn modern_client_calls_echo() {
    let client = connect(
        TestClient::new(),
        util::example_server_command(),
        Era::Modern,
    )
    .await
    .expect("connect (server/discover)");
    let info = client.peer_info().expect("discover info");
    assert_eq!(info.protocol_version, ProtocolVersion::V_2026_07_28);
    assert_eq!(
        info.server_info.as_ref().map(|i| i.name.as_str()),
        Some("example-server")
    );

    let echoed = client
        .call_tool(call("echo", json!({"text": "modern"})))
        .await
        .expect("echo");
    assert_eq!(first_text(&echoed), "modern");

    // Server→client requests are impossible in this era: an isError result.
    let roots = client
        .call_tool(call("ask_roots", json!({})))
        .await
        .expect("ask_roots");
    assert_eq!(roots.is_error, Some(true));
    assert!(first_text(&roots).contains("unsupported"));

    client.close().await;
}

#[tokio::test]
async fn raw_session_legacy_round_trip() {
    let mut s = RawSession::example_server();
    let init = s
        .initialize_legacy(json!({"elicitation": {"form": {}}}))
        .await;
    assert_eq!(init["protocolVersion"], util::LEGACY_VERSION);
    assert_eq!(init["serverInfo"]["name"], "example-server");
    assert_eq!(init["capabilities"]["tools"]["listChanged"], true);

    let listed = s.request(1, "tools/list", Value::Null).await;
    assert!(
        listed["result"]["tools"]
            .as_array()
            .is_some_and(|t| t.len() == 14)
    );

    let echoed = s.call_tool(2, "echo", json!({"text": "raw"})).await;
    assert_eq!(result_text(&echoed), "raw");
    assert!(!is_tool_error(&echoed));

    // By raw line, with a string id.
    s.send_line(r#"{"jsonrpc":"2.0","id":"x-3","method":"tools/call","params":{"name":"add","arguments":{"a":1,"b":2}}}"#)
        .await;
    let sum = s.recv_until_id("x-3").await;
    assert_eq!(result_text(&sum), "3");

    // `changed` sends a notification before its answer; it gets stashed.
    let ok = s.call_tool(4, "changed", json!({})).await;
    assert_eq!(result_text(&ok), "ok");
    let stashed = s.take_stashed();
    assert!(
        stashed
            .iter()
            .any(|m| m["method"] == "notifications/tools/list_changed"),
        "stashed: {stashed:?}"
    );

    let unknown = s.call_tool(5, "nope", json!({})).await;
    assert_eq!(unknown["error"]["code"], -32602);

    s.expect_silence(200).await;
    assert!(
        s.stderr_text().contains("example-server"),
        "banner on stderr"
    );

    s.close_stdin();
    let status = s.wait_exit(Duration::from_secs(5)).await;
    assert!(status.success(), "exit on stdin EOF: {status}");
}

#[tokio::test]
async fn raw_session_modern_round_trip() {
    let mut s = RawSession::example_server();
    let echoed = s.call_tool_modern(1, "echo", json!({"text": "m"})).await;
    assert_eq!(result_text(&echoed), "m");
    assert_eq!(echoed["result"]["resultType"], "complete");

    // Without `_meta` a modern request is refused.
    let refused = s.call_tool(2, "echo", json!({"text": "m"})).await;
    assert_eq!(refused["error"]["code"], -32602);

    let discover = s.request_modern(3, "server/discover", Value::Null).await;
    assert!(
        discover["result"]["supportedVersions"]
            .as_array()
            .is_some_and(|v| v.contains(&json!(util::MODERN_VERSION)))
    );
}

#[tokio::test]
async fn ask_roots_round_trip_through_rmcp_client() {
    let host = TestClient::new().with_roots(RootsAnswer::Roots(vec![util::root(
        "file:///srv/project",
        "project",
    )]));
    let log = host.log();
    let client = connect(host, util::example_server_command(), Era::Legacy)
        .await
        .expect("connect");
    let result = client
        .call_tool(call("ask_roots", json!({})))
        .await
        .expect("ask_roots");
    assert_ne!(result.is_error, Some(true), "{result:?}");
    let answer: Value = serde_json::from_str(&first_text(&result)).expect("JSON text");
    assert_eq!(answer["roots"][0]["uri"], "file:///srv/project");
    assert_eq!(answer["roots"][0]["name"], "project");
    assert_eq!(log.roots_requests(), 1);
    client.close().await;
}

#[tokio::test]
async fn ask_elicit_round_trip_through_rmcp_client() {
    for (answer, action, approve) in [
        (ElicitAnswer::Approve, "accept", Some(true)),
        (ElicitAnswer::Reject, "accept", Some(false)),
        (ElicitAnswer::Decline, "decline", None),
        (ElicitAnswer::Cancel, "cancel", None),
    ] {
        let host = TestClient::new().with_elicit(answer);
        let log = host.log();
        let client = connect(host, util::example_server_command(), Era::Legacy)
            .await
            .expect("connect");
        let result = client
            .call_tool(call("ask_elicit", json!({"message": "Proceed?"})))
            .await
            .expect("ask_elicit");
        let elicit: Value = serde_json::from_str(&first_text(&result)).expect("JSON text");
        assert_eq!(elicit["action"], action);
        assert_eq!(elicit["content"]["approve"].as_bool(), approve);
        assert_eq!(log.elicitation_messages(), vec!["Proceed?".to_owned()]);
        client.close().await;
    }
}

#[tokio::test]
async fn elicitation_error_answer_becomes_tool_error() {
    let host = TestClient::new().with_elicit(ElicitAnswer::Error {
        code: -32601,
        message: "no elicitation here".into(),
    });
    let client = connect(host, util::example_server_command(), Era::Legacy)
        .await
        .expect("connect");
    let result = client
        .call_tool(call("ask_elicit", json!({"message": "Proceed?"})))
        .await
        .expect("ask_elicit");
    assert_eq!(result.is_error, Some(true));
    assert!(first_text(&result).contains("no elicitation here"));
    client.close().await;
}

#[tokio::test]
async fn raw_session_sees_server_to_client_request() {
    let mut s = RawSession::example_server();
    s.initialize_legacy(json!({"roots": {}})).await;
    s.send(&util::legacy_call(7, "ask_roots", json!({}))).await;
    let req = s.recv().await;
    assert_eq!(req["method"], "roots/list");
    let id = req["id"].clone();
    s.send(&json!({"jsonrpc": "2.0", "id": id, "result": {"roots": [{"uri": "file:///r"}]}}))
        .await;
    let done = s.recv_until_id(7).await;
    assert!(result_text(&done).contains("file:///r"));
}

#[tokio::test]
async fn exit_tool_exits_with_code() {
    let mut s = RawSession::example_server();
    s.initialize_legacy(json!({})).await;
    s.send(&util::legacy_call(1, "exit", json!({"code": 7})))
        .await;
    let status = s.wait_exit(Duration::from_secs(5)).await;
    assert_eq!(status.code(), Some(7));
    s.expect_eof(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn slow_tool_sleeps() {
    let mut s = RawSession::example_server();
    s.initialize_legacy(json!({})).await;
    let started = std::time::Instant::now();
    let slept = s.call_tool(1, "slow", json!({"ms": 300})).await;
    assert_eq!(result_text(&slept), "slept 300");
    assert!(started.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn example_server_log_records_arguments() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("calls.log");
    let mut s = RawSession::builder(util::example_server_bin())
        .env("EXAMPLE_SERVER_LOG", &log)
        .spawn();
    s.initialize_legacy(json!({})).await;
    s.call_tool(1, "echo", json!({"text": "a b"})).await;
    s.call_tool(2, "refund", json!({"charge_id": "ch_1", "amount": 12.5}))
        .await;
    s.send_line(r#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"changed"}}"#)
        .await;
    s.recv_until_id(3).await;
    let text = std::fs::read_to_string(&log).expect("log file");
    // `<tool> <arguments-json>`; key order depends on serde_json's
    // preserve_order feature, so compare parsed values.
    let calls: Vec<(&str, Value)> = text
        .lines()
        .map(|line| {
            let (tool, arguments) = line.split_once(' ').expect("tool and arguments");
            (
                tool,
                serde_json::from_str(arguments).expect("JSON arguments"),
            )
        })
        .collect();
    assert_eq!(
        calls,
        vec![
            ("echo", json!({"text": "a b"})),
            ("refund", json!({"charge_id": "ch_1", "amount": 12.5})),
            ("changed", Value::Null),
        ]
    );
}

#[tokio::test]
async fn socket_bridge_round_trip() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    // The test plays the upstream: answer each line with an echo, then close
    // after reading EOF.
    let upstream = std::thread::spawn(move || {
        let (stream, _) = listener.accept().expect("accept");
        let mut writer = stream.try_clone().expect("clone");
        let reader = BufReader::new(stream);
        let mut seen = Vec::new();
        for line in reader.lines() {
            let line = line.expect("line");
            let message: Value = serde_json::from_str(&line).expect("JSON");
            let reply = json!({"jsonrpc": "2.0", "id": message["id"], "result": {"echo": message["method"]}});
            writeln!(writer, "{reply}").expect("write");
            seen.push(line);
        }
        seen
    });

    let mut s = RawSession::spawn(util::socket_bridge_bin(), [addr.to_string()]);
    s.send(&util::request(1, "ping", Value::Null)).await;
    let reply = s.recv().await;
    assert_eq!(
        reply,
        json!({"jsonrpc": "2.0", "id": 1, "result": {"echo": "ping"}})
    );
    s.send(&util::request(2, "tools/list", Value::Null)).await;
    assert_eq!(s.recv_until_id(2).await["result"]["echo"], "tools/list");

    s.close_stdin();
    let seen = upstream.join().expect("upstream thread");
    assert_eq!(seen.len(), 2);
    let status = s.wait_exit(Duration::from_secs(5)).await;
    assert!(status.success(), "{status}");
}

#[tokio::test]
async fn socket_bridge_exits_when_socket_closes() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    let upstream = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("accept");
        writeln!(
            stream,
            r#"{{"jsonrpc":"2.0","method":"notifications/hello"}}"#
        )
        .expect("write");
        // Dropping the stream closes the socket.
    });
    let mut s = RawSession::spawn(util::socket_bridge_bin(), [addr.to_string()]);
    assert_eq!(s.recv().await["method"], "notifications/hello");
    upstream.join().expect("upstream thread");
    // stdin stays open: the bridge must still exit because the socket closed.
    let status = s.wait_exit(Duration::from_secs(5)).await;
    assert!(status.success(), "{status}");
}

#[test]
fn config_writer_writes_json() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = util::write_config(dir.path(), json!({"upstream": {"command": "x"}}));
    let back: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
    assert_eq!(back["upstream"]["command"], "x");
}

#[test]
fn modern_request_builders_carry_meta() {
    let call = util::modern_call(1, "echo", json!({"text": "x"}));
    assert_eq!(
        call["params"]["_meta"][util::META_PROTOCOL_VERSION],
        util::MODERN_VERSION
    );
    assert_eq!(
        call["params"]["_meta"][util::META_CLIENT_CAPABILITIES],
        json!({})
    );
    let with_token = util::modern_request(
        2,
        "tools/call",
        json!({"name": "echo", "_meta": {"progressToken": 5}}),
    );
    assert_eq!(with_token["params"]["_meta"]["progressToken"], 5);
    assert_eq!(
        with_token["params"]["_meta"][util::META_PROTOCOL_VERSION],
        util::MODERN_VERSION
    );
}

/// A scripted upstream on a loopback socket, reached through `socket_bridge`:
/// the test answers `server/discover`, then answers the first `tools/call`
/// with an MRTR `input_required` elicitation and the retry with a result.
/// Proves the modern [`TestClient`] answers MRTR elicitations from its
/// configured [`ElicitAnswer`].
#[tokio::test]
async fn modern_client_answers_mrtr_elicitation() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    let upstream = std::thread::spawn(move || {
        let (stream, _) = listener.accept().expect("accept");
        let mut writer = stream.try_clone().expect("clone");
        let mut reader = BufReader::new(stream);
        let mut read = || {
            let mut line = String::new();
            reader.read_line(&mut line).expect("read");
            serde_json::from_str::<Value>(&line).expect("JSON")
        };
        let discover = read();
        assert_eq!(discover["method"], "server/discover");
        let reply = json!({"jsonrpc": "2.0", "id": discover["id"], "result": {
            "resultType": "complete",
            "supportedVersions": [util::MODERN_VERSION],
            "capabilities": {"tools": {}},
            "ttlMs": 0,
            "cacheScope": "private",
            "_meta": {"io.modelcontextprotocol/serverInfo": {"name": "scripted", "version": "1"}},
        }});
        writeln!(writer, "{reply}").expect("write");

        let first = read();
        assert_eq!(first["method"], "tools/call");
        let reply = json!({"jsonrpc": "2.0", "id": first["id"], "result": {
            "resultType": "input_required",
            "inputRequests": {"approval": {"method": "elicitation/create", "params": {
                "mode": "form",
                "message": "Allow delete_file?",
                "requestedSchema": {"type": "object",
                    "properties": {"approve": {"type": "boolean"}}, "required": ["approve"]},
            }}},
            "requestState": "opaque-1",
        }});
        writeln!(writer, "{reply}").expect("write");

        let retry = read();
        assert_eq!(retry["method"], "tools/call");
        assert_ne!(retry["id"], first["id"], "a retry uses a new id");
        let reply = json!({"jsonrpc": "2.0", "id": retry["id"], "result": {
            "resultType": "complete",
            "content": [{"type": "text", "text": "done"}],
        }});
        writeln!(writer, "{reply}").expect("write");
        retry
    });

    let host = TestClient::new().with_elicit(ElicitAnswer::Approve);
    let log = host.log();
    let client = connect(
        host,
        util::command(util::socket_bridge_bin(), [addr.to_string()]),
        Era::Modern,
    )
    .await
    .expect("connect");
    let result = client
        .call_tool(call("delete_file", json!({"path": "/x"})))
        .await
        .expect("tools/call with one MRTR round");
    assert_eq!(first_text(&result), "done");
    assert_eq!(
        log.elicitation_messages(),
        vec!["Allow delete_file?".to_owned()]
    );

    let retry = upstream.join().expect("upstream thread");
    assert_eq!(retry["params"]["requestState"], "opaque-1");
    assert_eq!(
        retry["params"]["inputResponses"]["approval"],
        json!({"action": "accept", "content": {"approve": true}})
    );
    assert_eq!(
        retry["params"]["_meta"][util::META_PROTOCOL_VERSION],
        util::MODERN_VERSION
    );
    client.close().await;
}

#[tokio::test]
async fn delayed_elicitation_answer() {
    let host = TestClient::new().with_elicit(ElicitAnswer::Delay(
        Duration::from_millis(200),
        Box::new(ElicitAnswer::Decline),
    ));
    let client = connect(host, util::example_server_command(), Era::Legacy)
        .await
        .expect("connect");
    let started = std::time::Instant::now();
    let result = client
        .call_tool(call("ask_elicit", json!({"message": "Wait?"})))
        .await
        .expect("ask_elicit");
    assert!(started.elapsed() >= Duration::from_millis(200));
    let elicit: Value = serde_json::from_str(&first_text(&result)).expect("JSON text");
    assert_eq!(elicit["action"], "decline");
    client.close().await;
}
