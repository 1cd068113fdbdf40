//! The maps of the datapath. Names and types come from `enforcer-common`; sizes are the defaults,
//! which the loader overrides at load time (`EbpfLoader::set_max_entries`).

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray, RingBuf},
};
use enforcer_common::{
    Config, Counter, CtKey, CtKeyV4, CtValue, DEFAULT_CIDRS_SIZE, DEFAULT_CONNTRACK_SIZE,
    DEFAULT_EVENTS_BYTES, DEFAULT_FRAGMENTS_SIZE, DEFAULT_MAX_ENDPOINTS, DEFAULT_NODE_PORTS_SIZE,
    DEFAULT_PEERS_SIZE, DEFAULT_POLICY_SIZE, DEFAULT_SERVICE_FLOWS_SIZE, DEFERRED_SLOTS, Deferred,
    ENDPOINT_SLOT_COUNT, EndpointInfo, EndpointSlot, FlowBucket, FlowCount, FragKey, FragValue,
    NodePortKey, PEERS_MAP_FLAGS, PeerBucket, PeerInfo, PolicyKey, PolicyValue, ServiceBackend,
    counter_slots,
};

use crate::{
    conntrack::CtKeys,
    parse::{Inner, Packet},
};

#[map]
pub static ENDPOINTS: HashMap<u32, EndpointInfo> =
    HashMap::with_max_entries(DEFAULT_MAX_ENDPOINTS, 0);

/// The established path's copy of ENDPOINTS, direct-mapped by ifindex (see `EndpointSlot`).
/// Mmapable: the agent writes it through a shared mapping, word by word, as a sequence lock.
#[map]
pub static ENDPOINT_SLOTS: Array<EndpointSlot> =
    Array::with_max_entries(ENDPOINT_SLOT_COUNT, BPF_F_MMAPABLE);

/// `BPF_F_MMAPABLE` (uapi `bpf.h`).
const BPF_F_MMAPABLE: u32 = 1 << 10;

/// Allocated as written ([`PEERS_MAP_FLAGS`]): sized for a large cluster, paid for by use.
#[map]
pub static PEERS_V4: HashMap<[u8; 4], PeerInfo> =
    HashMap::with_max_entries(DEFAULT_PEERS_SIZE, PEERS_MAP_FLAGS);

/// A cache of PEERS_V4 (see `PeerBucket`): one load per address instead of a hash lookup.
/// Mmapable: the agent writes its ways through a shared mapping.
#[map]
pub static PEER_SLOTS: Array<PeerBucket> =
    Array::with_max_entries(DEFAULT_PEERS_SIZE, BPF_F_MMAPABLE);

#[map]
pub static PEERS_V6: HashMap<[u8; 16], PeerInfo> =
    HashMap::with_max_entries(DEFAULT_PEERS_SIZE, PEERS_MAP_FLAGS);

#[map]
pub static CIDRS_V4: LpmTrie<[u8; 4], PeerInfo> = LpmTrie::with_max_entries(DEFAULT_CIDRS_SIZE, 0);

#[map]
pub static CIDRS_V6: LpmTrie<[u8; 16], PeerInfo> = LpmTrie::with_max_entries(DEFAULT_CIDRS_SIZE, 0);

#[map]
pub static POLICY: HashMap<PolicyKey, PolicyValue> =
    HashMap::with_max_entries(DEFAULT_POLICY_SIZE, 0);

/// IPv4 flows (see `crate::flows`); mmapable, so its values start page-aligned and each
/// 64-byte bucket is one cache line, and the agent writes buckets under their lock.
#[map]
pub static FLOWS_V4: Array<FlowBucket> =
    Array::with_max_entries(DEFAULT_CONNTRACK_SIZE, BPF_F_MMAPABLE);

/// IPv4 flows whose `FLOWS_V4` bucket was full (and all of them while the table is off).
#[map]
pub static CONNTRACK_V4: LruHashMap<CtKeyV4, CtValue> =
    LruHashMap::with_max_entries(DEFAULT_CONNTRACK_SIZE, 0);

/// Flows each endpoint holds, by direction of origin, indexed by endpoint id; mmapable, so the
/// agent's sweep corrects them with atomic adds beside the programs' own.
#[map]
pub static FLOW_COUNTS: Array<FlowCount> =
    Array::with_max_entries(DEFAULT_MAX_ENDPOINTS + 1, BPF_F_MMAPABLE);

#[map(name = "CONNTRACK")]
pub static CONNTRACK_V6: LruHashMap<CtKey, CtValue> =
    LruHashMap::with_max_entries(DEFAULT_CONNTRACK_SIZE, 0);

#[map]
pub static FRAGMENTS: LruHashMap<FragKey, FragValue> =
    LruHashMap::with_max_entries(DEFAULT_FRAGMENTS_SIZE, 0);

#[map]
pub static COUNTERS: PerCpuArray<Counter> =
    PerCpuArray::with_max_entries(counter_slots(DEFAULT_MAX_ENDPOINTS), 0);

#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(DEFAULT_EVENTS_BYTES, 0);

#[map]
pub static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

#[map]
pub static NODE_PORTS: HashMap<NodePortKey, u32> =
    HashMap::with_max_entries(DEFAULT_NODE_PORTS_SIZE, 0);

/// Not pinned: a slot lives for one packet's way through the node's stack.
#[map]
pub static DEFERRED: Array<Deferred> = Array::with_max_entries(DEFERRED_SLOTS, 0);

#[map]
pub static SERVICE_FLOWS: LruHashMap<CtKey, ServiceBackend> =
    LruHashMap::with_max_entries(DEFAULT_SERVICE_FLOWS_SIZE, 0);

/// `svc_pod` and `to_pod` (indices `SVC_PROG_JUDGE`, `SVC_PROG_TO_POD`), filled by the loader.
/// Not pinned: it holds this object's programs.
#[map]
pub static SVC_PROGS: ProgramArray = ProgramArray::with_max_entries(2, 0);

/// Events lost to a full ring buffer (per CPU, index 0).
#[map]
pub static EVENTS_LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU scratch space for the large per-packet structures, which would not fit the 512-byte
/// BPF stack together. A TC program runs to completion on its CPU without re-entering itself,
/// so one slot per CPU is enough. Not pinned: private to one loaded object.
#[repr(C)]
pub struct Scratch {
    pub pkt: Packet,
    pub ct: CtKeys,
    pub frag: FragKey,
    pub inner: Inner,
    /// A `SERVICE_FLOWS` key.
    pub svc: CtKey,
}

#[map]
pub static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);
