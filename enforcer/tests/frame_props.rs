//! A property of the real programs: random and mutated frames, run through `from_pod` and
//! `to_pod` with `BPF_PROG_TEST_RUN`, are never allowed when a userspace model of what policy
//! allows says they must be denied. The check is one-sided: where the model allows, the
//! programs may still drop (a full map, a timeout, a stricter parser are not failures).
//!
//! - **The world** (fixed): five local endpoints isolated in both directions, egress only,
//!   ingress only, neither, and both with no rule at all, plus an interface without an endpoint
//!   entry; two remote pods, the node, an ipBlock with an except (IPv4 and IPv6); port rules
//!   (single ports, ranges, all ports), TCP, UDP, SCTP and any protocol, a few of them deny
//!   rules (a cluster policy's `Deny`), and one endpoint whose egress to the node the rules
//!   judge (`EP_EGRESS_HOST_JUDGED`). The rules are written as policy semantics (peer pods,
//!   ipBlocks, the node, protocol, port range, allow or deny); [`program`] turns them into map
//!   entries by hand (identities, port blocks, masks, the deny bit).
//! - **The model** ([`model`]) is written from the documented semantics (docs/architecture.md,
//!   "How a packet is judged"; the README's security model), not from the programs' code: it
//!   parses frames itself and says whether a frame may pass, tracking the flows and first
//!   fragments that both it and the programs allowed.
//! - **The frames** ([`Gen`]): sequences per case (new flows shaped by the rules, replies,
//!   deliveries between local pods, ICMP errors quoting earlier packets with arbitrary inner
//!   headers, fragments, ARP, ND/MLD, VLAN tags, other ethertypes, random bytes), each frame
//!   possibly mutated (truncated, bytes flipped, header fields set, tagged, extended).
//!
//! Every case starts from no flow and no fragment. A failure is shrunk (steps dropped while it
//! still fails) and printed with its seed, case number, the frames as hex and both verdicts.
//!
//! The model may tolerate known deviations of the programs from it, each marked `KNOWN(...)`
//! and listed in docs/testing.md (there are none at present); `ENFORCER_FUZZ_STRICT=1` turns
//! that off.
//!
//! `ENFORCER_FUZZ_CASES` (default [`DEFAULT_CASES`]) and `ENFORCER_FUZZ_SEED` (default
//! [`DEFAULT_SEED`]) set the run; `ENFORCER_FUZZ_CASE=N` replays case `N` of the seed alone.
//! `cargo xtask fuzz --cases N [--seed S]` runs it longer. Needs root (a private network
//! namespace for the interfaces, a private bpffs), so ignored by a plain `cargo test`.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
    time::Instant,
};

use enforcer::{
    datapath::{Datapath, DatapathOptions, Hook},
    reconcile::MapTable,
};
use enforcer_common::{
    DIR_EGRESS, DIR_INGRESS, EP_EGRESS_HOST_JUDGED, EP_EGRESS_ISOLATED, EP_HAS_V4, EP_HAS_V6,
    EP_INGRESS_ISOLATED, EndpointInfo, FragKey, FragValue, IDENTITY_ANY, IDENTITY_HOST,
    MAP_FRAGMENTS, PORT_MASK_ANY_PROTO, PROTO_ANY, PROTO_SCTP, PROTO_TCP, PROTO_UDP, PeerInfo,
    PolicyKey, PolicyValue, REASON_NAMES, RULE_DENY,
};
use enforcer_policy::state::Prefix;
use enforcer_testkit::netns::BpfMount;

/// `TC_ACT_SHOT`: the only action that drops.
const SHOT: i32 = 2;
/// Cases of a default run: 20 to 30 s on a 2-core VM, load included.
const DEFAULT_CASES: u64 = 6000;
const DEFAULT_SEED: u64 = 0x5eed_f4a3_e5c0_ffee;
/// Most steps of one case.
const MAX_STEPS: usize = 48;

// ---------------------------------------------------------------------------------------------
// A small deterministic PRNG (SplitMix64): the same seed gives the same frames on any machine
// and any version of the `rand` crate.

#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        (self.next() % n as u64) as usize
    }

    /// Uniform in `lo..=hi`.
    fn within(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    /// True with `percent` % probability.
    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }

    fn u8(&mut self) -> u8 {
        self.next() as u8
    }

    fn u16(&mut self) -> u16 {
        self.next() as u16
    }

    fn u32(&mut self) -> u32 {
        self.next() as u32
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.u8()).collect()
    }

    /// Fewer than `n` random bytes.
    fn upto(&mut self, n: usize) -> Vec<u8> {
        let len = self.below(n);
        self.bytes(len)
    }

    /// `min` random bytes and fewer than `extra` more.
    fn bytes_from(&mut self, min: usize, extra: usize) -> Vec<u8> {
        let len = min + self.below(extra);
        self.bytes(len)
    }

    /// An index drawn with the given weights.
    fn weighted(&mut self, weights: &[usize]) -> usize {
        let mut x = self.below(weights.iter().sum());
        for (i, w) in weights.iter().enumerate() {
            if x < *w {
                return i;
            }
            x -= w;
        }
        weights.len() - 1
    }
}

/// The seed of case `case` of a run seeded with `seed`: any case replays alone.
fn case_seed(seed: u64, case: u64) -> u64 {
    Rng(seed ^ case.wrapping_mul(0xd1b5_4a32_d192_ed03)).next()
}

// ---------------------------------------------------------------------------------------------
// The world, as policy semantics.

/// A direction as the pod sees it: `In` is what it receives (`to_pod`, the veth's TC egress
/// hook), `Out` what it sends (`from_pod`, the TC ingress hook).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Dir {
    In,
    Out,
}

impl Dir {
    fn num(self) -> u8 {
        match self {
            Dir::In => DIR_INGRESS,
            Dir::Out => DIR_EGRESS,
        }
    }

    fn hook(self) -> Hook {
        match self {
            Dir::In => Hook::Egress,
            Dir::Out => Hook::Ingress,
        }
    }

    fn flip(self) -> Self {
        match self {
            Dir::In => Dir::Out,
            Dir::Out => Dir::In,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Dir::In => "to the pod (to_pod)",
            Dir::Out => "from the pod (from_pod)",
        }
    }
}

struct Pod {
    name: &'static str,
    identity: u32,
    v4: Option<Ipv4Addr>,
    v6: Option<Ipv6Addr>,
}

const fn ip6(a: u16, b: u16, c: u16, h: u16) -> Ipv6Addr {
    Ipv6Addr::new(a, b, c, 0, 0, 0, 0, h)
}

/// Every pod: the local ones (with an interface below) and two remote ones (`b`, `p9`).
const PODS: &[Pod] = &[
    Pod {
        name: "a",
        identity: 300,
        v4: Some(Ipv4Addr::new(10, 0, 0, 1)),
        v6: Some(ip6(0xfd00, 0, 0, 1)),
    },
    Pod {
        name: "e",
        identity: 301,
        v4: Some(Ipv4Addr::new(10, 0, 0, 4)),
        v6: Some(ip6(0xfd00, 0, 0, 4)),
    },
    Pod {
        name: "i",
        identity: 302,
        v4: Some(Ipv4Addr::new(10, 0, 0, 3)),
        v6: None,
    },
    Pod {
        name: "n",
        identity: 303,
        v4: None,
        v6: Some(ip6(0xfd00, 0, 0, 6)),
    },
    Pod {
        name: "d",
        identity: 304,
        v4: Some(Ipv4Addr::new(10, 0, 0, 5)),
        v6: Some(ip6(0xfd00, 0, 0, 5)),
    },
    Pod {
        name: "b",
        identity: 400,
        v4: Some(Ipv4Addr::new(10, 0, 0, 2)),
        v6: Some(ip6(0xfd00, 0, 0, 2)),
    },
    Pod {
        name: "p9",
        identity: 401,
        v4: Some(Ipv4Addr::new(10, 0, 0, 9)),
        v6: Some(ip6(0xfd00, 0, 0, 9)),
    },
];

const NODE4: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 1);
const NODE6: Ipv6Addr = ip6(0xfd00, 0xffff, 0, 1);

/// The ipBlock: 192.168.0.0/16 except 192.168.5.0/24, 2001:db8::/32 except 2001:db8:5::/48.
const BLOCK4: (Ipv4Addr, u8) = (Ipv4Addr::new(192, 168, 0, 0), 16);
const EXCEPT4: (Ipv4Addr, u8) = (Ipv4Addr::new(192, 168, 5, 0), 24);
const BLOCK6: (Ipv6Addr, u8) = (ip6(0x2001, 0xdb8, 0, 0), 32);
const EXCEPT6: (Ipv6Addr, u8) = (ip6(0x2001, 0xdb8, 5, 0), 48);
const ID_BLOCK: u32 = 500;
const ID_EXCEPT: u32 = 501;

/// A local pod's endpoint: its id and isolation.
#[derive(Clone, Copy)]
struct Local {
    pod: &'static str,
    id: u32,
    iso_in: bool,
    iso_out: bool,
    /// Egress to the node is judged by the rules (`EP_EGRESS_HOST_JUDGED`), not always
    /// allowed.
    host_judged: bool,
}

impl Local {
    fn isolated(&self, dir: Dir) -> bool {
        match dir {
            Dir::In => self.iso_in,
            Dir::Out => self.iso_out,
        }
    }
}

struct Iface {
    name: &'static str,
    local: Option<Local>,
}

/// The interfaces the programs run on; `u` has no endpoint entry.
const IFACES: &[Iface] = &[
    Iface {
        name: "fpa",
        local: Some(Local {
            pod: "a",
            id: 1,
            iso_in: true,
            iso_out: true,
            host_judged: false,
        }),
    },
    Iface {
        name: "fpe",
        local: Some(Local {
            pod: "e",
            id: 2,
            iso_in: false,
            iso_out: true,
            host_judged: true,
        }),
    },
    Iface {
        name: "fpi",
        local: Some(Local {
            pod: "i",
            id: 3,
            iso_in: true,
            iso_out: false,
            host_judged: false,
        }),
    },
    Iface {
        name: "fpn",
        local: Some(Local {
            pod: "n",
            id: 4,
            iso_in: false,
            iso_out: false,
            host_judged: false,
        }),
    },
    Iface {
        name: "fpd",
        local: Some(Local {
            pod: "d",
            id: 5,
            iso_in: true,
            iso_out: true,
            host_judged: false,
        }),
    },
    Iface {
        name: "fpu",
        local: None,
    },
];

#[derive(Clone, Copy)]
enum Peers {
    /// Every address (a rule without peers).
    Any,
    /// The addresses of these pods.
    Pods(&'static [&'static str]),
    /// The ipBlock (both families), minus its except.
    Block,
    /// The node's own addresses (a cluster policy's `nodes` peer matching this node).
    Node,
}

#[derive(Clone, Copy)]
enum Ports {
    /// A rule without ports: every protocol.
    AnyProto,
    /// A protocol and a port range (inclusive).
    Range(u8, u16, u16),
}

struct Rule {
    ep: &'static str,
    dir: Dir,
    peers: Peers,
    ports: Ports,
    /// A cluster policy's `Deny` (entries with `RULE_DENY`).
    deny: bool,
}

const fn rule(ep: &'static str, dir: Dir, peers: Peers, ports: Ports) -> Rule {
    Rule {
        ep,
        dir,
        peers,
        ports,
        deny: false,
    }
}

/// A deny rule. The programs take the first entry found (the peer's identity before
/// `IDENTITY_ANY`, longer port prefixes first), the model lets any matching deny rule win: the
/// deny rules below are chosen so both agree (no allow of the same identity is more specific).
const fn deny_rule(ep: &'static str, dir: Dir, peers: Peers, ports: Ports) -> Rule {
    Rule {
        ep,
        dir,
        peers,
        ports,
        deny: true,
    }
}

/// What policy allows; every other new flow in an isolated direction is denied.
const RULES: &[Rule] = &[
    // a: isolated both ways.
    rule(
        "a",
        Dir::In,
        Peers::Pods(&["b"]),
        Ports::Range(PROTO_TCP, 80, 80),
    ),
    rule(
        "a",
        Dir::In,
        Peers::Pods(&["b"]),
        Ports::Range(PROTO_UDP, 53, 53),
    ),
    rule(
        "a",
        Dir::In,
        Peers::Pods(&["b"]),
        Ports::Range(PROTO_SCTP, 9000, 9000),
    ),
    rule(
        "a",
        Dir::In,
        Peers::Any,
        Ports::Range(PROTO_TCP, 8000, 8015),
    ),
    rule(
        "a",
        Dir::In,
        Peers::Block,
        Ports::Range(PROTO_TCP, 443, 443),
    ),
    rule("a", Dir::In, Peers::Pods(&["p9"]), Ports::AnyProto),
    // b is denied TCP 81 and, over the any-peer allow above, 8001.
    deny_rule(
        "a",
        Dir::In,
        Peers::Pods(&["b"]),
        Ports::Range(PROTO_TCP, 81, 81),
    ),
    deny_rule(
        "a",
        Dir::In,
        Peers::Pods(&["b"]),
        Ports::Range(PROTO_TCP, 8001, 8001),
    ),
    rule(
        "a",
        Dir::Out,
        Peers::Pods(&["b"]),
        Ports::Range(PROTO_TCP, 5432, 5432),
    ),
    rule("a", Dir::Out, Peers::Pods(&["p9"]), Ports::AnyProto),
    rule(
        "a",
        Dir::Out,
        Peers::Block,
        Ports::Range(PROTO_UDP, 123, 123),
    ),
    rule(
        "a",
        Dir::Out,
        Peers::Pods(&["e", "i"]),
        Ports::Range(PROTO_TCP, 3000, 3100),
    ),
    // e: egress isolated.
    rule(
        "e",
        Dir::Out,
        Peers::Pods(&["b"]),
        Ports::Range(PROTO_TCP, 80, 81),
    ),
    rule(
        "e",
        Dir::Out,
        Peers::Block,
        Ports::Range(PROTO_TCP, 443, 443),
    ),
    rule(
        "e",
        Dir::Out,
        Peers::Pods(&["a"]),
        Ports::Range(PROTO_UDP, 0, 65535),
    ),
    rule("e", Dir::Out, Peers::Any, Ports::Range(PROTO_UDP, 53, 53)),
    // e's egress to the node is judged: TCP 10250 allowed, TCP 22 denied (as is anything
    // else but UDP 53, allowed to any peer above); TCP 25 denied to anyone.
    rule(
        "e",
        Dir::Out,
        Peers::Node,
        Ports::Range(PROTO_TCP, 10250, 10250),
    ),
    deny_rule("e", Dir::Out, Peers::Node, Ports::Range(PROTO_TCP, 22, 22)),
    deny_rule("e", Dir::Out, Peers::Any, Ports::Range(PROTO_TCP, 25, 25)),
    // i: ingress isolated.
    rule(
        "i",
        Dir::In,
        Peers::Pods(&["b"]),
        Ports::Range(PROTO_TCP, 80, 80),
    ),
    rule(
        "i",
        Dir::In,
        Peers::Any,
        Ports::Range(PROTO_UDP, 5353, 5353),
    ),
    rule(
        "i",
        Dir::In,
        Peers::Pods(&["a"]),
        Ports::Range(PROTO_TCP, 1, 65535),
    ),
    rule("i", Dir::In, Peers::Block, Ports::AnyProto),
    // n: not isolated; d: isolated both ways, nothing allowed.
];

fn pod(name: &str) -> &'static Pod {
    PODS.iter()
        .find(|p| p.name == name)
        .expect("a pod of the world")
}

/// The address of family `v6` of `pod`, if it has one.
fn pod_addr(pod: &Pod, v6: bool) -> Option<IpAddr> {
    if v6 {
        pod.v6.map(IpAddr::V6)
    } else {
        pod.v4.map(IpAddr::V4)
    }
}

/// The local pod of interface `iface`'s address of family `v6`.
fn own(iface: usize, v6: bool) -> Option<IpAddr> {
    IFACES[iface].local.and_then(|l| pod_addr(pod(l.pod), v6))
}

fn in_prefix(addr: IpAddr, v4: (Ipv4Addr, u8), v6: (Ipv6Addr, u8)) -> bool {
    match addr {
        IpAddr::V4(a) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(v4.1)).unwrap_or(0);
            u32::from(a) & mask == u32::from(v4.0)
        }
        IpAddr::V6(a) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(v6.1)).unwrap_or(0);
            u128::from(a) & mask == u128::from(v6.0)
        }
    }
}

impl Peers {
    fn contains(&self, addr: IpAddr) -> bool {
        match self {
            Peers::Any => true,
            Peers::Pods(names) => names.iter().any(|n| {
                let p = pod(n);
                p.v4.map(IpAddr::V4) == Some(addr) || p.v6.map(IpAddr::V6) == Some(addr)
            }),
            Peers::Block => in_prefix(addr, BLOCK4, BLOCK6) && !in_prefix(addr, EXCEPT4, EXCEPT6),
            Peers::Node => is_node(addr),
        }
    }
}

impl Ports {
    /// Whether a new flow of `proto` to port `dport` (for TCP, UDP and SCTP) is allowed.
    fn allows(&self, proto: u8, dport: Option<u16>) -> bool {
        match *self {
            Ports::AnyProto => true,
            Ports::Range(p, lo, hi) => p == proto && dport.is_some_and(|d| lo <= d && d <= hi),
        }
    }
}

fn is_node(addr: IpAddr) -> bool {
    addr == IpAddr::V4(NODE4) || addr == IpAddr::V6(NODE6)
}

// ---------------------------------------------------------------------------------------------
// The world as map entries, written by hand (identities, port blocks, masks).

/// `lo..=hi` as aligned blocks (port, prefix length), as a port range compiles.
fn port_blocks(lo: u16, hi: u16) -> Vec<(u16, u8)> {
    let (mut lo, hi) = (u32::from(lo), u32::from(hi));
    let mut out = Vec::new();
    while lo <= hi {
        let mut size = 1u32 << 16;
        while size > 1 && (lo % size != 0 || lo + size - 1 > hi) {
            size >>= 1;
        }
        out.push((lo as u16, (16 - size.trailing_zeros()) as u8));
        lo += size;
    }
    out
}

fn program(dp: &mut Datapath, ifindex: &[u32]) {
    let peer = |identity| PeerInfo { identity, flags: 0 };
    for p in PODS {
        if let Some(a) = p.v4 {
            dp.peers_v4.set(&a, &peer(p.identity)).unwrap();
        }
        if let Some(a) = p.v6 {
            dp.peers_v6.set(&a, &peer(p.identity)).unwrap();
        }
    }
    dp.peers_v4.set(&NODE4, &peer(IDENTITY_HOST)).unwrap();
    dp.peers_v6.set(&NODE6, &peer(IDENTITY_HOST)).unwrap();
    for ((addr, len), id) in [(BLOCK4, ID_BLOCK), (EXCEPT4, ID_EXCEPT)] {
        dp.cidrs_v4.set(&Prefix { addr, len }, &peer(id)).unwrap();
    }
    for ((addr, len), id) in [(BLOCK6, ID_BLOCK), (EXCEPT6, ID_EXCEPT)] {
        dp.cidrs_v6.set(&Prefix { addr, len }, &peer(id)).unwrap();
    }
    let mut masks: BTreeMap<&str, [u32; 2]> = BTreeMap::new();
    for (n, r) in RULES.iter().enumerate() {
        let ep = IFACES
            .iter()
            .find_map(|i| i.local.filter(|l| l.pod == r.ep))
            .expect("a rule of a local pod");
        let ids: Vec<u32> = match r.peers {
            Peers::Any => vec![IDENTITY_ANY],
            Peers::Pods(names) => names.iter().map(|n| pod(n).identity).collect(),
            Peers::Block => vec![ID_BLOCK],
            Peers::Node => vec![IDENTITY_HOST],
        };
        let keys: Vec<(u8, u16, u8)> = match r.ports {
            Ports::AnyProto => vec![(PROTO_ANY, 0, 0)],
            Ports::Range(proto, lo, hi) => port_blocks(lo, hi)
                .into_iter()
                .map(|(port, len)| (proto, port, len))
                .collect(),
        };
        let mask = &mut masks.entry(r.ep).or_default()[usize::from(r.dir.num())];
        for id in ids {
            for &(proto, port, len) in &keys {
                dp.policy
                    .set(
                        &PolicyKey::new(ep.id, id, r.dir.num(), proto, port, len),
                        &PolicyValue {
                            rule: (100 + n as u32) | if r.deny { RULE_DENY } else { 0 },
                            _pad: 0,
                        },
                    )
                    .unwrap();
                *mask |= if proto == PROTO_ANY {
                    PORT_MASK_ANY_PROTO
                } else {
                    1 << len
                };
            }
        }
    }
    for (iface, &index) in IFACES.iter().zip(ifindex) {
        let Some(l) = iface.local else { continue };
        let p = pod(l.pod);
        let info = EndpointInfo {
            id: l.id,
            flags: (if l.iso_in { EP_INGRESS_ISOLATED } else { 0 })
                | (if l.iso_out { EP_EGRESS_ISOLATED } else { 0 })
                | (if p.v4.is_some() { EP_HAS_V4 } else { 0 })
                | (if p.v6.is_some() { EP_HAS_V6 } else { 0 })
                | (if l.host_judged {
                    EP_EGRESS_HOST_JUDGED
                } else {
                    0
                }),
            epoch: 1,
            identity: p.identity,
            port_masks: masks.get(l.pod).copied().unwrap_or_default(),
            ipv4: p.v4.map_or([0; 4], |a| a.octets()),
            ipv6: p.v6.map_or([0; 16], |a| a.octets()),
        };
        dp.endpoints.set(&index, &info).unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// Frame builders (the generator's; the model has its own parser).

mod wire {
    use std::net::{IpAddr, Ipv6Addr};

    pub const MAC_POD: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];
    pub const MAC_HOST: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];

    pub fn eth(ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::with_capacity(14 + payload.len());
        f.extend_from_slice(&MAC_HOST);
        f.extend_from_slice(&MAC_POD);
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// An Ethernet frame around the IP packet `ip` (ethertype from its version nibble).
    pub fn frame(ip: &[u8]) -> Vec<u8> {
        let ethertype = if ip.first().is_some_and(|b| b >> 4 == 6) {
            0x86dd
        } else {
            0x0800
        };
        eth(ethertype, ip)
    }

    pub fn be16(b: &[u8], i: usize) -> u16 {
        u16::from_be_bytes([b[i], b[i + 1]])
    }

    pub fn csum(data: &[u8]) -> u16 {
        let mut sum = 0u32;
        for c in data.chunks(2) {
            sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    /// An IPv6 extension header.
    #[derive(Clone, Debug)]
    pub enum Ext {
        /// Hop-by-hop options of `(n + 1) * 8` bytes (PadN).
        Hop(u8),
        /// Destination options of `(n + 1) * 8` bytes.
        Dest(u8),
        Routing {
            ty: u8,
            segs: u8,
        },
        Frag {
            offset: u16,
            more: bool,
            id: u32,
        },
        /// Authentication header of `(n + 2) * 4` bytes.
        Ah(u8),
    }

    impl Ext {
        pub fn number(&self) -> u8 {
            match self {
                Ext::Hop(_) => 0,
                Ext::Dest(_) => 60,
                Ext::Routing { .. } => 43,
                Ext::Frag { .. } => 44,
                Ext::Ah(_) => 51,
            }
        }

        fn render(&self, next: u8) -> Vec<u8> {
            match *self {
                Ext::Hop(units) | Ext::Dest(units) => {
                    let len = (usize::from(units.min(30)) + 1) * 8;
                    let mut h = vec![0u8; len];
                    h[0] = next;
                    h[1] = units.min(30);
                    h[2] = 1;
                    h[3] = (len - 4) as u8;
                    h
                }
                Ext::Routing { ty, segs } => {
                    let mut h = vec![0u8; 8 + 16 * usize::from(segs)];
                    h[0] = next;
                    h[1] = 2 * segs;
                    h[2] = ty;
                    h[3] = segs;
                    for s in 0..usize::from(segs) {
                        let seg = Ipv6Addr::new(0x2001, 0xdb8, 5, 0, 0, 0, 0, s as u16 + 1);
                        h[8 + 16 * s..24 + 16 * s].copy_from_slice(&seg.octets());
                    }
                    h
                }
                Ext::Frag { offset, more, id } => {
                    let mut h = vec![next, 0];
                    h.extend_from_slice(&((offset << 3) | u16::from(more)).to_be_bytes());
                    h.extend_from_slice(&id.to_be_bytes());
                    h
                }
                Ext::Ah(units) => {
                    let len = (usize::from(units.max(1)) + 2) * 4;
                    let mut h = vec![0u8; len];
                    h[0] = next;
                    h[1] = units.max(1);
                    h[4..8].copy_from_slice(&0x100u32.to_be_bytes());
                    h
                }
            }
        }
    }

    #[derive(Clone, Debug)]
    pub enum L4 {
        Tcp {
            sport: u16,
            dport: u16,
            flags: u8,
        },
        Udp {
            sport: u16,
            dport: u16,
            data: Vec<u8>,
        },
        Sctp {
            sport: u16,
            dport: u16,
        },
        /// ICMP or ICMPv6 (the family of the packet).
        Icmp {
            ty: u8,
            code: u8,
            rest: [u8; 4],
            body: Vec<u8>,
        },
        /// Any protocol number with these bytes.
        Raw {
            proto: u8,
            body: Vec<u8>,
        },
    }

    impl L4 {
        pub fn proto(&self, v6: bool) -> u8 {
            match self {
                L4::Tcp { .. } => 6,
                L4::Udp { .. } => 17,
                L4::Sctp { .. } => 132,
                L4::Icmp { .. } => {
                    if v6 {
                        58
                    } else {
                        1
                    }
                }
                L4::Raw { proto, .. } => *proto,
            }
        }

        pub fn bytes(&self) -> Vec<u8> {
            match self {
                L4::Tcp {
                    sport,
                    dport,
                    flags,
                } => {
                    let mut t = vec![0u8; 20];
                    t[0..2].copy_from_slice(&sport.to_be_bytes());
                    t[2..4].copy_from_slice(&dport.to_be_bytes());
                    t[4..8].copy_from_slice(&0x0100_0000u32.to_be_bytes());
                    t[12] = 5 << 4;
                    t[13] = *flags;
                    t[14..16].copy_from_slice(&64240u16.to_be_bytes());
                    t
                }
                L4::Udp { sport, dport, data } => {
                    let mut u = vec![0u8; 8];
                    u[0..2].copy_from_slice(&sport.to_be_bytes());
                    u[2..4].copy_from_slice(&dport.to_be_bytes());
                    u[4..6].copy_from_slice(&((8 + data.len()) as u16).to_be_bytes());
                    u.extend_from_slice(data);
                    u
                }
                L4::Sctp { sport, dport } => {
                    let mut s = vec![0u8; 12];
                    s[0..2].copy_from_slice(&sport.to_be_bytes());
                    s[2..4].copy_from_slice(&dport.to_be_bytes());
                    s[4..8].copy_from_slice(&0xdead_beefu32.to_be_bytes());
                    s.extend_from_slice(&[1, 0, 0, 4]);
                    s
                }
                L4::Icmp {
                    ty,
                    code,
                    rest,
                    body,
                } => {
                    let mut i = vec![*ty, *code, 0, 0];
                    i.extend_from_slice(rest);
                    i.extend_from_slice(body);
                    i
                }
                L4::Raw { body, .. } => body.clone(),
            }
        }
    }

    /// An IP packet: IPv4 when `src` is IPv4 (with `opts`), else IPv6 (with `exts`).
    #[derive(Clone, Debug)]
    pub struct Pkt {
        pub src: IpAddr,
        pub dst: IpAddr,
        pub l4: L4,
        /// IPv4 options (padded to 4-byte words, at most 40 bytes).
        pub opts: Vec<u8>,
        pub exts: Vec<Ext>,
        /// IPv4 identification (low 16 bits).
        pub id: u32,
    }

    pub struct Rendered {
        pub ip: Vec<u8>,
        /// IPv4 header length, or IPv6 header and extension headers.
        pub hdr_len: usize,
        /// IPv6: where the first Fragment header starts.
        pub frag_at: Option<usize>,
    }

    fn to_v6(a: IpAddr) -> Ipv6Addr {
        match a {
            IpAddr::V6(a) => a,
            IpAddr::V4(a) => a.to_ipv6_mapped(),
        }
    }

    impl Pkt {
        pub fn v6(&self) -> bool {
            self.src.is_ipv6()
        }

        pub fn render(&self) -> Rendered {
            let l4 = self.l4.bytes();
            if let (IpAddr::V4(s), IpAddr::V4(d)) = (self.src, self.dst) {
                let mut opts = self.opts.clone();
                opts.truncate(40);
                while !opts.len().is_multiple_of(4) {
                    opts.push(0);
                }
                let hl = 20 + opts.len();
                let mut h = vec![0u8; 20];
                h[0] = 0x40 | (hl / 4) as u8;
                h[2..4].copy_from_slice(&((hl + l4.len()) as u16).to_be_bytes());
                h[4..6].copy_from_slice(&(self.id as u16).to_be_bytes());
                h[8] = 64;
                h[9] = self.l4.proto(false);
                h[12..16].copy_from_slice(&s.octets());
                h[16..20].copy_from_slice(&d.octets());
                h.extend_from_slice(&opts);
                let c = csum(&h);
                h[10..12].copy_from_slice(&c.to_be_bytes());
                h.extend_from_slice(&l4);
                return Rendered {
                    ip: h,
                    hdr_len: hl,
                    frag_at: None,
                };
            }
            let proto = self.l4.proto(true);
            let mut h = vec![0u8; 40];
            h[0] = 0x60;
            h[6] = self.exts.first().map_or(proto, Ext::number);
            h[7] = 64;
            h[8..24].copy_from_slice(&to_v6(self.src).octets());
            h[24..40].copy_from_slice(&to_v6(self.dst).octets());
            let mut frag_at = None;
            for (i, e) in self.exts.iter().enumerate() {
                let next = self.exts.get(i + 1).map_or(proto, Ext::number);
                if matches!(e, Ext::Frag { .. }) && frag_at.is_none() {
                    frag_at = Some(h.len());
                }
                h.extend_from_slice(&e.render(next));
            }
            let hdr_len = h.len();
            h.extend_from_slice(&l4);
            let plen = (h.len() - 40) as u16;
            h[4..6].copy_from_slice(&plen.to_be_bytes());
            Rendered {
                ip: h,
                hdr_len,
                frag_at,
            }
        }
    }

    /// A fragment of the IPv4 packet `r`: its header with `id`, `offset` (8-byte units) and
    /// MF, carrying `chunk`.
    pub fn v4_fragment(r: &Rendered, id: u16, offset: u16, more: bool, chunk: &[u8]) -> Vec<u8> {
        let mut h = r.ip[..r.hdr_len].to_vec();
        h[2..4].copy_from_slice(&((r.hdr_len + chunk.len()) as u16).to_be_bytes());
        h[4..6].copy_from_slice(&id.to_be_bytes());
        let f = (if more { 0x2000 } else { 0 }) | (offset & 0x1fff);
        h[6..8].copy_from_slice(&f.to_be_bytes());
        h[10..12].copy_from_slice(&[0, 0]);
        let c = csum(&h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h.extend_from_slice(chunk);
        h
    }

    /// A fragment of the IPv6 packet `r` (which has a Fragment header): the headers up to it,
    /// with `id`, `offset` and M, carrying `chunk`.
    pub fn v6_fragment(r: &Rendered, id: u32, offset: u16, more: bool, chunk: &[u8]) -> Vec<u8> {
        let at = r.frag_at.expect("a Fragment header");
        let mut p = r.ip[..at + 8].to_vec();
        p[at + 2..at + 4].copy_from_slice(&((offset << 3) | u16::from(more)).to_be_bytes());
        p[at + 4..at + 8].copy_from_slice(&id.to_be_bytes());
        p.extend_from_slice(chunk);
        let plen = (p.len() - 40) as u16;
        p[4..6].copy_from_slice(&plen.to_be_bytes());
        p
    }

    /// An ARP message for IPv4 over Ethernet.
    pub fn arp(op: u16, sender: [u8; 4], target: [u8; 4]) -> Vec<u8> {
        let mut a = vec![0, 1, 8, 0, 6, 4];
        a.extend_from_slice(&op.to_be_bytes());
        a.extend_from_slice(&MAC_POD);
        a.extend_from_slice(&sender);
        a.extend_from_slice(&[0; 6]);
        a.extend_from_slice(&target);
        eth(0x0806, &a)
    }

    /// `frame` with `tags` (TPID, TCI) inserted after the MAC addresses.
    pub fn tagged(frame: &[u8], tags: &[(u16, u16)]) -> Vec<u8> {
        let mut f = frame[..12].to_vec();
        for (tpid, tci) in tags {
            f.extend_from_slice(&tpid.to_be_bytes());
            f.extend_from_slice(&tci.to_be_bytes());
        }
        f.extend_from_slice(&frame[12..]);
        f
    }
}

use wire::{Ext, L4, Pkt};

// ---------------------------------------------------------------------------------------------
// The model.

mod model {
    use std::{
        collections::HashSet,
        net::{IpAddr, Ipv4Addr, Ipv6Addr},
    };

    use super::{Dir, IFACES, Local, RULES, is_node, own};

    fn be16(b: &[u8], i: usize) -> u16 {
        u16::from(b[i]) << 8 | u16::from(b[i + 1])
    }

    fn be32(b: &[u8], i: usize) -> u32 {
        u32::from(be16(b, i)) << 16 | u32::from(be16(b, i + 2))
    }

    fn v4_at(b: &[u8], i: usize) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(b[i], b[i + 1], b[i + 2], b[i + 3]))
    }

    fn v6_at(b: &[u8], i: usize) -> IpAddr {
        let mut a = [0u8; 16];
        a.copy_from_slice(&b[i..i + 16]);
        IpAddr::V6(Ipv6Addr::from(a))
    }

    /// What a frame is, read from its bytes.
    #[derive(Debug)]
    pub enum Shape {
        /// Shorter than an Ethernet header.
        Short,
        /// An 802.1Q, 802.1ad or QinQ tag.
        Vlan,
        /// ARP; the sender's address when it is a whole Ethernet/IPv4 ARP message.
        Arp(Option<Ipv4Addr>),
        /// Any other ethertype.
        NonIp,
        /// IP whose headers are cut short or inconsistent.
        Malformed(&'static str),
        Ip(Ip),
    }

    #[derive(Debug)]
    pub struct Ip {
        pub src: IpAddr,
        pub dst: IpAddr,
        pub frag: Frag,
        /// The upper-layer protocol (a later fragment: the one its header names).
        pub proto: u8,
        pub l4: L4,
    }

    #[derive(Debug)]
    pub enum Frag {
        Whole,
        /// The first fragment: the identifications of its fragment headers.
        First(Vec<u32>),
        /// A later fragment (no upper-layer header).
        Later(u32),
    }

    #[derive(Debug)]
    pub enum L4 {
        Ports(u16, u16),
        /// ICMP/ICMPv6 echo request or reply: its identifier.
        Echo(u16),
        /// An ICMP error and the flow its quoted header names, if it names one.
        Error(Option<Tuple>),
        /// Neighbour discovery, router discovery, redirect or MLD.
        Nd,
        Other,
    }

    #[derive(Clone, Copy, Debug)]
    pub struct Tuple {
        pub proto: u8,
        pub src: IpAddr,
        pub sport: u16,
        pub dst: IpAddr,
        pub dport: u16,
    }

    pub fn dissect(f: &[u8]) -> Shape {
        if f.len() < 14 {
            return Shape::Short;
        }
        let p = &f[14..];
        match be16(f, 12) {
            0x8100 | 0x88a8 | 0x9100 => Shape::Vlan,
            0x0806 => {
                let whole = p.len() >= 28
                    && be16(p, 0) == 1
                    && be16(p, 2) == 0x0800
                    && p[4] == 6
                    && p[5] == 4;
                Shape::Arp(whole.then(|| Ipv4Addr::new(p[14], p[15], p[16], p[17])))
            }
            0x0800 => ipv4(p).unwrap_or_else(Shape::Malformed),
            0x86dd => ipv6(p).unwrap_or_else(Shape::Malformed),
            _ => Shape::NonIp,
        }
    }

    fn ipv4(p: &[u8]) -> Result<Shape, &'static str> {
        if p.len() < 20 {
            return Err("IPv4 header cut short");
        }
        if p[0] >> 4 != 4 {
            return Err("IPv4 version");
        }
        let ihl = usize::from(p[0] & 15) * 4;
        if ihl < 20 {
            return Err("IPv4 header length");
        }
        let total = usize::from(be16(p, 2));
        if total < ihl || total > p.len() {
            return Err("IPv4 total length");
        }
        let d = &p[..total];
        let (src, dst, proto) = (v4_at(d, 12), v4_at(d, 16), d[9]);
        let id = u32::from(be16(d, 4));
        let frag = be16(d, 6);
        if frag & 0x1fff != 0 {
            return Ok(Shape::Ip(Ip {
                src,
                dst,
                frag: Frag::Later(id),
                proto,
                l4: L4::Other,
            }));
        }
        let frag = if frag & 0x2000 != 0 {
            Frag::First(vec![id])
        } else {
            Frag::Whole
        };
        let l4 = l4(false, proto, &d[ihl..])?;
        Ok(Shape::Ip(Ip {
            src,
            dst,
            frag,
            proto,
            l4,
        }))
    }

    /// Where the upper layer starts after IPv6 extension headers (`d` ends with the packet),
    /// and the fragment headers met: `Err` for a header cut short.
    struct Chain {
        nh: u8,
        off: usize,
        firsts: Vec<u32>,
        later: Option<u32>,
    }

    fn walk(d: &[u8], mut nh: u8) -> Result<Chain, &'static str> {
        let mut off = 40;
        let mut firsts = Vec::new();
        loop {
            match nh {
                0 | 43 | 60 | 51 => {
                    if off + 2 > d.len() {
                        return Err("IPv6 extension header cut short");
                    }
                    let len = if nh == 51 {
                        (usize::from(d[off + 1]) + 2) * 4
                    } else {
                        (usize::from(d[off + 1]) + 1) * 8
                    };
                    if off + len > d.len() {
                        return Err("IPv6 extension header cut short");
                    }
                    nh = d[off];
                    off += len;
                }
                44 => {
                    if off + 8 > d.len() {
                        return Err("IPv6 fragment header cut short");
                    }
                    let fo = be16(d, off + 2);
                    let id = be32(d, off + 4);
                    nh = d[off];
                    off += 8;
                    if fo >> 3 != 0 {
                        return Ok(Chain {
                            nh,
                            off,
                            firsts,
                            later: Some(id),
                        });
                    }
                    if fo & 1 != 0 {
                        firsts.push(id);
                    }
                }
                _ => {
                    return Ok(Chain {
                        nh,
                        off,
                        firsts,
                        later: None,
                    });
                }
            }
        }
    }

    fn ipv6(p: &[u8]) -> Result<Shape, &'static str> {
        if p.len() < 40 {
            return Err("IPv6 header cut short");
        }
        if p[0] >> 4 != 6 {
            return Err("IPv6 version");
        }
        let end = 40 + usize::from(be16(p, 4));
        if end > p.len() {
            return Err("IPv6 payload length");
        }
        let d = &p[..end];
        let (src, dst) = (v6_at(d, 8), v6_at(d, 24));
        let c = walk(d, d[6])?;
        if let Some(id) = c.later {
            return Ok(Shape::Ip(Ip {
                src,
                dst,
                frag: Frag::Later(id),
                proto: c.nh,
                l4: L4::Other,
            }));
        }
        let l4 = l4(true, c.nh, &d[c.off..])?;
        let frag = if c.firsts.is_empty() {
            Frag::Whole
        } else {
            Frag::First(c.firsts)
        };
        Ok(Shape::Ip(Ip {
            src,
            dst,
            frag,
            proto: c.nh,
            l4,
        }))
    }

    fn is_icmp(v6: bool, proto: u8) -> bool {
        proto == if v6 { 58 } else { 1 }
    }

    fn is_echo(v6: bool, ty: u8) -> bool {
        if v6 {
            matches!(ty, 128 | 129)
        } else {
            matches!(ty, 0 | 8)
        }
    }

    /// The upper-layer header `seg` (up to the end of the IP packet: an ICMP error's quote is
    /// what the packet holds, not bytes the frame carries after it).
    fn l4(v6: bool, proto: u8, seg: &[u8]) -> Result<L4, &'static str> {
        match proto {
            6 => {
                if seg.len() < 20 {
                    return Err("TCP header cut short");
                }
                if seg[12] >> 4 < 5 {
                    return Err("TCP data offset");
                }
                Ok(L4::Ports(be16(seg, 0), be16(seg, 2)))
            }
            17 | 132 => {
                if seg.len() < if proto == 17 { 8 } else { 12 } {
                    return Err("UDP/SCTP header cut short");
                }
                Ok(L4::Ports(be16(seg, 0), be16(seg, 2)))
            }
            // Only the packet's family's ICMP: the other's number is an unknown protocol.
            _ if is_icmp(v6, proto) => {
                if seg.len() < 8 {
                    return Err("ICMP header cut short");
                }
                let ty = seg[0];
                let error = if v6 {
                    matches!(ty, 1..=4)
                } else {
                    matches!(ty, 3 | 4 | 5 | 11 | 12)
                };
                Ok(if is_echo(v6, ty) {
                    L4::Echo(be16(seg, 4))
                } else if error {
                    L4::Error(inner(v6, &seg[8..]))
                } else if v6 && matches!(ty, 130..=137 | 143) {
                    L4::Nd
                } else {
                    L4::Other
                })
            }
            _ => Ok(L4::Other),
        }
    }

    /// The flow the header an ICMP error quotes belongs to: its addresses, protocol and ports
    /// (an echo's identifier), when the quote holds them.
    fn inner(v6: bool, q: &[u8]) -> Option<Tuple> {
        let (src, dst, proto, seg) = if v6 {
            if q.len() < 40 || q[0] >> 4 != 6 {
                return None;
            }
            let c = walk(q, q[6]).ok()?;
            if c.later.is_some() {
                return None;
            }
            (v6_at(q, 8), v6_at(q, 24), c.nh, &q[c.off..])
        } else {
            if q.len() < 20 || q[0] >> 4 != 4 {
                return None;
            }
            let ihl = usize::from(q[0] & 15) * 4;
            // A later fragment has no upper-layer header: its bytes there are payload.
            if ihl < 20 || ihl > q.len() || be16(q, 6) & 0x1fff != 0 {
                return None;
            }
            (v4_at(q, 12), v4_at(q, 16), q[9], &q[ihl..])
        };
        let (sport, dport) = match proto {
            6 | 17 | 132 if seg.len() >= 4 => (be16(seg, 0), be16(seg, 2)),
            6 | 17 | 132 => return None,
            _ if is_icmp(v6, proto) => {
                if seg.len() < 6 {
                    return None;
                }
                if is_echo(v6, seg[0]) {
                    (be16(seg, 4), be16(seg, 4))
                } else {
                    (0, 0)
                }
            }
            _ => (0, 0),
        };
        Some(Tuple {
            proto,
            src,
            sport,
            dst,
            dport,
        })
    }

    /// A flow of one endpoint, both directions alike.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct FlowKey {
        ep: u32,
        proto: u8,
        ends: [(IpAddr, u16); 2],
    }

    impl FlowKey {
        fn new(ep: u32, t: &Tuple) -> Self {
            let (a, b) = ((t.src, t.sport), (t.dst, t.dport));
            Self {
                ep,
                proto: t.proto,
                ends: if a <= b { [a, b] } else { [b, a] },
            }
        }
    }

    /// A datagram whose first fragment passed: IPv4 by addresses, protocol and id; IPv6 by
    /// addresses and id.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct FragKey {
        ep: u32,
        dir: Dir,
        src: IpAddr,
        dst: IpAddr,
        id: u32,
        proto: Option<u8>,
    }

    fn frag_key(ep: u32, dir: Dir, ip: &Ip, id: u32) -> FragKey {
        FragKey {
            ep,
            dir,
            src: ip.src,
            dst: ip.dst,
            id,
            proto: ip.src.is_ipv4().then_some(ip.proto),
        }
    }

    /// The model's answer for one frame, and what it learns should the programs pass it.
    #[derive(Debug)]
    pub struct Decision {
        pub allow: bool,
        pub why: &'static str,
        flow: Option<FlowKey>,
        frags: Vec<FragKey>,
    }

    fn allow(why: &'static str) -> Decision {
        Decision {
            allow: true,
            why,
            flow: None,
            frags: Vec::new(),
        }
    }

    fn deny(why: &'static str) -> Decision {
        Decision {
            allow: false,
            why,
            flow: None,
            frags: Vec::new(),
        }
    }

    /// Flows and first fragments both the model and the programs allowed.
    pub struct Model {
        flows: HashSet<FlowKey>,
        frags: HashSet<FragKey>,
        /// Tolerate the programs' known deviations (each marked `KNOWN(...)` here and listed
        /// in docs/testing.md), so that the property checks everything else.
        #[expect(dead_code, reason = "no known deviation at present")]
        known: bool,
    }

    fn link_local(a: IpAddr) -> bool {
        matches!(a, IpAddr::V6(a) if a.segments()[0] & 0xffc0 == 0xfe80)
    }

    /// Whether a new flow from (`Out`) or to (`In`) the pod of `ep` with `peer` may start: a
    /// rule allows it and no deny rule matches it.
    pub fn policy_allows(ep: &str, dir: Dir, peer: IpAddr, proto: u8, dport: Option<u16>) -> bool {
        let matching = |deny: bool| {
            RULES.iter().any(|r| {
                r.deny == deny
                    && r.ep == ep
                    && r.dir == dir
                    && r.peers.contains(peer)
                    && r.ports.allows(proto, dport)
            })
        };
        matching(false) && !matching(true)
    }

    impl Model {
        pub fn new(known: bool) -> Self {
            Self {
                flows: HashSet::new(),
                frags: HashSet::new(),
                known,
            }
        }

        /// Whether `frame` may pass on interface `iface` in direction `dir`.
        pub fn decide(&self, iface: usize, dir: Dir, frame: &[u8]) -> Decision {
            let Some(local) = IFACES[iface].local else {
                return deny("no endpoint entry on the interface");
            };
            let ip = match dissect(frame) {
                Shape::Short => return deny("shorter than Ethernet"),
                Shape::Vlan => return deny("VLAN tag"),
                Shape::Arp(sender) => {
                    return match dir {
                        Dir::In => allow("ARP to the pod"),
                        Dir::Out
                            if sender.is_some() && sender.map(IpAddr::V4) == own(iface, false) =>
                        {
                            allow("ARP from the pod's own address")
                        }
                        Dir::Out => deny("ARP not from the pod's own address"),
                    };
                }
                Shape::NonIp => {
                    return match dir {
                        Dir::In => allow("non-IP to the pod"),
                        Dir::Out => deny("non-IP from the pod"),
                    };
                }
                Shape::Malformed(why) => return deny(why),
                Shape::Ip(ip) => ip,
            };
            let mine = own(iface, ip.src.is_ipv6());
            let as_ip = self.judge(local, mine, dir, &ip);
            if let L4::Nd = ip.l4 {
                let src_ok = link_local(ip.src)
                    || ip.src.is_unspecified()
                    || (dir == Dir::Out && Some(ip.src) == mine);
                let dst_ok = link_local(ip.dst)
                    || ip.dst.is_multicast()
                    || (dir == Dir::In && Some(ip.dst) == mine);
                if src_ok && dst_ok {
                    // Whatever it would start as an IP packet is remembered all the same.
                    return Decision {
                        allow: true,
                        why: "ND/MLD on the link",
                        ..as_ip
                    };
                }
            }
            as_ip
        }

        /// The verdict on an IP packet (not link-scoped ND) of `local`, whose own address of
        /// the packet's family is `mine`.
        fn judge(&self, local: Local, mine: Option<IpAddr>, dir: Dir, ip: &Ip) -> Decision {
            if dir == Dir::Out && Some(ip.src) != mine {
                return deny("source not the pod's address");
            }
            if dir == Dir::In && Some(ip.src) == mine {
                return deny("to the pod from its own address");
            }
            if dir == Dir::Out && Some(ip.dst) == mine {
                return allow("the pod to itself");
            }
            let peer = match dir {
                Dir::Out => ip.dst,
                Dir::In => ip.src,
            };
            if is_node(peer) && !(dir == Dir::Out && local.host_judged) {
                return allow("the node");
            }
            if let Frag::Later(id) = ip.frag {
                return if self.frags.contains(&frag_key(local.id, dir, ip, id)) {
                    allow("later fragment of an allowed first")
                } else if !local.isolated(dir) {
                    allow("later fragment, direction not isolated")
                } else {
                    deny("later fragment without an allowed first")
                };
            }
            if !local.iso_in && !local.iso_out {
                return allow("endpoint not isolated");
            }
            let (sport, dport) = match ip.l4 {
                L4::Ports(s, d) => (s, d),
                L4::Echo(id) => (id, id),
                _ => (0, 0),
            };
            let tuple = Tuple {
                proto: ip.proto,
                src: ip.src,
                sport,
                dst: ip.dst,
                dport,
            };
            let key = FlowKey::new(local.id, &tuple);
            let ported = matches!(ip.proto, 6 | 17 | 132);
            let new_ok = !local.isolated(dir)
                || policy_allows(local.pod, dir, peer, ip.proto, ported.then_some(dport));
            let mut d = if let L4::Error(Some(t)) = ip.l4
                && ip.dst == t.src
                && (dir == Dir::In || ip.src == t.dst)
                && self.flows.contains(&FlowKey::new(local.id, &t))
            {
                allow("ICMP error about an allowed flow")
            } else if self.flows.contains(&key) {
                allow("packet of an allowed flow")
            } else if new_ok {
                allow(if local.isolated(dir) {
                    "new flow a rule allows"
                } else {
                    "new flow, direction not isolated"
                })
            } else {
                deny("new flow no rule allows")
            };
            if new_ok {
                d.flow = Some(key);
            }
            if let Frag::First(ids) = &ip.frag {
                d.frags = ids
                    .iter()
                    .map(|&id| frag_key(local.id, dir, ip, id))
                    .collect();
            }
            d
        }

        /// The programs passed a frame the model allowed: remember what it started.
        pub fn passed(&mut self, d: &Decision) {
            if !d.allow {
                return;
            }
            if let Some(f) = d.flow {
                self.flows.insert(f);
            }
            self.frags.extend(d.frags.iter().copied());
        }
    }

    /// A one-line description of a frame for failure reports.
    pub fn describe(frame: &[u8]) -> String {
        match dissect(frame) {
            Shape::Ip(ip) => format!(
                "IP {} -> {} proto {} {:?} {:?}",
                ip.src, ip.dst, ip.proto, ip.frag, ip.l4
            ),
            other => format!("{other:?}"),
        }
    }
}

use model::Model;

// ---------------------------------------------------------------------------------------------
// The generator.

/// One frame on one interface in one direction.
#[derive(Clone)]
struct Step {
    iface: usize,
    dir: Dir,
    frame: Vec<u8>,
    note: String,
}

/// A whole packet sent earlier in the case: what replies, errors and fragments refer to.
#[derive(Clone)]
struct Sent {
    iface: usize,
    dir: Dir,
    pkt: Pkt,
}

const POOL4: &[Ipv4Addr] = &[
    NODE4,
    Ipv4Addr::new(192, 168, 1, 1),
    Ipv4Addr::new(192, 168, 200, 7),
    Ipv4Addr::new(192, 168, 5, 1),
    Ipv4Addr::new(192, 168, 5, 255),
    Ipv4Addr::new(192, 169, 0, 1),
    Ipv4Addr::new(8, 8, 8, 8),
    Ipv4Addr::new(10, 0, 0, 77),
    Ipv4Addr::new(0, 0, 0, 0),
    Ipv4Addr::new(255, 255, 255, 255),
    Ipv4Addr::new(224, 0, 0, 1),
    Ipv4Addr::new(169, 254, 1, 1),
    Ipv4Addr::new(127, 0, 0, 1),
];

const POOL6: &[Ipv6Addr] = &[
    NODE6,
    ip6(0x2001, 0xdb8, 1, 1),
    ip6(0x2001, 0xdb8, 0xffff, 9),
    ip6(0x2001, 0xdb8, 5, 1),
    ip6(0x2001, 0xdc8, 0, 1),
    ip6(0x2001, 0x4860, 0, 0x8888),
    ip6(0xfd00, 0, 0, 0x77),
    Ipv6Addr::UNSPECIFIED,
    Ipv6Addr::LOCALHOST,
    ip6(0xfe80, 0, 0, 1),
    ip6(0xfe80, 0, 0, 0xabcd),
    ip6(0xff02, 0, 0, 1),
    Ipv6Addr::new(0xff02, 0, 0, 0, 0, 1, 0xff00, 1),
    ip6(0xff0e, 0, 0, 1),
    ip6(0xff02, 0, 0, 0x16),
    Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0x0a00, 0x0001),
];

const PORTS: &[u16] = &[
    0, 1, 22, 53, 80, 81, 123, 443, 2999, 3000, 3100, 3101, 5353, 5432, 7999, 8000, 8015, 8016,
    9000, 40000, 65535,
];

struct Gen {
    rng: Rng,
    hist: Vec<Sent>,
    steps: Vec<Step>,
}

impl Gen {
    fn new(seed: u64) -> Self {
        Self {
            rng: Rng(seed),
            hist: Vec::new(),
            steps: Vec::new(),
        }
    }

    fn iface(&mut self) -> usize {
        self.rng.weighted(&[30, 15, 15, 10, 10, 4])
    }

    /// A family the endpoint of `iface` mostly has.
    fn family(&mut self, iface: usize) -> bool {
        let (has4, has6) = (own(iface, false).is_some(), own(iface, true).is_some());
        match (has4, has6) {
            (true, true) | (false, false) => self.rng.chance(50),
            (true, false) => self.rng.chance(15),
            (false, true) => !self.rng.chance(15),
        }
    }

    fn random_addr(&mut self, v6: bool) -> IpAddr {
        if v6 {
            IpAddr::V6(Ipv6Addr::from(
                (u128::from(self.rng.next()) << 64) | u128::from(self.rng.next()),
            ))
        } else {
            IpAddr::V4(Ipv4Addr::from(self.rng.u32()))
        }
    }

    /// Any address of family `v6`: a pod's, one of the pool, or random.
    fn addr(&mut self, v6: bool) -> IpAddr {
        match self.rng.weighted(&[45, 45, 10]) {
            0 => {
                let p = self.rng.pick(PODS);
                pod_addr(p, v6).unwrap_or_else(|| self.random_addr(v6))
            }
            1 => {
                if v6 {
                    IpAddr::V6(*self.rng.pick(POOL6))
                } else {
                    IpAddr::V4(*self.rng.pick(POOL4))
                }
            }
            _ => self.random_addr(v6),
        }
    }

    fn own_or_any(&mut self, iface: usize, v6: bool) -> IpAddr {
        own(iface, v6).unwrap_or_else(|| self.addr(v6))
    }

    fn peer_in(&mut self, peers: Peers, v6: bool) -> IpAddr {
        match peers {
            Peers::Any => self.addr(v6),
            Peers::Pods(names) => {
                let name = *self.rng.pick(names);
                let p = pod(name);
                pod_addr(p, v6).unwrap_or_else(|| self.addr(v6))
            }
            Peers::Block => {
                let (b, c) = (self.rng.u8(), self.rng.u8());
                match (v6, self.rng.weighted(&[60, 30, 10])) {
                    (false, 0) => {
                        IpAddr::V4(Ipv4Addr::new(192, 168, if b == 5 { 6 } else { b }, c))
                    }
                    (false, 1) => IpAddr::V4(Ipv4Addr::new(192, 168, 5, c)),
                    (false, _) => IpAddr::V4(Ipv4Addr::new(192, 169, b, c)),
                    (true, 0) => IpAddr::V6(ip6(0x2001, 0xdb8, u16::from(b) << 8 | 0x11, c.into())),
                    (true, 1) => IpAddr::V6(ip6(0x2001, 0xdb8, 5, c.into())),
                    (true, _) => IpAddr::V6(ip6(0x2001, 0xdb9, b.into(), c.into())),
                }
            }
            Peers::Node => {
                if v6 {
                    IpAddr::V6(NODE6)
                } else {
                    IpAddr::V4(NODE4)
                }
            }
        }
    }

    fn sport(&mut self) -> u16 {
        if self.rng.chance(60) {
            *self.rng.pick(&[40000, 40001, 80, 53, 5432])
        } else {
            self.rng.within(1024, 65535) as u16
        }
    }

    fn dport(&mut self) -> u16 {
        if self.rng.chance(80) {
            *self.rng.pick(PORTS)
        } else {
            self.rng.u16()
        }
    }

    /// A port of `lo..=hi` or just outside it.
    fn port_near(&mut self, lo: u16, hi: u16) -> u16 {
        match self.rng.weighted(&[70, 10, 10, 5, 5]) {
            0 => self.rng.within(lo.into(), hi.into()) as u16,
            1 => lo,
            2 => hi,
            3 => lo.wrapping_sub(1),
            _ => hi.wrapping_add(1),
        }
    }

    fn tcp_flags(&mut self) -> u8 {
        *self
            .rng
            .pick(&[0x02, 0x02, 0x12, 0x10, 0x18, 0x11, 0x04, 0x14, 0x00, 0xff])
    }

    fn ported(&mut self, proto: u8, dport: u16) -> L4 {
        let sport = self.sport();
        match proto {
            PROTO_TCP => L4::Tcp {
                sport,
                dport,
                flags: self.tcp_flags(),
            },
            PROTO_UDP => L4::Udp {
                sport,
                dport,
                data: self.rng.upto(24),
            },
            _ => L4::Sctp { sport, dport },
        }
    }

    fn echo(&mut self, v6: bool) -> L4 {
        let request = self.rng.chance(70);
        let ty = match (v6, request) {
            (false, true) => 8,
            (false, false) => 0,
            (true, true) => 128,
            (true, false) => 129,
        };
        let id = *self.rng.pick(&[1, 7, 0x1234, 40000]);
        let mut rest = [0u8; 4];
        rest[..2].copy_from_slice(&u16::to_be_bytes(id));
        rest[2..].copy_from_slice(&self.rng.u16().to_be_bytes());
        L4::Icmp {
            ty,
            code: 0,
            rest,
            body: b"pingpong".to_vec(),
        }
    }

    fn random_l4(&mut self, v6: bool) -> L4 {
        match self.rng.weighted(&[25, 20, 5, 15, 5, 8, 10, 5]) {
            0 => {
                let d = self.dport();
                self.ported(PROTO_TCP, d)
            }
            1 => {
                let d = self.dport();
                self.ported(PROTO_UDP, d)
            }
            2 => {
                let d = self.dport();
                self.ported(PROTO_SCTP, d)
            }
            3 => self.echo(v6),
            4 => L4::Icmp {
                ty: self.rng.u8(),
                code: self.rng.u8(),
                rest: [0; 4],
                body: self.rng.upto(16),
            },
            5 => {
                // An ICMP error quoting a made-up header.
                let inner = self.made_up_inner(v6);
                L4::Icmp {
                    ty: self.error_type(v6),
                    code: self.rng.u8() % 16,
                    rest: [0; 4],
                    body: inner,
                }
            }
            6 => L4::Raw {
                proto: *self
                    .rng
                    .pick(&[2, 4, 41, 47, 50, 59, 103, 135, 139, 253, 255]),
                body: self.rng.upto(40),
            },
            _ => {
                // The other family's ICMP protocol number, ICMP-shaped.
                let mut body = vec![*self.rng.pick(&[0, 3, 8, 11, 1, 128, 129, 135]), 0, 0, 0];
                body.extend(self.rng.bytes_from(4, 40));
                L4::Raw {
                    proto: if v6 { 1 } else { 58 },
                    body,
                }
            }
        }
    }

    fn error_type(&mut self, v6: bool) -> u8 {
        if v6 {
            *self.rng.pick(&[1, 1, 2, 3, 4])
        } else {
            *self.rng.pick(&[3, 3, 3, 11, 12, 4, 5])
        }
    }

    /// An IP header and 8 bytes of a packet nobody sent.
    fn made_up_inner(&mut self, v6: bool) -> Vec<u8> {
        let v6 = if self.rng.chance(10) { !v6 } else { v6 };
        let (src, dst) = (self.addr(v6), self.addr(v6));
        let l4 = self.random_l4(v6);
        let pkt = Pkt {
            src,
            dst,
            l4,
            opts: Vec::new(),
            exts: Vec::new(),
            id: self.rng.u32(),
        };
        let r = pkt.render();
        let n = (r.hdr_len + 8).min(r.ip.len());
        r.ip[..n].to_vec()
    }

    fn v4_options(&mut self) -> Vec<u8> {
        let mut o = Vec::new();
        for _ in 0..1 + self.rng.below(3) {
            match self.rng.below(6) {
                0 => o.extend(std::iter::repeat_n(1, 1 + self.rng.below(4))),
                1 => o.extend([0x94, 4, 0, 0]),
                2 => o.extend([0x44, 8, 5, 0, 0, 0, 0, 0]),
                3 => {
                    // Loose source route through the except block.
                    o.extend([0x83, 7, 4, 192, 168, 5, 1]);
                }
                4 => o.push(0),
                _ => o.extend(self.rng.bytes_from(1, 12)),
            }
        }
        o
    }

    fn exts(&mut self) -> Vec<Ext> {
        let n = match self.rng.weighted(&[55, 35, 10]) {
            0 => 0,
            1 => 1 + self.rng.below(3),
            _ => 5 + self.rng.below(8),
        };
        (0..n)
            .map(|_| match self.rng.weighted(&[25, 25, 15, 10, 10]) {
                0 => Ext::Hop(self.rng.below(3) as u8),
                1 => Ext::Dest(self.rng.below(3) as u8),
                2 => Ext::Routing {
                    ty: *self.rng.pick(&[0, 2, 4, 3, 253]),
                    segs: self.rng.below(3) as u8,
                },
                3 => Ext::Ah(1 + self.rng.below(4) as u8),
                _ => Ext::Frag {
                    offset: 0,
                    more: false,
                    id: self.rng.u32(),
                },
            })
            .collect()
    }

    fn push(&mut self, iface: usize, dir: Dir, frame: Vec<u8>, note: impl Into<String>) {
        let mut step = Step {
            iface,
            dir,
            frame,
            note: note.into(),
        };
        if self.rng.chance(15) {
            self.mutate(&mut step);
        }
        self.steps.push(step);
    }

    fn send(&mut self, s: Sent, note: &str) {
        let frame = wire::frame(&s.pkt.render().ip);
        self.push(s.iface, s.dir, frame, note);
        self.hist.push(s);
    }

    /// A new packet, usually shaped by a rule of its endpoint.
    fn fresh(&mut self) -> Sent {
        let iface = self.iface();
        let dir = if self.rng.chance(50) {
            Dir::In
        } else {
            Dir::Out
        };
        let v6 = self.family(iface);
        let rules: Vec<&Rule> = match IFACES[iface].local {
            Some(l) => RULES
                .iter()
                .filter(|r| r.ep == l.pod && r.dir == dir)
                .collect(),
            None => Vec::new(),
        };
        let (peer, l4) = if !rules.is_empty() && self.rng.chance(65) {
            let r = *self.rng.pick(&rules);
            let peer = self.peer_in(r.peers, v6);
            let l4 = match r.ports {
                Ports::AnyProto => self.random_l4(v6),
                Ports::Range(proto, lo, hi) => {
                    let d = self.port_near(lo, hi);
                    self.ported(proto, d)
                }
            };
            (peer, l4)
        } else {
            (self.addr(v6), self.random_l4(v6))
        };
        let me = if self.rng.chance(8) {
            self.addr(v6)
        } else {
            self.own_or_any(iface, v6)
        };
        let (src, dst) = match dir {
            Dir::Out => (me, peer),
            Dir::In => (peer, me),
        };
        Sent {
            iface,
            dir,
            pkt: Pkt {
                src,
                dst,
                l4,
                opts: if !v6 && self.rng.chance(15) {
                    self.v4_options()
                } else {
                    Vec::new()
                },
                exts: if v6 { self.exts() } else { Vec::new() },
                id: u32::from(*self.rng.pick(&[1u16, 2, 0x1234])),
            },
        }
    }

    fn earlier(&mut self) -> Sent {
        if self.hist.is_empty() || self.rng.chance(10) {
            self.fresh()
        } else {
            let i = self.rng.below(self.hist.len());
            self.hist[i].clone()
        }
    }

    fn reply(&mut self) {
        let mut s = self.earlier();
        let p = &mut s.pkt;
        std::mem::swap(&mut p.src, &mut p.dst);
        match &mut p.l4 {
            L4::Tcp {
                sport,
                dport,
                flags,
            } => {
                std::mem::swap(sport, dport);
                *flags = *self.rng.pick(&[0x12, 0x10, 0x18, 0x11, 0x04]);
            }
            L4::Udp { sport, dport, .. } | L4::Sctp { sport, dport } => {
                std::mem::swap(sport, dport);
            }
            L4::Icmp { ty, .. } => {
                *ty = match *ty {
                    8 => 0,
                    128 => 129,
                    t => t,
                };
            }
            L4::Raw { .. } => {}
        }
        s.dir = s.dir.flip();
        self.send(s, "reply");
    }

    fn repeat(&mut self) {
        let mut s = self.earlier();
        if let L4::Tcp { flags, .. } = &mut s.pkt.l4 {
            *flags = self.tcp_flags();
        }
        self.send(s, "again");
    }

    /// An earlier packet between two local pods, now on the other pod's interface.
    fn deliver(&mut self) {
        let s = self.earlier();
        let other = match s.dir {
            Dir::Out => s.pkt.dst,
            Dir::In => s.pkt.src,
        };
        let Some(iface) =
            (0..IFACES.len()).find(|&i| own(i, other.is_ipv6()) == Some(other) && i != s.iface)
        else {
            return self.send(s, "again");
        };
        self.send(
            Sent {
                iface,
                dir: s.dir.flip(),
                pkt: s.pkt,
            },
            "delivered",
        );
    }

    /// An ICMP error about an earlier packet, back towards its sender, quoting it (often
    /// cut or altered).
    fn icmp_error(&mut self) {
        let s = self.earlier();
        let v6 = s.pkt.v6();
        let r = s.pkt.render();
        let n = match self.rng.weighted(&[60, 15, 25]) {
            0 => r.hdr_len + 8,
            1 => r.ip.len(),
            _ => self.rng.below(r.ip.len() + 1),
        };
        let mut inner = r.ip[..n.min(r.ip.len())].to_vec();
        if self.rng.chance(30) && inner.len() >= 20 {
            // An inner address, port or protocol changed.
            let (src_at, dst_at, len, proto_at) = if v6 { (8, 24, 16, 6) } else { (12, 16, 4, 9) };
            match self.rng.below(5) {
                0 | 1 => {
                    let a = self.addr(v6);
                    let bytes = match a {
                        IpAddr::V4(a) => a.octets().to_vec(),
                        IpAddr::V6(a) => a.octets().to_vec(),
                    };
                    let at = if self.rng.chance(50) { src_at } else { dst_at };
                    if inner.len() >= at + len {
                        inner[at..at + len].copy_from_slice(&bytes[..len]);
                    }
                }
                2 => {
                    if inner.len() > r.hdr_len + 4 {
                        let at = r.hdr_len + self.rng.below(4);
                        inner[at] = self.rng.u8();
                    }
                }
                3 => inner[proto_at] = *self.rng.pick(&[1, 6, 17, 58, 132, 47]),
                _ => {
                    let at = self.rng.below(inner.len());
                    inner[at] ^= 1 << self.rng.below(8);
                }
            }
        }
        let pv6 = if self.rng.chance(5) { !v6 } else { v6 };
        let dir = if self.rng.chance(85) {
            s.dir.flip()
        } else {
            s.dir
        };
        let dst = if self.rng.chance(85) && pv6 == v6 {
            s.pkt.src
        } else {
            self.addr(pv6)
        };
        let src = match self.rng.weighted(&[60, 30, 10]) {
            0 if pv6 == v6 => s.pkt.dst,
            2 => self.own_or_any(s.iface, pv6),
            _ => self.addr(pv6),
        };
        let code = self.rng.below(6) as u8;
        let l4 = if self.rng.chance(8) {
            // The other family's ICMP protocol number, with an error type of that protocol.
            let mut body = vec![self.error_type(!pv6), code, 0, 0, 0, 0, 0, 0];
            body.extend_from_slice(&inner);
            L4::Raw {
                proto: if pv6 { 1 } else { 58 },
                body,
            }
        } else {
            L4::Icmp {
                ty: self.error_type(pv6),
                code,
                rest: [0; 4],
                body: inner,
            }
        };
        let pkt = Pkt {
            src,
            dst,
            l4,
            opts: Vec::new(),
            exts: if pv6 && self.rng.chance(20) {
                self.exts()
            } else {
                Vec::new()
            },
            id: 7,
        };
        let frame = wire::frame(&pkt.render().ip);
        self.push(s.iface, dir, frame, "icmp error");
    }

    /// An earlier or new packet in fragments: a first and later ones, some missing, out of
    /// order, overlapping, duplicated, or of another datagram.
    fn fragments(&mut self) {
        let mut s = self.earlier();
        let id = *self.rng.pick(&[1u32, 2, 3, 0x1234, 0xdead_beef]);
        let v6 = s.pkt.v6();
        if v6 && !s.pkt.exts.iter().any(|e| matches!(e, Ext::Frag { .. })) {
            let at = self.rng.below(s.pkt.exts.len() + 1);
            s.pkt.exts.insert(
                at,
                Ext::Frag {
                    offset: 0,
                    more: true,
                    id,
                },
            );
        }
        if let L4::Udp { data, .. } = &mut s.pkt.l4
            && data.len() < 16
        {
            data.resize(16, 0x55);
        }
        let r = s.pkt.render();
        let body_at = r.frag_at.map_or(r.hdr_len, |at| at + 8);
        let body = r.ip[body_at..].to_vec();
        let k = if body.len() > 8 {
            8 * (1 + self.rng.below((body.len() - 1) / 8))
        } else {
            body.len()
        };
        let piece = |id: u32, offset: u16, more: bool, chunk: &[u8]| {
            if v6 {
                wire::v6_fragment(&r, id, offset, more, chunk)
            } else {
                wire::v4_fragment(&r, id as u16, offset, more, chunk)
            }
        };
        let mut frames: Vec<(Vec<u8>, &str)> = Vec::new();
        if !self.rng.chance(15) {
            let first = piece(id, 0, true, &body[..k]);
            frames.push((first, "first fragment"));
        }
        let rest = if k < body.len() {
            body[k..].to_vec()
        } else {
            self.rng.bytes(8)
        };
        let later_id = if self.rng.chance(10) {
            id.wrapping_add(1)
        } else {
            id
        };
        let offset = if self.rng.chance(10) {
            self.rng.below(k / 8 + 2) as u16
        } else {
            (k / 8) as u16
        };
        let split = rest.len() > 8 && self.rng.chance(30);
        if split {
            frames.push((piece(later_id, offset, true, &rest[..8]), "later fragment"));
            frames.push((
                piece(later_id, offset + 1, false, &rest[8..]),
                "last fragment",
            ));
        } else {
            frames.push((piece(later_id, offset, false, &rest), "last fragment"));
        }
        if self.rng.chance(10) {
            let again = frames.last().expect("a fragment").clone();
            frames.push(again);
        }
        if self.rng.chance(10) {
            frames.reverse();
        }
        let (iface, dir) = if self.rng.chance(5) {
            (self.iface(), s.dir)
        } else {
            (s.iface, s.dir)
        };
        for (f, note) in frames {
            self.push(iface, dir, wire::frame(&f), note);
        }
    }

    fn arp(&mut self) {
        let iface = self.iface();
        let dir = if self.rng.chance(70) {
            Dir::Out
        } else {
            Dir::In
        };
        let sender = match self.rng.weighted(&[50, 20, 30]) {
            0 => self.own_or_any(iface, false),
            1 => self.peer_in(Peers::Pods(&["b", "a", "e", "i"]), false),
            _ => self.addr(false),
        };
        let IpAddr::V4(sender) = sender else {
            unreachable!("an IPv4 address")
        };
        let IpAddr::V4(target) = self.addr(false) else {
            unreachable!("an IPv4 address")
        };
        let op = if self.rng.chance(90) {
            *self.rng.pick(&[1, 2])
        } else {
            self.rng.u16()
        };
        let mut f = wire::arp(op, sender.octets(), target.octets());
        if self.rng.chance(15) {
            let at = 14 + self.rng.below(6);
            f[at] = self.rng.u8();
        }
        if self.rng.chance(10) {
            f.truncate(14 + self.rng.below(28));
        }
        self.push(iface, dir, f, "arp");
    }

    fn nd(&mut self) {
        let iface = self.iface();
        let dir = if self.rng.chance(60) {
            Dir::Out
        } else {
            Dir::In
        };
        let link = IpAddr::V6(ip6(0xfe80, 0, 0, *self.rng.pick(&[1, 2, 0xabcd])));
        let src = match self.rng.weighted(&[30, 15, 25, 30]) {
            0 => link,
            1 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            2 => self.own_or_any(iface, true),
            _ => self.addr(true),
        };
        let dst = match self.rng.weighted(&[30, 20, 20, 30]) {
            0 => IpAddr::V6(*self.rng.pick(&[
                ip6(0xff02, 0, 0, 1),
                ip6(0xff02, 0, 0, 2),
                ip6(0xff02, 0, 0, 0x16),
                Ipv6Addr::new(0xff02, 0, 0, 0, 0, 1, 0xff00, 4),
                ip6(0xff0e, 0, 0, 1),
                ip6(0xff05, 0, 0, 2),
            ])),
            1 => link,
            2 => self.own_or_any(iface, true),
            _ => self.addr(true),
        };
        let ty = *self
            .rng
            .pick(&[130, 131, 132, 133, 134, 135, 136, 137, 143]);
        let pkt = Pkt {
            src,
            dst,
            l4: L4::Icmp {
                ty,
                code: if self.rng.chance(90) {
                    0
                } else {
                    self.rng.u8()
                },
                rest: [0; 4],
                body: self.rng.upto(25),
            },
            opts: Vec::new(),
            exts: if self.rng.chance(40) {
                vec![Ext::Hop(0)]
            } else {
                self.exts()
            },
            id: 0,
        };
        self.send(Sent { iface, dir, pkt }, "nd/mld");
    }

    fn vlan(&mut self) {
        let s = self.fresh();
        let frame = wire::frame(&s.pkt.render().ip);
        let tpids = [0x8100u16, 0x88a8, 0x9100];
        let mut tags = vec![(*self.rng.pick(&tpids), self.rng.u16() & 0x0fff)];
        if self.rng.chance(40) {
            tags.push((*self.rng.pick(&tpids), self.rng.u16() & 0x0fff));
        }
        if self.rng.chance(20) {
            tags[0].1 = 0;
        }
        let f = wire::tagged(&frame, &tags);
        self.push(s.iface, s.dir, f, "vlan");
    }

    fn ethertype(&mut self) {
        let iface = self.iface();
        let dir = if self.rng.chance(60) {
            Dir::Out
        } else {
            Dir::In
        };
        let et = if self.rng.chance(80) {
            *self.rng.pick(&[
                0x88cc, 0x8035, 0x8847, 0x8848, 0x88e5, 0x0842, 0x22f0, 0x9000, 0x0004, 0x05dc,
                0x0600, 0x86de, 0x0801, 0x8863, 0x8864, 0x894f,
            ])
        } else {
            self.rng.u16()
        };
        let payload = if self.rng.chance(50) {
            // Something that would be IP behind another header.
            let s = self.fresh();
            let mut p = vec![0, 0, 0x11, 0x40];
            p.extend(s.pkt.render().ip);
            p
        } else {
            self.rng.upto(80)
        };
        let f = wire::eth(et, &payload);
        self.push(iface, dir, f, "other ethertype");
    }

    fn random_bytes(&mut self) {
        let iface = self.iface();
        let dir = if self.rng.chance(50) {
            Dir::Out
        } else {
            Dir::In
        };
        let mut f = self.rng.bytes_from(14, 100);
        if self.rng.chance(50) {
            let et = *self.rng.pick(&[0x0800u16, 0x86dd, 0x0806]);
            f[12..14].copy_from_slice(&et.to_be_bytes());
            if f.len() > 14 && self.rng.chance(60) {
                f[14] = if et == 0x86dd { 0x60 } else { 0x45 };
            }
        }
        self.push(iface, dir, f, "random bytes");
    }

    /// Truncates, flips, sets or extends the frame of `step`.
    fn mutate(&mut self, step: &mut Step) {
        let f = &mut step.frame;
        let len = f.len();
        let what = match self.rng.weighted(&[30, 25, 20, 10, 5, 10, 15]) {
            0 => {
                let to = if self.rng.chance(5) {
                    self.rng.below(14)
                } else {
                    14 + self.rng.below(len.saturating_sub(14).max(1))
                };
                f.truncate(to);
                format!("cut to {to}")
            }
            1 => {
                let n = 1 + self.rng.below(3);
                for _ in 0..n {
                    let at = self.rng.below(len.min(80));
                    f[at] ^= 1 << self.rng.below(8);
                }
                format!("{n} bits flipped")
            }
            2 => {
                // A header field of IPv4 or IPv6 set to anything.
                let v6 = len > 14 && f[14] >> 4 == 6;
                let at = if v6 {
                    14 + *self.rng.pick(&[0, 4, 5, 6, 40, 41, 42, 43, 54, 55])
                } else {
                    14 + *self.rng.pick(&[0, 0, 2, 3, 6, 7, 9, 20, 21, 32, 34])
                };
                if at < len {
                    f[at] = self.rng.u8();
                }
                format!("byte {at} set")
            }
            3 => {
                let n = 1 + self.rng.below(32);
                f.extend(self.rng.bytes(n));
                format!("{n} bytes appended")
            }
            4 => {
                let at = 12 + self.rng.below(len.saturating_sub(12).max(1));
                f.insert(at.min(len), self.rng.u8());
                format!("byte inserted at {at}")
            }
            5 => {
                let tag = (*self.rng.pick(&[0x8100u16, 0x88a8, 0x9100]), 0);
                *f = wire::tagged(f, &[tag]);
                "tagged".to_string()
            }
            _ => {
                // The IP length field, mostly shorter than the packet (bytes trail it).
                let (at, now) = match (f.get(12..14), len) {
                    (Some([0x08, 0x00]), 34..) => (16, usize::from(wire::be16(f, 16))),
                    (Some([0x86, 0xdd]), 54..) => (18, usize::from(wire::be16(f, 18)) + 40),
                    _ => return,
                };
                let base = if at == 16 { 0 } else { 40 };
                let want = if self.rng.chance(80) {
                    self.rng.within(base.min(now) as u64, now as u64) as usize
                } else {
                    now + 1 + self.rng.below(16)
                };
                let field = (want - base) as u16;
                f[at..at + 2].copy_from_slice(&field.to_be_bytes());
                format!("IP length {now} -> {want}")
            }
        };
        let _ = write!(step.note, ", {what}");
    }

    /// The steps of one case.
    fn case(mut self) -> Vec<Step> {
        let actions = 1 + self.rng.below(20);
        for _ in 0..actions {
            if self.steps.len() >= MAX_STEPS {
                break;
            }
            match self.rng.weighted(&[28, 14, 6, 5, 12, 10, 5, 6, 3, 3, 2]) {
                0 => {
                    let s = self.fresh();
                    self.send(s, "new");
                }
                1 => self.reply(),
                2 => self.repeat(),
                3 => self.deliver(),
                4 => self.icmp_error(),
                5 => self.fragments(),
                6 => self.arp(),
                7 => self.nd(),
                8 => self.vlan(),
                9 => self.ethertype(),
                _ => self.random_bytes(),
            }
        }
        self.steps.truncate(MAX_STEPS);
        self.steps
    }
}

// ---------------------------------------------------------------------------------------------
// The harness.

/// The programs loaded in a private network namespace and bpffs, the world programmed.
struct Bed {
    dp: Datapath,
    ifindex: Vec<u32>,
    /// Interfaces that ran a frame since the last reset (the others hold no flow).
    dirty: Vec<bool>,
}

fn ip(args: &[&str]) {
    enforcer_testkit::netns::ip(args).unwrap();
}

fn ifindex(name: &str) -> u32 {
    enforcer_testkit::netns::ifindex(name).unwrap()
}

impl Bed {
    /// Must run on a thread that moved into a network namespace of its own.
    fn new(pin: &Path) -> Self {
        for i in IFACES {
            ip(&[
                "link",
                "add",
                "name",
                i.name,
                "type",
                "veth",
                "peer",
                "name",
                &format!("{}p", i.name),
            ]);
            ip(&["link", "set", i.name, "up"]);
        }
        let ifindex: Vec<u32> = IFACES.iter().map(|i| ifindex(i.name)).collect();
        let mut dp = Datapath::open(DatapathOptions {
            pin_path: pin.to_path_buf(),
            max_endpoints: 16,
            // Small tables: each case starts by emptying them.
            conntrack_size: 4096,
            fragments_size: 1024,
            ..Default::default()
        })
        .expect("loading the programs");
        program(&mut dp, &ifindex);
        Self {
            dp,
            ifindex,
            dirty: vec![true; IFACES.len()],
        }
    }

    /// No flow, no fragment: where every case starts.
    fn reset(&mut self) {
        for (i, dirty) in IFACES.iter().zip(&mut self.dirty) {
            if let Some(l) = i.local
                && std::mem::take(dirty)
            {
                self.dp.conntrack.remove_endpoint(l.id).unwrap();
            }
        }
        let path = self.dp.root().join("maps").join(MAP_FRAGMENTS);
        let data = aya::maps::MapData::from_pin(&path).expect("the pinned FRAGMENTS");
        let mut frags: aya::maps::HashMap<_, FragKey, FragValue> =
            aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(data))
                .expect("FRAGMENTS as a hash map");
        let keys: Vec<FragKey> = frags.keys().filter_map(Result::ok).collect();
        for k in keys {
            let _ = frags.remove(&k);
        }
    }

    fn run(&mut self, step: &Step) -> Result<i32, String> {
        self.dirty[step.iface] = true;
        self.dp
            .test_run(step.dir.hook(), self.ifindex[step.iface], &step.frame)
            .map_err(|e| format!("{e:#}"))
    }

    /// The reasons whose counters `step` moved (for reports).
    fn reasons(&mut self, step: &Step) -> (Result<i32, String>, Vec<String>) {
        let before = self.dp.counters.read().unwrap_or_default();
        let act = self.run(step);
        let after = self.dp.counters.read().unwrap_or_default();
        let moved = after
            .iter()
            .filter(|(k, v)| before.get(k).map_or(0, |b| b.packets) != v.packets)
            .map(|((_, _, r), _)| {
                REASON_NAMES
                    .get(usize::from(*r))
                    .map_or_else(|| format!("reason {r}"), |n| (*n).to_string())
            })
            .collect();
        (act, moved)
    }
}

/// Where a case broke the property.
struct Failure {
    step: usize,
    action: String,
    why: &'static str,
}

/// Tallies of (the model's reason, the model's verdict, the programs').
#[derive(Default)]
struct Stats {
    runs: u64,
    skipped: u64,
    seen: BTreeMap<(bool, &'static str), [u64; 2]>,
}

/// Whether `BPF_PROG_TEST_RUN` may refuse `frame` (`EINVAL`): it takes no frame shorter than
/// an Ethernet header, nor an IPv4 or IPv6 one shorter than the IP header. A pod can send
/// such frames, but this test cannot run them.
fn refused(frame: &[u8]) -> bool {
    let need = match frame.get(12..14) {
        Some([0x08, 0x00]) => 14 + 20,
        Some([0x86, 0xdd]) => 14 + 40,
        _ => 14,
    };
    frame.len() < need
}

/// Runs `steps` from a clean state; the first step where the model denies and the programs
/// do not drop.
fn replay(bed: &mut Bed, steps: &[Step], mut stats: Option<&mut Stats>) -> Option<Failure> {
    bed.reset();
    let mut model = Model::new(tolerate_known());
    for (i, s) in steps.iter().enumerate() {
        let d = model.decide(s.iface, s.dir, &s.frame);
        let act = match bed.run(s) {
            Ok(a) => a,
            Err(e) => {
                if !refused(&s.frame) {
                    return Some(Failure {
                        step: i,
                        action: format!("BPF_PROG_TEST_RUN failed: {e}"),
                        why: d.why,
                    });
                }
                if let Some(st) = stats.as_deref_mut() {
                    st.skipped += 1;
                }
                continue;
            }
        };
        let passed = act != SHOT;
        if let Some(st) = stats.as_deref_mut() {
            st.runs += 1;
            st.seen.entry((d.allow, d.why)).or_default()[usize::from(passed)] += 1;
        }
        if !d.allow && passed {
            return Some(Failure {
                step: i,
                action: format!("action {act}"),
                why: d.why,
            });
        }
        if passed {
            model.passed(&d);
        }
    }
    None
}

/// Drops steps while the case still fails; returns the smaller case.
fn shrink(bed: &mut Bed, mut steps: Vec<Step>, mut at: usize) -> Vec<Step> {
    steps.truncate(at + 1);
    loop {
        let mut smaller = false;
        let mut i = steps.len();
        while i > 0 {
            i -= 1;
            if steps.len() == 1 {
                break;
            }
            let mut t = steps.clone();
            t.remove(i);
            if let Some(f) = replay(bed, &t, None) {
                at = f.step;
                t.truncate(at + 1);
                steps = t;
                smaller = true;
                i = i.min(steps.len());
            }
        }
        if !smaller {
            return steps;
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter()
        .fold(String::with_capacity(b.len() * 2), |mut s, x| {
            let _ = write!(s, "{x:02x}");
            s
        })
}

/// The report of a failing case: how to replay it, and its shrunk steps with both verdicts.
fn report(bed: &mut Bed, seed: u64, case: u64, steps: &[Step]) -> String {
    let mut out = format!(
        "a frame the model denies passed. Seed {seed}, case {case}; replay it with\n  \
         {}ENFORCER_FUZZ_SEED={seed} ENFORCER_FUZZ_CASE={case} cargo test -p enforcer --release \
         --test frame_props -- --include-ignored --nocapture random_frames\nShrunk to {} \
         step(s):\n",
        if tolerate_known() {
            ""
        } else {
            "ENFORCER_FUZZ_STRICT=1 "
        },
        steps.len()
    );
    bed.reset();
    let mut model = Model::new(tolerate_known());
    for (i, s) in steps.iter().enumerate() {
        let d = model.decide(s.iface, s.dir, &s.frame);
        let (act, reasons) = bed.reasons(s);
        let verdict = match &act {
            Ok(a) if *a == SHOT => "dropped".to_string(),
            Ok(a) => format!("PASSED (action {a})"),
            Err(e) => format!("not run: {e}"),
        };
        let _ = writeln!(
            out,
            "step {i}: {} {} [{}]\n  model: {} ({})\n  programs: {verdict}, counter {reasons:?}\n  \
             frame: {}\n  ({} bytes) {}",
            IFACES[s.iface].name,
            s.dir.name(),
            s.note,
            if d.allow { "allow" } else { "DENY" },
            d.why,
            model::describe(&s.frame),
            s.frame.len(),
            hex(&s.frame),
        );
        if matches!(act, Ok(a) if a != SHOT) {
            model.passed(&d);
        }
    }
    out
}

/// Whether the model tolerates the programs' known deviations: unless `ENFORCER_FUZZ_STRICT`
/// is set (to anything but `0`).
fn tolerate_known() -> bool {
    std::env::var("ENFORCER_FUZZ_STRICT").map_or(true, |v| v == "0")
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    let parsed = match v.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => v.parse(),
    };
    Some(parsed.unwrap_or_else(|_| panic!("{name}={v}: not a number")))
}

/// Runs `body` on a thread in a new network namespace with a private bpffs and the programs
/// loaded; the namespace (and its interfaces) goes with the thread, the pins with the mount.
fn on_bed<T: Send + 'static>(
    tag: &'static str,
    body: impl FnOnce(&mut Bed) -> T + Send + 'static,
) -> T {
    let handle = std::thread::spawn(move || {
        // SAFETY: unshare on this thread only (and the `ip` it spawns).
        assert_eq!(
            unsafe { libc::unshare(libc::CLONE_NEWNET) },
            0,
            "unshare(CLONE_NEWNET): run as root"
        );
        let mount = BpfMount::new(tag);
        let pin = mount.0.join("enforcer");
        let mut bed = Bed::new(&pin);
        let out = body(&mut bed);
        drop(bed);
        Datapath::cleanup(&pin).unwrap();
        assert!(!pin.exists(), "cleanup left {}", pin.display());
        drop(mount);
        out
    });
    match handle.join() {
        Ok(v) => v,
        Err(p) => std::panic::resume_unwind(p),
    }
}

// ---------------------------------------------------------------------------------------------
// The tests.

/// Known frames, with what the model and the programs must both say: the model, the world's
/// translation into maps and the harness agree on the plain cases before random ones count.
#[test]
#[ignore = "needs root"]
fn known_frames_get_the_verdicts_policy_gives() {
    let (a, e, i, n, d, u) = (0, 1, 2, 3, 4, 5);
    let a4 = IpAddr::V4(pod("a").v4.unwrap());
    let a6 = IpAddr::V6(pod("a").v6.unwrap());
    let b4 = IpAddr::V4(pod("b").v4.unwrap());
    let b6 = IpAddr::V6(pod("b").v6.unwrap());
    let p9 = IpAddr::V4(pod("p9").v4.unwrap());
    let e4 = IpAddr::V4(pod("e").v4.unwrap());
    let i4 = IpAddr::V4(pod("i").v4.unwrap());
    let n6 = IpAddr::V6(pod("n").v6.unwrap());
    let d4 = IpAddr::V4(pod("d").v4.unwrap());
    let world = IpAddr::V4(Ipv4Addr::new(8, 8, 8, 8));
    let pkt = |src, dst, l4| Pkt {
        src,
        dst,
        l4,
        opts: Vec::new(),
        exts: Vec::new(),
        id: 1,
    };
    let tcp = |sport, dport| L4::Tcp {
        sport,
        dport,
        flags: 0x02,
    };
    let udp = |sport, dport| L4::Udp {
        sport,
        dport,
        data: vec![0; 16],
    };
    let f = |p: &Pkt| wire::frame(&p.render().ip);
    let syn = pkt(b4, a4, tcp(40000, 80));
    let quote = syn.render().ip[..28].to_vec();
    let err = |src, dst| {
        f(&pkt(
            src,
            dst,
            L4::Icmp {
                ty: 3,
                code: 3,
                rest: [0; 4],
                body: quote.clone(),
            },
        ))
    };
    let big = pkt(a4, p9, udp(5000, 6000)).render();
    let frag =
        |id, off, more, chunk: &[u8]| wire::frame(&wire::v4_fragment(&big, id, off, more, chunk));
    let body = big.ip[big.hdr_len..].to_vec();
    let ns = Pkt {
        exts: vec![Ext::Hop(0)],
        ..pkt(
            IpAddr::V6(ip6(0xfe80, 0, 0, 1)),
            IpAddr::V6(Ipv6Addr::new(0xff02, 0, 0, 0, 0, 1, 0xff00, 2)),
            L4::Icmp {
                ty: 135,
                code: 0,
                rest: [0; 4],
                body: vec![0; 16],
            },
        )
    };
    let cases: Vec<(usize, Dir, Vec<u8>, bool, &str)> = vec![
        (a, Dir::In, f(&syn), true, "b to a, TCP 80"),
        (
            a,
            Dir::Out,
            f(&pkt(a4, b4, tcp(80, 40000))),
            true,
            "a's reply",
        ),
        (a, Dir::Out, err(a4, b4), true, "a's ICMP error about it"),
        (
            a,
            Dir::Out,
            err(a4, world),
            false,
            "the same error to another host",
        ),
        (
            a,
            Dir::In,
            f(&pkt(b4, a4, tcp(40000, 81))),
            false,
            "b to a, TCP 81",
        ),
        (
            a,
            Dir::In,
            f(&pkt(b6, a6, tcp(1, 8015))),
            true,
            "b to a, TCP 8015 (range)",
        ),
        (
            a,
            Dir::In,
            f(&pkt(b6, a6, tcp(1, 8016))),
            false,
            "b to a, TCP 8016",
        ),
        (
            a,
            Dir::In,
            f(&pkt(
                IpAddr::V4(Ipv4Addr::new(192, 168, 1, 1)),
                a4,
                tcp(1, 443),
            )),
            true,
            "block to a, TCP 443",
        ),
        (
            a,
            Dir::In,
            f(&pkt(
                IpAddr::V4(Ipv4Addr::new(192, 168, 5, 1)),
                a4,
                tcp(1, 443),
            )),
            false,
            "except to a, TCP 443",
        ),
        (
            a,
            Dir::Out,
            f(&pkt(
                IpAddr::V4(Ipv4Addr::new(10, 0, 0, 77)),
                b4,
                tcp(1, 5432),
            )),
            false,
            "a spoofing",
        ),
        (
            a,
            Dir::Out,
            wire::arp(1, [10, 0, 0, 1], [10, 0, 0, 2]),
            true,
            "a's ARP",
        ),
        (
            a,
            Dir::Out,
            wire::arp(2, [10, 0, 0, 2], [10, 0, 0, 1]),
            false,
            "a's ARP for b's address",
        ),
        (a, Dir::Out, wire::eth(0x88cc, &[0; 46]), false, "a's LLDP"),
        (a, Dir::In, wire::eth(0x88cc, &[0; 46]), true, "LLDP to a"),
        (
            a,
            Dir::Out,
            wire::tagged(&f(&pkt(a4, b4, tcp(1, 5432))), &[(0x8100, 0)]),
            false,
            "a's allowed flow behind a VLAN tag",
        ),
        (
            a,
            Dir::Out,
            wire::frame(&ns.render().ip),
            true,
            "a's neighbour solicitation",
        ),
        (
            a,
            Dir::Out,
            frag(9, 0, true, &body[..16]),
            true,
            "a's first fragment to p9",
        ),
        (
            a,
            Dir::Out,
            frag(9, 2, false, &body[16..]),
            true,
            "its later fragment",
        ),
        (
            a,
            Dir::Out,
            frag(10, 2, false, &body[16..]),
            false,
            "a later fragment of another datagram",
        ),
        (
            a,
            Dir::Out,
            f(&pkt(a4, IpAddr::V4(NODE4), tcp(1, 22))),
            true,
            "a to the node",
        ),
        (
            e,
            Dir::In,
            f(&pkt(world, e4, tcp(1, 9))),
            true,
            "anything to e",
        ),
        (
            e,
            Dir::Out,
            f(&pkt(e4, world, tcp(1, 80))),
            false,
            "e to the world, TCP 80",
        ),
        (
            e,
            Dir::Out,
            f(&pkt(e4, world, udp(1, 53))),
            true,
            "e to the world, UDP 53",
        ),
        (
            i,
            Dir::In,
            f(&pkt(a4, i4, tcp(1, 65535))),
            true,
            "a to i, TCP 65535",
        ),
        (
            i,
            Dir::In,
            f(&pkt(a4, i4, tcp(1, 0))),
            false,
            "a to i, TCP 0",
        ),
        (
            n,
            Dir::Out,
            f(&pkt(n6, IpAddr::V6(ip6(0x2001, 0x4860, 0, 1)), tcp(1, 2))),
            true,
            "n to the world",
        ),
        (
            n,
            Dir::Out,
            f(&pkt(
                IpAddr::V4(Ipv4Addr::new(10, 0, 0, 6)),
                world,
                tcp(1, 2),
            )),
            false,
            "n sending IPv4 (it has none)",
        ),
        (d, Dir::Out, f(&pkt(d4, b4, tcp(1, 80))), false, "d to b"),
        (
            d,
            Dir::In,
            f(&pkt(IpAddr::V4(NODE4), d4, tcp(1, 8080))),
            true,
            "the node to d",
        ),
        (
            u,
            Dir::Out,
            f(&pkt(a4, b4, tcp(1, 5432))),
            false,
            "an interface without an endpoint entry",
        ),
    ];
    let steps: Vec<Step> = cases
        .iter()
        .map(|(iface, dir, frame, _, note)| Step {
            iface: *iface,
            dir: *dir,
            frame: frame.clone(),
            note: (*note).to_string(),
        })
        .collect();
    let want: Vec<bool> = cases.iter().map(|c| c.3).collect();
    let failures = on_bed("frame-props-known", move |bed| {
        bed.reset();
        let mut model = Model::new(tolerate_known());
        let mut failures = Vec::new();
        for (s, want) in steps.iter().zip(want) {
            let d = model.decide(s.iface, s.dir, &s.frame);
            let (act, reasons) = bed.reasons(s);
            let passed = act.as_ref().is_ok_and(|a| *a != SHOT);
            if d.allow != want || passed != want {
                failures.push(format!(
                    "{}: want {}, model {} ({}), programs {act:?} {reasons:?}\n  {}",
                    s.note,
                    if want { "pass" } else { "drop" },
                    if d.allow { "allow" } else { "deny" },
                    d.why,
                    hex(&s.frame)
                ));
            }
            if passed {
                model.passed(&d);
            }
        }
        failures
    });
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The property: whatever frames come, in whatever order, nothing the model denies passes.
#[test]
#[ignore = "needs root"]
fn random_frames_the_model_denies_are_dropped() {
    let seed = env_u64("ENFORCER_FUZZ_SEED").unwrap_or(DEFAULT_SEED);
    let only = env_u64("ENFORCER_FUZZ_CASE");
    let cases = env_u64("ENFORCER_FUZZ_CASES").unwrap_or(DEFAULT_CASES);
    let (first, count) = match only {
        Some(c) => (c, 1),
        None => (0, cases),
    };
    let outcome = on_bed("frame-props", move |bed| {
        let start = Instant::now();
        let mut stats = Stats::default();
        for case in first..first + count {
            let steps = Gen::new(case_seed(seed, case)).case();
            if let Some(f) = replay(bed, &steps, Some(&mut stats)) {
                eprintln!(
                    "case {case} failed at step {} ({}; model: {}): shrinking",
                    f.step, f.action, f.why
                );
                let small = shrink(bed, steps, f.step);
                return Err(report(bed, seed, case, &small));
            }
            if only.is_some() {
                // A replayed case prints what each step did.
                eprintln!("{}", report(bed, seed, case, &steps));
            }
        }
        Ok((stats, start.elapsed()))
    });
    let (stats, took) = match outcome {
        Ok(v) => v,
        Err(report) => panic!("{report}"),
    };
    let mut table = format!(
        "{count} cases, seed {seed}: {} frames run ({} refused by BPF_PROG_TEST_RUN) in {:.1} s\n",
        stats.runs,
        stats.skipped,
        took.as_secs_f64()
    );
    for ((allow, why), [dropped, passed]) in &stats.seen {
        let _ = writeln!(
            table,
            "  model {:5} {why:45} programs dropped {dropped:7} passed {passed:7}",
            if *allow { "allow" } else { "deny" }
        );
    }
    eprintln!("{table}");
    if only.is_none() && count >= DEFAULT_CASES {
        // The run must have exercised every way of passing and of being denied, or it
        // proves little.
        let missing: Vec<&&str> = [
            "ARP to the pod",
            "ARP from the pod's own address",
            "non-IP to the pod",
            "ND/MLD on the link",
            "the pod to itself",
            "the node",
            "later fragment of an allowed first",
            "later fragment, direction not isolated",
            "endpoint not isolated",
            "ICMP error about an allowed flow",
            "packet of an allowed flow",
            "new flow a rule allows",
            "new flow, direction not isolated",
        ]
        .iter()
        .filter(|why| stats.seen.get(&(true, **why)).is_none_or(|c| c[1] == 0))
        .collect();
        assert!(
            missing.is_empty(),
            "no frame passed as {missing:?}: the generator no longer reaches them\n{table}"
        );
        let denied: Vec<&&str> = [
            "VLAN tag",
            "ARP not from the pod's own address",
            "non-IP from the pod",
            "source not the pod's address",
            "to the pod from its own address",
            "later fragment without an allowed first",
            "new flow no rule allows",
            "no endpoint entry on the interface",
        ]
        .iter()
        .filter(|why| stats.seen.get(&(false, **why)).is_none_or(|c| c[0] == 0))
        .collect();
        assert!(
            denied.is_empty(),
            "no frame was denied as {denied:?}\n{table}"
        );
    }
}
