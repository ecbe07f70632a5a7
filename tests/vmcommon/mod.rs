//! Helpers shared by the VM and cluster tests: test systems built into chroot stores by
//! `scripts/guest/build-test-system`, the process-tree checks, and [`Cluster`], the one way the
//! tests make a cluster (its composition, store and state; up, and down when dropped).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::common::{Drydock, Ran};

/// The chroot store the VM tests share: under Cargo's target temporary directory, so it is
/// reused across runs (building into it again is a no-op) instead of piling up in /tmp.
pub fn shared_store() -> PathBuf {
    created(Path::new(env!("CARGO_TARGET_TMPDIR")).join("drydock-vm-fixture-store"))
}

/// `root` as a chroot store whose database exists: tests that share a store start their Nix
/// commands at once, and Nix's creation of a new store's database is not safe against that.
/// (drydock creates a new store once itself; the fixture scripts run Nix directly.)
pub fn created(root: PathBuf) -> PathBuf {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _held = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if !root.join("nix/var/nix/db/db.sqlite").is_file() {
        let out = Command::new("nix-store")
            .arg("--store")
            .arg(&root)
            .arg("--init")
            .output()
            .expect("run nix-store --init");
        assert!(
            out.status.success(),
            "nix-store --init {}: {}",
            root.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    root
}

/// Build the test system (with `args`: `--outside`, or a variant name) into the chroot store
/// `root`, once per test run for each `(root, args)`; returns the printed store path. The
/// uncompressed kernel halves a TCG boot.
pub fn build_system(root: &Path, args: &[&str]) -> String {
    type Built = std::sync::Mutex<
        std::collections::BTreeMap<(PathBuf, Vec<String>), std::sync::Arc<OnceLock<String>>>,
    >;
    static BUILT: Built = std::sync::Mutex::new(std::collections::BTreeMap::new());
    let key = (
        root.to_path_buf(),
        args.iter().map(|a| a.to_string()).collect(),
    );
    let cell = BUILT
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(key)
        .or_default()
        .clone();
    cell.get_or_init(|| build_system_now(root, args)).clone()
}

fn build_system_now(root: &Path, args: &[&str]) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/guest/build-test-system");
    // Flags (with their values: `--nixos-test FLAVOUR`, `--arg NAME EXPR`) go before the root.
    let (mut flags, mut rest): (Vec<&str>, Vec<&str>) = (Vec::new(), Vec::new());
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let values = match *a {
            "--nixos-test" => 1,
            "--arg" | "--argstr" => 2,
            a if a.starts_with("--") => 0,
            _ => {
                rest.push(a);
                continue;
            }
        };
        flags.push(a);
        flags.extend(it.by_ref().take(values).copied());
    }
    let out = Command::new(&script)
        .args(flags)
        .arg(root)
        .args(rest)
        .env("DRYDOCK_GUEST_KERNEL", "vmlinux")
        .output()
        .expect("run build-test-system");
    assert!(
        out.status.success(),
        "build-test-system: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Processes (pid, command line) whose command line mentions `needle` (a test's unique state
/// dir: QEMU's and the store server's arguments name it).
pub fn processes_mentioning(needle: &Path) -> Vec<(u32, String)> {
    let needle = needle.display().to_string();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        let Ok(raw) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
        if cmd.contains(&needle) {
            out.push((pid, cmd));
        }
    }
    out
}

/// Poll `cond` until it holds; fail with `what` if it does not within `within`. Guests under
/// TCG run at the speed of a loaded machine, so tests wait for what they expect instead of
/// sleeping a fixed time.
pub fn wait_until(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(t.elapsed() < within, "not within {within:?}: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Wait (bounded) until no process mentions `state`; fail naming what is left.
pub fn wait_no_processes(state: &Path, within: Duration) {
    let t = Instant::now();
    loop {
        let left = processes_mentioning(state);
        if left.is_empty() {
            return;
        }
        assert!(t.elapsed() < within, "processes left behind: {left:#?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The chroot store the cluster tests share (the systems' builds are reused across runs).
pub fn cluster_store() -> PathBuf {
    created(Path::new(env!("CARGO_TARGET_TMPDIR")).join("drydock-cluster-store"))
}

/// Where the guest's kernel and initrd are cached: the scripts' own default
/// (`$DRYDOCK_CACHE_DIR`, else `${XDG_CACHE_HOME:-$HOME/.cache}/drydock`).
pub fn guest_cache() -> String {
    std::env::var("DRYDOCK_CACHE_DIR").unwrap_or_else(|_| {
        let base = std::env::var("XDG_CACHE_HOME")
            .ok()
            .filter(|d| !d.is_empty())
            .unwrap_or_else(|| format!("{}/.cache", std::env::var("HOME").unwrap_or_default()));
        format!("{base}/drydock")
    })
}

/// Debian 12's QEMU 7.2 from the cache `scripts/fetch-qemu72` fills (setup runs it): the wrapper
/// to pass as `--qemu` (it runs the unpacked QEMU on its own firmware), and the first line of its
/// `--version`; `None` when the cache has none.
pub fn qemu72() -> Option<(PathBuf, String)> {
    let dir = Path::new(&guest_cache()).join("qemu-7.2");
    let wrapper = dir.join("qemu-system-x86_64");
    let version = std::fs::read_to_string(dir.join("version")).ok()?;
    wrapper
        .is_file()
        .then(|| (wrapper, version.trim().to_string()))
}

/// Make sure the guest kernel and initrd exist (instant once cached; run once per test run).
pub fn guest_ready() {
    static READY: std::sync::Once = std::sync::Once::new();
    READY.call_once(|| build_initrd(&[]));
}

/// Make sure the nixos-test node's base initrd exists too (`build-initrd --nixos`).
pub fn nixos_guest_ready() {
    guest_ready();
    static READY: std::sync::Once = std::sync::Once::new();
    READY.call_once(|| build_initrd(&["--nixos"]));
}

/// `scripts/guest/build-initrd ARGS`, which must succeed.
fn build_initrd(args: &[&str]) {
    let s = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/guest/build-initrd");
    let out = Command::new(s).args(args).output().expect("build-initrd");
    assert!(
        out.status.success(),
        "build-initrd {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The composition of the test system with the machines `machines` (the body of
/// `machines = { ... }`), where `sys ARGS` is the test system's toplevel
/// (`scripts/guest/system.nix` with `ARGS`, e.g. `www`, `activation`, `kernelParams`, or
/// `firewall = { allowedTCPPorts = [ 7000 ]; }` after [`firewall_guest_ready`]) on the cached
/// guest kernel and initrd.
pub fn composition_text(machines: &str) -> String {
    composition_with(&format!("{{ machines = {{ {machines} }}; }}"))
}

/// A composition whose whole expression is `body`, in which `sys ARGS` is the test system's
/// toplevel as in [`composition_text`] (for compositions made by a Nix function).
pub fn composition_with(body: &str) -> String {
    let system = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/guest/system.nix");
    format!(
        r#"let
  cache = "{cache}/guest";
  kernelVersion = builtins.replaceStrings [ "\n" ] [ "" ] (builtins.readFile (cache + "/kernel/version"));
  sys = args: (import {system} ({{
    kernel = cache + "/kernel/vmlinux"; kernelFormat = "vmlinux";
    initrd = cache + "/initrd"; inherit kernelVersion; nft = cache + "/nft";
  }} // args)).toplevel;
in {body}
"#,
        cache = guest_cache(),
        system = system.display()
    )
}

/// A composition of drydock's nixos-test nodes (`scripts/guest/nixos-node.nix`) whose shares
/// go over `shares` (`9p` or `virtiofs`): `nodes` is the body of the attribute set of nodes and
/// their VLANs, numbered and given hosts as NixOS's test framework does
/// (`nixos-network.nix`); `machines` the body of `machines = { ... }`, where `node NAME ARGS`
/// is the toplevel of node NAME with more of its arguments.
pub fn nixos_composition(shares: &str, nodes: &str, machines: &str) -> String {
    node_composition(shares, "", nodes, machines)
}

/// Make sure Debian's systemd is in the guest cache too (`fetch-systemd`), for the nixos-test
/// node's systemd flavour.
pub fn systemd_guest_ready() {
    nixos_guest_ready();
    static READY: std::sync::Once = std::sync::Once::new();
    READY.call_once(|| {
        let s = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/guest/fetch-systemd");
        let out = Command::new(s).output().expect("fetch-systemd");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
}

/// [`nixos_composition`] of the node's systemd flavour (`init = "systemd"`: Debian's systemd
/// as PID 1, the services as units): `node NAME ARGS` takes its arguments too, e.g.
/// `units.late = { type = "oneshot"; script = "sleep 20"; }` or `backdoorRevision = "2"`.
/// Call [`systemd_guest_ready`] first.
pub fn systemd_composition(shares: &str, nodes: &str, machines: &str) -> String {
    node_composition(
        shares,
        r#"init = "systemd"; systemd = cache + "/systemd";"#,
        nodes,
        machines,
    )
}

/// Make sure the test guest's firewall has its material in the guest cache too (`fetch-nft`:
/// Debian's nft and the kernel's netfilter modules), for `sys { firewall = ...; }` in a
/// [`composition_text`] and for [`firewall_composition`].
pub fn firewall_guest_ready() {
    guest_ready();
    static READY: std::sync::Once = std::sync::Once::new();
    READY.call_once(|| {
        let s = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/guest/fetch-nft");
        let out = Command::new(s).output().expect("fetch-nft");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
}

/// A server behind a firewall and its agents, the logbook's case (NixOS's firewall dropping the
/// agents' connections to the server): machine `server` runs the test guest's firewall
/// (`system.nix`'s `firewall`: NixOS's `networking.firewall`, nftables) allowing the TCP ports
/// `allowed_tcp` (and ping), refused connections logged as `refused connection: ...` (in its
/// `dmesg` and on its console), and answers `server:PORT` and closes on each port of `listen`
/// (busybox `nc -ll -e echo`); machines `agent1`..`agentN` (`agents` of them) have no firewall.
/// All on VLAN 1 with 256 MiB; machines are numbered in name order, so agent I is
/// `192.168.1.I` and the server `192.168.1.(N+1)`. Call [`firewall_guest_ready`] first. A hot
/// reload to other `allowed_tcp` switches the server only.
pub fn firewall_composition(allowed_tcp: &[u16], listen: &[u16], agents: usize) -> String {
    let allowed: Vec<String> = allowed_tcp.iter().map(u16::to_string).collect();
    firewall_composition_with(
        &format!("allowedTCPPorts = [ {} ];", allowed.join(" ")),
        listen,
        agents,
    )
}

/// [`firewall_composition`] with the server's whole `firewall` attribute set given as its body
/// (`allowedTCPPorts = [ 7000 ]; rejectPackets = true;`, or `enable = false;`).
pub fn firewall_composition_with(firewall: &str, listen: &[u16], agents: usize) -> String {
    let services: Vec<String> = listen
        .iter()
        .map(|p| format!("nc -ll -p {p} -e echo server:{p} &"))
        .collect();
    let mut machines = format!(
        "server = {{ system = sys {{ firewall = {{ {firewall} }}; services = \"{} wait\"; }}; memorySize = 256; }};",
        services.join(" ")
    );
    for i in 1..=agents {
        machines.push_str(&format!(
            "\n  agent{i} = {{ system = sys {{ }}; memorySize = 256; }};"
        ));
    }
    composition_text(&machines)
}

/// Make sure Debian's etcd is in the guest cache too (`fetch-etcd`), for [`etcd_composition`].
pub fn etcd_guest_ready() {
    guest_ready();
    static READY: std::sync::Once = std::sync::Once::new();
    READY.call_once(|| {
        let s = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/guest/fetch-etcd");
        let out = Command::new(s).output().expect("fetch-etcd");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
}

/// The composition of an etcd cluster of `members` machines `etcd1`..`etcdN` on VLAN 1
/// (`scripts/guest/etcd-cluster.nix`: the busybox test guest, 256 MiB each, Debian's etcd
/// bootstrapped statically as one cluster, its data on the machine's disk, `etcdctl` on PATH),
/// with `args` more of that file's arguments as Nix (`variant = "v2";` for a hot reload,
/// `memorySize = 512;`, `electionTimeout = 10000;`). Call [`etcd_guest_ready`] first; then
/// [`etcd_wait_healthy`] waits until the cluster has formed.
pub fn etcd_composition(members: usize, args: &str) -> String {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/guest/etcd-cluster.nix");
    format!(
        "import {file} {{ members = {members}; cache = \"{cache}/guest\"; {args} }}\n",
        file = file.display(),
        cache = guest_cache(),
    )
}

/// The machines of an [`etcd_composition`] of `members`: `etcd1`..`etcdN`.
pub fn etcd_machines(members: usize) -> Vec<String> {
    (1..=members).map(|i| format!("etcd{i}")).collect()
}

/// `etcdctl --command-timeout 15s ARGS` on `machine` (ARGS as shell words), through `exec`
/// with a deadline of 60 s. etcdctl talks to the machine's own member unless ARGS name
/// `--endpoints`.
pub fn etcdctl(c: &Cluster, machine: &str, args: &str) -> Ran {
    c.exec(
        machine,
        "60",
        &format!("etcdctl --command-timeout 15s {args}"),
    )
}

/// `etcdctl endpoint health --cluster` on `machine`: the client URLs of the members it reports
/// healthy (its JSON, `-w json`), or why it could not tell (etcdctl's output: a member that is
/// down or unhealthy makes it fail).
pub fn etcd_health(c: &Cluster, machine: &str) -> Result<Vec<String>, String> {
    let o = etcdctl(c, machine, "-w json endpoint health --cluster");
    let why = || {
        format!(
            "exit {:?}: {}{}",
            o.status.code(),
            text(&o.stdout),
            text(&o.stderr)
        )
    };
    if !o.status.success() {
        return Err(why());
    }
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).map_err(|_| why())?;
    let mut healthy: Vec<String> = v
        .as_array()
        .ok_or_else(why)?
        .iter()
        .filter(|e| e["health"] == serde_json::Value::Bool(true))
        .filter_map(|e| e["endpoint"].as_str().map(str::to_string))
        .collect();
    healthy.sort();
    Ok(healthy)
}

/// Wait until `etcdctl endpoint health --cluster` on `etcd1` reports all `members` healthy
/// (and nothing unhealthy); fail the test with etcdctl's last answer if that takes longer
/// than `within`. Returns how long it took. Each try is an `exec` (about a second under
/// TCG); between two tries it backs off 0.5 s, since a cluster that is still electing needs
/// seconds, not milliseconds.
pub fn etcd_wait_healthy(c: &Cluster, members: usize, within: Duration) -> Duration {
    let t = Instant::now();
    loop {
        let last = match etcd_health(c, "etcd1") {
            Ok(h) if h.len() == members => return t.elapsed(),
            Ok(h) => format!("{} of {members} healthy: {h:?}", h.len()),
            Err(e) => e,
        };
        assert!(
            t.elapsed() < within,
            "etcd not healthy with {members} members within {within:?}; last: {last}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The names of the cluster's members (`etcdctl member list` on `machine`), sorted; a member
/// that has not started yet has an empty name.
pub fn etcd_members(c: &Cluster, machine: &str) -> Vec<String> {
    let o = etcdctl(c, machine, "member list");
    assert!(
        o.status.success(),
        "etcdctl member list on {machine}: {}{}",
        text(&o.stdout),
        text(&o.stderr)
    );
    // ID, status, name, peer URLs, client URLs, is learner
    let mut names: Vec<String> = text(&o.stdout)
        .lines()
        .filter_map(|l| l.split(", ").nth(2).map(str::to_string))
        .collect();
    names.sort();
    names
}

/// `etcdctl put KEY VALUE` on `machine`, which must succeed (`OK`).
pub fn etcd_put(c: &Cluster, machine: &str, key: &str, value: &str) {
    let o = etcdctl(c, machine, &format!("put '{key}' '{value}'"));
    assert_eq!(
        (o.status.code(), text(&o.stdout)),
        (Some(0), "OK\n".to_string()),
        "etcdctl put {key} on {machine}: {}",
        text(&o.stderr)
    );
}

/// `etcdctl get KEY` on `machine` (a linearizable read: the cluster's value, not the member's
/// own): its value, `None` if the key does not exist.
pub fn etcd_get(c: &Cluster, machine: &str, key: &str) -> Option<String> {
    let o = etcdctl(c, machine, &format!("get --print-value-only '{key}'"));
    assert!(
        o.status.success(),
        "etcdctl get {key} on {machine}: {}",
        text(&o.stderr)
    );
    let out = text(&o.stdout);
    (!out.is_empty()).then(|| out.strip_suffix('\n').unwrap_or(&out).to_string())
}

fn node_composition(shares: &str, init: &str, nodes: &str, machines: &str) -> String {
    let guest = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/guest");
    format!(
        r#"let
  cache = "{cache}/guest";
  kernelVersion = builtins.replaceStrings [ "\n" ] [ "" ] (builtins.readFile (cache + "/kernel/version"));
  net = import {guest}/nixos-network.nix {{ machines = {{ {nodes} }}; }};
  node = name: args: (import {guest}/nixos-node.nix ({{
    kernel = cache + "/kernel/vmlinux"; kernelFormat = "vmlinux";
    initrd = cache + "/initrd-nixos"; inherit kernelVersion;
    shares = "{shares}"; {init}
  }} // net.${{name}} // args)).toplevel;
in {{ machines = {{ {machines} }}; }}
"#,
        cache = guest_cache(),
        guest = guest.display()
    )
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// What a test's cluster is made of, before it exists: see [`Cluster::named`].
pub struct ClusterBuilder {
    name: String,
    store: Option<PathBuf>,
    state: Option<PathBuf>,
    text: Option<String>,
}

/// A test's cluster: the composition `DIR/NAME/drydock.nix` in a temporary directory of its own
/// (so the cluster is called NAME), a chroot store and the state directory `DIR/state` (unless
/// [`ClusterBuilder::state`] names another). Made by [`Cluster::named`]; dropping it takes the
/// cluster down (`down -f`, whether the test passed or not, failures ignored: a test that gets
/// that far checks its own [`Cluster::down`]), then removes the directory.
pub struct Cluster {
    dir: tempfile::TempDir,
    store: PathBuf,
    state: PathBuf,
    file: PathBuf,
    /// Whether anything may still run (no checked `down` since the last `up`).
    maybe_up: AtomicBool,
}

impl Cluster {
    /// A cluster called `name`, on the shared cluster store unless [`ClusterBuilder::store`]
    /// says otherwise; its composition is given by [`ClusterBuilder::machines`] or
    /// [`ClusterBuilder::composition`].
    pub fn named(name: &str) -> ClusterBuilder {
        ClusterBuilder {
            name: name.to_string(),
            store: None,
            state: None,
            text: None,
        }
    }
}

impl ClusterBuilder {
    /// Use this chroot store instead of the shared [`cluster_store`].
    pub fn store(mut self, store: PathBuf) -> Self {
        self.store = Some(store);
        self
    }

    /// Use this state directory instead of `DIR/state` (one the test prepared: another user's,
    /// one others can write, one deep enough that sockets go elsewhere).
    pub fn state(mut self, state: PathBuf) -> Self {
        self.state = Some(state);
        self
    }

    /// The composition of the test system with these machines (see [`composition_text`]).
    pub fn machines(mut self, machines: &str) -> Self {
        self.text = Some(composition_text(machines));
        self
    }

    /// The composition file exactly as given.
    pub fn composition(mut self, text: &str) -> Self {
        self.text = Some(text.to_string());
        self
    }

    /// Write the composition; nothing runs yet (the test starts `up` itself, or expects it to
    /// fail).
    pub fn write(self) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join(&self.name);
        std::fs::create_dir_all(&d).unwrap();
        let file = d.join("drydock.nix");
        std::fs::write(&file, self.text.expect("a composition")).unwrap();
        Cluster {
            state: self.state.unwrap_or_else(|| dir.path().join("state")),
            store: self.store.unwrap_or_else(cluster_store),
            file,
            dir,
            maybe_up: AtomicBool::new(true),
        }
    }

    /// Write the composition and bring the cluster up detached (under TCG), which must succeed.
    pub fn up(self) -> Cluster {
        let c = self.write();
        c.up_detached();
        c
    }
}

impl Cluster {
    /// The temporary directory holding the composition's directory and the state.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn store(&self) -> &Path {
        &self.store
    }

    pub fn state(&self) -> &Path {
        &self.state
    }

    /// The pid of the cluster's owner, from the cluster's state (`cluster.json`, written once
    /// it is up). The cluster is named after its composition's folder.
    pub fn owner_pid(&self) -> u32 {
        let name = self.file.parent().and_then(Path::file_name).unwrap();
        let json = self.state.join("clusters").join(name).join("cluster.json");
        let read = std::fs::read(&json).unwrap_or_else(|e| panic!("{}: {e}", json.display()));
        let st: serde_json::Value = serde_json::from_slice(&read).unwrap();
        st["owner_pid"].as_u64().expect("owner pid") as u32
    }

    /// The composition, `drydock.nix`.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// drydock on the cluster's store and state, without `NIX_CONFIG`: the test system's builds
    /// need nothing from the environment.
    pub fn drydock(&self) -> Drydock {
        Drydock::on(&self.store, &self.state).env_remove("NIX_CONFIG")
    }

    /// `drydock VERB --file FILE` (`--file`: `logs -f` is `--follow`).
    pub fn verb(&self, verb: &str) -> Drydock {
        if verb == "up" {
            self.maybe_up.store(true, Ordering::SeqCst);
        }
        self.drydock().arg(verb).arg("--file").arg(&self.file)
    }

    /// Replace the composition with the test system's `machines`.
    pub fn set_machines(&self, machines: &str) {
        std::fs::write(&self.file, composition_text(machines)).unwrap();
    }

    /// `up -f FILE --detach` under TCG; fails the test with drydock's messages if it fails.
    pub fn up_detached(&self) {
        self.up_detached_with(&[]);
    }

    /// [`Cluster::up_detached`] with `extra` arguments (`--log-limit 256K`).
    pub fn up_detached_with(&self, extra: &[&str]) {
        guest_ready();
        let up = self
            .verb("up")
            .args(["--detach", "--accel", "tcg", "--timeout", "300"])
            .args(extra)
            .run();
        assert!(up.status.success(), "up: {}", text(&up.stderr));
    }

    /// `exec -f FILE MACHINE --timeout SECS -- CMD`.
    pub fn exec(&self, machine: &str, timeout: &str, cmd: &str) -> Ran {
        self.verb("exec")
            .args([machine, "--timeout", timeout, "--", cmd])
            .run()
    }

    /// `ps --json -f FILE`, which must succeed.
    pub fn ps(&self) -> serde_json::Value {
        let ps = self
            .drydock()
            .args(["--json", "ps", "-f"])
            .arg(&self.file)
            .run();
        assert!(ps.status.success(), "ps: {}", text(&ps.stderr));
        serde_json::from_slice(&ps.stdout).unwrap()
    }

    /// Every machine's QEMU pid (none if it is stopped), by `ps --json`.
    pub fn qemu_pids(&self) -> Vec<(String, Option<u64>)> {
        self.ps()
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["machine"].as_str().unwrap().to_string(),
                    r["qemu_pid"].as_u64(),
                )
            })
            .collect()
    }

    /// `down -f FILE`, which must succeed; then no process of the cluster's state may be left.
    pub fn down(&self) {
        let down = self.verb("down").run();
        assert!(down.status.success(), "down: {}", text(&down.stderr));
        wait_no_processes(&self.state, Duration::from_secs(30));
        self.maybe_up.store(false, Ordering::SeqCst);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Nothing here may panic: this also runs while a failed test unwinds.
        if self.maybe_up.load(Ordering::SeqCst) {
            let _ = self
                .drydock()
                .arg("down")
                .arg("-f")
                .arg(&self.file)
                .into_command()
                .output();
        }
    }
}

/// `up --json` (with `extra` arguments): its exit code and its report.
pub fn up_json(c: &Cluster, extra: &[&str]) -> (Option<i32>, serde_json::Value, String) {
    let o = c
        .drydock()
        .arg("--json")
        .arg("up")
        .arg("-f")
        .arg(c.file())
        .args(["--accel", "tcg", "--timeout", "300"])
        .args(extra)
        .run();
    let err = text(&o.stderr);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "up --json printed no JSON ({e}): {}\n{err}",
            text(&o.stdout)
        )
    });
    (o.status.code(), v, err)
}

/// Each machine's (action, outcome) in a report.
pub fn actions(v: &serde_json::Value) -> Vec<(String, String, String)> {
    v["machines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["machine"].as_str().unwrap().to_string(),
                m["action"].as_str().unwrap().to_string(),
                m["outcome"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

pub fn row(machine: &str, action: &str, outcome: &str) -> (String, String, String) {
    (machine.into(), action.into(), outcome.into())
}
