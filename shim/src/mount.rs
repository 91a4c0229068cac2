//! Mounting the rootfs containerd hands to Create (`CreateTaskRequest.rootfs`): an
//! overlay of the snapshot's layers, or a bind mount of a directory (the native
//! snapshotter), with mount(8)'s option words. containerd-shim's own `mount_rootfs`
//! forks and waits for the child through the library's reaper, which this shim does not
//! run (it waits for crib itself), so the shim mounts in-process.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

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

#[cfg(test)]
mod tests {
    use super::*;

    fn words(list: &[&str]) -> Vec<String> {
        list.iter().map(|w| (*w).to_owned()).collect()
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
