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
    AcquireError, AcquireRequest, Acquired, EndReason, Ended, Engine, EngineConfig, Event, Grant,
    HostId, Lease, Meta, Mode, Now, Owner, ProcessKey, ReleaseError, ReleaseKind, ReleaseRequest,
    ResourceName, ResourceState, SessionError, SessionId, Token, WaiterId,
};

/// The result of a check: `Err` says what is wrong.
pub type Check = Result<(), String>;

/// How many operations a failure report shows.
const TRACE_LEN: usize = 24;

// ---------------------------------------------------------------------------------------------
// A tiny PRNG, so that a seed replays identically forever, whatever crate versions come.

/// The splitmix64 finaliser.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// splitmix64.
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }

    /// A number in `0..n`; `n` must not be 0.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// A number in `lo..=hi`.
    pub fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }

    /// True `percent` times in a hundred.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next_u64() % 100 < percent
    }

    /// One element of a non-empty slice.
    pub fn pick<T: Clone>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())].clone()
    }
}

// ---------------------------------------------------------------------------------------------
// The model.

/// How a lease ended, as the model classifies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndKind {
    /// Released cleanly.
    Clean,
    /// Released dirty.
    Dirty,
    /// Its process died.
    Died,
    /// Its session expired.
    Expired,
    /// Force-released.
    Forced,
    /// Handed over to a waiter.
    Handover,
}

impl EndKind {
    /// The model's own rule (SPEC G5), independent of the engine's: an exclusive lease that
    /// ends other than by a clean release or a handover dirties its resource.
    pub fn dirties_exclusive(self) -> bool {
        !matches!(self, EndKind::Clean | EndKind::Handover)
    }

    /// How the engine says a lease ended.
    pub fn of(how: &EndReason) -> EndKind {
        match how {
            EndReason::Released => EndKind::Clean,
            EndReason::ReleasedDirty { .. } => EndKind::Dirty,
            // A fenced holder died by its agent's hand: a death, as far as the model goes.
            EndReason::ProcessDied | EndReason::Fenced => EndKind::Died,
            EndReason::SessionExpired => EndKind::Expired,
            EndReason::Forced { .. } => EndKind::Forced,
            EndReason::HandedOver { .. } => EndKind::Handover,
        }
    }
}

/// A live lease as the model knows it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ModelLease {
    /// The holder.
    pub process: ProcessKey,
    /// The mode.
    pub mode: Mode,
    /// The token it was granted with.
    pub token: Token,
    /// The session it lives with.
    pub session: SessionId,
}

/// What the model knows of one resource.
#[derive(Debug, Clone, Default)]
pub struct ModelResource {
    /// Live leases.
    pub leases: Vec<ModelLease>,
    /// Whether the resource must be dirty.
    pub dirty: bool,
    /// The lease whose ending made it dirty: holder, token, how it ended.
    pub dirty_by: Option<(ProcessKey, Token, EndKind)>,
    /// No grant before this time (ms), after a session expired holding the resource.
    pub blocked_until: Option<u64>,
    /// The session expiry that set `blocked_until`: (session, expired at).
    pub blocked_by: Option<(SessionId, u64)>,
    /// Every token ever granted for the resource, in grant order.
    pub tokens: Vec<Token>,
    /// A handover in progress: the waiter the resource is kept for.
    pub reserved_for: Option<WaiterId>,
}

impl ModelResource {
    /// The largest token ever granted.
    pub fn max_token(&self) -> Option<Token> {
        self.tokens.iter().copied().max()
    }

    /// The lease `process` holds, if any.
    pub fn lease_of(&self, process: &ProcessKey) -> Option<&ModelLease> {
        self.leases.iter().find(|l| &l.process == process)
    }

    /// The model's own compatibility rule (SPEC §2): a new lease in `mode` may join the live
    /// leases when there are none, or when it and all of them are shared.
    pub fn admits(&self, mode: Mode) -> bool {
        self.leases.is_empty()
            || (mode == Mode::Shared && self.leases.iter().all(|l| l.mode == Mode::Shared))
    }

    /// Whether the resource is inside a grace period at `now`.
    pub fn in_grace(&self, now: u64) -> bool {
        self.blocked_until.is_some_and(|t| now < t)
    }
}

/// What the model knows of one host session.
#[derive(Debug, Clone)]
pub struct ModelSession {
    /// The host (index into the simulator's hosts).
    pub host: usize,
    /// Its TTL in ms; `None` for a session that never expires (the local store's).
    pub ttl: Option<u64>,
    /// When it was opened or last renewed successfully.
    pub last_renew: u64,
    /// When the engine expired it.
    pub expired_at: Option<u64>,
}

impl ModelSession {
    /// When it expires unless renewed: last successful renewal plus TTL (never without a TTL).
    pub fn due(&self) -> u64 {
        self.ttl.map_or(u64::MAX, |ttl| self.last_renew + ttl)
    }
}

/// A waiting request as the model knows it.
#[derive(Debug, Clone)]
pub struct ModelWaiter {
    /// Its id.
    pub id: WaiterId,
    /// Who waits.
    pub owner: Owner,
    /// With which session.
    pub session: SessionId,
    /// For what, sorted by name.
    pub items: Vec<(ResourceName, Mode)>,
    /// Whether it accepts a dirty resource.
    pub accept_dirty: bool,
}

/// The simulator's independent account of the world.
#[derive(Debug, Default)]
pub struct Model {
    /// Every resource of the run.
    pub resources: BTreeMap<ResourceName, ModelResource>,
    /// Every session ever opened.
    pub sessions: BTreeMap<SessionId, ModelSession>,
    /// The requests waiting now.
    pub waiters: BTreeMap<WaiterId, ModelWaiter>,
}

impl Model {
    /// One resource of the run.
    pub fn res(&self, r: &ResourceName) -> &ModelResource {
        static EMPTY: ModelResource = ModelResource {
            leases: Vec::new(),
            dirty: false,
            dirty_by: None,
            blocked_until: None,
            blocked_by: None,
            tokens: Vec::new(),
            reserved_for: None,
        };
        self.resources.get(r).unwrap_or(&EMPTY)
    }

    fn res_mut(&mut self, r: &ResourceName) -> &mut ModelResource {
        self.resources.entry(r.clone()).or_default()
    }

    /// The waiters that include `r`, in id (arrival) order.
    pub fn waiters_on<'a>(&'a self, r: &'a ResourceName) -> impl Iterator<Item = &'a ModelWaiter> {
        self.waiters
            .values()
            .filter(move |w| w.items.iter().any(|(x, _)| x == r))
    }

    /// Whether the engine still considers session `id` live (it has not told of its expiry).
    pub fn session_live(&self, id: SessionId) -> bool {
        self.sessions
            .get(&id)
            .is_some_and(|s| s.expired_at.is_none())
    }
}

// ---------------------------------------------------------------------------------------------
// What checkers are shown.

/// How a grant reached its owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// As the answer to an acquire.
    Direct,
    /// As the outcome of a waiting request.
    Waiter(WaiterId),
}

/// A new grant, shown to checkers before the model adds it.
#[derive(Debug, Clone)]
pub struct GrantSeen {
    /// The resource.
    pub resource: ResourceName,
    /// The new holder.
    pub process: ProcessKey,
    /// The mode.
    pub mode: Mode,
    /// Its token.
    pub token: Token,
    /// Its session.
    pub session: SessionId,
    /// Whether the request accepted a dirty resource.
    pub accept_dirty: bool,
    /// Whether the grant told the caller that the resource is dirty.
    pub dirty_reported: bool,
    /// How it was delivered.
    pub via: Via,
}

/// A lease ending, shown to checkers before the model removes it.
#[derive(Debug, Clone)]
pub struct EndSeen {
    /// The resource.
    pub resource: ResourceName,
    /// The lease as the model knows it.
    pub lease: ModelLease,
    /// How it ended.
    pub kind: EndKind,
    /// Whether the engine said this left the resource dirty.
    pub dirtied_reported: bool,
}

/// An invariant, checked as the simulation runs. Every hook sees the simulator with the model
/// as it was just before the change it is told of.
pub trait Checker {
    /// An acquire was answered (before the model applies the answer).
    fn on_acquire(
        &mut self,
        _sim: &Sim,
        _req: &AcquireRequest,
        _res: &Result<Acquired, AcquireError>,
    ) -> Check {
        Ok(())
    }

    /// A new lease was granted.
    fn on_grant(&mut self, _sim: &Sim, _g: &GrantSeen) -> Check {
        Ok(())
    }

    /// A lease ended.
    fn on_end(&mut self, _sim: &Sim, _e: &EndSeen) -> Check {
        Ok(())
    }

    /// A waiting request was decided.
    fn on_waiter_outcome(
        &mut self,
        _sim: &Sim,
        _w: &ModelWaiter,
        _outcome: &Result<Vec<Grant>, AcquireError>,
    ) -> Check {
        Ok(())
    }

    /// A step is over.
    fn after_step(&mut self, _sim: &Sim) -> Check {
        Ok(())
    }
}

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

    // ---- picking ----

    fn pick_or_spawn(&mut self, h: usize) -> Owner {
        let live: Vec<usize> = (0..self.params.pids)
            .filter(|&i| self.hosts[h].procs[i].is_some())
            .collect();
        let dead: Vec<usize> = (0..self.params.pids)
            .filter(|&i| self.hosts[h].procs[i].is_none())
            .collect();
        if let Some(i) = (!live.is_empty() && (dead.is_empty() || !self.rng.chance(15)))
            .then(|| self.rng.pick(&live))
            && let Some(o) = &self.hosts[h].procs[i]
        {
            return o.clone();
        }
        let i = self.rng.pick(&dead);
        let start = self.next_start;
        self.next_start += 1;
        let mut o = Owner::new(self.hosts[h].id.clone(), 100 + i as u32, start);
        if self.rng.chance(60) {
            o = o.with_label(format!("vm-{}", self.rng.below(3)));
        }
        self.hosts[h].procs[i] = Some(o.clone());
        o
    }

    fn all_leases(&self) -> Vec<(ResourceName, ModelLease)> {
        self.model
            .resources
            .iter()
            .flat_map(|(r, st)| st.leases.iter().map(move |l| (r.clone(), l.clone())))
            .collect()
    }

    fn find_owner(&self, p: &ProcessKey) -> Option<(usize, usize)> {
        self.hosts.iter().enumerate().find_map(|(h, host)| {
            host.procs
                .iter()
                .position(|o| o.as_ref().is_some_and(|o| &o.process == p))
                .map(|i| (h, i))
        })
    }

    // ---- operations ----

    fn op_acquire(&mut self, c: &mut dyn Checker) -> Check {
        // Mostly from a host with a session; sometimes with a session that has expired.
        let with_session: Vec<usize> = (0..self.hosts.len())
            .filter(|&h| self.hosts[h].session.is_some())
            .collect();
        let h = if with_session.is_empty() || self.rng.chance(5) {
            self.rng.below(self.hosts.len())
        } else {
            self.rng.pick(&with_session)
        };
        let stale = !self.hosts[h].old_sessions.is_empty()
            && (self.hosts[h].session.is_none() || self.rng.chance(3));
        let session = if stale {
            let olds = self.hosts[h].old_sessions.clone();
            self.rng.pick(&olds)
        } else if let Some(s) = self.hosts[h].session {
            s
        } else {
            self.note(format!(
                "acquire on {}: no session, skipped",
                self.hosts[h].id
            ));
            return Ok(());
        };
        let owner = self.pick_or_spawn(h);
        let n = (1 + self.rng.below(3)).min(self.names.len());
        let mut pool = self.names.clone();
        let mut items = Vec::new();
        for _ in 0..n {
            let r = pool.remove(self.rng.below(pool.len()));
            let m = if self.rng.chance(self.params.shared_pct) {
                Mode::Shared
            } else {
                Mode::Exclusive
            };
            items.push((r, m));
        }
        let req = AcquireRequest {
            owner: owner.clone(),
            session,
            items,
            accept_dirty: self.rng.chance(self.params.accept_pct),
            wait: self.rng.chance(self.params.wait_pct),
        };
        let res = self.engine.acquire(req.clone(), self.at());
        self.note(format!(
            "acquire {} [{}] session {}{}{} -> ",
            pk(&owner.process),
            items_str(&req.items),
            session,
            if req.wait { " wait" } else { "" },
            if req.accept_dirty {
                " accept-dirty"
            } else {
                ""
            },
        ));
        match &res {
            Ok(Acquired::Granted(gs)) => self.note(format!("granted {}", grants_str(gs))),
            Ok(Acquired::Queued(id)) => self.note(format!("queued w{}", id.0)),
            Err(e) => self.note(err_str(e)),
        }
        c.on_acquire(self, &req, &res)?;
        let mut told = Vec::new();
        match &res {
            Ok(Acquired::Granted(gs)) => {
                let mut items = req.items.clone();
                items.sort();
                self.check_cover(&items, gs)?;
                for g in gs {
                    if g.existing {
                        self.check_existing(&g.resource, &owner.process, g, &BTreeSet::new())?;
                    } else {
                        told.push(Told {
                            seen: GrantSeen {
                                resource: g.resource.clone(),
                                process: owner.process.clone(),
                                mode: g.mode,
                                token: g.token,
                                session,
                                accept_dirty: req.accept_dirty,
                                dirty_reported: g.dirty.is_some(),
                                via: Via::Direct,
                            },
                            used: false,
                        });
                    }
                }
            }
            Ok(Acquired::Queued(id)) => {
                self.stats.queued += 1;
                if !req.wait {
                    return Err(format!(
                        "queued w{} for a request that did not ask to wait",
                        id.0
                    ));
                }
                if self.model.waiters.contains_key(id) {
                    return Err(format!("waiter id w{} handed out twice", id.0));
                }
                let mut items = req.items.clone();
                items.sort();
                self.model.waiters.insert(
                    *id,
                    ModelWaiter {
                        id: *id,
                        owner: owner.clone(),
                        session,
                        items,
                        accept_dirty: req.accept_dirty,
                    },
                );
            }
            Err(AcquireError::Busy(conflict)) => {
                self.stats.busy += 1;
                if conflict.blocked_until.is_some() {
                    self.stats.grace_refusals += 1;
                }
            }
            Err(AcquireError::NeedsCheck { .. }) => self.stats.needs_check += 1,
            Err(_) => {}
        }
        self.absorb(Ctx::Nothing, told, c)
    }

    /// A grant answers exactly the items asked for.
    fn check_cover(&self, items: &[(ResourceName, Mode)], gs: &[Grant]) -> Check {
        let mut got: Vec<(ResourceName, Mode)> =
            gs.iter().map(|g| (g.resource.clone(), g.mode)).collect();
        got.sort();
        if got != items {
            return Err(format!(
                "granted [{}] for a request of [{}]",
                items_str(&got),
                items_str(items)
            ));
        }
        Ok(())
    }

    /// A grant marked `existing` repeats a lease the process holds (or held at some point of
    /// this operation).
    fn check_existing(
        &self,
        r: &ResourceName,
        p: &ProcessKey,
        g: &Grant,
        live_during: &BTreeSet<(ResourceName, ProcessKey, Token)>,
    ) -> Check {
        let held = self
            .model
            .res(r)
            .lease_of(p)
            .is_some_and(|l| l.token == g.token && l.mode == g.mode);
        if held || live_during.contains(&(r.clone(), p.clone(), g.token)) {
            Ok(())
        } else {
            Err(format!(
                "grant of {r} to {} is marked as already held (token {}), but the model has no such lease",
                pk(p),
                g.token
            ))
        }
    }

    fn op_release(&mut self, c: &mut dyn Checker) -> Check {
        let leases = self.all_leases();
        // Exclusive leases someone waits for exclusively: the candidates for a handover.
        let handovers: Vec<(ResourceName, ModelLease)> = leases
            .iter()
            .filter(|(r, l)| {
                l.mode == Mode::Exclusive
                    && self
                        .model
                        .waiters_on(r)
                        .any(|w| w.items.iter().any(|(x, m)| x == r && *m == Mode::Exclusive))
            })
            .cloned()
            .collect();
        let migrate = !handovers.is_empty() && self.rng.chance(30);
        let (r, p, held) = if migrate {
            let (r, l) = self.rng.pick(&handovers);
            (r, l.process.clone(), Some(l))
        } else if leases.is_empty() || self.rng.chance(6) {
            let r = self.rng.pick(&self.names);
            let h = self.rng.below(self.hosts.len());
            let o = self.pick_or_spawn(h);
            let held = self.model.res(&r).lease_of(&o.process).cloned();
            (r, o.process, held)
        } else {
            let (r, l) = self.rng.pick(&leases);
            (r, l.process.clone(), Some(l))
        };
        // Handover targets: waiters for r in exclusive mode.
        let targets: Vec<ModelWaiter> = self
            .model
            .waiters_on(&r)
            .filter(|w| {
                w.items
                    .iter()
                    .any(|(x, m)| x == &r && *m == Mode::Exclusive)
            })
            .cloned()
            .collect();
        let roll = if migrate { 99 } else { self.rng.below(100) };
        let kind = if roll < 50 {
            ReleaseKind::Clean
        } else if roll < 72 {
            ReleaseKind::Dirty {
                note: self.rng.chance(50).then(|| "exit status 1".to_owned()),
            }
        } else if !targets.is_empty() && self.rng.chance(85) {
            let w = self.rng.pick(&targets);
            let label = if self.rng.chance(50) {
                w.owner.label.clone()
            } else {
                None
            };
            ReleaseKind::Handover {
                host: w.owner.process.host.clone(),
                label,
            }
        } else {
            let h = self.rng.below(self.hosts.len());
            ReleaseKind::Handover {
                host: self.hosts[h].id.clone(),
                label: self.rng.chance(30).then(|| "vm-1".to_owned()),
            }
        };
        // What the model expects.
        let expect_target = match &kind {
            ReleaseKind::Handover { host, label } => targets
                .iter()
                .filter(|w| {
                    &w.owner.process.host == host && (label.is_none() || &w.owner.label == label)
                })
                .map(|w| w.id)
                .min(),
            _ => None,
        };
        let req = ReleaseRequest {
            resource: r.clone(),
            process: p.clone(),
            kind: kind.clone(),
        };
        let res = self.engine.release(req, self.at());
        let kind_str = match &kind {
            ReleaseKind::Clean => "clean".to_owned(),
            ReleaseKind::Dirty { .. } => "dirty".to_owned(),
            ReleaseKind::Handover { host, label } => {
                format!(
                    "handover to {host}{}",
                    label.as_ref().map(|l| format!("/{l}")).unwrap_or_default()
                )
            }
        };
        self.note(format!("release {r} by {} {kind_str} -> ", pk(&p)));
        match &res {
            Ok(rel) => self.note(format!(
                "ok (token {}{})",
                rel.ended.token,
                if rel.dirtied { ", dirtied" } else { "" }
            )),
            Err(e) => self.note(format!("{e:?}").chars().take(80).collect::<String>()),
        }
        let ctx = match (&held, &res) {
            (None, Err(ReleaseError::NotHeld { .. })) => Ctx::Nothing,
            (None, _) => {
                return Err(format!(
                    "release of {r} by {} answered {res:?}, but the model says it holds no lease",
                    pk(&p)
                ));
            }
            (Some(l), Ok(rel)) => {
                if rel.ended.token != l.token {
                    return Err(format!(
                        "release of {r} by {} ended token {}, the model's lease has token {}",
                        pk(&p),
                        rel.ended.token,
                        l.token
                    ));
                }
                let (end, to) = match &kind {
                    ReleaseKind::Clean => (EndKind::Clean, None),
                    ReleaseKind::Dirty { .. } => (EndKind::Dirty, None),
                    ReleaseKind::Handover { .. } => {
                        if l.mode != Mode::Exclusive {
                            return Err(format!("a shared lease on {r} was handed over"));
                        }
                        let Some(t) = expect_target else {
                            return Err(format!(
                                "handover of {r} succeeded, but no exclusive waiter matches"
                            ));
                        };
                        self.model.res_mut(&r).reserved_for = Some(t);
                        let to = self.model.waiters.get(&t).map(|w| w.owner.process.clone());
                        (EndKind::Handover, to)
                    }
                };
                Ctx::Release {
                    r: r.clone(),
                    p: p.clone(),
                    kind: end,
                    to,
                }
            }
            (Some(l), Err(ReleaseError::HandoverShared(_))) if l.mode == Mode::Shared => {
                Ctx::Nothing
            }
            (Some(l), Err(ReleaseError::NoWaiter { .. }))
                if l.mode == Mode::Exclusive && expect_target.is_none() =>
            {
                Ctx::Nothing
            }
            (Some(_), Err(e)) => {
                return Err(format!(
                    "release of {r} by {} ({kind_str}) failed: {e}; the model expected it to succeed",
                    pk(&p)
                ));
            }
        };
        self.absorb(ctx, Vec::new(), c)
    }

    fn op_kill(&mut self, c: &mut dyn Checker) -> Check {
        // Prefer a holder; sometimes an idle process, sometimes one already dead.
        let leases = self.all_leases();
        let p = if !leases.is_empty() && self.rng.chance(60) {
            self.rng.pick(&leases).1.process
        } else {
            let h = self.rng.below(self.hosts.len());
            self.pick_or_spawn(h).process
        };
        let expected: BTreeSet<(ResourceName, Token)> = self
            .all_leases()
            .into_iter()
            .filter(|(_, l)| l.process == p)
            .map(|(r, l)| (r, l.token))
            .collect();
        let released = self.engine.end_process(&p, self.at());
        self.note(format!(
            "process {} dies -> {} leases ended",
            pk(&p),
            released.len()
        ));
        let got: BTreeSet<(ResourceName, Token)> = released
            .iter()
            .map(|r| (r.resource.clone(), r.ended.token))
            .collect();
        if got != expected || got.len() != released.len() {
            return Err(format!(
                "end_process({}) ended {got:?}; the model's leases of it were {expected:?}",
                pk(&p)
            ));
        }
        if let Some((h, i)) = self.find_owner(&p) {
            self.hosts[h].procs[i] = None;
        }
        self.absorb(Ctx::Kill(p), Vec::new(), c)
    }

    fn op_force(&mut self, c: &mut dyn Checker) -> Check {
        // Mostly a resource that is held or kept for a handover.
        let held: Vec<ResourceName> = self
            .names
            .iter()
            .filter(|r| {
                let st = self.model.res(r);
                !st.leases.is_empty() || st.reserved_for.is_some()
            })
            .cloned()
            .collect();
        let r = if !held.is_empty() && self.rng.chance(80) {
            self.rng.pick(&held)
        } else {
            self.rng.pick(&self.names)
        };
        let m = self.model.res(&r);
        let expected: BTreeSet<(ProcessKey, Token)> = m
            .leases
            .iter()
            .map(|l| (l.process.clone(), l.token))
            .collect();
        let reserved = m.reserved_for.is_some();
        let res = self
            .engine
            .force_release(&r, "sim: host hung", "root", self.at());
        self.note(format!("force-release {r} -> "));
        match &res {
            Ok(v) => self.note(format!("{} ended", v.len())),
            Err(e) => self.note(format!("{e}")),
        }
        let ctx = match &res {
            Ok(v) => {
                let got: BTreeSet<(ProcessKey, Token)> = v
                    .iter()
                    .map(|x| (x.ended.owner.process.clone(), x.ended.token))
                    .collect();
                if got != expected || got.len() != v.len() || (expected.is_empty() && !reserved) {
                    return Err(format!(
                        "force_release({r}) ended {got:?}; the model's leases were {expected:?} (reserved: {reserved})"
                    ));
                }
                self.model.res_mut(&r).reserved_for = None;
                Ctx::Force(r)
            }
            Err(ReleaseError::Unheld(_) | ReleaseError::Unknown(_))
                if expected.is_empty() && !reserved =>
            {
                Ctx::Nothing
            }
            Err(e) => {
                return Err(format!(
                    "force_release({r}) failed: {e}; the model has leases {expected:?} (reserved: {reserved})"
                ));
            }
        };
        self.absorb(ctx, Vec::new(), c)
    }

    fn op_mark_clean(&mut self, c: &mut dyn Checker) -> Check {
        let dirty: Vec<ResourceName> = self
            .names
            .iter()
            .filter(|r| self.model.res(r).dirty)
            .cloned()
            .collect();
        let r = if !dirty.is_empty() && self.rng.chance(75) {
            self.rng.pick(&dirty)
        } else {
            self.rng.pick(&self.names)
        };
        let res = self.engine.mark_clean(&r, "root", self.at());
        self.note(format!("mark-clean {r} -> "));
        match &res {
            Ok(Some(e)) => self.note(format!("was dirty (token {})", e.token)),
            Ok(None) => self.note("was clean"),
            Err(e) => self.note(format!("{e}")),
        }
        match res {
            Ok(_) => {
                let st = self.model.res_mut(&r);
                st.dirty = false;
                st.dirty_by = None;
                self.absorb(Ctx::MarkClean(r), Vec::new(), c)
            }
            Err(ReleaseError::Unknown(_)) => self.absorb(Ctx::Nothing, Vec::new(), c),
            Err(e) => Err(format!("mark_clean({r}) failed: {e}")),
        }
    }

    fn op_cancel_wait(&mut self, c: &mut dyn Checker) -> Check {
        let ids: Vec<WaiterId> = self.model.waiters.keys().copied().collect();
        let id = if ids.is_empty() || self.rng.chance(10) {
            WaiterId(self.rng.between(1, 50))
        } else {
            self.rng.pick(&ids)
        };
        let waiting = self.model.waiters.contains_key(&id);
        let ok = self.engine.cancel_wait(id, self.at());
        self.note(format!("cancel w{} -> {ok}", id.0));
        if ok != waiting {
            return Err(format!(
                "cancel_wait(w{}) returned {ok}, but the model says it is {}waiting",
                id.0,
                if waiting { "" } else { "not " }
            ));
        }
        if ok {
            self.forget_waiter(id);
        }
        self.absorb(Ctx::Nothing, Vec::new(), c)
    }

    fn op_renew(&mut self, c: &mut dyn Checker) -> Check {
        let h = self.rng.below(self.hosts.len());
        let host = &self.hosts[h];
        let id = match host.session {
            Some(s) if !host.lost && !self.rng.chance(3) => s,
            _ if !host.old_sessions.is_empty() && self.rng.chance(20) => {
                let olds = host.old_sessions.clone();
                self.rng.pick(&olds)
            }
            _ => {
                self.note(format!("{}: no heartbeat", self.hosts[h].id));
                return Ok(());
            }
        };
        let res = self.engine.renew_session(id, self.at());
        self.note(format!(
            "renew {} session {id} -> {res:?}",
            self.hosts[h].id
        ));
        let live = self
            .model
            .sessions
            .get(&id)
            .filter(|s| s.expired_at.is_none() && self.now < s.due())
            .map(|s| s.ttl);
        match (live, res) {
            (Some(ttl), Ok(t)) if t.map(|t| t.0) == ttl.map(|ttl| self.now + ttl) => {
                if let Some(s) = self.model.sessions.get_mut(&id) {
                    s.last_renew = self.now;
                }
            }
            (None, Err(SessionError::NoSession(_))) => {}
            (live, res) => {
                let s = self.model.sessions.get(&id);
                return Err(format!(
                    "renew of session {id} at t={} answered {res:?}; the model's session: {s:?} (live: {})",
                    self.now,
                    live.is_some()
                ));
            }
        }
        self.absorb(Ctx::Nothing, Vec::new(), c)
    }

    fn op_open(&mut self, c: &mut dyn Checker) -> Check {
        let h = self.rng.below(self.hosts.len());
        let host = self.hosts[h].clone();
        if let Some(s) = host.session {
            let res = self.engine.open_session(
                host.id.clone(),
                host.ttl.map(Duration::from_millis),
                self.at(),
            );
            self.note(format!("open session on {} (has {s}) -> {res:?}", host.id));
            match res {
                Err(SessionError::HostInUse { session, .. }) if session == s => {}
                other => {
                    return Err(format!(
                        "open_session on {} with live session {s} answered {other:?}",
                        host.id
                    ));
                }
            }
            return self.absorb(Ctx::Nothing, Vec::new(), c);
        }
        // The host comes back with a new session; sometimes it rebooted, and its processes
        // are gone (they hold nothing: their leases ended with the old session).
        self.open(h)?;
        let reboot = self.rng.chance(50);
        self.note(format!(
            "open session on {} -> {}{}",
            host.id,
            self.hosts[h]
                .session
                .map(|s| s.to_string())
                .unwrap_or_default(),
            if reboot { " (after reboot)" } else { "" }
        ));
        self.absorb(Ctx::Nothing, Vec::new(), c)?;
        if reboot {
            for i in 0..self.params.pids {
                if let Some(o) = self.hosts[h].procs[i].take() {
                    let released = self.engine.end_process(&o.process, self.at());
                    if !released.is_empty() {
                        return Err(format!(
                            "{} held {} leases after its session expired",
                            pk(&o.process),
                            released.len()
                        ));
                    }
                    self.absorb(Ctx::Kill(o.process), Vec::new(), c)?;
                }
            }
        }
        Ok(())
    }

    fn op_lose(&mut self, lose: bool) -> Check {
        let h = self.rng.below(self.hosts.len());
        self.hosts[h].lost = lose;
        self.note(format!(
            "{} {}",
            self.hosts[h].id,
            if lose {
                "stops renewing (lost)"
            } else {
                "renews again"
            }
        ));
        Ok(())
    }

    /// The model learns what a tick now does from a tick of a copy of the engine; the engine
    /// itself stays unticked, and its next operation must do exactly that first.
    fn tick_a_copy(&mut self, c: &mut dyn Checker) -> Check {
        let untouched = self.engine.clone();
        self.implicit = Implicit::Capturing;
        let r = self.op_tick(c);
        self.engine = untouched;
        if !matches!(self.implicit, Implicit::Pending(_)) {
            self.implicit = Implicit::None;
        }
        self.note(" (on a copy)");
        r
    }

    fn op_tick(&mut self, c: &mut dyn Checker) -> Check {
        self.engine.tick(self.at());
        self.note("tick");
        self.absorb(Ctx::Tick, Vec::new(), c)?;
        self.last_tick = self.now;
        // A tick expires every session due by now.
        for (id, s) in &self.model.sessions {
            if s.expired_at.is_none() && s.due() <= self.now {
                return Err(format!(
                    "session {id} of {} was due at t={} (last renewal t={} + ttl {:?}) but survived a tick at t={}",
                    self.hosts[s.host].id,
                    s.due(),
                    s.last_renew,
                    s.ttl,
                    self.now
                ));
            }
        }
        Ok(())
    }

    fn op_restart(&mut self, c: &mut dyn Checker) -> Check {
        // Restore from what a store would hold: the records the engine said changed, through
        // their serialized form. It must be the same as restoring from the engine's state.
        let meta = roundtrip(&self.disk_meta)?;
        let records = self
            .disk
            .iter()
            .map(|(n, s)| Ok((n.clone(), roundtrip(s)?)))
            .collect::<Result<Vec<_>, String>>()?;
        let from_disk = Engine::restore(self.config, meta, records);
        let from_state = Engine::restore(
            self.config,
            self.engine.meta(),
            self.engine
                .resources()
                .map(|(n, s)| (n.clone(), s.clone()))
                .collect(),
        );
        let a = durable(&from_disk)?;
        let b = durable(&from_state)?;
        if a != b {
            return Err(format!(
                "durability: the records the engine reported as changed differ from its state\n  persisted: {}\n  state:     {}",
                serde_json::Value::from(a.1.into_iter().collect::<serde_json::Map<_, _>>()),
                serde_json::Value::from(b.1.into_iter().collect::<serde_json::Map<_, _>>()),
            ));
        }
        self.engine = from_disk;
        self.persist_all();
        self.stats.restarts += 1;
        let dropped = self.model.waiters.len();
        self.model.waiters.clear();
        for st in self.model.resources.values_mut() {
            st.reserved_for = None;
        }
        self.note(format!("restart (dropped {dropped} waiters)"));
        self.absorb(Ctx::Nothing, Vec::new(), c)
    }

    // ---- learning from the engine's output ----

    /// Drains the engine's output, persists what changed, and applies to the model the grants
    /// the simulator was told of and the endings the operation allows, in the order the engine
    /// reports them; then the outcomes of waiting requests.
    fn absorb(&mut self, ctx: Ctx, told: Vec<Told>, c: &mut dyn Checker) -> Check {
        let mut out = self.engine.take_output();
        match std::mem::replace(&mut self.implicit, Implicit::None) {
            Implicit::None => {}
            // A copy's output: what a store would persist is the engine's own, later.
            Implicit::Capturing => self.implicit = Implicit::Pending(out.clone()),
            Implicit::Pending(tick) => {
                let n = tick.events.len();
                let m = tick.waiters.len();
                if out.events.get(..n) != Some(&tick.events[..])
                    || out.waiters.get(..m) != Some(&tick.waiters[..])
                    || !tick.changed.is_subset(&out.changed)
                {
                    return Err(format!(
                        "the operation at t={} did not first do what a tick at its time does (expire the due sessions, end the graces that are over, serve the waiters)\n  a tick: {:?} {:?}\n  the operation: {:?} {:?}",
                        self.now, tick.events, tick.waiters, out.events, out.waiters
                    ));
                }
                // The model has learnt those from the copy.
                out.events.drain(..n);
                out.waiters.drain(..m);
            }
        }
        if !matches!(self.implicit, Implicit::Pending(_)) {
            self.persist(&out.changed, out.meta_changed);
        }
        let mut a = Absorbing {
            told,
            live_during: self
                .all_leases()
                .into_iter()
                .map(|(r, l)| (r, l.process, l.token))
                .collect(),
            ..Absorbing::default()
        };
        self.told_by_waiters(&out.waiters, &mut a)?;
        for ev in &out.events {
            match ev {
                Event::Granted { resource, lease } => {
                    self.on_granted(resource, lease, &mut a, c)?
                }
                Event::Ended {
                    resource,
                    ended,
                    dirtied,
                } => self.on_ended(&ctx, resource, ended, *dirtied, &mut a, c)?,
                Event::SessionExpired { session, host } => {
                    self.on_expired(*session, host, &mut a)?;
                }
                Event::Cleaned { resource, .. } => {
                    if !matches!(&ctx, Ctx::MarkClean(r) if r == resource) {
                        return Err(format!("{resource} was cleaned during {ctx:?}"));
                    }
                }
            }
        }
        if let Some((r, l)) = a.expiring.first() {
            return Err(format!(
                "the lease of {r} by {} ended as session-expired, but no session expired",
                pk(&l.process)
            ));
        }
        if let Some(t) = a.told.iter().find(|t| !t.used) {
            return Err(format!(
                "{} was told it got {} (token {}), but the engine recorded no such grant",
                pk(&t.seen.process),
                t.seen.resource,
                t.seen.token
            ));
        }
        a.live_during.extend(a.granted_now.iter().cloned());
        for (p, g) in &a.existing {
            self.check_existing(&g.resource, p, g, &a.live_during)?;
        }
        self.check_all_ended(&ctx, &a)?;
        self.on_waiter_outcomes(&ctx, &out.waiters, &a, c)
    }

    /// Collects the grants that waiters' owners are told of.
    fn told_by_waiters(&self, outcomes: &[WaiterOutcome], a: &mut Absorbing) -> Check {
        for (id, outcome) in outcomes {
            let Some(w) = self.model.waiters.get(id) else {
                return Err(format!(
                    "the engine decided waiter w{} ({outcome:?}), which the model does not know to be waiting",
                    id.0
                ));
            };
            let Ok(gs) = outcome else { continue };
            self.check_cover(&w.items, gs)?;
            for g in gs {
                if g.existing {
                    a.existing.push((w.owner.process.clone(), g.clone()));
                    continue;
                }
                a.told.push(Told {
                    seen: GrantSeen {
                        resource: g.resource.clone(),
                        process: w.owner.process.clone(),
                        mode: g.mode,
                        token: g.token,
                        session: w.session,
                        accept_dirty: w.accept_dirty,
                        dirty_reported: g.dirty.is_some(),
                        via: Via::Waiter(*id),
                    },
                    used: false,
                });
            }
        }
        Ok(())
    }

    /// A `Granted` event: it must be a grant some owner was told of; the model adds the lease.
    fn on_granted(
        &mut self,
        resource: &ResourceName,
        lease: &Lease,
        a: &mut Absorbing,
        c: &mut dyn Checker,
    ) -> Check {
        let Some(t) = a.told.iter_mut().find(|t| {
            !t.used
                && &t.seen.resource == resource
                && t.seen.token == lease.token
                && t.seen.process == lease.owner.process
        }) else {
            return Err(format!(
                "the engine granted {resource} to {} (token {}) but told nobody",
                pk(&lease.owner.process),
                lease.token
            ));
        };
        t.used = true;
        let g = t.seen.clone();
        if lease.mode != g.mode || lease.session != g.session {
            return Err(format!(
                "lease of {resource} to {} recorded as {:?}/{} but granted as {:?}/{}",
                pk(&g.process),
                lease.mode,
                lease.session,
                g.mode,
                g.session
            ));
        }
        c.on_grant(self, &g)?;
        match g.via {
            Via::Direct => self.stats.direct_grants += 1,
            Via::Waiter(_) => self.stats.waiter_grants += 1,
        }
        if g.dirty_reported {
            self.stats.dirty_grants += 1;
        }
        let st = self.model.res_mut(resource);
        if st.lease_of(&g.process).is_some() {
            return Err(format!(
                "{} was granted {resource} afresh while it already holds it",
                pk(&g.process)
            ));
        }
        st.leases.push(ModelLease {
            process: g.process.clone(),
            mode: g.mode,
            token: g.token,
            session: g.session,
        });
        st.tokens.push(g.token);
        st.reserved_for = None;
        a.granted_now
            .insert((resource.clone(), g.process.clone(), g.token));
        Ok(())
    }

    /// An `Ended` event: it must end a lease the model knows, in a way the operation allows;
    /// the model removes the lease and applies its own dirty rule.
    fn on_ended(
        &mut self,
        ctx: &Ctx,
        resource: &ResourceName,
        ended: &Ended,
        dirtied: bool,
        a: &mut Absorbing,
        c: &mut dyn Checker,
    ) -> Check {
        let process = &ended.owner.process;
        let Some(lease) = self.model.res(resource).lease_of(process).cloned() else {
            return Err(format!(
                "the engine ended a lease of {resource} by {} that the model does not know",
                pk(process)
            ));
        };
        if lease.token != ended.token || lease.mode != ended.mode {
            return Err(format!(
                "the engine ended {resource} by {} with token {} ({:?}); the model's lease has token {} ({:?})",
                pk(process),
                ended.token,
                ended.mode,
                lease.token,
                lease.mode
            ));
        }
        let kind = EndKind::of(&ended.how);
        let allowed = match ctx {
            Ctx::Release { r, p, kind: k, to } => {
                r == resource
                    && p == process
                    && *k == kind
                    && match &ended.how {
                        EndReason::HandedOver { to: got } => to.as_ref() == Some(got),
                        _ => true,
                    }
            }
            Ctx::Kill(p) => p == process && kind == EndKind::Died,
            Ctx::Force(r) => r == resource && kind == EndKind::Forced,
            Ctx::Tick => kind == EndKind::Expired,
            Ctx::Nothing | Ctx::MarkClean(_) => false,
        };
        if !allowed {
            return Err(format!(
                "the lease of {resource} by {} (token {}) ended as `{}` during an operation that may not end it that way ({ctx:?})",
                pk(process),
                lease.token,
                ended.how.describe()
            ));
        }
        let e = EndSeen {
            resource: resource.clone(),
            lease: lease.clone(),
            kind,
            dirtied_reported: dirtied,
        };
        c.on_end(self, &e)?;
        self.stats.ended[kind as usize] += 1;
        let st = self.model.res_mut(resource);
        st.leases.retain(|l| &l.process != process);
        if lease.mode == Mode::Exclusive && kind.dirties_exclusive() {
            st.dirty = true;
            st.dirty_by = Some((process.clone(), lease.token, kind));
        }
        if kind == EndKind::Expired {
            a.expiring.push((resource.clone(), lease));
        }
        Ok(())
    }

    /// A `SessionExpired` event: never before the session was due; every lease of the session
    /// must have ended just before it; its resources enter their grace period now.
    fn on_expired(&mut self, session: SessionId, host: &HostId, a: &mut Absorbing) -> Check {
        let Some(s) = self.model.sessions.get(&session).cloned() else {
            return Err(format!("the engine expired unknown session {session}"));
        };
        if s.expired_at.is_some() {
            return Err(format!("session {session} expired twice"));
        }
        if &self.hosts[s.host].id != host {
            return Err(format!("session {session} expired as a session of {host}"));
        }
        if self.now < s.due() {
            return Err(format!(
                "session {session} of {host} expired at t={}, before it was due at t={} (last renewal t={} + ttl {:?})",
                self.now,
                s.due(),
                s.last_renew,
                s.ttl
            ));
        }
        if let Some((r, l)) = a.expiring.iter().find(|(_, l)| l.session != session) {
            return Err(format!(
                "the lease of {r} by {} (session {}) ended as session-expired with session {session}",
                pk(&l.process),
                l.session
            ));
        }
        if let Some((r, l)) = self
            .all_leases()
            .into_iter()
            .find(|(_, l)| l.session == session)
        {
            return Err(format!(
                "session {session} expired, but the lease of {r} by {} (token {}) lives on",
                pk(&l.process),
                l.token
            ));
        }
        let until = self.now + self.params.grace;
        for (r, _) in a.expiring.drain(..) {
            let st = self.model.res_mut(&r);
            if st.blocked_until.is_none_or(|t| t < until) {
                st.blocked_until = Some(until);
                st.blocked_by = Some((session, self.now));
            }
        }
        if let Some(m) = self.model.sessions.get_mut(&session) {
            m.expired_at = Some(self.now);
        }
        let hs = &mut self.hosts[s.host];
        if hs.session == Some(session) {
            hs.session = None;
        }
        hs.old_sessions.push(session);
        self.stats.expiries += 1;
        self.note(format!("; session {session} of {host} expired"));
        a.expired.push(session);
        Ok(())
    }

    /// The operation ended everything it had to: the released lease, every lease of a dead
    /// process, every lease of a force-released resource.
    fn check_all_ended(&self, ctx: &Ctx, a: &Absorbing) -> Check {
        let left = self.all_leases().into_iter().find(|(r, l)| {
            // A lease granted later in the same operation (a waiter of the same process served
            // by the release) is a new lease.
            let fresh = a
                .granted_now
                .contains(&(r.clone(), l.process.clone(), l.token));
            !fresh
                && match ctx {
                    Ctx::Release { r: rr, p, .. } => r == rr && &l.process == p,
                    Ctx::Kill(p) => &l.process == p,
                    Ctx::Force(rr) => r == rr,
                    _ => false,
                }
        });
        match left {
            Some((r, l)) => Err(format!(
                "after {ctx:?}, the lease of {r} by {} (token {}) is still live in the model: the engine did not end it",
                pk(&l.process),
                l.token
            )),
            None => Ok(()),
        }
    }

    /// The outcomes of waiting requests: each was waiting; a cancellation has a cause; the
    /// requests of a dead process or an expired session are all gone.
    fn on_waiter_outcomes(
        &mut self,
        ctx: &Ctx,
        outcomes: &[WaiterOutcome],
        a: &Absorbing,
        c: &mut dyn Checker,
    ) -> Check {
        for (id, outcome) in outcomes {
            let what = match outcome {
                Ok(gs) => format!("granted {}", grants_str(gs)),
                Err(e) => err_str(e),
            };
            self.note(format!("; w{}: {what}", id.0));
            let Some(w) = self.model.waiters.get(id).cloned() else {
                return Err(format!("waiter w{} decided twice", id.0));
            };
            c.on_waiter_outcome(self, &w, outcome)?;
            match outcome {
                Err(AcquireError::Cancelled(_)) => {
                    let justified = matches!(ctx, Ctx::Kill(p) if p == &w.owner.process)
                        || a.expired.contains(&w.session);
                    if !justified {
                        return Err(format!(
                            "waiter w{} of {} was cancelled, though neither its process ended nor its session expired",
                            id.0,
                            pk(&w.owner.process)
                        ));
                    }
                }
                Err(AcquireError::NeedsCheck { .. }) => self.stats.needs_check += 1,
                Err(AcquireError::ModeConflict { .. }) | Ok(_) => {}
                Err(e) => {
                    return Err(format!(
                        "waiter w{} of {} failed with {e}",
                        id.0,
                        pk(&w.owner.process)
                    ));
                }
            }
            self.forget_waiter(*id);
        }
        if let Some(w) = self.model.waiters.values().find(|w| {
            a.expired.contains(&w.session) || matches!(ctx, Ctx::Kill(p) if p == &w.owner.process)
        }) {
            return Err(format!(
                "waiter w{} of {} still waits after its process ended or its session expired",
                w.id.0,
                pk(&w.owner.process)
            ));
        }
        Ok(())
    }

    /// Removes a waiter from the model, with the handover kept for it.
    fn forget_waiter(&mut self, id: WaiterId) {
        self.model.waiters.remove(&id);
        for st in self.model.resources.values_mut() {
            if st.reserved_for == Some(id) {
                st.reserved_for = None;
            }
        }
    }
}

/// One waiting request's outcome, as [`leasehold_core::Output::waiters`] lists it.
type WaiterOutcome = (WaiterId, Result<Vec<Grant>, AcquireError>);

/// What [`Sim::absorb`] gathers while it walks one operation's output.
#[derive(Default)]
struct Absorbing {
    /// Grants owners were told of; each must match one `Granted` event.
    told: Vec<Told>,
    /// Grants to waiters that repeat a lease they already held: (holder, grant).
    existing: Vec<(ProcessKey, Grant)>,
    /// Leases live at some point of the operation.
    live_during: BTreeSet<(ResourceName, ProcessKey, Token)>,
    /// Leases granted during the operation.
    granted_now: BTreeSet<(ResourceName, ProcessKey, Token)>,
    /// Leases ended as session-expired, before their `SessionExpired` event.
    expiring: Vec<(ResourceName, ModelLease)>,
    /// Sessions expired during the operation.
    expired: Vec<SessionId>,
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
