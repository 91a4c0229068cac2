//! `docker cp`: `/containers/{id}/archive?path=P`.
//!
//! - `HEAD`: only the `X-Docker-Container-Path-Stat` header, base64 of
//!   `{"name","size","mode","mtime","linkTarget"}` (mode in Go's
//!   `os.FileMode` bits); 404 if P does not exist.
//! - `GET`: the same header and a tar stream of P (a directory recursively,
//!   entries named from P's base name; symlinks stored as links).
//! - `PUT`: extracts the tar in the body into the directory P. Entries must
//!   stay inside P: an absolute name or a `..` component is refused (400),
//!   and the tar crate refuses to write through a symlink that leads out.
//!
//! Paths are the container's: for an image container, the work runs on a
//! thread of its own that has entered the container's root (its own
//! filesystem attributes, `unshare(CLONE_FS)`, then `chroot` to
//! `/proc/PID/root`), so the image's symlinks resolve inside its root and
//! `..` cannot leave it, and the container's own mounts are what it sees. A
//! process without an image shares the guest's filesystem. A relative P is
//! taken from `/`, as Docker does. tar is connected to the HTTP body by a
//! small channel, so a 10 GB copy never sits in memory.

use std::fs::{self, Metadata};
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderName, HeaderValue};
use hyper::{Response, StatusCode};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};

use super::errors::VdockerError;
use super::server::{self, ResponseBody, BODY_CHANNEL_CHUNKS};
use super::time::rfc3339_nanos;

/// The stat header, `X-Docker-Container-Path-Stat` (HTTP names are
/// case-insensitive; hyper sends them lowercase).
const STAT_HEADER: HeaderName = HeaderName::from_static("x-docker-container-path-stat");
/// Bytes per chunk of a tar stream sent to the client.
const CHUNK_BYTES: usize = 64 * 1024;

// Go's os.FileMode type bits (io/fs).
const GO_MODE_DIR: u32 = 1 << 31;
const GO_MODE_SYMLINK: u32 = 1 << 27;
const GO_MODE_DEVICE: u32 = 1 << 26;
const GO_MODE_NAMED_PIPE: u32 = 1 << 25;
const GO_MODE_SOCKET: u32 = 1 << 24;
const GO_MODE_SETUID: u32 = 1 << 23;
const GO_MODE_SETGID: u32 = 1 << 22;
const GO_MODE_CHAR_DEVICE: u32 = 1 << 21;
const GO_MODE_STICKY: u32 = 1 << 20;

/// Errors of the archive endpoints.
#[derive(Debug, Error)]
pub enum ArchiveError {
    #[error("missing the path parameter; say which file or directory, like ?path=/data")]
    NoPath,
    #[error("Could not find the file {} in container {container}", path.display())]
    NotFound { container: String, path: PathBuf },
    #[error("cannot stat {}", path.display())]
    Stat {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("extraction point {} is not a directory; copy into an existing directory", path.display())]
    NotADirectory { path: PathBuf },
    #[error("archive entry {entry:?} would be written outside {}; entries must be relative paths without '..'", dir.display())]
    Escape { entry: String, dir: PathBuf },
    #[error("cannot extract the archive into {}", dir.display())]
    Extract {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot enter the root filesystem of container {container} (is it still running? docker cp needs a running container)")]
    Root {
        container: String,
        #[source]
        source: io::Error,
    },
    #[error("the archive task failed")]
    Task,
}

impl ArchiveError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::NoPath | Self::NotADirectory { .. } | Self::Escape { .. } => {
                StatusCode::BAD_REQUEST
            }
            Self::NotFound { .. } => StatusCode::NOT_FOUND,
            Self::Root { .. } => StatusCode::CONFLICT,
            Self::Extract { source, .. }
                if matches!(
                    source.kind(),
                    io::ErrorKind::InvalidData
                        | io::ErrorKind::InvalidInput
                        | io::ErrorKind::UnexpectedEof
                ) =>
            {
                StatusCode::BAD_REQUEST
            }
            Self::Stat { .. } | Self::Extract { .. } | Self::Task => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }
}

/// What Docker says about a path (`container.PathStat`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathStat {
    pub name: String,
    pub size: u64,
    pub mode: u32,
    pub mtime: String,
    pub link_target: String,
}

/// The query's path as a guest path: relative ones are from `/`.
pub fn resolve(query_path: Option<&str>) -> Result<PathBuf, ArchiveError> {
    match query_path {
        None | Some("") => Err(ArchiveError::NoPath),
        Some(path) if path.starts_with('/') => Ok(PathBuf::from(path)),
        Some(path) => Ok(Path::new("/").join(path)),
    }
}

/// The name P's tar entries start with: its base name, or `.` when P ends
/// in `/.` (copy a directory's contents).
pub fn archive_name(path: &Path) -> String {
    let text = path.as_os_str().to_string_lossy();
    if text.ends_with("/.") {
        return ".".to_owned();
    }
    path.file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| "/".to_owned())
}

/// Go's `os.FileMode` of a Unix `st_mode`.
pub fn go_file_mode(st_mode: u32) -> u32 {
    let mut mode = st_mode & 0o777;
    mode |= match st_mode & libc::S_IFMT {
        libc::S_IFDIR => GO_MODE_DIR,
        libc::S_IFLNK => GO_MODE_SYMLINK,
        libc::S_IFBLK => GO_MODE_DEVICE,
        libc::S_IFCHR => GO_MODE_DEVICE | GO_MODE_CHAR_DEVICE,
        libc::S_IFIFO => GO_MODE_NAMED_PIPE,
        libc::S_IFSOCK => GO_MODE_SOCKET,
        _ => 0,
    };
    if st_mode & libc::S_ISUID != 0 {
        mode |= GO_MODE_SETUID;
    }
    if st_mode & libc::S_ISGID != 0 {
        mode |= GO_MODE_SETGID;
    }
    if st_mode & libc::S_ISVTX != 0 {
        mode |= GO_MODE_STICKY;
    }
    mode
}

/// A failed stat of `path`: not found (404) or another error.
fn stat_error(container: &str, path: &Path, source: io::Error) -> ArchiveError {
    if source.kind() == io::ErrorKind::NotFound {
        ArchiveError::NotFound {
            container: container.to_owned(),
            path: path.to_path_buf(),
        }
    } else {
        ArchiveError::Stat {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Stats `path` without following a final symlink.
pub fn stat_path(container: &str, path: &Path) -> Result<(PathStat, Metadata), ArchiveError> {
    let metadata =
        fs::symlink_metadata(path).map_err(|source| stat_error(container, path, source))?;
    let link_target = if metadata.file_type().is_symlink() {
        fs::read_link(path)
            .map(|target| target.to_string_lossy().into_owned())
            .unwrap_or_default()
    } else {
        String::new()
    };
    let mtime = UNIX_EPOCH
        + Duration::new(
            u64::try_from(metadata.mtime()).unwrap_or(0),
            u32::try_from(metadata.mtime_nsec()).unwrap_or(0),
        );
    let stat = PathStat {
        name: path
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_else(|| "/".to_owned()),
        size: metadata.size(),
        mode: go_file_mode(metadata.mode()),
        mtime: rfc3339_nanos(mtime),
        link_target,
    };
    Ok((stat, metadata))
}

/// The header value: base64 of the stat's JSON.
pub fn stat_header(stat: &PathStat) -> String {
    let json = serde_json::json!({
        "name": stat.name,
        "size": stat.size,
        "mode": stat.mode,
        "mtime": stat.mtime,
        "linkTarget": stat.link_target,
    });
    base64(json.to_string().as_bytes())
}

/// Standard base64 with padding (RFC 4648, section 4), what Go's
/// `base64.StdEncoding` reads. Twenty lines instead of a dependency.
pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    // The mask keeps the index below 64.
    let symbol = |index: u32| {
        ALPHABET
            .get((index & 63) as usize)
            .map_or('=', |&b| char::from(b))
    };
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for group in bytes.chunks(3) {
        let [a, b, c] = [0, 1, 2].map(|i| group.get(i).copied().map_or(0, u32::from));
        let triple = (a << 16) | (b << 8) | c;
        out.push(symbol(triple >> 18));
        out.push(symbol(triple >> 12));
        out.push(if group.len() > 1 {
            symbol(triple >> 6)
        } else {
            '='
        });
        out.push(if group.len() > 2 { symbol(triple) } else { '=' });
    }
    out
}

/// Runs `work` on a thread of its own, inside the root filesystem `root` when one is
/// given (an image container's `/proc/PID/root`). A fresh thread rather than tokio's
/// blocking pool: the pool's threads are reused, and this one's root is changed for good.
fn spawn_in_root<F>(container: &str, root: Option<PathBuf>, work: F) -> Result<(), ArchiveError>
where
    F: FnOnce(Result<(), ArchiveError>) + Send + 'static,
{
    let name = container.to_owned();
    std::thread::Builder::new()
        .name("vdocker-cp".into())
        .spawn(move || {
            let entered = match root {
                Some(root) => enter_root(&root).map_err(|source| ArchiveError::Root {
                    container: name,
                    source,
                }),
                None => Ok(()),
            };
            work(entered)
        })
        .map(drop)
        .map_err(|_| ArchiveError::Task)
}

/// Gives this thread its own root: `root` (then `/` as its working directory). Only this
/// thread: `unshare(CLONE_FS)` separates its root and cwd from the other threads'.
fn enter_root(root: &Path) -> io::Result<()> {
    // SAFETY: FS (root, cwd, umask) only, not FILES: the fd table stays shared, so no
    // thread can hold a descriptor another one cannot use.
    unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::FS) }?;
    rustix::process::chroot(root)?;
    std::env::set_current_dir("/")
}

/// `HEAD` and `GET`. `root`: the container's root, if it has its own.
pub async fn get(
    container: &str,
    root: Option<PathBuf>,
    query_path: Option<&str>,
    head: bool,
) -> Result<Response<ResponseBody>, VdockerError> {
    let path = resolve(query_path)?;
    let (stat_tx, stat_rx) = oneshot::channel();
    let (tx, rx) = mpsc::channel(BODY_CHANNEL_CHUNKS);
    let name = container.to_owned();
    spawn_in_root(container, root, move |entered| {
        let stat = entered.and_then(|()| stat_path(&name, &path));
        match stat {
            Err(error) => {
                let _ = stat_tx.send(Err(error));
            }
            Ok((stat, metadata)) => {
                if stat_tx.send(Ok(stat)).is_ok() && !head {
                    write_tar(&path, &archive_name(&path), metadata.is_dir(), tx);
                }
            }
        }
    })?;
    let stat = stat_rx.await.map_err(|_| ArchiveError::Task)??;
    let header = HeaderValue::from_str(&stat_header(&stat)).ok();
    let mut response = if head {
        server::empty(StatusCode::OK)
    } else {
        server::streaming(StatusCode::OK, "application/x-tar", rx)
    };
    if let Some(header) = header {
        response.headers_mut().insert(STAT_HEADER, header);
    }
    Ok(response)
}

/// Writes the tar of `path` as `name` into `tx` (a blocking task). An error
/// midway can only end the stream early: the client's tar reader sees it.
fn write_tar(path: &Path, name: &str, is_dir: bool, tx: mpsc::Sender<Bytes>) {
    let mut builder = tar::Builder::new(ChannelWriter::new(tx));
    builder.follow_symlinks(false);
    let appended = if is_dir {
        builder.append_dir_all(name, path)
    } else {
        builder.append_path_with_name(path, name)
    };
    if appended.is_ok() {
        if let Ok(mut writer) = builder.into_inner() {
            let _ = writer.flush();
        }
    }
}

/// `PUT`: extracts the body's tar into the directory at the query's path. `root`: the
/// container's root, if it has its own.
pub async fn put(
    container: &str,
    root: Option<PathBuf>,
    query_path: Option<&str>,
    mut body: Incoming,
) -> Result<Response<ResponseBody>, VdockerError> {
    use http_body_util::BodyExt;

    let dir = resolve(query_path)?;
    let (tx, rx) = mpsc::channel::<Bytes>(BODY_CHANNEL_CHUNKS);
    let (done_tx, done_rx) = oneshot::channel();
    let name = container.to_owned();
    spawn_in_root(container, root, move |entered| {
        let result = entered
            .and_then(|()| extraction_dir(&name, &dir))
            .and_then(|()| extract(ChannelReader::new(rx), &dir));
        let _ = done_tx.send(result);
    })?;
    let mut body_error = None;
    let mut extracting = true;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Ok(data) = frame.into_data() {
                    // Once the extraction stopped (the tar's end marker, or a failure:
                    // its result says), the rest of the body (the docker CLI pads the
                    // stream) is read and dropped: answering before the client has sent
                    // it all would break its pipe.
                    if extracting && tx.send(data).await.is_err() {
                        extracting = false;
                    }
                }
            }
            Err(source) => {
                body_error = Some(source);
                break;
            }
        }
    }
    drop(tx);
    let extracted = done_rx.await.map_err(|_| ArchiveError::Task)?;
    if let Some(source) = body_error {
        return Err(VdockerError::ReadBody { source });
    }
    extracted?;
    Ok(server::empty(StatusCode::OK))
}

/// Checks that `dir` is an existing directory to extract into.
fn extraction_dir(container: &str, dir: &Path) -> Result<(), ArchiveError> {
    let metadata = fs::metadata(dir).map_err(|source| stat_error(container, dir, source))?;
    if !metadata.is_dir() {
        return Err(ArchiveError::NotADirectory {
            path: dir.to_path_buf(),
        });
    }
    Ok(())
}

/// Refuses an entry name that is absolute or has a `..` component.
pub fn check_entry_path(entry: &Path, dir: &Path) -> Result<(), ArchiveError> {
    let escapes = entry
        .components()
        .any(|part| !matches!(part, Component::Normal(_) | Component::CurDir));
    if escapes {
        return Err(ArchiveError::Escape {
            entry: entry.to_string_lossy().into_owned(),
            dir: dir.to_path_buf(),
        });
    }
    Ok(())
}

/// Extracts a tar from `reader` into the existing directory `dir`.
/// Directories are applied last, deepest first, so a read-only one does not
/// block what goes into it (as tar's own `unpack`).
pub fn extract(reader: impl Read, dir: &Path) -> Result<(), ArchiveError> {
    let extract_error = |source| ArchiveError::Extract {
        dir: dir.to_path_buf(),
        source,
    };
    let root = dir.canonicalize().map_err(extract_error)?;
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_preserve_mtime(true);
    archive.set_overwrite(true);
    let mut directories = Vec::new();
    for entry in archive.entries().map_err(extract_error)? {
        let mut entry = entry.map_err(extract_error)?;
        let path = entry.path().map_err(extract_error)?.into_owned();
        check_entry_path(&path, dir)?;
        if entry.header().entry_type().is_hard_link() {
            if let Some(target) = entry.link_name().map_err(extract_error)? {
                check_entry_path(&target, dir)?;
            }
        }
        if entry.header().entry_type().is_dir() {
            directories.push(entry);
            continue;
        }
        if !entry.unpack_in(&root).map_err(extract_error)? {
            return Err(ArchiveError::Escape {
                entry: path.to_string_lossy().into_owned(),
                dir: dir.to_path_buf(),
            });
        }
    }
    directories.sort_by(|a, b| b.path_bytes().cmp(&a.path_bytes()));
    for mut directory in directories {
        directory.unpack_in(&root).map_err(extract_error)?;
    }
    Ok(())
}

/// A `Write` that sends 64 KiB chunks down a channel (from a blocking task).
struct ChannelWriter {
    tx: mpsc::Sender<Bytes>,
    buffer: Vec<u8>,
}

impl ChannelWriter {
    fn new(tx: mpsc::Sender<Bytes>) -> Self {
        Self {
            tx,
            buffer: Vec::with_capacity(CHUNK_BYTES),
        }
    }

    fn send_buffer(&mut self) -> io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buffer, Vec::with_capacity(CHUNK_BYTES));
        self.tx
            .blocking_send(Bytes::from(chunk))
            .map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.buffer.extend_from_slice(bytes);
        if self.buffer.len() >= CHUNK_BYTES {
            self.send_buffer()?;
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send_buffer()
    }
}

/// A `Read` over chunks arriving on a channel (in a blocking task).
struct ChannelReader {
    rx: mpsc::Receiver<Bytes>,
    current: Bytes,
}

impl ChannelReader {
    fn new(rx: mpsc::Receiver<Bytes>) -> Self {
        Self {
            rx,
            current: Bytes::new(),
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(chunk) => self.current = chunk,
                None => return Ok(0),
            }
        }
        let count = buffer.len().min(self.current.len());
        let chunk = self.current.split_to(count);
        if let Some(target) = buffer.get_mut(..count) {
            target.copy_from_slice(&chunk);
        }
        Ok(count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TempDir;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn go_file_mode_of_a_directory_has_the_dir_bit() {
        assert_eq!(go_file_mode(libc::S_IFDIR | 0o755), GO_MODE_DIR | 0o755);
    }

    #[test]
    fn go_file_mode_of_a_regular_file_is_its_permissions() {
        assert_eq!(go_file_mode(libc::S_IFREG | 0o644), 0o644);
    }

    #[test]
    fn go_file_mode_of_a_symlink_has_the_symlink_bit() {
        assert_eq!(go_file_mode(libc::S_IFLNK | 0o777), GO_MODE_SYMLINK | 0o777);
    }

    #[test]
    fn resolve_relative_path_is_from_root() {
        assert_eq!(resolve(Some("tmp/x")).unwrap(), PathBuf::from("/tmp/x"));
        assert!(matches!(resolve(None), Err(ArchiveError::NoPath)));
    }

    #[test]
    fn archive_name_of_dot_suffix_is_dot() {
        assert_eq!(archive_name(Path::new("/data/dir/.")), ".");
        assert_eq!(archive_name(Path::new("/data/file")), "file");
    }

    #[test]
    fn stat_path_reports_name_size_and_link_target() {
        let dir = TempDir::new("vdocker-stat");
        let file = dir.path().join("f");
        fs::write(&file, b"12345").unwrap();
        let link = dir.path().join("l");
        std::os::unix::fs::symlink("f", &link).unwrap();

        let (file_stat, _) = stat_path("c", &file).unwrap();
        let (link_stat, _) = stat_path("c", &link).unwrap();

        assert_eq!((file_stat.name.as_str(), file_stat.size), ("f", 5));
        assert_eq!(link_stat.link_target, "f");
        assert_ne!(link_stat.mode & GO_MODE_SYMLINK, 0);
    }

    #[test]
    fn stat_path_missing_is_404() {
        let error = stat_path("c", Path::new("/nonexistent/cradle-test")).unwrap_err();

        assert_eq!(error.status(), StatusCode::NOT_FOUND);
    }

    #[test]
    fn stat_header_is_base64_json_with_docker_keys() {
        let stat = PathStat {
            name: "f".to_owned(),
            size: 1,
            mode: 0o644,
            mtime: "1970-01-01T00:00:00.000000000Z".to_owned(),
            link_target: String::new(),
        };

        let header = stat_header(&stat);

        assert_eq!(
            header,
            base64(br#"{"linkTarget":"","mode":420,"mtime":"1970-01-01T00:00:00.000000000Z","name":"f","size":1}"#)
        );
    }

    #[test]
    fn check_entry_path_refuses_parent_and_absolute() {
        let dir = Path::new("/d");

        assert!(check_entry_path(Path::new("a/../../etc/passwd"), dir).is_err());
        assert!(check_entry_path(Path::new("/etc/passwd"), dir).is_err());
        assert!(check_entry_path(Path::new("./a/b"), dir).is_ok());
    }

    /// A tar with one entry named `name` (raw, unchecked) holding `data`.
    fn tar_with(name: &[u8], data: &[u8]) -> Vec<u8> {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        header.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name);
        header.set_cksum();
        let mut builder = tar::Builder::new(Vec::new());
        builder.append(&header, data).unwrap();
        builder.into_inner().unwrap()
    }

    #[test]
    fn extract_writes_files_and_directories() {
        let dir = TempDir::new("vdocker-extract");
        let mut builder = tar::Builder::new(Vec::new());
        let source = TempDir::new("vdocker-extract-src");
        fs::create_dir(source.path().join("sub")).unwrap();
        fs::write(source.path().join("sub/file"), b"data").unwrap();
        builder.append_dir_all("top", source.path()).unwrap();
        let tar = builder.into_inner().unwrap();

        extract(tar.as_slice(), dir.path()).unwrap();

        assert_eq!(fs::read(dir.path().join("top/sub/file")).unwrap(), b"data");
    }

    #[test]
    fn extract_refuses_a_parent_dir_entry() {
        let dir = TempDir::new("vdocker-escape");
        let tar = tar_with(b"../escaped", b"x");

        let error = extract(tar.as_slice(), &dir.path().join(".")).unwrap_err();

        assert!(matches!(error, ArchiveError::Escape { .. }), "{error}");
        assert!(!dir.path().join("../escaped").exists());
    }

    #[test]
    fn extract_refuses_writing_through_a_symlink_out_of_the_dir() {
        let dir = TempDir::new("vdocker-symlink");
        let outside = TempDir::new("vdocker-symlink-out");
        std::os::unix::fs::symlink(outside.path(), dir.path().join("link")).unwrap();
        let tar = tar_with(b"link/file", b"x");

        let result = extract(tar.as_slice(), dir.path());

        assert!(result.is_err());
        assert!(!outside.path().join("file").exists());
    }
}
