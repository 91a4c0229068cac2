//! Wire types of image processes (docs/CONTAINERS.md), shared by the host, which resolves
//! each image and fills [`ResolvedImages`] into the pod spec, and cradle, which mounts the
//! layers and runs the process in the image's root: the layer table of the pod's layer disk,
//! each image's digest, layers and config, and Docker's rules for combining an image's
//! config with a process's own settings ([`effective_command`]).
//!
//! Pure types and functions: no I/O.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The serial of the pod's read-only layer disk (virtio-blk GET_ID).
pub const LAYER_DISK_SERIAL: &str = "crib-layers";
/// The serial of the pod's scratch disk, which holds the containers' writable layers.
pub const SCRATCH_DISK_SERIAL: &str = "crib-scratch";
/// Every layer starts at a multiple of this on the layer disk (erofs's block size).
pub const LAYER_ALIGN: u64 = 4096;
/// The PATH an image process gets when neither its image nor its spec sets one (Docker's).
pub const DEFAULT_IMAGE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Most layers one image may have (overlayfs stacks at most 500 lower layers; Docker 125).
pub const MAX_IMAGE_LAYERS: usize = 128;

/// Most CPUs a container may be limited to (`cpus`).
pub const MAX_CPUS: f64 = 1024.0;
/// Smallest memory limit: below this the kernel's own charges make it meaningless.
pub const MIN_MEMORY_BYTES: u64 = 4 * 1024 * 1024;

/// A container's `cpus` limit, stored in thousandths of a CPU (`0.5` is 500), so the spec
/// types keep `Eq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MilliCpus(pub u32);

impl Serialize for MilliCpus {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_f64(f64::from(self.0) / 1000.0)
    }
}

impl<'de> Deserialize<'de> for MilliCpus {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let cpus = f64::deserialize(deserializer)?;
        if !(0.001..=MAX_CPUS).contains(&cpus) {
            return Err(serde::de::Error::custom(format!(
                "{cpus} CPUs is out of range; use 0.001 to {MAX_CPUS}, like 0.5"
            )));
        }
        let millis = (cpus * 1000.0).round();
        // In range: 1..=1_024_000.
        Ok(Self(millis as u32))
    }
}

/// A memory limit in bytes, written as a number of bytes or a string with a K, M or G
/// suffix (`"256M"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct MemoryBytes(pub u64);

impl<'de> Deserialize<'de> for MemoryBytes {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        let bytes = match Raw::deserialize(deserializer)? {
            Raw::Number(n) => Some(n),
            Raw::Text(text) => parse_size(&text),
        };
        match bytes {
            Some(b) if b >= MIN_MEMORY_BYTES => Ok(Self(b)),
            _ => Err(serde::de::Error::custom(format!(
                "not a memory size of at least {MIN_MEMORY_BYTES} bytes; write bytes or a K, M or G suffix, like \"256M\""
            ))),
        }
    }
}

/// `"256M"`, `"1G"`, `"4096"`, `"512k"`.
fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let (digits, shift) = match text.char_indices().last()? {
        (i, 'k' | 'K') => (&text[..i], 10),
        (i, 'm' | 'M') => (&text[..i], 20),
        (i, 'g' | 'G') => (&text[..i], 30),
        _ => (text, 0),
    };
    digits.parse::<u64>().ok()?.checked_mul(1u64 << shift)
}

/// Errors of combining an image's config with a process's settings, and of checking the
/// resolved images of a spec.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ContainerSpecError {
    #[error(
        "{field}: the image sets no Entrypoint or Cmd and the process gives no argv; add argv"
    )]
    NoCommand { field: String },
    #[error(
        "{field}: image {image:?} was not resolved by the host; run the pod with crib pod run"
    )]
    Unresolved { field: String, image: String },
    #[error(
        "{field}: layer {diff_id} is not in the pod's layer table; the host's spec is inconsistent"
    )]
    UnknownLayer { field: String, diff_id: String },
    #[error("{field}: layer {diff_id} at offset {offset} is not aligned to {LAYER_ALIGN} bytes or overlaps the one before it")]
    BadLayerOffset {
        field: String,
        diff_id: String,
        offset: u64,
    },
    #[error("{field}: {value:?} is not a sha256 digest (sha256: and 64 lowercase hex digits)")]
    BadDigest { field: String, value: String },
    #[error("{field}: an image has {count} layers; the limit is {MAX_IMAGE_LAYERS}")]
    TooManyLayers { field: String, count: usize },
    #[error("{field}: an image needs at least one layer")]
    NoLayers { field: String },
}

/// When cradle starts a process again after it exits (Docker's `--restart`). A process
/// stopped or killed through the Docker API, or by the pod's shutdown, is not restarted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RestartPolicy {
    /// `"no"`: never (the default).
    #[default]
    No,
    /// `"on-failure"` or `"on-failure:N"`: after a non-zero exit, at most N times.
    OnFailure { max: Option<u32> },
    /// `"always"`: after every exit.
    Always,
}

impl RestartPolicy {
    /// Whether a process that exited with Docker exit code `code` after `restarts`
    /// restarts is started again.
    pub fn restarts(self, code: i32, restarts: u32) -> bool {
        match self {
            Self::No => false,
            Self::Always => true,
            Self::OnFailure { max } => code != 0 && max.is_none_or(|max| restarts < max),
        }
    }

    /// Docker's name and maximum retry count, for `docker inspect`.
    pub fn docker(self) -> (&'static str, u32) {
        match self {
            Self::No => ("no", 0),
            Self::OnFailure { max } => ("on-failure", max.unwrap_or(0)),
            Self::Always => ("always", 0),
        }
    }
}

impl Serialize for RestartPolicy {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::OnFailure { max: Some(max) } => {
                serializer.serialize_str(&format!("on-failure:{max}"))
            }
            other => serializer.serialize_str(other.docker().0),
        }
    }
}

impl<'de> Deserialize<'de> for RestartPolicy {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        match text.as_str() {
            "no" => Ok(Self::No),
            "always" => Ok(Self::Always),
            "on-failure" => Ok(Self::OnFailure { max: None }),
            other => other
                .strip_prefix("on-failure:")
                .and_then(|n| n.parse().ok())
                .map(|max| Self::OnFailure { max: Some(max) })
                .ok_or_else(|| {
                    serde::de::Error::custom(format!(
                        "{other:?} is not a restart policy; use \"no\", \"on-failure\", \"on-failure:N\" or \"always\""
                    ))
                }),
        }
    }
}

/// A volume or virtio-fs filesystem of the pod bind-mounted into a container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MountSpec {
    /// The name of a volume with a `path`, or the tag of a filesystem.
    pub source: String,
    /// Absolute path in the container; not `/` nor inside /proc, /sys or /dev.
    pub path: String,
    #[serde(default, skip_serializing_if = "is_false")]
    pub readonly: bool,
}

fn is_false(value: &bool) -> bool {
    !*value
}

/// One layer on the layer disk: bytes `offset..offset+size` are the layer's erofs image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerSpec {
    /// The layer's uncompressed digest (`sha256:...`), its name in the table.
    pub diff_id: String,
    /// Byte offset on the layer disk, a multiple of [`LAYER_ALIGN`].
    pub offset: u64,
    /// Bytes of the erofs image.
    pub size: u64,
}

/// The parts of an OCI image config (`config` of the image config JSON) a process uses.
/// `None` and empty differ as in Docker: an absent Cmd is not `[]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// An image the host resolved for the pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageSpec {
    /// The manifest digest the reference resolved to (`sha256:...`).
    pub digest: String,
    /// The layers' diffIDs, lowest first; each is in the pod's layer table.
    pub layers: Vec<String>,
    #[serde(default)]
    pub config: ImageConfig,
}

/// The host's part of a spec with images: the layer disk's table and each reference's
/// image. Empty for a pod without images.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResolvedImages {
    /// The layer disk's table, in disk order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<LayerSpec>,
    /// Keyed by the reference processes give in `image`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub images: BTreeMap<String, ImageSpec>,
}

impl ResolvedImages {
    pub fn is_empty(&self) -> bool {
        self.layers.is_empty() && self.images.is_empty()
    }

    /// Checks the table (digests, alignment, order) and that every image's layers are in
    /// it. `at` is the field holding `self` (`resolved`).
    pub fn validate(&self, at: &str) -> Result<(), ContainerSpecError> {
        let mut end = 0u64;
        for (index, layer) in self.layers.iter().enumerate() {
            let field = format!("{at}.layers[{index}]");
            check_digest(&format!("{field}.diff_id"), &layer.diff_id)?;
            if layer.offset % LAYER_ALIGN != 0 || layer.offset < end {
                return Err(ContainerSpecError::BadLayerOffset {
                    field,
                    diff_id: layer.diff_id.clone(),
                    offset: layer.offset,
                });
            }
            end = layer.offset.saturating_add(layer.size);
        }
        for (reference, image) in &self.images {
            let field = format!("{at}.images[{reference:?}]");
            check_digest(&format!("{field}.digest"), &image.digest)?;
            if image.layers.is_empty() {
                return Err(ContainerSpecError::NoLayers { field });
            }
            if image.layers.len() > MAX_IMAGE_LAYERS {
                return Err(ContainerSpecError::TooManyLayers {
                    field,
                    count: image.layers.len(),
                });
            }
            for diff_id in &image.layers {
                if self.layer(diff_id).is_none() {
                    return Err(ContainerSpecError::UnknownLayer {
                        field: format!("{field}.layers"),
                        diff_id: diff_id.clone(),
                    });
                }
            }
        }
        Ok(())
    }

    /// The table entry of `diff_id`.
    pub fn layer(&self, diff_id: &str) -> Option<&LayerSpec> {
        self.layers.iter().find(|l| l.diff_id == diff_id)
    }
}

/// `sha256:` and 64 lowercase hex digits.
fn check_digest(field: &str, value: &str) -> Result<(), ContainerSpecError> {
    let ok = value.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    });
    if ok {
        Ok(())
    } else {
        Err(ContainerSpecError::BadDigest {
            field: field.to_owned(),
            value: value.to_owned(),
        })
    }
}

/// What a process of an image runs with, after Docker's rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EffectiveCommand {
    /// `entrypoint` followed by `cmd`.
    pub argv: Vec<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// `NAME=VALUE`, image first, names unique.
    pub env: Vec<String>,
    pub cwd: String,
    /// As written (`name`, `uid`, `name:group`, `uid:gid`); resolved in the image's root.
    pub user: String,
}

/// The process's own settings that override its image's config.
#[derive(Debug, Clone, Copy)]
pub struct Overrides<'a> {
    /// `argv` of the spec: replaces the image's Cmd when not empty.
    pub argv: &'a [String],
    /// Replaces the image's Entrypoint (`Some([])` removes it) and drops the image's Cmd.
    pub entrypoint: Option<&'a [String]>,
    /// Merged over the image's Env by name; the spec wins.
    pub env: &'a [String],
    pub cwd: Option<&'a str>,
    pub user: Option<&'a str>,
}

/// Docker's rules (`docker run --entrypoint E IMAGE ARGS... -e -w -u`):
/// - argv is Entrypoint followed by Cmd. A given `entrypoint` replaces the image's and
///   resets the image's Cmd (as `--entrypoint` does); a non-empty `argv` replaces Cmd.
/// - Env: the image's, then the spec's, a later NAME replacing an earlier one in place;
///   PATH defaults to [`DEFAULT_IMAGE_PATH`].
/// - Working directory: the spec's, else the image's WorkingDir, else `/`.
/// - User: the spec's, else the image's User, else root (`0`).
///
/// `field` names the process (`processes[0]`) in the error.
pub fn effective_command(
    field: &str,
    image: &ImageConfig,
    spec: Overrides<'_>,
) -> Result<EffectiveCommand, ContainerSpecError> {
    let entrypoint: &[String] = match spec.entrypoint {
        Some(entrypoint) => entrypoint,
        None => image.entrypoint.as_deref().unwrap_or(&[]),
    };
    let cmd: &[String] = if !spec.argv.is_empty() {
        spec.argv
    } else if spec.entrypoint.is_some() {
        &[]
    } else {
        image.cmd.as_deref().unwrap_or(&[])
    };
    let argv: Vec<String> = entrypoint.iter().chain(cmd).cloned().collect();
    if argv.first().is_none_or(String::is_empty) {
        return Err(ContainerSpecError::NoCommand {
            field: format!("{field}.argv"),
        });
    }
    let mut env = merge_env(&image.env, spec.env);
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.insert(0, format!("PATH={DEFAULT_IMAGE_PATH}"));
    }
    let cwd = spec
        .cwd
        .map(str::to_owned)
        .or_else(|| image.working_dir.clone().filter(|d| !d.is_empty()))
        .unwrap_or_else(|| "/".to_owned());
    let user = spec
        .user
        .map(str::to_owned)
        .or_else(|| image.user.clone().filter(|u| !u.is_empty()))
        .unwrap_or_else(|| "0".to_owned());
    Ok(EffectiveCommand {
        argv,
        entrypoint: entrypoint.to_vec(),
        cmd: cmd.to_vec(),
        env,
        cwd,
        user,
    })
}

/// `base` with each entry of `over` replacing the entry of the same NAME, or appended.
/// Entries without `=` are kept as they are (Docker passes them through).
pub fn merge_env(base: &[String], over: &[String]) -> Vec<String> {
    let name = |entry: &str| entry.split_once('=').map_or(entry, |(n, _)| n).to_owned();
    let mut out: Vec<String> = Vec::with_capacity(base.len() + over.len());
    for entry in base.iter().chain(over) {
        let key = name(entry);
        match out.iter_mut().find(|e| name(e) == key) {
            Some(slot) => slot.clone_from(entry),
            None => out.push(entry.clone()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    fn image() -> ImageConfig {
        ImageConfig {
            entrypoint: Some(strings(&["/entry"])),
            cmd: Some(strings(&["--serve"])),
            env: strings(&["PATH=/img/bin", "A=1", "B=2"]),
            working_dir: Some("/srv".into()),
            user: Some("app".into()),
        }
    }

    fn none<'a>() -> Overrides<'a> {
        Overrides {
            argv: &[],
            entrypoint: None,
            env: &[],
            cwd: None,
            user: None,
        }
    }

    #[test]
    fn image_defaults_apply_without_overrides() {
        let eff = effective_command("p", &image(), none()).unwrap();
        assert_eq!(eff.argv, ["/entry", "--serve"]);
        assert_eq!(eff.env, ["PATH=/img/bin", "A=1", "B=2"]);
        assert_eq!((eff.cwd.as_str(), eff.user.as_str()), ("/srv", "app"));
    }

    #[test]
    fn argv_replaces_cmd_and_keeps_entrypoint() {
        let argv = strings(&["--debug"]);
        let eff = effective_command(
            "p",
            &image(),
            Overrides {
                argv: &argv,
                ..none()
            },
        )
        .unwrap();
        assert_eq!(eff.argv, ["/entry", "--debug"]);
    }

    #[test]
    fn entrypoint_override_drops_image_cmd() {
        let ep = strings(&["/bin/sh"]);
        let eff = effective_command(
            "p",
            &image(),
            Overrides {
                entrypoint: Some(&ep),
                ..none()
            },
        )
        .unwrap();
        assert_eq!(eff.argv, ["/bin/sh"]);
    }

    #[test]
    fn empty_entrypoint_with_argv_runs_argv() {
        let argv = strings(&["/bin/echo", "hi"]);
        let eff = effective_command(
            "p",
            &image(),
            Overrides {
                argv: &argv,
                entrypoint: Some(&[]),
                ..none()
            },
        )
        .unwrap();
        assert_eq!(eff.argv, ["/bin/echo", "hi"]);
    }

    #[test]
    fn no_command_at_all_is_an_error_naming_argv() {
        let err = effective_command("processes[1]", &ImageConfig::default(), none()).unwrap_err();
        assert_eq!(
            err,
            ContainerSpecError::NoCommand {
                field: "processes[1].argv".into()
            }
        );
        assert!(err.to_string().contains("add argv"));
    }

    #[test]
    fn env_merges_by_name_spec_wins_and_path_defaults() {
        let env = strings(&["B=spec", "C=3"]);
        let eff = effective_command(
            "p",
            &image(),
            Overrides {
                env: &env,
                ..none()
            },
        )
        .unwrap();
        assert_eq!(eff.env, ["PATH=/img/bin", "A=1", "B=spec", "C=3"]);

        let bare = ImageConfig {
            cmd: Some(strings(&["sh"])),
            ..ImageConfig::default()
        };
        let eff = effective_command("p", &bare, none()).unwrap();
        assert_eq!(eff.env, [format!("PATH={DEFAULT_IMAGE_PATH}")]);
        assert_eq!((eff.cwd.as_str(), eff.user.as_str()), ("/", "0"));
    }

    #[test]
    fn cwd_and_user_overrides_win() {
        let eff = effective_command(
            "p",
            &image(),
            Overrides {
                cwd: Some("/tmp"),
                user: Some("1000:1000"),
                ..none()
            },
        )
        .unwrap();
        assert_eq!((eff.cwd.as_str(), eff.user.as_str()), ("/tmp", "1000:1000"));
    }

    fn digest(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    fn resolved() -> ResolvedImages {
        ResolvedImages {
            layers: vec![
                LayerSpec {
                    diff_id: digest('a'),
                    offset: 0,
                    size: 8192,
                },
                LayerSpec {
                    diff_id: digest('b'),
                    offset: 8192,
                    size: 100,
                },
            ],
            images: BTreeMap::from([(
                "busybox".to_owned(),
                ImageSpec {
                    digest: digest('c'),
                    layers: vec![digest('a'), digest('b')],
                    config: ImageConfig::default(),
                },
            )]),
        }
    }

    #[test]
    fn resolved_images_validate() {
        resolved().validate("resolved").unwrap();
    }

    #[test]
    fn misaligned_or_overlapping_layers_are_refused() {
        let mut r = resolved();
        r.layers[1].offset = 4096;
        assert!(matches!(
            r.validate("resolved"),
            Err(ContainerSpecError::BadLayerOffset { .. })
        ));
        r.layers[1].offset = 8193;
        assert!(matches!(
            r.validate("resolved"),
            Err(ContainerSpecError::BadLayerOffset { .. })
        ));
    }

    #[test]
    fn image_layer_missing_from_table_is_refused() {
        let mut r = resolved();
        r.layers.pop();
        let err = r.validate("resolved").unwrap_err();
        assert!(
            matches!(err, ContainerSpecError::UnknownLayer { .. }),
            "{err}"
        );
    }

    #[test]
    fn bad_digest_is_named() {
        let mut r = resolved();
        r.layers[0].diff_id = "sha256:XYZ".into();
        let err = r.validate("resolved").unwrap_err();
        assert!(
            err.to_string().starts_with("resolved.layers[0].diff_id"),
            "{err}"
        );
    }

    #[test]
    fn restart_policies_follow_docker() {
        let parse = |t: &str| serde_json::from_str::<RestartPolicy>(t);
        assert_eq!(
            parse("\"on-failure:2\"").unwrap(),
            RestartPolicy::OnFailure { max: Some(2) }
        );
        assert!(parse("\"sometimes\"")
            .unwrap_err()
            .to_string()
            .contains("on-failure:N"));
        let twice = RestartPolicy::OnFailure { max: Some(2) };
        assert!(twice.restarts(1, 0) && twice.restarts(1, 1) && !twice.restarts(1, 2));
        assert!(!twice.restarts(0, 0));
        assert!(RestartPolicy::Always.restarts(0, 99));
        assert!(!RestartPolicy::No.restarts(1, 0));
        assert_eq!(serde_json::to_string(&twice).unwrap(), "\"on-failure:2\"");
    }
}
