//! Config errors that name the file, line and column of each problem.

use super::{Overrides, Problem};
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use toml::de::{DeTable, DeValue};

/// One problem with its place in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    /// 1-based line and column, when the problem has a place in the file.
    pub line_col: Option<(usize, usize)>,
    /// Dotted path of the offending key, e.g. `rules.overheat.hysteresis.exit_below`.
    pub path: String,
    /// What is wrong and how to fix it, as a sentence.
    pub message: String,
}

/// Why a config could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {source}", file.display())]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{}", render(file, problems))]
    Invalid {
        file: PathBuf,
        problems: Vec<Located>,
    },
}

fn render(file: &Path, problems: &[Located]) -> String {
    let mut out = format!(
        "{} has {} problem{}:",
        file.display(),
        problems.len(),
        if problems.len() == 1 { "" } else { "s" }
    );
    for problem in problems {
        out.push('\n');
        out.push_str(&problem.to_string_with(file));
    }
    out
}

impl Located {
    fn to_string_with(&self, file: &Path) -> String {
        let place = match self.line_col {
            Some((line, col)) => format!("{}:{line}:{col}", file.display()),
            None => file.display().to_string(),
        };
        if self.path.is_empty() {
            format!("  {place}: {}", self.message)
        } else {
            format!("  {place}: {}: {}", self.path, self.message)
        }
    }
}

impl fmt::Display for Located {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.to_string_with(Path::new("config")).trim_start())
    }
}

impl ConfigError {
    /// The problems found, empty for a read error.
    pub fn problems(&self) -> &[Located] {
        match self {
            ConfigError::Read { .. } => &[],
            ConfigError::Invalid { problems, .. } => problems,
        }
    }

    pub(super) fn from_toml(file: &Path, text: &str, err: &toml::de::Error) -> Self {
        // toml's message may span lines (it embeds its own snippet in Display, but `message()`
        // is the bare sentence); keep it on one line. Never use the Display: its snippet quotes
        // the offending line, which may be `password = ...`.
        let message = err.message().trim().replace('\n', " ");
        let message = hint_for_toml_message(&message);
        ConfigError::Invalid {
            file: file.to_owned(),
            problems: vec![Located {
                line_col: err.span().map(|span| line_col(text, span.start)),
                path: String::new(),
                message,
            }],
        }
    }

    pub(super) fn invalid(
        file: &Path,
        text: &str,
        overrides: &Overrides,
        problems: Vec<Problem>,
    ) -> Self {
        let tree = DeTable::parse(text).ok();
        let problems = problems
            .into_iter()
            .map(|problem| {
                let source = match problem.path.as_str() {
                    "broker.url" if overrides.broker_url.is_some() => {
                        Some("--broker / WEIR_BROKER")
                    }
                    "broker.password" if overrides.broker_password.is_some() => {
                        Some("WEIR_BROKER_PASSWORD")
                    }
                    _ => None,
                };
                let (line_col, message) = if let Some(source) = source {
                    (
                        None,
                        format!("{} (the value came from {source})", problem.message),
                    )
                } else {
                    let line_col = match problem.offset {
                        // Inside a string value: its opening quote, then the offset.
                        Some(offset) => tree
                            .as_ref()
                            .and_then(|tree| locate_value(tree.get_ref(), &problem.path))
                            .map(|span| {
                                let (line, col) = line_col(text, span.start);
                                let inner = text.get(span.start + 1..).unwrap_or("");
                                let chars = inner.get(..offset).map_or(0, |s| s.chars().count());
                                (line, col + 1 + chars)
                            }),
                        None => tree
                            .as_ref()
                            .and_then(|tree| locate(tree.get_ref(), &problem.path))
                            .map(|s| line_col(text, s.start)),
                    };
                    (line_col, problem.message)
                };
                Located {
                    line_col,
                    path: problem.path,
                    message,
                }
            })
            .collect();
        ConfigError::Invalid {
            file: file.to_owned(),
            problems,
        }
    }
}

/// Adds the fix to toml's terser messages where the fix is not obvious.
fn hint_for_toml_message(message: &str) -> String {
    if message.starts_with("unknown field") {
        format!("{message}; remove the key or correct its spelling")
    } else if message.starts_with("missing field") {
        format!("{message}; add it to this table")
    } else {
        message.to_owned()
    }
}

/// The span of the deepest key of `path` found in the document (the key itself when present,
/// otherwise the table that should hold it).
fn locate(table: &DeTable<'_>, path: &str) -> Option<Range<usize>> {
    let mut current = table;
    let mut best = None;
    for key in path.split('.') {
        // `levels[2]` names an element of an array (of inline tables).
        let (name, index) = match key.split_once('[') {
            Some((name, rest)) => (name, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (key, None),
        };
        let Some((found_key, value)) = current.get_key_value(name) else {
            return best;
        };
        best = Some(found_key.span());
        let mut value = value;
        if let Some(index) = index {
            match value.get_ref() {
                DeValue::Array(items) => match items.get(index) {
                    Some(item) => {
                        best = Some(item.span());
                        value = item;
                    }
                    None => return best,
                },
                _ => return best,
            }
        }
        match value.get_ref() {
            DeValue::Table(inner) => current = inner,
            _ => return best,
        }
    }
    best
}

/// The span of the value at `path` (a string's span starts at its opening quote).
fn locate_value(table: &DeTable<'_>, path: &str) -> Option<Range<usize>> {
    let (parent, key) = path.rsplit_once('.')?;
    let mut current = table;
    for part in parent.split('.') {
        match current.get(part)?.get_ref() {
            DeValue::Table(inner) => current = inner,
            _ => return None,
        }
    }
    Some(current.get(key)?.span())
}

/// 1-based line and column (in characters) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = before[line_start..].chars().count() + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_is_one_based() {
        assert_eq!(line_col("a\nbc = 1", 2), (2, 1));
        assert_eq!(line_col("a\nbc = 1", 5), (2, 4));
    }

    #[test]
    fn locates_nested_keys() {
        let text = "[rules.a]\nx = 1\n[rules.a.h]\ny = 2\n";
        let tree = DeTable::parse(text).unwrap();
        let span = locate(tree.get_ref(), "rules.a.h.y").unwrap();
        assert_eq!(line_col(text, span.start), (4, 1));
    }
}
