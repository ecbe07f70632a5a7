//! The cluster's networks, seen and broken on purpose (`drydock net`): the faults in force, kept
//! by the owner per machine name ([`NetFaults`]: blocks, a partition, shapes) and turned into
//! each hub's port-level [`HubFaults`] whenever they or the machines change, so that they
//! survive a hot reload and a machine's restart (its NIC sockets keep their paths) and end with
//! the owner (`down`); the findings from what the hubs recorded (`netview`); and live captures
//! (a hub's pcap tap on the requester's connection).
//!
//! Requests travel on the control socket as [`ControlOp::Net`] with a [`NetRequest`]; the
//! owner answers with a [`NetReport`] (faults, findings, the hubs' counters). The values the
//! command line takes (`100ms`, `5%`, `10mbit`) are parsed here, pure and table-tested.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use drydock_gc::Cancel;
use drydock_vm::VmPaths;

use crate::compose::ClusterPlan;
use crate::control::{ControlError, ControlOp, ControlRequest, control_socket};
use crate::hub::HubFaults;
use crate::netview::{Flood, NetFindings, NetMachine, Seen};
use crate::run::RunningCluster;
use crate::shaper::Shape;
use crate::state::{cluster_paths, nic_socket};

/// How a machine's outgoing frames are shaped, as given and shown.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ShapeSpec {
    pub delay_ms: u64,
    pub jitter_ms: u64,
    /// Percent, 0 to 100.
    pub loss_pct: f64,
    /// Bytes per second; `None`: unlimited.
    pub rate_bytes: Option<u64>,
}

impl ShapeSpec {
    fn shape(&self) -> Shape {
        Shape {
            delay: Duration::from_millis(self.delay_ms),
            jitter: Duration::from_millis(self.jitter_ms),
            loss: (self.loss_pct / 100.0).clamp(0.0, 1.0),
            rate: self.rate_bytes,
        }
    }
}

/// The faults in force on a cluster's networks, by machine name and VLAN.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NetFaults {
    /// `(machine, vlan)` links pulled: its frames and those for it dropped.
    pub blocked: BTreeSet<(String, u8)>,
    /// A partition: frames cross only within a group (machines in none keep their links).
    pub partition: Vec<BTreeSet<String>>,
    /// Frames leaving `(machine, vlan)` shaped.
    pub shaped: BTreeMap<String, ShapeSpec>,
}

/// The key of a shaped link in [`NetFaults::shaped`] (`MACHINE@VLAN`; JSON keys are strings).
fn link(machine: &str, vlan: u8) -> String {
    format!("{machine}@{vlan}")
}

impl NetFaults {
    pub fn is_empty(&self) -> bool {
        self.blocked.is_empty() && self.partition.is_empty() && self.shaped.is_empty()
    }

    /// The port-level faults of the hub of `vlan` (pure): each machine's NIC socket on it.
    pub(crate) fn for_hub(&self, plan: &ClusterPlan, state_dir: &Path, vlan: u8) -> HubFaults {
        let port = |machine: &str| -> Option<PathBuf> {
            let m = plan.machine(machine)?;
            m.nics
                .iter()
                .any(|n| n.vlan == vlan)
                .then(|| nic_socket(&VmPaths::in_state_dir(state_dir, &m.vm_name), vlan))
        };
        HubFaults {
            blocked: self
                .blocked
                .iter()
                .filter(|(_, v)| *v == vlan)
                .filter_map(|(m, _)| port(m))
                .collect(),
            groups: self
                .partition
                .iter()
                .map(|g| g.iter().filter_map(|m| port(m)).collect::<BTreeSet<_>>())
                .filter(|g| !g.is_empty())
                .collect(),
            shaped: self
                .shaped
                .iter()
                .filter_map(|(k, s)| {
                    let (m, v) = k.rsplit_once('@')?;
                    (v.parse::<u8>().ok()? == vlan)
                        .then(|| port(m))
                        .flatten()
                        .map(|p| (p, s.shape()))
                })
                .collect(),
        }
    }
}

/// What `drydock net` asks the owner.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "do", rename_all = "snake_case")]
pub enum NetRequest {
    /// The faults, the findings (of frames since `since_ms`, epoch ms), the hubs' counters.
    Show {
        since_ms: Option<u64>,
    },
    Block {
        machine: String,
        vlan: Option<u8>,
    },
    Unblock {
        machine: String,
        vlan: Option<u8>,
    },
    Partition {
        groups: Vec<Vec<String>>,
    },
    Shape {
        machines: Vec<String>,
        vlan: Option<u8>,
        shape: ShapeSpec,
    },
    /// Every fault undone.
    Heal,
    /// A live pcap of VLAN `vlan` (frames from and to `machines`, all if empty) on this
    /// connection, after the reply line.
    Capture {
        machines: Vec<String>,
        vlan: Option<u8>,
    },
}

/// A hub's counters, as `net` shows them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HubStats {
    pub vlan: u8,
    pub frames: u64,
    pub delivered: u64,
    pub dropped: u64,
    /// Copies that found their port full and waited for room (see the hub's egress queues).
    pub queued: u64,
    pub blocked: u64,
    pub partitioned: u64,
    pub lost: u64,
    pub shaped_dropped: u64,
    pub delayed: u64,
    pub tap_dropped: u64,
    /// Broadcast and multicast frames over a machine's allowance (storm control), dropped.
    pub storm_dropped: u64,
}

/// The owner's answer to a [`NetRequest`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NetReport {
    pub cluster: String,
    pub faults: NetFaults,
    pub findings: NetFindings,
    pub hubs: Vec<HubStats>,
}

/// Why a network request cannot be carried out.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("the cluster {cluster} has no machine {machine} (it has {})", has.join(", "))]
    NoMachine {
        cluster: String,
        machine: String,
        has: Vec<String>,
    },
    #[error("machine {machine} is not on VLAN {vlan} (it is on {})", on.iter().map(u8::to_string).collect::<Vec<_>>().join(", "))]
    NotOnVlan {
        machine: String,
        vlan: u8,
        on: Vec<u8>,
    },
    #[error("the cluster {cluster} has no VLAN {vlan} (it has {})", has.iter().map(u8::to_string).collect::<Vec<_>>().join(", "))]
    NoVlan {
        cluster: String,
        vlan: u8,
        has: Vec<u8>,
    },
    #[error("partition: machine {0} is in two groups")]
    TwoGroups(String),
    #[error("partition: give at least two groups of machines (A,B C,D)")]
    OneGroup,
    #[error("{what} {given:?}: {why}")]
    BadValue {
        what: &'static str,
        given: String,
        why: &'static str,
    },
    #[error("cannot start the capture")]
    Capture(#[source] std::io::Error),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("cannot read the owner's answer")]
    Io(#[source] std::io::Error),
}

impl NetError {
    pub fn is_bad_input(&self) -> bool {
        match self {
            Self::Control(e) => e.is_bad_input(),
            Self::Capture(_) | Self::Io(_) => false,
            _ => true,
        }
    }
}

/// A duration as `net shape` takes it: `100ms`, `1.5s`, `0` (pure).
pub fn parse_millis(what: &'static str, s: &str) -> Result<u64, NetError> {
    let bad = |why| NetError::BadValue {
        what,
        given: s.to_string(),
        why,
    };
    let t = s.trim();
    let (num, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1000.0)
    } else if t == "0" {
        (t, 1.0)
    } else {
        return Err(bad("give a unit: 100ms or 1.5s"));
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| bad("not a number of ms or s"))?;
    if !(0.0..=600_000.0).contains(&(v * scale)) || !v.is_finite() {
        return Err(bad("between 0 and 600s"));
    }
    Ok((v * scale).round() as u64)
}

/// A loss as `net shape --loss` takes it: `5%`, `0.5%`, `100%` (pure).
pub fn parse_percent(s: &str) -> Result<f64, NetError> {
    let bad = |why| NetError::BadValue {
        what: "--loss",
        given: s.to_string(),
        why,
    };
    let n = s
        .trim()
        .strip_suffix('%')
        .ok_or_else(|| bad("give a percentage: 5%"))?;
    let v: f64 = n.trim().parse().map_err(|_| bad("not a percentage"))?;
    if !(0.0..=100.0).contains(&v) {
        return Err(bad("between 0% and 100%"));
    }
    Ok(v)
}

/// A rate as `net shape --rate` takes it, in bytes per second: `10mbit`, `512kbit`, `1gbit`,
/// `100kbps`/`1mbps` (bytes), as `tc` writes them (pure).
pub fn parse_rate(s: &str) -> Result<u64, NetError> {
    let bad = |why| NetError::BadValue {
        what: "--rate",
        given: s.to_string(),
        why,
    };
    let t = s.trim().to_ascii_lowercase();
    let units: [(&str, f64); 8] = [
        ("gbit", 1e9 / 8.0),
        ("mbit", 1e6 / 8.0),
        ("kbit", 1e3 / 8.0),
        ("bit", 1.0 / 8.0),
        ("gbps", 1e9),
        ("mbps", 1e6),
        ("kbps", 1e3),
        ("bps", 1.0),
    ];
    let (num, scale) = units
        .iter()
        .find_map(|(u, f)| t.strip_suffix(u).map(|n| (n, *f)))
        .ok_or_else(|| bad("give a unit: 10mbit, 512kbit, 1mbps"))?;
    let v: f64 = num.trim().parse().map_err(|_| bad("not a number"))?;
    let bytes = v * scale;
    if !bytes.is_finite() || bytes < 1000.0 / 8.0 {
        return Err(bad("at least 1kbit"));
    }
    Ok(bytes.round() as u64)
}

/// `A,B C,D,E` as groups of machine names (pure).
pub fn parse_groups(words: &[String]) -> Vec<Vec<String>> {
    words
        .iter()
        .map(|w| {
            w.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        })
        .collect()
}

/// The environment variable that turns the hubs' recording off (`off`): for the benchmark that
/// measures what recording costs.
pub const RECORD_ENV: &str = "DRYDOCK_NET_RECORD";

/// A cluster's hub of `vlan`, recording its frames unless [`RECORD_ENV`] is `off`.
pub(crate) fn start_hub(
    vlan: u8,
    socket: &Path,
    ports: Vec<PathBuf>,
) -> Result<crate::hub::Hub, crate::hub::HubError> {
    let hub = crate::hub::Hub::start(vlan, socket, ports)?;
    if std::env::var_os(RECORD_ENV).is_some_and(|v| v == "off") {
        hub.set_recording(false);
    }
    Ok(hub)
}

impl NetRequest {
    /// `net [--since D]`: the report of the frames of the last `since` (all recorded if none).
    pub fn show(since: Option<Duration>) -> Self {
        Self::Show {
            since_ms: since.map(|d| epoch_ms().saturating_sub(d.as_millis() as u64)),
        }
    }
}

fn epoch_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl RunningCluster {
    fn machine_vlans(&self, machine: &str) -> Result<Vec<u8>, NetError> {
        self.plan
            .machine(machine)
            .map(|m| m.nics.iter().map(|n| n.vlan).collect())
            .ok_or_else(|| NetError::NoMachine {
                cluster: self.plan.name.clone(),
                machine: machine.to_string(),
                has: self.plan.machine_names(),
            })
    }

    /// The VLANs of `machine` a request means: `vlan`, or all of its.
    fn links(&self, machine: &str, vlan: Option<u8>) -> Result<Vec<u8>, NetError> {
        let on = self.machine_vlans(machine)?;
        match vlan {
            None => Ok(on),
            Some(v) if on.contains(&v) => Ok(vec![v]),
            Some(v) => Err(NetError::NotOnVlan {
                machine: machine.to_string(),
                vlan: v,
                on,
            }),
        }
    }

    /// Every hub's faults from the owner's, for the machines as they are now (after a fault
    /// changes, a reload, a machine's start).
    pub(crate) fn apply_faults(&self) {
        for h in &self.hubs {
            h.set_faults(self.faults.for_hub(&self.plan, &self.state_dir, h.vlan()));
        }
    }

    /// Block (or unblock) `machine` on `vlan` (all of its VLANs if `None`).
    pub(crate) fn set_block(
        &mut self,
        machine: &str,
        vlan: Option<u8>,
        blocked: bool,
    ) -> Result<(), NetError> {
        for v in self.links(machine, vlan)? {
            let key = (machine.to_string(), v);
            match blocked {
                true => self.faults.blocked.insert(key),
                false => self.faults.blocked.remove(&key),
            };
        }
        self.apply_faults();
        Ok(())
    }

    /// Carry out a network request (not a capture: see [`RunningCluster::start_capture`]).
    pub(crate) fn serve_net(&mut self, req: &NetRequest) -> Result<NetReport, NetError> {
        match req {
            NetRequest::Show { .. } | NetRequest::Capture { .. } => {}
            NetRequest::Block { machine, vlan } => self.set_block(machine, *vlan, true)?,
            NetRequest::Unblock { machine, vlan } => self.set_block(machine, *vlan, false)?,
            NetRequest::Partition { groups } => {
                if groups.len() < 2 {
                    return Err(NetError::OneGroup);
                }
                let mut seen = BTreeSet::new();
                for m in groups.iter().flatten() {
                    self.machine_vlans(m)?;
                    if !seen.insert(m.clone()) {
                        return Err(NetError::TwoGroups(m.clone()));
                    }
                }
                self.faults.partition =
                    groups.iter().map(|g| g.iter().cloned().collect()).collect();
                self.apply_faults();
            }
            NetRequest::Shape {
                machines,
                vlan,
                shape,
            } => {
                let all: Vec<String>;
                let names = match machines.is_empty() {
                    true => {
                        all = self.plan.machine_names();
                        &all
                    }
                    false => machines,
                };
                let mut links = Vec::new();
                for m in names {
                    for v in self.links(m, *vlan)? {
                        links.push(link(m, v));
                    }
                }
                for l in links {
                    match *shape == ShapeSpec::default() {
                        true => self.faults.shaped.remove(&l),
                        false => self.faults.shaped.insert(l, shape.clone()),
                    };
                }
                self.apply_faults();
            }
            NetRequest::Heal => {
                self.faults = NetFaults::default();
                self.apply_faults();
            }
        }
        let since = match req {
            NetRequest::Show { since_ms } => *since_ms,
            _ => None,
        };
        Ok(self.net_report(since))
    }

    /// The faults, the findings of what the hubs recorded (since `since_ms`), their counters.
    pub(crate) fn net_report(&self, since_ms: Option<u64>) -> NetReport {
        let mut by_port: BTreeMap<PathBuf, String> = BTreeMap::new();
        let machines: Vec<NetMachine> = self
            .plan
            .machines
            .iter()
            .map(|m| {
                let paths = VmPaths::in_state_dir(&self.state_dir, &m.vm_name);
                for n in &m.nics {
                    by_port.insert(nic_socket(&paths, n.vlan), m.machine.clone());
                }
                NetMachine {
                    name: m.machine.clone(),
                    nics: m
                        .nics
                        .iter()
                        .map(|n| (n.vlan, n.mac.clone(), n.address.clone()))
                        .collect(),
                }
            })
            .collect();
        let mut seen = Vec::new();
        let mut hubs = Vec::new();
        let mut floods = Vec::new();
        for h in &self.hubs {
            for (port, storm) in h.storms() {
                floods.push(Flood {
                    vlan: h.vlan(),
                    machine: by_port
                        .get(&port)
                        .cloned()
                        .unwrap_or_else(|| "?".to_string()),
                    dropped: storm.dropped,
                    first_ms: crate::hub::epoch_ms(storm.first),
                    last_ms: crate::hub::epoch_ms(storm.last),
                    limit: crate::hub::STORM_FRAMES_PER_SEC,
                });
            }
            for r in h.recent() {
                seen.push(Seen {
                    at_ms: r.at_ms,
                    vlan: h.vlan(),
                    from: by_port
                        .get(&r.from)
                        .cloned()
                        .unwrap_or_else(|| "?".to_string()),
                    len: r.len,
                    head: r.head,
                });
            }
            let c = h.counters();
            let n = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
            hubs.push(HubStats {
                vlan: h.vlan(),
                frames: n(&c.frames),
                delivered: n(&c.delivered),
                dropped: n(&c.dropped),
                queued: n(&c.queued),
                blocked: n(&c.blocked),
                partitioned: n(&c.partitioned),
                lost: n(&c.lost),
                shaped_dropped: n(&c.shaped_dropped),
                delayed: n(&c.delayed),
                tap_dropped: n(&c.tap_dropped),
                storm_dropped: n(&c.storm_dropped),
            });
        }
        seen.sort_by_key(|s| s.at_ms);
        let mut findings = crate::netview::findings(&seen, &machines, since_ms);
        crate::netview::add_floods(&mut findings, &floods);
        NetReport {
            cluster: self.plan.name.clone(),
            faults: self.faults.clone(),
            findings,
            hubs,
        }
    }

    /// Start a live capture on `stream` (after an OK reply line): one VLAN's hub (`vlan`, or
    /// the first VLAN of the machines named, or the cluster's first), frames from and to
    /// `machines` (all if empty).
    pub(crate) fn start_capture(
        &self,
        stream: UnixStream,
        machines: &[String],
        vlan: Option<u8>,
    ) -> Result<(), NetError> {
        for m in machines {
            self.machine_vlans(m)?;
        }
        let vlan = match vlan {
            Some(v) => v,
            None => machines
                .iter()
                .filter_map(|m| self.plan.machine(m))
                .flat_map(|m| m.nics.iter().map(|n| n.vlan))
                .chain(self.plan.vlans.iter().copied())
                .next()
                .ok_or_else(|| NetError::NoVlan {
                    cluster: self.plan.name.clone(),
                    vlan: 1,
                    has: Vec::new(),
                })?,
        };
        let Some(hub) = self.hubs.iter().find(|h| h.vlan() == vlan) else {
            return Err(NetError::NoVlan {
                cluster: self.plan.name.clone(),
                vlan,
                has: self.plan.vlans.clone(),
            });
        };
        let ports = match machines.is_empty() {
            true => None,
            false => {
                let mut p = BTreeSet::new();
                for m in machines {
                    for v in self.links(m, Some(vlan))? {
                        let mp = self.plan.machine(m).map(|mp| mp.vm_name.clone());
                        if let Some(vm) = mp {
                            p.insert(nic_socket(&VmPaths::in_state_dir(&self.state_dir, &vm), v));
                        }
                    }
                }
                Some(p)
            }
        };
        crate::control::reply(&stream, Ok(Vec::new()));
        hub.add_tap(stream, ports).map_err(NetError::Capture)
    }
}

/// Ask the owner of `cluster` for `req` (not a capture); its report.
pub fn net_request(
    state_dir: &Path,
    cluster: &str,
    req: NetRequest,
) -> Result<NetReport, NetError> {
    let r = ControlRequest {
        op: ControlOp::Net,
        net: Some(Box::new(req)),
        ..ControlRequest::default()
    };
    let reply = crate::control::request_reply(state_dir, cluster, &r, NET_DEADLINE, None)?;
    Ok(reply.net.unwrap_or_default())
}

/// How long a network request may take.
const NET_DEADLINE: Duration = Duration::from_secs(30);

/// What a capture wrote.
#[derive(Debug, Clone, Serialize)]
pub struct CaptureReport {
    pub frames: u64,
    pub bytes: u64,
}

/// What to capture (see [`capture`]).
#[derive(Debug, Clone, Default)]
pub struct CaptureRequest {
    /// Frames from and to these machines (all of the VLAN's if empty).
    pub machines: Vec<String>,
    pub vlan: Option<u8>,
    /// Stop after this many frames.
    pub count: Option<u64>,
    /// Stop after this long.
    pub seconds: Option<Duration>,
}

/// A live capture: pcap to `out` (the global header, then one record per frame) until
/// `cancel`, `count` frames or `seconds`.
pub fn capture(
    state_dir: &Path,
    cluster: &str,
    c: &CaptureRequest,
    out: &mut dyn std::io::Write,
    cancel: &Cancel,
) -> Result<CaptureReport, NetError> {
    let (machines, vlan, count, seconds) = (&c.machines, c.vlan, c.count, c.seconds);
    let cpaths = cluster_paths(state_dir, cluster);
    cpaths
        .check_private()
        .map_err(|e| NetError::Control(ControlError::NotPrivate(e)))?;
    let s = UnixStream::connect(control_socket(&cpaths))
        .map_err(|_| NetError::Control(ControlError::NotUp(cluster.to_string())))?;
    let shut = s.try_clone().map_err(NetError::Io)?;
    let _interrupt = cancel.on_cancel(move || {
        let _ = shut.shutdown(std::net::Shutdown::Both);
    });
    let req = ControlRequest {
        op: ControlOp::Net,
        net: Some(Box::new(NetRequest::Capture {
            machines: machines.to_vec(),
            vlan,
        })),
        ..ControlRequest::default()
    };
    crate::wire::write_json_line(&s, &req).map_err(NetError::Io)?;
    let mut r = BufReader::new(&s);
    let mut line = String::new();
    r.read_line(&mut line).map_err(NetError::Io)?;
    let reply: crate::control::ControlReply =
        serde_json::from_str(&line).map_err(|e| NetError::Io(std::io::Error::other(e)))?;
    if let Some(message) = reply.error {
        return Err(NetError::Control(ControlError::Owner {
            name: cluster.to_string(),
            message,
            bad_input: reply.bad_input,
        }));
    }
    if let Some(d) = seconds {
        let end = s.try_clone().map_err(NetError::Io)?;
        let deadline = drydock_gc::Deadline::after(d);
        std::thread::spawn(move || {
            // The capture's own deadline: a thread that waits for it (never woken earlier)
            // and ends the connection; the process ends soon after in any case.
            std::thread::sleep(deadline.remaining());
            let _ = end.shutdown(std::net::Shutdown::Both);
        });
    }
    // The pcap stream: the global header, then records (16-byte header + bytes).
    let mut header = [0u8; 24];
    if r.read_exact(&mut header).is_err() {
        return Ok(CaptureReport {
            frames: 0,
            bytes: 0,
        });
    }
    out.write_all(&header).map_err(NetError::Io)?;
    let mut report = CaptureReport {
        frames: 0,
        bytes: 24,
    };
    loop {
        if count.is_some_and(|c| report.frames >= c) {
            break;
        }
        let mut rec = [0u8; 16];
        if r.read_exact(&mut rec).is_err() {
            break;
        }
        let incl = u32::from_le_bytes([rec[8], rec[9], rec[10], rec[11]]) as usize;
        if incl > crate::pcap::SNAPLEN as usize {
            return Err(NetError::Io(std::io::Error::other(
                "a malformed capture record",
            )));
        }
        let mut frame = vec![0u8; incl];
        if r.read_exact(&mut frame).is_err() {
            break;
        }
        out.write_all(&rec).map_err(NetError::Io)?;
        out.write_all(&frame).map_err(NetError::Io)?;
        out.flush().map_err(NetError::Io)?;
        report.frames += 1;
        report.bytes += 16 + incl as u64;
    }
    let _ = s.shutdown(std::net::Shutdown::Both);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_parse_as_tc_writes_them() {
        assert_eq!(parse_millis("--delay", "100ms").unwrap(), 100);
        assert_eq!(parse_millis("--delay", "1.5s").unwrap(), 1500);
        assert_eq!(parse_millis("--delay", "0").unwrap(), 0);
        for bad in ["100", "ms", "-1ms", "1h", "700s"] {
            assert!(parse_millis("--delay", bad).is_err(), "{bad}");
        }
        assert_eq!(parse_percent("5%").unwrap(), 5.0);
        assert_eq!(parse_percent("100%").unwrap(), 100.0);
        for bad in ["5", "101%", "-1%", "x%"] {
            assert!(parse_percent(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_rate("10mbit").unwrap(), 1_250_000);
        assert_eq!(parse_rate("512kbit").unwrap(), 64_000);
        assert_eq!(parse_rate("1mbps").unwrap(), 1_000_000);
        assert_eq!(parse_rate("1gbit").unwrap(), 125_000_000);
        for bad in ["10", "10mb", "0kbit", "xmbit"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_groups(&["a,b".into(), "c".into()]),
            vec![vec!["a".to_string(), "b".into()], vec!["c".to_string()]]
        );
    }

    #[test]
    fn faults_become_each_hubs_ports() {
        use crate::compose::{plan_cluster, test_composition};
        let composition = test_composition(&[("a", &[1]), ("b", &[1, 2]), ("c", &[2])]);
        let plan = plan_cluster("c", &composition).unwrap();
        let state = Path::new("/s");
        let port = |m: &str, v: u8| nic_socket(&VmPaths::in_state_dir(state, &format!("c.{m}")), v);
        let mut f = NetFaults::default();
        f.blocked.insert(("b".into(), 2));
        f.partition = vec![
            ["a".to_string()].into(),
            ["b".to_string(), "c".into()].into(),
        ];
        f.shaped.insert(
            link("a", 1),
            ShapeSpec {
                delay_ms: 100,
                ..Default::default()
            },
        );
        let h1 = f.for_hub(&plan, state, 1);
        assert!(h1.blocked.is_empty());
        assert_eq!(
            h1.groups,
            vec![[port("a", 1)].into(), [port("b", 1)].into()],
            "c is not on VLAN 1"
        );
        assert_eq!(h1.shaped.keys().collect::<Vec<_>>(), [&port("a", 1)]);
        assert_eq!(h1.shaped[&port("a", 1)].delay, Duration::from_millis(100));
        let h2 = f.for_hub(&plan, state, 2);
        assert_eq!(h2.blocked, [port("b", 2)].into());
        assert_eq!(h2.groups, vec![[port("b", 2), port("c", 2)].into()]);
        assert!(h2.shaped.is_empty());
    }
}
