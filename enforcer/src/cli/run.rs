//! `enforcer run`: the node agent. Sources feed the control loop, which compiles and reconciles
//! into the datapath; the health, attestation and flow-log tasks run beside it.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use enforcer_common::{
    DEFAULT_CONNTRACK_SIZE, DEFAULT_EVENTS_BYTES, DEFAULT_FRAGMENTS_SIZE, DEFAULT_MAX_ENDPOINTS,
    DEFAULT_PEERS_SIZE, DEFAULT_POLICY_SIZE,
};
use enforcer_policy::compile::CompileOptions;

use crate::{
    agent::Agent,
    datapath::{
        AttachMode, DEFAULT_PIN_PATH, Datapath, DatapathOptions, default_flow_limit,
        routes::local_addresses,
    },
    identity::{
        attestation::{Identity, LivePods, RecordStore, RecordWriter, RecordsView},
        records,
    },
    observe::{
        View,
        flowlog::{FlowLog, FlowLogStats, FlowLogTarget, Rotation},
        health,
        metrics::Status,
    },
    source::{
        Source,
        liveness::{self, WatchBeats},
        records::{RecordsFolder, RecordsRx, RecordsSource},
        watch::ManifestsSource,
    },
};

#[derive(clap::Args)]
pub struct RunArgs {
    /// Standalone: read and watch the manifests in this folder instead of the API server.
    #[arg(long)]
    manifests: Option<PathBuf>,
    /// This node's name (pods with this `spec.nodeName` are enforced here).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// bpffs folder for pinned maps and links (mounted when absent under /sys/fs/bpf).
    #[arg(long, default_value = DEFAULT_PIN_PATH)]
    pin_path: PathBuf,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, default_value = "127.0.0.1:9901")]
    health_addr: SocketAddr,
    /// The node's own addresses (always allowed to and from its pods); default: every address
    /// on the node's interfaces.
    #[arg(long = "node-ip")]
    node_ips: Vec<IpAddr>,
    /// Log allowed new flows too, not only drops.
    #[arg(long)]
    log_allowed: bool,
    /// Where the flow log goes: `stdout`, `file:PATH` (appended; rotated by size, see
    /// --flow-log-max-mib) or `off`.
    #[arg(long, default_value = "stdout")]
    flow_log: FlowLogTarget,
    /// A flow log file past this size (MiB) is renamed PATH.1 (PATH.1 to PATH.2, ...) and a new
    /// one begun.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    flow_log_max_mib: u64,
    /// Rotated flow log files kept besides the current one; older ones are removed.
    #[arg(long, default_value_t = 5)]
    flow_log_keep: u32,
    /// Flow log lines per second at most; the rest are counted as rate-limited.
    #[arg(long, default_value_t = 1000)]
    flow_log_rate: u32,
    /// /healthz fails when the control loop has not turned for this long (it turns at least
    /// every 100 ms, idle or not; a compile of a large cluster holds it).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    loop_stall_timeout: Duration,
    /// /healthz fails when a watch of the API server has shown no sign of life (an event, a
    /// bookmark, a restart, an error) for this long; the API server sends a bookmark about once
    /// a minute on a quiet watch.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    watch_stall_timeout: Duration,
    /// Export packet counters per pod on /metrics.
    #[arg(long)]
    per_pod_metrics: bool,
    /// Pods this node can enforce (ENDPOINTS map size).
    #[arg(long, default_value_t = DEFAULT_MAX_ENDPOINTS)]
    max_endpoints: u32,
    /// Entries of each pod/node address map (`PEERS_V4`, `PEERS_V6`) to start with; also the
    /// buckets of `PEER_SLOTS`, their IPv4 cache (16 bytes each, two addresses a bucket). The
    /// maps grow (new maps filled, then swapped in without a gap) when the cluster's addresses
    /// pass 80 % of them, up to --peers-map-max.
    #[arg(long, default_value_t = DEFAULT_PEERS_SIZE)]
    peers_map_size: u32,
    /// The most entries the address maps may grow to. At or below --peers-map-size they keep
    /// --peers-map-size exactly (maps pinned at another size are replaced, without a gap).
    #[arg(long, default_value_t = enforcer_common::DEFAULT_PEERS_MAX)]
    peers_map_max: u32,
    /// Entries of the policy map.
    #[arg(long, default_value_t = DEFAULT_POLICY_SIZE)]
    policy_map_size: u32,
    /// How the programs hook each pod's veth: `tcx` links (kernel 6.6+), `tc` (clsact +
    /// cls_bpf filters, for older kernels), or `auto` (TCX where the kernel has it). Switching
    /// modes across a restart moves every hook to the new kind without a gap.
    #[arg(long, value_enum, default_value_t = AttachMode::Auto)]
    attach_mode: AttachMode,
    /// Entries of each LRU conntrack map (one for IPv4 flows, one for IPv6 flows); on x86-64
    /// also the flows of the IPv4 flow table in front of the IPv4 map (half as many buckets of
    /// two flows, 64 bytes each), which then holds only the flows of full buckets.
    #[arg(long, default_value_t = DEFAULT_CONNTRACK_SIZE)]
    conntrack_map_size: u32,
    /// Flows one pod may hold in conntrack per direction of origin (its own connections; those
    /// others open to it); a new flow past it is dropped (reason `flow-limit`), so one pod's
    /// flood cannot take the room the other pods' flows need. Default: half of
    /// --conntrack-map-size. 0: no limit.
    #[arg(long)]
    ct_max_flows_per_endpoint: Option<u32>,
    /// Idle time after which an established TCP flow is forgotten (e.g. `6h`, `30m`).
    #[arg(long, default_value = "6h", value_parser = parse_duration)]
    ct_timeout_tcp: Duration,
    /// Idle time of a TCP flow whose other end has not answered (a half-open connection).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    ct_timeout_tcp_syn: Duration,
    /// Idle time of a TCP flow closed by a RST or a FIN from each end.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    ct_timeout_tcp_closed: Duration,
    /// Idle time of a UDP, SCTP or ICMP flow (and of a revoked flow's tombstone).
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    ct_timeout_other: Duration,
    /// How often conntrack is swept: the per-pod flow counts are set to the live flows (they
    /// err high by the flows that ended since), and the maps' fill is counted for /metrics.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    ct_sweep_interval: Duration,
    /// Entries of the fragments map.
    #[arg(long, default_value_t = DEFAULT_FRAGMENTS_SIZE)]
    fragments_map_size: u32,
    /// Entries of the map of the Services' node ports (a node port that does not fit is let
    /// through as traffic to the node, and reported on /readyz).
    #[arg(long, default_value_t = enforcer_common::DEFAULT_NODE_PORTS_SIZE)]
    node_ports_map_size: u32,
    /// Bytes of the verdict event ring buffer.
    #[arg(long, default_value_t = DEFAULT_EVENTS_BYTES)]
    events_bytes: u32,
    /// Every policy's pod and namespace peers must be verified workloads (see also the
    /// `enforcer.dev/require-identity: "true"` policy annotation).
    #[arg(long)]
    require_identity: bool,
    /// Every policy audits: what policy would deny is allowed, counted and logged as
    /// `would-drop` (see also the `enforcer.dev/audit: "true"` annotation on a policy or a
    /// Namespace).
    #[arg(long)]
    audit: bool,
    /// Address of the attestation endpoint (`POST /v1/attest`), served when keys are given.
    /// `[::]:PORT` serves IPv6 and IPv4 callers alike (IPv4 only on a host without IPv6).
    #[arg(long, default_value = "[::]:9902")]
    attest_addr: SocketAddr,
    /// Connections one source address may hold open at once on the attestation port (256 in
    /// all); one more is answered 429 and closed.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=256))]
    attest_max_connections_per_source: u32,
    /// JWKS file with the service-account token signing keys (re-read on change). Without it,
    /// in a cluster, keys come from the API server's OIDC discovery.
    #[arg(long, conflicts_with = "issuer_discovery")]
    jwks: Option<PathBuf>,
    /// How often the signing keys are fetched again (±10 %), and the longest back-off after a
    /// failure (then 1 s, doubling, at most 5 min); also on a token naming an unknown key.
    /// Default: 10m for keys fetched by discovery, 5s for --jwks FILE.
    #[arg(long, value_parser = parse_duration)]
    jwks_refresh: Option<Duration>,
    /// Accept the cluster's own service-account issuer, read from the API server's OIDC
    /// discovery document (`issuer`, an https URL); cluster mode only. Adds to --issuer.
    #[arg(long, conflicts_with = "issuer_discovery")]
    issuer_from_cluster: bool,
    /// Fetch the signing keys by OIDC discovery at the first --issuer, over HTTPS, rather than
    /// through the API server: for an issuer outside the cluster, and in standalone mode.
    #[arg(long)]
    issuer_discovery: bool,
    /// PEM bundle of CA certificates to trust for --issuer-discovery, besides the system's.
    #[arg(long, requires = "issuer_discovery")]
    issuer_ca_file: Option<PathBuf>,
    /// Accepted token issuers (the API server's --service-account-issuer values). Giving one
    /// (or --jwks) turns the attestation endpoint on.
    #[arg(long = "issuer")]
    issuers: Vec<String>,
    /// Accepted token audience.
    #[arg(long, default_value = "enforcer")]
    audience: String,
}

/// glibc gives each thread that allocates an arena of its own and keeps what is freed in it, so
/// the compile thread, the runtime's workers and its blocking threads would each hold their own
/// high-water mark of a cluster-sized compile. Two arenas keep the agent's RSS near what it
/// holds. `MALLOC_ARENA_MAX` set in the environment wins.
fn limit_malloc_arenas() {
    #[cfg(target_env = "gnu")]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: sets one allocator tunable, before the runtime starts its threads.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
    }
}

pub fn run(args: RunArgs) -> Result<()> {
    limit_malloc_arenas();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    // Standalone reads a folder; otherwise the kube watchers feed the same compiler.
    let mut kube_client = None;
    let id_flags = identity_flags(&args)?;
    let identity_on = id_flags.is_some();
    // In a cluster the identity records come with the other watches.
    let mut records_rx = None;
    let status = Arc::new(Status::default());
    {
        let s = status.clone();
        status.add_renderer(Arc::new(move |o: &mut String| s.heartbeats.render(o)));
    }
    let (source, kube_task) = match args.manifests.clone() {
        Some(dir) => (Source::Manifests(ManifestsSource::new(dir)), None),
        None => {
            let node = args
                .node_name
                .clone()
                .context("in-cluster mode needs --node-name or NODE_NAME")?;
            let _ = rustls::crypto::ring::default_provider().install_default();
            let mut watched = vec!["namespaces", "pods", "networkpolicies", "services"];
            watched.extend(crate::source::cluster_wide::WATCHED);
            if identity_on {
                watched.push("identitybindings");
            }
            let beats =
                WatchBeats::register(&status.heartbeats, &watched, args.watch_stall_timeout);
            let client = rt.block_on(liveness::client(beats.clone()))?;
            let (tx, rx) = tokio::sync::watch::channel(None);
            kube_client = Some(client.clone());
            let records_tx = identity_on.then(|| {
                let (tx, rx) = tokio::sync::watch::channel(None);
                records_rx = Some(rx);
                tx
            });
            let task = rt.spawn(async move {
                if let Err(e) =
                    crate::source::kube::run_watching(client, node, tx, records_tx, &beats).await
                {
                    log::error!("kube watchers stopped: {e:#}");
                }
            });
            let source = crate::source::KubeSource {
                rx,
                runtime: rt.handle().clone(),
            };
            (Source::Kube(source), Some(task))
        }
    };
    let node_ips = if args.node_ips.is_empty() {
        local_addresses()?
    } else {
        args.node_ips.clone()
    };
    log::info!("node addresses: {node_ips:?}");
    let options = DatapathOptions {
        pin_path: args.pin_path.clone(),
        max_endpoints: args.max_endpoints,
        peers_size: args.peers_map_size,
        peers_max: args.peers_map_max,
        policy_size: args.policy_map_size,
        conntrack_size: args.conntrack_map_size,
        fragments_size: args.fragments_map_size,
        node_ports_size: args.node_ports_map_size,
        events_bytes: args.events_bytes,
        log_allowed: args.log_allowed,
        attach: args.attach_mode,
        ct_timeout_tcp: args.ct_timeout_tcp,
        ct_timeout_tcp_syn: args.ct_timeout_tcp_syn,
        ct_timeout_tcp_closed: args.ct_timeout_tcp_closed,
        ct_timeout_other: args.ct_timeout_other,
        max_flows_per_endpoint: args
            .ct_max_flows_per_endpoint
            .unwrap_or_else(|| default_flow_limit(args.conntrack_map_size)),
        ..DatapathOptions::default()
    };
    // The folder is read and parsed while the programs load: both take seconds at scale.
    enum Starting {
        Ready(Source),
        Preloading(std::thread::JoinHandle<ManifestsSource>),
    }
    let programs_loaded = Arc::new(AtomicBool::new(false));
    let starting = match source {
        Source::Manifests(mut m) => {
            let loaded = programs_loaded.clone();
            Starting::Preloading(std::thread::Builder::new().name("preload".into()).spawn(
                move || {
                    m.preload(&loaded);
                    m
                },
            )?)
        }
        other => Starting::Ready(other),
    };
    let opened = Datapath::open(options).context("opening the datapath");
    programs_loaded.store(true, Ordering::Relaxed);
    let mut datapath = opened?;
    let source = match starting {
        Starting::Ready(s) => s,
        Starting::Preloading(p) => Source::Manifests(
            p.join()
                .map_err(|_| anyhow::anyhow!("reading the manifests folder panicked"))?,
        ),
    };
    let events = datapath.take_events();
    let datapath = Arc::new(Mutex::new(datapath));
    let view = Arc::new(Mutex::new(View::default()));
    let flow_stats = Arc::new(FlowLogStats::default());
    {
        let s = flow_stats.clone();
        status.add_renderer(Arc::new(move |o: &mut String| s.render(o)));
    }

    let identity = id_flags
        .map(|flags| identity_setup(&args, flags, kube_client.clone(), records_rx, &status))
        .transpose()?;
    let stop = Arc::new(AtomicBool::new(false));
    let agent = Agent {
        source,
        compile_options: CompileOptions {
            node_name: args.node_name.clone(),
            node_ips,
            max_endpoints: args.max_endpoints,
            require_identity: args.require_identity,
            audit: args.audit,
        },
        datapath,
        status: status.clone(),
        view: view.clone(),
        per_pod_metrics: args.per_pod_metrics,
        identity: identity.as_ref().map(|(id, _, _)| id.clone()),
        ct_sweep: args.ct_sweep_interval,
        loop_stall_timeout: args.loop_stall_timeout,
    };
    let loop_stop = stop.clone();
    let control = std::thread::Builder::new()
        .name("control".into())
        .spawn(move || agent.run(loop_stop))?;

    rt.block_on(async move {
        let health = tokio::spawn(health::serve(args.health_addr, status.clone()));
        if let Some((_, attestation, writer)) = identity {
            if let Some(w) = writer {
                tokio::spawn(w.run());
            }
            tokio::spawn(async move {
                let addr = attestation.addr;
                if let Err(e) = attestation.start().await {
                    log::error!("attestation endpoint {addr}: {e:#}");
                }
            });
        }
        if let Some(events) = events {
            let rotation = Rotation {
                max_bytes: args.flow_log_max_mib.saturating_mul(1 << 20),
                keep: args.flow_log_keep,
            };
            let mut log = FlowLog::new(view, flow_stats, args.flow_log_rate)
                .on_node(args.node_name.clone())
                .to(&args.flow_log, rotation)
                .with_context(|| format!("opening the flow log {:?}", args.flow_log))?;
            match events.into_async() {
                Ok(mut ev) => {
                    tokio::spawn(async move {
                        while let Ok(batch) = ev.next_batch().await {
                            log.log(&batch);
                        }
                    });
                }
                Err(e) => log::warn!("flow log disabled: {e:#}"),
            }
        }
        log::info!("enforcing; health on http://{}", args.health_addr);
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = health => { r.context("health task")??; }
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        anyhow::Ok(())
    })?;
    stop.store(true, Ordering::Relaxed);
    if let Some(t) = kube_task {
        t.abort();
    }
    let _ = control.join();
    std::thread::sleep(Duration::from_millis(10));
    log::info!("stopped; programs stay attached and pinned (`enforcer cleanup` removes them)");
    Ok(())
}

/// Where the token signing keys come from.
#[derive(Debug, Clone, PartialEq)]
enum KeysFrom {
    /// `--jwks FILE`.
    File(PathBuf),
    /// `--issuer-discovery`: OIDC discovery at the issuer, over HTTPS.
    Issuer {
        issuer: String,
        ca_file: Option<PathBuf>,
    },
    /// OIDC discovery through the API server (cluster mode).
    ApiServer,
}

/// The identity flags, checked together.
#[derive(Debug, Clone, PartialEq)]
struct IdentityFlags {
    keys: KeysFrom,
    issuers: Vec<String>,
    issuer_from_cluster: bool,
    refresh: Duration,
}

/// Whether attestation is on (an issuer, `--issuer-from-cluster`, `--issuer-discovery` or
/// `--jwks` given), and from where its keys and issuers come; an error names the flag at fault.
fn identity_flags(args: &RunArgs) -> Result<Option<IdentityFlags>> {
    if args.jwks.is_none()
        && args.issuers.is_empty()
        && !args.issuer_from_cluster
        && !args.issuer_discovery
    {
        return Ok(None);
    }
    let standalone = args.manifests.is_some();
    if args.issuer_from_cluster && standalone {
        bail!(
            "--issuer-from-cluster reads the issuer from the API server, so it needs cluster mode, \
             not --manifests: name the issuer with --issuer"
        );
    }
    if args.issuers.is_empty() && !args.issuer_from_cluster {
        bail!(
            "attestation needs at least one --issuer (the API server's --service-account-issuer), \
             or --issuer-from-cluster"
        );
    }
    let keys = if let Some(path) = &args.jwks {
        KeysFrom::File(path.clone())
    } else if args.issuer_discovery {
        // Not empty: --issuer-from-cluster, the other way to name an issuer, conflicts with it.
        let issuer = args.issuers[0].clone();
        crate::identity::jwks::https_url("--issuer", &issuer, true)?;
        KeysFrom::Issuer {
            issuer,
            ca_file: args.issuer_ca_file.clone(),
        }
    } else if standalone {
        bail!(
            "standalone attestation needs --jwks FILE, or --issuer-discovery to fetch the keys \
             from the issuer"
        );
    } else {
        KeysFrom::ApiServer
    };
    let refresh = args.jwks_refresh.unwrap_or(match keys {
        KeysFrom::File(_) => crate::identity::jwks::DEFAULT_FILE_REFRESH_INTERVAL,
        _ => crate::identity::jwks::DEFAULT_REFRESH_INTERVAL,
    });
    Ok(Some(IdentityFlags {
        keys,
        issuers: args.issuers.clone(),
        issuer_from_cluster: args.issuer_from_cluster,
        refresh,
    }))
}

/// The attestation endpoint, ready to start: the keys, the bindings and the live-pod directory
/// shared with the control loop, and the verifier's settings (its issuer may still have to be
/// read from the API server).
struct Attestation {
    addr: SocketAddr,
    config: crate::identity::VerifierConfig,
    issuer_from: Option<kube::Client>,
    keys: Arc<crate::identity::KeyStore>,
    pods: Arc<LivePods>,
    bindings: Arc<crate::identity::Bindings>,
    metrics: Arc<crate::identity::IdentityMetrics>,
    limits: crate::httpd::Limits,
    node: Option<String>,
}

impl Attestation {
    /// Loads the keys (refreshed from then on), learns the cluster's issuer when asked to
    /// (asking again, with back-off, until the API server tells it: the endpoint is not served
    /// before), and serves.
    async fn start(self) -> Result<()> {
        use crate::identity::{AttestState, Verifier, jwks, server::audit::AuditLog};
        if let Err(e) = self.keys.refresh().await {
            log::warn!("loading the token signing keys: {e}");
        }
        self.keys.clone().spawn_refresher();
        let mut config = self.config;
        if let Some(client) = &self.issuer_from {
            let issuer = jwks::cluster_issuer_retrying(
                client,
                jwks::RefreshSchedule::every(Duration::from_secs(60)),
            )
            .await;
            log::info!("accepting tokens of the cluster's issuer {issuer} (--issuer-from-cluster)");
            if !config.issuers.contains(&issuer) {
                config.issuers.push(issuer);
            }
        }
        let verifier = Arc::new(Verifier::new(config).context("identity configuration")?);
        let state = AttestState::new(verifier, self.keys, self.pods, self.bindings, self.metrics)
            .with_limits(self.limits)
            .with_audit(AuditLog::stdout(self.node));
        log::info!("attestation endpoint on http://{}/v1/attest", self.addr);
        crate::identity::serve(self.addr, state)
            .await
            .with_context(|| format!("serving on {}", self.addr))
    }
}

/// The attestation endpoint's parts, from the checked [`IdentityFlags`]; and, when the node has
/// a name, the identity records (from the API server or the manifests folder's `identity/`
/// subfolder) and the writer publishing this agent's attestations there.
fn identity_setup(
    args: &RunArgs,
    flags: IdentityFlags,
    kube_client: Option<kube::Client>,
    records_rx: Option<RecordsRx>,
    status: &Arc<Status>,
) -> Result<(Identity, Attestation, Option<RecordWriter>)> {
    use crate::identity::{
        Bindings, FileKeySource, IdentityMetrics, KeySource, KeyStore, OidcKeySource, Verifier,
        VerifierConfig,
        jwks::{IssuerKeySource, RefreshSchedule},
    };
    let source: Arc<dyn KeySource> = match &flags.keys {
        KeysFrom::File(path) => Arc::new(FileKeySource::new(path)),
        KeysFrom::Issuer { issuer, ca_file } => Arc::new(
            IssuerKeySource::new(issuer, ca_file.as_deref()).context("--issuer-discovery")?,
        ),
        KeysFrom::ApiServer => Arc::new(OidcKeySource::new(
            kube_client
                .clone()
                .context("keys through the API server need cluster mode")?,
        )),
    };
    let mut config = VerifierConfig::new(flags.issuers.clone());
    config.audiences = vec![args.audience.clone()];
    if !flags.issuer_from_cluster {
        // Checked now, so a bad flag stops the agent at once.
        Verifier::new(config.clone()).context("identity configuration")?;
    }
    let metrics = Arc::new(IdentityMetrics::default());
    let keys = Arc::new(
        KeyStore::new(source)
            .with_min_refresh_interval(Duration::from_secs(1))
            .with_schedule(RefreshSchedule::every(flags.refresh))
            .with_metrics(metrics.clone()),
    );
    let bindings = Arc::new(Bindings::new());
    let pods = Arc::new(LivePods::default());
    {
        let m = metrics.clone();
        status.add_renderer(Arc::new(move |o: &mut String| m.render_prometheus(o)));
    }
    let attestation = Attestation {
        addr: args.attest_addr,
        config,
        issuer_from: kube_client.clone().filter(|_| flags.issuer_from_cluster),
        keys,
        pods: pods.clone(),
        bindings: bindings.clone(),
        metrics,
        limits: crate::httpd::Limits {
            max_per_source: args.attest_max_connections_per_source as usize,
            ..crate::httpd::Limits::default()
        },
        node: args.node_name.clone(),
    };
    let mut identity = Identity::local(bindings.clone(), pods.clone());
    {
        let m = identity.record_metrics.clone();
        status.add_renderer(Arc::new(move |o: &mut String| m.render_prometheus(o)));
    }
    // Records name the node that verified them: an agent without a node name (one standalone
    // agent taking every pod as its own) keeps its bindings to itself.
    let (records, store) = match (&args.node_name, &args.manifests, kube_client, records_rx) {
        (None, _, _, _) => {
            log::warn!(
                "identity records off: no --node-name; bindings are this agent's only and do not survive a restart"
            );
            return Ok((identity, attestation, None));
        }
        (Some(_), Some(dir), _, _) => {
            let folder = dir.join(records::FOLDER);
            (
                RecordsSource::Folder(RecordsFolder::new(&folder)),
                RecordStore::Folder(folder),
            )
        }
        (Some(_), None, Some(client), Some(rx)) => (
            RecordsSource::Kube(rx.clone()),
            RecordStore::Kube {
                client,
                records: rx,
            },
        ),
        (Some(_), None, _, _) => bail!("identity records need the kube source"),
    };
    identity.records = Some(Arc::new(Mutex::new(RecordsView::new(records))));
    let writer = RecordWriter::new(
        store,
        bindings,
        pods,
        args.node_name.clone().unwrap_or_default(),
        identity.record_metrics.clone(),
    );
    Ok((identity, attestation, Some(writer)))
}

/// A duration flag: a whole number with a unit (`ms`, `s`, `m`, `h`), e.g. `500ms`, `60s`, `6h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(digits);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("`{s}`: expected a number and a unit, e.g. 60s"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => return Err(format!("`{s}`: the unit must be ms, s, m or h")),
    };
    if d.is_zero() {
        return Err(format!("`{s}`: must be more than zero"));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    fn flags(argv: &[&str]) -> Result<Option<IdentityFlags>> {
        let cli = Cli::try_parse_from(std::iter::once("enforcer").chain(argv.iter().copied()))?;
        identity_flags(&cli.run)
    }

    fn error(argv: &[&str]) -> String {
        format!("{:#}", flags(argv).expect_err("refused"))
    }

    #[test]
    fn issuer_from_cluster_is_refused_in_standalone_mode() {
        let e = error(&["--manifests", "/m", "--issuer-from-cluster"]);
        assert!(
            e.contains("--issuer-from-cluster") && e.contains("cluster mode"),
            "{e}"
        );
    }

    #[test]
    fn issuer_from_cluster_turns_identity_on_with_keys_through_the_api_server() {
        let f = flags(&["--issuer-from-cluster"]).unwrap().expect("on");
        assert_eq!(f.keys, KeysFrom::ApiServer);
        assert!(f.issuer_from_cluster && f.issuers.is_empty());
        assert_eq!(f.refresh, Duration::from_secs(600));
        assert_eq!(flags(&[]).unwrap(), None, "off by default");
    }

    #[test]
    fn key_sources_and_their_refresh_intervals() {
        let f = flags(&["--manifests", "/m", "--issuer", "https://i", "--jwks", "/k"])
            .unwrap()
            .unwrap();
        assert_eq!(
            (f.keys, f.refresh),
            (KeysFrom::File("/k".into()), Duration::from_secs(5))
        );
        let f = flags(&[
            "--manifests",
            "/m",
            "--issuer",
            "https://oidc.example.com/id/1",
            "--issuer-discovery",
            "--issuer-ca-file",
            "/ca.pem",
            "--jwks-refresh",
            "30m",
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            (f.keys, f.refresh),
            (
                KeysFrom::Issuer {
                    issuer: "https://oidc.example.com/id/1".into(),
                    ca_file: Some("/ca.pem".into())
                },
                Duration::from_secs(1800)
            )
        );
    }

    #[test]
    fn identity_flags_that_cannot_work_are_refused_by_name() {
        let e = error(&["--manifests", "/m", "--issuer", "https://i"]);
        assert!(
            e.contains("--jwks FILE") && e.contains("--issuer-discovery"),
            "{e}"
        );
        let e = error(&["--issuer", "http://i.example", "--issuer-discovery"]);
        assert!(
            e.contains("\"http://i.example\"") && e.contains("https"),
            "{e}"
        );
        assert!(error(&["--jwks", "/k"]).contains("--issuer"));
        for clash in [
            &["--issuer", "https://i", "--issuer-ca-file", "/ca.pem"][..],
            &["--issuer-from-cluster", "--issuer-discovery"],
            &[
                "--issuer",
                "https://i",
                "--jwks",
                "/k",
                "--issuer-discovery",
            ],
            &[
                "--issuer",
                "https://i",
                "--attest-max-connections-per-source",
                "0",
            ],
        ] {
            assert!(flags(clash).is_err(), "{clash:?} accepted");
        }
    }

    #[test]
    fn the_attestation_port_serves_ipv6_and_ipv4_by_default() {
        let cli = Cli::try_parse_from(["enforcer"]).unwrap();
        assert_eq!(cli.run.attest_addr, "[::]:9902".parse().unwrap());
        assert_eq!(cli.run.attest_max_connections_per_source, 8);
    }

    #[test]
    fn duration_flags_take_a_number_and_a_unit() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_duration("6h"), Ok(Duration::from_secs(6 * 3600)));
        for bad in ["60", "s", "1.5s", "-1s", "0s", "10d"] {
            assert!(parse_duration(bad).is_err(), "{bad} accepted");
        }
    }
}
