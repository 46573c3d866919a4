"""Image requests per second with one API process and with two, side by side.

Issue 15's goal: with two API processes (``--api-processes 2``) the front end takes at least
1.6x the image requests per second of one, engine work kept minimal (``max_tokens`` 1).
This starts ``medgemma-serve serve`` on the dev checkpoint (CPU build of vLLM 0.32) with
each arm's process count, one server at a time (they would compete for the cores), and
sends unique images (no processor cache hit) from ``--concurrency`` connections at once,
``--requests`` per measurement. The arms take turns, the order rotated every round; it
prints each round's requests per second, the CPU seconds per request of the API processes
and of the engine's processes, and the median ratio.

    .venv/bin/python benchmarks/api_processes.py --rounds 3

On this 2-core machine the engine's processes, the client and both API processes share two
cores: the ratio here is a floor for a GPU host, where the engine runs on the GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
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

from benchmarks.admission_overhead import start, wait_ready  # noqa: E402
from benchmarks.frontend_cpu import image_bodies  # noqa: E402
from tests.redis_server import free_port  # noqa: E402

WORKLOADS = {  # name: (kind, side, format)
    "2048 JPEG": ("radiograph", 2048, "JPEG"),
    "3000 PNG": ("radiograph", 3000, "PNG"),
}


def launch(processes: int, work: Path, env: dict, vllm_args: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    argv = [sys.executable, "-m", "serving", "serve", "--port", str(port), "--api-processes", str(processes),
            "--open-budget", "256", "--max-body-mib", "64", "--", *vllm_args]  # fmt: skip
    proc = start(argv, work / f"api{processes}.log", env)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, "/ready", proc)
    if processes > 1:  # every API process up, not only the first
        deadline = time.monotonic() + 120
        while (work / f"api{processes}.log").read_text().count("API process") < processes:
            if time.monotonic() > deadline:
                raise RuntimeError("not every API process came up")
            time.sleep(0.5)
    return proc, url


def cpu_by_role(root: int) -> tuple[float, float]:
    """CPU seconds (user + system) of the API processes and of the engine's processes. With
    one API process it is ``root`` itself; with several, vLLM names them ``VLLM::APIServer_i``
    (the parent only watches)."""
    def seconds(proc: psutil.Process) -> float:
        times = proc.cpu_times()
        return times.user + times.system

    children = []
    for proc in psutil.Process(root).children(recursive=True):
        try:
            children.append((proc.name(), seconds(proc)))
        except psutil.Error:
            continue
    api = [s for name, s in children if name.startswith("VLLM::APIServer")] or [seconds(psutil.Process(root))]
    engine = [s for name, s in children if name.startswith(("VLLM::EngineCor", "VLLM::Worker"))]
    return sum(api), sum(engine)


async def send(url: str, bodies: list[bytes], concurrency: int) -> float:
    """Requests per second for ``bodies`` sent over ``concurrency`` connections."""
    queue = list(bodies)
    headers = {"content-type": "application/json"}

    async def worker(client: httpx.AsyncClient) -> None:
        while queue:
            body = queue.pop()
            response = await client.post(url + "/v1/chat/completions", content=body, headers=headers)
            if response.status_code != 200:
                raise RuntimeError(f"{response.status_code} {response.text[:300]}")

    clients = [httpx.AsyncClient(timeout=300) for _ in range(concurrency)]
    try:
        await asyncio.gather(*(c.get(url + "/health") for c in clients))  # connections open first
        started = time.perf_counter()
        await asyncio.gather(*(worker(c) for c in clients))
        return len(bodies) / (time.perf_counter() - started)
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=48, help="requests per measurement")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="each arm's turns; the order rotates every round")
    parser.add_argument("--arms", default="1,2", help="API process counts; the first is the baseline")
    parser.add_argument("--json", type=Path, help="also write the per-round numbers here")
    parser.add_argument("--same-image", action="store_true",
                        help="the same image every request, with the processor cache off: the API "
                        "processes do all their work every time, the engine's encoder and prefix "
                        "caches make its own nearly nothing")  # fmt: skip
    args = parser.parse_args()
    arms = [int(a) for a in args.arms.split(",")]
    work = Path(tempfile.mkdtemp(prefix="api-processes-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDGEMMA_")}
    env |= {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "MEDGEMMA_DEV_MODEL_DIR": str(work / "dev")}
    subprocess.check_call([sys.executable, "-m", "serving", "devmodel", str(work / "dev")], env=env,
                          stdout=subprocess.DEVNULL)  # fmt: skip
    loads = {name: image_bodies(kind, side, fmt, None, args.requests) for name, (kind, side, fmt) in WORKLOADS.items()}
    vllm_args = []
    if args.same_image:
        loads = {name: [bodies[0]] * len(bodies) for name, bodies in loads.items()}
        vllm_args = ["--mm-processor-cache-gb", "0"]
    print(f"arms {arms} API processes, {args.rounds} round(s), {args.requests} requests at concurrency "
          f"{args.concurrency}, {psutil.cpu_count()} cores", flush=True)  # fmt: skip
    results = {arm: {name: [] for name in loads} for arm in arms}
    try:
        for round_index in range(args.rounds):
            order = arms[round_index % len(arms):] + arms[:round_index % len(arms)]
            for arm in order:
                proc, url = launch(arm, work, env, vllm_args)
                try:
                    asyncio.run(send(url, loads["2048 JPEG"][:8], args.concurrency))  # warm up
                    for name, bodies in loads.items():
                        api_before, other_before = cpu_by_role(proc.pid)
                        rate = asyncio.run(send(url, bodies, args.concurrency))
                        api_after, other_after = cpu_by_role(proc.pid)
                        per = 1000 / len(bodies)
                        results[arm][name].append({"req_s": rate, "api_ms": (api_after - api_before) * per,
                                                   "engine_ms": (other_after - other_before) * per})  # fmt: skip
                        print(f"round {round_index + 1}, {arm} API process(es), {name}: {rate:.2f} req/s, "
                              f"API {results[arm][name][-1]['api_ms']:.0f} ms/req, "
                              f"engine {results[arm][name][-1]['engine_ms']:.0f} ms/req", flush=True)  # fmt: skip
                finally:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(timeout=180)
    finally:
        if not os.environ.get("KEEP_BENCH_DIR"):
            shutil.rmtree(work, ignore_errors=True)
    baseline = arms[0]
    print("| workload | " + " | ".join(f"{a} API process(es) req/s" for a in arms) + " | "
          + " | ".join(f"{a}/{baseline}" for a in arms[1:]) + " |")  # fmt: skip
    print("|" + " --- |" * (2 * len(arms)))
    for name in loads:
        medians = {a: statistics.median(r["req_s"] for r in results[a][name]) for a in arms}
        print(f"| {name} | " + " | ".join(f"{medians[a]:.2f}" for a in arms) + " | "
              + " | ".join(f"{medians[a] / medians[baseline]:.2f}" for a in arms[1:]) + " |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
