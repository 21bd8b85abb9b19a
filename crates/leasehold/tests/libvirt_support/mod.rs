//! A private libvirtd for black-box tests of the lock driver: its own mount namespace with
//! test directories over `/etc/libvirt`, `/run/libvirt`, `/var/lib/libvirt`, `/var/log/libvirt`
//! and `/var/cache/libvirt`, `lock_manager = "leasehold"`, and the plugin built by this
//! checkout (`LIBVIRT_LOCK_MANAGER_PLUGIN_DIR`). `virsh` reaches it through its socket path.
//! Stopped by PID when dropped, with every domain it started.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use crate::common::{self, text};

/// The plugin this checkout built (`cargo build -p leasehold-libvirt`).
pub fn plugin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/debug/deps/libvirt-HASH -> target/debug
    let profile = exe.parent().unwrap().parent().unwrap();
    for p in [
        profile.join("libleasehold_libvirt.so"),
        profile.join("deps/libleasehold_libvirt.so"),
    ] {
        if p.exists() {
            return p;
        }
    }
    panic!(
        "the lock driver is not built under {}: run `cargo build -p leasehold-libvirt` \
         (scripts/test does)",
        profile.display()
    );
}

/// Fails loudly when libvirt is not installed or we are not root.
pub fn require_libvirt() {
    common::require_root("a private libvirtd needs a mount namespace");
    for cmd in ["libvirtd", "virsh", "qemu-system-x86_64", "unshare"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {cmd}")])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            found,
            "{cmd} is not installed: scripts/test installs libvirt-daemon, \
             libvirt-daemon-driver-qemu, libvirt-clients and qemu-system-x86"
        );
    }
    let user = Command::new("id").arg("libvirt-qemu").output().unwrap();
    assert!(
        user.status.success(),
        "no libvirt-qemu user: scripts/test creates it (QEMU runs as that user)"
    );
    let group = Command::new("getent")
        .args(["group", "libvirt-qemu"])
        .output()
        .unwrap();
    assert!(
        group.status.success(),
        "no libvirt-qemu group: scripts/test creates it (libvirtd's QEMU driver does not start \
         without it)"
    );
}

/// A running private libvirtd.
pub struct Libvirtd {
    pub dir: tempfile::TempDir,
    child: Option<Child>,
    pub uri: String,
    pub name: String,
}

impl Libvirtd {
    /// Starts one whose plugin talks to the agent at `agent_socket`; `plugin_conf` adds lines
    /// to `qemu-leasehold.conf`.
    pub fn start(name: &str, agent_socket: &Path, plugin_conf: &str) -> Libvirtd {
        require_libvirt();
        let dir = tempfile::Builder::new()
            .prefix(&format!("lh-libvirt-{name}-"))
            .tempdir()
            .unwrap();
        let d = dir.path();
        // QEMU (user libvirt-qemu) opens images under the test directories.
        std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        for sub in ["etc", "run", "lib", "log", "cache", "plugins", "images"] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        std::fs::create_dir_all(d.join("lib/qemu")).unwrap();
        std::fs::create_dir_all(d.join("log/qemu")).unwrap();
        std::fs::set_permissions(
            d.join("images"),
            std::os::unix::fs::PermissionsExt::from_mode(0o777),
        )
        .unwrap();
        // Installed by the project's own script, as an operator would.
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/install-libvirt-plugin");
        let o = Command::new(script)
            .env("LEASEHOLD_PLUGIN", plugin())
            .env("LIBVIRT_LOCK_DRIVER_DIR", d.join("plugins"))
            .env("LIBVIRT_CONF_DIR", d.join("etc"))
            .output()
            .unwrap();
        assert!(
            o.status.success() && d.join("plugins/leasehold.so").exists(),
            "scripts/install-libvirt-plugin: {}{}",
            text(&o.stdout),
            text(&o.stderr)
        );
        assert!(
            text(&o.stdout).contains("lock_manager = \"leasehold\""),
            "the script says what to set next"
        );
        let uuid = {
            // Distinct per test process and per name: migration refuses a host's own uuid.
            let tag = name
                .bytes()
                .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
            let n = u128::from(std::process::id()) << 32 | u128::from(tag);
            let h = format!("{:032x}", n ^ 0x5a5a_0000_0000_0000_0000_0000_0000_0000);
            format!(
                "{}-{}-4{}-8{}-{}",
                &h[0..8],
                &h[8..12],
                &h[13..16],
                &h[17..20],
                &h[20..32]
            )
        };
        std::fs::write(
            d.join("etc/libvirtd.conf"),
            format!(
                "host_uuid = \"{uuid}\"\nunix_sock_group = \"root\"\nunix_sock_rw_perms = \"0700\"\n\
                 auth_unix_rw = \"none\"\nauth_unix_ro = \"none\"\nlog_outputs = \"3:file:{}\"\n",
                d.join("log/libvirtd.log").display()
            ),
        )
        .unwrap();
        std::fs::write(
            d.join("etc/qemu.conf"),
            "user = \"libvirt-qemu\"\ngroup = \"kvm\"\nlock_manager = \"leasehold\"\n\
             stdio_handler = \"file\"\nnamespaces = []\n",
        )
        .unwrap();
        std::fs::write(
            d.join("etc/qemu-leasehold.conf"),
            format!(
                "socket = \"{}\"\ntimeout = 30\n{plugin_conf}\n",
                agent_socket.display()
            ),
        )
        .unwrap();
        // Its own host name too: libvirt refuses to migrate to a host with its own name.
        let script = format!(
            "set -e; hostname lh-{name}; for m in etc:/etc/libvirt run:/run/libvirt \
             lib:/var/lib/libvirt log:/var/log/libvirt cache:/var/cache/libvirt; do \
               mkdir -p ${{m#*:}}; mount --bind {d}/${{m%%:*}} ${{m#*:}}; done; \
             exec libvirtd -p {d}/libvirtd.pid",
            d = d.display()
        );
        let child = Command::new("unshare")
            .args(["-m", "-u", "--propagation", "private", "sh", "-c", &script])
            .env("LIBVIRT_LOCK_MANAGER_PLUGIN_DIR", d.join("plugins"))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(d.join("libvirtd.out")).unwrap())
            .stderr(std::fs::File::create(d.join("libvirtd.err")).unwrap())
            .spawn()
            .unwrap();
        let uri = format!(
            "qemu+unix:///system?socket={}",
            d.join("run/libvirt-sock").display()
        );
        let l = Libvirtd {
            dir,
            child: Some(child),
            uri,
            name: name.into(),
        };
        let answered = std::time::Instant::now() + Duration::from_secs(60);
        while !l.virsh(&["version"]).status.success() {
            assert!(
                std::time::Instant::now() < answered,
                "the private libvirtd did not answer in 60 s: {}\nits log:\n{}",
                std::fs::read_to_string(l.dir.path().join("libvirtd.err")).unwrap_or_default(),
                std::fs::read_to_string(l.dir.path().join("log/libvirtd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        l
    }

    /// Runs `virsh` against this libvirtd.
    pub fn virsh(&self, args: &[&str]) -> Output {
        Command::new("virsh")
            .arg("-c")
            .arg(&self.uri)
            .args(args)
            .output()
            .unwrap()
    }

    /// Runs `virsh` and requires success.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.virsh(args);
        assert!(
            o.status.success(),
            "virsh {args:?} failed: {}{}\n{}",
            text(&o.stdout),
            text(&o.stderr),
            self.log_tail()
        );
        text(&o.stdout)
    }

    /// A new qcow2 image in the shared images directory.
    pub fn image(&self, name: &str) -> PathBuf {
        let p = self.dir.path().join("images").join(name);
        let o = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&p)
            .arg("16M")
            .output()
            .unwrap();
        assert!(o.status.success(), "qemu-img create: {}", text(&o.stderr));
        p
    }

    /// Defines domain `name` on `disks` (path, extra disk XML such as `<readonly/>`).
    pub fn define(&self, name: &str, disks: &[(&Path, &str)], extra: &str) {
        let xml = domain_xml(name, disks, extra);
        let f = self.dir.path().join(format!("{name}.xml"));
        std::fs::write(&f, xml).unwrap();
        self.ok(&["define", f.to_str().unwrap()]);
    }

    /// The QEMU pid of a running domain.
    pub fn qemu_pid(&self, name: &str) -> u32 {
        let p = self.dir.path().join(format!("run/qemu/{name}.pid"));
        let mut pid = 0;
        common::wait_until("QEMU's pid file", Duration::from_secs(30), || {
            pid = std::fs::read_to_string(&p)
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0);
            pid != 0
        });
        pid
    }

    /// `virsh domstate`.
    pub fn state(&self, name: &str) -> String {
        text(&self.virsh(&["domstate", name]).stdout)
            .trim()
            .to_string()
    }

    /// The end of libvirtd's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let log =
            std::fs::read_to_string(self.dir.path().join("log/libvirtd.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let from = lines.len().saturating_sub(20);
        format!("libvirtd log (end):\n{}", lines[from..].join("\n"))
    }
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        // Domains first: their QEMU processes are not libvirtd's children.
        let names = text(&self.virsh(&["list", "--name"]).stdout);
        for n in names.lines().filter(|n| !n.trim().is_empty()) {
            let _ = self.virsh(&["destroy", n.trim()]);
        }
        if let Some(mut c) = self.child.take() {
            common::signal(c.id(), libc::SIGTERM);
            let _ = c.wait();
        }
    }
}

/// A domain of type qemu with 64 MiB, no OS, and `disks`.
pub fn domain_xml(name: &str, disks: &[(&Path, &str)], extra: &str) -> String {
    let mut devs = String::new();
    for (i, (path, more)) in disks.iter().enumerate() {
        let fmt = if path.extension().is_some_and(|e| e == "qcow2") {
            "qcow2"
        } else {
            "raw"
        };
        devs.push_str(&format!(
            "<disk type='file' device='disk'><driver name='qemu' type='{fmt}'/>\
             <source file='{}'/><target dev='vd{}' bus='virtio'/>{more}</disk>\n",
            path.display(),
            (b'a' + i as u8) as char
        ));
    }
    format!(
        "<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='pc'>hvm</type></os>{extra}<devices>{devs}</devices>\
         </domain>"
    )
}
