//! Where the etcd store keeps things, and in what shape.
//!
//! Under a prefix `P` (default `/leasehold/`):
//!
//! | key | value | attached to |
//! |---|---|---|
//! | `P hosts/HOST` | [`HostValue`]: the agent's session | the host's session lease |
//! | `P res/NAME` | [`Record`]: holders, last token, dirty mark, reservation | nothing: durable |
//! | `P wait/NAME/HOST-N` | [`WaiterValue`]: a waiting request | the waiter's session lease |
//! | `P grace/NAME` | empty: NAME is in its grace after a host was lost | a lease of TTL `grace` |
//! | `P res/NAME` NUL `LEASE` | the holding host: session LEASE holds NAME | that session's lease |
//!
//! A `held` key (the record's key, a NUL, the session's lease id: names hold no NUL, so the
//! range from `P res/NAME` to `P res/NAME` + 0x01 is exactly a record and its held keys, read
//! or compared as one) is written and deleted in the same transaction as the record that adds or
//! removes the session's last holder of NAME, so every held key's session is among the
//! record's holders. A record missing, or missing a holder, while a held key names its
//! session was changed outside leasehold: it is refused, not taken for free, even by a host
//! whose agent has not yet seen the holder's host fence its holder.
//!
//! `NAME` is the resource name with `%` and `/` percent-encoded, so that one resource's
//! waiter prefix never covers another's. A waiting request writes its keys for all its
//! resources in one transaction, so they share a create revision, which is the request's
//! place in every queue.

use leasehold_core::{Event, HostId, Mode, Owner, ResourceName, ResourceState};
use serde::{Deserialize, Serialize};

use super::client::LeaseId;

/// The keys of one store prefix.
#[derive(Debug, Clone, Default)]
pub struct Keys {
    prefix: String,
}

fn enc(name: &ResourceName) -> String {
    let mut s = String::with_capacity(name.as_str().len());
    for c in name.as_str().chars() {
        match c {
            '%' => s.push_str("%25"),
            '/' => s.push_str("%2F"),
            c => s.push(c),
        }
    }
    s
}

fn dec(s: &str) -> Option<ResourceName> {
    // `enc` never leaves a '/': a key with one was not written by leasehold, and would be
    // a second key for the resource (`a/b` beside `a%2Fb`).
    if s.contains('/') {
        return None;
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('%') {
        out.push_str(&rest[..i]);
        match rest.get(i..i + 3) {
            Some("%25") => out.push('%'),
            Some("%2F") => out.push('/'),
            _ => return None,
        }
        rest = &rest[i + 3..];
    }
    out.push_str(rest);
    ResourceName::new(out).ok()
}

impl Keys {
    /// The keys under `prefix` (a `/` is added if it lacks one).
    pub fn new(prefix: &str) -> Keys {
        let mut prefix = prefix.to_owned();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        Keys { prefix }
    }

    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `P hosts/`
    pub fn hosts(&self) -> Vec<u8> {
        format!("{}hosts/", self.prefix).into_bytes()
    }

    /// `P hosts/HOST`
    pub fn host(&self, host: &HostId) -> Vec<u8> {
        format!("{}hosts/{host}", self.prefix).into_bytes()
    }

    /// `P res/`
    pub fn resources(&self) -> Vec<u8> {
        format!("{}res/", self.prefix).into_bytes()
    }

    /// `P res/NAME`
    pub fn resource(&self, r: &ResourceName) -> Vec<u8> {
        format!("{}res/{}", self.prefix, enc(r)).into_bytes()
    }

    /// `P wait/`
    pub fn all_waiters(&self) -> Vec<u8> {
        format!("{}wait/", self.prefix).into_bytes()
    }

    /// `P wait/NAME/`
    pub fn waiters(&self, r: &ResourceName) -> Vec<u8> {
        format!("{}wait/{}/", self.prefix, enc(r)).into_bytes()
    }

    /// `P wait/NAME/HOST-N`
    pub fn waiter(&self, r: &ResourceName, host: &HostId, n: u64) -> Vec<u8> {
        format!("{}wait/{}/{host}-{n}", self.prefix, enc(r)).into_bytes()
    }

    /// `P grace/`
    pub fn graces(&self) -> Vec<u8> {
        format!("{}grace/", self.prefix).into_bytes()
    }

    /// `P grace/NAME`
    pub fn grace(&self, r: &ResourceName) -> Vec<u8> {
        format!("{}grace/{}", self.prefix, enc(r)).into_bytes()
    }

    /// The end of the range holding `P res/NAME` and its held keys, and nothing else.
    pub fn resource_end(&self, r: &ResourceName) -> Vec<u8> {
        format!("{}res/{}\u{1}", self.prefix, enc(r)).into_bytes()
    }

    /// `P res/NAME` NUL: the prefix of NAME's held keys.
    pub fn held_of(&self, r: &ResourceName) -> Vec<u8> {
        format!("{}res/{}\0", self.prefix, enc(r)).into_bytes()
    }

    /// `P res/NAME` NUL `LEASE`: session LEASE holds NAME.
    pub fn held(&self, r: &ResourceName, lease: LeaseId) -> Vec<u8> {
        format!("{}res/{}\0{}", self.prefix, enc(r), lease.0).into_bytes()
    }

    /// What a key under the prefix is.
    pub fn parse(&self, key: &[u8]) -> Option<KeyKind> {
        let s = std::str::from_utf8(key).ok()?.strip_prefix(&self.prefix)?;
        if let Some(h) = s.strip_prefix("hosts/") {
            return HostId::new(h).ok().map(KeyKind::Host);
        }
        if let Some(r) = s.strip_prefix("res/") {
            if let Some((r, lease)) = r.split_once('\0') {
                // Only the form `held` writes: "+5" or "05" would be a second key for one.
                let lease = lease
                    .parse::<i64>()
                    .ok()
                    .filter(|l| l.to_string() == lease)?;
                return dec(r).map(|r| KeyKind::Held(r, LeaseId(lease)));
            }
            return dec(r).map(KeyKind::Resource);
        }
        if let Some(r) = s.strip_prefix("grace/") {
            return dec(r).map(KeyKind::Grace);
        }
        if let Some(w) = s.strip_prefix("wait/") {
            let (r, _) = w.split_once('/')?;
            return dec(r).map(KeyKind::Waiter);
        }
        None
    }
}

/// What a key is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyKind {
    /// A host's session key.
    Host(HostId),
    /// A resource record.
    Resource(ResourceName),
    /// A waiter key of this resource.
    Waiter(ResourceName),
    /// The grace key of this resource.
    Grace(ResourceName),
    /// A session (etcd lease id) holds this resource.
    Held(ResourceName, LeaseId),
}

/// A host's session, as its key holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostValue {
    /// The host.
    pub host: HostId,
    /// Its session: the etcd lease the key is attached to.
    pub lease: LeaseId,
    /// The agent's pid, for people.
    pub pid: u32,
    /// When the session began, Unix milliseconds.
    pub since_ms: u64,
}

/// A resource record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Holders, last token, dirty mark, last ending. Sessions are etcd lease ids; the grace is
    /// not here but in the grace key.
    #[serde(flatten)]
    pub state: ResourceState,
    /// A handover in progress: the resource is kept for this waiting request (its create
    /// revision).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reserved_for: Option<u64>,
    /// What the transaction that wrote this version did to the resource, for watchers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<Event>,
    /// Set on a marker left where a record vanished while held: why the resource is refused.
    /// `state` then keeps the holders last seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub damaged: Option<String>,
}

impl Record {
    /// Reads a stored record. `Err` says why it cannot be trusted: it does not decode, it
    /// is a marker of a record that vanished while held, or it breaks the lease rules.
    pub fn decode(bytes: &[u8]) -> Result<Record, String> {
        let rec: Record = serde_json::from_slice(bytes).map_err(|e| {
            if bytes.is_empty() {
                "it is empty".to_owned()
            } else {
                format!("it does not decode ({e})")
            }
        })?;
        if let Some(d) = &rec.damaged {
            return Err(d.clone());
        }
        if let Some(v) = rec.state.violation() {
            return Err(format!("it breaks the lease rules: {v}"));
        }
        Ok(rec)
    }
}

/// A waiting request, as each of its keys holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaiterValue {
    /// Who waits.
    pub owner: Owner,
    /// Its host's session (etcd lease id).
    pub session: LeaseId,
    /// Everything it waits for.
    pub items: Vec<(ResourceName, Mode)>,
    /// Whether it accepts a dirty resource.
    pub accept_dirty: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_with_slashes_do_not_share_prefixes() {
        let k = Keys::new("/lh");
        let a = ResourceName::new("a").unwrap();
        let ab = ResourceName::new("a/b").unwrap();
        let pa = k.waiters(&a);
        assert!(
            !k.waiter(&ab, &HostId::new("h").unwrap(), 1)
                .starts_with(&pa)
        );
        for name in ["a", "a/b", "50%/x", "/srv/vm 1.qcow2", "ü/%2F"] {
            let r = ResourceName::new(name).unwrap();
            assert_eq!(k.parse(&k.resource(&r)), Some(KeyKind::Resource(r.clone())));
            assert_eq!(
                k.parse(&k.waiter(&r, &HostId::new("h").unwrap(), 7)),
                Some(KeyKind::Waiter(r.clone()))
            );
            assert_eq!(k.parse(&k.grace(&r)), Some(KeyKind::Grace(r.clone())));
            let l = LeaseId(42);
            assert_eq!(k.parse(&k.held(&r, l)), Some(KeyKind::Held(r.clone(), l)));
            assert!(k.held(&r, l).starts_with(&k.held_of(&r)));
            assert!(k.held(&r, LeaseId(i64::MAX)) < k.resource_end(&r));
            assert!(k.resource(&r) < k.held(&r, LeaseId(1)));
        }
        assert_eq!(
            k.parse(b"/lh/hosts/n1"),
            Some(KeyKind::Host(HostId::new("n1").unwrap()))
        );
        assert_eq!(k.parse(b"/other/res/x"), None);
    }

    #[test]
    fn records_that_cannot_be_trusted_say_why() {
        assert!(
            Record::decode(b"junk")
                .unwrap_err()
                .contains("does not decode")
        );
        assert!(Record::decode(b"").unwrap_err().contains("empty"));
        let good = br#"{"holders":[],"last_token":3}"#;
        assert_eq!(Record::decode(good).unwrap().state.last_token().0, 3);
        let marker = br#"{"holders":[],"last_token":3,"damaged":"gone while held"}"#;
        assert_eq!(Record::decode(marker).unwrap_err(), "gone while held");
    }
}
