//! A nixos-test node's `regInfo=`: qemu-vm appends `regInfo=/nix/store/…/registration` to the
//! kernel command line, and the node loads that file (`nix-store --load-db`) at boot so Nix in
//! the guest knows the store paths it sees. drydock makes the same file: what
//! `nix-store --dump-db` prints for the system's closure, put into the store by Nix itself
//! (`nix-store --add` of a folder `closure-info` holding `registration`; the path is named by
//! its content, so the same closure gives the same path again). The caller pins it with the
//! machine's run and shows it in the machine's closure view.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use drydock_gc::StoreLayout;

/// How long each Nix call may take.
const NIX_DEADLINE: Duration = Duration::from_secs(120);
/// A registration larger than this is refused (a real NixOS closure's is a few MiB).
const MAX_REGISTRATION: usize = 256 << 20;

/// Why the registration could not be made.
#[derive(Debug, thiserror::Error)]
pub enum RegInfoError {
    #[error("cannot run {program}")]
    Spawn {
        program: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} failed: {message}")]
    Nix { command: String, message: String },
    #[error("the scratch folder")]
    Private(#[source] drydock_gc::PrivateError),
    #[error("cannot prepare {}", path.display())]
    Scratch {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl RegInfoError {
    /// Nix or the state folder failed: never the request's fault.
    pub fn is_bad_input(&self) -> bool {
        false
    }
}

/// Run `nix-store ARGS` on `layout`'s store: its stdout.
fn nix_store(layout: &StoreLayout, args: &[String]) -> Result<Vec<u8>, RegInfoError> {
    let mut cmd = Command::new("nix-store");
    cmd.args(layout.nix_args()).args(args);
    let what = format!(
        "nix-store {}",
        args.first().map(String::as_str).unwrap_or_default()
    );
    let r =
        crate::spawn::run_captured(cmd, NIX_DEADLINE).map_err(|source| RegInfoError::Spawn {
            program: "nix-store",
            source,
        })?;
    if r.timed_out {
        return Err(RegInfoError::Nix {
            command: what,
            message: format!("no answer within {NIX_DEADLINE:?}"),
        });
    }
    if r.code != Some(0) {
        return Err(RegInfoError::Nix {
            command: what,
            message: r.stderr.trim().to_string(),
        });
    }
    if r.stdout.len() > MAX_REGISTRATION {
        return Err(RegInfoError::Nix {
            command: what,
            message: format!("printed more than {MAX_REGISTRATION} bytes"),
        });
    }
    Ok(r.stdout.into_bytes())
}

/// The registration of `closure` (store path basenames) as a store path of `layout` (logical),
/// made in a scratch folder under `scratch` (private, removed again).
pub fn ensure_reginfo(
    layout: &StoreLayout,
    scratch: &Path,
    closure: &[String],
) -> Result<String, RegInfoError> {
    let mut args = vec!["--dump-db".to_string()];
    args.extend(
        closure
            .iter()
            .map(|n| format!("{}/{n}", layout.logical_store_dir)),
    );
    let registration = nix_store(layout, &args)?;
    let tag = format!(
        "reginfo-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    )
    .replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "");
    let dir = scratch.join(tag);
    let scratch_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| RegInfoError::Scratch { path, source }
    };
    drydock_gc::private_dir(scratch).map_err(RegInfoError::Private)?;
    let info = dir.join("closure-info");
    let made = (|| {
        std::fs::create_dir_all(&info).map_err(scratch_err(&info))?;
        let file = info.join("registration");
        std::fs::write(&file, &registration).map_err(scratch_err(&file))?;
        let out = nix_store(layout, &["--add".into(), info.display().to_string()])?;
        let path = String::from_utf8_lossy(&out).trim().to_string();
        if !layout.is_in_store(&path) || path.contains('\n') {
            return Err(RegInfoError::Nix {
                command: "nix-store --add".into(),
                message: format!("printed {path:?}, not a store path"),
            });
        }
        Ok(path)
    })();
    if let Err(e) = std::fs::remove_dir_all(&dir) {
        tracing::debug!("removing {}: {e}", dir.display());
    }
    made
}
