//! The loopback registry (`images::registry::test_registry`) and a skip for tests that
//! need it.

pub use images::registry::test_registry::*;

/// Skips the calling test (prints why and returns) when the registry cannot run here.
#[macro_export]
macro_rules! require_registry {
    () => {
        if let Some(reason) = $crate::support::registry::unavailable() {
            eprintln!("skipped: {reason}");
            return;
        }
    };
}
