//! `gmdctl verify`: checks everything that can be checked on this machine
//! (the reference's geo_verify, local part) and ends with `No ERRORS`.

use std::net::UdpSocket;
use std::path::Path;

use gmd_core::config::{ClusterConfig, ConfigError, ListenAddr};
use gmd_core::device::check_data_volume;
use gmd_core::statemap::file::{MapError, MapFile};
use gmd_core::statemap::format::Layout;
use gmd_core::units::region_count;

/// One line of the report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// Whether the check passed.
    pub ok: bool,
    /// What was checked, and what is wrong and what to do when it failed.
    pub text: String,
}

fn ok(text: impl Into<String>) -> Finding {
    Finding {
        ok: true,
        text: text.into(),
    }
}

fn err(text: impl Into<String>) -> Finding {
    Finding {
        ok: false,
        text: text.into(),
    }
}

/// Runs every local check for `machine` (default: the hostname).
pub fn verify_local(config_path: &Path, machine: Option<&str>) -> Vec<Finding> {
    let mut out = Vec::new();
    let config = match ClusterConfig::load(config_path) {
        Ok(c) => {
            out.push(ok(format!(
                "configuration {} parses: cluster {}, {} machine(s), {} device(s); minors unique, roles legal, every device at both sites",
                config_path.display(),
                c.name,
                c.machines.len(),
                c.devices.len()
            )));
            c
        }
        Err(ConfigError::Invalid { path, problems }) => {
            for p in problems {
                out.push(err(format!(
                    "{}: {}: {}",
                    path.display(),
                    p.field,
                    p.message
                )));
            }
            return out;
        }
        Err(e) => {
            out.push(err(e.to_string()));
            return out;
        }
    };
    let machine = match crate::daemon::resolve_machine(&config, machine) {
        Ok(m) => m,
        Err(e) => {
            out.push(err(e.to_string()));
            return out;
        }
    };
    out.push(ok(format!(
        "this machine is {machine} (site {})",
        config.machines[&machine].site
    )));
    match crate::keyfile::read(&config.key_file) {
        Ok(_) => out.push(ok(format!(
            "cluster key {} is readable by root only",
            config.key_file.display()
        ))),
        Err(e) => out.push(err(e.to_string())),
    }
    let me = &config.machines[&machine];
    for (network, addr) in &me.interfaces {
        let probe = std::net::SocketAddr::new(addr.ip(), 0);
        match UdpSocket::bind(probe) {
            Ok(_) => out.push(ok(format!("interface {network} address {} is local", addr.ip()))),
            Err(e) => out.push(err(format!(
                "interface {network}: address {} is not usable on this machine ({e}); fix machines.{machine}.interfaces.{network}",
                addr.ip()
            ))),
        }
    }
    if let ListenAddr::Tcp(addr) = &me.nbd_listen {
        if !addr.ip().is_loopback() {
            out.push(ok(format!(
                "NBD exports listen on {addr}, beyond this machine: make sure only trusted hosts reach it"
            )));
        }
    }
    for device in config.devices_on(&machine) {
        let local = device.on(&machine).expect("devices_on");
        let name = &device.name;
        let remote: Vec<&str> = device
            .remote_peers(&config, &machine)
            .map(|m| m.machine.as_str())
            .collect();
        out.push(ok(format!(
            "{name}: minor {}, {} mode, role {}, remote peer(s) {}",
            device.minor,
            device.mode,
            local.role,
            remote.join(", ")
        )));
        match check_data_volume(device, local) {
            Ok(_) => out.push(ok(format!(
                "{name}: data volume {} has the configured size ({} bytes)",
                local.data.display(),
                device.size_bytes
            ))),
            Err(e) if e.message.contains("in use") => out.push(ok(format!(
                "{name}: data volume {} is in use (the device is configured)",
                local.data.display()
            ))),
            Err(e) => out.push(err(e.message)),
        }
        let needed = Layout::for_regions(region_count(device.size_bytes)).file_size_bytes();
        match MapFile::open(&local.state_map, Some(device.size_bytes)) {
            Ok((map, cells)) => out.push(ok(format!(
                "{name}: state map {} is valid (device id {}, {} of {} cells non-zero, needs {needed} bytes)",
                local.state_map.display(),
                map.superblock().uuid,
                cells.count_nonzero(),
                cells.region_count()
            ))),
            Err(MapError::Busy { .. }) => out.push(ok(format!(
                "{name}: state map {} is in use (the device is configured)",
                local.state_map.display()
            ))),
            Err(e) => out.push(err(gmd_core::device::map_error(name, &e).message)),
        }
    }
    out
}

/// Renders the report; the last line is `No ERRORS` or the error count.
pub fn render(findings: &[Finding]) -> String {
    let mut text = String::new();
    for f in findings {
        text.push_str(if f.ok { "OK     " } else { "ERROR  " });
        text.push_str(&f.text);
        text.push('\n');
    }
    let errors = findings.iter().filter(|f| !f.ok).count();
    if errors == 0 {
        text.push_str("No ERRORS\n");
    } else {
        text.push_str(&format!("{errors} ERROR(S)\n"));
    }
    text
}
