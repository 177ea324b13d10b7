//! The figures of gmdstat and netstat in Prometheus text exposition format
//! (version 0.0.4), named per Prometheus conventions: `gmd_` prefix, base
//! units (bytes, seconds), `_total` on counters. docs/OPERATIONS.md lists
//! every metric.

use std::fmt::Write as _;

use gmd_core::latency::LATENCY_BUCKETS;

use crate::report::{NetReport, Report};

/// Writes metric families: one `# HELP` and `# TYPE` per family, then its samples.
struct Writer {
    out: String,
}

/// Escapes a label value.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn labels(pairs: &[(&str, &str)]) -> String {
    if pairs.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    format!("{{{}}}", inner.join(","))
}

impl Writer {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, pairs: &[(&str, &str)], value: f64) {
        let _ = writeln!(self.out, "{name}{} {value}", labels(pairs));
    }

    /// A family with one sample per item.
    fn each<T>(
        &mut self,
        name: &str,
        kind: &str,
        help: &str,
        items: &[T],
        label: impl Fn(&T) -> Vec<(&'static str, String)>,
        value: impl Fn(&T) -> f64,
    ) {
        if items.is_empty() {
            return;
        }
        self.family(name, kind, help);
        for item in items {
            let l = label(item);
            let pairs: Vec<(&str, &str)> = l.iter().map(|(k, v)| (*k, v.as_str())).collect();
            self.sample(name, &pairs, value(item));
        }
    }
}

/// Every mode in effect a device can report.
pub const MODES_IN_EFFECT: [&str; 7] = [
    "sync",
    "mwc",
    "async",
    "async-hwm-fallback",
    "standalone",
    "stopped",
    "defined",
];

/// A state set (as OpenMetrics has them): per device one sample per
/// possible value, 1 for the current one and 0 for the others.
fn state_set(
    w: &mut Writer,
    name: &str,
    help: &str,
    devices: &[crate::report::DeviceReport],
    label: &str,
    values: &[&str],
    current: impl Fn(&crate::report::DeviceReport) -> String,
) {
    if devices.is_empty() {
        return;
    }
    w.family(name, "gauge", help);
    for x in devices {
        let now = current(x);
        for v in values {
            w.sample(name, &[("device", &x.name), (label, v)], b(now == *v));
        }
    }
}

fn b(x: bool) -> f64 {
    if x { 1.0 } else { 0.0 }
}

/// Renders every figure of `report` and `net`.
pub fn render(report: &Report, net: &NetReport) -> String {
    let mut w = Writer { out: String::new() };
    let d = &report.devices;
    let dev = |x: &crate::report::DeviceReport| vec![("device", x.name.clone())];
    w.family("gmd_up", "gauge", "Whether gmdd answers (always 1).");
    w.sample("gmd_up", &[("machine", &report.machine)], 1.0);
    w.family("gmd_uptime_seconds", "gauge", "Seconds since gmdd started.");
    w.sample("gmd_uptime_seconds", &[], report.uptime_ms as f64 / 1000.0);
    w.each(
        "gmd_device_info",
        "gauge",
        "Device attributes and state (value 1).",
        d,
        |x| {
            vec![
                ("device", x.name.clone()),
                ("state", x.state.to_string()),
                ("mode", x.mode.to_string()),
                ("mode_in_effect", x.mode_in_effect.clone()),
                ("peer", x.peer.clone().unwrap_or_default()),
            ]
        },
        |_| 1.0,
    );
    w.family(
        "gmd_build_info",
        "gauge",
        "The gmd version serving these metrics (value 1).",
    );
    w.sample(
        "gmd_build_info",
        &[
            ("version", env!("CARGO_PKG_VERSION")),
            ("machine", &report.machine),
        ],
        1.0,
    );
    state_set(
        &mut w,
        "gmd_device_state",
        "Lifecycle state: 1 for the state the device is in, 0 for the others.",
        d,
        "state",
        &["DEFINED", "STOPPED", "AVAILABLE"],
        |x| x.state.to_string(),
    );
    state_set(
        &mut w,
        "gmd_device_mode_in_effect",
        "Mode in effect: 1 for the device's, 0 for the others.",
        d,
        "mode",
        &MODES_IN_EFFECT,
        |x| x.mode_in_effect.clone(),
    );
    state_set(
        &mut w,
        "gmd_device_role",
        "Role the device runs in here: 1 for its role, 0 for the others (all 0 when not AVAILABLE).",
        d,
        "role",
        &["primary", "secondary", "split"],
        |x| x.role.clone().unwrap_or_default(),
    );
    w.each(
        "gmd_device_size_bytes",
        "gauge",
        "Device size.",
        d,
        dev,
        |x| x.size_bytes as f64,
    );
    w.each(
        "gmd_device_out_of_sync_bytes",
        "gauge",
        "Bytes not known to be identical on the peer (stale and inconsistent regions).",
        d,
        dev,
        |x| x.out_of_sync_bytes() as f64,
    );
    w.each(
        "gmd_device_resync_sent_bytes_total",
        "counter",
        "Resync data sent to the peer since the device started.",
        d,
        dev,
        |x| x.resync_sent_bytes as f64,
    );
    w.each(
        "gmd_device_resync_same_bytes_total",
        "counter",
        "Resync regions found identical on the peer by checksum since the device started (data not moved).",
        d,
        dev,
        |x| x.resync_same_bytes as f64,
    );
    w.each(
        "gmd_device_resync_regions",
        "gauge",
        "Regions of the current resync (0 when none runs).",
        d,
        dev,
        |x| x.resync.as_ref().map_or(0.0, |r| r.regions_total as f64),
    );
    w.each(
        "gmd_device_divergence_refused",
        "gauge",
        "Whether mirroring is refused because both sides wrote while apart (gmdctl unify).",
        d,
        dev,
        |x| b(x.divergence_refused()),
    );
    w.each(
        "gmd_device_available",
        "gauge",
        "Whether the device is AVAILABLE.",
        d,
        dev,
        |x| b(x.state == gmd_core::statemap::AdminState::Available),
    );
    w.each(
        "gmd_device_connected",
        "gauge",
        "Whether the device mirrors with a peer now.",
        d,
        dev,
        |x| b(x.peer.is_some()),
    );
    w.each(
        "gmd_device_reads_total",
        "counter",
        "Local reads completed.",
        d,
        dev,
        |x| x.local.reads as f64,
    );
    w.each(
        "gmd_device_read_bytes_total",
        "counter",
        "Bytes read locally.",
        d,
        dev,
        |x| x.local.read_bytes as f64,
    );
    w.each(
        "gmd_device_direct_reads_total",
        "counter",
        "Reads the frontend served itself, without the device thread.",
        d,
        dev,
        |x| x.local.direct_reads as f64,
    );
    w.each(
        "gmd_device_direct_writes_total",
        "counter",
        "Writes whose local part the frontend ran itself, without the device thread.",
        d,
        dev,
        |x| x.local.direct_writes as f64,
    );
    w.each(
        "gmd_device_overlap_waits_total",
        "counter",
        "Writes that waited for an earlier overlapping write to finish.",
        d,
        dev,
        |x| x.local.overlap_waits as f64,
    );
    w.each(
        "gmd_device_writes_total",
        "counter",
        "Local writes completed.",
        d,
        dev,
        |x| x.local.writes as f64,
    );
    w.each(
        "gmd_device_written_bytes_total",
        "counter",
        "Bytes written locally.",
        d,
        dev,
        |x| x.local.write_bytes as f64,
    );
    w.each(
        "gmd_device_flushes_total",
        "counter",
        "Local flushes completed.",
        d,
        dev,
        |x| x.local.flushes as f64,
    );
    w.each(
        "gmd_device_errors_total",
        "counter",
        "Local requests that failed.",
        d,
        dev,
        |x| x.local.errors as f64,
    );
    w.each(
        "gmd_device_in_flight_requests",
        "gauge",
        "Requests in the device now.",
        d,
        dev,
        |x| x.local.in_flight as f64,
    );
    w.each(
        "gmd_device_remote_writes_total",
        "counter",
        "Writes originated by the remote peer and applied here.",
        d,
        dev,
        |x| x.remote.writes as f64,
    );
    w.each(
        "gmd_device_remote_written_bytes_total",
        "counter",
        "Bytes written here for the remote peer.",
        d,
        dev,
        |x| x.remote.write_bytes as f64,
    );
    w.each(
        "gmd_device_mirrored_writes_total",
        "counter",
        "Local writes sent to the peer.",
        d,
        dev,
        |x| x.mirrored.writes as f64,
    );
    w.each(
        "gmd_device_mirrored_bytes_total",
        "counter",
        "Bytes of local writes sent to the peer.",
        d,
        dev,
        |x| x.mirrored.write_bytes as f64,
    );
    w.each(
        "gmd_device_mirror_failures_total",
        "counter",
        "Writes or flushes the peer failed or never answered.",
        d,
        dev,
        |x| x.mirrored.failures as f64,
    );
    w.each(
        "gmd_device_remote_wait_seconds_total",
        "counter",
        "Time local writes waited for the peer after their local part.",
        d,
        dev,
        |x| x.mirrored.wait_us as f64 / 1e6,
    );
    if !d.is_empty() {
        let name = "gmd_device_write_latency_seconds";
        w.family(name, "histogram", "Latency of local writes.");
        for x in d {
            let mut cumulative = 0;
            for (i, count) in x.latency.buckets.iter().enumerate() {
                cumulative += count;
                let le = if i + 1 == LATENCY_BUCKETS {
                    "+Inf".to_string()
                } else {
                    format!("{}", (1u64 << (i + 1)) as f64 / 1e6)
                };
                w.sample(
                    &format!("{name}_bucket"),
                    &[("device", &x.name), ("le", &le)],
                    cumulative as f64,
                );
            }
            w.sample(
                &format!("{name}_sum"),
                &[("device", &x.name)],
                x.latency.sum_us as f64 / 1e6,
            );
            w.sample(
                &format!("{name}_count"),
                &[("device", &x.name)],
                x.latency.writes as f64,
            );
        }
    }
    w.each(
        "gmd_device_backlog_bytes",
        "gauge",
        "Async bytes completed locally, not yet acknowledged by the peer.",
        d,
        dev,
        |x| x.backlog.bytes as f64,
    );
    w.each(
        "gmd_device_hwm_bytes",
        "gauge",
        "Async high water mark (0 for sync and mwc).",
        d,
        dev,
        |x| x.backlog.hwm_bytes as f64,
    );
    w.each(
        "gmd_device_peer_stalls_total",
        "counter",
        "Times the peer was dropped for acknowledging nothing while writes waited.",
        d,
        dev,
        |x| x.mirrored.stalls as f64,
    );
    w.each(
        "gmd_device_map_commits_total",
        "counter",
        "State map commits (each one write and sync of the dirty pages).",
        d,
        dev,
        |x| x.map_writes.commits as f64,
    );
    w.each(
        "gmd_device_map_pages_written_total",
        "counter",
        "State map pages written.",
        d,
        dev,
        |x| x.map_writes.pages_written as f64,
    );
    w.each(
        "gmd_device_hwm_fallbacks_total",
        "counter",
        "Times async fell back to mwc at the high water mark.",
        d,
        dev,
        |x| x.backlog.hwm_fallbacks as f64,
    );
    w.each(
        "gmd_device_hwm_fallback_active",
        "gauge",
        "Whether async behaves as mwc now.",
        d,
        dev,
        |x| b(x.backlog.fallback_active),
    );
    let mapped: Vec<_> = d.iter().filter(|x| x.map.is_some()).collect();
    let map = |x: &&crate::report::DeviceReport| x.map.unwrap_or_default();
    w.each(
        "gmd_device_regions",
        "gauge",
        "Regions (state map cells) of the device.",
        &mapped,
        |x| vec![("device", x.name.clone())],
        |x| map(x).regions as f64,
    );
    w.each(
        "gmd_device_stale_regions",
        "gauge",
        "Regions that differ from the peer (dirty).",
        &mapped,
        |x| vec![("device", x.name.clone())],
        |x| map(x).stale as f64,
    );
    w.each(
        "gmd_device_inconsistent_regions",
        "gauge",
        "Regions with writes in flight or being resynchronised.",
        &mapped,
        |x| vec![("device", x.name.clone())],
        |x| map(x).inconsistent as f64,
    );
    w.each(
        "gmd_device_resync_regions_left",
        "gauge",
        "Regions left in the current resync (0 when none runs).",
        d,
        dev,
        |x| x.resync.as_ref().map_or(0, |r| r.regions_left) as f64,
    );
    w.each(
        "gmd_device_resync_bytes_per_second",
        "gauge",
        "Resync rate since it started (source side).",
        d,
        dev,
        |x| x.resync.as_ref().map_or(0, |r| r.bytes_per_s) as f64,
    );
    let peer = |p: &crate::report::PeerReport| vec![("peer", p.machine.clone())];
    let p = &report.peers;
    w.each(
        "gmd_peer_up",
        "gauge",
        "Whether GeoMessage has a session with the machine.",
        p,
        peer,
        |x| b(x.up),
    );
    w.each(
        "gmd_peer_messages_sent_total",
        "counter",
        "Messages sent to the machine (originals).",
        p,
        peer,
        |x| x.messages_sent as f64,
    );
    w.each(
        "gmd_peer_retries_total",
        "counter",
        "Datagrams to the machine re-sent after a loss.",
        p,
        peer,
        |x| x.retries as f64,
    );
    w.each(
        "gmd_peer_replies_total",
        "counter",
        "Replies received from the machine.",
        p,
        peer,
        |x| x.replies as f64,
    );
    w.each(
        "gmd_peer_sent_bytes_total",
        "counter",
        "Message bytes sent to the machine.",
        p,
        peer,
        |x| x.bytes_sent as f64,
    );
    w.each(
        "gmd_peer_received_bytes_total",
        "counter",
        "Message bytes received from the machine.",
        p,
        peer,
        |x| x.bytes_received as f64,
    );
    w.each(
        "gmd_peer_failures_total",
        "counter",
        "Requests to the machine that failed.",
        p,
        peer,
        |x| x.failures as f64,
    );
    let n = &net.networks;
    let netl = |x: &crate::report::NetNetwork| vec![("network", x.name.clone())];
    w.each(
        "gmd_network_packets_sent_total",
        "counter",
        "Datagrams sent (with resends, pings and acks).",
        n,
        netl,
        |x| x.packets_sent as f64,
    );
    w.each(
        "gmd_network_packets_received_total",
        "counter",
        "Datagrams received and authenticated.",
        n,
        netl,
        |x| x.packets_received as f64,
    );
    w.each(
        "gmd_network_sent_bytes_total",
        "counter",
        "Bytes of datagrams sent.",
        n,
        netl,
        |x| x.bytes_sent as f64,
    );
    w.each(
        "gmd_network_received_bytes_total",
        "counter",
        "Bytes of datagrams received.",
        n,
        netl,
        |x| x.bytes_received as f64,
    );
    w.each(
        "gmd_network_resends_total",
        "counter",
        "Datagrams whose data was re-sent.",
        n,
        netl,
        |x| x.resends as f64,
    );
    w.each(
        "gmd_network_spurious_losses_total",
        "counter",
        "Datagrams declared lost and acknowledged after all (late or reordered).",
        n,
        netl,
        |x| x.spurious as f64,
    );
    w.each(
        "gmd_network_timeouts_total",
        "counter",
        "Retransmission timeouts.",
        n,
        netl,
        |x| x.timeouts as f64,
    );
    w.each(
        "gmd_network_failures_total",
        "counter",
        "Times a path on the network was declared down.",
        n,
        netl,
        |x| x.failures as f64,
    );
    w.each(
        "gmd_network_duplicates_total",
        "counter",
        "Duplicate datagrams received.",
        n,
        netl,
        |x| x.duplicates as f64,
    );
    let paths = &net.paths;
    let pathl =
        |x: &crate::report::NetPath| vec![("peer", x.peer.clone()), ("network", x.network.clone())];
    w.each(
        "gmd_path_up",
        "gauge",
        "Whether the path is up.",
        paths,
        pathl,
        |x| b(x.up),
    );
    w.each(
        "gmd_path_active",
        "gauge",
        "Whether traffic to the peer uses the path now.",
        paths,
        pathl,
        |x| b(x.active),
    );
    let measured: Vec<_> = paths.iter().filter(|x| x.srtt_us.is_some()).collect();
    w.each(
        "gmd_path_srtt_seconds",
        "gauge",
        "Smoothed round-trip time of the path.",
        &measured,
        |x| vec![("peer", x.peer.clone()), ("network", x.network.clone())],
        |x| x.srtt_us.unwrap_or(0) as f64 / 1e6,
    );
    w.family(
        "gmd_rejected_datagrams_total",
        "counter",
        "Datagrams rejected before they had any effect.",
    );
    w.sample("gmd_rejected_datagrams_total", &[], net.rejected as f64);
    w.each(
        "gmd_auth_failed_datagrams_total",
        "counter",
        "Datagrams that failed authentication, per source address (the cluster keys may differ).",
        &net.auth_failures,
        |f| {
            vec![
                ("from", f.from.clone()),
                ("machine", f.machine.clone().unwrap_or_default()),
            ]
        },
        |f| f.count as f64,
    );
    w.out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(labels(&[("a", "x\"y\\z\n")]), r#"{a="x\"y\\z\n"}"#);
        assert_eq!(labels(&[]), "");
    }

    #[test]
    fn state_sets_have_one_sample_at_1_per_device() {
        let report: Report = serde_json::from_value(serde_json::json!({
            "schema": 1, "machine": "alpha", "uptime_ms": 1000, "peers": [],
            "devices": [{
                "name": "d", "state": "AVAILABLE", "mode": "mwc",
                "mode_in_effect": "standalone", "peer": null, "uptime_ms": 5,
                "local": {"reads":0,"read_bytes":0,"writes":0,"write_bytes":0,"flushes":0,"errors":0,"in_flight":0},
                "remote": {"writes":0,"write_bytes":0},
                "mirrored": {"writes":0,"write_bytes":0,"flushes":0,"failures":0,"wait_us":0,"stalls":0},
                "latency": {"writes":0,"sum_us":0,"p50_us":null,"p99_us":null,"p999_us":null,"buckets":vec![0u64; LATENCY_BUCKETS]},
                "backlog": {"bytes":0,"hwm_bytes":0,"hwm_fallbacks":0,"fallback_active":false},
                "map": {"regions": 8192, "stale": 3, "inconsistent": 1, "hot": 2},
                "map_writes": {"commits":0,"pages_written":0},
                "resync": null, "role": "primary", "size_bytes": 268435456,
                "refused": "d: both alpha and beta wrote while apart (data divergence)"
            }]
        }))
        .expect("report");
        let net = NetReport {
            schema: 1,
            machine: "alpha".into(),
            machines: vec![],
            networks: vec![],
            paths: vec![],
            rejected: 0,
            auth_failures: vec![],
        };
        let text = render(&report, &net);
        let ones: Vec<&str> = text
            .lines()
            .filter(|l| {
                [
                    "gmd_device_state{",
                    "gmd_device_mode_in_effect{",
                    "gmd_device_role{",
                ]
                .iter()
                .any(|p| l.starts_with(p))
            })
            .filter(|l| l.ends_with(" 1"))
            .collect();
        assert_eq!(
            ones,
            [
                r#"gmd_device_state{device="d",state="AVAILABLE"} 1"#,
                r#"gmd_device_mode_in_effect{device="d",mode="standalone"} 1"#,
                r#"gmd_device_role{device="d",role="primary"} 1"#,
            ]
        );
        assert!(text.contains("gmd_device_out_of_sync_bytes{device=\"d\"} 131072\n"));
        assert!(text.contains("gmd_device_divergence_refused{device=\"d\"} 1\n"));
        assert!(text.contains("gmd_build_info{version=\""));
    }
}
