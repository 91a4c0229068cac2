//! The pod's layers: one read-only loop device per layer over its window of the layer
//! disk, each mounted as erofs at `/run/cradle/l/<index>` (short: overlayfs's lowerdir
//! option must fit in a page with up to 128 layers).

use std::fs::File;
use std::path::{Path, PathBuf};

use initramfs::containers::{LayerSpec, LAYER_DISK_SERIAL};

use super::{loopdev, ContainerError, RUN_DIR};
use crate::disks::{self, DiskScanner, Wanted};
use crate::volumes::{self, Layout};

/// The mounted layers, by diffID.
#[derive(Debug, Default)]
pub struct Layers {
    mounts: Vec<(String, PathBuf)>,
}

impl Layers {
    /// Finds the layer disk and mounts every layer of the table.
    pub fn mount_all(table: &[LayerSpec]) -> Result<Self, ContainerError> {
        let layout = Layout::guest();
        let mut scanner = DiskScanner::new(&layout.sys_block);
        let wanted = [Wanted::virtio(LAYER_DISK_SERIAL)];
        let found = disks::wait_for_disks(&mut scanner, &layout.dev, &wanted, layout.wait)
            .map_err(ContainerError::LayerDisk)?;
        let device = found
            .get(LAYER_DISK_SERIAL)
            .map(|d| layout.dev.join(d))
            .unwrap_or_default();
        let disk = File::open(&device).map_err(|source| ContainerError::OpenLayerDisk {
            path: device.clone(),
            source,
        })?;
        let mut layers = Layers::default();
        for (index, layer) in table.iter().enumerate() {
            let (loop_dev, _held) =
                loopdev::attach(&disk, layer.offset, layer.size).map_err(|source| {
                    ContainerError::Loop {
                        diff_id: layer.diff_id.clone(),
                        offset: layer.offset,
                        size: layer.size,
                        source,
                    }
                })?;
            let path = Path::new(RUN_DIR).join("l").join(index.to_string());
            std::fs::create_dir_all(&path).map_err(|source| ContainerError::Dir {
                path: path.clone(),
                source,
            })?;
            volumes::mount_raw(&loop_dev, &path, "erofs", libc::MS_RDONLY).map_err(|source| {
                ContainerError::MountLayer {
                    diff_id: layer.diff_id.clone(),
                    device: loop_dev.clone(),
                    path: path.clone(),
                    source,
                }
            })?;
            layers.mounts.push((layer.diff_id.clone(), path));
        }
        Ok(layers)
    }

    /// Where the layer `diff_id` is mounted.
    pub fn path(&self, diff_id: &str) -> Option<&Path> {
        self.mounts
            .iter()
            .find(|(id, _)| id == diff_id)
            .map(|(_, path)| path.as_path())
    }
}

#[cfg(test)]
impl Layers {
    /// Layers "mounted" at the given paths, for tests.
    pub fn fake(mounts: &[(&str, &str)]) -> Self {
        Self {
            mounts: mounts
                .iter()
                .map(|(id, path)| ((*id).to_owned(), PathBuf::from(path)))
                .collect(),
        }
    }
}
