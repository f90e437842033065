//! Scale-out over NATS JetStream (issue 13), against a real `nats-server` per test: devices
//! publish over MQTT to the server's MQTT listener, its partition mapping puts each reading in
//! the readings stream under its partition, weir reads the stream and publishes events to the
//! output stream with `Nats-Msg-Id`. The oracle is `weir replay` of the same readings.

// The whole file needs the NATS client (`cluster` feature, in the default features).
#![cfg(feature = "cluster")]

mod common;

use common::cluster::{
    assert_equals_replay, by_device, cluster_config, fleet_readings, logs, output_stream,
    publish_all, readings, replayed, server_for_example, wait_for_output, wait_for_owners, weir,
    Instance,
};
use common::nats::NatsServer;
use common::{temp_dir, wait_until, Publisher, TempDir, DEADLINE};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_init_creates_the_streams_sized_from_the_rules_and_is_idempotent() {
    let server = NatsServer::start(&[]);
    let dir = temp_dir("cluster-init");
    let config = dir.join("weir.toml");
    std::fs::write(&config, cluster_config(&server, None)).expect("write config");
    let first = weir(&["cluster", "init", "--config"], &config);
    assert!(
        first.contains("created the readings stream WEIR_READINGS: subjects weir.*.>"),
        "{first}"
    );
    assert!(
        first.contains("created the events stream WEIR_EVENTS: subjects alerts.*.*.overheat"),
        "{first}"
    );
    // The example's longest span is the climate window's allowed lateness (read from the
    // rules), and the snapshot interval is 30 s.
    assert!(first.contains("readings are kept"), "{first}");
    let second = weir(&["cluster", "init", "--config"], &config);
    assert!(
        second.contains("found the readings stream WEIR_READINGS"),
        "{second}"
    );
    assert!(
        second.contains("found the events stream WEIR_EVENTS"),
        "{second}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_derived_again_after_a_lost_snapshot_are_stored_once() {
    let server = server_for_example();
    let dir = temp_dir("cluster-again");
    let state = dir.join("state");
    let config_path = dir.join("weir.toml");
    std::fs::write(&config_path, cluster_config(&server, Some(&state))).expect("write config");
    weir(&["cluster", "init", "--config"], &config_path);
    let load = || {
        let mut config = weir::config::load(&config_path, &Default::default()).expect("config");
        config.http.listen = "127.0.0.1:0".parse().expect("addr");
        config
    };
    let readings = readings();
    let expected = replayed(&config_path, &readings);
    let total: usize = expected.values().map(Vec::len).sum();

    let running = common::start_weir_with(load()).await;
    let mut publisher = Publisher::start_on(server.mqtt_port).await;
    for (topic, payload) in &readings {
        publisher
            .publish(topic, payload.to_string().into_bytes())
            .await;
    }
    let metrics = running.metrics.clone();
    assert!(
        wait_until(DEADLINE, || metrics
            .sink_confirmed
            .with_label_values(&["hub"])
            .get()
            >= total as u64)
        .await,
        "every event was stored"
    );
    running.stop().await.expect("weir stops");

    // As if weir had died before its first snapshot: the next start reads the whole stream
    // again and derives every event again, byte for byte; the server keeps the first copies.
    std::fs::remove_dir_all(&state).expect("remove the state dir");
    let running = common::start_weir_with(load()).await;
    let metrics = running.metrics.clone();
    assert!(
        wait_until(DEADLINE, || metrics
            .sink_confirmed
            .with_label_values(&["hub"])
            .get()
            >= total as u64)
        .await,
        "the events were derived and published again"
    );
    running.stop().await.expect("weir stops");
    let events = output_stream(&server).await;
    assert_eq!(
        events.len(),
        total,
        "the server dropped every copy by its Nats-Msg-Id"
    );
    assert_eq!(by_device(&events), expected);
}

/// Members and claims over a real server's KV: a join moves about 1/N of the partitions, all to
/// the newcomer; a member that stops renewing loses exactly its own partitions after the TTL,
/// and its stale lease can neither be renewed nor trusted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_move_by_rendezvous_and_a_silent_member_loses_its_claims_after_the_ttl() {
    use weir::cluster::ownership::{assignment, bucket_configs, ClaimError, Lease, Membership};
    const PARTITIONS: u32 = 32;
    let ttl = Duration::from_secs(2);
    let server = NatsServer::start(&[]);
    let client = async_nats::connect(server.url()).await.expect("connect");
    let jetstream = async_nats::jetstream::new(client);
    for bucket in bucket_configs(ttl, 1) {
        jetstream
            .create_stream(bucket)
            .await
            .expect("create bucket");
    }
    let open = |name: &str| Membership::open(&jetstream, name.to_owned(), ttl);
    let (a, b, c) = (
        open("a").await.unwrap(),
        open("b").await.unwrap(),
        open("c").await.unwrap(),
    );

    // Each member claims what the assignment over the live members gives it.
    async fn claim_assigned(member: &Membership, leases: &mut Vec<Lease>) {
        let members = member.live_members().await.expect("members");
        for (partition, owner) in assignment(&members, PARTITIONS).iter().enumerate() {
            let partition = partition as u32;
            let mine = owner.as_deref() == Some(member.name());
            let held = leases.iter().any(|l| l.partition == partition);
            if mine && !held {
                match member.claim(partition).await {
                    Ok(lease) => leases.push(lease),
                    Err(ClaimError::Taken(_)) => {}
                    Err(err) => panic!("{err}"),
                }
            } else if !mine && held {
                let at = leases
                    .iter()
                    .position(|l| l.partition == partition)
                    .unwrap();
                member.release(&leases.remove(at)).await.expect("release");
            }
        }
    }
    async fn renew_all(member: &Membership, leases: &mut [Lease]) {
        member.heartbeat().await.expect("heartbeat");
        for lease in leases.iter_mut() {
            *lease = member.renew(lease).await.expect("renew");
        }
    }

    let (mut la, mut lb, mut lc) = (Vec::new(), Vec::new(), Vec::new());
    a.heartbeat().await.unwrap();
    b.heartbeat().await.unwrap();
    claim_assigned(&a, &mut la).await;
    claim_assigned(&b, &mut lb).await;
    let before = a.owners(PARTITIONS).await.unwrap();
    assert!(
        before.iter().all(Option::is_some),
        "two members hold every partition"
    );

    // c joins: the others give up what c wins, c claims it.
    c.heartbeat().await.unwrap();
    claim_assigned(&a, &mut la).await;
    claim_assigned(&b, &mut lb).await;
    claim_assigned(&c, &mut lc).await;
    let after_join = a.owners(PARTITIONS).await.unwrap();
    let moved: Vec<_> = (0..PARTITIONS as usize)
        .filter(|&p| before[p] != after_join[p])
        .collect();
    println!("join: {} of {PARTITIONS} partitions moved", moved.len());
    assert!(moved.iter().all(|&p| after_join[p].as_deref() == Some("c")));
    assert_eq!(moved.len(), lc.len());
    assert!(
        (4..=20).contains(&moved.len()),
        "about a third moved: {}",
        moved.len()
    );

    // b falls silent; a and c keep renewing past the TTL.
    let b_partitions: Vec<u32> = lb.iter().map(|l| l.partition).collect();
    let stale = lb[0];
    let silent_since = std::time::Instant::now();
    while silent_since.elapsed() < ttl + Duration::from_millis(1500) {
        renew_all(&a, &mut la).await;
        renew_all(&c, &mut lc).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(
        !stale.is_valid(std::time::Instant::now()),
        "b no longer trusts its lease"
    );
    assert_eq!(a.live_members().await.unwrap(), ["a", "c"]);
    claim_assigned(&a, &mut la).await;
    claim_assigned(&c, &mut lc).await;
    let after_death = a.owners(PARTITIONS).await.unwrap();
    let moved: Vec<u32> = (0..PARTITIONS)
        .filter(|&p| after_join[p as usize] != after_death[p as usize])
        .collect();
    println!("death: {} of {PARTITIONS} partitions moved", moved.len());
    assert_eq!(
        moved, b_partitions,
        "exactly the silent member's partitions moved"
    );
    assert!(after_death
        .iter()
        .all(|o| matches!(o.as_deref(), Some("a" | "c"))));
    // The fencing token: b's claim was taken over, so its revision no longer renews.
    assert!(matches!(b.renew(&stale).await, Err(ClaimError::Taken(_))));
}

#[test]
fn the_hub_example_passes_weir_check() {
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/hub.toml");
    let out = weir(&["check", "--config"], &config);
    assert!(out.contains("valid (1 input, 2 rules, 2 sinks)"), "{out}");
}

/// Three instances share the 16 partitions; one is SIGKILLed mid-stream. Its partitions move to
/// the other two within the lease TTL, which resume them from their saved state, and the output
/// stream holds every event `weir replay` derives, exactly once, in per-device order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_killed_mid_stream_hands_its_partitions_over_and_no_event_is_lost_or_doubled() {
    let (server, dir, init_config) = initialised("cluster-kill");
    let names = ["hub-a", "hub-b", "hub-c"];
    let mut instances: Vec<Instance> = names
        .iter()
        .map(|name| Instance::start(&server, &dir, name))
        .collect();
    wait_for_owners(&server, &names, Duration::from_secs(30)).await;

    let readings = fleet_readings(40, 12);
    let expected = replayed(&init_config, &readings);
    let total: usize = expected.values().map(Vec::len).sum();
    let (first, second) = readings.split_at(readings.len() / 2);
    publish_all(&server, first).await;
    // Let the first half be processed and some state saved, then kill one owner.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let killed_at = std::time::Instant::now();
    instances[0].kill();
    publish_all(&server, second).await;
    let published_in = killed_at.elapsed();
    wait_for_owners(&server, &names[1..], Duration::from_secs(30)).await;
    let moved_within = killed_at.elapsed();

    let events = wait_for_output(&server, total, Duration::from_secs(30)).await;
    let handovers: f64 = instances[1..]
        .iter()
        .map(|i| i.metric("weir_cluster_handovers_total"))
        .sum();
    println!(
        "partitions of the killed instance claimed again within {moved_within:?} (the second half published in {published_in:?}); {} events, {handovers} handovers",
        events.len()
    );
    assert_equals_replay(&events, &expected, &dir, &names);
    assert!(handovers >= 2.0, "both survivors took partitions over");
    // Each survivor reads its own partitions only, one consumer each, and has caught up.
    for instance in &instances[1..] {
        let caught_up = wait_until(Duration::from_secs(10), || {
            let (serving, lags) = partition_lags(instance);
            !serving.is_empty()
                && lags.keys().copied().collect::<Vec<_>>() == serving
                && lags.values().all(|lag| *lag == 0)
        })
        .await;
        assert!(
            caught_up,
            "a lag series per partition served, all at 0: {:?}",
            partition_lags(instance)
        );
    }
    for instance in &mut instances[1..] {
        instance.stop();
    }
}

/// The partitions `instance` serves (`/api/cluster`), and its
/// `weir_cluster_partition_lag_messages` by partition.
fn partition_lags(instance: &Instance) -> (Vec<u64>, BTreeMap<u64, u64>) {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], instance.http_port));
    let body = |path| common::http_get_blocking(addr, path).unwrap_or_default();
    let view = body("/api/cluster");
    let view: serde_json::Value = view
        .split_once("\r\n\r\n")
        .and_then(|(_, json)| serde_json::from_str(json).ok())
        .unwrap_or_default();
    let serving = view["serving"]
        .as_array()
        .map(|a| a.iter().filter_map(serde_json::Value::as_u64).collect())
        .unwrap_or_default();
    let lags = body("/metrics")
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("weir_cluster_partition_lag_messages{partition=\"")?;
            let (partition, value) = rest.split_once("\"} ")?;
            Some((partition.parse().ok()?, value.parse().ok()?))
        })
        .collect();
    (serving, lags)
}

/// A NATS server for the example config, a temp dir, and `weir cluster init` run on the
/// cluster config written there as `init.toml` (returned).
fn initialised(tag: &str) -> (NatsServer, TempDir, PathBuf) {
    let server = server_for_example();
    let dir = temp_dir(tag);
    let init_config = dir.join("init.toml");
    std::fs::write(&init_config, cluster_config(&server, None)).expect("write config");
    weir(&["cluster", "init", "--config"], &init_config);
    (server, dir, init_config)
}

/// Who owns which partition, once the owners settled on `members`; and the partitions whose
/// owner differs between two such maps.
fn moved(before: &BTreeMap<String, String>, after: &BTreeMap<String, String>) -> Vec<String> {
    before
        .iter()
        .filter(|(partition, owner)| after.get(*partition) != Some(owner))
        .map(|(partition, _)| partition.clone())
        .collect()
}

/// Rescale 2 -> 3 -> 2 while readings keep coming: a join moves only the partitions the
/// newcomer wins, all to it, and its leave moves exactly those back; the output stream equals
/// `weir replay`, each event once, in per-device order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rescaling_two_three_two_moves_about_a_third_and_loses_nothing() {
    let (server, dir, init_config) = initialised("cluster-rescale");
    let mut a = Instance::start(&server, &dir, "hub-a");
    let mut b = Instance::start(&server, &dir, "hub-b");
    let two = wait_for_owners(&server, &["hub-a", "hub-b"], Duration::from_secs(30)).await;

    let readings = fleet_readings(40, 16);
    let expected = replayed(&init_config, &readings);
    let total: usize = expected.values().map(Vec::len).sum();
    let chunks: Vec<_> = readings.chunks(readings.len() / 4 + 1).collect();
    publish_all(&server, chunks[0]).await;
    let mut c = Instance::start(&server, &dir, "hub-c");
    publish_all(&server, chunks[1]).await;
    let three = wait_for_owners(
        &server,
        &["hub-a", "hub-b", "hub-c"],
        Duration::from_secs(30),
    )
    .await;
    let joined = moved(&two, &three);
    assert!(
        joined.iter().all(|p| three[p] == "hub-c"),
        "a join moves partitions only to the newcomer: {two:?} -> {three:?}"
    );
    publish_all(&server, chunks[2]).await;
    c.stop();
    publish_all(&server, chunks[3]).await;
    let back = wait_for_owners(&server, &["hub-a", "hub-b"], Duration::from_secs(30)).await;
    let left = moved(&three, &back);
    println!(
        "2 -> 3 moved {} of 16 partitions ({joined:?}); 3 -> 2 moved {} ({left:?})",
        joined.len(),
        left.len()
    );
    assert!(
        (2..=10).contains(&joined.len()),
        "about a third moves on a join, not all: {}",
        joined.len()
    );
    let mut left_sorted = left.clone();
    left_sorted.sort();
    let mut joined_sorted = joined.clone();
    joined_sorted.sort();
    assert_eq!(
        left_sorted, joined_sorted,
        "the leaver's partitions, and only those, move back"
    );
    assert_eq!(
        back, two,
        "the assignment over the same members is the same"
    );

    let events = wait_for_output(&server, total, Duration::from_secs(30)).await;
    assert_equals_replay(&events, &expected, &dir, &["hub-a", "hub-b", "hub-c"]);
    a.stop();
    b.stop();
}

/// An owner paused past its lease (SIGSTOP) loses its partitions to the other instance; when it
/// runs again (SIGCONT) it publishes nothing for them: its fence closed while it was stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_owner_resumed_after_its_lease_publishes_nothing_for_the_partitions_it_lost() {
    let (server, dir, init_config) = initialised("cluster-stale");
    let mut a = Instance::start(&server, &dir, "hub-a");
    let mut b = Instance::start(&server, &dir, "hub-b");
    wait_for_owners(&server, &["hub-a", "hub-b"], Duration::from_secs(30)).await;

    let readings = fleet_readings(40, 12);
    let expected = replayed(&init_config, &readings);
    let total: usize = expected.values().map(Vec::len).sum();
    let (first, second) = readings.split_at(readings.len() / 2);
    publish_all(&server, first).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let sent = r#"weir_sink_sent_total{sink="hub"}"#;
    let sent_before = a.metric(sent);
    assert!(
        sent_before > 0.0,
        "hub-a published its share before the pause"
    );
    a.signal("STOP");
    wait_for_owners(&server, &["hub-b"], Duration::from_secs(30)).await;
    // hub-a's old partitions' readings arrive while it is stopped: hub-b derives their events.
    publish_all(&server, second).await;
    let events = wait_for_output(&server, total, Duration::from_secs(30)).await;
    assert_eq!(events.len(), total, "hub-b published every event");
    a.signal("CONT");
    // hub-a wakes with the readings of its old partitions queued and its leases lapsed.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sent_after = a.metric(sent);
    assert_eq!(
        sent_after,
        sent_before,
        "hub-a published nothing once its leases lapsed\n{}",
        logs(&dir, &["hub-a"])
    );
    let resumed = a.metric("weir_cluster_partitions_owned");
    // It rejoins and gets its share back, with the state hub-b saved.
    wait_for_owners(&server, &["hub-a", "hub-b"], Duration::from_secs(30)).await;
    let log = std::fs::read_to_string(dir.join("hub-a.log")).unwrap_or_default();
    assert!(
        log.contains("leases lost"),
        "hub-a saw its leases lost:\n{log}"
    );
    println!("hub-a after SIGCONT: {resumed} partitions owned at +300 ms; sent {sent_before} -> {sent_after}");
    let events = output_stream(&server).await;
    assert_eq!(
        by_device(&events),
        expected,
        "every event once, in per-device order"
    );
    a.stop();
    b.stop();
}

/// Stopped (SIGTERM) while its NATS server is gone, an instance exits within its lease TTL
/// after its pipeline stops, rather than waiting out every save's and release's timeout: its
/// claims expire by themselves by then, and its partitions' previous snapshots stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_stopped_while_nats_is_away_exits_within_its_lease() {
    let (mut server, dir, _) = initialised("cluster-away");
    let lease = Duration::from_secs(4);
    let mut a = Instance::start_with(&server, &dir, "hub-a", lease);
    wait_for_owners(&server, &["hub-a"], Duration::from_secs(30)).await;
    publish_all(&server, &fleet_readings(20, 4)).await;
    assert!(
        wait_until(Duration::from_secs(30), || {
            a.metric("weir_cluster_state_saved_total") > 0.0
        })
        .await,
        "hub-a saved its partitions' state"
    );
    server.kill();
    // Past a round's start (every lease_ttl / 4), so the stop finds one waiting on NATS.
    tokio::time::sleep(lease / 4 + Duration::from_millis(500)).await;
    let mut process = a.process.take().expect("running");
    a.signal_pid(process.0.id(), "TERM");
    let stopped = std::time::Instant::now();
    // The pipeline's own bound (10 s) plus the lease, with room for a loaded machine.
    let bound = Duration::from_secs(10) + lease + Duration::from_secs(6);
    let status = loop {
        if let Some(status) = process.0.try_wait().expect("wait") {
            break Some(status);
        }
        if stopped.elapsed() > bound {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let took = stopped.elapsed();
    assert!(
        status.is_some(),
        "hub-a had not exited {took:?} after SIGTERM with NATS gone\n{}",
        logs(&dir, &["hub-a"])
    );
    let log = std::fs::read_to_string(dir.join("hub-a.log")).unwrap_or_default();
    assert!(
        log.contains("expire by themselves"),
        "hub-a said its claims expire by themselves:\n{log}"
    );
    println!("hub-a exited {took:?} after SIGTERM with NATS gone (lease {lease:?})");
}

/// `POST /api/reload` in cluster mode: a changed rule restarts the instance's term on the new
/// rules (the changed rule from no state), so the output holds what the old rules derive from
/// the readings before the reload and what the new ones derive from those after; a change
/// outside `[rules]` is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_switches_the_cluster_to_the_new_rules_and_refuses_other_changes() {
    let (server, dir, init_config) = initialised("cluster-reload");
    let mut a = Instance::start(&server, &dir, "hub-a");
    wait_for_owners(&server, &["hub-a"], Duration::from_secs(30)).await;

    let readings = fleet_readings(10, 12);
    let (before, after) = readings.split_at(readings.len() / 2);
    let mut expected = replayed(&init_config, before);
    let old_total: usize = expected.values().map(Vec::len).sum();
    publish_all(&server, before).await;
    wait_for_output(&server, old_total, Duration::from_secs(30)).await;

    let config = dir.join("hub-a.toml");
    let text = std::fs::read_to_string(&config).expect("read config");
    let hotter = text.replace("enter_above = 30.0", "enter_above = 32.0");
    assert_ne!(hotter, text, "the overheat threshold is in the config");
    std::fs::write(&config, &hotter).expect("write config");
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], a.http_port));
    let (status, body) = common::http_post(addr, "/api/reload").await;
    let report: serde_json::Value = serde_json::from_str(&body).expect("a JSON report");
    assert_eq!(status, 200, "{report}");
    assert_eq!(
        report["started"],
        serde_json::json!(["overheat"]),
        "{report}"
    );
    assert_eq!(report["kept"], serde_json::json!(["climate"]), "{report}");

    // The new rules, from no overheat state: what `weir replay` derives with them.
    let new_config = dir.join("new.toml");
    std::fs::write(
        &new_config,
        std::fs::read_to_string(&init_config)
            .expect("read config")
            .replace("enter_above = 30.0", "enter_above = 32.0"),
    )
    .expect("write config");
    let with_new_rules = replayed(&new_config, after);
    assert_ne!(
        with_new_rules,
        replayed(&init_config, after),
        "the change makes a difference to the second half"
    );
    for (device, ids) in with_new_rules {
        expected.entry(device).or_default().extend(ids);
    }
    let total: usize = expected.values().map(Vec::len).sum();
    assert!(
        total > old_total,
        "the new rules derive events from the second half"
    );
    println!(
        "{old_total} events before the reload, {} after",
        total - old_total
    );
    publish_all(&server, after).await;
    let events = wait_for_output(&server, total, Duration::from_secs(30)).await;
    assert_eq!(
        by_device(&events),
        expected,
        "old rules before the reload, new ones after\n{}",
        logs(&dir, &["hub-a"])
    );

    std::fs::write(
        &config,
        hotter.replace("partitions = 16", "partitions = 32"),
    )
    .expect("write config");
    let (status, body) = common::http_post(addr, "/api/reload").await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body.contains("[cluster]"),
        "the refusal names the section: {body}"
    );
    assert_eq!(
        a.metric("weir_cluster_handovers_total"),
        0.0,
        "a reload is not a handover"
    );
    a.stop();
}

/// The same readings through one `weir run` and through three, each cluster on its own server:
/// both output streams hold exactly the events `weir replay` derives, by id and per-device order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_instance_and_three_derive_what_replay_derives() {
    let readings = fleet_readings(30, 12);
    let mut expected = None;
    for names in [&["hub-solo"][..], &["hub-a", "hub-b", "hub-c"][..]] {
        let server = server_for_example();
        let dir = temp_dir("cluster-n");
        let init_config = dir.join("init.toml");
        std::fs::write(&init_config, cluster_config(&server, None)).expect("write config");
        weir(&["cluster", "init", "--config"], &init_config);
        let want = expected
            .get_or_insert_with(|| replayed(&init_config, &readings))
            .clone();
        let total: usize = want.values().map(Vec::len).sum();
        let mut instances: Vec<Instance> = names
            .iter()
            .map(|name| Instance::start(&server, &dir, name))
            .collect();
        wait_for_owners(&server, names, Duration::from_secs(30)).await;
        publish_all(&server, &readings).await;
        let events = wait_for_output(&server, total, Duration::from_secs(30)).await;
        assert_eq!(
            by_device(&events),
            want,
            "{} instance(s): the output stream equals replay\n{}",
            names.len(),
            logs(&dir, names)
        );
        assert_eq!(events.len(), total);
        for instance in &mut instances {
            instance.stop();
        }
    }
}
