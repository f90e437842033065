//! Soak harness (issue 14, items 5 and 6): the release `weir` binary under `at_least_once`
//! against its own Mosquitto, for minutes at a steady rate, while faults are injected at random
//! times from a printed seed; at the end every device's derived events are checked against an
//! oracle computed from what was published. With `--flood-devices N` it instead measures weir's
//! resident memory while N distinct device ids arrive at full speed (QoS 0).
//!
//! Run: `cargo bench --bench soak -- --minutes 10 --rate 2000 [--seed N] [--faults LIST]`, or
//! `cargo bench --bench soak -- --flood-devices 1000000 [--device-cap N]`; `--help` lists every
//! option. Not part of `cargo test` (a bench target with `harness = false`). Needs root (it
//! mounts a tmpfs for the state dir) and `/usr/sbin/mosquitto`. README: "Soak test".
//!
//! Everything it starts is torn down on every way out: children are killed and reaped, the tmpfs
//! unmounted and the temp dir removed by guards, also on a panic; Ctrl-C (or SIGTERM) stops the
//! run and cleans up, and a second one (or 30 s without progress) cleans up at once and exits.

use rumqttc::{Client, ConnectionError, Event, MqttOptions, Packet, QoS, RecvTimeoutError};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[path = "common/raw_mqtt.rs"]
mod raw_mqtt;
use raw_mqtt::{push_len, push_publish, push_str};
#[path = "common/http.rs"]
mod http;
use http::http_get;

const WEIR: &str = env!("CARGO_BIN_EXE_weir");
const MOSQUITTO: &str = "/usr/sbin/mosquitto";
const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/example.toml");

/// `inputs.telemetry.max_payload_bytes` and `broker.max_packet_bytes` of the example.
const MAX_PAYLOAD_BYTES: usize = 65_536;
const MAX_PACKET_BYTES: usize = 262_144;
/// The two oversized payloads: one weir must dead-letter as `too_large`, one the MQTT layer
/// refuses before weir sees it.
const OVERSIZED: usize = 100_000;
const OVERSIZED_PACKET: usize = 300_000;
const _: () = assert!(
    MAX_PAYLOAD_BYTES < OVERSIZED
        && OVERSIZED < MAX_PACKET_BYTES
        && MAX_PACKET_BYTES < OVERSIZED_PACKET
);
/// The example's tumbling window.
const WINDOW_MS: i64 = 10_000;
/// Readings per period of a device's temperature wave (two overheat transitions per period).
const WAVE: u64 = 80;

/// RSS per device slot the caps allow, with the example's two rules: 628 B of state (README
/// Performance, measured by `benches/e2e.rs` and `benches/memory.rs`), plus what the topic cache
/// keeps of an evicted id until it is cleared at twice the cap (an `Origin`, 256 B in malloc
/// chunks, and its 22 B entry). A flood of 1,000,000 ids measured 870 B.
const LIVE_BYTES_PER_DEVICE: f64 = 628.0 + 256.0 + 22.0;
/// What a snapshot adds per device at its peak: the CBOR body grown by doubling (843 B per
/// device in the file here) and its copy with the header, the per-device records the workers
/// build, and glibc keeping what those threads freed. Measured: 1,059 MB against 184 MB
/// without a state dir, at 200,000 devices.
const SNAPSHOT_BYTES_PER_DEVICE: f64 = 5_000.0;

/// The RSS weir may reach with `slots` devices on top of `base_mb`, in MB.
fn rss_bound_mb(base_mb: f64, slots: usize, state_dir: bool) -> f64 {
    let per_device = LIVE_BYTES_PER_DEVICE
        + if state_dir {
            SNAPSHOT_BYTES_PER_DEVICE
        } else {
            0.0
        };
    base_mb + slots as f64 * per_device * 1.1 / 1_048_576.0
}

// ---------------------------------------------------------------------------------------------
// Options and fault kinds.

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    BrokerRestart,
    Pause,
    Kill,
    Disk,
    Oversized,
    OversizedPacket,
    Malformed,
    Dup,
    Flood,
}

impl Fault {
    const ALL: [Fault; 9] = [
        Fault::BrokerRestart,
        Fault::Pause,
        Fault::Kill,
        Fault::Disk,
        Fault::Oversized,
        Fault::OversizedPacket,
        Fault::Malformed,
        Fault::Dup,
        Fault::Flood,
    ];

    fn name(self) -> &'static str {
        match self {
            Fault::BrokerRestart => "broker-restart",
            Fault::Pause => "pause",
            Fault::Kill => "kill",
            Fault::Disk => "disk",
            Fault::Oversized => "oversized",
            Fault::OversizedPacket => "oversized-packet",
            Fault::Malformed => "malformed",
            Fault::Dup => "dup",
            Fault::Flood => "flood",
        }
    }

    fn what(self) -> &'static str {
        match self {
            Fault::BrokerRestart => "Mosquitto stopped (SIGTERM, it saves its sessions) and started again on the same port after 0.5-3 s",
            Fault::Pause => "Mosquitto frozen with SIGSTOP for 1-5 s, then SIGCONT",
            Fault::Kill => "weir killed with SIGKILL, restarted on the same state dir after 0-2 s",
            Fault::Disk => "the state dir's tmpfs filled to the last byte for 2-6 s, then freed",
            Fault::Oversized => "a 100 kB payload: above max_payload_bytes, below max_packet_bytes",
            Fault::OversizedPacket => "a 300 kB payload: above broker.max_packet_bytes",
            Fault::Malformed => "8 bad payloads (truncated, wrong type, not an object, invalid UTF-8, ...)",
            Fault::Dup => "5-20 readings published again, same seq and bytes",
            Fault::Flood => "a flood of one-shot device ids at full speed",
        }
    }
}

struct Options {
    minutes: f64,
    rate: f64,
    seed: u64,
    faults: Vec<Fault>,
    devices: u64,
    fault_every: f64,
    device_cap: Option<usize>,
    flood_size: u64,
    rss_limit_mb: Option<f64>,
    flood_devices: Option<u64>,
    no_state_dir: bool,
    settle: f64,
    keep_logs: Option<PathBuf>,
}

const HELP: &str = "\
cargo bench --bench soak -- [options]

soak (default):
  --minutes M         how long to publish (default 2)
  --rate R            readings per second of the regular devices (default 2000)
  --devices N         regular devices, published round robin (default 100)
  --seed N            seed of the fault schedule and choices (default: from the clock; printed)
  --faults LIST       comma-separated kinds, or all (default): broker-restart, pause, kill, disk,
                      oversized, oversized-packet, malformed, dup, flood; none for no faults
  --fault-every S     mean seconds between faults (default 15)
  --flood-size N      one-shot device ids per flood fault (default 3000)
  --device-cap N      pipeline.max_devices_per_worker (default 2000 in a soak, so floods evict)
  --rss-limit-mb MB   the RSS bound to check (default: computed from the cap, printed)
  --keep-logs DIR     copy weir's and Mosquitto's logs there before the temp dir goes

memory under a flood:
  --flood-devices N   publish N distinct device ids at full speed (QoS 0) and measure RSS
  --device-cap N      pipeline.max_devices_per_worker (default: the example's, 100000)
  --no-state-dir      run weir without a state dir (no snapshots), to tell their share apart
  --settle S          seconds to keep measuring after the last reading (default 12)
";

fn options() -> Options {
    let mut o = Options {
        minutes: 2.0,
        rate: 2000.0,
        seed: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64 % 1_000_000_007),
        faults: Fault::ALL.to_vec(),
        devices: 100,
        fault_every: 15.0,
        device_cap: None,
        flood_size: 3000,
        rss_limit_mb: None,
        flood_devices: None,
        no_state_dir: false,
        settle: 12.0,
        keep_logs: None,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let flag = args[i].as_str();
        if flag == "--bench" {
            // cargo bench passes it to every bench target.
            i += 1;
            continue;
        }
        if flag == "--no-state-dir" {
            o.no_state_dir = true;
            i += 1;
            continue;
        }
        if flag == "--help" || flag == "-h" {
            print!("{HELP}");
            std::process::exit(0);
        }
        let Some(value) = args.get(i + 1) else {
            usage(&format!("{flag} needs a value"));
        };
        let number = |v: &str| -> f64 {
            v.parse()
                .unwrap_or_else(|_| usage(&format!("{flag}: {v} is not a number")))
        };
        match flag {
            "--minutes" => o.minutes = number(value),
            "--rate" => o.rate = number(value),
            "--seed" => o.seed = number(value) as u64,
            "--devices" => o.devices = number(value) as u64,
            "--fault-every" => o.fault_every = number(value),
            "--flood-size" => o.flood_size = number(value) as u64,
            "--device-cap" => o.device_cap = Some(number(value) as usize),
            "--rss-limit-mb" => o.rss_limit_mb = Some(number(value)),
            "--flood-devices" => o.flood_devices = Some(number(value) as u64),
            "--settle" => o.settle = number(value),
            "--keep-logs" => o.keep_logs = Some(PathBuf::from(value)),
            "--faults" => {
                o.faults = match value.as_str() {
                    "all" => Fault::ALL.to_vec(),
                    "none" => Vec::new(),
                    list => list
                        .split(',')
                        .map(|name| {
                            Fault::ALL
                                .into_iter()
                                .find(|f| f.name() == name.trim())
                                .unwrap_or_else(|| usage(&format!("unknown fault kind {name}")))
                        })
                        .collect(),
                };
                o.faults.sort_unstable();
                o.faults.dedup();
            }
            _ => usage(&format!("unknown option {flag}")),
        }
        i += 2;
    }
    if o.devices == 0 || o.rate <= 0.0 || o.minutes <= 0.0 || o.fault_every <= 0.0 {
        usage("--devices, --rate, --minutes and --fault-every must be positive");
    }
    o
}

fn usage(problem: &str) -> ! {
    eprintln!("soak: {problem}\n\n{HELP}");
    std::process::exit(2);
}

/// xorshift64*: a seeded sequence of choices, so a run can be repeated from its printed seed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// Uniform in `[lo, hi)`.
    fn between(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (self.next() >> 11) as f64 / (1u64 << 53) as f64 * (hi - lo)
    }
}

// ---------------------------------------------------------------------------------------------
// Leaving nothing behind.

/// Set by Ctrl-C, SIGTERM or a panic in any thread: every loop of the harness ends early.
static STOP: AtomicBool = AtomicBool::new(false);

fn stopped() -> bool {
    STOP.load(Ordering::Relaxed)
}

/// What must go when the harness ends, whichever way: the guards below keep it current, and the
/// signal thread runs it itself when the main thread does not finish in time.
struct Cleanup {
    pids: Vec<u32>,
    mounts: Vec<PathBuf>,
    dirs: Vec<PathBuf>,
}

static CLEANUP: Mutex<Cleanup> = Mutex::new(Cleanup {
    pids: Vec::new(),
    mounts: Vec::new(),
    dirs: Vec::new(),
});

fn registry() -> std::sync::MutexGuard<'static, Cleanup> {
    CLEANUP.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Kills what is still registered, unmounts, removes the dirs. Idempotent.
fn cleanup_all() {
    let (pids, mounts, dirs) = {
        let mut r = registry();
        (
            std::mem::take(&mut r.pids),
            std::mem::take(&mut r.mounts),
            std::mem::take(&mut r.dirs),
        )
    };
    for pid in pids {
        send_signal(pid, "KILL");
    }
    for mount in mounts {
        unmount(&mount);
    }
    for dir in dirs {
        let _ = std::fs::remove_dir_all(&dir);
    }
}

fn unmount(dir: &Path) {
    for _ in 0..20 {
        let ok = Command::new("umount")
            .arg(dir)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok || !is_mounted(dir) {
            return;
        }
        // Busy for a moment after a process in it was killed.
        thread::sleep(Duration::from_millis(100));
    }
    let _ = Command::new("umount").arg("-l").arg(dir).status();
}

fn is_mounted(dir: &Path) -> bool {
    let dir = dir.to_string_lossy();
    std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .any(|line| line.split(' ').nth(1) == Some(&*dir))
}

/// The harness's temp dir (and the tmpfs inside it): removed on drop, after the children.
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("weir-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the temp dir");
        registry().dirs.push(dir.clone());
        Scratch { dir }
    }

    /// Mounts a tmpfs of `mb` MiB at `name` inside the temp dir.
    fn mount_tmpfs(&self, name: &str, mb: u64) -> PathBuf {
        let at = self.dir.join(name);
        std::fs::create_dir_all(&at).expect("create the mount point");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mb}m"), "tmpfs"])
            .arg(&at)
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "mount -t tmpfs failed ({status}); the soak runs as root"
        );
        registry().mounts.insert(0, at.clone());
        at
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        cleanup_all();
    }
}

/// Removes what an earlier harness left behind when it was killed with SIGKILL (nothing else
/// could clean up then): mounts and dirs named after a process that no longer exists.
fn clean_leftovers() {
    let tmp = std::env::temp_dir();
    let stale = |name: &str| {
        let pid = name
            .strip_prefix("weir-soak-")
            .or_else(|| name.strip_prefix("weir-flood-"))
            .and_then(|pid| pid.parse::<u32>().ok());
        pid.is_some_and(|pid| {
            pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists()
        })
    };
    for line in std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
    {
        let Some(at) = line.split(' ').nth(1) else {
            continue;
        };
        let at = Path::new(at);
        let under = at
            .strip_prefix(&tmp)
            .ok()
            .and_then(|rest| rest.iter().next());
        if under.is_some_and(|first| stale(&first.to_string_lossy())) {
            eprintln!("soak: unmounting {} left by an earlier run", at.display());
            unmount(at);
        }
    }
    for entry in std::fs::read_dir(&tmp).into_iter().flatten().flatten() {
        if stale(&entry.file_name().to_string_lossy()) {
            eprintln!(
                "soak: removing {} left by an earlier run",
                entry.path().display()
            );
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Ctrl-C or SIGTERM sets [`STOP`]; the main thread then winds down through its guards. A second
/// signal, or 30 s without the process exiting, cleans up from here and exits 130.
fn watch_signals() {
    thread::spawn(|| {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        runtime.block_on(async {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut int), Ok(mut term)) = (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
            ) else {
                return;
            };
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            eprintln!("\nsoak: interrupted; stopping and cleaning up (again to force)");
            STOP.store(true, Ordering::Relaxed);
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
                () = tokio::time::sleep(Duration::from_secs(30)) => {}
            }
            eprintln!("soak: cleaning up now");
            cleanup_all();
            std::process::exit(130);
        });
    });
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        STOP.store(true, Ordering::Relaxed);
        default(info);
    }));
}

/// Sleeps `d` in small steps; false when the run was stopped meanwhile.
fn nap(d: Duration) -> bool {
    let until = Instant::now() + d;
    while Instant::now() < until {
        if stopped() {
            return false;
        }
        thread::sleep((until - Instant::now()).min(Duration::from_millis(50)));
    }
    !stopped()
}

// ---------------------------------------------------------------------------------------------
// Child processes: Mosquitto and weir.

fn send_signal(pid: u32, signal: &str) -> bool {
    Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A child process, killed (SIGKILL) and reaped on drop.
struct Proc {
    child: Option<Child>,
}

impl Proc {
    fn spawn(command: &mut Command) -> Proc {
        // A process group of its own: Ctrl-C in the terminal reaches only the harness, which
        // then stops the children in its own order (publishing first, then weir, the broker).
        let child = command
            .process_group(0)
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {command:?}: {err}"));
        registry().pids.push(child.id());
        Proc { child: Some(child) }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    fn forget(&mut self) -> Option<Child> {
        let child = self.child.take()?;
        registry().pids.retain(|pid| *pid != child.id());
        Some(child)
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.forget() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits up to `limit`: the exit status and how long it took (`None`: it had
    /// to be killed).
    fn terminate(&mut self, limit: Duration) -> (Option<ExitStatus>, Duration) {
        let started = Instant::now();
        let Some(mut child) = self.forget() else {
            return (None, Duration::ZERO);
        };
        send_signal(child.id(), "TERM");
        while started.elapsed() < limit {
            if let Ok(Some(status)) = child.try_wait() {
                return (Some(status), started.elapsed());
            }
            thread::sleep(Duration::from_millis(5));
        }
        let _ = child.kill();
        let _ = child.wait();
        (None, started.elapsed())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Mosquitto on a loopback port of its own, with a config file the harness writes.
struct Broker {
    port: u16,
    dir: PathBuf,
    proc: Option<Proc>,
}

impl Broker {
    /// `persistent`: sessions and queued QoS 1 messages survive a restart (saved at SIGTERM).
    fn start(dir: PathBuf, persistent: bool) -> Broker {
        std::fs::create_dir_all(&dir).expect("broker dir");
        // Mosquitto drops root for its own user before it writes the persistence file.
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777));
        for _ in 0..5 {
            let port = free_port();
            let persistence = if persistent {
                format!(
                    "persistence true\npersistence_location {}/\nautosave_interval 60\n",
                    dir.display()
                )
            } else {
                "persistence false\n".to_owned()
            };
            // The deep queue keeps a paused or restarting weir's readings at the broker, which
            // is what a gateway's broker should do; 100 in flight is the README's advice for
            // at_least_once intake.
            std::fs::write(
                dir.join("mosquitto.conf"),
                format!(
                    "listener {port} 127.0.0.1\nallow_anonymous true\n{persistence}\
                     max_inflight_messages 100\nmax_queued_messages 10000000\nmax_queued_bytes 0\n\
                     set_tcp_nodelay true\nlog_dest stderr\nlog_type error\nlog_type warning\n\
                     log_type notice\n"
                ),
            )
            .expect("write mosquitto.conf");
            let mut broker = Broker {
                port,
                dir: dir.clone(),
                proc: None,
            };
            if broker.spawn() {
                return broker;
            }
        }
        panic!(
            "mosquitto did not start; see {}",
            dir.join("mosquitto.log").display()
        );
    }

    fn spawn(&mut self) -> bool {
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir.join("mosquitto.log"))
            .expect("mosquitto.log");
        let mut proc = Proc::spawn(
            Command::new(MOSQUITTO)
                .arg("-c")
                .arg(self.dir.join("mosquitto.conf"))
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log handle"))
                .stderr(log),
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if !proc.running() {
                return false;
            }
            if TcpStream::connect(self.addr()).is_ok() {
                self.proc = Some(proc);
                return true;
            }
            thread::sleep(Duration::from_millis(10));
        }
        false
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn pid(&self) -> u32 {
        self.proc.as_ref().map_or(0, Proc::pid)
    }

    /// Stops it gracefully (SIGTERM: a persistent broker saves sessions and queued messages),
    /// waits `down`, and starts it again on the same port.
    fn restart(&mut self, down: Duration) -> String {
        if let Some(mut proc) = self.proc.take() {
            proc.terminate(Duration::from_secs(10));
        }
        thread::sleep(down);
        for attempt in 0..50 {
            if self.spawn() {
                return format!("down {:.1} s", down.as_secs_f64() + attempt as f64 * 0.1);
            }
            thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "mosquitto did not restart on port {}; see {}",
            self.port,
            self.dir.join("mosquitto.log").display()
        );
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        // A stopped process dies of SIGKILL too; this only keeps its sockets from lingering.
        if self.pid() != 0 {
            send_signal(self.pid(), "CONT");
        }
    }
}

/// The weir process under test, restartable on the same state dir and metrics address.
struct Weir {
    proc: Option<Proc>,
    config: PathBuf,
    state: PathBuf,
    metrics: String,
    broker: String,
    log: PathBuf,
    starts: u32,
    /// Whether to pass `--state-dir` (the flood can run without one).
    state_dir: bool,
}

/// The pid of the running weir (0 while none): what the RSS sampler reads.
static WEIR_PID: AtomicU32 = AtomicU32::new(0);

impl Weir {
    fn new(config: PathBuf, state: PathBuf, broker: &str, log: PathBuf) -> Weir {
        Weir {
            proc: None,
            config,
            state,
            metrics: format!("127.0.0.1:{}", free_port()),
            broker: format!("mqtt://{broker}"),
            log,
            starts: 0,
            state_dir: true,
        }
    }

    /// Starts weir and waits until `/readyz` answers 200 (connected and subscribed); `Err` with
    /// what happened when it does not within 30 s.
    fn start(&mut self) -> Result<Duration, String> {
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("weir.log");
        let started = Instant::now();
        let mut command = Command::new(WEIR);
        command.args(["run", "--config"]).arg(&self.config).args([
            "--broker",
            &self.broker,
            "--metrics-addr",
            &self.metrics,
        ]);
        if self.state_dir {
            command.arg("--state-dir").arg(&self.state);
        }
        let proc = Proc::spawn(
            command
                .env("WEIR_LOG", "info")
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log handle"))
                .stderr(log),
        );
        WEIR_PID.store(proc.pid(), Ordering::Relaxed);
        self.proc = Some(proc);
        self.starts += 1;
        while started.elapsed() < Duration::from_secs(30) {
            if http_get(&self.metrics, "/readyz").is_some_and(|(status, _)| status == 200) {
                return Ok(started.elapsed());
            }
            if !self.proc.as_mut().is_some_and(Proc::running) {
                return Err("weir exited during start-up".into());
            }
            if stopped() {
                return Err("interrupted".into());
            }
            thread::sleep(Duration::from_millis(5));
        }
        Err("weir was not ready (connected and subscribed) within 30 s".into())
    }

    fn kill(&mut self) {
        WEIR_PID.store(0, Ordering::Relaxed);
        if let Some(mut proc) = self.proc.take() {
            proc.kill();
        }
    }

    fn terminate(&mut self) -> (Option<ExitStatus>, Duration) {
        let result = match self.proc.take() {
            Some(mut proc) => proc.terminate(Duration::from_secs(20)),
            None => (None, Duration::ZERO),
        };
        WEIR_PID.store(0, Ordering::Relaxed);
        result
    }

    /// Sum of a metric's series in `/metrics`; `None` while weir does not answer.
    fn metric(&self, name: &str) -> Option<f64> {
        let (_, text) = http_get(&self.metrics, "/metrics")?;
        Some(sum_metric(&text, name))
    }
}

impl Drop for Weir {
    fn drop(&mut self) {
        self.kill();
    }
}

fn sum_metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Resident memory of `pid` in KiB, from /proc.
fn rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// Samples weir's RSS every 100 ms, whichever process is the current weir.
struct RssSampler {
    peak_kib: Arc<AtomicU64>,
    last_kib: Arc<AtomicU64>,
}

impl RssSampler {
    fn start() -> RssSampler {
        let peak_kib = Arc::new(AtomicU64::new(0));
        let last_kib = Arc::new(AtomicU64::new(0));
        let (peak, last) = (peak_kib.clone(), last_kib.clone());
        thread::spawn(move || loop {
            let pid = WEIR_PID.load(Ordering::Relaxed);
            if pid != 0 {
                if let Some(kib) = rss_kib(pid) {
                    last.store(kib, Ordering::Relaxed);
                    peak.fetch_max(kib, Ordering::Relaxed);
                }
            }
            thread::sleep(Duration::from_millis(100));
        });
        RssSampler { peak_kib, last_kib }
    }

    fn peak_mb(&self) -> f64 {
        self.peak_kib.load(Ordering::Relaxed) as f64 / 1024.0
    }

    fn last_mb(&self) -> f64 {
        self.last_kib.load(Ordering::Relaxed) as f64 / 1024.0
    }
}

/// The example config with `replacements` applied; each must match, so a change of the example
/// cannot silently change what is measured.
fn weir_config(path: &Path, replacements: &[(&str, &str)]) -> PathBuf {
    let mut text = std::fs::read_to_string(EXAMPLE).expect("config/example.toml");
    for (from, to) in replacements {
        assert!(
            text.contains(from),
            "config/example.toml no longer contains {from:?}; update benches/soak.rs"
        );
        text = text.replace(from, to);
    }
    std::fs::write(path, text).expect("write the weir config");
    path.to_owned()
}

// ---------------------------------------------------------------------------------------------
// The scenario and its oracle.

/// The regular devices' readings, a pure function of (device, seq): the oracle recomputes them
/// from the count published, and a duplicate is the same bytes again.
struct Scenario {
    devices: u64,
    ts0: i64,
    step_ms: i64,
}

impl Scenario {
    fn new(devices: u64, rate: f64) -> Scenario {
        // Event time an hour behind the clock (aligned to a window), advancing at the nominal
        // rate: it never runs ahead of arrival, so nothing is quarantined as from the future.
        let now = now_ms();
        let ts0 = now - 3_600_000 - (now % WINDOW_MS);
        let step_ms = ((devices as f64 * 1000.0 / rate).round() as i64).max(1);
        Scenario {
            devices,
            ts0,
            step_ms,
        }
    }

    fn topic(d: u64) -> String {
        format!("sensors/plant-1/dev-{d:04}/telemetry")
    }

    fn ts(&self, seq: u64) -> i64 {
        self.ts0 + seq as i64 * self.step_ms
    }

    /// A wave across both thresholds (30.0 up, 28.0 down), phase-shifted per device, in tenths.
    fn temperature(d: u64, seq: u64) -> f64 {
        let x = ((seq + d * 7) % WAVE) as f64 / WAVE as f64 * std::f64::consts::TAU;
        (290.0 + 30.0 * x.sin()).round() / 10.0
    }

    fn humidity(d: u64, seq: u64) -> f64 {
        40.0 + ((seq * 7 + d) % 21) as f64 * 0.5
    }

    fn payload(&self, d: u64, seq: u64) -> Vec<u8> {
        format!(
            r#"{{"ts": {}, "seq": {seq}, "temperature": {:.1}, "humidity": {:.1}, "battery": 3.9}}"#,
            self.ts(seq),
            Self::temperature(d, seq),
            Self::humidity(d, seq)
        )
        .into_bytes()
    }

    /// Readings of device `d` among the first `n` of the round robin.
    fn readings_of(&self, n: u64, d: u64) -> u64 {
        (n + self.devices - 1 - d) / self.devices
    }

    /// Every event an uninterrupted weir derives from the first `n` readings, by key.
    fn expected(&self, n: u64) -> BTreeMap<Key, Expected> {
        let mut out = BTreeMap::new();
        for d in 0..self.devices {
            let count = self.readings_of(n, d);
            let mut hot = false;
            let mut window: Option<(i64, Agg, Agg)> = None;
            for seq in 0..count {
                let (ts, t, h) = (
                    self.ts(seq),
                    Self::temperature(d, seq),
                    Self::humidity(d, seq),
                );
                if (!hot && t > 30.0) || (hot && t < 28.0) {
                    hot = !hot;
                    out.insert(
                        Key::Alert { device: d, ts },
                        Expected::Alert {
                            to: if hot { "hot" } else { "normal" },
                            value: t,
                            seq,
                        },
                    );
                }
                let start = ts - ts.rem_euclid(WINDOW_MS);
                // A window fires when the device's watermark (its newest event time; the
                // example has no out-of-orderness) reaches its end: on the first reading of a
                // later window. The last window stays open: with a state dir, a clean stop
                // keeps it in the snapshot instead of publishing it as partial.
                if let Some((open, temperature, humidity)) = window.take_if(|w| w.0 != start) {
                    out.insert(
                        Key::Window {
                            device: d,
                            start: open,
                        },
                        Expected::Window {
                            temperature,
                            humidity,
                            cause_seq: seq,
                        },
                    );
                }
                let w = window.get_or_insert_with(|| (start, Agg::default(), Agg::default()));
                w.1.add(t);
                w.2.add(h);
            }
        }
        out
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Key {
    Alert { device: u64, ts: i64 },
    Window { device: u64, start: i64 },
}

impl Key {
    fn device(self) -> u64 {
        match self {
            Key::Alert { device, .. } | Key::Window { device, .. } => device,
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Agg {
    count: u64,
    min: f64,
    max: f64,
    sum: f64,
}

impl Agg {
    fn add(&mut self, v: f64) {
        if self.count == 0 {
            (self.min, self.max) = (v, v);
        }
        self.count += 1;
        self.min = self.min.min(v);
        self.max = self.max.max(v);
        self.sum += v;
    }

    /// Whether an event's `{"count", "min", "max", "avg"}` says the same.
    fn matches(&self, got: &Value) -> bool {
        let close =
            |a: f64, b: Option<f64>| b.is_some_and(|b| (a - b).abs() <= 1e-9 * a.abs().max(1.0));
        got["count"].as_u64() == Some(self.count)
            && close(self.min, got["min"].as_f64())
            && close(self.max, got["max"].as_f64())
            && close(self.sum / self.count as f64, got["avg"].as_f64())
    }
}

#[derive(Debug)]
enum Expected {
    Alert {
        to: &'static str,
        value: f64,
        seq: u64,
    },
    Window {
        temperature: Agg,
        humidity: Agg,
        cause_seq: u64,
    },
}

impl Expected {
    fn matches(&self, event: &Value) -> bool {
        match self {
            Expected::Alert { to, value, seq } => {
                event["to"] == *to
                    && event["value"].as_f64() == Some(*value)
                    && event["cause"]["seq"].as_u64() == Some(*seq)
            }
            Expected::Window {
                temperature,
                humidity,
                cause_seq,
            } => {
                event["partial"].is_null()
                    && event["cause"]["seq"].as_u64() == Some(*cause_seq)
                    && temperature.matches(&event["metrics"]["temperature"])
                    && humidity.matches(&event["metrics"]["humidity"])
            }
        }
    }
}

/// The key an event of the example's rules has in the oracle; `Err` with its device when it
/// belongs to no regular device (a flood id, or something else entirely).
fn key_of(event: &Value) -> Result<Key, String> {
    let device = event["device"].as_str().unwrap_or("?");
    let Some(d) = device
        .strip_prefix("dev-")
        .and_then(|n| n.parse::<u64>().ok())
    else {
        return Err(device.to_owned());
    };
    match (event["rule"].as_str(), event["kind"].as_str()) {
        (Some("overheat"), Some("state_change")) => Ok(Key::Alert {
            device: d,
            ts: event["ts"].as_i64().unwrap_or(i64::MIN),
        }),
        (Some("climate"), Some("window")) => Ok(Key::Window {
            device: d,
            start: event["start"].as_i64().unwrap_or(i64::MIN),
        }),
        _ => Err(device.to_owned()),
    }
}

/// A bad payload the harness published, and the dead-letter reason weir must give it.
struct Injected {
    marker: u64,
    reason: &'static str,
    what: &'static str,
}

/// The bad payloads of one `malformed` fault, each carrying `bad-<marker>` so its dead letter
/// can be found (in `payload`, or in `payload_b64` for invalid UTF-8).
fn malformed_batch(first: u64, ts: i64) -> Vec<(Injected, Vec<u8>)> {
    let m = first;
    let entry = |i: u64, reason, what, payload: Vec<u8>| {
        (
            Injected {
                marker: m + i,
                reason,
                what,
            },
            payload,
        )
    };
    vec![
        entry(
            0,
            "malformed",
            "truncated JSON",
            format!(r#"{{"note": "bad-{}", "ts": {ts}, "temperature": 2"#, m).into_bytes(),
        ),
        entry(
            1,
            "wrong_type",
            "a string for a number",
            format!(
                r#"{{"note": "bad-{}", "ts": {ts}, "temperature": "hot"}}"#,
                m + 1
            )
            .into_bytes(),
        ),
        entry(
            2,
            "not_an_object",
            "a JSON array",
            format!(r#"["bad-{}", 1, 2]"#, m + 2).into_bytes(),
        ),
        entry(3, "malformed", "invalid UTF-8", {
            let mut p =
                format!(r#"{{"note": "bad-{}", "ts": {ts}, "temperature": ""#, m + 3).into_bytes();
            p.extend_from_slice(b"\xff\xfe\"}");
            p
        }),
        entry(
            4,
            "missing_field",
            "no metric a rule reads",
            format!(r#"{{"note": "bad-{}", "ts": {ts}, "battery": 3.9}}"#, m + 4).into_bytes(),
        ),
        entry(
            5,
            "bad_timestamp",
            "an unreadable time",
            format!(
                r#"{{"note": "bad-{}", "ts": "yesterday", "temperature": 20.0}}"#,
                m + 5
            )
            .into_bytes(),
        ),
        entry(
            6,
            "future_timestamp",
            "a time a day ahead",
            format!(
                r#"{{"note": "bad-{}", "ts": {}, "temperature": 20.0}}"#,
                m + 6,
                now_ms() + 86_400_000
            )
            .into_bytes(),
        ),
        entry(
            7,
            "malformed",
            "a number out of range",
            format!(
                r#"{{"note": "bad-{}", "ts": {ts}, "temperature": 1e400}}"#,
                m + 7
            )
            .into_bytes(),
        ),
    ]
}

/// A payload of about `size` bytes that is valid JSON with its marker first, so the dead
/// letter (cut to 4 KiB) still shows it.
fn oversized(marker: u64, ts: i64, size: usize) -> Vec<u8> {
    let mut p = format!(r#"{{"note": "bad-{marker}", "ts": {ts}, "temperature": 20.0, "pad": ""#)
        .into_bytes();
    p.resize(size.saturating_sub(2), b'x');
    p.extend_from_slice(b"\"}");
    p
}

/// The `bad-N` marker in a dead letter's payload (text or base64).
fn marker_of(letter: &Value) -> Option<u64> {
    let text = match (letter["payload"].as_str(), letter["payload_b64"].as_str()) {
        (Some(text), _) => text.as_bytes().to_vec(),
        (None, Some(b64)) => base64_decode(b64),
        _ => return None,
    };
    let at = text.windows(4).position(|w| w == b"bad-")? + 4;
    let digits: String = text[at..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .map(|b| *b as char)
        .collect();
    digits.parse().ok()
}

fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' | b'-' => Some(62),
        b'/' | b'_' => Some(63),
        _ => None,
    };
    let (mut out, mut acc, mut bits) = (Vec::new(), 0u32, 0);
    for v in text.bytes().filter_map(value) {
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

// ---------------------------------------------------------------------------------------------
// MQTT clients (rumqttc): the publisher, the injector, the collector.

/// One rumqttc client with a persistent session and its connection thread. QoS 1 messages it was
/// handed are retransmitted after a reconnect until the broker acknowledges them.
struct Mqtt {
    client: Client,
    /// PUBACKs received.
    acked: Arc<AtomicU64>,
    /// Publishes not acknowledged yet (in flight or waiting to be resent).
    unacked: Arc<AtomicU64>,
    /// Reconnects on which the broker had lost the session: what rumqttc held is then dropped.
    lost_sessions: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

type OnPublish = Box<dyn FnMut(String, Vec<u8>) + Send>;

impl Mqtt {
    fn connect(broker: &Broker, id: &str, filters: &[&str], mut on_publish: OnPublish) -> Mqtt {
        let mut options = MqttOptions::new(id, "127.0.0.1", broker.port);
        options
            .set_keep_alive(Duration::from_secs(30))
            .set_clean_session(false)
            .set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut connection) = Client::new(options, 1024);
        let acked = Arc::new(AtomicU64::new(0));
        let unacked = Arc::new(AtomicU64::new(0));
        let lost_sessions = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let filters: Vec<String> = filters.iter().map(|f| (*f).to_owned()).collect();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = {
            let (client, acked, unacked, lost, stop) = (
                client.clone(),
                acked.clone(),
                unacked.clone(),
                lost_sessions.clone(),
                stop.clone(),
            );
            thread::spawn(move || {
                let mut connected_before = false;
                while !stop.load(Ordering::Relaxed) {
                    match connection.recv_timeout(Duration::from_millis(100)) {
                        Ok(Ok(Event::Incoming(Packet::ConnAck(ack)))) => {
                            if !ack.session_present {
                                if connected_before {
                                    lost.fetch_add(1, Ordering::Relaxed);
                                }
                                for filter in &filters {
                                    let _ = client.try_subscribe(filter.clone(), QoS::AtLeastOnce);
                                }
                            }
                            if filters.is_empty() || ack.session_present {
                                let _ = ready_tx.send(());
                            }
                            connected_before = true;
                        }
                        Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => {
                            let _ = ready_tx.send(());
                        }
                        Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => {
                            acked.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                            on_publish(p.topic, p.payload.to_vec());
                        }
                        Ok(Ok(_)) | Err(RecvTimeoutError::Timeout) => {}
                        Ok(Err(ConnectionError::RequestsDone)) | Err(_) => break,
                        // rumqttc reconnects on the next call; do not spin while the broker is away.
                        Ok(Err(_)) => thread::sleep(Duration::from_millis(200)),
                    }
                    let eventloop = &connection.eventloop;
                    unacked.store(
                        u64::from(eventloop.state.inflight()) + eventloop.pending.len() as u64,
                        Ordering::Relaxed,
                    );
                }
            })
        };
        ready_rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("{id} did not connect (and subscribe) within 20 s"));
        Mqtt {
            client,
            acked,
            unacked,
            lost_sessions,
            stop,
            thread: Some(thread),
        }
    }

    /// Hands a QoS 1 publish to rumqttc. Waits while its queue is full (the broker is paused or
    /// away): the publisher slows down instead of dropping, as a device with a bounded buffer
    /// would. False when the run was stopped meanwhile.
    fn publish(&self, topic: String, payload: Vec<u8>) -> bool {
        loop {
            match self
                .client
                .try_publish(&topic, QoS::AtLeastOnce, false, payload.clone())
            {
                Ok(()) => return true,
                Err(_) if !stopped() => thread::sleep(Duration::from_millis(1)),
                Err(_) => return false,
            }
        }
    }

    /// Waits until `sent` publishes are all acknowledged; false after `limit`.
    fn settle(&self, sent: u64, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline && !stopped() {
            if self.acked.load(Ordering::Relaxed) >= sent
                && self.unacked.load(Ordering::Relaxed) == 0
            {
                return true;
            }
            thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

impl Drop for Mqtt {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// What the collector received, in arrival order.
#[derive(Default)]
struct Received {
    messages: Vec<(String, Vec<u8>)>,
    last_at: Option<Instant>,
}

/// The regular devices' publisher, paced at `rate`; republishes recent readings on request.
struct Publisher {
    stop: Arc<AtomicBool>,
    published: Arc<AtomicU64>,
    dup_requests: Arc<AtomicU64>,
    dups: Arc<AtomicU64>,
    /// (readings published, seconds since the start) every 1,000 readings: when a reading left.
    progress: Arc<Mutex<Vec<(u64, f64)>>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Publisher {
    fn start(
        mqtt: Arc<Mqtt>,
        scenario: Arc<Scenario>,
        rate: f64,
        seed: u64,
        epoch: Instant,
    ) -> Publisher {
        let stop = Arc::new(AtomicBool::new(false));
        let published = Arc::new(AtomicU64::new(0));
        let dup_requests = Arc::new(AtomicU64::new(0));
        let dups = Arc::new(AtomicU64::new(0));
        let progress = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (stop, published, dup_requests, dups, progress) = (
                stop.clone(),
                published.clone(),
                dup_requests.clone(),
                dups.clone(),
                progress.clone(),
            );
            thread::spawn(move || {
                let mut rng = Rng::new(seed ^ 0x5eed_0fd0_b5b5);
                let devices = scenario.devices;
                let start = Instant::now();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) && !stopped() {
                    let due = (start.elapsed().as_secs_f64() * rate) as u64;
                    if n >= due {
                        thread::sleep(Duration::from_millis(1));
                        continue;
                    }
                    for _ in 0..(due - n).min(500) {
                        let (d, seq) = (n % devices, n / devices);
                        if !mqtt.publish(Scenario::topic(d), scenario.payload(d, seq)) {
                            break;
                        }
                        n += 1;
                        if n.is_multiple_of(1000) {
                            progress
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .push((n, epoch.elapsed().as_secs_f64()));
                        }
                    }
                    published.store(n, Ordering::Relaxed);
                    // A duplicate is a reading published again, up to 60 of its device's readings
                    // later: inside the 64-wide redelivery window weir keeps per device.
                    while dup_requests.load(Ordering::Relaxed) > 0 && n > devices {
                        dup_requests.fetch_sub(1, Ordering::Relaxed);
                        let d = rng.below(devices);
                        let newest = scenario.readings_of(n, d) - 1;
                        let seq = newest.saturating_sub(rng.below(60));
                        if mqtt.publish(Scenario::topic(d), scenario.payload(d, seq)) {
                            dups.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                published.store(n, Ordering::Relaxed);
            })
        };
        Publisher {
            stop,
            published,
            dup_requests,
            dups,
            progress,
            thread: Some(thread),
        }
    }

    /// Stops publishing; the number of regular readings published.
    fn finish(&mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        self.published.load(Ordering::Relaxed)
    }

    /// About when reading `n` was published, in seconds since the start.
    fn published_at(&self, n: u64) -> f64 {
        let progress = self.progress.lock().unwrap_or_else(PoisonError::into_inner);
        let i = progress.partition_point(|(count, _)| *count <= n);
        progress
            .get(i)
            .or(progress.last())
            .map_or(0.0, |(_, at)| *at)
    }
}

// ---------------------------------------------------------------------------------------------
// The soak run.

struct FaultRecord {
    kind: Fault,
    at: f64,
}

/// The faults' own state: the injector client, what it published, the counters.
struct Injector {
    mqtt: Arc<Mqtt>,
    sent: u64,
    next_marker: u64,
    injected: Vec<Injected>,
    floods: u64,
    flood_ids: u64,
}

#[allow(clippy::too_many_arguments)]
fn inject(
    kind: Fault,
    rng: &mut Rng,
    o: &Options,
    broker: &mut Broker,
    weir: &mut Weir,
    disk: &Path,
    injector: &mut Injector,
    publisher: &Publisher,
    scenario: &Scenario,
) -> String {
    let device = rng.below(o.devices);
    let ts = scenario.ts(publisher.published.load(Ordering::Relaxed) / o.devices);
    match kind {
        Fault::BrokerRestart => broker.restart(Duration::from_secs_f64(rng.between(0.5, 3.0))),
        Fault::Pause => {
            let pause = Duration::from_secs_f64(rng.between(1.0, 5.0));
            send_signal(broker.pid(), "STOP");
            nap(pause);
            send_signal(broker.pid(), "CONT");
            format!("paused {:.1} s", pause.as_secs_f64())
        }
        Fault::Kill => {
            let pid = WEIR_PID.load(Ordering::Relaxed);
            weir.kill();
            let down = Duration::from_secs_f64(rng.between(0.0, 2.0));
            nap(down);
            match weir.start() {
                Ok(ready) => format!(
                    "pid {pid} killed; down {:.1} s, ready {:.0} ms after the restart",
                    down.as_secs_f64(),
                    ready.as_secs_f64() * 1e3
                ),
                Err(err) => format!("pid {pid} killed; restart: {err}"),
            }
        }
        Fault::Disk => {
            let filler = disk.join("filler");
            let filled = fill(&filler);
            let hold = Duration::from_secs_f64(rng.between(2.0, 6.0));
            nap(hold);
            let _ = std::fs::remove_file(&filler);
            format!(
                "{:.1} MB filled the disk for {:.1} s, then freed",
                filled as f64 / 1e6,
                hold.as_secs_f64()
            )
        }
        Fault::Oversized | Fault::OversizedPacket => {
            let size = if kind == Fault::Oversized {
                OVERSIZED
            } else {
                OVERSIZED_PACKET
            };
            let marker = injector.next_marker;
            injector.next_marker += 1;
            injector.injected.push(Injected {
                marker,
                reason: "too_large",
                what: if kind == Fault::Oversized {
                    "100 kB payload"
                } else {
                    "300 kB payload (above max_packet_bytes)"
                },
            });
            if injector
                .mqtt
                .publish(Scenario::topic(device), oversized(marker, ts, size))
            {
                injector.sent += 1;
            }
            format!("bad-{marker}, {size} bytes on dev-{device:04}")
        }
        Fault::Malformed => {
            let batch = malformed_batch(injector.next_marker, ts);
            injector.next_marker += batch.len() as u64;
            let markers = format!(
                "bad-{}..bad-{}",
                batch[0].0.marker,
                batch[batch.len() - 1].0.marker
            );
            for (injected, payload) in batch {
                let d = rng.below(o.devices);
                if injector.mqtt.publish(Scenario::topic(d), payload) {
                    injector.sent += 1;
                    injector.injected.push(injected);
                }
            }
            markers
        }
        Fault::Dup => {
            let count = 5 + rng.below(16);
            publisher.dup_requests.fetch_add(count, Ordering::Relaxed);
            format!("{count} readings again")
        }
        Fault::Flood => {
            let flood = injector.floods;
            injector.floods += 1;
            let started = Instant::now();
            let mut sent = 0;
            while sent < o.flood_size {
                let payload =
                    format!(r#"{{"ts": {ts}, "seq": 0, "temperature": 20.0, "humidity": 40.0}}"#);
                if !injector.mqtt.publish(
                    format!("sensors/flood/f{flood}-{sent}/telemetry"),
                    payload.into_bytes(),
                ) {
                    break;
                }
                sent += 1;
            }
            injector.sent += sent;
            injector.flood_ids += sent;
            format!(
                "{sent} new ids handed over in {:.1} s",
                started.elapsed().as_secs_f64()
            )
        }
    }
}

/// Writes `path` until the file system is full; the bytes written.
fn fill(path: &Path) -> u64 {
    let Ok(mut file) = std::fs::File::create(path) else {
        return 0;
    };
    let mut written = 0;
    for chunk in [1 << 20, 4096, 1] {
        let block = vec![0u8; chunk];
        while file.write_all(&block).is_ok() {
            written += chunk as u64;
        }
    }
    let _ = file.sync_all();
    written
}

/// Lines of weir's log at WARN or ERROR, grouped by their message (fields and times left out).
fn log_summary(log: &Path) -> Vec<(usize, String)> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for line in text.lines() {
        let Some(at) = line.find(" WARN ").or_else(|| line.find(" ERROR ")) else {
            continue;
        };
        let rest = line[at..].trim();
        // "LEVEL target: message key=value ...": keep the level, target and message.
        let cut = rest
            .find('=')
            .and_then(|eq| rest[..eq].rfind(' '))
            .unwrap_or(rest.len());
        let mut message: String = rest[..cut].chars().take(150).collect();
        message.truncate(message.trim_end().len());
        *counts.entry(message).or_default() += 1;
    }
    let mut out: Vec<(usize, String)> = counts.into_iter().map(|(m, c)| (c, m)).collect();
    out.sort_by_key(|entry| std::cmp::Reverse(entry.0));
    out
}

fn run_soak(o: &Options) -> bool {
    let cap = o.device_cap.unwrap_or(2000);
    // Two workers (one per core here); what weir may hold at once: every regular device, and
    // flood ids up to the cap of each worker.
    let workers = 2;
    // 16 MB fixed: weir at rest (10 MB), the two worker queues full (2 x 4,096 readings) and
    // the outbox while the broker is away; then every device slot, snapshots included.
    let slots = workers * cap + o.devices as usize;
    let bound_mb = o
        .rss_limit_mb
        .unwrap_or_else(|| rss_bound_mb(16.0, slots, true));
    println!(
        "soak: seed {} (repeat with --seed {}), {} min at {}/s over {} devices, a fault every ~{} s",
        o.seed, o.seed, o.minutes, o.rate, o.devices, o.fault_every
    );
    println!(
        "soak: faults {}; device cap {cap} per worker; RSS bound {bound_mb:.0} MB; weir {WEIR}",
        if o.faults.is_empty() {
            "none".to_owned()
        } else {
            o.faults
                .iter()
                .map(|f| f.name())
                .collect::<Vec<_>>()
                .join(",")
        }
    );

    for kind in &o.faults {
        println!("  {:<16} {}", kind.name(), kind.what());
    }
    let scratch = Scratch::new("soak");
    // 64 MB, not a few: between two snapshots the input log holds about 10 s of readings (3 MB
    // at 2,000/s) besides two snapshots. The disk fault fills what is left with a file to the
    // last byte and deletes it, as a gateway's other writers would.
    let disk = scratch.mount_tmpfs("state-disk", 64);
    let mut broker = Broker::start(scratch.dir.join("broker"), true);
    let config = weir_config(
        &scratch.dir.join("weir.toml"),
        &[
            ("snapshot_interval = \"30s\"", "snapshot_interval = \"5s\""),
            (
                "max_devices_per_worker = 100000",
                &format!("max_devices_per_worker = {cap}"),
            ),
            ("workers = 0", &format!("workers = {workers}")),
        ],
    );
    let mut weir = Weir::new(
        config,
        disk.join("state"),
        &broker.addr(),
        scratch.dir.join("weir.log"),
    );

    // The collector first, so its persistent session exists before weir publishes anything.
    let received: Arc<Mutex<Received>> = Arc::default();
    let collector = {
        let sink = received.clone();
        Mqtt::connect(
            &broker,
            "soak-collector",
            &["alerts/#", "rollups/#", "weir/dead-letter/#"],
            Box::new(move |topic, payload| {
                let mut r = sink.lock().unwrap_or_else(PoisonError::into_inner);
                r.messages.push((topic, payload));
                r.last_at = Some(Instant::now());
            }),
        )
    };
    if let Err(err) = weir.start() {
        panic!("{err}; see {}", weir.log.display());
    }
    let sampler = RssSampler::start();
    let scenario = Arc::new(Scenario::new(o.devices, o.rate));
    let epoch = Instant::now();
    let publishing = Arc::new(Mqtt::connect(
        &broker,
        "soak-publisher",
        &[],
        Box::new(|_, _| {}),
    ));
    let mut injector = Injector {
        mqtt: Arc::new(Mqtt::connect(
            &broker,
            "soak-injector",
            &[],
            Box::new(|_, _| {}),
        )),
        sent: 0,
        next_marker: 0,
        injected: Vec::new(),
        floods: 0,
        flood_ids: 0,
    };
    let mut publisher =
        Publisher::start(publishing.clone(), scenario.clone(), o.rate, o.seed, epoch);

    // Faults, one at a time, at random gaps around the mean.
    let mut rng = Rng::new(o.seed);
    let mut records: Vec<FaultRecord> = Vec::new();
    let mut crashes: Vec<String> = Vec::new();
    let run_for = Duration::from_secs_f64(o.minutes * 60.0);
    let mut next_fault = epoch + Duration::from_secs_f64(rng.between(0.5, 1.0) * o.fault_every);
    let mut next_report = epoch + Duration::from_secs(30);
    while epoch.elapsed() < run_for && !stopped() {
        if Instant::now() >= next_fault && !o.faults.is_empty() {
            let kind = o.faults[rng.below(o.faults.len() as u64) as usize];
            let at = epoch.elapsed().as_secs_f64();
            let note = inject(
                kind,
                &mut rng,
                o,
                &mut broker,
                &mut weir,
                &disk,
                &mut injector,
                &publisher,
                &scenario,
            );
            println!(
                "[{at:6.1} s] {:<16} {note} (weir RSS {:.1} MB)",
                kind.name(),
                sampler.last_mb()
            );
            records.push(FaultRecord { kind, at });
            next_fault =
                Instant::now() + Duration::from_secs_f64(rng.between(0.5, 1.5) * o.fault_every);
        }
        if !stopped() && !weir.proc.as_mut().is_some_and(Proc::running) {
            // weir ended on its own: a crash. Counted as a failure; restarted so the run goes on.
            let status = weir
                .proc
                .as_mut()
                .and_then(|p| p.child.as_mut()?.try_wait().ok().flatten());
            let at = epoch.elapsed().as_secs_f64();
            let restart = weir.start().map_or_else(|err| err, |_| "restarted".into());
            println!("[{at:6.1} s] weir exited on its own ({status:?}); {restart}");
            crashes.push(format!("at {at:.1} s: {status:?}"));
        }
        if Instant::now() >= next_report {
            next_report += Duration::from_secs(30);
            let metric = |name| weir.metric(name).map_or("-".into(), |v| format!("{v:.0}"));
            println!(
                "[{:6.1} s] published {}; since weir's last start it received {} and acked {}; collector {} messages; RSS {:.1} MB (peak {:.1})",
                epoch.elapsed().as_secs_f64(),
                publisher.published.load(Ordering::Relaxed),
                metric("weir_readings_received_total"),
                metric("weir_inputs_acked_total"),
                received.lock().unwrap_or_else(PoisonError::into_inner).messages.len(),
                sampler.last_mb(),
                sampler.peak_mb()
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
    let published = publisher.finish();
    let dups = publisher.dups.load(Ordering::Relaxed);
    if stopped() {
        return false;
    }

    // Drain: everything handed to the clients reaches the broker; then every expected event (or
    // nothing more for 20 s); then a clean stop.
    println!(
        "[{:6.1} s] publishing stopped; draining",
        epoch.elapsed().as_secs_f64()
    );
    let all_acked = publishing.settle(published + dups, Duration::from_secs(60))
        & injector.mqtt.settle(injector.sent, Duration::from_secs(60));
    let expected = scenario.expected(published);
    let complete = |r: &Received| {
        let keys: BTreeSet<Key> = r
            .messages
            .iter()
            .filter(|(topic, _)| !topic.starts_with("weir/"))
            .filter_map(|(_, p)| key_of(&serde_json::from_slice(p).ok()?).ok())
            .collect();
        expected.keys().all(|k| keys.contains(k))
    };
    let drain_started = Instant::now();
    let mut last_check = Instant::now();
    let mut last_progress = Instant::now();
    let mut last_weir_decoded = None;
    loop {
        if stopped() {
            return false;
        }
        // Progress is a new message at the collector or a new reading at weir; 20 s without
        // either (counted from the drain's start) ends the wait.
        let last_message = received
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .last_at;
        // Decoded, not received: a reading redelivered in a loop is received again and again.
        let weir_decoded = weir.metric("weir_readings_decoded_total");
        if weir_decoded != last_weir_decoded {
            (last_weir_decoded, last_progress) = (weir_decoded, Instant::now());
        }
        if let Some(at) = last_message {
            last_progress = last_progress.max(at);
        }
        let quiet = last_progress.elapsed() > Duration::from_secs(20);
        if quiet || drain_started.elapsed() > Duration::from_secs(300) {
            break;
        }
        if last_check.elapsed() > Duration::from_secs(2) {
            last_check = Instant::now();
            if complete(&received.lock().unwrap_or_else(PoisonError::into_inner)) {
                // Whatever is still queued for the last redeliveries arrives within a moment.
                thread::sleep(Duration::from_secs(2));
                break;
            }
        }
        thread::sleep(Duration::from_millis(200));
    }
    let drained = drain_started.elapsed();
    let counters: Vec<String> = [
        ("received", "weir_readings_received_total"),
        ("decoded", "weir_readings_decoded_total"),
        ("duplicates dropped", "weir_duplicates_dropped_total"),
        ("acked", "weir_inputs_acked_total"),
        ("evicted", "weir_devices_evicted_total"),
        ("reconnects", "weir_mqtt_reconnects_total"),
    ]
    .iter()
    .map(|(what, name)| {
        let value = weir.metric(name).map_or("-".into(), |v| format!("{v:.0}"));
        format!("{what} {value}")
    })
    .collect();
    let (exit, shutdown) = weir.terminate();
    thread::sleep(Duration::from_secs(1));
    drop(collector);
    let peak_mb = sampler.peak_mb();

    // ---- The comparison.
    let messages = std::mem::take(
        &mut received
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .messages,
    );
    let mut first_copy: HashMap<String, Vec<u8>> = HashMap::new();
    let mut copies = 0u64;
    let mut differing = 0u64;
    let mut by_key: BTreeMap<Key, (String, Value)> = BTreeMap::new();
    let mut unexpected: Vec<String> = Vec::new();
    let mut different: Vec<String> = Vec::new();
    let mut flood_events = 0u64;
    let mut letters: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
    let mut letter_copies = 0u64;
    let mut unknown_letters: BTreeMap<String, u64> = BTreeMap::new();
    for (topic, payload) in &messages {
        let Ok(value) = serde_json::from_slice::<Value>(payload) else {
            unexpected.push(format!("not JSON on {topic}"));
            continue;
        };
        if topic.starts_with("weir/dead-letter/") {
            let reason = value["reason"].as_str().unwrap_or("?").to_owned();
            match marker_of(&value) {
                Some(marker) => {
                    let reasons = letters.entry(marker).or_default();
                    if !reasons.insert(reason) {
                        letter_copies += 1;
                    }
                }
                None => *unknown_letters.entry(reason).or_default() += 1,
            }
            continue;
        }
        let id = value["id"].as_str().unwrap_or_default().to_owned();
        if let Some(first) = first_copy.get(&id) {
            copies += 1;
            if first != payload {
                differing += 1;
                if differing <= 5 {
                    different.push(format!(
                        "duplicate of {id} differs:\n    first {}\n    later {}",
                        String::from_utf8_lossy(first),
                        String::from_utf8_lossy(payload)
                    ));
                }
            }
            continue;
        }
        first_copy.insert(id.clone(), payload.clone());
        match key_of(&value) {
            Ok(key) => match expected.get(&key) {
                Some(want) => {
                    if !want.matches(&value) {
                        different.push(format!("{key:?}: expected {want:?}, got {value}"));
                    }
                    if let Some((other, _)) = by_key.insert(key, (id.clone(), value)) {
                        different.push(format!("{key:?} came with two ids: {other} and {id}"));
                    }
                }
                None => unexpected.push(format!("{topic}: {value}")),
            },
            Err(device) if device.starts_with('f') => {
                flood_events += 1;
                unexpected.push(format!("{topic}: {value}"));
            }
            Err(_) => unexpected.push(format!("{topic}: {value}")),
        }
    }
    let missing: Vec<&Key> = expected
        .keys()
        .filter(|k| !by_key.contains_key(k))
        .collect();
    let mut dead_missing = Vec::new();
    let mut dead_wrong = Vec::new();
    let mut dead_by_reason: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    for bad in &injector.injected {
        let entry = dead_by_reason.entry(bad.reason).or_default();
        entry.0 += 1;
        match letters.get(&bad.marker) {
            None => dead_missing.push(format!("bad-{} ({}, {})", bad.marker, bad.what, bad.reason)),
            Some(reasons) if !reasons.contains(bad.reason) => dead_wrong.push(format!(
                "bad-{} ({}): {reasons:?}, expected {}",
                bad.marker, bad.what, bad.reason
            )),
            Some(_) => entry.1 += 1,
        }
    }

    // ---- The summary.
    let alerts = expected
        .keys()
        .filter(|k| matches!(k, Key::Alert { .. }))
        .count();
    let mut table = String::new();
    let mut row = |what: &str, value: String| {
        let _ = writeln!(table, "| {what:<34} | {value} |");
    };
    row("seed", o.seed.to_string());
    row(
        "duration",
        format!(
            "{:.1} min publishing, {:.1} s draining",
            o.minutes,
            drained.as_secs_f64()
        ),
    );
    for kind in Fault::ALL {
        let n = records.iter().filter(|r| r.kind == kind).count();
        if o.faults.contains(&kind) {
            row(&format!("faults: {}", kind.name()), n.to_string());
        }
    }
    row(
        "readings published",
        format!(
            "{published} regular ({} devices), {dups} duplicates, {} flood ids in {} floods, {} bad payloads",
            o.devices,
            injector.flood_ids,
            injector.floods,
            injector.injected.len()
        ),
    );
    row(
        "events expected",
        format!(
            "{} ({alerts} alerts, {} windows)",
            expected.len(),
            expected.len() - alerts
        ),
    );
    row(
        "events received",
        format!(
            "{} distinct ids, {} messages",
            first_copy.len(),
            first_copy.len() as u64 + copies
        ),
    );
    row("missing", missing.len().to_string());
    row("different from the oracle", different.len().to_string());
    row(
        "unexpected",
        format!("{} ({flood_events} of flood ids)", unexpected.len()),
    );
    row(
        "duplicates",
        format!("{copies} ({differing} not byte-identical to the first copy)"),
    );
    for (reason, (want, got)) in &dead_by_reason {
        row(
            &format!("dead letters: {reason}"),
            format!("{got} of {want}"),
        );
    }
    if letter_copies > 0 || !unknown_letters.is_empty() {
        row(
            "dead letters: other",
            format!("{letter_copies} repeated, unmatched {unknown_letters:?}"),
        );
    }
    row(
        "peak RSS of weir",
        format!("{peak_mb:.1} MB (bound {bound_mb:.0} MB)"),
    );
    row(
        "weir restarts",
        format!(
            "{} ({} after SIGKILL, {} after exiting on its own); SIGTERM at the end: {} in {} ms",
            weir.starts - 1,
            records.iter().filter(|r| r.kind == Fault::Kill).count(),
            crashes.len(),
            exit.map_or("killed after 20 s".into(), |s| s.to_string()),
            shutdown.as_millis()
        ),
    );
    row("weir's counters since its last start", counters.join(", "));
    row(
        "publisher sessions lost",
        (publishing.lost_sessions.load(Ordering::Relaxed)
            + injector.mqtt.lost_sessions.load(Ordering::Relaxed))
        .to_string(),
    );
    println!("\n| {:<34} | value |\n|---|---|\n{table}", "soak");

    let mut failures = Vec::new();
    if !all_acked {
        failures
            .push("the broker did not acknowledge every published reading within 60 s".to_owned());
    }
    if !missing.is_empty() {
        let first = missing[0];
        let seq = match *first {
            Key::Alert { ts, .. } => (ts - scenario.ts0) / scenario.step_ms,
            Key::Window { start, .. } => (start - scenario.ts0) / scenario.step_ms,
        } as u64;
        let at = publisher.published_at(seq * o.devices + first.device());
        let before: Vec<String> = records
            .iter()
            .filter(|r| r.at <= at + 1.0)
            .rev()
            .take(3)
            .map(|r| format!("{} at {:.1} s", r.kind.name(), r.at))
            .collect();
        let per_device = missing
            .iter()
            .map(|k| k.device())
            .collect::<BTreeSet<_>>()
            .len();
        failures.push(format!(
            "{} events missing over {per_device} devices; the first ({first:?}) from a reading published at about {at:.1} s, after {before:?}",
            missing.len()
        ));
    }
    failures.extend(different.iter().take(5).cloned());
    if different.len() > 5 {
        failures.push(format!("... {} more differences", different.len() - 5));
    }
    failures.extend(
        unexpected
            .iter()
            .take(5)
            .map(|u| format!("unexpected: {u}")),
    );
    if !dead_missing.is_empty() {
        failures.push(format!(
            "{} bad payloads have no dead letter: {}",
            dead_missing.len(),
            dead_missing
                .iter()
                .take(6)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    failures.extend(
        dead_wrong
            .iter()
            .take(5)
            .map(|w| format!("dead letter reason: {w}")),
    );
    if peak_mb > bound_mb {
        failures.push(format!(
            "peak RSS {peak_mb:.1} MB is over the bound of {bound_mb:.0} MB"
        ));
    }
    if !crashes.is_empty() {
        failures.push(format!("weir exited on its own: {crashes:?}"));
    }
    if exit.is_none_or(|s| !s.success()) {
        failures.push("weir did not exit cleanly on SIGTERM".to_owned());
    }
    let warnings = log_summary(&weir.log);
    if !warnings.is_empty() {
        println!("weir's warnings and errors (count, message):");
        for (count, message) in warnings.iter().take(12) {
            println!("  {count:>6}  {message}");
        }
    }
    if let Some(dir) = &o.keep_logs {
        let _ = std::fs::create_dir_all(dir);
        let _ = std::fs::copy(&weir.log, dir.join("weir.log"));
        let _ = std::fs::copy(broker.dir.join("mosquitto.log"), dir.join("mosquitto.log"));
        println!("logs kept in {}", dir.display());
    }
    if failures.is_empty() {
        println!("\nsoak PASSED");
        true
    } else {
        println!("\nsoak FAILED:");
        for f in &failures {
            println!("  - {f}");
        }
        false
    }
}

// ---------------------------------------------------------------------------------------------
// Memory under a flood of device ids (item 6).

/// Publishes `count` readings of distinct device ids at QoS 0 as fast as the socket takes them,
/// over raw MQTT 3.1.1 (a few instructions per message, so the publisher leaves the CPU to weir
/// and the broker); `published` follows its progress.
fn flood_publisher(
    broker: String,
    count: u64,
    ts: i64,
    published: Arc<AtomicU64>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut stream = TcpStream::connect(&broker).expect("connect to the broker");
        let mut packet = vec![0x10];
        let mut body = Vec::new();
        push_str(&mut body, b"MQTT");
        body.extend_from_slice(&[4, 0x02, 0, 0]);
        push_str(&mut body, b"soak-flood");
        push_len(&mut packet, body.len());
        packet.extend_from_slice(&body);
        stream.write_all(&packet).expect("CONNECT");
        let mut connack = [0u8; 4];
        stream.read_exact(&mut connack).expect("CONNACK");
        let mut buf = Vec::with_capacity(1 << 20);
        let mut i = 0;
        while i < count && !stopped() {
            buf.clear();
            let batch_end = (i + 2000).min(count);
            while i < batch_end {
                let topic = format!("sensors/flood/id-{i:07}/telemetry");
                let payload = format!(
                    r#"{{"ts": {ts}, "seq": 0, "temperature": 20.0, "humidity": 40.0, "battery": 3.9}}"#
                );
                push_publish(&mut buf, topic.as_bytes(), payload.as_bytes(), 0, 0);
                i += 1;
            }
            stream.write_all(&buf).expect("publish");
            published.store(i, Ordering::Relaxed);
        }
        let _ = stream.write_all(&[0xe0, 0]);
    })
}

fn run_flood(o: &Options, ids: u64) -> bool {
    // The example's cap unless given; two workers, as on this 2-core machine.
    let cap = o.device_cap.unwrap_or(100_000);
    let workers = 2usize;
    let scratch = Scratch::new("flood");
    let broker = Broker::start(scratch.dir.join("broker"), false);
    // The example at QoS 0 end to end (at_most_once). With a state dir (on disk here) it
    // snapshots every 5 s, so the peak includes encoding a snapshot of a full device table, as
    // a flood longer than the example's 30 s would.
    let mut replacements = vec![
        (
            r#"mode = "at_least_once""#,
            r#"mode = "at_most_once""#.to_owned(),
        ),
        ("clean_session = false", "clean_session = true".to_owned()),
        ("qos = 1", "qos = 0".to_owned()),
        (
            "snapshot_interval = \"30s\"",
            "snapshot_interval = \"5s\"".to_owned(),
        ),
        (
            "max_devices_per_worker = 100000",
            format!("max_devices_per_worker = {cap}"),
        ),
        ("workers = 0", format!("workers = {workers}")),
    ];
    if o.no_state_dir {
        replacements.push((
            r#"state_dir = "/var/lib/weir""#,
            "# no state dir".to_owned(),
        ));
    }
    let replacements: Vec<(&str, &str)> =
        replacements.iter().map(|(a, b)| (*a, b.as_str())).collect();
    let config = weir_config(&scratch.dir.join("weir.toml"), &replacements);
    let mut weir = Weir::new(
        config,
        scratch.dir.join("state"),
        &broker.addr(),
        scratch.dir.join("weir.log"),
    );
    weir.state_dir = !o.no_state_dir;
    if let Err(err) = weir.start() {
        panic!("{err}; see {}", weir.log.display());
    }
    let sampler = RssSampler::start();
    thread::sleep(Duration::from_millis(500));
    let base_mb = sampler.last_mb();
    println!(
        "flood: {ids} distinct device ids at full speed (QoS 0) into weir with the example's rules, {}; cap {cap} devices per worker x {workers} workers; RSS at start {base_mb:.1} MB",
        if o.no_state_dir { "no state dir" } else { "a snapshot every 5 s" }
    );
    let published = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let ts = now_ms() - 3_600_000;
    let publisher = flood_publisher(broker.addr(), ids, ts, published.clone());
    println!(
        "\n| {:>6} | {:>10} | {:>10} | {:>9} | {:>9} | {:>9} | {:>8} | {:>8} |",
        "s", "published", "decoded", "devices", "evicted", "snapshots", "RSS MB", "peak MB"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let (mut last_decoded, mut idle_since) = (0.0, Instant::now());
    let mut at_cap: Option<(f64, f64)> = None;
    // Twice the cap: the topic cache has filled with evicted ids once and been cleared; past
    // this, RSS must not grow with more ids.
    let mut at_cycled: Option<(f64, f64)> = None;
    // RSS between snapshots and during them, once the flood is over.
    let mut settled = (f64::MAX, 0.0f64);
    let mut finished_at: Option<Instant> = None;
    let mut next_row = Instant::now();
    // After the last reading: `--settle` s more (default 12), so snapshots of the full table
    // are in the figures.
    let settle = Duration::from_secs_f64(o.settle);
    while finished_at.is_none_or(|at| at.elapsed() < settle) {
        if stopped() {
            return false;
        }
        let text = http_get(&weir.metrics, "/metrics")
            .map(|(_, t)| t)
            .unwrap_or_default();
        let decoded = sum_metric(&text, "weir_readings_decoded_total");
        let devices = sum_metric(&text, "weir_devices_tracked");
        if at_cap.is_none() && devices >= (workers * cap) as f64 * 0.999 {
            at_cap = Some((decoded, sampler.last_mb()));
        }
        if at_cycled.is_none() && decoded >= (2 * workers * cap) as f64 {
            at_cycled = Some((decoded, sampler.last_mb()));
        }
        if decoded > last_decoded {
            (last_decoded, idle_since) = (decoded, Instant::now());
        }
        if finished_at.is_none()
            && publisher.is_finished()
            && (decoded >= ids as f64 || idle_since.elapsed() > Duration::from_secs(5))
        {
            finished_at = Some(Instant::now());
        }
        if finished_at.is_some() {
            let now = sampler.last_mb();
            settled = (settled.0.min(now), settled.1.max(now));
        }
        if Instant::now() >= next_row {
            next_row += Duration::from_secs(1);
            println!(
                "| {:>6.1} | {:>10} | {:>10.0} | {:>9.0} | {:>9.0} | {:>9.0} | {:>8.1} | {:>8.1} |",
                started.elapsed().as_secs_f64(),
                published.load(Ordering::Relaxed),
                decoded,
                devices,
                sum_metric(&text, "weir_devices_evicted_total"),
                sum_metric(&text, "weir_snapshots_written_total"),
                sampler.last_mb(),
                sampler.peak_mb()
            );
        }
        thread::sleep(Duration::from_millis(100));
    }
    let _ = publisher.join();
    let end_mb = sampler.last_mb();
    let peak_mb = sampler.peak_mb();
    let received = weir.metric("weir_readings_received_total").unwrap_or(0.0);
    let (exit, _) = weir.terminate();
    let slots = workers * cap;
    let state_dir = !o.no_state_dir;
    let bound_mb = o
        .rss_limit_mb
        .unwrap_or_else(|| rss_bound_mb(base_mb, slots, state_dir));
    println!(
        "\nflood: {ids} ids published, {received:.0} received by weir, {:.1} s",
        started.elapsed().as_secs_f64()
    );
    println!(
        "flood: RSS {base_mb:.1} MB at start; {} when the device tables were full; {end_mb:.1} MB at the end; peak {peak_mb:.1} MB",
        at_cap.map_or("never full".into(), |(decoded, mb)| format!(
            "{mb:.1} MB after {decoded:.0} ids"
        ))
    );
    if let (Some((decoded, mb)), false) = (at_cycled, state_dir) {
        println!(
            "flood: after {decoded:.0} ids (twice the cap) {mb:.1} MB; after {ids}: {end_mb:.1} MB ({:+.1} MB for {:.0} more ids)",
            end_mb - mb,
            ids as f64 - decoded
        );
    }
    if state_dir {
        println!(
            "flood: after the flood, {:.1} MB between snapshots and up to {:.1} MB while one is written (sampled every 100 ms)",
            settled.0, settled.1
        );
    }
    println!(
        "flood: bound {bound_mb:.1} MB = {base_mb:.1} MB at start + {slots} device slots x ({LIVE_BYTES_PER_DEVICE} B of state and topic cache{}) x 1.1",
        if state_dir {
            format!(" + {SNAPSHOT_BYTES_PER_DEVICE} B while a snapshot is encoded")
        } else {
            String::new()
        }
    );
    println!(
        "flood: without snapshots that is {:.1} MB; the caps alone at the README's 628 B would be {:.1} MB",
        rss_bound_mb(base_mb, slots, false),
        base_mb + slots as f64 * 628.0 / 1_048_576.0
    );
    let ok = peak_mb <= bound_mb && exit.is_some_and(|s| s.success());
    println!(
        "flood {}: peak RSS {peak_mb:.1} MB {} the bound of {bound_mb:.1} MB",
        if ok { "PASSED" } else { "FAILED" },
        if peak_mb <= bound_mb {
            "within"
        } else {
            "OVER"
        }
    );
    ok
}

fn main() {
    let o = options();
    watch_signals();
    clean_leftovers();
    assert!(
        Path::new(MOSQUITTO).exists(),
        "{MOSQUITTO} is needed (Debian package mosquitto)"
    );
    let ok = match o.flood_devices {
        Some(ids) => run_flood(&o, ids),
        None => run_soak(&o),
    };
    if stopped() {
        std::process::exit(130);
    }
    if !ok {
        std::process::exit(1);
    }
}
