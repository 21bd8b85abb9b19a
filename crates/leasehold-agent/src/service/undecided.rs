//! The new leases of grants whose delivery is not decided yet, so that the undo of a grant its
//! client never read takes back only a lease that no other answer handed out.
//!
//! A process that asks again for a resource it holds is answered the lease it has (`existing`,
//! same token). When its first grant goes unread (that connection closed) while a second
//! request of it, on another connection, was answered the same lease and read, the lease is the
//! second answer's too: undoing the first grant (a release by owner) would take it from a
//! process just told it holds it, and another could be granted the resource while it writes
//! under its token (G1). So:
//! - an answer that hands out a lease still [`Fate::Pending`] makes it [`Fate::Kept`]: its
//!   undo then releases nothing;
//! - an answer that hands out a lease whose undo has begun ([`Fate::Undoing`], or
//!   [`Fate::Undone`] while that request was being decided) is not given: the lease may be
//!   released under it (the caller is told to acquire again).
//!
//! A request registers itself ([`Undecided::asking`]) before the store decides it and checks
//! its grants after ([`Undecided::granted`]); an undo that ends while a request of that process
//! is being decided leaves its lease [`Fate::Undone`] until no request of it is, since such a
//! request may have been decided before the release was.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use leasehold_core::{Grant, ProcessKey, ResourceName, Token};

/// What becomes of a new lease whose grant's delivery is not decided yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// Its grant's delivery is being checked.
    Pending,
    /// Another answer handed it out: kept, whatever becomes of the first.
    Kept,
    /// Its grant went unread and its release is under way.
    Undoing,
    /// Released, while a request of its process was being decided.
    Undone,
}

/// A process of this host: its pid and start time (the host is this one).
type Pid = (u32, u64);

fn pid_of(p: &ProcessKey) -> Pid {
    (p.pid, p.start_time)
}

/// One new lease of a process.
struct Lease {
    resource: ResourceName,
    token: Token,
    fate: Fate,
}

#[derive(Default)]
struct Inner {
    /// The tracked new leases of each process (a few at most).
    leases: HashMap<Pid, Vec<Lease>>,
    /// How many requests of each process the store is deciding.
    asking: HashMap<Pid, usize>,
}

impl Inner {
    fn lease(&mut self, p: Pid, resource: &ResourceName) -> Option<&mut Lease> {
        self.leases
            .get_mut(&p)?
            .iter_mut()
            .find(|l| &l.resource == resource)
    }

    fn forget(&mut self, p: Pid, resource: &ResourceName) {
        if let Some(v) = self.leases.get_mut(&p) {
            v.retain(|l| &l.resource != resource);
            if v.is_empty() {
                self.leases.remove(&p);
            }
        }
    }
}

/// See the module's documentation.
#[derive(Default)]
pub(crate) struct Undecided(Mutex<Inner>);

/// A request of a process being decided ([`Undecided::asking`]); dropped once it is.
pub(crate) struct Asking {
    undecided: Arc<Undecided>,
    process: Pid,
}

impl Drop for Asking {
    fn drop(&mut self) {
        let mut i = self.undecided.lock();
        let p = self.process;
        let left = i.asking.get_mut(&p).map(|n| {
            *n -= 1;
            *n
        });
        if left == Some(0) {
            i.asking.remove(&p);
            if let Some(v) = i.leases.get_mut(&p) {
                v.retain(|l| l.fate != Fate::Undone);
                if v.is_empty() {
                    i.leases.remove(&p);
                }
            }
        }
    }
}

impl Undecided {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A request of `process` is about to be decided by the store: hold this until its grants
    /// went through [`Undecided::granted`] (or it was refused, or withdrawn).
    pub(crate) fn asking(self: &Arc<Self>, process: &ProcessKey) -> Asking {
        let p = pid_of(process);
        *self.lock().asking.entry(p).or_default() += 1;
        Asking {
            undecided: Arc::clone(self),
            process: p,
        }
    }

    /// The grants the store gave a request of `process`, before they are answered: the leases
    /// it already held that another grant's delivery is pending for are kept; its new ones are
    /// pending. `Err` with a resource whose lease is being taken back (an earlier grant of it
    /// went unread): these grants must not be answered (their new leases, unanswered, are
    /// undone by the caller).
    pub(crate) fn granted(
        &self,
        process: &ProcessKey,
        grants: &[Grant],
    ) -> Result<(), ResourceName> {
        let p = pid_of(process);
        let mut i = self.lock();
        for g in grants.iter().filter(|g| g.existing) {
            if let Some(l) = i.lease(p, &g.resource)
                && l.token == g.token
            {
                match l.fate {
                    Fate::Pending | Fate::Kept => l.fate = Fate::Kept,
                    Fate::Undoing | Fate::Undone => return Err(g.resource.clone()),
                }
            }
        }
        for g in grants.iter().filter(|g| !g.existing) {
            match i.lease(p, &g.resource) {
                Some(l) => {
                    l.token = g.token;
                    l.fate = Fate::Pending;
                }
                None => i.leases.entry(p).or_default().push(Lease {
                    resource: g.resource.clone(),
                    token: g.token,
                    fate: Fate::Pending,
                }),
            }
        }
        Ok(())
    }

    /// The grant of `fresh` (new leases of `process`, with their tokens) was read: they
    /// count, nothing to track.
    pub(crate) fn read(&self, process: &ProcessKey, fresh: &[(ResourceName, Token)]) {
        let p = pid_of(process);
        let mut i = self.lock();
        for (r, token) in fresh {
            if i.lease(p, r).is_some_and(|l| l.token == *token) {
                i.forget(p, r);
            }
        }
    }

    /// The grant of `resource`'s new lease `token` of `process` went unread: whether to
    /// release it (`false`: another answer handed it out, or the process was granted a newer
    /// lease of it since, which a release by owner would take). Then [`Undecided::undone`].
    pub(crate) fn undo(&self, process: &ProcessKey, resource: &ResourceName, token: Token) -> bool {
        let p = pid_of(process);
        let mut i = self.lock();
        let Some(l) = i.lease(p, resource) else {
            return true;
        };
        if l.token != token {
            return false;
        }
        if l.fate == Fate::Kept {
            i.forget(p, resource);
            return false;
        }
        l.fate = Fate::Undoing;
        true
    }

    /// Whether the undo [`Undecided::undo`] let go may (still) release: before each try, as a
    /// release is by owner. Not once the process was granted a newer lease of `resource` (the
    /// one to undo ended meanwhile, force-released while the store was away).
    pub(crate) fn undoing(
        &self,
        process: &ProcessKey,
        resource: &ResourceName,
        token: Token,
    ) -> bool {
        let p = pid_of(process);
        self.lock()
            .lease(p, resource)
            .is_none_or(|l| l.token == token && l.fate == Fate::Undoing)
    }

    /// The release [`Undecided::undo`] let go is over.
    pub(crate) fn undone(&self, process: &ProcessKey, resource: &ResourceName, token: Token) {
        let p = pid_of(process);
        let mut i = self.lock();
        let asking = i.asking.contains_key(&p);
        let Some(l) = i.lease(p, resource) else {
            return;
        };
        if l.token != token {
            return;
        }
        if asking {
            l.fate = Fate::Undone;
        } else {
            i.forget(p, resource);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().leases.values().map(Vec::len).sum()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use leasehold_core::{HostId, Mode};

    fn grant(r: &str, token: u64, existing: bool) -> Grant {
        Grant {
            resource: ResourceName::new(r).unwrap(),
            mode: Mode::Exclusive,
            token: Token(token),
            dirty: None,
            existing,
        }
    }

    fn p() -> ProcessKey {
        ProcessKey {
            host: HostId::new("h").unwrap(),
            pid: 10,
            start_time: 1,
        }
    }

    /// Answered again (`existing`) before the first grant's undo: kept, and nothing left.
    #[test]
    fn a_lease_answered_again_before_its_undo_is_kept() {
        let u = Arc::new(Undecided::default());
        let disk = ResourceName::new("disk").unwrap();
        {
            let _a = u.asking(&p());
            u.granted(&p(), &[grant("disk", 7, false)]).unwrap();
        }
        {
            let _a = u.asking(&p());
            u.granted(&p(), &[grant("disk", 7, true)]).unwrap();
        }
        assert!(!u.undo(&p(), &disk, Token(7)));
        assert_eq!(u.len(), 0);
    }

    /// Answered again while the undo is under way, or once it is over but decided before it
    /// was: not answered. Decided after it was (no request asking then): a new lease.
    #[test]
    fn a_lease_answered_again_while_it_is_undone_is_not_answered() {
        let u = Arc::new(Undecided::default());
        let disk = ResourceName::new("disk").unwrap();
        {
            let _a = u.asking(&p());
            u.granted(&p(), &[grant("disk", 7, false)]).unwrap();
        }
        let during = u.asking(&p());
        assert!(u.undo(&p(), &disk, Token(7)));
        let before_the_end = u.asking(&p());
        u.undone(&p(), &disk, Token(7));
        assert_eq!(
            u.granted(&p(), &[grant("disk", 7, true)]),
            Err(disk.clone())
        );
        drop(during);
        assert_eq!(
            u.granted(&p(), &[grant("disk", 7, true), grant("tape", 8, false)]),
            Err(disk.clone())
        );
        drop(before_the_end);
        assert_eq!(u.len(), 0);
        // Read: nothing to track.
        let _a = u.asking(&p());
        u.granted(&p(), &[grant("disk", 9, false)]).unwrap();
        u.read(&p(), &[(disk.clone(), Token(9))]);
        assert_eq!(u.len(), 0);
        // A newer lease of the process is not the unread grant's to release.
        let _b = u.asking(&p());
        u.granted(&p(), &[grant("disk", 10, false)]).unwrap();
        assert!(!u.undo(&p(), &disk, Token(9)));
        u.undone(&p(), &disk, Token(9));
        assert!(u.undo(&p(), &disk, Token(10)));
    }
}
