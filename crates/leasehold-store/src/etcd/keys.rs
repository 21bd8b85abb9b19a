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
//! | `P res/NAME` NUL `LEASE` | the holding host: session LEASE holds NAME | nothing: goes with its holder |
//!
//! A `held` key (the record's key, a NUL, the session's lease id: names hold no NUL, so the
//! range from `P res/NAME` to `P res/NAME` + 0x01 is exactly a record and its held keys, read
//! or compared as one) is written and deleted in the same transaction as the record that adds or
//! removes the session's last holder of NAME, so every held key's session is among the
//! record's holders. A record missing, or missing a holder, while a held key names its
//! session was changed outside leasehold: it is refused, not taken for free, even by a host
//! whose agent has not yet seen the holder's host fence its holder.
//! A held key is on no etcd lease (before, it was on its session's): a host that dies holding
//! many resources then costs etcd one small revoke, not one raft entry deleting a key per
//! resource, which held back the leader's apply and with it every host's renewals. Agents
//! of both kinds clear a held key with its holder, so they share a prefix.
//!
//! A record is JSON in format 2 ([`Record::encode`], [`RECORD_VERSION`]); format 1, written
//! before, still reads ([`Record::read`]), and an agent of format 1 refuses a format-2 record
//! whose events are references (docs/design.md, "Record encoding").
//!
//! `NAME` is the resource name with `%` and `/` percent-encoded, so that one resource's
//! waiter prefix never covers another's. A waiting request writes its keys for all its
//! resources in one transaction, so they share a create revision, which is the request's
//! place in every queue.

use leasehold_core::{
    Ended, Event, HostId, Lease, Mode, Owner, ResourceName, ResourceState, Time, Token,
};
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

/// The record encoding this agent writes: the version mark `"v":2`. See [`Record::encode`].
pub const RECORD_VERSION: u32 = 2;

/// An event of a version-2 record that another field of the record already says (issue 15:
/// the grant's copy of its holder was half of a record's bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum EventRef {
    /// `{"g":T}`: the lease of the holder with token T was granted.
    #[serde(rename = "g")]
    Granted(Token),
    /// `{"l":D}`: the lease in `last_ended` ended; D: it left the resource dirty.
    #[serde(rename = "l")]
    Ended(bool),
}

#[derive(Serialize)]
#[serde(untagged)]
enum EventOut<'a> {
    Ref(EventRef),
    Full(&'a Event),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum EventIn {
    Ref(EventRef),
    Full(Box<Event>),
}

/// A record as version 2 writes it: the fields of the first version at the same places
/// (`holders`, `last_token`, ... at the top), the version mark, and events by reference where
/// the record already holds them, with the resource's name once.
#[derive(Serialize)]
struct WireOut<'a> {
    v: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    n: Option<&'a ResourceName>,
    holders: &'a [Lease],
    last_token: Token,
    #[serde(skip_serializing_if = "Option::is_none")]
    dirty: Option<&'a Ended>,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_ended: Option<&'a Ended>,
    #[serde(skip_serializing_if = "Option::is_none")]
    blocked_until: Option<Time>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reserved_for: Option<u64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    events: Vec<EventOut<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    damaged: Option<&'a str>,
}

/// A record of either version, read without serde's `flatten` (which buffered every record
/// before decoding it: 8 % of an agent's CPU under load).
#[derive(Deserialize)]
struct WireIn {
    #[serde(default)]
    v: u32,
    #[serde(default)]
    n: Option<ResourceName>,
    holders: Vec<Lease>,
    last_token: Token,
    #[serde(default)]
    dirty: Option<Box<Ended>>,
    #[serde(default)]
    last_ended: Option<Box<Ended>>,
    #[serde(default)]
    blocked_until: Option<Time>,
    #[serde(default)]
    reserved_for: Option<u64>,
    #[serde(default)]
    events: Vec<EventIn>,
    #[serde(default)]
    damaged: Option<String>,
}

impl Record {
    /// The record as this agent writes it (version 2, [`RECORD_VERSION`]): JSON with the
    /// fields of version 1 in place and `"v":2`; a `Granted` event of a lease the record
    /// holds is `{"g":TOKEN}` and an `Ended` event of its `last_ended` is `{"l":DIRTIED}`,
    /// with the resource's name once in `"n"`. An agent of version 1 reads such events as
    /// events without their tag and refuses the record as not decoding (never as absent); a
    /// record without them means the same to both.
    ///
    /// # Errors
    /// What `serde_json` says (never for a record built by leasehold).
    pub fn encode(&self) -> Result<Vec<u8>, serde_json::Error> {
        let st = &self.state;
        let name = self.events.iter().find_map(|e| match e {
            Event::Granted { resource, .. } | Event::Ended { resource, .. } => Some(resource),
            _ => None,
        });
        let mut named = false;
        let events = self
            .events
            .iter()
            .map(|e| match e {
                Event::Granted { resource, lease }
                    if Some(resource) == name
                        && st.holders().iter().any(|h| h == lease)
                        && st
                            .holders()
                            .iter()
                            .filter(|h| h.token == lease.token)
                            .count()
                            == 1 =>
                {
                    named = true;
                    EventOut::Ref(EventRef::Granted(lease.token))
                }
                Event::Ended {
                    resource,
                    ended,
                    dirtied,
                } if Some(resource) == name && st.last_ended() == Some(ended) => {
                    named = true;
                    EventOut::Ref(EventRef::Ended(*dirtied))
                }
                e => EventOut::Full(e),
            })
            .collect();
        serde_json::to_vec(&WireOut {
            v: RECORD_VERSION,
            n: name.filter(|_| named),
            holders: st.holders(),
            last_token: st.last_token(),
            dirty: st.dirty(),
            last_ended: st.last_ended(),
            blocked_until: st.blocked_until(),
            reserved_for: self.reserved_for,
            events,
            damaged: self.damaged.as_deref(),
        })
    }

    /// Reads a stored record of either version. `Err` says why it cannot be trusted: it does
    /// not decode, it is a marker of a record that vanished while held, or it breaks the
    /// lease rules.
    pub fn decode(bytes: &[u8]) -> Result<Record, String> {
        let rec = Record::read(bytes)?;
        if let Some(d) = &rec.damaged {
            return Err(d.clone());
        }
        if let Some(v) = rec.state.violation() {
            return Err(format!("it breaks the lease rules: {v}"));
        }
        Ok(rec)
    }

    /// What can be read of a stored record, trusted or not (a marker, a record that breaks
    /// the lease rules): for repairing it. `Err` when it does not decode.
    pub fn read(bytes: &[u8]) -> Result<Record, String> {
        let w: WireIn = serde_json::from_slice(bytes).map_err(|e| {
            if bytes.is_empty() {
                "it is empty".to_owned()
            } else {
                format!("it does not decode ({e})")
            }
        })?;
        if w.v != 0 && w.v != RECORD_VERSION {
            return Err(format!(
                "it is in record format {} (this agent reads formats 1 and {RECORD_VERSION}): \
                 it was written by a newer leasehold; upgrade this agent",
                w.v
            ));
        }
        let bad = |why: String| Err(format!("it does not decode (record format 2: {why})"));
        let mut events = Vec::with_capacity(w.events.len());
        for e in w.events {
            let r = match e {
                EventIn::Full(e) => {
                    events.push(*e);
                    continue;
                }
                EventIn::Ref(r) => r,
            };
            if w.v != RECORD_VERSION {
                return bad(format!(
                    "an event by reference ({}) without the version mark \"v\":{RECORD_VERSION}",
                    serde_json::to_string(&r).unwrap_or_default()
                ));
            }
            let Some(resource) = w.n.clone() else {
                return bad("an event by reference without the resource's name \"n\"".into());
            };
            match r {
                EventRef::Granted(t) => {
                    // The encoder refers only to a token one holder has; two holders with
                    // one token were written outside leasehold, and the lease rules judge them.
                    let Some(lease) = w.holders.iter().find(|l| l.token == t) else {
                        return bad(format!(
                            "its granted event names token {t}, which none of its holders has"
                        ));
                    };
                    events.push(Event::Granted {
                        resource,
                        lease: lease.clone(),
                    });
                }
                EventRef::Ended(dirtied) => {
                    let Some(ended) = w.last_ended.as_deref() else {
                        return bad("its ended event refers to a last_ended it lacks".into());
                    };
                    events.push(Event::Ended {
                        resource,
                        ended: ended.clone(),
                        dirtied,
                    });
                }
            }
        }
        Ok(Record {
            state: ResourceState::from_parts(
                w.holders,
                w.last_token,
                w.dirty,
                w.last_ended,
                w.blocked_until,
            ),
            reserved_for: w.reserved_for,
            events,
            damaged: w.damaged,
        })
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

    use leasehold_core::{EndReason, SessionId, WallTime};

    fn lease(pid: u32, token: u64, mode: Mode) -> Lease {
        let mut owner = Owner::new(HostId::new("host-a").unwrap(), pid, 4_242);
        owner.command = Some("qemu".into());
        owner.uid = Some(107);
        Lease {
            owner,
            mode,
            token: Token(token),
            session: SessionId(7_587_889_012_345),
            granted_at: WallTime(1_764_790_000_000 + token),
        }
    }

    fn ended(l: &Lease, how: EndReason) -> Ended {
        Ended {
            owner: l.owner.clone(),
            mode: l.mode,
            token: l.token,
            granted_at: l.granted_at,
            ended_at: WallTime(l.granted_at.0 + 5),
            how,
        }
    }

    /// A record as a grant writes it: the holder, the lease before it ended, and the grant.
    fn granted_record() -> Record {
        let r = ResourceName::new("vm/disk 1.qcow2").unwrap();
        let before = lease(10, 41, Mode::Exclusive);
        let now = lease(11, 42, Mode::Exclusive);
        let last = ended(&before, EndReason::Released);
        Record {
            state: ResourceState::from_parts(
                vec![now.clone()],
                Token(42),
                None,
                Some(Box::new(last)),
                None,
            ),
            reserved_for: None,
            events: vec![Event::Granted {
                resource: r,
                lease: now,
            }],
            damaged: None,
        }
    }

    /// A record as a release writes it: nothing held, the ending twice (dirty, last ended).
    fn released_record() -> Record {
        let r = ResourceName::new("vm/disk 1.qcow2").unwrap();
        let l = lease(11, 42, Mode::Exclusive);
        let e = ended(&l, EndReason::ProcessDied);
        Record {
            state: ResourceState::from_parts(
                Vec::new(),
                Token(42),
                Some(Box::new(e.clone())),
                Some(Box::new(e.clone())),
                None,
            ),
            reserved_for: Some(9),
            events: vec![Event::Ended {
                resource: r,
                ended: e,
                dirtied: true,
            }],
            damaged: None,
        }
    }

    #[test]
    fn records_read_back_as_written_in_fewer_bytes() {
        for rec in [granted_record(), released_record()] {
            let compact = rec.encode().unwrap();
            let first = serde_json::to_vec(&rec).unwrap();
            assert_eq!(Record::decode(&compact), Ok(rec.clone()));
            // The events' copies are gone; the references, the name and the mark cost less
            // than 64 bytes.
            let copies = serde_json::to_vec(&rec.events).unwrap().len();
            assert!(
                compact.len() + copies <= first.len() + 64,
                "{} bytes, {} in the first format: {}",
                compact.len(),
                first.len(),
                String::from_utf8_lossy(&compact)
            );
        }
    }

    /// A record an agent of the first format wrote (this text, as `serde_json` wrote it then)
    /// still reads, and its events with it.
    #[test]
    fn a_record_of_the_first_format_still_reads() {
        let v1 = br#"{"holders":[{"owner":{"process":{"host":"host-a","pid":11,"start_time":4242},"uid":107,"command":"qemu"},"mode":"exclusive","token":42,"session":7587889012345,"granted_at":1764790000042}],"last_token":42,"last_ended":{"owner":{"process":{"host":"host-a","pid":10,"start_time":4242},"uid":107,"command":"qemu"},"mode":"exclusive","token":41,"granted_at":1764790000041,"ended_at":1764790000046,"how":"released"},"events":[{"event":"granted","resource":"vm/disk 1.qcow2","lease":{"owner":{"process":{"host":"host-a","pid":11,"start_time":4242},"uid":107,"command":"qemu"},"mode":"exclusive","token":42,"session":7587889012345,"granted_at":1764790000042}}]}"#;
        assert_eq!(Record::decode(v1), Ok(granted_record()));
        for rec in [granted_record(), released_record()] {
            assert_eq!(
                Record::decode(&serde_json::to_vec(&rec).unwrap()),
                Ok(rec.clone())
            );
        }
    }

    /// An agent of the first format decoded records with `Record`'s serde derive: it refuses
    /// a record of format 2 whose events are references (it reads no event as absent).
    #[test]
    fn an_agent_of_the_first_format_refuses_a_compact_record() {
        for rec in [granted_record(), released_record()] {
            let compact = rec.encode().unwrap();
            assert!(serde_json::from_slice::<Record>(&compact).is_err());
        }
    }

    #[test]
    fn a_corrupt_compact_record_is_refused_saying_why() {
        let good = String::from_utf8(granted_record().encode().unwrap()).unwrap();
        let cases = [
            (good.replace(r#""g":42"#, r#""g":41"#), "token 41"),
            (good.replace(r#""n":"vm/disk 1.qcow2","#, ""), "name"),
            (good.replace(r#""v":2"#, r#""v":3"#), "upgrade this agent"),
            (good.replace(r#""v":2,"#, ""), "version mark"),
            (good.replace(r#""g":42"#, r#""g":"x""#), "does not decode"),
            (good[..good.len() / 2].to_owned(), "does not decode"),
        ];
        for (bytes, why) in cases {
            assert_ne!(bytes, good);
            let e = Record::decode(bytes.as_bytes()).unwrap_err();
            assert!(e.contains(why), "{bytes}: {e}");
        }
        let released = String::from_utf8(released_record().encode().unwrap()).unwrap();
        let no_last = released.replace(r#""last_ended""#, r#""x""#);
        assert!(
            Record::decode(no_last.as_bytes())
                .unwrap_err()
                .contains("last_ended")
        );
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
        assert_eq!(Record::read(marker).unwrap().state.last_token().0, 3);
    }
}
