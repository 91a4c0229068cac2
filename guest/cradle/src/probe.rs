//! What is on a volume's disk, from its first bytes: an ext4 or xfs
//! filesystem, nothing at all (every byte zero: safe to format), or
//! something else (never formatted over). There is no blkid in the guest.
//!
//! - ext2/3/4: the superblock starts at byte 1024; `s_magic` (0xEF53,
//!   little-endian) is at offset 0x38 in it (kernel `fs/ext4/ext4.h`).
//!   ext2 and ext3 filesystems carry the same magic and mount as ext4.
//! - xfs: the superblock is at byte 0 and starts with `sb_magicnum`
//!   "XFSB" (0x58465342, big-endian; kernel `fs/xfs/libxfs/xfs_format.h`).

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use initramfs::podspec::Filesystem;

/// Bytes read from the start of a disk. Covers the signatures that sit
/// near the start: MBR/GPT (0-1 KiB), ext (1 KiB), xfs and LUKS (0), swap
/// (4 KiB), btrfs (64 KiB): a disk is blank only if all of this is zero.
pub const PROBE_BYTES: usize = 128 * 1024;
/// Byte offset of the ext superblock's `s_magic`: 1024 + 0x38.
const EXT_MAGIC_OFFSET: usize = 1024 + 0x38;
const EXT_MAGIC: [u8; 2] = 0xEF53u16.to_le_bytes();
const XFS_MAGIC: &[u8; 4] = b"XFSB";

/// What the start of a disk holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Content {
    Filesystem(Filesystem),
    /// All zero: never used, safe to format.
    Blank,
    /// Not zero and no ext4/xfs superblock: a partition table, another
    /// filesystem, an interrupted format... never overwritten.
    Unknown,
}

/// Identifies the content from the first bytes of a disk (up to
/// [`PROBE_BYTES`]; a shorter slice is the whole disk).
pub fn identify(head: &[u8]) -> Content {
    if head.get(..XFS_MAGIC.len()) == Some(XFS_MAGIC.as_slice()) {
        return Content::Filesystem(Filesystem::Xfs);
    }
    if head.get(EXT_MAGIC_OFFSET..EXT_MAGIC_OFFSET + EXT_MAGIC.len()) == Some(EXT_MAGIC.as_slice())
    {
        return Content::Filesystem(Filesystem::Ext4);
    }
    if head.iter().all(|&b| b == 0) {
        return Content::Blank;
    }
    Content::Unknown
}

/// Reads up to [`PROBE_BYTES`] from the start of `device`.
pub fn read_head(device: &Path) -> io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(PROBE_BYTES);
    File::open(device)?
        .take(PROBE_BYTES as u64)
        .read_to_end(&mut head)?;
    Ok(head)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A blank image of `PROBE_BYTES`.
    fn blank() -> Vec<u8> {
        vec![0; PROBE_BYTES]
    }

    #[test]
    fn identify_zeroes_is_blank() {
        assert_eq!(identify(&blank()), Content::Blank);
    }

    #[test]
    fn identify_ext_magic_is_ext4() {
        let mut image = blank();
        image[1080] = 0x53;
        image[1081] = 0xEF;

        assert_eq!(identify(&image), Content::Filesystem(Filesystem::Ext4));
    }

    #[test]
    fn identify_byte_swapped_ext_magic_is_unknown() {
        let mut image = blank();
        image[1080] = 0xEF;
        image[1081] = 0x53;

        assert_eq!(identify(&image), Content::Unknown);
    }

    #[test]
    fn identify_xfs_magic_is_xfs() {
        let mut image = blank();
        image[..4].copy_from_slice(b"XFSB");

        assert_eq!(identify(&image), Content::Filesystem(Filesystem::Xfs));
    }

    #[test]
    fn identify_mbr_signature_is_unknown() {
        // A partition table: formatting the whole disk would destroy it.
        let mut image = blank();
        image[510] = 0x55;
        image[511] = 0xAA;

        assert_eq!(identify(&image), Content::Unknown);
    }

    #[test]
    fn identify_btrfs_magic_at_64_kib_is_unknown() {
        let mut image = blank();
        image[65536 + 64..65536 + 72].copy_from_slice(b"_BHRfS_M");

        assert_eq!(identify(&image), Content::Unknown);
    }

    #[test]
    fn identify_tiny_blank_disk_is_blank() {
        assert_eq!(identify(&[0; 512]), Content::Blank);
    }

    #[test]
    fn identify_empty_disk_is_blank() {
        assert_eq!(identify(&[]), Content::Blank);
    }

    #[test]
    fn read_head_reads_at_most_probe_bytes() {
        let dir = crate::testing::TempDir::new("probe-head");
        let path = dir.path().join("disk.img");
        std::fs::write(&path, vec![7u8; PROBE_BYTES + 4096]).unwrap();

        let head = read_head(&path).unwrap();

        assert_eq!(head.len(), PROBE_BYTES);
    }

    #[test]
    fn identify_host_mkfs_ext4_image_is_ext4() {
        // A real superblock, when the host has e2fsprogs.
        let mkfs = Path::new("/usr/sbin/mkfs.ext4");
        if !mkfs.exists() {
            eprintln!("skipped: no {} (apt-get install e2fsprogs)", mkfs.display());
            return;
        }
        let dir = crate::testing::TempDir::new("probe-ext4");
        let path = dir.path().join("disk.img");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(16 * 1024 * 1024)
            .unwrap();
        let _children = crate::testing::children_lock();
        let status = std::process::Command::new(mkfs)
            .args(["-q", "-F"])
            .arg(&path)
            .status()
            .unwrap();
        assert!(status.success());

        let head = read_head(&path).unwrap();

        assert_eq!(identify(&head), Content::Filesystem(Filesystem::Ext4));
    }
}
