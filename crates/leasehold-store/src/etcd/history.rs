//! Keeping etcd's history bounded, and watching its space.
//!
//! etcd keeps every revision of every key until someone compacts, and refuses every write once
//! its database reaches its quota (the NOSPACE alarm). Each agent runs [`maintain`]:
//!
//! - **Compaction.** Every `compact_every`, the history older than `keep` is compacted. The
//!   round is claimed with a transaction on `P compaction` (compare its mod revision, write
//!   who compacts to where), so one agent per round compacts, whichever it is. The target is
//!   a revision this agent saw `keep` ago: every watcher that is less than `keep` behind
//!   still reads its history; one further behind finds its revision compacted and reads
//!   everything again (the store already does). If the history is compacted past leasehold's
//!   last compaction by someone else (etcd's `--auto-compaction-*`, an operator), leasehold
//!   leaves compaction to them for [`OTHERS_QUIET`] after it last sees them do it.
//!   The history is also compacted as soon as it holds more revisions than [`HISTORY_SHARE`]
//!   of the quota can take (at [`BYTES_PER_REVISION`] a commit, or [`WRITTEN_FACTOR`] times
//!   the keys and values this agent's transactions write per revision, whichever is more),
//!   whatever `keep` says: at a high rate of grants, `keep` worth of history would fill a
//!   small quota (measured: 5 minutes at 200 grants a second fill 32 MiB), and a count of
//!   revisions at 1 KiB each let records of 3 KiB fill a 4 MiB quota. A watcher further
//!   behind than that reads everything again, as above.
//! - **Defragmentation.** Compaction frees pages inside etcd's database file, which etcd
//!   reuses, but only a defragmentation shrinks the file, and the quota counts the file: the
//!   file keeps the size of the most history it ever held (measured, etcd 3.4: with
//!   compaction every second or two, the file settles at the peak of what is in use, which at
//!   1,000 writes a second is several MiB), so a burst of churn, or compaction falling behind
//!   for a while, leaves it large. When a member's file exceeds
//!   [`DEFRAG_AT`] of the quota and a [`DEFRAG_FREE`] share of it is free, the agent that won
//!   the round defragments that member, one member at a time, at most one every
//!   [`DEFRAG_GAP`] in the cluster (claimed in `P compaction` too), or sooner while the
//!   history grows fast: at most one every [`defrag_gap`], the time the history takes to
//!   write the quota's share between [`DEFRAG_AT`] and [`WARN_AT`], from [`DEFRAG_GAP_MIN`]
//!   to [`DEFRAG_GAP`] (a release build's churn, 1,000-1,300 revisions a second, writes a
//!   4 MiB quota's quarter in under a second: a file defragmented every 10 s grew past
//!   three quarters of it between two). A member being
//!   defragmented answers nothing for a moment; a leader would hold up every session's
//!   renewal (followers forward them to it), so the leader first hands its leadership to
//!   another member. The agent defragments only the members it is configured with
//!   (`--etcd-endpoints`); `--etcd-defrag off` turns it off.
//! - **Forgetting.** The agent that won the round deletes resource records that are free,
//!   clean, unreserved, without waiters or grace, and unchanged for `forget_after`, each with
//!   a transaction comparing its mod revision, so a record that changed meanwhile stays.
//!   Tokens still grow: they are above the store's revision, which never goes back.
//! - **Looks.** The agent reads a member's status every second, and sooner as its own
//!   transactions reach a revision: where the history passes its cap, or where the file may
//!   have grown by [`LOOK_SHARE`] of the quota at the most it grew per revision of late
//!   (`file_cost`: etcd reuses the pages a write frees only once the reads that began before
//!   it end, so in a fresh etcd's first second a release build's churn grew the file by
//!   3 KB a revision, and the file reached 72-75 % of a 4 MiB quota before the first round
//!   looked). A look that finds the file past [`DEFRAG_AT`] with [`DEFRAG_FREE`] of it free
//!   defragments, if the claim allows, without waiting for a round.
//! - **Space.** The database size, the quota and the compacted revision are published for
//!   `leasehold status`; a warning is logged from [`WARN_AT`] of the quota on, and the NOSPACE
//!   alarm is logged with what to run.

use std::collections::{BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use leasehold_core::HostId;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{info, warn};

use super::client::{Etcd, EtcdCode, EtcdError, MemberStatus, Txn, prefix_end};
use super::keys::{KeyKind, Keys, Record};

/// How many keys of the records' range the forget pass reads at a time.
pub const FORGET_PAGE: i64 = 1000;

/// The share of the quota from which a warning is logged.
pub const WARN_AT: f64 = 0.75;

/// How long leasehold leaves compaction alone after seeing someone else compact.
pub const OTHERS_QUIET: Duration = Duration::from_secs(3600);

/// The share of the quota the history may take before it is compacted, however young.
pub const HISTORY_SHARE: f64 = 0.25;

/// What one revision of leasehold's churn costs in etcd's database, bytes (measured: about
/// 850 with no compaction; rounded up).
pub const BYTES_PER_REVISION: u64 = 1024;

/// What a revision costs in etcd's database for each byte of keys and values written at it
/// (measured, etcd 3.4, no compaction: 300-byte values took 450 bytes a revision, 4 KiB
/// values 6.2 KiB; rounded up): the bound when records are larger than the churn's.
pub const WRITTEN_FACTOR: f64 = 2.0;

/// The share of the quota the database file may grow by between two looks at its size
/// while this agent writes: a quarter of the room between [`DEFRAG_AT`] and [`WARN_AT`], so
/// a file that passes the one is seen, and defragmented, well before it reaches the other.
pub const LOOK_SHARE: f64 = (WARN_AT - DEFRAG_AT) / 4.0;

/// The fewest revisions between two looks that this agent's own writes bring about.
pub const LOOK_MIN_REVISIONS: i64 = 16;

/// The share of the quota from which a member's file is defragmented (when enough is free).
pub const DEFRAG_AT: f64 = 0.5;

/// The share of a member's file that must be free for a defragmentation to be worth it.
pub const DEFRAG_FREE: f64 = 0.25;

/// The least time between two defragmentations in the cluster, by any agent, while the
/// history grows slowly (see [`defrag_gap`]).
pub const DEFRAG_GAP: Duration = Duration::from_secs(10);

/// The least time between two defragmentations in the cluster however fast the history
/// grows (see [`defrag_gap`]): a member being defragmented answers nothing meanwhile.
pub const DEFRAG_GAP_MIN: Duration = Duration::from_secs(1);

/// The least time between two defragmentations when the history grows by `bytes_per_sec`:
/// the time it takes to write the quota's share between [`DEFRAG_AT`] (where a file is
/// defragmented) and [`WARN_AT`] (where the agents warn), so a file defragmented at the one
/// cannot outgrow the other before the next may start, however fast the churn; within
/// [`DEFRAG_GAP_MIN`] and [`DEFRAG_GAP`].
pub fn defrag_gap(quota: u64, bytes_per_sec: f64) -> Duration {
    let room = quota as f64 * (WARN_AT - DEFRAG_AT);
    let fill = if bytes_per_sec > 0.0 {
        Duration::try_from_secs_f64(room / bytes_per_sec).unwrap_or(DEFRAG_GAP)
    } else {
        DEFRAG_GAP
    };
    fill.clamp(DEFRAG_GAP_MIN, DEFRAG_GAP)
}

/// How long a defragmentation may take before another agent may start one (the agent that
/// started it may have died).
const DEFRAG_STUCK: Duration = Duration::from_secs(600);

/// etcd's default quota (`--quota-backend-bytes` unset).
pub const DEFAULT_QUOTA: u64 = 2 << 30;

/// What an operator runs when etcd is out of space.
pub const NOSPACE_REMEDY: &str = "etcd is out of space: its NOSPACE alarm is raised and it refuses \
every write. Run `etcdctl compact REV` (REV: the revision `etcdctl endpoint status -w json` shows), \
then `etcdctl defrag` on every member, then `etcdctl alarm disarm`. Holders keep their leases while \
their host sessions renew; leasehold carries on by itself once the alarm is cleared";

/// How the agents keep etcd's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryOptions {
    /// How often the history is compacted; `None`: never (etcd's own auto-compaction, or an
    /// operator, does it).
    pub compact_every: Option<Duration>,
    /// How much history is kept behind the present.
    pub keep: Duration,
    /// Free, clean records unchanged this long are deleted; `None`: kept forever.
    pub forget_after: Option<Duration>,
    /// etcd's `--quota-backend-bytes`, for the warning when etcd does not tell it.
    pub quota: u64,
    /// Whether the agents defragment members whose file is mostly free pages.
    pub defrag: bool,
}

impl Default for HistoryOptions {
    fn default() -> HistoryOptions {
        HistoryOptions {
            compact_every: Some(Duration::from_secs(60)),
            keep: Duration::from_secs(300),
            forget_after: Some(Duration::from_secs(3600)),
            quota: DEFAULT_QUOTA,
            defrag: true,
        }
    }
}

/// What the agent last learned of etcd's space and history.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EtcdHealth {
    /// The database file's size, bytes (0: not known yet).
    pub db_size: u64,
    /// The quota, bytes: etcd's when it tells, else the configured one.
    pub quota: u64,
    /// The revision up to which the history is compacted (0: none seen).
    pub compacted: i64,
    /// The store's revision.
    pub revision: i64,
    /// Whether the NOSPACE alarm is raised.
    pub nospace: bool,
    /// Who compacts: "leasehold", or a note that someone else does.
    pub compactor: String,
    /// Records forgotten by this agent since it started.
    pub forgotten: u64,
}

impl EtcdHealth {
    /// What an operator should do now, if anything.
    pub fn warning(&self) -> Option<String> {
        if self.nospace {
            return Some(NOSPACE_REMEDY.to_owned());
        }
        (self.used() >= WARN_AT).then(|| {
            format!(
                "etcd's database is at {:.0}% of its quota; compact (`etcdctl compact`), \
                 defragment (`etcdctl defrag`), or raise --quota-backend-bytes and --etcd-quota \
                 before etcd refuses writes",
                self.used() * 100.0
            )
        })
    }

    /// The share of the quota in use (0 when unknown).
    pub fn used(&self) -> f64 {
        if self.quota == 0 {
            0.0
        } else {
            self.db_size as f64 / self.quota as f64
        }
    }
}

/// The claim of a compaction round, in `P compaction`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Claim {
    revision: i64,
    host: HostId,
    at_ms: u64,
    /// When the last defragmentation started and ended (0: not yet), carried from round to
    /// round.
    #[serde(default)]
    defrag_start_ms: u64,
    #[serde(default)]
    defrag_end_ms: u64,
}

impl Claim {
    /// Whether a defragmentation may start now: none runs, and the last ended `gap` ago or
    /// more.
    fn defrag_allowed(&self, now: u64, gap: Duration) -> bool {
        if self.defrag_end_ms >= self.defrag_start_ms {
            now.saturating_sub(self.defrag_end_ms) >= gap.as_millis() as u64
        } else {
            now.saturating_sub(self.defrag_start_ms) >= DEFRAG_STUCK.as_millis() as u64
        }
    }

    /// When one is not allowed now, how long until it is worth asking again: the rest of the
    /// `gap`, or [`DEFRAG_GAP_MIN`] while one runs (it may end any moment).
    fn defrag_retry_in(&self, now: u64, gap: Duration) -> Duration {
        if self.defrag_end_ms >= self.defrag_start_ms {
            let since = now.saturating_sub(self.defrag_end_ms);
            Duration::from_millis((gap.as_millis() as u64).saturating_sub(since))
        } else {
            DEFRAG_GAP_MIN
        }
    }
}

/// One member, as its own connection: its status, and defragmentation (which takes longer
/// than an ordinary call).
pub(super) struct Member {
    /// Its endpoint, for the logs.
    pub endpoint: String,
    /// A connection to it alone, with the ordinary timeout.
    pub etcd: Etcd,
    /// A connection to it alone, with [`DEFRAG_TIMEOUT`].
    pub slow: Etcd,
}

/// A connection to each of `endpoints` alone (a malformed one is left out: the store's
/// connection refused it already).
pub(super) fn members(
    endpoints: &[String],
    timeout: Duration,
    security: &super::client::EtcdSecurity,
) -> Vec<Member> {
    endpoints
        .iter()
        .filter_map(|e| {
            let one = std::slice::from_ref(e);
            Some(Member {
                endpoint: e.clone(),
                etcd: Etcd::connect_with(one, timeout, security).ok()?,
                slow: Etcd::connect_with(one, DEFRAG_TIMEOUT, security).ok()?,
            })
        })
        .collect()
}

/// How long a defragmentation is waited for.
pub const DEFRAG_TIMEOUT: Duration = Duration::from_secs(120);

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The key of the compaction claim.
pub fn compaction_key(keys: &Keys) -> Vec<u8> {
    format!("{}compaction", keys.prefix()).into_bytes()
}

/// One agent's history keeper.
struct Keeper {
    etcd: Etcd,
    members: Vec<Member>,
    keys: Keys,
    host: HostId,
    opts: HistoryOptions,
    health: watch::Sender<EtcdHealth>,
    /// Revisions and database file sizes seen, oldest first.
    samples: VecDeque<(Instant, i64, u64)>,
    /// The part of the database file in use at the last look, bytes.
    in_use: u64,
    /// Not before when a look may try a defragmentation again outside a round (see
    /// [`Keeper::defrag_due`]).
    defrag_retry: Option<Instant>,
    /// The compacted revision last seen, and when someone else last moved it.
    seen_compacted: i64,
    others_at: Option<Instant>,
    last_round: Option<Instant>,
    warned_full: bool,
    /// Whether the refusal of compaction for want of rights was logged.
    warned_rights: bool,
    /// Whether the refusal of defragmentation for want of rights was logged.
    warned_defrag_rights: bool,
}

/// Runs the history keeper until the task is aborted.
pub(super) async fn maintain(
    etcd: Etcd,
    members: Vec<Member>,
    keys: Keys,
    host: HostId,
    opts: HistoryOptions,
    health: watch::Sender<EtcdHealth>,
) {
    // Space is checked every second: at a high rate the history passes its share of a small
    // quota within seconds.
    let check = opts
        .compact_every
        .unwrap_or(Duration::from_secs(1))
        .min(Duration::from_secs(1));
    let mut k = Keeper {
        etcd,
        members,
        keys,
        host,
        opts,
        health,
        samples: VecDeque::new(),
        in_use: 0,
        defrag_retry: None,
        seen_compacted: 0,
        others_at: None,
        last_round: None,
        warned_full: false,
        warned_rights: false,
        warned_defrag_rights: false,
    };
    // A tick every `check` from the start of the last, not `check` after a round ended: at a
    // high rate, every second of delay is history kept. And sooner when this host's own
    // commits reach the revision at which the history would pass its cap, or would grow the
    // file by [`LOOK_SHARE`] of the quota: at a high rate, a second of history can be more
    // than a small quota's share (a release build's churn filled a 4 MiB quota within
    // seconds, between ticks; then, with compaction keeping up, its file still grew to 75 %
    // of it within the first second, before a tick saw it past half and defragmented).
    let mut tick = tokio::time::interval(check);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = k.etcd.revision_reached() => {}
        }
        k.check_space().await;
        if let Some(every) = k.opts.compact_every
            && (k.last_round.is_none_or(|t| t.elapsed() >= every) || k.history_full())
        {
            k.last_round = Some(Instant::now());
            if let Err(e) = k.round(every).await {
                if e.is_nospace() {
                    // Said once when the alarm was seen; compaction still runs each round.
                    tracing::debug!("etcd history: the round's claim was refused: NOSPACE");
                } else if e.misconfigured() {
                    // The etcd user may not compact (some etcd versions keep compaction to
                    // root): said once; leases are unaffected.
                    if !k.warned_rights {
                        k.warned_rights = true;
                        warn!(error = %e, "etcd history: this agent's etcd user may not compact etcd's history; grant it the rights, or set --etcd-compact-every off and let etcd's --auto-compaction-* compact");
                    } else {
                        tracing::debug!(error = %e, "etcd history: compaction refused again");
                    }
                } else {
                    warn!(error = %e, "etcd history: this round failed; trying again next round");
                }
            }
        } else if k.defrag_due()
            && let Err(e) = k.defrag_soon().await
        {
            tracing::debug!(error = %e, "etcd history: no defragmentation at this look");
        }
        k.etcd.wake_at_revision(k.next_look());
    }
}

impl Keeper {
    /// Reads the database size and alarms, samples the revision, and warns.
    async fn check_space(&mut self) {
        let s = match self.etcd.status().await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "etcd status not available");
                return;
            }
        };
        let now = Instant::now();
        self.samples
            .push_back((now, s.revision, s.db_size.max(0) as u64));
        self.in_use = s.db_size_in_use.max(0) as u64;
        let horizon = self
            .opts
            .keep
            .max(self.opts.forget_after.unwrap_or_default())
            + Duration::from_secs(60);
        while self
            .samples
            .front()
            .is_some_and(|(t, _, _)| now.duration_since(*t) > horizon)
        {
            self.samples.pop_front();
        }
        let was_nospace = self.health.borrow().nospace;
        let quota = if s.quota > 0 {
            s.quota as u64
        } else {
            self.opts.quota
        };
        self.health.send_modify(|h| {
            h.db_size = s.db_size.max(0) as u64;
            h.quota = quota;
            h.revision = s.revision;
            h.nospace = s.nospace;
        });
        let h = self.health.borrow().clone();
        if s.nospace && !was_nospace {
            warn!(db_size = h.db_size, quota, "{NOSPACE_REMEDY}");
        } else if !s.nospace && was_nospace {
            info!(
                db_size = h.db_size,
                "etcd's NOSPACE alarm is cleared; writes resume"
            );
        }
        if h.used() >= WARN_AT && !self.warned_full {
            self.warned_full = true;
            if let Some(w) = h.warning() {
                warn!(db_size = h.db_size, quota, "{w}");
            }
        } else if h.used() < WARN_AT * 0.9 {
            self.warned_full = false;
        }
    }

    /// What a revision of history costs in etcd's database, bytes: [`BYTES_PER_REVISION`]
    /// per commit, at as many commits per revision as this agent's batches have written of
    /// late (the store sends commits that wait together as one transaction), or
    /// [`WRITTEN_FACTOR`] times the keys and values its transactions wrote per revision of
    /// late (records with many holders are larger than the churn's), whichever is more.
    fn revision_cost(&self) -> f64 {
        let by_commits = BYTES_PER_REVISION as f64 * self.etcd.commits_per_revision();
        by_commits.max(WRITTEN_FACTOR * self.etcd.bytes_per_revision())
    }

    /// The most revisions the history may hold: [`HISTORY_SHARE`] of the quota, at
    /// [`revision_cost`](Self::revision_cost) each.
    fn history_cap(&self) -> i64 {
        let quota = self.health.borrow().quota.max(1);
        ((quota as f64 * HISTORY_SHARE / self.revision_cost()) as u64).max(100) as i64
    }

    /// How much the database file grows per revision, bytes: the most it grew between two
    /// looks [`LOOK_MIN_REVISIONS`] or more apart over the last [`DEFRAG_GAP`], and at least
    /// [`revision_cost`](Self::revision_cost). The file can grow faster than the history
    /// held: etcd's database reuses the pages a write frees only once the reads that began
    /// before it end (measured, release build's churn on a fresh etcd: 3 KB of file a
    /// revision in the first second, 1.8 KB of it in use).
    fn file_cost(&self) -> f64 {
        let Some(&(last_at, _, _)) = self.samples.back() else {
            return self.revision_cost();
        };
        let recent = self
            .samples
            .iter()
            .skip_while(|(t, _, _)| last_at.duration_since(*t) > DEFRAG_GAP);
        let grown = recent
            .clone()
            .zip(recent.skip(1))
            .filter(|((_, r0, _), (_, r1, _))| r1 - r0 >= LOOK_MIN_REVISIONS)
            .map(|((_, r0, d0), (_, r1, d1))| d1.saturating_sub(*d0) as f64 / (r1 - r0) as f64)
            .fold(0.0, f64::max);
        grown.max(self.revision_cost())
    }

    /// Whether the history holds more than [`history_cap`](Self::history_cap) revisions
    /// (and no one else compacts).
    fn history_full(&self) -> bool {
        let h = self.health.borrow();
        self.others_at.is_none_or(|t| t.elapsed() >= OTHERS_QUIET)
            && h.revision - self.seen_compacted > self.history_cap()
    }

    /// The revision at which this agent's own commits should wake it before its next tick:
    /// where the history passes its cap, or sooner where the file may have grown by
    /// [`LOOK_SHARE`] of the quota (at [`file_cost`](Self::file_cost) a revision, at least
    /// [`LOOK_MIN_REVISIONS`] ahead: a round that could not compact does not make every
    /// commit wake it); never while leasehold does not compact.
    fn next_look(&self) -> i64 {
        if self.opts.compact_every.is_none()
            || self.others_at.is_some_and(|t| t.elapsed() < OTHERS_QUIET)
        {
            return i64::MAX;
        }
        let (quota, revision) = {
            let h = self.health.borrow();
            (h.quota.max(1), h.revision)
        };
        let step = ((quota as f64 * LOOK_SHARE / self.file_cost()) as i64).max(LOOK_MIN_REVISIONS);
        let at_cap = self.seen_compacted + self.history_cap();
        if at_cap > revision {
            at_cap
                .max(revision + LOOK_MIN_REVISIONS)
                .min(revision + step)
        } else {
            revision + step
        }
    }

    /// Whether this look should try to defragment outside a round: leasehold compacts,
    /// defragmentation is on, the file is past [`DEFRAG_AT`] of the quota with
    /// [`DEFRAG_FREE`] of it free (as the member that answered the look tells), and no
    /// defragmentation was found not allowed until later.
    fn defrag_due(&self) -> bool {
        let h = self.health.borrow();
        self.opts.defrag
            && self.opts.compact_every.is_some()
            && h.used() >= DEFRAG_AT
            && h.db_size.saturating_sub(self.in_use) as f64 >= h.db_size as f64 * DEFRAG_FREE
            && self.defrag_retry.is_none_or(|t| Instant::now() >= t)
    }

    /// Defragments a member at a look between rounds, if the claim of the last round allows
    /// it now (no round yet: the first defragments), and not within [`DEFRAG_GAP_MIN`] of
    /// that round: the members apply its compaction one after another, and one seen with its
    /// pages freed before the others would be defragmented out of turn (a leader before its
    /// followers, seen in `agents_defragment_one_member_at_a_time_and_fence_nobody`). If
    /// none was started, the looks leave it for [`DEFRAG_GAP_MIN`] at least, or until the
    /// claim allows it.
    async fn defrag_soon(&mut self) -> Result<(), EtcdError> {
        let key = compaction_key(&self.keys);
        let (kvs, _) = self.etcd.range(key, Vec::new(), 0).await?;
        let Some(kv) = kvs.first() else {
            return Ok(());
        };
        let Ok(claim) = serde_json::from_slice::<Claim>(&kv.value) else {
            return Ok(());
        };
        let since = Duration::from_millis(now_ms().saturating_sub(claim.at_ms));
        if since < DEFRAG_GAP_MIN {
            self.defrag_retry = Some(Instant::now() + (DEFRAG_GAP_MIN - since));
            return Ok(());
        }
        if !self.defragment_if_allowed(claim, kv.mod_revision).await? {
            self.defrag_retry
                .get_or_insert(Instant::now() + DEFRAG_GAP_MIN);
        }
        Ok(())
    }

    /// Defragments a member if the claim allows one now; otherwise notes when to ask again.
    /// Whether one was started.
    async fn defragment_if_allowed(
        &mut self,
        claim: Claim,
        claim_rev: i64,
    ) -> Result<bool, EtcdError> {
        let (now, gap) = (now_ms(), self.defrag_gap());
        if !claim.defrag_allowed(now, gap) {
            self.defrag_retry = Some(Instant::now() + claim.defrag_retry_in(now, gap));
            return Ok(false);
        }
        self.defrag_retry = None;
        self.defragment(claim, claim_rev).await
    }

    /// How fast the history grows, bytes a second (at [`revision_cost`](Self::revision_cost)
    /// a revision, as [`history_cap`](Self::history_cap) reckons; not at
    /// [`file_cost`](Self::file_cost): another user's burst of large values would make the
    /// gap between defragmentations its shortest for a while), over the last [`DEFRAG_GAP`]
    /// of samples (0 until there are two).
    fn history_rate(&self) -> f64 {
        let Some(&(last_at, last, _)) = self.samples.back() else {
            return 0.0;
        };
        let Some(&(first_at, first, _)) = self
            .samples
            .iter()
            .find(|(t, _, _)| last_at.duration_since(*t) <= DEFRAG_GAP)
        else {
            return 0.0;
        };
        let secs = last_at.duration_since(first_at).as_secs_f64();
        if secs <= 0.0 {
            return 0.0;
        }
        (last - first).max(0) as f64 * self.revision_cost() / secs
    }

    /// The least time between two defragmentations now ([`defrag_gap`] at
    /// [`history_rate`](Self::history_rate)).
    fn defrag_gap(&self) -> Duration {
        defrag_gap(self.health.borrow().quota, self.history_rate())
    }

    /// The newest revision this agent saw at least `age` ago.
    fn revision_before(&self, age: Duration) -> Option<i64> {
        let now = Instant::now();
        self.samples
            .iter()
            .rev()
            .find(|(t, _, _)| now.duration_since(*t) >= age)
            .map(|(_, r, _)| *r)
    }

    /// One round: claim it, compact, forget.
    async fn round(&mut self, every: Duration) -> Result<(), EtcdError> {
        let key = compaction_key(&self.keys);
        let (kvs, _) = self.etcd.range(key.clone(), Vec::new(), 0).await?;
        let (claim, claim_rev) = match kvs.first() {
            Some(kv) => (
                serde_json::from_slice::<Claim>(&kv.value).ok(),
                kv.mod_revision,
            ),
            None => (None, 0),
        };
        let compacted = self
            .etcd
            .compacted_revision(key.clone(), Duration::from_secs(1))
            .await?;
        let ours = claim.as_ref().map_or(0, |c| c.revision);
        if compacted > ours && compacted != self.seen_compacted {
            if self.others_at.is_none() {
                info!(
                    compacted,
                    "etcd's history is compacted by someone else (etcd's --auto-compaction, or an operator); leasehold leaves compaction to them"
                );
            }
            self.others_at = Some(Instant::now());
        }
        self.seen_compacted = compacted;
        let others = self.others_at.is_some_and(|t| t.elapsed() < OTHERS_QUIET);
        self.health.send_modify(|h| {
            h.compacted = compacted;
            h.compactor = if others {
                "someone else (auto-compaction or an operator); leasehold stands aside".into()
            } else {
                "leasehold".into()
            };
        });
        // Another agent's round, recent enough: nothing to do, unless the history is over
        // its share of the quota already.
        let full = self.history_full();
        if !full
            && claim.as_ref().is_some_and(|c| {
                now_ms().saturating_sub(c.at_ms) < every.as_millis() as u64 * 9 / 10
            })
        {
            return Ok(());
        }
        // What `keep` allows, and at least enough that half the cap is left.
        let revision = self.health.borrow().revision;
        let by_size = revision - self.history_cap() / 2;
        let target = self
            .revision_before(self.opts.keep)
            .map_or(by_size, |t| t.max(by_size))
            .min(revision);
        let target = Some(target).filter(|t| !others && *t > compacted);
        let (defrag_start_ms, defrag_end_ms) = claim
            .as_ref()
            .map_or((0, 0), |c| (c.defrag_start_ms, c.defrag_end_ms));
        let claim = Claim {
            revision: target.unwrap_or(ours).max(ours),
            host: self.host.clone(),
            at_ms: now_ms(),
            defrag_start_ms,
            defrag_end_ms,
        };
        let t = Txn::new().if_mod_revision(key.clone(), claim_rev).put(
            key,
            serde_json::to_vec(&claim).unwrap_or_default(),
            None,
        );
        let won = self.etcd.txn(t).await?;
        if !won.succeeded {
            return Ok(());
        }
        if let Some(target) = target {
            match self.etcd.compact(target).await {
                Ok(()) => {
                    tracing::debug!(revision = target, "compacted etcd's history");
                    self.seen_compacted = target;
                    self.health.send_modify(|h| h.compacted = target);
                }
                Err(e) if e.code() == Some(EtcdCode::Compacted) => {}
                Err(e) => return Err(e),
            }
        }
        self.forget().await?;
        if self.opts.defrag {
            self.defragment_if_allowed(claim, won.revision).await?;
        }
        Ok(())
    }

    /// Defragments one member whose file is mostly free pages, if one is: claimed in
    /// `P compaction` (whose mod revision is `claim_rev`, written by this round) so that one
    /// runs at a time in the cluster. A leader hands its leadership over first. Whether one
    /// was started.
    async fn defragment(&mut self, mut claim: Claim, claim_rev: i64) -> Result<bool, EtcdError> {
        let quota = self.health.borrow().quota as f64;
        // Each member once (two endpoints may reach the same one).
        let mut ids = BTreeSet::new();
        let mut found: Vec<(usize, MemberStatus)> = Vec::new();
        for (i, m) in self.members.iter().enumerate() {
            match m.etcd.status().await {
                Ok(s) if ids.insert(s.member_id) => found.push((i, s)),
                Ok(_) => {}
                Err(e) => tracing::debug!(member = %m.endpoint, error = %e, "no status"),
            }
        }
        let wants = |s: &MemberStatus| {
            let db = s.db_size.max(0) as f64;
            db >= quota * DEFRAG_AT && (s.db_size - s.db_size_in_use) as f64 >= db * DEFRAG_FREE
        };
        // Followers first, then the largest file.
        let Some((i, s)) = found
            .iter()
            .filter(|(_, s)| wants(s))
            .max_by_key(|(_, s)| (s.member_id != s.leader, s.db_size))
            .cloned()
        else {
            return Ok(false);
        };
        let key = compaction_key(&self.keys);
        claim.defrag_start_ms = now_ms();
        let t = Txn::new().if_mod_revision(key.clone(), claim_rev).put(
            key.clone(),
            serde_json::to_vec(&claim).unwrap_or_default(),
            None,
        );
        if !self.etcd.txn(t).await?.succeeded {
            return Ok(false);
        }
        let m = &self.members[i];
        let started = Instant::now();
        let outcome = if s.member_id == s.leader && found.len() > 1 {
            // A leader answering nothing would hold up the renewal of every session.
            let to = found
                .iter()
                .filter(|(_, o)| o.member_id != s.member_id)
                .min_by_key(|(_, o)| o.db_size)
                .map_or(0, |(_, o)| o.member_id);
            match self.hand_over(i, to).await {
                Ok(()) => m.slow.defragment().await,
                Err(e) => Err(e),
            }
        } else {
            m.slow.defragment().await
        };
        let took = started.elapsed();
        match &outcome {
            Ok(()) => {
                let after = m.etcd.status().await.map_or(0, |a| a.db_size);
                info!(
                    member = %m.endpoint,
                    before = s.db_size,
                    in_use = s.db_size_in_use,
                    after,
                    took_ms = took.as_millis() as u64,
                    "defragmented an etcd member: its file was mostly free pages"
                );
            }
            // etcd keeps defragmentation to its root role: said once.
            Err(e) if e.misconfigured() && self.warned_defrag_rights => {
                tracing::debug!(member = %m.endpoint, error = %e, "defragmentation refused again");
            }
            Err(e) if e.misconfigured() => {
                self.warned_defrag_rights = true;
                warn!(
                    member = %m.endpoint,
                    error = %e,
                    "this agent's etcd user may not defragment (etcd keeps it to root): run `etcdctl defrag` as root yourself, or set --etcd-defrag off"
                );
            }
            Err(e) => warn!(
                member = %m.endpoint,
                error = %e,
                "could not defragment an etcd member; another round will try again"
            ),
        }
        self.defrag_ended(claim.defrag_start_ms).await;
        Ok(true)
    }

    /// Asks member `i`, the leader, to hand its leadership to `to`, and waits until it has.
    async fn hand_over(&self, i: usize, to: u64) -> Result<(), EtcdError> {
        let m = &self.members[i];
        m.etcd.move_leader(to).await?;
        for _ in 0..50 {
            let s = m.etcd.status().await?;
            if s.leader != s.member_id && s.leader != 0 {
                info!(
                    member = %m.endpoint,
                    to = format!("{to:x}"),
                    "handed etcd's leadership to another member before defragmenting the leader"
                );
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(EtcdError::no_answer(
            "move leader",
            "the leader still leads 5 s after handing its leadership over",
        ))
    }

    /// Records in `P compaction` that the defragmentation started at `start_ms` ended.
    async fn defrag_ended(&self, start_ms: u64) {
        let key = compaction_key(&self.keys);
        for _ in 0..5 {
            let Ok((kvs, _)) = self.etcd.range(key.clone(), Vec::new(), 0).await else {
                continue;
            };
            let Some(kv) = kvs.first() else { return };
            let Ok(mut c) = serde_json::from_slice::<Claim>(&kv.value) else {
                return;
            };
            if c.defrag_start_ms != start_ms {
                return;
            }
            c.defrag_end_ms = now_ms();
            let t = Txn::new()
                .if_mod_revision(key.clone(), kv.mod_revision)
                .put(
                    key.clone(),
                    serde_json::to_vec(&c).unwrap_or_default(),
                    None,
                );
            if self.etcd.txn(t).await.is_ok_and(|r| r.succeeded) {
                return;
            }
        }
    }

    /// Deletes free, clean records unchanged for `forget_after`, reading the records a page
    /// of [`FORGET_PAGE`] keys at a time, only those unchanged since (etcd leaves out the
    /// rest): a whole prefix in one answer is a large read for etcd and the agent at a
    /// million resources. Each record is deleted by a transaction that compares its mod
    /// revision and that it has no held key, no waiter and no grace, so a record that
    /// changed, or a resource that got a holder, a waiter or a grace meanwhile, stays.
    async fn forget(&mut self) -> Result<(), EtcdError> {
        let Some(after) = self.opts.forget_after else {
            return Ok(());
        };
        let Some(before) = self.revision_before(after) else {
            return Ok(());
        };
        let from = self.keys.resources();
        let end = prefix_end(&from);
        let mut start = from;
        let mut forgotten = 0;
        loop {
            let (kvs, more) = self
                .etcd
                .range_page(start.clone(), end.clone(), FORGET_PAGE, before)
                .await?;
            for kv in &kvs {
                let Some(KeyKind::Resource(r)) = self.keys.parse(&kv.key) else {
                    continue;
                };
                // Damaged records and markers stay: they are refused until an operator acts.
                let Ok(rec) = Record::decode(&kv.value) else {
                    continue;
                };
                if !rec.state.holders().is_empty()
                    || rec.state.dirty().is_some()
                    || rec.reserved_for.is_some()
                    || rec.state.kept_for_resume()
                {
                    continue;
                }
                let waiters = self.keys.waiters(&r);
                let waiters_end = prefix_end(&waiters);
                let t = Txn::new()
                    .if_mod_revision(kv.key.clone(), kv.mod_revision)
                    .if_none_created_after(self.keys.held_of(&r), self.keys.resource_end(&r), 0)
                    .if_none_created_after(waiters, waiters_end, 0)
                    .if_none_created_after(self.keys.grace(&r), Vec::new(), 0)
                    .delete(kv.key.clone());
                if self.etcd.txn(t).await?.succeeded {
                    forgotten += 1;
                }
            }
            match kvs.last() {
                Some(last) if more => {
                    start = last.key.clone();
                    start.push(0);
                }
                _ => break,
            }
        }
        if forgotten > 0 {
            info!(
                forgotten,
                "forgot free, clean resource records unchanged for {}",
                humantime::format_duration(after)
            );
            self.health.send_modify(|h| h.forgotten += forgotten);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// The gap between defragmentations is the time the history takes to write the quota's
    /// share between where a file is defragmented and where the agents warn: 10 s while the
    /// history grows slowly, down to 1 s while it grows fast. A release build's churn on a
    /// 4 MiB quota (1,000-1,300 revisions a second) wrote that share in under a second, and
    /// with the fixed 10 s gap the file grew past 75 % between two defragmentations.
    #[test]
    fn defragmentation_keeps_up_with_the_history() {
        let quota = 4u64 << 20;
        // Idle, or not known yet: the longest gap.
        assert_eq!(defrag_gap(quota, 0.0), DEFRAG_GAP);
        // 10 revisions a second: the quarter of 4 MiB takes 100 s to write.
        assert_eq!(defrag_gap(quota, 10.0 * 1024.0), DEFRAG_GAP);
        // 200 a second: about 5 s.
        let gap = defrag_gap(quota, 200.0 * 1024.0);
        assert!(
            gap > Duration::from_secs(5) && gap < Duration::from_secs(6),
            "{gap:?}"
        );
        // 1,200 a second: under a second, so the shortest gap.
        assert_eq!(defrag_gap(quota, 1200.0 * 1024.0), DEFRAG_GAP_MIN);
        // etcd's default quota: 10 s even at that rate.
        assert_eq!(defrag_gap(DEFAULT_QUOTA, 1200.0 * 1024.0), DEFRAG_GAP);
        // The claim: allowed once the last defragmentation ended the gap ago.
        let claim = Claim {
            revision: 1,
            host: HostId::new("a").unwrap(),
            at_ms: 0,
            defrag_start_ms: 1_000,
            defrag_end_ms: 1_100,
        };
        assert!(!claim.defrag_allowed(2_099, DEFRAG_GAP_MIN));
        assert!(claim.defrag_allowed(2_100, DEFRAG_GAP_MIN));
        assert!(!claim.defrag_allowed(2_100, DEFRAG_GAP));
        // One still running (started, not ended) blocks until it is taken for stuck.
        let running = Claim {
            defrag_end_ms: 900,
            ..claim
        };
        assert!(!running.defrag_allowed(1_000 + 599_999, DEFRAG_GAP_MIN));
        assert!(running.defrag_allowed(1_000 + 600_000, DEFRAG_GAP_MIN));
    }

    /// One agent's own writes of large records (3 KiB a revision, three times what
    /// [`BYTES_PER_REVISION`] reckons), up to 500 revisions a second (a release build's
    /// churn writes 1,000-1,300 smaller ones), three times a 4 MiB quota's worth: the
    /// keeper, with its default compaction (every minute, keeping 5 minutes), compacts and
    /// defragments as the history and the file grow, so etcd never refuses a write and its
    /// file stays below [`WARN_AT`] of the quota. Counted in revisions at
    /// `BYTES_PER_REVISION`, the history was allowed 1,024 such revisions, over 4 MiB in
    /// etcd's database, and etcd raised NOSPACE before any look compacted.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn large_records_stay_below_the_warning() {
        use leasehold_testkit::Etcd as TestEtcd;

        let quota: u64 = 4 << 20;
        let etcd = TestEtcd::start_with(&[&format!("--quota-backend-bytes={quota}")]);
        let endpoints = vec![etcd.endpoint()];
        let client = Etcd::connect(&endpoints, Duration::from_secs(5)).unwrap();
        let prefix = format!("/unit-{}-large/", std::process::id());
        let (health, mut seen) = watch::channel(EtcdHealth::default());
        let keeper = tokio::spawn(maintain(
            client.clone(),
            members(
                &endpoints,
                Duration::from_secs(5),
                &super::super::client::EtcdSecurity::default(),
            ),
            Keys::new(&prefix),
            HostId::new("a").unwrap(),
            HistoryOptions {
                forget_after: None,
                quota,
                ..HistoryOptions::default()
            },
            health,
        ));
        seen.wait_for(|h| h.db_size > 0).await.unwrap();
        // A sampler of etcd's own view, as often as it answers.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sampler = tokio::spawn({
            let stop = std::sync::Arc::clone(&stop);
            let own = Etcd::connect(&endpoints, Duration::from_secs(5)).unwrap();
            async move {
                let mut peak = (0, 0);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Ok(s) = own.status().await {
                        peak = peak.max((s.db_size, s.revision));
                    }
                }
                peak
            }
        });
        let value = vec![b'x'; 3072];
        let writers = 8;
        let each = 3 * quota / 3072 / writers;
        // At most 500 writes a second in all: faster, etcd's file cannot stay this small
        // whatever the keeper does (a write's freed pages are reused only after the reads
        // that began before it end: about 0.2 s of writes at 4 KiB a revision).
        let pace = Duration::from_millis(1000 * writers / 500);
        let tasks: Vec<_> = (0..writers)
            .map(|w| {
                let (client, value, prefix) = (client.clone(), value.clone(), prefix.clone());
                tokio::spawn(async move {
                    let mut pace = tokio::time::interval(pace);
                    for i in 0..each {
                        pace.tick().await;
                        let key = format!("{prefix}res/w{w}-{}", i % 4).into_bytes();
                        let t = Txn::new().put(key, value.clone(), None);
                        if let Err(e) = client.txn(t).await {
                            return Err(format!("write {i} of writer {w}: {e}"));
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        let mut refused = Vec::new();
        for t in tasks {
            if let Err(e) = t.await.unwrap() {
                refused.push(e);
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (peak, at) = sampler.await.unwrap();
        keeper.abort();
        let h = seen.borrow().clone();
        eprintln!(
            "{} revisions of 3 KiB; etcd's file at most {peak} bytes (at revision {at}), \
             compacted to {}; quota {quota}",
            h.revision, h.compacted
        );
        assert!(refused.is_empty(), "etcd refused writes: {refused:?}");
        assert!(
            (peak as u64) < quota * 3 / 4,
            "etcd's file reached {peak} bytes of the quota's {quota}"
        );
    }

    /// A file past half the quota and mostly free pages, which another agent's round left
    /// (it compacted, and defragmented a moment ago, so the gap holds this one back): a look
    /// defragments it once the gap allows, not the next round a minute later.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_look_defragments_once_the_gap_allows_without_waiting_for_a_round() {
        use leasehold_testkit::Etcd as TestEtcd;

        let quota: u64 = 4 << 20;
        let etcd = TestEtcd::start_with(&[&format!("--quota-backend-bytes={quota}")]);
        let endpoints = vec![etcd.endpoint()];
        let client = Etcd::connect(&endpoints, Duration::from_secs(5)).unwrap();
        let keys = Keys::new(&format!("/unit-{}-look/", std::process::id()));
        // Another user's 2.5 MiB, deleted; the history compacted, the pages free.
        for i in 0..40 {
            let t = Txn::new().put(
                format!("/other/{i}").into_bytes(),
                vec![b'x'; 64 << 10],
                None,
            );
            assert!(client.txn(t).await.unwrap().succeeded);
        }
        let t = Txn::new().delete_range(b"/other/".to_vec(), prefix_end(b"/other/"));
        let revision = client.txn(t).await.unwrap().revision;
        client.compact(revision).await.unwrap();
        // The claim of that round, by another agent, which defragmented just now.
        let now = now_ms();
        let claim = Claim {
            revision,
            host: HostId::new("other").unwrap(),
            at_ms: now,
            defrag_start_ms: now - 100,
            defrag_end_ms: now,
        };
        let t = Txn::new().put(
            compaction_key(&keys),
            serde_json::to_vec(&claim).unwrap(),
            None,
        );
        assert!(client.txn(t).await.unwrap().succeeded);
        // etcd frees the pages once the compaction, which runs after its answer, is done, and
        // a later write ends the reads that began before.
        let freed = async {
            loop {
                let t = Txn::new().put(b"/other-tick".to_vec(), Vec::new(), None);
                client.txn(t).await.unwrap();
                let s = client.status().await.unwrap();
                if (s.db_size - s.db_size_in_use) * 4 >= s.db_size {
                    return s;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        let s = tokio::time::timeout(Duration::from_secs(20), freed)
            .await
            .expect("etcd freed the compacted pages");
        assert!(s.db_size as u64 >= quota / 2, "{s:?}");
        let (health, _seen) = watch::channel(EtcdHealth::default());
        let keeper = tokio::spawn(maintain(
            client.clone(),
            members(
                &endpoints,
                Duration::from_secs(5),
                &super::super::client::EtcdSecurity::default(),
            ),
            keys,
            HostId::new("a").unwrap(),
            HistoryOptions {
                quota,
                ..HistoryOptions::default()
            },
            health,
        ));
        // Rounds every minute: the first, now, finds the other agent's round recent.
        let small = async {
            loop {
                if client
                    .status()
                    .await
                    .is_ok_and(|s| (s.db_size as u64) < quota / 4)
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        };
        let done = tokio::time::timeout(DEFRAG_GAP * 3, small).await;
        keeper.abort();
        assert!(
            done.is_ok(),
            "not defragmented: {:?}",
            client.status().await
        );
    }
}
