//! Map keys and values shared by the enforcer agent and its eBPF programs.
//!
//! Every type here is `#[repr(C)]` with explicit padding fields, so user space and the kernel
//! agree byte for byte (implicit padding makes hash keys differ and is unsound for `aya::Pod`).
//! The `const` asserts at the bottom pin each size; change a struct and you must bump
//! [`SCHEMA_VERSION`], because pinned maps of the old layout cannot be reused. The exceptions
//! hold no state the programs made: [`Config`] (written whole by every agent at start) and the
//! counter maps, which the loader creates again when their pinned size differs.
#![no_std]

/// Version of the map layout. Pins live under `<pin-path>/v{SCHEMA_VERSION}/`.
pub const SCHEMA_VERSION: u32 = 1;

// ---------------------------------------------------------------------------------------------
// Map names: used by `#[map(name = ..)]` in the eBPF crate and by the loader.
// ---------------------------------------------------------------------------------------------

/// ifindex of a pod's host-side veth (u32) -> [`EndpointInfo`].
pub const MAP_ENDPOINTS: &str = "ENDPOINTS";
/// Exact IPv4 address ([u8; 4], network order) of a pod or the node -> [`PeerInfo`].
pub const MAP_PEERS_V4: &str = "PEERS_V4";
/// Exact IPv6 address ([u8; 16]) of a pod or the node -> [`PeerInfo`].
pub const MAP_PEERS_V6: &str = "PEERS_V6";
/// LPM trie of IPv4 CIDR regions (ipBlock cidrs and excepts) -> [`PeerInfo`].
pub const MAP_CIDRS_V4: &str = "CIDRS_V4";
/// LPM trie of IPv6 CIDR regions -> [`PeerInfo`].
pub const MAP_CIDRS_V6: &str = "CIDRS_V6";
/// [`PolicyKey`] -> [`PolicyValue`]: one entry per allowed (endpoint, direction, peer, port block).
pub const MAP_POLICY: &str = "POLICY";
/// LRU [`CtKeyV4`] -> [`CtValue`]: IPv4 flows already allowed. A key of its own, 20 bytes
/// instead of 44, because the established path hashes and compares it on every packet.
pub const MAP_CONNTRACK_V4: &str = "CONNTRACK_V4";
/// LRU [`CtKey`] -> [`CtValue`]: IPv6 flows already allowed. It keeps the name of the map that
/// held both families before `CONNTRACK_V4` existed, so an upgraded agent reuses the pinned
/// map as it is (same key and value) and moves the IPv4 flows it finds there to
/// `CONNTRACK_V4`: the layout stays at version 1 and no flow is lost across the upgrade.
pub const MAP_CONNTRACK_V6: &str = "CONNTRACK";
/// LRU [`FragKey`] -> [`FragValue`]: first fragments that were allowed.
pub const MAP_FRAGMENTS: &str = "FRAGMENTS";
/// Per-CPU array of [`Counter`], indexed by [`counter_index`].
pub const MAP_COUNTERS: &str = "COUNTERS";
/// Ring buffer of [`VerdictEvent`].
pub const MAP_EVENTS: &str = "EVENTS";
/// Per-CPU array with one u64 at index 0: events the full ring buffer could not take.
pub const MAP_EVENTS_LOST: &str = "EVENTS_LOST";
/// Array with one [`Config`] at index 0.
pub const MAP_CONFIG: &str = "CONFIG";
/// Mmapable array of [`ENDPOINT_SLOT_COUNT`] [`EndpointSlot`]s, direct-mapped by
/// [`endpoint_slot`]: what the established-flow path needs of an endpoint, readable without a
/// hash lookup. A cache of [`MAP_ENDPOINTS`], which stays authoritative.
pub const MAP_ENDPOINT_SLOTS: &str = "ENDPOINT_SLOTS";
/// Mmapable array of [`FlowBucket`]s: the IPv4 flow table in front of [`MAP_CONNTRACK_V4`]
/// (see [`FlowBucket`]).
pub const MAP_FLOWS_V4: &str = "FLOWS_V4";
/// Mmapable array of [`PeerBucket`]s: a cache of [`MAP_PEERS_V4`] the programs read with one
/// load instead of a hash lookup (see [`PeerBucket`]). `PEERS_V4` stays authoritative.
pub const MAP_PEER_SLOTS: &str = "PEER_SLOTS";
/// Mmapable array of [`FlowCount`], indexed by endpoint id: the flows each endpoint holds.
pub const MAP_FLOW_COUNTS: &str = "FLOW_COUNTS";

/// [`NodePortKey`] -> u32 (1): the node ports of the cluster's Services. A pod's new flow to a
/// node address on one of them is deferred like one to a Service frontend (kube-proxy DNATs
/// it to a backend after `from_pod`).
pub const MAP_NODE_PORTS: &str = "NODE_PORTS";
/// Array of [`DEFERRED_SLOTS`] [`Deferred`]: the original tuple of each packet `from_pod`
/// deferred to a Service's backend, indexed by the slot number the packet carries in the bits
/// [`SERVICE_MARK_MASK`] of its mark, for the program that judges it after kube-proxy's
/// translation.
pub const MAP_DEFERRED: &str = "DEFERRED";
/// LRU [`CtKey`] -> [`ServiceBackend`]: the backend kube-proxy chose for each Service flow a
/// pod opened, as the program that judged it after translation saw it; the epoch re-check of
/// a reply (which arrives un-NATed, from the frontend) judges the flow against it.
pub const MAP_SERVICE_FLOWS: &str = "SERVICE_FLOWS";
/// Program array: [`SVC_PROG_JUDGE`] and [`SVC_PROG_TO_POD`], for the tail calls between
/// `to_pod` and the program that judges a deferred packet, and [`SVC_PROG_AUDIT`] (with the
/// empty [`SVC_PROG_NONE`]).
pub const MAP_SVC_PROGS: &str = "SVC_PROGS";
/// Index of `svc_pod` in [`MAP_SVC_PROGS`].
pub const SVC_PROG_JUDGE: u32 = 0;
/// Index of `to_pod` in [`MAP_SVC_PROGS`].
pub const SVC_PROG_TO_POD: u32 = 1;
/// Index of `audit_pod` in [`MAP_SVC_PROGS`].
pub const SVC_PROG_AUDIT: u32 = 2;
/// An index of [`MAP_SVC_PROGS`] that stays empty: a tail call there fails.
pub const SVC_PROG_NONE: u32 = 3;
/// Entries of [`MAP_SVC_PROGS`].
pub const SVC_PROG_COUNT: u32 = 4;

/// The [`MAP_SVC_PROGS`] index a new flow no policy entry allows goes to: [`SVC_PROG_AUDIT`]
/// when only audit policies isolate `direction` (see [`audit_only_in`]), else the empty
/// [`SVC_PROG_NONE`]. Arithmetic, not a branch, for the programs' verifier budget.
#[inline(always)]
pub const fn audit_slot(flags: u32, direction: u8) -> u32 {
    let shift = if direction == DIR_INGRESS {
        EP_INGRESS_AUDIT.trailing_zeros()
    } else {
        EP_EGRESS_AUDIT.trailing_zeros()
    };
    SVC_PROG_NONE - ((flags >> shift) & 1)
}
const _: () = assert!(SVC_PROG_AUDIT + 1 == SVC_PROG_NONE && SVC_PROG_NONE < SVC_PROG_COUNT);

/// Name of the program attached to the TC ingress hook of a host-side veth, i.e. what the pod
/// sends (pod egress).
pub const PROG_FROM_POD: &str = "from_pod";
/// Name of the program attached to the TC egress hook of a host-side veth, i.e. what the pod
/// receives (pod ingress).
pub const PROG_TO_POD: &str = "to_pod";
/// Name of the program `to_pod` tail-calls for a packet `from_pod` deferred (see
/// [`MAP_DEFERRED`]): it judges the sending pod's egress on the translated destination, then
/// tail-calls `to_pod` for the receiving pod's ingress.
pub const PROG_SVC_POD: &str = "svc_pod";
/// Name of the program attached to the TC egress hook of the node's other interfaces (uplinks,
/// tunnels, bridges): it judges a deferred packet that leaves the node (a Service backend on
/// another node) and lets every other packet through untouched.
pub const PROG_SVC_EXIT: &str = "svc_exit";
/// Name of the program `from_pod` and `to_pod` tail-call for a new flow no policy entry allows
/// in a direction only audit policies isolate (`EP_*_AUDIT`): it tracks the flow and lets it
/// through as [`reason::ALLOW_AUDIT`] (would-drop). Out of line, so it is verified on its own
/// budget rather than on theirs.
pub const PROG_AUDIT_POD: &str = "audit_pod";

// ---------------------------------------------------------------------------------------------
// Default sizes (the agent's flags override them at load time).
// ---------------------------------------------------------------------------------------------

pub const DEFAULT_MAX_ENDPOINTS: u32 = 1024;
/// Entries of each of `PEERS_V4` and `PEERS_V6` at first: every pod address of a 100k-pod
/// cluster (dual-stack: one in each), the nodes' addresses and the Services' frontends fit with
/// room. The agent grows both (new maps, filled, then swapped in) when they pass
/// [`PEERS_GROW_AT`] percent, up to `--peers-map-max`.
pub const DEFAULT_PEERS_SIZE: u32 = 262_144;
/// The ceiling of the peers maps' growth (`--peers-map-max`).
pub const DEFAULT_PEERS_MAX: u32 = 1 << 22;
/// Percent of a peers map's entries past which the agent grows it.
pub const PEERS_GROW_AT: u32 = 80;
/// `BPF_F_NO_PREALLOC` (uapi `bpf.h`): a hash map whose elements are allocated as they are
/// written, so its capacity costs kernel memory only for its bucket array, not for every entry.
pub const BPF_F_NO_PREALLOC: u32 = 1;
/// Flags of `PEERS_V4` and `PEERS_V6`: sized for the cluster, mostly empty on a small one.
pub const PEERS_MAP_FLAGS: u32 = BPF_F_NO_PREALLOC;
pub const DEFAULT_CIDRS_SIZE: u32 = 16_384;
pub const DEFAULT_POLICY_SIZE: u32 = 262_144;
pub const DEFAULT_CONNTRACK_SIZE: u32 = 262_144;
pub const DEFAULT_FRAGMENTS_SIZE: u32 = 8_192;
pub const DEFAULT_EVENTS_BYTES: u32 = 1 << 20;
pub const DEFAULT_NODE_PORTS_SIZE: u32 = 16_384;
pub const DEFAULT_SERVICE_FLOWS_SIZE: u32 = 65_536;
/// Slots of [`MAP_DEFERRED`]: every value of the 16 mark bits (0 = nothing deferred).
pub const DEFERRED_SLOTS: u32 = 1 << 16;
/// The bits of the packet mark (`skb->mark`) that carry a deferred packet's slot from
/// `from_pod` to the judge after the translation: the mark is the one field the kernel keeps
/// from a veth's TC ingress through netfilter and routing to the TC egress of the device the
/// packet leaves by (`tc_index` is not kept), and nothing a pod sets reaches past its veth
/// (the mark is cleared when a packet changes network namespace). kube-proxy uses bits 14 and
/// 15 (0x4000 masquerade, 0x8000 drop); these must not be used by other software on the node.
pub const SERVICE_MARK_MASK: u32 = 0xffff_0000;
pub const SERVICE_MARK_SHIFT: u32 = 16;

// ---------------------------------------------------------------------------------------------
// Directions, families, protocols.
// ---------------------------------------------------------------------------------------------

/// Traffic the pod receives (the host veth's TC egress hook).
pub const DIR_INGRESS: u8 = 0;
/// Traffic the pod sends (the host veth's TC ingress hook).
pub const DIR_EGRESS: u8 = 1;

pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

pub const PROTO_ANY: u8 = 0;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;
pub const PROTO_SCTP: u8 = 132;

// ---------------------------------------------------------------------------------------------
// Identities.
// ---------------------------------------------------------------------------------------------

/// In a [`PolicyKey`]: any peer.
pub const IDENTITY_ANY: u32 = 0;
/// The node itself: always allowed both ways (kubelet probes, the attestation endpoint).
pub const IDENTITY_HOST: u32 = 1;
/// An address that is neither a known pod nor inside any ipBlock of any policy.
pub const IDENTITY_WORLD: u32 = 2;
/// A Service frontend address (ClusterIP, external IP, load-balancer IP). kube-proxy DNATs what
/// a pod sends there after `from_pod` has seen it, so a new egress flow of an egress-isolated
/// pod to it is deferred: judged on the backend by the program on the interface it leaves by
/// (see [`MAP_DEFERRED`]). No policy entry names this identity.
pub const IDENTITY_SERVICE: u32 = 3;
/// First identity the compiler hands out.
pub const IDENTITY_FIRST_ALLOCATED: u32 = 256;

// ---------------------------------------------------------------------------------------------
// Endpoints.
// ---------------------------------------------------------------------------------------------

/// Ingress of this endpoint is isolated: new inbound flows need a policy entry.
pub const EP_INGRESS_ISOLATED: u32 = 1 << 0;
/// Egress of this endpoint is isolated: new outbound flows need a policy entry.
pub const EP_EGRESS_ISOLATED: u32 = 1 << 1;
/// `ipv4` holds the pod's IPv4 address.
pub const EP_HAS_V4: u32 = 1 << 2;
/// `ipv6` holds the pod's IPv6 address.
pub const EP_HAS_V6: u32 = 1 << 3;
/// Ingress is isolated by audit policies only (with [`EP_INGRESS_ISOLATED`]): a new inbound
/// flow no policy entry allows is let through as [`reason::ALLOW_AUDIT`] (would-drop), and the
/// entries are the audit policies' own. No enforcing policy isolates this direction (when one
/// does, the entries are the enforcing policies' and this flag is clear): enforcement is
/// exactly as if the audit policies did not exist.
pub const EP_INGRESS_AUDIT: u32 = 1 << 4;
/// Egress is isolated by audit policies only (see [`EP_INGRESS_AUDIT`]).
pub const EP_EGRESS_AUDIT: u32 = 1 << 5;
/// Egress to the node's own addresses ([`IDENTITY_HOST`]) is judged by the policy entries like
/// any other peer, instead of always allowed: a cluster policy (Admin/Baseline tier) manages
/// this endpoint's egress, and its `nodes` or `networks` peers can match this node. The
/// compiler then writes the node's verdicts under [`IDENTITY_HOST`] where they differ from the
/// world's ([`IDENTITY_ANY`] entries).
pub const EP_EGRESS_HOST_JUDGED: u32 = 1 << 6;

/// Bit of [`EndpointInfo::port_masks`] that says entries with protocol [`PROTO_ANY`] exist.
pub const PORT_MASK_ANY_PROTO: u32 = 1 << 17;

/// One pod, keyed by the ifindex of its host-side veth.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointInfo {
    /// Small number chosen by the agent (1..max_endpoints): policy key and counter slot.
    pub id: u32,
    /// `EP_*` flags.
    pub flags: u32,
    /// Policy generation of this endpoint. A conntrack entry made under another epoch is
    /// re-checked against the current policy, so a revoked flow stops.
    pub epoch: u32,
    /// The pod's own identity (reported in events).
    pub identity: u32,
    /// Per direction ([`DIR_INGRESS`], [`DIR_EGRESS`]): bit `n` (0..=16) is set when a policy
    /// entry with `port_prefix_len == n` exists, [`PORT_MASK_ANY_PROTO`] when an any-protocol
    /// entry exists. The program only looks up the prefix lengths that exist.
    pub port_masks: [u32; 2],
    /// The pod's IPv4 address (network order) when `EP_HAS_V4`.
    pub ipv4: [u8; 4],
    /// The pod's IPv6 address when `EP_HAS_V6`.
    pub ipv6: [u8; 16],
}

impl EndpointInfo {
    pub const fn isolated(&self, direction: u8) -> bool {
        isolated_in(self.flags, direction)
    }

    /// Isolated by an enforcing policy (see [`enforced_in`]).
    pub const fn enforced(&self, direction: u8) -> bool {
        enforced_in(self.flags, direction)
    }
}

/// Whether endpoint `flags` isolate `direction` (a policy selects the pod for it).
pub const fn isolated_in(flags: u32, direction: u8) -> bool {
    let bit = if direction == DIR_INGRESS {
        EP_INGRESS_ISOLATED
    } else {
        EP_EGRESS_ISOLATED
    };
    flags & bit != 0
}

/// Whether endpoint `flags` isolate `direction` and enforce it: isolated by an enforcing
/// policy, not by audit policies only (see [`EP_INGRESS_AUDIT`]).
#[inline(always)]
pub const fn enforced_in(flags: u32, direction: u8) -> bool {
    let (iso, audit) = if direction == DIR_INGRESS {
        (EP_INGRESS_ISOLATED, EP_INGRESS_AUDIT)
    } else {
        (EP_EGRESS_ISOLATED, EP_EGRESS_AUDIT)
    };
    flags & (iso | audit) == iso
}

/// Whether endpoint `flags` isolate `direction` by audit policies only: a miss there is a
/// would-drop, not a drop.
#[inline(always)]
pub const fn audit_only_in(flags: u32, direction: u8) -> bool {
    let bit = if direction == DIR_INGRESS {
        EP_INGRESS_AUDIT
    } else {
        EP_EGRESS_AUDIT
    };
    flags & bit != 0
}

/// Slots of [`MAP_ENDPOINT_SLOTS`] (a power of two: the slot is the ifindex's low bits).
pub const ENDPOINT_SLOT_COUNT: u32 = 4096;

/// The slot of `ifindex` in [`MAP_ENDPOINT_SLOTS`].
pub const fn endpoint_slot(ifindex: u32) -> u32 {
    ifindex & (ENDPOINT_SLOT_COUNT - 1)
}

/// What the fast path (established flows, and new ones a policy allows) reads of an endpoint,
/// copied from its [`EndpointInfo`] into its slot so the common packet needs no ENDPOINTS hash
/// lookup (three dependent cache misses on the real path, before conntrack's own three).
///
/// The agent writes slots through a shared mapping of the array, as a sequence lock: the
/// first word (`ifindex | seq << 32`) gets an odd `seq`, then the fields, then the new ifindex
/// with the next even `seq`. A program uses a slot only when the first word names its ifindex
/// with an even `seq` and reads the same before and after the fields; anything else (a free
/// slot, another ifindex in it, a write in progress) sends it to ENDPOINTS.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EndpointSlot {
    /// ifindex of the host-side veth this slot describes; 0 when free.
    pub ifindex: u32,
    /// Sequence: odd while the agent writes the slot.
    pub seq: u32,
    /// [`EndpointInfo::id`].
    pub id: u32,
    /// [`EndpointInfo::flags`].
    pub flags: u32,
    /// [`EndpointInfo::epoch`].
    pub epoch: u32,
    /// [`EndpointInfo::ipv4`].
    pub ipv4: [u8; 4],
    /// [`EndpointInfo::port_masks`]: which policy keys a new flow probes. Zero in a slot an
    /// older agent wrote: no probe finds anything, and the full path decides from ENDPOINTS.
    pub port_masks: [u32; 2],
}

impl EndpointSlot {
    /// The slot that describes `info` at `ifindex` (sequence 0: the writer sets it).
    pub const fn of(ifindex: u32, info: &EndpointInfo) -> Self {
        Self {
            ifindex,
            seq: 0,
            id: info.id,
            flags: info.flags,
            epoch: info.epoch,
            ipv4: info.ipv4,
            port_masks: info.port_masks,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Peers (ipcache).
// ---------------------------------------------------------------------------------------------

/// What an address resolves to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerInfo {
    pub identity: u32,
    /// Reserved for identity facts (e.g. a verified service account); 0 today.
    pub flags: u32,
}

/// Two cached [`MAP_PEERS_V4`] entries whose addresses hash to this bucket ([`peer_bucket`]):
/// each way one 64-bit word, [`peer_way`] (address in the low half, identity in the high
/// half), 0 when free. The agent writes a way with one aligned 64-bit store, and the programs
/// read it with one load, so a way is never seen half-written on any 64-bit machine: no lock
/// and no sequence. A way holds an address only with the identity `PEERS_V4` gives it (the
/// agent writes `PEERS_V4` first, and clears the way before removing the entry), and an address
/// in no way is looked up in `PEERS_V4` as before: a way can only save the hash lookup, never
/// change an answer. Of the addresses of one bucket, the two lowest hold its ways.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PeerBucket {
    pub ways: [u64; 2],
}

/// The way word of `addr` (network order) with `identity`; never 0 for an identity other than
/// [`IDENTITY_ANY`], which no peer has.
#[inline(always)]
pub const fn peer_way(addr: [u8; 4], identity: u32) -> u64 {
    u32::from_ne_bytes(addr) as u64 | (identity as u64) << 32
}

/// The identity a way word gives `addr`, if it holds `addr` (a free way holds nothing).
#[inline(always)]
pub const fn peer_way_identity(way: u64, addr: [u8; 4]) -> Option<u32> {
    let identity = (way >> 32) as u32;
    if way as u32 == u32::from_ne_bytes(addr) && identity != IDENTITY_ANY {
        Some(identity)
    } else {
        None
    }
}

/// The bucket of `addr` among `buckets`, computed the same way by the programs and the agent:
/// a xorshift-multiply mix (pod addresses differ in their low bits, which must reach the high
/// bits), mapped onto `0..buckets` by a multiply and a shift.
#[inline(always)]
pub const fn peer_bucket(addr: [u8; 4], buckets: u32) -> u32 {
    let mut h = u32::from_ne_bytes(addr).wrapping_mul(0x9e37_79b1);
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    ((h as u64 * buckets as u64) >> 32) as u32
}

/// Buckets of [`MAP_PEER_SLOTS`] for a `PEERS_V4` of `peers` entries: two ways a bucket, a
/// bucket per address, so at most ~10 % of a full map's addresses find both ways of their
/// bucket taken (and keep the hash lookup). 16 bytes per possible peer.
pub const fn peer_buckets_for(peers: u32) -> u32 {
    if peers == 0 { 1 } else { peers }
}

// ---------------------------------------------------------------------------------------------
// Policy.
// ---------------------------------------------------------------------------------------------

/// One allowed (endpoint, direction, peer identity, protocol, port block).
///
/// `port` is in host byte order and masked to its `port_prefix_len` leading bits, so a port
/// range (`endPort`) compiles to a few aligned blocks, as CIDRs do. `protocol == PROTO_ANY`
/// only with `port_prefix_len == 0` and `port == 0` (a rule without ports: every protocol).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    pub endpoint: u32,
    /// Peer identity, or [`IDENTITY_ANY`].
    pub identity: u32,
    pub direction: u8,
    pub protocol: u8,
    /// 0 (any port) ..= 16 (exact port).
    pub port_prefix_len: u8,
    pub _pad0: u8,
    pub port: u16,
    pub _pad1: u16,
}

impl PolicyKey {
    /// The key for `port` under a prefix of `len` bits (masking the port).
    pub const fn new(
        endpoint: u32,
        identity: u32,
        direction: u8,
        protocol: u8,
        port: u16,
        len: u8,
    ) -> Self {
        Self {
            endpoint,
            identity,
            direction,
            protocol,
            port_prefix_len: len,
            _pad0: 0,
            port: port & port_mask(len),
            _pad1: 0,
        }
    }
}

/// The mask of the leading `len` bits of a 16-bit port.
pub const fn port_mask(len: u8) -> u16 {
    if len == 0 {
        0
    } else if len >= 16 {
        0xffff
    } else {
        !(0xffffu16 >> len)
    }
}

/// Why an entry exists: the rule that allowed it, reported in events and by `explain`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyValue {
    /// Rule id chosen by the compiler (0 = none).
    pub rule: u32,
    pub _pad: u32,
}

// ---------------------------------------------------------------------------------------------
// Conntrack.
// ---------------------------------------------------------------------------------------------

/// A flow as seen at one endpoint, with its two ends ordered so that both directions of the
/// flow give the same key (`a` <= `b` comparing address then port). IPv4 addresses use the
/// first 4 bytes of the 16.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtKey {
    pub endpoint: u32,
    pub family: u8,
    pub protocol: u8,
    pub _pad: u16,
    pub addr_a: [u8; 16],
    pub addr_b: [u8; 16],
    /// Ports (ICMP echo: the identifier in both) in host byte order.
    pub port_a: u16,
    pub port_b: u16,
}

/// [`CtKey`] of an IPv4 flow, as the IPv4 conntrack map holds it: same ordering of the ends,
/// 4-byte addresses (network order), every field word-aligned so the kernel hashes it as five
/// 32-bit words.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtKeyV4 {
    pub endpoint: u32,
    pub protocol: u8,
    pub _pad: [u8; 3],
    pub addr_a: [u8; 4],
    pub addr_b: [u8; 4],
    pub port_a: u16,
    pub port_b: u16,
}

impl CtKeyV4 {
    /// The family-neutral form (addresses in the first 4 of 16 bytes).
    pub fn to_key(&self) -> CtKey {
        let mut addr_a = [0u8; 16];
        let mut addr_b = [0u8; 16];
        addr_a[..4].copy_from_slice(&self.addr_a);
        addr_b[..4].copy_from_slice(&self.addr_b);
        CtKey {
            endpoint: self.endpoint,
            family: FAMILY_V4,
            protocol: self.protocol,
            _pad: 0,
            addr_a,
            addr_b,
            port_a: self.port_a,
            port_b: self.port_b,
        }
    }
}

impl CtKey {
    /// The IPv4 map's key of an IPv4 flow; `None` for IPv6.
    pub fn to_v4(&self) -> Option<CtKeyV4> {
        (self.family == FAMILY_V4).then(|| CtKeyV4 {
            endpoint: self.endpoint,
            protocol: self.protocol,
            _pad: [0; 3],
            addr_a: [
                self.addr_a[0],
                self.addr_a[1],
                self.addr_a[2],
                self.addr_a[3],
            ],
            addr_b: [
                self.addr_b[0],
                self.addr_b[1],
                self.addr_b[2],
                self.addr_b[3],
            ],
            port_a: self.port_a,
            port_b: self.port_b,
        })
    }
}

/// The originator of the flow is end `a` of the key.
pub const CT_ORIGIN_A: u32 = 1 << 0;
/// The flow was first seen leaving the pod (egress); otherwise entering it.
pub const CT_ORIGIN_EGRESS: u32 = 1 << 1;
/// A policy change revoked the flow: a tombstone. Every packet of it, from either side, is
/// dropped as revoked until it has been silent for the non-TCP timeout (or a later policy
/// allows it again), so neither a retransmission nor the other side's packets can re-open it
/// as a new flow of a direction that is not isolated.
pub const CT_REVOKED: u32 = 1 << 2;
/// TCP: a packet of the other end (the flow's reply direction) was allowed: the handshake was
/// answered. Until then the flow lives for [`Config::ct_timeout_tcp_syn_ns`] of silence.
pub const CT_REPLIED: u32 = 1 << 3;
/// TCP: end `a` of the key sent a FIN.
pub const CT_FIN_A: u32 = 1 << 4;
/// TCP: end `b` of the key sent a FIN.
pub const CT_FIN_B: u32 = 1 << 5;
/// TCP: either end sent a RST.
pub const CT_RST: u32 = 1 << 6;
/// The TCP state bits, cleared when the originator opens the flow again with a SYN (a new
/// connection on the same ports).
pub const CT_TCP_STATE: u32 = CT_REPLIED | CT_FIN_A | CT_FIN_B | CT_RST;
/// An egress flow of the pod to a Service frontend (or a node port), keyed by its original
/// (untranslated) tuple. Until the program after kube-proxy's translation judged it, its rule
/// is 0: each packet the pod sends is deferred again, and what comes back is allowed (a
/// backend on the node itself is never judged there: traffic to the node is allowed). Judged,
/// it holds the allowing rule ([`RULE_IMPLICIT`] when none was needed) or is revoked.
pub const CT_SERVICE: u32 = 1 << 7;
/// The rule of a Service flow allowed without a policy rule (its backend is the pod itself or
/// a node): marks the flow as judged.
pub const RULE_IMPLICIT: u32 = u32::MAX;
/// The rule of a flow no policy entry allows, let through because only audit policies isolate
/// its direction (`EP_*_AUDIT`): the would-drop mark of its conntrack entry. Its first packet
/// is counted and reported as [`reason::ALLOW_AUDIT`]; once an enforcing policy isolates the
/// direction, the endpoint's epoch moves and the re-check revokes the flow like any other.
pub const RULE_AUDIT: u32 = u32::MAX - 1;
/// In a POLICY entry's rule: the entry denies. A new flow whose lookup hits it first is
/// dropped (an established one is revoked by the re-check); the rest is the rule id (the
/// compiler hands out ids below `RULE_DENY - 2`).
pub const RULE_DENY: u32 = 1 << 31;

/// Whether a POLICY entry's `rule` denies ([`RULE_DENY`]).
#[inline(always)]
pub const fn is_deny_rule(rule: u32) -> bool {
    rule & RULE_DENY != 0
}

/// The rule id of a POLICY entry's `rule`, the deny mark ([`RULE_DENY`]) aside.
#[inline(always)]
pub const fn rule_id(rule: u32) -> u32 {
    rule & !RULE_DENY
}

/// TCP header flags, as in byte 13 of the header.
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// The flags of a TCP flow with `flags` after a packet with header flags `tcp` from end `a`
/// (`from_a`) was allowed, originated from end `a` when `origin_a`: the state its timeout
/// follows. Anything but a SYN from the originator only adds bits; that SYN (without ACK) on a
/// flow that saw a FIN or a RST opens a new connection on the same ports, so the state starts
/// over.
#[inline(always)]
pub const fn tcp_flags_after(flags: u32, tcp: u8, from_a: bool, origin_a: bool) -> u32 {
    let forward = from_a == origin_a;
    let mut f = flags;
    if forward && tcp & (TCP_SYN | TCP_ACK) == TCP_SYN && f & (CT_FIN_A | CT_FIN_B | CT_RST) != 0 {
        f &= !CT_TCP_STATE;
    }
    if !forward {
        f |= CT_REPLIED;
    }
    if tcp & TCP_FIN != 0 {
        f |= if from_a { CT_FIN_A } else { CT_FIN_B };
    }
    if tcp & TCP_RST != 0 {
        f |= CT_RST;
    }
    f
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtValue {
    /// `bpf_ktime_get_coarse_ns` (CLOCK_MONOTONIC, tick resolution) of the last packet.
    pub last_seen_ns: u64,
    /// Endpoint epoch under which the flow was last allowed.
    pub epoch: u32,
    /// `CT_*` flags.
    pub flags: u32,
    /// Rule that allowed the flow (0 when the direction was not isolated).
    pub rule: u32,
    pub _pad: u32,
}

// ---------------------------------------------------------------------------------------------
// The IPv4 flow table.
// ---------------------------------------------------------------------------------------------

/// Ways of a [`FlowBucket`].
pub const FLOW_WAYS: usize = 2;
/// `FlowWay::last_seen` is the coarse clock in units of 2^24 ns (16.8 ms): a 32-bit stamp
/// compared as a signed difference wraps only after 1.1 years of silence.
pub const FLOW_TIME_SHIFT: u32 = 24;
/// Bits 0-7 of a way's `meta`: the flow's protocol.
pub const FLOW_PROTO_MASK: u32 = 0xff;
/// Bits 8-15 of a way's `meta`: the flow's `CT_*` flags.
pub const FLOW_FLAGS_SHIFT: u32 = 8;
/// Bits 16-27 of way 0's `meta`: the bucket's sequence, moved by every change of its ways.
pub const FLOW_SEQ_SHIFT: u32 = 16;
pub const FLOW_SEQ_MASK: u32 = 0xfff << FLOW_SEQ_SHIFT;
/// Bit 28 + i of way 0's `meta`: way i holds a flow (else it is free, whatever it holds).
pub const FLOW_LIVE0: u32 = 1 << 28;
pub const FLOW_LIVE1: u32 = 1 << 29;
/// Bit 30 of way 0's `meta`: a flow of this bucket went to `CONNTRACK_V4` (the bucket was
/// full), so a miss here must look there too. Sticky.
pub const FLOW_OVERFLOW: u32 = 1 << 30;
/// Bit 31 of way 0's `meta`: the bucket lock, taken by compare-and-swap by a program that
/// writes the bucket's ways.
pub const FLOW_LOCK: u32 = 1 << 31;
/// The bits of way 0's `meta` that belong to the bucket, not to the way.
pub const FLOW_CONTROL: u32 = FLOW_SEQ_MASK | FLOW_LIVE0 | FLOW_LIVE1 | FLOW_OVERFLOW | FLOW_LOCK;

/// The [`FLOW_LIVE0`] / [`FLOW_LIVE1`] bit of way `i`.
#[inline(always)]
pub const fn flow_live(i: usize) -> u32 {
    FLOW_LIVE0 << i
}

/// One IPv4 flow of a [`FlowBucket`]: the [`CtKeyV4`] without its padding and a [`CtValue`]
/// in 16 bytes, so that two share a cache line.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowWay {
    pub endpoint: u32,
    pub addr_a: [u8; 4],
    pub addr_b: [u8; 4],
    pub port_a: u16,
    pub port_b: u16,
    /// Protocol and `CT_*` flags; in way 0 also the bucket's control bits ([`FLOW_CONTROL`]).
    pub meta: u32,
    pub epoch: u32,
    pub rule: u32,
    /// `last_seen_ns >> FLOW_TIME_SHIFT`, truncated to 32 bits.
    pub last_seen: u32,
}

/// A bucket of the IPv4 flow table: one 64-byte cache line (the mmapable array's values start
/// page-aligned), so a new flow costs one cold line where the LRU hash costs two (bucket and
/// element) plus its locks and lists.
///
/// Concurrency: a program that writes a bucket's ways takes [`FLOW_LOCK`] in way 0's `meta` by
/// compare-and-swap, writes, and releases it with the sequence moved on. Readers take no lock:
/// they read way 0's `meta`, the ways, then `meta` again, and trust what they read only when
/// the lock was free and the sequence unchanged; otherwise they read again under the lock. A
/// flow is never in two ways of a bucket: an insert looks for the key under the lock first.
/// The agent never takes the lock (a preempted agent would stall the programs): it frees ways
/// and marks buckets overflowed with one compare-and-swap of way 0's `meta` that expects the
/// lock free and the sequence it read, so it changes nothing a program is writing or wrote
/// since.
/// Only x86-64 keeps the readers' loads in program order, so the agent enables the table
/// there only (the programs' `FLOW_BUCKETS` is 0 elsewhere, and IPv4 flows live in
/// [`MAP_CONNTRACK_V4`] alone).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowBucket {
    pub ways: [FlowWay; FLOW_WAYS],
}

impl FlowWay {
    /// The way's flow as a [`CtKeyV4`] (meaningful when the way is live).
    pub fn key(&self) -> CtKeyV4 {
        CtKeyV4 {
            endpoint: self.endpoint,
            protocol: (self.meta & FLOW_PROTO_MASK) as u8,
            _pad: [0; 3],
            addr_a: self.addr_a,
            addr_b: self.addr_b,
            port_a: self.port_a,
            port_b: self.port_b,
        }
    }

    /// The way's entry as a [`CtValue`], its stamp widened against `now_ns` (a stamp ahead of
    /// `now_ns` reads as `now_ns`).
    pub fn value(&self, now_ns: u64) -> CtValue {
        CtValue {
            last_seen_ns: flow_stamp_ns(self.last_seen, now_ns),
            epoch: self.epoch,
            flags: (self.meta >> FLOW_FLAGS_SHIFT) & 0xff,
            rule: self.rule,
            _pad: 0,
        }
    }
}

impl FlowBucket {
    /// The ways that hold a flow.
    pub fn live(&self) -> impl Iterator<Item = &FlowWay> {
        let control = self.ways[0].meta;
        self.ways
            .iter()
            .enumerate()
            .filter(move |(i, _)| control & flow_live(*i) != 0)
            .map(|(_, w)| w)
    }
}

/// The 32-bit stamp of `ns`.
#[inline(always)]
pub const fn flow_stamp(ns: u64) -> u32 {
    (ns >> FLOW_TIME_SHIFT) as u32
}

/// `stamp` widened to ns against `now_ns`: the start of its tick, or `now_ns` when it is ahead.
#[inline(always)]
pub const fn flow_stamp_ns(stamp: u32, now_ns: u64) -> u64 {
    let age = flow_stamp(now_ns).wrapping_sub(stamp) as i32;
    if age <= 0 {
        now_ns
    } else {
        now_ns.saturating_sub((age as u64) << FLOW_TIME_SHIFT)
    }
}

/// The key of the flow table's bucket hash: four random words, all zero for the unkeyed hash
/// of tables created before it existed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowSeed {
    pub k: [u32; 4],
}

impl FlowSeed {
    pub const UNKEYED: FlowSeed = FlowSeed { k: [0; 4] };

    pub const fn is_unkeyed(&self) -> bool {
        self.k[0] | self.k[1] | self.k[2] | self.k[3] == 0
    }
}

/// The bucket of `key` in a table of `buckets`, computed the same way by the programs and the
/// agent. Keyed (the table's [`FlowSeed`]): an NH hash (the UMAC construction: pairs of words,
/// each plus its own key word, multiplied to 64 bits and summed), whose collisions between
/// tuples a pod picks depend on a key it cannot read, then a xorshift-multiply finalizer so
/// that every bit of the sum moves the high bits, which a multiply-and-shift maps onto
/// `0..buckets` (no division). Two independent multiplies: the bucket's address, which gates
/// the one cold load of a new flow, is ready a few cycles after the key. An unkeyed seed
/// selects the hash of older tables.
#[inline(always)]
pub const fn flow_bucket(key: &CtKeyV4, buckets: u32, seed: &FlowSeed) -> u32 {
    if seed.is_unkeyed() {
        return flow_bucket_unkeyed(key, buckets);
    }
    let a = u32::from_le_bytes(key.addr_a).wrapping_add(seed.k[0]) as u64;
    let b = u32::from_le_bytes(key.addr_b).wrapping_add(seed.k[1]) as u64;
    let p = ((key.port_a as u32) << 16 | key.port_b as u32).wrapping_add(seed.k[2]) as u64;
    let e = (key.endpoint ^ (key.protocol as u32) << 24).wrapping_add(seed.k[3]) as u64;
    let nh = (a * b).wrapping_add(p * e);
    let mut h = (nh >> 32) as u32 ^ nh as u32;
    h ^= h >> 15;
    h = h.wrapping_mul(0x2c1b_3c6d);
    h ^= h >> 12;
    ((h as u64 * buckets as u64) >> 32) as u32
}

/// The unkeyed bucket hash of tables an older build created: each word multiplied by its own
/// odd constant, folded, then the same finalizer.
#[inline(always)]
const fn flow_bucket_unkeyed(key: &CtKeyV4, buckets: u32) -> u32 {
    let a = u32::from_le_bytes(key.addr_a).wrapping_mul(0x9e37_79b1);
    let b = u32::from_le_bytes(key.addr_b).wrapping_mul(0x85eb_ca77);
    let p = ((key.port_a as u32) << 16 | key.port_b as u32).wrapping_mul(0xc2b2_ae3d);
    let e = (key.endpoint ^ (key.protocol as u32) << 24).wrapping_mul(0x27d4_eb2f);
    let mut h = (a ^ b) ^ (p ^ e);
    h ^= h >> 15;
    h = h.wrapping_mul(0x2c1b_3c6d);
    h ^= h >> 12;
    ((h as u64 * buckets as u64) >> 32) as u32
}

// ---------------------------------------------------------------------------------------------
// Fragments.
// ---------------------------------------------------------------------------------------------

/// A datagram being fragmented, at one endpoint.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FragKey {
    pub endpoint: u32,
    /// IPv4 identification (16 bits) or IPv6 fragment identification.
    pub id: u32,
    pub family: u8,
    pub protocol: u8,
    pub direction: u8,
    pub _pad: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FragValue {
    pub last_seen_ns: u64,
    pub sport: u16,
    pub dport: u16,
    pub rule: u32,
}

// ---------------------------------------------------------------------------------------------
// Services: egress judged after kube-proxy's translation.
// ---------------------------------------------------------------------------------------------

/// A node port of a Service ([`MAP_NODE_PORTS`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodePortKey {
    pub protocol: u8,
    pub _pad: u8,
    /// Host byte order.
    pub port: u16,
}

/// What `from_pod` knew of a packet it deferred ([`MAP_DEFERRED`]): the original tuple (ports
/// in host order, IPv4 in the first 4 bytes), the sending pod's veth and when. The judging
/// program trusts a slot only for a packet of the same protocol, from the same source address
/// and port (or from a node address: kube-proxy masquerades hairpin and node-port traffic),
/// written within [`DEFERRED_TTL_NS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Deferred {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub family: u8,
    pub protocol: u8,
    pub _pad: u16,
    /// ifindex of the sending pod's host-side veth (its [`MAP_ENDPOINTS`] key).
    pub ifindex: u32,
    pub _pad2: u32,
    /// `bpf_ktime_get_coarse_ns` when written.
    pub stamp_ns: u64,
}

/// How long a [`Deferred`] slot stays valid: the packet crosses the node's stack in
/// microseconds, unless it waits for its next hop's address resolution (up to about a second
/// per probe on the kernel's defaults).
pub const DEFERRED_TTL_NS: u64 = 3_000_000_000;

/// The slot of [`MAP_DEFERRED`] (1..=65535, never 0) for a packet's original tuple: a keyed hash, so that
/// a pod cannot aim its packets at another pod's slots.
#[inline(always)]
pub const fn deferred_slot(h: u32) -> u32 {
    (h % (DEFERRED_SLOTS - 1)) + 1
}

/// The backend a Service flow was translated to ([`MAP_SERVICE_FLOWS`]); port in host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceBackend {
    pub addr: [u8; 16],
    pub port: u16,
    pub _pad: u16,
    pub _pad2: u32,
}

// ---------------------------------------------------------------------------------------------
// Verdicts, counters and events.
// ---------------------------------------------------------------------------------------------

/// Why a packet was allowed or dropped. Values below [`REASON_FIRST_DROP`] allow.
pub mod reason {
    /// A new flow allowed by a policy entry.
    pub const ALLOW_POLICY: u8 = 0;
    /// A later packet of an allowed flow, in the direction of its first packet.
    pub const ALLOW_ESTABLISHED: u8 = 1;
    /// A reply of an allowed flow.
    pub const ALLOW_REPLY: u8 = 2;
    /// An ICMP error about an allowed flow.
    pub const ALLOW_RELATED: u8 = 3;
    /// The direction is not isolated by any policy.
    pub const ALLOW_NOT_ISOLATED: u8 = 4;
    /// Traffic between the pod and its node, or the pod and itself.
    pub const ALLOW_HOST: u8 = 5;
    /// ARP with the pod's own sender address, IPv6 neighbour discovery and MLD scoped to the
    /// link, and non-IP frames a pod receives.
    pub const ALLOW_NON_IP: u8 = 6;
    /// A later fragment whose first fragment was allowed.
    pub const ALLOW_FRAGMENT: u8 = 7;
    /// Reserved: interfaces without an endpoint entry were once allowed; they are now dropped as
    /// [`DROP_UNPROGRAMMED`]. Kept so that the numbers of the other reasons do not move.
    pub const ALLOW_UNMANAGED: u8 = 8;
    /// No policy entry allows the new flow (the direction is isolated).
    pub const DROP_POLICY: u8 = 9;
    /// The pod sent a packet (or an ARP message) with a source address that is not its own, or
    /// a packet for the pod came with the pod's own address as its source (only a forger sends
    /// that: a pod's traffic to itself never leaves its namespace).
    pub const DROP_SPOOFED: u8 = 10;
    /// A later fragment with no allowed first fragment.
    pub const DROP_FRAGMENT: u8 = 11;
    /// Truncated or malformed headers.
    pub const DROP_MALFORMED: u8 = 12;
    /// A map was full, so the new flow could not be tracked: fail closed.
    pub const DROP_MAP_FULL: u8 = 13;
    /// Identity was required of the peer and it had none.
    pub const DROP_NO_IDENTITY: u8 = 14;
    /// An established flow that the current policy no longer allows.
    pub const DROP_REVOKED: u8 = 15;
    /// A pod sent a frame that is neither IP nor ARP.
    pub const DROP_NON_IP: u8 = 16;
    /// A VLAN-tagged frame (the kernel may untag it after TC judged it, and deliver what is
    /// inside as IP).
    pub const DROP_VLAN: u8 = 17;
    /// The interface carries the programs but has no endpoint entry: a pod the agent could not
    /// program (no room in ENDPOINTS, or more local pods than endpoint ids). Denied both ways
    /// until it is programmed; the agent names it in its log and on `/readyz`.
    pub const DROP_UNPROGRAMMED: u8 = 18;
    /// A new flow of an endpoint that already holds its limit of flows in that direction
    /// (`--ct-max-flows-per-endpoint`): one pod's flood cannot take the conntrack room the
    /// other pods' flows need.
    pub const DROP_FLOW_LIMIT: u8 = 19;
    /// A packet of an egress-isolated pod to a Service frontend (or a node port), let on to
    /// kube-proxy's translation: the program on the interface it leaves by judges it on its
    /// backend (counted there as allowed or dropped by policy). An allow (numbered after the
    /// drops because reasons never move).
    pub const ALLOW_SERVICE: u8 = 20;
    /// A deferred packet whose original destination could not be found again after the
    /// translation (its slot was taken by another packet meanwhile): fail closed.
    pub const DROP_UNRESOLVED: u8 = 21;
    /// A new flow that no policy entry allows, in a direction isolated by audit policies only:
    /// allowed, and reported as `would-drop`. An allow (given by `audit_pod` alone).
    pub const ALLOW_AUDIT: u8 = 22;
    /// A new flow whose policy lookup found a deny entry ([`RULE_DENY`](super::RULE_DENY)) of a
    /// cluster policy first (an Admin or Baseline tier `Deny`): dropped, the rule named.
    pub const DROP_DENY_RULE: u8 = 23;
}
pub const REASON_FIRST_DROP: u8 = reason::DROP_POLICY;
pub const REASON_COUNT: u32 = 24;

/// Whether `reason` drops the packet, for the reasons `from_pod` and `to_pod` give: they never
/// give [`reason::ALLOW_AUDIT`] (`audit_pod` does, and returns its own verdict), and their
/// verifier budget has no room for one more test on this path (so it is left out here;
/// [`verdict_name`] tells it apart).
#[inline(always)]
pub const fn is_drop_reason(reason: u8) -> bool {
    reason >= REASON_FIRST_DROP && reason != reason::ALLOW_SERVICE
}

/// The verdict label of `reason` (metrics, flow log): `dropped`, `would-drop` (allowed, but an
/// audit policy would have dropped it) or `allowed`.
pub const fn verdict_name(reason: u8) -> &'static str {
    if reason == reason::ALLOW_AUDIT {
        "would-drop"
    } else if is_drop_reason(reason) {
        "dropped"
    } else {
        "allowed"
    }
}

/// Short, stable names of the reasons (metrics labels, flow log).
pub const REASON_NAMES: [&str; REASON_COUNT as usize] = [
    "policy",
    "established",
    "reply",
    "related",
    "not-isolated",
    "host",
    "non-ip",
    "fragment",
    "unmanaged",
    "policy-denied",
    "spoofed",
    "fragment",
    "malformed",
    "map-full",
    "no-identity",
    "revoked",
    "non-ip-denied",
    "vlan",
    "unprogrammed",
    "flow-limit",
    "service",
    "unresolved",
    "audit",
    "rule-denied",
];

/// Packets and bytes, per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

/// Index into [`MAP_COUNTERS`]: `(endpoint * 2 + direction) * REASON_COUNT + reason`.
/// Endpoint 0 collects packets of interfaces without an endpoint entry.
pub const fn counter_index(endpoint: u32, direction: u8, reason: u8) -> u32 {
    (endpoint * 2 + direction as u32) * REASON_COUNT + reason as u32
}

/// Number of counter slots for `max_endpoints` endpoints (ids 1..max, plus slot 0).
pub const fn counter_slots(max_endpoints: u32) -> u32 {
    (max_endpoints + 1) * 2 * REASON_COUNT
}

/// One verdict, sent on [`MAP_EVENTS`] for every drop and, when [`CONFIG_LOG_ALLOWED`] is
/// set, for every new allowed flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VerdictEvent {
    pub timestamp_ns: u64,
    pub endpoint: u32,
    pub peer_identity: u32,
    pub rule: u32,
    /// Length of the packet.
    pub bytes: u32,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub family: u8,
    pub protocol: u8,
    pub direction: u8,
    pub reason: u8,
}

/// Send allow events of new flows too, not only drops.
pub const CONFIG_LOG_ALLOWED: u32 = 1 << 0;
/// On a miss in `FLOWS_V4`, look in `CONNTRACK_V4` whatever the bucket says: set while flows
/// recorded by programs that did not know `FLOWS_V4` may still be in `CONNTRACK_V4` unmarked
/// (an upgrade), cleared once every such flow's bucket is marked [`FLOW_OVERFLOW`].
pub const CONFIG_CT_LRU_ALL: u32 = 1 << 1;

/// Global settings, index 0 of [`MAP_CONFIG`]. A zero timeout means its default.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    pub flags: u32,
    /// Flows an endpoint may hold per direction of origin (0: no limit); a new flow past it is
    /// dropped as [`reason::DROP_FLOW_LIMIT`]. Counted in [`MAP_FLOW_COUNTS`].
    pub max_flows_per_endpoint: u32,
    /// Idle time after which an established TCP conntrack entry no longer counts (ns).
    pub ct_timeout_tcp_ns: u64,
    /// Idle time for UDP, SCTP and ICMP entries, and for tombstones (ns).
    pub ct_timeout_other_ns: u64,
    /// Idle time of a TCP flow whose other end never answered (ns).
    pub ct_timeout_tcp_syn_ns: u64,
    /// Idle time of a TCP flow closed by a RST or a FIN from each end (ns).
    pub ct_timeout_tcp_closed_ns: u64,
    /// The key of the flow table's bucket hash ([`flow_bucket`]), drawn at random when the
    /// table is created and kept with it; all zero for a table an older build created (its
    /// unkeyed hash stays until the pins go).
    pub flow_seed: FlowSeed,
}

pub const DEFAULT_CT_TIMEOUT_TCP_NS: u64 = 6 * 3600 * 1_000_000_000;
pub const DEFAULT_CT_TIMEOUT_OTHER_NS: u64 = 120 * 1_000_000_000;
pub const DEFAULT_CT_TIMEOUT_TCP_SYN_NS: u64 = 60 * 1_000_000_000;
pub const DEFAULT_CT_TIMEOUT_TCP_CLOSED_NS: u64 = 10 * 1_000_000_000;

/// Idle timeout (ns) of a flow of `proto` with `CT_*` `flags` under `cfg` (zeros: defaults). A
/// tombstone ([`CT_REVOKED`]) lives for the non-TCP timeout whatever its protocol.
#[inline(always)]
pub const fn ct_timeout(cfg: &Config, proto: u8, flags: u32) -> u64 {
    const fn or(v: u64, default: u64) -> u64 {
        if v == 0 { default } else { v }
    }
    if proto != PROTO_TCP || flags & CT_REVOKED != 0 {
        or(cfg.ct_timeout_other_ns, DEFAULT_CT_TIMEOUT_OTHER_NS)
    } else if flags & CT_RST != 0 || flags & (CT_FIN_A | CT_FIN_B) == CT_FIN_A | CT_FIN_B {
        or(
            cfg.ct_timeout_tcp_closed_ns,
            DEFAULT_CT_TIMEOUT_TCP_CLOSED_NS,
        )
    } else if flags & CT_REPLIED == 0 {
        or(cfg.ct_timeout_tcp_syn_ns, DEFAULT_CT_TIMEOUT_TCP_SYN_NS)
    } else {
        or(cfg.ct_timeout_tcp_ns, DEFAULT_CT_TIMEOUT_TCP_NS)
    }
}

/// Flows of one endpoint, by the direction that opened them (index [`DIR_INGRESS`] /
/// [`DIR_EGRESS`]): the element of [`MAP_FLOW_COUNTS`] at the endpoint's id. The programs add
/// one for each flow they record; the agent's conntrack sweep sets them to the live flows it
/// counted (give or take the flows made during the sweep) and says until when they hold.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowCount {
    /// Signed in effect: a count a race took below zero reads as negative (no limit reached),
    /// never as a huge one.
    pub by_origin: [u64; 2],
    /// Coarse-clock time (ns) until which the counts hold: a few sweep intervals after the
    /// last sweep. Past it (no agent sweeps: it is down, or never ran) the programs read them
    /// as zero (no limit), since counts that only grow would end up denying a busy pod's
    /// flows; the next sweep counts from scratch.
    pub valid_until_ns: u64,
    pub _pad: u64,
}

const _: () = {
    use core::mem::size_of;
    assert!(size_of::<EndpointInfo>() == 44);
    assert!(size_of::<PeerInfo>() == 8);
    assert!(size_of::<PolicyKey>() == 16);
    assert!(size_of::<PolicyValue>() == 8);
    assert!(size_of::<CtKey>() == 44);
    assert!(size_of::<CtKeyV4>() == 20);
    assert!(size_of::<CtValue>() == 24);
    assert!(size_of::<FragKey>() == 44);
    assert!(size_of::<FragValue>() == 16);
    assert!(size_of::<NodePortKey>() == 4);
    assert!(size_of::<Deferred>() == 56);
    assert!(size_of::<ServiceBackend>() == 24);
    assert!(size_of::<Counter>() == 16);
    assert!(size_of::<VerdictEvent>() == 64);
    assert!(size_of::<Config>() == 56);
    assert!(size_of::<FlowCount>() == 32);
    // Two slots a cache line, never one across two (the mmapable array is page-aligned).
    assert!(size_of::<EndpointSlot>() == 32);
    // Two ways a cache line; buckets never straddle two (page-aligned values).
    assert!(size_of::<FlowWay>() == 32);
    assert!(size_of::<FlowBucket>() == 64);
    assert!(ENDPOINT_SLOT_COUNT.is_power_of_two());
    // Four buckets a cache line, never one across two (page-aligned values).
    assert!(size_of::<PeerBucket>() == 16);
};

#[cfg(feature = "user")]
mod pod_impls {
    use super::*;
    // SAFETY: every type is #[repr(C)], made of integers and byte arrays, with explicit padding
    // (the size asserts above rule out implicit padding), so any bit pattern is valid.
    unsafe impl aya::Pod for EndpointInfo {}
    unsafe impl aya::Pod for PeerInfo {}
    unsafe impl aya::Pod for PolicyKey {}
    unsafe impl aya::Pod for PolicyValue {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtKeyV4 {}
    unsafe impl aya::Pod for CtValue {}
    unsafe impl aya::Pod for FragKey {}
    unsafe impl aya::Pod for FragValue {}
    unsafe impl aya::Pod for NodePortKey {}
    unsafe impl aya::Pod for Deferred {}
    unsafe impl aya::Pod for ServiceBackend {}
    unsafe impl aya::Pod for Counter {}
    unsafe impl aya::Pod for VerdictEvent {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for EndpointSlot {}
    unsafe impl aya::Pod for FlowBucket {}
    unsafe impl aya::Pod for PeerBucket {}
    unsafe impl aya::Pod for FlowCount {}
    unsafe impl aya::Pod for FlowSeed {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_ways_hold_one_address_and_free_ways_none() {
        let a = [10, 0, 0, 7];
        let w = peer_way(a, 300);
        assert_eq!(peer_way_identity(w, a), Some(300));
        assert_eq!(peer_way_identity(w, [10, 0, 0, 8]), None);
        // A free way does not hold 0.0.0.0 (a packet from no address yet).
        assert_eq!(peer_way_identity(0, [0, 0, 0, 0]), None);
        assert_eq!(
            peer_way_identity(peer_way(a, IDENTITY_HOST), a),
            Some(IDENTITY_HOST)
        );
    }

    #[test]
    fn peer_buckets_are_in_range_and_spread_a_pod_cidr() {
        for n in [1, 3, 1000, 65_536] {
            let mut used = [0u32; 1000];
            for i in 0..4096u32 {
                let [_, _, c, d] = i.to_be_bytes();
                let b = peer_bucket([10, 244, c, d], n);
                assert!(b < n);
                if n == 1000 {
                    used[b as usize] += 1;
                }
            }
            if n == 1000 {
                // 4096 consecutive addresses over 1000 buckets: about 4 each, none piled up.
                assert!(used.iter().all(|&u| u <= 16), "{used:?}");
            }
        }
    }

    #[test]
    fn port_masks() {
        assert_eq!(port_mask(0), 0);
        assert_eq!(port_mask(16), 0xffff);
        assert_eq!(port_mask(12), 0xfff0);
        assert_eq!(
            PolicyKey::new(1, 2, DIR_INGRESS, PROTO_TCP, 0x1234, 12).port,
            0x1230
        );
    }

    #[test]
    fn ipv4_conntrack_keys_convert_both_ways() {
        let mut addr_a = [0u8; 16];
        let mut addr_b = [0u8; 16];
        addr_a[..4].copy_from_slice(&[10, 0, 0, 1]);
        addr_b[..4].copy_from_slice(&[10, 0, 0, 2]);
        let k = CtKey {
            endpoint: 7,
            family: FAMILY_V4,
            protocol: PROTO_TCP,
            _pad: 0,
            addr_a,
            addr_b,
            port_a: 80,
            port_b: 40000,
        };
        let v4 = k.to_v4().expect("an IPv4 key");
        assert_eq!(v4.addr_a, [10, 0, 0, 1]);
        assert_eq!(
            (v4.endpoint, v4.protocol, v4.port_a, v4.port_b),
            (7, PROTO_TCP, 80, 40000)
        );
        assert_eq!(v4.to_key(), k);
        assert_eq!(
            CtKey {
                family: FAMILY_V6,
                ..k
            }
            .to_v4(),
            None
        );
    }

    #[test]
    fn counter_slots_cover_every_index() {
        let max = 4;
        let last = counter_index(max, DIR_EGRESS, (REASON_COUNT - 1) as u8);
        assert_eq!(last + 1, counter_slots(max));
    }
}
