//! Builds crib's guest initramfs: a deterministic, uncompressed newc cpio
//! with cradle as /init, the kernel modules it loads, and optionally busybox.
//!
//! The VMM can reuse [`cpio::Archive`] to append a second archive (a pod
//! spec, say) in memory: the kernel unpacks concatenated archives in order.

pub mod busybox;
pub mod cpio;
pub mod elf;
pub mod image;
pub mod kernel;
pub mod modules;

pub use cpio::{Archive, CpioError};
pub use image::{write_image, ExtraFile, ImageError, ImageSpec, ImageSummary, DEFAULT_MODULES};
pub use kernel::{KernelDir, KernelDirError};
pub use modules::{ModuleClosure, ModulesDep, ModulesError};
