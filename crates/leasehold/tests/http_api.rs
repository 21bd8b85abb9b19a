//! The HTTP/JSON API on the agent's socket, driven by the clients people use: `curl` for
//! every operation, and a Python script with nothing but the standard library.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Agent, Holder, Lines};
use serde_json::{Value, json};

const LIMIT: Duration = Duration::from_secs(20);

/// `curl` on the agent's socket: the HTTP status and the body.
fn curl(a: &Agent, method: &str, path: &str, body: Option<&Value>) -> (u16, String) {
    let mut c = Command::new("curl");
    c.args(["-sS", "--max-time", "30", "--unix-socket"])
        .arg(&a.socket)
        .args(["-X", method, "-w", "\n%{http_code}"])
        .arg(format!("http://leasehold{path}"));
    if body.is_some() {
        c.args([
            "-H",
            "content-type: application/json",
            "--data-binary",
            "@-",
        ]);
    }
    let mut child = c
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("curl runs");
    let mut stdin = child.stdin.take().expect("stdin");
    if let Some(b) = body {
        stdin
            .write_all(b.to_string().as_bytes())
            .expect("curl reads its body");
    }
    drop(stdin);
    let out = child.wait_with_output().expect("curl runs");
    assert!(
        out.status.success(),
        "curl failed: {}",
        common::text(&out.stderr)
    );
    let text = common::text(&out.stdout);
    let (body, code) = text.rsplit_once('\n').expect("a status line");
    (code.trim().parse().expect("a status"), body.to_owned())
}

/// The same, answered with JSON: the status and the parsed body.
fn call(a: &Agent, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let (code, text) = curl(a, method, path, body.as_ref());
    let v = serde_json::from_str(text.lines().next().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {text}"));
    (code, v)
}

/// A streaming `curl -N` (acquire with a wait or hold, watch), its lines read as they come,
/// returned once the answer's headers arrived (`-v` shows them at once; the agent has
/// subscribed the stream by then).
fn stream(a: &Agent, path: &str, body: &Value) -> (std::process::Child, Lines) {
    let mut child = Command::new("curl")
        .args(["-sS", "-N", "-v", "--unix-socket"])
        .arg(&a.socket)
        .arg(format!("http://leasehold{path}"))
        .arg("--data-binary")
        .arg(body.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("curl runs");
    let mut headers = Lines::new(child.stderr.take().expect("stderr"));
    headers.wait_for("< content-type: application/x-ndjson", LIMIT);
    let lines = Lines::new(child.stdout.take().expect("stdout"));
    (child, lines)
}

fn items(resource: &str, mode: &str) -> Value {
    json!([{"resource": resource, "mode": mode}])
}

#[test]
fn every_operation_works_through_curl() {
    let a = Agent::start();
    let (h1, h2) = (Holder::new(), Holder::new());

    let (code, status) = call(&a, "GET", "/v1/status", None);
    assert_eq!(
        (code, status["host"].as_str()),
        (200, Some("node1")),
        "{status}"
    );

    // acquire: one line, the grant.
    let (code, text) = curl(
        &a,
        "POST",
        "/v1/acquire",
        Some(&json!({"items": items("disk", "exclusive"), "pid": h1.pid(), "label": "vm1"})),
    );
    assert_eq!(code, 200, "{text}");
    let granted: Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(granted["event"], "granted", "{granted}");
    let token = granted["grants"][0]["token"].as_u64().unwrap();
    assert_eq!(a.holders("disk"), vec![u64::from(h1.pid())]);

    let (code, list) = call(&a, "GET", "/v1/leases", None);
    assert_eq!(code, 200);
    assert_eq!(
        list["resources"][0]["holders"][0]["owner"]["pid"],
        h1.pid(),
        "{list}"
    );

    let (code, v) = call(&a, "POST", "/v1/inspect", Some(json!({"resource": "disk"})));
    assert_eq!(code, 200);
    assert_eq!(v["resource"]["holders"][0]["owner"]["label"], "vm1", "{v}");

    let (code, v) = call(
        &a,
        "POST",
        "/v1/validate",
        Some(json!({"resource": "disk", "token": token})),
    );
    assert_eq!((code, &v["current"]), (200, &json!(true)), "{v}");

    // Held: 409, code "held", the holder named, what to do next.
    let (code, v) = call(
        &a,
        "POST",
        "/v1/acquire",
        Some(json!({"items": items("disk", "exclusive"), "pid": h2.pid()})),
    );
    assert_eq!((code, v["code"].as_str()), (409, Some("held")), "{v}");
    let msg = v["message"].as_str().unwrap();
    assert!(
        msg.contains(&format!("pid {}", h1.pid())) && msg.contains("wait"),
        "{msg}"
    );
    assert_eq!(v["conflict"]["holders"][0]["owner"]["pid"], h1.pid(), "{v}");

    // watch, and a waiting acquire that tells who is in the way as it waits.
    let (mut watch, mut events) = stream(&a, "/v1/watch", &json!({"resource": "disk"}));
    let (mut waiter, mut waiting) = stream(
        &a,
        "/v1/acquire",
        &json!({"items": items("disk", "exclusive"), "pid": h2.pid(), "wait": "forever"}),
    );
    let line = waiting.wait_for("\"event\":\"waiting\"", LIMIT);
    assert!(
        line.contains(&format!(
            "waiting: disk is held exclusive by pid {}",
            h1.pid()
        )),
        "{line}"
    );

    // release dirty: the waiter is told the resource needs a check.
    let (code, v) = call(
        &a,
        "POST",
        "/v1/release",
        Some(json!({"resources": ["disk"], "pid": h1.pid(), "dirty": true, "note": "curl test"})),
    );
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["released"][0]["dirtied"], true, "{v}");
    assert_eq!(v["failed"], json!([]), "{v}");
    let line = waiting.wait_for("\"event\":\"error\"", LIMIT);
    assert!(line.contains("\"code\":\"needs-check\""), "{line}");
    assert!(waiter.wait().unwrap().success());
    events.wait_for("\"kind\":\"dirtied\"", LIMIT);

    // mark-clean.
    let (code, v) = call(
        &a,
        "POST",
        "/v1/mark-clean",
        Some(json!({"resource": "disk"})),
    );
    assert_eq!(
        (code, v["was"]["how"].as_str()),
        (200, Some("released-dirty")),
        "{v}"
    );
    events.wait_for("\"kind\":\"cleaned\"", LIMIT);

    // A holding acquire hears of its lease's loss; force-release.
    let (mut holder, mut held) = stream(
        &a,
        "/v1/acquire",
        &json!({"items": items("disk", "shared"), "pid": h2.pid(), "hold": true}),
    );
    held.wait_for("\"event\":\"granted\"", LIMIT);
    let (code, v) = call(
        &a,
        "POST",
        "/v1/force-release",
        Some(json!({"resource": "disk", "reason": "curl test"})),
    );
    assert_eq!(
        (code, v["released"][0]["ended"]["how"].as_str()),
        (200, Some("forced")),
        "{v}"
    );
    let line = held.wait_for("\"event\":\"lost\"", LIMIT);
    assert!(line.contains("\"how\":\"forced\""), "{line}");
    assert!(
        holder.wait().unwrap().success(),
        "the hold ends with its last lease"
    );
    events.wait_for("\"kind\":\"forced\"", LIMIT);

    // Per-resource outcomes: one released, one unknown.
    call(
        &a,
        "POST",
        "/v1/acquire",
        Some(json!({"items": items("d2", "exclusive"), "pid": h1.pid()})),
    );
    let (code, v) = call(
        &a,
        "POST",
        "/v1/release",
        Some(json!({"resources": ["d2", "nothing-here"], "pid": h1.pid()})),
    );
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["released"][0]["resource"], "d2", "{v}");
    assert_eq!(v["failed"][0]["resource"], "nothing-here", "{v}");
    assert_eq!(v["failed"][0]["error"]["code"], "refused", "{v}");
    assert!(
        v["failed"][0]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not held"),
        "{v}"
    );

    let _ = watch.kill();
    let _ = watch.wait();
}

#[test]
fn bad_requests_get_a_json_error_and_change_nothing() {
    let a = Agent::start_with(&["--request-timeout", "1s"]);
    let h = Holder::new();
    let (code, _) = call(
        &a,
        "POST",
        "/v1/acquire",
        Some(json!({"items": items("disk", "exclusive"), "pid": h.pid()})),
    );
    assert_eq!(code, 200);
    let before = a.list();
    let pid = h.pid();
    for (body, want) in [
        (
            json!({"resources": ["disk"], "pid": pid, "dirtyy": true}),
            "unknown field `dirtyy`",
        ),
        (json!({"resources": "disk", "pid": pid}), "invalid type"),
        (json!({"resources": ["disk"], "pid": -1}), "invalid value"),
        (
            json!({"resources": ["a\u{0}b"], "pid": pid}),
            "forbidden character",
        ),
    ] {
        let (code, v) = call(&a, "POST", "/v1/release", Some(body));
        assert_eq!((code, v["code"].as_str()), (400, Some("usage")), "{v}");
        assert!(v["message"].as_str().unwrap().contains(want), "{v}");
    }
    let (code, v) = call(
        &a,
        "POST",
        "/v1/acquire",
        Some(json!({"items": [], "wait": 30})),
    );
    assert_eq!((code, v["code"].as_str()), (400, Some("usage")), "{v}");
    let (code, v) = call(&a, "GET", "/v1/nothing", None);
    assert_eq!((code, v["code"].as_str()), (404, Some("not-found")), "{v}");
    let (code, v) = call(&a, "DELETE", "/v1/leases", None);
    assert_eq!((code, v["code"].as_str()), (400, Some("usage")), "{v}");
    let (code, v) = call(
        &a,
        "POST",
        "/v1/release",
        Some(json!({"x": "y".repeat(2 << 20)})),
    );
    assert_eq!((code, v["code"].as_str()), (413, Some("too-large")), "{v}");

    // Slowloris: headers never finished, a body never sent.
    for partial in [
        &b"POST /v1/release HTTP/1.1\r\nhost: x\r\n"[..],
        &b"POST /v1/release HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{\"resources\""[..],
    ] {
        let mut s = std::os::unix::net::UnixStream::connect(&a.socket).unwrap();
        s.set_read_timeout(Some(LIMIT)).unwrap();
        s.write_all(partial).unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(answer.contains("\"code\":\"request-timeout\""), "{answer}");
    }
    // An idle connection is closed too.
    let mut s = std::os::unix::net::UnixStream::connect(&a.socket).unwrap();
    s.set_read_timeout(Some(LIMIT)).unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");

    assert_eq!(a.list(), before, "a refused request changed nothing");
}

#[test]
fn a_python_stdlib_client_acquires_waits_watches_and_releases() {
    let a = Agent::start();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/http_client.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(&a.socket)
        .output()
        .expect("python3 runs");
    let stdout = common::text(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("all done"),
        "stdout:\n{stdout}\nstderr:\n{}",
        common::text(&out.stderr)
    );
}

/// Several owners inside one process (a threaded service): two owner ids of one pid exclude
/// each other, shared ones coexist, a release names its owner id, and the process's exit ends
/// the leases of all of them.
#[test]
fn owner_ids_tell_apart_several_owners_of_one_process() {
    let a = Agent::start();
    let mut h = Holder::new();
    let take = |owner: &str, r: &str, mode: &str| {
        call(
            &a,
            "POST",
            "/v1/acquire",
            Some(json!({"items": items(r, mode), "pid": h.pid(), "owner_id": owner})),
        )
    };
    let (code, g) = take("t-1", "disk", "exclusive");
    assert_eq!((code, g["event"].as_str()), (200, Some("granted")), "{g}");
    assert_eq!(g["owner"]["owner_id"], "t-1", "{g}");
    let (code, v) = take("t-2", "disk", "exclusive");
    assert_eq!((code, v["code"].as_str()), (409, Some("held")), "{v}");
    assert_eq!(
        v["conflict"]["holders"][0]["owner"]["owner_id"], "t-1",
        "{v}"
    );
    assert!(take("t-1", "img", "shared").0 == 200 && take("t-2", "img", "shared").0 == 200);
    assert_eq!(a.holders("img"), vec![u64::from(h.pid()); 2]);

    let (code, v) = take("not valid", "other", "exclusive");
    assert_eq!((code, v["code"].as_str()), (400, Some("usage")), "{v}");
    assert!(
        a.inspect("other").is_none(),
        "a refused request changes nothing"
    );

    // Releasing names the owner: the process without an id holds nothing.
    let release = |owner: Option<&str>, r: &str| {
        let mut body = json!({"resources": [r], "pid": h.pid()});
        if let Some(o) = owner {
            body["owner_id"] = json!(o);
        }
        call(&a, "POST", "/v1/release", Some(body))
    };
    let (_, v) = release(None, "disk");
    assert_eq!(v["failed"][0]["resource"], "disk", "{v}");
    let (_, v) = release(Some("t-2"), "img");
    assert_eq!(v["released"][0]["ended"]["owner"]["owner_id"], "t-2", "{v}");
    assert_eq!(a.holders("img"), vec![u64::from(h.pid())]);

    h.kill9();
    common::wait_until("the process's exit ends every owner's lease", LIMIT, || {
        a.holders("disk").is_empty() && a.holders("img").is_empty()
    });
    assert!(a.is_dirty("disk"));
    assert!(!a.is_dirty("img"));
}

/// Issue 10 item 3: a request naming 30,000 resources is refused whole with a usage error
/// (it once died with an HTTP/2 error after releasing part of them), and changes nothing.
#[test]
fn a_request_naming_30000_resources_is_refused_whole() {
    let a = Agent::start();
    let h = Holder::new();
    let (code, _) = call(
        &a,
        "POST",
        "/v1/acquire",
        Some(json!({"items": items("r7", "exclusive"), "pid": h.pid()})),
    );
    assert_eq!(code, 200);
    let before = a.list();
    let names: Vec<String> = (0..30_000).map(|i| format!("r{i}")).collect();

    let (code, v) = call(
        &a,
        "POST",
        "/v1/release",
        Some(json!({"resources": names, "pid": h.pid()})),
    );
    assert_eq!((code, v["code"].as_str()), (400, Some("usage")), "{v}");
    let msg = v["message"].as_str().unwrap();
    assert!(msg.contains("30000 resources named; at most 256"), "{v}");

    // An acquire of as many is larger than a request may be; one of 257 is over the cap.
    let many = |n: usize| -> Value {
        Value::Array(
            names[..n]
                .iter()
                .map(|r| json!({"resource": r, "mode": "shared"}))
                .collect(),
        )
    };
    let (code, v) = call(
        &a,
        "POST",
        "/v1/acquire",
        Some(json!({"items": many(30_000), "pid": h.pid()})),
    );
    assert_eq!((code, v["code"].as_str()), (413, Some("too-large")), "{v}");
    let (code, v) = call(
        &a,
        "POST",
        "/v1/acquire",
        Some(json!({"items": many(257), "pid": h.pid(), "wait": "30s"})),
    );
    assert_eq!((code, v["code"].as_str()), (400, Some("usage")), "{v}");
    let msg = v["message"].as_str().unwrap();
    assert!(msg.contains("257 resources named; at most 256"), "{v}");

    assert_eq!(a.list(), before, "a refused request changed nothing");
    assert_eq!(a.holders("r7"), vec![u64::from(h.pid())]);
}

/// The names of a `GET /v1/leases` answer, and its `next`.
fn page(a: &Agent, query: &str) -> (Vec<String>, Option<String>) {
    let (code, v) = call(a, "GET", &format!("/v1/leases{query}"), None);
    assert_eq!(code, 200, "{v}");
    let names = v["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["resource"].as_str().unwrap().to_owned())
        .collect();
    (names, v["next"].as_str().map(str::to_owned))
}

/// Issue 10 item 3, issue 11 item 6: `GET /v1/leases` answers in pages, in name order, and
/// filters on the agent's side; the CLI follows the pages, so `list` still shows everything.
#[test]
fn list_is_paginated_and_filtered_by_the_agent_and_the_cli_follows_the_pages() {
    let a = Agent::start();
    let h = Holder::new();
    let names: Vec<String> = (0..2100).map(|i| format!("p/{i:04}")).collect();
    for chunk in names.chunks(256) {
        let items: Vec<Value> = chunk
            .iter()
            .map(|r| json!({"resource": r, "mode": "exclusive"}))
            .collect();
        let (code, text) = curl(
            &a,
            "POST",
            "/v1/acquire",
            Some(&json!({"items": items, "pid": h.pid()})),
        );
        assert_eq!(code, 200, "{text}");
        let (code, v) = call(
            &a,
            "POST",
            "/v1/release",
            Some(json!({"resources": chunk, "pid": h.pid()})),
        );
        assert_eq!(code, 200, "{v}");
    }
    for r in ["q/held", "q/dirty"] {
        let (code, _) = call(
            &a,
            "POST",
            "/v1/acquire",
            Some(json!({"items": items(r, "exclusive"), "pid": h.pid()})),
        );
        assert_eq!(code, 200);
    }
    let (code, v) = call(
        &a,
        "POST",
        "/v1/release",
        Some(json!({"resources": ["q/dirty"], "pid": h.pid(), "dirty": true})),
    );
    assert_eq!(code, 200, "{v}");

    // Pages of at most `limit`, each continuing after the last name of the one before.
    let (first, next) = page(&a, "?limit=1000");
    assert_eq!(first, names[..1000]);
    assert_eq!(next.as_deref(), Some("p/0999"));
    let (second, next) = page(&a, "?limit=1000&after=p%2F0999");
    assert_eq!(second, names[1000..2000]);
    let (third, next) = page(&a, &format!("?limit=1000&after={}", next.unwrap()));
    let mut rest = names[2000..].to_vec();
    rest.extend(["q/dirty".to_owned(), "q/held".to_owned()]);
    assert_eq!((third, next), (rest, None));
    // Without a limit, a page holds 1,000.
    assert_eq!(page(&a, "").0.len(), 1000);

    // Filters, on the agent's side.
    let q = |query: &str| page(&a, query).0;
    assert_eq!(q("?held=true"), ["q/held"]);
    assert_eq!(q("?dirty=true"), ["q/dirty"]);
    assert_eq!(q("?prefix=q%2F"), ["q/dirty", "q/held"]);
    assert_eq!(q("?host=node1"), ["q/held"]);
    assert!(q("?host=elsewhere").is_empty());
    assert_eq!(q("?prefix=p%2F20&limit=5").len(), 5);
    for bad in ["?limit=0", "?limit=lots", "?colour=red", "?after=a&after=b"] {
        let (code, v) = call(&a, "GET", &format!("/v1/leases{bad}"), None);
        assert_eq!(
            (code, v["code"].as_str()),
            (400, Some("usage")),
            "{bad}: {v}"
        );
    }

    // The CLI shows every page.
    let listed = a.list();
    assert_eq!(listed.as_array().unwrap().len(), 2102);
    let out = a.lh(&["list"]);
    common::expect_code(&out, 0);
    assert_eq!(
        common::text(&out.stdout).lines().count(),
        2103,
        "a header and 2,102 rows"
    );
    let out = a.lh(&["list", "--json", "--dirty", "q/"]);
    common::expect_code(&out, 0);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v[0]["resource"], "q/dirty", "{v}");
}

/// `on_lost: revoke` (issue 14 item 3): a force-release ends the lease without killing its
/// holder, and `validate` refuses the old token; the default still kills.
#[test]
fn a_revocable_holder_survives_force_release_and_its_token_is_refused() {
    let a = Agent::start();
    let (service, vm) = (Holder::new(), Holder::new());
    let take = |h: &Holder, r: &str, extra: Value| {
        let mut body = json!({"items": items(r, "exclusive"), "pid": h.pid()});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let (code, g) = call(&a, "POST", "/v1/acquire", Some(body));
        assert_eq!((code, g["event"].as_str()), (200, Some("granted")), "{g}");
        g
    };
    let g = take(
        &service,
        "lock",
        json!({"on_lost": "revoke", "owner_id": "t1"}),
    );
    assert_eq!(g["owner"]["on_lost"], "revoke", "{g}");
    let token = g["grants"][0]["token"].as_u64().unwrap();
    take(&vm, "disk", json!({}));
    let force = |r: &str| {
        let (code, v) = call(
            &a,
            "POST",
            "/v1/force-release",
            Some(json!({"resource": r, "reason": "test"})),
        );
        assert_eq!(code, 200, "{v}");
    };
    force("lock");
    force("disk");
    common::wait_until("the default holder is killed", LIMIT, || {
        !common::alive(vm.pid())
    });
    assert!(
        common::alive(service.pid()),
        "a revocable holder is not killed"
    );
    let (_, v) = call(
        &a,
        "POST",
        "/v1/validate",
        Some(json!({"resource": "lock", "token": token})),
    );
    assert_eq!(v["current"], false, "{v}");
    assert!(a.holders("lock").is_empty());
    assert!(a.log().contains("holder not killed"), "{}", a.log());
}

/// A release may name the token of each lease it ends (`tokens`): one that names a lease
/// that has ended, while its holder was granted the resource again since (force-released,
/// then acquired anew by the same process), is refused with a JSON error that names the
/// token held now and says nothing was released, and changes nothing; tokens that do not
/// match the resources one for one are a usage error; the right token releases. Before, a
/// release was by owner only: a release meant for the old lease ended the new one (SPEC G1).
#[test]
fn a_release_naming_a_stale_token_is_refused_and_changes_nothing() {
    let a = Agent::start();
    let h = Holder::new();
    // A revocable holder (with an owner id) outlives a force-release, so it can be granted
    // the resource again.
    let take = || {
        let (code, g) = call(
            &a,
            "POST",
            "/v1/acquire",
            Some(json!({"items": items("disk", "exclusive"), "pid": h.pid(),
                        "on_lost": "revoke", "owner_id": "t1"})),
        );
        assert_eq!((code, g["event"].as_str()), (200, Some("granted")), "{g}");
        g["grants"][0]["token"].as_u64().unwrap()
    };
    let old = take();
    let (code, v) = call(
        &a,
        "POST",
        "/v1/force-release",
        Some(json!({"resource": "disk", "reason": "test"})),
    );
    assert_eq!(code, 200, "{v}");
    let (code, v) = call(
        &a,
        "POST",
        "/v1/mark-clean",
        Some(json!({"resource": "disk"})),
    );
    assert_eq!(code, 200, "{v}");
    let new = take();
    assert!(new > old);
    let before = a.list();

    let release = |tokens: Value| {
        call(
            &a,
            "POST",
            "/v1/release",
            Some(
                json!({"resources": ["disk"], "pid": h.pid(), "owner_id": "t1",
                        "tokens": tokens}),
            ),
        )
    };
    let (code, v) = release(json!([old]));
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["released"], json!([]), "{v}");
    assert_eq!(v["failed"][0]["resource"], "disk", "{v}");
    assert_eq!(v["failed"][0]["error"]["code"], "refused", "{v}");
    let message = v["failed"][0]["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("with token {old}"))
            && message.contains(&format!("holds token {new} now"))
            && message.contains("nothing was released"),
        "{message}"
    );
    assert_eq!(a.list(), before, "a refused release changed nothing");
    let (_, v) = call(
        &a,
        "POST",
        "/v1/validate",
        Some(json!({"resource": "disk", "token": new})),
    );
    assert_eq!(v["current"], true, "{v}");

    let (code, v) = release(json!([old, new]));
    assert_eq!((code, v["code"].as_str()), (400, Some("usage")), "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("2 tokens for 1 resources"),
        "{v}"
    );
    assert_eq!(a.list(), before, "a refused release changed nothing");

    let (code, v) = release(json!([new]));
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["released"][0]["ended"]["token"], new, "{v}");
    assert!(a.holders("disk").is_empty());
}

/// `allow-revoke = false` in the agent's config refuses `on_lost: revoke` as a usage error
/// and changes nothing; an ordinary acquire still works.
#[test]
fn an_agent_may_forbid_revocable_holders() {
    let conf = tempfile::tempdir().unwrap();
    let path = conf.path().join("agent.toml");
    std::fs::write(&path, "allow-revoke = false\n").unwrap();
    let a = Agent::start_with(&["--config", path.to_str().unwrap()]);
    let h = Holder::new();
    let (code, v) = call(
        &a,
        "POST",
        "/v1/acquire",
        Some(json!({"items": items("lock", "exclusive"), "pid": h.pid(), "on_lost": "revoke"})),
    );
    assert_eq!((code, v["code"].as_str()), (400, Some("usage")), "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("allow-revoke"),
        "{v}"
    );
    assert!(
        a.inspect("lock").is_none(),
        "a refused request changes nothing"
    );
    let (code, v) = call(
        &a,
        "POST",
        "/v1/acquire",
        Some(json!({"items": items("lock", "exclusive"), "pid": h.pid()})),
    );
    assert_eq!((code, v["event"].as_str()), (200, Some("granted")), "{v}");
}

/// A holding acquire that asks for `upgrade: leasehold-hold`: its head as read, and the
/// connection, for the hold's lines both ways.
fn switched_hold(
    a: &Agent,
    body: &Value,
) -> (String, std::io::BufReader<std::os::unix::net::UnixStream>) {
    use std::io::BufRead;
    let mut s = std::os::unix::net::UnixStream::connect(&a.socket).unwrap();
    s.set_read_timeout(Some(LIMIT)).unwrap();
    let body = body.to_string();
    write!(
        s,
        "POST /v1/acquire HTTP/1.1\r\nhost: leasehold\r\nconnection: upgrade\r\n\
         upgrade: leasehold-hold\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut r = std::io::BufReader::new(s);
    let mut head = String::new();
    loop {
        let mut l = String::new();
        assert!(r.read_line(&mut l).unwrap() > 0, "the head's end: {head}");
        head.push_str(&l);
        if l == "\r\n" {
            return (head, r);
        }
    }
}

/// The next line of a switched hold, parsed (`Null` at its end).
fn hold_line(r: &mut std::io::BufReader<std::os::unix::net::UnixStream>) -> Value {
    use std::io::BufRead;
    let mut l = String::new();
    if r.read_line(&mut l).unwrap() == 0 {
        return Value::Null;
    }
    serde_json::from_str(&l).unwrap()
}

/// A hold switched to `leasehold-hold` (`101`) streams its lines as they are and takes one
/// release line from the holder, answered with one `released` line, then closes: clean, and
/// dirty with its note. A line that is no release is answered with an error and changes
/// nothing. Before, the agent answered `200` with a chunked stream and read nothing more.
#[test]
fn a_hold_switched_to_its_protocol_releases_on_its_connection() {
    let a = Agent::start();
    let holder = Holder::new();
    let pid = holder.pid();
    let hold = json!({"items": items("disk", "exclusive"), "pid": pid, "hold": true});
    let (head, mut r) = switched_hold(&a, &hold);
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("upgrade: leasehold-hold"),
        "{head}"
    );
    let granted = hold_line(&mut r);
    assert_eq!(granted["event"], "granted", "{granted}");
    let release = json!({"resources": ["disk"], "pid": pid});
    writeln!(r.get_mut(), "{release}").unwrap();
    let released = hold_line(&mut r);
    assert_eq!(released["event"], "released", "{released}");
    assert_eq!(released["released"][0]["resource"], "disk", "{released}");
    assert_eq!(
        hold_line(&mut r),
        Value::Null,
        "the connection closes after the answer"
    );
    assert!(a.holders("disk").is_empty());
    assert!(!a.is_dirty("disk"));

    let (_, mut r) = switched_hold(&a, &hold);
    assert_eq!(hold_line(&mut r)["event"], "granted");
    writeln!(
        r.get_mut(),
        "{}",
        json!({"resources": ["disk"], "pid": pid, "dirty": true, "note": "cut"})
    )
    .unwrap();
    assert_eq!(hold_line(&mut r)["event"], "released");
    let v = a.inspect("disk").unwrap();
    assert_eq!(v["dirty_record"]["how"], "released-dirty", "{v}");
    assert_eq!(v["dirty_record"]["note"], "cut", "{v}");

    let other = json!({"items": items("other", "exclusive"), "pid": pid, "hold": true});
    let (_, mut r) = switched_hold(&a, &other);
    assert_eq!(hold_line(&mut r)["event"], "granted");
    writeln!(
        r.get_mut(),
        "{}",
        json!({"resources": ["other"], "pid": pid, "drity": true})
    )
    .unwrap();
    let refused = hold_line(&mut r);
    assert_eq!(refused["event"], "error", "{refused}");
    assert_eq!(refused["code"], "usage", "{refused}");
    assert_eq!(a.holders("other"), vec![u64::from(pid)], "nothing was done");
}

/// The holder sends its release on the switched hold and hangs up at once, before any answer:
/// the release is carried out all the same (clean, as asked), not dropped with the
/// connection; its process lives on, so only the release can have ended the lease.
#[test]
fn a_release_on_a_switched_hold_whose_holder_hangs_up_at_once_is_carried_out() {
    let a = Agent::start();
    let holder = Holder::new();
    let pid = holder.pid();
    let hold = json!({"items": items("disk", "exclusive"), "pid": pid, "hold": true});
    let (head, mut r) = switched_hold(&a, &hold);
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    assert_eq!(hold_line(&mut r)["event"], "granted");
    writeln!(
        r.get_mut(),
        "{}",
        json!({"resources": ["disk"], "pid": pid})
    )
    .unwrap();
    drop(r);
    common::wait_until("the lease released", LIMIT, || a.holders("disk").is_empty());
    let v = a.inspect("disk").unwrap();
    assert_eq!(v["dirty"], false, "{v}");
    assert_eq!(v["last_ended"]["how"], "released", "{v}");
    assert_eq!(a.holders("disk"), Vec::<u64>::new());
}

/// A kept-alive connection whose first request (`GET /v1/status`) asks for `upgrade:
/// leasehold-calls`: its head as read, and the connection, for the calls' lines.
fn switched_calls() -> &'static str {
    "GET /v1/status HTTP/1.1\r\nhost: leasehold\r\nconnection: upgrade\r\n\
     upgrade: leasehold-calls\r\n\r\n"
}

/// The next answer's line of a connection switched to `leasehold-calls`: its status and body
/// (`None` at the connection's end).
fn calls_line(r: &mut std::io::BufReader<std::os::unix::net::UnixStream>) -> Option<(u16, Value)> {
    use std::io::BufRead;
    let mut l = String::new();
    if r.read_line(&mut l).unwrap() == 0 {
        return None;
    }
    let (status, body) = l.split_once(' ').unwrap();
    assert!(body.ends_with('\n'), "{l:?}");
    Some((status.parse().unwrap(), serde_json::from_str(body).unwrap()))
}

/// A kept-alive connection switched to `leasehold-calls` by its first call (`101`, then that
/// call's answer as a line) carries acquires, releases and status one line each way, for the
/// connection's process, as over HTTP; what the line protocol does not carry (a waiting
/// acquire, another endpoint) and bad input are refused with the API's error, change nothing
/// and end the connection, as does a request line over the body's limit. A first request
/// that fails is answered over HTTP and not switched. Before, the agent ignored the upgrade.
#[test]
fn a_kept_alive_connection_switched_to_calls_carries_a_line_a_call() {
    use std::io::{BufRead, Read};
    let a = Agent::start();
    let holder = Holder::new();
    let pid = holder.pid();
    let connect = |first: &str| {
        let mut s = std::os::unix::net::UnixStream::connect(&a.socket).unwrap();
        s.set_read_timeout(Some(LIMIT)).unwrap();
        s.write_all(first.as_bytes()).unwrap();
        let mut r = std::io::BufReader::new(s);
        let mut head = String::new();
        loop {
            let mut l = String::new();
            assert!(r.read_line(&mut l).unwrap() > 0, "the head's end: {head}");
            head.push_str(&l);
            if l == "\r\n" {
                return (head, r);
            }
        }
    };
    let (head, mut r) = connect(switched_calls());
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("upgrade: leasehold-calls"),
        "{head}"
    );
    let (code, status) = calls_line(&mut r).unwrap();
    assert_eq!(
        (code, status["host"].as_str()),
        (200, Some("node1")),
        "{status}"
    );
    let acquire = json!({"items": items("disk", "exclusive"), "pid": pid});
    let release = json!({"resources": ["disk"], "pid": pid});
    for _ in 0..3 {
        writeln!(r.get_mut(), "POST /v1/acquire {acquire}").unwrap();
        let (code, granted) = calls_line(&mut r).unwrap();
        assert_eq!(
            (code, granted["event"].as_str()),
            (200, Some("granted")),
            "{granted}"
        );
        assert_eq!(a.holders("disk"), vec![u64::from(pid)]);
        writeln!(r.get_mut(), "POST /v1/release {release}").unwrap();
        let (code, released) = calls_line(&mut r).unwrap();
        assert_eq!(code, 200, "{released}");
        assert_eq!(released["released"][0]["resource"], "disk", "{released}");
        assert!(a.holders("disk").is_empty());
    }
    writeln!(r.get_mut(), "GET /v1/status").unwrap();
    assert_eq!(calls_line(&mut r).unwrap().0, 200);

    // Refused, each the connection's last answer: nothing done.
    let waiting = json!({"items": items("disk", "exclusive"), "pid": pid, "wait": "1s"});
    let other = a.lh(&["acquire", "busy", "--pid", &pid.to_string()]);
    common::expect_code(&other, 0);
    let other_holder = Holder::new();
    let busy = json!({"items": items("busy", "exclusive"), "pid": other_holder.pid()});
    let mut long = "POST /v1/release ".to_owned();
    long.push_str(&" ".repeat((1 << 20) + 100));
    for (bad, code, what) in [
        (format!("POST /v1/acquire {waiting}\n"), "usage", 400),
        (format!("POST /v1/acquire {busy}\n"), "held", 409),
        (
            "POST /v1/release {\"resources\": [\"disk\"], \"pid\": 1, \"x\": 1}\n".to_owned(),
            "usage",
            400,
        ),
        ("POST /v1/release\n".to_owned(), "usage", 400),
        ("GET /v1/leases\n".to_owned(), "usage", 400),
        ("\n".to_owned(), "usage", 400),
        (long.clone(), "too-large", 413),
    ] {
        let (_, mut r) = connect(switched_calls());
        calls_line(&mut r).unwrap();
        // (The agent stops reading a line over the limit: the rest of it may not be taken.)
        let _ = r.get_mut().write_all(bad.as_bytes());
        let (status, e) = calls_line(&mut r).unwrap();
        assert_eq!((status, e["code"].as_str()), (what, Some(code)), "{e}");
        let mut rest = Vec::new();
        match r.read_to_end(&mut rest) {
            Ok(_) => assert!(rest.is_empty(), "the connection ends: {rest:?}"),
            // Closed with the long line's rest unread.
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
        }
        assert!(a.holders("disk").is_empty());
        assert_eq!(a.holders("busy"), vec![u64::from(pid)]);
    }

    // A first call that fails is answered over HTTP, not switched.
    let body = busy.to_string();
    let (head, _) = connect(&format!(
        "POST /v1/acquire HTTP/1.1\r\nhost: leasehold\r\nconnection: upgrade\r\n\
         upgrade: leasehold-calls\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    ));
    assert!(head.starts_with("HTTP/1.1 409 "), "{head}");
}

/// A request over HTTP/1.0 that asks for its connection to be switched (`upgrade:` with
/// `connection: upgrade`; HTTP/1.0 has no upgrade, and the server never switches one) is
/// answered over HTTP/1.0 as if it had not asked: status, a grant (read, so kept), a release,
/// a hold's stream. Before, the agent answered `101` all the same, kept back for the switch
/// that never came: the connection closed without a byte, after the release or the grant had
/// been carried out (the grant then undone as unread).
#[test]
fn an_http_1_0_request_asking_to_switch_is_answered_over_http() {
    use std::io::BufRead;
    let a = Agent::start();
    let holder = Holder::new();
    let pid = holder.pid();
    // The answer's head and its first line of body (`None`: nothing came).
    let ask = |method: &str, path: &str, upgrade: &str, body: &str| {
        let mut s = std::os::unix::net::UnixStream::connect(&a.socket).unwrap();
        s.set_read_timeout(Some(LIMIT)).unwrap();
        write!(
            s,
            "{method} {path} HTTP/1.0\r\nhost: leasehold\r\nconnection: upgrade\r\n\
             upgrade: {upgrade}\r\ncontent-type: application/json\r\n\
             content-length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut r = std::io::BufReader::new(s);
        let mut head = String::new();
        loop {
            let mut l = String::new();
            if r.read_line(&mut l).unwrap() == 0 {
                return None;
            }
            head.push_str(&l);
            if l == "\r\n" {
                break;
            }
        }
        let mut first = String::new();
        r.read_line(&mut first).unwrap();
        let v: Value = serde_json::from_str(&first)
            .unwrap_or_else(|e| panic!("{head}{first}: not JSON ({e})"));
        Some((head, v))
    };
    let (head, status) = ask("GET", "/v1/status", "leasehold-calls", "").expect("an answer");
    assert!(head.starts_with("HTTP/1.0 200 "), "{head}");
    assert_eq!(status["host"], "node1", "{status}");

    let acquire = json!({"items": items("disk", "exclusive"), "pid": pid}).to_string();
    let (head, granted) =
        ask("POST", "/v1/acquire", "leasehold-calls", &acquire).expect("an answer");
    assert!(head.starts_with("HTTP/1.0 200 "), "{head}");
    assert_eq!(granted["event"], "granted", "{granted}");

    let release = json!({"resources": ["disk"], "pid": pid}).to_string();
    let (head, released) =
        ask("POST", "/v1/release", "leasehold-calls", &release).expect("an answer");
    assert!(head.starts_with("HTTP/1.0 200 "), "{head}");
    assert_eq!(released["released"][0]["resource"], "disk", "{released}");
    assert!(a.holders("disk").is_empty());

    let hold = json!({"items": items("disk", "exclusive"), "pid": pid, "hold": true});
    let (head, granted) =
        ask("POST", "/v1/acquire", "leasehold-hold", &hold.to_string()).expect("an answer");
    assert!(head.starts_with("HTTP/1.0 200 "), "{head}");
    assert_eq!(granted["event"], "granted", "{granted}");
}

/// A connection switched to `leasehold-calls` by a status call, its head and first line read.
fn calls_connection(a: &Agent) -> std::io::BufReader<std::os::unix::net::UnixStream> {
    use std::io::BufRead;
    let mut s = std::os::unix::net::UnixStream::connect(&a.socket).unwrap();
    s.set_read_timeout(Some(LIMIT)).unwrap();
    s.write_all(switched_calls().as_bytes()).unwrap();
    let mut r = std::io::BufReader::new(s);
    let mut head = String::new();
    loop {
        let mut l = String::new();
        assert!(r.read_line(&mut l).unwrap() > 0, "the head's end: {head}");
        head.push_str(&l);
        if l == "\r\n" {
            break;
        }
    }
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    assert_eq!(calls_line(&mut r).unwrap().0, 200);
    r
}

/// A request body over the API's limit (1 MiB) is refused `too-large` whole, on a line of a
/// connection switched to `leasehold-calls` as over HTTP, however little over it is (the line's
/// own limit is its body's and a few bytes for method and path): nothing is done, and the
/// connection ends. Before, a line whose body was up to 47 bytes over the limit was carried
/// out (here, a release of a held lease).
#[test]
fn a_line_whose_body_is_over_the_limit_is_refused_as_over_http() {
    let a = Agent::start();
    let holder = Holder::new();
    let pid = holder.pid();
    common::expect_code(&a.lh(&["acquire", "disk", "--pid", &pid.to_string()]), 0);
    let mut body = json!({"resources": ["disk"], "pid": pid}).to_string();
    // Valid JSON, 10 bytes over the limit.
    let pad = (1 << 20) + 10 - body.len();
    body.push_str(&" ".repeat(pad));
    // Over HTTP.
    let mut s = std::os::unix::net::UnixStream::connect(&a.socket).unwrap();
    s.set_read_timeout(Some(LIMIT)).unwrap();
    // (The agent answers once it sees the length, and may close before taking it all.)
    let _ = write!(
        s,
        "POST /v1/release HTTP/1.1\r\nhost: leasehold\r\ncontent-type: application/json\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 413 "), "{answer}");
    assert_eq!(a.holders("disk"), vec![u64::from(pid)]);
    // On a line.
    let mut r = calls_connection(&a);
    let _ = r
        .get_mut()
        .write_all(format!("POST /v1/release {body}\n").as_bytes());
    let (status, e) = calls_line(&mut r).unwrap();
    assert_eq!(
        (status, e["code"].as_str()),
        (413, Some("too-large")),
        "{e}"
    );
    assert_eq!(a.holders("disk"), vec![u64::from(pid)]);
}

/// On a connection switched to `leasehold-calls`, an error answer is the connection's last:
/// calls the client sent after the bad one (pipelined, without waiting for its answer) are
/// never carried out. Bad lines: another endpoint, a line ended by `\r\n`, a body that is not
/// UTF-8, a path with a trailing `/`, a lower-case method, a status with a body. Each is
/// answered `400 usage`; the release sent after it leaves the lease held.
#[test]
fn calls_sent_after_a_bad_line_on_a_switched_connection_are_not_carried_out() {
    let a = Agent::start();
    let holder = Holder::new();
    let pid = holder.pid();
    common::expect_code(&a.lh(&["acquire", "disk", "--pid", &pid.to_string()]), 0);
    let release = json!({"resources": ["disk"], "pid": pid});
    for bad in [
        &b"GET /v1/leases\n"[..],
        b"GET /v1/status\r\n",
        b"POST /v1/release {\"resources\": [\"\xff\xfe\"]}\n",
        b"POST /v1/release/ {}\n",
        b"get /v1/status\n",
        b"GET /v1/status {}\n",
    ] {
        let mut r = calls_connection(&a);
        let mut lines = bad.to_vec();
        lines.extend_from_slice(format!("POST /v1/release {release}\n").as_bytes());
        r.get_mut().write_all(&lines).unwrap();
        let shown = String::from_utf8_lossy(bad);
        let (status, e) = calls_line(&mut r).unwrap();
        assert_eq!(
            (status, e["code"].as_str()),
            (400, Some("usage")),
            "{shown}: {e}"
        );
        let mut rest = Vec::new();
        match r.read_to_end(&mut rest) {
            Ok(_) => assert!(rest.is_empty(), "{shown}: the connection ends: {rest:?}"),
            // Closed with the pipelined release unread.
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
        }
        assert_eq!(a.holders("disk"), vec![u64::from(pid)], "{shown}");
    }
}
