//! `leasehold-agent`: the whole program, the agent and the bench included. `leasehold agent`
//! and `leasehold bench` execute it; it also runs every other command as `leasehold` does.

fn main() -> std::process::ExitCode {
    leasehold::main_full()
}
