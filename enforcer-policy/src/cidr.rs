//! An IP network (`10.0.0.0/8`, `fd00::/64`), host bits masked: the ipBlock's `cidr` and
//! `except`. Kept here rather than taken from a crate so that this crate's dependencies stay the
//! API types and the shared map types.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

/// A network: an address with its host bits zero, and a prefix length within the family's width.
/// Ordered by family, then address, then length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    network: IpAddr,
    len: u8,
}

impl Cidr {
    /// `addr/len` with `addr`'s host bits cleared; `None` when `len` exceeds the family's width.
    pub fn new(addr: IpAddr, len: u8) -> Option<Self> {
        let network = match addr {
            IpAddr::V4(a) if len <= 32 => IpAddr::V4(Ipv4Addr::from(mask(u32::from(a), len))),
            IpAddr::V6(a) if len <= 128 => IpAddr::V6(Ipv6Addr::from(mask(u128::from(a), len))),
            _ => return None,
        };
        Some(Self { network, len })
    }

    pub fn network(&self) -> IpAddr {
        self.network
    }

    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    /// Whether `ip` is in this network (never across families).
    pub fn contains(&self, ip: IpAddr) -> bool {
        Self::new(ip, self.len).is_some_and(|n| n.network == self.network)
    }

    /// Whether every address of `other` is in this network.
    pub fn covers(&self, other: &Cidr) -> bool {
        other.len >= self.len && self.contains(other.network)
    }
}

/// Keeps the top `len` bits of `bits`.
fn mask<T>(bits: T, len: u8) -> T
where
    T: std::ops::Shl<u32, Output = T> + std::ops::BitAnd<Output = T> + std::ops::Not<Output = T>,
    T: From<u8> + Copy,
{
    let width = (std::mem::size_of::<T>() * 8) as u32;
    if len == 0 {
        return T::from(0);
    }
    let host = u32::from(len).min(width);
    // all ones shifted left by the host bits: `!0 << (width - len)`
    if host == width {
        bits
    } else {
        bits & (!T::from(0) << (width - host))
    }
}

impl FromStr for Cidr {
    type Err = ();

    /// `ADDRESS/LEN`, both required, the length in decimal without a sign.
    fn from_str(s: &str) -> Result<Self, ()> {
        let (addr, len) = s.split_once('/').ok_or(())?;
        if len.is_empty() || len.len() > 3 || !len.bytes().all(|b| b.is_ascii_digit()) {
            return Err(());
        }
        let addr: IpAddr = addr.parse().map_err(|_| ())?;
        Cidr::new(addr, len.parse().map_err(|_| ())?).ok_or(())
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    #[test]
    fn parse_masks_host_bits_and_refuses_what_is_not_a_network() {
        assert_eq!(c("10.1.2.3/8").to_string(), "10.0.0.0/8");
        assert_eq!(c("10.1.2.3/32").to_string(), "10.1.2.3/32");
        assert_eq!(c("1.2.3.4/0").to_string(), "0.0.0.0/0");
        assert_eq!(c("fd00::1:2/112").to_string(), "fd00::1:0/112");
        assert_eq!(c("fd00::1/128").to_string(), "fd00::1/128");
        for bad in [
            "10.0.0.0",
            "10.0.0.0/33",
            "fd00::/129",
            "10.0.0.0/-1",
            "10.0.0.0/",
            "x/8",
            "10.0.0.0/+8",
            "10.0.0.0/0008",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn contains_and_covers_stay_within_the_family_and_the_prefix() {
        let n = c("10.0.0.0/8");
        assert!(n.contains("10.255.0.1".parse().unwrap()));
        assert!(!n.contains("11.0.0.0".parse().unwrap()));
        assert!(!n.contains("::a00:1".parse().unwrap()));
        assert!(c("0.0.0.0/0").contains("255.255.255.255".parse().unwrap()));
        assert!(!c("::/0").contains("1.2.3.4".parse().unwrap()));
        assert!(n.covers(&c("10.1.0.0/16")) && n.covers(&n));
        assert!(!c("10.1.0.0/16").covers(&n));
        assert!(!n.covers(&c("11.0.0.0/16")));
    }
}
