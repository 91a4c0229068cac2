//! Helpers shared by the fuzz targets: arbitrary JSON values biased towards crib's file
//! formats, and a driver-side split virtqueue in a small guest memory.

pub mod json;
pub mod ring;
