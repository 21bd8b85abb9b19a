//! A connection kept open between calls (HTTP/1.1 keep-alive), for a caller that makes many:
//! it saves the connect, the agent's accept and the reading of the peer's credentials on
//! each call. The agent still reads the caller's credentials once, at connect: a connection
//! acts for the process that opened it.

use std::io::{BufReader, Read, Write as _};
use std::os::unix::net::UnixStream;

use leasehold_api::v1;
use leasehold_core::ResourceName;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{
    Acquisition, Answer, Client, Error, Head, Status, answer_ready, checked, release_by,
    release_request, request_bytes,
};
use crate::{AcquireOptions, Granted, ReleaseOptions, ReleaseReport};

/// One connection to the agent, used for call after call ([`Client::keep_alive`]). A call
/// whose answer is an error, or that fails, leaves it closed; the next call connects again.
///
/// The agent closes a connection idle past its request timeout; the next call's write then
/// fails and is sent again on a new connection. That write raises `SIGPIPE` in a process
/// that does not ignore it (Rust programs do; a C host of this library must), so such a
/// process uses [`Client`]'s one connection per call instead.
#[derive(Debug)]
pub struct Connection {
    client: Client,
    open: Option<BufReader<UnixStream>>,
    /// The read timeout the open connection has (set only when it changes: a system call).
    timeout: Option<std::time::Duration>,
}

/// Whether a call on a connection used before failed because the agent had closed it (an
/// idle connection it timed out): nothing of the request was read, so it is sent again on
/// a new connection.
fn closed_before(e: &Error) -> bool {
    use std::io::ErrorKind as K;
    matches!(e, Error::Io(io) if matches!(
        io.kind(),
        K::UnexpectedEof | K::ConnectionReset | K::BrokenPipe
    ))
}

impl Client {
    /// A connection kept open for many calls; it connects at its first call.
    pub fn keep_alive(&self) -> Connection {
        Connection {
            client: self.clone(),
            open: None,
            timeout: None,
        }
    }
}

impl Connection {
    /// Sends one request on the open connection (or a new one) and returns its answer's head.
    fn send(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<Answer, Error> {
        // Made once, before connecting, as `Client::send` does: the same bytes go on a new
        // connection if the open one was closed before it.
        let req = request_bytes(method, path, body, Head::KeepAlive)?;
        if let Some(mut r) = self.open.take() {
            self.timeout(r.get_ref(), self.client.timeout)?;
            let t = self.timeout;
            let sent = r
                .get_mut()
                .write_all(&req)
                .map_err(Error::from)
                .and_then(|()| answer_ready(r.get_ref(), t))
                .and_then(|()| Answer::read(r));
            match sent {
                Err(e) if closed_before(&e) => {}
                other => return checked(other?),
            }
        }
        let mut s = self.client.connect()?;
        self.timeout = self.client.timeout;
        s.write_all(&req)?;
        answer_ready(&s, self.timeout)?;
        checked(Answer::read(BufReader::new(s))?)
    }

    /// The open connection, if any (none before the first call and after a failed one).
    pub fn socket(&self) -> Option<&UnixStream> {
        self.open.as_ref().map(BufReader::get_ref)
    }

    /// Gives the connection `s` the read timeout `t`, unless it has it.
    fn timeout(&mut self, s: &UnixStream, t: Option<std::time::Duration>) -> Result<(), Error> {
        if self.timeout != t {
            s.set_read_timeout(t)?;
            self.timeout = t;
        }
        Ok(())
    }

    /// Keeps the connection of an answer read to its end for the next call.
    fn keep(&mut self, answer: Answer) {
        self.open = answer.finish();
    }

    fn call<T: DeserializeOwned>(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, Error> {
        let mut answer = self.send(method, path, body)?;
        let mut text = String::new();
        answer.reader.read_to_string(&mut text)?;
        self.keep(answer);
        serde_json::from_str(&text).map_err(Error::protocol)
    }

    /// [`Client::acquire`] on this connection: waits as the options say and returns the
    /// grant, once the agent has ended its answer.
    ///
    /// # Errors
    /// As [`Client::acquire`]; [`Error::Agent`] (usage) with `hold`, whose stream needs a
    /// connection of its own ([`Client::start_acquire`]).
    pub fn acquire(&mut self, o: &AcquireOptions) -> Result<Granted, Error> {
        if o.hold {
            return Err(Error::Agent {
                code: v1::ErrorCode::Usage,
                message: "a held acquire keeps its connection for its stream: use \
                          Client::start_acquire, not a kept-alive connection"
                    .into(),
            });
        }
        let answer = self.send("POST", "/v1/acquire", Some(&Client::acquire_request(o)))?;
        // A wait is as long as it is: the stream is not bounded by the call timeout.
        if o.wait.is_some() {
            self.timeout(answer.reader.get_ref().inner(), None)?;
        }
        let mut acq = Acquisition { lines: answer };
        let granted = acq.granted()?;
        // The agent ends the answer once it has seen the grant read.
        while acq.lines.line()?.is_some() {}
        self.keep(acq.lines);
        Ok(granted)
    }

    /// [`Client::release`] on this connection.
    ///
    /// # Errors
    /// As [`Client::release`].
    pub fn release(
        &mut self,
        resources: &[ResourceName],
        o: &ReleaseOptions,
    ) -> Result<ReleaseReport, Error> {
        release_by(release_request(resources, o), |req| {
            self.call("POST", "/v1/release", Some(req))
        })
    }

    /// [`Client::status`] on this connection.
    ///
    /// # Errors
    /// As [`Client::status`].
    pub fn status(&mut self) -> Result<Status, Error> {
        self.call("GET", "/v1/status", None::<&()>)
    }
}
