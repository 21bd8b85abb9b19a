//! The state of one resource: its live leases, its dirty mark and how its last lease ended.

use std::collections::BTreeSet;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::types::{
    Mode, Now, Owner, OwnerId, ProcessKey, SessionId, Time, Token, WaiterId, WallTime,
};

/// A live grant of one resource to one owner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// Who holds it.
    pub owner: Owner,
    /// In which mode.
    pub mode: Mode,
    /// Its fencing token.
    pub token: Token,
    /// The host session it lives and dies with.
    pub session: SessionId,
    /// When it was granted, for people to read.
    pub granted_at: WallTime,
}

/// How a lease ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "how", rename_all = "kebab-case")]
pub enum EndReason {
    /// Its holder released it cleanly.
    Released,
    /// Its holder released it and said the resource may be inconsistent (for `run`: the
    /// command failed).
    ReleasedDirty {
        /// What the holder said, such as the command's exit status.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        note: Option<String>,
    },
    /// Its process ended without releasing it.
    ProcessDied,
    /// Its process exited with status 0 and had asked that its exit status decide
    /// ([`OnExit::Status`](crate::OnExit::Status)): clean.
    ExitedClean,
    /// Its host's session expired: the host was lost or could not renew.
    SessionExpired,
    /// Its host's agent killed its process because it could not confirm the host's session
    /// in time (SPEC G3, self-fencing).
    Fenced,
    /// An administrator revoked it.
    Forced {
        /// Why, in the administrator's words.
        reason: String,
        /// Who forced it.
        by: String,
    },
    /// It moved to a waiting owner in one step (migration handover).
    HandedOver {
        /// The owner it moved to.
        to: ProcessKey,
    },
}

impl EndReason {
    /// Whether an exclusive lease that ends this way leaves its resource dirty (SPEC G5).
    pub fn dirties(&self) -> bool {
        !matches!(
            self,
            EndReason::Released | EndReason::ExitedClean | EndReason::HandedOver { .. }
        )
    }

    /// A short phrase for people: "released", "process died", ...
    pub fn describe(&self) -> String {
        match self {
            EndReason::Released => "released".into(),
            EndReason::ReleasedDirty { note: None } => "released dirty".into(),
            EndReason::ReleasedDirty { note: Some(n) } => format!("released dirty ({n})"),
            EndReason::ProcessDied => "process died holding it".into(),
            EndReason::ExitedClean => "process exited with status 0".into(),
            EndReason::SessionExpired => "host session expired (host lost)".into(),
            EndReason::Fenced => {
                "fenced: its host could not confirm its session in time and killed it".into()
            }
            EndReason::Forced { reason, by } => format!("force-released by {by}: {reason}"),
            EndReason::HandedOver { to } => format!("handed over to {to}"),
        }
    }
}

/// The record of a lease that has ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ended {
    /// Who held it.
    pub owner: Owner,
    /// In which mode.
    pub mode: Mode,
    /// With which token.
    pub token: Token,
    /// When it was granted.
    pub granted_at: WallTime,
    /// When it ended.
    pub ended_at: WallTime,
    /// How it ended.
    #[serde(flatten)]
    pub how: EndReason,
}

/// Everything known about one resource.
///
/// The fields that are not skipped by serde are durable; `queue` and `reserved_for` belong
/// to waiting requests, which live only as long as the connections that made them. Only the
/// engine changes a state; stores read it through the accessors, keep it as serde writes it,
/// and set what their backend keeps elsewhere (etcd's grace keys) when they rebuild an engine.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceState {
    /// The live leases: none, one exclusive, or one or more shared.
    pub(crate) holders: Vec<Lease>,
    /// The largest token ever granted for this resource.
    pub(crate) last_token: Token,
    /// Set when the last exclusive lease ended other than cleanly; cleared by `mark-clean`.
    /// Boxed, as `last_ended`: most records have none, and a record is kept for every
    /// resource (an `Ended` inline would more than double the size of each).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) dirty: Option<Box<Ended>>,
    /// How the most recent lease ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) last_ended: Option<Box<Ended>>,
    /// After a host session expired holding this resource, nobody is granted it before this
    /// time (the grace, or lock-delay).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) blocked_until: Option<Time>,
    /// Requests waiting for this resource, in arrival order.
    #[serde(skip)]
    pub(crate) queue: BTreeSet<WaiterId>,
    /// A handover in progress: the resource is kept for this waiter alone.
    #[serde(skip)]
    pub(crate) reserved_for: Option<WaiterId>,
}

impl ResourceState {
    /// The state a force-release leaves of a record that could not be trusted: no holders,
    /// marked dirty by `ended` (the first lease it names, if any), with `last_token` kept
    /// above every earlier grant.
    pub fn reset(last_token: Token, ended: Option<Ended>) -> ResourceState {
        ResourceState {
            last_token,
            dirty: ended.clone().map(Box::new),
            last_ended: ended.map(Box::new),
            ..ResourceState::default()
        }
    }

    /// A state from its durable parts, as serde's derive builds it: for a store's own
    /// decoder. The lease rules are not checked here; a store checks
    /// [`ResourceState::violation`] before it trusts a state it read.
    pub fn from_parts(
        holders: Vec<Lease>,
        last_token: Token,
        dirty: Option<Box<Ended>>,
        last_ended: Option<Box<Ended>>,
        blocked_until: Option<Time>,
    ) -> ResourceState {
        ResourceState {
            holders,
            last_token,
            dirty,
            last_ended,
            blocked_until,
            ..ResourceState::default()
        }
    }

    /// The same state, unavailable until `until` (a grace a cluster store keeps outside the
    /// record), or with no grace for `None` (the record as it is written).
    pub fn with_blocked_until(mut self, until: Option<Time>) -> ResourceState {
        self.blocked_until = until;
        self
    }

    /// The live leases: none, one exclusive, or one or more shared.
    pub fn holders(&self) -> &[Lease] {
        &self.holders
    }

    /// The largest token ever granted for this resource.
    pub fn last_token(&self) -> Token {
        self.last_token
    }

    /// Why the resource is dirty, if it is: the lease whose end left it so.
    pub fn dirty(&self) -> Option<&Ended> {
        self.dirty.as_deref()
    }

    /// How the most recent lease ended.
    pub fn last_ended(&self) -> Option<&Ended> {
        self.last_ended.as_deref()
    }

    /// Whether the record must stay although the resource is free and clean: its last lease
    /// was a libvirt domain's ([`OnExit::Status`](crate::OnExit::Status)), which resumes
    /// after a pause only against this record's last token. Forgetting it would make every
    /// resume after a long pause refused as moved.
    pub fn kept_for_resume(&self) -> bool {
        self.last_ended
            .as_ref()
            .is_some_and(|e| e.owner.on_exit == crate::OnExit::Status)
    }

    /// Until when (the engine's time) the resource stays unavailable after its holder's host
    /// was lost, as of the last tick.
    pub fn blocked_until(&self) -> Option<Time> {
        self.blocked_until
    }

    /// How long the resource stays unavailable after its holder's host was lost, seen at
    /// `now`; `None` when it is not in a grace period. The one place this is computed.
    pub fn grace_left(&self, now: Now) -> Option<Duration> {
        self.blocked_until
            .filter(|t| *t > now.mono)
            .map(|t| Duration::from_millis(t.0 - now.mono.0))
    }

    /// The waiter a handover in progress keeps the resource for, if any.
    pub fn reserved_for(&self) -> Option<WaiterId> {
        self.reserved_for
    }

    /// Whether a new lease in `mode` could coexist with the current holders.
    pub fn admits(&self, mode: Mode) -> bool {
        self.holders.iter().all(|l| l.mode.compatible_with(mode))
    }

    /// The lease held by the owner `id` of `process`, if any.
    pub fn lease_of(&self, process: &ProcessKey, id: Option<&OwnerId>) -> Option<&Lease> {
        self.holders.iter().find(|l| l.owner.is(process, id))
    }

    /// Whether any owner of `process` holds a lease here.
    pub fn held_by_process(&self, process: &ProcessKey) -> bool {
        self.holders.iter().any(|l| &l.owner.process == process)
    }

    /// How this state breaks the lease rules (SPEC G1, G2), if it does: an exclusive lease
    /// beside another lease, one owner holding twice, or a lease whose token is above the
    /// resource's last token. A store refuses to act on such a state.
    pub fn violation(&self) -> Option<String> {
        let exclusive = self
            .holders
            .iter()
            .filter(|l| l.mode == Mode::Exclusive)
            .count();
        if exclusive > 0 && self.holders.len() > 1 {
            return Some(format!(
                "{} holders recorded together, {exclusive} of them exclusive",
                self.holders.len()
            ));
        }
        for (i, l) in self.holders.iter().enumerate() {
            if self.holders[..i].iter().any(|o| o.owner.same_as(&l.owner)) {
                return Some(format!("{} recorded twice as a holder", l.owner));
            }
            if l.token > self.last_token {
                return Some(format!(
                    "holder {} has token {}, above the last token {}",
                    l.owner.process, l.token, self.last_token
                ));
            }
        }
        None
    }

    /// Whether the record carries nothing worth keeping.
    pub fn is_empty(&self) -> bool {
        self.holders.is_empty()
            && self.last_token == Token(0)
            && self.dirty.is_none()
            && self.last_ended.is_none()
            && self.blocked_until.is_none()
            && self.queue.is_empty()
            && self.reserved_for.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_clean_endings_keep_a_resource_clean() {
        assert!(!EndReason::Released.dirties());
        assert!(
            !EndReason::HandedOver {
                to: ProcessKey {
                    host: crate::HostId::new("b").unwrap(),
                    pid: 1,
                    start_time: 1
                }
            }
            .dirties()
        );
        assert!(EndReason::ProcessDied.dirties());
        assert!(EndReason::SessionExpired.dirties());
        assert!(EndReason::ReleasedDirty { note: None }.dirties());
        assert!(
            EndReason::Forced {
                reason: "x".into(),
                by: "root".into()
            }
            .dirties()
        );
    }

    #[test]
    fn states_breaking_exclusion_are_named() {
        let lease = |pid, mode, token| Lease {
            owner: Owner::new(crate::HostId::new("a").unwrap(), pid, 1),
            mode,
            token: Token(token),
            session: crate::SessionId(1),
            granted_at: WallTime(1),
        };
        let mut st = ResourceState {
            holders: vec![lease(1, Mode::Shared, 2), lease(2, Mode::Shared, 3)],
            last_token: Token(3),
            ..ResourceState::default()
        };
        assert_eq!(st.violation(), None);
        st.holders.push(lease(3, Mode::Exclusive, 3));
        assert!(st.violation().unwrap().contains("exclusive"));
        st.holders = vec![lease(1, Mode::Exclusive, 4)];
        assert!(st.violation().unwrap().contains("above the last token"));
        st.holders = vec![lease(1, Mode::Shared, 2), lease(1, Mode::Shared, 3)];
        assert!(st.violation().unwrap().contains("twice"));
        let id = |s: &str| crate::OwnerId::new(s).unwrap();
        let mut a = lease(1, Mode::Shared, 2);
        a.owner.id = Some(id("a"));
        let mut b = lease(1, Mode::Shared, 3);
        b.owner.id = Some(id("b"));
        st.holders = vec![a.clone(), b];
        assert_eq!(st.violation(), None, "two owners of one process");
        st.holders = vec![a.clone(), a];
        assert!(st.violation().unwrap().contains("twice"));
    }

    #[test]
    fn end_records_serialize_flat() {
        let e = Ended {
            owner: Owner::new(crate::HostId::new("a").unwrap(), 7, 9),
            mode: Mode::Exclusive,
            token: Token(3),
            granted_at: WallTime(1),
            ended_at: WallTime(2),
            how: EndReason::ProcessDied,
        };
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["how"], "process-died");
        assert_eq!(v["token"], 3);
        let back: Ended = serde_json::from_value(v).unwrap();
        assert_eq!(back, e);
    }
}
