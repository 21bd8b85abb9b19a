//! `leasehold bench --hosts`: the many-hosts table runs end to end on a real etcd (a smoke
//! test with small counts; the figures themselves are for `docs/performance.md`, never
//! asserted).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Output};

use leasehold_testkit::Etcd;

/// `leasehold bench` with `args`, run to its end.
fn bench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_leasehold"))
        .arg("bench")
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn the_many_hosts_table_has_a_row_per_count_with_etcds_figures() {
    let etcd = Etcd::start();
    let out = bench(&[
        "--etcd-endpoints",
        &etcd.endpoint(),
        "--hosts",
        "1,3",
        "--host-leases",
        "120",
        "--host-rounds",
        "10",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    for n in [
        "  1 hosts, 120 of 120 leases taken",
        "  3 hosts, 120 of 120 leases taken",
    ] {
        let row = stdout
            .lines()
            .find(|l| l.starts_with(n))
            .unwrap_or_else(|| panic!("no row {n:?} in:\n{stdout}\n{stderr}"));
        for part in [
            "acquire p50",
            "loaded",
            "agent RSS",
            "etcd CPU",
            "B per agent per lease",
        ] {
            assert!(row.contains(part), "{part:?} missing from {row:?}");
        }
    }
    // --json: one object, a figure per count.
    let out = bench(&[
        "--etcd-endpoints",
        &etcd.endpoint(),
        "--hosts",
        "2",
        "--host-leases",
        "60",
        "--host-rounds",
        "5",
        "--json",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let rows = v["figures"].as_array().unwrap();
    let row = rows
        .iter()
        .find(|r| r["measure"] == "many hosts")
        .unwrap_or_else(|| panic!("no many-hosts figure in {v}"));
    assert_eq!(row["hosts"], 2, "{row}");
    assert_eq!(row["leases_taken"], 60, "{row}");
    for k in ["acquire_ms", "agent_rss_mib", "etcd", "holders_fenced"] {
        assert!(!row[k].is_null(), "{k} missing: {row}");
    }
    // Bad counts change nothing and say why.
    let out = bench(&["--hosts", "2"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--hosts needs --etcd-endpoints"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
