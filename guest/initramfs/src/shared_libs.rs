//! The shared libraries a dynamically linked host tool needs in the guest
//! (Debian's `mkfs.ext4`, say): its ELF interpreter and everything `ldd`
//! resolves, so the image can carry them at the same paths.
//!
//! The guest has no `/etc/ld.so.cache`, so its loader searches only its
//! built-in directories (`/lib/<triple>`, `/usr/lib/<triple>`, `/lib`,
//! `/usr/lib` on Debian); a library the host found elsewhere (through the
//! cache or `LD_LIBRARY_PATH`) is refused here rather than missing at boot.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use thiserror::Error;

use crate::elf::Linkage;

/// Directories the guest's dynamic loader searches without a cache
/// (glibc's system directories on Debian amd64).
pub const LOADER_DIRS: &[&str] = &[
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib",
    "/usr/lib",
    "/lib64",
    "/usr/lib64",
];

/// The fix when `ldd` itself is missing.
const LDD_HINT: &str = "apt-get install libc-bin";

/// Errors of finding a tool's shared libraries.
#[derive(Debug, Error)]
pub enum SharedLibsError {
    #[error("cannot run ldd on {}; {LDD_HINT}", tool.display())]
    Run {
        tool: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("ldd {} failed ({status}): {stderr}", tool.display())]
    Failed {
        tool: PathBuf,
        status: String,
        stderr: String,
    },
    #[error("{} needs {library}, which ldd cannot find on this host; install the package that has it", tool.display())]
    NotFound { tool: PathBuf, library: String },
    #[error("{} needs {}, which the guest's loader would not find (it only searches {}); install the library in one of those", tool.display(), library.display(), LOADER_DIRS.join(", "))]
    OutsideLoaderDirs { tool: PathBuf, library: PathBuf },
}

/// Every file `tool` needs at run time besides itself: the ELF interpreter
/// and the libraries `ldd` resolves, absolute host paths (which are also
/// their guest paths), sorted. A static tool needs none.
pub fn dependencies(tool: &Path, linkage: &Linkage) -> Result<Vec<PathBuf>, SharedLibsError> {
    let Linkage::Dynamic { interpreter } = linkage else {
        return Ok(Vec::new());
    };
    let output = Command::new("ldd")
        .arg(tool)
        .output()
        .map_err(|source| SharedLibsError::Run {
            tool: tool.to_path_buf(),
            source,
        })?;
    if !output.status.success() {
        return Err(SharedLibsError::Failed {
            tool: tool.to_path_buf(),
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    let mut paths = parse_ldd(tool, &String::from_utf8_lossy(&output.stdout))?;
    // The interpreter is loaded by the kernel from exactly this path.
    paths.push(PathBuf::from(interpreter));
    paths.sort();
    paths.dedup();
    Ok(paths)
}

/// Parses `ldd` output: `name => /path (0x...)` lines give a library,
/// `/path (0x...)` the interpreter; the vDSO (no path) is skipped.
pub fn parse_ldd(tool: &Path, text: &str) -> Result<Vec<PathBuf>, SharedLibsError> {
    let mut paths = Vec::new();
    for line in text.lines().map(str::trim) {
        // Only "name => path" libraries are searched by the loader.
        let (name, location, searched) = match line.split_once("=>") {
            Some((name, location)) => (name.trim(), location.trim(), true),
            None => (line, line, false),
        };
        if location.starts_with("not found") {
            return Err(SharedLibsError::NotFound {
                tool: tool.to_path_buf(),
                library: name.to_owned(),
            });
        }
        // Drop the load address: "/lib/x/libc.so.6 (0x00007f...)".
        let path = location.split(" (").next().unwrap_or_default().trim();
        if !path.starts_with('/') {
            continue;
        }
        let path = PathBuf::from(path);
        let in_loader_dir = path
            .parent()
            .is_some_and(|dir| LOADER_DIRS.iter().any(|d| dir == Path::new(d)));
        // The interpreter (no "=>") is opened by its path, not searched.
        if searched && !in_loader_dir {
            return Err(SharedLibsError::OutsideLoaderDirs {
                tool: tool.to_path_buf(),
                library: path,
            });
        }
        paths.push(path);
    }
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ldd /usr/sbin/mkfs.ext4` on Debian 12.
    const MKFS_EXT4: &str = "\
\tlinux-vdso.so.1 (0x00007ffd6a1f4000)
\tlibext2fs.so.2 => /lib/x86_64-linux-gnu/libext2fs.so.2 (0x00007f7f825fb000)
\tlibcom_err.so.2 => /lib/x86_64-linux-gnu/libcom_err.so.2 (0x00007f7f825f5000)
\tlibblkid.so.1 => /lib/x86_64-linux-gnu/libblkid.so.1 (0x00007f7f8259e000)
\tlibuuid.so.1 => /lib/x86_64-linux-gnu/libuuid.so.1 (0x00007f7f82594000)
\tlibe2p.so.2 => /lib/x86_64-linux-gnu/libe2p.so.2 (0x00007f7f82589000)
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f7f823a5000)
\t/lib64/ld-linux-x86-64.so.2 (0x00007f7f826a0000)
";

    fn tool() -> &'static Path {
        Path::new("/usr/sbin/mkfs.ext4")
    }

    #[test]
    fn parse_ldd_mkfs_ext4_lists_libraries_and_interpreter_without_vdso() {
        let paths = parse_ldd(tool(), MKFS_EXT4).unwrap();

        let names: Vec<&str> = paths.iter().filter_map(|p| p.to_str()).collect();
        assert_eq!(
            names,
            [
                "/lib/x86_64-linux-gnu/libext2fs.so.2",
                "/lib/x86_64-linux-gnu/libcom_err.so.2",
                "/lib/x86_64-linux-gnu/libblkid.so.1",
                "/lib/x86_64-linux-gnu/libuuid.so.1",
                "/lib/x86_64-linux-gnu/libe2p.so.2",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2",
            ]
        );
    }

    #[test]
    fn parse_ldd_missing_library_is_not_found() {
        let text =
            "\tlibfoo.so.1 => not found\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x1)\n";

        let error = parse_ldd(tool(), text).unwrap_err();

        assert!(
            matches!(error, SharedLibsError::NotFound { library, .. } if library == "libfoo.so.1")
        );
    }

    #[test]
    fn parse_ldd_library_outside_loader_dirs_is_refused() {
        let text = "\tlibfoo.so.1 => /opt/foo/lib/libfoo.so.1 (0x1)\n";

        let error = parse_ldd(tool(), text).unwrap_err();

        assert!(matches!(error, SharedLibsError::OutsideLoaderDirs { .. }));
        assert!(error.to_string().contains("/opt/foo/lib/libfoo.so.1"));
    }

    #[test]
    fn dependencies_of_a_static_tool_are_none() {
        let paths = dependencies(Path::new("/nonexistent"), &Linkage::Static).unwrap();

        assert!(paths.is_empty());
    }

    #[test]
    fn dependencies_of_host_mkfs_ext4_include_libc_and_the_interpreter() {
        // Needs e2fsprogs on the host, as guest/build-initramfs.sh does.
        let tool = Path::new("/usr/sbin/mkfs.ext4");
        let Ok(bytes) = std::fs::read(tool) else {
            eprintln!("skipped: no {} (apt-get install e2fsprogs)", tool.display());
            return;
        };
        let linkage = crate::elf::linkage(&bytes).unwrap();

        let paths = dependencies(tool, &linkage).unwrap();

        let Linkage::Dynamic { interpreter } = linkage else {
            panic!("Debian's mkfs.ext4 is dynamically linked");
        };
        assert!(paths.contains(&PathBuf::from(interpreter)));
        assert!(paths.iter().any(|p| p.ends_with("libc.so.6")));
        assert!(paths.iter().any(|p| p.ends_with("libext2fs.so.2")));
    }
}
