//! Times compiles of a generated cluster (scale harness; not part of CI).
use enforcer::source::manifests::load_dir;
use enforcer_policy::compile::{Allocations, CompileOptions, compile};
use enforcer_testkit::scale::{Cluster, MEASURED_NODE, Spec};
use std::{sync::Arc, time::Instant};

fn main() -> anyhow::Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().unwrap())
        .collect();
    let (pods, policies) = (
        args.first().copied().unwrap_or(10000),
        args.get(1).copied().unwrap_or(1000),
    );
    let g = Cluster::generate(Spec {
        pods,
        policies,
        seed: 1,
        dual_stack: false,
    });
    let dir = std::path::PathBuf::from(format!("/tmp/incr/scale-{pods}-{policies}"));
    if !dir.exists() {
        g.write_dir(&dir, 0)?;
    }
    let t = Instant::now();
    let loaded = load_dir(&dir)?;
    eprintln!("load {:?}", t.elapsed());
    let mut c = loaded.cluster;
    let opts = CompileOptions {
        node_name: Some(MEASURED_NODE.into()),
        ..Default::default()
    };
    let mut a = Allocations::new();
    let t = Instant::now();
    let out = compile(&c, &opts, &mut a);
    eprintln!(
        "cold compile {:?} peers {} ids {}",
        t.elapsed(),
        out.state.peers_v4.len(),
        out.identities.len()
    );
    for n in 0..5 {
        let p = g.extra_pod(n);
        let v = p.object();
        let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(v)?;
        c.pods.push(Arc::new(pod.into()));
        let t = Instant::now();
        let out = compile(&c, &opts, &mut a);
        eprintln!(
            "pod added compile {:?} peers {}",
            t.elapsed(),
            out.state.peers_v4.len()
        );
    }
    Ok(())
}
