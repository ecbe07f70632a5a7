//! `drydock completions SHELL` and `drydock man`: a completion script and the manual page,
//! generated from the same clap definitions as `--help`, so they never disagree with it.
//!
//! Install (bash): `drydock completions bash > /etc/bash_completion.d/drydock`; zsh:
//! `drydock completions zsh > "${fpath[1]}/_drydock"`; fish: `drydock completions fish >
//! ~/.config/fish/completions/drydock.fish`; the manual: `drydock man >
//! /usr/local/share/man/man1/drydock.1`.

use std::io::Write;

use clap::CommandFactory;

use crate::cli::{Cli, CompletionsArgs};

use crate::exit::Outcome;

/// The shell's script, which calls `COMPLETE=SHELL drydock -- WORDS` as one types: commands and
/// options as `--help` has them, and machine and cluster names (see `crate::complete`).
pub fn completions(args: &CompletionsArgs) -> anyhow::Result<Outcome> {
    let shells = clap_complete::env::Shells::builtins();
    let name = args.shell.to_string();
    let shell = shells
        .completer(&name)
        .ok_or_else(|| crate::exit::bad_input(format!("no dynamic completion for {name}")))?;
    let mut script = Vec::new();
    shell.write_registration("COMPLETE", "drydock", "drydock", "drydock", &mut script)?;
    let mut out = crate::out::stdout();
    out.write_all(&script)?;
    out.flush()?;
    Ok(Outcome::Success)
}

pub fn man() -> anyhow::Result<Outcome> {
    let mut page = Vec::new();
    clap_mangen::Man::new(Cli::command()).render(&mut page)?;
    let mut out = crate::out::stdout();
    out.write_all(&page)?;
    out.flush()?;
    Ok(Outcome::Success)
}
