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
on each, once. Both are no-ops where the platform has no such option.
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
