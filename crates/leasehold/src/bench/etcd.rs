//! The etcd rows of `leasehold bench`: acquire latency beside a raw etcd transaction, and
//! host death to a grant elsewhere.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use leasehold_client::blocking::Client;
use leasehold_client::{AcquireOptions, ReleaseOptions};
use leasehold_core::Mode;
use leasehold_store::etcd::reference::{GRANT_RECORD_BYTES, RawEtcd};

use super::{BenchArgs, Row, backend_args, emit, ms, name, pct, start_agent};
use crate::Failure;

pub(super) fn raw_client(eps: &[String]) -> Result<RawEtcd, Failure> {
    RawEtcd::connect(
        eps,
        &format!("/leasehold-bench-raw-{}/", std::process::id()),
    )
    .map_err(|e| Failure::error(e.to_string()))
}

/// Acquire latency through the agent, beside a raw etcd create-if-absent transaction,
/// alternating, one at a time. Ours is measured on a kept-alive connection to the agent, as
/// the raw client's to etcd is kept; one call on one new connection (as the CLI makes it) is
/// measured in the same rounds and printed beside.
pub(super) async fn acquire_vs_raw(
    socket: &Path,
    eps: &[String],
    rounds: usize,
) -> Result<(), Failure> {
    let etcd = raw_client(eps)?;
    let c = Client::new(socket);
    let mut kept = c.keep_alive();
    let r = name("bench/latency".into())?;
    let o = AcquireOptions::new([(r.clone(), Mode::Exclusive)]);
    let mut shaped = etcd
        .grant_shaped()
        .await
        .map_err(|e| Failure::error(e.to_string()))?;
    let (mut ours, mut oneshot, mut raw) = (Vec::new(), Vec::new(), Vec::new());
    let mut grant = Vec::new();
    for _ in 0..rounds {
        let t = Instant::now();
        kept.acquire(&o)?;
        ours.push(t.elapsed());
        kept.release(std::slice::from_ref(&r), &ReleaseOptions::default())?;
        let t = Instant::now();
        c.acquire(&o)?;
        oneshot.push(t.elapsed());
        c.release(std::slice::from_ref(&r), &ReleaseOptions::default())?;
        raw.push(
            etcd.create_if_absent()
                .await
                .map_err(|e| Failure::error(e.to_string()))?,
        );
        grant.push(
            shaped
                .once()
                .await
                .map_err(|e| Failure::error(e.to_string()))?,
        );
    }
    etcd.clean()
        .await
        .map_err(|e| Failure::error(e.to_string()))?;
    ours.sort();
    oneshot.sort();
    raw.sort();
    grant.sort();
    let (p50, p99) = (pct(&ours, 0.5), pct(&ours, 0.99));
    let (r50, r99) = (pct(&raw, 0.5), pct(&raw, 0.99));
    let o50 = pct(&oneshot, 0.5);
    let g50 = pct(&grant, 0.5);
    let ratio = p50.as_secs_f64() / r50.as_secs_f64();
    emit(Row {
        measure: "acquire p50 through the agent on etcd",
        ours: p50.as_secs_f64() * 1e3,
        unit: "ms",
        reference: Some(("raw etcd create-if-absent txn p50", r50.as_secs_f64() * 1e3)),
        target: "<= 1.2x",
        met: Some(ratio <= 1.2),
        extra: format!(
            "p99 {} vs {} ({:.2}x), {rounds} rounds alternating, on a kept-alive connection \
             (as the raw client's); one call on a new connection each (as the CLI): p50 {} ({:.2}x); \
             a raw txn of the grant's shape (3 compares, 2 puts, {GRANT_RECORD_BYTES} B): p50 {} ({:.2}x)",
            ms(p99),
            ms(r99),
            p99.as_secs_f64() / r99.as_secs_f64(),
            ms(o50),
            o50.as_secs_f64() / r50.as_secs_f64(),
            ms(g50),
            g50.as_secs_f64() / r50.as_secs_f64()
        ),
    })
}

/// Host death to grant elsewhere: host A holds a disk for a process; A's agent and the
/// process are killed at once (the host died); host B waits for the disk.
pub(super) fn failover(a: &BenchArgs) -> Result<(), Failure> {
    let args = backend_args(a);
    let (mut agent_a, sock_a, _) = start_agent("bench-host-a", &args)?;
    let (_agent_b, sock_b, _) = start_agent("bench-host-b", &args)?;
    let mut holder = Command::new("sleep")
        .arg("3600")
        .spawn()
        .map_err(|e| Failure::error(e.to_string()))?;
    let r = name("bench/failover-disk".into())?;
    let mut o = AcquireOptions::new([(r.clone(), Mode::Exclusive)]);
    o.pid = Some(holder.id());
    Client::new(&sock_a).acquire(&o)?;
    let died = Instant::now();
    let _ = agent_a.child.kill();
    let _ = holder.kill();
    let _ = holder.wait();
    let mut o = AcquireOptions::new([(r, Mode::Exclusive)]);
    o.accept_dirty = true;
    o.wait = Some(Duration::MAX);
    Client::new(&sock_b).acquire(&o)?;
    // What etcd enforces: the session and the grace are leases of whole seconds, each
    // expired on etcd's 0.5 s tick, so the disk is free between ttl + grace and 1 s later.
    let ttl = humantime::parse_duration(&a.ttl).unwrap_or_default();
    let grace = match &a.grace {
        Some(g) => humantime::parse_duration(g).unwrap_or_default(),
        None => leasehold_store::etcd::etcd_default_grace(ttl),
    };
    let floor = (ttl + grace).as_secs_f64();
    let took = died.elapsed().as_secs_f64();
    emit(Row {
        measure: "host death -> its disk granted on another host",
        ours: took * 1e3,
        unit: "ms",
        reference: Some(("ttl + grace", floor * 1e3)),
        target: "ttl + grace + detection (etcd expires leases on a 0.5 s tick: up to 1 s more); sanlock 140 s",
        met: Some(took <= floor + 1.0 + 0.5),
        extra: format!(
            "ttl {}, grace {}",
            humantime::format_duration(ttl),
            humantime::format_duration(grace)
        ),
    })
}
