//! Developer tasks: `cargo xtask setup | test | demo`. Every task runs `setup` first, so a fresh
//! clone needs no manual step.

mod bench;
mod kind_e2e;
mod setup;

use std::process::Command;

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "enforcer developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what builds and tests need: the nightly's rust-src, bpf-linker built against the
    /// nightly's own LLVM, and the Debian packages the tests use. Idempotent.
    Setup,
    /// Build the agent (release, eBPF object embedded).
    Build,
    /// Run every test: unit and property tests, BPF_PROG_TEST_RUN suites, netns end-to-end
    /// suites (needs root).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter after `--`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The demo: pods in network namespaces, the real agent, real policy, real drops.
    Demo,
    /// Build the image, deploy to a kind cluster and check enforcement there (needs Docker,
    /// kind and kubectl, which this machine lacks: use manifests/Vagrantfile).
    KindE2e,
    /// Benchmarks (needs root): writes bench/REPORT.md, bench/report.json and SVG charts.
    /// Arguments go to the bench example (e.g. `--quick`, `--only testrun,compile,net`).
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    setup::setup()?;
    match cli.task {
        Task::Setup => Ok(()),
        Task::Build => build(),
        Task::Test { args } => {
            build()?;
            let mut cmd = cargo();
            cmd.args(["test", "--release"]).args(&args);
            status(cmd, "cargo test")
        }
        Task::KindE2e => kind_e2e::kind_e2e(),
        Task::Bench { args } => bench::bench(&args),
        Task::Demo => {
            build()?;
            let mut cmd = cargo();
            cmd.args([
                "run",
                "--release",
                "--quiet",
                "-p",
                "enforcer",
                "--example",
                "demo",
            ]);
            status(cmd, "demo")
        }
    }
}

fn build() -> Result<()> {
    let mut cmd = cargo();
    cmd.args(["build", "--release", "-p", "enforcer"]);
    status(cmd, "cargo build --release")
}

/// `cargo` of the toolchain running xtask, in the workspace root.
fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is in the workspace")
        .to_path_buf()
}

fn status(mut cmd: Command, what: &str) -> Result<()> {
    let st = cmd.status().with_context(|| format!("running {what}"))?;
    if !st.success() {
        bail!("{what} failed ({st})");
    }
    Ok(())
}
