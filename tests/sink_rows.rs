//! The PostgreSQL sink (issue 16) against the machine's PostgreSQL, in a database of the test's
//! own: rows with their columns, each event once (also across a restart that redelivers), an
//! outage through a TCP proxy the test cuts, a row the database rejects, `weir sinks init`, a
//! missing table at start, and the Grafana dashboard's queries run against the rows.

mod common;

use common::proxy::Proxy;
use common::services::Database;
use common::{config_from_text, start_weir_with, wait_until, Mosquitto, Subscriber};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

const SETTLE: Duration = Duration::from_secs(30);
const DASHBOARD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/dashboards/weir-postgres.json");

/// The example with both rules' events going to the broker and to the database sink `rows`.
fn rows_config(url: &str, extra: &str) -> String {
    let example = std::fs::read_to_string(common::EXAMPLE_CONFIG).expect("read example");
    let overheat = "[rules.overheat.output]\ntopic = \"alerts/{site}/{device}/overheat\"";
    let climate = "[rules.climate.output]\ntopic = \"rollups/{site}/{device}/climate\"";
    assert!(example.contains(overheat) && example.contains(climate));
    example
        .replace(
            overheat,
            "[[rules.overheat.output]]\nsink = \"rows\"\n\n[[rules.overheat.output]]\ntopic = \"alerts/{site}/{device}/overheat\"",
        )
        .replace(
            climate,
            "[[rules.climate.output]]\nsink = \"rows\"\ntable = \"climate_rollups\"\n\n[[rules.climate.output]]\ntopic = \"rollups/{site}/{device}/climate\"",
        )
        + &format!(
            "\n[sinks.rows]\nkind = \"postgres\"\nurl = \"{url}\"\nretry_initial = \"50ms\"\nretry_max = \"500ms\"\ntimeout = \"2s\"\n{extra}"
        )
}

/// Readings of `devices` devices crossing the overheat thresholds, one a second, `steps` each:
/// windows of 10 s close as the event time passes them.
fn readings(devices: usize, steps: usize, first_step: usize) -> Vec<(String, Vec<u8>)> {
    const TEMPERATURES: [f64; 6] = [25.0, 31.0, 29.0, 27.0, 33.0, 24.0];
    let mut out = Vec::new();
    for step in first_step..first_step + steps {
        for device in 0..devices {
            let payload = serde_json::json!({
                "ts": common::T0 + step as i64 * 1000,
                "seq": step,
                "temperature": TEMPERATURES[(step + device) % TEMPERATURES.len()],
                "humidity": 40.0,
            });
            out.push((
                common::telemetry_topic("plant-1", &format!("dev-{device}")),
                payload.to_string().into_bytes(),
            ));
        }
    }
    out
}

/// How many overheat transitions (hysteresis 30.0 / 28.0 from normal) `readings` make.
fn transitions(readings: &[(String, Vec<u8>)]) -> usize {
    let mut hot = std::collections::HashMap::new();
    let mut count = 0;
    for (topic, payload) in readings {
        let value: serde_json::Value = serde_json::from_slice(payload).unwrap();
        let t = value["temperature"].as_f64().unwrap();
        let state = hot.entry(topic.clone()).or_insert(false);
        if (!*state && t > 30.0) || (*state && t < 28.0) {
            *state = !*state;
            count += 1;
        }
    }
    count
}

fn postgres() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 5432))
}

async fn init(text: &str, broker: &Mosquitto) -> Vec<String> {
    let config = config_from_text(broker, text, "rows-init");
    let plan = weir::engine::Plan::build(&config).expect("plan");
    weir::sink::connect::init_all(&config, &plan)
        .await
        .unwrap_or_else(|err| panic!("{err:#}"))
}

async fn start(
    broker: &Mosquitto,
    text: &str,
    state: &std::path::Path,
    client_id: &str,
) -> weir::app::Running {
    let mut config = config_from_text(broker, text, "rows");
    config.delivery.state_dir = Some(state.to_owned());
    config.broker.client_id = client_id.to_owned();
    start_weir_with(config).await
}

/// Ids of the events the broker got on `filter` (the broker copy of every event).
async fn broker_ids(subscriber: &mut Subscriber, n: usize) -> BTreeSet<String> {
    subscriber
        .take(n)
        .await
        .iter()
        .map(|m| m.json()["id"].as_str().unwrap_or_default().to_owned())
        .collect()
}

fn ids(db: &Database, table: &str) -> Vec<String> {
    db.query(&format!("SELECT id FROM {table} ORDER BY id"))
        .lines()
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_is_a_row_once_with_its_columns_and_init_reports_what_it_did() {
    let broker = Mosquitto::start();
    let db = Database::create("rows");
    let text = rows_config(&db.url(5432), "");
    let created = init(&text, &broker).await;
    assert_eq!(
        created,
        [
            "sink rows: created table climate_rollups",
            "sink rows: created table overheat"
        ]
    );
    let again = init(&text, &broker).await;
    assert_eq!(
        again,
        [
            "sink rows: found table climate_rollups",
            "sink rows: found table overheat"
        ]
    );

    let weir = start(
        &broker,
        &text,
        &broker.scratch("state"),
        &common::unique("weir-rows"),
    )
    .await;
    let mut alerts = Subscriber::start(&broker, "alerts/#").await;
    let mut rollups = Subscriber::start(&broker, "rollups/#").await;
    // 3 devices, 12 s: the first 10 s window of each device closes.
    let sent = readings(3, 12, 0);
    common::publish_all(&broker, &sent).await;
    let expected = broker_ids(&mut alerts, transitions(&sent)).await;
    let windows = broker_ids(&mut rollups, 3).await;
    assert!(
        wait_until(SETTLE, || ids(&db, "overheat").len() == expected.len()
            && ids(&db, "climate_rollups").len() == 3)
        .await,
        "rows: {} of {} alerts, {} of 3 windows",
        ids(&db, "overheat").len(),
        expected.len(),
        ids(&db, "climate_rollups").len()
    );
    assert_eq!(
        ids(&db, "overheat").into_iter().collect::<BTreeSet<_>>(),
        expected
    );
    assert_eq!(
        ids(&db, "climate_rollups")
            .into_iter()
            .collect::<BTreeSet<_>>(),
        windows
    );

    let alert = db.query(
        "SELECT kind, device, labels->>'site', metric, from_state, to_state, value IS NOT NULL, topic, cause->>'topic' FROM overheat ORDER BY ts, device LIMIT 1",
    );
    assert_eq!(
        alert.trim(),
        "state_change|dev-1|plant-1|temperature|normal|hot|t|overheat|sensors/plant-1/dev-1/telemetry"
    );
    let window = db.query(
        "SELECT kind, window_end - window_start, (aggregates->'temperature'->>'count')::int, event->>'rule' FROM climate_rollups WHERE device = 'dev-0'",
    );
    assert_eq!(window.trim(), "window|00:00:10|10|climate");
    weir.stop().await.expect("weir stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_and_a_restart_that_redelivers_leave_each_event_once() {
    let broker = Mosquitto::start_persistent_on(common::free_port());
    let db = Database::create("rows_outage");
    let proxy = Proxy::start(postgres());
    let text = rows_config(&db.url(proxy.port()), "batch = 5\n");
    init(&text, &broker).await;
    let state = broker.scratch("state");
    let client_id = common::unique("weir-rows");
    let weir = start(&broker, &text, &state, &client_id).await;
    let mut alerts = Subscriber::start(&broker, "alerts/#").await;
    let first = readings(2, 6, 0);
    common::publish_all(&broker, &first).await;
    let mut expected = broker_ids(&mut alerts, transitions(&first)).await;
    let stored = expected.len();
    assert!(wait_until(SETTLE, || ids(&db, "overheat").len() == stored).await);

    // The database goes away mid-stream: events wait in the outbox, retried.
    proxy.cut();
    let all = readings(2, 12, 0);
    common::publish_all(&broker, &all[first.len()..]).await;
    expected.extend(broker_ids(&mut alerts, transitions(&all) - stored).await);
    let metrics = weir.metrics.clone();
    assert!(
        wait_until(SETTLE, || metrics
            .sink_retries
            .with_label_values(&["rows"])
            .get()
            >= 2
            && metrics.sink_up.with_label_values(&["rows"]).get() == 0)
        .await,
        "retries counted and the sink down"
    );
    // weir stops while the database is away; the snapshot keeps what was not confirmed.
    weir.stop().await.expect("weir stops");
    assert_eq!(ids(&db, "overheat").len(), stored);

    proxy.restore();
    let weir = start(&broker, &text, &state, &client_id).await;
    assert!(
        wait_until(SETTLE, || ids(&db, "overheat")
            .into_iter()
            .collect::<BTreeSet<_>>()
            == expected)
        .await,
        "every event is a row after the restart: {} of {}",
        ids(&db, "overheat").len(),
        expected.len()
    );
    let counts = db.query("SELECT count(*), count(DISTINCT id) FROM overheat");
    assert_eq!(
        counts.trim(),
        format!("{0}|{0}", expected.len()),
        "each event once"
    );
    weir.stop().await.expect("weir stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_the_database_rejects_is_dead_lettered_and_the_rest_of_its_batch_inserted() {
    let broker = Mosquitto::start();
    let db = Database::create("rows_reject");
    let text = rows_config(&db.url(5432), "batch = 50\n");
    init(&text, &broker).await;
    db.query("ALTER TABLE overheat ADD CONSTRAINT no_dev_1 CHECK (device <> 'dev-1')");
    let weir = start(
        &broker,
        &text,
        &broker.scratch("state"),
        &common::unique("weir-rows"),
    )
    .await;
    let mut dead = Subscriber::start(&broker, "weir/dead-letter/rows/#").await;
    let mut alerts = Subscriber::start(&broker, "alerts/#").await;
    let sent = readings(3, 6, 0);
    common::publish_all(&broker, &sent).await;
    let all = broker_ids(&mut alerts, transitions(&sent)).await;
    let of_dev_1 = transitions(
        &sent
            .iter()
            .filter(|(t, _)| t.contains("/dev-1/"))
            .cloned()
            .collect::<Vec<_>>(),
    );
    let letters = dead.take(of_dev_1).await;
    let refused: BTreeSet<String> = letters
        .iter()
        .map(|m| {
            let letter = m.json();
            assert_eq!(m.topic, "weir/dead-letter/rows/rejected");
            assert_eq!(letter["event"]["device"], "dev-1");
            assert!(
                letter["message"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("SQLSTATE 23514"),
                "{letter}"
            );
            letter["id"].as_str().unwrap_or_default().to_owned()
        })
        .collect();
    assert!(
        wait_until(SETTLE, || ids(&db, "overheat").len()
            == all.len() - of_dev_1)
        .await
    );
    let stored: BTreeSet<String> = ids(&db, "overheat").into_iter().collect();
    assert_eq!(
        stored.union(&refused).cloned().collect::<BTreeSet<_>>(),
        all,
        "every event is a row or a dead letter"
    );
    assert_eq!(
        weir.metrics
            .sink_dead_letters
            .with_label_values(&["rows", "rejected"])
            .get(),
        of_dev_1 as u64
    );
    weir.stop().await.expect("weir stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_table_or_database_stops_weir_at_start_with_what_to_do() {
    let broker = Mosquitto::start();
    let db = Database::create("rows_missing");
    let text = rows_config(&db.url(5432), "");
    let err = match weir::app::start(config_from_text(&broker, &text, "rows-missing")).await {
        Ok(_) => panic!("weir started without its tables"),
        Err(err) => format!("{err:#}"),
    };
    assert!(
        err.contains("sink `rows` (postgres at postgres://***@127.0.0.1:5432/"),
        "{err}"
    );
    assert!(
        err.contains("table climate_rollups does not exist"),
        "{err}"
    );
    assert!(err.contains("weir sinks init"), "{err}");
    assert!(err.contains("CREATE TABLE IF NOT EXISTS overheat"), "{err}");

    let closed = rows_config(
        &format!("postgres://postgres@127.0.0.1:{}/x", common::free_port()),
        "",
    );
    let err = match weir::app::start(config_from_text(&broker, &closed, "rows-closed")).await {
        Ok(_) => panic!("weir started without its database"),
        Err(err) => format!("{err:#}"),
    };
    assert!(
        err.contains("sink `rows`") && err.contains("cannot connect"),
        "{err}"
    );
}

/// Every panel's SQL in `dashboards/weir-postgres.json`, with Grafana's macros expanded as
/// its PostgreSQL data source expands them, runs against rows weir wrote and returns rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboards_queries_return_rows_from_what_weir_wrote() {
    let broker = Mosquitto::start();
    let db = Database::create("rows_dashboard");
    let text = rows_config(&db.url(5432), "");
    init(&text, &broker).await;
    let weir = start(
        &broker,
        &text,
        &broker.scratch("state"),
        &common::unique("weir-rows"),
    )
    .await;
    // Event times near now, so the dashboard's time range holds them.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let mut recent = Vec::new();
    for step in 0..24i64 {
        for device in 0..3 {
            let temperature = [25.0, 31.0, 29.0, 27.0, 33.0, 24.0][(step as usize + device) % 6];
            let payload = serde_json::json!({
                "ts": now - 60_000 + step * 1000,
                "seq": step,
                "temperature": temperature,
                "humidity": 40.0,
            });
            recent.push((
                common::telemetry_topic("plant-1", &format!("dev-{device}")),
                payload.to_string().into_bytes(),
            ));
        }
    }
    common::publish_all(&broker, &recent).await;
    assert!(
        wait_until(SETTLE, || !ids(&db, "climate_rollups").is_empty()
            && ids(&db, "overheat").len() >= 10)
        .await,
        "rows arrived"
    );

    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(DASHBOARD).expect("read the dashboard"))
            .expect("JSON");
    let mut checked = 0;
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let Some(sql) = target["rawSql"].as_str() else {
                continue;
            };
            let expanded = expand_macros(sql);
            let answer = db.query(&expanded);
            assert!(
                !answer.trim().is_empty(),
                "panel {:?} returned no rows:\n{expanded}",
                panel["title"]
            );
            checked += 1;
        }
    }
    assert!(checked >= 4, "{checked} queries checked");
    weir.stop().await.expect("weir stops");
}

/// Grafana's PostgreSQL macros and the dashboard's variables, over the last hour.
fn expand_macros(sql: &str) -> String {
    let mut out = sql
        .replace("$table_alerts", "overheat")
        .replace("$table_rollups", "climate_rollups")
        .replace("${table_alerts}", "overheat")
        .replace("${table_rollups}", "climate_rollups")
        .replace("$__interval", "'10s'");
    // $__timeFilter(col) and $__timeGroupAlias(col, interval)
    while let Some(at) = out.find("$__timeFilter(") {
        let end = at + out[at..].find(')').expect("closing paren");
        let column = &out[at + "$__timeFilter(".len()..end];
        let expanded =
            format!("{column} BETWEEN now() - interval '1 hour' AND now() + interval '1 minute'");
        out.replace_range(at..=end, &expanded);
    }
    while let Some(at) = out.find("$__timeGroupAlias(") {
        let end = at + out[at..].find(')').expect("closing paren");
        let args = &out[at + "$__timeGroupAlias(".len()..end];
        let (column, interval) = args.split_once(',').expect("two arguments");
        let interval = interval.trim().trim_matches('\'');
        let seconds = humantime::parse_duration(interval)
            .map(|d| d.as_secs().max(1))
            .unwrap_or(10);
        let expanded = format!(
            "to_timestamp(floor(extract(epoch from {column})/{seconds})*{seconds}) AS \"time\""
        );
        out.replace_range(at..=end, &expanded);
    }
    assert!(
        !out.contains('$'),
        "an unknown macro or variable is left in:\n{out}"
    );
    out
}
