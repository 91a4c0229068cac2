//! A Linux tap device as crib uses it: one `/dev/net/tun` file per queue pair, attached
//! with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` (and `IFF_MULTI_QUEUE` for more than one),
//! non-blocking, with a 12-byte vnet header (`TUNSETVNETHDRSZ`).

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use super::{NetError, MAX_IFNAME_BYTES, VNET_HDR_BYTES};

/// `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// `_IOW('T', 208, unsigned int)`.
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
/// `_IOW('T', 216, int)`.
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;

/// `TUN_F_*` offloads the reader of a tap accepts (`TUNSETOFFLOAD`).
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;

/// `struct ifreq` with the `ifr_flags` member: 16 bytes of name, then the union.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Checks an interface name: what `ip link` accepts, and nothing a path could misuse.
pub fn check_name(name: &str) -> Result<(), NetError> {
    let bad = name.is_empty()
        || name.len() > MAX_IFNAME_BYTES
        || name == "."
        || name == ".."
        || name
            .bytes()
            .any(|b| b == b'/' || b == b',' || b == b':' || b.is_ascii_whitespace() || b == 0);
    if bad {
        return Err(NetError::Name(name.to_string()));
    }
    Ok(())
}

/// An attached tap: one file per queue pair.
#[derive(Debug)]
pub struct Tap {
    name: String,
    queues: Vec<OwnedFd>,
}

impl Tap {
    /// Attaches to tap `name` with `queues` queues. Without `create` the interface must
    /// exist (`ip tuntap add`); with it, crib creates a tap that lives as long as crib
    /// (needs CAP_NET_ADMIN).
    pub fn open(name: &str, queues: u16, create: bool) -> Result<Self, NetError> {
        check_name(name)?;
        if !(1..=super::MAX_QUEUE_PAIRS).contains(&queues) {
            return Err(NetError::Queues(queues));
        }
        if !create && !interface_exists(name) {
            return Err(NetError::NoSuchTap(name.to_string()));
        }
        let mut flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        if queues > 1 {
            flags |= libc::IFF_MULTI_QUEUE;
        }
        let mut fds = Vec::with_capacity(usize::from(queues));
        for _ in 0..queues {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open("/dev/net/tun")
                .map_err(NetError::OpenTun)?;
            let mut req = IfReq {
                name: [0; 16],
                // The IFF_* values fit a short.
                flags: flags as libc::c_short,
                _pad: [0; 22],
            };
            req.name[..name.len()].copy_from_slice(name.as_bytes());
            // SAFETY: TUNSETIFF reads and writes a `struct ifreq`; `req` is one (40 bytes,
            // the name NUL-terminated) and outlives the call; `file` is an open tun file.
            let ret = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
            if ret < 0 {
                return Err(NetError::Attach {
                    name: name.to_string(),
                    source: io::Error::last_os_error(),
                });
            }
            let size: libc::c_int = VNET_HDR_BYTES as libc::c_int;
            // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which is valid for
            // the call.
            let ret = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ, &size) };
            if ret < 0 {
                return Err(NetError::VnetHeader {
                    name: name.to_string(),
                    source: io::Error::last_os_error(),
                });
            }
            fds.push(OwnedFd::from(file));
        }
        Ok(Self {
            name: name.to_string(),
            queues: fds,
        })
    }

    /// A tap over files that stand in for its queues (socket pairs in tests).
    pub fn from_fds(name: &str, queues: Vec<OwnedFd>) -> Self {
        Self {
            name: name.to_string(),
            queues,
        }
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How many queues the tap was attached with.
    pub fn queue_count(&self) -> usize {
        self.queues.len()
    }

    /// A duplicate of queue `index`'s file, for a worker.
    pub fn queue(&self, index: usize) -> io::Result<OwnedFd> {
        self.queues
            .get(index)
            .ok_or_else(|| io::Error::other(format!("tap has no queue {index}")))?
            .try_clone()
    }

    /// Tells the tap which offloads (`TUN_F_*`) the guest accepts on frames it receives.
    pub fn set_offload(&self, flags: u32) -> io::Result<()> {
        let Some(fd) = self.queues.first() else {
            return Ok(());
        };
        // SAFETY: TUNSETOFFLOAD takes its argument by value; `fd` is an open tap file.
        let ret = unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETOFFLOAD, libc::c_ulong::from(flags)) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Whether a network interface `name` exists in crib's network namespace. Asked of the
/// kernel (`if_nametoindex`), not of /sys/class/net: sysfs shows the namespace of whoever
/// mounted it, which is not crib's when crib runs in a namespace entered with setns.
fn interface_exists(name: &str) -> bool {
    let Ok(c_name) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: if_nametoindex reads the NUL-terminated string, valid for the call.
    unsafe { libc::if_nametoindex(c_name.as_ptr()) != 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interfaces_are_looked_up_in_crib_s_namespace() {
        assert!(interface_exists("lo"));
        assert!(!interface_exists("crib-no-such0"));
        assert!(!interface_exists("bad\0name"));
    }

    #[test]
    fn names_are_checked() {
        for good in ["tap0", "crtap0", "a", "x23456789012345"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "x234567890123456",
            "a/b",
            "a b",
            "a,b",
            ".",
            "..",
            "a:1",
        ] {
            let err = check_name(bad).unwrap_err().to_string();
            assert!(err.contains("is not valid"), "{err}");
        }
    }

    #[test]
    fn missing_tap_says_how_to_create_it() {
        let err = Tap::open("crnosuchtap9", 1, false).unwrap_err().to_string();
        assert!(
            err.contains("ip tuntap add dev crnosuchtap9 mode tap"),
            "{err}"
        );
    }

    #[test]
    fn zero_queues_are_refused() {
        assert!(matches!(
            Tap::open("tap0", 0, false),
            Err(NetError::Queues(0))
        ));
    }
}
