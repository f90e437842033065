//! The real `weir` binary: `weir check` on the shipped config and on broken copies of it, and
//! `weir run` end to end against a real Mosquitto, stopped with SIGTERM.

mod common;

use common::{
    free_port, http_get, promtool_check, temp_dir, try_http_get, Mosquitto, Publisher, Subscriber,
    TempDir, DEADLINE, EXAMPLE_CONFIG, T0,
};
use serde_json::json;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const WEIR: &str = env!("CARGO_BIN_EXE_weir");

/// A `weir` command that ignores the environment's overrides, so only the arguments count.
fn weir() -> Command {
    let mut command = Command::new(WEIR);
    command
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("WEIR_BROKER")
        .env_remove("WEIR_METRICS_ADDR")
        .stdin(Stdio::null());
    command
}

fn check(config: &Path) -> Output {
    weir()
        .arg("check")
        .arg("--config")
        .arg(config)
        .output()
        .expect("run weir check")
}

fn example_text() -> String {
    std::fs::read_to_string(EXAMPLE_CONFIG).expect("read config/example.toml")
}

/// 1-based number of the first line of `text` whose trimmed start is `prefix`.
fn line_of(text: &str, prefix: &str) -> usize {
    text.lines()
        .position(|line| line.trim_start().starts_with(prefix))
        .unwrap_or_else(|| panic!("config/example.toml has no line starting with {prefix:?}"))
        + 1
}

/// A copy of the example config with `edit` applied to line `line` (1-based), in a temp dir:
/// the directory (removed when dropped) and the copy's path.
fn edited_copy(line: usize, edit: impl Fn(&str) -> String) -> (TempDir, PathBuf) {
    let text = example_text();
    let edited: Vec<String> = text
        .lines()
        .enumerate()
        .map(|(i, l)| if i + 1 == line { edit(l) } else { l.to_owned() })
        .collect();
    let dir = temp_dir("cli");
    let path = dir.join("weir.toml");
    std::fs::write(&path, edited.join("\n") + "\n").expect("write config copy");
    (dir, path)
}

/// Runs `weir check` on a broken copy and asserts it fails, naming file and line and `mentions`.
fn assert_check_fails(config: &Path, line: usize, mentions: &str) {
    let output = check(config);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "weir check accepted a broken config; stderr:\n{stderr}"
    );
    let place = format!("{}:{line}:", config.display());
    assert!(
        stderr.contains(&place),
        "stderr does not name {place}:\n{stderr}"
    );
    assert!(
        stderr.contains(mentions),
        "stderr does not mention {mentions}:\n{stderr}"
    );
}

#[test]
fn check_accepts_the_example_config() {
    let output = check(Path::new("config/example.toml"));
    assert!(
        output.status.success(),
        "weir check rejected config/example.toml:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn check_rejects_exit_below_not_below_enter_above_and_names_the_line() {
    let line = line_of(&example_text(), "exit_below");
    let (_dir, copy) = edited_copy(line, |l| {
        assert!(l.contains("28.0"), "unexpected exit_below line: {l}");
        l.replace("28.0", "31.0")
    });
    assert_check_fails(&copy, line, "exit_below");
}

#[test]
fn check_reads_the_password_file_and_names_it_when_missing() {
    let line = line_of(&example_text(), "# password_file");
    let (_dir, copy) = edited_copy(line, |_| {
        "username = \"weir\"\npassword_file = \"/nonexistent/weir/broker-password\"".into()
    });
    let output = check(&copy);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "weir check accepted a missing password file"
    );
    assert!(
        stderr.contains("cannot read broker.password_file /nonexistent/weir/broker-password"),
        "{stderr}"
    );
}

#[test]
fn check_rejects_an_unknown_key_and_names_the_line() {
    // The misspelled key goes on its own line right after `exit_below`.
    let line = line_of(&example_text(), "exit_below");
    let (_dir, copy) = edited_copy(line, |l| format!("{l}\nexit_belo = 28.0"));
    assert_check_fails(&copy, line + 1, "unknown field");
}

#[test]
fn check_rejects_a_template_segment_the_pattern_lacks_and_names_the_line() {
    let text = example_text();
    let line = text
        .lines()
        .position(|l| {
            l.trim_start().starts_with("topic") && l.contains("alerts/{site}/{device}/overheat")
        })
        .expect("config/example.toml has the overheat output topic")
        + 1;
    let (_dir, copy) = edited_copy(line, |l| {
        l.replace(
            "alerts/{site}/{device}/overheat",
            "alerts/{zone}/{device}/overheat",
        )
    });
    assert_check_fails(&copy, line, "{zone}");
}

/// The `weir run` child process: killed on drop, so a failing test never leaks it. Its output
/// goes to files (read on failure), so a full pipe can never block it.
struct WeirProcess {
    child: Child,
    dir: TempDir,
}

impl WeirProcess {
    fn spawn(broker: &Mosquitto, metrics_addr: SocketAddr) -> Self {
        let dir = temp_dir("run");
        let stdout = std::fs::File::create(dir.join("stdout")).expect("create stdout file");
        let stderr = std::fs::File::create(dir.join("stderr")).expect("create stderr file");
        let child = weir()
            .args(["run", "--config", "config/example.toml", "--broker"])
            .arg(broker.url())
            .arg("--metrics-addr")
            .arg(metrics_addr.to_string())
            .arg("--state-dir")
            .arg(dir.join("state"))
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("spawn weir run");
        Self { child, dir }
    }

    fn logs(&self) -> String {
        let read = |name| std::fs::read_to_string(self.dir.join(name)).unwrap_or_default();
        format!(
            "--- stdout\n{}--- stderr\n{}",
            read("stdout"),
            read("stderr")
        )
    }

    /// Fails the test (with the logs) if the process has exited.
    fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("weir exited early ({status}):\n{}", self.logs());
        }
    }
}

impl Drop for WeirProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // `dir` goes when the fields drop, after the process that wrote to it.
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_yields_hot_normal_hot_serves_metrics_and_exits_cleanly_on_sigterm() {
    let broker = Mosquitto::start();
    let metrics_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut weir = WeirProcess::spawn(&broker, metrics_addr);

    // Ready means connected and subscribed: only then can a published reading reach weir.
    let deadline = Instant::now() + DEADLINE;
    loop {
        weir.assert_running();
        if matches!(try_http_get(metrics_addr, "/readyz").await, Ok((200, _))) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "weir was not ready within {DEADLINE:?}:\n{}",
            weir.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut alerts = Subscriber::start(&broker, "alerts/+/+/overheat").await;
    let mut device = Publisher::start(&broker).await;
    for (i, temperature) in [25.0, 31.0, 29.0, 27.0, 31.0].into_iter().enumerate() {
        let ts = T0 + 1000 * i as i64;
        let payload = json!({"ts": ts, "seq": i + 1, "temperature": temperature, "humidity": 40.0});
        device.reading("s1", "d1", payload).await;
    }
    let transitions: Vec<(String, String, String)> = alerts
        .take(3)
        .await
        .iter()
        .map(|m| {
            let event = m.json();
            let field = |name: &str| event[name].as_str().unwrap_or_default().to_owned();
            (m.topic.clone(), field("from"), field("to"))
        })
        .collect();
    let topic = "alerts/s1/d1/overheat".to_owned();
    assert_eq!(
        transitions,
        [
            (topic.clone(), "normal".into(), "hot".into()),
            (topic.clone(), "hot".into(), "normal".into()),
            (topic, "normal".into(), "hot".into()),
        ]
    );

    let (status, body) = http_get(metrics_addr, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("weir_readings_received_total{input=\"telemetry\"} 5"),
        "/metrics does not count the five readings:\n{body}"
    );
    promtool_check(&body);
    alerts.assert_quiet().await;

    let pid = weir.child.id().to_string();
    let kill = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("run kill");
    assert!(kill.success(), "kill -TERM {pid} failed");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = weir.child.try_wait().expect("wait for weir") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "weir did not exit within 10 s of SIGTERM:\n{}",
            weir.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        status.success(),
        "weir exited with {status} after SIGTERM:\n{}",
        weir.logs()
    );
}
