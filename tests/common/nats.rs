//! A real `nats-server` per test (Debian package `nats-server`): JetStream with a store in a
//! temp dir, the MQTT listener devices publish to, and the partition mapping `weir cluster
//! init` prints, on free loopback ports. Killed and removed when dropped.

use super::{free_port, not_installed, temp_dir, KillOnDrop, TempDir};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// One nats-server with JetStream and an MQTT listener.
pub struct NatsServer {
    pub port: u16,
    pub mqtt_port: u16,
    dir: TempDir,
    child: Option<KillOnDrop>,
    config: PathBuf,
}

impl NatsServer {
    /// Starts a server whose account maps readings to partitions with `mappings` (lines as
    /// `weir cluster init` prints them: `"src": "dest"`).
    pub fn start(mappings: &[String]) -> Self {
        let server = Self::spawn(mappings, None);
        server.wait_ready();
        server
    }

    /// Starts three servers routed into one NATS cluster on loopback ports, each with
    /// JetStream and an MQTT listener (MQTT's own streams replicated 3 times), and waits until
    /// all three listen and JetStream has a meta leader.
    pub fn start_cluster(mappings: &[String]) -> Vec<Self> {
        let name = super::unique("weir-test");
        let routes: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let servers: Vec<Self> = routes
            .iter()
            .map(|&route| {
                Self::spawn(
                    mappings,
                    Some(Route {
                        name: name.clone(),
                        port: route,
                        peers: routes.clone(),
                    }),
                )
            })
            .collect();
        // Not before every server runs: a lone server waits for its peers to elect a leader.
        for server in &servers {
            server.wait_ready();
        }
        servers
    }

    fn spawn(mappings: &[String], route: Option<Route>) -> Self {
        let binary = nats_binary();
        let dir = temp_dir("nats");
        let (port, mqtt_port) = (free_port(), free_port());
        let config = dir.join("nats.conf");
        let store = dir.join("js");
        let (cluster, mqtt_replicas) = match &route {
            None => (String::new(), ""),
            Some(route) => (
                format!(
                    "cluster {{\n  name: {}\n  listen: 127.0.0.1:{}\n  routes: [{}]\n}}\n",
                    route.name,
                    route.port,
                    route
                        .peers
                        .iter()
                        .map(|p| format!("nats-route://127.0.0.1:{p}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                ", stream_replicas: 3",
            ),
        };
        let text = format!(
            "listen: 127.0.0.1:{port}\nserver_name: weir-test-{port}\njetstream {{ store_dir: {store:?} }}\nmqtt {{ listen: 127.0.0.1:{mqtt_port}{mqtt_replicas} }}\n{cluster}accounts {{\n  WEIR {{\n    jetstream: enabled\n    users: [{{user: weir, password: weir}}]\n    mappings: {{\n      {}\n    }}\n  }}\n}}\nno_auth_user: weir\n",
            mappings.join("\n      ")
        );
        std::fs::write(&config, text).expect("write nats.conf");
        let log = std::fs::File::create(dir.join("nats.log")).expect("nats log");
        let child = Command::new(&binary)
            .arg("-c")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start nats-server");
        Self {
            port,
            mqtt_port,
            dir,
            child: Some(KillOnDrop(child)),
            config,
        }
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        for port in [self.port, self.mqtt_port] {
            while TcpStream::connect(("127.0.0.1", port)).is_err() {
                assert!(
                    Instant::now() < deadline,
                    "nats-server did not listen on {port}:\n{}",
                    self.log()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("nats.log")).unwrap_or_default()
    }

    /// A path inside the server's temp dir, removed with it.
    pub fn scratch(&self, tag: &str) -> PathBuf {
        self.dir.join(super::unique(tag))
    }

    /// The config file the server runs with.
    pub fn config(&self) -> &PathBuf {
        &self.config
    }
}

/// A member's place in a routed NATS cluster.
struct Route {
    name: String,
    port: u16,
    peers: Vec<u16>,
}

impl NatsServer {
    /// SIGKILL: the server is gone at once, as in a power cut (its store dir stays until drop).
    pub fn kill(&mut self) {
        self.child.take();
    }

    /// The server's name in the cluster (`server_name`), as stream info reports leaders.
    pub fn name(&self) -> String {
        format!("weir-test-{}", self.port)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.child.take();
    }
}

fn nats_binary() -> PathBuf {
    for candidate in ["/usr/sbin/nats-server", "/usr/bin/nats-server"] {
        if std::path::Path::new(candidate).exists() {
            return candidate.into();
        }
    }
    match Command::new("nats-server").arg("--version").output() {
        Ok(_) => "nats-server".into(),
        Err(_) => not_installed("nats-server", "nats-server"),
    }
}
