//! Finds each pod's own host-side interface, in the two pod-network layouts the agent supports,
//! and refuses every other interface:
//!
//! - **routed** (kindnet's ptp, Calico): the node has a host route (/32, /128) to the pod's
//!   address through a veth whose peer is in another network namespace: that veth.
//! - **bridge** (flannel's `cni0`, kubenet's `cbr0`): the longest route to the pod's address is
//!   the pod CIDR on a bridge. The bridge's neighbour entry for the address gives the pod's MAC
//!   address, the bridge's forwarding database the port that MAC was learned on; that port must
//!   be a veth whose peer is in another network namespace. A missing neighbour entry (a quiet
//!   pod) is asked for (`NTF_USE`: the kernel sends an ARP request or neighbour solicitation,
//!   as it would for a packet) and the pod is found on a later reconcile.
//!
//! Anything else is never attached to: a route through a gateway, a route of a whole prefix
//! through a veth, a device that is not a veth (an uplink, a VXLAN device, a bridge itself), a
//! veth whose peer is on the node itself. [`Located`] says which, with a reason the agent
//! reports. The routes come from `/proc/net/route` and `/proc/net/ipv6_route`, the interfaces,
//! neighbours and forwarding entries from rtnetlink dumps, all read once per reconcile
//! ([`KernelRoutes::read`]): a reconcile resolves every pod against one snapshot.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use anyhow::{Context as _, Result};

use crate::reconcile::{Located, Routes};

/// How a reconcile's lookups name the layouts that work, in its reasons.
const SUPPORTED: &str = "supported: a host route to the pod's own veth, or a bridge whose port for the pod is its own veth";

/// One interface of the node, from `RTM_GETLINK`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// `IFLA_INFO_KIND`: "veth", "bridge", "vxlan", ...; empty for a physical device.
    pub kind: String,
    /// The bridge (or bond, VRF) this interface is a port of.
    pub master: Option<u32>,
    /// The other end (of a veth) is in another network namespace (`IFLA_LINK_NETNSID`).
    pub peer_elsewhere: bool,
    /// Administratively up (`IFF_UP`).
    pub up: bool,
}

impl Link {
    fn describe(&self) -> String {
        match self.kind.as_str() {
            "" => format!("{} (a physical device)", self.name),
            "veth" if !self.peer_elsewhere => {
                format!(
                    "{} (a veth whose other end is on the node, not in a pod)",
                    self.name
                )
            }
            k => format!("{} (a {k} device)", self.name),
        }
    }

    /// A pod's own host-side interface: a veth whose peer lives in another namespace.
    fn is_pod_veth(&self) -> bool {
        self.kind == "veth" && self.peer_elsewhere
    }
}

/// What the node's network says about its pods' interfaces, read once per reconcile.
#[derive(Clone, Debug, Default)]
pub struct KernelRoutes {
    v4: String,
    v6: String,
    links: BTreeMap<u32, Link>,
    by_name: BTreeMap<String, u32>,
    /// (interface, address) -> MAC, for usable neighbour entries.
    neighbours: BTreeMap<(u32, IpAddr), [u8; 6]>,
    /// (bridge, MAC) -> the port it was learned on (local entries left out).
    fdb: BTreeMap<(u32, [u8; 6]), u32>,
    /// Ask the kernel to resolve missing neighbours of bridges (off in unit tests).
    resolve: bool,
}

impl KernelRoutes {
    /// A snapshot of both route tables (a missing IPv6 table reads as empty), the interfaces,
    /// the neighbour tables and the bridges' forwarding databases.
    pub fn read() -> Result<Self> {
        let v4 = std::fs::read_to_string("/proc/net/route").context("reading /proc/net/route")?;
        let v6 = std::fs::read_to_string("/proc/net/ipv6_route").unwrap_or_default();
        let links = netlink::links().context("listing interfaces (rtnetlink)")?;
        let mut neighbours = BTreeMap::new();
        for n in netlink::neighbours(libc::AF_UNSPEC as u8).context("reading neighbours")? {
            if let (Some(dst), Some(mac)) = (n.dst, n.mac())
                && n.usable()
            {
                neighbours.insert((n.ifindex, dst), mac);
            }
        }
        let mut fdb = BTreeMap::new();
        // A kernel without bridge support has no such dump: no bridges either.
        for n in netlink::neighbours(libc::AF_BRIDGE as u8).unwrap_or_default() {
            if let (Some(bridge), Some(mac)) = (n.master, n.mac())
                && n.state & netlink::NUD_PERMANENT == 0
            {
                fdb.entry((bridge, mac)).or_insert(n.ifindex);
            }
        }
        Ok(Self {
            v4,
            v6,
            by_name: links.iter().map(|l| (l.name.clone(), l.index)).collect(),
            links: links.into_iter().map(|l| (l.index, l)).collect(),
            neighbours,
            fdb,
            resolve: true,
        })
    }

    fn link_named(&self, name: &str) -> Option<&Link> {
        self.links.get(self.by_name.get(name)?)
    }

    /// The bridge port of `ip`, whose longest route is the bridge `bridge`.
    fn through_bridge(&self, ip: IpAddr, bridge: &Link) -> Located {
        let Some(mac) = self.neighbours.get(&(bridge.index, ip)) else {
            if self.resolve {
                // The kernel sends an ARP request (neighbour solicitation); the answer fills the
                // neighbour entry and teaches the bridge the pod's port.
                if let Err(e) = netlink::resolve(bridge.index, ip) {
                    log::debug!(
                        "asking for the MAC address of {ip} on {}: {e:#}",
                        bridge.name
                    );
                }
            }
            return Located::NotYet(format!(
                "{ip} is on bridge {}, its MAC address is not known yet (asked)",
                bridge.name
            ));
        };
        let mac_text = mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        let Some(port) = self.fdb.get(&(bridge.index, *mac)) else {
            return Located::NotYet(format!(
                "{ip} ({mac_text}) is on bridge {}, on no port yet",
                bridge.name
            ));
        };
        match self.links.get(port) {
            Some(p) if p.is_pod_veth() => Located::Found(p.index),
            Some(p) => Located::Unsupported(format!(
                "{ip} ({mac_text}) is behind port {} of bridge {}, not a pod's own veth ({SUPPORTED})",
                p.describe(),
                bridge.name
            )),
            None => Located::NotYet(format!(
                "{ip} ({mac_text}) is behind port {port} of bridge {}, which is gone",
                bridge.name
            )),
        }
    }
}

impl Routes for KernelRoutes {
    fn ifindex_for(&self, ip: IpAddr) -> Result<Option<u32>> {
        Ok(match self.locate(ip)? {
            Located::Found(i) => Some(i),
            _ => None,
        })
    }

    fn locate(&self, ip: IpAddr) -> Result<Located> {
        let (route, full) = match ip {
            IpAddr::V4(a) => (best_v4(&self.v4, a), 32),
            IpAddr::V6(a) => (best_v6(&self.v6, a), 128),
        };
        let Some((len, dev)) = route else {
            return Ok(Located::NotYet(format!("no device route to {ip}")));
        };
        let Some(link) = self.link_named(&dev) else {
            return Ok(Located::NotYet(format!(
                "the route to {ip} names {dev}, which is gone"
            )));
        };
        Ok(if link.kind == "bridge" {
            self.through_bridge(ip, link)
        } else if !link.is_pod_veth() {
            Located::Unsupported(format!(
                "the route to {ip} leads to {}, not a pod's own veth ({SUPPORTED})",
                link.describe()
            ))
        } else if len != full {
            Located::Unsupported(format!(
                "the route to {ip} is a /{len} through veth {}, which may carry several pods, not a host route ({SUPPORTED})",
                link.name
            ))
        } else if let Some(master) = link.master {
            let bridge = self.links.get(&master).map_or("?", |l| l.name.as_str());
            Located::Unsupported(format!(
                "the route to {ip} leads to {}, a port of {bridge}, not a routed veth ({SUPPORTED})",
                link.name
            ))
        } else {
            Located::Found(link.index)
        })
    }

    fn exists(&self, ifindex: u32) -> bool {
        self.links.get(&ifindex).is_some_and(Link::is_pod_veth)
    }

    /// From the same link dump as the lookups: a reconcile sees one snapshot.
    fn interfaces(&self) -> Result<Vec<(u32, String)>> {
        Ok(self
            .links
            .values()
            .filter(|l| l.up && l.name != "lo")
            .map(|l| (l.index, l.name.clone()))
            .collect())
    }
}

/// ifindex of a named interface in the current network namespace.
pub fn ifindex(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: a valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (idx != 0).then_some(idx)
}

/// Longest-prefix gateway-less route for `ip` in `/proc/net/route` text: (prefix length,
/// device).
fn best_v4(table: &str, ip: Ipv4Addr) -> Option<(u32, String)> {
    let ip = u32::from(ip);
    let mut best: Option<(u32, String)> = None;
    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 {
            continue;
        }
        // The kernel prints the network-order address bytes as one little-endian u32.
        let parse = |s: &str| {
            u32::from_str_radix(s, 16)
                .ok()
                .map(|v| u32::from_be_bytes(v.to_le_bytes()))
        };
        let (Some(dest), Some(gw), Some(mask)) = (parse(f[1]), parse(f[2]), parse(f[7])) else {
            continue;
        };
        if gw != 0 || ip & mask != dest {
            continue;
        }
        let len = mask.count_ones();
        if best.as_ref().is_none_or(|(l, _)| len > *l) {
            best = Some((len, f[0].to_string()));
        }
    }
    best
}

/// Longest-prefix gateway-less route for `ip` in `/proc/net/ipv6_route` text: (prefix
/// length, device).
fn best_v6(table: &str, ip: Ipv6Addr) -> Option<(u32, String)> {
    let ip = u128::from(ip);
    let mut best: Option<(u32, String)> = None;
    for line in table.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 10 {
            continue;
        }
        let (Ok(dest), Ok(len), Ok(gw)) = (
            u128::from_str_radix(f[0], 16),
            u32::from_str_radix(f[1], 16),
            u128::from_str_radix(f[4], 16),
        ) else {
            continue;
        };
        if gw != 0 || len > 128 || f[9] == "lo" {
            continue;
        }
        let mask = if len == 0 {
            0
        } else {
            u128::MAX << (128 - len)
        };
        if ip & mask != dest {
            continue;
        }
        if best.as_ref().is_none_or(|(l, _)| len > *l) {
            best = Some((len, f[9].to_string()));
        }
    }
    best
}

/// The few rtnetlink requests the lookups need: dumps of the interfaces and of the neighbour
/// tables (the bridge family's being the forwarding databases), and a neighbour resolution.
mod netlink {
    use std::{
        io,
        net::{IpAddr, Ipv4Addr, Ipv6Addr},
        os::fd::{AsRawFd, FromRawFd, OwnedFd},
    };

    use anyhow::{Result, bail};

    use super::Link;

    const NLMSG_ERROR: u16 = 2;
    const NLMSG_DONE: u16 = 3;
    const NLM_F_REQUEST: u16 = 0x1;
    const NLM_F_ACK: u16 = 0x4;
    const NLM_F_REPLACE: u16 = 0x100;
    const NLM_F_CREATE: u16 = 0x400;
    const NLM_F_DUMP: u16 = 0x300;
    const RTM_NEWLINK: u16 = 16;
    const RTM_GETLINK: u16 = 18;
    const RTM_NEWNEIGH: u16 = 28;
    const RTM_GETNEIGH: u16 = 30;
    const IFLA_IFNAME: u16 = 3;
    const IFLA_MASTER: u16 = 10;
    const IFLA_LINKINFO: u16 = 18;
    const IFLA_INFO_KIND: u16 = 1;
    const IFLA_LINK_NETNSID: u16 = 37;
    const NDA_DST: u16 = 1;
    const NDA_LLADDR: u16 = 2;
    const NDA_MASTER: u16 = 9;
    pub const NUD_INCOMPLETE: u16 = 0x01;
    pub const NUD_FAILED: u16 = 0x20;
    pub const NUD_PERMANENT: u16 = 0x80;
    const NTF_USE: u8 = 0x01;
    const HEADER: usize = 16;

    /// One neighbour (or, in the bridge family, forwarding) entry.
    #[derive(Clone, Debug, Default)]
    pub struct Neigh {
        pub ifindex: u32,
        pub state: u16,
        pub dst: Option<IpAddr>,
        pub lladdr: Vec<u8>,
        pub master: Option<u32>,
    }

    impl Neigh {
        pub fn mac(&self) -> Option<[u8; 6]> {
            let mac: [u8; 6] = self.lladdr.as_slice().try_into().ok()?;
            (mac != [0; 6]).then_some(mac)
        }

        /// An entry with an address to use (not being resolved, not failed).
        pub fn usable(&self) -> bool {
            self.state != 0 && self.state & (NUD_INCOMPLETE | NUD_FAILED) == 0
        }
    }

    fn align(n: usize) -> usize {
        (n + 3) & !3
    }

    /// A NETLINK_ROUTE socket.
    struct Socket(OwnedFd);

    impl Socket {
        fn open() -> Result<Self> {
            // SAFETY: plain socket(2); the fd is owned by the OwnedFd below.
            let fd = unsafe {
                libc::socket(
                    libc::AF_NETLINK,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    libc::NETLINK_ROUTE,
                )
            };
            if fd < 0 {
                return Err(io::Error::last_os_error().into());
            }
            // SAFETY: fd is a new descriptor nobody else owns.
            Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
        }

        /// Sends one request (`kind`, `flags`, then `body`), returns every answer's payload of
        /// type `answer` until the dump ends (or the acknowledgement).
        fn request(&self, kind: u16, flags: u16, body: &[u8], answer: u16) -> Result<Vec<Vec<u8>>> {
            let mut msg = Vec::with_capacity(HEADER + body.len());
            msg.extend(((HEADER + body.len()) as u32).to_ne_bytes());
            msg.extend(kind.to_ne_bytes());
            msg.extend((flags | NLM_F_REQUEST).to_ne_bytes());
            msg.extend(1u32.to_ne_bytes());
            msg.extend(0u32.to_ne_bytes());
            msg.extend(body);
            // SAFETY: msg outlives the call.
            let n = unsafe { libc::send(self.0.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error().into());
            }
            let mut out = Vec::new();
            let mut buf = vec![0u8; 1 << 16];
            loop {
                // SAFETY: buf is writable for its length.
                let n = unsafe {
                    libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0)
                };
                if n < 0 {
                    let e = io::Error::last_os_error();
                    if e.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(e.into());
                }
                let mut rest = &buf[..n as usize];
                while rest.len() >= HEADER {
                    let len = u32::from_ne_bytes(rest[0..4].try_into()?) as usize;
                    let ty = u16::from_ne_bytes(rest[4..6].try_into()?);
                    if len < HEADER || len > rest.len() {
                        bail!("a truncated netlink message");
                    }
                    let payload = &rest[HEADER..len];
                    match ty {
                        NLMSG_DONE => return Ok(out),
                        NLMSG_ERROR => {
                            let code = payload
                                .get(0..4)
                                .map_or(0, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
                            if code == 0 {
                                return Ok(out);
                            }
                            return Err(io::Error::from_raw_os_error(-code).into());
                        }
                        t if t == answer => out.push(payload.to_vec()),
                        _ => {}
                    }
                    rest = &rest[align(len).min(rest.len())..];
                }
            }
        }
    }

    /// (type, data) of each attribute in `b`.
    fn attributes(mut b: &[u8]) -> Vec<(u16, &[u8])> {
        let mut out = Vec::new();
        while b.len() >= 4 {
            let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
            let ty = u16::from_ne_bytes([b[2], b[3]]) & 0x3fff;
            if len < 4 || len > b.len() {
                break;
            }
            out.push((ty, &b[4..len]));
            b = &b[align(len).min(b.len())..];
        }
        out
    }

    fn u32_of(b: &[u8]) -> Option<u32> {
        Some(u32::from_ne_bytes(b.get(0..4)?.try_into().ok()?))
    }

    fn text(b: &[u8]) -> String {
        String::from_utf8_lossy(b.split(|c| *c == 0).next().unwrap_or_default()).into_owned()
    }

    /// Every interface of this network namespace.
    pub fn links() -> Result<Vec<Link>> {
        let sock = Socket::open()?;
        // struct ifinfomsg: family, pad, type, index, flags, change.
        let body = [0u8; 16];
        let mut out = Vec::new();
        for m in sock.request(RTM_GETLINK, NLM_F_DUMP, &body, RTM_NEWLINK)? {
            if m.len() < 16 {
                continue;
            }
            let mut link = Link {
                index: u32_of(&m[4..8]).unwrap_or(0),
                up: u32_of(&m[8..12]).is_some_and(|f| f & libc::IFF_UP as u32 != 0),
                ..Link::default()
            };
            for (ty, data) in attributes(&m[16..]) {
                match ty {
                    IFLA_IFNAME => link.name = text(data),
                    IFLA_MASTER => link.master = u32_of(data).filter(|m| *m != 0),
                    IFLA_LINK_NETNSID => link.peer_elsewhere = true,
                    IFLA_LINKINFO => {
                        for (t, d) in attributes(data) {
                            if t == IFLA_INFO_KIND {
                                link.kind = text(d);
                            }
                        }
                    }
                    _ => {}
                }
            }
            out.push(link);
        }
        Ok(out)
    }

    /// The neighbour entries of `family` (`AF_UNSPEC`: IPv4 and IPv6; `AF_BRIDGE`: the
    /// bridges' forwarding databases).
    pub fn neighbours(family: u8) -> Result<Vec<Neigh>> {
        let sock = Socket::open()?;
        // struct ndmsg: family, pad1, pad2, ifindex, state, flags, type.
        let mut body = [0u8; 12];
        body[0] = family;
        let mut out = Vec::new();
        for m in sock.request(RTM_GETNEIGH, NLM_F_DUMP, &body, RTM_NEWNEIGH)? {
            if m.len() < 12 || (family != 0 && m[0] != family) {
                continue;
            }
            let mut n = Neigh {
                ifindex: u32_of(&m[4..8]).unwrap_or(0),
                state: u16::from_ne_bytes([m[8], m[9]]),
                ..Neigh::default()
            };
            for (ty, data) in attributes(&m[12..]) {
                match ty {
                    NDA_DST => {
                        n.dst = match data.len() {
                            4 => Some(IpAddr::V4(Ipv4Addr::new(
                                data[0], data[1], data[2], data[3],
                            ))),
                            16 => <[u8; 16]>::try_from(data)
                                .ok()
                                .map(|a| IpAddr::V6(Ipv6Addr::from(a))),
                            _ => None,
                        }
                    }
                    NDA_LLADDR => n.lladdr = data.to_vec(),
                    NDA_MASTER => n.master = u32_of(data),
                    _ => {}
                }
            }
            out.push(n);
        }
        Ok(out)
    }

    /// Asks the kernel to resolve `ip` on interface `ifindex` as it would for a packet
    /// (`NTF_USE`): an ARP request or neighbour solicitation goes out, and the answer fills the
    /// neighbour entry.
    pub fn resolve(ifindex: u32, ip: IpAddr) -> Result<()> {
        let sock = Socket::open()?;
        let (family, addr): (i32, Vec<u8>) = match ip {
            IpAddr::V4(a) => (libc::AF_INET, a.octets().to_vec()),
            IpAddr::V6(a) => (libc::AF_INET6, a.octets().to_vec()),
        };
        let mut body = vec![0u8; 12];
        body[0] = family as u8;
        body[4..8].copy_from_slice(&ifindex.to_ne_bytes());
        body[8..10].copy_from_slice(&NUD_PERMANENT.to_ne_bytes());
        body[10] = NTF_USE;
        body.extend(((4 + addr.len()) as u16).to_ne_bytes());
        body.extend(NDA_DST.to_ne_bytes());
        body.extend(&addr);
        body.resize(align(body.len()), 0);
        sock.request(
            RTM_NEWNEIGH,
            NLM_F_CREATE | NLM_F_REPLACE | NLM_F_ACK,
            &body,
            u16::MAX,
        )?;
        Ok(())
    }
}

/// Every address on this network namespace's interfaces except loopback ones and IPv6
/// link-local ones: the node's own addresses.
pub fn local_addresses() -> Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a list we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut ifap) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getifaddrs");
    }
    let mut cur = ifap;
    while !cur.is_null() {
        // SAFETY: cur is a node of the list returned by getifaddrs.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr points to a sockaddr of the family it states.
            let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
            if family == libc::AF_INET {
                // SAFETY: AF_INET addresses are sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                if !ip.is_loopback() {
                    out.push(IpAddr::V4(ip));
                }
            } else if family == libc::AF_INET6 {
                // SAFETY: AF_INET6 addresses are sockaddr_in6.
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                let ip = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
                if !ip.is_loopback() && !ip.is_unicast_link_local() {
                    out.push(IpAddr::V6(ip));
                }
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: ifap came from getifaddrs.
    unsafe { libc::freeifaddrs(ifap) };
    out.sort();
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_host_route_of_a_pod() {
        let t = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                 eth0\t00000000\t0101A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                 veth0\t0A00F00A\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0\n\
                 cni0\t0000F00A\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n";
        assert_eq!(
            best_v4(t, "10.240.0.10".parse().unwrap()),
            Some((32, "veth0".into()))
        );
        assert_eq!(
            best_v4(t, "10.240.0.11".parse().unwrap()),
            Some((16, "cni0".into()))
        );
        assert_eq!(
            best_v4(t, "8.8.8.8".parse().unwrap()),
            None,
            "gateway routes never count"
        );
    }

    #[test]
    fn picks_the_v6_host_route() {
        let t = "fd000240000000000000000000000010 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000001 00000000 00000001    veth3\n\
                 00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000400 00000001 00000000 00000003     eth0\n";
        assert_eq!(
            best_v6(t, "fd00:240::10".parse().unwrap()),
            Some((128, "veth3".into()))
        );
        assert_eq!(best_v6(t, "fd00:240::11".parse().unwrap()), None);
    }

    const MAC: [u8; 6] = [2, 0, 0, 0, 0, 7];

    /// A node with: veth0 (pod, routed /32), cni0 (bridge, 10.241.0.0/16) with ports veth1 (a
    /// pod's) and vx0 (a VXLAN device), eth0 (uplink, 192.168.0.0/24 and the default route),
    /// veth9 (both ends on the node, /32 route), veth5 (a pod's, routing a /24).
    fn node() -> KernelRoutes {
        let route = |dev: &str, dest: [u8; 4], mask: [u8; 4], gw: [u8; 4]| {
            let hex = |a: [u8; 4]| format!("{:08X}", u32::from_le_bytes(a));
            format!(
                "{dev}\t{}\t{}\t0001\t0\t0\t0\t{}\t0\t0\t0\n",
                hex(dest),
                hex(gw),
                hex(mask)
            )
        };
        let mut v4 =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
                .to_string();
        v4 += &route("eth0", [0; 4], [0; 4], [192, 168, 0, 1]);
        v4 += &route("eth0", [192, 168, 0, 0], [255, 255, 255, 0], [0; 4]);
        v4 += &route("veth0", [10, 240, 0, 10], [255; 4], [0; 4]);
        v4 += &route("cni0", [10, 241, 0, 0], [255, 255, 0, 0], [0; 4]);
        v4 += &route("veth9", [10, 242, 0, 1], [255; 4], [0; 4]);
        v4 += &route("veth5", [10, 243, 0, 0], [255, 255, 255, 0], [0; 4]);
        let link = |index, name: &str, kind: &str, master, peer_elsewhere| {
            (
                index,
                Link {
                    index,
                    name: name.into(),
                    kind: kind.into(),
                    master,
                    peer_elsewhere,
                    up: true,
                },
            )
        };
        let links = BTreeMap::from([
            link(2, "eth0", "", None, false),
            link(10, "veth0", "veth", None, true),
            link(20, "cni0", "bridge", None, false),
            link(21, "veth1", "veth", Some(20), true),
            link(22, "vx0", "vxlan", Some(20), false),
            link(30, "veth9", "veth", None, false),
            link(50, "veth5", "veth", None, true),
        ]);
        KernelRoutes {
            v4,
            v6: String::new(),
            by_name: links.values().map(|l| (l.name.clone(), l.index)).collect(),
            links,
            neighbours: BTreeMap::from([
                ((20, "10.241.0.5".parse().unwrap()), MAC),
                ((20, "10.241.0.6".parse().unwrap()), [2, 0, 0, 0, 0, 8]),
                ((20, "10.241.0.7".parse().unwrap()), [2, 0, 0, 0, 0, 9]),
            ]),
            fdb: BTreeMap::from([((20, MAC), 21), ((20, [2, 0, 0, 0, 0, 8]), 22)]),
            resolve: false,
        }
    }

    fn locate(ip: &str) -> Located {
        node().locate(ip.parse().unwrap()).unwrap()
    }

    fn unsupported(l: Located, says: &str) {
        match l {
            Located::Unsupported(why) => assert!(why.contains(says), "{why}"),
            other => panic!("{other:?}: expected unsupported ({says})"),
        }
    }

    #[test]
    fn a_routed_pod_is_its_host_route_veth() {
        assert_eq!(locate("10.240.0.10"), Located::Found(10));
        assert!(node().exists(10));
    }

    #[test]
    fn a_bridged_pod_is_the_port_its_mac_was_learned_on() {
        assert_eq!(locate("10.241.0.5"), Located::Found(21));
        assert!(
            matches!(locate("10.241.0.7"), Located::NotYet(why) if why.contains("no port yet")),
            "a MAC on no port yet"
        );
        assert!(
            matches!(locate("10.241.0.8"), Located::NotYet(why) if why.contains("not known yet")),
            "a quiet pod: its MAC is asked for"
        );
    }

    #[test]
    fn never_a_bridge_an_uplink_or_a_shared_device() {
        unsupported(locate("10.241.0.6"), "vx0 (a vxlan device)");
        unsupported(locate("192.168.0.20"), "eth0 (a physical device)");
        unsupported(locate("10.242.0.1"), "other end is on the node");
        unsupported(locate("10.243.0.4"), "a /24 through veth veth5");
        assert!(
            matches!(locate("8.8.8.8"), Located::NotYet(_)),
            "only a gateway route"
        );
        for i in [2, 20, 22, 30] {
            assert!(!node().exists(i), "{i} is no pod's veth");
        }
    }

    #[test]
    fn interfaces_are_those_up_but_loopback() {
        let mut n = node();
        let lo = Link {
            index: 1,
            name: "lo".into(),
            up: true,
            ..Link::default()
        };
        n.links.insert(1, lo);
        n.links.get_mut(&30).unwrap().up = false;
        let names: Vec<String> = n
            .interfaces()
            .unwrap()
            .into_iter()
            .map(|(_, n)| n)
            .collect();
        assert_eq!(names, ["eth0", "veth0", "cni0", "veth1", "vx0", "veth5"]);
    }
}
