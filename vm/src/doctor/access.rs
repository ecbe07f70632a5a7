//! Who may open a device read-write, decided the way the kernel decides it (owner, POSIX ACL
//! entries under the mask, owning and ACL groups, other; root overrides), and in words.
//! Pure functions over [`FileInfo`] and credentials, so every case is a table row in tests.

use crate::host::{AclTag, FileInfo};

const RW: u32 = 0o6;

/// Which rule lets someone in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Grant {
    Root,
    Owner,
    AclUser,
    Group(u32),
    Other,
}

/// Which rule keeps someone out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Denial {
    /// The caller owns the file but the owner bits lack rw.
    OwnerBits,
    /// A named-user ACL entry matches but (under the mask) lacks rw.
    AclUser,
    /// The caller is in these matching groups, none of which grants rw.
    Groups(Vec<u32>),
    /// Nothing matches and the "other" bits lack rw.
    Other,
}

/// Decide whether (uid, gid, groups) may open `info` read-write.
pub(crate) fn rw_access(
    info: &FileInfo,
    uid: u32,
    gid: u32,
    groups: &[u32],
) -> Result<Grant, Denial> {
    if uid == 0 {
        return Ok(Grant::Root);
    }
    let owner_perm = (info.mode >> 6) & 7;
    let group_perm = (info.mode >> 3) & 7;
    let other_perm = info.mode & 7;
    if uid == info.uid {
        return if owner_perm & RW == RW {
            Ok(Grant::Owner)
        } else {
            Err(Denial::OwnerBits)
        };
    }
    let in_group = |g: u32| g == gid || groups.contains(&g);
    match &info.acl {
        Some(acl)
            if acl
                .iter()
                .any(|e| matches!(e.tag, AclTag::Mask | AclTag::User(_) | AclTag::Group(_))) =>
        {
            let mask = acl
                .iter()
                .find(|e| e.tag == AclTag::Mask)
                .map(|e| e.perm)
                .unwrap_or(7);
            if let Some(e) = acl.iter().find(|e| e.tag == AclTag::User(uid)) {
                return if e.perm & mask & RW == RW {
                    Ok(Grant::AclUser)
                } else {
                    Err(Denial::AclUser)
                };
            }
            let mut matched = Vec::new();
            for e in acl {
                let g = match e.tag {
                    AclTag::GroupObj => info.gid,
                    AclTag::Group(g) => g,
                    _ => continue,
                };
                if in_group(g) {
                    if e.perm & mask & RW == RW {
                        return Ok(Grant::Group(g));
                    }
                    matched.push(g);
                }
            }
            if !matched.is_empty() {
                return Err(Denial::Groups(matched));
            }
        }
        _ => {
            if in_group(info.gid) {
                return if group_perm & RW == RW {
                    Ok(Grant::Group(info.gid))
                } else {
                    Err(Denial::Groups(vec![info.gid]))
                };
            }
        }
    }
    if other_perm & RW == RW {
        Ok(Grant::Other)
    } else {
        Err(Denial::Other)
    }
}

/// `crw-rw----` style rendering of a device's mode.
pub(crate) fn mode_string(info: &FileInfo) -> String {
    let kind = match info.kind {
        crate::host::FileKind::CharDevice => 'c',
        crate::host::FileKind::BlockDevice => 'b',
        crate::host::FileKind::Directory => 'd',
        _ => '-',
    };
    let mut s = String::from(kind);
    for shift in [6, 3, 0] {
        let p = (info.mode >> shift) & 7;
        s.push(if p & 4 != 0 { 'r' } else { '-' });
        s.push(if p & 2 != 0 { 'w' } else { '-' });
        s.push(if p & 1 != 0 { 'x' } else { '-' });
    }
    if info.acl.as_ref().is_some_and(|a| a.len() > 3) {
        s.push('+');
    }
    s
}

/// The groups an ACL grants rw to, by gid.
pub(crate) fn acl_rw_groups(info: &FileInfo) -> Vec<u32> {
    let Some(acl) = &info.acl else {
        return Vec::new();
    };
    let mask = acl
        .iter()
        .find(|e| e.tag == AclTag::Mask)
        .map(|e| e.perm)
        .unwrap_or(7);
    acl.iter()
        .filter_map(|e| match e.tag {
            AclTag::Group(g) if e.perm & mask & RW == RW => Some(g),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::{AclEntry, FileKind};

    fn dev(mode: u32, uid: u32, gid: u32, acl: Option<Vec<(AclTag, u32)>>) -> FileInfo {
        FileInfo {
            kind: FileKind::CharDevice,
            major: 10,
            minor: 232,
            mode,
            uid,
            gid,
            acl: acl.map(|v| {
                v.into_iter()
                    .map(|(tag, perm)| AclEntry { tag, perm })
                    .collect()
            }),
        }
    }

    #[test]
    fn table_of_cases() {
        const KVM: u32 = 994;
        let kvm = KVM;
        let nixbld = 30000;
        let acl_nixbld = Some(vec![
            (AclTag::UserObj, 6),
            (AclTag::GroupObj, 0),
            (AclTag::Group(nixbld), 6),
            (AclTag::Mask, 6),
            (AclTag::Other, 0),
        ]);
        let masked = Some(vec![
            (AclTag::UserObj, 6),
            (AclTag::GroupObj, 0),
            (AclTag::Group(nixbld), 6),
            (AclTag::Mask, 4),
            (AclTag::Other, 0),
        ]);
        type Case<'a> = (
            &'a str,
            FileInfo,
            (u32, u32, &'a [u32]),
            Result<Grant, Denial>,
        );
        let cases: Vec<Case> = vec![
            (
                "root always",
                dev(0o600, 0, 0, None),
                (0, 0, &[]),
                Ok(Grant::Root),
            ),
            (
                "0600 root, user",
                dev(0o600, 0, 0, None),
                (1000, 1000, &[]),
                Err(Denial::Other),
            ),
            (
                "0660 kvm, member",
                dev(0o660, 0, kvm, None),
                (1000, 1000, &[KVM]),
                Ok(Grant::Group(kvm)),
            ),
            (
                "0660 kvm, primary gid",
                dev(0o660, 0, kvm, None),
                (1000, kvm, &[]),
                Ok(Grant::Group(kvm)),
            ),
            (
                "0660 kvm, not member",
                dev(0o660, 0, kvm, None),
                (1000, 1000, &[27]),
                Err(Denial::Other),
            ),
            (
                "0606 kvm, member is denied by group bits",
                dev(0o606, 0, kvm, None),
                (1000, 1000, &[KVM]),
                Err(Denial::Groups(vec![kvm])),
            ),
            (
                "0666",
                dev(0o666, 0, kvm, None),
                (1000, 1000, &[]),
                Ok(Grant::Other),
            ),
            (
                "owner without w",
                dev(0o460, 1000, kvm, None),
                (1000, 1000, &[KVM]),
                Err(Denial::OwnerBits),
            ),
            (
                "acl group grants",
                dev(0o660, 0, 0, acl_nixbld.clone()),
                (30001, nixbld, &[]),
                Ok(Grant::Group(nixbld)),
            ),
            (
                "acl group, not member",
                dev(0o660, 0, 0, acl_nixbld),
                (1000, 1000, &[]),
                Err(Denial::Other),
            ),
            (
                "acl masked",
                dev(0o640, 0, 0, masked),
                (30001, nixbld, &[]),
                Err(Denial::Groups(vec![nixbld])),
            ),
            (
                "acl user",
                dev(
                    0o660,
                    0,
                    0,
                    Some(vec![
                        (AclTag::UserObj, 6),
                        (AclTag::User(1000), 6),
                        (AclTag::GroupObj, 0),
                        (AclTag::Mask, 6),
                        (AclTag::Other, 0),
                    ]),
                ),
                (1000, 1000, &[]),
                Ok(Grant::AclUser),
            ),
        ];
        for (name, info, (uid, gid, groups), want) in cases {
            assert_eq!(rw_access(&info, uid, gid, groups), want, "{name}");
        }
    }

    #[test]
    fn mode_strings() {
        assert_eq!(mode_string(&dev(0o600, 0, 0, None)), "crw-------");
        assert_eq!(mode_string(&dev(0o666, 0, 0, None)), "crw-rw-rw-");
        let acl = Some(vec![
            (AclTag::UserObj, 6),
            (AclTag::GroupObj, 0),
            (AclTag::Group(5), 6),
            (AclTag::Mask, 6),
            (AclTag::Other, 0),
        ]);
        assert_eq!(mode_string(&dev(0o660, 0, 0, acl.clone())), "crw-rw----+");
        assert_eq!(acl_rw_groups(&dev(0o660, 0, 0, acl)), vec![5]);
    }
}
