//! The architectural state each vCPU starts in: 64-bit long mode for the boot vCPU
//! (Linux 64-bit boot protocol), CPUID with a per-vCPU topology, boot MSRs and the LAPIC's
//! LINT0/LINT1 wiring. Plain data; the VMM applies it with kvm-ioctls.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_sregs, CpuId,
};

use crate::gdt::{kvm_segment_from_gdt, BOOT_GDT};
use crate::layout::{BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, ZERO_PAGE_START};

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 0x1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
/// MTRRs enabled (bit 11) with write-back (6) as the default type: without it a guest
/// that honours MTRRs maps all RAM uncached and boots many times slower.
const MTRR_ENABLE_WRITE_BACK: u64 = (1 << 11) | 6;

const APIC_LVT0_OFFSET: usize = 0x350;
const APIC_LVT1_OFFSET: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

const CPUID_LEAF_FEATURES: u32 = 0x1;
const CPUID_LEAF_EXT_TOPOLOGY: u32 = 0xb;
const CPUID_LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;
const CPUID_LEAF_AMD_SIZE_IDS: u32 = 0x8000_0008;
const CPUID_LEAF_EXT_FEATURES: u32 = 0x8000_0001;
const CPUID_LEAF_SVM: u32 = 0x8000_000a;
const CPUID_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 ECX: Intel VT-x.
const CPUID_ECX_VMX: u32 = 1 << 5;
/// Leaf 0x8000_0001 ECX: AMD-V.
const CPUID_EXT_ECX_SVM: u32 = 1 << 2;
const CPUID_EDX_HTT: u32 = 1 << 28;

/// General-purpose registers at the 64-bit kernel entry point: `rip` at the entry,
/// `rsi` at the zero page, interrupts off.
pub fn boot_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START.0,
        ..Default::default()
    }
}

/// Special registers for long mode with paging on, CR3 at `pml4`, the boot GDT loaded.
/// `base` is the vCPU's current sregs (KVM fills fields such as the APIC base).
pub fn boot_sregs(mut sregs: kvm_sregs, pml4: u64) -> kvm_sregs {
    let code = kvm_segment_from_gdt(BOOT_GDT[1], 1);
    let data = kvm_segment_from_gdt(BOOT_GDT[2], 2);
    let tss = kvm_segment_from_gdt(BOOT_GDT[3], 3);
    sregs.gdt.base = BOOT_GDT_START.0;
    // Four 8-byte entries; the limit is the last valid byte.
    sregs.gdt.limit = (BOOT_GDT.len() * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT_START.0;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.cr3 = pml4;
    sregs.cr4 = X86_CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
    sregs
}

/// x87/SSE state Linux expects: default control word and MXCSR.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// MSRs every vCPU starts with.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WRITE_BACK),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

/// Wire LINT0 as ExtINT and LINT1 as NMI, as a PC's firmware leaves them.
pub fn set_lapic_lints(lapic: &mut kvm_lapic_state) {
    let patch = |lapic: &mut kvm_lapic_state, offset: usize, mode: u32| {
        let mut bytes = [0u8; 4];
        for (i, b) in bytes.iter_mut().enumerate() {
            // kvm_lapic_state.regs is c_char (i8 on x86): reinterpret the bits.
            *b = lapic.regs[offset + i] as u8;
        }
        let value = u32::from_le_bytes(bytes);
        // Delivery mode lives in bits 8..11.
        let value = (value & !0x700) | (mode << 8);
        for (i, b) in value.to_le_bytes().iter().enumerate() {
            lapic.regs[offset + i] = *b as _;
        }
    };
    patch(lapic, APIC_LVT0_OFFSET, APIC_MODE_EXTINT);
    patch(lapic, APIC_LVT1_OFFSET, APIC_MODE_NMI);
}

/// Number of bits that hold a CPU index in an APIC ID for `count` CPUs.
fn apic_id_bits(count: u8) -> u32 {
    match count {
        0 | 1 => 0,
        n => u32::from(n - 1).ilog2() + 1,
    }
}

/// Patch KVM's supported CPUID for vCPU `index` of `count`: APIC IDs, a flat topology of
/// `count` cores in one socket, and the hypervisor bit. VT-x and AMD-V are hidden: KVM
/// offers them when the host allows nested virtualization, but crib's guests (pods,
/// marketplace servers) are not hypervisors, and a guest that loads kvm on them only adds
/// a nested layer's attack surface and bugs (Debian's kernel loads kvm_amd by itself).
pub fn patch_cpuid(cpuid: &mut CpuId, index: u8, count: u8) {
    let core_bits = apic_id_bits(count);
    for entry in cpuid.as_mut_slice().iter_mut() {
        patch_cpuid_entry(entry, index, count, core_bits);
    }
}

fn patch_cpuid_entry(entry: &mut kvm_cpuid_entry2, index: u8, count: u8, core_bits: u32) {
    match entry.function {
        CPUID_LEAF_FEATURES => {
            entry.ebx =
                (entry.ebx & 0x0000_ffff) | (u32::from(index) << 24) | (u32::from(count) << 16);
            entry.ecx |= CPUID_ECX_HYPERVISOR;
            entry.ecx &= !CPUID_ECX_VMX;
            if count > 1 {
                entry.edx |= CPUID_EDX_HTT;
            }
        }
        CPUID_LEAF_EXT_TOPOLOGY | CPUID_LEAF_V2_EXT_TOPOLOGY => {
            entry.edx = u32::from(index);
            match entry.index {
                // SMT level: one thread per core.
                0 => {
                    entry.eax = 0;
                    entry.ebx = 1;
                    entry.ecx = (1 << 8) | entry.index;
                }
                // Core level: `count` cores.
                1 => {
                    entry.eax = core_bits;
                    entry.ebx = u32::from(count);
                    entry.ecx = (2 << 8) | entry.index;
                }
                _ => {
                    entry.eax = 0;
                    entry.ebx = 0;
                    entry.ecx = entry.index;
                }
            }
        }
        CPUID_LEAF_EXT_FEATURES => entry.ecx &= !CPUID_EXT_ECX_SVM,
        CPUID_LEAF_SVM => {
            entry.eax = 0;
            entry.ebx = 0;
            entry.ecx = 0;
            entry.edx = 0;
        }
        CPUID_LEAF_AMD_SIZE_IDS => {
            // ECX[15:12] APIC ID size, ECX[7:0] number of cores - 1.
            entry.ecx = (core_bits << 12) | u32::from(count.saturating_sub(1));
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpuid_with(entries: &[kvm_cpuid_entry2]) -> CpuId {
        CpuId::from_entries(entries).unwrap()
    }

    #[test]
    fn boot_regs_point_rsi_at_zero_page() {
        let regs = boot_regs(0x100_0000);
        assert_eq!((regs.rip, regs.rsi, regs.rflags), (0x100_0000, 0x7000, 2));
    }

    #[test]
    fn boot_sregs_enable_long_mode_paging() {
        let sregs = boot_sregs(kvm_sregs::default(), 0x9000);
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(
            sregs.cr0 & (X86_CR0_PE | X86_CR0_PG),
            X86_CR0_PE | X86_CR0_PG
        );
        assert_eq!((sregs.cr3, sregs.cr4 & X86_CR4_PAE), (0x9000, X86_CR4_PAE));
        assert_eq!((sregs.cs.selector, sregs.cs.l), (0x08, 1));
        assert_eq!((sregs.gdt.base, sregs.gdt.limit), (0x500, 31));
    }

    #[test]
    fn boot_msrs_enable_write_back_mtrr() {
        let msrs = boot_msrs();
        let mtrr = msrs.iter().find(|m| m.index == MSR_MTRR_DEF_TYPE).unwrap();
        assert_eq!(mtrr.data, 0x806);
    }

    #[test]
    fn lapic_lints_are_extint_and_nmi() {
        let mut lapic = kvm_lapic_state::default();
        set_lapic_lints(&mut lapic);
        assert_eq!(lapic.regs[APIC_LVT0_OFFSET + 1] as u8, 0x7);
        assert_eq!(lapic.regs[APIC_LVT1_OFFSET + 1] as u8, 0x4);
    }

    #[test]
    fn cpuid_hides_vmx_and_svm() {
        let mut cpuid = cpuid_with(&[
            kvm_cpuid_entry2 {
                function: CPUID_LEAF_FEATURES,
                ecx: CPUID_ECX_VMX | 1,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: CPUID_LEAF_EXT_FEATURES,
                ecx: CPUID_EXT_ECX_SVM | 1,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: CPUID_LEAF_SVM,
                eax: 1,
                ebx: 0x8000,
                edx: 0x1ff,
                ..Default::default()
            },
        ]);
        patch_cpuid(&mut cpuid, 0, 1);
        let [leaf1, ext, svm] = [0, 1, 2].map(|i| cpuid.as_slice()[i]);
        assert_eq!(leaf1.ecx & CPUID_ECX_VMX, 0);
        assert_eq!(leaf1.ecx & 1, 1, "other features stay");
        assert_eq!(ext.ecx, 1);
        assert_eq!((svm.eax, svm.ebx, svm.ecx, svm.edx), (0, 0, 0, 0));
    }

    #[test]
    fn cpuid_leaf1_carries_apic_id_and_hypervisor_bit() {
        let mut cpuid = cpuid_with(&[kvm_cpuid_entry2 {
            function: 1,
            ebx: 0xff00_0800,
            ..Default::default()
        }]);
        patch_cpuid(&mut cpuid, 3, 4);
        let e = cpuid.as_slice()[0];
        assert_eq!(e.ebx >> 24, 3);
        assert_eq!((e.ebx >> 16) & 0xff, 4);
        assert_eq!(e.ebx & 0xffff, 0x0800);
        assert_ne!(e.ecx & CPUID_ECX_HYPERVISOR, 0);
        assert_ne!(e.edx & CPUID_EDX_HTT, 0);
    }

    #[test]
    fn cpuid_topology_leaf_counts_cores() {
        let mut cpuid = cpuid_with(&[kvm_cpuid_entry2 {
            function: 0xb,
            index: 1,
            ..Default::default()
        }]);
        patch_cpuid(&mut cpuid, 2, 3);
        let e = cpuid.as_slice()[0];
        assert_eq!((e.eax, e.ebx, e.ecx, e.edx), (2, 3, 0x201, 2));
    }

    #[test]
    fn apic_id_bits_cover_count() {
        assert_eq!(
            (apic_id_bits(1), apic_id_bits(2), apic_id_bits(5)),
            (0, 1, 3)
        );
    }
}
