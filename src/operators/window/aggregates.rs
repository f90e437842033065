//! Window aggregates: one running [`Accumulator`] per metric per window, shared by every window
//! kind. Adding a value is O(1); mean and variance use Welford's update (and Chan's formula to
//! merge sessions), so long windows of large, close values keep their precision. A rule that
//! reads only count, sum, min, max and avg keeps a [`Basic`] accumulator instead, half the size:
//! every device with an open window holds one per metric.

use super::sketch::Sketch;
use crate::config::Aggregate;
use crate::model::event::WindowMetric;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::borrow::Cow;
use std::sync::Arc;

/// Running aggregates of one metric over one window. Every field is finite (no infinities as
/// "empty" markers), so states serialize to JSON as well as CBOR.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Accumulator {
    count: u64,
    sum: f64,
    min: f64,
    max: f64,
    mean: f64,
    /// Sum of squared distances from the mean (Welford).
    m2: f64,
    first_ts: i64,
    first: f64,
    last_ts: i64,
    last: f64,
    /// Present only when the rule asks for a percentile.
    sketch: Option<Box<Sketch>>,
    /// Built from a [`Basic`] accumulator: only count, sum, min, max and avg are known, the
    /// other aggregates are undefined (NaN). Absent from snapshots when false, as before.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    partial: bool,
}

/// The running values of one metric over one window for a rule that reads only count, sum,
/// min, max and avg: 40 bytes, against 88 for an [`Accumulator`]. Updated with the same
/// operations in the same order, so the values are the same to the bit.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Basic {
    count: u64,
    sum: f64,
    min: f64,
    max: f64,
    mean: f64,
}

impl Basic {
    /// The aggregates a basic accumulator can tell.
    pub const TRACKS: [Aggregate; 5] = [
        Aggregate::Count,
        Aggregate::Sum,
        Aggregate::Min,
        Aggregate::Max,
        Aggregate::Avg,
    ];

    fn add(&mut self, value: f64) {
        if self.count == 0 {
            (self.min, self.max) = (value, value);
        } else {
            self.min = self.min.min(value);
            self.max = self.max.max(value);
        }
        self.count += 1;
        self.sum += value;
        let delta = value - self.mean;
        self.mean += delta / self.count as f64;
    }

    fn merge(&mut self, other: &Basic) {
        if other.count == 0 {
            return;
        }
        if self.count == 0 {
            *self = other.clone();
            return;
        }
        let (na, nb) = (self.count as f64, other.count as f64);
        let delta = other.mean - self.mean;
        let n = na + nb;
        self.mean += delta * nb / n;
        self.count += other.count;
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    /// The same values as a (partial) [`Accumulator`].
    fn to_full(&self) -> Accumulator {
        Accumulator {
            count: self.count,
            sum: self.sum,
            min: self.min,
            max: self.max,
            mean: self.mean,
            partial: true,
            ..Accumulator::default()
        }
    }
}

/// The accumulators of one window, one per rule metric in the rule's order.
#[derive(Debug, Clone, PartialEq)]
pub enum Accumulators {
    Basic(Box<[Basic]>),
    Full(Box<[Accumulator]>),
}

impl Accumulators {
    /// Accumulators for `metrics` metrics: [`Basic`] ones when `basic` (the rule reads only
    /// count, sum, min, max and avg), else full ones, with a sketch when `percentiles`.
    pub fn new(basic: bool, percentiles: bool, metrics: usize) -> Self {
        if basic {
            Self::Basic(vec![Basic::default(); metrics].into_boxed_slice())
        } else {
            Self::Full(vec![Accumulator::new(percentiles); metrics].into_boxed_slice())
        }
    }

    pub fn add(&mut self, metric: usize, ts: i64, value: f64) {
        match self {
            Self::Basic(basics) => basics[metric].add(value),
            Self::Full(accumulators) => accumulators[metric].add(ts, value),
        }
    }

    pub fn count(&self, metric: usize) -> u64 {
        match self {
            Self::Basic(basics) => basics[metric].count,
            Self::Full(accumulators) => accumulators[metric].count,
        }
    }

    pub fn finish(&self, metric: usize, name: &Arc<str>) -> WindowMetric {
        match self {
            Self::Basic(basics) => basics[metric].to_full().finish(name),
            Self::Full(accumulators) => accumulators[metric].finish(name),
        }
    }

    /// Full accumulators to read any aggregate from (a rule with a condition has them already).
    pub fn full(&self) -> Cow<'_, [Accumulator]> {
        match self {
            Self::Basic(basics) => Cow::Owned(basics.iter().map(Basic::to_full).collect()),
            Self::Full(accumulators) => Cow::Borrowed(accumulators),
        }
    }

    /// Folds `other` in metric by metric (sessions merging). A window restored from a snapshot
    /// has full accumulators; merged with basic ones, the result is full.
    pub fn merge(&mut self, other: &Accumulators) {
        if let (Self::Basic(mine), Self::Basic(theirs)) = (&mut *self, other) {
            for (mine, theirs) in mine.iter_mut().zip(theirs.iter()) {
                mine.merge(theirs);
            }
            return;
        }
        if let Self::Basic(basics) = self {
            *self = Self::Full(basics.iter().map(Basic::to_full).collect());
        }
        if let Self::Full(mine) = self {
            for (mine, theirs) in mine.iter_mut().zip(other.full().iter()) {
                mine.merge(theirs);
            }
        }
    }

    /// Heap bytes of these accumulators.
    pub fn bytes(&self) -> usize {
        match self {
            Self::Basic(basics) => std::mem::size_of_val::<[Basic]>(basics),
            Self::Full(accumulators) => accumulators.iter().map(Accumulator::bytes).sum(),
        }
    }
}

/// Snapshots hold full accumulators, as before basic ones existed (a basic one is written as a
/// partial full one); a restored window keeps full ones until it closes.
impl Serialize for Accumulators {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Basic(basics) => serializer.collect_seq(basics.iter().map(Basic::to_full)),
            Self::Full(accumulators) => accumulators.serialize(serializer),
        }
    }
}

impl<'de> Deserialize<'de> for Accumulators {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Box::<[Accumulator]>::deserialize(deserializer).map(Self::Full)
    }
}

impl Accumulator {
    pub fn new(percentiles: bool) -> Self {
        Self {
            sketch: percentiles.then(Box::default),
            ..Self::default()
        }
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// Adds a value with event time `ts`. Ties in time: `first` keeps the earlier arrival,
    /// `last` takes the later one.
    pub fn add(&mut self, ts: i64, value: f64) {
        if self.count == 0 {
            (self.min, self.max) = (value, value);
            (self.first_ts, self.first, self.last_ts, self.last) = (ts, value, ts, value);
        } else {
            self.min = self.min.min(value);
            self.max = self.max.max(value);
            if ts < self.first_ts {
                (self.first_ts, self.first) = (ts, value);
            }
            if ts >= self.last_ts {
                (self.last_ts, self.last) = (ts, value);
            }
        }
        self.count += 1;
        self.sum += value;
        let delta = value - self.mean;
        self.mean += delta / self.count as f64;
        self.m2 += delta * (value - self.mean);
        if let Some(sketch) = &mut self.sketch {
            sketch.add(value);
        }
    }

    /// Folds `other` in, as if its values had been added here (used when sessions merge).
    pub fn merge(&mut self, other: &Accumulator) {
        if other.count == 0 {
            return;
        }
        if self.count == 0 {
            let sketch = self.sketch.take();
            *self = other.clone();
            if sketch.is_none() {
                self.sketch = None;
            }
            return;
        }
        self.partial |= other.partial;
        let (na, nb) = (self.count as f64, other.count as f64);
        let delta = other.mean - self.mean;
        let n = na + nb;
        self.mean += delta * nb / n;
        self.m2 += other.m2 + delta * delta * na * nb / n;
        self.count += other.count;
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        if other.first_ts < self.first_ts {
            (self.first_ts, self.first) = (other.first_ts, other.first);
        }
        if other.last_ts >= self.last_ts {
            (self.last_ts, self.last) = (other.last_ts, other.last);
        }
        if let (Some(mine), Some(theirs)) = (&mut self.sketch, &other.sketch) {
            mine.merge(theirs);
        }
    }

    /// One aggregate, computed without allocating (for conditions). NaN when undefined.
    pub fn aggregate(&self, aggregate: Aggregate) -> f64 {
        if self.partial && !Basic::TRACKS.contains(&aggregate) {
            return f64::NAN;
        }
        match aggregate {
            Aggregate::Count => self.count as f64,
            Aggregate::Sum => self.sum,
            Aggregate::Min => self.min,
            Aggregate::Max => self.max,
            Aggregate::Avg => self.mean,
            Aggregate::Stddev => (self.m2 / self.count as f64).max(0.0).sqrt(),
            Aggregate::First => self.first,
            Aggregate::Last => self.last,
            Aggregate::Delta => self.last - self.first,
            Aggregate::Rate => {
                let span_s = (self.last_ts - self.first_ts) as f64 / 1000.0;
                if span_s > 0.0 {
                    (self.last - self.first) / span_s
                } else {
                    f64::NAN
                }
            }
            Aggregate::P50 | Aggregate::P90 | Aggregate::P95 | Aggregate::P99 => {
                let q = aggregate.quantile().unwrap_or(0.5);
                self.sketch.as_ref().map_or(f64::NAN, |s| s.quantile(q))
            }
        }
    }

    /// The finished aggregates, as the event carries them. Undefined values (the rate of a
    /// window whose readings share one timestamp, percentiles not asked for) are NaN, written
    /// as `null`.
    pub fn finish(&self, name: &Arc<str>) -> WindowMetric {
        WindowMetric {
            name: name.clone(),
            count: self.count,
            sum: self.sum,
            min: self.min,
            max: self.max,
            avg: self.mean,
            stddev: self.aggregate(Aggregate::Stddev),
            first: self.aggregate(Aggregate::First),
            last: self.aggregate(Aggregate::Last),
            rate: self.aggregate(Aggregate::Rate),
            percentiles: [
                self.aggregate(Aggregate::P50),
                self.aggregate(Aggregate::P90),
                self.aggregate(Aggregate::P95),
                self.aggregate(Aggregate::P99),
            ],
        }
    }

    /// Stack plus heap bytes of this accumulator.
    pub fn bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + self
                .sketch
                .as_ref()
                .map_or(0, |s| std::mem::size_of::<Sketch>() + s.heap_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finished(values: &[(i64, f64)], percentiles: bool) -> WindowMetric {
        let mut acc = Accumulator::new(percentiles);
        for &(ts, v) in values {
            acc.add(ts, v);
        }
        acc.finish(&Arc::from("m"))
    }

    #[test]
    fn count_sum_min_max_avg_are_exact() {
        let m = finished(&[(0, 2.0), (1, 4.0), (2, 9.0)], false);
        assert_eq!(m.aggregate(Aggregate::Count), 3.0);
        assert_eq!(m.aggregate(Aggregate::Sum), 15.0);
        assert_eq!(m.aggregate(Aggregate::Min), 2.0);
        assert_eq!(m.aggregate(Aggregate::Max), 9.0);
        assert_eq!(m.aggregate(Aggregate::Avg), 5.0);
    }

    #[test]
    fn stddev_is_the_population_standard_deviation() {
        // Values 2, 4, 4, 4, 5, 5, 7, 9: mean 5, population stddev exactly 2.
        let values: Vec<(i64, f64)> = [2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]
            .into_iter()
            .enumerate()
            .map(|(i, v)| (i as i64, v))
            .collect();
        assert_eq!(finished(&values, false).aggregate(Aggregate::Stddev), 2.0);
        assert_eq!(finished(&[(0, 3.0)], false).stddev, 0.0);
    }

    #[test]
    fn stddev_stays_precise_for_large_close_values() {
        // The naive sum-of-squares formula loses every digit here; Welford does not.
        let values: Vec<(i64, f64)> = (0..1000)
            .map(|i| (i, 1e9 + if i % 2 == 0 { 1.0 } else { -1.0 }))
            .collect();
        let stddev = finished(&values, false).stddev;
        assert!((stddev - 1.0).abs() < 1e-6, "{stddev}");
    }

    #[test]
    fn first_last_and_delta_follow_event_time_not_arrival() {
        let m = finished(
            &[(5_000, 10.0), (1_000, 4.0), (9_000, 12.0), (3_000, 7.0)],
            false,
        );
        assert_eq!((m.first, m.last), (4.0, 12.0));
        assert_eq!(m.aggregate(Aggregate::Delta), 8.0);
    }

    #[test]
    fn rate_is_delta_per_second_between_first_and_last_reading() {
        let m = finished(&[(0, 100.0), (4_000, 110.0), (2_000, 90.0)], false);
        assert_eq!(m.aggregate(Aggregate::Rate), 2.5);
        assert!(finished(&[(7, 1.0), (7, 2.0)], false).rate.is_nan());
    }

    #[test]
    fn percentiles_come_from_the_sketch_within_its_bound() {
        let values: Vec<(i64, f64)> = (1..=100).map(|i| (i, i as f64)).collect();
        let m = finished(&values, true);
        for (aggregate, exact) in [
            (Aggregate::P50, 50.0),
            (Aggregate::P90, 90.0),
            (Aggregate::P95, 95.0),
            (Aggregate::P99, 99.0),
        ] {
            let got = m.aggregate(aggregate);
            assert!((got - exact).abs() <= 0.01 * exact, "{aggregate:?}: {got}");
        }
        assert!(finished(&values, false).percentiles[0].is_nan());
    }

    #[test]
    fn merging_equals_adding_everything_to_one_accumulator() {
        let a = [(10, 1.5), (30, -2.0), (20, 8.0)];
        let b = [(5, 3.0), (40, 4.5)];
        let (mut left, mut right, mut whole) = (
            Accumulator::new(true),
            Accumulator::new(true),
            Accumulator::new(true),
        );
        a.iter().for_each(|&(t, v)| left.add(t, v));
        b.iter().for_each(|&(t, v)| right.add(t, v));
        a.iter().chain(&b).for_each(|&(t, v)| whole.add(t, v));
        left.merge(&right);
        let (merged, expected) = (left.finish(&"m".into()), whole.finish(&"m".into()));
        for aggregate in Aggregate::ALL {
            let (x, y) = (merged.aggregate(aggregate), expected.aggregate(aggregate));
            assert!((x - y).abs() < 1e-9, "{aggregate:?}: {x} vs {y}");
        }
    }

    #[test]
    fn basic_accumulators_agree_with_full_ones_to_the_bit() {
        let a = [(10, 1.5), (30, -2.0), (20, 8.25), (25, 1e9 + 1.0)];
        let b = [(5, 3.0), (40, 4.5), (41, -0.1)];
        let mut basic = Accumulators::new(true, false, 1);
        let mut full = Accumulators::new(false, false, 1);
        let (mut basic_b, mut full_b) = (basic.clone(), full.clone());
        for &(t, v) in &a {
            basic.add(0, t, v);
            full.add(0, t, v);
        }
        for &(t, v) in &b {
            basic_b.add(0, t, v);
            full_b.add(0, t, v);
        }
        basic.merge(&basic_b);
        full.merge(&full_b);
        assert!(matches!(basic, Accumulators::Basic(_)));
        let (basic, full) = (basic.finish(0, &"m".into()), full.finish(0, &"m".into()));
        for aggregate in Basic::TRACKS {
            assert_eq!(
                basic.aggregate(aggregate).to_bits(),
                full.aggregate(aggregate).to_bits(),
                "{aggregate:?}"
            );
        }
        for aggregate in [Aggregate::Stddev, Aggregate::First, Aggregate::Rate] {
            assert!(basic.aggregate(aggregate).is_nan(), "{aggregate:?}");
        }
    }

    #[test]
    fn a_basic_window_is_saved_as_a_partial_full_one() {
        use crate::operators::test_support::cbor;
        let mut basic = Accumulators::new(true, false, 2);
        basic.add(0, 1, 20.5);
        basic.add(1, 1, 40.0);
        let restored: Accumulators = ciborium::from_reader(&cbor(&basic)[..]).unwrap();
        assert!(matches!(restored, Accumulators::Full(_)));
        assert_eq!(restored.full(), basic.full());
        let metric = restored.finish(0, &"m".into());
        assert_eq!((metric.count, metric.avg), (1, 20.5));
        assert!(metric.stddev.is_nan() && metric.first.is_nan());
        // A full accumulator is written as before: no `partial` key.
        let mut full = Accumulator::new(false);
        full.add(1, 2.0);
        let value: ciborium::Value = ciborium::from_reader(&cbor(&full)[..]).unwrap();
        let keys: Vec<_> = value
            .as_map()
            .unwrap()
            .iter()
            .filter_map(|(k, _)| k.as_text())
            .collect();
        assert!(!keys.contains(&"partial"), "{keys:?}");
    }
}
