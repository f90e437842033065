//! The webhook sink (`kind = "http"`): POSTs each event's schema v1 JSON (or, with `batch` above
//! 1, a JSON array of up to `batch` events) to one URL, with `Idempotency-Key` = the event id.
//!
//! One request is in flight at a time, so confirmations are in hand-over order. A 2xx confirms
//! the request's events. 408, 429 (after its `Retry-After`), 5xx, a timeout or a connection
//! error is retried, with backoff and jitter, until it succeeds. Any other 4xx refuses the
//! events for good: a batch is then sent again one event at a time, so only the events the
//! service refuses go to the dead-letter path, with the status and the start of the answer.

use super::queued::{Progress, QueuedSink};
use crate::config::{Secret, SinkConfig};
use crate::metrics::Metrics;
use crate::model::message::ContentType;
use crate::mqtt::Backoff;
use crate::route::Outgoing;
use anyhow::Context as _;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// The longest `Retry-After` honoured.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// How much of a refusing answer goes into the dead letter.
const DETAIL_BYTES: usize = 512;

/// Reads the token, builds the client and checks that the webhook's host accepts a
/// connection now (nothing is posted: the receiver would take it for an event).
///
/// # Errors
/// The URL, the token or the CA file cannot be used, or the host does not answer within
/// `timeout`.
pub async fn connect(
    name: &str,
    settings: &SinkConfig,
    metrics: Arc<Metrics>,
) -> anyhow::Result<QueuedSink> {
    let url = reqwest::Url::parse(&settings.url)
        .with_context(|| format!("`{}` is not a URL", settings.redacted_url()))?;
    let token = bearer_token(name, settings)?;
    let ca_key = format!("sinks.{name}.ca_file");
    let tls = crate::mqtt::client_tls(&ca_key, settings.ca_file.as_deref())?;
    let mut headers = reqwest::header::HeaderMap::new();
    for (key, value) in &settings.headers {
        let key = reqwest::header::HeaderName::from_bytes(key.as_bytes())
            .with_context(|| format!("sinks.{name}.headers: `{key}` is not a header name"))?;
        let value = reqwest::header::HeaderValue::from_str(value)
            .with_context(|| format!("sinks.{name}.headers.{key}: not a header value"))?;
        headers.insert(key, value);
    }
    if let Some(token) = &token {
        let mut value = reqwest::header::HeaderValue::from_str(&format!(
            "Bearer {}",
            token.expose()
        ))
        .map_err(|_| {
            anyhow::anyhow!("the bearer token of sink {name} has characters a header cannot carry")
        })?;
        value.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    let client = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .default_headers(headers)
        .timeout(settings.timeout)
        .connect_timeout(settings.timeout)
        // A redirected POST may become a GET whose 2xx would count as delivered: a 3xx is
        // refused instead, and the URL is to be fixed. Proxies from the environment are
        // not used: the webhook is where the config says.
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build()
        .context("cannot build the HTTP client")?;
    reachable(&url, settings.timeout).await?;

    let batch = settings.batch_size();
    let backoff = Backoff::new(settings.retry_initial, settings.retry_max);
    let retries = metrics.sink_retries.with_label_values(&[name]);
    Ok(QueuedSink::start(
        name,
        batch * 2,
        Box::new(|_| None),
        |events, progress| {
            Poster {
                client,
                url,
                batch,
                progress,
                backoff,
                retries,
            }
            .run(events)
        },
    ))
}

/// The token from `bearer_token_file` (trimmed) or the variable `bearer_token_env` names.
fn bearer_token(name: &str, settings: &SinkConfig) -> anyhow::Result<Option<Secret>> {
    if let Some(file) = &settings.bearer_token_file {
        let text = std::fs::read_to_string(file).map_err(|err| {
            anyhow::anyhow!(
                "sinks.{name}.bearer_token_file: cannot read {}: {err}",
                file.display()
            )
        })?;
        let token = text.trim();
        if token.is_empty() {
            anyhow::bail!(
                "sinks.{name}.bearer_token_file: {} is empty",
                file.display()
            );
        }
        return Ok(Some(Secret::new(token)));
    }
    if let Some(var) = &settings.bearer_token_env {
        let value = std::env::var(var).map_err(|_| {
            anyhow::anyhow!(
                "sinks.{name}.bearer_token_env: the environment variable {var} is not set"
            )
        })?;
        return Ok(Some(Secret::new(value.trim())));
    }
    Ok(None)
}

/// Whether the URL's host accepts a TCP connection within `timeout`.
async fn reachable(url: &reqwest::Url, timeout: Duration) -> anyhow::Result<()> {
    let host = url.host_str().context("the URL has no host")?;
    let port = url.port_or_known_default().context("the URL has no port")?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect((host, port))).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(err)) => anyhow::bail!("cannot connect to {host}:{port}: {err}"),
        Err(_) => anyhow::bail!("{host}:{port} did not accept a connection within {timeout:?}"),
    }
}

/// What became of one request.
enum Outcome {
    Delivered,
    /// Worth trying again, after at least this long (a `Retry-After`).
    Retry(String, Option<Duration>),
    /// Never going to succeed: the status and the start of the answer.
    Refused(String),
}

/// The task that posts.
struct Poster {
    client: reqwest::Client,
    url: reqwest::Url,
    batch: usize,
    progress: Arc<Progress>,
    backoff: Backoff,
    retries: prometheus::IntCounter,
}

impl Poster {
    async fn run(mut self, mut events: mpsc::Receiver<Outgoing>) {
        let mut batch = Vec::with_capacity(self.batch);
        while let Some(first) = events.recv().await {
            let cbor = first.headers.content_type == ContentType::Cbor;
            batch.push(first);
            // CBOR events cannot be put in a JSON array: they go one per request.
            while !cbor && batch.len() < self.batch {
                match events.try_recv() {
                    Ok(event) if event.headers.content_type == ContentType::Json => {
                        batch.push(event)
                    }
                    Ok(event) => {
                        self.deliver(std::mem::take(&mut batch)).await;
                        batch.push(event);
                        break;
                    }
                    Err(_) => break,
                }
            }
            self.deliver(std::mem::take(&mut batch)).await;
        }
    }

    /// Posts `events` until the webhook takes or refuses them; a refused batch is split.
    async fn deliver(&mut self, events: Vec<Outgoing>) {
        match self.post_until_answered(&events).await {
            Ok(()) => self.progress.confirm(&events),
            Err(_) if events.len() > 1 => {
                for event in events {
                    Box::pin(self.deliver(vec![event])).await;
                }
            }
            Err(detail) => self.progress.refuse(events, "http_status", &detail),
        }
    }

    /// Posts until delivered (`Ok`) or refused for good (`Err` with what the webhook said).
    async fn post_until_answered(&mut self, events: &[Outgoing]) -> Result<(), String> {
        loop {
            match self.post(events).await {
                Outcome::Delivered => {
                    self.progress.up();
                    self.backoff.reset();
                    return Ok(());
                }
                Outcome::Refused(detail) => {
                    self.backoff.reset();
                    return Err(detail);
                }
                Outcome::Retry(why, after) => {
                    self.progress.down();
                    let backoff = self.backoff.next_delay();
                    // The service's own Retry-After wins over the backoff (up to an hour).
                    let delay = after.map_or(backoff, |after| after.min(MAX_RETRY_AFTER));
                    tracing::warn!(sink = %self.progress.name(), ?delay, "the webhook did not take {} event(s): {why}; retrying", events.len());
                    tokio::time::sleep(delay).await;
                    self.retries.inc();
                }
            }
        }
    }

    async fn post(&self, events: &[Outgoing]) -> Outcome {
        let request = self.request(events);
        let response = match request.send().await {
            Ok(response) => response,
            Err(err) if err.is_timeout() => return Outcome::Retry("timed out".into(), None),
            Err(err) => return Outcome::Retry(error_chain(&err), None),
        };
        let status = response.status();
        if status.is_success() {
            return Outcome::Delivered;
        }
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body = response.bytes().await.unwrap_or_default();
        let mut detail = format!("HTTP {status}: {}", String::from_utf8_lossy(&body));
        if detail.len() > DETAIL_BYTES {
            let mut cut = DETAIL_BYTES;
            while !detail.is_char_boundary(cut) {
                cut -= 1;
            }
            detail.truncate(cut);
        }
        let code = status.as_u16();
        if status.is_server_error() || code == 408 || code == 429 {
            Outcome::Retry(detail, retry_after)
        } else {
            Outcome::Refused(detail)
        }
    }

    /// The request for `events`: one event as itself, several (or any with `batch` above 1) as
    /// a JSON array.
    fn request(&self, events: &[Outgoing]) -> reqwest::RequestBuilder {
        let first = &events[0];
        let mut request = self.client.post(self.url.clone());
        let id = |event: &Outgoing| event.headers.id.map(|id| id.to_string());
        if self.batch == 1 || first.headers.content_type == ContentType::Cbor {
            request = request
                .header(
                    reqwest::header::CONTENT_TYPE,
                    first.headers.content_type.mime(),
                )
                .header("Weir-Topic", &first.topic);
            if let Some(id) = id(first) {
                request = request.header("Idempotency-Key", id);
            }
            if let Some(rule) = &first.rule {
                request = request.header("Weir-Rule", &**rule);
            }
            if let Some(trace) = &first.headers.trace {
                request = request.header("traceparent", trace.traceparent());
                if let Some(state) = &trace.state {
                    request = request.header("tracestate", &**state);
                }
            }
            return request.body(first.payload.clone());
        }
        let mut body =
            Vec::with_capacity(events.iter().map(|e| e.payload.len() + 1).sum::<usize>() + 2);
        body.push(b'[');
        for (at, event) in events.iter().enumerate() {
            if at > 0 {
                body.push(b',');
            }
            body.extend_from_slice(&event.payload);
        }
        body.push(b']');
        // The same events in the same order make the same key when the batch is sent again:
        // a hash of every id, not just the first and last.
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for id in events.iter().filter_map(|event| event.headers.id) {
            for byte in id.0.to_le_bytes() {
                hash ^= u64::from(byte);
                hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
        let key = format!("batch-{}-{hash:016x}", events.len());
        request
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("Idempotency-Key", key)
            .body(body)
    }
}

/// An error with its causes, on one line (reqwest's own Display stops at the first).
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
