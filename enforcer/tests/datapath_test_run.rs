//! The real TC programs, loaded through the loader and fed crafted frames with
//! `BPF_PROG_TEST_RUN`. Each case asserts the TC action and that exactly the counter of the
//! expected reason moved. Runs as root: a private network namespace (for the ifindexes the
//! kernel requires in `ctx_in`) and a private bpffs mounted under a temp dir, both removed at
//! the end.
//!
//! One test per case group (a behaviour), named for it; `--list` lists them. They need root and
//! are ignored unless asked for: `cargo test -p enforcer --test datapath_test_run --
//! --include-ignored fragments` runs the groups whose name contains `fragments`. The groups
//! share one load of the programs (see `Shared`) and each starts from the same state (`reset`),
//! so any of them runs alone or in any order.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, Ipv6Addr},
    panic::AssertUnwindSafe,
    path::Path,
    process::{Command, ExitCode},
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering},
        mpsc,
    },
    thread::JoinHandle,
};

use enforcer::{
    datapath::{CtCount, Datapath, DatapathOptions, EventReader, Hook},
    reconcile::MapTable,
};
use enforcer_common::{
    CONFIG_CT_LRU_ALL, CONFIG_LOG_ALLOWED, CT_REVOKED, CtKey, CtKeyV4, CtValue, DIR_EGRESS,
    DIR_INGRESS, EP_EGRESS_HOST_JUDGED, EP_EGRESS_ISOLATED, EP_HAS_V4, EP_HAS_V6, EP_INGRESS_AUDIT,
    EP_INGRESS_ISOLATED, EndpointInfo, FAMILY_V4, FAMILY_V6, FLOW_LOCK, FlowBucket, FlowWay,
    IDENTITY_ANY, IDENTITY_HOST, MAP_CONFIG, MAP_CONNTRACK_V4, MAP_CONNTRACK_V6, MAP_FLOWS_V4,
    PORT_MASK_ANY_PROTO, PROTO_ANY, PROTO_SCTP, PROTO_TCP, PROTO_UDP, PeerInfo, PolicyKey,
    PolicyValue, REASON_NAMES, RULE_AUDIT, RULE_DENY, SCHEMA_VERSION, reason::*,
};
use enforcer_policy::state::Prefix;
use enforcer_testkit::netns::BpfMount;
use libtest_mimic::{Arguments, Completion, Failed, Trial};

const OK: i32 = 0; // TC_ACT_OK
const SHOT: i32 = 2; // TC_ACT_SHOT

/// Ethernet / IP / L4 frame builders with correct lengths.
mod frames {
    use std::net::{Ipv4Addr, Ipv6Addr};

    pub const ETH_IP: u16 = 0x0800;
    pub const ETH_IPV6: u16 = 0x86dd;
    pub const ETH_ARP: u16 = 0x0806;

    pub fn eth(ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

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

    /// IPv4 options of one datagram.
    #[derive(Clone, Copy)]
    pub struct V4 {
        pub id: u16,
        pub more_fragments: bool,
        /// In 8-byte units.
        pub frag_offset: u16,
        /// Override of the IHL field (words).
        pub ihl: Option<u8>,
        /// Override of the total length field.
        pub total_len: Option<u16>,
    }

    impl Default for V4 {
        fn default() -> Self {
            Self {
                id: 0x1234,
                more_fragments: false,
                frag_offset: 0,
                ihl: None,
                total_len: None,
            }
        }
    }

    pub fn ipv4_with(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload: &[u8], o: V4) -> Vec<u8> {
        let total = o.total_len.unwrap_or((20 + payload.len()) as u16);
        let mut h = vec![0u8; 20];
        h[0] = 0x40 | o.ihl.unwrap_or(5);
        h[2..4].copy_from_slice(&total.to_be_bytes());
        h[4..6].copy_from_slice(&o.id.to_be_bytes());
        let frag = (if o.more_fragments { 0x2000 } else { 0 }) | (o.frag_offset & 0x1fff);
        h[6..8].copy_from_slice(&frag.to_be_bytes());
        h[8] = 64;
        h[9] = proto;
        h[12..16].copy_from_slice(&src.octets());
        h[16..20].copy_from_slice(&dst.octets());
        let c = csum(&h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h.extend_from_slice(payload);
        eth(ETH_IP, &h)
    }

    pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload: &[u8]) -> Vec<u8> {
        ipv4_with(src, dst, proto, payload, V4::default())
    }

    /// IPv6 with `next` as the first next-header and `payload` (extension headers included).
    pub fn ipv6_with(
        src: Ipv6Addr,
        dst: Ipv6Addr,
        next: u8,
        payload: &[u8],
        payload_len: Option<u16>,
    ) -> Vec<u8> {
        let mut h = vec![0u8; 40];
        h[0] = 0x60;
        h[4..6].copy_from_slice(&payload_len.unwrap_or(payload.len() as u16).to_be_bytes());
        h[6] = next;
        h[7] = 64;
        h[8..24].copy_from_slice(&src.octets());
        h[24..40].copy_from_slice(&dst.octets());
        h.extend_from_slice(payload);
        eth(ETH_IPV6, &h)
    }

    pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, payload: &[u8]) -> Vec<u8> {
        ipv6_with(src, dst, next, payload, None)
    }

    /// A generic 8-byte extension header (hop-by-hop, routing, destination options) with PadN.
    pub fn ext8(next: u8) -> Vec<u8> {
        vec![next, 0, 1, 4, 0, 0, 0, 0]
    }

    /// An IPv6 Fragment header.
    pub fn frag6(next: u8, offset_units: u16, more: bool, id: u32) -> Vec<u8> {
        let fo = (offset_units << 3) | u16::from(more);
        let mut h = vec![next, 0];
        h.extend_from_slice(&fo.to_be_bytes());
        h.extend_from_slice(&id.to_be_bytes());
        h
    }

    /// A TCP header with the given flags (byte 13).
    pub fn tcp_flags(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
        let mut t = tcp(sport, dport);
        t[13] = flags;
        t
    }

    pub fn tcp(sport: u16, dport: u16) -> Vec<u8> {
        let mut t = vec![0u8; 20];
        t[0..2].copy_from_slice(&sport.to_be_bytes());
        t[2..4].copy_from_slice(&dport.to_be_bytes());
        t[12] = 5 << 4;
        t[13] = 0x02; // SYN
        t[14..16].copy_from_slice(&64240u16.to_be_bytes());
        t
    }

    pub fn udp(sport: u16, dport: u16, data: &[u8]) -> Vec<u8> {
        let mut u = vec![0u8; 8];
        u[0..2].copy_from_slice(&sport.to_be_bytes());
        u[2..4].copy_from_slice(&dport.to_be_bytes());
        u[4..6].copy_from_slice(&((8 + data.len()) as u16).to_be_bytes());
        u.extend_from_slice(data);
        u
    }

    pub fn sctp(sport: u16, dport: u16) -> Vec<u8> {
        let mut s = vec![0u8; 12];
        s[0..2].copy_from_slice(&sport.to_be_bytes());
        s[2..4].copy_from_slice(&dport.to_be_bytes());
        s[4..8].copy_from_slice(&0xdead_beefu32.to_be_bytes());
        // An INIT chunk header.
        s.extend_from_slice(&[1, 0, 0, 4]);
        s
    }

    /// ICMP/ICMPv6 echo (`ty` is the request or reply type of the family).
    pub fn echo(ty: u8, id: u16, seq: u16) -> Vec<u8> {
        let mut e = vec![ty, 0, 0, 0];
        e.extend_from_slice(&id.to_be_bytes());
        e.extend_from_slice(&seq.to_be_bytes());
        e.extend_from_slice(b"pingpong");
        e
    }

    /// ICMP/ICMPv6 error carrying `inner` (an IP header and the start of its payload).
    pub fn icmp_error(ty: u8, code: u8, inner: &[u8]) -> Vec<u8> {
        let mut e = vec![ty, code, 0, 0, 0, 0, 0, 0];
        e.extend_from_slice(inner);
        e
    }

    /// A bare IP packet without Ethernet (the inner header of an ICMP error).
    pub fn strip_eth(f: &[u8]) -> Vec<u8> {
        f[14..].to_vec()
    }

    pub fn arp() -> Vec<u8> {
        let mut a = vec![0, 1, 8, 0, 6, 4, 0, 1];
        a.extend_from_slice(&[0x02, 0, 0, 0, 0, 1, 10, 0, 0, 1]);
        a.extend_from_slice(&[0, 0, 0, 0, 0, 0, 10, 0, 0, 2]);
        eth(ETH_ARP, &a)
    }
}

use frames::*;

// Addresses.
const A4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const B4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const C4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 3);
const P9_4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 9);
const HOST4: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 1);
const WORLD4: Ipv4Addr = Ipv4Addr::new(8, 8, 8, 8);
const CIDR_IN4: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 1);
const CIDR_EXCEPT4: Ipv4Addr = Ipv4Addr::new(192, 168, 5, 1);
const A6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);
const B6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);
const P9_6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 9);
const CIDR_IN6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
const CIDR_EXCEPT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 5, 0, 0, 0, 0, 1);
const LINK_LOCAL6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

// Identities.
const ID_A: u32 = 300;
const ID_B: u32 = 400;
const ID_P9: u32 = 401;
const ID_CIDR: u32 = 500;
const ID_EXCEPT: u32 = 501;

// Endpoint ids.
const EP_A: u32 = 1;
const EP_B: u32 = 2;
const EP_C: u32 = 3;

fn ip(args: &[&str]) {
    enforcer_testkit::netns::ip(args).unwrap();
}

fn ifindex(name: &str) -> u32 {
    enforcer_testkit::netns::ifindex(name).unwrap()
}

struct Harness {
    dp: Datapath,
    ifs: BTreeMap<&'static str, u32>,
    eps: BTreeMap<u32, EndpointInfo>,
    /// The verdict-event reader (the datapath hands it out once), taken when first needed.
    events: Option<EventReader>,
    cases: usize,
    failures: Vec<String>,
}

impl Harness {
    fn events(&mut self) -> &mut EventReader {
        if self.events.is_none() {
            self.events = self.dp.take_events();
        }
        self.events.as_mut().expect("the event reader")
    }

    /// Runs `frame` through `hook` of interface `iface` and checks the action and the counter.
    fn case(
        &mut self,
        name: &str,
        iface: &str,
        hook: Hook,
        frame: &[u8],
        want_act: i32,
        want_reason: u8,
    ) {
        self.cases += 1;
        let ifindex = self.ifs[iface];
        let ep = self.dp.endpoints.get(&ifindex).unwrap().map_or(0, |e| e.id);
        let dir = if hook == Hook::Ingress {
            DIR_EGRESS
        } else {
            DIR_INGRESS
        };
        let before = self.dp.counters.read().unwrap();
        let act = match self.dp.test_run(hook, ifindex, frame) {
            Ok(a) => a,
            Err(err) => {
                self.failures.push(format!("{name}: {err:#}"));
                return;
            }
        };
        let after = self.dp.counters.read().unwrap();
        let mut moved: Vec<(u32, u8, u8)> = after
            .iter()
            .filter(|(k, v)| before.get(k).map_or(0, |b| b.packets) != v.packets)
            .map(|(k, _)| *k)
            .collect();
        moved.sort_unstable();
        let want = vec![(ep, dir, want_reason)];
        if act != want_act || moved != want {
            let names: Vec<String> = moved
                .iter()
                .map(|(e, d, r)| format!("ep{e}/dir{d}/{}", REASON_NAMES[*r as usize]))
                .collect();
            self.failures.push(format!(
                "{name}: action {act} (want {want_act}), counters moved {names:?} (want ep{ep}/dir{dir}/{}#{want_reason})",
                REASON_NAMES[want_reason as usize]
            ));
        }
    }

    /// Sets the endpoint's flags and epoch at once, as the agent does when policy changes.
    fn set_flags_epoch(&mut self, iface: &str, flags: u32, epoch: u32) {
        let ifindex = self.ifs[iface];
        let mut e = self.dp.endpoints.get(&ifindex).unwrap().unwrap();
        e.flags = flags;
        e.epoch = epoch;
        self.dp.endpoints.set(&ifindex, &e).unwrap();
        self.eps.insert(ifindex, e);
    }

    fn set_epoch(&mut self, iface: &str, epoch: u32) {
        let ifindex = self.ifs[iface];
        let mut e = self.dp.endpoints.get(&ifindex).unwrap().unwrap();
        e.epoch = epoch;
        self.dp.endpoints.set(&ifindex, &e).unwrap();
        self.eps.insert(ifindex, e);
    }
}

fn endpoint(
    id: u32,
    flags: u32,
    v4: Ipv4Addr,
    v6: Option<Ipv6Addr>,
    masks: [u32; 2],
) -> EndpointInfo {
    EndpointInfo {
        id,
        flags: flags | EP_HAS_V4 | if v6.is_some() { EP_HAS_V6 } else { 0 },
        epoch: 1,
        identity: 0,
        port_masks: masks,
        ipv4: v4.octets(),
        ipv6: v6.map_or([0; 16], |a| a.octets()),
    }
}

#[expect(clippy::too_many_arguments, reason = "one policy entry")]
fn allow(dp: &mut Datapath, ep: u32, id: u32, dir: u8, proto: u8, port: u16, len: u8, rule: u32) {
    dp.policy
        .set(
            &PolicyKey::new(ep, id, dir, proto, port, len),
            &PolicyValue { rule, _pad: 0 },
        )
        .unwrap();
}

fn setup(pin: &Path) -> Harness {
    // Short names like "a" are `ip link` keywords: prefix them.
    for name in ["a", "b", "c", "u"] {
        let dev = format!("ep{name}");
        ip(&[
            "link",
            "add",
            "name",
            &dev,
            "type",
            "veth",
            "peer",
            "name",
            &format!("{dev}p"),
        ]);
        ip(&["link", "set", &dev, "up"]);
    }
    let ifs: BTreeMap<&'static str, u32> = ["a", "b", "c", "u"]
        .into_iter()
        .map(|n| (n, ifindex(&format!("ep{n}"))))
        .collect();
    let opts = DatapathOptions {
        pin_path: pin.to_path_buf(),
        max_endpoints: 16,
        ..Default::default()
    };
    let mut dp = Datapath::open(opts).expect("loading the programs");
    let eps = program_baseline(&mut dp, &ifs);
    Harness {
        dp,
        ifs,
        eps,
        events: None,
        cases: 0,
        failures: Vec::new(),
    }
}

/// The state every case group starts from: endpoints A (isolated both ways, v4 and v6), B (not
/// isolated) and C (ingress isolated, v4 only); the peers, the ipBlocks and the policy entries
/// below. Returns the endpoints by ifindex.
fn program_baseline(
    dp: &mut Datapath,
    ifs: &BTreeMap<&'static str, u32>,
) -> BTreeMap<u32, EndpointInfo> {
    let both = EP_INGRESS_ISOLATED | EP_EGRESS_ISOLATED;
    let any = PORT_MASK_ANY_PROTO;
    let a = endpoint(
        EP_A,
        both,
        A4,
        Some(A6),
        [1 << 16 | 1 << 12 | any, 1 << 16 | any],
    );
    let b = endpoint(EP_B, 0, B4, Some(B6), [0, 0]);
    let c = endpoint(EP_C, EP_INGRESS_ISOLATED, C4, None, [1 << 16, 0]);
    let mut eps = BTreeMap::new();
    for (iface, e) in [("a", a), ("b", b), ("c", c)] {
        dp.endpoints.set(&ifs[iface], &e).unwrap();
        eps.insert(ifs[iface], e);
    }
    let peer = |identity| PeerInfo { identity, flags: 0 };
    for (addr, id) in [
        (A4, ID_A),
        (B4, ID_B),
        (P9_4, ID_P9),
        (HOST4, IDENTITY_HOST),
    ] {
        dp.peers_v4.set(&addr, &peer(id)).unwrap();
    }
    for (addr, id) in [(A6, ID_A), (B6, ID_B), (P9_6, ID_P9)] {
        dp.peers_v6.set(&addr, &peer(id)).unwrap();
    }
    // ipBlock 192.168.0.0/16 except 192.168.5.0/24 (and the v6 analogue): the except is its
    // own region with another identity.
    dp.cidrs_v4
        .set(
            &Prefix {
                addr: Ipv4Addr::new(192, 168, 0, 0),
                len: 16,
            },
            &peer(ID_CIDR),
        )
        .unwrap();
    dp.cidrs_v4
        .set(
            &Prefix {
                addr: Ipv4Addr::new(192, 168, 5, 0),
                len: 24,
            },
            &peer(ID_EXCEPT),
        )
        .unwrap();
    dp.cidrs_v6
        .set(
            &Prefix {
                addr: "2001:db8::".parse().unwrap(),
                len: 32,
            },
            &peer(ID_CIDR),
        )
        .unwrap();
    dp.cidrs_v6
        .set(
            &Prefix {
                addr: "2001:db8:5::".parse().unwrap(),
                len: 48,
            },
            &peer(ID_EXCEPT),
        )
        .unwrap();

    // Pod A, ingress.
    allow(dp, EP_A, ID_B, DIR_INGRESS, PROTO_TCP, 80, 16, 10);
    allow(dp, EP_A, ID_B, DIR_INGRESS, PROTO_UDP, 53, 16, 11);
    allow(dp, EP_A, ID_B, DIR_INGRESS, PROTO_SCTP, 9000, 16, 12);
    // port 8000, endPort 8015: one /12 block.
    allow(dp, EP_A, IDENTITY_ANY, DIR_INGRESS, PROTO_TCP, 8000, 12, 13);
    allow(dp, EP_A, ID_CIDR, DIR_INGRESS, PROTO_TCP, 443, 16, 14);
    allow(dp, EP_A, ID_P9, DIR_INGRESS, PROTO_ANY, 0, 0, 15);
    // Pod A, egress.
    allow(dp, EP_A, ID_B, DIR_EGRESS, PROTO_TCP, 5432, 16, 20);
    allow(dp, EP_A, ID_P9, DIR_EGRESS, PROTO_ANY, 0, 0, 21);
    allow(dp, EP_A, ID_CIDR, DIR_EGRESS, PROTO_UDP, 123, 16, 22);
    // Pod C, ingress only.
    allow(dp, EP_C, ID_B, DIR_INGRESS, PROTO_TCP, 80, 16, 30);
    eps
}

/// Back to the baseline after a case group: no flow (table and maps), default CONFIG, exactly
/// the baseline's endpoints, peers and policy (which rewrites their slots and cache ways), no
/// pending event, no extra link.
fn reset(h: &mut Harness) {
    if h.ifs.remove("d").is_some() {
        let _ = Command::new("ip").args(["link", "del", "epd"]).output();
    }
    let defaults = h.dp.options().config();
    h.dp.set_config(&defaults).unwrap();
    if let Some(table) = h.dp.conntrack.flow_table() {
        table.remove_where(|_| true).unwrap();
    }
    for (k, _) in h.dp.conntrack.entries().unwrap() {
        h.dp.conntrack.remove(&k).unwrap();
    }
    let baseline: BTreeSet<u32> = ["a", "b", "c"].iter().map(|n| h.ifs[n]).collect();
    for ifindex in h.dp.endpoints.keys().unwrap() {
        if !baseline.contains(&ifindex) {
            h.dp.endpoints.remove(&ifindex).unwrap();
        }
    }
    for addr in MapTable::<[u8; 4], PeerInfo>::keys(&h.dp.peers_v4).unwrap() {
        MapTable::<[u8; 4], PeerInfo>::remove(&mut h.dp.peers_v4, &addr).unwrap();
    }
    for addr in MapTable::<[u8; 16], PeerInfo>::keys(&h.dp.peers_v6).unwrap() {
        MapTable::<[u8; 16], PeerInfo>::remove(&mut h.dp.peers_v6, &addr).unwrap();
    }
    for key in h.dp.policy.keys().unwrap() {
        h.dp.policy.remove(&key).unwrap();
    }
    for key in h.dp.node_ports.keys().unwrap() {
        h.dp.node_ports.remove(&key).unwrap();
    }
    let counts = h.dp.conntrack.flow_counts();
    (0..counts.slots()).for_each(|e| counts.clear(e));
    counts.keep_until(0);
    h.eps = program_baseline(&mut h.dp, &h.ifs);
    if let Some(events) = &mut h.events {
        let _ = events.drain();
    }
    h.cases = 0;
    h.failures.clear();
}

// Every trial starts from `setup`'s state (see `reset`). Hooks: `Hook::Egress` of the host-side
// veth (`i` below) is traffic into the pod, `Hook::Ingress` (`e`) traffic out of it.

/// Frames of an interface that is no endpoint, non-IP frames and IPv6 neighbour discovery
/// and MLD pass without a policy lookup.
fn arp_link_scoped_neighbour_discovery_pass_and_unprogrammed_interfaces_drop(h: &mut Harness) {
    let (i, e) = (Hook::Egress, Hook::Ingress);
    h.case(
        "programs on an interface without an endpoint entry",
        "u",
        e,
        &ipv4(A4, B4, PROTO_TCP, &tcp(1, 2)),
        SHOT,
        DROP_UNPROGRAMMED,
    );
    h.case("arp", "a", e, &arp(), OK, ALLOW_NON_IP);
    h.case(
        "nd neighbour solicitation from link-local",
        "a",
        e,
        &ipv6(
            LINK_LOCAL6,
            "ff02::1:ff00:2".parse().unwrap(),
            58,
            &icmp_error(135, 0, &[0; 16]),
        ),
        OK,
        ALLOW_NON_IP,
    );
    h.case(
        "router advertisement in",
        "a",
        i,
        &ipv6(LINK_LOCAL6, A6, 58, &icmp_error(134, 0, &[0; 8])),
        OK,
        ALLOW_NON_IP,
    );
    h.case(
        "mldv2 report",
        "a",
        e,
        &ipv6(
            LINK_LOCAL6,
            "ff02::16".parse().unwrap(),
            58,
            &icmp_error(143, 0, &[0; 8]),
        ),
        OK,
        ALLOW_NON_IP,
    );
}

/// A pod sending from an address that is not its own is dropped, isolated or not.
fn spoofed_sources_are_dropped(h: &mut Harness) {
    let e = Hook::Ingress;
    h.case(
        "spoofed v4 source",
        "a",
        e,
        &ipv4(Ipv4Addr::new(10, 0, 0, 77), B4, PROTO_TCP, &tcp(1000, 5432)),
        SHOT,
        DROP_SPOOFED,
    );
    h.case(
        "spoofed v6 source",
        "a",
        e,
        &ipv6("fd00::77".parse().unwrap(), B6, PROTO_TCP, &tcp(1000, 5432)),
        SHOT,
        DROP_SPOOFED,
    );
    h.case(
        "spoofed source on a not-isolated pod",
        "b",
        e,
        &ipv4(A4, WORLD4, PROTO_UDP, &udp(1, 2, b"x")),
        SHOT,
        DROP_SPOOFED,
    );
}

/// Traffic to and from the host identity and to the pod itself is allowed, and not tracked.
fn host_and_self_traffic_is_allowed_and_never_tracked(h: &mut Harness) {
    let (i, e) = (Hook::Egress, Hook::Ingress);
    h.case(
        "to host identity",
        "a",
        e,
        &ipv4(A4, HOST4, PROTO_TCP, &tcp(1000, 22)),
        OK,
        ALLOW_HOST,
    );
    h.case(
        "from host identity (probe)",
        "a",
        i,
        &ipv4(HOST4, A4, PROTO_TCP, &tcp(1000, 8080)),
        OK,
        ALLOW_HOST,
    );
    h.case(
        "from host identity again: never tracked",
        "a",
        i,
        &ipv4(HOST4, A4, PROTO_TCP, &tcp(1000, 8080)),
        OK,
        ALLOW_HOST,
    );
    h.case(
        "reply to host identity: never tracked",
        "a",
        e,
        &ipv4(A4, HOST4, PROTO_TCP, &tcp(8080, 1000)),
        OK,
        ALLOW_HOST,
    );
    h.case(
        "to itself",
        "a",
        e,
        &ipv4(A4, A4, PROTO_TCP, &tcp(1000, 9999)),
        OK,
        ALLOW_HOST,
    );
}

/// TCP over IPv4 from a pod peer: an exact policy hit opens a flow whose replies and
/// further packets pass; other ports, unrelated reverse packets and the world are denied.
fn tcp_v4_flows_follow_policy_and_conntrack(h: &mut Harness) {
    let (i, e) = (Hook::Egress, Hook::Ingress);
    h.case(
        "tcp v4 in from pod B allowed port",
        "a",
        i,
        &ipv4(B4, A4, PROTO_TCP, &tcp(40000, 80)),
        OK,
        ALLOW_POLICY,
    );
    h.case(
        "tcp v4 reply out",
        "a",
        e,
        &ipv4(A4, B4, PROTO_TCP, &tcp(80, 40000)),
        OK,
        ALLOW_REPLY,
    );
    h.case(
        "tcp v4 established in",
        "a",
        i,
        &ipv4(B4, A4, PROTO_TCP, &tcp(40000, 80)),
        OK,
        ALLOW_ESTABLISHED,
    );
    h.case(
        "tcp v4 in denied port",
        "a",
        i,
        &ipv4(B4, A4, PROTO_TCP, &tcp(40000, 81)),
        SHOT,
        DROP_POLICY,
    );
    h.case(
        "tcp v4 unrelated reverse packet",
        "a",
        e,
        &ipv4(A4, B4, PROTO_TCP, &tcp(80, 40001)),
        SHOT,
        DROP_POLICY,
    );
    h.case(
        "tcp v4 out allowed",
        "a",
        e,
        &ipv4(A4, B4, PROTO_TCP, &tcp(41000, 5432)),
        OK,
        ALLOW_POLICY,
    );
    h.case(
        "tcp v4 out reply in",
        "a",
        i,
        &ipv4(B4, A4, PROTO_TCP, &tcp(5432, 41000)),
        OK,
        ALLOW_REPLY,
    );
    h.case(
        "tcp v4 out denied port",
        "a",
        e,
        &ipv4(A4, B4, PROTO_TCP, &tcp(41000, 5433)),
        SHOT,
        DROP_POLICY,
    );
    h.case(
        "tcp v4 from world denied",
        "a",
        i,
        &ipv4(WORLD4, A4, PROTO_TCP, &tcp(40000, 80)),
        SHOT,
        DROP_POLICY,
    );
}

/// UDP over IPv4: allowed port and reply, denied port, a CIDR peer and its except.
fn udp_v4_flows_follow_policy_and_conntrack(h: &mut Harness) {
    let (i, e) = (Hook::Egress, Hook::Ingress);
    h.case(
        "udp v4 allowed",
        "a",
        i,
        &ipv4(B4, A4, PROTO_UDP, &udp(5353, 53, b"q")),
        OK,
        ALLOW_POLICY,
    );
    h.case(
        "udp v4 reply",
        "a",
        e,
        &ipv4(A4, B4, PROTO_UDP, &udp(53, 5353, b"r")),
        OK,
        ALLOW_REPLY,
    );
    h.case(
        "udp v4 denied port",
        "a",
        i,
        &ipv4(B4, A4, PROTO_UDP, &udp(5353, 54, b"q")),
        SHOT,
        DROP_POLICY,
    );
    h.case(
        "udp v4 out to cidr allowed",
        "a",
        e,
        &ipv4(A4, CIDR_IN4, PROTO_UDP, &udp(3000, 123, b"t")),
        OK,
        ALLOW_POLICY,
    );
    h.case(
        "udp v4 out to cidr except denied",
        "a",
        e,
        &ipv4(A4, CIDR_EXCEPT4, PROTO_UDP, &udp(3000, 123, b"t")),
        SHOT,
        DROP_POLICY,
    );
}

/// SCTP over IPv4 and IPv6: allowed port and reply, denied port.
fn sctp_flows_follow_policy_and_conntrack(h: &mut Harness) {
    let (i, e) = (Hook::Egress, Hook::Ingress);
    h.case(
        "sctp v4 allowed",
        "a",
        i,
        &ipv4(B4, A4, PROTO_SCTP, &sctp(7000, 9000)),
        OK,
        ALLOW_POLICY,
    );
    h.case(
        "sctp v4 reply",
        "a",
        e,
        &ipv4(A4, B4, PROTO_SCTP, &sctp(9000, 7000)),
        OK,
        ALLOW_REPLY,
    );
    h.case(
        "sctp v4 denied port",
        "a",
        i,
        &ipv4(B4, A4, PROTO_SCTP, &sctp(7000, 9001)),
        SHOT,
        DROP_POLICY,
    );
    h.case(
        "sctp v6 allowed",
        "a",
        i,
        &ipv6(B6, A6, PROTO_SCTP, &sctp(7000, 9000)),
        OK,
        ALLOW_POLICY,
    );
}

/// A port range (endPort, a prefix of the port) matches its first, inner and last port,
/// not its neighbours nor another protocol; on IPv6 too; from any peer.
fn end_port_ranges_cover_exactly_their_ports(h: &mut Harness) {
    let i = Hook::Egress;
    h.case(
        "endPort range start, any peer",
        "a",
        i,
        &ipv4(WORLD4, A4, PROTO_TCP, &tcp(1, 8000)),
        OK,
        ALLOW_POLICY,
    );
    h.case(
        "endPort range inside",
        "a",
        i,
        &ipv4(WORLD4, A4, PROTO_TCP, &tcp(2, 8011)),
        OK,
        ALLOW_POLICY,
    );
    h.case(
        "endPort range end",
        "a",
        i,
        &ipv4(WORLD4, A4, PROTO_TCP, &tcp(3, 8015)),
        OK,
        ALLOW_POLICY,
    );
    h.case(
        "endPort range just outside",
        "a",
        i,
        &ipv4(WORLD4, A4, PROTO_TCP, &tcp(4, 8016)),
        SHOT,
        DROP_POLICY,
    );
    h.case(
        "endPort range below",
        "a",
        i,
        &ipv4(WORLD4, A4, PROTO_TCP, &tcp(5, 7999)),
        SHOT,
        DROP_POLICY,
    );
    h.case(
        "endPort range is tcp only",
        "a",
        i,
        &ipv4(WORLD4, A4, PROTO_UDP, &udp(6, 8001, b"")),
        SHOT,
        DROP_POLICY,
    );
    h.case(
        "endPort range v6",
        "a",
        i,
        &ipv6("2a00::1".parse().unwrap(), A6, PROTO_TCP, &tcp(7, 8008)),
        OK,
        ALLOW_POLICY,
    );
}

/// An ipBlock peer: inside the CIDR allowed, inside its except or outside denied (v4, v6).
fn ip_blocks_allow_their_cidr_but_not_its_except(h: &mut Harness) {
    let i = Hook::Egress;
    h.case(
        "cidr v4 allowed",
        "a",
        i,
        &ipv4(CIDR_IN4, A4, PROTO_TCP, &tcp(1000, 443)),
        OK,
        ALLOW_POLICY,
    );
    h.case(
        "cidr v4 except denied",
        "a",
        i,
        &ipv4(CIDR_EXCEPT4, A4, PROTO_TCP, &tcp(1000, 443)),
        SHOT,
        DROP_POLICY,
    );
    h.case(
        "outside cidr denied",
        "a",
        i,
        &ipv4(Ipv4Addr::new(10, 99, 0, 1), A4, PROTO_TCP, &tcp(1000, 443)),
        SHOT,
        DROP_POLICY,
    );
    h.case(
        "cidr v6 allowed",
        "a",
        i,
        &ipv6(CIDR_IN6, A6, PROTO_TCP, &tcp(1000, 443)),
        OK,
        ALLOW_POLICY,
    );
    h.case(
        "cidr v6 except denied",
        "a",
        i,
        &ipv6(CIDR_EXCEPT6, A6, PROTO_TCP, &tcp(1000, 443)),
        SHOT,
        DROP_POLICY,
    );
}

/// TCP over IPv6: allowed port and reply, denied port, an allowed flow out.
fn tcp_v6_flows_follow_policy_and_conntrack(h: &mut Harness) {
    let (i, e) = (Hook::Egress, Hook::Ingress);
    h.case(
        "tcp v6 in allowed",
        "a",
        i,
        &ipv6(B6, A6, PROTO_TCP, &tcp(40000, 80)),
        OK,
        ALLOW_POLICY,
    );
    h.case(
        "tcp v6 reply",
        "a",
        e,
        &ipv6(A6, B6, PROTO_TCP, &tcp(80, 40000)),
        OK,
        ALLOW_REPLY,
    );
    h.case(
        "tcp v6 in denied port",
        "a",
        i,
        &ipv6(B6, A6, PROTO_TCP, &tcp(40000, 81)),
        SHOT,
        DROP_POLICY,
    );
    h.case(
        "tcp v6 out allowed",
        "a",
        e,
        &ipv6(A6, B6, PROTO_TCP, &tcp(42000, 5432)),
        OK,
        ALLOW_POLICY,
    );
}

/// ICMP and ICMPv6 echo: allowed from a peer with an any-protocol rule (and its reply), denied
/// from a peer allowed on ports only.
fn icmp_echo_needs_an_any_protocol_rule_and_its_reply_passes(h: &mut Harness) {
    let (i, e) = (Hook::Egress, Hook::Ingress);
    h.case(
        "icmp echo in from any-proto peer",
        "a",
        i,
        &ipv4(P9_4, A4, 1, &echo(8, 77, 1)),
        OK,
        ALLOW_POLICY,
    );
    h.case(
        "icmp echo reply out",
        "a",
        e,
        &ipv4(A4, P9_4, 1, &echo(0, 77, 1)),
        OK,
        ALLOW_REPLY,
    );
    h.case(
        "icmp echo in from port-only peer denied",
        "a",
        i,
        &ipv4(B4, A4, 1, &echo(8, 78, 1)),
        SHOT,
        DROP_POLICY,
    );
    h.case(
        "icmp echo out to any-proto peer",
        "a",
        e,
        &ipv4(A4, P9_4, 1, &echo(0, 79, 1)),
        OK,
        ALLOW_POLICY,
    );
    h.case(
        "icmpv6 echo in",
        "a",
        i,
        &ipv6(P9_6, A6, 58, &echo(128, 90, 1)),
        OK,
        ALLOW_POLICY,
    );
    h.case(
        "icmpv6 echo reply out",
        "a",
        e,
        &ipv6(A6, P9_6, 58, &echo(129, 90, 1)),
        OK,
        ALLOW_REPLY,
    );
    h.case(
        "icmpv6 echo in denied",
        "a",
        i,
        &ipv6(B6, A6, 58, &echo(128, 91, 1)),
        SHOT,
        DROP_POLICY,
    );
}

/// ICMP and ICMPv6 errors about a tracked flow pass as related; about an unknown flow,
/// they are judged (and denied) as their own packets.
fn icmp_errors_pass_only_for_tracked_flows(h: &mut Harness) {
    let (i, e) = (Hook::Egress, Hook::Ingress);
    // The tracked flows the errors below are about.
    h.case(
        "tcp v4 out allowed",
        "a",
        e,
        &ipv4(A4, B4, PROTO_TCP, &tcp(41000, 5432)),
        OK,
        ALLOW_POLICY,
    );
    h.case(
        "tcp v6 out allowed",
        "a",
        e,
        &ipv6(A6, B6, PROTO_TCP, &tcp(42000, 5432)),
        OK,
        ALLOW_POLICY,
    );
    // --- ICMP errors ---
    // The flow A:41000 -> B:5432 is tracked (above); B's side answers with unreachable.
    let inner = strip_eth(&ipv4(A4, B4, PROTO_TCP, &tcp(41000, 5432)));
    h.case(
        "icmp error related to a tracked flow",
        "a",
        i,
        &ipv4(B4, A4, 1, &icmp_error(3, 3, &inner)),
        OK,
        ALLOW_RELATED,
    );
    let inner = strip_eth(&ipv4(A4, B4, PROTO_TCP, &tcp(41001, 5432)));
    h.case(
        "icmp error about an unknown flow",
        "a",
        i,
        &ipv4(B4, A4, 1, &icmp_error(3, 3, &inner)),
        SHOT,
        DROP_POLICY,
    );
    let inner = strip_eth(&ipv4(
        A4,
        Ipv4Addr::new(10, 0, 0, 2),
        PROTO_TCP,
        &tcp(41000, 5432),
    ));
    h.case(
        "icmp time exceeded related",
        "a",
        i,
        &ipv4(WORLD4, A4, 1, &icmp_error(11, 0, &inner)),
        OK,
        ALLOW_RELATED,
    );
    let inner6 = strip_eth(&ipv6(A6, B6, PROTO_TCP, &tcp(42000, 5432)));
    h.case(
        "icmpv6 packet too big related",
        "a",
        i,
        &ipv6(B6, A6, 58, &icmp_error(2, 0, &inner6)),
        OK,
        ALLOW_RELATED,
    );
    let inner6 = strip_eth(&ipv6(A6, B6, PROTO_TCP, &tcp(42001, 5432)));
    h.case(
        "icmpv6 error unrelated",
        "a",
        i,
        &ipv6(B6, A6, 58, &icmp_error(1, 4, &inner6)),
        SHOT,
        DROP_POLICY,
    );
}

/// A pod not isolated in a direction lets it pass; flows it opens that way are tracked, so
/// their replies pass an isolated other direction.
fn not_isolated_directions_pass_and_track_flows(h: &mut Harness) {
    let (i, e) = (Hook::Egress, Hook::Ingress);
    h.case(
        "not isolated pod, in",
        "b",
        i,
        &ipv4(WORLD4, B4, PROTO_TCP, &tcp(1, 22)),
        OK,
        ALLOW_NOT_ISOLATED,
    );
    h.case(
        "not isolated pod, out",
        "b",
        e,
        &ipv6(B6, CIDR_IN6, PROTO_UDP, &udp(1, 2, b"")),
        OK,
        ALLOW_NOT_ISOLATED,
    );
    h.case(
        "egress not isolated: new flow out",
        "c",
        e,
        &ipv4(C4, WORLD4, PROTO_UDP, &udp(5000, 5000, b"x")),
        OK,
        ALLOW_NOT_ISOLATED,
    );
    h.case(
        "egress not isolated: reply into isolated ingress",
        "c",
        i,
        &ipv4(WORLD4, C4, PROTO_UDP, &udp(5000, 5000, b"y")),
        OK,
        ALLOW_REPLY,
    );
    h.case(
        "isolated ingress: unrelated packet",
        "c",
        i,
        &ipv4(WORLD4, C4, PROTO_UDP, &udp(5001, 5000, b"y")),
        SHOT,
        DROP_POLICY,
    );
    h.case(
        "isolated ingress: allowed port",
        "c",
        i,
        &ipv4(B4, C4, PROTO_TCP, &tcp(5001, 80)),
        OK,
        ALLOW_POLICY,
    );
}

/// IPv4 and IPv6 fragments: a later fragment passes when its first fragment was allowed, is
/// dropped without one or after a denied one, and passes on a not-isolated pod.
fn fragments_follow_the_verdict_of_their_first_fragment(h: &mut Harness) {
    let i = Hook::Egress;
    let first = V4 {
        id: 0x4242,
        more_fragments: true,
        ..V4::default()
    };
    let later = V4 {
        id: 0x4242,
        frag_offset: 185,
        ..V4::default()
    };
    h.case(
        "v4 first fragment allowed",
        "a",
        i,
        &ipv4_with(B4, A4, PROTO_UDP, &udp(6000, 53, &[7; 64]), first),
        OK,
        ALLOW_POLICY,
    );
    h.case(
        "v4 later fragment of allowed first",
        "a",
        i,
        &ipv4_with(B4, A4, PROTO_UDP, &[7; 64], later),
        OK,
        ALLOW_FRAGMENT,
    );
    h.case(
        "v4 last fragment of allowed first",
        "a",
        i,
        &ipv4_with(
            B4,
            A4,
            PROTO_UDP,
            &[7; 16],
            V4 {
                frag_offset: 370,
                ..later
            },
        ),
        OK,
        ALLOW_FRAGMENT,
    );
    h.case(
        "v4 later fragment without first",
        "a",
        i,
        &ipv4_with(
            B4,
            A4,
            PROTO_UDP,
            &[7; 64],
            V4 {
                id: 0x4343,
                ..later
            },
        ),
        SHOT,
        DROP_FRAGMENT,
    );
    h.case(
        "v4 first fragment denied",
        "a",
        i,
        &ipv4_with(
            B4,
            A4,
            PROTO_UDP,
            &udp(6000, 54, &[7; 64]),
            V4 {
                id: 0x4444,
                ..first
            },
        ),
        SHOT,
        DROP_POLICY,
    );
    h.case(
        "v4 later fragment of denied first",
        "a",
        i,
        &ipv4_with(
            B4,
            A4,
            PROTO_UDP,
            &[7; 64],
            V4 {
                id: 0x4444,
                ..later
            },
        ),
        SHOT,
        DROP_FRAGMENT,
    );
    h.case(
        "v4 later fragment, not isolated pod",
        "b",
        i,
        &ipv4_with(A4, B4, PROTO_UDP, &[7; 64], later),
        OK,
        ALLOW_NOT_ISOLATED,
    );
    let mut p = frag6(PROTO_UDP, 0, true, 0xabcd);
    p.extend(udp(6000, 53, &[1; 64]));
    h.case(
        "v6 first fragment allowed",
        "a",
        i,
        &ipv6(B6, A6, 44, &p),
        OK,
        ALLOW_POLICY,
    );
    let mut p = frag6(PROTO_UDP, 9, false, 0xabcd);
    p.extend([1; 32]);
    h.case(
        "v6 later fragment of allowed first",
        "a",
        i,
        &ipv6(B6, A6, 44, &p),
        OK,
        ALLOW_FRAGMENT,
    );
    let mut p = frag6(PROTO_UDP, 9, false, 0xdddd);
    p.extend([1; 32]);
    h.case(
        "v6 later fragment without first",
        "a",
        i,
        &ipv6(B6, A6, 44, &p),
        SHOT,
        DROP_FRAGMENT,
    );
}

/// IPv6 extension headers (hop-by-hop, routing, destination options, fragment) are walked to
/// the transport header, up to a chain of eight; a longer chain is dropped as malformed.
fn ipv6_extension_header_chains_are_walked_up_to_eight(h: &mut Harness) {
    let i = Hook::Egress;
    let mut p = ext8(43);
    p.extend([PROTO_TCP, 0, 0, 0, 0, 0, 0, 0]); // routing header, type 0, segments left 0
    p[8] = 44;
    p.extend(frag6(PROTO_TCP, 0, true, 0x1111));
    p.extend(tcp(40100, 80));
    h.case(
        "v6 hop-by-hop + routing + fragment + tcp allowed",
        "a",
        i,
        &ipv6(B6, A6, 0, &p),
        OK,
        ALLOW_POLICY,
    );
    let mut p = ext8(60);
    p.extend(ext8(PROTO_TCP));
    p.extend(tcp(40101, 81));
    h.case(
        "v6 hop-by-hop + dstopts + tcp denied port",
        "a",
        i,
        &ipv6(B6, A6, 0, &p),
        SHOT,
        DROP_POLICY,
    );
    let mut p = Vec::new();
    for _ in 0..8 {
        p.extend(ext8(60));
    }
    let n = p.len();
    p[n - 8] = PROTO_TCP;
    p.extend(tcp(40102, 80));
    h.case(
        "v6 chain of 8 ext headers accepted",
        "a",
        i,
        &ipv6(B6, A6, 60, &p),
        OK,
        ALLOW_POLICY,
    );
    let mut p = Vec::new();
    for _ in 0..9 {
        p.extend(ext8(60));
    }
    let n = p.len();
    p[n - 8] = PROTO_TCP;
    p.extend(tcp(40103, 80));
    h.case(
        "v6 ext header chain too long",
        "a",
        i,
        &ipv6(B6, A6, 60, &p),
        SHOT,
        DROP_MALFORMED,
    );
}

/// Bad IPv4/IPv6 headers and truncated transport or extension headers are dropped as malformed.
fn malformed_and_truncated_packets_are_dropped(h: &mut Harness) {
    let i = Hook::Egress;
    let first = V4 {
        id: 0x4242,
        more_fragments: true,
        ..V4::default()
    };
    h.case(
        "ipv4 ihl < 5",
        "a",
        i,
        &ipv4_with(
            B4,
            A4,
            PROTO_TCP,
            &tcp(1, 80),
            V4 {
                ihl: Some(4),
                ..V4::default()
            },
        ),
        SHOT,
        DROP_MALFORMED,
    );
    h.case(
        "ipv4 total length beyond frame",
        "a",
        i,
        &ipv4_with(
            B4,
            A4,
            PROTO_TCP,
            &tcp(1, 80),
            V4 {
                total_len: Some(200),
                ..V4::default()
            },
        ),
        SHOT,
        DROP_MALFORMED,
    );
    h.case(
        "ipv4 total length below header",
        "a",
        i,
        &ipv4_with(
            B4,
            A4,
            PROTO_TCP,
            &tcp(1, 80),
            V4 {
                total_len: Some(16),
                ..V4::default()
            },
        ),
        SHOT,
        DROP_MALFORMED,
    );
    h.case(
        "ipv4 truncated tcp",
        "a",
        i,
        &ipv4(B4, A4, PROTO_TCP, &tcp(1, 80)[..10]),
        SHOT,
        DROP_MALFORMED,
    );
    h.case(
        "ipv4 truncated udp",
        "a",
        i,
        &ipv4(B4, A4, PROTO_UDP, &udp(1, 53, b"")[..6]),
        SHOT,
        DROP_MALFORMED,
    );
    h.case(
        "ipv4 first fragment with truncated tcp",
        "a",
        i,
        &ipv4_with(B4, A4, PROTO_TCP, &tcp(1, 80)[..8], first),
        SHOT,
        DROP_MALFORMED,
    );
    // (BPF_PROG_TEST_RUN itself refuses frames shorter than a base IP header.)
    h.case(
        "ipv4 options cut short",
        "a",
        i,
        &ipv4_with(
            B4,
            A4,
            PROTO_TCP,
            &[],
            V4 {
                ihl: Some(6),
                total_len: Some(24),
                ..V4::default()
            },
        ),
        SHOT,
        DROP_MALFORMED,
    );
    h.case(
        "ipv6 payload length beyond frame",
        "a",
        i,
        &ipv6_with(B6, A6, PROTO_TCP, &tcp(1, 80), Some(400)),
        SHOT,
        DROP_MALFORMED,
    );
    h.case(
        "ipv6 truncated tcp",
        "a",
        i,
        &ipv6(B6, A6, PROTO_TCP, &tcp(1, 80)[..12]),
        SHOT,
        DROP_MALFORMED,
    );
    let mut p = vec![PROTO_TCP, 4, 1, 2, 0, 0, 0, 0]; // hop-by-hop claiming 40 bytes
    p.extend(tcp(1, 80));
    h.case(
        "ipv6 truncated ext header",
        "a",
        i,
        &ipv6(B6, A6, 0, &p[..16]),
        SHOT,
        DROP_MALFORMED,
    );
    h.case(
        "ipv6 wrong version",
        "a",
        i,
        &{
            let mut f = ipv6(B6, A6, PROTO_TCP, &tcp(1, 80));
            f[14] = 0x40;
            f
        },
        SHOT,
        DROP_MALFORMED,
    );
}

/// A policy change bumps the endpoint's epoch: a tracked flow the policy no longer allows is
/// dropped as revoked (and stays a tombstone, whichever side sends), one still allowed goes on
/// with its entry updated, and one allowed again resumes.
fn epoch_bump_revokes_flows_the_policy_no_longer_allows(h: &mut Harness) {
    let (i, e) = (Hook::Egress, Hook::Ingress);
    // Two flows into A from B: TCP 80 (rule 10) and UDP 53 (rule 11).
    h.case(
        "epoch: tcp flow opens",
        "a",
        i,
        &ipv4(B4, A4, PROTO_TCP, &tcp(45000, 80)),
        OK,
        ALLOW_POLICY,
    );
    h.case(
        "epoch: udp flow opens",
        "a",
        i,
        &ipv4(B4, A4, PROTO_UDP, &udp(45001, 53, b"q")),
        OK,
        ALLOW_POLICY,
    );
    // Revoke port 80, keep port 53; bump the epoch.
    h.dp.policy
        .remove(&PolicyKey::new(EP_A, ID_B, DIR_INGRESS, PROTO_TCP, 80, 16))
        .unwrap();
    h.set_epoch("a", 2);
    h.case(
        "epoch: revoked flow reply dropped",
        "a",
        e,
        &ipv4(A4, B4, PROTO_TCP, &tcp(80, 45000)),
        SHOT,
        DROP_REVOKED,
    );
    // The revoked flow stays a tombstone: the pod's own retransmitted reply (its egress is
    // not isolated) must not re-open it as a new egress flow that the peer's packets then
    // ride on as replies.
    h.case(
        "epoch: revoked flow's retransmitted reply stays dropped",
        "a",
        e,
        &ipv4(A4, B4, PROTO_TCP, &tcp(80, 45000)),
        SHOT,
        DROP_REVOKED,
    );
    h.case(
        "epoch: revoked flow stays dropped from the peer",
        "a",
        i,
        &ipv4(B4, A4, PROTO_TCP, &tcp(45000, 80)),
        SHOT,
        DROP_REVOKED,
    );
    // A new connection (another source port) to the revoked port is judged by policy as ever.
    h.case(
        "epoch: new flow to the revoked port denied by policy",
        "a",
        i,
        &ipv4(B4, A4, PROTO_TCP, &tcp(45002, 80)),
        SHOT,
        DROP_POLICY,
    );
    h.case(
        "epoch: still-allowed flow re-allowed",
        "a",
        e,
        &ipv4(A4, B4, PROTO_UDP, &udp(53, 45001, b"r")),
        OK,
        ALLOW_REPLY,
    );
    let ct = h.dp.conntrack.entries().unwrap();
    let flow = ct
        .iter()
        .find(|(k, _)| {
            k.endpoint == EP_A
                && k.protocol == PROTO_UDP
                && (k.port_a == 45001 || k.port_b == 45001)
        })
        .expect("udp flow still tracked");
    if flow.1.epoch != 2 || flow.1.rule != 11 {
        h.failures
            .push(format!("epoch: re-allowed entry not updated: {:?}", flow.1));
    }
    h.case(
        "epoch: still-allowed flow continues",
        "a",
        i,
        &ipv4(B4, A4, PROTO_UDP, &udp(45001, 53, b"q")),
        OK,
        ALLOW_ESTABLISHED,
    );
    // The rule back.
    allow(&mut h.dp, EP_A, ID_B, DIR_INGRESS, PROTO_TCP, 80, 16, 10);
    h.set_epoch("a", 3);
    h.case(
        "epoch: a tombstoned flow the policy allows again resumes",
        "a",
        i,
        &ipv4(B4, A4, PROTO_TCP, &tcp(45000, 80)),
        OK,
        ALLOW_ESTABLISHED,
    );
    h.case(
        "epoch: allowed again",
        "a",
        i,
        &ipv4(B4, A4, PROTO_TCP, &tcp(45003, 80)),
        OK,
        ALLOW_POLICY,
    );
}

/// `Conntrack::remove_endpoint` (a pod gone) forgets that endpoint's flows and no other's.
fn removing_an_endpoint_forgets_its_flows_only(h: &mut Harness) {
    let (i, e) = (Hook::Egress, Hook::Ingress);
    h.case(
        "C opens a flow out",
        "c",
        e,
        &ipv4(C4, WORLD4, PROTO_UDP, &udp(5000, 5000, b"x")),
        OK,
        ALLOW_NOT_ISOLATED,
    );
    h.case(
        "a flow into C",
        "c",
        i,
        &ipv4(B4, C4, PROTO_TCP, &tcp(5001, 80)),
        OK,
        ALLOW_POLICY,
    );
    h.case(
        "a flow into A",
        "a",
        i,
        &ipv4(B4, A4, PROTO_TCP, &tcp(5002, 80)),
        OK,
        ALLOW_POLICY,
    );
    let n = h.dp.conntrack.remove_endpoint(EP_C).unwrap();
    if n != 2 {
        h.failures.push(format!(
            "conntrack.remove_endpoint(C) removed {n} flows, want C's 2"
        ));
    }
    let left = |h: &Harness, ep| {
        h.dp.conntrack
            .entries()
            .unwrap()
            .iter()
            .filter(|(k, _)| k.endpoint == ep)
            .count()
    };
    if left(h, EP_C) != 0 || left(h, EP_A) != 1 {
        h.failures.push(format!(
            "after remove_endpoint(C): {} flows of C, {} of A (want 0 and 1)",
            left(h, EP_C),
            left(h, EP_A)
        ));
    }
    h.case(
        "C's forgotten flow: the reply is new, denied",
        "c",
        i,
        &ipv4(WORLD4, C4, PROTO_UDP, &udp(5000, 5000, b"y")),
        SHOT,
        DROP_POLICY,
    );
    h.case(
        "A's flow goes on",
        "a",
        i,
        &ipv4(B4, A4, PROTO_TCP, &tcp(5002, 80)),
        OK,
        ALLOW_ESTABLISHED,
    );
}

/// The established path reads an endpoint from its slot of ENDPOINT_SLOTS: a stale slot with
/// an even sequence is believed (which shows the programs use it), a half-written one or one
/// that names another ifindex is not (ENDPOINTS decides); the agent's next write puts the slot
/// right.
fn a_stale_slot_is_read_but_not_a_half_written_or_foreign_one(h: &mut Harness) {
    use enforcer_common::{ENDPOINT_SLOT_COUNT, endpoint_slot};
    let (i, a) = (Hook::Egress, h.ifs["a"]);
    let flow = |sport| ipv4(B4, A4, PROTO_TCP, &tcp(sport, 80));
    for sport in [45200, 45201] {
        h.case("slot: flow opens", "a", i, &flow(sport), OK, ALLOW_POLICY);
        h.case(
            "slot: flow established",
            "a",
            i,
            &flow(sport),
            OK,
            ALLOW_ESTABLISHED,
        );
    }
    let fresh = h.dp.endpoints.slots().slot_of(a);
    if fresh.ifindex != a || fresh.id != EP_A || fresh.seq & 1 != 0 {
        h.failures
            .push(format!("slot: A's slot does not mirror it: {fresh:?}"));
    }
    // Revoke port 80 under a new epoch; the agent's write moves the slot along.
    h.dp.policy
        .remove(&PolicyKey::new(EP_A, ID_B, DIR_INGRESS, PROTO_TCP, 80, 16))
        .unwrap();
    let epoch = h.eps[&a].epoch + 1;
    h.set_epoch("a", epoch);
    if h.dp.endpoints.slots().slot_of(a).epoch != epoch {
        h.failures
            .push("slot: the epoch write did not reach the slot".into());
    }
    // The slot as it was before: believed, so the revoked flow still passes.
    let slot = endpoint_slot(a);
    h.dp.endpoints.slots().memory().write(slot, &fresh);
    h.case(
        "slot: a stale slot is what the programs read",
        "a",
        i,
        &flow(45200),
        OK,
        ALLOW_ESTABLISHED,
    );
    // Half-written (odd sequence): ENDPOINTS decides.
    let seq = h.dp.endpoints.slots().memory().read(slot).seq;
    h.dp.endpoints.slots().memory().write_head(slot, a, seq + 1);
    h.case(
        "slot: a half-written slot is not read",
        "a",
        i,
        &flow(45200),
        SHOT,
        DROP_REVOKED,
    );
    // Another ifindex in it: ENDPOINTS decides.
    let mem = h.dp.endpoints.slots().memory();
    mem.write(slot, &fresh);
    mem.write_head(slot, a + ENDPOINT_SLOT_COUNT, mem.read(slot).seq);
    h.case(
        "slot: another ifindex's slot is not read",
        "a",
        i,
        &flow(45201),
        SHOT,
        DROP_REVOKED,
    );
    // The agent's next write puts the right slot back.
    allow(&mut h.dp, EP_A, ID_B, DIR_INGRESS, PROTO_TCP, 80, 16, 10);
    h.set_epoch("a", epoch + 1);
    let now = h.dp.endpoints.slots().slot_of(a);
    if now.ifindex != a || now.epoch != epoch + 1 || now.seq & 1 != 0 {
        h.failures.push(format!("slot: not rewritten: {now:?}"));
    }
    h.case(
        "slot: flow back after re-allow",
        "a",
        i,
        &flow(45202),
        OK,
        ALLOW_POLICY,
    );
    h.case(
        "slot: and established",
        "a",
        i,
        &flow(45202),
        OK,
        ALLOW_ESTABLISHED,
    );
}

/// New flows too are judged from the slot: with the policy keys it lists (the entry, written a
/// moment later, lists none), the slot's probe finds the rule and the flow opens; a slot listing
/// none (as an older agent wrote them) is not taken for a denial.
fn new_flows_are_judged_from_the_slots_policy_keys(h: &mut Harness) {
    use enforcer_common::endpoint_slot;
    let (i, a) = (Hook::Egress, h.ifs["a"]);
    let flow = |sport| ipv4(B4, A4, PROTO_TCP, &tcp(sport, 80));
    let slot = endpoint_slot(a);
    let with = h.dp.endpoints.slots().slot_of(a);
    let entry = h.eps[&a];
    let mut bare = entry;
    bare.port_masks = [0, 0];
    h.dp.endpoints.set(&a, &bare).unwrap();
    h.dp.endpoints.slots().memory().write(slot, &with);
    h.case(
        "slot: a new flow is judged from the slot's policy keys",
        "a",
        i,
        &flow(45203),
        OK,
        ALLOW_POLICY,
    );
    // A slot listing no policy keys (as an older agent wrote them) where the entry lists some:
    // its empty probe is not taken for a denial; ENDPOINTS decides.
    h.dp.endpoints.set(&a, &entry).unwrap();
    let mut older = with;
    older.port_masks = [0, 0];
    h.dp.endpoints.slots().memory().write(slot, &older);
    h.case(
        "slot: a slot without policy keys does not deny a new flow",
        "a",
        i,
        &flow(45204),
        OK,
        ALLOW_POLICY,
    );
    h.case(
        "slot: which is tracked",
        "a",
        i,
        &flow(45204),
        OK,
        ALLOW_ESTABLISHED,
    );
    h.dp.endpoints.slots().memory().write(slot, &with);
}

/// A veth whose ifindex shares A's slot: A keeps the slot, D is judged through ENDPOINTS; when
/// A goes, D takes the slot and keeps its flow.
fn an_endpoint_sharing_a_slot_is_judged_through_endpoints(h: &mut Harness) {
    use enforcer_common::ENDPOINT_SLOT_COUNT;
    let (i, a) = (Hook::Egress, h.ifs["a"]);
    let flow = |sport| ipv4(B4, A4, PROTO_TCP, &tcp(sport, 80));
    h.case(
        "slot: the slot owner's flow opens",
        "a",
        i,
        &flow(45202),
        OK,
        ALLOW_POLICY,
    );
    const EP_D: u32 = 4;
    const D4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 4);
    let d = a + ENDPOINT_SLOT_COUNT;
    ip(&[
        "link",
        "add",
        "name",
        "epd",
        "index",
        &d.to_string(),
        "type",
        "veth",
        "peer",
        "name",
        "epdp",
    ]);
    ip(&["link", "set", "epd", "up"]);
    h.ifs.insert("d", d);
    let info = endpoint(EP_D, EP_INGRESS_ISOLATED, D4, None, [1 << 16, 0]);
    h.dp.endpoints.set(&d, &info).unwrap();
    h.eps.insert(d, info);
    allow(&mut h.dp, EP_D, ID_B, DIR_INGRESS, PROTO_TCP, 80, 16, 40);
    if h.dp.endpoints.slots().slot_of(d).ifindex != a {
        h.failures
            .push("slot: the lower ifindex lost the shared slot".into());
    }
    let to_d = ipv4(B4, D4, PROTO_TCP, &tcp(45300, 80));
    h.case(
        "slot: shared-slot endpoint, new flow",
        "d",
        i,
        &to_d,
        OK,
        ALLOW_POLICY,
    );
    h.case(
        "slot: shared-slot endpoint, established",
        "d",
        i,
        &to_d,
        OK,
        ALLOW_ESTABLISHED,
    );
    h.case(
        "slot: shared-slot endpoint, denied port",
        "d",
        i,
        &ipv4(B4, D4, PROTO_TCP, &tcp(45301, 81)),
        SHOT,
        DROP_POLICY,
    );
    h.case(
        "slot: slot owner unaffected",
        "a",
        i,
        &flow(45202),
        OK,
        ALLOW_ESTABLISHED,
    );
    // A goes: D takes the slot and keeps its flow.
    let info_a = h.eps[&a];
    h.dp.endpoints.remove(&a).unwrap();
    if h.dp.endpoints.slots().slot_of(d).ifindex != d {
        h.failures
            .push("slot: the shared slot did not pass to the remaining ifindex".into());
    }
    h.case(
        "slot: shared-slot endpoint, through its slot now",
        "d",
        i,
        &to_d,
        OK,
        ALLOW_ESTABLISHED,
    );
    h.dp.endpoints.set(&a, &info_a).unwrap();
    h.dp.endpoints.remove(&d).unwrap();
    h.eps.remove(&d);
    ip(&["link", "del", "epd"]);
    h.ifs.remove("d");
}

/// `PEER_SLOTS`, the cache of PEERS_V4: the programs take a peer's identity from its way,
/// only for the address the way names, and ask PEERS_V4 for an address in no way; the agent's
/// writes and removals keep the ways equal to PEERS_V4.
fn peer_cache_ways_mirror_peers_v4(h: &mut Harness) {
    use enforcer_common::{peer_bucket, peer_way};
    let i = Hook::Egress;
    // A allows ID_B on TCP 80; every case is a new flow.
    let from = |src: Ipv4Addr, sport| ipv4(src, A4, PROTO_TCP, &tcp(sport, 80));
    let cached = |h: &Harness, addr: Ipv4Addr| {
        h.dp.peers_v4
            .slots()
            .bucket(addr.octets())
            .iter()
            .find_map(|&w| enforcer_common::peer_way_identity(w, addr.octets()))
    };
    if cached(h, B4) != Some(ID_B) {
        h.failures
            .push("peer cache: B's address is not cached with its identity".into());
    }
    // An address PEERS_V4 does not know, given B's identity by its way alone: allowed, so the
    // programs read the way.
    let x = Ipv4Addr::new(10, 77, 0, 1);
    let buckets = h.dp.peers_v4.slots().memory().buckets();
    let bx = peer_bucket(x.octets(), buckets);
    let mem = h.dp.peers_v4.slots().memory();
    let saved = mem.read(bx);
    mem.write(bx, 1, peer_way(x.octets(), ID_B));
    h.case(
        "peer cache: a way's identity is the peer's",
        "a",
        i,
        &from(x, 46000),
        OK,
        ALLOW_POLICY,
    );
    // The same way holding another address says nothing about this one: world, denied.
    let mem = h.dp.peers_v4.slots().memory();
    mem.write(bx, 1, peer_way([10, 77, 0, 2], ID_B));
    h.case(
        "peer cache: a way of another address is not taken",
        "a",
        i,
        &from(x, 46001),
        SHOT,
        DROP_POLICY,
    );
    let mem = h.dp.peers_v4.slots().memory();
    mem.write(bx, 0, saved[0]);
    mem.write(bx, 1, saved[1]);

    // Through the agent: written, re-identified and removed, the way follows PEERS_V4.
    let peer = |identity| PeerInfo { identity, flags: 0 };
    h.dp.peers_v4.set(&x, &peer(ID_B)).unwrap();
    if cached(h, x) != Some(ID_B) {
        h.failures
            .push("peer cache: a written peer is not cached".into());
    }
    h.case(
        "peer cache: written peer",
        "a",
        i,
        &from(x, 46002),
        OK,
        ALLOW_POLICY,
    );
    h.dp.peers_v4.set(&x, &peer(999)).unwrap();
    h.case(
        "peer cache: re-identified peer",
        "a",
        i,
        &from(x, 46003),
        SHOT,
        DROP_POLICY,
    );
    h.dp.peers_v4.set(&x, &peer(ID_B)).unwrap();
    h.dp.peers_v4.remove(&x).unwrap();
    if cached(h, x).is_some() {
        h.failures
            .push("peer cache: a removed peer is still cached".into());
    }
    h.case(
        "peer cache: removed peer",
        "a",
        i,
        &from(x, 46004),
        SHOT,
        DROP_POLICY,
    );

    // Three addresses of one bucket: the two lowest are cached, the third is not, and is
    // judged from PEERS_V4 all the same.
    let mut by = BTreeMap::<u32, Vec<Ipv4Addr>>::new();
    let three = (0..65_536u32)
        .map(|k| Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 78, 0, 0)) + k))
        .find_map(|addr| {
            let v = by.entry(peer_bucket(addr.octets(), buckets)).or_default();
            v.push(addr);
            (v.len() == 3).then(|| v.clone())
        })
        .expect("65536 addresses share buckets");
    for addr in &three {
        h.dp.peers_v4.set(addr, &peer(ID_B)).unwrap();
    }
    let held: Vec<bool> = three
        .iter()
        .map(|&addr| cached(h, addr).is_some())
        .collect();
    if held != [true, true, false] {
        h.failures.push(format!(
            "peer cache: ways of a full bucket {three:?}: cached {held:?}, want the two lowest"
        ));
    }
    for (k, addr) in three.iter().enumerate() {
        h.case(
            "peer cache: addresses of a full bucket",
            "a",
            i,
            &from(*addr, 46010 + k as u16),
            OK,
            ALLOW_POLICY,
        );
    }
    // The lowest goes: the third takes its way.
    h.dp.peers_v4.remove(&three[0]).unwrap();
    if cached(h, three[2]) != Some(ID_B) || cached(h, three[0]).is_some() {
        h.failures
            .push("peer cache: a freed way did not pass to the address left out".into());
    }
    for addr in &three[1..] {
        h.dp.peers_v4.remove(addr).unwrap();
    }
}

/// Idle timeouts from CONFIG: a flow seen within its timeout stays established (and its stamp
/// moves on), one idle longer is judged as a new flow again (a reply of it is then dropped by
/// policy).
fn idle_flows_time_out_and_are_judged_anew(h: &mut Harness) {
    use std::time::Duration;
    let (i, e) = (Hook::Egress, Hook::Ingress);
    let timeout = Duration::from_secs(1);
    let mut cfg = h.dp.config().unwrap();
    cfg.ct_timeout_tcp_ns = timeout.as_nanos() as u64;
    cfg.ct_timeout_other_ns = timeout.as_nanos() as u64;
    h.dp.set_config(&cfg).unwrap();
    let to_a = ipv4(B4, A4, PROTO_TCP, &tcp(45500, 80));
    let reply = ipv4(A4, B4, PROTO_TCP, &tcp(80, 45500));
    let stamp = |h: &Harness| {
        h.dp.conntrack
            .entries()
            .unwrap()
            .into_iter()
            .find(|(k, _)| k.endpoint == EP_A && k.protocol == PROTO_TCP && k.port_b == 45500)
            .map(|(_, v)| v.last_seen_ns)
    };
    h.case("idle: flow opens", "a", i, &to_a, OK, ALLOW_POLICY);
    let first = stamp(h);
    std::thread::sleep(Duration::from_millis(100));
    h.case(
        "idle: a reply within the timeout",
        "a",
        e,
        &reply,
        OK,
        ALLOW_REPLY,
    );
    let second = stamp(h);
    if first.is_none() || second <= first {
        h.failures.push(format!(
            "idle: stamp did not move on: {first:?} then {second:?}"
        ));
    }
    std::thread::sleep(timeout + Duration::from_millis(500));
    h.case(
        "idle: an idle flow's reply is a new flow, denied",
        "a",
        e,
        &reply,
        SHOT,
        DROP_POLICY,
    );
    h.case(
        "idle: the peer opens it again",
        "a",
        i,
        &to_a,
        OK,
        ALLOW_POLICY,
    );
    h.case(
        "idle: and its reply passes",
        "a",
        e,
        &reply,
        OK,
        ALLOW_REPLY,
    );
    let defaults = h.dp.options().config();
    h.dp.set_config(&defaults).unwrap();
}

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// TCP flows age by their state: one never answered and one closed (a RST, or a FIN from each
/// end) are forgotten after their short timeouts, so their replies are judged as new flows
/// (denied); an answered one, half-closed too, lasts the established timeout; a SYN from the
/// originator opens a closed flow again, as a new connection on the same ports.
fn tcp_flows_age_by_their_state(h: &mut Harness) {
    use std::time::Duration;
    let (i, e) = (Hook::Egress, Hook::Ingress);
    let short = Duration::from_secs(1);
    let mut cfg = h.dp.config().unwrap();
    cfg.ct_timeout_tcp_syn_ns = short.as_nanos() as u64;
    cfg.ct_timeout_tcp_closed_ns = short.as_nanos() as u64;
    h.dp.set_config(&cfg).unwrap();
    // B opens flows to A:80 (allowed); A's replies go to B's port, which A's egress does not
    // allow as a new flow.
    let from_b = |p: u16, f: u8| ipv4(B4, A4, PROTO_TCP, &tcp_flags(p, 80, f));
    let from_a = |p: u16, f: u8| ipv4(A4, B4, PROTO_TCP, &tcp_flags(80, p, f));
    let (unanswered, answered, half_closed, fins, reset, reopened) =
        (41001, 41002, 41003, 41004, 41005, 41006);
    h.case(
        "state: a SYN never answered",
        "a",
        i,
        &from_b(unanswered, TCP_SYN),
        OK,
        ALLOW_POLICY,
    );
    for p in [answered, half_closed, fins, reset, reopened] {
        h.case(
            "state: a SYN",
            "a",
            i,
            &from_b(p, TCP_SYN),
            OK,
            ALLOW_POLICY,
        );
        h.case(
            "state: its SYN-ACK",
            "a",
            e,
            &from_a(p, TCP_SYN | TCP_ACK),
            OK,
            ALLOW_REPLY,
        );
    }
    h.case(
        "state: B half-closes",
        "a",
        i,
        &from_b(half_closed, TCP_FIN | TCP_ACK),
        OK,
        ALLOW_ESTABLISHED,
    );
    for p in [fins, reopened] {
        h.case(
            "state: B's FIN",
            "a",
            i,
            &from_b(p, TCP_FIN | TCP_ACK),
            OK,
            ALLOW_ESTABLISHED,
        );
        h.case(
            "state: A's FIN",
            "a",
            e,
            &from_a(p, TCP_FIN | TCP_ACK),
            OK,
            ALLOW_REPLY,
        );
    }
    h.case(
        "state: B resets",
        "a",
        i,
        &from_b(reset, TCP_RST),
        OK,
        ALLOW_ESTABLISHED,
    );
    h.case(
        "state: a new SYN on the closed ports",
        "a",
        i,
        &from_b(reopened, TCP_SYN),
        OK,
        ALLOW_ESTABLISHED,
    );
    h.case(
        "state: answered again",
        "a",
        e,
        &from_a(reopened, TCP_SYN | TCP_ACK),
        OK,
        ALLOW_REPLY,
    );
    std::thread::sleep(short + Duration::from_millis(600));
    for (what, p, act, why) in [
        (
            "state: the unanswered flow is forgotten",
            unanswered,
            SHOT,
            DROP_POLICY,
        ),
        ("state: the answered flow stays", answered, OK, ALLOW_REPLY),
        (
            "state: the half-closed flow stays",
            half_closed,
            OK,
            ALLOW_REPLY,
        ),
        (
            "state: the flow closed by FINs is forgotten",
            fins,
            SHOT,
            DROP_POLICY,
        ),
        (
            "state: the reset flow is forgotten",
            reset,
            SHOT,
            DROP_POLICY,
        ),
        ("state: the reopened flow stays", reopened, OK, ALLOW_REPLY),
    ] {
        h.case(what, "a", e, &from_a(p, TCP_ACK), act, why);
    }
    let defaults = h.dp.options().config();
    h.dp.set_config(&defaults).unwrap();
}

/// An endpoint holds at most `max_flows_per_endpoint` flows per direction of origin: the next
/// new flow is dropped (`flow-limit`) while its tracked flows go on, the other direction and
/// other endpoints open flows as before, and a sweep after its flows expired gives the room
/// back.
fn an_endpoint_at_its_flow_limit_opens_no_new_flow(h: &mut Harness) {
    use std::time::Duration;
    let (i, e) = (Hook::Egress, Hook::Ingress);
    let short = Duration::from_secs(1);
    let mut cfg = h.dp.config().unwrap();
    cfg.max_flows_per_endpoint = 3;
    cfg.ct_timeout_tcp_syn_ns = short.as_nanos() as u64;
    h.dp.set_config(&cfg).unwrap();
    // Counts are kept while the agent sweeps: a first sweep.
    let counter = h.dp.conntrack.counter().expect("batched conntrack reads");
    let kept = Duration::from_secs(60);
    counter.sweep(kept).unwrap();
    let from_b = |p: u16| ipv4(B4, A4, PROTO_TCP, &tcp_flags(p, 80, TCP_SYN));
    for p in 42001..42004 {
        h.case(
            "limit: flows into A up to the limit",
            "a",
            i,
            &from_b(p),
            OK,
            ALLOW_POLICY,
        );
    }
    h.case(
        "limit: one more into A",
        "a",
        i,
        &from_b(42004),
        SHOT,
        DROP_FLOW_LIMIT,
    );
    h.case(
        "limit: A's tracked flows go on",
        "a",
        e,
        &ipv4(A4, B4, PROTO_TCP, &tcp_flags(80, 42001, TCP_SYN | TCP_ACK)),
        OK,
        ALLOW_REPLY,
    );
    h.case(
        "limit: A opens a flow out (counted apart)",
        "a",
        e,
        &ipv4(A4, B4, PROTO_TCP, &tcp_flags(43000, 5432, TCP_SYN)),
        OK,
        ALLOW_POLICY,
    );
    h.case(
        "limit: another endpoint opens flows",
        "c",
        i,
        &ipv4(B4, C4, PROTO_TCP, &tcp_flags(42001, 80, TCP_SYN)),
        OK,
        ALLOW_POLICY,
    );
    // The direction no policy isolates of an endpoint isolated in the other (tracked, so that
    // its replies pass the isolated one) is held to the same limit.
    for p in 44001..44004 {
        h.case(
            "limit: flows out of C (egress not isolated)",
            "c",
            e,
            &ipv4(C4, WORLD4, PROTO_UDP, &udp(p, 53, b"q")),
            OK,
            ALLOW_NOT_ISOLATED,
        );
    }
    h.case(
        "limit: one more out of C",
        "c",
        e,
        &ipv4(C4, WORLD4, PROTO_UDP, &udp(44004, 53, b"q")),
        SHOT,
        DROP_FLOW_LIMIT,
    );
    let count = |h: &Harness| h.dp.conntrack.flow_counts().get(EP_A, DIR_INGRESS);
    if count(h) != 3 {
        h.failures
            .push(format!("limit: A holds {} flows in, want 3", count(h)));
    }
    // A's unanswered flows expire (the answered one, 42001, stays); the sweep counts what is
    // live, and A may open flows again.
    std::thread::sleep(short + Duration::from_millis(600));
    counter.sweep(kept).unwrap();
    if count(h) != 1 {
        h.failures.push(format!(
            "limit: after the sweep A holds {} flows in, want 1",
            count(h)
        ));
    }
    for p in 42005..42007 {
        h.case(
            "limit: room again after the sweep",
            "a",
            i,
            &from_b(p),
            OK,
            ALLOW_POLICY,
        );
    }
    h.case(
        "limit: and the limit again",
        "a",
        i,
        &from_b(42007),
        SHOT,
        DROP_FLOW_LIMIT,
    );
    // No sweep for longer than they are kept (the agent is down): no count, no limit.
    h.dp.conntrack.flow_counts().keep_until(0);
    h.case(
        "limit: counts not kept without sweeps",
        "a",
        i,
        &from_b(42008),
        OK,
        ALLOW_POLICY,
    );
    let defaults = h.dp.options().config();
    h.dp.set_config(&defaults).unwrap();
}

/// A flow table an older build created (pinned `FLOWS_V4`, pinned 24-byte `CONFIG`) keeps its
/// unkeyed bucket hash: the programs and the agent agree on it (a flow the programs record is
/// where the agent looks), and the old CONFIG is replaced by this build's.
fn a_flow_table_from_an_older_build_keeps_its_unkeyed_hash() -> (usize, Vec<String>) {
    let prepare = |pin: &Path| {
        let maps = pin.join(format!("v{SCHEMA_VERSION}/maps"));
        std::fs::create_dir_all(&maps).unwrap();
        pin_map(
            &maps.join(MAP_FLOWS_V4),
            BPF_MAP_TYPE_ARRAY,
            4,
            std::mem::size_of::<FlowBucket>(),
            4096,
            BPF_F_MMAPABLE,
        );
        pin_map(&maps.join(MAP_CONFIG), BPF_MAP_TYPE_ARRAY, 4, 24, 1, 0);
    };
    in_private_netns("unkeyed", prepare, |h, _| {
        h.cases += 1;
        let Some(table) = h.dp.conntrack.flow_table() else {
            return;
        };
        if !table.seed().is_unkeyed() {
            h.failures.push("the older table got a keyed hash".into());
        }
        h.case(
            "unkeyed: a flow opens",
            "a",
            Hook::Egress,
            &ipv4(B4, A4, PROTO_TCP, &tcp(45100, 80)),
            OK,
            ALLOW_POLICY,
        );
        let key = CtKeyV4 {
            endpoint: EP_A,
            protocol: PROTO_TCP,
            _pad: [0; 3],
            addr_a: A4.octets(),
            addr_b: B4.octets(),
            port_a: 80,
            port_b: 45100,
        };
        let found = h.dp.conntrack.flow_table().unwrap().get(&key, 0).unwrap();
        if found.is_none() {
            h.failures
                .push("unkeyed: the agent does not find the flow where the programs put it".into());
        }
    })
}

/// The flows just allowed sit in their family's conntrack map under exactly the key the agent
/// builds (ends ordered by address, then port): the programs and `Conntrack` agree byte for byte.
fn conntrack_keys_are_laid_out_as_the_agent_builds_them(h: &mut Harness) {
    let (i, e) = (Hook::Egress, Hook::Ingress);
    h.case(
        "tcp v4 in from pod B allowed port",
        "a",
        i,
        &ipv4(B4, A4, PROTO_TCP, &tcp(40000, 80)),
        OK,
        ALLOW_POLICY,
    );
    h.case(
        "tcp v6 in allowed",
        "a",
        i,
        &ipv6(B6, A6, PROTO_TCP, &tcp(40000, 80)),
        OK,
        ALLOW_POLICY,
    );
    h.case(
        "tcp v6 out allowed",
        "a",
        e,
        &ipv6(A6, B6, PROTO_TCP, &tcp(42000, 5432)),
        OK,
        ALLOW_POLICY,
    );
    fn key(family: u8, proto: u8, a: &[u8], pa: u16, b: &[u8], pb: u16) -> CtKey {
        let (mut addr_a, mut addr_b) = ([0u8; 16], [0u8; 16]);
        addr_a[..a.len()].copy_from_slice(a);
        addr_b[..b.len()].copy_from_slice(b);
        CtKey {
            endpoint: EP_A,
            family,
            protocol: proto,
            _pad: 0,
            addr_a,
            addr_b,
            port_a: pa,
            port_b: pb,
        }
    }
    // A4 (10.0.0.1) < B4 and A6 < B6: the pod's address is end a in both.
    let flows = [
        (
            "v4 tcp 80 <- 40000",
            key(FAMILY_V4, PROTO_TCP, &A4.octets(), 80, &B4.octets(), 40000),
        ),
        (
            "v6 tcp 80 <- 40000",
            key(FAMILY_V6, PROTO_TCP, &A6.octets(), 80, &B6.octets(), 40000),
        ),
        (
            "v6 tcp 42000 -> 5432",
            key(
                FAMILY_V6,
                PROTO_TCP,
                &A6.octets(),
                42000,
                &B6.octets(),
                5432,
            ),
        ),
    ];
    for (what, k) in flows {
        match h.dp.conntrack.get(&k) {
            Ok(Some(v)) if v.flags & CT_REVOKED == 0 => {}
            other => h
                .failures
                .push(format!("conntrack key of {what}: {other:?} for {k:?}")),
        }
    }
    let c = h.dp.conntrack.count_by_map().unwrap();
    let (v4, v6) = (c.flows + c.v4, c.v6);
    if v4 == 0 || v6 == 0 {
        h.failures
            .push(format!("conntrack entries by family: {v4} IPv4, {v6} IPv6"));
    }
    // With the flow table on, IPv4 flows live there (none of these buckets is full).
    if h.dp.conntrack.flow_table().is_some() && (c.flows == 0 || c.v4 != 0) {
        h.failures
            .push(format!("IPv4 flows not in FLOWS_V4: {c:?}"));
    }
    let listed = h.dp.conntrack.entries().unwrap();
    if listed.len() != v4 + v6 || listed.iter().filter(|(k, _)| k.family == FAMILY_V4).count() != v4
    {
        h.failures.push(format!(
            "conntrack entries() lists {} for {v4} + {v6}",
            listed.len()
        ));
    }
}

/// C's ingress (isolated, TCP 80 from B allowed) as if only audit policies isolated it: what no
/// entry allows passes as would-drop (through `audit_pod`), reported once and marked; switched
/// to enforce (flag cleared, epoch moved), the would-drop flow is revoked and new ones drop.
fn audit_only_directions_allow_and_report_would_drop(h: &mut Harness) {
    let c = h.dp.endpoints.get(&h.ifs["c"]).unwrap().unwrap();
    let (i, e) = (Hook::Egress, Hook::Ingress);
    h.set_flags_epoch("c", c.flags | EP_INGRESS_AUDIT, 2);
    let _ = h.events().drain();
    h.case(
        "audit: an entry still allows",
        "c",
        i,
        &ipv4(B4, C4, PROTO_TCP, &tcp(46000, 80)),
        OK,
        ALLOW_POLICY,
    );
    h.case(
        "audit: no entry: would-drop",
        "c",
        i,
        &ipv4(WORLD4, C4, PROTO_TCP, &tcp(46001, 22)),
        OK,
        ALLOW_AUDIT,
    );
    let got = h.events().drain();
    if !(got.len() == 1
        && got[0].reason == ALLOW_AUDIT
        && got[0].endpoint == EP_C
        && got[0].direction == DIR_INGRESS
        && got[0].rule == 0
        && got[0].dport == 22)
    {
        h.failures
            .push(format!("audit: one would-drop event expected, got {got:?}"));
    }
    let marked = |h: &Harness, port: u16| {
        h.dp.conntrack.entries().unwrap().into_iter().any(|(k, v)| {
            k.endpoint == EP_C && (k.port_a == port || k.port_b == port) && v.rule == RULE_AUDIT
        })
    };
    if !marked(h, 46001) {
        h.failures
            .push("audit: the would-drop flow is not marked in conntrack".into());
    }
    h.case(
        "audit: the would-drop flow's reply passes",
        "c",
        e,
        &ipv4(C4, WORLD4, PROTO_TCP, &tcp(22, 46001)),
        OK,
        ALLOW_REPLY,
    );
    h.case(
        "audit: the would-drop flow is established",
        "c",
        i,
        &ipv4(WORLD4, C4, PROTO_TCP, &tcp(46001, 22)),
        OK,
        ALLOW_ESTABLISHED,
    );
    if !h.events().drain().is_empty() {
        h.failures
            .push("audit: an established flow was reported again".into());
    }
    // A later fragment whose first is unknown passes as where nothing isolates.
    h.case(
        "audit: a lone later fragment passes",
        "c",
        i,
        &ipv4_with(
            WORLD4,
            C4,
            PROTO_UDP,
            &[7; 16],
            V4 {
                id: 0x4343,
                frag_offset: 185,
                ..V4::default()
            },
        ),
        OK,
        ALLOW_NOT_ISOLATED,
    );
    // Switched to enforce: the flag goes, the epoch moves.
    h.set_flags_epoch("c", c.flags, 3);
    h.case(
        "audit->enforce: the would-drop flow is revoked",
        "c",
        i,
        &ipv4(WORLD4, C4, PROTO_TCP, &tcp(46001, 22)),
        SHOT,
        DROP_REVOKED,
    );
    h.case(
        "audit->enforce: its replies too",
        "c",
        e,
        &ipv4(C4, WORLD4, PROTO_TCP, &tcp(22, 46001)),
        SHOT,
        DROP_REVOKED,
    );
    h.case(
        "audit->enforce: a new flow drops",
        "c",
        i,
        &ipv4(WORLD4, C4, PROTO_TCP, &tcp(46002, 22)),
        SHOT,
        DROP_POLICY,
    );
    h.case(
        "audit->enforce: the allowed flow continues",
        "c",
        i,
        &ipv4(B4, C4, PROTO_TCP, &tcp(46000, 80)),
        OK,
        ALLOW_ESTABLISHED,
    );
    // Back to audit: a flow that was allowed and loses its entry is kept (not enforced).
    h.set_flags_epoch("c", c.flags | EP_INGRESS_AUDIT, 4);
    h.dp.policy
        .remove(&PolicyKey::new(EP_C, ID_B, DIR_INGRESS, PROTO_TCP, 80, 16))
        .unwrap();
    h.set_flags_epoch("c", c.flags | EP_INGRESS_AUDIT, 5);
    let _ = h.events().drain();
    h.case(
        "audit: a re-checked flow no entry allows is kept",
        "c",
        i,
        &ipv4(B4, C4, PROTO_TCP, &tcp(46000, 80)),
        OK,
        ALLOW_ESTABLISHED,
    );
    // Enforcing again, the re-check revokes it.
    h.set_flags_epoch("c", c.flags, 6);
    h.case(
        "audit->enforce: the re-checked flow is revoked",
        "c",
        i,
        &ipv4(B4, C4, PROTO_TCP, &tcp(46000, 80)),
        SHOT,
        DROP_REVOKED,
    );
}

/// Verdict events: one per drop with the flow's fields; allowed flows only with
/// CONFIG_LOG_ALLOWED, and only their first packet.
fn verdict_events_report_drops_and_only_logged_allows(h: &mut Harness) {
    let _ = h.events().drain();
    h.case(
        "event: drop",
        "a",
        Hook::Egress,
        &ipv4(WORLD4, A4, PROTO_TCP, &tcp(1234, 22)),
        SHOT,
        DROP_POLICY,
    );
    let got = h.events().drain();
    let ok = got.len() == 1 && {
        let ev = got[0];
        ev.endpoint == EP_A
            && ev.reason == DROP_POLICY
            && ev.direction == DIR_INGRESS
            && ev.protocol == PROTO_TCP
            && ev.family == 4
            && ev.sport == 1234
            && ev.dport == 22
            && ev.src[..4] == WORLD4.octets()
            && ev.dst[..4] == A4.octets()
            && ev.peer_identity == enforcer_common::IDENTITY_WORLD
            && ev.bytes == 54
    };
    if !ok {
        h.failures.push(format!("event for a drop: got {got:?}"));
    }
    // Allowed flows are silent unless asked.
    h.case(
        "event: allow, not logged",
        "a",
        Hook::Egress,
        &ipv4(WORLD4, A4, PROTO_TCP, &tcp(1235, 8001)),
        OK,
        ALLOW_POLICY,
    );
    let got = h.events().drain();
    if !got.is_empty() {
        h.failures
            .push(format!("allow event without CONFIG_LOG_ALLOWED: {got:?}"));
    }
    let mut cfg = h.dp.config().unwrap();
    cfg.flags |= CONFIG_LOG_ALLOWED;
    h.dp.set_config(&cfg).unwrap();
    h.case(
        "event: allow, logged",
        "a",
        Hook::Egress,
        &ipv4(WORLD4, A4, PROTO_TCP, &tcp(1236, 8001)),
        OK,
        ALLOW_POLICY,
    );
    h.case(
        "event: established not logged",
        "a",
        Hook::Egress,
        &ipv4(WORLD4, A4, PROTO_TCP, &tcp(1236, 8001)),
        OK,
        ALLOW_ESTABLISHED,
    );
    let got = h.events().drain();
    if !(got.len() == 1
        && got[0].reason == ALLOW_POLICY
        && got[0].rule == 13
        && got[0].sport == 1236)
    {
        h.failures
            .push(format!("allow event with CONFIG_LOG_ALLOWED: {got:?}"));
    }
    cfg.flags &= !CONFIG_LOG_ALLOWED;
    h.dp.set_config(&cfg).unwrap();
}

/// Restart: a second load reuses the pinned maps (policy and conntrack survive).
fn a_restart_reuses_pinned_maps_and_moves_legacy_ipv4_flows(h: &mut Harness, pin: &Path) {
    for (what, act, reason) in [
        ("restart: a flow opens", OK, ALLOW_POLICY),
        ("restart: and is established", OK, ALLOW_ESTABLISHED),
    ] {
        h.case(
            what,
            "a",
            Hook::Egress,
            &ipv4(B4, A4, PROTO_TCP, &tcp(45000, 80)),
            act,
            reason,
        );
    }
    // An older agent kept IPv4 flows in `CONNTRACK` beside the IPv6 ones: move the established
    // flow there, as its programs would have recorded it. The new load must move it back to
    // `CONNTRACK_V4`, where the programs look for it (checked by the packet below).
    let flow =
        h.dp.conntrack
            .entries()
            .unwrap()
            .into_iter()
            .find(|(k, _)| k.family == FAMILY_V4 && k.port_a == 80 && k.port_b == 45000)
            .expect("the established tcp flow 45000 -> 80");
    h.dp.conntrack.remove(&flow.0).unwrap();
    let legacy_path = pin.join(format!("v{SCHEMA_VERSION}/maps/{MAP_CONNTRACK_V6}"));
    let legacy = || -> aya::maps::HashMap<aya::maps::MapData, CtKey, CtValue> {
        let data = aya::maps::MapData::from_pin(&legacy_path).expect("pinned CONNTRACK");
        aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(data)).expect("an LRU hash")
    };
    legacy().insert(flow.0, flow.1, 0).unwrap();
    let before = h.dp.conntrack.count().unwrap();
    let opts = DatapathOptions {
        pin_path: pin.to_path_buf(),
        max_endpoints: 16,
        ..Default::default()
    };
    let dp2 = Datapath::open(opts).expect("second load");
    let seeds = (
        h.dp.conntrack.flow_table().map(|t| t.seed()),
        dp2.conntrack.flow_table().map(|t| t.seed()),
    );
    if seeds.0 != seeds.1 || seeds.0.is_some_and(|s| s.is_unkeyed()) {
        h.failures.push(format!(
            "restart: the flow table's hash key changed or is unkeyed: {seeds:?}"
        ));
    }
    let after = dp2.conntrack.count().unwrap();
    let ifindex = h.ifs["a"];
    if before == 0
        || after != before
        || dp2.endpoints.get(&ifindex).unwrap() != h.eps.get(&ifindex).copied()
    {
        h.failures.push(format!(
            "restart: conntrack {before} -> {after}, endpoint not kept"
        ));
    }
    // The new programs see the old state: the established flow continues.
    let act = dp2
        .test_run(
            Hook::Egress,
            ifindex,
            &ipv4(B4, A4, PROTO_TCP, &tcp(45000, 80)),
        )
        .unwrap();
    if act != OK {
        h.failures
            .push("restart: established flow dropped by the new programs".into());
    }
    let left = legacy()
        .keys()
        .filter(|k| k.as_ref().is_ok_and(|k| k.family == FAMILY_V4))
        .count();
    if left != 0 || dp2.conntrack.get(&flow.0).unwrap().is_none() {
        h.failures.push(format!(
            "restart: {left} IPv4 flows left in {MAP_CONNTRACK_V6}, the moved one in CONNTRACK_V4: {:?}",
            dp2.conntrack.get(&flow.0)
        ));
    }
    h.cases += 1;
}

/// An upgrade from programs that kept every IPv4 flow in `CONNTRACK_V4`: a flow they left
/// there, in no `FLOWS_V4` bucket, must stay established through the new load (the programs
/// look there on every miss until the agent settles), and after it (its bucket marked
/// overflowed), never taken for a new flow.
fn an_upgrade_keeps_flows_left_in_conntrack_v4(h: &mut Harness, pin: &Path) {
    if h.dp.conntrack.flow_table().is_none() {
        h.failures
            .push("upgrade: the flow table is off (it is on wherever slots are)".into());
        return;
    }
    let fwd = ipv4(WORLD4, A4, PROTO_TCP, &tcp(46500, 8001));
    h.case(
        "upgrade: a new flow",
        "a",
        Hook::Egress,
        &fwd,
        OK,
        ALLOW_POLICY,
    );
    let flow =
        h.dp.conntrack
            .entries()
            .unwrap()
            .into_iter()
            .find(|(k, _)| k.port_a == 46500 || k.port_b == 46500)
            .expect("the flow from port 46500");
    let k4 = flow.0.to_v4().expect("an IPv4 flow");
    // As programs without the table recorded it.
    h.dp.conntrack.remove(&flow.0).unwrap();
    let path = pin.join(format!("v{SCHEMA_VERSION}/maps/{MAP_CONNTRACK_V4}"));
    let mut lru = aya::maps::HashMap::<_, CtKeyV4, CtValue>::try_from(aya::maps::Map::LruHashMap(
        aya::maps::MapData::from_pin(&path).expect("pinned CONNTRACK_V4"),
    ))
    .expect("an LRU hash");
    lru.insert(k4, flow.1, 0).unwrap();
    let opts = DatapathOptions {
        pin_path: pin.to_path_buf(),
        max_endpoints: 16,
        ..Default::default()
    };
    let new = Datapath::open(opts).expect("the upgrade's load");
    let old = std::mem::replace(&mut h.dp, new);
    h.cases += 1;
    if h.dp.config().unwrap().flags & CONFIG_CT_LRU_ALL == 0 {
        h.failures
            .push("upgrade: CONFIG does not send misses to CONNTRACK_V4".into());
    }
    h.case(
        "upgrade: a flow in CONNTRACK_V4 alone goes on",
        "a",
        Hook::Egress,
        &fwd,
        OK,
        ALLOW_ESTABLISHED,
    );
    h.dp.settle_conntrack().unwrap();
    h.cases += 1;
    if h.dp.config().unwrap().flags & CONFIG_CT_LRU_ALL != 0 {
        h.failures
            .push("upgrade: settling left CONFIG_CT_LRU_ALL".into());
    }
    h.case(
        "upgrade: settled, found through its bucket's mark",
        "a",
        Hook::Egress,
        &fwd,
        OK,
        ALLOW_ESTABLISHED,
    );
    h.case(
        "upgrade: settled, and its replies",
        "a",
        Hook::Ingress,
        &ipv4(A4, WORLD4, PROTO_TCP, &tcp(8001, 46500)),
        OK,
        ALLOW_REPLY,
    );
    // Never recorded twice: still in CONNTRACK_V4 only.
    h.cases += 1;
    let in_table =
        h.dp.conntrack
            .flow_table()
            .unwrap()
            .get(&k4, enforcer::datapath::flows::now_ns())
            .unwrap();
    if in_table.is_some() || lru.get(&k4, 0).is_err() {
        h.failures.push(format!(
            "upgrade: the flow is in FLOWS_V4 ({in_table:?}) or gone from CONNTRACK_V4"
        ));
    }
    h.dp.conntrack.remove(&flow.0).unwrap();
    drop(std::mem::replace(&mut h.dp, old));
}

/// The agent counts conntrack in batches (on a thread of its own): the batched count must equal
/// a walk of the keys, across several batches of both maps.
fn batched_conntrack_count_equals_a_walk(h: &mut Harness, pin: &Path) {
    let open = |name: &str| {
        let path = pin.join(format!("v{SCHEMA_VERSION}/maps/{name}"));
        aya::maps::MapData::from_pin(&path).unwrap_or_else(|e| panic!("pinned {name}: {e}"))
    };
    let mut v4 = aya::maps::HashMap::<_, CtKeyV4, CtValue>::try_from(aya::maps::Map::LruHashMap(
        open(MAP_CONNTRACK_V4),
    ))
    .expect("CONNTRACK_V4 is an LRU hash");
    let mut v6 = aya::maps::HashMap::<_, CtKey, CtValue>::try_from(aya::maps::Map::LruHashMap(
        open(MAP_CONNTRACK_V6),
    ))
    .expect("CONNTRACK_V6 is an LRU hash");
    let counter =
        h.dp.conntrack
            .counter()
            .expect("second descriptors of conntrack");
    let walked = |h: &Harness| {
        let all = h.dp.conntrack.entries().unwrap();
        let n4 = all.iter().filter(|(k, _)| k.family == FAMILY_V4).count();
        (n4, all.len() - n4)
    };
    let before = walked(h);
    // More than two batches (4096 entries each) of IPv4 flows, one and a bit of IPv6 flows.
    let (add4, add6) = (9_000usize, 4_500usize);
    let value = CtValue::default();
    for i in 0..add4 {
        let k = CtKeyV4 {
            endpoint: 900,
            protocol: PROTO_UDP,
            _pad: [0; 3],
            addr_a: [10, 99, (i >> 8) as u8, i as u8],
            addr_b: [10, 98, 0, 1],
            port_a: 1000 + i as u16,
            port_b: 53,
        };
        v4.insert(k, value, 0).unwrap();
    }
    for i in 0..add6 {
        let mut a = [0u8; 16];
        a[0] = 0xfd;
        a[14] = (i >> 8) as u8;
        a[15] = i as u8;
        let k = CtKey {
            endpoint: 900,
            family: FAMILY_V6,
            protocol: PROTO_UDP,
            _pad: 0,
            addr_a: a,
            addr_b: [0xfd; 16],
            port_a: 1000 + i as u16,
            port_b: 53,
        };
        v6.insert(k, value, 0).unwrap();
    }
    let want = (before.0 + add4, before.1 + add6);
    let by_family = |c: CtCount| (c.flows + c.v4, c.v6);
    let batched = by_family(counter.count().expect("BPF_MAP_LOOKUP_BATCH on conntrack"));
    let by_family = by_family(h.dp.conntrack.count_by_map().unwrap());
    let walk = walked(h);
    h.cases += 1;
    if batched != want || by_family != want || walk != want {
        h.failures.push(format!(
            "conntrack count: batched {batched:?}, count_by_family {by_family:?}, walk {walk:?}, want {want:?}"
        ));
    }
    // A counter works from another thread (the agent's counting thread).
    let from_thread = std::thread::spawn(move || counter.count().unwrap())
        .join()
        .unwrap();
    let from_thread = (from_thread.flows + from_thread.v4, from_thread.v6);
    if from_thread != want {
        h.failures.push(format!(
            "conntrack count from another thread: {from_thread:?}, want {want:?}"
        ));
    }
    v4.keys()
        .filter_map(Result::ok)
        .filter(|k| k.endpoint == 900)
        .collect::<Vec<_>>()
        .into_iter()
        .for_each(|k| v4.remove(&k).unwrap());
    v6.keys()
        .filter_map(Result::ok)
        .filter(|k| k.endpoint == 900)
        .collect::<Vec<_>>()
        .into_iter()
        .for_each(|k| v6.remove(&k).unwrap());
    if walked(h) != before {
        h.failures
            .push("conntrack: the added flows were not removed".into());
    }
}

// ---------------------------------------------------------------------------------------------
// The harness: one test per case group. Loading the programs costs seconds (the verifier), so
// the groups share one load: a thread in a private network namespace with a private bpffs holds
// it and runs the groups one at a time, each from the baseline (`reset`). The two tests that
// pin maps of their own before the load get their own (`in_private_netns`).

type Group = fn(&mut Harness, &Path);
/// (cases run, failures) of a group, or its panic.
type Reply = std::result::Result<(usize, Vec<String>), String>;

struct Shared {
    jobs: Option<mpsc::Sender<(Group, mpsc::Sender<Reply>)>>,
    thread: Option<JoinHandle<()>>,
    /// Why the thread ended early (it panicked setting up or tearing down).
    died: Option<String>,
}

static SHARED: Mutex<Option<Shared>> = Mutex::new(None);
/// Cases run by the tests of this process, for the closing line.
static CASES_RUN: AtomicUsize = AtomicUsize::new(0);

impl Shared {
    fn start() -> Self {
        let (tx, rx) = mpsc::channel::<(Group, mpsc::Sender<Reply>)>();
        let thread = std::thread::Builder::new()
            .name("shared-datapath".into())
            .spawn(move || {
                let mount = private_netns_and_bpffs("shared");
                let pin = mount.0.join("enforcer");
                let mut h = setup(&pin);
                for (group, reply) in rx {
                    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
                        reset(&mut h);
                        group(&mut h, &pin);
                    }));
                    let _ = reply.send(match outcome {
                        Ok(()) => Ok((h.cases, std::mem::take(&mut h.failures))),
                        Err(p) => Err(panic_text(&*p)),
                    });
                }
                drop(h);
                Datapath::cleanup(&pin).unwrap();
                assert!(!pin.exists(), "cleanup left {}", pin.display());
                drop(mount);
            })
            .expect("spawning the datapath thread");
        Self {
            jobs: Some(tx),
            thread: Some(thread),
            died: None,
        }
    }

    fn run(&mut self, group: Group) -> Option<Reply> {
        let (tx, rx) = mpsc::channel();
        self.jobs.as_ref()?.send((group, tx)).ok()?;
        rx.recv().ok()
    }

    /// Waits for the thread to end (it does once `jobs` is dropped, or has already): its panic.
    fn join(&mut self) -> Option<String> {
        self.jobs = None;
        if let Some(t) = self.thread.take()
            && let Err(p) = t.join()
        {
            self.died = Some(panic_text(&*p));
        }
        self.died.clone()
    }
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a panic".into())
}

/// Moves the calling thread into a new network namespace (it goes away with the thread, and the
/// links made in it with it) and mounts a private bpffs, unmounted when the result drops.
fn private_netns_and_bpffs(tag: &str) -> BpfMount {
    // SAFETY: unshare on the calling thread (and the `ip` it spawns).
    assert_eq!(
        unsafe { libc::unshare(libc::CLONE_NEWNET) },
        0,
        "unshare(CLONE_NEWNET): run as root"
    );
    BpfMount::new(tag)
}

/// A test's outcome from its cases.
fn verdict(cases: usize, failures: Vec<String>) -> Result<(), Failed> {
    CASES_RUN.fetch_add(cases, Ordering::Relaxed);
    if !failures.is_empty() {
        return Err(format!(
            "{} of {cases} cases failed:\n{}",
            failures.len(),
            failures.join("\n")
        )
        .into());
    }
    if cases == 0 {
        return Err("no case ran".into());
    }
    Ok(())
}

/// Runs a case group on the shared datapath, loading it first if no group has yet.
fn on_shared(group: Group) -> Result<(), Failed> {
    let mut shared = SHARED.lock().unwrap_or_else(PoisonError::into_inner);
    let shared = shared.get_or_insert_with(Shared::start);
    match shared.run(group) {
        Some(Ok((cases, failures))) => verdict(cases, failures),
        Some(Err(panic)) => Err(format!("panicked: {panic}").into()),
        None => Err(format!(
            "the shared datapath is gone: {}",
            shared.join().unwrap_or_default()
        )
        .into()),
    }
}

/// Runs `body` on a harness of its own, in a private network namespace with a private bpffs
/// (both go away with the thread, as the links in it do), after `prepare` saw the pin folder;
/// cleans the pins up. Returns the number of cases and the failed ones.
fn in_private_netns(
    tag: &'static str,
    prepare: impl FnOnce(&Path) + Send + 'static,
    body: impl FnOnce(&mut Harness, &Path) + Send + 'static,
) -> (usize, Vec<String>) {
    let handle = std::thread::spawn(move || {
        let mount = private_netns_and_bpffs(tag);
        let pin = mount.0.join("enforcer");
        prepare(&pin);
        let mut h = setup(&pin);
        body(&mut h, &pin);
        let result = (h.cases, std::mem::take(&mut h.failures));
        drop(h);
        Datapath::cleanup(&pin).unwrap();
        assert!(!pin.exists(), "cleanup left {}", pin.display());
        drop(mount);
        result
    });
    handle
        .join()
        .unwrap_or_else(|p| panic!("{}", panic_text(&*p)))
}

/// The agent reads the counters in batches; they must equal a slot-by-slot read.
fn batched_counter_read_equals_a_slot_by_slot_read(h: &mut Harness) {
    // Cases that move counters of several endpoints, directions and reasons.
    spoofed_sources_are_dropped(h);
    host_and_self_traffic_is_allowed_and_never_tracked(h);
    tcp_v4_flows_follow_policy_and_conntrack(h);
    let batched =
        h.dp.counters
            .read_batched()
            .expect("BPF_MAP_LOOKUP_BATCH on COUNTERS");
    let each = h.dp.counters.read_each().unwrap();
    h.cases += 1;
    if batched.len() != each.len() || batched != each {
        h.failures
            .push("batched counter read differs from a slot-by-slot read".into());
    }
    let moved = each.iter().filter(|c| c.packets > 0).count();
    if moved <= 5 {
        h.failures.push(format!(
            "the cases moved {moved} counters, want more than 5"
        ));
    }
}

/// A frame with a VLAN tag: dropped in both directions whatever it carries (the kernel may
/// untag it after the programs judged it, and deliver the packet inside).
fn vlan_tagged_frames_are_dropped_whatever_they_carry(h: &mut Harness) {
    let (i, e) = (Hook::Egress, Hook::Ingress);
    let inside = strip_eth(&ipv4(A4, B4, PROTO_TCP, &tcp(43000, 5432)));
    for (name, tpid) in [
        ("802.1Q", 0x8100u16),
        ("802.1ad", 0x88a8),
        ("QinQ 0x9100", 0x9100),
    ] {
        let mut tagged = vec![0x00, 0x00, 0x08, 0x00];
        tagged.extend_from_slice(&inside);
        h.case(
            &format!("{name} tag on an allowed flow's packet from a pod"),
            "a",
            e,
            &eth(tpid, &tagged),
            SHOT,
            DROP_VLAN,
        );
    }
    let mut double = vec![0x00, 0x00, 0x81, 0x00, 0x00, 0x00, 0x08, 0x00];
    double.extend_from_slice(&inside);
    h.case(
        "two VLAN-0 tags from a pod",
        "a",
        e,
        &eth(0x8100, &double),
        SHOT,
        DROP_VLAN,
    );
    let mut to_pod = vec![0x00, 0x00, 0x08, 0x00];
    to_pod.extend_from_slice(&strip_eth(&ipv4(B4, A4, PROTO_TCP, &tcp(1000, 80))));
    h.case(
        "a tagged frame to a pod",
        "a",
        i,
        &eth(0x8100, &to_pod),
        SHOT,
        DROP_VLAN,
    );
}

/// From a pod only IP and ARP for its own address leave; other ethertypes are dropped as
/// `non-ip-denied`. A pod may receive them.
fn a_pod_sends_only_ip_and_arp_for_its_own_address(h: &mut Harness) {
    let (i, e) = (Hook::Egress, Hook::Ingress);
    let lldp = eth(0x88cc, &[0; 46]);
    h.case(
        "another ethertype from a pod",
        "a",
        e,
        &lldp,
        SHOT,
        DROP_NON_IP,
    );
    h.case(
        "another ethertype to a pod",
        "a",
        i,
        &lldp,
        OK,
        ALLOW_NON_IP,
    );
    h.case(
        "arp for the pod's own address",
        "a",
        e,
        &arp(),
        OK,
        ALLOW_NON_IP,
    );
    let mut claim = vec![0, 1, 8, 0, 6, 4, 0, 2];
    claim.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    claim.extend_from_slice(&B4.octets());
    claim.extend_from_slice(&[0; 6]);
    claim.extend_from_slice(&HOST4.octets());
    h.case(
        "arp reply claiming another pod's address",
        "a",
        e,
        &eth(ETH_ARP, &claim),
        SHOT,
        DROP_SPOOFED,
    );
    h.case(
        "arp claiming another address, to the pod",
        "a",
        i,
        &eth(ETH_ARP, &claim),
        OK,
        ALLOW_NON_IP,
    );
    let mut short = vec![0, 1, 8, 0, 6, 4, 0, 1];
    short.extend_from_slice(&[0x02, 0, 0, 0]);
    h.case(
        "truncated arp from a pod",
        "a",
        e,
        &eth(ETH_ARP, &short),
        SHOT,
        DROP_MALFORMED,
    );
}

/// Neighbour discovery and MLD pass as `non-ip` only while they stay on the link; shaped like
/// them but addressed off the link, they are judged as the IPv6 packets they are.
fn neighbour_discovery_passes_only_on_the_link(h: &mut Harness) {
    let (i, e) = (Hook::Egress, Hook::Ingress);
    let solicited: Ipv6Addr = "ff02::1:ff00:2".parse().unwrap();
    let ns = |src: Ipv6Addr, dst: Ipv6Addr| ipv6(src, dst, 58, &icmp_error(135, 0, &[0; 16]));
    h.case(
        "ns link-local to solicited-node",
        "a",
        e,
        &ns(LINK_LOCAL6, solicited),
        OK,
        ALLOW_NON_IP,
    );
    h.case(
        "dad ns from the unspecified address",
        "a",
        e,
        &ns(Ipv6Addr::UNSPECIFIED, solicited),
        OK,
        ALLOW_NON_IP,
    );
    h.case(
        "na from the pod's own address to link-local",
        "a",
        e,
        &ipv6(A6, LINK_LOCAL6, 58, &icmp_error(136, 0, &[0; 16])),
        OK,
        ALLOW_NON_IP,
    );
    h.case(
        "unreachability probe from the node's link-local to the pod",
        "a",
        i,
        &ns(LINK_LOCAL6, A6),
        OK,
        ALLOW_NON_IP,
    );
    // Off the link: a link-local source may not leave for a global address (anti-spoofing),
    // another global source is spoofed, and one from the world meets the pod's policy.
    h.case(
        "ns link-local to a global address",
        "a",
        e,
        &ns(LINK_LOCAL6, B6),
        SHOT,
        DROP_SPOOFED,
    );
    h.case(
        "ns from another global address",
        "a",
        e,
        &ns("fd00::77".parse().unwrap(), solicited),
        SHOT,
        DROP_SPOOFED,
    );
    h.case(
        "ns from the world to the pod",
        "a",
        i,
        &ns("2001:db8:99::1".parse().unwrap(), A6),
        SHOT,
        DROP_POLICY,
    );
    h.case(
        "ns into the pod from its own address",
        "a",
        i,
        &ns(A6, solicited),
        SHOT,
        DROP_SPOOFED,
    );
}

/// An ICMP error is `related` only between the ends of the flow it names: naming a tracked flow
/// inside does not carry it to another host, nor in from one to the wrong address.
fn icmp_errors_are_related_only_between_the_flows_ends(h: &mut Harness) {
    let (i, e) = (Hook::Egress, Hook::Ingress);
    h.case(
        "tcp out allowed",
        "a",
        e,
        &ipv4(A4, B4, PROTO_TCP, &tcp(44000, 5432)),
        OK,
        ALLOW_POLICY,
    );
    // What the pod received of that flow, reported back by the pod.
    let reply = strip_eth(&ipv4(B4, A4, PROTO_TCP, &tcp(5432, 44000)));
    h.case(
        "the pod's error about the flow, to its peer",
        "a",
        e,
        &ipv4(A4, B4, 1, &icmp_error(3, 3, &reply)),
        OK,
        ALLOW_RELATED,
    );
    h.case(
        "the pod's error about the flow, to another host",
        "a",
        e,
        &ipv4(A4, WORLD4, 1, &icmp_error(3, 3, &reply)),
        SHOT,
        DROP_POLICY,
    );
    let sent = strip_eth(&ipv4(A4, B4, PROTO_TCP, &tcp(44000, 5432)));
    h.case(
        "a router's error about what the pod sent",
        "a",
        i,
        &ipv4(WORLD4, A4, 1, &icmp_error(11, 0, &sent)),
        OK,
        ALLOW_RELATED,
    );
    h.case(
        "an error naming the flow backwards, from the world",
        "a",
        i,
        &ipv4(WORLD4, A4, 1, &icmp_error(3, 3, &reply)),
        SHOT,
        DROP_POLICY,
    );
}

/// An ICMP error is `related` only by an L4 header it really quotes, under its own family's
/// ICMP: a quoted later fragment has no L4 header (its bytes there are payload), the quote ends
/// with the error's IP packet (not the frame's bytes after it), and protocol 58 in IPv4 or 1 in
/// IPv6 is no ICMP at all. Each such error is judged as its own packet (denied here); the same
/// error quoting the flow properly passes as `related`.
fn icmp_errors_are_related_only_by_a_real_quote_of_their_family(h: &mut Harness) {
    let (i, e) = (Hook::Egress, Hook::Ingress);
    // A quoted later fragment whose payload reads like the flow's UDP header.
    h.case(
        "udp in allowed",
        "a",
        i,
        &ipv4(B4, A4, PROTO_UDP, &udp(40000, 53, b"query")),
        OK,
        ALLOW_POLICY,
    );
    let quoted = |o: V4| strip_eth(&ipv4_with(B4, A4, PROTO_UDP, &udp(40000, 53, b"x"), o));
    let later = quoted(V4 {
        frag_offset: 0x80,
        ..V4::default()
    });
    h.case(
        "an error quoting a later fragment",
        "a",
        e,
        &ipv4(A4, B4, 1, &icmp_error(3, 2, &later)),
        SHOT,
        DROP_POLICY,
    );
    let first = quoted(V4 {
        more_fragments: true,
        ..V4::default()
    });
    h.case(
        "an error quoting the first fragment",
        "a",
        e,
        &ipv4(A4, B4, 1, &icmp_error(3, 2, &first)),
        OK,
        ALLOW_RELATED,
    );
    // The quoted L4 header in the frame's bytes past the IP total length / payload length.
    h.case(
        "udp out allowed",
        "a",
        e,
        &ipv4(A4, CIDR_IN4, PROTO_UDP, &udp(5000, 123, b"ntp")),
        OK,
        ALLOW_POLICY,
    );
    let err = icmp_error(
        3,
        3,
        &strip_eth(&ipv4(A4, CIDR_IN4, PROTO_UDP, &udp(5000, 123, b"ntp"))),
    );
    let cut = V4 {
        total_len: Some(20 + 8 + 20),
        ..V4::default()
    };
    h.case(
        "an error whose quote ends before the ports",
        "a",
        i,
        &ipv4_with(CIDR_IN4, A4, 1, &err, cut),
        SHOT,
        DROP_POLICY,
    );
    h.case(
        "the whole error",
        "a",
        i,
        &ipv4(CIDR_IN4, A4, 1, &err),
        OK,
        ALLOW_RELATED,
    );
    h.case(
        "tcp v6 out allowed",
        "a",
        e,
        &ipv6(A6, B6, PROTO_TCP, &tcp(42500, 5432)),
        OK,
        ALLOW_POLICY,
    );
    let err6 = icmp_error(
        1,
        4,
        &strip_eth(&ipv6(A6, B6, PROTO_TCP, &tcp(42500, 5432))),
    );
    h.case(
        "an icmpv6 error whose quote ends before the ports",
        "a",
        i,
        &ipv6_with(B6, A6, 58, &err6, Some(8 + 40)),
        SHOT,
        DROP_POLICY,
    );
    h.case(
        "the whole icmpv6 error",
        "a",
        i,
        &ipv6(B6, A6, 58, &err6),
        OK,
        ALLOW_RELATED,
    );
    // The other family's ICMP protocol number.
    h.case(
        "tcp in allowed",
        "a",
        i,
        &ipv4(B4, A4, PROTO_TCP, &tcp(40001, 80)),
        OK,
        ALLOW_POLICY,
    );
    let syn = strip_eth(&ipv4(B4, A4, PROTO_TCP, &tcp(40001, 80)));
    h.case(
        "an icmpv6 error in ipv4",
        "a",
        e,
        &ipv4(A4, B4, 58, &icmp_error(1, 4, &syn)),
        SHOT,
        DROP_POLICY,
    );
    h.case(
        "the icmp error",
        "a",
        e,
        &ipv4(A4, B4, 1, &icmp_error(3, 3, &syn)),
        OK,
        ALLOW_RELATED,
    );
    h.case(
        "tcp v6 in allowed",
        "a",
        i,
        &ipv6(B6, A6, PROTO_TCP, &tcp(40002, 80)),
        OK,
        ALLOW_POLICY,
    );
    let syn6 = strip_eth(&ipv6(B6, A6, PROTO_TCP, &tcp(40002, 80)));
    h.case(
        "an icmp error in ipv6",
        "a",
        e,
        &ipv6(A6, B6, 1, &icmp_error(3, 3, &syn6)),
        SHOT,
        DROP_POLICY,
    );
    h.case(
        "the icmpv6 error",
        "a",
        e,
        &ipv6(A6, B6, 58, &icmp_error(1, 4, &syn6)),
        OK,
        ALLOW_RELATED,
    );
}

/// Nothing reaches a pod from the pod's own address: only a forger sends that.
fn packets_for_a_pod_from_its_own_address_are_spoofed(h: &mut Harness) {
    let i = Hook::Egress;
    h.case(
        "v4 from the pod's own address",
        "a",
        i,
        &ipv4(A4, A4, PROTO_TCP, &tcp(1000, 80)),
        SHOT,
        DROP_SPOOFED,
    );
    h.case(
        "v6 from the pod's own address",
        "a",
        i,
        &ipv6(A6, A6, PROTO_TCP, &tcp(1000, 80)),
        SHOT,
        DROP_SPOOFED,
    );
    h.case(
        "to a not-isolated pod from its own address",
        "b",
        i,
        &ipv4(B4, B4, PROTO_UDP, &udp(1, 2, b"x")),
        SHOT,
        DROP_SPOOFED,
    );
}

/// Every test of this file: they load BPF programs, so they need root and are ignored unless
/// asked for (`--include-ignored`, as `cargo xtask test` does).
fn trials() -> Vec<Trial> {
    use enforcer::datapath::slots::SLOTS_SUPPORTED;
    let shared = |name: &'static str, group: Group| Trial::test(name, move || on_shared(group));
    // Slots and the flow table exist on x86-64 only.
    let with_slots = |t: Trial| {
        if SLOTS_SUPPORTED {
            t
        } else {
            let name = t.name().to_string();
            Trial::ignorable_test(name, || {
                Ok(Completion::ignored_with("no slots on this architecture"))
            })
        }
    };
    // A group named after the function that runs it on the shared harness.
    macro_rules! group {
        ($f:ident) => {
            shared(stringify!($f), |h, _| $f(h))
        };
    }
    let mut trials = vec![
        group!(arp_link_scoped_neighbour_discovery_pass_and_unprogrammed_interfaces_drop),
        group!(spoofed_sources_are_dropped),
        group!(vlan_tagged_frames_are_dropped_whatever_they_carry),
        group!(a_pod_sends_only_ip_and_arp_for_its_own_address),
        group!(neighbour_discovery_passes_only_on_the_link),
        group!(icmp_errors_are_related_only_between_the_flows_ends),
        group!(icmp_errors_are_related_only_by_a_real_quote_of_their_family),
        group!(packets_for_a_pod_from_its_own_address_are_spoofed),
        group!(host_and_self_traffic_is_allowed_and_never_tracked),
        group!(tcp_v4_flows_follow_policy_and_conntrack),
        group!(udp_v4_flows_follow_policy_and_conntrack),
        group!(sctp_flows_follow_policy_and_conntrack),
        group!(end_port_ranges_cover_exactly_their_ports),
        group!(ip_blocks_allow_their_cidr_but_not_its_except),
        group!(tcp_v6_flows_follow_policy_and_conntrack),
        group!(conntrack_keys_are_laid_out_as_the_agent_builds_them),
        group!(icmp_echo_needs_an_any_protocol_rule_and_its_reply_passes),
        group!(icmp_errors_pass_only_for_tracked_flows),
        group!(not_isolated_directions_pass_and_track_flows),
        group!(fragments_follow_the_verdict_of_their_first_fragment),
        group!(ipv6_extension_header_chains_are_walked_up_to_eight),
        group!(malformed_and_truncated_packets_are_dropped),
        group!(epoch_bump_revokes_flows_the_policy_no_longer_allows),
        group!(removing_an_endpoint_forgets_its_flows_only),
        with_slots(group!(
            a_stale_slot_is_read_but_not_a_half_written_or_foreign_one
        )),
        with_slots(group!(new_flows_are_judged_from_the_slots_policy_keys)),
        with_slots(group!(
            an_endpoint_sharing_a_slot_is_judged_through_endpoints
        )),
        group!(peer_cache_ways_mirror_peers_v4),
        group!(idle_flows_time_out_and_are_judged_anew),
        group!(tcp_flows_age_by_their_state),
        group!(an_endpoint_at_its_flow_limit_opens_no_new_flow),
        group!(service_flows_are_judged_after_the_translation),
        with_slots(Trial::test(
            "a_flow_table_from_an_older_build_keeps_its_unkeyed_hash",
            || {
                let (cases, failures) = a_flow_table_from_an_older_build_keeps_its_unkeyed_hash();
                verdict(cases, failures)
            },
        )),
        group!(verdict_events_report_drops_and_only_logged_allows),
        group!(audit_only_directions_allow_and_report_would_drop),
        group!(a_deny_entry_drops_a_new_flow_and_names_its_rule),
        group!(a_deny_entry_for_the_peers_identity_beats_the_any_allow),
        group!(an_established_flow_is_revoked_when_a_deny_entry_replaces_its_allow),
        group!(a_service_flow_to_a_denied_backend_is_dropped_by_the_judge),
        group!(egress_to_the_node_is_judged_when_the_endpoint_says_so),
        group!(egress_to_the_node_is_allowed_without_the_host_judged_flag),
        group!(ingress_from_the_node_stays_allowed_with_the_host_judged_flag),
        group!(a_host_judged_endpoint_without_entries_fails_closed),
        group!(a_deny_entry_in_an_audit_only_direction_is_a_would_drop),
        shared(
            "a_restart_reuses_pinned_maps_and_moves_legacy_ipv4_flows",
            a_restart_reuses_pinned_maps_and_moves_legacy_ipv4_flows,
        ),
        with_slots(shared(
            "an_upgrade_keeps_flows_left_in_conntrack_v4",
            an_upgrade_keeps_flows_left_in_conntrack_v4,
        )),
        shared(
            "batched_conntrack_count_equals_a_walk",
            batched_conntrack_count_equals_a_walk,
        ),
        group!(batched_counter_read_equals_a_slot_by_slot_read),
        Trial::test(
            "a_full_conntrack_refuses_new_flows_and_keeps_tracked_ones",
            || {
                let (cases, failures) = a_full_conntrack_refuses_new_flows_and_keeps_tracked_ones();
                verdict(cases, failures)
            },
        ),
        with_slots(Trial::test(
            "concurrent_writers_of_one_bucket_lose_and_duplicate_nothing",
            || {
                let (cases, failures) =
                    concurrent_writers_of_one_bucket_lose_and_duplicate_nothing();
                verdict(cases, failures)
            },
        )),
    ];
    trials = trials
        .into_iter()
        .map(|t| t.with_ignored_flag(true))
        .collect();
    trials
}

impl Harness {
    /// Runs `frame`, carrying `mark`, through `hook` of `iface`; checks the action and exactly
    /// the counters `want` moved ((endpoint, direction, reason) each). Returns the mark the
    /// programs left.
    fn marked(
        &mut self,
        name: &str,
        iface: &str,
        hook: Hook,
        frame: &[u8],
        mark: u32,
        want_act: i32,
        want: &[(u32, u8, u8)],
    ) -> u32 {
        self.cases += 1;
        let before = self.dp.counters.read().unwrap();
        let (act, out) = match self.dp.test_run_marked(hook, self.ifs[iface], frame, mark) {
            Ok(r) => r,
            Err(err) => {
                self.failures.push(format!("{name}: {err:#}"));
                return 0;
            }
        };
        let after = self.dp.counters.read().unwrap();
        let mut moved: Vec<(u32, u8, u8)> = after
            .iter()
            .filter(|(k, v)| before.get(k).map_or(0, |b| b.packets) != v.packets)
            .map(|(k, _)| *k)
            .collect();
        moved.sort_unstable();
        let mut want = want.to_vec();
        want.sort_unstable();
        if act != want_act || moved != want {
            let names = |l: &[(u32, u8, u8)]| -> Vec<String> {
                l.iter()
                    .map(|(e, d, r)| format!("ep{e}/dir{d}/{}", REASON_NAMES[*r as usize]))
                    .collect()
            };
            self.failures.push(format!(
                "{name}: action {act} (want {want_act}), counters moved {:?} (want {:?})",
                names(&moved),
                names(&want)
            ));
        }
        out
    }
}

const VIP4: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// The mark bits that carry a deferred packet's slot.
const SLOT_BITS: u32 = enforcer_common::SERVICE_MARK_MASK;
/// TC_ACT_UNSPEC: the exit program leaves the packet to the hook's next program.
const NEXT: i32 = -1;

/// A new flow of an egress-isolated pod to a Service frontend (or a node port) is deferred with
/// its slot in the mark, and judged on the backend the translation chose: by `to_pod`'s judge
/// for a backend on the node, by the exit program for one elsewhere. Replies come back from the
/// frontend; a denied backend revokes the flow; a slot that does not describe the packet drops
/// it; hairpin and the node are allowed; a policy change re-judges a reply on its backend.
fn service_flows_are_judged_after_the_translation(h: &mut Harness) {
    let (i, e) = (Hook::Egress, Hook::Ingress);
    let service = PeerInfo {
        identity: enforcer_common::IDENTITY_SERVICE,
        flags: 0,
    };
    h.dp.peers_v4.set(&VIP4, &service).unwrap();
    let syn = |s, d| tcp_flags(s, d, TCP_SYN);
    let (eg, ing) = (DIR_EGRESS, DIR_INGRESS);

    // Allowed backend: B on TCP 5432 (rule 20).
    let m = h.marked(
        "to a ClusterIP: deferred",
        "a",
        e,
        &ipv4(A4, VIP4, PROTO_TCP, &syn(40000, 80)),
        0,
        OK,
        &[(EP_A, eg, ALLOW_SERVICE)],
    );
    if m & SLOT_BITS == 0 {
        h.failures
            .push(format!("deferred packet without a slot: mark {m:#x}"));
    }
    let out = h.marked(
        "translated to an allowed backend: judged, then the backend's ingress",
        "b",
        i,
        &ipv4(A4, B4, PROTO_TCP, &syn(40000, 5432)),
        m,
        OK,
        &[(EP_A, eg, ALLOW_POLICY), (EP_B, ing, ALLOW_NOT_ISOLATED)],
    );
    if out & SLOT_BITS != 0 {
        h.failures
            .push(format!("the judge left the slot in the mark: {out:#x}"));
    }
    h.marked(
        "the backend's reply (B is isolated in no direction)",
        "b",
        e,
        &ipv4(
            B4,
            A4,
            PROTO_TCP,
            &tcp_flags(5432, 40000, TCP_SYN | TCP_ACK),
        ),
        0,
        OK,
        &[(EP_B, eg, ALLOW_NOT_ISOLATED)],
    );
    h.marked(
        "the reply, un-NATed, from the frontend",
        "a",
        i,
        &ipv4(
            VIP4,
            A4,
            PROTO_TCP,
            &tcp_flags(80, 40000, TCP_SYN | TCP_ACK),
        ),
        0,
        OK,
        &[(EP_A, ing, ALLOW_REPLY)],
    );
    let m = h.marked(
        "the judged flow's next packet is not deferred",
        "a",
        e,
        &ipv4(A4, VIP4, PROTO_TCP, &tcp_flags(40000, 80, TCP_ACK)),
        0,
        OK,
        &[(EP_A, eg, ALLOW_ESTABLISHED)],
    );
    if m != 0 {
        h.failures
            .push(format!("an established packet got mark {m:#x}"));
    }

    // Denied backend: C (no rule for it).
    let m = h.marked(
        "to the ClusterIP again: deferred",
        "a",
        e,
        &ipv4(A4, VIP4, PROTO_TCP, &syn(40001, 80)),
        0,
        OK,
        &[(EP_A, eg, ALLOW_SERVICE)],
    );
    h.marked(
        "translated to a backend the policy does not allow",
        "c",
        i,
        &ipv4(A4, C4, PROTO_TCP, &syn(40001, 80)),
        m,
        SHOT,
        &[(EP_A, eg, DROP_POLICY)],
    );
    h.marked(
        "the denied flow's retransmission",
        "a",
        e,
        &ipv4(A4, VIP4, PROTO_TCP, &syn(40001, 80)),
        0,
        SHOT,
        &[(EP_A, eg, DROP_REVOKED)],
    );

    // A slot that does not describe the packet (another source port).
    let m = h.marked(
        "deferred",
        "a",
        e,
        &ipv4(A4, VIP4, PROTO_TCP, &syn(40002, 80)),
        0,
        OK,
        &[(EP_A, eg, ALLOW_SERVICE)],
    );
    h.marked(
        "a packet whose slot describes another packet",
        "b",
        i,
        &ipv4(A4, B4, PROTO_TCP, &syn(49999, 5432)),
        m,
        SHOT,
        &[(0, eg, DROP_UNRESOLVED)],
    );

    // Hairpin: the Service picked A itself; kube-proxy masquerades it to a node address.
    let m = h.marked(
        "to its own Service: deferred",
        "a",
        e,
        &ipv4(A4, VIP4, PROTO_TCP, &syn(40003, 80)),
        0,
        OK,
        &[(EP_A, eg, ALLOW_SERVICE)],
    );
    h.marked(
        "hairpin, masqueraded: the pod itself is allowed",
        "a",
        i,
        &ipv4(HOST4, A4, PROTO_TCP, &syn(40003, 80)),
        m,
        OK,
        &[(EP_A, eg, ALLOW_HOST), (EP_A, ing, ALLOW_HOST)],
    );

    // A backend on another node: judged by the exit program on the way out.
    let m = h.marked(
        "deferred",
        "a",
        e,
        &ipv4(A4, VIP4, PROTO_TCP, &syn(40005, 80)),
        0,
        OK,
        &[(EP_A, eg, ALLOW_SERVICE)],
    );
    h.marked(
        "leaving the node to an allowed remote backend",
        "u",
        Hook::Exit,
        &ipv4(A4, P9_4, PROTO_TCP, &syn(40005, 80)),
        m,
        NEXT,
        &[(EP_A, eg, ALLOW_POLICY)],
    );
    h.marked(
        "any other packet through the exit program",
        "u",
        Hook::Exit,
        &ipv4(B4, P9_4, PROTO_TCP, &syn(40006, 80)),
        0,
        NEXT,
        &[],
    );

    // Node ports: only the Services' ports of a node address are deferred.
    h.dp.node_ports
        .set(
            &enforcer_common::NodePortKey {
                protocol: PROTO_TCP,
                _pad: 0,
                port: 30080,
            },
            &1,
        )
        .unwrap();
    h.marked(
        "to a node port: deferred",
        "a",
        e,
        &ipv4(A4, HOST4, PROTO_TCP, &syn(40007, 30080)),
        0,
        OK,
        &[(EP_A, eg, ALLOW_SERVICE)],
    );
    h.marked(
        "to another port of the node: the node",
        "a",
        e,
        &ipv4(A4, HOST4, PROTO_TCP, &syn(40007, 30081)),
        0,
        OK,
        &[(EP_A, eg, ALLOW_HOST)],
    );

    // A pod whose egress no policy isolates is never deferred.
    h.marked(
        "not egress-isolated: not deferred",
        "b",
        e,
        &ipv4(B4, VIP4, PROTO_TCP, &syn(40008, 80)),
        0,
        OK,
        &[(EP_B, eg, ALLOW_NOT_ISOLATED)],
    );

    // A policy change: B on 5432 no longer allowed. The judged flow's reply is re-checked on
    // its recorded backend.
    allow_none(&mut h.dp, EP_A, ID_B, DIR_EGRESS, PROTO_TCP, 5432, 16);
    h.set_epoch("a", 2);
    h.marked(
        "a reply after the policy no longer allows its backend",
        "a",
        i,
        &ipv4(VIP4, A4, PROTO_TCP, &tcp_flags(80, 40000, TCP_ACK)),
        0,
        SHOT,
        &[(EP_A, ing, DROP_REVOKED)],
    );
    h.dp.node_ports
        .remove(&enforcer_common::NodePortKey {
            protocol: PROTO_TCP,
            _pad: 0,
            port: 30080,
        })
        .unwrap();
}

/// A POLICY entry that denies (a cluster policy's `Deny`): `rule` with [`RULE_DENY`].
#[expect(clippy::too_many_arguments, reason = "one policy entry")]
fn deny(dp: &mut Datapath, ep: u32, id: u32, dir: u8, proto: u8, port: u16, len: u8, rule: u32) {
    allow(dp, ep, id, dir, proto, port, len, rule | RULE_DENY);
}

/// The node's IPv6 address (a peer of `IDENTITY_HOST`), for the groups that need it.
const HOST6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0xfe);

impl Harness {
    /// Runs `frame` as [`Harness::case`] expecting a drop as `rule-denied`, then checks that it
    /// sent exactly one event, of that reason, naming `rule` (without the deny bit).
    fn rule_denied(&mut self, name: &str, iface: &str, hook: Hook, frame: &[u8], rule: u32) {
        let _ = self.events().drain();
        self.case(name, iface, hook, frame, SHOT, DROP_DENY_RULE);
        let got = self.events().drain();
        if !(got.len() == 1 && got[0].reason == DROP_DENY_RULE && got[0].rule == rule) {
            self.failures.push(format!(
                "{name}: one rule-denied event naming rule {rule} expected, got {got:?}"
            ));
        }
    }

    /// [`Harness::case`] for each of `cases`: name, interface, hook, frame, action, reason.
    fn cases(&mut self, cases: &[(&str, &str, Hook, Vec<u8>, i32, u8)]) {
        for (name, iface, hook, frame, act, reason) in cases {
            self.case(name, iface, *hook, frame, *act, *reason);
        }
    }

    /// Sets `flags` on endpoint `iface` besides its own (a new epoch, as the agent writes it).
    fn add_flags(&mut self, iface: &str, flags: u32, epoch: u32) {
        let e = self.dp.endpoints.get(&self.ifs[iface]).unwrap().unwrap();
        self.set_flags_epoch(iface, e.flags | flags, epoch);
    }

    /// Fails when conntrack holds a flow of endpoint `ep`.
    fn no_flow_of(&mut self, ep: u32, what: &str) {
        let entries = self.dp.conntrack.entries().unwrap();
        if entries.into_iter().any(|(k, _)| k.endpoint == ep) {
            self.failures.push(format!("{what}: tracked"));
        }
    }
}

/// A new flow whose lookup finds a deny entry first is dropped as `rule-denied`, and its event
/// names the rule without the deny bit: in both directions, IPv6 (the full path) and IPv4 (the
/// fast path hands the denial to the full path, which reports it), a port entry and an
/// any-protocol one, untracked; a miss stays `policy-denied`.
fn a_deny_entry_drops_a_new_flow_and_names_its_rule(h: &mut Harness) {
    let (i, e) = (Hook::Egress, Hook::Ingress);
    deny(&mut h.dp, EP_A, ID_B, DIR_INGRESS, PROTO_TCP, 81, 16, 40);
    deny(&mut h.dp, EP_A, ID_B, DIR_EGRESS, PROTO_ANY, 0, 0, 41);
    let b_in = ipv4(B4, A4, PROTO_TCP, &tcp(40000, 81));
    h.rule_denied(
        "v6 in",
        "a",
        i,
        &ipv6(B6, A6, PROTO_TCP, &tcp(40000, 81)),
        40,
    );
    h.rule_denied("v4 in (fast path first)", "a", i, &b_in, 40);
    h.rule_denied("v4 in again: untracked", "a", i, &b_in, 40);
    let udp_out = ipv4(A4, B4, PROTO_UDP, &udp(40001, 53, b"q"));
    h.rule_denied("v4 out, any protocol", "a", e, &udp_out, 41);
    let echo_out = ipv4(A4, B4, 1, &echo(8, 79, 1));
    h.rule_denied("icmp out (full path only)", "a", e, &echo_out, 41);
    let miss = ipv4(B4, A4, PROTO_TCP, &tcp(40000, 82));
    h.case("no entry", "a", i, &miss, SHOT, DROP_POLICY);
    // With allowed flows logged the fast path leaves every new flow to the full path, which
    // then looks the policy up itself.
    let mut cfg = h.dp.config().unwrap();
    cfg.flags |= CONFIG_LOG_ALLOWED;
    h.dp.set_config(&cfg).unwrap();
    let b_in = ipv4(B4, A4, PROTO_TCP, &tcp(40002, 81));
    h.rule_denied("v4 in, allowed flows logged", "a", i, &b_in, 40);
}

/// The peer's identity is looked up before `IDENTITY_ANY`, whatever the entries say: a deny
/// entry for the peer beats an allow for any peer, and an allow for the peer beats a deny for
/// any peer (which still denies everyone else, naming its rule).
fn a_deny_entry_for_the_peers_identity_beats_the_any_allow(h: &mut Harness) {
    let i = Hook::Egress;
    // IDENTITY_ANY allows TCP 8000-8015 (rule 13); B is denied 8001.
    deny(&mut h.dp, EP_A, ID_B, DIR_INGRESS, PROTO_TCP, 8001, 16, 42);
    // B is allowed TCP 80 (rule 10); everyone else is denied it.
    deny(
        &mut h.dp,
        EP_A,
        IDENTITY_ANY,
        DIR_INGRESS,
        PROTO_TCP,
        80,
        16,
        43,
    );
    let b = ipv4(B4, A4, PROTO_TCP, &tcp(41000, 8001));
    h.rule_denied("identity deny over any allow", "a", i, &b, 42);
    let world = ipv4(WORLD4, A4, PROTO_TCP, &tcp(41002, 80));
    h.rule_denied("the any deny for another peer", "a", i, &world, 43);
    h.cases(&[
        (
            "the any allow for another peer",
            "a",
            i,
            ipv4(WORLD4, A4, PROTO_TCP, &tcp(41000, 8001)),
            OK,
            ALLOW_POLICY,
        ),
        (
            "identity allow over any deny",
            "a",
            i,
            ipv6(B6, A6, PROTO_TCP, &tcp(41001, 80)),
            OK,
            ALLOW_POLICY,
        ),
    ]);
}

/// An Admin Deny added while a flow is open cuts it: after the epoch moves, the re-check finds
/// the deny entry and revokes the flow in both directions, IPv4 and IPv6.
fn an_established_flow_is_revoked_when_a_deny_entry_replaces_its_allow(h: &mut Harness) {
    let (i, e) = (Hook::Egress, Hook::Ingress);
    let v4 = |s, d, f| ipv4(A4, B4, PROTO_TCP, &tcp_flags(s, d, f));
    let v4_reply = ipv4(B4, A4, PROTO_TCP, &tcp_flags(5432, 42000, TCP_ACK));
    let v6 = |f| ipv6(A6, B6, PROTO_TCP, &tcp_flags(42001, 5432, f));
    h.cases(&[
        (
            "v4 opens",
            "a",
            e,
            v4(42000, 5432, TCP_SYN),
            OK,
            ALLOW_POLICY,
        ),
        ("v6 opens", "a", e, v6(TCP_SYN), OK, ALLOW_POLICY),
        ("v4 reply", "a", i, v4_reply.clone(), OK, ALLOW_REPLY),
    ]);
    deny(&mut h.dp, EP_A, ID_B, DIR_EGRESS, PROTO_TCP, 5432, 16, 44);
    let ack = v4(42000, 5432, TCP_ACK);
    h.case(
        "same epoch: not re-checked",
        "a",
        e,
        &ack,
        OK,
        ALLOW_ESTABLISHED,
    );
    h.set_epoch("a", 2);
    h.cases(&[
        (
            "v4 reply after the deny",
            "a",
            i,
            v4_reply,
            SHOT,
            DROP_REVOKED,
        ),
        ("v4 after the deny", "a", e, ack, SHOT, DROP_REVOKED),
        ("v6 after the deny", "a", e, v6(TCP_ACK), SHOT, DROP_REVOKED),
    ]);
}

/// A Service flow whose backend a deny entry denies is dropped by the judge, named, and its
/// flow revoked; the same for a backend on the node when the pod's egress to the node is
/// judged (`EP_EGRESS_HOST_JUDGED`), which without the flag is allowed as the node.
fn a_service_flow_to_a_denied_backend_is_dropped_by_the_judge(h: &mut Harness) {
    let service = PeerInfo {
        identity: enforcer_common::IDENTITY_SERVICE,
        flags: 0,
    };
    h.dp.peers_v4.set(&VIP4, &service).unwrap();
    let eg = DIR_EGRESS;
    // B on TCP 5432 was allowed (rule 20): now denied. The node denied on 8443.
    deny(&mut h.dp, EP_A, ID_B, DIR_EGRESS, PROTO_TCP, 5432, 16, 45);
    deny(
        &mut h.dp,
        EP_A,
        IDENTITY_HOST,
        DIR_EGRESS,
        PROTO_TCP,
        8443,
        16,
        46,
    );
    // Deferred, then translated to `backend`:`port` and judged on `iface`/`hook`.
    let judged = |h: &mut Harness, sport: u16, to: (Ipv4Addr, u16, &str, Hook), want: (i32, u8)| {
        let syn = |d: Ipv4Addr, port| ipv4(A4, d, PROTO_TCP, &tcp_flags(sport, port, TCP_SYN));
        let m = h.marked(
            "deferred",
            "a",
            Hook::Ingress,
            &syn(VIP4, 80),
            0,
            OK,
            &[(EP_A, eg, ALLOW_SERVICE)],
        );
        let _ = h.events().drain();
        h.marked(
            "judged",
            to.2,
            to.3,
            &syn(to.0, to.1),
            m,
            want.0,
            &[(EP_A, eg, want.1)],
        );
        h.events().drain()
    };
    let got = judged(
        h,
        43000,
        (B4, 5432, "b", Hook::Egress),
        (SHOT, DROP_DENY_RULE),
    );
    if !(got.len() == 1 && got[0].reason == DROP_DENY_RULE && got[0].rule == 45) {
        h.failures
            .push(format!("denied backend: one event of rule 45, got {got:?}"));
    }
    let retransmission = ipv4(A4, VIP4, PROTO_TCP, &tcp_flags(43000, 80, TCP_SYN));
    h.case(
        "the denied flow's retransmission",
        "a",
        Hook::Ingress,
        &retransmission,
        SHOT,
        DROP_REVOKED,
    );
    // A backend with the node's identity, seen leaving the node.
    let node = (HOST4, 8443, "u", Hook::Exit);
    judged(h, 43001, node, (NEXT, ALLOW_HOST));
    h.add_flags("a", EP_EGRESS_HOST_JUDGED, 2);
    let got = judged(h, 43002, node, (SHOT, DROP_DENY_RULE));
    if !(got.len() == 1 && got[0].reason == DROP_DENY_RULE && got[0].rule == 46) {
        h.failures
            .push(format!("node backend: one event of rule 46, got {got:?}"));
    }
}

/// With `EP_EGRESS_HOST_JUDGED`, a new egress flow to the node is judged by the entries under
/// `IDENTITY_HOST`, then those under `IDENTITY_ANY`: denied by a deny entry (named), by no
/// entry, allowed and tracked by an allow (its replies pass as replies), in IPv4 (the fast
/// path hands it over) and IPv6; a later fragment needs its first; the re-check after a policy
/// change revokes the flow instead of letting it go as the node's.
fn egress_to_the_node_is_judged_when_the_endpoint_says_so(h: &mut Harness) {
    let (i, e) = (Hook::Egress, Hook::Ingress);
    let host = PeerInfo {
        identity: IDENTITY_HOST,
        flags: 0,
    };
    h.dp.peers_v6.set(&HOST6, &host).unwrap();
    deny(
        &mut h.dp,
        EP_A,
        IDENTITY_HOST,
        DIR_EGRESS,
        PROTO_TCP,
        22,
        16,
        50,
    );
    allow(
        &mut h.dp,
        EP_A,
        IDENTITY_HOST,
        DIR_EGRESS,
        PROTO_TCP,
        10250,
        16,
        51,
    );
    // IDENTITY_ANY: UDP 53 allowed to anyone (the world's verdict), the node included.
    allow(
        &mut h.dp,
        EP_A,
        IDENTITY_ANY,
        DIR_EGRESS,
        PROTO_UDP,
        53,
        16,
        52,
    );
    h.add_flags("a", EP_EGRESS_HOST_JUDGED, 2);
    h.rule_denied(
        "v4",
        "a",
        e,
        &ipv4(A4, HOST4, PROTO_TCP, &tcp(44000, 22)),
        50,
    );
    h.rule_denied(
        "v6",
        "a",
        e,
        &ipv6(A6, HOST6, PROTO_TCP, &tcp(44000, 22)),
        50,
    );
    let later = V4 {
        id: 0x4444,
        frag_offset: 185,
        ..V4::default()
    };
    let out = |f| ipv4(A4, HOST4, PROTO_TCP, &tcp_flags(44002, 10250, f));
    let back = |f| ipv4(HOST4, A4, PROTO_TCP, &tcp_flags(10250, 44002, f));
    h.cases(&[
        (
            "no entry",
            "a",
            e,
            ipv4(A4, HOST4, PROTO_TCP, &tcp(44001, 23)),
            SHOT,
            DROP_POLICY,
        ),
        (
            "a later fragment of no known flow",
            "a",
            e,
            ipv4_with(A4, HOST4, PROTO_UDP, &[7; 16], later),
            SHOT,
            DROP_FRAGMENT,
        ),
        (
            "allowed by its entry",
            "a",
            e,
            out(TCP_SYN),
            OK,
            ALLOW_POLICY,
        ),
        (
            "its reply",
            "a",
            i,
            back(TCP_SYN | TCP_ACK),
            OK,
            ALLOW_REPLY,
        ),
        ("tracked", "a", e, out(TCP_ACK), OK, ALLOW_ESTABLISHED),
        (
            "allowed by the any entry",
            "a",
            e,
            ipv6(A6, HOST6, PROTO_UDP, &udp(44003, 53, b"q")),
            OK,
            ALLOW_POLICY,
        ),
    ]);
    // The node's entry turns to a deny: the open flow is cut, not let go as the node's.
    deny(
        &mut h.dp,
        EP_A,
        IDENTITY_HOST,
        DIR_EGRESS,
        PROTO_TCP,
        10250,
        16,
        53,
    );
    h.set_epoch("a", 3);
    h.cases(&[
        (
            "the flow after the deny",
            "a",
            e,
            out(TCP_ACK),
            SHOT,
            DROP_REVOKED,
        ),
        (
            "its reply after the deny",
            "a",
            i,
            back(TCP_ACK),
            SHOT,
            DROP_REVOKED,
        ),
    ]);
}

/// Without `EP_EGRESS_HOST_JUDGED` the node stays allowed and untracked, whatever entries name
/// `IDENTITY_HOST` or `IDENTITY_ANY`.
fn egress_to_the_node_is_allowed_without_the_host_judged_flag(h: &mut Harness) {
    let e = Hook::Ingress;
    deny(
        &mut h.dp,
        EP_A,
        IDENTITY_HOST,
        DIR_EGRESS,
        PROTO_TCP,
        22,
        16,
        54,
    );
    deny(
        &mut h.dp,
        EP_A,
        IDENTITY_ANY,
        DIR_EGRESS,
        PROTO_TCP,
        22,
        16,
        55,
    );
    let ssh = ipv4(A4, HOST4, PROTO_TCP, &tcp(44100, 22));
    h.cases(&[
        ("v4", "a", e, ssh.clone(), OK, ALLOW_HOST),
        ("v4 again", "a", e, ssh, OK, ALLOW_HOST),
        (
            "icmp",
            "a",
            e,
            ipv4(A4, HOST4, 1, &echo(8, 80, 1)),
            OK,
            ALLOW_HOST,
        ),
    ]);
    h.no_flow_of(EP_A, "no flag: a flow to the node");
}

/// The node's own packets into a pod (kubelet probes) stay allowed and untracked with
/// `EP_EGRESS_HOST_JUDGED` set, even where entries deny the node or anyone in ingress.
fn ingress_from_the_node_stays_allowed_with_the_host_judged_flag(h: &mut Harness) {
    let i = Hook::Egress;
    deny(
        &mut h.dp,
        EP_A,
        IDENTITY_HOST,
        DIR_INGRESS,
        PROTO_TCP,
        8080,
        16,
        56,
    );
    deny(
        &mut h.dp,
        EP_A,
        IDENTITY_ANY,
        DIR_INGRESS,
        PROTO_TCP,
        8080,
        16,
        57,
    );
    h.add_flags("a", EP_EGRESS_HOST_JUDGED, 2);
    let probe = ipv4(HOST4, A4, PROTO_TCP, &tcp(44200, 8080));
    h.cases(&[
        ("probe", "a", i, probe.clone(), OK, ALLOW_HOST),
        ("probe again", "a", i, probe, OK, ALLOW_HOST),
    ]);
    h.no_flow_of(EP_A, "flag: a probe");
}

/// An endpoint whose egress to the node is judged but which has no policy entries at all
/// (its policy not found, or not programmed): egress to the node is denied, as everything
/// else in an isolated direction.
fn a_host_judged_endpoint_without_entries_fails_closed(h: &mut Harness) {
    let e = Hook::Ingress;
    h.add_flags("c", EP_EGRESS_ISOLATED | EP_EGRESS_HOST_JUDGED, 2);
    h.cases(&[
        (
            "tcp to the node",
            "c",
            e,
            ipv4(C4, HOST4, PROTO_TCP, &tcp(44300, 10250)),
            SHOT,
            DROP_POLICY,
        ),
        (
            "udp to the node",
            "c",
            e,
            ipv4(C4, HOST4, PROTO_UDP, &udp(44301, 53, b"q")),
            SHOT,
            DROP_POLICY,
        ),
        (
            "icmp to the node",
            "c",
            e,
            ipv4(C4, HOST4, 1, &echo(8, 81, 1)),
            SHOT,
            DROP_POLICY,
        ),
        (
            "to the world",
            "c",
            e,
            ipv4(C4, WORLD4, PROTO_TCP, &tcp(44302, 443)),
            SHOT,
            DROP_POLICY,
        ),
    ]);
}

/// In a direction only audit policies isolate, a deny entry is a would-drop, as a miss is.
fn a_deny_entry_in_an_audit_only_direction_is_a_would_drop(h: &mut Harness) {
    h.add_flags("c", EP_INGRESS_AUDIT, 2);
    deny(&mut h.dp, EP_C, ID_B, DIR_INGRESS, PROTO_TCP, 80, 16, 58);
    let b = ipv4(B4, C4, PROTO_TCP, &tcp(44400, 80));
    h.case(
        "audit: a deny entry",
        "c",
        Hook::Egress,
        &b,
        OK,
        ALLOW_AUDIT,
    );
}

fn allow_none(dp: &mut Datapath, ep: u32, id: u32, dir: u8, proto: u8, port: u16, len: u8) {
    dp.policy
        .remove(&PolicyKey::new(ep, id, dir, proto, port, len))
        .unwrap();
}

fn main() -> ExitCode {
    let mut args = Arguments::from_args();
    // The groups share one datapath: one at a time.
    args.test_threads = Some(1);
    let conclusion = libtest_mimic::run(&args, trials());
    // Unload the shared datapath: pins, bpffs and namespace go, whatever the outcome.
    let shared = SHARED.lock().unwrap_or_else(PoisonError::into_inner).take();
    if let Some(mut shared) = shared {
        // A thread that died setting up failed the tests that ran on it already.
        let died_before = shared.died.is_some();
        if let Some(died) = shared.join()
            && !died_before
        {
            eprintln!("tearing the shared datapath down failed: {died}");
            return ExitCode::FAILURE;
        }
    }
    let cases = CASES_RUN.load(Ordering::Relaxed);
    if cases > 0 {
        eprintln!("{cases} cases run");
    }
    conclusion.exit_code()
}

/// Creates a preallocated plain hash (`BPF_MAP_TYPE_HASH`) of `entries` and pins it at `path`.
fn pin_plain_hash(path: &Path, key_size: usize, value_size: usize, entries: u32) {
    pin_map(path, BPF_MAP_TYPE_HASH, key_size, value_size, entries, 0);
}

const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_F_MMAPABLE: u32 = 1 << 10;

/// Pins a `FLOWS_V4` of one bucket in `maps` before the load (the loader takes its size): every
/// IPv4 flow meets in that bucket's two ways.
fn pin_one_bucket_flow_table(maps: &Path) {
    pin_map(
        &maps.join(MAP_FLOWS_V4),
        BPF_MAP_TYPE_ARRAY,
        4,
        std::mem::size_of::<FlowBucket>(),
        1,
        BPF_F_MMAPABLE,
    );
}

/// Bucket 0's lock of the pinned `FLOWS_V4` at `path`, taken as a program takes it (the lock
/// bit of way 0's `meta`, by compare-and-swap) and held until dropped.
struct BucketLock {
    page: *mut libc::c_void,
}

impl BucketLock {
    fn hold(path: &Path) -> Self {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        let map = aya::maps::MapData::from_pin(path).expect("the pinned FLOWS_V4");
        // SAFETY: a shared mapping of the map's first page (its first buckets), checked below.
        let page = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        assert_ne!(
            page,
            libc::MAP_FAILED,
            "mmap FLOWS_V4: {}",
            std::io::Error::last_os_error()
        );
        let lock = Self { page };
        let prev = lock
            .control()
            .fetch_or(FLOW_LOCK, std::sync::atomic::Ordering::AcqRel);
        assert_eq!(prev & FLOW_LOCK, 0, "bucket 0 was already locked");
        lock
    }

    fn control(&self) -> &std::sync::atomic::AtomicU32 {
        // SAFETY: way 0's `meta` of bucket 0, 4-aligned in the mapped page, which lives as long
        // as `self`; programs access it atomically or with aligned loads and stores.
        unsafe {
            std::sync::atomic::AtomicU32::from_ptr(
                self.page
                    .cast::<u8>()
                    .add(std::mem::offset_of!(FlowWay, meta))
                    .cast(),
            )
        }
    }
}

impl Drop for BucketLock {
    fn drop(&mut self) {
        self.control()
            .fetch_and(!FLOW_LOCK, std::sync::atomic::Ordering::AcqRel);
        // SAFETY: the mapping made in `hold`, no longer referenced.
        unsafe { libc::munmap(self.page, 4096) };
    }
}

/// Creates a map of `map_type` and pins it at `path`.
fn pin_map(
    path: &Path,
    map_type: u32,
    key_size: usize,
    value_size: usize,
    entries: u32,
    flags: u32,
) {
    use std::os::unix::ffi::OsStrExt as _;
    let mut attr = [0u8; 128];
    for (off, v) in [
        (0, map_type),
        (4, key_size as u32),
        (8, value_size as u32),
        (12, entries),
        (16, flags),
    ] {
        attr[off..off + 4].copy_from_slice(&v.to_ne_bytes());
    }
    // SAFETY: BPF_MAP_CREATE (0) reads the attr, which outlives the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, 0, attr.as_ptr(), attr.len()) };
    assert!(
        fd >= 0,
        "BPF_MAP_CREATE: {}",
        std::io::Error::last_os_error()
    );
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut attr = [0u8; 128];
    attr[..8].copy_from_slice(&(c.as_ptr() as u64).to_ne_bytes());
    attr[8..12].copy_from_slice(&(fd as u32).to_ne_bytes());
    // SAFETY: BPF_OBJ_PIN (6) reads the path and fd, both alive during the call.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, 6, attr.as_ptr(), attr.len()) };
    assert_eq!(ret, 0, "BPF_OBJ_PIN: {}", std::io::Error::last_os_error());
    // SAFETY: our fd; the pin keeps the map.
    unsafe { libc::close(fd as i32) };
}

/// A conntrack that takes no more flows: a new flow is dropped (fail closed) with its own
/// reason and event, tracked flows go on, and the flow opens once there is room. The LRU map
/// evicts rather than refuse, so a plain hash of four entries is pinned in its place before the
/// load (the loader reuses a pinned map as it finds it): the same programs, whose insert fails.
/// With the flow table on, a one-bucket `FLOWS_V4` is pinned too: its two ways fill first,
/// then the bucket overflows into the hash, whose flows are found through the overflow mark.
fn a_full_conntrack_refuses_new_flows_and_keeps_tracked_ones() -> (usize, Vec<String>) {
    const ENTRIES: u16 = 4;
    let prepare = |pin: &Path| {
        let maps = pin.join(format!("v{SCHEMA_VERSION}/maps"));
        std::fs::create_dir_all(&maps).unwrap();
        pin_plain_hash(
            &maps.join(MAP_CONNTRACK_V4),
            std::mem::size_of::<CtKeyV4>(),
            std::mem::size_of::<CtValue>(),
            u32::from(ENTRIES),
        );
        pin_one_bucket_flow_table(&maps);
    };
    in_private_netns("map-full", prepare, |h, pin| {
        let _ = h.events().drain();
        let new = |port: u16| ipv4(WORLD4, A4, PROTO_TCP, &tcp(port, 8001));
        let ways = match h.dp.conntrack.flow_table() {
            Some(t) => t.capacity() as u16,
            None => 0,
        };
        for k in 0..ways + ENTRIES {
            h.case(
                "map full: new flows fill conntrack",
                "a",
                Hook::Egress,
                &new(47000 + k),
                OK,
                ALLOW_POLICY,
            );
        }
        h.case(
            "map full: one more new flow is dropped",
            "a",
            Hook::Egress,
            &new(47100),
            SHOT,
            DROP_MAP_FULL,
        );
        let got = h.events().drain();
        if !(got.len() == 1
            && got[0].reason == DROP_MAP_FULL
            && got[0].endpoint == EP_A
            && got[0].sport == 47100
            && got[0].dport == 8001)
        {
            h.failures
                .push(format!("map full: one event with its reason, got {got:?}"));
        }
        // The first flows (in the table when it is on) and the last (in the hash behind it).
        for port in [47001, 47000 + ways + ENTRIES - 1] {
            h.case(
                "map full: a tracked flow goes on",
                "a",
                Hook::Egress,
                &new(port),
                OK,
                ALLOW_ESTABLISHED,
            );
            h.case(
                "map full: and its replies",
                "a",
                Hook::Ingress,
                &ipv4(A4, WORLD4, PROTO_TCP, &tcp(8001, port)),
                OK,
                ALLOW_REPLY,
            );
        }
        if ways > 0 {
            // The bucket held locked (as by another CPU's program, stalled): its flows can be
            // neither read nor recorded, so their packets are dropped as map-full, never let
            // through unjudged; released, the flow goes on.
            let lock =
                BucketLock::hold(&pin.join(format!("v{SCHEMA_VERSION}/maps/{MAP_FLOWS_V4}")));
            h.case(
                "locked bucket: a tracked flow's packet is dropped",
                "a",
                Hook::Egress,
                &new(47001),
                SHOT,
                DROP_MAP_FULL,
            );
            h.case(
                "locked bucket: and its reply",
                "a",
                Hook::Ingress,
                &ipv4(A4, WORLD4, PROTO_TCP, &tcp(8001, 47001)),
                SHOT,
                DROP_MAP_FULL,
            );
            drop(lock);
            h.case(
                "locked bucket: released, the flow goes on",
                "a",
                Hook::Egress,
                &new(47001),
                OK,
                ALLOW_ESTABLISHED,
            );
            let _ = h.events().drain();
        }
        let c = h.dp.conntrack.count_by_map().unwrap();
        h.cases += 1;
        if (c.flows, c.v4) != (usize::from(ways), usize::from(ENTRIES)) {
            h.failures.push(format!(
                "map full: {c:?}, want {ways} flows in the table and {ENTRIES} behind it"
            ));
        }
        // Room again: the refused flow opens.
        let gone =
            h.dp.conntrack
                .entries()
                .unwrap()
                .into_iter()
                .find(|(k, _)| k.port_a == 47000 + ways + 1 || k.port_b == 47000 + ways + 1)
                .expect("a flow in the hash");
        h.dp.conntrack.remove(&gone.0).unwrap();
        h.case(
            "map full: with room, the new flow opens",
            "a",
            Hook::Egress,
            &new(47100),
            OK,
            ALLOW_POLICY,
        );
    })
}

/// Two CPUs opening flows into one `FLOWS_V4` bucket at once, while the agent forgets flows of
/// that bucket back to back (its compare-and-swap of the bucket's control word against their
/// lock): every flow a program allowed is recorded exactly once (in the bucket or, the bucket
/// full, behind it) unless the agent forgot it, none is recorded twice, and a flow a program
/// could not record (the lock held too long) was dropped, not let through untracked.
fn concurrent_writers_of_one_bucket_lose_and_duplicate_nothing() -> (usize, Vec<String>) {
    const PER_THREAD: u16 = 2_000;
    let prepare = |pin: &Path| {
        let maps = pin.join(format!("v{SCHEMA_VERSION}/maps"));
        std::fs::create_dir_all(&maps).unwrap();
        pin_one_bucket_flow_table(&maps);
    };
    in_private_netns("flows-race", prepare, |h, _| {
        let Some(table) = h.dp.conntrack.flow_table() else {
            h.failures
                .push("the flow table is off (it is on wherever slots are)".into());
            return;
        };
        let ifindex = h.ifs["a"];
        let port_of = |t: u16, i: u16| 20_000 + t * 10_000 + i;
        let stop = std::sync::atomic::AtomicBool::new(false);
        // Everyone starts together, the agent already in its loop.
        let start = std::sync::Barrier::new(3);
        let (dp, start, stop) = (&h.dp, &start, &stop);
        let (verdicts, removed) = std::thread::scope(|s| {
            let writers: Vec<_> = (0..2u16)
                .map(|t| {
                    s.spawn(move || {
                        start.wait();
                        (0..PER_THREAD)
                            .map(|i| {
                                // Two CPUs, three threads: let the agent in now and then.
                                if i % 64 == 0 {
                                    std::thread::yield_now();
                                }
                                let port = port_of(t, i);
                                let frame = ipv4(WORLD4, A4, PROTO_TCP, &tcp(port, 8001));
                                (port, dp.test_run(Hook::Egress, ifindex, &frame).unwrap())
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            // Forgets the flows it finds in the bucket, as soon as they are there.
            let agent = s.spawn(move || {
                let mut removed = BTreeSet::new();
                table
                    .with_memory(|m| {
                        start.wait();
                        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                            let seen: Vec<CtKeyV4> = m.read(0).live().map(|w| w.key()).collect();
                            // Once each: a flow forgotten that comes back is a lost write.
                            for k in seen {
                                if !removed.contains(&k.port_a) && m.remove(&k) {
                                    removed.insert(k.port_a);
                                }
                            }
                        }
                    })
                    .unwrap();
                removed
            });
            let v: Vec<(u16, i32)> = writers
                .into_iter()
                .flat_map(|w| w.join().unwrap())
                .collect();
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            (v, agent.join().unwrap())
        });
        h.cases += 1;
        let allowed = verdicts.iter().filter(|(_, a)| *a == OK).count();
        eprintln!(
            "concurrent writers: {allowed} of {} new flows allowed, the agent forgot {} of them",
            verdicts.len(),
            removed.len()
        );
        let entries = h.dp.conntrack.entries().unwrap();
        let recorded = |port: u16| {
            entries
                .iter()
                .filter(|(k, _)| k.endpoint == EP_A && (k.port_a == port || k.port_b == port))
                .count()
        };
        let c = h.dp.conntrack.count_by_map().unwrap();
        let mut bad: Vec<String> = verdicts
            .iter()
            .filter(|&&(port, act)| {
                recorded(port) != usize::from(act == OK && !removed.contains(&port))
            })
            .map(|(port, act)| {
                format!(
                    "port {port}: action {act}, recorded {}, forgotten {}",
                    recorded(*port),
                    removed.contains(port)
                )
            })
            .collect();
        if c.flows + c.v4 != allowed - removed.len() {
            bad.push(format!(
                "{allowed} allowed, {} forgotten, maps hold {c:?}",
                removed.len()
            ));
        }
        let bucket = table.with_memory(|m| m.read(0)).unwrap();
        let live: Vec<CtKeyV4> = bucket.live().map(|w| w.key()).collect();
        if live.len() == 2 && live[0] == live[1] {
            bad.push(format!("one flow in both ways: {bucket:?}"));
        }
        if allowed * 10 < verdicts.len() * 9 || removed.is_empty() {
            bad.push(format!(
                "{allowed} of {} allowed, the agent forgot {}",
                verdicts.len(),
                removed.len()
            ));
        }
        if !bad.is_empty() {
            h.failures
                .push(format!("concurrent writers: {}", bad.join("; ")));
        }
    })
}
