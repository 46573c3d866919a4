"""A/A check of the benchmark machine: two identical vLLM servers, started one after the other.

On this project's 2-core VM the server started first runs 10-20% slower, for its whole life,
than an identical one started after it. Any side-by-side comparison that starts its arms in
a fixed order measures that, not the software. ``admission_overhead.py`` therefore restarts
its servers in rotated start orders (``--blocks``). Run this to see whether a machine has the
bias before trusting a single-block run on it.

    .venv/bin/python benchmarks/start_order_aa.py --rounds 6
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.admission_overhead import COOLDOWN_S, cpu_s, image_url, pin, run_arm, start, wait_ready
from tests.redis_server import free_port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=64)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="start-order-aa-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDGEMMA_")}
    env.update({"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "MEDGEMMA_DEV_MODEL_DIR": str(work / "dev")})
    serve = [sys.executable, "-m", "serving"]
    subprocess.check_call(serve + ["devmodel", str(work / "dev")], env=env, stdout=subprocess.DEVNULL)
    procs: dict[str, subprocess.Popen] = {}
    urls: dict[str, str] = {}
    try:
        for name in ("first", "second"):  # identical servers, one after the other
            port = free_port()
            engine_args = json.loads(subprocess.check_output(serve + ["engine-args", "--json", "--port", str(port)], env=env))
            procs[name] = start([sys.executable, "-m", "vllm.entrypoints.openai.api_server", *engine_args],
                                work / f"{name}.log", env)  # fmt: skip
            urls[name] = f"http://127.0.0.1:{port}"
            wait_ready(urls[name], "/health", procs[name])
        pin([proc.pid for proc in procs.values()])
        body = {
            "model": "medgemma-4b-it", "max_tokens": 32, "stream": True,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": image_url()}},
                {"type": "text", "text": "Describe this image."}]}],
        }  # fmt: skip
        for url in urls.values():
            asyncio.run(run_arm(url, None, 2, 8, body))
        rates: dict[str, list[float]] = {name: [] for name in procs}
        for rnd in range(args.rounds):
            for name in list(procs) if rnd % 2 == 0 else list(procs)[::-1]:
                time.sleep(COOLDOWN_S)
                cpu_before = cpu_s(procs[name].pid)
                ttfts, elapsed = asyncio.run(run_arm(urls[name], None, args.concurrency, args.requests, body))
                rates[name].append(args.requests / elapsed)
                print(f"round {rnd} {name:>6}: {args.requests / elapsed:6.2f} req/s, TTFT p50 "
                      f"{statistics.median(ttfts) * 1e3:6.1f} ms, API CPU "
                      f"{(cpu_s(procs[name].pid) - cpu_before) / args.requests * 1e3:5.2f} ms/req", flush=True)  # fmt: skip
        ratios = [a / b for a, b in zip(rates["first"], rates["second"])]
        print(f"throughput first/second per round: {', '.join(f'{r:.3f}' for r in ratios)}; "
              f"median {statistics.median(ratios):.3f} (1.0 = no start-order bias)")
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=60)
        print(f"logs: {work}")


if __name__ == "__main__":
    main()
