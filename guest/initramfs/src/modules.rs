//! Which kernel module files an initramfs must ship: the transitive closure
//! of a list of module names over depmod's `modules.dep` (modules.dep(5)),
//! and the trimmed `modules.dep` that lists exactly those files.
//!
//! Names are matched as the kernel does: `-` and `_` are the same, so
//! `pvpanic-mmio` and `pvpanic_mmio` both find `pvpanic-mmio.ko`.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// File depmod writes in each modules directory.
pub const MODULES_DEP: &str = "modules.dep";

/// Errors of module resolution.
#[derive(Debug, Error)]
pub enum ModulesError {
    #[error("cannot read {} (is this a modules directory on which depmod ran?)", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: line {line} is not `path: deps...`", path.display())]
    Malformed { path: PathBuf, line: usize },
    #[error(
        "no module named {} in {}; check the spelling against modules.dep \
         (a built-in driver needs no module)",
        names.join(", "), path.display()
    )]
    Unknown { names: Vec<String>, path: PathBuf },
    #[error("module {module} depends on {dependency}, which has no line in {}; rerun depmod", path.display())]
    MissingDependency {
        module: String,
        dependency: String,
        path: PathBuf,
    },
    #[error("modules {module} and {dependency} depend on each other in {}; rerun depmod", path.display())]
    Cycle {
        module: String,
        dependency: String,
        path: PathBuf,
    },
}

/// One line of `modules.dep`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleEntry {
    /// Path relative to the modules directory, e.g. `kernel/fs/fuse/fuse.ko`.
    pub path: String,
    /// Every module it needs, transitively, as depmod listed them.
    pub deps: Vec<String>,
}

impl ModuleEntry {
    /// The module's name, normalized (`pvpanic-mmio.ko` -> `pvpanic_mmio`).
    pub fn name(&self) -> String {
        module_name(&self.path)
    }
}

/// A parsed `modules.dep`.
#[derive(Debug, Clone)]
pub struct ModulesDep {
    /// The file it came from, for error messages.
    source: PathBuf,
    entries: Vec<ModuleEntry>,
}

/// Modules to ship, in load order: each after its dependencies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModuleClosure {
    pub entries: Vec<ModuleEntry>,
}

impl ModulesDep {
    /// Reads `<dir>/modules.dep`.
    pub fn read(dir: &Path) -> Result<Self, ModulesError> {
        let path = dir.join(MODULES_DEP);
        let text = std::fs::read_to_string(&path).map_err(|source| ModulesError::Read {
            path: path.clone(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses the text of a `modules.dep`; `source` names it in errors.
    pub fn parse(text: &str, source: PathBuf) -> Result<Self, ModulesError> {
        let mut entries = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((path, deps)) = line.split_once(':') else {
                return Err(ModulesError::Malformed {
                    path: source,
                    line: index + 1,
                });
            };
            entries.push(ModuleEntry {
                path: path.trim().to_owned(),
                deps: deps.split_whitespace().map(str::to_owned).collect(),
            });
        }
        Ok(Self { source, entries })
    }

    /// Resolves `names` and everything they depend on. Every unknown name is
    /// reported at once.
    pub fn closure<S: AsRef<str>>(&self, names: &[S]) -> Result<ModuleClosure, ModulesError> {
        let by_path: HashMap<&str, usize> = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, entry)| (entry.path.as_str(), i))
            .collect();
        let mut by_name: HashMap<String, usize> = HashMap::new();
        for (i, entry) in self.entries.iter().enumerate() {
            // depmod's first match wins, as in modprobe.
            by_name.entry(entry.name()).or_insert(i);
        }

        let mut roots = Vec::new();
        let mut unknown = Vec::new();
        for name in names {
            let name = name.as_ref().trim();
            match by_name.get(&normalize_name(name)) {
                Some(&i) => roots.push(i),
                None => unknown.push(name.to_owned()),
            }
        }
        if !unknown.is_empty() {
            return Err(ModulesError::Unknown {
                names: unknown,
                path: self.source.clone(),
            });
        }

        let mut walk = Walk {
            dep: self,
            by_path: &by_path,
            marks: vec![Mark::Unvisited; self.entries.len()],
            order: Vec::new(),
        };
        for root in roots {
            walk.visit(root)?;
        }
        Ok(ModuleClosure {
            entries: walk
                .order
                .into_iter()
                .filter_map(|i| self.entries.get(i).cloned())
                .collect(),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mark {
    Unvisited,
    Visiting,
    Done,
}

/// Depth-first post-order walk: dependencies land before their users.
struct Walk<'a> {
    dep: &'a ModulesDep,
    by_path: &'a HashMap<&'a str, usize>,
    marks: Vec<Mark>,
    order: Vec<usize>,
}

impl Walk<'_> {
    fn visit(&mut self, i: usize) -> Result<(), ModulesError> {
        let Some(entry) = self.dep.entries.get(i) else {
            return Ok(());
        };
        match self.marks.get(i) {
            Some(Mark::Unvisited) => {}
            _ => return Ok(()),
        }
        if let Some(mark) = self.marks.get_mut(i) {
            *mark = Mark::Visiting;
        }
        // modprobe loads the listed dependencies last to first.
        for dep in entry.deps.iter().rev() {
            let Some(&j) = self.by_path.get(dep.as_str()) else {
                return Err(ModulesError::MissingDependency {
                    module: entry.name(),
                    dependency: module_name(dep),
                    path: self.dep.source.clone(),
                });
            };
            if self.marks.get(j) == Some(&Mark::Visiting) {
                return Err(ModulesError::Cycle {
                    module: entry.name(),
                    dependency: module_name(dep),
                    path: self.dep.source.clone(),
                });
            }
            self.visit(j)?;
        }
        if let Some(mark) = self.marks.get_mut(i) {
            *mark = Mark::Done;
        }
        self.order.push(i);
        Ok(())
    }
}

impl ModuleClosure {
    /// Module paths relative to the modules directory, in load order.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|entry| entry.path.as_str())
    }

    /// A `modules.dep` listing exactly these modules, in load order, each
    /// with its dependencies as depmod wrote them.
    pub fn to_modules_dep(&self) -> String {
        let mut text = String::new();
        for entry in &self.entries {
            text.push_str(&entry.path);
            text.push(':');
            for dep in &entry.deps {
                text.push(' ');
                text.push_str(dep);
            }
            text.push('\n');
        }
        text
    }
}

/// The normalized module name of a path: the file name without `.ko` (and
/// any compression suffix), with `-` turned into `_`.
pub fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = [".ko.xz", ".ko.zst", ".ko.gz", ".ko"]
        .iter()
        .find_map(|suffix| file.strip_suffix(suffix))
        .unwrap_or(file);
    normalize_name(stem)
}

/// Module names treat `-` and `_` alike; `_` is the canonical spelling.
pub fn normalize_name(name: &str) -> String {
    name.replace('-', "_")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A slice of the Debian 6.1 cloud kernel's modules.dep.
    const SAMPLE: &str = "\
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_legacy_dev.ko kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/misc/pvpanic/pvpanic-mmio.ko: kernel/drivers/misc/pvpanic/pvpanic.ko
kernel/drivers/misc/pvpanic/pvpanic.ko:
kernel/fs/overlayfs/overlay.ko:
";

    fn sample() -> ModulesDep {
        ModulesDep::parse(SAMPLE, PathBuf::from("modules.dep")).unwrap()
    }

    #[test]
    fn closure_includes_transitive_dependencies_first() {
        let closure = sample().closure(&["virtio_blk"]).unwrap();

        assert_eq!(
            closure.paths().collect::<Vec<_>>(),
            [
                "kernel/drivers/virtio/virtio_ring.ko",
                "kernel/drivers/virtio/virtio.ko",
                "kernel/drivers/block/virtio_blk.ko",
            ]
        );
    }

    #[test]
    fn closure_shared_dependencies_appear_once() {
        let closure = sample().closure(&["virtio_pci", "virtio_blk"]).unwrap();

        let paths: Vec<&str> = closure.paths().collect();
        assert_eq!(paths.len(), 6);
        assert_eq!(paths.last(), Some(&"kernel/drivers/block/virtio_blk.ko"));
    }

    #[test]
    fn closure_accepts_dash_and_underscore_spellings() {
        let dash = sample().closure(&["pvpanic-mmio"]).unwrap();
        let underscore = sample().closure(&["pvpanic_mmio"]).unwrap();

        assert_eq!(dash, underscore);
        assert_eq!(dash.entries.len(), 2);
    }

    #[test]
    fn closure_unknown_names_are_all_reported() {
        let error = sample()
            .closure(&["virtio_blk", "nope", "ext9"])
            .unwrap_err();

        assert!(
            matches!(&error, ModulesError::Unknown { names, .. } if names == &["nope", "ext9"])
        );
        assert!(error.to_string().contains("nope, ext9"));
    }

    #[test]
    fn closure_dependency_without_line_is_an_error() {
        let dep = ModulesDep::parse("a.ko: b.ko\n", PathBuf::from("modules.dep")).unwrap();

        let error = dep.closure(&["a"]).unwrap_err();

        assert!(
            matches!(error, ModulesError::MissingDependency { dependency, .. } if dependency == "b")
        );
    }

    #[test]
    fn closure_cycle_is_an_error() {
        let dep = ModulesDep::parse("a.ko: b.ko\nb.ko: a.ko\n", PathBuf::from("m")).unwrap();

        let error = dep.closure(&["a"]).unwrap_err();

        assert!(matches!(error, ModulesError::Cycle { .. }));
    }

    #[test]
    fn closure_of_nothing_is_empty() {
        let closure = sample().closure::<&str>(&[]).unwrap();

        assert!(closure.entries.is_empty());
        assert_eq!(closure.to_modules_dep(), "");
    }

    #[test]
    fn parse_line_without_colon_is_malformed() {
        let error = ModulesDep::parse("a.ko:\nbroken\n", PathBuf::from("m")).unwrap_err();

        assert!(matches!(error, ModulesError::Malformed { line: 2, .. }));
    }

    #[test]
    fn read_missing_directory_names_the_file() {
        let error = ModulesDep::read(Path::new("/nonexistent/crib")).unwrap_err();

        assert!(error.to_string().contains("/nonexistent/crib/modules.dep"));
    }

    #[test]
    fn to_modules_dep_lists_exactly_the_closure_in_load_order() {
        let closure = sample().closure(&["pvpanic_mmio"]).unwrap();

        assert_eq!(
            closure.to_modules_dep(),
            "kernel/drivers/misc/pvpanic/pvpanic.ko:\n\
             kernel/drivers/misc/pvpanic/pvpanic-mmio.ko: kernel/drivers/misc/pvpanic/pvpanic.ko\n"
        );
    }

    #[test]
    fn module_name_normalizes_path() {
        assert_eq!(
            module_name("kernel/drivers/misc/pvpanic/pvpanic-mmio.ko"),
            "pvpanic_mmio"
        );
        assert_eq!(module_name("kernel/fs/overlayfs/overlay.ko.zst"), "overlay");
    }
}
