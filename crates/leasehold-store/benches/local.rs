//! Throughput and latency of the local store, durable (every grant and release fsynced before
//! it is answered), with 1 and with 64 concurrent callers; beside it, the cost of one fsync
//! on the same filesystem, the floor for a durable answer.
//!
//! `cargo bench -p leasehold-store --bench local [-- --seconds N] [-- --dir PATH]`

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use leasehold_core::{HostId, Mode, Owner, ReleaseKind, ResourceName};
use leasehold_store::{AcquireSpec, LocalStore, Store};

struct Args {
    seconds: f64,
    dir: Option<std::path::PathBuf>,
    clients: Vec<usize>,
}

fn args() -> Args {
    let mut a = Args {
        seconds: 3.0,
        dir: None,
        clients: vec![1, 64],
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--seconds" => a.seconds = it.next().and_then(|s| s.parse().ok()).unwrap_or(3.0),
            "--dir" => a.dir = it.next().map(Into::into),
            "--clients" => {
                a.clients = it
                    .next()
                    .map(|s| s.split(',').filter_map(|n| n.parse().ok()).collect())
                    .unwrap_or_default()
            }
            _ => {} // cargo bench passes --bench
        }
    }
    a
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

fn fsync_floor(dir: &std::path::Path, n: usize) -> Duration {
    let path = dir.join("fsync-probe");
    let mut f = std::fs::File::create(&path).expect("probe file");
    let buf = [7u8; 4096];
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        f.write_all(&buf).expect("write");
        f.sync_data().expect("fdatasync");
        lat.push(t.elapsed());
    }
    let _ = std::fs::remove_file(path);
    lat.sort();
    percentile(&lat, 0.5)
}

async fn run(store: Arc<LocalStore>, clients: usize, seconds: f64) {
    let host = store.host().clone();
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let mut tasks = Vec::new();
    for c in 0..clients {
        let store = store.clone();
        let host = host.clone();
        tasks.push(tokio::spawn(async move {
            let owner = Owner::new(host, 100_000 + c as u32, 1);
            let r = ResourceName::new(format!("bench/{clients}/{c}")).expect("name");
            let mut acq = Vec::new();
            let mut rel = Vec::new();
            while Instant::now() < deadline {
                let t = Instant::now();
                store
                    .acquire(AcquireSpec::new(
                        owner.clone(),
                        [(r.clone(), Mode::Exclusive)],
                    ))
                    .await
                    .expect("acquire");
                let t2 = Instant::now();
                store
                    .release(
                        r.clone(),
                        owner.process.clone(),
                        None,
                        None,
                        ReleaseKind::Clean,
                    )
                    .await
                    .expect("release");
                acq.push(t2 - t);
                rel.push(t2.elapsed());
            }
            (acq, rel)
        }));
    }
    let started = Instant::now();
    let mut acq = Vec::new();
    let mut rel = Vec::new();
    for t in tasks {
        let (a, r) = t.await.expect("client");
        acq.extend(a);
        rel.extend(r);
    }
    let elapsed = started.elapsed().as_secs_f64();
    acq.sort();
    rel.sort();
    println!(
        "{clients:>3} clients: {:>8.0} acquire+release/s | acquire p50 {} p99 {} | release p50 {} p99 {} | {} cycles",
        acq.len() as f64 / elapsed,
        ms(percentile(&acq, 0.5)),
        ms(percentile(&acq, 0.99)),
        ms(percentile(&rel, 0.5)),
        ms(percentile(&rel, 0.99)),
        acq.len(),
    );
}

fn main() {
    let a = args();
    let tmp;
    let dir = match &a.dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::tempdir().expect("temp dir");
            tmp.path().to_path_buf()
        }
    };
    std::fs::create_dir_all(&dir).expect("bench dir");
    println!("leasehold local store, durable, state in {}", dir.display());
    println!(
        "reference: one 4 KiB write + fdatasync here: p50 {}",
        ms(fsync_floor(&dir, 200))
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let store = Arc::new(
        LocalStore::open(dir.join("state"), HostId::new("bench").expect("host")).expect("open"),
    );
    for c in &a.clients {
        rt.block_on(run(store.clone(), *c, a.seconds));
    }
}
