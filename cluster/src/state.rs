//! A cluster's state on disk and its paths: who owns an up cluster (`cluster.json`) and the lock
//! that makes it one owner at a time (`owner.lock`), how its machines are launched, where its
//! sockets live, and the cluster's errors (one machine's, [`MachineError`], carried whole from
//! its thread to the owner, and the cluster's).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::compose::{ClusterPlan, MachinePlan};
use drydock_gc::StoreLayout;
use drydock_vm::AccelChoice;
use drydock_vm::VmPaths;
use drydock_vm::{Launcher, LauncherError};

/// Why one machine could not be launched or served: found before the cluster starts (its launch
/// resolved and checked), or in its thread, which reports it to the owner as it is.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error("a VM named {vm} is already running (QEMU pid {qemu_pid})")]
    Running { vm: String, qemu_pid: u32 },
    /// Its system (and its settings) cannot be launched.
    #[error("system {system}")]
    System {
        system: String,
        #[source]
        source: Box<LauncherError>,
    },
    /// Claiming its name, its disk, its run, its record or starting QEMU failed.
    #[error(transparent)]
    Launch(Box<LauncherError>),
    #[error("cannot create {}", path.display())]
    Files {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {}", path.display())]
    Listen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("backdoor socket")]
    BackdoorSocket(#[source] std::io::Error),
    #[error("QEMU exited before it connected the backdoor")]
    ExitedEarly,
    #[error("QEMU did not connect the backdoor in time")]
    NoBackdoor,
    /// A restored machine could not be resumed over QMP.
    #[error("cannot resume the restored machine")]
    Resume(#[source] Arc<drydock_vm::QmpError>),
    /// The guest's backdoor never became ready (the console says why); the backdoor's error is
    /// kept, and shown before the console's path.
    #[error("{} (see {})", drydock_vm::error_chain(error), console.display())]
    NotReady {
        error: crate::backdoor::BackdoorError,
        console: PathBuf,
    },
    /// QEMU exited after it connected the backdoor, before the guest was ready.
    #[error("QEMU exited before the guest was ready (see {})", console.display())]
    QemuExited { console: PathBuf },
    /// The exec socket failed.
    #[error("exec socket")]
    Exec(#[source] std::io::Error),
    /// It lost a process it needs while it ran (its store server died): why, in the words
    /// `ps` and `exec` use too (the machine's `failed` file).
    #[error("{0}")]
    Lost(String),
    /// It failed once its VM had started (`error`), and what tells why: how QEMU had ended if
    /// it had (and the last lines it wrote), and the last lines of its console (escaped).
    #[error("{}{}", drydock_vm::error_chain(&**error), last_words(qemu_ended.as_deref(), qemu_said, console_tail))]
    Ended {
        error: Box<MachineError>,
        /// QEMU's exit status, if it had exited.
        qemu_ended: Option<String>,
        /// The last lines of `qemu.log`.
        qemu_said: String,
        console_tail: Vec<String>,
    },
    #[error("stopped before it became ready")]
    StoppedBeforeReady,
    #[error("the cluster did not become ready in time")]
    Late,
}

/// What a machine that failed left to tell why (see [`MachineError::Ended`]).
fn last_words(qemu_ended: Option<&str>, qemu_said: &str, console_tail: &[String]) -> String {
    let mut out = String::new();
    if let Some(st) = qemu_ended {
        match qemu_said.trim() {
            "" => out += &format!("; QEMU had ended ({st})"),
            said => out += &format!("; QEMU had ended ({st}), saying: {said}"),
        }
    }
    if !console_tail.is_empty() {
        out += "; the last lines of its console:";
        for l in console_tail {
            out += &format!("\n  {l}");
        }
    }
    out
}

impl MachineError {
    /// A launch refused by the launcher, in the words of a cluster machine: a name that is taken,
    /// or its system (the resolution and checks).
    pub(crate) fn planning(system: &str, e: LauncherError) -> Self {
        match e {
            LauncherError::NameInUse { name, qemu_pid } => Self::Running { vm: name, qemu_pid },
            source => Self::System {
                system: system.to_owned(),
                source: Box::new(source),
            },
        }
    }

    /// A launch that failed while it was carried out.
    pub(crate) fn launching(e: LauncherError) -> Self {
        match e {
            LauncherError::NameInUse { name, qemu_pid } => Self::Running { vm: name, qemu_pid },
            e => Self::Launch(Box::new(e)),
        }
    }

    pub fn is_bad_input(&self) -> bool {
        match self {
            Self::Running { .. } => true,
            Self::System { source, .. } | Self::Launch(source) => source.is_bad_input(),
            Self::NotReady { error, .. } => error.is_bad_input(),
            Self::Ended { error, .. } => error.is_bad_input(),
            _ => false,
        }
    }
}

/// Why a cluster could not start, or a call could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// A folder of the cluster's or of a machine's belongs to another user, or others can
    /// write it.
    #[error(transparent)]
    NotPrivate(drydock_gc::PrivateError),
    #[error("cannot write {}", path.display())]
    Files {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Hub(crate::hub::HubError),
    #[error("machine {machine}")]
    Machine {
        machine: String,
        #[source]
        source: Arc<MachineError>,
    },
    #[error("the cluster {name} is not up ({})", up_list(up))]
    NotUp { name: String, up: Vec<String> },
    #[error(
        "the cluster {name} is up from {}, not from {}: give this composition another name with -p NAME to run it beside that one, or -f {} to act on that cluster",
        running.display(), given.display(), running.display()
    )]
    OtherFile {
        name: String,
        running: PathBuf,
        given: PathBuf,
    },
    #[error("{}: no such composition file{}", .0.display(), if .0.ends_with("drydock.nix") { " (no drydock.nix here: give -f FILE, or -p NAME for a cluster that is up; `drydock ls` lists them)" } else { "" })]
    NoFile(PathBuf),
    /// Another process holds the cluster's owner lock: an `up` preparing it, or its owner
    /// starting it.
    #[error(
        "the cluster {name} is being started by another drydock ({}); once it is up, `up` reloads it (the lock is {})",
        holder.as_ref().map_or_else(|| "its pid is not known yet".to_string(), LockHolder::describe),
        lock.display()
    )]
    Busy {
        name: String,
        holder: Option<LockHolder>,
        lock: PathBuf,
    },
    #[error("cannot take the owner lock {}", path.display())]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the VM {0} has no backdoor service (is it a cluster machine, and up?)")]
    NoExec(String),
    #[error("the cluster {cluster} has no machine {machine} (it has {})", has.join(", "))]
    NoMachine {
        cluster: String,
        machine: String,
        has: Vec<String>,
    },
    #[error("the exec call to {vm} failed")]
    Call {
        vm: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{vm}: {message}")]
    Remote { vm: String, message: String },
    /// The guest's backdoor restarted while the call waited for its reply (the owner's
    /// backdoor said [`crate::backdoor::BackdoorError::Restarted`]); the next call goes to the
    /// new shell.
    #[error(
        "{vm}: the guest's backdoor restarted during the call (a new backdoor shell took over): whether the command ran to its end is not known; calls after this one go to the new shell"
    )]
    Restarted { vm: String },
    #[error("stdin is {} MiB; a command takes at most {} MiB (`drydock cp` copies files)", bytes >> 20, max >> 20)]
    StdinTooLarge { bytes: u64, max: u64 },
    #[error("{vm} is not running: {why}")]
    Failed { vm: String, why: String },
    #[error("interrupted while the cluster started; everything started was stopped")]
    Interrupted,
    #[error("cannot start the cluster's owner")]
    Spawn(#[source] drydock_vm::SpawnError),
    #[error(
        "the cluster did not start: its owner (pid {pid}) {how} before every machine was ready; {}",
        log_words(log_path, log)
    )]
    DidNotStart {
        pid: u32,
        how: String,
        log_path: PathBuf,
        log: String,
    },
    #[error("the cluster was not ready after {:.0} s; it is stopped:\n{log}", after.as_secs_f64())]
    NotReady { after: Duration, log: String },
    #[error("cannot record the cluster's state")]
    Record(#[source] drydock_vm::LaunchError),
    #[error("every machine is stopped, but not everything could be cleaned up after them: {}; once that is fixed (a full {}: free space), `drydock down` again finishes it", problems.join("; "), state_dir.display())]
    Unreaped {
        state_dir: PathBuf,
        problems: Vec<String>,
    },
    #[error(
        "{} is machine {} of the cluster {} (owner pid {}), which is up: `vm {what}` would take it from its cluster; `vm restart {}` restarts it in the cluster, `drydock down -p {}` stops the cluster",
        machine.vm, machine.machine, machine.cluster, machine.owner_pid, machine.vm, machine.cluster
    )]
    OwnedByCluster {
        machine: ClusterMachine,
        what: &'static str,
    },
}

/// What a log says, for an error: its last lines, or that it is empty.
fn log_words(path: &Path, log: &str) -> String {
    match log.trim().is_empty() {
        true => format!("its log {} is empty", path.display()),
        false => format!("its log {} ends:\n{log}", path.display()),
    }
}

impl ClusterError {
    pub fn is_bad_input(&self) -> bool {
        match self {
            Self::NotPrivate(e) => e.is_bad_input(),
            Self::Machine { source, .. } => source.is_bad_input(),
            _ => matches!(
                self,
                Self::NotUp { .. }
                    | Self::OtherFile { .. }
                    | Self::NoFile(_)
                    | Self::Busy { .. }
                    | Self::NoExec(_)
                    | Self::StdinTooLarge { .. }
                    | Self::NoMachine { .. }
                    | Self::OwnedByCluster { .. }
            ),
        }
    }

    /// The cluster `name` is not up: the error names the clusters that are.
    pub fn not_up(state_dir: &Path, name: &str) -> Self {
        Self::NotUp {
            name: name.to_string(),
            up: list_up(state_dir).into_iter().map(|s| s.name).collect(),
        }
    }

    /// Machine `machine` failed.
    pub(crate) fn machine(machine: &str, e: MachineError) -> Self {
        Self::Machine {
            machine: machine.to_owned(),
            source: Arc::new(e),
        }
    }
}

/// The clusters that are up, for a message.
fn up_list(up: &[String]) -> String {
    match up {
        [] => "no cluster is up".to_string(),
        [one] => format!("the cluster up is {one}"),
        many => format!(
            "the clusters up are {}; `drydock ls` lists them",
            many.join(", ")
        ),
    }
}

/// Who holds a cluster's owner lock (written into the lock file by its holder).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockHolder {
    pub pid: u32,
    /// Seconds since the epoch.
    pub since: u64,
}

impl LockHolder {
    fn describe(&self) -> String {
        let now = drydock_gc::epoch_secs().max(0) as u64;
        format!(
            "pid {}, since {} s ago",
            self.pid,
            now.saturating_sub(self.since)
        )
    }
}

/// How long a process that found the owner lock taken looks for its holder's name.
const HOLDER_WAIT: Duration = Duration::from_millis(500);

/// One owner per cluster: an exclusive `flock` on `owner.lock` in the cluster's folder, held by
/// `up` while it prepares and by the cluster's owner for its life (handed from a detaching
/// `up` to the owner it starts as that process's stdin, so it is never free in between). It is
/// released when every holder's descriptor is closed, a killed holder's included. The file
/// names the holder ([`LockHolder`]) for whoever finds it taken.
#[derive(Debug)]
pub struct OwnerLock {
    file: std::fs::File,
    path: PathBuf,
}

impl OwnerLock {
    /// Take the owner lock of the cluster `name` (its folders made private first), without
    /// waiting: [`ClusterError::Busy`], naming the holder, when another process has it.
    pub fn claim(state_dir: &Path, name: &str) -> Result<Self, ClusterError> {
        let path = owner_lock_file(state_dir, name)?;
        let file = drydock_gc::open_nofollow(&path).map_err(|source| ClusterError::Lock {
            path: path.clone(),
            source,
        })?;
        if !drydock_gc::lock_exclusive_within(&file, Duration::ZERO) {
            // The holder writes its name just after it took the lock: look a moment for it.
            let read = || {
                drydock_gc::read_regular(&path, drydock_gc::Links::Refuse, 4096)
                    .ok()
                    .and_then(|b| serde_json::from_slice::<LockHolder>(&b).ok())
            };
            // A back-off, bounded by HOLDER_WAIT: the holder's name is written to the file
            // right after its flock, and nothing signals that write to a second process.
            let deadline = drydock_gc::Deadline::after(HOLDER_WAIT);
            let mut holder = read();
            while holder.is_none() && !deadline.expired() {
                std::thread::sleep(Duration::from_millis(10).min(deadline.remaining()));
                holder = read();
            }
            return Err(ClusterError::Busy {
                name: name.to_string(),
                holder,
                lock: path,
            });
        }
        let lock = Self { file, path };
        lock.record()?;
        Ok(lock)
    }

    /// The lock handed over by the `up` that started this process (its stdin is the lock
    /// file), or, if there is none, the lock taken anew ([`OwnerLock::claim`]).
    pub fn inherit_or_claim(state_dir: &Path, name: &str) -> Result<Self, ClusterError> {
        use std::os::fd::AsFd;
        use std::os::unix::fs::MetadataExt;
        let path = owner_lock_file(state_dir, name)?;
        let inherited = std::io::stdin()
            .as_fd()
            .try_clone_to_owned()
            .map(std::fs::File::from)
            .ok()
            .filter(|f| {
                let same = |a: &std::fs::Metadata, b: &std::fs::Metadata| {
                    a.dev() == b.dev() && a.ino() == b.ino()
                };
                matches!((f.metadata(), std::fs::symlink_metadata(&path)),
                    (Ok(a), Ok(b)) if same(&a, &b))
            })
            // The same open file as the `up` that holds it: taking it again succeeds.
            .filter(|f| drydock_gc::lock_exclusive_within(f, Duration::ZERO));
        match inherited {
            Some(file) => {
                let lock = Self { file, path };
                lock.record()?;
                Ok(lock)
            }
            None => Self::claim(state_dir, name),
        }
    }

    /// A second descriptor of the lock (the same open file): the detached owner's stdin.
    pub(crate) fn handle(&self) -> std::io::Result<std::fs::File> {
        self.file.try_clone()
    }

    /// Write this process into the lock file as its holder.
    fn record(&self) -> Result<(), ClusterError> {
        use std::os::unix::fs::FileExt;
        let holder = LockHolder {
            pid: std::process::id(),
            since: drydock_gc::epoch_secs().max(0) as u64,
        };
        let text = serde_json::to_vec(&holder).unwrap_or_default();
        self.file
            .set_len(0)
            .and_then(|()| self.file.write_all_at(&text, 0))
            .map_err(|source| ClusterError::Lock {
                path: self.path.clone(),
                source,
            })
    }
}

/// `STATE/clusters/NAME/owner.lock`, its folders made private (or refused).
fn owner_lock_file(state_dir: &Path, name: &str) -> Result<PathBuf, ClusterError> {
    let cpaths = cluster_paths(state_dir, name);
    cpaths.make_private().map_err(ClusterError::NotPrivate)?;
    Ok(cpaths.dir.join("owner.lock"))
}

/// How to launch a cluster's machines.
#[derive(Debug, Clone)]
pub struct ClusterLaunch {
    pub layout: StoreLayout,
    pub state_dir: PathBuf,
    /// The drydock binary (the store servers).
    pub exe: PathBuf,
    pub accel: AccelChoice,
    pub qemu: Option<PathBuf>,
    /// How long a machine may take from start to its backdoor's ready line.
    pub ready_timeout: Duration,
    /// The command line recorded with the machines' run.
    pub argv: Vec<String>,
    /// The run the machines share (see [`machines_run_name`]); `None` until the cluster's
    /// owner records it (or when it could not).
    pub run: Option<i64>,
    /// The bytes of console logs each machine keeps on disk (`console.log` and
    /// `console.timed`, with their rotated files).
    pub log_limit: u64,
}

/// The name of the run a cluster's machines share.
pub fn machines_run_name(cluster: &str) -> String {
    format!("machines of {cluster}")
}

impl ClusterLaunch {
    /// drydock-vm's launcher for the machines.
    pub fn launcher(&self) -> Launcher {
        Launcher {
            layout: self.layout.clone(),
            state_dir: self.state_dir.clone(),
            store_root: None,
            exe: self.exe.clone(),
            argv: self.argv.clone(),
            shared_run: self.run,
        }
    }
}

/// The owner of an up cluster, as `down`, `ps` and `exec` find it (`cluster.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterState {
    pub name: String,
    pub owner_pid: u32,
    pub owner_start_ticks: Option<u64>,
    /// Every machine's backdoor is ready.
    pub ready: bool,
    /// When its owner recorded it first (seconds since the epoch).
    #[serde(default)]
    pub since: Option<i64>,
    /// The run its machines share (ended when the cluster stops, or by `down`).
    #[serde(default)]
    pub run_id: Option<i64>,
    pub plan: ClusterPlan,
}

impl ClusterState {
    pub fn read(state_dir: &Path, name: &str) -> Option<Self> {
        let bytes = drydock_gc::read_regular(
            &cluster_paths(state_dir, name).dir.join("cluster.json"),
            drydock_gc::Links::Refuse,
            drydock_gc::MAX_STATE_BYTES,
        )
        .ok()?;
        serde_json::from_slice(&bytes).ok()
    }
    /// The record of the cluster `name` if it is up (its owner alive).
    pub fn read_up(state_dir: &Path, name: &str) -> Option<Self> {
        Self::read(state_dir, name).filter(Self::owner_alive)
    }
    pub fn owner_alive(&self) -> bool {
        drydock_vm::same_process_alive(self.owner_pid, self.owner_start_ticks)
    }
    pub(crate) fn write(&self, state_dir: &Path) -> Result<(), ClusterError> {
        let mut this = self.clone();
        // The same owner keeps the time it first recorded.
        if this.since.is_none() {
            this.since = Self::read(state_dir, &self.name)
                .filter(|old| old.owner_pid == self.owner_pid)
                .and_then(|old| old.since)
                .or_else(|| Some(drydock_gc::epoch_secs()));
        }
        let path = cluster_paths(state_dir, &self.name)
            .dir
            .join("cluster.json");
        drydock_vm::write_json(&path, &this).map_err(ClusterError::Record)
    }

    /// The composition file this cluster was started from, if recorded.
    pub fn file(&self) -> Option<&Path> {
        self.plan.file.as_deref()
    }
}

/// Every cluster that is up (its owner alive) in the state directory, by name.
pub fn list_up(state_dir: &Path) -> Vec<ClusterState> {
    let mut up: Vec<ClusterState> = std::fs::read_dir(state_dir.join("clusters"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| ClusterState::read_up(state_dir, &e.file_name().to_string_lossy()))
        .collect();
    up.sort_by(|a, b| a.name.cmp(&b.name));
    up
}

/// Whether `given` names the composition `state` was started from: refused (naming both) when
/// the cluster recorded another file.
pub fn check_file(state: &ClusterState, given: &Path) -> Result<(), ClusterError> {
    let Some(running) = state.file() else {
        return Ok(());
    };
    let same = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let given_abs = std::path::absolute(given).unwrap_or_else(|_| given.to_path_buf());
    if same(running) == same(&given_abs) {
        return Ok(());
    }
    Err(ClusterError::OtherFile {
        name: state.name.clone(),
        running: running.to_path_buf(),
        given: given_abs,
    })
}

/// The cluster `name`, which must be up, and (when `file` is given) must have been started
/// from that composition.
pub fn up_cluster(
    state_dir: &Path,
    name: &str,
    file: Option<&Path>,
) -> Result<ClusterState, ClusterError> {
    let state = ClusterState::read_up(state_dir, name)
        .ok_or_else(|| ClusterError::not_up(state_dir, name))?;
    if let Some(f) = file {
        check_file(&state, f)?;
    }
    Ok(state)
}

/// A VM that is a machine of a cluster that is up (its owner alive).
#[derive(Debug, Clone)]
pub struct ClusterMachine {
    pub cluster: String,
    pub machine: String,
    /// `CLUSTER.MACHINE`.
    pub vm: String,
    pub owner_pid: u32,
}

impl ClusterMachine {
    fn of(state: &ClusterState, m: &MachinePlan) -> Self {
        Self {
            cluster: state.name.clone(),
            machine: m.machine.clone(),
            vm: m.vm_name.clone(),
            owner_pid: state.owner_pid,
        }
    }
}

/// Whether the VM `vm` (named `CLUSTER.MACHINE`) is a machine of a cluster that is up: then its
/// owner, not a VM supervisor, runs it, and only the owner may stop or relaunch it.
pub fn cluster_machine(state_dir: &Path, vm: &str) -> Option<ClusterMachine> {
    let (cluster, _) = vm.split_once('.')?;
    let state = ClusterState::read_up(state_dir, cluster)?;
    let m = state.plan.machines.iter().find(|m| m.vm_name == vm)?;
    Some(ClusterMachine::of(&state, m))
}

/// `vm stop`, `vm snapshot`, `vm restore` (`what`) act on a VM's own supervisor: refused, as
/// bad input, for a machine of a cluster that is up (see [`cluster_machine`]).
pub fn refuse_cluster_machine(
    state_dir: &Path,
    vm: &str,
    what: &'static str,
) -> Result<(), ClusterError> {
    match cluster_machine(state_dir, vm) {
        Some(machine) => Err(ClusterError::OwnedByCluster { machine, what }),
        None => Ok(()),
    }
}

/// The machine `machine` of the cluster `cluster`, which must be up (and started from `file`,
/// when given): bad input otherwise.
pub fn up_machine(
    state_dir: &Path,
    cluster: &str,
    file: Option<&Path>,
    machine: &str,
) -> Result<ClusterMachine, ClusterError> {
    let state = up_cluster(state_dir, cluster, file)?;
    let m = state
        .plan
        .machine(machine)
        .ok_or_else(|| ClusterError::NoMachine {
            cluster: cluster.into(),
            machine: machine.into(),
            has: state
                .plan
                .machines
                .iter()
                .map(|m| m.machine.clone())
                .collect(),
        })?;
    Ok(ClusterMachine::of(&state, m))
}

/// Make the cluster `plan`'s own folders private (`STATE/clusters/NAME` and its socket folder,
/// see `VmPaths::make_private`) and check every machine's that exists (`VmPaths::check_private`:
/// a machine's folders are made by its launch's claim, so a cluster that does not start leaves
/// none); a folder of another user, or one others can write, is refused before anything is
/// written in it.
pub(crate) fn make_private(state_dir: &Path, plan: &ClusterPlan) -> Result<(), ClusterError> {
    cluster_paths(state_dir, &plan.name)
        .make_private()
        .map_err(ClusterError::NotPrivate)?;
    for m in &plan.machines {
        VmPaths::in_state_dir(state_dir, &m.vm_name)
            .check_private()
            .map_err(ClusterError::NotPrivate)?;
    }
    Ok(())
}

/// The cluster's folder (`STATE/clusters/NAME`) and its socket folder (the hubs).
pub fn cluster_paths(state_dir: &Path, name: &str) -> VmPaths {
    VmPaths::in_folder(state_dir, "clusters", name)
}

/// Where a machine's thread says why the machine failed while it ran (its store server died),
/// for `ps` and `exec` (removed when it starts again).
fn failure_file(paths: &VmPaths) -> PathBuf {
    paths.dir.join("failed")
}

/// Why the machine of `paths` failed while it ran, if it did (and has not started since).
pub fn machine_failure(paths: &VmPaths) -> Option<String> {
    let bytes =
        drydock_gc::read_regular(&failure_file(paths), drydock_gc::Links::Refuse, 4096).ok()?;
    let text = String::from_utf8_lossy(&bytes).trim().to_string();
    (!text.is_empty()).then_some(text)
}

/// Record why the machine of `paths` failed (`None`: it did not, or it starts again).
pub(crate) fn record_failure(paths: &VmPaths, why: Option<&str>) {
    let path = failure_file(paths);
    match why {
        None => {
            let _ = std::fs::remove_file(path);
        }
        Some(why) => {
            if let Err(e) = drydock_gc::write_atomic(&path, why.as_bytes()) {
                tracing::warn!("cannot write {}: {e}", path.display());
            }
        }
    }
}

/// The socket a machine's owner serves `exec` on.
pub fn exec_socket(paths: &VmPaths) -> PathBuf {
    paths.sockets.join("exec.sock")
}

pub(crate) fn hub_socket(cluster: &VmPaths, vlan: u8) -> PathBuf {
    cluster.sockets.join(format!("vlan{vlan}.sock"))
}

pub(crate) fn nic_socket(paths: &VmPaths, vlan: u8) -> PathBuf {
    paths.sockets.join(format!("vlan{vlan}.sock"))
}

/// Where a cluster's plan is kept for its owner and for `logs` (`clusters/NAME/up.json`).
pub fn up_plan_file(state_dir: &Path, name: &str) -> PathBuf {
    cluster_paths(state_dir, name).dir.join("up.json")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_owner_lock_holder_at_a_time_named_to_the_others() {
        let d = tempfile::tempdir().unwrap();
        let state = d.path().join("state");
        let first = OwnerLock::claim(&state, "c").unwrap();
        let cdir = cluster_paths(&state, "c").dir;
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(
                &std::fs::metadata(&cdir).unwrap().permissions()
            ) & 0o777,
            0o700
        );
        let e = OwnerLock::claim(&state, "c").unwrap_err();
        let text = e.to_string();
        assert!(e.is_bad_input(), "{text}");
        assert!(
            text.starts_with(&format!(
                "the cluster c is being started by another drydock (pid {}, since 0 s ago)",
                std::process::id()
            )),
            "{text}"
        );
        assert!(text.contains("owner.lock"), "{text}");
        // Another cluster is not held; the lock is free again once its holder closes it.
        drop(OwnerLock::claim(&state, "other").unwrap());
        let handed = first.handle().unwrap();
        drop(first);
        assert!(matches!(
            OwnerLock::claim(&state, "c"),
            Err(ClusterError::Busy { .. })
        ));
        drop(handed);
        let again = OwnerLock::claim(&state, "c").unwrap();
        // Without a lock file as stdin, the owner takes the lock itself.
        drop(again);
        drop(OwnerLock::inherit_or_claim(&state, "c").unwrap());
    }
}
