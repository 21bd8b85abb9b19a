//! The agent's configuration: a TOML file plus command-line flags over defaults, checked as a
//! whole before the agent starts.
//!
//! ```toml
//! # /etc/leasehold/agent.toml
//! host-id = "node1"
//! backend = "local"
//! state-dir = "/var/lib/leasehold"
//! socket = "/run/leasehold/agent.sock"
//! ttl = "10s"
//! grace = "5s"
//! admin-group = "leasehold-admin"
//! socket-group = "leasehold"
//! ```

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use leasehold_core::HostId;
use serde::Deserialize;

/// Which store holds the leases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// The embedded single-host store.
    Local,
    /// A shared etcd cluster.
    Etcd,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Local => "local",
            Backend::Etcd => "etcd",
        })
    }
}

impl std::str::FromStr for Backend {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s {
            "local" => Ok(Backend::Local),
            "etcd" => Ok(Backend::Etcd),
            other => Err(ConfigError::Invalid {
                field: "backend",
                message: format!("{other:?} is not a backend; use \"local\" or \"etcd\""),
            }),
        }
    }
}

pub use leasehold_core::Timing;
pub use leasehold_store::etcd::{ETCD_MIN_LEASE, etcd_default_grace};

/// A Unix group, by name and id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    /// Its name (or the number given).
    pub name: String,
    /// Its id.
    pub gid: u32,
}

/// The agent's whole configuration, resolved and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The local socket clients use.
    pub socket: PathBuf,
    /// Where the local store keeps its state.
    pub state_dir: PathBuf,
    /// This host's id.
    pub host_id: HostId,
    /// Which store holds the leases.
    pub backend: Backend,
    /// etcd client URLs (etcd backend).
    pub etcd_endpoints: Vec<String>,
    /// SPEC §4 timing.
    pub timing: Timing,
    /// Members of this group may force-release and mark-clean, as root may.
    pub admin_group: Option<Group>,
    /// The socket's group; members may connect. Without it only the agent's user may.
    pub socket_group: Option<Group>,
    /// The most connections one user other than root may have open at once; more are told
    /// so and closed, so that nobody can use up the agent's descriptors and memory.
    pub max_connections_per_user: usize,
    /// The most connections all users other than root together may have open at once; root
    /// is never refused, so `leasehold list` as root answers whatever others hold open.
    pub max_connections: usize,
    /// How long a connection may take to send a request's headers, and may stay idle
    /// between requests, before it is closed (streams in progress are not idle).
    pub request_timeout: Duration,
    /// The key prefix in etcd; clusters sharing an etcd use different ones.
    pub etcd_prefix: String,
    /// A watchdog device to feed while all is well (etcd backend).
    pub watchdog: Option<std::path::PathBuf>,
    /// How long the watchdog takes to reset the host once it is no longer fed.
    pub watchdog_timeout: Duration,
    /// How etcd's history is kept bounded (etcd backend).
    pub etcd_history: leasehold_store::HistoryOptions,
    /// Local backend: records of free, clean resources unchanged this long are forgotten;
    /// `None`: kept forever.
    pub forget_after: Option<Duration>,
    /// TLS files and the etcd user (etcd backend).
    pub etcd_security: leasehold_store::EtcdSecurity,
    /// Where to serve Prometheus `/metrics`, `/livez` and `/readyz` over plain HTTP; off when
    /// `None`. A loopback address unless `metrics-allow-remote` is set.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Whether an acquire may ask `on_lost = revoke` (a force-release ends the lease without
    /// killing the holder); `allow-revoke = false` refuses such requests. Default true.
    pub allow_revoke: bool,
    /// Where holders that ask for it (`leasehold run`) get a cgroup of their own.
    pub cgroup_root: crate::cgroup::Setting,
}

/// Why the configuration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading config file {path}: {message}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// The file is not valid TOML for this configuration.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why, with the line.
        message: String,
    },
    /// A value is not acceptable.
    #[error("{field}: {message}")]
    Invalid {
        /// The setting.
        field: &'static str,
        /// Why.
        message: String,
    },
    /// A timing inequality of SPEC §4 does not hold.
    #[error("unsafe timing: {rule} does not hold ({detail}); {why}")]
    Inequality {
        /// The inequality.
        rule: &'static str,
        /// The values.
        detail: String,
        /// What it protects.
        why: &'static str,
    },
}

/// The settings a config file may hold; every one optional.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileConfig {
    /// See [`Config::socket`].
    pub socket: Option<PathBuf>,
    /// See [`Config::state_dir`].
    pub state_dir: Option<PathBuf>,
    /// See [`Config::host_id`].
    pub host_id: Option<String>,
    /// See [`Config::backend`].
    pub backend: Option<Backend>,
    /// See [`Config::etcd_endpoints`]: an array, or one string of comma-separated URLs (as
    /// the flag takes them).
    #[serde(default, deserialize_with = "endpoints")]
    pub etcd_endpoints: Option<Vec<String>>,
    /// See [`Timing::ttl`], as `"10s"`.
    pub ttl: Option<String>,
    /// See [`Timing::renew`].
    pub renew: Option<String>,
    /// See [`Timing::fence_margin`].
    pub fence_margin: Option<String>,
    /// See [`Timing::grace`].
    pub grace: Option<String>,
    /// See [`Timing::kill_timeout`].
    pub kill_timeout: Option<String>,
    /// See [`Config::admin_group`]: a name or a number.
    pub admin_group: Option<String>,
    /// See [`Config::socket_group`]: a name or a number.
    pub socket_group: Option<String>,
    /// See [`Config::max_connections_per_user`] [default: 1024].
    pub max_connections_per_user: Option<usize>,
    /// See [`Config::max_connections`] [default: 4096].
    pub max_connections: Option<usize>,
    /// See [`Config::request_timeout`], as `"10s"` [default: 10s].
    pub request_timeout: Option<String>,
    /// See [`Config::etcd_prefix`].
    pub etcd_prefix: Option<String>,
    /// See [`Config::watchdog`].
    pub watchdog: Option<std::path::PathBuf>,
    /// See [`Config::cgroup_root`]: a cgroup2 directory, `"auto"` or `"off"`.
    pub cgroup_root: Option<String>,
    /// See [`Config::watchdog_timeout`], as `"5s"`.
    pub watchdog_timeout: Option<String>,
    /// Local backend: free, clean records unchanged this long are forgotten, as `"1h"`, or
    /// `"off"`.
    pub forget_after: Option<String>,
    /// How often the agents compact etcd's history, as `"1m"`, or `"off"`.
    pub etcd_compact_every: Option<String>,
    /// How much of etcd's history compaction keeps, as `"5m"`.
    pub etcd_history: Option<String>,
    /// Free, clean records unchanged this long are deleted, as `"1h"`, or `"off"`.
    pub etcd_forget_after: Option<String>,
    /// etcd's `--quota-backend-bytes`, as bytes or `"2GiB"`, for the warning near it.
    pub etcd_quota: Option<String>,
    /// Whether the agents defragment etcd's members, `"on"` or `"off"`.
    pub etcd_defrag: Option<String>,
    /// The CA certificate (PEM) that signs etcd's server certificates (etcdctl's `--cacert`).
    pub etcd_cacert: Option<PathBuf>,
    /// This agent's client certificate (PEM) for etcd (etcdctl's `--cert`).
    pub etcd_cert: Option<PathBuf>,
    /// The client certificate's key (PEM) (etcdctl's `--key`).
    pub etcd_key: Option<PathBuf>,
    /// The etcd user, when etcd's authentication is enabled.
    pub etcd_user: Option<String>,
    /// A file holding the etcd user's password (mode 0600 or stricter), never the password
    /// itself: a command line is visible to every local user.
    pub etcd_password_file: Option<PathBuf>,
    /// The log's level or filter, as `"info"` or `"info,leasehold_store=debug"` (read by the
    /// `leasehold agent` front, which sets up the log).
    pub log_level: Option<String>,
    /// Log JSON lines instead of text.
    pub log_json: Option<bool>,
    /// See [`Config::metrics_listen`], as `"127.0.0.1:9464"`.
    pub metrics_listen: Option<String>,
    /// Allow a `metrics-listen` address that is not loopback (the endpoints have no
    /// authentication).
    pub metrics_allow_remote: Option<bool>,
    /// See [`Config::allow_revoke`].
    pub allow_revoke: Option<bool>,
}

/// A `metrics-listen` address: an IP address and port, loopback unless `allow_remote`.
fn metrics_address(a: &str, allow_remote: bool) -> Result<std::net::SocketAddr, ConfigError> {
    let addr: std::net::SocketAddr = a.parse().map_err(|_| ConfigError::Invalid {
        field: "metrics-listen",
        message: format!(
            "{a:?} is not an IP address and port, such as 127.0.0.1:9464 or [::1]:9464"
        ),
    })?;
    if !addr.ip().is_loopback() && !allow_remote {
        return Err(ConfigError::Invalid {
            field: "metrics-listen",
            message: format!(
                "{addr} is not a loopback address, and the metrics and health endpoints are \
                 plain HTTP with no authentication: to serve them beyond this host anyway, set \
                 metrics-allow-remote = true (--metrics-allow-remote), or use 127.0.0.1:PORT"
            ),
        });
    }
    Ok(addr)
}

/// URLs split at commas, blanks dropped.
pub fn split_endpoints<'a>(parts: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    parts
        .into_iter()
        .flat_map(|p| p.split(','))
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_owned)
        .collect()
}

/// `etcd-endpoints`: `["http://a:2379", "http://b:2379"]` or `"http://a:2379,http://b:2379"`.
fn endpoints<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    let v = match Option::<OneOrMany>::deserialize(d)? {
        None => return Ok(None),
        Some(OneOrMany::One(s)) => split_endpoints([s.as_str()]),
        Some(OneOrMany::Many(v)) => split_endpoints(v.iter().map(String::as_str)),
    };
    Ok(Some(v))
}

impl FileConfig {
    /// Reads a config file.
    ///
    /// # Errors
    /// [`ConfigError::Read`] or [`ConfigError::Parse`], naming the file.
    pub fn read(path: &Path) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: parse_message(&text, &e),
        })
    }

    /// This file's settings with `flags` laid over them.
    pub fn overlay(self, flags: FileConfig) -> FileConfig {
        FileConfig {
            socket: flags.socket.or(self.socket),
            state_dir: flags.state_dir.or(self.state_dir),
            host_id: flags.host_id.or(self.host_id),
            backend: flags.backend.or(self.backend),
            etcd_endpoints: flags.etcd_endpoints.or(self.etcd_endpoints),
            ttl: flags.ttl.or(self.ttl),
            renew: flags.renew.or(self.renew),
            fence_margin: flags.fence_margin.or(self.fence_margin),
            grace: flags.grace.or(self.grace),
            kill_timeout: flags.kill_timeout.or(self.kill_timeout),
            admin_group: flags.admin_group.or(self.admin_group),
            socket_group: flags.socket_group.or(self.socket_group),
            max_connections_per_user: flags
                .max_connections_per_user
                .or(self.max_connections_per_user),
            max_connections: flags.max_connections.or(self.max_connections),
            request_timeout: flags.request_timeout.or(self.request_timeout),
            etcd_prefix: flags.etcd_prefix.or(self.etcd_prefix),
            watchdog: flags.watchdog.or(self.watchdog),
            cgroup_root: flags.cgroup_root.or(self.cgroup_root),
            watchdog_timeout: flags.watchdog_timeout.or(self.watchdog_timeout),
            forget_after: flags.forget_after.or(self.forget_after),
            etcd_compact_every: flags.etcd_compact_every.or(self.etcd_compact_every),
            etcd_history: flags.etcd_history.or(self.etcd_history),
            etcd_forget_after: flags.etcd_forget_after.or(self.etcd_forget_after),
            etcd_quota: flags.etcd_quota.or(self.etcd_quota),
            etcd_defrag: flags.etcd_defrag.or(self.etcd_defrag),
            etcd_cacert: flags.etcd_cacert.or(self.etcd_cacert),
            etcd_cert: flags.etcd_cert.or(self.etcd_cert),
            etcd_key: flags.etcd_key.or(self.etcd_key),
            etcd_user: flags.etcd_user.or(self.etcd_user),
            etcd_password_file: flags.etcd_password_file.or(self.etcd_password_file),
            log_level: flags.log_level.or(self.log_level),
            log_json: flags.log_json.or(self.log_json),
            metrics_listen: flags.metrics_listen.or(self.metrics_listen),
            metrics_allow_remote: flags.metrics_allow_remote.or(self.metrics_allow_remote),
            allow_revoke: flags.allow_revoke.or(self.allow_revoke),
        }
    }
}

#[cfg(test)]
mod tests;
mod values;

use values::*;
pub use values::{MAX_DURATION, resolve_group};

impl Config {
    /// Resolves settings over the defaults and checks them.
    ///
    /// # Errors
    /// [`ConfigError`] naming the first bad setting or broken inequality.
    pub fn resolve(f: FileConfig) -> Result<Config, ConfigError> {
        let socket = f
            .socket
            .or_else(leasehold_api::default_socket_for_user)
            .ok_or(ConfigError::Invalid {
                field: "socket",
                message: "no default socket path: XDG_RUNTIME_DIR is not set; pass --socket".into(),
            })?;
        let state_dir = f
            .state_dir
            .or_else(default_state_dir)
            .ok_or(ConfigError::Invalid {
                field: "state-dir",
                message: "no default state directory: HOME is not set; pass --state-dir".into(),
            })?;
        let host = f.host_id.unwrap_or_else(hostname);
        let host_id = HostId::new(host).map_err(|e| ConfigError::Invalid {
            field: "host-id",
            message: e.to_string(),
        })?;
        let ttl = duration("ttl", &f.ttl)?.unwrap_or(leasehold_core::DEFAULT_TTL);
        let mut timing = Timing::for_ttl(ttl);
        if let Some(d) = duration("renew", &f.renew)? {
            timing.renew = d;
        }
        if let Some(d) = duration("fence-margin", &f.fence_margin)? {
            timing.fence_margin = d;
        }
        if let Some(d) = duration("grace", &f.grace)? {
            timing.grace = d;
        }
        if let Some(d) = duration("kill-timeout", &f.kill_timeout)? {
            timing.kill_timeout = d;
        }
        let backend = f.backend.unwrap_or(Backend::Local);
        if backend == Backend::Etcd && f.grace.is_none() {
            timing.grace = etcd_default_grace(ttl);
        }
        let etcd_endpoints = f.etcd_endpoints.unwrap_or_default();
        let admin_group = f
            .admin_group
            .as_deref()
            .map(|g| resolve_group("admin-group", g))
            .transpose()?;
        let socket_group = f
            .socket_group
            .as_deref()
            .map(|g| resolve_group("socket-group", g))
            .transpose()?;
        let etcd_prefix = f.etcd_prefix.unwrap_or_else(|| "/leasehold/".into());
        if !etcd_prefix.starts_with('/') || etcd_prefix.chars().any(char::is_control) {
            return Err(ConfigError::Invalid {
                field: "etcd-prefix",
                message: format!(
                    "{etcd_prefix:?} must start with '/' and hold no control characters"
                ),
            });
        }
        let cgroup_root = f
            .cgroup_root
            .as_deref()
            .map(crate::cgroup::Setting::parse)
            .transpose()
            .map_err(|message| ConfigError::Invalid {
                field: "cgroup-root",
                message,
            })?
            .unwrap_or_default();
        let watchdog_timeout =
            duration("watchdog-timeout", &f.watchdog_timeout)?.unwrap_or(Duration::from_secs(2));
        let forget_after = duration_or_off(
            "forget-after",
            &f.forget_after,
            leasehold_store::LocalStoreOptions::default().forget_after,
        )?;
        let defaults = leasehold_store::HistoryOptions::default();
        let etcd_history = leasehold_store::HistoryOptions {
            compact_every: duration_or_off(
                "etcd-compact-every",
                &f.etcd_compact_every,
                defaults.compact_every,
            )?,
            keep: match duration("etcd-history", &f.etcd_history)? {
                Some(d) if d.is_zero() => {
                    return Err(ConfigError::Invalid {
                        field: "etcd-history",
                        message: "must be greater than zero: watchers need some history".into(),
                    });
                }
                Some(d) => d,
                None => defaults.keep,
            },
            forget_after: duration_or_off(
                "etcd-forget-after",
                &f.etcd_forget_after,
                defaults.forget_after,
            )?,
            quota: f
                .etcd_quota
                .as_deref()
                .map(|q| bytes("etcd-quota", q))
                .transpose()?
                .unwrap_or(defaults.quota),
            defrag: match f.etcd_defrag.as_deref() {
                None => defaults.defrag,
                Some("on") => true,
                Some("off") => false,
                Some(other) => {
                    return Err(ConfigError::Invalid {
                        field: "etcd-defrag",
                        message: format!("{other:?}: say \"on\" or \"off\""),
                    });
                }
            },
        };
        let etcd_security = leasehold_store::EtcdSecurity {
            cacert: f.etcd_cacert,
            cert: f.etcd_cert,
            key: f.etcd_key,
            user: etcd_user(f.etcd_user, f.etcd_password_file.as_deref())?,
        };
        let max_connections_per_user = f.max_connections_per_user.unwrap_or(1024);
        if max_connections_per_user == 0 {
            return Err(ConfigError::Invalid {
                field: "max-connections-per-user",
                message: "must be at least 1: every client needs a connection".into(),
            });
        }
        let max_connections = f.max_connections.unwrap_or(4096);
        if max_connections == 0 {
            return Err(ConfigError::Invalid {
                field: "max-connections",
                message: "must be at least 1: every client needs a connection".into(),
            });
        }
        let request_timeout =
            duration("request-timeout", &f.request_timeout)?.unwrap_or(Duration::from_secs(10));
        if request_timeout.is_zero() {
            return Err(ConfigError::Invalid {
                field: "request-timeout",
                message: "must be more than 0: a request takes some time to arrive".into(),
            });
        }
        let metrics_listen = f
            .metrics_listen
            .as_deref()
            .map(|a| metrics_address(a, f.metrics_allow_remote.unwrap_or(false)))
            .transpose()?;
        let c = Config {
            socket,
            state_dir,
            host_id,
            backend,
            etcd_endpoints,
            timing,
            admin_group,
            socket_group,
            max_connections_per_user,
            max_connections,
            request_timeout,
            etcd_prefix,
            watchdog: f.watchdog,
            watchdog_timeout,
            etcd_history,
            forget_after,
            etcd_security,
            metrics_listen,
            allow_revoke: f.allow_revoke.unwrap_or(true),
            cgroup_root,
        };
        c.validate()?;
        Ok(c)
    }

    /// Checks the SPEC §4 inequalities and the backend settings.
    ///
    /// # Errors
    /// [`ConfigError::Inequality`] naming the broken inequality, or [`ConfigError::Invalid`].
    pub fn validate(&self) -> Result<(), ConfigError> {
        let t = &self.timing;
        let show = |d: Duration| humantime::format_duration(d).to_string();
        for (field, d) in [
            ("ttl", t.ttl),
            ("renew", t.renew),
            ("fence-margin", t.fence_margin),
            ("grace", t.grace),
        ] {
            if d.is_zero() {
                return Err(ConfigError::Invalid {
                    field,
                    message: "must be greater than zero".into(),
                });
            }
        }
        if t.fence_margin >= t.ttl {
            return Err(ConfigError::Inequality {
                rule: "fence_margin < ttl",
                detail: format!(
                    "fence_margin {} >= ttl {}",
                    show(t.fence_margin),
                    show(t.ttl)
                ),
                why: "the agent would fence its holders before it could renew once",
            });
        }
        if t.renew >= t.ttl - t.fence_margin {
            return Err(ConfigError::Inequality {
                rule: "renew < ttl - fence_margin",
                detail: format!(
                    "renew {} >= ttl {} - fence_margin {}",
                    show(t.renew),
                    show(t.ttl),
                    show(t.fence_margin)
                ),
                why: "the agent must renew before it has to fence its holders",
            });
        }
        if t.fence_margin.saturating_add(t.grace) <= t.kill_timeout {
            return Err(ConfigError::Inequality {
                rule: "fence_margin + grace > kill_timeout",
                detail: format!(
                    "fence_margin {} + grace {} <= kill_timeout {}",
                    show(t.fence_margin),
                    show(t.grace),
                    show(t.kill_timeout)
                ),
                why: "a fenced holder must be dead before another host can be granted its resources",
            });
        }
        if self.watchdog.is_some() && self.watchdog_timeout >= t.grace {
            return Err(ConfigError::Inequality {
                rule: "watchdog_timeout < grace",
                detail: format!(
                    "watchdog_timeout {} >= grace {}",
                    show(self.watchdog_timeout),
                    show(t.grace)
                ),
                why: "a host whose holder survives SIGKILL must reset before another host can be granted its resources",
            });
        }
        if self.backend == Backend::Etcd {
            // What etcd can honour: leases of whole seconds, none shorter than 2 s (it
            // raises them), expired on a 0.5 s tick (never early).
            if t.ttl.subsec_nanos() != 0 {
                return Err(ConfigError::Inequality {
                    rule: "ttl is whole seconds on etcd",
                    detail: format!("ttl {}", show(t.ttl)),
                    why: "etcd grants leases in whole seconds; give the ttl in whole seconds",
                });
            }
            if t.ttl < ETCD_MIN_LEASE {
                return Err(ConfigError::Inequality {
                    rule: "ttl >= 2s",
                    detail: format!("ttl {}", show(t.ttl)),
                    why: "etcd does not grant leases shorter than 2 s",
                });
            }
            if t.grace.subsec_nanos() != 0 {
                return Err(ConfigError::Inequality {
                    rule: "grace is whole seconds on etcd",
                    detail: format!("grace {}", show(t.grace)),
                    why: "a grace is an etcd lease, granted in whole seconds; give the grace in whole seconds",
                });
            }
            if t.grace < ETCD_MIN_LEASE {
                return Err(ConfigError::Inequality {
                    rule: "grace >= 2s on etcd",
                    detail: format!("grace {}", show(t.grace)),
                    why: "etcd raises a shorter lease to 2 s, so failover would take longer than ttl + grace",
                });
            }
            for (what, d) in [("ttl", t.ttl), ("grace", t.grace)] {
                if d > ETCD_MAX_LEASE {
                    return Err(ConfigError::Inequality {
                        rule: "ttl and grace <= 9000000000s on etcd",
                        detail: format!("{what} {}", show(d)),
                        why: "etcd refuses longer leases (its MaxLeaseTTL); a ttl is how long a \
                              lost host's disks stay locked, so seconds are usual",
                    });
                }
            }
            if self.etcd_endpoints.is_empty() {
                return Err(ConfigError::Invalid {
                    field: "etcd-endpoints",
                    message: "the etcd backend needs at least one endpoint".into(),
                });
            }
            for e in &self.etcd_endpoints {
                check_endpoint(e)?;
            }
            leasehold_store::etcd::client::check_endpoints(
                &self.etcd_endpoints,
                &self.etcd_security,
            )
            .map_err(|e| ConfigError::Invalid {
                field: "etcd-endpoints",
                message: e.detail().to_owned(),
            })?;
        }
        Ok(())
    }
}
