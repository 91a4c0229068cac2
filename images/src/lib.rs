//! crib image store
pub mod registry;
mod store_stub;
pub use registry::{ensure, EnsureOptions, PullError, PullOptions, PullPolicy};
pub use store_stub::{ImageRecord, LineProgress, Progress, ResolvedImage, Store, StoreError};
