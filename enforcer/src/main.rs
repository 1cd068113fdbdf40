//! The `enforcer` binary: the command line lives in `enforcer::cli`.

fn main() -> anyhow::Result<()> {
    enforcer::cli::main()
}
