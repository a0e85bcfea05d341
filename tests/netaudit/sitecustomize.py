"""Loaded at start-up by every Python process of a test run whose PYTHONPATH starts with this folder (the CLI,
Ray's own processes, the Train workers): records each attempt to reach another machine, made or refused.

Python's audit events see every `socket.connect`, `socket.sendto` and `socket.getaddrinfo` made through the
socket module, whichever library makes it. Loopback and this host's own name do not count.
"""

import os
import socket
import sys

_LOG = os.environ.get("NETAUDIT_LOG")
_LOCAL_NAMES = {"localhost", "", "0.0.0.0", "::", socket.gethostname()}


def _local(host) -> bool:
    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    host = str(host)
    return host in _LOCAL_NAMES or host.startswith("127.") or host in ("::1",) or host.endswith(".localhost")


def _record(what: str, target) -> None:
    try:
        with open(_LOG, "a") as f:
            f.write(f"{os.getpid()} {' '.join(sys.argv)[:120]!r} {what} {target!r}\n")
    except OSError:
        pass


def _hook(event: str, args) -> None:
    if event == "socket.connect":
        sock, address = args
        if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM \
                and not _local(address[0]):
            _record("connect", address)
    elif event == "socket.sendto":
        sock, address = args
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _local(address[0]):
            _record("sendto", address)
    elif event == "socket.getaddrinfo":
        if not _local(args[0]):
            _record("getaddrinfo", args[0])


if _LOG:
    sys.addaudithook(_hook)
