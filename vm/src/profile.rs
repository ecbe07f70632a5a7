//! Machine profiles: what devices a guest gets. The `drydock` profile is drydock's own guest
//! (the store over virtio-fs, a blank disk, VLAN NICs). The `nixos-test` profile gives a node
//! what nixpkgs' `qemu-vm.nix` gives it, and reads what to give from the guest's own
//! `/etc/fstab` (the toplevel's `etc/fstab`):
//!
//! - `/` on `/dev/disk/by-label/L` → an ext4 file system labelled `L` on a virtio disk with
//!   `serial=root`; `/` on tmpfs → no disk;
//! - an entry of type `9p` or `virtiofs` names a share by its device field, the tag:
//!   `nix-store` (the store, read-only), `xchg` (a writable folder of the machine's own) and
//!   `shared` (one writable folder for the whole cluster), over the transport its type names;
//! - file systems the guest makes itself (tmpfs, overlay, proc, …) need nothing.
//!
//! Any other device or tag is refused, naming the fstab line. Parsing is pure and tested as
//! tables; `resolve` turns the result into a launch.

use serde::{Deserialize, Serialize};

/// Which devices a machine gets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Profile {
    /// drydock's own guests: today's devices, unchanged.
    #[default]
    Drydock,
    /// A nixosTest node: what its fstab names, a user-mode NIC first, `regInfo=`.
    NixosTest,
}

/// A profile's defaults, for what the user did not set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProfileDefaults {
    pub memory_mib: u32,
    pub cpus: u32,
    pub disk_mib: u32,
}

impl Profile {
    /// Every profile, for messages.
    pub const ALL: [Profile; 2] = [Profile::Drydock, Profile::NixosTest];

    /// The profile named `s` (`drydock`, `nixos-test`).
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Drydock => "drydock",
            Self::NixosTest => "nixos-test",
        }
    }

    /// Memory, cores and disk size when not given: drydock's guests are small; a nixos-test
    /// node gets qemu-vm's defaults (1024 MiB, 1 core, 1024 MiB of disk), since NixOS's test
    /// instrumentation panics on OOM.
    pub fn defaults(self) -> ProfileDefaults {
        match self {
            Self::Drydock => ProfileDefaults {
                memory_mib: 512,
                cpus: 1,
                disk_mib: 1024,
            },
            Self::NixosTest => ProfileDefaults {
                memory_mib: 1024,
                cpus: 1,
                disk_mib: 1024,
            },
        }
    }
}

/// How a share reaches the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Transport {
    /// QEMU's own 9p server (`-virtfs`).
    NineP,
    /// virtio-fs, served by drydock's store server.
    VirtioFs,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NineP => "9p",
            Self::VirtioFs => "virtiofs",
        }
    }
}

/// The shares a nixos-test node may ask for, by tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ShareTag {
    /// `nix-store`: the store, read-only.
    Store,
    /// `xchg`: a writable folder of the machine's own.
    Xchg,
    /// `shared`: one writable folder for every machine of the cluster.
    Shared,
}

impl ShareTag {
    pub const ALL: [ShareTag; 3] = [ShareTag::Store, ShareTag::Xchg, ShareTag::Shared];

    /// The mount tag, as the guest's fstab names it.
    pub fn tag(self) -> &'static str {
        match self {
            Self::Store => "nix-store",
            Self::Xchg => "xchg",
            Self::Shared => "shared",
        }
    }

    fn parse(tag: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.tag() == tag)
    }
}

/// One share the guest's fstab asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareNeed {
    pub tag: ShareTag,
    pub transport: Transport,
}

/// What a guest's fstab asks drydock to provide.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestNeeds {
    /// The label of the ext4 file system `/` is mounted from; `None`: no disk (tmpfs root).
    pub root_label: Option<String>,
    /// The shares, each tag once, in the order the fstab names them.
    pub shares: Vec<ShareNeed>,
}

impl GuestNeeds {
    /// How the share `tag` reaches the guest, if it asks for it.
    pub fn transport(&self, tag: ShareTag) -> Option<Transport> {
        self.shares
            .iter()
            .find(|s| s.tag == tag)
            .map(|s| s.transport)
    }
}

/// Why a guest's fstab cannot be served.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum FstabError {
    #[error(
        "line {line} ({text:?}): drydock does not know the share tag {tag:?} (it provides nix-store, xchg and shared)"
    )]
    UnknownTag {
        line: usize,
        text: String,
        tag: String,
    },
    #[error(
        "line {line} ({text:?}): the share {tag:?} is also mounted over {other} on line {first}"
    )]
    MixedTransports {
        line: usize,
        text: String,
        tag: String,
        other: &'static str,
        first: usize,
    },
    #[error(
        "line {line} ({text:?}): drydock provides `/` as /dev/disk/by-label/LABEL (ext4) or tmpfs, and no other disk"
    )]
    Device { line: usize, text: String },
    #[error(
        "line {line} ({text:?}): the root file system's label must be 1-16 letters, digits, '-', '_' or '.'"
    )]
    Label { line: usize, text: String },
    #[error("line {line} ({text:?}): drydock makes ext4 root file systems, not {fs_type}")]
    RootType {
        line: usize,
        text: String,
        fs_type: String,
    },
    #[error("line {line} ({text:?}): fewer than 3 fields")]
    Short { line: usize, text: String },
}

/// An fstab field with its octal escapes (`\040` for a space) undone.
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn valid_label(l: &str) -> bool {
    !l.is_empty()
        && l.len() <= 16
        && l.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Whether an fstab device field names a block device (which drydock would have to provide).
fn names_a_device(spec: &str) -> bool {
    spec.starts_with("/dev/")
        || ["LABEL=", "UUID=", "PARTUUID=", "PARTLABEL="]
            .iter()
            .any(|p| spec.starts_with(p))
}

/// Read a guest's fstab (`TOPLEVEL/etc/fstab`) into what drydock must provide.
pub fn parse_fstab(text: &str) -> Result<GuestNeeds, FstabError> {
    let mut needs = GuestNeeds::default();
    let mut first_line: Vec<(ShareTag, usize)> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let body = raw.trim();
        if body.is_empty() || body.starts_with('#') {
            continue;
        }
        let text = || body.chars().take(200).collect::<String>();
        let fields: Vec<String> = body.split_whitespace().map(unescape).collect();
        let [spec, target, fs_type, ..] = &fields[..] else {
            return Err(FstabError::Short { line, text: text() });
        };
        let transport = match fs_type.as_str() {
            "9p" => Some(Transport::NineP),
            "virtiofs" => Some(Transport::VirtioFs),
            _ => None,
        };
        if let Some(transport) = transport {
            let tag = ShareTag::parse(spec).ok_or_else(|| FstabError::UnknownTag {
                line,
                text: text(),
                tag: spec.clone(),
            })?;
            match needs.shares.iter().find(|s| s.tag == tag) {
                Some(s) if s.transport != transport => {
                    let first = first_line
                        .iter()
                        .find(|(t, _)| *t == tag)
                        .map_or(0, |(_, l)| *l);
                    return Err(FstabError::MixedTransports {
                        line,
                        text: text(),
                        tag: spec.clone(),
                        other: s.transport.as_str(),
                        first,
                    });
                }
                Some(_) => {}
                None => {
                    needs.shares.push(ShareNeed { tag, transport });
                    first_line.push((tag, line));
                }
            }
            continue;
        }
        if target == "/" {
            if let Some(label) = spec.strip_prefix("/dev/disk/by-label/") {
                if !valid_label(label) {
                    return Err(FstabError::Label { line, text: text() });
                }
                if !matches!(fs_type.as_str(), "ext4" | "auto") {
                    return Err(FstabError::RootType {
                        line,
                        text: text(),
                        fs_type: fs_type.clone(),
                    });
                }
                needs.root_label = Some(label.to_string());
                continue;
            }
            if fs_type == "tmpfs" || spec == "tmpfs" {
                needs.root_label = None;
                continue;
            }
            return Err(FstabError::Device { line, text: text() });
        }
        if names_a_device(spec) {
            return Err(FstabError::Device { line, text: text() });
        }
    }
    Ok(needs)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fstab a NixOS test node of the 9p era has (qemu-vm with `writableStore`).
    const NIXOS_9P: &str = "\
# This is a generated file.  Do not edit!
#
# To make changes, edit the fileSystems and swapDevices NixOS options
# in your /etc/nixos/configuration.nix file.
#
# <file system> <mount point>   <type>  <options>       <dump>  <pass>

# Filesystems.
/dev/disk/by-label/nixos / ext4 x-initrd.mount 0 1
nix-store /nix/.ro-store 9p trans=virtio,version=9p2000.L,msize=16384,x-systemd.requires=modprobe@9pnet_virtio.service,cache=loose,x-initrd.mount 0 0
tmpfs /nix/.rw-store tmpfs mode=0755,x-initrd.mount 0 0
shared /tmp/shared 9p trans=virtio,version=9p2000.L,msize=16384,x-systemd.requires=modprobe@9pnet_virtio.service 0 0
xchg /tmp/xchg 9p trans=virtio,version=9p2000.L,msize=16384,x-systemd.requires=modprobe@9pnet_virtio.service 0 0
overlay /nix/store overlay lowerdir=/nix/.ro-store,upperdir=/nix/.rw-store/store,workdir=/nix/.rw-store/work,x-initrd.mount 0 0

# Swap devices.
";

    fn need(tag: ShareTag, transport: Transport) -> ShareNeed {
        ShareNeed { tag, transport }
    }

    #[test]
    fn fstabs_become_needs() {
        use ShareTag::*;
        use Transport::*;
        let virtiofs = NIXOS_9P.replace(" 9p ", " virtiofs ");
        let cases: Vec<(&str, String, GuestNeeds)> = vec![
            (
                "NixOS 9p node",
                NIXOS_9P.to_string(),
                GuestNeeds {
                    root_label: Some("nixos".into()),
                    shares: vec![need(Store, NineP), need(Shared, NineP), need(Xchg, NineP)],
                },
            ),
            (
                "NixOS virtio-fs node",
                virtiofs,
                GuestNeeds {
                    root_label: Some("nixos".into()),
                    shares: vec![
                        need(Store, VirtioFs),
                        need(Shared, VirtioFs),
                        need(Xchg, VirtioFs),
                    ],
                },
            ),
            (
                "tmpfs root, store only, mixed transports across tags",
                "tmpfs / tmpfs mode=0755 0 0\nnix-store /nix/store virtiofs ro 0 0\nxchg /tmp/xchg 9p trans=virtio 0 0\nproc /proc proc defaults 0 0\n".into(),
                GuestNeeds {
                    root_label: None,
                    shares: vec![need(Store, VirtioFs), need(Xchg, NineP)],
                },
            ),
            (
                "another label, escaped mount point, tag twice on one transport",
                "/dev/disk/by-label/root-1 / auto defaults 0 1\nshared /mnt/a\\040b 9p x 0 0\nshared /mnt/c 9p x 0 0\n".into(),
                GuestNeeds {
                    root_label: Some("root-1".into()),
                    shares: vec![need(Shared, NineP)],
                },
            ),
            ("empty", "\n# nothing\n".into(), GuestNeeds::default()),
        ];
        for (what, text, want) in cases {
            assert_eq!(parse_fstab(&text).unwrap(), want, "{what}");
        }
    }

    #[test]
    fn what_drydock_cannot_give_is_named_with_its_line() {
        let cases: Vec<(&str, &str)> = vec![
            (
                "/dev/disk/by-label/nixos / ext4 defaults 0 1\nhome /home 9p trans=virtio 0 0\n",
                "line 2 (\"home /home 9p trans=virtio 0 0\"): drydock does not know the share tag \"home\"",
            ),
            (
                "nix-store /nix/store 9p x 0 0\nnix-store /nix/.ro-store virtiofs x 0 0\n",
                "line 2",
            ),
            (
                "/dev/vda / ext4 defaults 0 1\n",
                "line 1 (\"/dev/vda / ext4 defaults 0 1\"): drydock provides `/`",
            ),
            (
                "/dev/disk/by-label/nixos / ext4 d 0 1\n/dev/disk/by-label/data /data ext4 d 0 2\n",
                "line 2",
            ),
            ("UUID=1234 /boot vfat d 0 2\n", "line 1"),
            ("/dev/disk/by-label/nixos / btrfs d 0 1\n", "not btrfs"),
            (
                "/dev/disk/by-label/a-label-far-too-long / ext4 d 0 1\n",
                "label",
            ),
            ("nix-store /nix/store\n", "fewer than 3 fields"),
        ];
        for (text, says) in cases {
            let e = parse_fstab(text).unwrap_err().to_string();
            assert!(e.contains(says), "{text:?}: {e} should say {says}");
        }
    }

    #[test]
    fn profiles_parse_and_have_their_defaults() {
        assert_eq!(Profile::parse("nixos-test"), Some(Profile::NixosTest));
        assert_eq!(Profile::parse("drydock"), Some(Profile::Drydock));
        assert_eq!(Profile::parse("nixos"), None);
        assert_eq!(Profile::default(), Profile::Drydock);
        assert_eq!(Profile::NixosTest.defaults().memory_mib, 1024);
        assert_eq!(Profile::Drydock.defaults().memory_mib, 512);
        assert_eq!(unescape("a\\040b\\134c"), "a b\\c");
        assert_eq!(unescape("trail\\04"), "trail\\04");
    }
}
