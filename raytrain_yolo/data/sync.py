"""A dataset in object storage (`data=s3://bucket/prefix/data.yaml`), copied once to each node's local disk.

Ultralytics reads images and labels from local files, many times per epoch. So each node copies the folder
that holds `data.yaml` into its node-local cache (`$RAYTRAIN_YOLO_CACHE/datasets/`, else
`~/.cache/raytrain_yolo/datasets/`) with pyarrow's filesystems (the ones Ray Train uses for checkpoints):
- one copier per node: the first worker takes a file lock, the others on that node wait for it;
- reused on the next run when nothing changed: the copy keeps the listing (paths, sizes, modification times)
  it was made from, and a new listing that matches it means no download;
- versioned by that listing's digest (`datasets/<uri>-<listing>/`): a changed bucket gets a new copy beside the
  old one, which is never replaced under a run that reads it (or writes Ultralytics' `labels/*.cache` into it).
  Every process that uses a copy holds a shared lock on `<copy>.inuse` for its life; an older copy is removed
  once no process holds it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import tempfile
import uuid
from pathlib import Path

import pyarrow.fs as pafs
import yaml

from raytrain_yolo.core.errors import UserError
from raytrain_yolo.data.synthetic import cache_root

LISTING = ".raytrain-listing.json"


def _listing(fs: pafs.FileSystem, root: str) -> dict[str, list]:
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    return {i.path[len(root):].lstrip("/"): [i.size, i.mtime_ns] for i in infos if i.type == pafs.FileType.File}


def localize(uri: str) -> str:
    """The local path of `data.yaml` for a dataset URI, downloading it first if this node has no current copy."""
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
        root = path.rsplit("/", 1)[0]
        listing = _listing(fs, root)
    except FileNotFoundError:
        listing = {}
    except (OSError, ValueError) as e:
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise UserError(f"data={uri} cannot be listed ({first}): check the URI and the credentials "
                        "(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...)") from None
    name = path.rsplit("/", 1)[1]
    if name not in listing:
        raise UserError(f"data={uri} not found: pass the URI of an existing YOLO data.yaml")
    base = cache_root() / "datasets" / hashlib.sha1(uri.encode()).hexdigest()[:16]
    version = hashlib.sha1(json.dumps(listing, sort_keys=True).encode()).hexdigest()[:12]
    dest = base.with_name(f"{base.name}-{version}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{base}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one copier per node; the others wait here and then reuse its copy
        try:
            if _read_listing(dest) != listing:
                _download(fs, root, dest, listing)
            _hold(dest)
            _prune(base, dest)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return str(dest / name)


_HELD: dict[str, object] = {}  # copy -> the open `<copy>.inuse` this process holds a shared lock on


def _hold(dest: Path) -> None:
    """Mark the copy in use by this process, for as long as it lives (the lock goes with the process)."""
    if str(dest) not in _HELD:
        f = open(f"{dest}.inuse", "a")
        fcntl.flock(f, fcntl.LOCK_SH)
        _HELD[str(dest)] = f


def release() -> None:
    """This process no longer reads its node copies (a long-lived process between jobs): an older copy it held
    may be removed by the next `localize` of its URI."""
    for f in _HELD.values():
        f.close()
    _HELD.clear()


def _prune(base: Path, keep: Path) -> None:
    """Remove the older copies of the same URI that no process holds."""
    for other in base.parent.glob(f"{base.name}-*"):
        if other == keep or not other.is_dir():
            continue
        with open(f"{other}.inuse", "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a run on this node still reads it
            shutil.rmtree(other, ignore_errors=True)
            Path(f"{other}.inuse").unlink(missing_ok=True)


def pin_root(data_yaml: str, root: str) -> str:
    """A node-local copy of `data_yaml` whose `path:` is `root`, the absolute dataset root Ultralytics resolved on
    the driver: a relative `path:` is resolved from the working directory, which differs on a worker."""
    cfg = yaml.safe_load(Path(data_yaml).read_text())
    cfg["path"] = root
    text = yaml.safe_dump(cfg, sort_keys=False)
    dest = cache_root() / "pinned" / hashlib.sha1(f"{data_yaml}\n{text}".encode()).hexdigest()[:16] / Path(data_yaml).name
    if not dest.is_file() or dest.read_text() != text:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}")
        tmp.write_text(text)
        tmp.replace(dest)  # atomic: the workers of one node may write it at once
    return str(dest)


def _read_listing(dest: Path) -> dict | None:
    try:
        return json.loads((dest / LISTING).read_text())
    except (OSError, ValueError):
        return None


def _download(fs: pafs.FileSystem, root: str, dest: Path, listing: dict) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".tmp-", dir=dest.parent))
    try:
        pafs.copy_files(root, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        for yml in [p for p in tmp.iterdir() if p.suffix in (".yaml", ".yml")]:
            cfg = yaml.safe_load(yml.read_text())
            if isinstance(cfg, dict) and "path" in cfg:  # point Ultralytics at the copy, not the bucket
                cfg["path"] = str(dest)
                yml.write_text(yaml.safe_dump(cfg, sort_keys=False))
        (tmp / LISTING).write_text(json.dumps(listing))
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
