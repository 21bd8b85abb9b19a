//! The blocking client builds without an async runtime: `leasehold-client = {
//! default-features = false }` pulls neither tokio nor hyper (nor gRPC), so it can go into a
//! C-ABI plugin or a forked child. Checked on the dependency graph cargo resolves.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

/// The crates of `cargo tree -e normal -p leasehold-client` with `flags`, one name a line.
fn tree(flags: &[&str]) -> Vec<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "tree",
            "-e",
            "normal",
            "-p",
            "leasehold-client",
            "--prefix",
            "none",
        ])
        .args(["--offline", "--locked"])
        .args(flags)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("running cargo tree");
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

#[test]
fn without_default_features_the_client_pulls_no_tokio_or_hyper() {
    let runtime = [
        "tokio",
        "hyper",
        "hyper-util",
        "h2",
        "tonic",
        "tower",
        "mio",
    ];
    let lean = tree(&["--no-default-features"]);
    assert!(lean.iter().any(|c| c == "leasehold-api"), "{lean:?}");
    for c in runtime {
        assert!(!lean.iter().any(|x| x == c), "{c} is pulled in: {lean:?}");
    }
    // The check can fail: with the default `async` feature, tokio is there.
    let full = tree(&[]);
    assert!(full.iter().any(|c| c == "tokio"), "{full:?}");
}
