//! Routes the end of a lease to the `run` wrapper (or other client) holding it.
//!
//! One task follows the store's events; a client that holds its acquire stream open registers
//! its process here and receives only the endings of that process's leases, so an event
//! wakes the one client concerned, not every holding client.
//!
//! It also keeps the leases the fence revoked (a revocable holder's, when the host session
//! was lost) until the store records their end: meanwhile `validate` refuses their tokens and
//! their owners cannot release them as if nothing happened, even while etcd does not answer.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use leasehold_core::{Ended, OwnerId, ProcessKey, ResourceName, Token};
use tokio::sync::mpsc;

/// What a holding client is told.
#[derive(Debug, Clone)]
pub enum Note {
    /// One of its leases ended.
    Ended {
        /// The resource.
        resource: ResourceName,
        /// How (boxed: an owner is large beside [`Note::Resync`]).
        ended: Box<Ended>,
    },
    /// Events were missed; look at the leases directly.
    Resync,
}

type Senders = HashMap<ProcessKey, Vec<(u64, mpsc::UnboundedSender<Note>)>>;

/// The registry of holding clients, by process.
#[derive(Default)]
pub struct Holds {
    inner: Mutex<(u64, Senders)>,
    /// Leases revoked by the fence whose end the store has not recorded yet.
    revoked: Mutex<BTreeMap<(ResourceName, Token), Ended>>,
}

/// A registration; dropping it unregisters.
pub struct Registration {
    holds: Arc<Holds>,
    process: ProcessKey,
    id: u64,
    /// The notes for this registration.
    pub notes: mpsc::UnboundedReceiver<Note>,
}

impl Holds {
    /// Registers interest in the leases of `process`.
    pub fn register(self: &Arc<Self>, process: ProcessKey) -> Registration {
        let (tx, rx) = mpsc::unbounded_channel();
        let id = match self.inner.lock() {
            Ok(mut g) => {
                g.0 += 1;
                let id = g.0;
                g.1.entry(process.clone()).or_default().push((id, tx));
                id
            }
            Err(_) => 0,
        };
        Registration {
            holds: Arc::clone(self),
            process,
            id,
            notes: rx,
        }
    }

    /// Passes the end of a lease to whoever holds it (the store recorded it).
    pub fn ended(&self, resource: &ResourceName, ended: &Ended) {
        if let Ok(mut r) = self.revoked.lock() {
            r.remove(&(resource.clone(), ended.token));
        }
        self.tell(resource, ended);
    }

    /// Revokes a lease here, before the store can record its end (the host session was lost
    /// and the holder asked `on_lost = revoke`): its holder is told now, and its token counts
    /// as ended here until the store's own ending of it arrives through [`Holds::ended`].
    pub fn revoke(&self, resource: &ResourceName, ended: &Ended) {
        if let Ok(mut r) = self.revoked.lock() {
            r.insert((resource.clone(), ended.token), ended.clone());
        }
        self.tell(resource, ended);
    }

    /// Whether `token` of `resource` was revoked here and its end not yet recorded; `true`
    /// when the registry was poisoned (the safe answer for a token).
    pub fn is_revoked(&self, resource: &ResourceName, token: Token) -> bool {
        self.revoked
            .lock()
            .map_or(true, |r| r.contains_key(&(resource.clone(), token)))
    }

    /// The revoked lease of `resource` held by `process` (as `owner_id`), if any, whose end
    /// the store has not recorded yet.
    pub fn revoked_of(
        &self,
        resource: &ResourceName,
        process: &ProcessKey,
        owner_id: Option<&OwnerId>,
    ) -> Option<Ended> {
        let r = self.revoked.lock().ok()?;
        r.iter()
            .find(|((name, _), e)| name == resource && e.owner.is(process, owner_id))
            .map(|(_, e)| e.clone())
    }

    fn tell(&self, resource: &ResourceName, ended: &Ended) {
        let Ok(g) = self.inner.lock() else { return };
        for (_, tx) in g.1.get(&ended.owner.process).into_iter().flatten() {
            let _ = tx.send(Note::Ended {
                resource: resource.clone(),
                ended: Box::new(ended.clone()),
            });
        }
    }

    /// Tells every holder that events were missed.
    pub fn resync(&self) {
        let Ok(g) = self.inner.lock() else { return };
        for (_, tx) in g.1.values().flatten() {
            let _ = tx.send(Note::Resync);
        }
    }

    /// How many clients are registered.
    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .map_or(0, |g| g.1.values().map(Vec::len).sum())
    }

    /// Whether nobody is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Ok(mut g) = self.holds.inner.lock()
            && let Some(v) = g.1.get_mut(&self.process)
        {
            v.retain(|(id, _)| *id != self.id);
            if v.is_empty() {
                g.1.remove(&self.process);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use leasehold_core::{EndReason, HostId, Mode, Owner, Token, WallTime};

    fn ended(pid: u32) -> Ended {
        Ended {
            owner: Owner::new(HostId::new("h").unwrap(), pid, 1),
            mode: Mode::Exclusive,
            token: Token(1),
            granted_at: WallTime(0),
            ended_at: WallTime(1),
            how: EndReason::ProcessDied,
        }
    }

    #[test]
    fn endings_reach_only_their_process_and_registrations_go_away() {
        let holds = Arc::new(Holds::default());
        let r = ResourceName::new("d").unwrap();
        let mut a = holds.register(ended(1).owner.process);
        let mut b = holds.register(ended(2).owner.process);
        holds.ended(&r, &ended(1));
        assert!(matches!(a.notes.try_recv(), Ok(Note::Ended { .. })));
        assert!(b.notes.try_recv().is_err());
        drop(a);
        drop(b);
        assert!(holds.is_empty());
    }
}
