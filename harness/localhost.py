"""What the harness asks of this machine: free loopback ports, and a process's /proc fields.

Every fixture that starts a server (emulators, SeaweedFS, Triton) picks its ports
here, and everything that reads ``/proc/<pid>/stat`` (process liveness in the
Triton fixtures, CPU accounting in the benchmarks) parses it here, once.
"""

from __future__ import annotations

import socket

LOOPBACK = "127.0.0.1"


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on the loopback a moment ago.

    All are held open until all are picked, so no two are the same; another
    process may still take one before the caller binds it (callers retry).
    """
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(sock)
            sock.bind((LOOPBACK, 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for sock in socks:
            sock.close()


def free_port() -> int:
    """One TCP port free on the loopback a moment ago."""
    (port,) = free_ports(1)
    return port


def port_is_free(port: int) -> bool:
    """True if ``port`` can be bound on the loopback right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
        return True


def stat_fields(path: str) -> list[str] | None:
    """The fields of a ``/proc/.../stat`` file after the command name, or None if unreadable.

    The command name is in parentheses and may itself hold spaces and ')': the
    fields start after the last ')'. Index 0 is the state, 1 the parent's pid,
    11-14 utime, stime, cutime and cstime in clock ticks (proc(5) fields 3, 4, 14-17).
    """
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            text = handle.read()
    except OSError:
        return None
    cut = text.rfind(")")
    if cut < 0:
        return None
    return text[cut + 1 :].split()
