//! `weir top`: a terminal view of a running weir that refreshes in place: throughput, latency
//! percentiles, errors, per-rule state and the latest derived events, all read from its HTTP API
//! (`/metrics`, `/api/rules`, and the `/api/events` live tap).

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// How `weir top` runs.
pub struct TopOptions {
    /// The weir's `http.listen` address.
    pub addr: SocketAddr,
    /// Bearer token for `/api/*` when the weir has one.
    pub token: Option<String>,
    pub interval: Duration,
    /// Print one frame (no screen clearing) and exit: for scripts and tests.
    pub once: bool,
}

/// How many of the latest events the view keeps.
const LATEST: usize = 10;

/// GETs `path` over HTTP/1.0 and returns the body of a 200 response.
async fn get(options: &TopOptions, path: &str) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect(options.addr).await.map_err(|err| {
        anyhow::anyhow!(
            "cannot reach weir at {}: {err}; is it running, and is that its http.listen address?",
            options.addr
        )
    })?;
    stream.write_all(request(options, path).as_bytes()).await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head.split_whitespace().nth(1).unwrap_or("");
    match status {
        "200" => Ok(body.to_owned()),
        "401" => anyhow::bail!("{path} needs the API token: pass --token or set WEIR_API_TOKEN"),
        other => anyhow::bail!("{path} answered {other}"),
    }
}

fn request(options: &TopOptions, path: &str) -> String {
    let auth = options
        .token
        .as_ref()
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    format!(
        "GET {path} HTTP/1.0\r\nHost: {}\r\n{auth}\r\n",
        options.addr
    )
}

/// Sums of the samples of each metric name (labels folded), plus a few labelled ones kept apart.
fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    let mut values = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let name = series.split('{').next().unwrap_or(series);
        let keep_labels = name.ends_with("_recent_seconds") || name == "weir_mqtt_connected";
        let key = if keep_labels { series } else { name };
        *values.entry(key.to_owned()).or_insert(0.0) += value;
    }
    values
}

/// Follows the live tap and keeps the latest events, one line each.
fn follow_events(options: &TopOptions, latest: Arc<Mutex<VecDeque<String>>>) {
    let addr = options.addr;
    let request = request(options, "/api/events");
    tokio::spawn(async move {
        loop {
            if let Ok(mut stream) = TcpStream::connect(addr).await {
                if stream.write_all(request.as_bytes()).await.is_ok() {
                    let mut lines = BufReader::new(stream).lines();
                    while let Ok(Some(line)) = lines.next_line().await {
                        let Some(data) = line.strip_prefix("data: ") else {
                            continue;
                        };
                        let Ok(event) = serde_json::from_str::<serde_json::Value>(data) else {
                            continue;
                        };
                        let mut latest = latest.lock().unwrap_or_else(|e| e.into_inner());
                        if latest.len() == LATEST {
                            latest.pop_front();
                        }
                        latest.push_back(summarize(&event));
                    }
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
}

/// One line for an event: rule, kind, device and its most telling fields.
fn summarize(event: &serde_json::Value) -> String {
    let text = |key: &str| {
        event
            .get(key)
            .map(|v| v.to_string().trim_matches('"').to_owned())
    };
    let mut line = format!(
        "{:<16} {:<14} {:<16}",
        text("rule").unwrap_or_default(),
        text("kind").unwrap_or_default(),
        text("device").unwrap_or_default()
    );
    for key in ["from", "to", "value", "start", "reason", "z"] {
        if let Some(value) = text(key) {
            line.push_str(&format!(" {key}={value}"));
        }
    }
    line
}

fn ms(seconds: Option<&f64>) -> String {
    match seconds {
        Some(s) if s.is_finite() => format!("{:.2} ms", s * 1e3),
        _ => "-".into(),
    }
}

/// Renders one frame from two scrapes `elapsed` apart.
fn frame(
    options: &TopOptions,
    now: &BTreeMap<String, f64>,
    before: Option<&BTreeMap<String, f64>>,
    elapsed: f64,
    rules: &serde_json::Value,
    latest: &VecDeque<String>,
) -> String {
    let total = |name: &str| now.get(name).copied().unwrap_or(0.0);
    let rate = |name: &str| match before {
        Some(before) if elapsed > 0.0 => {
            (total(name) - before.get(name).copied().unwrap_or(0.0)) / elapsed
        }
        _ => 0.0,
    };
    let connected = |connection: &str| {
        let up = now
            .get(&format!(
                "weir_mqtt_connected{{connection=\"{connection}\"}}"
            ))
            .is_some_and(|v| *v >= 1.0);
        if up {
            "up"
        } else {
            "DOWN"
        }
    };
    let quantile = |q: &str| {
        now.get(&format!(
            "weir_processing_latency_recent_seconds{{quantile=\"{q}\"}}"
        ))
    };
    let mut out = String::new();
    out.push_str(&format!(
        "weir at {}   broker: intake {}, publish {}\n\n",
        options.addr,
        connected("source"),
        connected("sink")
    ));
    out.push_str(&format!(
        "readings  {:>10.0}/s  (total {:.0})\nevents    {:>10.0}/s  (total {:.0})\n",
        rate("weir_readings_received_total"),
        total("weir_readings_received_total"),
        rate("weir_events_published_total"),
        total("weir_events_published_total"),
    ));
    out.push_str(&format!(
        "errors    decode {:.0}  dead letters {:.0}  late {:.0}  duplicates {:.0}  outbox {:.0}\n",
        total("weir_decode_errors_total"),
        total("weir_dead_letters_total"),
        total("weir_readings_late_total"),
        total("weir_duplicates_dropped_total"),
        total("weir_outbox_messages"),
    ));
    out.push_str(&format!(
        "latency   arrival to publish: p50 {}  p99 {}  p99.9 {}\n\n",
        ms(quantile("0.5")),
        ms(quantile("0.99")),
        ms(quantile("0.999"))
    ));
    out.push_str(&format!(
        "{:<16} {:<14} {:>10} {:>10} {:>9} {:>12}\n",
        "rule", "operator", "emitted", "devices", "windows", "p99 event"
    ));
    for rule in rules["rules"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "{:<16} {:<14} {:>10} {:>10} {:>9} {:>12}\n",
            rule["name"].as_str().unwrap_or(""),
            rule["operator"].as_str().unwrap_or(""),
            rule["counters"]["emitted"],
            rule["state"]["devices"],
            rule["state"]["open_windows"],
            ms(rule["state"]["event_latency_p99_seconds"].as_f64().as_ref()),
        ));
    }
    out.push_str("\nlatest events\n");
    for line in latest {
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Runs the view until `shutdown` (or after one frame with `once`).
///
/// # Errors
/// weir cannot be reached or refuses the token.
pub async fn run(
    options: TopOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let latest = Arc::new(Mutex::new(VecDeque::with_capacity(LATEST)));
    if !options.once {
        follow_events(&options, latest.clone());
    }
    tokio::pin!(shutdown);
    let mut before: Option<(Instant, BTreeMap<String, f64>)> = None;
    loop {
        let metrics = parse_metrics(&get(&options, "/metrics").await?);
        let rules: serde_json::Value =
            serde_json::from_str(&get(&options, "/api/rules").await?).unwrap_or_default();
        let now = Instant::now();
        let elapsed = before
            .as_ref()
            .map_or(0.0, |(at, _)| now.duration_since(*at).as_secs_f64());
        let view = {
            let latest = latest.lock().unwrap_or_else(|e| e.into_inner());
            frame(
                &options,
                &metrics,
                before.as_ref().map(|(_, m)| m),
                elapsed,
                &rules,
                &latest,
            )
        };
        if options.once {
            print!("{view}");
            return Ok(());
        }
        // Clear the screen and draw from the top left.
        print!("\x1b[2J\x1b[H{view}");
        before = Some((now, metrics));
        tokio::select! {
            () = &mut shutdown => return Ok(()),
            () = tokio::time::sleep(options.interval) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_summed_over_labels_except_the_ones_shown_apart() {
        let text = "# TYPE x counter\nweir_readings_received_total{input=\"a\"} 3\nweir_readings_received_total{input=\"b\"} 4\nweir_mqtt_connected{connection=\"source\"} 1\n";
        let values = parse_metrics(text);
        assert_eq!(values["weir_readings_received_total"], 7.0);
        assert_eq!(values["weir_mqtt_connected{connection=\"source\"}"], 1.0);
    }

    #[test]
    fn an_event_line_names_rule_kind_device_and_transition() {
        let event = serde_json::json!({"rule": "overheat", "kind": "state_change", "device": "d1", "from": "normal", "to": "hot", "value": 31.0});
        let line = summarize(&event);
        assert!(
            line.contains("overheat") && line.contains("from=normal") && line.contains("to=hot"),
            "{line}"
        );
    }
}
