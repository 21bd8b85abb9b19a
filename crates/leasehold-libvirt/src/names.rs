//! Which leases a domain takes: one per disk (named by the disk's canonical path, or a hash
//! of it) and one per `<lease>` element (`lockspace/key`), with the mode the disk's flags and
//! the configured policies give.

use std::path::{Path, PathBuf};

use leasehold_core::Mode;
use sha2::{Digest, Sha256};

use crate::config::{Config, DiskNames, Policy};

/// One resource as libvirt announced it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resource {
    /// A disk: its path, and whether it is `<readonly/>` or `<shareable/>`.
    Disk {
        /// The path libvirt gave.
        path: String,
        /// `<readonly/>`.
        readonly: bool,
        /// `<shareable/>`.
        shareable: bool,
    },
    /// A `<lease>`: always exclusive.
    Lease {
        /// `<lockspace>`, when given.
        lockspace: Option<String>,
        /// `<key>`.
        key: String,
    },
}

/// The leases for `resources`, each name once with the strongest mode asked for it, in the
/// order first seen.
pub fn leases(config: &Config, resources: &[Resource]) -> Vec<(String, Mode)> {
    let mut out: Vec<(String, Mode)> = Vec::new();
    for r in resources {
        let (name, mode) = match r {
            Resource::Lease { lockspace, key } => (
                match lockspace {
                    Some(ls) if !ls.is_empty() => format!("{ls}/{key}"),
                    _ => key.clone(),
                },
                Mode::Exclusive,
            ),
            Resource::Disk {
                path,
                readonly,
                shareable,
            } => {
                let policy = if *readonly {
                    config.readonly
                } else if *shareable {
                    config.shareable
                } else {
                    Policy::Exclusive
                };
                let mode = match policy {
                    Policy::Skip => continue,
                    Policy::Shared => Mode::Shared,
                    Policy::Exclusive => Mode::Exclusive,
                };
                (disk_name(config.disk_names, Path::new(path)), mode)
            }
        };
        match out.iter_mut().find(|(n, _)| *n == name) {
            Some((_, m)) => {
                if mode == Mode::Exclusive {
                    *m = Mode::Exclusive;
                }
            }
            None => out.push((name, mode)),
        }
    }
    out
}

/// The lease name of the disk at `path`.
pub fn disk_name(scheme: DiskNames, path: &Path) -> String {
    let canonical = canonical(path);
    match scheme {
        DiskNames::Path => canonical.to_string_lossy().into_owned(),
        DiskNames::Sha256 => {
            let digest = Sha256::digest(canonical.as_os_str().as_encoded_bytes());
            let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
            format!("disk/{hex}")
        }
    }
}

/// The path every host names the same disk by: symlinks resolved; for a block device, its
/// `/dev/disk/by-id/` name (a WWN first), which follows the device when the kernel gives it
/// another `/dev/sdX` or `/dev/dm-N` on the next boot or on another host. A path that does not
/// resolve (the file is missing) stays as given: libvirt fails to open it anyway.
pub fn canonical(path: &Path) -> PathBuf {
    let Ok(real) = std::fs::canonicalize(path) else {
        return path.to_path_buf();
    };
    if is_block_device(&real) {
        if let Some(id) = by_id(&real) {
            return id;
        }
    }
    real
}

fn is_block_device(p: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(p).is_ok_and(|m| m.file_type().is_block_device())
}

/// The best `/dev/disk/by-id/` link to `dev`: `wwn-`, then `dm-uuid-`, then `scsi-`, then any,
/// ties broken by name so every host picks the same.
fn by_id(dev: &Path) -> Option<PathBuf> {
    let dir = Path::new("/dev/disk/by-id");
    let mut found: Vec<(usize, String)> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .filter(|e| std::fs::canonicalize(e.path()).is_ok_and(|t| t == dev))
        .filter_map(|e| e.file_name().into_string().ok())
        .map(|n| {
            let rank = ["wwn-", "dm-uuid-", "scsi-"]
                .iter()
                .position(|p| n.starts_with(p))
                .unwrap_or(3);
            (rank, n)
        })
        .collect();
    found.sort();
    found.first().map(|(_, n)| dir.join(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(path: &str, readonly: bool, shareable: bool) -> Resource {
        Resource::Disk {
            path: path.into(),
            readonly,
            shareable,
        }
    }

    #[test]
    fn disks_follow_the_policies_and_leases_are_exclusive() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let img = dir.join("vm.qcow2");
        std::fs::write(&img, b"").unwrap();
        let link = dir.join("link.qcow2");
        std::os::unix::fs::symlink(&img, &link).unwrap();
        let iso = dir.join("cd.iso");
        std::fs::write(&iso, b"").unwrap();
        let shared = dir.join("shared.raw");
        std::fs::write(&shared, b"").unwrap();
        let c = Config::default();
        let got = leases(
            &c,
            &[
                Resource::Lease {
                    lockspace: Some("ovirt-sd".into()),
                    key: "vm-lease".into(),
                },
                disk(link.to_str().unwrap(), false, false),
                disk(iso.to_str().unwrap(), true, false),
                disk(shared.to_str().unwrap(), false, true),
                // The same image again, read-only: still one exclusive lease.
                disk(img.to_str().unwrap(), true, false),
            ],
        );
        let real = |p: &Path| std::fs::canonicalize(p).unwrap().display().to_string();
        assert_eq!(
            got,
            vec![
                ("ovirt-sd/vm-lease".to_string(), Mode::Exclusive),
                (real(&img), Mode::Exclusive),
                (real(&iso), Mode::Shared),
                (real(&shared), Mode::Shared),
            ]
        );
        let skip = Config {
            readonly: Policy::Skip,
            shareable: Policy::Skip,
            ..Config::default()
        };
        let got = leases(
            &skip,
            &[
                disk(iso.to_str().unwrap(), true, false),
                disk(shared.to_str().unwrap(), false, true),
            ],
        );
        assert!(got.is_empty(), "{got:?}");
    }

    #[test]
    fn hashed_names_are_the_same_for_every_path_to_one_file() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let img = dir.join("vm.qcow2");
        std::fs::write(&img, b"").unwrap();
        let link = dir.join("l");
        std::os::unix::fs::symlink(&img, &link).unwrap();
        let a = disk_name(DiskNames::Sha256, &img);
        assert_eq!(a, disk_name(DiskNames::Sha256, &link));
        assert!(a.starts_with("disk/") && a.len() == 5 + 64, "{a}");
        // A missing file keeps its path.
        assert_eq!(
            disk_name(DiskNames::Path, Path::new("/nonexistent/x.qcow2")),
            "/nonexistent/x.qcow2"
        );
    }
}
