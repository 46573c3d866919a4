"""TCP_NOTSENT_LOWAT on listeners: a client that stops reading blocks the server's writes
after tens of KiB, not after the kernel's whole send buffer (4 MiB here)."""

import socket

from serving.sockets import UNSENT_LIMIT_BYTES, limit_unsent, limit_unsent_listeners


def bytes_accepted_before_blocking(listener: socket.socket) -> int:
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a client that reads nothing
    client.connect(listener.getsockname())
    accepted, _ = listener.accept()
    accepted.setblocking(False)
    sent = 0
    try:
        while sent < 64 * 2**20:
            sent += accepted.send(b"x" * 65536)
    except BlockingIOError:
        pass
    finally:
        accepted.close()
        client.close()
    return sent


def test_a_limited_listener_stops_taking_writes_for_a_client_that_does_not_read():
    with socket.create_server(("127.0.0.1", 0)) as plain, socket.create_server(("127.0.0.1", 0)) as limited:
        assert limit_unsent(limited)
        unlimited_bytes = bytes_accepted_before_blocking(plain)
        limited_bytes = bytes_accepted_before_blocking(limited)
    assert limited_bytes <= 4 * UNSENT_LIMIT_BYTES, limited_bytes
    wmem_max = int(open("/proc/sys/net/ipv4/tcp_wmem").read().split()[2])
    if wmem_max >= 2**20:  # where the kernel's default would hold megabytes, it did
        assert unlimited_bytes > 2**20, unlimited_bytes


def test_this_processs_listeners_are_found_by_port():
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        assert limit_unsent_listeners(port)
        assert bytes_accepted_before_blocking(listener) <= 4 * UNSENT_LIMIT_BYTES
    assert not limit_unsent_listeners(1)  # nothing of ours listens there


def test_a_port_in_time_wait_is_waited_for_and_a_free_one_is_not():
    import asyncio
    import time

    from serving.sockets import port_busy, wait_for_ports

    listener = socket.create_server(("127.0.0.1", 0))  # no SO_REUSEADDR, like Ray's
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = listener.accept()
    accepted.close()  # the server closes first: its side stays in TIME_WAIT
    client.close()
    listener.close()
    time.sleep(0.1)
    assert port_busy("127.0.0.1", port)  # nobody listens, yet it cannot be bound
    waited = asyncio.run(wait_for_ports("127.0.0.1", range(port, port + 1), timeout_s=2.5))
    assert waited >= 2  # it waited (TIME_WAIT lasts a minute)
    with socket.create_server(("127.0.0.1", 0)) as free:
        other = free.getsockname()[1]
    assert asyncio.run(wait_for_ports("127.0.0.1", range(other, other + 1), timeout_s=5)) < 1
