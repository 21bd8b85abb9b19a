//! `leasehold`: the commands that talk to the agent, linked lean for a fast start; `agent`
//! and `bench` continue in `leasehold-agent` (see the library's documentation).

fn main() -> std::process::ExitCode {
    leasehold::main_lean()
}
