//! Shared harness for the integration tests: a real Mosquitto per test, rumqttc test clients,
//! weir started in-process, a raw HTTP GET, and a deadline-bound poll helper. Nothing here mocks
//! MQTT, and nothing skips: a missing tool fails the test with the package that provides it.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

// Reads NATS streams and buckets with async-nats (`cluster` feature).
#[cfg(feature = "cluster")]
pub mod cluster;
pub mod nats;
pub mod proxy;
pub mod services;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, SubscribeReasonCode};
use std::fs::File;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

/// How long any awaited condition may take before the test fails. Generous on purpose: a slow
/// CI machine should pass; nothing here measures speed.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// How long a negative check ("no further message") waits after the last expected one.
pub const GRACE: Duration = Duration::from_millis(500);

/// The canonical scenario file; tests load it as shipped.
pub const EXAMPLE_CONFIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/example.toml");

/// An event time aligned to a 10 s window boundary (1732600000000 % 10000 == 0).
pub const T0: i64 = 1_732_600_000_000;

const MOSQUITTO: &str = "/usr/sbin/mosquitto";

/// Fails the test because `program` is not installed, naming the Debian package that provides
/// it. A test that passed without its prerequisite would prove nothing, so none does.
pub fn not_installed(program: &str, package: &str) -> ! {
    panic!(
        "{program} is not installed: install the Debian package `{package}` \
         (`apt-get install {package}`; .ci/run installs everything the tests need)"
    )
}

/// The mosquitto binary, or a failed test saying how to install it.
fn require_mosquitto() {
    if !Path::new(MOSQUITTO).exists() {
        not_installed(MOSQUITTO, "mosquitto");
    }
}

/// A name unique within this test run: `tag-pid-n`.
pub fn unique(tag: &str) -> String {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{tag}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A fresh, empty directory under the system temp dir, removed with its contents when dropped.
///
/// Dropping is what cleans up on every path: a failed assertion unwinds through the test and
/// drops it too, where a `remove_dir_all` at the end of the test would never run. Keep it in a
/// variable for as long as the directory is used: `temp_dir("x").join("f")` would drop it (and
/// remove the directory) at the end of that statement.
#[must_use = "the directory is removed when this is dropped"]
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl std::ops::Deref for TempDir {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TempDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A fresh, empty directory under the system temp dir (`weir-test-TAG-PID-N`); see [`TempDir`].
pub fn temp_dir(tag: &str) -> TempDir {
    let dir = std::env::temp_dir().join(unique(&format!("weir-test-{tag}")));
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|err| panic!("cannot create {}: {err}", dir.display()));
    TempDir(dir)
}

/// A child process killed (SIGKILL) and reaped when dropped, so a failing test leaves no
/// process behind; `std::process::Child` alone lets it run on.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A loopback port that was free a moment ago (bound to port 0, then released).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes; returns whether it held.
/// Use with `assert!(wait_until(..).await, "what we waited for")`.
pub async fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One MQTT broker on 127.0.0.1, owned by one test. Killed (and its temp dir removed) on drop.
///
/// Always Mosquitto: the tests claim behaviour against a real broker (restarts, persistence,
/// MQTT 5, TLS, password files), which an in-process stand-in could not show.
pub struct Mosquitto {
    port: u16,
    /// Config, log and persistence; also the scratch space of configs made for this broker
    /// ([`example_config`]'s state dir), so it all goes when the broker does.
    dir: TempDir,
    child: Option<Child>,
    /// Keeps sessions and queued QoS 1 messages across a graceful restart (persistence file).
    persistent: bool,
    /// Lines appended to the generated mosquitto.conf (see [`Mosquitto::start_with`]).
    extra: String,
}

impl Mosquitto {
    /// Starts a broker on a free loopback port and returns once the port accepts TCP.
    pub fn start() -> Self {
        Self::start_with("")
    }

    /// Starts Mosquitto with `extra` appended to the generated config, after the anonymous
    /// plain listener on [`port`](Self::port) that the test clients use: e.g. a second
    /// `listener PORT 127.0.0.1` with TLS settings, or a global `password_file`.
    pub fn start_with(extra: &str) -> Self {
        require_mosquitto();
        Self::spawn_with(temp_dir("mosquitto"), extra.to_owned())
    }

    fn spawn_with(dir: TempDir, extra: String) -> Self {
        // The port may be taken between probing and binding; try a few.
        for _ in 0..5 {
            let port = free_port();
            if let Some(child) = spawn_mosquitto(&dir, port, false, &extra) {
                return Self {
                    port,
                    dir,
                    child: Some(child),
                    persistent: false,
                    extra,
                };
            }
        }
        panic!(
            "mosquitto did not start after 5 attempts; see {}",
            dir.join("mosquitto.log").display()
        );
    }

    /// A mosquitto with persistence on `port`, so persistent sessions and their queued QoS 1
    /// messages survive a graceful restart ([`terminate`](Self::terminate)).
    pub fn start_persistent_on(port: u16) -> Self {
        require_mosquitto();
        let dir = temp_dir("mosquitto");
        let child = spawn_mosquitto(&dir, port, true, "")
            .unwrap_or_else(|| panic!("mosquitto did not start on port {port}"));
        Self {
            port,
            dir,
            child: Some(child),
            persistent: true,
            extra: String::new(),
        }
    }

    /// Stops the broker gracefully (SIGTERM: a persistent broker saves its sessions) and waits.
    pub fn terminate(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let _ = child.wait();
        }
    }

    /// Starts the broker again on the same port after [`terminate`](Self::terminate).
    pub fn start_again(&mut self) {
        let child = spawn_mosquitto(&self.dir, self.port, self.persistent, &self.extra)
            .unwrap_or_else(|| panic!("mosquitto did not restart on port {}", self.port));
        self.child = Some(child);
    }

    /// A path (not yet created) inside this broker's temp dir, removed with it: for what a
    /// config needs as long as the broker serves it, such as weir's state dir.
    pub fn scratch(&self, tag: &str) -> PathBuf {
        self.dir.join(unique(tag))
    }

    /// What Mosquitto logged so far, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("mosquitto.log")).unwrap_or_default()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `mqtt://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// Kills the broker (SIGKILL, like a crash) and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the broker again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        let child = spawn_mosquitto(&self.dir, self.port, self.persistent, &self.extra)
            .unwrap_or_else(|| {
                panic!(
                    "mosquitto did not restart on port {}; see {}",
                    self.port,
                    self.dir.join("mosquitto.log").display()
                )
            });
        self.child = Some(child);
    }
}

/// Runs mosquitto on 127.0.0.1:`port` with a generated config (plus `extra` lines) in `dir`;
/// `None` if it exited before accepting connections (port taken).
fn spawn_mosquitto(dir: &Path, port: u16, persistent: bool, extra: &str) -> Option<Child> {
    let conf = dir.join("mosquitto.conf");
    let persistence = if persistent {
        // Run as root, mosquitto drops to its own user before saving; let it write here.
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777));
        format!(
            "persistence true\npersistence_location {}/\nmax_queued_messages 100000\n",
            dir.display()
        )
    } else {
        "persistence false\n".to_owned()
    };
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\n{persistence}log_dest stderr\n{extra}"
        ),
    )
    .expect("write mosquitto.conf");
    let log = File::options()
        .create(true)
        .append(true)
        .open(dir.join("mosquitto.log"))
        .expect("open mosquitto.log");
    let mut child = Command::new(MOSQUITTO)
        .arg("-c")
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("clone log handle"))
        .stderr(log)
        .spawn()
        .unwrap_or_else(|err| panic!("cannot run {MOSQUITTO}: {err}"));
    if wait_for_port(port, Some(&mut child)) {
        Some(child)
    } else {
        let _ = child.kill();
        let _ = child.wait();
        None
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // `dir` is removed after this, when the fields drop: the broker is gone by then.
    }
}

/// Waits until 127.0.0.1:`port` accepts TCP; false if `child` exits first. Blocking, but only
/// for the broker's start-up (milliseconds), and tests run on a multi-threaded runtime.
fn wait_for_port(port: u16, mut child: Option<&mut Child>) -> bool {
    let deadline = Instant::now() + DEADLINE;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    while Instant::now() < deadline {
        if let Some(child) = child.as_deref_mut() {
            if !matches!(child.try_wait(), Ok(None)) {
                return false;
            }
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("the broker did not accept connections on {addr} within {DEADLINE:?}");
}

fn client_options(port: u16, tag: &str) -> MqttOptions {
    let mut options = MqttOptions::new(unique(tag), "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(5));
    options.set_max_packet_size(1024 * 1024, 1024 * 1024);
    options
}

/// A message seen by a [`Subscriber`].
#[derive(Debug, Clone)]
pub struct Message {
    pub topic: String,
    pub payload: Vec<u8>,
}

impl Message {
    /// The payload as JSON; panics (failing the test) when it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.payload).unwrap_or_else(|err| {
            panic!(
                "payload on {} is not JSON ({err}): {}",
                self.topic,
                String::from_utf8_lossy(&self.payload)
            )
        })
    }
}

/// A test client subscribed (QoS 1) to one filter, collecting every message into a channel.
///
/// It does not resubscribe after losing the broker; create a new one after a broker restart.
pub struct Subscriber {
    rx: mpsc::UnboundedReceiver<Message>,
    _client: AsyncClient,
    task: JoinHandle<()>,
}

impl Subscriber {
    /// Connects, subscribes and returns once the broker has acknowledged the subscription.
    pub async fn start(broker: &Mosquitto, filter: &str) -> Self {
        let (client, mut eventloop) = AsyncClient::new(client_options(broker.port(), "sub"), 64);
        let (tx, rx) = mpsc::unbounded_channel();
        let (ack_tx, ack_rx) = oneshot::channel();
        client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .expect("queue the subscribe request");
        // rumqttc only makes progress (keep-alives included) while its event loop is polled.
        let task = tokio::spawn(async move {
            let mut ack_tx = Some(ack_tx);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(publish))) => {
                        let _ = tx.send(Message {
                            topic: publish.topic,
                            payload: publish.payload.to_vec(),
                        });
                    }
                    Ok(Event::Incoming(Packet::SubAck(ack))) => {
                        if let Some(ack_tx) = ack_tx.take() {
                            let _ = ack_tx.send(ack.return_codes);
                        }
                    }
                    Ok(_) => {}
                    // rumqttc reconnects on the next poll at once; do not spin while the broker is away.
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        });
        let codes = tokio::time::timeout(DEADLINE, ack_rx)
            .await
            .unwrap_or_else(|_| panic!("no SubAck for {filter} within {DEADLINE:?}"))
            .expect("subscriber task ended");
        assert!(
            codes
                .iter()
                .all(|code| !matches!(code, SubscribeReasonCode::Failure)),
            "the broker refused the subscription to {filter}: {codes:?}"
        );
        Self {
            rx,
            _client: client,
            task,
        }
    }

    /// The next message, or `None` if none arrives within `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> Option<Message> {
        tokio::time::timeout(timeout, self.rx.recv())
            .await
            .ok()
            .flatten()
    }

    /// Exactly the next `n` messages, all within [`DEADLINE`]; fails the test with what did arrive
    /// otherwise.
    pub async fn take(&mut self, n: usize) -> Vec<Message> {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        let mut messages = Vec::with_capacity(n);
        while messages.len() < n {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(message)) => messages.push(message),
                _ => panic!(
                    "expected {n} messages within {DEADLINE:?}, got {}: {:#?}",
                    messages.len(),
                    messages
                        .iter()
                        .map(|m| (m.topic.clone(), String::from_utf8_lossy(&m.payload)))
                        .collect::<Vec<_>>()
                ),
            }
        }
        messages
    }

    /// Fails the test if any message arrives within [`GRACE`]. A negative check: call it only
    /// after the input that could have caused the message was processed.
    pub async fn assert_quiet(&mut self) {
        if let Some(extra) = self.next(GRACE).await {
            panic!(
                "unexpected message on {}: {}",
                extra.topic,
                String::from_utf8_lossy(&extra.payload)
            );
        }
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A test client that publishes at QoS 1 and waits for each PubAck, so a returned `publish`
/// means the broker has the message (and per-client order is kept).
pub struct Publisher {
    client: AsyncClient,
    acks: watch::Receiver<usize>,
    sent: usize,
    task: JoinHandle<()>,
}

impl Publisher {
    /// Connects and returns once the broker has accepted the connection.
    pub async fn start(broker: &Mosquitto) -> Self {
        Self::start_on(broker.port()).await
    }

    /// As [`start`](Self::start), to any MQTT server on loopback port `port` (the NATS
    /// server's MQTT listener).
    pub async fn start_on(port: u16) -> Self {
        let (client, mut eventloop) = AsyncClient::new(client_options(port, "pub"), 64);
        let (acks_tx, acks) = watch::channel(0usize);
        let (conn_tx, conn_rx) = oneshot::channel();
        let task = tokio::spawn(async move {
            let mut conn_tx = Some(conn_tx);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        if let Some(conn_tx) = conn_tx.take() {
                            let _ = conn_tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        acks_tx.send_modify(|n| *n += 1);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        });
        tokio::time::timeout(DEADLINE, conn_rx)
            .await
            .unwrap_or_else(|_| panic!("no ConnAck within {DEADLINE:?}"))
            .expect("publisher task ended");
        Self {
            client,
            acks,
            sent: 0,
            task,
        }
    }

    /// Publishes at QoS 1 and waits for the broker's PubAck.
    pub async fn publish(&mut self, topic: &str, payload: impl Into<Vec<u8>>) {
        assert!(
            self.try_publish(topic, payload, DEADLINE).await,
            "no PubAck for a publish to {topic} within {DEADLINE:?}"
        );
    }

    /// Publishes at QoS 1 and waits up to `within` for its PubAck; false if none came (the
    /// publisher should then be dropped: later acks would be counted against later publishes).
    pub async fn try_publish(
        &mut self,
        topic: &str,
        payload: impl Into<Vec<u8>>,
        within: Duration,
    ) -> bool {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.into())
            .await
            .expect("queue the publish request");
        self.sent += 1;
        let sent = self.sent;
        matches!(
            tokio::time::timeout(within, self.acks.wait_for(|acked| *acked >= sent)).await,
            Ok(Ok(_))
        )
    }

    /// Publishes at QoS 1 with up to `in_flight` publishes not yet acknowledged, for replaying
    /// many readings quickly; per-client order is kept. Call [`flush`](Self::flush) at the end.
    pub async fn publish_pipelined(
        &mut self,
        topic: &str,
        payload: impl Into<Vec<u8>>,
        retain: bool,
        in_flight: usize,
    ) {
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, payload.into())
            .await
            .expect("queue the publish request");
        self.sent += 1;
        let floor = self.sent.saturating_sub(in_flight);
        tokio::time::timeout(DEADLINE, self.acks.wait_for(|acked| *acked >= floor))
            .await
            .unwrap_or_else(|_| panic!("no PubAck for a publish to {topic} within {DEADLINE:?}"))
            .expect("publisher task ended");
    }

    /// Waits until the broker acknowledged every publish so far.
    pub async fn flush(&mut self) {
        let sent = self.sent;
        tokio::time::timeout(DEADLINE, self.acks.wait_for(|acked| *acked >= sent))
            .await
            .unwrap_or_else(|_| panic!("publishes not all acknowledged within {DEADLINE:?}"))
            .expect("publisher task ended");
    }

    /// Publishes one reading of the reference scenario for `site`/`device`.
    pub async fn reading(&mut self, site: &str, device: &str, payload: serde_json::Value) {
        self.publish(&telemetry_topic(site, device), payload.to_string())
            .await;
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The input topic of the reference scenario.
pub fn telemetry_topic(site: &str, device: &str) -> String {
    format!("sensors/{site}/{device}/telemetry")
}

/// `config/example.toml` pointed at `broker`, /metrics on a free port, a fresh state dir, and a
/// client id of its own so concurrent tests never share a session.
///
/// The state dir is [`Mosquitto::scratch`]: a config has no owner to remove it, and the broker
/// outlives the weir it serves.
pub fn example_config(broker: &Mosquitto, tag: &str) -> weir::config::Config {
    let overrides = weir::config::Overrides {
        broker_url: Some(broker.url()),
        metrics_addr: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
        state_dir: Some(broker.scratch(&format!("state-{tag}"))),
        ..weir::config::Overrides::default()
    };
    let mut config = weir::config::load(Path::new(EXAMPLE_CONFIG), &overrides)
        .unwrap_or_else(|err| panic!("{err}"));
    config.broker.client_id = unique(&format!("weir-{tag}"));
    config
}

/// A config file of the repository (path relative to the crate root) pointed at `broker`, like
/// [`example_config`].
pub fn config_at(broker: &Mosquitto, path: &str, tag: &str) -> weir::config::Config {
    let overrides = weir::config::Overrides {
        broker_url: Some(broker.url()),
        metrics_addr: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
        state_dir: None,
        ..weir::config::Overrides::default()
    };
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    let mut config = weir::config::load(&path, &overrides).unwrap_or_else(|err| panic!("{err}"));
    config.broker.client_id = unique(&format!("weir-{tag}"));
    config
}

/// Starts weir in-process against `broker` and returns once it is connected and subscribed.
pub async fn start_weir(broker: &Mosquitto, tag: &str) -> weir::app::Running {
    start_weir_with(example_config(broker, tag)).await
}

/// Starts weir in-process with `config` and returns once it is connected and subscribed.
pub async fn start_weir_with(config: weir::config::Config) -> weir::app::Running {
    let running = weir::app::start(config)
        .await
        .unwrap_or_else(|err| panic!("weir did not start: {err:#}"));
    let metrics = running.metrics.clone();
    assert!(
        wait_until(DEADLINE, || metrics.is_ready()).await,
        "weir did not connect and subscribe within {DEADLINE:?}"
    );
    running
}

/// The example config in at_most_once mode without a state dir (a clean session, QoS 0).
pub fn at_most_once_config(broker: &Mosquitto, tag: &str) -> weir::config::Config {
    let mut config = example_config(broker, tag);
    config.delivery.mode = weir::config::DeliveryMode::AtMostOnce;
    config.delivery.state_dir = None;
    config.broker.clean_session = true;
    config
}

/// A config parsed from `text` and pointed at `broker` like [`example_config`]: for tests whose
/// scenario needs rules the example does not have.
pub fn config_from_text(broker: &Mosquitto, text: &str, tag: &str) -> weir::config::Config {
    let overrides = weir::config::Overrides {
        broker_url: Some(broker.url()),
        metrics_addr: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
        state_dir: None,
        ..weir::config::Overrides::default()
    };
    let mut config = weir::config::parse(text, Path::new("test.toml"), &overrides)
        .unwrap_or_else(|err| panic!("{err}"));
    config.broker.client_id = unique(&format!("weir-{tag}"));
    config
}

/// As [`start_weir`], with the config in `text`.
pub async fn start_weir_from_text(broker: &Mosquitto, text: &str, tag: &str) -> weir::app::Running {
    start_weir_with(config_from_text(broker, text, tag)).await
}

/// GET `path` over a raw HTTP/1.0 connection: (status, body).
///
/// # Errors
/// The connection failed or the response was not HTTP.
pub async fn try_http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    try_http(addr, "GET", path).await
}

/// POST `path` with an empty body: (status, body), failing the test on a connection error.
pub async fn http_post(addr: SocketAddr, path: &str) -> (u16, String) {
    try_http(addr, "POST", path)
        .await
        .unwrap_or_else(|err| panic!("POST http://{addr}{path} failed: {err}"))
}

/// One request with an empty body over a raw HTTP/1.0 connection: (status, body).
async fn try_http(addr: SocketAddr, method: &str, path: &str) -> std::io::Result<(u16, String)> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let request =
            format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: 0\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let response = tokio::time::timeout(DEADLINE, exchange)
        .await
        .map_err(|_| std::io::Error::other(format!("{method} {path} timed out")))??;
    let text = String::from_utf8(response).map_err(std::io::Error::other)?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("no header end in: {text:?}")))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status in: {head:?}")))?;
    Ok((status, body.to_owned()))
}

/// As [`try_http_get`], failing the test on a connection error.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    try_http_get(addr, path)
        .await
        .unwrap_or_else(|err| panic!("GET http://{addr}{path} failed: {err}"))
}

/// Checks an exposition with `promtool check metrics`; fails when promtool (Debian package
/// `prometheus`) is not installed.
pub fn promtool_check(body: &str) {
    use std::io::Write;
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            not_installed("promtool", "prometheus")
        }
        Err(err) => panic!("cannot run promtool: {err}"),
    };
    child
        .stdin
        .take()
        .expect("promtool stdin")
        .write_all(body.as_bytes())
        .expect("write to promtool");
    let output = child.wait_with_output().expect("wait for promtool");
    assert!(
        output.status.success(),
        "promtool check metrics failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Polls the async `cond` every 50 ms until it holds or `timeout` passes; returns whether it held.
pub async fn eventually<F, Fut>(timeout: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One Server-Sent Event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SseEvent {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: String,
}

/// A client of a Server-Sent Events endpoint over a raw HTTP/1.0 connection (so the body is
/// plain, not chunked).
pub struct SseClient {
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::net::TcpStream>>,
}

impl SseClient {
    /// Connects and returns once the response headers arrived; `Err((status, body))` when the
    /// server answered something other than 200.
    pub async fn connect(addr: SocketAddr, path: &str) -> Result<Self, (u16, String)> {
        use tokio::io::AsyncBufReadExt;
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .unwrap_or_else(|err| panic!("connect to {addr}: {err}"));
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await
            .expect("send the request");
        let mut lines = tokio::io::BufReader::new(stream).lines();
        let status_line = next_line(&mut lines).await;
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("no status in {status_line:?}"));
        loop {
            let line = next_line(&mut lines).await;
            if line.is_empty() {
                break;
            }
        }
        if status != 200 {
            let mut body = String::new();
            while let Ok(Some(line)) = lines.next_line().await {
                body.push_str(&line);
            }
            return Err((status, body));
        }
        Ok(Self { lines })
    }

    /// The next event with data (keep-alive comments skipped), or `None` within `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> Option<SseEvent> {
        let lines = &mut self.lines;
        tokio::time::timeout(timeout, async move {
            let mut event = SseEvent::default();
            let mut has_data = false;
            loop {
                let line = lines.next_line().await.ok()??;
                if line.is_empty() {
                    if has_data {
                        return Some(event);
                    }
                    event = SseEvent::default();
                    continue;
                }
                let (field, value) = line.split_once(':').unwrap_or((&line, ""));
                let value = value.strip_prefix(' ').unwrap_or(value);
                match field {
                    "id" => event.id = Some(value.to_owned()),
                    "event" => event.event = Some(value.to_owned()),
                    "data" => {
                        if has_data {
                            event.data.push('\n');
                        }
                        event.data.push_str(value);
                        has_data = true;
                    }
                    _ => {}
                }
            }
        })
        .await
        .ok()
        .flatten()
    }
}

/// The next line of a response within [`DEADLINE`]; "" at its end.
async fn next_line(
    lines: &mut tokio::io::Lines<tokio::io::BufReader<tokio::net::TcpStream>>,
) -> String {
    tokio::time::timeout(DEADLINE, lines.next_line())
        .await
        .unwrap_or_else(|_| panic!("no response line within {DEADLINE:?}"))
        .unwrap_or_else(|err| panic!("cannot read the response: {err}"))
        .unwrap_or_default()
}

/// Percent-encodes a query parameter value (everything but RFC 3986 unreserved characters).
pub fn percent_encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A real Prometheus (Debian package `prometheus`) on a free loopback port, scraping one target
/// every second, with its own temp dir for config and TSDB. Killed and removed on drop.
pub struct Prometheus {
    pub addr: SocketAddr,
    dir: TempDir,
    child: Child,
}

impl Prometheus {
    /// Starts Prometheus scraping `target` (job `weir`) with `rule_files` loaded, and returns
    /// once it is ready; fails the test when no `prometheus` binary is installed.
    pub async fn start(target: SocketAddr, rule_files: &[&Path]) -> Self {
        let installed = Command::new("prometheus")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success());
        if !installed {
            not_installed("prometheus", "prometheus");
        }
        let dir = temp_dir("prometheus");
        let rules: Vec<String> = rule_files
            .iter()
            .map(|path| format!("  - {}\n", path.display()))
            .collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n{}scrape_configs:\n  - job_name: weir\n    static_configs:\n      - targets: ['{target}']\n",
            rules.concat()
        );
        std::fs::write(dir.join("prometheus.yml"), config).expect("write prometheus.yml");
        for _ in 0..5 {
            let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let log = File::create(dir.join("prometheus.log")).expect("create prometheus.log");
            let mut child = Command::new("prometheus")
                .arg(format!(
                    "--config.file={}",
                    dir.join("prometheus.yml").display()
                ))
                .arg(format!("--web.listen-address={addr}"))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.join("data").display()
                ))
                .arg("--log.level=warn")
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("clone log handle"))
                .stderr(log)
                .spawn()
                .unwrap_or_else(|err| panic!("cannot run prometheus: {err}"));
            let deadline = Instant::now() + DEADLINE;
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                if matches!(try_http_get(addr, "/-/ready").await, Ok((200, _))) {
                    return Self { addr, dir, child };
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!(
            "prometheus did not become ready after 5 attempts; see {}",
            dir.join("prometheus.log").display()
        );
    }

    /// Runs an instant query through the HTTP API and returns the whole JSON answer (also when
    /// Prometheus reports an error, which carries `"status": "error"`).
    pub async fn query(&self, expr: &str) -> serde_json::Value {
        self.get(&format!("/api/v1/query?query={}", percent_encode(expr)))
            .await
    }

    /// GET `path` from the HTTP API as JSON.
    pub async fn get(&self, path: &str) -> serde_json::Value {
        let (status, body) = http_get(self.addr, path).await;
        serde_json::from_str(&body)
            .unwrap_or_else(|err| panic!("GET {path}: status {status}, not JSON ({err}): {body}"))
    }

    /// The server's log so far, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // `dir` (config and TSDB) is removed when the fields drop, after the process is gone.
    }
}

/// The ids of the events an uninterrupted run derives from `readings` (topic, payload), every one
/// arriving at `arrival_ms`: the same engine, in process, with no broker and no faults. The
/// oracle of the fault tests.
pub fn expected_ids(
    config: &weir::config::Config,
    readings: &[(String, Vec<u8>)],
    arrival_ms: i64,
) -> std::collections::BTreeSet<String> {
    let plan = std::sync::Arc::new(weir::engine::Plan::build(config).expect("plan"));
    let metrics = std::sync::Arc::new(weir::metrics::Metrics::new());
    let mut worker = weir::engine::Worker::new(plan, metrics);
    let mut out = Vec::new();
    for (lsn, (topic, payload)) in readings.iter().enumerate() {
        let message = weir::engine::RawMessage {
            input: 0,
            topic: topic.clone(),
            payload: payload.clone().into(),
            arrival: Instant::now(),
            arrival_ms,
            lsn: lsn as u64,
            trace: None,
        };
        worker.process(&message, &mut out);
    }
    out.iter()
        .map(|m| {
            let event: serde_json::Value = match m.headers.content_type.mime() {
                "application/cbor" => ciborium::from_reader(m.payload.as_slice()).expect("cbor"),
                _ => serde_json::from_slice(&m.payload).expect("json"),
            };
            event["id"].as_str().unwrap_or_default().to_owned()
        })
        .collect()
}

/// A blocking HTTP/1.0 GET of `path`: the whole response (status line included), or `None`
/// while nothing serves `addr` (a child weir starting).
pub fn http_get_blocking(addr: SocketAddr, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = TcpStream::connect(addr).ok()?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    Some(response)
}

/// `config/example.toml` with the overheat rule's output table (its first two lines) replaced
/// by `outputs`, and `extra` (sink tables, ...) appended: the sink tests' configs.
pub fn example_with_overheat_outputs(outputs: &str, extra: &str) -> String {
    const OVERHEAT_OUTPUT: &str =
        "[rules.overheat.output]\ntopic = \"alerts/{site}/{device}/overheat\"";
    let example = std::fs::read_to_string(EXAMPLE_CONFIG).expect("read example");
    assert!(
        example.contains(OVERHEAT_OUTPUT),
        "the example's overheat output changed"
    );
    format!("{}\n{extra}", example.replace(OVERHEAT_OUTPUT, outputs))
}

/// Readings of `device` at steps `from..from + n`, one a second, alternately 35.0 and 20.0:
/// each crosses the overheat thresholds, so each makes one alert.
pub fn crossings(device: &str, from: usize, n: usize) -> Vec<(String, Vec<u8>)> {
    (from..from + n)
        .map(|step| {
            let payload = serde_json::json!({
                "ts": T0 + step as i64 * 1000,
                "seq": step,
                "temperature": if step % 2 == 0 { 35.0 } else { 20.0 },
            });
            (
                telemetry_topic("plant-1", device),
                payload.to_string().into_bytes(),
            )
        })
        .collect()
}

/// Publishes `readings` in order at QoS 1 through a publisher of its own.
pub async fn publish_all(broker: &Mosquitto, readings: &[(String, Vec<u8>)]) {
    let mut publisher = Publisher::start(broker).await;
    for (topic, payload) in readings {
        publisher.publish(topic, payload.clone()).await;
    }
}
