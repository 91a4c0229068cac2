//! The Linux zero page (`struct boot_params`, Documentation/arch/x86/boot.rst): setup
//! header, command line and initrd pointers, the e820 map and the RSDP address; and the
//! `setup_data` chain it points to, which carries an RNG seed (`SETUP_RNG_SEED`,
//! arch/x86/include/uapi/asm/setup_data.h) so the guest's random pool is ready at once.
//! The kernel reads the chain on every 64-bit entry with a zero page (bzImage or ELF
//! vmlinux alike: `parse_setup_data` in arch/x86/kernel/setup.c), credits the seed and
//! wipes it.

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{
    boot_e820_entry, boot_params, setup_header, E820_MAX_ENTRIES_ZEROPAGE, SETUP_RNG_SEED,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::layout::{CMDLINE_START, SETUP_DATA_START, ZERO_PAGE_START};
use crate::memory_map::e820_entries;

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
/// "Undefined" boot loader id: we are not one of the registered loaders.
const KERNEL_LOADER_OTHER: u8 = 0xff;
/// Alignment the kernel asks for when it does not say (2 MiB multiple Linux accepts).
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;
/// Bytes of RNG seed handed to the guest: 256 bits, what the kernel credits as a full
/// seed (QEMU passes as many).
pub const RNG_SEED_BYTES: usize = 32;
/// `struct setup_data` header: `u64 next; u32 type; u32 len;`.
const SETUP_DATA_HEADER_BYTES: u64 = 16;

/// What goes into the zero page.
#[derive(Clone, Copy, Debug, Default)]
pub struct ZeroPage {
    /// The bzImage's own setup header, if any.
    pub setup_header: Option<setup_header>,
    /// Length of the command line without its NUL.
    pub cmdline_len: usize,
    /// Initrd address and size.
    pub initrd: Option<(GuestAddress, u64)>,
    /// Guest RAM size in bytes.
    pub mem_bytes: u64,
    /// Where the ACPI RSDP is, so the kernel need not scan for it.
    pub rsdp: Option<GuestAddress>,
    /// Where the `setup_data` chain starts ([`write_rng_seed`]), if there is one.
    pub setup_data: Option<GuestAddress>,
}

/// Errors of the zero page.
#[derive(Debug, thiserror::Error)]
pub enum ZeroPageError {
    #[error("a zero-page field does not fit: {field}")]
    FieldOverflow { field: &'static str },
    #[error("cannot write the zero page into guest memory")]
    Write(#[source] linux_loader::configurator::Error),
    #[error("cannot write the setup_data chain into guest memory")]
    SetupData(#[source] vm_memory::GuestMemoryError),
}

/// Builds the `boot_params` structure.
pub fn build(config: &ZeroPage) -> Result<boot_params, ZeroPageError> {
    let overflow = |field| ZeroPageError::FieldOverflow { field };
    let mut params = boot_params::default();
    if let Some(header) = config.setup_header {
        params.hdr = header;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    params.hdr.cmd_line_ptr =
        u32::try_from(CMDLINE_START.0).map_err(|_| overflow("cmd_line_ptr"))?;
    params.hdr.cmdline_size =
        u32::try_from(config.cmdline_len).map_err(|_| overflow("cmdline_size"))?;
    if let Some((addr, size)) = config.initrd {
        params.hdr.ramdisk_image = u32::try_from(addr.0).map_err(|_| overflow("ramdisk_image"))?;
        params.hdr.ramdisk_size = u32::try_from(size).map_err(|_| overflow("ramdisk_size"))?;
    }
    if let Some(rsdp) = config.rsdp {
        params.acpi_rsdp_addr = rsdp.0;
    }
    if let Some(setup_data) = config.setup_data {
        params.hdr.setup_data = setup_data.0;
    }
    let entries = e820_entries(config.mem_bytes);
    if entries.len() > E820_MAX_ENTRIES_ZEROPAGE {
        return Err(overflow("e820_table"));
    }
    for (slot, entry) in params.e820_table.iter_mut().zip(&entries) {
        *slot = boot_e820_entry {
            addr: entry.addr,
            size: entry.size,
            r#type: entry.kind,
        };
    }
    params.e820_entries = u8::try_from(entries.len()).map_err(|_| overflow("e820_entries"))?;
    Ok(params)
}

/// Writes `params` at [`ZERO_PAGE_START`].
pub fn write<M: GuestMemoryBackend>(mem: &M, params: &boot_params) -> Result<(), ZeroPageError> {
    LinuxBootConfigurator::write_bootparams::<M>(&BootParams::new(params, ZERO_PAGE_START), mem)
        .map_err(ZeroPageError::Write)
}

/// Writes a one-entry `setup_data` chain at [`SETUP_DATA_START`]: a `SETUP_RNG_SEED`
/// carrying `seed`. Returns its address, for [`ZeroPage::setup_data`].
pub fn write_rng_seed<M: GuestMemoryBackend>(
    mem: &M,
    seed: &[u8; RNG_SEED_BYTES],
) -> Result<GuestAddress, ZeroPageError> {
    let mut entry = Vec::with_capacity(SETUP_DATA_HEADER_BYTES as usize + RNG_SEED_BYTES);
    entry.extend_from_slice(&0u64.to_le_bytes()); // next: the chain ends here
    entry.extend_from_slice(&SETUP_RNG_SEED.to_le_bytes());
    entry.extend_from_slice(&(RNG_SEED_BYTES as u32).to_le_bytes());
    entry.extend_from_slice(seed);
    mem.write_slice(&entry, SETUP_DATA_START)
        .map_err(ZeroPageError::SetupData)?;
    Ok(SETUP_DATA_START)
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestMemoryMmap};

    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn zero_page_has_magic_and_pointers() {
        let params = build(&ZeroPage {
            cmdline_len: 42,
            initrd: Some((GuestAddress(0x1f00_0000), 0x1234)),
            mem_bytes: 512 * MIB,
            rsdp: Some(GuestAddress(0xe0000)),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            (params.hdr.boot_flag, params.hdr.header),
            (0xaa55, 0x5372_6448)
        );
        assert_eq!(
            (params.hdr.cmd_line_ptr, params.hdr.cmdline_size),
            (0x20000, 42)
        );
        assert_eq!(
            (params.hdr.ramdisk_image, params.hdr.ramdisk_size),
            (0x1f00_0000, 0x1234)
        );
        assert_eq!({ params.acpi_rsdp_addr }, 0xe0000);
        assert_eq!(params.hdr.type_of_loader, 0xff);
    }

    #[test]
    fn zero_page_e820_lists_ram() {
        let params = build(&ZeroPage {
            mem_bytes: 512 * MIB,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(params.e820_entries, 4);
        let high = params.e820_table[2];
        assert_eq!(
            ({ high.addr }, { high.size }, { high.r#type }),
            (MIB, 511 * MIB, 1)
        );
    }

    #[test]
    fn zero_page_keeps_bzimage_header_fields() {
        let header = setup_header {
            version: 0x020f,
            kernel_alignment: 0x20_0000,
            ..Default::default()
        };
        let params = build(&ZeroPage {
            setup_header: Some(header),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            (params.hdr.version, params.hdr.kernel_alignment),
            (0x020f, 0x20_0000)
        );
    }

    #[test]
    fn initrd_above_4g_does_not_fit_the_header() {
        let err = build(&ZeroPage {
            initrd: Some((GuestAddress(1 << 32), 1)),
            ..Default::default()
        })
        .unwrap_err();
        assert!(matches!(
            err,
            ZeroPageError::FieldOverflow {
                field: "ramdisk_image"
            }
        ));
    }

    #[test]
    fn zero_page_is_written_at_0x7000() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let params = build(&ZeroPage {
            cmdline_len: 7,
            ..Default::default()
        })
        .unwrap();
        write(&mem, &params).unwrap();
        // boot_flag lives at offset 0x1fe of the zero page.
        let flag: u16 = mem.read_obj(GuestAddress(0x7000 + 0x1fe)).unwrap();
        assert_eq!(flag, 0xaa55);
    }

    #[test]
    fn rng_seed_is_one_setup_data_entry_the_zero_page_points_to() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x20000)]).unwrap();
        let seed = [0x5a; RNG_SEED_BYTES];
        let addr = write_rng_seed(&mem, &seed).unwrap();
        let params = build(&ZeroPage {
            setup_data: Some(addr),
            ..Default::default()
        })
        .unwrap();
        assert_eq!({ params.hdr.setup_data }, 0x1_0000);
        let next: u64 = mem.read_obj(addr).unwrap();
        let kind: u32 = mem.read_obj(GuestAddress(addr.0 + 8)).unwrap();
        let len: u32 = mem.read_obj(GuestAddress(addr.0 + 12)).unwrap();
        let mut data = [0u8; RNG_SEED_BYTES];
        mem.read_slice(&mut data, GuestAddress(addr.0 + 16))
            .unwrap();
        assert_eq!((next, kind, len, data), (0, 9, 32, seed));
    }

    #[test]
    fn zero_page_without_setup_data_has_a_null_chain() {
        let params = build(&ZeroPage::default()).unwrap();
        assert_eq!({ params.hdr.setup_data }, 0);
    }
}
