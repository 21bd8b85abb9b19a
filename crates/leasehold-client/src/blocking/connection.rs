//! A connection kept open between calls (HTTP/1.1 keep-alive), for a caller that makes many:
//! it saves the connect, the agent's accept and the reading of the peer's credentials on
//! each call. The agent still reads the caller's credentials once, at connect: a connection
//! acts for the process that opened it.
//!
//! Its first call asks for the connection to be switched to [`v1::CALLS_UPGRADE`]: where the
//! agent knows it, the calls that follow (a plain acquire, a release, status) are one line
//! each way, without HTTP's headers and their parsing on either side. An agent that does not
//! know it answers over HTTP, and the connection stays HTTP.

use std::io::{BufRead, BufReader, Read, Write as _};
use std::os::unix::net::UnixStream;

use leasehold_api::v1;
use leasehold_core::ResourceName;
use serde::Serialize;
use serde::de::DeserializeOwned;

use leasehold_api::v1::ApiError;

use super::{
    Acquisition, Answer, Client, Error, Head, Status, answer_ready, checked, event_of, release_by,
    release_request, request_with,
};
use crate::AcquireEvent;
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
    /// The open connection was switched to [`v1::CALLS_UPGRADE`]: a line a call.
    lines: bool,
}

/// One call's answer (a success: an error is returned as one, and the connection closed).
enum Reply {
    /// Over HTTP: its body is still to be read.
    Http(Answer),
    /// On a switched connection: the body's JSON.
    Line(String),
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
            lines: false,
        }
    }
}

impl Connection {
    /// Sends one request on the open connection (or a new one) and returns its answer. A call
    /// that `fits` a line goes as one on a switched connection, and asks a new connection to
    /// be switched; one that does not needs an HTTP connection.
    fn send(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&impl Serialize>,
        fits: bool,
    ) -> Result<Reply, Error> {
        let body = body
            .map(|b| serde_json::to_vec(b).map_err(Error::protocol))
            .transpose()?;
        if !fits && self.lines {
            // Not a call a switched connection carries: this one goes on a new connection.
            self.open = None;
        }
        // Made once, before connecting, as `Client::send` does: the same bytes go on a new
        // connection if the open one was closed before it.
        if let Some(mut r) = self.open.take() {
            self.timeout(r.get_ref(), self.client.timeout)?;
            let t = self.timeout;
            let sent = if self.lines {
                let mut req = Vec::with_capacity(
                    method.len() + path.len() + 3 + body.as_ref().map_or(0, Vec::len),
                );
                req.extend_from_slice(method.as_bytes());
                req.push(b' ');
                req.extend_from_slice(path.as_bytes());
                if let Some(body) = &body {
                    req.push(b' ');
                    req.extend_from_slice(body);
                }
                req.push(b'\n');
                r.get_mut()
                    .write_all(&req)
                    .map_err(Error::from)
                    .and_then(|()| answer_ready(r.get_ref(), t))
                    .and_then(|()| line_answer(&mut r))
                    .map(|text| (Reply::Line(text), Some(r)))
            } else {
                request_with(
                    method,
                    path,
                    body.as_deref().unwrap_or_default(),
                    Head::KeepAlive,
                )
                .and_then(|req| r.get_mut().write_all(&req).map_err(Error::from))
                .and_then(|()| answer_ready(r.get_ref(), t))
                .and_then(|()| Answer::read(r))
                .and_then(checked)
                .map(|a| (Reply::Http(a), None))
            };
            match sent {
                Err(e) if closed_before(&e) => {}
                Err(e) => return Err(e),
                Ok((reply, r)) => {
                    self.open = r;
                    return Ok(reply);
                }
            }
        }
        let head = if fits { Head::Calls } else { Head::KeepAlive };
        let req = request_with(method, path, body.as_deref().unwrap_or_default(), head)?;
        let mut s = self.client.connect()?;
        self.timeout = self.client.timeout;
        self.lines = false;
        s.write_all(&req)?;
        answer_ready(&s, self.timeout)?;
        let answer = Answer::read(BufReader::new(s))?;
        if fits && answer.status == 101 {
            let mut r = answer
                .switched()
                .ok_or_else(|| Error::Protocol("bytes after a 101's head".into()))?;
            let text = line_answer(&mut r)?;
            self.open = Some(r);
            self.lines = true;
            return Ok(Reply::Line(text));
        }
        checked(answer).map(Reply::Http)
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
        let text = match self.send(method, path, body, true)? {
            Reply::Http(mut answer) => {
                let mut text = String::new();
                answer.reader.read_to_string(&mut text)?;
                self.keep(answer);
                text
            }
            Reply::Line(text) => text,
        };
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
        // A switched connection carries an acquire that neither waits nor asks `contain`.
        let fits = o.wait.is_none() && !o.contain;
        let answer = match self.send(
            "POST",
            "/v1/acquire",
            Some(&Client::acquire_request(o)),
            fits,
        )? {
            Reply::Line(text) => {
                return match event_of(&text)? {
                    AcquireEvent::Granted(g) => Ok(g),
                    _ => {
                        self.open = None;
                        Err(Error::Protocol(format!(
                            "an acquire answered without its grant: {text}"
                        )))
                    }
                };
            }
            Reply::Http(answer) => answer,
        };
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

/// The answer's line on a switched connection: the body's JSON when its status is a success,
/// else the error it carries (and the connection is not kept).
fn line_answer(r: &mut BufReader<UnixStream>) -> Result<String, Error> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 || !line.ends_with('\n') {
        return Err(Error::Io(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the agent closed the connection without answering",
        )));
    }
    line.pop();
    let status = line
        .get(..4)
        .filter(|s| s.ends_with(' '))
        .and_then(|s| s[..3].parse::<u16>().ok())
        .ok_or_else(|| Error::Protocol(format!("not an answer's line: {line:?}")))?;
    line.replace_range(..4, "");
    if !(200..300).contains(&status) {
        let e: ApiError = serde_json::from_str(&line).map_err(|e| {
            Error::Protocol(format!(
                "status {status} with a body that is no error ({e}): {line}"
            ))
        })?;
        return Err(e.into());
    }
    Ok(line)
}
