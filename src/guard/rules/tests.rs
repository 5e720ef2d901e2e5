use super::*;
use crate::guard::metadata::{ToolCatalog, ToolMeta};
use serde_json::json;

fn parse(v: Value) -> Vec<RawRule> {
    serde_json::from_value(v).expect("rules parse")
}

fn rules(v: Value) -> RuleSet {
    RuleSet::compile(parse(v)).expect("rules compile")
}

fn compile_err(v: Value) -> RuleError {
    RuleSet::compile(parse(v)).expect_err("compile error expected")
}

fn tool_in(server: &str, name: &str) -> ToolMeta {
    ToolCatalog::new(server, Some("production"), vec![])
        .expect("catalog")
        .describe(name)
}

fn tool(name: &str) -> ToolMeta {
    tool_in("srv", name)
}

fn runtime() -> Runtime {
    Runtime {
        mode: "enforce".into(),
        agent_key: "agent-1".into(),
        server: "srv".into(),
        environment: Some("production".into()),
        run_id: "run_mcp_0123456789ab".into(),
    }
}

/// The name of the rule deciding a call of `tool` with `args`; every test that decides also
/// checks that a precomputed [`Selection`] decides the same.
fn decide<'s>(set: &'s RuleSet, tool: &ToolMeta, args: &Value) -> Option<&'s str> {
    let rt = runtime();
    let args = Json::from(args);
    let call = CallFacts {
        tool,
        args: &args,
        runtime: &rt,
    };
    let direct = set.evaluate(&call).map(|r| &*r.name);
    let selected = set
        .evaluate_selected(&set.select(tool), &call)
        .map(|r| &*r.name);
    assert_eq!(
        direct, selected,
        "a selection disagrees for {}",
        tool.qualified
    );
    direct
}

/// Does a single condition hold for a call of `read_file` with `args`?
fn holds(cond: Value, args: Value) -> bool {
    let set = rules(json!([{"name": "r", "conditions": [cond], "action": {"type": "block"}}]));
    decide(&set, &tool("read_file"), &args).is_some()
}

fn c(field: &str, op: &str, value: Value) -> Value {
    json!({"field": field, "operator": op, "value": value})
}

fn c0(field: &str, op: &str) -> Value {
    json!({"field": field, "operator": op})
}

// ----- equals / not_equals -----

#[test]
fn equals_strict_and_numeric() {
    let a = json!({"s": "abc", "n": 500, "f": 500.0, "ns": "500", "sp": " 5e2 ", "b": true, "z": null,
                   "o": {"k": [1, 2]}});
    assert!(holds(c("args.s", "equals", json!("abc")), a.clone()));
    assert!(!holds(c("args.s", "equals", json!("ABC")), a.clone()));
    assert!(holds(c("args.n", "equals", json!(500)), a.clone()));
    assert!(holds(c("args.n", "equals", json!(500.0)), a.clone()));
    assert!(holds(c("args.f", "equals", json!(500)), a.clone()));
    // A number against a numeric string: numeric.
    assert!(holds(c("args.n", "equals", json!("500")), a.clone()));
    assert!(holds(c("args.ns", "equals", json!(500)), a.clone()));
    assert!(holds(c("args.sp", "equals", json!(500)), a.clone()));
    // Two strings: strict.
    assert!(holds(c("args.ns", "equals", json!("500")), a.clone()));
    assert!(!holds(c("args.sp", "equals", json!("500")), a.clone()));
    assert!(!holds(
        c("args.n", "equals", json!("five hundred")),
        a.clone()
    ));
    assert!(!holds(c("args.n", "equals", json!(501)), a.clone()));
    assert!(holds(c("args.b", "equals", json!(true)), a.clone()));
    assert!(!holds(c("args.b", "equals", json!("true")), a.clone()));
    assert!(holds(c("args.z", "equals", json!(null)), a.clone()));
    assert!(holds(
        c("args.o", "equals", json!({"k": [1, 2]})),
        a.clone()
    ));
    assert!(!holds(c("args.missing", "equals", json!(null)), a.clone()));
}

#[test]
fn not_equals_matches_missing_and_different() {
    let a = json!({"env": "prod", "n": 5});
    assert!(holds(c("args.env", "not_equals", json!("dev")), a.clone()));
    assert!(!holds(
        c("args.env", "not_equals", json!("prod")),
        a.clone()
    ));
    assert!(holds(
        c("args.nope", "not_equals", json!("prod")),
        a.clone()
    ));
    assert!(!holds(c("args.n", "not_equals", json!("5")), a.clone()));
    assert!(holds(c("args.n", "not_equals", json!({"x": 1})), a));
}

#[test]
fn big_integers_compare_exactly() {
    let a = json!({"n": 9007199254740993u64, "u": u64::MAX});
    assert!(!holds(
        c("args.n", "equals", json!(9007199254740992u64)),
        a.clone()
    ));
    assert!(holds(
        c("args.n", "greater", json!(9007199254740992u64)),
        a.clone()
    ));
    assert!(holds(
        c("args.u", "equals", json!("18446744073709551615")),
        a.clone()
    ));
    assert!(holds(c("args.u", "greater", json!(-1)), a));
}

// ----- numeric operators -----

#[test]
fn numeric_operators_read_numbers_and_numeric_strings() {
    let a = json!({"n": 500, "s": "500", "e": " 5e2 ", "f": 499.5, "neg": "-3"});
    for f in ["args.n", "args.s", "args.e"] {
        assert!(holds(c(f, "greater", json!(499)), a.clone()), "{f}");
        assert!(!holds(c(f, "greater", json!(500)), a.clone()), "{f}");
        assert!(
            holds(c(f, "greater_or_equal", json!("500")), a.clone()),
            "{f}"
        );
        assert!(
            !holds(c(f, "greater_or_equal", json!(500.5)), a.clone()),
            "{f}"
        );
        assert!(holds(c(f, "less", json!(" 501 ")), a.clone()), "{f}");
        assert!(!holds(c(f, "less", json!(500)), a.clone()), "{f}");
        assert!(holds(c(f, "less_or_equal", json!(5e2)), a.clone()), "{f}");
        assert!(
            !holds(c(f, "less_or_equal", json!(499.99)), a.clone()),
            "{f}"
        );
    }
    assert!(holds(c("args.f", "less", json!(500)), a.clone()));
    assert!(holds(c("args.f", "greater", json!("499.4")), a.clone()));
    assert!(holds(c("args.neg", "less", json!(0)), a));
}

#[test]
fn numeric_operators_type_mismatch_is_no_match() {
    let a = json!({"o": {"a": 1}, "arr": [1], "b": true, "z": null, "t": "lots",
                   "nan": "NaN", "inf": "inf", "inf2": "-Infinity", "empty": "", "hex": "0x10",
                   "huge": "1e400"});
    for f in [
        "args.o",
        "args.arr",
        "args.b",
        "args.z",
        "args.t",
        "args.nan",
        "args.inf",
        "args.inf2",
        "args.empty",
        "args.hex",
        "args.huge",
        "args.missing",
    ] {
        for op in ["greater", "greater_or_equal", "less", "less_or_equal"] {
            assert!(!holds(c(f, op, json!(0)), a.clone()), "{f} {op}");
        }
    }
}

#[test]
fn numeric_operator_value_must_be_numeric() {
    for bad in [
        json!("abc"),
        json!("NaN"),
        json!("inf"),
        json!(true),
        json!([1]),
        json!(null),
    ] {
        let e = compile_err(json!([
            {"name": "ok", "action": {"type": "allow"}},
            {"name": "r", "conditions": [c("args.n", "greater", bad.clone())], "action": {"type": "block"}}
        ]));
        assert_eq!(e.path, "[1].conditions[0].value", "{bad}");
    }
    let e = compile_err(json!([{"name": "r", "conditions": [c0("args.n", "less")],
                                "action": {"type": "block"}}]));
    assert_eq!(e.path, "[0].conditions[0].value");
    assert!(e.message.contains("needs a value"), "{e}");
}

// ----- contains / not_contains -----

#[test]
fn contains_strings_and_arrays() {
    let a =
        json!({"p": "/etc/passwd", "tags": ["prod", 5, {"k": 1}], "n": 12345, "o": {"prod": 1}});
    assert!(holds(c("args.p", "contains", json!("passwd")), a.clone()));
    assert!(!holds(c("args.p", "contains", json!("shadow")), a.clone()));
    assert!(holds(
        c("args.p", "not_contains", json!("shadow")),
        a.clone()
    ));
    assert!(!holds(c("args.p", "not_contains", json!("etc")), a.clone()));
    assert!(holds(c("args.tags", "contains", json!("prod")), a.clone()));
    assert!(holds(c("args.tags", "contains", json!(5)), a.clone()));
    assert!(holds(c("args.tags", "contains", json!("5")), a.clone()));
    assert!(holds(
        c("args.tags", "contains", json!({"k": 1})),
        a.clone()
    ));
    assert!(!holds(c("args.tags", "contains", json!("pro")), a.clone()));
    assert!(holds(
        c("args.tags", "not_contains", json!("dev")),
        a.clone()
    ));
    assert!(!holds(
        c("args.tags", "not_contains", json!("prod")),
        a.clone()
    ));
    // Type mismatches: neither operator matches.
    for (f, v) in [
        ("args.n", json!("123")),
        ("args.o", json!("prod")),
        ("args.p", json!(5)),
    ] {
        assert!(!holds(c(f, "contains", v.clone()), a.clone()), "{f}");
        assert!(!holds(c(f, "not_contains", v.clone()), a.clone()), "{f}");
    }
    // Missing: only the negative one.
    assert!(!holds(c("args.nope", "contains", json!("x")), a.clone()));
    assert!(holds(c("args.nope", "not_contains", json!("x")), a));
}

// ----- starts_with / ends_with -----

#[test]
fn starts_and_ends_with() {
    let a = json!({"p": "/etc/passwd", "n": 12345, "arr": ["/etc"]});
    assert!(holds(c("args.p", "starts_with", json!("/etc/")), a.clone()));
    assert!(!holds(
        c("args.p", "starts_with", json!("/ETC/")),
        a.clone()
    ));
    assert!(holds(c("args.p", "ends_with", json!("wd")), a.clone()));
    assert!(!holds(c("args.p", "ends_with", json!("/etc")), a.clone()));
    assert!(!holds(c("args.n", "starts_with", json!("123")), a.clone()));
    assert!(!holds(
        c("args.arr", "starts_with", json!("/etc")),
        a.clone()
    ));
    assert!(!holds(c("args.nope", "ends_with", json!("")), a.clone()));
    assert!(holds(
        c("tool.qualifiedName", "starts_with", json!("srv.")),
        a
    ));
    let e = compile_err(
        json!([{"name": "r", "conditions": [c("args.p", "starts_with", json!(1))],
                                "action": {"type": "block"}}]),
    );
    assert_eq!(e.path, "[0].conditions[0].value");
    let e = compile_err(
        json!([{"name": "r", "conditions": [c("args.p", "ends_with", json!(["x"]))],
                                "action": {"type": "block"}}]),
    );
    assert_eq!(e.path, "[0].conditions[0].value");
}

// ----- matches -----

#[test]
fn matches_regex_on_strings_and_numbers() {
    let a = json!({"cmd": "rm -rf /", "n": 12345, "f": 1.5, "neg": -7, "b": true, "arr": ["rm"]});
    assert!(holds(
        c("args.cmd", "matches", json!(r"\brm\s+-rf\b")),
        a.clone()
    ));
    assert!(!holds(c("args.cmd", "matches", json!("^ls")), a.clone()));
    assert!(holds(c("args.cmd", "matches", json!("(?i)RM")), a.clone()));
    assert!(holds(c("args.n", "matches", json!("^123")), a.clone()));
    assert!(holds(c("args.f", "matches", json!(r"^1\.5$")), a.clone()));
    assert!(holds(c("args.neg", "matches", json!("^-7$")), a.clone()));
    assert!(!holds(c("args.b", "matches", json!("true")), a.clone()));
    assert!(!holds(c("args.arr", "matches", json!("rm")), a.clone()));
    assert!(!holds(c("args.nope", "matches", json!(".*")), a));
}

#[test]
fn compiling_lets_go_of_the_compilers_that_checked_its_patterns() {
    let one = |v: &str| {
        json!([{"name": "r", "conditions": [c("args.p", "matches", json!(v))],
                                "action": {"type": "block"}}])
    };
    rules(one("^/etc/"));
    assert!(!super::pattern::kept(), "after a load");
    compile_err(one("(unclosed"));
    assert!(!super::pattern::kept(), "after a refused load");
}

#[test]
fn bad_regex_is_a_compile_error_with_its_path() {
    let e = compile_err(json!([
        {"name": "a", "action": {"type": "allow"}},
        {"name": "b", "conditions": [c("args.x", "equals", json!(1)), c("args.cmd", "matches", json!("(unclosed"))],
         "action": {"type": "block"}}
    ]));
    assert_eq!(e.path, "[1].conditions[1].value");
    assert!(e.message.contains("regular expression"), "{e}");
    let e = compile_err(
        json!([{"name": "b", "conditions": [c("args.cmd", "matches", json!(5))],
                                "action": {"type": "block"}}]),
    );
    assert_eq!(e.path, "[0].conditions[0].value");
}

// ----- matches conditions searched together -----

/// The rule deciding a call when every `matches` pattern is evaluated alone, as if no group were
/// worth a search: what the grouped evaluation must agree with.
fn decide_one_by_one<'s>(set: &'s RuleSet, tool: &ToolMeta, args: &Value) -> Option<&'s str> {
    let rt = runtime();
    let args = Json::from(args);
    let call = CallFacts {
        tool,
        args: &args,
        runtime: &rt,
    };
    let alone = Selection {
        groups: 0,
        ..set.select(tool)
    };
    set.evaluate_selected(&alone, &call).map(|r| &*r.name)
}

/// Every combination of `choices` (a key and its values; `None` leaves the key out).
fn combinations(choices: &[(&str, Vec<Option<Value>>)]) -> Vec<Value> {
    let mut all = vec![json!({})];
    for (key, values) in choices {
        all = all
            .iter()
            .flat_map(|args| {
                values.iter().map(move |v| {
                    let mut args = args.clone();
                    if let (Some(v), Some(map)) = (v, args.as_object_mut()) {
                        map.insert((*key).to_string(), v.clone());
                    }
                    args
                })
            })
            .collect();
    }
    all
}

/// Asserts that grouped and one-by-one evaluation decide every call alike, that the groups were
/// searched, and returns how many calls each rule decided.
fn grouping_agrees(set: &RuleSet, tools: &[ToolMeta], calls: &[Value]) -> Vec<usize> {
    let mut decided = vec![0; set.rules().len()];
    for t in tools {
        assert_ne!(set.select(t).groups, 0, "no group searched for {}", t.name);
        for args in calls {
            let grouped = decide(set, t, args);
            assert_eq!(
                grouped,
                decide_one_by_one(set, t, args),
                "{} with {args}",
                t.name
            );
            if let Some(i) = set.rules().iter().position(|r| Some(&*r.name) == grouped) {
                decided[i] += 1;
            }
        }
    }
    decided
}

#[test]
fn grouped_regexes_decide_as_each_regex_alone() {
    let m = |field: &str, re: &str| c(field, "matches", json!(re));
    let set = rules(json!([
        {"name": "etc", "conditions": [m("args.path", "^/etc/"), c("args.user", "in", json!(["root"]))],
         "action": {"type": "block"}},
        {"name": "ssh", "conditions": [m("args.path", r"(?i)^/home/[^/]+/\.SSH/")], "action": {"type": "block"}},
        {"name": "keys", "conditions": [m("args.path", r"(?i)\.(pem|key)$"), c("args.path", "not_contains", json!("public"))],
         "action": {"type": "require_approval"}},
        {"name": "big-csv", "conditions": [m("args.path", r"\.csv$"), c("args.limit", "greater", json!(1000))],
         "action": {"type": "warn"}},
        {"name": "sql", "conditions": [m("args.message", r"(?i)drop\s+table"), m("args.message", r"(?i)\busers\b")],
         "action": {"type": "block"}},
        {"name": "secret", "conditions": [m("args.message", r"secret-\d+")], "action": {"type": "block"}},
        {"name": "thousands", "conditions": [m("args.limit", r"^1\d{3}$")], "action": {"type": "warn"}},
        {"name": "half", "conditions": [m("args.ratio", r"^0\.5$")], "action": {"type": "warn"}},
        {"name": "negative", "conditions": [m("args.limit", "^-"), m("tool.name", "^read")], "action": {"type": "block"}},
        {"name": "tmp-reads", "conditions": [m("tool.name", "(?i)^READ_"), m("tool.name", "file$"), m("args.path", "^/tmp/")],
         "action": {"type": "allow"}},
        {"name": "missing", "conditions": [m("args.nope", ".*"), m("args.nope", "")], "action": {"type": "block"}},
        {"name": "not-text", "conditions": [m("args.flag", "true"), m("args.flag", "^t")], "action": {"type": "block"}},
        {"name": "array", "conditions": [m("args.tags", "bench"), m("args.tags", "")], "action": {"type": "block"}},
        {"name": "any-path", "conditions": [m("args.path", "."), m("args.message", "^h")], "action": {"type": "warn"}},
        {"name": "empty-path", "conditions": [m("args.path", "^$")], "action": {"type": "allow"}}
    ]));
    let some = |vs: &[Value]| vs.iter().cloned().map(Some).collect::<Vec<_>>();
    let long_key = format!("/srv/{}.pem", "x".repeat(5000));
    let mut paths = some(&[
        json!("/etc/passwd"),
        json!("/home/bob/.ssh/id"),
        json!("/HOME/bob/.SSH/id"),
        json!("/srv/a.PEM"),
        json!("/srv/public.key"),
        json!("/srv/data.csv"),
        json!("/tmp/x"),
        json!(""),
        json!(long_key),
        json!(12),
    ]);
    paths.push(None);
    let mut messages = some(&[
        json!("please DROP  TABLE users"),
        json!("drop table orders"),
        json!("secret-42"),
        json!("hello"),
    ]);
    messages.push(None);
    let mut limits = some(&[json!(1500), json!("1500"), json!(-3), json!(5000)]);
    limits.push(None);
    let calls = combinations(&[
        ("path", paths),
        ("message", messages),
        ("limit", limits),
        ("ratio", some(&[json!(0.5), json!("0.5"), json!(0.25)])),
        ("user", some(&[json!("root"), json!("bob")])),
        (
            "flag",
            some(&[json!(true), json!(null), json!({"t": "true"})]),
        ),
        ("tags", some(&[json!(["bench"])])),
    ]);
    let decided = grouping_agrees(&set, &[tool("read_file"), tool("write_file")], &calls);
    // Every rule but those that can never match decides some call.
    for (rule, n) in set.rules().iter().zip(&decided) {
        let never = ["missing", "not-text", "array"].contains(&&*rule.name);
        assert_eq!(*n == 0, never, "rule {:?} decided {n} calls", rule.name);
    }
}

#[test]
fn many_patterns_on_one_field_and_many_fields_still_agree() {
    // More patterns on one field than a group holds, and more fields than a rule set has groups.
    let mut list: Vec<Value> = (0..70)
        .map(|i| {
            json!({"name": format!("p{i}"), "conditions": [c("args.path", "matches", json!(format!("^/p{i}/")))],
                   "action": {"type": "block"}})
        })
        .collect();
    for f in 0..10 {
        list.push(json!({"name": format!("f{f}"),
            "conditions": [c(&format!("args.k{f}"), "matches", json!("^x")), c(&format!("args.k{f}"), "matches", json!("y$"))],
            "action": {"type": "warn"}}));
    }
    let set = rules(Value::Array(list));
    assert_eq!(set.groups.len(), MAX_GROUPS);
    let mut calls: Vec<Value> = [0, 1, 7, 63, 64, 65, 69, 70]
        .iter()
        .map(|i| json!({"path": format!("/p{i}/x"), "k9": "xy"}))
        .collect();
    calls.extend((0..10).map(|f| json!({format!("k{f}"): "x-y", "path": "/p70/"})));
    calls.extend((0..10).map(|f| json!({format!("k{f}"): "x-z"})));
    let decided = grouping_agrees(&set, &[tool("x")], &calls);
    assert_eq!(decided.iter().sum::<usize>(), 18);
}

#[test]
fn a_group_is_searched_only_for_tools_that_read_two_of_its_patterns() {
    let set = rules(json!([
        {"name": "a", "verbMatchers": [{"type": "verb", "value": "read_*"}],
         "conditions": [c("args.path", "matches", json!("^/etc/"))], "action": {"type": "block"}},
        {"name": "b", "verbMatchers": [{"type": "verb", "value": "write_*"}],
         "conditions": [c("args.path", "matches", json!("^/root/"))], "action": {"type": "block"}},
        {"name": "c", "verbMatchers": [{"type": "verb", "value": "*_file"}],
         "conditions": [c("args.path", "matches", json!("^/etc/"))], "action": {"type": "warn"}}
    ]));
    assert_eq!(set.groups.len(), 1);
    assert_eq!(set.all_groups, 1);
    assert_eq!(set.select(&tool("read_dir")).groups, 0);
    // `c` repeats `a`'s pattern: one pattern, evaluated alone.
    assert_eq!(set.select(&tool("read_file")).groups, 0);
    assert_eq!(set.select(&tool("write_file")).groups, 1);
    let t = tool("write_file");
    assert_eq!(decide(&set, &t, &json!({"path": "/etc/x"})), Some("c"));
    assert_eq!(decide(&set, &t, &json!({"path": "/root/x"})), Some("b"));
    assert_eq!(
        decide(&set, &tool("read_file"), &json!({"path": "/etc/x"})),
        Some("a")
    );
}

// ----- in / not_in -----

#[test]
fn in_and_not_in() {
    let a = json!({"env": "prod", "n": 3, "ns": "3"});
    assert!(holds(
        c("args.env", "in", json!(["dev", "prod"])),
        a.clone()
    ));
    assert!(!holds(
        c("args.env", "in", json!(["dev", "PROD"])),
        a.clone()
    ));
    assert!(holds(c("args.n", "in", json!(["3", 4])), a.clone()));
    assert!(holds(c("args.ns", "in", json!([3.0])), a.clone()));
    assert!(!holds(c("args.env", "in", json!([])), a.clone()));
    assert!(holds(c("args.env", "not_in", json!(["dev"])), a.clone()));
    assert!(!holds(c("args.env", "not_in", json!(["prod"])), a.clone()));
    assert!(!holds(c("args.nope", "in", json!([null])), a.clone()));
    assert!(holds(c("args.nope", "not_in", json!(["x"])), a));
}

#[test]
fn in_needs_an_array() {
    for op in ["in", "not_in"] {
        let e = compile_err(
            json!([{"name": "r", "conditions": [c("args.env", op, json!("prod"))],
                                    "action": {"type": "block"}}]),
        );
        assert_eq!(e.path, "[0].conditions[0].value");
        assert!(e.message.contains("array"), "{e}");
    }
}

// ----- exists / not_exists and paths -----

#[test]
fn exists_and_paths() {
    let a = json!({"z": null, "items": [{"name": "a"}, {"name": "b"}], "map": {"0": "zero"},
                   "deep": {"x": {"y": 1}}});
    assert!(holds(c0("args.z", "exists"), a.clone()));
    assert!(!holds(c0("args.z", "not_exists"), a.clone()));
    assert!(!holds(c0("args.nope", "exists"), a.clone()));
    assert!(holds(c0("args.nope", "not_exists"), a.clone()));
    assert!(holds(
        c("args.items.1.name", "equals", json!("b")),
        a.clone()
    ));
    assert!(!holds(c0("args.items.2.name", "exists"), a.clone()));
    assert!(!holds(c0("args.items.name", "exists"), a.clone()));
    assert!(holds(c("args.map.0", "equals", json!("zero")), a.clone()));
    assert!(holds(c("args.deep.x.y", "equals", json!(1)), a.clone()));
    assert!(!holds(c0("args.deep.x.y.z", "exists"), a.clone()));
    assert!(holds(c0("args", "exists"), a.clone()));
    assert!(holds(c("args", "equals", json!({})), json!({})));
    // The value of exists is ignored.
    assert!(holds(c("args.z", "exists", json!(false)), a));
}

#[test]
fn args_keys_fall_back_to_ascii_case_insensitive() {
    let rule = c("args.path", "starts_with", json!("/etc"));
    assert!(holds(rule.clone(), json!({"Path": "/etc/shadow"})));
    assert!(holds(rule.clone(), json!({"PATH": "/etc/shadow"})));
    assert!(!holds(rule, json!({"Paths": "/etc/shadow"})));
    // The exact key is preferred.
    assert!(holds(
        c("args.path", "equals", json!("a")),
        json!({"PATH": "b", "path": "a"})
    ));
    assert!(holds(
        c("args.Outer.INNER", "equals", json!(1)),
        json!({"outer": {"inner": 1}})
    ));
}

#[test]
fn fixed_fields() {
    let a = json!({});
    let checks = [
        ("tool.name", "read_file"),
        ("tool.qualifiedName", "srv.read_file"),
        ("tool.qualified_name", "srv.read_file"),
        ("tool.provider", "mcp"),
        ("tool.riskLevel", "medium"),
        ("tool.risk_level", "medium"),
        ("action.type", "execute"),
        ("action.name", "srv.read_file"),
        ("resource.type", "internal_api"),
        ("resource.provider", "srv"),
        ("resource.environment", "production"),
        ("runtime.mode", "enforce"),
        ("runtime.agentKey", "agent-1"),
        ("runtime.agent_key", "agent-1"),
        ("runtime.server", "srv"),
        ("runtime.environment", "production"),
        ("runtime.runId", "run_mcp_0123456789ab"),
        ("runtime.run_id", "run_mcp_0123456789ab"),
    ];
    for (field, want) in checks {
        assert!(holds(c(field, "equals", json!(want)), a.clone()), "{field}");
        assert!(
            !holds(c(field, "equals", json!("other")), a.clone()),
            "{field}"
        );
    }
    // resource.externalId is absent unless declared.
    assert!(!holds(c0("resource.externalId", "exists"), a.clone()));
    assert!(holds(c0("resource.external_id", "not_exists"), a.clone()));
    // runtime.environment absent.
    let set = rules(
        json!([{"name": "r", "conditions": [c0("runtime.environment", "not_exists")],
                            "action": {"type": "block"}}]),
    );
    let rt = Runtime::default();
    let t = tool("x");
    let a = Json::from(&a);
    let call = CallFacts {
        tool: &t,
        args: &a,
        runtime: &rt,
    };
    assert_eq!(set.evaluate(&call).map(|r| &*r.name), Some("r"));
}

#[test]
fn field_errors_have_paths() {
    let bad_field = |field: &str| {
        compile_err(json!([
            {"name": "a", "action": {"type": "allow"}},
            {"name": "b", "conditions": [c0("args.ok", "exists"), c0(field, "exists")], "action": {"type": "block"}}
        ]))
    };
    for f in [
        "arguments.x",
        "Args.x",
        "",
        "args..x",
        "args.",
        "tool",
        "tool.nme",
        "tool.name.x",
        "action.kind",
        "resource.env",
        "runtime.user",
        "runtime",
    ] {
        let e = bad_field(f);
        assert_eq!(e.path, "[1].conditions[1].field", "{f}");
    }
    assert!(bad_field("arguments.x").message.contains("unknown root"));
}

// ----- matchers -----

#[test]
fn verb_matchers() {
    let set = rules(json!([
        {"name": "stripe", "verbMatchers": [{"type": "verb", "value": "stripe:*"}], "action": {"type": "block"}},
        {"name": "deletes", "verbMatchers": [{"type": "verb", "value": "*delete*"}], "action": {"type": "block"}},
        {"name": "fsread", "verbMatchers": [{"type": "verb", "value": "filesystem.read_*"}], "action": {"type": "allow"}},
        {"name": "one", "verbMatchers": [{"type": "verb", "value": "get_?"}], "action": {"type": "allow"}}
    ]));
    let none = json!({});
    assert_eq!(decide(&set, &tool("stripe:refund"), &none), Some("stripe"));
    assert_eq!(
        decide(&set, &tool("Bulk_Delete_Rows"), &none),
        Some("deletes")
    );
    assert_eq!(
        decide(&set, &tool_in("filesystem", "read_file"), &none),
        Some("fsread")
    );
    assert_eq!(decide(&set, &tool_in("fs", "read_file"), &none), None);
    assert_eq!(decide(&set, &tool("get_x"), &none), Some("one"));
    assert_eq!(decide(&set, &tool("get_xy"), &none), None);
    // A server name that contains the pattern matches through the qualified name.
    assert_eq!(
        decide(&set, &tool_in("delete-svc", "list"), &none),
        Some("deletes")
    );
}

#[test]
fn risk_provider_and_server_matchers() {
    let set = rules(json!([
        {"name": "crit", "verbMatchers": [{"type": "riskLevel", "value": "CRITICAL"}], "action": {"type": "block"}},
        {"name": "gh", "verbMatchers": [{"type": "provider", "value": "GitHub"}], "action": {"type": "warn"}},
        {"name": "srv", "verbMatchers": [{"type": "server", "value": "prod-*"}], "action": {"type": "require_approval"}},
        {"name": "any", "verbMatchers": [{"type": "riskLevel", "value": "low"}, {"type": "verb", "value": "list_*"}],
         "action": {"type": "allow"}}
    ]));
    let none = json!({});
    assert_eq!(decide(&set, &tool("deploy_app"), &none), Some("crit"));
    let cat = ToolCatalog::new(
        "srv",
        None,
        vec![(
            "pr_*".into(),
            serde_json::from_value(json!({"provider": "github"})).unwrap(),
        )],
    )
    .unwrap();
    assert_eq!(decide(&set, &cat.describe("pr_open"), &none), Some("gh"));
    assert_eq!(
        decide(&set, &tool_in("PROD-db", "query"), &none),
        Some("srv")
    );
    assert_eq!(decide(&set, &tool_in("dev-db", "query"), &none), None);
    assert_eq!(decide(&set, &tool("list_things"), &none), Some("any"));
    let low = ToolCatalog::new(
        "srv",
        None,
        vec![(
            "peek".into(),
            serde_json::from_value(json!({"riskLevel": "low"})).unwrap(),
        )],
    )
    .unwrap()
    .describe("peek");
    assert_eq!(decide(&set, &low, &none), Some("any"));
}

#[test]
fn matcher_errors() {
    let e = compile_err(json!([{"name": "r", "verbMatchers": [], "action": {"type": "block"}}]));
    assert_eq!(e.path, "[0].verbMatchers");
    let e = compile_err(json!([
        {"name": "a", "action": {"type": "allow"}},
        {"name": "r", "verbMatchers": [{"type": "verb", "value": "x"}, {"type": "riskLevel", "value": "severe"}],
         "action": {"type": "block"}}
    ]));
    assert_eq!(e.path, "[1].verbMatchers[1].value");
    let e = compile_err(
        json!([{"name": "r", "verbMatchers": [{"type": "verb", "value": ""}],
                                "action": {"type": "block"}}]),
    );
    assert_eq!(e.path, "[0].verbMatchers[0].value");
    let err = serde_json::from_value::<Vec<RawRule>>(json!([
        {"name": "r", "verbMatchers": [{"type": "tool", "value": "x"}], "action": {"type": "block"}}
    ]))
    .unwrap_err();
    assert!(err.to_string().contains("unknown variant `tool`"), "{err}");
}

// ----- rule-level behaviour -----

#[test]
fn first_match_wins_and_no_match_is_none() {
    let set = rules(json!([
        {"name": "big", "conditions": [c("args.amount", "greater", json!(1000))], "action": {"type": "require_approval"}},
        {"name": "any-charge", "verbMatchers": [{"type": "verb", "value": "*charge*"}], "action": {"type": "warn"}},
        {"name": "never", "verbMatchers": [{"type": "verb", "value": "*charge*"}], "action": {"type": "block"}}
    ]));
    let t = tool("create_charge");
    assert_eq!(decide(&set, &t, &json!({"amount": "5000"})), Some("big"));
    assert_eq!(decide(&set, &t, &json!({"amount": 10})), Some("any-charge"));
    assert_eq!(decide(&set, &tool("read"), &json!({"amount": 10})), None);
    let r = &set.rules()[0];
    assert_eq!(r.decision, Decision::RequireApproval);
    assert_eq!(r.index(), 0);
    assert_eq!(set.rules()[2].index(), 2);
}

#[test]
fn actions_map_to_decisions() {
    let set = rules(json!([
        {"name": "a", "action": {"type": "allow"}},
        {"name": "w", "action": {"type": "warn"}},
        {"name": "n", "action": {"type": "notify"}, "reason": "heads up"},
        {"name": "b", "action": {"type": "block"}},
        {"name": "q", "action": {"type": "require_approval"}}
    ]));
    let got: Vec<Decision> = set.rules().iter().map(|r| r.decision).collect();
    assert_eq!(
        got,
        [
            Decision::Allow,
            Decision::Warn,
            Decision::Warn,
            Decision::Block,
            Decision::RequireApproval
        ]
    );
    assert_eq!(set.rules()[2].action(), RuleActionKind::Notify);
    assert_eq!(set.rules()[2].reason.as_deref(), Some("heads up"));
}

#[test]
fn all_conditions_must_hold() {
    let set = rules(json!([{"name": "r", "conditions": [
        c("args.amount", "greater", json!(100)),
        c("resource.environment", "equals", json!("production"))
    ], "action": {"type": "block"}}]));
    assert_eq!(
        decide(&set, &tool("pay"), &json!({"amount": 101})),
        Some("r")
    );
    assert_eq!(decide(&set, &tool("pay"), &json!({"amount": 99})), None);
    let staging = ToolCatalog::new("srv", Some("staging"), vec![])
        .unwrap()
        .describe("pay");
    assert_eq!(decide(&set, &staging, &json!({"amount": 101})), None);
}

#[test]
fn rule_shape_errors() {
    let e = compile_err(json!([{"name": "  ", "action": {"type": "block"}}]));
    assert_eq!(e.path, "[0].name");
    let err = serde_json::from_value::<Vec<RawRule>>(json!([
        {"name": "r", "conditions": [{"field": "args.x", "operator": "regex", "value": "x"}],
         "action": {"type": "block"}}
    ]))
    .unwrap_err();
    assert!(err.to_string().contains("unknown variant `regex`"), "{err}");
    let err = serde_json::from_value::<Vec<RawRule>>(json!([
        {"name": "r", "action": {"type": "deny"}}
    ]))
    .unwrap_err();
    assert!(err.to_string().contains("unknown variant `deny`"), "{err}");
    let err = serde_json::from_value::<Vec<RawRule>>(json!([
        {"name": "r", "action": {"type": "block"}, "verbmatchers": []}
    ]))
    .unwrap_err();
    assert!(err.to_string().contains("unknown field"), "{err}");
    let err = serde_json::from_value::<Vec<RawRule>>(json!([
        {"name": "r", "action": {"type": "block"}, "conditions": [{"field": "args.x", "operator": "exists", "op": 1}]}
    ]))
    .unwrap_err();
    assert!(err.to_string().contains("unknown field"), "{err}");
    // An explicit null value is a value.
    let raw = parse(
        json!([{"name": "r", "conditions": [c("args.x", "equals", json!(null))],
                            "action": {"type": "block"}}]),
    );
    assert_eq!(
        raw[0].conditions.as_ref().unwrap()[0].value,
        Some(Value::Null)
    );
    let e = compile_err(json!([{"name": "r", "conditions": [c0("args.x", "equals")],
                                "action": {"type": "block"}}]));
    assert_eq!(e.path, "[0].conditions[0].value");
    assert_eq!(
        e.to_string(),
        "[0].conditions[0].value: `equals` needs a value"
    );
}

#[test]
fn no_operator_panics_on_any_value() {
    let values = [
        json!(null),
        json!(true),
        json!(0),
        json!(-1.5),
        json!(u64::MAX),
        json!(""),
        json!("  "),
        json!("1e999"),
        json!("é"),
        json!([]),
        json!([null, "x", 1]),
        json!({}),
        json!({"a": {"b": [1]}}),
    ];
    let ops_with = [
        ("equals", json!("x")),
        ("not_equals", json!(1)),
        ("greater", json!(0)),
        ("greater_or_equal", json!("0")),
        ("less", json!(1)),
        ("less_or_equal", json!(1.5)),
        ("contains", json!("x")),
        ("not_contains", json!(1)),
        ("starts_with", json!("x")),
        ("ends_with", json!("")),
        ("matches", json!(".")),
        ("in", json!([1, "x", null])),
        ("not_in", json!([])),
        ("exists", json!(null)),
        ("not_exists", json!(null)),
    ];
    for v in &values {
        for (op, val) in &ops_with {
            for field in ["args.v", "args.v.a.b.0", "args.v.0", "args"] {
                let args = json!({ "v": v });
                let got = holds(c(field, op, val.clone()), args);
                // Negative and positive of the same pair never both match a present value.
                if *op == "equals" {
                    let neg = holds(c(field, "not_equals", val.clone()), json!({ "v": v }));
                    assert_ne!(got, neg, "{field} {v}");
                }
            }
        }
    }
}

// ----- always_blocks -----

#[test]
fn always_blocks_static_block() {
    let set = rules(json!([
        {"name": "rm", "verbMatchers": [{"type": "verb", "value": "*delete*"}], "action": {"type": "block"}},
        {"name": "prod", "conditions": [c("resource.environment", "equals", json!("production"))],
         "verbMatchers": [{"type": "verb", "value": "deploy*"}], "action": {"type": "block"}}
    ]));
    let rt = runtime();
    assert!(set.always_blocks(&tool("delete_file"), &rt, None));
    assert!(set.always_blocks(&tool("deploy"), &rt, None));
    let staging = ToolCatalog::new("srv", Some("staging"), vec![])
        .unwrap()
        .describe("deploy");
    assert!(!set.always_blocks(&staging, &rt, None));
    assert!(set.always_blocks(&staging, &rt, Some(Decision::Block)));
    assert!(!set.always_blocks(&tool("read_file"), &rt, Some(Decision::Allow)));
}

#[test]
fn always_blocks_args_dependent_rules() {
    let rt = runtime();
    let t = tool("run_query");
    // args-dependent block, then the fallback blocks: always blocked.
    let set = rules(json!([
        {"name": "big", "conditions": [c("args.limit", "greater", json!(100))], "action": {"type": "block"}}
    ]));
    assert!(set.always_blocks(&t, &rt, Some(Decision::Block)));
    assert!(!set.always_blocks(&t, &rt, Some(Decision::RequireApproval)));
    // The service decides: not always blocked.
    assert!(!set.always_blocks(&t, &rt, None));
    // args-dependent block, then a static block.
    let set = rules(json!([
        {"name": "big", "conditions": [c("args.limit", "greater", json!(100))], "action": {"type": "block"}},
        {"name": "all", "action": {"type": "block"}}
    ]));
    assert!(set.always_blocks(&t, &rt, None));
    // args-dependent allow: the call may go through.
    let set = rules(json!([
        {"name": "small", "conditions": [c("args.limit", "less", json!(10))], "action": {"type": "allow"}},
        {"name": "all", "action": {"type": "block"}}
    ]));
    assert!(!set.always_blocks(&t, &rt, Some(Decision::Block)));
    // An args-dependent allow that is statically impossible for this tool is skipped.
    let set = rules(json!([
        {"name": "small-dev", "conditions": [
            c("resource.environment", "equals", json!("dev")),
            c("args.limit", "less", json!(10))
        ], "action": {"type": "allow"}},
        {"name": "all", "action": {"type": "block"}}
    ]));
    assert!(set.always_blocks(&t, &rt, None));
    // A static allow first.
    let set = rules(json!([
        {"name": "ok", "verbMatchers": [{"type": "verb", "value": "run_*"}], "action": {"type": "allow"}},
        {"name": "all", "action": {"type": "block"}}
    ]));
    assert!(!set.always_blocks(&t, &rt, Some(Decision::Block)));
    assert!(set.always_blocks(&tool("other"), &rt, None));
    // Empty set: the fallback.
    let empty = RuleSet::default();
    assert!(empty.always_blocks(&t, &rt, Some(Decision::Block)));
    assert!(!empty.always_blocks(&t, &rt, Some(Decision::Warn)));
    assert!(!empty.always_blocks(&t, &rt, None));
}

// ----- check output -----

#[test]
fn warnings_report_unreachable_duplicates_and_ignored_values() {
    let set = rules(json!([
        {"name": "a", "verbMatchers": [{"type": "verb", "value": "x"}], "action": {"type": "allow"}},
        {"name": "a", "conditions": [c("args.x", "exists", json!(true))], "action": {"type": "warn"}},
        {"name": "all", "verbMatchers": [{"type": "verb", "value": "*"}], "action": {"type": "block"}},
        {"name": "late", "action": {"type": "allow"}}
    ]));
    let w = set.warnings();
    assert_eq!(w.len(), 3, "{w:#?}");
    assert!(
        w.iter()
            .any(|s| s.contains("[1]") && s.contains("same name")),
        "{w:#?}"
    );
    assert!(
        w.iter()
            .any(|s| s.contains("\"late\"") && s.contains("never match") && s.contains("\"all\"")),
        "{w:#?}"
    );
    assert!(w.iter().any(|s| s.contains("ignores its value")), "{w:#?}");
    let clean = rules(json!([
        {"name": "a", "verbMatchers": [{"type": "verb", "value": "x*"}], "action": {"type": "allow"}},
        {"name": "b", "action": {"type": "block"}}
    ]));
    assert!(clean.warnings().is_empty());
}

#[test]
fn describe_is_one_line_with_everything() {
    let set = rules(json!([
        {"name": "big-charges", "verbMatchers": [{"type": "verb", "value": "stripe:*"}, {"type": "riskLevel", "value": "high"}],
         "conditions": [c("args.amount", "greater", json!(500)), c0("args.note", "exists")],
         "action": {"type": "notify"}, "reason": "large\ncharge"},
        {"name": "all", "action": {"type": "block"}}
    ]));
    let d = set.rules()[0].describe();
    assert_eq!(
        d,
        "big-charges: verb \"stripe:*\" or riskLevel high if args.amount greater 500 and args.note exists -> notify (\"large\\ncharge\")"
    );
    assert!(!d.contains('\n'));
    assert_eq!(set.rules()[1].describe(), "all: every tool -> block");
}

// ----- timing (run with `cargo test --release -- --ignored --nocapture`) -----

/// Nanoseconds per call of `f`: the best of 30 batches, so that other processes on a shared
/// box (preemption, cache pollution) inflate the figure as little as possible.
fn per_call(mut f: impl FnMut()) -> f64 {
    let batch = 10_000u32;
    for _ in 0..batch {
        f();
    }
    (0..30)
        .map(|_| {
            let start = std::time::Instant::now();
            for _ in 0..batch {
                f();
            }
            start.elapsed().as_nanos() as f64 / f64::from(batch)
        })
        .fold(f64::INFINITY, f64::min)
}

fn time_per_call(set: &RuleSet, t: &ToolMeta, args: &Value) -> f64 {
    let rt = runtime();
    let args = Json::from(args);
    let call = CallFacts {
        tool: t,
        args: &args,
        runtime: &rt,
    };
    per_call(|| {
        std::hint::black_box(set.evaluate(std::hint::black_box(&call)));
    })
}

#[test]
#[ignore]
fn timing_100_non_matching_rules() {
    let args =
        json!({"path": "/tmp/x", "amount": 5, "recursive": false, "options": {"mode": "fast"}});
    let t = tool("read_file");
    let mk =
        |f: &dyn Fn(usize) -> Value| -> RuleSet { rules(Value::Array((0..100).map(f).collect())) };
    let literal = mk(
        &|i| json!({"name": format!("r{i}"), "verbMatchers": [{"type": "verb", "value": format!("tool_{i}")}], "action": {"type": "block"}}),
    );
    let globs = mk(
        &|i| json!({"name": format!("r{i}"), "verbMatchers": [{"type": "verb", "value": format!("*delete_{i}*")}, {"type": "verb", "value": format!("srv?.x{i}*y")}], "action": {"type": "block"}}),
    );
    let args_num = mk(
        &|i| json!({"name": format!("r{i}"), "conditions": [c("args.amount", "greater", json!(1000 + i))], "action": {"type": "block"}}),
    );
    let args_miss = mk(
        &|i| json!({"name": format!("r{i}"), "conditions": [c("args.Target", "starts_with", json!(format!("/etc/{i}")))], "action": {"type": "block"}}),
    );
    let mixed = mk(&|i| match i % 4 {
        0 => {
            json!({"name": format!("r{i}"), "verbMatchers": [{"type": "verb", "value": format!("*write*{i}")}], "action": {"type": "block"}})
        }
        1 => {
            json!({"name": format!("r{i}"), "conditions": [c("args.path", "matches", json!(format!("^/etc/{i}")))], "action": {"type": "block"}})
        }
        2 => {
            json!({"name": format!("r{i}"), "conditions": [c("args.options.mode", "in", json!(["slow", format!("m{i}")]))], "action": {"type": "block"}})
        }
        _ => {
            json!({"name": format!("r{i}"), "conditions": [c("resource.environment", "equals", json!("dev")), c("args.amount", "greater", json!(i))], "action": {"type": "block"}})
        }
    });
    let mut worst = 0.0f64;
    for (label, set) in [
        ("literal verbs", &literal),
        ("glob verbs", &globs),
        ("args numeric", &args_num),
        ("args missing key", &args_miss),
        ("mixed", &mixed),
    ] {
        assert_eq!(decide(set, &t, &args), None);
        let ns = time_per_call(set, &t, &args);
        eprintln!("100 non-matching rules, {label}: {ns:.0} ns per evaluate");
        worst = worst.max(ns);
    }
    let cat = ToolCatalog::new("srv", Some("production"), vec![]).unwrap();
    let ns = per_call(|| {
        std::hint::black_box(cat.describe(std::hint::black_box("read_file")));
    });
    eprintln!("ToolCatalog::describe: {ns:.0} ns");
    assert!(worst < 2000.0, "worst {worst} ns");
}

/// The benchmark's regex rules (benches/rules.rs): `n - 1` failing `matches` conditions over
/// `args.path` and `args.message`, then an `allow`.
fn bench_regex_rules(n: usize) -> RuleSet {
    let mut list: Vec<Value> = (0..n - 1)
        .map(|i| {
            let (field, re) = match i % 5 {
                0 => ("args.path", format!("^/etc/{i}/")),
                1 => ("args.path", format!(r"(?i)\.(pem|key|p{i})$")),
                2 => ("args.message", format!(r"(?i)drop\s+table\s+t{i}")),
                3 => ("args.path", format!(r"^/home/[^/]+/\.ssh{i}/")),
                _ => ("args.message", format!("secret-{i}")),
            };
            json!({"name": format!("r{i}"), "conditions": [c(field, "matches", json!(re))],
                   "action": {"type": "block"}})
        })
        .collect();
    list.push(json!({"name": "allow", "action": {"type": "allow"}}));
    rules(Value::Array(list))
}

#[test]
#[ignore]
fn timing_grouped_regexes() {
    let rt = runtime();
    let t = tool("read_file");
    let long_message = "lorem ipsum dolor sit amet, consectetur adipiscing elit. ".repeat(1100);
    let long_path = format!("/srv/{}/data.csv", "segment/".repeat(600));
    let cases = [
        (
            "short",
            json!({"path": "/srv/data/reports/2026/q3/summary-1.csv", "message": "hello from the benchmark"}),
        ),
        (
            "64 KB message",
            json!({"path": "/srv/data/x.csv", "message": long_message}),
        ),
        ("5 KB path", json!({"path": long_path, "message": "hello"})),
    ];
    for n in [10, 100] {
        let start = std::time::Instant::now();
        let set = bench_regex_rules(n);
        let compile = start.elapsed();
        let selection = set.select(&t);
        let alone = Selection {
            groups: 0,
            ..selection.clone()
        };
        for (i, (label, args)) in cases.iter().enumerate() {
            let args = Json::from(args);
            let call = CallFacts {
                tool: &t,
                args: &args,
                runtime: &rt,
            };
            let start = std::time::Instant::now();
            let first = set.evaluate_selected(&selection, &call).map(|r| &*r.name);
            let first_call = start.elapsed();
            assert_eq!(first, Some("allow"));
            let grouped = per_call(|| {
                std::hint::black_box(
                    set.evaluate_selected(&selection, std::hint::black_box(&call)),
                );
            });
            let one_by_one = per_call(|| {
                std::hint::black_box(set.evaluate_selected(&alone, std::hint::black_box(&call)));
            });
            if i == 0 {
                eprintln!(
                    "{n} regex rules: compile {:.2} ms, first call (builds the searches) {:.2} ms",
                    compile.as_secs_f64() * 1e3,
                    first_call.as_secs_f64() * 1e3
                );
            }
            eprintln!(
                "  {label}: grouped {grouped:.0} ns, one by one {one_by_one:.0} ns per evaluate"
            );
        }
    }
}

#[test]
fn conditions_keep_their_written_order_in_check_output() {
    let set = rules(json!([{"name": "r", "conditions": [
        c("args.amount", "greater", json!(1)),
        c("tool.name", "equals", json!("pay")),
        c("args.z", "not_exists", json!(1))
    ], "action": {"type": "block"}}]));
    assert_eq!(
        set.rules()[0].describe(),
        "r: every tool if args.amount greater 1 and tool.name equals \"pay\" and args.z not_exists -> block"
    );
    let w = set.warnings();
    assert_eq!(w.len(), 1);
    assert!(w[0].contains("conditions[2]"), "{w:?}");
    assert_eq!(decide(&set, &tool("pay"), &json!({"amount": 2})), Some("r"));
    assert_eq!(
        decide(&set, &tool("pay"), &json!({"amount": 2, "z": 0})),
        None
    );
    assert_eq!(decide(&set, &tool("paid"), &json!({"amount": 2})), None);
}

#[test]
fn many_distinct_args_paths_and_shared_paths() {
    // More distinct paths than the per-call cache holds: the later ones are walked each time.
    let mut list: Vec<Value> = (0..20)
        .map(|i| {
            json!({"name": format!("r{i}"), "conditions": [c(&format!("args.k{i}"), "equals", json!(i))],
                   "action": {"type": "block"}})
        })
        .collect();
    list.push(
        json!({"name": "shared", "conditions": [c("args.k3", "exists", json!(null))],
                     "action": {"type": "warn"}}),
    );
    let set = rules(Value::Array(list));
    let t = tool("x");
    assert_eq!(decide(&set, &t, &json!({"k19": 19})), Some("r19"));
    assert_eq!(decide(&set, &t, &json!({"k17": 17, "k18": 0})), Some("r17"));
    assert_eq!(decide(&set, &t, &json!({"k3": 4})), Some("shared"));
    assert_eq!(decide(&set, &t, &json!({"k3": 3})), Some("r3"));
    assert_eq!(decide(&set, &t, &json!({"k19": 1})), None);
}

#[test]
fn the_preparer_builds_the_regex_searches_before_any_call() {
    let set = rules(json!([
        {"name": "a", "conditions": [{"field": "args.path", "operator": "matches", "value": "^/etc/"}],
         "action": {"type": "block"}},
        {"name": "b", "conditions": [{"field": "args.path", "operator": "matches", "value": "^/root/"}],
         "action": {"type": "block"}},
    ]));
    assert!(!set.groups.is_empty());
    assert!(set.groups.iter().all(|g| !g.is_prepared()), "built at load");
    std::thread::spawn(set.preparer()).join().unwrap();
    assert!(set.groups.iter().all(RegexGroup::is_prepared));
    let blocked = decide(&set, &tool("x"), &json!({"path": "/root/.ssh/id"}));
    assert_eq!(blocked, Some("b"));
}
