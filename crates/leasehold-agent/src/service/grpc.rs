//! The gRPC front end: translates `proto/leasehold.proto`'s messages to the core's requests
//! and the core's answers back; no logic of its own.

use std::pin::Pin;
use std::time::Duration;

use leasehold_api::v1::{self, ApiError, ErrorCode, conflict_from_v1};
use leasehold_api::{WireError, conflict_to_wire, pb};
use leasehold_core::Mode;
use leasehold_store::Store;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Code, Request, Response, Status};

use super::{Caller, ConfirmBy, Out, Service};

/// The gRPC status of an API error.
pub(crate) fn status(e: ApiError) -> Status {
    let code = match e.code {
        ErrorCode::Usage | ErrorCode::TooLarge => Code::InvalidArgument,
        ErrorCode::NotFound => Code::NotFound,
        ErrorCode::Forbidden => Code::PermissionDenied,
        ErrorCode::Held
        | ErrorCode::Moved
        | ErrorCode::NeedsCheck
        | ErrorCode::ModeConflict
        | ErrorCode::Cancelled
        | ErrorCode::Refused => Code::FailedPrecondition,
        ErrorCode::TimedOut | ErrorCode::RequestTimeout => Code::DeadlineExceeded,
        ErrorCode::Unavailable => Code::Unavailable,
        ErrorCode::BackendUnavailable => Code::Aborted,
        ErrorCode::Exhausted => Code::ResourceExhausted,
        ErrorCode::Internal => Code::Internal,
    };
    Status::new(code, e.message)
}

fn caller<T>(req: &Request<T>) -> Result<Caller, Status> {
    Caller::of(req.extensions().get::<crate::peer::PeerInfo>()).map_err(status)
}

fn wire(e: WireError) -> Status {
    Status::internal(format!("could not encode an answer: {e}"))
}

fn mode(m: i32) -> Result<v1::Mode, Status> {
    leasehold_api::mode_from_wire(m)
        .map(|m| match m {
            Mode::Exclusive => v1::Mode::Exclusive,
            Mode::Shared => v1::Mode::Shared,
        })
        .map_err(|e| Status::invalid_argument(e.to_string()))
}

fn pid(p: u32) -> Option<u32> {
    (p != 0).then_some(p)
}

/// The gRPC refusal of an acquire refusal; other errors end the stream with a status.
fn refusal(e: ApiError) -> Result<pb::Refusal, Status> {
    use pb::refusal::Kind;
    let kind = match e.code {
        ErrorCode::Held => Kind::Busy,
        ErrorCode::TimedOut => Kind::TimedOut,
        ErrorCode::NeedsCheck => Kind::NeedsCheck,
        ErrorCode::ModeConflict => Kind::ModeConflict,
        ErrorCode::Cancelled => Kind::Cancelled,
        _ => return Err(status(e)),
    };
    let conflict = e
        .conflict
        .map(|c| conflict_from_v1(*c).map(|c| conflict_to_wire(&c)))
        .transpose()
        .map_err(wire)?;
    let dirty = e
        .dirty
        .map(|d| leasehold_core::Ended::try_from(*d).map(|d| pb::Ended::from(&d)))
        .transpose()
        .map_err(wire)?;
    Ok(pb::Refusal {
        kind: kind.into(),
        message: e.message,
        conflict,
        resource: e.resource,
        dirty,
        accept_dirty_needs: e.accept_dirty_needs,
    })
}

fn acquire_event(out: Out) -> Result<pb::AcquireEvent, Status> {
    use pb::acquire_event::Event as E;
    let event = match out {
        Out::Waiting {
            conflict,
            waited,
            note,
        } => E::Waiting(pb::Waiting {
            conflict: conflict.map(|c| conflict_to_wire(&c)),
            waited_ms: millis(waited),
            note,
        }),
        Out::Granted {
            grants,
            owner,
            confirm_id,
            delivered: _,
        } => E::Granted(pb::Granted {
            grants: grants.iter().map(pb::Grant::from).collect(),
            owner: Some((&owner).into()),
            confirm_id,
        }),
        Out::Safe(until_monotonic_ns) => E::Safe(pb::Safe { until_monotonic_ns }),
        Out::Lost { resource, ended } => E::Lost(pb::Lost {
            resource: resource.to_string(),
            ended: Some((&ended).into()),
        }),
        Out::Failed(e) => E::Refused(refusal(e)?),
    };
    Ok(pb::AcquireEvent { event: Some(event) })
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn ms(d: Option<v1::Dur>) -> Option<u64> {
    d.map(|d| millis(d.0))
}

/// The gRPC form of a watched event.
fn event(e: v1::Event) -> Result<pb::Event, Status> {
    if let Some(err) = e.error {
        return Err(Status::data_loss(err.message));
    }
    let lease = e
        .lease
        .map(|l| leasehold_core::Lease::try_from(l).map(|l| pb::Lease::from(&l)))
        .transpose()
        .map_err(wire)?;
    let ended = e
        .ended
        .map(|x| leasehold_core::Ended::try_from(x).map(|x| pb::Ended::from(&x)))
        .transpose()
        .map_err(wire)?;
    Ok(pb::Event {
        kind: e.kind,
        resource: e.resource,
        at_ms: e.at.map_or(0, |t| t.unix_ms()),
        lease,
        ended,
        by: e.by,
        host: e.host,
        pid: e.pid,
    })
}

fn status_response(s: v1::StatusResponse) -> pb::StatusResponse {
    pb::StatusResponse {
        host: s.host,
        backend: s.backend,
        version: s.version,
        pid: s.pid,
        uptime_ms: millis(s.uptime.0),
        state_dir: s.state_dir,
        socket: s.socket,
        resources: s.resources,
        leases: s.leases,
        processes: s.processes,
        dirty: s.dirty,
        session: s.session,
        safe_for_ms: ms(s.safe_for),
        host_session: s.host_session.map(|h| pb::HostSession {
            lease_id: h.lease_id,
            ttl_ms: millis(h.ttl.0),
            last_renewal_ms_ago: ms(h.last_renewal_ago),
            safe_for_ms: ms(h.safe_for),
            renewal_latency_us: h.renewal_latency_us,
            expired: h.expired,
            failed_renewals: h.failed_renewals,
        }),
        backend_error: s.backend_error,
        etcd: s.etcd.map(|h| pb::EtcdStatus {
            db_size: h.db_size,
            quota: h.quota,
            revision: h.revision,
            compacted_revision: h.compacted_revision,
            nospace: h.nospace,
            compactor: h.compactor,
            forgotten: h.forgotten,
            warning: h.warning,
        }),
    }
}

type Stream_<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl<S: Store> pb::leasehold_server::Leasehold for Service<S> {
    type AcquireStream = Stream_<pb::AcquireEvent>;
    type WatchStream = Stream_<pb::Event>;

    async fn acquire(
        &self,
        req: Request<pb::AcquireRequest>,
    ) -> Result<Response<Self::AcquireStream>, Status> {
        let c = caller(&req)?;
        let r = req.into_inner();
        let items = r
            .items
            .into_iter()
            .map(|i| {
                Ok(v1::Item {
                    resource: i.resource,
                    mode: mode(i.mode)?,
                })
            })
            .collect::<Result<Vec<_>, Status>>()?;
        let request = v1::AcquireRequest {
            items,
            pid: pid(r.pid),
            start_time: r.start_time,
            owner_id: None,
            on_lost: v1::OnLost::Kill,
            label: r.label,
            accept_dirty: r.accept_dirty,
            // 0 waits forever.
            wait: r.wait_ms.map(|ms| match ms {
                0 => v1::Dur(Duration::MAX),
                ms => v1::Dur(Duration::from_millis(ms)),
            }),
            hold: r.hold,
            ..v1::AcquireRequest::default()
        };
        let rx = self.acquire(&c, request, ConfirmBy::Call).map_err(status)?;
        Ok(Response::new(Box::pin(
            ReceiverStream::new(rx).map(acquire_event),
        )))
    }

    async fn release(
        &self,
        req: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let c = caller(&req)?;
        let r = req.into_inner();
        let request = v1::ReleaseRequest {
            resources: r.resources,
            pid: pid(r.pid),
            start_time: r.start_time,
            owner_id: None,
            dirty: r.dirty,
            note: r.note,
            handover_to: r.handover_to,
        };
        let mut out = Service::release(self, &c, request).await.map_err(status)?;
        let released: Vec<pb::Released> = out.released.iter().map(Into::into).collect();
        match out.failed.len() {
            0 => Ok(Response::new(pb::ReleaseResponse { released })),
            1 if released.is_empty() => Err(status(out.failed.remove(0).1)),
            n => {
                let first = status(out.failed[0].1.clone());
                Err(Status::new(
                    first.code(),
                    format!(
                        "{n} of {} releases failed: {}",
                        n + released.len(),
                        out.failed
                            .iter()
                            .map(|(_, e)| e.message.as_str())
                            .collect::<Vec<_>>()
                            .join("; ")
                    ),
                ))
            }
        }
    }

    async fn force_release(
        &self,
        req: Request<pb::ForceReleaseRequest>,
    ) -> Result<Response<pb::ForceReleaseResponse>, Status> {
        let c = caller(&req)?;
        let r = req.into_inner();
        let request = v1::ForceReleaseRequest {
            resource: r.resource,
            reason: r.reason,
        };
        let released = Service::force_release(self, &c, request)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::ForceReleaseResponse {
            released: released.iter().map(Into::into).collect(),
        }))
    }

    async fn mark_clean(
        &self,
        req: Request<pb::MarkCleanRequest>,
    ) -> Result<Response<pb::MarkCleanResponse>, Status> {
        let c = caller(&req)?;
        let was = Service::mark_clean(self, &c, req.into_inner().resource)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::MarkCleanResponse {
            was: was.as_ref().map(Into::into),
        }))
    }

    async fn validate(
        &self,
        req: Request<pb::ValidateRequest>,
    ) -> Result<Response<pb::ValidateResponse>, Status> {
        caller(&req)?;
        let r = req.into_inner();
        let v = Service::validate(
            self,
            v1::ValidateRequest {
                resource: r.resource,
                token: r.token,
            },
        )
        .await
        .map_err(status)?;
        Ok(Response::new(pb::ValidateResponse {
            current: v.current,
            current_tokens: v.current_tokens,
        }))
    }

    async fn inspect(
        &self,
        req: Request<pb::InspectRequest>,
    ) -> Result<Response<pb::InspectResponse>, Status> {
        caller(&req)?;
        let v = Service::inspect(self, req.into_inner().resource)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::InspectResponse {
            resource: v.as_ref().map(Into::into),
        }))
    }

    async fn list(
        &self,
        req: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        caller(&req)?;
        let v = Service::list(self).await.map_err(status)?;
        Ok(Response::new(pb::ListResponse {
            resources: v.iter().map(Into::into).collect(),
        }))
    }

    async fn status(
        &self,
        req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        caller(&req)?;
        Ok(Response::new(status_response(Service::status(self).await)))
    }

    async fn confirm(
        &self,
        req: Request<pb::ConfirmRequest>,
    ) -> Result<Response<pb::ConfirmResponse>, Status> {
        let c = caller(&req)?;
        Service::confirm(self, &c, req.into_inner().confirm_id).map_err(status)?;
        Ok(Response::new(pb::ConfirmResponse {}))
    }

    async fn watch(
        &self,
        req: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        caller(&req)?;
        let rx = Service::watch(self, req.into_inner().resource).map_err(status)?;
        Ok(Response::new(Box::pin(ReceiverStream::new(rx).map(
            |e| match e {
                Ok(e) => event(e),
                Err(e) => Err(status(e)),
            },
        ))))
    }
}
