"""What a run shows on the console, and where the rest goes.

The driver prints one line per epoch (a bar when stdout is a terminal) and the final table. Everything the
workers print (Ultralytics' progress and tables, Ray Train's own worker logs) goes to the run's log file,
`<storage>/<name>/run.log`, and comes back to the console only with `--verbose`. Ray's forwarding of worker
output is switched with its own setting, `ray.init(log_to_driver=...)`; nothing is filtered by text.

Rank 0 hands each epoch's metrics to the driver through a `ray.util.queue.Queue` (an actor that asks for no
CPU, so it never competes with the workers for the cluster), and the few lines the console must show from it
(the tracking server stopped or started answering) as `{"note": line}`.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

LOG_NAME = "run.log"


def log_path(storage_path: str, name: str) -> str:
    """The run's log file: in the run folder when that is a local path, else in a local temporary folder
    (a bucket cannot be appended to line by line)."""
    if "://" in storage_path:
        return str(Path(tempfile.gettempdir()) / "raytrain_yolo" / name / LOG_NAME)
    return str(Path(storage_path) / name / LOG_NAME)


def publish_log(local: str, dest: str) -> bool:
    """With object storage the run's log is written node-locally (log_path); at the run's end it is copied to `dest`
    in the storage and removed from the node, with its folder when nothing else is in it (each node kept one for
    ever). A copy that fails leaves the local file, and says where it is. Returns whether it was copied."""
    from raytrain_yolo.core import storage

    path = Path(local)
    if not path.is_file():
        return False
    try:
        storage.write_text(dest, path.read_text(errors="replace"))
    except Exception as e:  # noqa: BLE001 - the run is over; its log stays where it is
        print(f"warning: the log {local} could not be copied to {storage.redact(dest)} ({type(e).__name__}): it "
              "stays there", file=sys.stderr, flush=True)
        return False
    path.unlink(missing_ok=True)
    try:
        path.parent.rmdir()
    except OSError:
        pass  # another run's file, or a run of the same name still writing
    return True


def _open_append(path: str) -> int:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)


_FIRST_FDS: tuple[int, int] | None = None  # where fds 1 and 2 went before the first capture in this process


def capture_process_output(path: str, echo: bool, header: str) -> None:
    """Send this process's stdout and stderr (file descriptors 1 and 2, so C code and child processes too)
    to `path`; with `echo`, also to where they went before the first capture. A Ray Train worker lives for one
    run; a warm group's worker (sweep/warm.py) captures again for each trial, into that trial's log only."""
    global _FIRST_FDS
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    if _FIRST_FDS is None:
        _FIRST_FDS = (os.dup(1), os.dup(2))
    else:  # the previous capture's file or tee ends here (its pump thread reads EOF)
        os.dup2(_FIRST_FDS[0], 1)
        os.dup2(_FIRST_FDS[1], 2)
    fd = _open_append(path)
    os.write(fd, f"\n===== {header} =====\n".encode())
    if not echo:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        return
    original = _FIRST_FDS[0]
    read_end, write_end = os.pipe()
    os.dup2(write_end, 1)
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump() -> None:
        while chunk := os.read(read_end, 65536):
            os.write(fd, chunk)
            os.write(original, chunk)
        os.close(fd)
        os.close(read_end)

    threading.Thread(target=pump, name="raytrain-yolo-log-tee", daemon=True).start()


@contextmanager
def output_to(path: str | None):
    """Within the block, this process's stdout and stderr go to `path` (nothing changes when it is None)."""
    if path is None:
        yield
        return
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    fd = _open_append(path)
    saved = os.dup(1), os.dup(2)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    try:
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in (*saved, fd):
            os.close(f)


def _short(key: str) -> str:
    return key.split("/", 1)[-1].replace("_loss", "")


def epoch_line(m: dict[str, Any], epochs: int, eta_s: float | None) -> str:
    """`epoch  3/20  box 1.234  cls 2.345  l1 0.071  mAP50(B) 0.412  mAP50-95(B) 0.221  71.2 img/s  ETA 1m05s`"""
    width = len(str(epochs))
    parts = [f"epoch {int(m['epoch']):>{width}}/{epochs}"]
    parts += [f"{_short(k)} {v:.3f}" for k, v in m.items() if k.startswith("train/") and k.endswith("_loss")]
    parts += [f"{_short(k)} {v:.3f}" for k, v in m.items() if k.startswith("metrics/mAP")]
    ips = m.get("throughput/images_per_second")
    parts.append(f"{ips:.1f} img/s" if ips else "- img/s")
    if eta_s is not None:
        minutes, seconds = divmod(int(round(eta_s)), 60)
        parts.append(f"ETA {minutes}m{seconds:02d}s")
    return "  ".join(parts)


class EpochPrinter:
    """Driver side: a thread that takes rank 0's per-epoch metrics off the queue and prints them."""

    def __init__(self, queue, epochs: int, out: TextIO | None = None):
        self.queue, self.epochs = queue, epochs
        self.out = out or sys.stdout
        self.tty = self.out.isatty()
        self.epoch_seconds: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="raytrain-yolo-epochs", daemon=True)

    def __enter__(self) -> EpochPrinter:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._drain()
        if self.tty:
            self.out.write("\n")
            self.out.flush()
        try:
            self.queue.shutdown()
        except Exception:  # noqa: BLE001 - the cluster may already be gone (Ctrl-C, lost head)
            pass

    def _run(self) -> None:
        from ray.util.queue import Empty

        while not self._stop.is_set():
            try:
                self.show(self.queue.get(timeout=0.5))
            except Empty:
                continue
            except Exception:  # noqa: BLE001 - the queue's actor is gone: the run is ending
                return

    def _drain(self) -> None:
        try:
            while not self.queue.empty():
                self.show(self.queue.get_nowait())
        except Exception:  # noqa: BLE001
            pass

    def show(self, metrics: dict[str, Any]) -> None:
        if "note" in metrics:  # a line of rank 0's that the console must show (the tracking server is down)
            self.out.write(("\n" if self.tty else "") + f"{metrics['note']}\n")
            self.out.flush()
            return
        if metrics.get("throughput/epoch_seconds"):
            self.epoch_seconds.append(float(metrics["throughput/epoch_seconds"]))
        left = self.epochs - int(metrics["epoch"])
        eta = sum(self.epoch_seconds) / len(self.epoch_seconds) * left if self.epoch_seconds else None
        line = epoch_line(metrics, self.epochs, eta)
        if self.tty:
            done = int(20 * int(metrics["epoch"]) / max(self.epochs, 1))
            self.out.write(f"\r\033[K[{'#' * done}{'.' * (20 - done)}] {line}")
        else:
            self.out.write(line + "\n")
        self.out.flush()


@contextmanager
def ultralytics_quiet():
    """Within the block Ultralytics' LOGGER says warnings only (its TQDM bars are off above INFO too)."""
    from ultralytics.utils import LOGGER

    level = LOGGER.level
    LOGGER.setLevel(logging.WARNING)
    try:
        yield
    finally:
        LOGGER.setLevel(level)
