//! The machine's RabbitMQ and PostgreSQL, used through a vhost or a database of the test's own
//! (unique name, removed when dropped, also when the test fails), and a webhook receiver
//! written here: an HTTP/1.1 server on a free loopback port whose answer the test sets.

use super::{not_installed, unique};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

/// A RabbitMQ vhost of the test's own on 127.0.0.1:5672 (guest/guest), made with
/// `rabbitmqctl` and deleted when dropped.
pub struct Vhost {
    pub name: String,
}

impl Vhost {
    pub fn create(tag: &str) -> Self {
        let name = unique(&format!("weir-{tag}"));
        rabbitmqctl(&["add_vhost", &name]);
        rabbitmqctl(&["set_permissions", "-p", &name, "guest", ".*", ".*", ".*"]);
        Self { name }
    }

    /// `amqp://guest:guest@127.0.0.1:PORT/VHOST`.
    pub fn url(&self, port: u16) -> String {
        format!("amqp://guest:guest@127.0.0.1:{port}/{}", self.name)
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["delete_vhost", &self.name])
            .output();
    }
}

fn rabbitmqctl(args: &[&str]) {
    let output = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .unwrap_or_else(|_| not_installed("rabbitmqctl", "rabbitmq-server"));
    assert!(
        output.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A PostgreSQL database of the test's own on 127.0.0.1:5432 (trust auth, user postgres),
/// dropped (with its connections) when dropped.
pub struct Database {
    pub name: String,
}

impl Database {
    pub fn create(tag: &str) -> Self {
        let name = unique(&format!("weir_{tag}")).replace('-', "_");
        psql("postgres", &format!("CREATE DATABASE {name}"));
        Self { name }
    }

    /// `postgres://postgres@127.0.0.1:PORT/NAME`.
    pub fn url(&self, port: u16) -> String {
        format!("postgres://postgres@127.0.0.1:{port}/{}", self.name)
    }

    /// Runs `sql` in this database; returns the rows, `|`-separated, one per line.
    pub fn query(&self, sql: &str) -> String {
        psql(&self.name, sql)
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .args(["-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-c"])
            .arg(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .output();
    }
}

fn psql(database: &str, sql: &str) -> String {
    let output = Command::new("psql")
        .args(["-h", "127.0.0.1", "-U", "postgres", "-d", database])
        .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .output()
        .unwrap_or_else(|_| not_installed("psql", "postgresql-client"));
    assert!(
        output.status.success(),
        "psql {sql}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A request the webhook received.
#[derive(Debug, Clone)]
pub struct Request {
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// When it was read.
    pub at: std::time::Instant,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A webhook receiver: records every request, answers the status set with
/// [`Webhook::answer`] (200 at first; 0 never answers; 429 comes with `Retry-After: 1`).
pub struct Webhook {
    pub addr: SocketAddr,
    status: Arc<AtomicU16>,
    requests: Arc<Mutex<VecDeque<(u16, Request)>>>,
    stop: Arc<AtomicBool>,
}

impl Webhook {
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind webhook");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let status = Arc::new(AtomicU16::new(200));
        let requests = Arc::new(Mutex::new(VecDeque::new()));
        let stop = Arc::new(AtomicBool::new(false));
        {
            let (status, requests, stop) = (status.clone(), requests.clone(), stop.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let (status, requests) = (status.clone(), requests.clone());
                            thread::spawn(move || serve(stream, &status, &requests));
                        }
                        Err(_) => thread::sleep(Duration::from_millis(5)),
                    }
                }
            });
        }
        Self {
            addr,
            status,
            requests,
            stop,
        }
    }

    /// The status every following request gets.
    pub fn answer(&self, status: u16) {
        self.status.store(status, Ordering::SeqCst);
    }

    /// Every request so far, with the status it got (0: none).
    pub fn requests(&self) -> Vec<(u16, Request)> {
        self.requests.lock().unwrap().iter().cloned().collect()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for Webhook {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Serves one keep-alive connection: reads requests (Content-Length bodies), records them, and
/// answers each with the current status.
fn serve(stream: TcpStream, status: &AtomicU16, requests: &Mutex<VecDeque<(u16, Request)>>) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let mut writer = stream.try_clone().expect("clone stream");
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut headers = Vec::new();
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).unwrap_or(0) == 0 {
                return;
            }
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                headers.push((name.trim().to_owned(), value.trim().to_owned()));
            }
        }
        let length = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.parse::<usize>().ok())
            .unwrap_or(0);
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let answer = status.load(Ordering::SeqCst);
        requests.lock().unwrap().push_back((
            answer,
            Request {
                headers,
                body,
                at: std::time::Instant::now(),
            },
        ));
        if answer == 0 {
            // Holds the connection and never answers: the client's timeout must end it.
            thread::sleep(Duration::from_secs(60));
            return;
        }
        let (reason, extra, body) = match answer {
            200..=299 => ("OK", "", "{}"),
            400 => ("Bad Request", "", "{\"detail\":\"unknown site\"}"),
            429 => ("Too Many Requests", "retry-after: 1\r\n", "{}"),
            _ => ("Error", "", "{}"),
        };
        let response = format!(
            "HTTP/1.1 {answer} {reason}\r\n{extra}content-length: {}\r\ncontent-type: application/json\r\n\r\n{body}",
            body.len()
        );
        if writer.write_all(response.as_bytes()).is_err() {
            return;
        }
    }
}
