//! A deterministic writer for the SVR4 "newc" cpio format, the format the
//! Linux kernel unpacks as an initramfs (Documentation/driver-api/early-userspace/buffer-format.rst).
//!
//! Each entry is a 110-byte ASCII header (magic `070701`, then thirteen
//! 8-digit hex fields), the NUL-terminated name padded so the data starts on
//! a 4-byte boundary, and the data padded to 4 bytes again. The archive ends
//! with an entry named `TRAILER!!!`. Offsets count from the archive's first
//! byte, so an archive appended to another must start 4-byte aligned (every
//! archive written here ends aligned), which is what the kernel expects of
//! concatenated initramfs archives.
//!
//! Output is reproducible: mtime, uid and gid are 0 and inode numbers count
//! up from 1 in write order. Parent directories are emitted (mode 0755) the
//! first time a path needs them, because the kernel does not create them.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Magic of the "newc" (no checksum) format.
const MAGIC: &[u8; 6] = b"070701";
/// Bytes in a newc header before the name.
pub const HEADER_BYTES: usize = 110;
/// Name of the entry that ends an archive.
pub const TRAILER_NAME: &str = "TRAILER!!!";
/// Bytes the trailer entry takes: 110 + "TRAILER!!!\0", padded to 4.
pub const TRAILER_BYTES: u64 = 124;
/// Longest name the kernel accepts (PATH_MAX, NUL included).
const MAX_NAME_BYTES: usize = 4096;
/// Chunk size when streaming a host file into the archive.
const COPY_BUFFER_BYTES: usize = 64 * 1024;
/// Mode used for parent directories created implicitly.
const PARENT_DIR_MODE: u32 = 0o755;

/// File type bits of `st_mode` (linux/stat.h).
const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;
/// Permission bits, setuid/setgid/sticky included.
const PERMISSION_BITS: u32 = 0o7777;

/// Errors of the cpio writer.
#[derive(Debug, Error)]
pub enum CpioError {
    #[error("invalid archive path {path:?}: {reason}")]
    InvalidPath { path: String, reason: &'static str },
    #[error("{path} is already in the archive")]
    DuplicatePath { path: String },
    #[error("{path} is needed as a directory but is already in the archive as a file")]
    NotADirectory { path: String },
    #[error("{path} is {size} bytes; newc entries are limited to 4 GiB - 1")]
    TooLarge { path: String, size: u64 },
    #[error("cannot read {}", host.display())]
    Read {
        host: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} changed size while being archived (expected {expected} bytes, read {actual})", host.display())]
    SizeChanged {
        host: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("cannot write the archive")]
    Write {
        #[source]
        source: io::Error,
    },
}

/// What a path in the archive is, for duplicate and parent checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Dir { mode: u32 },
    Other,
}

/// The metadata of one header.
struct Header<'a> {
    name: &'a str,
    mode: u32,
    nlink: u32,
    file_bytes: u32,
    rdev_major: u32,
    rdev_minor: u32,
}

/// A newc archive being written to `W`. Call [`Archive::finish`] to write
/// the trailer; an archive dropped without it is truncated.
#[derive(Debug)]
pub struct Archive<W: Write> {
    out: W,
    /// Bytes written so far: alignment is relative to the archive's start.
    written: u64,
    next_ino: u32,
    paths: HashMap<String, Kind>,
}

impl<W: Write> Archive<W> {
    /// Starts an archive. `out` must be at a 4-byte aligned offset of the
    /// final image (offset 0, or the end of another archive).
    pub fn new(out: W) -> Self {
        Self {
            out,
            written: 0,
            next_ino: 1,
            paths: HashMap::new(),
        }
    }

    /// Bytes written so far; [`Archive::finish`] adds [`TRAILER_BYTES`].
    pub fn bytes_written(&self) -> u64 {
        self.written
    }

    /// Whether `path` (any spelling [`Archive::add_dir`] accepts) has an entry.
    pub fn contains(&self, path: &str) -> bool {
        normalize(path).is_ok_and(|name| self.paths.contains_key(&name))
    }

    /// Adds a directory. Adding one that exists with the same mode is a no-op.
    pub fn add_dir(&mut self, path: &str, mode: u32) -> Result<(), CpioError> {
        let name = normalize(path)?;
        let mode = mode & PERMISSION_BITS;
        match self.paths.get(&name) {
            Some(Kind::Dir { mode: existing }) if *existing == mode => return Ok(()),
            Some(_) => return Err(CpioError::DuplicatePath { path: name }),
            None => {}
        }
        self.ensure_parents(&name)?;
        self.write_entry(
            &Header {
                name: &name,
                mode: S_IFDIR | mode,
                nlink: 2,
                file_bytes: 0,
                rdev_major: 0,
                rdev_minor: 0,
            },
            &[],
        )?;
        self.paths.insert(name, Kind::Dir { mode });
        Ok(())
    }

    /// Adds a regular file with `data` as its content.
    pub fn add_file(&mut self, path: &str, mode: u32, data: &[u8]) -> Result<(), CpioError> {
        let name = self.claim(path)?;
        let file_bytes = entry_size(&name, data.len() as u64)?;
        self.write_entry(&regular(&name, mode, file_bytes), data)?;
        self.paths.insert(name, Kind::Other);
        Ok(())
    }

    /// Adds a regular file whose content is streamed from `host`.
    pub fn add_file_from(&mut self, path: &str, mode: u32, host: &Path) -> Result<(), CpioError> {
        let name = self.claim(path)?;
        let read_error = |source| CpioError::Read {
            host: host.to_path_buf(),
            source,
        };
        let mut file = File::open(host).map_err(read_error)?;
        let size = file.metadata().map_err(read_error)?.len();
        let file_bytes = entry_size(&name, size)?;

        self.write_header(&regular(&name, mode, file_bytes))?;
        let mut data = (&mut file).take(size);
        let mut buffer = vec![0; COPY_BUFFER_BYTES];
        let mut copied = 0;
        loop {
            let chunk = match data.read(&mut buffer) {
                Ok(0) => break,
                Ok(n) => buffer.get(..n).unwrap_or_default(),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(read_error(e)),
            };
            self.out
                .write_all(chunk)
                .map_err(|source| CpioError::Write { source })?;
            copied += chunk.len() as u64;
        }
        self.written += copied;
        if copied != size {
            return Err(CpioError::SizeChanged {
                host: host.to_path_buf(),
                expected: size,
                actual: copied,
            });
        }
        self.pad()?;
        self.paths.insert(name, Kind::Other);
        Ok(())
    }

    /// Adds a symbolic link to `target` (stored as the entry's data).
    pub fn add_symlink(&mut self, path: &str, target: &str) -> Result<(), CpioError> {
        let name = self.claim(path)?;
        if target.is_empty() || target.contains('\0') {
            return Err(CpioError::InvalidPath {
                path: target.to_owned(),
                reason: "a symlink target must be non-empty and have no NUL",
            });
        }
        let file_bytes = entry_size(&name, target.len() as u64)?;
        self.write_entry(
            &Header {
                name: &name,
                mode: S_IFLNK | 0o777,
                nlink: 1,
                file_bytes,
                rdev_major: 0,
                rdev_minor: 0,
            },
            target.as_bytes(),
        )?;
        self.paths.insert(name, Kind::Other);
        Ok(())
    }

    /// Adds a character device node, e.g. `/dev/console` (5, 1). The kernel
    /// creates it with mknod while unpacking: no root needed here.
    pub fn add_char_device(
        &mut self,
        path: &str,
        mode: u32,
        major: u32,
        minor: u32,
    ) -> Result<(), CpioError> {
        let name = self.claim(path)?;
        self.write_entry(
            &Header {
                name: &name,
                mode: S_IFCHR | (mode & PERMISSION_BITS),
                nlink: 1,
                file_bytes: 0,
                rdev_major: major,
                rdev_minor: minor,
            },
            &[],
        )?;
        self.paths.insert(name, Kind::Other);
        Ok(())
    }

    /// Writes the trailer and returns the writer, flushed. The archive ends
    /// 4-byte aligned, so another archive may follow directly.
    pub fn finish(mut self) -> Result<W, CpioError> {
        self.next_ino = 0;
        self.write_entry(
            &Header {
                name: TRAILER_NAME,
                mode: 0,
                nlink: 1,
                file_bytes: 0,
                rdev_major: 0,
                rdev_minor: 0,
            },
            &[],
        )?;
        self.out
            .flush()
            .map_err(|source| CpioError::Write { source })?;
        Ok(self.out)
    }

    /// Normalizes a new non-directory path, checks it is free and creates
    /// its parents.
    fn claim(&mut self, path: &str) -> Result<String, CpioError> {
        let name = normalize(path)?;
        if self.paths.contains_key(&name) {
            return Err(CpioError::DuplicatePath { path: name });
        }
        self.ensure_parents(&name)?;
        Ok(name)
    }

    /// Emits every missing ancestor of `name` as a 0755 directory.
    fn ensure_parents(&mut self, name: &str) -> Result<(), CpioError> {
        let mut end = 0;
        while let Some(slash) = name.get(end..).and_then(|rest| rest.find('/')) {
            end += slash;
            let parent = name.get(..end).unwrap_or_default();
            match self.paths.get(parent) {
                Some(Kind::Dir { .. }) => {}
                Some(Kind::Other) => {
                    return Err(CpioError::NotADirectory {
                        path: parent.to_owned(),
                    })
                }
                None => self.add_dir(parent, PARENT_DIR_MODE)?,
            }
            end += 1;
        }
        Ok(())
    }

    fn write_entry(&mut self, header: &Header<'_>, data: &[u8]) -> Result<(), CpioError> {
        self.write_header(header)?;
        self.write_all(data)?;
        self.pad()
    }

    /// Writes the header and the padded name.
    fn write_header(&mut self, header: &Header<'_>) -> Result<(), CpioError> {
        let ino = self.next_ino;
        self.next_ino = self.next_ino.wrapping_add(1);
        let bytes = encode_header(header, ino)?;
        self.write_all(&bytes)?;
        self.pad()
    }

    fn write_all(&mut self, bytes: &[u8]) -> Result<(), CpioError> {
        self.out
            .write_all(bytes)
            .map_err(|source| CpioError::Write { source })?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// Pads with NULs to the next multiple of 4 bytes.
    fn pad(&mut self) -> Result<(), CpioError> {
        let len = padding(self.written);
        self.write_all(&[0; 3][..len])
    }
}

/// Bytes of padding that bring `offset` to a multiple of 4.
fn padding(offset: u64) -> usize {
    // The result is 0..=3: the cast cannot truncate.
    ((4 - offset % 4) % 4) as usize
}

/// The header of a regular file.
fn regular(name: &str, mode: u32, file_bytes: u32) -> Header<'_> {
    Header {
        name,
        mode: S_IFREG | (mode & PERMISSION_BITS),
        nlink: 1,
        file_bytes,
        rdev_major: 0,
        rdev_minor: 0,
    }
}

/// Checks a file's size fits the 8-hex-digit field.
fn entry_size(name: &str, size: u64) -> Result<u32, CpioError> {
    u32::try_from(size).map_err(|_| CpioError::TooLarge {
        path: name.to_owned(),
        size,
    })
}

/// Encodes the 110-byte header followed by the NUL-terminated name.
fn encode_header(header: &Header<'_>, ino: u32) -> Result<Vec<u8>, CpioError> {
    let name_bytes = header.name.len() + 1;
    let name_size = u32::try_from(name_bytes).map_err(|_| CpioError::InvalidPath {
        path: header.name.to_owned(),
        reason: "name too long",
    })?;
    let fields: [u32; 13] = [
        ino,
        header.mode,
        0, // uid
        0, // gid
        header.nlink,
        0, // mtime
        header.file_bytes,
        0, // devmajor
        0, // devminor
        header.rdev_major,
        header.rdev_minor,
        name_size,
        0, // check: unused in newc
    ];
    let mut bytes = Vec::with_capacity(HEADER_BYTES + name_bytes);
    bytes.extend_from_slice(MAGIC);
    for field in fields {
        bytes.extend_from_slice(format!("{field:08x}").as_bytes());
    }
    bytes.extend_from_slice(header.name.as_bytes());
    bytes.push(0);
    Ok(bytes)
}

/// Turns `/dev/console` or `dev/console` into the archive name
/// `dev/console`, rejecting what the kernel would misplace.
fn normalize(path: &str) -> Result<String, CpioError> {
    let invalid = |reason| CpioError::InvalidPath {
        path: path.to_owned(),
        reason,
    };
    let name = path.trim_start_matches('/').trim_end_matches('/');
    if name.is_empty() {
        return Err(invalid("empty path (the root directory always exists)"));
    }
    if name.contains('\0') {
        return Err(invalid("contains a NUL byte"));
    }
    if name.len() >= MAX_NAME_BYTES {
        return Err(invalid("longer than PATH_MAX"));
    }
    if name == TRAILER_NAME {
        return Err(invalid("reserved for the archive trailer"));
    }
    if name
        .split('/')
        .any(|part| part.is_empty() || part == "." || part == "..")
    {
        return Err(invalid("empty, '.' or '..' path component"));
    }
    Ok(name.to_owned())
}

/// Test helper: `(name, mode, data)` of every entry, trailer included.
/// Panics on malformed input (tests only).
#[cfg(test)]
pub(crate) fn parse_entries(bytes: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
    let hex = |offset: usize| {
        let text = std::str::from_utf8(&bytes[offset..offset + 8]).unwrap();
        u32::from_str_radix(text, 16).unwrap() as usize
    };
    let mut entries = Vec::new();
    let mut offset = 0;
    while offset < bytes.len() {
        assert_eq!(&bytes[offset..offset + 6], MAGIC, "bad magic at {offset}");
        let mode = hex(offset + 6 + 8) as u32;
        let file_bytes = hex(offset + 6 + 6 * 8);
        let name_bytes = hex(offset + 6 + 11 * 8);
        let name_start = offset + HEADER_BYTES;
        let name =
            String::from_utf8(bytes[name_start..name_start + name_bytes - 1].to_vec()).unwrap();
        let data_start = (name_start + name_bytes).next_multiple_of(4);
        let data = bytes[data_start..data_start + file_bytes].to_vec();
        offset = (data_start + file_bytes).next_multiple_of(4);
        entries.push((name, mode, data));
    }
    entries
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads header field `index` (0 = ino) of the entry at `offset`.
    fn field(archive: &[u8], offset: usize, index: usize) -> u32 {
        let start = offset + 6 + index * 8;
        let text = std::str::from_utf8(&archive[start..start + 8]).unwrap();
        u32::from_str_radix(text, 16).unwrap()
    }

    const INO: usize = 0;
    const MODE: usize = 1;
    const NLINK: usize = 4;
    const FILESIZE: usize = 6;
    const RDEVMAJOR: usize = 9;
    const RDEVMINOR: usize = 10;
    const NAMESIZE: usize = 11;

    fn archive_with(build: impl FnOnce(&mut Archive<Vec<u8>>)) -> Vec<u8> {
        let mut archive = Archive::new(Vec::new());
        build(&mut archive);
        archive.finish().unwrap()
    }

    /// Offset of the entry after the one at `offset`.
    fn next_entry(archive: &[u8], offset: usize) -> usize {
        let name_end = offset + HEADER_BYTES + field(archive, offset, NAMESIZE) as usize;
        let data_start = name_end.next_multiple_of(4);
        (data_start + field(archive, offset, FILESIZE) as usize).next_multiple_of(4)
    }

    #[test]
    fn add_file_header_is_newc_with_zeroed_metadata() {
        let bytes = archive_with(|a| a.add_file("/init", 0o755, b"hello").unwrap());

        let expected_header = concat!(
            "070701", "00000001", // ino
            "000081ed", // S_IFREG | 0755
            "00000000", // uid
            "00000000", // gid
            "00000001", // nlink
            "00000000", // mtime
            "00000005", // filesize
            "00000000", // devmajor
            "00000000", // devminor
            "00000000", // rdevmajor
            "00000000", // rdevminor
            "00000005", // namesize: "init" + NUL
            "00000000", // check
        );
        assert_eq!(&bytes[..HEADER_BYTES], expected_header.as_bytes());
    }

    #[test]
    fn add_file_name_and_data_are_padded_to_four_bytes() {
        let bytes = archive_with(|a| a.add_file("init", 0o755, b"hello").unwrap());

        // 110 + 5 = 115 -> name padded to 116; data 5 bytes -> padded to 124.
        assert_eq!(&bytes[110..116], b"init\0\0");
        assert_eq!(&bytes[116..124], b"hello\0\0\0");
        assert_eq!(&bytes[124..130], b"070701");
    }

    #[test]
    fn add_file_already_aligned_name_gets_no_padding() {
        // 110 + "abcde" + NUL = 116: already a multiple of 4.
        let bytes = archive_with(|a| a.add_file("abcde", 0o644, b"").unwrap());

        assert_eq!(&bytes[110..116], b"abcde\0");
        assert_eq!(&bytes[116..122], b"070701");
    }

    #[test]
    fn finish_ends_with_an_aligned_trailer() {
        let bytes = archive_with(|_| {});

        assert_eq!(field(&bytes, 0, NAMESIZE), 11);
        assert_eq!(field(&bytes, 0, NLINK), 1);
        assert_eq!(&bytes[110..121], b"TRAILER!!!\0");
        assert_eq!(bytes.len() as u64, TRAILER_BYTES);
    }

    #[test]
    fn parents_are_created_once_before_their_children() {
        let bytes = archive_with(|a| {
            a.add_file("a", 0o644, b"x").unwrap();
            a.add_symlink("bin/sh", "busybox").unwrap();
            a.add_file("lib/modules/6.1/modules.dep", 0o644, b"a.ko:\n")
                .unwrap();
            a.add_file("lib/modules/6.1/b", 0o644, b"").unwrap();
        });

        let names: Vec<String> = parse_entries(&bytes).into_iter().map(|e| e.0).collect();
        assert_eq!(
            names,
            [
                "a",
                "bin",
                "bin/sh",
                "lib",
                "lib/modules",
                "lib/modules/6.1",
                "lib/modules/6.1/modules.dep",
                "lib/modules/6.1/b",
                "TRAILER!!!"
            ]
        );
    }

    #[test]
    fn every_entry_starts_four_byte_aligned() {
        let bytes = archive_with(|a| {
            a.add_file("a", 0o644, b"x").unwrap();
            a.add_file("bb", 0o644, b"xy").unwrap();
            a.add_file("ccc", 0o644, b"xyz").unwrap();
        });

        let mut offset = 0;
        let mut count = 0;
        while offset < bytes.len() {
            assert_eq!(offset % 4, 0);
            offset = next_entry(&bytes, offset);
            count += 1;
        }
        assert_eq!(offset, bytes.len());
        assert_eq!(count, 4);
    }

    #[test]
    fn add_char_device_sets_type_and_rdev() {
        let bytes = archive_with(|a| a.add_char_device("/dev/console", 0o600, 5, 1).unwrap());

        // The first entry is the implicit "dev" directory.
        let console = next_entry(&bytes, 0);
        assert_eq!(field(&bytes, console, MODE), 0o020_600);
        assert_eq!(field(&bytes, console, RDEVMAJOR), 5);
        assert_eq!(field(&bytes, console, RDEVMINOR), 1);
        assert_eq!(field(&bytes, console, FILESIZE), 0);
    }

    #[test]
    fn add_symlink_stores_target_as_data() {
        let bytes = archive_with(|a| a.add_symlink("sh", "busybox").unwrap());

        assert_eq!(field(&bytes, 0, MODE), 0o120_777);
        assert_eq!(field(&bytes, 0, FILESIZE), 7);
        // 110 + "sh" + NUL = 113, padded to 116.
        assert_eq!(&bytes[116..123], b"busybox");
    }

    #[test]
    fn add_dir_sets_directory_mode_and_two_links() {
        let bytes = archive_with(|a| a.add_dir("tmp", 0o1777).unwrap());

        assert_eq!(field(&bytes, 0, MODE), 0o041_777);
        assert_eq!(field(&bytes, 0, NLINK), 2);
    }

    #[test]
    fn add_dir_same_mode_twice_is_one_entry() {
        let once = archive_with(|a| a.add_dir("proc", 0o555).unwrap());
        let twice = archive_with(|a| {
            a.add_dir("proc", 0o555).unwrap();
            a.add_dir("/proc/", 0o555).unwrap();
        });

        assert_eq!(once, twice);
    }

    #[test]
    fn add_dir_other_mode_than_existing_is_duplicate() {
        let mut archive = Archive::new(Vec::new());
        archive.add_dir("tmp", 0o755).unwrap();

        let error = archive.add_dir("tmp", 0o1777).unwrap_err();

        assert!(matches!(error, CpioError::DuplicatePath { path } if path == "tmp"));
    }

    #[test]
    fn add_file_twice_is_duplicate() {
        let mut archive = Archive::new(Vec::new());
        archive.add_file("init", 0o755, b"").unwrap();

        let error = archive.add_file("/init", 0o755, b"").unwrap_err();

        assert!(matches!(error, CpioError::DuplicatePath { .. }));
    }

    #[test]
    fn add_file_under_a_file_is_not_a_directory() {
        let mut archive = Archive::new(Vec::new());
        archive.add_file("init", 0o755, b"").unwrap();

        let error = archive.add_file("init/x", 0o644, b"").unwrap_err();

        assert!(matches!(error, CpioError::NotADirectory { path } if path == "init"));
    }

    #[test]
    fn add_file_with_dot_dot_is_invalid() {
        let mut archive = Archive::new(Vec::new());

        let error = archive.add_file("lib/../etc", 0o644, b"").unwrap_err();

        assert!(matches!(error, CpioError::InvalidPath { .. }));
    }

    #[test]
    fn add_file_named_like_the_trailer_is_invalid() {
        let mut archive = Archive::new(Vec::new());

        let error = archive.add_file(TRAILER_NAME, 0o644, b"").unwrap_err();

        assert!(matches!(error, CpioError::InvalidPath { .. }));
    }

    #[test]
    fn add_symlink_empty_target_is_invalid() {
        let mut archive = Archive::new(Vec::new());

        let error = archive.add_symlink("sh", "").unwrap_err();

        assert!(matches!(error, CpioError::InvalidPath { .. }));
    }

    #[test]
    fn entry_size_over_u32_is_too_large() {
        let error = entry_size("big", 1 << 32).unwrap_err();

        assert!(matches!(error, CpioError::TooLarge { size, .. } if size == 1 << 32));
    }

    #[test]
    fn add_file_from_missing_host_file_names_it() {
        let mut archive = Archive::new(Vec::new());

        let error = archive
            .add_file_from("x", 0o644, Path::new("/nonexistent/crib-test"))
            .unwrap_err();

        assert!(error.to_string().contains("/nonexistent/crib-test"));
    }

    #[test]
    fn add_file_from_host_equals_add_file() {
        let dir = std::env::temp_dir().join(format!("crib-cpio-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let host = dir.join("data");
        std::fs::write(&host, b"abcdefg").unwrap();

        let from_path = archive_with(|a| a.add_file_from("f", 0o644, &host).unwrap());
        let from_bytes = archive_with(|a| a.add_file("f", 0o644, b"abcdefg").unwrap());

        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(from_path, from_bytes);
    }

    #[test]
    fn inode_numbers_count_up_in_write_order() {
        let bytes = archive_with(|a| {
            a.add_file("a", 0o644, b"").unwrap();
            a.add_file("b", 0o644, b"").unwrap();
        });

        let second = next_entry(&bytes, 0);
        assert_eq!(field(&bytes, 0, INO), 1);
        assert_eq!(field(&bytes, second, INO), 2);
    }

    #[test]
    fn write_failure_is_a_write_error() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::other("disk full"))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut archive = Archive::new(Broken);

        let error = archive.add_file("a", 0o644, b"x").unwrap_err();

        assert!(matches!(error, CpioError::Write { .. }));
    }

    #[test]
    fn archives_concatenate_on_an_aligned_boundary() {
        let first = archive_with(|a| a.add_file("init", 0o755, b"abc").unwrap());
        let mut second = Archive::new(first);
        second.add_file("pod.json", 0o644, b"{}").unwrap();
        let both = second.finish().unwrap();

        assert_eq!(both.len() % 4, 0);
        assert!(both.windows(10).filter(|w| w == b"TRAILER!!!").count() == 2);
    }
}
