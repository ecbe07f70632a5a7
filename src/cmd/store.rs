//! `drydock store check` / `drydock store repair`: registered-but-missing paths and stray
//! entries; repair removes the missing paths and their referrers through Nix.

use std::io::Write;

use drydock_gc::Loaded;

use crate::cli::{StoreAction, StoreArgs};
use crate::context::Context;
use crate::exit::Outcome;

/// `store check --json`.
#[derive(Debug, serde::Serialize)]
struct CheckReport<'a> {
    damaged: bool,
    missing: &'a [String],
    stray: &'a [String],
}

/// A damaged path that a root holds (repair refuses it).
#[derive(Debug, serde::Serialize)]
struct BlockedPath {
    path: String,
    root: String,
}

/// `store repair --json`.
#[derive(Debug, serde::Serialize)]
struct RepairReport<'a> {
    blocked: &'a [BlockedPath],
    missing: &'a [String],
    refused: &'a [(String, String)],
    remove: &'a [String],
    removed: &'a [String],
    roots_removed: &'a [String],
}

pub fn run(ctx: &Context, args: &StoreArgs) -> anyhow::Result<Outcome> {
    let layout = ctx.layout();
    let loaded = Loaded::load(&layout)?;
    let (loaded, damage, roots_removed, roots_refused) = match &args.action {
        StoreAction::Repair {
            dry_run: false,
            remove_roots: true,
        } => {
            let c = drydock_gc::clear_blocking_roots(loaded)?;
            (c.loaded, c.damage, c.removed, c.refused)
        }
        _ => {
            let damage = drydock_gc::check(&loaded)?;
            (loaded, damage, Vec::new(), Vec::new())
        }
    };
    for r in &roots_removed {
        eprintln!("drydock: removed root {r}");
    }
    for r in &roots_refused {
        eprintln!("drydock: not removing root {r} (not a link in gcroots or a result link)");
    }
    let missing: Vec<String> = damage
        .missing
        .iter()
        .map(|&n| layout.logical_of_base(loaded.snap.base_name(n)))
        .collect();
    let stray: Vec<String> = damage.stray.iter().map(|p| layout.logical(p)).collect();
    let mut out = crate::out::stdout();
    match &args.action {
        StoreAction::Check => {
            if ctx.json {
                crate::out::json(
                    &mut out,
                    &CheckReport {
                        damaged: damage.is_damaged(),
                        missing: &missing,
                        stray: &stray,
                    },
                )?;
            } else {
                for m in &missing {
                    writeln!(out, "missing: {m}")?;
                }
                for s in &stray {
                    writeln!(out, "stray (unregistered): {s}")?;
                }
                writeln!(
                    out,
                    "{} registered paths missing, {} stray entries",
                    missing.len(),
                    stray.len()
                )?;
            }
            out.flush()?;
            Ok(if damage.is_damaged() {
                Outcome::Failed
            } else {
                Outcome::Success
            })
        }
        StoreAction::Repair { dry_run, .. } => {
            let (plan, res) = drydock_gc::repair(&loaded, &damage, *dry_run)?;
            let names: Vec<String> = plan
                .delete
                .iter()
                .map(|&n| layout.logical_of_base(loaded.snap.base_name(n)))
                .collect();
            let blocked: Vec<BlockedPath> = plan
                .blocked
                .iter()
                .map(|b| BlockedPath {
                    path: layout.logical_of_base(loaded.snap.base_name(b.node)),
                    root: loaded.roots[b.root].link.display().to_string(),
                })
                .collect();
            let (gone, refused) = match &res {
                Some(r) => (
                    r.gone.iter().map(|p| layout.logical(p)).collect::<Vec<_>>(),
                    r.refused
                        .iter()
                        .map(|(p, w)| (layout.logical(p), w.clone()))
                        .collect::<Vec<_>>(),
                ),
                None => (vec![], vec![]),
            };
            if ctx.json {
                crate::out::json(
                    &mut out,
                    &RepairReport {
                        blocked: &blocked,
                        missing: &missing,
                        refused: &refused,
                        remove: &names,
                        removed: &gone,
                        roots_removed: &roots_removed,
                    },
                )?;
            } else {
                for b in &plan.blocked {
                    writeln!(
                        out,
                        "refusing: {} is held by root {}",
                        layout.logical_of_base(loaded.snap.base_name(b.node)),
                        loaded.roots[b.root].link.display()
                    )?;
                }
                if plan.blocked.is_empty() {
                    for n in &names {
                        writeln!(
                            out,
                            "{} {n}",
                            if *dry_run { "would remove" } else { "remove" }
                        )?;
                    }
                }
                for (p, w) in &refused {
                    writeln!(out, "refused by Nix: {p}: {w}")?;
                }
                writeln!(out, "{} paths removed from the database", gone.len())?;
            }
            out.flush()?;
            Ok(if plan.blocked.is_empty() && refused.is_empty() {
                Outcome::Success
            } else {
                Outcome::Failed
            })
        }
    }
}
