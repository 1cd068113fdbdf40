//! What the programs report: per-CPU counters for every packet, ring-buffer events for drops
//! (and new allowed flows when asked).

use aya_ebpf::helpers::bpf_ktime_get_ns;
use enforcer_common::{VerdictEvent, counter_index, is_drop_reason};

use crate::{
    maps::{COUNTERS, EVENTS, EVENTS_LOST},
    mem::copy16,
    parse::Packet,
};

/// The decision about one packet.
#[derive(Clone, Copy)]
pub struct Verdict {
    pub reason: u8,
    pub rule: u32,
    pub peer_identity: u32,
    /// A new flow was allowed and tracked (reported when `CONFIG_LOG_ALLOWED`).
    pub new_flow: bool,
}

impl Verdict {
    #[inline(always)]
    pub const fn new(reason: u8) -> Self {
        Self {
            reason,
            rule: 0,
            peer_identity: 0,
            new_flow: false,
        }
    }

    #[inline(always)]
    pub const fn is_drop(&self) -> bool {
        is_drop_reason(self.reason)
    }
}

#[inline(always)]
pub fn count(endpoint: u32, direction: u8, reason: u8, bytes: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(counter_index(endpoint, direction, reason)) {
        // Per-CPU slot: no other writer while this program runs on this CPU.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes as u64;
        }
    }
}

/// Sends one event; a full ring buffer loses the event, never the packet.
#[inline(always)]
pub fn emit(endpoint: u32, direction: u8, pkt: &Packet, v: &Verdict, bytes: u32) {
    let Some(mut entry) = EVENTS.reserve::<VerdictEvent>(0) else {
        if let Some(lost) = EVENTS_LOST.get_ptr_mut(0) {
            // Per-CPU slot: no other writer while this program runs on this CPU.
            unsafe { *lost += 1 };
        }
        return;
    };
    // Field by field into the reserved record: no 64-byte temporary on the stack.
    let e: *mut VerdictEvent = entry.as_mut_ptr();
    unsafe {
        (*e).timestamp_ns = bpf_ktime_get_ns();
        (*e).endpoint = endpoint;
        (*e).peer_identity = v.peer_identity;
        (*e).rule = v.rule;
        (*e).bytes = bytes;
        copy16(&mut (*e).src, &pkt.src);
        copy16(&mut (*e).dst, &pkt.dst);
        (*e).sport = pkt.sport;
        (*e).dport = pkt.dport;
        (*e).family = pkt.family;
        (*e).protocol = pkt.proto;
        (*e).direction = direction;
        (*e).reason = v.reason;
    }
    entry.submit(0);
}
