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

pub fn completions(args: &CompletionsArgs) -> anyhow::Result<Outcome> {
    let mut cmd = Cli::command();
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut cmd, "drydock", &mut script);
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
