//! Registry credentials as the docker CLI stores them: `$DOCKER_CONFIG/config.json` or
//! `~/.docker/config.json`, `auths.<registry>.auth` (base64 `user:pass`), identity tokens
//! and credential helpers, read by the `docker_credential` crate. Without an entry the
//! pull is anonymous; oci-client then runs the bearer-token flow either way (a 401's
//! `WWW-Authenticate: Bearer realm=...` challenge, as Docker Hub sends).

use std::path::{Path, PathBuf};

use docker_credential::{CredentialRetrievalError, DockerCredential};
use oci_client::secrets::RegistryAuth;

use super::PullError;

/// The key the docker CLI files Docker Hub's credentials under.
const DOCKER_HUB_KEY: &str = "https://index.docker.io/v1/";

/// The docker CLI's config directory: `$DOCKER_CONFIG`, else `~/.docker`.
fn config_dir() -> Option<PathBuf> {
    std::env::var_os("DOCKER_CONFIG")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".docker")))
}

/// The credentials for `registry` (as written in the reference: `docker.io`,
/// `host:port`), or anonymous when there are none.
pub fn credentials(registry: &str) -> Result<RegistryAuth, PullError> {
    credentials_in(config_dir().as_deref(), registry)
}

/// [`credentials`] from the config.json in `dir`. (docker_credential reads the same
/// directory but hides it; crib names the file in its errors and tests can pick it.)
pub fn credentials_in(dir: Option<&Path>, registry: &str) -> Result<RegistryAuth, PullError> {
    let key = if registry == "docker.io" || registry == "index.docker.io" {
        DOCKER_HUB_KEY
    } else {
        registry
    };
    let Some(path) = dir.map(|d| d.join("config.json")) else {
        return Ok(RegistryAuth::Anonymous);
    };
    let Ok(file) = std::fs::File::open(&path) else {
        return Ok(RegistryAuth::Anonymous);
    };
    let found = docker_credential::get_credential_from_reader(std::io::BufReader::new(file), key);
    match found {
        Ok(DockerCredential::UsernamePassword(user, password)) => {
            Ok(RegistryAuth::Basic(user, password))
        }
        // An identity token is an OAuth refresh token for the token endpoint, which
        // oci-client's bearer flow does not send.
        Ok(DockerCredential::IdentityToken(_)) => Err(PullError::Credentials {
            registry: registry.to_owned(),
            path,
            reason: "it is an identity token, which crib cannot use".into(),
        }),
        Err(CredentialRetrievalError::NoCredentialConfigured) => Ok(RegistryAuth::Anonymous),
        Err(source) => Err(PullError::Credentials {
            registry: registry.to_owned(),
            path,
            reason: source.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), text).unwrap();
        dir
    }

    #[test]
    fn credentials_in_auths_entry_is_basic() {
        // "alice:s3cret"
        let dir = config(r#"{"auths":{"127.0.0.1:5000":{"auth":"YWxpY2U6czNjcmV0"}}}"#);

        let auth = credentials_in(Some(dir.path()), "127.0.0.1:5000").unwrap();

        assert!(matches!(auth, RegistryAuth::Basic(u, p) if u == "alice" && p == "s3cret"));
    }

    #[test]
    fn credentials_in_docker_hub_uses_the_index_key() {
        let dir =
            config(r#"{"auths":{"https://index.docker.io/v1/":{"auth":"YWxpY2U6czNjcmV0"}}}"#);

        let auth = credentials_in(Some(dir.path()), "docker.io").unwrap();

        assert!(matches!(auth, RegistryAuth::Basic(u, _) if u == "alice"));
    }

    #[test]
    fn credentials_in_other_registry_is_anonymous() {
        let dir = config(r#"{"auths":{"ghcr.io":{"auth":"YWxpY2U6czNjcmV0"}}}"#);

        let auth = credentials_in(Some(dir.path()), "127.0.0.1:5000").unwrap();

        assert!(matches!(auth, RegistryAuth::Anonymous));
    }

    #[test]
    fn credentials_in_no_config_is_anonymous() {
        let dir = tempfile::tempdir().unwrap();

        let auth = credentials_in(Some(dir.path()), "docker.io").unwrap();

        assert!(matches!(auth, RegistryAuth::Anonymous));
    }

    #[test]
    fn credentials_in_bad_base64_names_the_file() {
        let dir = config(r#"{"auths":{"127.0.0.1:5000":{"auth":"%%%"}}}"#);

        let error = credentials_in(Some(dir.path()), "127.0.0.1:5000").unwrap_err();

        assert!(error.to_string().contains("config.json"), "{error}");
    }
}
