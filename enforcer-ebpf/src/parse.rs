//! Header parsing. Every read goes through `bpf_skb_load_bytes` (`TcContext::load`) with a
//! constant length, so non-linear skbs work and no read can leave the packet; every loop has a
//! constant bound.

use aya_ebpf::{cty::c_void, helpers::bpf_skb_load_bytes, programs::TcContext};
use enforcer_common::{
    FAMILY_V4, FAMILY_V6, PROTO_ICMP, PROTO_ICMPV6, PROTO_SCTP, PROTO_TCP, PROTO_UDP,
};

/// A header is truncated or inconsistent.
pub struct Malformed;

const ETH_HLEN: u32 = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;

/// Most IPv6 extension headers we walk before calling the chain malformed.
pub const MAX_EXT_HEADERS: usize = 8;

/// Not a fragment, or an atomic IPv6 fragment.
pub const FRAG_NONE: u8 = 0;
/// Offset 0 with more fragments: carries the L4 header.
pub const FRAG_FIRST: u8 = 1;
/// Offset > 0: no L4 header.
pub const FRAG_LATER: u8 = 2;

/// Layer 4 shapes that matter to the verdict.
pub const L4_OTHER: u8 = 0;
/// TCP, UDP, SCTP: `sport`/`dport` are the ports.
pub const L4_PORTS: u8 = 1;
/// ICMP/ICMPv6 echo request or reply: `sport` = `dport` = identifier.
pub const L4_ECHO: u8 = 2;
/// ICMP/ICMPv6 error: an inner header starts at `l4_off + 8`.
pub const L4_ICMP_ERROR: u8 = 3;

/// What [`parse`] found.
pub const PARSED_IP: u8 = 0;
/// ARP and any other non-IP ethertype.
pub const PARSED_NON_IP: u8 = 1;
/// IPv6 neighbour discovery, router solicitation/advertisement, redirect, MLD.
pub const PARSED_ND: u8 = 2;

/// The facts of one packet the decision needs. IPv4 addresses use the first 4 bytes.
#[derive(Clone, Copy)]
pub struct Packet {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub frag_id: u32,
    /// Offset of the L4 header in the frame (only meaningful when `frag != FRAG_LATER`).
    pub l4_off: u32,
    pub sport: u16,
    pub dport: u16,
    pub family: u8,
    pub proto: u8,
    pub frag: u8,
    pub l4: u8,
}

impl Packet {
    pub const fn zeroed() -> Self {
        Self {
            src: [0; 16],
            dst: [0; 16],
            frag_id: 0,
            l4_off: 0,
            sport: 0,
            dport: 0,
            family: 0,
            proto: 0,
            frag: FRAG_NONE,
            l4: L4_OTHER,
        }
    }
}

#[inline(always)]
fn be16(b0: u8, b1: u8) -> u16 {
    ((b0 as u16) << 8) | b1 as u16
}

#[inline(always)]
fn load<T>(ctx: &TcContext, off: u32) -> Result<T, Malformed> {
    ctx.load::<T>(off as usize).map_err(|_| Malformed)
}

/// Reads `size_of::<T>()` bytes at `off` straight into `dst` (which may live in a map value),
/// keeping large headers off the 512-byte BPF stack.
#[inline(always)]
pub fn load_into<T>(ctx: &TcContext, off: u32, dst: &mut T) -> Result<(), Malformed> {
    let ret = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb as *const c_void,
            off,
            dst as *mut T as *mut c_void,
            core::mem::size_of::<T>() as u32,
        )
    };
    if ret == 0 { Ok(()) } else { Err(Malformed) }
}

/// Parses the frame into `pkt`; returns one of the `PARSED_*` values.
#[inline(always)]
pub fn parse(ctx: &TcContext, pkt: &mut Packet) -> Result<u8, Malformed> {
    let len = ctx.len();
    if len < ETH_HLEN {
        return Err(Malformed);
    }
    let proto: [u8; 2] = load(ctx, 12)?;
    match be16(proto[0], proto[1]) {
        ETH_P_IP => parse_v4(ctx, pkt, len),
        ETH_P_IPV6 => parse_v6(ctx, pkt, len),
        _ => Ok(PARSED_NON_IP),
    }
}

#[inline(always)]
fn parse_v4(ctx: &TcContext, pkt: &mut Packet, len: u32) -> Result<u8, Malformed> {
    let h: [u8; 20] = load(ctx, ETH_HLEN)?;
    if h[0] >> 4 != 4 {
        return Err(Malformed);
    }
    let hlen = ((h[0] & 0x0f) as u32) * 4;
    if hlen < 20 {
        return Err(Malformed);
    }
    let total = be16(h[2], h[3]) as u32;
    if total < hlen || total > len - ETH_HLEN {
        return Err(Malformed);
    }
    pkt.family = FAMILY_V4;
    pkt.proto = h[9];
    pkt.src = [0; 16];
    pkt.dst = [0; 16];
    pkt.src[0] = h[12];
    pkt.src[1] = h[13];
    pkt.src[2] = h[14];
    pkt.src[3] = h[15];
    pkt.dst[0] = h[16];
    pkt.dst[1] = h[17];
    pkt.dst[2] = h[18];
    pkt.dst[3] = h[19];
    pkt.frag_id = be16(h[4], h[5]) as u32;
    let frag = be16(h[6], h[7]);
    let more = frag & 0x2000 != 0;
    let offset = frag & 0x1fff;
    if offset != 0 {
        pkt.frag = FRAG_LATER;
        return Ok(PARSED_IP);
    }
    if more {
        pkt.frag = FRAG_FIRST;
    }
    let l4_off = ETH_HLEN + hlen;
    parse_l4(ctx, pkt, l4_off, ETH_HLEN + total)?;
    Ok(PARSED_IP)
}

#[inline(always)]
const fn is_ext_header(nh: u8) -> bool {
    // Hop-by-hop, routing, fragment, destination options, AH.
    matches!(nh, 0 | 43 | 44 | 60 | 51)
}

#[inline(always)]
fn parse_v6(ctx: &TcContext, pkt: &mut Packet, len: u32) -> Result<u8, Malformed> {
    let h: [u8; 8] = load(ctx, ETH_HLEN)?;
    if h[0] >> 4 != 6 {
        return Err(Malformed);
    }
    let payload = be16(h[4], h[5]) as u32;
    let end = ETH_HLEN + 40 + payload;
    if end > len {
        return Err(Malformed);
    }
    pkt.family = FAMILY_V6;
    load_into(ctx, ETH_HLEN + 8, &mut pkt.src)?;
    load_into(ctx, ETH_HLEN + 24, &mut pkt.dst)?;
    let mut nh = h[6];
    let mut off = ETH_HLEN + 40;
    let mut i = 0;
    while i < MAX_EXT_HEADERS {
        if !is_ext_header(nh) {
            break;
        }
        if nh == 44 {
            if off + 8 > end {
                return Err(Malformed);
            }
            let f: [u8; 8] = load(ctx, off)?;
            let fo = be16(f[2], f[3]);
            let offset = fo >> 3;
            let more = fo & 1 != 0;
            pkt.frag_id = u32::from_be_bytes([f[4], f[5], f[6], f[7]]);
            nh = f[0];
            off += 8;
            if offset != 0 {
                pkt.frag = FRAG_LATER;
                pkt.proto = nh;
                return Ok(PARSED_IP);
            }
            if more {
                pkt.frag = FRAG_FIRST;
            }
        } else {
            if off + 2 > end {
                return Err(Malformed);
            }
            let e: [u8; 2] = load(ctx, off)?;
            let hl = if nh == 51 {
                (e[1] as u32 + 2) * 4
            } else {
                (e[1] as u32 + 1) * 8
            };
            if off + hl > end {
                return Err(Malformed);
            }
            nh = e[0];
            off += hl;
        }
        i += 1;
    }
    if is_ext_header(nh) {
        return Err(Malformed);
    }
    pkt.proto = nh;
    parse_l4(ctx, pkt, off, end)?;
    if nh == PROTO_ICMPV6 {
        let t: [u8; 1] = load(ctx, off)?;
        if matches!(t[0], 130..=137 | 143) {
            return Ok(PARSED_ND);
        }
    }
    Ok(PARSED_IP)
}

/// Reads the L4 header at `off` (the IP datagram ends at `end`).
#[inline(always)]
fn parse_l4(ctx: &TcContext, pkt: &mut Packet, off: u32, end: u32) -> Result<(), Malformed> {
    pkt.l4_off = off;
    let avail = end - off;
    match pkt.proto {
        PROTO_TCP => {
            if avail < 20 {
                return Err(Malformed);
            }
            let t: [u8; 14] = load(ctx, off)?;
            if t[12] >> 4 < 5 {
                return Err(Malformed);
            }
            pkt.sport = be16(t[0], t[1]);
            pkt.dport = be16(t[2], t[3]);
            pkt.l4 = L4_PORTS;
        }
        PROTO_UDP | PROTO_SCTP => {
            let need = if pkt.proto == PROTO_UDP { 8 } else { 12 };
            if avail < need {
                return Err(Malformed);
            }
            let t: [u8; 4] = load(ctx, off)?;
            pkt.sport = be16(t[0], t[1]);
            pkt.dport = be16(t[2], t[3]);
            pkt.l4 = L4_PORTS;
        }
        PROTO_ICMP | PROTO_ICMPV6 => {
            if avail < 8 {
                return Err(Malformed);
            }
            let t: [u8; 8] = load(ctx, off)?;
            let v6 = pkt.proto == PROTO_ICMPV6;
            let echo = if v6 {
                matches!(t[0], 128 | 129)
            } else {
                matches!(t[0], 0 | 8)
            };
            let error = if v6 {
                matches!(t[0], 1..=4)
            } else {
                matches!(t[0], 3 | 11 | 12)
            };
            if echo {
                let id = be16(t[4], t[5]);
                pkt.sport = id;
                pkt.dport = id;
                pkt.l4 = L4_ECHO;
            } else if error {
                pkt.l4 = L4_ICMP_ERROR;
            }
        }
        _ => {}
    }
    Ok(())
}

/// The flow an ICMP error is about: its inner header, as the packet that caused the error
/// carried it.
#[derive(Clone, Copy)]
pub struct Inner {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
}

/// Parses the inner header of an ICMP error into `inner`. `false` when it is cut short or not a
/// flow we track.
#[inline(always)]
pub fn parse_inner(ctx: &TcContext, pkt: &Packet, inner: &mut Inner) -> bool {
    parse_inner_impl(ctx, pkt, inner).is_ok()
}

#[inline(always)]
fn parse_inner_impl(ctx: &TcContext, pkt: &Packet, inner: &mut Inner) -> Result<(), Malformed> {
    let off = pkt.l4_off + 8;
    inner.src = [0; 16];
    inner.dst = [0; 16];
    let h: [u8; 8] = load(ctx, off)?;
    let l4_off;
    if pkt.family == FAMILY_V4 {
        if h[0] >> 4 != 4 || h[0] & 0x0f < 5 {
            return Err(Malformed);
        }
        let p: [u8; 1] = load(ctx, off + 9)?;
        inner.proto = p[0];
        let a: [u8; 8] = load(ctx, off + 12)?;
        inner.src[0] = a[0];
        inner.src[1] = a[1];
        inner.src[2] = a[2];
        inner.src[3] = a[3];
        inner.dst[0] = a[4];
        inner.dst[1] = a[5];
        inner.dst[2] = a[6];
        inner.dst[3] = a[7];
        l4_off = off + ((h[0] & 0x0f) as u32) * 4;
    } else {
        if h[0] >> 4 != 6 {
            return Err(Malformed);
        }
        inner.proto = h[6];
        load_into(ctx, off + 8, &mut inner.src)?;
        load_into(ctx, off + 24, &mut inner.dst)?;
        l4_off = off + 40;
    }
    let t: [u8; 8] = load(ctx, l4_off)?;
    match inner.proto {
        PROTO_TCP | PROTO_UDP | PROTO_SCTP => {
            inner.sport = be16(t[0], t[1]);
            inner.dport = be16(t[2], t[3]);
        }
        PROTO_ICMP | PROTO_ICMPV6 => {
            let echo = if inner.proto == PROTO_ICMPV6 {
                matches!(t[0], 128 | 129)
            } else {
                matches!(t[0], 0 | 8)
            };
            if !echo {
                return Err(Malformed);
            }
            let id = be16(t[4], t[5]);
            inner.sport = id;
            inner.dport = id;
        }
        _ => return Err(Malformed),
    }
    Ok(())
}
