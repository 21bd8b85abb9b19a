//! The gRPC API (feature `grpc`): the messages generated from `proto/leasehold.proto` and their
//! conversions to and from leasehold-core. Only the agent's gRPC front end uses them; clients
//! speak HTTP/JSON (`v1`).

use std::time::Duration;

use leasehold_core::{
    Conflict, EndReason, Ended, Grant, HostId, Lease, Mode, OnExit, Owner, ProcessKey, Released,
    ResourceName, ResourceView, SessionId, Token, WaiterView, WallTime,
};

use crate::{WireError, how_word};

/// The generated protobuf messages and gRPC client and server.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("leasehold.v1");
}

impl From<Mode> for pb::Mode {
    fn from(m: Mode) -> Self {
        match m {
            Mode::Exclusive => pb::Mode::Exclusive,
            Mode::Shared => pb::Mode::Shared,
        }
    }
}

/// The core mode of a wire mode number.
///
/// # Errors
/// [`WireError::Unknown`] for an unspecified or unknown mode.
pub fn mode_from_wire(m: i32) -> Result<Mode, WireError> {
    match pb::Mode::try_from(m) {
        Ok(pb::Mode::Exclusive) => Ok(Mode::Exclusive),
        Ok(pb::Mode::Shared) => Ok(Mode::Shared),
        _ => Err(WireError::Unknown {
            what: "mode",
            value: m.to_string(),
        }),
    }
}

impl From<&Owner> for pb::Owner {
    fn from(o: &Owner) -> Self {
        pb::Owner {
            host: o.process.host.to_string(),
            pid: o.process.pid,
            start_time: o.process.start_time,
            label: o.label.clone(),
            uid: o.uid,
            command: o.command.clone(),
            restricted: o.restricted,
            on_exit: match o.on_exit {
                OnExit::Dirty => String::new(),
                other => other.as_str().to_owned(),
            },
        }
    }
}

impl TryFrom<pb::Owner> for Owner {
    type Error = WireError;
    fn try_from(o: pb::Owner) -> Result<Self, WireError> {
        let owner = Owner {
            process: ProcessKey {
                host: HostId::new(o.host)?,
                pid: o.pid,
                start_time: o.start_time,
            },
            // The gRPC API is being retired and carries no owner id.
            id: None,
            label: o.label,
            uid: o.uid,
            command: o.command,
            restricted: o.restricted,
            on_exit: if o.on_exit.is_empty() {
                OnExit::Dirty
            } else {
                OnExit::parse(&o.on_exit).ok_or_else(|| WireError::Unknown {
                    what: "on_exit (dirty or status)",
                    value: o.on_exit.clone(),
                })?
            },
            // The gRPC API is being retired and carries no on_lost.
            on_lost: leasehold_core::OnLost::Kill,
        };
        owner.validate()?;
        Ok(owner)
    }
}

fn owner_of(o: Option<pb::Owner>) -> Result<Owner, WireError> {
    Owner::try_from(o.ok_or(WireError::Missing("owner"))?)
}

impl From<&Lease> for pb::Lease {
    fn from(l: &Lease) -> Self {
        pb::Lease {
            owner: Some((&l.owner).into()),
            mode: pb::Mode::from(l.mode).into(),
            token: l.token.0,
            granted_at_ms: l.granted_at.0,
        }
    }
}

impl TryFrom<pb::Lease> for Lease {
    type Error = WireError;
    fn try_from(l: pb::Lease) -> Result<Self, WireError> {
        Ok(Lease {
            owner: owner_of(l.owner)?,
            mode: mode_from_wire(l.mode)?,
            token: Token(l.token),
            // Sessions are the agent's business; clients see leases without them.
            session: SessionId(0),
            granted_at: WallTime(l.granted_at_ms),
        })
    }
}

impl From<&Ended> for pb::Ended {
    fn from(e: &Ended) -> Self {
        let (note, by, to) = match &e.how {
            EndReason::ReleasedDirty { note } => (note.clone(), None, None),
            EndReason::Forced { reason, by } => (Some(reason.clone()), Some(by.clone()), None),
            EndReason::HandedOver { to } => (
                None,
                None,
                Some(pb::Owner {
                    host: to.host.to_string(),
                    pid: to.pid,
                    start_time: to.start_time,
                    ..Default::default()
                }),
            ),
            _ => (None, None, None),
        };
        pb::Ended {
            owner: Some((&e.owner).into()),
            mode: pb::Mode::from(e.mode).into(),
            token: e.token.0,
            granted_at_ms: e.granted_at.0,
            ended_at_ms: e.ended_at.0,
            how: how_word(&e.how).to_owned(),
            note,
            by,
            to,
        }
    }
}

impl TryFrom<pb::Ended> for Ended {
    type Error = WireError;
    fn try_from(e: pb::Ended) -> Result<Self, WireError> {
        let how = match e.how.as_str() {
            "released" => EndReason::Released,
            "released-dirty" => EndReason::ReleasedDirty { note: e.note },
            "process-died" => EndReason::ProcessDied,
            "exited-clean" => EndReason::ExitedClean,
            "session-expired" => EndReason::SessionExpired,
            "fenced" => EndReason::Fenced,
            "forced" => EndReason::Forced {
                reason: e.note.unwrap_or_default(),
                by: e.by.unwrap_or_default(),
            },
            "handed-over" => EndReason::HandedOver {
                to: owner_of(e.to)?.process,
            },
            other => {
                return Err(WireError::Unknown {
                    what: "ending",
                    value: other.to_owned(),
                });
            }
        };
        Ok(Ended {
            owner: owner_of(e.owner)?,
            mode: mode_from_wire(e.mode)?,
            token: Token(e.token),
            granted_at: WallTime(e.granted_at_ms),
            ended_at: WallTime(e.ended_at_ms),
            how,
        })
    }
}

impl From<&Grant> for pb::Grant {
    fn from(g: &Grant) -> Self {
        pb::Grant {
            resource: g.resource.to_string(),
            mode: pb::Mode::from(g.mode).into(),
            token: g.token.0,
            dirty: g.dirty.as_ref().map(Into::into),
            existing: g.existing,
        }
    }
}

impl TryFrom<pb::Grant> for Grant {
    type Error = WireError;
    fn try_from(g: pb::Grant) -> Result<Self, WireError> {
        Ok(Grant {
            resource: ResourceName::new(g.resource)?,
            mode: mode_from_wire(g.mode)?,
            token: Token(g.token),
            dirty: g.dirty.map(Ended::try_from).transpose()?,
            existing: g.existing,
        })
    }
}

/// The wire form of a conflict.
pub fn conflict_to_wire(c: &Conflict) -> pb::Conflict {
    pb::Conflict {
        resource: c.resource.to_string(),
        holders: c.holders.iter().map(Into::into).collect(),
        waiting: u32::try_from(c.waiting).unwrap_or(u32::MAX),
        blocked_for_ms: c.blocked_for.map(millis),
        handover_pending: c.reserved,
    }
}

/// The core form of a wire conflict.
///
/// # Errors
/// [`WireError`] for invalid names or owners.
pub fn conflict_from_wire(c: pb::Conflict) -> Result<Conflict, WireError> {
    Ok(Conflict {
        resource: ResourceName::new(c.resource)?,
        holders: c
            .holders
            .into_iter()
            .map(Lease::try_from)
            .collect::<Result<_, _>>()?,
        waiting: c.waiting as usize,
        blocked_for: c.blocked_for_ms.map(Duration::from_millis),
        reserved: c.handover_pending,
    })
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl From<&ResourceView> for pb::Resource {
    fn from(v: &ResourceView) -> Self {
        pb::Resource {
            resource: v.resource.to_string(),
            holders: v.holders.iter().map(Into::into).collect(),
            dirty: v.dirty.as_ref().map(Into::into),
            last_ended: v.last_ended.as_ref().map(Into::into),
            last_token: v.last_token.0,
            waiters: v
                .waiters
                .iter()
                .map(|w| pb::Waiter {
                    owner: Some((&w.owner).into()),
                    mode: pb::Mode::from(w.mode).into(),
                })
                .collect(),
            blocked_for_ms: v.blocked_for.map(millis),
            handover_pending: v.handover_pending,
            damaged: v.damaged.clone(),
        }
    }
}

impl TryFrom<pb::Resource> for ResourceView {
    type Error = WireError;
    fn try_from(r: pb::Resource) -> Result<Self, WireError> {
        Ok(ResourceView {
            resource: ResourceName::new(r.resource)?,
            holders: r
                .holders
                .into_iter()
                .map(Lease::try_from)
                .collect::<Result<_, _>>()?,
            dirty: r.dirty.map(Ended::try_from).transpose()?,
            last_ended: r.last_ended.map(Ended::try_from).transpose()?,
            last_token: Token(r.last_token),
            waiters: r
                .waiters
                .into_iter()
                .map(|w| {
                    Ok(WaiterView {
                        owner: owner_of(w.owner)?,
                        mode: mode_from_wire(w.mode)?,
                    })
                })
                .collect::<Result<_, WireError>>()?,
            blocked_for: r.blocked_for_ms.map(Duration::from_millis),
            handover_pending: r.handover_pending,
            damaged: r.damaged,
        })
    }
}

impl From<&Released> for pb::Released {
    fn from(r: &Released) -> Self {
        pb::Released {
            resource: r.resource.to_string(),
            ended: Some((&r.ended).into()),
            dirtied: r.dirtied,
        }
    }
}

impl TryFrom<pb::Released> for Released {
    type Error = WireError;
    fn try_from(r: pb::Released) -> Result<Self, WireError> {
        Ok(Released {
            resource: ResourceName::new(r.resource)?,
            ended: Ended::try_from(r.ended.ok_or(WireError::Missing("ended"))?)?,
            dirtied: r.dirtied,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner() -> Owner {
        let mut o = Owner::new(HostId::new("h1").unwrap(), 10, 20).with_label("vm");
        o.uid = Some(0);
        o.command = Some("qemu-io".into());
        o
    }

    #[test]
    fn endings_round_trip() {
        let to = Owner::new(HostId::new("h2").unwrap(), 11, 21).process;
        for how in [
            EndReason::Released,
            EndReason::ReleasedDirty {
                note: Some("exit 3".into()),
            },
            EndReason::ProcessDied,
            EndReason::SessionExpired,
            EndReason::Forced {
                reason: "hung".into(),
                by: "root".into(),
            },
            EndReason::HandedOver { to },
        ] {
            let e = Ended {
                owner: owner(),
                mode: Mode::Exclusive,
                token: Token(5),
                granted_at: WallTime(1),
                ended_at: WallTime(2),
                how,
            };
            assert_eq!(Ended::try_from(pb::Ended::from(&e)).unwrap(), e);
        }
    }

    #[test]
    fn invalid_wire_values_are_refused() {
        let mut w = pb::Owner::from(&owner());
        w.host = "no/slash".into();
        assert!(Owner::try_from(w).is_err());
        assert!(mode_from_wire(0).is_err());
        assert!(mode_from_wire(9).is_err());
        let g = pb::Grant {
            resource: String::new(),
            mode: 1,
            token: 1,
            dirty: None,
            existing: false,
        };
        assert!(Grant::try_from(g).is_err());
    }
}
