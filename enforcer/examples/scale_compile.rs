//! Times compiles of the scale benchmark's generated cluster, without an agent or root:
//! `scale_compile [PODS] [POLICIES]` (defaults 10000 and 1000). The folder is written once
//! under the temporary directory and reused; the cluster is loaded as the agent loads it.
use std::{sync::Arc, time::Instant};

use enforcer::source::manifests::load_dir;
use enforcer_policy::compile::{Allocations, CompileOptions, compile};
use enforcer_testkit::scale::{Cluster, MEASURED_NODE, Spec};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<usize>());
    let pods = args.next().transpose()?.unwrap_or(10_000);
    let policies = args.next().transpose()?.unwrap_or(1_000);
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
    for n in 0..5 {
        let pod: k8s_openapi::api::core::v1::Pod =
            serde_json::from_value(generated.extra_pod(n).object())?;
        cluster.pods.push(Arc::new(pod.into()));
        let t = Instant::now();
        let out = compile(&cluster, &opts, &mut alloc);
        println!(
            "one pod added: compile {:?}, {} peers",
            t.elapsed(),
            out.state.peers_v4.len()
        );
    }
    Ok(())
}
