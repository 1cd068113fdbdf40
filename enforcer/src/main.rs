//! The `enforcer` binary: the command line lives in `enforcer::cli`.

fn main() -> std::process::ExitCode {
    enforcer::cli::main()
}
