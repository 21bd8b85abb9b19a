//! The HTTP/1.1 + JSON front end on the agent's socket (`/v1/...`): routes, reads and checks
//! bodies, and translates the core's answers to JSON; newline-delimited JSON for the long
//! calls (a waiting acquire, a hold, watch). No logic of its own: every operation is the
//! core's (`service`).
//!
//! The first request's headers are read before the HTTP server takes the connection
//! ([`serve_connection`]): a request whose headers do not arrive within the request timeout
//! is answered `408` and closed, so idle connections cannot pile up.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{CONNECTION, CONTENT_TYPE, HeaderValue, UPGRADE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use leasehold_api::v1::{self, ApiError, ErrorCode, MAX_BODY, conflict_to_v1};
use leasehold_store::Store;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tracing::debug;

use crate::delivery::{Delivery, Ending, RECEIVED_WITHIN};
use crate::peer::PeerStream;
use crate::service::{After, Caller, ConnectionFacts, Delivered, Out, Service};

mod calls;

/// How soon a connection over a limit is answered and closed.
const REFUSED_WITHIN: Duration = Duration::from_secs(2);

/// The most bytes of request line and headers read before the request is refused.
const MAX_HEAD: usize = 16 << 10;

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// What a connection carries on with once the HTTP server has handed it over (a hold switched
/// to [`v1::HOLD_UPGRADE`]), run on the connection's own task.
type Then = Arc<Mutex<Option<Pin<Box<dyn Future<Output = ()> + Send>>>>>;

/// What a connection sent first.
enum Head {
    /// The first request's headers, complete.
    Complete,
    /// Headers larger than [`MAX_HEAD`].
    TooLarge,
    /// Closed before saying anything useful.
    Closed,
}

async fn read_head(conn: &mut PeerStream) -> std::io::Result<Head> {
    loop {
        let head = conn.head();
        if head.windows(4).any(|w| w == b"\r\n\r\n") {
            return Ok(Head::Complete);
        } else if head.len() > MAX_HEAD {
            return Ok(Head::TooLarge);
        }
        if conn.read_more().await? == 0 {
            return Ok(Head::Closed);
        }
    }
}

/// A whole HTTP/1.1 answer with a JSON error, for a connection no server took.
fn raw_error(status: u16, reason: &str, e: &ApiError) -> Vec<u8> {
    let body = serde_json::to_string(e).unwrap_or_default();
    format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}\n",
        body.len() + 1
    )
    .into_bytes()
}

/// Serves one accepted connection.
pub(crate) async fn serve_connection<S: Store>(
    mut conn: PeerStream,
    service: Service<S>,
    request_timeout: Duration,
) {
    // A connection over a limit is answered why and closed soon, whatever it sends.
    let refused = conn.info().refused.clone();
    let wait = match refused {
        Some(_) => request_timeout.min(REFUSED_WITHIN),
        None => request_timeout,
    };
    let head = tokio::time::timeout(wait, read_head(&mut conn)).await;
    let answer = match (head, refused) {
        (Ok(Ok(Head::Closed) | Err(_)), _) => return,
        (_, Some(why)) => Some(raw_error(
            503,
            "Service Unavailable",
            &ApiError::new(ErrorCode::Exhausted, why.to_string()),
        )),
        (Ok(Ok(Head::Complete)), None) => None,
        (Ok(Ok(Head::TooLarge)), None) => Some(raw_error(
            431,
            "Request Header Fields Too Large",
            &ApiError::usage(format!(
                "the request's headers are over {MAX_HEAD} bytes; nothing was done"
            )),
        )),
        (Err(_), None) => Some(raw_error(
            408,
            "Request Timeout",
            &ApiError::new(
                ErrorCode::RequestTimeout,
                format!(
                    "no complete request within {}; nothing was done. Send the request's \
                     headers at once (the agent's request-timeout)",
                    humantime::format_duration(request_timeout)
                ),
            ),
        )),
    };
    if let Some(answer) = answer {
        let _ = conn.write_raw(&answer).await;
        return;
    }
    let peer = conn.info().clone();
    let delivery = conn.delivery();
    let facts = ConnectionFacts::default();
    let then = Then::default();
    let after = then.clone();
    let handler = hyper::service::service_fn(move |req| {
        let service = service.clone();
        let caller = Caller::of(&peer, &facts, &delivery);
        let delivery = delivery.clone();
        let then = then.clone();
        async move {
            Ok::<_, Infallible>(
                route(&service, caller, req, request_timeout, delivery, &then).await,
            )
        }
    });
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        // Also the idle timeout between requests: the timer runs while hyper waits for the
        // next request's headers.
        .header_read_timeout(request_timeout)
        .max_buf_size(MAX_HEAD.max(8192))
        .serve_connection(TokioIo::new(conn), handler)
        .with_upgrades()
        .await;
    if let Err(e) = served {
        debug!(error = %e, "HTTP connection ended");
    }
    let then = after.lock().unwrap_or_else(PoisonError::into_inner).take();
    if let Some(then) = then {
        then.await;
    }
}

fn json_response(status: StatusCode, value: &impl Serialize) -> Response<Body> {
    let mut text = serde_json::to_vec(value).unwrap_or_default();
    text.push(b'\n');
    let mut r = Response::new(Full::new(Bytes::from(text)).boxed_unsync());
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn error_response(e: &ApiError) -> Response<Body> {
    let status =
        StatusCode::from_u16(e.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(status, e)
}

fn line(value: &impl Serialize) -> Result<Frame<Bytes>, Infallible> {
    let mut text = serde_json::to_vec(value).unwrap_or_default();
    text.push(b'\n');
    Ok(Frame::data(Bytes::from(text)))
}

fn stream_response(
    lines: impl tokio_stream::Stream<Item = Result<Frame<Bytes>, Infallible>> + Send + 'static,
) -> Response<Body> {
    let mut r = Response::new(StreamBody::new(lines).boxed_unsync());
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    r
}

/// The refusal of a request body over [`MAX_BODY`] bytes, over HTTP or on a line.
fn too_large() -> ApiError {
    ApiError::new(
        ErrorCode::TooLarge,
        format!("the request body is over {MAX_BODY} bytes; nothing was done"),
    )
}

/// Reads a JSON request body of type `T`: at most [`MAX_BODY`] bytes, no unknown fields. An
/// empty body is `T`'s default when `empty` is given.
async fn body<T: DeserializeOwned>(
    req: Request<Incoming>,
    empty: Option<T>,
    timeout: Duration,
) -> Result<T, ApiError> {
    use hyper::body::Body as _;
    if req.body().size_hint().lower() > MAX_BODY as u64 {
        return Err(too_large());
    }
    let read = tokio::time::timeout(timeout, Limited::new(req.into_body(), MAX_BODY).collect());
    let bytes = read
        .await
        .map_err(|_| {
            ApiError::new(
                ErrorCode::RequestTimeout,
                format!(
                    "the request body did not arrive within {}; nothing was done",
                    humantime::format_duration(timeout)
                ),
            )
        })?
        .map_err(|e| {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                too_large()
            } else {
                ApiError::usage(format!("the request body could not be read: {e}"))
            }
        })?
        .to_bytes();
    parse_body(&bytes, empty)
}

/// A request body of type `T`, as [`body`] reads it.
fn parse_body<T: DeserializeOwned>(bytes: &[u8], empty: Option<T>) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace)
        && let Some(default) = empty
    {
        return Ok(default);
    }
    serde_json::from_slice(bytes).map_err(|e| {
        ApiError::usage(format!(
            "the request body is not a valid {}: {e}; nothing was done (the schema: docs/api/v1.schema.json)",
            std::any::type_name::<T>().rsplit("::").next().unwrap_or("request")
        ))
    })
}

/// The routes, for a request to a path that is none.
const ROUTES: &str = "GET /v1/leases[?prefix=P&held=true&dirty=true&host=H&after=NAME&limit=N], GET /v1/status, GET /v1/hosts, GET|POST /v1/watch, POST /v1/acquire, \
                      /v1/release, /v1/force-release, /v1/mark-clean, /v1/validate, /v1/inspect";

fn ok(value: &impl Serialize) -> Result<Response<Body>, ApiError> {
    Ok(json_response(StatusCode::OK, value))
}

async fn route<S: Store>(
    service: &Service<S>,
    caller: Result<Caller, ApiError>,
    req: Request<Incoming>,
    timeout: Duration,
    delivery: Arc<Delivery>,
    then: &Then,
) -> Response<Body> {
    match handle(service, caller, req, timeout, delivery, then).await {
        Ok(r) => r,
        Err(e) => error_response(&e),
    }
}

async fn handle<S: Store>(
    service: &Service<S>,
    caller: Result<Caller, ApiError>,
    mut req: Request<Incoming>,
    timeout: Duration,
    delivery: Arc<Delivery>,
    then: &Then,
) -> Result<Response<Body>, ApiError> {
    let c = caller?;
    let path = req.uri().path().trim_end_matches('/').to_owned();
    let method = req.method().clone();
    match (&method, path.as_str()) {
        (&Method::GET, "/v1/leases" | "/v1/list") => {
            let q = v1::ListQuery::parse(req.uri().query().unwrap_or_default())
                .map_err(|e| ApiError::usage(format!("{e}; nothing was done")))?;
            let (views, next) = service.list_page(&q).await?;
            ok(&v1::ListResponse {
                resources: views.iter().map(Into::into).collect(),
                next,
            })
        }
        (&Method::GET, "/v1/status") => {
            let calls = asks_calls_upgrade(&req).then(|| hyper::upgrade::on(&mut req));
            let status = service.status().await;
            match calls {
                Some(on) => Ok(switch_calls(
                    on,
                    calls::Answer::ok(&status),
                    &delivery,
                    service,
                    c,
                    timeout,
                    then,
                )),
                None => ok(&status),
            }
        }
        (&Method::GET, "/v1/hosts") => ok(&service.hosts().await?),
        (&Method::POST, "/v1/acquire") => {
            let calls = asks_calls_upgrade(&req);
            let upgrade = (calls || asks_hold_upgrade(&req)).then(|| hyper::upgrade::on(&mut req));
            let r: v1::AcquireRequest = body(req, None, timeout).await?;
            // Neither waiting nor holding: carried out here, and answered whole.
            match service.acquire_now(&c, r).await {
                Ok(out) => match upgrade.filter(|_| calls) {
                    Some(on) => {
                        let first = calls::Answer::acquired(out?, &delivery);
                        Ok(switch_calls(
                            on, first, &delivery, service, c, timeout, then,
                        ))
                    }
                    None => Ok(ended_grant(out?, delivery)),
                },
                Err(r) => {
                    let hold = r.hold;
                    let rx = service.acquire(&c, *r).await?;
                    match upgrade.filter(|_| hold && !calls) {
                        Some(on) => switched(rx, delivery, on, service.clone(), c, then).await,
                        None => acquire(rx, delivery).await,
                    }
                }
            }
        }
        (&Method::POST, "/v1/release") => {
            let calls = asks_calls_upgrade(&req).then(|| hyper::upgrade::on(&mut req));
            let r: v1::ReleaseRequest = body(req, None, timeout).await?;
            let out = service.release(&c, r).await?;
            let answer = release_response(out);
            match calls {
                Some(on) => Ok(switch_calls(
                    on,
                    calls::Answer::ok(&answer),
                    &delivery,
                    service,
                    c,
                    timeout,
                    then,
                )),
                None => ok(&answer),
            }
        }
        (&Method::POST, "/v1/force-release") => {
            let r: v1::ForceReleaseRequest = body(req, None, timeout).await?;
            let released = service.force_release(&c, r).await?;
            ok(&v1::ReleaseResponse {
                released: released.iter().map(Into::into).collect(),
                failed: Vec::new(),
            })
        }
        (&Method::POST, "/v1/mark-clean") => {
            let r: v1::ResourceRequest = body(req, None, timeout).await?;
            let was = service.mark_clean(&c, r.resource).await?;
            ok(&v1::MarkCleanResponse {
                was: was.as_ref().map(Into::into),
            })
        }
        (&Method::POST, "/v1/validate") => {
            let r: v1::ValidateRequest = body(req, None, timeout).await?;
            ok(&service.validate(r).await?)
        }
        (&Method::POST, "/v1/inspect") => {
            let r: v1::ResourceRequest = body(req, None, timeout).await?;
            let v = service.inspect(r.resource).await?;
            ok(&v1::InspectResponse {
                resource: v.as_ref().map(Into::into),
            })
        }
        (&Method::GET | &Method::POST, "/v1/watch") => {
            let r: v1::WatchRequest = match method {
                Method::GET => v1::WatchRequest::default(),
                _ => body(req, Some(v1::WatchRequest::default()), timeout).await?,
            };
            let rx = service.watch(r.resource).await?;
            Ok(stream_response(ReceiverStream::new(rx).map(|e| match e {
                Ok(e) => line(&e),
                Err(error) => line(&v1::Event {
                    kind: "error".into(),
                    error: Some(error),
                    ..Default::default()
                }),
            })))
        }
        (
            _,
            "/v1/leases" | "/v1/list" | "/v1/status" | "/v1/hosts" | "/v1/acquire" | "/v1/release"
            | "/v1/force-release" | "/v1/mark-clean" | "/v1/validate" | "/v1/inspect" | "/v1/watch",
        ) => Err(ApiError::usage(format!(
            "{method} is not served at {path}; the API: {ROUTES}"
        ))),
        _ => Err(ApiError::new(
            ErrorCode::NotFound,
            format!("no such endpoint {path}; the API: {ROUTES}"),
        )),
    }
}

/// The JSON line of one acquire message, called as the server takes it for writing.
fn acquire_line(out: Out, delivery: &Arc<Delivery>) -> v1::AcquireEvent {
    let (line, check) = acquire_line_checked(out, delivery);
    if let Some(check) = check {
        // What follows a grant read (its hold) runs on the check's task.
        tokio::spawn(async move {
            if let Some(after) = check.await {
                after.await;
            }
        });
    }
    line
}

/// A grant's delivery check: once it knows whether the client read the grant, it settles
/// the grant, and gives what follows a grant read (its hold) to be run.
type Check = Pin<Box<dyn Future<Output = Option<After>> + Send>>;

/// The JSON line of one acquire message, called before it is written, and for a grant whose
/// delivery counts its check (to be run once the line is on its way).
fn acquire_line_checked(out: Out, delivery: &Arc<Delivery>) -> (v1::AcquireEvent, Option<Check>) {
    let mut check = None;
    let line = match out {
        Out::Waiting {
            conflict,
            waited,
            note,
        } => v1::AcquireEvent::Waiting {
            message: Out::waiting_words(conflict.as_ref(), note.as_deref()),
            conflict: conflict.map(|c| conflict_to_v1(&c)),
            waited: waited.into(),
            note,
        },
        Out::Granted {
            grants,
            owner,
            delivered,
            safe_until,
            containment,
            cgroup,
        } => {
            // The grant counts once the client has read it from the socket; one that closed
            // without (a withdrawn wait) does not get it, and the grant is undone.
            if let Some(d) = delivered {
                d.taken();
                let mark = delivery.mark();
                let delivery = delivery.clone();
                check = Some(Box::pin(async move {
                    let read = delivery.received(mark, RECEIVED_WITHIN).await;
                    drop(delivery);
                    crate::metrics::grant_delivered(read);
                    d.settled(read)
                }) as Check);
            }
            v1::AcquireEvent::Granted {
                grants: grants.iter().map(Into::into).collect(),
                owner: (&owner).into(),
                safe_until_monotonic_ns: safe_until,
                containment,
                cgroup: cgroup.map(|p| p.to_string_lossy().into_owned()),
            }
        }
        Out::Safe(until_monotonic_ns) => v1::AcquireEvent::Safe { until_monotonic_ns },
        Out::Lost { resource, ended } => v1::AcquireEvent::Lost {
            resource: resource.to_string(),
            ended: (&ended).into(),
        },
        Out::Failed(e) => v1::AcquireEvent::Error(e),
    };
    (line, check)
}

/// An acquire's first event: its refusal at once is the answer's error; the agent stopping
/// before it, `unavailable`.
async fn first_out(rx: &mut mpsc::Receiver<Out>) -> Result<Out, ApiError> {
    match rx.recv().await {
        None => Err(ApiError::new(
            ErrorCode::Unavailable,
            "the agent is stopping; acquire again",
        )),
        Some(Out::Failed(e)) => Err(e),
        Some(out) => Ok(out),
    }
}

/// An acquire's answer: an error at once (refused without waiting) has its own status and
/// body; anything else streams, one JSON line per event.
async fn acquire(
    mut rx: mpsc::Receiver<Out>,
    delivery: Arc<Delivery>,
) -> Result<Response<Body>, ApiError> {
    let first = first_out(&mut rx).await?;
    let first = tokio_stream::once(first);
    Ok(stream_response(
        first
            .chain(ReceiverStream::new(rx))
            .map(move |out| line(&acquire_line(out, &delivery))),
    ))
}

/// Whether a request asks for its connection to switch to [`v1::HOLD_UPGRADE`].
fn asks_hold_upgrade(req: &Request<Incoming>) -> bool {
    asks_upgrade(req, v1::HOLD_UPGRADE)
}

/// Whether a request asks for its connection to switch to [`v1::CALLS_UPGRADE`].
fn asks_calls_upgrade(req: &Request<Incoming>) -> bool {
    asks_upgrade(req, v1::CALLS_UPGRADE)
}

/// Whether a request asks for its connection to switch to `protocol`, and the server will
/// switch it once answered `101`: it gave the request its [`hyper::upgrade::OnUpgrade`], which
/// it does only for an HTTP/1.1 request with `upgrade:`. Not to one it will not (an HTTP/1.0
/// request): its `101` would close the connection unwritten, kept back for the switch, and the
/// call carried out unanswered.
fn asks_upgrade(req: &Request<Incoming>, protocol: &str) -> bool {
    req.extensions()
        .get::<hyper::upgrade::OnUpgrade>()
        .is_some()
        && req
            .headers()
            .get(UPGRADE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(',')
                    .any(|p| p.trim().eq_ignore_ascii_case(protocol))
            })
}

/// The `101` switching the connection to `protocol`; the server writes it (kept back while
/// the connection's writes are corked) and hands the connection over.
fn switching(protocol: &'static str) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::new()).boxed_unsync());
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    r.headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("upgrade"));
    r.headers_mut()
        .insert(UPGRADE, HeaderValue::from_static(protocol));
    r
}

/// The answer to a call that succeeded and asked for [`v1::CALLS_UPGRADE`]: `101`, kept back
/// and written with `first`, the call's answer as a line; the connection's later calls are
/// carried on its task once the server has handed it over ([`calls::serve`]).
fn switch_calls<S: Store>(
    on: hyper::upgrade::OnUpgrade,
    first: calls::Answer,
    delivery: &Arc<Delivery>,
    service: &Service<S>,
    caller: Caller,
    timeout: Duration,
    then: &Then,
) -> Response<Body> {
    delivery.cork();
    let rest = calls::serve(
        on,
        first,
        delivery.clone(),
        service.clone(),
        caller,
        timeout,
    );
    *then.lock().unwrap_or_else(PoisonError::into_inner) = Some(Box::pin(rest));
    switching(v1::CALLS_UPGRADE)
}

/// A holding acquire's answer on a connection switched to [`v1::HOLD_UPGRADE`]: an error at
/// once has its own status and body, as in [`acquire`]; anything else is `101`, and the
/// stream and the holder's release are carried on the connection's task once the server has
/// written it and handed the connection over ([`hold_switched`]).
async fn switched<S: Store>(
    mut rx: mpsc::Receiver<Out>,
    delivery: Arc<Delivery>,
    on: hyper::upgrade::OnUpgrade,
    service: Service<S>,
    caller: Caller,
    then: &Then,
) -> Result<Response<Body>, ApiError> {
    let first = first_out(&mut rx).await?;
    // The `101` is kept back and written with the first line, in one go.
    delivery.cork();
    let rest = hold_switched(on, first, rx, delivery, service, caller);
    *then.lock().unwrap_or_else(PoisonError::into_inner) = Some(Box::pin(rest));
    Ok(switching(v1::HOLD_UPGRADE))
}

/// The stream of a hold on its switched connection: each event's line written as it comes
/// (the grant's delivery checked as on a chunked stream), and the holder's release, one line,
/// carried out for the connection's process and answered with one line, after which the
/// connection closes. The holder closing its end (or the agent stopping: the connection
/// reads as closed) ends the hold, as a chunked stream's close does; the agent ending the
/// stream (every lease ended) closes the connection.
///
/// The grant's delivery check and then the hold (which only feeds this stream) run here, on
/// the connection's task, beside its reads and writes: no task is spawned after the answer,
/// and no other worker woken for one while the client wakes to read its grant. A check not
/// done when the connection ends is finished on a task of its own (its word decides whether
/// the grant stands); the hold ends with the connection, as it did once its stream closed.
async fn hold_switched<S: Store>(
    on: hyper::upgrade::OnUpgrade,
    first: Out,
    rx: mpsc::Receiver<Out>,
    delivery: Arc<Delivery>,
    service: Service<S>,
    caller: Caller,
) {
    let Ok(upgraded) = on.await else {
        return;
    };
    let Ok(parts) = upgraded.downcast::<TokioIo<PeerStream>>() else {
        return;
    };
    let mut check = None;
    carry_hold(parts, first, rx, &delivery, &service, &caller, &mut check).await;
    if let Some(check) = check {
        tokio::spawn(async move {
            // The connection is gone: what would follow a grant read has nobody to tell.
            drop(check.await);
        });
    }
}

/// [`hold_switched`]'s stream on the switched connection, with the grant's `check` run
/// beside it (left there if not done when this returns).
async fn carry_hold<S: Store>(
    parts: hyper::upgrade::Parts<TokioIo<PeerStream>>,
    first: Out,
    mut rx: mpsc::Receiver<Out>,
    delivery: &Arc<Delivery>,
    service: &Service<S>,
    caller: &Caller,
    check: &mut Option<Check>,
) {
    let mut io = parts.io.into_inner();
    // What the holder sent after its request (its release, if it was quick).
    let mut input = parts.read_buf.to_vec();
    // How much of `input` is known to hold no newline: each byte is looked at once, so a
    // long line read in small pieces costs its length, not its square.
    let mut scanned = 0;
    let mut next = Some(first);
    let mut buf = [0u8; 1024];
    // What follows the grant once the check says it was read: the hold.
    let mut after: Option<After> = None;
    // The `101`'s head, kept back for the first line.
    let mut text = io.uncork();
    loop {
        if let Some(out) = next.take() {
            let (line, checked) = acquire_line_checked(out, delivery);
            text.extend_from_slice(&serde_json::to_vec(&line).unwrap_or_default());
            text.push(b'\n');
            let written = io.write_all(&text).await;
            text.clear();
            let flushed = written.is_ok() && io.flush().await.is_ok();
            // A grant's check starts once its line is written (or failed to be). One grant
            // a stream; another's check would go on a task of its own.
            if let Some(c) = checked {
                match check {
                    None => *check = Some(c),
                    Some(_) => {
                        tokio::spawn(async move {
                            if let Some(after) = c.await {
                                after.await;
                            }
                        });
                    }
                }
            }
            if !flushed {
                return;
            }
        }
        let from = std::mem::replace(&mut scanned, input.len());
        if let Some(end) = input[from..]
            .iter()
            .position(|b| *b == b'\n')
            .map(|at| from + at)
        {
            // The hold's own events are not read from here on: the answer is the last line.
            // The stream is closed once the answer is written, not before the release.
            let answer = release_line(service, caller, &input[..end]).await;
            let mut text = serde_json::to_vec(&answer).unwrap_or_default();
            text.push(b'\n');
            let _ = io.write_all(&text).await;
            let _ = io.flush().await;
            drop(after);
            drop(rx);
            let _ = io.shutdown().await;
            return;
        }
        if input.len() > MAX_BODY {
            let e = ApiError::new(
                ErrorCode::TooLarge,
                format!("a line over {MAX_BODY} bytes on a hold; nothing was done"),
            );
            let _ = io.write_all(&line_bytes(&v1::AcquireEvent::Error(e))).await;
            return;
        }
        // The check first: a client's release read in the same turn as its read of the
        // grant finds the check done, not left to a task.
        tokio::select! {
            biased;
            follows = run_some(check) => {
                *check = None;
                after = follows;
            }
            out = rx.recv() => match out {
                Some(out) => next = Some(out),
                None => return,
            },
            read = io.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => input.extend_from_slice(&buf[..n]),
            },
            () = run_some(&mut after) => after = None,
        }
    }
}

/// Runs the future in `f` to its end; never, while there is none (a `select!` branch off).
async fn run_some<T>(f: &mut Option<Pin<Box<dyn Future<Output = T> + Send>>>) -> T {
    match f {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

/// `value`'s JSON line.
fn line_bytes(value: &impl Serialize) -> Vec<u8> {
    let mut text = serde_json::to_vec(value).unwrap_or_default();
    text.push(b'\n');
    text
}

/// A holder's release sent on its switched connection (`line`, a [`v1::ReleaseRequest`]),
/// carried out as `POST /v1/release` is, and its answer's line.
async fn release_line<S: Store>(
    service: &Service<S>,
    caller: &Caller,
    line: &[u8],
) -> v1::AcquireEvent {
    let r: v1::ReleaseRequest = match serde_json::from_slice(line) {
        Ok(r) => r,
        Err(e) => {
            return v1::AcquireEvent::Error(ApiError::usage(format!(
                "the release on the hold is not a valid ReleaseRequest: {e}; nothing was done \
                 (the schema: docs/api/v1.schema.json)"
            )));
        }
    };
    match service.release(caller, r).await {
        Ok(out) => v1::AcquireEvent::Released(release_response(out)),
        Err(e) => v1::AcquireEvent::Error(e),
    }
}

/// The answer to a release.
fn release_response(out: crate::service::ReleaseOutcome) -> v1::ReleaseResponse {
    v1::ReleaseResponse {
        released: out.released.iter().map(Into::into).collect(),
        failed: out
            .failed
            .into_iter()
            .map(|(resource, error)| v1::NotReleased {
                resource: resource.to_string(),
                error,
            })
            .collect(),
    }
}

/// The answer to an acquire that neither waits nor holds, granted: its line, with its
/// length, ended at once (the client's next call need not wait for the delivery check). A
/// grant with new leases counts once the client read the line to its end, as a streamed one
/// does (else it is undone), checked meanwhile by the line's place in the connection's
/// output ([`Delivery::ending_received`]).
fn ended_grant(out: Out, delivery: Arc<Delivery>) -> Response<Body> {
    let (granted, delivered) = match granted_line(out) {
        Ok(granted) => granted,
        Err(out) => {
            return stream_response(tokio_stream::once(line(&acquire_line(*out, &delivery))));
        }
    };
    let mut text = serde_json::to_vec(&granted).unwrap_or_default();
    text.push(b'\n');
    let text = Bytes::from(text);
    let ending = delivered.map(|d| {
        let ending = Ending::new(&text);
        check_ending(delivery.clone(), ending.clone(), d);
        (delivery, ending)
    });
    let mut r = Response::new(
        EndedLine {
            line: Some(text),
            ending,
        }
        .boxed_unsync(),
    );
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    r
}

/// Starts the delivery check of an answer that ends with a grant (`ending`, its last byte,
/// handed to the writer as it takes it: [`Delivery::handed`]): the grant's new leases `d` count
/// once the client read past the answer's end, else they are undone.
fn check_ending(delivery: Arc<Delivery>, ending: Arc<Ending>, d: Delivered) {
    tokio::spawn(async move {
        let read = delivery.ending_received(&ending, RECEIVED_WITHIN).await;
        drop((delivery, ending));
        crate::metrics::grant_delivered(read);
        // A plain acquire's grant: nothing follows it but its undoing, if not read.
        if let Some(after) = d.settled(read) {
            after.await;
        }
    });
}

/// A grant's line and its new leases (counting once the client has read it); any other
/// message, as it is.
fn granted_line(out: Out) -> Result<(v1::AcquireEvent, Option<Delivered>), Box<Out>> {
    let Out::Granted {
        grants,
        owner,
        delivered,
        safe_until,
        containment,
        cgroup,
    } = out
    else {
        return Err(Box::new(out));
    };
    let line = v1::AcquireEvent::Granted {
        grants: grants.iter().map(Into::into).collect(),
        owner: (&owner).into(),
        safe_until_monotonic_ns: safe_until,
        containment,
        cgroup: cgroup.map(|p| p.to_string_lossy().into_owned()),
    };
    Ok((line, delivered))
}

/// A body of one line, whose delivery is told as the server takes it for writing (the very
/// bytes it will write: the server queues a body's bytes, it does not copy them).
struct EndedLine {
    line: Option<Bytes>,
    ending: Option<(Arc<Delivery>, Arc<Ending>)>,
}

impl hyper::body::Body for EndedLine {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let Some(line) = self.line.take() else {
            return std::task::Poll::Ready(None);
        };
        if let Some((delivery, ending)) = self.ending.take() {
            delivery.handed(&ending);
        }
        std::task::Poll::Ready(Some(Ok(Frame::data(line))))
    }

    fn is_end_stream(&self) -> bool {
        self.line.is_none()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.line.as_ref().map_or(0, |l| l.len() as u64))
    }
}
