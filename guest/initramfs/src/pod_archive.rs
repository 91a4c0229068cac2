//! The pod archive: a second newc archive the VMM appends to the initramfs
//! in guest memory, holding the pod spec at [`POD_SPEC_GUEST_PATH`]. The
//! kernel unpacks concatenated archives in order, later entries over
//! earlier ones (Documentation/driver-api/early-userspace/buffer-format.rst),
//! so one prebuilt initramfs serves every pod.
//!
//! The archive must start at a 4-byte aligned offset of the whole image:
//! pad the first archive with NUL bytes up to a multiple of 4 if it does not
//! end aligned (archives written by [`crate::Archive`] do); the kernel skips
//! NUL padding between archives.

use thiserror::Error;

use crate::cpio::{Archive, CpioError};
use crate::podspec::{PodSpec, PodSpecError, POD_SPEC_GUEST_PATH};

/// Mode of `/etc` and `/etc/cradle`.
const DIR_MODE: u32 = 0o755;
/// Mode of the spec file: root may read and write it, others read.
const SPEC_MODE: u32 = 0o644;

/// Errors of building the pod archive.
#[derive(Debug, Error)]
pub enum PodArchiveError {
    #[error("invalid pod spec")]
    Spec(#[from] PodSpecError),
    #[error("cannot write the pod archive")]
    Archive(#[from] CpioError),
}

/// Validates `spec_json` as a [`PodSpec`] and returns a newc archive with
/// `etc/`, `etc/cradle/` and `etc/cradle/pod.json` (the bytes as given),
/// ending with the trailer, 4-byte aligned.
pub fn pod_archive(spec_json: &[u8]) -> Result<Vec<u8>, PodArchiveError> {
    PodSpec::from_json(spec_json)?;
    let mut archive = Archive::new(Vec::with_capacity(spec_json.len() + 512));
    archive.add_dir("etc", DIR_MODE)?;
    archive.add_dir("etc/cradle", DIR_MODE)?;
    archive.add_file(POD_SPEC_GUEST_PATH, SPEC_MODE, spec_json)?;
    Ok(archive.finish()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpio::{parse_entries, HEADER_BYTES};

    const SPEC: &[u8] = br#"{"name": "web", "volumes": [{"name": "data", "path": "/data"}]}"#;

    #[test]
    fn pod_archive_holds_etc_cradle_pod_json_then_the_trailer() {
        let bytes = pod_archive(SPEC).unwrap();

        let entries = parse_entries(&bytes);
        let layout: Vec<(&str, u32)> = entries.iter().map(|e| (e.0.as_str(), e.1)).collect();
        assert_eq!(
            layout,
            [
                ("etc", 0o040_755),
                ("etc/cradle", 0o040_755),
                ("etc/cradle/pod.json", 0o100_644),
                ("TRAILER!!!", 0),
            ]
        );
        assert_eq!(entries[2].2, SPEC);
    }

    #[test]
    fn pod_archive_ends_four_byte_aligned() {
        // 61 bytes of JSON: the data needs padding.
        let json = br#"{"name": "abc", "processes": [{"name": "m", "argv": ["x"]}]}"#;

        let bytes = pod_archive(json).unwrap();

        assert_eq!(bytes.len() % 4, 0);
        assert_eq!(&bytes[..6], b"070701");
    }

    #[test]
    fn pod_archive_appended_to_an_image_parses_as_two_archives() {
        let mut image = Archive::new(Vec::new());
        image.add_file("init", 0o755, b"cradle").unwrap();
        let mut image = image.finish().unwrap();

        image.extend_from_slice(&pod_archive(SPEC).unwrap());

        let names: Vec<String> = parse_entries(&image).into_iter().map(|e| e.0).collect();
        assert_eq!(
            names,
            [
                "init",
                "TRAILER!!!",
                "etc",
                "etc/cradle",
                "etc/cradle/pod.json",
                "TRAILER!!!"
            ]
        );
    }

    #[test]
    fn pod_archive_is_deterministic() {
        assert_eq!(pod_archive(SPEC).unwrap(), pod_archive(SPEC).unwrap());
    }

    #[test]
    fn pod_archive_invalid_spec_is_a_spec_error() {
        let error = pod_archive(br#"{"name": "web", "volumes": [{"name": "Data"}]}"#).unwrap_err();

        assert!(matches!(
            error,
            PodArchiveError::Spec(PodSpecError::InvalidName { .. })
        ));
    }

    #[test]
    fn pod_archive_first_header_is_the_etc_directory() {
        let bytes = pod_archive(SPEC).unwrap();

        // 110-byte header then "etc\0", padded to 116.
        assert_eq!(&bytes[HEADER_BYTES..HEADER_BYTES + 4], b"etc\0");
    }
}
