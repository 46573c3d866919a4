"""A real redis-server on a free loopback port, for the tests that need one."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    def __init__(self, workdir: Path, port: int | None = None, password: str | None = None):
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed; `make test` installs it")
        self.binary = binary
        self.workdir = workdir
        self.port = port or free_port()
        self.password = password
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir),
             *(["--requirepass", self.password] if self.password else [])],
            stdout=(self.workdir / "redis.log").open("a"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(64).startswith((b"+PONG", b"-NOAUTH")):
                        return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None


def leased_units(url: str, account: str, live: bool = False) -> int:
    """The units of ``account``'s leases in the Redis at ``url`` now (members ``id|units``):
    expired ones included until an acquire drops them, or with ``live`` only those the
    ledger counts (unexpired by Redis's clock)."""
    import redis as redis_sync

    client = redis_sync.Redis.from_url(url)
    key = f"medgemma:leases:{{{account}}}"
    if live:
        seconds, micros = client.time()
        members = client.zrangebyscore(key, f"({seconds * 1000 + micros // 1000}", "+inf")
    else:
        members = client.zrange(key, 0, -1)
    return sum(int(m.rsplit(b"|", 1)[1]) for m in members)
