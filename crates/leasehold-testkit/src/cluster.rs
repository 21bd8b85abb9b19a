//! Several etcd members forming one cluster.

use std::net::{IpAddr, Ipv4Addr};
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use crate::etcd::{ClusterState, Etcd, PORT_ATTEMPTS, START_TIMEOUT, cluster_token, parse_ip};
use crate::proc;

/// How long [`EtcdCluster::leader`] waits for a leader.
const LEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// An etcd cluster of real members on one IP with distinct ports, each an [`Etcd`] that can be
/// killed, frozen and restarted (a restarted member rejoins with its data directory). Dropping
/// the cluster kills every member.
pub struct EtcdCluster {
    members: Vec<Etcd>,
}

impl EtcdCluster {
    /// Starts an `n`-member cluster (3 is the reference deployment) whose clients listen on
    /// 127.0.0.1, and waits until every member is healthy. Panics, quoting the logs, if they
    /// are not within 20 s.
    pub fn start(n: usize) -> EtcdCluster {
        EtcdCluster::start_on(n, "127.0.0.1")
    }

    /// Like [`start`](EtcdCluster::start), but clients connect on `ip` (see
    /// [`Etcd::start_on`]). Peers use 127.0.0.1.
    pub fn start_on(n: usize, ip: &str) -> EtcdCluster {
        EtcdCluster::start_on_with(n, ip, &[])
    }

    /// Like [`start`](EtcdCluster::start), with more flags for every member, such as
    /// `--quota-backend-bytes=8388608`; they are given again at every restart.
    pub fn start_with(n: usize, args: &[&str]) -> EtcdCluster {
        EtcdCluster::start_on_with(n, "127.0.0.1", args)
    }

    fn start_on_with(n: usize, ip: &str, args: &[&str]) -> EtcdCluster {
        assert!(
            n > 0,
            "leasehold-testkit: a cluster needs at least one member"
        );
        let ip = parse_ip(ip);
        let mut last = String::new();
        for _ in 0..PORT_ATTEMPTS {
            let mut ips = vec![ip; n];
            ips.extend(std::iter::repeat_n(IpAddr::V4(Ipv4Addr::LOCALHOST), n));
            let ports = proc::free_ports(&ips);
            let initial_cluster = (0..n)
                .map(|i| format!("m{i}=http://127.0.0.1:{}", ports[n + i]))
                .collect::<Vec<_>>()
                .join(",");
            let token = cluster_token();
            let members: Vec<Etcd> = (0..n)
                .map(|i| {
                    let mut m = Etcd::new(
                        format!("m{i}"),
                        ip,
                        ports[i],
                        ports[n + i],
                        initial_cluster.clone(),
                        token.clone(),
                    );
                    m.extra_args = args.iter().map(|a| (*a).to_owned()).collect();
                    m
                })
                .collect();
            for m in &members {
                m.spawn(ClusterState::New);
            }
            let deadline = Instant::now() + START_TIMEOUT;
            let mut failure = None;
            for m in &members {
                if let Err(e) = m.wait_healthy(deadline.saturating_duration_since(Instant::now())) {
                    failure = Some(e);
                    break;
                }
            }
            match failure {
                None => return EtcdCluster { members },
                // Dropping `members` kills them all before the next attempt.
                Some(e) if e.port_in_use => last = e.message,
                Some(e) => panic!(
                    "leasehold-testkit: etcd cluster did not start: {}",
                    e.message
                ),
            }
        }
        panic!(
            "leasehold-testkit: etcd cluster did not start after {PORT_ATTEMPTS} port probes: \
             {last}"
        )
    }

    /// The members, in the order of [`endpoints`](EtcdCluster::endpoints).
    pub fn members(&self) -> &[Etcd] {
        &self.members
    }

    /// Member `i` (0-based), to kill, stop, continue or restart. Panics if out of range.
    pub fn member(&self, i: usize) -> &Etcd {
        &self.members[i]
    }

    /// Every member's client URL, `http://IP:PORT`.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(Etcd::endpoint).collect()
    }

    /// Every member's client URL joined by commas, as `etcdctl --endpoints` takes them.
    pub fn endpoints_joined(&self) -> String {
        self.endpoints().join(",")
    }

    /// Runs `etcdctl` (API v3, `--endpoints` set to every member) with `args` and returns its
    /// output, whether it succeeded or not. etcdctl's client skips members that are down
    /// (killed ones at once; a stopped one may cost a dial timeout); use [`Etcd::etcdctl`] to
    /// aim at one member.
    pub fn etcdctl(&self, args: &[&str]) -> Output {
        proc::output(proc::etcdctl_command(&self.endpoints_joined()).args(args))
    }

    /// The index of the current leader: the member whose `endpoint status` says it leads
    /// (its own member id equals its leader id), with the highest raft term if several say
    /// so. Waits up to 10 s for one; panics, quoting the logs, if there is none.
    pub fn leader(&self) -> usize {
        self.wait_for_leader(LEADER_TIMEOUT)
    }

    /// Like [`leader`](EtcdCluster::leader), waiting up to `timeout`.
    pub fn wait_for_leader(&self, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.try_leader() {
                return i;
            }
            if Instant::now() >= deadline {
                panic!(
                    "leasehold-testkit: no etcd leader after {timeout:?}\n{}",
                    self.log_tails()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// One round of [`leader`](EtcdCluster::leader): asks every running member at once
    /// (1 s timeouts) and returns the leader's index if one is known now.
    pub fn try_leader(&self) -> Option<usize> {
        let children: Vec<(usize, Child)> = self
            .members
            .iter()
            .enumerate()
            .filter(|(_, m)| m.is_running())
            .filter_map(|(i, m)| {
                let mut cmd = m.etcdctl_command();
                cmd.args([
                    "--dial-timeout=1s",
                    "--command-timeout=1s",
                    "endpoint",
                    "status",
                    "-w",
                    "json",
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null());
                cmd.spawn().ok().map(|c| (i, c))
            })
            .collect();
        let mut best: Option<(u64, usize)> = None;
        for (i, child) in children {
            let Ok(out) = child.wait_with_output() else {
                continue;
            };
            if let Some(term) = leads(&out.stdout) {
                if best.is_none_or(|(t, _)| term > t) {
                    best = Some((term, i));
                }
            }
        }
        best.map(|(_, i)| i)
    }

    /// Waits until a put succeeds through any running member, trying all of them at once
    /// every round (1 s timeouts), and returns how long that took. Panics, quoting the logs,
    /// if none succeeds within `timeout`.
    pub fn wait_writable(&self, timeout: Duration) -> Duration {
        let start = Instant::now();
        let deadline = start + timeout;
        loop {
            let puts = self
                .members
                .iter()
                .filter(|m| m.is_running())
                .map(|m| {
                    let mut cmd = m.etcdctl_command();
                    cmd.args([
                        "--dial-timeout=1s",
                        "--command-timeout=1s",
                        "put",
                        "leasehold-testkit/writable",
                        m.name(),
                    ]);
                    cmd
                })
                .collect();
            if proc::race(puts, deadline) {
                return start.elapsed();
            }
            if Instant::now() >= deadline {
                panic!(
                    "leasehold-testkit: etcd cluster not writable after {timeout:?}\n{}",
                    self.log_tails()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The tail of every member's log, for panic messages.
    fn log_tails(&self) -> String {
        self.members
            .iter()
            .map(|m| {
                format!(
                    "--- etcd {} ({}, {}) log ends:\n{}",
                    m.name(),
                    m.endpoint(),
                    if m.is_running() {
                        "running"
                    } else {
                        "not running"
                    },
                    m.log_tail(15)
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// The raft term if an `etcdctl endpoint status -w json` output (one endpoint) says that
/// endpoint is the leader.
fn leads(stdout: &[u8]) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_slice(stdout).ok()?;
    let status = &v.as_array()?.first()?["Status"];
    let me = status["header"]["member_id"].as_u64()?;
    let leader = status["leader"].as_u64()?;
    (me == leader && leader != 0).then(|| status["raftTerm"].as_u64().unwrap_or(0))
}

impl std::fmt::Debug for EtcdCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdCluster")
            .field("members", &self.members)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::leads;

    #[test]
    fn parses_endpoint_status() {
        let out = br#"[{"Endpoint":"http://127.0.0.1:23790","Status":{"header":{"cluster_id":324952591200643719,"member_id":3319814642761637952,"revision":1,"raft_term":2},"version":"3.4.23","dbSize":20480,"leader":3319814642761637952,"raftIndex":4,"raftTerm":2,"raftAppliedIndex":4,"dbSizeInUse":16384}}]"#;
        assert_eq!(leads(out), Some(2));
        let follower =
            br#"[{"Endpoint":"e","Status":{"header":{"member_id":1},"leader":2,"raftTerm":3}}]"#;
        assert_eq!(leads(follower), None);
        assert_eq!(leads(b""), None);
        assert_eq!(leads(b"[]"), None);
    }
}
