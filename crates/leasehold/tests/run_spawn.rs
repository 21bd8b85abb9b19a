//! How `leasehold run` starts its command (a vfork-style clone, one thread, a poll over a
//! signalfd and the hold stream): what the command starts with, and what the wrapper is
//! while it runs. The guarantees themselves (the command dies with the wrapper, signals are
//! passed on, exec failures exit 127/126) are tested in run.rs and stray.rs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::PermissionsExt;

use common::*;

/// The field `name` of a /proc/PID/status text.
fn field<'a>(status: &'a str, name: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {name} in {status}"))
        .trim()
}

fn mask(status: &str, name: &str) -> u64 {
    u64::from_str_radix(field(status, name), 16).unwrap()
}

fn bit(sig: i32) -> u64 {
    1 << (sig - 1)
}

/// The wrapper waits on one thread (no reader or signal thread); the command starts with the
/// signals the wrapper takes for itself unblocked and SIGPIPE at its default, as a command
/// started from a shell would.
#[test]
fn the_wrapper_has_one_thread_and_the_command_default_signals() {
    let a = Agent::start();
    let wrapper = a.path("wrapper-status");
    let out = a.lh(&[
        "run",
        "--exclusive",
        "disk",
        "--",
        "sh",
        "-c",
        &format!(
            "cat /proc/$PPID/status > {}; exec cat /proc/self/status",
            wrapper.display()
        ),
    ]);
    expect_code(&out, 0);
    let wrapper = std::fs::read_to_string(&wrapper).unwrap();
    assert_eq!(field(&wrapper, "Threads"), "1", "{wrapper}");
    // The wrapper itself blocks them, to read them from its signalfd.
    let taken = bit(libc::SIGINT) | bit(libc::SIGTERM) | bit(libc::SIGHUP) | bit(libc::SIGCHLD);
    assert_eq!(mask(&wrapper, "SigBlk") & taken, taken, "{wrapper}");
    let command = text(&out.stdout);
    assert_eq!(mask(&command, "SigBlk") & taken, 0, "{command}");
    assert_eq!(
        mask(&command, "SigIgn") & bit(libc::SIGPIPE),
        0,
        "{command}"
    );
}

/// The command gets the wrapper's environment, and LEASEHOLD_TOKENS once: this run's, in
/// place of one the wrapper was given (a run inside a run).
#[test]
fn the_command_gets_the_environment_and_its_own_tokens_once() {
    let a = Agent::start();
    let out = a
        .cli()
        .env("LEASEHOLD_TEST_KEPT", "kept value")
        .env("LEASEHOLD_TOKENS", "outer=1")
        .args([
            "run",
            "--exclusive",
            "disk",
            "--",
            "sh",
            "-c",
            "echo \"$LEASEHOLD_TEST_KEPT\"; env | grep -c '^LEASEHOLD_TOKENS='; echo \"$LEASEHOLD_TOKENS\"",
        ])
        .output()
        .unwrap();
    expect_code(&out, 0);
    let lines: Vec<String> = text(&out.stdout).lines().map(str::to_owned).collect();
    assert_eq!(lines[0], "kept value");
    assert_eq!(lines[1], "1");
    let (name, token) = lines[2].split_once('=').unwrap();
    assert_eq!(name, "disk");
    token.parse::<u64>().unwrap();
}

/// The command is looked up on PATH, and a script without a `#!` line runs under /bin/sh,
/// as execvp does, with every argument however many: the child's stack is sized for them.
#[test]
fn a_script_found_on_path_runs_under_sh_with_many_arguments() {
    let a = Agent::start();
    let dir = a.path("bin");
    std::fs::create_dir_all(&dir).unwrap();
    let script = dir.join("count-args");
    std::fs::write(&script, "echo \"$# $1 ${50000}\"\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let args: Vec<String> = (1..=50_000).map(|i| format!("a{i}")).collect();
    let out = a
        .cli()
        .env("PATH", path)
        .args(["run", "--exclusive", "disk", "--", "count-args"])
        .args(&args)
        .output()
        .unwrap();
    expect_code(&out, 0);
    assert_eq!(text(&out.stdout).trim(), "50000 a1 a50000");
    assert!(!a.is_dirty("disk"));
}

/// Where the C toolchain has the static unwinder, the binaries link it and do not load
/// `libgcc_s` at start (build.rs; docs/performance.md: 0.14 ms of CPU per start on a VM).
#[test]
fn the_wrapper_does_not_load_libgcc_s_where_the_toolchain_links_it_statically() {
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_owned());
    // As build.rs decides: without a C compiler that has it, libgcc_s is loaded.
    let linked_static = std::process::Command::new(cc)
        .arg("-print-file-name=libgcc_eh.a")
        .output()
        .is_ok_and(|out| {
            let eh = std::path::PathBuf::from(text(&out.stdout).trim());
            eh.is_absolute() && eh.is_file()
        });
    let a = Agent::start();
    let maps = a.path("wrapper-maps");
    let out = a.lh(&[
        "run",
        "--exclusive",
        "disk",
        "--",
        "sh",
        "-c",
        &format!("cat /proc/$PPID/maps > {}", maps.display()),
    ]);
    expect_code(&out, 0);
    let maps = std::fs::read_to_string(&maps).unwrap();
    assert!(maps.contains("libc.so"), "{maps}");
    assert_eq!(maps.contains("libgcc_s"), !linked_static, "{maps}");
}

/// Started by a program that ignores SIGCHLD (a disposition exec keeps), the wrapper still
/// learns its command's exit status: the kernel would otherwise reap the command itself. The
/// status comes back and decides the release, clean on 0, dirty otherwise, with `--check`'s
/// command waited for too.
#[test]
fn a_wrapper_started_with_sigchld_ignored_still_gets_its_commands_status() {
    use std::os::unix::process::CommandExt;
    let a = Agent::start();
    let run = |args: &[&str]| {
        let mut c = a.cli();
        c.args(args);
        // SAFETY: signal() is async-signal-safe; the closure allocates nothing.
        unsafe {
            c.pre_exec(|| {
                libc::signal(libc::SIGCHLD, libc::SIG_IGN);
                Ok(())
            });
        }
        c.output().unwrap()
    };
    let out = run(&["run", "--exclusive", "disk", "--", "sh", "-c", "exit 3"]);
    expect_code(&out, 3);
    assert!(a.holders("disk").is_empty());
    assert!(a.is_dirty("disk"), "exit 3 releases dirty");
    let check = "true {path}";
    let out = run(&["run", "--exclusive", "disk", "--check", check, "--", "true"]);
    expect_code(&out, 0);
    assert!(a.holders("disk").is_empty());
    assert!(!a.is_dirty("disk"), "checked, then exit 0 releases clean");
}
