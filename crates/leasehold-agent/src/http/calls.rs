//! A kept-alive connection switched to [`v1::CALLS_UPGRADE`]: the calls a program makes call
//! after call (a plain acquire, a release, status), one line each way, carried out as over
//! HTTP (the same requests, answers, errors and rights) without HTTP's framing. Asked by the
//! connection's first request; run on the connection's own task once the HTTP server has
//! written the `101` (kept back and written with the first answer) and handed it over.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use leasehold_api::v1::{self, ApiError, ErrorCode, MAX_BODY};
use leasehold_store::Store;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::delivery::{Delivery, Ending};
use crate::peer::PeerStream;
use crate::service::{Caller, Delivered, Out, Service};

/// The longest request line: a body of [`MAX_BODY`] and its method and path.
const MAX_LINE: usize = MAX_BODY + 64;

/// One answer's line, not yet written: the HTTP status and the body's JSON.
pub(super) struct Answer {
    status: u16,
    json: Vec<u8>,
    /// A grant's new leases, counting once the client has read the line.
    delivered: Option<Delivered>,
}

impl Answer {
    pub(super) fn ok(value: &impl Serialize) -> Answer {
        Answer {
            status: 200,
            json: serde_json::to_vec(value).unwrap_or_default(),
            delivered: None,
        }
    }

    pub(super) fn error(e: &ApiError) -> Answer {
        Answer {
            status: e.code.http_status(),
            json: serde_json::to_vec(e).unwrap_or_default(),
            delivered: None,
        }
    }

    /// The answer to an acquire carried out at once ([`Service::acquire_now`]).
    pub(super) fn acquired(out: Out, delivery: &Arc<Delivery>) -> Answer {
        match super::granted_line(out) {
            Ok((line, delivered)) => Answer {
                delivered,
                ..Answer::ok(&line)
            },
            Err(out) => Answer::ok(&super::acquire_line(*out, delivery)),
        }
    }

    /// Whether it is an error: the connection's last answer.
    fn is_error(&self) -> bool {
        !(200..300).contains(&self.status)
    }
}

/// Carries the switched connection: the first request's answer, then one line a request, until
/// the client closes, an answer is an error, the connection is idle past `timeout`, or the
/// agent stops (the connection then reads as closed).
pub(super) async fn serve<S: Store>(
    on: hyper::upgrade::OnUpgrade,
    first: Answer,
    delivery: Arc<Delivery>,
    service: Service<S>,
    caller: Caller,
    timeout: Duration,
) {
    let Ok(upgraded) = on.await else {
        return;
    };
    let Ok(parts) = upgraded.downcast::<TokioIo<PeerStream>>() else {
        return;
    };
    let mut io = parts.io.into_inner();
    // What the client sent after its first request (nothing, unless it pipelines).
    let mut input = parts.read_buf.to_vec();
    // The `101`'s head, kept back for the first answer.
    let mut head = io.uncork();
    let mut next = first;
    let mut buf = [0u8; 4096];
    let idle = tokio::time::sleep(timeout);
    tokio::pin!(idle);
    loop {
        let last = next.is_error();
        if !write(&mut io, std::mem::take(&mut head), next, &delivery).await || last {
            let _ = io.shutdown().await;
            return;
        }
        // The next request's line, each byte looked at once.
        idle.as_mut().reset(tokio::time::Instant::now() + timeout);
        let mut scanned = 0;
        let end = loop {
            if let Some(at) = input[scanned..].iter().position(|b| *b == b'\n') {
                break Some(scanned + at);
            }
            scanned = input.len();
            if input.len() > MAX_LINE {
                break None;
            }
            tokio::select! {
                read = io.read(&mut buf) => match read {
                    Ok(n) if n > 0 => input.extend_from_slice(&buf[..n]),
                    _ => return,
                },
                () = &mut idle => {
                    let _ = io.shutdown().await;
                    return;
                }
            }
        };
        next = match end {
            Some(end) => {
                let a = call(&service, &caller, &delivery, &input[..end]).await;
                input.drain(..=end);
                a.unwrap_or_else(|e| Answer::error(&e))
            }
            None => Answer::error(&ApiError::new(
                ErrorCode::TooLarge,
                format!("a request line over {MAX_LINE} bytes; nothing was done"),
            )),
        };
    }
}

/// Writes `answer`'s line after `text` (the `101`'s head, before the first); a grant's check
/// (as [`super::ended_grant`]'s) goes by where the line's last byte went. False once the
/// connection failed.
async fn write(
    io: &mut PeerStream,
    mut text: Vec<u8>,
    answer: Answer,
    delivery: &Arc<Delivery>,
) -> bool {
    text.reserve(answer.json.len() + 5);
    text.extend_from_slice(answer.status.to_string().as_bytes());
    text.push(b' ');
    text.extend_from_slice(&answer.json);
    text.push(b'\n');
    if let Some(d) = answer.delivered {
        // `text` is the very buffer written below.
        let ending = Ending::new(&text);
        delivery.handed(&ending);
        super::check_ending(delivery.clone(), ending, d);
    }
    io.write_all(&text).await.is_ok() && io.flush().await.is_ok()
}

/// Carries out one request line (`METHOD PATH[ BODY]`, without its `\n`).
async fn call<S: Store>(
    service: &Service<S>,
    caller: &Caller,
    delivery: &Arc<Delivery>,
    line: &[u8],
) -> Result<Answer, ApiError> {
    let mut words = line.splitn(3, |b| *b == b' ');
    let method = words.next().unwrap_or_default();
    let path = words.next().unwrap_or_default();
    let body = words.next();
    // The body's limit is HTTP's: a line may be longer only by its method and path.
    if body.is_some_and(|b| b.len() > MAX_BODY) {
        return Err(super::too_large());
    }
    match (method, path, body) {
        (b"POST", b"/v1/acquire", Some(body)) => {
            let r: v1::AcquireRequest = super::parse_body(body, None)?;
            match service.acquire_now(caller, r).await {
                Ok(out) => Ok(Answer::acquired(out?, delivery)),
                Err(_) => Err(ApiError::usage(format!(
                    "an acquire that waits, holds or asks contain is not served on a {} \
                     connection; nothing was done. Send it on a connection of its own",
                    v1::CALLS_UPGRADE
                ))),
            }
        }
        (b"POST", b"/v1/release", Some(body)) => {
            let r: v1::ReleaseRequest = super::parse_body(body, None)?;
            let out = service.release(caller, r).await?;
            Ok(Answer::ok(&super::release_response(out)))
        }
        (b"GET", b"/v1/status", None) => Ok(Answer::ok(&service.status().await)),
        _ => Err(ApiError::usage(format!(
            "{:?} is no request on a {} connection; nothing was done. One line each: \
             GET /v1/status, POST /v1/release BODY, POST /v1/acquire BODY (neither waiting, \
             holding nor contained); other calls go on a connection of their own",
            String::from_utf8_lossy(&line[..line.len().min(80)]),
            v1::CALLS_UPGRADE
        ))),
    }
}
