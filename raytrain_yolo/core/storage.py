"""Run outputs on a local path or a cloud URI, through pyarrow's filesystems (the same ones Ray Train uses)."""

from __future__ import annotations

import math
import re
import uuid
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from raytrain_yolo.core.errors import UserError


# scheme://user:password@ or scheme://token@ (a password may hold anything but /, ?, #, @ and spaces)
_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/?#@\s:]*)(?P<password>:[^/?#@\s]*)?@")


def redact(text: str) -> str:
    """`text` (a URI, or a message that holds some) with each URI's credentials masked, for whatever is printed,
    logged to MLflow or written to summary.json: `s3://key:secret@bucket` -> `s3://key:***@bucket`,
    `http://token@host` -> `http://***@host`. Everything else is left as it is."""
    def mask(m: re.Match) -> str:
        return f"{m['scheme']}{m['user']}:***@" if m["password"] is not None else f"{m['scheme']}***@"

    return _CREDENTIALS.sub(mask, text)


def refuse_credentials(value: Any, flag: str) -> None:
    """An object-storage URI with credentials in it (`s3://KEY:SECRET@bucket/...`) is refused, naming the variables
    that carry them: every path derived from it (checkpoints, summaries, Tune's state, MLflow's artifact paths)
    would hold the secret, and not every later reader (Ultralytics, MLflow, a worker on another node) reads
    credentials from a URI. A tracking server's `http(s)://user:password@host` is MLflow's own form: kept."""
    m = _CREDENTIALS.search(value) if isinstance(value, str) else None
    if m is None or m["scheme"].lower() in ("http://", "https://"):
        return
    raise UserError(f"{flag} {redact(value)} holds credentials in the URI: remove them and set AWS_ACCESS_KEY_ID and "
                    "AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN, AWS_ENDPOINT_URL where needed) in the environment "
                    "instead (for GCS: GOOGLE_APPLICATION_CREDENTIALS)")


def is_uri(path: str) -> bool:
    return "://" in path


def normalise(path: str) -> str:
    """Ray Train wants absolute local paths; URIs pass through."""
    return path if is_uri(path) else str(Path(path).expanduser().resolve())


def as_uri(path: str, storage_path: str) -> str:
    """Ray reports paths inside its pyarrow filesystem (`bucket/runs/x` for `s3://bucket/runs`): put the scheme back."""
    if is_uri(storage_path) and not is_uri(path):
        return f"{storage_path.split('://', 1)[0]}://{path.lstrip('/')}"
    return path


# pyarrow's S3 retry backoff (the AWS SDK's standard mode; measured with pyarrow 25 against a server that closed
# every connection at once, 10 attempts: 92 and 99 s): a random wait whose ceiling doubles from about 1 s on each
# retry and is capped at 20 s, so the first 5 retries wait about 15 s together on average and later ones 20 s.
_S3_FIRST_RETRIES, _S3_FIRST_RETRIES_S, _S3_MAX_BACKOFF_S = 5, 15.0, 20.0


def s3_attempts(wait_s: float) -> int:
    """Attempts per S3 request for a request to keep retrying about `wait_s` seconds while the endpoint does not
    answer (pyarrow's default is 3, about 2 s). The backoff is random, so the wait is approximate: for 120 s, 12
    attempts, which give up after roughly 100-150 s."""
    if wait_s <= 0:
        return 3
    extra = max(0.0, wait_s - _S3_FIRST_RETRIES_S)
    return 1 + _S3_FIRST_RETRIES + math.ceil(extra / _S3_MAX_BACKOFF_S)


class RetryingS3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3 filesystem for an `s3://` URI (endpoint, region and credentials resolved by pyarrow from the URI
    and the environment, as Ray does), with `attempts` per request, also once pickled.

    Ray Train pickles `RunConfig(storage_filesystem=...)` to its controller and workers, and pyarrow 25's
    `S3FileSystem.__reduce__` drops `retry_strategy` (apache/arrow#47348): an unpickled copy retried 3 times, and
    a storage endpoint that refused connections for a few seconds ended the run (the controller's checkpoint
    snapshot upload failed, which is not a worker failure). A copy of this class resolves the URI again where it
    is unpickled (that node's environment, as before) and keeps the attempts.
    """

    def __init__(self, uri: str, attempts: int):
        resolved, path = pafs.FileSystem.from_uri(uri)
        options = {k: v for k, v in resolved.__reduce__()[1][0].items() if k != "retry_strategy"}
        super().__init__(retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=attempts), **options)
        self.uri, self.attempts = uri, attempts
        self.path = path  # the URI's path inside this filesystem: `bucket/prefix`

    def __reduce__(self):
        return RetryingS3FileSystem, (self.uri, self.attempts)


def ray_storage(path: str, wait_s: float) -> tuple[str, pafs.FileSystem | None]:
    """(storage_path, storage_filesystem) for Ray's RunConfig and Tuner.restore: an `s3://` URI becomes its path in a
    `RetryingS3FileSystem` whose requests keep retrying about `wait_s` seconds (`--storage-wait`) while the endpoint
    does not answer; anything else passes through with no filesystem (Ray resolves it as before). Paths that Ray
    reports back carry no scheme either way (`as_uri` puts it back)."""
    if not path.startswith("s3://"):
        return path, None
    fs = RetryingS3FileSystem(path, s3_attempts(wait_s))
    return fs.path, fs


def is_file(path: str) -> bool:
    fs, p = _fs(path)
    try:
        return fs.get_file_info(p).type == pafs.FileType.File
    except OSError:
        return False


def _fs(path: str) -> tuple[pafs.FileSystem, str]:
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), path


def write_bytes(path: str, data: bytes) -> None:
    fs, p = _fs(path)
    fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(p) as f:
        f.write(data)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode())


def read_text(path: str) -> str | None:
    fs, p = _fs(path)
    try:
        with fs.open_input_stream(p) as f:
            return f.read().decode()
    except (FileNotFoundError, OSError):
        return None


def check_writable(run_dir: str, flag: str = "--storage-path") -> None:
    """Fail before training, not after the first epoch, when outputs cannot be written (a bucket that does not
    exist, a folder without permission): `UserError` naming `flag`, the option the user set it with."""
    probe = f"{run_dir}/.write-probe-{uuid.uuid4().hex[:8]}"
    try:
        write_text(probe, "ok")
        fs, p = _fs(probe)
        fs.delete_file(p)
    except (OSError, PermissionError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"cannot write to {flag} {redact(run_dir)} ({redact(first)}): choose a writable "
                        "path") from None


def copy_file(src: str, dst: str) -> None:
    """One file from a path or URI to another (a trial's best.pt next to the sweep's results)."""
    fs, p = _fs(src)
    with fs.open_input_stream(p) as f:
        write_bytes(dst, f.read())


def upload_dir(local: str, dst: str) -> None:
    """A local folder's files to a path or URI (a checkpoint made on this node, for workers anywhere)."""
    fs, p = _fs(dst)
    fs.create_dir(p, recursive=True)
    pafs.copy_files(local, p, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def delete(path: str) -> None:
    fs, p = _fs(path)
    fs.delete_file(p)


def list_dirs(path: str, prefix: str = "") -> list[str]:
    """Names of the folders directly under `path` whose names start with `prefix`."""
    fs, p = _fs(path)
    try:
        infos = fs.get_file_info(pafs.FileSelector(p, allow_not_found=True))
    except OSError:
        return []
    return [i.base_name for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith(prefix)]


def delete_dir(path: str) -> None:
    fs, p = _fs(path)
    fs.delete_dir(p)
