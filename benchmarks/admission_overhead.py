"""What the admission layer costs: the same load through it and straight to vLLM, side by side.

Starts two servers on the dev checkpoint (CPU build of vLLM 0.32): ``medgemma-serve serve``
with a keys file (admission on) and vLLM's own OpenAI server with the same engine arguments
(admission off). Arms are interleaved in rounds (A B, then B A, ...) so drift hits both.
Streaming chat requests with one image each, at several concurrencies; per arm it prints
TTFT p50/p99, request throughput and the API-server process's CPU time per request.
Then: in-process ledger decisions per second on one core, and Redis round trips per
request (from a real redis-server's command statistics).

    .venv/bin/python benchmarks/admission_overhead.py --requests 48 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
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
COOLDOWN_S = 3.0
sys.path.insert(0, str(ROOT))

from serving.admission.keyadmin import add_key
from tests.redis_server import RedisServer, free_port


def image_url() -> str:
    from PIL import Image

    img = Image.radial_gradient("L").resize((512, 512)).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat_body(max_tokens: int) -> dict:
    """The benchmarks' request: a streamed chat with one image."""
    return {
        "model": "medgemma-4b-it", "max_tokens": max_tokens, "stream": True,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image_url()}},
            {"type": "text", "text": "Describe this image."}]}],
    }  # fmt: skip


def start(argv: list[str], log: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        argv, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True
    )


def wait_ready(url: str, path: str, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server {url} exited")
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready")


async def one_request(client, url, headers, body) -> tuple[float, float]:
    started = time.perf_counter()
    ttft = None
    async with client.stream("POST", url, json=body, headers=headers) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if ttft is None and line.startswith("data: ") and '"content":"' in line:
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    ttft = time.perf_counter() - started
    return ttft or float("nan"), time.perf_counter() - started


async def run_arm(base: str, key: str | None, concurrency: int, requests: int, body: dict):
    url = base + "/v1/chat/completions"
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(requests):
            queue.put_nowait(i)
        ttfts: list[float] = []

        async def worker():
            while not queue.empty():
                queue.get_nowait()
                ttft, _ = await one_request(client, url, headers, body)
                ttfts.append(ttft)

        started = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        return ttfts, time.perf_counter() - started


def pin(server_pids: list[int]) -> None:
    """API servers (and this client) on core 0; every engine core and worker on core 1.

    vLLM CPU's EngineCore busy-waits while it has work; sharing a core with its worker
    instead of the API server roughly halves run-to-run spread on a 2-core machine.
    """
    os.sched_setaffinity(0, {0})
    for pid in server_pids:
        parent = psutil.Process(pid)
        os.sched_setaffinity(pid, {0})
        for child in parent.children(recursive=True):
            name = " ".join(child.cmdline()[:1]) + child.name()
            core = {1} if ("EngineCore" in name or "Worker" in name or "VLLM" in name) else {0}
            try:
                os.sched_setaffinity(child.pid, core)
                for thread in child.threads():
                    os.sched_setaffinity(thread.id, core)
            except (ProcessLookupError, PermissionError):
                pass


def cpu_s(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def quartiles(values: list[float]) -> str:
    if len(values) < 2:
        return "n/a"
    q1, _, q3 = statistics.quantiles(values, n=4)
    return f"[{q1:+.3f}, {q3:+.3f}]"


def ledger_decisions_per_s(seconds: float = 2.0) -> float:
    from serving.admission.ledger import InProcessLedger

    ledger = InProcessLedger()
    n = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(1000):
            grant = ledger.acquire_now("acct", 1, 8)
            ledger.release_now(grant.lease)
        n += 1000
    return n / seconds


def redis_round_trips(workdir: Path) -> dict[str, int]:
    import redis as redis_sync

    from serving.admission.redis_ledger import RedisLedger, connect

    server = RedisServer(workdir / "redis").start()
    try:
        async def scenario():
            ledger = RedisLedger(connect(server.url))
            warm = await ledger.acquire("acct", 1, 8)
            await ledger.release(warm.lease)
            probe = redis_sync.Redis.from_url(server.url)
            probe.config_resetstat()
            for _ in range(100):
                grant = await ledger.acquire("acct", 1, 8)
                await ledger.release(grant.lease)
            stats = probe.info("commandstats")
            return {k: v["calls"] for k, v in stats.items() if k.startswith("cmdstat_eval")}
        return asyncio.run(scenario())
    finally:
        server.stop()


def run_rounds(arms: dict, results: dict, concurrency: int, requests: int, rounds: int, body: dict) -> None:
    """Rounds with the arms interleaved (rotated, then reversed), so drift hits every arm."""
    for rnd in range(rounds):
        names = list(arms)
        order = names[rnd % len(names):] + names[:rnd % len(names)]  # rotate: each arm leads in turn
        if rnd // len(names) % 2:
            order.reverse()
        for name in order:
            base, arm_key, pid = arms[name]
            time.sleep(COOLDOWN_S)  # the other server's worker spins ~2 s after its last step
            cpu_before = cpu_s(pid)
            ttfts, elapsed = asyncio.run(run_arm(base, arm_key, concurrency, requests, body))
            cpu = cpu_s(pid) - cpu_before
            results[name]["ttft"] += ttfts
            results[name]["p50"].append(pct(ttfts, 0.5))
            results[name]["rate"].append(requests / elapsed)
            results[name]["cpu"].append(cpu / requests)


def block_estimate(values: list[float], blocks: int, log: bool) -> tuple[float, list[float]]:
    """The start-order-balanced estimate: the mean over blocks of each block's mean (of log
    ratios for a ratio). Every arm takes every start position once in a full rotation, so
    position effects cancel in the mean over blocks; medians of pooled rounds do not."""
    per_block = len(values) // blocks
    means = []
    for b in range(blocks):
        chunk = values[b * per_block:(b + 1) * per_block]
        means.append(statistics.fmean(math.log(v) for v in chunk) if log else statistics.fmean(chunk))
    estimate = statistics.fmean(means)
    if log:
        return math.exp(estimate), [math.exp(m) for m in means]
    return estimate, means


def report(concurrency: int, results: dict, blocks: int = 1) -> None:
    for name, r in results.items():
        print(f"{concurrency:>4} {name:>10} {pct(r['ttft'], .5) * 1e3:>11.1f} {pct(r['ttft'], .99) * 1e3:>11.1f} "
              f"{statistics.median(r['rate']):>7.2f} {statistics.median(r['cpu']) * 1e3:>10.2f}")  # fmt: skip
    for label, (x, y) in {
        "admission vs direct": ("admission", "direct"),
        "admission vs launcher (the layer alone)": ("admission", "launcher"),
        "launcher vs direct (the launcher alone)": ("launcher", "direct"),
    }.items():
        a, d = results[x], results[y]
        paired = {
            "TTFT p50 delta ms": [(p - q) * 1e3 for p, q in zip(a["p50"], d["p50"])],
            "throughput ratio": [p / q for p, q in zip(a["rate"], d["rate"])],
            "CPU delta ms/req": [(p - q) * 1e3 for p, q in zip(a["cpu"], d["cpu"])],
        }
        print(f"{concurrency:>4} {label}: TTFT p99 delta {(pct(a['ttft'], .99) - pct(d['ttft'], .99)) * 1e3:+.1f} ms (pooled)")
        for name, values in paired.items():
            print(f"{'':>6}{name} per round: median {statistics.median(values):+.3f}, "
                  f"quartiles {quartiles(values)}, all {', '.join(f'{v:+.3f}' for v in values)}")  # fmt: skip
            if blocks > 1:
                estimate, means = block_estimate(values, blocks, log=name == "throughput ratio")
                print(f"{'':>8}balanced over {blocks} start orders: {estimate:+.3f} "
                      f"(blocks {', '.join(f'{m:+.3f}' for m in means)})")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--requests", type=int, default=48,
                        help="requests per arm per round (at least 8 x concurrency, so ramp-up and tail do not dominate)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--no-pin", action="store_true", help="leave CPU affinity alone")
    parser.add_argument("--blocks", type=int, default=3,
                        help="restart all servers this many times, rotating the start order (3: each arm starts first once)")
    parser.add_argument("--start-order", default="admission,launcher,direct",
                        help="start order of the first block; later blocks rotate it")
    parser.add_argument("--serve-args", default="", help="extra medgemma-serve flags (admission arm)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="admission-bench-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDGEMMA_")}
    env.update({"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "MEDGEMMA_DEV_MODEL_DIR": str(work / "dev")})
    keys_file = work / "keys.yaml"
    keys_file.write_text("plans:\n  bench: {concurrency: 1000}\n")
    key = add_key(keys_file, "bench", "bench")
    serve = [sys.executable, "-m", "serving"]
    port_on, port_off = free_port(), free_port()
    engine_args = json.loads(subprocess.check_output(
        serve + ["engine-args", "--json", "--port", str(port_off)], env=env
    ))  # fmt: skip
    subprocess.check_call(serve + ["devmodel", str(work / "dev")], env=env, stdout=subprocess.DEVNULL)
    on_argv = serve + ["serve", "--port", str(port_on), "--keys-file", str(keys_file), *args.serve_args.split()]
    port_bare = free_port()
    bare_argv = [sys.executable, str(ROOT / "benchmarks" / "serve_without_admission.py"), "serve",
                 "--port", str(port_bare), *args.serve_args.split()]  # fmt: skip
    launch = {
        "admission": (on_argv, port_on, "/ready"),
        "launcher": (bare_argv, port_bare, "/ready"),
        "direct": ([sys.executable, "-m", "vllm.entrypoints.openai.api_server", *engine_args], port_off, "/health"),
    }
    body = chat_body(args.max_tokens)
    arm_urls = {"admission": (port_on, key), "launcher": (port_bare, None), "direct": (port_off, None)}
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    results = {c: {name: {"ttft": [], "p50": [], "rate": [], "cpu": []} for name in arm_urls} for c in concurrencies}
    first = args.start_order.split(",")
    print(f"vLLM CPU build, dev checkpoint, max({args.requests}, 8 x concurrency) streamed image requests per arm per "
          f"round, {args.blocks} block(s) of {args.rounds} rounds, max_tokens {args.max_tokens}, arms interleaved, "
          f"{'engines pinned to core 1' if not args.no_pin else 'no pinning'}", flush=True)  # fmt: skip
    for block in range(args.blocks):
        # Every block restarts all servers, the start order rotated: on this VM the server
        # started first runs 10-20% slower for its whole life (an A/A run of two identical
        # vLLM servers shows it), so each arm takes each start position equally often.
        order = first[block % len(first):] + first[:block % len(first)]
        procs: dict[str, subprocess.Popen] = {}
        try:
            for name in order:  # one at a time: start-up is CPU-bound
                argv, port, ready_path = launch[name]
                procs[name] = start(argv, work / f"{name}.{block}.log", env)
                wait_ready(f"http://127.0.0.1:{port}", ready_path, procs[name])
            arms = {name: (f"http://127.0.0.1:{port}", arm_key, procs[name].pid)
                    for name, (port, arm_key) in arm_urls.items()}  # fmt: skip
            if not args.no_pin and (os.cpu_count() or 1) >= 2:
                pin([proc.pid for proc in procs.values()])
            for base, arm_key, _ in arms.values():  # warm every arm
                asyncio.run(run_arm(base, arm_key, 2, 8, body))
            print(f"block {block + 1}: start order {','.join(order)}", flush=True)
            for concurrency in concurrencies:
                run_rounds(arms, results[concurrency], concurrency, max(args.requests, 8 * concurrency),
                           args.rounds, body)  # fmt: skip
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(timeout=120)
    header = f"{'conc':>4} {'arm':>10} {'ttft_p50_ms':>11} {'ttft_p99_ms':>11} {'req/s':>7} {'cpu_ms/req':>10}"
    print(header)
    for concurrency in concurrencies:
        report(concurrency, results[concurrency], args.blocks)
    print(f"logs: {work}")
    print(f"in-process ledger: {ledger_decisions_per_s():,.0f} acquire+release decisions/s on one core")
    print(f"Redis ledger, 100 requests: {redis_round_trips(work)} (one EVALSHA to acquire, one to release)")
    if not os.environ.get("KEEP_BENCH_DIR"):
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
