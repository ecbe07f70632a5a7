//! A private layer-2 segment: a hub (like `vde_switch --hub`) on one unix datagram socket.
//! Each VM's NIC is a QEMU `-netdev dgram` whose local socket is one of the hub's ports; every
//! frame the hub receives from a port goes to every other port, unchanged. Frames from a socket
//! that is not a port are dropped, and so is a frame for a port whose queue is full or that is
//! not there yet (no port can stall the others). No root, no tap, nothing on the host's network.
//!
//! One thread per hub, blocking on its one socket (and its stop): a hub is a single file
//! descriptor with one reader, so an async runtime would add nothing but a dependency (see docs/ARCHITECTURE.md).
//! The thread belongs to the process that owns the cluster and dies with it, SIGKILL included.
//! A hot reload that adds, removes or rewires machines replaces the port list in place
//! ([`Hub::set_ports`]): the machines that stay keep their segment without a gap. A port can be
//! blocked ([`Hub::set_blocked`], a test script's `machine.block()`): its frames and the copies
//! for it are dropped, as if its cable were pulled, until it is unblocked. A hub can be frozen
//! ([`Hub::set_frozen`], while a snapshot pauses the cluster's machines one after the other):
//! every frame is dropped, so none crosses the segment between the first machine's pause and
//! the last one's, and the machines' saved states agree about what was sent.

use std::collections::BTreeSet;
use std::os::fd::AsFd;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use drydock_vm::{WakeFd, Waker};

/// A frame is at most a jumbo Ethernet frame; QEMU sends one per datagram.
const MAX_FRAME: usize = 65_536;
/// The pause after a failed receive, so that an error that persists does not spin the thread.
const ERROR_BACKOFF: Duration = Duration::from_millis(100);

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
    /// Frames received from a port.
    pub frames: AtomicU64,
    /// Copies delivered to other ports.
    pub delivered: AtomicU64,
    /// Copies dropped (port absent or full) and frames from strangers.
    pub dropped: AtomicU64,
    /// Frames from a blocked port and copies for one, dropped.
    pub blocked: AtomicU64,
    /// Frames dropped while the hub was frozen (a snapshot's cut).
    pub frozen: AtomicU64,
}

/// The ports a hub forwards among, and those blocked.
#[derive(Debug, Default)]
struct Ports {
    list: Vec<PathBuf>,
    blocked: BTreeSet<PathBuf>,
    /// Every frame is dropped (see [`Hub::set_frozen`]).
    frozen: bool,
}

/// A running hub; stopped (thread joined, socket removed) by [`Hub::stop`] or on drop.
#[derive(Debug)]
pub struct Hub {
    vlan: u8,
    socket: PathBuf,
    stop: Waker,
    counters: Arc<HubCounters>,
    ports: Arc<RwLock<Ports>>,
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
        let sock = drydock_gc::bind_datagram(socket).map_err(bind)?;
        let (stop, stopped) = drydock_vm::wake_pair().map_err(bind)?;
        let counters = Arc::new(HubCounters::default());
        let ports = Arc::new(RwLock::new(Ports {
            list: ports,
            ..Ports::default()
        }));
        let thread = std::thread::Builder::new()
            .name(format!("hub-vlan{vlan}"))
            .spawn({
                let counters = counters.clone();
                let ports = ports.clone();
                move || forward(&sock, &ports, &stopped, &counters)
            })
            .map_err(|source| HubError::Thread { vlan, source })?;
        tracing::debug!(vlan, socket = %socket.display(), "hub started");
        Ok(Self {
            vlan,
            socket: socket.to_path_buf(),
            stop,
            counters,
            ports,
            thread: Some(thread),
        })
    }

    pub fn vlan(&self) -> u8 {
        self.vlan
    }

    pub fn counters(&self) -> &HubCounters {
        &self.counters
    }

    /// Forward among `ports` from now on (frames from a port no longer listed are dropped).
    pub fn set_ports(&self, ports: Vec<PathBuf>) {
        self.ports.write().unwrap_or_else(|e| e.into_inner()).list = ports;
    }

    /// Block the port `port` (drop its frames and the copies for it) or unblock it, from the
    /// next frame on. A port that is not (yet) in the list keeps its mark.
    pub fn set_blocked(&self, port: &Path, blocked: bool) {
        let mut p = self.ports.write().unwrap_or_else(|e| e.into_inner());
        match blocked {
            true => p.blocked.insert(port.to_path_buf()),
            false => p.blocked.remove(port),
        };
    }

    /// Drop every frame from now on (`true`), or forward again. Once this returns, no frame the
    /// hub had not begun to forward crosses it (forwarding holds the port list's read lock for
    /// each frame; this takes its write lock).
    pub fn set_frozen(&self, frozen: bool) {
        self.ports.write().unwrap_or_else(|e| e.into_inner()).frozen = frozen;
    }

    /// The ports it forwards among.
    #[cfg(test)]
    pub fn ports(&self) -> Vec<PathBuf> {
        self.ports
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .list
            .clone()
    }

    /// Stop forwarding, join the thread (it wakes at once) and remove the socket. Idempotent.
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

fn forward(sock: &UnixDatagram, ports: &RwLock<Ports>, stop: &WakeFd, c: &HubCounters) {
    let mut buf = vec![0u8; MAX_FRAME];
    loop {
        // A frame, or the stop: blocks until one of them.
        match drydock_vm::wait_readable(&[sock.as_fd(), stop.as_fd()], None) {
            Ok(r) if r[1] => return,
            Ok(r) if !r[0] => continue,
            Ok(_) => {}
            Err(e) => {
                tracing::warn!("hub: waiting for frames failed: {e}");
                return;
            }
        }
        let (n, from) = match sock.recv_from(&mut buf) {
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
        let ports = ports.read().unwrap_or_else(|e| e.into_inner());
        let Some(sender) = from
            .as_pathname()
            .filter(|p| ports.list.iter().any(|q| q == p))
        else {
            c.dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        if ports.frozen {
            c.frozen.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        if ports.blocked.contains(sender) {
            c.blocked.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        c.frames.fetch_add(1, Ordering::Relaxed);
        for port in ports.list.iter().filter(|p| p.as_path() != sender) {
            if ports.blocked.contains(port) {
                c.blocked.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            match crate::sys::send_to_nowait(sock, &buf[..n], port) {
                Ok(_) => c.delivered.fetch_add(1, Ordering::Relaxed),
                Err(_) => c.dropped.fetch_add(1, Ordering::Relaxed),
            };
        }
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
        for i in 0..500u32 {
            a.send_to(&i.to_le_bytes(), &hub_path).unwrap();
            assert_eq!(recv(&c).as_deref(), Some(&i.to_le_bytes()[..]), "frame {i}");
        }
        assert!(t.elapsed() < Duration::from_secs(10));
        // b's queue filled up: its copies were dropped, c's were not.
        let dropped = hub.counters().dropped.load(Ordering::SeqCst);
        assert!((1..500).contains(&dropped), "dropped {dropped}");
    }
}
