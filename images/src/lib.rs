//! crib's host image store (docs/IMAGES.md): import and verify OCI and Docker images,
//! convert their layers to read-only erofs images once per layer, and garbage-collect.
//! No KVM and no VM: everything here runs and is tested on any Linux host.

#[cfg(any(test, feature = "fixtures"))]
pub mod fixtures;

pub mod archive;
pub mod cli;
pub mod convert;
pub mod digest;
pub mod layout;
pub mod progress;
pub mod reference;
pub mod staging;
pub mod store;
pub mod unpack;

pub use digest::Digest;
pub use progress::Progress;
pub use staging::Staging;
pub use store::{ImageRecord, LayerRecord, ResolvedImage, ResolvedLayer, Store, StoreError};
