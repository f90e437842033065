//! Evaluating a window's `when` condition (parsed by `config::condition`) on the window's
//! accumulators, without allocating.

use super::aggregates::Accumulator;
use crate::config::condition::{Cmp, Condition, Expr, Operand};
use crate::config::Aggregate;

/// What a condition reads from a window.
pub struct WindowView<'a> {
    pub readings: u64,
    pub accumulators: &'a [Accumulator],
}

impl Condition {
    pub fn holds(&self, window: &WindowView<'_>) -> bool {
        eval(&self.expr, window)
    }
}

fn value(operand: Operand, window: &WindowView<'_>) -> f64 {
    match operand {
        Operand::Number(n) => n,
        Operand::Readings => window.readings as f64,
        Operand::Metric(aggregate, index) => {
            let acc = &window.accumulators[index];
            if acc.count() == 0 {
                return if aggregate == Aggregate::Count {
                    0.0
                } else {
                    f64::NAN
                };
            }
            acc.aggregate(aggregate)
        }
    }
}

fn eval(expr: &Expr, window: &WindowView<'_>) -> bool {
    match expr {
        Expr::Or(a, b) => eval(a, window) || eval(b, window),
        Expr::And(a, b) => eval(a, window) && eval(b, window),
        Expr::Not(a) => !eval(a, window),
        Expr::Compare(left, cmp, right) => {
            let (l, r) = (value(*left, window), value(*right, window));
            if l.is_nan() || r.is_nan() {
                return false;
            }
            match cmp {
                Cmp::Gt => l > r,
                Cmp::Ge => l >= r,
                Cmp::Lt => l < r,
                Cmp::Le => l <= r,
                Cmp::Eq => l == r,
                Cmp::Ne => l != r,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics() -> Vec<String> {
        vec!["temperature".into(), "humidity".into()]
    }

    fn window(temperatures: &[f64]) -> (u64, Vec<Accumulator>) {
        let mut accs = vec![Accumulator::new(true), Accumulator::new(true)];
        for (i, &t) in temperatures.iter().enumerate() {
            accs[0].add(i as i64, t);
        }
        (temperatures.len() as u64, accs)
    }

    fn holds(text: &str, temperatures: &[f64]) -> bool {
        let condition = Condition::parse(text, &metrics()).unwrap();
        let (readings, accumulators) = window(temperatures);
        condition.holds(&WindowView {
            readings,
            accumulators: &accumulators,
        })
    }

    #[test]
    fn the_issue_example_holds_only_when_both_sides_do() {
        let text = "avg(temperature) > 30 and count >= 5";
        assert!(holds(text, &[31.0, 32.0, 30.5, 31.0, 33.0]));
        assert!(!holds(text, &[31.0, 32.0, 30.5, 31.0]));
        assert!(!holds(text, &[20.0, 32.0, 30.5, 31.0, 33.0]));
    }

    #[test]
    fn and_binds_tighter_than_or_and_parentheses_override() {
        assert!(holds(
            "count > 100 and max(temperature) > 0 or min(temperature) < 5",
            &[1.0]
        ));
        assert!(!holds(
            "count > 100 and (max(temperature) > 0 or min(temperature) < 5)",
            &[1.0]
        ));
        assert!(holds("not count > 3", &[1.0]));
    }

    #[test]
    fn a_metric_missing_from_the_window_makes_comparisons_false() {
        assert!(!holds("avg(humidity) < 1000", &[1.0]));
        assert!(!holds("avg(humidity) >= 0", &[1.0]));
        assert!(holds("count(humidity) == 0", &[1.0]));
    }

    #[test]
    fn percentiles_and_rates_can_be_compared() {
        let c = Condition::parse(
            "p99(temperature) > 20 or rate(temperature) < -1",
            &metrics(),
        );
        assert!(c.unwrap().uses_percentiles);
        assert!(holds(
            "p50(temperature) >= 9.9 and p50(temperature) <= 10.1",
            &[10.0; 3]
        ));
    }

    #[test]
    fn errors_point_at_the_offending_offset() {
        let err = |text: &str| Condition::parse(text, &metrics()).unwrap_err();
        let e = err("avg(temprature) > 30");
        assert_eq!(e.offset, 4);
        assert!(
            e.message.contains("not one of this window's metrics"),
            "{}",
            e.message
        );
        assert_eq!(err("mean(temperature) > 30").offset, 0);
        assert_eq!(err("count >= 5 and").offset, 14);
        assert_eq!(err("count 5").offset, 6);
        assert_eq!(err("(count > 5").offset, 10);
        assert_eq!(err("count > 5 xor count < 2").offset, 10);
        assert_eq!(err("avg > 5").offset, 3);
    }
}
