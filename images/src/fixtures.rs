//! Test fixtures: writes an OCI image layout (image-spec `image-layout.md`: `oci-layout`,
//! `index.json`, `blobs/sha256/<hex>`) from layers described entry by entry.
//!
//! Entries are written verbatim: a path or link target may hold `..`, start with `/` or be
//! any bytes, so the same builder makes well-formed layers and hostile ones. Built only
//! for tests (`cfg(test)` or the `fixtures` feature, which other crates' tests enable).

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use flate2::write::GzEncoder;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tar::{EntryType, Header};

/// How a layer blob is compressed (and so its media type).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// `application/vnd.oci.image.layer.v1.tar`
    None,
    /// `application/vnd.oci.image.layer.v1.tar+gzip`
    Gzip,
    /// `application/vnd.oci.image.layer.v1.tar+zstd`
    Zstd,
}

impl Compression {
    /// The OCI media type of a layer compressed this way.
    pub fn media_type(self) -> &'static str {
        match self {
            Compression::None => "application/vnd.oci.image.layer.v1.tar",
            Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }
}

/// What a tar entry is.
#[derive(Clone, Debug)]
pub enum Kind {
    /// A regular file with this content.
    File(Vec<u8>),
    Dir,
    /// A symlink with this target (verbatim bytes).
    Symlink(Vec<u8>),
    /// A hard link to this path (verbatim bytes).
    Hardlink(Vec<u8>),
    /// A character device (major, minor).
    CharDev(u32, u32),
    /// A block device (major, minor).
    BlockDev(u32, u32),
    Fifo,
}

/// One tar entry. Build with [`Entry::file`] etc. and the chained setters.
#[derive(Clone, Debug)]
pub struct Entry {
    /// The entry's name in the tar, verbatim (no normalisation at all).
    pub path: Vec<u8>,
    pub kind: Kind,
    /// Permission bits incl. setuid/setgid/sticky.
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: u64,
    /// Extended attributes, written as PAX `SCHILY.xattr.<name>` records.
    pub xattrs: Vec<(String, Vec<u8>)>,
    /// Overrides the header's size field (a lie: the data written is the file content).
    pub size_override: Option<u64>,
}

/// A fixed mtime for fixture entries (2023-11-14T22:13:20Z) so layers are reproducible.
pub const FIXTURE_MTIME: u64 = 1_700_000_000;

impl Entry {
    fn new(path: impl AsRef<[u8]>, kind: Kind, mode: u32) -> Entry {
        Entry {
            path: path.as_ref().to_vec(),
            kind,
            mode,
            uid: 0,
            gid: 0,
            mtime: FIXTURE_MTIME,
            xattrs: Vec::new(),
            size_override: None,
        }
    }

    /// A regular file, mode 0644, owned by 0:0.
    pub fn file(path: impl AsRef<[u8]>, content: impl AsRef<[u8]>) -> Entry {
        Entry::new(path, Kind::File(content.as_ref().to_vec()), 0o644)
    }

    /// A directory, mode 0755.
    pub fn dir(path: impl AsRef<[u8]>) -> Entry {
        Entry::new(path, Kind::Dir, 0o755)
    }

    /// A symlink `path -> target`.
    pub fn symlink(path: impl AsRef<[u8]>, target: impl AsRef<[u8]>) -> Entry {
        Entry::new(path, Kind::Symlink(target.as_ref().to_vec()), 0o777)
    }

    /// A hard link `path` to the earlier entry `target`.
    pub fn hardlink(path: impl AsRef<[u8]>, target: impl AsRef<[u8]>) -> Entry {
        Entry::new(path, Kind::Hardlink(target.as_ref().to_vec()), 0o644)
    }

    /// An OCI whiteout deleting `path` of a lower layer: the empty file `dir/.wh.name`.
    pub fn whiteout(path: &str) -> Entry {
        let (dir, name) = match path.trim_end_matches('/').rsplit_once('/') {
            Some((dir, name)) => (format!("{dir}/"), name),
            None => (String::new(), path),
        };
        Entry::file(format!("{dir}.wh.{name}"), b"")
    }

    /// An OCI opaque whiteout: `dir/.wh..wh..opq` hides everything lower layers have in `dir`.
    pub fn opaque(dir: &str) -> Entry {
        Entry::file(format!("{}/.wh..wh..opq", dir.trim_end_matches('/')), b"")
    }

    /// A character device node.
    pub fn char_dev(path: impl AsRef<[u8]>, major: u32, minor: u32) -> Entry {
        Entry::new(path, Kind::CharDev(major, minor), 0o666)
    }

    /// A block device node.
    pub fn block_dev(path: impl AsRef<[u8]>, major: u32, minor: u32) -> Entry {
        Entry::new(path, Kind::BlockDev(major, minor), 0o660)
    }

    /// A FIFO.
    pub fn fifo(path: impl AsRef<[u8]>) -> Entry {
        Entry::new(path, Kind::Fifo, 0o644)
    }

    /// Sets the permission bits.
    pub fn mode(mut self, mode: u32) -> Entry {
        self.mode = mode;
        self
    }

    /// Sets the owner.
    pub fn owner(mut self, uid: u64, gid: u64) -> Entry {
        self.uid = uid;
        self.gid = gid;
        self
    }

    /// Sets the modification time (seconds since the epoch).
    pub fn mtime(mut self, mtime: u64) -> Entry {
        self.mtime = mtime;
        self
    }

    /// Adds an extended attribute (PAX `SCHILY.xattr.<name>`).
    pub fn xattr(mut self, name: &str, value: impl AsRef<[u8]>) -> Entry {
        self.xattrs
            .push((name.to_string(), value.as_ref().to_vec()));
        self
    }

    /// Makes the header claim `size` bytes of data (for truncated/enormous entries).
    pub fn claim_size(mut self, size: u64) -> Entry {
        self.size_override = Some(size);
        self
    }
}

/// A layer: its entries in tar order, and how the blob is compressed.
#[derive(Clone, Debug)]
pub struct Layer {
    pub entries: Vec<Entry>,
    pub compression: Compression,
}

impl Layer {
    /// A layer of these entries, gzip-compressed (the common case).
    pub fn new(entries: Vec<Entry>) -> Layer {
        Layer {
            entries,
            compression: Compression::Gzip,
        }
    }

    /// The same layer with another compression.
    pub fn compressed(mut self, compression: Compression) -> Layer {
        self.compression = compression;
        self
    }
}

/// The parts of the image config (`config` object of image-spec `config.md`) tests set.
#[derive(Clone, Debug, Default)]
pub struct Config {
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
}

/// An image to write: layers lowest first, a config, an optional tag.
#[derive(Clone, Debug, Default)]
pub struct Image {
    pub layers: Vec<Layer>,
    pub config: Config,
    /// `org.opencontainers.image.ref.name` annotation of the index entry.
    pub tag: Option<String>,
    /// Writes these `rootfs.diff_ids` instead of the true ones (to test verification).
    pub diff_ids_override: Option<Vec<String>>,
    /// Lists a linux/arm64 manifest (a missing blob) before the linux/amd64 one in
    /// `index.json`, as a multi-platform image does.
    pub multi_platform: bool,
}

/// What [`write_oci_layout`] wrote.
#[derive(Clone, Debug)]
pub struct Written {
    /// `sha256:<hex>` of the manifest.
    pub manifest_digest: String,
    pub config_digest: String,
    /// `sha256:<hex>` of each layer blob (compressed), lowest first.
    pub layer_digests: Vec<String>,
    /// `sha256:<hex>` of each layer's uncompressed tar, lowest first.
    pub diff_ids: Vec<String>,
}

impl Written {
    /// The path of a blob in the layout at `dir`.
    pub fn blob_path(dir: &Path, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        dir.join("blobs/sha256").join(hex)
    }
}

/// `sha256:<hex>` of some bytes.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

/// Writes a PAX record for a value too long for the ustar field, or the field itself.
fn put_name(
    field: &mut [u8],
    value: &[u8],
    pax_key: &'static str,
    pax: &mut Vec<(String, Vec<u8>)>,
) {
    if value.len() <= field.len() {
        field[..value.len()].copy_from_slice(value);
    } else {
        pax.push((pax_key.to_string(), value.to_vec()));
        let short = &value[..field.len().min(value.len())];
        field[..short.len()].copy_from_slice(short);
    }
}

/// The uncompressed tar of a layer's entries.
pub fn layer_tar(entries: &[Entry]) -> io::Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    for entry in entries {
        let mut header = Header::new_gnu();
        let (entry_type, data): (EntryType, &[u8]) = match &entry.kind {
            Kind::File(content) => (EntryType::Regular, content),
            Kind::Dir => (EntryType::Directory, b""),
            Kind::Symlink(_) => (EntryType::Symlink, b""),
            Kind::Hardlink(_) => (EntryType::Link, b""),
            Kind::CharDev(..) => (EntryType::Char, b""),
            Kind::BlockDev(..) => (EntryType::Block, b""),
            Kind::Fifo => (EntryType::Fifo, b""),
        };
        header.set_entry_type(entry_type);
        header.set_mode(entry.mode);
        header.set_uid(entry.uid);
        header.set_gid(entry.gid);
        header.set_mtime(entry.mtime);
        header.set_size(entry.size_override.unwrap_or(data.len() as u64));
        if let Kind::CharDev(major, minor) | Kind::BlockDev(major, minor) = entry.kind {
            header.set_device_major(major)?;
            header.set_device_minor(minor)?;
        }
        let mut pax: Vec<(String, Vec<u8>)> = Vec::new();
        // Verbatim names: tar's set_path refuses `..` and absolute paths, which hostile
        // fixtures need.
        put_name(&mut header.as_old_mut().name, &entry.path, "path", &mut pax);
        if let Kind::Symlink(target) | Kind::Hardlink(target) = &entry.kind {
            put_name(
                &mut header.as_old_mut().linkname,
                target,
                "linkpath",
                &mut pax,
            );
        }
        for (name, value) in &entry.xattrs {
            pax.push((format!("SCHILY.xattr.{name}"), value.clone()));
        }
        if !pax.is_empty() {
            builder.append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))?;
        }
        header.set_cksum();
        builder.append(&header, data)?;
    }
    builder.into_inner()
}

/// Compresses an uncompressed layer tar.
pub fn compress(tar: &[u8], compression: Compression) -> io::Result<Vec<u8>> {
    match compression {
        Compression::None => Ok(tar.to_vec()),
        Compression::Gzip => {
            let mut encoder = GzEncoder::new(Vec::new(), flate2::Compression::fast());
            encoder.write_all(tar)?;
            encoder.finish()
        }
        Compression::Zstd => zstd::encode_all(tar, 3),
    }
}

fn write_blob(dir: &Path, bytes: &[u8]) -> io::Result<String> {
    let digest = sha256_digest(bytes);
    fs::write(Written::blob_path(dir, &digest), bytes)?;
    Ok(digest)
}

/// The image config JSON (image-spec `config.md`) for these diff IDs.
pub fn config_json(config: &Config, diff_ids: &[String]) -> Value {
    let mut inner = serde_json::Map::new();
    if let Some(entrypoint) = &config.entrypoint {
        inner.insert("Entrypoint".into(), json!(entrypoint));
    }
    if let Some(cmd) = &config.cmd {
        inner.insert("Cmd".into(), json!(cmd));
    }
    if !config.env.is_empty() {
        inner.insert("Env".into(), json!(config.env));
    }
    if let Some(dir) = &config.working_dir {
        inner.insert("WorkingDir".into(), json!(dir));
    }
    if let Some(user) = &config.user {
        inner.insert("User".into(), json!(user));
    }
    json!({
        "created": "2023-11-14T22:13:20Z",
        "architecture": "amd64",
        "os": "linux",
        "config": inner,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [],
    })
}

/// Writes `image` as an OCI image layout into `dir` (created if missing).
pub fn write_oci_layout(dir: &Path, image: &Image) -> io::Result<Written> {
    fs::create_dir_all(dir.join("blobs/sha256"))?;
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    let mut layer_digests = Vec::new();
    let mut diff_ids = Vec::new();
    let mut layer_descriptors = Vec::new();
    for layer in &image.layers {
        let tar = layer_tar(&layer.entries)?;
        diff_ids.push(sha256_digest(&tar));
        let blob = compress(&tar, layer.compression)?;
        let digest = write_blob(dir, &blob)?;
        layer_descriptors.push(json!({
            "mediaType": layer.compression.media_type(),
            "digest": digest,
            "size": blob.len(),
        }));
        layer_digests.push(digest);
    }
    let config_diff_ids = image.diff_ids_override.as_ref().unwrap_or(&diff_ids);
    let config = serde_json::to_vec(&config_json(&image.config, config_diff_ids))?;
    let config_digest = write_blob(dir, &config)?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": layer_descriptors,
    }))?;
    let manifest_digest = write_blob(dir, &manifest)?;
    let mut manifests = Vec::new();
    if image.multi_platform {
        manifests.push(json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": sha256_digest(b"an arm64 manifest this layout does not hold"),
            "size": 1234,
            "platform": {"architecture": "arm64", "os": "linux"},
        }));
    }
    let mut descriptor = json!({
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": manifest_digest,
        "size": manifest.len(),
        "platform": {"architecture": "amd64", "os": "linux"},
    });
    if let Some(tag) = &image.tag {
        descriptor["annotations"] = json!({"org.opencontainers.image.ref.name": tag});
    }
    manifests.push(descriptor);
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": manifests,
    });
    fs::write(dir.join("index.json"), serde_json::to_vec_pretty(&index)?)?;
    Ok(Written {
        manifest_digest,
        config_digest,
        layer_digests,
        diff_ids,
    })
}

/// Writes the OCI layout `dir` as an uncompressed tar at `out` (an "OCI archive").
pub fn tar_directory(dir: &Path, out: &Path) -> io::Result<()> {
    let mut builder = tar::Builder::new(fs::File::create(out)?);
    builder.append_dir_all(".", dir)?;
    builder.into_inner()?.sync_all()
}

/// Where Debian's busybox-static installs the binary.
pub const BUSYBOX_PATH: &str = "/bin/busybox";

/// A runnable base layer: Debian's static `/bin/busybox`, a symlink per applet
/// (`bin/sh -> busybox`, ...), a minimal `/etc/passwd` and `/etc/group`, `/tmp` (1777).
/// Fails if busybox-static is not installed (`scripts/install-deps.sh`).
pub fn busybox_layer() -> io::Result<Layer> {
    let binary = fs::read(BUSYBOX_PATH).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "reading {BUSYBOX_PATH}: {e} (install busybox-static: scripts/install-deps.sh)"
            ),
        )
    })?;
    let list = std::process::Command::new(BUSYBOX_PATH)
        .arg("--list")
        .output()?;
    let mut entries = vec![
        Entry::dir("bin"),
        Entry::file("bin/busybox", binary).mode(0o755),
        Entry::dir("etc"),
        Entry::file(
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        ),
        Entry::file("etc/group", "root:x:0:\nnogroup:x:65534:\n"),
        Entry::dir("root").mode(0o700),
        Entry::dir("tmp").mode(0o1777),
    ];
    for applet in String::from_utf8_lossy(&list.stdout).split_whitespace() {
        if applet != "busybox" && !applet.contains('/') {
            entries.push(Entry::symlink(format!("bin/{applet}"), "busybox"));
        }
    }
    Ok(Layer::new(entries))
}

/// A busybox image: [`busybox_layer`] with `Cmd ["/bin/sh"]` and a PATH.
pub fn busybox_image(tag: &str) -> io::Result<Image> {
    Ok(Image {
        layers: vec![busybox_layer()?],
        config: Config {
            cmd: Some(vec!["/bin/sh".into()]),
            env: vec!["PATH=/usr/sbin:/usr/bin:/sbin:/bin".into()],
            ..Config::default()
        },
        tag: Some(tag.into()),
        ..Image::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_tar_hostile_path_is_kept_verbatim() {
        let tar = layer_tar(&[
            Entry::file("../../escape", b"x"),
            Entry::symlink("/abs", "/etc"),
        ])
        .unwrap();

        let mut archive = tar::Archive::new(tar.as_slice());
        let names: Vec<Vec<u8>> = archive
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path_bytes().into_owned())
            .collect();
        assert_eq!(names, vec![b"../../escape".to_vec(), b"/abs".to_vec()]);
    }

    #[test]
    fn layer_tar_long_name_uses_pax() {
        let long = "d/".repeat(80) + "file";

        let tar = layer_tar(&[Entry::file(&long, b"x")]).unwrap();

        let mut archive = tar::Archive::new(tar.as_slice());
        let entry = archive.entries().unwrap().next().unwrap().unwrap();
        assert_eq!(entry.path_bytes().as_ref(), long.as_bytes());
    }

    #[test]
    fn write_oci_layout_writes_index_and_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let image = Image {
            layers: vec![Layer::new(vec![Entry::file("a", b"1")]).compressed(Compression::Zstd)],
            tag: Some("t".into()),
            ..Image::default()
        };

        let written = write_oci_layout(dir.path(), &image).unwrap();

        let manifest = fs::read(Written::blob_path(dir.path(), &written.manifest_digest)).unwrap();
        assert_eq!(sha256_digest(&manifest), written.manifest_digest);
        assert!(dir.path().join("index.json").exists());
    }
}
