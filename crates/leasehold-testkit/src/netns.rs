//! Network namespaces joined to the root namespace by a veth pair, for partition tests.

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, Once, PoisonError};

use rustix::fs::FlockOperation;
use rustix::process::Signal;
use rustix::thread::LinkNameSpaceType;

use crate::proc;

/// Prefix of every namespace this crate creates: `lhtk-PID-N-HINT`.
const PREFIX: &str = "lhtk-";
/// Where `ip netns` keeps its namespaces.
const NETNS_DIR: &str = "/run/netns";
/// Subnets are /30s of 10.200.0.0/16: 16384 of them.
const SUBNETS: u32 = 16384;
/// The name of the veth end inside every namespace.
const NS_IF: &str = "eth0";
/// The nftables table [`Netns::cut`] adds inside the namespace.
const CUT_TABLE: &str = "leasehold_testkit_cut";

static NEXT: AtomicU32 = AtomicU32::new(0);
static REAP_STALE: Once = Once::new();

/// A network namespace joined to the root namespace by a veth pair, on its own /30 of
/// 10.200.0.0/16: [`host_ip`](Netns::host_ip) (`10.200.X.Y+1`) is the root side,
/// [`ns_ip`](Netns::ns_ip) (`10.200.X.Y+2`) the inside, on interface `eth0`, with `lo` up and a
/// default route through the root side.
///
/// Processes started with [`command`](Netns::command), and code run by
/// [`run`](Netns::run), see only the namespace's interfaces. They reach the root namespace at
/// `host_ip()` (and, through the default route, at any other address of the root namespace
/// except 127.0.0.0/8, which inside is the namespace's own loopback). So **an etcd that
/// processes inside must reach has to listen on `host_ip()`** ([`Etcd::start_on`]`(ns.host_ip())`,
/// or [`EtcdCluster::start_on`]) **or on `0.0.0.0`**; one on 127.0.0.1 is out of their reach.
/// Processes in the root namespace reach `host_ip()` too, so the same etcd serves both.
///
/// [`cut`](Netns::cut) drops every packet in and out of the namespace's `eth0`, silently, like
/// a pulled cable: new connections hang in SYN retries, established ones stall in
/// retransmissions (nothing is reset), until [`heal`](Netns::heal), after which established
/// TCP connections recover by retransmission.
///
/// Unix sockets bound to a path in the filesystem remain reachable across network
/// namespaces in both directions, cut or not: they are filesystem objects, and `ip netns exec`
/// changes only the network namespace (and remounts `/sys`), not `/tmp`, `/run` or other
/// mounts. Abstract Unix sockets (a name starting with a NUL byte) are per network namespace
/// and are *not* reachable across. Both are checked by this crate's tests.
///
/// Names include the test process's PID and a counter, and each namespace locks its subnet
/// (a `flock` on a file in the temporary directory), so parallel tests and test processes do
/// not clash. Dropping a `Netns` kills the processes still inside it and deletes the
/// namespace and the veth pair. Needs root, `ip` and `nft`.
///
/// [`Etcd::start_on`]: crate::Etcd::start_on
/// [`EtcdCluster::start_on`]: crate::EtcdCluster::start_on
pub struct Netns {
    name: String,
    host_if: String,
    host_ip: String,
    ns_ip: String,
    cut: Mutex<bool>,
    /// Holds the subnet's lock until drop.
    _subnet_lock: File,
}

impl Netns {
    /// Creates a namespace named `lhtk-PID-N-HINT` (the hint is sanitized and shortened; it
    /// only helps when reading `ip netns list`), its veth pair and addresses. Panics, with the
    /// failing command's error, if any step fails (for instance when not root).
    pub fn new(name_hint: &str) -> Netns {
        REAP_STALE.call_once(reap_stale);
        let pid = std::process::id();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let hint: String = name_hint
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .take(20)
            .collect();
        let name = if hint.is_empty() {
            format!("{PREFIX}{pid}-{n}")
        } else {
            format!("{PREFIX}{pid}-{n}-{hint}")
        };
        // Interface names have at most 15 bytes: `lh` + PID (at most 7 digits on Linux) +
        // `v` + counter.
        let host_if = format!("lh{pid}v{n}");
        assert!(
            host_if.len() <= 15,
            "leasehold-testkit: interface name {host_if} is too long"
        );
        let (index, lock) = lock_subnet();
        let base = index * 4;
        let (a, b) = (base / 256, base % 256);
        let host_ip = format!("10.200.{a}.{}", b + 1);
        let ns_ip = format!("10.200.{a}.{}", b + 2);
        let ns = Netns {
            name,
            host_if,
            host_ip,
            ns_ip,
            cut: Mutex::new(false),
            _subnet_lock: lock,
        };
        // From here on, Drop undoes whatever part was done.
        if let Err(e) = ns.set_up() {
            panic!(
                "leasehold-testkit: cannot set up network namespace {}: {e}",
                ns.name
            );
        }
        ns
    }

    fn set_up(&self) -> Result<(), String> {
        let (name, host_if, ns_if) = (&self.name, &self.host_if, NS_IF);
        let host_cidr = format!("{}/30", self.host_ip);
        let ns_cidr = format!("{}/30", self.ns_ip);
        ip(&["netns", "add", name])?;
        // The peer is created directly inside the namespace, so its name only has to be unique
        // there.
        ip(&[
            "link", "add", host_if, "type", "veth", "peer", "name", ns_if, "netns", name,
        ])?;
        ip(&["addr", "add", &host_cidr, "dev", host_if])?;
        ip(&["link", "set", host_if, "up"])?;
        ip(&["-n", name, "addr", "add", &ns_cidr, "dev", ns_if])?;
        ip(&["-n", name, "link", "set", ns_if, "up"])?;
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        ip(&["-n", name, "route", "add", "default", "via", &self.host_ip])?;
        Ok(())
    }

    /// The namespace's name, as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The root namespace's address on the veth pair, e.g. `10.200.0.1`: what processes
    /// inside connect to, and where servers they must reach listen.
    pub fn host_ip(&self) -> &str {
        &self.host_ip
    }

    /// The namespace's own address, e.g. `10.200.0.2`, reachable from the root namespace.
    pub fn ns_ip(&self) -> &str {
        &self.ns_ip
    }

    /// The veth end in the root namespace, e.g. `lh12345v0` (inside it is `eth0`).
    pub fn host_interface(&self) -> &str {
        &self.host_if
    }

    /// A command running `program` inside the namespace (`ip netns exec NAME program`); add
    /// its arguments, environment and stdio as usual. Its children stay inside too.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec"]).arg(&self.name).arg(program);
        cmd
    }

    /// Runs `f` on a new thread that has joined the namespace, and returns its result: sockets
    /// that `f` opens (and processes it spawns) belong to the namespace, and keep belonging to
    /// it when `f` returns them to be used on other threads (a connected `TcpStream`, say, to
    /// hand to an async runtime). The calling thread and the rest of the process stay where
    /// they are. Panics if `f` panics.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = self.path();
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) => panic!("leasehold-testkit: cannot open {}: {e}", path.display()),
        };
        std::thread::scope(|s| {
            let joined = s.spawn(move || {
                if let Err(e) = rustix::thread::move_into_link_name_space(
                    file.as_fd(),
                    Some(LinkNameSpaceType::Network),
                ) {
                    panic!("leasehold-testkit: setns into {}: {e}", path.display());
                }
                f()
            });
            match joined.join() {
                Ok(t) => t,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Partitions the namespace: drops every packet in or out of its `eth0` (an nftables
    /// table inside the namespace), silently. Idempotent.
    pub fn cut(&self) {
        let mut cut = self.cut.lock().unwrap_or_else(PoisonError::into_inner);
        if *cut {
            return;
        }
        let rules = format!(
            "table inet {CUT_TABLE} {{\n\
             \tchain input {{ type filter hook input priority -300; iifname \"{NS_IF}\" drop; }}\n\
             \tchain output {{ type filter hook output priority -300; oifname \"{NS_IF}\" drop; }}\n\
             }}\n"
        );
        let mut child = match self
            .command("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
        {
            Ok(c) => c,
            Err(e) => panic!("leasehold-testkit: cannot run nft: {e}"),
        };
        if let Some(mut stdin) = child.stdin.take() {
            if let Err(e) = stdin.write_all(rules.as_bytes()) {
                panic!("leasehold-testkit: writing rules to nft: {e}");
            }
        }
        match child.wait_with_output() {
            Ok(out) if out.status.success() => *cut = true,
            Ok(out) => panic!(
                "leasehold-testkit: nft could not cut {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(e) => panic!("leasehold-testkit: waiting for nft: {e}"),
        }
    }

    /// Ends a [`cut`](Netns::cut): removes the table. Idempotent.
    pub fn heal(&self) {
        let mut cut = self.cut.lock().unwrap_or_else(PoisonError::into_inner);
        if !*cut {
            return;
        }
        if let Err(e) = proc::run(
            self.command("nft")
                .args(["delete", "table", "inet", CUT_TABLE])
                .stdin(Stdio::null()),
        ) {
            panic!("leasehold-testkit: cannot heal {}: {e}", self.name);
        }
        *cut = false;
    }

    /// Whether the namespace is cut off now.
    pub fn is_cut(&self) -> bool {
        *self.cut.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.name)
    }
}

impl std::fmt::Debug for Netns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Netns")
            .field("name", &self.name)
            .field("host_interface", &self.host_if)
            .field("host_ip", &self.host_ip)
            .field("ns_ip", &self.ns_ip)
            .field("cut", &self.is_cut())
            .finish()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.host_if]);
        remove_netns(&self.name);
    }
}

/// Runs `ip ARGS`, quietly.
fn ip(args: &[&str]) -> Result<(), String> {
    proc::run(Command::new("ip").args(args).stdin(Stdio::null())).map(|_| ())
}

/// Kills every process inside namespace `name`, then deletes it (which deletes its veth pair).
fn remove_netns(name: &str) {
    if let Ok(out) = Command::new("ip")
        .args(["netns", "pids", name])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
    {
        for pid in String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse::<u32>().ok())
        {
            let _ = proc::signal(pid, Signal::KILL);
        }
    }
    let _ = ip(&["netns", "del", name]);
}

/// Deletes namespaces this crate created in test processes that no longer exist (killed
/// before their `Netns` was dropped).
fn reap_stale() {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            remove_netns(&name);
        }
    }
}

/// Picks a free /30 of 10.200.0.0/16 and locks it (a `flock` on a per-subnet file, released
/// when the file is closed, even if the process is killed). A subnet whose address is still
/// on some interface of the root namespace is skipped.
fn lock_subnet() -> (u32, File) {
    let dir = std::env::temp_dir().join("leasehold-testkit-subnets");
    if let Err(e) = std::fs::create_dir_all(&dir) {
        panic!("leasehold-testkit: cannot create {}: {e}", dir.display());
    }
    // Start at a point that depends on the process, so parallel test processes rarely contend.
    let start = (std::process::id() * 8) % SUBNETS;
    for k in 0..SUBNETS {
        let index = (start + k) % SUBNETS;
        let path = dir.join(format!("{index}.lock"));
        let file = match OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) => panic!("leasehold-testkit: cannot open {}: {e}", path.display()),
        };
        if rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive).is_err() {
            continue;
        }
        let base = index * 4;
        let subnet = format!("10.200.{}.{}/30", base / 256, base % 256);
        let in_use = Command::new("ip")
            .args(["-o", "-4", "addr", "show", "to", &subnet])
            .stdin(Stdio::null())
            .output()
            .map(|o| !o.stdout.is_empty())
            .unwrap_or(false);
        if !in_use {
            return (index, file);
        }
    }
    panic!("leasehold-testkit: no free /30 left in 10.200.0.0/16");
}
