//! Exit codes and error printing. Library errors are typed; here they become the documented
//! codes of [`Outcome`]: 0 success, 1 the thing checked or asked for failed, 2 bad usage or
//! input, 130 interrupted (Ctrl-C, SIGTERM), and `track`'s wrapped command's own code. A report
//! whose reader went away (`drydock runs | head -1`) ends quietly with 0.

use std::process::ExitCode;

/// What a subcommand reports when it did its job: the job may still have found failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Everything checked or asked for succeeded.
    Success,
    /// The command ran, and what it checked failed (exit 1).
    Failed,
    /// Interrupted by Ctrl-C, SIGTERM or SIGHUP after cleaning up (exit 130).
    Interrupted,
    /// Pass a wrapped command's exit code through (`track`).
    Code(u8),
}

/// The exit codes, for `--help` and the README.
pub const EXIT_CODES_HELP: &str = "Exit codes: 0 success; 1 the thing checked or asked for failed \
(a failing doctor check, damage found, a guest that never became ready); 2 bad usage or bad input \
(the message names it); 130 interrupted (Ctrl-C or SIGTERM; everything started was stopped); \
track: the wrapped command's own code. A closed standard output (`drydock runs | head -1`) ends \
quietly with 0.";

/// Bad usage or bad input: exit 2. The message names the input.
#[derive(Debug)]
pub struct BadInput(pub String);

impl std::fmt::Display for BadInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadInput {}

/// Build a bad-input error from anything displayable.
pub fn bad_input(msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(BadInput(msg.into()))
}

/// Print the error chain once and choose the exit code.
pub fn finish(result: anyhow::Result<Outcome>) -> ExitCode {
    match result {
        Ok(Outcome::Success) => ExitCode::SUCCESS,
        Ok(Outcome::Failed) => ExitCode::from(1),
        Ok(Outcome::Interrupted) => ExitCode::from(130),
        Ok(Outcome::Code(c)) => ExitCode::from(c),
        Err(err) if crate::out::is_closed_stdout(&err) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("drydock: error: {err:#}");
            if is_interrupted(&err) {
                ExitCode::from(130)
            } else if is_bad_input(&err) {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}

fn is_interrupted(err: &anyhow::Error) -> bool {
    err.chain().any(|c| {
        c.downcast_ref::<drydock_gc::GcError>()
            .is_some_and(|e| e.is_interrupted())
            || c.downcast_ref::<drydock_cluster::SessionError>()
                .is_some_and(|e| e.is_interrupted())
    })
}

fn is_bad_input(err: &anyhow::Error) -> bool {
    use drydock_vm as vm;
    err.chain().any(|cause| {
        cause.is::<BadInput>()
            || cause
                .downcast_ref::<vm::DoctorError>()
                .is_some_and(|e| e.is_bad_input())
            || cause
                .downcast_ref::<vm::LaunchError>()
                .is_some_and(|e| e.is_bad_input())
            || cause
                .downcast_ref::<vm::SnapshotError>()
                .is_some_and(|e| e.is_bad_input())
            || cause
                .downcast_ref::<vm::ImageError>()
                .is_some_and(|e| e.is_bad_input())
            || cause
                .downcast_ref::<vm::StoreServerError>()
                .is_some_and(|e| e.is_bad_input())
            || cause
                .downcast_ref::<vm::SpawnError>()
                .is_some_and(|e| e.is_bad_input())
            || cause
                .downcast_ref::<vm::PlanError>()
                .is_some_and(|e| e.is_bad_input())
            || cause
                .downcast_ref::<vm::LifecycleError>()
                .is_some_and(|e| e.is_bad_input())
            || cause
                .downcast_ref::<vm::OwnerError>()
                .is_some_and(|e| e.is_bad_input())
            || cause
                .downcast_ref::<vm::ResolveError>()
                .is_some_and(|e| e.is_bad_input())
            || cause
                .downcast_ref::<vm::SystemError>()
                .is_some_and(|e| e.is_bad_input())
            || cause
                .downcast_ref::<drydock_cluster::ComposeError>()
                .is_some_and(|e| e.is_bad_input())
            || cause
                .downcast_ref::<drydock_cluster::ClusterError>()
                .is_some_and(|e| e.is_bad_input())
            || cause
                .downcast_ref::<drydock_cluster::EvalError>()
                .is_some_and(|e| e.is_bad_input())
            || cause
                .downcast_ref::<drydock_cluster::ReloadError>()
                .is_some_and(|e| e.is_bad_input())
            || cause
                .downcast_ref::<drydock_cluster::SessionError>()
                .is_some_and(|e| e.is_bad_input())
            || cause
                .downcast_ref::<drydock_gc::GcError>()
                .is_some_and(|e| e.is_bad_input())
            || cause
                .downcast_ref::<drydock_gc::PrivateError>()
                .is_some_and(|e| e.is_bad_input())
    })
}
