//! A private layer-2 segment: a hub (like `vde_switch --hub`) on one unix datagram socket.
//! Each VM's NIC is a QEMU `-netdev dgram` whose local socket is one of the hub's ports; every
//! frame the hub receives from a port goes to every other port, unchanged. Frames from a socket
//! that is not a port are dropped, and so is a copy for a port that is not there yet. No root,
//! no tap, nothing on the host's network.
//!
//! **Egress queues.** The kernel holds only `net.unix.max_dgram_qlen` (10) datagrams on a
//! QEMU's socket, so a copy often finds it full for a moment. Each port's copies therefore go
//! out through a socket of the hub's connected to that port, whose `POLLOUT` says when the
//! port's queue has room: a copy that finds the port full waits in the port's queue (at most
//! [`EGRESS_QUEUE_BYTES`]; beyond that it is dropped, counted) and the forwarding thread sends
//! it when the port can take it, while it goes on forwarding the others' frames: no port can
//! stall the others, and TCP between two machines does not lose a segment to a momentary full
//! queue. Faults and the freeze are checked again when a waiting copy goes.
//!
//! One thread per hub forwards, blocking on its one socket (and its stop): a hub is a single
//! file descriptor with one reader, so an async runtime would add nothing but a dependency (see
//! docs/ARCHITECTURE.md). A second thread, the shaper, sends the frames that are delayed (see
//! below). Both belong to the process that owns the cluster and die with it, SIGKILL included.
//! A hot reload that adds, removes or rewires machines replaces the port list in place
//! ([`Hub::set_ports`]): the machines that stay keep their segment without a gap.
//!
//! **Faults.** A hub's faults are one value, [`HubFaults`], replaced at once by
//! [`Hub::set_faults`] (between two frames): blocked ports (a pulled cable: a blocked port's
//! frames and the copies for it are dropped; [`Hub::set_blocked`] changes just that set, as a
//! test script's `machine.block()` does), a partition (groups of ports: a frame crosses from one
//! port to another only if both are in one group, or either is in none) and shaped ports (the
//! frames leaving them are delayed, lost or paced: [`Shape`], see the `shaper` module). Which
//! ports a frame's copies go to is decided when it arrives; a delayed frame is held by the
//! shaper thread (a bounded queue by due time) and sent at its time, so it never blocks
//! forwarding. Faults name ports that need not be in the list (yet): they outlive a new port
//! list. A hub can also be frozen ([`Hub::set_frozen`], while a snapshot pauses the cluster's
//! machines one after the other): every frame is dropped, including held ones that fall due,
//! so none crosses the segment between the first machine's pause and the last one's, and the
//! machines' saved states agree about what was sent.
//!
//! **Storm control.** A port sends broadcast and multicast frames (the destination's group bit
//! set) at most [`STORM_FRAMES_PER_SEC`] a second, with a second's worth as a burst (a token
//! bucket per port); the hub drops the rest, counts them per port ([`Hub::storms`]) and does not
//! record them in the ring, so that a guest flooding the segment neither fills every other
//! port's queue with its copies (the others' frames would be dropped there) nor pushes the
//! record of everything else out of the ring. Taps still get them (what the machine sent). ARP,
//! DHCP and neighbour discovery stay far below the limit.
//!
//! **Recent frames.** Every frame received from a port is recorded (time, sender, length and
//! its first [`HEAD_BYTES`] bytes), blocked and partitioned ones too (analysis wants attempts),
//! except while frozen, in a ring of at most [`RING_BYTES`] per hub: each record is counted as
//! its fixed size plus its sender's path, and the oldest go first. The ring's storage is
//! reserved once, so recording allocates nothing per frame. [`Hub::recent`] copies it out.
//! [`Hub::set_recording`] turns it off (to measure what it costs).
//!
//! **Taps.** [`Hub::add_tap`] streams pcap (see the `pcap` module) to a unix stream: the frames
//! from the tapped ports as they arrive (including blocked ones: what the machine sent), and
//! the copies delivered to them from other ports as they are sent (after any delay). Each frame
//! is written once per tap, without blocking: a reader too slow to take a record loses it
//! (`tap_dropped`; a record begun is always finished first, so the stream stays whole), and a
//! reader that has gone removes its tap at the next frame for it, or when a tap is added or the
//! taps are counted ([`Hub::tap_count`]).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime};

use drydock_vm::{WakeFd, Waker};

use crate::pcap;
pub use crate::shaper::Shape;
use crate::shaper::{Link, Rng, SHAPE_QUEUE_BYTES, Shaper, Verdict};

/// A frame is at most a jumbo Ethernet frame; QEMU sends one per datagram.
const MAX_FRAME: usize = 65_536;
/// The pause after a failed receive, so that an error that persists does not spin the thread.
const ERROR_BACKOFF: Duration = Duration::from_millis(100);
/// How many of a frame's first bytes the ring keeps (Ethernet, IP and TCP headers fit).
pub const HEAD_BYTES: usize = 128;
/// The most memory a hub's ring of recent frames takes (see [`FrameRecord`]).
pub const RING_BYTES: usize = 4 << 20;

/// The most a port's queue of copies waiting for room holds (frames counted with their
/// sender's path); see the module's "egress queues".
pub const EGRESS_QUEUE_BYTES: usize = 256 << 10;

/// The broadcast and multicast frames a port may send per second (and as a burst); see the
/// module's "storm control".
pub const STORM_FRAMES_PER_SEC: u32 = 1000;

/// Why a hub could not start.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("cannot bind the hub socket of VLAN {vlan} at {}", path.display())]
    Bind {
        vlan: u8,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the hub thread of VLAN {vlan}")]
    Thread {
        vlan: u8,
        #[source]
        source: std::io::Error,
    },
}

/// What a hub did.
#[derive(Debug, Default)]
pub struct HubCounters {
    /// Frames received from a port (and not blocked).
    pub frames: AtomicU64,
    /// Copies delivered to other ports.
    pub delivered: AtomicU64,
    /// Copies dropped (port absent, or its queue of waiting copies full) and frames from
    /// strangers.
    pub dropped: AtomicU64,
    /// Copies that found their port full and waited in its queue (then sent, or dropped by a
    /// fault, the freeze or the port's going, counted there).
    pub queued: AtomicU64,
    /// Frames from a blocked port and copies for one, dropped.
    pub blocked: AtomicU64,
    /// Copies dropped by the partition (sender and receiver in different groups).
    pub partitioned: AtomicU64,
    /// Frames lost by their port's shape (its `loss`).
    pub lost: AtomicU64,
    /// Shaped frames dropped because a queue was full (their link's or the hub's).
    pub shaped_dropped: AtomicU64,
    /// Shaped frames held for later delivery.
    pub delayed: AtomicU64,
    /// Frames dropped while the hub was frozen (a snapshot's cut), held ones included.
    pub frozen: AtomicU64,
    /// Records a tap's reader was too slow to take.
    pub tap_dropped: AtomicU64,
    /// Broadcast and multicast frames over a port's limit (storm control), dropped.
    pub storm_dropped: AtomicU64,
}

/// The broadcast and multicast frames storm control dropped from one port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Storm {
    pub dropped: u64,
    /// When the first and the last of them arrived.
    pub first: SystemTime,
    pub last: SystemTime,
}

/// A port's allowance of broadcast and multicast frames: [`STORM_FRAMES_PER_SEC`] tokens a
/// second, at most that many saved.
#[derive(Debug, Clone, Copy)]
struct Allowance {
    tokens: f64,
    at: Instant,
}

impl Allowance {
    fn full(now: Instant) -> Self {
        Self {
            tokens: f64::from(STORM_FRAMES_PER_SEC),
            at: now,
        }
    }

    /// Take a token for a frame at `now`, if there is one.
    fn take(&mut self, now: Instant) -> bool {
        let rate = f64::from(STORM_FRAMES_PER_SEC);
        let earned = now.saturating_duration_since(self.at).as_secs_f64() * rate;
        self.tokens = (self.tokens + earned).min(rate);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Whether a frame goes to a group of stations (broadcast or multicast): the first bit sent of
/// its destination MAC.
fn to_group(frame: &[u8]) -> bool {
    frame.first().is_some_and(|b| b & 1 == 1)
}

/// A hub's faults, set as one value ([`Hub::set_faults`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HubFaults {
    /// Ports whose frames, and the copies for them, are dropped (a pulled cable).
    pub blocked: BTreeSet<PathBuf>,
    /// A partition: a frame from port s reaches port d only if s and d are in the same group,
    /// or either is in no group (ports not named keep their links).
    pub groups: Vec<BTreeSet<PathBuf>>,
    /// Frames leaving these ports are delayed (delay ± uniform jitter), lost with probability
    /// `loss`, and paced to `rate` (a token bucket; frames over a bounded queue are dropped,
    /// counted).
    pub shaped: BTreeMap<PathBuf, Shape>,
}

impl HubFaults {
    /// No fault at all.
    pub fn is_empty(&self) -> bool {
        self.blocked.is_empty() && self.groups.is_empty() && self.shaped.is_empty()
    }

    /// Whether the partition lets a frame from `from` reach `to`.
    pub fn linked(&self, from: &Path, to: &Path) -> bool {
        let mut from_grouped = false;
        let mut to_grouped = false;
        for g in &self.groups {
            let (f, t) = (g.contains(from), g.contains(to));
            if f && t {
                return true;
            }
            from_grouped |= f;
            to_grouped |= t;
        }
        !(from_grouped && to_grouped)
    }
}

/// A frame the hub received from a port, as its ring of recent frames keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameRecord {
    /// When it arrived, in ms since the epoch.
    pub at_ms: u64,
    /// The port it came from.
    pub from: PathBuf,
    /// Its length.
    pub len: u32,
    /// Its first [`HEAD_BYTES`] bytes (all of it if shorter).
    pub head: Vec<u8>,
}

/// A ring record: fixed size, the sender's path shared with the port list (nothing allocated).
#[derive(Clone)]
struct Rec {
    at_ms: u64,
    from: Arc<Path>,
    len: u32,
    head_len: u8,
    head: [u8; HEAD_BYTES],
}

impl Rec {
    fn of(at: SystemTime, from: &Arc<Path>, frame: &[u8]) -> Self {
        let head_len = frame.len().min(HEAD_BYTES);
        let mut head = [0u8; HEAD_BYTES];
        head[..head_len].copy_from_slice(&frame[..head_len]);
        Self {
            at_ms: epoch_ms(at),
            from: from.clone(),
            len: u32::try_from(frame.len()).unwrap_or(u32::MAX),
            head_len: head_len as u8,
            head,
        }
    }

    /// What it is counted as: its fixed size and its sender's path (counted for each record,
    /// although records share it).
    fn cost(&self) -> usize {
        std::mem::size_of::<Self>() + self.from.as_os_str().len()
    }

    fn to_record(&self) -> FrameRecord {
        FrameRecord {
            at_ms: self.at_ms,
            from: self.from.to_path_buf(),
            len: self.len,
            head: self.head[..self.head_len as usize].to_vec(),
        }
    }
}

pub(crate) fn epoch_ms(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The recent frames, at most `cap` bytes counted (see [`Rec::cost`]), in storage reserved once
/// for as many records as fit.
struct Ring {
    recs: VecDeque<Rec>,
    bytes: usize,
    cap: usize,
    most: usize,
}

impl Ring {
    fn new(cap: usize) -> Self {
        let most = cap / std::mem::size_of::<Rec>();
        Self {
            recs: VecDeque::with_capacity(most),
            bytes: 0,
            cap,
            most,
        }
    }

    fn push(&mut self, rec: Rec) {
        let cost = rec.cost();
        while self.recs.len() >= self.most || self.bytes + cost > self.cap {
            match self.recs.pop_front() {
                Some(old) => self.bytes -= old.cost(),
                None => return,
            }
        }
        self.bytes += cost;
        self.recs.push_back(rec);
    }
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("records", &self.recs.len())
            .field("bytes", &self.bytes)
            .field("cap", &self.cap)
            .finish()
    }
}

/// A live capture: pcap to a unix stream.
#[derive(Debug)]
struct Tap {
    out: UnixStream,
    /// Which ports' frames (from and to them); `None`: all.
    ports: Option<BTreeSet<PathBuf>>,
    /// The rest of a record begun (written before anything else), and how much of it is sent.
    pending: Vec<u8>,
    sent: usize,
}

/// What became of a record offered to a tap.
enum Offered {
    Written,
    Dropped,
    Closed,
}

impl Tap {
    /// Whether its reader has gone: the stream is readable and reading finds its end (or an
    /// error). What a reader sends is not part of the protocol and is discarded.
    fn gone(&self) -> bool {
        if !drydock_vm::readable_now(self.out.as_fd()) {
            return false;
        }
        let mut discard = [0u8; 256];
        match std::io::Read::read(&mut &self.out, &mut discard) {
            Ok(n) => n == 0,
            Err(e) => !crate::wire::try_again(&e),
        }
    }

    fn wants(&self, port: &Path) -> bool {
        self.ports.as_ref().is_none_or(|s| s.contains(port))
    }

    /// Send what is pending: whether all of it went.
    fn flush(&mut self) -> std::io::Result<bool> {
        while self.sent < self.pending.len() {
            match crate::sys::send_nowait(&self.out, &self.pending[self.sent..]) {
                Ok(0) => return Ok(false),
                Ok(n) => self.sent += n,
                Err(e) if crate::wire::try_again(&e) => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        self.pending.clear();
        self.sent = 0;
        Ok(true)
    }

    fn offer(&mut self, record: &[u8]) -> Offered {
        match self.flush() {
            Err(_) => return Offered::Closed,
            Ok(false) => return Offered::Dropped,
            Ok(true) => {}
        }
        match crate::sys::send_nowait(&self.out, record) {
            Ok(0) => Offered::Dropped,
            Ok(n) => {
                if n < record.len() {
                    self.pending.extend_from_slice(&record[n..]);
                }
                Offered::Written
            }
            Err(e) if crate::wire::try_again(&e) => Offered::Dropped,
            Err(_) => Offered::Closed,
        }
    }
}

/// The ports a hub forwards among and what it does to their frames.
#[derive(Debug, Default)]
struct State {
    list: Vec<Arc<Path>>,
    /// Bumped by each new port list: the forwarding thread then forgets the ports that left.
    ports_generation: u64,
    faults: HubFaults,
    /// Bumped by each change of the faults: the forwarding thread then drops its links whose
    /// shape is gone or changed.
    generation: u64,
    /// Every frame is dropped (see [`Hub::set_frozen`]).
    frozen: bool,
    /// Frames go to the ring (see [`Hub::set_recording`]).
    recording: bool,
}

/// What a hub's threads and its handle share.
#[derive(Debug)]
struct Shared {
    state: RwLock<State>,
    ring: Mutex<Ring>,
    taps: Mutex<Vec<Tap>>,
    /// How many taps there are, read without the lock for each frame.
    tap_count: AtomicUsize,
    counters: HubCounters,
    /// What storm control dropped, per port (touched only for a dropped frame).
    storms: Mutex<BTreeMap<Arc<Path>, Storm>>,
}

impl Shared {
    fn state(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn state_mut(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn taps(&self) -> std::sync::MutexGuard<'_, Vec<Tap>> {
        self.taps.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The taps, without those whose reader has gone (seen without a frame to write).
    fn prune_taps(&self) -> std::sync::MutexGuard<'_, Vec<Tap>> {
        let mut taps = self.taps();
        taps.retain(|t| !t.gone());
        self.tap_count.store(taps.len(), Ordering::Relaxed);
        taps
    }

    /// Write `frame` (seen at `at`) to each tap `wants` picks; a closed tap goes.
    fn to_taps(&self, at: SystemTime, frame: &[u8], wants: impl Fn(&Tap) -> bool) {
        let mut taps = self.taps();
        let mut record = None;
        taps.retain_mut(|t| {
            if !wants(t) {
                return true;
            }
            let r = record.get_or_insert_with(|| pcap::record(at, frame));
            match t.offer(r) {
                Offered::Written => true,
                Offered::Dropped => {
                    self.counters.tap_dropped.fetch_add(1, Ordering::Relaxed);
                    true
                }
                Offered::Closed => false,
            }
        });
        self.tap_count.store(taps.len(), Ordering::Relaxed);
    }

    /// Write the copies of a frame from `from` delivered to `to` to the taps that want one of
    /// those and have not had the frame as `from`'s.
    fn delivered_to_taps(&self, at: SystemTime, frame: &[u8], from: &Path, to: &[&Arc<Path>]) {
        if to.is_empty() {
            return;
        }
        self.to_taps(at, frame, |t| {
            !t.wants(from) && to.iter().any(|p| t.wants(p))
        });
    }
}

/// A frame held by the shaper: its bytes, its sender and the ports its copies go to.
#[derive(Debug)]
struct Delayed {
    frame: Vec<u8>,
    from: Arc<Path>,
    to: Vec<Arc<Path>>,
}

impl Delayed {
    /// What it owns, counted in the shaper's queue (which adds its own place there).
    fn cost(&self) -> usize {
        self.frame.len()
            + self
                .to
                .iter()
                .map(|p| std::mem::size_of::<Arc<Path>>() + p.as_os_str().len())
                .sum::<usize>()
    }
}

/// A running hub; stopped (threads joined, socket removed) by [`Hub::stop`] or on drop.
#[derive(Debug)]
pub struct Hub {
    vlan: u8,
    socket: PathBuf,
    stop: Waker,
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Hub {
    /// Bind `socket` (a stale file there is replaced) and forward frames among `ports`.
    pub fn start(vlan: u8, socket: &Path, ports: Vec<PathBuf>) -> Result<Self, HubError> {
        let bind = |source| HubError::Bind {
            vlan,
            path: socket.to_path_buf(),
            source,
        };
        if let Some(dir) = socket.parent() {
            drydock_gc::private_dir(dir).map_err(|e| bind(std::io::Error::other(e)))?;
        }
        let sock = Arc::new(drydock_gc::bind_datagram(socket).map_err(bind)?);
        let (stop, stopped) = drydock_vm::wake_pair().map_err(bind)?;
        let shared = Arc::new(Shared {
            state: RwLock::new(State {
                list: ports.into_iter().map(Arc::from).collect(),
                recording: true,
                ..State::default()
            }),
            ring: Mutex::new(Ring::new(RING_BYTES)),
            taps: Mutex::new(Vec::new()),
            tap_count: AtomicUsize::new(0),
            counters: HubCounters::default(),
            storms: Mutex::new(BTreeMap::new()),
        });
        let thread_error = |source| HubError::Thread { vlan, source };
        let shaper = Shaper::start(format!("hub-vlan{vlan}-shaper"), SHAPE_QUEUE_BYTES, {
            let (shared, sock) = (shared.clone(), sock.clone());
            move |d: Delayed| deliver_delayed(&sock, &shared, d)
        })
        .map_err(thread_error)?;
        let thread = std::thread::Builder::new()
            .name(format!("hub-vlan{vlan}"))
            .spawn({
                let shared = shared.clone();
                // The shaper is the forwarding thread's: it stops (and is joined) when that ends.
                move || Forwarder::new(&sock, &shared, shaper).run(&stopped)
            })
            .map_err(thread_error)?;
        tracing::debug!(vlan, socket = %socket.display(), "hub started");
        Ok(Self {
            vlan,
            socket: socket.to_path_buf(),
            stop,
            shared,
            thread: Some(thread),
        })
    }

    pub fn vlan(&self) -> u8 {
        self.vlan
    }

    pub fn counters(&self) -> &HubCounters {
        &self.shared.counters
    }

    /// Forward among `ports` from now on (frames from a port no longer listed are dropped).
    pub fn set_ports(&self, ports: Vec<PathBuf>) {
        let mut s = self.shared.state_mut();
        s.list = ports.into_iter().map(Arc::from).collect();
        s.ports_generation += 1;
    }

    /// Replace the hub's faults, from the next frame on (frames already held by the shaper
    /// keep the ports they were going to).
    pub fn set_faults(&self, faults: HubFaults) {
        let mut s = self.shared.state_mut();
        s.faults = faults;
        s.generation += 1;
    }

    /// The faults in force.
    pub fn faults(&self) -> HubFaults {
        self.shared.state().faults.clone()
    }

    /// Block the port `port` (drop its frames and the copies for it) or unblock it, from the
    /// next frame on: the faults' `blocked` set, the rest unchanged. A port that is not (yet) in
    /// the list keeps its mark.
    pub fn set_blocked(&self, port: &Path, blocked: bool) {
        let mut s = self.shared.state_mut();
        match blocked {
            true => s.faults.blocked.insert(port.to_path_buf()),
            false => s.faults.blocked.remove(port),
        };
        s.generation += 1;
    }

    /// Drop every frame from now on (`true`), or forward again. Once this returns, no frame the
    /// hub had not begun to forward crosses it, held ones included (forwarding and the
    /// shaper's sends hold the state's read lock for each frame; this takes its write lock).
    pub fn set_frozen(&self, frozen: bool) {
        self.shared.state_mut().frozen = frozen;
    }

    /// Record frames in the ring of recent frames (the default), or not (what is recorded
    /// stays).
    pub fn set_recording(&self, on: bool) {
        self.shared.state_mut().recording = on;
    }

    /// The broadcast and multicast frames storm control dropped, per port (since the hub
    /// started).
    pub fn storms(&self) -> Vec<(PathBuf, Storm)> {
        self.shared
            .storms
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(p, s)| (p.to_path_buf(), *s))
            .collect()
    }

    /// The recent frames the ring holds, oldest first.
    pub fn recent(&self) -> Vec<FrameRecord> {
        // Copied out under the lock (fixed-size records), converted without it.
        let recs: Vec<Rec> = {
            let ring = self
                .shared
                .ring
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            ring.recs.iter().cloned().collect()
        };
        recs.iter().map(Rec::to_record).collect()
    }

    /// Start a live capture to `out`: the pcap global header now, then a record for each frame
    /// from or to one of `ports` (all if `None`), until its reader goes. An error: the header
    /// could not be written.
    pub fn add_tap(
        &self,
        out: UnixStream,
        ports: Option<BTreeSet<PathBuf>>,
    ) -> std::io::Result<()> {
        let mut tap = Tap {
            out,
            ports,
            pending: pcap::global_header().to_vec(),
            sent: 0,
        };
        // An empty stream takes 24 bytes; if not, the rest goes before the first record.
        tap.flush()?;
        let mut taps = self.shared.prune_taps();
        taps.push(tap);
        self.shared.tap_count.store(taps.len(), Ordering::Relaxed);
        Ok(())
    }

    /// How many taps are live. A tap whose reader has gone is removed at the next frame
    /// offered to it, and here.
    pub fn tap_count(&self) -> usize {
        self.shared.prune_taps().len()
    }

    /// The ports it forwards among.
    #[cfg(test)]
    pub fn ports(&self) -> Vec<PathBuf> {
        self.shared
            .state()
            .list
            .iter()
            .map(|p| p.to_path_buf())
            .collect()
    }

    /// The ring's records, the bytes they are counted as, and the records its storage holds.
    #[cfg(test)]
    fn ring_usage(&self) -> (usize, usize, usize) {
        let ring = self
            .shared
            .ring
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        (ring.recs.len(), ring.bytes, ring.recs.capacity())
    }

    /// Stop forwarding, join the threads (they wake at once; held frames are dropped) and
    /// remove the socket. Idempotent.
    pub fn stop(&mut self) {
        self.stop.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
            let _ = std::fs::remove_file(&self.socket);
        }
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The forwarding thread's own state: the buffers it reuses, the shaped links, the generator.
struct Forwarder<'a> {
    sock: &'a UnixDatagram,
    shared: &'a Shared,
    shaper: Shaper<Delayed>,
    links: BTreeMap<PathBuf, Link>,
    generation: u64,
    rng: Rng,
    /// The destinations of the current frame (indices into the port list).
    dests: Vec<usize>,
    /// Each port's allowance of broadcast and multicast frames (storm control).
    allowances: BTreeMap<Arc<Path>, Allowance>,
    /// Each port's way out and the copies waiting for room there.
    egress: BTreeMap<Arc<Path>, Egress>,
    /// The port list's generation the egress map was last pruned at.
    ports_generation: u64,
}

/// A copy waiting for room at its port: the frame and the port it came from.
#[derive(Debug)]
struct Waiting {
    frame: Vec<u8>,
    from: Arc<Path>,
}

impl Waiting {
    fn cost(&self) -> usize {
        self.frame.len() + std::mem::size_of::<Self>() + self.from.as_os_str().len()
    }
}

/// A port's way out: a socket connected to it (absent until the port is there), and the copies
/// waiting for room, oldest first.
#[derive(Debug, Default)]
struct Egress {
    sock: Option<UnixDatagram>,
    queue: VecDeque<Waiting>,
    bytes: usize,
}

/// What became of a copy offered to a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sent {
    Now,
    Queued,
    Dropped,
}

impl Egress {
    /// The socket to `port`, connected now if it is not yet (the port's VM may not be up).
    fn sock(&mut self, port: &Path) -> Option<&UnixDatagram> {
        if self.sock.is_none() {
            let s = UnixDatagram::unbound().ok()?;
            s.connect(port).ok()?;
            s.set_nonblocking(true).ok()?;
            self.sock = Some(s);
        }
        self.sock.as_ref()
    }

    /// Send `frame` now; `Err(true)`: the port is full, `Err(false)`: it is gone (its socket is
    /// forgotten, so the next copy connects again: a VM restarted binds its port anew).
    fn send(&mut self, port: &Path, frame: &[u8]) -> Result<(), bool> {
        for _ in 0..2 {
            let Some(sock) = self.sock(port) else {
                return Err(false);
            };
            match sock.send(frame) {
                Ok(_) => return Ok(()),
                Err(e) if crate::wire::try_again(&e) => return Err(true),
                // The socket connected to is gone: connect again once.
                Err(_) => self.sock = None,
            }
        }
        Err(false)
    }

    /// Offer a copy of `frame` from `from`: sent now if the port has room and nothing waits
    /// before it, else queued, or dropped when the queue is full or the port is gone.
    fn offer(&mut self, port: &Path, frame: &[u8], from: &Arc<Path>) -> Sent {
        if self.queue.is_empty() {
            match self.send(port, frame) {
                Ok(()) => return Sent::Now,
                Err(false) => return Sent::Dropped,
                Err(true) => {}
            }
        }
        let w = Waiting {
            frame: frame.to_vec(),
            from: from.clone(),
        };
        if self.bytes + w.cost() > EGRESS_QUEUE_BYTES {
            return Sent::Dropped;
        }
        self.bytes += w.cost();
        self.queue.push_back(w);
        Sent::Queued
    }

    /// Drop every waiting copy; how many there were.
    fn clear(&mut self) -> u64 {
        let n = self.queue.len() as u64;
        self.queue.clear();
        self.bytes = 0;
        n
    }
}

impl<'a> Forwarder<'a> {
    fn new(sock: &'a UnixDatagram, shared: &'a Shared, shaper: Shaper<Delayed>) -> Self {
        Self {
            sock,
            shared,
            shaper,
            links: BTreeMap::new(),
            generation: 0,
            rng: Rng::seeded(),
            dests: Vec::new(),
            allowances: BTreeMap::new(),
            egress: BTreeMap::new(),
            ports_generation: 0,
        }
    }

    fn run(mut self, stop: &WakeFd) {
        let mut buf = vec![0u8; MAX_FRAME];
        loop {
            // A frame, the stop, or room at a port whose copies wait: blocks until one of them.
            let (incoming, room) = {
                let waiting: Vec<(&Arc<Path>, &UnixDatagram)> = self
                    .egress
                    .iter()
                    .filter(|(_, e)| !e.queue.is_empty())
                    .filter_map(|(p, e)| Some((p, e.sock.as_ref()?)))
                    .collect();
                let mut fds = vec![(self.sock.as_fd(), false), (stop.as_fd(), false)];
                fds.extend(waiting.iter().map(|(_, s)| (s.as_fd(), true)));
                match drydock_vm::wait_ready(&fds, None) {
                    Ok(r) if r[1] => return,
                    Ok(r) => {
                        let room: Vec<Arc<Path>> = waiting
                            .iter()
                            .zip(&r[2..])
                            .filter(|(_, ready)| **ready)
                            .map(|((p, _), _)| Arc::clone(p))
                            .collect();
                        (r[0], room)
                    }
                    Err(e) => {
                        tracing::warn!("hub: waiting for frames failed: {e}");
                        return;
                    }
                }
            };
            for port in room {
                self.flush(&port);
            }
            if !incoming {
                continue;
            }
            let (n, from) = match self.sock.recv_from(&mut buf) {
                Ok(x) => x,
                Err(e) if crate::wire::try_again(&e) => {
                    continue;
                }
                Err(e) => {
                    // A back-off: an error that persists would otherwise spin this thread; the
                    // stop is still seen within it.
                    tracing::warn!("hub: receiving failed: {e}");
                    std::thread::sleep(ERROR_BACKOFF);
                    continue;
                }
            };
            self.frame(&buf[..n], from.as_pathname());
        }
    }

    /// Send the copies waiting for `port` while it has room. Those whose sender or port is now
    /// blocked, or whose link the partition has cut, are dropped (as a frame arriving now
    /// would be); all of them while the hub is frozen, or once the port has left the list.
    fn flush(&mut self, port: &Arc<Path>) {
        let shared = self.shared;
        let c = &shared.counters;
        let state = shared.state();
        let Some(e) = self.egress.get_mut(port) else {
            return;
        };
        if state.frozen {
            c.frozen.fetch_add(e.clear(), Ordering::Relaxed);
            return;
        }
        if !state.list.contains(port) {
            c.dropped.fetch_add(e.clear(), Ordering::Relaxed);
            return;
        }
        let faults = &state.faults;
        let tapping = shared.tap_count.load(Ordering::Relaxed) > 0;
        while let Some(w) = e.queue.pop_front() {
            e.bytes -= w.cost();
            let cut = faults.blocked.contains(&**port) || faults.blocked.contains(&*w.from);
            if cut || !faults.linked(&w.from, port) {
                let counter = if cut { &c.blocked } else { &c.partitioned };
                counter.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            match e.send(port, &w.frame) {
                Ok(()) => {
                    c.delivered.fetch_add(1, Ordering::Relaxed);
                    if tapping {
                        shared.delivered_to_taps(SystemTime::now(), &w.frame, &w.from, &[port]);
                    }
                }
                // Still full (the room was taken meanwhile): it waits, first, for room again.
                Err(true) => {
                    e.bytes += w.cost();
                    e.queue.push_front(w);
                    return;
                }
                Err(false) => {
                    c.dropped.fetch_add(1 + e.clear(), Ordering::Relaxed);
                    return;
                }
            }
        }
    }

    /// Whether `sender` may send one more broadcast or multicast frame now (storm control).
    fn allow_group_frame(&mut self, sender: &Arc<Path>) -> bool {
        let now = Instant::now();
        self.allowances
            .entry(sender.clone())
            .or_insert_with(|| Allowance::full(now))
            .take(now)
    }

    /// After a new port list: forget the ports that left (their allowances, their sockets, and
    /// their waiting copies, counted as dropped).
    fn forget_ports_gone(&mut self, state: &State) {
        if self.ports_generation == state.ports_generation {
            return;
        }
        let gone: u64 = self
            .egress
            .iter_mut()
            .filter(|(p, _)| !state.list.contains(*p))
            .map(|(_, e)| e.clear())
            .sum();
        self.shared
            .counters
            .dropped
            .fetch_add(gone, Ordering::Relaxed);
        self.egress.retain(|p, _| state.list.contains(p));
        self.allowances.retain(|p, _| state.list.contains(p));
        self.ports_generation = state.ports_generation;
    }

    /// Forward one frame received from `from`.
    fn frame(&mut self, frame: &[u8], from: Option<&Path>) {
        let shared = self.shared;
        let c = &shared.counters;
        let state = shared.state();
        let Some(i) = from.and_then(|p| state.list.iter().position(|q| **q == *p)) else {
            c.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if state.frozen {
            c.frozen.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.forget_ports_gone(&state);
        let sender = &state.list[i];
        let at = SystemTime::now();
        let storm = to_group(frame) && !self.allow_group_frame(sender);
        if state.recording && !storm {
            let rec = Rec::of(at, sender, frame);
            shared
                .ring
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(rec);
        }
        let tapping = shared.tap_count.load(Ordering::Relaxed) > 0;
        if tapping {
            shared.to_taps(at, frame, |t| t.wants(sender));
        }
        if storm {
            c.storm_dropped.fetch_add(1, Ordering::Relaxed);
            let mut storms = shared.storms.lock().unwrap_or_else(PoisonError::into_inner);
            let s = storms.entry(sender.clone()).or_insert(Storm {
                dropped: 0,
                first: at,
                last: at,
            });
            s.dropped += 1;
            s.last = at;
            return;
        }
        let faults = &state.faults;
        if faults.blocked.contains(&**sender) {
            c.blocked.fetch_add(1, Ordering::Relaxed);
            return;
        }
        c.frames.fetch_add(1, Ordering::Relaxed);
        self.dests.clear();
        for (j, port) in state.list.iter().enumerate() {
            if j == i {
                continue;
            }
            if faults.blocked.contains(&**port) {
                c.blocked.fetch_add(1, Ordering::Relaxed);
            } else if !faults.linked(sender, port) {
                c.partitioned.fetch_add(1, Ordering::Relaxed);
            } else {
                self.dests.push(j);
            }
        }
        if self.dests.is_empty() {
            return;
        }
        if let Some(shape) = faults.shaped.get(&**sender) {
            if self.generation != state.generation {
                // Links whose shape changed or went start afresh.
                self.links
                    .retain(|p, l| faults.shaped.get(p) == Some(l.shape()));
                self.generation = state.generation;
            }
            let now = Instant::now();
            if !self.links.contains_key(&**sender) {
                let link = Link::new(shape.clone(), now);
                self.links.insert(sender.to_path_buf(), link);
            }
            let Some(link) = self.links.get_mut(&**sender) else {
                return;
            };
            match link.decide(frame.len(), now, &mut self.rng) {
                Verdict::Now => {}
                Verdict::Lost => {
                    c.lost.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Verdict::Overflow => {
                    c.shaped_dropped.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Verdict::At(due) => {
                    let d = Delayed {
                        frame: frame.to_vec(),
                        from: sender.clone(),
                        to: self.dests.iter().map(|&j| state.list[j].clone()).collect(),
                    };
                    let counter = match self.shaper.hold(due, d.cost(), d) {
                        true => &c.delayed,
                        false => &c.shaped_dropped,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        }
        let mut delivered: Vec<&Arc<Path>> = Vec::new();
        for &j in &self.dests {
            let port = &state.list[j];
            let egress = self.egress.entry(port.clone()).or_default();
            let sent = egress.offer(port, frame, sender);
            let counter = match sent {
                Sent::Now => &c.delivered,
                Sent::Queued => &c.queued,
                Sent::Dropped => &c.dropped,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            // A copy that waits goes to the taps when it is sent.
            if tapping && sent == Sent::Now {
                delivered.push(port);
            }
        }
        if tapping {
            self.shared.delivered_to_taps(at, frame, sender, &delivered);
        }
    }
}

/// Send a held frame's copies now that it is due (the shaper thread), unless the hub is frozen
/// or the port has left the list meanwhile.
fn deliver_delayed(sock: &UnixDatagram, shared: &Shared, d: Delayed) {
    let c = &shared.counters;
    let state = shared.state();
    if state.frozen {
        c.frozen.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let tapping = shared.tap_count.load(Ordering::Relaxed) > 0;
    let mut delivered = Vec::new();
    for port in &d.to {
        let listed = state.list.iter().any(|p| p == port);
        match listed && crate::sys::send_to_nowait(sock, &d.frame, port).is_ok() {
            true => {
                c.delivered.fetch_add(1, Ordering::Relaxed);
                if tapping {
                    delivered.push(port);
                }
            }
            false => {
                c.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    if tapping {
        shared.delivered_to_taps(SystemTime::now(), &d.frame, &d.from, &delivered);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(dir: &Path, name: &str) -> (PathBuf, UnixDatagram) {
        let p = dir.join(name);
        let s = UnixDatagram::bind(&p).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        (p, s)
    }

    /// A hub for VLAN `vlan` among the ports `names` in `dir`: the hub, its socket's path, and
    /// each port's path and socket.
    fn hub_among<const N: usize>(
        dir: &Path,
        vlan: u8,
        names: [&str; N],
    ) -> (Hub, PathBuf, [(PathBuf, UnixDatagram); N]) {
        let ports = names.map(|n| port(dir, n));
        let hub_path = dir.join("hub.sock");
        let paths = ports.iter().map(|p| p.0.clone()).collect();
        (Hub::start(vlan, &hub_path, paths).unwrap(), hub_path, ports)
    }

    fn recv(s: &UnixDatagram) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; MAX_FRAME];
        s.recv(&mut buf).ok().map(|n| buf[..n].to_vec())
    }

    #[test]
    fn each_frame_reaches_every_other_port_and_only_those() {
        let dir = tempfile::tempdir().unwrap();
        let (pa, a) = port(dir.path(), "a.sock");
        let (pb, b) = port(dir.path(), "b.sock");
        let (pc, c) = port(dir.path(), "c.sock");
        // A port whose VM is not up yet: its copies are dropped, the others still flow.
        let absent = dir.path().join("absent.sock");
        let hub_path = dir.path().join("hub.sock");
        let mut hub = Hub::start(1, &hub_path, vec![pa, pb, pc, absent]).unwrap();

        let big: Vec<u8> = (0..9000u32).map(|i| (i % 251) as u8).collect();
        a.send_to(&big, &hub_path).unwrap();
        assert_eq!(recv(&b).as_deref(), Some(&big[..]));
        assert_eq!(recv(&c).as_deref(), Some(&big[..]));
        b.send_to(b"from b", &hub_path).unwrap();
        assert_eq!(recv(&a).as_deref(), Some(&b"from b"[..]));
        assert_eq!(recv(&c).as_deref(), Some(&b"from b"[..]));

        // Nothing echoes back to the sender, and a stranger's frame goes nowhere.
        let (_, stranger) = port(dir.path(), "stranger.sock");
        stranger.send_to(b"intruder", &hub_path).unwrap();
        for s in [&a, &b, &c] {
            s.set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
        }
        assert_eq!(recv(&a), None, "a got its own frame or the stranger's");
        assert_eq!(recv(&b), None);
        assert_eq!(recv(&c), None);

        let k = hub.counters();
        assert_eq!(k.frames.load(Ordering::SeqCst), 2);
        assert_eq!(k.delivered.load(Ordering::SeqCst), 4);
        // One copy each to the absent port, and the stranger's frame.
        assert_eq!(k.dropped.load(Ordering::SeqCst), 3);
        hub.stop();
        assert!(!hub_path.exists(), "the hub's socket is removed");
    }

    #[test]
    fn a_new_port_list_takes_effect_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let (pa, a) = port(dir.path(), "a.sock");
        let (pb, b) = port(dir.path(), "b.sock");
        let (pc, c) = port(dir.path(), "c.sock");
        let hub_path = dir.path().join("hub.sock");
        let hub = Hub::start(3, &hub_path, vec![pa.clone(), pb.clone()]).unwrap();
        a.send_to(b"one", &hub_path).unwrap();
        assert_eq!(recv(&b).as_deref(), Some(&b"one"[..]));
        // c joins, b leaves: a's frames reach c only, and b's are dropped as a stranger's.
        hub.set_ports(vec![pa.clone(), pc.clone()]);
        assert_eq!(hub.ports(), vec![pa, pc]);
        a.send_to(b"two", &hub_path).unwrap();
        assert_eq!(recv(&c).as_deref(), Some(&b"two"[..]));
        b.send_to(b"gone", &hub_path).unwrap();
        for s in [&a, &b, &c] {
            s.set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
        }
        assert_eq!(recv(&b), None, "b is no longer a port");
        assert_eq!(recv(&a), None, "a left port's frame was forwarded");
        assert_eq!(recv(&c), None);
    }

    #[test]
    fn a_blocked_port_neither_sends_nor_receives_until_unblocked() {
        let dir = tempfile::tempdir().unwrap();
        let (pa, a) = port(dir.path(), "a.sock");
        let (pb, b) = port(dir.path(), "b.sock");
        let (pc, c) = port(dir.path(), "c.sock");
        let hub_path = dir.path().join("hub.sock");
        let hub = Hub::start(4, &hub_path, vec![pa.clone(), pb.clone(), pc]).unwrap();
        hub.set_blocked(&pb, true);
        for s in [&a, &b, &c] {
            s.set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
        }
        // b's frames go nowhere; a's reach c but not b.
        b.send_to(b"from b", &hub_path).unwrap();
        a.send_to(b"from a", &hub_path).unwrap();
        assert_eq!(recv(&c).as_deref(), Some(&b"from a"[..]));
        assert_eq!(recv(&c), None, "b's frame got through");
        assert_eq!(recv(&b), None, "b got a frame while blocked");
        assert_eq!(hub.counters().blocked.load(Ordering::SeqCst), 2);
        // Unblocked: both ways again, at once.
        hub.set_blocked(&pb, false);
        for s in [&a, &b, &c] {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        }
        b.send_to(b"back", &hub_path).unwrap();
        assert_eq!(recv(&a).as_deref(), Some(&b"back"[..]));
        a.send_to(b"again", &hub_path).unwrap();
        assert_eq!(recv(&b).as_deref(), Some(&b"again"[..]));
        // A mark outlives a new port list (a reload that keeps the machine).
        hub.set_blocked(&pa, true);
        hub.set_ports(hub.ports());
        b.send_to(b"to a?", &hub_path).unwrap();
        a.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        assert_eq!(recv(&a), None);
    }

    #[test]
    fn a_frozen_hub_forwards_nothing_until_thawed() {
        let dir = tempfile::tempdir().unwrap();
        let (pa, a) = port(dir.path(), "a.sock");
        let (pb, b) = port(dir.path(), "b.sock");
        let hub_path = dir.path().join("hub.sock");
        let hub = Hub::start(5, &hub_path, vec![pa, pb]).unwrap();
        hub.set_frozen(true);
        b.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        a.send_to(b"during the cut", &hub_path).unwrap();
        assert_eq!(recv(&b), None, "a frame crossed a frozen hub");
        hub.set_frozen(false);
        b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        a.send_to(b"after", &hub_path).unwrap();
        assert_eq!(recv(&b).as_deref(), Some(&b"after"[..]));
        assert_eq!(hub.counters().frozen.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_full_port_does_not_stall_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let (pa, a) = port(dir.path(), "a.sock");
        let (pb, _never_reads) = port(dir.path(), "b.sock");
        let (pc, c) = port(dir.path(), "c.sock");
        let hub_path = dir.path().join("hub.sock");
        let hub = Hub::start(2, &hub_path, vec![pa, pb, pc]).unwrap();
        let t = std::time::Instant::now();
        let mut frame = [0u8; 1500];
        for i in 0..500u32 {
            frame[6..10].copy_from_slice(&i.to_le_bytes());
            a.send_to(&frame, &hub_path).unwrap();
            assert_eq!(recv(&c).as_deref(), Some(&frame[..]), "frame {i}");
        }
        assert!(t.elapsed() < Duration::from_secs(10));
        // b's socket filled up, then its queue of waiting copies (256 KiB): the rest of its
        // copies were dropped, c's were not.
        let k = hub.counters();
        let (dropped, queued) = (
            k.dropped.load(Ordering::SeqCst),
            k.queued.load(Ordering::SeqCst),
        );
        assert!((1..500).contains(&dropped), "dropped {dropped}");
        let fits = (EGRESS_QUEUE_BYTES / 1500) as u64;
        assert!(queued <= fits && queued >= fits * 9 / 10, "queued {queued}");
    }

    #[test]
    fn a_port_full_for_a_moment_gets_every_copy_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (hub, hub_path, [(_, a), (_, b)]) = hub_among(dir.path(), 3, ["a.sock", "b.sock"]);
        // b reads nothing while a sends 100 frames (the kernel holds about 10 on b's socket),
        // then everything, in order: the others waited in b's queue.
        let mut frame = [0u8; 1500];
        for i in 0..100u32 {
            frame[6..10].copy_from_slice(&i.to_le_bytes());
            a.send_to(&frame, &hub_path).unwrap();
        }
        for i in 0..100u32 {
            frame[6..10].copy_from_slice(&i.to_le_bytes());
            assert_eq!(recv(&b).as_deref(), Some(&frame[..]), "frame {i}");
        }
        let k = hub.counters();
        assert_eq!(k.dropped.load(Ordering::SeqCst), 0);
        assert_eq!(k.delivered.load(Ordering::SeqCst), 100);
        assert!(k.queued.load(Ordering::SeqCst) >= 80, "{k:?}");
    }

    #[test]
    fn waiting_copies_obey_a_block_and_the_freeze_set_while_they_wait() {
        let dir = tempfile::tempdir().unwrap();
        let (hub, hub_path, [(pa, a), (_, b)]) = hub_among(dir.path(), 4, ["a.sock", "b.sock"]);
        let frame = [0u8; 1500];
        for (fault, n) in [("block", 50u64), ("freeze", 50)] {
            let k = hub.counters();
            let before = (
                k.delivered.load(Ordering::SeqCst),
                k.blocked.load(Ordering::SeqCst),
                k.frozen.load(Ordering::SeqCst),
            );
            let frames = k.frames.load(Ordering::SeqCst);
            for _ in 0..n {
                a.send_to(&frame, &hub_path).unwrap();
            }
            // Each frame is forwarded: its copy for b sent (b's socket holds about 10) or queued.
            assert!(eventually(|| k.frames.load(Ordering::SeqCst) - frames == n));
            match fault {
                "block" => hub.set_blocked(&pa, true),
                _ => hub.set_frozen(true),
            }
            // b reads what its socket held; the copies that waited are dropped, not sent.
            quiet(&[&b], 300);
            let mut got = 0u64;
            while recv(&b).is_some() {
                got += 1;
            }
            assert!(got < n, "{fault}: {got} of {n} arrived");
            let k = hub.counters();
            let after = (
                k.delivered.load(Ordering::SeqCst),
                k.blocked.load(Ordering::SeqCst),
                k.frozen.load(Ordering::SeqCst),
            );
            assert_eq!(after.0 - before.0, got, "{fault}");
            let cut = match fault {
                "block" => after.1 - before.1,
                _ => after.2 - before.2,
            };
            assert_eq!(cut, n - got, "{fault}: {k:?}");
            match fault {
                "block" => hub.set_blocked(&pa, false),
                _ => hub.set_frozen(false),
            }
            b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        }
    }

    fn quiet(socks: &[&UnixDatagram], ms: u64) {
        for s in socks {
            s.set_read_timeout(Some(Duration::from_millis(ms))).unwrap();
        }
    }

    fn set(paths: &[&PathBuf]) -> BTreeSet<PathBuf> {
        paths.iter().map(|p| p.to_path_buf()).collect()
    }

    /// An ARP request from `n` (MAC 52:54:00:00:00:n, 10.0.0.n) for 10.0.0.`who`: 42 bytes.
    fn arp(n: u8, who: u8) -> Vec<u8> {
        let mac = [0x52, 0x54, 0, 0, 0, n];
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&mac);
        f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
        f.extend_from_slice(&mac);
        f.extend_from_slice(&[10, 0, 0, n]);
        f.extend_from_slice(&[0; 6]);
        f.extend_from_slice(&[10, 0, 0, who]);
        f
    }

    /// A pcap stream: the global header, whole records (time in µs, frame), and the length of
    /// a record cut short at the end (0: the stream ends between records).
    fn parse_pcap(b: &[u8]) -> (Vec<(u64, Vec<u8>)>, usize) {
        assert!(b.len() >= 24, "no global header");
        assert_eq!(&b[..24], &pcap::global_header());
        let u = |i: usize| u32::from_ne_bytes(b[i..i + 4].try_into().unwrap()) as u64;
        let (mut i, mut out) = (24, Vec::new());
        while i + 16 <= b.len() {
            let incl = u(i + 8) as usize;
            assert_eq!(u(i + 12) as usize, incl, "orig_len");
            if i + 16 + incl > b.len() {
                break;
            }
            out.push((
                u(i) * 1_000_000 + u(i + 4),
                b[i + 16..i + 16 + incl].to_vec(),
            ));
            i += 16 + incl;
        }
        (out, b.len() - i)
    }

    /// Wait until `what` holds (a counter bumped just after the send a test saw, a frame
    /// handled that reached no port): a 1 ms back-off, up to 5 s.
    fn eventually(what: impl Fn() -> bool) -> bool {
        let deadline = drydock_gc::Deadline::after(Duration::from_secs(5));
        while !what() {
            if deadline.expired() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    fn now_us() -> u64 {
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_micros() as u64
    }

    #[test]
    fn faults_are_one_value_and_set_blocked_edits_only_the_blocked_set() {
        let dir = tempfile::tempdir().unwrap();
        let (pa, pb, pc) = (
            dir.path().join("a"),
            dir.path().join("b"),
            dir.path().join("c"),
        );
        let hub = Hub::start(6, &dir.path().join("hub.sock"), vec![pa.clone()]).unwrap();
        assert!(hub.faults().is_empty());
        let f = HubFaults {
            blocked: set(&[&pa]),
            groups: vec![set(&[&pa, &pb]), set(&[&pc])],
            shaped: [(
                pb.clone(),
                Shape {
                    delay: Duration::from_millis(100),
                    loss: 0.5,
                    ..Shape::default()
                },
            )]
            .into(),
        };
        hub.set_faults(f.clone());
        assert_eq!(hub.faults(), f);
        hub.set_blocked(&pc, true);
        hub.set_blocked(&pa, false);
        let mut want = f.clone();
        want.blocked = set(&[&pc]);
        assert_eq!(hub.faults(), want);
        hub.set_faults(HubFaults::default());
        assert!(hub.faults().is_empty());
        // The partition's rule: same group, or either in none.
        assert!(f.linked(&pa, &pb));
        assert!(!f.linked(&pa, &pc) && !f.linked(&pc, &pb));
        let loner = dir.path().join("d");
        assert!(f.linked(&loner, &pc) && f.linked(&pa, &loner));
        assert!(HubFaults::default().linked(&pa, &pc));
    }

    #[test]
    fn a_partition_lets_frames_cross_only_within_a_group() {
        let dir = tempfile::tempdir().unwrap();
        let names = ["a", "b", "c", "d", "e"];
        let ports: Vec<_> = names.iter().map(|n| port(dir.path(), n)).collect();
        let paths: Vec<PathBuf> = ports.iter().map(|p| p.0.clone()).collect();
        let hub_path = dir.path().join("hub.sock");
        let hub = Hub::start(7, &hub_path, paths.clone()).unwrap();
        // {a, b} and {c, d}; e in no group keeps its links to all.
        hub.set_faults(HubFaults {
            groups: vec![set(&[&paths[0], &paths[1]]), set(&[&paths[2], &paths[3]])],
            ..HubFaults::default()
        });
        let socks: Vec<&UnixDatagram> = ports.iter().map(|p| &p.1).collect();
        let reach = |from: usize| -> Vec<&str> {
            let msg = format!("from {}", names[from]);
            socks[from].send_to(msg.as_bytes(), &hub_path).unwrap();
            // e hears everyone: once its copy is there, the others' are too (sent before).
            let mut got = Vec::new();
            for (i, s) in socks.iter().enumerate() {
                if i == from {
                    continue;
                }
                quiet(&[s], if i == 4 { 5000 } else { 200 });
                if recv(s).as_deref() == Some(msg.as_bytes()) {
                    got.push(names[i]);
                }
            }
            got
        };
        assert_eq!(reach(0), ["b", "e"]);
        assert_eq!(reach(2), ["d", "e"]);
        assert_eq!(reach(4), ["a", "b", "c", "d"]);
        assert_eq!(hub.counters().partitioned.load(Ordering::SeqCst), 4);
        // Healed: a reaches all again.
        hub.set_faults(HubFaults::default());
        assert_eq!(reach(0), ["b", "c", "d", "e"]);
    }

    #[test]
    fn a_delayed_frame_waits_without_holding_up_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let (pa, a) = port(dir.path(), "a.sock");
        let (pb, b) = port(dir.path(), "b.sock");
        let hub_path = dir.path().join("hub.sock");
        let hub = Hub::start(8, &hub_path, vec![pa.clone(), pb.clone()]).unwrap();
        let (tap_in, mut tap_out) = UnixStream::pair().unwrap();
        hub.add_tap(tap_in, Some(set(&[&pb]))).unwrap();
        let delay = Duration::from_secs(1);
        hub.set_faults(HubFaults {
            shaped: [(
                pa.clone(),
                Shape {
                    delay,
                    ..Shape::default()
                },
            )]
            .into(),
            ..HubFaults::default()
        });
        let (t0, us0) = (Instant::now(), now_us());
        a.send_to(b"late", &hub_path).unwrap();
        // b's frames to a are not shaped and not held up behind a's.
        b.send_to(b"prompt", &hub_path).unwrap();
        assert_eq!(recv(&a).as_deref(), Some(&b"prompt"[..]));
        quiet(&[&b], 100);
        assert_eq!(recv(&b), None, "the delayed frame came early");
        quiet(&[&b], 5000);
        assert_eq!(recv(&b).as_deref(), Some(&b"late"[..]));
        assert!(t0.elapsed() >= delay);
        assert_eq!(hub.counters().delayed.load(Ordering::SeqCst), 1);
        // A held frame that falls due while the hub is frozen is dropped.
        a.send_to(b"cut", &hub_path).unwrap();
        b.send_to(b"sync", &hub_path).unwrap();
        assert_eq!(
            recv(&a).as_deref(),
            Some(&b"sync"[..]),
            "a's frame is held by now"
        );
        hub.set_frozen(true);
        quiet(&[&b], 1500);
        assert_eq!(recv(&b), None, "a held frame crossed a frozen hub");
        let k = hub.counters();
        assert!(eventually(|| k.frozen.load(Ordering::SeqCst) == 1));
        hub.set_frozen(false);
        // The tap on b: b's frames as sent, a's copy to b as delivered (after the delay).
        drop(hub);
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut tap_out, &mut bytes).unwrap();
        let (recs, cut) = parse_pcap(&bytes);
        assert_eq!(cut, 0);
        let frames: Vec<&[u8]> = recs.iter().map(|r| &r.1[..]).collect();
        assert_eq!(frames, [&b"prompt"[..], b"late", b"sync"]);
        assert!(
            recs[1].0 >= us0 + 1_000_000 - 1000,
            "the copy is recorded when delivered"
        );
    }

    #[test]
    fn loss_of_one_is_a_block_and_a_rate_paces_and_overflows() {
        let dir = tempfile::tempdir().unwrap();
        let (pa, a) = port(dir.path(), "a.sock");
        let (pb, b) = port(dir.path(), "b.sock");
        let hub_path = dir.path().join("hub.sock");
        let hub = Hub::start(9, &hub_path, vec![pa.clone(), pb.clone()]).unwrap();
        let shape = |s: Shape| HubFaults {
            shaped: [(pa.clone(), s)].into(),
            ..HubFaults::default()
        };
        hub.set_faults(shape(Shape {
            loss: 1.0,
            ..Shape::default()
        }));
        for _ in 0..10 {
            a.send_to(b"gone", &hub_path).unwrap();
        }
        b.send_to(b"sync", &hub_path).unwrap();
        assert_eq!(recv(&a).as_deref(), Some(&b"sync"[..]));
        quiet(&[&b], 200);
        assert_eq!(recv(&b), None);
        assert_eq!(hub.counters().lost.load(Ordering::SeqCst), 10);

        // 20,000 bytes/s: a bucket of 3028 bytes (two full frames), then 50 ms per 1000 bytes.
        hub.set_faults(shape(Shape {
            rate: Some(20_000),
            ..Shape::default()
        }));
        let t0 = Instant::now();
        for i in 0..13u8 {
            a.send_to(&[i; 1000], &hub_path).unwrap();
        }
        quiet(&[&b], 5000);
        for i in 0..13u8 {
            assert_eq!(recv(&b), Some(vec![i; 1000]), "frame {i}");
        }
        assert!(
            t0.elapsed() >= Duration::from_millis(450),
            "{:?}",
            t0.elapsed()
        );

        // 1000 bytes/s: after the bucket, RATE_QUEUE bytes wait; the rest are dropped.
        hub.set_faults(shape(Shape {
            rate: Some(1000),
            ..Shape::default()
        }));
        let before = hub.counters().delayed.load(Ordering::SeqCst);
        let t1 = Instant::now();
        for _ in 0..300 {
            a.send_to(&[0; 1000], &hub_path).unwrap();
        }
        b.send_to(b"sync", &hub_path).unwrap();
        assert_eq!(recv(&a).as_deref(), Some(&b"sync"[..]));
        let held = hub.counters().delayed.load(Ordering::SeqCst) - before;
        let over = hub.counters().shaped_dropped.load(Ordering::SeqCst);
        // 262 fit in the queue, and one more for each second the sending took (the refill).
        let refill = t1.elapsed().as_secs();
        assert!((262..=263 + refill).contains(&held), "{held} held");
        assert_eq!(held + over, 297, "3 went at once");
    }

    #[test]
    fn the_hubs_queue_of_held_frames_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let (pa, a) = port(dir.path(), "a.sock");
        let (pb, b) = port(dir.path(), "b.sock");
        let hub_path = dir.path().join("hub.sock");
        let hub = Hub::start(10, &hub_path, vec![pa.clone(), pb]).unwrap();
        hub.set_faults(HubFaults {
            shaped: [(
                pa,
                Shape {
                    delay: Duration::from_secs(3600),
                    ..Shape::default()
                },
            )]
            .into(),
            ..HubFaults::default()
        });
        let n = 10_000u64;
        for _ in 0..n {
            a.send_to(&[2; 1000], &hub_path).unwrap();
        }
        b.send_to(b"sync", &hub_path).unwrap();
        assert_eq!(recv(&a).as_deref(), Some(&b"sync"[..]));
        let k = hub.counters();
        let (held, over) = (
            k.delayed.load(Ordering::SeqCst),
            k.shaped_dropped.load(Ordering::SeqCst),
        );
        assert_eq!(held + over, n);
        assert!(over > 0, "10 MB held");
        assert!(held as usize * 1000 <= SHAPE_QUEUE_BYTES, "{held} held");
        assert!(held as usize * 1200 > SHAPE_QUEUE_BYTES, "{held} held");
    }

    #[test]
    fn the_ring_records_attempts_but_not_the_cut() {
        let dir = tempfile::tempdir().unwrap();
        let (pa, a) = port(dir.path(), "a.sock");
        let (pb, b) = port(dir.path(), "b.sock");
        let hub_path = dir.path().join("hub.sock");
        let hub = Hub::start(11, &hub_path, vec![pa.clone(), pb.clone()]).unwrap();
        let t0 = epoch_ms(SystemTime::now());
        let big: Vec<u8> = (0..200u8).collect();
        a.send_to(&big, &hub_path).unwrap();
        assert_eq!(recv(&b).as_deref(), Some(&big[..]));
        // Blocked and partitioned frames are recorded; a frozen hub's are not, nor a stranger's.
        hub.set_blocked(&pa, true);
        a.send_to(b"blocked", &hub_path).unwrap();
        let k = hub.counters();
        assert!(eventually(|| k.blocked.load(Ordering::SeqCst) == 1));
        hub.set_faults(HubFaults {
            groups: vec![set(&[&pa]), set(&[&pb])],
            ..HubFaults::default()
        });
        b.send_to(b"partitioned", &hub_path).unwrap();
        assert!(eventually(|| k.partitioned.load(Ordering::SeqCst) == 1));
        hub.set_faults(HubFaults::default());
        hub.set_frozen(true);
        a.send_to(b"frozen", &hub_path).unwrap();
        let (_, stranger) = port(dir.path(), "stranger.sock");
        stranger.send_to(b"stranger", &hub_path).unwrap();
        assert!(eventually(
            || k.frozen.load(Ordering::SeqCst) == 1 && k.dropped.load(Ordering::SeqCst) == 1
        ));
        hub.set_frozen(false);
        hub.set_recording(false);
        a.send_to(b"unrecorded", &hub_path).unwrap();
        assert_eq!(recv(&b).as_deref(), Some(&b"unrecorded"[..]));
        hub.set_recording(true);
        b.send_to(b"last", &hub_path).unwrap();
        assert_eq!(recv(&a).as_deref(), Some(&b"last"[..]));
        let t1 = epoch_ms(SystemTime::now());
        let recent = hub.recent();
        let got: Vec<(&Path, u32, &[u8])> = recent
            .iter()
            .map(|r| (r.from.as_path(), r.len, &r.head[..]))
            .collect();
        assert_eq!(
            got,
            [
                (pa.as_path(), 200, &big[..HEAD_BYTES]),
                (pa.as_path(), 7, &b"blocked"[..]),
                (pb.as_path(), 11, &b"partitioned"[..]),
                (pb.as_path(), 4, &b"last"[..]),
            ]
        );
        assert!(recent.iter().all(|r| (t0..=t1).contains(&r.at_ms)));
        assert!(recent.windows(2).all(|w| w[0].at_ms <= w[1].at_ms));
    }

    #[test]
    fn a_flood_keeps_the_ring_within_its_cap_and_its_newest() {
        let dir = tempfile::tempdir().unwrap();
        let (pa, a) = port(dir.path(), "a.sock");
        // m never reads during the flood: its queue fills and its copies are dropped.
        let (pm, m) = port(dir.path(), "m.sock");
        let hub_path = dir.path().join("hub.sock");
        let hub = Hub::start(12, &hub_path, vec![pa.clone(), pm.clone()]).unwrap();
        let (_, _, storage) = hub.ring_usage();
        let n = 1_000_000u32;
        // Unicast frames (storm control counts only broadcast and multicast), numbered in the
        // source MAC.
        let mut frame = [0u8; 60];
        for i in 0..n {
            frame[6..10].copy_from_slice(&i.to_le_bytes());
            a.send_to(&frame, &hub_path).unwrap();
        }
        // Frames are handled in order: once m's marker reaches a, the flood is all recorded.
        m.send_to(b"marker", &hub_path).unwrap();
        assert_eq!(recv(&a).as_deref(), Some(&b"marker"[..]));
        assert_eq!(hub.counters().frames.load(Ordering::SeqCst), n as u64 + 1);
        let (records, bytes, capacity) = hub.ring_usage();
        assert!(bytes <= RING_BYTES, "{bytes} bytes recorded");
        assert_eq!(capacity, storage, "the ring's storage grew");
        assert!(capacity * std::mem::size_of::<Rec>() <= RING_BYTES + 4096);
        let per = std::mem::size_of::<Rec>() + pa.as_os_str().len();
        assert!(
            records >= RING_BYTES / per - 1,
            "only {records} records kept"
        );
        let recent = hub.recent();
        assert_eq!(recent.len(), records);
        let last = &recent[records - 1];
        assert_eq!(
            (last.from.as_path(), &last.head[..]),
            (pm.as_path(), &b"marker"[..])
        );
        // The rest: the flood's last frames, in order.
        for (k, r) in recent[..records - 1].iter().rev().enumerate() {
            let i = u32::from_le_bytes(r.head[6..10].try_into().unwrap());
            assert_eq!(i, n - 1 - k as u32);
            assert_eq!((r.from.as_path(), r.len), (pa.as_path(), 60));
        }
        eprintln!(
            "ring after {n} frames: {records} records, {bytes} bytes counted (cap {RING_BYTES})"
        );
    }

    #[test]
    fn storm_control_cuts_a_broadcast_flood_to_its_allowance_and_keeps_it_out_of_the_ring() {
        let dir = tempfile::tempdir().unwrap();
        let (hub, hub_path, [(pa, a), (_, b), (_, c)]) =
            hub_among(dir.path(), 13, ["a.sock", "b.sock", "c.sock"]);
        // b reads everything it is sent, counting a's broadcasts, until c's marker.
        let reader = std::thread::spawn(move || {
            let mut from_a = 0u64;
            loop {
                match recv(&b) {
                    Some(f) if f == b"marker" => return (from_a, b),
                    Some(_) => from_a += 1,
                    None => panic!("b: nothing within 5 s"),
                }
            }
        });
        // a floods: broadcasts, and a multicast (IPv6 neighbour discovery's 33:33:..) among them.
        let n = 20_000u64;
        let started = Instant::now();
        for i in 0..n {
            let mut f = arp(1, 2);
            if i % 2 == 1 {
                f[..2].copy_from_slice(&[0x33, 0x33]);
            }
            while let Err(e) = a.send_to(&f, &hub_path) {
                assert!(crate::wire::try_again(&e), "{e}");
            }
        }
        let secs = started.elapsed().as_secs_f64();
        // c's unicast to b still arrives, after the flood (frames are handled in order).
        c.send_to(b"marker", &hub_path).unwrap();
        let (to_b, b) = reader.join().unwrap();
        let allowed = f64::from(STORM_FRAMES_PER_SEC) * (1.0 + secs);
        let dropped = hub.counters().storm_dropped.load(Ordering::SeqCst);
        eprintln!("{n} group frames in {secs:.3} s: {dropped} dropped, {to_b} reached b");
        assert!(
            n - dropped <= allowed.ceil() as u64,
            "{dropped} of {n} dropped in {secs} s"
        );
        assert!(
            n - dropped >= u64::from(STORM_FRAMES_PER_SEC),
            "{dropped} of {n} dropped"
        );
        let storms = hub.storms();
        assert_eq!(storms.len(), 1, "{storms:?}");
        assert_eq!(
            (storms[0].0.as_path(), storms[0].1.dropped),
            (pa.as_path(), dropped)
        );
        assert!(storms[0].1.first <= storms[0].1.last);
        // The ring has the frames that passed, not the ones dropped.
        let (records, _, _) = hub.ring_usage();
        assert_eq!(records as u64, n - dropped + 1);
        // Its allowance comes back with time.
        std::thread::sleep(Duration::from_millis(50));
        a.send_to(&arp(1, 3), &hub_path).unwrap();
        assert_eq!(recv(&b), Some(arp(1, 3)));
        assert_eq!(hub.counters().storm_dropped.load(Ordering::SeqCst), dropped);
    }

    #[test]
    fn a_tap_writes_pcap_of_its_ports_frames_that_tcpdump_reads() {
        let dir = tempfile::tempdir().unwrap();
        let (hub, hub_path, [(_, a), (_, b), (pc, c)]) =
            hub_among(dir.path(), 13, ["a.sock", "b.sock", "c.sock"]);
        let (c_in, mut c_out) = UnixStream::pair().unwrap();
        let (all_in, mut all_out) = UnixStream::pair().unwrap();
        hub.add_tap(c_in, Some(set(&[&pc]))).unwrap();
        hub.add_tap(all_in, None).unwrap();
        assert_eq!(hub.tap_count(), 2);
        // Seen by c's tap: a's frame to c, c's own (also while blocked: what c sent), not
        // b's frame that was not delivered to c (c blocked).
        a.send_to(&arp(1, 3), &hub_path).unwrap();
        assert_eq!(recv(&c), Some(arp(1, 3)));
        assert_eq!(recv(&b), Some(arp(1, 3)));
        c.send_to(&arp(3, 1), &hub_path).unwrap();
        assert_eq!(recv(&a), Some(arp(3, 1)));
        assert_eq!(recv(&b), Some(arp(3, 1)));
        hub.set_blocked(&pc, true);
        b.send_to(&arp(2, 9), &hub_path).unwrap();
        assert_eq!(recv(&a), Some(arp(2, 9)));
        c.send_to(&arp(3, 7), &hub_path).unwrap();
        b.send_to(&arp(2, 1), &hub_path).unwrap();
        assert_eq!(recv(&a), Some(arp(2, 1)));
        drop(hub);
        let read = |s: &mut UnixStream| {
            let mut v = Vec::new();
            std::io::Read::read_to_end(s, &mut v).unwrap();
            v
        };
        let (c_bytes, all_bytes) = (read(&mut c_out), read(&mut all_out));
        let frames = |b: &[u8]| -> Vec<Vec<u8>> {
            let (recs, cut) = parse_pcap(b);
            assert_eq!(cut, 0);
            recs.into_iter().map(|r| r.1).collect()
        };
        assert_eq!(frames(&c_bytes), [arp(1, 3), arp(3, 1), arp(3, 7)]);
        // Every frame once, in order.
        assert_eq!(
            frames(&all_bytes),
            [arp(1, 3), arp(3, 1), arp(2, 9), arp(3, 7), arp(2, 1)]
        );
        // And tcpdump reads it (scripts/setup installs tcpdump).
        let file = dir.path().join("c.pcap");
        std::fs::write(&file, &c_bytes).unwrap();
        let out = std::process::Command::new("tcpdump")
            .args(["-nn", "-e", "-r"])
            .arg(&file)
            .output()
            .expect("tcpdump (scripts/setup installs it)");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(
            lines[0].contains("52:54:00:00:00:01")
                && lines[0].contains("Request who-has 10.0.0.3 tell 10.0.0.1"),
            "{text}"
        );
        assert!(
            lines[2].contains("who-has 10.0.0.7 tell 10.0.0.3"),
            "{text}"
        );
    }

    #[test]
    fn a_slow_tap_loses_whole_records_and_never_stalls_the_hub() {
        let dir = tempfile::tempdir().unwrap();
        let (pa, a) = port(dir.path(), "a.sock");
        let (pc, c) = port(dir.path(), "c.sock");
        let hub_path = dir.path().join("hub.sock");
        let hub = Hub::start(14, &hub_path, vec![pa, pc]).unwrap();
        let (tap_in, tap_out) = UnixStream::pair().unwrap();
        hub.add_tap(tap_in, None).unwrap();
        // Nobody reads the tap: it fills, and then loses frames; c still gets every one.
        let n = 3000u32;
        let mut frame = vec![0u8; 1500];
        for i in 0..n {
            frame[6..10].copy_from_slice(&i.to_le_bytes());
            a.send_to(&frame, &hub_path).unwrap();
            assert_eq!(recv(&c).as_deref(), Some(&frame[..]), "frame {i}");
        }
        let lost = hub.counters().tap_dropped.load(Ordering::SeqCst);
        assert!(lost > 0 && lost < n as u64, "{lost} lost");
        // Read what is there, then one more frame finishes any record begun: the stream is
        // whole records, the last one the newest frame.
        tap_out.set_nonblocking(true).unwrap();
        let mut bytes = Vec::new();
        let drain = |bytes: &mut Vec<u8>| {
            let mut buf = [0u8; 65536];
            loop {
                match std::io::Read::read(&mut &tap_out, &mut buf) {
                    Ok(0) => break,
                    Ok(k) => bytes.extend_from_slice(&buf[..k]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("{e}"),
                }
            }
        };
        drain(&mut bytes);
        frame[6..10].copy_from_slice(&n.to_le_bytes());
        a.send_to(&frame, &hub_path).unwrap();
        assert_eq!(recv(&c).as_deref(), Some(&frame[..]));
        drain(&mut bytes);
        let (recs, cut) = parse_pcap(&bytes);
        assert_eq!(cut, 0, "the stream ends inside a record");
        assert_eq!(recs.len() as u64, n as u64 + 1 - lost);
        assert_eq!(recs.last().map(|r| &r.1[..]), Some(&frame[..]));
        let seen: Vec<u32> = recs
            .iter()
            .map(|r| u32::from_le_bytes(r.1[6..10].try_into().unwrap()))
            .collect();
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "out of order");
    }

    #[test]
    fn a_tap_whose_reader_has_gone_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let (pa, a) = port(dir.path(), "a.sock");
        let (pb, b) = port(dir.path(), "b.sock");
        let hub_path = dir.path().join("hub.sock");
        let hub = Hub::start(15, &hub_path, vec![pa, pb]).unwrap();
        let (tap_in, tap_out) = UnixStream::pair().unwrap();
        hub.add_tap(tap_in, None).unwrap();
        // A live reader that is slow keeps its tap.
        let (slow_in, _slow_out) = UnixStream::pair().unwrap();
        hub.add_tap(slow_in, None).unwrap();
        assert_eq!(hub.tap_count(), 2);
        drop(tap_out);
        a.send_to(b"x", &hub_path).unwrap();
        assert_eq!(recv(&b).as_deref(), Some(&b"x"[..]));
        assert_eq!(hub.shared.tap_count.load(Ordering::SeqCst), 1);
        // One whose ports see no frame goes when the taps are counted (or another is added).
        let (quiet_in, quiet_out) = UnixStream::pair().unwrap();
        hub.add_tap(quiet_in, Some(set(&[&dir.path().join("silent")])))
            .unwrap();
        assert_eq!(hub.tap_count(), 2);
        drop(quiet_out);
        assert_eq!(hub.tap_count(), 1);
        assert_eq!(hub.counters().tap_dropped.load(Ordering::SeqCst), 0);
        // A tap that cannot take its header is refused.
        let (tap_in, tap_out) = UnixStream::pair().unwrap();
        drop(tap_out);
        assert!(hub.add_tap(tap_in, None).is_err());
        assert_eq!(hub.tap_count(), 1);
    }

    /// Not a benchmark (no timing is asserted): forwarding with the ring on and off, with a
    /// partition and a shape in force on other ports, delivers every frame and the ring
    /// allocates nothing per frame. The rates are printed for a person to compare.
    #[test]
    fn forwarding_stays_cheap_with_recording_and_faults_in_force() {
        let dir = tempfile::tempdir().unwrap();
        let (pa, a) = port(dir.path(), "a.sock");
        let (pb, b) = port(dir.path(), "b.sock");
        let (px, _x) = port(dir.path(), "x.sock");
        let hub_path = dir.path().join("hub.sock");
        let hub = Hub::start(16, &hub_path, vec![pa.clone(), pb.clone(), px.clone()]).unwrap();
        hub.set_faults(HubFaults {
            groups: vec![set(&[&pa, &pb]), set(&[&px])],
            shaped: [(
                px,
                Shape {
                    delay: Duration::from_millis(5),
                    ..Shape::default()
                },
            )]
            .into(),
            ..HubFaults::default()
        });
        let (_, _, storage) = hub.ring_usage();
        let n = 20_000u32;
        let rate = |on: bool| {
            hub.set_recording(on);
            let t = Instant::now();
            // Unicast (an even first byte): storm control leaves it alone.
            let frame = [6u8; 1500];
            for i in 0..n {
                a.send_to(&frame, &hub_path).unwrap();
                assert_eq!(recv(&b).as_deref(), Some(&frame[..]), "frame {i}");
            }
            f64::from(n) / t.elapsed().as_secs_f64()
        };
        // Twice each, alternating, so that a warm-up does not favour either.
        let rates: Vec<String> = [false, true, false, true]
            .map(|on| format!("{} {:.0}", if on { "on" } else { "off" }, rate(on)))
            .into();
        eprintln!("hub round trips per second, recording {}", rates.join(", "));
        let k = hub.counters();
        assert!(eventually(
            || k.delivered.load(Ordering::SeqCst) == 4 * n as u64
        ));
        assert_eq!(k.partitioned.load(Ordering::SeqCst), 4 * n as u64);
        assert_eq!(hub.ring_usage().2, storage, "the ring's storage grew");
    }
}
