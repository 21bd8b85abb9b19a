//! The image-cache scenario: VM spawns hold shared leases on a cache directory while an
//! ageing job waits for an exclusive one to delete it. The directory is never deleted while a
//! spawn uses it, a spawn arriving after the ageing job waits behind it, and the job runs once
//! the spawns are gone.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;

#[test]
fn the_cache_is_aged_only_when_no_spawn_uses_it() {
    let a = Agent::start();
    let d = a.path("work");
    std::fs::create_dir_all(&d).unwrap();
    let cache = d.join("image-cache");
    std::fs::create_dir_all(&cache).unwrap();
    std::fs::write(cache.join("base.qcow2"), b"base image").unwrap();
    let log = d.join("log");

    // A spawn: holds the cache shared, and checks every 20 ms that its image is there, until
    // told to stop.
    let spawn = |name: &str| {
        let script = format!(
            "touch {d}/{name}.started; while [ ! -f {d}/{name}.stop ]; do \
               cat {c}/base.qcow2 > /dev/null 2>&1 || echo '{name}: image missing' >> {log}; \
               sleep 0.02; done; date +%s%N > {d}/{name}.ended",
            d = d.display(),
            c = cache.display(),
            log = log.display()
        );
        a.cli()
            .args(["run", "--path", "--wait", "--shared"])
            .arg(&cache)
            .args(["--", "sh", "-c", &script])
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let started = |name: &str| d.join(format!("{name}.started")).exists();
    let s1 = spawn("s1");
    let s2 = spawn("s2");
    wait_until("both spawns run", Duration::from_secs(10), || {
        started("s1") && started("s2")
    });

    // The ageing job waits for an exclusive lease, then deletes the cache.
    let age_script = format!(
        "date +%s%N > {d}/aged.at; rm -rf {c}",
        d = d.display(),
        c = cache.display()
    );
    let ager = a
        .cli()
        .args(["run", "--path", "--wait", "--exclusive"])
        .arg(&cache)
        .args(["--", "sh", "-c", &age_script])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let name = std::fs::canonicalize(&cache).unwrap();
    let name = name.to_str().unwrap();
    wait_until("the ageing job waits", Duration::from_secs(10), || {
        a.inspect(name)
            .is_some_and(|v| v["waiters"].as_array().unwrap().len() == 1)
    });
    // A spawn arriving now waits behind the ageing job (no starvation of the writer).
    let s3 = spawn("s3");
    wait_until("the late spawn queues", Duration::from_secs(10), || {
        a.inspect(name)
            .is_some_and(|v| v["waiters"].as_array().unwrap().len() == 2)
    });
    assert!(
        !started("s3"),
        "a later spawn must not pass the waiting ageing job"
    );
    assert!(cache.exists(), "aged while spawns used it");

    std::fs::write(d.join("s1.stop"), b"").unwrap();
    std::fs::write(d.join("s2.stop"), b"").unwrap();
    for mut s in [s1, s2] {
        assert!(s.wait().unwrap().success());
    }
    let out = ager.wait_with_output().unwrap();
    expect_code(&out, 0);
    assert!(!cache.exists(), "the ageing job ran");
    let read = |f: &str| -> u128 {
        std::fs::read_to_string(d.join(f))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let aged = read("aged.at");
    assert!(aged > read("s1.ended") && aged > read("s2.ended"));
    // The late spawn ran after the ageing job (and found no image: the cache is rebuilt by
    // whatever spawns VMs; here it just reports).
    wait_until("the late spawn runs", Duration::from_secs(10), || {
        started("s3")
    });
    std::fs::write(d.join("s3.stop"), b"").unwrap();
    let mut s3 = s3;
    s3.wait().unwrap();
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        !log.contains("s1:") && !log.contains("s2:"),
        "the cache vanished under a spawn: {log}"
    );
}
