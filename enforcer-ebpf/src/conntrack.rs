//! Conntrack and fragment keys, address helpers.

use enforcer_common::{
    Config, CtKey, DEFAULT_CT_TIMEOUT_OTHER_NS, DEFAULT_CT_TIMEOUT_TCP_NS, FragKey, PROTO_TCP,
};

use crate::{maps::CONFIG, parse::Packet};

#[inline(always)]
fn words(a: &[u8; 16]) -> (u64, u64) {
    let hi = u64::from_be_bytes([a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]]);
    let lo = u64::from_be_bytes([a[8], a[9], a[10], a[11], a[12], a[13], a[14], a[15]]);
    (hi, lo)
}

/// Byte-wise equality of two addresses (no memcmp in BPF).
#[inline(always)]
pub fn addr_eq(a: &[u8; 16], b: &[u8; 16]) -> bool {
    words(a) == words(b)
}

/// `(a, pa) <= (b, pb)`, comparing address bytes then port.
#[inline(always)]
fn end_le(a: &[u8; 16], pa: u16, b: &[u8; 16], pb: u16) -> bool {
    let (ah, al) = words(a);
    let (bh, bl) = words(b);
    if ah != bh {
        return ah < bh;
    }
    if al != bl {
        return al < bl;
    }
    pa <= pb
}

/// Writes into `key` the normalized key of the flow `src:sport -> dst:dport` at `endpoint`;
/// returns whether `src` is end `a` of the key.
#[inline(always)]
#[expect(clippy::too_many_arguments, reason = "a flow tuple")]
pub fn ct_key(
    key: &mut CtKey,
    endpoint: u32,
    family: u8,
    proto: u8,
    src: &[u8; 16],
    sport: u16,
    dst: &[u8; 16],
    dport: u16,
) -> bool {
    let src_is_a = end_le(src, sport, dst, dport);
    key.endpoint = endpoint;
    key.family = family;
    key.protocol = proto;
    key._pad = 0;
    if src_is_a {
        key.addr_a = *src;
        key.addr_b = *dst;
        key.port_a = sport;
        key.port_b = dport;
    } else {
        key.addr_a = *dst;
        key.addr_b = *src;
        key.port_a = dport;
        key.port_b = sport;
    }
    src_is_a
}

#[inline(always)]
pub fn frag_key(key: &mut FragKey, endpoint: u32, direction: u8, pkt: &Packet) {
    key.endpoint = endpoint;
    key.id = pkt.frag_id;
    key.family = pkt.family;
    key.protocol = pkt.proto;
    key.direction = direction;
    key._pad = 0;
    key.src = pkt.src;
    key.dst = pkt.dst;
}
/// Idle timeout of a flow of `proto` (ns). A CONFIG of zeros means the defaults.
#[inline(always)]
pub fn timeout(proto: u8) -> u64 {
    let cfg: Option<&Config> = CONFIG.get(0);
    let (tcp, other) = match cfg {
        Some(c) => (c.ct_timeout_tcp_ns, c.ct_timeout_other_ns),
        None => (0, 0),
    };
    if proto == PROTO_TCP {
        if tcp == 0 {
            DEFAULT_CT_TIMEOUT_TCP_NS
        } else {
            tcp
        }
    } else if other == 0 {
        DEFAULT_CT_TIMEOUT_OTHER_NS
    } else {
        other
    }
}

/// Global flags from CONFIG.
#[inline(always)]
pub fn config_flags() -> u32 {
    match CONFIG.get(0) {
        Some(c) => c.flags,
        None => 0,
    }
}
