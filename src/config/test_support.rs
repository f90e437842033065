//! Helpers the config tests share: edit an example config and expect exactly one problem.

use super::{parse, Located, Overrides, EXAMPLE};
use std::path::Path;

/// Parses the example with `from` replaced by `to`, expecting exactly one problem.
pub(super) fn problem_after(from: &str, to: &str) -> (Located, String) {
    assert!(EXAMPLE.contains(from), "the example has no `{from}`");
    let text = EXAMPLE.replacen(from, to, 1);
    let err = parse(&text, Path::new("example.toml"), &Overrides::default())
        .expect_err("the edited config should be rejected");
    let problems = err.problems();
    assert_eq!(problems.len(), 1, "{err}");
    (problems[0].clone(), text)
}

/// The 1-based line of the first occurrence of `needle` in `text`.
pub(super) fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|line| line.contains(needle))
        .map(|i| i + 1)
        .unwrap_or_else(|| panic!("no `{needle}`"))
}

/// The example with one rule of every detector kind, and every key.
pub(super) const DETECTORS: &str = include_str!("../../config/detectors.toml");

/// Parses the detectors example with `from` replaced by `to`, expecting exactly one problem.
pub(super) fn detectors_problem_after(from: &str, to: &str) -> (Located, String) {
    assert!(DETECTORS.contains(from), "the example has no `{from}`");
    let text = DETECTORS.replacen(from, to, 1);
    let err = parse(&text, Path::new("detectors.toml"), &Overrides::default())
        .expect_err("the edited config should be rejected");
    let problems = err.problems();
    assert_eq!(problems.len(), 1, "{err}");
    (problems[0].clone(), text)
}
