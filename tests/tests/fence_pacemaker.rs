//! The Pacemaker fence handler the package installs
//! (`dist/ocf/fence-pacemaker`, /usr/lib/gmd/fence-pacemaker), run against
//! a fake `cibadmin` and `crm_node` on PATH that record their arguments
//! and keep the constraints section in a file, and against Pacemaker's own
//! `cibadmin` on a CIB file (`CIB_file`), which `crm_verify` then checks
//! against Pacemaker's schema.

use std::path::{Path, PathBuf};
use std::process::Command;

const RESOURCES: &str = r#"<resources>
  <clone id="other-clone">
    <primitive id="other" class="ocf" provider="gmd" type="gmd">
      <instance_attributes id="other-ia">
        <nvpair id="other-dev" name="device" value="data11gmd"/>
      </instance_attributes>
    </primitive>
  </clone>
  <clone id="data10-clone">
    <meta_attributes id="data10-meta">
      <nvpair id="data10-promotable" name="promotable" value="true"/>
    </meta_attributes>
    <primitive id="data10" class="ocf" provider="gmd" type="gmd">
      <instance_attributes id="data10-ia">
        <nvpair id="data10-dev" name="device" value="data10gmd"/>
      </instance_attributes>
    </primitive>
  </clone>
</resources>
"#;

/// A directory with the fake tools, the CIB files and the argument log.
struct FakeCib {
    dir: tempfile::TempDir,
}

impl FakeCib {
    /// Fake tools; `quorum`: whether changes to the CIB succeed.
    fn new(quorum: bool) -> FakeCib {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().display();
        std::fs::write(dir.path().join("resources.xml"), RESOURCES).expect("resources");
        std::fs::write(dir.path().join("constraints.xml"), "").expect("constraints");
        let cibadmin = format!(
            r#"#!/bin/sh
echo "cibadmin $*" >> {d}/calls
[ "$1" = -Q ] && [ "$3" = resources ] && exec cat {d}/resources.xml
[ "$1" = -Q ] && [ "$3" = constraints ] && exec cat {d}/constraints.xml
{quorum_check}
case "$1" in
-C) grep -q 'id="gmd-fence-' {d}/constraints.xml && exit 76; echo "$5" >> {d}/constraints.xml ;;
-M) echo "$5" > {d}/constraints.xml ;;
-D) : > {d}/constraints.xml ;;
esac
"#,
            quorum_check = if quorum {
                ""
            } else {
                "echo 'Call failed: No quorum' >&2; exit 1"
            }
        );
        let crm_node = format!("#!/bin/sh\necho \"crm_node $*\" >> {d}/calls\necho alpha\n");
        for (name, text) in [("cibadmin", cibadmin), ("crm_node", crm_node)] {
            let path = dir.path().join(name);
            std::fs::write(&path, text).expect("fake tool");
            Command::new("chmod")
                .arg("+x")
                .arg(&path)
                .status()
                .expect("chmod");
        }
        FakeCib { dir }
    }

    /// Runs the handler with `action`; its exit code and output.
    fn run(&self, action: &str, env: &[(&str, &str)]) -> (i32, String) {
        let path = format!(
            "{}:{}",
            self.dir.path().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let out = Command::new(handler())
            .arg(action)
            .env_clear()
            .env("PATH", path)
            .env("GMD_DEVICE", "data10gmd")
            .env("GMD_PEER", "beta")
            .env("GMD_MACHINE", "alpha")
            .envs(env.iter().copied())
            .output()
            .expect("run the handler");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code().unwrap_or(-1), text)
    }

    fn file(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }
}

fn handler() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/ocf/fence-pacemaker")
}

#[test]
fn fence_forbids_promoting_the_devices_clone_elsewhere_and_unfence_lifts_it() {
    let cib = FakeCib::new(true);
    let (code, text) = cib.run("fence", &[]);
    assert_eq!(code, 4, "DRBD's 'peer fenced' code:\n{text}");
    assert!(
        text.contains("data10-clone may be promoted only on alpha"),
        "{text}"
    );
    let constraints = cib.file("constraints.xml");
    for needle in [
        r#"<rsc_location rsc="data10-clone" id="gmd-fence-data10gmd">"#,
        r#"role="Promoted" score="-INFINITY""#,
        r##"attribute="#uname" operation="ne" value="alpha""##,
    ] {
        assert!(constraints.contains(needle), "{needle} in {constraints}");
    }
    assert!(cib.file("calls").contains("cibadmin -C -o constraints -X"));
    // A second loss while it is in place: modified, still fenced.
    let (code, text) = cib.run("fence", &[]);
    assert_eq!(code, 4, "{text}");
    assert!(cib.file("calls").contains("cibadmin -M -o constraints -X"));
    // In sync again: removed.
    let (code, text) = cib.run("unfence", &[]);
    assert_eq!(code, 0, "{text}");
    assert!(
        cib.file("calls")
            .contains(r#"cibadmin -D -o constraints -X <rsc_location id="gmd-fence-data10gmd"/>"#),
        "{}",
        cib.file("calls")
    );
    assert_eq!(cib.file("constraints.xml"), "");
    // Nothing to remove: still a success.
    let (code, text) = cib.run("unfence", &[]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("no constraint"), "{text}");
}

#[test]
fn fence_fails_without_quorum_or_without_a_clone_and_gmd_clone_names_one() {
    let cib = FakeCib::new(false);
    let (code, text) = cib.run("fence", &[]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("No quorum"), "{text}");
    assert!(text.contains("could not place constraint"), "{text}");

    let cib = FakeCib::new(true);
    let (code, text) = cib.run("fence", &[("GMD_DEVICE", "data99gmd")]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("no Pacemaker clone"), "{text}");
    let (code, text) = cib.run(
        "fence",
        &[
            ("GMD_DEVICE", "data99gmd"),
            ("GMD_PCMK_CLONE", "named-clone"),
        ],
    );
    assert_eq!(code, 4, "{text}");
    assert!(cib.file("constraints.xml").contains(r#"rsc="named-clone""#));

    let (code, text) = cib.run("bogus", &[]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("unknown action"), "{text}");
}

/// A CIB with the device's promotable clone, for Pacemaker's tools in file
/// mode.
const CIB: &str = r#"<cib validate-with="pacemaker-3.0" epoch="1" num_updates="0" admin_epoch="0">
  <configuration>
    <crm_config>
      <cluster_property_set id="options">
        <nvpair id="options-stonith" name="stonith-enabled" value="false"/>
      </cluster_property_set>
    </crm_config>
    <nodes>
      <node id="1" uname="alpha"/>
      <node id="2" uname="beta"/>
    </nodes>
    <resources>
      <clone id="data10-clone">
        <meta_attributes id="data10-meta">
          <nvpair id="data10-promotable" name="promotable" value="true"/>
        </meta_attributes>
        <primitive id="data10" class="ocf" provider="gmd" type="gmd">
          <instance_attributes id="data10-ia">
            <nvpair id="data10-dev" name="device" value="data10gmd"/>
          </instance_attributes>
        </primitive>
      </clone>
    </resources>
    <constraints/>
  </configuration>
  <status/>
</cib>
"#;

#[test]
fn pacemakers_own_cibadmin_takes_the_constraint_and_crm_verify_accepts_it() {
    for tool in ["cibadmin", "crm_verify"] {
        assert!(
            Command::new("sh")
                .arg("-c")
                .arg(format!("command -v {tool}"))
                .output()
                .is_ok_and(|o| o.status.success()),
            "missing {tool}: apt-get install pacemaker-cli-utils (.ci/run installs pacemaker)"
        );
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let cib = dir.path().join("cib.xml");
    std::fs::write(&cib, CIB).expect("cib");
    let run = |action: &str| {
        let out = Command::new(handler())
            .arg(action)
            .env("CIB_file", &cib)
            .env("GMD_DEVICE", "data10gmd")
            .env("GMD_PEER", "beta")
            .output()
            .expect("run the handler");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code().unwrap_or(-1), text)
    };
    let constraints = || {
        let out = Command::new("cibadmin")
            .args(["-Q", "-o", "constraints"])
            .env("CIB_file", &cib)
            .output()
            .expect("cibadmin");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let (code, text) = run("fence");
    assert_eq!(code, 4, "{text}");
    let placed = constraints();
    assert!(
        placed.contains(r#"<rsc_location rsc="data10-clone" id="gmd-fence-data10gmd">"#)
            && placed.contains(r#"role="Promoted" score="-INFINITY""#),
        "{placed}"
    );
    let verify = Command::new("crm_verify")
        .arg("-x")
        .arg(&cib)
        .output()
        .expect("crm_verify");
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    // Placed already: modified in place, quietly.
    let (code, text) = run("fence");
    assert_eq!(code, 4, "{text}");
    assert!(!text.contains("failed_update"), "{text}");
    let (code, text) = run("unfence");
    assert_eq!(code, 0, "{text}");
    assert!(!constraints().contains("gmd-fence"), "{}", constraints());
}
