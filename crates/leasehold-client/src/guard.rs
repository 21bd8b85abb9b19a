//! An RAII lease guard: leases held while the guard lives.
//!
//! ```no_run
//! # async fn demo() -> Result<(), leasehold_client::ClientError> {
//! use leasehold_client::{AcquireOptions, Client, LeaseGuard};
//! use leasehold_core::{Mode, ResourceName};
//!
//! let client = Client::connect_default().await?;
//! let disk = ResourceName::new("/srv/images/vm1.qcow2").unwrap();
//! let mut lease =
//!     LeaseGuard::acquire(&client, AcquireOptions::new([(disk.clone(), Mode::Exclusive)])).await?;
//! let token = lease.token(&disk).unwrap();
//! // ... write, stamping each write with `token`, while checking the lease is still held:
//! if let Some((resource, how)) = lease.lost() {
//!     panic!("lost {resource}: {}", how.how.describe());
//! }
//! lease.release().await?; // or drop it: released clean, or dirty if the thread is panicking
//! # Ok(()) }
//! ```

use leasehold_core::{Ended, Grant, ResourceName, Token};
use std::sync::{Arc, Mutex};

use crate::{AcquireEvent, AcquireOptions, Client, ClientError, ReleaseOptions, ReleaseReport};

#[derive(Debug, Default)]
struct HoldState {
    lost: Option<(ResourceName, Ended)>,
    safe_until_ns: Option<u64>,
    agent_gone: bool,
}

/// Leases held for the calling process while this guard lives.
///
/// The guard keeps the agent's stream open: it learns at once if a lease is lost (revoked by
/// an administrator, or the host's session expired) and, on a shared backend, until when the
/// leases are safe. Dropping it releases the leases: cleanly, or dirty if the thread is
/// panicking (the writer may have stopped half-way). A drop releases from a spawned task, so
/// prefer [`LeaseGuard::release`] when the program is about to exit.
pub struct LeaseGuard {
    client: Client,
    grants: Vec<Grant>,
    state: Arc<Mutex<HoldState>>,
    reader: Option<tokio::task::JoinHandle<()>>,
    done: bool,
}

impl std::fmt::Debug for LeaseGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseGuard")
            .field("grants", &self.grants)
            .finish()
    }
}

impl LeaseGuard {
    /// Takes the leases of `options` for the calling process (its `pid` is ignored), waiting
    /// as `options.wait` says.
    ///
    /// # Errors
    /// [`ClientError::Refused`] when the leases cannot be had (held, needs check, timed out).
    pub async fn acquire(
        client: &Client,
        options: AcquireOptions,
    ) -> Result<LeaseGuard, ClientError> {
        let client = client.clone();
        let mut acq = client
            .start_acquire(AcquireOptions {
                pid: None,
                start_time: None,
                hold: true,
                ..options
            })
            .await?;
        let granted = acq.granted().await?;
        // Known from the grant on (etcd): no window in which writing has no bound.
        let state = Arc::new(Mutex::new(HoldState {
            safe_until_ns: granted.safe_until_monotonic_ns,
            ..HoldState::default()
        }));
        let shared = Arc::clone(&state);
        let reader = tokio::spawn(async move {
            loop {
                let ev = acq.next_event().await;
                let Ok(mut st) = shared.lock() else { return };
                match ev {
                    Ok(Some(AcquireEvent::Lost { resource, ended })) => {
                        st.lost.get_or_insert((resource, ended));
                    }
                    Ok(Some(AcquireEvent::Safe { until_monotonic_ns })) => {
                        st.safe_until_ns = Some(until_monotonic_ns);
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => {
                        st.agent_gone = true;
                        return;
                    }
                }
            }
        });
        Ok(LeaseGuard {
            client,
            grants: granted.grants,
            state,
            reader: Some(reader),
            done: false,
        })
    }

    /// The grants, in resource-name order.
    pub fn grants(&self) -> &[Grant] {
        &self.grants
    }

    /// The fencing token of `resource`, to stamp writes with.
    pub fn token(&self, resource: &ResourceName) -> Option<Token> {
        self.grants
            .iter()
            .find(|g| &g.resource == resource)
            .map(|g| g.token)
    }

    /// The first lease lost while held, if any: stop writing at once.
    pub fn lost(&self) -> Option<(ResourceName, Ended)> {
        self.state.lock().ok().and_then(|s| s.lost.clone())
    }

    /// On a shared backend, the instant (CLOCK_MONOTONIC nanoseconds) by which writing must
    /// stop unless the agent confirms the leases again, known from the grant on; `None` on a
    /// single host (and, from an agent too old to send it with the grant, until its first
    /// `safe` line).
    pub fn safe_until_monotonic_ns(&self) -> Option<u64> {
        self.state.lock().ok().and_then(|s| s.safe_until_ns)
    }

    /// Whether the agent's stream has closed (the agent stopped or restarted): losses are no
    /// longer reported, though the leases stay with this process.
    pub fn agent_gone(&self) -> bool {
        self.state.lock().is_ok_and(|s| s.agent_gone)
    }

    fn resources(&self) -> Vec<ResourceName> {
        self.grants.iter().map(|g| g.resource.clone()).collect()
    }

    /// The grants' tokens, in the order of [`LeaseGuard::resources`]: a release names them,
    /// so it ends these leases and never a later grant to the same process.
    fn tokens(&self) -> Vec<Token> {
        self.grants.iter().map(|g| g.token).collect()
    }

    async fn finish(mut self, o: ReleaseOptions) -> Result<(), ClientError> {
        self.done = true;
        if let Some(r) = self.reader.take() {
            r.abort();
        }
        let resources = self.resources();
        let o = ReleaseOptions {
            tokens: self.tokens(),
            ..o
        };
        all_released(self.client.release(&resources, o).await?)
    }

    /// Releases cleanly.
    ///
    /// # Errors
    /// [`ClientError`] from the agent (a lease that was already lost is not held).
    pub async fn release(self) -> Result<(), ClientError> {
        self.finish(ReleaseOptions::default()).await
    }

    /// Releases, marking the resources dirty: the next user must check them.
    ///
    /// # Errors
    /// [`ClientError`] from the agent.
    pub async fn release_dirty(self, note: impl Into<String>) -> Result<(), ClientError> {
        self.finish(ReleaseOptions {
            dirty: true,
            note: Some(note.into()),
            ..Default::default()
        })
        .await
    }

    /// Hands the (exclusive) leases to the owner waiting on `host` (`HOST` or `HOST/LABEL`), in
    /// one step with new tokens (SPEC G7). Drain your writes first.
    ///
    /// # Errors
    /// [`ClientError`] when nobody waits there; the leases are then kept, and released when
    /// this guard is dropped.
    pub async fn handover(mut self, to: impl Into<String>) -> Result<(), ClientError> {
        let resources = self.resources();
        let o = ReleaseOptions {
            handover_to: Some(to.into()),
            tokens: self.tokens(),
            ..Default::default()
        };
        all_released(self.client.release(&resources, o).await?)?;
        self.done = true;
        if let Some(r) = self.reader.take() {
            r.abort();
        }
        Ok(())
    }
}

/// A release whose every resource was released, or the first failure as an error.
fn all_released(r: ReleaseReport) -> Result<(), ClientError> {
    match r.failed.into_iter().next() {
        None => Ok(()),
        Some(f) => Err(ClientError::Agent {
            code: f.code,
            message: format!("{}: {}", f.resource, f.message),
        }),
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        if let Some(r) = self.reader.take() {
            r.abort();
        }
        if self.done {
            return;
        }
        let resources = self.resources();
        let tokens = self.tokens();
        let client = self.client.clone();
        let dirty = std::thread::panicking();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let o = ReleaseOptions {
                    dirty,
                    note: dirty.then(|| "the holder panicked".to_owned()),
                    tokens,
                    ..Default::default()
                };
                let _ = client.release(&resources, o).await;
            });
        }
    }
}
