//! What a cluster's hubs saw, turned into findings a person can act on (`drydock net`): which
//! machine could not reach which, on which port, and the likely cause and next step.
//!
//! Pure: the input is the frames the hubs received from the machines' ports ([`Seen`], each
//! frame's first bytes) and the cluster's machines with their NICs ([`NetMachine`]); the
//! output is [`NetFindings`], rendered for a terminal by [`render`]. Nothing here trusts a
//! frame: the parser reads Ethernet II (and one 802.1Q tag), ARP, IPv4 (the first fragment
//! only), TCP, UDP and ICMP destination unreachable with bounds checks on every field, and a
//! frame it cannot read is counted and otherwise ignored. No byte of a frame reaches the text:
//! findings hold machine names (the cluster's own, from the hub's ports and the plan),
//! addresses, MACs and numbers, formatted here.
//!
//! What it finds, per VLAN:
//! - TCP: per client machine, server address and port, each connection attempt (a SYN, its
//!   retransmissions included) and what came back: a SYN-ACK (answered), a RST (refused:
//!   nothing listens), an ICMP destination unreachable (refused by a firewall's reject rule),
//!   or nothing (unanswered: a firewall drops them, or the server lacks the address or a
//!   route). Refusals and silences followed by an answered attempt are kept, marked as no
//!   longer a problem.
//! - UDP answered by ICMP destination unreachable (port unreachable: nothing listens).
//! - ARP requests nobody answers: an address no machine has (a wrong address in a
//!   configuration), a machine's address asked on a VLAN where it has none, or a machine that
//!   has the address and does not answer (its interface down or unconfigured).
//! - IPv4 traffic to an address outside every VLAN's subnet (`192.168.V.0/24`), broadcast and
//!   multicast aside.
//! - A source MAC seen from the ports of two machines (duplicate MAC).
//! - A machine that sent no frame on a VLAN it is on (silent).
//! - A machine that sent broadcast or multicast frames faster than the hub's storm control lets
//!   through ([`Flood`], from the hub's counters, not its ring: the frames dropped are not
//!   recorded), added by [`add_floods`].

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// One frame a hub received from a machine's port (its first bytes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seen {
    /// When the hub received it, ms since the epoch.
    pub at_ms: u64,
    pub vlan: u8,
    /// The machine whose port sent it.
    pub from: String,
    /// The frame's whole length.
    pub len: u32,
    /// The first up to 128 bytes of the Ethernet frame.
    pub head: Vec<u8>,
}

/// A machine's NICs: (vlan, mac `52:54:00:12:VV:NN`, ipv4 `192.168.V.N`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetMachine {
    pub name: String,
    pub nics: Vec<(u8, String, String)>,
}

/// What a finding is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FindingKind {
    /// TCP connection attempts answered by a SYN-ACK.
    TcpAnswered,
    /// TCP connection attempts answered by a RST (or an ICMP destination unreachable).
    TcpRefused,
    /// TCP connection attempts that nothing answered.
    TcpUnanswered,
    /// UDP answered by ICMP destination unreachable.
    UdpUnreachable,
    /// ARP requests for an address nobody answers for.
    ArpUnanswered,
    /// IPv4 traffic to an address outside the cluster's networks.
    OutsideAddress,
    /// A source MAC seen from the ports of two machines.
    DuplicateMac,
    /// A machine that sent nothing on a VLAN it is on.
    Silent,
    /// A machine whose broadcast or multicast frames went over the hub's storm control.
    BroadcastFlood,
}

impl FindingKind {
    /// The kind as its JSON name.
    pub fn name(self) -> &'static str {
        match self {
            FindingKind::TcpAnswered => "tcp_answered",
            FindingKind::TcpRefused => "tcp_refused",
            FindingKind::TcpUnanswered => "tcp_unanswered",
            FindingKind::UdpUnreachable => "udp_unreachable",
            FindingKind::ArpUnanswered => "arp_unanswered",
            FindingKind::OutsideAddress => "outside_address",
            FindingKind::DuplicateMac => "duplicate_mac",
            FindingKind::Silent => "silent",
            FindingKind::BroadcastFlood => "broadcast_flood",
        }
    }
}

/// One finding: who, where, how often, and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    pub kind: FindingKind,
    /// Something to act on; false for answered connections and for refusals or silences
    /// that later attempts of the same pair overcame.
    pub problem: bool,
    pub vlan: u8,
    /// The machine that sent (the client, the asker); for `duplicate_mac` the port whose MAC
    /// is not its own; for `silent` the silent machine.
    pub from: Option<String>,
    /// The machine meant (the server, the address's owner, the MAC's owner), if any.
    pub to: Option<String>,
    /// The IPv4 address asked for or sent to (for `silent`, the machine's address there).
    pub address: Option<String>,
    pub port: Option<u16>,
    /// The MAC of a `duplicate_mac`.
    pub mac: Option<String>,
    /// Attempts: TCP connection attempts, UDP datagrams answered unreachable, ARP requests,
    /// frames (outside addresses, the duplicate MAC's frames from the other ports); 0 for
    /// `silent`.
    pub count: u64,
    /// The first and last attempt (ms since the epoch); none for `silent`.
    pub first_ms: Option<u64>,
    pub last_ms: Option<u64>,
    /// The likely cause, one sentence.
    pub cause: String,
    /// What to do next, one sentence.
    pub next: String,
}

/// What the hubs saw, as findings: problems first, then the rest, each most recent first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetFindings {
    pub findings: Vec<Finding>,
    /// Frames looked at (those since `since_ms`).
    pub frames: u64,
    pub since_ms: Option<u64>,
    /// Frames per machine's ports, by name (every machine, 0 included).
    pub by_machine: Vec<(String, u64)>,
}

/// Findings from the frames `seen` (those at or after `since_ms`) on the networks of
/// `machines`.
pub fn findings(seen: &[Seen], machines: &[NetMachine], since_ms: Option<u64>) -> NetFindings {
    let index = Index::new(machines);
    let mut frames: Vec<&Seen> = seen
        .iter()
        .filter(|s| since_ms.is_none_or(|t| s.at_ms >= t))
        .collect();
    frames.sort_by_key(|s| s.at_ms);

    let mut a = Analysis::default();
    let mut by_machine: BTreeMap<String, u64> =
        machines.iter().map(|m| (m.name.clone(), 0)).collect();
    for s in &frames {
        *by_machine.entry(s.from.clone()).or_default() += 1;
        a.spoke.insert((s.vlan, s.from.clone()));
        if let Some(frame) = parse_frame(&s.head) {
            a.frame(s, &frame);
        }
    }
    let mut out = a.conclude(&index, since_ms);
    out.sort_by(order);
    NetFindings {
        findings: out,
        frames: frames.len() as u64,
        since_ms,
        by_machine: by_machine.into_iter().collect(),
    }
}

/// What a hub's storm control dropped from one machine's port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flood {
    pub vlan: u8,
    pub machine: String,
    /// Frames dropped, and when the first and the last of them came (ms since the epoch).
    pub dropped: u64,
    pub first_ms: u64,
    pub last_ms: u64,
    /// The most broadcast and multicast frames a second the hub passes from one machine.
    pub limit: u32,
}

/// Add a `broadcast_flood` finding for each of `floods` that went on at or after the findings'
/// `since_ms`, keeping the findings' order.
pub fn add_floods(f: &mut NetFindings, floods: &[Flood]) {
    for fl in floods {
        if f.since_ms.is_some_and(|t| fl.last_ms < t) {
            continue;
        }
        let m = &fl.machine;
        f.findings.push(Finding {
            kind: FindingKind::BroadcastFlood,
            problem: true,
            vlan: fl.vlan,
            from: Some(m.clone()),
            to: None,
            address: None,
            port: None,
            mac: None,
            count: fl.dropped,
            first_ms: Some(fl.first_ms),
            last_ms: Some(fl.last_ms),
            cause: format!(
                "{m} sends broadcast or multicast frames faster than the hub passes them ({} a second from one machine): a program flooding the segment, or a loop; the hub dropped the rest, so the others' traffic goes on.",
                fl.limit
            ),
            next: format!(
                "See what {m} sends (`drydock net capture {m} --vlan {} --count 100 -w flood.pcap`, then `tcpdump -r flood.pcap`) and stop the program that sends it.",
                fl.vlan
            ),
        });
    }
    f.findings.sort_by(order);
}

/// Problems first, then most recent first (a standing condition, with no time, first), then
/// by kind and names so that equal times keep one order.
fn order(a: &Finding, b: &Finding) -> std::cmp::Ordering {
    let recent = |f: &Finding| std::cmp::Reverse(f.last_ms.unwrap_or(u64::MAX));
    b.problem
        .cmp(&a.problem)
        .then(recent(a).cmp(&recent(b)))
        .then(a.kind.cmp(&b.kind))
        .then(a.vlan.cmp(&b.vlan))
        .then(a.from.cmp(&b.from))
        .then(a.to.cmp(&b.to))
        .then(a.address.cmp(&b.address))
        .then(a.port.cmp(&b.port))
        .then(a.mac.cmp(&b.mac))
}

// ---------------------------------------------------------------------------------------------
// Frames.

type Mac = [u8; 6];

const ETH_IPV4: u16 = 0x0800;
const ETH_ARP: u16 = 0x0806;
const ETH_VLAN: u16 = 0x8100;
const PROTO_ICMP: u8 = 1;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
const ARP_REQUEST: u16 = 1;
const ARP_REPLY: u16 = 2;
const ICMP_UNREACHABLE: u8 = 3;
const ICMP_PORT_UNREACHABLE: u8 = 3;

/// An Ethernet frame, as far as the findings need it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Frame {
    src: Mac,
    body: Body,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Body {
    Arp(Arp),
    Ipv4(Ipv4),
    /// Another EtherType (IPv6, LLDP, ...), or an ARP or IPv4 packet too short to read.
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Arp {
    op: u16,
    sender_ip: Ipv4Addr,
    target_ip: Ipv4Addr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Ipv4 {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    l4: L4,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    /// ICMP destination unreachable, with the header of the packet it is about.
    Unreachable {
        code: u8,
        orig: Orig,
    },
    /// Another protocol or ICMP type, a fragment after the first, or a header cut short.
    Other,
}

/// The start of the packet an ICMP error is about.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Orig {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    sport: u16,
    dport: u16,
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    let s = b.get(at..at.checked_add(2)?)?;
    Some(u16::from_be_bytes([s[0], s[1]]))
}

fn ip_at(b: &[u8], at: usize) -> Option<Ipv4Addr> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(Ipv4Addr::new(s[0], s[1], s[2], s[3]))
}

fn mac_at(b: &[u8], at: usize) -> Option<Mac> {
    b.get(at..at.checked_add(6)?)?.try_into().ok()
}

/// Parse an Ethernet II frame's head; `None` if it is shorter than an Ethernet header.
fn parse_frame(head: &[u8]) -> Option<Frame> {
    let src = mac_at(head, 6)?;
    let mut ethertype = be16(head, 12)?;
    let mut at = 14;
    if ethertype == ETH_VLAN {
        ethertype = be16(head, 16)?;
        at = 18;
    }
    let payload = &head[at..];
    let body = match ethertype {
        ETH_ARP => parse_arp(payload).map_or(Body::Other, Body::Arp),
        ETH_IPV4 => parse_ipv4(payload).map_or(Body::Other, Body::Ipv4),
        _ => Body::Other,
    };
    Some(Frame { src, body })
}

fn parse_arp(b: &[u8]) -> Option<Arp> {
    // Ethernet (1) and IPv4 (0x0800), 6-byte and 4-byte addresses.
    if be16(b, 0)? != 1 || be16(b, 2)? != ETH_IPV4 || b.get(4..6)? != [6, 4] {
        return None;
    }
    Some(Arp {
        op: be16(b, 6)?,
        sender_ip: ip_at(b, 14)?,
        target_ip: ip_at(b, 24)?,
    })
}

/// An IPv4 header's addresses, protocol and payload (cut at the total length, which may be
/// longer than what is there), and whether it is a first fragment (or no fragment).
fn ipv4_header(b: &[u8]) -> Option<(Ipv4Addr, Ipv4Addr, u8, &[u8], bool)> {
    let first = *b.first()?;
    if first >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(first & 0x0f) * 4;
    if ihl < 20 || b.len() < ihl {
        return None;
    }
    let total = usize::from(be16(b, 2)?);
    if total < ihl {
        return None;
    }
    let first_fragment = be16(b, 6)? & 0x1fff == 0;
    let proto = b[9];
    let payload = &b[ihl..total.min(b.len())];
    Some((ip_at(b, 12)?, ip_at(b, 16)?, proto, payload, first_fragment))
}

fn parse_ipv4(b: &[u8]) -> Option<Ipv4> {
    let (src, dst, proto, p, first_fragment) = ipv4_header(b)?;
    let l4 = if first_fragment {
        parse_l4(proto, p).unwrap_or(L4::Other)
    } else {
        L4::Other
    };
    Some(Ipv4 { src, dst, l4 })
}

fn parse_l4(proto: u8, p: &[u8]) -> Option<L4> {
    match proto {
        PROTO_TCP => Some(L4::Tcp {
            sport: be16(p, 0)?,
            dport: be16(p, 2)?,
            flags: *p.get(13)?,
        }),
        PROTO_UDP if p.len() >= 8 => Some(L4::Udp {
            sport: be16(p, 0)?,
            dport: be16(p, 2)?,
        }),
        PROTO_ICMP if p.first() == Some(&ICMP_UNREACHABLE) => {
            let code = *p.get(1)?;
            let (src, dst, proto, op, _) = ipv4_header(p.get(8..)?)?;
            Some(L4::Unreachable {
                code,
                orig: Orig {
                    src,
                    dst,
                    proto,
                    sport: be16(op, 0)?,
                    dport: be16(op, 2)?,
                },
            })
        }
        _ => None,
    }
}

fn parse_mac(s: &str) -> Option<Mac> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

fn mac_text(m: &Mac) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

// ---------------------------------------------------------------------------------------------
// Analysis.

/// The cluster's machines, by MAC and by address.
#[derive(Debug, Default)]
struct Index {
    mac_owner: BTreeMap<Mac, String>,
    /// Address → (machine, VLAN).
    ip_owner: BTreeMap<Ipv4Addr, (String, u8)>,
    /// Every (VLAN, machine, address) of a NIC.
    nics: Vec<(u8, String, Option<Ipv4Addr>)>,
    vlans: BTreeSet<u8>,
}

impl Index {
    fn new(machines: &[NetMachine]) -> Index {
        let mut ix = Index::default();
        for m in machines {
            for (vlan, mac, ip) in &m.nics {
                if let Some(mac) = parse_mac(mac) {
                    ix.mac_owner.entry(mac).or_insert_with(|| m.name.clone());
                }
                let ip = ip.parse::<Ipv4Addr>().ok();
                if let Some(ip) = ip {
                    ix.ip_owner
                        .entry(ip)
                        .or_insert_with(|| (m.name.clone(), *vlan));
                }
                ix.nics.push((*vlan, m.name.clone(), ip));
                ix.vlans.insert(*vlan);
            }
        }
        ix
    }

    fn owner(&self, ip: Ipv4Addr) -> Option<&str> {
        self.ip_owner.get(&ip).map(|(m, _)| m.as_str())
    }

    /// Whether `ip` is in the subnet `192.168.V.0/24` of one of the cluster's VLANs.
    fn inside(&self, ip: Ipv4Addr) -> bool {
        let [a, b, v, _] = ip.octets();
        a == 192 && b == 168 && self.vlans.contains(&v)
    }

    /// The cluster's subnets, as text.
    fn subnets(&self) -> String {
        self.vlans
            .iter()
            .map(|v| format!("192.168.{v}.0/24"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The address `machine` has on `vlan`.
    fn address_on(&self, vlan: u8, machine: &str) -> Option<Ipv4Addr> {
        self.nics
            .iter()
            .find(|(v, m, _)| *v == vlan && m == machine)
            .and_then(|(_, _, ip)| *ip)
    }
}

/// How many times something happened, and when first and last.
#[derive(Debug, Clone, Copy, Default)]
struct Tally {
    count: u64,
    first: u64,
    last: u64,
}

impl Tally {
    fn add(&mut self, at: u64) {
        if self.count == 0 {
            self.first = at;
        }
        self.count += 1;
        self.last = self.last.max(at);
    }
    fn merge(&mut self, other: Tally) {
        if other.count == 0 {
            return;
        }
        if self.count == 0 {
            *self = other;
            return;
        }
        self.count += other.count;
        self.first = self.first.min(other.first);
        self.last = self.last.max(other.last);
    }
}

/// What came back for one TCP connection attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    Pending,
    Answered,
    Reset,
    /// An ICMP destination unreachable.
    Rejected,
}

/// One TCP connection attempt: a SYN and its retransmissions.
#[derive(Debug)]
struct Attempt {
    client: String,
    first: u64,
    last: u64,
    outcome: Outcome,
    /// The machine whose port answered.
    replier: Option<String>,
}

/// (VLAN, client address, client port, server address, server port).
type Tuple = (u8, Ipv4Addr, u16, Ipv4Addr, u16);

#[derive(Debug, Default)]
struct Analysis {
    /// (VLAN, machine) pairs that sent at least one frame.
    spoke: BTreeSet<(u8, String)>,
    attempts: Vec<(Tuple, Attempt)>,
    /// The latest attempt of each tuple (an index into `attempts`).
    current: BTreeMap<Tuple, usize>,
    /// Datagrams answered unreachable, per destination.
    udp: BTreeMap<UdpTo, UdpRefused>,
    /// (VLAN, asker, address asked for) → requests.
    arp_asked: BTreeMap<(u8, String, Ipv4Addr), Tally>,
    /// (VLAN, address) of every ARP reply.
    arp_answered: BTreeSet<(u8, Ipv4Addr)>,
    /// (VLAN, sender, address, port) → frames to an address outside the cluster.
    outside: BTreeMap<(u8, String, Ipv4Addr, Option<u16>), Tally>,
    /// (VLAN, source MAC) → frames per port.
    macs: BTreeMap<(u8, Mac), BTreeMap<String, Tally>>,
}

impl Analysis {
    fn frame(&mut self, s: &Seen, f: &Frame) {
        if f.src[0] & 1 == 0 {
            let ports = self.macs.entry((s.vlan, f.src)).or_default();
            ports.entry(s.from.clone()).or_default().add(s.at_ms);
        }
        match &f.body {
            Body::Arp(arp) => self.arp(s, arp),
            Body::Ipv4(ip) => self.ipv4(s, ip),
            Body::Other => {}
        }
    }

    fn arp(&mut self, s: &Seen, arp: &Arp) {
        match arp.op {
            // A probe (from 0.0.0.0) or an announcement (for itself) expects no reply.
            ARP_REQUEST if !arp.sender_ip.is_unspecified() && arp.sender_ip != arp.target_ip => {
                self.arp_asked
                    .entry((s.vlan, s.from.clone(), arp.target_ip))
                    .or_default()
                    .add(s.at_ms);
            }
            ARP_REPLY => {
                self.arp_answered.insert((s.vlan, arp.sender_ip));
            }
            _ => {}
        }
    }

    fn ipv4(&mut self, s: &Seen, ip: &Ipv4) {
        let port = match ip.l4 {
            L4::Tcp { dport, .. } | L4::Udp { dport, .. } => Some(dport),
            _ => None,
        };
        if !outside_exempt(ip.dst) {
            self.outside
                .entry((s.vlan, s.from.clone(), ip.dst, port))
                .or_default()
                .add(s.at_ms);
        }
        match &ip.l4 {
            L4::Tcp {
                sport,
                dport,
                flags,
            } => self.tcp(s, ip, *sport, *dport, *flags),
            L4::Unreachable { code, orig } => self.unreachable(s, *code, orig),
            L4::Udp { .. } | L4::Other => {}
        }
    }

    fn tcp(&mut self, s: &Seen, ip: &Ipv4, sport: u16, dport: u16, flags: u8) {
        if flags & TCP_SYN != 0 && flags & (TCP_ACK | TCP_RST | TCP_FIN) == 0 {
            let tuple = (s.vlan, ip.src, sport, ip.dst, dport);
            if let Some(&i) = self.current.get(&tuple) {
                if self.attempts[i].1.outcome == Outcome::Pending {
                    // A retransmission.
                    self.attempts[i].1.last = s.at_ms;
                    return;
                }
            }
            self.current.insert(tuple, self.attempts.len());
            self.attempts.push((
                tuple,
                Attempt {
                    client: s.from.clone(),
                    first: s.at_ms,
                    last: s.at_ms,
                    outcome: Outcome::Pending,
                    replier: None,
                },
            ));
            return;
        }
        // A reply: from the server to the client.
        let tuple = (s.vlan, ip.dst, dport, ip.src, sport);
        let outcome = if flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK {
            Outcome::Answered
        } else if flags & TCP_RST != 0 {
            Outcome::Reset
        } else {
            return;
        };
        self.reply(tuple, outcome, &s.from);
    }

    /// Record what came back for the attempt of `tuple`, if it is still waiting.
    fn reply(&mut self, tuple: Tuple, outcome: Outcome, from: &str) {
        if let Some(&i) = self.current.get(&tuple) {
            let a = &mut self.attempts[i].1;
            if a.outcome == Outcome::Pending {
                a.outcome = outcome;
                a.replier = Some(from.to_string());
            }
        }
    }

    fn unreachable(&mut self, s: &Seen, code: u8, orig: &Orig) {
        match orig.proto {
            PROTO_TCP => {
                let tuple = (s.vlan, orig.src, orig.sport, orig.dst, orig.dport);
                self.reply(tuple, Outcome::Rejected, &s.from);
            }
            PROTO_UDP => {
                let to = UdpTo {
                    vlan: s.vlan,
                    client: orig.src,
                    address: orig.dst,
                    port: orig.dport,
                };
                let e = self.udp.entry(to).or_insert_with(|| UdpRefused {
                    tally: Tally::default(),
                    code,
                    replier: s.from.clone(),
                });
                e.tally.add(s.at_ms);
                e.code = code;
            }
            _ => {}
        }
    }

    fn conclude(self, ix: &Index, since: Option<u64>) -> Vec<Finding> {
        let mut out = Vec::new();
        self.tcp_findings(ix, &mut out);
        for (to, refused) in &self.udp {
            out.push(udp_finding(ix, to, refused));
        }
        for ((vlan, asker, address), tally) in &self.arp_asked {
            if self.arp_answered.contains(&(*vlan, *address)) {
                continue;
            }
            out.push(self.arp_finding(ix, *vlan, asker, *address, *tally));
        }
        for ((vlan, from, address, port), tally) in &self.outside {
            if ix.inside(*address) {
                continue;
            }
            out.push(outside_finding(ix, *vlan, from, *address, *port, *tally));
        }
        for ((vlan, mac), ports) in &self.macs {
            if ports.len() > 1 {
                out.push(duplicate_finding(ix, *vlan, mac, ports));
            }
        }
        for (vlan, machine, ip) in &ix.nics {
            if !self.spoke.contains(&(*vlan, machine.clone())) {
                out.push(silent_finding(*vlan, machine, *ip, since));
            }
        }
        out
    }

    fn tcp_findings(&self, ix: &Index, out: &mut Vec<Finding>) {
        /// Per (VLAN, client, server address, port): per outcome, the attempts, and the
        /// outcome of the latest attempt, with the machine that replied.
        type Pair = (u8, String, Ipv4Addr, u16);
        #[derive(Default)]
        struct PairOutcomes {
            by: BTreeMap<Outcome, Tally>,
            latest: Option<(u64, Outcome)>,
            replier: Option<String>,
        }
        let mut pairs: BTreeMap<Pair, PairOutcomes> = BTreeMap::new();
        for ((vlan, _, _, server, port), a) in &self.attempts {
            let p = pairs
                .entry((*vlan, a.client.clone(), *server, *port))
                .or_default();
            let mut t = Tally::default();
            t.add(a.first);
            t.last = a.last;
            p.by.entry(a.outcome).or_default().merge(t);
            if p.latest.is_none_or(|(at, _)| a.first >= at) {
                p.latest = Some((a.first, a.outcome));
            }
            if a.replier.is_some() {
                p.replier.clone_from(&a.replier);
            }
        }
        for ((vlan, client, server, port), p) in pairs {
            let Some(to) = ix
                .owner(server)
                .map(str::to_string)
                .or_else(|| p.replier.clone())
            else {
                // No machine has the address and nothing answered: an ARP request nobody
                // answered or traffic to an outside address says so.
                continue;
            };
            let server_name = to.as_str();
            let overcome = matches!(p.latest, Some((_, Outcome::Answered)));
            for (outcome, tally) in &p.by {
                let (kind, cause, next) = match outcome {
                    Outcome::Answered => (
                        FindingKind::TcpAnswered,
                        format!("{server_name} accepts connections on port {port}."),
                        String::new(),
                    ),
                    Outcome::Reset => (
                        FindingKind::TcpRefused,
                        format!(
                            "Nothing listens on port {port} on {server_name} (or its firewall rejects them: networking.firewall.rejectPackets)."
                        ),
                        format!(
                            "Start the service on {server_name} or check its listen address (`drydock exec {server_name} -- ss -ltn`)."
                        ),
                    ),
                    Outcome::Rejected => (
                        FindingKind::TcpRefused,
                        format!(
                            "{server_name} answers with ICMP destination unreachable: a firewall rule on {server_name} rejects them."
                        ),
                        firewall_next(server_name, "TCP", port),
                    ),
                    Outcome::Pending => {
                        let (cause, next) = unanswered(self, ix, vlan, server_name, server, port);
                        (FindingKind::TcpUnanswered, cause, next)
                    }
                };
                let problem = kind != FindingKind::TcpAnswered && !overcome;
                let cause = if kind != FindingKind::TcpAnswered && overcome {
                    format!(
                        "{}; later attempts were answered.",
                        cause.trim_end_matches('.')
                    )
                } else {
                    cause
                };
                out.push(Finding {
                    kind,
                    problem,
                    vlan,
                    from: Some(client.clone()),
                    to: Some(to.clone()),
                    address: Some(server.to_string()),
                    port: Some(port),
                    mac: None,
                    count: tally.count,
                    first_ms: Some(tally.first),
                    last_ms: Some(tally.last),
                    cause,
                    next,
                });
            }
        }
    }

    fn arp_finding(
        &self,
        ix: &Index,
        vlan: u8,
        asker: &str,
        address: Ipv4Addr,
        tally: Tally,
    ) -> Finding {
        let owner = ix.ip_owner.get(&address);
        let (to, cause, next) = match owner {
            Some((m, v)) if *v == vlan => (
                Some(m.clone()),
                format!(
                    "{m} has {address} on VLAN {vlan} but does not answer for it: its interface there is down or not configured with that address."
                ),
                format!("Check {m}'s interface on VLAN {vlan} (`drydock exec {m} -- ip addr`)."),
            ),
            Some((m, v)) => {
                let here = ix
                    .address_on(vlan, m)
                    .map(|a| format!("its address on VLAN {vlan}, {a}"))
                    .unwrap_or_else(|| {
                        format!("a VLAN both are on (add VLAN {v} to {asker}'s vlans)")
                    });
                (
                    Some(m.clone()),
                    format!(
                        "{address} is {m}'s address on VLAN {v}, not on VLAN {vlan}: {asker} asks for it on the wrong network."
                    ),
                    format!("Make {asker} reach {m} at {here}."),
                )
            }
            None => {
                let [a, b, c, _] = address.octets();
                let point = format!(
                    "Point {asker} at the address of the machine meant (192.168.{vlan}.N on VLAN {vlan}, the names in /etc/hosts)"
                );
                let (cause, next) = if ix.inside(address) {
                    (
                        format!(
                            "Nobody has {address} on VLAN {vlan}: no machine of the cluster has that address, so {asker}'s configuration names a wrong one."
                        ),
                        format!("{point}."),
                    )
                } else if (a, b, c) == (10, 0, 2) {
                    (
                        format!(
                            "Nobody has {address} on VLAN {vlan}: it is in QEMU's user-mode network (10.0.2.0/24, each machine's own eth0 in a NixOS test), not in the cluster's networks ({}), so {asker} was given the address of the wrong interface.",
                            ix.subnets()
                        ),
                        format!(
                            "{point}; if a service advertised {address}, make it use its VLAN interface's address."
                        ),
                    )
                } else {
                    (
                        format!(
                            "Nobody has {address} on VLAN {vlan}: it is outside the cluster's networks ({}), so {asker}'s configuration names a wrong address.",
                            ix.subnets()
                        ),
                        format!("{point}."),
                    )
                };
                (None, cause, next)
            }
        };
        Finding {
            kind: FindingKind::ArpUnanswered,
            problem: true,
            vlan,
            from: Some(asker.to_string()),
            to,
            address: Some(address.to_string()),
            port: None,
            mac: None,
            count: tally.count,
            first_ms: Some(tally.first),
            last_ms: Some(tally.last),
            cause,
            next,
        }
    }
}

/// Why SYNs to `server` got no answer, and what to do: the firewall, unless the server sent
/// nothing at all there.
fn unanswered(
    a: &Analysis,
    ix: &Index,
    vlan: u8,
    server_name: &str,
    server: Ipv4Addr,
    port: u16,
) -> (String, String) {
    match ix.ip_owner.get(&server) {
        Some((m, _)) if !a.spoke.contains(&(vlan, m.clone())) => (
            format!(
                "{m} sent nothing on VLAN {vlan}: its interface there is down or not configured, or it does not run."
            ),
            check_interfaces(m),
        ),
        Some((m, _)) if a.arp_answered.contains(&(vlan, server)) => (
            format!(
                "{m} answers ARP for {server} but not these SYNs: its firewall most likely drops them."
            ),
            firewall_next(m, "TCP", port),
        ),
        _ => (
            format!(
                "{server_name}'s firewall drops them, or {server_name} does not have {server} or a route back."
            ),
            firewall_next(server_name, "TCP", port),
        ),
    }
}

/// Look at a machine's interfaces.
fn check_interfaces(machine: &str) -> String {
    format!(
        "Check {machine}'s interfaces (`drydock exec {machine} -- ip addr`) and that it runs (`drydock ps`)."
    )
}

/// Allow a port in NixOS's firewall.
fn firewall_next(server: &str, proto: &str, port: u16) -> String {
    format!(
        "Allow the port in {server}'s firewall (NixOS: `networking.firewall.allowed{proto}Ports = [ {port} ];`), or check that {server} has the address (`drydock exec {server} -- ip addr`)."
    )
}

/// Where UDP datagrams went that were answered unreachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct UdpTo {
    vlan: u8,
    client: Ipv4Addr,
    address: Ipv4Addr,
    port: u16,
}

/// The ICMP destination unreachable answers: how many, the code of the last, who answered.
#[derive(Debug)]
struct UdpRefused {
    tally: Tally,
    code: u8,
    replier: String,
}

fn udp_finding(ix: &Index, dest: &UdpTo, refused: &UdpRefused) -> Finding {
    let UdpTo {
        vlan,
        client,
        address,
        port,
    } = *dest;
    let (tally, code, replier) = (refused.tally, refused.code, refused.replier.as_str());
    let to = ix.owner(address).unwrap_or(replier).to_string();
    let (cause, next) = if code == ICMP_PORT_UNREACHABLE {
        (
            format!(
                "Nothing listens on UDP port {port} on {to} (or its firewall rejects them: networking.firewall.rejectPackets)."
            ),
            format!(
                "Start the service on {to} or check its listen address (`drydock exec {to} -- ss -lun`)."
            ),
        )
    } else {
        (
            format!(
                "{to} answers with ICMP destination unreachable (code {code}): a firewall rule rejects them, or there is no route."
            ),
            firewall_next(&to, "UDP", port),
        )
    };
    Finding {
        kind: FindingKind::UdpUnreachable,
        problem: true,
        vlan,
        from: ix.owner(client).map(str::to_string),
        to: Some(to),
        address: Some(address.to_string()),
        port: Some(port),
        mac: None,
        count: tally.count,
        first_ms: Some(tally.first),
        last_ms: Some(tally.last),
        cause,
        next,
    }
}

/// Destinations that are never "outside": broadcast, multicast, unspecified.
fn outside_exempt(ip: Ipv4Addr) -> bool {
    ip.is_broadcast() || ip.is_multicast() || ip.is_unspecified()
}

fn outside_finding(
    ix: &Index,
    vlan: u8,
    from: &str,
    address: Ipv4Addr,
    port: Option<u16>,
    tally: Tally,
) -> Finding {
    Finding {
        kind: FindingKind::OutsideAddress,
        problem: true,
        vlan,
        from: Some(from.to_string()),
        to: None,
        address: Some(address.to_string()),
        port,
        mac: None,
        count: tally.count,
        first_ms: Some(tally.first),
        last_ms: Some(tally.last),
        cause: format!(
            "{from} sends to {address}, outside the cluster's networks ({}): a wrong address in its configuration, or a route out that the cluster does not have.",
            ix.subnets()
        ),
        next: format!(
            "Point {from} at a machine's address (192.168.{vlan}.N on VLAN {vlan}, the names in /etc/hosts), or check its routes (`drydock exec {from} -- ip route`)."
        ),
    }
}

fn duplicate_finding(ix: &Index, vlan: u8, mac: &Mac, ports: &BTreeMap<String, Tally>) -> Finding {
    let plan_owner = ix.mac_owner.get(mac);
    let owner = plan_owner.filter(|o| ports.contains_key(*o));
    let names: Vec<&str> = ports.keys().map(String::as_str).collect();
    // `from`: the first port whose MAC it is not; `to`: the owner, or the other port.
    let from = names
        .iter()
        .find(|n| Some(**n) != owner.map(String::as_str))
        .copied()
        .unwrap_or(names[0]);
    let to = owner
        .map(String::as_str)
        .or_else(|| names.iter().find(|n| **n != from).copied())
        .unwrap_or(from);
    let mut tally = Tally::default();
    for (name, t) in ports {
        if Some(name) != owner {
            tally.merge(*t);
        }
    }
    let mac = mac_text(mac);
    let whose = match plan_owner {
        Some(o) => format!(" (the MAC of {o}'s NIC)"),
        None => String::new(),
    };
    Finding {
        kind: FindingKind::DuplicateMac,
        problem: true,
        vlan,
        from: Some(from.to_string()),
        to: Some(to.to_string()),
        address: None,
        port: None,
        mac: Some(mac.clone()),
        count: tally.count,
        first_ms: Some(tally.first),
        last_ms: Some(tally.last),
        cause: format!(
            "Frames from MAC {mac}{whose} came from the ports of {}: two machines use the same MAC, one set in a configuration.",
            names.join(" and ")
        ),
        next: format!(
            "Remove the MAC setting from {from} (e.g. networking.interfaces.<name>.macAddress), so that each machine keeps its own."
        ),
    }
}

fn silent_finding(vlan: u8, machine: &str, ip: Option<Ipv4Addr>, since: Option<u64>) -> Finding {
    let when = if since.is_some() {
        "in the time asked"
    } else {
        "in what the hub recorded"
    };
    Finding {
        kind: FindingKind::Silent,
        problem: true,
        vlan,
        from: Some(machine.to_string()),
        to: None,
        address: ip.map(|a| a.to_string()),
        port: None,
        mac: None,
        count: 0,
        first_ms: None,
        last_ms: None,
        cause: format!(
            "{machine} sent no frame on VLAN {vlan} {when}: its interface there is down or not configured (or it was idle, or it does not run)."
        ),
        next: check_interfaces(machine),
    }
}

// ---------------------------------------------------------------------------------------------
// Text.

/// A duration as `45s`, `12m`, `3h`, `2d`.
pub fn age(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m", secs / 60),
        3600..86400 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86400),
    }
}

fn ago(now_ms: u64, at_ms: u64) -> String {
    format!("{} ago", age(now_ms.saturating_sub(at_ms) / 1000))
}

/// A name for the terminal (the cluster's own names; escaped all the same).
fn shown(name: &str) -> String {
    drydock_vm::escape_control(name).into_owned()
}

/// One line saying what a finding is about.
fn headline(f: &Finding) -> String {
    let from = shown(f.from.as_deref().unwrap_or("?"));
    let address = f.address.as_deref().unwrap_or("?");
    let target = match &f.to {
        Some(to) => format!("{} ({address})", shown(to)),
        None => address.to_string(),
    };
    let port = f.port.map(|p| format!(" port {p}")).unwrap_or_default();
    match f.kind {
        FindingKind::TcpAnswered => format!("{from} → {target}{port}: answered"),
        FindingKind::TcpRefused => format!("{from} → {target}{port}: connections refused"),
        FindingKind::TcpUnanswered => format!("{from} → {target}{port}: connections unanswered"),
        FindingKind::UdpUnreachable => {
            format!("{from} → {target} UDP{port}: destination unreachable")
        }
        FindingKind::ArpUnanswered => {
            format!("{from} asks who has {address}: nobody answers")
        }
        FindingKind::OutsideAddress => {
            format!("{from} → {address}{port}: outside the cluster's networks")
        }
        FindingKind::DuplicateMac => format!(
            "MAC {} from {from} and {}",
            f.mac.as_deref().unwrap_or("?"),
            shown(f.to.as_deref().unwrap_or("?"))
        ),
        FindingKind::Silent => format!("{from} sent nothing ({address})"),
        FindingKind::BroadcastFlood => {
            format!("{from} floods the segment with broadcast or multicast frames")
        }
    }
}

/// How many times and when, as a line.
fn when(f: &Finding, now_ms: u64) -> Option<String> {
    let (first, last) = (f.first_ms?, f.last_ms?);
    let what = match f.kind {
        FindingKind::TcpAnswered | FindingKind::TcpRefused | FindingKind::TcpUnanswered => {
            "connection attempt"
        }
        FindingKind::UdpUnreachable => "datagram answered unreachable",
        FindingKind::ArpUnanswered => "request",
        FindingKind::OutsideAddress | FindingKind::DuplicateMac | FindingKind::Silent => "frame",
        FindingKind::BroadcastFlood => "dropped frame",
    };
    let plural = if f.count == 1 { "" } else { "s" };
    Some(if f.count == 1 {
        format!("1 {what}, {}", ago(now_ms, last))
    } else {
        format!(
            "{} {what}{plural}, first {}, last {}",
            f.count,
            ago(now_ms, first),
            ago(now_ms, last)
        )
    })
}

fn block(out: &mut String, f: &Finding, now_ms: u64) {
    out.push_str(&format!(
        "VLAN {} · {}: {}\n",
        f.vlan,
        f.kind.name().replace('_', " "),
        headline(f)
    ));
    if let Some(w) = when(f, now_ms) {
        out.push_str(&format!("  {w}\n"));
    }
    out.push_str(&format!("  cause: {}\n", shown(&f.cause)));
    if !f.next.is_empty() {
        out.push_str(&format!("  next:  {}\n", shown(&f.next)));
    }
}

/// The findings as text for a terminal: a summary line, one block per problem, then what
/// later attempts overcame, then the answered connections as a table.
pub fn render(f: &NetFindings, now_ms: u64) -> String {
    let mut out = String::new();
    let window = match f.since_ms {
        Some(t) => format!("since {}", ago(now_ms, t)),
        None => "in the hubs' record".to_string(),
    };
    let per: Vec<String> = f
        .by_machine
        .iter()
        .map(|(m, n)| format!("{} {n}", shown(m)))
        .collect();
    out.push_str(&format!(
        "{} frame{} {window} ({})\n",
        f.frames,
        if f.frames == 1 { "" } else { "s" },
        if per.is_empty() {
            "no machines".to_string()
        } else {
            per.join(", ")
        }
    ));
    let problems: Vec<&Finding> = f.findings.iter().filter(|x| x.problem).collect();
    let overcome: Vec<&Finding> = f
        .findings
        .iter()
        .filter(|x| !x.problem && x.kind != FindingKind::TcpAnswered)
        .collect();
    let answered: Vec<&Finding> = f
        .findings
        .iter()
        .filter(|x| x.kind == FindingKind::TcpAnswered)
        .collect();
    if problems.is_empty() {
        out.push_str("\nNo problems found.\n");
    }
    for p in &problems {
        out.push('\n');
        block(&mut out, p, now_ms);
    }
    if !overcome.is_empty() {
        out.push_str("\nOvercome (later attempts were answered):\n");
        for p in &overcome {
            out.push('\n');
            block(&mut out, p, now_ms);
        }
    }
    if !answered.is_empty() {
        out.push_str("\nConnections answered:\n");
        let rows: Vec<[String; 6]> = answered
            .iter()
            .map(|a| {
                [
                    a.vlan.to_string(),
                    shown(a.from.as_deref().unwrap_or("?")),
                    shown(a.to.as_deref().or(a.address.as_deref()).unwrap_or("?")),
                    a.port.map(|p| p.to_string()).unwrap_or_default(),
                    a.count.to_string(),
                    a.last_ms.map(|t| ago(now_ms, t)).unwrap_or_default(),
                ]
            })
            .collect();
        let head = ["VLAN", "FROM", "TO", "PORT", "ATTEMPTS", "LAST"].map(String::from);
        let mut widths = head.clone().map(|h| h.chars().count());
        for r in &rows {
            for (w, c) in widths.iter_mut().zip(r) {
                *w = (*w).max(c.chars().count());
            }
        }
        for r in std::iter::once(&head).chain(&rows) {
            let cells: Vec<String> = r
                .iter()
                .zip(widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect();
            out.push_str(&format!("  {}\n", cells.join("  ").trim_end()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    // Frame builders.

    const BROADCAST: Mac = [0xff; 6];

    fn number(machine: &str) -> u8 {
        match machine {
            "agent1" => 1,
            "agent2" => 2,
            "server" => 3,
            _ => 9,
        }
    }

    fn mac(vlan: u8, machine: &str) -> Mac {
        [0x52, 0x54, 0x00, 0x12, vlan, number(machine)]
    }

    fn ip(vlan: u8, machine: &str) -> Ipv4Addr {
        Ipv4Addr::new(192, 168, vlan, number(machine))
    }

    fn eth(src: Mac, dst: Mac, ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend(dst);
        f.extend(src);
        f.extend(ethertype.to_be_bytes());
        f.extend(payload);
        f
    }

    fn arp(op: u16, sender_mac: Mac, sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
        let mut p = vec![0, 1, 0x08, 0x00, 6, 4];
        p.extend(op.to_be_bytes());
        p.extend(sender_mac);
        p.extend(sender.octets());
        p.extend([0; 6]);
        p.extend(target.octets());
        p
    }

    fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload: &[u8]) -> Vec<u8> {
        let total = u16::try_from(20 + payload.len()).unwrap();
        let mut p = vec![0x45, 0];
        p.extend(total.to_be_bytes());
        p.extend([0, 0, 0x40, 0, 64, proto, 0, 0]);
        p.extend(src.octets());
        p.extend(dst.octets());
        p.extend(payload);
        p
    }

    fn tcp(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
        let mut p = Vec::new();
        p.extend(sport.to_be_bytes());
        p.extend(dport.to_be_bytes());
        p.extend([0; 8]);
        p.extend([0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
        p
    }

    fn udp(sport: u16, dport: u16, data: &[u8]) -> Vec<u8> {
        let mut p = Vec::new();
        p.extend(sport.to_be_bytes());
        p.extend(dport.to_be_bytes());
        p.extend(u16::try_from(8 + data.len()).unwrap().to_be_bytes());
        p.extend([0, 0]);
        p.extend(data);
        p
    }

    /// ICMP destination unreachable about `orig` (an IPv4 packet), with its first 28 bytes.
    fn icmp_unreachable(code: u8, orig: &[u8]) -> Vec<u8> {
        let mut p = vec![ICMP_UNREACHABLE, code, 0, 0, 0, 0, 0, 0];
        p.extend(&orig[..orig.len().min(28)]);
        p
    }

    /// Frames from the machines' ports, as the hubs record them.
    #[derive(Default)]
    struct Net {
        seen: Vec<Seen>,
    }

    impl Net {
        fn frame(&mut self, at_ms: u64, vlan: u8, from: &str, frame: Vec<u8>) -> &mut Net {
            self.seen.push(Seen {
                at_ms,
                vlan,
                from: from.into(),
                len: u32::try_from(frame.len()).unwrap(),
                head: frame[..frame.len().min(128)].to_vec(),
            });
            self
        }

        fn ipv4(
            &mut self,
            at: u64,
            vlan: u8,
            from: &str,
            dst: Ipv4Addr,
            proto: u8,
            payload: &[u8],
        ) -> &mut Net {
            let to = dst.octets()[3];
            let f = eth(
                mac(vlan, from),
                [0x52, 0x54, 0, 0x12, vlan, to],
                ETH_IPV4,
                &ipv4(ip(vlan, from), dst, proto, payload),
            );
            self.frame(at, vlan, from, f)
        }

        fn tcp(
            &mut self,
            at: u64,
            vlan: u8,
            from: &str,
            to: &str,
            ports: (u16, u16),
            flags: u8,
        ) -> &mut Net {
            self.ipv4(
                at,
                vlan,
                from,
                ip(vlan, to),
                PROTO_TCP,
                &tcp(ports.0, ports.1, flags),
            )
        }

        fn arp(&mut self, at: u64, vlan: u8, from: &str, op: u16, target: Ipv4Addr) -> &mut Net {
            let f = eth(
                mac(vlan, from),
                BROADCAST,
                ETH_ARP,
                &arp(op, mac(vlan, from), ip(vlan, from), target),
            );
            self.frame(at, vlan, from, f)
        }

        /// Every machine says something on each of its VLANs (so none is silent).
        fn chatter(&mut self, at: u64) -> &mut Net {
            for (vlan, m) in [(1, "agent1"), (1, "agent2"), (1, "server"), (2, "server")] {
                let f = eth(mac(vlan, m), BROADCAST, 0x86dd, &[0; 40]);
                self.frame(at, vlan, m, f);
            }
            self
        }

        fn findings(&self) -> NetFindings {
            findings(&self.seen, &machines(), None)
        }
    }

    /// agent1 and agent2 on VLAN 1, server on VLANs 1 and 2.
    fn machines() -> Vec<NetMachine> {
        let nic = |v: u8, m: &str| {
            let a = mac(v, m);
            (v, mac_text(&a), ip(v, m).to_string())
        };
        vec![
            NetMachine {
                name: "agent1".into(),
                nics: vec![nic(1, "agent1")],
            },
            NetMachine {
                name: "agent2".into(),
                nics: vec![nic(1, "agent2")],
            },
            NetMachine {
                name: "server".into(),
                nics: vec![nic(1, "server"), nic(2, "server")],
            },
        ]
    }

    fn of(f: &NetFindings, kind: FindingKind) -> Vec<&Finding> {
        f.findings.iter().filter(|x| x.kind == kind).collect()
    }

    fn one(f: &NetFindings, kind: FindingKind) -> &Finding {
        let all = of(f, kind);
        assert_eq!(all.len(), 1, "{kind:?} in {:#?}", f.findings);
        all[0]
    }

    const SYN: u8 = TCP_SYN;
    const SYN_ACK: u8 = TCP_SYN | TCP_ACK;
    const RST_ACK: u8 = TCP_RST | TCP_ACK;

    #[test]
    fn tcp_attempts_per_pair_and_port_answered_refused_or_unanswered() {
        let mut n = Net::default();
        n.chatter(0)
            // agent1 → server:7000, two attempts answered (one SYN retransmitted), then
            // closed with a RST: still answered.
            .tcp(1_000, 1, "agent1", "server", (40_000, 7000), SYN)
            .tcp(2_000, 1, "agent1", "server", (40_000, 7000), SYN)
            .tcp(2_001, 1, "server", "agent1", (7000, 40_000), SYN_ACK)
            .tcp(2_500, 1, "server", "agent1", (7000, 40_000), RST_ACK)
            .tcp(3_000, 1, "agent1", "server", (40_002, 7000), SYN)
            .tcp(3_001, 1, "server", "agent1", (7000, 40_002), SYN_ACK)
            // agent1 → server:7001: refused.
            .tcp(4_000, 1, "agent1", "server", (40_004, 7001), SYN)
            .tcp(4_001, 1, "server", "agent1", (7001, 40_004), RST_ACK)
            // agent2 → server:6443: two attempts, the first retransmitted twice, no reply.
            .tcp(10_000, 1, "agent2", "server", (50_000, 6443), SYN)
            .tcp(11_000, 1, "agent2", "server", (50_000, 6443), SYN)
            .tcp(13_000, 1, "agent2", "server", (50_000, 6443), SYN)
            .tcp(20_000, 1, "agent2", "server", (50_002, 6443), SYN);
        let f = n.findings();

        let a = one(&f, FindingKind::TcpAnswered);
        assert_eq!(
            (a.problem, a.vlan, a.from.as_deref(), a.to.as_deref()),
            (false, 1, Some("agent1"), Some("server"))
        );
        assert_eq!(
            (a.port, a.count, a.first_ms, a.last_ms),
            (Some(7000), 2, Some(1_000), Some(3_000))
        );
        assert_eq!(a.address.as_deref(), Some("192.168.1.3"));

        let r = one(&f, FindingKind::TcpRefused);
        assert_eq!(
            (
                r.problem,
                r.from.as_deref(),
                r.to.as_deref(),
                r.port,
                r.count
            ),
            (true, Some("agent1"), Some("server"), Some(7001), 1)
        );
        assert_eq!(
            r.cause,
            "Nothing listens on port 7001 on server (or its firewall rejects them: networking.firewall.rejectPackets)."
        );
        assert_eq!(
            r.next,
            "Start the service on server or check its listen address (`drydock exec server -- ss -ltn`)."
        );

        let u = one(&f, FindingKind::TcpUnanswered);
        assert_eq!(
            (u.problem, u.from.as_deref(), u.to.as_deref(), u.port),
            (true, Some("agent2"), Some("server"), Some(6443))
        );
        assert_eq!(
            (u.count, u.first_ms, u.last_ms),
            (2, Some(10_000), Some(20_000))
        );
        assert_eq!(
            u.cause,
            "server's firewall drops them, or server does not have 192.168.1.3 or a route back."
        );
        assert_eq!(
            u.next,
            "Allow the port in server's firewall (NixOS: `networking.firewall.allowedTCPPorts = [ 6443 ];`), or check that server has the address (`drydock exec server -- ip addr`)."
        );
        assert_eq!(f.findings.len(), 3, "{:#?}", f.findings);
    }

    #[test]
    fn the_cause_of_unanswered_syns_follows_what_else_the_server_did() {
        // (server answered ARP for its address, server sent anything) → cause.
        for (arp_reply, speaks, want) in [
            (
                true,
                true,
                "server answers ARP for 192.168.1.3 but not these SYNs: its firewall most likely drops them.",
            ),
            (
                false,
                true,
                "server's firewall drops them, or server does not have 192.168.1.3 or a route back.",
            ),
            (
                false,
                false,
                "server sent nothing on VLAN 1: its interface there is down or not configured, or it does not run.",
            ),
        ] {
            let mut n = Net::default();
            n.tcp(1_000, 1, "agent1", "server", (40_000, 6443), SYN);
            if speaks {
                n.frame(
                    500,
                    1,
                    "server",
                    eth(mac(1, "server"), BROADCAST, 0x86dd, &[]),
                );
            }
            if arp_reply {
                n.arp(900, 1, "server", ARP_REPLY, ip(1, "agent1"));
            }
            let f = n.findings();
            let u = one(&f, FindingKind::TcpUnanswered);
            assert_eq!(u.cause, want);
            let firewall = u
                .next
                .contains("networking.firewall.allowedTCPPorts = [ 6443 ];");
            assert_eq!(firewall, speaks, "{}", u.next);
        }
    }

    #[test]
    fn refusals_overcome_by_a_later_answer_are_no_longer_problems() {
        let mut n = Net::default();
        n.chatter(0)
            .tcp(1_000, 1, "agent1", "server", (40_000, 6443), SYN)
            .tcp(1_001, 1, "server", "agent1", (6443, 40_000), RST_ACK)
            .tcp(2_000, 1, "agent1", "server", (40_002, 6443), SYN)
            .tcp(2_001, 1, "server", "agent1", (6443, 40_002), SYN_ACK)
            // agent2: answered first, refused last: a problem again.
            .tcp(1_000, 1, "agent2", "server", (40_000, 7000), SYN)
            .tcp(1_001, 1, "server", "agent2", (7000, 40_000), SYN_ACK)
            .tcp(2_000, 1, "agent2", "server", (40_002, 7000), SYN)
            .tcp(2_001, 1, "server", "agent2", (7000, 40_002), RST_ACK);
        let f = n.findings();
        let refused = of(&f, FindingKind::TcpRefused);
        let by = |who: &str| refused.iter().find(|r| r.from.as_deref() == Some(who));
        let a1 = by("agent1").unwrap();
        assert!(!a1.problem);
        assert!(
            a1.cause.ends_with("; later attempts were answered."),
            "{}",
            a1.cause
        );
        assert!(by("agent2").unwrap().problem);
        // A SYN on a tuple after its outcome is a new attempt.
        let mut n = Net::default();
        n.tcp(1_000, 1, "agent1", "server", (40_000, 80), SYN)
            .tcp(1_001, 1, "server", "agent1", (80, 40_000), RST_ACK)
            .tcp(5_000, 1, "agent1", "server", (40_000, 80), SYN)
            .tcp(6_000, 1, "agent1", "server", (40_000, 80), SYN);
        let f = n.findings();
        assert_eq!(one(&f, FindingKind::TcpRefused).count, 1);
        let u = one(&f, FindingKind::TcpUnanswered);
        assert_eq!(
            (u.count, u.first_ms, u.last_ms),
            (1, Some(5_000), Some(6_000))
        );
    }

    #[test]
    fn syns_rejected_with_icmp_are_a_firewall() {
        let mut n = Net::default();
        let syn = ipv4(
            ip(1, "agent1"),
            ip(1, "server"),
            PROTO_TCP,
            &tcp(40_000, 6443, SYN),
        );
        n.chatter(0)
            .ipv4(
                1_000,
                1,
                "agent1",
                ip(1, "server"),
                PROTO_TCP,
                &tcp(40_000, 6443, SYN),
            )
            .ipv4(
                1_001,
                1,
                "server",
                ip(1, "agent1"),
                PROTO_ICMP,
                &icmp_unreachable(13, &syn),
            );
        let f = n.findings();
        let r = one(&f, FindingKind::TcpRefused);
        assert_eq!(
            (r.problem, r.port, r.to.as_deref()),
            (true, Some(6443), Some("server"))
        );
        assert_eq!(
            r.cause,
            "server answers with ICMP destination unreachable: a firewall rule on server rejects them."
        );
        assert!(
            r.next
                .contains("networking.firewall.allowedTCPPorts = [ 6443 ];")
        );
        assert!(of(&f, FindingKind::UdpUnreachable).is_empty());
    }

    #[test]
    fn udp_answered_by_icmp_unreachable() {
        for (code, cause, next) in [
            (
                3,
                "Nothing listens on UDP port 8472 on server (or its firewall rejects them: networking.firewall.rejectPackets).",
                "Start the service on server or check its listen address (`drydock exec server -- ss -lun`).",
            ),
            (
                13,
                "server answers with ICMP destination unreachable (code 13): a firewall rule rejects them, or there is no route.",
                "Allow the port in server's firewall (NixOS: `networking.firewall.allowedUDPPorts = [ 8472 ];`), or check that server has the address (`drydock exec server -- ip addr`).",
            ),
        ] {
            let mut n = Net::default();
            let dgram = ipv4(
                ip(1, "agent1"),
                ip(1, "server"),
                PROTO_UDP,
                &udp(33_000, 8472, b"x"),
            );
            n.chatter(0);
            for at in [1_000, 2_000, 3_000] {
                n.ipv4(
                    at,
                    1,
                    "agent1",
                    ip(1, "server"),
                    PROTO_UDP,
                    &udp(33_000, 8472, b"x"),
                )
                .ipv4(
                    at + 1,
                    1,
                    "server",
                    ip(1, "agent1"),
                    PROTO_ICMP,
                    &icmp_unreachable(code, &dgram),
                );
            }
            let f = n.findings();
            let u = one(&f, FindingKind::UdpUnreachable);
            assert_eq!(
                (
                    u.from.as_deref(),
                    u.to.as_deref(),
                    u.address.as_deref(),
                    u.port
                ),
                (
                    Some("agent1"),
                    Some("server"),
                    Some("192.168.1.3"),
                    Some(8472)
                )
            );
            assert_eq!(
                (u.count, u.first_ms, u.last_ms),
                (3, Some(1_001), Some(3_001))
            );
            assert_eq!((u.cause.as_str(), u.next.as_str()), (cause, next));
            assert_eq!(f.findings.len(), 1, "{:#?}", f.findings);
        }
    }

    #[test]
    fn arp_requests_nobody_answers() {
        let user_net = "Nobody has 10.0.2.15 on VLAN 1: it is in QEMU's user-mode network (10.0.2.0/24, each machine's own eth0 in a NixOS test), not in the cluster's networks (192.168.1.0/24, 192.168.2.0/24), so agent1 was given the address of the wrong interface.";
        // (target, answered by server, to, cause, next)
        for (target, answered, to, cause, next) in [
            (
                Ipv4Addr::new(10, 0, 2, 15),
                false,
                None,
                user_net,
                "Point agent1 at the address of the machine meant (192.168.1.N on VLAN 1, the names in /etc/hosts); if a service advertised 10.0.2.15, make it use its VLAN interface's address.",
            ),
            (
                Ipv4Addr::new(10, 9, 9, 9),
                false,
                None,
                "Nobody has 10.9.9.9 on VLAN 1: it is outside the cluster's networks (192.168.1.0/24, 192.168.2.0/24), so agent1's configuration names a wrong address.",
                "Point agent1 at the address of the machine meant (192.168.1.N on VLAN 1, the names in /etc/hosts).",
            ),
            (
                Ipv4Addr::new(192, 168, 1, 9),
                false,
                None,
                "Nobody has 192.168.1.9 on VLAN 1: no machine of the cluster has that address, so agent1's configuration names a wrong one.",
                "Point agent1 at the address of the machine meant (192.168.1.N on VLAN 1, the names in /etc/hosts).",
            ),
            (
                ip(2, "server"),
                false,
                Some("server"),
                "192.168.2.3 is server's address on VLAN 2, not on VLAN 1: agent1 asks for it on the wrong network.",
                "Make agent1 reach server at its address on VLAN 1, 192.168.1.3.",
            ),
            (
                ip(1, "server"),
                false,
                Some("server"),
                "server has 192.168.1.3 on VLAN 1 but does not answer for it: its interface there is down or not configured with that address.",
                "Check server's interface on VLAN 1 (`drydock exec server -- ip addr`).",
            ),
            (ip(1, "server"), true, None, "", ""),
        ] {
            let mut n = Net::default();
            n.chatter(0)
                .arp(1_000, 1, "agent1", ARP_REQUEST, target)
                .arp(2_000, 1, "agent1", ARP_REQUEST, target)
                .arp(3_000, 1, "agent1", ARP_REQUEST, target);
            if answered {
                n.arp(1_001, 1, "server", ARP_REPLY, ip(1, "agent1"));
            }
            let f = n.findings();
            let all = of(&f, FindingKind::ArpUnanswered);
            if answered {
                // The reply's sender address is the one asked for.
                assert!(all.is_empty(), "{all:#?}");
                continue;
            }
            let a = one(&f, FindingKind::ArpUnanswered);
            assert_eq!(
                (a.problem, a.vlan, a.from.as_deref(), a.to.as_deref()),
                (true, 1, Some("agent1"), to),
                "{target}"
            );
            assert_eq!(a.address, Some(target.to_string()));
            assert_eq!(
                (a.count, a.first_ms, a.last_ms),
                (3, Some(1_000), Some(3_000))
            );
            assert_eq!((a.cause.as_str(), a.next.as_str()), (cause, next));
        }
    }

    #[test]
    fn answered_arp_probes_and_announcements_are_no_findings() {
        let mut n = Net::default();
        n.chatter(0)
            // agent1 asks for server, server answers (its reply names its own address).
            .arp(1_000, 1, "agent1", ARP_REQUEST, ip(1, "server"))
            .frame(
                1_001,
                1,
                "server",
                eth(
                    mac(1, "server"),
                    mac(1, "agent1"),
                    ETH_ARP,
                    &arp(
                        ARP_REPLY,
                        mac(1, "server"),
                        ip(1, "server"),
                        ip(1, "agent1"),
                    ),
                ),
            )
            // An announcement (for itself) and a probe (from 0.0.0.0).
            .arp(2_000, 1, "agent2", ARP_REQUEST, ip(1, "agent2"))
            .frame(
                2_001,
                1,
                "agent2",
                eth(
                    mac(1, "agent2"),
                    BROADCAST,
                    ETH_ARP,
                    &arp(
                        ARP_REQUEST,
                        mac(1, "agent2"),
                        Ipv4Addr::UNSPECIFIED,
                        ip(1, "agent2"),
                    ),
                ),
            );
        assert_eq!(n.findings().findings, []);
    }

    #[test]
    fn traffic_to_addresses_outside_the_cluster() {
        let mut n = Net::default();
        n.chatter(0)
            .ipv4(
                1_000,
                1,
                "agent1",
                Ipv4Addr::new(10, 0, 2, 2),
                PROTO_TCP,
                &tcp(40_000, 80, SYN),
            )
            .ipv4(
                2_000,
                1,
                "agent1",
                Ipv4Addr::new(10, 0, 2, 2),
                PROTO_TCP,
                &tcp(40_000, 80, SYN),
            )
            .ipv4(
                3_000,
                1,
                "agent2",
                Ipv4Addr::new(8, 8, 8, 8),
                PROTO_UDP,
                &udp(5353, 53, b""),
            )
            .ipv4(
                3_000,
                1,
                "agent2",
                Ipv4Addr::new(8, 8, 8, 8),
                PROTO_ICMP,
                &[8, 0, 0, 0],
            )
            // Not outside: broadcast, multicast, a subnet's broadcast, another VLAN's subnet.
            .ipv4(
                4_000,
                1,
                "agent2",
                Ipv4Addr::BROADCAST,
                PROTO_UDP,
                &udp(68, 67, b""),
            )
            .ipv4(
                4_000,
                1,
                "agent2",
                Ipv4Addr::new(224, 0, 0, 251),
                PROTO_UDP,
                &udp(5353, 5353, b""),
            )
            .ipv4(
                4_000,
                1,
                "agent2",
                Ipv4Addr::new(192, 168, 1, 255),
                PROTO_UDP,
                &udp(1, 2, b""),
            )
            .ipv4(
                4_000,
                1,
                "server",
                ip(2, "server"),
                PROTO_ICMP,
                &[0, 0, 0, 0],
            );
        let f = n.findings();
        let out = of(&f, FindingKind::OutsideAddress);
        let rows: Vec<_> = out
            .iter()
            .map(|o| {
                (
                    o.from.as_deref().unwrap(),
                    o.address.as_deref().unwrap(),
                    o.port,
                    o.count,
                )
            })
            .collect();
        assert_eq!(
            rows,
            [
                ("agent2", "8.8.8.8", None, 1),
                ("agent2", "8.8.8.8", Some(53), 1),
                ("agent1", "10.0.2.2", Some(80), 2),
            ]
        );
        assert_eq!(
            out[2].cause,
            "agent1 sends to 10.0.2.2, outside the cluster's networks (192.168.1.0/24, 192.168.2.0/24): a wrong address in its configuration, or a route out that the cluster does not have."
        );
        assert_eq!(
            out[2].next,
            "Point agent1 at a machine's address (192.168.1.N on VLAN 1, the names in /etc/hosts), or check its routes (`drydock exec agent1 -- ip route`)."
        );
        // No TCP finding for an address no machine has.
        assert!(of(&f, FindingKind::TcpUnanswered).is_empty());
        assert_eq!(f.findings.len(), 3, "{:#?}", f.findings);
    }

    #[test]
    fn a_mac_from_two_machines_ports() {
        let stray = [0x02, 0, 0, 0, 0, 7];
        let mut n = Net::default();
        n.chatter(0)
            // agent2 sends with agent1's MAC.
            .frame(
                1_000,
                1,
                "agent2",
                eth(mac(1, "agent1"), BROADCAST, 0x86dd, &[]),
            )
            .frame(
                2_000,
                1,
                "agent2",
                eth(mac(1, "agent1"), BROADCAST, 0x86dd, &[]),
            )
            // A MAC of no machine from two ports.
            .frame(3_000, 1, "server", eth(stray, BROADCAST, 0x86dd, &[]))
            .frame(3_500, 1, "agent1", eth(stray, BROADCAST, 0x86dd, &[]))
            // The same MAC on two VLANs, and a group MAC (garbage): no finding.
            .frame(
                4_000,
                2,
                "server",
                eth(mac(1, "server"), BROADCAST, 0x86dd, &[]),
            )
            .frame(4_000, 1, "agent1", eth(BROADCAST, BROADCAST, 0x86dd, &[]))
            .frame(4_000, 1, "agent2", eth(BROADCAST, BROADCAST, 0x86dd, &[]));
        let f = n.findings();
        let d = of(&f, FindingKind::DuplicateMac);
        assert_eq!(d.len(), 2, "{d:#?}");
        let (stray_one, agent1s) = (d[0], d[1]);
        assert_eq!(
            (
                agent1s.from.as_deref(),
                agent1s.to.as_deref(),
                agent1s.mac.as_deref(),
                agent1s.count,
                agent1s.first_ms,
                agent1s.last_ms
            ),
            (
                Some("agent2"),
                Some("agent1"),
                Some("52:54:00:12:01:01"),
                2,
                Some(1_000),
                Some(2_000)
            )
        );
        assert_eq!(
            agent1s.cause,
            "Frames from MAC 52:54:00:12:01:01 (the MAC of agent1's NIC) came from the ports of agent1 and agent2: two machines use the same MAC, one set in a configuration."
        );
        assert_eq!(
            agent1s.next,
            "Remove the MAC setting from agent2 (e.g. networking.interfaces.<name>.macAddress), so that each machine keeps its own."
        );
        assert_eq!(
            (
                stray_one.from.as_deref(),
                stray_one.to.as_deref(),
                stray_one.mac.as_deref(),
                stray_one.count
            ),
            (Some("agent1"), Some("server"), Some("02:00:00:00:00:07"), 2)
        );
        assert_eq!(f.findings.len(), 2);
    }

    #[test]
    fn machines_silent_on_a_vlan_they_are_on() {
        let mut n = Net::default();
        n.frame(
            1_000,
            1,
            "agent1",
            eth(mac(1, "agent1"), BROADCAST, 0x86dd, &[]),
        )
        .frame(
            1_000,
            1,
            "server",
            eth(mac(1, "server"), BROADCAST, 0x86dd, &[]),
        );
        // A frame too short to parse still counts as speaking.
        n.frame(1_000, 1, "agent2", vec![1, 2, 3]);
        let f = n.findings();
        let s = one(&f, FindingKind::Silent);
        assert_eq!(
            (
                s.problem,
                s.vlan,
                s.from.as_deref(),
                s.address.as_deref(),
                s.count
            ),
            (true, 2, Some("server"), Some("192.168.2.3"), 0)
        );
        assert_eq!((s.first_ms, s.last_ms), (None, None));
        assert_eq!(
            s.cause,
            "server sent no frame on VLAN 2 in what the hub recorded: its interface there is down or not configured (or it was idle, or it does not run)."
        );
        assert_eq!(
            s.next,
            "Check server's interfaces (`drydock exec server -- ip addr`) and that it runs (`drydock ps`)."
        );
        // With a window, it says so; nothing seen: every NIC is silent.
        let f = findings(&n.seen, &machines(), Some(5_000));
        let silent: Vec<_> = of(&f, FindingKind::Silent)
            .iter()
            .map(|s| (s.vlan, s.from.clone().unwrap()))
            .collect();
        assert_eq!(
            silent,
            [
                (1, "agent1".to_string()),
                (1, "agent2".to_string()),
                (1, "server".to_string()),
                (2, "server".to_string())
            ]
        );
        assert!(f.findings[0].cause.contains("in the time asked"));
    }

    #[test]
    fn problems_first_then_most_recent_first() {
        let mut n = Net::default();
        n.frame(
            0,
            1,
            "agent1",
            eth(mac(1, "agent1"), BROADCAST, 0x86dd, &[]),
        )
        .frame(
            0,
            1,
            "agent2",
            eth(mac(1, "agent2"), BROADCAST, 0x86dd, &[]),
        )
        .tcp(1_000, 1, "agent1", "server", (1, 7000), SYN)
        .tcp(1_001, 1, "server", "agent1", (7000, 1), SYN_ACK)
        .tcp(9_000, 1, "agent2", "server", (1, 7000), SYN)
        .tcp(9_001, 1, "server", "agent2", (7000, 1), SYN_ACK)
        .tcp(2_000, 1, "agent1", "server", (2, 7001), SYN)
        .tcp(2_001, 1, "server", "agent1", (7001, 2), RST_ACK)
        .tcp(5_000, 1, "agent2", "server", (3, 6443), SYN)
        .arp(3_000, 1, "agent1", ARP_REQUEST, Ipv4Addr::new(10, 0, 2, 15))
        .tcp(4_000, 1, "agent1", "server", (4, 80), SYN)
        .tcp(4_001, 1, "server", "agent1", (80, 4), RST_ACK)
        .tcp(4_500, 1, "agent1", "server", (5, 80), SYN)
        .tcp(4_501, 1, "server", "agent1", (80, 5), SYN_ACK);
        let f = n.findings();
        let got: Vec<_> = f
            .findings
            .iter()
            .map(|x| (x.problem, x.kind, x.port, x.last_ms))
            .collect();
        use FindingKind::*;
        assert_eq!(
            got,
            [
                (true, Silent, None, None),
                (true, TcpUnanswered, Some(6443), Some(5_000)),
                (true, ArpUnanswered, None, Some(3_000)),
                (true, TcpRefused, Some(7001), Some(2_000)),
                (false, TcpAnswered, Some(7000), Some(9_000)),
                (false, TcpAnswered, Some(80), Some(4_500)),
                (false, TcpRefused, Some(80), Some(4_000)),
                (false, TcpAnswered, Some(7000), Some(1_000)),
            ]
        );
    }

    #[test]
    fn since_leaves_out_older_frames() {
        let mut n = Net::default();
        n.chatter(10_000)
            .tcp(1_000, 1, "agent1", "server", (1, 6443), SYN)
            .tcp(12_000, 1, "agent2", "server", (1, 6443), SYN)
            .tcp(12_001, 1, "server", "agent2", (6443, 1), SYN_ACK)
            // The reply to a SYN before the window: no attempt of the window.
            .tcp(12_000, 1, "server", "agent1", (6443, 1), SYN_ACK);
        let all = n.findings();
        assert_eq!(all.frames, 8);
        assert_eq!(of(&all, FindingKind::TcpAnswered).len(), 2);
        let f = findings(&n.seen, &machines(), Some(10_000));
        assert_eq!((f.frames, f.since_ms), (7, Some(10_000)));
        let answered = one(&f, FindingKind::TcpAnswered);
        assert_eq!(answered.from.as_deref(), Some("agent2"));
        assert_eq!(f.findings.len(), 1, "{:#?}", f.findings);
        assert_eq!(
            f.by_machine,
            [
                ("agent1".to_string(), 1),
                ("agent2".to_string(), 2),
                ("server".to_string(), 4)
            ]
        );
        // A port of no machine of the list is counted too.
        let mut n = Net::default();
        n.frame(1, 1, "ghost", vec![]);
        let f = n.findings();
        assert_eq!(f.by_machine.len(), 4);
        assert_eq!(f.by_machine[2], ("ghost".to_string(), 1));
    }

    #[test]
    fn frames_parse_with_bounds() {
        let a1 = mac(1, "agent1");
        let syn = ipv4(ip(1, "agent1"), ip(1, "server"), PROTO_TCP, &tcp(1, 2, SYN));
        let mut tagged = eth(a1, BROADCAST, ETH_VLAN, &[0, 5]);
        tagged.extend(ETH_IPV4.to_be_bytes());
        tagged.extend(&syn);
        let mut fragment = syn.clone();
        fragment[6..8].copy_from_slice(&[0x00, 0x10]);
        // A 24-byte header (4 bytes of options: three NOPs and the end).
        let mut options = syn.clone();
        options[0] = 0x46;
        options[2..4].copy_from_slice(&44u16.to_be_bytes());
        options.splice(20..20, [1, 1, 1, 0]);
        // The same header length on a packet without options: TCP read 4 bytes late.
        let mut late = syn.clone();
        late[0] = 0x46;
        let mut short_total = syn.clone();
        short_total[2..4].copy_from_slice(&[0, 19]);
        let mut long_total = syn.clone();
        long_total[2..4].copy_from_slice(&[0xff, 0xff]);
        let mut ihl_4 = syn.clone();
        ihl_4[0] = 0x44;
        let mut v6 = syn.clone();
        v6[0] = 0x65;
        let tcp_syn = L4::Tcp {
            sport: 1,
            dport: 2,
            flags: SYN,
        };
        let ipv4_body = |l4: L4| {
            Body::Ipv4(Ipv4 {
                src: ip(1, "agent1"),
                dst: ip(1, "server"),
                l4,
            })
        };
        let udp_hdr = udp(7, 8, b"");
        let mut arp_v6 = arp(ARP_REQUEST, a1, ip(1, "agent1"), ip(1, "server"));
        arp_v6[2..4].copy_from_slice(&[0x86, 0xdd]);
        for (name, frame, want) in [
            ("empty", vec![], None),
            ("13 bytes", vec![0; 13], None),
            (
                "header only",
                eth(a1, BROADCAST, ETH_IPV4, &[]),
                Some(Body::Other),
            ),
            ("tagged", tagged, Some(ipv4_body(tcp_syn.clone()))),
            ("tag cut", eth(a1, BROADCAST, ETH_VLAN, &[0, 5, 0x08]), None),
            (
                "first fragment",
                eth(a1, BROADCAST, ETH_IPV4, &syn),
                Some(ipv4_body(tcp_syn.clone())),
            ),
            (
                "later fragment",
                eth(a1, BROADCAST, ETH_IPV4, &fragment),
                Some(ipv4_body(L4::Other)),
            ),
            (
                "options",
                eth(a1, BROADCAST, ETH_IPV4, &options),
                Some(ipv4_body(tcp_syn.clone())),
            ),
            (
                "header length past the options",
                eth(a1, BROADCAST, ETH_IPV4, &late),
                Some(ipv4_body(L4::Tcp {
                    sport: 0,
                    dport: 0,
                    flags: 0,
                })),
            ),
            (
                "total < header",
                eth(a1, BROADCAST, ETH_IPV4, &short_total),
                Some(Body::Other),
            ),
            (
                "total > frame",
                eth(a1, BROADCAST, ETH_IPV4, &long_total),
                Some(ipv4_body(tcp_syn)),
            ),
            (
                "ihl 4",
                eth(a1, BROADCAST, ETH_IPV4, &ihl_4),
                Some(Body::Other),
            ),
            (
                "version 6",
                eth(a1, BROADCAST, ETH_IPV4, &v6),
                Some(Body::Other),
            ),
            (
                "tcp cut before flags",
                eth(
                    a1,
                    BROADCAST,
                    ETH_IPV4,
                    &ipv4(ip(1, "agent1"), ip(1, "server"), PROTO_TCP, &[0; 13]),
                ),
                Some(ipv4_body(L4::Other)),
            ),
            (
                "udp cut",
                eth(
                    a1,
                    BROADCAST,
                    ETH_IPV4,
                    &ipv4(ip(1, "agent1"), ip(1, "server"), PROTO_UDP, &udp_hdr[..7]),
                ),
                Some(ipv4_body(L4::Other)),
            ),
            (
                "icmp without the original's ports",
                eth(
                    a1,
                    BROADCAST,
                    ETH_IPV4,
                    &ipv4(
                        ip(1, "agent1"),
                        ip(1, "server"),
                        PROTO_ICMP,
                        &icmp_unreachable(3, &syn[..22]),
                    ),
                ),
                Some(ipv4_body(L4::Other)),
            ),
            (
                "icmp echo",
                eth(
                    a1,
                    BROADCAST,
                    ETH_IPV4,
                    &ipv4(
                        ip(1, "agent1"),
                        ip(1, "server"),
                        PROTO_ICMP,
                        &[8, 0, 0, 0, 0, 0, 0, 0],
                    ),
                ),
                Some(ipv4_body(L4::Other)),
            ),
            (
                "arp cut",
                eth(
                    a1,
                    BROADCAST,
                    ETH_ARP,
                    &arp(ARP_REQUEST, a1, ip(1, "agent1"), ip(1, "server"))[..27],
                ),
                Some(Body::Other),
            ),
            (
                "arp of IPv6",
                eth(a1, BROADCAST, ETH_ARP, &arp_v6),
                Some(Body::Other),
            ),
        ] {
            let got = parse_frame(&frame).map(|f| f.body);
            assert_eq!(got, want, "{name}");
        }
    }

    /// Every prefix and many corruptions of every kind of frame, and noise: never a panic,
    /// every frame counted.
    #[test]
    fn garbage_and_truncated_frames_never_panic() {
        let a1 = mac(1, "agent1");
        let syn = ipv4(ip(1, "agent1"), ip(1, "server"), PROTO_TCP, &tcp(1, 2, SYN));
        let dgram = ipv4(
            ip(1, "agent1"),
            ip(1, "server"),
            PROTO_UDP,
            &udp(1, 2, b"x"),
        );
        let kinds = [
            eth(
                a1,
                BROADCAST,
                ETH_ARP,
                &arp(ARP_REQUEST, a1, ip(1, "agent1"), ip(1, "server")),
            ),
            eth(a1, BROADCAST, ETH_IPV4, &syn),
            eth(a1, BROADCAST, ETH_IPV4, &dgram),
            eth(
                a1,
                BROADCAST,
                ETH_IPV4,
                &ipv4(
                    ip(1, "server"),
                    ip(1, "agent1"),
                    PROTO_ICMP,
                    &icmp_unreachable(3, &dgram),
                ),
            ),
            eth(
                a1,
                BROADCAST,
                ETH_IPV4,
                &ipv4(
                    ip(1, "server"),
                    ip(1, "agent1"),
                    PROTO_ICMP,
                    &icmp_unreachable(3, &syn),
                ),
            ),
        ];
        let mut n = Net::default();
        let mut at = 0;
        for k in &kinds {
            for cut in 0..=k.len() {
                at += 1;
                n.frame(at, 1, "agent1", k[..cut].to_vec());
            }
            // Each byte replaced by a few values that matter (0, 0xff, 4, 5, 0x45).
            for i in 0..k.len() {
                for b in [0, 0xff, 4, 5, 0x45, 0x0f] {
                    let mut c = k.clone();
                    c[i] = b;
                    at += 1;
                    n.frame(at, 1 + (i % 2) as u8, "server", c);
                }
            }
        }
        // Noise, from a small generator (deterministic), with a known EtherType now and then.
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for i in 0..3_000u64 {
            let len = (next() % 140) as usize;
            let mut f: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if f.len() >= 15 {
                let t = [ETH_ARP, ETH_IPV4, ETH_VLAN, 0][(i % 4) as usize];
                if t != 0 {
                    f[12..14].copy_from_slice(&t.to_be_bytes());
                }
                if i % 3 == 0 {
                    f[14] = 0x45;
                }
            }
            n.frame(
                next() % 10_000,
                (next() % 3) as u8,
                ["agent1", "agent2", "server", "x"][(i % 4) as usize],
                f,
            );
        }
        for s in &n.seen {
            let _ = parse_frame(&s.head);
        }
        let f = n.findings();
        assert_eq!(f.frames, n.seen.len() as u64);
        let text = render(&f, 20_000);
        assert!(!text.chars().any(|c| c.is_control() && c != '\n'), "{text}");
    }

    #[test]
    fn text_for_a_terminal() {
        let mut n = Net::default();
        n.chatter(0)
            .tcp(61_000, 1, "agent1", "server", (40_000, 7000), SYN)
            .tcp(61_001, 1, "server", "agent1", (7000, 40_000), SYN_ACK)
            .tcp(70_000, 1, "agent2", "server", (50_000, 6443), SYN)
            .tcp(110_000, 1, "agent2", "server", (50_002, 6443), SYN)
            .arp(
                100_000,
                1,
                "agent1",
                ARP_REQUEST,
                Ipv4Addr::new(10, 0, 2, 15),
            );
        let f = findings(&n.seen, &machines(), Some(0));
        let text = render(&f, 120_000);
        let want = "\
9 frames since 2m ago (agent1 3, agent2 3, server 3)

VLAN 1 · tcp unanswered: agent2 → server (192.168.1.3) port 6443: connections unanswered
  2 connection attempts, first 50s ago, last 10s ago
  cause: server's firewall drops them, or server does not have 192.168.1.3 or a route back.
  next:  Allow the port in server's firewall (NixOS: `networking.firewall.allowedTCPPorts = [ 6443 ];`), or check that server has the address (`drydock exec server -- ip addr`).

VLAN 1 · arp unanswered: agent1 asks who has 10.0.2.15: nobody answers
  1 request, 20s ago
  cause: Nobody has 10.0.2.15 on VLAN 1: it is in QEMU's user-mode network (10.0.2.0/24, each machine's own eth0 in a NixOS test), not in the cluster's networks (192.168.1.0/24, 192.168.2.0/24), so agent1 was given the address of the wrong interface.
  next:  Point agent1 at the address of the machine meant (192.168.1.N on VLAN 1, the names in /etc/hosts); if a service advertised 10.0.2.15, make it use its VLAN interface's address.

Connections answered:
  VLAN  FROM    TO      PORT  ATTEMPTS  LAST
  1     agent1  server  7000  1         59s ago
";
        assert_eq!(text, want, "\n{text}");
        // Nothing wrong.
        let mut n = Net::default();
        n.chatter(0);
        assert_eq!(
            render(&n.findings(), 1_000),
            "4 frames in the hubs' record (agent1 1, agent2 1, server 2)\n\nNo problems found.\n"
        );
        // Overcome refusals have their own heading.
        let mut n = Net::default();
        n.chatter(0)
            .tcp(1_000, 1, "agent1", "server", (1, 80), SYN)
            .tcp(1_001, 1, "server", "agent1", (80, 1), RST_ACK)
            .tcp(2_000, 1, "agent1", "server", (2, 80), SYN)
            .tcp(2_001, 1, "server", "agent1", (80, 2), SYN_ACK);
        let text = render(&n.findings(), 3_000);
        assert!(
            text.contains("No problems found.\n\nOvercome (later attempts were answered):\n\nVLAN 1 · tcp refused: agent1 → server (192.168.1.3) port 80: connections refused\n"),
            "{text}"
        );
    }

    #[test]
    fn json_names_kinds_in_snake_case() {
        let mut n = Net::default();
        n.arp(1, 1, "agent1", ARP_REQUEST, Ipv4Addr::new(10, 0, 2, 15));
        let f = findings(&n.seen, &machines(), None);
        let v = serde_json::to_value(&f).unwrap();
        let kinds: Vec<&str> = v["findings"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["kind"].as_str().unwrap())
            .collect();
        assert_eq!(kinds, ["silent", "silent", "silent", "arp_unanswered"]);
        assert_eq!(v["by_machine"][0], serde_json::json!(["agent1", 1]));
        let back: NetFindings = serde_json::from_value(v).unwrap();
        assert_eq!(back, f);
        for k in [
            FindingKind::TcpAnswered,
            FindingKind::TcpRefused,
            FindingKind::TcpUnanswered,
            FindingKind::UdpUnreachable,
            FindingKind::ArpUnanswered,
            FindingKind::OutsideAddress,
            FindingKind::DuplicateMac,
            FindingKind::Silent,
            FindingKind::BroadcastFlood,
        ] {
            assert_eq!(serde_json::to_value(k).unwrap(), k.name());
        }
    }

    #[test]
    fn a_flood_is_a_problem_naming_the_machine_within_the_time_asked() {
        let flood = |machine: &str, first_ms, last_ms| Flood {
            vlan: 1,
            machine: machine.to_string(),
            dropped: 18_841,
            first_ms,
            last_ms,
            limit: 1000,
        };
        let mut n = Net::default();
        n.arp(1, 1, "agent1", ARP_REQUEST, Ipv4Addr::new(10, 0, 2, 15));
        for (since, floods, want) in [
            (None, vec![], vec![]),
            (None, vec![flood("agent2", 1_000, 9_000)], vec!["agent2"]),
            // Asked since 5 s: a flood that ended before is left out, one still going is not.
            (
                Some(5_000),
                vec![flood("agent2", 1_000, 4_000), flood("server", 1_000, 6_000)],
                vec!["server"],
            ),
        ] {
            let mut f = findings(&n.seen, &machines(), since);
            let before = f.findings.len();
            add_floods(&mut f, &floods);
            let got: Vec<&str> = f
                .findings
                .iter()
                .filter(|x| x.kind == FindingKind::BroadcastFlood)
                .map(|x| x.from.as_deref().unwrap())
                .collect();
            assert_eq!(got, want, "since {since:?}");
            assert_eq!(f.findings.len(), before + want.len());
        }
        let mut f = findings(&[], &machines(), None);
        add_floods(&mut f, &[flood("agent2", 1_000, 9_000)]);
        let x = f
            .findings
            .iter()
            .find(|x| x.kind == FindingKind::BroadcastFlood)
            .unwrap();
        assert_eq!((x.count, x.vlan, x.problem), (18_841, 1, true));
        assert!(x.cause.contains("1000 a second"), "{}", x.cause);
        assert!(
            x.next.contains("drydock net capture agent2 --vlan 1"),
            "{}",
            x.next
        );
        let text = render(&f, 10_000);
        assert!(
            text.contains("broadcast flood: agent2 floods the segment"),
            "{text}"
        );
        assert!(
            text.contains("18841 dropped frames, first 9s ago, last 1s ago"),
            "{text}"
        );
    }
}
