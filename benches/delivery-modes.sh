#!/usr/bin/env bash
# Side-by-side cost of the delivery modes: weir run against its own Mosquitto, fed by `weir simulate`.
# usage: benches/delivery-modes.sh MODE RATE SECONDS   (MODE: at_most_once | at_least_once)
# Needs `cargo build --release` first. Prints readings/s weir decoded and its CPU per reading.
set -u
MODE=$1; RATE=$2; SECS=$3
W="$(cd "$(dirname "$0")/.." && pwd)/target/release/weir"
PORT=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
MPORT=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
D=$(mktemp -d); chmod 777 $D
printf "listener $PORT 127.0.0.1\nallow_anonymous true\nmax_inflight_messages 1000\nmax_queued_messages 100000\n" > $D/m.conf
mosquitto -c $D/m.conf > $D/m.log 2>&1 & MP=$!
sleep 0.3
sed "s/mode = \"at_least_once\"/mode = \"$MODE\"/" "$(dirname "$0")/../config/example.toml" > $D/w.toml
if [ "$MODE" = at_most_once ]; then sed -i 's/clean_session = false/clean_session = true/; s/^qos = 1/qos = 0/' $D/w.toml; QOS=0; else QOS=1; fi
WEIR_LOG=warn $W run --config $D/w.toml --broker mqtt://127.0.0.1:$PORT --metrics-addr 127.0.0.1:$MPORT --state-dir $D/state > $D/w.log 2>&1 & WP=$!
sleep 0.5
$W simulate --broker mqtt://127.0.0.1:$PORT --devices 1000 --rate $RATE --duration $((SECS+2))s --qos $QOS > $D/s.log 2>&1 & SP=$!
sleep 1
m() { curl -s 127.0.0.1:$MPORT/metrics | awk '/^weir_readings_decoded_total/{print $2}'; }
cpu() { awk '{print ($14+$15)/100}' /proc/$WP/stat; }
a=$(m); c0=$(cpu); sleep $SECS; b=$(m); c1=$(cpu)
python3 -c "r=($b-$a)/$SECS; c=$c1-$c0; print(f'$MODE rate=$RATE: {r:,.0f} readings/s, cpu {c/$SECS*100:.0f}% of a core, {c/max(1,($b-$a))*1e6:.2f} us/reading')"
kill $SP $WP 2>/dev/null; wait $SP $WP 2>/dev/null; kill $MP; rm -rf $D
