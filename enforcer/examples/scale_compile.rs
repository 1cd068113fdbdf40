//! Times compiles of the scale benchmark's generated cluster, without an agent or root:
//! `scale_compile [PODS] [POLICIES] [EVENTS]` (defaults 10000, 1000 and 5). The folder is written once
//! under the temporary directory and reused; the cluster is loaded as the agent loads it.
//! Each pod added is also taken through the rest of the agent's turn on in-memory maps: the
//! observers' view, then the reconcile, each both whole and as the agent does it.
use std::{sync::Arc, time::Instant};

use enforcer::{
    observe::View,
    reconcile::{
        Reconciler,
        fake::{FakeDatapath, FakeRoutes},
    },
    source::manifests::load_dir,
};
use enforcer_policy::compile::{Allocations, CompileOptions, compile};
use enforcer_testkit::scale::{Cluster, MEASURED_NODE, Spec};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<usize>());
    let pods = args.next().transpose()?.unwrap_or(10_000);
    let policies = args.next().transpose()?.unwrap_or(1_000);
    let events = args.next().transpose()?.unwrap_or(5);
    let generated = Cluster::generate(Spec {
        pods,
        policies,
        seed: 1,
        dual_stack: false,
    });
    let dir = std::env::temp_dir().join(format!("enforcer-scale-{pods}-{policies}"));
    if !dir.exists() {
        generated.write_dir(&dir, 0)?;
    }
    let t = Instant::now();
    let mut cluster = load_dir(&dir)?.cluster;
    println!("load {:?}", t.elapsed());
    // The benchmark's agent runs as a node no pod is on: every pod is a peer.
    let opts = CompileOptions {
        node_name: Some(MEASURED_NODE.into()),
        ..Default::default()
    };
    let mut alloc = Allocations::new();
    let t = Instant::now();
    let out = compile(&cluster, &opts, &mut alloc);
    println!(
        "first compile {:?}: {} peers, {} identities",
        t.elapsed(),
        out.state.peers_v4.len(),
        out.identities.len()
    );
    // Each pod added goes through the turn twice, on maps of its own: as the whole state (the
    // view built anew, every entry compared) and as the agent takes it (the view updated, the
    // peers diffed against the last state).
    let (mut whole_dp, mut dp) = (FakeDatapath::default(), FakeDatapath::default());
    let routes = FakeRoutes::default();
    let (mut whole, mut reconciler) = (Reconciler::new(), Reconciler::new());
    let mut state = Arc::new(out.state);
    let mut view = View::build(&state, &cluster, &opts.node_ips);
    whole.apply(&state, &mut whole_dp, &routes)?;
    let t = Instant::now();
    reconciler.apply_shared(&state, &[], &mut dp, &routes)?;
    println!("first reconcile {:?}", t.elapsed());
    for n in 0..events {
        let pod: k8s_openapi::api::core::v1::Pod =
            serde_json::from_value(generated.extra_pod(n).object())?;
        cluster.pods.push(Arc::new(pod.into()));
        let t = Instant::now();
        let out = compile(&cluster, &opts, &mut alloc);
        let compiled = t.elapsed();
        let peers = out.state.peers_v4.len();
        state = Arc::new(out.state);
        let t = Instant::now();
        let built = View::build(&state, &cluster, &opts.node_ips);
        let build = t.elapsed();
        drop(built);
        let t = Instant::now();
        whole.apply(&state, &mut whole_dp, &routes)?;
        let compared = t.elapsed();
        let t = Instant::now();
        view.update(&state, &cluster, &opts.node_ips);
        let updated = t.elapsed();
        let t = Instant::now();
        let report = reconciler.apply_shared(&state, &[], &mut dp, &routes)?;
        println!(
            "one pod added, {peers} peers: compile {compiled:?}; view built {build:?}, updated {updated:?}; reconcile of every entry {compared:?}, of the changes {:?} ({} written)",
            t.elapsed(),
            report.written
        );
    }
    drop(view);
    Ok(())
}
