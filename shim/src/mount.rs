//! Mounting the rootfs containerd hands to Create (`CreateTaskRequest.rootfs`): an
//! overlay of the snapshot's layers, or a bind mount of a directory (the native
//! snapshotter), with mount(8)'s option words. containerd-shim's own `mount_rootfs`
//! forks and waits for the child through the library's reaper, which this shim does not
//! run (it waits for crib itself), so the shim mounts in-process.

use std::ffi::{CString, OsString};
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Errors of one rootfs mount.
#[derive(Debug, Error)]
pub enum MountError {
    #[error("mount option {option:?} is not supported; crib's shim knows mount(8)'s flags and passes other words to the filesystem")]
    Option { option: String },
    #[error("mount {field} contains a NUL byte")]
    Nul { field: &'static str },
    #[error("mount(2) failed")]
    Mount(#[source] io::Error),
}

/// mount(2)'s flags and data from mount(8)-style option words.
#[derive(Debug, PartialEq, Eq)]
pub struct Options {
    pub flags: libc::c_ulong,
    pub data: String,
}

/// Splits option words into flags and filesystem data (kept in order).
pub fn parse_options(options: &[String]) -> Result<Options, MountError> {
    let mut flags: libc::c_ulong = 0;
    let mut data: Vec<&str> = Vec::new();
    for option in options {
        let (set, clear) = match option.as_str() {
            "defaults" | "rw" => (0, libc::MS_RDONLY),
            "ro" => (libc::MS_RDONLY, 0),
            "bind" => (libc::MS_BIND, 0),
            "rbind" => (libc::MS_BIND | libc::MS_REC, 0),
            "nosuid" => (libc::MS_NOSUID, 0),
            "suid" => (0, libc::MS_NOSUID),
            "nodev" => (libc::MS_NODEV, 0),
            "dev" => (0, libc::MS_NODEV),
            "noexec" => (libc::MS_NOEXEC, 0),
            "exec" => (0, libc::MS_NOEXEC),
            "noatime" => (libc::MS_NOATIME, 0),
            "relatime" => (libc::MS_RELATIME, 0),
            "strictatime" => (libc::MS_STRICTATIME, 0),
            "nodiratime" => (libc::MS_NODIRATIME, 0),
            "sync" => (libc::MS_SYNCHRONOUS, 0),
            "async" => (0, libc::MS_SYNCHRONOUS),
            "" => {
                return Err(MountError::Option {
                    option: option.clone(),
                })
            }
            other if other.contains('\0') => return Err(MountError::Nul { field: "option" }),
            other => {
                data.push(other);
                (0, 0)
            }
        };
        flags = (flags | set) & !clear;
    }
    Ok(Options {
        flags,
        data: data.join(","),
    })
}

fn c_string(bytes: &[u8], field: &'static str) -> Result<CString, MountError> {
    CString::new(bytes).map_err(|_| MountError::Nul { field })
}

/// Mounts `source` of type `kind` on `target` with `options`; a read-only bind mount is
/// remounted read-only afterwards, as mount(8) does.
pub fn mount(
    kind: &str,
    source: &str,
    options: &[String],
    target: &Path,
) -> Result<(), MountError> {
    let parsed = parse_options(options)?;
    let is_bind = parsed.flags & libc::MS_BIND != 0 || kind == "bind";
    let flags = if kind == "bind" {
        parsed.flags | libc::MS_BIND
    } else {
        parsed.flags
    };
    let source = c_string(source.as_bytes(), "source")?;
    let target = c_string(target.as_os_str().as_bytes(), "target")?;
    let kind = c_string(kind.as_bytes(), "type")?;
    let data = c_string(parsed.data.as_bytes(), "option")?;
    let data_ptr = if parsed.data.is_empty() {
        std::ptr::null()
    } else {
        data.as_ptr().cast::<libc::c_void>()
    };
    // SAFETY: every pointer is a NUL-terminated string (or null data) owned by this
    // frame and alive across the call; mount(2) only reads them.
    let done = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            kind.as_ptr(),
            flags,
            data_ptr,
        )
    };
    if done != 0 {
        return Err(MountError::Mount(io::Error::last_os_error()));
    }
    if is_bind && flags & libc::MS_RDONLY != 0 {
        let remount = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY;
        // SAFETY: as above; a remount reads only the target path.
        let done = unsafe {
            libc::mount(
                std::ptr::null(),
                target.as_ptr(),
                std::ptr::null(),
                remount,
                std::ptr::null(),
            )
        };
        if done != 0 {
            return Err(MountError::Mount(io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// Bind-mounts `source` (with what is mounted below it) on `target`, read-only if asked.
pub fn bind(source: &Path, target: &Path, readonly: bool) -> Result<(), MountError> {
    let mut options = vec!["rbind".to_owned()];
    if readonly {
        options.push("ro".to_owned());
    }
    let source = source.to_str().ok_or(MountError::Nul { field: "source" })?;
    mount("bind", source, &options, target)
}

/// Makes `dir` a mount of its own whose new submounts propagate to its copies in other
/// mount namespaces (virtiofsd's sandbox takes `/` as a slave): containers added to a
/// running pod have their roots bound below it after virtiofsd started.
pub fn make_shared(dir: &Path) -> Result<(), MountError> {
    let dir_str = dir.to_str().ok_or(MountError::Nul { field: "target" })?;
    mount("bind", dir_str, &["bind".to_owned()], dir)?;
    let target = c_string(dir.as_os_str().as_bytes(), "target")?;
    // SAFETY: `target` is a NUL-terminated string alive across the call; a propagation
    // change reads only the target path.
    let done = unsafe {
        libc::mount(
            std::ptr::null(),
            target.as_ptr(),
            std::ptr::null(),
            libc::MS_SHARED,
            std::ptr::null(),
        )
    };
    if done != 0 {
        let error = io::Error::last_os_error();
        let _ = unmount(dir);
        return Err(MountError::Mount(error));
    }
    Ok(())
}

/// Unmounts `path` (lazily if it is busy).
pub fn unmount(path: &Path) -> io::Result<()> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `c_path` is a NUL-terminated string that lives across the call; umount2
    // reads it and touches no other memory.
    let done = unsafe { libc::umount2(c_path.as_ptr(), 0) };
    if done == 0 {
        return Ok(());
    }
    // SAFETY: as above; MNT_DETACH only changes when the kernel frees the mount.
    let done = unsafe { libc::umount2(c_path.as_ptr(), libc::MNT_DETACH) };
    if done == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The mount points at or below `dir` in mountinfo's contents, deepest first (the order
/// to unmount them in). Bytes, not text: a mount point is any bytes but NUL and `/`
/// (anyone who can mount in this namespace names it), and one that is not UTF-8 must
/// neither hide the others nor come back changed.
pub fn mounts_under(mountinfo: &[u8], dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = mountinfo
        .split(|b| *b == b'\n')
        .filter_map(|line| line.split(|b| *b == b' ').nth(4))
        .map(|point| PathBuf::from(OsString::from_vec(unescape_octal(point))))
        .filter(|point| point.starts_with(dir))
        .collect();
    // Stacked mounts on one point appear once each: each is unmounted in turn.
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let octal = field
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        if let (b'\\', Some(digits)) = (field[i], octal) {
            let value = digits
                .iter()
                .fold(0u8, |v, d| v.wrapping_mul(8).wrapping_add(d - b'0'));
            out.push(value);
            i += 4;
        } else {
            out.push(field[i]);
            i += 1;
        }
    }
    out
}

/// Unmounts everything mounted at or below `dir` (this process's mount namespace);
/// returns the mount points that stayed.
pub fn unmount_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(mountinfo) = std::fs::read("/proc/self/mountinfo") else {
        return Vec::new();
    };
    mounts_under(&mountinfo, dir)
        .into_iter()
        .filter(|point| unmount(point).is_err())
        .collect()
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;

    use super::*;

    fn words(list: &[&str]) -> Vec<String> {
        list.iter().map(|w| (*w).to_owned()).collect()
    }

    #[test]
    fn mounts_under_a_directory_come_deepest_first() {
        let info = "\
22 1 0:21 / / rw - ext4 /dev/vda rw
40 22 0:30 / /run/crib-shim/c-1/share rw shared:5 - none none rw
41 40 0:31 / /run/crib-shim/c-1/share/container rw shared:5 - overlay overlay rw
42 40 0:32 / /run/crib-shim/c-1/share/c\\0402 rw - overlay overlay rw
43 22 0:33 / /run/crib-shim/c-10 rw - tmpfs tmpfs rw
";
        let found = mounts_under(info.as_bytes(), Path::new("/run/crib-shim/c-1"));
        assert_eq!(
            found,
            [
                Path::new("/run/crib-shim/c-1/share/container"),
                Path::new("/run/crib-shim/c-1/share/c 2"),
                Path::new("/run/crib-shim/c-1/share"),
            ]
        );
    }

    /// Found by the mountinfo fuzz target: the file was read as UTF-8, so one mount
    /// point that is not (anywhere in the namespace) made the shim unmount nothing.
    #[test]
    fn mount_points_that_are_not_utf8_are_found_and_hide_nothing() {
        let info = b"\
40 22 0:30 / /run/crib-shim/c-1/share rw shared:5 - none none rw
41 22 0:31 / /mnt/\xff\xfe rw - tmpfs tmpfs rw
42 40 0:32 / /run/crib-shim/c-1/share/c\xe9\\0402 rw - overlay overlay rw
";

        let found = mounts_under(info, Path::new("/run/crib-shim/c-1"));

        assert_eq!(
            found,
            [
                PathBuf::from(OsStr::from_bytes(b"/run/crib-shim/c-1/share/c\xe9 2")),
                PathBuf::from("/run/crib-shim/c-1/share"),
            ]
        );
    }

    #[test]
    fn overlay_options_are_data() {
        let options = parse_options(&words(&[
            "index=off",
            "workdir=/s/2/work",
            "upperdir=/s/2/fs",
            "lowerdir=/s/1/fs",
        ]))
        .unwrap();
        assert_eq!(
            options,
            Options {
                flags: 0,
                data: "index=off,workdir=/s/2/work,upperdir=/s/2/fs,lowerdir=/s/1/fs".into()
            }
        );
    }

    #[test]
    fn bind_flags_are_flags() {
        let options = parse_options(&words(&["rbind", "ro", "nosuid"])).unwrap();
        assert_eq!(
            options.flags,
            libc::MS_BIND | libc::MS_REC | libc::MS_RDONLY | libc::MS_NOSUID
        );
        assert!(options.data.is_empty());
    }

    #[test]
    fn later_words_win() {
        let options = parse_options(&words(&["ro", "rw"])).unwrap();
        assert_eq!(options.flags & libc::MS_RDONLY, 0);
    }

    #[test]
    fn empty_word_is_an_error() {
        let err = parse_options(&words(&["ro", ""])).unwrap_err();
        assert!(matches!(err, MountError::Option { .. }), "{err}");
    }

    #[test]
    fn nul_in_a_word_is_an_error() {
        let err = parse_options(&words(&["a\0b"])).unwrap_err();
        assert!(matches!(err, MountError::Nul { .. }), "{err}");
    }
}
