//! A read-only disk assembled from several host files (crosvm's composite disk): a pod's
//! image layers, each an erofs image, reach the guest as one virtio-blk device, so any
//! number of layers costs one PCI slot and each layer file stays shared, read-only, by
//! every pod that uses it. The guest finds each part by its offset (the pod spec's layer
//! table) and reaches it through a loop device with an offset and size limit.
//!
//! Each part starts at an offset given by the caller, a multiple of
//! [`COMPOSITE_ALIGN`]; the bytes between parts and after the last one up to the disk's
//! end read as zeroes. [`CompositeDisk::map`] splits a request at part boundaries; it is
//! pure and tested without files.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::BlockError;

/// Parts start at multiples of this, and the disk's size is one.
pub const COMPOSITE_ALIGN: u64 = 4096;

/// One file of a composite disk, as the caller places it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompositePart {
    pub path: PathBuf,
    /// Byte offset on the disk, a multiple of [`COMPOSITE_ALIGN`], after the previous
    /// part's end.
    pub offset: u64,
    /// The file's expected size: a file of another size is refused (a truncated or
    /// replaced layer).
    pub size: u64,
}

/// Where a piece of a request comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Source {
    /// Part `index`, from byte `offset` of its file.
    Part { index: usize, offset: u64 },
    /// Between or after parts: zeroes.
    Zero,
}

/// A piece of a request: `len` bytes starting `skip` bytes into it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Piece {
    pub skip: u64,
    pub len: u64,
    pub source: Source,
}

/// An open composite disk.
#[derive(Debug)]
pub struct CompositeDisk {
    /// (offset, size) of each part, in disk order.
    extents: Vec<(u64, u64)>,
    files: Vec<Arc<File>>,
    size: u64,
}

impl CompositeDisk {
    /// Opens every part read-only and checks the layout; errors name the part's file and
    /// the fix.
    pub fn open(parts: &[CompositePart]) -> Result<Self, BlockError> {
        let mut extents = Vec::with_capacity(parts.len());
        let mut files = Vec::with_capacity(parts.len());
        let mut end = 0u64;
        for part in parts {
            if part.offset % COMPOSITE_ALIGN != 0 || part.offset < end {
                return Err(BlockError::CompositeLayout {
                    path: part.path.clone(),
                    offset: part.offset,
                });
            }
            let file = File::open(&part.path).map_err(|source| BlockError::Open {
                path: part.path.clone(),
                hint: "a part of a composite disk (an image layer) is missing or unreadable; re-import or re-pull the image",
                source,
            })?;
            let actual = file
                .metadata()
                .map_err(|source| BlockError::Size {
                    path: part.path.clone(),
                    source,
                })?
                .len();
            if actual != part.size {
                return Err(BlockError::CompositePartSize {
                    path: part.path.clone(),
                    actual,
                    expected: part.size,
                });
            }
            end =
                part.offset
                    .checked_add(part.size)
                    .ok_or_else(|| BlockError::CompositeLayout {
                        path: part.path.clone(),
                        offset: part.offset,
                    })?;
            extents.push((part.offset, part.size));
            files.push(Arc::new(file));
        }
        if files.is_empty() {
            return Err(BlockError::CompositeEmpty);
        }
        let size = end.div_ceil(COMPOSITE_ALIGN) * COMPOSITE_ALIGN;
        Ok(Self {
            extents,
            files,
            size,
        })
    }

    /// The disk's size in bytes, a multiple of [`COMPOSITE_ALIGN`].
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The first part's file (what the device keeps as "its" file).
    pub(crate) fn first_file(&self) -> Option<Arc<File>> {
        self.files.first().cloned()
    }

    pub(crate) fn file(&self, index: usize) -> Option<&File> {
        self.files.get(index).map(|f| &**f)
    }

    /// The pieces of `len` bytes at `offset`, in order; `None` if the range is not inside
    /// the disk.
    pub(crate) fn map(&self, offset: u64, len: u64) -> Option<Vec<Piece>> {
        map_extents(&self.extents, self.size, offset, len)
    }
}

/// [`CompositeDisk::map`] over `(offset, size)` extents sorted and disjoint, on a disk of
/// `size` bytes.
fn map_extents(extents: &[(u64, u64)], size: u64, offset: u64, len: u64) -> Option<Vec<Piece>> {
    let end = offset.checked_add(len)?;
    if end > size {
        return None;
    }
    let mut pieces = Vec::new();
    let mut at = offset;
    // The first extent that ends after `offset`.
    let first = extents.partition_point(|(start, n)| start + n <= offset);
    for (index, (start, n)) in extents.iter().enumerate().skip(first) {
        if at >= end || *start >= end {
            break;
        }
        if at < *start {
            pieces.push(Piece {
                skip: at - offset,
                len: start - at,
                source: Source::Zero,
            });
            at = *start;
        }
        let stop = end.min(start + n);
        pieces.push(Piece {
            skip: at - offset,
            len: stop - at,
            source: Source::Part {
                index,
                offset: at - start,
            },
        });
        at = stop;
    }
    if at < end {
        pieces.push(Piece {
            skip: at - offset,
            len: end - at,
            source: Source::Zero,
        });
    }
    Some(pieces)
}

/// For messages: the parts' paths.
pub fn describe(parts: &[CompositePart]) -> String {
    let paths: Vec<&Path> = parts.iter().map(|p| p.path.as_path()).collect();
    format!("{paths:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXTENTS: &[(u64, u64)] = &[(0, 5000), (8192, 4096), (12288, 100)];
    const SIZE: u64 = 16384;

    fn part(index: usize, offset: u64) -> Source {
        Source::Part { index, offset }
    }

    #[test]
    fn request_inside_one_part_is_one_piece() {
        let pieces = map_extents(EXTENTS, SIZE, 512, 1024).unwrap();
        assert_eq!(
            pieces,
            [Piece {
                skip: 0,
                len: 1024,
                source: part(0, 512)
            }]
        );
    }

    #[test]
    fn request_is_split_at_part_boundaries_and_gaps_read_zero() {
        let pieces = map_extents(EXTENTS, SIZE, 4096, 12288).unwrap();
        assert_eq!(
            pieces,
            [
                Piece {
                    skip: 0,
                    len: 904,
                    source: part(0, 4096)
                },
                Piece {
                    skip: 904,
                    len: 3192,
                    source: Source::Zero
                },
                Piece {
                    skip: 4096,
                    len: 4096,
                    source: part(1, 0)
                },
                Piece {
                    skip: 8192,
                    len: 100,
                    source: part(2, 0)
                },
                Piece {
                    skip: 8292,
                    len: 3996,
                    source: Source::Zero
                },
            ]
        );
    }

    #[test]
    fn adjacent_parts_split_exactly() {
        let pieces = map_extents(EXTENTS, SIZE, 8192 + 4000, 200).unwrap();
        assert_eq!(
            pieces,
            [
                Piece {
                    skip: 0,
                    len: 96,
                    source: part(1, 4000)
                },
                Piece {
                    skip: 96,
                    len: 100,
                    source: part(2, 0)
                },
                Piece {
                    skip: 196,
                    len: 4,
                    source: Source::Zero
                },
            ]
        );
    }

    #[test]
    fn out_of_range_requests_are_refused() {
        assert!(map_extents(EXTENTS, SIZE, SIZE - 512, 1024).is_none());
        assert!(map_extents(EXTENTS, SIZE, u64::MAX, 2).is_none());
        assert_eq!(map_extents(EXTENTS, SIZE, SIZE, 0), Some(vec![]));
    }

    fn temp_file(name: &str, len: u64) -> PathBuf {
        let path =
            std::env::temp_dir().join(format!("crib-composite-{}-{name}", std::process::id()));
        std::fs::write(&path, vec![7u8; usize::try_from(len).unwrap()]).unwrap();
        path
    }

    #[test]
    fn open_checks_sizes_alignment_and_presence() {
        let a = temp_file("a", 5000);
        let ok = CompositeDisk::open(&[CompositePart {
            path: a.clone(),
            offset: 0,
            size: 5000,
        }])
        .unwrap();
        assert_eq!(ok.size(), 8192);

        let truncated = CompositeDisk::open(&[CompositePart {
            path: a.clone(),
            offset: 0,
            size: 6000,
        }])
        .unwrap_err();
        assert!(matches!(
            truncated,
            BlockError::CompositePartSize { actual: 5000, .. }
        ));

        let misaligned = CompositeDisk::open(&[CompositePart {
            path: a.clone(),
            offset: 512,
            size: 5000,
        }])
        .unwrap_err();
        assert!(matches!(misaligned, BlockError::CompositeLayout { .. }));

        let missing = CompositeDisk::open(&[CompositePart {
            path: a.with_extension("gone"),
            offset: 0,
            size: 1,
        }])
        .unwrap_err();
        assert!(missing.to_string().contains("re-import"), "{missing}");
        assert!(matches!(
            CompositeDisk::open(&[]),
            Err(BlockError::CompositeEmpty)
        ));
        std::fs::remove_file(a).unwrap();
    }
}
