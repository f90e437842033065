#!/usr/bin/env bash
# Runs a demo (Mosquitto, weir, the simulator, a few bad and late readings) with a Prometheus
# scraping weir every second, then renders the dashboard's panels from Prometheus into
# dashboards/weir-overview.png. Everything listens on 127.0.0.1 only.
#
#   dashboards/demo-render.sh [minutes]      # default 4; needs mosquitto, prometheus, matplotlib
set -euo pipefail
cd "$(dirname "$0")/.."
minutes=${1:-4}
export PATH="$PATH:/usr/sbin"
cargo build --release --bin weir
weir=target/release/weir
dir=$(mktemp -d)
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
mqtt=$(free_port); http=$(free_port); prom=$(free_port)

printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\n' "$mqtt" > "$dir/mosquitto.conf"
mosquitto -c "$dir/mosquitto.conf" > "$dir/mosquitto.log" 2>&1 & pids+=($!)
cat > "$dir/prometheus.yml" <<YAML
global: {scrape_interval: 1s, evaluation_interval: 1s}
rule_files: [$PWD/dashboards/prometheus/weir-alerts.yml]
scrape_configs:
  - job_name: weir
    static_configs: [{targets: ['127.0.0.1:$http']}]
YAML
prometheus --config.file="$dir/prometheus.yml" --web.listen-address="127.0.0.1:$prom" \
  --storage.tsdb.path="$dir/data" --log.level=warn > "$dir/prometheus.log" 2>&1 & pids+=($!)
sleep 1
"$weir" run --config config/example.toml --broker "mqtt://127.0.0.1:$mqtt" \
  --metrics-addr "127.0.0.1:$http" > "$dir/weir.log" 2>&1 & pids+=($!)
sleep 1

# A fleet whose rate steps up half-way, so the throughput and latency panels show a change.
seconds=$(python3 -c "print(int($minutes * 60))")
"$weir" simulate --broker "mqtt://127.0.0.1:$mqtt" --devices 500 --rate 2000 --duration "$((seconds / 2))s" > /dev/null 2>&1 & pids+=($!)
( sleep $((seconds / 2)); exec "$weir" simulate --broker "mqtt://127.0.0.1:$mqtt" --devices 500 --rate 6000 --duration "$((seconds / 2))s" ) > /dev/null 2>&1 & pids+=($!)

# Now and then a device with bad firmware and one with a lagging clock.
(
  end=$((SECONDS + seconds))
  while [ $SECONDS -lt $end ]; do
    now=$(date +%s%3N)
    mosquitto_pub -p "$mqtt" -t sensors/plant-9/bad-fw/telemetry -m 'temperature=21.5'
    mosquitto_pub -p "$mqtt" -t sensors/plant-9/bad-fw/telemetry -m '{"ts": "yesterday", "temperature": 21.5}'
    mosquitto_pub -p "$mqtt" -t sensors/plant-9/slow-clock/telemetry -m "{\"ts\": $((now - 30000)), \"temperature\": 22}"
    mosquitto_pub -p "$mqtt" -t sensors/plant-9/slow-clock/telemetry -m "{\"ts\": $((now - 45000)), \"temperature\": 22}"
    sleep 3
  done
) & pids+=($!)

echo "demo running for $minutes min (Prometheus on 127.0.0.1:$prom, weir on 127.0.0.1:$http)"
sleep "$seconds"
python3 dashboards/render.py --prometheus "http://127.0.0.1:$prom" --minutes "$minutes" \
  --out dashboards/weir-overview.png
