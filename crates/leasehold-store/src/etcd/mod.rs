//! The etcd store: one host's connection to lease state shared by a cluster of hosts.
//!
//! Each agent keeps one session, an etcd lease renewed by keep-alive; its host key lives on
//! that lease. Resource records are durable keys, changed only by transactions that compare
//! the revision they read, so two hosts can never both think they won a resource. Decisions
//! are made by `leasehold-core`'s engine, run per operation over the records read in one
//! snapshot. See [`keys`] for the layout and `docs/design.md` for the safety argument.

pub mod client;
pub mod history;
pub mod keys;
pub mod pb;
mod probe;
pub mod reference;
mod store;

pub use client::{EtcdSecurity, EtcdUser, LeaseId};
pub use history::{EtcdHealth, HistoryOptions};
pub use store::{ETCD_MIN_LEASE, EtcdOptions, EtcdStore, SnapshotPause, etcd_default_grace};
