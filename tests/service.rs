//! The systemd unit in config/weir.service and `weir --version`: the unit passes
//! `systemd-analyze verify`, scores "OK" on its security check, keeps the state where the
//! example config puts it, and checks the config before starting.

mod common;

use std::path::Path;
use std::process::Command;

const WEIR: &str = env!("CARGO_BIN_EXE_weir");
const UNIT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/weir.service");

fn unit_text() -> String {
    std::fs::read_to_string(UNIT).expect("read config/weir.service")
}

/// The values of `key=` in the unit, in order.
fn values(unit: &str, key: &str) -> Vec<String> {
    unit.lines()
        .filter_map(|line| line.strip_prefix(&format!("{key}=")))
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_unit_is_hardened_restarts_on_failure_and_checks_the_config_first() {
    let unit = unit_text();
    for (key, value) in [
        ("User", "weir"),
        ("ProtectSystem", "strict"),
        ("StateDirectory", "weir"),
        ("Restart", "on-failure"),
        ("NoNewPrivileges", "yes"),
        ("CapabilityBoundingSet", ""),
        (
            "ExecStartPre",
            "/usr/local/bin/weir check --config /etc/weir/weir.toml",
        ),
        (
            "ExecStart",
            "/usr/local/bin/weir run --config /etc/weir/weir.toml",
        ),
    ] {
        assert_eq!(values(&unit, key), [value], "{key}");
    }
    // StateDirectory=weir is /var/lib/weir: where the example config keeps its state.
    let example =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/example.toml"))
            .expect("example config");
    assert!(example.contains("state_dir = \"/var/lib/weir\""));
    // weir stops within 10 s of SIGTERM; systemd must wait longer than that before SIGKILL.
    assert_eq!(values(&unit, "TimeoutStopSec"), ["20s"]);
}

#[test]
fn systemd_accepts_the_unit_and_rates_it_ok() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        panic!(
            "systemd-analyze is not installed: install the Debian package `systemd` \
             (`apt-get install systemd`; .ci/run installs everything the tests need)"
        );
    }
    // verify wants the binaries to exist: point the unit at the one just built.
    let dir = common::temp_dir("unit");
    let path = dir.join("weir.service");
    std::fs::write(&path, unit_text().replace("/usr/local/bin/weir", WEIR)).expect("write unit");
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("run systemd-analyze verify");
    let security = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&path)
        .output()
        .expect("run systemd-analyze security");
    let stderr = String::from_utf8_lossy(&verify.stderr);
    assert!(verify.status.success(), "{stderr}");
    assert!(
        !stderr.contains("Unknown key") && !stderr.contains("ignoring"),
        "{stderr}"
    );
    let report = String::from_utf8_lossy(&security.stdout);
    let level: f64 = report
        .lines()
        .find_map(|line| line.split("exposure level for weir.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{report}"));
    // systemd rates 0-10: under 2.5 is "OK", the best band it gives a networked service.
    assert!(level < 2.5, "exposure {level}:\n{report}");
}

#[test]
fn version_names_the_crate_version_and_the_build() {
    let output = Command::new(WEIR)
        .arg("--version")
        .output()
        .expect("run weir --version");
    assert!(output.status.success());
    let text = String::from_utf8_lossy(&output.stdout);
    let expected = format!("weir {} (commit ", env!("CARGO_PKG_VERSION"));
    assert!(text.starts_with(&expected), "{text}");
    let in_checkout = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.git")).exists();
    if in_checkout {
        assert!(!text.contains("commit unknown"), "{text}");
    }
    // The optional features this binary has, as the library's own cfg sees them.
    let built: Vec<&str> = weir::config::features::ALL
        .iter()
        .filter(|feature| feature.built)
        .map(|feature| feature.name)
        .collect();
    let listed = text
        .trim_end()
        .strip_suffix(')')
        .and_then(|rest| rest.split("; features: ").nth(1))
        .unwrap_or_else(|| panic!("no features in {text}"));
    let expected = if built.is_empty() {
        "none".to_owned()
    } else {
        built.join(" ")
    };
    assert_eq!(listed, expected, "{text}");
}
