//! The plugin's settings, from `/etc/libvirt/qemu-leasehold.conf` (libvirt's conf syntax:
//! `key = "text"` or `key = 123`, `#` comments). A missing file means every default.
//!
//! ```text
//! socket = "/run/leasehold/agent.sock"   # the agent's socket
//! disk_names = "path"                    # or "sha256": lease names for disks
//! shareable_disks = "shared"             # <shareable/> disks: shared | exclusive | skip
//! readonly_disks = "shared"              # <readonly/> disks: shared | skip
//! timeout = 30                           # seconds to wait for the agent's answer
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

/// How a disk's lease is named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskNames {
    /// The disk's canonical path (symlinks resolved): `leasehold list` shows the file.
    Path,
    /// `disk/` and the SHA-256 of the canonical path, for paths too long or too private to
    /// show.
    Sha256,
}

/// What a kind of disk takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// An exclusive lease.
    Exclusive,
    /// A shared lease: other shared users may hold it too, an exclusive writer may not.
    Shared,
    /// No lease.
    Skip,
}

/// The plugin's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The agent's socket.
    pub socket: PathBuf,
    /// How disk leases are named.
    pub disk_names: DiskNames,
    /// What `<shareable/>` disks take.
    pub shareable: Policy,
    /// What `<readonly/>` disks take.
    pub readonly: Policy,
    /// How long to wait for the agent.
    pub timeout: Duration,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            socket: PathBuf::from("/run/leasehold/agent.sock"),
            disk_names: DiskNames::Path,
            // `<shareable/>` is shared *writable*: every such user takes a shared lease, and a
            // domain that wants the disk to itself is refused while any of them runs.
            shareable: Policy::Shared,
            // A reader of a disk that another domain writes sees it change under it: readers
            // share, and keep writers out.
            readonly: Policy::Shared,
            timeout: Duration::from_secs(30),
        }
    }
}

impl Config {
    /// Reads `path`; a missing file gives the defaults.
    ///
    /// # Errors
    /// A message naming the file, the line and what is wrong.
    pub fn load(path: &Path) -> Result<Config, String> {
        match std::fs::read_to_string(path) {
            Ok(text) => Config::parse(&text).map_err(|e| format!("{}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Config::default()),
            Err(e) => Err(format!("reading {}: {e}", path.display())),
        }
    }

    /// Parses the file's text.
    ///
    /// # Errors
    /// A message naming the line and what is wrong.
    pub fn parse(text: &str) -> Result<Config, String> {
        let mut c = Config::default();
        for (n, raw) in text.lines().enumerate() {
            let line = strip_comment(raw).trim();
            if line.is_empty() {
                continue;
            }
            let at = |m: String| format!("line {}: {m}", n + 1);
            let (key, value) = line
                .split_once('=')
                .ok_or_else(|| at(format!("expected `key = value`, found {line:?}")))?;
            let key = key.trim();
            let value = Value::parse(value.trim()).map_err(at)?;
            match key {
                "socket" => c.socket = PathBuf::from(value.text(key).map_err(at)?),
                "disk_names" => {
                    c.disk_names = match value.text(key).map_err(at)? {
                        "path" => DiskNames::Path,
                        "sha256" => DiskNames::Sha256,
                        other => {
                            return Err(at(format!(
                                "disk_names is \"path\" or \"sha256\", not {other:?}"
                            )));
                        }
                    }
                }
                "shareable_disks" => {
                    c.shareable = policy(key, value.text(key).map_err(at)?, true).map_err(at)?
                }
                "readonly_disks" => {
                    c.readonly = policy(key, value.text(key).map_err(at)?, false).map_err(at)?
                }
                "timeout" => {
                    let secs = value.number(key).map_err(at)?;
                    if !(1..=3600).contains(&secs) {
                        return Err(at(format!(
                            "timeout is whole seconds from 1 to 3600, not {secs}"
                        )));
                    }
                    c.timeout = Duration::from_secs(secs as u64);
                }
                other => {
                    return Err(at(format!(
                        "unknown setting {other:?} (known: socket, disk_names, \
                         shareable_disks, readonly_disks, timeout)"
                    )));
                }
            }
        }
        Ok(c)
    }
}

fn policy(key: &str, v: &str, exclusive_allowed: bool) -> Result<Policy, String> {
    match v {
        "shared" => Ok(Policy::Shared),
        "skip" => Ok(Policy::Skip),
        "exclusive" if exclusive_allowed => Ok(Policy::Exclusive),
        other if exclusive_allowed => Err(format!(
            "{key} is \"shared\", \"exclusive\" or \"skip\", not {other:?}"
        )),
        other => Err(format!("{key} is \"shared\" or \"skip\", not {other:?}")),
    }
}

/// A `#` outside quotes starts a comment.
fn strip_comment(line: &str) -> &str {
    let mut quoted = false;
    for (i, ch) in line.char_indices() {
        match ch {
            '"' => quoted = !quoted,
            '#' if !quoted => return &line[..i],
            _ => {}
        }
    }
    line
}

enum Value {
    Text(String),
    Number(i64),
}

impl Value {
    fn parse(v: &str) -> Result<Value, String> {
        if let Some(inner) = v.strip_prefix('"') {
            let inner = inner
                .strip_suffix('"')
                .ok_or_else(|| format!("unterminated string {v:?}"))?;
            if inner.contains('"') || inner.chars().any(char::is_control) {
                return Err(format!(
                    "a string holds no quotes or control characters: {v:?}"
                ));
            }
            return Ok(Value::Text(inner.to_string()));
        }
        v.parse::<i64>()
            .map(Value::Number)
            .map_err(|_| format!("expected a \"string\" or a number, found {v:?}"))
    }

    fn text(&self, key: &str) -> Result<&str, String> {
        match self {
            Value::Text(t) => Ok(t),
            Value::Number(n) => Err(format!("{key} is a string in quotes, not {n}")),
        }
    }

    fn number(&self, key: &str) -> Result<i64, String> {
        match self {
            Value::Number(n) => Ok(*n),
            Value::Text(t) => Err(format!("{key} is a number, not \"{t}\"")),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_sample_file_reads_as_the_defaults() {
        let sample = include_str!("../../../packaging/qemu-leasehold.conf");
        assert_eq!(super::Config::parse(sample), Ok(super::Config::default()));
        // Each commented setting, uncommented, is accepted with its default value.
        let set: String = sample
            .lines()
            .filter_map(|l| l.strip_prefix('#'))
            .filter(|l| l.starts_with(|c: char| c.is_ascii_lowercase()))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(set.lines().count(), 5, "{set}");
        assert_eq!(super::Config::parse(&set), Ok(super::Config::default()));
    }

    use super::*;

    #[test]
    fn every_key_parses_and_defaults_fill_the_rest() {
        let c = Config::parse(
            "# leasehold\nsocket = \"/tmp/a#b.sock\"  # comment\n\ndisk_names = \"sha256\"\n\
             shareable_disks = \"exclusive\"\nreadonly_disks=\"skip\"\ntimeout = 5\n",
        )
        .unwrap();
        assert_eq!(c.socket, PathBuf::from("/tmp/a#b.sock"));
        assert_eq!(c.disk_names, DiskNames::Sha256);
        assert_eq!(c.shareable, Policy::Exclusive);
        assert_eq!(c.readonly, Policy::Skip);
        assert_eq!(c.timeout, Duration::from_secs(5));
        assert_eq!(Config::parse("").unwrap(), Config::default());
    }

    #[test]
    fn mistakes_name_the_line_and_the_choices() {
        for (text, want) in [
            ("socket = /x", "line 1: expected a \"string\""),
            ("\nbogus = 1", "line 2: unknown setting \"bogus\""),
            ("readonly_disks = \"exclusive\"", "\"shared\" or \"skip\""),
            ("disk_names = \"md5\"", "\"path\" or \"sha256\""),
            ("timeout = 0", "from 1 to 3600"),
            ("timeout = \"5\"", "timeout is a number"),
            ("socket = \"x", "unterminated"),
            ("just words", "expected `key = value`"),
        ] {
            let e = Config::parse(text).unwrap_err();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn a_missing_file_is_the_defaults_and_an_unreadable_one_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        assert_eq!(
            Config::load(&dir.join("none.conf")).unwrap(),
            Config::default()
        );
        let e = Config::load(dir).unwrap_err();
        assert!(e.contains(&dir.display().to_string()), "{e}");
    }
}
