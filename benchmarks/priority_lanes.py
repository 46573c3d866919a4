"""A STAT lane under a batch flood: this project's server against vLLM with priorities alone.

Scenario (issue 13): a batch account keeps more requests in flight than the engine has
slots, while a STAT account sends one request every few seconds. Arms, each a stage of the
load-test harness (``loadtests``: the same workload generator and figures as
``medgemma-loadtest``):

- on ``medgemma-serve serve`` (admission on, keys file with a ``clinic`` plan allowed STAT
  and a ``bulk`` plan that is batch): ``stat idle`` (the STAT stream alone), ``batch alone``
  (the batch stream alone: it runs at its share of the engine), ``flood`` (both at once);
- on vLLM's own OpenAI server with the same engine arguments (``--scheduling-policy
  priority``) and each request's class as vLLM's body ``priority`` (the anchor): ``stat
  idle`` and ``flood``.

One server runs at a time (two on these 2 cores disturb each other); within a server the
arms run in rounds, rotated, so drift hits every arm. Pooled over rounds it prints, per arm,
the STAT TTFT p50/p95/p99, STAT refusals and the batch stream's output tokens/s, then the
ratios the issue judges: STAT TTFT p95 flood / idle (goal <= 1.25), batch throughput flood /
alone (goal >= 0.8), and the anchor's STAT TTFT p95 beside ours.

    .venv/bin/python benchmarks/priority_lanes.py --duration 60 --rounds 2 --out results/priority
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.admission_overhead import start, wait_ready
from loadtests.config import LoadTestSettings
from loadtests.runner import Runner
from loadtests.summary import percentiles, summarize_stage
from loadtests.workload import Workload
from serving.admission.keyadmin import add_key
from tests.redis_server import free_port

PLANS = """plans:
  clinic: {concurrency: 8, priority: {max: stat, default: stat}}
  bulk: {concurrency: 1000, priority: {max: batch, default: batch}}
"""
ARMS = {"admission": ("stat idle", "batch alone", "flood"), "anchor": ("stat idle", "flood")}


def settings_for(arm: str, args, keys: dict[str, str], field: str) -> LoadTestSettings:
    """The arm's streams: the batch flood and/or the STAT trickle."""
    batch = {"name": "batch", "key": f"backlog={keys['batch']}", "priority": "batch",
             "concurrency": args.batch_concurrency, "output_tokens": str(args.batch_tokens)}  # fmt: skip
    stat = {"name": "stat", "key": f"clinic={keys['stat']}", "priority": "stat", "rate": args.stat_rate,
            "arrival": "gamma", "burstiness": 4.0, "output_tokens": str(args.stat_tokens)}  # fmt: skip
    streams = {"stat idle": [stat], "batch alone": [batch], "flood": [batch, stat]}[arm]
    return LoadTestSettings(
        url="http://unused", streams=streams, duration=args.duration, warmup=args.warmup, cooldown=5.0,
        images=str(args.images), image_size="choice:512=0.5,896=0.5", prompt_tokens="lognormal:48,0.4,8,256",
        priority_field=field, seed=args.seed, slo_ttft_ms=2000,
    )  # fmt: skip


def run_arm(url: str, settings: LoadTestSettings, seed: int) -> tuple[list, float]:
    """The arm's windowed request records (one stage of streams)."""
    runner = Runner(url, Workload(settings.workload_spec(), seed=seed), seed=seed,
                    stream_workloads=settings.stream_workloads(seed))  # fmt: skip
    (result,) = asyncio.run(runner.run(settings.stages()))
    summary = summarize_stage(result, settings.slo_s())
    return [r for r in result.records if r.in_window], summary["window_s"]


def cpu_seconds(server_pid: int) -> dict[str, float]:
    """CPU seconds so far of the API server, the engine's processes and this load generator."""
    out = {"api": 0.0, "engine": 0.0, "loadgen": 0.0}
    root = psutil.Process(server_pid)
    for proc in [root, *root.children(recursive=True)]:
        try:
            times, name = proc.cpu_times(), proc.name()
        except psutil.Error:
            continue
        engine = "EngineCore" in name or "Worker" in name or proc.pid != server_pid and "VLLM" in name
        out["engine" if engine else "api"] += times.user + times.system
    times = psutil.Process().cpu_times()
    out["loadgen"] = times.user + times.system
    return out


def figures(records: list, window_s: float) -> dict:
    stat = [r for r in records if r.stream == "stat"]
    batch = [r for r in records if r.stream == "batch" and r.outcome == "ok"]
    ttft = percentiles([r.ttft_s for r in stat if r.outcome == "ok" and r.ttft_s is not None])
    return {
        "stat_requests": len(stat),
        "stat_not_ok": sum(r.outcome != "ok" for r in stat),
        "stat_ttft_s": ttft,
        "batch_output_tokens_per_s": sum(r.output_tokens or 0 for r in batch) / window_s if batch else None,
        "batch_requests_ok": len(batch),
    }


def serve(server: str, work: Path, env: dict, keys_file: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    serve_cmd = [sys.executable, "-m", "serving"]
    if server == "admission":
        argv, ready = serve_cmd + ["serve", "--port", str(port), "--keys-file", str(keys_file)], "/ready"
    else:
        engine = json.loads(subprocess.check_output(serve_cmd + ["engine-args", "--json", "--port", str(port)], env=env))
        argv, ready = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *engine], "/health"
    proc = start(argv, work / f"{server}.log", env)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, ready, proc)
    return proc, url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds per arm per round")
    parser.add_argument("--warmup", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-concurrency", type=int, default=24, help="batch requests kept in flight (cpu-dev: 16 slots)")
    parser.add_argument("--batch-tokens", type=int, default=256)
    parser.add_argument("--stat-rate", type=float, default=0.5, help="STAT requests per second")
    parser.add_argument("--stat-tokens", type=int, default=64)
    parser.add_argument("--images", type=int, default=1, help="images per request (both streams)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--servers", default="admission,anchor")
    parser.add_argument("--out", default=None, help="folder for results.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="priority-bench-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDGEMMA_")}
    env.update({"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "MEDGEMMA_DEV_MODEL_DIR": str(work / "dev")})
    subprocess.check_call([sys.executable, "-m", "serving", "devmodel", str(work / "dev")], env=env,
                          stdout=subprocess.DEVNULL)  # fmt: skip
    keys_file = work / "keys.yaml"
    keys_file.write_text(PLANS)
    keys = {"stat": add_key(keys_file, "clinic", "clinic"), "batch": add_key(keys_file, "backlog", "bulk")}
    pooled: dict[tuple[str, str], dict] = {}
    print(f"vLLM CPU build, dev checkpoint; batch: {args.batch_concurrency} in flight, {args.batch_tokens} tokens; "
          f"STAT: {args.stat_rate:g}/s, {args.stat_tokens} tokens; {args.images} image(s) each; "
          f"{args.rounds} rounds x {args.duration:g} s per arm", flush=True)  # fmt: skip
    for server in args.servers.split(","):
        proc, url = serve(server, work, env, keys_file)
        field = "header" if server == "admission" else "body"
        no_keys = {"stat": "", "batch": ""}
        try:
            warm = settings_for("flood", argparse.Namespace(**{**vars(args), "duration": 10.0, "warmup": 1.0}),
                                keys if server == "admission" else no_keys, field)  # fmt: skip
            run_arm(url, warm, args.seed + 99)
            for rnd in range(args.rounds):
                arms = list(ARMS[server])
                shift = rnd % len(arms)
                for arm in arms[shift:] + arms[:shift]:
                    settings = settings_for(arm, args, keys if server == "admission" else no_keys, field)
                    cpu_before, started = cpu_seconds(proc.pid), time.monotonic()
                    records, window_s = run_arm(url, settings, args.seed + rnd)
                    cpu_after, elapsed = cpu_seconds(proc.pid), time.monotonic() - started
                    entry = pooled.setdefault((server, arm), {"records": [], "window_s": 0.0, "cpu": {}, "elapsed": 0.0})
                    entry["records"] += records
                    entry["window_s"] += window_s
                    entry["elapsed"] += elapsed
                    for name, value in cpu_after.items():
                        entry["cpu"][name] = entry["cpu"].get(name, 0.0) + value - cpu_before[name]
                    print(f"  {server} round {rnd + 1}: {arm}: {figures(records, window_s)['stat_ttft_s']['p95']}",
                          flush=True)  # fmt: skip
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=120)
    results = {
        f"{s} {a}": figures(e["records"], e["window_s"])
        | {"cpu_percent": {k: 100 * v / e["elapsed"] for k, v in e["cpu"].items()}}
        for (s, a), e in pooled.items()
    }
    print(table(results))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "results.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    shutil.rmtree(work, ignore_errors=True)


def table(results: dict) -> str:
    def ms(value) -> str:
        return "-" if value is None else f"{value * 1e3:.0f}"

    lines = ["| arm | STAT n | STAT not ok | STAT TTFT p50 ms | p95 ms | p99 ms | batch output tok/s "
             "| CPU % API / engine / load generator |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for name, f in results.items():
        t = f["stat_ttft_s"]
        tok = "-" if f["batch_output_tokens_per_s"] is None else f"{f['batch_output_tokens_per_s']:.0f}"
        cpu = " / ".join(f"{f['cpu_percent'][k]:.0f}" for k in ("api", "engine", "loadgen"))
        lines.append(f"| {name} | {f['stat_requests']} | {f['stat_not_ok']} | {ms(t['p50'])} | {ms(t['p95'])} | "
                     f"{ms(t['p99'])} | {tok} | {cpu} |")  # fmt: skip

    def ratio(a, b):
        return "-" if not a or not b else f"{a / b:.2f}"

    ours = {k.split(" ", 1)[1]: v for k, v in results.items() if k.startswith("admission ")}
    anchor = {k.split(" ", 1)[1]: v for k, v in results.items() if k.startswith("anchor ")}
    if {"flood", "stat idle"} <= set(ours):
        lines.append(f"STAT TTFT p95, flood / idle (ours): {ratio(ours['flood']['stat_ttft_s']['p95'], ours['stat idle']['stat_ttft_s']['p95'])} (goal <= 1.25)")
    if {"flood", "batch alone"} <= set(ours):
        lines.append(f"batch output tokens/s, flood / alone at its share (ours): "
                     f"{ratio(ours['flood']['batch_output_tokens_per_s'], ours['batch alone']['batch_output_tokens_per_s'])} (goal >= 0.8)")  # fmt: skip
    if {"flood", "stat idle"} <= set(anchor):
        lines.append(f"STAT TTFT p95, flood / idle (vLLM with priorities alone): "
                     f"{ratio(anchor['flood']['stat_ttft_s']['p95'], anchor['stat idle']['stat_ttft_s']['p95'])}")  # fmt: skip
    if "flood" in anchor and "flood" in ours:
        lines.append(f"STAT TTFT p95 under the flood, vLLM alone / ours: "
                     f"{ratio(anchor['flood']['stat_ttft_s']['p95'], ours['flood']['stat_ttft_s']['p95'])}")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
