//! A registry's manifests, read as hostile input: an OCI image manifest or Docker schema 2
//! manifest (image-spec `manifest.md`, Docker "Image Manifest V 2, Schema 2"), or an OCI
//! index / Docker manifest list resolved to one platform (image-spec `image-index.md`).
//! Every problem names the JSON field (`layers[1].digest`); nothing here panics.

use oci_spec::image::{Descriptor, ImageIndex, ImageManifest};
use serde::Deserialize;

/// Manifest media types crib accepts, in the order of its `Accept` header.
pub const ACCEPTED_MANIFEST_TYPES: &[&str] = &[
    OCI_MANIFEST,
    OCI_INDEX,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
];
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

/// Layer media types the store converts: tar, tar+gzip, tar+zstd, OCI and Docker names.
const LAYER_TYPES: &[&str] = &[
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar.zstd",
];

/// Layers a registry does not serve ("non-distributable": fetched from `urls` elsewhere).
const FOREIGN_LAYER_TYPES: &[&str] = &[
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.foreign.diff.tar",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
];

/// What is wrong with a manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ManifestProblem {
    /// Not the JSON the spec describes: `field` is the JSON path, `detail` serde's words.
    Malformed { field: String, detail: String },
    /// A media type crib cannot use, at `field`.
    UnsupportedMediaType { field: String, media_type: String },
    /// A non-distributable layer, at `field`.
    ForeignLayer { field: String, media_type: String },
    /// An index with no entry for the platform; `available` lists what it has.
    NoPlatform { wanted: String, available: String },
}

fn malformed(field: &str, detail: impl Into<String>) -> ManifestProblem {
    ManifestProblem::Malformed {
        field: field.to_owned(),
        detail: detail.into(),
    }
}

/// A manifest as the registry sent it.
#[derive(Debug)]
pub enum Manifest {
    /// One platform's image.
    Image(Box<ImageManifest>),
    /// An index (manifest list) of images.
    Index(Box<ImageIndex>),
}

/// The fields every manifest has, read first to know which one this is.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Versioned {
    schema_version: serde_json::Value,
    media_type: Option<String>,
    manifests: Option<serde::de::IgnoredAny>,
}

/// Deserializes `bytes` as `T`, naming the field of the first error.
fn deserialize<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ManifestProblem> {
    let mut json = serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(&mut json).map_err(|e| {
        let field = e.path().to_string();
        let field = if field == "." {
            "(document)".into()
        } else {
            field
        };
        // serde_json's own text ends with "at line L column C": keep it, it locates the
        // problem in the body.
        malformed(&field, e.into_inner().to_string())
    })
}

/// Parses a manifest the registry returned with `Content-Type: content_type`.
pub fn parse(bytes: &[u8], content_type: Option<&str>) -> Result<Manifest, ManifestProblem> {
    let versioned: Versioned = deserialize(bytes)?;
    if versioned.schema_version != serde_json::json!(2) {
        return Err(malformed(
            "schemaVersion",
            format!(
                "{} (crib reads schema 2: OCI or Docker v2 manifests)",
                versioned.schema_version
            ),
        ));
    }
    let media_type = versioned
        .media_type
        .as_deref()
        .or(content_type.filter(|t| ACCEPTED_MANIFEST_TYPES.contains(t)));
    let is_index = match media_type {
        Some(OCI_INDEX | DOCKER_MANIFEST_LIST) => true,
        Some(OCI_MANIFEST | DOCKER_MANIFEST) => false,
        Some(other) => {
            return Err(ManifestProblem::UnsupportedMediaType {
                field: "mediaType".into(),
                media_type: other.to_owned(),
            })
        }
        // The OCI spec makes mediaType optional: an index has `manifests`.
        None => versioned.manifests.is_some(),
    };
    if is_index {
        Ok(Manifest::Index(Box::new(deserialize(bytes)?)))
    } else {
        let manifest: ImageManifest = deserialize(bytes)?;
        check_image(&manifest)?;
        Ok(Manifest::Image(Box::new(manifest)))
    }
}

/// The manifest's own media type, for the layout's index.json.
pub fn media_type(bytes: &[u8], content_type: Option<&str>) -> &'static str {
    let declared = serde_json::from_slice::<Versioned>(bytes)
        .ok()
        .and_then(|v| v.media_type)
        .or(content_type.map(str::to_owned));
    match declared.as_deref() {
        Some(DOCKER_MANIFEST) => DOCKER_MANIFEST,
        _ => OCI_MANIFEST,
    }
}

/// A digest crib can name a file by: `sha256:` and 64 lowercase hex digits.
pub fn check_digest(field: &str, digest: &str) -> Result<(), ManifestProblem> {
    let ok = digest.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    });
    if ok {
        Ok(())
    } else {
        Err(malformed(
            field,
            format!("{digest:?} is not a sha256 digest (sha256: and 64 lowercase hex digits)"),
        ))
    }
}

/// The most layers an image may have (Docker's overlay2 stops at 125): more is a hostile
/// manifest asking for that many requests and disks.
pub const MAX_LAYERS: usize = 256;

fn check_image(manifest: &ImageManifest) -> Result<(), ManifestProblem> {
    if manifest.layers().len() > MAX_LAYERS {
        return Err(malformed(
            "layers",
            format!(
                "{} layers; crib takes at most {MAX_LAYERS}",
                manifest.layers().len()
            ),
        ));
    }
    let config = manifest.config();
    let config_type = config.media_type().to_string();
    if config_type != OCI_CONFIG && config_type != DOCKER_CONFIG {
        return Err(ManifestProblem::UnsupportedMediaType {
            field: "config.mediaType".into(),
            media_type: config_type,
        });
    }
    check_digest("config.digest", config.digest().as_ref())?;
    if config.size() > crate::layout::MAX_CONFIG_BYTES {
        return Err(malformed(
            "config.size",
            format!(
                "{} bytes; the store reads configs of at most {}",
                config.size(),
                crate::layout::MAX_CONFIG_BYTES
            ),
        ));
    }
    for (i, layer) in manifest.layers().iter().enumerate() {
        check_layer(i, layer)?;
    }
    Ok(())
}

fn check_layer(i: usize, layer: &Descriptor) -> Result<(), ManifestProblem> {
    let media_type = layer.media_type().to_string();
    if FOREIGN_LAYER_TYPES.contains(&media_type.as_str())
        || layer.urls().as_ref().is_some_and(|urls| !urls.is_empty())
    {
        return Err(ManifestProblem::ForeignLayer {
            field: format!("layers[{i}]"),
            media_type,
        });
    }
    if !LAYER_TYPES.contains(&media_type.as_str()) {
        return Err(ManifestProblem::UnsupportedMediaType {
            field: format!("layers[{i}].mediaType"),
            media_type,
        });
    }
    check_digest(&format!("layers[{i}].digest"), layer.digest().as_ref())
}

/// A platform as `--platform` gives it: `os/arch[/variant]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Default for Platform {
    fn default() -> Self {
        Platform {
            os: "linux".into(),
            architecture: "amd64".into(),
            variant: None,
        }
    }
}

impl std::str::FromStr for Platform {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split('/').collect();
        match parts.as_slice() {
            [os, arch] | [os, arch, _] if !os.is_empty() && !arch.is_empty() => Ok(Platform {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: parts.get(2).map(|v| v.to_string()),
            }),
            _ => Err(format!(
                "{s:?} is not a platform: give OS/ARCH[/VARIANT], as linux/amd64"
            )),
        }
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(variant) = &self.variant {
            write!(f, "/{variant}")?;
        }
        Ok(())
    }
}

/// The digest of `platform`'s manifest in `index`: the first entry whose os and
/// architecture (and variant, when asked for) match.
pub fn select(index: &ImageIndex, platform: &Platform) -> Result<String, ManifestProblem> {
    let mut available = vec![];
    for (i, entry) in index.manifests().iter().enumerate() {
        let Some(p) = entry.platform() else {
            continue;
        };
        let (os, arch) = (p.os().to_string(), p.architecture().to_string());
        let variant = p.variant().clone();
        let matches = os == platform.os
            && arch == platform.architecture
            && (platform.variant.is_none() || variant == platform.variant);
        if matches {
            let digest = entry.digest().to_string();
            check_digest(&format!("manifests[{i}].digest"), &digest)?;
            let media_type = entry.media_type().to_string();
            if media_type != OCI_MANIFEST && media_type != DOCKER_MANIFEST {
                return Err(ManifestProblem::UnsupportedMediaType {
                    field: format!("manifests[{i}].mediaType"),
                    media_type,
                });
            }
            return Ok(digest);
        }
        available.push(match variant {
            Some(v) => format!("{os}/{arch}/{v}"),
            None => format!("{os}/{arch}"),
        });
    }
    Err(ManifestProblem::NoPlatform {
        wanted: platform.to_string(),
        available: if available.is_empty() {
            "none".into()
        } else {
            available.join(", ")
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST_A: &str =
        "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const DIGEST_B: &str =
        "sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    fn image(layer_type: &str) -> String {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}",
            "config":{{"mediaType":"{OCI_CONFIG}","digest":"{DIGEST_A}","size":2}},
            "layers":[{{"mediaType":"{layer_type}","digest":"{DIGEST_B}","size":3}}]}}"#
        )
    }

    fn index(platforms: &[(&str, &str, &str)]) -> String {
        let entries: Vec<String> = platforms
            .iter()
            .map(|(os, arch, digest)| {
                format!(
                    r#"{{"mediaType":"{OCI_MANIFEST}","digest":"{digest}","size":5,
                    "platform":{{"os":"{os}","architecture":"{arch}"}}}}"#
                )
            })
            .collect();
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{}]}}"#,
            entries.join(",")
        )
    }

    #[test]
    fn parse_oci_gzip_image_is_an_image() {
        let parsed = parse(
            image("application/vnd.oci.image.layer.v1.tar+gzip").as_bytes(),
            None,
        );
        assert!(matches!(parsed, Ok(Manifest::Image(_))));
    }

    #[test]
    fn parse_docker_and_zstd_layers_are_accepted() {
        for t in LAYER_TYPES {
            assert!(parse(image(t).as_bytes(), None).is_ok(), "{t}");
        }
    }

    #[test]
    fn parse_foreign_layer_is_refused() {
        let parsed = parse(
            image("application/vnd.docker.image.rootfs.foreign.diff.tar.gzip").as_bytes(),
            None,
        );
        assert!(matches!(
            parsed,
            Err(ManifestProblem::ForeignLayer { field, .. }) if field == "layers[0]"
        ));
    }

    #[test]
    fn parse_unknown_layer_type_names_the_field() {
        let parsed = parse(image("application/x-tar").as_bytes(), None);
        assert!(matches!(
            parsed,
            Err(ManifestProblem::UnsupportedMediaType { field, .. }) if field == "layers[0].mediaType"
        ));
    }

    #[test]
    fn parse_missing_layers_names_the_field() {
        let text = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}",
            "config":{{"mediaType":"{OCI_CONFIG}","digest":"{DIGEST_A}","size":2}}}}"#
        );
        let problem = parse(text.as_bytes(), None).unwrap_err();
        let ManifestProblem::Malformed { detail, .. } = problem else {
            panic!("{problem:?}");
        };
        assert!(detail.contains("layers"), "{detail}");
    }

    #[test]
    fn parse_bad_size_names_the_field() {
        let text =
            image("application/vnd.oci.image.layer.v1.tar").replace("\"size\":3", "\"size\":-3");
        let problem = parse(text.as_bytes(), None).unwrap_err();
        assert!(
            matches!(&problem, ManifestProblem::Malformed { field, .. } if field == "layers[0].size"),
            "{problem:?}"
        );
    }

    #[test]
    fn parse_path_in_digest_is_refused() {
        let text = image("application/vnd.oci.image.layer.v1.tar")
            .replace(DIGEST_B, "sha256:../../../../etc/passwd");
        assert!(matches!(
            parse(text.as_bytes(), None),
            Err(ManifestProblem::Malformed { .. })
        ));
    }

    #[test]
    fn parse_too_many_layers_is_refused() {
        let layer = format!(
            r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{DIGEST_B}","size":3}}"#
        );
        let layers = vec![layer; MAX_LAYERS + 1].join(",");
        let text = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"{OCI_CONFIG}","digest":"{DIGEST_A}","size":2}},"layers":[{layers}]}}"#
        );
        let problem = parse(text.as_bytes(), None).unwrap_err();
        assert!(matches!(problem, ManifestProblem::Malformed { field, .. } if field == "layers"));
    }

    #[test]
    fn parse_huge_config_is_refused() {
        let text = image("application/vnd.oci.image.layer.v1.tar")
            .replace("\"size\":2", "\"size\":99999999999");
        let problem = parse(text.as_bytes(), None).unwrap_err();
        assert!(
            matches!(problem, ManifestProblem::Malformed { field, .. } if field == "config.size")
        );
    }

    #[test]
    fn parse_schema_1_is_refused() {
        let problem = parse(br#"{"schemaVersion":1,"name":"a"}"#, None).unwrap_err();
        assert!(
            matches!(problem, ManifestProblem::Malformed { field, .. } if field == "schemaVersion")
        );
    }

    #[test]
    fn parse_not_json_is_malformed() {
        assert!(matches!(
            parse(b"<html>", None),
            Err(ManifestProblem::Malformed { .. })
        ));
    }

    #[test]
    fn select_picks_linux_amd64() {
        let text = index(&[("linux", "arm64", DIGEST_A), ("linux", "amd64", DIGEST_B)]);
        let Ok(Manifest::Index(index)) = parse(text.as_bytes(), None) else {
            panic!("not an index");
        };
        assert_eq!(select(&index, &Platform::default()).unwrap(), DIGEST_B);
    }

    #[test]
    fn select_without_the_platform_lists_the_others() {
        let text = index(&[("linux", "arm64", DIGEST_A), ("windows", "amd64", DIGEST_B)]);
        let Ok(Manifest::Index(index)) = parse(text.as_bytes(), None) else {
            panic!("not an index");
        };
        assert_eq!(
            select(&index, &Platform::default()).unwrap_err(),
            ManifestProblem::NoPlatform {
                wanted: "linux/amd64".into(),
                available: "linux/arm64, windows/amd64".into()
            }
        );
    }

    #[test]
    fn platform_parses_os_arch_variant() {
        let p: Platform = "linux/arm/v7".parse().unwrap();
        assert_eq!(p.variant.as_deref(), Some("v7"));
        assert!("linux".parse::<Platform>().is_err());
    }
}
