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
use tonic::transport::server::{Connected, UdsConnectInfo};

/// What the server knows of a connection's peer.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// Pid, uid and gid at connect.
    pub uds: UdsConnectInfo,
    /// Supplementary groups at connect.
    pub groups: Arc<[u32]>,
}

/// An accepted connection with its peer's identity.
pub struct PeerStream {
    stream: UnixStream,
    info: PeerInfo,
    /// Completes when the agent stops: the connection is then shut down, whatever streams
    /// (wrappers, watches, waiters) it carries; their clients reconnect to the next agent.
    cut: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    closed: bool,
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
            uds: stream.connect_info(),
            groups: groups.into(),
        };
        PeerStream {
            stream,
            info,
            cut: None,
            closed: false,
        }
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

impl Connected for PeerStream {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.is_cut(cx) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
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
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
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
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
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
        let mut g = s.connect_info().groups.to_vec();
        g.sort_unstable();
        assert_eq!(g, ours);
        assert_eq!(
            s.connect_info().uds.peer_cred.map(|c| c.uid()),
            Some(rustix::process::getuid().as_raw())
        );
    }
}
