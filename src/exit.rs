//! Exit codes and error printing. Library errors are typed; here they become the documented
//! codes of [`Outcome`]: 0 success, 1 the thing checked or asked for failed, 2 bad usage or
//! input, 130 interrupted (Ctrl-C, SIGTERM), and `track`'s wrapped command's own code. A report
//! whose reader went away (`drydock runs | head -1`) ends quietly with 0.

use std::process::ExitCode;

use drydock_gc::ExitClass;

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
        Ok(Outcome::Failed) => ExitCode::from(ExitClass::Failed.code()),
        Ok(Outcome::Interrupted) => ExitCode::from(ExitClass::Interrupted.code()),
        Ok(Outcome::Code(c)) => ExitCode::from(c),
        Err(err) if crate::out::is_closed_stdout(&err) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("drydock: error: {err:#}");
            ExitCode::from(class_of(&err).code())
        }
    }
}

/// The class of a command's error, from its chain: interrupted if anything in it says so,
/// else bad input if anything says so, else a failure. The binary's own [`BadInput`] counts
/// anywhere; drydock-vm's and drydock-cluster's errors count anywhere (see [`library_class`]); drydock-gc's errors
/// classify themselves (`drydock_gc::exit_class_of`): the outermost one speaks for its causes,
/// and one wrapped by a drydock-vm error is that error's to classify.
fn class_of(err: &anyhow::Error) -> ExitClass {
    let (mut interrupted, mut bad) = (false, false);
    let mut gc = None;
    let mut below_vm = false;
    for cause in err.chain() {
        bad |= cause.is::<BadInput>();
        if let Some(class) = library_class(cause) {
            interrupted |= class == ExitClass::Interrupted;
            bad |= class == ExitClass::BadInput;
            below_vm = true;
        } else if gc.is_none() && !below_vm {
            gc = drydock_gc::exit_class_of(cause);
        }
    }
    interrupted |= gc == Some(ExitClass::Interrupted);
    bad |= gc == Some(ExitClass::BadInput);
    if interrupted {
        ExitClass::Interrupted
    } else if bad {
        ExitClass::BadInput
    } else {
        ExitClass::Failed
    }
}

/// The class of `cause` if it is one of drydock-cluster's or drydock-vm's errors: each library
/// knows its own (`exit_class_of`), so no error type is listed here.
fn library_class(cause: &(dyn std::error::Error + 'static)) -> Option<ExitClass> {
    drydock_cluster::exit_class_of(cause).or_else(|| drydock_vm::exit_class_of(cause))
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    fn spawn_error() -> drydock_gc::TrackError {
        drydock_gc::TrackError::Spawn {
            program: "nix-store".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        }
    }

    #[test]
    fn gc_errors_classify_themselves_unless_a_vm_error_wraps_them() {
        let gc = |e: drydock_gc::GcError| anyhow::Error::new(e).context("doing it");
        let unknown = drydock_gc::GcError::from(drydock_gc::RunsDbError::UnknownRun(1));
        assert_eq!(class_of(&gc(unknown)), ExitClass::BadInput);
        let interrupted = drydock_gc::GcError::from(drydock_gc::TrackError::Interrupted {
            run_id: 1,
            exit_code: 0,
        });
        assert_eq!(class_of(&gc(interrupted)), ExitClass::Interrupted);
        assert_eq!(
            class_of(&gc(drydock_gc::GcError::from(spawn_error()))),
            ExitClass::BadInput
        );
        // The vm error wrapping it decides (preparing a composition's store is not the user's
        // input).
        let wrapped = anyhow::Error::new(drydock_cluster::EvalError::Store(spawn_error()));
        assert_eq!(class_of(&wrapped), ExitClass::Failed);
        let not_regular = Err::<(), _>(drydock_gc::ReadFileError::Link { path: "/x".into() })
            .context("reading")
            .unwrap_err();
        assert_eq!(class_of(&not_regular), ExitClass::Failed);
        assert_eq!(class_of(&anyhow::anyhow!("plain")), ExitClass::Failed);
        assert_eq!(class_of(&bad_input("no")), ExitClass::BadInput);
        // A folder of another user's, or one others can write: bad input, alone or wrapped.
        let loose = || drydock_gc::PrivateError::Loose {
            path: "/tmp/drydock-0".into(),
            mode: 0o777,
            who: "its group and every user",
        };
        assert_eq!(
            class_of(&anyhow::Error::new(loose()).context("starting")),
            ExitClass::BadInput
        );
        let cluster = drydock_cluster::ClusterError::NotPrivate(loose());
        assert_eq!(class_of(&anyhow::Error::new(cluster)), ExitClass::BadInput);
    }
}
