//! `cargo xtask bench` (or `cargo run --release -p enforcer-bench -- [--quick]`):
//! measures the enforcer and writes `bench/REPORT.md`, `bench/report.json` and SVG charts.
//!
//! Parts (all figures are measured by this run; ratios come from the same run and machine):
//! - `testrun`: ns per packet of the real TC programs by `BPF_PROG_TEST_RUN`, beside a
//!   hand-assembled empty program measured by the same harness, at 0 / 100 / 1k / 100k policy
//!   entries and 1 / 1k endpoints.
//! - `net`: routed-veth pods in netns; iperf3, TCP_RR and TCP_CRR with the real agent vs no
//!   programs; policy-change latency; agent memory; connection rate vs the same policies as an
//!   nftables ruleset (iptables-enforcer layout) at growing rule counts.
//! - `compile`: the pure compiler on 10k policies.
//! - `service`: the Service path beside the direct one: the first packet of a new flow and an
//!   established packet through both hooks (`BPF_PROG_TEST_RUN`), and TCP_CRR / TCP_RR through a
//!   ClusterIP (an nftables DNAT, as kube-proxy's) with our programs and with none.
//! - `scale`: the agent on a node with none of the pods of a 10k / 50k / 100k-pod synthetic
//!   cluster, standalone and through its kube watches (a stand-in API server): ready, memory,
//!   event → programmed, churn; written to `SCALE.md` and `scale.json`.
//!
//! Needs root. Cleans up every netns, mount and nft table it creates (guards), also on failure.

mod apiserver;
mod inputs;
mod interleave;
mod load;
mod net;
mod report;
mod scale;
mod steal;
mod svg;
mod testrun;

use std::{path::PathBuf, time::Instant};

use steal::CpuTimes;

use anyhow::{Result, bail};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(about = "enforcer benchmarks: writes bench/REPORT.md and bench/report.json")]
struct Args {
    /// A smaller, faster run (fewer repeats, shorter traffic runs).
    #[arg(long)]
    quick: bool,
    /// Only these parts (comma-separated): testrun, compile, net (= traffic, latency, sweep),
    /// or one section of net: traffic, latency (with agent memory), sweep; service (the Service
    /// path, per packet and on pods); scale (the agent on large clusters, written to SCALE.md;
    /// alone, it leaves REPORT.md as it was).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Output folder (default: `bench/` in the workspace).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Traffic rounds (default 4, 1 with --quick).
    #[arg(long)]
    rounds: Option<usize>,
    /// Interleaved runs per traffic round (default 4, 1 with --quick).
    #[arg(long)]
    pairs: Option<usize>,
    /// The scale part's cluster sizes, as PODSxPOLICIES (default 10000x1000, 10000x10000,
    /// 50000x1000, 50000x10000, 100000x1000, 100000x10000).
    #[arg(long, value_delimiter = ',', value_parser = parse_point)]
    scale_points: Vec<(usize, usize)>,
}

fn parse_point(s: &str) -> Result<(usize, usize), String> {
    let (pods, policies) = s
        .split_once('x')
        .ok_or_else(|| format!("{s:?}: expected PODSxPOLICIES, e.g. 10000x1000"))?;
    let n = |v: &str| v.parse::<usize>().map_err(|e| format!("{s:?}: {e}"));
    Ok((n(pods)?, n(policies)?))
}

fn main() -> Result<()> {
    let args = Args::parse();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the benchmarks need root (BPF, network namespaces, mounts)");
    }
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    std::fs::create_dir_all(&out)?;
    let want = |p: &str| args.only.is_empty() || args.only.iter().any(|o| o == p);
    let quick = args.quick;
    let started = Instant::now();
    let mut rep = report::Report::new(quick);
    rep.only_scale = args.only.iter().all(|o| o == "scale") && !args.only.is_empty();

    if want("testrun") {
        eprintln!("[bench] BPF_PROG_TEST_RUN");
        let cpu = CpuTimes::now();
        let settings = testrun::Settings {
            repeat: if quick { 200_000 } else { 1_000_000 },
            runs: if quick { 3 } else { 5 },
            singles: 5_000,
            new_repeat: if quick { 5_000 } else { 10_000 },
            passes: if quick { 1 } else { 5 },
            entries: vec![0, 100, 1_000, 100_000],
            endpoints: vec![1, 1_000],
            pair_rounds: if quick { 40 } else { 200 },
            pair_repeat: 100_000,
        };
        match testrun::run(settings) {
            Ok(r) => rep.testrun = Some(r),
            Err(e) => rep.errors.push(format!("testrun: {e:#}")),
        }
        rep.steal_by_part
            .push(("testrun".into(), CpuTimes::now().stolen_since(&cpu)));
        rep.write(&out, started)?;
    }

    if want("service") {
        eprintln!("[bench] Service path, BPF_PROG_TEST_RUN");
        let cpu = CpuTimes::now();
        let settings = testrun::ServiceSettings {
            repeat: if quick { 200_000 } else { 1_000_000 },
            runs: if quick { 3 } else { 5 },
            // Four calls of new flows per round: half the scenarios' runs keeps the flow
            // table's fill at theirs.
            new_repeat: if quick { 2_500 } else { 5_000 },
            passes: if quick { 1 } else { 3 },
            entries: 100_000,
        };
        match testrun::run_service(settings) {
            Ok(r) => rep.service = Some(r),
            Err(e) => rep.errors.push(format!("service (test run): {e:#}")),
        }
        rep.steal_by_part.push((
            "Service path, test run".into(),
            CpuTimes::now().stolen_since(&cpu),
        ));
        rep.write(&out, started)?;
    }

    if want("compile") {
        eprintln!("[bench] compile");
        match net::compile_bench(10_000, 1_000, 1_000, if quick { 1 } else { 3 }) {
            Ok(r) => {
                eprintln!(
                    "    10k policies: parse {:.3} s, compile {:.3} s, {} entries",
                    r.parse_secs, r.compile_secs, r.policy_entries
                );
                if let Some(t) = &r.tiers {
                    eprintln!(
                        "    + {} cluster policies: compile {:.3} s, {} entries ({} deny)",
                        t.cluster_policies, t.compile_secs, t.policy_entries, t.deny_entries
                    );
                }
                rep.compile = Some(r);
            }
            Err(e) => rep.errors.push(format!("compile: {e:#}")),
        }
        rep.write(&out, started)?;
    }

    let net_part = |p: &str| want("net") || args.only.iter().any(|o| o == p);
    if net_part("traffic") || net_part("latency") || net_part("sweep") || want("service") {
        eprintln!("[bench] pods in netns");
        let cpu = CpuTimes::now();
        let settings = net::Settings {
            rounds: args.rounds.unwrap_or(if quick { 1 } else { 4 }),
            iperf_secs: if quick { 3 } else { 6 },
            rate_secs: if quick { 2.0 } else { 4.0 },
            warmup_secs: if quick { 0.3 } else { 0.5 },
            rule_counts: vec![10, 1_000, 10_000],
            remote_pods: 1_000,
            policies: 1_000,
            toggles: if quick { 16 } else { 200 },
            traffic: net_part("traffic"),
            latency: net_part("latency"),
            sweep: net_part("sweep"),
            service: want("service"),
            service_cycles: if quick { 6 } else { 24 },
            pairs: args.pairs.unwrap_or(if quick { 1 } else { 4 }),
            windows: interleave::Windows {
                window_secs: 0.25,
                settle_secs: 0.02,
                cycles: if quick { 6 } else { 12 },
                warmup_secs: 0.3,
            },
            pair_iperf_secs: 2,
            pair_rate_secs: if quick { 1.0 } else { 1.5 },
        };
        rep.net_settings = Some(settings.clone());
        let out2 = out.clone();
        let mut last: Option<net::Results> = None;
        let base = rep.clone();
        let mut partial = |r: &net::Results| {
            last = Some(r.clone());
            let mut tmp = base.clone();
            tmp.net = Some(r.clone());
            let _ = tmp.write(&out2, started);
        };
        let result = net::run(&settings, &mut partial);
        match result {
            Ok(r) => rep.net = Some(r),
            Err(e) => {
                rep.net = last;
                rep.errors.push(format!("net: {e:#}"));
            }
        }
        rep.steal_by_part
            .push(("pods in netns".into(), CpuTimes::now().stolen_since(&cpu)));
        rep.write(&out, started)?;
    }
    if want("scale") {
        eprintln!("[bench] cluster scale");
        let cpu = CpuTimes::now();
        let settings = scale::Settings {
            points: if !args.scale_points.is_empty() {
                args.scale_points.clone()
            } else if quick {
                vec![(10_000, 1_000), (100_000, 10_000)]
            } else {
                vec![
                    (10_000, 1_000),
                    (10_000, 10_000),
                    (50_000, 1_000),
                    (50_000, 10_000),
                    (100_000, 1_000),
                    (100_000, 10_000),
                ]
            },
            modes: vec![scale::Mode::Standalone, scale::Mode::Kube],
            max_rounds: if quick { 2 } else { 10 },
            event_budget_secs: if quick { 5.0 } else { 12.0 },
            event_timeout_secs: 30.0,
            churn_rate: 100.0,
            churn_secs: if quick { 5.0 } else { 10.0 },
            ready_timeout_secs: 120.0,
            seed: 26,
        };
        let out2 = out.clone();
        let base = rep.clone();
        let result = scale::run(&settings, &mut |r| {
            let mut tmp = base.clone();
            tmp.scale = Some(r.clone());
            let _ = tmp.write(&out2, started);
        });
        rep.scale = Some(result);
        rep.steal_by_part
            .push(("cluster scale".into(), CpuTimes::now().stolen_since(&cpu)));
        rep.write(&out, started)?;
    }
    eprintln!(
        "[bench] done in {:.0} s: {}",
        started.elapsed().as_secs_f64(),
        out.join("REPORT.md").display()
    );
    for e in &rep.errors {
        eprintln!("[bench] part failed: {e}");
    }
    Ok(())
}
