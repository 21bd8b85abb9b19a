//! The etcd store on a real etcd with TLS, client certificates and authentication: settings
//! etcd refuses are told apart from an etcd that is merely down, at once and saying what to
//! change, and a user limited to leasehold's prefix is enough.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use leasehold_core::{HostId, Mode, Owner, ReleaseKind, ResourceName};
use leasehold_store::{
    AcquireSpec, EtcdOptions, EtcdSecurity, EtcdStore, EtcdUser, Store, StoreError,
};
use leasehold_testkit::{Etcd, TestCerts};

const PREFIX: &str = "/lh-tls/";

fn user(password: &str) -> Option<EtcdUser> {
    Some(EtcdUser {
        name: "leasehold".into(),
        password: password.into(),
    })
}

fn full(certs: &TestCerts, password: &str) -> EtcdSecurity {
    EtcdSecurity {
        cacert: Some(certs.ca()),
        cert: Some(certs.client_cert()),
        key: Some(certs.client_key()),
        user: user(password),
    }
}

fn options(endpoint: String, security: EtcdSecurity) -> EtcdOptions {
    let mut o = EtcdOptions::new(vec![endpoint]);
    o.prefix = format!("{PREFIX}{}/", std::process::id());
    o.security = security;
    o
}

/// Opens a store that must be refused; returns the error and how long the refusal took.
async fn refused(o: EtcdOptions) -> (StoreError, Duration) {
    let t = Instant::now();
    match EtcdStore::open(HostId::new("h").unwrap(), o).await {
        Ok(_) => panic!("the store opened with settings etcd should refuse"),
        Err(e) => (e, t.elapsed()),
    }
}

/// A TLS etcd with client certificates and authentication, and a user limited to PREFIX.
fn secured() -> (TestCerts, Etcd) {
    let certs = TestCerts::generate("leasehold");
    let etcd = Etcd::start_tls(&certs, &[]);
    etcd.enable_auth("root-pw", "leasehold", "lh-pw", PREFIX);
    (certs, etcd)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_limited_to_the_prefix_takes_and_ends_leases_over_tls() {
    let (certs, etcd) = secured();
    let s = EtcdStore::open(
        HostId::new("a").unwrap(),
        options(etcd.endpoint(), full(&certs, "lh-pw")),
    )
    .await
    .unwrap();
    let owner = Owner::new(s.host().clone(), 4242, 1);
    let r = ResourceName::new("disk1").unwrap();
    let g = s
        .acquire(AcquireSpec::new(
            owner.clone(),
            [(r.clone(), Mode::Exclusive)],
        ))
        .await
        .unwrap();
    let token = g[0].token;
    assert!(s.validate(r.clone(), token).await.unwrap());
    let view = s.inspect(r.clone()).await.unwrap().unwrap();
    assert_eq!(view.holders.len(), 1, "{view:?}");
    // The record is in etcd, under the prefix, as root sees it.
    let out = etcd.etcdctl(&["get", "--prefix", PREFIX, "--keys-only"]);
    let keys = String::from_utf8_lossy(&out.stdout);
    assert!(keys.contains("/res/disk1"), "{keys}");
    s.release(
        r.clone(),
        owner.process.clone(),
        None,
        None,
        ReleaseKind::Clean,
    )
    .await
    .unwrap();
    assert!(!s.validate(r, token).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_tls_settings_are_refused_at_once_saying_what_to_change() {
    let (certs, etcd) = secured();
    let https = etcd.endpoint();
    let http = https.replace("https://", "http://");
    let other = TestCerts::generate("leasehold");
    let cases: Vec<(&str, EtcdOptions, &str)> = vec![
        (
            "a CA that did not sign etcd's certificate",
            options(
                https.clone(),
                EtcdSecurity {
                    cacert: Some(other.ca()),
                    ..full(&certs, "lh-pw")
                },
            ),
            "etcd-cacert",
        ),
        (
            "no client certificate for an etcd that checks them",
            options(
                https.clone(),
                EtcdSecurity {
                    cert: None,
                    key: None,
                    ..full(&certs, "lh-pw")
                },
            ),
            "etcd-cert",
        ),
        (
            "a client certificate another CA signed",
            options(
                https.clone(),
                EtcdSecurity {
                    cert: Some(other.client_cert()),
                    key: Some(other.client_key()),
                    ..full(&certs, "lh-pw")
                },
            ),
            "etcd-cert",
        ),
        (
            "plaintext to a TLS port",
            options(
                http.clone(),
                EtcdSecurity {
                    user: user("lh-pw"),
                    ..EtcdSecurity::default()
                },
            ),
            "https://",
        ),
        (
            "TLS settings with an http:// endpoint",
            options(http, full(&certs, "lh-pw")),
            "https://",
        ),
        (
            "a wrong password",
            options(https.clone(), full(&certs, "not-the-password")),
            "etcd-password-file",
        ),
        (
            "a CA file that does not exist",
            options(
                https,
                EtcdSecurity {
                    cacert: Some(certs.dir().join("missing.pem")),
                    ..full(&certs, "lh-pw")
                },
            ),
            "missing.pem",
        ),
    ];
    for (what, o, says) in cases {
        let (e, took) = refused(o).await;
        assert!(
            matches!(e, StoreError::Misconfigured(_)),
            "{what}: taken for a passing failure (the agent would retry forever): {e:?}"
        );
        assert!(
            e.to_string().contains(says),
            "{what}: does not say {says:?}: {e}"
        );
        // Refused at once, not after retrying as if etcd were down.
        assert!(took < Duration::from_secs(2), "{what}: took {took:?}: {e}");
        eprintln!("{what}: {e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_without_rights_on_the_prefix_is_refused_naming_the_grant() {
    let (certs, etcd) = secured();
    // The user's role covers PREFIX; this store uses another prefix.
    let mut o = options(etcd.endpoint(), full(&certs, "lh-pw"));
    o.prefix = "/elsewhere/".into();
    let (e, _) = refused(o).await;
    assert!(matches!(e, StoreError::Misconfigured(_)), "{e:?}");
    assert!(e.to_string().contains("grant-permission"), "{e}");
}

/// etcd takes a client certificate's common name as the user when a request carries no
/// token: a certificate for the user is enough, without a password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_named_for_the_user_needs_no_password() {
    let (certs, etcd) = secured();
    let s = EtcdStore::open(
        HostId::new("a").unwrap(),
        options(
            etcd.endpoint(),
            EtcdSecurity {
                user: None,
                ..full(&certs, "")
            },
        ),
    )
    .await
    .unwrap();
    let owner = Owner::new(s.host().clone(), 4242, 1);
    let r = ResourceName::new("disk1").unwrap();
    s.acquire(AcquireSpec::new(owner, [(r, Mode::Exclusive)]))
        .await
        .unwrap();
}

/// Issue 10 item 7: etcd forgets a simple token unused for `--auth-token-ttl`; the store
/// authenticates again when etcd refuses its token, and keeps its host session meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_auth_token_is_renewed_and_the_session_kept() {
    const TOKEN_TTL: Duration = Duration::from_secs(2);
    let etcd = Etcd::start_with(&["--auth-token", "simple", "--auth-token-ttl", "2"]);
    etcd.enable_auth("root-pw", "leasehold", "lh-pw", PREFIX);
    let mut o = options(
        etcd.endpoint(),
        EtcdSecurity {
            user: user("lh-pw"),
            ..EtcdSecurity::default()
        },
    );
    // Renewals further apart than the token's life, so the token goes unused long enough.
    o.ttl = Duration::from_secs(30);
    o.renew = Duration::from_secs(10);
    o.grace = Duration::from_secs(15);
    let s = EtcdStore::open(HostId::new("a").unwrap(), o).await.unwrap();
    let session = s.session().unwrap();
    let before = session.borrow().id;
    let owner = Owner::new(s.host().clone(), 4242, 1);
    let (r1, r2) = (
        ResourceName::new("disk1").unwrap(),
        ResourceName::new("disk2").unwrap(),
    );
    let g = s
        .acquire(AcquireSpec::new(
            owner.clone(),
            [(r1.clone(), Mode::Exclusive)],
        ))
        .await
        .unwrap();

    // Several token lifetimes pass. The agent's own calls (the space check each second) may
    // keep its token in use; so etcd also drops every token, as an expiry does, by turning
    // authentication off and on again. Either way the next call carries a token etcd refuses.
    let idle_until = Instant::now() + TOKEN_TTL * 3;
    while Instant::now() < idle_until {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let st = session.borrow().clone();
        assert!(!st.expired && st.id == before, "session lost: {st:?}");
    }
    for step in [["auth", "disable"], ["auth", "enable"]] {
        let out = etcd.etcdctl(&step);
        assert!(out.status.success(), "{out:?}");
    }

    // Every kind of call still works, on the same session.
    assert!(s.validate(r1.clone(), g[0].token).await.unwrap());
    s.acquire(AcquireSpec::new(
        owner.clone(),
        [(r2.clone(), Mode::Exclusive)],
    ))
    .await
    .unwrap();
    let listed = s.list().await.unwrap();
    assert_eq!(listed.len(), 2, "{listed:?}");
    for r in [r1, r2] {
        s.release(r, owner.process.clone(), None, None, ReleaseKind::Clean)
            .await
            .unwrap();
    }
    let st = session.borrow().clone();
    assert!(!st.expired && st.id == before, "session lost: {st:?}");
    // etcd did refuse a token in between: the store renewed it, not merely kept using one.
    let log = std::fs::read_to_string(etcd.log_path()).unwrap();
    assert!(
        log.contains("invalid auth token"),
        "etcd never refused a token: the test did not test renewal\n{}",
        etcd.log_tail(30)
    );
}

/// The view's watch stream carries the token it was opened with, and etcd checks it for every
/// watcher created on the stream. Once etcd has dropped that token, a resource this host takes
/// must still be watched: here another host force-releases it, and the holder must hear it
/// (SPEC G3). Before, etcd refused the resource's watchers on the old stream ("invalid auth
/// token", naming watcher -1, not theirs), the store never created them again, and the
/// force-release never reached the holder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resource_taken_after_the_token_expired_is_still_watched() {
    let etcd = Etcd::start_with(&["--auth-token", "simple", "--auth-token-ttl", "2"]);
    etcd.enable_auth("root-pw", "leasehold", "lh-pw", PREFIX);
    let opts = || {
        options(
            etcd.endpoint(),
            EtcdSecurity {
                user: user("lh-pw"),
                ..EtcdSecurity::default()
            },
        )
    };
    let a = EtcdStore::open(HostId::new("a").unwrap(), opts())
        .await
        .unwrap();
    let b = EtcdStore::open(HostId::new("b").unwrap(), opts())
        .await
        .unwrap();
    // etcd drops every token, as an expiry does.
    for step in [["auth", "disable"], ["auth", "enable"]] {
        let out = etcd.etcdctl(&step);
        assert!(out.status.success(), "{out:?}");
    }
    let owner = Owner::new(a.host().clone(), 4242, 1);
    let disk = ResourceName::new("disk1").unwrap();
    a.acquire(AcquireSpec::new(
        owner.clone(),
        [(disk.clone(), Mode::Exclusive)],
    ))
    .await
    .unwrap();
    let mut events = a.subscribe();
    b.force_release(disk.clone(), "the disk is needed".into(), "root".into())
        .await
        .unwrap();
    loop {
        let e = tokio::time::timeout(Duration::from_secs(30), events.recv())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "the holder never heard that another host force-released its lease\n{}",
                    etcd.log_tail(40)
                )
            })
            .unwrap();
        if let leasehold_core::Event::Ended { ended, .. } = e
            && ended.owner.process == owner.process
        {
            assert!(
                matches!(ended.how, leasehold_core::EndReason::Forced { .. }),
                "{:?}",
                ended.how
            );
            break;
        }
    }
}
