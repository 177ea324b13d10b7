//! What a person installs: the Debian package (`scripts/package.sh`, checked
//! with `dpkg-deb`; it holds the OCF resource agent too), man pages (`man -l`), shell completions (loaded in
//! bash), the Prometheus alert rules (`promtool check rules`, `promtool
//! test rules`) and the Grafana dashboard.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use gmd_tests::*;

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

fn generated() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    run(Command::new(bin("gmdctl")).arg("generate").arg(dir.path())).ok();
    dir
}

/// gmdctl's subcommands as `gmdctl --help` lists them.
fn gmdctl_subcommands() -> BTreeSet<String> {
    let help = run(Command::new(bin("gmdctl")).arg("--help")).ok().stdout;
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_program_and_subcommand_has_a_man_page_that_man_renders() {
    let dir = generated();
    let man8 = dir.path().join("man/man8");
    let subcommands = gmdctl_subcommands();
    assert!(subcommands.contains("up") && subcommands.contains("status"));
    assert!(!subcommands.contains("generate"), "generate is hidden");
    let mut pages: Vec<String> = vec!["gmdctl".into(), "gmdstat".into(), "gmdd".into()];
    pages.extend(subcommands.iter().map(|s| format!("gmdctl-{s}")));
    for page in &pages {
        let path = man8.join(format!("{page}.8"));
        assert!(path.exists(), "{} is missing", path.display());
        let r = run(Command::new("man")
            .arg("-l")
            .arg(&path)
            .env("MANWIDTH", "80")
            .env("MAN_KEEP_FORMATTING", "0"));
        assert_eq!(r.code, 0, "man -l {page}.8:\n{}", r.text());
        let plain = plain(&r.stdout);
        for section in ["NAME", "SYNOPSIS", "DESCRIPTION"] {
            assert!(
                plain.contains(section),
                "{page}.8 lacks {section}:\n{plain}"
            );
        }
        assert!(
            r.stderr.trim().is_empty(),
            "man -l {page}.8 warned:\n{}",
            r.stderr
        );
    }
    // The options are there, as --help gives them.
    let status = run(Command::new("man")
        .arg("-l")
        .arg(man8.join("gmdctl-show-state.8")))
    .ok();
    let status = plain(&status.stdout);
    assert!(
        status.contains("--picture") && status.contains("--json"),
        "{status}"
    );
    let gmdctl = plain(
        &run(Command::new("man").arg("-l").arg(man8.join("gmdctl.8")))
            .ok()
            .stdout,
    );
    assert!(gmdctl.contains("Administer GeoMirror devices"), "{gmdctl}");
    let count = std::fs::read_dir(&man8).expect("man8").count();
    assert_eq!(count, pages.len(), "unexpected pages in {}", man8.display());
}

/// man's output without overstriking (bold as `XX`, underline as `_X`).
fn plain(text: &str) -> String {
    let mut out: Vec<char> = Vec::new();
    for c in text.chars() {
        if c == '\u{8}' {
            out.pop();
            continue;
        }
        out.push(c);
    }
    // After a backspace the next character replaces the one removed.
    out.into_iter().collect()
}

/// Completions bash offers for the words typed (the last is completed).
fn bash_complete(script: &Path, words: &[&str]) -> Vec<String> {
    let words_q: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
    let cmd = words[0];
    let line = format!(
        "source '{}' || exit 3\n\
         complete -p {cmd} >/dev/null || exit 4\n\
         COMP_WORDS=({})\nCOMP_CWORD={}\nCOMP_LINE='{}'\nCOMP_POINT=${{#COMP_LINE}}\n\
         _{cmd} {cmd} '{}' '{}'\nprintf '%s\\n' \"${{COMPREPLY[@]}}\"",
        script.display(),
        words_q.join(" "),
        words.len() - 1,
        words.join(" "),
        words[words.len() - 1],
        words[words.len().saturating_sub(2)],
    );
    let r = run(Command::new("bash").arg("--norc").arg("-c").arg(line)).ok();
    r.stdout.lines().map(str::to_owned).collect()
}

#[test]
fn bash_completion_loads_and_completes_subcommands_and_options() {
    let dir = generated();
    let bash = dir.path().join("completions/bash");
    assert_eq!(
        bash_complete(&bash.join("gmdctl"), &["gmdctl", "st"]),
        ["status", "start", "stop"]
    );
    assert!(
        bash_complete(&bash.join("gmdctl"), &["gmdctl", "show-state", "--p"])
            .contains(&"--picture".to_string())
    );
    assert!(
        bash_complete(&bash.join("gmdctl"), &["gmdctl", "events", "--"])
            .iter()
            .any(|c| c == "--timestamps")
    );
    assert!(
        bash_complete(&bash.join("gmdstat"), &["gmdstat", "--j"]).contains(&"--json".to_string())
    );
    assert!(
        bash_complete(&bash.join("gmdd"), &["gmdd", "--con"]).contains(&"--config".to_string())
    );
    for (shell, files) in [
        ("zsh", ["_gmdctl", "_gmdstat", "_gmdd"]),
        ("fish", ["gmdctl.fish", "gmdstat.fish", "gmdd.fish"]),
    ] {
        for f in files {
            let text = std::fs::read_to_string(dir.path().join("completions").join(shell).join(f))
                .unwrap_or_else(|e| panic!("{shell}/{f}: {e}"));
            assert!(
                text.contains("status") || !f.contains("gmdctl"),
                "{shell}/{f}"
            );
        }
    }
}

#[test]
fn the_alert_rules_pass_promtool_check_and_their_unit_tests() {
    let rules = repo("dist/prometheus/gmd-alerts.yml");
    let r = run(Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(&rules));
    assert_eq!(r.code, 0, "promtool check rules:\n{}", r.text());
    assert!(r.text().contains("SUCCESS: 6 rules found"), "{}", r.text());
    let r = run(Command::new("promtool")
        .arg("test")
        .arg("rules")
        .arg("gmd-alerts.test.yml")
        .current_dir(repo("dist/prometheus")));
    assert_eq!(r.code, 0, "promtool test rules:\n{}", r.text());
    let text = std::fs::read_to_string(&rules).expect("rules");
    for alert in [
        "GmdPeerDown",
        "GmdStandaloneWithStaleData",
        "GmdResyncWithoutProgress",
        "GmdDivergenceRefused",
        "GmdAsyncBacklogNearHighWaterMark",
        "GmdAuthenticationFailures",
    ] {
        assert!(text.contains(&format!("alert: {alert}")), "{alert} missing");
    }
}

#[test]
fn the_debian_package_holds_programs_unit_man_pages_completions_and_examples() {
    if Command::new("cargo-deb").arg("--version").output().is_err() {
        panic!("cargo-deb is missing: cargo install --locked cargo-deb (.ci/run does)");
    }
    let r = run(Command::new(repo("scripts/package.sh"))
        .env("PROFILE", "dev")
        .current_dir(repo("")));
    assert_eq!(r.code, 0, "scripts/package.sh:\n{}", r.text());
    let deb = r
        .stdout
        .lines()
        .chain(r.stderr.lines())
        .find(|l| l.trim().ends_with(".deb"))
        .map(|l| PathBuf::from(l.trim()))
        .unwrap_or_else(|| panic!("no .deb named:\n{}", r.text()));
    let listing = run(Command::new("dpkg-deb").arg("-c").arg(&deb))
        .ok()
        .stdout;
    let entries: BTreeSet<String> = listing
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .map(|p| p.trim_start_matches('.').to_owned())
        .collect();
    let mut wanted: Vec<String> = [
        "/usr/sbin/gmdd",
        "/usr/sbin/gmdctl",
        "/usr/sbin/gmdstat",
        "/lib/systemd/system/gmdd.service",
        "/etc/gmd/",
        "/etc/gmd/README",
        "/usr/share/doc/gmd/examples/loopback.toml",
        "/usr/share/doc/gmd/OPERATIONS.md",
        "/usr/share/man/man8/gmdd.8.gz",
        "/usr/share/man/man8/gmdctl.8.gz",
        "/usr/share/man/man8/gmdstat.8.gz",
        "/usr/share/bash-completion/completions/gmdctl",
        "/usr/share/bash-completion/completions/gmdstat",
        "/usr/share/bash-completion/completions/gmdd",
        "/usr/share/zsh/vendor-completions/_gmdctl",
        "/usr/share/fish/vendor_completions.d/gmdctl.fish",
        "/usr/share/gmd/grafana/gmd-dashboard.json",
        "/usr/share/gmd/prometheus/gmd-alerts.yml",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    wanted.extend(
        gmdctl_subcommands()
            .iter()
            .map(|s| format!("/usr/share/man/man8/gmdctl-{s}.8.gz")),
    );
    for w in &wanted {
        assert!(entries.contains(w), "{w} is not in the package:\n{listing}");
    }
    // Programs executable, under /usr/sbin; the OCF resource agent
    // (ocf:gmd:gmd) executable where Pacemaker looks for it.
    for line in listing.lines().filter(|l| l.contains("./usr/sbin/gmd")) {
        assert!(line.starts_with("-rwxr-xr-x"), "{line}");
    }
    let agent = listing
        .lines()
        .find(|l| l.ends_with("./usr/lib/ocf/resource.d/gmd/gmd"))
        .unwrap_or_else(|| panic!("the OCF resource agent is not in the package:\n{listing}"));
    assert!(agent.starts_with("-rwxr-xr-x"), "{agent}");
    // The Pacemaker fence handler, where the docs name it for fence_handler.
    let fence = listing
        .lines()
        .find(|l| l.ends_with("./usr/lib/gmd/fence-pacemaker"))
        .unwrap_or_else(|| panic!("the fence handler is not in the package:\n{listing}"));
    assert!(fence.starts_with("-rwxr-xr-x"), "{fence}");
    let field = |f: &str| {
        run(Command::new("dpkg-deb").arg("-f").arg(&deb).arg(f))
            .ok()
            .stdout
            .trim()
            .to_owned()
    };
    assert_eq!(field("Package"), "gmd");
    assert_eq!(field("Section"), "admin");
    assert!(
        field("Suggests").contains("resource-agents"),
        "the OCF agent needs the OCF shell functions"
    );
    let control = tempfile::tempdir().expect("tempdir");
    run(Command::new("dpkg-deb")
        .arg("-e")
        .arg(&deb)
        .arg(control.path()))
    .ok();
    let conffiles = std::fs::read_to_string(control.path().join("conffiles")).expect("conffiles");
    assert!(
        conffiles.lines().any(|l| l == "/etc/gmd/README"),
        "{conffiles}"
    );
}

#[test]
fn the_dashboard_is_grafana_json_whose_queries_name_documented_metrics() {
    let text = std::fs::read_to_string(repo("dist/grafana/gmd-dashboard.json")).expect("dashboard");
    let dash: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    assert!(dash["title"].as_str().is_some_and(|t| t.contains("gmd")));
    let docs = std::fs::read_to_string(repo("docs/OPERATIONS.md")).expect("docs");
    let panels = dash["panels"].as_array().expect("panels");
    let mut queries = 0;
    for p in panels.iter().filter(|p| p["type"] != "row") {
        for t in p["targets"].as_array().expect("targets") {
            let expr = t["expr"].as_str().expect("expr");
            queries += 1;
            for name in metric_names(expr) {
                assert!(
                    docs.contains(&format!("`{name}")),
                    "panel {:?} uses {name}, not documented in docs/OPERATIONS.md",
                    p["title"]
                );
            }
        }
    }
    assert!(queries >= 15, "{queries} queries");
}

/// `gmd_…` metric names in a PromQL expression (histogram suffixes cut).
pub fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("gmd_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = tail[..end].trim_end_matches("_bucket").to_owned();
        out.push(name);
        rest = &tail[end..];
    }
    out
}

#[test]
fn the_demo_names_what_to_install_before_it_builds() {
    // A machine without qemu-io: only the tools the check itself uses.
    let dir = tempfile::tempdir().expect("tempdir");
    for tool in ["bash", "dirname", "ls", "id", "cargo", "python3"] {
        let Some(path) = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
            .map(|d| d.join(tool))
            .find(|p| p.exists())
        else {
            panic!("{tool} not found");
        };
        std::os::unix::fs::symlink(path, dir.path().join(tool)).expect("symlink");
    }
    let r = run(Command::new(dir.path().join("bash"))
        .arg(repo("scripts/demo.sh"))
        .env("PATH", dir.path())
        .env("GMD_DEMO_NO_INSTALL", "1"));
    assert_eq!(r.code, 1, "{}", r.text());
    assert!(
        r.stderr
            .contains("install them first: sudo apt-get install qemu-utils"),
        "{}",
        r.text()
    );
    assert!(!r.text().contains("Building gmd"), "{}", r.text());
}
