//! An acquire's stream read without blocking: for a holder that waits on its connection
//! beside other descriptors in one `poll` (`leasehold run`: its command, its signals), with
//! no thread to read it.

use std::io::{ErrorKind, Read};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use leasehold_core::ResourceName;

use super::answer::Body;
use super::{Acquisition, Error, ReleaseReport, release_request, tokens_unknown};
use crate::{AcquireEvent, ReleaseOptions};

/// The rest of an acquire's stream, read as far as the socket has it, never waiting: poll
/// [`HoldEvents::socket`] for reading, then call [`HoldEvents::read_events`].
#[derive(Debug)]
pub struct HoldEvents {
    socket: UnixStream,
    /// Bytes of the body not yet split into lines.
    body: Vec<u8>,
    /// Bytes from the socket not yet decoded (chunk framing).
    raw: Vec<u8>,
    framing: Framing,
    /// The connection was switched to `HOLD_UPGRADE`: a release may be sent on it.
    switched: bool,
    /// The stream has ended (the agent ended it, or the connection closed).
    over: bool,
}

/// Where the decoding of the body stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// Chunked: at a chunk's size line.
    Size,
    /// Chunked: so many bytes of a chunk's data to come, then its CRLF.
    Data(u64),
    /// Chunked: the CRLF after a chunk's data.
    Crlf,
    /// So many bytes of a body of known length to come (`u64::MAX`: until the connection
    /// closes).
    Length(u64),
    /// The body is over.
    Done,
}

impl Acquisition {
    /// The rest of the stream, read without blocking (the socket is made non-blocking):
    /// whatever was already read stays, so no event is lost or repeated.
    ///
    /// # Errors
    /// [`Error::Io`] when the socket cannot be made non-blocking.
    pub fn into_events(self) -> Result<HoldEvents, Error> {
        let switched = self.lines.status == 101;
        let body = self.lines.reader.buffer().to_vec();
        let (r, framing) = match self.lines.reader.into_inner() {
            Body::Length { r, left } => (r, Framing::Length(left)),
            Body::Chunked { r, done: true, .. } => (r, Framing::Done),
            Body::Chunked { r, left: 0, .. } => (r, Framing::Size),
            Body::Chunked { r, left, .. } => (r, Framing::Data(left)),
        };
        let raw = r.buffer().to_vec();
        let socket = r.into_inner();
        socket.set_nonblocking(true)?;
        Ok(HoldEvents {
            socket,
            body,
            raw,
            framing,
            switched,
            over: false,
        })
    }
}

impl HoldEvents {
    /// The connection, to poll for reading (or to shut down, which ends the hold).
    pub fn socket(&self) -> &UnixStream {
        &self.socket
    }

    /// Reads what the socket has now, without waiting, and returns the events complete so
    /// far (a line cut in two waits for its rest) and whether the stream has ended (the agent
    /// ended it, or closed the connection).
    ///
    /// # Errors
    /// [`Error::Io`] when the connection breaks; [`Error::Protocol`] for a malformed stream;
    /// [`Error::Refused`] or [`Error::Agent`] for an error line.
    pub fn read_events(&mut self) -> Result<(Vec<AcquireEvent>, bool), Error> {
        let mut closed = false;
        let mut buf = [0u8; 4096];
        loop {
            match (&self.socket).read(&mut buf) {
                Ok(0) => {
                    closed = true;
                    break;
                }
                Ok(n) => self.raw.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.decode()?;
        let mut events = Vec::new();
        while let Some(end) = self.body.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.body.drain(..=end).collect();
            let line = std::str::from_utf8(&line).map_err(Error::protocol)?;
            if !line.trim().is_empty() {
                events.push(super::event_of(line)?);
            }
        }
        let over = self.framing == Framing::Done || closed;
        self.over |= over;
        Ok((events, over))
    }

    /// Releases `resources` on the hold's own connection, where the agent switched it to
    /// `HOLD_UPGRADE` and it is still open: the agent carries out the release for the
    /// connection's process (as `Client::release` for the caller's own leases) and answers
    /// with the report, waiting at most `timeout` for it. `Ok(None)` when the release was not
    /// sent this way (an agent that does not know it, or that went away: the stream is over)
    /// or got no answer (the connection closed first, or was reset with the release unread):
    /// release on a new connection then. Any event before the answer is passed over.
    ///
    /// # Errors
    /// [`Error::Agent`] when the agent refused the release; [`Error::Io`] when no answer came
    /// within `timeout`; [`Error::Protocol`] for a malformed answer.
    pub fn release(
        &mut self,
        resources: &[ResourceName],
        o: &ReleaseOptions,
        timeout: Option<Duration>,
    ) -> Result<Option<ReleaseReport>, Error> {
        if !self.switched || self.over || o.pid.is_some() {
            return Ok(None);
        }
        let req = release_request(resources, o);
        let mut line = serde_json::to_vec(&req).map_err(Error::protocol)?;
        line.push(b'\n');
        // No SIGPIPE where the agent has gone: nothing was released, a new connection asks.
        let mut sent = 0;
        while sent < line.len() {
            match rustix::net::send(
                &self.socket,
                &line[sent..],
                rustix::net::SendFlags::NOSIGNAL,
            ) {
                Ok(n) => sent += n,
                Err(rustix::io::Errno::INTR) => {}
                Err(rustix::io::Errno::AGAIN) => {
                    wait_for(&self.socket, rustix::event::PollFlags::OUT, None)?;
                }
                // The agent went away before it had the whole line (it acts on a line only
                // once its newline is there): nothing was released, a new connection asks.
                Err(_) => {
                    self.over = true;
                    return Ok(None);
                }
            }
        }
        // Waited for before each read: the answer is not there before the agent has read the
        // release and committed it.
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if left.is_some_and(|l| l.is_zero()) {
                return Err(Error::Io(std::io::Error::new(
                    ErrorKind::TimedOut,
                    "the agent did not answer the release in time",
                )));
            }
            wait_for(&self.socket, rustix::event::PollFlags::IN, left)?;
            let (events, over) = match self.read_events() {
                // An agent that switched the hold but predates release tokens refuses the
                // field, releasing nothing, and ends the hold: release on a new connection,
                // where the client asks again without them.
                Err(e) if tokens_unknown(&e, &req) => {
                    self.over = true;
                    return Ok(None);
                }
                // The agent went away with the release unread (it closed with data in its
                // socket, which can only be the release: nothing else is sent after the
                // acquire): it never saw it, so nothing was released. Killed, or stopping
                // (a stopping agent cuts its connections without reading them): release on
                // a new connection, to the agent that restarted.
                Err(Error::Io(e)) if e.kind() == ErrorKind::ConnectionReset => {
                    self.over = true;
                    return Ok(None);
                }
                r => r?,
            };
            for ev in events {
                if let AcquireEvent::Released(report) = ev {
                    return Ok(Some(report));
                }
            }
            if over {
                return Ok(None);
            }
        }
    }

    /// Moves what can be decoded from `raw` into `body`.
    fn decode(&mut self) -> Result<(), Error> {
        let mut at = 0;
        loop {
            let rest = &self.raw[at..];
            match self.framing {
                Framing::Done => {
                    at = self.raw.len();
                    break;
                }
                Framing::Length(left) => {
                    let n = rest.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    self.body.extend_from_slice(&rest[..n]);
                    at += n;
                    let left = left - n as u64;
                    self.framing = if left == 0 {
                        Framing::Done
                    } else {
                        Framing::Length(left)
                    };
                    break;
                }
                Framing::Size => {
                    let Some(end) = rest.iter().position(|b| *b == b'\n') else {
                        break;
                    };
                    let line = std::str::from_utf8(&rest[..end]).map_err(Error::protocol)?;
                    let hex = line.trim().split(';').next().unwrap_or_default();
                    let size = u64::from_str_radix(hex, 16)
                        .map_err(|_| Error::Protocol(format!("a bad chunk size: {line:?}")))?;
                    at += end + 1;
                    self.framing = if size == 0 {
                        Framing::Done
                    } else {
                        Framing::Data(size)
                    };
                }
                Framing::Data(left) => {
                    if rest.is_empty() {
                        break;
                    }
                    let n = rest.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    self.body.extend_from_slice(&rest[..n]);
                    at += n;
                    let left = left - n as u64;
                    self.framing = if left == 0 {
                        Framing::Crlf
                    } else {
                        Framing::Data(left)
                    };
                }
                Framing::Crlf => {
                    if rest.len() < 2 {
                        break;
                    }
                    if &rest[..2] != b"\r\n" {
                        return Err(Error::protocol("a chunk not followed by CRLF"));
                    }
                    at += 2;
                    self.framing = Framing::Size;
                }
            }
        }
        self.raw.drain(..at);
        Ok(())
    }
}

/// Waits until `s` is ready for `what`, or `left` has passed.
fn wait_for(
    s: &UnixStream,
    what: rustix::event::PollFlags,
    left: Option<Duration>,
) -> Result<(), Error> {
    use rustix::event::{PollFd, Timespec, poll};
    let t = left.map(|t| Timespec {
        tv_sec: i64::try_from(t.as_secs()).unwrap_or(i64::MAX),
        tv_nsec: i64::from(t.subsec_nanos()),
    });
    let mut fds = [PollFd::new(s, what)];
    match poll(&mut fds, t.as_ref()) {
        Ok(_) | Err(rustix::io::Errno::INTR) => Ok(()),
        Err(e) => Err(Error::Io(e.into())),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::io::{BufReader, Write};
    use std::os::unix::net::UnixStream;

    use super::*;
    use crate::blocking::answer::Answer;

    const SAFE: &str = "{\"event\":\"safe\",\"until_monotonic_ns\":";

    /// A chunked answer whose body is `lines`, one chunk each, and its end when `end`.
    fn answer(lines: &[String], end: bool) -> Vec<u8> {
        let mut s = b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\n\
                      transfer-encoding: chunked\r\n\r\n"
            .to_vec();
        for l in lines {
            s.extend_from_slice(format!("{:X}\r\n{l}\r\n", l.len()).as_bytes());
        }
        if end {
            s.extend_from_slice(b"0\r\n\r\n");
        }
        s
    }

    fn safe(n: u64) -> String {
        format!("{SAFE}{n}}}\n")
    }

    fn until(ev: &AcquireEvent) -> u64 {
        match ev {
            AcquireEvent::Safe { until_monotonic_ns } => *until_monotonic_ns,
            e => panic!("not a safe event: {e:?}"),
        }
    }

    /// The stream cut at every byte, the first part read by the blocking reader (as `run`
    /// reads its grant) and the rest arriving one byte at a time: every event comes out once,
    /// in order, and the end is seen.
    #[test]
    fn every_event_once_wherever_the_stream_is_cut() {
        let lines: Vec<String> = (1..=4).map(safe).collect();
        let bytes = answer(&lines, true);
        let head = bytes.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        for cut in head..=bytes.len() {
            let (ours, mut theirs) = UnixStream::pair().unwrap();
            theirs.write_all(&bytes[..cut]).unwrap();
            let a = Answer::read(BufReader::new(ours.try_clone().unwrap())).unwrap();
            let mut acq = Acquisition { lines: a };
            let mut got = Vec::new();
            // The blocking reader takes the first event when its chunk is all there.
            if cut >= head + format!("{:X}\r\n", lines[0].len()).len() + lines[0].len() + 2 {
                got.push(until(&acq.next_event().unwrap().unwrap()));
            }
            let mut ev = acq.into_events().unwrap();
            let mut over = false;
            for b in &bytes[cut..] {
                let (e, _) = ev.read_events().unwrap();
                got.extend(e.iter().map(until));
                theirs.write_all(&[*b]).unwrap();
            }
            while !over {
                let (e, o) = ev.read_events().unwrap();
                got.extend(e.iter().map(until));
                over = o;
            }
            assert_eq!(got, vec![1, 2, 3, 4], "cut at {cut}");
        }
    }

    /// The events of a hold whose agent answered `head` and then `lines`, read by the blocking
    /// reader up to the grant, as `run` does; and the agent's end.
    fn hold_after(head: &[u8], lines: &[String]) -> (HoldEvents, UnixStream) {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        theirs.write_all(head).unwrap();
        for l in lines {
            theirs.write_all(l.as_bytes()).unwrap();
        }
        let mut acq = Acquisition {
            lines: Answer::read(BufReader::new(ours)).unwrap(),
        };
        assert!(acq.next_event().unwrap().is_some());
        (acq.into_events().unwrap(), theirs)
    }

    /// The agent's end of a switched hold: reads the release line, writes `answer`; the
    /// line it read.
    fn agent_answering(theirs: UnixStream, answer: Vec<u8>) -> std::thread::JoinHandle<String> {
        std::thread::spawn(move || {
            let mut r = BufReader::new(theirs.try_clone().unwrap());
            let mut line = String::new();
            std::io::BufRead::read_line(&mut r, &mut line).unwrap();
            let mut w = theirs;
            w.write_all(&answer).unwrap();
            line
        })
    }

    /// The agent's end of a switched hold going away once the release (or some of it) is
    /// there, without reading it.
    fn agent_gone_unread(theirs: UnixStream) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            let mut fds = [rustix::event::PollFd::new(
                &theirs,
                rustix::event::PollFlags::IN,
            )];
            rustix::event::poll(&mut fds, None).unwrap();
            drop(theirs);
        })
    }

    const SWITCHED: &[u8] = b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\n\
                              upgrade: leasehold-hold\r\n\r\n";

    fn disk() -> Vec<ResourceName> {
        vec![ResourceName::new("disk").unwrap()]
    }

    /// Where the agent answered `200` (one from before `leasehold-hold`), nothing is sent on
    /// the hold: the caller releases on a new connection.
    #[test]
    fn a_hold_not_switched_sends_no_release() {
        let (mut ev, theirs) = hold_after(&answer(&[safe(1)], false), &[]);
        let o = ReleaseOptions::default();
        assert!(ev.release(&disk(), &o, None).unwrap().is_none());
        theirs.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 16];
        assert!(
            matches!((&theirs).read(&mut buf), Err(e) if e.kind() == ErrorKind::WouldBlock),
            "nothing written"
        );
    }

    /// On a switched hold the release is one line (the request, dirty with its note), and the
    /// agent's `released` line is the report; events before it are passed over.
    #[test]
    fn a_switched_hold_sends_its_release_and_reads_the_report() {
        let (mut ev, theirs) = hold_after(SWITCHED, &[safe(1)]);
        let answer = safe(2) + "{\"event\":\"released\",\"released\":[],\"failed\":[]}\n";
        let agent = agent_answering(theirs, answer.into_bytes());
        let o = ReleaseOptions {
            dirty: true,
            note: Some("cut".into()),
            ..Default::default()
        };
        let report = ev
            .release(&disk(), &o, Some(Duration::from_secs(10)))
            .unwrap();
        assert_eq!(report, Some(ReleaseReport::default()));
        let sent: leasehold_api::v1::ReleaseRequest =
            serde_json::from_str(&agent.join().unwrap()).unwrap();
        assert_eq!(sent.resources, vec!["disk".to_owned()]);
        assert!(sent.dirty);
        assert_eq!(sent.note.as_deref(), Some("cut"));
    }

    /// A switched hold the agent closes before answering (it went away): no report, release
    /// on a new connection; one already over sends nothing.
    #[test]
    fn a_switched_hold_closed_before_the_answer_gives_no_report() {
        let (mut ev, theirs) = hold_after(SWITCHED, &[safe(1)]);
        let agent = std::thread::spawn(move || {
            let mut r = BufReader::new(theirs);
            let mut line = String::new();
            std::io::BufRead::read_line(&mut r, &mut line).unwrap();
        });
        let o = ReleaseOptions::default();
        assert!(
            ev.release(&disk(), &o, Some(Duration::from_secs(10)))
                .unwrap()
                .is_none()
        );
        agent.join().unwrap();
        assert!(ev.release(&disk(), &o, None).unwrap().is_none());
    }

    /// An agent that switched the hold but predates release tokens answers a release naming
    /// them with a usage error line (unknown field) and ends the hold, releasing nothing: no
    /// report, so `run` releases on a new connection, where the client asks again without
    /// them (`a_release_with_tokens_is_sent_again_without_them_to_an_agent_that_does_not_know_them`).
    #[test]
    fn a_switched_hold_whose_agent_does_not_know_tokens_gives_no_report() {
        let (mut ev, theirs) = hold_after(SWITCHED, &[safe(1)]);
        let agent = agent_answering(
            theirs,
            b"{\"event\":\"error\",\"code\":\"usage\",\"message\":\"the release on the hold \
              is not a valid ReleaseRequest: unknown field `tokens`, expected one of \
              `resources`, `pid` at line 1 column 30; nothing was done\"}\n"
                .to_vec(),
        );
        let o = ReleaseOptions {
            tokens: vec![leasehold_core::Token(17)],
            ..Default::default()
        };
        assert!(
            ev.release(&disk(), &o, Some(Duration::from_secs(10)))
                .unwrap()
                .is_none()
        );
        assert!(agent.join().unwrap().contains("\"tokens\":[17]"));
        // Over: a second release is not sent on it.
        assert!(ev.release(&disk(), &o, None).unwrap().is_none());
    }

    /// A switched hold whose agent goes away with the release unread (killed, or stopping:
    /// it closes with the line still in its socket, which gives this side `ECONNRESET`): the
    /// agent never saw the release, so nothing was released; no report, and `run` releases
    /// on a new connection (to the agent that restarted), as when the agent closes without
    /// answering. Before, the reset was an error: `run` gave up its clean release and the
    /// leases ended dirty at its exit although its command exited 0.
    #[test]
    fn a_switched_hold_whose_agent_goes_away_with_the_release_unread_gives_no_report() {
        let (mut ev, theirs) = hold_after(SWITCHED, &[safe(1)]);
        let agent = agent_gone_unread(theirs);
        let o = ReleaseOptions {
            tokens: vec![leasehold_core::Token(17)],
            ..Default::default()
        };
        let released = ev.release(&disk(), &o, Some(Duration::from_secs(10)));
        agent.join().unwrap();
        assert!(
            matches!(released, Ok(None)),
            "a release the agent never read: {released:?}"
        );
        // Over: a second release is not sent on it.
        assert!(ev.release(&disk(), &o, None).unwrap().is_none());
    }

    /// A release line longer than the socket takes at once (many resources) whose agent
    /// goes away after reading none or part of it: it acts on a line only once its newline is
    /// there, so nothing was released; no report, and `run` releases on a new connection.
    /// Before, a send that failed after the first bytes went was an error: `run` gave up its
    /// release and the leases ended dirty at its exit.
    #[test]
    fn a_switched_hold_whose_agent_goes_away_in_the_middle_of_the_release_gives_no_report() {
        let (mut ev, theirs) = hold_after(SWITCHED, &[safe(1)]);
        rustix::net::sockopt::set_socket_send_buffer_size(ev.socket(), 4096).unwrap();
        let agent = agent_gone_unread(theirs);
        let many: Vec<ResourceName> = (0..100)
            .map(|i| ResourceName::new(format!("{i:03}-{}", "d".repeat(1000))).unwrap())
            .collect();
        let o = ReleaseOptions::default();
        let released = ev.release(&many, &o, Some(Duration::from_secs(10)));
        agent.join().unwrap();
        assert!(
            matches!(released, Ok(None)),
            "a release the agent never had whole: {released:?}"
        );
        assert!(ev.release(&many, &o, None).unwrap().is_none());
    }

    /// Nothing there yet: no event, not over, and no waiting.
    #[test]
    fn nothing_to_read_returns_at_once() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        theirs.write_all(&answer(&[safe(9)], false)).unwrap();
        let mut acq = Acquisition {
            lines: Answer::read(BufReader::new(ours)).unwrap(),
        };
        assert_eq!(until(&acq.next_event().unwrap().unwrap()), 9);
        let mut ev = acq.into_events().unwrap();
        let (e, over) = ev.read_events().unwrap();
        assert!(e.is_empty() && !over);
        // The agent goes away without ending the stream: over.
        drop(theirs);
        let (e, over) = ev.read_events().unwrap();
        assert!(e.is_empty() && over);
    }

    /// A malformed chunk is an error, not an event or a hang.
    #[test]
    fn a_bad_chunk_size_is_a_protocol_error() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let mut bytes = answer(&[safe(1)], false);
        bytes.extend_from_slice(b"zz\r\n");
        theirs.write_all(&bytes).unwrap();
        let acq = Acquisition {
            lines: Answer::read(BufReader::new(ours)).unwrap(),
        };
        let mut ev = acq.into_events().unwrap();
        assert!(matches!(ev.read_events(), Err(Error::Protocol(_))));
    }
}
