//! The README's derived event schema against the code: its table names each field once, its
//! `kind` row lists exactly the kinds weir emits (`weir::model::event::KINDS`), and real rules publish
//! every one of those kinds through a real Mosquitto with the fields the table promises.

mod common;

use common::{config_from_text, start_weir_with, Message, Mosquitto, Publisher, Subscriber};
use common::{DEADLINE, T0};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};

const README: &str = include_str!("../README.md");
const SECTION: &str = "## Derived event schema, v1";

/// The schema section of the README, up to the next `## ` heading.
fn schema_section() -> &'static str {
    let start = README
        .find(SECTION)
        .unwrap_or_else(|| panic!("README.md has no {SECTION:?} section"));
    let body = &README[start + SECTION.len()..];
    let end = body.find("\n## ").unwrap_or(body.len());
    &body[..end]
}

/// The words in backticks in `text`.
fn backticked(text: &str) -> Vec<&str> {
    text.split('`').skip(1).step_by(2).collect()
}

/// The rows of the section's field table as (field, meaning). Fails unless the section has
/// exactly one table: rows after a blank line would be a second table that readers take for
/// a continuation.
fn field_rows() -> Vec<(&'static str, &'static str)> {
    let lines: Vec<&str> = schema_section().lines().collect();
    let tables = lines
        .iter()
        .zip(std::iter::once(&"").chain(lines.iter()))
        .filter(|(line, before)| line.starts_with('|') && !before.starts_with('|'))
        .count();
    assert_eq!(
        tables, 1,
        "the schema section has {tables} tables; its fields belong in one"
    );
    lines
        .iter()
        .filter_map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let field = cells.get(1)?.strip_prefix('`')?.strip_suffix('`')?;
            Some((field, *cells.get(2)?))
        })
        .collect()
}

/// The kinds the README's `kind` row lists.
fn readme_kinds() -> BTreeSet<&'static str> {
    let rows: Vec<&str> = field_rows()
        .into_iter()
        .filter(|(field, _)| *field == "kind")
        .map(|(_, meaning)| meaning)
        .collect();
    assert_eq!(rows.len(), 1, "the table has {} `kind` rows", rows.len());
    backticked(rows[0]).into_iter().collect()
}

#[test]
fn the_schema_table_names_each_field_once() {
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for (field, _) in field_rows() {
        *seen.entry(field).or_default() += 1;
    }
    let twice: Vec<&str> = seen
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(field, _)| *field)
        .collect();
    assert!(twice.is_empty(), "the table lists {twice:?} more than once");
}

#[test]
fn the_kind_row_lists_exactly_the_kinds_weir_emits() {
    let listed = readme_kinds();
    let emitted: BTreeSet<&str> = weir::model::event::KINDS.iter().copied().collect();
    let unknown: Vec<_> = listed.difference(&emitted).collect();
    let missing: Vec<_> = emitted.difference(&listed).collect();
    assert!(
        unknown.is_empty() && missing.is_empty(),
        "the README's kind row lists {unknown:?}, which weir never emits, and lacks {missing:?}"
    );
}

/// One rule per kind, all publishing under `out/`.
const CONFIG: &str = r#"
[broker]
url = "mqtt://127.0.0.1:1883"

[inputs.telemetry]
topic = "sensors/{site}/{device}/telemetry"
qos = 1
seq_field = "seq"

[inputs.telemetry.time]
field = "ts"
unit = "ms"

[inputs.status]
topic = "status/{site}/{device}"
format = "text"
qos = 1

[rules.overheat]
input = "telemetry"

[rules.overheat.hysteresis]
metric = "temperature"
enter_above = 30.0
exit_below = 28.0
active = "hot"
inactive = "normal"
flapping = { max_changes = 3, within = "1m" }

[rules.overheat.output]
topic = "out/{device}/{rule}"

[rules.climate]
input = "telemetry"

[rules.climate.tumbling]
size = "10s"
metrics = ["temperature"]
aggregates = ["count"]
late_topic = "out/{device}/{rule}/late"

[rules.climate.output]
topic = "out/{device}/{rule}"

[rules.report]
input = "telemetry"

[rules.report.deadband]
metrics = ["temperature"]
absolute = 0.5

[rules.report.output]
topic = "out/{device}/{rule}"

[rules.door]
input = "telemetry"

[rules.door.change]
fields = ["door"]

[rules.door.output]
topic = "out/{device}/{rule}"

[rules.surge]
input = "telemetry"

[rules.surge.rate_of_change]
metrics = ["temperature"]
window = "5s"
max_per_second = 1.0

[rules.surge.output]
topic = "out/{device}/{rule}"

[rules.frozen]
input = "telemetry"

[rules.frozen.stuck]
metrics = ["humidity"]
for = "3s"
tolerance = 0.01

[rules.frozen.output]
topic = "out/{device}/{rule}"

[rules.odd]
input = "telemetry"

[rules.odd.anomaly]
metrics = ["pressure"]
readings = 5
z_threshold = 3.0

[rules.odd.output]
topic = "out/{device}/{rule}"

[rules.last_will]
input = "status"

[rules.last_will.liveness]
status = { field = "payload", offline = ["offline"] }

[rules.last_will.output]
topic = "out/{device}/{rule}"
"#;

/// The kinds among `messages`.
fn kinds(messages: &[Message]) -> BTreeSet<String> {
    messages
        .iter()
        .filter_map(|m| m.json()["kind"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_in_the_table_reaches_mqtt_with_the_tables_fields() {
    let broker = Mosquitto::start();
    let weir = start_weir_with(config_from_text(&broker, CONFIG, "schema")).await;
    let mut events = Subscriber::start(&broker, "out/#").await;
    let mut device = Publisher::start(&broker).await;

    // One reading a second. Temperature flips between normal and hot (state changes, then
    // flapping; a surge every second), humidity never moves (stuck after 3 s), pressure is
    // steady until reading 12 (anomaly), the door opens at reading 5, the first reading is
    // reported, and reading 10 closes the first 10 s window.
    let topic = "sensors/s1/d1/telemetry";
    for i in 0..14_i64 {
        let reading = json!({
            "ts": T0 + 1000 * i,
            "seq": i + 1,
            "temperature": if i % 2 == 0 { 25.0 } else { 31.0 },
            "humidity": 40.0,
            "pressure": if i == 12 { 200.0 } else { 100.0 + (i % 2) as f64 },
            "door": if i < 5 { "closed" } else { "open" },
        });
        device.publish(topic, reading.to_string()).await;
    }
    // A straggler for the fired window: late.
    let straggler = json!({"ts": T0 + 1000, "seq": 100, "temperature": 25.0});
    device.publish(topic, straggler.to_string()).await;
    // A last will: liveness.
    device.publish("status/s1/d1", "offline").await;

    let wanted: BTreeSet<String> = readme_kinds().into_iter().map(str::to_owned).collect();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut messages = Vec::new();
    while !kinds(&messages).is_superset(&wanted) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match events.next(left).await {
            Some(message) => messages.push(message),
            None => panic!(
                "within {DEADLINE:?}, weir published the kinds {:?}, not {:?}, of the README's {wanted:?}",
                kinds(&messages),
                wanted.difference(&kinds(&messages)).collect::<Vec<_>>()
            ),
        }
    }

    // Every event carries the table's fields (`cause` only when a reading caused it), and no
    // field that every kind carries is missing from the table.
    let table: BTreeSet<&str> = field_rows().into_iter().map(|(field, _)| field).collect();
    let mut common_to_all: Option<BTreeSet<String>> = None;
    for message in &messages {
        let event: Value = message.json();
        let object = event.as_object().expect("an event is a JSON object");
        let fields: BTreeSet<String> = object.keys().cloned().collect();
        for field in table.iter().filter(|field| **field != "cause") {
            assert!(
                object.contains_key(*field),
                "{} lacks `{field}`: {event}",
                message.topic
            );
        }
        assert!(
            wanted.contains(event["kind"].as_str().unwrap_or_default()),
            "{event}"
        );
        common_to_all = Some(match common_to_all {
            None => fields,
            Some(common) => common.intersection(&fields).cloned().collect(),
        });
    }
    let untabled: Vec<String> = common_to_all
        .unwrap_or_default()
        .into_iter()
        .filter(|field| !table.contains(field.as_str()))
        .collect();
    assert!(
        untabled.is_empty(),
        "every kind carries {untabled:?}, which the table does not list"
    );
    weir.stop().await.expect("weir stops cleanly");
}
