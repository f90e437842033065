//! Window conditions (`when = "avg(temperature) > 30 and count >= 5"`), parsed once at config
//! load into a small tree (validation reports a bad one with its offset); the window operators
//! evaluate the tree (`operators::window`).
//!
//! Grammar (keywords lowercase, whitespace free):
//!
//! ```text
//! condition  = or
//! or         = and { "or" and }
//! and        = not { "and" not }
//! not        = "not" not | "(" condition ")" | comparison
//! comparison = operand ( ">" | ">=" | "<" | "<=" | "==" | "!=" ) operand
//! operand    = number | "count" | aggregate "(" metric ")"
//! aggregate  = count | sum | min | max | avg | stddev | first | last | delta | rate
//!            | p50 | p90 | p95 | p99
//! ```
//!
//! Bare `count` is the number of readings in the window; `count(m)` those carrying metric `m`.
//! A metric must be one of the window's `metrics`. A comparison with an undefined side (a metric
//! absent from the window, a rate over one timestamp) is false.

use super::Aggregate;

/// A parse error: a sentence and the byte offset in the condition text where it applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConditionError {
    pub offset: usize,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Operand {
    Number(f64),
    /// Readings in the window.
    Readings,
    /// An aggregate of the metric at this index of the window's metrics.
    Metric(Aggregate, usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmp {
    Gt,
    Ge,
    Lt,
    Le,
    Eq,
    Ne,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Or(Box<Expr>, Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Not(Box<Expr>),
    Compare(Operand, Cmp, Operand),
}

/// A parsed condition.
#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    pub expr: Expr,
    /// Whether evaluating needs the percentile sketch.
    pub uses_percentiles: bool,
}

impl Condition {
    /// Parses `text`, resolving metric names against `metrics`.
    ///
    /// # Errors
    /// The first problem, with its byte offset in `text`.
    pub fn parse(text: &str, metrics: &[String]) -> Result<Self, ConditionError> {
        let mut parser = Parser {
            text,
            pos: 0,
            metrics,
            uses_percentiles: false,
        };
        let expr = parser.or()?;
        parser.skip_space();
        if parser.pos < text.len() {
            return Err(parser.error("expected `and`, `or` or the end of the condition"));
        }
        Ok(Self {
            expr,
            uses_percentiles: parser.uses_percentiles,
        })
    }
}

struct Parser<'a> {
    text: &'a str,
    pos: usize,
    metrics: &'a [String],
    uses_percentiles: bool,
}

impl<'a> Parser<'a> {
    fn error(&self, message: impl Into<String>) -> ConditionError {
        ConditionError {
            offset: self.pos,
            message: message.into(),
        }
    }

    fn rest(&self) -> &'a str {
        &self.text[self.pos..]
    }

    fn skip_space(&mut self) {
        let trimmed = self.rest().trim_start();
        self.pos = self.text.len() - trimmed.len();
    }

    /// Consumes `keyword` when it is the next word (not a prefix of a longer word).
    fn keyword(&mut self, keyword: &str) -> bool {
        self.skip_space();
        let rest = self.rest();
        let ends_word = rest[keyword.len().min(rest.len())..]
            .chars()
            .next()
            .is_none_or(|c| !(c.is_alphanumeric() || c == '_'));
        if rest.starts_with(keyword) && ends_word {
            self.pos += keyword.len();
            true
        } else {
            false
        }
    }

    fn symbol(&mut self, symbol: &str) -> bool {
        self.skip_space();
        if self.rest().starts_with(symbol) {
            self.pos += symbol.len();
            true
        } else {
            false
        }
    }

    fn or(&mut self) -> Result<Expr, ConditionError> {
        let mut left = self.and()?;
        while self.keyword("or") {
            left = Expr::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Expr, ConditionError> {
        let mut left = self.not()?;
        while self.keyword("and") {
            left = Expr::And(Box::new(left), Box::new(self.not()?));
        }
        Ok(left)
    }

    fn not(&mut self) -> Result<Expr, ConditionError> {
        if self.keyword("not") {
            return Ok(Expr::Not(Box::new(self.not()?)));
        }
        if self.symbol("(") {
            let inner = self.or()?;
            if !self.symbol(")") {
                return Err(self.error("expected `)`"));
            }
            return Ok(inner);
        }
        let left = self.operand()?;
        self.skip_space();
        let cmp = [
            (">=", Cmp::Ge),
            ("<=", Cmp::Le),
            ("==", Cmp::Eq),
            ("!=", Cmp::Ne),
            (">", Cmp::Gt),
            ("<", Cmp::Lt),
        ]
        .into_iter()
        .find(|(symbol, _)| self.rest().starts_with(symbol));
        let Some((symbol, cmp)) = cmp else {
            return Err(self.error("expected a comparison: >, >=, <, <=, == or !="));
        };
        self.pos += symbol.len();
        let right = self.operand()?;
        Ok(Expr::Compare(left, cmp, right))
    }

    fn operand(&mut self) -> Result<Operand, ConditionError> {
        self.skip_space();
        let rest = self.rest();
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | '-' | '+' | 'e' | 'E')))
            .unwrap_or(rest.len());
        if rest.starts_with(|c: char| c.is_ascii_digit() || c == '-' || c == '.') {
            let number = &rest[..number_len];
            return match number.parse::<f64>() {
                Ok(n) if n.is_finite() => {
                    self.pos += number_len;
                    Ok(Operand::Number(n))
                }
                _ => Err(self.error(format!("`{number}` is not a number"))),
            };
        }
        let word_len = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        let word = &rest[..word_len];
        if word.is_empty() {
            return Err(self.error("expected a number, `count` or an aggregate like `avg(metric)`"));
        }
        let Some(aggregate) = Aggregate::ALL.into_iter().find(|a| a.name() == word) else {
            let names: Vec<&str> = Aggregate::ALL.iter().map(|a| a.name()).collect();
            return Err(self.error(format!(
                "`{word}` is not an aggregate; use one of {}",
                names.join(", ")
            )));
        };
        let start = self.pos;
        self.pos += word_len;
        if !self.symbol("(") {
            if aggregate == Aggregate::Count {
                return Ok(Operand::Readings);
            }
            self.pos = start + word_len;
            return Err(self.error(format!("expected `(` and a metric after `{word}`")));
        }
        self.skip_space();
        let metric_start = self.pos;
        let Some(close) = self.rest().find(')') else {
            return Err(self.error("expected a metric name and `)`"));
        };
        let metric = self.rest()[..close].trim();
        let Some(index) = self.metrics.iter().position(|m| m == metric) else {
            self.pos = metric_start;
            return Err(self.error(format!(
                "`{metric}` is not one of this window's metrics ({})",
                self.metrics.join(", ")
            )));
        };
        self.pos += close + 1;
        self.uses_percentiles |= aggregate.quantile().is_some();
        Ok(Operand::Metric(aggregate, index))
    }
}
