//! The pod's network inside the guest: lo and eth0 configured over rtnetlink (no `ip`
//! binary), `/etc/resolv.conf` and `/etc/hosts` written, the hostname set. The
//! configuration is the pod spec's `network` (docs/NETWORK.md), which `crib pod run`
//! fills in from the address lease it took for the pod.

use std::ffi::CString;
use std::net::IpAddr;

use initramfs::podspec::{NetworkSpec, PodSpec};
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE,
    NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// The pod's one NIC (the virtio-net device crib attaches).
pub const POD_NIC: &str = "eth0";

/// Errors of configuring the network, each naming the step.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("cannot open a netlink socket")]
    Socket(#[source] std::io::Error),
    #[error("interface {0} does not exist: the VM has no virtio-net device (crib pod run adds one unless \"network\": \"none\")")]
    NoInterface(&'static str),
    #[error("the kernel refused to {step}")]
    Refused {
        step: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Brings lo up and, if the spec has a network, configures eth0 and writes the files.
pub fn configure(spec: Option<&PodSpec>) -> Result<(), NetworkError> {
    let mut nl = Netlink::open()?;
    let lo = index("lo").ok_or(NetworkError::NoInterface("lo"))?;
    nl.request("bring lo up", set_link(lo, None))?;
    let Some(spec) = spec else { return Ok(()) };
    let Some(net) = &spec.network else {
        return Ok(());
    };
    let eth = index(POD_NIC).ok_or(NetworkError::NoInterface(POD_NIC))?;
    nl.request("set eth0's MTU and bring it up", set_link(eth, net.mtu))?;
    if let Some((addr, len)) = net.ipv4() {
        nl.request(
            &format!("add {addr}/{len} to eth0"),
            new_address(eth, IpAddr::V4(addr), len),
        )?;
    }
    if let Some((addr, len)) = net.ipv6() {
        nl.request(
            &format!("add {addr}/{len} to eth0"),
            new_address(eth, IpAddr::V6(addr), len),
        )?;
    }
    if let Some(gw) = net.gateway.as_deref().and_then(|g| g.parse().ok()) {
        nl.request(
            &format!("add the default route via {gw}"),
            default_route(eth, RouteAddress::Inet(gw)),
        )?;
    }
    if let Some(gw) = net.gateway6.as_deref().and_then(|g| g.parse().ok()) {
        nl.request(
            &format!("add the IPv6 default route via {gw}"),
            default_route(eth, RouteAddress::Inet6(gw)),
        )?;
    }
    write_file("/etc/resolv.conf", &resolv_conf(net))?;
    write_file("/etc/hosts", &hosts(spec, net))?;
    if let Ok(name) = CString::new(spec.name.as_str()) {
        // SAFETY: sethostname reads `len` bytes from a valid C string we own.
        unsafe { libc::sethostname(name.as_ptr(), name.as_bytes().len()) };
    }
    Ok(())
}

fn write_file(path: &'static str, text: &str) -> Result<(), NetworkError> {
    let _ = std::fs::create_dir_all("/etc");
    std::fs::write(path, text).map_err(|source| NetworkError::Write { path, source })
}

/// `/etc/resolv.conf` for `net`.
pub fn resolv_conf(net: &NetworkSpec) -> String {
    let mut out = String::new();
    for ns in &net.nameservers {
        out.push_str(&format!("nameserver {ns}\n"));
    }
    if !net.search.is_empty() {
        out.push_str(&format!("search {}\n", net.search.join(" ")));
    }
    out
}

/// `/etc/hosts`: localhost, and the pod's name and its processes' names at its
/// addresses.
pub fn hosts(spec: &PodSpec, net: &NetworkSpec) -> String {
    let mut names = vec![spec.name.as_str()];
    names.extend(
        spec.processes
            .iter()
            .map(|p| p.name.as_str())
            .filter(|n| *n != spec.name),
    );
    let names = names.join(" ");
    let mut out = String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    if let Some((addr, _)) = net.ipv4() {
        out.push_str(&format!("{addr}\t{names}\n"));
    }
    if let Some((addr, _)) = net.ipv6() {
        out.push_str(&format!("{addr}\t{names}\n"));
    }
    out
}

fn index(name: &str) -> Option<u32> {
    let name = CString::new(name).ok()?;
    // SAFETY: if_nametoindex reads a valid C string we own.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

/// RTM_NEWLINK: up, and the MTU if given.
fn set_link(index: u32, mtu: Option<u32>) -> RouteNetlinkMessage {
    let mut msg = LinkMessage::default();
    msg.header.index = index;
    msg.header.flags = LinkFlags::Up;
    msg.header.change_mask = LinkFlags::Up;
    if let Some(mtu) = mtu {
        msg.attributes.push(LinkAttribute::Mtu(mtu));
    }
    RouteNetlinkMessage::SetLink(msg)
}

/// RTM_NEWADDR without duplicate address detection (the host's IPAM gave it).
fn new_address(index: u32, addr: IpAddr, prefix_len: u8) -> RouteNetlinkMessage {
    let mut msg = AddressMessage::default();
    msg.header.index = index;
    msg.header.prefix_len = prefix_len;
    msg.header.family = match addr {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    };
    msg.attributes.push(AddressAttribute::Local(addr));
    msg.attributes.push(AddressAttribute::Address(addr));
    if addr.is_ipv6() {
        msg.attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
    }
    RouteNetlinkMessage::NewAddress(msg)
}

/// RTM_NEWROUTE: the default route via `gateway` on `index`.
fn default_route(index: u32, gateway: RouteAddress) -> RouteNetlinkMessage {
    let mut msg = RouteMessage::default();
    msg.header.address_family = match gateway {
        RouteAddress::Inet6(_) => AddressFamily::Inet6,
        _ => AddressFamily::Inet,
    };
    msg.header.table = RouteHeader::RT_TABLE_MAIN;
    msg.header.protocol = RouteProtocol::Boot;
    msg.header.scope = RouteScope::Universe;
    msg.header.kind = RouteType::Unicast;
    msg.attributes.push(RouteAttribute::Gateway(gateway));
    msg.attributes.push(RouteAttribute::Oif(index));
    RouteNetlinkMessage::NewRoute(msg)
}

/// A NETLINK_ROUTE socket that sends one request at a time and waits for its ack.
struct Netlink {
    socket: Socket,
    seq: u32,
}

impl Netlink {
    fn open() -> Result<Self, NetworkError> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(NetworkError::Socket)?;
        socket.bind_auto().map_err(NetworkError::Socket)?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(NetworkError::Socket)?;
        Ok(Self { socket, seq: 0 })
    }

    fn request(&mut self, step: &str, message: RouteNetlinkMessage) -> Result<(), NetworkError> {
        let refused = |source| NetworkError::Refused {
            step: step.to_string(),
            source,
        };
        self.seq += 1;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE;
        header.sequence_number = self.seq;
        let mut msg = NetlinkMessage::new(header, NetlinkPayload::from(message));
        msg.finalize();
        let mut buf = vec![0u8; msg.buffer_len()];
        msg.serialize(&mut buf);
        self.socket.send(&buf, 0).map_err(refused)?;
        let mut reply = vec![0u8; 8192];
        loop {
            let n = self.socket.recv(&mut &mut reply[..], 0).map_err(refused)?;
            let mut offset = 0;
            while let Some(rest) = reply.get(offset..n).filter(|r| !r.is_empty()) {
                let Ok(answer) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(rest) else {
                    return Err(refused(std::io::Error::other("unreadable netlink reply")));
                };
                let len = answer.header.length as usize;
                if answer.header.sequence_number == self.seq {
                    if let NetlinkPayload::Error(e) = answer.payload {
                        return match e.code {
                            None => Ok(()),
                            Some(_) => Err(refused(e.to_io())),
                        };
                    }
                }
                if len == 0 {
                    break;
                }
                offset += len;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> PodSpec {
        PodSpec::from_json(
            br#"{"name": "web", "processes": [{"name": "httpd", "argv": ["httpd"]}],
                "network": {"address": "10.88.0.2/16", "gateway": "10.88.0.1",
                "address6": "fd63:7269:6200::2/64", "gateway6": "fd63:7269:6200::1",
                "nameservers": ["192.0.2.53"], "search": ["example.com"]}}"#,
        )
        .unwrap()
    }

    #[test]
    fn hosts_lists_localhost_the_pod_and_its_processes() {
        let spec = spec();
        let text = hosts(&spec, spec.network.as_ref().unwrap());
        assert!(text.starts_with("127.0.0.1\tlocalhost\n"), "{text}");
        assert!(text.contains("10.88.0.2\tweb httpd\n"), "{text}");
        assert!(text.contains("fd63:7269:6200::2\tweb httpd\n"), "{text}");
    }

    #[test]
    fn resolv_conf_has_nameservers_and_search() {
        let spec = spec();
        assert_eq!(
            resolv_conf(spec.network.as_ref().unwrap()),
            "nameserver 192.0.2.53\nsearch example.com\n"
        );
    }

    #[test]
    fn messages_serialize() {
        for message in [
            set_link(2, Some(1400)),
            new_address(2, "fd63:7269:6200::2".parse().unwrap(), 64),
            default_route(2, RouteAddress::Inet("10.88.0.1".parse().unwrap())),
        ] {
            let mut msg =
                NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::from(message));
            msg.finalize();
            let mut buf = vec![0u8; msg.buffer_len()];
            msg.serialize(&mut buf);
            let back = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf).unwrap();
            assert_eq!(back.payload, msg.payload);
        }
    }
}
