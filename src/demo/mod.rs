//! `weir demo`: the whole path on one machine with nothing installed — an embedded broker
//! ([`broker`]), simulated devices ([`simulator`]) and the pipeline running the given config —
//! with a live line of throughput until ctrl-c or `--duration`.

#[cfg(feature = "demo")]
pub mod broker;
#[cfg(not(feature = "demo"))]
pub mod broker {
    //! A build without the `demo` feature has no embedded broker (rumqttd): starting one, the
    //! first thing `weir demo` does, fails and names the feature. `weir simulate` needs none.

    /// Stands in for the embedded broker; never started.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct EmbeddedBroker {
        pub port: u16,
    }

    impl EmbeddedBroker {
        /// # Errors
        /// Always: this build has no broker to start.
        pub fn start() -> anyhow::Result<EmbeddedBroker> {
            anyhow::bail!(crate::config::features::DEMO
                .missing_or("run `weir simulate --broker URL` against a broker of your own"))
        }

        /// `mqtt://127.0.0.1:PORT`, as the real broker's.
        pub fn url(&self) -> String {
            format!("mqtt://127.0.0.1:{}", self.port)
        }
    }
}
pub mod simulator;

use crate::config::Overrides;
use crate::metrics::Metrics;
use broker::EmbeddedBroker;
use simulator::{SimulatorOptions, SimulatorStats};
use std::future::Future;
use std::io::{IsTerminal, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;
use tokio::time::Instant;

/// The simulated devices are spread over this many sites (`plant-1` ..= `plant-3`).
const DEMO_SITES: usize = 3;

/// After the simulator stops, how long to wait for the pipeline to take in what is in flight.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// What `weir demo` runs.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// The pipeline's config; its broker URL is replaced by the embedded broker's.
    /// The config to run; the built-in copy of `config/example.toml` when absent.
    pub config: Option<PathBuf>,
    pub devices: usize,
    /// Readings per second over all devices.
    pub rate: f64,
    /// Replaces the config's `http.listen`.
    pub metrics_addr: Option<SocketAddr>,
    /// Stop after this long; run until `shutdown` when `None`.
    pub duration: Option<Duration>,
}

/// Runs the demo until `options.duration` passes or `shutdown` resolves, then stops the
/// simulator and the pipeline and prints the average throughput.
///
/// # Errors
/// The config does not load (the error's message is meant for the user as it is), the broker
/// or the pipeline cannot start, or the simulator fails.
pub async fn run(
    options: DemoOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    // Polled once before anything is created: a signal future installs its handler when first
    // polled, and until then ctrl-c or SIGTERM would kill the process outright and leave the
    // state dir behind. Now a signal during start-up ends the demo at the loop below.
    let mut shutdown = std::pin::pin!(shutdown);
    let signalled =
        std::future::poll_fn(|cx| std::task::Poll::Ready(shutdown.as_mut().poll(cx).is_ready()))
            .await;
    // A finished future must not be polled again.
    let shutdown = async move {
        if !signalled {
            shutdown.await;
        }
    };

    let mut simulator_options = SimulatorOptions {
        broker_url: String::new(),
        devices: options.devices,
        rate: options.rate,
        duration: None,
        sites: DEMO_SITES,
        client_id: "weir-demo-simulator".to_owned(),
        qos: rumqttc::QoS::AtLeastOnce,
    };

    let broker = tokio::task::spawn_blocking(EmbeddedBroker::start).await??;
    simulator_options.broker_url = broker.url();
    simulator_options.validate()?;
    // The demo's state lives in a fresh temp dir, so a demo never resumes an earlier one. Declared
    // before the pipeline, so it is removed after the pipeline is dropped, on every way out.
    let state_dir =
        DemoStateDir(std::env::temp_dir().join(format!("weir-demo-{}", std::process::id())));
    let overrides = Overrides {
        broker_url: Some(broker.url()),
        metrics_addr: options.metrics_addr,
        state_dir: Some(state_dir.0.clone()),
        ..Overrides::default()
    };
    let config = match &options.config {
        Some(path) => crate::config::load(path, &overrides)?,
        None => crate::config::parse(
            crate::config::EXAMPLE,
            std::path::Path::new("config/example.toml (built in)"),
            &overrides,
        )?,
    };
    let running = crate::app::start(config).await?;
    let metrics = std::sync::Arc::clone(&running.metrics);

    print_banner(&options, broker, running.http_addr);

    let (stop_simulator, simulator_stopped) = tokio::sync::oneshot::channel::<()>();
    let mut simulator = tokio::spawn(simulator::run(simulator_options, async move {
        // Either a stop request or the sender dropped: stop in both cases.
        let _ = simulator_stopped.await;
    }));

    let started = Instant::now();
    let baseline = Totals::read(&metrics);
    let mut live = LiveLine::new(std::io::stdout().is_terminal(), started, baseline);
    let mut ticker =
        tokio::time::interval_at(started + Duration::from_secs(1), Duration::from_secs(1));
    let until_deadline = sleep_until(options.duration.map(|d| started + d));
    tokio::pin!(shutdown, until_deadline);

    let ended_early = loop {
        tokio::select! {
            () = &mut shutdown => break None,
            () = &mut until_deadline => break None,
            outcome = &mut simulator => break Some(outcome),
            _ = ticker.tick() => live.update(Totals::read(&metrics)),
        }
    };

    let simulator_outcome = match ended_early {
        Some(outcome) => outcome,
        None => {
            let _ = stop_simulator.send(());
            simulator.await
        }
    };
    let simulated_for = started.elapsed();
    live.finish();

    drain(&metrics).await;
    let totals = Totals::read(&metrics).since(baseline);
    running.stop().await?;

    let stats =
        simulator_outcome.map_err(|err| anyhow::anyhow!("the simulator task failed: {err}"))??;
    println!("{}", summary(stats, totals, simulated_for));
    Ok(())
}

/// The demo's state dir, removed with its contents when dropped: when `run` returns at the
/// deadline or after ctrl-c/SIGTERM (both resolve `shutdown`), on an error, and when a panic
/// unwinds through it. A demo leaves nothing behind in the temp dir.
struct DemoStateDir(PathBuf);

impl Drop for DemoStateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn print_banner(options: &DemoOptions, broker: EmbeddedBroker, http_addr: SocketAddr) {
    // A wildcard listen address is reachable on loopback; print one a browser can open.
    let shown = if http_addr.ip().is_unspecified() {
        SocketAddr::from((Ipv4Addr::LOCALHOST, http_addr.port()))
    } else {
        http_addr
    };
    println!(
        "weir demo: {} simulated devices over {DEMO_SITES} sites, {} readings/s, config {}",
        options.devices,
        grouped(options.rate.round() as u64),
        options
            .config
            .as_deref()
            .unwrap_or(std::path::Path::new("config/example.toml (built in)"))
            .display()
    );
    println!(
        "  broker   {} (embedded rumqttd, loopback only)",
        broker.url()
    );
    println!("  metrics  http://{shown}/metrics");
    println!(
        "  watch    mosquitto_sub -h 127.0.0.1 -p {} -t 'alerts/#' -t 'rollups/#' -v",
        broker.port
    );
    match options.duration {
        Some(duration) => println!(
            "  stops after {}; ctrl-c stops it sooner",
            humantime::format_duration(duration)
        ),
        None => println!("  ctrl-c stops it"),
    }
}

/// Waits until the pipeline's reading count stops moving (or [`DRAIN_TIMEOUT`]), so the summary
/// counts what the simulator sent just before it stopped.
async fn drain(metrics: &Metrics) {
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    let mut last = metrics.readings_total();
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = metrics.readings_total();
        if now == last {
            return;
        }
        last = now;
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// The pipeline's counters the live line shows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Totals {
    readings: u64,
    events: u64,
    decode_errors: u64,
}

impl Totals {
    fn read(metrics: &Metrics) -> Self {
        Self {
            readings: metrics.readings_total(),
            events: metrics.events_total(),
            decode_errors: metrics.decode_errors_total(),
        }
    }

    fn since(self, earlier: Totals) -> Self {
        Self {
            readings: self.readings.saturating_sub(earlier.readings),
            events: self.events.saturating_sub(earlier.events),
            decode_errors: self.decode_errors.saturating_sub(earlier.decode_errors),
        }
    }
}

/// The once-a-second status line: rewritten in place on a terminal, one line per second when
/// stdout is a file or pipe (so logs of a demo run stay readable).
struct LiveLine {
    terminal: bool,
    /// Whether a line without its newline is on the terminal.
    open: bool,
    baseline: Totals,
    last: Totals,
    last_at: Instant,
}

impl LiveLine {
    fn new(terminal: bool, started: Instant, baseline: Totals) -> Self {
        Self {
            terminal,
            open: false,
            baseline,
            last: baseline,
            last_at: started,
        }
    }

    fn update(&mut self, now: Totals) {
        let at = Instant::now();
        let line = live_line(
            now.since(self.last),
            at.duration_since(self.last_at),
            now.since(self.baseline),
        );
        self.last = now;
        self.last_at = at;
        let mut stdout = std::io::stdout().lock();
        // A closed stdout must not stop the demo; the summary's println! would report it.
        let _ = if self.terminal {
            self.open = true;
            write!(stdout, "\r{line}\x1b[K").and_then(|()| stdout.flush())
        } else {
            writeln!(stdout, "{line}")
        };
    }

    fn finish(&mut self) {
        if self.open {
            println!();
            self.open = false;
        }
    }
}

fn live_line(delta: Totals, elapsed: Duration, total: Totals) -> String {
    format!(
        "readings {}/s  events {}/s  decode errors {}  (total readings {}, events {})",
        grouped(per_second(delta.readings, elapsed)),
        grouped(per_second(delta.events, elapsed)),
        grouped(total.decode_errors),
        grouped(total.readings),
        grouped(total.events),
    )
}

fn summary(stats: SimulatorStats, totals: Totals, elapsed: Duration) -> String {
    format!(
        "demo ran {:.1} s: simulator published {} readings, weir received {} (average {} readings/s), published {} events, {} decode errors",
        elapsed.as_secs_f64(),
        grouped(stats.published),
        grouped(totals.readings),
        grouped(per_second(totals.readings, elapsed)),
        grouped(totals.events),
        grouped(totals.decode_errors),
    )
}

fn per_second(count: u64, elapsed: Duration) -> u64 {
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 {
        (count as f64 / secs).round() as u64
    } else {
        0
    }
}

/// `1234567` -> `1,234,567`.
fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_thousands_with_commas() {
        assert_eq!(grouped(0), "0");
        assert_eq!(grouped(999), "999");
        assert_eq!(grouped(1000), "1,000");
        assert_eq!(grouped(123_456), "123,456");
        assert_eq!(grouped(1_234_567), "1,234,567");
    }

    #[test]
    fn live_line_shows_rates_from_deltas_and_totals_since_start() {
        let delta = Totals {
            readings: 20_000,
            events: 57,
            decode_errors: 0,
        };
        let total = Totals {
            readings: 123_456,
            events: 789,
            decode_errors: 0,
        };
        assert_eq!(
            live_line(delta, Duration::from_secs(1), total),
            "readings 20,000/s  events 57/s  decode errors 0  (total readings 123,456, events 789)"
        );
        // A tick that came late does not inflate the rate.
        assert!(live_line(delta, Duration::from_secs(2), total).starts_with("readings 10,000/s"));
    }

    #[test]
    fn summary_averages_over_the_whole_run() {
        let stats = SimulatorStats { published: 200_100 };
        let totals = Totals {
            readings: 200_000,
            events: 1_234,
            decode_errors: 0,
        };
        let line = summary(stats, totals, Duration::from_secs(10));
        assert!(line.contains("average 20,000 readings/s"), "{line}");
        assert!(line.contains("published 200,100 readings"), "{line}");
    }

    #[test]
    fn totals_since_a_baseline_never_underflow() {
        let later = Totals {
            readings: 5,
            events: 1,
            decode_errors: 0,
        };
        let earlier = Totals {
            readings: 7,
            events: 0,
            decode_errors: 0,
        };
        assert_eq!(later.since(earlier).readings, 0);
        assert_eq!(later.since(earlier).events, 1);
    }
}
