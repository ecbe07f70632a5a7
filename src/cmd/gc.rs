//! `drydock gc`: plan and carry out the collection of selected runs (or every dead path with
//! `--all`) through `nix-store --delete`, with a progress bar and the space really freed.

use std::io::Write;

use drydock_gc::{Loaded, RunsDb, Selection, StoreLayout};

use crate::cli::GcArgs;
use crate::context::Context;
use crate::exit::{Outcome, bad_input};

/// The store layout of the context (shared by the store-related subcommands).
pub fn layout(ctx: &Context) -> StoreLayout {
    match &ctx.store_root {
        Some(root) => StoreLayout::chroot(root),
        None => StoreLayout::system(&ctx.store_dir, &ctx.nix_state_dir),
    }
}

/// Bytes for people.
pub fn size(n: u64) -> String {
    humansize::format_size(n, humansize::BINARY)
}

pub fn run(ctx: &Context, args: &GcArgs) -> anyhow::Result<Outcome> {
    let layout = layout(ctx);
    let older_than = args
        .older_than
        .as_deref()
        .map(drydock_gc::parse_duration)
        .transpose()
        .map_err(|e| bad_input(e.to_string()))?;
    let sel = Selection {
        keep_last: args.keep_last,
        older_than,
        runs: args.runs.clone(),
        all: args.all,
    };
    if !sel.all && sel.keep_last.is_none() && sel.older_than.is_none() && sel.runs.is_empty() {
        return Err(bad_input(
            "select what to collect: --keep-last N, --older-than DURATION, --run ID or --all",
        ));
    }
    if sel.all && (sel.keep_last.is_some() || sel.older_than.is_some() || !sel.runs.is_empty()) {
        return Err(bad_input("--all cannot be combined with run selections"));
    }
    // Validate the store before touching the runs database.
    let loaded = Loaded::load(&layout)?;
    let runs = RunsDb::open(&ctx.state_dir).map_err(drydock_gc::GcError::from)?;
    if !args.dry_run {
        drydock_gc::recover_interrupted(&layout, &runs)?;
    }
    let plan = drydock_gc::plan_gc(&loaded, Some(&runs), &sel, args.batch_size)?;
    drop(loaded);
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    if args.dry_run {
        if ctx.json {
            serde_json::to_writer_pretty(&mut out, &plan)?;
            writeln!(out)?;
        } else {
            for p in &plan.paths {
                writeln!(out, "{p}")?;
            }
            for k in &plan.kept {
                writeln!(out, "kept {}: {}", k.path, k.reason)?;
            }
            writeln!(
                out,
                "would delete {} paths, freeing about {} (NAR size {})",
                plan.paths.len(),
                size(plan.bytes),
                size(plan.nar_bytes)
            )?;
        }
        out.flush()?;
        return Ok(Outcome::Success);
    }
    let bar = indicatif::ProgressBar::new(plan.paths.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("deleting {bar:40} {pos}/{len} paths")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let result = drydock_gc::execute_gc(&layout, Some(&runs), &plan, &mut |done, _| {
        bar.set_position(done as u64)
    })?;
    bar.finish_and_clear();
    if ctx.json {
        serde_json::to_writer_pretty(
            &mut out,
            &serde_json::json!({
                "runs": plan.runs,
                "planned": plan.paths.len(),
                "deleted": result.deleted,
                "refused": result.refused,
                "bytes": plan.bytes,
                "freed_bytes": result.freed_bytes,
                "artifacts_removed": result.artifacts_removed,
            }),
        )?;
        writeln!(out)?;
    } else {
        for (p, why) in &result.refused {
            writeln!(out, "refused by Nix: {p}: {why}")?;
        }
        writeln!(
            out,
            "deleted {} of {} paths; freed {} (measured), {} estimated",
            result.deleted.len(),
            plan.paths.len(),
            size(result.freed_bytes.max(0) as u64),
            size(plan.bytes)
        )?;
    }
    out.flush()?;
    Ok(if result.refused.is_empty() {
        Outcome::Success
    } else {
        Outcome::Failed
    })
}
