//! Audit mode's would-drop: a new flow no policy entry allows, in a direction only audit
//! policies isolate (`EP_*_AUDIT`), is let through, tracked and reported as `ALLOW_AUDIT`.
//!
//! `from_pod` and `to_pod` reach this through a tail call (`SVC_PROG_AUDIT`) at the point where
//! enforcing would drop, so it is verified as a program of its own: their verifier budget pays
//! one flag test, not this path. Everything else about the flow (the re-check after a policy
//! change, which revokes it once an enforcing policy isolates that direction) is theirs.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use enforcer_common::{DIR_EGRESS, FragValue, RULE_AUDIT, reason};

use crate::{
    conntrack::{admit, ct_insert, frag_key, new_entry, release},
    maps::{CONFIG, FRAGMENTS, SCRATCH},
    parse::FRAG_FIRST,
    verdict::{Verdict, count, emit},
};

#[inline(always)]
pub fn audit(ctx: &TcContext) -> i32 {
    let bytes = ctx.len();
    let Some(s) = SCRATCH.get_ptr_mut(0) else {
        // Cannot happen (a one-slot per-CPU array); fail closed, counted as malformed.
        count(0, DIR_EGRESS, reason::DROP_MALFORMED, bytes);
        return TC_ACT_SHOT;
    };
    // SAFETY: this CPU's scratch slot, filled by the program that tail-called this one.
    let s = unsafe { &mut *s };
    let (endpoint, epoch, dir) = (s.audit.endpoint, s.audit.epoch, s.audit.direction);
    let now = crate::clock();
    let cfg = CONFIG.get(0);
    let mut v = Verdict::new(reason::ALLOW_AUDIT);
    v.peer_identity = s.audit.peer_identity;
    if !admit(endpoint, dir, now, cfg) {
        v.reason = reason::DROP_FLOW_LIMIT;
    } else {
        let value = new_entry(s.audit.src_is_a != 0, dir, now, epoch, RULE_AUDIT);
        if ct_insert(&s.ct, &value, now, cfg).is_err() {
            release(endpoint, dir, cfg);
            v.reason = reason::DROP_MAP_FULL;
        } else if s.pkt.frag == FRAG_FIRST {
            // Its later fragments pass as the flow's (failing to record drops them).
            frag_key(&mut s.frag, endpoint, dir, &s.pkt);
            let value = FragValue {
                last_seen_ns: now,
                sport: s.pkt.sport,
                dport: s.pkt.dport,
                rule: 0,
            };
            let _ = FRAGMENTS.insert(&s.frag, &value, 0);
        }
    }
    count(endpoint, dir, v.reason, bytes);
    emit(endpoint, dir, &s.pkt, &v, bytes);
    if v.reason == reason::ALLOW_AUDIT {
        TC_ACT_OK
    } else {
        TC_ACT_SHOT
    }
}
