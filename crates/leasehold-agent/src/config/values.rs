//! Reading single values of the configuration: durations, sizes, groups, etcd users and
//! endpoints, and TOML errors shown with their line.

use super::*;

/// A TOML error as `line L, column C: what`, then the line itself with a caret under the
/// column, each on its own line.
pub(super) fn parse_message(text: &str, e: &toml::de::Error) -> String {
    let what = e.message().trim_end().replace('\n', " ");
    let Some(at) = e.span().map(|s| s.start.min(text.len())) else {
        return what;
    };
    let before = text.get(..at).unwrap_or_default();
    let line = before.matches('\n').count() + 1;
    let start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before.get(start..).map_or(0, |s| s.chars().count()) + 1;
    let source = text.lines().nth(line - 1).unwrap_or_default();
    let shown: String = source.chars().filter(|c| !c.is_control()).collect();
    format!(
        "\n  line {line}, column {column}: {what}\n  {line} | {shown}\n  {pad} | {caret:>column$}",
        pad = " ".repeat(line.to_string().len()),
        caret = "^",
    )
}

/// A duration that may be `"off"`: `None` for off, the default when unset.
pub(super) fn duration_or_off(
    field: &'static str,
    v: &Option<String>,
    default: Option<Duration>,
) -> Result<Option<Duration>, ConfigError> {
    match v.as_deref() {
        Some("off") => Ok(None),
        _ => match duration(field, v)? {
            Some(d) if d.is_zero() => Err(ConfigError::Invalid {
                field,
                message: "must be greater than zero, or \"off\"".into(),
            }),
            Some(d) => Ok(Some(d)),
            None => Ok(default),
        },
    }
}

/// A size in bytes: a number, optionally followed by KiB, MiB, GiB (or K, M, G: powers of
/// 1024 too, as etcd's quota is usually given).
pub(super) fn bytes(field: &'static str, v: &str) -> Result<u64, ConfigError> {
    let t = v.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" | "KB" => 1 << 10,
        "M" | "MiB" | "MB" => 1 << 20,
        "G" | "GiB" | "GB" => 1 << 30,
        _ => 0,
    };
    num.parse::<u64>()
        .ok()
        .filter(|n| *n > 0 && mult > 0)
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| ConfigError::Invalid {
            field,
            message: format!("{v:?} is not a size: give bytes, or a number with KiB, MiB or GiB"),
        })
}

/// The longest duration any setting takes: longer ones would overflow the clock arithmetic
/// that deadlines use, and no setting needs them.
pub const MAX_DURATION: Duration = Duration::from_secs(10_000 * 366 * 86_400);

pub(super) fn duration(
    field: &'static str,
    v: &Option<String>,
) -> Result<Option<Duration>, ConfigError> {
    v.as_deref()
        .map(|s| {
            let d = humantime::parse_duration(s.trim()).map_err(|e| ConfigError::Invalid {
                field,
                message: format!("{s:?} is not a duration ({e}); write e.g. \"10s\" or \"500ms\""),
            })?;
            if d > MAX_DURATION {
                return Err(ConfigError::Invalid {
                    field,
                    message: format!(
                        "{s:?} is longer than 10,000 years; give a realistic duration"
                    ),
                });
            }
            Ok(d)
        })
        .transpose()
}

/// Looks a group up in `/etc/group` by name, or takes a number as it is.
///
/// # Errors
/// [`ConfigError::Invalid`] naming `field` when no such group exists.
pub fn resolve_group(field: &'static str, name: &str) -> Result<Group, ConfigError> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(Group {
            name: name.to_owned(),
            gid,
        });
    }
    match crate::accounts::group_id(name) {
        Ok(Some(gid)) => Ok(Group {
            name: name.to_owned(),
            gid,
        }),
        Ok(None) => Err(ConfigError::Invalid {
            field,
            message: format!("no group named {name:?} in {}", crate::accounts::GROUP),
        }),
        Err(e) => Err(ConfigError::Invalid {
            field,
            message: format!(
                "cannot look group {name:?} up: {}: {e}; give its number instead",
                crate::accounts::GROUP
            ),
        }),
    }
}

/// The etcd user and its password, read from `password_file`.
pub(super) fn etcd_user(
    user: Option<String>,
    password_file: Option<&Path>,
) -> Result<Option<leasehold_store::EtcdUser>, ConfigError> {
    use std::os::unix::fs::PermissionsExt;
    let bad = |field, message: String| Err(ConfigError::Invalid { field, message });
    let (name, file) = match (user, password_file) {
        (None, None) => return Ok(None),
        (Some(u), Some(f)) => (u, f),
        (Some(u), None) => {
            return bad(
                "etcd-password-file",
                format!(
                    "etcd-user {u:?} needs its password: put it in a file (mode 0600) and name it with etcd-password-file"
                ),
            );
        }
        (None, Some(_)) => {
            return bad(
                "etcd-user",
                "etcd-password-file is set without etcd-user: name the etcd user too".into(),
            );
        }
    };
    if name.is_empty() || name.contains(':') || name.chars().any(char::is_control) {
        return bad(
            "etcd-user",
            format!(
                "{name:?} is not an etcd user name: give the name alone (no ':', no control characters), and the password in etcd-password-file"
            ),
        );
    }
    let shown = file.display();
    let meta = std::fs::metadata(file).map_err(|e| ConfigError::Invalid {
        field: "etcd-password-file",
        message: format!("{shown}: {e}"),
    })?;
    if meta.permissions().mode() & 0o077 != 0 {
        return bad(
            "etcd-password-file",
            format!(
                "{shown} is readable or writable by others (mode {:04o}): run `chmod 600 {shown}`",
                meta.permissions().mode() & 0o7777
            ),
        );
    }
    let text = std::fs::read_to_string(file).map_err(|e| ConfigError::Invalid {
        field: "etcd-password-file",
        message: format!("{shown}: {e}"),
    })?;
    // One trailing newline is the file's, not the password's.
    let password = text
        .strip_suffix('\n')
        .map_or(text.as_str(), |t| t.strip_suffix('\r').unwrap_or(t));
    if password.is_empty() {
        return bad("etcd-password-file", format!("{shown} is empty"));
    }
    Ok(Some(leasehold_store::EtcdUser {
        name,
        password: password.to_owned(),
    }))
}

pub(super) fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

pub(super) fn default_state_dir() -> Option<PathBuf> {
    if is_root() {
        return Some(PathBuf::from("/var/lib/leasehold"));
    }
    if let Some(d) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d).join("leasehold"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state/leasehold"))
}

pub(super) fn hostname() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .trim()
        .to_owned()
}

/// etcd's longest lease (its `MaxLeaseTTL`).
pub(super) const ETCD_MAX_LEASE: Duration = Duration::from_secs(9_000_000_000);

/// Checks that `e` is an etcd client URL, `http://HOST:PORT` or `https://HOST:PORT`: anything
/// else would be retried forever as "not reachable yet".
pub(super) fn check_endpoint(e: &str) -> Result<(), ConfigError> {
    let bad = |why: &str| ConfigError::Invalid {
        field: "etcd-endpoints",
        message: format!(
            "{e:?} is not an etcd client URL ({why}); write e.g. http://10.0.0.1:2379, \
             comma-separated for several"
        ),
    };
    let rest = e
        .strip_prefix("http://")
        .or_else(|| e.strip_prefix("https://"))
        .ok_or_else(|| bad("it must start with http:// or https://"))?;
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains(['/', '?', '#', '@'])
        || authority
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(bad("only a host and a port may follow the scheme"));
    }
    // An IPv6 host is bracketed: [::1]:2379.
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => {
            let (h, after) = v6.split_once(']').ok_or_else(|| bad("an unclosed '['"))?;
            match after {
                "" => (h, None),
                p => (
                    h,
                    Some(p.strip_prefix(':').ok_or_else(|| bad("junk after ']'"))?),
                ),
            }
        }
        None => match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        },
    };
    if host.is_empty() {
        return Err(bad("no host"));
    }
    if let Some(p) = port
        && !matches!(p.parse::<u16>(), Ok(n) if n > 0)
    {
        return Err(bad("the port must be a number from 1 to 65535"));
    }
    Ok(())
}
