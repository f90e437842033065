//! Golden cases for `weir test DIR`: every `DIR/<case>/` with `config.toml`, `input.jsonl` and
//! `expected.jsonl` is replayed, and its events are compared with the expected ones line by line
//! (field order within a line does not matter; everything else does).

use super::{read_jsonl, replay, Emitted, ReplayOptions};
use anyhow::Context as _;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// How one case went.
#[derive(Debug)]
pub enum Outcome {
    /// Every event as expected.
    Pass { events: usize },
    /// A readable diff: `-` expected but missing, `+` produced but not expected.
    Fail { diff: String },
    /// `--update` wrote the events as the new expected.jsonl.
    Updated { events: usize },
    /// The case could not run (bad config, missing file, malformed line).
    Error(String),
}

/// One case and its outcome.
#[derive(Debug)]
pub struct CaseResult {
    pub name: String,
    pub outcome: Outcome,
}

impl CaseResult {
    pub fn passed(&self) -> bool {
        matches!(self.outcome, Outcome::Pass { .. } | Outcome::Updated { .. })
    }
}

impl std::fmt::Display for CaseResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.outcome {
            Outcome::Pass { events } => write!(f, "ok      {} ({events} events)", self.name),
            Outcome::Updated { events } => write!(
                f,
                "updated {} ({events} events written to expected.jsonl)",
                self.name
            ),
            Outcome::Fail { diff } => write!(
                f,
                "FAIL    {}: events differ (- expected, + actual)\n{diff}",
                self.name
            ),
            Outcome::Error(err) => write!(f, "ERROR   {}: {err}", self.name),
        }
    }
}

/// The case directories under `dir`: those holding an `input.jsonl`, by name. (A directory with
/// only a config is left alone: other tests keep their configs beside the cases.)
///
/// # Errors
/// `dir` cannot be read.
pub fn cases(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut cases: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .filter_map(|entry| Some(entry.ok()?.path()))
        .filter(|path| path.join("input.jsonl").is_file())
        .collect();
    cases.sort();
    Ok(cases)
}

/// Runs every case under `dir`. With `update`, writes each case's events as its expected.jsonl
/// instead of comparing (review the change with `git diff`).
///
/// # Errors
/// `dir` cannot be read. A case that cannot run is an [`Outcome::Error`], not an error here.
pub fn run_dir(dir: &Path, update: bool) -> anyhow::Result<Vec<CaseResult>> {
    Ok(cases(dir)?
        .iter()
        .map(|case| CaseResult {
            name: case.file_name().map_or_else(
                || case.display().to_string(),
                |n| n.to_string_lossy().into(),
            ),
            outcome: run_case(case, update)
                .unwrap_or_else(|err| Outcome::Error(format!("{err:#}"))),
        })
        .collect())
}

/// Runs one case directory.
///
/// # Errors
/// Its config is invalid, or a file is missing or malformed.
pub fn run_case(case: &Path, update: bool) -> anyhow::Result<Outcome> {
    let config = crate::config::load(&case.join("config.toml"), &Default::default())?;
    let records = read_jsonl(&case.join("input.jsonl"))?;
    let mut actual = Vec::new();
    replay(&config, records, ReplayOptions::default(), |event| {
        actual.push(event);
        Ok(())
    })?;
    let expected_path = case.join("expected.jsonl");
    if update {
        // The payloads as weir wrote them, so nothing is lost to a float parsed and rewritten.
        let lines: Vec<String> = actual
            .iter()
            .map(|event| serde_json::to_string(event).unwrap_or_default())
            .collect();
        let mut text = lines.join("\n");
        if !text.is_empty() {
            text.push('\n');
        }
        std::fs::write(&expected_path, text)
            .with_context(|| format!("cannot write {}", expected_path.display()))?;
        return Ok(Outcome::Updated {
            events: actual.len(),
        });
    }
    let actual: Vec<String> = actual.iter().map(canonical).collect();
    let expected = read_expected(&expected_path)?;
    if expected == actual {
        Ok(Outcome::Pass {
            events: actual.len(),
        })
    } else {
        Ok(Outcome::Fail {
            diff: diff(&expected, &actual),
        })
    }
}

/// An event as one line of JSON with sorted keys, so field order never counts as a difference.
pub fn canonical(event: &Emitted) -> String {
    // serde_json's map is sorted (no preserve_order feature), so parsing sorts the fields.
    serde_json::json!({"topic": event.topic, "payload": event.json()}).to_string()
}

/// The expected events, canonical; blank lines and `#` comments skipped.
fn read_expected(path: &Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "cannot read {}; write it with `weir test --update`, then review it",
            path.display()
        )
    })?;
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty() && !line.trim_start().starts_with('#'))
        .map(|(index, line)| {
            let event: Emitted = serde_json::from_str(line).with_context(|| {
                format!(
                    "{}:{}: expected {{\"topic\": \"...\", \"payload\": {{...}}}}",
                    path.display(),
                    index + 1
                )
            })?;
            Ok(canonical(&event))
        })
        .collect()
}

/// A line diff (longest common subsequence) with two lines of context around each change.
pub fn diff(expected: &[String], actual: &[String]) -> String {
    let (n, m) = (expected.len(), actual.len());
    // lcs[i][j]: length of the LCS of expected[i..] and actual[j..].
    let mut lcs = vec![vec![0u32; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i][j] = if expected[i] == actual[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let mut lines: Vec<(char, &str)> = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < n || j < m {
        if i < n && j < m && expected[i] == actual[j] {
            lines.push((' ', &expected[i]));
            i += 1;
            j += 1;
        } else if j < m && (i == n || lcs[i][j + 1] >= lcs[i + 1][j]) {
            lines.push(('+', &actual[j]));
            j += 1;
        } else {
            lines.push(('-', &expected[i]));
            i += 1;
        }
    }
    const CONTEXT: usize = 2;
    let near_change = |at: usize| {
        let from = at.saturating_sub(CONTEXT);
        let to = (at + CONTEXT + 1).min(lines.len());
        lines[from..to].iter().any(|(sign, _)| *sign != ' ')
    };
    let mut out = String::new();
    let mut skipped = false;
    for (at, (sign, line)) in lines.iter().enumerate() {
        if near_change(at) {
            let _ = writeln!(out, "  {sign} {line}");
            skipped = false;
        } else if !skipped {
            let _ = writeln!(out, "    ...");
            skipped = true;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> Vec<String> {
        text.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn the_diff_marks_missing_and_extra_lines_with_context() {
        let diff = diff(&lines("a b c d e f g h"), &lines("a b c x e f g h"));
        assert_eq!(
            diff,
            "    ...\n  \x20 b\n  \x20 c\n  + x\n  - d\n  \x20 e\n  \x20 f\n    ...\n"
        );
    }

    #[test]
    fn canonical_lines_ignore_field_order() {
        let a: Emitted =
            serde_json::from_str(r#"{"topic":"t","payload":{"b":1,"a":{"y":2,"x":1}}}"#)
                .expect("parses");
        let b: Emitted =
            serde_json::from_str(r#"{"payload":{"a":{"x":1,"y":2},"b":1},"topic":"t"}"#)
                .expect("parses");
        assert_eq!(canonical(&a), canonical(&b));
    }
}
