//! Which runs a collection selects (`--keep-last`, `--older-than`, `--run`, `--all`): pure
//! rules over the recorded runs, and their bad-usage errors.

use crate::exitclass::{Classify, ExitClass};
use crate::runsdb::Run;

/// Errors of selection (bad usage).
#[derive(Debug, thiserror::Error)]
pub enum SelectError {
    /// Nothing selected.
    #[error("select what to collect: --keep-last N, --older-than DURATION, --run ID or --all")]
    NothingSelected,
    /// A run that is still running and holds pins (a live VM).
    #[error("run {0} is still running (its VM pins its closure); stop it first")]
    StillRunning(i64),
    /// A duration that cannot be parsed.
    #[error("--older-than '{0}': expected a number followed by s, m, h, d or w (e.g. 7d)")]
    BadDuration(String),
}

impl Classify for SelectError {
    /// Bad usage, always.
    fn exit_class(&self) -> ExitClass {
        ExitClass::BadInput
    }
}

/// Which runs (or everything) to collect.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// Keep the N most recent finished runs, select the others.
    pub keep_last: Option<usize>,
    /// Select runs that ended more than this many seconds ago.
    pub older_than: Option<i64>,
    /// Select these runs.
    pub runs: Vec<i64>,
    /// Every dead path of the store, like a full Nix GC.
    pub all: bool,
}

/// Parse `30s`, `15m`, `12h`, `7d`, `2w` into seconds.
pub fn parse_duration(s: &str) -> Result<i64, SelectError> {
    let bad = || SelectError::BadDuration(s.to_owned());
    let t = s.trim();
    let (num, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let n: i64 = num.parse().map_err(|_| bad())?;
    let mul = match unit {
        "s" | "" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        "w" => 7 * 86400,
        _ => return Err(bad()),
    };
    n.checked_mul(mul).ok_or_else(bad)
}

/// The selected runs (finished runs only for the filters; explicit ids must exist).
pub fn select_runs(runs: &[Run], sel: &Selection, now: i64) -> Vec<i64> {
    let mut out: Vec<i64> = Vec::new();
    if sel.keep_last.is_some() || sel.older_than.is_some() {
        let mut finished: Vec<&Run> = runs.iter().filter(|r| r.ended_at.is_some()).collect();
        finished.sort_by_key(|r| (r.started_at, r.id));
        let keep = sel.keep_last.unwrap_or(0).min(finished.len());
        let candidates = &finished[..finished.len() - keep];
        for r in candidates {
            let old_enough = sel
                .older_than
                .is_none_or(|age| r.ended_at.unwrap_or(now) <= now - age);
            if old_enough {
                out.push(r.id);
            }
        }
    }
    out.extend(sel.runs.iter().copied());
    out.sort_unstable();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(id: i64, started: i64, ended: Option<i64>) -> Run {
        Run {
            id,
            name: String::new(),
            command: vec![],
            kind: crate::runsdb::RunKind::Build,
            started_at: started,
            ended_at: ended,
            exit_status: Some(0),
            collected_at: None,
            store: None,
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("7d").unwrap(), 7 * 86400);
        assert_eq!(parse_duration("90").unwrap(), 90);
        assert_eq!(parse_duration("2w").unwrap(), 14 * 86400);
        assert!(parse_duration("d").is_err());
        assert!(parse_duration("7y").is_err());
        assert!(parse_duration("99999999999999999999d").is_err());
    }

    #[test]
    fn selection_rules() {
        let runs = vec![
            run(1, 100, Some(110)),
            run(2, 200, Some(210)),
            run(3, 300, Some(310)),
            run(4, 400, None),
        ];
        let sel = |k, o, r: Vec<i64>| Selection {
            keep_last: k,
            older_than: o,
            runs: r,
            all: false,
        };
        assert_eq!(
            select_runs(&runs, &sel(Some(1), None, vec![]), 1000),
            vec![1, 2]
        );
        assert_eq!(
            select_runs(&runs, &sel(Some(0), None, vec![]), 1000),
            vec![1, 2, 3]
        );
        assert_eq!(
            select_runs(&runs, &sel(None, Some(790), vec![]), 1000),
            vec![1, 2]
        );
        assert_eq!(
            select_runs(&runs, &sel(Some(2), Some(800), vec![]), 1000),
            vec![1]
        );
        assert_eq!(
            select_runs(&runs, &sel(None, None, vec![3, 3]), 1000),
            vec![3]
        );
        assert!(select_runs(&runs, &sel(Some(10), None, vec![]), 1000).is_empty());
    }
}
