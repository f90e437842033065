//! The device simulator behind `weir demo` and `weir simulate`: a fleet of devices publishing
//! the reference scenario's JSON telemetry to `sensors/{site}/{device}/telemetry` at a set rate.
//!
//! Temperatures are mean-reverting random walks (Ornstein-Uhlenbeck around 27 °C) that cross the
//! `overheat` thresholds (above 30, back below 28) every few tens of seconds per device, so
//! alerts flow continuously; humidity wanders slowly around 45 %; batteries drain.

use crate::config::endpoint::BrokerEndpoint;
use crate::config::BrokerConfig;
use crate::mqtt::Backoff;
use rumqttc::{AsyncClient, Event, EventLoop, Outgoing, Packet, QoS};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::{Instant, MissedTickBehavior};

/// How often the publisher wakes up; each wake-up publishes every reading that has come due.
const TICK: Duration = Duration::from_millis(10);

/// Readings owed beyond this much time's worth are skipped rather than published in a burst
/// (after a stall, or while the broker is unreachable).
const MAX_BACKLOG: Duration = Duration::from_millis(500);

/// Requests rumqttc buffers between the publisher and the event loop.
const REQUEST_CAPACITY: usize = 1000;

const MAX_PACKET_BYTES: usize = 256 * 1024;
const KEEP_ALIVE: Duration = Duration::from_secs(30);

/// How long a clean disconnect may take before the event loop is abandoned.
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// What to simulate and where to publish it.
#[derive(Debug, Clone)]
pub struct SimulatorOptions {
    /// `mqtt://host:port` or `mqtts://host:port`.
    pub broker_url: String,
    /// Number of devices, named `dev-0001`, `dev-0002`, ...
    pub devices: usize,
    /// Readings per second over all devices.
    pub rate: f64,
    /// Stop after this long; run until `shutdown` when `None`.
    pub duration: Option<Duration>,
    /// Devices are spread round-robin over sites `plant-1` ..= `plant-N`.
    pub sites: usize,
    pub client_id: String,
    /// Publish QoS: 0 (default), or 1 to exercise at_least_once intake end to end.
    pub qos: QoS,
}

/// What a simulator run did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SimulatorStats {
    /// Readings written to the broker connection (QoS 0: sent, not acknowledged). Readings
    /// still queued in the client when the broker was unreachable at the end are not counted.
    pub published: u64,
}

/// Publishes telemetry until `options.duration` has passed or `shutdown` resolves, then
/// disconnects cleanly.
///
/// The broker being away is not an error: the simulator keeps its pace, skips what it cannot
/// send, and reconnects with backoff.
///
/// # Errors
/// Invalid options (zero devices or sites, a rate that is not a positive number, a bad URL).
pub async fn run(
    options: SimulatorOptions,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<SimulatorStats> {
    options.validate()?;
    let mut mqtt_options = crate::mqtt::options(&broker_config(&options), "")?;
    // QoS 1 publishes wait for PUBACKs; a deep inflight window keeps the pipe full.
    mqtt_options.set_inflight(1000);
    let (client, eventloop) = AsyncClient::new(mqtt_options, REQUEST_CAPACITY);
    let link = Arc::new(Link::default());
    let poller = tokio::spawn(poll(eventloop, Arc::clone(&link)));

    let mut fleet = Fleet::new(options.devices, options.sites, options.rate, seed());
    let mut pacer = Pacer::new(options.rate, MAX_BACKLOG);
    let mut ticker = tokio::time::interval(TICK);
    // The pacer works from elapsed time, so late ticks need no catching up.
    ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let start = Instant::now();
    let until_deadline = sleep_until(options.duration.map(|d| start + d));
    tokio::pin!(shutdown, until_deadline);
    tracing::info!(
        broker = %options.broker_url,
        devices = options.devices,
        rate = options.rate,
        sites = options.sites,
        "simulator publishing"
    );

    let mut queued = 0u64;
    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            () = &mut until_deadline => break,
            _ = ticker.tick() => {}
        }
        let due = pacer.due(start.elapsed());
        for _ in 0..due {
            let (topic, payload) = fleet.peek(epoch_ms());
            // try_publish never waits: a full request queue (broker slow or away) ends this
            // tick's batch, and the owed readings carry over (up to MAX_BACKLOG).
            if client
                .try_publish(topic, options.qos, false, payload)
                .is_err()
            {
                break;
            }
            fleet.advance();
            pacer.record(1);
            queued += 1;
        }
    }

    // The disconnect queues behind the readings already handed over, so they go out first.
    // With no connection (the poller is in its backoff sleep) there is nothing to flush.
    let abort = poller.abort_handle();
    if link.connected.load(Ordering::Relaxed) {
        let disconnect = async { client.disconnect().await.is_ok() && poller.await.is_ok() };
        if !matches!(
            tokio::time::timeout(DISCONNECT_TIMEOUT, disconnect).await,
            Ok(true)
        ) {
            tracing::warn!("simulator's disconnect did not complete; closing the connection");
        }
    }
    abort.abort();
    let published = link.sent.load(Ordering::Relaxed);
    tracing::info!(
        published,
        unsent = queued.saturating_sub(published),
        skipped = pacer.skipped,
        seconds = start.elapsed().as_secs_f64(),
        "simulator stopped"
    );
    Ok(SimulatorStats { published })
}

/// What the poller tells the publisher.
#[derive(Debug, Default)]
struct Link {
    connected: AtomicBool,
    /// Publishes written to the connection.
    sent: AtomicU64,
}

impl SimulatorOptions {
    /// Checks the options without connecting, so a caller can fail before starting anything.
    ///
    /// # Errors
    /// A sentence naming the bad option.
    pub fn validate(&self) -> anyhow::Result<()> {
        BrokerEndpoint::parse(&self.broker_url).map_err(anyhow::Error::msg)?;
        if self.devices == 0 {
            anyhow::bail!("the simulator needs at least one device (--devices)");
        }
        if self.sites == 0 {
            anyhow::bail!("the simulator needs at least one site");
        }
        if !(self.rate.is_finite() && self.rate > 0.0) {
            anyhow::bail!(
                "--rate must be a positive number of readings per second, not {}",
                self.rate
            );
        }
        if self.client_id.is_empty() {
            anyhow::bail!("the simulator needs a non-empty MQTT client id");
        }
        Ok(())
    }
}

/// The simulator's connection settings, in the form the pipeline's connections use, so that
/// `mqtts://` (TLS with the system's roots) works for `weir simulate` too.
fn broker_config(options: &SimulatorOptions) -> BrokerConfig {
    BrokerConfig {
        client_id: options.client_id.clone(),
        keep_alive: KEEP_ALIVE,
        max_packet_bytes: MAX_PACKET_BYTES,
        ..BrokerConfig::new(options.broker_url.clone())
    }
}

/// Drives the connection: polled continuously and doing nothing else, so keep-alives and
/// writes never wait on the publisher. rumqttc reconnects on the next poll after an error,
/// so errors are followed by a backoff sleep (100 ms doubling to 5 s) instead.
async fn poll(mut eventloop: EventLoop, link: Arc<Link>) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        match eventloop.poll().await {
            Ok(Event::Outgoing(Outgoing::Publish(_))) => {
                link.sent.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff.reset();
                link.connected.store(true, Ordering::Relaxed);
                tracing::info!("simulator connected to the broker");
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
            Ok(_) => {}
            Err(rumqttc::ConnectionError::RequestsDone) => return,
            Err(err) => {
                let was_connected = link.connected.swap(false, Ordering::Relaxed);
                let delay = backoff.next_delay();
                let retry_in_ms = delay.as_millis() as u64;
                if was_connected {
                    tracing::warn!(error = %err, retry_in_ms, "simulator lost its broker connection; reconnecting");
                } else {
                    tracing::warn!(error = %err, retry_in_ms, "simulator cannot reach the broker; retrying");
                }
                tokio::time::sleep(delay).await;
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

fn epoch_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn seed() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0x2545_f491_4f6c_dd1d, |d| d.as_nanos() as u64)
}

/// Turns elapsed time into a count of readings due.
///
/// Working from elapsed time rather than "rate / 100 per tick" carries fractional readings
/// over automatically and keeps the long-run rate exact however late the timer fires.
#[derive(Debug)]
struct Pacer {
    rate: f64,
    /// Readings published or skipped so far.
    accounted: u64,
    max_backlog: u64,
    /// Readings that came due but were given up because they were owed too long.
    skipped: u64,
}

impl Pacer {
    fn new(rate: f64, max_backlog: Duration) -> Self {
        Self {
            rate,
            accounted: 0,
            max_backlog: ((rate * max_backlog.as_secs_f64()) as u64).max(1),
            skipped: 0,
        }
    }

    /// Readings to publish now, `elapsed` after the start.
    fn due(&mut self, elapsed: Duration) -> u64 {
        // The epsilon keeps 250/s * 0.02 s from flooring to 4.
        let target = (self.rate * elapsed.as_secs_f64() + 1e-6) as u64;
        let owed = target.saturating_sub(self.accounted);
        if owed > self.max_backlog {
            self.skipped += owed - self.max_backlog;
            self.accounted = target - self.max_backlog;
        }
        target.saturating_sub(self.accounted)
    }

    fn record(&mut self, published: u64) {
        self.accounted += published;
    }
}

/// xorshift64: the walks need speed and independence from the `rand` crate, not quality.
#[derive(Debug, Clone)]
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> Self {
        // Zero is xorshift's one fixed point.
        Self(if seed == 0 {
            0x2545_f491_4f6c_dd1d
        } else {
            seed
        })
    }

    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Approximately standard normal: the sum of four uniforms, centred and scaled to unit
    /// variance. Bounded at ±3.46, which keeps the walks from ever jumping far.
    fn normal(&mut self) -> f64 {
        let sum = self.unit() + self.unit() + self.unit() + self.unit();
        (sum - 2.0) * 3f64.sqrt()
    }
}

/// A mean-reverting random walk (Ornstein-Uhlenbeck), stepped exactly for any time step, so
/// its behaviour in seconds does not depend on how often a device publishes.
#[derive(Debug, Clone, Copy)]
struct Walk {
    mean: f64,
    /// Spread of the long-run distribution.
    std_dev: f64,
    /// Per second; 1 / reversion is the walk's memory.
    reversion: f64,
    min: f64,
    max: f64,
}

/// Long-run N(27, 2.5): above 30 about 11 % of the time, and a 5 s memory, so a device goes hot
/// and back to normal roughly every 20 s.
const TEMPERATURE: Walk = Walk {
    mean: 27.0,
    std_dev: 2.5,
    reversion: 0.2,
    min: 10.0,
    max: 45.0,
};

const HUMIDITY: Walk = Walk {
    mean: 45.0,
    std_dev: 5.0,
    reversion: 0.01,
    min: 5.0,
    max: 95.0,
};

/// Volts lost per second; a fresh battery lasts about half an hour of demo.
const BATTERY_DRAIN_PER_SEC: f64 = 0.0005;
const BATTERY_FULL: f64 = 4.2;
const BATTERY_EMPTY: f64 = 3.3;

impl Walk {
    fn start(&self, rng: &mut XorShift) -> f64 {
        (self.mean + self.std_dev * rng.normal()).clamp(self.min, self.max)
    }

    fn step(&self, value: f64, dt_secs: f64, rng: &mut XorShift) -> f64 {
        let decay = (-self.reversion * dt_secs).exp();
        let noise = self.std_dev * (1.0 - decay * decay).sqrt();
        (self.mean + (value - self.mean) * decay + noise * rng.normal()).clamp(self.min, self.max)
    }
}

#[derive(Debug, Clone)]
struct Device {
    topic: String,
    seq: u64,
    temperature: f64,
    humidity: f64,
    battery: f64,
}

/// Every simulated device, published in turn: with N devices at rate R, each device publishes
/// every N / R seconds, which is also the time step of its walks.
#[derive(Debug)]
struct Fleet {
    devices: Vec<Device>,
    next: usize,
    dt_secs: f64,
    rng: XorShift,
}

impl Fleet {
    fn new(devices: usize, sites: usize, rate: f64, seed: u64) -> Self {
        let mut rng = XorShift::new(seed);
        let devices = (0..devices)
            .map(|i| Device {
                topic: format!("sensors/plant-{}/dev-{:04}/telemetry", i % sites + 1, i + 1),
                seq: 0,
                temperature: TEMPERATURE.start(&mut rng),
                humidity: HUMIDITY.start(&mut rng),
                battery: BATTERY_EMPTY + (BATTERY_FULL - BATTERY_EMPTY) * rng.unit(),
            })
            .collect::<Vec<_>>();
        let dt_secs = devices.len() as f64 / rate;
        Self {
            devices,
            next: 0,
            dt_secs,
            rng,
        }
    }

    /// The next device's topic and current reading, without moving on: a reading the client
    /// could not take is offered again later rather than leaving a gap in `seq`.
    fn peek(&self, ts_ms: u64) -> (String, String) {
        let device = &self.devices[self.next];
        let payload = format!(
            r#"{{"ts": {ts_ms}, "seq": {}, "temperature": {:.1}, "humidity": {:.1}, "battery": {:.2}}}"#,
            device.seq, device.temperature, device.humidity, device.battery
        );
        (device.topic.clone(), payload)
    }

    /// Steps the device just published and moves to the next.
    fn advance(&mut self) {
        let dt = self.dt_secs;
        let rng = &mut self.rng;
        let device = &mut self.devices[self.next];
        device.seq += 1;
        device.temperature = TEMPERATURE.step(device.temperature, dt, rng);
        device.humidity = HUMIDITY.step(device.humidity, dt, rng);
        device.battery -= BATTERY_DRAIN_PER_SEC * dt;
        if device.battery < BATTERY_EMPTY {
            // Someone swapped the battery.
            device.battery = BATTERY_FULL;
        }
        self.next = (self.next + 1) % self.devices.len();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temperature_walk_stays_bounded_and_keeps_crossing_both_thresholds() {
        let mut rng = XorShift::new(42);
        let dt = 0.1;
        let mut temperature = TEMPERATURE.start(&mut rng);
        let mut hot = temperature > 30.0;
        let mut transitions = 0;
        let mut longest_without_transition = 0.0f64;
        let mut since_transition = 0.0;
        // One simulated hour at ten readings a second.
        for _ in 0..36_000 {
            temperature = TEMPERATURE.step(temperature, dt, &mut rng);
            assert!((10.0..=45.0).contains(&temperature), "{temperature}");
            since_transition += dt;
            if (!hot && temperature > 30.0) || (hot && temperature < 28.0) {
                hot = !hot;
                transitions += 1;
                longest_without_transition = longest_without_transition.max(since_transition);
                since_transition = 0.0;
            }
        }
        // About 6 transitions a minute; demand well over one a minute.
        assert!(
            transitions > 120,
            "only {transitions} transitions in an hour"
        );
        assert!(
            longest_without_transition < 600.0,
            "a device stayed in one state for {longest_without_transition} s"
        );
    }

    #[test]
    fn walks_behave_the_same_in_seconds_whatever_the_publish_rate() {
        // The long-run mean after many steps is near the walk's mean at any step size.
        for dt in [0.001, 0.1, 10.0] {
            let mut rng = XorShift::new(7);
            let mut value = TEMPERATURE.mean;
            let mut sum = 0.0;
            let steps = 200_000;
            for _ in 0..steps {
                value = TEMPERATURE.step(value, dt, &mut rng);
                sum += value;
            }
            let mean = sum / steps as f64;
            let tolerance = if dt < 0.01 { 2.0 } else { 0.3 };
            assert!((mean - 27.0).abs() < tolerance, "dt {dt}: mean {mean}");
        }
    }

    #[test]
    fn normal_noise_has_zero_mean_and_unit_variance() {
        let mut rng = XorShift::new(1);
        let n = 100_000;
        let samples: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
        let mean = samples.iter().sum::<f64>() / n as f64;
        let variance = samples.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.02, "{mean}");
        assert!((variance - 1.0).abs() < 0.03, "{variance}");
    }

    #[test]
    fn pacer_meets_the_rate_with_fractional_carry() {
        // 250 readings/s on 10 ms ticks is 2.5 per tick: 2, 3, 2, 3, ...
        let mut pacer = Pacer::new(250.0, Duration::from_secs(1));
        let mut per_tick = Vec::new();
        for tick in 1..=100u64 {
            let due = pacer.due(Duration::from_millis(10 * tick));
            pacer.record(due);
            per_tick.push(due);
        }
        assert_eq!(per_tick.iter().sum::<u64>(), 250);
        assert!(per_tick.iter().all(|&n| n == 2 || n == 3), "{per_tick:?}");
    }

    #[test]
    fn pacer_keeps_the_rate_when_ticks_come_late_or_irregularly() {
        let mut pacer = Pacer::new(50_000.0, Duration::from_secs(1));
        let mut total = 0;
        let mut elapsed_ms = 0;
        for gap in [10, 13, 7, 25, 10, 10, 40, 1, 9].iter().cycle().take(90) {
            elapsed_ms += gap;
            let due = pacer.due(Duration::from_millis(elapsed_ms));
            pacer.record(due);
            total += due;
        }
        assert_eq!(total, 50 * elapsed_ms);
        assert_eq!(pacer.skipped, 0);
    }

    #[test]
    fn pacer_carries_unsent_readings_but_skips_beyond_its_backlog() {
        let mut pacer = Pacer::new(1000.0, Duration::from_millis(500));
        // Nothing could be sent for a tick: it is owed at the next one.
        assert_eq!(pacer.due(Duration::from_millis(10)), 10);
        assert_eq!(pacer.due(Duration::from_millis(20)), 20);
        pacer.record(20);
        // A two-second stall: only half a second's worth is still owed.
        assert_eq!(pacer.due(Duration::from_millis(2020)), 500);
        assert_eq!(pacer.skipped, 1500);
    }

    #[test]
    fn fleet_spreads_devices_over_sites_and_numbers_readings_per_device() {
        let mut fleet = Fleet::new(3, 2, 30.0, 9);
        let mut topics = Vec::new();
        for _ in 0..6 {
            let (topic, payload) = fleet.peek(1_732_600_000_000);
            let value: serde_json::Value = serde_json::from_str(&payload).expect("valid JSON");
            assert_eq!(value["ts"], 1_732_600_000_000u64);
            assert!(value["temperature"].is_f64() && value["humidity"].is_f64());
            assert!(value["battery"].is_f64());
            topics.push((topic, value["seq"].as_u64().expect("seq")));
            fleet.advance();
        }
        let expected = |site, device, seq| {
            (
                format!("sensors/plant-{site}/dev-{device:04}/telemetry"),
                seq,
            )
        };
        assert_eq!(
            topics,
            vec![
                expected(1, 1, 0),
                expected(2, 2, 0),
                expected(1, 3, 0),
                expected(1, 1, 1),
                expected(2, 2, 1),
                expected(1, 3, 1),
            ]
        );
    }

    #[test]
    fn payload_matches_the_reference_scenario_shape() {
        let fleet = Fleet::new(1, 1, 1.0, 5);
        let (_, payload) = fleet.peek(1_732_600_000_000);
        assert!(
            payload.starts_with(r#"{"ts": 1732600000000, "seq": 0, "temperature": "#),
            "{payload}"
        );
        assert!(payload.contains(r#", "humidity": "#) && payload.contains(r#", "battery": "#));
    }

    #[test]
    fn options_are_checked_before_connecting() {
        let good = SimulatorOptions {
            broker_url: "mqtt://127.0.0.1:1883".into(),
            devices: 10,
            rate: 100.0,
            duration: None,
            sites: 2,
            client_id: "sim".into(),
            qos: QoS::AtMostOnce,
        };
        assert!(good.validate().is_ok());
        for bad in [
            SimulatorOptions {
                devices: 0,
                ..good.clone()
            },
            SimulatorOptions {
                rate: 0.0,
                ..good.clone()
            },
            SimulatorOptions {
                rate: f64::NAN,
                ..good.clone()
            },
            SimulatorOptions {
                sites: 0,
                ..good.clone()
            },
            SimulatorOptions {
                broker_url: "localhost:1883".into(),
                ..good.clone()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
