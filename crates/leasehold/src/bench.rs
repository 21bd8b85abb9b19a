//! `leasehold bench`: the figures of SPEC §7 that one host can show, measured through a real
//! agent and printed beside their references.
//!
//! By default the bench starts its own agent in a temporary directory (so it measures start
//! to ready and disturbs nothing); `--external` uses the agent at `--socket` instead.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::Args;
use leasehold_client::blocking::Client;
use leasehold_client::{AcquireOptions, ReleaseOptions};
use leasehold_core::{Mode, ResourceName};

use leasehold_store::etcd::reference::RawEtcd;

use crate::{Failure, connect};

mod hosts;

/// Flags of `leasehold bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Use the agent at --socket / $LEASEHOLD_SOCKET instead of starting one.
    #[arg(long)]
    external: bool,
    /// Seconds per throughput phase.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Client counts for the throughput phases, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,64")]
    clients: Vec<usize>,
    /// Rounds of `run -- true` against `flock FILE true`, alternating.
    #[arg(long, default_value_t = 200)]
    runs: usize,
    /// Holder processes killed to time the release of their leases.
    #[arg(long, default_value_t = 200)]
    exits: usize,
    /// Leases held at once by one process, to report the agent's memory (0: skip).
    #[arg(long, default_value_t = 100_000)]
    leases: usize,
    /// Run the bench's agents on this etcd (comma-separated client URLs), under a fresh key
    /// prefix, and add the etcd figures: acquire latency beside a raw etcd transaction,
    /// throughput beside raw put-then-delete cycles, and host death to grant elsewhere.
    #[arg(long, value_delimiter = ',')]
    etcd_endpoints: Option<Vec<String>>,
    /// Session ttl of the bench's etcd agents (the failover figure waits ttl + grace).
    #[arg(long, default_value = "10s")]
    ttl: String,
    /// Grace of the bench's etcd agents [default: ttl/2]
    #[arg(long)]
    grace: Option<String>,
    /// Rounds of acquire against a raw etcd transaction, alternating.
    #[arg(long, default_value_t = 500)]
    raw_rounds: usize,
    /// Instead of the rest, the many-hosts table (needs --etcd-endpoints): for each count,
    /// that many agents, each its own process and host id, on the etcd.
    #[arg(long, value_delimiter = ',')]
    hosts: Vec<usize>,
    /// Leases the --hosts agents take between them, held while measuring.
    #[arg(long, default_value_t = 10_000)]
    host_leases: usize,
    /// Acquire rounds of the --hosts table, before and after taking the leases.
    #[arg(long, default_value_t = 200)]
    host_rounds: usize,
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

fn name(s: String) -> Result<ResourceName, Failure> {
    ResourceName::new(s).map_err(|e| Failure::error(e.to_string()))
}

/// An agent the bench started; killed when dropped.
struct OwnAgent {
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Drop for OwnAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A process the bench started; killed when dropped.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn exe() -> Result<PathBuf, Failure> {
    std::env::current_exe().map_err(|e| Failure::error(format!("finding this binary: {e}")))
}

/// The flags that put a bench agent on etcd, if the bench runs on etcd.
fn backend_args(a: &BenchArgs) -> Vec<String> {
    let Some(eps) = &a.etcd_endpoints else {
        return Vec::new();
    };
    let mut v = vec![
        "--backend".to_owned(),
        "etcd".into(),
        "--etcd-endpoints".into(),
        eps.join(","),
        "--etcd-prefix".into(),
        format!("/leasehold-bench-{}/", std::process::id()),
        "--ttl".into(),
        a.ttl.clone(),
    ];
    if let Some(g) = &a.grace {
        v.extend(["--grace".into(), g.clone()]);
    }
    v
}

fn start_agent(host: &str, args: &[String]) -> Result<(OwnAgent, PathBuf, Duration), Failure> {
    let dir = tempfile::tempdir().map_err(|e| Failure::error(e.to_string()))?;
    let socket = dir.path().join("agent.sock");
    let started = Instant::now();
    let child = Command::new(exe()?)
        .arg("agent")
        .arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--host-id")
        .arg(host)
        .args(args)
        .env("LEASEHOLD_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| Failure::error(format!("starting an agent: {e}")))?;
    let agent = OwnAgent { child, _dir: dir };
    loop {
        if Client::new(&socket).status().is_ok() {
            break;
        }
        if started.elapsed() > Duration::from_secs(30) {
            return Err(Failure::error("the bench's agent did not answer in 30 s"));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok((agent, socket, started.elapsed()))
}

/// `leasehold bench`. The client side is the blocking client, one thread per client; a
/// runtime drives the async parts (the gRPC client, raw etcd).
pub fn bench(a: BenchArgs, socket: &Option<PathBuf>) -> Result<u8, Failure> {
    if !a.hosts.is_empty() {
        hosts::many_hosts(&a)?;
        return Ok(0);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::error(format!("starting the runtime: {e}")))?;
    let (_own, socket) = if a.external {
        let c = connect(socket)?;
        (None, c.socket().to_path_buf())
    } else {
        let (agent, socket, ready) = start_agent("bench", &backend_args(&a))?;
        out!(
            "agent start to ready (empty state): {}   [SPEC target <= 1 s; sanlock joins a lockspace in 5-21 s]",
            ms(ready)
        );
        (Some(agent), socket)
    };
    let status = Client::new(&socket).status()?;
    out!(
        "agent pid {} on host {}, backend {}, socket {}",
        status.pid,
        status.host,
        status.backend,
        socket.display()
    );
    for n in &a.clients {
        throughput(&socket, *n, a.seconds)?;
    }
    if a.exits > 0 {
        exit_to_release(&socket, a.exits)?;
    }
    if a.runs > 0 {
        one_shot(&socket, a.runs)?;
        run_vs_flock(&socket, a.runs)?;
    }
    if let Some(eps) = &a.etcd_endpoints {
        rt.block_on(acquire_vs_raw(&socket, eps, a.raw_rounds))?;
        rt.block_on(raw_throughput(eps, 64, a.seconds))?;
    }
    if a.leases > 0 {
        many_leases(&socket, a.leases, status.pid as u32)?;
    }
    if a.etcd_endpoints.is_some() {
        failover(&a)?;
    }
    Ok(0)
}

fn raw_client(eps: &[String]) -> Result<RawEtcd, Failure> {
    RawEtcd::connect(
        eps,
        &format!("/leasehold-bench-raw-{}/", std::process::id()),
    )
    .map_err(|e| Failure::error(e.to_string()))
}

/// Acquire latency through the agent, beside a raw etcd create-if-absent transaction,
/// alternating, one at a time.
async fn acquire_vs_raw(socket: &Path, eps: &[String], rounds: usize) -> Result<(), Failure> {
    let etcd = raw_client(eps)?;
    let c = Client::new(socket);
    let r = name("bench/latency".into())?;
    let (mut ours, mut raw) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let t = Instant::now();
        c.acquire(&AcquireOptions::new([(r.clone(), Mode::Exclusive)]))?;
        ours.push(t.elapsed());
        c.release(std::slice::from_ref(&r), &ReleaseOptions::default())?;
        raw.push(
            etcd.create_if_absent()
                .await
                .map_err(|e| Failure::error(e.to_string()))?,
        );
    }
    ours.sort();
    raw.sort();
    out!(
        "acquire through the agent on etcd: p50 {} p99 {} | raw etcd create-if-absent txn: p50 {} p99 {} | ratio p50 {:.2}x p99 {:.2}x   [SPEC target <= 1.2x]",
        ms(pct(&ours, 0.5)),
        ms(pct(&ours, 0.99)),
        ms(pct(&raw, 0.5)),
        ms(pct(&raw, 0.99)),
        pct(&ours, 0.5).as_secs_f64() / pct(&raw, 0.5).as_secs_f64(),
        pct(&ours, 0.99).as_secs_f64() / pct(&raw, 0.99).as_secs_f64(),
    );
    Ok(())
}

/// Raw put-then-delete cycles on etcd by `clients` concurrent tasks: the reference for
/// acquire+release throughput.
async fn raw_throughput(eps: &[String], clients: usize, seconds: f64) -> Result<(), Failure> {
    let etcd = raw_client(eps)?;
    let (total, took) = etcd
        .put_delete_cycles(clients, Duration::from_secs_f64(seconds))
        .await
        .map_err(|e| Failure::error(e.to_string()))?;
    out!(
        "{clients:>3} clients, raw etcd put-then-delete: {:>7.0} cycles/s   [reference for acquire+release throughput; SPEC target >= 0.8x]",
        total as f64 / took.as_secs_f64()
    );
    Ok(())
}

/// Host death to grant elsewhere: host A holds a disk for a process; A's agent and the
/// process are killed at once (the host died); host B waits for the disk.
fn failover(a: &BenchArgs) -> Result<(), Failure> {
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
    out!(
        "host death -> its disk granted on another host: {:.2} s (ttl {} + grace {}; expected {floor:.1}-{:.1} s: etcd expires each lease on a 0.5 s tick)   [SPEC target ttl + grace + detection; sanlock 140 s]",
        died.elapsed().as_secs_f64(),
        humantime::format_duration(ttl),
        humantime::format_duration(grace),
        floor + 1.0,
    );
    Ok(())
}

/// Acquire+release cycles by `clients` concurrent clients (threads, one call one
/// connection, as the CLI), each on its own resource.
fn throughput(socket: &Path, clients: usize, seconds: f64) -> Result<(), Failure> {
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let mut tasks = Vec::new();
    for i in 0..clients {
        let c = Client::new(socket);
        let r = name(format!("bench/{clients}/{i}"))?;
        tasks.push(std::thread::spawn(move || {
            let mut acq = Vec::new();
            let mut rel = Vec::new();
            while Instant::now() < deadline {
                let t = Instant::now();
                c.acquire(&AcquireOptions::new([(r.clone(), Mode::Exclusive)]))?;
                let t2 = Instant::now();
                c.release(std::slice::from_ref(&r), &ReleaseOptions::default())?;
                acq.push(t2 - t);
                rel.push(t2.elapsed());
            }
            Ok::<_, leasehold_client::blocking::Error>((acq, rel))
        }));
    }
    let started = Instant::now();
    let (mut acq, mut rel) = (Vec::new(), Vec::new());
    for t in tasks {
        let (a, r) = t
            .join()
            .map_err(|_| Failure::error("a bench client panicked"))??;
        acq.extend(a);
        rel.extend(r);
    }
    let secs = started.elapsed().as_secs_f64();
    acq.sort();
    rel.sort();
    out!(
        "{clients:>3} clients, durable: {:>7.0} acquire+release/s | acquire p50 {} p99 {} | release p50 {} p99 {}",
        acq.len() as f64 / secs,
        ms(pct(&acq, 0.5)),
        ms(pct(&acq, 0.99)),
        ms(pct(&rel, 0.5)),
        ms(pct(&rel, 0.99)),
    );
    Ok(())
}

/// A process's resident memory in KiB (0 when it cannot be read).
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// Time from SIGKILL of a holder to the agent's event saying its lease ended.
fn exit_to_release(socket: &Path, rounds: usize) -> Result<(), Failure> {
    let c = Client::new(socket);
    let mut watch = c.watch(None)?;
    let mut lat = Vec::with_capacity(rounds);
    for i in 0..rounds {
        let mut holder = Command::new("sleep")
            .arg("3600")
            .spawn()
            .map_err(|e| Failure::error(format!("starting a holder: {e}")))?;
        let r = name(format!("bench/exit/{i}"))?;
        let mut o = AcquireOptions::new([(r.clone(), Mode::Shared)]);
        o.pid = Some(holder.id());
        c.acquire(&o)?;
        let killed = Instant::now();
        let _ = holder.kill();
        loop {
            let e = watch
                .next()
                .ok_or_else(|| Failure::error("the event stream ended"))??;
            if e.kind == "process-died" && e.resource.as_deref() == Some(r.as_str()) {
                lat.push(killed.elapsed());
                break;
            }
        }
        let _ = holder.wait();
    }
    lat.sort();
    out!(
        "holder exit -> lease released ({rounds} kills): p50 {} p99 {} max {}   [SPEC target p99 <= 100 ms]",
        ms(pct(&lat, 0.5)),
        ms(pct(&lat, 0.99)),
        ms(pct(&lat, 1.0))
    );
    Ok(())
}

/// One acquire and its release as a one-shot client makes them (connect, ask, close), over
/// HTTP/1.1 with the blocking client, as the CLI does.
fn one_shot(socket: &Path, rounds: usize) -> Result<(), Failure> {
    let holder = Command::new("sleep")
        .arg("3600")
        .spawn()
        .map_err(|e| Failure::error(format!("starting a holder: {e}")))?;
    let holder = Killed(holder);
    let pid = holder.0.id();
    let r = name("bench/one-shot".into())?;
    let o = AcquireOptions {
        pid: Some(pid),
        ..AcquireOptions::new([(r.clone(), Mode::Exclusive)])
    };
    let ro = ReleaseOptions {
        pid: Some(pid),
        ..Default::default()
    };
    let c = Client::new(socket);
    let (mut acq, mut rel) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let t = Instant::now();
        c.acquire(&o)?;
        let t2 = Instant::now();
        c.release(std::slice::from_ref(&r), &ro)?;
        acq.push(t2 - t);
        rel.push(t2.elapsed());
    }
    acq.sort();
    rel.sort();
    out!(
        "one-shot calls, connecting each time (HTTP/1.1 JSON, as the CLI): acquire p50 {} p99 {} | release p50 {} p99 {}",
        ms(pct(&acq, 0.5)),
        ms(pct(&acq, 0.99)),
        ms(pct(&rel, 0.5)),
        ms(pct(&rel, 0.99))
    );
    Ok(())
}

/// `leasehold run --exclusive R -- true` against `flock FILE true`, alternately.
fn run_vs_flock(socket: &Path, rounds: usize) -> Result<(), Failure> {
    let exe = exe()?;
    let dir = tempfile::tempdir().map_err(|e| Failure::error(e.to_string()))?;
    let lock = dir.path().join("flock");
    std::fs::write(&lock, b"").map_err(|e| Failure::error(e.to_string()))?;
    let time = |c: &mut Command| -> Result<Duration, Failure> {
        let t = Instant::now();
        let s = c
            .status()
            .map_err(|e| Failure::error(format!("running {c:?}: {e}")))?;
        if !s.success() {
            return Err(Failure::error(format!("{c:?} failed: {s}")));
        }
        Ok(t.elapsed())
    };
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        ours.push(time(
            Command::new(&exe).arg("--socket").arg(socket).args([
                "run",
                "--exclusive",
                "bench/run",
                "--",
                "true",
            ]),
        )?);
        theirs.push(time(Command::new("flock").arg(&lock).arg("true"))?);
    }
    let mean = |v: &[Duration]| v.iter().sum::<Duration>() / v.len().max(1) as u32;
    ours.sort();
    theirs.sort();
    let (m1, m2) = (mean(&ours), mean(&theirs));
    out!(
        "leasehold run --exclusive R -- true: mean {} p50 {} | flock FILE true: mean {} p50 {} | ratio {:.2}x   [SPEC target <= 1.5x]",
        ms(m1),
        ms(pct(&ours, 0.5)),
        ms(m2),
        ms(pct(&theirs, 0.5)),
        m1.as_secs_f64() / m2.as_secs_f64()
    );
    Ok(())
}

/// Holds `n` leases in this process at once and reports the agent's resident memory.
fn many_leases(socket: &Path, n: usize, agent_pid: u32) -> Result<(), Failure> {
    let before = rss_kib(agent_pid);
    let started = Instant::now();
    let workers = 32;
    let mut tasks = Vec::new();
    for w in 0..workers {
        let c = Client::new(socket);
        tasks.push(std::thread::spawn(move || {
            let mut i = w;
            while i < n {
                let r = ResourceName::new(format!("bench/many/{i}")).map_err(|e| e.to_string())?;
                c.acquire(&AcquireOptions::new([(r, Mode::Exclusive)]))
                    .map_err(|e| e.to_string())?;
                i += workers;
            }
            Ok::<_, String>(())
        }));
    }
    for t in tasks {
        t.join()
            .map_err(|_| Failure::error("a bench client panicked"))?
            .map_err(Failure::error)?;
    }
    let took = started.elapsed();
    let s = Client::new(socket).status()?;
    let held = rss_kib(agent_pid);
    out!(
        "{} leases held by one process (taken in {:.1} s): agent RSS {} MiB (was {} MiB)   [SPEC target <= 200 MB at 100,000]",
        s.leases,
        took.as_secs_f64(),
        held / 1024,
        before / 1024
    );
    Ok(())
}
