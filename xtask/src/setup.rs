//! `cargo xtask setup`: toolchain parts and packages, each installed only when missing.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

/// The bpf-linker release built against the nightly's LLVM.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Debian packages the tests, the demo and the benchmarks use, by the command they provide.
const PACKAGES: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("nsenter", "util-linux"),
    ("mount", "mount"),
    ("iperf3", "iperf3"),
    ("nft", "nftables"),
    // kube-proxy's iptables mode on the legacy backend (tests/services.rs)
    ("iptables-legacy", "iptables"),
    // the matrix picture looked at in a browser (enforcer/tests/matrix_picture.rs)
    ("chromium", "chromium"),
];

pub fn setup() -> Result<()> {
    rust_src()?;
    bpf_linker()?;
    packages()?;
    Ok(())
}

fn output(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!("{cmd} {} failed", args.join(" "));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn run(cmd: &mut Command, what: &str) -> Result<()> {
    eprintln!("setup: {what}");
    let st = cmd.status().with_context(|| format!("running {what}"))?;
    if !st.success() {
        bail!("{what} failed ({st})");
    }
    Ok(())
}

/// The eBPF crate builds `core` from source with the nightly (`-Z build-std`).
fn rust_src() -> Result<()> {
    let installed = output(
        "rustup",
        &["component", "list", "--toolchain", "nightly", "--installed"],
    )
    .context("the `nightly` toolchain is needed for the eBPF programs")?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    run(
        Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]),
        "rustup component add rust-src --toolchain nightly",
    )
}

fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
}

/// bpf-linker must use the same LLVM as the nightly that emits the bitcode, so it is built
/// against the nightly's own libLLVM: a prefix folder whose `lib/` links to it, kept under
/// CARGO_HOME because the installed binary loads libLLVM from there.
fn bpf_linker() -> Result<()> {
    let sysroot = output("rustc", &["+nightly", "--print", "sysroot"])?;
    let sysroot = PathBuf::from(sysroot.trim());
    let lib = sysroot.join("lib");
    let soname = std::fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so."))
        .with_context(|| format!("no libLLVM.so.* in {}", lib.display()))?;
    // "libLLVM.so.22.1-rust-1.97.0-nightly" -> major 22
    let major: String = soname
        .trim_start_matches("libLLVM.so.")
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    let prefix = cargo_home().join(format!("enforcer-llvm-{major}"));
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("creating {}", prefix_lib.display()))?;
    for name in ["libLLVM.so", soname.as_str()] {
        let link = prefix_lib.join(name);
        let target = lib.join(&soname);
        if std::fs::read_link(&link).ok().as_deref() != Some(target.as_path()) {
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(&target, &link)
                .with_context(|| format!("linking {}", link.display()))?;
        }
    }
    let bin = cargo_home().join("bin").join("bpf-linker");
    let works = Command::new(&bin)
        .arg("--version")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION)
        });
    let stamp = prefix.join("bpf-linker.stamp");
    let built_for = std::fs::read_to_string(&stamp).unwrap_or_default();
    if works && built_for.trim() == soname {
        return Ok(());
    }
    run(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--force",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
                &format!("llvm-{major}"),
            ])
            .env("LLVM_PREFIX", &prefix),
        &format!(
            "cargo install bpf-linker {BPF_LINKER_VERSION} against {}",
            lib.join(&soname).display()
        ),
    )?;
    std::fs::write(&stamp, &soname).context("writing the bpf-linker stamp")?;
    Ok(())
}

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(cmd, _)| !have(cmd))
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    run(
        Command::new("apt-get").args(["update", "-qq"]),
        "apt-get update",
    )?;
    run(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
        &format!("apt-get install {}", missing.join(" ")),
    )
}
