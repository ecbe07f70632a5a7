//! Running a few real-mode instructions through the raw KVM API: the guest-execution probe of
//! `doctor`. Guest memory is an anonymous mapping that outlives the vCPU that uses it.

use std::io;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit, VmFd};

/// Guest-physical address where the probe's code is placed and started (real mode, CS=0).
pub(crate) const CODE_ADDR: u64 = 0x1000;
const MEM_SIZE: usize = 0x4000;

/// Hand an open `/dev/kvm` to kvm-ioctls.
pub(crate) fn kvm_from_file(file: std::fs::File) -> Kvm {
    use std::os::fd::{FromRawFd, IntoRawFd};
    // SAFETY: `into_raw_fd` gives up ownership of a valid, open descriptor of /dev/kvm, which
    // `Kvm` then owns and closes.
    unsafe { Kvm::from_raw_fd(file.into_raw_fd()) }
}

/// What happened when the probe guest ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ExecOutcome {
    /// The guest reached `HLT`; `out` holds the bytes it wrote to port 0x3f8.
    Halted { out: Vec<u8> },
    /// The vCPU stopped for another reason (named).
    Unexpected(String),
}

/// An anonymous, private mapping that is unmapped on drop.
struct GuestMem {
    ptr: *mut libc::c_void,
    len: usize,
}

impl GuestMem {
    fn new(len: usize) -> io::Result<Self> {
        // SAFETY: an anonymous private mapping with no address hint has no preconditions; the
        // result is checked against MAP_FAILED before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { ptr, len })
    }

    fn write(&mut self, offset: usize, bytes: &[u8]) {
        assert!(offset + bytes.len() <= self.len, "probe code out of bounds");
        // SAFETY: the mapping is `len` bytes, writable, owned by us, and the range was checked.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.ptr.cast::<u8>().add(offset),
                bytes.len(),
            );
        }
    }
}

impl Drop for GuestMem {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` describe a mapping created in `new` and not unmapped before.
        unsafe {
            libc::munmap(self.ptr, self.len);
        }
    }
}

/// Map a small memory slot into `vm`, place `code` at [`CODE_ADDR`], run one vCPU in real mode
/// until `HLT` or `max_exits` exits, and report what it did. Blocks while the guest runs: the
/// caller puts a deadline around it.
pub(crate) fn run_real_mode(vm: &VmFd, code: &[u8], max_exits: usize) -> io::Result<ExecOutcome> {
    let mut mem = GuestMem::new(MEM_SIZE)?;
    mem.write(CODE_ADDR as usize, code);
    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: MEM_SIZE as u64,
        userspace_addr: mem.ptr as u64,
        flags: 0,
    };
    // SAFETY: the region describes `mem`, which stays mapped until after the vCPU and the VM
    // have been used: both are dropped (by the caller, for the VM) before `mem` goes away,
    // because `vcpu` is local here and KVM keeps no access to the slot after the VM fd closes.
    unsafe { vm.set_user_memory_region(region) }.map_err(io::Error::from)?;
    let mut vcpu = vm.create_vcpu(0).map_err(io::Error::from)?;
    let mut sregs = vcpu.get_sregs().map_err(io::Error::from)?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).map_err(io::Error::from)?;
    let regs = kvm_bindings::kvm_regs {
        rip: CODE_ADDR,
        rflags: 0x2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(io::Error::from)?;
    let mut out = Vec::new();
    for _ in 0..max_exits {
        match vcpu.run().map_err(io::Error::from)? {
            VcpuExit::IoOut(0x3f8, data) => out.extend_from_slice(data),
            VcpuExit::Hlt => return Ok(ExecOutcome::Halted { out }),
            other => return Ok(ExecOutcome::Unexpected(format!("{other:?}"))),
        }
    }
    // `vcpu` is declared after `mem`, so it is dropped (closed) before the memory is unmapped.
    Ok(ExecOutcome::Unexpected(format!(
        "no HLT after {max_exits} exits"
    )))
}
