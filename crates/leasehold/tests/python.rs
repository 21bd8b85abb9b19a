//! The Python package (`python/`: the `leasehold` client and the `tooz_leasehold` driver)
//! against real agents: its pytest suite on the local store and on two hosts of one etcd, and
//! tooz's own lock tests (from tooz's wheel) through the driver.
//!
//! The tests run in a virtualenv, `$LEASEHOLD_PY_VENV` or `target/python-venv`, which
//! `scripts/test` makes (`python3 -m venv`, then `pip install ./python
//! tooz[etcd3gw,ipc,memcached,redis] pytest fixtures testtools`); if it is missing, the
//! first test here makes it. Each run installs `./python` into it again, so the tests see
//! this tree's code.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use common::{Agent, text};
use leasehold_testkit::Etcd;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The virtualenv's python, made and given this tree's package once per test binary.
fn python() -> &'static Path {
    static PY: OnceLock<PathBuf> = OnceLock::new();
    PY.get_or_init(|| {
        let venv = std::env::var_os("LEASEHOLD_PY_VENV")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace().join("target/python-venv"));
        let py = venv.join("bin/python");
        if !py.exists() {
            let status = Command::new(workspace().join("scripts/python-venv"))
                .arg(&venv)
                .status()
                .expect("scripts/python-venv runs");
            assert!(
                status.success(),
                "scripts/python-venv {} failed",
                venv.display()
            );
        }
        let out = Command::new(&py)
            .args([
                "-m",
                "pip",
                "install",
                "-q",
                "--no-deps",
                "--no-build-isolation",
                "--force-reinstall",
            ])
            .arg(workspace().join("python"))
            .output()
            .expect("pip runs");
        assert!(
            out.status.success(),
            "pip install ./python failed: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        py
    })
}

/// Runs pytest with `args` and `env`; returns its output, asserting it passed and naming
/// what it skipped.
fn pytest(args: &[&str], env: &[(&str, &Path)], cwd: &Path) -> String {
    let mut c = Command::new(python());
    c.args(["-m", "pytest", "-p", "no:cacheprovider", "-rs", "-q"])
        .args(args)
        .current_dir(cwd)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env_remove("LEASEHOLD_SOCKET_B");
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().expect("pytest runs");
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    println!("{all}");
    assert!(out.status.success(), "pytest {args:?} failed:\n{all}");
    all
}

fn tests_dir() -> PathBuf {
    workspace().join("python/tests")
}

/// The directory of tooz's own tests, from the installed wheel.
fn tooz_tests() -> PathBuf {
    let out = Command::new(python())
        .args([
            "-c",
            "import os, tooz.tests; print(os.path.dirname(tooz.tests.__file__))",
        ])
        .output()
        .expect("python runs");
    assert!(out.status.success(), "{}", text(&out.stderr));
    PathBuf::from(text(&out.stdout).trim())
}

/// The summary line of a pytest run (`27 passed, 56 deselected in 3.1s`).
fn summary(out: &str) -> &str {
    out.lines()
        .rev()
        .find(|l| l.contains(" passed") || l.contains(" failed"))
        .unwrap_or("")
}

#[test]
fn the_python_client_and_tooz_driver_work_on_the_local_store() {
    let a = Agent::start();
    let out = pytest(
        &[tests_dir().to_str().unwrap()],
        &[("LEASEHOLD_SOCKET", &a.socket)],
        &tests_dir(),
    );
    // Only the two-host case may skip here; it runs in the etcd test below.
    let skipped: Vec<&str> = out.lines().filter(|l| l.starts_with("SKIPPED")).collect();
    assert!(
        skipped.iter().all(|l| l.contains("LEASEHOLD_SOCKET_B")),
        "{skipped:?}"
    );
    assert!(skipped.len() <= 1, "{skipped:?}");
}

#[test]
fn toozs_own_lock_tests_pass_through_the_driver_on_the_local_store() {
    let a = Agent::start();
    let url = PathBuf::from(format!("leasehold://{}", a.socket.display()));
    let dir = tooz_tests();
    let out = pytest(
        &["test_coordination.py", "-k", "lock"],
        &[("TOOZ_TEST_URL", &url)],
        &dir,
    );
    let s = summary(&out);
    assert!(s.contains("27 passed") && !s.contains("skipped"), "{s}");
}

#[test]
fn two_hosts_on_one_etcd_exclude_each_other_through_tooz() {
    let etcd = Etcd::start();
    let prefix = format!("/py{}/", std::process::id());
    let a = Agent::on_etcd("host-a", &etcd.endpoint(), &prefix, &[], &[]);
    let b = Agent::on_etcd("host-b", &etcd.endpoint(), &prefix, &[], &[]);
    let out = pytest(
        &[tests_dir().to_str().unwrap()],
        &[
            ("LEASEHOLD_SOCKET", &a.socket),
            ("LEASEHOLD_SOCKET_B", &b.socket),
        ],
        &tests_dir(),
    );
    assert!(
        !out.contains("SKIPPED"),
        "nothing may skip on two hosts:\n{out}"
    );
    let url = PathBuf::from(format!("leasehold://{}", a.socket.display()));
    let out = pytest(
        &["test_coordination.py", "-k", "lock"],
        &[("TOOZ_TEST_URL", &url)],
        &tooz_tests(),
    );
    let s = summary(&out);
    assert!(s.contains("27 passed") && !s.contains("skipped"), "{s}");
}
