//! The boot GDT and the KVM segment descriptors that match it (64-bit long mode).

use kvm_bindings::kvm_segment;
use vm_memory::{Address, Bytes, GuestMemoryBackend};

use crate::layout::{BOOT_GDT_START, BOOT_IDT_START};

/// Selector of the 64-bit code segment.
pub const CODE_SELECTOR: u16 = 0x08;
/// Selector of the data segment.
pub const DATA_SELECTOR: u16 = 0x10;
/// Selector of the task-state segment.
pub const TSS_SELECTOR: u16 = 0x18;

/// Null, code (64-bit, execute/read), data (read/write), TSS (busy 64-bit), as the
/// Linux 64-bit boot protocol needs: `__BOOT_CS` and `__BOOT_DS` with base 0, limit 4 GiB.
pub const BOOT_GDT: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

/// Encode a GDT entry from its flags (access byte in bits 0..8, flags nibble in 12..16),
/// base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// Writes [`BOOT_GDT`] and an empty IDT (interrupts stay off until Linux sets its own).
pub fn write_gdt_and_idt<M: GuestMemoryBackend>(
    mem: &M,
) -> Result<(), vm_memory::GuestMemoryError> {
    for (i, entry) in BOOT_GDT.iter().enumerate() {
        mem.write_obj(*entry, BOOT_GDT_START.unchecked_add(i as u64 * 8))?;
    }
    mem.write_obj(0u64, BOOT_IDT_START)
}

fn entry_base(entry: u64) -> u64 {
    ((entry & 0xff00_0000_0000_0000) >> 32)
        | ((entry & 0x0000_00ff_0000_0000) >> 16)
        | ((entry & 0x0000_0000_ffff_0000) >> 16)
}

fn entry_limit(entry: u64) -> u32 {
    // The masks keep the value within 20 bits, so the narrowing cannot lose bits.
    (((entry & 0x000f_0000_0000_0000) >> 32) | (entry & 0x0000_0000_0000_ffff)) as u32
}

fn bit(entry: u64, n: u32) -> u8 {
    ((entry >> n) & 1) as u8
}

/// The KVM view of the GDT entry at `index`.
pub fn kvm_segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let granularity = bit(entry, 55);
    let limit = entry_limit(entry);
    kvm_segment {
        base: entry_base(entry),
        // With 4 KiB granularity the effective limit covers whole pages.
        limit: if granularity == 1 {
            (limit << 12) | 0xfff
        } else {
            limit
        },
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: bit(entry, 47),
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(entry, 54),
        s: bit(entry, 44),
        l: bit(entry, 53),
        g: granularity,
        avl: bit(entry, 52),
        padding: 0,
        unusable: u8::from(bit(entry, 47) == 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_segment_is_present_long_mode_ring0() {
        let seg = kvm_segment_from_gdt(BOOT_GDT[1], 1);
        assert_eq!(
            (
                seg.selector,
                seg.present,
                seg.l,
                seg.db,
                seg.dpl,
                seg.type_,
                seg.s
            ),
            (CODE_SELECTOR, 1, 1, 0, 0, 0xb, 1)
        );
        assert_eq!((seg.base, seg.limit, seg.g), (0, 0xffff_ffff, 1));
    }

    #[test]
    fn data_segment_is_writable_32bit_flat() {
        let seg = kvm_segment_from_gdt(BOOT_GDT[2], 2);
        assert_eq!(
            (seg.selector, seg.type_, seg.db, seg.l),
            (DATA_SELECTOR, 3, 1, 0)
        );
        assert_eq!(seg.limit, 0xffff_ffff);
    }

    #[test]
    fn gdt_is_written_at_0x500() {
        let mem =
            vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(vm_memory::GuestAddress(0), 0x1000)])
                .unwrap();
        write_gdt_and_idt(&mem).unwrap();
        let code: u64 = mem.read_obj(vm_memory::GuestAddress(0x508)).unwrap();
        assert_eq!(code, BOOT_GDT[1]);
    }

    #[test]
    fn null_entry_is_unusable() {
        assert_eq!(kvm_segment_from_gdt(BOOT_GDT[0], 0).unusable, 1);
    }

    #[test]
    fn gdt_entry_round_trips_base_and_limit() {
        let entry = gdt_entry(0x008b, 0x1234_5678, 0xabcde);
        let seg = kvm_segment_from_gdt(entry, 3);
        assert_eq!(
            (seg.base, seg.limit, seg.selector),
            (0x1234_5678, 0xabcde, TSS_SELECTOR)
        );
    }
}
