//! Per-packet cost of the real TC programs by `BPF_PROG_TEST_RUN`.
//!
//! Runs on a thread that unshares its network namespace (for the ifindex the kernel resolves
//! from `ctx_in`) with a private bpffs mounted on a temp dir; both go away at the end, also on
//! failure (guards). Every run goes through the same raw `bpf(BPF_PROG_TEST_RUN)` call, for our
//! programs and for a hand-assembled empty program (`r0 = 0; exit`), so the floor is measured by
//! the very same harness.

use std::{
    collections::BTreeMap,
    ffi::CString,
    net::Ipv4Addr,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use enforcer::{
    datapath::{Datapath, DatapathOptions, EventReader, Hook, mount_bpffs},
    reconcile::MapTable,
};
use enforcer_common::{
    DIR_EGRESS, DIR_INGRESS, EP_EGRESS_ISOLATED, EP_HAS_V4, EP_INGRESS_ISOLATED, EndpointInfo,
    PROTO_TCP, PeerInfo, PolicyKey, PolicyValue, REASON_NAMES, reason,
};
use enforcer_policy::state::Prefix;
use enforcer_testkit::netns::ifindex;
use serde::Serialize;

/// Settings of this part.
#[derive(Clone, Debug, Serialize)]
pub struct Settings {
    /// `repeat` of one `BPF_PROG_TEST_RUN` call (the kernel returns the mean ns per run).
    pub repeat: u32,
    /// Calls per figure; the figure is their median.
    pub runs: usize,
    /// Calls with `repeat = 1` per single-shot figure (new flows); the figure is their median.
    pub singles: usize,
    /// `repeat` of one new-flow call through the fresh-port harness (each run a new flow).
    pub new_repeat: u32,
    /// Passes over all scenarios; each figure is the lowest of the passes' medians, so a pass
    /// slowed by other work on the machine does not decide it.
    pub passes: usize,
    pub entries: Vec<u32>,
    pub endpoints: Vec<u32>,
    /// Rounds of the paired flatness measurement (per endpoint count), and `repeat` of each of
    /// its calls: many short rounds, so few of them straddle a change of phase on the host.
    pub pair_rounds: usize,
    pub pair_repeat: u32,
}

/// One (policy entries, endpoints) point.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// Filler policy-map entries (besides the 3 the measured flows need).
    pub entries: u32,
    pub endpoints: u32,
    /// Passes behind the figures (each figure: the lowest of the passes' medians).
    pub passes: usize,
    /// Entries actually in the maps.
    pub policy_map: usize,
    pub peers_map: usize,
    pub cidr_map: usize,
    /// Median ns/run over `runs` calls of `repeat` runs.
    pub floor_ns: f64,
    pub established_ns: f64,
    pub denied_ns: f64,
    pub unmanaged_ns: f64,
    /// New flows timed with many repeats through the fresh-port harness (median ns/run over
    /// `runs` calls of `new_repeat` runs, each run a fresh source port): the harness tail-calling
    /// the empty program (its floor), then our program with an exact-address peer and with an
    /// ipBlock (LPM) peer.
    pub harness_floor_ns: f64,
    pub new_flow_ns: f64,
    pub new_flow_cidr_ns: f64,
    pub new_flow_runs: Vec<u32>,
    pub harness_floor_runs: Vec<u32>,
    /// The kernel's share of a new flow, through the same harness: a hand-assembled program
    /// that only builds the flow's 20-byte key from the frame, misses it in an LRU hash of the
    /// conntrack's shape (20-byte key, 24-byte value, 262,144 entries) and inserts it, each call
    /// at the fill ours had at its own call. No program that tracks flows in the kernel's LRU
    /// hash goes below it.
    pub ct_floor_ns: f64,
    pub ct_floor_runs: Vec<u32>,
    /// The same with a preallocated plain hash of the same shape (no LRU lists; a table that
    /// needs an agent to sweep it): what that design would save on the kernel's share.
    pub ct_hash_floor_ns: f64,
    pub ct_hash_floor_runs: Vec<u32>,
    /// The same fresh key written to one slot of a plain array instead (a hashed index into
    /// 262,144 32-byte slots, compared and overwritten; no locks, no chain, no allocation):
    /// what a flow table touching one cold cache line per new flow would pay here.
    pub slot_floor_ns: f64,
    pub slot_floor_runs: Vec<u32>,
    /// Median ns of single runs (`repeat = 1`).
    pub floor_single_ns: f64,
    pub established_single_ns: f64,
    pub new_flow_single_ns: f64,
    pub new_flow_cidr_single_ns: f64,
    pub denied_single_ns: f64,
    /// The raw per-call means behind the repeat figures.
    pub established_runs: Vec<u32>,
    pub floor_runs: Vec<u32>,
    /// Where the established path's time goes: the cost of paths that stop earlier and
    /// earlier (repeat figures, ns), measured in the largest 1-endpoint scenario only.
    pub breakdown: Vec<(String, f64)>,
    /// Paths that leave the established one after the parse (repeat figures, ns), same scenario.
    pub other_paths: Vec<(String, f64)>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Results {
    pub settings: Settings,
    pub rows: Vec<Row>,
    /// The established path at the most entries against the fewest (above none), measured
    /// pairwise, per endpoint count.
    pub flatness: Vec<Flatness>,
}

/// The established path with `high` filler entries against `low`, both datapaths loaded side by
/// side and their calls alternated with the floor's within each round, so a phase of other work
/// on the machine lands on both alike (the scenario passes measure them seconds apart).
#[derive(Clone, Debug, Serialize)]
pub struct Flatness {
    pub endpoints: u32,
    pub low: u32,
    pub high: u32,
    /// Median over the rounds of (high - floor) / (low - floor).
    pub ratio: f64,
    /// Medians over the rounds, ns/run.
    pub floor_ns: f64,
    pub low_ns: f64,
    pub high_ns: f64,
    /// Per round: (floor, low, high), ns/run.
    pub calls: Vec<(u32, u32, u32)>,
}

// ---------------------------------------------------------------------------------------------
// Raw bpf(2).
// ---------------------------------------------------------------------------------------------

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;

#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Self {
        Self([0; 128])
    }
    fn u32(&mut self, off: usize, v: u32) {
        self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
    }
    fn u64(&mut self, off: usize, v: u64) {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
    }
    fn get_u32(&self, off: usize) -> u32 {
        u32::from_ne_bytes(self.0[off..off + 4].try_into().unwrap())
    }
}

fn sys_bpf(cmd: libc::c_long, attr: &mut Attr) -> std::io::Result<libc::c_long> {
    // SAFETY: attr is a 128-byte, 8-aligned bpf_attr that outlives the call; pointers inside it
    // point to buffers the caller keeps alive.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.0.as_mut_ptr(), attr.0.len()) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Loads `r0 = 0 (TC_ACT_OK); exit` as a SCHED_CLS program: the harness floor.
pub fn load_empty_program() -> Result<OwnedFd> {
    load_sched_cls(
        &[insn(0xb7, 0, 0, 0, 0), insn(0x95, 0, 0, 0, 0)],
        "the empty program",
    )
}

const BPF_LINK_CREATE: libc::c_long = 28;
pub const BPF_TCX_INGRESS: u32 = 46;
pub const BPF_TCX_EGRESS: u32 = 47;

/// The empty program on the TCX ingress and egress hooks of each interface (ifindices of the
/// caller's netns), where our programs sit: the cost of running any TC program there, beside
/// ours. Dropping it detaches the program.
pub struct EmptyHooks {
    pub prog: OwnedFd,
    _links: Vec<OwnedFd>,
}

pub fn attach_empty(ifindices: &[u32]) -> Result<EmptyHooks> {
    let prog = load_empty_program()?;
    let mut links = Vec::new();
    for &ifindex in ifindices {
        for attach_type in [BPF_TCX_INGRESS, BPF_TCX_EGRESS] {
            links.push(
                tcx_link(prog.as_raw_fd(), ifindex, attach_type)
                    .context("attaching the empty program")?,
            );
        }
    }
    Ok(EmptyHooks {
        prog,
        _links: links,
    })
}

/// Attaches `prog` to the TCX hook `attach_type` of `ifindex` (in the calling thread's netns)
/// with a link of its own: closing the returned fd detaches it.
pub fn tcx_link(prog: RawFd, ifindex: u32, attach_type: u32) -> Result<OwnedFd> {
    let mut a = Attr::new();
    a.u32(0, prog as u32);
    a.u32(4, ifindex);
    a.u32(8, attach_type);
    let fd = sys_bpf(BPF_LINK_CREATE, &mut a)
        .with_context(|| format!("BPF_LINK_CREATE on ifindex {ifindex}"))?;
    // SAFETY: the kernel returned a new fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_ENABLE_STATS: libc::c_long = 32;

/// Turns on the kernel's per-program run time and count (`BPF_STATS_RUN_TIME`) while the fd
/// lives. It adds two clock reads to every program run, so it is never on while the headline
/// figures are measured.
pub fn enable_run_stats() -> Result<OwnedFd> {
    let mut a = Attr::new(); // type 0 = BPF_STATS_RUN_TIME
    let fd = sys_bpf(BPF_ENABLE_STATS, &mut a).context("BPF_ENABLE_STATS")?;
    // SAFETY: the kernel returned a new fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// The object (map, program, link) pinned at `pin`.
fn obj_get(pin: &Path) -> Result<OwnedFd> {
    let path = CString::new(pin.as_os_str().as_encoded_bytes())?;
    let mut a = Attr::new();
    a.u64(0, path.as_ptr() as u64);
    let fd = sys_bpf(BPF_OBJ_GET, &mut a)
        .with_context(|| format!("opening the pinned {}", pin.display()))?;
    // SAFETY: the kernel returned a new fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// The program behind a pinned link.
pub fn linked_prog(link_pin: &Path) -> Result<OwnedFd> {
    let link = obj_get(link_pin)?;
    let mut info = [0u64; 8]; // struct bpf_link_info: type, id, prog_id, ...
    obj_info(link.as_raw_fd(), &mut info)?;
    let prog_id = (info[1] & 0xffff_ffff) as u32;
    let mut a = Attr::new();
    a.u32(0, prog_id);
    let fd = sys_bpf(BPF_PROG_GET_FD_BY_ID, &mut a)
        .with_context(|| format!("opening program {prog_id}"))?;
    // SAFETY: the kernel returned a new fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// The packets counted under `direction` and `reason`, summed over every endpoint and CPU, in
/// the COUNTERS map pinned in `maps` (an agent's, read while it runs or after).
pub fn pinned_counter_sum(maps: &Path, direction: u8, reason: u8) -> Result<u64> {
    let map = obj_get(&maps.join(enforcer_common::MAP_COUNTERS))?;
    // A per-CPU value: one `Counter` (packets, bytes) per possible CPU.
    let possible = std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .context("reading the possible CPUs")?;
    let cpus = possible
        .trim()
        .split(',')
        .map(|r| match r.split_once('-') {
            Some((a, b)) => Ok(b.parse::<usize>()? - a.parse::<usize>()? + 1),
            None => r.parse::<usize>().map(|_| 1),
        })
        .sum::<Result<usize, std::num::ParseIntError>>()
        .with_context(|| format!("parsing the possible CPUs {possible:?}"))?;
    let mut values = vec![0u64; 2 * cpus];
    let mut total = 0;
    for endpoint in 0.. {
        let key = enforcer_common::counter_index(endpoint, direction, reason);
        let mut a = Attr::new();
        a.u32(0, map.as_raw_fd() as u32);
        a.u64(8, &key as *const u32 as u64);
        a.u64(16, values.as_mut_ptr() as u64);
        match sys_bpf(BPF_MAP_LOOKUP_ELEM, &mut a) {
            Ok(_) => total += values.iter().step_by(2).sum::<u64>(),
            // Past the last endpoint's slots.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
            Err(e) => return Err(e).context("reading COUNTERS"),
        }
    }
    Ok(total)
}

/// A program's run statistics and JIT size.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProgStats {
    pub id: u32,
    pub run_time_ns: u64,
    pub run_cnt: u64,
    pub jited_bytes: u32,
}

pub fn prog_stats(prog: &OwnedFd) -> Result<ProgStats> {
    let mut info = [0u64; 30]; // struct bpf_prog_info (240 bytes)
    obj_info(prog.as_raw_fd(), &mut info)?;
    Ok(ProgStats {
        id: (info[0] >> 32) as u32,
        run_time_ns: info[192 / 8],
        run_cnt: info[200 / 8],
        jited_bytes: (info[16 / 8] & 0xffff_ffff) as u32,
    })
}

fn obj_info(fd: RawFd, buf: &mut [u64]) -> Result<()> {
    let mut a = Attr::new();
    a.u32(0, fd as u32);
    a.u32(4, (buf.len() * 8) as u32);
    a.u64(8, buf.as_mut_ptr() as u64);
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut a).context("BPF_OBJ_GET_INFO_BY_FD")?;
    Ok(())
}

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_TYPE_PROG_ARRAY: u32 = 3;

/// One BPF instruction: opcode, dst and src registers, offset, immediate.
fn insn(op: u8, dst: u8, src: u8, off: i16, imm: i32) -> [u8; 8] {
    let mut i = [0u8; 8];
    i[0] = op;
    i[1] = (src << 4) | (dst & 0xf);
    i[2..4].copy_from_slice(&off.to_le_bytes());
    i[4..8].copy_from_slice(&imm.to_le_bytes());
    i
}

fn load_sched_cls(insns: &[[u8; 8]], what: &str) -> Result<OwnedFd> {
    let code: Vec<u8> = insns.concat();
    let license = b"GPL\0";
    let mut log = vec![0u8; 64 * 1024];
    let mut a = Attr::new();
    a.u32(0, BPF_PROG_TYPE_SCHED_CLS);
    a.u32(4, insns.len() as u32);
    a.u64(8, code.as_ptr() as u64);
    a.u64(16, license.as_ptr() as u64);
    a.u32(24, 1); // log_level
    a.u32(28, log.len() as u32);
    a.u64(32, log.as_mut_ptr() as u64);
    let fd = sys_bpf(BPF_PROG_LOAD, &mut a).with_context(|| {
        let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
        format!(
            "BPF_PROG_LOAD of {what}: {}",
            String::from_utf8_lossy(&log[..end])
        )
    })?;
    // SAFETY: the kernel returned a new fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// A one-slot `BPF_MAP_TYPE_PROG_ARRAY`.
fn prog_array() -> Result<OwnedFd> {
    let mut a = Attr::new();
    a.u32(0, BPF_MAP_TYPE_PROG_ARRAY);
    a.u32(4, 4);
    a.u32(8, 4);
    a.u32(12, 1);
    let fd = sys_bpf(BPF_MAP_CREATE, &mut a).context("BPF_MAP_CREATE of a prog array")?;
    // SAFETY: the kernel returned a new fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Puts program `prog` in slot 0 of `array`.
fn set_tail(array: RawFd, prog: RawFd) -> Result<()> {
    let key = 0u32;
    let value = prog as u32;
    let mut a = Attr::new();
    a.u32(0, array as u32);
    a.u64(8, &key as *const u32 as u64);
    a.u64(16, &value as *const u32 as u64);
    sys_bpf(BPF_MAP_UPDATE_ELEM, &mut a).context("putting a program in the prog array")?;
    Ok(())
}

/// The new-flow harness: a hand-assembled SCHED_CLS program that adds one to the TCP/UDP
/// source port of the (Ethernet + 20-byte IPv4) frame in place, then tail-calls slot 0 of
/// `array`. `BPF_PROG_TEST_RUN` runs it `repeat` times on the same buffer, so every run hands
/// the program in slot 0 a flow it has not seen: the new-flow path can be timed with many
/// repeats, like the others. Its floor is the same harness tail-calling the empty program.
fn load_fresh_port_harness(array: RawFd) -> Result<OwnedFd> {
    const SPORT: i16 = 14 + 20;
    let insns = [
        insn(0xbf, 6, 1, 0, 0),     // r6 = r1 (ctx)
        insn(0x61, 2, 1, 76, 0),    // r2 = skb->data
        insn(0x61, 3, 1, 80, 0),    // r3 = skb->data_end
        insn(0xbf, 4, 2, 0, 0),     // r4 = r2
        insn(0x07, 4, 0, 0, 36),    // r4 += 36
        insn(0x2d, 4, 3, 3, 0),     // if r4 > r3 goto tail
        insn(0x69, 5, 2, SPORT, 0), // r5 = *(u16 *)(r2 + 34)
        insn(0x07, 5, 0, 0, 1),     // r5 += 1
        insn(0x6b, 2, 5, SPORT, 0), // *(u16 *)(r2 + 34) = r5
        insn(0xbf, 1, 6, 0, 0),     // tail: r1 = r6
        insn(0x18, 2, 1, 0, array), // r2 = the prog array (BPF_PSEUDO_MAP_FD)
        insn(0, 0, 0, 0, 0),
        insn(0xb7, 3, 0, 0, 0),  // r3 = 0
        insn(0x85, 0, 0, 0, 12), // bpf_tail_call(r1, r2, r3)
        insn(0xb7, 0, 0, 0, 0),  // r0 = 0 (only if the slot is empty)
        insn(0x95, 0, 0, 0, 0),  // exit
    ];
    load_sched_cls(&insns, "the new-flow harness")
}

const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_MAP_TYPE_LRU_HASH: u32 = 9;

/// A hash of the IPv4 conntrack map's shape (`BPF_MAP_TYPE_LRU_HASH`, as ours, or the plain
/// preallocated `BPF_MAP_TYPE_HASH`), for [`load_ct_floor`].
fn ct_shaped(map_type: u32) -> Result<OwnedFd> {
    let mut a = Attr::new();
    a.u32(0, map_type);
    a.u32(4, std::mem::size_of::<enforcer_common::CtKeyV4>() as u32);
    a.u32(8, std::mem::size_of::<enforcer_common::CtValue>() as u32);
    a.u32(12, enforcer_common::DEFAULT_CONNTRACK_SIZE);
    let fd =
        sys_bpf(BPF_MAP_CREATE, &mut a).context("BPF_MAP_CREATE of a conntrack-shaped hash")?;
    // SAFETY: the kernel returned a new fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// The kernel's floor of a new flow: a hand-assembled SCHED_CLS program that builds a 20-byte
/// flow key from the frame's addresses and ports (direct packet access, five word stores),
/// looks it up in `map` and, on the miss, inserts a zeroed value: the two map operations our
/// programs do for every new flow, with nothing of ours around them.
fn load_ct_floor(map: RawFd) -> Result<OwnedFd> {
    let insns = [
        insn(0x61, 2, 1, 76, 0),   // 0: r2 = skb->data
        insn(0x61, 3, 1, 80, 0),   // 1: r3 = skb->data_end
        insn(0xbf, 4, 2, 0, 0),    // 2: r4 = r2
        insn(0x07, 4, 0, 0, 38),   // 3: r4 += 38 (Ethernet + IPv4 + ports)
        insn(0x2d, 4, 3, 25, 0),   // 4: if r4 > r3 goto out
        insn(0x62, 10, 0, -24, 1), // 5: key.endpoint = 1
        insn(0x62, 10, 0, -20, 6), // 6: key.protocol = TCP
        insn(0x61, 5, 2, 26, 0),   // 7: r5 = source address
        insn(0x63, 10, 5, -16, 0), // 8: key.addr_a = r5
        insn(0x61, 5, 2, 30, 0),   // 9: r5 = destination address
        insn(0x63, 10, 5, -12, 0), // 10: key.addr_b = r5
        insn(0x61, 5, 2, 34, 0),   // 11: r5 = both ports
        insn(0x63, 10, 5, -8, 0),  // 12: key ports = r5
        insn(0x18, 1, 1, 0, map),  // 13: r1 = map (BPF_PSEUDO_MAP_FD)
        insn(0, 0, 0, 0, 0),       // 14
        insn(0xbf, 2, 10, 0, 0),   // 15: r2 = r10
        insn(0x07, 2, 0, 0, -24),  // 16: r2 += -24 (&key)
        insn(0x85, 0, 0, 0, 1),    // 17: r0 = bpf_map_lookup_elem(r1, r2)
        insn(0x55, 0, 0, 11, 0),   // 18: if r0 != 0 goto out
        insn(0x7a, 10, 0, -48, 0), // 19: value = 0 (24 bytes)
        insn(0x7a, 10, 0, -40, 0), // 20
        insn(0x7a, 10, 0, -32, 0), // 21
        insn(0x18, 1, 1, 0, map),  // 22: r1 = map
        insn(0, 0, 0, 0, 0),       // 23
        insn(0xbf, 2, 10, 0, 0),   // 24: r2 = r10
        insn(0x07, 2, 0, 0, -24),  // 25: r2 += -24 (&key)
        insn(0xbf, 3, 10, 0, 0),   // 26: r3 = r10
        insn(0x07, 3, 0, 0, -48),  // 27: r3 += -48 (&value)
        insn(0xb7, 4, 0, 0, 0),    // 28: r4 = BPF_ANY
        insn(0x85, 0, 0, 0, 2),    // 29: bpf_map_update_elem(r1, r2, r3, r4)
        insn(0xb7, 0, 0, 0, 0),    // 30: out: r0 = 0
        insn(0x95, 0, 0, 0, 0),    // 31: exit
    ];
    load_sched_cls(&insns, "the conntrack floor program")
}

const BPF_MAP_TYPE_ARRAY: u32 = 2;
/// Slots of [`slot_array`], a power of two (the probe masks its hash with `SLOTS - 1`).
const SLOTS: u32 = 1 << 18;

/// A plain array of 32-byte slots, for [`load_slot_floor`].
fn slot_array() -> Result<OwnedFd> {
    let mut a = Attr::new();
    a.u32(0, BPF_MAP_TYPE_ARRAY);
    a.u32(4, 4);
    a.u32(8, 32);
    a.u32(12, SLOTS);
    let fd = sys_bpf(BPF_MAP_CREATE, &mut a).context("BPF_MAP_CREATE of an array")?;
    // SAFETY: the kernel returned a new fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// The floor of a flow table that touches one cache line per new flow: a hand-assembled
/// SCHED_CLS program that hashes the frame's addresses and ports (multiply and xor) to a slot
/// of `map` (an array: the verifier inlines the lookup), compares the slot's 12-byte key and,
/// on a mismatch, writes the key and a value word. No locks, no chain, no allocation: the
/// cost is the cold slot.
fn load_slot_floor(map: RawFd) -> Result<OwnedFd> {
    let insns = [
        insn(0x61, 2, 1, 76, 0),                 // 0: r2 = skb->data
        insn(0x61, 3, 1, 80, 0),                 // 1: r3 = skb->data_end
        insn(0xbf, 4, 2, 0, 0),                  // 2: r4 = r2
        insn(0x07, 4, 0, 0, 38),                 // 3: r4 += 38 (Ethernet + IPv4 + ports)
        insn(0x2d, 4, 3, 30, 0),                 // 4: if r4 > r3 goto out
        insn(0x61, 6, 2, 26, 0),                 // 5: r6 = source address
        insn(0x61, 7, 2, 30, 0),                 // 6: r7 = destination address
        insn(0x61, 8, 2, 34, 0),                 // 7: r8 = both ports
        insn(0xbf, 5, 7, 0, 0),                  // 8: r5 = r7
        insn(0x27, 5, 0, 0, 0x05eb_ca6b),        // 9: r5 *= k1
        insn(0xaf, 5, 6, 0, 0),                  // 10: r5 ^= r6
        insn(0xbf, 9, 8, 0, 0),                  // 11: r9 = r8
        insn(0x27, 9, 0, 0, 0x02b2_ae35),        // 12: r9 *= k2
        insn(0xaf, 5, 9, 0, 0),                  // 13: r5 ^= r9
        insn(0x27, 5, 0, 0, 0x1e37_79b1),        // 14: r5 *= k3
        insn(0x77, 5, 0, 0, 20),                 // 15: r5 >>= 20
        insn(0x57, 5, 0, 0, (SLOTS - 1) as i32), // 16: r5 &= SLOTS - 1
        insn(0x63, 10, 5, -4, 0),                // 17: index = r5
        insn(0x18, 1, 1, 0, map),                // 18: r1 = map (BPF_PSEUDO_MAP_FD)
        insn(0, 0, 0, 0, 0),                     // 19
        insn(0xbf, 2, 10, 0, 0),                 // 20: r2 = r10
        insn(0x07, 2, 0, 0, -4),                 // 21: r2 += -4 (&index)
        insn(0x85, 0, 0, 0, 1),                  // 22: r0 = bpf_map_lookup_elem(r1, r2)
        insn(0x15, 0, 0, 11, 0),                 // 23: if r0 == 0 goto out
        insn(0x61, 4, 0, 0, 0),                  // 24: r4 = slot.addr_a
        insn(0x5d, 4, 6, 5, 0),                  // 25: if r4 != r6 goto write
        insn(0x61, 4, 0, 4, 0),                  // 26: r4 = slot.addr_b
        insn(0x5d, 4, 7, 3, 0),                  // 27: if r4 != r7 goto write
        insn(0x61, 4, 0, 8, 0),                  // 28: r4 = slot.ports
        insn(0x5d, 4, 8, 1, 0),                  // 29: if r4 != r8 goto write
        insn(0x05, 0, 0, 4, 0),                  // 30: goto out (a hit)
        insn(0x63, 0, 6, 0, 0),                  // 31: write: slot.addr_a = r6
        insn(0x63, 0, 7, 4, 0),                  // 32: slot.addr_b = r7
        insn(0x63, 0, 8, 8, 0),                  // 33: slot.ports = r8
        insn(0x7a, 0, 0, 16, 1),                 // 34: slot.value = 1
        insn(0xb7, 0, 0, 0, 0),                  // 35: out: r0 = 0
        insn(0x95, 0, 0, 0, 0),                  // 36: exit
    ];
    load_sched_cls(&insns, "the one-slot flow table floor program")
}

/// Checks that [`load_slot_floor`] stored the key of the last run of a harness call on `frame`
/// (`runs` runs) in the slot its hash names: the probe did the work it is timed for.
fn check_slot(map: RawFd, frame: &[u8], runs: u32) -> Result<()> {
    let word = |o: usize| u32::from_le_bytes([frame[o], frame[o + 1], frame[o + 2], frame[o + 3]]);
    // The harness adds one to the little-endian u16 at the source port, once per run.
    let sport = u16::from_le_bytes([frame[34], frame[35]]).wrapping_add(runs as u16);
    let [p0, p1] = sport.to_le_bytes();
    let ports = u32::from_le_bytes([p0, p1, frame[36], frame[37]]);
    let (a, b) = (u64::from(word(26)), u64::from(word(30)));
    let h = (b.wrapping_mul(0x05eb_ca6b) ^ a ^ u64::from(ports).wrapping_mul(0x02b2_ae35))
        .wrapping_mul(0x1e37_79b1);
    let index = ((h >> 20) as u32) & (SLOTS - 1);
    let mut slot = [0u8; 32];
    let mut attr = Attr::new();
    attr.u32(0, map as u32);
    attr.u64(8, &index as *const u32 as u64);
    attr.u64(16, slot.as_mut_ptr() as u64);
    sys_bpf(BPF_MAP_LOOKUP_ELEM, &mut attr).context("reading the probe's slot")?;
    let got = |o: usize| u32::from_le_bytes([slot[o], slot[o + 1], slot[o + 2], slot[o + 3]]);
    if (got(0), got(4), got(8)) != (word(26), word(30), ports) {
        bail!("the one-slot probe did not store the last key in slot {index}");
    }
    Ok(())
}

/// One `BPF_PROG_TEST_RUN`: (return value, mean ns per run).
fn test_run(fd: RawFd, data: &[u8], ctx: &[u8], repeat: u32) -> Result<(u32, u32)> {
    let mut out = vec![0u8; data.len() + 256];
    let mut a = Attr::new();
    a.u32(0, fd as u32);
    a.u32(8, data.len() as u32);
    a.u32(12, out.len() as u32);
    a.u64(16, data.as_ptr() as u64);
    a.u64(24, out.as_mut_ptr() as u64);
    a.u32(32, repeat);
    a.u32(40, ctx.len() as u32);
    a.u64(48, ctx.as_ptr() as u64);
    sys_bpf(BPF_PROG_TEST_RUN, &mut a).context("BPF_PROG_TEST_RUN")?;
    Ok((a.get_u32(4), a.get_u32(36)))
}

/// A `struct __sk_buff` with only `ifindex` set (as the loader's own `test_run` builds it).
fn sk_buff_ctx(ifindex: u32) -> Vec<u8> {
    let mut ctx = vec![0u8; 192];
    ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
    ctx
}

// ---------------------------------------------------------------------------------------------
// Frames.
// ---------------------------------------------------------------------------------------------

fn csum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A 64-byte Ethernet/IPv4/TCP frame (10 bytes of payload).
fn tcp_frame(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x08, 0x00];
    let mut ip = vec![0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&50u16.to_be_bytes());
    ip[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64;
    ip[9] = PROTO_TCP;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let c = csum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags;
    t[14..16].copy_from_slice(&64240u16.to_be_bytes());
    f.extend_from_slice(&t);
    f.extend_from_slice(b"0123456789");
    f
}

const SYN: u8 = 0x02;
const ACK_PSH: u8 = 0x18;

// Addresses and identities of the measured flows.
const POD: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 1);
const DENIED: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 2);
const CIDR_PEER: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 5);
const HOST: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 1);
const ID_CLIENT: u32 = 300;
const ID_DENIED: u32 = 301;
const ID_CIDR: u32 = 2000;
const PORT: u16 = 80;
const EP: u32 = 1;

/// The client address of new-flow harness call `j` (identity `ID_CLIENT`).
fn harness_client(j: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 1, 1, j as u8)
}

/// An address in the ipBlock peer's /24 for harness call `j` (not in the exact-peer map).
fn harness_cidr_peer(j: usize) -> Ipv4Addr {
    Ipv4Addr::new(100, 64, 0, 16 + j as u8)
}

// ---------------------------------------------------------------------------------------------
// Guards.
// ---------------------------------------------------------------------------------------------

/// A bpffs on a temp dir; unmounted and removed on drop.
struct BpfMount(PathBuf);

impl BpfMount {
    fn new() -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("enforcer-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let m = Self(dir);
        mount_bpffs(&m.0).context("mounting a bpffs (run as root)")?;
        Ok(m)
    }
}

impl Drop for BpfMount {
    fn drop(&mut self) {
        let _ = Datapath::cleanup(&self.0.join("enforcer"));
        if let Ok(c) = std::ffi::CString::new(self.0.as_os_str().as_encoded_bytes()) {
            // SAFETY: valid NUL-terminated path.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn median_u32(v: &[u32]) -> f64 {
    let mut f: Vec<f64> = v.iter().map(|&x| f64::from(x)).collect();
    median(&mut f)
}

// ---------------------------------------------------------------------------------------------
// The measurement.
// ---------------------------------------------------------------------------------------------

/// The devices whose ifindexes the runs' ctx names (the kernel resolves it to a device).
#[derive(Clone, Copy)]
struct Devices {
    /// The measured endpoint's veth (`to_pod`; the Service path's backend).
    ifx: u32,
    /// Its peer, never an endpoint.
    unmanaged: u32,
    /// An endpoint isolated in no direction (the breakdown).
    open_if: u32,
    /// The Service path's client pod (`from_pod`).
    client: u32,
}

/// Runs `f` on a thread of its own that unshares its network namespace, with the devices of
/// [`Devices`] and a private bpffs; both go with the thread, also on failure.
fn in_private_netns<T: Send + 'static>(
    name: &str,
    f: impl FnOnce(Devices, &BpfMount) -> Result<T> + Send + 'static,
) -> Result<T> {
    let handle = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || -> Result<T> {
            // SAFETY: unshare on this thread only; the namespace and its veths go with the thread.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error())
                    .context("unshare(CLONE_NEWNET): run as root");
            }
            ip(&["link", "set", "lo", "up"])?;
            for (dev, peer) in [
                ("bnch0", "bnch0p"),
                ("bnch1", "bnch1p"),
                ("bnch2", "bnch2p"),
            ] {
                ip(&[
                    "link", "add", "name", dev, "type", "veth", "peer", "name", peer,
                ])?;
                ip(&["link", "set", dev, "up"])?;
            }
            let devices = Devices {
                ifx: ifindex("bnch0")?,
                unmanaged: ifindex("bnch0p")?,
                open_if: ifindex("bnch1")?,
                client: ifindex("bnch2")?,
            };
            let mount = BpfMount::new()?;
            f(devices, &mount)
        })?;
    handle
        .join()
        .map_err(|_| anyhow::anyhow!("the {name} thread panicked"))?
}

/// Runs the whole part on its own thread (private netns + bpffs).
pub fn run(settings: Settings) -> Result<Results> {
    in_private_netns("testrun", move |devices, mount| -> Result<Results> {
        let Devices {
            ifx,
            unmanaged,
            open_if,
            ..
        } = devices;
        let pin = mount.0.join("enforcer");
        let empty = load_empty_program()?;
        let scenarios: Vec<(u32, u32)> = settings
            .endpoints
            .iter()
            .flat_map(|&ep| settings.entries.iter().map(move |&en| (ep, en)))
            .collect();
        let mut passes: Vec<Vec<Row>> = vec![Vec::new(); scenarios.len()];
        for pass in 0..settings.passes.max(1) {
            // Each pass starts at another scenario, so a slow phase that recurs with the
            // period of a pass does not land on the same scenario every time.
            for k in 0..scenarios.len() {
                let i = (k + pass * 3) % scenarios.len();
                let (endpoints, entries) = scenarios[i];
                {
                    eprintln!(
                        "  test_run pass {}: {entries} entries, {endpoints} endpoints",
                        pass + 1
                    );
                    let breakdown =
                        endpoints == 1 && Some(&entries) == settings.entries.iter().max();
                    let got = scenario(
                        &settings,
                        &pin,
                        [ifx, unmanaged, open_if],
                        empty.as_raw_fd(),
                        entries,
                        endpoints,
                        breakdown,
                    )
                    .with_context(|| {
                        format!("scenario {entries} entries / {endpoints} endpoints")
                    })?;
                    let row = got.row();
                    drop(got);
                    eprintln!(
                        "    floor {:.0} ns, established {:.0} ns, denied {:.0} ns, harness {:.0} ns, kernel ct {:.0} ns (plain hash {:.0}), new {:.0} ns, new ipBlock {:.0} ns | single: floor {:.0}, established {:.0}, new {:.0}, denied {:.0}",
                        row.floor_ns,
                        row.established_ns,
                        row.denied_ns,
                        row.harness_floor_ns,
                        row.ct_floor_ns,
                        row.ct_hash_floor_ns,
                        row.new_flow_ns,
                        row.new_flow_cidr_ns,
                        row.floor_single_ns,
                        row.established_single_ns,
                        row.new_flow_single_ns,
                        row.denied_single_ns
                    );
                    passes[i].push(row);
                }
            }
        }
        let mut flatness = Vec::new();
        let low = settings.entries.iter().copied().filter(|&e| e > 0).min();
        let high = settings.entries.iter().copied().max();
        if let (Some(low), Some(high)) = (low, high)
            && low < high
        {
            for &endpoints in &settings.endpoints {
                eprintln!(
                    "  test_run flatness: {low} vs {high} entries, {endpoints} endpoints, side by side"
                );
                let got = flatness_pair(
                    &settings,
                    &mount.0,
                    [ifx, unmanaged, open_if],
                    empty.as_raw_fd(),
                    (low, high),
                    endpoints,
                )
                .with_context(|| {
                    format!("flatness {low} / {high} entries, {endpoints} endpoints")
                })?;
                eprintln!(
                    "    floor {:.0} ns, {low} entries {:.0} ns, {high} entries {:.0} ns: {:.2}x net",
                    got.floor_ns, got.low_ns, got.high_ns, got.ratio
                );
                flatness.push(got);
            }
        }
        let rows = passes.iter().map(|p| best_of(p)).collect();
        Ok(Results {
            settings,
            rows,
            flatness,
        })
    })
}

/// The paired flatness measurement (see [`Flatness`]): two datapaths in their own pin folders,
/// one round = the floor, both established flows (their order alternating) and the floor again.
fn flatness_pair(
    s: &Settings,
    bpffs: &Path,
    ifaces: [u32; 3],
    empty: RawFd,
    (low, high): (u32, u32),
    endpoints: u32,
) -> Result<Flatness> {
    let pins = [bpffs.join("flat-low"), bpffs.join("flat-high")];
    let result = (|| -> Result<Flatness> {
        let a = load(s.runs, &pins[0], ifaces, low, endpoints)?;
        let b = load(s.runs, &pins[1], ifaces, high, endpoints)?;
        let ctx = sk_buff_ctx(ifaces[0]);
        let est = tcp_frame(CLIENT, POD, 40000, PORT, ACK_PSH);
        for l in [&a, &b] {
            expect(
                reason_of(&l.dp, l.fd, &est, &ctx)?,
                0,
                reason::ALLOW_ESTABLISHED,
                "established",
            )?;
        }
        let mut calls = Vec::with_capacity(s.pair_rounds);
        let mut ratios = Vec::with_capacity(s.pair_rounds);
        for round in 0..s.pair_rounds {
            let f1 = test_run(empty, &est, &ctx, s.pair_repeat)?.1;
            let (x, y) = if round % 2 == 0 {
                (a.fd, b.fd)
            } else {
                (b.fd, a.fd)
            };
            let first = test_run(x, &est, &ctx, s.pair_repeat)?.1;
            let second = test_run(y, &est, &ctx, s.pair_repeat)?.1;
            let f2 = test_run(empty, &est, &ctx, s.pair_repeat)?.1;
            let (lo, hi) = if round % 2 == 0 {
                (first, second)
            } else {
                (second, first)
            };
            let floor = f1.min(f2);
            calls.push((floor, lo, hi));
            if lo > floor {
                ratios.push(f64::from(hi.saturating_sub(floor)) / f64::from(lo - floor));
            }
        }
        if ratios.is_empty() {
            bail!("no round measured the {low}-entry path above the floor");
        }
        let col = |i: usize| -> f64 {
            median(
                &mut calls
                    .iter()
                    .map(|c| f64::from([c.0, c.1, c.2][i]))
                    .collect::<Vec<_>>(),
            )
        };
        Ok(Flatness {
            endpoints,
            low,
            high,
            ratio: median(&mut ratios),
            floor_ns: col(0),
            low_ns: col(1),
            high_ns: col(2),
            calls,
        })
    })();
    for p in &pins {
        let _ = Datapath::cleanup(p);
    }
    result
}

fn endpoint(id: u32, ip: Ipv4Addr) -> EndpointInfo {
    EndpointInfo {
        id,
        flags: EP_INGRESS_ISOLATED | EP_EGRESS_ISOLATED | EP_HAS_V4,
        epoch: 1,
        identity: 256 + id,
        // Exact-port entries only, in both directions.
        port_masks: [1 << 16, 1 << 16],
        ipv4: ip.octets(),
        ipv6: [0; 16],
    }
}

fn allow(dp: &mut Datapath, ep: u32, identity: u32, port: u16, rule: u32) -> Result<()> {
    dp.policy.set(
        &PolicyKey::new(ep, identity, DIR_INGRESS, PROTO_TCP, port, 16),
        &PolicyValue { rule, _pad: 0 },
    )
}

/// Everything one scenario measured in one pass, raw.
struct Samples {
    entries: u32,
    endpoints: u32,
    policy_map: usize,
    peers_map: usize,
    cidr_map: usize,
    floor: Vec<u32>,
    est: Vec<u32>,
    denied: Vec<u32>,
    unmanaged: Vec<u32>,
    harness: Vec<u32>,
    ct_floor: Vec<u32>,
    ct_hash_floor: Vec<u32>,
    slot_floor: Vec<u32>,
    new: Vec<u32>,
    new_cidr: Vec<u32>,
    f1: Vec<f64>,
    e1: Vec<f64>,
    n1: Vec<f64>,
    c1: Vec<f64>,
    d1: Vec<f64>,
    breakdown: Vec<(String, Vec<u32>)>,
    other_paths: Vec<(String, Vec<u32>)>,
}

impl Samples {
    /// This pass's figures: the median of its calls.
    fn row(&self) -> Row {
        let m = |v: &Vec<f64>| median(&mut v.clone());
        let named = |v: &Vec<(String, Vec<u32>)>| {
            v.iter().map(|(n, r)| (n.clone(), median_u32(r))).collect()
        };
        Row {
            entries: self.entries,
            endpoints: self.endpoints,
            passes: 1,
            policy_map: self.policy_map,
            peers_map: self.peers_map,
            cidr_map: self.cidr_map,
            floor_ns: median_u32(&self.floor),
            established_ns: median_u32(&self.est),
            denied_ns: median_u32(&self.denied),
            unmanaged_ns: median_u32(&self.unmanaged),
            harness_floor_ns: median_u32(&self.harness),
            new_flow_ns: median_u32(&self.new),
            new_flow_cidr_ns: median_u32(&self.new_cidr),
            new_flow_runs: self.new.clone(),
            harness_floor_runs: self.harness.clone(),
            ct_floor_ns: median_u32(&self.ct_floor),
            ct_floor_runs: self.ct_floor.clone(),
            ct_hash_floor_ns: median_u32(&self.ct_hash_floor),
            ct_hash_floor_runs: self.ct_hash_floor.clone(),
            slot_floor_ns: median_u32(&self.slot_floor),
            slot_floor_runs: self.slot_floor.clone(),
            floor_single_ns: m(&self.f1),
            established_single_ns: m(&self.e1),
            new_flow_single_ns: m(&self.n1),
            new_flow_cidr_single_ns: m(&self.c1),
            denied_single_ns: m(&self.d1),
            established_runs: self.est.clone(),
            floor_runs: self.floor.clone(),
            breakdown: named(&self.breakdown),
            other_paths: named(&self.other_paths),
        }
    }
}

/// One scenario's rows of every pass made one: each figure is the lowest of the passes'
/// medians (other work on the machine only ever adds time, and it comes in phases of seconds
/// that can cover a whole pass); the raw calls of every pass are kept.
fn best_of(passes: &[Row]) -> Row {
    let mut out = passes[0].clone();
    for r in &passes[1..] {
        for (a, b) in [
            (&mut out.floor_ns, r.floor_ns),
            (&mut out.established_ns, r.established_ns),
            (&mut out.denied_ns, r.denied_ns),
            (&mut out.unmanaged_ns, r.unmanaged_ns),
            (&mut out.harness_floor_ns, r.harness_floor_ns),
            (&mut out.ct_floor_ns, r.ct_floor_ns),
            (&mut out.ct_hash_floor_ns, r.ct_hash_floor_ns),
            (&mut out.slot_floor_ns, r.slot_floor_ns),
            (&mut out.new_flow_ns, r.new_flow_ns),
            (&mut out.new_flow_cidr_ns, r.new_flow_cidr_ns),
            (&mut out.floor_single_ns, r.floor_single_ns),
            (&mut out.established_single_ns, r.established_single_ns),
            (&mut out.new_flow_single_ns, r.new_flow_single_ns),
            (&mut out.new_flow_cidr_single_ns, r.new_flow_cidr_single_ns),
            (&mut out.denied_single_ns, r.denied_single_ns),
        ] {
            *a = a.min(b);
        }
        for (a, b) in [
            (&mut out.new_flow_runs, &r.new_flow_runs),
            (&mut out.harness_floor_runs, &r.harness_floor_runs),
            (&mut out.ct_floor_runs, &r.ct_floor_runs),
            (&mut out.ct_hash_floor_runs, &r.ct_hash_floor_runs),
            (&mut out.slot_floor_runs, &r.slot_floor_runs),
            (&mut out.established_runs, &r.established_runs),
            (&mut out.floor_runs, &r.floor_runs),
        ] {
            a.extend_from_slice(b);
        }
        for (mine, theirs) in [
            (&mut out.breakdown, &r.breakdown),
            (&mut out.other_paths, &r.other_paths),
        ] {
            for ((_, a), (_, b)) in mine.iter_mut().zip(theirs) {
                *a = a.min(*b);
            }
        }
    }
    out.passes = passes.len();
    out
}

/// A scenario's datapath: loaded by the agent's loader, filled, and every measured frame's path
/// checked by the counter it moves.
struct Loaded {
    dp: Datapath,
    events: Option<EventReader>,
    /// `to_pod` (owned by `dp`).
    fd: RawFd,
    policy_map: usize,
    peers_map: usize,
    cidr_map: usize,
}

/// The reason of the one counter `frame` moves through `fd`, with the program's action.
fn reason_of(dp: &Datapath, fd: RawFd, frame: &[u8], ctx: &[u8]) -> Result<(u32, u8)> {
    let before = dp.counters.read()?;
    let (ret, _) = test_run(fd, frame, ctx, 1)?;
    let after = dp.counters.read()?;
    let moved: Vec<_> = after
        .iter()
        .filter(|(k, v)| before.get(k).map_or(0, |b| b.packets) != v.packets)
        .map(|(k, _)| *k)
        .collect();
    match moved.as_slice() {
        [(_, _, r)] => Ok((ret, *r)),
        other => bail!("expected one counter to move, got {other:?}"),
    }
}

fn expect(got: (u32, u8), want_ret: u32, want: u8, what: &str) -> Result<()> {
    if got != (want_ret, want) {
        bail!(
            "{what}: action {} reason {} (want {want_ret} {})",
            got.0,
            REASON_NAMES[got.1 as usize],
            REASON_NAMES[want as usize]
        );
    }
    Ok(())
}

/// `harness_calls`: the new-flow harness calls the scenario makes (a client address each).
fn load(
    harness_calls: usize,
    pin: &std::path::Path,
    [ifx, unmanaged, open_if]: [u32; 3],
    entries: u32,
    endpoints: u32,
) -> Result<Loaded> {
    let _ = Datapath::cleanup(pin);
    let opts = DatapathOptions {
        pin_path: pin.to_path_buf(),
        max_endpoints: 1024,
        peers_size: 131_072,
        policy_size: 262_144,
        conntrack_size: enforcer_common::DEFAULT_CONNTRACK_SIZE,
        // New flows pay the per-pod flow limit's check and count as under a sweeping agent,
        // with a limit no run reaches.
        max_flows_per_endpoint: u32::MAX,
        ..Default::default()
    };
    let mut dp = Datapath::open(opts).context("loading the programs")?;
    dp.conntrack.flow_counts().keep_until(u64::MAX);
    let mut events = dp.take_events();

    // Endpoints: the measured one on the real device, the others on ifindexes with no device
    // (the program only looks its own ifindex up).
    dp.endpoints.set(&ifx, &endpoint(EP, POD))?;
    for id in 2..=endpoints {
        let addr = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 64, 0, 0)) + id);
        dp.endpoints.set(&(1_000_000 + id), &endpoint(id, addr))?;
    }
    // Peers (ipcache, exact addresses): the two clients and `min(entries, 100k)` more.
    let peer = |identity| PeerInfo { identity, flags: 0 };
    dp.peers_v4.set(&CLIENT, &peer(ID_CLIENT))?;
    dp.peers_v4.set(&DENIED, &peer(ID_DENIED))?;
    dp.peers_v4
        .set(&HOST, &peer(enforcer_common::IDENTITY_HOST))?;
    // One client address per new-flow harness call, so no call meets the flows of another.
    for j in 0..harness_calls {
        dp.peers_v4.set(&harness_client(j), &peer(ID_CLIENT))?;
    }
    // An endpoint isolated in no direction, for the breakdown (id 1024: not a filler id).
    let mut open = endpoint(1024, Ipv4Addr::new(10, 0, 0, 2));
    open.flags = EP_HAS_V4;
    dp.endpoints.set(&open_if, &open)?;
    let n_peers = entries.min(100_000);
    for k in 0..n_peers {
        let addr = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + k);
        dp.peers_v4.set(&addr, &peer(1000 + k % 4000))?;
    }
    // CIDR regions (LPM): the one of the ipBlock flow and `min(entries / 10, 10k)` more /24s.
    let n_cidrs = (entries / 10).clamp(1, 10_000);
    for k in 0..n_cidrs {
        let addr = Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 0)) + (k << 8));
        dp.cidrs_v4
            .set(&Prefix { addr, len: 24 }, &peer(ID_CIDR + k % 100))?;
    }
    // Policy: the entries the measured flows need, then the fillers spread over the endpoints.
    allow(&mut dp, EP, ID_CLIENT, PORT, 1)?;
    allow(&mut dp, EP, ID_CIDR, PORT, 2)?;
    allow(&mut dp, EP, ID_CLIENT, 443, 3)?;
    for i in 0..entries {
        let ep = 1 + i % endpoints;
        let j = i / endpoints;
        allow(
            &mut dp,
            ep,
            1000 + j % 4000,
            1024 + (j / 4000) as u16,
            10 + i,
        )?;
    }
    let policy_map = dp.policy.keys()?.len();
    let peers_map = MapTable::<[u8; 4], PeerInfo>::keys(&dp.peers_v4)?.len();
    let cidr_map = n_cidrs as usize;

    let prog = dp.program(Hook::Egress)?; // to_pod: traffic into the pod
    let fd = prog.fd()?.as_fd().as_raw_fd();
    let ctx = sk_buff_ctx(ifx);
    let ctx_unmanaged = sk_buff_ctx(unmanaged);
    let est = tcp_frame(CLIENT, POD, 40000, PORT, ACK_PSH);
    let denied = tcp_frame(DENIED, POD, 40000, PORT, ACK_PSH);

    expect(
        reason_of(&dp, fd, &est, &ctx)?,
        0,
        reason::ALLOW_POLICY,
        "first packet",
    )?;
    expect(
        reason_of(&dp, fd, &est, &ctx)?,
        0,
        reason::ALLOW_ESTABLISHED,
        "established",
    )?;
    expect(
        reason_of(&dp, fd, &denied, &ctx)?,
        2,
        reason::DROP_POLICY,
        "denied",
    )?;
    expect(
        reason_of(&dp, fd, &est, &ctx_unmanaged)?,
        2,
        reason::DROP_UNPROGRAMMED,
        "unmanaged (programs without an endpoint entry: dropped as unprogrammed)",
    )?;
    let probe_new = tcp_frame(CLIENT, POD, 1, PORT, SYN);
    expect(
        reason_of(&dp, fd, &probe_new, &ctx)?,
        0,
        reason::ALLOW_POLICY,
        "new flow",
    )?;
    let probe_cidr = tcp_frame(CIDR_PEER, POD, 1, PORT, SYN);
    expect(
        reason_of(&dp, fd, &probe_cidr, &ctx)?,
        0,
        reason::ALLOW_POLICY,
        "new flow ipBlock",
    )?;
    if let Some(ev) = events.as_mut() {
        ev.drain();
    }
    Ok(Loaded {
        dp,
        events,
        fd,
        policy_map,
        peers_map,
        cidr_map,
    })
}

#[allow(clippy::too_many_arguments)]
fn scenario(
    s: &Settings,
    pin: &std::path::Path,
    [ifx, unmanaged, open_if]: [u32; 3],
    empty: RawFd,
    entries: u32,
    endpoints: u32,
    breakdown: bool,
) -> Result<Samples> {
    let Loaded {
        dp,
        mut events,
        fd,
        policy_map,
        peers_map,
        cidr_map,
    } = load(s.runs, pin, [ifx, unmanaged, open_if], entries, endpoints)?;
    let ctx = sk_buff_ctx(ifx);
    let ctx_unmanaged = sk_buff_ctx(unmanaged);
    let est = tcp_frame(CLIENT, POD, 40000, PORT, ACK_PSH);
    let denied = tcp_frame(DENIED, POD, 40000, PORT, ACK_PSH);
    let mut parts = Vec::new();
    let mut other_paths = Vec::new();
    if breakdown {
        let arp = {
            let mut f = vec![
                0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02, 0, 0, 0, 0, 2, 0x08, 0x06,
            ];
            f.extend_from_slice(&[
                0, 1, 8, 0, 6, 4, 0, 1, 2, 0, 0, 0, 0, 2, 10, 1, 0, 1, 0, 0, 0, 0, 0, 0, 10, 0, 0,
                1,
            ]);
            f.resize(64, 0);
            f
        };
        let selfp = tcp_frame(POD, POD, 40000, PORT, ACK_PSH);
        let host = tcp_frame(HOST, POD, 40000, PORT, ACK_PSH);
        let open_frame = tcp_frame(CLIENT, Ipv4Addr::new(10, 0, 0, 2), 40000, PORT, ACK_PSH);
        let ctx_open = sk_buff_ctx(open_if);
        expect(
            reason_of(&dp, fd, &arp, &ctx)?,
            0,
            reason::ALLOW_NON_IP,
            "arp",
        )?;
        expect(
            reason_of(&dp, fd, &selfp, &ctx)?,
            2,
            reason::DROP_SPOOFED,
            "self",
        )?;
        expect(
            reason_of(&dp, fd, &host, &ctx)?,
            0,
            reason::ALLOW_HOST,
            "host",
        )?;
        expect(
            reason_of(&dp, fd, &open_frame, &ctx_open)?,
            0,
            reason::ALLOW_NOT_ISOLATED,
            "not isolated",
        )?;
        // The full path, in the programs' order: each frame stops one step later. (An
        // established flow leaves earlier, at the fast path: listed with the other paths.)
        let cases: [(&str, &[u8], &[u8]); 4] = [
            ("empty program (floor)", &est, &ctx),
            (
                "unmanaged ifindex: endpoint slot and ENDPOINTS miss + counter",
                &est,
                &ctx_unmanaged,
            ),
            (
                "ARP: + slot hit, clock, fast-path ethertype check, ENDPOINTS hit, scratch, Ethernet parse",
                &arp,
                &ctx,
            ),
            (
                "from the pod's own address: + fast-path IPv4 checks, then the full IPv4/TCP parse, address checks (dropped as spoofed, with its event)",
                &selfp,
                &ctx,
            ),
        ];
        for (i, (name, frame, c)) in cases.iter().enumerate() {
            let mut v = Vec::new();
            for _ in 0..s.runs {
                let prog = if i == 0 { empty } else { fd };
                v.push(test_run(prog, frame, c, s.repeat)?.1);
            }
            parts.push((name.to_string(), v));
        }
        // Paths that leave it elsewhere: the fast path before the parse (compared with the
        // unmanaged path), the others after it (compared with "from the pod's own address").
        let others: [(&str, &[u8], &[u8]); 3] = [
            (
                "established, fast path: endpoint slot, clock, IPv4/TCP header words in place, conntrack (flow table) lookup",
                &est,
                &ctx,
            ),
            (
                "from the node, fast path: conntrack miss, peer (ipcache) lookup, untracked",
                &host,
                &ctx,
            ),
            (
                "not isolated: peer (ipcache) lookup, isolation check, no conntrack",
                &open_frame,
                &ctx_open,
            ),
        ];
        for (name, frame, c) in others {
            let mut v = Vec::new();
            for _ in 0..s.runs {
                v.push(test_run(fd, frame, c, s.repeat)?.1);
            }
            other_paths.push((name.to_string(), v));
        }
    }

    // Repeat figures, interleaved so drift hits all of them alike.
    let (mut floor_runs, mut est_runs, mut denied_runs, mut unmanaged_runs) =
        (vec![], vec![], vec![], vec![]);
    for _ in 0..s.runs {
        floor_runs.push(test_run(empty, &est, &ctx, s.repeat)?.1);
        est_runs.push(test_run(fd, &est, &ctx, s.repeat)?.1);
        denied_runs.push(test_run(fd, &denied, &ctx, s.repeat)?.1);
        if let Some(ev) = events.as_mut() {
            ev.drain();
        }
        unmanaged_runs.push(test_run(fd, &est, &ctx_unmanaged, s.repeat)?.1);
    }

    // New flows with many repeats: the harness gives every run a fresh source port, each call
    // its own client address (an exact peer, or one inside the ipBlock's /24). Each call of
    // ours must move the new-flow counter by exactly `new_repeat`: every run was a new flow.
    let array = prog_array()?;
    let harness = load_fresh_port_harness(array.as_raw_fd())?;
    let ct_map = ct_shaped(BPF_MAP_TYPE_LRU_HASH)?;
    let ct_floor = load_ct_floor(ct_map.as_raw_fd())?;
    let ct_hash_map = ct_shaped(BPF_MAP_TYPE_HASH)?;
    let ct_hash_floor = load_ct_floor(ct_hash_map.as_raw_fd())?;
    let slots = slot_array()?;
    let slot_floor = load_slot_floor(slots.as_raw_fd())?;
    let (mut harness_runs, mut new_runs, mut cidr_runs, mut ct_runs, mut slot_runs) =
        (vec![], vec![], vec![], vec![], vec![]);
    let mut ct_hash_runs = vec![];
    let policy_allowed = |dp: &Datapath| -> Result<u64> {
        Ok(dp
            .counters
            .read()?
            .get(&(EP, DIR_INGRESS, reason::ALLOW_POLICY))
            .map_or(0, |c| c.packets))
    };
    for j in 0..s.runs {
        let frame = tcp_frame(harness_client(j), POD, 1, PORT, SYN);
        set_tail(array.as_raw_fd(), empty)?;
        harness_runs.push(test_run(harness.as_raw_fd(), &frame, &ctx, s.new_repeat)?.1);
        // Maps of their own: every run a miss and an insert, as for ours. Ours takes two calls
        // of new flows per round (an exact peer, then an ipBlock one), so each floor map takes
        // the second one's keys too, untimed: every timed call meets the fill ours met.
        let fill = tcp_frame(harness_cidr_peer(j), POD, 1, PORT, SYN);
        for (prog, runs) in [
            (&ct_floor, &mut ct_runs),
            (&ct_hash_floor, &mut ct_hash_runs),
        ] {
            set_tail(array.as_raw_fd(), prog.as_raw_fd())?;
            runs.push(test_run(harness.as_raw_fd(), &frame, &ctx, s.new_repeat)?.1);
            test_run(harness.as_raw_fd(), &fill, &ctx, s.new_repeat)?;
        }
        set_tail(array.as_raw_fd(), slot_floor.as_raw_fd())?;
        slot_runs.push(test_run(harness.as_raw_fd(), &frame, &ctx, s.new_repeat)?.1);
        check_slot(slots.as_raw_fd(), &frame, s.new_repeat)?;
        set_tail(array.as_raw_fd(), fd)?;
        for (src, runs) in [
            (harness_client(j), &mut new_runs),
            (harness_cidr_peer(j), &mut cidr_runs),
        ] {
            let frame = tcp_frame(src, POD, 1, PORT, SYN);
            let before = policy_allowed(&dp)?;
            runs.push(test_run(harness.as_raw_fd(), &frame, &ctx, s.new_repeat)?.1);
            let moved = policy_allowed(&dp)? - before;
            if moved != u64::from(s.new_repeat) {
                bail!(
                    "new-flow harness from {src}: {moved} of {} runs were new allowed flows",
                    s.new_repeat
                );
            }
        }
    }

    // Single-shot figures: a fresh source port per new-flow call, so each one is a conntrack
    // miss, a policy lookup and a conntrack insert. Interleaved with the floor and the
    // established flow measured the same way.
    let (mut f1, mut e1, mut n1, mut c1, mut d1) = (vec![], vec![], vec![], vec![], vec![]);
    for k in 0..s.singles {
        let sport = 1024 + (k % 60_000) as u16;
        let src_cidr = Ipv4Addr::from(u32::from(CIDR_PEER) + (k / 60_000) as u32 * 256);
        f1.push(f64::from(test_run(empty, &est, &ctx, 1)?.1));
        e1.push(f64::from(test_run(fd, &est, &ctx, 1)?.1));
        let new = tcp_frame(CLIENT, POD, sport, PORT, SYN);
        n1.push(f64::from(test_run(fd, &new, &ctx, 1)?.1));
        let new_cidr = tcp_frame(src_cidr, POD, sport, PORT, SYN);
        c1.push(f64::from(test_run(fd, &new_cidr, &ctx, 1)?.1));
        d1.push(f64::from(test_run(fd, &denied, &ctx, 1)?.1));
        if k % 1000 == 999
            && let Some(ev) = events.as_mut()
        {
            ev.drain();
        }
    }
    let ct = dp.conntrack.count()?;
    if ct < s.singles {
        bail!("only {ct} conntrack entries after {} new flows", s.singles);
    }
    drop(dp);
    let _ = Datapath::cleanup(pin);
    Ok(Samples {
        entries,
        endpoints,
        policy_map,
        peers_map,
        cidr_map,
        floor: floor_runs,
        est: est_runs,
        denied: denied_runs,
        unmanaged: unmanaged_runs,
        harness: harness_runs,
        ct_floor: ct_runs,
        ct_hash_floor: ct_hash_runs,
        slot_floor: slot_runs,
        new: new_runs,
        new_cidr: cidr_runs,
        f1,
        e1,
        n1,
        c1,
        d1,
        breakdown: parts,
        other_paths,
    })
}

// ---------------------------------------------------------------------------------------------
// The Service path.
// ---------------------------------------------------------------------------------------------

/// Settings of the Service path's per-packet part.
#[derive(Clone, Debug, Serialize)]
pub struct ServiceSettings {
    /// `repeat` of one established call.
    pub repeat: u32,
    /// Calls per figure (their median); each new-flow round on a destination port of its own.
    pub runs: usize,
    /// New flows per chain-harness call (every run of it a new flow).
    pub new_repeat: u32,
    /// Passes, a fresh datapath each; each figure is the lowest of the passes' medians.
    pub passes: usize,
    /// Filler policy entries, as in the scenarios (one endpoint besides the client pod).
    pub entries: u32,
}

/// A packet through both hooks it crosses on the node, the client pod's `from_pod` and the
/// backend pod's `to_pod`: sent to a Service frontend (translated between the hooks, as
/// kube-proxy's DNAT would) and to the backend's address directly. ns per run: the median of
/// the calls, the lowest over the passes.
#[derive(Clone, Debug, Serialize)]
pub struct ServicePath {
    pub settings: ServiceSettings,
    pub policy_map: usize,
    /// New flows through the chain harness; its floor: the harness tail-calling the empty
    /// program.
    pub harness_floor_ns: f64,
    /// `from_pod` of the first packet to the frontend: deferred (a pending flow, a slot, the
    /// mark).
    pub new_from_pod_service_ns: f64,
    /// `to_pod` of that packet translated, its slot in the mark: `svc_pod` judges the client's
    /// egress on the backend, then `to_pod` the backend's ingress (a new flow there).
    pub new_to_pod_service_ns: f64,
    /// The same flow sent to the backend directly: `from_pod` judges the client's egress, then
    /// `to_pod` the backend's ingress, each a new flow.
    pub new_from_pod_direct_ns: f64,
    pub new_to_pod_direct_ns: f64,
    /// Share of the deferred flows the judge calls ran: the others' slots were taken by a later
    /// flow of the same call (as on a node, a slot holds the last packet deferred to it).
    pub judged_share: f64,
    /// Established packets (repeat figures) and their floor, the empty program.
    pub floor_ns: f64,
    pub est_from_pod_service_ns: f64,
    pub est_to_pod_service_ns: f64,
    pub est_from_pod_direct_ns: f64,
    pub est_to_pod_direct_ns: f64,
    /// Every call of every pass, by figure.
    pub calls: Vec<(String, Vec<u32>)>,
}

impl ServicePath {
    /// The first packet through both hooks, net of the harness floor at each: (Service, direct).
    pub fn new_flow_ns(&self) -> (f64, f64) {
        let f = 2.0 * self.harness_floor_ns;
        (
            self.new_from_pod_service_ns + self.new_to_pod_service_ns - f,
            self.new_from_pod_direct_ns + self.new_to_pod_direct_ns - f,
        )
    }

    /// An established packet through both hooks, net of the floor at each: (Service, direct).
    pub fn established_ns(&self) -> (f64, f64) {
        let f = 2.0 * self.floor_ns;
        (
            self.est_from_pod_service_ns + self.est_to_pod_service_ns - f,
            self.est_from_pod_direct_ns + self.est_to_pod_direct_ns - f,
        )
    }
}

/// The figures of [`ServicePath`], in the order of [`SvcFigure`].
const SVC_FIGURES: [&str; 10] = [
    "harness floor",
    "new, from_pod, Service",
    "new, to_pod, Service",
    "new, from_pod, direct",
    "new, to_pod, direct",
    "floor",
    "established, from_pod, Service",
    "established, to_pod, Service",
    "established, from_pod, direct",
    "established, to_pod, direct",
];

#[derive(Clone, Copy)]
enum SvcFigure {
    HarnessFloor,
    NewFromService,
    NewToService,
    NewFromDirect,
    NewToDirect,
    Floor,
    EstFromService,
    EstToService,
    EstFromDirect,
    EstToDirect,
}

/// The client pod of the Service path (egress-isolated), its endpoint id and identity; the
/// backend is the scenarios' endpoint ([`EP`] at [`POD`], identity 257).
const SVC_CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 3);
const SVC_EP: u32 = 1000;
const ID_SVC_CLIENT: u32 = 310;
const ID_BACKEND: u32 = 256 + EP;
/// The Service frontend (a ClusterIP).
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// The destination port of round `j` (the Service's port and the backend's).
fn svc_port(j: usize) -> u16 {
    8080 + j as u16
}
/// Source ports of the new flows: the Service flows after `P_START`, the direct ones after
/// `Q_START`, apart so the backend's ingress never meets one from the other.
const P_START: u16 = 10_000;
const Q_START: u16 = 30_000;
/// Slots of the chain harness's port table: every 16-bit source port.
const PORT_TABLE_SLOTS: u32 = 1 << 16;

/// The Service path's per-packet part, on its own thread (private netns + bpffs).
pub fn run_service(settings: ServiceSettings) -> Result<ServicePath> {
    in_private_netns("service", move |devices, mount| -> Result<ServicePath> {
        let pin = mount.0.join("enforcer");
        let empty = load_empty_program()?;
        let mut passes = Vec::new();
        let mut policy_map = 0;
        let (mut deferred, mut judged) = (0u64, 0u64);
        for pass in 0..settings.passes.max(1) {
            eprintln!(
                "  Service path pass {}: {} entries",
                pass + 1,
                settings.entries
            );
            let got = service_pass(&settings, &pin, devices, empty.as_raw_fd())
                .context("the Service path")?;
            let _ = Datapath::cleanup(&pin);
            let m = |f: SvcFigure| median_u32(&got.calls[f as usize]);
            eprintln!(
                "    new flow, ns: from_pod {:.0} / {:.0}, to_pod {:.0} / {:.0} (Service / direct), harness {:.0}; established: from_pod {:.0} / {:.0}, to_pod {:.0} / {:.0}, floor {:.0}",
                m(SvcFigure::NewFromService),
                m(SvcFigure::NewFromDirect),
                m(SvcFigure::NewToService),
                m(SvcFigure::NewToDirect),
                m(SvcFigure::HarnessFloor),
                m(SvcFigure::EstFromService),
                m(SvcFigure::EstFromDirect),
                m(SvcFigure::EstToService),
                m(SvcFigure::EstToDirect),
                m(SvcFigure::Floor),
            );
            policy_map = got.policy_map;
            deferred += got.deferred;
            judged += got.judged;
            passes.push(got.calls);
        }
        // Each figure: the lowest of the passes' medians; the calls of every pass kept.
        let best = |f: SvcFigure| {
            passes
                .iter()
                .map(|p| median_u32(&p[f as usize]))
                .fold(f64::INFINITY, f64::min)
        };
        Ok(ServicePath {
            policy_map,
            harness_floor_ns: best(SvcFigure::HarnessFloor),
            new_from_pod_service_ns: best(SvcFigure::NewFromService),
            new_to_pod_service_ns: best(SvcFigure::NewToService),
            new_from_pod_direct_ns: best(SvcFigure::NewFromDirect),
            new_to_pod_direct_ns: best(SvcFigure::NewToDirect),
            judged_share: judged as f64 / deferred.max(1) as f64,
            floor_ns: best(SvcFigure::Floor),
            est_from_pod_service_ns: best(SvcFigure::EstFromService),
            est_to_pod_service_ns: best(SvcFigure::EstToService),
            est_from_pod_direct_ns: best(SvcFigure::EstFromDirect),
            est_to_pod_direct_ns: best(SvcFigure::EstToDirect),
            calls: SVC_FIGURES
                .iter()
                .enumerate()
                .map(|(i, name)| {
                    (
                        name.to_string(),
                        passes.iter().flat_map(|p| p[i].clone()).collect(),
                    )
                })
                .collect(),
            settings,
        })
    })
}

/// One pass of the Service path, raw.
struct SvcSamples {
    policy_map: usize,
    /// Per figure of [`SVC_FIGURES`], its calls.
    calls: Vec<Vec<u32>>,
    /// Flows deferred, and of them the ones the judge calls ran.
    deferred: u64,
    judged: u64,
}

/// The counters that moved while `f` ran, by how much.
fn moved_by(dp: &Datapath, f: impl FnOnce() -> Result<()>) -> Result<BTreeMap<(u32, u8, u8), u64>> {
    let before = dp.counters.read()?;
    f()?;
    let after = dp.counters.read()?;
    Ok(after
        .iter()
        .filter_map(|(k, v)| {
            let d = v.packets - before.get(k).map_or(0, |b| b.packets);
            (d != 0).then_some((*k, d))
        })
        .collect())
}

/// Checks that exactly the counters `want` moved, each by `n`.
fn expect_moved(
    got: &BTreeMap<(u32, u8, u8), u64>,
    want: &[(u32, u8, u8)],
    n: u64,
    what: &str,
) -> Result<()> {
    let expected: BTreeMap<(u32, u8, u8), u64> = want.iter().map(|k| (*k, n)).collect();
    if *got != expected {
        let name = |m: &BTreeMap<(u32, u8, u8), u64>| {
            m.iter()
                .map(|((ep, dir, r), n)| {
                    format!("endpoint {ep} dir {dir} {}: {n}", REASON_NAMES[*r as usize])
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        bail!(
            "{what}: counters moved {{{}}}, want {{{}}}",
            name(got),
            name(&expected)
        );
    }
    Ok(())
}

fn service_pass(s: &ServiceSettings, pin: &Path, d: Devices, empty: RawFd) -> Result<SvcSamples> {
    let Loaded {
        mut dp,
        mut events,
        fd: to_fd,
        policy_map,
        ..
    } = load(0, pin, [d.ifx, d.unmanaged, d.open_if], s.entries, 1)?;
    let from_fd = dp.program(Hook::Ingress)?.fd()?.as_fd().as_raw_fd();
    // The client pod, egress-isolated, and the addresses as the agent maps them: the pods with
    // their identities, the frontend with IDENTITY_SERVICE. Its egress is allowed to the
    // backend, and the backend's ingress from it, on every round's port.
    let mut client = endpoint(SVC_EP, SVC_CLIENT);
    client.identity = ID_SVC_CLIENT;
    dp.endpoints.set(&d.client, &client)?;
    let peer = |identity| PeerInfo { identity, flags: 0 };
    dp.peers_v4.set(&SVC_CLIENT, &peer(ID_SVC_CLIENT))?;
    dp.peers_v4.set(&POD, &peer(ID_BACKEND))?;
    dp.peers_v4
        .set(&VIP, &peer(enforcer_common::IDENTITY_SERVICE))?;
    for j in 0..s.runs {
        let rule = PolicyValue {
            rule: 500 + j as u32,
            _pad: 0,
        };
        dp.policy.set(
            &PolicyKey::new(SVC_EP, ID_BACKEND, DIR_EGRESS, PROTO_TCP, svc_port(j), 16),
            &rule,
        )?;
        dp.policy.set(
            &PolicyKey::new(EP, ID_SVC_CLIENT, DIR_INGRESS, PROTO_TCP, svc_port(j), 16),
            &rule,
        )?;
    }
    let (svc_deferred, client_allowed, backend_allowed) = (
        (SVC_EP, DIR_EGRESS, reason::ALLOW_SERVICE),
        (SVC_EP, DIR_EGRESS, reason::ALLOW_POLICY),
        (EP, DIR_INGRESS, reason::ALLOW_POLICY),
    );
    let (client_est, backend_est) = (
        (SVC_EP, DIR_EGRESS, reason::ALLOW_ESTABLISHED),
        (EP, DIR_INGRESS, reason::ALLOW_ESTABLISHED),
    );
    let ctx_client = sk_buff_ctx(d.client);
    let ctx_backend = sk_buff_ctx(d.ifx);

    // One flow of each kind, checked packet by packet, then its established packets timed.
    let port = svc_port(0);
    let (svc_sport, direct_sport) = (40_000, 40_001);
    let mut mark = 0;
    let got = moved_by(&dp, || {
        let (action, m) = dp.test_run_marked(
            Hook::Ingress,
            d.client,
            &tcp_frame(SVC_CLIENT, VIP, svc_sport, port, SYN),
            0,
        )?;
        if action != 0 || m & enforcer_common::SERVICE_MARK_MASK == 0 {
            bail!(
                "the first packet to the frontend: action {action}, mark {m:#x} (want 0 and a slot)"
            );
        }
        mark = m;
        Ok(())
    })?;
    expect_moved(&got, &[svc_deferred], 1, "to the frontend")?;
    let got = moved_by(&dp, || {
        let (action, m) = dp.test_run_marked(
            Hook::Egress,
            d.ifx,
            &tcp_frame(SVC_CLIENT, POD, svc_sport, port, SYN),
            mark,
        )?;
        if action != 0 || m & enforcer_common::SERVICE_MARK_MASK != 0 {
            bail!("the translated packet: action {action}, mark {m:#x} (want 0 and no slot)");
        }
        Ok(())
    })?;
    expect_moved(
        &got,
        &[client_allowed, backend_allowed],
        1,
        "translated, judged on the backend",
    )?;
    let got = moved_by(&dp, || {
        dp.test_run(
            Hook::Ingress,
            d.client,
            &tcp_frame(SVC_CLIENT, POD, direct_sport, port, SYN),
        )
        .map(|_| ())?;
        dp.test_run(
            Hook::Egress,
            d.ifx,
            &tcp_frame(SVC_CLIENT, POD, direct_sport, port, SYN),
        )
        .map(|_| ())
    })?;
    expect_moved(
        &got,
        &[client_allowed, backend_allowed],
        1,
        "to the backend directly",
    )?;
    let est = [
        (
            from_fd,
            tcp_frame(SVC_CLIENT, VIP, svc_sport, port, ACK_PSH),
            &ctx_client,
            client_est,
        ),
        (
            to_fd,
            tcp_frame(SVC_CLIENT, POD, svc_sport, port, ACK_PSH),
            &ctx_backend,
            backend_est,
        ),
        (
            from_fd,
            tcp_frame(SVC_CLIENT, POD, direct_sport, port, ACK_PSH),
            &ctx_client,
            client_est,
        ),
        (
            to_fd,
            tcp_frame(SVC_CLIENT, POD, direct_sport, port, ACK_PSH),
            &ctx_backend,
            backend_est,
        ),
    ];
    for (i, (fd, frame, ctx, want)) in est.iter().enumerate() {
        let got = moved_by(&dp, || test_run(*fd, frame, ctx, 1).map(|_| ()))?;
        expect_moved(&got, &[*want], 1, &format!("established packet {}", i + 1))?;
    }
    let mut calls: Vec<Vec<u32>> = vec![Vec::new(); SVC_FIGURES.len()];
    let figures = [
        SvcFigure::EstFromService,
        SvcFigure::EstToService,
        SvcFigure::EstFromDirect,
        SvcFigure::EstToDirect,
    ];
    for _ in 0..s.runs {
        calls[SvcFigure::Floor as usize].push(test_run(empty, &est[0].1, &ctx_client, s.repeat)?.1);
        for (f, (fd, frame, ctx, _)) in figures.iter().zip(&est) {
            calls[*f as usize].push(test_run(*fd, frame, ctx, s.repeat)?.1);
        }
    }

    // New flows, through the chain harness: each run of a call is a new flow. Each round its
    // own destination port, so no call meets the flows of an earlier one; the Service and the
    // direct calls in alternating order, so the table's fill favours neither.
    let array = prog_array()?;
    let table = port_table()?;
    let harness = load_chain_harness(array.as_raw_fd(), table.as_raw_fd())?;
    let slots = obj_get(&dp.root().join("maps").join(enforcer_common::MAP_DEFERRED))?;
    let n = s.new_repeat;
    let p_ports: Vec<u16> = (1..=n as u16).map(|i| P_START + i).collect();
    let q_ports: Vec<u16> = (1..=n as u16).map(|i| Q_START + i).collect();
    write_chain(table.as_raw_fd(), Q_START, &q_ports, &[])?;
    let (mut deferred, mut judged) = (0u64, 0u64);
    for j in 0..s.runs {
        let port = svc_port(j);
        let q_frame = tcp_frame(SVC_CLIENT, POD, Q_START, port, SYN);
        set_tail(array.as_raw_fd(), empty)?;
        calls[SvcFigure::HarnessFloor as usize]
            .push(test_run(harness.as_raw_fd(), &q_frame, &ctx_backend, n)?.1);
        for service in [j % 2 == 0, j % 2 != 0] {
            if service {
                write_chain(table.as_raw_fd(), P_START, &p_ports, &[])?;
                set_tail(array.as_raw_fd(), from_fd)?;
                let frame = tcp_frame(SVC_CLIENT, VIP, P_START, port, SYN);
                let mut ns = 0;
                let got = moved_by(&dp, || {
                    ns = test_run(harness.as_raw_fd(), &frame, &ctx_client, n)?.1;
                    Ok(())
                })?;
                expect_moved(&got, &[svc_deferred], n.into(), "new flows to the frontend")?;
                calls[SvcFigure::NewFromService as usize].push(ns);
                // The translated packets, each with the slot its flow was deferred to: the
                // slots the call's flows hold at its end (a later flow may have taken one).
                let marks = deferred_marks(slots.as_raw_fd(), port)?;
                let (ports, marks): (Vec<u16>, Vec<u32>) = p_ports
                    .iter()
                    .filter_map(|p| marks.get(p).map(|m| (*p, *m)))
                    .unzip();
                let m = ports.len() as u32;
                deferred += u64::from(n);
                judged += u64::from(m);
                write_chain(table.as_raw_fd(), P_START, &ports, &marks)?;
                set_tail(array.as_raw_fd(), to_fd)?;
                let frame = tcp_frame(SVC_CLIENT, POD, P_START, port, SYN);
                let got = moved_by(&dp, || {
                    ns = test_run(harness.as_raw_fd(), &frame, &ctx_backend, m)?.1;
                    Ok(())
                })?;
                expect_moved(
                    &got,
                    &[client_allowed, backend_allowed],
                    m.into(),
                    "new flows translated, judged on the backend",
                )?;
                calls[SvcFigure::NewToService as usize].push(ns);
            } else {
                for (fd, ctx, want, f) in [
                    (
                        from_fd,
                        &ctx_client,
                        client_allowed,
                        SvcFigure::NewFromDirect,
                    ),
                    (to_fd, &ctx_backend, backend_allowed, SvcFigure::NewToDirect),
                ] {
                    set_tail(array.as_raw_fd(), fd)?;
                    let mut ns = 0;
                    let got = moved_by(&dp, || {
                        ns = test_run(harness.as_raw_fd(), &q_frame, ctx, n)?.1;
                        Ok(())
                    })?;
                    expect_moved(&got, &[want], n.into(), "new flows to the backend directly")?;
                    calls[f as usize].push(ns);
                }
            }
        }
        if let Some(ev) = events.as_mut() {
            ev.drain();
        }
    }
    Ok(SvcSamples {
        policy_map,
        calls,
        deferred,
        judged,
    })
}

/// The table of the chain harness: 65,536 slots of (next source port, mark), indexed by the
/// source port as the harness loads it from the frame.
fn port_table() -> Result<OwnedFd> {
    let mut a = Attr::new();
    a.u32(0, BPF_MAP_TYPE_ARRAY);
    a.u32(4, 4);
    a.u32(8, 8);
    a.u32(12, PORT_TABLE_SLOTS);
    let fd = sys_bpf(BPF_MAP_CREATE, &mut a).context("BPF_MAP_CREATE of the port table")?;
    // SAFETY: the kernel returned a new fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// A port as the harness's 16-bit load from the frame reads it (network order in memory).
fn raw_port(port: u16) -> u32 {
    u32::from(u16::from_ne_bytes(port.to_be_bytes()))
}

/// Chains `ports` in the table from `start`: a frame with source port `start` gets
/// `ports[0]` in its first run, `ports[1]` in its second, ..., with `marks[i]` (0 when
/// `marks` is empty) as its mark.
fn write_chain(table: RawFd, start: u16, ports: &[u16], marks: &[u32]) -> Result<()> {
    let mut from = start;
    for (i, &p) in ports.iter().enumerate() {
        let key = raw_port(from);
        let value = [raw_port(p), marks.get(i).copied().unwrap_or(0)];
        let mut a = Attr::new();
        a.u32(0, table as u32);
        a.u64(8, &key as *const u32 as u64);
        a.u64(16, value.as_ptr() as u64);
        sys_bpf(BPF_MAP_UPDATE_ELEM, &mut a).context("writing the port table")?;
        from = p;
    }
    Ok(())
}

/// The mark of each Service flow of the client to the frontend on `port` that holds a slot of
/// `DEFERRED` (map fd `slots`), by source port.
fn deferred_marks(slots: RawFd, port: u16) -> Result<BTreeMap<u16, u32>> {
    let mut out = BTreeMap::new();
    for slot in 1..enforcer_common::DEFERRED_SLOTS {
        let mut d = enforcer_common::Deferred::default();
        let mut a = Attr::new();
        a.u32(0, slots as u32);
        a.u64(8, &slot as *const u32 as u64);
        a.u64(16, &mut d as *mut enforcer_common::Deferred as u64);
        sys_bpf(BPF_MAP_LOOKUP_ELEM, &mut a).context("reading DEFERRED")?;
        if d.src[..4] == SVC_CLIENT.octets()
            && d.dst[..4] == VIP.octets()
            && d.dport == port
            && d.protocol == PROTO_TCP
        {
            out.insert(d.sport, slot << enforcer_common::SERVICE_MARK_SHIFT);
        }
    }
    Ok(out)
}

/// The chain harness: like the fresh-port harness, but the frame's next source port and the
/// packet's mark come from `table` (indexed by the current source port), then it tail-calls
/// slot 0 of `array`. Each run of a call hands the program a flow it has not seen, with the
/// mark the table gives it: the Service slot of a translated packet.
fn load_chain_harness(array: RawFd, table: RawFd) -> Result<OwnedFd> {
    const SPORT: i16 = 14 + 20;
    let insns = [
        insn(0xbf, 6, 1, 0, 0),     // 0: r6 = r1 (ctx)
        insn(0x61, 2, 1, 76, 0),    // 1: r2 = skb->data
        insn(0x61, 3, 1, 80, 0),    // 2: r3 = skb->data_end
        insn(0xbf, 4, 2, 0, 0),     // 3: r4 = r2
        insn(0x07, 4, 0, 0, 36),    // 4: r4 += 36
        insn(0x2d, 4, 3, 17, 0),    // 5: if r4 > r3 goto tail
        insn(0x69, 5, 2, SPORT, 0), // 6: r5 = *(u16 *)(r2 + 34)
        insn(0x63, 10, 5, -4, 0),   // 7: key = r5
        insn(0x18, 1, 1, 0, table), // 8: r1 = the table (BPF_PSEUDO_MAP_FD)
        insn(0, 0, 0, 0, 0),        // 9
        insn(0xbf, 2, 10, 0, 0),    // 10: r2 = r10
        insn(0x07, 2, 0, 0, -4),    // 11: r2 += -4 (&key)
        insn(0x85, 0, 0, 0, 1),     // 12: r0 = bpf_map_lookup_elem(r1, r2)
        insn(0x15, 0, 0, 9, 0),     // 13: if r0 == 0 goto tail
        insn(0x61, 7, 0, 0, 0),     // 14: r7 = next source port
        insn(0x61, 8, 0, 4, 0),     // 15: r8 = mark
        insn(0x61, 2, 6, 76, 0),    // 16: r2 = skb->data (the call clobbered r2-r5)
        insn(0x61, 3, 6, 80, 0),    // 17: r3 = skb->data_end
        insn(0xbf, 4, 2, 0, 0),     // 18: r4 = r2
        insn(0x07, 4, 0, 0, 36),    // 19: r4 += 36
        insn(0x2d, 4, 3, 2, 0),     // 20: if r4 > r3 goto tail
        insn(0x6b, 2, 7, SPORT, 0), // 21: *(u16 *)(r2 + 34) = r7
        insn(0x63, 6, 8, 8, 0),     // 22: skb->mark = r8
        insn(0xbf, 1, 6, 0, 0),     // 23: tail: r1 = r6
        insn(0x18, 2, 1, 0, array), // 24: r2 = the prog array
        insn(0, 0, 0, 0, 0),        // 25
        insn(0xb7, 3, 0, 0, 0),     // 26: r3 = 0
        insn(0x85, 0, 0, 0, 12),    // 27: bpf_tail_call(r1, r2, r3)
        insn(0xb7, 0, 0, 0, 0),     // 28: r0 = 0 (only if the slot is empty)
        insn(0x95, 0, 0, 0, 0),     // 29: exit
    ];
    load_sched_cls(&insns, "the chain harness")
}
