//! `containerd-shim-crib-v2`'s library: what containerd hands the shim, read and checked
//! ([`spec`]: the bundle's OCI spec and exec specs; [`mount`]: rootfs mounts and
//! mountinfo), and, with the `service` feature (the default), the task service itself
//! and the clients it drives. `main.rs` is the binary.
//!
//! Without `service` the library builds without containerd-shim (ttrpc, protobuf and
//! their generated code), so the fuzz crate (fuzz/) can drive the real parsers at the
//! cost of a few small modules.

pub mod mount;
pub mod spec;

#[cfg(feature = "service")]
pub mod docker;
#[cfg(feature = "service")]
pub mod service;
#[cfg(feature = "service")]
pub mod stats;
#[cfg(feature = "service")]
pub mod stdio;
#[cfg(feature = "service")]
pub mod vm;
