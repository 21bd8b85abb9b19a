//! A caller's identity, read from the socket once, when its connection is accepted.
//!
//! Admin rights (SPEC G8) follow the caller's uid, gid and supplementary groups. All three
//! come from the kernel for the connection itself (`SO_PEERCRED`, `SO_PEERGROUPS`, both fixed
//! at connect), never from `/proc/PID` later: by then the pid may belong to another process.

use std::future::Future;
use std::os::fd::{AsFd, AsRawFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tokio::net::unix::UCred;

use crate::delivery::Delivery;

/// What the server knows of a connection's peer.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// Pid, uid and gid at connect (`SO_PEERCRED`).
    pub cred: Option<UCred>,
    /// Supplementary groups at connect.
    pub groups: Arc<[u32]>,
    /// Why this connection is not served (its user has too many open): every request on it
    /// gets this answer, and the connection is closed soon after.
    pub refused: Option<Arc<str>>,
}

/// How long a refused connection stays open to carry its answer.
const REFUSED_LINGER: std::time::Duration = std::time::Duration::from_secs(2);

/// The connections open per user and in total, bounded so that one user (a member of the
/// socket group, or a careless script) or several cannot use up the agent's descriptors and
/// memory. Root is never refused: whatever others hold open, root's `leasehold list` gets
/// in (the open-file limit is raised far above the total).
#[derive(Debug)]
pub struct Connections {
    per_user: usize,
    total: usize,
    open: std::sync::Mutex<std::collections::HashMap<u32, usize>>,
}

impl Connections {
    /// At most `per_user` connections per user other than root, and `total` of all users
    /// other than root together.
    pub fn new(per_user: usize, total: usize) -> Arc<Connections> {
        Arc::new(Connections {
            per_user,
            total,
            open: std::sync::Mutex::default(),
        })
    }

    /// Counts a new connection of `uid`, or says why it is refused.
    fn admit(self: &Arc<Self>, uid: u32) -> Result<Slot, String> {
        let mut open = self
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let others: usize = open.iter().filter(|(u, _)| **u != 0).map(|(_, n)| n).sum();
        if uid != 0 && others >= self.total {
            return Err(format!(
                "the agent already has {others} connections open from users other than root, \
                 the most it serves (max-connections); close some (each waiting acquire, watch \
                 or running `run` keeps one), or ask root to raise the limit"
            ));
        }
        let n = open.entry(uid).or_insert(0);
        if uid != 0 && *n >= self.per_user {
            return Err(format!(
                "uid {uid} already has {n} connections open to the agent, the most one user may \
                 (max-connections-per-user); close some (each waiting acquire or running `run` \
                 keeps one), or ask root to raise the limit"
            ));
        }
        *n += 1;
        Ok(Slot {
            connections: self.clone(),
            uid,
        })
    }
}

/// One counted connection; uncounted when dropped.
#[derive(Debug)]
struct Slot {
    connections: Arc<Connections>,
    uid: u32,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self
            .connections
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = open.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.uid);
            }
        }
    }
}

/// An accepted connection with its peer's identity.
pub struct PeerStream {
    stream: UnixStream,
    info: PeerInfo,
    /// Completes when the agent stops: the connection is then shut down, whatever streams
    /// (wrappers, watches, waiters) it carries; their clients reconnect to the next agent.
    cut: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    closed: bool,
    /// Counts the connection while it is open.
    _slot: Option<Slot>,
    /// For a refused connection: when it reads as closed.
    linger: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Bytes read to learn the protocol, given again to the first reads.
    prefix: Vec<u8>,
    /// How many of `prefix` were given already.
    replayed: usize,
    /// What the peer read of what was written.
    delivery: Arc<Delivery>,
    /// Writes kept back while [`Delivery::cork`]ed.
    corked: Vec<u8>,
}

impl Drop for PeerStream {
    fn drop(&mut self) {
        self.delivery.closed();
    }
}

impl std::fmt::Debug for PeerStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerStream")
            .field("stream", &self.stream)
            .field("info", &self.info)
            .field("closed", &self.closed)
            .finish_non_exhaustive()
    }
}

impl PeerStream {
    /// Reads the peer's credentials from `stream`. A peer whose groups cannot be read gets
    /// none (it is no admin through a group).
    pub fn new(stream: UnixStream) -> PeerStream {
        let groups = peer_groups(&stream).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "could not read the caller's groups from the socket");
            Vec::new()
        });
        let info = PeerInfo {
            cred: stream.peer_cred().ok(),
            groups: groups.into(),
            refused: None,
        };
        PeerStream {
            delivery: Delivery::new(stream.as_raw_fd()),
            stream,
            info,
            cut: None,
            closed: false,
            _slot: None,
            linger: None,
            prefix: Vec::new(),
            replayed: 0,
            corked: Vec::new(),
        }
    }

    /// The writes kept back since [`Delivery::cork`], to be written first; writes go to the
    /// socket again.
    pub(crate) fn uncork(&mut self) -> Vec<u8> {
        self.delivery.uncork();
        std::mem::take(&mut self.corked)
    }

    /// What the server knows of the peer.
    pub fn info(&self) -> &PeerInfo {
        &self.info
    }

    /// What the peer read of what was written to it.
    pub(crate) fn delivery(&self) -> Arc<Delivery> {
        self.delivery.clone()
    }

    /// The bytes read so far by [`PeerStream::read_more`].
    pub fn head(&self) -> &[u8] {
        &self.prefix
    }

    /// Reads more of what the peer sent into [`PeerStream::head`], to learn the protocol
    /// before a server takes the connection; every byte is read again by the server. Returns
    /// how many bytes came (0: the peer closed).
    pub async fn read_more(&mut self) -> std::io::Result<usize> {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 4096];
        let n = self.stream.read(&mut buf).await?;
        self.prefix.extend_from_slice(&buf[..n]);
        Ok(n)
    }

    /// Writes `bytes` to the peer (an answer before any server took the connection).
    pub async fn write_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt;
        self.stream.write_all(bytes).await?;
        self.stream.shutdown().await
    }

    /// Counts this connection against its user's limit; over it, the connection is marked
    /// refused (its requests are answered with why) and closes after a moment.
    pub fn admit(mut self, connections: &Arc<Connections>) -> PeerStream {
        // A peer of unknown uid (never on Linux) shares one count.
        let uid = self.info.cred.map_or(u32::MAX, |c| c.uid());
        match connections.admit(uid) {
            Ok(slot) => self._slot = Some(slot),
            Err(why) => {
                tracing::warn!(uid, "refused a connection: {why}");
                self.info.refused = Some(why.into());
                self.linger = Some(Box::pin(tokio::time::sleep(REFUSED_LINGER)));
            }
        }
        self
    }

    /// Shuts the connection down (both ways) once `cut` reads true.
    pub fn cut_on(mut self, mut cut: tokio::sync::watch::Receiver<bool>) -> PeerStream {
        self.cut = Some(Box::pin(async move {
            let _ = cut.wait_for(|c| *c).await;
        }));
        self
    }

    /// True once the agent cut this connection; shuts the socket down the first time, so the
    /// peer sees the end at once.
    fn is_cut(&mut self, cx: &mut Context<'_>) -> bool {
        if self.closed {
            return true;
        }
        let Some(cut) = self.cut.as_mut() else {
            return false;
        };
        if cut.as_mut().poll(cx).is_pending() {
            return false;
        }
        self.cut = None;
        self.closed = true;
        let _ = rustix::net::shutdown(&self.stream, rustix::net::Shutdown::Both);
        true
    }
}

fn cut_error() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::BrokenPipe,
        "the agent is stopping; connection closed",
    )
}

/// The supplementary groups of the process that connected `socket`, as they were then.
pub fn peer_groups(socket: &impl AsFd) -> std::io::Result<Vec<u32>> {
    let fd = socket.as_fd().as_raw_fd();
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = libc::socklen_t::try_from(std::mem::size_of_val(groups.as_slice()))
            .map_err(std::io::Error::other)?;
        // SAFETY: `groups` has room for `len` bytes; the kernel writes at most that many and
        // says how many it wrote (or needs, with ERANGE) in `len`.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let n = len as usize / std::mem::size_of::<libc::gid_t>();
        if r == 0 {
            groups.truncate(n);
            return Ok(groups);
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ERANGE) && n > groups.len() {
            groups.resize(n, 0);
            continue;
        }
        return Err(e);
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        // Cut when the agent stops; a refused connection reads as closed once it has had
        // time to carry its answer.
        let lingered = self
            .linger
            .as_mut()
            .is_some_and(|l| l.as_mut().poll(cx).is_ready());
        if lingered || self.is_cut(cx) {
            return Poll::Ready(Ok(()));
        }
        if self.replayed < self.prefix.len() {
            let from = self.replayed;
            let n = buf.remaining().min(self.prefix.len() - from);
            buf.put_slice(&self.prefix[from..from + n]);
            self.replayed += n;
            if self.replayed == self.prefix.len() {
                self.prefix = Vec::new();
                self.replayed = 0;
            }
            return Poll::Ready(Ok(()));
        }
        let this = &mut *self;
        let before = buf.filled().len();
        let r = this
            .delivery
            .io(|| Pin::new(&mut this.stream).poll_read(cx, buf));
        if buf.filled().len() > before {
            this.delivery.read_some();
        }
        r
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.is_cut(cx) {
            return Poll::Ready(Err(cut_error()));
        }
        if self.delivery.is_corked() {
            self.corked.extend_from_slice(buf);
            return Poll::Ready(Ok(buf.len()));
        }
        let this = &mut *self;
        this.delivery.io_write(&[std::io::IoSlice::new(buf)], || {
            Pin::new(&mut this.stream).poll_write(cx, buf)
        })
    }

    /// The HTTP server flushes once its buffer is empty: all it was handed is in the socket.
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.delivery.is_corked() {
            return Poll::Ready(Ok(()));
        }
        let flushed = Pin::new(&mut self.stream).poll_flush(cx);
        if let Poll::Ready(Ok(())) = flushed {
            self.delivery.flushed();
        }
        flushed
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        if self.is_cut(cx) {
            return Poll::Ready(Err(cut_error()));
        }
        if self.delivery.is_corked() {
            let n = bufs.iter().map(|b| b.len()).sum();
            for b in bufs {
                self.corked.extend_from_slice(b);
            }
            return Poll::Ready(Ok(n));
        }
        let this = &mut *self;
        this.delivery.io_write(bufs, || {
            Pin::new(&mut this.stream).poll_write_vectored(cx, bufs)
        })
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The groups and uid are the connecting process's, read from the socket itself.
    #[tokio::test]
    async fn a_peers_groups_are_read_from_the_socket() {
        let (a, b) = UnixStream::pair().expect("socketpair");
        let mut ours: Vec<u32> = rustix::process::getgroups()
            .expect("getgroups")
            .into_iter()
            .map(|g| g.as_raw())
            .collect();
        let mut theirs = peer_groups(&b).expect("SO_PEERGROUPS");
        ours.sort_unstable();
        theirs.sort_unstable();
        assert_eq!(theirs, ours);
        let s = PeerStream::new(a);
        let mut g = s.info().groups.to_vec();
        g.sort_unstable();
        assert_eq!(g, ours);
        assert_eq!(
            s.info().cred.map(|c| c.uid()),
            Some(rustix::process::getuid().as_raw())
        );
    }
}
