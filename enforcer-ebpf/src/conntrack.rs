//! Conntrack and fragment keys, address helpers.

use enforcer_common::{
    Config, CtKey, DEFAULT_CT_TIMEOUT_OTHER_NS, DEFAULT_CT_TIMEOUT_TCP_NS, FragKey, PROTO_TCP,
};

use crate::{
    mem::{copy16, word},
    parse::Packet,
};

/// Byte-wise equality of two addresses (no memcmp in BPF), a word at a time.
#[inline(always)]
pub fn addr_eq(a: &[u8; 16], b: &[u8; 16]) -> bool {
    (word(a, 0) ^ word(b, 0)) | (word(a, 1) ^ word(b, 1)) | (word(a, 2) ^ word(b, 2))
        | (word(a, 3) ^ word(b, 3))
        == 0
}

/// `(a, pa) <= (b, pb)`, comparing address bytes then port (big-endian words compare as bytes).
#[inline(always)]
fn end_le(a: &[u8; 16], pa: u16, b: &[u8; 16], pb: u16) -> bool {
    let mut i = 0;
    while i < 4 {
        let x = u32::from_be(word(a, i));
        let y = u32::from_be(word(b, i));
        if x != y {
            return x < y;
        }
        i += 1;
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
        copy16(&mut key.addr_a, src);
        copy16(&mut key.addr_b, dst);
        key.port_a = sport;
        key.port_b = dport;
    } else {
        copy16(&mut key.addr_a, dst);
        copy16(&mut key.addr_b, src);
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
    copy16(&mut key.src, &pkt.src);
    copy16(&mut key.dst, &pkt.dst);
}
/// Idle timeout of a flow of `proto` (ns). A CONFIG of zeros means the defaults.
#[inline(always)]
pub fn timeout(cfg: Option<&Config>, proto: u8) -> u64 {
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

/// Whether an entry last seen at `last_seen` is still live at `now`. A stamp ahead of `now` (one
/// taken by the precise clock of an older program, which runs up to a tick ahead of the coarse
/// one) counts as just seen.
#[inline(always)]
pub fn fresh(now: u64, last_seen: u64, timeout: u64) -> bool {
    now.saturating_sub(last_seen) <= timeout
}

/// Global flags from CONFIG.
#[inline(always)]
pub fn config_flags(cfg: Option<&Config>) -> u32 {
    match cfg {
        Some(c) => c.flags,
        None => 0,
    }
}
