//! The guest-physical memory layout crib gives every x86_64 guest.
//!
//! ```text
//! 0x0000_0500  boot GDT              0x0000_7000  zero page (boot_params)
//! 0x0000_0520  boot IDT (empty)      0x0000_9000  PML4, then PDPT and 4 PDs
//! 0x0000_8ff0  boot stack top        0x0002_0000  kernel command line
//! 0x0001_0000  setup_data chain (the RNG seed)
//! 0x0009_fc00  EBDA .. 1 MiB: reserved; ACPI tables live at 0x000e_0000
//! 0x0010_0000  high RAM: the kernel, then the initrd at the top of low RAM
//! 0xc000_0000  32-bit MMIO hole: PCI BARs (512 MiB), ECAM at 0xe000_0000 (1 MiB),
//!              IO-APIC at 0xfec0_0000, LAPIC at 0xfee0_0000
//! 0x1_0000_0000  RAM beyond 3 GiB continues here
//! above RAM      64-bit PCI BAR window, from a 1 GiB boundary to the end of the guest's
//!                physical address space (`memory_map::pci_mmio64_window`)
//! ```

use vm_memory::GuestAddress;

/// Where the boot GDT is written.
pub const BOOT_GDT_START: GuestAddress = GuestAddress(0x500);
/// Where the (empty) boot IDT is written.
pub const BOOT_IDT_START: GuestAddress = GuestAddress(0x520);
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// The Linux zero page (`struct boot_params`).
pub const ZERO_PAGE_START: GuestAddress = GuestAddress(0x7000);
/// Level-4 page table; the PDPT and the page directories follow it page by page.
pub const PML4_START: GuestAddress = GuestAddress(0x9000);
/// The `setup_data` chain the zero page points to (after the page tables, below the
/// command line): the RNG seed.
pub const SETUP_DATA_START: GuestAddress = GuestAddress(0x1_0000);
/// The kernel command line.
pub const CMDLINE_START: GuestAddress = GuestAddress(0x20000);
/// Linux's x86 `COMMAND_LINE_SIZE`, including the terminating NUL; used when the kernel
/// does not say (an ELF vmlinux has no setup header).
pub const CMDLINE_MAX_BYTES: usize = 2048;
/// Start of the Extended BIOS Data Area: low RAM ends here.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables (RSDP first, so a kernel scanning 0xe0000..0x100000 finds it too).
pub const ACPI_START: GuestAddress = GuestAddress(0xe0000);
/// End of the area reserved for ACPI tables (exclusive).
pub const ACPI_END: u64 = 0x10_0000;
/// First byte of RAM above 1 MiB; the bzImage protected-mode kernel is loaded here.
pub const HIGH_RAM_START: GuestAddress = GuestAddress(0x10_0000);
/// Start of the 32-bit MMIO hole below 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// The PCI MMIO window for BARs: the first half of the MMIO hole.
pub const PCI_MMIO_START: u64 = 0xc000_0000;
pub const PCI_MMIO_SIZE: u64 = 0x2000_0000;
/// ECAM (PCI Express memory-mapped configuration) of bus 0: 1 MiB.
pub const PCI_ECAM_START: u64 = 0xe000_0000;
pub const PCI_ECAM_SIZE: u64 = 0x10_0000;
/// First byte above 4 GiB, where RAM resumes.
pub const RAM_ABOVE_4G_START: u64 = 0x1_0000_0000;
/// The IO-APIC's MMIO base (KVM's in-kernel IO-APIC answers here).
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// The local APIC's MMIO base.
pub const APIC_START: u64 = 0xfee0_0000;
/// Size of a page.
pub const PAGE_SIZE: u64 = 0x1000;
