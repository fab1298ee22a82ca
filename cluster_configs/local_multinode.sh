#!/usr/bin/env bash
# A three-node Ray cluster on ONE machine, for trying rhmapper's multi-node behaviour
# (replicas spilling from the head onto worker nodes, pinning with custom resources)
# without any cloud account.
#
#   bash cluster_configs/local_multinode.sh start    # prints RAY_ADDRESS=... and the dashboard URL
#   bash cluster_configs/local_multinode.sh status   # `ray status` against this cluster (its view
#                                                    # lags: the last node shows after a few seconds)
#   bash cluster_configs/local_multinode.sh stop     # stops exactly what `start` started, by pid
#
# Layout (5 CPUs in total):
#   head      --num-cpus=1                                  GCS, dashboard (127.0.0.1 only), raylet
#   worker_a  --num-cpus=2 --resources='{"worker_a": 1}'    raylet; the custom resource lets
#                                                           rm.Env(compute={"worker_a": 1}) pin here
#   worker_b  --num-cpus=2                                  raylet
#
# Then, for example:
#   export RAY_ADDRESS=10.0.0.5:26380           # as printed by `start` (node IP:RHM_PORT_BASE)
#   export RAY_AUTH_MODE=token                  # as printed by `start`; see "Token authentication"
#   python -c 'import rhmapper as rm; print(rm.mapper(abs, replicas=4,
#              env=rm.Env(name="e", compute={"CPU": 0.5})).map(range(-8, 0)))'
#   ray job submit --address http://127.0.0.1:8266 --working-dir examples/job_submit -- python job.py
#
# How it works on Ray 2.60:
#   * Every node is its own `ray start --block` process, started with `setsid` so that it leads
#     a new session: the raylet, agents and worker processes it spawns stay in that session.
#     The session leaders' pids are recorded in $RHM_CLUSTER_DIR/pids; `stop` sends SIGTERM
#     to them (Ray then shuts its own children down), waits, and SIGKILLs anything left in
#     those sessions. Nothing is killed by name and no global `ray stop` is run, so another
#     Ray on the same machine is untouched.
#   * All three raylets share the machine's node IP (Ray replaces 127.0.0.1 by it, so the
#     address printed is e.g. 10.0.0.5:26380) and are told apart by their ports: each node gets
#     its own node-manager, object-manager, dashboard-agent, metrics, runtime-env-agent and
#     worker port range, derived from RHM_PORT_BASE. Nodes are started one after another:
#     started together, two raylets pick the same socket/log file names and one dies.
#   * The GCS listens on all interfaces (Ray does that); token auth (below) is what keeps
#     others out. The dashboard is bound to 127.0.0.1 only.
#   * Worker nodes do not take --temp-dir: a non-head node uses the head's temp dir (read from
#     the GCS). The head's temp dir is $RHM_CLUSTER_DIR/ray, not /tmp/ray, so this cluster
#     never overwrites /tmp/ray/ray_current_cluster of another local Ray.
#   * Token authentication: Ray 2.60 turns token auth on by default for new local clusters
#     (`ray start --head` does so whenever ~/.ray/auth_token exists). This script makes it
#     explicit: it exports RAY_AUTH_MODE=token to every node (unless you set RAY_AUTH_MODE
#     yourself) and makes sure a token exists (`ray get-auth-token --generate` writes
#     ~/.ray/auth_token only if there is none). Every client -- drivers, `ray status`,
#     `ray job submit` -- needs RAY_AUTH_MODE=token in its environment (with it unset, Ray 2.60
#     clients connect without a token and are refused, even when ~/.ray/auth_token exists) and
#     the same token: run them as the same user (they read ~/.ray/auth_token), or pass
#     RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH. Set RAY_AUTH_MODE=disabled before `start` to opt
#     out (then anyone who can reach the ports can run code: only do that on a private box).
#
# Settings (environment variables):
#   RHM_CLUSTER_DIR   state dir: pids, logs, Ray temp dir        (default /tmp/rhm_multinode)
#                     keep it short: Ray's unix socket paths live under it.
#   RHM_PORT_BASE     first port of the block this cluster uses  (default 26380; uses BASE..BASE+399)
#                     GCS = BASE, ray client server = BASE+1, per node i (0 head, 1 worker_a,
#                     2 worker_b): BASE+10+10*i .. +5 for raylet/agents, BASE+100+100*i .. +99
#                     for worker processes.
#   RHM_DASHBOARD_PORT dashboard port, bound to 127.0.0.1        (default 8266, so as not to clash
#                     with a default Ray on 8265)
#   RHM_OBJECT_STORE_BYTES object store size per node            (default 268435456 = 256 MiB)
#   RAY               the `ray` executable                       (default: `ray` on PATH)
set -euo pipefail

CLUSTER_DIR="${RHM_CLUSTER_DIR:-/tmp/rhm_multinode}"
PORT_BASE="${RHM_PORT_BASE:-26380}"
DASHBOARD_PORT="${RHM_DASHBOARD_PORT:-8266}"
OBJECT_STORE_BYTES="${RHM_OBJECT_STORE_BYTES:-268435456}"
RAY_BIN="${RAY:-ray}"
GCS_PORT="$PORT_BASE"
CLIENT_PORT=$((PORT_BASE + 1))
PID_FILE="$CLUSTER_DIR/pids"
LOG_DIR="$CLUSTER_DIR/logs"
RAY_TMP="$CLUSTER_DIR/ray"
START_TIMEOUT_S="${RHM_START_TIMEOUT_S:-90}"
STOP_TIMEOUT_S="${RHM_STOP_TIMEOUT_S:-30}"

# Token auth on unless the caller decided otherwise (see the header).
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
# A local dev cluster has no traffic to drain: make SIGTERM shut a node down at once.
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-0}"
export RAY_USAGE_STATS_ENABLED=0

die() { echo "local_multinode.sh: $*" >&2; exit 1; }

# Ports for node i: raylet, object manager, dashboard agent http/grpc, metrics, runtime env agent,
# and its own worker port range.
node_port_args() {
    local i=$1 p=$((PORT_BASE + 10 + 10 * $1)) w=$((PORT_BASE + 100 + 100 * $1))
    echo "--node-manager-port=$p --object-manager-port=$((p + 1))" \
         "--dashboard-agent-listen-port=$((p + 2)) --dashboard-agent-grpc-port=$((p + 3))" \
         "--metrics-export-port=$((p + 4)) --runtime-env-agent-port=$((p + 5))" \
         "--min-worker-port=$w --max-worker-port=$((w + 99))"
}

port_in_use() {  # true if something listens on 127.0.0.1:$1
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Every live (non-zombie) pid whose session id is one of the recorded session leaders,
# the leaders included. A leader that is still running must still be a `ray start` (guards
# against a recycled pid); a dead or zombie leader's session can only hold our leftovers,
# since Linux does not reuse a pid while it is still some process's session id.
session_pids() {
    [[ -f "$PID_FILE" ]] || return 0
    local sids="" pid cmd
    for pid in $(awk '{print $2}' "$PID_FILE"); do
        cmd=$( { tr '\0' ' ' <"/proc/$pid/cmdline"; } 2>/dev/null || true)
        if [[ -n "$cmd" && "$cmd" != *"ray start"* ]]; then
            continue
        fi
        sids+="${sids:+|}$pid"
    done
    [[ -n "$sids" ]] || return 0
    ps -eo pid=,sid=,stat= | awk -v re="^($sids)\$" '$2 ~ re && $3 !~ /^Z/ {print $1}'
}

# Start one node as `setsid ray start --block ...` in the background and record its pid.
# (In a non-interactive shell a background job is not a process-group leader, so setsid
# does not fork and $! is the session leader itself; checked below.)
launch() {
    local name=$1; shift
    setsid "$RAY_BIN" start --block "$@" >"$LOG_DIR/$name.log" 2>&1 </dev/null &
    local pid=$!
    echo "$name $pid" >>"$PID_FILE"
    local sid
    sid=$(ps -o sid= -p "$pid" | tr -d ' ' || true)
    [[ "$sid" == "$pid" ]] || sleep 0.5
    sid=$(ps -o sid= -p "$pid" | tr -d ' ' || true)
    [[ "$sid" == "$pid" ]] || { cmd_stop >/dev/null 2>&1 || true; die "$name (pid $pid) did not start its own session; see $LOG_DIR/$name.log"; }
}

# Wait until `ray start --block` for $1 reports that the node is up.
wait_started() {
    local name=$1 pid=$2 deadline=$((SECONDS + START_TIMEOUT_S))
    until grep -q "Ray runtime started" "$LOG_DIR/$name.log" 2>/dev/null; do
        if ! kill -0 "$pid" 2>/dev/null || (( SECONDS > deadline )); then
            echo "---- $LOG_DIR/$name.log" >&2; tail -n 30 "$LOG_DIR/$name.log" >&2 || true
            cmd_stop >/dev/null 2>&1 || true
            die "$name failed to start"
        fi
        sleep 0.5
    done
}

cmd_start() {
    command -v "$RAY_BIN" >/dev/null || die "'$RAY_BIN' not found; activate the venv with Ray or set RAY=/path/to/ray"
    if [[ -n "$(session_pids)" ]]; then
        die "already running (pids in $PID_FILE); run '$0 stop' first"
    fi
    for port in "$GCS_PORT" "$CLIENT_PORT" "$DASHBOARD_PORT"; do
        port_in_use "$port" && die "port $port is in use; set RHM_PORT_BASE / RHM_DASHBOARD_PORT"
    done
    mkdir -p "$LOG_DIR" "$RAY_TMP"
    rm -rf "$RAY_TMP"/session_2*  # Ray session dirs of earlier runs of this script (logs, spill)
    : >"$PID_FILE"

    if [[ "${RAY_AUTH_MODE,,}" == "token" && -z "${RAY_AUTH_TOKEN:-}" && -z "${RAY_AUTH_TOKEN_PATH:-}" ]]; then
        # Creates ~/.ray/auth_token only if it does not exist yet; never replaces a token.
        "$RAY_BIN" get-auth-token --generate >/dev/null 2>&1 || die "could not create an auth token"
    fi

    local common=(--object-store-memory="$OBJECT_STORE_BYTES" --disable-usage-stats)
    # shellcheck disable=SC2046  # node_port_args is meant to be word-split
    launch head --head --port="$GCS_PORT" --ray-client-server-port="$CLIENT_PORT" \
        --temp-dir="$RAY_TMP" --num-cpus=1 --num-gpus=0 \
        --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
        "${common[@]}" $(node_port_args 0)
    wait_started head "$(awk '$1=="head"{print $2}' "$PID_FILE")"
    # The head writes its GCS address (node IP:port) into its temp dir.
    local address
    address=$(cat "$RAY_TMP/ray_current_cluster" 2>/dev/null) || { cmd_stop >/dev/null 2>&1 || true; die "head wrote no $RAY_TMP/ray_current_cluster"; }

    # shellcheck disable=SC2046
    launch worker_a --address="$address" --num-cpus=2 --num-gpus=0 --resources='{"worker_a": 1}' \
        "${common[@]}" $(node_port_args 1)
    wait_started worker_a "$(awk '$1=="worker_a"{print $2}' "$PID_FILE")"
    # shellcheck disable=SC2046
    launch worker_b --address="$address" --num-cpus=2 --num-gpus=0 \
        "${common[@]}" $(node_port_args 2)
    wait_started worker_b "$(awk '$1=="worker_b"{print $2}' "$PID_FILE")"

    echo "RAY_ADDRESS=$address" >"$CLUSTER_DIR/env"
    echo "RAY_AUTH_MODE=$RAY_AUTH_MODE" >>"$CLUSTER_DIR/env"
    echo "Started a 3-node Ray cluster (1 + 2 + 2 CPUs); pids in $PID_FILE, logs in $LOG_DIR."
    echo "Use it with (also saved in $CLUSTER_DIR/env):"
    echo "RAY_ADDRESS=$address"
    echo "RAY_AUTH_MODE=$RAY_AUTH_MODE"
    echo "Dashboard / job submission: http://127.0.0.1:$DASHBOARD_PORT"
    echo "Stop it with: bash $0 stop"
}

cmd_stop() {
    if [[ ! -f "$PID_FILE" ]]; then
        echo "not running (no $PID_FILE)"
        return 0
    fi
    # Workers first, then the head: SIGTERM makes each `ray start --block` stop its own children.
    local name pid alive
    alive=" $(session_pids | tr '\n' ' ') "
    for name in worker_b worker_a head; do
        pid=$(awk -v n="$name" '$1==n{print $2}' "$PID_FILE")
        if [[ -n "$pid" && "$alive" == *" $pid "* ]]; then
            kill -TERM "$pid" 2>/dev/null || true
            [[ $name == head ]] || sleep 1  # let a worker node leave before the head goes
        fi
    done
    local deadline=$((SECONDS + STOP_TIMEOUT_S)) left
    while left=$(session_pids) && [[ -n "$left" ]] && (( SECONDS < deadline )); do
        sleep 0.5
    done
    if [[ -n "$left" ]]; then
        echo "SIGKILL to leftover processes: $(echo $left)"
        # shellcheck disable=SC2086
        kill -KILL $left 2>/dev/null || true
        sleep 0.5
        left=$(session_pids)
        [[ -z "$left" ]] || die "processes still alive: $(echo $left)"
    fi
    rm -f "$PID_FILE" "$CLUSTER_DIR/env"
    echo "stopped"
}

cmd_status() {
    [[ -f "$PID_FILE" ]] || die "not running (no $PID_FILE)"
    [[ -f "$CLUSTER_DIR/env" ]] || die "not started yet (no $CLUSTER_DIR/env)"
    "$RAY_BIN" status --address="$(sed -n 's/^RAY_ADDRESS=//p' "$CLUSTER_DIR/env")"
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
