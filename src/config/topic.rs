//! MQTT topic patterns with named segments (`sensors/{site}/{device}/telemetry`) and output
//! topic templates (`alerts/{site}/{device}/{rule}`) built from them.

use std::fmt;

/// One level of a topic pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Level {
    Literal(String),
    /// `{name}`: any single level, captured under `name`.
    Named(String),
    /// `+`: any single level, not captured.
    Any,
}

/// A topic pattern such as `sensors/{site}/{device}/telemetry`.
///
/// Matching is level by level; a pattern matches only topics with the same number of levels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicPattern {
    source: String,
    levels: Vec<Level>,
    /// Names of the `{named}` levels, in order of appearance.
    names: Vec<String>,
}

/// Why a pattern or template could not be parsed; the message says how to write it instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSyntaxError(pub String);

impl fmt::Display for TopicSyntaxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Parses `{name}` into `Some(name)`, a plain level into `None`.
fn braced_name(level: &str) -> Result<Option<&str>, TopicSyntaxError> {
    match (level.strip_prefix('{'), level.ends_with('}')) {
        (Some(rest), true) => {
            let name = &rest[..rest.len() - 1];
            let valid = !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            if valid {
                Ok(Some(name))
            } else {
                Err(TopicSyntaxError(format!(
                    "`{level}` is not a valid segment name; use letters, digits, `_` or `-` inside the braces"
                )))
            }
        }
        (None, false) if !level.contains(['{', '}']) => Ok(None),
        _ => Err(TopicSyntaxError(format!(
            "`{level}` mixes braces with text; a named segment must be a whole level, like `{{device}}`"
        ))),
    }
}

impl TopicPattern {
    /// Parses a pattern; `{name}` levels are captured, `+` matches any level.
    ///
    /// # Errors
    /// Empty patterns, `#`, duplicate names and braces that do not form a whole level.
    pub fn parse(pattern: &str) -> Result<Self, TopicSyntaxError> {
        if pattern.is_empty() {
            return Err(TopicSyntaxError(
                "the topic pattern is empty; write one such as `sensors/{site}/{device}/telemetry`"
                    .into(),
            ));
        }
        let mut levels = Vec::new();
        let mut names: Vec<String> = Vec::new();
        for level in pattern.split('/') {
            if level == "#" || level.contains('#') {
                return Err(TopicSyntaxError(
                    "`#` is not supported in input patterns; name each level, e.g. `sensors/{site}/{device}/telemetry`".into(),
                ));
            }
            if level == "+" {
                levels.push(Level::Any);
                continue;
            }
            if level.contains('+') {
                return Err(TopicSyntaxError(format!(
                    "`{level}`: `+` must be a whole level"
                )));
            }
            match braced_name(level)? {
                Some(name) => {
                    if names.iter().any(|n| n == name) {
                        return Err(TopicSyntaxError(format!(
                            "segment `{{{name}}}` appears twice; give each level its own name"
                        )));
                    }
                    names.push(name.to_owned());
                    levels.push(Level::Named(name.to_owned()));
                }
                None => levels.push(Level::Literal(level.to_owned())),
            }
        }
        Ok(Self {
            source: pattern.to_owned(),
            levels,
            names,
        })
    }

    /// The pattern as written in the config.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// The MQTT subscription filter: every named level becomes `+`.
    pub fn subscription_filter(&self) -> String {
        self.levels
            .iter()
            .map(|level| match level {
                Level::Literal(text) => text.as_str(),
                Level::Named(_) | Level::Any => "+",
            })
            .collect::<Vec<_>>()
            .join("/")
    }

    /// The topic with each named level filled from `segments` (in the order of
    /// [`names`](Self::names)); `+` levels stay `+`. Names the topic of a device known from the
    /// config before it ever published.
    pub fn fill<S: AsRef<str>>(&self, segments: &[S]) -> String {
        let mut named = 0;
        self.levels
            .iter()
            .map(|level| match level {
                Level::Literal(text) => text.as_str(),
                Level::Named(_) => {
                    named += 1;
                    segments.get(named - 1).map_or("+", |s| s.as_ref())
                }
                Level::Any => "+",
            })
            .collect::<Vec<_>>()
            .join("/")
    }

    /// Names of the captured segments, in order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Index of a named segment among [`names`](Self::names).
    pub fn name_index(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n == name)
    }

    /// Calls `capture(i, value)` for each named level of a matching topic, in order.
    ///
    /// Returns false (having possibly called `capture` for a prefix) when the topic does not
    /// match; callers discard the captures in that case. Allocates nothing.
    pub fn match_with<'t>(&self, topic: &'t str, mut capture: impl FnMut(usize, &'t str)) -> bool {
        let mut parts = topic.split('/');
        let mut named = 0;
        for level in &self.levels {
            let Some(part) = parts.next() else {
                return false;
            };
            match level {
                Level::Literal(text) => {
                    if text != part {
                        return false;
                    }
                }
                Level::Named(_) => {
                    capture(named, part);
                    named += 1;
                }
                Level::Any => {}
            }
        }
        parts.next().is_none()
    }

    /// The value of one named segment in a matching topic, without allocating.
    pub fn capture<'t>(&self, topic: &'t str, index: usize) -> Option<&'t str> {
        let mut found = None;
        let matched = self.match_with(topic, |i, value| {
            if i == index {
                found = Some(value);
            }
        });
        if matched {
            found
        } else {
            None
        }
    }

    /// All captured segment values of a matching topic, in the order of [`names`](Self::names).
    pub fn captures<'t>(&self, topic: &'t str) -> Option<Vec<&'t str>> {
        let mut values = Vec::with_capacity(self.names.len());
        self.match_with(topic, |_, value| values.push(value))
            .then_some(values)
    }
}

/// One piece of an output topic template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Literal(String),
    /// A captured segment of the input topic, by index in the pattern's names.
    Segment(usize),
    /// `{rule}`: the rule's name.
    Rule,
}

/// An output topic such as `alerts/{site}/{device}/{rule}`, resolved against an input pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicTemplate {
    pieces: Vec<Piece>,
}

impl TopicTemplate {
    /// Parses a template whose `{names}` must be segments of `pattern` or `rule`.
    ///
    /// # Errors
    /// Wildcards, empty templates, and names the pattern does not capture.
    pub fn parse(template: &str, pattern: &TopicPattern) -> Result<Self, TopicSyntaxError> {
        if template.is_empty() {
            return Err(TopicSyntaxError(
                "the output topic is empty; write one such as `alerts/{site}/{device}/{rule}`"
                    .into(),
            ));
        }
        if template.contains(['+', '#']) {
            return Err(TopicSyntaxError(
                "an output topic cannot contain the wildcards `+` or `#`".into(),
            ));
        }
        let mut pieces = Vec::new();
        for (i, level) in template.split('/').enumerate() {
            if i > 0 {
                pieces.push(Piece::Literal("/".into()));
            }
            match braced_name(level)? {
                Some("rule") => pieces.push(Piece::Rule),
                Some(name) => match pattern.name_index(name) {
                    Some(index) => pieces.push(Piece::Segment(index)),
                    None => {
                        let known = pattern
                            .names()
                            .iter()
                            .map(|n| format!("{{{n}}}"))
                            .chain(["{rule}".to_owned()])
                            .collect::<Vec<_>>()
                            .join(", ");
                        return Err(TopicSyntaxError(format!(
                            "`{{{name}}}` is not a segment of the input pattern `{}`; use one of {known}",
                            pattern.as_str()
                        )));
                    }
                },
                None => pieces.push(Piece::Literal(level.to_owned())),
            }
        }
        // Merge adjacent literals so rendering appends fewer pieces.
        let mut merged: Vec<Piece> = Vec::with_capacity(pieces.len());
        for piece in pieces {
            match (merged.last_mut(), piece) {
                (Some(Piece::Literal(prev)), Piece::Literal(next)) => prev.push_str(&next),
                (_, piece) => merged.push(piece),
            }
        }
        Ok(Self { pieces: merged })
    }

    /// Appends the rendered topic to `out`; `segments` are the input topic's captured values.
    pub fn render_into<S: AsRef<str>>(&self, segments: &[S], rule: &str, out: &mut String) {
        self.render_with(|i| segments.get(i).map(AsRef::as_ref), rule, out);
    }

    /// As [`render_into`](Self::render_into), with captured value `i` from `segment(i)` (an
    /// origin keeps its values as ranges of its topic, not as a slice).
    pub fn render_with<'s>(
        &self,
        segment: impl Fn(usize) -> Option<&'s str>,
        rule: &str,
        out: &mut String,
    ) {
        for piece in &self.pieces {
            match piece {
                Piece::Literal(text) => out.push_str(text),
                Piece::Segment(index) => out.push_str(segment(*index).unwrap_or("")),
                Piece::Rule => out.push_str(rule),
            }
        }
    }

    /// The rendered topic as a new string.
    pub fn render<S: AsRef<str>>(&self, segments: &[S], rule: &str) -> String {
        let mut out = String::new();
        self.render_into(segments, rule, &mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern() -> TopicPattern {
        TopicPattern::parse("sensors/{site}/{device}/telemetry").unwrap()
    }

    #[test]
    fn named_levels_become_plus_in_the_subscription() {
        assert_eq!(pattern().subscription_filter(), "sensors/+/+/telemetry");
    }

    #[test]
    fn captures_named_levels_in_order() {
        let p = pattern();
        assert_eq!(
            p.captures("sensors/plant-1/dev-7/telemetry"),
            Some(vec!["plant-1", "dev-7"])
        );
        assert_eq!(
            p.capture("sensors/plant-1/dev-7/telemetry", 1),
            Some("dev-7")
        );
    }

    #[test]
    fn rejects_topics_with_other_levels() {
        let p = pattern();
        assert_eq!(p.captures("sensors/plant-1/dev-7/status"), None);
        assert_eq!(p.captures("sensors/plant-1/dev-7/telemetry/x"), None);
        assert_eq!(p.captures("sensors/plant-1/dev-7"), None);
    }

    #[test]
    fn rejects_hash_and_duplicate_names() {
        assert!(TopicPattern::parse("sensors/#").is_err());
        assert!(TopicPattern::parse("a/{x}/{x}").is_err());
        assert!(TopicPattern::parse("a/dev{x}").is_err());
    }

    #[test]
    fn template_renders_segments_and_rule() {
        let t = TopicTemplate::parse("alerts/{site}/{device}/{rule}", &pattern()).unwrap();
        assert_eq!(t.render(&["s1", "d1"], "overheat"), "alerts/s1/d1/overheat");
    }

    #[test]
    fn template_naming_an_unknown_segment_lists_the_known_ones() {
        let err = TopicTemplate::parse("alerts/{zone}/{device}", &pattern()).unwrap_err();
        assert!(err.0.contains("{zone}"), "{err}");
        assert!(err.0.contains("{site}, {device}, {rule}"), "{err}");
    }
}
