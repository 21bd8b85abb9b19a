//! `leasehold bench`: figures for SPEC §7, measured through a running agent.

use clap::Args;
use std::path::PathBuf;

use crate::Failure;

/// Flags of `leasehold bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Concurrent clients for the throughput phase.
    #[arg(long, default_value_t = 64)]
    clients: usize,
}

/// `leasehold bench`.
pub async fn bench(_a: BenchArgs, _socket: &Option<PathBuf>) -> Result<u8, Failure> {
    Err(Failure::error("bench: not written yet"))
}
