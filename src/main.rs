//! The `drydock` binary: parses the command line, sets up logging, resolves the global options
//! and hands each subcommand to its module under `cmd/`. Errors are printed once, as a chain,
//! and mapped to the documented exit codes (0 ok, 1 failed, 2 bad input).

mod cancel;
mod cli;
mod cmd;
mod complete;
mod context;
mod exit;
mod out;
mod paint;
mod progress;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command};
use crate::context::Context;

fn main() -> ExitCode {
    // `COMPLETE=SHELL drydock -- WORDS`: the shell asks for completions (see `complete`).
    clap_complete::CompleteEnv::with_factory(<Cli as clap::CommandFactory>::command).complete();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let e = without_hidden_suggestions(e);
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    init_tracing(cli.global.verbose, cli.global.quiet);
    // Generated from the clap definitions; they need no state, store or Nix.
    match &cli.command {
        Command::Completions(args) => return exit::finish(cmd::help::completions(args)),
        Command::Man => return exit::finish(cmd::help::man()),
        // The store server runs sandboxed and is stopped by SIGTERM: it keeps the default.
        Command::StoreServer(_) => {}
        _ => cancel::init(),
    }
    let result = Context::resolve(&cli.global)
        .and_then(|ctx| ctx.with_compose(&cli.compose, cli.command.is_cluster_command()))
        .and_then(|ctx| match &cli.command {
            Command::Doctor(args) => cmd::doctor::run(&ctx, args),
            Command::Vm(args) => cmd::vm::run(&ctx, args),
            Command::VmSupervise(args) => cmd::vm::supervise(&ctx, args),
            Command::StoreServer(args) => cmd::store_server::run(args),
            Command::Track(args) => cmd::track::run(&ctx, args),
            Command::Runs(args) => cmd::runs::run(&ctx, args),
            Command::Gc(args) => cmd::gc::run(&ctx, args),
            Command::Du(args) => cmd::du::run(&ctx, args),
            Command::Store(args) => cmd::store::run(&ctx, args),
            Command::Completions(args) => cmd::help::completions(args),
            Command::Man => cmd::help::man(),
            Command::Up(args) => cmd::cluster::up(&ctx, args),
            Command::Down(args) => cmd::cluster::down(&ctx, args),
            Command::Ls => cmd::cluster::ls(&ctx),
            Command::Ps(args) => cmd::cluster::ps(&ctx, args),
            Command::Exec(args) => cmd::cluster::exec(&ctx, args),
            Command::Cp(args) => cmd::cluster::cp(&ctx, args),
            Command::Logs(args) => cmd::cluster::logs(&ctx, args),
            Command::Wait(args) => cmd::cluster::wait(&ctx, args),
            Command::Shell(args) => cmd::cluster::shell(&ctx, args),
            Command::Test(args) => cmd::test::run(&ctx, args),
            Command::Snapshot(args) => cmd::snapshot::snapshot(&ctx, args),
            Command::Restore(args) => cmd::snapshot::restore(&ctx, args),
            Command::Snapshots(args) => cmd::snapshot::list(&ctx, args),
            Command::Net(args) => cmd::net::run(&ctx, args),
            Command::ClusterSupervise(args) => cmd::cluster::supervise(&ctx, args),
        });
    exit::finish(result)
}

/// clap suggests hidden subcommands too (`drydock supervise` → `__vm-supervise`): drop them,
/// and the tip with them when nothing else is left.
fn without_hidden_suggestions(mut e: clap::Error) -> clap::Error {
    use clap::error::{ContextKind, ContextValue};
    let Some(ContextValue::Strings(names)) = e.get(ContextKind::SuggestedSubcommand) else {
        return e;
    };
    let shown: Vec<String> = names
        .iter()
        .filter(|n| !n.starts_with("__"))
        .cloned()
        .collect();
    if shown.len() == names.len() {
        return e;
    }
    if shown.is_empty() {
        let mut plain =
            clap::Error::new(e.kind()).with_cmd(&<Cli as clap::CommandFactory>::command());
        for (kind, value) in e.context() {
            if kind != ContextKind::SuggestedSubcommand {
                plain.insert(kind, value.clone());
            }
        }
        return plain;
    }
    e.insert(
        ContextKind::SuggestedSubcommand,
        ContextValue::Strings(shown),
    );
    e
}

fn init_tracing(verbose: u8, quiet: u8) {
    use tracing_subscriber::EnvFilter;
    let level = match i16::from(verbose) - i16::from(quiet) {
        i16::MIN..=-1 => "error",
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_env("DRYDOCK_LOG").unwrap_or_else(|_| EnvFilter::new(level));
    // Colours only on a terminal: a detached owner's `drydock.log` holds plain text.
    use std::io::IsTerminal as _;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        // Plain text where stderr is a file (a detached owner's drydock.log) or NO_COLOR is set.
        .with_ansi(paint::colour_on(std::io::IsTerminal::is_terminal(
            &std::io::stderr(),
        )))
        .with_target(false)
        .without_time()
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hidden_subcommands_are_never_suggested() {
        for typo in [
            "__vm-supervis",
            "supervise",
            "__store-serve",
            "cluster-supervise",
            "lss",
        ] {
            let e = Cli::try_parse_from(["drydock", typo]).unwrap_err();
            let text = without_hidden_suggestions(e).render().to_string();
            assert!(text.contains("unrecognized subcommand"), "{text}");
            let tips: Vec<&str> = text.lines().filter(|l| l.contains("tip:")).collect();
            assert!(tips.iter().all(|l| !l.contains("__")), "{typo}: {text}");
        }
    }
}
