//! How the programs hook a device. Kernels with TCX (6.6+) get a TCX link per hook, pinned so it
//! outlives the agent. Older kernels get a clsact qdisc with a cls_bpf filter made through
//! netlink; such a filter has no fd to pin, so the attachment is recorded as an empty directory
//! beside the link pins (bpffs holds only directories and pinned objects), and the loader lists,
//! re-points and removes both kinds alike. Netlink acts in the calling thread's network
//! namespace: a tc filter is removed from the namespace it was attached in (the agent's own).

use std::{fmt, io, path::Path, path::PathBuf, str::FromStr};

use anyhow::{Context as _, Result, bail};
use aya::{
    programs::tc::{TcError, qdisc_detach_program},
    util::KernelVersion,
};

use super::{Hook, ifname, versioned_root};

/// `--attach-mode`: which kind of hook the programs get.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum AttachMode {
    /// TCX where the kernel has it (6.6+), tc (clsact) otherwise.
    #[default]
    Auto,
    /// TCX links only.
    Tcx,
    /// clsact + cls_bpf filters through netlink, as on kernels without TCX.
    Tc,
}

impl AttachMode {
    /// Whether this mode attaches with TCX links on the running kernel.
    pub fn uses_tcx(self) -> bool {
        match self {
            Self::Auto => KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0)),
            Self::Tcx => true,
            Self::Tc => false,
        }
    }
}

impl FromStr for AttachMode {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "tcx" => Ok(Self::Tcx),
            "tc" => Ok(Self::Tc),
            other => bail!("unknown attach mode {other:?}: expected auto, tcx or tc"),
        }
    }
}

impl fmt::Display for AttachMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Tcx => "tcx",
            Self::Tc => "tc",
        })
    }
}

/// The record of a tc (netlink) attachment of `ifindex`'s `hook` under `pin_path`.
pub fn tc_marker(pin_path: &Path, ifindex: u32, hook: Hook) -> PathBuf {
    versioned_root(pin_path)
        .join("links")
        .join(format!("{ifindex}-{}-tc", hook.suffix()))
}

/// The ifindex and hook a tc marker's file name records.
pub fn parse_tc_marker(name: &str) -> Option<(u32, Hook)> {
    let (index, rest) = name.split_once('-')?;
    let suffix = rest.strip_suffix("-tc")?;
    let hook = Hook::EVERY.into_iter().find(|h| h.suffix() == suffix)?;
    Some((index.parse().ok()?, hook))
}

/// Records a tc attachment (idempotent).
pub fn record_tc(marker: &Path) -> Result<()> {
    match std::fs::create_dir(marker) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e).with_context(|| format!("recording {}", marker.display())),
    }
}

/// Removes our filter from `ifindex`'s `hook` (the filters there named after our program), then
/// the record. A device that is gone took its filters with it.
pub fn tc_detach(marker: &Path, ifindex: u32, hook: Hook) -> Result<()> {
    if let Ok(name) = ifname(ifindex) {
        match qdisc_detach_program(&name, hook.attach_type(), hook.program()) {
            Ok(()) => {}
            // No filter of that name (already removed, or the ifindex now names another device).
            Err(TcError::IoError(e)) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("removing the {} filter from {name}", hook.program())
                });
            }
        }
    }
    match std::fs::remove_dir(marker) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", marker.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_names_round_trip() {
        for hook in Hook::ALL {
            let m = tc_marker(Path::new("/x"), 42, hook);
            let name = m.file_name().unwrap().to_str().unwrap();
            assert_eq!(parse_tc_marker(name), Some((42, hook)));
        }
        // A TCX link pin is not a tc marker.
        assert_eq!(parse_tc_marker("42-ingress"), None);
        assert_eq!(parse_tc_marker("x-ingress-tc"), None);
        assert_eq!(parse_tc_marker("42-sideways-tc"), None);
    }

    #[test]
    fn modes_parse_and_print() {
        for m in [AttachMode::Auto, AttachMode::Tcx, AttachMode::Tc] {
            assert_eq!(m.to_string().parse::<AttachMode>().unwrap(), m);
        }
        let e = "clsact".parse::<AttachMode>().unwrap_err().to_string();
        assert!(e.contains("clsact") && e.contains("auto, tcx or tc"), "{e}");
        assert!(!AttachMode::Tc.uses_tcx());
        assert!(AttachMode::Tcx.uses_tcx());
    }
}
