//! The configuration: files, flags, defaults and every refusal.

use super::*;

fn base() -> FileConfig {
    FileConfig {
        socket: Some("/tmp/x.sock".into()),
        state_dir: Some("/tmp/x".into()),
        host_id: Some("h1".into()),
        ..FileConfig::default()
    }
}

#[test]
fn defaults_follow_the_spec() {
    let c = Config::resolve(base()).unwrap();
    assert_eq!(c.timing.ttl, Duration::from_secs(10));
    assert_eq!(c.timing.renew, Duration::from_secs(10) / 3);
    assert_eq!(c.timing.fence_margin, Duration::from_secs(2));
    assert_eq!(c.timing.grace, Duration::from_secs(5));
    assert_eq!(c.backend, Backend::Local);
}

#[test]
fn etcd_endpoints_must_be_client_urls() {
    let on = |e: &str| {
        Config::resolve(FileConfig {
            backend: Some(Backend::Etcd),
            etcd_endpoints: Some(vec![e.into()]),
            ..base()
        })
    };
    for good in [
        "http://127.0.0.1:2379",
        "https://etcd.example:2379/",
        "http://[::1]:2379",
        "http://etcd",
    ] {
        assert!(on(good).is_ok(), "{good}: {:?}", on(good));
    }
    for bad in [
        "not-a-url",
        "127.0.0.1:2379",
        "http://",
        "http://:2379",
        "http://h:0",
        "http://h:99999",
        "http://h:port",
        "http://h:2379/v3/kv",
        "http://u@h:2379",
        "http://[::1",
        "http://h :1",
    ] {
        match on(bad) {
            Err(ConfigError::Invalid { field, message }) => {
                assert_eq!(field, "etcd-endpoints");
                assert!(message.contains("http://10.0.0.1:2379"), "{message}");
            }
            other => panic!("{bad}: {other:?}"),
        }
    }
}

#[test]
fn an_etcd_ttl_beyond_what_etcd_grants_is_refused() {
    let f = FileConfig {
        backend: Some(Backend::Etcd),
        etcd_endpoints: Some(vec!["http://127.0.0.1:2379".into()]),
        ttl: Some("1000years".into()),
        ..base()
    };
    match Config::resolve(f) {
        Err(ConfigError::Inequality { rule, .. }) => assert!(rule.contains("9000000000s")),
        other => panic!("{other:?}"),
    }
}

#[test]
fn each_inequality_is_named() {
    let cases = [
        (("10s", "1s", "12s", "5s"), "fence_margin < ttl"),
        (("10s", "9s", "2s", "5s"), "renew < ttl - fence_margin"),
        (
            ("10s", "3s", "200ms", "500ms"),
            "fence_margin + grace > kill_timeout",
        ),
    ];
    for ((ttl, renew, margin, grace), rule) in cases {
        let f = FileConfig {
            ttl: Some(ttl.into()),
            renew: Some(renew.into()),
            fence_margin: Some(margin.into()),
            grace: Some(grace.into()),
            ..base()
        };
        match Config::resolve(f) {
            Err(ConfigError::Inequality { rule: r, .. }) => assert_eq!(r, rule),
            other => panic!("{rule}: {other:?}"),
        }
    }
}

#[test]
fn etcd_timing_etcd_cannot_honour_is_refused_naming_the_rule() {
    let etcd = |ttl: &str, grace: Option<&str>| FileConfig {
        backend: Some(Backend::Etcd),
        etcd_endpoints: Some(vec!["http://127.0.0.1:2379".into()]),
        ttl: Some(ttl.into()),
        renew: Some("300ms".into()),
        fence_margin: Some("300ms".into()),
        grace: grace.map(Into::into),
        ..base()
    };
    let cases = [
        (("2900ms", Some("2s")), "ttl is whole seconds on etcd"),
        (("1s", Some("2s")), "ttl >= 2s"),
        (("3s", Some("2500ms")), "grace is whole seconds on etcd"),
        (("3s", Some("1s")), "grace >= 2s on etcd"),
    ];
    for ((ttl, grace), rule) in cases {
        match Config::resolve(etcd(ttl, grace)) {
            Err(e @ ConfigError::Inequality { rule: r, .. }) => {
                assert_eq!(r, rule);
                assert!(e.to_string().contains(rule), "{e}");
            }
            other => panic!("{rule}: {other:?}"),
        }
    }
    // The default grace is ttl/2 rounded up to what etcd grants.
    let c = Config::resolve(etcd("3s", None)).unwrap();
    assert_eq!(c.timing.grace, Duration::from_secs(2));
    let c = Config::resolve(etcd("5s", None)).unwrap();
    assert_eq!(c.timing.grace, Duration::from_secs(3));
    let c = Config::resolve(etcd("3s", Some("2s"))).unwrap();
    assert_eq!(c.timing.ttl, Duration::from_secs(3));
}

#[test]
fn unknown_keys_and_bad_values_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.toml");
    std::fs::write(&p, "host-id = \"h\"\nttl = \"10s\"\nttll = \"3s\"\n").unwrap();
    let e = FileConfig::read(&p).unwrap_err();
    assert!(e.to_string().contains("ttll"), "{e}");
    let bad = FileConfig {
        ttl: Some("ten seconds".into()),
        ..base()
    };
    assert!(matches!(
        Config::resolve(bad),
        Err(ConfigError::Invalid { field: "ttl", .. })
    ));
    let bad = FileConfig {
        host_id: Some("bad host".into()),
        ..base()
    };
    assert!(matches!(
        Config::resolve(bad),
        Err(ConfigError::Invalid {
            field: "host-id",
            ..
        })
    ));
    let bad = FileConfig {
        admin_group: Some("no-such-group-here".into()),
        ..base()
    };
    assert!(Config::resolve(bad).is_err());
}

#[test]
fn the_packaged_config_file_is_valid() {
    let text = include_str!("../../../../packaging/agent.toml");
    let f: FileConfig = toml::from_str(text).unwrap();
    let c = Config::resolve(f.overlay(base())).unwrap();
    assert_eq!(c.backend, Backend::Local);
    assert_eq!(c.timing.ttl, Duration::from_secs(10));
}

#[test]
fn flags_win_over_the_file() {
    let file = FileConfig {
        ttl: Some("20s".into()),
        host_id: Some("from-file".into()),
        ..base()
    };
    let flags = FileConfig {
        host_id: Some("from-flag".into()),
        ..FileConfig::default()
    };
    let c = Config::resolve(file.overlay(flags)).unwrap();
    assert_eq!(c.host_id.as_str(), "from-flag");
    assert_eq!(c.timing.ttl, Duration::from_secs(20));
}

#[test]
fn etcd_needs_endpoints_and_a_ttl_etcd_accepts() {
    let f = FileConfig {
        backend: Some(Backend::Etcd),
        ..base()
    };
    assert!(Config::resolve(f).is_err());
    let f = FileConfig {
        backend: Some(Backend::Etcd),
        etcd_endpoints: Some(vec!["http://127.0.0.1:2379".into()]),
        ttl: Some("1s".into()),
        grace: Some("3s".into()),
        ..base()
    };
    assert!(matches!(
        Config::resolve(f),
        Err(ConfigError::Inequality {
            rule: "ttl >= 2s",
            ..
        })
    ));
}

#[test]
fn etcd_defrag_is_on_or_off() {
    assert!(Config::resolve(base()).unwrap().etcd_history.defrag);
    let with = |v: &str| {
        Config::resolve(FileConfig {
            etcd_defrag: Some(v.into()),
            ..base()
        })
    };
    assert!(!with("off").unwrap().etcd_history.defrag);
    assert!(with("on").unwrap().etcd_history.defrag);
    let e = with("sometimes").unwrap_err().to_string();
    assert!(
        e.contains("etcd-defrag") && e.contains("\"on\" or \"off\""),
        "{e}"
    );
}

#[test]
fn etcd_tls_and_user_settings_are_checked_saying_what_to_change() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "secret\n").unwrap();
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
    let etcd = |eps: &[&str]| FileConfig {
        backend: Some(Backend::Etcd),
        etcd_endpoints: Some(eps.iter().map(|e| (*e).to_owned()).collect()),
        ..base()
    };
    let refused = |f: FileConfig, field: &str, says: &str| match Config::resolve(f) {
        Err(e @ ConfigError::Invalid { field: got, .. }) => {
            assert_eq!(got, field, "{e}");
            assert!(e.to_string().contains(says), "{e}");
        }
        other => panic!("{field}: {other:?}"),
    };
    refused(
        FileConfig {
            etcd_cacert: Some("/ca.pem".into()),
            ..etcd(&["http://127.0.0.1:2379"])
        },
        "etcd-endpoints",
        "use https://",
    );
    refused(
        etcd(&["https://10.0.0.1:2379", "http://10.0.0.2:2379"]),
        "etcd-endpoints",
        "mix http:// and https://",
    );
    refused(etcd(&["not-a-url"]), "etcd-endpoints", "not an etcd");
    refused(
        FileConfig {
            etcd_user: Some("lh".into()),
            ..etcd(&["https://127.0.0.1:2379"])
        },
        "etcd-password-file",
        "etcd-password-file",
    );
    refused(
        FileConfig {
            etcd_user: Some("lh:secret".into()),
            etcd_password_file: Some(pw.clone()),
            ..etcd(&["https://127.0.0.1:2379"])
        },
        "etcd-user",
        "no ':'",
    );
    let c = Config::resolve(FileConfig {
        etcd_user: Some("lh".into()),
        etcd_password_file: Some(pw.clone()),
        etcd_cacert: Some("/ca.pem".into()),
        ..etcd(&["https://127.0.0.1:2379"])
    })
    .unwrap();
    let user = c.etcd_security.user.clone().unwrap();
    assert_eq!(
        (user.name.as_str(), user.password.as_str()),
        ("lh", "secret")
    );
    // The password never shows in logs of the configuration.
    assert!(!format!("{c:?}").contains("secret"));
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o644)).unwrap();
    refused(
        FileConfig {
            etcd_user: Some("lh".into()),
            etcd_password_file: Some(pw),
            ..etcd(&["https://127.0.0.1:2379"])
        },
        "etcd-password-file",
        "chmod 600",
    );
}

#[test]
fn forget_after_is_a_duration_or_off() {
    let with = |v: &str| {
        Config::resolve(FileConfig {
            forget_after: Some(v.into()),
            ..base()
        })
    };
    assert_eq!(
        Config::resolve(base()).unwrap().forget_after,
        Some(Duration::from_secs(3600))
    );
    assert_eq!(
        with("10m").unwrap().forget_after,
        Some(Duration::from_secs(600))
    );
    assert_eq!(with("off").unwrap().forget_after, None);
    let e = with("0s").unwrap_err().to_string();
    assert!(e.contains("forget-after") && e.contains("\"off\""), "{e}");
    let toml: FileConfig = toml::from_str("forget-after = \"2h\"").unwrap();
    assert_eq!(toml.forget_after.as_deref(), Some("2h"));
}
