//! Image references as Docker reads them (`busybox` is `docker.io/library/busybox:latest`,
//! parsed by oci-spec's `Reference`, the distribution/reference grammar) and which
//! registries may be spoken to in plain HTTP.

use std::net::IpAddr;

use oci_client::client::ClientProtocol;
use oci_client::Reference;

use super::PullError;

/// Parses `text` as Docker does: a missing registry is docker.io, a one-part Docker Hub
/// name is in `library/`, a missing tag is `latest`.
pub fn parse(text: &str) -> Result<Reference, PullError> {
    text.parse().map_err(|source| PullError::Reference {
        reference: text.to_owned(),
        source,
    })
}

/// Whether `registry` (`host[:port]`) is on this machine: 127.0.0.0/8, ::1 or localhost.
pub fn is_loopback(registry: &str) -> bool {
    let host = match registry.strip_prefix('[') {
        // [::1]:5000
        Some(rest) => rest.split(']').next().unwrap_or(rest),
        None => match registry.rsplit_once(':') {
            Some((host, port)) if !host.contains(':') && port.parse::<u16>().is_ok() => host,
            _ => registry,
        },
    };
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// HTTPS for every registry, except plain HTTP for a loopback one or, with `insecure`,
/// for this one.
pub fn protocol(reference: &Reference, insecure: bool) -> ClientProtocol {
    let registry = reference.resolve_registry();
    if insecure || is_loopback(registry) {
        ClientProtocol::HttpsExcept(vec![registry.to_owned()])
    } else {
        ClientProtocol::Https
    }
}

/// The host:port a connection goes to, for messages.
pub fn address(reference: &Reference, insecure: bool) -> String {
    let registry = reference.resolve_registry();
    if registry.contains(':') && !registry.ends_with(']') {
        registry.to_owned()
    } else if insecure || is_loopback(registry) {
        format!("{registry}:80")
    } else {
        format!("{registry}:443")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_short_name_defaults_to_docker_hub_library_latest() {
        let reference = parse("busybox").unwrap();
        assert_eq!(reference.whole(), "docker.io/library/busybox:latest");
        assert_eq!(reference.resolve_registry(), "index.docker.io");
    }

    #[test]
    fn parse_registry_with_port_keeps_it() {
        let reference = parse("127.0.0.1:5000/team/app:v1").unwrap();
        assert_eq!(reference.registry(), "127.0.0.1:5000");
        assert_eq!(reference.repository(), "team/app");
        assert_eq!(reference.tag(), Some("v1"));
    }

    #[test]
    fn parse_uppercase_name_is_an_error() {
        assert!(matches!(parse("Busybox"), Err(PullError::Reference { .. })));
    }

    #[test]
    fn is_loopback_accepts_loopback_addresses_and_localhost() {
        for registry in [
            "127.0.0.1:5000",
            "127.3.2.1",
            "localhost:5000",
            "[::1]:5000",
            "::1",
        ] {
            assert!(is_loopback(registry), "{registry}");
        }
    }

    #[test]
    fn is_loopback_refuses_other_hosts() {
        for registry in [
            "index.docker.io",
            "10.0.0.1:5000",
            "localhost.example.com",
            "[::2]:5000",
        ] {
            assert!(!is_loopback(registry), "{registry}");
        }
    }

    #[test]
    fn protocol_is_https_for_remote_registries() {
        let reference = parse("ghcr.io/a/b:c").unwrap();
        assert_eq!(protocol(&reference, false), ClientProtocol::Https);
    }

    #[test]
    fn protocol_is_http_for_loopback_or_insecure() {
        let local = parse("127.0.0.1:5000/a:b").unwrap();
        assert_eq!(
            protocol(&local, false),
            ClientProtocol::HttpsExcept(vec!["127.0.0.1:5000".into()])
        );
        let remote = parse("registry.example:5000/a:b").unwrap();
        assert_eq!(
            protocol(&remote, true),
            ClientProtocol::HttpsExcept(vec!["registry.example:5000".into()])
        );
    }
}
