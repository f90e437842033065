//! Nothing outlives a run: `weir demo` removes its state dir from the temp dir when its duration
//! ends and when SIGTERM or SIGINT stops it, and the test harness removes its temp dirs and stops
//! its brokers and child processes also when a test fails.

mod common;

use common::{temp_dir, KillOnDrop, Mosquitto, TempDir, DEADLINE};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const WEIR: &str = env!("CARGO_BIN_EXE_weir");

/// A `weir demo` whose temp dir (`TMPDIR`) is a fresh directory of the test's own, so what the
/// demo leaves there is exactly what it left behind; it is killed if the test fails first.
struct Demo {
    child: KillOnDrop,
    tmpdir: TempDir,
    /// stderr, kept outside `tmpdir` so that it is not counted as a leftover.
    logs: TempDir,
}

impl Demo {
    fn spawn(args: &[&str]) -> Self {
        let tmpdir = temp_dir("demo-tmpdir");
        let logs = temp_dir("demo-logs");
        let stderr = std::fs::File::create(logs.join("stderr")).expect("create the stderr file");
        let child = Command::new(WEIR)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env_remove("WEIR_BROKER")
            .env_remove("WEIR_METRICS_ADDR")
            .env("TMPDIR", tmpdir.path())
            // A small fleet: the test is about what the demo leaves, not its speed.
            .args(["demo", "--devices", "10", "--rate", "200"])
            .args(["--metrics-addr", "127.0.0.1:0"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start weir demo");
        Self {
            child: KillOnDrop(child),
            tmpdir,
            logs,
        }
    }

    /// Where the demo keeps its state while it runs (`weir-demo-PID` in its temp dir).
    fn state_dir(&self) -> PathBuf {
        self.tmpdir.join(format!("weir-demo-{}", self.child.0.id()))
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.logs.join("stderr")).unwrap_or_default()
    }

    /// Waits until the demo has created its state dir: proof that it runs, and that it uses
    /// the temp dir the test gave it (so an empty one at the end is not empty by accident).
    fn wait_for_state_dir(&mut self) {
        let state_dir = self.state_dir();
        let deadline = Instant::now() + DEADLINE;
        while !state_dir.is_dir() {
            if let Ok(Some(status)) = self.child.0.try_wait() {
                panic!(
                    "weir demo exited ({status}) before creating {}:\n{}",
                    state_dir.display(),
                    self.stderr()
                );
            }
            assert!(
                Instant::now() < deadline,
                "weir demo did not create {} within {DEADLINE:?}:\n{}",
                state_dir.display(),
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` (`-TERM`, `-INT`) as ctrl-c or a service manager would.
    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.0.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} failed: {status}");
    }

    /// The exit status, within `timeout`.
    fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.0.try_wait().expect("poll weir demo") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "weir demo still running after {timeout:?}:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Fails the test with the names of whatever the demo left in its temp dir.
    fn assert_left_nothing(&self, how: &str) {
        let left: Vec<String> = std::fs::read_dir(self.tmpdir.path())
            .expect("read the demo's temp dir")
            .map(|entry| {
                entry
                    .expect("a directory entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        assert!(
            left.is_empty(),
            "weir demo stopped by {how} left {left:?} in its temp dir"
        );
    }
}

#[test]
fn the_demo_removes_its_state_dir_when_its_duration_ends() {
    let mut demo = Demo::spawn(&["--duration", "2s"]);
    demo.wait_for_state_dir();
    // 2 s of simulation, up to 2 s of draining, then the pipeline's stop.
    let status = demo.wait(DEADLINE);
    assert!(
        status.success(),
        "weir demo failed ({status}):\n{}",
        demo.stderr()
    );
    demo.assert_left_nothing("--duration");
}

#[test]
fn the_demo_removes_its_state_dir_when_stopped_by_sigterm_or_ctrl_c() {
    for signal in ["-TERM", "-INT"] {
        let mut demo = Demo::spawn(&[]);
        demo.wait_for_state_dir();
        demo.signal(signal);
        let status = demo.wait(DEADLINE);
        assert!(
            status.success(),
            "weir demo exited with {status} on kill {signal}:\n{}",
            demo.stderr()
        );
        demo.assert_left_nothing(signal);
    }
}

/// Whether anything accepts TCP on 127.0.0.1:`port`.
fn listening(port: u16) -> bool {
    TcpStream::connect_timeout(
        &SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    )
    .is_ok()
}

#[test]
fn a_failing_test_still_removes_its_temp_dirs_and_stops_its_broker_and_children() {
    // What a test holds when an assertion fails: the panic unwinds through its locals.
    let failed = std::thread::spawn(|| {
        let broker = Mosquitto::start();
        let dir = temp_dir("cleanup");
        std::fs::write(dir.join("file"), "x").expect("write a file");
        let config = common::example_config(&broker, "cleanup");
        let state_dir = config.delivery.state_dir.clone().expect("a state dir");
        std::fs::create_dir_all(&state_dir).expect("create the state dir");
        let child = KillOnDrop(
            Command::new("sleep")
                .arg("600")
                .spawn()
                .expect("start sleep"),
        );
        let seen = (
            broker.port(),
            dir.path().to_owned(),
            state_dir,
            child.0.id(),
        );
        std::panic::panic_any(seen);
    })
    .join();
    let payload = failed.expect_err("the thread panicked");
    let (port, dir, state_dir, pid) = *payload
        .downcast::<(u16, PathBuf, PathBuf, u32)>()
        .expect("the panic carries what the test held");

    assert!(!dir.exists(), "{} is still there", dir.display());
    assert!(
        !state_dir.exists(),
        "{} is still there",
        state_dir.display()
    );
    assert!(!listening(port), "mosquitto still listens on {port}");
    // Reaped, not only killed: a zombie would keep its /proc entry.
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "child process {pid} is still there"
    );
}
