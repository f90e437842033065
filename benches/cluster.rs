//! Cluster bench (issue 13): weir's `[cluster]` mode against a real nats-server on loopback.
//!
//! 1. **Catch-up throughput with 1, 2 and 3 instances.** The instances start on an empty
//!    readings stream and settle on the 64 partitions; then they are stopped (SIGSTOP), the
//!    stream is filled with R readings of D devices (JetStream publishes to the partitioned
//!    subjects, as the server's mapping would store them), and they are continued (SIGCONT).
//!    The time from SIGCONT until the output stream holds every expected overheat event and
//!    every instance reports no lag gives readings/s for the cluster; CPU time over the same
//!    interval, of each instance and of nats-server, from /proc/PID/stat, gives us per reading.
//!    The leases are 60 s here so that the stop does not cost them.
//! 2. **Handover.** Three instances with 2 s leases and a snapshot a second take R readings
//!    live; one is SIGKILLed. Reported: the time until the owners bucket names only the two
//!    survivors for all 64 partitions, the time until they serve all 64, and their catch-up
//!    (`weir_cluster_replay_seconds`, `weir_cluster_replayed_readings`).
//! 3. **Snapshot size**: `weir_cluster_state_bytes` per partition and per device.
//!
//! Every instance reads the whole stream and passes over the partitions it does not own (on
//! nats-server 2.9 a consumer has one filter subject), so instances add no read throughput;
//! the bench shows what is. The expected events are what `weir replay` derives from the same
//! readings; a mismatch exits non-zero.
//!
//! Run: `cargo bench --bench cluster [-- --readings 200000 --devices 10000 --instances 1,2,3]`.
//! Needs `nats-server` (Debian package). Everything on free loopback ports and a temp dir.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[path = "common/http.rs"]
mod http;
use http::http_get;

const WEIR: &str = env!("CARGO_BIN_EXE_weir");
const PARTITIONS: u32 = 64;
const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/example.toml");

struct Options {
    readings: usize,
    devices: usize,
    instances: Vec<usize>,
}

fn options() -> Options {
    let mut options = Options {
        readings: 200_000,
        devices: 10_000,
        instances: vec![1, 2, 3],
    };
    let args: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < args.len() {
        let value = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--readings" => options.readings = value.parse().expect("--readings N"),
            "--devices" => options.devices = value.parse().expect("--devices N"),
            "--instances" => {
                options.instances = value
                    .split(',')
                    .map(|n| n.parse().expect("--instances 1,2,3"))
                    .collect()
            }
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    options
}

/// A child process killed (and reaped) when dropped.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Process {
    fn pid(&self) -> u32 {
        self.0.id()
    }

    fn signal(&self, signal: &str) {
        let _ = Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .status();
    }

    /// CPU time (user + system) so far, from /proc/PID/stat.
    fn cpu(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        Duration::from_millis(ticks * 1000 / clock_ticks())
    }
}

fn clock_ticks() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// A temp dir removed when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn temp_dir(tag: &str) -> TempDir {
    let dir = std::env::temp_dir().join(format!("weir-bench-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create the temp dir");
    TempDir(dir)
}

/// A nats-server with JetStream and an MQTT listener (weir's climate rollups go there).
struct Nats {
    process: Process,
    port: u16,
    mqtt_port: u16,
}

fn start_nats(dir: &Path) -> Nats {
    let binary = ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or_else(|| panic!("nats-server is not installed: apt-get install nats-server"));
    let (port, mqtt_port) = (free_port(), free_port());
    let config = dir.join("nats.conf");
    std::fs::write(
        &config,
        format!(
            "listen: 127.0.0.1:{port}\nserver_name: bench-{port}\njetstream {{ store_dir: {:?} }}\nmqtt {{ listen: 127.0.0.1:{mqtt_port} }}\n",
            dir.join("js")
        ),
    )
    .expect("write nats.conf");
    let log = std::fs::File::create(dir.join("nats.log")).expect("nats log");
    let process = Process(
        Command::new(binary)
            .arg("-c")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start nats-server"),
    );
    for port in [port, mqtt_port] {
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Nats {
        process,
        port,
        mqtt_port,
    }
}

/// The example config in cluster mode on `nats`: the overheat alerts to the `nats` sink.
fn config(nats: &Nats, member: &str, lease_ttl: &str, http_port: u16, state: &Path) -> String {
    let example = std::fs::read_to_string(EXAMPLE).expect("read the example config");
    let single = "[rules.overheat.output]\ntopic = \"alerts/{site}/{device}/overheat\"\nqos = 1";
    assert!(
        example.contains(single),
        "the example's overheat output changed"
    );
    let text: String = example
        .replace(
            single,
            "[rules.overheat.output]\nsink = \"hub\"\ntopic = \"alerts/{site}/{device}/overheat\"\nqos = 1 # kept: the nats sink's publishes are acknowledged by the stream",
        )
        .replace("mode = \"at_least_once\"", "mode = \"at_most_once\"")
        .replace("clean_session = false", "clean_session = true")
        .replace("qos = 1\n", "qos = 0\n")
        .replace("snapshot_interval = \"30s\"", "snapshot_interval = \"1s\"")
        .replace(
            "url = \"mqtt://127.0.0.1:1883\"",
            &format!("url = \"mqtt://127.0.0.1:{}\"", nats.mqtt_port),
        )
        .lines()
        .filter(|line| !line.starts_with("state_dir"))
        .map(|line| {
            if line.starts_with("listen = ") {
                format!("listen = \"127.0.0.1:{http_port}\"")
            } else {
                line.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    text.replace("[delivery]", &format!("[delivery]\nstate_dir = {state:?}"))
        + &format!(
            "\n[cluster]\nservers = [\"nats://127.0.0.1:{port}\"]\npartitions = {PARTITIONS}\nmember = \"{member}\"\nlease_ttl = \"{lease_ttl}\"\n\n[sinks.hub]\nkind = \"nats\"\nurl = \"nats://127.0.0.1:{port}\"\n",
            port = nats.port
        )
}

fn weir(args: &[&str]) -> String {
    let output = Command::new(WEIR).args(args).output().expect("run weir");
    assert!(
        output.status.success(),
        "weir {args:?} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A `weir run` member of the cluster.
struct Instance {
    process: Process,
    http: String,
}

impl Instance {
    fn start(nats: &Nats, dir: &Path, member: &str, lease_ttl: &str) -> Self {
        let port = free_port();
        let path = dir.join(format!("{member}.toml"));
        let state = dir.join(format!("state-{member}"));
        std::fs::write(&path, config(nats, member, lease_ttl, port, &state)).expect("config");
        let log = std::fs::File::create(dir.join(format!("{member}.log"))).expect("log");
        let process = Process(
            Command::new(WEIR)
                .args(["run", "--config"])
                .arg(&path)
                .env("RUST_LOG", "weir=warn")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("start weir run"),
        );
        Self {
            process,
            http: format!("127.0.0.1:{port}"),
        }
    }

    /// The sum of a metric's samples (0 when absent or weir does not answer).
    fn metric(&self, name: &str) -> f64 {
        let Some((_, text)) = http_get(&self.http, "/metrics") else {
            return 0.0;
        };
        text.lines()
            .filter(|line| line.starts_with(name) && line[name.len()..].starts_with([' ', '{']))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

/// Per device `dev-<i>`, `steps` readings one second apart in event time, crossing the
/// overheat thresholds: (device, payload).
fn readings(devices: usize, total: usize) -> Vec<(String, String)> {
    const TEMPERATURES: [f64; 6] = [25.0, 31.0, 29.0, 27.0, 33.0, 24.0];
    let steps = total.div_ceil(devices);
    let mut out = Vec::with_capacity(steps * devices);
    for step in 0..steps {
        for device in 0..devices {
            let payload = format!(
                "{{\"ts\":{},\"seq\":{step},\"temperature\":{},\"humidity\":40.0}}",
                1_732_600_000_000_i64 + step as i64 * 1000,
                TEMPERATURES[(step + device) % TEMPERATURES.len()]
            );
            out.push((format!("dev-{device}"), payload));
        }
    }
    out.truncate(total);
    out
}

/// The overheat events `weir replay` derives from `readings`.
fn expected_events(dir: &Path, config: &Path, readings: &[(String, String)]) -> u64 {
    let input = dir.join("readings.jsonl");
    let mut text = String::new();
    for (device, payload) in readings {
        text.push_str(&format!(
            "{{\"topic\":\"sensors/plant-1/{device}/telemetry\",\"payload\":{payload}}}\n"
        ));
    }
    std::fs::write(&input, text).expect("write readings");
    let out = weir(&[
        "replay",
        "-i",
        input.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ]);
    out.lines()
        .filter(|line| line.contains("\"rule\":\"overheat\""))
        .count() as u64
}

async fn jetstream(nats: &Nats) -> async_nats::jetstream::Context {
    let client = async_nats::connect(format!("nats://127.0.0.1:{}", nats.port))
        .await
        .expect("connect to nats-server");
    async_nats::jetstream::new(client)
}

/// Publishes `readings` to their partitions' subjects, up to 2,000 unacknowledged.
async fn fill(js: &async_nats::jetstream::Context, readings: &[(String, String)]) -> Duration {
    let started = Instant::now();
    let mut pending = std::collections::VecDeque::new();
    for (device, payload) in readings {
        let partition = weir::config::cluster::partition_of(device, PARTITIONS);
        let subject = format!("weir.{partition}.sensors.plant-1.{device}.telemetry");
        let ack = js
            .publish(subject, payload.clone().into_bytes().into())
            .await
            .expect("publish");
        pending.push_back(ack);
        if pending.len() >= 2000 {
            pending.pop_front().unwrap().await.expect("stored");
        }
    }
    for ack in pending {
        ack.await.expect("stored");
    }
    started.elapsed()
}

async fn stream_messages(js: &async_nats::jetstream::Context, stream: &str) -> u64 {
    match js.get_stream(stream).await {
        Ok(stream) => stream
            .get_info()
            .await
            .map(|i| i.state.messages)
            .unwrap_or(0),
        Err(_) => 0,
    }
}

/// Who holds each partition (`None` where nobody does), from the owners bucket.
async fn owners(js: &async_nats::jetstream::Context) -> Vec<Option<String>> {
    let bucket = js
        .get_key_value("weir_owners")
        .await
        .expect("owners bucket");
    let mut owners = Vec::new();
    for partition in 0..PARTITIONS {
        owners.push(
            bucket
                .get(format!("p{partition}"))
                .await
                .ok()
                .flatten()
                .map(|v| String::from_utf8_lossy(&v).into_owned()),
        );
    }
    owners
}

async fn wait_for_owners(js: &async_nats::jetstream::Context, members: &[String]) -> Duration {
    let started = Instant::now();
    loop {
        let owners = owners(js).await;
        if owners
            .iter()
            .all(|o| o.as_ref().is_some_and(|m| members.contains(m)))
            && members
                .iter()
                .all(|m| owners.iter().any(|o| o.as_ref() == Some(m)))
        {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the partitions did not settle on {members:?}: {owners:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct Throughput {
    instances: usize,
    seconds: f64,
    weir_us: Vec<f64>,
    nats_us: f64,
}

async fn throughput(n: usize, all: &[(String, String)]) -> (Throughput, u64) {
    let dir = temp_dir(&format!("cluster-{n}"));
    let nats = start_nats(&dir.0);
    let init = dir.0.join("init.toml");
    std::fs::write(
        &init,
        config(&nats, "init", "60s", free_port(), &dir.0.join("s")),
    )
    .unwrap();
    weir(&["cluster", "init", "--config", init.to_str().unwrap()]);
    let expected = expected_events(&dir.0, &init, all);
    let names: Vec<String> = (0..n).map(|i| format!("bench-{i}")).collect();
    let instances: Vec<Instance> = names
        .iter()
        .map(|name| Instance::start(&nats, &dir.0, name, "60s"))
        .collect();
    let js = jetstream(&nats).await;
    wait_for_owners(&js, &names).await;
    // Let the terms start on their final partition sets.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for instance in &instances {
        instance.process.signal("STOP");
    }
    let filled_in = fill(&js, all).await;
    let before: Vec<Duration> = instances.iter().map(|i| i.process.cpu()).collect();
    let nats_before = nats.process.cpu();
    let started = Instant::now();
    for instance in &instances {
        instance.process.signal("CONT");
    }
    loop {
        let events = stream_messages(&js, "WEIR_EVENTS").await;
        if events >= expected
            && instances
                .iter()
                .all(|i| i.metric("weir_cluster_lag_messages") == 0.0)
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "{n} instance(s): {events} of {expected} events after 300 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let per_reading = |cpu: Duration| cpu.as_secs_f64() * 1e6 / all.len() as f64;
    let weir_us = instances
        .iter()
        .zip(&before)
        .map(|(i, b)| per_reading(i.process.cpu() - *b))
        .collect();
    let nats_us = per_reading(nats.process.cpu() - nats_before);
    let events = stream_messages(&js, "WEIR_EVENTS").await;
    assert_eq!(
        events, expected,
        "{n} instance(s): the output stream holds what weir replay derives"
    );
    println!(
        "{n} instance(s): stream filled in {:.1} s; caught up with {} readings in {seconds:.2} s; {events} events",
        filled_in.as_secs_f64(),
        all.len()
    );
    drop(instances);
    (
        Throughput {
            instances: n,
            seconds,
            weir_us,
            nats_us,
        },
        expected,
    )
}

struct Handover {
    claimed: Duration,
    served: Duration,
    replay_seconds: Vec<f64>,
    replayed: Vec<f64>,
    state_bytes: f64,
    partitions_owned: f64,
}

async fn handover(all: &[(String, String)]) -> Handover {
    let dir = temp_dir("cluster-handover");
    let nats = start_nats(&dir.0);
    let init = dir.0.join("init.toml");
    std::fs::write(
        &init,
        config(&nats, "init", "2s", free_port(), &dir.0.join("s")),
    )
    .unwrap();
    weir(&["cluster", "init", "--config", init.to_str().unwrap()]);
    let names: Vec<String> = (0..3).map(|i| format!("bench-{i}")).collect();
    let mut instances: Vec<Instance> = names
        .iter()
        .map(|name| Instance::start(&nats, &dir.0, name, "2s"))
        .collect();
    let js = jetstream(&nats).await;
    wait_for_owners(&js, &names).await;
    fill(&js, all).await;
    let deadline = Instant::now() + Duration::from_secs(300);
    while instances
        .iter()
        .any(|i| i.metric("weir_cluster_lag_messages") > 0.0)
    {
        assert!(Instant::now() < deadline, "the instances did not catch up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Two snapshot intervals: every partition's state saved clean.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let state_bytes: f64 = instances
        .iter()
        .map(|i| i.metric("weir_cluster_state_bytes"))
        .sum();
    let partitions_owned: f64 = instances
        .iter()
        .map(|i| i.metric("weir_cluster_partitions_owned"))
        .sum();
    let killed = instances.remove(0);
    let killed_at = Instant::now();
    drop(killed);
    wait_for_owners(&js, &names[1..]).await;
    let claimed = killed_at.elapsed();
    loop {
        let served: f64 = instances
            .iter()
            .map(|i| i.metric("weir_cluster_partitions_owned"))
            .sum();
        if served >= f64::from(PARTITIONS) {
            break;
        }
        assert!(killed_at.elapsed() < Duration::from_secs(60), "not served");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let served = killed_at.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    Handover {
        claimed,
        served,
        replay_seconds: instances
            .iter()
            .map(|i| i.metric("weir_cluster_replay_seconds"))
            .collect(),
        replayed: instances
            .iter()
            .map(|i| i.metric("weir_cluster_replayed_readings"))
            .collect(),
        state_bytes,
        partitions_owned,
    }
}

fn main() {
    let options = options();
    let all = readings(options.devices, options.readings);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let mut rows = Vec::new();
    let mut expected = 0;
    for &n in &options.instances {
        let (row, events) = runtime.block_on(throughput(n, &all));
        expected = events;
        rows.push(row);
    }
    let handover = runtime.block_on(handover(&all));

    println!(
        "\n{} readings of {} devices, {PARTITIONS} partitions, {expected} overheat events (= weir replay)",
        all.len(),
        options.devices
    );
    println!("| instances | catch-up | readings/s | weir CPU us/reading (each) | nats-server CPU us/reading |");
    println!("|---|---|---|---|---|");
    for row in &rows {
        let each: Vec<String> = row.weir_us.iter().map(|us| format!("{us:.2}")).collect();
        println!(
            "| {} | {:.2} s | {:.0} | {} | {:.2} |",
            row.instances,
            row.seconds,
            all.len() as f64 / row.seconds,
            each.join(", "),
            row.nats_us
        );
    }
    let per_device = handover.state_bytes / options.devices as f64;
    println!(
        "\nhandover (3 instances, lease_ttl 2s, snapshot every 1 s): SIGKILL -> partitions claimed by the survivors {:.2} s, served {:.2} s",
        handover.claimed.as_secs_f64(),
        handover.served.as_secs_f64()
    );
    for (seconds, readings) in handover.replay_seconds.iter().zip(&handover.replayed) {
        println!(
            "  survivor catch-up: {readings:.0} readings in {seconds:.3} s ({:.0} readings/s)",
            readings / seconds.max(1e-9)
        );
    }
    println!(
        "snapshot: {:.0} bytes over {:.0} partitions = {:.0} bytes per partition, {per_device:.0} bytes per device",
        handover.state_bytes,
        handover.partitions_owned,
        handover.state_bytes / handover.partitions_owned.max(1.0)
    );
}
