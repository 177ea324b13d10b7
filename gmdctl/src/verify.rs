//! `gmdctl verify`: checks everything that can be checked on this machine
//! (the reference's geo_verify, local part), then, with gmdd running, what
//! every other machine says about its configuration and state maps
//! ([`MachineFacts`], compared by [`compare`]); ends with `No ERRORS`.

use std::net::UdpSocket;
use std::path::Path;

use gmd_core::config::{ClusterConfig, ConfigError, ListenAddr};
use gmd_core::device::check_data_volume;
use gmd_core::statemap::file::{MapError, MapFile};
use gmd_core::statemap::format::Layout;
use gmd_core::units::region_count;

/// One line of the report.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
    let machine = match crate::machine::resolve_machine(&config, machine) {
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
    out.extend(isolation_findings(&config, &machine));
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

/// What this machine does when the sites are isolated, and whether its
/// fence handler can be run.
fn isolation_findings(config: &ClusterConfig, machine: &str) -> Vec<Finding> {
    use std::os::unix::fs::PermissionsExt;
    let me = &config.machines[machine];
    let dominant = config.sites.get(&me.site).is_some_and(|s| s.dominant);
    let mut out = vec![ok(if dominant {
        format!(
            "site {} is dominant: on isolation its sync/mwc primaries go on alone once the peer is lost",
            me.site
        )
    } else {
        format!(
            "site {} is not dominant: on isolation its sync/mwc primaries hold their writes until the link returns or 'gmdctl down'",
            me.site
        )
    })];
    let Some(fence) = &me.fence else {
        return out;
    };
    let field = format!("machines.{machine}.fence_handler");
    out.push(match std::fs::metadata(&fence.path) {
        Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => ok(format!(
            "fence handler {} is executable (timeout {} s); it runs before a primary here goes on without its peer",
            fence.path.display(),
            fence.timeout_s
        )),
        Ok(_) => err(format!(
            "{field}: {} is not an executable file; chmod +x it or fix the path",
            fence.path.display()
        )),
        Err(e) => err(format!(
            "{field}: {} cannot be used ({e}); install it (the gmd package puts fence-pacemaker in /usr/lib/gmd/) or fix the path",
            fence.path.display()
        )),
    });
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

/// What a machine says about its configuration and its state maps, for
/// the comparison across machines (reference 6.4).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MachineFacts {
    /// The machine describing itself.
    pub machine: String,
    /// Cluster name.
    pub cluster: String,
    /// Sites: name and whether dominant.
    pub sites: Vec<(String, bool)>,
    /// Networks: name and datagram size.
    pub networks: Vec<(String, Option<u32>)>,
    /// Machines: name, site and interfaces (`network=address`).
    pub machines: Vec<(String, String, Vec<String>)>,
    /// Every device of the configuration.
    pub devices: Vec<DeviceFacts>,
}

/// One device as a machine defines it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeviceFacts {
    /// Device name.
    pub name: String,
    /// Minor number.
    pub minor: u32,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Mode.
    pub mode: String,
    /// Role per machine holding a copy (`machine=role`).
    pub roles: Vec<String>,
    /// Sites of the remote peers, seen from the describing machine (when it
    /// holds a copy).
    pub remote_sites: Vec<String>,
    /// Whether the describing machine holds a copy.
    pub local_copy: bool,
    /// Why its state map is missing or too small, if it is.
    pub state_map_problem: Option<String>,
}

/// This machine's facts, from its configuration and its files.
pub fn facts(config: &ClusterConfig, machine: &str) -> MachineFacts {
    MachineFacts {
        machine: machine.to_owned(),
        cluster: config.name.clone(),
        sites: config
            .sites
            .values()
            .map(|s| (s.name.clone(), s.dominant))
            .collect(),
        networks: config
            .networks
            .values()
            .map(|n| (n.name.clone(), n.datagram_size))
            .collect(),
        machines: config
            .machines
            .values()
            .map(|m| {
                (
                    m.name.clone(),
                    m.site.clone(),
                    m.interfaces
                        .iter()
                        .map(|(n, a)| format!("{n}={a}"))
                        .collect(),
                )
            })
            .collect(),
        devices: config
            .devices
            .values()
            .map(|d| {
                let local = d.on(machine);
                let mut remote_sites: Vec<String> = if local.is_some() {
                    d.remote_peers(config, machine)
                        .filter_map(|m| config.site_of(&m.machine).map(str::to_owned))
                        .collect()
                } else {
                    Vec::new()
                };
                remote_sites.dedup();
                DeviceFacts {
                    name: d.name.clone(),
                    minor: d.minor,
                    size_bytes: d.size_bytes,
                    mode: d.mode.to_string(),
                    roles: d
                        .machines
                        .values()
                        .map(|m| format!("{}={}", m.machine, m.role))
                        .collect(),
                    remote_sites,
                    local_copy: local.is_some(),
                    state_map_problem: local.and_then(|l| {
                        match MapFile::open(&l.state_map, Some(d.size_bytes)) {
                            Ok(_) | Err(MapError::Busy { .. }) => None,
                            Err(e) => Some(gmd_core::device::map_error(&d.name, &e).message),
                        }
                    }),
                }
            })
            .collect(),
    }
}

/// Compares this machine's facts with another machine's: same devices with
/// the same name, minor, size, mode and roles; state maps present and large
/// enough there; identical sites, networks and machines; remote peers at
/// one site.
pub fn compare(local: &MachineFacts, remote: &MachineFacts) -> Vec<Finding> {
    let (me, it) = (&local.machine, &remote.machine);
    let mut out = Vec::new();
    let mut same = |what: &str, a: String, b: String| {
        if a == b {
            out.push(ok(format!("{what}: same on {me} and {it}")));
        } else {
            out.push(err(format!(
                "{what} differ: {me} has {a}, {it} has {b}; make the configuration identical on every machine"
            )));
        }
    };
    same(
        "cluster name",
        local.cluster.clone(),
        remote.cluster.clone(),
    );
    same(
        "sites",
        format!("{:?}", local.sites),
        format!("{:?}", remote.sites),
    );
    same(
        "network definitions",
        format!("{:?}", local.networks),
        format!("{:?}", remote.networks),
    );
    same(
        "machine definitions",
        format!("{:?}", local.machines),
        format!("{:?}", remote.machines),
    );
    for d in local.devices.iter().filter(|d| d.local_copy) {
        let name = &d.name;
        let Some(r) = remote.devices.iter().find(|r| r.name == d.name) else {
            out.push(err(format!(
                "{name}: not defined on {it} (same GMD name on every machine)"
            )));
            continue;
        };
        let mut field = |what: &str, a: String, b: String| {
            if a != b {
                out.push(err(format!(
                    "{name}: {what} differs: {a} on {me}, {b} on {it}"
                )));
                false
            } else {
                true
            }
        };
        let mut all = field("minor", d.minor.to_string(), r.minor.to_string());
        all &= field("size", d.size_bytes.to_string(), r.size_bytes.to_string());
        all &= field("mode", d.mode.clone(), r.mode.clone());
        all &= field("role", d.roles.join(" "), r.roles.join(" "));
        if all {
            out.push(ok(format!(
                "{name}: same name, minor, size, mode and roles on {me} and {it}"
            )));
        }
        if r.local_copy {
            match &r.state_map_problem {
                None => out.push(ok(format!(
                    "{name}: state map on {it} is present and large enough"
                ))),
                Some(p) => out.push(err(format!("{name}: on {it}: {p}"))),
            }
            if r.remote_sites.len() > 1 {
                out.push(err(format!(
                    "{name}: the remote peers of {it} are at several sites ({}); they must be at one",
                    r.remote_sites.join(", ")
                )));
            }
        }
        if d.remote_sites.len() > 1 {
            out.push(err(format!(
                "{name}: the remote peers of {me} are at several sites ({}); they must be at one",
                d.remote_sites.join(", ")
            )));
        }
    }
    out
}
