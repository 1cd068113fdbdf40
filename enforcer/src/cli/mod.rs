//! The `enforcer` command line, one file per subcommand: the node agent ([`run`]), the offline
//! tools on the same compiler ([`compile`], [`explain`], [`lint`], [`matrix`]), [`status`] of a
//! running agent,
//! [`cleanup`], and the workload's side of identity ([`attest`]).

pub mod attest;
pub mod cleanup;
pub mod compile;
pub mod explain;
pub mod input;
pub mod lint;
pub mod logging;
pub mod matrix;
pub mod output;
pub mod run;
pub mod status;

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Result;
use clap::{CommandFactory as _, Parser, Subcommand};

use crate::datapath::DEFAULT_PIN_PATH;
use input::InputArgs;
use output::{Exit, OutputFormat};

/// `--version`: the crate version and the git revision it was built from.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (revision ",
    env!("ENFORCER_GIT_REVISION"),
    ")"
);

#[derive(Parser)]
#[command(
    name = "enforcer",
    version = VERSION,
    about = "eBPF Kubernetes NetworkPolicy enforcer",
    after_help = "Exit codes: 0 yes (allowed, ready, clean), 1 no (denied, not ready, refused under --strict), 2 error."
)]
pub struct Cli {
    /// How the program's own log lines are written on stderr (the level: `RUST_LOG`, default
    /// `info`); the flow log is separate (`run --flow-log`).
    #[arg(long, global = true, value_enum, default_value_t = logging::LogFormat::Text)]
    log_format: logging::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node agent: watch the objects, compile them, program the datapath.
    Run(Box<run::RunArgs>),
    /// Compile a folder of manifests (or a live cluster) and print what each pod gets (offline,
    /// no root). Exit 1 with --strict when anything is refused.
    Compile {
        #[command(flatten)]
        input: InputArgs,
        /// Also print every map entry.
        #[arg(long)]
        entries: bool,
        /// Compile for this node only (pods with `spec.nodeName`); default: every pod.
        #[arg(long)]
        node_name: Option<String>,
        /// Exit 1 when anything is refused or unreadable: an invalid policy, a bad Service, a
        /// duplicate address or name, an object that cannot be read, reserved labels set by
        /// hand.
        #[arg(long)]
        strict: bool,
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Explain the verdict of one flow: which policy and rule decided it (offline, no root).
    /// Exit 0 allowed, 1 denied, 2 error (an unknown name, bad input).
    Explain {
        #[command(flatten)]
        input: InputArgs,
        /// Source: `NAMESPACE/POD`, `NAMESPACE/WORKLOAD` (a Deployment's, StatefulSet's, ...
        /// pod template) or an IP address.
        #[arg(long)]
        from: String,
        /// Destination: `NAMESPACE/POD`, `NAMESPACE/WORKLOAD` or an IP address.
        #[arg(long)]
        to: String,
        /// Destination port.
        #[arg(long)]
        port: u16,
        #[arg(long, value_enum, default_value_t, ignore_case = true)]
        protocol: explain::Protocol,
        /// As the agent's --require-identity: pod and namespace peers must be verified
        /// (offline, no address is verified).
        #[arg(long)]
        require_identity: bool,
        /// `dot`: the flow's decision as a Graphviz graph (not for a flow to a Service).
        #[arg(short, long, value_enum, default_value_t)]
        output: explain::ExplainFormat,
    },
    /// Who can talk to whom: every pod (or workload) to every other on chosen ports, as a
    /// table, CSV, JSON, YAML or a picture (offline, no root; the agent's compiler). Exit 0, 2 on
    /// an error.
    Matrix(Box<matrix::MatrixArgs>),
    /// Lint policies for CI: policies and peers that select nothing, unmatched named ports,
    /// ipBlocks over pods, disguised allow-alls, shadowed rules, missing default denies,
    /// unprovable identities, self-set reserved labels, refused objects (offline, no root).
    /// Exit codes: 0 clean, 1 a finding at or above --fail-on, 2 unreadable input.
    Lint(Box<lint::LintArgs>),
    /// The running agent at a glance (its /status): readiness, pods, packets by verdict and
    /// reason, map fill, refused policies, verified identities. Exit 0 ready, 1 not ready.
    Status {
        #[arg(long, default_value = "127.0.0.1:9901")]
        health_addr: SocketAddr,
        /// Wait until the agent is ready, at most TIMEOUT (default 60s); exit 1 if it is not.
        #[arg(long, value_name = "TIMEOUT", num_args = 0..=1, default_missing_value = "60s", value_parser = run::parse_duration)]
        wait: Option<Duration>,
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
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
    /// Print a shell completion script (e.g. `enforcer completion bash >
    /// /etc/bash_completion.d/enforcer`).
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// Parses the command line and runs the subcommand. Errors exit 2 (as clap's usage errors do),
/// after `error: ` and the chain of causes on stderr.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = logging::init(cli.log_format) {
        eprintln!("error: {e:#}");
        return Exit::Error.into();
    }
    match dispatch(cli.command) {
        Ok(exit) => exit.into(),
        Err(e) => {
            eprintln!("error: {e:#}");
            Exit::Error.into()
        }
    }
}

/// Prints the output and passes the answer on.
fn print((out, exit): (String, Exit)) -> Exit {
    print!("{out}");
    exit
}

fn dispatch(command: Command) -> Result<Exit> {
    match command {
        Command::Run(args) => run::run(*args).map(|()| Exit::Yes),
        Command::Compile {
            input,
            entries,
            node_name,
            strict,
            output,
        } => Ok(print(compile::run(
            &input.input(),
            node_name,
            entries,
            strict,
            output,
        )?)),
        Command::Explain {
            input,
            from,
            to,
            port,
            protocol,
            require_identity,
            output,
        } => {
            let q = explain::Query {
                from,
                to,
                port,
                protocol,
                require_identity,
            };
            Ok(print(explain::run(&input.input(), &q, output)?))
        }
        Command::Matrix(args) => Ok(print(matrix::run(&args)?)),
        Command::Lint(args) => Ok(match lint::run(&args) {
            0 => Exit::Yes,
            1 => Exit::No,
            _ => Exit::Error,
        }),
        Command::Status {
            health_addr,
            wait,
            output,
        } => Ok(print(status::run(health_addr, wait, output)?)),
        Command::Attest(args) => std::process::exit(attest::run(&args)),
        Command::Cleanup { pin_path } => cleanup::cleanup(&pin_path).map(|()| Exit::Yes),
        Command::Completion { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "enforcer",
                &mut std::io::stdout(),
            );
            Ok(Exit::Yes)
        }
    }
}
