//! Header parsing. Each header is read by direct packet access when it lies in the skb's linear
//! area (the common case: one bounds check, no helper call), else through `bpf_skb_load_bytes`
//! (non-linear skbs), which also fails when the frame is too short. Both give the same bytes, so
//! a truncated header is malformed either way; every loop has a constant bound.

use core::mem::MaybeUninit;

use aya_ebpf::{cty::c_void, helpers::bpf_skb_load_bytes, programs::TcContext};

use enforcer_common::{
    FAMILY_V4, FAMILY_V6, PROTO_ICMP, PROTO_ICMPV6, PROTO_SCTP, PROTO_TCP, PROTO_UDP,
};

use crate::mem::{zero_words, zero16};

/// A header is truncated or inconsistent.
pub struct Malformed;

const ETH_HLEN: u32 = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_ARP: u16 = 0x0806;
/// 802.1Q, 802.1ad, and the pre-standard QinQ tag.
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const ETH_P_QINQ: u16 = 0x9100;

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
/// ICMP/ICMPv6 error: an inner header starts at `l4_off + 8` and ends by `ip_end`.
pub const L4_ICMP_ERROR: u8 = 3;

/// What [`parse`] found.
pub const PARSED_IP: u8 = 0;
/// Any ethertype other than IP, ARP and the VLAN tags.
pub const PARSED_NON_IP: u8 = 1;
/// IPv6 neighbour discovery, router solicitation/advertisement, redirect, MLD.
pub const PARSED_ND: u8 = 2;
/// Ethernet/IPv4 ARP: the sender's protocol address is in `src`.
pub const PARSED_ARP: u8 = 3;
/// A VLAN tag in the frame.
pub const PARSED_VLAN: u8 = 4;

/// The facts of one packet the decision needs. IPv4 addresses use the first 4 bytes. Aligned so
/// that the addresses move by words ([`crate::mem`]) and the whole zeroes in 6 stores.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
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
    /// TCP header flags (byte 13), 0 for other protocols.
    pub tcp_flags: u8,
    pub _pad: [u8; 3],
    /// End of the IP packet in the frame; set for an ICMP error only (its quote ends there,
    /// whatever the frame carries after it).
    pub ip_end: u32,
}

impl Packet {
    /// Resets every field (what the parse of a new packet starts from).
    #[inline(always)]
    pub fn clear(&mut self) {
        const { assert!(FRAG_NONE == 0 && L4_OTHER == 0) };
        zero_words(self);
    }
}

#[inline(always)]
fn be16(b0: u8, b1: u8) -> u16 {
    ((b0 as u16) << 8) | b1 as u16
}

/// Deepest frame offset read by direct packet access; deeper headers (long IPv6 extension
/// chains) go through `bpf_skb_load_bytes`. It also bounds the offset for the verifier.
const MAX_DIRECT_OFF: u32 = 1024;

/// `N` bytes of the frame, read in place or copied into a caller's buffer.
#[derive(Clone, Copy)]
struct Hdr(*const u8);

/// Copies the source and destination of the IPv4 header `h` into the first 4 bytes of each.
#[inline(always)]
fn v4_addrs(h: Hdr, src: &mut [u8; 16], dst: &mut [u8; 16]) {
    // Spelled out: byte stores, never a copy loop.
    src[0] = h.u8(12);
    src[1] = h.u8(13);
    src[2] = h.u8(14);
    src[3] = h.u8(15);
    dst[0] = h.u8(16);
    dst[1] = h.u8(17);
    dst[2] = h.u8(18);
    dst[3] = h.u8(19);
}

impl Hdr {
    #[inline(always)]
    fn u8(self, i: usize) -> u8 {
        unsafe { *self.0.add(i) }
    }

    #[inline(always)]
    fn be16(self, i: usize) -> u16 {
        be16(self.u8(i), self.u8(i + 1))
    }

    /// Copies the 16 bytes at `i` (an IPv6 address).
    #[inline(always)]
    fn addr16(self, i: usize, dst: &mut [u8; 16]) {
        let mut k = 0;
        while k < 16 {
            dst[k] = self.u8(i + k);
            k += 1;
        }
    }
}

/// The `N` bytes at `off`: a pointer into the linear packet data when they are there (direct
/// access, bounds checked as the verifier wants), else `buf` filled by `bpf_skb_load_bytes`.
/// `Malformed` when the frame ends before `off + N`.
#[inline(always)]
fn header<const N: usize>(
    ctx: &TcContext,
    off: u32,
    buf: &mut MaybeUninit<[u8; N]>,
) -> Result<Hdr, Malformed> {
    if off < MAX_DIRECT_OFF {
        let p = ctx.data() + off as usize;
        if p + N <= ctx.data_end() {
            return Ok(Hdr(p as *const u8));
        }
    }
    let ret = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb as *const c_void,
            off,
            buf.as_mut_ptr() as *mut c_void,
            N as u32,
        )
    };
    if ret == 0 {
        Ok(Hdr(buf.as_ptr() as *const u8))
    } else {
        Err(Malformed)
    }
}

/// Parses the frame into `pkt` (which the caller has zeroed); returns one of the `PARSED_*`
/// values.
#[inline(always)]
pub fn parse(ctx: &TcContext, pkt: &mut Packet) -> Result<u8, Malformed> {
    let len = ctx.len();
    if len < ETH_HLEN {
        return Err(Malformed);
    }
    let mut buf = MaybeUninit::<[u8; 2]>::uninit();
    let proto = header(ctx, 12, &mut buf)?.be16(0);
    match proto {
        ETH_P_IP => parse_v4(ctx, pkt, len),
        ETH_P_IPV6 => parse_v6(ctx, pkt, len),
        ETH_P_ARP => parse_arp(ctx, pkt),
        ETH_P_8021Q | ETH_P_8021AD | ETH_P_QINQ => Ok(PARSED_VLAN),
        _ => Ok(PARSED_NON_IP),
    }
}

/// An ARP message for IPv4 over Ethernet; its sender protocol address goes to `pkt.src`. Any
/// other hardware or protocol type is a non-IP frame like any other.
#[inline(always)]
fn parse_arp(ctx: &TcContext, pkt: &mut Packet) -> Result<u8, Malformed> {
    let mut buf = MaybeUninit::<[u8; 28]>::uninit();
    let a = header(ctx, ETH_HLEN, &mut buf)?;
    if a.be16(0) != 1 || a.be16(2) != ETH_P_IP || a.u8(4) != 6 || a.u8(5) != 4 {
        return Ok(PARSED_NON_IP);
    }
    pkt.family = FAMILY_V4;
    pkt.src[0] = a.u8(14);
    pkt.src[1] = a.u8(15);
    pkt.src[2] = a.u8(16);
    pkt.src[3] = a.u8(17);
    Ok(PARSED_ARP)
}

/// Whether the skb carries a VLAN tag outside its data: the receive path moves a frame's outer
/// tag there before TC sees it, so a tagged frame shows only its inner ethertype at offset 12.
#[inline(always)]
pub fn vlan_tagged(ctx: &TcContext) -> bool {
    unsafe { (*ctx.skb.skb).vlan_present != 0 }
}

#[inline(always)]
fn parse_v4(ctx: &TcContext, pkt: &mut Packet, len: u32) -> Result<u8, Malformed> {
    let mut buf = MaybeUninit::<[u8; 20]>::uninit();
    let h = header(ctx, ETH_HLEN, &mut buf)?;
    let b0 = h.u8(0);
    if b0 >> 4 != 4 {
        return Err(Malformed);
    }
    let hlen = ((b0 & 0x0f) as u32) * 4;
    if hlen < 20 {
        return Err(Malformed);
    }
    let total = h.be16(2) as u32;
    if total < hlen || total > len - ETH_HLEN {
        return Err(Malformed);
    }
    pkt.family = FAMILY_V4;
    pkt.proto = h.u8(9);
    // The other 12 bytes of each address stay zero (the caller zeroed `pkt`).
    v4_addrs(h, &mut pkt.src, &mut pkt.dst);
    pkt.frag_id = h.be16(4) as u32;
    let frag = h.be16(6);
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
    parse_l4::<false>(ctx, pkt, l4_off, ETH_HLEN + total)?;
    Ok(PARSED_IP)
}

#[inline(always)]
const fn is_ext_header(nh: u8) -> bool {
    // Hop-by-hop, routing, fragment, destination options, AH.
    matches!(nh, 0 | 43 | 44 | 60 | 51)
}

#[inline(always)]
fn parse_v6(ctx: &TcContext, pkt: &mut Packet, len: u32) -> Result<u8, Malformed> {
    let mut buf = MaybeUninit::<[u8; 40]>::uninit();
    let h = header(ctx, ETH_HLEN, &mut buf)?;
    if h.u8(0) >> 4 != 6 {
        return Err(Malformed);
    }
    let payload = h.be16(4) as u32;
    let end = ETH_HLEN + 40 + payload;
    if end > len {
        return Err(Malformed);
    }
    pkt.family = FAMILY_V6;
    h.addr16(8, &mut pkt.src);
    h.addr16(24, &mut pkt.dst);
    let mut nh = h.u8(6);
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
            let mut fb = MaybeUninit::<[u8; 8]>::uninit();
            let f = header(ctx, off, &mut fb)?;
            let fo = f.be16(2);
            let offset = fo >> 3;
            let more = fo & 1 != 0;
            pkt.frag_id = u32::from_be_bytes([f.u8(4), f.u8(5), f.u8(6), f.u8(7)]);
            nh = f.u8(0);
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
            let mut eb = MaybeUninit::<[u8; 2]>::uninit();
            let e = header(ctx, off, &mut eb)?;
            let hl = if nh == 51 {
                (e.u8(1) as u32 + 2) * 4
            } else {
                (e.u8(1) as u32 + 1) * 8
            };
            if off + hl > end {
                return Err(Malformed);
            }
            nh = e.u8(0);
            off += hl;
        }
        i += 1;
    }
    if is_ext_header(nh) {
        return Err(Malformed);
    }
    pkt.proto = nh;
    if parse_l4::<true>(ctx, pkt, off, end)? {
        return Ok(PARSED_ND);
    }
    Ok(PARSED_IP)
}

/// Reads the L4 header at `off` (the IP datagram ends at `end`) of an IPv6 (`V6`) or IPv4
/// packet. `true` for an ICMPv6 neighbour discovery, router or MLD message.
#[inline(always)]
fn parse_l4<const V6: bool>(
    ctx: &TcContext,
    pkt: &mut Packet,
    off: u32,
    end: u32,
) -> Result<bool, Malformed> {
    pkt.l4_off = off;
    let avail = end - off;
    // ICMP is protocol 1 in IPv4 and ICMPv6 58 in IPv6; the other family's number is an
    // unknown protocol like any other (judged by policy, never `related`).
    let icmp = if V6 { PROTO_ICMPV6 } else { PROTO_ICMP };
    match pkt.proto {
        PROTO_TCP => {
            if avail < 20 {
                return Err(Malformed);
            }
            let mut buf = MaybeUninit::<[u8; 14]>::uninit();
            let t = header(ctx, off, &mut buf)?;
            if t.u8(12) >> 4 < 5 {
                return Err(Malformed);
            }
            pkt.sport = t.be16(0);
            pkt.dport = t.be16(2);
            pkt.tcp_flags = t.u8(13);
            pkt.l4 = L4_PORTS;
        }
        PROTO_UDP | PROTO_SCTP => {
            let need = if pkt.proto == PROTO_UDP { 8 } else { 12 };
            if avail < need {
                return Err(Malformed);
            }
            let mut buf = MaybeUninit::<[u8; 4]>::uninit();
            let t = header(ctx, off, &mut buf)?;
            pkt.sport = t.be16(0);
            pkt.dport = t.be16(2);
            pkt.l4 = L4_PORTS;
        }
        p if p == icmp => {
            if avail < 8 {
                return Err(Malformed);
            }
            let mut buf = MaybeUninit::<[u8; 8]>::uninit();
            let t = header(ctx, off, &mut buf)?;
            let ty = t.u8(0);
            let echo = if V6 {
                matches!(ty, 128 | 129)
            } else {
                matches!(ty, 0 | 8)
            };
            let error = if V6 {
                matches!(ty, 1..=4)
            } else {
                matches!(ty, 3 | 11 | 12)
            };
            if echo {
                let id = t.be16(4);
                pkt.sport = id;
                pkt.dport = id;
                pkt.l4 = L4_ECHO;
            } else if error {
                pkt.l4 = L4_ICMP_ERROR;
                pkt.ip_end = end;
            }
            return Ok(V6 && matches!(ty, 130..=137 | 143));
        }
        _ => {}
    }
    Ok(false)
}

/// The flow an ICMP error is about: its inner header, as the packet that caused the error
/// carried it. Aligned for [`crate::mem`].
#[derive(Clone, Copy)]
#[repr(C, align(8))]
pub struct Inner {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
}

/// Parses the inner header of an ICMP error into `inner`. `false` when it is cut short (within
/// the error's IP packet), a later fragment, or not a flow we track.
#[inline(always)]
pub fn parse_inner(ctx: &TcContext, pkt: &Packet, inner: &mut Inner) -> bool {
    parse_inner_impl(ctx, pkt, inner).is_ok()
}

#[inline(always)]
fn parse_inner_impl(ctx: &TcContext, pkt: &Packet, inner: &mut Inner) -> Result<(), Malformed> {
    let off = pkt.l4_off + 8;
    zero16(&mut inner.src);
    zero16(&mut inner.dst);
    let (l4_off, icmp);
    if pkt.family == FAMILY_V4 {
        let mut buf = MaybeUninit::<[u8; 20]>::uninit();
        let h = header(ctx, off, &mut buf)?;
        let b0 = h.u8(0);
        // A later fragment carries no L4 header: where its ports would be is payload.
        if b0 >> 4 != 4 || b0 & 0x0f < 5 || h.be16(6) & 0x1fff != 0 {
            return Err(Malformed);
        }
        inner.proto = h.u8(9);
        v4_addrs(h, &mut inner.src, &mut inner.dst);
        l4_off = off + ((b0 & 0x0f) as u32) * 4;
        icmp = PROTO_ICMP;
    } else {
        let mut buf = MaybeUninit::<[u8; 40]>::uninit();
        let h = header(ctx, off, &mut buf)?;
        if h.u8(0) >> 4 != 6 {
            return Err(Malformed);
        }
        inner.proto = h.u8(6);
        h.addr16(8, &mut inner.src);
        h.addr16(24, &mut inner.dst);
        l4_off = off + 40;
        icmp = PROTO_ICMPV6;
    }
    // The quote is what the error's IP packet holds, not the frame's bytes after it. The L4
    // header follows the quoted IP header, so this one check bounds both.
    if l4_off + 8 > pkt.ip_end {
        return Err(Malformed);
    }
    let mut buf = MaybeUninit::<[u8; 8]>::uninit();
    let t = header(ctx, l4_off, &mut buf)?;
    match inner.proto {
        PROTO_TCP | PROTO_UDP | PROTO_SCTP => {
            inner.sport = t.be16(0);
            inner.dport = t.be16(2);
        }
        // As in `parse_l4`: the ICMP of the quote's family only.
        p if p == icmp => {
            let ty = t.u8(0);
            let echo = if icmp == PROTO_ICMPV6 {
                matches!(ty, 128 | 129)
            } else {
                matches!(ty, 0 | 8)
            };
            if !echo {
                return Err(Malformed);
            }
            let id = t.be16(4);
            inner.sport = id;
            inner.dport = id;
        }
        _ => return Err(Malformed),
    }
    Ok(())
}
