//! Prometheus metrics and health checks (`--metrics-listen ADDR`, off by default).
//!
//! `GET /metrics` answers in the Prometheus text format (OpenMetrics when the scraper asks for
//! it), `GET /livez` 200 while the agent's runtime answers, `GET /readyz` 200 when the store
//! answers and, on etcd, the host session is confirmed (its safe-until is in the future), 503
//! with the reason otherwise.
//!
//! Counters and histograms are kept here and bumped by the rest of the agent through the free
//! functions below ([`acquired`], [`exit_to_release`], [`fenced`], ...); the counts of leases,
//! dirty resources and waiters, and the session's figures, are read from the store when
//! scraped. Every label takes values from a fixed set (modes, results, ways a lease ends):
//! per-resource detail stays in `list --json`. The counters are the process's: one agent
//! per process.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use leasehold_core::{EndReason, Event, Mode, ResourceName};
use leasehold_store::{Store, StoreError};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{info, warn};

/// A label's values: an enum, and the list of all of them (`ALL`), from which every count of
/// the label is made at 0 from the start ([`family_of`]), so that a value added later cannot
/// be left out of it.
macro_rules! label_values {
    ($(#[$m:meta])* $vis:vis enum $name:ident { $($(#[$vm:meta])* $v:ident,)* }) => {
        $(#[$m])*
        #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
        #[allow(non_camel_case_types)]
        $vis enum $name {
            $($(#[$vm])* $v,)*
        }

        impl $name {
            /// Every value.
            const ALL: &[$name] = &[$($name::$v),*];
        }
    };
}

label_values! {
    /// How an acquire request ended.
    pub enum AcquireResult {
        /// Granted.
        granted,
        /// Held by another owner.
        busy,
        /// The resource is dirty.
        needs_check,
        /// `--wait` ran out.
        timed_out,
        /// The caller went away while waiting.
        withdrawn,
        /// Refused for another reason (bad request, mode conflict, cancelled, the store failed).
        error,
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: AcquireResult,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
enum ModeValue {
    exclusive,
    shared,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeLabel {
    mode: ModeValue,
}

label_values! {
    enum HowValue {
        released,
        released_dirty,
        process_died,
        exited_clean,
        expired,
        fenced,
        forced,
        handed_over,
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HowLabel {
    how: HowValue,
}

label_values! {
    enum DeliveryValue {
        /// The client read it, or may have (alive without reading, or unknown): kept.
        read,
        /// The client went away without reading it: undone.
        unread,
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeliveryLabel {
    outcome: DeliveryValue,
}

label_values! {
    /// A store operation timed by [`store_op`].
    pub enum StoreOp {
        /// An acquire that did not wait: decided and committed.
        acquire,
        /// A release.
        release,
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabel {
    op: StoreOp,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    backend: String,
}

/// Buckets from 0.1 ms to about 105 s, doubling.
fn latency_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.0001, 2.0, 21)
}

/// What the agent counts as it goes.
struct Counts {
    acquires: Family<ResultLabel, Counter>,
    wait_seconds: Histogram,
    ends: Family<HowLabel, Counter>,
    deliveries: Family<DeliveryLabel, Counter>,
    exit_to_release: Histogram,
    store_seconds: Family<OpLabel, Histogram>,
    fences: Counter,
    fenced_processes: Counter,
    watchdog_feeds: Counter,
    watchdog_failures: Counter,
    renewal_seconds: Histogram,
    renewal_failures: Counter,
}

/// A family with a sample for each of `labels` from the start, so a scrape shows a count that
/// has not happened yet as 0 rather than leaving it out (a client that waits for a count to
/// change then sees it change, and `rate()` sees its first increase).
fn family_of<L, M, C>(
    labels: impl IntoIterator<Item = L>,
    family: Family<L, M, C>,
) -> Family<L, M, C>
where
    L: Clone + std::hash::Hash + Eq,
    C: prometheus_client::metrics::family::MetricConstructor<M>,
{
    for l in labels {
        drop(family.get_or_create(&l));
    }
    family
}

static COUNTS: LazyLock<Counts> = LazyLock::new(|| Counts {
    acquires: family_of(
        AcquireResult::ALL
            .iter()
            .map(|r| ResultLabel { result: r.clone() }),
        Family::default(),
    ),
    wait_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 20)),
    ends: family_of(
        HowValue::ALL.iter().map(|h| HowLabel { how: h.clone() }),
        Family::default(),
    ),
    deliveries: family_of(
        DeliveryValue::ALL
            .iter()
            .map(|o| DeliveryLabel { outcome: o.clone() }),
        Family::default(),
    ),
    exit_to_release: Histogram::new(latency_buckets()),
    store_seconds: family_of(
        StoreOp::ALL.iter().map(|o| OpLabel { op: o.clone() }),
        Family::new_with_constructor(|| Histogram::new(latency_buckets())),
    ),
    fences: Counter::default(),
    fenced_processes: Counter::default(),
    watchdog_feeds: Counter::default(),
    watchdog_failures: Counter::default(),
    renewal_seconds: Histogram::new(latency_buckets()),
    renewal_failures: Counter::default(),
});

/// An acquire request ended with `result`; `waited` is how long it queued, for requests that
/// waited (`--wait`).
pub fn acquired(result: AcquireResult, waited: Option<Duration>) {
    COUNTS.acquires.get_or_create(&ResultLabel { result }).inc();
    if let Some(w) = waited {
        COUNTS.wait_seconds.observe(w.as_secs_f64());
    }
}

/// The result label of a store's answer to an acquire.
pub fn acquire_result<T>(r: &Result<T, StoreError>) -> AcquireResult {
    use leasehold_core::AcquireError;
    match r {
        Ok(_) => AcquireResult::granted,
        Err(StoreError::Acquire(AcquireError::Busy(_))) => AcquireResult::busy,
        Err(StoreError::Acquire(AcquireError::NeedsCheck { .. })) => AcquireResult::needs_check,
        Err(StoreError::TimedOut(_)) => AcquireResult::timed_out,
        Err(_) => AcquireResult::error,
    }
}

/// The check of whether a client read a grant with new leases ended: `read` (or may have:
/// kept), else the client went away without it (the grant is undone).
pub fn grant_delivered(read: bool) {
    let outcome = if read {
        DeliveryValue::read
    } else {
        DeliveryValue::unread
    };
    COUNTS
        .deliveries
        .get_or_create(&DeliveryLabel { outcome })
        .inc();
}

/// A holder's exit was seen `took` before its leases were ended.
pub fn exit_to_release(took: Duration) {
    COUNTS.exit_to_release.observe(took.as_secs_f64());
}

/// A store operation took `took`.
pub fn store_op(op: StoreOp, took: Duration) {
    COUNTS
        .store_seconds
        .get_or_create(&OpLabel { op })
        .observe(took.as_secs_f64());
}

/// This host fenced: `killed` holders were sent SIGKILL.
pub fn fenced(killed: usize) {
    COUNTS.fences.inc();
    COUNTS.fenced_processes.inc_by(killed as u64);
}

/// The watchdog was fed (`ok`), or writing to it failed.
pub fn watchdog_fed(ok: bool) {
    if ok {
        COUNTS.watchdog_feeds.inc();
    } else {
        COUNTS.watchdog_failures.inc();
    }
}

fn how(e: &EndReason) -> HowValue {
    match e {
        EndReason::Released => HowValue::released,
        EndReason::ReleasedDirty { .. } => HowValue::released_dirty,
        EndReason::ProcessDied => HowValue::process_died,
        EndReason::ExitedClean => HowValue::exited_clean,
        EndReason::SessionExpired => HowValue::expired,
        EndReason::Fenced => HowValue::fenced,
        EndReason::Forced { .. } => HowValue::forced,
        EndReason::HandedOver { .. } => HowValue::handed_over,
    }
}

/// Counts lease endings from the store's events, and session renewals from its session.
async fn follow<S: Store>(store: Arc<S>) {
    let mut events = store.subscribe();
    let mut session = store.session();
    let mut last_sent = session.as_ref().and_then(|s| s.borrow().renewed_sent_at);
    let mut last_failed = session.as_ref().map_or(0, |s| s.borrow().failed_renewals);
    loop {
        tokio::select! {
            e = events.recv() => match e {
                Ok(Event::Ended { ended, .. }) => {
                    COUNTS.ends.get_or_create(&HowLabel { how: how(&ended.how) }).inc();
                }
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            },
            changed = async { session.as_mut()?.changed().await.ok() }, if session.is_some() => {
                let Some(()) = changed else {
                    session = None;
                    continue;
                };
                let Some(rx) = session.as_ref() else { continue };
                let s = rx.borrow().clone();
                if s.renewed_sent_at != last_sent && s.renewed_sent_at.is_some() {
                    if let Some(rtt) = s.latencies.last() {
                        COUNTS.renewal_seconds.observe(rtt.as_secs_f64());
                    }
                    last_sent = s.renewed_sent_at;
                }
                if s.failed_renewals > last_failed {
                    COUNTS.renewal_failures.inc_by(s.failed_renewals - last_failed);
                }
                last_failed = s.failed_renewals;
            }
        }
    }
}

/// What is read from the store at each scrape.
struct Scrape {
    held: Family<ModeLabel, Gauge>,
    dirty: Gauge,
    waiters: Gauge,
    damaged: Gauge,
    session_confirmed: Gauge,
    safe_seconds_left: Gauge<f64, AtomicU64>,
    failed_renewals_now: Gauge,
    build: Family<BuildLabels, Gauge>,
}

fn registry(s: &Scrape) -> Registry {
    let c = &*COUNTS;
    let mut r = Registry::with_prefix("leasehold");
    r.register(
        "leases_held",
        "Live leases on this agent's store, by mode",
        s.held.clone(),
    );
    r.register(
        "dirty_resources",
        "Resources marked dirty (needing a check)",
        s.dirty.clone(),
    );
    r.register(
        "waiters",
        "Requests waiting for a resource",
        s.waiters.clone(),
    );
    r.register(
        "damaged_records",
        "Records that do not decode or break the lease rules (refused until repaired)",
        s.damaged.clone(),
    );
    r.register(
        "acquires",
        "Acquire requests served by this agent, by result",
        c.acquires.clone(),
    );
    r.register(
        "acquire_wait_seconds",
        "How long acquire requests that waited (--wait) queued before their answer",
        c.wait_seconds.clone(),
    );
    r.register(
        "lease_ends",
        "Leases ended, by how (seen on this agent's store)",
        c.ends.clone(),
    );
    r.register(
        "grant_deliveries",
        "Grants with new leases whose delivery check ended, by outcome: read (kept) or unread (the client went away without it; undone)",
        c.deliveries.clone(),
    );
    r.register(
        "holder_exit_to_release_seconds",
        "From a holder's exit seen by its pidfd to its leases ended in the store",
        c.exit_to_release.clone(),
    );
    r.register(
        "store_operation_seconds",
        "Store operations (decided and made durable) as the agent's API waited for them",
        c.store_seconds.clone(),
    );
    r.register(
        "session_renewal_seconds",
        "Round trips of the host session's confirmed renewals (etcd)",
        c.renewal_seconds.clone(),
    );
    r.register(
        "session_renewal_failures",
        "Host session renewals that failed (etcd)",
        c.renewal_failures.clone(),
    );
    r.register(
        "session_failed_renewals_pending",
        "Renewals failed since the last confirmed one (etcd)",
        s.failed_renewals_now.clone(),
    );
    r.register(
        "session_confirmed",
        "1 while the host session is confirmed alive (always 1 on the local store)",
        s.session_confirmed.clone(),
    );
    r.register(
        "session_safe_seconds_left",
        "Seconds until the host session could expire unless renewed (etcd; negative: past)",
        s.safe_seconds_left.clone(),
    );
    r.register(
        "fences",
        "Times this host fenced (killed its holders to keep exclusion)",
        c.fences.clone(),
    );
    r.register(
        "fenced_processes",
        "Holder processes SIGKILLed by fencing",
        c.fenced_processes.clone(),
    );
    r.register(
        "watchdog_feeds",
        "Writes to the watchdog device",
        c.watchdog_feeds.clone(),
    );
    r.register(
        "watchdog_feed_failures",
        "Writes to the watchdog device that failed",
        c.watchdog_failures.clone(),
    );
    r.register(
        "build_info",
        "The agent's version and backend (always 1)",
        s.build.clone(),
    );
    r
}

/// How long a scrape or a readiness check waits for the store.
const STORE_WAIT: Duration = Duration::from_secs(2);

/// The name a readiness check inspects: any name does, the store need only answer.
fn probe_name() -> Option<ResourceName> {
    ResourceName::new("leasehold/readyz").ok()
}

async fn render<S: Store>(store: &S, backend: &str, openmetrics: bool) -> String {
    let s = Scrape {
        held: Family::default(),
        dirty: Gauge::default(),
        waiters: Gauge::default(),
        damaged: Gauge::default(),
        session_confirmed: Gauge::default(),
        safe_seconds_left: Gauge::default(),
        failed_renewals_now: Gauge::default(),
        build: Family::default(),
    };
    s.build
        .get_or_create(&BuildLabels {
            version: env!("CARGO_PKG_VERSION"),
            backend: backend.to_owned(),
        })
        .set(1);
    // Both modes are always shown, so a query for either never finds nothing.
    for mode in [ModeValue::exclusive, ModeValue::shared] {
        let _ = s.held.get_or_create(&ModeLabel { mode });
    }
    if let Ok(Ok(views)) = tokio::time::timeout(STORE_WAIT, store.list()).await {
        for v in &views {
            for l in &v.holders {
                let mode = match l.mode {
                    Mode::Exclusive => ModeValue::exclusive,
                    Mode::Shared => ModeValue::shared,
                };
                s.held.get_or_create(&ModeLabel { mode }).inc();
            }
            s.dirty.inc_by(i64::from(v.dirty.is_some()));
            s.damaged.inc_by(i64::from(v.damaged.is_some()));
            s.waiters
                .inc_by(i64::try_from(v.waiters.len()).unwrap_or(i64::MAX));
        }
    }
    match store.session() {
        None => {
            s.session_confirmed.set(1);
        }
        Some(rx) => {
            let st = rx.borrow().clone();
            let now = Instant::now();
            let until = st.safe_until();
            s.session_confirmed
                .set(i64::from(!st.expired && until.is_some_and(|u| u > now)));
            if let Some(u) = until {
                let left = if u >= now {
                    (u - now).as_secs_f64()
                } else {
                    -(now - u).as_secs_f64()
                };
                s.safe_seconds_left.set(left);
            }
            s.failed_renewals_now
                .set(i64::try_from(st.failed_renewals).unwrap_or(i64::MAX));
        }
    }
    let mut text = String::new();
    // Encoding into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut text, &registry(&s));
    if openmetrics {
        text
    } else {
        prometheus_text(&text)
    }
}

/// OpenMetrics text as the Prometheus text format (0.0.4): a counter family is named with its
/// `_total` suffix in its HELP and TYPE lines, as its samples are, and there is no end marker.
fn prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| Some((p, line.strip_prefix(p)?)));
        match meta {
            Some((p, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let total = if counters.contains(name) {
                    "_total"
                } else {
                    ""
                };
                out.push_str(&format!("{p}{name}{total} {tail}\n"));
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

/// Whether the agent is ready to serve leases: `Err` says why not.
async fn ready<S: Store>(store: &S) -> Result<(), String> {
    if let Some(rx) = store.session() {
        let st = rx.borrow().clone();
        if st.expired {
            return Err("the host session has ended; a new one is being opened".into());
        }
        match st.safe_until() {
            None => return Err("the host session is not confirmed yet".into()),
            Some(u) if u <= Instant::now() => {
                return Err(format!(
                    "the host session is not confirmed: its last renewal was sent {:.1}s ago \
                     and {} renewals failed since",
                    st.renewed_sent_at
                        .map_or(0.0, |t| t.elapsed().as_secs_f64()),
                    st.failed_renewals
                ));
            }
            Some(_) => {}
        }
    }
    let name = probe_name().ok_or("no probe name")?;
    match tokio::time::timeout(STORE_WAIT, store.inspect(name)).await {
        Err(_) => Err(format!("the store did not answer within {STORE_WAIT:?}")),
        Ok(Err(e)) => Err(format!("the store failed: {e}")),
        Ok(Ok(_)) => Ok(()),
    }
}

/// The most connections served at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 16;
/// The longest request head read, and how long a client may take to send it.
const MAX_HEAD: usize = 8192;
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `/metrics`, `/livez` and `/readyz` on `listener` until the task is aborted.
pub async fn serve<S: Store>(listener: TcpListener, store: Arc<S>, backend: String) {
    tokio::spawn(follow(store.clone()));
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "serving metrics and health (/metrics, /livez, /readyz)");
    }
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (conn, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "metrics listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (store, backend) = (store.clone(), backend.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let _ = answer(conn, &*store, &backend).await;
        });
    }
}

/// Binds the metrics listener.
///
/// # Errors
/// The address cannot be bound.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Reads one request head and answers it; the connection is then closed.
async fn answer<S: Store>(mut conn: TcpStream, store: &S, backend: &str) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let read = tokio::time::timeout(HEAD_TIMEOUT, async {
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = conn.read(&mut buf).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            head.extend_from_slice(&buf[..n]);
            if head.len() > MAX_HEAD {
                return Err(std::io::ErrorKind::InvalidData.into());
            }
        }
        Ok::<(), std::io::Error>(())
    })
    .await;
    let (status, ctype, body) = match read {
        Err(_) => return Ok(()),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::InvalidData => (
            "431 Request Header Fields Too Large",
            "text/plain",
            "request head too large\n".to_owned(),
        ),
        Ok(Err(e)) => return Err(e),
        Ok(Ok(())) => route(&head, store, backend).await,
    };
    let reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(reply.as_bytes()).await?;
    conn.write_all(body.as_bytes()).await?;
    conn.shutdown().await
}

async fn route<S: Store>(
    head: &[u8],
    store: &S,
    backend: &str,
) -> (&'static str, &'static str, String) {
    let text = String::from_utf8_lossy(head);
    let mut words = text.lines().next().unwrap_or("").split(' ');
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    if method != "GET" {
        return (
            "405 Method Not Allowed",
            "text/plain",
            "only GET: /metrics, /livez, /readyz\n".into(),
        );
    }
    match path {
        "/metrics" => {
            let openmetrics = text.lines().any(|l| {
                let l = l.to_ascii_lowercase();
                l.starts_with("accept:") && l.contains("application/openmetrics-text")
            });
            let ctype = if openmetrics {
                "application/openmetrics-text; version=1.0.0; charset=utf-8"
            } else {
                "text/plain; version=0.0.4; charset=utf-8"
            };
            ("200 OK", ctype, render(store, backend, openmetrics).await)
        }
        "/livez" => ("200 OK", "text/plain", "ok\n".into()),
        "/readyz" => match ready(store).await {
            Ok(()) => ("200 OK", "text/plain", "ready\n".into()),
            Err(why) => (
                "503 Service Unavailable",
                "text/plain",
                format!("not ready: {why}\n"),
            ),
        },
        _ => (
            "404 Not Found",
            "text/plain",
            "not found; try /metrics, /livez or /readyz\n".into(),
        ),
    }
}
