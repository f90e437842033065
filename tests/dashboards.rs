//! The dashboards and alerting rules, proven on a real Prometheus: weir runs against a real
//! Mosquitto under simulated load (plus malformed and late readings), Prometheus scrapes it every
//! second with `dashboards/prometheus/weir-alerts.yml` loaded, and every `expr` of every panel of
//! `dashboards/weir-overview.json` (Grafana variables substituted) and every alerting rule must
//! pass `promtool check rules`, evaluate through the HTTP API, and return data.

mod common;

use common::{
    eventually, http_get, promtool_check, start_weir, unique, Mosquitto, Prometheus, Publisher,
    DEADLINE, T0,
};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const DASHBOARD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/dashboards/weir-overview.json");
const ALERTS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/dashboards/prometheus/weir-alerts.yml"
);

/// Expressions over metrics whose series appear only with the first occurrence (a sink's dead
/// letters, labelled by reason; a cluster instance's partitions, labelled by partition, which
/// this single weir has none of). They must still evaluate.
const MAY_BE_EMPTY: &[&str] = &[
    "weir_sink_dead_letters_total",
    "weir_cluster_partition_lag_messages",
];

/// Panels whose queries must return finite numbers, not just series: the ones an operator looks
/// at first.
const CORE_PANELS: &[&str] = &[
    "Readings in / events out per second",
    "Processing latency percentiles (arrival to publish)",
    "MQTT connection",
];

/// (panel title, expr as written, expr with Grafana's variables substituted).
fn dashboard_queries() -> Vec<(String, String, String)> {
    let text = std::fs::read_to_string(DASHBOARD).expect("read the dashboard");
    let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut queries = Vec::new();
    let top = dashboard["panels"].as_array().expect("panels");
    // Collapsed rows keep their panels inside.
    let panels = top.iter().flat_map(|panel| {
        std::iter::once(panel).chain(panel["panels"].as_array().into_iter().flatten())
    });
    for panel in panels {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"]
                .as_str()
                .expect("a target has an expr")
                .to_owned();
            let substituted = expr
                .replace("$__rate_interval", "1m")
                .replace("${instance}", ".*")
                .replace("$instance", ".*");
            assert!(
                !substituted.contains('$'),
                "unknown Grafana variable in {expr}"
            );
            let title = panel["title"].as_str().unwrap_or_default().to_owned();
            queries.push((title, expr, substituted));
        }
    }
    assert!(queries.len() >= 20, "only {} queries found", queries.len());
    queries
}

fn promtool_check_rules(path: &Path) {
    let output = Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(path)
        .output()
        .unwrap_or_else(|err| match err.kind() {
            std::io::ErrorKind::NotFound => common::not_installed("promtool", "prometheus"),
            _ => panic!("cannot run promtool: {err}"),
        });
    assert!(
        output.status.success(),
        "promtool check rules {} failed:\n{}{}",
        path.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The dashboard's queries as recording rules, so promtool parses every one of them.
fn write_dashboard_rules(dir: &Path, queries: &[(String, String, String)]) -> PathBuf {
    let rules: Vec<Value> = queries
        .iter()
        .enumerate()
        .map(|(i, (_, _, expr))| json!({"record": format!("weir_dashboard:query_{i}"), "expr": expr}))
        .collect();
    // JSON is YAML, so the file needs no YAML library.
    let file = json!({"groups": [{"name": "weir-dashboard", "rules": rules}]});
    let path = dir.join("dashboard-queries.yml");
    std::fs::write(&path, file.to_string()).expect("write the dashboard rules");
    path
}

fn samples(answer: &Value) -> &[Value] {
    answer["data"]["result"]
        .as_array()
        .map_or(&[], Vec::as_slice)
}

fn has_finite_sample(answer: &Value) -> bool {
    samples(answer).iter().any(|sample| {
        sample["value"][1]
            .as_str()
            .and_then(|v| v.parse::<f64>().ok())
            .is_some_and(f64::is_finite)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_and_alert_query_returns_data_from_a_real_prometheus() {
    let broker = Mosquitto::start();
    let weir = start_weir(&broker, "dashboards").await;
    let prometheus = Prometheus::start(weir.http_addr, &[Path::new(ALERTS)]).await;

    let queries = dashboard_queries();
    let dir = common::temp_dir("dashboard-rules");
    promtool_check_rules(&write_dashboard_rules(&dir, &queries));
    promtool_check_rules(Path::new(ALERTS));

    // Load: the demo's simulated fleet, plus readings that exercise the error panels.
    let (stop_simulator, stopped) = tokio::sync::oneshot::channel::<()>();
    let simulator = tokio::spawn(weir::demo::simulator::run(
        weir::demo::simulator::SimulatorOptions {
            broker_url: broker.url(),
            devices: 20,
            rate: 200.0,
            duration: None,
            sites: 2,
            client_id: unique("simulator"),
            qos: rumqttc::QoS::AtMostOnce,
        },
        async {
            let _ = stopped.await;
        },
    ));
    let mut faults = Publisher::start(&broker).await;
    let topic = common::telemetry_topic("s1", "faulty");
    faults.publish(&topic, "not json").await;
    faults.publish(&topic, "[1, 2]").await;
    faults
        .publish(
            &topic,
            json!({"ts": T0 + 10_000, "temperature": 20.0}).to_string(),
        )
        .await;
    // The window [T0, T0 + 10 s) has fired: this reading is late.
    faults
        .publish(&topic, json!({"ts": T0, "temperature": 20.0}).to_string())
        .await;

    // Wait until every query that must return data does (a few scrapes under load).
    let must_have_data = |expr: &str| !MAY_BE_EMPTY.iter().any(|m| expr.contains(m));
    let prometheus = &prometheus;
    let queries = &queries;
    let ready = eventually(Duration::from_secs(60), || async move {
        for (title, _, expr) in queries {
            let answer = prometheus.query(expr).await;
            let core = CORE_PANELS.contains(&title.as_str());
            if (must_have_data(expr) && samples(&answer).is_empty())
                || (core && !has_finite_sample(&answer))
            {
                return false;
            }
        }
        true
    })
    .await;

    let mut report = Vec::new();
    let mut failures = Vec::new();
    for (title, written, expr) in queries {
        let answer = prometheus.query(expr).await;
        let n = samples(&answer).len();
        report.push(format!("{n:>3} series  {title}: {written}"));
        if answer["status"] != "success" {
            failures.push(format!("{title}: {expr}: {answer}"));
        } else if must_have_data(expr) && n == 0 {
            failures.push(format!("{title}: no data for {expr}"));
        } else if CORE_PANELS.contains(&title.as_str()) && !has_finite_sample(&answer) {
            failures.push(format!("{title}: no finite value for {expr}: {answer}"));
        }
    }
    println!("dashboard queries:\n{}", report.join("\n"));
    assert!(
        ready && failures.is_empty(),
        "dashboard queries failed:\n{}\nprometheus log:\n{}",
        failures.join("\n"),
        prometheus.log()
    );

    // Every alerting rule was loaded and evaluates without error; each expr also runs as a query.
    let evaluated = eventually(DEADLINE, || async move {
        let rules = prometheus.get("/api/v1/rules?type=alert").await;
        let rules: Vec<&Value> = rules["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|group| group["rules"].as_array().into_iter().flatten())
            .collect();
        rules.len() >= 10 && rules.iter().all(|rule| rule["health"] == "ok")
    })
    .await;
    let rules = prometheus.get("/api/v1/rules?type=alert").await;
    assert!(evaluated, "alerting rules not all healthy: {rules:#}");
    for rule in rules["data"]["groups"][0]["rules"]
        .as_array()
        .expect("rules")
    {
        let expr = rule["query"].as_str().expect("a rule has a query");
        let answer = prometheus.query(expr).await;
        assert_eq!(answer["status"], "success", "{expr}: {answer}");
        // A healthy weir under load must not page anyone.
        if rule["labels"]["severity"] == "critical" {
            assert_eq!(rule["state"], "inactive", "{rule:#}");
        }
    }

    let (_, body) = http_get(weir.http_addr, "/metrics").await;
    promtool_check(&body);
    let _ = stop_simulator.send(());
    simulator
        .await
        .expect("simulator task")
        .expect("simulator ran");
    weir.stop().await.expect("weir stops cleanly");
}
