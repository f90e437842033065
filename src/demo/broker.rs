//! The demo's embedded MQTT broker: rumqttd on a free loopback port, so `weir demo` needs no
//! broker installed.
//!
//! rumqttd has no shutdown API: the broker runs on its own threads until the process exits. Its
//! `[prometheus]` and `[console]` sections stay out of the config (the first installs a global
//! metrics recorder and opens another port), and its commit log is kept small, since the demo only
//! needs to hold what the pipeline has not read yet.

use anyhow::Context as _;
use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long [`EmbeddedBroker::start`] waits for the broker to answer before giving up.
const READY_TIMEOUT: Duration = Duration::from_secs(5);

/// Attempts at finding a port: another process can take the port between our probe bind and
/// rumqttd's bind, and then we try a fresh one.
const PORT_ATTEMPTS: usize = 3;

/// Largest publish the broker accepts; matches the 256 KiB the simulator and weir allow.
const MAX_PAYLOAD_BYTES: usize = 256 * 1024;

/// A running rumqttd, listening for MQTT 3.1.1 on `127.0.0.1:port` until the process exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmbeddedBroker {
    pub port: u16,
}

impl EmbeddedBroker {
    /// Starts rumqttd on a free loopback port and returns once it answers an MQTT CONNECT.
    ///
    /// Blocks for up to a few seconds; call it from `spawn_blocking` inside a runtime.
    ///
    /// # Errors
    /// No free port could be found, or the broker did not answer within five seconds.
    pub fn start() -> anyhow::Result<EmbeddedBroker> {
        let mut last_error = None;
        for _ in 0..PORT_ATTEMPTS {
            let port = free_loopback_port()?;
            match start_on(port) {
                Ok(broker) => return Ok(broker),
                Err(StartError::PortTaken(err)) => last_error = Some(err),
                Err(StartError::Fatal(err)) => return Err(err),
            }
        }
        Err(last_error
            .unwrap_or_else(|| anyhow::anyhow!("no attempt was made"))
            .context("could not start the embedded MQTT broker on a free loopback port"))
    }

    /// `mqtt://127.0.0.1:PORT`, the form `--broker` and `broker.url` take.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

enum StartError {
    /// The broker's listener stopped at once, most likely because the port was taken meanwhile.
    PortTaken(anyhow::Error),
    Fatal(anyhow::Error),
}

/// Asks the OS for a free port by binding port 0, then releases it for rumqttd to bind.
fn free_loopback_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .context("cannot bind a loopback port for the embedded broker")?;
    Ok(listener.local_addr()?.port())
}

fn start_on(port: u16) -> Result<EmbeddedBroker, StartError> {
    let config = broker_config(SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
    let (stopped_tx, stopped_rx) = mpsc::channel::<String>();
    std::thread::Builder::new()
        .name(format!("rumqttd-{port}"))
        .spawn(move || {
            // `Broker::new` spawns the router thread; `start` spawns the listener threads and
            // joins them, so it only returns when every listener has stopped (e.g. bind failed).
            let mut broker = Broker::new(config);
            let outcome = match broker.start() {
                Ok(()) => "its listener stopped".to_owned(),
                Err(err) => err.to_string(),
            };
            // The receiver is gone once the broker was reported ready; nothing to tell then.
            let _ = stopped_tx.send(outcome);
        })
        .map_err(|err| {
            StartError::Fatal(anyhow::Error::new(err).context("cannot spawn the broker thread"))
        })?;

    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Ok(reason) = stopped_rx.try_recv() {
            return Err(StartError::PortTaken(anyhow::anyhow!(
                "the embedded broker on 127.0.0.1:{port} stopped before accepting connections: {reason}"
            )));
        }
        match probe(port) {
            Ok(()) => {
                tracing::debug!(port, "embedded MQTT broker is ready");
                return Ok(EmbeddedBroker { port });
            }
            Err(err) if Instant::now() >= deadline => {
                return Err(StartError::Fatal(anyhow::anyhow!(
                    "the embedded broker on 127.0.0.1:{port} did not answer within {}s (last attempt: {err})",
                    READY_TIMEOUT.as_secs()
                )));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// rumqttd's configuration, built in code so the demo ships no config file.
fn broker_config(listen: SocketAddr) -> Config {
    let connections = ConnectionSettings {
        connection_timeout_ms: 60_000,
        max_payload_size: MAX_PAYLOAD_BYTES,
        // weir acknowledges QoS 1 readings after its group fsync: a deep window keeps intake full.
        max_inflight_count: 1000,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let server = ServerSettings {
        name: "weir-demo-v4".to_owned(),
        listen,
        tls: None,
        next_connection_delay_ms: 1,
        connections,
    };
    Config {
        id: 0,
        router: RouterConfig {
            max_connections: 10_000,
            max_outgoing_packet_count: 1000,
            // Per subscription filter: ten segments of 1 MiB hold about a hundred thousand
            // readings (seconds of demo traffic), bounded for a consumer that does not keep up.
            max_segment_size: 1024 * 1024,
            max_segment_count: 10,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("1".to_owned(), server)])),
        ..Config::default()
    }
}

/// One MQTT 3.1.1 CONNECT / CONNACK exchange, then DISCONNECT.
///
/// A bare TCP connect would do to see the port open, but rumqttd logs an error for every
/// connection that closes before sending CONNECT; a real handshake also proves that it is our
/// broker answering, not whatever else might have taken the port.
fn probe(port: u16) -> std::io::Result<()> {
    const CLIENT_ID: &[u8] = b"weir-demo-probe";
    let timeout = Duration::from_millis(500);
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&address, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;

    let mut connect = vec![0x10, (10 + 2 + CLIENT_ID.len()) as u8];
    // Protocol name "MQTT", level 4 (3.1.1), clean session, keep-alive 5 s.
    connect.extend_from_slice(&[0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x05]);
    connect.extend_from_slice(&[0x00, CLIENT_ID.len() as u8]);
    connect.extend_from_slice(CLIENT_ID);
    stream.write_all(&connect)?;

    let mut connack = [0u8; 4];
    stream.read_exact(&mut connack)?;
    if connack != [0x20, 0x02, 0x00, 0x00] {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("expected an accepting CONNACK, got {connack:02x?}"),
        ));
    }
    // Close without DISCONNECT: rumqttd logs a clean DISCONNECT from a client at error level
    // ("no-connection ... is already gone"), but a closed socket only at info.
    drop(stream);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

    #[test]
    fn url_names_the_loopback_port() {
        assert_eq!(
            EmbeddedBroker { port: 18_830 }.url(),
            "mqtt://127.0.0.1:18830"
        );
    }

    #[test]
    fn config_listens_on_loopback_only_without_metrics_or_console() {
        let config = broker_config(SocketAddr::from((Ipv4Addr::LOCALHOST, 1884)));
        let servers = config.v4.as_ref().expect("a v4 server");
        assert_eq!(servers.len(), 1);
        assert!(servers.values().all(|s| s.listen.ip().is_loopback()));
        assert!(config.prometheus.is_none() && config.console.is_none());
        assert!(config.v5.is_none() && config.ws.is_none() && config.bridge.is_none());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn embedded_broker_delivers_a_published_message_to_a_subscriber() {
        let broker = tokio::task::spawn_blocking(EmbeddedBroker::start)
            .await
            .expect("start task")
            .expect("broker starts");

        let mut options = MqttOptions::new("weir-broker-test", "127.0.0.1", broker.port);
        options.set_keep_alive(Duration::from_secs(5));
        let (client, mut eventloop) = AsyncClient::new(options, 10);

        let received = tokio::time::timeout(Duration::from_secs(10), async {
            let mut subscribed = false;
            loop {
                match eventloop.poll().await.expect("connection stays up") {
                    Event::Incoming(Packet::ConnAck(_)) => {
                        // try_*: never await on the client from the task that polls.
                        client
                            .try_subscribe("demo/test/#", QoS::AtLeastOnce)
                            .expect("subscribe");
                    }
                    Event::Incoming(Packet::SubAck(_)) if !subscribed => {
                        subscribed = true;
                        client
                            .try_publish("demo/test/hello", QoS::AtLeastOnce, false, "world")
                            .expect("publish");
                    }
                    Event::Incoming(Packet::Publish(publish)) => break publish,
                    _ => {}
                }
            }
        })
        .await
        .expect("the message comes back within 10 s");

        assert_eq!(received.topic, "demo/test/hello");
        assert_eq!(&received.payload[..], b"world");
    }
}
