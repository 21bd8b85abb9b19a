//! The lease state machine of leasehold.
//!
//! This crate decides who holds which resource; it does no I/O and reads no clock. Every
//! operation is told the time ([`Now`]) and returns its answer; what else it decided (grants to
//! waiters who were in line, events, the records that must be made durable) is drained with
//! [`Engine::take_output`]. A store (see `leasehold-store`) makes the changed records durable
//! before anyone is told, and a driver carries out the rest.
//!
//! ```
//! use leasehold_core::*;
//! use std::time::Duration;
//!
//! let mut engine = Engine::new(EngineConfig { grace: Duration::from_secs(5) });
//! let host = HostId::new("node1").unwrap();
//! let session = engine.open_session(host.clone(), Some(Duration::from_secs(10)), Now::at(0)).unwrap();
//! let disk = ResourceName::new("vm1.qcow2").unwrap();
//! let writer = Owner::new(host.clone(), 4242, 77);
//!
//! let req = AcquireRequest {
//!     owner: writer.clone(),
//!     session,
//!     items: vec![(disk.clone(), Mode::Exclusive)],
//!     accept_dirty: false,
//!     wait: false,
//!     expect_tokens: Vec::new(),
//! };
//! let Acquired::Granted(grants) = engine.acquire(req, Now::at(1)).unwrap() else { unreachable!() };
//! let token = grants[0].token;
//! assert!(engine.validate(&disk, token));
//!
//! // The writer dies without releasing: the disk is dirty, and the next user must check it.
//! engine.end_process(&writer.process, Now::at(2));
//! let out = engine.take_output();
//! assert!(out.changed.contains(&disk));
//! let reader = Owner::new(host, 4343, 78);
//! let req = AcquireRequest {
//!     owner: reader,
//!     session,
//!     items: vec![(disk.clone(), Mode::Shared)],
//!     accept_dirty: false,
//!     wait: false,
//!     expect_tokens: Vec::new(),
//! };
//! assert!(matches!(engine.acquire(req, Now::at(3)), Err(AcquireError::NeedsCheck { .. })));
//! ```

mod acquire;
mod engine;
mod output;
mod release;
mod resource;
mod session;
mod timing;
mod types;
mod view;

pub use acquire::{AcquireError, AcquireRequest, Acquired, Conflict, Grant, MAX_ITEMS};
pub use engine::{Engine, EngineConfig};
pub use output::{Event, Meta, Output};
pub use release::{ReleaseError, ReleaseKind, ReleaseRequest, Released};
pub use resource::{EndReason, Ended, Lease, ResourceState};
pub use session::{Session, SessionError};
pub use timing::{DEFAULT_KILL_TIMEOUT, DEFAULT_TTL, Timing};
pub use types::{
    HostId, MAX_COMMAND, MAX_HOST_ID, MAX_LABEL, MAX_OWNER_ID, MAX_RESOURCE_NAME, MAX_TEXT, Mode,
    NameError, Now, OnExit, OnLost, Owner, OwnerId, ProcessKey, ResourceName, SessionId, Time,
    Token, WaiterId, WallTime, check_free_text,
};
pub use view::{ResourceView, WaiterView};
