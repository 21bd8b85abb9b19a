//! Property tests of the agent's configuration, which comes from a file and flags: any text as
//! a config file, any text as a duration, a size or an etcd endpoint. Nothing panics; what is
//! accepted keeps SPEC §4's safety inequalities; what is refused names the setting.
//!
//! `LEASEHOLD_FUZZ_CASES=N` runs N cases per property (default 256; millions in a long run).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use leasehold_agent::{Backend, Config, ConfigError, FileConfig};
use proptest::prelude::*;

use leasehold_testkit::fuzz_cases as cases;

fn base() -> FileConfig {
    FileConfig {
        socket: Some("/tmp/fuzz.sock".into()),
        state_dir: Some("/tmp/fuzz-state".into()),
        host_id: Some("h1".into()),
        ..FileConfig::default()
    }
}

/// Text that is often almost a duration.
fn durations() -> impl Strategy<Value = String> {
    prop_oneof![
        "[0-9]{1,25}(ns|us|ms|s|m|h|d|w|y|)",
        "[0-9 .a-z-]{0,12}",
        "off|on|\\PC{0,10}",
        Just("18446744073709551615s".to_owned()),
        Just("99999999999999999999y".to_owned()),
    ]
}

/// A resolved configuration must keep every inequality `validate` checks.
fn check(c: &Config) -> Result<(), TestCaseError> {
    let t = &c.timing;
    prop_assert!(!t.ttl.is_zero() && !t.renew.is_zero() && !t.grace.is_zero());
    prop_assert!(t.fence_margin < t.ttl);
    prop_assert!(t.renew < t.ttl - t.fence_margin);
    prop_assert!(t.fence_margin.saturating_add(t.grace) > t.kill_timeout);
    prop_assert!(c.validate().is_ok());
    for d in [t.ttl, t.renew, t.fence_margin, t.grace, t.kill_timeout] {
        prop_assert!(d <= leasehold_agent::config::MAX_DURATION);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn timing_text_is_accepted_only_when_safe(
        ttl in durations(), renew in durations(), margin in durations(),
        grace in durations(), kill in durations(), etcd in any::<bool>(),
    ) {
        let f = FileConfig {
            ttl: Some(ttl),
            renew: Some(renew),
            fence_margin: Some(margin),
            grace: Some(grace),
            kill_timeout: Some(kill),
            backend: Some(if etcd { Backend::Etcd } else { Backend::Local }),
            etcd_endpoints: etcd.then(|| vec!["http://127.0.0.1:2379".to_owned()]),
            ..base()
        };
        match Config::resolve(f) {
            Ok(c) => check(&c)?,
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    #[test]
    fn other_settings_are_accepted_or_refused_naming_the_setting(
        compact in durations(), history in durations(), forget in durations(),
        quota in "[0-9]{0,22}(B|K|KiB|M|MiB|G|GiB|TB|)|\\PC{0,8}",
        endpoint in "(https?://)?[a-z0-9.:\\[\\]/@?#%-]{0,24}|\\PC{0,16}",
        prefix in "/?\\PC{0,12}",
    ) {
        let f = FileConfig {
            backend: Some(Backend::Etcd),
            etcd_endpoints: Some(vec![endpoint]),
            etcd_compact_every: Some(compact),
            etcd_history: Some(history),
            etcd_forget_after: Some(forget),
            etcd_quota: Some(quota),
            etcd_prefix: Some(prefix),
            ..base()
        };
        match Config::resolve(f) {
            Ok(c) => {
                check(&c)?;
                prop_assert!(c.etcd_prefix.starts_with('/'));
            }
            Err(ConfigError::Invalid { field, message }) => {
                prop_assert!(!field.is_empty() && !message.is_empty());
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    #[test]
    fn any_config_file_text_is_parsed_or_refused_without_panicking(
        text in "([a-z-]{1,20} = (\"\\PC{0,12}\"|[0-9]{1,5}|\\[\"[a-z:/.0-9]{0,20}\"\\]|true)\n){0,6}|\\PC{0,200}",
    ) {
        if let Ok(f) = toml::from_str::<FileConfig>(&text) {
            if let Ok(c) = Config::resolve(f.overlay(base())) {
                check(&c)?;
            }
        }
    }
}
