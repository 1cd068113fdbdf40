//! Developer tasks: `cargo xtask setup | test | demo`. Every task runs `setup` first, so a fresh
//! clone needs no manual step.

mod bench;
mod fuzz;
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
    /// suites (needs root). The tests that need root are ignored by a plain `cargo test`; this
    /// task passes `--include-ignored` to the test binaries so they run too.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter, or `-p enforcer -- NAME`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The frame property test, longer than CI runs it (needs root): random and mutated frames
    /// through the real programs against the model of what policy allows (docs/testing.md).
    Fuzz {
        /// How many cases (sequences of frames).
        #[arg(long, default_value_t = 200_000)]
        cases: u64,
        /// The seed (default: from the clock; printed, and a failure names it).
        #[arg(long)]
        seed: Option<u64>,
        /// Do not tolerate the programs' known deviations from the model.
        #[arg(long)]
        strict: bool,
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
            // Every test binary runs, also after one failed: the report names all that broke.
            cmd.args(["test", "--release", "--no-fail-fast"])
                .args(test_args(&args));
            status(cmd, "cargo test")
        }
        Task::Fuzz {
            cases,
            seed,
            strict,
        } => fuzz::fuzz(cases, seed, strict),
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

/// `cargo test` arguments: the user's, with `--include-ignored` added to the test binaries' own
/// (after the `--`, which is added if the user gave none), unless they already ask for ignored
/// tests (`--ignored` runs only those).
fn test_args(args: &[String]) -> Vec<String> {
    let mut out = args.to_vec();
    match out.iter().position(|a| a == "--") {
        Some(sep) => {
            if !out[sep + 1..]
                .iter()
                .any(|a| a == "--ignored" || a == "--include-ignored")
            {
                out.push("--include-ignored".into());
            }
        }
        None => out.extend(["--".into(), "--include-ignored".into()]),
    }
    out
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The arguments `cargo xtask test ARGS` hands to `cargo test --release`.
    fn cargo_test_args(cli: &[&str]) -> Vec<String> {
        let cli = Cli::try_parse_from(["xtask", "test"].iter().chain(cli)).unwrap();
        let Task::Test { args } = cli.task else {
            panic!("not the test task");
        };
        test_args(&args)
    }

    #[test]
    fn test_task_runs_the_ignored_root_tests_too() {
        assert_eq!(cargo_test_args(&[]), ["--", "--include-ignored"]);
    }

    #[test]
    fn test_task_keeps_a_name_filter_and_the_users_test_binary_arguments() {
        assert_eq!(
            cargo_test_args(&["--", "endport"]),
            ["endport", "--", "--include-ignored"]
        );
        assert_eq!(
            cargo_test_args(&[
                "-p",
                "enforcer",
                "--test",
                "conformance",
                "--",
                "--exact",
                "x"
            ]),
            [
                "-p",
                "enforcer",
                "--test",
                "conformance",
                "--",
                "--exact",
                "x",
                "--include-ignored"
            ]
        );
        assert_eq!(
            cargo_test_args(&["--", "-p", "enforcer", "--", "--ignored"]),
            ["-p", "enforcer", "--", "--ignored"]
        );
    }
}
