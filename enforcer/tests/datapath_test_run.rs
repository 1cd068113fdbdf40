//! The real TC programs, loaded through the loader and fed crafted frames with
//! `BPF_PROG_TEST_RUN`. Each case asserts the TC action and that exactly the counter of the
//! expected reason moved. Runs as root: a private network namespace (for the ifindexes the
//! kernel requires in `ctx_in`) and a private bpffs mounted under a temp dir, both removed at
//! the end.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::Command,
};

use enforcer::{
    datapath::{CtCount, Datapath, DatapathOptions, Hook, mount_bpffs},
    reconcile::MapTable,
};
use enforcer_common::{
    CONFIG_CT_LRU_ALL, CONFIG_LOG_ALLOWED, CT_REVOKED, CtKey, CtKeyV4, CtValue, DIR_EGRESS,
    DIR_INGRESS, EP_EGRESS_ISOLATED, EP_HAS_V4, EP_HAS_V6, EP_INGRESS_ISOLATED, EndpointInfo,
    FAMILY_V4, FAMILY_V6, FLOW_LOCK, FlowBucket, FlowWay, IDENTITY_ANY, IDENTITY_HOST,
    MAP_CONNTRACK_V4, MAP_CONNTRACK_V6, MAP_FLOWS_V4, PORT_MASK_ANY_PROTO, PROTO_ANY, PROTO_SCTP,
    PROTO_TCP, PROTO_UDP, PeerInfo, PolicyKey, PolicyValue, REASON_NAMES, SCHEMA_VERSION,
    reason::*,
};
use enforcer_policy::state::Prefix;

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

/// A bpffs mounted on a temp dir; unmounted and removed on drop.
struct BpfMount(PathBuf);

impl BpfMount {
    fn new(tag: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("enforcer-dp-test-{tag}-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        mount_bpffs(&dir).expect("mounting a bpffs (run as root)");
        Self(dir)
    }
}

impl Drop for BpfMount {
    fn drop(&mut self) {
        let c = std::ffi::CString::new(self.0.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: valid path.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ifindex(name: &str) -> u32 {
    let c = std::ffi::CString::new(name).unwrap();
    // SAFETY: valid NUL-terminated name.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert!(i > 1, "no interface {name}");
    i
}

struct Harness {
    dp: Datapath,
    ifs: BTreeMap<&'static str, u32>,
    eps: BTreeMap<u32, EndpointInfo>,
    cases: usize,
    failures: Vec<String>,
}

impl Harness {
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
    allow(&mut dp, EP_A, ID_B, DIR_INGRESS, PROTO_TCP, 80, 16, 10);
    allow(&mut dp, EP_A, ID_B, DIR_INGRESS, PROTO_UDP, 53, 16, 11);
    allow(&mut dp, EP_A, ID_B, DIR_INGRESS, PROTO_SCTP, 9000, 16, 12);
    // port 8000, endPort 8015: one /12 block.
    allow(
        &mut dp,
        EP_A,
        IDENTITY_ANY,
        DIR_INGRESS,
        PROTO_TCP,
        8000,
        12,
        13,
    );
    allow(&mut dp, EP_A, ID_CIDR, DIR_INGRESS, PROTO_TCP, 443, 16, 14);
    allow(&mut dp, EP_A, ID_P9, DIR_INGRESS, PROTO_ANY, 0, 0, 15);
    // Pod A, egress.
    allow(&mut dp, EP_A, ID_B, DIR_EGRESS, PROTO_TCP, 5432, 16, 20);
    allow(&mut dp, EP_A, ID_P9, DIR_EGRESS, PROTO_ANY, 0, 0, 21);
    allow(&mut dp, EP_A, ID_CIDR, DIR_EGRESS, PROTO_UDP, 123, 16, 22);
    // Pod C, ingress only.
    allow(&mut dp, EP_C, ID_B, DIR_INGRESS, PROTO_TCP, 80, 16, 30);
    Harness {
        dp,
        ifs,
        eps,
        cases: 0,
        failures: Vec::new(),
    }
}

fn run_cases(h: &mut Harness) {
    let i = Hook::Egress; // to_pod: traffic into the pod
    let e = Hook::Ingress; // from_pod: traffic out of the pod

    // --- Unmanaged, non-IP, ND ---
    h.case(
        "unmanaged ifindex",
        "u",
        e,
        &ipv4(A4, B4, PROTO_TCP, &tcp(1, 2)),
        OK,
        ALLOW_UNMANAGED,
    );
    h.case("arp", "a", e, &arp(), OK, ALLOW_NON_IP);
    h.case(
        "nd neighbour solicitation from link-local",
        "a",
        e,
        &ipv6(LINK_LOCAL6, B6, 58, &icmp_error(135, 0, &[0; 16])),
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

    // --- Anti-spoofing, host, self ---
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

    // --- TCP v4: pod peer exact hit, conntrack ---
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

    // --- UDP, SCTP ---
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

    // --- Port ranges (endPort as a prefix), wildcard peer ---
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

    // --- CIDR with except ---
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

    // --- TCP v6 ---
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
    ct_key_layout(h);

    // --- ICMP echo ---
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

    // --- Not isolated ---
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

    // --- Fragments ---
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

    // --- Malformed and truncated ---
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

fn epoch_cases(h: &mut Harness) {
    let i = Hook::Egress;
    let e = Hook::Ingress;
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
    // Put the rule back for later cases.
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
    let n = h.dp.conntrack.remove_endpoint(EP_C).unwrap();
    if n == 0 {
        h.failures
            .push("conntrack.remove_endpoint(C) removed nothing".into());
    }
}

/// The established path reads an endpoint from its slot of ENDPOINT_SLOTS: a stale slot with
/// an even sequence is believed (which shows the programs use it), a half-written one or one
/// that names another ifindex is not (ENDPOINTS decides), and an endpoint whose slot another
/// ifindex owns is judged through ENDPOINTS.
fn slot_cases(h: &mut Harness) {
    use enforcer::datapath::slots::SLOTS_SUPPORTED;
    use enforcer_common::{ENDPOINT_SLOT_COUNT, endpoint_slot};
    if !SLOTS_SUPPORTED {
        return;
    }
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

    // New flows too are judged from the slot: with the policy keys it lists (the entry, written
    // a moment later, lists none), the slot's probe finds the rule and the flow opens.
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

    // A veth whose ifindex shares A's slot: A keeps the slot, D is judged through ENDPOINTS.
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
fn peer_cache_cases(h: &mut Harness) {
    use enforcer_common::{peer_bucket, peer_way};
    let i = Hook::Egress;
    // A allows ID_B on TCP 80 (slot_cases re-allowed it); every case is a new flow.
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
fn idle_cases(h: &mut Harness) {
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

/// The flows just allowed sit in their family's conntrack map under exactly the key the agent
/// builds (ends ordered by address, then port): the programs and `Conntrack` agree byte for byte.
fn ct_key_layout(h: &mut Harness) {
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

fn event_cases(h: &mut Harness) {
    let mut events = h.dp.take_events().expect("event reader");
    let _ = events.drain();
    h.case(
        "event: drop",
        "a",
        Hook::Egress,
        &ipv4(WORLD4, A4, PROTO_TCP, &tcp(1234, 22)),
        SHOT,
        DROP_POLICY,
    );
    let got = events.drain();
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
    let got = events.drain();
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
    let got = events.drain();
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
fn restart_cases(h: &mut Harness, pin: &Path) {
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
fn upgrade_cases(h: &mut Harness, pin: &Path) {
    if h.dp.conntrack.flow_table().is_none() {
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
fn conntrack_count_cases(h: &mut Harness, pin: &Path) {
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

/// Runs `body` on a harness in a private network namespace with a private bpffs (both go away
/// with the thread, as the dummy links in it do), after `prepare` saw the pin folder; cleans the
/// pins up and fails the test with every failed case. Returns the number of cases.
fn in_private_netns(
    tag: &'static str,
    prepare: impl FnOnce(&Path) + Send + 'static,
    body: impl FnOnce(&mut Harness, &Path) + Send + 'static,
) -> usize {
    let handle = std::thread::spawn(move || {
        // SAFETY: unshare on the calling thread (and the `ip` it spawns).
        assert_eq!(
            unsafe { libc::unshare(libc::CLONE_NEWNET) },
            0,
            "unshare(CLONE_NEWNET): run as root"
        );
        let mount = BpfMount::new(tag);
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
    let (cases, failures) = handle.join().expect("test thread panicked");
    assert!(
        failures.is_empty(),
        "{} of {cases} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    cases
}

#[test]
fn datapath_verdicts_by_test_run() {
    let cases = in_private_netns(
        "verdicts",
        |_| {},
        |h, pin| {
            run_cases(h);
            epoch_cases(h);
            slot_cases(h);
            peer_cache_cases(h);
            idle_cases(h);
            event_cases(h);
            restart_cases(h, pin);
            upgrade_cases(h, pin);
            conntrack_count_cases(h, pin);
            // The agent reads the counters in batches; they must equal a slot-by-slot read.
            let batched =
                h.dp.counters
                    .read_batched()
                    .expect("BPF_MAP_LOOKUP_BATCH on COUNTERS");
            let each = h.dp.counters.read_each().unwrap();
            assert_eq!(batched.len(), each.len());
            assert!(
                batched == each,
                "batched counter read differs from a slot-by-slot read"
            );
            assert!(
                each.iter().filter(|c| c.packets > 0).count() > 5,
                "the cases moved counters"
            );
        },
    );
    assert!(cases >= 40, "only {cases} cases");
    eprintln!("{cases} cases passed");
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
#[test]
fn a_full_conntrack_refuses_new_flows_and_keeps_tracked_ones() {
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
        let mut events = h.dp.take_events().expect("event reader");
        let _ = events.drain();
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
        let got = events.drain();
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
            let _ = events.drain();
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
    });
}

/// Two CPUs opening flows into one `FLOWS_V4` bucket at once, while the agent forgets flows of
/// that bucket back to back (its compare-and-swap of the bucket's control word against their
/// lock): every flow a program allowed is recorded exactly once (in the bucket or, the bucket
/// full, behind it) unless the agent forgot it, none is recorded twice, and a flow a program
/// could not record (the lock held too long) was dropped, not let through untracked.
#[test]
fn concurrent_writers_of_one_bucket_lose_and_duplicate_nothing() {
    const PER_THREAD: u16 = 2_000;
    let prepare = |pin: &Path| {
        let maps = pin.join(format!("v{SCHEMA_VERSION}/maps"));
        std::fs::create_dir_all(&maps).unwrap();
        pin_one_bucket_flow_table(&maps);
    };
    in_private_netns("flows-race", prepare, |h, _| {
        let Some(table) = h.dp.conntrack.flow_table() else {
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
    });
}
