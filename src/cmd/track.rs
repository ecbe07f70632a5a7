//! `drydock track [--name N] -- CMD...`: run CMD, pass its exit code through, and record
//! the store paths it built as a run.

use drydock_gc::RunsDb;

use crate::cli::TrackArgs;
use crate::context::Context;
use crate::exit::Outcome;

pub fn run(ctx: &Context, args: &TrackArgs) -> anyhow::Result<Outcome> {
    let layout = ctx.layout();
    let runs = RunsDb::open(&ctx.state_dir).map_err(drydock_gc::GcError::from)?;
    let cancel = crate::cancel::install();
    let report = drydock_gc::track(&layout, &runs, args.name.as_deref(), &args.command, cancel)?;
    if ctx.json {
        eprintln!("{}", serde_json::to_string(&report)?);
    } else {
        eprintln!(
            "drydock: run {} recorded {} paths ({} others registered meanwhile not claimed)",
            report.run_id,
            report.claimed.len(),
            report.not_claimed
        );
    }
    Ok(Outcome::Code(report.exit_code.clamp(0, 255) as u8))
}
