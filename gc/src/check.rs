//! Store damage: paths registered in Nix's database but missing on disk (typically after an
//! `rm -rf` in the store), and stray unregistered entries. Also the pure repair plan: the
//! missing paths and everything that refers to them, to be removed from Nix's database
//! through `nix-store --delete`, unless a live root holds them. The directory listing itself
//! is [`crate::ondisk`].

use crate::nixdb::{Node, Snapshot};
use crate::ondisk::OnDisk;
use crate::plan::{ChainStep, GcSettings, Liveness, for_each_reverse};
use crate::store_path::StorePath;

/// What `store check` found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Damage {
    /// Registered, but not on disk.
    pub missing: Vec<Node>,
    /// On disk with a store path name, but not registered.
    pub stray: Vec<StorePath>,
}

impl Damage {
    /// Whether the store is damaged (registered paths are missing).
    pub fn is_damaged(&self) -> bool {
        !self.missing.is_empty()
    }

    /// Compare the database with the directory listing (resolved against the snapshot).
    pub fn of(snap: &Snapshot, disk: &OnDisk) -> Self {
        let missing = (0..snap.len() as Node)
            .filter(|&n| !disk.is_present(n))
            .collect();
        let mut stray = disk.unregistered.clone();
        stray.sort();
        Damage { missing, stray }
    }
}

/// A registered path of the repair set held by a root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocked {
    /// The path that would have to be removed from the database.
    pub node: Node,
    /// Index of the root holding it (into the roots given to the liveness computation).
    pub root: usize,
    /// The chain from the root to the path.
    pub chain: Vec<ChainStep>,
}

/// What `store repair` will do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RepairPlan {
    /// The missing paths and everything that (transitively) refers to them: all must leave
    /// the database together. Only valid when `blocked` is empty.
    pub delete: Vec<Node>,
    /// Members of `delete` that a root keeps alive (then nothing is done).
    pub blocked: Vec<Blocked>,
}

/// Plan the repair of `missing`: the closure of what Nix would visit before deleting them.
pub fn plan_repair(
    snap: &Snapshot,
    live: &Liveness,
    s: GcSettings,
    missing: &[Node],
) -> RepairPlan {
    let mut seen = vec![false; snap.len()];
    let mut stack: Vec<Node> = Vec::new();
    for &m in missing {
        if !seen[m as usize] {
            seen[m as usize] = true;
            stack.push(m);
        }
    }
    let mut delete = Vec::new();
    while let Some(n) = stack.pop() {
        delete.push(n);
        for_each_reverse(snap, s, n, |m| {
            if !seen[m as usize] {
                seen[m as usize] = true;
                stack.push(m);
            }
        });
    }
    delete.sort_unstable();
    let blocked = delete
        .iter()
        .filter_map(|&n| {
            live.why(n).map(|(root, chain)| Blocked {
                node: n,
                root,
                chain,
            })
        })
        .collect();
    RepairPlan { delete, blocked }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nixdb::PathInfo;
    use crate::ondisk::StoreEntries;
    use crate::roots::{Root, RootKind};

    fn sp(i: usize) -> StorePath {
        StorePath::from_base_name(&format!("{:0>32}-p{i}", i)).unwrap()
    }

    fn snap() -> Snapshot {
        // 2 refers to 1 refers to 0; 3 alone.
        let paths = (0..4)
            .map(|i| PathInfo {
                id: i as i64 + 1,
                path: sp(i),
                registration_time: 0,
                deriver: None,
                nar_size: 0,
            })
            .collect();
        Snapshot::from_parts(paths, &[(1, 0), (2, 1)], &[])
    }

    #[test]
    fn finds_missing_and_stray() {
        let s = snap();
        let e = StoreEntries {
            paths: vec![sp(1), sp(2), sp(3), sp(9)],
            junk: vec![],
        };
        let d = Damage::of(&s, &OnDisk::of_entries(&s, &e));
        assert_eq!(d.missing, vec![0]);
        assert_eq!(d.stray, vec![sp(9)]);
        assert!(d.is_damaged());
    }

    #[test]
    fn repair_takes_referrers_and_names_roots() {
        let s = snap();
        let live = Liveness::compute(&s, &[], GcSettings::default());
        let p = plan_repair(&s, &live, GcSettings::default(), &[0]);
        assert_eq!(p.delete, vec![0, 1, 2]);
        assert!(p.blocked.is_empty());
        let r = Root {
            path: sp(2),
            link: "/r".into(),
            kind: RootKind::Indirect,
        };
        let live = Liveness::compute(&s, &[r], GcSettings::default());
        let p = plan_repair(&s, &live, GcSettings::default(), &[0]);
        assert_eq!(p.blocked.len(), 3);
        assert!(p.blocked.iter().all(|b| b.root == 0));
    }
}
