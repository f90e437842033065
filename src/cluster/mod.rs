//! Scale-out over NATS JetStream (`[cluster]`): `weir cluster init` creates or checks what the
//! instances share — the stream of partitioned readings, sized from the rules, and the output
//! stream with its duplicate window, the KV buckets of members and claims ([`ownership`]) and the
//! object store of partition state ([`state`]) — and prints the server's partition mapping,
//! which lives in the NATS server's config. `app::hub` runs an instance over them.

pub mod ownership;
pub mod state;

use crate::config::cluster::state_horizon;
use crate::config::{ClusterConfig, Config, SinkKind};
use async_nats::jetstream::stream::{Config as StreamConfig, RetentionPolicy, StorageType};
use std::time::Duration;

/// The shortest time readings stay in the stream, whatever the rules say.
const MIN_MAX_AGE: Duration = Duration::from_secs(600);

/// How long the readings stream keeps a reading: twice the longest span any rule keeps state
/// over plus the snapshot interval (a new owner rebuilds from a snapshot and the readings
/// after it), at least [`MIN_MAX_AGE`], in whole minutes.
pub fn readings_max_age(config: &Config, rules: &toml::Table) -> Duration {
    let needed = (state_horizon(rules) + config.delivery.snapshot_interval) * 2;
    let minutes = needed.max(MIN_MAX_AGE).as_secs().div_ceil(60);
    Duration::from_secs(minutes * 60)
}

/// The server-config lines that map each input's MQTT topics (as NATS subjects) to their
/// partition, for nats-server 2.9 and later (an account's `mappings`).
///
/// # Errors
/// An input's pattern has no device level.
pub fn partition_mappings(config: &Config, cluster: &ClusterConfig) -> anyhow::Result<Vec<String>> {
    let mut lines = Vec::new();
    for (name, input) in &config.inputs {
        let mut source = Vec::new();
        let mut destination = vec![cluster.subject_prefix.clone(), String::new()];
        let mut wildcards = 0;
        let mut device_wildcard = None;
        for level in input.topic.split('/') {
            let named = level.strip_prefix('{').and_then(|l| l.strip_suffix('}'));
            if named.is_some() || level == "+" {
                wildcards += 1;
                if named == Some(input.device.as_str()) {
                    device_wildcard = Some(wildcards);
                }
                source.push("*".to_owned());
                destination.push(format!("{{{{wildcard({wildcards})}}}}"));
            } else {
                let token = crate::config::cluster::topic_to_subject(level);
                source.push(token.clone());
                destination.push(token);
            }
        }
        let device = device_wildcard.ok_or_else(|| {
            anyhow::anyhow!(
                "inputs.{name}: the device `{}` is not a level of `{}`",
                input.device,
                input.topic
            )
        })?;
        destination[1] = format!("{{{{partition({},{device})}}}}", cluster.partitions);
        lines.push(format!(
            "\"{}\": \"{}\"",
            source.join("."),
            destination.join(".")
        ));
    }
    Ok(lines)
}

/// The subjects the output stream captures: every output to a `nats` sink, its template's
/// placeholders as `*`.
pub fn output_subjects(config: &Config) -> Vec<String> {
    let mut subjects: Vec<String> = config
        .rules
        .values()
        .flat_map(|rule| &rule.output.list)
        .filter(|output| {
            output
                .sink
                .as_ref()
                .and_then(|sink| config.sinks.get(sink))
                .is_some_and(|sink| sink.kind == SinkKind::Nats)
        })
        .filter_map(|output| output.topic.as_deref())
        .map(|template| {
            template
                .split('/')
                .map(|level| {
                    if level.contains('{') {
                        "*".to_owned()
                    } else {
                        crate::config::cluster::topic_to_subject(level)
                    }
                })
                .collect::<Vec<_>>()
                .join(".")
        })
        .collect();
    subjects.sort();
    subjects.dedup();
    subjects
}

/// `weir cluster init`: creates the streams that are missing, checks (and, where it only needs
/// to grow, updates) the ones that exist, and says what it did, one line each.
///
/// # Errors
/// No `[cluster]`, NATS cannot be reached, or a stream cannot be created or updated.
pub async fn init(config: &Config, config_text: &str) -> anyhow::Result<Vec<String>> {
    let Some(cluster) = &config.cluster else {
        anyhow::bail!(
            "the config has no [cluster] section; add one with servers = [\"nats://HOST:4222\"]"
        );
    };
    let table: toml::Table = toml::from_str(config_text)?;
    let empty = toml::Table::new();
    let rules = table
        .get("rules")
        .and_then(|r| r.as_table())
        .unwrap_or(&empty);
    let client =
        crate::nats::connect_cluster(cluster, "weir-cluster-init", Duration::from_secs(10)).await?;
    let jetstream = async_nats::jetstream::new(client.clone());
    let mut lines = Vec::new();

    let max_age = readings_max_age(config, rules);
    let horizon = state_horizon(rules);
    lines.push(format!(
        "the rules keep state over at most {}; with the snapshot interval of {} and a margin of 2x, readings are kept {}",
        humantime::format_duration(horizon),
        humantime::format_duration(config.delivery.snapshot_interval),
        humantime::format_duration(max_age)
    ));
    let readings = StreamConfig {
        name: cluster.stream.clone(),
        subjects: vec![cluster.stream_subject()],
        retention: RetentionPolicy::Limits,
        storage: StorageType::File,
        max_age,
        num_replicas: cluster.replicas,
        ..Default::default()
    };
    lines.push(ensure_stream(&jetstream, readings, "readings").await?);

    let subjects = output_subjects(config);
    if subjects.is_empty() {
        lines.push(format!(
            "no rule outputs to a nats sink: the output stream {} is not needed",
            cluster.output_stream
        ));
    } else {
        let output = StreamConfig {
            name: cluster.output_stream.clone(),
            subjects,
            retention: RetentionPolicy::Limits,
            storage: StorageType::File,
            duplicate_window: cluster.dedup_window,
            num_replicas: cluster.replicas,
            ..Default::default()
        };
        lines.push(ensure_stream(&jetstream, output, "events").await?);
    }

    for bucket in ownership::bucket_configs(cluster.lease_ttl, cluster.replicas) {
        lines.push(ensure_bucket(&jetstream, bucket).await?);
    }
    let bucket = state::STATE_BUCKET;
    if jetstream.get_stream(format!("OBJ_{bucket}")).await.is_ok() {
        lines.push(format!(
            "found the object store {bucket}: state per partition"
        ));
    } else {
        jetstream
            .create_object_store(state::bucket_config(cluster.replicas))
            .await
            .map_err(|err| anyhow::anyhow!("cannot create the object store {bucket}: {err}"))?;
        lines.push(format!(
            "created the object store {bucket}: state per partition"
        ));
    }

    lines.push(format!(
        "put the partition mapping into the NATS server's account (nats-server 2.9+: `mappings`), so readings published over MQTT land in {}:",
        cluster.stream
    ));
    for mapping in partition_mappings(config, cluster)? {
        lines.push(format!("  {mapping}"));
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), client.drain()).await;
    Ok(lines)
}

/// Creates the stream behind a KV bucket, or checks its TTL (a bucket's entries expire after
/// its `max_age`).
async fn ensure_bucket(
    jetstream: &async_nats::jetstream::Context,
    wanted: StreamConfig,
) -> anyhow::Result<String> {
    let name = wanted.name.trim_start_matches("KV_").to_owned();
    let ttl = humantime::format_duration(wanted.max_age).to_string();
    match jetstream.get_stream(&wanted.name).await {
        Ok(mut stream) => {
            let found = stream.info().await?.config.max_age;
            let found = humantime::format_duration(found).to_string();
            if found == ttl {
                Ok(format!(
                    "found the KV bucket {name}: entries expire after {found}"
                ))
            } else {
                anyhow::bail!(
                    "the KV bucket {name} expires entries after {found}, but cluster.lease_ttl is {ttl}; delete the bucket (no instance running) and run init again, or set lease_ttl = \"{found}\""
                )
            }
        }
        Err(_) => {
            jetstream
                .create_stream(wanted)
                .await
                .map_err(|err| anyhow::anyhow!("cannot create the KV bucket {name}: {err}"))?;
            Ok(format!(
                "created the KV bucket {name}: entries expire after {ttl}"
            ))
        }
    }
}

/// Creates `wanted`, or checks the stream of that name: subjects it lacks are added and a
/// shorter `max_age` or duplicate window is raised; nothing is ever removed.
async fn ensure_stream(
    jetstream: &async_nats::jetstream::Context,
    wanted: StreamConfig,
    what: &str,
) -> anyhow::Result<String> {
    let name = wanted.name.clone();
    let describe = |config: &StreamConfig| {
        format!(
            "subjects {}, max_age {}, duplicate window {}, {} replica{}",
            config.subjects.join(" "),
            if config.max_age.is_zero() {
                "unlimited".to_owned()
            } else {
                humantime::format_duration(config.max_age).to_string()
            },
            humantime::format_duration(config.duplicate_window),
            config.num_replicas,
            if config.num_replicas == 1 { "" } else { "s" }
        )
    };
    match jetstream.get_stream(&name).await {
        Ok(mut stream) => {
            let found = stream.info().await?.config.clone();
            let mut updated = found.clone();
            for subject in &wanted.subjects {
                if !updated.subjects.contains(subject) {
                    updated.subjects.push(subject.clone());
                }
            }
            if !updated.max_age.is_zero() && updated.max_age < wanted.max_age {
                updated.max_age = wanted.max_age;
            }
            if updated.duplicate_window < wanted.duplicate_window {
                updated.duplicate_window = wanted.duplicate_window;
            }
            if updated.subjects == found.subjects
                && updated.max_age == found.max_age
                && updated.duplicate_window == found.duplicate_window
            {
                Ok(format!(
                    "found the {what} stream {name}: {}",
                    describe(&found)
                ))
            } else {
                jetstream.update_stream(&updated).await.map_err(|err| {
                    anyhow::anyhow!("cannot update the {what} stream {name}: {err}")
                })?;
                Ok(format!(
                    "updated the {what} stream {name}: was {}; now {}",
                    describe(&found),
                    describe(&updated)
                ))
            }
        }
        Err(_) => {
            let line = format!("created the {what} stream {name}: {}", describe(&wanted));
            jetstream
                .create_stream(wanted)
                .await
                .map_err(|err| anyhow::anyhow!("cannot create the {what} stream {name}: {err}"))?;
            Ok(line)
        }
    }
}
