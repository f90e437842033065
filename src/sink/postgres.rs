//! The PostgreSQL sink (`kind = "postgres"`): each event becomes a row of its output's table,
//! inserted in batches of up to `batch` in one statement, so that Grafana (or any SQL client)
//! reads state changes and rollups directly.
//!
//! Every table has one layout, whatever the rule ([`schema_sql`]): the fields every event has
//! as columns (`id`, `rule`, `kind`, `device`, `labels`, `ts`, `topic`), the ones state changes
//! and windows have as nullable columns (`metric`, `from_state`, `to_state`, `value`,
//! `window_start`, `window_end`), a window's aggregates as JSONB, and the whole event as JSONB.
//! The aggregates are JSONB rather than a column each so that one layout fits every rule, and a
//! reload that adds a metric or an aggregate needs no migration; Grafana reads them as
//! `(aggregates->'temperature'->>'avg')::float8`.
//!
//! The server takes the columns out of the events' JSON itself (the batch goes as one array),
//! and the event id is the primary key: a redelivered event writes nothing
//! (`ON CONFLICT (id) DO UPDATE ... WHERE` the stored revision is older), while a window update
//! (same id, `update` N) replaces the row it updates. A batch is confirmed when the statement
//! has committed. Lost connections are retried; a batch the database rejects for its data is
//! inserted again one row at a time, and only the rows it rejects go to the dead-letter path.

use super::queued::{Progress, QueuedSink, Refusal};
use crate::config::SinkConfig;
use crate::metrics::Metrics;
use crate::mqtt::Backoff;
use crate::route::Outgoing;
use anyhow::Context as _;
use std::collections::VecDeque;
use std::str::FromStr as _;
use std::sync::Arc;
use tokio::sync::mpsc;

/// The columns every table has, in order.
pub const COLUMNS: [&str; 17] = [
    "id",
    "revision",
    "rule",
    "kind",
    "device",
    "labels",
    "ts",
    "topic",
    "metric",
    "from_state",
    "to_state",
    "value",
    "window_start",
    "window_end",
    "aggregates",
    "cause",
    "event",
];

/// The `CREATE TABLE` (and index) for `table`, as `weir sinks init` runs it.
pub fn schema_sql(table: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {table} (
    id text PRIMARY KEY,              -- the event id (16 hex digits)
    revision integer NOT NULL,        -- a window's `update` count, 0 for every other event
    rule text NOT NULL,
    kind text NOT NULL,               -- state_change, window, report, change, liveness, ...
    device text NOT NULL,
    labels jsonb NOT NULL,            -- the topic's other segments, e.g. {{\"site\": \"plant-1\"}}
    ts timestamptz NOT NULL,          -- event time
    topic text NOT NULL,              -- the output's topic (or the rule's name)
    metric text,                      -- the metric or field (state changes, reports, anomalies)
    from_state text,
    to_state text,
    value double precision,
    window_start timestamptz,
    window_end timestamptz,
    aggregates jsonb,                 -- a window's metrics: {{\"temperature\": {{\"avg\": 21.5, ...}}}}
    cause jsonb,                      -- the reading that caused the event
    event jsonb NOT NULL,             -- the whole event, schema v1
    inserted_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS {table}_device_ts ON {table} (device, ts);
CREATE INDEX IF NOT EXISTS {table}_ts ON {table} (ts);"
    )
}

/// The insert of a batch: `$1` the events' JSON, `$2` their topics, both `text[]`.
fn insert_sql(table: &str) -> String {
    let updates: Vec<String> = COLUMNS[1..]
        .iter()
        .map(|column| format!("{column} = excluded.{column}"))
        .collect();
    format!(
        "INSERT INTO {table} AS t ({columns})
SELECT DISTINCT ON (e->>'id')
    e->>'id', coalesce((e->>'update')::integer, 0), e->>'rule', e->>'kind', e->>'device',
    coalesce(e->'labels', '{{}}'::jsonb), to_timestamp((e->>'ts')::float8 / 1000), topic,
    coalesce(e->>'metric', e->>'field'),
    CASE WHEN jsonb_typeof(e->'from') = 'string' THEN e->>'from' ELSE (e->'from')::text END,
    CASE WHEN jsonb_typeof(e->'to') = 'string' THEN e->>'to' ELSE (e->'to')::text END,
    CASE WHEN jsonb_typeof(e->'value') = 'number' THEN (e->>'value')::float8 END,
    to_timestamp((e->>'start')::float8 / 1000), to_timestamp((e->>'end')::float8 / 1000),
    e->'metrics', e->'cause', e
FROM (SELECT x.e::jsonb AS e, x.topic FROM unnest($1::text[], $2::text[]) AS x(e, topic)) AS batch
ORDER BY e->>'id', coalesce((e->>'update')::integer, 0) DESC
ON CONFLICT (id) DO UPDATE SET {updates}
WHERE t.revision < excluded.revision",
        columns = COLUMNS.join(", "),
        updates = updates.join(", ")
    )
}

/// Connects with the sink's URL and its `password_file`.
async fn open(settings: &SinkConfig) -> anyhow::Result<tokio_postgres::Client> {
    let mut config = tokio_postgres::Config::from_str(&settings.url)
        .with_context(|| format!("`{}` is not a PostgreSQL URL", settings.redacted_url()))?;
    if let Some(file) = &settings.password_file {
        let password = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read the password file {}", file.display()))?;
        config.password(password.trim_end_matches(['\r', '\n']));
    }
    config.connect_timeout(settings.timeout);
    let (client, connection) =
        tokio::time::timeout(settings.timeout, config.connect(tokio_postgres::NoTls))
            .await
            .map_err(|_| {
                anyhow::anyhow!("the database did not answer within {:?}", settings.timeout)
            })?
            .map_err(|err| anyhow::anyhow!("cannot connect: {}", describe(&err)))?;
    tokio::spawn(async move {
        // Ends when the client is dropped or the connection breaks; the sink notices the latter
        // on its next statement.
        let _ = connection.await;
    });
    Ok(client)
}

/// The tables among `tables` that are missing or lack a column.
async fn check_tables(
    client: &tokio_postgres::Client,
    tables: &[String],
) -> anyhow::Result<Vec<String>> {
    let mut problems = Vec::new();
    for table in tables {
        let rows = client
            .query(
                "SELECT column_name::text FROM information_schema.columns WHERE table_schema = current_schema() AND table_name = $1",
                &[table],
            )
            .await
            .map_err(|err| anyhow::anyhow!("cannot read the schema: {}", describe(&err)))?;
        let found: Vec<String> = rows.iter().map(|row| row.get(0)).collect();
        if found.is_empty() {
            problems.push(format!("table {table} does not exist"));
        } else if let Some(missing) = COLUMNS.iter().find(|c| !found.iter().any(|f| f == *c)) {
            problems.push(format!("table {table} has no column {missing}"));
        }
    }
    Ok(problems)
}

/// `weir sinks init` for a postgres sink: creates the missing tables, one line per table.
///
/// # Errors
/// The database cannot be reached or refuses the statement.
pub async fn init(
    name: &str,
    settings: &SinkConfig,
    tables: &[String],
) -> anyhow::Result<Vec<String>> {
    let client = open(settings).await?;
    let mut lines = Vec::new();
    for table in tables {
        let existed = check_tables(&client, std::slice::from_ref(table))
            .await?
            .is_empty();
        client
            .batch_execute(&schema_sql(table))
            .await
            .map_err(|err| {
                anyhow::anyhow!(
                    "sink {name}: cannot create table {table}: {}",
                    describe(&err)
                )
            })?;
        let problems = check_tables(&client, std::slice::from_ref(table)).await?;
        if let Some(problem) = problems.first() {
            anyhow::bail!("sink {name}: {problem}; it was made by something else: rename it, or set `table` on the outputs");
        }
        lines.push(if existed {
            format!("found table {table}")
        } else {
            format!("created table {table}")
        });
    }
    Ok(lines)
}

/// A database error in one sentence with its SQLSTATE.
fn describe(err: &tokio_postgres::Error) -> String {
    match err.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => {
            let mut text = err.to_string();
            let mut source = std::error::Error::source(err);
            while let Some(cause) = source {
                text.push_str(": ");
                text.push_str(&cause.to_string());
                source = cause.source();
            }
            text
        }
    }
}

/// Whether the database refused the data itself (trying again cannot help), rather than the
/// connection or the server's state failing.
fn is_refusal(err: &tokio_postgres::Error) -> bool {
    let Some(db) = err.as_db_error() else {
        return false;
    };
    // 08 connection, 40 rollback (serialization, deadlock), 53 resources, 57 operator
    // intervention (shutdown), 58 system: all pass.
    !matches!(&db.code().code()[..2], "08" | "40" | "53" | "57" | "58")
}

/// Connects and checks that every table in `tables` exists with the expected columns; then
/// rows are inserted by a task of the sink's own.
///
/// # Errors
/// The database cannot be reached, or a table is missing (the message gives the SQL).
pub async fn connect(
    name: &str,
    settings: &SinkConfig,
    tables: Vec<String>,
    metrics: Arc<Metrics>,
) -> anyhow::Result<QueuedSink> {
    let client = open(settings).await?;
    let problems = check_tables(&client, &tables).await?;
    if !problems.is_empty() {
        anyhow::bail!(
            "{}; run `weir sinks init --config FILE`, or create it with:\n{}",
            problems.join("; "),
            tables
                .iter()
                .map(|t| schema_sql(t))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    let batch = settings.batch_size();
    let writer = |events, progress| {
        Writer {
            client: Some(client),
            settings: settings.clone(),
            batch,
            progress,
            backoff: Backoff::new(settings.retry_initial, settings.retry_max),
            retries: metrics.sink_retries.with_label_values(&[name]),
        }
        .run(events)
    };
    let json_only: Refusal = Box::new(|event: &Outgoing| {
        (event.headers.content_type != crate::model::message::ContentType::Json)
            .then_some("a postgres sink stores JSON events only")
    });
    Ok(QueuedSink::start(name, batch * 2, json_only, writer))
}

/// The task that owns the connection.
struct Writer {
    client: Option<tokio_postgres::Client>,
    settings: SinkConfig,
    batch: usize,
    progress: Arc<Progress>,
    backoff: Backoff,
    retries: prometheus::IntCounter,
}

impl Writer {
    async fn run(mut self, mut events: mpsc::Receiver<Outgoing>) {
        let mut pending: VecDeque<Outgoing> = VecDeque::new();
        while let Some(first) = events.recv().await {
            pending.push_back(first);
            while pending.len() < self.batch {
                match events.try_recv() {
                    Ok(event) => pending.push_back(event),
                    Err(_) => break,
                }
            }
            // A batch goes to one table: take the run of events with the first one's table.
            while !pending.is_empty() {
                let table = pending[0].table.clone();
                let run = pending.iter().take_while(|e| e.table == table).count();
                let batch: Vec<Outgoing> = pending.drain(..run).collect();
                self.write(batch).await;
            }
        }
    }

    /// Inserts `batch` until it commits or the database refuses it; a refused batch is split.
    async fn write(&mut self, batch: Vec<Outgoing>) {
        match self.insert_until_answered(&batch).await {
            Ok(()) => self.progress.confirm(&batch),
            Err(_) if batch.len() > 1 => {
                for event in batch {
                    Box::pin(self.write(vec![event])).await;
                }
            }
            Err(detail) => self.progress.refuse(batch, "rejected", &detail),
        }
    }

    async fn insert_until_answered(&mut self, batch: &[Outgoing]) -> Result<(), String> {
        let table = batch[0].table.as_deref().unwrap_or("events").to_owned();
        let sql = insert_sql(&table);
        let events: Vec<String> = batch
            .iter()
            .map(|event| String::from_utf8_lossy(&event.payload).into_owned())
            .collect();
        let topics: Vec<&str> = batch.iter().map(|event| event.topic.as_str()).collect();
        loop {
            let result = match &self.client {
                Some(client) if !client.is_closed() => {
                    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] =
                        [&events, &topics];
                    let insert = client.execute(&sql, &params);
                    match tokio::time::timeout(self.settings.timeout, insert).await {
                        Ok(Ok(_)) => Ok(()),
                        Ok(Err(err)) if is_refusal(&err) => {
                            self.backoff.reset();
                            return Err(describe(&err));
                        }
                        Ok(Err(err)) => Err(describe(&err)),
                        Err(_) => Err(format!("no answer within {:?}", self.settings.timeout)),
                    }
                }
                _ => match open(&self.settings).await {
                    Ok(client) => {
                        self.client = Some(client);
                        continue;
                    }
                    Err(err) => Err(err.to_string()),
                },
            };
            match result {
                Ok(()) => {
                    self.progress.up();
                    self.backoff.reset();
                    return Ok(());
                }
                Err(why) => {
                    self.progress.down();
                    // A statement that timed out may leave the connection busy: start afresh.
                    self.client = None;
                    let delay = self.backoff.next_delay();
                    tracing::warn!(sink = %self.progress.name(), ?delay, "{} row(s) not inserted: {why}; retrying", batch.len());
                    tokio::time::sleep(delay).await;
                    self.retries.inc();
                }
            }
        }
    }
}
