use super::*;

const EXAMPLE: &str = include_str!("../../../examples/loopback.toml");

fn parse(text: &str) -> Result<ClusterConfig, ConfigError> {
    ClusterConfig::parse(Path::new("/etc/gmd/cluster.toml"), text)
}

fn problems(text: &str) -> Vec<Problem> {
    match parse(text) {
        Err(ConfigError::Invalid { problems, .. }) => problems,
        other => panic!("expected rule violations, got {other:?}"),
    }
}

fn edited(from: &str, to: &str) -> String {
    assert!(EXAMPLE.contains(from), "example lacks {from:?}");
    EXAMPLE.replacen(from, to, 1)
}

fn assert_problem(text: &str, field: &str, needle: &str) {
    let found = problems(text);
    assert!(
        found
            .iter()
            .any(|p| p.field == field && p.message.contains(needle)),
        "no problem at {field} containing {needle:?} in {found:#?}"
    );
}

#[test]
fn example_parses_with_resolved_paths_and_defaults() {
    let config = parse(EXAMPLE).unwrap();
    assert_eq!(config.name, "loopback");
    assert_eq!(config.key_file, Path::new("/etc/gmd/cluster.key"));
    assert!(config.encrypt);
    let dev = &config.devices["data10gmd"];
    assert_eq!(dev.minor, 10);
    assert_eq!(dev.mode, Mode::Mwc);
    assert_eq!(dev.size_bytes, 256 << 20);
    assert_eq!(dev.hwm_kib, 128);
    assert_eq!(dev.sync_rate_kib, Some(32));
    assert!(!dev.resync_checksums, "checksum resync is off by default");
    assert_eq!(dev.block_size, 512);
    assert_eq!(dev.export, vec![Frontend::Nbd]);
    assert_eq!(
        dev.machines["alpha"].data,
        Path::new("/etc/gmd/alpha/data10.img")
    );
    assert_eq!(dev.machines["beta"].role, Role::None);
    let alpha = &config.machines["alpha"];
    assert_eq!(alpha.promote_failure_timeout_s, 5);
    assert_eq!(
        alpha.nbd_listen,
        ListenAddr::Tcp("127.0.0.1:10809".parse().unwrap())
    );
    let peers: Vec<_> = dev
        .remote_peers(&config, "alpha")
        .map(|m| m.machine.as_str())
        .collect();
    assert_eq!(peers, ["beta"]);
    assert_eq!(config.networks["geonet1"].datagram_size, Some(8192));
}

#[test]
fn syntax_errors_name_the_file_and_line() {
    let err = parse("[cluster\nname = 1").unwrap_err();
    let text = err.to_string();
    assert!(text.contains("/etc/gmd/cluster.toml"), "{text}");
    assert!(text.contains("line 1"), "{text}");
}

#[test]
fn unknown_fields_are_refused_by_name() {
    let text = edited("hwm_kib = 128", "hwm_kb = 128");
    let err = parse(&text).unwrap_err().to_string();
    assert!(err.contains("hwm_kb"), "{err}");
}

#[test]
fn bad_mode_names_the_allowed_values() {
    assert_problem(
        &edited("mode = \"mwc\"", "mode = \"fast\""),
        "devices.data10gmd.mode",
        "use \"sync\", \"mwc\" or \"async\"",
    );
}

#[test]
fn a_datagram_size_geomessage_cannot_send_is_refused_with_the_range() {
    for bad in ["575", "65001"] {
        assert_problem(
            &edited("datagram_size = 8192", &format!("datagram_size = {bad}")),
            "networks.geonet1.datagram_size",
            "use 576–65000 bytes, or leave it unset",
        );
    }
    let config = parse(&edited("datagram_size = 8192", "datagram_size = 65000")).unwrap();
    assert_eq!(config.networks["geonet1"].datagram_size, Some(65_000));
}

#[test]
fn minor_out_of_range_and_duplicates_are_refused() {
    assert_problem(
        &edited("minor = 10", "minor = 1024"),
        "devices.data10gmd.minor",
        "0–1023",
    );
    let twice = format!(
        "{EXAMPLE}\n[devices.other]\nminor = 10\nmode = \"sync\"\nsize = \"1MiB\"\n\
         [devices.other.machines.alpha]\ndata = \"a\"\nstate_map = \"b\"\n\
         [devices.other.machines.beta]\ndata = \"a\"\nstate_map = \"b\"\n"
    );
    assert_problem(
        &twice,
        "devices.other.minor",
        "already used by device data10gmd",
    );
}

#[test]
fn sizes_must_parse_and_fit_the_block_size() {
    assert_problem(
        &edited("size = \"256MiB\"", "size = \"lots\""),
        "devices.data10gmd.size",
        "not a size",
    );
    assert_problem(
        &edited("size = \"256MiB\"", "size = 4097"),
        "devices.data10gmd.size",
        "multiple of the block size",
    );
}

#[test]
fn references_to_unknown_names_are_refused() {
    assert_problem(
        &edited("site = \"dallas\"", "site = \"paris\""),
        "machines.beta.site",
        "unknown site",
    );
    assert_problem(
        &edited(
            "[devices.data10gmd.machines.beta]",
            "[devices.data10gmd.machines.gamma]",
        ),
        "devices.data10gmd.machines.gamma",
        "unknown machine",
    );
    assert_problem(
        &edited(
            "geonet1 = \"127.0.0.1:6756\"",
            "geonet2 = \"127.0.0.1:6756\"",
        ),
        "machines.beta.interfaces.geonet2",
        "unknown network",
    );
}

#[test]
fn addresses_must_parse_and_be_unique() {
    assert_problem(
        &edited("\"127.0.0.1:6756\"", "\"localhost\""),
        "machines.beta.interfaces.geonet1",
        "not an address",
    );
    assert_problem(
        &edited("\"127.0.0.1:6756\"", "\"127.0.0.1:6755\""),
        "machines.beta.interfaces.geonet1",
        "also used by machines.alpha.interfaces.geonet1",
    );
    assert_problem(
        &edited(
            "nbd_listen = \"127.0.0.1:10810\"",
            "nbd_listen = \"nowhere\"",
        ),
        "machines.beta.nbd_listen",
        "unix:/path",
    );
}

#[test]
fn sites_need_two_and_one_dominant() {
    assert_problem(
        &edited("dominant = true", "dominant = false"),
        "sites",
        "exactly one site must have dominant",
    );
    assert_problem(&edited("[sites.dallas]", ""), "sites", "exactly two sites");
}

#[test]
fn a_fence_handler_is_an_absolute_path_with_a_timeout() {
    assert_eq!(parse(EXAMPLE).unwrap().machines["alpha"].fence, None);
    let with = |keys: &str| {
        edited(
            "nbd_listen = \"127.0.0.1:10809\"",
            &format!("nbd_listen = \"127.0.0.1:10809\"\n{keys}"),
        )
    };
    let config = parse(&with("fence_handler = \"/usr/lib/gmd/fence-pacemaker\"")).unwrap();
    assert_eq!(
        config.machines["alpha"].fence,
        Some(FenceHandler {
            path: PathBuf::from("/usr/lib/gmd/fence-pacemaker"),
            timeout_s: FENCE_TIMEOUT_S_DEFAULT,
        })
    );
    assert_eq!(config.machines["beta"].fence, None);
    let config = parse(&with("fence_handler = \"/bin/true\"\nfence_timeout = 5")).unwrap();
    assert_eq!(config.machines["alpha"].fence.clone().unwrap().timeout_s, 5);
    assert_problem(
        &with("fence_handler = \"fence-pacemaker\""),
        "machines.alpha.fence_handler",
        "not an absolute path",
    );
    assert_problem(
        &with("fence_handler = \"/bin/true\"\nfence_timeout = 0"),
        "machines.alpha.fence_timeout",
        "seconds ≥ 1",
    );
    assert_problem(
        &with("fence_timeout = 5"),
        "machines.alpha.fence_timeout",
        "without fence_handler",
    );
}

#[test]
fn async_needs_one_primary_and_secondaries() {
    let text = edited("mode = \"mwc\"", "mode = \"async\"");
    assert_problem(
        &text,
        "devices.data10gmd.machines",
        "exactly one machine with role = \"primary\"",
    );
    let ok = text
        .replacen(
            "state_map = \"alpha/data10.sm\"",
            "state_map = \"alpha/data10.sm\"\nrole = \"primary\"",
            1,
        )
        .replacen(
            "state_map = \"beta/data10.sm\"",
            "state_map = \"beta/data10.sm\"\nrole = \"secondary\"",
            1,
        );
    let config = parse(&ok).unwrap();
    assert_eq!(
        config.devices["data10gmd"].machines["alpha"].role,
        Role::Primary
    );
}

#[test]
fn a_device_must_span_both_sites() {
    let text = EXAMPLE.replacen("site = \"dallas\"", "site = \"austin\"", 1);
    assert_problem(
        &text,
        "devices.data10gmd.machines",
        "a copy at each of the two sites",
    );
}

#[test]
fn every_problem_is_reported_at_once() {
    let text = edited("minor = 10", "minor = -1").replacen("mode = \"mwc\"", "mode = \"x\"", 1);
    let found = problems(&text);
    assert!(found.len() >= 2, "{found:#?}");
}

fn set(path: &Path, changes: &[(&str, &str)]) -> Result<ClusterConfig, ConfigError> {
    let changes: Vec<(String, String)> = changes
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    set_device_attributes(path, "data10gmd", "alpha", &changes)
}

#[test]
fn set_rewrites_attributes_and_keeps_comments() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cluster.toml");
    std::fs::write(&path, EXAMPLE).unwrap();
    let config = set(&path, &[("hwm_kib", "256")]).unwrap();
    assert_eq!(config.devices["data10gmd"].hwm_kib, 256);
    let config = set(&path, &[("role", "primary")]).unwrap();
    assert_eq!(
        config.devices["data10gmd"].machines["alpha"].role,
        Role::Primary
    );
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("# async high water mark"));
    // A value the checks refuse leaves the file as it was.
    let err = set(&path, &[("mode", "fast")]).unwrap_err();
    assert!(err.to_string().contains("devices.data10gmd.mode"), "{err}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
    // async needs the other side secondary: refused alone, accepted together.
    let err = set(&path, &[("mode", "async")]).unwrap_err();
    assert!(
        err.to_string().contains("exactly one machine with role"),
        "{err}"
    );
    let config = set(&path, &[("mode", "async"), ("role.beta", "secondary")]).unwrap();
    assert_eq!(config.devices["data10gmd"].mode, Mode::Async);
    assert_eq!(
        config.devices["data10gmd"].machines["beta"].role,
        Role::Secondary
    );
    let err = set(&path, &[("colour", "blue")]).unwrap_err();
    assert!(err.to_string().contains("not an attribute"), "{err}");
}

#[test]
fn ublk_queues_and_depth_parse_with_defaults_and_named_errors() {
    let dev = &parse(EXAMPLE).unwrap().devices["data10gmd"];
    assert_eq!(
        (dev.ublk_queues, dev.ublk_depth),
        (0, 0),
        "0 = the defaults"
    );
    let text = edited(
        "export = [\"nbd\"]",
        "export = [\"ublk\", \"nbd\"]\nublk_queues = 4\nublk_depth = 64",
    );
    let dev = &parse(&text).unwrap().devices["data10gmd"];
    assert_eq!(dev.export, vec![Frontend::Ublk, Frontend::Nbd]);
    assert_eq!((dev.ublk_queues, dev.ublk_depth), (4, 64));
    assert_problem(
        &edited("export = [\"nbd\"]", "export = [\"nbd\"]\nublk_queues = 0"),
        "devices.data10gmd.ublk_queues",
        "use 1–64",
    );
    assert_problem(
        &edited(
            "export = [\"nbd\"]",
            "export = [\"nbd\"]\nublk_depth = 5000",
        ),
        "devices.data10gmd.ublk_depth",
        "use 1–1024",
    );
    assert_problem(
        &edited("export = [\"nbd\"]", "export = [\"iscsi\"]"),
        "devices.data10gmd.export",
        "use \"ublk\" and/or \"nbd\"",
    );
}

#[test]
fn resync_checksums_is_a_boolean() {
    let text = edited("hwm_kib = 128", "hwm_kib = 128\nresync_checksums = true");
    assert!(parse(&text).unwrap().devices["data10gmd"].resync_checksums);
    assert_problem(
        &edited("hwm_kib = 128", "hwm_kib = 128\nresync_checksums = \"yes\""),
        "devices.data10gmd.resync_checksums",
        "use true or false",
    );
}

#[test]
fn sync_rate_kib_is_a_cap_only_when_set() {
    let text = EXAMPLE.replace("sync_rate_kib = 32", "");
    assert_ne!(text, EXAMPLE, "the example sets sync_rate_kib");
    let config = parse(&text).unwrap();
    assert_eq!(config.devices["data10gmd"].sync_rate_kib, None);
    let config = parse(&EXAMPLE.replace("sync_rate_kib = 32", "sync_rate_kib = 0")).unwrap_err();
    assert!(config.to_string().contains("sync_rate_kib"), "{config}");
}
