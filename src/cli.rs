//! The command line, as `clap` derive types. The contract lives in `docs/cli.md`; this file is its
//! code form. Nothing here has side effects.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use clap_complete::engine::ArgValueCandidates;

/// drydock: run NixOS VM tests without the pain.
#[derive(Debug, Parser)]
#[command(name = "drydock", version, about, propagate_version = true, after_help = crate::exit::EXIT_CODES_HELP)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalOpts,
    #[command(flatten)]
    pub compose: ComposeOpts,
    #[command(subcommand)]
    pub command: Command,
}

/// Which cluster, given before the subcommand as compose takes them (`drydock -p demo ps`);
/// the cluster commands also take them after their name.
#[derive(Debug, Args, Clone, Default)]
pub struct ComposeOpts {
    /// The composition of the cluster commands (default: drydock.nix here).
    #[arg(short = 'f', long = "file", value_name = "FILE", action = clap::ArgAction::Append)]
    pub file: Vec<PathBuf>,
    /// The cluster's name for the cluster commands (default: the name of FILE's directory).
    #[arg(short = 'p', long = "project-name", value_name = "NAME", add = ArgValueCandidates::new(crate::complete::clusters))]
    pub name: Option<String>,
}

/// Options every subcommand takes.
#[derive(Debug, Args)]
pub struct GlobalOpts {
    /// A chroot Nix store, as Nix's own `--store ROOT` (store at ROOT/nix/store).
    #[arg(long, global = true, value_name = "ROOT")]
    pub store: Option<PathBuf>,
    /// drydock's own state (runs database, VM folders).
    #[arg(long, global = true, value_name = "DIR", env = "DRYDOCK_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Machine-readable output on stdout (one JSON document).
    #[arg(long, global = true)]
    pub json: bool,
    /// More logging on stderr (repeat for more).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Less logging on stderr.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub quiet: u8,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Preflight for running VMs: KVM, cgroups, QEMU, disk and Nix settings, with fixes.
    Doctor(DoctorArgs),
    /// Run and manage VMs: QEMU launched directly, the store shared read-only.
    Vm(VmArgs),
    /// Internal: own a detached VM (started by `vm run --detach`).
    #[command(name = "__vm-supervise", hide = true)]
    VmSupervise(VmSuperviseArgs),
    /// Internal: the read-only virtio-fs store server, run by drydock itself.
    #[command(name = "__store-server", hide = true)]
    StoreServer(StoreServerArgs),
    /// Run a command and record, as a run, the store paths it caused to be registered.
    Track(TrackArgs),
    /// The recorded runs (VM launches included) with paths, sizes and what is reclaimable.
    Runs(RunsArgs),
    /// Reclaim the store paths and VM state of the selected runs, through Nix itself.
    Gc(GcArgs),
    /// Disk used by test artifacts, counting hard-linked bytes once.
    Du(DuArgs),
    /// Find and repair store damage (registered paths missing on disk, stray entries).
    Store(StoreArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) for drydock.
    Completions(CompletionsArgs),
    /// Print drydock's manual page (roff), generated from the same definitions as --help.
    Man,
    /// Boot a composition (drydock.nix): every machine a VM, on private networks.
    Up(UpArgs),
    /// Stop every machine of a cluster and its networks.
    Down(ClusterArgs),
    /// The clusters that are up: name, composition file, machines, since when.
    Ls,
    /// A cluster's machines: name, state, pid, addresses, system, uptime.
    Ps(ClusterArgs),
    /// Run a command as root in a cluster machine, through its backdoor.
    Exec(ExecArgs),
    /// Copy files or directories between the host and a cluster machine (MACHINE:PATH).
    Cp(CpArgs),
    /// The machines' console logs, prefixed by machine, merged in time order.
    Logs(LogsArgs),
    /// Wait until a machine's console prints a matching line, or a command succeeds in it.
    Wait(MachineWaitArgs),
    /// An interactive root shell in a cluster machine, through its backdoor.
    Shell(ShellArgs),
    /// Run a NixOS-test-driver-style Python test script against a cluster (booting it if needed).
    Test(TestArgs),
    /// Save a running cluster whole (every machine's memory, devices and disk) as snapshot TAG.
    Snapshot(SnapshotArgs),
    /// Put a cluster back to snapshot TAG: stopped if up, every machine restored and resumed at once.
    Restore(RestoreArgs),
    /// A cluster's snapshots: tag, age, machines, size, systems.
    Snapshots(ClusterArgs),
    /// The cluster's networks: who could not reach whom and why, faults, and packet capture.
    Net(NetArgs),
    /// Internal: own a detached cluster (started by `up --detach`).
    #[command(name = "__cluster-supervise", hide = true)]
    ClusterSupervise(ClusterSuperviseArgs),
}

impl Command {
    /// Whether it acts on a cluster (so `-f`/`-p` before it mean something).
    pub fn is_cluster_command(&self) -> bool {
        matches!(
            self,
            Self::Up(_)
                | Self::Down(_)
                | Self::Ps(_)
                | Self::Exec(_)
                | Self::Cp(_)
                | Self::Logs(_)
                | Self::Wait(_)
                | Self::Shell(_)
                | Self::Test(_)
                | Self::Snapshot(_)
                | Self::Restore(_)
                | Self::Snapshots(_)
                | Self::Net(_)
        )
    }
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// Which cluster: the composition file and the cluster's name (also accepted before the
/// subcommand, see [`ComposeOpts`]).
#[derive(Debug, Args, Clone, Default)]
pub struct ClusterArgs {
    /// The composition (default: drydock.nix here).
    #[arg(short = 'f', long = "file", value_name = "FILE", action = clap::ArgAction::Append)]
    pub file: Vec<PathBuf>,
    /// The cluster's name (default: the name of FILE's directory).
    #[arg(short = 'p', long = "project-name", value_name = "NAME", add = ArgValueCandidates::new(crate::complete::clusters))]
    pub name: Option<String>,
}

#[derive(Debug, Args)]
pub struct UpArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Only these machines (default: all).
    #[arg(add = ArgValueCandidates::new(crate::complete::machines))]
    pub machines: Vec<String>,
    /// Return once every machine is ready; the cluster keeps running (`drydock down` stops it).
    #[arg(short = 'd', long)]
    pub detach: bool,
    /// Seconds each machine gets to become ready (its backdoor connected).
    #[arg(long, value_name = "SECS", default_value = "600", value_parser = parse_secs)]
    pub timeout: std::time::Duration,
    /// Hide these machines' console lines from the terminal (they still go to their logs).
    #[arg(long, value_name = "M,...", value_delimiter = ',')]
    pub hide: Vec<String>,
    /// Show only these machines' console lines.
    #[arg(
        long,
        value_name = "M,...",
        value_delimiter = ',',
        conflicts_with = "hide"
    )]
    pub show: Vec<String>,
    #[arg(long, value_enum, default_value_t = AccelArg::Auto)]
    pub accel: AccelArg,
    /// The QEMU binary (default: $DRYDOCK_QEMU, else qemu-system-x86_64 on PATH).
    #[arg(long, value_name = "PATH")]
    pub qemu: Option<PathBuf>,
    /// Evaluate, build and print the plan (on a cluster that is up: keep, switch, restart,
    /// create or remove, per machine); change nothing.
    #[arg(long, conflicts_with = "watch")]
    pub dry_run: bool,
    /// Hot reload: restart the machines that could switch in place.
    #[arg(long)]
    pub restart: bool,
    /// Start the machines even if together they ask for more memory than the host has.
    #[arg(long)]
    pub allow_overcommit: bool,
    /// Stay in the foreground and reload when a file under the composition's directory that
    /// the evaluation read changes (the composition, its imports, files it reads).
    #[arg(long, conflicts_with = "detach")]
    pub watch: bool,
    /// How much console log each machine keeps on disk (its `console.log` and
    /// `console.timed`, each rotated once): bytes, or with K, M or G (binary units).
    #[arg(long, value_name = "SIZE", default_value = "32M", value_parser = parse_size)]
    pub log_limit: u64,
    /// Seconds the evaluation and the build of the systems may take (then they are killed).
    #[arg(long, value_name = "SECS", default_value = "7200", value_parser = parse_secs)]
    pub build_timeout: std::time::Duration,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The composition (`-f` is --follow here, as in compose; `drydock -f FILE logs` works).
    #[arg(long = "file", value_name = "FILE", action = clap::ArgAction::Append)]
    pub file: Vec<PathBuf>,
    /// The cluster's name (default: the name of FILE's directory).
    #[arg(short = 'p', long = "project-name", value_name = "NAME", add = ArgValueCandidates::new(crate::complete::clusters))]
    pub name: Option<String>,
    /// Only these machines (default: all).
    #[arg(add = ArgValueCandidates::new(crate::complete::machines))]
    pub machines: Vec<String>,
    /// Leave out these machines.
    #[arg(long, value_name = "M,...", value_delimiter = ',')]
    pub hide: Vec<String>,
    /// Keep printing new lines until the cluster is down (or Ctrl-C).
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// Only the last N lines of each machine (then, with -f, what comes).
    #[arg(long, value_name = "N")]
    pub tail: Option<usize>,
    /// Each line with the time it arrived (UTC, to the millisecond).
    #[arg(short = 't', long)]
    pub timestamps: bool,
}

impl LogsArgs {
    /// The cluster it names.
    pub fn cluster(&self) -> ClusterArgs {
        ClusterArgs {
            file: self.file.clone(),
            name: self.name.clone(),
        }
    }
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    #[arg(add = ArgValueCandidates::new(crate::complete::machines))]
    pub machine: String,
    #[command(flatten)]
    pub exec: ExecOpts,
}

/// How `exec` and `vm exec` run a command.
#[derive(Debug, Args)]
pub struct ExecOpts {
    /// Seconds the command may run (then it is killed and the exit code is 124).
    #[arg(long, value_name = "SECS", default_value = "600", value_parser = parse_secs)]
    pub timeout: std::time::Duration,
    /// Forward stdin even when it is a terminal (read to its end first; it is forwarded
    /// whenever it is not a terminal).
    #[arg(short = 'i', long)]
    pub interactive: bool,
    /// On a terminal: run the command as `shell` runs its shell (raw keys, its output as it
    /// comes, stderr merged into stdout).
    #[arg(short = 't', long, conflicts_with = "interactive")]
    pub tty: bool,
    /// The command: one word is a shell command line, run as written (`'a | b'`); several are
    /// a program and its arguments, each passed intact.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct CpArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// What to copy: a host path, or MACHINE:PATH.
    #[arg(value_name = "SRC")]
    pub src: String,
    /// Where to: MACHINE:PATH, or a host path (into it if it is a directory).
    #[arg(value_name = "DST")]
    pub dst: String,
    /// Seconds the copy may take in the guest.
    #[arg(long, value_name = "SECS", default_value = "600", value_parser = parse_secs)]
    pub timeout: std::time::Duration,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("until").required(true).args(["console", "succeeds"])))]
pub struct MachineWaitArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    #[arg(add = ArgValueCandidates::new(crate::complete::machines))]
    pub machine: String,
    /// Until a line of the machine's console (since it booted) matches this regular expression.
    #[arg(long, value_name = "REGEX")]
    pub console: Option<String>,
    /// Until this command exits 0 in the guest (tried again every second).
    #[arg(long, value_name = "CMD")]
    pub succeeds: Option<String>,
    /// Give up after SECS (exit 1, with what was seen last).
    #[arg(long, value_name = "SECS", default_value = "900", value_parser = parse_secs)]
    pub timeout: std::time::Duration,
}

#[derive(Debug, Args)]
pub struct SnapshotArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// The snapshot's tag (letters, digits, '-', '_', '.'); an existing one is replaced.
    #[arg(value_name = "TAG")]
    pub tag: String,
    /// Stop the cluster once it is saved.
    #[arg(long)]
    pub stop: bool,
    /// Remove the snapshot TAG instead (and its pins).
    #[arg(long, conflicts_with = "stop")]
    pub rm: bool,
}

#[derive(Debug, Args)]
pub struct NetArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Only what the hubs saw in the last DURATION (`30s`, `5m`, `2h`).
    #[arg(long, value_name = "DURATION", global = true)]
    pub since: Option<String>,
    #[command(subcommand)]
    pub action: Option<NetAction>,
}

#[derive(Debug, Subcommand)]
pub enum NetAction {
    /// Write pcap (Wireshark, tcpdump -r) of the frames to and from MACHINEs (all if none) on one VLAN.
    Capture {
        /// The machines (default: every frame of the VLAN).
        machines: Vec<String>,
        /// The VLAN (default: the first VLAN of the machines named, else the cluster's first).
        #[arg(long)]
        vlan: Option<u8>,
        /// Write to OUT instead of standard output (created 0600).
        #[arg(short = 'w', value_name = "OUT")]
        out: Option<PathBuf>,
        /// Stop after N frames.
        #[arg(long, value_name = "N")]
        count: Option<u64>,
        /// Stop after SECS seconds.
        #[arg(long, value_name = "SECS", value_parser = parse_secs)]
        seconds: Option<std::time::Duration>,
    },
    /// Drop MACHINE's frames both ways at the hub (a pulled cable), on one VLAN or all of its.
    Block {
        machine: String,
        #[arg(long)]
        vlan: Option<u8>,
    },
    /// Undo `block`.
    Unblock {
        machine: String,
        #[arg(long)]
        vlan: Option<u8>,
    },
    /// Frames cross only within a group: `partition A,B C,D,E` (machines not named keep their links).
    Partition {
        #[arg(required = true, num_args = 2.., value_name = "GROUP")]
        groups: Vec<String>,
    },
    /// Delay, lose or pace the frames leaving MACHINEs (all if none); no option: undo.
    Shape {
        machines: Vec<String>,
        #[arg(long)]
        vlan: Option<u8>,
        /// e.g. 100ms, 1.5s
        #[arg(long)]
        delay: Option<String>,
        /// e.g. 10ms (uniform, around the delay)
        #[arg(long)]
        jitter: Option<String>,
        /// e.g. 5%, 100% (a block of the outgoing side)
        #[arg(long)]
        loss: Option<String>,
        /// e.g. 10mbit, 512kbit, 1mbps
        #[arg(long)]
        rate: Option<String>,
    },
    /// Undo every fault (blocks, the partition, shapes).
    Heal,
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// The snapshot's tag.
    #[arg(value_name = "TAG")]
    pub tag: String,
    /// Seconds every machine gets to be restored and answer.
    #[arg(long, value_name = "SECS", default_value = "120", value_parser = parse_secs)]
    pub timeout: std::time::Duration,
}

#[derive(Debug, Args)]
pub struct TestArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// The test script, Python in the NixOS test driver's style (default: the composition's
    /// top-level `testScript`).
    #[arg(value_name = "SCRIPT")]
    pub script: Option<PathBuf>,
    /// Also write the report as JUnit XML to FILE (a test case per subtest).
    #[arg(long, value_name = "FILE")]
    pub junit: Option<PathBuf>,
    /// Leave the cluster up at the end when this run started it.
    #[arg(long)]
    pub keep: bool,
    /// Stay up: on every edit of the composition's directory or of SCRIPT, reload the cluster
    /// and run the script again (Ctrl-C ends).
    #[arg(long)]
    pub watch: bool,
    /// Restore the cluster snapshot TAG before each run (the cluster stays up afterwards).
    #[arg(long, value_name = "TAG")]
    pub from: Option<String>,
    /// Seconds one run of the script may take (then it is stopped and fails) [default: no limit].
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    pub timeout: Option<std::time::Duration>,
    /// Hide these machines' console lines (they still go to their logs).
    #[arg(long, value_name = "M,...", value_delimiter = ',')]
    pub hide: Vec<String>,
    /// Show only these machines' console lines.
    #[arg(
        long,
        value_name = "M,...",
        value_delimiter = ',',
        conflicts_with = "hide"
    )]
    pub show: Vec<String>,
    /// When this run starts the cluster: as for `up`.
    #[arg(long, value_enum, default_value_t = AccelArg::Auto)]
    pub accel: AccelArg,
    /// When this run starts the cluster: the QEMU binary, as for `up`.
    #[arg(long, value_name = "PATH")]
    pub qemu: Option<PathBuf>,
    /// Start the machines even if together they ask for more memory than the host has.
    #[arg(long)]
    pub allow_overcommit: bool,
    /// Seconds the evaluation and the build of the systems may take.
    #[arg(long, value_name = "SECS", default_value = "7200", value_parser = parse_secs)]
    pub build_timeout: std::time::Duration,
    /// The Python interpreter (default: python3 on PATH).
    #[arg(long, value_name = "PATH", default_value = "python3")]
    pub python: PathBuf,
}

#[derive(Debug, Args)]
pub struct ShellArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    #[arg(add = ArgValueCandidates::new(crate::complete::machines))]
    pub machine: String,
}

#[derive(Debug, Args)]
pub struct ClusterSuperviseArgs {
    #[arg(long)]
    pub name: String,
    #[arg(long, value_enum)]
    pub accel: AccelArg,
    #[arg(long)]
    pub qemu: Option<PathBuf>,
    #[arg(long, value_parser = parse_secs)]
    pub timeout: std::time::Duration,
    /// The run the machines join (recorded by the `up` that starts this owner).
    #[arg(long)]
    pub run: Option<i64>,
    #[arg(long, value_parser = parse_size, default_value = "32M")]
    pub log_limit: u64,
    /// Boot no machine: each boots when asked (`drydock test`); stay up while none runs.
    #[arg(long)]
    pub idle: bool,
    /// Bring every machine back from this cluster snapshot instead of booting it.
    #[arg(long, value_name = "TAG", conflicts_with = "idle")]
    pub restore: Option<String>,
}

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Build a tiny derivation that opens /dev/kvm inside the Nix sandbox.
    #[arg(long)]
    pub nix_probe: bool,
    /// With --nix-probe: run the probe build on each of Nix's remote builders too, through Nix's
    /// own remote building (`--builders` naming one builder, `--max-jobs 0`).
    #[arg(long, requires = "nix_probe")]
    pub builders: bool,
    /// Boot a Linux kernel under KVM with a deadline and report how far it got.
    #[arg(long)]
    pub boot_probe: bool,
    /// The kernel for --boot-probe (default: the test guest's, from scripts/setup's cache).
    #[arg(long, value_name = "K", requires = "boot_probe")]
    pub probe_kernel: Option<PathBuf>,
    /// An initrd for --boot-probe.
    #[arg(long, value_name = "I", requires = "boot_probe")]
    pub probe_initrd: Option<PathBuf>,
    /// Seconds the kernel gets to reach userspace in --boot-probe.
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = 20,
        requires = "boot_probe"
    )]
    pub probe_timeout: u64,
}

/// `__store-server`: serve a store directory over vhost-user-fs on a unix socket (internal).
#[derive(Debug, Args)]
pub struct StoreServerArgs {
    /// The vhost-user socket to listen on.
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
    /// The directory to share (the physical Nix store).
    #[arg(long, value_name = "DIR")]
    pub shared_dir: PathBuf,
    /// Show only these store path basenames at the root, one per line ("-" reads stdin).
    #[arg(long, value_name = "FILE")]
    pub allow_list: Option<PathBuf>,
    /// Serve the directory writable (a guest's own shared folder, never a store).
    #[arg(long, conflicts_with = "allow_list")]
    pub writable: bool,
    /// Worker threads for FUSE requests (0: handle them on the queue thread).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub thread_pool_size: usize,
    /// Skip the sandbox (chroot, namespaces, capabilities, seccomp); for debugging only.
    #[arg(long)]
    pub no_sandbox: bool,
}

#[derive(Debug, Args)]
pub struct TrackArgs {
    /// Name of the run (default: derived from the command).
    #[arg(long)]
    pub name: Option<String>,
    /// The command to run, after `--`.
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct RunsArgs {
    #[command(subcommand)]
    pub action: Option<RunsAction>,
}

#[derive(Debug, Subcommand)]
pub enum RunsAction {
    /// One run's paths and, for anything still alive, why.
    Show {
        /// Run id.
        id: i64,
    },
}

#[derive(Debug, Args)]
pub struct GcArgs {
    /// Keep the N most recent finished runs; select the others.
    #[arg(long, value_name = "N")]
    pub keep_last: Option<usize>,
    /// Select runs that ended longer ago than this (e.g. 7d, 12h).
    #[arg(long, value_name = "DURATION")]
    pub older_than: Option<String>,
    /// Select this run (repeatable).
    #[arg(long = "run", value_name = "ID")]
    pub runs: Vec<i64>,
    /// Every dead path of the store, as a full Nix GC would collect.
    #[arg(long)]
    pub all: bool,
    /// Only report what would be deleted and how much.
    #[arg(long)]
    pub dry_run: bool,
    /// Paths per `nix-store --delete` call.
    #[arg(long, default_value_t = drydock_gc::DEFAULT_BATCH, hide = true, env = "DRYDOCK_GC_BATCH")]
    pub batch_size: usize,
}

#[derive(Debug, Args)]
pub struct DuArgs {}

#[derive(Debug, Args)]
pub struct StoreArgs {
    #[command(subcommand)]
    pub action: StoreAction,
}

#[derive(Debug, Subcommand)]
pub enum StoreAction {
    /// Find registered-but-missing paths and stray entries; exit 1 if damaged.
    Check,
    /// Remove missing paths and their referrers from Nix's database, through Nix.
    Repair {
        /// Only show what would be removed.
        #[arg(long)]
        dry_run: bool,
        /// Remove the symlink roots (gcroots links, `result` links) that hold damaged paths.
        #[arg(long)]
        remove_roots: bool,
    },
}

#[derive(Debug, Args)]
pub struct VmArgs {
    #[command(subcommand)]
    pub command: VmCommand,
}

#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Boot a VM (foreground by default: console on the terminal, Ctrl-C stops everything).
    Run(VmRunArgs),
    /// The VMs in the state dir: name, state, pid, accel, memory, uptime.
    List,
    /// Stop a VM: QMP powerdown, grace, quit, SIGTERM, SIGKILL.
    Stop(VmStopArgs),
    /// Print a VM's console log.
    Logs(VmLogsArgs),
    /// Relaunch from the recorded launch: no evaluation, no build, no Nix call.
    Restart(VmRestartArgs),
    /// Save a running VM's full state (needs --store-mode image).
    Snapshot(VmSnapshotArgs),
    /// Bring a VM back from a snapshot; returns when it runs again.
    Restore(VmRestoreArgs),
    /// Run a command as root in a VM through its backdoor (cluster machines), by VM name.
    Exec(VmExecArgs),
}

#[derive(Debug, Args)]
pub struct VmExecArgs {
    pub name: String,
    #[command(flatten)]
    pub exec: ExecOpts,
}

/// How a launch waits for its VM (shared by run and restart).
#[derive(Debug, Args)]
pub struct WaitArgs {
    /// The VM is ready when a console line matches this regular expression.
    #[arg(long, value_name = "REGEX")]
    pub ready: Option<String>,
    /// Return once ready (needs --ready); the VM keeps running.
    #[arg(long, requires = "ready")]
    pub detach: bool,
    /// Give up (stop the VM, exit 1) if not ready within SECS (or, without --ready, stop it then).
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    pub timeout: Option<std::time::Duration>,
}

#[derive(Debug, Args)]
pub struct VmRestartArgs {
    pub name: String,
    /// Keep the writable disk as it is (default: a fresh overlay).
    #[arg(long)]
    pub keep_state: bool,
    #[command(flatten)]
    pub wait: WaitArgs,
}

#[derive(Debug, Args)]
pub struct VmSnapshotArgs {
    pub name: String,
    #[arg(long, default_value = "default")]
    pub tag: String,
}

#[derive(Debug, Args)]
pub struct VmRestoreArgs {
    pub name: String,
    #[arg(long, default_value = "default")]
    pub tag: String,
    /// Seconds to wait for the VM to run again.
    #[arg(long, value_name = "SECS", default_value = "60", value_parser = parse_secs)]
    pub timeout: std::time::Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AccelArg {
    /// KVM when every doctor KVM check passes (including the execution probe), else TCG.
    Auto,
    Kvm,
    Tcg,
}

impl From<AccelArg> for drydock_vm::AccelChoice {
    fn from(a: AccelArg) -> Self {
        match a {
            AccelArg::Auto => Self::Auto,
            AccelArg::Kvm => Self::Kvm,
            AccelArg::Tcg => Self::Tcg,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ShareArg {
    /// Only the system's closure (from the Nix database's references).
    Closure,
    /// The whole store.
    Store,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProfileArg {
    /// drydock's own guests: the store over virtio-fs, a blank disk.
    Drydock,
    /// A NixOS test node: what its /etc/fstab names (ext4 `/` by label, the store, xchg and
    /// shared over 9p or virtio-fs), a user-mode NIC first, regInfo=.
    NixosTest,
}

impl From<ProfileArg> for drydock_vm::Profile {
    fn from(p: ProfileArg) -> Self {
        match p {
            ProfileArg::Drydock => Self::Drydock,
            ProfileArg::NixosTest => Self::NixosTest,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreModeArg {
    /// virtio-fs from drydock's read-only store server (tag `nix-store`).
    Virtiofs,
    /// The closure as a read-only EROFS image on a virtio disk (/dev/vda).
    Image,
}

#[derive(Debug, Args)]
pub struct VmRunArgs {
    /// The VM's name (its folder in the state dir).
    #[arg(long)]
    pub name: String,
    /// A NixOS-shaped system: kernel, initrd, init, kernel-params.
    #[arg(long, value_name = "TOPLEVEL", conflicts_with_all = ["kernel", "initrd"])]
    pub system: Option<String>,
    /// Kernel image (instead of --system).
    #[arg(long, value_name = "K", requires = "initrd")]
    pub kernel: Option<std::path::PathBuf>,
    /// Initrd (with --kernel).
    #[arg(long, value_name = "I")]
    pub initrd: Option<std::path::PathBuf>,
    /// Kernel command line (with --kernel), or words added to the system's.
    #[arg(long, value_name = "ARGS", allow_hyphen_values = true)]
    pub append: Option<String>,
    /// Which devices the guest gets: `drydock` (drydock's guests) or `nixos-test` (a NixOS
    /// test node: what its /etc/fstab names, a user-mode NIC first, regInfo=).
    #[arg(long, value_enum, default_value_t = ProfileArg::Drydock)]
    pub profile: ProfileArg,
    /// Guest memory in MiB [default: 512; 1024 with --profile nixos-test].
    #[arg(long, value_name = "MIB")]
    pub memory: Option<u32>,
    /// Start the VM even if it asks for more memory than the host has.
    #[arg(long)]
    pub allow_overcommit: bool,
    /// Virtual CPUs.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=255))]
    pub cpus: Option<u32>,
    #[arg(long, value_enum, default_value_t = AccelArg::Auto)]
    pub accel: AccelArg,
    /// What of the store the guest sees.
    #[arg(long, value_enum, default_value_t = ShareArg::Closure)]
    pub share: ShareArg,
    #[arg(long, value_enum, default_value_t = StoreModeArg::Virtiofs)]
    pub store_mode: StoreModeArg,
    #[command(flatten)]
    pub wait: WaitArgs,
    /// Size of the VM's writable disk (a qcow2 overlay, /dev/vda or /dev/vdb; with --profile
    /// nixos-test the ext4 `/` its fstab names), in MiB [default: 1024].
    #[arg(long, value_name = "MIB", value_parser = clap::value_parser!(u32).range(1..))]
    pub disk_size: Option<u32>,
    /// The QEMU binary (default: $DRYDOCK_QEMU, else qemu-system-x86_64 on PATH).
    #[arg(long, value_name = "PATH")]
    pub qemu: Option<std::path::PathBuf>,
}

#[derive(Debug, Args)]
pub struct VmStopArgs {
    pub name: String,
    /// Skip the guest's powerdown and QEMU's quit: kill at once.
    #[arg(long)]
    pub force: bool,
    /// Seconds the guest gets to power off.
    #[arg(long, value_name = "SECS", default_value = "3", value_parser = parse_secs)]
    pub grace: std::time::Duration,
}

#[derive(Debug, Args)]
pub struct VmLogsArgs {
    pub name: String,
    /// Keep printing as the console grows, until the VM stops (or Ctrl-C).
    #[arg(long, short)]
    pub follow: bool,
}

#[derive(Debug, Args)]
pub struct VmSuperviseArgs {
    #[arg(long)]
    pub name: String,
    /// Start paused, loading the snapshot in this folder, then resume.
    #[arg(long)]
    pub snapshot: Option<std::path::PathBuf>,
    /// With --snapshot: leave the guest paused once loaded.
    #[arg(long, requires = "snapshot")]
    pub paused: bool,
}

/// The longest wait any option accepts: a year.
const MAX_SECS: f64 = 365.0 * 86400.0;

/// Seconds as the user typed them (clap's error echoes the text itself, not a rounded float):
/// a non-negative decimal number of at most a year.
fn parse_secs(text: &str) -> Result<std::time::Duration, String> {
    let v: f64 = text
        .trim()
        .parse()
        .map_err(|_| "not a number of seconds".to_string())?;
    if !v.is_finite() || v < 0.0 {
        return Err("not a non-negative number of seconds".into());
    }
    if v > MAX_SECS {
        return Err(format!("more than {MAX_SECS} seconds (a year)"));
    }
    Ok(std::time::Duration::from_secs_f64(v))
}

/// A size in bytes: a number, or a number with K, M or G (KiB, MiB, GiB); at least drydock's
/// smallest log limit.
fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (digits, unit) = match t.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => t.split_at(i),
        None => (t, ""),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| "not a size (bytes, or a number with K, M or G)".to_string())?;
    let shift = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        _ => return Err(format!("unknown unit {unit:?} (K, M or G)")),
    };
    let bytes = n
        .checked_mul(1 << shift)
        .ok_or_else(|| "too large".to_string())?;
    let min = drydock_vm::MIN_LOG_LIMIT;
    if bytes < min {
        return Err(format!("less than {} KiB", min >> 10));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_or_say_why() {
        assert_eq!(parse_size("32M"), Ok(32 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("128KiB"), Ok(128 << 10));
        assert!(parse_size("1K").unwrap_err().contains("less than"));
        assert!(parse_size("12X").unwrap_err().contains("unit"));
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999G").is_err());
    }

    #[test]
    fn seconds_parse_or_say_why() {
        use std::time::Duration;
        for (text, want) in [
            ("0", Ok(Duration::ZERO)),
            ("1.5", Ok(Duration::from_millis(1500))),
            (" 60 ", Ok(Duration::from_secs(60))),
            (
                "18446744073709551615",
                Err("more than 31536000 seconds (a year)"),
            ),
            ("-1", Err("not a non-negative number of seconds")),
            ("inf", Err("not a non-negative number of seconds")),
            ("NaN", Err("not a non-negative number of seconds")),
            ("ten", Err("not a number of seconds")),
        ] {
            assert_eq!(parse_secs(text), want.map_err(str::to_string), "{text}");
        }
    }
}
