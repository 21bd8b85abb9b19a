//! A seeded simulator of the lease engine, shared by the `invariant_*` tests.
//!
//! The simulator drives one [`Engine`] through random operations from several hosts and
//! processes: acquires (several resources, both modes, waiting or not, accepting a dirty
//! resource or not), releases (clean, dirty, handover), process deaths with pid reuse,
//! force-releases, mark-clean, cancelled waits, session renewals, lost hosts, reopened
//! sessions, small and large time jumps, ticks, and restarts from the durable records.
//!
//! Beside the engine it keeps its own [`Model`]: which leases it was told were granted, which
//! of them ended and why, which resources must be dirty, which are in their grace period,
//! which requests wait. The model is built from what a caller is told (direct answers and
//! waiter outcomes) and from its own rules; the engine's events are used only to learn the
//! order of what happened inside one operation and when a session expired, and each of them
//! is checked against what the operation may do. The invariant tests plug a [`Checker`] into
//! the simulator and compare the engine with the model.
//!
//! Every run is a pure function of its seed. `LEASEHOLD_SIM_SEED=<n>` replays one seed,
//! `LEASEHOLD_SIM_SEEDS=<count>` runs more seeds, `LEASEHOLD_SIM_STEPS=<n>` changes the length
//! of a run, and `LEASEHOLD_SIM_TRACE=1` prints every operation of the runs.

#![allow(dead_code)] // each test binary uses its own part of the harness

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Write as _;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{Duration, Instant};

use leasehold_core::{
    AcquireError, Engine, EngineConfig, Grant, HostId, Meta, Mode, Now, Owner, ProcessKey,
    ResourceName, ResourceState, SessionId,
};

/// The result of a check: `Err` says what is wrong.
pub type Check = Result<(), String>;

/// How many operations a failure report shows.
const TRACE_LEN: usize = 24;

mod checks;
mod model;
mod operations;
mod rng;

#[allow(unused_imports)] // each test binary uses its own part of the harness
pub use checks::{Checker, EndSeen, GrantSeen, Via};
#[allow(unused_imports)]
pub use model::{EndKind, Model, ModelLease, ModelResource, ModelSession, ModelWaiter};
#[allow(unused_imports)]
pub use rng::{Rng, mix};

// ---------------------------------------------------------------------------------------------
// The simulator.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OpKind {
    Acquire,
    Release,
    Kill,
    Force,
    MarkClean,
    CancelWait,
    Renew,
    Open,
    Lose,
    Recover,
    Advance,
    Jump,
    Tick,
    Restart,
}

/// (operation, base weight, may be switched off for a seed)
const OPS: [(OpKind, u32, bool); 14] = [
    (OpKind::Acquire, 30, false),
    (OpKind::Release, 16, false),
    (OpKind::Kill, 5, true),
    (OpKind::Force, 2, true),
    (OpKind::MarkClean, 4, true),
    (OpKind::CancelWait, 3, true),
    (OpKind::Renew, 20, false),
    (OpKind::Open, 6, false),
    (OpKind::Lose, 1, true),
    (OpKind::Recover, 1, true),
    (OpKind::Advance, 14, false),
    (OpKind::Jump, 2, true),
    (OpKind::Tick, 12, false),
    (OpKind::Restart, 2, true),
];

/// The shape of one run, drawn from its seed.
#[derive(Debug, Clone)]
pub struct Params {
    /// Number of hosts.
    pub hosts: usize,
    /// Number of resources.
    pub resources: usize,
    /// Pid slots per host.
    pub pids: usize,
    /// Grace in ms.
    pub grace: u64,
    /// Percent of shared items.
    pub shared_pct: u64,
    /// Percent of waiting acquires.
    pub wait_pct: u64,
    /// Percent of acquires accepting a dirty resource.
    pub accept_pct: u64,
    /// Whether operations find due sessions and ended graces unticked: the model learns the
    /// tick from a copy of the engine, and the engine's own operation must do the same first
    /// (its implicit tick). Otherwise the simulator ticks the engine before each operation.
    pub implicit_ticks: bool,
    weights: Vec<(OpKind, u32)>,
}

/// A simulated host.
#[derive(Debug, Clone)]
pub struct SimHost {
    /// Its id.
    pub id: HostId,
    /// The TTL of its sessions, in ms; `None` for sessions that never expire.
    pub ttl: Option<u64>,
    /// Its session, until the engine says it expired.
    pub session: Option<SessionId>,
    /// Its expired sessions.
    pub old_sessions: Vec<SessionId>,
    /// Whether it has stopped renewing (lost).
    pub lost: bool,
    /// Its processes, by pid slot; `None` for a slot whose process died.
    pub procs: Vec<Option<Owner>>,
}

/// Counts of what a run exercised.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Steps run.
    pub steps: u64,
    /// New leases granted directly.
    pub direct_grants: u64,
    /// New leases granted to waiters.
    pub waiter_grants: u64,
    /// Requests queued.
    pub queued: u64,
    /// Acquires refused busy.
    pub busy: u64,
    /// Acquires or waiters refused with needs-check.
    pub needs_check: u64,
    /// Grants of a dirty resource that the caller accepted.
    pub dirty_grants: u64,
    /// Leases ended, by kind: clean, dirty, died, expired, forced, handover.
    pub ended: [u64; 6],
    /// Sessions expired.
    pub expiries: u64,
    /// Acquires refused because a resource was in its grace period.
    pub grace_refusals: u64,
    /// Restarts.
    pub restarts: u64,
}

impl Stats {
    /// The names of the counters still at zero.
    pub fn unexercised(&self) -> Vec<&'static str> {
        let ended = [
            "clean releases",
            "dirty releases",
            "deaths",
            "expired leases",
            "force-releases",
            "handovers",
        ];
        let mut v: Vec<&'static str> = [
            ("direct grants", self.direct_grants),
            ("waiter grants", self.waiter_grants),
            ("queued requests", self.queued),
            ("busy refusals", self.busy),
            ("needs-check refusals", self.needs_check),
            ("dirty grants", self.dirty_grants),
            ("session expiries", self.expiries),
            ("grace refusals", self.grace_refusals),
            ("restarts", self.restarts),
        ]
        .into_iter()
        .filter(|(_, n)| *n == 0)
        .map(|(name, _)| name)
        .collect();
        for (name, n) in ended.iter().zip(self.ended) {
            if n == 0 {
                v.push(name);
            }
        }
        v
    }

    fn add(&mut self, o: &Stats) {
        self.steps += o.steps;
        self.direct_grants += o.direct_grants;
        self.waiter_grants += o.waiter_grants;
        self.queued += o.queued;
        self.busy += o.busy;
        self.needs_check += o.needs_check;
        self.dirty_grants += o.dirty_grants;
        for (a, b) in self.ended.iter_mut().zip(o.ended) {
            *a += b;
        }
        self.expiries += o.expiries;
        self.grace_refusals += o.grace_refusals;
        self.restarts += o.restarts;
    }
}

/// What an operation allows to end.
#[derive(Debug, Clone)]
enum Ctx {
    Nothing,
    Release {
        r: ResourceName,
        p: ProcessKey,
        kind: EndKind,
        to: Option<ProcessKey>,
    },
    Kill(ProcessKey),
    Force(ResourceName),
    MarkClean(ResourceName),
    Tick,
}

/// A grant the simulator was told of and has not yet matched with the engine's event.
#[derive(Debug, Clone)]
struct Told {
    seen: GrantSeen,
    used: bool,
}

/// The simulator: an engine, the world around it, and the model.
pub struct Sim {
    /// The seed of the run.
    pub seed: u64,
    /// The current step, from 1.
    pub step: usize,
    /// The current time, in ms.
    pub now: u64,
    /// The time of the last tick.
    pub last_tick: u64,
    /// The shape of the run.
    pub params: Params,
    /// The engine's settings.
    pub config: EngineConfig,
    /// The engine under test.
    pub engine: Engine,
    /// The hosts.
    pub hosts: Vec<SimHost>,
    /// The resources.
    pub names: Vec<ResourceName>,
    /// The model.
    pub model: Model,
    /// What the run exercised.
    pub stats: Stats,
    rng: Rng,
    disk_meta: Meta,
    disk: BTreeMap<ResourceName, ResourceState>,
    next_start: u64,
    trace: VecDeque<String>,
    line: String,
    print_trace: bool,
    /// The output of a tick run on a copy of the engine, which the next operation of the
    /// engine itself must produce first.
    implicit: Implicit,
}

/// Where the simulator is in checking an implicit tick.
#[derive(Debug)]
enum Implicit {
    /// No tick pending.
    None,
    /// A tick runs on a copy of the engine: its output is kept, not persisted.
    Capturing,
    /// The next operation must first produce this output.
    Pending(leasehold_core::Output),
}

fn pk(p: &ProcessKey) -> String {
    format!("{}/{}@{}", p.host, p.pid, p.start_time)
}

fn mode_str(m: Mode) -> &'static str {
    match m {
        Mode::Exclusive => "X",
        Mode::Shared => "S",
    }
}

fn items_str(items: &[(ResourceName, Mode)]) -> String {
    items
        .iter()
        .map(|(r, m)| format!("{r}:{}", mode_str(*m)))
        .collect::<Vec<_>>()
        .join(",")
}

fn err_str(e: &AcquireError) -> String {
    match e {
        AcquireError::Busy(c) => format!("busy({})", c.resource),
        AcquireError::NeedsCheck { resource, .. } => format!("needs-check({resource})"),
        AcquireError::ModeConflict { resource, .. } => format!("mode-conflict({resource})"),
        AcquireError::NoSession(s) => format!("no-session({s})"),
        AcquireError::Cancelled(why) => format!("cancelled({why})"),
        AcquireError::Invalid(why) => format!("invalid({why})"),
        AcquireError::Moved { resource, .. } => format!("moved({resource})"),
    }
}

fn grants_str(gs: &[Grant]) -> String {
    gs.iter()
        .map(|g| {
            format!(
                "{}:{}#{}{}{}",
                g.resource,
                mode_str(g.mode),
                g.token,
                if g.existing { "(held)" } else { "" },
                if g.dirty.is_some() { "(dirty)" } else { "" }
            )
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn name(s: String) -> Result<ResourceName, String> {
    ResourceName::new(s).map_err(|e| e.to_string())
}

fn roundtrip<T: serde::Serialize + serde::de::DeserializeOwned>(x: &T) -> Result<T, String> {
    let s = serde_json::to_string(x).map_err(|e| format!("serialize: {e}"))?;
    serde_json::from_str(&s).map_err(|e| format!("deserialize: {e}: {s}"))
}

fn durable(e: &Engine) -> Result<(serde_json::Value, BTreeMap<String, serde_json::Value>), String> {
    let meta = serde_json::to_value(e.meta()).map_err(|e| e.to_string())?;
    let mut recs = BTreeMap::new();
    for (n, st) in e.resources() {
        if !st.is_empty() {
            let v = serde_json::to_value(st).map_err(|e| e.to_string())?;
            recs.insert(n.to_string(), v);
        }
    }
    Ok((meta, recs))
}

impl Sim {
    /// A world for `seed`, with every host's session open at t=0.
    pub fn new(seed: u64) -> Result<Sim, String> {
        let mut rng = Rng::new(seed);
        let hosts = 2 + rng.below(3);
        let resources = 5 + rng.below(4);
        let mut weights = Vec::new();
        for (op, w, optional) in OPS {
            let off = optional && rng.chance(15);
            let w = if off {
                0
            } else {
                w * (1 + rng.below(3) as u32)
            };
            weights.push((op, w));
        }
        let params = Params {
            hosts,
            resources,
            pids: 3 + rng.below(3),
            grace: rng.between(200, 1500),
            shared_pct: rng.between(15, 70),
            wait_pct: rng.between(10, 50),
            accept_pct: rng.between(10, 50),
            // Drawn apart from `rng`, so that the rest of a seed's run is the same either way.
            implicit_ticks: mix(seed ^ 0x1A11_7D1C) % 2 == 0,
            weights,
        };
        let config = EngineConfig {
            grace: Duration::from_millis(params.grace),
        };
        let mut sim = Sim {
            seed,
            step: 0,
            now: 0,
            last_tick: 0,
            config,
            engine: Engine::new(config),
            hosts: Vec::new(),
            names: (0..resources)
                .map(|i| name(format!("r{i}")))
                .collect::<Result<_, _>>()?,
            model: Model::default(),
            stats: Stats::default(),
            disk_meta: Meta::default(),
            disk: BTreeMap::new(),
            next_start: 1,
            trace: VecDeque::new(),
            line: String::new(),
            print_trace: std::env::var_os("LEASEHOLD_SIM_TRACE").is_some(),
            implicit: Implicit::None,
            params,
            rng,
        };
        for r in &sim.names {
            sim.model
                .resources
                .insert(r.clone(), ModelResource::default());
        }
        for h in 0..hosts {
            let id = HostId::new(format!("h{h}")).map_err(|e| e.to_string())?;
            // Now and then the first host has sessions without a TTL, as on the local store.
            let ttl = sim.rng.between(1000, 3000);
            let ttl = (h > 0 || !sim.rng.chance(15)).then_some(ttl);
            let pids = sim.params.pids;
            sim.hosts.push(SimHost {
                id,
                ttl,
                session: None,
                old_sessions: Vec::new(),
                lost: false,
                procs: vec![None; pids],
            });
            sim.open(h)?;
        }
        sim.persist_all();
        let _ = sim.engine.take_output();
        Ok(sim)
    }

    fn at(&self) -> Now {
        Now::at(self.now)
    }

    fn open(&mut self, h: usize) -> Check {
        let host = &self.hosts[h];
        let ttl = host.ttl;
        let id = self
            .engine
            .open_session(host.id.clone(), ttl.map(Duration::from_millis), self.at())
            .map_err(|e| format!("open_session({}) failed: {e}", host.id))?;
        if self.model.sessions.contains_key(&id) {
            return Err(format!("open_session returned session {id} a second time"));
        }
        self.model.sessions.insert(
            id,
            ModelSession {
                host: h,
                ttl,
                last_renew: self.now,
                expired_at: None,
            },
        );
        self.hosts[h].session = Some(id);
        self.hosts[h].lost = false;
        Ok(())
    }

    fn persist_all(&mut self) {
        self.disk_meta = self.engine.meta();
        self.disk = self
            .engine
            .resources()
            .map(|(n, s)| (n.clone(), s.clone()))
            .collect();
    }

    /// Records what the engine said must be made durable, as a store would.
    fn persist(&mut self, changed: &BTreeSet<ResourceName>, meta_changed: bool) {
        for r in changed {
            match self.engine.resource(r) {
                Some(st) => {
                    self.disk.insert(r.clone(), st.clone());
                }
                None => {
                    self.disk.remove(r);
                }
            }
        }
        if meta_changed {
            self.disk_meta = self.engine.meta();
        }
    }

    fn note(&mut self, s: impl AsRef<str>) {
        self.line.push_str(s.as_ref());
    }

    fn pick_op(&mut self) -> OpKind {
        let total: u32 = self.params.weights.iter().map(|(_, w)| w).sum();
        let mut x = (self.rng.next_u64() % u64::from(total)) as u32;
        for (op, w) in &self.params.weights {
            if x < *w {
                return *op;
            }
            x -= w;
        }
        OpKind::Tick
    }

    /// Whether a session is due or a grace is over at `now`, by the model.
    fn time_is_due(&self) -> bool {
        self.model
            .sessions
            .values()
            .any(|s| s.expired_at.is_none() && s.due() <= self.now)
            || self
                .model
                .resources
                .values()
                .any(|r| r.blocked_until.is_some_and(|t| t <= self.now))
    }

    /// Runs one random operation and every check.
    pub fn step(&mut self, c: &mut dyn Checker) -> Check {
        self.step += 1;
        self.stats.steps += 1;
        self.line.clear();
        let op = self.pick_op();
        // Every engine operation first expires the sessions due at its time and ends the
        // graces that are over (an implicit tick). In half the runs the model learns those
        // changes from an explicit tick of the engine at the same time, which leaves the
        // implicit one nothing to do; in the other half from a tick of a copy of the engine,
        // and the engine's operation must then do the same itself (`Params::implicit_ticks`).
        let touches_engine = !matches!(
            op,
            OpKind::Advance | OpKind::Jump | OpKind::Lose | OpKind::Recover | OpKind::Tick
        );
        if touches_engine && self.time_is_due() {
            if self.params.implicit_ticks && op != OpKind::Restart {
                self.tick_a_copy(c)?;
            } else {
                self.op_tick(c)?;
            }
            self.note("; ");
        }
        let r = match op {
            OpKind::Acquire => self.op_acquire(c),
            OpKind::Release => self.op_release(c),
            OpKind::Kill => self.op_kill(c),
            OpKind::Force => self.op_force(c),
            OpKind::MarkClean => self.op_mark_clean(c),
            OpKind::CancelWait => self.op_cancel_wait(c),
            OpKind::Renew => self.op_renew(c),
            OpKind::Open => self.op_open(c),
            OpKind::Lose => self.op_lose(true),
            OpKind::Recover => self.op_lose(false),
            OpKind::Advance => {
                let ms = if self.rng.chance(70) {
                    self.rng.between(1, 150)
                } else {
                    self.rng.between(150, 800)
                };
                self.now += ms;
                self.note(format!("advance {ms} ms"));
                Ok(())
            }
            OpKind::Jump => {
                let ms = self.rng.between(900, 4000);
                self.now += ms;
                self.note(format!("jump {ms} ms"));
                Ok(())
            }
            OpKind::Tick => self.op_tick(c),
            OpKind::Restart => self.op_restart(c),
        };
        // An operation that did not reach the engine leaves its implicit tick pending: tick the
        // engine now, which must do just what the copy did.
        if r.is_ok() && matches!(self.implicit, Implicit::Pending(_)) {
            self.engine.tick(self.at());
            self.note("; tick");
            self.absorb(Ctx::Tick, Vec::new(), c)?;
        }
        let line = format!("#{} t={} {}", self.step, self.now, self.line);
        if self.print_trace {
            eprintln!("{line}");
        }
        self.trace.push_back(line);
        if self.trace.len() > TRACE_LEN {
            self.trace.pop_front();
        }
        r?;
        c.after_step(self)
    }

    /// A failure report: seed, step, what went wrong, the last operations, and how to replay.
    pub fn report(&self, test: &str, err: &str) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "\n==== leasehold simulation failure in `{test}` ====");
        let _ = writeln!(
            s,
            "seed {} step {} (t={} ms): {err}",
            self.seed, self.step, self.now
        );
        let p = &self.params;
        let _ = writeln!(
            s,
            "run: {} hosts (ttl {:?} ms), {} resources, {} pids/host, grace {} ms, shared {}%, wait {}%, accept-dirty {}%",
            p.hosts,
            self.hosts.iter().map(|h| h.ttl).collect::<Vec<_>>(),
            p.resources,
            p.pids,
            p.grace,
            p.shared_pct,
            p.wait_pct,
            p.accept_pct
        );
        let off: Vec<String> = p
            .weights
            .iter()
            .filter(|(_, w)| *w == 0)
            .map(|(op, _)| format!("{op:?}"))
            .collect();
        if !off.is_empty() {
            let _ = writeln!(
                s,
                "operations switched off for this seed: {}",
                off.join(", ")
            );
        }
        let _ = writeln!(s, "last operations (newest last):");
        for l in &self.trace {
            let _ = writeln!(s, "  {l}");
        }
        if self
            .trace
            .back()
            .is_none_or(|l| !l.starts_with(&format!("#{} ", self.step)))
        {
            let _ = writeln!(
                s,
                "  #{} t={} {}  <- panicked here",
                self.step, self.now, self.line
            );
        }
        let _ = writeln!(
            s,
            "replay: LEASEHOLD_SIM_SEED={} LEASEHOLD_SIM_STEPS={} LEASEHOLD_SIM_TRACE=1 cargo test -p leasehold-core --test {test} -- --nocapture",
            self.seed, self.step
        );
        s
    }
}

// ---------------------------------------------------------------------------------------------
// Running many seeds.

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    match v.trim().parse() {
        Ok(n) => Some(n),
        Err(_) => panic!("{name}={v:?} is not a number"),
    }
}

/// Runs one seed for `steps` steps with `checker`; on failure returns the report.
pub fn run_one(
    test: &str,
    seed: u64,
    steps: usize,
    checker: &mut dyn Checker,
) -> Result<Stats, String> {
    let mut sim = match Sim::new(seed) {
        Ok(s) => s,
        Err(e) => return Err(format!("seed {seed}: setting up failed: {e}")),
    };
    for _ in 0..steps {
        let r = catch_unwind(AssertUnwindSafe(|| sim.step(checker)));
        let err = match r {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => e,
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_else(|| "(non-text panic)".to_owned());
                format!("panic: {msg}")
            }
        };
        return Err(sim.report(test, &err));
    }
    Ok(sim.stats)
}

/// Runs the seeds of one invariant test: `LEASEHOLD_SIM_SEED` alone when set, otherwise
/// `LEASEHOLD_SIM_SEEDS` (default 300) seeds derived from `salt`. Panics with a report naming
/// the seed at the first failure.
pub fn run<C: Checker>(test: &str, salt: u64, mut make: impl FnMut() -> C) {
    let steps = env_u64("LEASEHOLD_SIM_STEPS").unwrap_or(400) as usize;
    let seeds: Vec<u64> = match env_u64("LEASEHOLD_SIM_SEED") {
        Some(s) => vec![s],
        None => {
            let n = env_u64("LEASEHOLD_SIM_SEEDS").unwrap_or(300);
            (0..n).map(|i| mix(salt.wrapping_add(i))).collect()
        }
    };
    let started = Instant::now();
    let mut total = Stats::default();
    for &seed in &seeds {
        let mut checker = make();
        match run_one(test, seed, steps, &mut checker) {
            Ok(stats) => total.add(&stats),
            Err(report) => panic!("{report}"),
        }
    }
    eprintln!(
        "{test}: {} seeds x {steps} steps in {:.2?}: {total:?}",
        seeds.len(),
        started.elapsed()
    );
    // A run that passes must also have exercised what it checks. One replayed seed, or a
    // handful, need not reach everything; the default campaign must.
    if seeds.len() >= COVERAGE_SEEDS && steps >= 400 {
        let missing = total.unexercised();
        assert!(
            missing.is_empty(),
            "{test}: {} seeds x {steps} steps never exercised: {}; the simulation passes without checking these (coverage: {total:?})",
            seeds.len(),
            missing.join(", ")
        );
    }
}

/// The number of seeds from which a run must exercise every counter of [`Stats`].
const COVERAGE_SEEDS: usize = 100;
