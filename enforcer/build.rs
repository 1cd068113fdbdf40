use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

/// Builds the eBPF programs with the nightly toolchain (aya-build) so that `cargo build` on
/// stable yields an agent with the object embedded.
fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("MetadataCommand::exec")?;
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "enforcer-ebpf")
        .ok_or_else(|| anyhow!("enforcer-ebpf package not found"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", ebpf.manifest_path))?
        .as_str();
    let out_dir = std::env::var("OUT_DIR").context("OUT_DIR")?;
    let skip =
        std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        // Pure unit tests (compiler, identity) need no programs; an empty object makes loading
        // fail with a clear error instead of failing the build.
        let path = std::path::Path::new(&out_dir).join("enforcer");
        if !path.exists() {
            std::fs::write(&path, b"").context("writing empty eBPF object")?;
        }
    }
    aya_build::build_ebpf(
        [Package {
            name: ebpf.name.as_str(),
            root_dir,
            ..Default::default()
        }],
        Toolchain::default(),
    )
}
