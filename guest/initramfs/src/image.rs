//! The layout of crib's guest initramfs and the function that writes it.
//!
//! ```text
//! /init                          cradle (static)
//! /dev/console                   c 5 1, so the kernel can open init's stdio
//! /proc /sys /dev /run /tmp /root  empty mount points
//! /bin/busybox, /bin/<applet>    optional, applets are symlinks to busybox
//! /sbin/mkfs.<fs>                optional (--mkfs), for cradle to format volumes
//! /lib*/..., /usr/lib*/...       the mkfs tools' shared libraries and ELF
//!                                interpreter, at their host paths
//! /lib/modules/<ver>/...         the module closure
//! /lib/modules/<ver>/modules.dep exactly the shipped modules, load order
//! <--add files>
//! ```

use std::fmt;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use thiserror::Error;

use crate::busybox::{self, BusyboxError};
use crate::cpio::{Archive, CpioError, TRAILER_BYTES};
use crate::elf::{self, ElfError, Linkage};
use crate::kernel::KernelDir;
use crate::modules::{ModuleClosure, ModulesDep, ModulesError, MODULES_DEP};
use crate::shared_libs::{self, SharedLibsError};

/// Modules shipped when none are named: the virtio-pci transport and the
/// drivers crib's devices need, overlayfs for image layers, and pvpanic-mmio
/// (the ACPI pvpanic device crib uses to report guest panics).
pub const DEFAULT_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "vmw_vsock_virtio_transport",
    "virtiofs",
    "overlay",
    "pvpanic_mmio",
    "virtio_rng",
];

/// `/dev/console`: character device 5:1.
const CONSOLE_MAJOR: u32 = 5;
const CONSOLE_MINOR: u32 = 1;

/// Empty directories every image has, with their modes.
const BASE_DIRS: &[(&str, u32)] = &[
    ("dev", 0o755),
    ("proc", 0o555),
    ("sys", 0o555),
    ("run", 0o755),
    ("tmp", 0o1777),
    ("root", 0o700),
];

const EXECUTABLE_MODE: u32 = 0o755;
const DATA_MODE: u32 = 0o644;

/// How to get a static cradle.
const CRADLE_HINT: &str = "build it with guest/build-initramfs.sh \
     (RUSTFLAGS=\"-C target-feature=+crt-static\" cargo build -p cradle --release \
     --target x86_64-unknown-linux-gnu)";
/// How to get a static busybox.
const BUSYBOX_HINT: &str = "apt-get install busybox-static and pass /bin/busybox";
/// How to get mkfs.ext4.
const MKFS_HINT: &str = "apt-get install e2fsprogs and pass /usr/sbin/mkfs.ext4";
/// cradle runs `/sbin/mkfs.<fs>` to format a blank volume.
const MKFS_PREFIX: &str = "mkfs.";

/// Errors of building the image.
#[derive(Debug, Error)]
pub enum ImageError {
    #[error("cannot read {what} {}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{what} {} is not an executable for this guest; {hint}", path.display())]
    NotElf {
        what: &'static str,
        path: PathBuf,
        hint: &'static str,
        #[source]
        source: ElfError,
    },
    #[error(
        "{what} {} is dynamically linked (needs {interpreter}) but the initramfs has no libc; {hint}",
        path.display()
    )]
    NotStatic {
        what: &'static str,
        path: PathBuf,
        interpreter: String,
        hint: &'static str,
    },
    #[error("--add {}: only regular files can be added", path.display())]
    NotAFile { path: PathBuf },
    #[error("--mkfs {}: the file must be named mkfs.<fs> (like /usr/sbin/mkfs.ext4): cradle runs /sbin/mkfs.<fs>", path.display())]
    MkfsName { path: PathBuf },
    #[error("--mkfs {}: cannot find its shared libraries", path.display())]
    SharedLibs {
        path: PathBuf,
        #[source]
        source: SharedLibsError,
    },
    #[error("modules were asked for but no kernel directory was given; pass --kernel DIR, or no --modules for a kernel with everything built in")]
    ModulesWithoutKernel,
    #[error("cannot resolve kernel modules")]
    Modules(#[from] ModulesError),
    #[error("cannot use busybox")]
    Busybox(#[from] BusyboxError),
    #[error("cannot write the archive")]
    Archive(#[from] CpioError),
}

/// Errors of parsing `--add SRC:DST`.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ExtraFileError {
    #[error("{value:?} is not SRC:DST (a host file, then its absolute path in the guest)")]
    Syntax { value: String },
}

/// A host file to copy into the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtraFile {
    pub source: PathBuf,
    /// Absolute path in the guest.
    pub dest: String,
}

impl FromStr for ExtraFile {
    type Err = ExtraFileError;

    /// Parses `SRC:DST`; DST is after the last `:` and must be absolute, so
    /// SRC may contain colons.
    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value.rsplit_once(':') {
            Some((source, dest))
                if !source.is_empty() && dest.starts_with('/') && dest.len() > 1 =>
            {
                Ok(Self {
                    source: PathBuf::from(source),
                    dest: dest.to_owned(),
                })
            }
            _ => Err(ExtraFileError::Syntax {
                value: value.to_owned(),
            }),
        }
    }
}

/// What goes into the image.
#[derive(Debug, Clone)]
pub struct ImageSpec {
    /// cradle, installed as /init.
    pub init: PathBuf,
    /// Where the modules come from; `None` for a kernel with everything built in
    /// (then `modules` must be empty and the image has no /lib/modules).
    pub kernel: Option<KernelDir>,
    /// Module names (`-` or `_`); their dependencies are added.
    pub modules: Vec<String>,
    /// A static busybox for /bin, if wanted.
    pub busybox: Option<PathBuf>,
    /// `mkfs.<fs>` tools, installed as `/sbin/mkfs.<fs>`; dynamically
    /// linked ones bring their libraries and interpreter.
    pub mkfs: Vec<PathBuf>,
    pub extra: Vec<ExtraFile>,
}

/// What was written.
#[derive(Debug, Clone)]
pub struct ImageSummary {
    pub bytes: u64,
    pub modules: ModuleClosure,
    pub applets: usize,
    /// `/sbin/mkfs.<fs>` tools written.
    pub mkfs: usize,
    /// Shared libraries and interpreters written for them.
    pub libraries: usize,
}

impl fmt::Display for ImageSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} bytes, {} modules, {} busybox applets, {} mkfs tools with {} shared libraries",
            self.bytes,
            self.modules.entries.len(),
            self.applets,
            self.mkfs,
            self.libraries
        )
    }
}

/// Writes the image described by `spec` as one newc archive to `out`.
pub fn write_image<W: Write>(spec: &ImageSpec, out: W) -> Result<(W, ImageSummary), ImageError> {
    // Resolve everything that can fail on bad input before writing a byte.
    let init = read_static("init (cradle)", &spec.init, CRADLE_HINT)?;
    let closure = match &spec.kernel {
        Some(kernel) => ModulesDep::read(&kernel.modules_dir)?.closure(&spec.modules)?,
        None if spec.modules.is_empty() => ModuleClosure::default(),
        None => return Err(ImageError::ModulesWithoutKernel),
    };
    let busybox = match &spec.busybox {
        Some(path) => Some((
            read_static("busybox", path, BUSYBOX_HINT)?,
            busybox::list_applets(path)?,
        )),
        None => None,
    };
    let mkfs = spec
        .mkfs
        .iter()
        .map(|path| read_mkfs(path))
        .collect::<Result<Vec<(String, Vec<u8>, Vec<PathBuf>)>, ImageError>>()?;
    let mut libraries: Vec<&Path> = mkfs
        .iter()
        .flat_map(|(_, _, libs)| libs.iter().map(PathBuf::as_path))
        .collect();
    libraries.sort();
    libraries.dedup();
    let library_modes = libraries
        .iter()
        .map(|path| regular_file_mode(path))
        .collect::<Result<Vec<u32>, ImageError>>()?;
    let extra_modes = spec
        .extra
        .iter()
        .map(|extra| regular_file_mode(&extra.source))
        .collect::<Result<Vec<u32>, ImageError>>()?;

    let mut archive = Archive::new(out);
    for (dir, mode) in BASE_DIRS {
        archive.add_dir(dir, *mode)?;
    }
    archive.add_char_device("dev/console", 0o600, CONSOLE_MAJOR, CONSOLE_MINOR)?;
    archive.add_file("init", EXECUTABLE_MODE, &init)?;

    let mut applets = 0;
    if let Some((binary, names)) = &busybox {
        archive.add_file("bin/busybox", EXECUTABLE_MODE, binary)?;
        for name in names {
            let link = format!("bin/{name}");
            // An --add file of the same name wins over the applet.
            if spec.extra.iter().any(|extra| same_path(&extra.dest, &link)) {
                continue;
            }
            archive.add_symlink(&link, "busybox")?;
            applets += 1;
        }
    }

    for (name, binary, _) in &mkfs {
        archive.add_file(&format!("sbin/{name}"), EXECUTABLE_MODE, binary)?;
    }
    for (path, mode) in libraries.iter().zip(library_modes) {
        let guest = path.to_string_lossy();
        archive.add_file_from(&guest, mode, path)?;
    }

    if let Some(kernel) = &spec.kernel {
        let guest_dir = kernel.guest_modules_dir();
        for path in closure.paths() {
            archive.add_file_from(
                &format!("{guest_dir}/{path}"),
                DATA_MODE,
                &kernel.modules_dir.join(path),
            )?;
        }
        archive.add_file(
            &format!("{guest_dir}/{MODULES_DEP}"),
            DATA_MODE,
            closure.to_modules_dep().as_bytes(),
        )?;
    }

    for (extra, mode) in spec.extra.iter().zip(extra_modes) {
        archive.add_file_from(&extra.dest, mode, &extra.source)?;
    }

    let bytes = archive.bytes_written() + TRAILER_BYTES;
    let out = archive.finish()?;
    let summary = ImageSummary {
        bytes,
        modules: closure,
        applets,
        mkfs: mkfs.len(),
        libraries: libraries.len(),
    };
    Ok((out, summary))
}

/// Reads an executable and checks it is static ELF-64.
fn read_static(what: &'static str, path: &Path, hint: &'static str) -> Result<Vec<u8>, ImageError> {
    let (bytes, linkage) = read_executable(what, path, hint)?;
    match linkage {
        Linkage::Static => Ok(bytes),
        Linkage::Dynamic { interpreter } => Err(ImageError::NotStatic {
            what,
            path: path.to_path_buf(),
            interpreter,
            hint,
        }),
    }
}

/// Reads an ELF-64 executable and tells how it is linked.
fn read_executable(
    what: &'static str,
    path: &Path,
    hint: &'static str,
) -> Result<(Vec<u8>, Linkage), ImageError> {
    let bytes = std::fs::read(path).map_err(|source| ImageError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })?;
    match elf::linkage(&bytes) {
        Ok(linkage) => Ok((bytes, linkage)),
        Err(source) => Err(ImageError::NotElf {
            what,
            path: path.to_path_buf(),
            hint,
            source,
        }),
    }
}

/// Reads a `mkfs.<fs>` tool: its name in /sbin, its bytes and the shared
/// libraries (interpreter included) it needs.
fn read_mkfs(path: &Path) -> Result<(String, Vec<u8>, Vec<PathBuf>), ImageError> {
    let name = mkfs_name(path)?;
    let (bytes, linkage) = read_executable("mkfs tool", path, MKFS_HINT)?;
    let libraries =
        shared_libs::dependencies(path, &linkage).map_err(|source| ImageError::SharedLibs {
            path: path.to_path_buf(),
            source,
        })?;
    Ok((name, bytes, libraries))
}

/// The file name of a `--mkfs` path, which must be `mkfs.<fs>` (the name
/// given, not a symlink's target: mke2fs picks the type from argv[0]).
fn mkfs_name(path: &Path) -> Result<String, ImageError> {
    path.file_name()
        .and_then(|name| name.to_str())
        .filter(|name| name.len() > MKFS_PREFIX.len() && name.starts_with(MKFS_PREFIX))
        .map(str::to_owned)
        .ok_or_else(|| ImageError::MkfsName {
            path: path.to_path_buf(),
        })
}

/// The permission bits of a host file that must be regular.
fn regular_file_mode(path: &Path) -> Result<u32, ImageError> {
    let metadata = std::fs::metadata(path).map_err(|source| ImageError::Read {
        what: "--add file",
        path: path.to_path_buf(),
        source,
    })?;
    if !metadata.is_file() {
        return Err(ImageError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    Ok(metadata.permissions().mode() & 0o7777)
}

/// Whether two guest paths name the same entry (leading `/` optional).
fn same_path(a: &str, b: &str) -> bool {
    a.trim_start_matches('/') == b.trim_start_matches('/')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_file_parses_src_and_absolute_dst() {
        let extra: ExtraFile = "pod.json:/etc/pod.json".parse().unwrap();

        assert_eq!(extra.source, PathBuf::from("pod.json"));
        assert_eq!(extra.dest, "/etc/pod.json");
    }

    #[test]
    fn extra_file_source_may_contain_colons() {
        let extra: ExtraFile = "a:b.txt:/b.txt".parse().unwrap();

        assert_eq!(extra.source, PathBuf::from("a:b.txt"));
    }

    #[test]
    fn extra_file_relative_dst_is_a_syntax_error() {
        assert!("a:b".parse::<ExtraFile>().is_err());
        assert!("nocolon".parse::<ExtraFile>().is_err());
        assert!(":/x".parse::<ExtraFile>().is_err());
        assert!("a:/".parse::<ExtraFile>().is_err());
    }

    #[test]
    fn read_static_script_is_not_elf_and_names_the_fix() {
        let dir = std::env::temp_dir().join(format!("crib-image-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join("init");
        std::fs::write(&script, "#!/bin/sh\n").unwrap();

        let error = read_static("init (cradle)", &script, CRADLE_HINT).unwrap_err();

        std::fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(error, ImageError::NotElf { .. }));
        assert!(error.to_string().contains("build-initramfs.sh"));
    }

    #[test]
    fn regular_file_mode_of_directory_is_not_a_file() {
        let error = regular_file_mode(&std::env::temp_dir()).unwrap_err();

        assert!(matches!(error, ImageError::NotAFile { .. }));
    }

    #[test]
    fn same_path_ignores_leading_slash() {
        assert!(same_path("/bin/sh", "bin/sh"));
        assert!(!same_path("/bin/sh", "bin/ash"));
    }

    #[test]
    fn mkfs_name_is_the_given_file_name() {
        assert_eq!(
            mkfs_name(Path::new("/usr/sbin/mkfs.ext4")).unwrap(),
            "mkfs.ext4"
        );
    }

    #[test]
    fn mkfs_name_other_than_mkfs_dot_fs_is_refused() {
        let error = mkfs_name(Path::new("/usr/sbin/mke2fs")).unwrap_err();

        assert!(matches!(error, ImageError::MkfsName { .. }));
        assert!(mkfs_name(Path::new("/usr/sbin/mkfs.")).is_err());
    }

    #[test]
    fn write_image_installs_host_mkfs_ext4_with_its_libraries() {
        // Needs e2fsprogs on the host, as guest/build-initramfs.sh does.
        let mkfs = PathBuf::from("/usr/sbin/mkfs.ext4");
        if !mkfs.exists() {
            eprintln!("skipped: no {} (apt-get install e2fsprogs)", mkfs.display());
            return;
        }
        let dir = std::env::temp_dir().join(format!("crib-image-mkfs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let kernel = fake_kernel(&dir);
        std::fs::write(dir.join("cradle"), fake_static_init()).unwrap();
        let spec = ImageSpec {
            init: dir.join("cradle"),
            kernel: Some(kernel),
            modules: Vec::new(),
            busybox: None,
            mkfs: vec![mkfs],
            extra: Vec::new(),
        };

        let (bytes, summary) = write_image(&spec, Vec::new()).unwrap();

        std::fs::remove_dir_all(&dir).unwrap();
        let entries = crate::cpio::parse_entries(&bytes);
        let mode_of = |name: &str| entries.iter().find(|e| e.0 == name).map(|e| e.1);
        assert_eq!(mode_of("sbin/mkfs.ext4"), Some(0o100_755));
        assert!(mode_of("lib64/ld-linux-x86-64.so.2").is_some());
        assert!(mode_of("lib/x86_64-linux-gnu/libext2fs.so.2").is_some());
        assert_eq!(summary.mkfs, 1);
        assert!(summary.libraries >= 3);
    }

    /// A fake fetched kernel with two modules (b needs a) and an unrelated one.
    fn fake_kernel(dir: &Path) -> KernelDir {
        let modules = dir.join("root/lib/modules/6.1.0-test");
        std::fs::create_dir_all(modules.join("kernel")).unwrap();
        std::fs::write(dir.join("VERSION"), "6.1.0-test\n").unwrap();
        std::fs::write(
            modules.join("modules.dep"),
            "kernel/b-mod.ko: kernel/a.ko\nkernel/a.ko:\nkernel/unused.ko:\n",
        )
        .unwrap();
        for name in ["a.ko", "b-mod.ko", "unused.ko"] {
            std::fs::write(modules.join("kernel").join(name), name).unwrap();
        }
        KernelDir::open(dir).unwrap()
    }

    /// The smallest static ELF-64 header `elf::linkage` accepts.
    fn fake_static_init() -> Vec<u8> {
        let mut bytes = vec![0; 64];
        bytes[..4].copy_from_slice(b"\x7fELF");
        bytes[4] = 2;
        bytes[5] = 1;
        bytes
    }

    #[test]
    fn write_image_lays_out_init_console_modules_and_extras() {
        let dir = std::env::temp_dir().join(format!("crib-image-full-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let kernel = fake_kernel(&dir);
        std::fs::write(dir.join("cradle"), fake_static_init()).unwrap();
        std::fs::write(dir.join("spec.json"), "{}").unwrap();
        let spec = ImageSpec {
            init: dir.join("cradle"),
            kernel: Some(kernel),
            modules: vec!["b_mod".to_owned()],
            busybox: None,
            mkfs: Vec::new(),
            extra: vec![
                format!("{}:/etc/pod/spec.json", dir.join("spec.json").display())
                    .parse()
                    .unwrap(),
            ],
        };

        let (bytes, summary) = write_image(&spec, Vec::new()).unwrap();

        std::fs::remove_dir_all(&dir).unwrap();
        let entries = crate::cpio::parse_entries(&bytes);
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "dev",
                "proc",
                "sys",
                "run",
                "tmp",
                "root",
                "dev/console",
                "init",
                "lib",
                "lib/modules",
                "lib/modules/6.1.0-test",
                "lib/modules/6.1.0-test/kernel",
                "lib/modules/6.1.0-test/kernel/a.ko",
                "lib/modules/6.1.0-test/kernel/b-mod.ko",
                "lib/modules/6.1.0-test/modules.dep",
                "etc",
                "etc/pod",
                "etc/pod/spec.json",
                "TRAILER!!!",
            ]
        );
        assert_eq!(entries[6].1, 0o020_600);
        assert_eq!(entries[7].1, 0o100_755);
        assert_eq!(
            entries[14].2,
            b"kernel/a.ko:\nkernel/b-mod.ko: kernel/a.ko\n"
        );
        assert_eq!(summary.bytes as usize, bytes.len());
        assert_eq!(summary.modules.entries.len(), 2);
    }

    #[test]
    fn write_image_without_kernel_has_no_modules_dir() {
        let dir = std::env::temp_dir().join(format!("crib-image-builtin-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("cradle"), fake_static_init()).unwrap();
        let mut spec = ImageSpec {
            init: dir.join("cradle"),
            kernel: None,
            modules: Vec::new(),
            busybox: None,
            mkfs: Vec::new(),
            extra: Vec::new(),
        };

        let (bytes, summary) = write_image(&spec, Vec::new()).unwrap();
        spec.modules = vec!["virtio_blk".to_owned()];
        let error = write_image(&spec, Vec::new()).unwrap_err();

        std::fs::remove_dir_all(&dir).unwrap();
        let entries = crate::cpio::parse_entries(&bytes);
        assert!(entries.iter().all(|e| !e.0.starts_with("lib")));
        assert!(entries.iter().any(|e| e.0 == "init"));
        assert!(summary.modules.entries.is_empty());
        assert!(matches!(error, ImageError::ModulesWithoutKernel));
        assert!(error.to_string().contains("--kernel"));
    }
}
