//! Console logs of a cluster's machines: each console line stamped with its arrival
//! (`console.timed`), and the merge of several machines' timed logs in time order.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use drydock_vm::VmPaths;

/// One console being stamped: its tail, its timed log and that log once opened.
#[derive(Debug)]
pub(crate) struct Stamp {
    tail: drydock_vm::ConsoleTail,
    path: PathBuf,
    file: Option<std::fs::File>,
}

impl Stamp {
    /// Stamp the lines of `tail` into the timed log `path` (opened at the first line).
    pub(crate) fn new(tail: drydock_vm::ConsoleTail, path: PathBuf) -> Self {
        Self {
            tail,
            path,
            file: None,
        }
    }
}

/// The consoles being stamped, by machine (a machine's log is closed when it is removed).
pub(crate) type Tails = Arc<Mutex<BTreeMap<String, Stamp>>>;

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

pub(crate) fn stamp_consoles(tails: &Tails, stop: &AtomicBool) {
    loop {
        let last = stop.load(Ordering::SeqCst);
        let mut tails = tails.lock().unwrap_or_else(|e| e.into_inner());
        for Stamp { tail, path, file } in tails.values_mut() {
            let mut lines = tail.lines();
            if last {
                lines.extend(tail.rest());
            }
            if lines.is_empty() {
                continue;
            }
            if file.is_none() {
                *file = drydock_gc::open_append_nofollow(path).ok();
            }
            if let Some(f) = file {
                let t = now_ms();
                let text: String = lines.iter().map(|l| format!("{t}\t{l}\n")).collect();
                let _ = f.write_all(text.as_bytes());
            }
        }
        drop(tails);
        if last {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Parse a timed log (see [`timed_log`]); lines without a stamp are skipped.
pub fn parse_timed(text: &str) -> Vec<(u64, String)> {
    text.lines()
        .filter_map(|l| {
            let (t, line) = l.split_once('\t')?;
            Some((t.parse().ok()?, line.to_string()))
        })
        .collect()
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
}
