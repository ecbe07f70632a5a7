//! `drydock snapshot`, `restore` and `snapshots`: whole-cluster snapshots (see drydock-cluster's
//! `snapshot` module). Each calls one library function and prints its report (text, or the
//! same struct as `--json`).

use std::time::{SystemTime, UNIX_EPOCH};

use crate::cmd::gc::size as human;

use crate::cli::{ClusterArgs, RestoreArgs, SnapshotArgs};
use crate::cmd::cluster::{launch_opts, target};
use crate::cmd::reload::plural;
use crate::context::Context;
use crate::exit::Outcome;

/// `snapshot TAG [--stop]`, or `snapshot --rm TAG`.
pub fn snapshot(ctx: &Context, a: &SnapshotArgs) -> anyhow::Result<Outcome> {
    let name = target(ctx, &a.cluster)?.name;
    if a.rm {
        let r = drydock_cluster::remove_snapshot(&ctx.state_dir, &name, &a.tag)?;
        if ctx.json {
            crate::out::json(&mut crate::out::stdout(), &r)?;
        } else {
            eprintln!(
                "drydock: snapshot {:?} of {name} removed ({} freed)",
                r.tag,
                human(r.bytes)
            );
        }
        return Ok(Outcome::Success);
    }
    crate::cancel::install();
    let s = drydock_cluster::take_snapshot(&ctx.state_dir, &name, &a.tag, a.stop, None)?;
    if ctx.json {
        crate::out::json(&mut crate::out::stdout(), &s)?;
    } else {
        eprintln!(
            "drydock: snapshot {:?} of {name}: {} saved, {} in all; the machines were paused for {:.2} s{}",
            s.tag,
            plural(s.machines.len(), "machine"),
            human(s.bytes()),
            s.paused_secs,
            if s.stopped {
                " and are stopped now"
            } else {
                ", now running again"
            }
        );
        for m in &s.machines {
            eprintln!(
                "  {:<12} {:>10}  saved in {:.2} s",
                m.machine,
                human(m.bytes()),
                m.save_secs
            );
        }
    }
    Ok(Outcome::Success)
}

/// `restore TAG`.
pub fn restore(ctx: &Context, a: &RestoreArgs) -> anyhow::Result<Outcome> {
    let name = target(ctx, &a.cluster)?.name;
    crate::cancel::install();
    let launch = launch_opts(
        ctx,
        crate::cli::AccelArg::Auto,
        None,
        a.timeout,
        drydock_vm::DEFAULT_LOG_LIMIT,
    )?;
    let req = drydock_cluster::RestoreRequest {
        cluster: &name,
        tag: &a.tag,
        launch: &launch,
    };
    let r = match drydock_cluster::restore_cluster(&req, &crate::cancel::CANCEL) {
        Err(e) if e.is_interrupted() => return Ok(Outcome::Interrupted),
        r => r?,
    };
    if ctx.json {
        crate::out::json(&mut crate::out::stdout(), &r)?;
    } else {
        if let Some(secs) = r.stopped_first_secs {
            eprintln!("drydock: cluster {name} was up: stopped first in {secs:.2} s");
        }
        eprintln!(
            "drydock: cluster {name} restored from snapshot {:?} in {:.2} s: {} answering, clocks set (owner pid {})",
            r.tag,
            r.restore_secs,
            plural(r.machines.len(), "machine"),
            r.owner_pid
        );
    }
    Ok(Outcome::Success)
}

/// `snapshots`.
pub fn list(ctx: &Context, a: &ClusterArgs) -> anyhow::Result<Outcome> {
    let name = target(ctx, a)?.name;
    let rows = drydock_cluster::list_snapshots(&ctx.state_dir, &name)?;
    if ctx.json {
        crate::out::json(&mut crate::out::stdout(), &rows)?;
        return Ok(Outcome::Success);
    }
    if rows.is_empty() {
        eprintln!(
            "drydock: the cluster {name} has no snapshots (take one with `drydock snapshot TAG`)"
        );
        return Ok(Outcome::Success);
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let mut out = crate::out::stdout();
    use std::io::Write;
    writeln!(
        out,
        "{:<16} {:>8} {:>10}  {:<30} SYSTEMS",
        "TAG", "AGE", "SIZE", "MACHINES"
    )?;
    for r in &rows {
        let age = r
            .created
            .map(|c| crate::cmd::cluster::age(now.saturating_sub(c)))
            .unwrap_or_else(|| "-".into());
        let systems = match &r.problem {
            Some(p) => format!("unusable: {p}"),
            None => r
                .systems
                .iter()
                .map(|s| s.rsplit('/').next().unwrap_or(s).to_string())
                .collect::<Vec<_>>()
                .join(" "),
        };
        writeln!(
            out,
            "{:<16} {:>8} {:>10}  {:<30} {}",
            r.tag,
            age,
            human(r.bytes),
            r.machines.join(","),
            drydock_vm::escape_control(&systems)
        )?;
    }
    Ok(Outcome::Success)
}
