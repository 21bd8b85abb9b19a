//! `leasehold man` and `leasehold completions SHELL`: the manual page and shell completions,
//! generated from the command line's own definition so that they cannot drift from it.
//! Packagers run these at build time (`packaging/build-deb`).

use clap::CommandFactory;

use crate::{Cli, Failure};

/// The shells `leasehold completions` writes for.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum Shell {
    /// bash (install as /usr/share/bash-completion/completions/leasehold).
    Bash,
    /// zsh (install as /usr/share/zsh/vendor-completions/_leasehold).
    Zsh,
    /// fish (install as /usr/share/fish/vendor_completions.d/leasehold.fish).
    Fish,
}

/// Writes the manual page leasehold(1), in roff, on standard output.
///
/// # Errors
/// Standard output cannot be written.
pub fn man() -> Result<u8, Failure> {
    let mut page = Vec::new();
    clap_mangen::Man::new(Cli::command())
        .render(&mut page)
        .map_err(|e| Failure::error(format!("rendering the manual page: {e}")))?;
    write_all(&page)
}

/// Writes the completion script for `shell` on standard output.
///
/// # Errors
/// Standard output cannot be written.
pub fn completions(shell: Shell) -> Result<u8, Failure> {
    use clap_complete::Shell as S;
    let shell = match shell {
        Shell::Bash => S::Bash,
        Shell::Zsh => S::Zsh,
        Shell::Fish => S::Fish,
    };
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "leasehold", &mut script);
    write_all(&script)
}

fn write_all(bytes: &[u8]) -> Result<u8, Failure> {
    use std::io::Write;
    let mut o = std::io::stdout().lock();
    o.write_all(bytes)
        .and_then(|()| o.flush())
        .map_err(Failure::stdout)?;
    Ok(0)
}
