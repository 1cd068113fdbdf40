//! Finds a pod's host-side interface the way kindnet and Calico lay pods out: by the node's
//! route to the pod's address (a /32 or /128 via the host end of its veth).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{Context as _, Result};

use crate::reconcile::Routes;

/// Routes from the kernel's main table (`/proc/net/route`, `/proc/net/ipv6_route`) of the
/// network namespace the agent runs in, read once per [`KernelRoutes::read`] (a reconcile
/// resolves every pod against one snapshot, not one read of the tables per pod). Only device
/// routes without a gateway count: a pod's route points at its veth, never through a gateway.
#[derive(Clone, Debug, Default)]
pub struct KernelRoutes {
    v4: String,
    v6: String,
}

impl KernelRoutes {
    /// A snapshot of both tables (a missing IPv6 table reads as empty).
    pub fn read() -> Result<Self> {
        let v4 = std::fs::read_to_string("/proc/net/route").context("reading /proc/net/route")?;
        let v6 = std::fs::read_to_string("/proc/net/ipv6_route").unwrap_or_default();
        Ok(Self { v4, v6 })
    }
}

impl Routes for KernelRoutes {
    fn ifindex_for(&self, ip: IpAddr) -> Result<Option<u32>> {
        let iface = match ip {
            IpAddr::V4(a) => best_v4(&self.v4, a),
            IpAddr::V6(a) => best_v6(&self.v6, a),
        };
        let Some(iface) = iface else { return Ok(None) };
        Ok(ifindex(&iface))
    }
}

/// ifindex of a named interface in the current network namespace.
pub fn ifindex(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: a valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (idx != 0).then_some(idx)
}

/// Longest-prefix gateway-less route for `ip` in `/proc/net/route` text.
fn best_v4(table: &str, ip: Ipv4Addr) -> Option<String> {
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
    best.map(|(_, i)| i)
}

/// Longest-prefix gateway-less route for `ip` in `/proc/net/ipv6_route` text.
fn best_v6(table: &str, ip: Ipv6Addr) -> Option<String> {
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
    best.map(|(_, i)| i)
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
            best_v4(t, "10.240.0.10".parse().unwrap()).as_deref(),
            Some("veth0")
        );
        assert_eq!(
            best_v4(t, "10.240.0.11".parse().unwrap()).as_deref(),
            Some("cni0")
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
            best_v6(t, "fd00:240::10".parse().unwrap()).as_deref(),
            Some("veth3")
        );
        assert_eq!(best_v6(t, "fd00:240::11".parse().unwrap()), None);
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
