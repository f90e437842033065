//! The `weir` command: parse the CLI, load and validate the config, set up logging, and run the
//! chosen job (run, check, replay, test, record, demo, simulate) until a shutdown signal.

use clap::{Parser, Subcommand, ValueEnum};
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use weir::config::{self, Overrides, Secret};

/// `weir --version`: the crate version and what build.rs found (git commit, target, profile,
/// optional features).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("WEIR_BUILD_INFO"),
    ")"
);

#[derive(Parser)]
#[command(
    name = "weir",
    version = VERSION,
    about = "Event stream processor for IoT telemetry: MQTT in, state changes and rollups out."
)]
struct Cli {
    /// Log format: human-readable lines or JSON objects.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human, env = "WEIR_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Connect to the broker and process telemetry until SIGINT/SIGTERM.
    #[command(
        after_help = "Environment:\n  WEIR_BROKER_PASSWORD  Broker password; replaces broker.password and broker.password_file.\n                        Only from the environment: a flag would show in `ps`."
    )]
    Run {
        #[arg(long, short)]
        config: PathBuf,
        /// Broker URL (mqtt://host:port or mqtts://host:port); overrides broker.url.
        // --help would print WEIR_BROKER's value, and a URL may carry a password.
        #[arg(long, env = "WEIR_BROKER", hide_env_values = true)]
        broker: Option<String>,
        /// Address for /metrics and /healthz; overrides http.listen.
        #[arg(long, env = "WEIR_METRICS_ADDR")]
        metrics_addr: Option<SocketAddr>,
        /// Directory for operator state, the input log and the outbox; overrides delivery.state_dir.
        #[arg(long, env = "WEIR_STATE_DIR")]
        state_dir: Option<PathBuf>,
    },
    /// Validate a config file without connecting; exit status 0 when valid.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Set up the NATS streams that instances of a `[cluster]` share.
    Cluster {
        #[command(subcommand)]
        action: ClusterAction,
    },
    /// Prepare the services that `[sinks.*]` deliver to.
    Sinks {
        #[command(subcommand)]
        action: SinksAction,
    },
    /// Run the rules over recorded readings on a virtual clock and print the derived events
    /// (JSON lines: topic and payload), without a broker.
    #[command(
        after_help = "Input: JSON lines {\"topic\": \"...\", \"payload\": {...}, \"received\": <ms, optional>}\n(payload_b64, payload_text or payload_cbor instead of payload), as `weir record` writes,\nor CSV with a header line (give --csv-topic)."
    )]
    Replay {
        #[arg(long, short)]
        config: PathBuf,
        /// Recorded readings: a .jsonl file, or a .csv file with --csv-topic.
        #[arg(long, short)]
        input: PathBuf,
        /// Where the derived events go; stdout when absent.
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// Replay at this many times real time (2 = twice as fast as recorded).
        #[arg(long, conflicts_with = "fast")]
        speed: Option<f64>,
        /// As fast as possible (the default).
        #[arg(long)]
        fast: bool,
        /// Keep the virtual clock running this long after the last reading, so timeouts fire.
        #[arg(long, value_parser = parse_duration, default_value = "0s")]
        tail: Duration,
        /// Leave dead letters (inputs that could not become readings) out of the output.
        #[arg(long)]
        no_dead_letters: bool,
        /// CSV: the topic every row is published on, e.g. sensors/nab/machine-1/telemetry.
        #[arg(long)]
        csv_topic: Option<String>,
        /// CSV: the payload field the value column becomes; every column under its own name when absent.
        #[arg(long)]
        csv_metric: Option<String>,
        /// CSV: the column read for --csv-metric.
        #[arg(long, default_value = "value")]
        csv_value_column: String,
        /// CSV: the time column (YYYY-MM-DD HH:MM:SS in UTC, RFC 3339, or a number).
        #[arg(long, default_value = "timestamp")]
        csv_time_column: String,
        /// CSV: unit of a numeric time column (s, ms, us, ns).
        #[arg(long, default_value = "ms", value_parser = parse_time_unit)]
        csv_time_unit: weir::config::TimeUnit,
    },
    /// Run golden cases: every DIR/<case>/ with config.toml, input.jsonl and expected.jsonl is
    /// replayed and compared; a diff is printed for each mismatch, and the exit status is 1.
    Test {
        dir: PathBuf,
        /// Write each case's actual events as its expected.jsonl (review with git diff).
        #[arg(long)]
        update: bool,
    },
    /// Capture live MQTT traffic as JSON lines that `weir replay` and `weir test` read.
    Record {
        /// Take the broker settings (and, without --topic, the input topics) from this config.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Broker URL; overrides the config's.
        #[arg(long, env = "WEIR_BROKER", hide_env_values = true)]
        broker: Option<String>,
        /// Topic filter to record (repeatable); the config's inputs when absent.
        #[arg(long = "topic", short)]
        topics: Vec<String>,
        /// Where the lines go; stdout when absent.
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// Stop after this many messages.
        #[arg(long)]
        count: Option<u64>,
        /// Stop after this long (e.g. 10m).
        #[arg(long, value_parser = parse_duration)]
        duration: Option<Duration>,
    },
    /// Run the pipeline against an embedded broker and simulated devices (no broker needed).
    Demo {
        /// Config to run; the built-in config/example.toml when absent.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Simulated devices.
        #[arg(long, default_value_t = 1000)]
        devices: usize,
        /// Readings per second over all devices.
        #[arg(long, default_value_t = 20_000.0)]
        rate: f64,
        /// Address for /metrics; overrides http.listen.
        #[arg(long, env = "WEIR_METRICS_ADDR")]
        metrics_addr: Option<SocketAddr>,
        /// Stop after this long (e.g. "30s"); runs until Ctrl-C when absent.
        #[arg(long, value_parser = parse_duration)]
        duration: Option<Duration>,
    },
    /// A terminal view of a running weir, refreshed in place (reads its HTTP API).
    Top {
        /// The weir's http.listen address.
        #[arg(long, env = "WEIR_METRICS_ADDR", default_value = "127.0.0.1:9464")]
        addr: SocketAddr,
        /// Refresh interval (e.g. "1s").
        #[arg(long, value_parser = parse_duration, default_value = "1s")]
        interval: Duration,
        /// Print one frame and exit.
        #[arg(long)]
        once: bool,
    },
    /// Publish simulated telemetry (the demo's devices) to any broker.
    Simulate {
        #[arg(
            long,
            env = "WEIR_BROKER",
            hide_env_values = true,
            default_value = "mqtt://127.0.0.1:1883"
        )]
        broker: String,
        #[arg(long, default_value_t = 100)]
        devices: usize,
        /// Readings per second over all devices.
        #[arg(long, default_value_t = 1000.0)]
        rate: f64,
        /// Sites the devices are spread over (the {site} topic segment).
        #[arg(long, default_value_t = 4)]
        sites: usize,
        #[arg(long, value_parser = parse_duration)]
        duration: Option<Duration>,
        /// Publish QoS (0 or 1).
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=1))]
        qos: u8,
    },
}

/// `WEIR_BROKER_PASSWORD`, the one way to give the password outside the config files.
fn password_from_env() -> anyhow::Result<Option<Secret>> {
    match std::env::var("WEIR_BROKER_PASSWORD") {
        Ok(password) if password.is_empty() => Ok(None),
        Ok(password) => Ok(Some(Secret::new(password))),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => {
            anyhow::bail!("WEIR_BROKER_PASSWORD is not valid UTF-8; MQTT passwords are UTF-8 text")
        }
    }
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|err| format!("`{text}`: {err}; write e.g. 30s or 2m"))
}

fn parse_time_unit(text: &str) -> Result<weir::config::TimeUnit, String> {
    use weir::config::TimeUnit;
    match text {
        "s" => Ok(TimeUnit::S),
        "ms" => Ok(TimeUnit::Ms),
        "us" => Ok(TimeUnit::Us),
        "ns" => Ok(TimeUnit::Ns),
        _ => Err(format!("`{text}`: write s, ms, us or ns")),
    }
}

fn init_tracing(format: LogFormat) {
    // rumqttd (the demo's embedded broker) logs ordinary client disconnects as errors;
    // async-nats logs every (re)connect at info.
    let filter = tracing_subscriber::EnvFilter::try_from_env("WEIR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rumqttd=off,async_nats=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}

#[derive(Subcommand)]
enum ClusterAction {
    /// Create or check the readings stream (its max_age computed from the rules) and the
    /// output stream, and print the partition mapping for the NATS server. Safe to run again.
    Init {
        #[arg(long, short)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum SinksAction {
    /// Create what the sinks need and is missing (AMQP exchanges, PostgreSQL tables), and say
    /// what was created and what was found. Safe to run again.
    Init {
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    if let Command::Check { config } = &cli.command {
        // The files the config names (password, CA, certificate, key) are read too, so a
        // deployment is checked before it connects.
        let checked = config::load(config, &Overrides::default()).map_err(anyhow::Error::from);
        let checked =
            checked.and_then(|loaded| weir::mqtt::options(&loaded.broker, "").map(|_| loaded));
        let checked = checked.and_then(|loaded| {
            for (name, sink) in &loaded.sinks {
                sink.check_files()
                    .map_err(|err| anyhow::anyhow!("{}: sinks.{name}: {err}", config.display()))?;
            }
            Ok(loaded)
        });
        return match checked {
            Ok(loaded) => {
                let plural = |n: usize| if n == 1 { "" } else { "s" };
                println!(
                    "{}: valid ({} input{}, {} rule{}, {} sink{})",
                    config.display(),
                    loaded.inputs.len(),
                    plural(loaded.inputs.len()),
                    loaded.rules.len(),
                    plural(loaded.rules.len()),
                    loaded.sinks.len() + 1,
                    plural(loaded.sinks.len() + 1),
                );
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("{err}");
                ExitCode::from(2)
            }
        };
    }
    match cli.command {
        Command::Replay { .. } => return exit_with(replay(cli.command)),
        Command::Test { dir, update } => return golden(&dir, update),
        _ => {}
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Some(threads) = runtime_threads() {
        builder.worker_threads(threads);
    }
    let runtime = match builder.build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// One runtime thread on a machine of two cores or fewer, unless `TOKIO_WORKER_THREADS` says
/// otherwise (tokio reads it when this returns `None`). There a gateway shares its cores with
/// the broker, and keeping every hand-off (source, workers, sink, MQTT client) on one thread
/// saves the cross-thread wake-ups that most of a reading's CPU goes to (README, "Runtime
/// threads"). Larger machines keep a thread per core, so several workers can use them.
fn runtime_threads() -> Option<usize> {
    if std::env::var_os("TOKIO_WORKER_THREADS").is_some() {
        return None;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores <= 2).then_some(1)
}

fn exit_with(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// A writer for `path`, or stdout when absent.
fn output(path: Option<&std::path::Path>) -> anyhow::Result<Box<dyn std::io::Write>> {
    Ok(match path {
        Some(path) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(path)
                .map_err(|err| anyhow::anyhow!("cannot create {}: {err}", path.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    })
}

/// `weir replay`: synchronous, so it needs no async runtime.
fn replay(command: Command) -> anyhow::Result<()> {
    use weir::replay::{self as replay, CsvOptions, ReplayOptions};
    let Command::Replay {
        config,
        input,
        output: output_path,
        speed,
        fast: _,
        tail,
        no_dead_letters,
        csv_topic,
        csv_metric,
        csv_value_column,
        csv_time_column,
        csv_time_unit,
    } = command
    else {
        unreachable!("called for replay only")
    };
    if speed.is_some_and(|s| !(s > 0.0 && s.is_finite())) {
        anyhow::bail!(
            "--speed must be a positive number (1 = as recorded, 60 = a minute a second)"
        );
    }
    let loaded = config::load(&config, &Overrides::default())?;
    let is_csv = input
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("csv"));
    let records = match (&csv_topic, is_csv) {
        (Some(topic), _) => replay::read_csv(
            &input,
            &CsvOptions {
                topic: topic.clone(),
                time_column: csv_time_column,
                time_unit: csv_time_unit,
                metric: csv_metric,
                value_column: csv_value_column,
            },
            &loaded,
        )?,
        (None, true) => anyhow::bail!(
            "{} is CSV: give --csv-topic (the topic its readings arrive on) and usually --csv-metric",
            input.display()
        ),
        (None, false) => replay::read_jsonl(&input)?,
    };
    let mut out = output(output_path.as_deref())?;
    let paced = speed.is_some();
    let summary = replay::replay(&loaded, records, ReplayOptions { speed, tail }, |event| {
        if no_dead_letters && event.is_dead_letter() {
            return Ok(());
        }
        serde_json::to_writer(&mut out, &event)?;
        out.write_all(b"\n")?;
        if paced {
            out.flush()?;
        }
        Ok(())
    })?;
    out.flush()?;
    eprintln!("{summary}");
    Ok(())
}

/// `weir test DIR`: 0 when every case passes, 1 when one fails, 2 when none could be found.
fn golden(dir: &std::path::Path, update: bool) -> ExitCode {
    match weir::replay::golden::run_dir(dir, update) {
        Ok(results) if results.is_empty() => {
            eprintln!(
                "{}: no cases (a case is a directory with config.toml, input.jsonl and expected.jsonl)",
                dir.display()
            );
            ExitCode::from(2)
        }
        Ok(results) => {
            for result in &results {
                println!("{result}");
            }
            let failed = results.iter().filter(|r| !r.passed()).count();
            println!(
                "{} cases: {} passed, {failed} failed",
                results.len(),
                results.len() - failed
            );
            if failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run {
            config,
            broker,
            metrics_addr,
            state_dir,
        } => {
            let overrides = Overrides {
                broker_url: broker,
                metrics_addr,
                state_dir,
                broker_password: password_from_env()?,
                api_token: std::env::var("WEIR_API_TOKEN")
                    .ok()
                    .filter(|token| !token.is_empty())
                    .map(Secret::new),
            };
            let loaded = config::load(&config, &overrides)?;
            weir::app::run(loaded, shutdown_signal()).await
        }
        Command::Demo {
            config,
            devices,
            rate,
            metrics_addr,
            duration,
        } => {
            let options = weir::demo::DemoOptions {
                config,
                devices,
                rate,
                metrics_addr,
                duration,
            };
            weir::demo::run(options, shutdown_signal()).await
        }
        Command::Simulate {
            broker,
            devices,
            rate,
            sites,
            duration,
            qos,
        } => {
            let options = weir::demo::simulator::SimulatorOptions {
                broker_url: broker,
                devices,
                rate,
                duration,
                sites,
                client_id: format!("weir-simulator-{}", std::process::id()),
                qos: if qos == 1 {
                    rumqttc::QoS::AtLeastOnce
                } else {
                    rumqttc::QoS::AtMostOnce
                },
            };
            let stats = weir::demo::simulator::run(options, shutdown_signal()).await?;
            println!("published {} readings", stats.published);
            Ok(())
        }
        Command::Top {
            addr,
            interval,
            once,
        } => {
            let options = weir::top::TopOptions {
                addr,
                token: std::env::var("WEIR_API_TOKEN")
                    .ok()
                    .filter(|t| !t.is_empty()),
                interval,
                once,
            };
            weir::top::run(options, shutdown_signal()).await
        }
        Command::Record {
            config,
            broker,
            topics,
            output: output_path,
            count,
            duration,
        } => {
            let loaded = match &config {
                Some(path) => Some(config::load(path, &Overrides::default())?),
                None => None,
            };
            let mut broker_config = match (&loaded, broker) {
                (_, Some(url)) => {
                    let mut settings = loaded
                        .as_ref()
                        .map_or_else(|| config::BrokerConfig::new(&url), |c| c.broker.clone());
                    settings.url = url;
                    settings
                }
                (Some(loaded), None) => loaded.broker.clone(),
                (None, None) => anyhow::bail!("give --broker URL or --config FILE"),
            };
            if let Some(password) = password_from_env()? {
                broker_config.password = Some(password);
                broker_config.password_file = None;
            }
            broker_config.client_id = format!("weir-record-{}", std::process::id());
            broker_config.clean_session = true;
            let filters = if topics.is_empty() {
                let plan = loaded.as_ref().map(weir::engine::Plan::build).transpose()?;
                plan.map(|p| {
                    p.inputs
                        .iter()
                        .map(|i| i.pattern.subscription_filter())
                        .collect()
                })
                .unwrap_or_default()
            } else {
                topics
            };
            let mut out = output(output_path.as_deref())?;
            let options = weir::replay::record::RecordOptions {
                broker: broker_config,
                filters,
                count,
                duration,
            };
            let written =
                weir::replay::record::record(options, &mut out, shutdown_signal()).await?;
            out.flush()?;
            eprintln!("recorded {written} messages");
            Ok(())
        }
        Command::Cluster {
            action: ClusterAction::Init { config },
        } => {
            let loaded = config::load(&config, &Overrides::default())?;
            #[cfg(feature = "cluster")]
            {
                let text = std::fs::read_to_string(&config)?;
                for line in weir::cluster::init(&loaded, &text).await? {
                    println!("{line}");
                }
                Ok(())
            }
            // A config with [cluster] has failed to load above, naming the feature.
            #[cfg(not(feature = "cluster"))]
            {
                drop(loaded);
                anyhow::bail!(config::features::CLUSTER.missing())
            }
        }
        Command::Sinks {
            action: SinksAction::Init { config },
        } => {
            let loaded = config::load(&config, &Overrides::default())?;
            let plan = weir::engine::Plan::build(&loaded)?;
            for line in weir::sink::connect::init_all(&loaded, &plan).await? {
                println!("{line}");
            }
            Ok(())
        }
        Command::Check { .. } | Command::Replay { .. } | Command::Test { .. } => {
            unreachable!("handled before the runtime starts")
        }
    }
}
