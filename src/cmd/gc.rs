//! `drydock gc`: the collection of selected runs (or every dead path with `--all`), planned and
//! carried out by the library (`drydock_vm::collect`: dead VM owners reaped, `nix-store
//! --delete`, store images no VM uses), printed with a progress bar and the space really freed.

use std::io::Write;

use drydock_gc::Selection;
use drydock_vm::{Collection, GcEvent};

use crate::cli::GcArgs;
use crate::context::Context;
use crate::exit::{Outcome, bad_input};

/// Bytes for people.
pub fn size(n: u64) -> String {
    humansize::format_size(n, humansize::BINARY)
}

pub fn run(ctx: &Context, args: &GcArgs) -> anyhow::Result<Outcome> {
    let ctx = &ctx.clone().store_of_runs();
    let layout = ctx.layout();
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
    let req = drydock_vm::GcRequest {
        layout: &layout,
        state_dir: &ctx.state_dir,
        selection: &sel,
        batch_size: args.batch_size,
        dry_run: args.dry_run,
    };
    let mut bar = None;
    let collected = drydock_vm::collect(&req, &mut |ev| match ev {
        GcEvent::Reaped(name) => {
            eprintln!("drydock: VM {name} had died with its owner; its run is ended now")
        }
        GcEvent::Deleting { done, total } => bar
            .get_or_insert_with(|| progress_bar(total))
            .set_position(done as u64),
    });
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let Collection {
        plan,
        outcome,
        images,
        artifacts,
    } = collected?;
    // Which images the VMs whose launch record is unreadable use is unknown: every image is
    // kept, and this says why.
    for (file, why) in &images.unreadable {
        eprintln!(
            "drydock: keeping every store image: cannot read {}: {why}",
            file.display()
        );
    }
    let images = images.images;
    let mut out = crate::out::stdout();
    let Some(result) = outcome else {
        if ctx.json {
            let doc = DryRunDoc {
                artifact_bytes: artifacts.iter().map(|(_, b)| b).sum(),
                artifacts: artifacts
                    .iter()
                    .map(|(p, b)| ArtifactDoc {
                        path: p.as_path(),
                        bytes: *b,
                    })
                    .collect(),
                bytes: plan.bytes,
                image_bytes: images.iter().map(|i| i.bytes).sum(),
                images: images.iter().map(|i| i.path.as_path()).collect(),
                junk: &plan.junk,
                kept: serde_json::to_value(&plan.kept)?,
                mode: &plan.mode,
                nar_bytes: plan.nar_bytes,
                paths: &plan.paths,
                runs: &plan.runs,
            };
            crate::out::json(&mut out, &doc)?;
        } else {
            for i in &images {
                writeln!(
                    out,
                    "{} (store image no VM will use, {})",
                    i.path.display(),
                    size(i.bytes)
                )?;
            }
            for (p, b) in &artifacts {
                writeln!(
                    out,
                    "{} (a selected run's artifact, {})",
                    p.display(),
                    size(*b)
                )?;
            }
            for p in &plan.paths {
                writeln!(out, "{p}")?;
            }
            for k in &plan.kept {
                match &k.alive {
                    Some(w) => writeln!(
                        out,
                        "kept {}: alive, {} root {}",
                        k.path, w.root_kind, w.root
                    )?,
                    None => writeln!(out, "kept {}: {}", k.path, k.reason)?,
                }
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
    };
    if ctx.json {
        let report = GcReport {
            artifacts_removed: &result.artifacts_removed,
            bytes: plan.bytes,
            deleted: &result.deleted,
            freed_bytes: result.freed_bytes,
            image_bytes: images.iter().map(|i| i.bytes).sum(),
            images_removed: images.iter().map(|i| i.path.as_path()).collect(),
            planned: plan.paths.len(),
            refused: &result.refused,
            runs: &plan.runs,
        };
        crate::out::json(&mut out, &report)?;
    } else {
        for (p, why) in &result.refused {
            writeln!(out, "refused by Nix: {p}: {why}")?;
        }
        for i in &images {
            writeln!(
                out,
                "removed store image {} ({}): no VM uses it",
                i.path.display(),
                size(i.bytes)
            )?;
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

/// The bar shown while `total` paths are deleted.
fn progress_bar(total: usize) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("deleting {bar:40} {pos}/{len} paths")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

/// The dry run's JSON document: the plan and the store images that would go. It is written
/// out as it is serialized (a plan can list a million paths), with its keys in alphabetical
/// order, nested ones too, as when it was built as a `serde_json::Value`.
#[derive(serde::Serialize)]
struct DryRunDoc<'a> {
    artifact_bytes: u64,
    artifacts: Vec<ArtifactDoc<'a>>,
    bytes: u64,
    image_bytes: u64,
    images: Vec<&'a std::path::Path>,
    junk: &'a [String],
    kept: serde_json::Value,
    mode: &'a str,
    nar_bytes: u64,
    paths: &'a drydock_gc::NameList,
    runs: &'a [i64],
}

/// An artifact a dry run would remove (a VM's folder, a cluster snapshot).
#[derive(serde::Serialize)]
struct ArtifactDoc<'a> {
    bytes: u64,
    path: &'a std::path::Path,
}

/// `gc --json` after a real collection (keys in the order JSON objects had before: sorted).
#[derive(Debug, serde::Serialize)]
struct GcReport<'a> {
    artifacts_removed: &'a [String],
    bytes: u64,
    deleted: &'a [String],
    /// Measured from the deleted inodes, never negative.
    freed_bytes: i64,
    image_bytes: u64,
    images_removed: Vec<&'a std::path::Path>,
    planned: usize,
    refused: &'a [(String, String)],
    runs: &'a [i64],
}
