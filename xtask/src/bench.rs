//! `cargo xtask bench [--quick] [--only PARTS]`: builds the agent and runs the benchmark crate
//! (`bench/`), which writes `bench/REPORT.md`, `bench/report.json` and SVG
//! charts. Needs root (BPF, network namespaces).

use std::process::Command;

use anyhow::{Context as _, Result, bail};

/// Builds the agent (the benchmark starts `target/release/enforcer`) and the benchmark in one
/// cargo invocation (one feature resolution, so one compile), then runs it with `args`
/// passed through. Call after `setup` (iperf3, nftables).
pub fn bench(args: &[String]) -> Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?
        .to_path_buf();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let st = Command::new(&cargo)
        .current_dir(&root)
        .args([
            "build",
            "--release",
            "-p",
            "enforcer",
            "--bin",
            "enforcer",
            "-p",
            "enforcer-bench",
            "--bin",
            "enforcer-bench",
        ])
        .status()
        .context("running cargo build")?;
    if !st.success() {
        bail!(
            "cargo build --release -p enforcer --bin enforcer -p enforcer-bench --bin enforcer-bench failed ({st})"
        );
    }
    let st = Command::new(root.join("target/release/enforcer-bench"))
        .current_dir(&root)
        .args(args)
        .status()
        .context("running target/release/enforcer-bench")?;
    if !st.success() {
        bail!("bench failed ({st})");
    }
    Ok(())
}
