//! The store server (`drydock __store-server`, launched through `drydock_vm::StoreServer`) driven
//! as QEMU would drive it, without a VM: this test is the vhost-user frontend. Guest memory is a
//! memfd shared with SET_MEM_TABLE, the request queue is a split virtqueue laid out by hand in
//! that memory, and every request is a real FUSE message whose reply is decoded from the used
//! ring. Also: the server exits when its frontend disconnects or on SIGTERM, and dies when the
//! process that launched it is SIGKILLed.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{Ordering, fence};
use std::time::{Duration, Instant};

use crate::common::{Checks, Drydock, bin};
use drydock_vm::{StoreServer, Supervised};
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemory, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const DEADLINE: Duration = Duration::from_secs(20);

const ALLOWED: &str = "0aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-allowed-1.0";
const ALLOWED_2: &str = "1bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-also-allowed";
const HIDDEN: &str = "2ccccccccccccccccccccccccccccccc-hidden-2.0";
const HELLO: &[u8] = b"hello from the store\n";
const NOISE: usize = 200;

// ---- a fake store --------------------------------------------------------------------------

struct FakeStore {
    _tmp: tempfile::TempDir,
    store: PathBuf,
    big: Vec<u8>,
}

fn fake_store() -> FakeStore {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("nix/store");
    std::fs::create_dir_all(store.join(ALLOWED).join("share")).unwrap();
    std::fs::write(store.join(ALLOWED).join("share/hello.txt"), HELLO).unwrap();
    let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(store.join(ALLOWED).join("big.bin"), &big).unwrap();
    std::os::unix::fs::symlink(
        format!("/nix/store/{ALLOWED}/share/hello.txt"),
        store.join(ALLOWED).join("link"),
    )
    .unwrap();
    std::fs::create_dir_all(store.join(ALLOWED_2)).unwrap();
    std::fs::create_dir_all(store.join(HIDDEN)).unwrap();
    std::fs::write(store.join(HIDDEN).join("secret"), b"not for the guest").unwrap();
    // Many hidden names, so whole readdir batches hold nothing to show.
    for i in 0..NOISE {
        std::fs::write(
            store.join(format!("9{i:031}-noise-with-a-long-name.drv")),
            b"x",
        )
        .unwrap();
    }
    FakeStore {
        _tmp: tmp,
        store,
        big,
    }
}

fn socket_in(dir: &Path) -> PathBuf {
    dir.join("store.sock")
}

// ---- FUSE encoding -------------------------------------------------------------------------

const FUSE_LOOKUP: u32 = 1;
const FUSE_GETATTR: u32 = 3;
const FUSE_SETATTR: u32 = 4;
const FUSE_READLINK: u32 = 5;
const FUSE_SYMLINK: u32 = 6;
const FUSE_MKNOD: u32 = 8;
const FUSE_MKDIR: u32 = 9;
const FUSE_UNLINK: u32 = 10;
const FUSE_RMDIR: u32 = 11;
const FUSE_RENAME: u32 = 12;
const FUSE_LINK: u32 = 13;
const FUSE_OPEN: u32 = 14;
const FUSE_READ: u32 = 15;
const FUSE_WRITE: u32 = 16;
const FUSE_RELEASE: u32 = 18;
const FUSE_SETXATTR: u32 = 21;
const FUSE_REMOVEXATTR: u32 = 24;
const FUSE_INIT: u32 = 26;
const FUSE_OPENDIR: u32 = 27;
const FUSE_READDIR: u32 = 28;
const FUSE_RELEASEDIR: u32 = 29;
const FUSE_ACCESS: u32 = 34;
const FUSE_CREATE: u32 = 35;
const FUSE_FALLOCATE: u32 = 43;
const FUSE_READDIRPLUS: u32 = 44;
const FUSE_RENAME2: u32 = 45;
const FUSE_COPY_FILE_RANGE: u32 = 47;

const ROOT: u64 = 1;
const FUSE_DO_READDIRPLUS: u32 = 1 << 13;

#[derive(Default)]
struct Body(Vec<u8>);

impl Body {
    fn u16(mut self, v: u16) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn name(mut self, s: &str) -> Self {
        self.0.extend_from_slice(s.as_bytes());
        self.0.push(0);
        self
    }
    fn bytes(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

/// A decoded FUSE reply: `error` is 0 or a negative errno.
#[derive(Debug)]
struct Reply {
    error: i32,
    data: Vec<u8>,
}

impl Reply {
    fn ok(self, what: &str) -> Vec<u8> {
        assert_eq!(self.error, 0, "{what}: errno {}", -self.error);
        self.data
    }
}

const ENTRY_OUT_LEN: usize = 128;
const ATTR_SIZE_AT: usize = 40 + 8;
const ATTR_MODE_AT: usize = 40 + 60;

/// Names in a READDIR (`plus == false`) or READDIRPLUS reply, with each entry's offset cookie.
fn dirents(data: &[u8], plus: bool) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < data.len() {
        if plus {
            at += ENTRY_OUT_LEN;
        }
        let off = u64_at(data, at + 8);
        let namelen = u32_at(data, at + 16) as usize;
        let name = &data[at + 24..at + 24 + namelen];
        out.push((String::from_utf8(name.to_vec()).unwrap(), off));
        at += (24 + namelen).div_ceil(8) * 8;
    }
    out
}

// ---- the vhost-user frontend ---------------------------------------------------------------

const MEM_SIZE: usize = 4 << 20;
const QUEUE_SIZE: u16 = 64;
const REQUEST_QUEUE: usize = 1;
const DESC_TABLE: u64 = 0x0;
const AVAIL_RING: u64 = 0x1000;
const USED_RING: u64 = 0x2000;
const REQ_BUF: u64 = 0x10000;
const REPLY_BUF: u64 = 0x100000;
const REPLY_CAP: u32 = 0x100000;
const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;
const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// A minimal virtio-fs driver speaking vhost-user to the server, one request in flight.
struct FsDriver {
    // Holds the vhost-user connection open; dropping it is the disconnect.
    _frontend: Frontend,
    mem: GuestMemoryMmap,
    kick: EventFd,
    _call: EventFd,
    avail_idx: u16,
    used_idx: u16,
    unique: u64,
}

impl FsDriver {
    fn connect(socket: &Path) -> Self {
        let ram = memfd::MemfdOptions::default()
            .create("drydock-test-guest-ram")
            .unwrap()
            .into_file();
        ram.set_len(MEM_SIZE as u64).unwrap();
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            MEM_SIZE,
            Some(FileOffset::new(ram, 0)),
        )])
        .unwrap();
        let region = mem.find_region(GuestAddress(0)).unwrap();
        let region_info = VhostUserMemoryRegionInfo::from_guest_region(region).unwrap();
        let hva = |gpa: u64| region_info.userspace_addr + gpa;

        let mut frontend = Frontend::connect(socket, 2).unwrap();
        frontend.set_owner().unwrap();
        let features = frontend.get_features().unwrap();
        let wanted = VIRTIO_F_VERSION_1
            | vhost::vhost_user::VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        assert_eq!(features & wanted, wanted, "backend features {features:#x}");
        // No EVENT_IDX, no indirect descriptors: the simplest ring discipline.
        frontend.set_features(wanted).unwrap();
        let proto = frontend.get_protocol_features().unwrap();
        frontend
            .set_protocol_features(
                proto & (VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK),
            )
            .unwrap();
        assert!(
            frontend.get_queue_num().unwrap() >= 2,
            "hiprio + request queue"
        );
        frontend.set_mem_table(&[region_info]).unwrap();

        let kick = EventFd::new(0).unwrap();
        let call = EventFd::new(0).unwrap();
        frontend.set_vring_num(REQUEST_QUEUE, QUEUE_SIZE).unwrap();
        frontend
            .set_vring_addr(
                REQUEST_QUEUE,
                &VringConfigData {
                    queue_max_size: QUEUE_SIZE,
                    queue_size: QUEUE_SIZE,
                    flags: 0,
                    desc_table_addr: hva(DESC_TABLE),
                    used_ring_addr: hva(USED_RING),
                    avail_ring_addr: hva(AVAIL_RING),
                    log_addr: None,
                },
            )
            .unwrap();
        frontend.set_vring_base(REQUEST_QUEUE, 0).unwrap();
        frontend.set_vring_call(REQUEST_QUEUE, &call).unwrap();
        frontend.set_vring_kick(REQUEST_QUEUE, &kick).unwrap();
        frontend.set_vring_enable(REQUEST_QUEUE, true).unwrap();
        Self {
            _frontend: frontend,
            mem,
            kick,
            _call: call,
            avail_idx: 0,
            used_idx: 0,
            unique: 0,
        }
    }

    fn put_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(DESC_TABLE + 16 * u64::from(index));
        let mut raw = Vec::with_capacity(16);
        raw.extend_from_slice(&addr.to_le_bytes());
        raw.extend_from_slice(&len.to_le_bytes());
        raw.extend_from_slice(&flags.to_le_bytes());
        raw.extend_from_slice(&next.to_le_bytes());
        self.mem.write_slice(&raw, at).unwrap();
    }

    /// Send one FUSE request and wait for its reply.
    fn call(&mut self, opcode: u32, nodeid: u64, body: Body) -> Reply {
        self.call_with_reply_len(opcode, nodeid, body, REPLY_CAP)
    }

    /// READ with a reply buffer of exactly header + `size`, as the Linux driver sizes it
    /// (virtiofsd fills whatever buffer it is given and fails a READ whose file has more).
    fn read(&mut self, nodeid: u64, fh: u64, offset: u64, size: u32) -> Reply {
        self.call_with_reply_len(
            FUSE_READ,
            nodeid,
            Self::read_in(fh, offset, size),
            16 + size,
        )
    }

    fn call_with_reply_len(
        &mut self,
        opcode: u32,
        nodeid: u64,
        body: Body,
        reply_len: u32,
    ) -> Reply {
        assert!(reply_len <= REPLY_CAP);
        self.unique += 1;
        let unique = self.unique;
        let len = 40 + body.0.len() as u32;
        let msg = Body::default()
            .u32(len)
            .u32(opcode)
            .u64(unique)
            .u64(nodeid)
            .u32(0) // uid
            .u32(0) // gid
            .u32(1) // pid
            .u16(0) // total_extlen
            .u16(0)
            .bytes(&body.0);
        self.mem.write_slice(&msg.0, GuestAddress(REQ_BUF)).unwrap();
        self.mem
            .write_slice(&[0u8; 16], GuestAddress(REPLY_BUF))
            .unwrap();
        self.put_desc(0, REQ_BUF, len, VIRTQ_DESC_F_NEXT, 1);
        self.put_desc(1, REPLY_BUF, reply_len, VIRTQ_DESC_F_WRITE, 0);

        let slot = u64::from(self.avail_idx % QUEUE_SIZE);
        self.mem
            .write_obj(0u16.to_le(), GuestAddress(AVAIL_RING + 4 + 2 * slot))
            .unwrap();
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx.to_le(), GuestAddress(AVAIL_RING + 2))
            .unwrap();
        fence(Ordering::SeqCst);
        self.kick.write(1).unwrap();

        let start = Instant::now();
        loop {
            let used: u16 = self.mem.read_obj(GuestAddress(USED_RING + 2)).unwrap();
            if u16::from_le(used) != self.used_idx {
                break;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "no reply to opcode {opcode} within {DEADLINE:?}"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        fence(Ordering::SeqCst);
        let elem = u64::from(self.used_idx % QUEUE_SIZE);
        let id: u32 = self
            .mem
            .read_obj(GuestAddress(USED_RING + 4 + 8 * elem))
            .unwrap();
        let written: u32 = self
            .mem
            .read_obj(GuestAddress(USED_RING + 8 + 8 * elem))
            .unwrap();
        self.used_idx = self.used_idx.wrapping_add(1);
        assert_eq!(u32::from_le(id), 0, "used element names our chain head");

        let mut header = [0u8; 16];
        self.mem
            .read_slice(&mut header, GuestAddress(REPLY_BUF))
            .unwrap();
        let out_len = u32_at(&header, 0);
        let error = u32_at(&header, 4) as i32;
        assert_eq!(u64_at(&header, 8), unique, "reply answers our request");
        assert_eq!(
            out_len,
            u32::from_le(written),
            "used length is the reply length"
        );
        let mut data = vec![0u8; out_len as usize - 16];
        self.mem
            .read_slice(&mut data, GuestAddress(REPLY_BUF + 16))
            .unwrap();
        Reply { error, data }
    }

    fn init(&mut self) -> (u32, u32) {
        let out = self
            .call(
                FUSE_INIT,
                0,
                Body::default()
                    .u32(7)
                    .u32(31)
                    .u32(128 * 1024)
                    .u32(FUSE_DO_READDIRPLUS),
            )
            .ok("INIT");
        (u32_at(&out, 0), u32_at(&out, 4))
    }

    fn lookup(&mut self, parent: u64, name: &str) -> Reply {
        self.call(FUSE_LOOKUP, parent, Body::default().name(name))
    }

    fn lookup_ok(&mut self, parent: u64, name: &str) -> (u64, Vec<u8>) {
        let e = self.lookup(parent, name).ok(&format!("LOOKUP {name}"));
        (u64_at(&e, 0), e)
    }

    fn open(&mut self, opcode: u32, nodeid: u64, flags: u32) -> Reply {
        self.call(opcode, nodeid, Body::default().u32(flags).u32(0))
    }

    fn read_in(fh: u64, offset: u64, size: u32) -> Body {
        Body::default()
            .u64(fh)
            .u64(offset)
            .u32(size)
            .u32(0)
            .u64(0)
            .u32(0)
            .u32(0)
    }

    /// Every name in a directory, reading it `size` bytes at a time.
    fn list(&mut self, dir: u64, opcode: u32, size: u32) -> Vec<String> {
        let fh = u64_at(&self.open(FUSE_OPENDIR, dir, 0).ok("OPENDIR"), 0);
        let mut names = Vec::new();
        let mut offset = 0;
        loop {
            let data = self
                .call(opcode, dir, Self::read_in(fh, offset, size))
                .ok("READDIR");
            let batch = dirents(&data, opcode == FUSE_READDIRPLUS);
            let Some(&(_, last)) = batch.last() else {
                break;
            };
            offset = last;
            names.extend(batch.into_iter().map(|(n, _)| n));
        }
        self.call(FUSE_RELEASEDIR, dir, Self::read_in(fh, 0, 0))
            .ok("RELEASEDIR");
        names
    }
}

fn errno_name(e: i32) -> String {
    std::io::Error::from_raw_os_error(-e).to_string()
}

fn assert_errno(reply: Reply, errno: i32, what: &str) {
    assert_eq!(
        reply.error,
        -errno,
        "{what}: expected {}, got {} (data {} bytes)",
        errno_name(-errno),
        if reply.error == 0 {
            "success".to_owned()
        } else {
            errno_name(reply.error)
        },
        reply.data.len()
    );
}

fn wait_exit(server: &mut StoreServer) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = server.try_wait().unwrap() {
            return status;
        }
        assert!(start.elapsed() < DEADLINE, "server still running");
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ---- tests ---------------------------------------------------------------------------------

#[test]
fn closure_share_is_filtered_read_only_and_serves_bytes() {
    // One server and one FUSE session (one frontend per server) go through every request
    // below. Each group of checks is soft (common::Checks): a wrong reply is recorded and the
    // requests after it still run (a failed check never leaves a request half-sent), and the
    // test fails at the end listing every failure. The lookups whose node ids later requests
    // use, and the open handle the data writes use, are hard.
    let mut checks = Checks::new();
    let store = fake_store();
    let run = tempfile::tempdir().unwrap();
    let socket = socket_in(run.path());
    let allow = vec![ALLOWED.to_owned(), ALLOWED_2.to_owned()];
    let mut server = StoreServer::spawn(bin(), &socket, &store.store, Some(&allow)).unwrap();
    assert!(socket.exists(), "listening once ready");

    let mut fs = FsDriver::connect(&socket);
    let (major, minor) = fs.init();
    checks.check("FUSE version", || {
        assert_eq!(major, 7, "FUSE major");
        assert!(minor >= 27, "FUSE minor {minor}");
    });

    // Root: lookups of allowed names succeed, others look absent.
    let (allowed, entry) = fs.lookup_ok(ROOT, ALLOWED);
    checks.check("an allowed store path is a directory", || {
        assert_ne!(allowed, ROOT);
        assert_eq!(u32_at(&entry, ATTR_MODE_AT) & libc::S_IFMT, libc::S_IFDIR);
    });
    checks.check(
        "root lookups: allowed names succeed, others look absent",
        || {
            fs.lookup_ok(ROOT, ALLOWED_2);
            assert_errno(fs.lookup(ROOT, HIDDEN), libc::ENOENT, "LOOKUP hidden");
            assert_errno(
                fs.lookup(
                    ROOT,
                    "9000000000000000000000000000000-noise-with-a-long-name.drv",
                ),
                libc::ENOENT,
                "LOOKUP noise",
            );
            assert_errno(
                fs.lookup(ROOT, "no-such-path"),
                libc::ENOENT,
                "LOOKUP missing",
            );
        },
    );
    checks.check(
        "no walking around the root filter with multi-component names",
        || {
            // No walking around the root filter with multi-component names.
            assert_errno(
                fs.lookup(allowed, &format!("../{HIDDEN}")),
                libc::EINVAL,
                "LOOKUP ../hidden",
            );
            assert_errno(
                fs.lookup(ROOT, &format!("{ALLOWED}/../{HIDDEN}")),
                libc::EINVAL,
                "LOOKUP allowed/../hidden",
            );
        },
    );
    checks.check("`..` never leads past a store path", || {
        // `..` never leads past a store path (virtiofsd resolves names beneath their parent).
        let (dotdot, _) = fs.lookup_ok(allowed, "..");
        assert!(
            dotdot == allowed || dotdot == ROOT,
            "`..` of a store path is {dotdot}"
        );
    });

    // Root listings show only the allowed entries, with READDIR and READDIRPLUS, even when
    // whole batches (small buffers) hold only hidden names.
    let expected: BTreeSet<String> = [".", "..", ALLOWED, ALLOWED_2]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for (opcode, size) in [
        (FUSE_READDIR, 4096),
        (FUSE_READDIR, 128),
        (FUSE_READDIRPLUS, 65536),
        (FUSE_READDIRPLUS, 512),
    ] {
        checks.check(
            &format!("root listing, opcode {opcode}, size {size}"),
            || {
                let names = fs.list(ROOT, opcode, size);
                assert_eq!(names.len(), expected.len(), "no duplicates: {names:?}");
                let got: BTreeSet<String> = names.into_iter().collect();
                assert_eq!(got, expected, "opcode {opcode} size {size}");
            },
        );
    }
    checks.check("deeper levels are not filtered", || {
        // Deeper levels are not filtered.
        let inside: BTreeSet<String> = fs
            .list(allowed, FUSE_READDIRPLUS, 4096)
            .into_iter()
            .collect();
        assert!(
            ["share", "big.bin", "link"]
                .iter()
                .all(|n| inside.contains(*n)),
            "{inside:?}"
        );
    });

    // Reading: a small file, a large one across many READs, a symlink.
    let (share, _) = fs.lookup_ok(allowed, "share");
    let (hello, entry) = fs.lookup_ok(share, "hello.txt");
    checks.check("reading a small file", || {
        assert_eq!(u64_at(&entry, ATTR_SIZE_AT), HELLO.len() as u64);
        let fh = u64_at(
            &fs.open(FUSE_OPEN, hello, libc::O_RDONLY as u32).ok("OPEN"),
            0,
        );
        let data = fs.read(hello, fh, 0, 4096).ok("READ");
        assert_eq!(data, HELLO);
        fs.call(FUSE_RELEASE, hello, FsDriver::read_in(fh, 0, 0))
            .ok("RELEASE");
    });

    checks.check("reading a large file across many READs", || {
        let (big, _) = fs.lookup_ok(allowed, "big.bin");
        let fh = u64_at(
            &fs.open(FUSE_OPEN, big, libc::O_RDONLY as u32)
                .ok("OPEN big"),
            0,
        );
        let mut got = Vec::new();
        loop {
            let chunk = fs.read(big, fh, got.len() as u64, 65536).ok("READ big");
            if chunk.is_empty() {
                break;
            }
            got.extend_from_slice(&chunk);
        }
        assert_eq!(got, store.big);
        fs.call(FUSE_GETATTR, big, Body::default().u32(0).u32(0).u64(0))
            .ok("GETATTR");
    });

    checks.check("reading a symlink", || {
        let (link, _) = fs.lookup_ok(allowed, "link");
        let target = fs.call(FUSE_READLINK, link, Body::default()).ok("READLINK");
        assert_eq!(
            target,
            format!("/nix/store/{ALLOWED}/share/hello.txt").as_bytes()
        );
    });

    // Every write opcode is EROFS, at the root, inside a store path, on existing files, and on
    // hidden names alike.
    let setattr_mode = Body::default()
        .u32(1) // FATTR_MODE
        .u32(0)
        .u64(0)
        .u64(0)
        .u64(0)
        .u64(0)
        .u64(0)
        .u64(0)
        .u32(0)
        .u32(0)
        .u32(0)
        .u32(0o777)
        .u32(0)
        .u32(0)
        .u32(0)
        .u32(0);
    let writes: Vec<(&str, u32, u64, Body)> = vec![
        (
            "MKDIR root",
            FUSE_MKDIR,
            ROOT,
            Body::default().u32(0o755).u32(0).name("new"),
        ),
        (
            "MKDIR hidden",
            FUSE_MKDIR,
            ROOT,
            Body::default().u32(0o755).u32(0).name(HIDDEN),
        ),
        (
            "MKDIR inside",
            FUSE_MKDIR,
            allowed,
            Body::default().u32(0o755).u32(0).name("new"),
        ),
        (
            "CREATE",
            FUSE_CREATE,
            share,
            Body::default()
                .u32((libc::O_CREAT | libc::O_WRONLY) as u32)
                .u32(0o644)
                .u32(0)
                .u32(0)
                .name("new.txt"),
        ),
        (
            "CREATE existing",
            FUSE_CREATE,
            share,
            Body::default()
                .u32(libc::O_CREAT as u32)
                .u32(0o644)
                .u32(0)
                .u32(0)
                .name("hello.txt"),
        ),
        (
            "MKNOD",
            FUSE_MKNOD,
            share,
            Body::default()
                .u32(libc::S_IFIFO | 0o644)
                .u32(0)
                .u32(0)
                .u32(0)
                .name("fifo"),
        ),
        (
            "SYMLINK",
            FUSE_SYMLINK,
            share,
            Body::default().name("sl").name("/etc/passwd"),
        ),
        (
            "UNLINK",
            FUSE_UNLINK,
            share,
            Body::default().name("hello.txt"),
        ),
        ("RMDIR", FUSE_RMDIR, allowed, Body::default().name("share")),
        (
            "RMDIR root",
            FUSE_RMDIR,
            ROOT,
            Body::default().name(ALLOWED_2),
        ),
        (
            "RENAME",
            FUSE_RENAME,
            share,
            Body::default()
                .u64(share)
                .name("hello.txt")
                .name("moved.txt"),
        ),
        (
            "RENAME2",
            FUSE_RENAME2,
            share,
            Body::default()
                .u64(share)
                .u32(0)
                .u32(0)
                .name("hello.txt")
                .name("moved.txt"),
        ),
        (
            "LINK",
            FUSE_LINK,
            share,
            Body::default().u64(hello).name("hard"),
        ),
        ("SETATTR", FUSE_SETATTR, hello, setattr_mode),
        (
            "SETXATTR",
            FUSE_SETXATTR,
            hello,
            Body::default().u32(1).u32(0).name("user.x").bytes(b"1"),
        ),
        (
            "REMOVEXATTR",
            FUSE_REMOVEXATTR,
            hello,
            Body::default().name("user.x"),
        ),
        (
            "OPEN O_RDWR",
            FUSE_OPEN,
            hello,
            Body::default().u32(libc::O_RDWR as u32).u32(0),
        ),
        (
            "OPEN O_WRONLY|O_TRUNC",
            FUSE_OPEN,
            hello,
            Body::default()
                .u32((libc::O_WRONLY | libc::O_TRUNC) as u32)
                .u32(0),
        ),
        (
            "ACCESS W_OK",
            FUSE_ACCESS,
            hello,
            Body::default().u32(libc::W_OK as u32).u32(0),
        ),
    ];
    for (what, opcode, nodeid, body) in writes {
        checks.check(&format!("{what} is EROFS"), || {
            assert_errno(fs.call(opcode, nodeid, body), libc::EROFS, what);
        });
    }
    // Data writes on a handle that is open for reading.
    let fh = u64_at(
        &fs.open(FUSE_OPEN, hello, libc::O_RDONLY as u32).ok("OPEN"),
        0,
    );
    let write = Body::default()
        .u64(fh)
        .u64(0)
        .u32(4)
        .u32(0)
        .u64(0)
        .u32(0)
        .u32(0)
        .bytes(b"evil");
    checks.check("WRITE is EROFS", || {
        assert_errno(fs.call(FUSE_WRITE, hello, write), libc::EROFS, "WRITE");
    });
    let fallocate = Body::default().u64(fh).u64(0).u64(4096).u32(0).u32(0);
    checks.check("FALLOCATE is EROFS", || {
        assert_errno(
            fs.call(FUSE_FALLOCATE, hello, fallocate),
            libc::EROFS,
            "FALLOCATE",
        );
    });
    let copy = Body::default()
        .u64(fh)
        .u64(0)
        .u64(hello)
        .u64(fh)
        .u64(100)
        .u64(4)
        .u64(0);
    checks.check("COPY_FILE_RANGE is EROFS", || {
        assert_errno(
            fs.call(FUSE_COPY_FILE_RANGE, hello, copy),
            libc::EROFS,
            "COPY_FILE_RANGE",
        );
    });
    fs.call(FUSE_RELEASE, hello, FsDriver::read_in(fh, 0, 0))
        .ok("RELEASE");

    checks.check("nothing changed on the host", || {
        assert_eq!(
            std::fs::read(store.store.join(ALLOWED).join("share/hello.txt")).unwrap(),
            HELLO
        );
        let host_names: Vec<_> = std::fs::read_dir(store.store.join(ALLOWED).join("share"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(host_names, vec![std::ffi::OsString::from("hello.txt")]);
        assert!(!store.store.join("new").exists());
    });

    // One frontend per server: it exits cleanly once this one disconnects.
    drop(fs);
    let status = wait_exit(&mut server);
    assert!(status.success(), "server exit {status:?}");
    server.stop().unwrap();
    assert!(!socket.exists(), "socket removed on stop");
}

#[test]
fn the_closure_view_changes_live_without_stale_entries_or_listings() {
    let store = fake_store();
    let run = tempfile::tempdir().unwrap();
    let socket = socket_in(run.path());
    let server =
        StoreServer::spawn(bin(), &socket, &store.store, Some(&[ALLOWED.to_owned()])).unwrap();
    let mut fs = FsDriver::connect(&socket);
    fs.init();
    let set = |names: &[&str]| -> BTreeSet<String> {
        [".", ".."]
            .iter()
            .chain(names)
            .map(|s| s.to_string())
            .collect()
    };
    // Before: the new path is absent, and its absence is asked again each time (ENOENT, not a
    // cached negative entry); the root is opened without directory caching.
    assert_errno(fs.lookup(ROOT, ALLOWED_2), libc::ENOENT, "LOOKUP before");
    let open = fs.open(FUSE_OPENDIR, ROOT, 0).ok("OPENDIR root");
    const FOPEN_KEEP_CACHE: u32 = 1 << 1;
    const FOPEN_CACHE_DIR: u32 = 1 << 3;
    assert_eq!(
        u32_at(&open, 8) & (FOPEN_CACHE_DIR | FOPEN_KEEP_CACHE),
        0,
        "the filtered root must not be cached"
    );
    let listed: BTreeSet<String> = fs.list(ROOT, FUSE_READDIR, 4096).into_iter().collect();
    assert_eq!(listed, set(&[ALLOWED]));

    // Grow: the next lookup and listing see it, with no restart of server or guest.
    let shown = drydock_vm::update_closure(
        &socket,
        &[ALLOWED.to_owned(), ALLOWED_2.to_owned()],
        Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!(shown, 2);
    fs.lookup_ok(ROOT, ALLOWED_2);
    let listed: BTreeSet<String> = fs.list(ROOT, FUSE_READDIRPLUS, 65536).into_iter().collect();
    assert_eq!(listed, set(&[ALLOWED, ALLOWED_2]));

    // Shrink to the new closure: the old path is gone for new lookups and listings.
    assert_eq!(
        drydock_vm::update_closure(&socket, &[ALLOWED_2.to_owned()], Duration::from_secs(5))
            .unwrap(),
        1
    );
    assert_errno(
        fs.lookup(ROOT, ALLOWED),
        libc::ENOENT,
        "LOOKUP after shrink",
    );
    let listed: BTreeSet<String> = fs.list(ROOT, FUSE_READDIR, 4096).into_iter().collect();
    assert_eq!(listed, set(&[ALLOWED_2]));

    // A bad list is refused by the client, and one that gets past it by the server; the view
    // stays as it was.
    let bad = drydock_vm::update_closure(&socket, &["../etc".to_owned()], Duration::from_secs(5));
    assert!(bad.is_err_and(|e| e.is_bad_input()));
    let ctl = {
        let mut p = socket.clone().into_os_string();
        p.push(".ctl");
        PathBuf::from(p)
    };
    let mut raw = std::os::unix::net::UnixStream::connect(&ctl).unwrap();
    std::io::Write::write_all(&mut raw, b"a/b\n").unwrap();
    raw.shutdown(std::net::Shutdown::Write).unwrap();
    let mut reply = String::new();
    BufReader::new(&raw).read_line(&mut reply).unwrap();
    assert!(reply.starts_with("error: "), "{reply}");
    fs.lookup_ok(ROOT, ALLOWED_2);
    assert_errno(fs.lookup(ROOT, HIDDEN), libc::ENOENT, "LOOKUP hidden");

    let status = server.stop().unwrap();
    assert!(Supervised::is_clean_stop(&status), "{status:?}");
    assert!(
        !ctl.exists(),
        "the control socket is removed with the server"
    );
}

#[test]
fn whole_store_share_shows_everything() {
    let store = fake_store();
    let run = tempfile::tempdir().unwrap();
    let socket = socket_in(run.path());
    let server = StoreServer::spawn(bin(), &socket, &store.store, None).unwrap();
    let mut fs = FsDriver::connect(&socket);
    fs.init();
    let (hidden, _) = fs.lookup_ok(ROOT, HIDDEN);
    let (secret, _) = fs.lookup_ok(hidden, "secret");
    let fh = u64_at(
        &fs.open(FUSE_OPEN, secret, libc::O_RDONLY as u32).ok("OPEN"),
        0,
    );
    let data = fs.read(secret, fh, 0, 4096).ok("READ");
    assert_eq!(data, b"not for the guest");
    let names = fs.list(ROOT, FUSE_READDIR, 4096);
    assert_eq!(names.len(), 2 + 3 + NOISE, "all entries listed");
    // Still read-only.
    assert_errno(
        fs.call(FUSE_UNLINK, hidden, Body::default().name("secret")),
        libc::EROFS,
        "UNLINK",
    );
    assert!(store.store.join(HIDDEN).join("secret").exists());
    let status = server.stop().unwrap();
    assert!(Supervised::is_clean_stop(&status), "{status:?}");
}

#[test]
fn sigterm_stops_a_waiting_server() {
    let store = fake_store();
    let run = tempfile::tempdir().unwrap();
    let socket = socket_in(run.path());
    let server = StoreServer::spawn(bin(), &socket, &store.store, None).unwrap();
    let status = server.stop_within(Duration::from_secs(10)).unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGTERM),
        "ended by SIGTERM, not the SIGKILL fallback"
    );
    assert!(!socket.exists());
}

#[test]
fn bad_input_exits_2() {
    let run = tempfile::tempdir().unwrap();
    let socket = socket_in(run.path());
    let out = Drydock::new()
        .args(["__store-server", "--socket"])
        .arg(&socket)
        .args(["--shared-dir", "/nonexistent/nix/store"])
        .run();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/nix/store"));

    let store = fake_store();
    let list = run.path().join("allow");
    std::fs::write(&list, format!("{ALLOWED}\n../etc\n")).unwrap();
    let out = Drydock::new()
        .args(["__store-server", "--socket"])
        .arg(&socket)
        .arg("--shared-dir")
        .arg(&store.store)
        .arg("--allow-list")
        .arg(&list)
        .run();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(!socket.exists(), "nothing bound on bad input");
}

#[test]
fn hidden_subcommand_is_not_in_help() {
    let out = Drydock::new().arg("--help").run();
    assert!(out.status.success());
    assert!(!String::from_utf8_lossy(&out.stdout).contains("store-server"));
}

const PARENT_ROLE: &str = "DRYDOCK_TEST_STORE_PARENT_DIR";

/// Not a test on its own: the stand-in for drydock in `server_dies_with_its_parent`. It launches
/// a store server and then waits to be killed.
#[test]
#[ignore = "helper process for server_dies_with_its_parent"]
fn helper_parent_process() {
    let dir = PathBuf::from(std::env::var_os(PARENT_ROLE).expect("run by the parent test"));
    let server = StoreServer::spawn(
        bin(),
        &dir.join("store.sock"),
        &dir.join("nix/store"),
        Some(&[ALLOWED.to_owned()]),
    )
    .unwrap();
    println!("server-pid {}", server.pid());
    std::thread::sleep(Duration::from_secs(120));
    panic!("the parent test should have killed this process");
}

fn is_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // A zombie waiting for a reaper is dead too.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

#[test]
fn server_dies_with_its_parent() {
    let store = fake_store();
    let dir = store.store.parent().unwrap().parent().unwrap().to_owned();
    let mut parent = Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact"])
        // The helper's name as libtest knows it: its module path without the crate's name.
        .arg(match module_path!().split_once("::") {
            Some((_, module)) => format!("{module}::helper_parent_process"),
            None => "helper_parent_process".to_owned(),
        })
        .args(["--nocapture", "--test-threads=1"])
        .env(PARENT_ROLE, &dir)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(parent.stdout.take().unwrap()).lines();
    let pid: u32 = loop {
        let line = lines
            .next()
            .expect("helper ended before reporting the server pid")
            .unwrap();
        // libtest may print "test helper_parent_process ... " on the same line first.
        if let Some((_, pid)) = line.split_once("server-pid ") {
            break pid.trim().parse().unwrap();
        }
    };
    assert!(!is_gone(pid), "server running while its parent lives");

    parent.kill().unwrap(); // SIGKILL: no destructor, no SIGTERM to the server
    parent.wait().unwrap();
    let start = Instant::now();
    while !is_gone(pid) {
        assert!(
            start.elapsed() < DEADLINE,
            "store server {pid} outlived its SIGKILLed parent"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn status_field(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .trim()
        .to_owned()
}

#[test]
fn server_is_sandboxed() {
    let store = fake_store();
    let run = tempfile::tempdir().unwrap();
    let socket = socket_in(run.path());
    let server = StoreServer::spawn(bin(), &socket, &store.store, None).unwrap();
    let pid = server.pid();
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    assert_eq!(status_field(pid, "Seccomp"), "2", "seccomp filter mode");
    let root = std::fs::read_link(format!("/proc/{pid}/root"));
    if std::fs::metadata("/proc/self").is_ok()
        && status_field(std::process::id(), "Uid")
            .split_whitespace()
            .nth(1)
            == Some("0")
    {
        // As root: chrooted into the store, only CAP_DAC_READ_SEARCH (bit 2) left, own netns.
        assert_eq!(root.unwrap(), std::fs::canonicalize(&store.store).unwrap());
        assert_eq!(status_field(pid, "CapEff"), "0000000000000004");
        assert_eq!(status_field(pid, "CapPrm"), "0000000000000004");
        let ours = std::fs::read_link("/proc/self/ns/net").unwrap();
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
        assert_ne!(ours, theirs, "own network namespace");
    }
    server.stop().unwrap();
}
