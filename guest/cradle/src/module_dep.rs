//! Load order of kernel modules from depmod's `modules.dep` (pure, no I/O).
//!
//! Each line of `modules.dep` is `path: dep dep ...`, paths relative to
//! `/lib/modules/<release>/` (see modules.dep(5)). depmod lists every
//! dependency of a module, transitively, and modprobe loads them last to
//! first; this module turns the whole file into one list in which every
//! module comes after its dependencies.
//!
//! A broken file must not stop the boot, so nothing here fails: problems
//! (a module listed twice, a cycle, a dependency that is not shipped, a line
//! without `:`) are returned as [`OrderWarning`]s and the order is built from
//! what is usable.

use std::collections::HashMap;
use std::fmt;

/// Modules in load order (dependencies first), plus what was wrong with the file.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct LoadOrder<'a> {
    /// Module paths exactly as written in `modules.dep`, each once.
    pub paths: Vec<&'a str>,
    pub warnings: Vec<OrderWarning>,
}

/// Something wrong in `modules.dep` that was worked around.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderWarning {
    /// A line without the `path:` separator; it was skipped.
    MalformedLine { line: usize },
    /// The module has two lines; their dependencies were merged.
    Duplicate { module: String },
    /// `module` depends (maybe indirectly) on itself; the edge to
    /// `dependency` was ignored.
    Cycle { module: String, dependency: String },
    /// `dependency` has no line of its own, so it is not in the image; the
    /// module is still tried and its own load will report what is missing.
    MissingDependency { module: String, dependency: String },
}

impl fmt::Display for OrderWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::MalformedLine { line } => {
                write!(f, "modules.dep line {line} has no ':'; skipped")
            }
            Self::Duplicate { module } => {
                write!(f, "module {module} is listed twice in modules.dep; loaded once")
            }
            Self::Cycle { module, dependency } => write!(
                f,
                "module {module} and {dependency} depend on each other; order between them is arbitrary"
            ),
            Self::MissingDependency { module, dependency } => write!(
                f,
                "module {module} needs {dependency}, which is not in the initramfs"
            ),
        }
    }
}

/// One module and the paths it depends on.
#[derive(Debug)]
struct Entry<'a> {
    path: &'a str,
    deps: Vec<&'a str>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mark {
    Unvisited,
    Visiting,
    Done,
}

/// Returns every module of `modules_dep` once, each after all its dependencies.
///
/// Ties keep the file's order; within one module, dependencies are visited
/// last to first, as modprobe does.
pub fn load_order(modules_dep: &str) -> LoadOrder<'_> {
    let mut warnings = Vec::new();
    let entries = parse(modules_dep, &mut warnings);
    let index: HashMap<&str, usize> = entries
        .iter()
        .enumerate()
        .map(|(i, entry)| (entry.path, i))
        .collect();

    let mut sorter = Sorter {
        entries: &entries,
        index: &index,
        marks: vec![Mark::Unvisited; entries.len()],
        order: Vec::with_capacity(entries.len()),
        warnings,
    };
    for i in 0..entries.len() {
        sorter.visit(i);
    }
    LoadOrder {
        paths: sorter.order,
        warnings: sorter.warnings,
    }
}

/// Splits the file into entries, merging a module's repeated lines.
fn parse<'a>(text: &'a str, warnings: &mut Vec<OrderWarning>) -> Vec<Entry<'a>> {
    let mut entries: Vec<Entry<'a>> = Vec::new();
    let mut seen: HashMap<&'a str, usize> = HashMap::new();
    for (line_index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((path, deps)) = line.split_once(':') else {
            warnings.push(OrderWarning::MalformedLine {
                line: line_index + 1,
            });
            continue;
        };
        let path = path.trim();
        if path.is_empty() {
            warnings.push(OrderWarning::MalformedLine {
                line: line_index + 1,
            });
            continue;
        }
        let deps = deps.split_whitespace();
        match seen.get(path).and_then(|&i| entries.get_mut(i)) {
            Some(entry) => {
                warnings.push(OrderWarning::Duplicate {
                    module: module_name(path).to_owned(),
                });
                for dep in deps {
                    if !entry.deps.contains(&dep) {
                        entry.deps.push(dep);
                    }
                }
            }
            None => {
                seen.insert(path, entries.len());
                entries.push(Entry {
                    path,
                    deps: deps.collect(),
                });
            }
        }
    }
    entries
}

/// Depth-first post-order walk over the dependency graph.
struct Sorter<'e, 'a> {
    entries: &'e [Entry<'a>],
    index: &'e HashMap<&'a str, usize>,
    marks: Vec<Mark>,
    order: Vec<&'a str>,
    warnings: Vec<OrderWarning>,
}

impl Sorter<'_, '_> {
    // Recursion depth is bounded by the longest dependency chain (a handful
    // of modules in practice, the number of lines at worst).
    fn visit(&mut self, i: usize) {
        let Some(entry) = self.entries.get(i) else {
            return;
        };
        if self.marks.get(i) != Some(&Mark::Unvisited) {
            return;
        }
        if let Some(mark) = self.marks.get_mut(i) {
            *mark = Mark::Visiting;
        }
        for &dep in entry.deps.iter().rev() {
            match self.index.get(dep) {
                None => self.warnings.push(OrderWarning::MissingDependency {
                    module: module_name(entry.path).to_owned(),
                    dependency: module_name(dep).to_owned(),
                }),
                Some(&j) => match self.marks.get(j) {
                    Some(Mark::Unvisited) => self.visit(j),
                    Some(Mark::Visiting) => self.warnings.push(OrderWarning::Cycle {
                        module: module_name(entry.path).to_owned(),
                        dependency: module_name(dep).to_owned(),
                    }),
                    Some(Mark::Done) | None => {}
                },
            }
        }
        if let Some(mark) = self.marks.get_mut(i) {
            *mark = Mark::Done;
        }
        self.order.push(entry.path);
    }
}

/// The module's name as the kernel knows it, from its path:
/// `kernel/drivers/block/virtio_blk.ko` -> `virtio_blk`.
pub fn module_name(path: &str) -> &str {
    let file = path.rsplit('/').next().unwrap_or(path);
    [".ko.xz", ".ko.zst", ".ko.gz", ".ko"]
        .iter()
        .find_map(|suffix| file.strip_suffix(suffix))
        .unwrap_or(file)
}

/// Whether the module file is compressed, so the kernel must decompress it
/// (`MODULE_INIT_COMPRESSED_FILE`).
pub fn is_compressed(path: &str) -> bool {
    [".ko.xz", ".ko.zst", ".ko.gz"]
        .iter()
        .any(|suffix| path.ends_with(suffix))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The closure of virtio_blk and virtio_net as depmod wrote it for 6.1.
    const DEBIAN_SAMPLE: &str = "\
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
";

    fn position(order: &LoadOrder<'_>, path: &str) -> usize {
        order.paths.iter().position(|p| *p == path).unwrap()
    }

    #[test]
    fn load_order_debian_sample_puts_dependencies_first() {
        let order = load_order(DEBIAN_SAMPLE);

        assert_eq!(
            order.paths,
            vec![
                "kernel/drivers/virtio/virtio_ring.ko",
                "kernel/drivers/virtio/virtio.ko",
                "kernel/drivers/block/virtio_blk.ko",
                "kernel/net/core/failover.ko",
                "kernel/drivers/net/net_failover.ko",
                "kernel/drivers/net/virtio_net.ko",
            ]
        );
        assert!(order.warnings.is_empty());
    }

    #[test]
    fn load_order_dependency_listed_later_still_loads_first() {
        let text = "c.ko: b.ko\nb.ko: a.ko\na.ko:\n";

        let order = load_order(text);

        assert_eq!(order.paths, vec!["a.ko", "b.ko", "c.ko"]);
    }

    #[test]
    fn load_order_module_listed_twice_loads_once_with_merged_deps() {
        let text = "m.ko: a.ko\na.ko:\nb.ko:\nm.ko: b.ko\n";

        let order = load_order(text);

        // m's deps merge to [a, b], visited last to first.
        assert_eq!(order.paths, vec!["b.ko", "a.ko", "m.ko"]);
        assert_eq!(
            order.warnings,
            vec![OrderWarning::Duplicate {
                module: "m".to_owned()
            }]
        );
    }

    #[test]
    fn load_order_cycle_loads_each_module_once_and_warns() {
        let text = "a.ko: b.ko\nb.ko: a.ko\nc.ko: a.ko\n";

        let order = load_order(text);

        assert_eq!(order.paths, vec!["b.ko", "a.ko", "c.ko"]);
        assert_eq!(
            order.warnings,
            vec![OrderWarning::Cycle {
                module: "b".to_owned(),
                dependency: "a".to_owned()
            }]
        );
    }

    #[test]
    fn load_order_self_dependency_is_a_cycle() {
        let order = load_order("a.ko: a.ko\n");

        assert_eq!(order.paths, vec!["a.ko"]);
        assert_eq!(order.warnings.len(), 1);
    }

    #[test]
    fn load_order_missing_dependency_warns_and_keeps_the_module() {
        // virtio.ko has no line: the image builder did not ship it.
        let text = "kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko\n";

        let order = load_order(text);

        assert_eq!(order.paths, vec!["kernel/drivers/block/virtio_blk.ko"]);
        assert_eq!(
            order.warnings,
            vec![OrderWarning::MissingDependency {
                module: "virtio_blk".to_owned(),
                dependency: "virtio".to_owned()
            }]
        );
    }

    #[test]
    fn load_order_malformed_line_is_skipped() {
        let text = "a.ko:\ngarbage\nb.ko: a.ko\n";

        let order = load_order(text);

        assert_eq!(order.paths, vec!["a.ko", "b.ko"]);
        assert_eq!(
            order.warnings,
            vec![OrderWarning::MalformedLine { line: 2 }]
        );
    }

    #[test]
    fn load_order_blank_and_comment_lines_are_ignored() {
        let order = load_order("\n# comment\n  \na.ko:\n");

        assert_eq!(order.paths, vec!["a.ko"]);
        assert!(order.warnings.is_empty());
    }

    #[test]
    fn load_order_empty_file_is_empty() {
        assert_eq!(load_order(""), LoadOrder::default());
    }

    #[test]
    fn load_order_shared_dependency_loads_once_before_both_users() {
        let order = load_order(DEBIAN_SAMPLE);

        let virtio = position(&order, "kernel/drivers/virtio/virtio.ko");
        assert!(virtio < position(&order, "kernel/drivers/block/virtio_blk.ko"));
        assert!(virtio < position(&order, "kernel/drivers/net/virtio_net.ko"));
        assert_eq!(order.paths.len(), 6);
    }

    #[test]
    fn module_name_strips_directory_and_suffix() {
        assert_eq!(
            module_name("kernel/drivers/misc/pvpanic/pvpanic-mmio.ko"),
            "pvpanic-mmio"
        );
        assert_eq!(module_name("kernel/fs/overlayfs/overlay.ko.zst"), "overlay");
        assert_eq!(module_name("fuse.ko"), "fuse");
    }

    #[test]
    fn is_compressed_detects_compressed_suffixes() {
        assert!(is_compressed("kernel/fs/fuse/fuse.ko.xz"));
        assert!(!is_compressed("kernel/fs/fuse/fuse.ko"));
    }
}
