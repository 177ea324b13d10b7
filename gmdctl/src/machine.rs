//! Which machine of the cluster this is.

use anyhow::{Context, bail};
use gmd_core::config::ClusterConfig;

/// Finds this machine in the configuration.
///
/// # Errors
/// The name (given or the hostname) is not a machine of the cluster.
pub fn resolve_machine(config: &ClusterConfig, given: Option<&str>) -> anyhow::Result<String> {
    let name = match given {
        Some(n) => n.to_owned(),
        None => nix::unistd::gethostname()
            .context("cannot read the hostname; give --machine NAME")?
            .to_string_lossy()
            .into_owned(),
    };
    if !config.machines.contains_key(&name) {
        bail!(
            "machine {name:?} is not in {} (machines: {}); give --machine NAME",
            config.path.display(),
            config
                .machines
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(name)
}
