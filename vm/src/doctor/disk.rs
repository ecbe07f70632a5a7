//! Free space where the Nix store and drydock's state live: VM tests write store paths, disk
//! images and overlays, and a full disk fails them in confusing ways.

use std::path::Path;

use super::{Finding, Status, gib};
use crate::host::Host;

const MIN_FREE: u64 = 10 << 30;
const MIN_PERCENT: u64 = 10;

pub(crate) fn check(host: &Host, store_dir: &Path, state_dir: &Path) -> Vec<Finding> {
    [
        ("disk.store", "Nix store", store_dir),
        ("disk.state", "drydock state", state_dir),
    ]
    .into_iter()
    .map(|(id, what, dir)| one(host, id, what, dir))
    .collect()
}

fn one(host: &Host, id: &str, what: &str, dir: &Path) -> Finding {
    let (at, space) = match host.space(dir) {
        Ok(x) => x,
        Err(e) => {
            return Finding::new(
                id,
                Status::Warn,
                format!("cannot measure free space for the {what}: {e}"),
            )
            .detail(dir.display().to_string());
        }
    };
    let percent = space
        .available
        .saturating_mul(100)
        .checked_div(space.total)
        .unwrap_or(0);
    let detail = format!(
        "{} free of {} ({percent}%) on the file system of {} (for {})",
        gib(space.available),
        gib(space.total),
        at.display(),
        dir.display()
    );
    verdict(id, what, space.available, percent).detail(detail)
}

/// Warn below 10 GiB or below 10% free.
pub(crate) fn verdict(id: &str, what: &str, available: u64, percent: u64) -> Finding {
    if available < MIN_FREE || percent < MIN_PERCENT {
        Finding::new(id, Status::Warn, format!("low disk space for the {what}: {} free ({percent}%)", gib(available)))
            .fix("free space: `drydock gc --dry-run` shows what test runs can be reclaimed; `drydock du` shows what they hold")
    } else {
        Finding::new(
            id,
            Status::Pass,
            format!("{} free for the {what}", gib(available)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds() {
        assert_eq!(verdict("d", "x", 50 << 30, 50).status, Status::Pass);
        assert_eq!(verdict("d", "x", 9 << 30, 50).status, Status::Warn);
        assert_eq!(verdict("d", "x", 500 << 30, 5).status, Status::Warn);
    }

    #[test]
    fn measures_the_nearest_existing_ancestor() {
        let d = tempfile::tempdir().unwrap();
        let host = Host::at(d.path());
        let f = check(&host, Path::new("/does/not/exist/yet"), Path::new("/"));
        assert_eq!(f.len(), 2);
        assert!(f[0].detail.contains("free of"), "{:?}", f[0]);
    }
}
