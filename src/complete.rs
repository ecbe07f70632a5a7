//! Dynamic shell completion (clap_complete's `COMPLETE=SHELL drydock -- WORDS`, which the script
//! `drydock completions SHELL` prints sets up): besides commands and options, the names of
//! the machines and of the clusters that are up in the default state directory
//! (`$DRYDOCK_STATE_DIR` or its default; a `--state-dir` on the line being completed is not
//! seen).

use clap_complete::engine::CompletionCandidate;

/// The clusters that are up.
fn up() -> Vec<drydock_cluster::ClusterState> {
    drydock_cluster::list_up(&crate::context::default_state_dir())
}

/// Cluster names, for `-p`.
pub fn clusters() -> Vec<CompletionCandidate> {
    up().into_iter()
        .map(|s| {
            let file = s
                .file()
                .map(|f| f.display().to_string())
                .unwrap_or_default();
            CompletionCandidate::new(s.name).help(Some(file.into()))
        })
        .collect()
}

/// Machine names of every cluster that is up, for `exec`, `shell`, `wait`, `logs`, `up`.
pub fn machines() -> Vec<CompletionCandidate> {
    let mut names: Vec<(String, String)> = up()
        .into_iter()
        .flat_map(|s| {
            let cluster = s.name.clone();
            s.plan
                .machines
                .into_iter()
                .map(move |m| (m.machine, cluster.clone()))
        })
        .collect();
    names.sort();
    names.dedup_by(|a, b| a.0 == b.0);
    names
        .into_iter()
        .map(|(m, c)| CompletionCandidate::new(m).help(Some(format!("in {c}").into())))
        .collect()
}
