//! The Debian package (issue 11 item 8), built by `packaging/build-deb` with cargo-deb and
//! installed into this machine with `dpkg -i`: its files are where Debian looks for them, the
//! binary is stripped, the manual page renders, the completions parse, the unit is valid, and
//! the agent starts from the installed unit's own `ExecStart` line (with the installed sample
//! config), reports ready as `Type=notify` wants, serves the installed CLI and stops on
//! SIGTERM. Then `dpkg -r` removes it. libvirt's lock driver is in it, where Debian's libvirt
//! loads it, with its settings as a conffile.
//!
//! It packages this build's own binary and plugin (the test profile's, not a release build: the
//! suite does not build twice); cargo-deb strips them as it strips the release build.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod libvirt_support;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{Holder, bin, expect_code, require_root, text, wait_until};

const PACKAGE: &str = "leasehold";

/// Where the package puts libvirt's lock driver, and its settings.
const PLUGIN: &str = "/usr/lib/x86_64-linux-gnu/libvirt/lock-driver/leasehold.so";
const PLUGIN_CONF: &str = "/etc/libvirt/qemu-leasehold.conf";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({})\nstdout: {}\nstderr: {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    out
}

fn installed() -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", PACKAGE])
        .output()
        .map(|o| text(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

/// Purges the package when the test ends, however it ends.
struct Purge;

impl Drop for Purge {
    fn drop(&mut self) {
        let _ = Command::new("dpkg")
            .args(["--purge", PACKAGE])
            .stdout(Stdio::null())
            .output();
    }
}

/// Builds the .deb from this build's binary and plugin, in `out`.
fn build_deb(out: &Path) -> PathBuf {
    // cargo-deb packages `$CARGO_TARGET_DIR/release/leasehold` and the plugin beside it: stage
    // this build's there (copies in a temporary directory; nothing is compiled).
    let staged = out.join("target");
    std::fs::create_dir_all(staged.join("release")).unwrap();
    std::fs::copy(bin(), staged.join("release/leasehold")).unwrap();
    std::fs::copy(
        libvirt_support::plugin(),
        staged.join("release/libleasehold_libvirt.so"),
    )
    .unwrap();
    std::fs::copy(
        std::path::Path::new(bin()).with_file_name("leasehold-agent"),
        staged.join("release/leasehold-agent"),
    )
    .unwrap();
    let made = run(Command::new(repo().join("packaging/build-deb"))
        .args(["--no-build", "--fast", "--output"])
        .arg(out)
        .env("CARGO_TARGET_DIR", &staged));
    let debs: Vec<PathBuf> = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "deb"))
        .collect();
    assert_eq!(
        debs.len(),
        1,
        "build-deb made {debs:?}\n{}",
        text(&made.stderr)
    );
    debs[0].clone()
}

/// The installed unit's `ExecStart=` command line, split into words.
fn exec_start(unit: &Path) -> Vec<String> {
    let unit = std::fs::read_to_string(unit).unwrap();
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("the unit has an ExecStart= line");
    assert!(
        !line.contains(['"', '\'', '\\', '$', '%']),
        "ExecStart= has quoting or specifiers this test does not parse: {line}"
    );
    line.split_whitespace().map(str::to_owned).collect()
}

#[test]
fn deb_installs_and_the_installed_unit_starts_the_agent() {
    require_root("dpkg -i installs the package into this machine");
    let dir = tempfile::tempdir().unwrap();
    let deb = build_deb(dir.path());
    // What the .deb holds, before anything is installed.
    let contents = text(&run(Command::new("dpkg-deb").arg("-c").arg(&deb)).stdout);
    for f in [PLUGIN, PLUGIN_CONF, "/usr/bin/leasehold"] {
        assert!(
            contents.lines().any(|l| l.ends_with(&format!(".{f}"))),
            "{f} not in the .deb:\n{contents}"
        );
    }

    // A package left by an interrupted run of this test is removed first.
    let _purge = Purge;
    if installed() {
        run(Command::new("dpkg").args(["--purge", PACKAGE]));
    }
    run(Command::new("dpkg").arg("-i").arg(&deb));
    assert!(installed());

    // Every file is where Debian's tools look for it.
    let listed = text(&run(Command::new("dpkg").args(["-L", PACKAGE])).stdout);
    let files = [
        "/usr/bin/leasehold",
        "/usr/share/man/man1/leasehold.1.gz",
        "/usr/share/bash-completion/completions/leasehold",
        "/usr/share/zsh/vendor-completions/_leasehold",
        "/usr/share/fish/vendor_completions.d/leasehold.fish",
        "/etc/leasehold/agent.toml",
        "/usr/lib/sysusers.d/leasehold.conf",
        "/usr/lib/tmpfiles.d/leasehold.conf",
        "/usr/share/doc/leasehold/README.md",
        "/usr/share/doc/leasehold/contract.md",
        PLUGIN,
        PLUGIN_CONF,
    ];
    for f in files {
        assert!(
            listed.lines().any(|l| l == f),
            "{f} not in the package:\n{listed}"
        );
        assert!(Path::new(f).exists(), "{f} not installed");
    }
    let unit = listed
        .lines()
        .find(|l| l.ends_with("/systemd/system/leasehold.service"))
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("no unit in the package:\n{listed}"));
    let conffiles = std::fs::read_to_string("/var/lib/dpkg/info/leasehold.conffiles").unwrap();
    for c in ["/etc/leasehold/agent.toml", PLUGIN_CONF] {
        assert!(
            conffiles.lines().any(|l| l == c),
            "{c} is not a conffile: {conffiles}"
        );
    }

    // The postinst made the groups of sysusers.d and the state directory of tmpfiles.d.
    for g in ["leasehold", "leasehold-admin"] {
        run(Command::new("getent").args(["group", g]));
    }
    let state = std::fs::metadata("/var/lib/leasehold").unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&state.permissions()) & 0o777,
        0o700
    );

    // Stripped: no debug information left in the packaged binary and plugin.
    for elf in ["/usr/bin/leasehold", PLUGIN] {
        let sections = text(&run(Command::new("readelf").args(["-S", "-W", elf])).stdout);
        // (.debug_gdb_scripts is loaded data, not debug information: strip keeps it.)
        assert!(
            ![".debug_info", ".debug_line", ".debug_str"]
                .iter()
                .any(|d| sections.contains(d)),
            "the installed {elf} keeps debug sections:\n{sections}"
        );
    }
    // The plugin still exports the one symbol libvirt looks up (a data object of 72 bytes).
    let symbols = text(&run(Command::new("readelf").args(["--dyn-syms", "-W", PLUGIN])).stdout);
    assert!(
        symbols
            .lines()
            .any(|l| l.ends_with(" virLockDriverImpl") && l.contains(" 72 OBJECT ")),
        "{PLUGIN} does not export virLockDriverImpl:\n{symbols}"
    );
    // The settings file is the documented sample.
    assert_eq!(
        std::fs::read_to_string(PLUGIN_CONF).unwrap(),
        std::fs::read_to_string(repo().join("packaging/qemu-leasehold.conf")).unwrap()
    );

    // The manual page renders without warnings and documents the commands and exit codes.
    let page = run(Command::new("man")
        .args(["-l", "/usr/share/man/man1/leasehold.1.gz"])
        .env("MANPAGER", "cat")
        .env("MANWIDTH", "100")
        .env("MAN_KEEP_FORMATTING", "0"));
    let shown = text(&page.stdout);
    for word in ["acquire", "force-release", "completions", "Exit codes"] {
        assert!(shown.contains(word), "man page lacks {word:?}:\n{shown}");
    }
    let lint = run(Command::new("sh").args([
        "-c",
        "zcat /usr/share/man/man1/leasehold.1.gz | groff -man -ww -z -Tutf8",
    ]));
    assert!(
        lint.stderr.is_empty(),
        "groff warns about the man page:\n{}",
        text(&lint.stderr)
    );

    // The bash completion parses and registers itself.
    run(Command::new("bash").args(["-n", "/usr/share/bash-completion/completions/leasehold"]));
    let reg = run(Command::new("bash").args([
        "-c",
        ". /usr/share/bash-completion/completions/leasehold && complete -p leasehold",
    ]));
    assert!(
        text(&reg.stdout).contains("leasehold"),
        "{}",
        text(&reg.stdout)
    );

    // systemd accepts the unit, finds its binary and its Documentation= page.
    let verify = Command::new("systemd-analyze")
        .args(["verify"])
        .arg(&unit)
        .output()
        .unwrap();
    let complaints = text(&verify.stderr);
    assert!(
        verify.status.success()
            && !complaints.contains("leasehold.service:")
            && !complaints.contains("man:leasehold"),
        "systemd-analyze verify {}:\n{complaints}",
        unit.display()
    );

    // The agent, started as systemd would start it: the unit's ExecStart (which reads the
    // installed agent.toml), here on a private socket and state directory so that it cannot
    // meet another agent on this machine, and with $NOTIFY_SOCKET for Type=notify.
    let words = exec_start(&unit);
    assert_eq!(words[0], "/usr/bin/leasehold", "ExecStart: {words:?}");
    let socket = dir.path().join("agent.sock");
    let notify_path = dir.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let log = std::fs::File::create(dir.path().join("agent.log")).unwrap();
    let mut agent = Command::new(&words[0])
        .args(&words[1..])
        .arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .args(["--host-id", "package-test"])
        .env("NOTIFY_SOCKET", &notify_path)
        .env_remove("LEASEHOLD_SOCKET")
        .stderr(log)
        .spawn()
        .unwrap();
    let agent_log = || std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default();
    let mut buf = [0u8; 4096];
    let n = notify
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("no READY=1 from the agent ({e}):\n{}", agent_log()));
    assert!(
        text(&buf[..n]).lines().any(|l| l == "READY=1"),
        "notification: {:?}",
        text(&buf[..n])
    );

    // The installed CLI talks to it.
    let cli = |args: &[&str]| {
        Command::new("/usr/bin/leasehold")
            .arg("--socket")
            .arg(&socket)
            .args(args)
            .output()
            .unwrap()
    };
    let holder = Holder::new();
    let got = cli(&["acquire", "pkg/disk", "--pid", &holder.pid_arg()]);
    expect_code(&got, 0);
    let listing: serde_json::Value =
        serde_json::from_slice(&cli(&["list", "--json"]).stdout).unwrap();
    assert!(
        listing.to_string().contains("pkg/disk") && listing.to_string().contains(&holder.pid_arg()),
        "list: {listing}"
    );
    expect_code(
        &cli(&["release", "pkg/disk", "--pid", &holder.pid_arg()]),
        0,
    );

    // Stopped by its pid, as systemctl stop would: it exits 0 promptly.
    common::signal(agent.id(), libc::SIGTERM);
    let start = Instant::now();
    let status = loop {
        if let Some(s) = agent.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > Duration::from_secs(20) {
            let _ = agent.kill();
            panic!(
                "the agent had not stopped 20 s after SIGTERM:\n{}",
                agent_log()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "agent exit {status}:\n{}", agent_log());

    // Removed: the binary goes, the edited-or-not config stays until purge.
    run(Command::new("dpkg").args(["-r", PACKAGE]));
    assert!(!Path::new("/usr/bin/leasehold").exists());
    assert!(Path::new("/etc/leasehold/agent.toml").exists());
    assert!(!Path::new(PLUGIN).exists());
    assert!(Path::new(PLUGIN_CONF).exists());
    wait_until("dpkg to forget the package", Duration::from_secs(5), || {
        !installed()
    });
}
