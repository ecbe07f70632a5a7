//! The pure planning layer: liveness from roots over a [`Snapshot`] (with Nix's
//! `keep-derivations` / `keep-outputs` rules), the dead set as Nix's collector would find it,
//! "why is this alive" chains, the subset of a selection that can be deleted on its own, and
//! the order of deletion batches. Everything here is data in, data out.

use std::collections::{HashSet, VecDeque};
use std::path::Path;

use crate::nixconf::{NixConf, NixConfError, NixConfSources};
use crate::nixdb::{Node, Snapshot};
use crate::ondisk::OnDisk;
use crate::roots::Root;
use crate::store_path::StorePath;

/// The Nix settings that change what is alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GcSettings {
    /// A live output keeps its deriver (`.drv`) alive. Nix's default: true.
    pub keep_derivations: bool,
    /// A live derivation keeps its outputs alive. Nix's default: false.
    pub keep_outputs: bool,
}

impl Default for GcSettings {
    fn default() -> Self {
        Self {
            keep_derivations: true,
            keep_outputs: false,
        }
    }
}

impl GcSettings {
    /// The two settings from Nix's merged configuration (`keep-derivations` /
    /// `gc-keep-derivations`, `keep-outputs` / `gc-keep-outputs`); Nix's defaults where unset.
    pub fn from_nix_conf(conf: &NixConf) -> Result<Self, NixConfError> {
        let default = Self::default();
        Ok(Self {
            keep_derivations: conf
                .get_bool(&["keep-derivations", "gc-keep-derivations"])?
                .unwrap_or(default.keep_derivations),
            keep_outputs: conf
                .get_bool(&["keep-outputs", "gc-keep-outputs"])?
                .unwrap_or(default.keep_outputs),
        })
    }

    /// The settings Nix runs with in this process's environment: `$NIX_CONF_DIR/nix.conf`, the
    /// user's files and `$NIX_CONFIG`, includes followed. A configuration file that exists but
    /// cannot be read is an error naming it.
    pub fn load() -> Result<Self, NixConfError> {
        let conf = NixConf::load(Path::new("/"), &NixConfSources::from_env())?;
        Self::from_nix_conf(&conf)
    }
}

/// Why one path keeps the next one alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Edge {
    /// The holder refers to the path.
    Reference,
    /// The holder is an output of the path, a derivation (`keep-derivations`).
    Deriver,
    /// The holder is a derivation and the path its output (`keep-outputs`).
    Output,
}

/// The forward edges of node `n`: what `n` keeps alive.
fn for_each_forward(snap: &Snapshot, s: GcSettings, n: Node, mut f: impl FnMut(Node, Edge)) {
    for &r in snap.refs(n) {
        f(r, Edge::Reference);
    }
    if s.keep_derivations {
        let deriver = snap.deriver(n);
        for &d in snap.output_of(n) {
            if deriver == Some(d) && snap.is_derivation(d) {
                f(d, Edge::Deriver);
            }
        }
    }
    if s.keep_outputs {
        for (_, o) in snap.drv_outputs(n) {
            f(o, Edge::Output);
        }
    }
}

/// The reverse edges of node `n`: what would keep `n` alive if it were alive (Nix visits
/// exactly these when it decides whether a path can go).
pub fn for_each_reverse(snap: &Snapshot, s: GcSettings, n: Node, mut f: impl FnMut(Node)) {
    for &r in snap.referrers(n) {
        f(r);
    }
    if s.keep_derivations && snap.is_derivation(n) {
        for (_, o) in snap.drv_outputs(n) {
            if snap.deriver(o) == Some(n) {
                f(o);
            }
        }
    }
    if s.keep_outputs {
        for &d in snap.output_of(n) {
            f(d);
        }
    }
}

const NONE: u32 = u32::MAX;

/// Which valid paths are alive, and through what.
#[derive(Debug, Clone)]
pub struct Liveness {
    /// For each alive node: the node that keeps it (or `NONE` for a root).
    parent: Vec<u32>,
    /// For each alive node that is not a root: the edge from its parent.
    edge: Vec<Edge>,
    /// For each node: the index (into the roots given) of the root holding it, or `NONE`
    /// when it is dead.
    root_of: Vec<u32>,
    /// Hash parts of temporary roots (they protect even unregistered paths).
    temp_hashes: HashSet<String>,
}

/// One step of an explanation: a path and how it holds the next one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainStep {
    /// The path.
    pub node: Node,
    /// How this path holds the next one in the chain (`None` for the last).
    pub edge: Option<Edge>,
}

impl Liveness {
    /// Compute what `roots` keep alive. Roots naming unregistered paths are ignored, except
    /// that temporary roots protect unregistered paths with their hash part (as in Nix).
    pub fn compute(snap: &Snapshot, roots: &[Root], s: GcSettings) -> Self {
        Self::compute_filtered(snap, roots, s, |_| true)
    }

    /// Like [`Liveness::compute`], using only the roots for which `keep` is true.
    pub fn compute_filtered(
        snap: &Snapshot,
        roots: &[Root],
        s: GcSettings,
        keep: impl Fn(&Root) -> bool,
    ) -> Self {
        let n = snap.len();
        let mut l = Self {
            parent: vec![NONE; n],
            edge: vec![Edge::Reference; n],
            root_of: vec![NONE; n],
            temp_hashes: HashSet::new(),
        };
        let mut queue = VecDeque::new();
        for (i, r) in roots.iter().enumerate() {
            if !keep(r) {
                continue;
            }
            if r.kind == crate::roots::RootKind::Temporary {
                l.temp_hashes.insert(r.path.hash_part().to_owned());
            }
            if let Some(node) = snap.node(&r.path)
                && !l.is_alive(node)
            {
                l.root_of[node as usize] = i as u32;
                queue.push_back(node);
            }
        }
        while let Some(x) = queue.pop_front() {
            let root = l.root_of[x as usize];
            for_each_forward(snap, s, x, |y, e| {
                if !l.is_alive(y) {
                    l.parent[y as usize] = x;
                    l.edge[y as usize] = e;
                    l.root_of[y as usize] = root;
                    queue.push_back(y);
                }
            });
        }
        l
    }

    /// Whether a valid node is alive.
    pub fn is_alive(&self, n: Node) -> bool {
        self.root_of[n as usize] != NONE
    }

    /// Whether an unregistered path is protected by a temporary root.
    pub fn is_temp_root_hash(&self, p: &StorePath) -> bool {
        self.temp_hashes.contains(p.hash_part())
    }

    /// Number of alive nodes.
    pub fn alive_count(&self) -> usize {
        self.root_of.iter().filter(|&&r| r != NONE).count()
    }

    /// Why `n` is alive: the index of the root (into the roots given to `compute`) and the
    /// chain from the root's path down to `n`. `None` if `n` is dead.
    pub fn why(&self, n: Node) -> Option<(usize, Vec<ChainStep>)> {
        if !self.is_alive(n) {
            return None;
        }
        let mut chain = vec![ChainStep {
            node: n,
            edge: None,
        }];
        let mut cur = n;
        while self.parent[cur as usize] != NONE {
            let (p, e) = (self.parent[cur as usize], self.edge[cur as usize]);
            chain.push(ChainStep {
                node: p,
                edge: Some(e),
            });
            cur = p;
        }
        chain.reverse();
        Some((self.root_of[n as usize] as usize, chain))
    }
}

/// What a full collection would remove, as Nix's `--print-dead` finds it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeadSet {
    /// Registered paths that nothing keeps alive.
    pub valid: Vec<Node>,
    /// Unregistered entries of the store directory (partial builds, leftovers).
    pub invalid: Vec<StorePath>,
}

/// The dead set of a store: the entries of the store directory (and every registered path
/// that refers to one of them) that are not alive.
pub fn dead_set(snap: &Snapshot, live: &Liveness, s: GcSettings, entries: &[StorePath]) -> DeadSet {
    let names = entries.iter().map(StorePath::base_name);
    dead_set_on_disk(snap, live, s, &OnDisk::resolve(snap, names, Vec::new()))
}

/// [`dead_set`] for store directory entries already resolved against the snapshot.
pub fn dead_set_on_disk(snap: &Snapshot, live: &Liveness, s: GcSettings, disk: &OnDisk) -> DeadSet {
    let mut seen = vec![false; snap.len()];
    let mut out = DeadSet::default();
    let mut stack = Vec::new();
    for n in disk.registered() {
        if !live.is_alive(n) && !seen[n as usize] {
            seen[n as usize] = true;
            stack.push(n);
        }
    }
    out.invalid = disk
        .unregistered
        .iter()
        .filter(|e| !live.is_temp_root_hash(e))
        .cloned()
        .collect();
    while let Some(n) = stack.pop() {
        out.valid.push(n);
        for_each_reverse(snap, s, n, |m| {
            if !seen[m as usize] && !live.is_alive(m) {
                seen[m as usize] = true;
                stack.push(m);
            }
        });
    }
    out.valid.sort_unstable();
    out
}

/// A selected dead path that cannot be deleted without deleting something outside the
/// selection, and one such holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    /// The selected path kept.
    pub node: Node,
    /// A path outside the deletable set that would have to go first.
    pub holder: Node,
}

/// Restrict `candidates` to what can be deleted on its own: dead, and every path that Nix
/// would visit before it (referrers, and the `keep-*` relations) is also being deleted.
/// Returns the deletable nodes (sorted) and the ones held back.
pub fn deletable_subset(
    snap: &Snapshot,
    live: &Liveness,
    s: GcSettings,
    candidates: &[Node],
) -> (Vec<Node>, Vec<Held>) {
    let mut inset: HashSet<Node> = candidates
        .iter()
        .copied()
        .filter(|&n| !live.is_alive(n))
        .collect();
    let mut held = Vec::new();
    for &n in candidates {
        if live.is_alive(n) {
            held.push(Held { node: n, holder: n });
        }
    }
    loop {
        let mut removed = Vec::new();
        for &n in &inset {
            let mut holder = None;
            for_each_reverse(snap, s, n, |m| {
                if m != n && holder.is_none() && !inset.contains(&m) {
                    holder = Some(m);
                }
            });
            if let Some(h) = holder {
                removed.push(Held { node: n, holder: h });
            }
        }
        if removed.is_empty() {
            break;
        }
        for h in &removed {
            inset.remove(&h.node);
        }
        held.extend(removed);
    }
    let mut v: Vec<Node> = inset.into_iter().collect();
    v.sort_unstable();
    (v, held)
}

/// Order `nodes` into batches so that whatever Nix visits before a path (its referrers
/// and `keep-*` relations inside the set) is in the same or an earlier batch.
pub fn batches(snap: &Snapshot, s: GcSettings, nodes: &[Node], size: usize) -> Vec<Vec<Node>> {
    let size = size.max(1);
    // Dense arrays over the members (in the order given, a node given twice counts once):
    // `member[n]` is n's member number; `indeg[i]` counts the members that must come before
    // member i, and `after` lists, for each member, the members waiting for it (as
    // compressed rows, filled in the order the reverse edges are visited).
    let mut member = vec![NONE; snap.len()];
    let mut members: Vec<Node> = Vec::with_capacity(nodes.len());
    for &n in nodes {
        if member[n as usize] == NONE {
            member[n as usize] = members.len() as u32;
            members.push(n);
        }
    }
    let k = members.len();
    let mut indeg = vec![0u32; k];
    let mut starts = vec![0u32; k + 1];
    let each_edge = |f: &mut dyn FnMut(usize, usize)| {
        for (i, &n) in members.iter().enumerate() {
            for_each_reverse(snap, s, n, |m| {
                let j = member[m as usize];
                if m != n && j != NONE {
                    f(j as usize, i);
                }
            });
        }
    };
    each_edge(&mut |j, i| {
        indeg[i] += 1;
        starts[j + 1] += 1;
    });
    for j in 0..k {
        starts[j + 1] += starts[j];
    }
    let mut after = vec![0u32; starts[k] as usize];
    let mut fill: Vec<u32> = starts[..k].to_vec();
    each_edge(&mut |j, i| {
        after[fill[j] as usize] = i as u32;
        fill[j] += 1;
    });
    drop(fill);
    let mut ready: VecDeque<u32> = {
        let mut v: Vec<u32> = (0..k as u32).filter(|&i| indeg[i as usize] == 0).collect();
        v.sort_unstable_by_key(|&i| members[i as usize]);
        v.into()
    };
    // Each member is ready once: at the start, or when the last member before it is done.
    let mut order = Vec::with_capacity(k);
    while let Some(i) = ready.pop_front() {
        order.push(members[i as usize]);
        for &m in &after[starts[i as usize] as usize..starts[i as usize + 1] as usize] {
            let d = &mut indeg[m as usize];
            *d -= 1;
            if *d == 0 {
                ready.push_back(m);
            }
        }
    }
    let mut out: Vec<Vec<Node>> = order.chunks(size).map(<[Node]>::to_vec).collect();
    // Cycles (not produced by Nix's reference graph) go together into one last batch.
    let mut rest: Vec<Node> = (0..k)
        .filter(|&i| indeg[i] != 0)
        .map(|i| members[i])
        .collect();
    if !rest.is_empty() {
        rest.sort_unstable();
        out.push(rest);
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::nixdb::PathInfo;
    use crate::roots::RootKind;
    use proptest::prelude::*;
    use std::collections::HashMap;
    use std::path::PathBuf;

    pub(crate) fn sp(i: usize, drv: bool) -> StorePath {
        let h = format!("{:0>32}", i);
        StorePath::from_base_name(&format!("{h}-p{i}{}", if drv { ".drv" } else { "" })).unwrap()
    }

    fn info(i: usize, drv: bool, deriver: Option<StorePath>) -> PathInfo {
        PathInfo {
            id: i as i64 + 1,
            path: sp(i, drv),
            registration_time: 0,
            deriver,
            nar_size: 1,
        }
    }

    fn root(p: &StorePath) -> Root {
        Root {
            path: p.clone(),
            link: PathBuf::from("/gcroots/x"),
            kind: RootKind::Direct,
        }
    }

    /// 0: d.drv (deriver of 1), 1: out (refs 2), 2: lib, 3: unrelated, 4: refs 1
    fn small() -> Snapshot {
        let paths = vec![
            info(0, true, None),
            info(1, false, Some(sp(0, true))),
            info(2, false, None),
            info(3, false, None),
            info(4, false, None),
        ];
        Snapshot::from_parts(
            paths,
            &[(1, 2), (4, 1), (1, 1)],
            &[(0, "out".into(), sp(1, false))],
        )
    }

    #[test]
    fn liveness_follows_refs_and_keep_derivations() {
        let s = small();
        let l = Liveness::compute(&s, &[root(&sp(1, false))], GcSettings::default());
        assert!(l.is_alive(1) && l.is_alive(2) && l.is_alive(0));
        assert!(!l.is_alive(3) && !l.is_alive(4));
        let (r, chain) = l.why(0).unwrap();
        assert_eq!(r, 0);
        assert_eq!(
            chain,
            vec![
                ChainStep {
                    node: 1,
                    edge: Some(Edge::Deriver)
                },
                ChainStep {
                    node: 0,
                    edge: None
                }
            ]
        );
        assert!(l.why(3).is_none());
        let no_keep = GcSettings {
            keep_derivations: false,
            keep_outputs: false,
        };
        let l2 = Liveness::compute(&s, &[root(&sp(1, false))], no_keep);
        assert!(!l2.is_alive(0));
    }

    #[test]
    fn keep_outputs_makes_drv_hold_outputs() {
        let s = small();
        let ko = GcSettings {
            keep_derivations: false,
            keep_outputs: true,
        };
        let l = Liveness::compute(&s, &[root(&sp(0, true))], ko);
        assert!(l.is_alive(1) && l.is_alive(2));
        let l = Liveness::compute(&s, &[root(&sp(0, true))], GcSettings::default());
        assert!(!l.is_alive(1));
    }

    #[test]
    fn dead_set_includes_referrers_of_entries_and_invalid_entries() {
        let s = small();
        let l = Liveness::compute(&s, &[root(&sp(3, false))], GcSettings::default());
        // Only 2 and an unregistered entry are on disk; 1 and 4 (referrers) are dead through
        // them. 0 (the deriver of 1) is not visited from 2, as in Nix.
        let d = dead_set(&s, &l, GcSettings::default(), &[sp(2, false), sp(9, false)]);
        assert_eq!(d.valid, vec![1, 2, 4]);
        assert_eq!(d.invalid, vec![sp(9, false)]);
    }

    #[test]
    fn temp_roots_protect_unregistered_paths() {
        let s = small();
        let t = Root {
            path: sp(9, false),
            link: "/t".into(),
            kind: RootKind::Temporary,
        };
        let l = Liveness::compute(&s, &[t], GcSettings::default());
        let d = dead_set(&s, &l, GcSettings::default(), &[sp(9, false)]);
        assert!(d.invalid.is_empty());
    }

    #[test]
    fn deletable_subset_keeps_what_outside_referrers_need() {
        let s = small();
        let l = Liveness::compute(&s, &[], GcSettings::default());
        // Selecting 1 and 2 but not 4 (which refers to 1): 1 is held by 4, and 2 by 1; 0 is
        // held by its output 1.
        let (del, held) = deletable_subset(&s, &l, GcSettings::default(), &[0, 1, 2]);
        assert!(del.is_empty(), "{del:?}");
        assert_eq!(held.len(), 3);
        let (del, held) = deletable_subset(&s, &l, GcSettings::default(), &[0, 1, 2, 4]);
        assert_eq!(del, vec![0, 1, 2, 4]);
        assert!(held.is_empty());
        let l = Liveness::compute(&s, &[root(&sp(2, false))], GcSettings::default());
        let (del, held) = deletable_subset(&s, &l, GcSettings::default(), &[0, 1, 2, 4]);
        assert_eq!(del, vec![0, 1, 4]);
        assert_eq!(held, vec![Held { node: 2, holder: 2 }]);
    }

    #[test]
    fn batches_put_referrers_first() {
        let s = small();
        let b = batches(&s, GcSettings::default(), &[0, 1, 2, 4], 1);
        let pos = |n: Node| b.iter().position(|x| x.contains(&n)).unwrap();
        assert!(pos(4) < pos(1) && pos(1) < pos(2) && pos(1) < pos(0));
        assert_eq!(b.iter().map(Vec::len).sum::<usize>(), 4);
    }

    #[test]
    fn settings_from_the_merged_nix_conf() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("etc/nix")).unwrap();
        let conf = |text: &str, inline: Option<&str>| {
            std::fs::write(d.path().join("etc/nix/nix.conf"), text).unwrap();
            let sources = NixConfSources {
                files: vec!["/etc/nix/nix.conf".into()],
                inline: inline.map(str::to_owned),
                conf_dir: "/etc/nix".into(),
            };
            GcSettings::from_nix_conf(&NixConf::load(d.path(), &sources).unwrap())
        };
        let cases: &[(&str, Option<&str>, GcSettings)] = &[
            ("", None, GcSettings::default()),
            (
                "keep-outputs = true # c\ngc-keep-derivations = false\nx = y\n",
                None,
                GcSettings {
                    keep_derivations: false,
                    keep_outputs: true,
                },
            ),
            (
                "keep-outputs = false\n",
                Some("keep-outputs = true"),
                GcSettings {
                    keep_derivations: true,
                    keep_outputs: true,
                },
            ),
        ];
        for (text, inline, want) in cases {
            assert_eq!(conf(text, *inline).unwrap(), *want, "{text:?} {inline:?}");
        }
        assert!(conf("keep-derivations = sometimes\n", None).is_err());
    }

    /// A random DAG: node i may refer to nodes < i; some nodes are drvs with an output.
    fn arb_graph() -> impl Strategy<Value = (Snapshot, Vec<usize>)> {
        (2usize..40).prop_flat_map(|n| {
            (
                proptest::collection::vec((0..n, 0..n), 0..n * 2),
                proptest::collection::vec(0..n, 0..4),
                proptest::collection::vec(any::<bool>(), n),
            )
                .prop_map(move |(edges, roots, is_drv)| {
                    let mut paths = Vec::new();
                    let mut outs = Vec::new();
                    for i in 0..n {
                        let drv =
                            is_drv[i] && i + 1 < n && !is_drv.get(i + 1).copied().unwrap_or(false);
                        let deriver = if i > 0 && is_drv[i - 1] && !is_drv[i] {
                            Some(sp(i - 1, true))
                        } else {
                            None
                        };
                        if drv {
                            outs.push((i as Node, "out".to_owned(), sp(i + 1, false)));
                        }
                        paths.push(info(i, drv, deriver));
                    }
                    let refs: Vec<(Node, Node)> = edges
                        .into_iter()
                        .filter(|(a, b)| a > b)
                        .map(|(a, b)| (a as Node, b as Node))
                        .collect();
                    (Snapshot::from_parts(paths, &refs, &outs), roots)
                })
        })
    }

    proptest! {
        #[test]
        fn dead_and_alive_partition_and_batches_respect_order(
            (snap, roots) in arb_graph(),
            keep_outputs in any::<bool>(),
        ) {
            let s = GcSettings { keep_derivations: true, keep_outputs };
            let roots: Vec<Root> = roots.iter().map(|&i| root(&snap.path(i as Node))).collect();
            let l = Liveness::compute(&snap, &roots, s);
            let all: Vec<StorePath> = (0..snap.len() as Node).map(|n| snap.path(n)).collect();
            let d = dead_set(&snap, &l, s, &all);
            for n in 0..snap.len() as Node {
                prop_assert_eq!(d.valid.contains(&n), !l.is_alive(n));
                if l.is_alive(n) {
                    // The chain is made of real forward edges, starting at a root.
                    let (ri, chain) = l.why(n).unwrap();
                    prop_assert_eq!(&snap.path(chain[0].node), &roots[ri].path);
                    for w in chain.windows(2) {
                        let mut ok = false;
                        for_each_forward(&snap, s, w[0].node, |y, e| ok |= y == w[1].node && Some(e) == w[0].edge);
                        prop_assert!(ok);
                    }
                }
            }
            // Dead is closed under the reverse relation: nothing alive points into it.
            for &n in &d.valid {
                for_each_reverse(&snap, s, n, |m| assert!(!l.is_alive(m)));
            }
            let (del, _) = deletable_subset(&snap, &l, s, &d.valid);
            prop_assert_eq!(&del, &d.valid);
            let b = batches(&snap, s, &del, 3);
            let pos: HashMap<Node, usize> = b.iter().enumerate().flat_map(|(i, v)| v.iter().map(move |&n| (n, i))).collect();
            prop_assert_eq!(pos.len(), del.len());
            for &n in &del {
                for_each_reverse(&snap, s, n, |m| assert!(pos[&m] <= pos[&n]));
            }
        }
    }
}
