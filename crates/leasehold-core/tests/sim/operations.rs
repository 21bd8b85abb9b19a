//! The operations the simulator runs on the engine, each answered and checked against the
//! model, and how it picks their targets.

use std::collections::BTreeSet;

use leasehold_core::{
    AcquireError, AcquireRequest, Acquired, Engine, Mode, Owner, ProcessKey, ReleaseError,
    ReleaseKind, ReleaseRequest, ResourceName, SessionError, Token, WaiterId,
};

use super::*;

impl Sim {
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

    pub(super) fn all_leases(&self) -> Vec<(ResourceName, ModelLease)> {
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

    pub(super) fn op_acquire(&mut self, c: &mut dyn Checker) -> Check {
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
            expect_tokens: Vec::new(),
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
                if conflict.blocked_for.is_some() {
                    self.stats.grace_refusals += 1;
                }
            }
            Err(AcquireError::NeedsCheck { .. }) => self.stats.needs_check += 1,
            Err(_) => {}
        }
        self.absorb(Ctx::Nothing, told, c)
    }

    pub(super) fn op_release(&mut self, c: &mut dyn Checker) -> Check {
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
            owner_id: None,
            token: None,
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

    pub(super) fn op_kill(&mut self, c: &mut dyn Checker) -> Check {
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

    pub(super) fn op_force(&mut self, c: &mut dyn Checker) -> Check {
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

    pub(super) fn op_mark_clean(&mut self, c: &mut dyn Checker) -> Check {
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

    pub(super) fn op_cancel_wait(&mut self, c: &mut dyn Checker) -> Check {
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

    pub(super) fn op_renew(&mut self, c: &mut dyn Checker) -> Check {
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

    pub(super) fn op_open(&mut self, c: &mut dyn Checker) -> Check {
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

    pub(super) fn op_lose(&mut self, lose: bool) -> Check {
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
    pub(super) fn tick_a_copy(&mut self, c: &mut dyn Checker) -> Check {
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

    pub(super) fn op_tick(&mut self, c: &mut dyn Checker) -> Check {
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

    pub(super) fn op_restart(&mut self, c: &mut dyn Checker) -> Check {
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
}
