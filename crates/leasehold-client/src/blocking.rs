//! A blocking client over the agent's HTTP/JSON API, with nothing but `std`: no async
//! runtime, no thread. One call is one connection, one request and one answer, so it can
//! run anywhere (a caller that makes many calls keeps one open instead: [`Connection`]), e.g. in a forked child before `exec` where no runtime or thread may run
//! (a libvirt lock driver).
//!
//! Its types are `leasehold-core`'s and this crate's ([`AcquireOptions`], [`Granted`],
//! [`Refusal`]); a refused acquire is [`Error::Refused`] with the holder as data, and a
//! release reports each resource's outcome ([`ReleaseReport`]).
//!
//! ```no_run
//! use leasehold_client::blocking::Client;
//! use leasehold_client::AcquireOptions;
//! use leasehold_core::{Mode, ResourceName};
//!
//! let client = Client::default_socket()?;
//! let disk = ResourceName::new("/srv/images/vm1.qcow2").unwrap();
//! let mut o = AcquireOptions::new([(disk.clone(), Mode::Exclusive)]);
//! o.pid = Some(std::process::id());
//! let granted = client.acquire(&o)?;
//! println!("token {}", granted.grants[0].token);
//! let report = client.release(&[disk], &Default::default())?;
//! assert!(report.failed.is_empty());
//! # Ok::<(), leasehold_client::blocking::Error>(())
//! ```

use std::io::{BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use leasehold_api::v1::{self, ApiError};
use leasehold_core::{Ended, Grant, Owner, Released, ResourceName, ResourceView, Token};
use serde::Serialize;
use serde::de::DeserializeOwned;

pub use leasehold_api::v1::{ErrorCode, Event, ExitCode, StatusResponse as Status};

use crate::{AcquireEvent, AcquireOptions, Granted, Refusal, RefusalKind, ReleaseOptions};

mod answer;
mod connection;
mod hold;
use answer::Answer;
pub use connection::Connection;
pub use hold::HoldEvents;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No socket was given and none could be found.
    #[error(
        "no agent socket: pass --socket or set LEASEHOLD_SOCKET (XDG_RUNTIME_DIR is not set either)"
    )]
    NoSocket,
    /// The agent could not be reached.
    #[error("cannot reach the leasehold agent at {}: {source}", socket.display())]
    Unreachable {
        /// The socket tried.
        socket: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The acquire was refused: who holds the resource, or why it needs a check.
    #[error("{}", .0.message)]
    Refused(Box<Refusal>),
    /// The agent answered with an error.
    #[error("{message}")]
    Agent {
        /// What went wrong, for programs.
        code: ErrorCode,
        /// What went wrong and what to do, for people.
        message: String,
    },
    /// The connection failed after it was made (the agent stopped, a timeout).
    #[error("the connection to the agent failed: {0}")]
    Io(#[from] std::io::Error),
    /// The agent's answer was not understood.
    #[error("malformed answer from the agent: {0}")]
    Protocol(String),
}

impl Error {
    /// The error's code, as the API defines it; `None` for errors of the connection.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Error::Refused(r) => Some(match r.kind {
                RefusalKind::Busy => ErrorCode::Held,
                RefusalKind::TimedOut => ErrorCode::TimedOut,
                RefusalKind::NeedsCheck => ErrorCode::NeedsCheck,
                RefusalKind::ModeConflict => ErrorCode::ModeConflict,
                RefusalKind::Cancelled => ErrorCode::Cancelled,
            }),
            Error::Agent { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Whether the error means the agent is not there: no socket, nothing listening, or
    /// the agent says it is stopping or overloaded (exit 5).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, Error::NoSocket | Error::Unreachable { .. })
            || self.code() == Some(ErrorCode::Unavailable)
    }

    /// Whether the agent did not answer within the client's timeout.
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::Io(e) if matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ))
    }

    /// The CLI's exit code for this error: [`ExitCode::Unreachable`] when the agent is not
    /// there or did not answer in time, else its code's ([`ErrorCode::exit_code`]).
    pub fn exit_code(&self) -> ExitCode {
        match self {
            Error::NoSocket | Error::Unreachable { .. } => ExitCode::Unreachable,
            e if e.is_timeout() => ExitCode::Unreachable,
            Error::Io(_) | Error::Protocol(_) => ExitCode::Error,
            e => e.code().map_or(ExitCode::Error, ErrorCode::exit_code),
        }
    }

    fn protocol(e: impl std::fmt::Display) -> Error {
        Error::Protocol(e.to_string())
    }
}

impl From<ApiError> for Error {
    fn from(e: ApiError) -> Error {
        let kind = match e.code {
            ErrorCode::Held => RefusalKind::Busy,
            ErrorCode::TimedOut => RefusalKind::TimedOut,
            ErrorCode::NeedsCheck => RefusalKind::NeedsCheck,
            ErrorCode::ModeConflict => RefusalKind::ModeConflict,
            ErrorCode::Cancelled => RefusalKind::Cancelled,
            code => {
                return Error::Agent {
                    code,
                    message: e.message,
                };
            }
        };
        let (conflict, blocked_for) = match e.conflict.map(|c| v1::conflict_from_v1(*c)).transpose()
        {
            Ok(Some(c)) => {
                let b = c.blocked_for;
                (Some(c), b)
            }
            Ok(None) => (None, None),
            Err(w) => return Error::protocol(w),
        };
        let dirty = match e.dirty.map(|d| Ended::try_from(*d)).transpose() {
            Ok(d) => d,
            Err(w) => return Error::protocol(w),
        };
        Error::Refused(Box::new(Refusal {
            kind,
            message: e.message,
            resource: e.resource.and_then(|r| ResourceName::new(r).ok()),
            conflict,
            blocked_for,
            dirty,
            accept_dirty_needs: e.accept_dirty_needs,
        }))
    }
}

/// A resource a release did not release, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseFailure {
    /// The resource.
    pub resource: String,
    /// Why, for programs.
    pub code: ErrorCode,
    /// Why, for people.
    pub message: String,
}

/// What a release did to each resource it named.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReleaseReport {
    /// The leases ended.
    pub released: Vec<Released>,
    /// The resources not released.
    pub failed: Vec<ReleaseFailure>,
}

/// The answer to validate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Validation {
    /// Whether the token is a live grant.
    pub current: bool,
    /// The tokens of the live leases.
    pub current_tokens: Vec<Token>,
}

/// A client of one agent socket. Cheap: it holds only the path; each call connects.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
    timeout: Option<Duration>,
}

impl Client {
    /// A client of the agent at `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Client {
        Client {
            socket: socket.into(),
            timeout: None,
        }
    }

    /// A client of the agent at [`crate::default_socket`].
    ///
    /// # Errors
    /// [`Error::NoSocket`] when there is none.
    pub fn default_socket() -> Result<Client, Error> {
        crate::default_socket()
            .map(Client::new)
            .ok_or(Error::NoSocket)
    }

    /// Gives up on an answer that does not come within `timeout` (`None`: never); a waiting
    /// acquire and a watch are not bounded by it once they have started.
    pub fn with_timeout(mut self, timeout: Option<Duration>) -> Client {
        self.timeout = timeout;
        self
    }

    /// How long a call waits for an answer (`None`: for ever).
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout
    }

    /// The socket this client talks to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Whether an agent listens on the socket (connects, and closes again).
    ///
    /// # Errors
    /// [`Error::Unreachable`] when nothing listens there.
    pub fn reachable(&self) -> Result<(), Error> {
        self.connect().map(drop)
    }

    fn connect(&self) -> Result<UnixStream, Error> {
        let s = UnixStream::connect(&self.socket).map_err(|source| Error::Unreachable {
            socket: self.socket.clone(),
            source,
        })?;
        s.set_read_timeout(self.timeout)?;
        s.set_write_timeout(self.timeout)?;
        Ok(s)
    }

    /// Sends one request; returns the answer's reader once its head is read. An error
    /// answer (not 2xx) is returned as its error.
    fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<Answer, Error> {
        // The request is made before connecting: the agent, woken by the connection, finds
        // it already there instead of waiting to be woken again.
        checked(self.send_bytes(&request_bytes(method, path, body, Head::Close)?)?)
    }

    /// Sends one request made by [`request_bytes`]; returns its answer's reader once its head
    /// is read, whatever its status.
    fn send_bytes(&self, req: &[u8]) -> Result<Answer, Error> {
        let mut s = self.connect()?;
        s.write_all(req)?;
        answer_ready(&s, self.timeout)?;
        Answer::read(BufReader::new(s))
    }

    fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, Error> {
        let text = self.send(method, path, body)?.text()?;
        serde_json::from_str(&text).map_err(Error::protocol)
    }

    /// Starts an acquire; its events follow on the returned stream.
    ///
    /// # Errors
    /// [`Error::Refused`] when refused at once (not waiting); [`Error::Agent`] when the
    /// request is malformed or not allowed.
    pub fn start_acquire(&self, o: &AcquireOptions) -> Result<Acquisition, Error> {
        self.start_acquire_request(&Client::acquire_request(o))
    }

    /// The API's request for `o`.
    fn acquire_request(o: &AcquireOptions) -> v1::AcquireRequest {
        v1::AcquireRequest {
            items: o
                .items
                .iter()
                .map(|(r, m)| v1::Item {
                    resource: r.to_string(),
                    mode: (*m).into(),
                })
                .collect(),
            pid: o.pid,
            start_time: o.start_time,
            owner_id: None,
            on_lost: v1::OnLost::Kill,
            label: o.label.clone(),
            accept_dirty: o.accept_dirty,
            wait: o.wait.map(v1::Dur),
            hold: o.hold,
            contain: o.contain,
            clone_into_cgroup: o.clone_into_cgroup,
            ..v1::AcquireRequest::default()
        }
    }

    /// [`Client::start_acquire`] with the API's request itself, for what the options do not
    /// carry: restricted leases, `on_exit`, expected tokens (the libvirt lock driver).
    ///
    /// # Errors
    /// As [`Client::start_acquire`].
    ///
    /// An agent older than this client, which refuses an optional field it does not know
    /// (`contain`, `clone_into_cgroup`: it denies unknown fields, G8), is asked once more
    /// without it ([`without_fields_unknown_to`]): an agent still running from before a
    /// package upgrade serves `run` as it did before them, until it restarts.
    pub fn start_acquire_request(&self, req: &v1::AcquireRequest) -> Result<Acquisition, Error> {
        match self.start_acquire_once(req) {
            Err(Error::Agent {
                code: v1::ErrorCode::Usage,
                message,
            }) => match without_fields_unknown_to(req, &message) {
                Some(older) => self.start_acquire_once(&older),
                None => Err(Error::Agent {
                    code: v1::ErrorCode::Usage,
                    message,
                }),
            },
            r => r,
        }
    }

    fn start_acquire_once(&self, req: &v1::AcquireRequest) -> Result<Acquisition, Error> {
        // A hold asks for its connection to be switched to `HOLD_UPGRADE`, to release on it
        // later ([`HoldEvents::release`]); an agent that does not know it answers as before.
        let head = if req.hold { Head::Hold } else { Head::Close };
        let answer = self.send_bytes(&request_bytes("POST", "/v1/acquire", Some(req), head)?)?;
        let answer = if req.hold && answer.status == 101 {
            answer
        } else {
            checked(answer)?
        };
        // A wait is as long as it is: the stream is not bounded by the call timeout.
        answer.reader.get_ref().inner().set_read_timeout(None)?;
        Ok(Acquisition { lines: answer })
    }

    /// Acquires, waiting as the options say, and returns the grant. The connection closes
    /// after the grant; with `hold`, use [`Client::start_acquire`] and keep the stream.
    ///
    /// # Errors
    /// [`Error::Refused`] with the holder when refused.
    pub fn acquire(&self, o: &AcquireOptions) -> Result<Granted, Error> {
        self.start_acquire(o)?.granted()
    }

    /// Releases `resources` held by the process of `o` (the caller's by default); reports
    /// each one's outcome.
    ///
    /// # Errors
    /// [`Error::Agent`] when the request as a whole is refused (malformed, no such process,
    /// not allowed): then nothing was released.
    pub fn release(
        &self,
        resources: &[ResourceName],
        o: &ReleaseOptions,
    ) -> Result<ReleaseReport, Error> {
        release_by(release_request(resources, o), |req| {
            self.call("POST", "/v1/release", Some(req))
        })
    }

    /// Revokes every lease on `resource` (root or the admin group).
    ///
    /// # Errors
    /// [`Error::Agent`] when not allowed.
    pub fn force_release(
        &self,
        resource: &ResourceName,
        reason: &str,
    ) -> Result<Vec<Released>, Error> {
        let req = v1::ForceReleaseRequest {
            resource: resource.to_string(),
            reason: reason.to_owned(),
        };
        let r: v1::ReleaseResponse = self.call("POST", "/v1/force-release", Some(&req))?;
        Ok(report(r)?.released)
    }

    /// Clears the dirty mark of `resource` (root or the admin group); the mark it had.
    ///
    /// # Errors
    /// [`Error::Agent`] when not allowed.
    pub fn mark_clean(&self, resource: &ResourceName) -> Result<Option<Ended>, Error> {
        let req = v1::ResourceRequest {
            resource: resource.to_string(),
        };
        let r: v1::MarkCleanResponse = self.call("POST", "/v1/mark-clean", Some(&req))?;
        r.was
            .map(Ended::try_from)
            .transpose()
            .map_err(Error::protocol)
    }

    /// Whether `token` is a live grant of `resource`.
    ///
    /// # Errors
    /// [`Error::Agent`] for a bad name.
    pub fn validate(&self, resource: &ResourceName, token: Token) -> Result<Validation, Error> {
        let req = v1::ValidateRequest {
            resource: resource.to_string(),
            token: token.0,
        };
        let r: v1::ValidateResponse = self.call("POST", "/v1/validate", Some(&req))?;
        Ok(Validation {
            current: r.current,
            current_tokens: r.current_tokens.into_iter().map(Token).collect(),
        })
    }

    /// One resource; `None` when the agent knows nothing of it.
    ///
    /// # Errors
    /// [`Error::Agent`] for a bad name.
    pub fn inspect(&self, resource: &ResourceName) -> Result<Option<ResourceView>, Error> {
        let req = v1::ResourceRequest {
            resource: resource.to_string(),
        };
        let r: v1::InspectResponse = self.call("POST", "/v1/inspect", Some(&req))?;
        r.resource
            .map(ResourceView::try_from)
            .transpose()
            .map_err(Error::protocol)
    }

    /// Every known resource, in name order (every page of [`Client::list_page`]).
    ///
    /// # Errors
    /// [`Error::Agent`] when the backend does not answer.
    pub fn list(&self) -> Result<Vec<ResourceView>, Error> {
        self.list_where(&v1::ListQuery::default())
    }

    /// Every resource `q` asks for (its filters; its `after` and `limit` start and size the
    /// pages), in name order: the pages are asked for one after another until the last.
    ///
    /// # Errors
    /// As [`Client::list_page`].
    pub fn list_where(&self, q: &v1::ListQuery) -> Result<Vec<ResourceView>, Error> {
        let mut q = q.clone();
        let mut all = Vec::new();
        loop {
            let (page, next) = self.list_page(&q)?;
            all.extend(page);
            match next {
                // A `next` that does not move on would ask for the same page forever.
                Some(n) if q.after.as_ref() != Some(&n) => q.after = Some(n),
                Some(n) => {
                    return Err(Error::Protocol(format!(
                        "the agent answered the page after {n:?} with the same page again"
                    )));
                }
                None => return Ok(all),
            }
        }
    }

    /// One page of the resources `q` asks for, in name order, and the name to pass as `after`
    /// for the next page when more follow.
    ///
    /// # Errors
    /// [`Error::Agent`] when the backend does not answer or the query is refused.
    pub fn list_page(
        &self,
        q: &v1::ListQuery,
    ) -> Result<(Vec<ResourceView>, Option<String>), Error> {
        let query = q.to_query();
        let path = if query.is_empty() {
            "/v1/leases".to_owned()
        } else {
            format!("/v1/leases?{query}")
        };
        let r: v1::ListResponse = self.call("GET", &path, None::<&()>)?;
        let views = r
            .resources
            .into_iter()
            .map(ResourceView::try_from)
            .collect::<Result<_, _>>()
            .map_err(Error::protocol)?;
        Ok((views, r.next))
    }

    /// The agent's status.
    ///
    /// # Errors
    /// [`Error::Unreachable`] when no agent answers.
    pub fn status(&self) -> Result<Status, Error> {
        self.call("GET", "/v1/status", None::<&()>)
    }

    /// Every host's session on the backend: alive or expired since when, leases held.
    ///
    /// # Errors
    /// [`Error::Unreachable`] when no agent answers; [`Error::Agent`] when the backend does
    /// not.
    pub fn hosts(&self) -> Result<Vec<v1::Host>, Error> {
        let r: v1::HostsResponse = self.call("GET", "/v1/hosts", None::<&()>)?;
        Ok(r.hosts)
    }

    /// Lease events as they happen from the moment this returns, for one resource or all.
    ///
    /// # Errors
    /// [`Error::Agent`] for a bad name.
    pub fn watch(&self, resource: Option<&ResourceName>) -> Result<Watch, Error> {
        let req = v1::WatchRequest {
            resource: resource.map(ToString::to_string),
        };
        let answer = self.send("POST", "/v1/watch", Some(&req))?;
        answer.reader.get_ref().inner().set_read_timeout(None)?;
        Ok(Watch { lines: answer })
    }
}

/// What a request asks of its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Head {
    /// Closed after the answer.
    Close,
    /// Kept open for the next request.
    KeepAlive,
    /// A hold's: switched to [`v1::HOLD_UPGRADE`] where the agent knows it, else closed
    /// after the answer.
    Hold,
    /// A kept-alive connection's first: switched to [`v1::CALLS_UPGRADE`] where the agent
    /// knows it, else kept open.
    Calls,
}

/// One request, head and body, as written on the connection.
fn request_bytes(
    method: &str,
    path: &str,
    body: Option<&impl Serialize>,
    head: Head,
) -> Result<Vec<u8>, Error> {
    let body = match body {
        Some(b) => serde_json::to_vec(b).map_err(Error::protocol)?,
        None => Vec::new(),
    };
    request_with(method, path, &body, head)
}

/// One request whose body is `body`'s JSON (empty: none), head and body.
fn request_with(method: &str, path: &str, body: &[u8], head: Head) -> Result<Vec<u8>, Error> {
    let hold;
    let close = match head {
        Head::Close => "connection: close\r\n",
        Head::KeepAlive => "",
        Head::Hold => {
            hold = format!(
                "connection: close, upgrade\r\nupgrade: {}\r\n",
                v1::HOLD_UPGRADE
            );
            &hold
        }
        Head::Calls => {
            hold = format!("connection: upgrade\r\nupgrade: {}\r\n", v1::CALLS_UPGRADE);
            &hold
        }
    };
    // Written into one buffer the size of the whole request (`format!` made a string that
    // grew as it was written, then grew again for the body).
    let mut req = Vec::with_capacity(128 + method.len() + path.len() + body.len());
    write!(
        req,
        "{method} {path} HTTP/1.1\r\nhost: leasehold\r\n{close}\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )?;
    req.extend_from_slice(body);
    Ok(req)
}

/// Waits until the answer to the request just written can be read, or the agent closed, or
/// `timeout` passed (then the error a read timing out gives).
///
/// The wait is a `poll` for input, not a blocking read: a thread asleep in `recv` on a Unix
/// socket is also woken each time the peer reads what it sent (the kernel's "write space"
/// wake-up of the socket's one wait queue), that is once per request when the agent reads it,
/// for nothing; `poll` sleeps for input only. The read that follows finds the answer there.
fn answer_ready(s: &UnixStream, timeout: Option<Duration>) -> Result<(), Error> {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    let deadline = timeout.map(|t| std::time::Instant::now() + t);
    loop {
        let left = deadline.map(|d| {
            let t = d.saturating_duration_since(std::time::Instant::now());
            Timespec {
                tv_sec: i64::try_from(t.as_secs()).unwrap_or(i64::MAX),
                tv_nsec: i64::from(t.subsec_nanos()),
            }
        });
        let mut fds = [PollFd::new(s, PollFlags::IN)];
        match poll(&mut fds, left.as_ref()) {
            Ok(0) => return Err(Error::Io(rustix::io::Errno::AGAIN.into())),
            Ok(_) => return Ok(()),
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(Error::Io(e.into())),
        }
    }
}

/// `req` without the optional fields an older agent refused it for (`message`, its usage
/// error, names the first unknown field it met: serde's ``unknown field `NAME` ``), when it is
/// one of those this client may add: `contain` (agents before it, which contain a `run` by its
/// process group only, and know no `clone_into_cgroup` either) or `clone_into_cgroup` (agents
/// that move the wrapper into its cgroup instead). `None` for any other refusal, which stands.
fn without_fields_unknown_to(
    req: &v1::AcquireRequest,
    message: &str,
) -> Option<v1::AcquireRequest> {
    let refused = |field: &str| message.contains(&format!("unknown field `{field}`"));
    if req.contain && refused("contain") {
        return Some(v1::AcquireRequest {
            contain: false,
            clone_into_cgroup: false,
            ..req.clone()
        });
    }
    if req.clone_into_cgroup && refused("clone_into_cgroup") {
        return Some(v1::AcquireRequest {
            clone_into_cgroup: false,
            ..req.clone()
        });
    }
    None
}

/// The answer, or its error when the agent answered one (not 2xx).
fn checked(answer: Answer) -> Result<Answer, Error> {
    if !(200..300).contains(&answer.status) {
        let status = answer.status;
        let text = answer.text()?;
        let e: ApiError = serde_json::from_str(&text).map_err(|e| {
            Error::Protocol(format!(
                "status {status} with a body that is no error ({e}): {text}"
            ))
        })?;
        return Err(e.into());
    }
    Ok(answer)
}

/// A release sent by `call`; refused by an agent from before release tokens (see
/// [`tokens_unknown`]), sent again without them.
pub(crate) fn release_by(
    mut req: v1::ReleaseRequest,
    mut call: impl FnMut(&v1::ReleaseRequest) -> Result<v1::ReleaseResponse, Error>,
) -> Result<ReleaseReport, Error> {
    let r = match call(&req) {
        Err(e) if tokens_unknown(&e, &req) => {
            req.tokens.clear();
            call(&req)?
        }
        r => r?,
    };
    report(r)
}

/// Whether `e` is an agent from before release tokens refusing the field (its request types
/// deny unknown fields, and it refused the whole request, releasing nothing): the release is
/// then sent again without them, by owner, as that agent releases. An agent still running
/// the old binary after an upgrade would otherwise refuse every `run`'s final release.
pub(crate) fn tokens_unknown(e: &Error, req: &v1::ReleaseRequest) -> bool {
    !req.tokens.is_empty()
        && matches!(e, Error::Agent { code: ErrorCode::Usage, message }
            if message.contains("unknown field `tokens`"))
}

/// The API's release request for `resources` and `o`.
fn release_request(resources: &[ResourceName], o: &ReleaseOptions) -> v1::ReleaseRequest {
    v1::ReleaseRequest {
        resources: resources.iter().map(ToString::to_string).collect(),
        pid: o.pid,
        start_time: o.start_time,
        owner_id: None,
        dirty: o.dirty,
        note: o.note.clone(),
        handover_to: o.handover_to.clone(),
        tokens: o.tokens.iter().map(|t| t.0).collect(),
    }
}

fn report(r: v1::ReleaseResponse) -> Result<ReleaseReport, Error> {
    Ok(ReleaseReport {
        released: r
            .released
            .into_iter()
            .map(Released::try_from)
            .collect::<Result<_, _>>()
            .map_err(Error::protocol)?,
        failed: r
            .failed
            .into_iter()
            .map(|f| ReleaseFailure {
                resource: f.resource,
                code: f.error.code,
                message: f.error.message,
            })
            .collect(),
    })
}

/// An acquire in progress: its events until granted or refused, and with `hold`, after.
#[derive(Debug)]
pub struct Acquisition {
    lines: Answer,
}

impl Acquisition {
    /// The next event; `Ok(None)` when the agent ended the stream (with `hold`: every lease
    /// of the grant has ended).
    ///
    /// # Errors
    /// [`Error::Refused`] when the acquire is refused; [`Error::Io`] when the connection
    /// breaks (the agent stopped).
    pub fn next_event(&mut self) -> Result<Option<AcquireEvent>, Error> {
        let Some(line) = self.lines.line()? else {
            return Ok(None);
        };
        event_of(&line).map(Some)
    }

    /// Waits for the grant, passing over progress reports.
    ///
    /// # Errors
    /// As [`Acquisition::next_event`]; [`Error::Io`] when the stream ends first.
    pub fn granted(&mut self) -> Result<Granted, Error> {
        loop {
            match self.next_event()? {
                Some(AcquireEvent::Granted(g)) => return Ok(g),
                Some(_) => {}
                None => {
                    return Err(Error::Io(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the agent ended the acquire without an answer",
                    )));
                }
            }
        }
    }

    /// The connection, e.g. to poll it beside other descriptors or to shut it down (which
    /// withdraws a waiting request and ends a hold).
    pub fn socket(&self) -> &UnixStream {
        self.lines.reader.get_ref().inner()
    }
}

/// An event of an acquire's stream, from its line.
fn event_of(line: &str) -> Result<AcquireEvent, Error> {
    let event: v1::AcquireEvent = serde_json::from_str(line).map_err(Error::protocol)?;
    Ok(match event {
        v1::AcquireEvent::Waiting {
            note: Some(note), ..
        } => AcquireEvent::Note(note),
        v1::AcquireEvent::Waiting {
            conflict, waited, ..
        } => {
            let conflict = v1::conflict_from_v1(
                conflict
                    .ok_or_else(|| Error::protocol("a waiting line without who is in the way"))?,
            )
            .map_err(Error::protocol)?;
            let blocked_for = conflict.blocked_for;
            AcquireEvent::Waiting {
                conflict,
                blocked_for,
                waited: waited.0,
            }
        }
        v1::AcquireEvent::Granted {
            grants,
            owner,
            safe_until_monotonic_ns,
            containment,
            cgroup,
        } => AcquireEvent::Granted(Granted {
            grants: grants
                .into_iter()
                .map(Grant::try_from)
                .collect::<Result<_, _>>()
                .map_err(Error::protocol)?,
            owner: Owner::try_from(owner).map_err(Error::protocol)?,
            safe_until_monotonic_ns,
            containment,
            cgroup: cgroup.map(std::path::PathBuf::from),
        }),
        v1::AcquireEvent::Safe { until_monotonic_ns } => AcquireEvent::Safe { until_monotonic_ns },
        v1::AcquireEvent::Lost { resource, ended } => AcquireEvent::Lost {
            resource: ResourceName::new(resource).map_err(Error::protocol)?,
            ended: Ended::try_from(ended).map_err(Error::protocol)?,
        },
        v1::AcquireEvent::Error(e) => return Err(e.into()),
        v1::AcquireEvent::Released(r) => AcquireEvent::Released(report(r)?),
    })
}

/// Lease events as they happen.
#[derive(Debug)]
pub struct Watch {
    lines: Answer,
}

impl Watch {
    /// The connection, e.g. to shut it down (which ends the watch).
    pub fn socket(&self) -> &UnixStream {
        self.lines.reader.get_ref().inner()
    }
}

impl Iterator for Watch {
    type Item = Result<Event, Error>;

    fn next(&mut self) -> Option<Result<Event, Error>> {
        let line = match self.lines.line() {
            Ok(Some(l)) => l,
            Ok(None) => return None,
            Err(e) => return Some(Err(e)),
        };
        Some(
            serde_json::from_str::<Event>(&line)
                .map_err(Error::protocol)
                .and_then(|e| match e.error {
                    Some(err) => Err(err.into()),
                    None => Ok(e),
                }),
        )
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::io::{BufRead, Write};
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    use super::answer_ready;

    /// One HTTP request read off `s`: its head and body (by its content-length).
    fn read_request(s: &mut UnixStream) -> String {
        let mut r = std::io::BufReader::new(s);
        let mut head = String::new();
        let mut length = 0;
        loop {
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().unwrap();
            }
            head.push_str(&line);
            if line == "\r\n" {
                break;
            }
        }
        let mut body = vec![0; length];
        std::io::Read::read_exact(&mut r, &mut body).unwrap();
        head + &String::from_utf8(body).unwrap()
    }

    fn answer(s: &mut UnixStream, status: &str, body: &str) {
        write!(
            s,
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
    }

    /// An agent from before release tokens refuses the field (its request types deny unknown
    /// fields), as a usage error that released nothing: the release goes again without
    /// tokens, by owner, as that agent releases. Without this, every `run` of a new CLI would
    /// fail its final release on an agent not yet restarted after an upgrade. Here a fake old
    /// agent answers as the old one did; on both the plain client and a kept-alive connection.
    #[test]
    fn a_release_with_tokens_is_sent_again_without_them_to_an_agent_that_does_not_know_them() {
        use leasehold_core::{ResourceName, Token};
        let dir = std::env::temp_dir().join(format!(
            "leasehold-client-tokens-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("agent.sock");
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let old_agent = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for _ in 0..2 {
                let (mut first, _) = listener.accept().unwrap();
                seen.push(read_request(&mut first));
                answer(
                    &mut first,
                    "400 Bad Request",
                    r#"{"code":"usage","message":"the request body is not a valid ReleaseRequest: unknown field `tokens`, expected one of `resources`, `pid`, `start_time`, `owner_id`, `dirty`, `note`, `handover_to` at line 1 column 40; nothing was done (the schema: docs/api/v1.schema.json)"}"#,
                );
                drop(first);
                let (mut again, _) = listener.accept().unwrap();
                seen.push(read_request(&mut again));
                answer(&mut again, "200 OK", r#"{"released":[],"failed":[]}"#);
            }
            seen
        });
        let client = super::Client::new(&socket);
        let o = crate::ReleaseOptions {
            pid: Some(1),
            tokens: vec![Token(17)],
            ..Default::default()
        };
        let disk = [ResourceName::new("disk").unwrap()];
        let report = client.release(&disk, &o).unwrap();
        assert!(report.released.is_empty() && report.failed.is_empty());
        let report = client.keep_alive().release(&disk, &o).unwrap();
        assert!(report.released.is_empty() && report.failed.is_empty());
        let seen = old_agent.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        for pair in seen.chunks(2) {
            assert!(pair[0].contains(r#""tokens":[17]"#), "{}", pair[0]);
            assert!(!pair[1].contains("tokens"), "{}", pair[1]);
            assert!(pair[1].contains(r#""resources":["disk"]"#), "{}", pair[1]);
        }
    }

    #[test]
    fn the_wait_for_an_answer_ends_with_its_bytes_or_the_close_or_times_out_as_a_read() {
        let (ours, mut agent) = UnixStream::pair().unwrap();
        // Nothing sent: the wait ends as a read past its timeout would.
        let e = answer_ready(&ours, Some(Duration::from_millis(20))).unwrap_err();
        assert!(e.is_timeout(), "{e:?}");
        // Answer bytes there (and the agent's reading of the request is no answer).
        let mut reader = std::io::BufReader::new(ours.try_clone().unwrap());
        agent.write_all(b"HTTP/1.1 200 OK\r\n").unwrap();
        answer_ready(&ours, None).unwrap();
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert_eq!(line, "HTTP/1.1 200 OK\r\n");
        // The agent closed: the wait ends, the read that follows sees the end.
        drop(agent);
        answer_ready(&ours, Some(Duration::from_secs(30))).unwrap();
        line.clear();
        assert_eq!(reader.read_line(&mut line).unwrap(), 0);
    }
}
