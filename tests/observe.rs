//! What a person watching weir sees, through a real Mosquitto: the live tap of derived events
//! (Server-Sent Events, filtered by rule and device) and the rules API.

mod common;

use common::{
    eventually, http_get, start_weir, wait_until, Mosquitto, Publisher, SseClient, Subscriber,
    DEADLINE, GRACE, T0,
};
use serde_json::{json, Value};

fn reading(ts: i64, seq: u64, temperature: f64) -> Value {
    json!({"ts": ts, "seq": seq, "temperature": temperature, "humidity": 40.0})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tap_streams_derived_events_filtered_by_rule_and_device() {
    let broker = Mosquitto::start();
    let weir = start_weir(&broker, "tap").await;
    let mut alerts = Subscriber::start(&broker, "alerts/+/+/overheat").await;
    let mut d1_alerts = SseClient::connect(weir.http_addr, "/api/events?rule=overheat&device=d1")
        .await
        .expect("the tap answers 200");
    let mut everything = SseClient::connect(weir.http_addr, "/api/events")
        .await
        .expect("the tap answers 200");
    assert!(weir.metrics.tap.is_watched());

    let mut device = Publisher::start(&broker).await;
    // d2 crosses the threshold first: its alert must not reach the d1 client.
    device.reading("s1", "d2", reading(T0, 1, 25.0)).await;
    device
        .reading("s1", "d2", reading(T0 + 1000, 2, 31.0))
        .await;
    device.reading("s1", "d1", reading(T0, 1, 25.0)).await;
    device
        .reading("s1", "d1", reading(T0 + 1000, 2, 31.0))
        .await;
    // Closes d1's first climate window: a rollup the d1 overheat client must not see.
    device
        .reading("s1", "d1", reading(T0 + 10_000, 3, 29.0))
        .await;

    let published: Vec<Value> = alerts.take(2).await.iter().map(|m| m.json()).collect();
    let d1_published = published
        .iter()
        .find(|event| event["device"] == "d1")
        .expect("an alert for d1 was published")
        .clone();

    let seen = d1_alerts.next(DEADLINE).await.expect("an event on the tap");
    let event: Value = serde_json::from_str(&seen.data).expect("tap data is JSON");
    assert_eq!(event, d1_published, "the tap shows what was published");
    assert_eq!(
        seen.id.as_deref(),
        event["id"].as_str(),
        "SSE id is the event id"
    );
    assert_eq!(event["to"], "hot");

    // The unfiltered client sees all three events, in the order the workers produced them per
    // device; once it has, the filtered client has been offered everything too.
    let mut all = Vec::new();
    for _ in 0..3 {
        let seen = everything
            .next(DEADLINE)
            .await
            .expect("three events on the tap");
        let event: Value = serde_json::from_str(&seen.data).expect("tap data is JSON");
        all.push((event["rule"].clone(), event["device"].clone()));
    }
    all.sort_by_key(|(rule, device)| format!("{rule}{device}"));
    assert_eq!(
        all,
        [
            (json!("climate"), json!("d1")),
            (json!("overheat"), json!("d1")),
            (json!("overheat"), json!("d2")),
        ]
    );
    assert_eq!(
        d1_alerts.next(GRACE).await,
        None,
        "filtered client saw more"
    );

    let unknown = SseClient::connect(weir.http_addr, "/api/events?rule=nope").await;
    let Err((status, body)) = unknown else {
        panic!("an unknown rule must be refused")
    };
    assert_eq!(status, 404);
    assert!(
        body.contains("overheat"),
        "the error lists the rules: {body}"
    );

    drop(everything);
    // The tap client still connected must not hold up shutdown.
    weir.stop()
        .await
        .expect("weir stops cleanly with a tap client connected");
    assert_eq!(
        d1_alerts.next(DEADLINE).await,
        None,
        "the stream ends at shutdown"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_api_reports_counters_and_state_sizes() {
    let broker = Mosquitto::start();
    let weir = start_weir(&broker, "rules-api").await;
    let mut device = Publisher::start(&broker).await;
    device.reading("s1", "d1", reading(T0, 1, 25.0)).await;
    device
        .reading("s1", "d1", reading(T0 + 1000, 2, 31.0))
        .await;
    device.reading("s1", "d2", reading(T0, 1, 26.0)).await;
    // d1 moves to the next window; then a reading for the fired window is late.
    device
        .reading("s1", "d1", reading(T0 + 10_000, 3, 31.0))
        .await;
    device
        .reading("s1", "d1", reading(T0 + 2000, 4, 31.0))
        .await;
    let decoded = weir
        .metrics
        .readings_decoded
        .with_label_values(&["telemetry"]);
    assert!(wait_until(DEADLINE, || decoded.get() == 5).await);

    let addr = weir.http_addr;
    let rule = |body: &Value, name: &str| -> Value {
        body["rules"]
            .as_array()
            .and_then(|rules| rules.iter().find(|r| r["name"] == name))
            .cloned()
            .unwrap_or_else(|| panic!("no rule {name} in {body}"))
    };
    // Workers report state about once a second; wait for the report that includes all of it.
    let last = std::sync::Mutex::new(Value::Null);
    let reported = eventually(DEADLINE, || {
        let last = &last;
        async move {
            let (status, text) = http_get(addr, "/api/rules").await;
            assert_eq!(status, 200, "{text}");
            let body: Value = serde_json::from_str(&text).expect("/api/rules is JSON");
            let climate = rule(&body, "climate");
            let overheat = rule(&body, "overheat");
            *last.lock().unwrap() = body;
            climate["state"]["open_windows"] == 2
                && climate["state"]["devices"] == 2
                && overheat["counters"]["published"] == 1
        }
    })
    .await;
    let body = last.into_inner().unwrap();
    assert!(reported, "state never reported: {body:#}");

    let overheat = rule(&body, "overheat");
    assert_eq!(overheat["operator"], "hysteresis");
    assert_eq!(overheat["emits"], "state_change");
    assert_eq!(overheat["input"], "telemetry");
    assert_eq!(overheat["output_topic"], "alerts/{site}/{device}/overheat");
    assert_eq!(overheat["counters"]["emitted"], 1);
    assert_eq!(overheat["counters"]["out_of_order"], 1);
    assert_eq!(overheat["state"]["open_windows"], 0);
    let climate = rule(&body, "climate");
    assert_eq!(climate["operator"], "tumbling");
    assert_eq!(climate["counters"]["emitted"], 1);
    assert_eq!(climate["counters"]["late"], 1);
    weir.stop().await.expect("weir stops cleanly");
}
