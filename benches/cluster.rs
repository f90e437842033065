//! Cluster bench (issue 13, item 8): weir's `[cluster]` mode against a real nats-server 2.9
//! (Debian's `nats-server`) on free loopback ports, every process a child of this one.
//!
//! Each scenario starts its own nats-server (JetStream in a temp dir, an MQTT listener, and the
//! account mapping `weir cluster init` prints for 64 partitions), runs `weir cluster init`, and
//! starts `weir run` instances on the example config with `[cluster]` added and the overheat
//! alerts going to a `nats` sink, hence to the output stream `WEIR_EVENTS`. Readings are
//! published with JetStream acks (1,000 in flight) straight to the subjects the mapping gives,
//! `weir.<partition>.sensors.plant-1.dev-<i>.telemetry`, with `partition_of` computing the
//! partition as the server's `partition(64,2)` does (token 2: the device segment, which is the
//! example input's device id). They cross the overheat thresholds as the tests' fleet readings
//! do (0.64 events per reading), so the figures include publishing those events.
//!
//! 1. **Throughput with 1, 2 and 3 instances: a backlog drain.** The instances settle on the 64
//!    partitions over an empty stream (every one serving its final set), are stopped
//!    (SIGSTOP), the stream is filled with R readings, and they are continued (SIGCONT). The
//!    clock runs from SIGCONT until the output stream holds as many events as `weir replay`
//!    derives from the readings, and the instances have read all R between them (each reads
//!    only its partitions) with `weir_cluster_lag_messages` at 0 everywhere: that is
//!    the cluster's readings/s. CPU over the same interval, from /proc/PID/stat (utime +
//!    stime, clock ticks of 10 ms), of each instance and of nats-server, per reading. Starting
//!    the instances on a pre-filled stream instead would time the members' join and the terms
//!    they restart as the partitions settle, not the reading; the stop keeps them out. The
//!    leases are 20 s there (trusted for 15 s), so the stop during the fill does not cost them.
//! 2. **Handover.** Three instances with `lease_ttl = "2s"` and a snapshot a second; R/2
//!    readings published live at 10,000/s; halfway through, one instance is SIGKILLed. Timed
//!    from the kill: until the owners bucket names only the two survivors for all 64
//!    partitions (read key by key with `entry`), and until their `/api/cluster` lists all 64 as
//!    served (published every `lease_ttl / 4`, so up to that late); how many terms each
//!    survivor started since, and how long the first took to start (its log's `serving
//!    partitions ... took=`). Then the survivors' catch-up of their last term:
//!    `weir_cluster_replayed_readings` in `weir_cluster_replay_seconds`. When the survivors do
//!    not serve all 64 within 30 s, that is reported and the scenario runs again with the
//!    default `lease_ttl = "10s"` (before the supervisor renewed during term starts, a start
//!    longer than the 1.5 s a 2 s lease is trusted made every new term find its leases
//!    lapsed).
//! 3. **Snapshot size**, before the kill: `weir_cluster_state_bytes` of the three instances
//!    over 64 partitions and over the devices; and the time an idle nats-server takes to create
//!    a consumer like weir's (filter `weir.0.>`: a term makes one per partition it owns) on
//!    the filled stream.
//!
//! Every check compares the output stream's overheat events, per device and in order, by id,
//! with `weir replay` of the same readings; a difference exits non-zero after the table.
//!
//! Run: `cargo bench --bench cluster` (options after `--`: `--readings 200000 --devices 10000
//! --instances 1,2,3`); 3-4 minutes after the build on 2 cores.
//!
//! What bounds the figures: each instance reads only its partitions (a consumer per
//! partition), so the server delivers each reading once whatever the instance count; but
//! everything (the server, the instances, this publisher) shares one machine's two cores, so
//! more instances spread the work without adding cores to do it.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, kv, stream};

#[path = "common/http.rs"]
mod http;
use http::http_get;
#[path = "common/proc.rs"]
mod proc;
use proc::proc_stat;

const WEIR: &str = env!("CARGO_BIN_EXE_weir");
const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/example.toml");
const PARTITIONS: u32 = 64;
/// The mapping `weir cluster init` must print for the example's input and 64 partitions.
const MAPPING: &str = r#""sensors.*.*.telemetry": "weir.{{partition(64,2)}}.sensors.{{wildcard(1)}}.{{wildcard(2)}}.telemetry""#;
/// Event time of the first reading (as the tests' `T0`); one step a second per device.
const T0: i64 = 1_732_600_000_000;
/// Leases of the throughput scenario: long enough that SIGSTOP during the fill keeps them.
const DRAIN_LEASE: &str = "20s";
/// Leases of the handover scenario: the minimum weir accepts.
const HANDOVER_LEASE: &str = "2s";
/// The handover's leases when the survivors never settle with [`HANDOVER_LEASE`]: the default.
const FALLBACK_LEASE: &str = "10s";
/// Readings per second published live during the handover.
const LIVE_RATE: f64 = 10_000.0;
/// How often the bench polls metrics, the owners bucket and the output stream.
const POLL: Duration = Duration::from_millis(50);

// ---------------------------------------------------------------------------------------------
// Options.

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
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let value = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--readings" => options.readings = value.parse().expect("--readings N"),
            "--devices" => options.devices = value.parse().expect("--devices N"),
            "--instances" => {
                options.instances = value
                    .split(',')
                    .map(|n| n.trim().parse().expect("--instances 1,2,3"))
                    .collect();
            }
            _ => {
                // `cargo bench` passes `--bench`; filters are not supported.
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    assert!(options.devices > 0 && options.readings >= options.devices);
    options
}

// ---------------------------------------------------------------------------------------------
// Processes and the temp dir.

/// A child process, SIGKILLed and reaped when dropped (also while a panic unwinds).
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
        proc_stat(self.pid()).expect("the process is running").1
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// A temp dir, removed when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("weir-bench-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the temp dir");
        Self(dir)
    }
}

// ---------------------------------------------------------------------------------------------
// nats-server.

fn nats_binary() -> PathBuf {
    ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
        .into_iter()
        .map(PathBuf::from)
        .find(|path| path.exists())
        .unwrap_or_else(|| {
            eprintln!("nats-server is not installed: apt-get install nats-server");
            std::process::exit(1);
        })
}

/// A nats-server as the tests start one: JetStream in `dir`, an MQTT listener (weir's climate
/// rollups go there), and the account `WEIR` with the partition mapping, the default for
/// clients without credentials.
struct Nats {
    process: Process,
    port: u16,
    mqtt_port: u16,
}

impl Nats {
    fn start(dir: &Path, mappings: &[String]) -> Self {
        let (port, mqtt_port) = (free_port(), free_port());
        let config = dir.join("nats.conf");
        std::fs::write(
            &config,
            format!(
                "listen: 127.0.0.1:{port}\nserver_name: bench-{port}\njetstream {{ store_dir: {:?} }}\nmqtt {{ listen: 127.0.0.1:{mqtt_port} }}\naccounts {{\n  WEIR {{\n    jetstream: enabled\n    users: [{{user: weir, password: weir}}]\n    mappings: {{\n      {}\n    }}\n  }}\n}}\nno_auth_user: weir\n",
                dir.join("js"),
                mappings.join("\n      ")
            ),
        )
        .expect("write nats.conf");
        let log = std::fs::File::create(dir.join("nats.log")).expect("nats log");
        let process = Process(
            Command::new(nats_binary())
                .arg("-c")
                .arg(&config)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("start nats-server"),
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        for port in [port, mqtt_port] {
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                assert!(Instant::now() < deadline, "nats-server did not listen");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Self {
            process,
            port,
            mqtt_port,
        }
    }

    async fn jetstream(&self) -> jetstream::Context {
        let client = async_nats::connect(format!("nats://127.0.0.1:{}", self.port))
            .await
            .expect("connect to nats-server");
        jetstream::new(client)
    }
}

/// The mapping `weir cluster init` prints: learnt from a server without one (as the tests do),
/// and checked to hash the topic's device segment into 64 partitions.
fn mappings() -> Vec<String> {
    let dir = TempDir::new("bootstrap");
    let nats = Nats::start(&dir.0, &[]);
    let config = dir.0.join("init.toml");
    std::fs::write(
        &config,
        weir_config(&nats, "init", DRAIN_LEASE, "5s", free_port(), &dir.0),
    )
    .expect("write the config");
    let printed = weir(&[
        "cluster",
        "init",
        "--config",
        config.to_str().expect("utf-8"),
    ]);
    let mappings: Vec<String> = printed
        .lines()
        .filter(|line| line.starts_with("  \""))
        .map(|line| line.trim().to_owned())
        .collect();
    assert_eq!(mappings, [MAPPING], "{printed}");
    mappings
}

// ---------------------------------------------------------------------------------------------
// weir.

/// The example config in cluster mode (as the tests' `cluster_config`, with 64 partitions):
/// the overheat alerts to the `nats` sink `hub`, the climate rollups to the MQTT listener.
fn weir_config(
    nats: &Nats,
    member: &str,
    lease_ttl: &str,
    snapshot_interval: &str,
    http_port: u16,
    state: &Path,
) -> String {
    let example = std::fs::read_to_string(EXAMPLE).expect("read config/example.toml");
    // The partition is the hash of the device id; the mapping hashes the topic's second
    // wildcard. They agree while the device id is that segment.
    assert!(
        example.contains("topic = \"sensors/{site}/{device}/telemetry\"\ndevice = \"device\""),
        "the example's input no longer takes the device id from the topic's device segment"
    );
    let single = "[rules.overheat.output]\ntopic = \"alerts/{site}/{device}/overheat\"";
    assert!(
        example.contains(single),
        "the example's overheat output changed"
    );
    let text = example
        .replace("mode = \"at_least_once\"", "mode = \"at_most_once\"")
        .replace("clean_session = false", "clean_session = true")
        .replace("qos = 1\n", "qos = 0\n")
        .replace(
            &format!("{single}\nqos = 0"),
            "[rules.overheat.output]\nsink = \"hub\"\ntopic = \"alerts/{site}/{device}/overheat\"\nqos = 1",
        )
        .replace(
            "snapshot_interval = \"30s\"",
            &format!("snapshot_interval = \"{snapshot_interval}\""),
        )
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
            "\n[cluster]\nservers = [\"nats://127.0.0.1:{port}\"]\npartitions = {PARTITIONS}\nreplicas = 1\nmember = \"{member}\"\nlease_ttl = \"{lease_ttl}\"\n\n[sinks.hub]\nkind = \"nats\"\nurl = \"nats://127.0.0.1:{port}\"\n",
            port = nats.port
        )
}

/// Runs the weir binary; fails the bench on a non-zero exit.
fn weir(args: &[&str]) -> String {
    let output = Command::new(WEIR).args(args).output().expect("run weir");
    assert!(
        output.status.success(),
        "weir {args:?} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Writes the config of a scenario and runs `weir cluster init` on it.
fn cluster_init(nats: &Nats, dir: &Path, lease_ttl: &str) -> PathBuf {
    let config = dir.join("init.toml");
    std::fs::write(
        &config,
        weir_config(nats, "init", lease_ttl, "5s", free_port(), dir),
    )
    .expect("write the config");
    weir(&[
        "cluster",
        "init",
        "--config",
        config.to_str().expect("utf-8"),
    ]);
    config
}

/// A `weir run` member of the cluster.
struct Instance {
    process: Process,
    name: String,
    http: String,
    log: PathBuf,
}

impl Instance {
    fn start(nats: &Nats, dir: &Path, name: &str, lease_ttl: &str, snapshots: &str) -> Self {
        let port = free_port();
        let config = dir.join(format!("{name}.toml"));
        let state = dir.join(format!("state-{name}"));
        std::fs::write(
            &config,
            weir_config(nats, name, lease_ttl, snapshots, port, &state),
        )
        .expect("write the config");
        let log = dir.join(format!("{name}.log"));
        let process = Process(
            Command::new(WEIR)
                .args(["run", "--config"])
                .arg(&config)
                .env("WEIR_LOG", "info")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).expect("log"))
                .spawn()
                .expect("start weir run"),
        );
        Self {
            process,
            name: name.to_owned(),
            http: format!("127.0.0.1:{port}"),
            log,
        }
    }

    /// The sum of a metric's samples (0 when absent, or while weir does not answer).
    fn metric(&self, name: &str) -> f64 {
        let Some((_, text)) = http_get(&self.http, "/metrics") else {
            return 0.0;
        };
        text.lines()
            .filter(|line| line.starts_with(name) && line[name.len()..].starts_with([' ', '{']))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Stream messages this instance has read: its own partitions' readings.
    fn read(&self) -> f64 {
        self.metric("weir_readings_received_total")
    }

    /// `GET /api/cluster`.
    fn view(&self) -> Option<serde_json::Value> {
        let (status, text) = http_get(&self.http, "/api/cluster")?;
        let (_, body) = text.split_once("\r\n\r\n")?;
        (status == 200)
            .then(|| serde_json::from_str(body).ok())
            .flatten()
    }

    /// The partitions this instance's running term serves.
    fn serving(&self) -> Vec<u64> {
        self.view()
            .and_then(|view| {
                view["serving"]
                    .as_array()
                    .map(|a| a.iter().filter_map(serde_json::Value::as_u64).collect())
            })
            .unwrap_or_default()
    }

    /// How long each term start took, in order, from the log's `serving partitions ...
    /// took=` lines: loading the partitions' snapshots, restoring them, making the consumer.
    fn term_starts(&self) -> Vec<f64> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|line| line.contains("serving partitions"))
            .filter_map(|line| seconds(line.split("took=").nth(1)?.split_whitespace().next()?))
            .collect()
    }

    /// `consumers=N pending=P` of the last term's start, from the log.
    fn last_reading(&self) -> String {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .rfind(|line| line.contains("reading the cluster stream"))
            .and_then(|line| line.find("consumers=").map(|at| line[at..].to_owned()))
            .unwrap_or_default()
    }

    /// Log lines containing `what`.
    fn log_count(&self, what: &str) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|line| line.contains(what))
            .count()
    }
}

/// A `Duration` as its `Debug` prints it (`1.97s`, `15.6ms`), in seconds.
fn seconds(text: &str) -> Option<f64> {
    let units = [
        ("ms", 1e-3),
        ("µs", 1e-6),
        ("us", 1e-6),
        ("ns", 1e-9),
        ("s", 1.0),
    ];
    units.iter().find_map(|(unit, scale)| {
        let number: f64 = text.strip_suffix(unit)?.parse().ok()?;
        Some(number * scale)
    })
}

fn start_instances(nats: &Nats, dir: &Path, n: usize, lease: &str, snaps: &str) -> Vec<Instance> {
    (0..n)
        .map(|i| Instance::start(nats, dir, &format!("bench-{i}"), lease, snaps))
        .collect()
}

/// Waits until every instance's term serves exactly what the assignment gives it, together
/// all 64 partitions, with all of them members; returns how long that took.
async fn wait_settled(instances: &[Instance], within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let views: Vec<Option<serde_json::Value>> = instances.iter().map(Instance::view).collect();
        let settled = views.iter().all(|view| {
            view.as_ref().is_some_and(|view| {
                let member = view["member"].as_str().unwrap_or_default();
                view["members"].as_array().map(Vec::len) == Some(instances.len())
                    && view["assignment"][member] == view["serving"]
            })
        }) && views
            .iter()
            .flatten()
            .map(|view| view["serving"].as_array().map_or(0, Vec::len))
            .sum::<usize>()
            == PARTITIONS as usize;
        if settled {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "the instances did not settle on the partitions within {within:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Readings and the expected events.

/// One reading: the device and its JSON payload.
struct Reading {
    device: String,
    payload: String,
}

/// `total` readings of `devices` devices in rounds, one step (a second of event time) per
/// round, the temperature crossing the overheat thresholds as in the tests' fleet readings.
fn readings(devices: usize, total: usize) -> Vec<Reading> {
    const TEMPERATURES: [f64; 6] = [25.0, 31.0, 29.0, 27.0, 33.0, 24.0];
    (0..total)
        .map(|index| {
            let (device, step) = (index % devices, index / devices);
            Reading {
                device: format!("dev-{device}"),
                payload: format!(
                    "{{\"ts\":{},\"seq\":{step},\"temperature\":{:.1},\"humidity\":40.0}}",
                    T0 + step as i64 * 1000,
                    TEMPERATURES[(step + device) % TEMPERATURES.len()]
                ),
            }
        })
        .collect()
}

/// Per device, the ids of overheat events in order.
type Events = BTreeMap<String, Vec<String>>;

fn count(events: &Events) -> u64 {
    events.values().map(|ids| ids.len() as u64).sum()
}

/// What `weir replay` derives from `readings` with `config`: the overheat events' ids.
fn replayed(dir: &Path, config: &Path, readings: &[Reading]) -> Events {
    let input = dir.join("readings.jsonl");
    let mut text = String::with_capacity(readings.len() * 120);
    for reading in readings {
        text.push_str(&format!(
            "{{\"topic\":\"sensors/plant-1/{}/telemetry\",\"payload\":{}}}\n",
            reading.device, reading.payload
        ));
    }
    std::fs::write(&input, text).expect("write the readings");
    let out = weir(&[
        "replay",
        "-i",
        input.to_str().expect("utf-8"),
        "--config",
        config.to_str().expect("utf-8"),
    ]);
    let _ = std::fs::remove_file(&input);
    let mut events = Events::new();
    for line in out.lines() {
        let event: serde_json::Value = serde_json::from_str(line).expect("replay prints JSON");
        let payload = &event["payload"];
        if payload["rule"] == "overheat" {
            events
                .entry(payload["device"].as_str().unwrap_or_default().to_owned())
                .or_default()
                .push(payload["id"].as_str().unwrap_or_default().to_owned());
        }
    }
    events
}

// ---------------------------------------------------------------------------------------------
// NATS, as the bench reads and writes it.

/// Publishes `readings` to their partitions' subjects with up to 1,000 acknowledgements
/// outstanding, flat out or at `rate` per second; returns how long it took.
async fn publish(js: jetstream::Context, readings: Arc<Vec<Reading>>, rate: Option<f64>) -> f64 {
    let started = Instant::now();
    let mut acks = VecDeque::with_capacity(1000);
    for (index, reading) in readings.iter().enumerate() {
        if let Some(rate) = rate {
            while (started.elapsed().as_secs_f64() * rate) < index as f64 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        let partition = weir::config::cluster::partition_of(&reading.device, PARTITIONS);
        let subject = format!(
            "weir.{partition}.sensors.plant-1.{}.telemetry",
            reading.device
        );
        let ack = js
            .publish(subject, reading.payload.clone().into())
            .await
            .expect("publish a reading");
        acks.push_back(ack);
        if acks.len() >= 1000 {
            acks.pop_front()
                .expect("in flight")
                .await
                .expect("the stream stored the reading");
        }
    }
    for ack in acks {
        ack.await.expect("the stream stored the reading");
    }
    started.elapsed().as_secs_f64()
}

async fn stream_messages(js: &jetstream::Context, name: &str) -> u64 {
    match js.get_stream(name).await {
        Ok(stream) => stream
            .get_info()
            .await
            .map_or(0, |info| info.state.messages),
        Err(_) => 0,
    }
}

/// The output stream's events, by device in stream order (ids from `Nats-Msg-Id`), read
/// message by message from the first sequence to the last, not through a consumer (as the
/// tests' `output_stream`): a get by sequence has no consumer state that could stall or skip.
async fn output_events(js: &jetstream::Context) -> Events {
    let stream = js
        .get_stream("WEIR_EVENTS")
        .await
        .expect("the output stream");
    let state = stream.get_info().await.expect("stream info").state;
    let mut events = Events::new();
    for sequence in state.first_sequence..=state.last_sequence {
        let message = match stream.get_raw_message(sequence).await {
            Ok(message) => message,
            Err(err) if err.kind() == stream::RawMessageErrorKind::NoMessageFound => continue,
            Err(err) => panic!("read event {sequence} of the output stream: {err}"),
        };
        let id = message
            .headers
            .get("Nats-Msg-Id")
            .map(|id| id.as_str().to_owned())
            .unwrap_or_default();
        let event: serde_json::Value =
            serde_json::from_slice(&message.payload).expect("events are JSON");
        assert_eq!(
            event["id"].as_str(),
            Some(id.as_str()),
            "Nats-Msg-Id is the event id"
        );
        events
            .entry(event["device"].as_str().unwrap_or_default().to_owned())
            .or_default()
            .push(id);
    }
    events
}

/// Who holds each partition, from the owners bucket, key by key (`None`: nobody).
async fn owners(bucket: &kv::Store) -> Vec<Option<String>> {
    let mut owners = Vec::with_capacity(PARTITIONS as usize);
    for partition in 0..PARTITIONS {
        let entry = bucket.entry(format!("p{partition}")).await.ok().flatten();
        owners.push(
            entry
                .filter(|entry| entry.operation == kv::Operation::Put)
                .map(|entry| String::from_utf8_lossy(&entry.value).into_owned()),
        );
    }
    owners
}

/// How long nats-server takes to create an ephemeral consumer as weir's source does (R1,
/// memory, no acks), on the whole stream: filtered on one partition (`weir.0.>`, as a term
/// makes one per partition it owns) from the first message, filtered from the last, and
/// unfiltered from the first.
async fn consumer_creation(js: &jetstream::Context) -> [f64; 3] {
    let stream = js
        .get_stream("WEIR_READINGS")
        .await
        .expect("readings stream");
    let last = stream.get_info().await.expect("info").state.last_sequence;
    let cases = [
        ("weir.0.>", consumer::DeliverPolicy::All),
        (
            "weir.0.>",
            consumer::DeliverPolicy::ByStartSequence {
                start_sequence: last,
            },
        ),
        ("", consumer::DeliverPolicy::All),
    ];
    let mut took = [0.0; 3];
    for (slot, (filter, deliver_policy)) in took.iter_mut().zip(cases) {
        let started = Instant::now();
        stream
            .create_consumer(consumer::pull::Config {
                filter_subject: filter.to_owned(),
                deliver_policy,
                ack_policy: consumer::AckPolicy::None,
                max_deliver: 1,
                num_replicas: 1,
                memory_storage: true,
                inactive_threshold: Duration::from_secs(5),
                ..Default::default()
            })
            .await
            .expect("create a consumer");
        *slot = started.elapsed().as_secs_f64();
    }
    took
}

// ---------------------------------------------------------------------------------------------
// Scenario 1: the backlog drain.

struct Drain {
    instances: usize,
    settled: f64,
    fill: f64,
    seconds: f64,
    /// CPU us per reading of each instance, and of nats-server.
    weir_us: Vec<f64>,
    nats_us: f64,
    /// Consumers an instance made again after an error (the stop outlasts their heartbeats).
    consumer_restarts: usize,
    exact: bool,
}

async fn drain(
    n: usize,
    mappings: &[String],
    all: &Arc<Vec<Reading>>,
) -> (Drain, Events, [f64; 3]) {
    let dir = TempDir::new(&format!("drain-{n}"));
    let nats = Nats::start(&dir.0, mappings);
    let config = cluster_init(&nats, &dir.0, DRAIN_LEASE);
    let expected = replayed(&dir.0, &config, all);
    let js = nats.jetstream().await;
    let instances = start_instances(&nats, &dir.0, n, DRAIN_LEASE, "5s");
    let settled = wait_settled(&instances, Duration::from_secs(120))
        .await
        .as_secs_f64();
    for instance in &instances {
        instance.process.signal("STOP");
    }
    let fill = publish(js.clone(), all.clone(), None).await;
    let total = all.len() as f64;
    let weir_before: Vec<Duration> = instances.iter().map(|i| i.process.cpu()).collect();
    let nats_before = nats.process.cpu();
    let started = Instant::now();
    for instance in &instances {
        instance.process.signal("CONT");
    }
    loop {
        let events = stream_messages(&js, "WEIR_EVENTS").await;
        if events >= count(&expected)
            && instances.iter().map(Instance::read).sum::<f64>() >= total
            && instances
                .iter()
                .all(|i| i.metric("weir_cluster_lag_messages") == 0.0)
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "{n} instance(s): {events} of {} events after 300 s",
            count(&expected)
        );
        tokio::time::sleep(POLL).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let per_reading = |cpu: Duration| cpu.as_secs_f64() * 1e6 / total;
    let weir_us = instances
        .iter()
        .zip(&weir_before)
        .map(|(i, before)| per_reading(i.process.cpu() - *before))
        .collect();
    let nats_us = per_reading(nats.process.cpu() - nats_before);
    let consumer_restarts = instances
        .iter()
        .map(|i| i.log_count("reading the cluster stream failed"))
        .sum();
    drop(instances);
    let exact = output_events(&js).await == expected;
    let creation = consumer_creation(&js).await;
    println!(
        "drain, {n} instance(s): settled in {settled:.1} s, stream filled in {fill:.1} s, drained in {seconds:.2} s, events {}",
        if exact { "= weir replay" } else { "DIFFER from weir replay" }
    );
    let row = Drain {
        instances: n,
        settled,
        fill,
        seconds,
        weir_us,
        nats_us,
        consumer_restarts,
        exact,
    };
    (row, expected, creation)
}

// ---------------------------------------------------------------------------------------------
// Scenario 2: SIGKILL one of three, under live readings.

struct Handover {
    lease: &'static str,
    live: usize,
    /// From the SIGKILL: the owners bucket names only the survivors; their terms serve all.
    claimed: Option<f64>,
    served: Option<f64>,
    survivors: Vec<Survivor>,
    /// Before the kill: the instances' last saved snapshots together, and their partitions.
    state_bytes: f64,
    partitions_owned: f64,
    /// The output stream against `weir replay`; `None` when the survivors never served.
    exact: Option<bool>,
}

struct Survivor {
    name: String,
    /// Terms started since the kill, and how long the first of them took to start.
    terms: usize,
    first_start: Option<f64>,
    /// The catch-up of its last term: `weir_cluster_replayed_readings` and `_replay_seconds`.
    replayed: f64,
    replay_seconds: f64,
    renew_failures: f64,
    /// What its last term started reading: `consumers=N pending=P` from its log.
    reading: String,
}

async fn handover(
    mappings: &[String],
    live: Arc<Vec<Reading>>,
    lease: &'static str,
    within: Duration,
) -> Handover {
    let dir = TempDir::new(&format!("handover-{lease}"));
    let nats = Nats::start(&dir.0, mappings);
    let config = cluster_init(&nats, &dir.0, lease);
    let expected = replayed(&dir.0, &config, &live);
    let js = nats.jetstream().await;
    let bucket = js
        .get_key_value("weir_owners")
        .await
        .expect("owners bucket");
    let mut instances = start_instances(&nats, &dir.0, 3, lease, "1s");
    wait_settled(&instances, Duration::from_secs(120)).await;
    let publisher = tokio::spawn(publish(js.clone(), live.clone(), Some(LIVE_RATE)));
    tokio::time::sleep(Duration::from_secs_f64(live.len() as f64 / 2.0 / LIVE_RATE)).await;
    // Snapshots are saved every second: these hold every device by now.
    let state_bytes = instances
        .iter()
        .map(|i| i.metric("weir_cluster_state_bytes"))
        .sum();
    let partitions_owned = instances
        .iter()
        .map(|i| i.metric("weir_cluster_partitions_owned"))
        .sum();
    let killed = instances.remove(0);
    let terms_before: Vec<usize> = instances.iter().map(|i| i.term_starts().len()).collect();
    let killed_at = Instant::now();
    drop(killed);
    let names: Vec<String> = instances.iter().map(|i| i.name.clone()).collect();
    let (mut claimed, mut served) = (None, None);
    while (claimed.is_none() || served.is_none()) && killed_at.elapsed() < within {
        if claimed.is_none()
            && owners(&bucket)
                .await
                .iter()
                .all(|o| o.as_ref().is_some_and(|m| names.contains(m)))
        {
            claimed = Some(killed_at.elapsed().as_secs_f64());
        }
        if served.is_none() {
            let mut serving: Vec<u64> = instances.iter().flat_map(Instance::serving).collect();
            serving.sort_unstable();
            serving.dedup();
            if serving.len() == PARTITIONS as usize {
                served = Some(killed_at.elapsed().as_secs_f64());
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    publisher.await.expect("the publisher");
    if served.is_some() {
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline
            && (stream_messages(&js, "WEIR_EVENTS").await < count(&expected)
                || instances
                    .iter()
                    .any(|i| i.metric("weir_cluster_lag_messages") > 0.0))
        {
            tokio::time::sleep(POLL).await;
        }
    }
    let survivors = instances
        .iter()
        .zip(terms_before)
        .map(|(i, before)| {
            let starts = i.term_starts();
            Survivor {
                name: i.name.clone(),
                terms: starts.len().saturating_sub(before),
                first_start: starts.get(before).copied(),
                replayed: i.metric("weir_cluster_replayed_readings"),
                replay_seconds: i.metric("weir_cluster_replay_seconds"),
                renew_failures: i.metric("weir_cluster_lease_renew_failures_total"),
                reading: i.last_reading(),
            }
        })
        .collect();
    drop(instances);
    let exact = match served {
        Some(_) => Some(output_events(&js).await == expected),
        None => None,
    };
    Handover {
        lease,
        live: live.len(),
        claimed,
        served,
        survivors,
        state_bytes,
        partitions_owned,
        exact,
    }
}

// ---------------------------------------------------------------------------------------------
// The report.

fn main() {
    let options = options();
    let all = Arc::new(readings(options.devices, options.readings));
    let live = Arc::new(readings(options.devices, options.readings / 2));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let mappings = mappings();
    let mut drains = Vec::new();
    let mut expected = Events::new();
    let mut creation = [0.0; 3];
    for &n in &options.instances {
        let (row, events, took) = runtime.block_on(drain(n, &mappings, &all));
        (expected, creation) = (events, took);
        drains.push(row);
    }
    // With 2 s leases the survivors may never settle (see the note printed then); the default
    // TTL gives the handover's figures in that case.
    let mut handovers = vec![runtime.block_on(handover(
        &mappings,
        live.clone(),
        HANDOVER_LEASE,
        Duration::from_secs(30),
    ))];
    if handovers[0].served.is_none() {
        handovers.push(runtime.block_on(handover(
            &mappings,
            live,
            FALLBACK_LEASE,
            Duration::from_secs(60),
        )));
    }

    let total = all.len() as f64;
    println!(
        "\ncluster bench: nats-server 2.9.10 and weir on {} cores, loopback; {} readings of {} devices, {PARTITIONS} partitions; {} overheat events (= weir replay, {:.2} per reading)",
        std::thread::available_parallelism().map_or(0, usize::from),
        all.len(),
        options.devices,
        count(&expected),
        count(&expected) as f64 / total,
    );
    println!(
        "\n1. Backlog drain (settled instances SIGSTOPped, stream filled, SIGCONT until every instance read all {} with lag 0 and the output stream holds every event); lease_ttl {DRAIN_LEASE}, snapshot every 5 s",
        all.len()
    );
    println!("| instances | joined and settled | fill (JetStream publish, acks) | drain | readings/s | weir CPU us/reading, each | weir, all | nats-server CPU us/reading | consumers remade | events = replay |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for row in &drains {
        let each: Vec<String> = row.weir_us.iter().map(|us| format!("{us:.1}")).collect();
        println!(
            "| {} | {:.1} s | {:.1} s ({:.0}/s) | {:.2} s | {:.0} | {} | {:.1} | {:.1} | {} | {} |",
            row.instances,
            row.settled,
            row.fill,
            total / row.fill,
            row.seconds,
            total / row.seconds,
            each.join(", "),
            row.weir_us.iter().sum::<f64>(),
            row.nats_us,
            row.consumer_restarts,
            if row.exact { "yes" } else { "NO" },
        );
    }
    if drains.iter().any(|row| row.consumer_restarts > 0) {
        // Seen on this machine: the same 3-instance drain took 5.4 s with none and 8.2 s
        // with two, so such a row times the stop as much as the reading.
        println!("(consumers remade: an instance's stream consumer failed after SIGCONT, its heartbeats missed during the stop, and weir made a new one; that row's drain includes the failure and the new consumer)");
    }
    println!(
        "consumer creation on the stream of {} readings, idle server (a term start makes one per partition it owns): filter weir.0.> from the first {:.3} s, from the last {:.3} s; no filter {:.3} s",
        all.len(),
        creation[0],
        creation[1],
        creation[2]
    );

    let show = |t: Option<f64>, within: &str| {
        t.map_or(format!("not within {within}"), |t| format!("{t:.2} s"))
    };
    println!(
        "\n2. Handover: 3 instances, snapshot every 1 s, {} readings published live at {LIVE_RATE:.0}/s, one SIGKILLed halfway",
        handovers[0].live
    );
    println!("| lease_ttl | SIGKILL -> owners bucket: survivors hold all 64 | -> survivors serve all 64 (/api/cluster) | terms started since the kill, each survivor | the first one's start (weir log) | events = replay |");
    println!("|---|---|---|---|---|---|");
    for h in &handovers {
        let within = if h.lease == HANDOVER_LEASE {
            "30 s"
        } else {
            "60 s"
        };
        let terms: Vec<String> = h.survivors.iter().map(|s| s.terms.to_string()).collect();
        let starts: Vec<String> = h
            .survivors
            .iter()
            .map(|s| {
                s.first_start
                    .map_or("-".to_owned(), |t| format!("{t:.2} s"))
            })
            .collect();
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            h.lease,
            show(h.claimed, within),
            show(h.served, within),
            terms.join(", "),
            starts.join(", "),
            match h.exact {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "not compared",
            }
        );
    }
    if handovers[0].served.is_none() {
        println!(
            "lease_ttl {HANDOVER_LEASE} did not settle within the bound; rerun with lease_ttl {FALLBACK_LEASE}"
        );
    }
    println!("| lease_ttl | survivor | last term read (its log) | replayed readings (last term's catch-up) | replay seconds | replay readings/s | lease renewals failed |");
    println!("|---|---|---|---|---|---|---|");
    for h in handovers.iter().filter(|h| h.served.is_some()) {
        for s in &h.survivors {
            println!(
                "| {} | {} | {} | {:.0} | {:.3} | {:.0} | {:.0} |",
                h.lease,
                s.name,
                s.reading,
                s.replayed,
                s.replay_seconds,
                s.replayed / s.replay_seconds.max(1e-9),
                s.renew_failures
            );
        }
    }
    let h = handovers.last().expect("a handover");
    println!(
        "\n3. Snapshots (lease_ttl {}, before the kill): {:.0} bytes over {:.0} partitions = {:.0} bytes per partition, {:.0} bytes per device ({} devices)",
        h.lease,
        h.state_bytes,
        h.partitions_owned,
        h.state_bytes / h.partitions_owned.max(1.0),
        h.state_bytes / options.devices as f64,
        options.devices
    );
    if drains.iter().any(|row| !row.exact) || handovers.iter().any(|h| h.exact == Some(false)) {
        eprintln!("FAILED: the output stream's events differ from what weir replay derives");
        std::process::exit(1);
    }
    if handovers.iter().all(|h| h.served.is_none()) {
        eprintln!("FAILED: the survivors never served all partitions after the SIGKILL");
        std::process::exit(1);
    }
}
