//! How leases look to people and to scripts (`--json`).

use std::time::Duration;

use leasehold_client::{Refusal, RefusalKind};
use leasehold_core::{EndReason, Ended, Lease, Owner, ResourceView};
use serde_json::{Value, json};

pub use leasehold_api::words::{
    ago, conflict, ended, escaped, lease, name, needs_escape, owner, tame, when,
};

/// The full message for a refused acquire, with what to do next.
pub fn refusal(r: &Refusal) -> String {
    let shown = r.resource.as_ref().map(name);
    let raw = r
        .resource
        .as_ref()
        .map(ToString::to_string)
        .unwrap_or_else(|| "the resource".into());
    match r.kind {
        RefusalKind::Busy | RefusalKind::TimedOut => {
            let head = match &r.conflict {
                Some(c) => conflict(c),
                None => escaped(&r.message),
            };
            let (head, wait) = if r.kind == RefusalKind::TimedOut {
                (
                    format!("timed out waiting: {head}"),
                    "to wait longer, raise the deadline (--wait=10m), or wait without one (--wait)",
                )
            } else {
                (head, "to wait for it, add --wait (or --wait=DURATION)")
            };
            let force = format!("leasehold force-release {} --reason '...'", quote(&raw));
            let force = if rustix::process::geteuid().is_root() {
                format!("if that holder is gone for good: {force}")
            } else {
                format!(
                    "if that holder is gone for good, an admin (root, or the agent's admin group) can run: {force}"
                )
            };
            format!("{head}\n  {wait}\n  {force}")
        }
        RefusalKind::NeedsCheck => {
            let name = shown.unwrap_or_else(|| "the resource".into());
            let why = r
                .dirty
                .as_ref()
                .map(|d| format!(": last writer was the {}", ended(d)))
                .unwrap_or_default();
            let (how, check) = check_advice(&raw);
            match &r.accept_dirty_needs {
                Some(who) => format!(
                    "{name} needs a check before use{why}\n  taking it dirty (--accept-dirty, run --check) needs {who}, and you are not\n  ask an admin to check it ({how}), then: leasehold mark-clean {q}",
                    q = quote(&raw)
                ),
                None => format!(
                    "{name} needs a check before use{why}\n  check it ({how}), then: leasehold mark-clean {q}\n  or let run check it first: leasehold run --check '{check}' --exclusive {q} -- ...\n  or take it anyway and check it yourself: add --accept-dirty",
                    q = quote(&raw)
                ),
            }
        }
        RefusalKind::ModeConflict | RefusalKind::Cancelled => escaped(&r.message),
    }
}

/// How to check a dirty resource, by what it looks like: a qcow2 image, a raw image, a block
/// device, or a name that is no file (`san/vm1-disk`). Returns the advice and a `run --check`
/// command for it.
pub fn check_advice(resource: &str) -> (String, &'static str) {
    use std::os::unix::fs::FileTypeExt;
    let q = quote(resource);
    let lower = resource.to_ascii_lowercase();
    let is_block = std::fs::metadata(resource).is_ok_and(|m| m.file_type().is_block_device());
    if lower.ends_with(".qcow2") || lower.ends_with(".qcow") {
        (
            format!("a qcow2 image: qemu-img check {q}"),
            "qemu-img check -q {path}",
        )
    } else if is_block {
        (
            format!(
                "a block device: check what is on it, e.g. a bare filesystem with fsck -n {q}; qemu-img check does not check raw data"
            ),
            "fsck -n {path}",
        )
    } else if resource.starts_with('/')
        || [".raw", ".img", ".iso"].iter().any(|e| lower.ends_with(e))
    {
        (
            format!(
                "a raw image has no format to check (qemu-img check exits 63 on it): check the filesystems inside it, e.g. virt-rescue --ro -a {q}, or fsck -n {q} if it holds a bare filesystem"
            ),
            "fsck -n {path}",
        )
    } else {
        (
            format!("{q} is not a file here: check it the way its writers require"),
            "YOUR-CHECK {path}",
        )
    }
}

/// `1 process`, `2 processes`.
pub fn count(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// Quotes a word for `/bin/sh`, when it needs it: single quotes, whatever it holds.
pub fn sh_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+:,@%=".contains(c))
    {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Quotes a word for a shell, when it needs it, to be shown. A word holding control characters is
/// written in bash's `$'...'` form, with each of them as an escape, so that it shows safely
/// and can still be pasted.
pub fn quote(s: &str) -> String {
    if !s.chars().any(needs_escape) {
        sh_quote(s)
    } else {
        let mut q = String::from("$'");
        for c in s.chars() {
            match c {
                '\'' | '\\' => {
                    q.push('\\');
                    q.push(c);
                }
                c if needs_escape(c) && (c as u32) < 0x80 => {
                    q.push_str(&format!("\\x{:02x}", c as u32))
                }
                c if needs_escape(c) => q.push_str(&format!("\\u{:04x}", c as u32)),
                c => q.push(c),
            }
        }
        q.push('\'');
        q
    }
}

// ---- JSON ----

fn owner_fields(o: &Owner) -> serde_json::Map<String, Value> {
    let mut m = serde_json::Map::new();
    m.insert("host".into(), json!(o.process.host.as_str()));
    m.insert("pid".into(), json!(o.process.pid));
    m.insert("start_time".into(), json!(o.process.start_time));
    m.insert("owner".into(), json!(o.label));
    m.insert("command".into(), json!(o.command));
    m.insert("uid".into(), json!(o.uid));
    m
}

/// A lease as JSON: host, pid, mode, token, owner (the label), and more.
pub fn lease_json(l: &Lease) -> Value {
    let mut m = owner_fields(&l.owner);
    m.insert("mode".into(), json!(l.mode.as_str()));
    m.insert("token".into(), json!(l.token.0));
    m.insert("since".into(), json!(when(l.granted_at)));
    m.insert("since_ms".into(), json!(l.granted_at.0));
    Value::Object(m)
}

/// How a lease ended, as JSON.
pub fn ended_json(e: &Ended) -> Value {
    let mut m = owner_fields(&e.owner);
    m.insert("mode".into(), json!(e.mode.as_str()));
    m.insert("token".into(), json!(e.token.0));
    m.insert("how".into(), json!(leasehold_api::how_word(&e.how)));
    m.insert("granted_at".into(), json!(when(e.granted_at)));
    m.insert("ended_at".into(), json!(when(e.ended_at)));
    m.insert("ended_at_ms".into(), json!(e.ended_at.0));
    match &e.how {
        EndReason::ReleasedDirty { note } => {
            m.insert("note".into(), json!(note));
        }
        EndReason::Forced { reason, by } => {
            m.insert("reason".into(), json!(reason));
            m.insert("by".into(), json!(by));
        }
        EndReason::HandedOver { to } => {
            m.insert(
                "to".into(),
                json!({"host": to.host.as_str(), "pid": to.pid, "start_time": to.start_time}),
            );
        }
        _ => {}
    }
    Value::Object(m)
}

/// A resource as JSON (SPEC §6): resource, dirty, holders, and how the last lease ended.
pub fn view_json(v: &ResourceView) -> Value {
    json!({
        "resource": v.resource.as_str(),
        "dirty": v.dirty.is_some(),
        "holders": v.holders.iter().map(|l| {
            let mut j = lease_json(l);
            j["stuck"] = json!(v.stuck.contains(&l.owner.process));
            j
        }).collect::<Vec<_>>(),
        "waiters": v.waiters.iter().map(|w| {
            let mut m = owner_fields(&w.owner);
            m.insert("mode".into(), json!(w.mode.as_str()));
            Value::Object(m)
        }).collect::<Vec<_>>(),
        "dirty_record": v.dirty.as_ref().map(ended_json),
        "last_ended": v.last_ended.as_ref().map(ended_json),
        "last_token": v.last_token.0,
        "blocked_for_ms": v.blocked_for.map(|d| d.as_millis() as u64),
        "handover_pending": v.handover_pending,
        "damaged": v.damaged,
    })
}

/// What a stuck holder is, for people (`list`, `inspect`).
pub const STUCK: &str = "its holder died and what it started survives SIGKILL (see leasehold status): held until that is gone";

/// A resource for people, over several lines.
pub fn view_text(v: &ResourceView) -> String {
    let mut s = format!("{}\n", name(&v.resource));
    let state = match (&v.dirty, v.holders.is_empty()) {
        _ if v.damaged.is_some() => "damaged: refused to everyone until repaired".to_owned(),
        (Some(_), _) => "dirty: needs a check before use".to_owned(),
        (None, true) => "free, clean".to_owned(),
        (None, false) => "held, clean".to_owned(),
    };
    s.push_str(&format!("  state:    {state}\n"));
    if let Some(d) = &v.damaged {
        s.push_str(&format!("  damaged:  {}\n", escaped(d)));
    }
    if let Some(d) = &v.dirty {
        s.push_str(&format!("  dirty by: {}\n", ended(d)));
    }
    if v.holders.is_empty() {
        s.push_str("  holders:  none\n");
    }
    for l in &v.holders {
        s.push_str(&format!("  holder:   {}\n", lease(l)));
        if v.stuck.contains(&l.owner.process) {
            s.push_str(&format!("  stuck:    {STUCK}\n"));
        }
    }
    for (i, w) in v.waiters.iter().enumerate() {
        s.push_str(&format!(
            "  waiting:  {}. {} for {}\n",
            i + 1,
            owner(&w.owner),
            w.mode
        ));
    }
    if v.handover_pending {
        s.push_str("  handover: in progress\n");
    }
    if let Some(d) = v.blocked_for {
        s.push_str(&format!(
            "  grace:    unavailable for {} more (its holder's host was lost)\n",
            humantime::format_duration(Duration::from_secs(d.as_secs().max(1)))
        ));
    }
    if let Some(e) = &v.last_ended {
        s.push_str(&format!("  last:     {}\n", ended(e)));
    }
    s.push_str(&format!("  tokens:   last granted {}\n", v.last_token));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_for_shells() {
        assert_eq!(quote("/srv/vm1.qcow2"), "/srv/vm1.qcow2");
        assert_eq!(quote("a b"), "'a b'");
        assert_eq!(quote("it's"), r"'it'\''s'");
        assert_eq!(quote(""), "''");
        assert_eq!(quote("a\x1b[31mb\n'"), r"$'a\x1b[31mb\x0a\''");
    }

    #[test]
    fn control_characters_never_reach_the_terminal_raw() {
        assert_eq!(escaped("vm\x1b[31m\nx"), r"vm\u{1b}[31m\nx");
        assert_eq!(escaped("plain/name"), "plain/name");
        assert_eq!(escaped("\u{202e}evil"), r"\u{202e}evil");
        assert_eq!(tame("a\n  b\x1b\r"), "a\n  b\\u{1b}\\r");
    }
}
