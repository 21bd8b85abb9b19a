//! Why a first contact with etcd failed, when gRPC only says "connection closed".
//!
//! With TLS 1.3 a server checks the client's certificate after the client has finished its
//! handshake; etcd then sends an alert and closes, and the alert is often lost under the
//! HTTP/2 preface the client already sent (the close becomes a reset). A plaintext client on a
//! TLS port, or a TLS client on a plaintext port, sees a closed connection or garbage too. So
//! when the first contact fails, each endpoint is probed once by hand: a TLS handshake with the
//! same settings and nothing sent after it (a refusal then arrives as an alert), or, for
//! `http://`, the start of a TLS handshake to see whether a TLS server answers.

use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};

use super::client::{EtcdError, EtcdErrorKind, EtcdSecurity, Setting};
use super::client::{tls_error, transport_setting};

/// How long the probe waits for a refusal after the handshake; etcd refuses at once.
const SETTLE: Duration = Duration::from_millis(700);

/// What is wrong with the settings for `endpoint`, if a probe can tell; `None` when the
/// endpoint looks fine (or cannot be reached at all: etcd may be down).
pub(super) async fn diagnose(
    endpoint: &str,
    sec: &EtcdSecurity,
    timeout: Duration,
) -> Option<EtcdError> {
    let (setting, detail, source) = probe(endpoint, sec, timeout).await?;
    let e = EtcdError::new(
        "connect",
        EtcdErrorKind::Settings(setting),
        format!("{endpoint}: {detail}"),
    );
    Some(match source {
        Some(s) => e.with_source(s),
        None => e,
    })
}

/// What a probe found: the setting to blame, what happened, and the error under it.
type Found = (Setting, String, Option<std::io::Error>);

async fn probe(endpoint: &str, sec: &EtcdSecurity, timeout: Duration) -> Option<Found> {
    let (tls, rest) = if let Some(r) = endpoint.strip_prefix("https://") {
        (true, r)
    } else {
        (false, endpoint.strip_prefix("http://")?)
    };
    let authority = rest.split('/').next()?;
    let host = match authority.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => h,
        _ => authority,
    };
    let addr = if authority.contains(':') {
        authority.to_owned()
    } else {
        format!("{authority}:{}", if tls { 443 } else { 80 })
    };
    let tcp = tokio::time::timeout(timeout, TcpStream::connect(&addr))
        .await
        .ok()?
        .ok()?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if tls {
        probe_tls(tcp, host, sec, timeout).await
    } else {
        probe_plain(tcp, host, timeout).await
    }
}

/// Starts a TLS handshake trusting nobody: a TLS server gets as far as showing its
/// certificate, which is then refused as unknown.
async fn probe_plain(tcp: TcpStream, host: &str, timeout: Duration) -> Option<Found> {
    let config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .ok()?
            .with_root_certificates(RootCertStore::empty())
            .with_no_client_auth();
    let name = ServerName::try_from(host.to_owned()).ok()?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    match tokio::time::timeout(timeout, connector.connect(name, tcp)).await {
        Ok(Err(e)) if matches!(tls_error(&e), Some(rustls::Error::InvalidCertificate(_))) => {
            Some((Setting::IsTls, e.to_string(), Some(e)))
        }
        _ => None,
    }
}

/// A TLS handshake as the client would make it, then a short wait for a refusal.
async fn probe_tls(
    tcp: TcpStream,
    host: &str,
    sec: &EtcdSecurity,
    timeout: Duration,
) -> Option<Found> {
    let config = client_config(sec).ok()?;
    let name = ServerName::try_from(host.to_owned()).ok()?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let mut stream = match tokio::time::timeout(timeout, connector.connect(name, tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Some(explain(e)),
        Err(_) => return None,
    };
    let mut buf = [0u8; 64];
    match tokio::time::timeout(SETTLE, stream.read(&mut buf)).await {
        // Still open: the server is waiting for a request, as it should.
        Err(_) => None,
        Ok(Ok(0)) => Some((
            Setting::ClientCertificate,
            "etcd closed the connection right after the TLS handshake".into(),
            None,
        )),
        Ok(Ok(_)) => None,
        Ok(Err(e)) => Some(explain(e)),
    }
}

/// The setting a failed handshake blames: what its TLS error says, else the client's
/// certificate (with TLS 1.3, a server that refuses it closes or resets the connection).
fn explain(e: std::io::Error) -> Found {
    let setting = transport_setting(&e).unwrap_or(Setting::ClientCertificate);
    (setting, e.to_string(), Some(e))
}

/// The rustls settings the client uses, for the probe.
fn client_config(sec: &EtcdSecurity) -> Result<ClientConfig, String> {
    let mut roots = RootCertStore::empty();
    match &sec.cacert {
        Some(p) => {
            for c in CertificateDer::pem_file_iter(p).map_err(|e| e.to_string())? {
                roots
                    .add(c.map_err(|e| e.to_string())?)
                    .map_err(|e| e.to_string())?;
            }
        }
        None => {
            roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        }
    }
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots);
    match (&sec.cert, &sec.key) {
        (Some(c), Some(k)) => {
            let certs = CertificateDer::pem_file_iter(c)
                .map_err(|e| e.to_string())?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| e.to_string())?;
            let key = PrivateKeyDer::from_pem_file(k).map_err(|e| e.to_string())?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| e.to_string())
        }
        _ => Ok(builder.with_no_client_auth()),
    }
}
