//! `[broker]`: how weir reaches the MQTT broker (URLs, protocol version, credentials, TLS), and the
//! checks that keep a bad value from panicking rumqttc or leaking a password.

use super::endpoint::BrokerEndpoint;
use super::validate::Problems;
use super::{duration, Secret};
use serde::{Deserialize, Deserializer};
use std::path::PathBuf;
use std::time::Duration;

/// How to reach the MQTT broker. weir opens two connections with it: `<client_id>` subscribes,
/// `<client_id>-out` publishes.
///
/// `Debug` is derived, but the password is a [`Secret`], which prints as `***`: a config dumped
/// into a log never carries it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// `mqtt://host:port` or `mqtts://host:port` (TLS).
    pub url: String,
    /// MQTT version of both connections. 3.1.1 (the default) works with every broker; 5 carries
    /// message properties: a reading's W3C trace context, and an event's content type and id.
    #[serde(default)]
    pub protocol: Protocol,
    /// Where derived events are published, when not to the same broker (e.g. an upstream broker
    /// while readings come from the local one). Same form as `url`, same credentials and TLS.
    pub publish_url: Option<String>,
    #[serde(default = "default_client_id")]
    pub client_id: String,
    pub username: Option<String>,
    /// The password in the file itself; `password_file` or `WEIR_BROKER_PASSWORD` keep it out of
    /// the config.
    pub password: Option<Secret>,
    /// A file holding only the password (one trailing newline is ignored), read at start, so the
    /// config can be world-readable while the password file is not.
    pub password_file: Option<PathBuf>,
    #[serde(default = "default_keep_alive", deserialize_with = "duration")]
    pub keep_alive: Duration,
    /// false keeps the broker-side session (subscriptions, queued QoS 1 messages) across reconnects.
    #[serde(default = "yes")]
    pub clean_session: bool,
    /// Largest MQTT packet accepted or sent; rumqttc's own default (10 KiB) is too small for CBOR batches.
    #[serde(default = "default_max_packet_bytes")]
    pub max_packet_bytes: usize,
    /// PEM file with the CA certificates that sign the broker's certificate (mqtts only);
    /// the system's roots are used when absent.
    pub ca_file: Option<PathBuf>,
    /// PEM certificate (chain) that weir presents to the broker (mqtts only; with `key_file`).
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file` (PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<PathBuf>,
}

impl BrokerConfig {
    /// Settings for `url` with every other key at its default, as the file would give them.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            protocol: Protocol::default(),
            publish_url: None,
            client_id: default_client_id(),
            username: None,
            password: None,
            password_file: None,
            keep_alive: default_keep_alive(),
            clean_session: true,
            max_packet_bytes: default_max_packet_bytes(),
            ca_file: None,
            cert_file: None,
            key_file: None,
        }
    }
}

/// The MQTT protocol version, written `"3.1.1"` or `"5"` in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocol {
    #[default]
    V311,
    V5,
}

impl<'de> Deserialize<'de> for Protocol {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Protocol;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("\"3.1.1\" or \"5\"")
            }

            fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<Protocol, E> {
                match value {
                    "3.1.1" => Ok(Protocol::V311),
                    "5" | "5.0" => Ok(Protocol::V5),
                    other => Err(E::custom(format!(
                        "`{other}` is not an MQTT version weir speaks; write \"3.1.1\" (any broker) or \"5\" (message properties, trace context)"
                    ))),
                }
            }

            // `protocol = 5` is unambiguous, so it is taken as written; 3.1.1 is not a TOML number.
            fn visit_i64<E: serde::de::Error>(self, value: i64) -> Result<Protocol, E> {
                match value {
                    5 => Ok(Protocol::V5),
                    other => Err(E::custom(format!(
                        "`{other}` is not an MQTT version weir speaks; write \"3.1.1\" (any broker) or \"5\" (message properties, trace context)"
                    ))),
                }
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

impl Protocol {
    /// As written in the config.
    pub fn label(self) -> &'static str {
        match self {
            Protocol::V311 => "3.1.1",
            Protocol::V5 => "5",
        }
    }
}

fn default_client_id() -> String {
    "weir".into()
}
fn default_keep_alive() -> Duration {
    Duration::from_secs(30)
}
fn yes() -> bool {
    true
}
fn default_max_packet_bytes() -> usize {
    256 * 1024
}

pub(super) fn check_broker(broker: &BrokerConfig, problems: &mut Problems) {
    if let Err(message) = BrokerEndpoint::parse(&broker.url) {
        problems.add("broker.url", message);
    }
    if let Some(url) = &broker.publish_url {
        if let Err(message) = BrokerEndpoint::parse(url) {
            problems.add("broker.publish_url", message);
        }
    }
    // rumqttc asserts that keep-alive is at least one second.
    if broker.keep_alive < Duration::from_secs(1) {
        problems.add(
            "broker.keep_alive",
            "must be at least 1s (MQTT counts keep-alive in whole seconds); 30s is a good default",
        );
    }
    // rumqttc's MQTT 5 client asserts a keep-alive of at least five seconds.
    if broker.protocol == Protocol::V5 && broker.keep_alive < Duration::from_secs(5) {
        problems.add(
            "broker.keep_alive",
            "must be at least 5s with protocol = \"5\" (rumqttc's MQTT 5 client refuses less); 30s is a good default",
        );
    }
    if broker.keep_alive > Duration::from_secs(u16::MAX as u64) {
        problems.add("broker.keep_alive", "must be at most 65535s");
    }
    if broker.client_id.trim().is_empty() {
        problems.add(
            "broker.client_id",
            "must not be empty: a persistent session is found by its client id",
        );
    }
    if broker.client_id.len() > 200 {
        problems.add("broker.client_id", "must be at most 200 bytes");
    }
    if broker.max_packet_bytes < 1024 {
        problems.add(
            "broker.max_packet_bytes",
            "must be at least 1024 bytes; 262144 suits most telemetry",
        );
    }
    if broker.password.is_some() && broker.password_file.is_some() {
        problems.add(
            "broker.password_file",
            "is set together with password; keep one of them (password_file keeps the secret out of the config)",
        );
    }
    if broker.password.is_some() && broker.username.is_none() {
        problems.add(
            "broker.password",
            "is set without a username; MQTT sends a password only with a username",
        );
    }
    if broker.password_file.is_some() && broker.username.is_none() {
        problems.add(
            "broker.password_file",
            "is set without a username; MQTT sends a password only with a username",
        );
    }
    let tls = broker.url.starts_with("mqtts://");
    for (key, value) in [
        ("ca_file", &broker.ca_file),
        ("cert_file", &broker.cert_file),
        ("key_file", &broker.key_file),
    ] {
        if value.is_some() && !tls {
            problems.add(
                format!("broker.{key}"),
                format!("is only used with TLS; use an mqtts:// url or remove {key}"),
            );
        }
    }
    match (&broker.cert_file, &broker.key_file) {
        (Some(_), None) => problems.add(
            "broker.cert_file",
            "needs key_file too: a client certificate is presented with its private key",
        ),
        (None, Some(_)) => problems.add(
            "broker.key_file",
            "needs cert_file too: a private key is presented with its client certificate",
        ),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use crate::config::test_support::{line_of, problem_after};
    use crate::config::{parse, Overrides, Protocol, Secret, EXAMPLE};
    use std::path::Path;

    #[test]
    fn keep_alive_under_a_second_is_rejected() {
        let (problem, _) = problem_after("keep_alive = \"30s\"", "keep_alive = \"500ms\"");
        assert_eq!(problem.path, "broker.keep_alive");
    }

    #[test]
    fn protocol_is_3_1_1_or_5_and_5_needs_a_keep_alive_of_5s() {
        let config = parse(EXAMPLE, Path::new("example.toml"), &Overrides::default()).unwrap();
        assert_eq!(config.broker.protocol, Protocol::V311);
        for written in ["\"5\"", "5"] {
            let text =
                EXAMPLE.replacen("protocol = \"3.1.1\"", &format!("protocol = {written}"), 1);
            let config = parse(&text, Path::new("example.toml"), &Overrides::default()).unwrap();
            assert_eq!(config.broker.protocol, Protocol::V5);
        }

        let (problem, text) = problem_after("protocol = \"3.1.1\"", "protocol = \"3.1\"");
        assert_eq!(
            problem.line_col.map(|lc| lc.0),
            Some(line_of(&text, "protocol = \"3.1\""))
        );
        assert!(
            problem.message.contains("write \"3.1.1\"") && problem.message.contains("\"5\""),
            "{}",
            problem.message
        );

        let text = EXAMPLE.replacen("protocol = \"3.1.1\"", "protocol = \"5\"", 1);
        let err = parse(
            &text.replacen("keep_alive = \"30s\"", "keep_alive = \"2s\"", 1),
            Path::new("example.toml"),
            &Overrides::default(),
        )
        .unwrap_err();
        let problem = &err.problems()[0];
        assert_eq!(err.problems().len(), 1, "{err}");
        assert_eq!(problem.path, "broker.keep_alive");
        assert_eq!(
            problem.line_col.map(|lc| lc.0),
            Some(line_of(&text, "keep_alive = \"30s\""))
        );
        assert!(
            problem.message.contains("at least 5s"),
            "{}",
            problem.message
        );
        assert!(
            problem.message.contains("protocol = \"5\""),
            "{}",
            problem.message
        );
    }

    #[test]
    fn broker_url_needs_an_mqtt_scheme() {
        let (problem, _) = problem_after("mqtt://127.0.0.1:1883", "http://127.0.0.1:1883");
        assert_eq!(problem.path, "broker.url");
        assert!(problem.message.contains("mqtt://host:port"));
    }

    #[test]
    fn the_password_never_shows_in_debug_output() {
        let text = EXAMPLE.replace(
            "# username = \"weir\"\n# password = \"secret\"",
            "username = \"weir\"\npassword = \"hunter2\"",
        );
        let config = parse(&text, Path::new("x.toml"), &Overrides::default()).unwrap();
        assert_eq!(
            config.broker.password.as_ref().map(Secret::expose),
            Some("hunter2")
        );
        let debug = format!("{config:?} {:#?}", config.broker);
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(debug.contains("password: Some(***)"), "{debug}");
    }

    #[test]
    fn an_error_on_the_password_line_names_it_without_the_value() {
        for (line, found) in [
            ("password = 73194628501", "found a number"),
            ("password = 7319462.8501", "found a number"),
            ("password = true", "found a boolean"),
        ] {
            let text = EXAMPLE.replace(
                "# username = \"weir\"\n# password = \"secret\"",
                &format!("username = \"weir\"\n{line}"),
            );
            let err = parse(&text, Path::new("x.toml"), &Overrides::default()).unwrap_err();
            let shown = err.to_string();
            assert!(!shown.contains("7319462"), "{shown}");
            assert!(shown.contains(found), "{shown}");
            assert_eq!(
                err.problems()[0].line_col.map(|lc| lc.0),
                Some(line_of(&text, "password = "))
            );
        }
    }

    #[test]
    fn a_broker_url_with_credentials_is_refused_with_the_password_hidden() {
        for (key, from) in [
            ("url", "url = \"mqtt://127.0.0.1:1883\""),
            ("publish_url", "# username = \"weir\""),
        ] {
            let text = EXAMPLE.replace(
                from,
                &format!("{key} = \"mqtt://weir:hunter2@127.0.0.1:1883\""),
            );
            let err = parse(&text, Path::new("x.toml"), &Overrides::default()).unwrap_err();
            let shown = err.to_string();
            assert!(!shown.contains("hunter2"), "{shown}");
            assert!(shown.contains("mqtt://weir:***@127.0.0.1:1883"), "{shown}");
        }
        let overrides = Overrides {
            broker_url: Some("mqtt://weir:hunter2@127.0.0.1:1883".into()),
            ..Overrides::default()
        };
        let err = parse(EXAMPLE, Path::new("x.toml"), &overrides).unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[test]
    fn password_and_password_file_exclude_each_other() {
        let text = EXAMPLE.replace(
            "# username = \"weir\"\n# password = \"secret\"",
            "username = \"weir\"\npassword = \"x\"\npassword_file = \"/etc/weir/pw\"",
        );
        let err = parse(&text, Path::new("x.toml"), &Overrides::default()).unwrap_err();
        assert_eq!(err.problems().len(), 1, "{err}");
        assert_eq!(err.problems()[0].path, "broker.password_file");
        assert_eq!(
            err.problems()[0].line_col.map(|lc| lc.0),
            Some(line_of(&text, "password_file"))
        );
    }

    #[test]
    fn the_env_password_replaces_the_file_and_needs_a_username() {
        let overrides = Overrides {
            broker_password: Some(Secret::new("from-env")),
            ..Overrides::default()
        };
        let text = EXAMPLE.replace(
            "# username = \"weir\"",
            "username = \"weir\"\npassword_file = \"/etc/weir/pw\"",
        );
        let config = parse(&text, Path::new("x.toml"), &overrides).unwrap();
        assert_eq!(
            config.broker.password.as_ref().map(Secret::expose),
            Some("from-env")
        );
        assert_eq!(config.broker.password_file, None);

        let err = parse(EXAMPLE, Path::new("x.toml"), &overrides).unwrap_err();
        let problem = &err.problems()[0];
        assert_eq!(problem.path, "broker.password");
        assert!(problem.message.contains("WEIR_BROKER_PASSWORD"), "{err}");
        assert!(!err.to_string().contains("from-env"), "{err}");
    }

    #[test]
    fn client_certificates_need_both_files_and_tls() {
        let plain = EXAMPLE.replace(
            "# ca_file = \"/etc/weir/ca.pem\"",
            "cert_file = \"c.pem\"\nkey_file = \"k.pem\"",
        );
        let err = parse(&plain, Path::new("x.toml"), &Overrides::default()).unwrap_err();
        let paths: Vec<&str> = err.problems().iter().map(|p| p.path.as_str()).collect();
        assert_eq!(paths, ["broker.cert_file", "broker.key_file"], "{err}");
        assert!(err.to_string().contains("is only used with TLS"), "{err}");

        let tls = EXAMPLE.replace("mqtt://127.0.0.1:1883", "mqtts://127.0.0.1:8883");
        for (line, path, needs) in [
            (
                "cert_file = \"c.pem\"",
                "broker.cert_file",
                "needs key_file",
            ),
            ("key_file = \"k.pem\"", "broker.key_file", "needs cert_file"),
        ] {
            let text = tls.replace("# ca_file = \"/etc/weir/ca.pem\"", line);
            let err = parse(&text, Path::new("x.toml"), &Overrides::default()).unwrap_err();
            assert_eq!(err.problems().len(), 1, "{err}");
            assert_eq!(err.problems()[0].path, path);
            assert!(err.problems()[0].message.contains(needs), "{err}");
        }
        let both = tls.replace(
            "# ca_file = \"/etc/weir/ca.pem\"",
            "ca_file = \"ca.pem\"\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"",
        );
        parse(&both, Path::new("x.toml"), &Overrides::default()).unwrap();
    }
}
