"""The API process's CPU per request, vLLM alone against this project, side by side.

For an image model the API server decodes and preprocesses every image before the engine
sees it; on a GPU host that CPU, not the GPU, caps image requests per replica. This starts
one server at a time on the dev checkpoint (CPU build of vLLM 0.32, same engine arguments):

 - ``vllm``: vLLM's own OpenAI server (``MEDGEMMA_IMAGE_PREPROCESSING=reference``: the
   project's plugin only supplies the PIL Gemma 3 processor the CPU build lacks);
 - ``project``: ``medgemma-serve serve`` with its defaults (``--image-preprocessing fast``);
 - with ``--arms``, also ``exact`` (``--image-preprocessing exact``), ``reference``, or
   ``thread`` (``--inline-render-max-kib 0``: every chat template on vLLM's renderer thread).

and sends each workload as sequential non-streaming chat requests with ``max_tokens`` 1
(engine work kept minimal), reading the API process's CPU time (user + system, psutil)
before and after. Workloads: text only, and one image per request, greyscale radiographs
(tests/image_corpus.py) as PNG and JPEG at 512, 896, 2048 and 3000 px, plus RGB at 2048
(JPEG, dermoscopy) and 3000 (PNG, a radiograph saved as RGB). "unique" sends different
bytes every request (no processor cache hit), "repeated" the same image every time.
Arms take turns, the order rotated every round; the median over rounds is reported, with
the implied ceiling of one API process (1000 / ms), and each arm's ratio to ``vllm`` taken
round by round (median and range).

    .venv/bin/python benchmarks/frontend_cpu.py --requests 12 --rounds 2
    .venv/bin/python benchmarks/frontend_cpu.py --rounds 4 --workloads 'text,3000 PNG unique'
    .venv/bin/python benchmarks/frontend_cpu.py --arms vllm,thread,project --workloads text --rounds 4

The reference path here is transformers' PIL processor (no torchvision in the CPU build);
on GPU hosts vLLM alone would use the torchvision one, which this machine cannot measure.
"""

from __future__ import annotations

import argparse
import base64
import io
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

from benchmarks.admission_overhead import cpu_s, start, wait_ready  # noqa: E402
from serving.cpuaffinity import colocate_engine_core  # noqa: E402
from tests.image_corpus import KINDS, encode  # noqa: E402
from tests.redis_server import free_port  # noqa: E402

ARMS = {  # name: (server, extra environment)
    "vllm": ("vllm", {"MEDGEMMA_IMAGE_PREPROCESSING": "reference"}),
    "project": ("project", {}),
    "exact": ("project", {"MEDGEMMA_IMAGE_PREPROCESSING": "exact"}),
    "reference": ("project", {"MEDGEMMA_IMAGE_PREPROCESSING": "reference"}),
    "thread": ("project", {"MEDGEMMA_INLINE_RENDER_MAX_KIB": "0"}),
}
# (label, kind, side, format, mode): mode None keeps the kind's own (radiographs are greyscale)
IMAGES = [
    ("512 PNG", "radiograph", 512, "PNG", None),
    ("512 JPEG", "radiograph", 512, "JPEG", None),
    ("896 PNG", "radiograph", 896, "PNG", None),
    ("896 JPEG", "radiograph", 896, "JPEG", None),
    ("2048 PNG", "radiograph", 2048, "PNG", None),
    ("2048 JPEG", "radiograph", 2048, "JPEG", None),
    ("3000 PNG", "radiograph", 3000, "PNG", None),
    ("3000 JPEG", "radiograph", 3000, "JPEG", None),
    ("2048 JPEG RGB", "dermoscopy", 2048, "JPEG", None),
    ("3000 PNG RGB", "radiograph", 3000, "PNG", "RGB"),
]
REPEATED = {"2048 JPEG", "3000 PNG", "2048 JPEG RGB", "3000 PNG RGB"}
TEXT_PER_IMAGE = 16


def chat(parts: list[dict]) -> bytes:
    content = [*parts, {"type": "text", "text": "Findings?"}]
    return json.dumps({"model": "medgemma-4b-it", "max_tokens": 1,
                       "messages": [{"role": "user", "content": content}]}).encode()  # fmt: skip


def image_bodies(kind: str, side: int, fmt: str, mode: str | None, count: int) -> list[bytes]:
    """``count`` request bodies whose images differ in one pixel row each (unique bytes)."""
    import numpy as np
    from PIL import Image

    base = KINDS[kind](side, side)
    if mode:
        base = base.convert(mode)
    pixels = np.asarray(base).copy()
    options = {"quality": 90} if fmt == "JPEG" else {"compress_level": 1}
    bodies = []
    for index in range(count):
        pixels[index % side, :] ^= 1 + index // side  # a row nudged: new bytes, same picture
        data = encode(Image.fromarray(pixels, base.mode), fmt, **options)
        url = f"data:image/{fmt.lower()};base64," + base64.b64encode(data).decode()
        bodies.append(chat([{"type": "image_url", "image_url": {"url": url}}]))
    return bodies


def workloads(requests: int) -> dict[str, list[bytes]]:
    texts = range(TEXT_PER_IMAGE * requests)  # cheap requests: more of them resolve psutil's 10 ms ticks
    loads = {"text": [chat([{"type": "text", "text": f"Case {i}: chest pain, normal ECG."}]) for i in texts]}
    for label, kind, side, fmt, mode in IMAGES:
        unique = image_bodies(kind, side, fmt, mode, requests)
        loads[f"{label} unique"] = unique
        if label in REPEATED:
            loads[f"{label} repeated"] = [unique[0]] * requests
    return loads


def launch(arm: str, work: Path, env: dict, engine_args: list[str]) -> tuple[subprocess.Popen, str, str]:
    server, extra = ARMS[arm]
    port = free_port()
    if server == "vllm":
        args = [*engine_args]
        args[args.index("--port") + 1] = str(port)
        argv, ready = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *args], "/health"
    else:  # bodies of a 3000 px RGB PNG exceed the default 20 MiB limit
        argv, ready = [sys.executable, "-m", "serving", "serve", "--port", str(port), "--max-body-mib", "64"], "/ready"
    proc = start(argv, work / f"{arm}.log", env | extra)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, ready, proc)
    colocate_engine_core(proc.pid)  # as the project's launcher does (serving/cpuaffinity.py)
    return proc, url, ready


def measure(url: str, pid: int, bodies: list[bytes]) -> float:
    """API-process CPU ms per request over ``bodies``, sent one after another."""
    headers = {"content-type": "application/json"}
    with httpx.Client(timeout=300) as client:
        before = cpu_s(pid)
        for body in bodies:
            response = client.post(url + "/v1/chat/completions", content=body, headers=headers)
            if response.status_code != 200:
                raise RuntimeError(f"{url}: {response.status_code} {response.text[:300]}")
        return (cpu_s(pid) - before) * 1000 / len(bodies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=12, help=f"requests per image workload (text: {TEXT_PER_IMAGE}x)")
    parser.add_argument("--rounds", type=int, default=2, help="each arm's turns; the order rotates every round")
    parser.add_argument("--arms", default="vllm,project", help=f"from {','.join(ARMS)}; the first is the baseline")
    parser.add_argument("--json", type=Path, help="also write the per-round numbers here")
    parser.add_argument("--workloads", help="measure only these, comma-separated (e.g. 'text,3000 PNG unique')")
    args = parser.parse_args()
    arms = args.arms.split(",")
    work = Path(tempfile.mkdtemp(prefix="frontend-cpu-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDGEMMA_")}
    env |= {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "MEDGEMMA_DEV_MODEL_DIR": str(work / "dev")}
    serve = [sys.executable, "-m", "serving"]
    subprocess.check_call(serve + ["devmodel", str(work / "dev")], env=env, stdout=subprocess.DEVNULL)
    engine_args = json.loads(subprocess.check_output(serve + ["engine-args", "--json"], env=env))
    started = time.monotonic()
    loads = workloads(args.requests)
    warm_up = loads["text"][:4] + loads["896 JPEG unique"][:2]
    if args.workloads:
        chosen = args.workloads.split(",")
        unknown = set(chosen) - set(loads)
        if unknown:
            parser.error(f"unknown workloads {sorted(unknown)}; known: {', '.join(loads)}")
        loads = {name: loads[name] for name in chosen}
    print(f"{len(loads)} workloads made in {time.monotonic() - started:.0f} s; arms {arms}, {args.rounds} round(s), "
          f"{psutil.cpu_count()} cores", flush=True)  # fmt: skip
    results: dict[str, dict[str, list[float]]] = {arm: {name: [] for name in loads} for arm in arms}
    try:
        for round_index in range(args.rounds):
            order = arms[round_index % len(arms):] + arms[:round_index % len(arms)]
            for arm in order:  # one server at a time: they would compete for the cores
                proc, url, _ = launch(arm, work, env, engine_args)
                try:
                    measure(url, proc.pid, warm_up)
                    for name, bodies in loads.items():
                        results[arm][name].append(measure(url, proc.pid, bodies))
                finally:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(timeout=120)
                print(f"round {round_index + 1}: {arm} done", flush=True)
    finally:
        if not os.environ.get("KEEP_BENCH_DIR"):
            shutil.rmtree(work, ignore_errors=True)
    report(arms, results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


def report(arms: list[str], results: dict[str, dict[str, list[float]]]) -> None:
    """Medians over rounds, and each arm's ratio to the baseline taken round by round (the arms
    of one round ran minutes apart; rounds run further apart drift more): its median and range."""
    baseline = arms[0]
    header = "| workload | " + " | ".join(f"{arm} ms/req (req/s)" for arm in arms)
    header += " | " + " | ".join(f"{arm}/{baseline} median (range)" for arm in arms[1:]) + " |"
    print(header)
    print("|" + " --- |" * (1 + 2 * len(arms) - 1))
    for name in results[baseline]:
        medians = {arm: statistics.median(results[arm][name]) for arm in arms}
        cells = [f"{medians[arm]:.1f} ({1000 / medians[arm]:.0f})" for arm in arms]
        for arm in arms[1:]:
            paired = [ms / base for ms, base in zip(results[arm][name], results[baseline][name], strict=True)]
            cells.append(f"{statistics.median(paired):.2f} ({min(paired):.2f}-{max(paired):.2f})")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
