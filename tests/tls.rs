//! Broker security against a real Mosquitto: TLS with a CA made by the test, a wrong CA that
//! must fail with a clear reason, client-certificate authentication, and a username with a
//! password from a file or the environment.
//!
//! Each test's Mosquitto keeps its anonymous plain listener for the test's own clients and adds
//! a second listener (TLS) or a password file; weir connects only to the secured side.

mod common;

use common::{
    example_config, free_port, start_weir_with, temp_dir, wait_until, Mosquitto, Publisher,
    Subscriber, TempDir, DEADLINE, T0,
};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Duration;
use weir::config::{Config, Secret};

/// How long a probe connection may take; far above a loopback TLS handshake.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Certificates written by the test: a CA with a server and a client certificate, and a second
/// CA that signed neither. Removed with its directory when dropped.
struct Pki {
    _dir: TempDir,
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    other_ca: PathBuf,
}

fn ca(name: &str) -> (String, Issuer<'static, KeyPair>) {
    let key = KeyPair::generate().expect("generate CA key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key).expect("self-sign CA");
    (cert.pem(), Issuer::new(params, key))
}

/// (certificate PEM, key PEM) for `names`, signed by `issuer`, for one purpose.
fn leaf(
    issuer: &Issuer<'static, KeyPair>,
    common_name: &str,
    names: &[&str],
    purpose: ExtendedKeyUsagePurpose,
) -> (String, String) {
    let key = KeyPair::generate().expect("generate key");
    let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    let mut params = CertificateParams::new(names).expect("leaf params");
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![purpose];
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, issuer).expect("sign leaf");
    (cert.pem(), key.serialize_pem())
}

fn pki() -> Pki {
    let dir = temp_dir("pki");
    let write = |name: &str, pem: &str| {
        let path = dir.join(name);
        std::fs::write(&path, pem).expect("write PEM");
        path
    };
    let (ca_pem, issuer) = ca("weir test CA");
    let (server_pem, server_key) = leaf(
        &issuer,
        "localhost",
        &["localhost", "127.0.0.1"],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (client_pem, client_key) = leaf(
        &issuer,
        "weir-gateway",
        &[],
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    let (other_pem, _) = ca("unrelated CA");
    Pki {
        ca: write("ca.pem", &ca_pem),
        server_cert: write("server.pem", &server_pem),
        server_key: write("server.key", &server_key),
        client_cert: write("client.pem", &client_pem),
        client_key: write("client.key", &client_key),
        other_ca: write("other-ca.pem", &other_pem),
        _dir: dir,
    }
}

/// A Mosquitto with a TLS listener on a port of its own; returns it with that port.
fn tls_broker(pki: &Pki, require_certificate: bool) -> (Mosquitto, u16) {
    let tls_port = free_port();
    let mut extra = format!(
        "listener {tls_port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\n",
        pki.ca.display(),
        pki.server_cert.display(),
        pki.server_key.display()
    );
    if require_certificate {
        extra.push_str("require_certificate true\nuse_identity_as_username true\n");
    }
    (Mosquitto::start_with(&extra), tls_port)
}

/// The example config pointed at the TLS listener, trusting `ca_file`.
fn tls_config(broker: &Mosquitto, tls_port: u16, ca_file: &Path, tag: &str) -> Config {
    let mut config = example_config(broker, tag);
    config.broker.url = format!("mqtts://127.0.0.1:{tls_port}");
    config.broker.ca_file = Some(ca_file.to_owned());
    config
}

/// Publishes 25 then 31 for `plant-1/dev-1` on the plain listener and expects weir's
/// `normal -> hot` alert, which proves intake and publishing both work over TLS.
async fn alert_flows_through(broker: &Mosquitto) {
    let mut alerts = Subscriber::start(broker, "alerts/+/+/overheat").await;
    let mut device = Publisher::start(broker).await;
    for (i, temperature) in [25.0, 31.0].into_iter().enumerate() {
        let payload = json!({"ts": T0 + 1000 * i as i64, "seq": i + 1, "temperature": temperature});
        device.reading("plant-1", "dev-1", payload).await;
    }
    let alert = alerts.take(1).await.remove(0);
    assert_eq!(alert.topic, "alerts/plant-1/dev-1/overheat");
    let event = alert.json();
    assert_eq!(
        (event["from"].as_str(), event["to"].as_str()),
        (Some("normal"), Some("hot"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weir_connects_over_tls_with_the_ca_file_and_publishes_alerts() {
    let pki = pki();
    let (broker, tls_port) = tls_broker(&pki, false);
    let config = tls_config(&broker, tls_port, &pki.ca, "tls");
    weir::mqtt::try_connect(&config.broker, PROBE_TIMEOUT)
        .await
        .unwrap_or_else(|err| panic!("{err:#}\nmosquitto log:\n{}", broker.log()));
    let weir = start_weir_with(config).await;
    alert_flows_through(&broker).await;
    weir.stop().await.expect("weir stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_never_connects_and_says_to_set_ca_file() {
    let pki = pki();
    let (broker, tls_port) = tls_broker(&pki, false);
    let config = tls_config(&broker, tls_port, &pki.other_ca, "wrong-ca");

    let err = weir::mqtt::try_connect(&config.broker, PROBE_TIMEOUT)
        .await
        .expect_err("a certificate from another CA must be refused");
    let text = format!("{err:#}");
    assert!(text.contains("not signed by a trusted CA"), "{text}");
    assert!(text.contains("UnknownIssuer"), "{text}");
    assert!(text.contains("broker.ca_file"), "{text}");

    // The running pipeline retries (counted) and never reports ready.
    let running = weir::app::start(config).await.expect("weir starts");
    let reconnects = running
        .metrics
        .mqtt_reconnects
        .with_label_values(&["source"]);
    assert!(
        wait_until(DEADLINE, || reconnects.get() >= 3).await,
        "the source made {} failed attempts, expected at least 3",
        reconnects.get()
    );
    assert!(
        !running.metrics.is_ready(),
        "weir became ready with a CA that did not sign the broker's certificate"
    );
    running.stop().await.expect("weir stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_requiring_client_certificates_accepts_only_weir_with_one() {
    let pki = pki();
    let (broker, tls_port) = tls_broker(&pki, true);

    let without = tls_config(&broker, tls_port, &pki.ca, "no-cert");
    let err = weir::mqtt::try_connect(&without.broker, PROBE_TIMEOUT)
        .await
        .expect_err("the broker requires a client certificate");
    let text = format!("{err:#}");
    assert!(text.contains("CertificateRequired"), "{text}");
    assert!(text.contains("broker.cert_file"), "{text}");
    let running = weir::app::start(without).await.expect("weir starts");
    let reconnects = running
        .metrics
        .mqtt_reconnects
        .with_label_values(&["source"]);
    assert!(
        wait_until(DEADLINE, || reconnects.get() >= 3).await,
        "expected failed attempts without a client certificate"
    );
    assert!(!running.metrics.is_ready());
    running.stop().await.expect("weir stops");

    let mut with = tls_config(&broker, tls_port, &pki.ca, "client-cert");
    with.broker.cert_file = Some(pki.client_cert.clone());
    with.broker.key_file = Some(pki.client_key.clone());
    weir::mqtt::try_connect(&with.broker, PROBE_TIMEOUT)
        .await
        .unwrap_or_else(|err| panic!("{err:#}\nmosquitto log:\n{}", broker.log()));
    let weir = start_weir_with(with).await;
    alert_flows_through(&broker).await;
    weir.stop().await.expect("weir stops");
    // use_identity_as_username: the broker saw the certificate's common name.
    assert!(
        broker.log().contains("u'weir-gateway'"),
        "mosquitto did not log the certificate's identity:\n{}",
        broker.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn username_and_password_come_from_a_file_or_the_environment() {
    const PASSWD: &str = "/usr/bin/mosquitto_passwd";
    if !Path::new(PASSWD).exists() {
        common::not_installed(PASSWD, "mosquitto");
    }
    let dir = temp_dir("passwd");
    let passwords = dir.join("passwords");
    let status = std::process::Command::new(PASSWD)
        .arg("-b")
        .arg("-c")
        .arg(&passwords)
        .args(["weir", "s3cret pass"])
        .status()
        .expect("run mosquitto_passwd");
    assert!(status.success(), "mosquitto_passwd failed: {status}");
    // Anonymous clients (the test's own) stay allowed; a client that names a user must match.
    let broker = Mosquitto::start_with(&format!("password_file {}\n", passwords.display()));

    let password_file = dir.join("weir-password");
    std::fs::write(&password_file, "s3cret pass\n").expect("write password file");
    let mut config = example_config(&broker, "password");
    config.broker.username = Some("weir".into());
    config.broker.password_file = Some(password_file);
    weir::mqtt::try_connect(&config.broker, PROBE_TIMEOUT)
        .await
        .unwrap_or_else(|err| panic!("{err:#}\nmosquitto log:\n{}", broker.log()));

    let mut wrong = config.clone();
    wrong.broker.password = Some(Secret::new("wrong"));
    wrong.broker.password_file = None;
    let err = weir::mqtt::try_connect(&wrong.broker, PROBE_TIMEOUT)
        .await
        .expect_err("a wrong password must be refused");
    let text = format!("{err:#}");
    assert!(text.contains("refused"), "{text}");
    assert!(
        !text.contains("wrong"),
        "the error shows the password: {text}"
    );

    // WEIR_BROKER_PASSWORD (an override) wins over a password file holding a stale password.
    let stale = dir.join("stale-password");
    std::fs::write(&stale, "old\n").expect("write stale password");
    let text = std::fs::read_to_string(common::EXAMPLE_CONFIG)
        .expect("read example")
        .replace(
            "# username = \"weir\"",
            &format!(
                "username = \"weir\"\npassword_file = {:?}",
                stale.display().to_string()
            ),
        );
    let overrides = weir::config::Overrides {
        broker_url: Some(broker.url()),
        state_dir: Some(broker.scratch("state-env-password")),
        broker_password: Some(Secret::new("s3cret pass")),
        ..weir::config::Overrides::default()
    };
    let from_env = weir::config::parse(&text, Path::new("example.toml"), &overrides)
        .unwrap_or_else(|err| panic!("{err}"));
    weir::mqtt::try_connect(&from_env.broker, PROBE_TIMEOUT)
        .await
        .unwrap_or_else(|err| panic!("{err:#}"));

    let weir = start_weir_with(config).await;
    alert_flows_through(&broker).await;
    weir.stop().await.expect("weir stops");
}
