//! kill -9 at any instant loses nothing acknowledged and never reissues a token.
//!
//! The parent test runs rounds. In each, it starts this test binary again as a child
//! (`crash_child`), which opens the local store and runs concurrent clients that acquire,
//! release and "die" (end_process) on a few resources, printing a line for every operation
//! *before* it is sent (intent) and every answer it got (acknowledgement). After a random
//! delay the parent sends SIGKILL, reopens the store and checks, against the child's lines:
//! - every acknowledged grant that was not then released or ended is still held, with its
//!   token (G6);
//! - every acknowledged death of an exclusive holder left its resource dirty (G5);
//! - no token was ever acknowledged twice for one resource, and a grant after the restart
//!   takes a token larger than any acknowledged before (G2).
//!
//! `LEASEHOLD_CRASH_ROUNDS=N` runs more rounds (default 8).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use leasehold_core::{HostId, Mode, Owner, ProcessKey, ReleaseKind, ResourceName};
use leasehold_store::{AcquireSpec, LocalStore, Store};

const RESOURCES: usize = 6;
const CLIENTS: u32 = 12;

fn host() -> HostId {
    HostId::new("crash-host").unwrap()
}

fn res(i: usize) -> ResourceName {
    ResourceName::new(format!("disk-{i}")).unwrap()
}

/// A tiny deterministic generator, so a child's run depends only on its seed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
#[ignore = "the child process of local_store_survives_kill_9; started by it"]
fn crash_child() {
    let dir = std::env::var("LEASEHOLD_CRASH_DIR")
        .expect("run only by local_store_survives_kill_9, as its child, with LEASEHOLD_CRASH_DIR");
    let round: u32 = std::env::var("LEASEHOLD_CRASH_ROUND")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let out = Arc::new(Mutex::new(std::io::stdout()));
    let say = move |line: String| {
        let mut o = out.lock().unwrap();
        writeln!(o, "@@ {line}").unwrap();
        o.flush().unwrap();
    };
    rt.block_on(async move {
        let store = Arc::new(LocalStore::open(&dir, host()).unwrap());
        // Every grant published as an event must already be durable: the parent counts the
        // tokens seen here as given out, like acknowledged ones.
        let mut events = store.subscribe();
        let say_event = say.clone();
        tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(leasehold_core::Event::Granted { resource, lease }) => {
                        say_event(format!("E {resource} {}", lease.token));
                    }
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        say("ready".into());
        let mut tasks = Vec::new();
        for c in 0..CLIENTS {
            let store = store.clone();
            let say = say.clone();
            tasks.push(tokio::spawn(async move {
                let mut rng = Rng(u64::from(round) << 32 | u64::from(c));
                let mut life = 0u32;
                loop {
                    // Each "process" is a pid no other round or client uses.
                    let pid = round * 1_000_000 + c * 10_000 + life;
                    let owner = Owner::new(host(), pid, 7);
                    let r = res(rng.below(RESOURCES as u64) as usize);
                    let mode = if rng.below(3) == 0 {
                        Mode::Shared
                    } else {
                        Mode::Exclusive
                    };
                    say(format!("a {r} {pid}"));
                    let spec = AcquireSpec::new(owner.clone(), [(r.clone(), mode)]).accept_dirty();
                    match store.acquire(spec).await {
                        Ok(g) => say(format!("G {r} {pid} {} {}", g[0].token, mode)),
                        Err(_) => {
                            life += 1;
                            continue;
                        }
                    }
                    if rng.below(4) == 0 {
                        say(format!("d {pid}"));
                        store.end_process(owner.process.clone()).await.unwrap();
                        say(format!("D {pid}"));
                    } else {
                        say(format!("r {r} {pid}"));
                        store
                            .release(
                                r.clone(),
                                owner.process.clone(),
                                None,
                                None,
                                ReleaseKind::Clean,
                            )
                            .await
                            .unwrap();
                        say(format!("R {r} {pid}"));
                    }
                    life += 1;
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    });
}

#[derive(Default)]
struct Model {
    /// Acknowledged grants: (resource, pid) -> (token, mode).
    granted: BTreeMap<(String, u32), (u64, String)>,
    /// Grants whose release or death was at least attempted.
    let_go: BTreeSet<(String, u32)>,
    /// Resources that an acknowledged death of an exclusive holder left dirty.
    must_be_dirty: BTreeSet<String>,
    /// Every acknowledged token, per resource.
    tokens: BTreeMap<String, BTreeSet<u64>>,
    /// Every token seen in a `Granted` event, per resource: published, so durable.
    published: BTreeMap<String, BTreeSet<u64>>,
}

impl Model {
    fn read(&mut self, line: &str) {
        let f: Vec<&str> = line.split(' ').collect();
        match f.as_slice() {
            ["G", r, pid, token, mode] => {
                let token: u64 = token.parse().unwrap();
                let pid: u32 = pid.parse().unwrap();
                assert!(
                    self.tokens.entry(r.to_string()).or_default().insert(token),
                    "token {token} of {r} acknowledged twice"
                );
                self.granted
                    .insert((r.to_string(), pid), (token, mode.to_string()));
            }
            ["E", r, token] => {
                self.published
                    .entry(r.to_string())
                    .or_default()
                    .insert(token.parse().unwrap());
            }
            ["r", r, pid] => {
                self.let_go.insert((r.to_string(), pid.parse().unwrap()));
            }
            ["d", pid] => {
                let pid: u32 = pid.parse().unwrap();
                for (r, p) in self.granted.keys() {
                    if *p == pid {
                        self.let_go.insert((r.clone(), *p));
                    }
                }
            }
            ["D", pid] => {
                let pid: u32 = pid.parse().unwrap();
                for ((r, p), (_, mode)) in &self.granted {
                    if *p == pid && mode == "exclusive" {
                        self.must_be_dirty.insert(r.clone());
                    }
                }
            }
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_store_survives_kill_9() {
    let rounds: u32 = std::env::var("LEASEHOLD_CRASH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut model = Model::default();
    let mut rng = Rng(0x5eed);
    let mut acked_total = 0;
    for round in 0..rounds {
        let mut child = Command::new(&exe)
            .args([
                "crash_child",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("LEASEHOLD_CRASH_DIR", dir.path())
            .env("LEASEHOLD_CRASH_ROUND", (round + 1).to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // libtest may have left "test crash_child ... " unfinished on the line.
                if let Some(at) = line.find("@@ ") {
                    if tx.send(line[at + 3..].to_string()).is_err() {
                        break;
                    }
                }
            }
        });
        // Wait for the child to be ready, then let it run for a random while.
        let first = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("child ready");
        assert_eq!(first, "ready");
        let run_for = Duration::from_millis(30 + rng.below(300));
        let until = Instant::now() + run_for;
        let mut lines = Vec::new();
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            match rx.recv_timeout(left) {
                Ok(l) => lines.push(l),
                Err(_) => break,
            }
        }
        // On Unix, Child::kill sends SIGKILL.
        child.kill().unwrap();
        child.wait().unwrap();
        reader.join().unwrap();
        lines.extend(rx.try_iter());
        acked_total += lines.iter().filter(|l| l.starts_with('G')).count();
        for l in &lines {
            model.read(l);
        }

        // Reopen after the crash and compare with what was acknowledged.
        let store = LocalStore::open(dir.path(), host()).unwrap();
        for ((r, pid), (token, _)) in &model.granted {
            if model.let_go.contains(&(r.clone(), *pid)) {
                continue;
            }
            let v = store
                .inspect(ResourceName::new(r.as_str()).unwrap())
                .await
                .unwrap();
            let held = v.as_ref().is_some_and(|v| {
                v.holders
                    .iter()
                    .any(|l| l.owner.process.pid == *pid && l.token.0 == *token)
            });
            assert!(
                held,
                "round {round}: acknowledged grant {r} pid {pid} token {token} lost"
            );
        }
        for r in &model.must_be_dirty {
            let v = store
                .inspect(ResourceName::new(r.as_str()).unwrap())
                .await
                .unwrap();
            assert!(
                v.is_some_and(|v| v.dirty.is_some()),
                "round {round}: acknowledged dirty mark of {r} lost"
            );
        }
        // A grant now takes a token above every acknowledged one. End every lease left by the
        // child first, as the agent would for processes that are gone.
        let views = store.list().await.unwrap();
        let leftovers: BTreeSet<ProcessKey> = views
            .iter()
            .flat_map(|v| v.holders.iter().map(|l| l.owner.process.clone()))
            .collect();
        for p in leftovers {
            store.end_process(p).await.unwrap();
        }
        for i in 0..RESOURCES {
            let r = res(i);
            let probe = Owner::new(host(), 999_999_999 - round, 1);
            let g = store
                .acquire(
                    AcquireSpec::new(probe.clone(), [(r.clone(), Mode::Exclusive)]).accept_dirty(),
                )
                .await
                .unwrap();
            let max = model
                .tokens
                .get(r.as_str())
                .and_then(|t| t.last().copied())
                .unwrap_or(0);
            assert!(
                g[0].token.0 > max,
                "round {round}: {r} reissued token {} (max acked {max})",
                g[0].token
            );
            let published = model
                .published
                .get(r.as_str())
                .and_then(|t| t.last().copied())
                .unwrap_or(0);
            assert!(
                g[0].token.0 > published,
                "round {round}: {r} reissued token {}, though a grant with token {published} was published as an event before the crash: events must follow durability",
                g[0].token
            );
            assert!(
                model
                    .tokens
                    .entry(r.to_string())
                    .or_default()
                    .insert(g[0].token.0),
                "token reused"
            );
            store
                .release(r, probe.process, None, None, ReleaseKind::Clean)
                .await
                .unwrap();
        }
        // The probe's leases and the leftovers' deaths changed what "held" means: start the
        // model of holdings afresh, keeping tokens and dirty marks.
        model.granted.clear();
        model.let_go.clear();
        store.close();
    }
    let published_total: usize = model.published.values().map(BTreeSet::len).sum();
    assert!(
        published_total >= rounds as usize,
        "the children saw only {published_total} grant events; the event check exercised nothing"
    );
    assert!(
        acked_total >= rounds as usize,
        "the children acknowledged only {acked_total} grants; the test exercised nothing"
    );
}
