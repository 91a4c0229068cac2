//! Loading the guest kernel (ELF vmlinux or bzImage, through linux-loader) and the initrd.

use std::io::{Read, Seek, SeekFrom};

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, ReadVolatile};

use crate::layout::HIGH_RAM_START;
use crate::memory_map::{low_ram_end, page_align_down};

/// Offset of the 64-bit entry point from the start of a bzImage's protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// `xloadflags` bit: the kernel has the 64-bit entry point at +0x200.
const XLF_KERNEL_64: u16 = 0x1;
/// The initrd may sit anywhere below 2 GiB unless the kernel says otherwise.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x7fff_ffff;
const ELF_MAGIC: [u8; 4] = *b"\x7fELF";
const BZIMAGE_MAGIC_OFFSET: u64 = 0x202;
const BZIMAGE_MAGIC: [u8; 4] = *b"HdrS";

/// Which kind of image the kernel file was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// An uncompressed ELF vmlinux, entered at its ELF entry point.
    Elf,
    /// A bzImage, entered at its 64-bit entry point.
    BzImage,
}

/// Where the kernel landed and how to enter it.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    pub format: KernelFormat,
    /// Guest-physical address of the 64-bit entry point.
    pub entry: GuestAddress,
    /// First guest-physical byte the kernel may still use after loading: the initrd must
    /// start at or above it (for a bzImage, this includes room to decompress in place).
    pub reserved_end: u64,
    /// The bzImage setup header, copied into the zero page.
    pub setup_header: Option<setup_header>,
}

/// Errors while loading a kernel or an initrd.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("cannot read the kernel image")]
    Read(#[source] std::io::Error),
    #[error(
        "not a kernel: neither an ELF vmlinux nor a bzImage (no ELF magic, no 'HdrS' at 0x202)"
    )]
    NotAKernel,
    #[error("the bzImage has no 64-bit entry point (xloadflags lacks XLF_KERNEL_64)")]
    No64BitEntry,
    #[error("cannot load the kernel into guest memory; is --memory large enough?")]
    Load(#[source] linux_loader::loader::Error),
    #[error(
        "guest memory too small: the kernel needs up to {kernel_end:#x} and the initrd {initrd_bytes} bytes, \
         but low RAM ends at {ram_end:#x}; raise --memory"
    )]
    InitrdDoesNotFit {
        kernel_end: u64,
        initrd_bytes: u64,
        ram_end: u64,
    },
    #[error("cannot copy the initrd into guest memory")]
    InitrdCopy(#[source] vm_memory::GuestMemoryError),
}

/// Detects the image format and loads it.
pub fn load_kernel<M, F>(mem: &M, image: &mut F) -> Result<LoadedKernel, KernelError>
where
    M: GuestMemoryBackend,
    F: Read + ReadVolatile + Seek,
{
    let format = detect_format(image)?;
    image.seek(SeekFrom::Start(0)).map_err(KernelError::Read)?;
    match format {
        KernelFormat::Elf => {
            let result =
                Elf::load(mem, None, image, Some(HIGH_RAM_START)).map_err(KernelError::Load)?;
            Ok(LoadedKernel {
                format,
                entry: result.kernel_load,
                reserved_end: result.kernel_end,
                setup_header: None,
            })
        }
        KernelFormat::BzImage => {
            let result =
                BzImage::load(mem, None, image, Some(HIGH_RAM_START)).map_err(KernelError::Load)?;
            let header = result.setup_header.ok_or(KernelError::NotAKernel)?;
            if header.xloadflags & XLF_KERNEL_64 == 0 {
                return Err(KernelError::No64BitEntry);
            }
            // The decompressor extracts to pref_address and needs init_size bytes there.
            let decompressed_end = header
                .pref_address
                .saturating_add(u64::from(header.init_size));
            Ok(LoadedKernel {
                format,
                entry: GuestAddress(result.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET),
                reserved_end: result.kernel_end.max(decompressed_end),
                setup_header: Some(header),
            })
        }
    }
}

fn detect_format<F: Read + Seek>(image: &mut F) -> Result<KernelFormat, KernelError> {
    let mut magic = [0u8; 4];
    image.seek(SeekFrom::Start(0)).map_err(KernelError::Read)?;
    if image.read_exact(&mut magic).is_ok() && magic == ELF_MAGIC {
        return Ok(KernelFormat::Elf);
    }
    image
        .seek(SeekFrom::Start(BZIMAGE_MAGIC_OFFSET))
        .map_err(KernelError::Read)?;
    if image.read_exact(&mut magic).is_ok() && magic == BZIMAGE_MAGIC {
        return Ok(KernelFormat::BzImage);
    }
    Err(KernelError::NotAKernel)
}

/// Picks the initrd's address: page-aligned, as high in low RAM as the kernel allows, and
/// above everything the kernel needs.
pub fn place_initrd(
    kernel: &LoadedKernel,
    mem_bytes: u64,
    initrd_bytes: u64,
) -> Result<GuestAddress, KernelError> {
    let addr_max = kernel
        .setup_header
        .map(|h| u64::from(h.initrd_addr_max))
        .filter(|&max| max != 0)
        .unwrap_or(DEFAULT_INITRD_ADDR_MAX);
    let ram_end = low_ram_end(mem_bytes).min(addr_max.saturating_add(1));
    let too_small = KernelError::InitrdDoesNotFit {
        kernel_end: kernel.reserved_end,
        initrd_bytes,
        ram_end,
    };
    let start = ram_end.checked_sub(initrd_bytes).map(page_align_down);
    match start {
        Some(start) if start >= kernel.reserved_end => Ok(GuestAddress(start)),
        _ => Err(too_small),
    }
}

/// Copies `size` bytes of the initrd from `file` to `addr`.
pub fn load_initrd<M, F>(
    mem: &M,
    addr: GuestAddress,
    file: &mut F,
    size: usize,
) -> Result<(), KernelError>
where
    M: GuestMemoryBackend,
    F: ReadVolatile,
{
    mem.read_exact_volatile_from(addr, file, size)
        .map_err(KernelError::InitrdCopy)
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use vm_memory::GuestMemoryMmap;

    use super::*;

    const MIB: u64 = 1 << 20;

    fn mem(bytes: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), bytes as usize)]).unwrap()
    }

    /// A minimal bzImage: setup header with 'HdrS', version 2.15, loaded high, 64-bit entry,
    /// one setup sector, then `payload` as the protected-mode code.
    fn fake_bzimage(xloadflags: u16, payload: &[u8]) -> Vec<u8> {
        let mut img = vec![0u8; 2 * 512];
        img[0x1f1] = 1; // setup_sects
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        img[0x211] = 0x1; // loadflags: LOADED_HIGH
        img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
        img[0x22c..0x230].copy_from_slice(&0x37ff_ffffu32.to_le_bytes()); // initrd_addr_max
        img[0x236..0x238].copy_from_slice(&xloadflags.to_le_bytes());
        img[0x258..0x260].copy_from_slice(&0x100_0000u64.to_le_bytes()); // pref_address
        img[0x260..0x264].copy_from_slice(&(4 * MIB as u32).to_le_bytes()); // init_size
        img.extend_from_slice(payload);
        img
    }

    /// A minimal ELF64 executable with one PT_LOAD segment at `paddr`.
    fn fake_elf(paddr: u64, payload: &[u8]) -> Vec<u8> {
        let mut img = vec![0u8; 0x78];
        img[0..4].copy_from_slice(b"\x7fELF");
        img[4] = 2; // 64-bit
        img[5] = 1; // little endian
        img[6] = 1;
        img[0x10..0x12].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        img[0x12..0x14].copy_from_slice(&0x3eu16.to_le_bytes()); // x86-64
        img[0x14..0x18].copy_from_slice(&1u32.to_le_bytes());
        img[0x18..0x20].copy_from_slice(&paddr.to_le_bytes()); // e_entry
        img[0x20..0x28].copy_from_slice(&0x40u64.to_le_bytes()); // e_phoff
        img[0x34..0x36].copy_from_slice(&0x40u16.to_le_bytes()); // e_ehsize
        img[0x36..0x38].copy_from_slice(&0x38u16.to_le_bytes()); // e_phentsize
        img[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
        let ph = 0x40;
        img[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        img[ph + 8..ph + 16].copy_from_slice(&0x78u64.to_le_bytes()); // p_offset
        img[ph + 16..ph + 24].copy_from_slice(&paddr.to_le_bytes()); // p_vaddr
        img[ph + 24..ph + 32].copy_from_slice(&paddr.to_le_bytes()); // p_paddr
        let len = payload.len() as u64;
        img[ph + 32..ph + 40].copy_from_slice(&len.to_le_bytes()); // p_filesz
        img[ph + 40..ph + 48].copy_from_slice(&len.to_le_bytes()); // p_memsz
        img.extend_from_slice(payload);
        img
    }

    #[test]
    fn elf_kernel_is_entered_at_e_entry() {
        let mem = mem(32 * MIB);
        let kernel =
            load_kernel(&mem, &mut Cursor::new(fake_elf(0x100_0000, &[0xf4; 64]))).unwrap();
        assert_eq!(kernel.format, KernelFormat::Elf);
        assert_eq!(kernel.entry, GuestAddress(0x100_0000));
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x100_0000)).unwrap(), 0xf4);
    }

    #[test]
    fn bzimage_is_entered_at_64bit_entry() {
        let mem = mem(32 * MIB);
        let kernel = load_kernel(
            &mem,
            &mut Cursor::new(fake_bzimage(XLF_KERNEL_64, &[0x90; 512])),
        )
        .unwrap();
        assert_eq!(kernel.format, KernelFormat::BzImage);
        assert_eq!(kernel.entry, GuestAddress(0x10_0200));
        assert_eq!(kernel.reserved_end, 0x100_0000 + 4 * MIB);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x10_0000)).unwrap(), 0x90);
    }

    #[test]
    fn bzimage_without_64bit_entry_is_refused() {
        let mem = mem(32 * MIB);
        let err = load_kernel(&mem, &mut Cursor::new(fake_bzimage(0, &[0x90; 512]))).unwrap_err();
        assert!(matches!(err, KernelError::No64BitEntry));
    }

    #[test]
    fn random_bytes_are_not_a_kernel() {
        let mem = mem(32 * MIB);
        let err = load_kernel(&mem, &mut Cursor::new(vec![0x42u8; 4096])).unwrap_err();
        assert!(matches!(err, KernelError::NotAKernel));
    }

    #[test]
    fn empty_file_is_not_a_kernel() {
        let mem = mem(32 * MIB);
        let err = load_kernel(&mem, &mut Cursor::new(Vec::new())).unwrap_err();
        assert!(matches!(err, KernelError::NotAKernel));
    }

    #[test]
    fn elf_beyond_guest_memory_fails_to_load() {
        let mem = mem(8 * MIB);
        let err = load_kernel(&mem, &mut Cursor::new(fake_elf(0x100_0000, &[0; 64]))).unwrap_err();
        assert!(matches!(err, KernelError::Load(_)));
    }

    #[test]
    fn initrd_goes_to_top_of_low_ram_page_aligned() {
        let kernel = LoadedKernel {
            format: KernelFormat::Elf,
            entry: GuestAddress(0x100_0000),
            reserved_end: 0x200_0000,
            setup_header: None,
        };
        let addr = place_initrd(&kernel, 512 * MIB, 0x1234).unwrap();
        assert_eq!(addr, GuestAddress(512 * MIB - 0x2000));
    }

    #[test]
    fn initrd_respects_initrd_addr_max() {
        let header = setup_header {
            initrd_addr_max: 0x0fff_ffff,
            ..Default::default()
        };
        let kernel = LoadedKernel {
            format: KernelFormat::BzImage,
            entry: GuestAddress(0x10_0200),
            reserved_end: 0x200_0000,
            setup_header: Some(header),
        };
        let addr = place_initrd(&kernel, 1024 * MIB, 0x1000).unwrap();
        assert_eq!(addr, GuestAddress(0x1000_0000 - 0x1000));
    }

    #[test]
    fn initrd_overlapping_kernel_is_memory_too_small() {
        let kernel = LoadedKernel {
            format: KernelFormat::Elf,
            entry: GuestAddress(0x100_0000),
            reserved_end: 60 * MIB,
            setup_header: None,
        };
        let err = place_initrd(&kernel, 64 * MIB, 8 * MIB).unwrap_err();
        assert!(matches!(err, KernelError::InitrdDoesNotFit { .. }));
    }

    #[test]
    fn initrd_larger_than_ram_is_memory_too_small() {
        let kernel = LoadedKernel {
            format: KernelFormat::Elf,
            entry: GuestAddress(0x100_0000),
            reserved_end: 0x200_0000,
            setup_header: None,
        };
        assert!(place_initrd(&kernel, 64 * MIB, 128 * MIB).is_err());
    }
}
