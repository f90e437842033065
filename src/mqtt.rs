//! Broker connection settings shared by the source and the sink: URL parsing, rumqttc options
//! (TLS, limits, session), and the jittered exponential backoff used between reconnects.

use crate::config::BrokerConfig;
use rumqttc::{MqttOptions, TlsConfiguration, Transport};
use std::sync::Arc;
use std::time::Duration;

/// At most one "lost the broker connection" warning per connection in this interval.
pub const RECONNECT_WARN_INTERVAL: Duration = Duration::from_secs(30);

/// Host, port and transport parsed from `mqtt://host:port` or `mqtts://host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerEndpoint {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

impl BrokerEndpoint {
    /// # Errors
    /// A sentence saying what is wrong with the URL and what a valid one looks like.
    pub fn parse(url: &str) -> Result<Self, String> {
        let (tls, rest) = if let Some(rest) = url.strip_prefix("mqtt://") {
            (false, rest)
        } else if let Some(rest) = url.strip_prefix("mqtts://") {
            (true, rest)
        } else {
            return Err(format!(
                "`{url}` is not a broker URL; write mqtt://host:port, or mqtts://host:port for TLS"
            ));
        };
        let rest = rest.trim_end_matches('/');
        if rest.contains('/') || rest.contains('@') {
            return Err(format!(
                "`{url}` has a path or credentials; give only host and port, and put credentials in broker.username / broker.password"
            ));
        }
        let default_port = if tls { 8883 } else { 1883 };
        let (host, port) = if let Some(bracketed) = rest.strip_prefix('[') {
            // [::1]:1883
            let (host, after) = bracketed
                .split_once(']')
                .ok_or_else(|| format!("`{url}`: an IPv6 host needs a closing `]`"))?;
            let port = match after.strip_prefix(':') {
                Some(port) => parse_port(url, port)?,
                None if after.is_empty() => default_port,
                None => return Err(format!("`{url}`: expected `:port` after `]`")),
            };
            (host.to_owned(), port)
        } else {
            match rest.rsplit_once(':') {
                Some((host, port)) => (host.to_owned(), parse_port(url, port)?),
                None => (rest.to_owned(), default_port),
            }
        };
        if host.is_empty() {
            return Err(format!(
                "`{url}` has no host; write e.g. mqtt://127.0.0.1:1883"
            ));
        }
        Ok(Self { host, port, tls })
    }
}

fn parse_port(url: &str, port: &str) -> Result<u16, String> {
    port.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("`{url}`: `{port}` is not a port number (1-65535)"))
}

/// Builds rumqttc options for one of weir's connections.
///
/// `suffix` distinguishes the connections (`""` for intake, `"-out"` for publishing): a broker
/// disconnects the older of two clients with the same id.
///
/// # Errors
/// An unreadable or invalid CA file.
pub fn options(broker: &BrokerConfig, suffix: &str) -> anyhow::Result<MqttOptions> {
    let endpoint = BrokerEndpoint::parse(&broker.url).map_err(anyhow::Error::msg)?;
    let client_id = format!("{}{suffix}", broker.client_id);
    let mut options = MqttOptions::new(client_id, endpoint.host.clone(), endpoint.port);
    options
        .set_keep_alive(broker.keep_alive)
        .set_clean_session(broker.clean_session)
        .set_max_packet_size(broker.max_packet_bytes, broker.max_packet_bytes);
    if let (Some(user), password) = (&broker.username, &broker.password) {
        options.set_credentials(user.clone(), password.clone().unwrap_or_default());
    }
    if endpoint.tls {
        options.set_transport(Transport::Tls(tls_configuration(broker)?));
    }
    Ok(options)
}

fn tls_configuration(broker: &BrokerConfig) -> anyhow::Result<TlsConfiguration> {
    let mut roots = rustls::RootCertStore::empty();
    match &broker.ca_file {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|err| {
                anyhow::anyhow!("cannot read broker.ca_file {}: {err}", path.display())
            })?;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                roots.add(cert?)?;
            }
            if roots.is_empty() {
                anyhow::bail!(
                    "broker.ca_file {} holds no PEM certificates",
                    path.display()
                );
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                // A system store may hold certificates rustls rejects; skip those.
                let _ = roots.add(cert);
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConfiguration::Rustls(Arc::new(config)))
}

/// Jittered exponential backoff between reconnect attempts.
///
/// rumqttc reconnects on the very next `poll()` after an error, which spins at thousands of
/// attempts a second against a closed port; the source and sink wait [`Backoff::next_delay`]
/// before polling again and call [`Backoff::reset`] once connected.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
    rng: u64,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0x9e37_79b9, |d| d.as_nanos() as u64)
            | 1;
        Self {
            initial,
            max,
            current: initial,
            rng: seed,
        }
    }

    /// The delay before the next attempt: the current step, jittered to between 50% and 100%
    /// of it (so a fleet of gateways does not reconnect in lockstep), then doubles the step.
    pub fn next_delay(&mut self) -> Duration {
        // xorshift64: jitter needs no cryptographic quality.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let fraction = 0.5 + (self.rng % 1000) as f64 / 2000.0;
        let delay = self.current.mul_f64(fraction);
        self.current = (self.current * 2).min(self.max);
        delay
    }

    pub fn reset(&mut self) {
        self.current = self.initial;
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(Duration::from_millis(100), Duration::from_secs(30))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hosts_ports_and_schemes() {
        assert_eq!(
            BrokerEndpoint::parse("mqtt://127.0.0.1:1884").unwrap(),
            BrokerEndpoint {
                host: "127.0.0.1".into(),
                port: 1884,
                tls: false
            }
        );
        assert_eq!(BrokerEndpoint::parse("mqtts://broker").unwrap().port, 8883);
        assert_eq!(
            BrokerEndpoint::parse("mqtt://[::1]:1883").unwrap().host,
            "::1"
        );
        assert!(BrokerEndpoint::parse("tcp://x:1").is_err());
        assert!(BrokerEndpoint::parse("mqtt://x:99999").is_err());
        assert!(BrokerEndpoint::parse("mqtt://:1883").is_err());
    }

    #[test]
    fn backoff_grows_to_its_cap_with_jitter() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let first = backoff.next_delay();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
        for _ in 0..10 {
            backoff.next_delay();
        }
        let capped = backoff.next_delay();
        assert!(capped >= Duration::from_millis(500) && capped <= Duration::from_secs(1));
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }
}
