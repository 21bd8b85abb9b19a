//! The engine's per-operation mode, for a cluster store (etcd) whose durable state lives in
//! its backend and is shared by every host.
//!
//! Such a store keeps no engine between operations. For each operation it reads a snapshot,
//! rebuilds an engine from it with [`Engine::restore`] (resource records, the live sessions,
//! and every dead session that still holds something as one already due, so that the
//! engine's first tick ends its leases), and then sets what only the backend knows:
//! - [`Engine::raise_token_floor`]: the token counter follows the backend's revision;
//! - [`Engine::insert_waiter`]: the waiters of every host, in the backend's queue order, each
//!   either decided here (this host's own) or only keeping its place;
//! - [`Engine::set_reservation`]: a handover in progress, from the record;
//! - a grace the backend keeps outside the record, with
//!   [`ResourceState::with_blocked_until`](crate::ResourceState::with_blocked_until) before
//!   the restore.
//!
//! It then runs one operation (or [`Engine::serve_waiters`], to decide this host's waiters
//! once their resources changed), writes [`Output::changed`](crate::Output::changed) in one
//! conditional transaction, and drops the engine. A store that keeps its engine (the local one) needs none of these.

use super::Engine;
use crate::acquire::{AcquireError, AcquireRequest};
use crate::types::{Now, ResourceName, WaiterId};

impl Engine {
    /// Raises the token counter so the next grant takes at least `floor`; stores whose own
    /// counter lives elsewhere (etcd's revision) use this before each operation.
    pub fn raise_token_floor(&mut self, floor: u64) {
        if floor > self.next_token {
            self.next_token = floor;
            self.out.meta_changed = true;
        }
    }

    /// Puts a waiting request whose id was chosen elsewhere (a cluster store's queue order)
    /// into the queues of its resources, without deciding anything. With `decided_here` the
    /// engine grants or fails it like its own waiters; without, it only keeps its place, and
    /// can be named by a handover. The request's `wait` flag is ignored.
    ///
    /// # Errors
    /// [`AcquireError::Invalid`] for a malformed request or an id already in use.
    pub fn insert_waiter(
        &mut self,
        id: WaiterId,
        mut req: AcquireRequest,
        decided_here: bool,
    ) -> Result<(), AcquireError> {
        if self.waiters.contains_key(&id) {
            return Err(AcquireError::Invalid(format!("waiter {} exists", id.0)));
        }
        req.items.sort();
        if req.items.is_empty() || req.items.windows(2).any(|w| w[0].0 == w[1].0) {
            return Err(AcquireError::Invalid(
                "a waiter needs distinct resources".into(),
            ));
        }
        self.enqueue(id, req, decided_here);
        Ok(())
    }

    /// Keeps `resource` for waiter `id` (a handover in progress, restored from a cluster
    /// store's record). Nothing changes if the resource is unknown.
    pub fn set_reservation(&mut self, resource: &ResourceName, id: Option<WaiterId>) {
        if let Some(st) = self.resources.get_mut(resource) {
            st.reserved_for = id;
        }
    }

    /// Serves the waiters of `resources` that this engine decides, as after any change to
    /// them; a cluster store calls it after loading a snapshot.
    pub fn serve_waiters(&mut self, resources: impl IntoIterator<Item = ResourceName>, now: Now) {
        self.tick(now);
        self.serve(resources.into_iter().collect(), now);
    }
}
