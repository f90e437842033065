//! Latency distributions: recorded in hdrhistogram by the stage that publishes, merged at scrape
//! time into a Prometheus histogram (fixed buckets, 50 us to 60 s) plus a summary with exact
//! p50/p99/p999 over the last one to two minutes.
//!
//! Why not a plain Prometheus histogram: its buckets say only that p99 is "between 25 and 50 ms".
//! hdrhistogram keeps every value within 1 % at a fixed cost, so the summary's quantiles are
//! exact to that precision, and the buckets remain for `histogram_quantile` across instances.
//!
//! The hot path never contends: each recording stage owns a [`LatencyRecorder`] that buffers its
//! values and records them into the shared histogram in batches ([`LatencyRecorder::flush`]); a
//! scrape takes the shared lock once per series. A flush costs one lock and two histogram records
//! per value. (Merging a private histogram instead walked all of its ~3,300 counters twice and
//! cleared 26 KB on every flush; a sink that goes idle after every few events, as it does at
//! 20k readings/s, spent more CPU there than on everything else.)

use hdrhistogram::Histogram as Hdr;
use prometheus::core::{Collector, Desc};
use prometheus::proto::{Bucket, LabelPair, Metric, MetricFamily, MetricType, Quantile, Summary};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Histogram bucket bounds in seconds, from 50 us to 60 s, roughly x2-2.5 per step.
pub const BUCKETS: [f64; 17] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 5.0, 15.0, 60.0,
];

/// The quantiles exported in the summary.
pub const QUANTILES: [f64; 3] = [0.5, 0.99, 0.999];

/// Values are recorded in microseconds, from 1 us to one hour; longer ones count as one hour
/// (they still land in the `+Inf` bucket, and the sum stays exact).
const HIGHEST_US: u64 = 3_600_000_000;
/// Two significant digits: every value is kept within 1 %; 26 KB per histogram.
const SIGNIFICANT_DIGITS: u8 = 2;
/// The summary's quantiles cover the current and the previous window of this length.
const RECENT_WINDOW: Duration = Duration::from_secs(60);
/// A recorder merges at least this often (in values) even when its stage is never idle.
const FLUSH_EVERY: usize = 1024;

fn new_hdr() -> Hdr<u64> {
    Hdr::new_with_bounds(1, HIGHEST_US, SIGNIFICANT_DIGITS)
        .unwrap_or_else(|err| panic!("latency histogram bounds are constants: {err}"))
}

/// One label set's distribution, shared between its recorders and the scrape.
struct Series {
    /// Everything since start: cumulative, as Prometheus histograms must be.
    total: Hdr<u64>,
    sum_seconds: f64,
    /// `recent[0]` fills now; `recent[1]` is the window before. Quantiles read both.
    recent: [Hdr<u64>; 2],
    rotated: Instant,
}

impl Series {
    fn new() -> Self {
        Self {
            total: new_hdr(),
            sum_seconds: 0.0,
            recent: [new_hdr(), new_hdr()],
            rotated: Instant::now(),
        }
    }

    fn rotate(&mut self, now: Instant) {
        let age = now.saturating_duration_since(self.rotated);
        if age < RECENT_WINDOW {
            return;
        }
        if age >= RECENT_WINDOW * 2 {
            self.recent[1].reset();
        } else {
            self.recent.swap(0, 1);
        }
        self.recent[0].reset();
        self.rotated = now;
    }

    fn merge(&mut self, micros: &[u64], sum_seconds: f64) {
        self.rotate(Instant::now());
        for &value in micros {
            self.total.saturating_record(value);
            self.recent[0].saturating_record(value);
        }
        self.sum_seconds += sum_seconds;
    }
}

struct Family {
    label: Option<&'static str>,
    histogram_name: &'static str,
    summary_name: &'static str,
    histogram_help: &'static str,
    summary_help: &'static str,
    descs: Vec<Desc>,
    /// Label value ("" without a label) -> series.
    series: Mutex<BTreeMap<String, Arc<Mutex<Series>>>>,
}

/// A latency metric: a Prometheus histogram `<name>` and a summary `<summary_name>`, optionally
/// with one label. Cheap to clone; register it once with the registry.
#[derive(Clone)]
pub struct Latency(Arc<Family>);

impl Latency {
    /// # Panics
    /// On a malformed name or help (a programming error, caught by the unit tests).
    pub fn new(
        histogram: (&'static str, &'static str),
        summary: (&'static str, &'static str),
        label: Option<&'static str>,
    ) -> Self {
        let labels: Vec<String> = label.iter().map(|l| (*l).to_owned()).collect();
        let desc = |(name, help): (&str, &str)| {
            Desc::new(name.into(), help.into(), labels.clone(), Default::default())
                .unwrap_or_else(|err| panic!("metric {name} is malformed: {err}"))
        };
        Self(Arc::new(Family {
            label,
            histogram_name: histogram.0,
            summary_name: summary.0,
            histogram_help: histogram.1,
            summary_help: summary.1,
            descs: vec![desc(histogram), desc(summary)],
            series: Mutex::new(BTreeMap::new()),
        }))
    }

    fn series(&self, label_value: &str) -> Arc<Mutex<Series>> {
        self.0
            .series
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(label_value.to_owned())
            .or_insert_with(|| Arc::new(Mutex::new(Series::new())))
            .clone()
    }

    /// Creates the series for `label_value` (`""` without a label), so it is exported (at zero)
    /// before the first value.
    pub fn register(&self, label_value: &str) {
        self.series(label_value);
    }

    /// A recorder for one series, owned by one task.
    pub fn recorder(&self, label_value: &str) -> LatencyRecorder {
        LatencyRecorder {
            local: Vec::with_capacity(FLUSH_EVERY),
            sum_seconds: 0.0,
            shared: self.series(label_value),
        }
    }

    /// Values merged so far into the series of `label_value`.
    pub fn sample_count(&self, label_value: &str) -> u64 {
        self.series(label_value)
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .total
            .len()
    }

    /// A recent quantile in seconds (`None` before any value in the last minute or two).
    pub fn recent_quantile(&self, label_value: &str, quantile: f64) -> Option<f64> {
        let series = self.series(label_value);
        let mut series = series.lock().unwrap_or_else(PoisonError::into_inner);
        series.rotate(Instant::now());
        let mut merged = series.recent[0].clone();
        let _ = merged.add(&series.recent[1]);
        (!merged.is_empty()).then(|| merged.value_at_quantile(quantile) as f64 / 1e6)
    }
}

/// Buffers values (us); [`flush`](Self::flush) records them into the shared series.
pub struct LatencyRecorder {
    local: Vec<u64>,
    sum_seconds: f64,
    shared: Arc<Mutex<Series>>,
}

impl LatencyRecorder {
    /// Records one value; merges by itself every [`FLUSH_EVERY`] values.
    pub fn record(&mut self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.local.push(micros.max(1));
        self.sum_seconds += latency.as_secs_f64();
        if self.local.len() >= FLUSH_EVERY {
            self.flush();
        }
    }

    /// Merges what was recorded since the last flush into the shared series. Call it when the
    /// stage goes idle, so a scrape never misses more than the current batch.
    pub fn flush(&mut self) {
        if self.local.is_empty() {
            return;
        }
        self.shared
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .merge(&self.local, self.sum_seconds);
        self.local.clear();
        self.sum_seconds = 0.0;
    }
}

impl Drop for LatencyRecorder {
    fn drop(&mut self) {
        self.flush();
    }
}

fn label_pairs(label: Option<&'static str>, value: &str) -> Vec<LabelPair> {
    label
        .map(|name| {
            let mut pair = LabelPair::default();
            pair.set_name(name.to_owned());
            pair.set_value(value.to_owned());
            pair
        })
        .into_iter()
        .collect()
}

impl Collector for Latency {
    fn desc(&self) -> Vec<&Desc> {
        self.0.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let family = &self.0;
        let series: Vec<(String, Arc<Mutex<Series>>)> = family
            .series
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(value, series)| (value.clone(), series.clone()))
            .collect();
        let now = Instant::now();
        let mut histograms = Vec::with_capacity(series.len());
        let mut summaries = Vec::with_capacity(series.len());
        for (value, series) in series {
            let mut series = series.lock().unwrap_or_else(PoisonError::into_inner);
            series.rotate(now);
            let count = series.total.len();
            let sum = series.sum_seconds;

            // One pass over the recorded values. hdrhistogram keeps a range of equivalent values
            // per slot (1 % wide); a slot counts as at or below a bound when its lowest value is,
            // so a value exactly on a bound lands in that bucket, as `le` says.
            let mut counts = [0u64; BUCKETS.len()];
            for recorded in series.total.iter_recorded() {
                let lowest = series.total.lowest_equivalent(recorded.value_iterated_to());
                let seconds = lowest as f64 / 1e6;
                if let Some(index) = BUCKETS.iter().position(|bound| seconds <= *bound) {
                    counts[index] += recorded.count_at_value();
                }
            }
            let mut cumulative = 0;
            let buckets = BUCKETS
                .iter()
                .zip(counts)
                .map(|(bound, count)| {
                    cumulative += count;
                    let mut bucket = Bucket::default();
                    bucket.set_upper_bound(*bound);
                    bucket.set_cumulative_count(cumulative);
                    bucket
                })
                .collect();
            let mut histogram = prometheus::proto::Histogram::default();
            histogram.set_sample_count(count);
            histogram.set_sample_sum(sum);
            histogram.set_bucket(buckets);
            let mut metric = Metric::from_label(label_pairs(family.label, &value));
            metric.set_histogram(histogram);
            histograms.push(metric);

            let mut recent = series.recent[0].clone();
            let _ = recent.add(&series.recent[1]);
            let quantiles = QUANTILES
                .iter()
                .map(|q| {
                    let mut quantile = Quantile::default();
                    quantile.set_quantile(*q);
                    // NaN before any value, as the Prometheus clients do for empty summaries.
                    quantile.set_value(if recent.is_empty() {
                        f64::NAN
                    } else {
                        recent.value_at_quantile(*q) as f64 / 1e6
                    });
                    quantile
                })
                .collect();
            let mut summary = Summary::default();
            summary.set_sample_count(count);
            summary.set_sample_sum(sum);
            summary.set_quantile(quantiles);
            let mut metric = Metric::from_label(label_pairs(family.label, &value));
            metric.set_summary(summary);
            summaries.push(metric);
        }
        let mut histogram_family = MetricFamily::default();
        histogram_family.set_name(family.histogram_name.to_owned());
        histogram_family.set_help(family.histogram_help.to_owned());
        histogram_family.set_field_type(MetricType::HISTOGRAM);
        histogram_family.set_metric(histograms);
        let mut summary_family = MetricFamily::default();
        summary_family.set_name(family.summary_name.to_owned());
        summary_family.set_help(family.summary_help.to_owned());
        summary_family.set_field_type(MetricType::SUMMARY);
        summary_family.set_metric(summaries);
        vec![histogram_family, summary_family]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn latency() -> Latency {
        Latency::new(
            ("test_latency_seconds", "h"),
            ("test_latency_recent_seconds", "s"),
            Some("rule"),
        )
    }

    #[test]
    fn recorded_values_reach_the_scrape_only_after_a_flush() {
        let latency = latency();
        let mut recorder = latency.recorder("r1");
        recorder.record(Duration::from_millis(3));
        assert_eq!(latency.sample_count("r1"), 0);
        recorder.flush();
        assert_eq!(latency.sample_count("r1"), 1);
    }

    #[test]
    fn buckets_are_cumulative_and_quantiles_are_within_one_percent() {
        let latency = latency();
        let mut recorder = latency.recorder("r1");
        // 1..=1000 ms: p50 = 500 ms, p99 = 990 ms, p999 = 999 ms.
        for ms in 1..=1000 {
            recorder.record(Duration::from_millis(ms));
        }
        recorder.flush();
        let families = latency.collect();
        let histogram = families[0].get_metric()[0].get_histogram();
        assert_eq!(histogram.get_sample_count(), 1000);
        assert!((histogram.get_sample_sum() - 500.5).abs() < 1e-6);
        let le = |bound: f64| {
            histogram
                .get_bucket()
                .iter()
                .find(|b| b.upper_bound() == bound)
                .map(|b| b.cumulative_count())
                .unwrap_or_default()
        };
        assert_eq!(le(0.000_5), 0);
        assert!((9..=11).contains(&le(0.01)), "{}", le(0.01));
        assert!((495..=505).contains(&le(0.5)), "{}", le(0.5));
        assert_eq!(le(1.0), 1000);
        assert_eq!(le(60.0), 1000);

        let summary = families[1].get_metric()[0].get_summary();
        for (quantile, expected) in summary.get_quantile().iter().zip([0.5, 0.99, 0.999]) {
            let relative = (quantile.value() - expected).abs() / expected;
            assert!(relative < 0.01, "{} vs {expected}", quantile.value());
        }
        assert_eq!(families[1].get_metric()[0].get_label()[0].value(), "r1");
    }

    #[test]
    fn an_empty_series_exports_zero_counts_and_nan_quantiles() {
        let latency = latency();
        latency.register("r1");
        let families = latency.collect();
        assert_eq!(
            families[0].get_metric()[0]
                .get_histogram()
                .get_sample_count(),
            0
        );
        let summary = families[1].get_metric()[0].get_summary();
        assert!(summary.get_quantile().iter().all(|q| q.value().is_nan()));
    }
}
