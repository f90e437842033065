#!/usr/bin/env python3
"""Writes dashboards/weir-overview.json: the weir overview dashboard for Grafana.

The dashboard is generated so that every panel has the same shape (datasource variable, instance
filter, units, legends) and so a review reads this list rather than 1,000 lines of JSON. Every
`expr` here is run against a real Prometheus scraping a real weir by tests/dashboards.rs.

    python3 dashboards/generate.py        # rewrites dashboards/weir-overview.json
"""
import json
import pathlib

RATE = "$__rate_interval"


def sel(metric, extra=""):
    """metric{instance=~"$instance",extra}"""
    inner = 'instance=~"$instance"' + ("," + extra if extra else "")
    return metric + "{" + inner + "}"


# (title, unit, description, [(expr, legend)])
PANELS = [
    ("Throughput", None, None, None),
    ("Readings in / events out per second", "ops",
     "MQTT messages received per input, derived events published per rule.", [
         (f"sum by (input) (rate({sel('weir_readings_received_total')}[{RATE}]))", "in: {{input}}"),
         (f"sum by (rule) (rate({sel('weir_events_published_total')}[{RATE}]))", "out: {{rule}}"),
     ]),
    ("Events per rule and kind", "ops",
     "Derived events produced by the rules (before publishing).", [
         (f"sum by (rule, kind) (rate({sel('weir_events_emitted_total')}[{RATE}]))", "{{rule}} ({{kind}})"),
     ]),
    ("Latency", None, None, None),
    ("Processing latency percentiles (arrival to publish)", "s",
     "Histogram quantiles over all instances, and the exact recent p50/p99/p999 weir computes from hdrhistogram.", [
         (f"histogram_quantile(0.5, sum by (le) (rate({sel('weir_processing_latency_seconds_bucket')}[{RATE}])))", "p50 (buckets)"),
         (f"histogram_quantile(0.99, sum by (le) (rate({sel('weir_processing_latency_seconds_bucket')}[{RATE}])))", "p99 (buckets)"),
         (f"histogram_quantile(0.999, sum by (le) (rate({sel('weir_processing_latency_seconds_bucket')}[{RATE}])))", "p99.9 (buckets)"),
         (f"max by (quantile) ({sel('weir_processing_latency_recent_seconds')})", "exact q{{quantile}}"),
     ]),
    ("Event latency by rule (event time to publish)", "s",
     "From the payload's event time to the publish: includes device clock skew and, for windows, the window length.", [
         (f"histogram_quantile(0.99, sum by (le, rule) (rate({sel('weir_event_latency_seconds_bucket')}[{RATE}])))", "p99 {{rule}} (buckets)"),
         ("max by (rule) (" + sel("weir_event_latency_recent_seconds", 'quantile="0.5"') + ")", "exact p50 {{rule}}"),
     ]),
    ("Errors", None, None, None),
    ("Decode errors by reason", "ops",
     "Payloads that could not become readings; each is skipped and logged (rate-limited).", [
         (f"sum by (reason) (rate({sel('weir_decode_errors_total')}[{RATE}]))", "{{reason}}"),
     ]),
    ("Dead letters and duplicates", "ops",
     "Readings set aside on the dead-letter path by reason, and redelivered readings dropped.", [
         (f"sum by (reason) (rate({sel('weir_dead_letters_total')}[{RATE}]))", "dead letter: {{reason}}"),
         (f"sum by (input) (rate({sel('weir_duplicates_dropped_total')}[{RATE}]))", "duplicates: {{input}}"),
     ]),
    ("Late data and time", None, None, None),
    ("Late, out-of-order and refused readings", "ops",
     "Late: the reading's window had already fired. Out of order: older than the device's last. Refused: device limit.", [
         (f"sum by (rule) (rate({sel('weir_readings_late_total')}[{RATE}]))", "late: {{rule}}"),
         (f"sum by (rule) (rate({sel('weir_readings_out_of_order_total')}[{RATE}]))", "out of order: {{rule}}"),
         (f"sum by (reason) (rate({sel('weir_readings_refused_total')}[{RATE}]))", "refused: {{reason}}"),
     ]),
    ("Watermark lag", "s",
     "Wall clock minus the newest event time seen on the input. Grows when data stops or device clocks fall behind.", [
         (f"max by (input) ({sel('weir_watermark_lag_seconds')})", "{{input}}"),
     ]),
    ("MQTT", None, None, None),
    ("MQTT connection", "short",
     "1 while connected (source: intake, sink: publishing); reconnect attempts; active subscriptions.", [
         (f"max by (connection) ({sel('weir_mqtt_connected')})", "connected: {{connection}}"),
         (f"sum by (connection) (increase({sel('weir_mqtt_reconnects_total')}[{RATE}]))", "reconnects: {{connection}}"),
         (f"sum({sel('weir_mqtt_subscriptions_active')})", "subscriptions"),
     ]),
    ("Publishing", "ops",
     "Publish attempts, failures, and events dropped at the outbox cap, per second.", [
         (f"sum(rate({sel('weir_publish_attempts_total')}[{RATE}]))", "attempts"),
         (f"sum by (rule) (rate({sel('weir_publish_errors_total')}[{RATE}]))", "errors: {{rule}}"),
         (f"sum by (policy) (rate({sel('weir_outbox_dropped_total')}[{RATE}]))", "outbox dropped: {{policy}}"),
     ]),
    ("Sinks", None, None, None),
    ("Sink delivery", "ops",
     "Per sink (mqtt is the [broker]; the others are [sinks.*]): events handed over, acknowledged by the service, retried, and refused for good (dead-lettered).", [
         (f"sum by (sink) (rate({sel('weir_sink_sent_total')}[{RATE}]))", "sent: {{sink}}"),
         (f"sum by (sink) (rate({sel('weir_sink_confirmed_total')}[{RATE}]))", "acknowledged: {{sink}}"),
         (f"sum by (sink) (rate({sel('weir_sink_retries_total')}[{RATE}]))", "retries: {{sink}}"),
         (f"sum by (sink, reason) (rate({sel('weir_sink_dead_letters_total')}[{RATE}]))", "dead letters: {{sink}} ({{reason}})"),
     ]),
    ("Sink outbox and reachability", "short",
     "Events each sink holds (queued or awaiting acknowledgement), and 1 while its service takes events.", [
         (f"max by (sink) ({sel('weir_sink_outbox_messages')})", "outbox: {{sink}}"),
         (f"min by (sink) ({sel('weir_sink_up')})", "up: {{sink}}"),
         (f"sum by (sink, policy) (rate({sel('weir_outbox_dropped_total')}[{RATE}]))", "dropped: {{sink}} ({{policy}})"),
     ]),
    ("Sink latency (event time to acknowledgement)", "s",
     "How long after its event time each sink's service acknowledged an event.", [
         (f"histogram_quantile(0.99, sum by (le, sink) (rate({sel('weir_sink_latency_seconds_bucket')}[{RATE}])))", "p99 (buckets): {{sink}}"),
         (f"max by (sink, quantile) ({sel('weir_sink_latency_recent_seconds')})", "exact q{{quantile}}: {{sink}}"),
     ]),
    ("Queues and state", None, None, None),
    ("Queue depth and outbox", "short",
     "Messages waiting in front of each stage (of its capacity), and events held in the outbox.", [
         (f"max by (stage) ({sel('weir_queue_depth')})", "depth: {{stage}}"),
         (f"max by (stage) ({sel('weir_queue_capacity')})", "capacity: {{stage}}"),
         (f"sum({sel('weir_outbox_messages')})", "outbox"),
     ]),
    ("Devices and open windows per rule", "short",
     "Devices with state in each rule, and windows not yet fired.", [
         (f"sum by (rule) ({sel('weir_rule_devices')})", "devices: {{rule}}"),
         (f"sum by (rule) ({sel('weir_windows_open')})", "open windows: {{rule}}"),
     ]),
    ("Cluster (NATS JetStream)", None, None, None),
    ("Partitions and handovers", "short",
     "[cluster]: partitions each instance serves, handovers it took part in, and failed lease renewals (an instance that misses them for 3/4 of lease_ttl stops publishing).", [
         (f"max by (instance) ({sel('weir_cluster_partitions_owned')})", "owned: {{instance}}"),
         (f"sum by (instance) (increase({sel('weir_cluster_handovers_total')}[{RATE}]))", "handovers: {{instance}}"),
         (f"sum by (instance) (increase({sel('weir_cluster_lease_renew_failures_total')}[{RATE}]))", "renew failures: {{instance}}"),
     ]),
    ("Lag and catch-up", "short",
     "Readings of the stream not yet delivered to each instance, and what its last handover replayed (readings, seconds).", [
         (f"max by (instance) ({sel('weir_cluster_lag_messages')})", "lag: {{instance}}"),
         (f"max by (instance) ({sel('weir_cluster_replayed_readings')})", "replayed readings: {{instance}}"),
         (f"max by (instance) ({sel('weir_cluster_replay_seconds')})", "replay seconds: {{instance}}"),
     ]),
    ("Lag per partition (the 10 most behind)", "short",
     "Readings of each partition in the stream not yet delivered to the instance that owns it; a partition that stays behind points at its owner or its consumer.", [
         (f"topk(10, max by (partition) ({sel('weir_cluster_partition_lag_messages')}))", "partition {{partition}}"),
     ]),
    ("Process", None, None, None),
    ("Memory", "bytes", "Resident memory of the weir process.", [
        (f"sum by (instance) ({sel('process_resident_memory_bytes')})", "resident {{instance}}"),
    ]),
    ("CPU and open files", "short", "CPU cores used, and open file descriptors.", [
        (f"sum by (instance) (rate({sel('process_cpu_seconds_total')}[{RATE}]))", "cpu cores {{instance}}"),
        (f"sum by (instance) ({sel('process_open_fds')})", "open fds {{instance}}"),
    ]),
]

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def panel(panel_id, title, unit, description, targets, x, y):
    return {
        "id": panel_id,
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": 12, "x": x, "y": y},
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "custom": {"lineWidth": 1, "fillOpacity": 10, "showPoints": "never"},
            },
            "overrides": [],
        },
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
        "targets": [
            {
                "datasource": DATASOURCE,
                "expr": expr,
                "legendFormat": legend,
                "range": True,
                "refId": chr(ord("A") + i),
            }
            for i, (expr, legend) in enumerate(targets)
        ],
    }


def build():
    panels = []
    y = 0
    x = 0
    panel_id = 1
    for title, unit, description, targets in PANELS:
        if targets is None:
            if x:
                y += 8
                x = 0
            panels.append({
                "id": panel_id, "type": "row", "title": title, "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": [],
            })
            y += 1
        else:
            panels.append(panel(panel_id, title, unit, description, targets, x, y))
            x = 12 - x
            if x == 0:
                y += 8
        panel_id += 1
    return {
        "uid": "weir-overview",
        "title": "weir overview",
        "description": "weir: throughput, latency, errors, late data, MQTT, queues and process. Generated by dashboards/generate.py.",
        "tags": ["weir", "mqtt", "iot"],
        "editable": True,
        "graphTooltip": 1,
        "refresh": "10s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-30m", "to": "now"},
        "timepicker": {},
        "annotations": {"list": []},
        "links": [],
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                },
                {
                    "name": "instance",
                    "label": "Instance",
                    "type": "query",
                    "datasource": DATASOURCE,
                    "query": {"query": "label_values(weir_build_info, instance)", "refId": "instance"},
                    "definition": "label_values(weir_build_info, instance)",
                    "includeAll": True,
                    "multi": True,
                    "allValue": ".*",
                    "current": {},
                    "refresh": 2,
                    "hide": 0,
                },
            ]
        },
        "panels": panels,
    }


if __name__ == "__main__":
    out = pathlib.Path(__file__).with_name("weir-overview.json")
    out.write_text(json.dumps(build(), indent=2) + "\n")
    print(f"wrote {out}")
