//! Registry credentials as the docker CLI stores them: `$DOCKER_CONFIG/config.json` or
//! `~/.docker/config.json`, `auths.<registry>.auth` (base64 `user:pass`), identity tokens
//! and credential helpers, read by the `docker_credential` crate. Without an entry the
//! pull is anonymous; oci-client then runs the bearer-token flow either way (a 401's
//! `WWW-Authenticate: Bearer realm=...` challenge, as Docker Hub sends).

use docker_credential::{CredentialRetrievalError, DockerCredential};
use oci_client::secrets::RegistryAuth;

use super::PullError;

/// The key the docker CLI files Docker Hub's credentials under.
const DOCKER_HUB_KEY: &str = "https://index.docker.io/v1/";

/// The credentials for `registry` (as written in the reference: `docker.io`,
/// `host:port`), or anonymous when there are none.
pub fn credentials(registry: &str) -> Result<RegistryAuth, PullError> {
    let key = if registry == "docker.io" || registry == "index.docker.io" {
        DOCKER_HUB_KEY
    } else {
        registry
    };
    match docker_credential::get_credential(key) {
        Ok(DockerCredential::UsernamePassword(user, password)) => {
            Ok(RegistryAuth::Basic(user, password))
        }
        // An identity token is an OAuth refresh token; oci-client only sends it as a
        // bearer token, which is what registries accepting it expect on the token
        // endpoint's behalf.
        Ok(DockerCredential::IdentityToken(token)) => Ok(RegistryAuth::Bearer(token)),
        Err(
            CredentialRetrievalError::ConfigNotFound
            | CredentialRetrievalError::ConfigReadError
            | CredentialRetrievalError::NoCredentialConfigured,
        ) => Ok(RegistryAuth::Anonymous),
        Err(source) => Err(PullError::Credentials {
            registry: registry.to_owned(),
            reason: source.to_string(),
        }),
    }
}
