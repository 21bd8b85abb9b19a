//! Leases in words, for people: the agent's messages and the CLI's output say things the
//! same way. Text from outside (names, labels, commands) is escaped so that nothing in it
//! can colour a terminal or forge a log line.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use leasehold_core::{Conflict, EndReason, Ended, Lease, Owner, ResourceName, WallTime};

/// Whether `c` must not reach a terminal or a log line raw: control characters (which move
/// the cursor, colour the terminal, or start a new line) and those that reorder text.
pub fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// Text from outside (a name, label, command or reason) made safe to show on one line: each
/// control character appears as its escape (`\n`, `\u{1b}`), so nothing in a name can colour
/// the terminal, move the cursor or forge a line.
pub fn escaped(s: &str) -> String {
    if !s.chars().any(needs_escape) {
        return s.to_owned();
    }
    s.chars()
        .map(|c| {
            if needs_escape(c) {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// A resource name, safe to show (see [`escaped`]).
pub fn name(r: &ResourceName) -> String {
    escaped(r.as_str())
}

/// A whole message, safe to print: as [`escaped`], but its own line breaks and indents stay.
/// Everything printed goes through this, after names were escaped where they appear.
pub fn tame(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(|c| needs_escape(c) && c != '\n' && c != '\t') {
        return s.into();
    }
    s.split('\n')
        .map(escaped)
        .collect::<Vec<_>>()
        .join("\n")
        .into()
}

/// A wall-clock time as RFC 3339 (UTC, seconds).
pub fn when(t: WallTime) -> String {
    let at = UNIX_EPOCH + Duration::from_millis(t.0);
    humantime::format_rfc3339_seconds(at).to_string()
}

/// How long ago `t` was, rounded to seconds ("3m 12s").
pub fn ago(t: WallTime) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let secs = now.saturating_sub(t.0) / 1000;
    humantime::format_duration(Duration::from_secs(secs)).to_string()
}

/// `pid 4242 (qemu-io) on node1 [vm-42]`
pub fn owner(o: &Owner) -> String {
    let mut s = format!("pid {}", o.process.pid);
    if let Some(c) = &o.command {
        s.push_str(&format!(" ({})", escaped(c)));
    }
    s.push_str(&format!(" on {}", o.process.host));
    if let Some(l) = &o.label {
        s.push_str(&format!(" [{}]", escaped(l)));
    }
    s
}

/// `exclusive by pid 4242 (qemu-io) on node1 [vm-42], token 17, since ... (3m ago)`
pub fn lease(l: &Lease) -> String {
    format!(
        "{} by {}, token {}, since {} ({} ago)",
        l.mode,
        owner(&l.owner),
        l.token,
        when(l.granted_at),
        ago(l.granted_at)
    )
}

/// How a lease ended, in words, with when.
pub fn ended(e: &Ended) -> String {
    let how = match &e.how {
        EndReason::HandedOver { to } => format!("handed over to pid {} on {}", to.pid, to.host),
        other => escaped(&other.describe()),
    };
    format!(
        "{} lease of {}, token {}: {} at {} ({} ago)",
        e.mode,
        owner(&e.owner),
        e.token,
        how,
        when(e.ended_at),
        ago(e.ended_at)
    )
}

/// Who is in the way, on one line.
pub fn conflict(c: &Conflict) -> String {
    let mut s = match c.holders.as_slice() {
        [] if c.reserved => format!(
            "{} is being handed over to another owner",
            name(&c.resource)
        ),
        [] => match c.blocked_for {
            Some(d) => format!(
                "{} is in its grace period after its holder's host was lost ({} left)",
                name(&c.resource),
                humantime::format_duration(Duration::from_secs(d.as_secs().max(1)))
            ),
            None => format!(
                "{} is promised to owners who waited longer",
                name(&c.resource)
            ),
        },
        [one] => format!("{} is held {}", name(&c.resource), lease(one)),
        [one, rest @ ..] => format!(
            "{} is held {} and by {} more",
            name(&c.resource),
            lease(one),
            rest.len()
        ),
    };
    if c.waiting > 0 {
        s.push_str(&format!("; {} waiting", c.waiting));
    }
    s
}
