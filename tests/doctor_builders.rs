//! `drydock doctor` against real remote builders: hosts in network namespaces that the test makes
//! itself (a veth pair each, addresses on a private /30, no route anywhere else), each with its
//! own Nix store (`?remote-store=` in the machine line), its own nix.conf (sshd's `SetEnv
//! NIX_CONF_DIR`) and its own `sshd`, reached by Nix over ssh with a key the test generates:
//!
//! - h1 (`ssh-ng://`) builds as root (`build-users-group =`): its sandbox opens `/dev/kvm`;
//! - h2 (`ssh://`) builds as the nixbld users, who cannot open the root-only `/dev/kvm`;
//! - h3 has a namespace but no sshd: unreachable (connection refused).
//!
//! Nothing leaves this machine: the only addresses used are the namespaces' own, and the
//! namespaces, sshd processes and files are removed when the test ends, also when it fails (the
//! [`Fleet`] guard). Needs root, `/dev/kvm`, `ip`, `sshd`, `ssh-keygen` and `nix-build`: all
//! installed by scripts/setup, so a missing one fails the test instead of skipping it.

use crate::common::{self, Checks, Drydock, Ran};

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const SSHD: &str = "/usr/sbin/sshd";

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ip(args: &[&str]) -> String {
    run(Command::new("ip").args(args))
}

/// What the tests need, each missing piece a clear failure.
fn require_tools() {
    let uid = run(Command::new("id").arg("-u"));
    assert_eq!(
        uid.trim(),
        "0",
        "the remote-builder tests need root (network namespaces, sshd)"
    );
    for (tool, probe) in [
        ("ip (iproute2)", vec!["ip", "-V"]),
        ("ssh-keygen (openssh-client)", vec!["ssh-keygen", "-?"]),
        ("ssh (openssh-client)", vec!["ssh", "-V"]),
        ("nix-build (nix-bin)", vec!["nix-build", "--version"]),
    ] {
        assert!(
            Command::new(probe[0])
                .args(&probe[1..])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok(),
            "{tool} is not installed: run scripts/setup"
        );
    }
    assert!(
        Path::new(SSHD).is_file(),
        "{SSHD} is not installed (openssh-server): run scripts/setup"
    );
    assert!(
        Path::new("/dev/kvm").exists(),
        "no /dev/kvm on this machine"
    );
    assert!(
        Path::new("/bin/busybox").exists(),
        "no /bin/busybox (busybox-static): run scripts/setup"
    );
}

/// One remote "host": a namespace, its address, its files.
struct Remote {
    ns: String,
    veth: String,
    addr: String,
    dir: PathBuf,
    host_key_b64: String,
}

/// The test's builders; everything they made is removed on drop.
struct Fleet {
    dir: PathBuf,
    remotes: Vec<Remote>,
    sshds: Vec<Child>,
    made_run_sshd: bool,
}

impl Fleet {
    /// `n` namespaces on a free private /24 of 10.0.0.0/8, each on its own /30.
    fn create(dir: &Path, n: usize) -> Fleet {
        let routes = ip(&["-4", "route", "show", "table", "all"]);
        let addrs = ip(&["-4", "addr", "show"]);
        let pid = std::process::id();
        let (a, b) = (0..64u32)
            .map(|k| (200 + (pid + k) % 50, (pid / 50 + k * 7) % 250))
            .find(|(a, b)| {
                let net = format!("10.{a}.{b}.");
                !routes.contains(&net) && !addrs.contains(&net)
            })
            .expect("no free 10.x.y.0/24 for the test's namespaces");
        let mut fleet = Fleet {
            dir: dir.to_path_buf(),
            remotes: Vec::new(),
            sshds: Vec::new(),
            made_run_sshd: false,
        };
        if !Path::new("/run/sshd").exists() {
            // sshd's privilege-separation directory (Debian makes it only when the service starts).
            std::fs::create_dir_all("/run/sshd").unwrap();
            fleet.made_run_sshd = true;
        }
        for i in 0..n {
            let ns = format!("drydock-t{pid}-{i}");
            let veth = format!("ddv{}x{i}", pid % 100_000);
            let peer = format!("ddp{}x{i}", pid % 100_000);
            let host_addr = format!("10.{a}.{b}.{}", 4 * i + 1);
            let addr = format!("10.{a}.{b}.{}", 4 * i + 2);
            let rdir = dir.join(format!("h{}", i + 1));
            std::fs::create_dir_all(rdir.join("etc")).unwrap();
            // Registered before it exists, so a failure halfway is still cleaned up.
            fleet.remotes.push(Remote {
                ns: ns.clone(),
                veth: veth.clone(),
                addr: addr.clone(),
                dir: rdir.clone(),
                host_key_b64: String::new(),
            });
            ip(&["netns", "add", &ns]);
            ip(&["link", "add", &veth, "type", "veth", "peer", "name", &peer]);
            ip(&["link", "set", &peer, "netns", &ns]);
            ip(&["addr", "add", &format!("{host_addr}/30"), "dev", &veth]);
            ip(&["link", "set", &veth, "up"]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/30"),
                "dev",
                &peer,
            ]);
            ip(&["-n", &ns, "link", "set", &peer, "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            let key = rdir.join("ssh_host_ed25519_key");
            keygen(&key);
            let pubkey = std::fs::read(key.with_extension("pub")).unwrap();
            fleet.remotes[i].host_key_b64 = base64(&pubkey);
        }
        keygen(&dir.join("id"));
        std::fs::copy(dir.join("id.pub"), dir.join("authorized_keys")).unwrap();
        fleet
    }

    /// Start sshd in remote `i`'s namespace with its own configuration; `nix_conf` is that
    /// host's nix.conf.
    fn start_sshd(&mut self, i: usize, nix_conf: &str, extra_config: &str) {
        let r = &self.remotes[i];
        std::fs::write(r.dir.join("etc/nix.conf"), nix_conf).unwrap();
        let conf = r.dir.join("sshd_config");
        std::fs::write(
            &conf,
            format!(
                "ListenAddress {addr}\nHostKey {dir}/ssh_host_ed25519_key\nPidFile none\n\
                 AuthorizedKeysFile {top}/authorized_keys\nPermitRootLogin prohibit-password\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n\
                 StrictModes no\nSetEnv NIX_CONF_DIR={dir}/etc\nLogLevel VERBOSE\n{extra_config}",
                addr = r.addr,
                dir = r.dir.display(),
                top = self.dir.display()
            ),
        )
        .unwrap();
        let log = r.dir.join("sshd.log");
        let child = Command::new("ip")
            .args(["netns", "exec", &r.ns, SSHD, "-D", "-f"])
            .arg(&conf)
            .arg("-E")
            .arg(&log)
            .stdin(Stdio::null())
            .spawn()
            .expect("start sshd");
        self.sshds.push(child);
        // Ready when it logs that it listens (or fail with its log).
        let start = Instant::now();
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("Server listening") {
                break;
            }
            let exited = self.sshds.last_mut().unwrap().try_wait().unwrap();
            assert!(
                exited.is_none() && start.elapsed() < Duration::from_secs(20),
                "sshd in {} did not start: {exited:?}\n{text}",
                r.ns
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A machine line for remote `i` (`scheme`, features), with the test's key and its host key.
    fn line(&self, i: usize, scheme: &str, features: &str) -> String {
        let r = &self.remotes[i];
        format!(
            "{scheme}://root@{}?remote-store={}/store x86_64-linux {}/id 1 1 {features} - {}",
            r.addr,
            r.dir.display(),
            self.dir.display(),
            r.host_key_b64
        )
    }

    /// An address routed into remote `i`'s namespace that nobody there has: packets to it are
    /// dropped there (no forwarding), so connecting to it times out. The route goes with the veth.
    fn blackhole(&self, i: usize) -> String {
        let r = &self.remotes[i];
        let (net, _) = r.addr.rsplit_once('.').unwrap();
        let addr = format!("{net}.{}", 4 * self.remotes.len() + 2);
        ip(&["route", "add", &format!("{addr}/32"), "dev", &r.veth]);
        addr
    }

    /// Remove everything; safe to call twice.
    fn teardown(&mut self) {
        for mut c in self.sshds.drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
        for r in self.remotes.drain(..) {
            let _ = Command::new("ip").args(["netns", "del", &r.ns]).status();
            // Deleting the namespace destroys the peer, and with it the pair; in case not:
            let _ = Command::new("ip")
                .args(["link", "del", &r.veth])
                .stderr(Stdio::null())
                .status();
        }
        if self.made_run_sshd {
            let _ = std::fs::remove_dir("/run/sshd");
            self.made_run_sshd = false;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.teardown();
    }
}

fn keygen(path: &Path) {
    run(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "drydock-test", "-f"])
        .arg(path));
}

fn base64(bytes: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for c in bytes.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for k in 0..4 {
            if k <= c.len() {
                s.push(A[(n >> (18 - 6 * k) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

fn find<'a>(doc: &'a Value, id: &str) -> &'a Value {
    doc["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .find(|c| c["id"] == id)
        .unwrap_or_else(|| panic!("no finding {id} in {doc:#}"))
}

fn text(v: &Value, field: &str) -> String {
    v[field].as_str().unwrap_or("").to_string()
}

/// doctor with a private Nix configuration directory and a private chroot store.
fn doctor(conf_dir: &Path, store: &Path, args: &[&str], nix_config: Option<&str>) -> Ran {
    doctor_with(conf_dir, store, args, nix_config, None)
}

/// [`doctor`] with `NIX_SSHOPTS`.
fn doctor_with(
    conf_dir: &Path,
    store: &Path,
    args: &[&str],
    nix_config: Option<&str>,
    ssh_opts: Option<&str>,
) -> Ran {
    let state = conf_dir.join("state");
    let mut cmd = Drydock::on(store, &state)
        .arg("doctor")
        .args(args)
        .env("NIX_CONF_DIR", conf_dir)
        .env("HOME", conf_dir)
        .env_remove("NIX_CONFIG")
        .env_remove("NIX_SSHOPTS")
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("NIX_USER_CONF_FILES");
    if let Some(c) = nix_config {
        cmd = cmd.env("NIX_CONFIG", c);
    }
    if let Some(o) = ssh_opts {
        cmd = cmd.env("NIX_SSHOPTS", o);
    }
    cmd.run()
}

#[test]
fn three_builders_each_get_their_state_and_fix() {
    // The fleet (namespaces, sshd, a Nix build on each remote) is what costs, and one doctor
    // run reports on every builder at once, so this stays one test; its checks of each
    // finding are soft (common::Checks): one wrong finding does not hide the others, and the
    // test fails at the end listing them all. The fleet, the doctor runs and their JSON are
    // what the checks read: those stay hard.
    require_tools();
    let mut checks = Checks::new();
    let dir = common::scratch("builders");
    let mut fleet = Fleet::create(&dir.join("fleet"), 3);
    // h1: builds as root (a user namespace maps it to uid 1000; the device's owner is root).
    fleet.start_sshd(
        0,
        "build-users-group =\nsystem-features = kvm nixos-test\nsandbox-paths = /bin/sh=/bin/busybox\nsubstituters =\n",
        "",
    );
    // h2: the usual multi-user Nix: nixbld build users, /dev/kvm root-only.
    fleet.start_sshd(
        1,
        "build-users-group = nixbld\nsystem-features = kvm nixos-test\nsandbox-paths = /bin/sh=/bin/busybox\nsubstituters =\n",
        "",
    );
    // h3: no sshd at all.
    let local = dir.join("local");
    std::fs::create_dir_all(&local).unwrap();
    std::fs::write(local.join("nix.conf"), "substituters =\n").unwrap();
    // Nix's default: builders = @$NIX_CONF_DIR/machines.
    std::fs::write(
        local.join("machines"),
        format!(
            "# the test's fleet\n{}\n{}\n{}\n",
            fleet.line(0, "ssh-ng", "kvm,nixos-test"),
            fleet.line(1, "ssh", "kvm,nixos-test,big-parallel"),
            fleet.line(2, "ssh-ng", "kvm,nixos-test"),
        ),
    )
    .unwrap();
    let store = dir.join("store");
    std::fs::create_dir_all(&store).unwrap();
    let out = doctor(
        &local,
        &store,
        &["--json", "--nix-probe", "--builders"],
        None,
    );
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    checks.check("doctor exits 1 (a builder fails)", || {
        assert_eq!(out.status.code(), Some(1), "{doc:#}");
    });
    let [h1, h2, h3] = [0, 1, 2].map(|i| fleet.remotes[i].addr.clone());

    // The verdict: VM tests work on one builder only, and Nix may send one to any of them.
    checks.check("the verdict: partly, on builder 1 only", || {
        let nix = &doc["verdict"]["nix"];
        assert_eq!(nix["answer"], "partly", "{nix}");
        assert_eq!(nix["on"], "remote", "{nix}");
        assert_eq!(nix["probed"], true, "{nix}");
        let answers: Vec<(String, String)> = nix["builders"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| (text(b, "id"), text(b, "answer")))
            .collect();
        assert_eq!(
            answers,
            [
                (format!("builder.{h1}"), "yes".to_string()),
                (format!("builder.{h2}"), "no".to_string()),
                (format!("builder.{h3}"), "no".to_string()),
            ],
            "{nix}"
        );
        assert!(
            text(nix, "text").starts_with(&format!("only on builder.{h1}, ")),
            "{nix}"
        );
        assert_eq!(doc["verdict"]["failed"], true);
    });

    checks.check("nix.builders lists the fleet and who Nix skips", || {
        let list = find(&doc, "nix.builders");
        assert_eq!(list["status"], "pass", "{list}");
        assert!(
            text(list, "summary").contains(&format!("builder.{h1}"))
                && text(list, "detail").contains(&format!("{}/machines line 2", local.display())),
            "{list}"
        );
        assert!(text(list, "detail").contains("3 builder(s)"), "{list}");
        // Nix skips a builder it cannot connect to ("cannot build on ..."), and so says doctor.
        assert!(
            text(list, "detail").contains(&format!(
                "skipped by Nix (`cannot build on ...`): builder.{h3}"
            )),
            "{list}"
        );
    });

    checks.check("h1 is reachable over ssh-ng", || {
        let b1 = find(&doc, &format!("builder.{h1}"));
        assert_eq!(b1["status"], "pass", "{b1}");
        assert!(
            text(b1, "summary").starts_with("reachable over ssh-ng (nix-daemon --stdio, Nix 2."),
            "{b1}"
        );
        assert!(
            text(b1, "summary").contains("features kvm,nixos-test, max jobs 1"),
            "{b1}"
        );
    });
    checks.check("h2 is reachable over ssh", || {
        let b2 = find(&doc, &format!("builder.{h2}"));
        assert_eq!(b2["status"], "pass", "{b2}");
        assert!(
            text(b2, "summary").starts_with("reachable over ssh (nix-store --serve --write)"),
            "{b2}"
        );
    });
    checks.check("h3 is unreachable (refused), with its fix", || {
        let b3 = find(&doc, &format!("builder.{h3}"));
        assert_eq!(b3["status"], "fail", "{b3}");
        assert!(
            text(b3, "summary").starts_with("unreachable (refused)"),
            "{b3}"
        );
        assert!(text(b3, "detail").contains("Connection refused"), "{b3}");
        assert!(
            text(b3, "fix").contains(&format!("start sshd on {h3}")),
            "{b3}"
        );
    });

    checks.check("h1's probe opened /dev/kvm, building as root", || {
        let p1 = find(&doc, &format!("builder.{h1}.probe"));
        assert_eq!(p1["status"], "pass", "{p1}");
        assert!(text(p1, "summary").contains("opened /dev/kvm"), "{p1}");
        // Builds as root: uid 1000 in the sandbox's user namespace is root outside it.
        assert!(
            text(p1, "detail").contains("uid 1000") && text(p1, "detail").contains("uid 0 outside"),
            "{p1}"
        );
    });
    checks.check(
        "h2's build users cannot open /dev/kvm, with the fix",
        || {
            let p2 = find(&doc, &format!("builder.{h2}.probe"));
            assert_eq!(p2["status"], "fail", "{p2}");
            // A nixbld user (uid 30001.. here), refused with EACCES by the root-only device.
            assert!(
                text(p2, "detail").contains("opening it failed: EACCES (Permission denied)")
                    && text(p2, "detail").contains("uid 300"),
                "{p2}"
            );
            assert!(
                text(p2, "summary")
                    .contains("advertises kvm, but its build users cannot open /dev/kvm"),
                "{p2}"
            );
            assert!(
                text(p2, "fix").contains("setfacl -m g:nixbld:rw /dev/kvm")
                    && text(p2, "fix").contains("remove kvm from field 6"),
                "{p2}"
            );
        },
    );
    checks.check("h3's probe points at h3's finding", || {
        let p3 = find(&doc, &format!("builder.{h3}.probe"));
        assert_eq!(p3["status"], "fail", "{p3}");
        assert!(text(p3, "summary").contains("unreachable"), "{p3}");
        assert_eq!(text(p3, "fix"), format!("see builder.{h3}"));
    });
    checks.check(
        "the probes ran on the remotes, one each, and not here",
        || {
            // The builds really ran on the remotes, into their own stores, one each: the local
            // nix.probe stays on this machine (Nix would otherwise send it to a builder too).
            for (i, want) in [(0, 1), (1, 1), (2, 0)] {
                let store = fleet.remotes[i].dir.join("store/nix/store");
                let probes = std::fs::read_dir(&store)
                    .map(|d| {
                        d.filter_map(Result::ok)
                            .filter(|e| {
                                e.file_name()
                                    .to_string_lossy()
                                    .ends_with("-drydock-kvm-probe")
                            })
                            .count()
                    })
                    .unwrap_or(0);
                assert_eq!(probes, want, "probe outputs in {}", store.display());
            }
            let mode = std::os::unix::fs::PermissionsExt::mode(
                &std::fs::metadata("/dev/kvm").unwrap().permissions(),
            );
            if mode & 0o006 != 0o006 {
                // Built here by the nixbld users, who cannot open the root-only device.
                let local_probe = find(&doc, "nix.probe");
                assert_eq!(local_probe["status"], "fail", "{local_probe}");
            }
        },
    );

    // The human form names each builder's state and fix.
    let human = doctor(&local, &store, &["--nix-probe", "--builders"], None);
    let human = String::from_utf8_lossy(&human.stdout).into_owned();
    eprintln!("{human}");
    checks.check("the human form names each builder's state and fix", || {
        for want in [
            format!("✔ builder.{h1} "),
            format!("✔ builder.{h1}.probe "),
            format!("✘ builder.{h2}.probe "),
            format!("✘ builder.{h3} "),
            format!("✘ builder.{h2}.probe: on {h2}: a udev rule"),
            format!("✘ builder.{h3}: start sshd on {h3}"),
        ] {
            assert!(human.contains(&want), "no {want:?} in:\n{human}");
        }
    });

    // Through NIX_CONFIG, `;`-separated: a wrong host key and a key the builder does not know.
    let stranger = fleet.dir.join("stranger");
    keygen(&stranger);
    let wrong_host_key = fleet.line(0, "ssh-ng", "kvm").replace(
        &fleet.remotes[0].host_key_b64,
        &fleet.remotes[1].host_key_b64,
    );
    let wrong_key = fleet.line(0, "ssh", "kvm").replace(
        &format!("{}/id ", fleet.dir.display()),
        &format!("{} ", stranger.display()),
    );
    let missing_key = fleet
        .line(1, "ssh-ng", "kvm")
        .replace(&format!("{}/id ", fleet.dir.display()), "/nonexistent/id ");
    // h3 now gets an sshd whose sessions find no Nix (their commands run with a PATH without it).
    fleet.start_sshd(
        2,
        "",
        "ForceCommand PATH=/nonexistent; eval \"$SSH_ORIGINAL_COMMAND\"\n",
    );
    let no_nix = fleet.line(2, "ssh-ng", "kvm");
    let black = fleet.blackhole(2);
    let timeout = fleet
        .line(2, "ssh", "kvm")
        .replace(&fleet.remotes[2].addr, &black);
    let started = Instant::now();
    let out = doctor_with(
        &local,
        &store,
        &["--json"],
        Some(&format!(
            "builders = {wrong_host_key} ; {wrong_key} ; {missing_key} ; {no_nix} ; {timeout}"
        )),
        // The user's NIX_SSHOPTS come first, so their ConnectTimeout wins over doctor's.
        Some("-oConnectTimeout=2"),
    );
    // Five builders, checked at once: about the timeout's 2 s, not five times anything.
    let took = started.elapsed();
    checks.check("five builders are checked at once", || {
        assert!(took < Duration::from_secs(25), "{took:?}");
    });
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!(
        "{}",
        doc["checks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["id"].as_str().unwrap().starts_with("builder."))
            .map(|c| format!(
                "{} {}: {}\n  fix: {}",
                c["status"], c["id"], c["summary"], c["fix"]
            ))
            .collect::<Vec<_>>()
            .join("\n")
    );
    checks.check("NIX_CONFIG's builders: none for a VM test", || {
        let list = find(&doc, "nix.builders");
        assert!(text(list, "detail").contains("(NIX_CONFIG)"), "{list}");
        // None advertises nixos-test: a VM test does not go to any of them.
        assert_ne!(list["status"], "pass", "{list}");
        assert!(
            text(list, "detail").contains("does not advertise nixos-test"),
            "{list}"
        );
    });
    checks.check("a wrong host key is named, with its fix", || {
        let hk = find(&doc, &format!("builder.{h1}"));
        assert!(
            text(hk, "summary").starts_with("unreachable (host key)"),
            "{hk}"
        );
        assert!(
            text(hk, "fix").contains("base64 -w0 /etc/ssh/ssh_host_ed25519_key.pub"),
            "{hk}"
        );
    });
    checks.check(
        "a key the builder does not know is named, with its fix",
        || {
            let auth = find(&doc, &format!("builder.{h1}-2"));
            assert!(
                text(auth, "summary").starts_with("unreachable (authentication)"),
                "{auth}"
            );
            assert!(
                text(auth, "fix").contains(&format!(
                    "ssh-copy-id -i {}.pub root@{h1}",
                    stranger.display()
                )),
                "{auth}"
            );
        },
    );
    checks.check("a missing key file is named, with its fix", || {
        let missing = find(&doc, &format!("builder.{h2}"));
        assert!(
            text(missing, "summary").starts_with("unreachable (authentication)"),
            "{missing}"
        );
        assert!(
            text(missing, "fix").contains("/nonexistent/id (field 3"),
            "{missing}"
        );
    });
    checks.check("a remote without Nix is named, with its fix", || {
        let nonix = find(&doc, &format!("builder.{h3}"));
        assert!(
            text(nonix, "summary").starts_with("unreachable (no Nix on the remote)"),
            "{nonix}"
        );
        assert!(text(nonix, "fix").contains("remote-program="), "{nonix}");
    });
    checks.check("a builder that does not answer times out", || {
        let slow = find(&doc, &format!("builder.{black}"));
        assert!(
            text(slow, "summary").starts_with("unreachable (timeout)"),
            "{slow}"
        );
        assert!(
            text(slow, "detail").contains("-oConnectTimeout=2 -oBatchMode=yes"),
            "{slow}"
        );
    });

    // Everything the test made is gone.
    let names: Vec<String> = fleet.remotes.iter().map(|r| r.ns.clone()).collect();
    let pids: Vec<u32> = fleet.sshds.iter().map(Child::id).collect();
    fleet.teardown();
    checks.check("everything the test made is gone", || {
        let netns = ip(&["netns", "list"]);
        for n in &names {
            assert!(!netns.contains(n.as_str()), "namespace {n} left behind");
        }
        for p in pids {
            assert!(
                !Path::new(&format!("/proc/{p}")).exists(),
                "sshd {p} left running"
            );
        }
        assert!(!fleet.dir.exists());
    });
}

#[test]
fn a_malformed_machine_line_is_a_failing_finding_naming_file_and_line() {
    let dir = common::scratch("builders-bad");
    std::fs::write(
        dir.join("nix.conf"),
        format!("builders = @{}/fleet\n", dir.display()),
    )
    .unwrap();
    std::fs::write(
        dir.join("fleet"),
        "# fleet\nssh://a.invalid x86_64-linux - 2\nssh://b.invalid x86_64-linux - many\n",
    )
    .unwrap();
    std::fs::create_dir_all(dir.join("store")).unwrap();
    let out = doctor(&dir, &dir.join("store"), &["--json"], None);
    // A failing finding the user did not probe for: the verdict says no, the exit code stays 0.
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    let list = find(&doc, "nix.builders");
    assert_eq!(list["status"], "fail", "{list}");
    let nix = &doc["verdict"]["nix"];
    assert_eq!(nix["answer"], "no", "{nix}");
    assert_eq!(nix["because"][0], "nix.builders", "{nix}");
    assert!(
        nix["text"]
            .as_str()
            .unwrap()
            .starts_with("no: Nix rejects the builders list"),
        "{nix}"
    );
    let where_ = format!("{}/fleet line 3", dir.display());
    assert!(text(list, "summary").contains(&where_), "{list}");
    assert!(
        text(list, "summary").contains("max jobs (field 4) `many`"),
        "{list}"
    );
    assert!(text(list, "fix").contains(&where_), "{list}");
    // Nix rejects the whole list, so no builder is contacted (no lookup of a.invalid either).
    let ids: Vec<&str> = doc["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["id"].as_str())
        .filter(|id| id.starts_with("builder."))
        .collect();
    assert!(ids.is_empty(), "{ids:?}");
}
