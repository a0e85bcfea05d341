#!/usr/bin/env bash
# Stop the local Ray cluster that cluster/local-up.sh started, and nothing else.
#
# local-up.sh runs `ray start --head --block` as the leader of its own session and records its pid. SIGTERM to
# that process makes Ray stop all of the head's processes (GCS, raylet, dashboard, job drivers, workers); any
# that are still there after the grace period are killed by process group. `ray stop` is not used: it stops
# every Ray process on the machine, including Ray instances this script did not start. The pid file is believed only
# when the process it names is that head (this user's, `--temp-dir` this cluster's): a stale or planted one signals
# nothing.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TEMP_DIR="${RAY_TEMP_DIR:-/tmp/raytrain_yolo_ray}"
PID_FILE="$TEMP_DIR/local-up.pid"
GRACE="${GRACE:-40}"   # Ray drains a node for up to 30 s on SIGTERM unless told not to (local-up.sh does)
# shellcheck source=cluster/private.sh
source "$REPO/cluster/private.sh"

if [[ ! -f "$PID_FILE" ]]; then
    echo "no cluster started by local-up.sh ($PID_FILE not found)"
    exit 0
fi
[[ -O "$TEMP_DIR" && ! -L "$TEMP_DIR" ]] || { echo "error: $TEMP_DIR is not a folder of yours: not trusting its pid file" >&2; exit 2; }
PID="$(checked_pid "$PID_FILE" "--temp-dir $TEMP_DIR")"
if [[ -z "$PID" ]]; then  # the head is gone, or the pid now names another program: signal nothing
    echo "no cluster started by local-up.sh is running ($PID_FILE names no head of $TEMP_DIR): removed the stale pid file"
    rm -f "$PID_FILE"
    exit 0
fi

group_alive() {  # any process left in the cluster's process group (zombies do not count)
    ps -eo pgid=,stat= | awk -v g="$PID" '$1 == g && $2 !~ /^Z/ {found = 1} END {exit !found}'
}

if kill -0 "$PID" 2>/dev/null; then
    kill -TERM "$PID"
fi
for _ in $(seq "$GRACE"); do
    group_alive || break
    sleep 1
done
if group_alive; then
    echo "some Ray processes did not stop within ${GRACE}s: killing process group $PID"
    kill -KILL -- "-$PID" 2>/dev/null || true
fi
rm -f "$PID_FILE"
echo "Ray cluster stopped (process group $PID)"
