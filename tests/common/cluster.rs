//! A weir cluster under test: the example config with `[cluster]` on one NATS server or a
//! routed set of them, `weir run` processes as cluster members, and reads of what NATS holds
//! (the output stream, the owners bucket) to check them against `weir replay`.

use super::nats::NatsServer;
use super::{temp_dir, Publisher, T0};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// Where a cluster's members and devices reach NATS.
pub trait Hub {
    /// Every server's client URL.
    fn urls(&self) -> Vec<String>;
    /// The MQTT listener devices publish to (and weir's MQTT sink uses).
    fn mqtt_port(&self) -> u16;
    /// Stream replicas `weir cluster init` asks for.
    fn replicas(&self) -> usize;
}

impl Hub for NatsServer {
    fn urls(&self) -> Vec<String> {
        vec![self.url()]
    }
    fn mqtt_port(&self) -> u16 {
        self.mqtt_port
    }
    fn replicas(&self) -> usize {
        1
    }
}

/// A routed NATS cluster (see [`NatsServer::start_cluster`]), reached over MQTT through one
/// chosen server, with streams replicated on all three.
pub struct Routed<'a> {
    pub servers: &'a [NatsServer],
    /// The server whose MQTT listener devices and weir's MQTT sink use.
    pub mqtt_via: usize,
}

impl Hub for Routed<'_> {
    fn urls(&self) -> Vec<String> {
        self.servers.iter().map(NatsServer::url).collect()
    }
    fn mqtt_port(&self) -> u16 {
        self.servers[self.mqtt_via].mqtt_port
    }
    fn replicas(&self) -> usize {
        self.servers.len()
    }
}

/// A NATS client of `hub`'s servers (any that answers).
pub async fn connect(hub: &impl Hub) -> async_nats::Client {
    let servers: Vec<async_nats::ServerAddr> = hub
        .urls()
        .iter()
        .map(|url| url.parse().expect("a NATS URL"))
        .collect();
    async_nats::connect(servers).await.expect("connect to NATS")
}

/// The example config with `[cluster]` on `server`, and the overheat rule's events going to the
/// NATS sink `hub` (the climate rollups stay on MQTT: the server's MQTT listener).
pub fn cluster_config(hub: &impl Hub, state_dir: Option<&Path>) -> String {
    let example = std::fs::read_to_string(super::EXAMPLE_CONFIG).expect("read example");
    let single = "[rules.overheat.output]\ntopic = \"alerts/{site}/{device}/overheat\"";
    assert!(
        example.contains(single),
        "the example's overheat output changed"
    );
    let mut text = example
        .replace("mode = \"at_least_once\"", "mode = \"at_most_once\"")
        .replace("clean_session = false", "clean_session = true")
        .replace("qos = 1\n", "qos = 0\n")
        .replace(
            &format!("{single}\nqos = 0"),
            "[rules.overheat.output]\nsink = \"hub\"\ntopic = \"alerts/{site}/{device}/overheat\"\nqos = 1",
        );
    text = text
        .lines()
        .filter(|line| !line.starts_with("state_dir"))
        .collect::<Vec<_>>()
        .join("\n");
    if let Some(dir) = state_dir {
        text = text.replace("[delivery]", &format!("[delivery]\nstate_dir = {dir:?}"));
    }
    text.replace(
        "url = \"mqtt://127.0.0.1:1883\"",
        &format!("url = \"mqtt://127.0.0.1:{}\"", hub.mqtt_port()),
    ) + &format!(
        "\n[cluster]\nservers = [{servers}]\npartitions = 16\nreplicas = {}\n\n[sinks.hub]\nkind = \"nats\"\nurl = \"{}\"\n",
        hub.replicas(),
        hub.urls().join(","),
        servers = hub.urls().iter().map(|url| format!("{url:?}")).collect::<Vec<_>>().join(", "),
    )
}

/// Runs the weir binary with `args` and the config file; fails the test on a non-zero exit.
pub fn weir(args: &[&str], config: &Path) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(args)
        .arg(config)
        .output()
        .expect("run weir");
    assert!(
        output.status.success(),
        "weir {args:?} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Readings of 6 devices crossing the overheat thresholds, one a second in event time.
pub fn readings() -> Vec<(String, serde_json::Value)> {
    fleet_readings(6, 12)
}

/// `steps` readings of each of `devices` devices, in rounds, crossing the overheat thresholds.
pub fn fleet_readings(devices: usize, steps: usize) -> Vec<(String, serde_json::Value)> {
    const TEMPERATURES: [f64; 6] = [25.0, 31.0, 29.0, 27.0, 33.0, 24.0];
    let mut readings = Vec::new();
    for step in 0..steps {
        for device in 0..devices {
            readings.push((
                super::telemetry_topic("plant-1", &format!("dev-{device}")),
                serde_json::json!({
                    "ts": T0 + step as i64 * 1000,
                    "seq": step,
                    "temperature": TEMPERATURES[(step + device) % TEMPERATURES.len()],
                    "humidity": 40.0,
                }),
            ));
        }
    }
    readings
}

/// Per device, the ids of the overheat events `weir replay` derives from `readings`, in order.
pub fn replayed(
    config: &Path,
    readings: &[(String, serde_json::Value)],
) -> BTreeMap<String, Vec<String>> {
    let input = config.with_file_name("readings.jsonl");
    let lines: Vec<String> = readings
        .iter()
        .map(|(topic, payload)| serde_json::json!({"topic": topic, "payload": payload}).to_string())
        .collect();
    std::fs::write(&input, lines.join("\n") + "\n").expect("write readings");
    let out = weir(
        &[
            "replay",
            "-i",
            input.to_str().expect("utf-8 path"),
            "--config",
        ],
        config,
    );
    let mut ids: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in out.lines() {
        let event: serde_json::Value = serde_json::from_str(line).expect("replay prints JSON");
        if event["payload"]["rule"] == "overheat" {
            ids.entry(
                event["payload"]["device"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
            .or_default()
            .push(
                event["payload"]["id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            );
        }
    }
    ids
}

/// Every message of the output stream: (Nats-Msg-Id, the event).
pub async fn output_stream(hub: &impl Hub) -> Vec<(String, serde_json::Value)> {
    try_output_stream(hub)
        .await
        .unwrap_or_else(|err| panic!("cannot read the output stream: {err}"))
}

/// As [`output_stream`]; an error while the stream has no leader (a server of a cluster died).
pub async fn try_output_stream(
    hub: &impl Hub,
) -> Result<Vec<(String, serde_json::Value)>, async_nats::Error> {
    let client = connect(hub).await;
    let jetstream = async_nats::jetstream::new(client);
    let stream = jetstream.get_stream("WEIR_EVENTS").await?;
    // Message by message, not through a consumer: an R1 consumer of a replicated stream may be
    // placed on a dead server by nats-server 2.9 (see src/cluster/state.rs).
    let state = stream.get_info().await?.state;
    let mut out = Vec::new();
    for sequence in state.first_sequence..=state.last_sequence {
        let message = match stream.get_raw_message(sequence).await {
            Ok(message) => message,
            Err(err)
                if err.kind()
                    == async_nats::jetstream::stream::RawMessageErrorKind::NoMessageFound =>
            {
                continue
            }
            Err(err) => return Err(err.into()),
        };
        let id = message
            .headers
            .get("Nats-Msg-Id")
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default();
        let event = serde_json::from_slice(&message.payload).expect("events are JSON");
        out.push((id, event));
    }
    Ok(out)
}

/// Asserts that the output stream holds exactly the `expected` events (per device, in order,
/// each once); on a mismatch the failure shows the instances' logs in `dir`.
pub fn assert_equals_replay(
    events: &[(String, serde_json::Value)],
    expected: &BTreeMap<String, Vec<String>>,
    dir: &Path,
    names: &[&str],
) {
    assert_eq!(
        &by_device(events),
        expected,
        "every event once, in per-device order\n{}",
        logs(dir, names)
    );
    let total: usize = expected.values().map(Vec::len).sum();
    assert_eq!(events.len(), total);
}

/// Per device, the event ids in the output stream, in stream order.
pub fn by_device(events: &[(String, serde_json::Value)]) -> BTreeMap<String, Vec<String>> {
    let mut ids: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (msg_id, event) in events {
        assert_eq!(
            event["id"].as_str(),
            Some(msg_id.as_str()),
            "Nats-Msg-Id is the event id"
        );
        ids.entry(event["device"].as_str().unwrap_or_default().to_owned())
            .or_default()
            .push(msg_id.clone());
    }
    ids
}

/// Starts a server whose mapping is what `weir cluster init` prints for the example's inputs.
pub fn server_for_example() -> NatsServer {
    NatsServer::start(&example_mappings())
}

/// The account mappings `weir cluster init` prints for the example's inputs and 16 partitions.
pub fn example_mappings() -> Vec<String> {
    // The mapping depends only on the inputs and the partition count; a first server is not
    // needed to learn it: `cluster init` prints it after creating the streams, so run it once
    // against a server without a mapping, then start the real one with it.
    let bootstrap = NatsServer::start(&[]);
    let dir = temp_dir("cluster-bootstrap");
    let config = dir.join("weir.toml");
    std::fs::write(&config, cluster_config(&bootstrap, None)).expect("write config");
    let printed = weir(&["cluster", "init", "--config"], &config);
    let mappings: Vec<String> = printed
        .lines()
        .filter(|line| line.starts_with("  \""))
        .map(|line| line.trim().to_owned())
        .collect();
    assert_eq!(
        mappings,
        [
            r#""sensors.*.*.telemetry": "weir.{{partition(16,2)}}.sensors.{{wildcard(1)}}.{{wildcard(2)}}.telemetry""#
        ],
        "{printed}"
    );
    mappings
}

/// A `weir run` process of a cluster, with its own config, state dir and HTTP port.
pub struct Instance {
    pub process: Option<super::KillOnDrop>,
    pub http_port: u16,
}

impl Instance {
    /// Writes `name`'s config (the cluster config, a 2 s lease, a snapshot a second) and starts
    /// `weir run` on it.
    pub fn start(hub: &impl Hub, dir: &Path, name: &str) -> Self {
        Self::start_with(hub, dir, name, Duration::from_secs(2))
    }

    /// As [`start`](Self::start), with leases of `lease_ttl`.
    pub fn start_with(hub: &impl Hub, dir: &Path, name: &str, lease_ttl: Duration) -> Self {
        let http_port = super::free_port();
        let state = dir.join(format!("state-{name}"));
        let text = cluster_config(hub, Some(&state))
            .replace("snapshot_interval = \"30s\"", "snapshot_interval = \"1s\"")
            .replace(
                "[cluster]\n",
                &format!(
                    "[cluster]\nmember = \"{name}\"\nlease_ttl = \"{}\"\n",
                    humantime::format_duration(lease_ttl)
                ),
            );
        let text = replace_listen(&text, http_port);
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(&config, text).expect("write config");
        let log = std::fs::File::create(dir.join(format!("{name}.log"))).expect("log");
        let child = Command::new(env!("CARGO_BIN_EXE_weir"))
            .args(["run", "--config"])
            .arg(&config)
            .env("RUST_LOG", "weir=info")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start weir run");
        Self {
            process: Some(super::KillOnDrop(child)),
            http_port,
        }
    }

    pub fn signal(&self, signal: &str) {
        let pid = self.process.as_ref().expect("running").0.id();
        self.signal_pid(pid, signal);
    }

    pub fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            let _ = process.0.kill();
            let _ = process.0.wait();
        }
    }

    /// SIGTERM, and wait for a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            self.signal_pid(process.0.id(), "TERM");
            let _ = process.0.wait();
        }
    }

    pub fn signal_pid(&self, pid: u32, signal: &str) {
        let _ = Command::new("kill")
            .args([&format!("-{signal}"), &pid.to_string()])
            .status();
    }

    /// A metric's value from `/metrics` (0 when absent).
    pub fn metric(&self, line_prefix: &str) -> f64 {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.http_port));
        let Some(body) = super::http_get_blocking(addr, "/metrics") else {
            return 0.0;
        };
        body.lines()
            .filter(|line| line.starts_with(line_prefix))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

pub fn replace_listen(text: &str, port: u16) -> String {
    text.lines()
        .map(|line| {
            if line.starts_with("listen = ") {
                format!("listen = \"127.0.0.1:{port}\"")
            } else {
                line.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The owners bucket: partition key -> member.
pub async fn owners(hub: &impl Hub) -> BTreeMap<String, String> {
    let client = connect(hub).await;
    let jetstream = async_nats::jetstream::new(client);
    let bucket = jetstream
        .get_key_value("weir_owners")
        .await
        .expect("owners");
    let mut owners = BTreeMap::new();
    for partition in 0..16 {
        let key = format!("p{partition}");
        if let Ok(Some(value)) = bucket.get(&key).await {
            owners.insert(key, String::from_utf8_lossy(&value).into_owned());
        }
    }
    owners
}

/// Waits until the 16 partitions are claimed by exactly `members`.
pub async fn wait_for_owners(
    hub: &impl Hub,
    members: &[&str],
    within: Duration,
) -> BTreeMap<String, String> {
    let deadline = std::time::Instant::now() + within;
    loop {
        let owners = owners(hub).await;
        let holders: std::collections::BTreeSet<&str> =
            owners.values().map(String::as_str).collect();
        if owners.len() == 16 && holders == members.iter().copied().collect() {
            return owners;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the partitions did not settle on {members:?}: {owners:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the output stream holds `total` events (or the deadline), and returns them.
pub async fn wait_for_output(
    hub: &impl Hub,
    total: usize,
    within: Duration,
) -> Vec<(String, serde_json::Value)> {
    let deadline = std::time::Instant::now() + within;
    loop {
        match try_output_stream(hub).await {
            Ok(events) if events.len() >= total => return events,
            Ok(events) if std::time::Instant::now() >= deadline => return events,
            Ok(_) => {}
            Err(err) => assert!(
                std::time::Instant::now() < deadline,
                "cannot read the output stream: {err}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

pub async fn publish_all(hub: &impl Hub, readings: &[(String, serde_json::Value)]) {
    let mut publisher = Publisher::start_on(hub.mqtt_port()).await;
    for (topic, payload) in readings {
        publisher
            .publish(topic, payload.to_string().into_bytes())
            .await;
    }
}

pub fn logs(dir: &Path, names: &[&str]) -> String {
    names
        .iter()
        .map(|name| {
            let log = std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            format!(
                "--- {name} (last lines) ---\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}
