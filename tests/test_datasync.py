"""Issue 13: data=s3://.../data.yaml is copied to the node's local disk once, reused while unchanged, and copied
again when the bucket changes. A real S3 API (moto's standalone server on 127.0.0.1), no Ray."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import free_port, wait_for
from raytrain_yolo.core.config import SyntheticSpec
from raytrain_yolo.data.synthetic import ensure_synthetic

MOTO = Path(sys.executable).parent / "moto_server"
S3_ENV = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_EC2_METADATA_DISABLED": "true"}


@contextlib.contextmanager
def moto_server(bucket: str):
    """moto's S3 server on a free port of 127.0.0.1 with `bucket` made, its endpoint and keys in os.environ (as
    before, after): (the server's Popen, a boto3 client)."""
    if not MOTO.exists():
        pytest.skip("needs moto_server (pip install -e '.[test]')")
    port = free_port()
    proc = subprocess.Popen([str(MOTO), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    saved = {k: os.environ.get(k) for k in [*S3_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(S3_ENV, AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    try:
        import boto3

        client = boto3.client("s3")

        def bucket_made():
            try:
                client.create_bucket(Bucket=bucket)
                return True
            except Exception:  # noqa: BLE001 - the server is still starting
                return False

        wait_for(bucket_made, 60, what="moto_server")
        yield proc, client
    finally:
        proc.kill()
        proc.wait()
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="module")
def s3():
    with moto_server("datasets") as (_, client):
        yield client


def upload(client, src: Path, prefix: str) -> None:
    for f in src.rglob("*"):
        if f.is_file() and f.suffix != ".cache":
            client.upload_file(str(f), "datasets", f"{prefix}/{f.relative_to(src)}")


def test_copied_once_reused_then_refreshed(s3, tmp_path, monkeypatch):
    from raytrain_yolo.data.sync import localize, release
    from raytrain_yolo.plan.dataset import check_data

    monkeypatch.setenv("RAYTRAIN_YOLO_CACHE", str(tmp_path / "node-cache"))
    src = ensure_synthetic(SyntheticSpec(train=8, val=4, imgsz=64)).parent
    upload(s3, src, "shapes")
    uri = "s3://datasets/shapes/data.yaml"

    # Several workers of one node at once: one copies, the others wait for it, all get the same copy.
    paths = []
    threads = [threading.Thread(target=lambda: paths.append(localize(uri))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(paths)) == 1
    local = Path(paths[0])
    assert local.is_relative_to(tmp_path / "node-cache")
    check_data(str(local), "detect")  # a complete YOLO dataset whose path: points at the copy
    image = next((local.parent / "images" / "train").iterdir())
    stamp = image.stat().st_mtime_ns

    assert localize(uri) == str(local) and image.stat().st_mtime_ns == stamp, "unchanged: reused, not copied"

    # Issue 44, 3: the bucket changed while a run (this process) reads the copy: a new copy beside it, the one in
    # use left as it is; once nobody holds the old copy, the next localize removes it.
    old_label = (local.parent / "labels" / "train" / "000000.txt").read_text()
    s3.put_object(Bucket="datasets", Key="shapes/labels/train/000000.txt", Body=b"0 0.5 0.5 0.2 0.2\n")
    fresh = Path(localize(uri))
    assert fresh != local and (fresh.parent / "labels" / "train" / "000000.txt").read_text() == "0 0.5 0.5 0.2 0.2\n"
    assert (local.parent / "labels" / "train" / "000000.txt").read_text() == old_label, "replaced under its reader"
    release()
    assert localize(uri) == str(fresh) and not local.parent.exists(), "the unused old copy is removed"


def test_missing_dataset_is_one_line(s3, tmp_path, monkeypatch):
    from raytrain_yolo.core.errors import UserError
    from raytrain_yolo.data.sync import localize

    monkeypatch.setenv("RAYTRAIN_YOLO_CACHE", str(tmp_path / "node-cache"))
    with pytest.raises(UserError, match="not found"):
        localize("s3://datasets/nothing-here/data.yaml")


@pytest.mark.quick
def test_a_shared_filesystem_dataset_is_copied_once_with_a_file_uri(tmp_path, monkeypatch):
    """`data=file:///shared/.../data.yaml`: the same copy-once path as object storage, for an NFS-style mount."""
    import shutil

    from raytrain_yolo.data.sync import localize

    shared = tmp_path / "shared" / "shapes"
    shutil.copytree(ensure_synthetic(SyntheticSpec(train=8, val=4, imgsz=64)).parent, shared)
    monkeypatch.setenv("RAYTRAIN_YOLO_CACHE", str(tmp_path / "node-local"))
    first = Path(localize(f"file://{shared}/data.yaml"))
    assert first.is_file() and (tmp_path / "node-local") in first.parents
    assert len(list((first.parent / "images" / "train").iterdir())) == 8
    copied_at = first.stat().st_mtime_ns
    assert localize(f"file://{shared}/data.yaml") == str(first) and first.stat().st_mtime_ns == copied_at
    shutil.copy(shared / "images" / "train" / sorted(p.name for p in (shared / "images" / "train").iterdir())[0],
                shared / "images" / "train" / "extra.jpg")
    again = Path(localize(f"file://{shared}/data.yaml"))
    assert (again.parent / "images" / "train" / "extra.jpg").is_file(), "a changed folder is copied again"
