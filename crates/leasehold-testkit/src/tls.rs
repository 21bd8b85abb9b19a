//! Certificates made for a test: a CA, a server certificate for 127.0.0.1 and `localhost`,
//! and a client certificate, as PEM files in a temporary directory.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

/// A fresh CA with a server and a client certificate it signed, written as PEM files into a
/// temporary directory removed on drop. Every call makes new keys: two `TestCerts` never trust
/// each other, which is how a test gets a wrong CA.
pub struct TestCerts {
    dir: tempfile::TempDir,
    client_cn: String,
}

fn fail(what: &str, e: impl std::fmt::Display) -> ! {
    panic!("leasehold-testkit: {what}: {e}")
}

fn key() -> KeyPair {
    KeyPair::generate().unwrap_or_else(|e| fail("generating a key", e))
}

impl TestCerts {
    /// A CA, a server certificate for `127.0.0.1` and `localhost`, and a client certificate
    /// whose common name is `client_cn` (etcd takes it as the user name when a request carries
    /// no token).
    pub fn generate(client_cn: &str) -> TestCerts {
        let dir = tempfile::Builder::new()
            .prefix("leasehold-testkit-certs-")
            .tempdir()
            .unwrap_or_else(|e| fail("creating a temporary directory", e));
        let mut ca = CertificateParams::default();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "leasehold-testkit CA");
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = key();
        let ca = CertifiedIssuer::self_signed(ca, ca_key)
            .unwrap_or_else(|e| fail("signing the CA certificate", e));

        let mut server = CertificateParams::default();
        server.distinguished_name.push(DnType::CommonName, "etcd");
        server.subject_alt_names = vec![
            SanType::DnsName(
                "localhost"
                    .try_into()
                    .unwrap_or_else(|e| fail("a DNS name", e)),
            ),
            SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        ];
        server.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        server.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        server.use_authority_key_identifier_extension = true;
        let server_key = key();
        let server_cert = server
            .signed_by(&server_key, &ca)
            .unwrap_or_else(|e| fail("signing the server certificate", e));

        let mut client = CertificateParams::default();
        client
            .distinguished_name
            .push(DnType::CommonName, client_cn);
        client.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        client.use_authority_key_identifier_extension = true;
        let client_key = key();
        let client_cert = client
            .signed_by(&client_key, &ca)
            .unwrap_or_else(|e| fail("signing the client certificate", e));

        let files = [
            ("ca.pem", ca.pem()),
            ("server.pem", server_cert.pem()),
            ("server-key.pem", server_key.serialize_pem()),
            ("client.pem", client_cert.pem()),
            ("client-key.pem", client_key.serialize_pem()),
        ];
        for (name, pem) in files {
            let p = dir.path().join(name);
            std::fs::write(&p, pem).unwrap_or_else(|e| fail(&format!("writing {name}"), e));
        }
        TestCerts {
            dir,
            client_cn: client_cn.to_owned(),
        }
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The CA certificate (etcd's `--trusted-ca-file`, a client's `--cacert`).
    pub fn ca(&self) -> PathBuf {
        self.file("ca.pem")
    }

    /// etcd's server certificate (`--cert-file`).
    pub fn server_cert(&self) -> PathBuf {
        self.file("server.pem")
    }

    /// Its key (`--key-file`).
    pub fn server_key(&self) -> PathBuf {
        self.file("server-key.pem")
    }

    /// The client certificate (a client's `--cert`).
    pub fn client_cert(&self) -> PathBuf {
        self.file("client.pem")
    }

    /// Its key (a client's `--key`).
    pub fn client_key(&self) -> PathBuf {
        self.file("client-key.pem")
    }

    /// The client certificate's common name.
    pub fn client_cn(&self) -> &str {
        &self.client_cn
    }

    /// The directory holding the files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl std::fmt::Debug for TestCerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCerts")
            .field("dir", &self.dir.path())
            .field("client_cn", &self.client_cn)
            .finish()
    }
}
