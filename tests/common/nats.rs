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
        let binary = nats_binary();
        let dir = temp_dir("nats");
        let (port, mqtt_port) = (free_port(), free_port());
        let config = dir.join("nats.conf");
        let store = dir.join("js");
        let text = format!(
            "listen: 127.0.0.1:{port}\nserver_name: weir-test-{port}\njetstream {{ store_dir: {store:?} }}\nmqtt {{ listen: 127.0.0.1:{mqtt_port} }}\naccounts {{\n  WEIR {{\n    jetstream: enabled\n    users: [{{user: weir, password: weir}}]\n    mappings: {{\n      {}\n    }}\n  }}\n}}\nno_auth_user: weir\n",
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
        let server = Self {
            port,
            mqtt_port,
            dir,
            child: Some(KillOnDrop(child)),
            config,
        };
        server.wait_ready();
        server
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
