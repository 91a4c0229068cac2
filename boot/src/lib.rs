//! How an x86_64 Linux guest starts: kernel and initrd loading, the zero page and e820 map,
//! the kernel command line, the 64-bit entry state (GDT, identity page tables, registers),
//! CPUID/MSR/LAPIC set-up and the ACPI tables (RSDP, XSDT, FADT, MADT, DSDT).
//!
//! Everything here is a pure function over guest memory or plain data: no threads, no
//! devices, no KVM ioctls. The VMM applies the results to its vCPUs.

pub mod acpi;
pub mod cmdline;
pub mod cpu;
pub mod gdt;
pub mod kernel;
pub mod layout;
pub mod memory_map;
pub mod paging;
pub mod zero_page;

/// Guest memory as the boot code sees it: any vm-memory backend that exposes its regions.
pub use vm_memory::GuestMemoryBackend as BootMemory;
