//! Tells a static ELF executable from a dynamic one: the initramfs has no
//! libc or loader, so a dynamically linked /init or busybox fails at boot
//! with only "No working init found". Checked here instead, at build time.
//!
//! An executable is dynamic when it has a `PT_INTERP` program header
//! (ELF-64 object file format, "Program header"); static-pie has none.

use thiserror::Error;

/// `\x7fELF`.
const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
/// Program header type naming the dynamic loader.
const PT_INTERP: u32 = 3;

/// Errors of the ELF check.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ElfError {
    #[error("not a 64-bit little-endian ELF executable")]
    NotElf64,
    #[error("the program headers lie outside the file")]
    Truncated,
}

/// How an executable is linked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Linkage {
    Static,
    /// Needs this program interpreter (dynamic loader).
    Dynamic {
        interpreter: String,
    },
}

/// Reads the linkage of the ELF image in `bytes`.
pub fn linkage(bytes: &[u8]) -> Result<Linkage, ElfError> {
    if bytes.get(..4) != Some(ELF_MAGIC.as_slice())
        || bytes.get(4) != Some(&ELFCLASS64)
        || bytes.get(5) != Some(&ELFDATA2LSB)
    {
        return Err(ElfError::NotElf64);
    }
    let phoff = read_u64(bytes, 0x20)?;
    let phentsize = u64::from(read_u16(bytes, 0x36)?);
    let phnum = u64::from(read_u16(bytes, 0x38)?);
    for index in 0..phnum {
        let header = index
            .checked_mul(phentsize)
            .and_then(|offset| offset.checked_add(phoff))
            .and_then(|offset| usize::try_from(offset).ok())
            .ok_or(ElfError::Truncated)?;
        if read_u32(bytes, header)? != PT_INTERP {
            continue;
        }
        let offset = to_usize(read_u64(bytes, header + 8)?)?;
        let size = to_usize(read_u64(bytes, header + 32)?)?;
        let end = offset.checked_add(size).ok_or(ElfError::Truncated)?;
        let path = bytes.get(offset..end).ok_or(ElfError::Truncated)?;
        let path = path.split(|&b| b == 0).next().unwrap_or_default();
        return Ok(Linkage::Dynamic {
            interpreter: String::from_utf8_lossy(path).into_owned(),
        });
    }
    Ok(Linkage::Static)
}

fn to_usize(value: u64) -> Result<usize, ElfError> {
    usize::try_from(value).map_err(|_| ElfError::Truncated)
}

fn field<const N: usize>(bytes: &[u8], offset: usize) -> Result<[u8; N], ElfError> {
    offset
        .checked_add(N)
        .and_then(|end| bytes.get(offset..end))
        .and_then(|slice| <[u8; N]>::try_from(slice).ok())
        .ok_or(ElfError::Truncated)
}

fn read_u16(bytes: &[u8], offset: usize) -> Result<u16, ElfError> {
    field(bytes, offset).map(u16::from_le_bytes)
}

fn read_u32(bytes: &[u8], offset: usize) -> Result<u32, ElfError> {
    field(bytes, offset).map(u32::from_le_bytes)
}

fn read_u64(bytes: &[u8], offset: usize) -> Result<u64, ElfError> {
    field(bytes, offset).map(u64::from_le_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EHDR_BYTES: usize = 64;
    const PHDR_BYTES: usize = 56;

    /// A minimal ELF-64 image with the given program header types; a
    /// PT_INTERP header points at "/lib/ld.so\0" after the headers.
    fn elf(types: &[u32]) -> Vec<u8> {
        let mut bytes = vec![0; EHDR_BYTES + PHDR_BYTES * types.len()];
        bytes[..4].copy_from_slice(ELF_MAGIC);
        bytes[4] = ELFCLASS64;
        bytes[5] = ELFDATA2LSB;
        bytes[0x20..0x28].copy_from_slice(&(EHDR_BYTES as u64).to_le_bytes());
        bytes[0x36..0x38].copy_from_slice(&(PHDR_BYTES as u16).to_le_bytes());
        bytes[0x38..0x3a].copy_from_slice(&(types.len() as u16).to_le_bytes());
        let interp_offset = bytes.len() as u64;
        for (i, ty) in types.iter().enumerate() {
            let header = EHDR_BYTES + i * PHDR_BYTES;
            bytes[header..header + 4].copy_from_slice(&ty.to_le_bytes());
            bytes[header + 8..header + 16].copy_from_slice(&interp_offset.to_le_bytes());
            bytes[header + 32..header + 40].copy_from_slice(&11u64.to_le_bytes());
        }
        bytes.extend_from_slice(b"/lib/ld.so\0");
        bytes
    }

    #[test]
    fn linkage_without_interp_is_static() {
        // PT_LOAD, PT_DYNAMIC (static-pie has one), PT_NOTE.
        assert_eq!(linkage(&elf(&[1, 2, 4])), Ok(Linkage::Static));
    }

    #[test]
    fn linkage_with_interp_is_dynamic() {
        assert_eq!(
            linkage(&elf(&[6, PT_INTERP, 1])),
            Ok(Linkage::Dynamic {
                interpreter: "/lib/ld.so".to_owned()
            })
        );
    }

    #[test]
    fn linkage_of_a_script_is_not_elf() {
        assert_eq!(linkage(b"#!/bin/sh\n"), Err(ElfError::NotElf64));
    }

    #[test]
    fn linkage_of_truncated_headers_is_truncated() {
        let mut bytes = elf(&[1, PT_INTERP]);
        bytes.truncate(EHDR_BYTES + 10);

        assert_eq!(linkage(&bytes), Err(ElfError::Truncated));
    }

    #[test]
    fn linkage_of_this_test_binary_is_known() {
        let bytes = std::fs::read(std::env::current_exe().unwrap()).unwrap();

        assert!(linkage(&bytes).is_ok());
    }
}
