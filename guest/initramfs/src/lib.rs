//! Builds crib's guest initramfs: a deterministic, uncompressed newc cpio
//! with cradle as /init, the kernel modules it loads, and optionally busybox.
//!
//! The pod spec ([`podspec`]) lives here too, shared with cradle, which
//! depends on this crate with `default-features = false` (no CLI). The VMM
//! appends [`pod_archive`]'s output to the initramfs in guest memory: the
//! kernel unpacks concatenated archives in order.

pub mod busybox;
pub mod containers;
pub mod cpio;
pub mod elf;
pub mod image;
pub mod kernel;
pub mod modules;
pub mod pod_archive;
pub mod podspec;
pub mod shared_libs;

pub use cpio::{Archive, CpioError};
pub use image::{write_image, ExtraFile, ImageError, ImageSpec, ImageSummary, DEFAULT_MODULES};
pub use kernel::{KernelDir, KernelDirError};
pub use modules::{ModuleClosure, ModulesDep, ModulesError};
pub use pod_archive::{pod_archive, PodArchiveError};
pub use podspec::{
    Filesystem, PodLifetime, PodSpec, PodSpecError, ProcessSpec, VolumeSpec, POD_SPEC_GUEST_PATH,
};
