//! The agent on a real etcd that serves clients over TLS only, checks client certificates and
//! has authentication enabled, configured as an operator would: certificates and the user in
//! the config file, the password in a file of its own. Settings etcd refuses stop the agent at
//! start (exit 2) saying what to change, instead of being retried as an etcd not yet up.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::*;
use leasehold_testkit::{Etcd, TestCerts};

/// The prefix the etcd user's role covers.
fn prefix() -> String {
    format!("/lh-tls-{}/", std::process::id())
}

fn secured() -> (TestCerts, Etcd) {
    let certs = TestCerts::generate("leasehold");
    let etcd = Etcd::start_tls(&certs, &[]);
    etcd.enable_auth("root-pw", "leasehold", "lh-pw", &prefix());
    (certs, etcd)
}

/// Writes the password `pw` into a file of mode `mode` under `dir`.
fn password_file(dir: &Path, pw: &str, mode: u32) -> PathBuf {
    let p = dir.join(format!("password-{mode:o}"));
    std::fs::write(&p, format!("{pw}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    p
}

#[test]
fn the_agent_takes_and_ends_leases_over_tls_as_a_user_limited_to_its_prefix() {
    let (certs, etcd) = secured();
    let dir = tempfile::tempdir().unwrap();
    let pw = password_file(dir.path(), "lh-pw", 0o600);
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "etcd-cacert = {:?}\netcd-cert = {:?}\netcd-key = {:?}\netcd-user = \"leasehold\"\n\
             etcd-password-file = {:?}\n",
            certs.ca(),
            certs.client_cert(),
            certs.client_key(),
            pw,
        ),
    )
    .unwrap();
    let a = Agent::on_etcd(
        "host-a",
        &etcd.endpoint(),
        &prefix(),
        &["--config", config.to_str().unwrap()],
        &[],
    );
    let h = Holder::new();
    let out = a.lh(&["acquire", "disk", "--pid", &h.pid_arg()]);
    expect_code(&out, 0);
    let token: u64 = text(&out.stdout).trim().parse().unwrap();
    assert_eq!(a.holders("disk"), vec![u64::from(h.pid())]);
    expect_code(&a.lh(&["validate", "disk", &token.to_string()]), 0);
    // The lease is in etcd, under the prefix, as etcd's root sees it.
    let keys = etcd.etcdctl(&["get", "--prefix", &prefix(), "--keys-only"]);
    assert!(
        text(&keys.stdout).contains("/res/disk"),
        "{}",
        text(&keys.stdout)
    );
    expect_code(&a.lh(&["release", "disk", "--pid", &h.pid_arg()]), 0);
    assert!(a.holders("disk").is_empty());
    expect_code(&a.lh(&["validate", "disk", &token.to_string()]), 1);
    // The password is not in the agent's log.
    assert!(!a.log().contains("lh-pw"), "{}", a.log());
}

/// Starts an agent that must refuse to start: returns its stderr once it has exited 2.
fn refused_at_start(endpoint: &str, extra: &[&str]) -> String {
    let a = Agent::on_etcd_unstarted("host-a", endpoint, &prefix(), extra, &[]);
    let mut child = a
        .command()
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut status = None;
    wait_until("the agent gives up", Duration::from_secs(10), || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert_eq!(status.unwrap().code(), Some(2), "{err}");
    err
}

#[test]
fn settings_etcd_refuses_stop_the_agent_at_start_saying_what_to_change() {
    let (certs, etcd) = secured();
    let dir = tempfile::tempdir().unwrap();
    let good_pw = password_file(dir.path(), "lh-pw", 0o600);
    let bad_pw = dir.path().join("bad-pw");
    std::fs::write(&bad_pw, "not-it\n").unwrap();
    std::fs::set_permissions(&bad_pw, std::fs::Permissions::from_mode(0o600)).unwrap();
    let open_pw = password_file(dir.path(), "lh-pw", 0o644);
    let other = TestCerts::generate("leasehold");
    let (ca, cert, key) = (certs.ca(), certs.client_cert(), certs.client_key());
    let tls = |ca: &Path| -> Vec<String> {
        vec![
            format!("--etcd-cacert={}", ca.display()),
            format!("--etcd-cert={}", cert.display()),
            format!("--etcd-key={}", key.display()),
            "--etcd-user=leasehold".into(),
        ]
    };
    let with = |mut v: Vec<String>, more: &str| {
        v.push(more.to_owned());
        v
    };
    let https = etcd.endpoint();
    let http = https.replace("https://", "http://");
    let cases: Vec<(&str, &str, Vec<String>, &str)> = vec![
        (
            "a wrong password",
            &https,
            with(
                tls(&ca),
                &format!("--etcd-password-file={}", bad_pw.display()),
            ),
            "invalid user ID or password",
        ),
        (
            "a CA that did not sign etcd's certificate",
            &https,
            with(
                tls(&other.ca()),
                &format!("--etcd-password-file={}", good_pw.display()),
            ),
            "set etcd-cacert",
        ),
        (
            "plaintext to etcd's TLS port",
            &http,
            vec![
                "--etcd-user=leasehold".into(),
                format!("--etcd-password-file={}", good_pw.display()),
            ],
            "use https://",
        ),
        (
            "TLS files with an http:// endpoint",
            &http,
            with(
                tls(&ca),
                &format!("--etcd-password-file={}", good_pw.display()),
            ),
            "use https://",
        ),
        (
            "a password file others may read",
            &https,
            with(
                tls(&ca),
                &format!("--etcd-password-file={}", open_pw.display()),
            ),
            "chmod 600",
        ),
    ];
    for (what, endpoint, args, says) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let err = refused_at_start(endpoint, &args);
        assert!(err.contains(says), "{what}: does not say {says:?}:\n{err}");
        assert!(
            !err.contains("not reachable yet"),
            "{what}: taken for an etcd not up:\n{err}"
        );
        assert!(
            !err.contains("lh-pw") && !err.contains("not-it"),
            "{what}: shows the password:\n{err}"
        );
    }
}
