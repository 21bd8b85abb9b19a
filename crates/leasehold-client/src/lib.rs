//! A client for the leasehold agent, over its local Unix socket.
//!
//! Every call returns `leasehold-core` types. An acquire that is refused (held by someone
//! else, needs a check, timed out) is [`ClientError::Refused`] with the details as data, so a
//! program can name the holder or run the check without parsing text.
//!
//! ```no_run
//! # async fn demo() -> Result<(), leasehold_client::ClientError> {
//! use leasehold_client::{AcquireOptions, Client};
//! use leasehold_core::{Mode, ResourceName};
//!
//! let mut client = Client::connect_default().await?;
//! let disk = ResourceName::new("/srv/images/vm1.qcow2").unwrap();
//! // Held for this process until it releases or exits.
//! let grants = client
//!     .acquire(AcquireOptions::new([(disk.clone(), Mode::Exclusive)]))
//!     .await?;
//! println!("token {}", grants.grants[0].token);
//! client.release(&[disk], Default::default()).await?;
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use leasehold_api::{WireError, conflict_from_wire, pb};
use leasehold_core::{
    Conflict, Ended, Grant, Mode, Owner, Released, ResourceName, ResourceView, Token,
};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

pub mod blocking;
mod guard;

pub use guard::LeaseGuard;
pub use leasehold_api::default_socket;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The agent could not be reached.
    #[error("cannot reach the leasehold agent at {socket}: {message}")]
    Unreachable {
        /// The socket tried.
        socket: PathBuf,
        /// Why.
        message: String,
    },
    /// No socket path was given and none could be found.
    #[error(
        "no agent socket: pass --socket or set LEASEHOLD_SOCKET (XDG_RUNTIME_DIR is not set either)"
    )]
    NoSocket,
    /// The acquire was refused; the refusal says why.
    #[error("{}", .0.message)]
    Refused(Box<Refusal>),
    /// The agent answered with an error.
    #[error("{}", .0.message())]
    Status(#[from] tonic::Status),
    /// The agent's answer was malformed.
    #[error("malformed answer from the agent: {0}")]
    Wire(#[from] WireError),
}

impl ClientError {
    /// Whether the error means the agent is not there (exit code 5).
    pub fn is_unreachable(&self) -> bool {
        match self {
            ClientError::Unreachable { .. } | ClientError::NoSocket => true,
            ClientError::Status(s) => s.code() == tonic::Code::Unavailable,
            _ => false,
        }
    }
}

/// Why an acquire was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalKind {
    /// Held by another owner.
    Busy,
    /// The wait ran out.
    TimedOut,
    /// Dirty; the caller did not accept the check.
    NeedsCheck,
    /// Held by the caller in the other mode.
    ModeConflict,
    /// The waiting request was withdrawn.
    Cancelled,
}

/// An acquire refusal, as data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Why.
    pub kind: RefusalKind,
    /// The agent's one-line explanation.
    pub message: String,
    /// The resource concerned.
    pub resource: Option<ResourceName>,
    /// Who holds it (busy, timed out).
    pub conflict: Option<Conflict>,
    /// How long the resource stays in its grace period, if it is in one.
    pub blocked_for: Option<Duration>,
    /// How its last exclusive lease ended (needs check).
    pub dirty: Option<Ended>,
    /// Needs check, when the caller asked to take it dirty but may not: who may.
    pub accept_dirty_needs: Option<String>,
}

impl TryFrom<pb::Refusal> for Refusal {
    type Error = WireError;
    fn try_from(r: pb::Refusal) -> Result<Self, WireError> {
        use pb::refusal::Kind;
        let kind = match Kind::try_from(r.kind) {
            Ok(Kind::Busy) => RefusalKind::Busy,
            Ok(Kind::TimedOut) => RefusalKind::TimedOut,
            Ok(Kind::NeedsCheck) => RefusalKind::NeedsCheck,
            Ok(Kind::ModeConflict) => RefusalKind::ModeConflict,
            Ok(Kind::Cancelled) => RefusalKind::Cancelled,
            _ => {
                return Err(WireError::Unknown {
                    what: "refusal",
                    value: r.kind.to_string(),
                });
            }
        };
        let blocked_for = r
            .conflict
            .as_ref()
            .and_then(|c| c.blocked_for_ms)
            .map(Duration::from_millis);
        Ok(Refusal {
            kind,
            message: r.message,
            resource: r.resource.map(ResourceName::new).transpose()?,
            conflict: r.conflict.map(conflict_from_wire).transpose()?,
            blocked_for,
            dirty: r.dirty.map(Ended::try_from).transpose()?,
            accept_dirty_needs: r.accept_dirty_needs,
        })
    }
}

/// What to acquire and how.
#[derive(Debug, Clone, Default)]
pub struct AcquireOptions {
    /// The resources and modes, all or none.
    pub items: Vec<(ResourceName, Mode)>,
    /// The process to hold the leases; `None` is the calling process.
    pub pid: Option<u32>,
    /// The start time of `pid`, when the caller read it (guards against pid reuse).
    pub start_time: Option<u64>,
    /// A label for people (a VM name).
    pub label: Option<String>,
    /// Accept a dirty resource: the caller checks it before use.
    pub accept_dirty: bool,
    /// Wait this long; `Some(Duration::MAX)` waits forever; `None` fails at once.
    pub wait: Option<Duration>,
    /// Keep the stream open to learn of a lost lease (see [`Acquisition::next_event`]).
    pub hold: bool,
}

impl AcquireOptions {
    /// Options for `items`, for the calling process, not waiting.
    pub fn new(items: impl IntoIterator<Item = (ResourceName, Mode)>) -> Self {
        AcquireOptions {
            items: items.into_iter().collect(),
            ..Default::default()
        }
    }
}

/// How to release.
#[derive(Debug, Clone, Default)]
pub struct ReleaseOptions {
    /// The holder; `None` is the calling process.
    pub pid: Option<u32>,
    /// Its start time, when known.
    pub start_time: Option<u64>,
    /// Mark the resources dirty.
    pub dirty: bool,
    /// Why (with `dirty`).
    pub note: Option<String>,
    /// Hand the lease to the waiter on `HOST` or `HOST/LABEL`.
    pub handover_to: Option<String>,
}

/// What happens to a request while it is processed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AcquireEvent {
    /// Still waiting; who is in the way, and for how long the request has waited.
    Waiting {
        /// Who is in the way.
        conflict: Conflict,
        /// How long the resource stays in grace, if it is.
        blocked_for: Option<Duration>,
        /// How long the request has waited.
        waited: Duration,
    },
    /// Something to tell people about the wait, which goes on: e.g. that the request was
    /// queued again after the host's session with the backend ended, or that the agent
    /// restarted.
    Note(String),
    /// Granted.
    Granted(Granted),
    /// The leases are safe until this instant on CLOCK_MONOTONIC (nanoseconds), unless a
    /// later message extends it; a holder hearing nothing newer must stop writing by then.
    Safe {
        /// The instant, in nanoseconds on CLOCK_MONOTONIC.
        until_monotonic_ns: u64,
    },
    /// A held lease ended by other means than the holder's release.
    Lost {
        /// The resource.
        resource: ResourceName,
        /// How it ended.
        ended: Ended,
    },
}

/// A successful acquire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Granted {
    /// One grant per resource, in name order.
    pub grants: Vec<Grant>,
    /// The owner as the agent recorded it.
    pub owner: Owner,
}

/// An acquire in progress: its events, until granted or refused, and with `hold`, after.
pub struct Acquisition {
    stream: tonic::Streaming<pb::AcquireEvent>,
    /// To confirm the grant: the agent releases a grant it hears no confirmation of.
    client: pb::leasehold_client::LeaseholdClient<Channel>,
}

impl Acquisition {
    /// The next event; `Ok(None)` when the agent closed the stream.
    ///
    /// # Errors
    /// [`ClientError::Refused`] when the acquire is refused; [`ClientError::Status`] on other
    /// failures.
    pub async fn next_event(&mut self) -> Result<Option<AcquireEvent>, ClientError> {
        let Some(msg) = self.stream.message().await? else {
            return Ok(None);
        };
        use pb::acquire_event::Event as E;
        match msg.event {
            Some(E::Waiting(pb::Waiting {
                note: Some(note), ..
            })) => Ok(Some(AcquireEvent::Note(note))),
            Some(E::Waiting(w)) => {
                let c = w.conflict.ok_or(WireError::Missing("conflict"))?;
                let blocked_for = c.blocked_for_ms.map(Duration::from_millis);
                Ok(Some(AcquireEvent::Waiting {
                    conflict: conflict_from_wire(c)?,
                    blocked_for,
                    waited: Duration::from_millis(w.waited_ms),
                }))
            }
            Some(E::Granted(g)) => {
                let granted = Granted {
                    grants: g
                        .grants
                        .into_iter()
                        .map(Grant::try_from)
                        .collect::<Result<_, _>>()?,
                    owner: Owner::try_from(g.owner.ok_or(WireError::Missing("owner"))?)?,
                };
                // Received: say so, or the agent releases the grant when the stream closes.
                if g.confirm_id != 0 {
                    self.client
                        .confirm(pb::ConfirmRequest {
                            confirm_id: g.confirm_id,
                        })
                        .await?;
                }
                Ok(Some(AcquireEvent::Granted(granted)))
            }
            Some(E::Refused(r)) => Err(ClientError::Refused(Box::new(Refusal::try_from(r)?))),
            Some(E::Safe(s)) => Ok(Some(AcquireEvent::Safe {
                until_monotonic_ns: s.until_monotonic_ns,
            })),
            Some(E::Lost(l)) => Ok(Some(AcquireEvent::Lost {
                resource: ResourceName::new(l.resource).map_err(WireError::from)?,
                ended: Ended::try_from(l.ended.ok_or(WireError::Missing("ended"))?)?,
            })),
            None => Err(WireError::Missing("event").into()),
        }
    }

    /// Waits for the grant, ignoring progress reports.
    ///
    /// # Errors
    /// As [`Acquisition::next_event`]; [`ClientError::Status`] if the stream ends first.
    pub async fn granted(&mut self) -> Result<Granted, ClientError> {
        loop {
            match self.next_event().await? {
                Some(AcquireEvent::Granted(g)) => return Ok(g),
                Some(_) => {}
                None => {
                    return Err(tonic::Status::unavailable("the agent closed the request").into());
                }
            }
        }
    }
}

/// A connection to an agent.
#[derive(Debug, Clone)]
pub struct Client {
    inner: pb::leasehold_client::LeaseholdClient<Channel>,
    socket: PathBuf,
}

impl Client {
    /// Connects to the agent at `socket`.
    ///
    /// # Errors
    /// [`ClientError::Unreachable`] when nothing answers there.
    pub async fn connect(socket: impl AsRef<Path>) -> Result<Client, ClientError> {
        let socket = socket.as_ref().to_path_buf();
        let path = socket.clone();
        // The URI is required by the API and unused: the connector dials the socket.
        let channel = Endpoint::from_static("http://leasehold.sock")
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move { UnixStream::connect(path).await.map(TokioIo::new) }
            }))
            .await
            .map_err(|e| ClientError::Unreachable {
                socket: socket.clone(),
                message: source_chain(&e),
            })?;
        Ok(Client {
            // `list` of a big cluster is large; the socket is local.
            inner: pb::leasehold_client::LeaseholdClient::new(channel)
                .max_decoding_message_size(1 << 30),
            socket,
        })
    }

    /// Connects to the agent at [`default_socket`].
    ///
    /// # Errors
    /// [`ClientError::NoSocket`] or [`ClientError::Unreachable`].
    pub async fn connect_default() -> Result<Client, ClientError> {
        Client::connect(default_socket().ok_or(ClientError::NoSocket)?).await
    }

    /// The socket this client talks to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Starts an acquire and returns its event stream.
    ///
    /// # Errors
    /// [`ClientError::Status`] when the agent refuses the request as malformed or not
    /// allowed.
    pub async fn start_acquire(&mut self, o: AcquireOptions) -> Result<Acquisition, ClientError> {
        let req = pb::AcquireRequest {
            items: o
                .items
                .iter()
                .map(|(r, m)| pb::Item {
                    resource: r.to_string(),
                    mode: pb::Mode::from(*m).into(),
                })
                .collect(),
            pid: o.pid.unwrap_or(0),
            start_time: o.start_time,
            label: o.label,
            accept_dirty: o.accept_dirty,
            wait_ms: o.wait.map(|d| {
                if d == Duration::MAX {
                    0
                } else {
                    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
                }
            }),
            hold: o.hold,
        };
        let stream = self.inner.acquire(req).await?.into_inner();
        Ok(Acquisition {
            stream,
            client: self.inner.clone(),
        })
    }

    /// Acquires and waits for the outcome.
    ///
    /// # Errors
    /// [`ClientError::Refused`] when refused.
    pub async fn acquire(&mut self, o: AcquireOptions) -> Result<Granted, ClientError> {
        self.start_acquire(o).await?.granted().await
    }

    /// Releases `resources`.
    ///
    /// # Errors
    /// [`ClientError::Status`] when a resource is not held by the process, or a handover has
    /// nobody to go to.
    pub async fn release(
        &mut self,
        resources: &[ResourceName],
        o: ReleaseOptions,
    ) -> Result<Vec<Released>, ClientError> {
        let req = pb::ReleaseRequest {
            resources: resources.iter().map(ToString::to_string).collect(),
            pid: o.pid.unwrap_or(0),
            start_time: o.start_time,
            dirty: o.dirty,
            note: o.note,
            handover_to: o.handover_to,
        };
        let r = self.inner.release(req).await?.into_inner();
        Ok(r.released
            .into_iter()
            .map(Released::try_from)
            .collect::<Result<_, _>>()?)
    }

    /// Revokes every lease on `resource` (root or the admin group).
    ///
    /// # Errors
    /// [`ClientError::Status`] when not allowed or nobody holds it.
    pub async fn force_release(
        &mut self,
        resource: &ResourceName,
        reason: &str,
    ) -> Result<Vec<Released>, ClientError> {
        let req = pb::ForceReleaseRequest {
            resource: resource.to_string(),
            reason: reason.to_owned(),
        };
        let r = self.inner.force_release(req).await?.into_inner();
        Ok(r.released
            .into_iter()
            .map(Released::try_from)
            .collect::<Result<_, _>>()?)
    }

    /// Clears the dirty mark of `resource`; returns the mark it had.
    ///
    /// # Errors
    /// [`ClientError::Status`] when not allowed or the resource is unknown.
    pub async fn mark_clean(
        &mut self,
        resource: &ResourceName,
    ) -> Result<Option<Ended>, ClientError> {
        let req = pb::MarkCleanRequest {
            resource: resource.to_string(),
        };
        let r = self.inner.mark_clean(req).await?.into_inner();
        Ok(r.was.map(Ended::try_from).transpose()?)
    }

    /// Whether `token` is the current grant of `resource`; also the current tokens.
    ///
    /// # Errors
    /// [`ClientError::Status`] on failure.
    pub async fn validate(
        &mut self,
        resource: &ResourceName,
        token: Token,
    ) -> Result<(bool, Vec<Token>), ClientError> {
        let req = pb::ValidateRequest {
            resource: resource.to_string(),
            token: token.0,
        };
        let r = self.inner.validate(req).await?.into_inner();
        Ok((r.current, r.current_tokens.into_iter().map(Token).collect()))
    }

    /// One resource.
    ///
    /// # Errors
    /// [`ClientError::Status`] on failure.
    pub async fn inspect(
        &mut self,
        resource: &ResourceName,
    ) -> Result<Option<ResourceView>, ClientError> {
        let req = pb::InspectRequest {
            resource: resource.to_string(),
        };
        let r = self.inner.inspect(req).await?.into_inner();
        Ok(r.resource.map(ResourceView::try_from).transpose()?)
    }

    /// Every known resource.
    ///
    /// # Errors
    /// [`ClientError::Status`] on failure.
    pub async fn list(&mut self) -> Result<Vec<ResourceView>, ClientError> {
        let r = self.inner.list(pb::ListRequest {}).await?.into_inner();
        Ok(r.resources
            .into_iter()
            .map(ResourceView::try_from)
            .collect::<Result<_, _>>()?)
    }

    /// The agent's status.
    ///
    /// # Errors
    /// [`ClientError::Status`] on failure.
    pub async fn status(&mut self) -> Result<pb::StatusResponse, ClientError> {
        Ok(self.inner.status(pb::StatusRequest {}).await?.into_inner())
    }

    /// Lease events as they happen, for one resource or all.
    ///
    /// # Errors
    /// [`ClientError::Status`] on failure.
    pub async fn watch(
        &mut self,
        resource: Option<&ResourceName>,
    ) -> Result<tonic::Streaming<pb::Event>, ClientError> {
        let req = pb::WatchRequest {
            resource: resource.map(ToString::to_string),
        };
        Ok(self.inner.watch(req).await?.into_inner())
    }
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}
