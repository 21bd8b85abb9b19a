//! `leasehold run`: all-or-nothing in a fixed order, tokens in the environment, clean or dirty
//! release by exit status, signals passed on, the child dying with the wrapper, `--check`,
//! `--path`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::time::Duration;

use common::*;

#[test]
fn run_passes_tokens_and_releases_clean_on_success() {
    let a = Agent::start();
    let out = a.lh(&[
        "run",
        "--exclusive",
        "b-disk",
        "--shared",
        "a-cache",
        "--",
        "sh",
        "-c",
        "echo \"$LEASEHOLD_TOKENS\"",
    ]);
    expect_code(&out, 0);
    let tokens = text(&out.stdout).trim().to_owned();
    let pairs: Vec<(&str, u64)> = tokens
        .split(',')
        .map(|p| {
            let (n, t) = p.split_once('=').unwrap();
            (n, t.parse().unwrap())
        })
        .collect();
    assert_eq!(
        pairs.iter().map(|p| p.0).collect::<Vec<_>>(),
        vec!["a-cache", "b-disk"]
    );
    assert!(a.holders("b-disk").is_empty() && a.holders("a-cache").is_empty());
    assert!(!a.is_dirty("b-disk"));
    assert_eq!(
        a.inspect("b-disk").unwrap()["last_ended"]["how"],
        "released"
    );
}

/// A run whose release is not answered (its agent stopped, past the client's `--timeout`)
/// says what becomes of its leases and claims no more than it knows: the release may still be
/// carried out, and what it did not release ends at the wrapper's exit, dirty only if
/// exclusive (a shared holder's death dirties nothing, G5). Before, it said every lease would
/// "count as dirty", shared ones too. Its exit status is the command's.
#[test]
fn a_run_whose_release_is_not_answered_says_what_becomes_of_its_leases() {
    let a = Agent::start();
    let stop = format!("kill -STOP {}", a.pid());
    let out = a
        .cli()
        .args([
            "--timeout",
            "1s",
            "run",
            "--shared",
            "s",
            "--",
            "sh",
            "-c",
            &stop,
        ])
        .output()
        .unwrap();
    signal(a.pid(), libc::SIGCONT);
    expect_code(&out, 0);
    let err = text(&out.stderr);
    assert!(err.contains("the release was not confirmed"), "{err}");
    assert!(
        err.contains("an exclusive lease then dirty") && err.contains("a shared one clean"),
        "{err}"
    );
    assert!(!err.contains("count as dirty"), "{err}");
    wait_until("the lease ends", Duration::from_secs(10), || {
        a.holders("s").is_empty()
    });
    assert!(!a.is_dirty("s"), "{:?}", a.inspect("s"));
}

#[test]
fn a_failing_command_releases_dirty_and_its_status_is_returned() {
    let a = Agent::start();
    let out = a.lh(&["run", "--exclusive", "disk", "--", "sh", "-c", "exit 7"]);
    expect_code(&out, 7);
    assert!(a.is_dirty("disk"));
    let v = a.inspect("disk").unwrap();
    assert_eq!(v["dirty_record"]["how"], "released-dirty");
    assert_eq!(v["dirty_record"]["note"], "exited with status 7");
    // The next run meets the dirty mark before its command starts.
    let marker = a.path("started");
    let out = a.lh(&[
        "run",
        "--exclusive",
        "disk",
        "--",
        "touch",
        marker.to_str().unwrap(),
    ]);
    expect_code(&out, 4);
    assert!(
        !marker.exists(),
        "the command must not start on a dirty resource"
    );
}

#[test]
fn a_held_resource_stops_run_before_its_command_starts() {
    let a = Agent::start();
    let h = Holder::new();
    expect_code(&a.lh(&["acquire", "disk", "--pid", &h.pid_arg()]), 0);
    let marker = a.path("started");
    let out = a.lh(&[
        "run",
        "--exclusive",
        "free-one",
        "--exclusive",
        "disk",
        "--",
        "touch",
        marker.to_str().unwrap(),
    ]);
    expect_code(&out, 3);
    assert!(!marker.exists());
    assert!(text(&out.stderr).contains(&format!("pid {}", h.pid())));
    assert!(a.holders("free-one").is_empty(), "all or nothing");
}

#[test]
fn check_runs_on_a_dirty_resource_and_gates_the_command() {
    let a = Agent::start();
    expect_code(&a.lh(&["run", "--exclusive", "disk", "--", "false"]), 1);
    assert!(a.is_dirty("disk"));
    // A failing check: exit 4, still dirty, command not started.
    let marker = a.path("started");
    let out = a.lh(&[
        "run",
        "--check",
        "test {path} = nope",
        "--exclusive",
        "disk",
        "--",
        "touch",
        marker.to_str().unwrap(),
    ]);
    expect_code(&out, 4);
    assert!(!marker.exists());
    assert!(a.is_dirty("disk"));
    assert!(a.holders("disk").is_empty());
    // A passing check ({path} is the resource): marked clean, command runs.
    let seen = a.path("checked");
    let check = format!("echo {{path}} > {}", seen.display());
    let out = a.lh(&[
        "run",
        "--check",
        &check,
        "--exclusive",
        "disk",
        "--",
        "touch",
        marker.to_str().unwrap(),
    ]);
    expect_code(&out, 0);
    assert!(marker.exists());
    assert_eq!(std::fs::read_to_string(&seen).unwrap().trim(), "disk");
    assert!(!a.is_dirty("disk"));
}

#[test]
fn signals_reach_the_command_and_its_status_comes_back() {
    let a = Agent::start();
    let ready = a.path("ready");
    let script = format!(
        "trap 'echo got-term; exit 42' TERM; touch {}; while :; do sleep 0.05; done",
        ready.display()
    );
    let child = a
        .cli()
        .args(["run", "--exclusive", "disk", "--", "sh", "-c", &script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("the command starts", Duration::from_secs(5), || {
        ready.exists()
    });
    signal(child.id(), libc::SIGTERM);
    let out = child.wait_with_output().unwrap();
    expect_code(&out, 42);
    assert!(text(&out.stdout).contains("got-term"));
    assert!(a.is_dirty("disk"), "exit 42 is not success");
}

#[test]
fn killing_the_wrapper_kills_its_command_and_ends_the_lease_dirty() {
    let a = Agent::start();
    let pidfile = a.path("child.pid");
    let script = format!("echo $$ > {}; exec sleep 3600", pidfile.display());
    let mut wrapper = a
        .cli()
        .args(["run", "--exclusive", "disk", "--", "sh", "-c", &script])
        .spawn()
        .unwrap();
    let child = wait_pid_file(&pidfile, Duration::from_secs(5));
    assert!(alive(child));
    assert_eq!(a.holders("disk"), vec![u64::from(wrapper.id())]);
    let _ = wrapper.kill(); // SIGKILL: no chance to clean up
    let _ = wrapper.wait();
    wait_until(
        "the command dies with its wrapper",
        Duration::from_secs(5),
        || !alive(child),
    );
    wait_until("the lease ends", Duration::from_secs(5), || {
        a.holders("disk").is_empty()
    });
    assert!(a.is_dirty("disk"));
}

#[test]
fn a_force_released_run_has_its_command_killed() {
    let a = Agent::start();
    let pidfile = a.path("child.pid");
    let script = format!("echo $$ > {}; exec sleep 3600", pidfile.display());
    let wrapper = a
        .cli()
        .args(["run", "--exclusive", "disk", "--", "sh", "-c", &script])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let child = wait_pid_file(&pidfile, Duration::from_secs(5));
    expect_code(&a.lh(&["force-release", "disk", "--reason", "test"]), 0);
    let out = wrapper.wait_with_output().unwrap();
    assert!(!out.status.success());
    wait_until("the command is dead", Duration::from_secs(5), || {
        !alive(child)
    });
    assert!(a.is_dirty("disk"));
}

#[test]
fn crossed_runs_with_wait_do_not_deadlock() {
    let a = Agent::start();
    let spawn = |x: &str, y: &str| {
        a.cli()
            .args([
                "run",
                "--wait",
                "--exclusive",
                x,
                "--exclusive",
                y,
                "--",
                "sh",
                "-c",
                "sleep 0.05",
            ])
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut kids = Vec::new();
    for _ in 0..6 {
        kids.push(spawn("left", "right"));
        kids.push(spawn("right", "left"));
    }
    for k in kids {
        let out = k.wait_with_output().unwrap();
        expect_code(&out, 0);
    }
    assert!(!a.is_dirty("left") && !a.is_dirty("right"));
}

#[test]
fn run_wait_shows_the_holder_then_runs() {
    let a = Agent::start();
    let h = Holder::new();
    expect_code(&a.lh(&["acquire", "disk", "--pid", &h.pid_arg()]), 0);
    let mut waiter = a
        .cli()
        .args(["run", "--wait", "--exclusive", "disk", "--", "true"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The run shows the holder while it waits, before anything is released.
    let mut err = Lines::new(waiter.stderr.take().unwrap());
    let line = err.wait_for("waiting", Duration::from_secs(10));
    assert!(line.contains(&format!("pid {}", h.pid())), "{line}");
    assert!(
        !a.inspect("disk").unwrap()["waiters"]
            .as_array()
            .unwrap()
            .is_empty(),
        "the run is queued"
    );
    expect_code(&a.lh(&["release", "disk", "--pid", &h.pid_arg()]), 0);
    let status = waiter.wait().unwrap();
    assert!(
        status.success(),
        "{status}\n{}",
        err.rest(Duration::from_secs(5))
    );
}

#[test]
fn path_names_files_by_their_canonical_path() {
    let a = Agent::start();
    let dir = a.path("images");
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("vm1.img");
    std::fs::write(&img, b"").unwrap();
    std::os::unix::fs::symlink(&img, dir.join("alias.img")).unwrap();
    let h = Holder::new();
    let out = a
        .cli()
        .current_dir(&dir)
        .args(["acquire", "--path", "vm1.img", "--pid", &h.pid_arg()])
        .output()
        .unwrap();
    expect_code(&out, 0);
    let canonical = std::fs::canonicalize(&img).unwrap();
    assert_eq!(
        a.holders(canonical.to_str().unwrap()),
        vec![u64::from(h.pid())]
    );
    // Another spelling of the same file meets the same lease.
    let out = a
        .cli()
        .current_dir(&dir)
        .args(["run", "--path", "--exclusive", "./alias.img", "--", "true"])
        .output()
        .unwrap();
    expect_code(&out, 3);
    let out = a.lh(&[
        "run",
        "--path",
        "--exclusive",
        "/no/such/file.img",
        "--",
        "true",
    ]);
    expect_code(&out, 2);
}

/// The processes whose command line names `marker` (the wrapper, its child before the exec,
/// the command after it).
fn named(marker: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.windows(marker.len()).any(|w| w == marker.as_bytes()))
        })
        .filter(|pid| alive(*pid))
        .collect()
}

/// The wrapper SIGKILLed the moment its command's process exists (between the clone and the
/// parent-death signal taking effect, or just after the exec): the command never outlives it,
/// and the lease ends.
#[test]
fn a_wrapper_killed_right_as_it_starts_its_command_leaves_no_command_running() {
    let a = Agent::start();
    // A name of sleep that only this test's commands have.
    let sleeper = a.path("sleep-for-this-test");
    std::os::unix::fs::symlink(
        std::process::Command::new("sh")
            .args(["-c", "command -v sleep"])
            .output()
            .map(|o| text(&o.stdout).trim().to_owned())
            .unwrap(),
        &sleeper,
    )
    .unwrap();
    let marker = sleeper.to_str().unwrap().to_owned();
    for round in 0..10 {
        let mut wrapper = a
            .cli()
            .args(["run", "--exclusive", "disk", "--", &marker, "3600"])
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let w = wrapper.id();
        let children = format!("/proc/{w}/task/{w}/children");
        // Kill it as soon as its child exists (early rounds), or once the command has
        // replaced the wrapper's image (later rounds).
        let started = |pid: &str| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.starts_with(marker.as_bytes()))
        };
        let mut exited = None;
        wait_until(
            "the wrapper starts its command",
            Duration::from_secs(10),
            || {
                let kids = std::fs::read_to_string(&children).unwrap_or_default();
                match kids.split_whitespace().next() {
                    Some(pid) => round < 5 || started(pid),
                    None => {
                        exited = wrapper.try_wait().unwrap();
                        exited.is_some()
                    }
                }
            },
        );
        assert_eq!(exited, None, "round {round}: the wrapper ended by itself");
        let _ = wrapper.kill();
        let status = wrapper.wait().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL), "round {round}");
        let outlived = std::panic::catch_unwind(|| {
            wait_until(
                "no command outlives its wrapper",
                Duration::from_secs(5),
                || named(&marker).is_empty(),
            )
        });
        if outlived.is_err() {
            let left = named(&marker);
            left.iter().for_each(|p| signal(*p, libc::SIGKILL));
            panic!("round {round}: the command outlived its wrapper: {left:?}");
        }
        wait_until("the lease ends", Duration::from_secs(5), || {
            a.holders("disk").is_empty()
        });
        let _ = a.lh(&["mark-clean", "disk"]);
    }
}

/// SIGINT and SIGHUP reach the command too (SIGTERM: the test above), each in turn, and the
/// status the command exits with comes back.
#[test]
fn sigint_and_sighup_reach_the_command() {
    let a = Agent::start();
    for (sig, name, code) in [(libc::SIGINT, "INT", 41), (libc::SIGHUP, "HUP", 43)] {
        let ready = a.path(&format!("ready-{name}"));
        let script = format!(
            "trap 'exit {code}' {name}; touch {}; while :; do sleep 0.05; done",
            ready.display()
        );
        let mut cmd = a.cli();
        cmd.args(["run", "--exclusive", "disk", "--", "sh", "-c", &script])
            .stderr(Stdio::piped());
        // A suite started in the background by a non-interactive shell inherits SIGINT
        // ignored, which exec keeps and `sh` cannot trap: the wrapper and its command start
        // with the signal's default action, as from a terminal.
        // SAFETY: signal() is async-signal-safe and touches only the child's dispositions.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                libc::signal(sig, libc::SIG_DFL);
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap();
        wait_until("the command starts", Duration::from_secs(5), || {
            ready.exists()
        });
        signal(child.id(), sig);
        let out = child.wait_with_output().unwrap();
        expect_code(&out, code);
        assert!(a.holders("disk").is_empty());
        assert!(a.is_dirty("disk"), "exit {code} is not success");
        expect_code(&a.lh(&["mark-clean", "disk"]), 0);
    }
}

/// Fields of `POST /v1/acquire` that an agent from before `contain` (81860e9) knew.
const FIELDS_BEFORE_CONTAIN: &[&str] = &[
    "items",
    "pid",
    "start_time",
    "owner_id",
    "on_lost",
    "label",
    "accept_dirty",
    "wait",
    "hold",
    "restricted",
    "on_exit",
    "before_fence",
    "expect_tokens",
];

/// An agent older than this CLI, for one request: the first request on its socket is
/// refused as that agent refused a body with a field it does not know (not in `known`): its
/// usage error, with serde's words for the first unknown field. Before it answers, the real
/// agent `a`'s socket is moved to its place, so what comes next is served by `a` itself (with
/// the caller's own credentials): only the refusal is made up. Returns its socket and, once
/// it has answered, the body it refused. The caller moves `a`'s socket back.
fn older_agent(
    a: &Agent,
    known: Vec<&'static str>,
) -> (
    std::path::PathBuf,
    std::thread::JoinHandle<serde_json::Value>,
) {
    use std::io::{BufRead, BufReader, Read, Write};
    let socket = a.path("older.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let real = a.socket.clone();
    let at = socket.clone();
    let refused = std::thread::spawn(move || {
        let (client, _) = listener.accept().unwrap();
        let mut r = BufReader::new(client.try_clone().unwrap());
        let mut length = 0usize;
        let mut first = String::new();
        loop {
            let mut line = String::new();
            assert!(r.read_line(&mut line).unwrap() > 0, "a request");
            if first.is_empty() {
                first = line.clone();
            }
            if let Some(l) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = l.trim().parse().unwrap();
            }
            if line == "\r\n" {
                break;
            }
        }
        assert!(first.starts_with("POST /v1/acquire "), "{first}");
        let mut body = vec![0u8; length];
        r.read_exact(&mut body).unwrap();
        let text = String::from_utf8(body).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        // The first unknown field in the body, as serde meets them.
        let (column, field) = v
            .as_object()
            .unwrap()
            .keys()
            .filter(|k| !known.contains(&k.as_str()))
            .filter_map(|k| Some((text.find(&format!("\"{k}\":"))? + k.len() + 2, k.clone())))
            .min()
            .unwrap_or_else(|| panic!("no field unknown to the older agent in {text}"));
        let expected = known
            .iter()
            .map(|f| format!("`{f}`"))
            .collect::<Vec<_>>()
            .join(", ");
        let error = serde_json::json!({
            "code": "usage",
            "message": format!(
                "the request body is not a valid AcquireRequest: unknown field `{field}`, expected one of {expected} at line 1 column {column}; nothing was done (the schema: docs/api/v1.schema.json)"
            ),
        })
        .to_string();
        // From now on the real agent answers here.
        std::fs::rename(&real, &at).unwrap();
        let mut client = client;
        write!(
            client,
            "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{error}",
            error.len()
        )
        .unwrap();
        v
    });
    (socket, refused)
}

/// `run --exclusive disk -- COMMAND...` against an [`older_agent`] that knows `known`: its
/// output and the body the older agent refused, with the real agent's socket moved back.
fn run_through_older_agent(
    a: &Agent,
    known: Vec<&'static str>,
    command: &[&str],
) -> (std::process::Output, serde_json::Value) {
    let (socket, refused) = older_agent(a, known);
    let out = a
        .cli()
        .env("LEASEHOLD_SOCKET", &socket)
        .args(["run", "--exclusive", "disk", "--"])
        .args(command)
        .output()
        .unwrap();
    let refused = refused.join().unwrap();
    std::fs::rename(&socket, &a.socket).unwrap();
    (out, refused)
}

/// The command the `run` tests against an older agent start: prints its tokens and its
/// containment.
const ECHO_TOKENS_AND_CONTAINMENT: &[&str] = &[
    "sh",
    "-c",
    "echo \"$LEASEHOLD_TOKENS $LEASEHOLD_CONTAINMENT\"",
];

/// After a package upgrade, `run` works against the agent still running from before the
/// request fields it now sends (`contain`, `clone_into_cgroup`): that agent refuses unknown
/// fields (G8), and the CLI asks once more without them, leaving out nothing else. Before,
/// every `run` failed with a usage error until the agent restarted.
#[test]
fn run_works_against_an_agent_from_before_contain() {
    let a = Agent::start();
    let (out, refused) = run_through_older_agent(
        &a,
        FIELDS_BEFORE_CONTAIN.to_vec(),
        ECHO_TOKENS_AND_CONTAINMENT,
    );
    expect_code(&out, 0);
    assert_eq!(refused["contain"], true, "{refused}");
    // Asked again without `contain`: contained by its process group, as the older agent does.
    assert_eq!(
        text(&out.stdout).trim(),
        "disk=1 group",
        "{}",
        text(&out.stderr)
    );
    assert!(a.holders("disk").is_empty());
    assert!(!a.is_dirty("disk"), "{:?}\n{}", a.inspect("disk"), a.log());
    // Where the agent has cgroups, `contain` asked for makes one: the second request left it
    // out.
    if a.log().contains("a cgroup each") {
        let out = a.lh(&[
            "run",
            "--exclusive",
            "disk",
            "--",
            "sh",
            "-c",
            "echo $LEASEHOLD_CONTAINMENT",
        ]);
        expect_code(&out, 0);
        assert_eq!(text(&out.stdout).trim(), "cgroup");
    }
}

/// The same against an agent from after `contain` but before `clone_into_cgroup` (d7e2feb):
/// asked again with `contain` alone, the wrapper is moved into its cgroup (by the real agent,
/// which gets the wrapper's own credentials) as that agent did.
#[cfg(target_arch = "x86_64")]
#[test]
fn run_works_against_an_agent_from_before_clone_into_cgroup() {
    let a = Agent::start();
    let known = [FIELDS_BEFORE_CONTAIN, &["contain"]].concat();
    let (out, refused) = run_through_older_agent(&a, known, ECHO_TOKENS_AND_CONTAINMENT);
    expect_code(&out, 0);
    assert_eq!(refused["clone_into_cgroup"], true, "{refused}");
    let want = if a.log().contains("a cgroup each") {
        "disk=1 cgroup"
    } else {
        "disk=1 group"
    };
    assert_eq!(text(&out.stdout).trim(), want, "{}", text(&out.stderr));
    assert!(a.holders("disk").is_empty());
    assert!(!a.is_dirty("disk"), "{:?}\n{}", a.inspect("disk"), a.log());
}

/// A usage error for any other unknown field stands: not asked again, exit 2.
#[test]
fn an_older_agents_refusal_of_another_field_stands() {
    let a = Agent::start();
    let known = vec![
        "items",
        "pid",
        "accept_dirty",
        "contain",
        "clone_into_cgroup",
    ];
    let (out, _) = run_through_older_agent(&a, known, &["true"]);
    expect_code(&out, 2);
    assert!(
        text(&out.stderr).contains("unknown field `hold`"),
        "{}",
        text(&out.stderr)
    );
    assert!(!a.log().contains("granted"), "asked again: {}", a.log());
    assert!(a.holders("disk").is_empty());
}

/// `run`'s final release goes on its hold's own connection, which the agent switched to
/// `HOLD_UPGRADE`: no new connection is needed. Here the command moves the agent's socket
/// away, so none could reach it: the leases are released all the same, clean on exit 0 and
/// dirty, with the command's status as the note, otherwise. Before, the release's new
/// connection failed and the leases ended at the wrapper's exit, dirty (seen failing so).
#[test]
fn run_releases_on_its_hold_connection_clean_and_dirty() {
    let a = Agent::start();
    let away = a.path("away.sock");
    for (resource, status) in [("clean", 0), ("dirty", 5)] {
        let out = a
            .cli()
            .args(["run", "--exclusive", resource, "--", "sh", "-c"])
            .arg(format!("mv \"$0\" \"$1\" && exit {status}"))
            .arg(&a.socket)
            .arg(&away)
            .output()
            .unwrap();
        std::fs::rename(&away, &a.socket).unwrap();
        expect_code(&out, status);
        assert!(
            !text(&out.stderr).contains("releasing"),
            "{}",
            text(&out.stderr)
        );
        assert!(a.holders(resource).is_empty(), "{}", a.log());
        let v = a.inspect(resource).unwrap();
        if status == 0 {
            assert_eq!(v["dirty"], false, "{v}\n{}", a.log());
            assert_eq!(v["last_ended"]["how"], "released", "{v}");
        } else {
            assert_eq!(v["dirty_record"]["how"], "released-dirty", "{v}");
            assert_eq!(v["dirty_record"]["note"], "exited with status 5", "{v}");
        }
    }
}
