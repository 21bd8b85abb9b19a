//! `leasehold bench --hosts N,N,... --etcd-endpoints URLS`: many agents on one etcd.
//!
//! For each N, starts N agents (each its own process and host id, under a key prefix of its
//! own) on the given etcd, and measures acquire latency with nothing held, the rate at which
//! the agents take `--host-leases` leases between them, acquire latency with those held, each
//! agent's RSS, and etcd's cost from its own `/metrics`: CPU seconds, database size and bytes
//! sent to clients (mostly the watch that every agent keeps on the whole prefix). Leases are
//! held for this process, so they end with it.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use leasehold_client::blocking::{Client, ErrorCode};
use leasehold_client::{AcquireOptions, ReleaseOptions};
use leasehold_core::Mode;
use serde_json::{Value, json};

use super::{
    BenchArgs, Killed, OwnAgent, backend_args, ms, name, pct, record, rss_kib, say, spawn_agent,
    wait_ready,
};
use crate::Failure;

/// Resources per acquire while filling: etcd allows 128 operations per transaction, and a
/// grant costs about four per resource.
const FILL_BATCH: usize = 25;

/// What etcd's `/metrics` say, summed over the members.
#[derive(Debug, Default, Clone, Copy)]
struct EtcdFigures {
    cpu_seconds: f64,
    db_bytes: f64,
    sent_bytes: f64,
}

impl EtcdFigures {
    /// Reads every member's `/metrics` (plain HTTP only; `None` for TLS endpoints or when a
    /// member does not answer).
    fn read(endpoints: &[String]) -> Option<EtcdFigures> {
        let mut f = EtcdFigures::default();
        for ep in endpoints {
            let text = metrics(ep)?;
            f.cpu_seconds += sum(&text, "process_cpu_seconds_total");
            f.db_bytes += sum(&text, "etcd_mvcc_db_total_size_in_bytes");
            f.sent_bytes += sum(&text, "etcd_network_client_grpc_sent_bytes_total");
        }
        Some(f)
    }
}

/// GET `/metrics` from `endpoint` (`http://HOST:PORT`).
fn metrics(endpoint: &str) -> Option<String> {
    let addr = endpoint.strip_prefix("http://")?.trim_end_matches('/');
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET /metrics HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    Some(body)
}

/// The sum of metric `name` over its label sets.
fn sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Whether `e` says etcd did not answer in time, or the agent's session ended because it did
/// not (refused: "this host's session has expired"; the bench's requests are otherwise always
/// valid): under an overloaded etcd that is a figure of the table, not the end of the bench.
fn overloaded(e: &leasehold_client::blocking::Error) -> bool {
    matches!(
        e.code(),
        Some(ErrorCode::BackendUnavailable | ErrorCode::Unavailable | ErrorCode::Refused)
    )
}

/// Acquire-then-release rounds spread over the agents, one at a time: the acquire latencies,
/// sorted, and how many rounds etcd did not answer in time.
fn latencies(
    sockets: &[PathBuf],
    tag: &str,
    rounds: usize,
) -> Result<(Vec<Duration>, usize), Failure> {
    let mut lat = Vec::with_capacity(rounds);
    let mut failed = 0;
    for i in 0..rounds {
        let c = Client::new(&sockets[i % sockets.len()]);
        let r = name(format!("bench/hosts/{tag}/{i}"))?;
        let t = Instant::now();
        match c.acquire(&AcquireOptions::new([(r.clone(), Mode::Exclusive)])) {
            Ok(_) => lat.push(t.elapsed()),
            Err(e) if overloaded(&e) => {
                failed += 1;
                continue;
            }
            Err(e) => return Err(e.into()),
        }
        c.release(std::slice::from_ref(&r), &ReleaseOptions::default())?;
    }
    if lat.is_empty() {
        return Err(Failure::error(format!(
            "none of {rounds} acquires was answered: etcd is too slow here"
        )));
    }
    lat.sort();
    Ok((lat, failed))
}

/// Times a batch is asked again when etcd does not answer in time (an overloaded etcd is a
/// figure of the table, not the end of the bench).
const FILL_RETRIES: usize = 20;

/// Every agent takes its share of `total` leases, in batches, all agents at once, each for
/// its holder process. Returns how long it took, how many batches were asked again
/// because etcd did not answer in time, and how many leases were taken.
fn fill(
    sockets: &[PathBuf],
    holders: &[Killed],
    total: usize,
) -> Result<(Duration, usize, usize), Failure> {
    let started = Instant::now();
    let n = sockets.len();
    let tasks: Vec<_> = sockets
        .iter()
        .zip(holders)
        .enumerate()
        .map(|(h, (socket, holder))| {
            let c = Client::new(socket);
            let pid = holder.0.id();
            let share: Vec<usize> = (h..total).step_by(n).collect();
            std::thread::spawn(move || {
                let (mut retried, mut taken) = (0, 0);
                for batch in share.chunks(FILL_BATCH) {
                    let items = batch
                        .iter()
                        .map(|i| Ok((name(format!("bench/hosts/held/{i}"))?, Mode::Exclusive)))
                        .collect::<Result<Vec<_>, Failure>>()?;
                    let mut o = AcquireOptions::new(items);
                    o.pid = Some(pid);
                    let mut tries = 0;
                    loop {
                        match c.acquire(&o) {
                            Ok(_) => {
                                taken += batch.len();
                                break;
                            }
                            Err(e) if tries < FILL_RETRIES && overloaded(&e) => {
                                tries += 1;
                                retried += 1;
                            }
                            // Its agent fenced the holder, or is about to (a session not
                            // renewed in time): this agent takes no more; the row counts the
                            // fenced holders.
                            Err(e) if !running(pid) || overloaded(&e) => {
                                return Ok((retried, taken));
                            }
                            Err(e) => return Err(e.into()),
                        }
                    }
                }
                Ok::<_, Failure>((retried, taken))
            })
        })
        .collect();
    let (mut retried, mut taken) = (0, 0);
    for t in tasks {
        let (r, n) = t
            .join()
            .map_err(|_| Failure::error("a bench client panicked"))??;
        retried += r;
        taken += n;
    }
    Ok((started.elapsed(), retried, taken))
}

/// Whether process `pid` is still running (not gone, not a zombie).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let state = s.rsplit_once(") ")?.1.chars().next()?;
            Some(state != 'Z' && state != 'X')
        })
        .unwrap_or(false)
}

/// One row: N agents, `leases` held between them.
fn one_size(a: &BenchArgs, eps: &[String], n: usize) -> Result<(), Failure> {
    let mut args = backend_args(a);
    if let Some(p) = args.iter().position(|v| v == "--etcd-prefix") {
        args[p + 1] = format!("/leasehold-bench-{}-hosts{n}/", std::process::id());
    }
    // Spawned here, on the thread that outlives them (they die with it), then awaited.
    let mut agents: Vec<(OwnAgent, PathBuf)> = Vec::with_capacity(n);
    let mut started = Vec::with_capacity(n);
    for i in 0..n {
        let (agent, socket, at) = spawn_agent(&format!("bench-n{n}-h{i}"), &args)?;
        started.push((socket.clone(), at));
        agents.push((agent, socket));
    }
    let mut slowest = Duration::ZERO;
    for (socket, at) in started {
        slowest = slowest.max(wait_ready(&socket, at)?);
    }
    let sockets: Vec<PathBuf> = agents.iter().map(|(_, s)| s.clone()).collect();
    let before = EtcdFigures::read(eps);
    let (empty, failed_empty) = latencies(&sockets, "empty", a.host_rounds)?;
    // The leases are held by one process per agent, not by the bench: an agent that cannot
    // renew its session in time kills its holders (G3), and the table says so.
    let mut holders = Vec::with_capacity(n);
    for _ in 0..n {
        let child = Command::new("sleep")
            .arg("infinity")
            .spawn()
            .map_err(|e| Failure::error(format!("starting a holder process: {e}")))?;
        holders.push(Killed(child));
    }
    let (took, retried, taken) = fill(&sockets, &holders, a.host_leases)?;
    let (loaded, failed_loaded) = latencies(&sockets, "loaded", a.host_rounds)?;
    let after = EtcdFigures::read(eps);
    let fenced = holders
        .iter_mut()
        .map(|h| h.0.try_wait())
        .filter(|alive| !matches!(alive, Ok(None)))
        .count();
    let rss: Vec<u64> = agents.iter().map(|(o, _)| rss_kib(o.child.id())).collect();
    let rss_mean = rss.iter().sum::<u64>() as f64 / rss.len().max(1) as f64 / 1024.0;
    let rss_max = rss.iter().max().copied().unwrap_or(0) as f64 / 1024.0;
    let etcd = match (before, after) {
        (Some(b), Some(f)) => format!(
            "etcd CPU {:.1} s, db {:.1} MiB, sent {:.1} MiB ({:.0} B per agent per lease)",
            f.cpu_seconds - b.cpu_seconds,
            f.db_bytes / 1048576.0,
            (f.sent_bytes - b.sent_bytes) / 1048576.0,
            (f.sent_bytes - b.sent_bytes) / (n * taken.max(1)) as f64,
        ),
        _ => "etcd figures: n/a (its /metrics is not plain HTTP here)".into(),
    };
    let etcd_json = match (before, after) {
        (Some(b), Some(f)) => json!({
            "cpu_seconds": f.cpu_seconds - b.cpu_seconds,
            "db_bytes": f.db_bytes,
            "sent_bytes": f.sent_bytes - b.sent_bytes,
        }),
        _ => Value::Null,
    };
    let secs = |d: Duration| d.as_secs_f64() * 1e3;
    record(json!({
        "measure": "many hosts", "hosts": n, "leases_asked": a.host_leases, "leases_taken": taken,
        "acquire_ms": {
            "empty": {"p50": secs(pct(&empty, 0.5)), "p99": secs(pct(&empty, 0.99))},
            "held": {"p50": secs(pct(&loaded, 0.5)), "p99": secs(pct(&loaded, 0.99))},
        },
        "rounds_not_answered": failed_empty + failed_loaded, "rounds": 2 * a.host_rounds,
        "fill_per_second": taken as f64 / took.as_secs_f64(), "fill_batches_asked_again": retried,
        "agent_rss_mib": {"mean": rss_mean, "max": rss_max},
        "holders_fenced": fenced, "slowest_start_ms": secs(slowest), "etcd": etcd_json,
    }));
    say(format!(
        "{n:>3} hosts, {taken} of {} leases taken: acquire p50 {} p99 {} empty, p50 {} p99 {} loaded ({} of {} rounds not answered in time) | fill {:.0} leases/s ({retried} batches of {FILL_BATCH} asked again: etcd too slow) | agent RSS mean {:.1} max {:.1} MiB | holders fenced {fenced} of {n} | slowest start {} | {etcd}",
        a.host_leases,
        ms(pct(&empty, 0.5)),
        ms(pct(&empty, 0.99)),
        ms(pct(&loaded, 0.5)),
        ms(pct(&loaded, 0.99)),
        failed_empty + failed_loaded,
        2 * a.host_rounds,
        taken as f64 / took.as_secs_f64(),
        rss_mean,
        rss_max,
        ms(slowest),
    ))?;
    Ok(())
}

/// The many-hosts table: one row per count in `--hosts`.
pub(super) fn many_hosts(a: &BenchArgs) -> Result<(), Failure> {
    let Some(eps) = &a.etcd_endpoints else {
        return Err(Failure::usage("--hosts needs --etcd-endpoints"));
    };
    for &n in &a.hosts {
        if n == 0 {
            return Err(Failure::usage("--hosts counts start at 1"));
        }
        one_size(a, eps, n)?;
    }
    Ok(())
}
