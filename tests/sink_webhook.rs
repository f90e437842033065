//! The webhook sink (issue 16) against an HTTP server written in the test
//! (`common::services::Webhook`), with a real Mosquitto for the readings and the broker copy of
//! every event: ids as idempotency keys, retries on 500 and 429 (honouring `Retry-After`) and on
//! a server that never answers, dead letters for a 400, the bearer token, fail-fast at start,
//! and events kept across a restart while the webhook is down.

mod common;

use common::services::Webhook;
use common::{config_from_text, start_weir_with, wait_until, Mosquitto, Subscriber};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

const SETTLE: Duration = Duration::from_secs(30);

/// The example with the overheat rule's events going to the broker and to the webhook `hook`.
fn webhook_config(url: &str, extra: &str) -> String {
    common::example_with_overheat_outputs(
        "[[rules.overheat.output]]\nsink = \"hook\"\n\n[[rules.overheat.output]]\ntopic = \"alerts/{site}/{device}/overheat\"",
        &format!("[sinks.hook]\nkind = \"http\"\nurl = \"{url}\"\nretry_initial = \"50ms\"\nretry_max = \"500ms\"\n{extra}"),
    )
}

fn crossings(device: &str, n: usize) -> Vec<(String, Vec<u8>)> {
    common::crossings(device, 0, n)
}

async fn start(broker: &Mosquitto, text: &str, tag: &str) -> weir::app::Running {
    let mut config = config_from_text(broker, text, tag);
    config.delivery.state_dir = Some(broker.scratch("state"));
    start_weir_with(config).await
}

/// The ids the webhook took (2xx), in arrival order, from single-event bodies.
fn delivered(hook: &Webhook) -> Vec<String> {
    hook.requests()
        .iter()
        .filter(|(status, _)| (200..300).contains(status))
        .map(|(_, request)| {
            let event: serde_json::Value =
                serde_json::from_slice(&request.body).expect("JSON body");
            event["id"].as_str().unwrap_or_default().to_owned()
        })
        .collect()
}

fn retries(weir: &weir::app::Running) -> u64 {
    weir.metrics.sink_retries.with_label_values(&["hook"]).get()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_event_is_posted_once_with_its_id_as_idempotency_key_and_the_bearer_token() {
    let broker = Mosquitto::start();
    let hook = Webhook::start();
    let token = broker.scratch("token");
    std::fs::write(&token, "s3cret-token\n").expect("write token");
    let extra = format!("bearer_token_file = {token:?}\nheaders = {{ X-Source = \"weir\" }}\n");
    let weir = start(
        &broker,
        &webhook_config(&hook.url("/hook"), &extra),
        "hook-ok",
    )
    .await;
    let mut alerts = Subscriber::start(&broker, "alerts/#").await;
    common::publish_all(&broker, &crossings("dev-1", 6)).await;

    let from_broker: Vec<String> = alerts
        .take(6)
        .await
        .iter()
        .map(|m| m.json()["id"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert!(wait_until(SETTLE, || delivered(&hook).len() >= 6).await);
    assert_eq!(delivered(&hook), from_broker, "the same events, in order");
    for (_, request) in hook.requests() {
        let event: serde_json::Value = serde_json::from_slice(&request.body).unwrap();
        assert_eq!(request.header("Idempotency-Key"), event["id"].as_str());
        assert_eq!(request.header("Authorization"), Some("Bearer s3cret-token"));
        assert_eq!(request.header("Content-Type"), Some("application/json"));
        assert_eq!(request.header("Weir-Rule"), Some("overheat"));
        assert_eq!(request.header("X-Source"), Some("weir"));
    }
    assert!(
        wait_until(SETTLE, || weir
            .metrics
            .sink_confirmed
            .with_label_values(&["hook"])
            .get()
            == 6)
        .await
    );
    weir.stop().await.expect("weir stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_that_fails_five_times_gets_the_event_on_the_sixth_try() {
    let broker = Mosquitto::start();
    let hook = Webhook::start();
    hook.answer(500);
    let weir = start(&broker, &webhook_config(&hook.url("/hook"), ""), "hook-500").await;
    common::publish_all(&broker, &crossings("dev-1", 1)).await;
    assert!(
        wait_until(SETTLE, || hook.requests().len() >= 5).await,
        "five tries"
    );
    assert_eq!(weir.metrics.sink_up.with_label_values(&["hook"]).get(), 0);
    hook.answer(200);
    assert!(wait_until(SETTLE, || delivered(&hook).len() == 1).await);
    let requests = hook.requests();
    let ids: BTreeSet<_> = requests
        .iter()
        .map(|(_, r)| r.header("Idempotency-Key").unwrap_or_default().to_owned())
        .collect();
    assert_eq!(ids.len(), 1, "every try carries the same key");
    assert!(retries(&weir) >= 5, "retries counted: {}", retries(&weir));
    assert!(
        wait_until(SETTLE, || weir
            .metrics
            .sink_up
            .with_label_values(&["hook"])
            .get()
            == 1)
        .await
    );
    assert_eq!(
        weir.metrics
            .sink_dead_letters
            .with_label_values(&["hook", "http_status"])
            .get(),
        0
    );
    weir.stop().await.expect("weir stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_400_sends_the_event_to_the_dead_letter_topic_and_the_next_ones_still_flow() {
    let broker = Mosquitto::start();
    let hook = Webhook::start();
    hook.answer(400);
    let weir = start(&broker, &webhook_config(&hook.url("/hook"), ""), "hook-400").await;
    let mut dead = Subscriber::start(&broker, "weir/dead-letter/hook/#").await;
    common::publish_all(&broker, &crossings("dev-1", 1)).await;
    let letter = dead.take(1).await.remove(0);
    assert_eq!(letter.topic, "weir/dead-letter/hook/http_status");
    let letter = letter.json();
    assert_eq!(letter["sink"], "hook");
    assert_eq!(letter["reason"], "http_status");
    assert_eq!(
        letter["message"],
        "HTTP 400 Bad Request: {\"detail\":\"unknown site\"}"
    );
    assert_eq!(letter["event"]["id"], letter["id"]);
    assert_eq!(hook.requests().len(), 1, "a 400 is not retried");
    assert_eq!(
        weir.metrics
            .sink_dead_letters
            .with_label_values(&["hook", "http_status"])
            .get(),
        1
    );
    hook.answer(200);
    common::publish_all(&broker, &crossings("dev-2", 2)).await;
    assert!(wait_until(SETTLE, || delivered(&hook).len() == 2).await);
    weir.stop().await.expect("weir stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_that_never_answers_times_out_and_backs_off_then_gets_everything_in_order() {
    let broker = Mosquitto::start();
    let hook = Webhook::start();
    hook.answer(0);
    let weir = start(
        &broker,
        &webhook_config(&hook.url("/hook"), "timeout = \"300ms\"\n"),
        "hook-silent",
    )
    .await;
    let mut alerts = Subscriber::start(&broker, "alerts/#").await;
    common::publish_all(&broker, &crossings("dev-1", 4)).await;
    let expected: Vec<String> = alerts
        .take(4)
        .await
        .iter()
        .map(|m| m.json()["id"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert!(
        wait_until(SETTLE, || retries(&weir) >= 3).await,
        "timeouts are retried"
    );
    assert_eq!(weir.metrics.sink_up.with_label_values(&["hook"]).get(), 0);
    // Backoff: the tries spread out (50 ms doubling to 500 ms, plus the 300 ms timeout).
    let tries = hook.requests().len();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        hook.requests().len() - tries <= 4,
        "tries are spaced by the backoff"
    );
    hook.answer(200);
    assert!(wait_until(SETTLE, || delivered(&hook).len() >= 4).await);
    assert_eq!(
        delivered(&hook),
        expected,
        "every event, in order, once answered"
    );
    weir.stop().await.expect("weir stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_is_retried_after_its_retry_after() {
    let broker = Mosquitto::start();
    let hook = Webhook::start();
    hook.answer(429);
    let weir = start(&broker, &webhook_config(&hook.url("/hook"), ""), "hook-429").await;
    common::publish_all(&broker, &crossings("dev-1", 1)).await;
    assert!(wait_until(SETTLE, || !hook.requests().is_empty()).await);
    let first = Instant::now();
    hook.answer(200);
    assert!(wait_until(SETTLE, || delivered(&hook).len() == 1).await);
    let waited = first.elapsed();
    assert!(
        waited >= Duration::from_millis(800),
        "the retry waited for Retry-After: 1 ({waited:?}), not the 50 ms backoff"
    );
    weir.stop().await.expect("weir stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_that_cannot_be_reached_at_start_stops_weir_with_the_sinks_name() {
    let broker = Mosquitto::start();
    let closed = format!("http://127.0.0.1:{}/hook", common::free_port());
    let mut config = config_from_text(
        &broker,
        &webhook_config(&closed, "timeout = \"1s\"\n"),
        "hook-closed",
    );
    config.delivery.state_dir = Some(broker.scratch("state"));
    let err = match weir::app::start(config).await {
        Ok(_) => panic!("weir started with an unreachable webhook"),
        Err(err) => format!("{err:#}"),
    };
    assert!(
        err.contains("sink `hook` (http at http://127.0.0.1:"),
        "{err}"
    );
    assert!(err.contains("cannot connect"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_the_webhook_did_not_confirm_survive_a_restart() {
    let broker = Mosquitto::start_persistent_on(common::free_port());
    let hook = Webhook::start();
    hook.answer(503);
    let text = webhook_config(&hook.url("/hook"), "");
    let state = broker.scratch("state");
    let mut config = config_from_text(&broker, &text, "hook-restart");
    config.delivery.state_dir = Some(state.clone());
    let client_id = config.broker.client_id.clone();
    let weir = start_weir_with(config).await;
    let mut alerts = Subscriber::start(&broker, "alerts/#").await;
    common::publish_all(&broker, &crossings("dev-1", 4)).await;
    let expected: BTreeSet<String> = alerts
        .take(4)
        .await
        .iter()
        .map(|m| m.json()["id"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert!(wait_until(SETTLE, || hook.requests().len() >= 2).await);
    weir.stop().await.expect("weir stops");
    assert!(delivered(&hook).is_empty());

    hook.answer(200);
    let mut config = config_from_text(&broker, &text, "hook-restart");
    config.delivery.state_dir = Some(state);
    config.broker.client_id = client_id;
    let weir = start_weir_with(config).await;
    assert!(
        wait_until(SETTLE, || delivered(&hook)
            .iter()
            .cloned()
            .collect::<BTreeSet<_>>()
            == expected)
        .await,
        "every event reached the webhook after the restart: {:?} of {expected:?}",
        delivered(&hook)
    );
    weir.stop().await.expect("weir stops");
}

/// Events per second to a local webhook, one event per request and 100 per request, from an
/// outbox that filled while the webhook answered 503: the time from its first 2xx to the last.
/// Printed (`cargo test --release --test sink_webhook -- --nocapture throughput`), not asserted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throughput_to_a_local_webhook_is_measured() {
    for batch in [1usize, 100] {
        // 2,000 QoS 1 readings published faster than weir acknowledges them (after its log's
        // fsync): more than Mosquitto queues per client by default (1,000; it drops the rest).
        let broker = Mosquitto::start_with("max_queued_messages 100000\n");
        let hook = Webhook::start();
        hook.answer(503);
        let extra = format!("batch = {batch}\n");
        let weir = start(
            &broker,
            &webhook_config(&hook.url("/hook"), &extra),
            "hook-rate",
        )
        .await;
        // 50 devices x 40 readings, every reading a crossing: 2,000 events.
        let readings: Vec<_> = (0..50)
            .flat_map(|d| crossings(&format!("dev-{d}"), 40))
            .collect();
        common::publish_all(&broker, &readings).await;
        let metrics = weir.metrics.clone();
        let outbox = || metrics.sink_outbox.with_label_values(&["hook"]).get();
        assert!(
            wait_until(SETTLE, || outbox() >= 2000).await,
            "the outbox filled: {}",
            outbox()
        );
        hook.answer(200);
        let confirmed = || metrics.sink_confirmed.with_label_values(&["hook"]).get();
        assert!(
            wait_until(Duration::from_secs(60), || confirmed() >= 2000).await,
            "confirmed {} of 2000; {} requests",
            confirmed(),
            hook.requests().len()
        );
        let ok: Vec<_> = hook
            .requests()
            .into_iter()
            .filter(|(status, _)| *status == 200)
            .map(|(_, request)| request.at)
            .collect();
        let span = ok[ok.len() - 1].duration_since(ok[0]);
        println!(
            "webhook, batch {batch}: 2000 events in {} requests over {span:?} ({:.0} events/s)",
            ok.len(),
            2000.0 / span.as_secs_f64().max(1e-6)
        );
        weir.stop().await.expect("weir stops");
    }
}
