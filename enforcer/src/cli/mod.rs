//! The `enforcer` command line, one file per subcommand: the node agent ([`run`]), the offline
//! tools on the same compiler ([`compile`], [`explain`]), [`status`] of a running agent,
//! [`cleanup`], and the workload's side of identity ([`attest`]).

pub mod attest;
pub mod cleanup;
pub mod compile;
pub mod explain;
pub mod matrix;
pub mod run;
pub mod status;

use std::{net::SocketAddr, path::PathBuf};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};

use crate::datapath::DEFAULT_PIN_PATH;

#[derive(Parser)]
#[command(
    name = "enforcer",
    version,
    about = "eBPF Kubernetes NetworkPolicy enforcer"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node agent: watch the objects, compile them, program the datapath.
    Run(Box<run::RunArgs>),
    /// Compile a folder of manifests and print what each pod gets (offline, no root).
    Compile {
        /// Folder of Namespace, Pod and NetworkPolicy manifests.
        dir: PathBuf,
        /// Also print every map entry.
        #[arg(long)]
        entries: bool,
        /// Compile for this node only (pods with `spec.nodeName`); default: every pod.
        #[arg(long)]
        node_name: Option<String>,
    },
    /// Explain the verdict of one flow: which policy and rule decided it (offline, no root).
    Explain {
        /// Folder of manifests.
        dir: PathBuf,
        /// Source: `NAMESPACE/POD` or an IP address.
        #[arg(long)]
        from: String,
        /// Destination: `NAMESPACE/POD` or an IP address.
        #[arg(long)]
        to: String,
        /// Destination port.
        #[arg(long)]
        port: u16,
        /// tcp, udp or sctp.
        #[arg(long, default_value = "tcp")]
        protocol: String,
        /// As the agent's --require-identity: pod and namespace peers must be verified
        /// (offline, no address is verified).
        #[arg(long)]
        require_identity: bool,
        #[arg(long, short = 'o', value_enum, default_value_t = explain::ExplainFormat::Text)]
        output: explain::ExplainFormat,
    },
    /// Who can talk to whom: every pod (or workload) to every other on chosen ports, as a table,
    /// CSV, JSON or a picture (offline, no root; from the same compiler as the agent).
    Matrix(Box<matrix::MatrixArgs>),
    /// The running agent at a glance: readiness, pods, packets by verdict and reason, map fill,
    /// identity verifications (read from its /metrics).
    Status {
        #[arg(long, default_value = "127.0.0.1:9901")]
        health_addr: SocketAddr,
    },
    /// Prove this pod's identity to its node's agent with the pod's projected service-account
    /// token, and keep the binding alive (a sidecar; `--once` for an init container). Exit
    /// codes: 0 bound (--once) or stopped, 1 refused, 2 bad configuration, 3 gave up (--once).
    Attest(Box<attest::AttestArgs>),
    /// Detach every program and remove every pin under --pin-path.
    Cleanup {
        #[arg(long, default_value = DEFAULT_PIN_PATH)]
        pin_path: PathBuf,
    },
}

/// Parses the command line and runs the subcommand.
pub fn main() -> Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .target(env_logger::Target::Stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => run::run(*args),
        Command::Compile {
            dir,
            entries,
            node_name,
        } => {
            print!("{}", compile::compile_report(&dir, node_name, entries)?);
            Ok(())
        }
        Command::Explain {
            dir,
            from,
            to,
            port,
            protocol,
            require_identity,
            output,
        } => {
            print!(
                "{}",
                explain::explain_report(&dir, &from, &to, port, &protocol, require_identity, output)?
            );
            Ok(())
        }
        Command::Matrix(args) => matrix::run(&args),
        Command::Status { health_addr } => {
            let (_, metrics) = status::http_get(health_addr, "/metrics").with_context(|| {
                format!("reading http://{health_addr}/metrics: is the agent running?")
            })?;
            print!("{}", status::status_report(&metrics));
            Ok(())
        }
        Command::Attest(args) => std::process::exit(attest::run(&args)),
        Command::Cleanup { pin_path } => cleanup::cleanup(&pin_path),
    }
}
