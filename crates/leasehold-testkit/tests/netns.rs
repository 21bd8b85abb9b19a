//! Network namespaces: an etcd on `host_ip` is reachable from inside until `cut`, and again
//! after `heal`; established connections stall silently; Unix sockets in the filesystem cross
//! namespaces, abstract ones do not.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::Output;
use std::time::{Duration, Instant};

use leasehold_testkit::{Etcd, Netns};

/// `etcdctl put` run inside the namespace, with short timeouts.
fn put_from_inside(ns: &Netns, etcd: &Etcd, value: &str) -> (Output, Duration) {
    let t = Instant::now();
    let out = ns
        .command("etcdctl")
        .env("ETCDCTL_API", "3")
        .env_remove("ETCDCTL_ENDPOINTS")
        .args([
            &format!("--endpoints={}", etcd.endpoint()),
            "--dial-timeout=1s",
            "--command-timeout=1s",
            "put",
            "from-inside",
            value,
        ])
        .output()
        .unwrap();
    (out, t.elapsed())
}

#[test]
fn a_cut_namespace_cannot_reach_etcd_until_healed() {
    let ns = Netns::new("etcd");
    let etcd = Etcd::start_on(ns.host_ip());
    assert!(
        etcd.endpoint()
            .starts_with(&format!("http://{}:", ns.host_ip())),
        "{}",
        etcd.endpoint()
    );

    let (out, took) = put_from_inside(&ns, &etcd, "1");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("put from inside: {took:?}");

    ns.cut();
    assert!(ns.is_cut());
    let (out, took) = put_from_inside(&ns, &etcd, "2");
    eprintln!("put from inside while cut failed after {took:?}");
    assert!(!out.status.success(), "a cut namespace must not reach etcd");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    // etcd itself is fine: the root namespace still reaches it on the same address.
    let out = etcd.etcdctl(&["get", "--print-value-only", "from-inside"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1");

    ns.heal();
    assert!(!ns.is_cut());
    let (out, took) = put_from_inside(&ns, &etcd, "3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("put from inside after heal: {took:?}");
    let out = etcd.etcdctl(&["get", "--print-value-only", "from-inside"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "3");
}

#[test]
fn established_connections_stall_while_cut_and_recover_after_heal() {
    let ns = Netns::new("tcp");
    let listener = TcpListener::bind((ns.host_ip(), 0)).unwrap();
    let addr = listener.local_addr().unwrap();
    let echo = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = [0u8; 1];
        while s.read_exact(&mut buf).is_ok() {
            if s.write_all(&buf).is_err() {
                break;
            }
        }
    });

    // A client socket made by a thread inside the namespace.
    let mut client = ns.run(|| TcpStream::connect_timeout(&addr, Duration::from_secs(1)).unwrap());
    client
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut buf = [0u8; 1];
    client.write_all(b"a").unwrap();
    client.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"a");

    ns.cut();
    client.write_all(b"b").unwrap(); // buffered; the packets are dropped, nothing is reset
    let err = client.read_exact(&mut buf).unwrap_err();
    assert!(
        matches!(
            err.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        "a cut connection stalls: {err}"
    );

    ns.heal();
    let t = Instant::now();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    client.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"b");
    eprintln!("retransmission recovered {:?} after heal", t.elapsed());
    drop(client);
    echo.join().unwrap();
}

#[test]
fn unix_sockets_in_the_filesystem_cross_namespaces_abstract_ones_do_not() {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::SocketAddr;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let _listener = UnixListener::bind(&path).unwrap();
    let name = format!("leasehold-testkit-{}", std::process::id());
    let abstract_addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let _abstract_listener = UnixListener::bind_addr(&abstract_addr).unwrap();

    let ns = Netns::new("unix");
    ns.cut();
    let (by_path, by_name) = ns.run(|| {
        (
            UnixStream::connect(&path).is_ok(),
            UnixStream::connect_addr(&abstract_addr).is_ok(),
        )
    });
    assert!(
        by_path,
        "a Unix socket path is reachable from a (cut) namespace"
    );
    assert!(!by_name, "abstract Unix sockets are per network namespace");

    // The same through `ip netns exec` (a new mount namespace too): the path is still there.
    let out = ns.command("test").arg("-S").arg(&path).output().unwrap();
    assert!(out.status.success(), "ip netns exec sees the socket file");
}

#[test]
fn namespaces_coexist_and_clean_up() {
    let a = Netns::new("a");
    let b = Netns::new("b with spaces/and a long hint beyond twenty characters");
    assert_ne!(a.name(), b.name());
    assert_ne!(a.host_ip(), b.host_ip());
    assert_ne!(a.ns_ip(), b.ns_ip());
    assert!(b.name().len() < 60, "{}", b.name());
    let out = a.command("ip").args(["-o", "-4", "addr"]).output().unwrap();
    let inside = String::from_utf8_lossy(&out.stdout);
    assert!(inside.contains(a.ns_ip()), "{inside}");
    assert!(!inside.contains(b.ns_ip()), "{inside}");

    let (name, host_if) = (a.name().to_owned(), a.host_interface().to_owned());
    drop(a);
    assert!(!std::path::Path::new("/run/netns").join(&name).exists());
    let out = std::process::Command::new("ip")
        .args(["link", "show", &host_if])
        .output()
        .unwrap();
    assert!(!out.status.success(), "the veth pair is gone");
}
