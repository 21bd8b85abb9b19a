//! `leasehold-agent`: the whole program, the agent and the bench included. `leasehold agent`
//! and `leasehold bench` execute it; it also runs every other command as `leasehold` does.

/// jemalloc, with its per-thread caches, instead of glibc's malloc: the agent's buffers are
/// allocated on one thread and freed on another (a tokio worker and the store thread), and
/// glibc's arenas took a lock (a `futex`) for most such frees under load. This binary only:
/// the lean `leasehold` keeps glibc's (jemalloc's start would cost each `run` ~0.4 ms of
/// CPU). docs/performance.md, "Acquire+release throughput".
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    leasehold::main_full()
}
