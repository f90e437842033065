//! Secrets never printed (issue 14): the real `weir` binary, run every way a broker password, an
//! API token or a URL with credentials reaches it, against a real Mosquitto that requires a
//! password; every byte it writes to stdout and stderr, and every HTTP answer, is searched for
//! the secrets.

mod common;

use common::{free_port, temp_dir, unique, Mosquitto, DEADLINE, EXAMPLE_CONFIG};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WEIR: &str = env!("CARGO_BIN_EXE_weir");
const MOSQUITTO_PASSWD: &str = "/usr/bin/mosquitto_passwd";

/// The broker password of user `weir`.
const SECRET: &str = "Sup3rS3cretPa55";
/// A password written as a TOML number (a PIN-like password without quotes).
const SECRET_NUMBER: &str = "73194628501";
/// A password the broker refuses; still a secret.
const WRONG: &str = "Wr0ngButPr1vate";
/// The bearer token `/api/*` requires (`WEIR_API_TOKEN`).
const TOKEN: &str = "T0kenN0b0dyMaySee";

const ALL_SECRETS: [&str; 4] = [SECRET, SECRET_NUMBER, WRONG, TOKEN];

/// Environment variables that would change what a run does; every run starts without them.
const WEIR_ENV: [&str; 8] = [
    "WEIR_BROKER",
    "WEIR_BROKER_PASSWORD",
    "WEIR_API_TOKEN",
    "WEIR_METRICS_ADDR",
    "WEIR_STATE_DIR",
    "WEIR_LOG",
    "WEIR_LOG_FORMAT",
    "RUST_LOG",
];

/// Everything weir said during a test, by where it came from.
#[derive(Default)]
struct Transcript(Vec<(String, String)>);

impl Transcript {
    fn add(&mut self, source: impl Into<String>, text: impl Into<String>) {
        self.0.push((source.into(), text.into()));
    }

    /// Fails with every place a secret showed up, not just the first, so one run lists all
    /// the leaks.
    fn assert_no_secret(&self) {
        let mut leaks = Vec::new();
        for (source, text) in &self.0 {
            for line in text.lines() {
                if let Some(secret) = ALL_SECRETS.iter().find(|s| line.contains(*s)) {
                    leaks.push(format!("  {source}: shows {secret:?}: {}", line.trim()));
                }
            }
        }
        assert!(
            leaks.is_empty(),
            "{} line(s) print a secret:\n{}",
            leaks.len(),
            leaks.join("\n")
        );
    }
}

/// A directory of the test's own, removed on drop (by the common guard it holds).
struct TempDir(common::TempDir);

impl TempDir {
    fn new(tag: &str) -> Self {
        Self(temp_dir(tag))
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

/// A Mosquitto whose user `weir` has the password [`SECRET`]; anonymous clients stay allowed,
/// but a client that names a user must give its password.
fn password_broker(dir: &TempDir) -> Mosquitto {
    assert!(
        Path::new(MOSQUITTO_PASSWD).exists(),
        "{MOSQUITTO_PASSWD} is missing; install it with `apt-get install mosquitto` (Debian/Ubuntu)"
    );
    let passwords = dir.path("passwords");
    let status = Command::new(MOSQUITTO_PASSWD)
        .arg("-b")
        .arg("-c")
        .arg(&passwords)
        .args(["weir", SECRET])
        .status()
        .expect("run mosquitto_passwd");
    assert!(status.success(), "mosquitto_passwd failed: {status}");
    Mosquitto::start_with(&format!("password_file {}\n", passwords.display()))
}

/// The example config for `url`, with `broker_lines` in place of its commented-out
/// username and password, and a client id of its own.
fn config_text(url: &str, broker_lines: &str) -> String {
    let text = std::fs::read_to_string(EXAMPLE_CONFIG).expect("read config/example.toml");
    let commented = "# username = \"weir\"\n# password = \"secret\"";
    assert!(text.contains(commented), "the example config changed");
    text.replace("mqtt://127.0.0.1:1883", url)
        .replace(commented, broker_lines)
        .replace(
            "client_id = \"weir-gateway\"",
            &format!("client_id = \"{}\"", unique("weir-secrets")),
        )
}

/// 1-based line of the first line of `text` that starts with `prefix`.
fn line_of(text: &str, prefix: &str) -> usize {
    text.lines()
        .position(|line| line.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starts with {prefix:?}"))
        + 1
}

/// One `weir` process with its stdout and stderr in files; killed on drop.
struct Weir {
    label: String,
    child: Child,
    dir: TempDir,
}

impl Weir {
    /// Starts `weir ARGS` with only `env` among weir's variables.
    fn spawn(label: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        let dir = TempDir::new("secrets-run");
        let stdout = std::fs::File::create(dir.path("stdout")).expect("create stdout file");
        let stderr = std::fs::File::create(dir.path("stderr")).expect("create stderr file");
        let mut command = Command::new(WEIR);
        for name in WEIR_ENV {
            command.env_remove(name);
        }
        let child = command
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("start weir");
        Self {
            label: label.to_owned(),
            child,
            dir,
        }
    }

    /// Runs `weir ARGS` to its end; (exit status, stdout and stderr).
    fn run(label: &str, args: &[&str], env: &[(&str, &str)]) -> (ExitStatus, String) {
        let mut weir = Self::spawn(label, args, env);
        let status = weir.wait();
        (status, weir.output())
    }

    fn output(&self) -> String {
        let read = |name| std::fs::read_to_string(self.dir.path(name)).unwrap_or_default();
        format!("{}{}", read("stdout"), read("stderr"))
    }

    fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for weir") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{}: weir did not exit within {DEADLINE:?}:\n{}",
                self.label,
                self.output()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then waits for the exit.
    fn terminate(&mut self) -> ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.wait()
    }

    fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "{}: weir exited early ({status}):\n{}",
                self.label,
                self.output()
            );
        }
    }
}

impl Drop for Weir {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.0 request to weir's endpoint, with the API token when given: (status, body).
async fn http(addr: SocketAddr, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
        let request =
            format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n{auth}Content-Length: 0\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&response).into_owned())
    };
    let text = tokio::time::timeout(DEADLINE, exchange)
        .await
        .unwrap_or_else(|_| panic!("{method} {path} timed out"))
        .unwrap_or_else(|err| panic!("{method} http://{addr}{path} failed: {err}"));
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {head:?}"));
    (status, body.to_owned())
}

/// Waits until `weir`'s `/readyz` says 200 (connected and subscribed).
async fn wait_ready(weir: &mut Weir, addr: SocketAddr) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        weir.assert_running();
        if tokio::net::TcpStream::connect(addr).await.is_ok()
            && http(addr, "GET", "/readyz", None).await.0 == 200
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{}: weir was not ready within {DEADLINE:?}:\n{}",
            weir.label,
            weir.output()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every endpoint weir serves, with and without the token: the bodies go into `transcript`.
async fn visit_endpoints(addr: SocketAddr, label: &str, transcript: &mut Transcript) {
    for path in ["/metrics", "/healthz", "/readyz"] {
        let (status, body) = http(addr, "GET", path, None).await;
        assert_eq!(status, 200, "{label}: GET {path}: {body}");
        transcript.add(format!("{label}: GET {path}"), body);
    }
    for path in ["/api/rules", "/api/reload"] {
        let (status, body) = http(addr, "GET", path, Some(TOKEN)).await;
        assert_eq!(status, 200, "{label}: GET {path}: {body}");
        transcript.add(format!("{label}: GET {path}"), body);
        let (status, body) = http(addr, "GET", path, Some("not-the-token")).await;
        assert_eq!(status, 401, "{label}: GET {path} without the token: {body}");
        transcript.add(format!("{label}: GET {path} (wrong token)"), body);
    }
}

#[test]
fn urls_with_credentials_are_refused_without_showing_the_password() {
    let dir = TempDir::new("secrets-urls");
    let broker = password_broker(&dir);
    let port = broker.port();
    let with_password = format!("mqtt://weir:{SECRET}@127.0.0.1:{port}");
    let good = dir.path("good.toml");
    std::fs::write(
        &good,
        config_text(
            &broker.url(),
            &format!("username = \"weir\"\npassword = \"{SECRET}\""),
        ),
    )
    .expect("write config");
    let good = good.to_str().expect("UTF-8 temp path");
    let state = dir.path("state");
    let state = state.to_str().expect("UTF-8 temp path");
    let metrics = format!("127.0.0.1:{}", free_port());
    let run = [
        "run",
        "--config",
        good,
        "--state-dir",
        state,
        "--metrics-addr",
        &metrics,
    ];

    let mut transcript = Transcript::default();
    // (label, how the URL is given, a word the refusal must contain)
    let urls = [
        ("credentials", with_password.clone(), "credentials"),
        (
            "token in the query",
            format!("mqtt://127.0.0.1:{port}?password={SECRET}"),
            "not a port number",
        ),
        (
            "credentials without a scheme",
            format!("weir:{SECRET}@127.0.0.1:{port}"),
            "not a broker URL",
        ),
        (
            "credentials and a path",
            format!("mqtts://weir:{SECRET}@127.0.0.1:{port}/mqtt"),
            "credentials",
        ),
    ];
    for (what, url, says) in &urls {
        for key in ["url", "publish_url"] {
            let config = dir.path(&format!("{key}.toml"));
            let text = if key == "url" {
                config_text(url, "")
            } else {
                config_text(&broker.url(), &format!("publish_url = \"{url}\""))
            };
            std::fs::write(&config, text).expect("write config");
            let config = config.to_str().expect("UTF-8 temp path");
            let label = format!("weir check, broker.{key} with {what}");
            let (status, output) = Weir::run(&label, &["check", "--config", config], &[]);
            assert!(!status.success(), "{label} passed:\n{output}");
            assert!(output.contains(says), "{label}: {output}");
            transcript.add(label, output);
        }
        let label = format!("weir run --broker with {what}");
        let args = [&run[..], &["--broker", url]].concat();
        let (status, output) = Weir::run(&label, &args, &[]);
        assert!(!status.success(), "{label} started:\n{output}");
        assert!(output.contains(says), "{label}: {output}");
        transcript.add(label, output);

        let label = format!("weir run with WEIR_BROKER with {what}");
        let (status, output) = Weir::run(&label, &run, &[("WEIR_BROKER", url)]);
        assert!(!status.success(), "{label} started:\n{output}");
        assert!(output.contains("WEIR_BROKER"), "{label}: {output}");
        transcript.add(label, output);

        let label = format!("weir record --broker with {what}");
        let args = [
            "record",
            "--broker",
            url,
            "--topic",
            "x",
            "--duration",
            "1s",
        ];
        let (status, output) = Weir::run(&label, &args, &[]);
        assert!(!status.success(), "{label} recorded:\n{output}");
        transcript.add(label, output);

        let label = format!("weir simulate --broker with {what}");
        let args = ["simulate", "--broker", url, "--duration", "1s"];
        let (status, output) = Weir::run(&label, &args, &[]);
        assert!(!status.success(), "{label} published:\n{output}");
        transcript.add(label, output);
    }
    for endpoint in [
        format!("http://weir:{SECRET}@127.0.0.1:4318"),
        format!("https://weir:{SECRET}@127.0.0.1:4318"),
        format!("http://127.0.0.1:4318/otlp?token={SECRET}"),
    ] {
        let config = dir.path("otlp.toml");
        let text = format!(
            "{}\n[observability]\notlp_endpoint = \"{endpoint}\"\n",
            config_text(&broker.url(), "")
        );
        std::fs::write(&config, text).expect("write config");
        let label = format!(
            "weir check, otlp_endpoint {}",
            endpoint.replace(SECRET, "…")
        );
        let config = config.to_str().expect("UTF-8 temp path");
        let (status, output) = Weir::run(&label, &["check", "--config", config], &[]);
        assert!(!status.success(), "{label} passed:\n{output}");
        transcript.add(label, output);
    }
    transcript.assert_no_secret();
}

#[test]
fn a_config_error_on_the_password_line_does_not_show_the_password() {
    let dir = TempDir::new("secrets-config");
    let broker = password_broker(&dir);
    let config = dir.path("weir.toml");
    let config_path = config.to_str().expect("UTF-8 temp path");
    let state = dir.path("state");
    let metrics = format!("127.0.0.1:{}", free_port());
    let run = [
        "run",
        "--config",
        config_path,
        "--state-dir",
        state.to_str().expect("UTF-8 temp path"),
        "--metrics-addr",
        &metrics,
    ];
    let mut transcript = Transcript::default();
    // (label, broker lines, the key whose line the error must name)
    let cases = [
        (
            "an unquoted numeric password",
            format!("username = \"weir\"\npassword = {SECRET_NUMBER}"),
            "password = ",
        ),
        (
            "an unquoted fractional password",
            format!("username = \"weir\"\npassword = {SECRET_NUMBER}.5"),
            "password = ",
        ),
        (
            "a password in an array",
            format!("username = \"weir\"\npassword = [\"{SECRET}\"]"),
            "password = ",
        ),
        (
            "a password and a password_file",
            format!("username = \"weir\"\npassword = \"{SECRET}\"\npassword_file = \"/pw\""),
            "password_file = ",
        ),
        (
            "a password without a username",
            format!("password = \"{SECRET}\""),
            "password = ",
        ),
        (
            "a password under a misspelled key",
            format!("username = \"weir\"\npasword = \"{SECRET}\""),
            "pasword = ",
        ),
    ];
    for (what, lines, key) in &cases {
        let text = config_text(&broker.url(), lines);
        std::fs::write(&config, &text).expect("write config");
        let place = format!("{config_path}:{}:", line_of(&text, key));
        for (command, args) in [
            ("check", &["check", "--config", config_path][..]),
            ("run", &run),
        ] {
            let label = format!("weir {command} with {what}");
            let (status, output) = Weir::run(&label, args, &[]);
            assert!(!status.success(), "{label} passed:\n{output}");
            assert!(
                output.contains(&place),
                "{label}: the error does not point at {place}:\n{output}"
            );
            transcript.add(label, output);
        }
    }
    // The environment's password, refused for want of a username.
    std::fs::write(&config, config_text(&broker.url(), "")).expect("write config");
    let label = "weir run with WEIR_BROKER_PASSWORD and no username";
    let (status, output) = Weir::run(label, &run, &[("WEIR_BROKER_PASSWORD", SECRET)]);
    assert!(!status.success(), "{label} started:\n{output}");
    assert!(output.contains("WEIR_BROKER_PASSWORD"), "{label}: {output}");
    transcript.add(label, output);
    transcript.assert_no_secret();
}

#[test]
fn help_does_not_show_secret_environment_values() {
    let url = format!("mqtt://weir:{SECRET}@127.0.0.1:{}", free_port());
    let env = [
        ("WEIR_BROKER", url.as_str()),
        ("WEIR_BROKER_PASSWORD", SECRET),
        ("WEIR_API_TOKEN", TOKEN),
    ];
    let mut transcript = Transcript::default();
    for args in [
        &["--help"][..],
        &["run", "--help"],
        &["record", "--help"],
        &["simulate", "--help"],
        &["top", "--help"],
        &["help", "run"],
    ] {
        let label = format!("weir {}", args.join(" "));
        let (status, output) = Weir::run(&label, args, &env);
        assert!(status.success(), "{label} failed:\n{output}");
        assert!(output.contains("Usage"), "{label}: {output}");
        transcript.add(label, output);
    }
    transcript.assert_no_secret();
}

/// How a run gets its password.
enum PasswordFrom {
    Config(&'static str),
    File(&'static str),
    Env(&'static str),
}

/// Starts `weir run` against `broker` with the password given as `from`, at debug level (trace
/// with `trace`), with the API token set.
fn start_run(
    broker: &Mosquitto,
    dir: &TempDir,
    label: &str,
    from: &PasswordFrom,
    log: &str,
) -> (Weir, SocketAddr, PathBuf) {
    let config = dir.path(&format!("{}.toml", unique("run")));
    let lines = match from {
        PasswordFrom::Config(password) => {
            format!("username = \"weir\"\npassword = \"{password}\"")
        }
        PasswordFrom::File(password) => {
            let file = dir.path(&unique("password"));
            std::fs::write(&file, format!("{password}\n")).expect("write password file");
            format!(
                "username = \"weir\"\npassword_file = {:?}",
                file.display().to_string()
            )
        }
        // A stale file that the environment replaces.
        PasswordFrom::Env(_) => {
            let file = dir.path(&unique("stale-password"));
            std::fs::write(&file, "stale\n").expect("write password file");
            format!(
                "username = \"weir\"\npassword_file = {:?}",
                file.display().to_string()
            )
        }
    };
    std::fs::write(&config, config_text(&broker.url(), &lines)).expect("write config");
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let state = dir.path(&unique("state"));
    let mut env = vec![("WEIR_LOG", log), ("WEIR_API_TOKEN", TOKEN)];
    if let PasswordFrom::Env(password) = from {
        env.push(("WEIR_BROKER_PASSWORD", password));
    }
    let weir = Weir::spawn(
        label,
        &[
            "run",
            "--config",
            config.to_str().expect("UTF-8 temp path"),
            "--state-dir",
            state.to_str().expect("UTF-8 temp path"),
            "--metrics-addr",
            &addr.to_string(),
        ],
        &env,
    );
    (weir, addr, config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weir_run_with_a_password_never_prints_it() {
    let dir = TempDir::new("secrets-run");
    let broker = password_broker(&dir);
    let mut transcript = Transcript::default();

    // Also `weir check`, which reads the password file.
    let checked = dir.path("checked.toml");
    let file = dir.path("checked-password");
    std::fs::write(&file, format!("{SECRET}\n")).expect("write password file");
    let lines = format!(
        "username = \"weir\"\npassword_file = {:?}",
        file.display().to_string()
    );
    std::fs::write(&checked, config_text(&broker.url(), &lines)).expect("write config");
    let label = "weir check with a password file";
    let checked = checked.to_str().expect("UTF-8 temp path");
    let (status, output) = Weir::run(label, &["check", "--config", checked], &[]);
    assert!(status.success(), "{label}: {output}");
    transcript.add(label, output);
    // And `weir record`, which connects with the same settings.
    let label = "weir record with a password file";
    let args = ["record", "--config", checked, "--duration", "1s"];
    let (status, output) = Weir::run(label, &args, &[("WEIR_LOG", "debug")]);
    assert!(status.success(), "{label}: {output}");
    assert!(output.contains("subscribed"), "{label}: {output}");
    transcript.add(label, output);

    let runs = [
        ("broker.password", PasswordFrom::Config(SECRET), "debug"),
        ("broker.password_file", PasswordFrom::File(SECRET), "trace"),
        ("WEIR_BROKER_PASSWORD", PasswordFrom::Env(SECRET), "debug"),
    ];
    for (what, from, log) in &runs {
        let label = format!("weir run with {what}");
        let (mut weir, addr, config) = start_run(&broker, &dir, &label, from, log);
        wait_ready(&mut weir, addr).await;
        visit_endpoints(addr, &label, &mut transcript).await;
        if let PasswordFrom::Config(_) = from {
            // Reloads refused for the password's sake: the answer and the log say why
            // without the value.
            let text = std::fs::read_to_string(&config).expect("read config");
            let refusals = [
                (
                    "credentials in broker.url",
                    text.replace(
                        &broker.url(),
                        &format!("mqtt://weir:{SECRET}@127.0.0.1:{}", broker.port()),
                    ),
                ),
                (
                    "an unquoted numeric password",
                    text.replace(
                        &format!("password = \"{SECRET}\""),
                        &format!("password = {SECRET_NUMBER}"),
                    ),
                ),
            ];
            for (why, edited) in refusals {
                assert_ne!(edited, text, "{why}: the edit changed nothing");
                std::fs::write(&config, edited).expect("write config");
                let (status, body) = http(addr, "POST", "/api/reload", Some(TOKEN)).await;
                assert_eq!(status, 422, "{label}: reload with {why}: {body}");
                transcript.add(format!("{label}: POST /api/reload with {why}"), body);
                let (_, body) = http(addr, "GET", "/api/reload", Some(TOKEN)).await;
                transcript.add(format!("{label}: GET /api/reload after {why}"), body);
            }
            std::fs::write(&config, text).expect("write config");
        }
        let status = weir.terminate();
        let output = weir.output();
        assert!(status.success(), "{label} exited with {status}:\n{output}");
        transcript.add(label, output);
    }

    // A password the broker refuses: the connection errors and their retries are logged.
    for (what, from) in [
        ("a wrong broker.password", PasswordFrom::Config(WRONG)),
        ("a wrong WEIR_BROKER_PASSWORD", PasswordFrom::Env(WRONG)),
    ] {
        let label = format!("weir run with {what}");
        let (mut weir, addr, _) = start_run(&broker, &dir, &label, &from, "debug");
        let deadline = Instant::now() + DEADLINE;
        // Mosquitto 2.0 refuses a wrong password of a known user as "not authorized".
        while !weir.output().contains("the broker refused") {
            weir.assert_running();
            assert!(
                Instant::now() < deadline,
                "{label}: no refusal logged within {DEADLINE:?}:\n{}",
                weir.output()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (status, body) = http(addr, "GET", "/readyz", None).await;
        assert_eq!(status, 503, "{label}: ready with a wrong password: {body}");
        transcript.add(format!("{label}: GET /readyz"), body);
        let (_, body) = http(addr, "GET", "/metrics", None).await;
        transcript.add(format!("{label}: GET /metrics"), body);
        let status = weir.terminate();
        let output = weir.output();
        assert!(status.success(), "{label} exited with {status}:\n{output}");
        transcript.add(label, output);
    }
    transcript.assert_no_secret();
}
