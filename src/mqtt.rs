//! Broker connection settings shared by the source and the sink: URL parsing, rumqttc options
//! (TLS with client certificates, credentials, limits, session) for MQTT 3.1.1 or 5, connection
//! errors explained, and the jittered exponential backoff used between reconnects. [`client`]
//! puts both protocols behind one client.

pub mod client;

use crate::config::endpoint::BrokerEndpoint;
use crate::config::{redact_url, BrokerConfig, Protocol, Secret};
use rumqttc::{ConnectReturnCode, ConnectionError, MqttOptions, TlsConfiguration, Transport};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The remaining length of a QoS 1 PUBLISH of `topic` and `payload_len` bytes (topic length,
/// topic, packet id, payload; MQTT 5 properties not counted): what a packet limit is compared
/// with, by the broker and by rumqttc.
pub fn publish_size(topic: &str, payload_len: usize) -> usize {
    2 + topic.len() + 2 + payload_len
}

/// At most one "lost the broker connection" warning per connection in this interval.
pub const RECONNECT_WARN_INTERVAL: Duration = Duration::from_secs(30);

/// Builds rumqttc options for one of weir's connections.
///
/// `suffix` distinguishes the connections (`""` for intake, `"-out"` for publishing): a broker
/// disconnects the older of two clients with the same id. Files named in the config (password,
/// CA, client certificate and key) are read here, once per connection, at start.
///
/// # Errors
/// An unreadable or invalid password, CA, certificate or key file; the message names the file
/// and says what to do.
pub fn options(broker: &BrokerConfig, suffix: &str) -> anyhow::Result<MqttOptions> {
    let endpoint = BrokerEndpoint::parse(&broker.url).map_err(anyhow::Error::msg)?;
    let client_id = format!("{}{suffix}", broker.client_id);
    let mut options = MqttOptions::new(client_id, endpoint.host.clone(), endpoint.port);
    options
        .set_keep_alive(broker.keep_alive)
        .set_clean_session(broker.clean_session)
        .set_max_packet_size(broker.max_packet_bytes, broker.max_packet_bytes);
    if let Some(user) = &broker.username {
        let password = password(broker)?;
        options.set_credentials(
            user.clone(),
            password.as_ref().map_or("", Secret::expose).to_owned(),
        );
    }
    if endpoint.tls {
        options.set_transport(Transport::Tls(tls_configuration(broker)?));
    }
    Ok(options)
}

/// Options for one of weir's connections in the protocol `broker.protocol` names; see
/// [`options`].
///
/// # Errors
/// As [`options`].
pub fn connection_options(broker: &BrokerConfig, suffix: &str) -> anyhow::Result<client::Options> {
    match broker.protocol {
        Protocol::V311 => options(broker, suffix).map(|o| client::Options::V4(Box::new(o))),
        Protocol::V5 => options_v5(broker, suffix).map(|o| client::Options::V5(Box::new(o))),
    }
}

/// Most persistent sessions MQTT 5 allows: "never expires", as a 3.1.1 session does.
const SESSION_NEVER_EXPIRES: u32 = u32::MAX;

/// As [`options`], for MQTT 5.
///
/// A persistent session (`clean_session = false`) needs a session expiry interval with MQTT 5:
/// without one the broker ends the session with the connection, and queued QoS 1 readings with
/// it. weir asks for "never", the 3.1.1 behaviour; a broker may cap it (Mosquitto:
/// `persistent_client_expiration`).
fn options_v5(broker: &BrokerConfig, suffix: &str) -> anyhow::Result<rumqttc::v5::MqttOptions> {
    let endpoint = BrokerEndpoint::parse(&broker.url).map_err(anyhow::Error::msg)?;
    let client_id = format!("{}{suffix}", broker.client_id);
    let mut options =
        rumqttc::v5::MqttOptions::new(client_id, endpoint.host.clone(), endpoint.port);
    let max_packet = u32::try_from(broker.max_packet_bytes).unwrap_or(u32::MAX);
    options
        // Validation asks for 5 s with MQTT 5; rumqttc panics below that, so never pass less.
        .set_keep_alive(broker.keep_alive.max(Duration::from_secs(5)))
        .set_clean_start(broker.clean_session)
        .set_max_packet_size(Some(max_packet))
        // rumqttc allocates a slot per allowed inflight publish (65,535 by default with MQTT 5,
        // several MB); 100 is its 3.1.1 default. The broker's receive maximum may lower it.
        .set_outgoing_inflight_upper_limit(100);
    if !broker.clean_session {
        options.set_session_expiry_interval(Some(SESSION_NEVER_EXPIRES));
    }
    if let Some(user) = &broker.username {
        let password = password(broker)?;
        options.set_credentials(
            user.clone(),
            password.as_ref().map_or("", Secret::expose).to_owned(),
        );
    }
    if endpoint.tls {
        options.set_transport(Transport::Tls(tls_configuration(broker)?));
    }
    Ok(options)
}

/// Socket options for weir's connections: Nagle off. Alerts are small packets that must leave
/// at once, and under QoS 1 intake the PUBACKs weir sends would otherwise wait for the broker's
/// delayed ACK (up to 40 ms on Linux) while the broker's inflight window is full.
pub fn network_options() -> rumqttc::NetworkOptions {
    let mut network = rumqttc::NetworkOptions::new();
    network.set_tcp_nodelay(true);
    network
}

/// The broker password: `broker.password` (which `WEIR_BROKER_PASSWORD` replaces), or the
/// content of `broker.password_file` without its trailing newline.
///
/// # Errors
/// The password file cannot be read, is not UTF-8, or is empty.
pub fn password(broker: &BrokerConfig) -> anyhow::Result<Option<Secret>> {
    if let Some(password) = &broker.password {
        return Ok(Some(password.clone()));
    }
    let Some(path) = &broker.password_file else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path).map_err(|err| {
        anyhow::anyhow!(
            "cannot read broker.password_file {}: {err}; check the path and that weir's user may read it",
            path.display()
        )
    })?;
    // Editors and `echo` end the file with a newline that is not part of the password.
    let password = text
        .strip_suffix('\n')
        .map_or(text.as_str(), |t| t.strip_suffix('\r').unwrap_or(t));
    if password.is_empty() {
        anyhow::bail!(
            "broker.password_file {} is empty; write the password in it (one line)",
            path.display()
        );
    }
    Ok(Some(Secret::new(password)))
}

fn tls_configuration(broker: &BrokerConfig) -> anyhow::Result<TlsConfiguration> {
    let builder = tls_builder("broker.ca_file", broker.ca_file.as_deref())?;
    let config = match (&broker.cert_file, &broker.key_file) {
        (Some(cert_path), Some(key_path)) => {
            let certs = read_certs("broker.cert_file", cert_path)?;
            let key = read_key(key_path)?;
            builder.with_client_auth_cert(certs, key).map_err(|err| {
                anyhow::anyhow!(
                    "cannot use broker.cert_file {} with broker.key_file {}: {err}; check that the key is the one the certificate was issued for",
                    cert_path.display(),
                    key_path.display()
                )
            })?
        }
        // Validation rejects one without the other; treat that as no client certificate.
        _ => builder.with_no_client_auth(),
    };
    Ok(TlsConfiguration::Rustls(Arc::new(config)))
}

/// A TLS client config (ring provider) trusting the CA certificates in `ca_file`, or the
/// system's roots without one; `key` names the config key in messages (`sinks.hook.ca_file`).
///
/// # Errors
/// The file cannot be read or holds no usable CA certificate.
pub fn client_tls(key: &str, ca_file: Option<&Path>) -> anyhow::Result<rustls::ClientConfig> {
    Ok(tls_builder(key, ca_file)?.with_no_client_auth())
}

fn tls_builder(
    key: &str,
    ca_file: Option<&Path>,
) -> anyhow::Result<rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert>> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            for cert in read_certs(key, path)? {
                roots.add(cert).map_err(|err| {
                    anyhow::anyhow!(
                        "{key} {} holds a certificate rustls cannot use as a CA ({err}); give the PEM of the CA that signs the server's certificate",
                        path.display()
                    )
                })?;
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
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots))
}

/// Every certificate in a PEM file; `key` names the config key in messages.
fn read_certs(key: &str, path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem = std::fs::read(path).map_err(|err| {
        anyhow::anyhow!(
            "cannot read {key} {}: {err}; check the path and that weir's user may read it",
            path.display()
        )
    })?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| {
            anyhow::anyhow!(
                "{key} {} is not valid PEM ({err}); give a file with -----BEGIN CERTIFICATE----- blocks",
                path.display()
            )
        })?;
    if certs.is_empty() {
        anyhow::bail!(
            "{key} {} holds no PEM certificates; give a file with -----BEGIN CERTIFICATE----- blocks",
            path.display()
        );
    }
    Ok(certs)
}

/// The first private key in a PEM file (PKCS#8, PKCS#1 or SEC1).
fn read_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    let pem = std::fs::read(path).map_err(|err| {
        anyhow::anyhow!(
            "cannot read broker.key_file {}: {err}; check the path and that weir's user may read it",
            path.display()
        )
    })?;
    match rustls_pemfile::private_key(&mut pem.as_slice()) {
        Ok(Some(key)) => Ok(key),
        Ok(None) => anyhow::bail!(
            "broker.key_file {} holds no PEM private key; give an unencrypted key (-----BEGIN PRIVATE KEY-----, RSA or EC)",
            path.display()
        ),
        Err(err) => anyhow::bail!(
            "broker.key_file {} is not valid PEM ({err}); give an unencrypted PEM private key",
            path.display()
        ),
    }
}

/// Opens one connection with `broker`'s settings (as `<client_id>-probe`, clean session), waits
/// for the broker's CONNACK and disconnects: the check that TLS, certificates and credentials
/// work, with the reason when they do not.
///
/// # Errors
/// The options cannot be built, or the connection failed: the message is [`describe`]'s.
pub async fn try_connect(broker: &BrokerConfig, timeout: Duration) -> anyhow::Result<()> {
    let mut options = connection_options(broker, "-probe")?;
    // A probe must not leave a persistent session behind on the broker.
    options.set_clean_session(true);
    let (client, mut eventloop) = client::new(options, 10);
    let attempt = async {
        loop {
            match eventloop.poll().await {
                Ok(client::Event::ConnAck { .. }) => return Ok(()),
                Ok(_) => {}
                Err(err) => return Err(err),
            }
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(())) => {
            let _ = client.try_disconnect();
            let _ = tokio::time::timeout(Duration::from_millis(500), async {
                while let Ok(event) = eventloop.poll().await {
                    if matches!(event, client::Event::Disconnected) {
                        break;
                    }
                }
            })
            .await;
            Ok(())
        }
        Ok(Err(err)) => Err(anyhow::Error::msg(err.describe())),
        Err(_) => anyhow::bail!(
            "the broker at {} did not answer within {timeout:?}; check broker.url and the network",
            redact_url(&broker.url)
        ),
    }
}

/// A sentence for a failed connection attempt that says what to check: rumqttc's own text for
/// a TLS failure (`TLS: I/O: invalid peer certificate: UnknownIssuer`) does not say which
/// setting to change.
pub fn describe(err: &ConnectionError) -> String {
    if let Some(tls) = rustls_cause(err) {
        return describe_tls(tls);
    }
    match err {
        ConnectionError::ConnectionRefused(code) => match code {
            ConnectReturnCode::BadUserNamePassword => REFUSED_PASSWORD.into(),
            ConnectReturnCode::NotAuthorized => REFUSED_NOT_AUTHORIZED.into(),
            other => format!("the broker refused the connection ({other:?})"),
        },
        ConnectionError::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
            NO_BROKER.into()
        }
        other => format!("{other}"),
    }
}

/// As [`describe`], for the MQTT 5 client's errors.
pub fn describe_v5(err: &rumqttc::v5::ConnectionError) -> String {
    use rumqttc::v5::mqttbytes::v5::ConnectReturnCode as Code;
    use rumqttc::v5::{ConnectionError as Error, StateError};
    if let Some(tls) = rustls_cause(err) {
        return describe_tls(tls);
    }
    let refused = |code: &Code| match code {
        Code::BadUserNamePassword => REFUSED_PASSWORD.into(),
        Code::NotAuthorized => REFUSED_NOT_AUTHORIZED.into(),
        Code::UnsupportedProtocolVersion | Code::RefusedProtocolVersion => {
            "the broker does not speak MQTT 5; set broker.protocol = \"3.1.1\"".into()
        }
        other => format!("the broker refused the connection ({other:?})"),
    };
    match err {
        Error::ConnectionRefused(code)
        | Error::MqttState(StateError::ConnFail { reason: code }) => refused(code),
        Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => NO_BROKER.into(),
        other => format!("{other}"),
    }
}

const REFUSED_PASSWORD: &str = "the broker refused the username or password; check broker.username and broker.password, broker.password_file or WEIR_BROKER_PASSWORD";
const REFUSED_NOT_AUTHORIZED: &str = "the broker refused the connection as not authorized; check the credentials or client certificate and the broker's ACL";
const NO_BROKER: &str =
    "connection refused: no broker listens at broker.url; check the url and that the broker runs";

/// The rustls error behind a connection error, wherever rumqttc wrapped it: a failed handshake
/// comes as `Tls(Io(..))`, but a broker's alert after the handshake (TLS 1.3 client-certificate
/// checks) surfaces while reading the CONNACK, as `MqttState(Deserialization(Io(..)))`.
fn rustls_cause<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut current: Option<&'a (dyn std::error::Error + 'static)> = Some(err);
    while let Some(error) = current {
        if let Some(tls) = error.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        // io::Error::source() skips the error it wraps, so look inside it explicitly.
        if let Some(inner) = error
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(inner);
        }
        current = error.source();
    }
    None
}

fn describe_tls(err: &rustls::Error) -> String {
    use rustls::{AlertDescription, CertificateError};
    match err {
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => format!(
            "TLS: the broker's certificate is not signed by a trusted CA ({err}); set broker.ca_file to the PEM of the CA that signed it"
        ),
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => format!(
            "TLS: the broker's certificate does not name the host in broker.url ({err}); connect with a host name or IP address the certificate lists"
        ),
        rustls::Error::InvalidCertificate(
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. },
        ) => format!(
            "TLS: the broker's certificate is outside its validity period ({err}); renew it, or check this machine's clock"
        ),
        rustls::Error::InvalidCertificate(_) => format!(
            "TLS: the broker's certificate was rejected ({err}); check it against broker.ca_file"
        ),
        rustls::Error::AlertReceived(
            AlertDescription::CertificateRequired
            | AlertDescription::HandshakeFailure
            | AlertDescription::BadCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateUnknown,
        ) => format!(
            "TLS: the broker refused the handshake ({err}); if it requires client certificates, set broker.cert_file and broker.key_file to a certificate signed by a CA it trusts"
        ),
        other => format!("TLS: the handshake failed ({other})"),
    }
}

/// Logs failed connection attempts of one connection at warn level, so a deployment problem
/// (wrong CA, refused credentials) shows without debug logs: each new reason at once, the same
/// reason again at most once a minute with the number of attempts folded in.
#[derive(Debug, Default)]
pub struct ConnectFailures {
    last: Option<String>,
    logged_at: Option<Instant>,
    folded: u64,
}

impl ConnectFailures {
    const REPEAT: Duration = Duration::from_secs(60);

    /// Records one failed attempt of `connection` (`source` or `sink`).
    pub fn report(&mut self, connection: &'static str, err: &client::ConnectionError) {
        let reason = err.describe();
        let due = self.logged_at.is_none_or(|at| at.elapsed() >= Self::REPEAT);
        if self.last.as_deref() != Some(reason.as_str()) || due {
            tracing::warn!(
                connection,
                error = %reason,
                attempts_since_last_log = self.folded,
                "cannot connect to the broker; retrying with backoff"
            );
            self.last = Some(reason);
            self.logged_at = Some(Instant::now());
            self.folded = 0;
        } else {
            self.folded += 1;
        }
    }

    /// Forgets the last reason once connected, so the next failure is logged at once.
    pub fn reset(&mut self) {
        *self = Self::default();
    }
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

    /// A file in a directory of its own, both removed when the guard drops.
    struct TempFile(std::path::PathBuf);

    impl TempFile {
        fn new(name: &str, content: &[u8]) -> Self {
            let dir = std::env::temp_dir().join(format!("weir-mqtt-{}-{name}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join(name);
            std::fs::write(&path, content).unwrap();
            Self(path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            if let Some(dir) = self.0.parent() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }

    #[test]
    fn the_password_file_loses_only_its_trailing_newline() {
        let mut broker = BrokerConfig::new("mqtt://127.0.0.1:1883");
        for (content, expected) in [
            (&b"s3cret\n"[..], "s3cret"),
            (b"s3cret\r\n", "s3cret"),
            (b"s3cret", "s3cret"),
            (b" pass word \n", " pass word "),
        ] {
            let file = TempFile::new("pw", content);
            broker.password_file = Some(file.0.clone());
            let password = password(&broker).unwrap().unwrap();
            assert_eq!(password.expose(), expected);
        }
        let empty = TempFile::new("empty", b"\n");
        broker.password_file = Some(empty.0.clone());
        let err = password(&broker).unwrap_err().to_string();
        assert!(err.contains("is empty"), "{err}");
        broker.password_file = Some("/nonexistent/weir/pw".into());
        let err = password(&broker).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/weir/pw"), "{err}");
    }

    #[test]
    fn unusable_pem_files_are_named_with_what_to_do() {
        let mut broker = BrokerConfig::new("mqtts://127.0.0.1:8883");
        let garbage_file = TempFile::new("garbage.pem", b"not a certificate\n");
        let garbage = garbage_file.0.clone();
        broker.ca_file = Some(garbage.clone());
        let err = options(&broker, "").unwrap_err().to_string();
        assert!(err.contains("broker.ca_file"), "{err}");
        assert!(err.contains(&garbage.display().to_string()), "{err}");
        assert!(err.contains("BEGIN CERTIFICATE"), "{err}");

        broker.ca_file = None;
        broker.cert_file = Some("/nonexistent/weir/client.pem".into());
        broker.key_file = Some(garbage.clone());
        let err = options(&broker, "").unwrap_err().to_string();
        assert!(
            err.contains("cannot read broker.cert_file /nonexistent/weir/client.pem"),
            "{err}"
        );
    }

    #[test]
    fn tls_failures_say_which_setting_to_change() {
        let unknown_issuer = ConnectionError::Tls(rumqttc::TlsError::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        )));
        let text = describe(&unknown_issuer);
        assert!(text.contains("broker.ca_file"), "{text}");
        assert!(text.contains("UnknownIssuer"), "{text}");
        // A TLS 1.3 broker refuses a missing client certificate after the handshake, so the
        // alert arrives while rumqttc reads the CONNACK.
        let alert = ConnectionError::MqttState(rumqttc::StateError::Deserialization(
            rumqttc::mqttbytes::Error::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired),
            )),
        ));
        let text = describe(&alert);
        assert!(text.contains("broker.cert_file"), "{text}");
        let refused = ConnectionError::ConnectionRefused(ConnectReturnCode::BadUserNamePassword);
        assert!(describe(&refused).contains("broker.password_file"));
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
