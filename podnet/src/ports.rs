//! Published ports: `"8080:80/tcp"` (host port 8080 to the pod's port 80), `"53/udp"`
//! (the same port on both sides); the protocol defaults to tcp.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A transport protocol a port is published for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// nftables' and the launch file's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }
}

/// One published port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PortMap {
    pub host: u16,
    pub pod: u16,
    pub protocol: Protocol,
}

/// Why a port does not parse; the caller names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortError {
    #[error("not HOSTPORT:PODPORT[/tcp|/udp] or PORT[/tcp|/udp], like \"8080:80/tcp\"")]
    Syntax,
    #[error("{0:?} is not a port number from 1 to 65535")]
    BadPort(String),
    #[error("{0:?} is not a protocol; use tcp or udp")]
    BadProtocol(String),
}

fn port(text: &str) -> Result<u16, PortError> {
    text.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| PortError::BadPort(text.to_string()))
}

impl FromStr for PortMap {
    type Err = PortError;
    fn from_str(text: &str) -> Result<Self, PortError> {
        let (ports, protocol) = match text.split_once('/') {
            Some((ports, "tcp")) => (ports, Protocol::Tcp),
            Some((ports, "udp")) => (ports, Protocol::Udp),
            Some((_, other)) => return Err(PortError::BadProtocol(other.to_string())),
            None => (text, Protocol::Tcp),
        };
        let (host, pod) = match ports.split_once(':') {
            Some((host, pod)) => (port(host)?, port(pod)?),
            None if ports.is_empty() => return Err(PortError::Syntax),
            None => (port(ports)?, port(ports)?),
        };
        Ok(Self {
            host,
            pod,
            protocol,
        })
    }
}

impl fmt::Display for PortMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.host, self.pod, self.protocol.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_form_parses() {
        assert_eq!(
            "8080:80/tcp".parse(),
            Ok(PortMap {
                host: 8080,
                pod: 80,
                protocol: Protocol::Tcp
            })
        );
        assert_eq!(
            "5353:53/udp".parse::<PortMap>().map(|p| p.protocol),
            Ok(Protocol::Udp)
        );
    }

    #[test]
    fn short_forms_default_to_tcp_and_the_same_port() {
        let p: PortMap = "443".parse().unwrap();
        assert_eq!((p.host, p.pod, p.protocol), (443, 443, Protocol::Tcp));
        assert_eq!(
            "8080:80".parse::<PortMap>().unwrap().to_string(),
            "8080:80/tcp"
        );
    }

    #[test]
    fn bad_ports_are_named() {
        assert_eq!(
            "0:80".parse::<PortMap>(),
            Err(PortError::BadPort("0".into()))
        );
        assert_eq!(
            "8080:70000".parse::<PortMap>(),
            Err(PortError::BadPort("70000".into()))
        );
        assert_eq!(
            "80/sctp".parse::<PortMap>(),
            Err(PortError::BadProtocol("sctp".into()))
        );
        assert_eq!("/tcp".parse::<PortMap>(), Err(PortError::Syntax));
        assert!("a:b:c".parse::<PortMap>().is_err());
    }
}
