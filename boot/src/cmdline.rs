//! The kernel command line: validation against the kernel's limit and placement.

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::setup_header;
use vm_memory::GuestMemoryBackend;

use crate::layout::{CMDLINE_MAX_BYTES, CMDLINE_START};

/// Errors of the command line.
#[derive(Debug, thiserror::Error)]
pub enum CmdlineError {
    #[error(
        "kernel command line is {len} bytes; this kernel accepts at most {max}: shorten --cmdline"
    )]
    TooLong { len: usize, max: usize },
    #[error("kernel command line has a non-printable or non-ASCII byte at offset {offset}: fix --cmdline")]
    InvalidByte { offset: usize },
    #[error("kernel command line rejected")]
    Invalid(#[source] linux_loader::cmdline::Error),
    #[error("cannot write the kernel command line into guest memory")]
    Write(#[source] linux_loader::loader::Error),
}

/// The most bytes (without the NUL) the kernel reads: its setup header says, else Linux's
/// x86 default.
pub fn max_len(header: Option<&setup_header>) -> usize {
    header
        .map(|h| h.cmdline_size as usize)
        .filter(|&size| size > 0)
        .unwrap_or(CMDLINE_MAX_BYTES - 1)
}

/// The reboot method crib adds when the command line names none. On a hardware-reduced
/// ACPI platform without EFI, Linux picks `reboot=efi` by default (arch/x86 `reboot_init`:
/// HW_REDUCED_ACPI implies EFI reset), and the guest hangs in its reboot path; the FADT
/// reset register that crib provides works.
pub const DEFAULT_REBOOT_ARG: &str = "reboot=acpi";

/// True if the kernel's own arguments (before a standalone `--`) include `key`.
fn has_kernel_arg(raw: &str, key: &str) -> bool {
    raw.split_whitespace()
        .take_while(|word| *word != "--")
        .any(|word| word.starts_with(key))
}

/// Tells the 8250 driver that crib's one UART (COM1) is all there is, so a distro kernel
/// does not probe three absent legacy UARTs at boot (each probe is a burst of port exits).
pub const DEFAULT_UARTS_ARG: &str = "8250.nr_uarts=1";

/// Keeps a one-vCPU kernel's SMP instructions as they are. On a single CPU, Linux rewrites
/// every `lock` prefix in its text to a no-op prefix at boot (`alternatives_smp_unlock`),
/// one `text_poke` each, and each poke switches to a temporary page table and back: about
/// 3,500 pokes in crib's pod kernel and 7,000 CR3 writes, which a hypervisor without
/// nested paging traps (0.4 s of a 2 s boot in the lab; 1.4 s with Debian's kernel). The
/// price is a locked instruction where a plain one would do, a few cycles per atomic
/// operation on one CPU; a VM's boot time is what crib's users wait for.
pub const ONE_CPU_ARG: &str = "noreplace-smp";

/// Validates `raw` for a kernel that accepts `max` bytes, adding [`DEFAULT_REBOOT_ARG`]
/// and [`DEFAULT_UARTS_ARG`] when `raw` does not set them itself, and [`ONE_CPU_ARG`] for
/// a guest with one vCPU.
pub fn build(raw: &str, max: usize, cpus: u8) -> Result<Cmdline, CmdlineError> {
    if let Some(offset) = raw
        .bytes()
        .position(|b| !(b == b' ' || b.is_ascii_graphic()))
    {
        return Err(CmdlineError::InvalidByte { offset });
    }
    let one_cpu = (cpus == 1).then_some((ONE_CPU_ARG, ONE_CPU_ARG));
    let defaults: Vec<&str> = [
        ("reboot=", DEFAULT_REBOOT_ARG),
        ("8250.nr_uarts=", DEFAULT_UARTS_ARG),
    ]
    .into_iter()
    .chain(one_cpu)
    .filter(|(key, _)| !has_kernel_arg(raw, key))
    .map(|(_, arg)| arg)
    .collect();
    let len = raw.len() + defaults.iter().map(|arg| arg.len() + 1).sum::<usize>();
    if len > max {
        return Err(CmdlineError::TooLong { len, max });
    }
    // Capacity counts the NUL terminator.
    let mut cmdline = Cmdline::try_from(raw, max + 1).map_err(CmdlineError::Invalid)?;
    for arg in defaults {
        cmdline.insert_str(arg).map_err(CmdlineError::Invalid)?;
    }
    Ok(cmdline)
}

/// Writes the command line at [`CMDLINE_START`]; returns its length without the NUL.
pub fn write<M: GuestMemoryBackend>(mem: &M, cmdline: &Cmdline) -> Result<usize, CmdlineError> {
    linux_loader::loader::load_cmdline(mem, CMDLINE_START, cmdline).map_err(CmdlineError::Write)?;
    let bytes = cmdline.as_cstring().map_err(CmdlineError::Invalid)?;
    Ok(bytes.as_bytes().len())
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use super::*;

    #[test]
    fn command_line_is_written_nul_terminated() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x40000)]).unwrap();
        let raw = "console=ttyS0 reboot=k 8250.nr_uarts=1 -- /bin/sh -c \"echo hi\"";
        let cmdline = build(raw, 2047, 2).unwrap();
        let len = write(&mem, &cmdline).unwrap();
        let mut buf = vec![0u8; len + 1];
        mem.read_slice(&mut buf, CMDLINE_START).unwrap();
        assert_eq!(&buf[..len], raw.as_bytes());
        assert_eq!(buf[len], 0);
    }

    #[test]
    fn defaults_are_added_before_init_args() {
        let cmdline = build(
            "console=ttyS0 -- /bin/echo reboot=k 8250.nr_uarts=4",
            2047,
            2,
        )
        .unwrap();
        let text = cmdline.as_cstring().unwrap().into_string().unwrap();
        assert_eq!(
            text,
            "console=ttyS0 reboot=acpi 8250.nr_uarts=1 -- /bin/echo reboot=k 8250.nr_uarts=4"
        );
    }

    #[test]
    fn one_vcpu_keeps_smp_instructions() {
        let cmdline = build("console=ttyS0 -- /bin/true", 2047, 1).unwrap();
        assert_eq!(
            cmdline.as_cstring().unwrap().into_string().unwrap(),
            "console=ttyS0 reboot=acpi 8250.nr_uarts=1 noreplace-smp -- /bin/true"
        );
        let cmdline = build("noreplace-smp console=ttyS0", 2047, 1).unwrap();
        assert_eq!(
            cmdline.as_cstring().unwrap().into_string().unwrap(),
            "noreplace-smp console=ttyS0 reboot=acpi 8250.nr_uarts=1"
        );
    }

    #[test]
    fn users_own_values_are_kept() {
        let cmdline = build("reboot=t console=ttyS0 8250.nr_uarts=2", 2047, 2).unwrap();
        assert_eq!(
            cmdline.as_cstring().unwrap().into_string().unwrap(),
            "reboot=t console=ttyS0 8250.nr_uarts=2"
        );
    }

    #[test]
    fn command_line_over_limit_is_too_long() {
        let err = build(
            &format!("reboot=k 8250.nr_uarts=1 {}", "a".repeat(2024)),
            2047,
            2,
        )
        .unwrap_err();
        assert!(matches!(
            err,
            CmdlineError::TooLong {
                len: 2049,
                max: 2047
            }
        ));
    }

    #[test]
    fn added_defaults_count_against_the_limit() {
        let err = build(&"a".repeat(2020), 2047, 2).unwrap_err();
        assert!(matches!(
            err,
            CmdlineError::TooLong {
                len: 2048,
                max: 2047
            }
        ));
    }

    #[test]
    fn command_line_at_limit_is_accepted() {
        assert!(build(
            &format!("reboot=k 8250.nr_uarts=1 {}", "a".repeat(2022)),
            2047,
            2,
        )
        .is_ok());
    }

    #[test]
    fn command_line_with_newline_is_invalid() {
        let err = build("console=ttyS0\nquiet", 2047, 2).unwrap_err();
        assert!(matches!(err, CmdlineError::InvalidByte { offset: 13 }));
    }

    #[test]
    fn max_len_defaults_without_header() {
        assert_eq!(max_len(None), 2047);
    }

    #[test]
    fn max_len_follows_setup_header() {
        let header = setup_header {
            cmdline_size: 4095,
            ..Default::default()
        };
        assert_eq!(max_len(Some(&header)), 4095);
    }
}
