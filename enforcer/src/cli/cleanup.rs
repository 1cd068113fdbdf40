//! `enforcer cleanup`: detach every program and remove every pin (an agent's clean shutdown
//! leaves them in place so that enforcement survives restarts and upgrades).

use std::path::Path;

use anyhow::{Context as _, Result};

use crate::datapath::Datapath;

pub fn cleanup(pin_path: &Path) -> Result<()> {
    Datapath::cleanup(pin_path).with_context(|| format!("cleaning up {}", pin_path.display()))?;
    eprintln!("removed programs and pins under {}", pin_path.display());
    Ok(())
}
