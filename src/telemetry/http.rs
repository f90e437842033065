//! The HTTP endpoint: `/metrics` (Prometheus text format), `/healthz` (the process is alive),
//! `/readyz` (connected to the broker and subscribed), `/api/rules` (each rule with its counters
//! and state sizes, JSON), `/api/events` (the live tap of derived events, Server-Sent Events) and
//! `/api/reload` (POST: load the config file again; GET: what the last reload did).

use crate::metrics::tap::{TapItem, TapSubscription};
use crate::metrics::Metrics;
use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::{Deserialize, Serialize};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

/// The rules `/api/rules` lists; replaced by a reload.
pub type SharedRules = Arc<RwLock<Vec<RuleInfo>>>;

/// Where reload requests go (the app's reloader); each gets its report back.
pub type ReloadRequests = mpsc::Sender<oneshot::Sender<ReloadReport>>;

/// What a reload did: `POST /api/reload` answers with it, `GET /api/reload` shows the last one.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReloadReport {
    pub ok: bool,
    /// When it finished, ms since the epoch.
    pub at_ms: i64,
    /// Why the new config was refused (the running rules were left as they were).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Rules whose definition did not change: they kept their state.
    pub kept: Vec<String>,
    /// New or changed rules: they started with no state.
    pub started: Vec<String>,
    /// Rules no longer in the config: their open windows were flushed.
    pub removed: Vec<String>,
}

/// What `/api/*` serves besides the metrics.
pub struct ApiSetup {
    pub rules: SharedRules,
    /// Bearer token `/api/*` requires, if set.
    pub token: Option<crate::config::Secret>,
    /// `None` when weir runs without a config file (the demo's built-in example).
    pub reloads: Option<ReloadRequests>,
    pub last_reload: Arc<Mutex<Option<ReloadReport>>>,
    /// `[cluster]`: what `/api/cluster` shows (members and who owns which partition), kept up
    /// to date by the cluster supervisor.
    pub cluster: Option<SharedCluster>,
}

/// The cluster view `/api/cluster` serves.
pub type SharedCluster = Arc<RwLock<serde_json::Value>>;

/// What `/api/rules` says about a rule besides its live numbers; fixed until a reload.
#[derive(Debug, Clone, Serialize)]
pub struct RuleInfo {
    pub name: String,
    /// The operator: `hysteresis`, `tumbling`, ...
    pub operator: &'static str,
    /// The `kind` of the events it emits.
    pub emits: &'static str,
    pub input: String,
    pub output_topic: String,
}

struct Api {
    metrics: Arc<Metrics>,
    rules: SharedRules,
    /// Bearer token `/api/*` requires, if set.
    token: Option<crate::config::Secret>,
    reloads: Option<ReloadRequests>,
    last_reload: Arc<Mutex<Option<ReloadReport>>>,
    cluster: Option<SharedCluster>,
}

impl Api {
    /// `Err(401)` unless the request carries the API token (when one is set).
    #[allow(clippy::result_large_err)]
    fn authorize(&self, headers: &axum::http::HeaderMap) -> Result<(), Response> {
        let Some(token) = &self.token else {
            return Ok(());
        };
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .unwrap_or("");
        // Compare without an early exit, so the time taken says nothing about the token.
        let expected = token.expose().as_bytes();
        let matches = presented.len() == expected.len()
            && presented
                .bytes()
                .zip(expected)
                .fold(0u8, |diff, (a, b)| diff | (a ^ b))
                == 0;
        if matches {
            Ok(())
        } else {
            Err(json_response(
                StatusCode::UNAUTHORIZED,
                r#"{"error":"this endpoint needs the API token: send Authorization: Bearer TOKEN"}"#,
            ))
        }
    }
}

/// Binds `addr` (port 0 picks a free one) and returns the bound address and the server future.
///
/// # Errors
/// The address cannot be bound (in use, or not a local address).
pub async fn bind(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    api: ApiSetup,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<(SocketAddr, impl Future<Output = std::io::Result<()>>)> {
    let listener = TcpListener::bind(addr).await.map_err(|err| {
        anyhow::anyhow!("cannot listen for /metrics on {addr}: {err}; pick another address with --metrics-addr or http.listen")
    })?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/api/rules", get(list_rules))
        .route("/api/events", get(events))
        .route("/api/reload", get(last_reload).post(reload))
        .route("/api/cluster", get(cluster))
        .with_state(Arc::new(Api {
            metrics,
            rules: api.rules,
            token: api.token,
            reloads: api.reloads,
            last_reload: api.last_reload,
            cluster: api.cluster,
        }));
    let server = axum::serve(listener, app).with_graceful_shutdown(shutdown);
    Ok((bound, async move { server.await }))
}

async fn render_metrics(State(api): State<Arc<Api>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        api.metrics.render(),
    )
}

async fn ready(State(api): State<Arc<Api>>) -> impl IntoResponse {
    match api.metrics.not_ready_reason() {
        None => (StatusCode::OK, "ready\n".to_owned()),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        ),
    }
}

/// One rule in `/api/rules`.
#[derive(Serialize)]
struct RuleReport<'a> {
    #[serde(flatten)]
    info: &'a RuleInfo,
    counters: RuleCounters,
    state: RuleStateReport,
}

#[derive(Serialize)]
struct RuleCounters {
    emitted: u64,
    publish_attempts: u64,
    published: u64,
    publish_errors: u64,
    /// Readings window rules did not apply, over every reason (late, future, window_limit).
    late: u64,
    out_of_order: u64,
}

#[derive(Serialize)]
struct RuleStateReport {
    devices: u64,
    open_windows: u64,
    /// Exact recent quantiles of event time to publish, seconds (null before any event).
    event_latency_p50_seconds: Option<f64>,
    event_latency_p99_seconds: Option<f64>,
}

/// `GET /api/cluster`: the members, the partition assignment and what this instance holds.
async fn cluster(State(api): State<Arc<Api>>, headers: axum::http::HeaderMap) -> Response {
    if let Err(denied) = api.authorize(&headers) {
        return denied;
    }
    match &api.cluster {
        Some(view) => {
            let view = view.read().unwrap_or_else(PoisonError::into_inner).clone();
            (
                [(header::CONTENT_TYPE, "application/json")],
                serde_json::to_string_pretty(&view).unwrap_or_default() + "\n",
            )
                .into_response()
        }
        None => (
            StatusCode::NOT_FOUND,
            "this weir has no [cluster] section: it reads MQTT on its own\n",
        )
            .into_response(),
    }
}

async fn list_rules(State(api): State<Arc<Api>>, headers: axum::http::HeaderMap) -> Response {
    if let Err(denied) = api.authorize(&headers) {
        return denied;
    }
    let m = &api.metrics;
    let rules = api.rules.read().unwrap_or_else(PoisonError::into_inner);
    let reports: Vec<RuleReport<'_>> = rules
        .iter()
        .enumerate()
        .map(|(index, info)| {
            let name = info.name.as_str();
            let state = m.rule_state(index);
            RuleReport {
                info,
                counters: RuleCounters {
                    emitted: m
                        .events_emitted
                        .with_label_values(&[name, info.emits])
                        .get(),
                    publish_attempts: m.publish_attempts.with_label_values(&[name]).get(),
                    published: m.events_published.with_label_values(&[name]).get(),
                    publish_errors: m.publish_errors.with_label_values(&[name]).get(),
                    late: crate::operators::window::LateReason::ALL
                        .iter()
                        .map(|reason| {
                            m.readings_late
                                .with_label_values(&[name, reason.label()])
                                .get()
                        })
                        .sum(),
                    out_of_order: m.readings_out_of_order.with_label_values(&[name]).get(),
                },
                state: RuleStateReport {
                    devices: state.devices,
                    open_windows: state.open_windows,
                    event_latency_p50_seconds: m.event_latency.recent_quantile(name, 0.5),
                    event_latency_p99_seconds: m.event_latency.recent_quantile(name, 0.99),
                },
            }
        })
        .collect();
    json_response(
        StatusCode::OK,
        &serde_json::json!({ "rules": reports }).to_string(),
    )
}

/// `POST /api/reload`: reads the config file again and applies its rules (see
/// [`crate::app`]); 200 with the report when applied, 422 with the reason when refused.
async fn reload(State(api): State<Arc<Api>>, headers: axum::http::HeaderMap) -> Response {
    if let Err(denied) = api.authorize(&headers) {
        return denied;
    }
    let Some(requests) = &api.reloads else {
        return json_response(
            StatusCode::CONFLICT,
            r#"{"ok":false,"error":"weir runs the built-in example without a config file; there is nothing to reload"}"#,
        );
    };
    let (reply, report) = oneshot::channel();
    let report = match requests.send(reply).await {
        Ok(()) => report.await.ok(),
        Err(_) => None,
    };
    match report {
        Some(report) => {
            let status = if report.ok {
                StatusCode::OK
            } else {
                StatusCode::UNPROCESSABLE_ENTITY
            };
            json_response(status, &serde_json::to_string(&report).unwrap_or_default())
        }
        None => json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            r#"{"ok":false,"error":"weir is shutting down"}"#,
        ),
    }
}

/// `GET /api/reload`: the last reload's report, `null` before the first.
async fn last_reload(State(api): State<Arc<Api>>, headers: axum::http::HeaderMap) -> Response {
    if let Err(denied) = api.authorize(&headers) {
        return denied;
    }
    let last = api
        .last_reload
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    json_response(
        StatusCode::OK,
        &serde_json::to_string(&last).unwrap_or_default(),
    )
}

fn json_response(status: StatusCode, body: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        format!("{body}\n"),
    )
        .into_response()
}

/// `GET /api/events?rule=..&device=..`: both filters optional.
#[derive(Debug, Deserialize)]
struct TapFilter {
    rule: Option<String>,
    device: Option<String>,
}

/// Streams derived events as Server-Sent Events: `id` is the event id, `data` the event's
/// schema v1 JSON. A client that falls behind gets an `event: skipped` with the number missed.
async fn events(
    State(api): State<Arc<Api>>,
    headers: axum::http::HeaderMap,
    Query(filter): Query<TapFilter>,
) -> Response {
    if let Err(denied) = api.authorize(&headers) {
        return denied;
    }
    if let Some(rule) = &filter.rule {
        let rules = api.rules.read().unwrap_or_else(PoisonError::into_inner);
        if !rules.iter().any(|r| &r.name == rule) {
            let known: Vec<&str> = rules.iter().map(|r| r.name.as_str()).collect();
            let body = serde_json::json!({
                "error": format!("no rule named {rule:?}; the rules are {known:?}"),
            });
            return json_response(StatusCode::NOT_FOUND, &body.to_string());
        }
    }
    let subscription = api.metrics.tap.subscribe();
    let stream = futures_util::stream::unfold(
        (subscription, filter),
        |(mut subscription, filter): (TapSubscription, TapFilter)| async move {
            loop {
                let item = match subscription.next().await? {
                    TapItem::Event(event) => {
                        let wanted = filter.rule.as_deref().is_none_or(|r| r == &*event.rule)
                            && filter.device.as_deref().is_none_or(|d| d == &*event.device);
                        if !wanted {
                            continue;
                        }
                        Event::default().id(&event.id).data(&event.json)
                    }
                    TapItem::Skipped(n) => Event::default().event("skipped").data(n.to_string()),
                };
                return Some((Ok::<_, Infallible>(item), (subscription, filter)));
            }
        },
    );
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}
