"""How much of a response the kernel may hold for a client that is not reading.

A stalled client is detected when our send waits (``AdmissionMiddleware.end_stalled``),
and a send only waits once the kernel refuses more bytes. By default Linux keeps
accepting writes until the socket's send buffer reaches ``net.ipv4.tcp_wmem``'s maximum
(4 MiB here, about 20,000 token events), so a client that never reads could hold its
units for minutes. ``TCP_NOTSENT_LOWAT`` caps the bytes queued but not yet sent: writes
block once ``UNSENT_LIMIT_BYTES`` wait for the client's window, so a stall is seen
within the stall timeout. Accepted sockets inherit the option from their listener.

Guarantee: ``limit_unsent`` sets it on a listening socket; ``limit_unsent_listeners``
finds this process's own listening sockets (Ray Serve binds the replica's) and sets it
on each, once. Both are no-ops where the platform has no such option. ``wait_for_ports``
lets a Ray replacement replica take its predecessor's port (see there).
"""

from __future__ import annotations

import logging
import os
import socket

logger = logging.getLogger(__name__)

UNSENT_LIMIT_BYTES = 64 * 1024
TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25 if os.uname().sysname == "Linux" else None)


def limit_unsent(sock: socket.socket, limit_bytes: int = UNSENT_LIMIT_BYTES) -> bool:
    """Cap the unsent bytes of ``sock`` (and of every socket it accepts); False if unsupported."""
    if TCP_NOTSENT_LOWAT is None:
        return False
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, limit_bytes)
    except OSError:
        return False
    return True


_done_ports: set[int] = set()


def limit_unsent_listeners(ports: range | int, limit_bytes: int = UNSENT_LIMIT_BYTES) -> bool:
    """Set the cap on this process's listening sockets on ``ports`` (each port once);
    True if one was found."""
    import psutil

    ports = range(ports, ports + 1) if isinstance(ports, int) else ports
    found = False
    for conn in psutil.Process().net_connections(kind="tcp"):
        if conn.status != psutil.CONN_LISTEN or not conn.laddr or conn.fd < 0:
            continue
        port = conn.laddr.port
        if port not in ports:
            continue
        if port in _done_ports:
            found = True
            continue
        dup = socket.socket(fileno=os.dup(conn.fd))  # the same socket: options apply to both
        try:
            limited = limit_unsent(dup, limit_bytes)
        finally:
            dup.close()
        if limited:
            found = True
            _done_ports.add(port)
            logger.info("port %d: at most %d unsent bytes per client (a stalled reader is seen)", port, limit_bytes)
    return found


def port_busy(host: str, port: int) -> bool:
    """True when nobody listens on ``port`` yet it cannot be bound: the closed connections
    of a previous listener linger in TIME_WAIT (up to 60 s on Linux)."""
    probe = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        probe.bind((host, port))
        return False
    except OSError:
        return True
    finally:
        probe.close()


def listening_ports() -> set[int]:
    import psutil

    try:
        return {c.laddr.port for c in psutil.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN and c.laddr}
    except psutil.Error:  # not allowed to look: the bind probes still tell TIME_WAIT apart
        return set()


async def wait_for_ports(host: str, ports: range, timeout_s: float = 75.0) -> float:
    """Wait until every port of ``ports`` that nobody listens on can be bound, and, where
    the range is a single port (one replica per Kubernetes pod), until that port is free;
    returns the seconds waited (at most ``timeout_s``).

    Ray Serve binds a replica's direct-ingress socket without SO_REUSEADDR, so a port whose
    previous replica was killed with connections open fails to bind until their TIME_WAIT
    ends, and Ray then blocks that port for good: on a one-port pod the replacement could
    never serve. Called at the end of the replica's constructor, just before Ray binds."""
    import asyncio
    import time

    began = time.monotonic()
    while time.monotonic() - began < timeout_s:
        listening = listening_ports()
        busy = [p for p in ports if p not in listening and port_busy(host, p)]
        if not busy and not (len(ports) == 1 and ports[0] in listening):
            break
        await asyncio.sleep(1.0)
    waited = time.monotonic() - began
    if waited >= 1:
        logger.info("waited %.0fs for the direct-ingress ports to be free", waited)
    return waited
