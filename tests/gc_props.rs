//! Property test on real chroot stores: random derivation DAGs built as tracked runs, random
//! roots (direct and indirect), random run selections. After every `gc`: nothing Nix listed
//! as live is gone, every selected dead path is gone unless the plan names an unselected
//! holder, and `nix-store --verify --check-contents` is clean. A final `gc --all` leaves
//! nothing for Nix's collector.

use crate::common;

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use common::{Drydock, nix_print_dead, nix_store, valid_paths};

/// A small deterministic generator (xorshift64*), so failures replay from the seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, pct: u64) -> bool {
        self.below(100) < pct
    }
}

const NODES: usize = 12;
const RUNS: usize = 3;

fn dag_expr(rng: &mut Rng, seed: u64) -> String {
    let mut body = String::new();
    for i in 0..NODES {
        let deps: Vec<String> = (0..i)
            .filter(|_| rng.chance(25))
            .map(|j| format!("n{j}"))
            .collect();
        let name = match i % 3 {
            0 => format!("vm-test-run-s{seed}-{i}"),
            1 => format!("nixos-test-driver-s{seed}-{i}"),
            _ => format!("lib-s{seed}-{i}"),
        };
        let refs: String = deps.iter().map(|d| format!("${{{d}}} ")).collect();
        body.push_str(&format!(
            "  n{i} = mk \"{name}\" [ {} ] \"echo {refs} > $out\";\n",
            deps.join(" ")
        ));
    }
    let all: Vec<String> = (0..NODES).map(|i| format!("n{i}")).collect();
    format!(
        "let {}\n{body}  all = {{ {} }};\nin all",
        common::PRELUDE,
        all.iter()
            .map(|n| format!("{n} = {n};"))
            .collect::<String>()
    )
}

fn build_attrs(root: &Path, state: &Path, file: &Path, attrs: &[usize]) {
    let extra: String = attrs.iter().map(|a| format!(" -A n{a}")).collect();
    common::track_ok(
        root,
        state,
        &common::nix_build_cmd(root, file, &format!("--no-out-link{extra}")),
    );
}

/// Returns how many paths the selected-runs collection deleted.
fn one_case(seed: u64) -> usize {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let dir = common::scratch(&format!("gc-props-{seed}"));
    let root = dir.join("root");
    let state = dir.join("state");
    std::fs::create_dir_all(&root).unwrap();
    let file = dir.join("dag.nix");
    std::fs::write(&file, dag_expr(&mut rng, seed)).unwrap();
    // Split the top-level attributes into tracked runs.
    let mut runs: Vec<Vec<usize>> = vec![Vec::new(); RUNS];
    for i in 0..NODES {
        runs[rng.below(RUNS as u64) as usize].push(i);
    }
    for r in runs.iter().filter(|r| !r.is_empty()) {
        build_attrs(&root, &state, &file, r);
    }
    let run_ids: Vec<i64> = Drydock::on(&root, &state)
        .json()
        .args(["runs"])
        .run()
        .ok()
        .stdout_json()["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_i64().unwrap())
        .collect();
    // Random roots: direct links in gcroots, indirect links through gcroots/auto.
    let valid = valid_paths(&root);
    let outputs: Vec<&String> = valid.iter().filter(|p| !p.ends_with(".drv")).collect();
    for (k, p) in outputs.iter().enumerate() {
        if rng.chance(20) {
            std::os::unix::fs::symlink(p, root.join(format!("nix/var/nix/gcroots/r{k}"))).unwrap();
        } else if rng.chance(15) {
            let link = dir.join(format!("result-{k}"));
            std::os::unix::fs::symlink(p, &link).unwrap();
            std::os::unix::fs::symlink(&link, root.join(format!("nix/var/nix/gcroots/auto/a{k}")))
                .unwrap();
        }
    }
    // Random selection.
    let selected: Vec<i64> = run_ids.iter().copied().filter(|_| rng.chance(60)).collect();
    if selected.is_empty() {
        return 0;
    }
    let claimed_by: HashMap<String, i64> = {
        let db = drydock_gc::RunsDb::open(&state).unwrap();
        run_ids
            .iter()
            .flat_map(|&id| {
                db.run_paths(id)
                    .unwrap()
                    .into_iter()
                    .map(move |p| (p.path, id))
            })
            .collect()
    };
    let live: BTreeSet<String> = nix_store(&root, &["--gc", "--print-live"])
        .into_iter()
        .collect();
    let dead: BTreeSet<String> = nix_print_dead(&root).into_iter().collect();
    let mut args = vec!["gc".to_owned()];
    for id in &selected {
        args.push("--run".into());
        args.push(id.to_string());
    }
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut dry = argv.clone();
    dry.push("--dry-run");
    let plan = Drydock::on(&root, &state)
        .json()
        .args(&dry)
        .run()
        .ok()
        .stdout_json();
    let done = Drydock::on(&root, &state)
        .json()
        .args(&argv)
        .run()
        .ok()
        .stdout_json();
    let deleted = done["deleted"].as_array().unwrap().len();
    assert!(
        done["refused"].as_array().unwrap().is_empty(),
        "seed {seed}: {done}"
    );

    let after: BTreeSet<String> = valid_paths(&root).into_iter().collect();
    let store = root.join("nix/store");
    for p in &live {
        assert!(after.contains(p), "seed {seed}: live {p} is gone");
        assert!(store.join(&p["/nix/store/".len()..]).exists());
    }
    let kept: HashMap<String, String> = plan["kept"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            (
                k["path"].as_str().unwrap().to_owned(),
                k["reason"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    for (p, run) in &claimed_by {
        if !selected.contains(run) || !dead.contains(p) {
            continue;
        }
        if after.contains(p) {
            // Kept only because an unselected path needs it.
            let why = kept
                .get(p)
                .unwrap_or_else(|| panic!("seed {seed}: {p} kept silently"));
            let holder = why
                .strip_prefix("needed by ")
                .and_then(|r| r.strip_suffix(" (not selected)"))
                .unwrap_or_else(|| panic!("seed {seed}: {p}: {why}"));
            assert!(
                claimed_by.get(holder).is_none_or(|r| !selected.contains(r)),
                "seed {seed}: {p} held by selected {holder}"
            );
        }
    }
    nix_store(&root, &["--verify", "--check-contents"]);

    // A full collection leaves nothing for Nix.
    Drydock::on(&root, &state)
        .json()
        .args(["gc", "--all"])
        .run()
        .ok()
        .stdout_json();
    assert!(nix_print_dead(&root).is_empty(), "seed {seed}");
    for p in &live {
        assert!(
            store.join(&p["/nix/store/".len()..]).exists(),
            "seed {seed}: {p}"
        );
    }
    nix_store(&root, &["--verify", "--check-contents"]);
    deleted
}

#[test]
fn random_dags_roots_and_selections() {
    let cases: u64 = std::env::var("DRYDOCK_PROP_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12);
    let mut deleted = 0;
    for seed in 1..=cases {
        deleted += one_case(seed);
    }
    assert!(deleted > 0, "the cases never deleted anything");
}
