//! How to reach etcd beyond its URLs: TLS files and an etcd user, checked before connecting.

use std::path::PathBuf;
use std::time::Duration;

use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use super::EtcdError;

/// How to reach etcd beyond its URLs: TLS files and an etcd user, as etcdctl's `--cacert`,
/// `--cert`, `--key` and `--user`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EtcdSecurity {
    /// The CA certificate(s), PEM, that sign etcd's server certificates; without it,
    /// `https://` endpoints are checked against the system's roots.
    pub cacert: Option<PathBuf>,
    /// This agent's client certificate, PEM, for an etcd that checks them
    /// (`--client-cert-auth`).
    pub cert: Option<PathBuf>,
    /// The client certificate's private key, PEM.
    pub key: Option<PathBuf>,
    /// The etcd user to authenticate as, when etcd's authentication is enabled.
    pub user: Option<EtcdUser>,
}

impl EtcdSecurity {
    /// Whether any TLS setting is given.
    pub fn has_tls_files(&self) -> bool {
        self.cacert.is_some() || self.cert.is_some() || self.key.is_some()
    }
}

/// An etcd user and its password (never shown by `Debug`).
#[derive(Clone, PartialEq, Eq)]
pub struct EtcdUser {
    /// The user's name.
    pub name: String,
    /// Its password.
    pub password: String,
}

impl std::fmt::Debug for EtcdUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdUser")
            .field("name", &self.name)
            .field("password", &"(hidden)")
            .finish()
    }
}

/// Reads a PEM file named by setting `field`.
pub(super) fn read_pem(field: &str, path: &std::path::Path) -> Result<Vec<u8>, EtcdError> {
    let pem = std::fs::read(path).map_err(|e| {
        EtcdError::given("connect", format!("{field} {}: {e}", path.display())).with_source(e)
    })?;
    if !String::from_utf8_lossy(&pem).contains("-----BEGIN ") {
        return Err(EtcdError::given(
            "connect",
            format!("{field} {}: not a PEM file", path.display()),
        ));
    }
    Ok(pem)
}

/// The TLS settings for `https://` endpoints, from `sec`.
pub(super) fn tls_config(
    sec: &EtcdSecurity,
    timeout: Duration,
) -> Result<ClientTlsConfig, EtcdError> {
    // etcd speaks HTTP/2 on its TLS port whether or not it offers it through ALPN.
    let mut tls = ClientTlsConfig::new().assume_http2(true).timeout(timeout);
    tls = match &sec.cacert {
        Some(p) => tls.ca_certificate(Certificate::from_pem(read_pem("etcd-cacert", p)?)),
        None => tls.with_native_roots(),
    };
    match (&sec.cert, &sec.key) {
        (Some(c), Some(k)) => Ok(tls.identity(Identity::from_pem(
            read_pem("etcd-cert", c)?,
            read_pem("etcd-key", k)?,
        ))),
        (None, None) => Ok(tls),
        (Some(_), None) => Err(EtcdError::given(
            "connect",
            "etcd-cert is set without etcd-key: give both, or neither",
        )),
        (None, Some(_)) => Err(EtcdError::given(
            "connect",
            "etcd-key is set without etcd-cert: give both, or neither",
        )),
    }
}

/// Checks `endpoints` against `sec`: every one `http://` (no TLS settings) or every one
/// `https://`. Returns whether they use TLS.
///
/// # Errors
/// A misconfigured [`EtcdError`] saying what to change.
pub fn check_endpoints(endpoints: &[String], sec: &EtcdSecurity) -> Result<bool, EtcdError> {
    let bad = |m: String| Err(EtcdError::given("connect", m));
    if endpoints.is_empty() {
        return bad("no endpoints: give at least one etcd URL".into());
    }
    let mut tls = None;
    for e in endpoints {
        let this = if e.starts_with("https://") {
            true
        } else if e.starts_with("http://") {
            false
        } else {
            return bad(format!(
                "endpoint {e:?} is not an etcd URL: write http://HOST:PORT, or https://HOST:PORT \
                 for TLS"
            ));
        };
        let host = e.split_once("://").map_or("", |(_, rest)| rest);
        if host.is_empty() || host.starts_with(':') || host.starts_with('/') {
            return bad(format!(
                "endpoint {e:?} names no host: write http://HOST:PORT"
            ));
        }
        if tls.is_some_and(|t| t != this) {
            return bad(format!(
                "endpoints mix http:// and https:// ({}): use https:// for every member of a \
                 TLS cluster",
                endpoints.join(",")
            ));
        }
        tls = Some(this);
    }
    let tls = tls.unwrap_or(false);
    if !tls && sec.has_tls_files() {
        return bad(format!(
            "etcd-cacert, etcd-cert or etcd-key is set but the endpoints are http:// ({}): use \
             https:// to reach etcd over TLS, or drop the TLS settings",
            endpoints.join(",")
        ));
    }
    Ok(tls)
}
