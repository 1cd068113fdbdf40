//! The loader: loads the embedded TC programs, pins their maps and links under
//! `<pin-path>/v{SCHEMA_VERSION}/`, attaches them to host-side veths, and gives typed access to
//! the maps. All `aya` use of the agent lives in this module.
//!
//! Restart/upgrade: maps already pinned are reused (policy and conntrack survive), and a pinned
//! link is re-pointed at the newly loaded program with `bpf_link_update`, so the hook is never
//! empty. Dropping a [`Datapath`] detaches nothing: the links stay pinned and keep enforcing.

mod attach;
mod bpffs;
mod conntrack;
mod counters;
mod events;
pub mod flows;
mod hash;
mod lpm;
mod mapping;
pub mod peer_slots;
pub mod routes;
mod seam;
pub mod slots;
mod syscall;

use std::{
    io,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, Map, MapData, PerCpuArray, ProgramArray, RingBuf},
    programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::{NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
    },
};
pub use conntrack::{Conntrack, ConntrackCounter, CtCount, FlowCounts, FlowTally};
pub use counters::{CounterKey, CounterReader, Counters};
use enforcer_common::{
    CONFIG_CT_LRU_ALL, CONFIG_LOG_ALLOWED, Config, DEFAULT_CIDRS_SIZE, DEFAULT_CONNTRACK_SIZE,
    DEFAULT_CT_TIMEOUT_OTHER_NS, DEFAULT_CT_TIMEOUT_TCP_CLOSED_NS, DEFAULT_CT_TIMEOUT_TCP_NS,
    DEFAULT_CT_TIMEOUT_TCP_SYN_NS, DEFAULT_EVENTS_BYTES, DEFAULT_FRAGMENTS_SIZE,
    DEFAULT_MAX_ENDPOINTS, DEFAULT_NODE_PORTS_SIZE, DEFAULT_PEERS_MAX, DEFAULT_PEERS_SIZE,
    DEFAULT_POLICY_SIZE, FlowSeed, MAP_CIDRS_V4, MAP_CIDRS_V6, MAP_CONFIG, MAP_CONNTRACK_V4,
    MAP_CONNTRACK_V6, MAP_COUNTERS, MAP_DEFERRED, MAP_ENDPOINT_SLOTS, MAP_ENDPOINTS, MAP_EVENTS,
    MAP_FLOW_COUNTS, MAP_FLOWS_V4, MAP_FRAGMENTS, MAP_NODE_PORTS, MAP_PEER_SLOTS, MAP_PEERS_V4,
    MAP_PEERS_V6, MAP_POLICY, MAP_SERVICE_FLOWS, MAP_SVC_PROGS, NodePortKey, PEERS_GROW_AT,
    PEERS_MAP_FLAGS, PROG_AUDIT_POD, PROG_FROM_POD, PROG_SVC_EXIT, PROG_SVC_POD, PROG_TO_POD,
    PeerInfo, PolicyKey, PolicyValue, SCHEMA_VERSION, SVC_PROG_AUDIT, SVC_PROG_COUNT,
    SVC_PROG_JUDGE, SVC_PROG_TO_POD, counter_slots, peer_buckets_for,
};
pub use events::{AsyncEvents, EventReader};
pub use hash::{EndpointTable, HashTable, PeerTable};
pub use lpm::{LpmAddr, LpmTable};

pub use self::attach::AttachMode;
pub use self::bpffs::{ensure_bpffs, is_bpffs, mount_bpffs};

/// Default pin folder (`--pin-path`).
pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/enforcer";

/// Every pinned map.
const PINNED_MAPS: [&str; 20] = [
    MAP_ENDPOINTS,
    MAP_ENDPOINT_SLOTS,
    MAP_PEERS_V4,
    MAP_PEER_SLOTS,
    MAP_PEERS_V6,
    MAP_CIDRS_V4,
    MAP_CIDRS_V6,
    MAP_POLICY,
    MAP_FLOWS_V4,
    MAP_CONNTRACK_V4,
    MAP_CONNTRACK_V6,
    MAP_FLOW_COUNTS,
    MAP_FRAGMENTS,
    MAP_COUNTERS,
    MAP_EVENTS,
    MAP_CONFIG,
    MAP_NODE_PORTS,
    // Deferred packets cross from one object's programs to another's during an upgrade.
    MAP_DEFERRED,
    MAP_SERVICE_FLOWS,
    // Pinned so that its entries outlive the agent (a program array empties when its last
    // user-space reference goes): running programs keep reaching the judge.
    MAP_SVC_PROGS,
];

/// The eBPF object built by `build.rs`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/enforcer"));

/// Load-time settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatapathOptions {
    /// bpffs folder of the pins (`--pin-path`).
    pub pin_path: PathBuf,
    /// Endpoint slots (ENDPOINTS size; COUNTERS gets `counter_slots(max_endpoints)`).
    pub max_endpoints: u32,
    /// Entries of `PEERS_V4` and `PEERS_V6` (`--peers-map-size`): the size they start at, or
    /// keep when `peers_max` is not above it.
    pub peers_size: u32,
    /// How far the agent may grow them (`--peers-map-max`); at or below `peers_size`, they
    /// keep `peers_size` (a pinned map of another size is replaced by one of it).
    pub peers_max: u32,
    pub cidrs_size: u32,
    pub policy_size: u32,
    pub conntrack_size: u32,
    pub fragments_size: u32,
    /// NODE_PORTS size (`--node-ports-map-size`).
    pub node_ports_size: u32,
    /// Ring buffer size in bytes (a power of two, a multiple of the page size).
    pub events_bytes: u32,
    /// Send an event for every new allowed flow too.
    pub log_allowed: bool,
    /// Idle timeouts: an established TCP flow, one never answered, one closed; other protocols.
    pub ct_timeout_tcp: Duration,
    pub ct_timeout_tcp_syn: Duration,
    pub ct_timeout_tcp_closed: Duration,
    pub ct_timeout_other: Duration,
    /// Flows an endpoint may hold per direction of origin (0: no limit).
    pub max_flows_per_endpoint: u32,
    /// TCX links or tc (clsact) filters (`--attach-mode`).
    pub attach: AttachMode,
    /// Keep IPv4 flows in the `FLOWS_V4` table (`conntrack_size` flows, two per bucket) in front
    /// of `CONNTRACK_V4`. x86-64 only: see [`enforcer_common::FlowBucket`].
    pub flow_table: bool,
}

impl Default for DatapathOptions {
    fn default() -> Self {
        Self {
            pin_path: PathBuf::from(DEFAULT_PIN_PATH),
            max_endpoints: DEFAULT_MAX_ENDPOINTS,
            peers_size: DEFAULT_PEERS_SIZE,
            peers_max: DEFAULT_PEERS_MAX,
            cidrs_size: DEFAULT_CIDRS_SIZE,
            policy_size: DEFAULT_POLICY_SIZE,
            conntrack_size: DEFAULT_CONNTRACK_SIZE,
            fragments_size: DEFAULT_FRAGMENTS_SIZE,
            node_ports_size: DEFAULT_NODE_PORTS_SIZE,
            events_bytes: DEFAULT_EVENTS_BYTES,
            log_allowed: false,
            attach: AttachMode::Auto,
            flow_table: slots::SLOTS_SUPPORTED,
            ct_timeout_tcp: Duration::from_nanos(DEFAULT_CT_TIMEOUT_TCP_NS),
            ct_timeout_tcp_syn: Duration::from_nanos(DEFAULT_CT_TIMEOUT_TCP_SYN_NS),
            ct_timeout_tcp_closed: Duration::from_nanos(DEFAULT_CT_TIMEOUT_TCP_CLOSED_NS),
            ct_timeout_other: Duration::from_nanos(DEFAULT_CT_TIMEOUT_OTHER_NS),
            max_flows_per_endpoint: default_flow_limit(DEFAULT_CONNTRACK_SIZE),
        }
    }
}

impl DatapathOptions {
    /// The peers maps keep `peers_size`: no growth.
    pub fn peers_fixed(&self) -> bool {
        self.peers_max <= self.peers_size
    }

    /// The [`Config`] these options write into CONFIG (the loader adds the table's seed).
    pub fn config(&self) -> Config {
        let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1);
        Config {
            flags: if self.log_allowed {
                CONFIG_LOG_ALLOWED
            } else {
                0
            },
            max_flows_per_endpoint: self.max_flows_per_endpoint,
            ct_timeout_tcp_ns: ns(self.ct_timeout_tcp),
            ct_timeout_other_ns: ns(self.ct_timeout_other),
            ct_timeout_tcp_syn_ns: ns(self.ct_timeout_tcp_syn),
            ct_timeout_tcp_closed_ns: ns(self.ct_timeout_tcp_closed),
            flow_seed: FlowSeed::UNKEYED,
        }
    }
}

/// Entries of SERVICE_FLOWS for conntrack maps of `conntrack_size`: Service flows are some of
/// the flows; an evicted entry only makes its flow's replies wait for the pod's next packet
/// after a policy change.
pub const fn service_flows_size(conntrack_size: u32) -> u32 {
    let n = conntrack_size / 4;
    if n < 1024 { 1024 } else { n }
}

/// The default flows per endpoint and direction for conntrack maps of `conntrack_size`: half
/// of one map, so that one pod flooding in one direction holds at most a quarter of the IPv4
/// room (table and LRU map) or half of the IPv6 map, and the others keep the rest.
pub const fn default_flow_limit(conntrack_size: u32) -> u32 {
    let n = conntrack_size / 2;
    if n == 0 { 1 } else { n }
}

/// A fresh key for the flow table's bucket hash (never the unkeyed one).
fn random_seed() -> Result<FlowSeed> {
    let mut seed = FlowSeed::default();
    loop {
        // SAFETY: writes at most the 16 bytes of `seed.k`.
        let n = unsafe { libc::getrandom(seed.k.as_mut_ptr().cast(), size_of::<FlowSeed>(), 0) };
        if n != size_of::<FlowSeed>() as isize {
            bail!(
                "getrandom for the flow table's hash key: {}",
                io::Error::last_os_error()
            );
        }
        if !seed.is_unkeyed() {
            return Ok(seed);
        }
    }
}

/// One hook of a host-side veth, or of one of the node's other interfaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// TC ingress of a pod's veth: what the pod sends; runs `from_pod`.
    Ingress,
    /// TC egress of a pod's veth: what the pod receives; runs `to_pod`.
    Egress,
    /// TC egress of another interface (uplink, tunnel, bridge): runs `svc_exit`, which judges
    /// deferred Service packets leaving the node by it.
    Exit,
}

impl Hook {
    /// The hooks of a pod's veth.
    pub const ALL: [Self; 2] = [Self::Ingress, Self::Egress];
    /// Every kind of hook.
    pub const EVERY: [Self; 3] = [Self::Ingress, Self::Egress, Self::Exit];

    const fn program(self) -> &'static str {
        match self {
            Self::Ingress => PROG_FROM_POD,
            Self::Egress => PROG_TO_POD,
            Self::Exit => PROG_SVC_EXIT,
        }
    }

    const fn attach_type(self) -> TcAttachType {
        match self {
            Self::Ingress => TcAttachType::Ingress,
            Self::Egress | Self::Exit => TcAttachType::Egress,
        }
    }

    const fn suffix(self) -> &'static str {
        match self {
            Self::Ingress => "ingress",
            Self::Egress => "egress",
            Self::Exit => "exit",
        }
    }

    /// The tc (netlink) filter handle: the exit program shares a device with filters of
    /// other software, under a handle of its own.
    const fn tc_handle(self) -> TcHandle {
        match self {
            Self::Ingress | Self::Egress => TcHandle::new(0, 1),
            Self::Exit => TcHandle::new(0, 0xe1),
        }
    }
}

/// `<pin>/v{SCHEMA_VERSION}`.
pub fn versioned_root(pin_path: &Path) -> PathBuf {
    pin_path.join(format!("v{SCHEMA_VERSION}"))
}

/// Pinned link path of `ifindex`'s `hook` under `pin_path`.
pub fn link_pin(pin_path: &Path, ifindex: u32, hook: Hook) -> PathBuf {
    versioned_root(pin_path)
        .join("links")
        .join(format!("{ifindex}-{}", hook.suffix()))
}

/// The loaded programs and their (pinned) maps.
pub struct Datapath {
    ebpf: Ebpf,
    pin_path: PathBuf,
    options: DatapathOptions,
    tcx: bool,
    pub endpoints: EndpointTable,
    pub peers_v4: PeerTable,
    pub peers_v6: HashTable<[u8; 16], PeerInfo>,
    pub cidrs_v4: LpmTable<std::net::Ipv4Addr>,
    pub cidrs_v6: LpmTable<std::net::Ipv6Addr>,
    pub policy: HashTable<PolicyKey, PolicyValue>,
    pub node_ports: HashTable<NodePortKey, u32>,
    /// Held for the life of the agent (the pin keeps it beyond).
    _svc_progs: ProgramArray<MapData>,
    pub conntrack: Conntrack,
    pub counters: Counters,
    events: Option<EventReader>,
    config: Array<MapData, Config>,
    /// The flow table's bucket hash key, written into CONFIG with every config.
    seed: FlowSeed,
    /// Programs look in `CONNTRACK_V4` on every `FLOWS_V4` miss ([`CONFIG_CT_LRU_ALL`]): until
    /// [`Datapath::reattach_all`] has replaced every program that might have recorded flows
    /// there without marking their buckets.
    lru_all: bool,
}

/// A second descriptor of `map`, for the raw batch calls aya does not offer.
fn second_fd(map: &Map) -> Option<std::os::fd::OwnedFd> {
    let data = match map {
        Map::PerCpuArray(d) | Map::HashMap(d) | Map::LruHashMap(d) => d,
        _ => return None,
    };
    std::os::fd::AsFd::as_fd(data.fd())
        .try_clone_to_owned()
        .ok()
}

/// `max_entries` of the map pinned as `name` in `maps_dir`, if one is.
fn pinned_entries(maps_dir: &Path, name: &str) -> Result<Option<u32>> {
    let pin = maps_dir.join(name);
    match MapData::from_pin(&pin) {
        Ok(m) => Ok(Some(
            m.info()
                .with_context(|| format!("reading {}", pin.display()))?
                .max_entries(),
        )),
        Err(_) => Ok(None),
    }
}

/// The [`Config`] pinned in `maps_dir`, if one of this layout is. A pinned CONFIG of another
/// size (an older build's) is unpinned, for the loader to create this build's: it holds only
/// what the agent writes at start.
fn pinned_config(maps_dir: &Path) -> Result<Option<Config>> {
    let pin = maps_dir.join(MAP_CONFIG);
    let Ok(m) = MapData::from_pin(&pin) else {
        return Ok(None);
    };
    let info = m
        .info()
        .with_context(|| format!("reading {}", pin.display()))?;
    if info.value_size() as usize != size_of::<Config>() {
        log::info!(
            "pinned {MAP_CONFIG} has {}-byte values, this build writes {}: replacing it",
            info.value_size(),
            size_of::<Config>()
        );
        std::fs::remove_file(&pin).with_context(|| format!("removing {}", pin.display()))?;
        return Ok(None);
    }
    let mut config = Config::default();
    syscall::lookup_raw(std::os::fd::AsFd::as_fd(m.fd()), &0u32, &mut config)
        .with_context(|| format!("reading {}", pin.display()))?;
    Ok(Some(config))
}

/// Unpins the map `name` when its pinned size is not `want` (counts the loader may start over).
fn unpin_if_resized(maps_dir: &Path, name: &str, want: u32) -> Result<()> {
    if let Some(n) = pinned_entries(maps_dir, name)?
        && n != want
    {
        log::warn!("pinned {name} has {n} slots, this build uses {want}: starting it over");
        std::fs::remove_file(maps_dir.join(name))
            .with_context(|| format!("removing the pinned {name}"))?;
    }
    Ok(())
}

/// The size to grow the peers maps to when `needed` addresses (the larger family) pass
/// [`PEERS_GROW_AT`] percent of `capacity`: the power of two that leaves them at most half
/// full, up to `max`. `None`: no growth (room enough, or already at `max`).
pub fn peers_growth(needed: usize, capacity: u32, max: u32) -> Option<u32> {
    let needed = u64::try_from(needed).unwrap_or(u64::MAX);
    if needed.saturating_mul(100) <= u64::from(capacity) * u64::from(PEERS_GROW_AT)
        || capacity >= max
    {
        return None;
    }
    let size = (needed.saturating_mul(2))
        .checked_next_power_of_two()
        .unwrap_or(u64::MAX)
        .min(u64::from(max));
    u32::try_from(size).ok().filter(|s| *s > capacity)
}

/// The maps that hold the cluster's addresses, replaced together when their size changes
/// (`PEER_SLOTS` is sized from `PEERS_V4`).
const PEER_MAPS: [&str; 3] = [MAP_PEERS_V4, MAP_PEERS_V6, MAP_PEER_SLOTS];

/// Where a replacement of `name` is created and filled before it takes the pin of `name`
/// (bpffs refuses names with a dot).
fn staging_pin(maps_dir: &Path, name: &str) -> PathBuf {
    maps_dir.join(format!("{name}_NEXT"))
}

/// The size of the peers maps for this load, and whether the pinned ones (if any) must be
/// replaced by new ones of it: a size given to keep (`peers_max` not above `peers_size`) or
/// grown to that the pinned maps do not have, or pinned maps created with other flags (an
/// earlier build's, preallocated).
fn peers_plan(maps_dir: &Path, options: &DatapathOptions) -> Result<(u32, bool)> {
    let pin = maps_dir.join(MAP_PEERS_V4);
    let Ok(m) = MapData::from_pin(&pin) else {
        return Ok((options.peers_size, false));
    };
    let info = m
        .info()
        .with_context(|| format!("reading {}", pin.display()))?;
    let pinned = info.max_entries();
    let want = if options.peers_fixed() {
        options.peers_size
    } else {
        pinned.max(options.peers_size)
    };
    let v6 = pinned_entries(maps_dir, MAP_PEERS_V6)?;
    Ok((
        want,
        want != pinned || info.map_flags() != PEERS_MAP_FLAGS || v6.is_some_and(|n| n != want),
    ))
}

/// Copies every entry of the pinned map `name` (the one being replaced, still what the
/// attached programs read) into `to`; returns the entries copied and those that did not fit.
fn copy_pinned<K: aya::Pod, V: aya::Pod>(
    maps_dir: &Path,
    name: &str,
    to: &mut HashMap<MapData, K, V>,
) -> Result<(usize, usize)> {
    let pin = maps_dir.join(name);
    let Ok(data) = MapData::from_pin(&pin) else {
        return Ok((0, 0));
    };
    let from: HashMap<MapData, K, V> = HashMap::try_from(Map::HashMap(data))
        .with_context(|| format!("opening the pinned {name}"))?;
    let (mut copied, mut left) = (0, 0);
    for kv in from.iter() {
        match kv {
            Ok((k, v)) => match to.insert(k, v, 0) {
                Ok(()) => copied += 1,
                Err(_) => left += 1,
            },
            Err(e) if syscall::not_found(&e) => {}
            Err(e) => return Err(e).with_context(|| format!("reading the pinned {name}")),
        }
    }
    Ok((copied, left))
}

fn take(ebpf: &mut Ebpf, name: &str) -> Result<Map> {
    ebpf.take_map(name)
        .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))
}

impl Datapath {
    /// Loads the programs (not yet attached), pins or reuses the maps and writes CONFIG.
    pub fn open(options: DatapathOptions) -> Result<Self> {
        if OBJECT.is_empty() {
            bail!("this build has no eBPF object (built with AYA_BUILD_SKIP): rebuild without it");
        }
        ensure_bpffs(&options.pin_path)?;
        let root = versioned_root(&options.pin_path);
        let maps_dir = root.join("maps");
        for dir in [&maps_dir, &root.join("links")] {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        bump_memlock_rlimit();

        // The sizes the programs are built for are the pinned maps' when reused: the programs
        // must agree with the maps (a pinned one keeps its size, whatever the flags say now).
        let buckets = if options.flow_table {
            pinned_entries(&maps_dir, MAP_FLOWS_V4)?
                .unwrap_or_else(|| flows::buckets_for(options.conntrack_size))
        } else {
            0
        };
        // Peers maps of another size are new maps, created under a staging pin and filled
        // from the pinned ones before they take their pins; the programs attached until
        // `reattach_all` keep reading the old ones meanwhile, so there is no gap.
        let (peers_size, replace_peers) = peers_plan(&maps_dir, &options)?;
        let peer_buckets = if replace_peers {
            peer_buckets_for(peers_size)
        } else {
            pinned_entries(&maps_dir, MAP_PEER_SLOTS)?
                .unwrap_or_else(|| peer_buckets_for(peers_size))
        };
        // Counters are indexed by (endpoint, direction, reason): a pinned array of another
        // layout (another reason count or endpoint limit) would misfile every count. Counters
        // are statistics, not state: start them over.
        let counters = counter_slots(options.max_endpoints);
        unpin_if_resized(&maps_dir, MAP_COUNTERS, counters)?;
        // Flow counts by endpoint id: the conntrack sweep recounts them.
        let flow_counts = options.max_endpoints + 1;
        unpin_if_resized(&maps_dir, MAP_FLOW_COUNTS, flow_counts)?;
        // A program array of an earlier build with fewer slots (no audit program): a new one.
        // The programs still attached keep the old one until `reattach_all` replaces them.
        unpin_if_resized(&maps_dir, MAP_SVC_PROGS, SVC_PROG_COUNT)?;
        // The bucket hash's key lives as long as the table: kept in CONFIG beside it, drawn
        // anew with a new table. A table an older build created keeps its unkeyed hash (its
        // flows sit in the buckets that hash picked) until its pins are removed.
        let flows_pinned = pinned_entries(&maps_dir, MAP_FLOWS_V4)?.is_some();
        let seed = match (flows_pinned, pinned_config(&maps_dir)?) {
            (true, Some(c)) => c.flow_seed,
            (true, None) => {
                log::warn!(
                    "the pinned {MAP_FLOWS_V4} was created by an earlier build: its bucket hash stays unkeyed until `enforcer cleanup` or a reboot"
                );
                FlowSeed::UNKEYED
            }
            (false, _) => random_seed()?,
        };
        let mut loader = EbpfLoader::new();
        for name in PINNED_MAPS {
            loader.map_pin_path(name, maps_dir.join(name));
        }
        for name in PEER_MAPS {
            // A staging map an agent left when it stopped halfway: never used, start it over.
            let stage = staging_pin(&maps_dir, name);
            if stage.exists() {
                std::fs::remove_file(&stage)
                    .with_context(|| format!("removing {}", stage.display()))?;
            }
            if replace_peers {
                loader.map_pin_path(name, stage);
            }
        }
        loader
            .override_global("FLOW_BUCKETS", &buckets, true)
            .override_global("PEER_BUCKETS", &peer_buckets, true)
            .override_global("FLOW_SEED", &seed, true)
            .map_max_entries(MAP_FLOW_COUNTS, flow_counts)
            .map_max_entries(MAP_PEER_SLOTS, peer_buckets)
            .map_max_entries(MAP_FLOWS_V4, buckets.max(1))
            .map_max_entries(MAP_ENDPOINTS, options.max_endpoints)
            .map_max_entries(MAP_PEERS_V4, peers_size)
            .map_max_entries(MAP_PEERS_V6, peers_size)
            .map_max_entries(MAP_CIDRS_V4, options.cidrs_size)
            .map_max_entries(MAP_CIDRS_V6, options.cidrs_size)
            .map_max_entries(MAP_POLICY, options.policy_size)
            .map_max_entries(MAP_CONNTRACK_V4, options.conntrack_size)
            .map_max_entries(MAP_CONNTRACK_V6, options.conntrack_size)
            .map_max_entries(MAP_FRAGMENTS, options.fragments_size)
            .map_max_entries(MAP_NODE_PORTS, options.node_ports_size)
            .map_max_entries(
                MAP_SERVICE_FLOWS,
                service_flows_size(options.conntrack_size),
            )
            .map_max_entries(MAP_COUNTERS, counters)
            .map_max_entries(MAP_EVENTS, options.events_bytes);
        let mut ebpf = loader.load(OBJECT).context("loading the eBPF object")?;

        for name in [
            PROG_FROM_POD,
            PROG_TO_POD,
            PROG_SVC_POD,
            PROG_SVC_EXIT,
            PROG_AUDIT_POD,
        ] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))?
                .try_into()
                .with_context(|| format!("program {name} is not a classifier"))?;
            prog.load()
                .with_context(|| format!("loading program {name} (verifier)"))?;
            // How much of the verifier's budget (1M instructions processed) each program takes:
            // `from_pod` runs close to it.
            if let Some(n) = prog
                .info()
                .ok()
                .and_then(|i| i.verified_instruction_count())
            {
                log::debug!("program {name}: {n} instructions processed by the verifier");
            }
        }
        // The tail calls between `to_pod` and the judge of deferred Service packets, and to the
        // program that lets audit mode's would-drop flows through (without it they drop, as
        // enforcing would).
        let mut svc_progs = ProgramArray::try_from(take(&mut ebpf, MAP_SVC_PROGS)?)
            .with_context(|| format!("map {MAP_SVC_PROGS}"))?;
        for (index, name) in [
            (SVC_PROG_JUDGE, PROG_SVC_POD),
            (SVC_PROG_TO_POD, PROG_TO_POD),
            (SVC_PROG_AUDIT, PROG_AUDIT_POD),
        ] {
            let prog: &SchedClassifier = ebpf
                .program(name)
                .ok_or_else(|| anyhow!("program {name} missing"))?
                .try_into()?;
            svc_progs
                .set(index, prog.fd()?, 0)
                .with_context(|| format!("setting {name} in {MAP_SVC_PROGS}"))?;
        }

        let endpoints_hash = HashTable::new(
            MAP_ENDPOINTS,
            HashMap::try_from(take(&mut ebpf, MAP_ENDPOINTS)?)?,
        );
        let slots_map = take(&mut ebpf, MAP_ENDPOINT_SLOTS)?;
        let Map::Array(slots_data) = &slots_map else {
            bail!("map {MAP_ENDPOINT_SLOTS} is not an array");
        };
        let slot_memory = slots::SlotMemory::map(std::os::fd::AsFd::as_fd(slots_data.fd()))?;
        let endpoints = EndpointTable {
            slots: slots::SlotSync::new(
                slot_memory,
                slots::SLOTS_SUPPORTED,
                endpoints_hash
                    .entries()
                    .context("reading ENDPOINTS to fill its slots")?,
            ),
            hash: endpoints_hash,
        };
        let mut peers_v4_map = HashMap::try_from(take(&mut ebpf, MAP_PEERS_V4)?)?;
        let mut peers_v6_map = HashMap::try_from(take(&mut ebpf, MAP_PEERS_V6)?)?;
        if replace_peers {
            let (v4, left4) = copy_pinned(&maps_dir, MAP_PEERS_V4, &mut peers_v4_map)?;
            let (v6, left6) = copy_pinned(&maps_dir, MAP_PEERS_V6, &mut peers_v6_map)?;
            log::info!(
                "{MAP_PEERS_V4} and {MAP_PEERS_V6} now have {peers_size} entries each: {v4} and {v6} addresses carried over"
            );
            if left4 + left6 > 0 {
                log::warn!(
                    "{} addresses did not fit the new peers maps: policies judge them by their ipBlocks until the next reconcile reports them",
                    left4 + left6
                );
            }
        }
        let peers_hash = HashTable::new(MAP_PEERS_V4, peers_v4_map);
        let peer_slots_map = take(&mut ebpf, MAP_PEER_SLOTS)?;
        let Map::Array(peer_slots_data) = &peer_slots_map else {
            bail!("map {MAP_PEER_SLOTS} is not an array");
        };
        let peers_v4 = PeerTable {
            slots: peer_slots::PeerSlotSync::new(
                peer_slots::PeerSlotMemory::map(
                    std::os::fd::AsFd::as_fd(peer_slots_data.fd()),
                    peer_buckets,
                )?,
                peers_hash
                    .entries()
                    .context("reading PEERS_V4 to fill its cache")?,
            ),
            hash: peers_hash,
        };
        let peers_v6 = HashTable::new(MAP_PEERS_V6, peers_v6_map);
        if replace_peers {
            // Filled (PEER_SLOTS from PEERS_V4 just above): they take the pins. Until the
            // links run this object's programs, the old maps stay what they read.
            for name in PEER_MAPS {
                let (stage, pin) = (staging_pin(&maps_dir, name), maps_dir.join(name));
                std::fs::rename(&stage, &pin)
                    .with_context(|| format!("moving {} to {}", stage.display(), pin.display()))?;
            }
        }
        let cidrs_v4 = LpmTable::new(
            MAP_CIDRS_V4,
            LpmTrie::try_from(take(&mut ebpf, MAP_CIDRS_V4)?)?,
        )?;
        let cidrs_v6 = LpmTable::new(
            MAP_CIDRS_V6,
            LpmTrie::try_from(take(&mut ebpf, MAP_CIDRS_V6)?)?,
        )?;
        let policy = HashTable::new(MAP_POLICY, HashMap::try_from(take(&mut ebpf, MAP_POLICY)?)?);
        let node_ports = HashTable::new(
            MAP_NODE_PORTS,
            HashMap::try_from(take(&mut ebpf, MAP_NODE_PORTS)?)?,
        );
        let (ct_v4, ct_v6) = (
            take(&mut ebpf, MAP_CONNTRACK_V4)?,
            take(&mut ebpf, MAP_CONNTRACK_V6)?,
        );
        let flows_map = take(&mut ebpf, MAP_FLOWS_V4)?;
        let flows = if buckets > 0 {
            let Map::Array(data) = &flows_map else {
                bail!("map {MAP_FLOWS_V4} is not an array");
            };
            let fd = std::os::fd::AsFd::as_fd(data.fd())
                .try_clone_to_owned()
                .with_context(|| format!("duplicating the descriptor of {MAP_FLOWS_V4}"))?;
            Some(flows::FlowTable::new(fd, buckets, seed))
        } else {
            None
        };
        let counts_map = take(&mut ebpf, MAP_FLOW_COUNTS)?;
        let Map::Array(counts_data) = &counts_map else {
            bail!("map {MAP_FLOW_COUNTS} is not an array");
        };
        let counts = std::sync::Arc::new(conntrack::FlowCounts::map(
            std::os::fd::AsFd::as_fd(counts_data.fd()),
            flow_counts,
        )?);
        let config_map = take(&mut ebpf, MAP_CONFIG)?;
        let config_fd = match &config_map {
            Map::Array(d) => std::os::fd::AsFd::as_fd(d.fd())
                .try_clone_to_owned()
                .with_context(|| format!("duplicating the descriptor of {MAP_CONFIG}"))?,
            _ => bail!("map {MAP_CONFIG} is not an array"),
        };
        let counter = match (second_fd(&ct_v4), second_fd(&ct_v6)) {
            (Some(v4), Some(v6)) => Some(ConntrackCounter {
                flows: match &flows {
                    Some(f) => Some(f.try_clone()?),
                    None => None,
                },
                v4,
                v6,
                config: config_fd,
                counts: std::sync::Arc::clone(&counts),
            }),
            _ => None,
        };
        let conntrack = Conntrack {
            counts,
            flows,
            v4: HashTable::new(MAP_CONNTRACK_V4, HashMap::try_from(ct_v4)?),
            v6: HashTable::new(MAP_CONNTRACK_V6, HashMap::try_from(ct_v6)?),
            counter,
        };
        let counters_map = take(&mut ebpf, MAP_COUNTERS)?;
        let counters_fd = second_fd(&counters_map);
        let counters = Counters {
            map: PerCpuArray::try_from(counters_map).context("map COUNTERS")?,
            fd: counters_fd,
            slots: counter_slots(options.max_endpoints),
        };
        let events = EventReader {
            ring: RingBuf::try_from(take(&mut ebpf, MAP_EVENTS)?).context("map EVENTS")?,
        };
        let config = Array::try_from(config_map).context("map CONFIG")?;

        let tcx = options.attach.uses_tcx();
        log::debug!(
            "attach mode {}: {}",
            options.attach,
            if tcx {
                "TCX links"
            } else {
                "tc (clsact) filters"
            }
        );
        // Programs of an older build may still run on pinned links, or have left IPv4 flows in
        // CONNTRACK_V4 that no FLOWS_V4 bucket points at.
        let lru_all = conntrack.flows.is_some()
            && (conntrack.v4.map.keys().next().is_some()
                || !Self::attached_at(&options.pin_path)?.is_empty());
        let mut dp = Self {
            lru_all,
            ebpf,
            pin_path: options.pin_path.clone(),
            options,
            tcx,
            endpoints,
            peers_v4,
            peers_v6,
            cidrs_v4,
            cidrs_v6,
            policy,
            node_ports,
            _svc_progs: svc_progs,
            conntrack,
            counters,
            events: Some(events),
            config,
            seed,
        };
        let cfg = dp.options.config();
        dp.set_config(&cfg)?;
        dp.migrate_conntrack();
        Ok(dp)
    }

    pub fn options(&self) -> &DatapathOptions {
        &self.options
    }

    /// Replaces `PEERS_V4`, `PEERS_V6` and their cache by maps of `size` entries without a
    /// gap: this object's programs are loaded again against new maps filled from the current
    /// ones, then every pinned link is re-pointed at them atomically (until then, and for a
    /// packet already under way, the old programs read the old maps, which hold the same).
    /// The verdict-event reader taken from this datapath keeps reading the same ring.
    pub fn grow_peers(&mut self, size: u32) -> Result<()> {
        let mut options = self.options.clone();
        options.peers_size = size;
        let mut next =
            Self::open(options).context("loading the programs against larger peers maps")?;
        next.reattach_all()
            .context("re-pointing the links at the programs of the larger peers maps")?;
        next.events = self.events.take();
        *self = next;
        Ok(())
    }

    /// `<pin>/v{SCHEMA_VERSION}`.
    pub fn root(&self) -> PathBuf {
        versioned_root(&self.pin_path)
    }

    /// Writes the global settings (with [`CONFIG_CT_LRU_ALL`] while it is due).
    pub fn set_config(&mut self, config: &Config) -> Result<()> {
        let mut config = *config;
        config.flow_seed = self.seed;
        if self.lru_all {
            config.flags |= CONFIG_CT_LRU_ALL;
        }
        self.config.set(0, config, 0).context("writing map CONFIG")
    }

    pub fn config(&self) -> Result<Config> {
        self.config.get(&0, 0).context("reading map CONFIG")
    }

    /// Verdict events lost to a full ring buffer since these programs were loaded.
    pub fn events_lost(&self) -> Result<u64> {
        let map = self
            .ebpf
            .map(enforcer_common::MAP_EVENTS_LOST)
            .ok_or_else(|| anyhow!("map EVENTS_LOST missing from the eBPF object"))?;
        let lost: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(map).context("map EVENTS_LOST")?;
        let values = lost.get(&0, 0).context("reading map EVENTS_LOST")?;
        Ok(values.iter().sum())
    }

    /// Takes the verdict-event reader (once).
    pub fn take_events(&mut self) -> Option<EventReader> {
        self.events.take()
    }

    /// A loaded program, for `BPF_PROG_TEST_RUN` (tests and benchmarks).
    pub fn program(&self, hook: Hook) -> Result<&SchedClassifier> {
        self.ebpf
            .program(hook.program())
            .ok_or_else(|| anyhow!("program {} missing", hook.program()))?
            .try_into()
            .with_context(|| format!("program {} is not a classifier", hook.program()))
    }

    /// Runs `hook`'s program once on `frame` as if it arrived on `ifindex` (which must name a
    /// device in the calling thread's network namespace). Returns the TC action.
    pub fn test_run(&self, hook: Hook, ifindex: u32, frame: &[u8]) -> Result<i32> {
        let ctx = sk_buff_ctx(ifindex);
        let opts = aya::programs::TestRunOptions {
            data_in: Some(frame),
            ctx_in: Some(&ctx),
            repeat: 1,
            ..Default::default()
        };
        let r = aya::programs::TestRun::test_run(self.program(hook)?, opts)
            .with_context(|| format!("BPF_PROG_TEST_RUN of {}", hook.program()))?;
        #[expect(clippy::cast_possible_wrap, reason = "TC actions are small")]
        Ok(r.return_value as i32)
    }

    /// [`Datapath::test_run`] of a packet carrying `mark` (`skb->mark`); returns the TC action
    /// and the mark the programs left (a deferred Service packet carries its slot there).
    pub fn test_run_marked(
        &self,
        hook: Hook,
        ifindex: u32,
        frame: &[u8],
        mark: u32,
    ) -> Result<(i32, u32)> {
        let mut ctx = sk_buff_ctx(ifindex);
        ctx[8..12].copy_from_slice(&mark.to_ne_bytes());
        let mut ctx_out = vec![0u8; ctx.len()];
        let opts = aya::programs::TestRunOptions {
            data_in: Some(frame),
            ctx_in: Some(&ctx),
            ctx_out: Some(&mut ctx_out),
            repeat: 1,
            ..Default::default()
        };
        let r = aya::programs::TestRun::test_run(self.program(hook)?, opts)
            .with_context(|| format!("BPF_PROG_TEST_RUN of {}", hook.program()))?;
        let mark = u32::from_ne_bytes([ctx_out[8], ctx_out[9], ctx_out[10], ctx_out[11]]);
        #[expect(clippy::cast_possible_wrap, reason = "TC actions are small")]
        Ok((r.return_value as i32, mark))
    }

    /// Attaches both programs to the host-side veth `ifindex` (in the calling thread's network
    /// namespace) and pins the links. A link already pinned for it (agent restart or upgrade)
    /// is re-pointed at this object's programs atomically.
    pub fn attach(&mut self, ifindex: u32) -> Result<()> {
        for hook in Hook::ALL {
            self.attach_hook(ifindex, hook)
                .with_context(|| format!("attaching {} to ifindex {ifindex}", hook.program()))?;
        }
        Ok(())
    }

    /// Attaches `hook` the way this load's mode says, then removes an attachment of the other
    /// kind an earlier agent left (after the new one, so the hook is never empty).
    fn attach_hook(&mut self, ifindex: u32, hook: Hook) -> Result<()> {
        let pin = link_pin(&self.pin_path, ifindex, hook);
        let marker = attach::tc_marker(&self.pin_path, ifindex, hook);
        if self.tcx {
            self.attach_tcx(ifindex, hook, &pin)?;
            if marker.exists() {
                attach::tc_detach(&marker, ifindex, hook)
                    .context("removing the tc filter of an earlier attach")?;
            }
        } else {
            self.attach_tc(ifindex, hook)?;
            attach::record_tc(&marker)?;
            if pin.exists() {
                bpffs::detach_pinned_link(&pin)
                    .with_context(|| format!("detaching the earlier {}", pin.display()))?;
            }
        }
        Ok(())
    }

    fn program_mut(&mut self, hook: Hook) -> Result<&mut SchedClassifier> {
        Ok(self
            .ebpf
            .program_mut(hook.program())
            .ok_or_else(|| anyhow!("program {} missing", hook.program()))?
            .try_into()?)
    }

    /// A TCX link, pinned at `pin`; a live pinned link of this device is re-pointed in place.
    fn attach_tcx(&mut self, ifindex: u32, hook: Hook, pin: &Path) -> Result<()> {
        let prog = self.program_mut(hook)?;
        if pin.exists() {
            match bpffs::tcx_link_ifindex(pin) {
                Ok(i) if i == ifindex => {
                    let old = PinnedLink::from_pin(pin)
                        .with_context(|| format!("opening {}", pin.display()))?;
                    let link = SchedClassifierLink::try_from(FdLink::from(old))?;
                    let id = prog.attach_to_link(link).context("bpf_link_update")?;
                    // Our fd goes; the pin keeps the link.
                    drop(prog.take_link(id)?);
                    return Ok(());
                }
                // The device went away (ifindex 0) or the index was reused: the link is defunct.
                Ok(_) | Err(_) => {
                    std::fs::remove_file(pin)
                        .with_context(|| format!("removing stale {}", pin.display()))?;
                }
            }
        }
        let ifname = ifname(ifindex)?;
        let id = prog
            .attach_with_options(
                &ifname,
                hook.attach_type(),
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .context("TCX attach")?;
        let link: FdLink = prog.take_link(id)?.try_into()?;
        link.pin(pin)
            .with_context(|| format!("pinning link at {}", pin.display()))?;
        Ok(())
    }

    /// clsact + cls_bpf through netlink with a fixed priority and handle, so a later attach
    /// replaces the filter in place. Netlink filters are not tied to an fd: the link is
    /// forgotten so dropping it does not detach.
    fn attach_tc(&mut self, ifindex: u32, hook: Hook) -> Result<()> {
        let ifname = ifname(ifindex)?;
        let prog = self.program_mut(hook)?;
        // The device's qdisc is there from the other hook or an earlier agent: netlink says
        // EEXIST, below aya's own error.
        if let Err(e) = aya::programs::tc::qdisc_add_clsact(&ifname)
            && !matches!(&e, aya::programs::tc::TcError::AlreadyAttached)
            && !caused_by_errno(&e, libc::EEXIST)
        {
            return Err(e).context("adding clsact qdisc");
        }
        let opts = NlOptions {
            priority: 1,
            handle: hook.tc_handle(),
            classid: None,
        };
        let id = match SchedClassifierLink::attached(
            &ifname,
            hook.attach_type(),
            1,
            hook.tc_handle(),
            None,
        ) {
            Ok(existing) => prog.attach_to_link(existing).or_else(|_| {
                prog.attach_with_options(
                    &ifname,
                    hook.attach_type(),
                    TcAttachOptions::Netlink(opts),
                )
            }),
            Err(_) => prog.attach_with_options(
                &ifname,
                hook.attach_type(),
                TcAttachOptions::Netlink(opts),
            ),
        }
        .context("netlink attach")?;
        std::mem::forget(prog.take_link(id)?);
        Ok(())
    }

    /// Moves IPv4 flows left in the IPv6 conntrack map by an older agent's programs to the IPv4
    /// map. Runs at load and again once the pinned links run this object's programs (the old
    /// programs may record flows until then). Failing only costs those flows a new policy
    /// check, so it is logged, not fatal.
    pub fn migrate_conntrack(&mut self) {
        match self.conntrack.migrate_v4() {
            Ok(0) => {}
            Ok(n) => log::info!("moved {n} IPv4 flows of an older agent to {MAP_CONNTRACK_V4}"),
            Err(e) => log::warn!("moving IPv4 flows to {MAP_CONNTRACK_V4}: {e:#}"),
        }
    }

    /// Re-points every pinned link at this object's programs (after an upgrade); returns the
    /// ifindexes. Links of devices that are gone are removed.
    pub fn reattach_all(&mut self) -> Result<Vec<u32>> {
        let mut done = Vec::new();
        for ifindex in Self::attached_at(&self.pin_path)? {
            // A TCX link knows its device; a tc record only that a device had the index.
            let live = Hook::ALL.iter().any(|&h| {
                bpffs::tcx_link_ifindex(&link_pin(&self.pin_path, ifindex, h))
                    .is_ok_and(|i| i == ifindex)
                    || (attach::tc_marker(&self.pin_path, ifindex, h).exists()
                        && ifname(ifindex).is_ok())
            });
            if live {
                self.attach(ifindex)?;
                done.push(ifindex);
            } else {
                self.detach(ifindex)?;
            }
        }
        for ifindex in self.exits_attached()? {
            let hook = Hook::Exit;
            let live = bpffs::tcx_link_ifindex(&link_pin(&self.pin_path, ifindex, hook))
                .is_ok_and(|i| i == ifindex)
                || (attach::tc_marker(&self.pin_path, ifindex, hook).exists()
                    && ifname(ifindex).is_ok());
            if live {
                self.attach_exit(ifindex)?;
            } else {
                self.detach_exit(ifindex)?;
            }
        }
        self.migrate_conntrack();
        self.settle_conntrack()?;
        Ok(done)
    }

    /// Once every pinned link runs this build's programs: points the `FLOWS_V4` bucket of
    /// every flow in `CONNTRACK_V4` there ([`FLOW_OVERFLOW`](enforcer_common::FLOW_OVERFLOW)),
    /// then lets the programs look in `CONNTRACK_V4` only on such buckets again.
    pub fn settle_conntrack(&mut self) -> Result<()> {
        if !self.lru_all {
            return Ok(());
        }
        let n = self
            .conntrack
            .mark_lru_flows()
            .context("marking the buckets of the flows in CONNTRACK_V4")?;
        self.lru_all = false;
        let cfg = self.options.config();
        self.set_config(&cfg)?;
        log::info!("{MAP_FLOWS_V4}: {n} flows of earlier programs stay in {MAP_CONNTRACK_V4}");
        Ok(())
    }

    /// Detaches both programs from `ifindex` (unpins its links).
    pub fn detach(&mut self, ifindex: u32) -> Result<()> {
        detach_at(&self.pin_path, ifindex)
    }

    /// ifindexes with a pinned link, from the pins.
    pub fn attached(&self) -> Result<Vec<u32>> {
        Self::attached_at(&self.pin_path)
    }

    /// Attaches the exit program to the TC egress of `ifindex`, one of the node's interfaces
    /// that is not a pod's veth (re-pointing a pinned link, like [`Datapath::attach`]).
    pub fn attach_exit(&mut self, ifindex: u32) -> Result<()> {
        self.attach_hook(ifindex, Hook::Exit)
            .with_context(|| format!("attaching {PROG_SVC_EXIT} to ifindex {ifindex}"))
    }

    /// Detaches the exit program from `ifindex`.
    pub fn detach_exit(&mut self, ifindex: u32) -> Result<()> {
        detach_hook_at(&self.pin_path, ifindex, Hook::Exit)
    }

    /// ifindexes with the exit program attached, from the pins.
    pub fn exits_attached(&self) -> Result<Vec<u32>> {
        links_at(&self.pin_path, &[Hook::Exit])
    }

    /// ifindexes with a pod's programs pinned under `pin_path`.
    pub fn attached_at(pin_path: &Path) -> Result<Vec<u32>> {
        links_at(pin_path, &Hook::ALL)
    }
}

/// ifindexes with a link (or tc record) of one of `hooks` under `pin_path`.
fn links_at(pin_path: &Path, hooks: &[Hook]) -> Result<Vec<u32>> {
    let dir = versioned_root(pin_path).join("links");
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    for entry in entries {
        let name = entry
            .with_context(|| format!("listing {}", dir.display()))?
            .file_name();
        let name = name.to_string_lossy();
        if let Some((index, rest)) = name.split_once('-')
            && let Ok(index) = index.parse::<u32>()
            && hooks
                .iter()
                .any(|h| rest.strip_suffix("-tc").unwrap_or(rest) == h.suffix())
            && !out.contains(&index)
        {
            out.push(index);
        }
    }
    out.sort_unstable();
    Ok(out)
}

impl Datapath {
    /// Removes everything under `pin_path`: unpins the links (which detaches the programs),
    /// removes the recorded tc filters (from the calling thread's network namespace) and the
    /// maps of every schema version. Works without loading anything.
    pub fn cleanup(pin_path: &Path) -> Result<()> {
        let entries = match std::fs::read_dir(pin_path) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e).with_context(|| format!("listing {}", pin_path.display())),
        };
        for entry in entries {
            let entry = entry?;
            let path = entry.path();
            if !entry.file_name().to_string_lossy().starts_with('v') || !path.is_dir() {
                continue;
            }
            // Links first, so no program runs on a half-removed set of maps.
            for sub in ["links", "maps"] {
                let dir = path.join(sub);
                if let Ok(files) = std::fs::read_dir(&dir) {
                    for f in files {
                        let f = f?.path();
                        if sub == "links" {
                            let name = f.file_name().unwrap_or_default().to_string_lossy();
                            match attach::parse_tc_marker(&name) {
                                Some((ifindex, hook)) => attach::tc_detach(&f, ifindex, hook)?,
                                None => bpffs::detach_pinned_link(&f)
                                    .with_context(|| format!("detaching {}", f.display()))?,
                            }
                        } else {
                            std::fs::remove_file(&f)
                                .with_context(|| format!("removing {}", f.display()))?;
                        }
                    }
                    std::fs::remove_dir(&dir)
                        .with_context(|| format!("removing {}", dir.display()))?;
                }
            }
            std::fs::remove_dir(&path).with_context(|| format!("removing {}", path.display()))?;
        }
        let _ = std::fs::remove_dir(pin_path);
        Ok(())
    }
}

/// Detaches both hooks of `ifindex` under `pin_path`: unpins its TCX links, removes its tc
/// filters (from the calling thread's network namespace) and their records.
pub fn detach_at(pin_path: &Path, ifindex: u32) -> Result<()> {
    for hook in Hook::ALL {
        detach_hook_at(pin_path, ifindex, hook)?;
    }
    Ok(())
}

/// Detaches one hook of `ifindex` under `pin_path`.
fn detach_hook_at(pin_path: &Path, ifindex: u32, hook: Hook) -> Result<()> {
    let pin = link_pin(pin_path, ifindex, hook);
    bpffs::detach_pinned_link(&pin).with_context(|| format!("detaching {}", pin.display()))?;
    let marker = attach::tc_marker(pin_path, ifindex, hook);
    if marker.exists() {
        attach::tc_detach(&marker, ifindex, hook)?;
    }
    Ok(())
}

/// Whether `errno` is somewhere in `e`'s chain of causes.
fn caused_by_errno(e: &(dyn std::error::Error + 'static), errno: i32) -> bool {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if c.downcast_ref::<io::Error>()
            .is_some_and(|io| io.raw_os_error() == Some(errno))
        {
            return true;
        }
        cause = c.source();
    }
    false
}

fn ifname(ifindex: u32) -> Result<String> {
    let mut buf = [0u8; libc::IF_NAMESIZE];
    // SAFETY: buf has IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr().cast()) };
    if p.is_null() {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("no interface with ifindex {ifindex}"));
    }
    let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    Ok(String::from_utf8_lossy(&buf[..len]).into_owned())
}

/// A `struct __sk_buff` with only `ifindex` set, as `BPF_PROG_TEST_RUN` accepts for ctx_in.
fn sk_buff_ctx(ifindex: u32) -> Vec<u8> {
    // struct __sk_buff: len, pkt_type, mark, queue_mapping, protocol, vlan_present, vlan_tci,
    // vlan_proto, priority, ingress_ifindex, ifindex (u32 each), ... 192 bytes in all.
    let mut ctx = vec![0u8; 192];
    ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
    ctx
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK (https://lwn.net/Articles/837122/).
fn bump_memlock_rlimit() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: valid pointer to a rlimit.
    let _ = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_grow_past_eighty_percent_to_half_full_up_to_the_ceiling() {
        let max = DEFAULT_PEERS_MAX;
        // Room enough: 80 % exactly stays.
        assert_eq!(peers_growth(0, 1024, max), None);
        assert_eq!(peers_growth(819, 1024, max), None);
        // Past it: the power of two that leaves them at most half full.
        assert_eq!(peers_growth(820, 1024, max), Some(2048));
        assert_eq!(peers_growth(230_000, 262_144, max), Some(524_288));
        // A jump (a cluster listed at once) goes there in one growth.
        assert_eq!(peers_growth(100_000, 1024, max), Some(262_144));
        // The ceiling caps it; at the ceiling (or a fixed size) there is no growth.
        assert_eq!(peers_growth(3_500_000, 4_000_000, max), Some(max));
        assert_eq!(peers_growth(4_000_000, max, max), None);
        assert_eq!(peers_growth(900, 1024, 1024), None);
        assert_eq!(peers_growth(900, 1024, 512), None);
    }
}
