//! NATS connections for `[cluster]` and `nats` sinks: servers, credentials and TLS from the
//! config, reconnecting by themselves (async-nats keeps reconnecting and buffers what is
//! published meanwhile, up to its own bound).

use crate::config::{redact_url, ClusterConfig};
use anyhow::Context as _;
use std::path::Path;
use std::time::Duration;

/// Connects to `servers` (one or several of a NATS cluster) and waits for the first connection,
/// at most `timeout`; later losses are reconnected in the background, without limit.
///
/// # Errors
/// A URL or a file cannot be used, or no server answered within `timeout`.
pub async fn connect(
    servers: &[String],
    credentials_file: Option<&Path>,
    ca_file: Option<&Path>,
    name: &str,
    timeout: Duration,
) -> anyhow::Result<async_nats::Client> {
    let addresses = servers
        .iter()
        .map(|server| {
            server
                .parse::<async_nats::ServerAddr>()
                .with_context(|| format!("`{}` is not a NATS server URL", redact_url(server)))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut options = async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(timeout)
        .max_reconnects(None);
    if let Some(file) = credentials_file {
        options = options
            .credentials_file(file)
            .await
            .with_context(|| format!("cannot use the credentials file {}", file.display()))?;
    }
    if let Some(file) = ca_file {
        options = options
            .add_root_certificates(file.to_owned())
            .require_tls(true);
    }
    let shown: Vec<String> = servers.iter().map(|s| redact_url(s).into_owned()).collect();
    tokio::time::timeout(timeout, options.connect(addresses))
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "no NATS server of {} answered within {timeout:?}",
                shown.join(", ")
            )
        })?
        .with_context(|| format!("cannot connect to NATS at {}", shown.join(", ")))
}

/// Connects as [`connect`] with the `[cluster]` settings.
///
/// # Errors
/// As [`connect`].
pub async fn connect_cluster(
    cluster: &ClusterConfig,
    name: &str,
    timeout: Duration,
) -> anyhow::Result<async_nats::Client> {
    connect(
        &cluster.servers,
        cluster.credentials_file.as_deref(),
        cluster.ca_file.as_deref(),
        name,
        timeout,
    )
    .await
}
