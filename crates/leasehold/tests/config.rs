//! The agent's config file: every flag has a key, the sample shows them all, etcd endpoints
//! as a list or a comma string, TOML errors with line and column, and the log settings.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use leasehold_agent::{Config, FileConfig};

fn sample() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../packaging/agent.toml")
}

/// The long flags `leasehold agent --help` lists.
fn agent_flags() -> Vec<String> {
    let out = std::process::Command::new(bin())
        .args(["agent", "--help"])
        .output()
        .unwrap();
    expect_code(&out, 0);
    // Definitions start their line: "  -h, --help" or "      --state-dir <DIR>".
    let mut flags: Vec<String> = text(&out.stdout)
        .lines()
        .map(str::trim_start)
        .filter(|l| l.starts_with('-'))
        .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("--")))
        .map(|w| {
            w.trim_end_matches(',')
                .split('=')
                .next()
                .unwrap()
                .to_owned()
        })
        .collect();
    flags.sort();
    flags.dedup();
    flags
}

#[test]
fn every_agent_flag_has_a_config_key_and_the_sample_shows_it() {
    let flags = agent_flags();
    for must in [
        "log-json",
        "log-level",
        "etcd-endpoints",
        "watchdog",
        "socket",
    ] {
        assert!(flags.iter().any(|f| f == must), "{must} in {flags:?}");
    }
    let sample_text = std::fs::read_to_string(sample()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for flag in flags
        .iter()
        .filter(|f| !["config", "help", "timeout", "version"].contains(&f.as_str()))
    {
        // A key the file does not know is refused as unknown; a known one with a value of
        // the wrong type is refused for its type.
        let file = dir.path().join(format!("{flag}.toml"));
        std::fs::write(&file, format!("{flag} = {{ }}\n")).unwrap();
        let e = FileConfig::read(&file).unwrap_err().to_string();
        assert!(
            !e.contains("unknown field"),
            "--{flag} has no config key: {e}"
        );
        assert!(
            sample_text.contains(&format!("\n{flag} = "))
                || sample_text.contains(&format!("\n# {flag} = ")),
            "packaging/agent.toml does not show {flag}"
        );
    }
    // The sample is valid as shipped, and with every commented key set.
    FileConfig::read(&sample()).unwrap();
    let all: String = sample_text
        .lines()
        .map(|l| {
            match l
                .strip_prefix("# ")
                .and_then(|r| Some((r, r.split_once(" = ")?.0)))
            {
                Some((rest, key)) if key.chars().all(|c| c.is_ascii_lowercase() || c == '-') => {
                    rest
                }
                _ => l,
            }
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let file = dir.path().join("all.toml");
    std::fs::write(&file, all).unwrap();
    let f = FileConfig::read(&file).unwrap();
    assert_eq!(f.log_json, Some(false));
    assert_eq!(f.etcd_endpoints.map(|e| e.len()), Some(3));
}

#[test]
fn etcd_endpoints_are_a_list_or_a_comma_string_in_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let resolve = |body: &str| {
        let file = dir.path().join("e.toml");
        std::fs::write(&file, body).unwrap();
        let f = FileConfig {
            socket: Some(dir.path().join("s.sock")),
            state_dir: Some(dir.path().join("state")),
            ..FileConfig::read(&file).unwrap()
        };
        Config::resolve(f).unwrap().etcd_endpoints
    };
    let want = vec!["http://a:2379".to_owned(), "http://b:2379".to_owned()];
    let base = "backend = \"etcd\"\nttl = \"10s\"\n";
    assert_eq!(
        resolve(&format!(
            "{base}etcd-endpoints = [\"http://a:2379\", \"http://b:2379\"]\n"
        )),
        want
    );
    assert_eq!(
        resolve(&format!(
            "{base}etcd-endpoints = \"http://a:2379, http://b:2379\"\n"
        )),
        want
    );

    // A real agent on a real etcd, from a file giving them as one string.
    let etcd = leasehold_testkit::Etcd::start();
    let conf = dir.path().join("agent.toml");
    std::fs::write(
        &conf,
        format!(
            "backend = \"etcd\"\netcd-endpoints = \"{e},{e}\"\netcd-prefix = \"/cfg{}/\"\n",
            std::process::id(),
            e = etcd.endpoint()
        ),
    )
    .unwrap();
    let a = Agent::launch("cfg-host", &["--config", conf.to_str().unwrap()], &[]);
    let out = a.lh(&["status", "--json"]);
    expect_code(&out, 0);
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["backend"], "etcd", "{s}");
}

#[test]
fn a_toml_error_shows_line_and_column_on_their_own_lines() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("agent.toml");
    std::fs::write(&conf, "backend = \"local\"\n\nttl = 10s\n").unwrap();
    let mut a = Agent::unstarted("node1", &["--config", conf.to_str().unwrap()], &[]);
    let out = a.command().output().unwrap();
    expect_code(&out, 2);
    let err = text(&out.stderr);
    let lines: Vec<&str> = err.lines().collect();
    assert!(
        lines
            .iter()
            .any(|l| l.trim_start().starts_with("line 3, column 7: ")),
        "{err}"
    );
    assert!(lines.iter().any(|l| l.contains("3 | ttl = 10s")), "{err}");
    assert!(
        lines.iter().any(|l| l.trim_end().ends_with("|       ^")),
        "{err}"
    );
    assert!(!a.socket.exists(), "nothing started");
    let _ = &mut a;
}

#[test]
fn the_log_level_and_format_come_from_flags_file_or_environment() {
    // Default: info, human lines without the monotonic field.
    let a = Agent::start();
    let h = Holder::new();
    expect_code(&a.lh(&["acquire", "disk", "--pid", &h.pid_arg()]), 0);
    wait_until("the grant is logged", Duration::from_secs(10), || {
        a.log().contains("granted")
    });
    assert!(a.log().contains("agent ready"), "{}", a.log());
    assert!(!a.log().contains("mono_ns"), "{}", a.log());
    drop(a);

    // log-json and log-level in the file: JSON lines, with the monotonic field.
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("agent.toml");
    std::fs::write(&conf, "log-json = true\nlog-level = \"debug\"\n").unwrap();
    let a = Agent::start_with(&["--config", conf.to_str().unwrap()]);
    expect_code(&a.lh(&["acquire", "disk", "--pid", &h.pid_arg()]), 0);
    wait_until("the grant is logged", Duration::from_secs(10), || {
        a.log().contains("granted")
    });
    let granted = a
        .log()
        .lines()
        .find(|l| l.contains("granted"))
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .unwrap();
    assert!(granted["fields"]["mono_ns"].is_u64(), "{granted}");
    drop(a);

    // --log-level warn: no info lines; a warning still shows (a dirty release).
    let a = Agent::start_with(&["--log-level", "warn"]);
    expect_code(&a.lh(&["acquire", "disk", "--pid", &h.pid_arg()]), 0);
    expect_code(
        &a.lh(&["release", "disk", "--dirty", "--pid", &h.pid_arg()]),
        0,
    );
    wait_until(
        "the dirty release is logged",
        Duration::from_secs(10),
        || a.log().contains("released dirty"),
    );
    assert!(a.log().contains("WARN"), "{}", a.log());
    assert!(!a.log().contains("agent ready"), "{}", a.log());
    drop(a);

    // RUST_LOG alone.
    let mut a = Agent::unstarted("node1", &[], &[]);
    let mut c = a.command();
    c.env_remove("LEASEHOLD_LOG").env("RUST_LOG", "warn");
    let dir2 = a.dir.path().to_owned();
    let log = std::fs::File::create(dir2.join("agent.log")).unwrap();
    let mut child = c.stderr(log).spawn().unwrap();
    wait_until("the agent answers", Duration::from_secs(20), || {
        a.lh(&["status"]).status.success()
    });
    assert!(!a.log().contains("agent ready"), "{}", a.log());
    let _ = child.kill();
    let _ = child.wait();
    let _ = &mut a;

    // A bad level is a usage error.
    let out = Agent::unstarted("node1", &["--log-level", "leasehold=loud"], &[])
        .command()
        .output()
        .unwrap();
    expect_code(&out, 2);
    assert!(
        text(&out.stderr).contains("log-level"),
        "{}",
        text(&out.stderr)
    );
}
