"""Run outputs on a local path or a cloud URI, through pyarrow's filesystems (the same ones Ray Train uses)."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

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
