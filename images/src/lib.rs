//! crib's host image store (docs/IMAGES.md): import and verify OCI and Docker images,
//! convert their layers to read-only erofs images once per layer, and garbage-collect.
//! No KVM and no VM: everything here runs and is tested on any Linux host.

#[cfg(any(test, feature = "fixtures"))]
pub mod fixtures;

pub mod registry;
mod store_stub;
pub use registry::{ensure, EnsureOptions, PullError, PullOptions, PullPolicy};
pub use store_stub::{ImageRecord, LineProgress, Progress, ResolvedImage, Store, StoreError};
