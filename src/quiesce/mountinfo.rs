//! `/proc/self/mountinfo`: which filesystems are mounted where, from which device.
//!
//! Line format (proc(5)): `id parent major:minor root mountpoint options [optional...] -
//! fstype source super-options`. Paths escape space, tab, newline and backslash as `\ooo`.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;

use super::devices::DevId;
use super::QuiesceError;

const MOUNTINFO: &str = "/proc/self/mountinfo";

/// One line of mountinfo: one mount (bind mounts of one filesystem are separate lines).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub mount_id: u32,
    pub parent_id: u32,
    /// The superblock's device: equal for every bind mount of one filesystem.
    pub major: u32,
    pub minor: u32,
    /// The directory of the filesystem that is mounted here (`/` unless a bind mount).
    pub root: PathBuf,
    pub mountpoint: PathBuf,
    /// Per-mount options, e.g. `rw,relatime`.
    pub mount_options: String,
    pub fstype: String,
    pub source: String,
    /// Per-superblock options.
    pub super_options: String,
}

impl Mount {
    pub fn dev(&self) -> DevId {
        DevId::new(self.major, self.minor)
    }

    pub fn is_read_only(&self) -> bool {
        self.mount_options.split(',').any(|o| o == "ro")
    }
}

/// Parses mountinfo text.
pub fn parse_mountinfo(text: &[u8]) -> Result<Vec<Mount>, QuiesceError> {
    text.split(|&b| b == b'\n')
        .enumerate()
        .filter(|(_, line)| !line.is_empty())
        .map(|(i, line)| {
            parse_line(line).map_err(|reason| QuiesceError::ParseMountinfo {
                line: i + 1,
                reason,
            })
        })
        .collect()
}

fn parse_line(line: &[u8]) -> Result<Mount, &'static str> {
    let mut fields = line.split(|&b| b == b' ');
    let mut next = |what: &'static str| fields.next().ok_or(what);
    let mount_id = parse_u32(next("missing mount id")?).ok_or("bad mount id")?;
    let parent_id = parse_u32(next("missing parent id")?).ok_or("bad parent id")?;
    let devno = next("missing major:minor")?;
    let colon = devno
        .iter()
        .position(|&b| b == b':')
        .ok_or("bad major:minor")?;
    let major = parse_u32(&devno[..colon]).ok_or("bad major")?;
    let minor = parse_u32(&devno[colon + 1..]).ok_or("bad minor")?;
    let root = PathBuf::from(OsString::from_vec(unescape(next("missing root")?)));
    let mountpoint = PathBuf::from(OsString::from_vec(unescape(next("missing mount point")?)));
    let mount_options = lossy(next("missing mount options")?);
    // Optional fields (shared:N, master:N, ...) run up to a lone "-".
    loop {
        if next("missing separator")? == b"-" {
            break;
        }
    }
    let fstype = lossy(next("missing filesystem type")?);
    let source = lossy(next("missing source")?);
    // Super options are the last field; an empty one still parses.
    let super_options = fields.next().map(lossy).unwrap_or_default();
    Ok(Mount {
        mount_id,
        parent_id,
        major,
        minor,
        root,
        mountpoint,
        mount_options,
        fstype,
        source,
        super_options,
    })
}

fn parse_u32(bytes: &[u8]) -> Option<u32> {
    std::str::from_utf8(bytes).ok()?.parse().ok()
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(&unescape(bytes)).into_owned()
}

/// Undoes the kernel's `\ooo` octal escapes; anything else is kept as it is.
fn unescape(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            if let Some(digits) = bytes.get(i + 1..i + 4) {
                if digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                    let value = digits
                        .iter()
                        .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                    if let Ok(byte) = u8::try_from(value) {
                        out.push(byte);
                        i += 4;
                        continue;
                    }
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

/// Every mount of this process's namespace.
pub fn read_mountinfo() -> Result<Vec<Mount>, QuiesceError> {
    let text = std::fs::read(MOUNTINFO).map_err(|source| QuiesceError::ReadMountinfo {
        path: PathBuf::from(MOUNTINFO),
        source,
    })?;
    parse_mountinfo(&text)
}

/// Every mount (bind mounts and btrfs subvolumes included) of the filesystem on block device
/// `major:minor`.
///
/// Most filesystems show their device in mountinfo's major:minor; btrfs shows an anonymous
/// device there instead, so a mount also matches when its source is a node for the device.
pub fn mounts_of_device(major: u32, minor: u32) -> Result<Vec<Mount>, QuiesceError> {
    let id = DevId::new(major, minor);
    let mounts = read_mountinfo()?;
    Ok(filter_mounts_of(id, mounts, |source| {
        // Only paths can be device nodes ("proc", "none", "server:/export" are not).
        if !source.starts_with('/') {
            return None;
        }
        std::fs::metadata(source).ok().and_then(|m| {
            use std::os::unix::fs::{FileTypeExt, MetadataExt};
            m.file_type()
                .is_block_device()
                .then(|| DevId::from_dev_t(m.rdev()))
        })
    }))
}

fn filter_mounts_of(
    id: DevId,
    mounts: Vec<Mount>,
    rdev_of_source: impl Fn(&str) -> Option<DevId>,
) -> Vec<Mount> {
    // The superblocks (as mountinfo names them) whose source is this device.
    let mut sb_devs: Vec<DevId> = vec![id];
    for m in &mounts {
        if m.dev() != id && !sb_devs.contains(&m.dev()) && rdev_of_source(&m.source) == Some(id) {
            sb_devs.push(m.dev());
        }
    }
    mounts
        .into_iter()
        .filter(|m| sb_devs.contains(&m.dev()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const SAMPLE: &[u8] = b"\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw,discard
36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw,errors=continue
101 27 7:3 / /srv/my\\040volume ro,relatime shared:40 master:2 - xfs /dev/loop3 ro,attr2,inode64
102 27 7:3 /sub\\134dir /mnt/bind\\011tab rw,relatime - xfs /dev/loop3 rw
103 27 0:45 / /run/empty rw - tmpfs none 
";

    #[test]
    fn parses_fields_optional_fields_and_escapes() {
        let mounts = parse_mountinfo(SAMPLE).unwrap();
        assert_eq!(mounts.len(), 6);
        let root = &mounts[1];
        assert_eq!((root.mount_id, root.parent_id), (27, 1));
        assert_eq!(root.dev(), DevId::new(254, 0));
        assert_eq!(root.mountpoint, Path::new("/"));
        assert_eq!(root.fstype, "ext4");
        assert_eq!(root.source, "/dev/vda");
        assert_eq!(root.super_options, "rw,discard");

        let bind_src = &mounts[2];
        assert_eq!(bind_src.root, Path::new("/mnt1"));
        assert_eq!(bind_src.mountpoint, Path::new("/mnt/parent"));
        assert_eq!(bind_src.fstype, "ext3");

        let vol = &mounts[3];
        assert_eq!(vol.mountpoint, Path::new("/srv/my volume"));
        assert!(vol.is_read_only());
        assert_eq!(vol.mount_options, "ro,relatime");
        assert_eq!(vol.fstype, "xfs");

        let bind = &mounts[4];
        assert_eq!(bind.root, Path::new("/sub\\dir"));
        assert_eq!(bind.mountpoint, Path::new("/mnt/bind\ttab"));
        assert!(!bind.is_read_only());

        assert_eq!(mounts[5].source, "none");
        assert_eq!(mounts[5].super_options, "");
    }

    #[test]
    fn unescape_keeps_what_is_not_an_escape() {
        assert_eq!(unescape(b"a\\040b"), b"a b");
        assert_eq!(unescape(b"trailing\\04"), b"trailing\\04");
        assert_eq!(unescape(b"x\\9yz"), b"x\\9yz");
        assert_eq!(unescape(b"\\777"), b"\\777");
        assert_eq!(unescape(b"\\"), b"\\");
    }

    #[test]
    fn rejects_malformed_lines_with_their_number() {
        let err =
            parse_mountinfo(b"22 27 0:21 / /proc rw - proc proc rw\n23 x 0:1 / /a rw - t s o\n")
                .unwrap_err();
        assert!(
            matches!(err, QuiesceError::ParseMountinfo { line: 2, .. }),
            "{err:?}"
        );
        let err = parse_mountinfo(b"22 27 0:21 / /proc rw no-separator\n").unwrap_err();
        assert!(matches!(err, QuiesceError::ParseMountinfo { line: 1, .. }));
    }

    #[test]
    fn btrfs_mounts_match_by_source() {
        let text = b"\
27 1 254:0 / / rw - ext4 /dev/vda rw
43 27 0:39 / /top rw - btrfs /dev/loop0 rw,subvolid=5,subvol=/
44 27 0:39 /a /m1 rw - btrfs /dev/loop0 rw,subvolid=256,subvol=/a
45 27 0:40 / /other rw - btrfs /dev/loop1 rw
46 27 7:0 / /bogus rw - ext4 /dev/loop9 rw
";
        let mounts = parse_mountinfo(text).unwrap();
        let rdev = |s: &str| match s {
            "/dev/loop0" => Some(DevId::new(7, 0)),
            "/dev/loop1" => Some(DevId::new(7, 1)),
            "/dev/vda" => Some(DevId::new(254, 0)),
            _ => None,
        };
        let ids: Vec<u32> = filter_mounts_of(DevId::new(7, 0), mounts, rdev)
            .iter()
            .map(|m| m.mount_id)
            .collect();
        // Both subvolume mounts (by source) and a mount whose major:minor is the device.
        assert_eq!(ids, vec![43, 44, 46]);
    }

    #[test]
    fn reads_own_mountinfo() {
        let mounts = read_mountinfo().unwrap();
        assert!(mounts.iter().any(|m| m.mountpoint == Path::new("/")));
        let root = mounts
            .iter()
            .rfind(|m| m.mountpoint == Path::new("/"))
            .unwrap();
        assert!(mounts_of_device(root.major, root.minor)
            .unwrap()
            .iter()
            .any(|m| m.mount_id == root.mount_id));
    }
}
