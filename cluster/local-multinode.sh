#!/usr/bin/env bash
# A real multi-node Ray cluster on one Linux machine (root needed): a head with 0 CPUs and N one-CPU worker
# nodes, each in its own network, mount and UTS namespace, plus what a real cluster shares: one shared
# folder, an S3-compatible object store (moto's standalone server) and an MLflow tracking server.
#
#   sudo cluster/local-multinode.sh up                 # start it; prints the environment to use
#   sudo cluster/local-multinode.sh env                # that environment again (source it: eval "$(... env)")
#   sudo cluster/local-multinode.sh exec -- CMD...     # run CMD as a driver on the head (its namespaces)
#   sudo cluster/local-multinode.sh exec 2 -- CMD...   # ... or on worker node 2
#   sudo cluster/local-multinode.sh node-down 2        # worker node 2 dies: every process in it is killed
#   sudo cluster/local-multinode.sh node-up 2          # ... and comes back (a fresh raylet joins the head)
#   sudo cluster/local-multinode.sh mlflow-down        # the MLflow server is killed (an outage, a redeploy)
#   sudo cluster/local-multinode.sh mlflow-up          # ... and starts again on the same store
#   sudo cluster/local-multinode.sh down               # stop everything; leaves no process, namespace or link
#
# What each node gets:
# - a network namespace `<name>-n<i>` with one veth (`raynet0`, the same name on every node) on a bridge
#   `<name>br` in the root namespace; addresses <subnet>.1 (head), .2, .3, ... ; the bridge itself is
#   <subnet>.254, where the object store (port 9000) and the MLflow server (port 5000) listen;
# - a mount namespace with its own tmpfs on /tmp and /dev/shm (a node-local disk the other nodes cannot see;
#   Ray's session folder lives there), its own /etc/hosts naming every node, and its own host name
#   (UTS namespace), so that summaries show one host per node;
# - everything else of the file system is seen by every node, like an NFS mount: the checkout, the Python
#   environment and $MN_DIR/shared (the "shared filesystem"). Paths of those that lie under /tmp are
#   bind-mounted back into the node's /tmp.
#
# Environment (all optional): MN_NAME (rtmn; prefix of namespaces and links, at most 8 characters),
# MN_SUBNET (10.250.7: a private /24 that must be unused on this machine), MN_WORKERS (2), MN_WORKER_CPUS (1),
# MN_DIR (/var/tmp/raytrain-mn-$MN_NAME: state, logs, the shared folder), RAY (the `ray` to use),
# MN_KEEP (extra colon-separated paths under /tmp that every node must see).
#
# Ray runs with token authentication (the token is generated into $MN_DIR/home/.ray/auth_token). Ports are
# Ray's defaults: every node has its own network stack, so nothing collides with a Ray on the host.
set -euo pipefail

NAME="${MN_NAME:-rtmn}"
SUBNET="${MN_SUBNET:-10.250.7}"
WORKERS="${MN_WORKERS:-2}"
WORKER_CPUS="${MN_WORKER_CPUS:-1}"
DIR="${MN_DIR:-/var/tmp/raytrain-mn-$NAME}"
IFNAME=raynet0
BRIDGE="${NAME}br"
HOST_IP="$SUBNET.254"
HEAD_IP="$SUBNET.1"
S3_PORT=9000
MLFLOW_PORT=5000
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STAGE="/var/tmp/.$NAME-stage"  # outside /tmp: where a node sees the host's /tmp while it mounts its own

die() { echo "error: $*" >&2; exit 2; }
# shellcheck source=cluster/private.sh
source "$REPO/cluster/private.sh"
[[ ${#NAME} -le 8 && "$NAME" =~ ^[a-z][a-z0-9]*$ ]] || die "MN_NAME=$NAME must be 1-8 lowercase letters/digits"
[[ "$SUBNET" =~ ^10\.[0-9]+\.[0-9]+$ ]] || die "MN_SUBNET=$SUBNET must look like 10.X.Y (a private /24)"

if [[ -z "${RAY:-}" ]]; then
    if [[ -x "$REPO/.venv/bin/ray" ]]; then RAY="$REPO/.venv/bin/ray"; else RAY="$(command -v ray || true)"; fi
fi
[[ -n "$RAY" && -x "$RAY" ]] || die "no 'ray' found: pip install -e '.[test]' (or set RAY=/path/to/ray)"
BIN="$(cd "$(dirname "$RAY")" && pwd)"
PY="$BIN/python"
[[ -x "$PY" ]] || PY="$(command -v python3)"
PREFIX="$("$PY" -c 'import sys, os; print(os.path.realpath(sys.prefix))')"

ns() { echo "$NAME-n$1"; }
node_ip() { echo "$SUBNET.$(( $1 + 1 ))"; }
node_host() { if [[ $1 == 0 ]]; then echo "$NAME-head"; else echo "$NAME-node$1"; fi; }
holder_pid() { cat "$DIR/n$1.holder" 2>/dev/null || true; }

# The environment every node, driver and client gets.
cluster_env() {
    cat <<EOF
export RAY_ADDRESS=$HEAD_IP:6379
export RAY_API_SERVER_ADDRESS=http://$HEAD_IP:8265
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH=$DIR/home/.ray/auth_token
export AWS_ENDPOINT_URL=http://$HOST_IP:$S3_PORT
export AWS_ACCESS_KEY_ID=raytrain
export AWS_SECRET_ACCESS_KEY=raytrain-secret
export AWS_DEFAULT_REGION=us-east-1
export AWS_EC2_METADATA_DISABLED=true
export MLFLOW_TRACKING_URI=http://$HOST_IP:$MLFLOW_PORT
export MN_SHARED=$DIR/shared
export MN_S3_BUCKET=raytrain
EOF
}

# Run a command inside node i's namespaces (network, mount, UTS), in the current directory.
in_node() {
    local i=$1; shift
    local pid; pid="$(holder_pid "$i")"
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || die "node $i is not running: $0 up first"
    nsenter -t "$pid" -n -m -u --wd="$PWD" -- "$@"
}

# Paths under /tmp that every node must still see once its /tmp is its own.
keep_paths() {
    local p
    for p in "$DIR" "$REPO" "$PREFIX" ${MN_KEEP:+${MN_KEEP//:/ }}; do
        p="$(realpath -m "$p")"
        if [[ "$p" == /tmp/* ]]; then echo "$p"; fi
    done | sort -u
}

make_node() {
    local i=$1 n; n="$(ns "$i")"
    ip netns add "$n"
    ip link add "${NAME}h$i" type veth peer name "${NAME}p$i"
    ip link set "${NAME}p$i" netns "$n"
    ip netns exec "$n" ip link set "${NAME}p$i" name "$IFNAME"
    ip netns exec "$n" ip addr add "$(node_ip "$i")/24" dev "$IFNAME"
    ip netns exec "$n" ip link set "$IFNAME" up
    ip netns exec "$n" ip link set lo up
    ip link set "${NAME}h$i" master "$BRIDGE" up
    # The holder keeps the node's mount and UTS namespaces alive; everything of the node is started inside it.
    local stage="$STAGE/n$i" keep
    mkdir -p "$stage"
    keep="$(keep_paths | tr '\n' ' ')"
    setsid ip netns exec "$n" unshare --mount --uts --propagation private -- bash -c '
        set -e
        stage=$1 host=$2 hosts=$3; shift 3
        if [[ $# -gt 0 ]]; then mount --bind /tmp "$stage"; fi
        mount -t tmpfs -o mode=1777 "tmp-$host" /tmp
        for p in "$@"; do mkdir -p "$p"; mount --bind "$stage${p#/tmp}" "$p"; done
        if [[ $# -gt 0 ]]; then umount -l "$stage"; fi
        mount -t tmpfs -o mode=1777 "shm-$host" /dev/shm
        mount --bind "$hosts" /etc/hosts
        hostname "$host"
        exec sleep infinity
    ' holder "$stage" "$(node_host "$i")" "$DIR/hosts" $keep </dev/null >"$DIR/logs/n$i.holder.log" 2>&1 &
    echo $! >"$DIR/n$i.holder"
}

wait_holder() {  # the holder has mounted its /tmp: the node's namespaces are ready
    local i=$1 pid
    pid="$(holder_pid "$i")"
    for _ in $(seq 100); do
        if [[ "$(readlink "/proc/$pid/exe" 2>/dev/null)" == */sleep ]]; then return 0; fi
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    cat "$DIR/logs/n$i.holder.log" >&2
    die "node $i did not come up (see above)"
}

start_ray() {  # node i's raylet (and on the head the GCS, dashboard and Jobs API)
    local i=$1 args
    if [[ $i == 0 ]]; then
        args=(--head --port 6379 --num-cpus 0 --dashboard-host "$HEAD_IP" --dashboard-port 8265)
    else
        args=(--address "$HEAD_IP:6379" --num-cpus "$WORKER_CPUS")
    fi
    (
        eval "$(cluster_env)"
        unset RAY_ADDRESS
        export PATH="$BIN:$PATH" RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0 PYTHONUNBUFFERED=1
        cd "$REPO"
        in_node "$i" "$RAY" start --node-ip-address "$(node_ip "$i")" --disable-usage-stats "${args[@]}"
    ) >"$DIR/logs/n$i.ray.log" 2>&1 || { tail -n 30 "$DIR/logs/n$i.ray.log" >&2; die "ray start failed on node $i"; }
}

wait_nodes() {  # until the head sees the head and every worker node alive
    local want=$1
    (eval "$(cluster_env)"; in_node 0 "$PY" - "$want" <<'EOF'
import sys, time
import ray
want = int(sys.argv[1])
ray.init(address="auto", logging_level="ERROR", log_to_driver=False)
deadline = time.monotonic() + 180
while sum(n["Alive"] for n in ray.nodes()) < want:
    if time.monotonic() > deadline:
        sys.exit(f"only {sum(n['Alive'] for n in ray.nodes())} of {want} Ray nodes after 180 s")
    time.sleep(1)
EOF
    )
}

kill_node() {  # every process in node i's network namespace; with keep_holder, the namespaces survive
    local i=$1 keep=${2:-} n pids holder
    n="$(ns "$i")"
    holder="$(holder_pid "$i")"
    for _ in 1 2 3 4 5; do
        pids="$(ip netns pids "$n" 2>/dev/null | grep -vx "${keep:+$holder}" || true)"
        [[ -z "$pids" ]] && return 0
        kill -9 $pids 2>/dev/null || true
        sleep 0.5
    done
}

start_services() {
    (
        eval "$(cluster_env)"
        cd "$DIR"
        setsid "$BIN/moto_server" -H "$HOST_IP" -p "$S3_PORT" </dev/null >"$DIR/logs/moto.log" 2>&1 &
        echo $! >"$DIR/moto.pid"
        "$PY" - <<'EOF'
import os, time
import boto3
s3 = boto3.client("s3")
deadline = time.monotonic() + 60
while True:
    try:
        s3.create_bucket(Bucket=os.environ["MN_S3_BUCKET"])
        s3.create_bucket(Bucket="mlflow")
        break
    except Exception:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.5)
EOF
    ) || die "moto's S3 server did not come up on $HOST_IP:$S3_PORT (see $DIR/logs/moto.log)"
    start_mlflow
}

start_mlflow() {  # the MLflow server, on its store in $DIR (also after mlflow-down: a restart keeps every run)
    (
        eval "$(cluster_env)"
        cd "$DIR"
        # Artifacts are proxied by the server into the object store: clients need no S3 credentials for them.
        # Tracking only: MLflow's server-side job runner (six huey consumers, ~15 s of CPU to start) stays off.
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false \
        setsid "$BIN/mlflow" server --host "$HOST_IP" --port "$MLFLOW_PORT" --workers 1 \
            --backend-store-uri "sqlite:///$DIR/mlflow.db" --artifacts-destination "s3://mlflow/artifacts" \
            </dev/null >>"$DIR/logs/mlflow.log" 2>&1 &
        echo $! >"$DIR/mlflow.pid"
    )
}

wait_mlflow() {  # the MLflow server start_services launched answers (it boots while the Ray nodes start)
    (
        eval "$(cluster_env)"
        for _ in $(seq 120); do
            "$PY" -c "import urllib.request as u; u.urlopen('$MLFLOW_TRACKING_URI/health', timeout=2)" 2>/dev/null && exit 0
            sleep 1
        done
        tail -n 20 "$DIR/logs/mlflow.log" >&2
        exit 1
    ) || die "the MLflow server did not come up on $HOST_IP:$MLFLOW_PORT"
}

stop_pidfile() {  # a service we started in its own session (its command line holds $2): its whole process group
    local f=$1 pid
    pid="$(checked_pid "$f" "$2")"
    if [[ -n "$pid" ]]; then
        kill -9 -- "-$pid" 2>/dev/null || kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$f"
}

up() {
    [[ $EUID == 0 ]] || die "needs root (network and mount namespaces): run it with sudo"
    if ip link show "$BRIDGE" >/dev/null 2>&1 || [[ -f "$DIR/n0.holder" ]]; then
        die "a cluster named $NAME is already up (bridge $BRIDGE): $0 down first, or pick another MN_NAME"
    fi
    if ip -o addr show | grep -q " $SUBNET\."; then
        die "addresses in $SUBNET.0/24 are already in use on this machine: pick another MN_SUBNET"
    fi
    command -v "$BIN/moto_server" >/dev/null || die "moto_server not found next to $RAY: pip install 'moto[server]'"
    trap 'rc=$?; if [[ $rc != 0 ]]; then echo "up failed: tearing down" >&2; down >/dev/null 2>&1; fi' EXIT
    private_dir "$DIR"  # refused when another user made it: they could plant the token, a pid file or a link
    private_dir "$STAGE"
    mkdir -p "$DIR/logs" "$DIR/shared" "$DIR/home"
    {
        echo "127.0.0.1 localhost"
        for i in $(seq 0 "$WORKERS"); do echo "$(node_ip "$i") $(node_host "$i")"; done
        echo "$HOST_IP $NAME-services"
    } >"$DIR/hosts"
    env -u RAY_AUTH_TOKEN -u RAY_AUTH_TOKEN_PATH HOME="$DIR/home" "$RAY" get-auth-token --generate >/dev/null 2>&1 || die "ray get-auth-token --generate failed"
    ip link add "$BRIDGE" type bridge
    ip addr add "$HOST_IP/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    for i in $(seq 0 "$WORKERS"); do make_node "$i"; done
    for i in $(seq 0 "$WORKERS"); do wait_holder "$i"; done
    start_services
    start_ray 0
    local pids=()
    for i in $(seq 1 "$WORKERS"); do start_ray "$i" & pids+=($!); done
    for p in "${pids[@]}"; do wait "$p"; done
    wait_nodes $(( WORKERS + 1 ))
    wait_mlflow
    trap - EXIT
    echo "# multi-node Ray cluster $NAME up: head $HEAD_IP (0 CPUs), $WORKERS worker nodes x $WORKER_CPUS CPU"
    echo "# shared folder $DIR/shared; logs in $DIR/logs; drivers: $0 exec -- python -m raytrain_yolo.fit ..."
    cluster_env
}

down() {
    local i
    for i in $(seq 0 "$WORKERS"); do
        kill_node "$i"
        ip netns del "$(ns "$i")" 2>/dev/null || true
        ip link del "${NAME}h$i" 2>/dev/null || true
        rm -f "$DIR/n$i.holder"
    done
    stop_pidfile "$DIR/mlflow.pid" "mlflow"
    stop_pidfile "$DIR/moto.pid" "moto_server"
    ip link del "$BRIDGE" 2>/dev/null || true
    rmdir "$STAGE"/n* "$STAGE" 2>/dev/null || true
    echo "cluster $NAME down (state kept in $DIR; rm -rf it to drop the shared folder and the runs)"
}

cmd="${1:-}"; shift || true
case "$cmd" in
    up) up ;;
    down) down ;;
    env) cluster_env ;;
    exec)
        node=0
        if [[ "${1:-}" =~ ^[0-9]+$ ]]; then node=$1; shift; fi
        [[ "${1:-}" == "--" ]] && shift
        [[ $# -gt 0 ]] || die "exec needs a command: $0 exec [NODE] -- CMD..."
        eval "$(cluster_env)"
        export PATH="$BIN:$PATH"
        in_node "$node" "$@"
        ;;
    node-down)
        [[ "${1:-}" =~ ^[1-9][0-9]*$ && $1 -le $WORKERS ]] || die "node-down needs a worker node number 1..$WORKERS"
        kill_node "$1" keep_holder
        echo "node $1 ($(node_ip "$1")) is down: every process in it was killed"
        ;;
    node-up)
        [[ "${1:-}" =~ ^[1-9][0-9]*$ && $1 -le $WORKERS ]] || die "node-up needs a worker node number 1..$WORKERS"
        start_ray "$1"
        echo "node $1 ($(node_ip "$1")) is up again"
        ;;
    mlflow-down)
        [[ -f "$DIR/mlflow.pid" ]] || die "no MLflow server of cluster $NAME is running"
        stop_pidfile "$DIR/mlflow.pid" "mlflow"
        echo "the MLflow server ($HOST_IP:$MLFLOW_PORT) is down: killed"
        ;;
    mlflow-up)
        [[ ! -f "$DIR/mlflow.pid" ]] || die "the MLflow server of cluster $NAME is running: $0 mlflow-down first"
        start_mlflow
        wait_mlflow
        echo "the MLflow server ($HOST_IP:$MLFLOW_PORT) is up again, on the same store"
        ;;
    *) die "usage: $0 up|down|env|exec [NODE] -- CMD...|node-down N|node-up N|mlflow-down|mlflow-up" ;;
esac
