//! The worked examples in config/: each passes `weir check`, and each golden case under
//! tests/fixtures/ runs the same rules as the example it tests (the case keeps a copy, since a
//! case directory is self-contained; this keeps the copy honest). The cases themselves run in
//! tests/replay.rs (`weir test tests/fixtures`).

use std::process::Command;

const WEIR: &str = env!("CARGO_BIN_EXE_weir");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// (example config, its golden case)
const EXAMPLES: [(&str, &str); 4] = [
    ("config/cold-chain.toml", "tests/fixtures/cold-chain"),
    ("config/greenhouse.toml", "tests/fixtures/greenhouse"),
    ("config/machine.toml", "tests/fixtures/machine"),
    ("config/example.toml", "tests/fixtures/overheat"),
];

fn toml_of(path: &str) -> toml::Table {
    let text = std::fs::read_to_string(format!("{ROOT}/{path}"))
        .unwrap_or_else(|err| panic!("read {path}: {err}"));
    toml::from_str(&text).unwrap_or_else(|err| panic!("{path}: {err}"))
}

#[test]
fn every_worked_example_passes_weir_check() {
    for (config, _) in EXAMPLES {
        let output = Command::new(WEIR)
            .args(["check", "--config", config])
            .current_dir(ROOT)
            .output()
            .expect("run weir check");
        assert!(
            output.status.success(),
            "{config}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

#[test]
fn each_golden_case_runs_the_rules_of_its_example() {
    for (config, case) in EXAMPLES {
        assert_eq!(
            toml_of(config),
            toml_of(&format!("{case}/config.toml")),
            "{case}/config.toml differs from {config}: copy the example over it and run \
             `weir test --update tests/fixtures`, then review the expected events"
        );
        for file in ["input.jsonl", "expected.jsonl"] {
            assert!(
                std::path::Path::new(&format!("{ROOT}/{case}/{file}")).is_file(),
                "{case} has no {file}"
            );
        }
    }
}
