//! `leasehold bench`: the figures of SPEC §7 that one host can show, measured through a real
//! agent and printed beside their references.
//!
//! By default the bench starts its own agent in a temporary directory (so it measures start
//! to ready and disturbs nothing); `--external` uses the agent at `--socket` instead.
//!
//! Every row of issue 15's table is measured beside its reference in the same run,
//! alternating where the two can alternate (latency round by round, throughput phase by
//! phase), and printed with the ratio and the target; `--json` prints them for scripts.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use leasehold_client::blocking::Client;
use leasehold_client::{AcquireOptions, ReleaseOptions};
use leasehold_core::{Mode, ResourceName};

use serde_json::{Value, json};

use crate::{Failure, connect};

mod etcd;
mod hosts;

use etcd::{acquire_vs_raw, failover, raw_client};

// Flags of `leasehold bench` (a comment, not a doc comment: see `Command` in lib.rs).
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
    /// Print one JSON object (every figure, each row with its reference, ratio, target and
    /// whether it is met) instead of lines.
    #[arg(long)]
    json: bool,
}

/// What the bench found: its lines as it goes (unless `--json`), and the rows for `--json`.
struct Report {
    json: bool,
    rows: Mutex<Vec<Value>>,
}

/// The global report of this run of the bench.
static REPORT: std::sync::OnceLock<Report> = std::sync::OnceLock::new();

/// Prints a line of the bench (not with `--json`).
fn say(line: String) -> Result<(), Failure> {
    if REPORT.get().is_some_and(|r| r.json) {
        return Ok(());
    }
    crate::write_out(format_args!("{line}"))
}

/// Records a figure for `--json`: `fields` is an object (name, value, unit, reference...).
fn record(fields: Value) {
    if let Some(r) = REPORT.get()
        && let Ok(mut rows) = r.rows.lock()
    {
        rows.push(fields);
    }
}

/// One row of the table: ours beside its reference (the ratio is ours over it) and
/// the target, met or not.
struct Row<'a> {
    measure: &'a str,
    ours: f64,
    unit: &'a str,
    reference: Option<(&'a str, f64)>,
    target: &'a str,
    met: Option<bool>,
    /// More of the figure for people (percentiles), printed after the row.
    extra: String,
}

/// Records and prints a row.
fn emit(r: Row<'_>) -> Result<(), Failure> {
    let ratio = r.reference.map(|(_, v)| r.ours / v);
    record(json!({
        "measure": r.measure, "value": r.ours, "unit": r.unit,
        "reference": r.reference.map(|(n, _)| n),
        "reference_value": r.reference.map(|(_, v)| v),
        "ratio": ratio, "target": r.target, "met": r.met,
        "detail": r.extra,
    }));
    let mut line = format!("{}: {}", r.measure, fig(r.ours, r.unit));
    if let (Some((name, v)), Some(ratio)) = (r.reference, ratio) {
        line.push_str(&format!(
            " | {name}: {} | ratio {ratio:.2}x",
            fig(v, r.unit)
        ));
    }
    if !r.extra.is_empty() {
        line.push_str(&format!(" | {}", r.extra));
    }
    line.push_str(&format!("   [target {}", r.target));
    line.push_str(match r.met {
        Some(true) => ": met]",
        Some(false) => ": NOT met]",
        None => "]",
    });
    say(line)
}

fn fig(v: f64, unit: &str) -> String {
    match unit {
        "ms" => format!("{v:.3} ms"),
        "MiB" => format!("{v:.1} MiB"),
        u => format!("{v:.0} {u}"),
    }
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

/// The lean `leasehold` binary beside this one, as people run it; this one if there is none.
fn lean_exe() -> Result<PathBuf, Failure> {
    let lean = crate::sibling("leasehold")?;
    if lean.is_file() { Ok(lean) } else { exe() }
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

/// Starts an agent and waits until it answers.
fn start_agent(host: &str, args: &[String]) -> Result<(OwnAgent, PathBuf, Duration), Failure> {
    let (agent, socket, started) = spawn_agent(host, args)?;
    let ready = wait_ready(&socket, started)?;
    Ok((agent, socket, ready))
}

/// Starts an agent on a socket in a scratch directory. It dies with the thread that called
/// this (`PR_SET_PDEATHSIG`), so a bench that is killed leaves no agent behind: call it from
/// the thread that outlives the agent.
fn spawn_agent(host: &str, args: &[String]) -> Result<(OwnAgent, PathBuf, Instant), Failure> {
    use std::os::unix::process::CommandExt as _;
    let dir = tempfile::tempdir().map_err(|e| Failure::error(e.to_string()))?;
    let socket = dir.path().join("agent.sock");
    let started = Instant::now();
    let mut cmd = Command::new(exe()?);
    cmd.arg("agent")
        .arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--host-id")
        .arg(host)
        .args(args)
        .env("LEASEHOLD_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(agent_log(host)?);
    // SAFETY: the closure only makes one async-signal-safe system call.
    unsafe {
        cmd.pre_exec(|| {
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))?;
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| Failure::error(format!("starting an agent: {e}")))?;
    Ok((OwnAgent { child, _dir: dir }, socket, started))
}

/// Where a bench agent's warnings go: `LEASEHOLD_BENCH_AGENT_LOGS=DIR` keeps them in
/// `DIR/HOST.log` (to see what an agent said when a row went wrong); nowhere otherwise.
fn agent_log(host: &str) -> Result<Stdio, Failure> {
    let Some(dir) = std::env::var_os("LEASEHOLD_BENCH_AGENT_LOGS") else {
        return Ok(Stdio::null());
    };
    let path = Path::new(&dir).join(format!("{host}.log"));
    std::fs::File::create(&path)
        .map(Stdio::from)
        .map_err(|e| Failure::error(format!("creating {}: {e}", path.display())))
}

/// Waits until the agent at `socket` answers; returns how long since `started`.
fn wait_ready(socket: &Path, started: Instant) -> Result<Duration, Failure> {
    loop {
        if Client::new(socket).status().is_ok() {
            return Ok(started.elapsed());
        }
        if started.elapsed() > Duration::from_secs(30) {
            return Err(Failure::error("the bench's agent did not answer in 30 s"));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The load average now (1, 5 and 15 minutes), as /proc/loadavg says.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// `leasehold bench`. The client side is the blocking client, one thread per client; a
/// runtime drives the async parts (the store alone, raw etcd).
pub fn bench(a: BenchArgs, socket: &Option<PathBuf>) -> Result<u8, Failure> {
    let _ = REPORT.set(Report {
        json: a.json,
        rows: Mutex::new(Vec::new()),
    });
    if !a.hosts.is_empty() {
        hosts::many_hosts(&a)?;
        return print_json(&a).map(|()| 0);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::error(format!("starting the runtime: {e}")))?;
    let load = loadavg();
    record(json!({"measure": "load average at start", "value": load}));
    say(format!("load average at start: {load}"))?;
    let (_own, socket) = if a.external {
        let c = connect(socket)?;
        (None, c.socket().to_path_buf())
    } else {
        let (agent, socket, ready) = start_agent("bench", &backend_args(&a))?;
        emit(Row {
            measure: "agent start to ready (empty state)",
            ours: ready.as_secs_f64() * 1e3,
            unit: "ms",
            reference: None,
            target: "<= 1000 ms; sanlock joins a lockspace in 5-21 s",
            met: Some(ready <= Duration::from_secs(1)),
            extra: String::new(),
        })?;
        (Some(agent), socket)
    };
    let status = Client::new(&socket).status()?;
    record(
        json!({"measure": "agent", "pid": status.pid, "host": status.host, "backend": status.backend}),
    );
    say(format!(
        "agent pid {} on host {}, backend {}, socket {}",
        status.pid,
        status.host,
        status.backend,
        socket.display()
    ))?;
    let on_etcd = status.backend != "local";
    for n in &a.clients {
        let reference = match (&a.etcd_endpoints, on_etcd) {
            (Some(eps), true) => Reference::RawEtcd(eps.clone()),
            (None, true) => Reference::None,
            (_, false) => Reference::StoreAlone,
        };
        throughput(&rt, &socket, status.pid as u32, *n, a.seconds, reference)?;
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
    }
    if a.leases > 0 {
        many_leases(&socket, a.leases, status.pid as u32)?;
    }
    if a.etcd_endpoints.is_some() {
        failover(&a)?;
    }
    let load = loadavg();
    record(json!({"measure": "load average at end", "value": load}));
    say(format!("load average at end: {load}"))?;
    print_json(&a)?;
    Ok(0)
}

/// With `--json`, prints every figure recorded, as one object.
fn print_json(a: &BenchArgs) -> Result<(), Failure> {
    if a.json
        && let Some(r) = REPORT.get()
    {
        let rows = r.rows.lock().map(|r| r.clone()).unwrap_or_default();
        crate::write_out(format_args!("{}", json!({ "figures": rows })))?;
    }
    Ok(())
}

/// What the throughput through the agent is measured beside.
enum Reference {
    /// The local store alone, in this process, durable, on the same file system.
    StoreAlone,
    /// Raw put-then-delete cycles on this etcd.
    RawEtcd(Vec<String>),
    /// Nothing (an external agent on etcd without --etcd-endpoints).
    None,
}

/// Acquire+release cycles by `clients` concurrent clients through the agent (threads with
/// the blocking client, each keeping its connection open between calls, as a program that
/// makes many calls does), each on its own resource, beside the reference: two phases of
/// each, alternating, `seconds` in all for each.
fn throughput(
    rt: &tokio::runtime::Runtime,
    socket: &Path,
    agent_pid: u32,
    clients: usize,
    seconds: f64,
    reference: Reference,
) -> Result<(), Failure> {
    let half = seconds / 2.0;
    let (mut ours, mut theirs) = ((0u64, 0f64), (0u64, 0f64));
    let (mut acq, mut rel) = (Vec::new(), Vec::new());
    let store_dir = tempfile::tempdir().map_err(|e| Failure::error(e.to_string()))?;
    let store = match reference {
        Reference::StoreAlone => Some(Arc::new(
            leasehold_store::LocalStore::open(
                store_dir.path().join("state"),
                leasehold_core::HostId::new("bench-store")
                    .map_err(|e| Failure::error(e.to_string()))?,
            )
            .map_err(|e| Failure::error(format!("opening the store alone: {e}")))?,
        )),
        _ => None,
    };
    let raw = match &reference {
        // The etcd client needs the runtime's context to be made.
        Reference::RawEtcd(eps) => Some(rt.block_on(async { raw_client(eps) })?),
        _ => None,
    };
    let mut cost = Cost::default();
    for _ in 0..2 {
        let agent_before = AgentThreads::read(agent_pid);
        let (n, secs, a, r, clients_cost) = agent_cycles(socket, clients, half)?;
        cost.add(
            &AgentThreads::read(agent_pid).since(&agent_before),
            &clients_cost,
        );
        ours = (ours.0 + n, ours.1 + secs);
        acq.extend(a);
        rel.extend(r);
        if let Some(store) = &store {
            let (n, secs) = rt.block_on(store_cycles(store.clone(), clients, half))?;
            theirs = (theirs.0 + n, theirs.1 + secs);
        }
        if let Some(raw) = &raw {
            let (n, took) = rt
                .block_on(raw.put_delete_cycles(clients, Duration::from_secs_f64(half)))
                .map_err(|e| Failure::error(e.to_string()))?;
            theirs = (theirs.0 + n, theirs.1 + took.as_secs_f64());
        }
    }
    acq.sort();
    rel.sort();
    let rate = ours.0 as f64 / ours.1;
    let ref_rate = theirs.0 as f64 / theirs.1.max(f64::MIN_POSITIVE);
    let extra = format!(
        "acquire p50 {} p99 {} | release p50 {} p99 {} | {}",
        ms(pct(&acq, 0.5)),
        ms(pct(&acq, 0.99)),
        ms(pct(&rel, 0.5)),
        ms(pct(&rel, 0.99)),
        cost.per_cycle(ours.0),
    );
    let (measure, reference, target, met) = match (&reference, clients) {
        (Reference::StoreAlone, 64) => (
            "acquire+release/s through the agent, local store, durable, 64 clients".to_owned(),
            Some(("the store alone", ref_rate)),
            ">= 25000/s".to_owned(),
            Some(rate >= 25_000.0),
        ),
        (Reference::RawEtcd(_), 64) => (
            "acquire+release/s through the agent on etcd, 64 clients".to_owned(),
            Some(("raw etcd put-then-delete", ref_rate)),
            ">= 0.8x".to_owned(),
            Some(rate / ref_rate >= 0.8),
        ),
        (Reference::StoreAlone, n) => (
            format!("acquire+release/s through the agent, local store, durable, {n} clients"),
            Some(("the store alone", ref_rate)),
            "none (64 clients: >= 25000/s)".to_owned(),
            None,
        ),
        (Reference::RawEtcd(_), n) => (
            format!("acquire+release/s through the agent on etcd, {n} clients"),
            Some(("raw etcd put-then-delete", ref_rate)),
            "none (64 clients: >= 0.8x)".to_owned(),
            None,
        ),
        (Reference::None, n) => (
            format!("acquire+release/s through the agent, {n} clients"),
            None,
            "none".to_owned(),
            None,
        ),
    };
    emit(Row {
        measure: &measure,
        ours: rate,
        unit: "/s",
        reference,
        target: &target,
        met,
        extra,
    })
}

/// CPU time and context switches of a thread or a set of threads.
#[derive(Clone, Copy, Default, Debug)]
struct Spent {
    cpu: Duration,
    switches: u64,
}

impl Spent {
    fn add(&mut self, o: &Spent) {
        self.cpu += o.cpu;
        self.switches += o.switches;
    }

    /// This thread's, so far (`getrusage(RUSAGE_THREAD)`).
    fn this_thread() -> Spent {
        let mut u = zeroed_rusage();
        // SAFETY: u is a valid rusage for the call to fill in.
        unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut u) };
        let tv = |t: libc::timeval| {
            Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
        };
        Spent {
            cpu: tv(u.ru_utime) + tv(u.ru_stime),
            switches: (u.ru_nvcsw + u.ru_nivcsw) as u64,
        }
    }

    fn since(&self, before: &Spent) -> Spent {
        Spent {
            cpu: self.cpu.saturating_sub(before.cpu),
            switches: self.switches.saturating_sub(before.switches),
        }
    }
}

/// The agent's threads' CPU time and context switches (`/proc/PID/task/*/schedstat`: ns on
/// a CPU, and times put on one), and which is its store thread: empty when not readable.
#[derive(Default, Debug)]
struct AgentThreads(std::collections::HashMap<u32, (Spent, bool)>);

impl AgentThreads {
    fn read(pid: u32) -> AgentThreads {
        let mut t = AgentThreads::default();
        let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return t;
        };
        for e in dir.flatten() {
            let path = e.path();
            let Some(tid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(sched) = std::fs::read_to_string(path.join("schedstat")) else {
                continue;
            };
            let f: Vec<u64> = sched
                .split_whitespace()
                .map(|v| v.parse().unwrap_or(0))
                .collect();
            let spent = Spent {
                cpu: Duration::from_nanos(f.first().copied().unwrap_or(0)),
                switches: f.get(2).copied().unwrap_or(0),
            };
            let store = std::fs::read_to_string(path.join("comm"))
                .is_ok_and(|c| c.starts_with("leasehold-store"));
            t.0.insert(tid, (spent, store));
        }
        t
    }

    /// What the agent spent since `before`, all threads and the store's (a thread that
    /// ended meanwhile is not counted).
    fn since(&self, before: &AgentThreads) -> (Spent, Spent) {
        let (mut all, mut store) = (Spent::default(), Spent::default());
        for (tid, (now, is_store)) in &self.0 {
            let d = now.since(&before.0.get(tid).map(|b| b.0).unwrap_or_default());
            all.add(&d);
            if *is_store {
                store.add(&d);
            }
        }
        (all, store)
    }
}

/// Where an acquire+release cycle's CPU went: the agent's (its store thread's apart) and the
/// bench's client threads'.
#[derive(Default, Debug)]
struct Cost {
    agent: Spent,
    store: Spent,
    clients: Spent,
}

impl Cost {
    fn add(&mut self, (agent, store): &(Spent, Spent), clients: &Spent) {
        self.agent.add(agent);
        self.store.add(store);
        self.clients.add(clients);
    }

    fn per_cycle(&self, cycles: u64) -> String {
        let n = cycles.max(1) as f64;
        let us = |s: &Spent| s.cpu.as_secs_f64() * 1e6 / n;
        let sw = |s: &Spent| s.switches as f64 / n;
        format!(
            "per cycle: agent CPU {:.0} us (store thread {:.0} us), {:.2} switches; clients CPU {:.0} us, {:.2} switches",
            us(&self.agent),
            us(&self.store),
            sw(&self.agent),
            us(&self.clients),
            sw(&self.clients),
        )
    }
}

/// Acquire+release cycles through the agent for `seconds`: the cycles, the seconds they took,
/// each acquire's and release's latency, and the client threads' CPU and context switches.
#[allow(clippy::type_complexity)]
fn agent_cycles(
    socket: &Path,
    clients: usize,
    seconds: f64,
) -> Result<(u64, f64, Vec<Duration>, Vec<Duration>, Spent), Failure> {
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let mut tasks = Vec::new();
    for i in 0..clients {
        let mut c = Client::new(socket).keep_alive();
        let r = name(format!("bench/{clients}/{i}"))?;
        tasks.push(std::thread::spawn(move || {
            let mut acq = Vec::new();
            let mut rel = Vec::new();
            let spent = Spent::this_thread();
            while Instant::now() < deadline {
                let t = Instant::now();
                c.acquire(&AcquireOptions::new([(r.clone(), Mode::Exclusive)]))?;
                let t2 = Instant::now();
                c.release(std::slice::from_ref(&r), &ReleaseOptions::default())?;
                acq.push(t2 - t);
                rel.push(t2.elapsed());
            }
            let spent = Spent::this_thread().since(&spent);
            Ok::<_, leasehold_client::blocking::Error>((acq, rel, spent))
        }));
    }
    let started = Instant::now();
    let (mut acq, mut rel, mut spent) = (Vec::new(), Vec::new(), Spent::default());
    for t in tasks {
        let (a, r, s) = t
            .join()
            .map_err(|_| Failure::error("a bench client panicked"))??;
        acq.extend(a);
        rel.extend(r);
        spent.add(&s);
    }
    Ok((
        acq.len() as u64,
        started.elapsed().as_secs_f64(),
        acq,
        rel,
        spent,
    ))
}

/// Acquire+release cycles on the local store alone (durable, as the agent's), by `clients`
/// tasks for `seconds`: the cycles and the seconds they took.
async fn store_cycles(
    store: Arc<leasehold_store::LocalStore>,
    clients: usize,
    seconds: f64,
) -> Result<(u64, f64), Failure> {
    use leasehold_store::Store as _;
    let host = store.host().clone();
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..clients {
        let store = store.clone();
        let owner = leasehold_core::Owner::new(host.clone(), 100_000 + c as u32, 1);
        let r = name(format!("bench/store/{clients}/{c}"))?;
        tasks.spawn(async move {
            let mut n = 0u64;
            while Instant::now() < deadline {
                store
                    .acquire(leasehold_store::AcquireSpec::new(
                        owner.clone(),
                        [(r.clone(), Mode::Exclusive)],
                    ))
                    .await?;
                store
                    .release(
                        r.clone(),
                        owner.process.clone(),
                        None,
                        None,
                        leasehold_core::ReleaseKind::Clean,
                    )
                    .await?;
                n += 1;
            }
            Ok::<_, leasehold_store::StoreError>(n)
        });
    }
    let started = Instant::now();
    let mut total = 0;
    while let Some(done) = tasks.join_next().await {
        total += done
            .map_err(|_| Failure::error("a bench client panicked"))?
            .map_err(|e| Failure::error(format!("the store alone: {e}")))?;
    }
    Ok((total, started.elapsed().as_secs_f64()))
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
    let p99 = pct(&lat, 0.99);
    emit(Row {
        measure: "holder exit -> lease released, p99",
        ours: p99.as_secs_f64() * 1e3,
        unit: "ms",
        reference: None,
        target: "p99 <= 100 ms",
        met: Some(p99 <= Duration::from_millis(100)),
        extra: format!(
            "p50 {} max {}, {rounds} kills",
            ms(pct(&lat, 0.5)),
            ms(pct(&lat, 1.0))
        ),
    })
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
    record(json!({
        "measure": "one-shot acquire and release, connecting each time (as the CLI)",
        "acquire_p50_ms": pct(&acq, 0.5).as_secs_f64() * 1e3,
        "acquire_p99_ms": pct(&acq, 0.99).as_secs_f64() * 1e3,
        "release_p50_ms": pct(&rel, 0.5).as_secs_f64() * 1e3,
        "release_p99_ms": pct(&rel, 0.99).as_secs_f64() * 1e3,
    }));
    say(format!(
        "one-shot calls, connecting each time (HTTP/1.1 JSON, as the CLI): acquire p50 {} p99 {} | release p50 {} p99 {}",
        ms(pct(&acq, 0.5)),
        ms(pct(&acq, 0.99)),
        ms(pct(&rel, 0.5)),
        ms(pct(&rel, 0.99))
    ))
}

/// `leasehold run --exclusive R -- true` against `flock FILE true`, alternately. Beside the
/// wall times: each command's CPU time (its children included), and what the disk's
/// `fdatasync` took in the same rounds (a run waits for two: the grant's and the release's;
/// flock for none), so that a ratio taken on a busy machine can be read.
fn run_vs_flock(socket: &Path, rounds: usize) -> Result<(), Failure> {
    use std::os::unix::fs::FileExt;
    let exe = lean_exe()?;
    let dir = tempfile::tempdir().map_err(|e| Failure::error(e.to_string()))?;
    let lock = dir.path().join("flock");
    std::fs::write(&lock, b"").map_err(|e| Failure::error(e.to_string()))?;
    let synced = std::fs::File::create(dir.path().join("synced"))
        .map_err(|e| Failure::error(e.to_string()))?;
    // Wall time and CPU time (user + system, of the command and the children it waited for).
    let time = |c: &mut Command| -> Result<(Duration, Duration), Failure> {
        let t = Instant::now();
        let child = c
            .spawn()
            .map_err(|e| Failure::error(format!("running {c:?}: {e}")))?;
        let (mut status, mut usage) = (0, zeroed_rusage());
        // SAFETY: the pid is this process's unreaped child; status and usage are valid places.
        let r = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
        let wall = t.elapsed();
        if r < 0 || !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
            return Err(Failure::error(format!("{c:?} failed: status {status}")));
        }
        let tv = |t: libc::timeval| {
            Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
        };
        Ok((wall, tv(usage.ru_utime) + tv(usage.ru_stime)))
    };
    let (mut ours, mut theirs, mut syncs) = (Vec::new(), Vec::new(), Vec::new());
    let (mut our_cpu, mut their_cpu) = (Duration::ZERO, Duration::ZERO);
    for round in 0..rounds {
        let (w, c) = time(Command::new(&exe).arg("--socket").arg(socket).args([
            "run",
            "--exclusive",
            "bench/run",
            "--",
            "true",
        ]))?;
        ours.push(w);
        our_cpu += c;
        let (w, c) = time(Command::new("flock").arg(&lock).arg("true"))?;
        theirs.push(w);
        their_cpu += c;
        let t = Instant::now();
        synced
            .write_all_at(&[round as u8; 4096], 0)
            .and_then(|()| synced.sync_data())
            .map_err(|e| Failure::error(format!("timing the disk: {e}")))?;
        syncs.push(t.elapsed());
    }
    let mean = |v: &[Duration]| v.iter().sum::<Duration>() / v.len().max(1) as u32;
    ours.sort();
    theirs.sort();
    syncs.sort();
    let (m1, m2) = (mean(&ours), mean(&theirs));
    let ratio = m1.as_secs_f64() / m2.as_secs_f64();
    let per_ms = |d: Duration| d.as_secs_f64() * 1e3 / rounds.max(1) as f64;
    let per = |d: Duration| ms(d / rounds.max(1) as u32);
    record(json!({
        "measure": "run -- true and flock FILE true: CPU each, and the disk meanwhile",
        "run_cpu_ms": per_ms(our_cpu),
        "flock_cpu_ms": per_ms(their_cpu),
        "fdatasync_p50_ms": pct(&syncs, 0.5).as_secs_f64() * 1e3,
        "fdatasync_p90_ms": pct(&syncs, 0.9).as_secs_f64() * 1e3,
    }));
    emit(Row {
        measure: "leasehold run --exclusive R -- true, mean",
        ours: m1.as_secs_f64() * 1e3,
        unit: "ms",
        reference: Some(("flock FILE true, mean", m2.as_secs_f64() * 1e3)),
        target: "<= 1.5x",
        met: Some(ratio <= 1.5),
        extra: format!(
            "p50 {} vs {}, CPU {} vs {}, {rounds} rounds alternating; the disk's fdatasync p50 {} p90 {} meanwhile (a run waits for two)",
            ms(pct(&ours, 0.5)),
            ms(pct(&theirs, 0.5)),
            per(our_cpu),
            per(their_cpu),
            ms(pct(&syncs, 0.5)),
            ms(pct(&syncs, 0.9)),
        ),
    })
}

/// A zeroed `rusage`, for wait4 to fill in.
fn zeroed_rusage() -> libc::rusage {
    // SAFETY: rusage is plain integers and timevals: all zeroes is a valid value.
    unsafe { std::mem::zeroed() }
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
    let mib = held as f64 / 1024.0;
    // Every acquire above succeeded (the bench stops at the first that fails), so `n` are
    // held; the agent's own count is shown too (missing, 0, when listing timed out).
    let per_lease = held.saturating_sub(before) as f64 * 1024.0 / n.max(1) as f64;
    record(json!({"measure": "bytes per lease held", "value": per_lease, "unit": "B"}));
    emit(Row {
        measure: &format!("agent RSS with {n} leases held by one process"),
        ours: mib,
        unit: "MiB",
        reference: None,
        target: "<= 100 MiB at 100,000 leases",
        met: (n >= 100_000).then_some(mib <= 100.0),
        extra: format!(
            "{per_lease:.0} bytes per lease (RSS {:.1} MiB before), taken in {:.1} s; the agent counts {}",
            before as f64 / 1024.0,
            took.as_secs_f64(),
            s.leases
        ),
    })
}
