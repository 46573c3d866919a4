"""Soak: the server at saturation for a while, with faults, then: did anything leak?

Starts ``medgemma-serve serve`` on the dev checkpoint with a keys file of several accounts
and a real ``redis-server`` as its budget ledger. Clients (more than the accounts' budgets
and the engine's slots together) send streaming chat requests, half with a synthetic
radiograph, and a share of them disconnect mid-stream. Redis is restarted once, mid-run.
Every few seconds it samples the resident memory of the API server and engine processes.

At the end it prints, and writes as JSON: requests by outcome (status/code), 5xx beyond
the injected faults, units still held (our gauge and Redis' lease sets, after the lease
TTL), the memory slope after warm-up (MiB per 10 minutes, least squares), and pass/fail.

    .venv/bin/python benchmarks/soak.py --duration 600 --out results/soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serving.admission.keyadmin import add_key  # noqa: E402
from tests.redis_server import RedisServer, free_port  # noqa: E402

PLANS = {"clinic": 6, "practice": 4, "trial": 2}  # account -> concurrency units
LEASE_TTL_S = 5


def radiograph_url(seed: int) -> str:
    from loadtests.images import encode, generate

    return "data:image/jpeg;base64," + base64.b64encode(encode(generate("radiograph", seed, 512, 512), "JPEG")).decode()


def start_server(root: Path, keys_file: Path, redis_url: str, port: int, dev_model_dir: Path | None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDGEMMA_")}
    env.update({"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "MEDGEMMA_PORT": str(port)})
    if dev_model_dir is not None:
        env["MEDGEMMA_DEV_MODEL_DIR"] = str(dev_model_dir)
    argv = [sys.executable, "-m", "serving", "serve", "--keys-file", str(keys_file), "--redis-url", redis_url,
            "--lease-ttl-s", str(LEASE_TTL_S)]  # fmt: skip
    return subprocess.Popen(argv, stdout=(root / "server.log").open("w"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)  # fmt: skip


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("server exited during start-up")
        try:
            if httpx.get(url + "/ready", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    raise RuntimeError("server not ready")


def rss_mib(proc: subprocess.Popen) -> dict[str, float]:
    """Resident memory of the API server and of its engine processes (children)."""
    parent = psutil.Process(proc.pid)
    engine = 0.0
    for child in parent.children(recursive=True):
        try:
            engine += child.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return {"api_server": parent.memory_info().rss / 2**20, "engine": engine / 2**20}


def slope_per_10min(samples: list[tuple[float, float]]) -> float:
    if len(samples) < 3:
        return float("nan")
    xs, ys = [t for t, _ in samples], [v for _, v in samples]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx * 600 if sxx else float("nan")


async def client(url: str, key: str, stop_at: float, rng: random.Random, images: list[str], stats: Counter,
                 disconnect_share: float) -> None:  # fmt: skip
    async with httpx.AsyncClient(timeout=120) as http:
        while time.monotonic() < stop_at:
            content: list[dict] = [{"type": "text", "text": "Describe the findings in this study."}]
            if rng.random() < 0.5:
                content.insert(0, {"type": "image_url", "image_url": {"url": rng.choice(images)}})
            tokens = rng.randint(16, 96)
            body = {"model": "medgemma-4b-it", "messages": [{"role": "user", "content": content}],
                    "max_tokens": tokens, "min_tokens": tokens, "stream": True}  # fmt: skip
            leave_after = rng.randint(1, tokens) if rng.random() < disconnect_share else None
            try:
                async with http.stream("POST", url + "/v1/chat/completions", json=body,
                                       headers={"Authorization": f"Bearer {key}"}) as r:  # fmt: skip
                    if r.status_code != 200:
                        payload = json.loads(await r.aread())
                        stats[f"{r.status_code} {payload['error']['code']}"] += 1
                        if r.status_code == 429:
                            await asyncio.sleep(min(float(r.headers.get("retry-after", 1)), 2))
                        continue
                    chunks, last = 0, ""
                    async for line in r.aiter_lines():
                        if line.startswith("data: "):
                            chunks += 1
                            last = line
                            if leave_after is not None and chunks >= leave_after:
                                break
                    if leave_after is not None and chunks >= leave_after:
                        stats["200 client disconnected mid-stream"] += 1
                    elif '"error"' in last:
                        stats["200 stream ended with an error event"] += 1
                    else:
                        stats["200 ok"] += 1
            except httpx.HTTPError as exc:
                stats[f"transport {type(exc).__name__}"] += 1


def metric_sum(url: str, pattern: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(float(v) for v in re.findall(pattern + r" (\S+)$", text, re.M))


async def soak(args) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="medgemma-soak-"))
    redis = RedisServer(workdir / "redis").start()
    keys_file = workdir / "keys.yaml"
    keys_file.write_text("plans:\n" + "".join(f"  {a}: {{concurrency: {n}}}\n" for a, n in PLANS.items()))
    keys = {account: add_key(keys_file, account, account) for account in PLANS}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(workdir, keys_file, redis.url, port, args.dev_model_dir)
    result: dict = {"command": " ".join(sys.argv), "duration_s": args.duration, "clients": args.clients}
    try:
        wait_ready(url, proc)
        images = [radiograph_url(seed) for seed in range(8)]
        stats: Counter = Counter()
        began = time.monotonic()
        stop_at = began + args.duration
        rng = random.Random(args.seed)
        accounts = list(keys)
        tasks = [
            asyncio.ensure_future(client(url, keys[accounts[i % len(accounts)]], stop_at, random.Random(rng.random()),
                                         images, stats, args.disconnect_share))  # fmt: skip
            for i in range(args.clients)
        ]
        memory: list[dict] = []
        redis_restarted_at = None
        while time.monotonic() < stop_at:
            await asyncio.sleep(args.sample_s)
            elapsed = time.monotonic() - began
            memory.append({"t": round(elapsed, 1), **rss_mib(proc)})
            if redis_restarted_at is None and elapsed >= args.duration / 2:
                redis.stop()
                await asyncio.sleep(3)  # replicas fall back to their local share meanwhile
                redis.start()
                redis_restarted_at = round(elapsed, 1)
            done = sum(stats.values())
            print(f"[{elapsed:6.0f}s] requests {done}, api {memory[-1]['api_server']:.0f} MiB, "
                  f"engine {memory[-1]['engine']:.0f} MiB", flush=True)  # fmt: skip
        await asyncio.gather(*tasks)
        await asyncio.sleep(LEASE_TTL_S + 2)  # what a dead client or restart left expires

        warm = [m for m in memory if m["t"] >= args.warmup_s]
        inflight = metric_sum(url, r"^medgemma_inflight_units\{[^}]*\}")
        running = metric_sum(url, r"^vllm:num_requests_running\{[^}]*\}")
        import redis as redis_client

        r = redis_client.Redis.from_url(redis.url)
        leases = {k.decode(): r.zcard(k) for k in r.scan_iter("*leases*")}
        server_errors = {k: v for k, v in stats.items() if k[:1] == "5"}
        result.update({
            "outcomes": dict(stats.most_common()),
            "requests": sum(stats.values()),
            "redis_restarted_at_s": redis_restarted_at,
            "server_errors": server_errors,
            "units_held_at_end": inflight,
            "engine_requests_running_at_end": running,
            "redis_leases_at_end": sum(leases.values()),
            "rss_first_mib": memory[0] if memory else None,
            "rss_last_mib": memory[-1] if memory else None,
            "rss_slope_mib_per_10min": {
                part: round(slope_per_10min([(m["t"], m[part]) for m in warm]), 1) for part in ("api_server", "engine")
            },
            "memory_samples": memory,
            "server_alive": proc.poll() is None,
        })  # fmt: skip
        result["passed"] = (
            not server_errors and inflight == 0 and running == 0 and result["redis_leases_at_end"] == 0
            and result["server_alive"] and abs(result["rss_slope_mib_per_10min"]["api_server"]) < args.max_slope
        )  # fmt: skip
        return result
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=150)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        redis.stop()
        result["workdir"] = str(workdir)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=600, help="Seconds of load (default 600).")
    parser.add_argument("--clients", type=int, default=24, help="Concurrent clients (default 24).")
    parser.add_argument("--disconnect-share", type=float, default=0.15, help="Share of streams the client leaves.")
    parser.add_argument("--warmup-s", type=float, default=120, help="Memory samples before this are not fitted.")
    parser.add_argument("--sample-s", type=float, default=10, help="Seconds between memory samples.")
    parser.add_argument("--max-slope", type=float, default=50, help="Allowed API-server RSS slope, MiB/10 min.")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--dev-model-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="Write the result as JSON here.")
    args = parser.parse_args()
    result = asyncio.run(soak(args))
    summary = {k: v for k, v in result.items() if k != "memory_samples"}
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return 0 if result.get("passed") else 1


if __name__ == "__main__":
    sys.exit(main())
