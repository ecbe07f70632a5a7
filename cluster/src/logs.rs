//! Console logs of a cluster's machines: each console line stamped with its arrival
//! (`console.timed`, written by the owner as its console pump hands the line on, bounded like
//! `console.log`), the merge of several machines' timed logs in time order, and following them
//! from another process (`logs --follow`), blocking until they grow.

use std::os::fd::AsFd;
use std::path::PathBuf;

use drydock_gc::Cancel;
use drydock_vm::{BoundedLog, ConsoleTail, LogWatch, ProcessWatch, VmPaths, rotate_at, rotated};

use crate::state::ClusterState;

/// A machine's console lines, each stamped with its arrival (ms since the epoch, a tab, the line).
pub fn timed_log(paths: &VmPaths) -> PathBuf {
    paths.dir.join("console.timed")
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Start a new cluster's machine with empty logs: its console log and timed log, and their
/// rotated files, go.
pub(crate) fn clear_logs(paths: &VmPaths) {
    for p in [paths.console_log(), timed_log(paths)] {
        let _ = std::fs::remove_file(rotated(&p));
        let _ = std::fs::remove_file(p);
    }
}

/// A machine's timed log, written as its lines arrive. It continues across the machine's
/// restarts; it is rotated as the console log is (see `drydock_vm::BoundedLog`).
#[derive(Debug)]
pub(crate) struct TimedLog {
    log: Option<BoundedLog>,
    warned: bool,
}

impl TimedLog {
    pub(crate) fn open(paths: &VmPaths, limit: u64) -> Self {
        let path = timed_log(paths);
        let log = BoundedLog::append(&path, rotate_at(limit))
            .inspect_err(|e| tracing::warn!("cannot write {}: {e}", path.display()))
            .ok();
        Self { log, warned: false }
    }

    pub(crate) fn line(&mut self, line: &str) {
        let Some(log) = self.log.as_mut() else {
            return;
        };
        if let Err(e) = log.write(format!("{}\t{line}\n", now_ms()).as_bytes()) {
            if !self.warned {
                tracing::warn!("cannot write {}: {e}", log.path().display());
                self.warned = true;
            }
        }
    }
}

/// Parse a timed log (see [`timed_log`]); lines without a stamp are skipped.
pub fn parse_timed(text: &str) -> Vec<(u64, String)> {
    text.lines().filter_map(parse_timed_line).collect()
}

fn parse_timed_line(l: &str) -> Option<(u64, String)> {
    let (t, line) = l.split_once('\t')?;
    Some((t.parse().ok()?, line.to_string()))
}

/// Merge machines' timed lines in time order; lines of one machine keep their order, and
/// lines stamped in the same millisecond follow the machines' order.
pub fn merge_timed(logs: Vec<(String, Vec<(u64, String)>)>) -> Vec<(u64, String, String)> {
    let mut all: Vec<(u64, usize, usize, String, String)> = logs
        .into_iter()
        .enumerate()
        .flat_map(|(mi, (m, lines))| {
            lines
                .into_iter()
                .enumerate()
                .map(move |(li, (t, l))| (t, mi, li, m.clone(), l))
        })
        .collect();
    all.sort_by_key(|x| (x.0, x.1, x.2));
    all.into_iter().map(|(t, _, _, m, l)| (t, m, l)).collect()
}

/// `logs`: the timed logs of `machines` (name and folder) of the cluster `cluster`, merged in
/// time order, each line to `out` (time, machine, line, as the guest printed it: the caller
/// escapes it for a terminal); with `tail`, only the last `tail` lines each machine has then.
/// With `follow`, then every new line, as it comes (blocking on the files between lines), until
/// the cluster is down or `cancel` is set.
pub fn follow_logs(
    state_dir: &std::path::Path,
    cluster: &str,
    machines: &[(String, VmPaths)],
    follow: bool,
    tail: Option<usize>,
    cancel: &Cancel,
    out: &mut dyn FnMut(u64, &str, &str) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let mut tails: Vec<(String, ConsoleTail)> = machines
        .iter()
        .map(|(m, p)| (m.clone(), ConsoleTail::with_rotated(timed_log(p))))
        .collect();
    // The owner's exit ends the follow: it is what `down` waits for, too.
    let owner = match follow {
        true => ClusterState::read_up(state_dir, cluster)
            .and_then(|s| ProcessWatch::open(s.owner_pid, s.owner_start_ticks)),
        false => None,
    };
    let mut watch = LogWatch::new();
    for (_, t) in &tails {
        watch.add(t.path());
    }
    let wake = drydock_vm::wake_pair()?;
    let w = wake.0.clone();
    let _woken = cancel.on_cancel(move || w.wake());
    // `tail` cuts the first batch only: what comes after it is new.
    let mut tail = tail;
    loop {
        let batch = tails
            .iter_mut()
            .map(|(m, t)| {
                let lines: Vec<_> = t
                    .lines()
                    .iter()
                    .filter_map(|l| parse_timed_line(l))
                    .collect();
                let skip = tail.map_or(0, |n| lines.len().saturating_sub(n));
                (m.clone(), lines.into_iter().skip(skip).collect())
            })
            .collect();
        tail = None;
        for (t, m, line) in merge_timed(batch) {
            out(t, &m, &line)?;
        }
        let Some(owner) = &owner else {
            return Ok(());
        };
        if owner.exited() || cancel.is_set() {
            return Ok(());
        }
        watch.wait(&[owner.as_fd(), wake.1.as_fd()], None)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timed_logs_merge_in_time_order() {
        let a = parse_timed("10\ta1\n30\ta2\nnoise\n30\ta3\n");
        let b = parse_timed("20\tb1\n30\tb2\n");
        let merged: Vec<(String, String)> = merge_timed(vec![("a".into(), a), ("b".into(), b)])
            .into_iter()
            .map(|(_, m, l)| (m, l))
            .collect();
        let want = [
            ("a", "a1"),
            ("b", "b1"),
            ("a", "a2"),
            ("a", "a3"),
            ("b", "b2"),
        ];
        assert_eq!(
            merged,
            want.map(|(m, l)| (m.to_string(), l.to_string())).to_vec()
        );
    }

    #[test]
    fn a_timed_log_is_stamped_bounded_and_read_with_its_rotated_file() {
        let d = tempfile::tempdir().unwrap();
        let paths = VmPaths {
            dir: d.path().to_path_buf(),
            sockets: d.path().to_path_buf(),
        };
        let limit = drydock_vm::MIN_LOG_LIMIT;
        let mut t = TimedLog::open(&paths, limit);
        let line = "x".repeat(100);
        for _ in 0..2000 {
            t.line(&line);
        }
        let size = |p: PathBuf| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        let on_disk = size(timed_log(&paths)) + size(rotated(&timed_log(&paths)));
        assert!(on_disk <= limit / 2, "{on_disk} bytes");
        let read = |tail: Option<usize>| {
            let mut got = Vec::new();
            follow_logs(
                d.path(),
                "none",
                &[("m".into(), paths.clone())],
                false,
                tail,
                &Cancel::new(),
                &mut |_, m, l| {
                    got.push((m.to_string(), l.to_string()));
                    Ok(())
                },
            )
            .unwrap();
            got
        };
        let got = read(None);
        assert!(got.len() > 100 && got.iter().all(|(m, l)| m == "m" && *l == line));
        assert_eq!(read(Some(3)).len(), 3);
        clear_logs(&paths);
        assert_eq!(
            size(timed_log(&paths)) + size(rotated(&timed_log(&paths))),
            0
        );
    }
}
