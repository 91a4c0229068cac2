//! A loopback registry for tests and `crib-bench pull`: Debian's `docker-registry`
//! (distribution 2.8) on a free 127.0.0.1 port with its storage in a temp dir, killed on
//! drop; images pushed into it from OCI layouts with `skopeo copy`. Built with the
//! `fixtures` feature only.

use std::fs;
use std::io;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long the registry gets to answer `/v2/` (a bound on waiting, not a measurement).
const READY_DEADLINE: Duration = Duration::from_secs(20);

const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

/// Why the registry tests cannot run here, if they cannot.
pub fn unavailable() -> Option<String> {
    if !rustix::process::geteuid().is_root() {
        return Some("not root".into());
    }
    if !Path::new(REGISTRY_BIN).exists() {
        return Some(format!(
            "{REGISTRY_BIN} is missing (apt-get install docker-registry; scripts/install-deps.sh)"
        ));
    }
    if Command::new("skopeo").arg("--version").output().is_err() {
        return Some("skopeo is missing (scripts/install-deps.sh)".into());
    }
    None
}

type Result<T> = std::result::Result<T, io::Error>;

fn fail(text: String) -> io::Error {
    io::Error::other(text)
}

/// The manifest format `skopeo copy` writes to the registry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// OCI image manifest (as the layout has it).
    Oci,
    /// Docker image manifest v2 schema 2.
    DockerV2S2,
}

/// A running registry.
pub struct Registry {
    child: Child,
    port: u16,
    storage: TempDir,
    log: PathBuf,
    password: bool,
}

/// A directory under the system's temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<TempDir> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("crib-registry-{}-{n}", std::process::id()));
        fs::create_dir_all(&path)?;
        Ok(TempDir(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A port nothing listens on (bound, then closed).
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// The user [`Registry::start_with_password`] accepts, and its password.
pub const USER: &str = "alice";
pub const PASSWORD: &str = "s3cret";
/// bcrypt of [`PASSWORD`] at cost 4 (the registry checks it on every request).
const PASSWORD_BCRYPT: &str = "$2b$04$IEHQhhJswbmZ2gfGYORKfO05zElD0R6gkQFWOi5./SaT2YNb4uQ3K";

impl Registry {
    /// Starts a registry and waits until `/v2/` answers.
    pub fn start() -> Result<Registry> {
        Registry::start_inner(false)
    }

    /// Starts a registry that wants HTTP basic auth as [`USER`] / [`PASSWORD`].
    pub fn start_with_password() -> Result<Registry> {
        Registry::start_inner(true)
    }

    fn start_inner(password: bool) -> Result<Registry> {
        let storage = TempDir::new()?;
        let port = free_port()?;
        let config = storage.path().join("config.yml");
        let data = storage.path().join("data");
        fs::create_dir_all(&data)?;
        fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
                 http:\n  addr: 127.0.0.1:{port}\n",
                data.display()
            ),
        )?;
        if password {
            let htpasswd = storage.path().join("htpasswd");
            fs::write(&htpasswd, format!("{USER}:{PASSWORD_BCRYPT}\n"))?;
            let mut text = fs::read_to_string(&config)?;
            text.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: crib-test\n    path: {}\n",
                htpasswd.display()
            ));
            fs::write(&config, text)?;
        }
        let log = storage.path().join("registry.log");
        let out = fs::File::create(&log)?;
        let child = Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .map_err(|e| fail(format!("cannot start {REGISTRY_BIN}: {e}")))?;
        let mut registry = Registry {
            child,
            port,
            storage,
            log,
            password,
        };
        registry.wait_ready()?;
        Ok(registry)
    }

    fn wait_ready(&mut self) -> Result<()> {
        let start = Instant::now();
        while start.elapsed() < READY_DEADLINE {
            if let Some(status) = self.child.try_wait()? {
                return Err(fail(format!(
                    "docker-registry exited ({status}): {}",
                    self.log_text()
                )));
            }
            if let Ok(status) = self.get_status("/v2/") {
                if status == 200 || status == 401 {
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(fail(format!(
            "docker-registry did not answer /v2/: {}",
            self.log_text()
        )))
    }

    /// The HTTP status of a GET of `path` (a bare HTTP/1.0 request).
    pub fn get_status(&self, path: &str) -> Result<u16> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head)?;
        let text = String::from_utf8_lossy(&head);
        text.get(9..12)
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| fail(format!("not an HTTP answer: {text:?}")))
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `127.0.0.1:PORT/NAME:TAG`.
    pub fn reference(&self, name_tag: &str) -> String {
        format!("{}/{name_tag}", self.host())
    }

    /// The registry's own log (access log included).
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// How many times a blob was fetched (`GET /v2/.../blobs/DIGEST` in the access log).
    pub fn blob_gets(&self, digest: &str) -> usize {
        let needle = format!("blobs/{digest} ");
        self.log_text()
            .lines()
            .filter(|l| l.contains("\"GET /v2/") && l.contains(&needle))
            .count()
    }

    /// The registry's file holding blob `digest`.
    pub fn blob_data(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        self.storage
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// Pushes the image tagged `tag` in the OCI layout `dir` as `name_tag`.
    pub fn push(&self, dir: &Path, tag: &str, name_tag: &str, format: Format) -> Result<()> {
        self.skopeo_copy(
            &format!("oci:{}:{tag}", dir.display()),
            name_tag,
            format,
            false,
        )
    }

    /// Pushes an image index in the OCI layout `dir`, tagged `tag`, with every image it
    /// lists; as a Docker manifest list of v2s2 manifests with [`Format::DockerV2S2`].
    pub fn push_index(&self, dir: &Path, tag: &str, name_tag: &str, format: Format) -> Result<()> {
        self.skopeo_copy(
            &format!("oci:{}:{tag}", dir.display()),
            name_tag,
            format,
            true,
        )
    }

    /// The manifest's `mediaType` the registry serves for `name_tag`, asking for any.
    pub fn manifest_media_type(&self, name_tag: &str) -> Result<String> {
        let output = Command::new("skopeo")
            .args([
                "--insecure-policy",
                "inspect",
                "--raw",
                "--tls-verify=false",
            ])
            .arg(format!("docker://{}", self.reference(name_tag)))
            .output()?;
        let text = String::from_utf8_lossy(&output.stdout);
        let value: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| fail(format!("skopeo inspect --raw: {e}: {text}")))?;
        Ok(value["mediaType"].as_str().unwrap_or_default().to_owned())
    }

    fn skopeo_copy(&self, source: &str, name_tag: &str, format: Format, all: bool) -> Result<()> {
        let mut skopeo = Command::new("skopeo");
        skopeo.args([
            "--insecure-policy",
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
        ]);
        if self.password {
            skopeo.args(["--dest-creds", &format!("{USER}:{PASSWORD}")]);
        }
        if format == Format::DockerV2S2 {
            skopeo.args(["--format", "v2s2"]);
        }
        if all {
            skopeo.arg("--all");
        }
        let dest = format!("docker://{}", self.reference(name_tag));
        let output = skopeo.arg(source).arg(&dest).output()?;
        if !output.status.success() {
            return Err(fail(format!(
                "skopeo copy {source} {dest} failed: {}",
                String::from_utf8_lossy(&output.stderr)
            )));
        }
        Ok(())
    }

    /// Puts `manifest` into the registry's storage as `name:tag`, bypassing the API's
    /// checks (as a registry with a bug or a hostile one would serve it). Returns its
    /// digest.
    pub fn plant_manifest(&self, name: &str, tag: &str, manifest: &[u8]) -> Result<String> {
        use sha2::Digest;
        let hex = format!("{:x}", sha2::Sha256::digest(manifest));
        let digest = format!("sha256:{hex}");
        let data = self.blob_data(&digest);
        fs::create_dir_all(data.parent().ok_or_else(|| fail("no parent".into()))?)?;
        fs::write(&data, manifest)?;
        let repo = self
            .storage
            .path()
            .join("data/docker/registry/v2/repositories")
            .join(name)
            .join("_manifests");
        let links = [
            repo.join("revisions/sha256").join(&hex).join("link"),
            repo.join("tags").join(tag).join("current/link"),
            repo.join("tags")
                .join(tag)
                .join("index/sha256")
                .join(&hex)
                .join("link"),
        ];
        for link in links {
            fs::create_dir_all(link.parent().ok_or_else(|| fail("no parent".into()))?)?;
            fs::write(&link, &digest)?;
        }
        Ok(digest)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
