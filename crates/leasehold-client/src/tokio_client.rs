//! The async client (feature `async`): the blocking client's calls, run on tokio's blocking
//! pool, and its streams read by a thread each and handed over through a channel. One
//! protocol implementation ([`crate::blocking`]); this adds only the waiting.

use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::Path;

use leasehold_core::{Ended, Released, ResourceName, ResourceView, Token};
use tokio::sync::mpsc;

use crate::blocking::{self, Event, Status};
use crate::{
    AcquireEvent, AcquireOptions, ClientError, Granted, ReleaseOptions, ReleaseReport, Validation,
};

/// Runs one blocking call off the runtime's threads.
async fn off<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ClientError> + Send + 'static,
) -> Result<T, ClientError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ClientError::Io(std::io::Error::other(e)))?
}

/// Reads `next` on a thread until it ends or the receiver goes, one message each.
fn pump<T: Send + 'static>(
    mut next: impl FnMut() -> Option<Result<T, ClientError>> + Send + 'static,
) -> mpsc::Receiver<Result<T, ClientError>> {
    let (tx, rx) = mpsc::channel(16);
    std::thread::spawn(move || {
        while let Some(item) = next() {
            let failed = item.is_err();
            if tx.blocking_send(item).is_err() || failed {
                return;
            }
        }
    });
    rx
}

/// A client of an agent. Cheap to clone: it holds the socket's path; each call connects.
#[derive(Debug, Clone)]
pub struct Client {
    inner: blocking::Client,
}

impl Client {
    /// A client of the agent at `socket`, once something listens there.
    ///
    /// # Errors
    /// [`ClientError::Unreachable`] when nothing answers there.
    pub async fn connect(socket: impl AsRef<Path>) -> Result<Client, ClientError> {
        let inner = blocking::Client::new(socket.as_ref());
        let probe = inner.clone();
        off(move || probe.reachable()).await?;
        Ok(Client { inner })
    }

    /// A client of the agent at [`crate::default_socket`].
    ///
    /// # Errors
    /// [`ClientError::NoSocket`] or [`ClientError::Unreachable`].
    pub async fn connect_default() -> Result<Client, ClientError> {
        Client::connect(crate::default_socket().ok_or(ClientError::NoSocket)?).await
    }

    /// The socket this client talks to.
    pub fn socket(&self) -> &Path {
        self.inner.socket()
    }

    /// The blocking client underneath, for calls from threads.
    pub fn blocking(&self) -> &blocking::Client {
        &self.inner
    }

    /// Starts an acquire and returns its event stream.
    ///
    /// # Errors
    /// [`ClientError::Refused`] when refused at once; [`ClientError::Agent`] when the
    /// agent refuses the request as malformed or not allowed.
    pub async fn start_acquire(&self, o: AcquireOptions) -> Result<Acquisition, ClientError> {
        let c = self.inner.clone();
        let acq = off(move || c.start_acquire(&o)).await?;
        Acquisition::new(acq)
    }

    /// Acquires and waits for the outcome.
    ///
    /// # Errors
    /// [`ClientError::Refused`] when refused.
    pub async fn acquire(&self, o: AcquireOptions) -> Result<Granted, ClientError> {
        let c = self.inner.clone();
        off(move || c.acquire(&o)).await
    }

    /// Releases `resources`; reports each one's outcome.
    ///
    /// # Errors
    /// [`ClientError::Agent`] when the request as a whole is refused (malformed, no such
    /// process, not allowed): then nothing was released.
    pub async fn release(
        &self,
        resources: &[ResourceName],
        o: ReleaseOptions,
    ) -> Result<ReleaseReport, ClientError> {
        let (c, rs) = (self.inner.clone(), resources.to_vec());
        off(move || c.release(&rs, &o)).await
    }

    /// Revokes every lease on `resource` (root or the admin group).
    ///
    /// # Errors
    /// [`ClientError::Agent`] when not allowed.
    pub async fn force_release(
        &self,
        resource: &ResourceName,
        reason: &str,
    ) -> Result<Vec<Released>, ClientError> {
        let (c, r, why) = (self.inner.clone(), resource.clone(), reason.to_owned());
        off(move || c.force_release(&r, &why)).await
    }

    /// Clears the dirty mark of `resource`; returns the mark it had.
    ///
    /// # Errors
    /// [`ClientError::Agent`] when not allowed.
    pub async fn mark_clean(&self, resource: &ResourceName) -> Result<Option<Ended>, ClientError> {
        let (c, r) = (self.inner.clone(), resource.clone());
        off(move || c.mark_clean(&r)).await
    }

    /// Whether `token` is a live grant of `resource`, and the current tokens.
    ///
    /// # Errors
    /// [`ClientError::Agent`] for a bad name.
    pub async fn validate(
        &self,
        resource: &ResourceName,
        token: Token,
    ) -> Result<Validation, ClientError> {
        let (c, r) = (self.inner.clone(), resource.clone());
        off(move || c.validate(&r, token)).await
    }

    /// One resource; `None` when the agent knows nothing of it.
    ///
    /// # Errors
    /// [`ClientError::Agent`] for a bad name.
    pub async fn inspect(
        &self,
        resource: &ResourceName,
    ) -> Result<Option<ResourceView>, ClientError> {
        let (c, r) = (self.inner.clone(), resource.clone());
        off(move || c.inspect(&r)).await
    }

    /// Every known resource.
    ///
    /// # Errors
    /// [`ClientError::Agent`] when the backend does not answer.
    pub async fn list(&self) -> Result<Vec<ResourceView>, ClientError> {
        let c = self.inner.clone();
        off(move || c.list()).await
    }

    /// The agent's status.
    ///
    /// # Errors
    /// [`ClientError::Unreachable`] when no agent answers.
    pub async fn status(&self) -> Result<Status, ClientError> {
        let c = self.inner.clone();
        off(move || c.status()).await
    }

    /// Lease events as they happen from the moment this returns, for one resource or all.
    ///
    /// # Errors
    /// [`ClientError::Agent`] for a bad name.
    pub async fn watch(&self, resource: Option<&ResourceName>) -> Result<Watch, ClientError> {
        let (c, r) = (self.inner.clone(), resource.cloned());
        let mut w = off(move || c.watch(r.as_ref())).await?;
        let conn = w.socket().try_clone()?;
        Ok(Watch {
            rx: pump(move || w.next()),
            conn,
        })
    }
}

/// An acquire in progress: its events until granted or refused, and with `hold`, after.
/// Dropping it closes the connection: a waiting request is withdrawn, a hold ends (the
/// leases stay with their process).
#[derive(Debug)]
pub struct Acquisition {
    rx: mpsc::Receiver<Result<AcquireEvent, ClientError>>,
    conn: UnixStream,
}

impl Acquisition {
    fn new(mut acq: blocking::Acquisition) -> Result<Acquisition, ClientError> {
        let conn = acq.socket().try_clone()?;
        Ok(Acquisition {
            rx: pump(move || acq.next_event().transpose()),
            conn,
        })
    }

    /// The next event; `Ok(None)` when the agent ended the stream.
    ///
    /// # Errors
    /// [`ClientError::Refused`] when the acquire is refused; [`ClientError::Io`] when the
    /// connection breaks (the agent stopped).
    pub async fn next_event(&mut self) -> Result<Option<AcquireEvent>, ClientError> {
        self.rx.recv().await.transpose()
    }

    /// Waits for the grant, passing over progress reports.
    ///
    /// # Errors
    /// As [`Acquisition::next_event`]; [`ClientError::Io`] when the stream ends first.
    pub async fn granted(&mut self) -> Result<Granted, ClientError> {
        loop {
            match self.next_event().await? {
                Some(AcquireEvent::Granted(g)) => return Ok(g),
                Some(_) => {}
                None => {
                    return Err(ClientError::Io(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the agent ended the acquire without an answer",
                    )));
                }
            }
        }
    }
}

impl Drop for Acquisition {
    fn drop(&mut self) {
        let _ = self.conn.shutdown(Shutdown::Both);
    }
}

/// Lease events as they happen; dropping it ends the watch.
#[derive(Debug)]
pub struct Watch {
    rx: mpsc::Receiver<Result<Event, ClientError>>,
    conn: UnixStream,
}

impl Watch {
    /// The next event; `None` when the agent ended the stream.
    pub async fn next(&mut self) -> Option<Result<Event, ClientError>> {
        self.rx.recv().await
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.conn.shutdown(Shutdown::Both);
    }
}
