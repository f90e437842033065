//! SenML input (RFC 8428) end to end through a real Mosquitto: JSON and CBOR packs, several
//! readings per pack resolved from base time and base value, each run through the rules in time
//! order.

mod common;

use common::{start_weir_from_text, Mosquitto, Publisher, Subscriber};
use serde_json::json;

const CONFIG: &str = r#"
[broker]
url = "mqtt://127.0.0.1:1883"

[inputs.senml]
topic = "senml/{site}/{device}"
format = "senml"

[inputs.senml_cbor]
topic = "senml-cbor/{site}/{device}"
format = "senml_cbor"

[rules.overheat.hysteresis]
metric = "temperature"
enter_above = 30.0
exit_below = 28.0
active = "hot"
inactive = "normal"

[rules.overheat]
input = "senml"

[rules.overheat.output]
topic = "alerts/{site}/{device}/{rule}"

[rules.overheat_cbor]
input = "senml_cbor"

[rules.overheat_cbor.hysteresis]
metric = "temperature"
enter_above = 30.0
exit_below = 28.0
active = "hot"
inactive = "normal"

[rules.overheat_cbor.output]
topic = "alerts/{site}/{device}/{rule}"
"#;

const BT: f64 = 1_732_600_000.0;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn senml_packs_in_json_and_cbor_yield_one_reading_per_time() {
    let broker = Mosquitto::start();
    let weir = start_weir_from_text(&broker, CONFIG, "senml").await;
    let mut alerts = Subscriber::start(&broker, "alerts/#").await;
    let mut device = Publisher::start(&broker).await;

    // One pack, four times: 25, 31, 29, 27 (base value 20 + v), out of order in the pack.
    let pack = json!([
        {"bn": "urn:dev:mac:0024befffe804ff1:", "bt": BT, "bv": 20.0, "n": "temperature", "v": 5.0},
        {"n": "temperature", "v": 9.0, "t": 2},
        {"n": "temperature", "v": 11.0, "t": 1},
        {"n": "humidity", "v": 20.0, "t": 1},
        {"n": "temperature", "v": 7.0, "t": 3}
    ]);
    device.publish("senml/s1/d1", pack.to_string()).await;

    // The same readings as CBOR with the RFC's integer labels.
    use ciborium::Value as V;
    let record = |pairs: Vec<(i64, V)>| {
        V::Map(
            pairs
                .into_iter()
                .map(|(k, v)| (V::Integer(k.into()), v))
                .collect(),
        )
    };
    let temperature = |t: i64, v: f64| {
        record(vec![
            (0, V::Text("temperature".into())),
            (2, V::Float(v)),
            (6, V::Integer(t.into())),
        ])
    };
    let cbor_pack = V::Array(vec![
        record(vec![(-3, V::Float(BT))]),
        temperature(0, 25.0),
        temperature(1, 31.0),
        temperature(2, 29.0),
        temperature(3, 27.0),
    ]);
    let mut bytes = Vec::new();
    ciborium::into_writer(&cbor_pack, &mut bytes).expect("cbor");
    device.publish("senml-cbor/s1/d2", bytes).await;

    let mut got: Vec<(String, String, String, i64)> = alerts
        .take(4)
        .await
        .iter()
        .map(|m| {
            let e = m.json();
            (
                e["device"].as_str().unwrap_or_default().to_owned(),
                e["from"].as_str().unwrap_or_default().to_owned(),
                e["to"].as_str().unwrap_or_default().to_owned(),
                e["ts"].as_i64().unwrap_or_default(),
            )
        })
        .collect();
    got.sort();
    let t0 = (BT * 1000.0) as i64;
    assert_eq!(
        got,
        vec![
            ("d1".into(), "hot".into(), "normal".into(), t0 + 3000),
            ("d1".into(), "normal".into(), "hot".into(), t0 + 1000),
            ("d2".into(), "hot".into(), "normal".into(), t0 + 3000),
            ("d2".into(), "normal".into(), "hot".into(), t0 + 1000),
        ]
    );
    alerts.assert_quiet().await;
    weir.stop().await.expect("weir stops cleanly");
}
