//! `drydock track` as one operation: run a command as a recorded run of the runs database and
//! record the store paths it caused to be registered (the mechanics, and [`TrackError`], are in
//! [`crate::track`]). It returns the crate's umbrella [`GcError`], so it sits above
//! [`crate::error`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::classify::{PathClass, classify};
use crate::error::GcError;
use crate::nixdb::NixDb;
use crate::runsdb::{RunKind, RunsDb};
use crate::store_path::{StoreLayout, StorePath};
use crate::track::{DbView, Echo, Passthrough, TrackError, attribute, ensure_store, result_links};

/// What `track` recorded.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TrackReport {
    /// The run's id.
    pub run_id: i64,
    /// The command's exit code (128 + signal if it was killed).
    pub exit_code: i32,
    /// The paths claimed, with their class and NAR size.
    pub claimed: Vec<(String, PathClass, u64)>,
    /// Paths registered meanwhile that were not claimed (someone else's build).
    pub not_claimed: usize,
}

/// Run `cmd` as a tracked run and record what it claimed. `cancel` is the caller's Ctrl-C flag
/// (the library installs no signal handler): while the command runs it is forwarded to it;
/// afterwards it ends `track` with [`TrackError::Interrupted`].
pub fn track(
    layout: &StoreLayout,
    runs: &RunsDb,
    name: Option<&str>,
    cmd: &[String],
    cancel: &AtomicBool,
) -> Result<TrackReport, GcError> {
    track_to(layout, runs, name, cmd, cancel, Echo::Stdout)
}

/// [`track`], with the command's stdout passed through to `echo`.
pub fn track_to(
    layout: &StoreLayout,
    runs: &RunsDb,
    name: Option<&str>,
    cmd: &[String],
    cancel: &AtomicBool,
    echo: Echo,
) -> Result<TrackReport, GcError> {
    track_as(
        layout,
        runs,
        cmd,
        cancel,
        &TrackAs {
            name,
            echo,
            recorded: None,
            forget_if_empty: false,
            deadline: None,
        },
    )
}

/// How [`track_as`] runs and records a command.
#[derive(Debug, Clone, Copy)]
pub struct TrackAs<'a> {
    /// The run's name (default: derived from the command).
    pub name: Option<&'a str>,
    /// Where the command's stdout goes.
    pub echo: Echo,
    /// The command line recorded with the run, when it is not `cmd` (what the user typed that
    /// made drydock run it).
    pub recorded: Option<&'a [String]>,
    /// A command that exits 0 and claims nothing leaves no run ([`TrackReport::run_id`] is
    /// then 0): a build that built nothing new is no run.
    pub forget_if_empty: bool,
    /// A command still running then is stopped (SIGINT, then SIGKILL) and its run ends with
    /// [`TrackError::Late`].
    pub deadline: Option<crate::deadline::Deadline>,
}

/// [`track_to`], as `how` says.
pub fn track_as(
    layout: &StoreLayout,
    runs: &RunsDb,
    cmd: &[String],
    cancel: &AtomicBool,
    how: &TrackAs<'_>,
) -> Result<TrackReport, GcError> {
    let (name, echo, deadline) = (how.name, how.echo, how.deadline);
    let started = std::time::Instant::now();
    if cmd.is_empty() {
        return Err(TrackError::NoCommand.into());
    }
    ensure_store(layout)?;
    // A store that does not exist yet (the command's first build creates it) starts at 0.
    let before = if layout.has_database() {
        NixDb::open(layout)?.max_path_id()?
    } else {
        0
    };
    let name = name.map(str::to_owned).unwrap_or_else(|| default_name(cmd));
    // Started before the run is recorded: a command that cannot start records nothing.
    let sd = &layout.logical_store_dir;
    let child = Passthrough::spawn(cmd, echo, sd)?;
    let run_id = match runs.begin_run(layout, &name, how.recorded.unwrap_or(cmd), RunKind::Build) {
        Ok(id) => id,
        Err(e) => {
            // Without a run the command's paths could not be recorded: do not leave it running.
            child.kill();
            return Err(e.into());
        }
    };
    let program = child.program().to_string();
    let (exit_code, mut outputs, late) = match child.wait(cancel, deadline) {
        Ok(x) => x,
        Err(e) => {
            runs.finish_run(run_id, Some(127))?;
            return Err(e.into());
        }
    };
    if late {
        runs.finish_run(run_id, Some(exit_code))?;
        return Err(TrackError::Late {
            program,
            after: started.elapsed(),
            run_id,
            exit_code,
        }
        .into());
    }
    // Ctrl-C after the command ended interrupts drydock itself: the run ends with the
    // command's code, unattributed, and the caller exits 130.
    let interrupted = |runs: &RunsDb| -> Result<TrackReport, GcError> {
        runs.finish_run(run_id, Some(exit_code))?;
        Err(TrackError::Interrupted { run_id, exit_code }.into())
    };
    if cancel.load(Ordering::SeqCst) {
        return interrupted(runs);
    }
    if !layout.has_database() {
        tracing::warn!("the command registered nothing: there is no Nix database yet");
        runs.finish_run(run_id, Some(exit_code))?;
        return Ok(TrackReport {
            run_id,
            exit_code,
            claimed: Vec::new(),
            not_claimed: 0,
        });
    }
    let db = NixDb::open(layout)?;
    let new_paths = db.paths_since(before)?;
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    outputs.extend(result_links(sd, &cwd, cmd));
    outputs.sort();
    outputs.dedup();
    let view = DbView::new(&db, layout);
    if cancel.load(Ordering::SeqCst) {
        return interrupted(runs);
    }
    let claimed = attribute(sd, &new_paths, &outputs, &view);
    if cancel.load(Ordering::SeqCst) {
        return interrupted(runs);
    }
    let sizes: HashMap<&StorePath, u64> = new_paths.iter().map(|p| (&p.path, p.nar_size)).collect();
    let rows: Vec<(String, PathClass, u64)> = claimed
        .iter()
        .map(|p| {
            (
                layout.logical(p),
                classify(p),
                sizes.get(p).copied().unwrap_or(0),
            )
        })
        .collect();
    runs.add_paths(run_id, &rows)?;
    runs.finish_run(run_id, Some(exit_code))?;
    let run_id = match how.forget_if_empty && exit_code == 0 && rows.is_empty() {
        true if runs.forget_empty_run(run_id)? => 0,
        _ => run_id,
    };
    tracing::info!(
        "run {run_id}: claimed {} of {} new paths",
        rows.len(),
        new_paths.len()
    );
    Ok(TrackReport {
        run_id,
        exit_code,
        not_claimed: new_paths.len() - rows.len(),
        claimed: rows,
    })
}

/// A run name from the command: the last argument that is not an option, or the program.
fn default_name(cmd: &[String]) -> String {
    let base = |s: &str| {
        Path::new(s)
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_else(|| s.to_owned())
    };
    cmd.iter()
        .skip(1)
        .rev()
        .find(|a| !a.starts_with('-'))
        .map(|a| base(a))
        .unwrap_or_else(|| base(&cmd[0]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_names() {
        assert_eq!(
            default_name(&["nix-build".into(), "-A".into(), "/x/test.nix".into()]),
            "test.nix"
        );
        assert_eq!(default_name(&["make".into()]), "make");
    }
}
