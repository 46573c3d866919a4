"""What the Ray path costs: the same load through `medgemma-serve ray`, `medgemma-serve serve`
and straight to vLLM, side by side in one run.

Three arms on the dev checkpoint (CPU build of vLLM 0.32), the same engine arguments:
- ray: `medgemma-serve ray` with one replica (min = max = 1), requests to the replica's own
  port (Ray Serve direct ingress), admission on (open mode);
- serve: `medgemma-serve serve`, admission on (open mode): the same product without Ray;
- direct: vLLM's own OpenAI server.
Streamed chat requests with one image each, arms interleaved per round; every block restarts
all servers with the start order rotated (this VM runs the first-started server slower:
benchmarks/start_order_aa.py). Per arm: end-to-end p50, TTFT p50, throughput, and CPU per
request outside the engine (every process of the arm except vLLM's EngineCore and its
workers: for Ray that includes the replica, raylet, GCS, the Serve controller and the driver).

    .venv/bin/python benchmarks/ray_overhead.py --concurrency 1,8 --blocks 3 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.admission_overhead import (COOLDOWN_S, block_estimate, chat_body, one_request, pct, pin, start,
                                           wait_ready)
from tests.redis_server import free_port

RAY_PORT = 30400
ENGINE_NAMES = ("EngineCore", "VLLM::Worker", "VLLM::EngineCor")


def outside_engine_cpu_s(root_pid: int) -> float:
    """CPU seconds of a process tree, vLLM's engine processes left out."""
    total = 0.0
    try:
        root = psutil.Process(root_pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    for proc in procs:
        try:
            if any(name in proc.name() for name in ENGINE_NAMES):
                continue
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def kill_session(sid: int) -> None:
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid:
                proc.kill()
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass


async def run_arm(base: str, concurrency: int, requests: int, body: dict):
    url = base + "/v1/chat/completions"
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        left = list(range(requests))
        ttfts: list[float] = []
        e2es: list[float] = []

        async def worker():
            while left:
                left.pop()
                ttft, e2e = await one_request(client, url, {}, body)
                ttfts.append(ttft)
                e2es.append(e2e)

        began = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        return ttfts, e2es, time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--requests", type=int, default=24, help="requests per arm per round (at least 8 x concurrency)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ray-bench-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEDGEMMA_", "RAY_"))}
    env.update({"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "MEDGEMMA_DEV_MODEL_DIR": str(work / "dev"),
                "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(RAY_PORT), "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"})  # fmt: skip
    serve = [sys.executable, "-m", "serving"]
    subprocess.check_call(serve + ["devmodel", str(work / "dev")], env=env, stdout=subprocess.DEVNULL)
    port_serve, port_direct = free_port(), free_port()
    engine_args = json.loads(subprocess.check_output(serve + ["engine-args", "--json", "--port", str(port_direct)], env=env))
    common = ["--open-budget", "1000"]
    launch = {
        "ray": (serve + ["ray", "--profile", "cpu-dev", "--host", "127.0.0.1", "--num-cpus", "2", "--min-replicas", "1",
                         "--max-replicas", "1", "--ray-temp-dir", str(work / "ray"), *common], RAY_PORT, "/ready"),
        "serve": (serve + ["serve", "--port", str(port_serve), *common], port_serve, "/ready"),
        "direct": ([sys.executable, "-m", "vllm.entrypoints.openai.api_server", *engine_args], port_direct, "/health"),
    }  # fmt: skip
    body = chat_body(args.max_tokens)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    results = {c: {a: {"e2e": [], "ttft": [], "e2e_p50": [], "rate": [], "cpu": []} for a in launch} for c in concurrencies}
    names = list(launch)
    print(f"vLLM CPU build, dev checkpoint, {args.blocks} blocks x {args.rounds} rounds, max_tokens {args.max_tokens}, "
          f"one image per request, engines pinned to core 1", flush=True)  # fmt: skip
    for block in range(args.blocks):
        order = names[block % 3:] + names[:block % 3]
        procs: dict[str, subprocess.Popen] = {}
        try:
            for name in order:
                argv, port, ready_path = launch[name]
                procs[name] = start(argv, work / f"{name}.{block}.log", env)
                wait_ready(f"http://127.0.0.1:{port}", ready_path, procs[name], timeout_s=600)
            pin([p.pid for p in procs.values()])
            for name in names:
                asyncio.run(run_arm(f"http://127.0.0.1:{launch[name][1]}", 2, 8, body))  # warm up
            print(f"block {block + 1}: start order {','.join(order)}", flush=True)
            for concurrency in concurrencies:
                requests = max(args.requests, 8 * concurrency)
                for rnd in range(args.rounds):
                    arm_order = names[rnd % 3:] + names[:rnd % 3]
                    for name in arm_order:
                        time.sleep(COOLDOWN_S)
                        before = outside_engine_cpu_s(procs[name].pid)
                        ttfts, e2es, elapsed = asyncio.run(
                            run_arm(f"http://127.0.0.1:{launch[name][1]}", concurrency, requests, body))
                        r = results[concurrency][name]
                        r["cpu"].append((outside_engine_cpu_s(procs[name].pid) - before) / requests)
                        r["ttft"] += ttfts
                        r["e2e"] += e2es
                        r["e2e_p50"].append(pct(e2es, 0.5))
                        r["rate"].append(requests / elapsed)
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGTERM)
                    try:
                        proc.wait(timeout=120)
                    except subprocess.TimeoutExpired:
                        os.killpg(proc.pid, signal.SIGKILL)
                kill_session(proc.pid)  # Ray gives its workers process groups of their own
    print(f"{'conc':>4} {'arm':>7} {'e2e_p50_ms':>10} {'ttft_p50_ms':>11} {'req/s':>7} {'cpu_ms/req outside engine':>26}")
    for c in concurrencies:
        for name in names:
            r = results[c][name]
            print(f"{c:>4} {name:>7} {pct(r['e2e'], .5) * 1e3:>10.1f} {pct(r['ttft'], .5) * 1e3:>11.1f} "
                  f"{statistics.median(r['rate']):>7.2f} {statistics.median(r['cpu']) * 1e3:>26.2f}")  # fmt: skip
        for x, y in (("ray", "direct"), ("ray", "serve"), ("serve", "direct")):
            a, b = results[c][x], results[c][y]
            e2e = [(p - q) * 1e3 for p, q in zip(a["e2e_p50"], b["e2e_p50"])]
            ratio = [p / q for p, q in zip(a["rate"], b["rate"])]
            cpu = [(p - q) * 1e3 for p, q in zip(a["cpu"], b["cpu"])]
            e2e_b, _ = block_estimate(e2e, args.blocks, log=False)
            ratio_b, ratio_blocks = block_estimate(ratio, args.blocks, log=True)
            cpu_b, _ = block_estimate(cpu, args.blocks, log=False)
            print(f"{c:>4} {x} vs {y}: E2E p50 delta {statistics.median(e2e):+.1f} ms (balanced {e2e_b:+.1f}), "
                  f"throughput ratio {statistics.median(ratio):.3f} (balanced {ratio_b:.3f}, blocks "
                  f"{', '.join(f'{v:.3f}' for v in ratio_blocks)}), CPU delta {statistics.median(cpu):+.2f} ms/req "
                  f"(balanced {cpu_b:+.2f})")  # fmt: skip
    print(f"logs: {work}")
    if not os.environ.get("KEEP_BENCH_DIR"):
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
