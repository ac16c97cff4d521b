#!/usr/bin/env bash
# Example hook for parkway's exec provider: simulates a cloud on this machine.
#
# One script serves every operation (the scaler runs it as `example-cloud.sh OPERATION`).
# A "machine" is a parkway-engine process started in its own session; its state lives in
# $PARKWAY_HOOK_STATE_DIR (default ${TMPDIR:-/tmp}/parkway-example-cloud):
#   <instance>.pid      pid of the running engine (absent while parked)
#   <instance>.parked   present while parked
#   <instance>.log      the engine's output
#   <instance>.json     the last request the scaler sent (for inspection)
#
# Protocol (docs/internals/scaler.md, "exec hook protocol"): one JSON object on stdin,
# one JSON object on stdout, exit 0. Anything on stderr is logged by the scaler line by
# line. The scaler also sets PARKWAY_HOOK_OP, PARKWAY_INSTANCE_ID, PARKWAY_PROVIDER_ID,
# PARKWAY_FUNCTION, PARKWAY_SPEC, PARKWAY_REDIS_URL, PARKWAY_ENGINE and
# PARKWAY_INSTANCE_TYPE, so a shell hook needs no JSON parser. A real hook would call a
# cloud CLI here (create/stop/start/delete an instance) and start the engine on it with
# --worker-id "$PARKWAY_INSTANCE_ID".
set -euo pipefail

op=${1:-${PARKWAY_HOOK_OP:?}}
id=${PARKWAY_INSTANCE_ID:?}
state=${PARKWAY_HOOK_STATE_DIR:-${TMPDIR:-/tmp}/parkway-example-cloud}
mkdir -p "$state"
cat > "$state/$id.json"

answer() { # state [detail]
    printf '{"state":"%s","provider_id":"example-%s","address":"%s","detail":"%s"}\n' \
        "$1" "$id" "${ADDRESS:-}" "${2:-}"
}

running_pid() {
    local pid
    pid=$(cat "$state/$id.pid" 2>/dev/null) || return 1
    kill -0 "$pid" 2>/dev/null && echo "$pid"
}

start_engine() {
    # setsid: the engine must not die with this hook (the scaler kills the hook's process
    # group on timeout); its output goes to a file, never to our stdout.
    setsid "${PARKWAY_ENGINE:?}" --spec "${PARKWAY_SPEC:?}" --redis "${PARKWAY_REDIS_URL:?}" \
        --worker-id "$id" </dev/null >>"$state/$id.log" 2>&1 &
    echo $! > "$state/$id.pid"
    rm -f "$state/$id.parked"
    ADDRESS="pid $!"
    echo "started engine pid $! for $id" >&2
}

stop_engine() { # wait_seconds: SIGTERM (the engine drains), SIGKILL after the wait
    local pid i
    pid=$(running_pid) || { rm -f "$state/$id.pid"; return 0; }
    kill -TERM "$pid"
    for ((i = 0; i < $1 * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "engine $pid did not drain in $1 s; killing it" >&2
        kill -KILL "$pid"
    fi
    rm -f "$state/$id.pid"
}

case "$op" in
provision)
    start_engine
    answer running
    ;;
drain)
    pid=$(running_pid) && kill -TERM "$pid"
    answer draining
    ;;
park)
    stop_engine 120
    touch "$state/$id.parked"
    answer parked
    ;;
unpark)
    [[ -e "$state/$id.parked" ]] || { echo "instance $id is not parked" >&2; exit 3; }
    start_engine
    answer running
    ;;
terminate)
    stop_engine 30
    rm -f "$state/$id.parked" "$state/$id.json"
    answer terminated
    ;;
status)
    if pid=$(running_pid); then
        ADDRESS="pid $pid" answer running
    elif [[ -e "$state/$id.parked" ]]; then
        answer parked
    else
        answer terminated
    fi
    ;;
*)
    echo "unknown operation: $op" >&2
    exit 2
    ;;
esac
