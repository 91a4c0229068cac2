//! Image names (`NAME[:TAG]`) as the store keeps them in refs.json, and how a reference
//! given on the command line finds one: `busybox`, `busybox:latest`,
//! `docker.io/library/busybox:latest` all name the same image.

use std::collections::{BTreeMap, HashMap};

use crate::digest::Digest;
use crate::store::StoreError;

/// The index annotation holding a full image name (containerd, Docker 25+ archives).
pub const CONTAINERD_NAME: &str = "io.containerd.image.name";
/// The OCI annotation holding a tag or a full name.
pub const OCI_REF_NAME: &str = "org.opencontainers.image.ref.name";

/// `name` with `:latest` added when it has no tag or digest. Refuses empty names,
/// whitespace and control characters.
pub fn normalize(name: &str) -> Result<String, StoreError> {
    let bad = name.is_empty()
        || name.len() > 512
        || name.chars().any(|c| c.is_whitespace() || c.is_control())
        || name.starts_with(':')
        || name.ends_with(':')
        || name.ends_with('/');
    if bad {
        return Err(StoreError::BadName {
            name: name.to_string(),
        });
    }
    let last = name.rsplit('/').next().unwrap_or(name);
    if last.contains(':') || last.contains('@') {
        Ok(name.to_string())
    } else {
        Ok(format!("{name}:latest"))
    }
}

/// The form two names are compared in: normalized, without Docker Hub's implicit prefix.
fn canonical(name: &str) -> Option<String> {
    let name = normalize(name).ok()?;
    for prefix in [
        "docker.io/library/",
        "index.docker.io/library/",
        "docker.io/",
        "index.docker.io/",
    ] {
        if let Some(rest) = name.strip_prefix(prefix) {
            return Some(rest.to_string());
        }
    }
    Some(name)
}

/// The digest `reference` names in `refs`, if any.
pub fn find<'a>(refs: &'a BTreeMap<String, Digest>, reference: &str) -> Option<&'a Digest> {
    if let Some(digest) = refs.get(reference) {
        return Some(digest);
    }
    let wanted = canonical(reference)?;
    refs.iter()
        .find(|(name, _)| canonical(name).as_deref() == Some(wanted.as_str()))
        .map(|(_, digest)| digest)
}

/// The image's names from an index entry's annotations: the containerd name, or an OCI
/// ref.name that is a full name (a bare tag such as `latest` names nothing).
pub fn from_annotations(annotations: &HashMap<String, String>) -> Vec<String> {
    let full = annotations.get(CONTAINERD_NAME).or_else(|| {
        annotations
            .get(OCI_REF_NAME)
            .filter(|n| n.contains('/') || n.contains(':'))
    });
    full.and_then(|n| normalize(n).ok()).into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_untagged_adds_latest() {
        assert_eq!(normalize("busybox").unwrap(), "busybox:latest");
    }

    #[test]
    fn normalize_registry_port_is_not_a_tag() {
        assert_eq!(
            normalize("localhost:5000/app").unwrap(),
            "localhost:5000/app:latest"
        );
    }

    #[test]
    fn normalize_whitespace_is_refused() {
        assert!(normalize("bad name").is_err());
    }

    #[test]
    fn find_short_name_matches_docker_hub_name() {
        let digest = Digest::of(b"m");
        let refs = BTreeMap::from([(
            "docker.io/library/busybox:latest".to_string(),
            digest.clone(),
        )]);

        assert_eq!(find(&refs, "busybox"), Some(&digest));
    }

    #[test]
    fn from_annotations_bare_tag_names_nothing() {
        let annotations = HashMap::from([(OCI_REF_NAME.to_string(), "latest".to_string())]);

        assert!(from_annotations(&annotations).is_empty());
    }
}
