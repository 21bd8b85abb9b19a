//! Reading the agent's HTTP/1.1 answer: the status line and headers, then the body, whole or
//! chunked, line by line for the streaming calls.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::net::UnixStream;

use super::Error;

/// The buffer of an answer's body, over the connection's own buffer.
const BODY_BUFFER: usize = 1024;

/// An answer: its status, then its body as one text or as lines.
#[derive(Debug)]
pub(super) struct Answer {
    pub(super) status: u16,
    pub(super) reader: BufReader<Body>,
}

impl Answer {
    pub(super) fn read(mut r: BufReader<UnixStream>) -> Result<Answer, Error> {
        // One line buffer for the status line and every header (a call reads five or so).
        let mut status_line = String::with_capacity(64);
        if r.read_line(&mut status_line)? == 0 {
            return Err(Error::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the agent closed the connection without answering",
            )));
        }
        let status: u16 = status_line
            .strip_prefix("HTTP/1.1 ")
            .and_then(|s| s.get(..3))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| Error::Protocol(format!("not an HTTP answer: {status_line:?}")))?;
        let mut length = None;
        let mut chunked = false;
        let mut h = status_line;
        loop {
            h.clear();
            if r.read_line(&mut h)? == 0 {
                return Err(Error::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the agent closed the connection in the middle of an answer's headers",
                )));
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let Some((name, value)) = h.split_once(':') else {
                continue;
            };
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length = Some(value.parse::<u64>().map_err(Error::protocol)?);
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value.eq_ignore_ascii_case("chunked");
            }
        }
        let body = match (chunked, length) {
            // Switched to another protocol (a hold's, `HOLD_UPGRADE`): the rest of the
            // connection is the stream.
            _ if status == 101 => Body::Length { r, left: u64::MAX },
            (true, _) => Body::Chunked {
                r,
                left: 0,
                done: false,
            },
            (false, Some(n)) => Body::Length { r, left: n },
            (false, None) => Body::Length { r, left: u64::MAX },
        };
        Ok(Answer {
            status,
            // The body reads from `r`'s buffer already: this one only needs to hold a line
            // at a time (a smaller one is filled more often), not the default 8 KiB that was
            // allocated for every answer.
            reader: BufReader::with_capacity(BODY_BUFFER, body),
        })
    }

    pub(super) fn text(mut self) -> Result<String, Error> {
        let mut s = String::new();
        self.reader.read_to_string(&mut s)?;
        Ok(s)
    }

    /// The connection again, once the body has been read to its end, for the next request
    /// (`None` when the body has no end but the connection's).
    pub(super) fn finish(self) -> Option<BufReader<UnixStream>> {
        if !self.reader.buffer().is_empty() {
            return None;
        }
        match self.reader.into_inner() {
            Body::Length { r, left: 0 } | Body::Chunked { r, done: true, .. } => Some(r),
            Body::Length { .. } | Body::Chunked { .. } => None,
        }
    }

    /// The connection of a `101`'s answer, from the first byte after its head (`None` if a
    /// byte of it was read as the body's).
    pub(super) fn switched(self) -> Option<BufReader<UnixStream>> {
        if !self.reader.buffer().is_empty() {
            return None;
        }
        match self.reader.into_inner() {
            Body::Length { r, .. } | Body::Chunked { r, .. } => Some(r),
        }
    }

    /// The next non-empty line, `None` at the end of the body.
    pub(super) fn line(&mut self) -> Result<Option<String>, Error> {
        loop {
            let mut l = String::new();
            if self.reader.read_line(&mut l)? == 0 {
                return Ok(None);
            }
            if !l.trim().is_empty() {
                return Ok(Some(l));
            }
        }
    }
}

/// An answer's body: so many bytes, or chunks (the streams).
#[derive(Debug)]
pub(super) enum Body {
    Length {
        r: BufReader<UnixStream>,
        left: u64,
    },
    Chunked {
        r: BufReader<UnixStream>,
        left: u64,
        done: bool,
    },
}

impl Body {
    pub(super) fn inner(&self) -> &UnixStream {
        match self {
            Body::Length { r, .. } | Body::Chunked { r, .. } => r.get_ref(),
        }
    }
}

impl Read for Body {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let bad =
            |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
        match self {
            Body::Length { r, left } => {
                if *left == 0 {
                    return Ok(0);
                }
                let max = buf.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                let n = r.read(&mut buf[..max])?;
                *left = left.saturating_sub(n as u64);
                Ok(n)
            }
            Body::Chunked { r, left, done } => {
                if *done {
                    return Ok(0);
                }
                if *left == 0 {
                    let mut size = String::new();
                    if r.read_line(&mut size)? == 0 {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            "the agent closed the connection in the middle of an answer",
                        ));
                    }
                    let hex = size.trim().split(';').next().unwrap_or_default();
                    *left = u64::from_str_radix(hex, 16).map_err(|_| bad("a bad chunk size"))?;
                    if *left == 0 {
                        // The trailer: none from the agent, so only the empty line ending it;
                        // read, so that the next answer on the connection starts clean.
                        loop {
                            let mut t = String::new();
                            if r.read_line(&mut t)? == 0 || t.trim_end().is_empty() {
                                break;
                            }
                        }
                        *done = true;
                        return Ok(0);
                    }
                }
                let max = buf.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                let n = r.read(&mut buf[..max])?;
                if n == 0 {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the agent closed the connection in the middle of an answer",
                    ));
                }
                *left -= n as u64;
                if *left == 0 {
                    let mut crlf = [0u8; 2];
                    r.read_exact(&mut crlf)?;
                }
                Ok(n)
            }
        }
    }
}
