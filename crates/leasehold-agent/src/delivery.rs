//! Whether the client of a connection read what the agent wrote to it, learnt from the socket.
//!
//! A waited grant counts only once the client has it: a client that withdrew its wait (closed
//! the connection) just as it was granted never learnt the token, and the grant is undone.
//! Two facts of Linux's Unix stream sockets (net/unix/af_unix.c) tell the cases apart without
//! any reply from the client:
//! - `ioctl(SIOCOUTQ)` gives the bytes this side sent that the peer has not read yet (0 once
//!   it read everything, or once its socket is gone);
//! - a peer that closes with unread data sets this side's socket error to `ECONNRESET` (before
//!   throwing that data away); one that read everything first does not.
//!
//! So after the grant's line is flushed to the socket: nothing unread and no error = received;
//! `ECONNRESET` = not received. A client that keeps the connection open without reading for
//! [`RECEIVED_WITHIN`] is alive and counts as having it: a lease is never taken back from a
//! client that may hold it (that would let two hold it), only from one that surely went away.
//!
//! The agent's own reads and writes on the socket also see (and clear) that error, so they go
//! through [`Delivery::io`], which notes it under the same lock the check takes.
//!
//! An answer that ends with its grant (an acquire that neither waits nor holds: the client
//! reads it and sends its next request at once) is checked by position instead ([`Ending`]):
//! the writes count the bytes put in the socket and find where the answer's last byte went,
//! so `written - SIOCOUTQ` (how far the peer read) says whether it read past the answer's end,
//! whatever was written after it; and a reset says "not received" only when nothing was
//! written after the answer (then the unread data is the answer's), else the grant counts as
//! received, as a client that may hold it must.
//! A connection gone before the answer's end was found written (the writer copied it, or
//! wrote part of it) undoes only when no byte was written since the answer was handed to the
//! writer (none of it can have left); otherwise it counts as received, for the same reason.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::Poll;
use std::time::Duration;

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;
use tokio::time::Instant;

/// How long a client that neither reads nor closes is given before a grant counts as received.
pub(crate) const RECEIVED_WITHIN: Duration = Duration::from_secs(5);

/// The longest pause between two looks at a socket whose client has not read yet.
const LOOK_AT_MOST_EVERY: Duration = Duration::from_millis(50);

/// What the agent knows of one connection's socket.
#[derive(Debug)]
pub(crate) struct Delivery {
    /// The socket, valid while `state.closed` is false (checked under the lock).
    fd: RawFd,
    state: Mutex<State>,
    /// How many flushes completed: the writer's buffer was empty, all in the socket.
    flushes: AtomicU64,
    /// Told of each flush, reset and close.
    changed: Notify,
    /// How many times the socket was looked at (for the tests: a check waits for the peer,
    /// it does not poll).
    looks: AtomicU64,
    /// The connection's writes are kept back until its owner takes them
    /// ([`crate::peer::PeerStream::uncork`]).
    corked: AtomicBool,
}

#[derive(Debug, Default)]
struct State {
    /// The socket's write space, watched while a check waits for the peer; kept between
    /// checks from the connection's second on (a kept-alive client's next grants), not after
    /// its first: most connections carry one grant, and then a long hold (a `run`), which
    /// needs no second descriptor.
    space: Option<Arc<AsyncFd<OwnedFd>>>,
    /// How many checks the connection has had.
    checks: u64,
    /// The connection was dropped: its fd may be closed (or reused).
    closed: bool,
    /// The peer closed with data unread (ECONNRESET, seen by the agent's reads or a check).
    reset: bool,
    /// Bytes written to the socket so far, through [`Delivery::io_write`].
    written: u64,
    /// Ended answers handed to the writer whose last byte is not written yet.
    endings: Vec<Arc<Ending>>,
}

/// Where in the connection's output an answer that ends with its grant ends.
#[derive(Debug)]
pub(crate) struct Ending {
    /// The address just past the answer's last byte, in the buffer the writer hands to the
    /// socket (the HTTP server queues the body's bytes without copying them).
    end: usize,
    /// The offset in the connection's output just past the answer's last byte, once written.
    at: Mutex<Position>,
}

/// What is known of where an [`Ending`] went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Position {
    /// Not handed to the writer yet.
    Pending,
    /// Handed to the writer when this many bytes had been written to the socket, and not
    /// found wholly written since. Once the count has moved past it, some of the answer may
    /// have left (copied by the writer, or partly written), so the peer may have read it.
    Handed(u64),
    /// Its last byte is at this offset of the connection's output (exclusive).
    At(u64),
    /// Written, but not found in the writes (the writer copied it): where is unknown.
    Unknown,
}

impl Ending {
    /// The end of an answer whose last bytes are `last`, the very buffer the writer will be
    /// handed (not a copy).
    pub(crate) fn new(last: &[u8]) -> Arc<Ending> {
        Arc::new(Ending {
            end: last.as_ptr() as usize + last.len(),
            at: Mutex::new(Position::Pending),
        })
    }

    fn position(&self) -> Position {
        *self.at.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set(&self, p: Position) {
        *self.at.lock().unwrap_or_else(PoisonError::into_inner) = p;
    }
}

/// A point in the connection's output: what was handed to the writer before it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Mark(u64);

/// What one look at the socket shows.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    /// Everything written was read (or the connection closed without a reset).
    Read,
    /// Some is still unread, the peer's socket open.
    Unread,
    /// The peer closed with data unread.
    Reset,
}

/// A peer that closed with data unread. (Not `EPIPE`: a write gets it from any closed peer,
/// also one that read everything first.)
fn is_reset(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(libc::ECONNRESET)
}

impl Delivery {
    /// Watches socket `fd`; the caller calls [`Delivery::closed`] before closing it.
    pub(crate) fn new(fd: RawFd) -> Arc<Delivery> {
        Arc::new(Delivery {
            fd,
            state: Mutex::default(),
            flushes: AtomicU64::new(0),
            changed: Notify::new(),
            looks: AtomicU64::new(0),
            corked: AtomicBool::new(false),
        })
    }

    /// Keeps the connection's writes back from now until its owner takes them, to write them
    /// with its own next bytes in one go: a switched hold's `101` with its first line, which
    /// the client reads at once instead of waking for each. The writes kept back are not
    /// flushes ([`Delivery::mark`]).
    pub(crate) fn cork(&self) {
        self.corked.store(true, Ordering::SeqCst);
    }

    /// Whether writes are kept back.
    pub(crate) fn is_corked(&self) -> bool {
        self.corked.load(Ordering::SeqCst)
    }

    /// Writes go to the socket again.
    pub(crate) fn uncork(&self) {
        self.corked.store(false, Ordering::SeqCst);
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs a read or write on the socket, noting a reset it returns: the kernel clears the
    /// error as it reports it, and a check must not miss it.
    pub(crate) fn io<T>(
        &self,
        f: impl FnOnce() -> Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        let mut state = self.lock();
        let r = f();
        if let Poll::Ready(Err(e)) = &r
            && is_reset(e)
        {
            state.reset = true;
            drop(state);
            self.changed.notify_waiters();
        }
        r
    }

    /// A write of `bufs` on the socket, as [`Delivery::io`], counting the bytes written and
    /// finding the ends of the answers handed to the writer ([`Delivery::ending`]) among them,
    /// under the lock a look takes: a look never sees bytes in the socket not yet counted.
    pub(crate) fn io_write(
        &self,
        bufs: &[std::io::IoSlice<'_>],
        f: impl FnOnce() -> Poll<std::io::Result<usize>>,
    ) -> Poll<std::io::Result<usize>> {
        let mut state = self.lock();
        let r = f();
        match &r {
            Poll::Ready(Ok(n)) => wrote(&mut state, bufs, *n),
            Poll::Ready(Err(e)) if is_reset(e) => {
                state.reset = true;
                drop(state);
                self.changed.notify_waiters();
            }
            _ => {}
        }
        r
    }

    /// The writer takes the last bytes of an answer that ends with a grant ([`Ending::new`]):
    /// call as it takes them. [`Delivery::ending_received`] then tells whether the peer read
    /// them.
    pub(crate) fn handed(&self, ending: &Arc<Ending>) {
        let mut state = self.lock();
        if !state.closed {
            // Under the lock the writes take: no byte of the answer is counted before this.
            if ending.position() == Position::Pending {
                ending.set(Position::Handed(state.written));
            }
            state.endings.push(ending.clone());
        }
    }

    /// The peer sent more: a check of an ended answer looks again (a client sends its next
    /// request once it has read the answer).
    pub(crate) fn read_some(&self) {
        self.changed.notify_waiters();
    }

    /// A flush completed: everything handed to the writer is in the socket.
    pub(crate) fn flushed(&self) {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        let unplaced = std::mem::take(&mut self.lock().endings);
        // Written (the flush ends only once the writer's buffer is empty) but not found in
        // the writes: the writer copied the bytes; where they went is not known.
        for e in unplaced {
            e.set(Position::Unknown);
        }
        self.changed.notify_waiters();
    }

    /// Whether the process that opened the connection still exists (is not reaped), so that
    /// its pid still names it: `Some(false)` once it is gone, and the pid may be another
    /// process's; `None` when the kernel cannot say (before Linux 6.5: no `SO_PEERPIDFD`) or
    /// the connection is dropped. The socket keeps the opener's `struct pid` from the
    /// connect: the pidfd made of it is of that process, never of a pid reused meanwhile.
    pub(crate) fn opener_alive(&self) -> Option<bool> {
        let state = self.lock();
        if state.closed {
            return None;
        }
        let mut raw: libc::c_int = -1;
        let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).ok()?;
        // SAFETY: the fd is open while `closed` is false, which the lock held keeps so;
        // SO_PEERPIDFD writes one int, `len` bytes at most, into `raw`.
        let r = unsafe {
            libc::getsockopt(
                self.fd,
                libc::SOL_SOCKET,
                libc::SO_PEERPIDFD,
                (&raw mut raw).cast(),
                &mut len,
            )
        };
        drop(state);
        if r < 0 {
            // Linux 6.5-6.15 refuse a pidfd of a peer already reaped (EINVAL; ESRCH in some).
            return match std::io::Error::last_os_error().raw_os_error() {
                Some(libc::EINVAL | libc::ESRCH) => Some(false),
                _ => None,
            };
        }
        // SAFETY: the kernel made `raw` a new descriptor, owned from here on.
        let pidfd = unsafe { OwnedFd::from_raw_fd(raw) };
        // Linux 6.16 and later give a pidfd of a reaped peer too; a signal 0 says it is gone.
        // SAFETY: pidfd_send_signal with signal 0 (no signal, only the checks), no info, no
        // flags, on a descriptor open for the call's length.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                pidfd.as_raw_fd(),
                0,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if r == 0 {
            return Some(true);
        }
        match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::ESRCH) => Some(false),
            _ => None,
        }
    }

    /// The connection is being dropped: its fd is looked at one last time, then never again.
    /// The last look matters: a connection dropped because a later write failed (`EPIPE`,
    /// which any closed peer gives) has not reported the `ECONNRESET` a peer that closed with
    /// the grant unread left on the socket, and after this nobody could.
    pub(crate) fn closed(&self) {
        let mut state = self.lock();
        if !state.closed
            && !state.reset
            && let Ok(Some(e)) = socket_error(self.fd)
            && is_reset(&e)
        {
            state.reset = true;
        }
        state.closed = true;
        let space = state.space.take();
        drop(state);
        // Closed here unless a check still holds it (it returns once told of the close).
        drop(space);
        self.changed.notify_waiters();
    }

    /// Marks the output here: call as the writer takes the data to check, before it flushes.
    pub(crate) fn mark(&self) -> Mark {
        Mark(self.flushes.load(Ordering::SeqCst))
    }

    /// One look at the socket.
    fn look(&self) -> Seen {
        self.looks.fetch_add(1, Ordering::Relaxed);
        let mut state = self.lock();
        if state.reset {
            return Seen::Reset;
        }
        if state.closed {
            // Dropped without a reset (the agent's reads and the last look at the drop would
            // have seen one): the peer read everything and closed, or the agent stopped.
            return Seen::Read;
        }
        // Unread bytes first, then the error: a peer closing with data unread sets the error
        // before its queue is emptied, so "none unread" with no error means it read them.
        match unread(self.fd) {
            Ok(0) => {}
            Ok(_) => return Seen::Unread,
            // Never on a Unix stream socket; when unsure, it counts as received.
            Err(_) => return Seen::Read,
        }
        match socket_error(self.fd) {
            Ok(Some(e)) if is_reset(&e) => {
                state.reset = true;
                Seen::Reset
            }
            _ => Seen::Read,
        }
    }

    /// Whether the peer received what the writer was handed before `mark`: once it is flushed,
    /// the socket is looked at until the peer has read it (true) or closed without (false),
    /// for at most `within` (then true: the peer is alive).
    pub(crate) async fn received(&self, mark: Mark, within: Duration) -> bool {
        let r = self.check(mark, within).await;
        let space = {
            let mut state = self.lock();
            state.checks += 1;
            if state.checks < 2 {
                state.space.take()
            } else {
                None
            }
        };
        drop(space);
        r
    }

    /// Whether the peer read the whole of an answer that ended with a grant (`ending`, handed
    /// to the writer by [`Delivery::handed`]): looked at as the connection changes (a flush,
    /// the client's next request, a reset, the close) and otherwise every
    /// [`LOOK_AT_MOST_EVERY`], for at most `within` (then true: the peer is alive).
    pub(crate) async fn ending_received(&self, ending: &Ending, within: Duration) -> bool {
        self.ending_received_paced(ending, within, LOOK_AT_MOST_EVERY)
            .await
    }

    /// [`Delivery::ending_received`], looking at least every `pace`.
    async fn ending_received_paced(
        &self,
        ending: &Ending,
        within: Duration,
        pace: Duration,
    ) -> bool {
        let give_up = Instant::now() + within;
        loop {
            let changed = self.changed.notified();
            match self.look_at_ending(ending) {
                Seen::Read => return true,
                Seen::Reset => return false,
                Seen::Unread => {}
            }
            let now = Instant::now();
            if now >= give_up {
                return true;
            }
            let _ = tokio::time::timeout_at((now + pace).min(give_up), changed).await;
        }
    }

    /// One look at the socket for an ended answer: read once the peer's read position
    /// (`written - SIOCOUTQ`) is past its end; not received once the peer closed with data
    /// unread that can only be the answer's (nothing was written after it), or before any of
    /// it was written. A reset with more written after the answer leaves unknown whether the
    /// peer read it: received, as a client that may hold a grant must keep it; and so is a
    /// connection gone after bytes were written since the answer was handed but before its
    /// end was found among them (a writer that copied it and had not flushed yet, or a write
    /// cut short): some of it may have left. Undoing a grant the client read would let two
    /// hold the resource (G1); keeping one it did not read only keeps it until its process,
    /// which the agent watches, exits (G4).
    fn look_at_ending(&self, ending: &Ending) -> Seen {
        self.looks.fetch_add(1, Ordering::Relaxed);
        let mut state = self.lock();
        let gone = state.reset || state.closed;
        let end = match ending.position() {
            // Copied by the writer: where it ended is unknown.
            Position::Unknown => return Seen::Read,
            // Never handed to the writer, and never will be: the peer cannot have any of it.
            Position::Pending if gone => return Seen::Reset,
            // Handed, and nothing written since, and never will be: none of it left.
            Position::Handed(at) if gone && state.written == at => return Seen::Reset,
            // Handed, and bytes written since: some of it may have been read.
            Position::Handed(_) if gone => return Seen::Read,
            Position::Pending | Position::Handed(_) => return Seen::Unread,
            Position::At(end) => end,
        };
        let reset = |state: &State| {
            if state.written <= end {
                Seen::Reset
            } else {
                Seen::Read
            }
        };
        if state.reset {
            return reset(&state);
        }
        if state.closed {
            // Dropped without a reset (see `look`).
            return Seen::Read;
        }
        // Unread bytes first, then the error, as in `look`: a peer that closes with data
        // unread sets the error before its queue is emptied (0 unread then says nothing of
        // how far it read), so only a queue not empty gives the peer's position.
        match unread(self.fd) {
            Ok(0) => {}
            Ok(q) if state.written.saturating_sub(q as u64) >= end => return Seen::Read,
            Ok(_) => return Seen::Unread,
            // Never on a Unix stream socket; when unsure, it counts as received.
            Err(_) => return Seen::Read,
        }
        match socket_error(self.fd) {
            Ok(Some(e)) if is_reset(&e) => {
                state.reset = true;
                reset(&state)
            }
            _ => Seen::Read,
        }
    }

    async fn check(&self, mark: Mark, within: Duration) -> bool {
        let give_up = Instant::now() + within;
        // Not in the socket before the writer flushed it.
        loop {
            let changed = self.changed.notified();
            // Gone first, then flushed: the writer flushes before the connection is dropped,
            // so a flush before the drop is seen here, however late this task runs.
            let gone = {
                let state = self.lock();
                state.reset || state.closed
            };
            if self.flushes.load(Ordering::SeqCst) > mark.0 {
                break;
            }
            if gone {
                // Dropped before it was wholly written: the peer cannot have it all.
                return false;
            }
            if tokio::time::timeout_at(give_up, changed).await.is_err() {
                return true;
            }
        }
        // Woken when the peer reads: the kernel wakes the writer's socket for write space
        // (an `EPOLLOUT` edge, `unix_write_space`) as each of the agent's buffers is consumed,
        // and with `EPOLLHUP` when the peer closes. A timer paces further looks as well, in
        // case neither comes (a socket the agent could not watch).
        let mut space = self.lock().space.clone();
        if let Some(fd) = &space {
            // Edges from before this check (the peer reading earlier answers) are old news.
            let _ = fd.try_io(Interest::WRITABLE, |_| {
                Err::<(), _>(std::io::ErrorKind::WouldBlock.into())
            });
        }
        let mut watch = true;
        let mut pause = Duration::from_millis(1);
        loop {
            let changed = self.changed.notified();
            match self.look() {
                Seen::Read => return true,
                Seen::Reset => return false,
                Seen::Unread => {}
            }
            let now = Instant::now();
            if now >= give_up {
                return true;
            }
            if space.is_none() && watch {
                space = self.watch_space();
            }
            let until = (now + pause).min(give_up);
            match &space {
                // An edge since the last look is kept by tokio until cleared: cleared here, it
                // is followed by a look, and an edge after the clear wakes the next wait.
                Some(fd) => tokio::select! {
                    ready = fd.writable() => match ready {
                        Ok(mut guard) => guard.clear_ready(),
                        // The runtime's driver is gone: the timer alone paces the looks.
                        Err(_) => watch = false,
                    },
                    () = changed => {}
                    () = tokio::time::sleep_until(until) => pause = (pause * 2).min(LOOK_AT_MOST_EVERY),
                },
                None => {
                    if tokio::time::timeout_at(until, changed).await.is_err() {
                        pause = (pause * 2).min(LOOK_AT_MOST_EVERY);
                    }
                }
            }
            if !watch {
                space = None;
            }
        }
    }

    /// A second descriptor of the socket, registered for write space only, so that the check
    /// is woken when the peer reads (the connection's own registration belongs to the HTTP
    /// server); made when a check first waits, kept as [`State::space`] says. `None` once
    /// the connection is dropped, or if it cannot be made (then a timer paces the looks).
    fn watch_space(&self) -> Option<Arc<AsyncFd<OwnedFd>>> {
        let mut state = self.lock();
        if state.closed {
            return None;
        }
        if let Some(space) = &state.space {
            return Some(space.clone());
        }
        // SAFETY: the fd is open while `closed` is false, which the lock held keeps so.
        let fd = unsafe { BorrowedFd::borrow_raw(self.fd) };
        let dup = fd.try_clone_to_owned().ok()?;
        // SAFETY: `dup` is an open descriptor, owned by the `AsyncFd` for its whole life.
        let space =
            Arc::new(unsafe { AsyncFd::register_with_interest(dup, Interest::WRITABLE) }.ok()?);
        state.space = Some(space.clone());
        Some(space)
    }
}

/// Counts `n` bytes written from `bufs`, and places the endings wholly written among them
/// (found by the address just past their last byte: a partial write's remainder, written
/// later, starts further on but ends there too).
fn wrote(state: &mut State, bufs: &[std::io::IoSlice<'_>], n: usize) {
    let before = state.written;
    state.written += n as u64;
    if state.endings.is_empty() {
        return;
    }
    let mut offset = 0usize;
    for b in bufs {
        let end_here = offset + b.len();
        if end_here > n {
            break;
        }
        if !b.is_empty() {
            let end = b.as_ptr() as usize + b.len();
            state.endings.retain(|e| {
                if e.end == end {
                    e.set(Position::At(before + end_here as u64));
                    false
                } else {
                    true
                }
            });
        }
        offset = end_here;
    }
}

/// The bytes written to socket `fd` that its peer has not read yet (`SIOCOUTQ`).
fn unread(fd: RawFd) -> std::io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (= SIOCOUTQ) writes one int through the pointer, which points at `n`.
    let r = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut n) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(usize::try_from(n).unwrap_or(0))
}

/// Socket `fd`'s pending error (`SO_ERROR`), which reading clears.
fn socket_error(fd: RawFd) -> std::io::Result<Option<std::io::Error>> {
    let mut e: libc::c_int = 0;
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>())
        .map_err(std::io::Error::other)?;
    // SAFETY: SO_ERROR writes one int, `len` bytes at most, into `e`.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&raw mut e).cast(),
            &mut len,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((e != 0).then(|| std::io::Error::from_raw_os_error(e)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    use super::*;

    /// The kernel facts this module stands on, checked on the running kernel.
    #[test]
    fn the_kernel_tells_read_from_closed_unread() {
        // Read, then closed: nothing unread, no error.
        let (a, mut b) = UnixStream::pair().unwrap();
        (&a).write_all(b"granted\n").unwrap();
        assert!(
            unread(a.as_raw_fd()).unwrap() > 0,
            "SIOCOUTQ counts unread bytes"
        );
        let mut buf = [0u8; 64];
        assert_eq!(b.read(&mut buf).unwrap(), 8);
        assert_eq!(unread(a.as_raw_fd()).unwrap(), 0, "and none once read");
        drop(b);
        assert_eq!(unread(a.as_raw_fd()).unwrap(), 0);
        assert!(socket_error(a.as_raw_fd()).unwrap().is_none());

        // Closed unread: ECONNRESET on the writer, its queue emptied.
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(b"granted\n").unwrap();
        drop(b);
        assert_eq!(unread(a.as_raw_fd()).unwrap(), 0);
        let e = socket_error(a.as_raw_fd()).unwrap().expect("an error");
        assert_eq!(e.raw_os_error(), Some(libc::ECONNRESET), "{e}");
        // Reading the error clears it.
        assert!(socket_error(a.as_raw_fd()).unwrap().is_none());

        // Partly read, then closed: still a reset.
        let (a, mut b) = UnixStream::pair().unwrap();
        (&a).write_all(b"granted\n").unwrap();
        assert_eq!(b.read(&mut buf[..3]).unwrap(), 3);
        drop(b);
        let e = socket_error(a.as_raw_fd()).unwrap().expect("an error");
        assert_eq!(e.raw_os_error(), Some(libc::ECONNRESET), "{e}");
    }

    /// A check after the flush: read, closed unread, and alive without reading.
    #[tokio::test]
    async fn a_flushed_write_counts_once_read_and_not_if_closed_unread() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let d = Delivery::new(a.as_raw_fd());
        let mark = d.mark();
        (&a).write_all(b"granted\n").unwrap();
        d.flushed();
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            b.read(&mut buf).unwrap()
        });
        assert!(d.received(mark, Duration::from_secs(60)).await);
        assert_eq!(reader.join().unwrap(), 8);

        let (a, b) = UnixStream::pair().unwrap();
        let d = Delivery::new(a.as_raw_fd());
        let mark = d.mark();
        (&a).write_all(b"granted\n").unwrap();
        d.flushed();
        drop(b);
        assert!(!d.received(mark, Duration::from_secs(60)).await);

        // Flushed, read, and the connection dropped before the check first runs: received.
        let (a, mut b) = UnixStream::pair().unwrap();
        let d = Delivery::new(a.as_raw_fd());
        let mark = d.mark();
        (&a).write_all(b"granted\n").unwrap();
        d.flushed();
        assert_eq!(b.read(&mut [0u8; 64]).unwrap(), 8);
        drop(b);
        d.closed();
        assert!(d.received(mark, Duration::from_secs(60)).await);

        // Flushed, closed unread, then a later write fails (EPIPE, not the reset) and the
        // connection is dropped before the check first runs: not received. (Before the last
        // look at the drop, this counted as read, and the grant stayed with nobody.)
        let (a, b) = UnixStream::pair().unwrap();
        let d = Delivery::new(a.as_raw_fd());
        let mark = d.mark();
        (&a).write_all(b"granted\n").unwrap();
        d.flushed();
        drop(b);
        let e = (&a).write_all(b"safe\n").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPIPE), "{e}");
        d.closed();
        assert!(!d.received(mark, Duration::from_secs(60)).await);

        // Not flushed and dropped: not received.
        let (a, _b) = UnixStream::pair().unwrap();
        let d = Delivery::new(a.as_raw_fd());
        let mark = d.mark();
        d.closed();
        assert!(!d.received(mark, Duration::from_secs(60)).await);

        // Alive, not reading: received after the bound.
        let (a, _b) = UnixStream::pair().unwrap();
        let d = Delivery::new(a.as_raw_fd());
        let mark = d.mark();
        (&a).write_all(b"granted\n").unwrap();
        d.flushed();
        let started = std::time::Instant::now();
        assert!(d.received(mark, Duration::from_millis(200)).await);
        assert!(started.elapsed() >= Duration::from_millis(200));
    }

    /// The check waits for the peer to read (woken by the socket's write space), instead of
    /// looking again and again: a peer that reads after 100 ms costs a few looks, not the
    /// hundreds of a check that looked after every turn of the runtime.
    #[tokio::test]
    async fn a_check_is_woken_by_the_peers_read_without_polling_the_socket() {
        let (a, mut b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let d = Delivery::new(a.as_raw_fd());
        let mark = d.mark();
        (&a).write_all(b"granted\n").unwrap();
        d.flushed();
        let reader = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            let read_at = std::time::Instant::now();
            let mut buf = [0u8; 64];
            let n = b.read(&mut buf).unwrap();
            (n, read_at, b)
        });
        assert!(d.received(mark, Duration::from_secs(60)).await);
        let seen_at = std::time::Instant::now();
        let (n, read_at, b) = reader.join().unwrap();
        assert_eq!(n, 8);
        assert!(seen_at >= read_at, "received only once read");
        let looks = d.looks.load(Ordering::Relaxed);
        // Paced by the peer: the first look, the backstop timer's (1, 2, 4 ... ms, so about
        // seven in 100 ms), and one or two on the socket's readiness.
        assert!(looks <= 16, "{looks} looks at the socket for one read");
        assert!(
            d.lock().space.is_none(),
            "no second descriptor kept after a connection's first grant"
        );

        // The connection's next grant (kept alive): its check is woken the same way, by the
        // read of its own answer.
        let mut b = b;
        let mark = d.mark();
        (&a).write_all(b"granted again\n").unwrap();
        d.flushed();
        let reader = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            let mut buf = [0u8; 64];
            b.read(&mut buf).unwrap()
        });
        assert!(d.received(mark, Duration::from_secs(60)).await);
        assert_eq!(reader.join().unwrap(), 14);
        let looks = d.looks.load(Ordering::Relaxed) - looks;
        assert!(
            looks <= 16,
            "{looks} looks at the socket for the second read"
        );
        assert!(
            d.lock().space.is_some(),
            "kept from the second grant on, for the next"
        );
        d.closed();
        assert!(d.lock().space.is_none(), "and closed with the connection");
    }

    /// Writes `head` and `line` to the socket as the HTTP server does (one vectored write,
    /// `line` the very buffer handed), through the delivery, then flushes.
    fn answer(d: &Delivery, a: &UnixStream, head: &[u8], line: &[u8]) -> Arc<Ending> {
        let ending = Ending::new(line);
        d.handed(&ending);
        let bufs = [std::io::IoSlice::new(head), std::io::IoSlice::new(line)];
        let n = match d.io_write(&bufs, || Poll::Ready((&*a).write_vectored(&bufs))) {
            Poll::Ready(Ok(n)) => n,
            other => panic!("{other:?}"),
        };
        assert_eq!(n, head.len() + line.len());
        d.flushed();
        ending
    }

    /// An answer ended with its grant: received once the peer read past its end, whatever is
    /// written after it; not received when the peer closed with it unread, or before it was
    /// written; and a reset with more written after the answer counts as received (the peer
    /// may have read the answer).
    #[tokio::test]
    async fn an_ended_answer_counts_once_read_past_its_end() {
        let within = Duration::from_secs(60);
        // Read whole: received.
        let (a, mut b) = UnixStream::pair().unwrap();
        let d = Delivery::new(a.as_raw_fd());
        let e = answer(&d, &a, b"HTTP/1.1 200 OK\r\n\r\n", b"granted\n");
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            let n = b.read(&mut buf).unwrap();
            (n, b)
        });
        let (n, mut b) = reader.join().unwrap();
        assert_eq!(n, 27);
        assert!(d.ending_received(&e, within).await);

        // The connection's next answer, read only up to this one's last byte but one, then
        // closed: not received (only this answer's bytes were unread... and nothing after).
        let e = answer(&d, &a, b"HTTP/1.1 200 OK\r\n\r\n", b"granted again\n");
        let mut buf = [0u8; 32];
        assert_eq!(b.read(&mut buf[..32]).unwrap(), 32);
        drop(b);
        assert!(!d.ending_received(&e, within).await);

        // Read whole, then a later answer written and left unread as the peer closes: the
        // reset is the later answer's; received.
        let (a, mut b) = UnixStream::pair().unwrap();
        let d = Delivery::new(a.as_raw_fd());
        let e = answer(&d, &a, b"HTTP/1.1 200 OK\r\n\r\n", b"granted\n");
        assert_eq!(b.read(&mut [0u8; 27]).unwrap(), 27);
        let bufs = [std::io::IoSlice::new(b"status\n")];
        let _ = d.io_write(&bufs, || Poll::Ready((&a).write_vectored(&bufs)));
        drop(b);
        assert!(d.ending_received(&e, within).await);

        // Closed unread, nothing written after it: not received.
        let (a, b) = UnixStream::pair().unwrap();
        let d = Delivery::new(a.as_raw_fd());
        let e = answer(&d, &a, b"HTTP/1.1 200 OK\r\n\r\n", b"granted\n");
        drop(b);
        assert!(!d.ending_received(&e, within).await);

        // Handed but never written, and the connection dropped: not received.
        let (a, _b) = UnixStream::pair().unwrap();
        let d = Delivery::new(a.as_raw_fd());
        let line = b"granted\n".to_vec();
        let e = Ending::new(&line);
        d.handed(&e);
        d.closed();
        assert!(!d.ending_received(&e, within).await);

        // Written in two parts: placed only once its last byte is written.
        let (a, mut b) = UnixStream::pair().unwrap();
        let d = Delivery::new(a.as_raw_fd());
        let line = b"granted\n".to_vec();
        let e = Ending::new(&line);
        d.handed(&e);
        let first = [std::io::IoSlice::new(&line[..3])];
        let _ = d.io_write(&first, || Poll::Ready((&a).write_vectored(&first)));
        assert_eq!(e.position(), Position::Handed(0));
        let rest = [std::io::IoSlice::new(&line[3..])];
        let _ = d.io_write(&rest, || Poll::Ready((&a).write_vectored(&rest)));
        assert_eq!(e.position(), Position::At(8));
        d.flushed();
        assert_eq!(b.read(&mut [0u8; 8]).unwrap(), 8);
        assert!(d.ending_received(&e, within).await);

        // Copied by the writer (not found in its writes): unknown once flushed, received.
        let (a, b) = UnixStream::pair().unwrap();
        let d = Delivery::new(a.as_raw_fd());
        let line = b"granted\n".to_vec();
        let e = Ending::new(&line);
        d.handed(&e);
        let copy = [std::io::IoSlice::new(b"granted\n")];
        let _ = d.io_write(&copy, || Poll::Ready((&a).write_vectored(&copy)));
        d.flushed();
        assert_eq!(e.position(), Position::Unknown);
        drop(b);
        assert!(d.ending_received(&e, within).await);

        // Alive, not reading: received after the bound.
        let (a, _b) = UnixStream::pair().unwrap();
        let d = Delivery::new(a.as_raw_fd());
        let e = answer(&d, &a, b"HTTP/1.1 200 OK\r\n\r\n", b"granted\n");
        let started = std::time::Instant::now();
        assert!(d.ending_received(&e, Duration::from_millis(200)).await);
        assert!(started.elapsed() >= Duration::from_millis(200));
    }

    /// An answer whose end was never found written (the writer copied it, or wrote part of
    /// it) on a connection gone before the flush: kept if any byte was written since it was
    /// handed (the client may have read it: undoing would let two hold it, G1), undone only
    /// if none was (none of it left). Before, the close alone undid it: the grant a client
    /// read from a copying writer was taken back.
    #[tokio::test]
    async fn an_answer_gone_before_its_flush_is_kept_if_any_of_it_may_have_left() {
        let within = Duration::from_secs(60);
        let hello = b"HTTP/1.1 200 OK\r\n\r\ngranted\n";

        // Copied by the writer, written, read by the peer, and the connection dropped before
        // the writer's flush: received.
        let (a, mut b) = UnixStream::pair().unwrap();
        let d = Delivery::new(a.as_raw_fd());
        let line = b"granted\n".to_vec();
        let e = Ending::new(&line);
        d.handed(&e);
        let copy = [std::io::IoSlice::new(hello)];
        let _ = d.io_write(&copy, || Poll::Ready((&a).write_vectored(&copy)));
        assert_eq!(e.position(), Position::Handed(0));
        assert_eq!(b.read(&mut [0u8; 64]).unwrap(), hello.len());
        drop(b);
        d.closed();
        assert!(d.ending_received(&e, within).await);

        // The same, the peer closed with it unread (a reset): unknown which bytes were the
        // answer's, so received all the same (its process's exit still releases it).
        let (a, b) = UnixStream::pair().unwrap();
        let d = Delivery::new(a.as_raw_fd());
        let e = Ending::new(&line);
        d.handed(&e);
        let _ = d.io_write(&copy, || Poll::Ready((&a).write_vectored(&copy)));
        drop(b);
        d.closed();
        assert!(d.ending_received(&e, within).await);

        // Partly written (its last byte not), then dropped: received.
        let (a, _b) = UnixStream::pair().unwrap();
        let d = Delivery::new(a.as_raw_fd());
        let e = Ending::new(&line);
        d.handed(&e);
        let first = [std::io::IoSlice::new(&line[..3])];
        let _ = d.io_write(&first, || Poll::Ready((&a).write_vectored(&first)));
        d.closed();
        assert!(d.ending_received(&e, within).await);

        // Handed after earlier writes, nothing written since, dropped: not received.
        let (a, mut b) = UnixStream::pair().unwrap();
        let d = Delivery::new(a.as_raw_fd());
        let earlier = [std::io::IoSlice::new(b"HTTP/1.1 200 OK\r\n\r\n")];
        let _ = d.io_write(&earlier, || Poll::Ready((&a).write_vectored(&earlier)));
        let e = Ending::new(&line);
        d.handed(&e);
        assert_eq!(e.position(), Position::Handed(19));
        assert_eq!(b.read(&mut [0u8; 64]).unwrap(), 19);
        drop(b);
        d.closed();
        assert!(!d.ending_received(&e, within).await);
    }

    /// A check of an ended answer is woken by the peer's next request (its read by the
    /// agent), not by a timer: here the timer would not look again for two minutes.
    #[tokio::test]
    async fn an_ended_answers_check_looks_again_at_the_next_request() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let d = Delivery::new(a.as_raw_fd());
        let e = answer(&d, &a, b"HTTP/1.1 200 OK\r\n\r\n", b"granted\n");
        let long = Duration::from_secs(120);
        let check = {
            let d = d.clone();
            tokio::spawn(async move { d.ending_received_paced(&e, long, long).await })
        };
        // The check has looked once (nothing read yet) and waits.
        while d.looks.load(Ordering::Relaxed) == 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(b.read(&mut [0u8; 27]).unwrap(), 27);
        b.write_all(b"POST /v1/release").unwrap();
        // The agent reads the client's next request: the check looks again.
        let mut buf = [0u8; 64];
        assert!((&a).read(&mut buf).unwrap() > 0);
        d.read_some();
        let received = tokio::time::timeout(Duration::from_secs(30), check)
            .await
            .expect("the check looked again at the read")
            .unwrap();
        assert!(received);
        assert_eq!(d.looks.load(Ordering::Relaxed), 2);
    }
}
