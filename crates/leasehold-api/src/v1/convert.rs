//! Conversions between the API's JSON types and `leasehold-core`'s: infallible from core,
//! validating every name and field into core ([`WireError`]).

use leasehold_core as lh;
use leasehold_core::{HostId, ProcessKey, ResourceName, SessionId, Token, WallTime};

use super::*;
use crate::WireError;

impl From<lh::Mode> for Mode {
    fn from(m: lh::Mode) -> Mode {
        match m {
            lh::Mode::Exclusive => Mode::Exclusive,
            lh::Mode::Shared => Mode::Shared,
        }
    }
}

impl From<Mode> for lh::Mode {
    fn from(m: Mode) -> lh::Mode {
        match m {
            Mode::Exclusive => lh::Mode::Exclusive,
            Mode::Shared => lh::Mode::Shared,
        }
    }
}

fn time(t: WallTime) -> Time {
    Time::from_unix_ms(t.0)
}

fn wall(t: Time) -> WallTime {
    WallTime(t.unix_ms())
}

impl From<&lh::Owner> for Owner {
    fn from(o: &lh::Owner) -> Owner {
        Owner {
            host: o.process.host.to_string(),
            pid: o.process.pid,
            start_time: o.process.start_time,
            owner_id: o.id.as_ref().map(|i| i.to_string()),
            label: o.label.clone(),
            uid: o.uid,
            command: o.command.clone(),
            restricted: o.restricted,
            on_exit: match o.on_exit {
                lh::OnExit::Dirty => OnExit::Dirty,
                lh::OnExit::Status => OnExit::Status,
            },
            on_lost: match o.on_lost {
                lh::OnLost::Kill => OnLost::Kill,
                lh::OnLost::Revoke => OnLost::Revoke,
            },
        }
    }
}

impl TryFrom<Owner> for lh::Owner {
    type Error = WireError;
    fn try_from(o: Owner) -> Result<lh::Owner, WireError> {
        let owner = lh::Owner {
            process: ProcessKey {
                host: HostId::new(o.host)?,
                pid: o.pid,
                start_time: o.start_time,
            },
            id: o.owner_id.map(lh::OwnerId::new).transpose()?,
            label: o.label,
            uid: o.uid,
            command: o.command,
            restricted: o.restricted,
            on_exit: match o.on_exit {
                OnExit::Dirty => lh::OnExit::Dirty,
                OnExit::Status => lh::OnExit::Status,
            },
            on_lost: o.on_lost.into(),
        };
        owner.validate()?;
        Ok(owner)
    }
}

impl From<&lh::Lease> for Lease {
    fn from(l: &lh::Lease) -> Lease {
        Lease {
            owner: (&l.owner).into(),
            mode: l.mode.into(),
            token: l.token.0,
            granted_at: time(l.granted_at),
            stuck: false,
        }
    }
}

impl TryFrom<Lease> for lh::Lease {
    type Error = WireError;
    fn try_from(l: Lease) -> Result<lh::Lease, WireError> {
        Ok(lh::Lease {
            owner: l.owner.try_into()?,
            mode: l.mode.into(),
            token: Token(l.token),
            // Sessions are the agent's business; clients see leases without them.
            session: SessionId(0),
            granted_at: wall(l.granted_at),
        })
    }
}

impl From<&lh::Ended> for Ended {
    fn from(e: &lh::Ended) -> Ended {
        use lh::EndReason as R;
        let (how, note, by, to) = match &e.how {
            R::Released => (How::Released, None, None, None),
            R::ReleasedDirty { note } => (How::ReleasedDirty, note.clone(), None, None),
            R::ProcessDied => (How::ProcessDied, None, None, None),
            R::ExitedClean => (How::ExitedClean, None, None, None),
            R::SessionExpired => (How::SessionExpired, None, None, None),
            R::Fenced => (How::Fenced, None, None, None),
            R::Forced { reason, by } => (How::Forced, Some(reason.clone()), Some(by.clone()), None),
            R::HandedOver { to } => (
                How::HandedOver,
                None,
                None,
                Some(Process {
                    host: to.host.to_string(),
                    pid: to.pid,
                    start_time: to.start_time,
                }),
            ),
        };
        Ended {
            owner: (&e.owner).into(),
            mode: e.mode.into(),
            token: e.token.0,
            granted_at: time(e.granted_at),
            ended_at: time(e.ended_at),
            how,
            note,
            by,
            to,
        }
    }
}

impl TryFrom<Ended> for lh::Ended {
    type Error = WireError;
    fn try_from(e: Ended) -> Result<lh::Ended, WireError> {
        use lh::EndReason as R;
        let how = match e.how {
            How::Released => R::Released,
            How::ReleasedDirty => R::ReleasedDirty { note: e.note },
            How::ProcessDied => R::ProcessDied,
            How::ExitedClean => R::ExitedClean,
            How::SessionExpired => R::SessionExpired,
            How::Fenced => R::Fenced,
            How::Forced => R::Forced {
                reason: e.note.unwrap_or_default(),
                by: e.by.unwrap_or_default(),
            },
            How::HandedOver => {
                let to = e.to.ok_or(WireError::Missing("to"))?;
                R::HandedOver {
                    to: ProcessKey {
                        host: HostId::new(to.host)?,
                        pid: to.pid,
                        start_time: to.start_time,
                    },
                }
            }
        };
        Ok(lh::Ended {
            owner: e.owner.try_into()?,
            mode: e.mode.into(),
            token: Token(e.token),
            granted_at: wall(e.granted_at),
            ended_at: wall(e.ended_at),
            how,
        })
    }
}

impl From<&lh::Grant> for Grant {
    fn from(g: &lh::Grant) -> Grant {
        Grant {
            resource: g.resource.to_string(),
            mode: g.mode.into(),
            token: g.token.0,
            dirty: g.dirty.as_ref().map(Into::into),
            existing: g.existing,
        }
    }
}

impl TryFrom<Grant> for lh::Grant {
    type Error = WireError;
    fn try_from(g: Grant) -> Result<lh::Grant, WireError> {
        Ok(lh::Grant {
            resource: ResourceName::new(g.resource)?,
            mode: g.mode.into(),
            token: Token(g.token),
            dirty: g.dirty.map(TryInto::try_into).transpose()?,
            existing: g.existing,
        })
    }
}

/// The JSON form of a conflict.
pub fn conflict_to_v1(c: &lh::Conflict) -> Conflict {
    Conflict {
        resource: c.resource.to_string(),
        holders: c.holders.iter().map(Into::into).collect(),
        waiting: u32::try_from(c.waiting).unwrap_or(u32::MAX),
        blocked_for: c.blocked_for.map(Dur),
        handover_pending: c.reserved,
    }
}

/// The core form of a JSON conflict.
///
/// # Errors
/// [`WireError`] for invalid names or owners.
pub fn conflict_from_v1(c: Conflict) -> Result<lh::Conflict, WireError> {
    Ok(lh::Conflict {
        resource: ResourceName::new(c.resource)?,
        holders: c
            .holders
            .into_iter()
            .map(TryInto::try_into)
            .collect::<Result<_, _>>()?,
        waiting: c.waiting as usize,
        blocked_for: c.blocked_for.map(|d| d.0),
        reserved: c.handover_pending,
    })
}

impl From<&lh::ResourceView> for Resource {
    fn from(v: &lh::ResourceView) -> Resource {
        Resource {
            resource: v.resource.to_string(),
            holders: v
                .holders
                .iter()
                .map(|l| Lease {
                    stuck: v.stuck.contains(&l.owner.process),
                    ..l.into()
                })
                .collect(),
            dirty: v.dirty.as_ref().map(Into::into),
            last_ended: v.last_ended.as_ref().map(Into::into),
            last_token: v.last_token.0,
            waiters: v
                .waiters
                .iter()
                .map(|w| Waiter {
                    owner: (&w.owner).into(),
                    mode: w.mode.into(),
                })
                .collect(),
            blocked_for: v.blocked_for.map(Dur),
            handover_pending: v.handover_pending,
            damaged: v.damaged.clone(),
        }
    }
}

impl TryFrom<Resource> for lh::ResourceView {
    type Error = WireError;
    fn try_from(r: Resource) -> Result<lh::ResourceView, WireError> {
        let mut stuck = Vec::new();
        Ok(lh::ResourceView {
            resource: ResourceName::new(r.resource)?,
            holders: r
                .holders
                .into_iter()
                .map(|l| {
                    let is_stuck = l.stuck;
                    let l: lh::Lease = l.try_into()?;
                    if is_stuck {
                        stuck.push(l.owner.process.clone());
                    }
                    Ok(l)
                })
                .collect::<Result<_, WireError>>()?,
            dirty: r.dirty.map(TryInto::try_into).transpose()?,
            last_ended: r.last_ended.map(TryInto::try_into).transpose()?,
            last_token: Token(r.last_token),
            waiters: r
                .waiters
                .into_iter()
                .map(|w| {
                    Ok(lh::WaiterView {
                        owner: w.owner.try_into()?,
                        mode: w.mode.into(),
                    })
                })
                .collect::<Result<_, WireError>>()?,
            blocked_for: r.blocked_for.map(|d| d.0),
            handover_pending: r.handover_pending,
            damaged: r.damaged,
            stuck,
        })
    }
}

impl From<&lh::Released> for Released {
    fn from(r: &lh::Released) -> Released {
        Released {
            resource: r.resource.to_string(),
            ended: (&r.ended).into(),
            dirtied: r.dirtied,
        }
    }
}

impl TryFrom<Released> for lh::Released {
    type Error = WireError;
    fn try_from(r: Released) -> Result<lh::Released, WireError> {
        Ok(lh::Released {
            resource: ResourceName::new(r.resource)?,
            ended: r.ended.try_into()?,
            dirtied: r.dirtied,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner() -> lh::Owner {
        let mut o = lh::Owner::new(HostId::new("h1").unwrap(), 10, 20).with_label("vm");
        o.uid = Some(0);
        o.command = Some("qemu-io".into());
        o
    }

    #[test]
    fn endings_round_trip_through_json() {
        use lh::EndReason as R;
        let to = lh::Owner::new(HostId::new("h2").unwrap(), 11, 21).process;
        for how in [
            R::Released,
            R::ReleasedDirty {
                note: Some("exit 3".into()),
            },
            R::ProcessDied,
            R::SessionExpired,
            R::Fenced,
            R::Forced {
                reason: "hung".into(),
                by: "root".into(),
            },
            R::HandedOver { to: to.clone() },
        ] {
            let e = lh::Ended {
                owner: owner(),
                mode: lh::Mode::Exclusive,
                token: Token(5),
                granted_at: WallTime(1_000),
                ended_at: WallTime(2_345),
                how,
            };
            let json = serde_json::to_string(&Ended::from(&e)).unwrap();
            let back: Ended = serde_json::from_str(&json).unwrap();
            assert_eq!(lh::Ended::try_from(back).unwrap(), e, "{json}");
        }
    }

    #[test]
    fn invalid_names_are_refused() {
        let mut w = Owner::from(&owner());
        w.host = "no/slash".into();
        assert!(lh::Owner::try_from(w).is_err());
        let g = Grant {
            resource: String::new(),
            mode: Mode::Shared,
            token: 1,
            dirty: None,
            existing: false,
        };
        assert!(lh::Grant::try_from(g).is_err());
    }
}
