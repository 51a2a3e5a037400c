"""Proof that a test touches no network: `install()` makes every IP connect and every name lookup
fail with OSError and records it (in the returned list, and in `log_path` when given, one line
each, for a subprocess: `sitecustomize_source` starts it there); `guarded()` for a block of this
process. Unix sockets stay allowed."""

from __future__ import annotations

import contextlib
import socket

IP_FAMILIES = (socket.AF_INET, socket.AF_INET6)


def install(log_path: str | None = None) -> list[str]:
    attempts: list[str] = []

    def refuse(what: str):
        attempts.append(what)
        if log_path:
            with open(log_path, "a", encoding="utf-8") as log:
                log.write(what + "\n")
        raise OSError(f"network access in an offline test: {what}")

    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def connect(self, address):
        if self.family in IP_FAMILIES:
            refuse(f"connect {address!r}")
        return real_connect(self, address)

    def connect_ex(self, address):
        if self.family in IP_FAMILIES:
            refuse(f"connect_ex {address!r}")
        return real_connect_ex(self, address)

    def getaddrinfo(host, port, *args, **kwargs):
        refuse(f"getaddrinfo {host!r} {port!r}")

    socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = connect, connect_ex, getaddrinfo
    return attempts


@contextlib.contextmanager
def guarded(log_path: str | None = None):
    """`install()` for the block, yielding the attempts list; the real functions come back after."""
    saved = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo
    try:
        yield install(log_path)
    finally:
        socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = saved


def sitecustomize_source(log_path: str) -> str:
    """A `sitecustomize.py` that installs the guard in every Python started with its folder (and
    this one's) on PYTHONPATH."""
    return f"import network_guard\nnetwork_guard.install({log_path!r})\n"
