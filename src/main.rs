//! The `weir` command: parse the CLI, load and validate the config, set up logging, and run the
//! chosen job (run, check, demo, simulate) until a shutdown signal.

use clap::{Parser, Subcommand, ValueEnum};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use weir::config::{self, Overrides, Secret};

#[derive(Parser)]
#[command(
    name = "weir",
    version,
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
        #[arg(long, env = "WEIR_BROKER")]
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
        #[arg(long, env = "WEIR_BROKER", default_value = "mqtt://127.0.0.1:1883")]
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

fn init_tracing(format: LogFormat) {
    // rumqttd (the demo's embedded broker) logs ordinary client disconnects as errors.
    let filter = tracing_subscriber::EnvFilter::try_from_env("WEIR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rumqttd=off"));
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    if let Command::Check { config } = &cli.command {
        // The files the config names (password, CA, certificate, key) are read too, so a
        // deployment is checked before it connects.
        let checked = config::load(config, &Overrides::default()).map_err(anyhow::Error::from);
        let checked =
            checked.and_then(|loaded| weir::mqtt::options(&loaded.broker, "").map(|_| loaded));
        return match checked {
            Ok(loaded) => {
                println!(
                    "{}: valid ({} input{}, {} rule{})",
                    config.display(),
                    loaded.inputs.len(),
                    if loaded.inputs.len() == 1 { "" } else { "s" },
                    loaded.rules.len(),
                    if loaded.rules.len() == 1 { "" } else { "s" },
                );
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("{err}");
                ExitCode::from(2)
            }
        };
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
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
        Command::Check { .. } => unreachable!("handled before the runtime starts"),
    }
}
