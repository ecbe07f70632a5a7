//! `drydock du`: disk used by test artifacts, by category and by run, hard links once.

use std::io::Write;

use drydock_gc::RunsDb;

use crate::cli::DuArgs;
use crate::context::Context;
use crate::exit::Outcome;

use super::gc::size;

/// `du --json`: the library's report, plus the store images (drydock state) on their own.
#[derive(Debug, serde::Serialize)]
struct DuJson<'a> {
    #[serde(flatten)]
    report: &'a drydock_gc::DuReport,
    store_images: StoreImages,
}

#[derive(Debug, serde::Serialize)]
struct StoreImages {
    bytes: u64,
    count: usize,
}

pub fn run(ctx: &Context, _args: &DuArgs) -> anyhow::Result<Outcome> {
    let ctx = &ctx.clone().store_of_runs();
    let layout = ctx.layout();
    drydock_gc::NixDb::open(&layout).map_err(drydock_gc::GcError::from)?;
    let runs = RunsDb::open(&ctx.state_dir).map_err(drydock_gc::GcError::from)?;
    let rep = drydock_gc::du(&layout, Some(&runs))?;
    // Store images are drydock state shared by the VMs of one closure: shown on their own.
    let images = drydock_vm::list_images(&super::vm::images_dir(ctx))?;
    let image_bytes: u64 = images.iter().map(|i| i.bytes).sum();
    let mut out = crate::out::stdout();
    if ctx.json {
        let doc = DuJson {
            report: &rep,
            store_images: StoreImages {
                bytes: image_bytes,
                count: images.len(),
            },
        };
        crate::out::json(&mut out, &doc)?;
        out.flush()?;
        return Ok(Outcome::Success);
    }
    for (c, b) in &rep.by_class {
        writeln!(out, "{:<14} {:>12}", c.as_str(), size(*b))?;
    }
    writeln!(out, "{:<14} {:>12}", "drydock_state", size(rep.state_dir))?;
    writeln!(
        out,
        "  {:<12} {:>12}  ({} store images, part of drydock_state)",
        "of which",
        size(image_bytes),
        images.len()
    )?;
    for (id, name, b) in &rep.by_run {
        writeln!(out, "run {id:<10} {:>12}  {name}", size(*b))?;
    }
    writeln!(out, "{:<14} {:>12}", "total", size(rep.total))?;
    out.flush()?;
    Ok(Outcome::Success)
}
