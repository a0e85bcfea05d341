"""A real multi-node Ray cluster on this machine for tests: `cluster/local-multinode.sh` behind a fixture.

A head with 0 CPUs and two 1-CPU worker nodes, each in its own network, mount and UTS namespace (own IP,
own /tmp, own host name), one shared folder, a moto S3 server and an MLflow server on the bridge address.
Needs root (as CI has) and `ip`, `nsenter`, `unshare`; elsewhere the tests that use it are skipped.

Each use picks its own names (`rt<hex>`) and a free private /24 (10.250.100-199.0/24), so two sessions on one
machine do not collide; teardown runs the script's `down` and then checks that no namespace, link or
process of this cluster is left, also when a test failed.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "cluster" / "local-multinode.sh"
BIN = Path(sys.executable).parent
UP_TIMEOUT = 600  # `ray start` takes 25+ s per node on 2 busy cores


def why_not_supported() -> str | None:
    if sys.platform != "linux":
        return "needs Linux namespaces"
    if os.geteuid() != 0:
        return "needs root (network and mount namespaces), as CI has"
    for tool in ("ip", "nsenter", "unshare", "setsid"):
        if not shutil.which(tool):
            return f"needs the '{tool}' command"
    if not (BIN / "moto_server").exists():
        return "needs moto_server (pip install -e '.[test]')"
    return None


def _free_subnet() -> str:
    used = subprocess.run(["ip", "-o", "addr", "show"], capture_output=True, text=True).stdout
    choices = [f"10.250.{x}" for x in range(100, 200)]
    random.shuffle(choices)
    for subnet in choices:
        if f" {subnet}." not in used:
            return subnet
    raise RuntimeError("no free 10.250.x.0/24 subnet for the test cluster")


@dataclass
class MultiNodeCluster:
    name: str
    subnet: str
    dir: Path
    env: dict[str, str] = field(default_factory=dict)  # RAY_ADDRESS, AWS_*, MLFLOW_TRACKING_URI, ...

    @property
    def shared(self) -> Path:
        return self.dir / "shared"

    @property
    def head_ip(self) -> str:
        return f"{self.subnet}.1"

    def node_ip(self, i: int) -> str:
        return f"{self.subnet}.{i + 1}"

    @property
    def jobs_url(self) -> str:
        return self.env["RAY_API_SERVER_ADDRESS"]

    @property
    def tracking_uri(self) -> str:
        return self.env["MLFLOW_TRACKING_URI"]

    def script_env(self, extra: dict | None = None) -> dict[str, str]:
        # Not TMPDIR either (a pytest-xdist worker's own folder): every node has its own /tmp.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "AWS_")) and k != "TMPDIR"}
        env.update(MN_NAME=self.name, MN_SUBNET=self.subnet, MN_DIR=str(self.dir), RAY=str(BIN / "ray"),
                   PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
        return {**env, **(extra or {})}

    def script(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([str(SCRIPT), *args], env=self.script_env(), capture_output=True, text=True,
                              timeout=timeout, cwd=ROOT)

    def on_head(self, *cmd: str, timeout: float = 600, env: dict | None = None, node: int = 0):
        """Run a command as a driver on the head node (its namespaces: its IP, its /tmp), like `ray job` does."""
        return subprocess.run([str(SCRIPT), "exec", str(node), "--", *map(str, cmd)], env=self.script_env(env),
                              capture_output=True, text=True, timeout=timeout, cwd=ROOT)

    def start_on_head(self, *cmd: str, log_path: Path, env: dict | None = None) -> subprocess.Popen:
        out = open(log_path, "w")
        return subprocess.Popen([str(SCRIPT), "exec", "0", "--", *map(str, cmd)], env=self.script_env(env),
                                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)

    def fit(self, *args: str, timeout: float = 600, env: dict | None = None):
        return self.on_head(sys.executable, "-m", "raytrain_yolo.fit", *args, timeout=timeout, env=env)

    def node_pids(self, node: int) -> list[int]:
        """Every process in worker node `node` (its network namespace)."""
        listed = subprocess.run(["ip", "netns", "pids", f"{self.name}-n{node}"], capture_output=True, text=True)
        return [int(pid) for pid in listed.stdout.split()]

    def s3(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.env["AWS_ENDPOINT_URL"],
                            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
                            region_name=self.env["AWS_DEFAULT_REGION"])

    def s3_keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.s3().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def s3_text(self, bucket: str, key: str) -> str:
        return self.s3().get_object(Bucket=bucket, Key=key)["Body"].read().decode()

    def leftovers(self) -> list[str]:
        """Namespaces, links and processes of this cluster that still exist."""
        left = []
        netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        left += [line.split()[0] for line in netns.splitlines() if line.startswith(f"{self.name}-")]
        links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
        left += [f"link {line.split(':')[1].strip()}" for line in links.splitlines()
                 if line.split(":")[1].strip().split("@")[0].startswith(self.name)]
        import psutil

        for p in psutil.process_iter():
            try:
                if p.environ().get("MN_DIR") == str(self.dir) or str(self.dir) in " ".join(p.cmdline()):
                    if p.pid != os.getpid() and p.status() != psutil.STATUS_ZOMBIE:
                        left.append(f"process {p.pid} {' '.join(p.cmdline())[:80]}")
            except psutil.Error:
                continue
        return left


def start_cluster() -> MultiNodeCluster:
    name = f"rt{uuid.uuid4().hex[:5]}"
    cluster = MultiNodeCluster(name=name, subnet=_free_subnet(),
                               dir=Path(tempfile.mkdtemp(prefix=f"{name}-", dir="/var/tmp")))
    try:
        up = cluster.script("up", timeout=UP_TIMEOUT)
        if up.returncode != 0:
            raise RuntimeError(f"local-multinode.sh up failed:\n{up.stdout[-2000:]}\n{up.stderr[-3000:]}")
        for line in up.stdout.splitlines():
            if line.startswith("export "):
                key, _, value = line[len("export "):].partition("=")
                cluster.env[key] = value
        return cluster
    except BaseException:
        stop_cluster(cluster)
        raise


def stop_cluster(cluster: MultiNodeCluster) -> None:
    try:
        down = cluster.script("down", timeout=180)
        assert down.returncode == 0, down.stderr[-2000:]
        left = cluster.leftovers()
        assert not left, f"the test cluster left these behind: {left}"
    finally:
        shutil.rmtree(cluster.dir, ignore_errors=True)
