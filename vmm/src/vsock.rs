//! Turns a `--vsock` into a virtio-vsock device.

use devices::virtio::vsock::{Vsock, VsockConfig as DeviceConfig, VsockError};

use crate::config::VsockConfig;

/// Listens on the socket path and builds the device (not yet on the bus).
pub fn create(vsock: &VsockConfig) -> Result<Vsock, VsockError> {
    Vsock::new(DeviceConfig {
        guest_cid: u64::from(vsock.cid),
        socket: vsock.socket.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_vsock;

    #[test]
    fn create_listens_on_socket_path() {
        let path = std::env::temp_dir().join(format!("crib-vmm-vsock-{}.sock", std::process::id()));
        let config = parse_vsock(&format!("cid=3,socket={}", path.display())).unwrap();

        let device = create(&config).unwrap();

        assert_eq!(device.config().guest_cid, 3);
        assert!(std::os::unix::net::UnixStream::connect(&path).is_ok());
    }

    #[test]
    fn create_on_a_regular_file_names_it() {
        let path = std::env::temp_dir().join(format!("crib-vmm-vsock-file-{}", std::process::id()));
        std::fs::write(&path, b"").unwrap();
        let config = parse_vsock(&format!("cid=3,socket={}", path.display())).unwrap();

        let err = create(&config).err().unwrap().to_string();

        std::fs::remove_file(&path).unwrap();
        assert!(err.contains("is not a socket"), "{err}");
    }
}
