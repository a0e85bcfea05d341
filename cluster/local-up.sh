#!/usr/bin/env bash
# Start a local single-node Ray cluster with token authentication ON, to try `ray job submit` on one machine.
#
#   cluster/local-up.sh                 # head on 127.0.0.1, GCS port 6379, dashboard/Jobs API on 127.0.0.1:8265
#   RAY_NUM_CPUS=2 cluster/local-up.sh  # advertise 2 CPUs
#   cluster/local-up.sh --num-gpus 1    # extra arguments go to `ray start` unchanged
#   cluster/local-down.sh               # stop it (only this cluster: other Ray instances on the machine live on)
#
# Environment: RAY (the `ray` to use; default: the repository's .venv/bin/ray, else `ray` on PATH),
# RAY_PORT (6379), RAY_DASHBOARD_PORT (8265), RAY_NUM_CPUS (all cores), RAY_TEMP_DIR (/tmp/raytrain_yolo_ray).
#
# Token authentication (Ray >= 2.52): `ray get-auth-token --generate` writes ~/.ray/auth_token if there is no
# token yet (it uses $RAY_AUTH_TOKEN or $RAY_AUTH_TOKEN_PATH instead when one of them is set), and the head is
# started with RAY_AUTH_MODE=token. Every client then needs RAY_AUTH_MODE=token and the same token:
# `RAY_AUTH_MODE=token ray job submit ...` on this machine reads ~/.ray/auth_token. Without it the Jobs API
# answers 401 ("Authentication required").
#
# The head runs as `ray start --head --block` in its own session, in the background; its pid is kept in
# $RAY_TEMP_DIR/local-up.pid so that local-down.sh stops exactly this cluster (`ray stop` would stop every Ray
# on the machine). Its own temp dir keeps `ray.init()` elsewhere on this machine from joining it by accident. That
# folder is this user's alone (0700): one that exists and is a link, another user's, or writable by others is
# refused (cluster/private.sh), and a pid file counts only when it names this cluster's head.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${RAY:-}" ]]; then
    if [[ -x "$REPO/.venv/bin/ray" ]]; then RAY="$REPO/.venv/bin/ray"; else RAY="$(command -v ray || true)"; fi
fi
[[ -n "$RAY" && -x "$RAY" ]] || { echo "error: no 'ray' found: pip install -e . (or set RAY=/path/to/ray)" >&2; exit 2; }
BIN="$(cd "$(dirname "$RAY")" && pwd)"
PY="$BIN/python"
[[ -x "$PY" ]] || PY="$(command -v python3)"

PORT="${RAY_PORT:-6379}"
DASHBOARD_PORT="${RAY_DASHBOARD_PORT:-8265}"
TEMP_DIR="${RAY_TEMP_DIR:-/tmp/raytrain_yolo_ray}"   # keep it short: Ray's socket paths live under it
PID_FILE="$TEMP_DIR/local-up.pid"
LOG="$TEMP_DIR/local-up.log"
DASHBOARD="http://127.0.0.1:$DASHBOARD_PORT"

# shellcheck source=cluster/private.sh
source "$REPO/cluster/private.sh"
private_dir "$TEMP_DIR"   # refused when another user made it: they could plant the pid file, log or a link
RUNNING="$(checked_pid "$PID_FILE" "--temp-dir $TEMP_DIR")"
if [[ -n "$RUNNING" ]]; then
    echo "error: a cluster started by local-up.sh is already running (pid $RUNNING): cluster/local-down.sh first" >&2
    exit 2
fi

# 1. The token: generated once into ~/.ray/auth_token, then reused (stdout is the token: keep it off the screen).
"$RAY" get-auth-token --generate >/dev/null 2>&1 || { echo "error: ray get-auth-token --generate failed" >&2; exit 1; }

# 2. The head. PATH starts with this Ray's bin folder, so that a job's entrypoint `python` is the Python that
#    has ray and raytrain_yolo (job drivers inherit the head's environment).
NUM_CPUS=()
[[ -n "${RAY_NUM_CPUS:-}" ]] && NUM_CPUS=(--num-cpus "$RAY_NUM_CPUS")
SETSID=()
command -v setsid >/dev/null && SETSID=(setsid)   # own session: closing this terminal does not stop the head
(
    cd "$REPO"
    # RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0: one node, nothing to drain to, so stop at once on SIGTERM.
    export RAY_AUTH_MODE=token PATH="$BIN:$PATH" RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0
    unset RAY_ADDRESS
    exec nohup ${SETSID[@]+"${SETSID[@]}"} "$RAY" start --head --block \
        --node-ip-address 127.0.0.1 --port "$PORT" \
        --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT" \
        --temp-dir "$TEMP_DIR" --disable-usage-stats ${NUM_CPUS[@]+"${NUM_CPUS[@]}"} "$@"
) >"$LOG" 2>&1 &
echo $! >"$PID_FILE"

# 3. Wait for the Jobs API: it answers 401 to a request without the token once it is up.
if ! "$PY" - "$DASHBOARD" "$(cat "$PID_FILE")" <<'EOF'
import os, sys, time, urllib.error, urllib.request
url, pid = sys.argv[1], int(sys.argv[2])
deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:  # Linux: an exited child stays a zombie until this script ends
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                sys.exit(1)
    except FileNotFoundError:
        pass
    except OSError:
        sys.exit(1)  # `ray start` exited: see the log
    try:
        urllib.request.urlopen(url + "/api/jobs/", timeout=2)
        sys.exit(0)
    except urllib.error.HTTPError:
        sys.exit(0)  # 401: up, and token authentication is on
    except OSError:
        time.sleep(1)
sys.exit(1)
EOF
then
    echo "error: the Ray head did not come up; last lines of $LOG:" >&2
    tail -n 30 "$LOG" >&2
    exit 1
fi

# 4. MLflow: an experiment records its artifact folder when it is created, and with an sqlite:// tracking URI
#    MLflow takes ./mlruns relative to the process that creates it. A job submitted with --working-dir runs in
#    Ray's temporary copy of the folder, so create the experiment here first: artifacts go to $REPO/mlruns,
#    as for a plain local run.
(cd "$REPO" && MLFLOW_TRACKING_URI="sqlite:///$REPO/mlflow.db" "$PY" -c '
from mlflow import MlflowClient
c = MlflowClient()
if c.get_experiment_by_name("raytrain_yolo") is None:
    c.create_experiment("raytrain_yolo")
' >/dev/null 2>&1) || echo "warning: could not create the MLflow experiment raytrain_yolo in $REPO/mlflow.db" >&2

cat <<EOF
Ray cluster up, token authentication ON (token in ${RAY_AUTH_TOKEN_PATH:-~/.ray/auth_token}; print it: ray get-auth-token)
  dashboard / Jobs API  $DASHBOARD   (the browser asks for the token)
  head log              $LOG
  stop it               cluster/local-down.sh

Submit a training run from the repository root ($REPO):

  RAY_AUTH_MODE=token $RAY job submit --address $DASHBOARD \\
      --working-dir . --runtime-env cluster/runtime_env.yaml -- \\
      python -m raytrain_yolo.fit --cpu --num-workers 2 \\
      --storage-path $REPO/runs/raytrain --tracking-uri sqlite:///$REPO/mlflow.db --name demo

Absolute --storage-path and --tracking-uri: with --working-dir the job runs in Ray's copy of the folder, so
relative paths would end up inside the Ray session (and be deleted with it). Then, with the submission id it
prints, find the summary file and the MLflow run:

  RAY_AUTH_MODE=token $RAY job logs --address $DASHBOARD <submission id> | grep -E '^(summary|mlflow run id) '
EOF
