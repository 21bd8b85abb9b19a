//! `leasehold bench`, short, as a smoke test (no timed assertions: figures are the bench's to
//! print, never a test's to judge), and the split into the lean `leasehold` and the whole
//! `leasehold-agent` that `leasehold agent` and `leasehold bench` execute.

mod common;

use std::process::Command;

use common::{Agent, bin, text};

/// Every row of issue 15's table that one host can show comes out of `--json` beside its
/// reference, with the ratio and the target.
#[test]
fn bench_json_has_every_row_beside_its_reference() {
    let out = Command::new(bin())
        .args([
            "bench",
            "--json",
            "--seconds",
            "0.2",
            "--clients",
            "1,64",
            "--runs",
            "3",
            "--exits",
            "2",
            "--leases",
            "200",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "bench failed: {}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not one JSON document ({e}): {}", text(&out.stdout)));
    let figures = v["figures"].as_array().expect("figures");
    let find = |prefix: &str| {
        figures
            .iter()
            .find(|f| f["measure"].as_str().is_some_and(|m| m.starts_with(prefix)))
            .unwrap_or_else(|| panic!("no figure {prefix:?} in {v}"))
    };
    for (measure, reference) in [
        (
            "leasehold run --exclusive R -- true",
            "flock FILE true, mean",
        ),
        (
            "acquire+release/s through the agent, local store, durable, 64 clients",
            "the store alone",
        ),
        (
            "acquire+release/s through the agent, local store, durable, 1 clients",
            "the store alone",
        ),
    ] {
        let f = find(measure);
        assert_eq!(f["reference"], reference, "{f}");
        let (ours, theirs) = (
            f["value"].as_f64().unwrap(),
            f["reference_value"].as_f64().unwrap(),
        );
        assert!(ours > 0.0 && theirs > 0.0, "{f}");
        let ratio = f["ratio"].as_f64().unwrap();
        assert!((ratio - ours / theirs).abs() < 1e-9, "{f}");
        assert!(f["target"].as_str().is_some_and(|t| !t.is_empty()), "{f}");
    }
    assert!(find("leasehold run")["met"].is_boolean());
    assert!(
        find("acquire+release/s through the agent, local store, durable, 64")["met"].is_boolean()
    );
    let rss = find("agent RSS with 200 leases");
    assert!(rss["value"].as_f64().unwrap() > 0.0, "{rss}");
    assert!(find("bytes per lease")["value"].as_f64().is_some());
    assert!(
        find("holder exit -> lease released")["value"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    assert!(find("agent start to ready")["value"].as_f64().unwrap() > 0.0);
    assert!(find("load average at start")["value"].is_string());
}

/// `leasehold agent` continues in `leasehold-agent` (same process), and `leasehold` itself
/// is lean: it links none of the agent.
#[test]
fn the_agent_runs_from_the_whole_binary_and_leasehold_is_lean() {
    let agent = Agent::start();
    let exe = std::fs::read_link(format!("/proc/{}/exe", agent.pid())).unwrap();
    assert_eq!(
        exe.file_name().unwrap(),
        "leasehold-agent",
        "the agent runs as {exe:?}"
    );
    let status = agent.lh(&["status", "--json"]);
    assert!(status.status.success(), "{}", text(&status.stderr));
    let full = std::path::Path::new(bin()).with_file_name("leasehold-agent");
    // What each loads (its code and data), not its file: a release build's line tables
    // make both files tens of MB, of which the lean one's is most (72.7 and 87.4 MB).
    let (lean, whole) = (loaded_bytes(bin()), loaded_bytes(&full));
    assert!(
        lean * 2 < whole,
        "leasehold loads {lean} bytes, leasehold-agent {whole}: the lean binary links the agent"
    );
}

/// The bytes an ELF executable (64-bit, little-endian) loads: the sum of its `PT_LOAD`
/// segments' sizes in memory. Debug information is in no loaded segment.
#[allow(clippy::unwrap_used)]
fn loaded_bytes(path: impl AsRef<std::path::Path>) -> u64 {
    let path = path.as_ref();
    let elf = std::fs::read(path).unwrap();
    assert!(
        elf.starts_with(b"\x7fELF\x02\x01"),
        "{path:?} is no 64-bit little-endian ELF file"
    );
    let u16_at = |at: usize| u64::from(u16::from_le_bytes(elf[at..at + 2].try_into().unwrap()));
    let u32_at = |at: usize| u32::from_le_bytes(elf[at..at + 4].try_into().unwrap());
    let u64_at = |at: usize| u64::from_le_bytes(elf[at..at + 8].try_into().unwrap());
    // e_phoff, e_phentsize, e_phnum; in each header p_type, p_memsz.
    let (phoff, phentsize, phnum) = (u64_at(0x20), u16_at(0x36), u16_at(0x38));
    const PT_LOAD: u32 = 1;
    let loaded: u64 = (0..phnum)
        .map(|i| (phoff + i * phentsize) as usize)
        .filter(|&h| u32_at(h) == PT_LOAD)
        .map(|h| u64_at(h + 0x28))
        .sum();
    assert!(loaded > 0, "{path:?} loads nothing");
    loaded
}

/// On etcd, the rows of the etcd targets come out beside their raw-etcd references: acquire
/// beside a create-if-absent transaction, 64 clients beside raw put-then-delete cycles, and
/// the failover figure.
#[test]
fn bench_on_etcd_has_its_rows_beside_raw_etcd() {
    let etcd = leasehold_testkit::Etcd::start();
    let out = Command::new(bin())
        .args([
            "bench",
            "--json",
            "--etcd-endpoints",
            &etcd.endpoint(),
            "--seconds",
            "0.2",
            "--clients",
            "64",
            "--runs",
            "0",
            "--exits",
            "0",
            "--leases",
            "0",
            "--raw-rounds",
            "5",
            "--ttl",
            "2s",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "bench failed: {}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not one JSON document ({e}): {}", text(&out.stdout)));
    let figures = v["figures"].as_array().expect("figures");
    for (measure, reference) in [
        (
            "acquire p50 through the agent on etcd",
            "raw etcd create-if-absent txn p50",
        ),
        (
            "acquire+release/s through the agent on etcd, 64 clients",
            "raw etcd put-then-delete",
        ),
        (
            "host death -> its disk granted on another host",
            "ttl + grace",
        ),
    ] {
        let f = figures
            .iter()
            .find(|f| f["measure"] == measure)
            .unwrap_or_else(|| panic!("no figure {measure:?} in {v}"));
        assert_eq!(f["reference"], reference, "{f}");
        assert!(f["value"].as_f64().unwrap() > 0.0, "{f}");
        assert!(f["reference_value"].as_f64().unwrap() > 0.0, "{f}");
        assert!(f["met"].is_boolean(), "{f}");
    }
}
