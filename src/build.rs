//! Build info for `weir --version`: the git commit when built from a checkout, the target, the
//! profile, and the optional cargo features built in. Without git (a crate tarball), the commit
//! is "unknown".

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let output = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(output.stdout).ok()?;
    (output.status.success() && !text.trim().is_empty()).then(|| text.trim().to_owned())
}

fn main() {
    // The commit only: a "modified" flag would go stale, since build scripts do not rerun
    // when sources change.
    let commit = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".to_owned());
    let target = std::env::var("TARGET").unwrap_or_default();
    let profile = std::env::var("PROFILE").unwrap_or_default();
    // Which sinks and sections this binary can run, so an operator can tell a gateway build
    // from a full one (src/config/features.rs; the same order as its `ALL`).
    let features: Vec<&str> = [
        "http-sink",
        "amqp-sink",
        "postgres-sink",
        "cluster",
        "demo",
        "otlp",
    ]
    .into_iter()
    .filter(|name| {
        let var = format!("CARGO_FEATURE_{}", name.to_uppercase().replace('-', "_"));
        std::env::var_os(var).is_some()
    })
    .collect();
    let features = if features.is_empty() {
        "none".to_owned()
    } else {
        features.join(" ")
    };
    println!(
        "cargo:rustc-env=WEIR_BUILD_INFO=commit {commit}, {target}, {profile}; features: {features}"
    );
    // A new commit moves HEAD's reflog (also in a git worktree, where .git is a file).
    if let Some(path) = git(&["rev-parse", "--git-path", "logs/HEAD"]) {
        println!("cargo:rerun-if-changed={path}");
    }
    println!("cargo:rerun-if-changed=src/build.rs");
}
