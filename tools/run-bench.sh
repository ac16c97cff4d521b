#!/usr/bin/env bash
# make bench: runs every CPU benchmark of a build folder in turn and collects their last
# lines (one JSON object each) in <build>/bench/results.jsonl. Benchmarks are for an idle
# machine: numbers taken while something else runs are not comparable (docs/PERFORMANCE.md).
# GPU figures come from tests/gpu/check.sh on a GPU machine. Exit 1 if any benchmark failed.
set -uo pipefail
build="${1:-build}"
dir="$build/bench"
out="$dir/results.jsonl"
if [[ ! -d "$dir" ]]; then
    echo "run-bench: no $dir (build first: make build)" >&2
    exit 2
fi
: >"$out"
status=0
run() {
    local name="$1"
    shift
    if [[ ! -x "$dir/$name" ]]; then
        echo "run-bench: $name not built, skipped" >&2
        return
    fi
    echo "=== $name $*"
    local log
    log=$(mktemp)
    "$dir/$name" "$@" | tee "$log"
    local rc=${PIPESTATUS[0]}
    if [[ $rc -eq 0 ]]; then
        tail -n 1 "$log" >>"$out"
    elif [[ $rc -eq 77 ]]; then
        echo "run-bench: $name skipped (exit 77)" >&2
    else
        echo "run-bench: $name failed (exit $rc)" >&2
        status=1
    fi
    rm -f "$log"
}
run bench_kernels
run bench_engine --reps 3
run bench_router --seconds 3
# the router's overhead at 16 connections as the median of 7 paired (raw, chat) rounds
run bench_router --seconds 2 --conns 16,16,16,16,16,16,16
run bench_coldstart --runs 5
run bench_batch
echo "run-bench: JSON lines in $out"
exit "$status"
