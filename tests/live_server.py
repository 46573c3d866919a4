"""One real vLLM CPU server on the dev checkpoint for the whole test session.

It is started through the product's own CLI with default settings (only the port and
the dev checkpoint's cache folder differ), so the tests exercise what ``make serve`` runs.

Every server runs as pid 1 of a pid namespace of its own (``unshare --pid --fork
--mount-proc``), as ``medgemma-serve serve`` does in a container: two replicas then have
the same process ids, as two pods do. Signals meant for the server go to that process
(``Server.send_signal``), not to ``unshare``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from serving.admission.keyadmin import add_key
from tests.redis_server import free_port

# Plans of the session server: "main" for the API tests, "pair" (2 units) for budget tests,
# "loadtest"/"loadtest-small" for the load-test harness's multi-key run.
TEST_PLANS = {
    "big": {"concurrency": 64}, "two": {"concurrency": 2}, "one": {"concurrency": 1},
    # one account each, so units by plan are units by account (test_properties_live)
    "prop1": {"concurrency": 1}, "prop2": {"concurrency": 2}, "prop3": {"concurrency": 3},
    # priority classes (test_priority): a clinic that may ask for STAT, a backlog that is batch
    "clinic": {"concurrency": 8, "priority": {"max": "stat", "default": "interactive"}},
    "bulk": {"concurrency": 64, "priority": {"max": "batch", "default": "batch"}},
}  # fmt: skip
TEST_ACCOUNTS = {
    "main": "big", "pair": "two", "pair-disconnect": "two", "loadtest": "big", "loadtest-small": "one",
    "batch-one": "one", "batch-two": "two", "prop-a": "prop1", "prop-b": "prop2", "prop-c": "prop3",
    "stat-clinic": "clinic", "backlog": "bulk", "usage-a": "two", "usage-b": "two",
}  # fmt: skip
START_TIMEOUT_S = float(os.environ.get("MEDGEMMA_TEST_START_TIMEOUT_S", "300"))


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log_path: Path
    dev_model_dir: Path
    keys: dict[str, str]  # account -> API key
    namespaced: bool = False  # pid 1 of a pid namespace of its own (unshare)
    keys_file: Path | None = None
    usage_log: Path | None = None  # where its usage records go (MEDGEMMA_USAGE_LOG)
    ready_history: list[int] = field(default_factory=list)
    # What the port answered while the engine was still loading (first 503 from /ready).
    while_loading: dict[str, httpx.Response] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    @property
    def serving_pid(self) -> int:
        """The host pid of ``medgemma-serve serve`` (pid 1 inside its namespace)."""
        if not self.namespaced:
            return self.process.pid
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            children = psutil.Process(self.process.pid).children()
            if children:
                return children[0].pid
            time.sleep(0.05)
        raise RuntimeError("unshare started no server process")

    def send_signal(self, sig: int) -> None:
        os.kill(self.serving_pid, sig)

    def assert_alive(self) -> None:
        assert self.process.poll() is None, "server exited:\n" + self.log()[-4000:]
        assert httpx.get(self.url + "/health", timeout=10).status_code == 200


def wait_for(condition, timeout_s: float, poll_s: float = 0.1) -> bool:
    """Poll ``condition`` until it holds or ``timeout_s`` passes; its last answer."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(poll_s)
    return bool(condition())


def raw_post(server: Server, path: str, key: str, body: dict, rcvbuf: int | None = None):
    """A POST on a socket of the test's own, returned open: a client that can stop reading
    (``rcvbuf``: a small receive window, set before connecting) or just leave (close it)."""
    import json
    import socket

    payload = json.dumps(body).encode()
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect((host, int(port)))
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {key}\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload
    )
    return sock


def wait_ready(server: Server) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError("server exited during start-up:\n" + server.log()[-6000:])
        try:
            status = httpx.get(server.url + "/ready", timeout=5).status_code
        except httpx.TransportError:
            status = 0
        if not server.ready_history or server.ready_history[-1] != status:
            server.ready_history.append(status)
        if status == 503 and not server.while_loading:
            server.while_loading = {
                "health": httpx.get(server.url + "/health", timeout=5),
                "chat": httpx.post(
                    server.url + "/v1/chat/completions",
                    json={"model": "medgemma-4b-it", "messages": [{"role": "user", "content": "hi"}]},
                    timeout=5,
                ),
            }
        if status == 200:
            return
        time.sleep(0.25)
    raise RuntimeError(f"server not ready after {START_TIMEOUT_S}s:\n" + server.log()[-6000:])


def write_keys(path: Path, accounts: dict[str, str]) -> dict[str, str]:
    """A keys file with TEST_PLANS and one key per account; returns account -> key."""
    path.write_text(yaml.safe_dump({"plans": TEST_PLANS}))
    return {account: add_key(path, account, plan) for account, plan in accounts.items()}


def pid_namespace_prefix() -> list[str]:
    """``unshare`` arguments that start a command as pid 1 of a new pid namespace (root only)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.fail("the tests run servers in pid namespaces of their own (unshare, as root), "
                    "as containers do; run them as root")  # fmt: skip
    return ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"]


def launch(root: Path, keys_file: Path | None, keys: dict[str, str], *args: str, dev_model_dir: Path | None = None,
           env_extra: dict[str, str] | None = None) -> Server:  # fmt: skip
    """Start ``medgemma-serve serve`` as pid 1 of its own pid namespace, in its own process
    group (no wait)."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDGEMMA_")}
    dev_model_dir = dev_model_dir or root / "devmodel"
    env.update(
        {
            "MEDGEMMA_DEV_MODEL_DIR": str(dev_model_dir),
            "MEDGEMMA_PORT": str(port),
            "HF_HUB_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "MEDGEMMA_USAGE_LOG": str(root / "usage.jsonl"),  # each test server its own records
            **(env_extra or {}),
        }
    )
    log_path = root / "server.log"
    process = subprocess.Popen(
        [*pid_namespace_prefix(), sys.executable, "-m", "serving", "serve",
         *(["--keys-file", str(keys_file)] if keys_file is not None else []), *args],  # fmt: skip
        stdout=log_path.open("w"),
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    usage_log = env.get("MEDGEMMA_USAGE_LOG")
    return Server(f"http://127.0.0.1:{port}", process, log_path, dev_model_dir, keys, namespaced=True,
                  keys_file=keys_file, usage_log=Path(usage_log) if usage_log else None)  # fmt: skip


def stop(server: Server, sig: int = signal.SIGTERM) -> None:
    if server.process.poll() is None:
        os.killpg(server.process.pid, sig)
        try:
            server.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait()


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> Server:
    root = tmp_path_factory.mktemp("server")
    keys_file = root / "keys.yaml"
    # Per-account metrics on: the dashboard's account row queries them.
    srv = launch(root, keys_file, write_keys(keys_file, TEST_ACCOUNTS), env_extra={"MEDGEMMA_ACCOUNT_METRICS": "true"})
    try:
        wait_ready(srv)
        yield srv
    finally:
        stop(srv)


API_PROCESSES = 2


def wait_every_api_process(srv: Server, count: int = API_PROCESSES) -> None:
    """Ready, and every API process up (``/ready`` answers once the first one is)."""
    wait_ready(srv)
    every = [f"API process {i} ready" for i in range(count)]
    assert wait_for(lambda: all(line in srv.log() for line in every), 60), srv.log()[-4000:]


def usage_by_process(srv: Server, count: int = API_PROCESSES) -> dict[int, list[dict]]:
    """Each API process's usage records (one usage file per process)."""
    import json

    found = {}
    for process in range(count):
        path = srv.usage_log.with_name(f"{srv.usage_log.stem}-api{process}{srv.usage_log.suffix}")
        found[process] = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return found


@pytest.fixture(scope="session")
def multi_server(tmp_path_factory, server) -> Server:
    """The same server with two API processes in front of its engine (``--api-processes``):
    one budget shared through the host ledger, the engine's capacity split between them."""
    root = tmp_path_factory.mktemp("multi")
    keys_file = root / "keys.yaml"
    srv = launch(root, keys_file, write_keys(keys_file, TEST_ACCOUNTS), "--api-processes", str(API_PROCESSES),
                 dev_model_dir=server.dev_model_dir)  # fmt: skip
    try:
        wait_every_api_process(srv)
        yield srv
    finally:
        stop(srv)


@pytest.fixture(scope="session")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.base_url, api_key=server.keys["main"], max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def processor(server):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(server.dev_model_dir)


@pytest.fixture
def spawn_client():
    """Starts a client function in its own interpreter (spawn, daemon) and kills it at teardown.

    Clients run in processes of their own so that a busy stream does not starve the test's
    probes of the GIL (see test_drain). One still running when its test fails must not
    outlive the test: blocked on a full result queue, it would hold pytest's exit forever.
    """
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    started: list = []

    def start(target, *args):
        process = context.Process(target=target, args=args, daemon=True)
        process.start()
        started.append(process)
        return process

    start.context = context
    yield start
    for process in started:
        if process.is_alive():
            process.kill()
        process.join(10)
