//! Percentile sketch for windows: a DDSketch (Masson et al., VLDB 2019) with logarithmic bins,
//! so a window's percentiles cost a few hundred bytes however many readings it holds.
//!
//! Error bound: for a quantile `q` over `n` values, the sketch answers a value within
//! [`RELATIVE_ACCURACY`] (1 %) of the exact value of rank `floor(q * (n - 1))` in sorted order,
//! as long as the window's nonzero magnitudes span less than a factor of e^40 (2048 bins).
//! Values within 1e-9 of zero are counted as exactly zero.

use serde::{Deserialize, Serialize};

/// Worst relative error of a returned percentile, against the exact value of the same rank.
pub const RELATIVE_ACCURACY: f64 = 0.01;
/// ln(gamma) with gamma = (1 + a) / (1 - a), a = [`RELATIVE_ACCURACY`].
const LN_GAMMA: f64 = 0.020_000_666_706_669_435;
/// Bins per sign; past it the bins of the smallest magnitudes are folded together.
const MAX_BINS: usize = 2048;
/// Magnitudes below this are counted as zero.
const MIN_MAGNITUDE: f64 = 1e-9;

/// Counts of values per logarithmic bin, for one sign.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Bins {
    /// Bin index of `counts[0]`.
    offset: i32,
    counts: Vec<u32>,
}

impl Bins {
    fn add(&mut self, index: i32, n: u32) {
        if self.counts.is_empty() {
            self.offset = index;
            self.counts.push(n);
            return;
        }
        let len = self.counts.len() as i32;
        let high = self.offset + len - 1;
        if index > high {
            self.counts.resize((index - self.offset + 1) as usize, 0);
            if self.counts.len() > MAX_BINS {
                let excess = self.counts.len() - MAX_BINS;
                let folded: u32 = self.counts.drain(..excess).sum();
                self.counts[0] += folded;
                self.offset += excess as i32;
            }
            self.counts[(index - self.offset) as usize] += n;
        } else if index < self.offset {
            // Fold magnitudes too small for the bin budget into the lowest bin kept.
            let index = index.max(high - MAX_BINS as i32 + 1);
            if index < self.offset {
                let grow = (self.offset - index) as usize;
                self.counts.splice(0..0, std::iter::repeat_n(0, grow));
                self.offset = index;
            }
            self.counts[(index - self.offset) as usize] += n;
        } else {
            self.counts[(index - self.offset) as usize] += n;
        }
    }

    fn merge(&mut self, other: &Bins) {
        for (i, &n) in other.counts.iter().enumerate() {
            if n > 0 {
                self.add(other.offset + i as i32, n);
            }
        }
    }
}

/// A mergeable quantile sketch with relative-error guarantees (see the module docs).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Sketch {
    positive: Bins,
    negative: Bins,
    zero: u64,
    count: u64,
}

fn bin_index(magnitude: f64) -> i32 {
    (magnitude.ln() / LN_GAMMA).ceil() as i32
}

/// The value that represents a bin: the point of least relative error inside it.
fn bin_value(index: i32) -> f64 {
    let gamma = LN_GAMMA.exp();
    (f64::from(index) * LN_GAMMA).exp() * 2.0 / (gamma + 1.0)
}

impl Sketch {
    pub fn add(&mut self, value: f64) {
        self.count += 1;
        if value > MIN_MAGNITUDE {
            self.positive.add(bin_index(value), 1);
        } else if value < -MIN_MAGNITUDE {
            self.negative.add(bin_index(-value), 1);
        } else {
            self.zero += 1;
        }
    }

    pub fn merge(&mut self, other: &Sketch) {
        self.positive.merge(&other.positive);
        self.negative.merge(&other.negative);
        self.zero += other.zero;
        self.count += other.count;
    }

    /// The value at rank `floor(q * (count - 1))`, within the documented error; NaN when empty.
    pub fn quantile(&self, q: f64) -> f64 {
        if self.count == 0 {
            return f64::NAN;
        }
        let rank = (q.clamp(0.0, 1.0) * (self.count - 1) as f64).floor() as u64;
        let mut seen = 0u64;
        // Negative values, from the largest magnitude (smallest value) up.
        for (i, &n) in self.negative.counts.iter().enumerate().rev() {
            seen += u64::from(n);
            if seen > rank {
                return -bin_value(self.negative.offset + i as i32);
            }
        }
        seen += self.zero;
        if seen > rank {
            return 0.0;
        }
        for (i, &n) in self.positive.counts.iter().enumerate() {
            seen += u64::from(n);
            if seen > rank {
                return bin_value(self.positive.offset + i as i32);
            }
        }
        // Unreachable while the counts add up; the largest bin is the safe answer.
        bin_value(self.positive.offset + self.positive.counts.len() as i32 - 1)
    }

    /// Heap bytes held by the bins.
    pub fn heap_bytes(&self) -> usize {
        (self.positive.counts.capacity() + self.negative.counts.capacity()) * 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The exact value of the rank the sketch promises to approximate.
    fn exact(sorted: &[f64], q: f64) -> f64 {
        sorted[(q * (sorted.len() - 1) as f64).floor() as usize]
    }

    /// A deterministic pseudo-random stream (xorshift), so failures reproduce.
    fn stream(seed: u64, n: usize, scale: f64, offset: f64) -> Vec<f64> {
        let mut x = seed.max(1);
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % 1_000_000) as f64 / 1_000_000.0 * scale + offset
            })
            .collect()
    }

    fn assert_within_bound(values: &[f64]) {
        let mut sketch = Sketch::default();
        for &v in values {
            sketch.add(v);
        }
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        for q in [0.0, 0.5, 0.9, 0.95, 0.99, 1.0] {
            let (got, want) = (sketch.quantile(q), exact(&sorted, q));
            assert!(
                (got - want).abs() <= RELATIVE_ACCURACY * want.abs() + 1e-9,
                "q={q}: sketch {got}, exact {want}"
            );
        }
    }

    #[test]
    fn percentiles_are_within_one_percent_of_the_exact_rank_value() {
        assert_within_bound(&stream(7, 10_000, 30.0, 10.0));
        assert_within_bound(&stream(11, 1_000, 1e6, 0.001));
    }

    #[test]
    fn negative_zero_and_positive_values_keep_their_order() {
        let mut values = stream(3, 2_000, 200.0, -100.0);
        values.extend([0.0; 50]);
        assert_within_bound(&values);
    }

    #[test]
    fn merged_sketches_answer_like_one_sketch_over_both() {
        let (a, b) = (stream(5, 500, 50.0, -5.0), stream(9, 700, 80.0, 1.0));
        let (mut left, mut right, mut whole) =
            (Sketch::default(), Sketch::default(), Sketch::default());
        a.iter().for_each(|&v| left.add(v));
        b.iter().for_each(|&v| right.add(v));
        a.iter().chain(&b).for_each(|&v| whole.add(v));
        left.merge(&right);
        for q in [0.5, 0.9, 0.99] {
            assert_eq!(left.quantile(q), whole.quantile(q));
        }
    }

    #[test]
    fn a_single_value_is_every_percentile() {
        let mut sketch = Sketch::default();
        sketch.add(42.0);
        for q in [0.0, 0.5, 0.99] {
            assert!((sketch.quantile(q) - 42.0).abs() <= 0.42);
        }
        assert!(Sketch::default().quantile(0.5).is_nan());
    }

    #[test]
    fn extreme_magnitudes_fold_into_a_bounded_number_of_bins() {
        let mut sketch = Sketch::default();
        for exp in -200..200 {
            sketch.add(10f64.powi(exp));
        }
        assert!(sketch.positive.counts.len() <= MAX_BINS);
        assert_eq!(sketch.count, 400);
        // The top of the distribution stays accurate.
        let top = sketch.quantile(1.0);
        assert!((top - 1e199).abs() <= RELATIVE_ACCURACY * 1e199);
    }
}
