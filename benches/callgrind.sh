#!/usr/bin/env bash
# Instructions per reading of the pipeline bench's cases, counted by callgrind (stable on a
# shared machine, where criterion's timings are not). Only the decode call or the worker's
# `process` is counted, not payload generation.
#
#   benches/callgrind.sh [case ...]    # default: all four cases
#
# Built in the `profiling` profile: the release build (same LTO and codegen units) with its
# symbols, which --toggle-collect needs; the release profile itself is stripped.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(cargo bench --profile profiling --bench pipeline --no-run --message-format=json 2>/dev/null |
  sed -n 's/.*"executable":"\([^"]*pipeline-[^"]*\)".*/\1/p' | tail -1)
cases=("$@")
[ ${#cases[@]} -gt 0 ] || cases=(decode/json decode/cbor engine/json_realistic_alert_rate engine/json_hysteresis_tumbling)
out=$(mktemp -d)
for case in "${cases[@]}"; do
  case $case in
    decode/*) fn='weir::decode::FieldPlan::decode' ;;
    *) fn='weir::engine::worker::Worker::process' ;;
  esac
  file="$out/$(echo "$case" | tr / _).out"
  count=$(WEIR_BENCH_ONCE=$case valgrind --tool=callgrind --toggle-collect="$fn" \
    --callgrind-out-file="$file" "$bin" 2>/dev/null | awk '{print $2}')
  total=$(callgrind_annotate "$file" 2>/dev/null | awk '/PROGRAM TOTALS/{gsub(",","",$1); print $1}')
  echo "$case: $total instructions / $count = $((total / count)) per reading  ($file)"
done
