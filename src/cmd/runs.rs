//! `drydock runs` / `drydock runs show ID`: the recorded runs, their sizes and what is
//! reclaimable now; for one run, every path and why it is still alive. Only the runs of the
//! store in use are shown; the others are counted per store.

use std::io::Write;

use drydock_gc::{Loaded, OtherStoreRuns, RunsDb};

use crate::cli::{RunsAction, RunsArgs};
use crate::context::Context;
use crate::exit::Outcome;

use super::gc::size;

/// How long ago the epoch second `secs` was, as `45s`, `12m`, `3h`, `2d`.
fn age(secs: i64) -> String {
    super::cluster::age((drydock_gc::epoch_secs() - secs).max(0) as u64)
}

/// A command line as a shell would need it (empty or spaced arguments quoted).
fn shell_words(cmd: &[String]) -> String {
    cmd.iter()
        .map(|a| {
            if !a.is_empty()
                && a.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The other stores that still exist (a deleted temporary store has nothing to show).
fn existing(mut others: Vec<OtherStoreRuns>, exists: impl Fn(&str) -> bool) -> Vec<OtherStoreRuns> {
    others.retain(|o| exists(&o.store));
    others
}

/// The command column: the program by its file name, the line cut at 60 characters (`runs
/// show` has it whole).
fn short_command(cmd: &[String]) -> String {
    let mut words = cmd.to_vec();
    if let Some(first) = words.first_mut()
        && let Some(name) = std::path::Path::new(first.as_str()).file_name()
    {
        *first = name.to_string_lossy().into_owned();
    }
    let line = shell_words(&words);
    match line.char_indices().nth(60) {
        Some((cut, _)) => format!("{}…", &line[..cut]),
        None => line,
    }
}

/// "3 runs of other stores not shown: /a/nix/store (2, --store /a), ..."
fn other_stores_line(others: &[OtherStoreRuns]) -> String {
    let n: usize = others.iter().map(|o| o.runs).sum();
    let stores = others
        .iter()
        .map(|o| {
            format!(
                "{} ({}, {})",
                o.store,
                o.runs,
                drydock_gc::store_option_hint(&o.store)
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    let runs = if n == 1 { "run" } else { "runs" };
    format!("{n} {runs} of other stores not shown: {stores}")
}

/// `runs --json`.
#[derive(Debug, serde::Serialize)]
struct RunsList<'a> {
    other_stores: &'a [OtherStoreRuns],
    runs: &'a [drydock_gc::RunSummary],
}

/// `runs show ID --json`.
#[derive(Debug, serde::Serialize)]
struct RunShow<'a> {
    artifacts: &'a [drydock_gc::Artifact],
    paths: &'a [drydock_gc::PathStatus],
    run: &'a drydock_gc::Run,
}

pub fn run(ctx: &Context, args: &RunsArgs) -> anyhow::Result<Outcome> {
    let ctx = &ctx.clone().store_of_runs();
    let layout = ctx.layout();
    super::vm::reap_dead(ctx);
    let loaded = Loaded::load(&layout)?;
    let runs = RunsDb::open(&ctx.state_dir).map_err(drydock_gc::GcError::from)?;
    let mut out = crate::out::stdout();
    match &args.action {
        None => {
            let list = drydock_gc::summarize_runs(&loaded, &runs)?;
            let others = existing(
                runs.runs_by_store(&layout)
                    .map_err(drydock_gc::GcError::from)?
                    .1,
                |s| std::path::Path::new(s).is_dir(),
            );
            if ctx.json {
                crate::out::json(
                    &mut out,
                    &RunsList {
                        other_stores: &others,
                        runs: &list,
                    },
                )?;
            } else {
                writeln!(
                    out,
                    "{:>4}  {:>5}  {:<20} {:>6} {:>10} {:>12}  COMMAND",
                    "ID", "AGE", "NAME", "PATHS", "SIZE", "RECLAIMABLE"
                )?;
                for s in &list {
                    writeln!(
                        out,
                        "{:>4}  {:>5}  {:<20} {:>6} {:>10} {:>12}  {}",
                        s.run.id,
                        age(s.run.started_at),
                        s.run.name,
                        s.live_paths,
                        size(s.size),
                        size(s.reclaimable),
                        short_command(&s.run.command)
                    )?;
                }
                if !others.is_empty() {
                    writeln!(out, "{}", other_stores_line(&others))?;
                }
            }
        }
        Some(RunsAction::Show { id }) => {
            let run = runs
                .run_in_store(&layout, *id)
                .map_err(drydock_gc::GcError::from)?;
            let (_, paths) = drydock_gc::run_statuses(&loaded, &runs, *id, None)?;
            let artifacts = runs.artifacts(*id).map_err(drydock_gc::GcError::from)?;
            if ctx.json {
                crate::out::json(
                    &mut out,
                    &RunShow {
                        artifacts: &artifacts,
                        paths: &paths,
                        run: &run,
                    },
                )?;
            } else {
                writeln!(
                    out,
                    "run {}: {} ({})",
                    run.id,
                    run.name,
                    shell_words(&run.command)
                )?;
                for p in &paths {
                    writeln!(
                        out,
                        "  {:<12} {:<12} {:>10}  {}",
                        p.status,
                        p.class.as_str(),
                        size(p.nar_size),
                        p.path
                    )?;
                    if let Some(w) = &p.why {
                        writeln!(out, "      held by {} root {}", w.root_kind, w.root)?;
                        writeln!(out, "      chain: {}", w.chain.join(" -> "))?;
                    }
                    if let Some(h) = &p.held_by {
                        writeln!(out, "      needed by {h}")?;
                    }
                }
                for a in &artifacts {
                    writeln!(out, "  artifact {} {}", a.kind, a.path)?;
                }
            }
        }
    }
    out.flush()?;
    Ok(Outcome::Success)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_that_are_gone_are_not_listed() {
        let o = |s: &str| OtherStoreRuns {
            store: s.into(),
            runs: 1,
        };
        let kept = existing(vec![o("/a/nix/store"), o("/gone/nix/store")], |s| {
            !s.starts_with("/gone")
        });
        assert_eq!(kept, vec![o("/a/nix/store")]);
    }

    #[test]
    fn the_command_column_is_short() {
        let w = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            short_command(&w(&["/usr/local/bin/drydock", "up", "-d"])),
            "drydock up -d"
        );
        let long = short_command(&w(&["nix-build", &"x".repeat(100)]));
        assert_eq!(long.chars().count(), 61);
        assert!(long.ends_with('…'));
    }
}
