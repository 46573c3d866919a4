"""A/B mode: the same workload against two endpoints, interleaved, with the spread of each
difference.

Each round runs every stage against A and against B (A first in even rounds, B first in
odd ones) with the same seed, so both see the same requests and drift hits both. Per figure
it reports A's and B's medians over rounds and the per-round difference B - A (median, min,
max); throughput figures also as the ratio B / A.

Outputs (in ``--out``): ``ab.json``, ``ab.html``, and ``a/`` and ``b/`` holding every
round's requests (``requests.jsonl``).
"""

from __future__ import annotations

import asyncio
import datetime
import html
import json
import statistics
from pathlib import Path

from loadtests import report, summary
from loadtests.runner import Progress, Runner
from loadtests.workload import Workload

FIGURES = {  # name -> (path in a stage summary, unit, is a throughput)
    "ttft_p50_ms": (("latency_s", "ttft", "p50"), 1e3, False),
    "ttft_p99_ms": (("latency_s", "ttft", "p99"), 1e3, False),
    "tpot_p50_ms": (("latency_s", "tpot", "p50"), 1e3, False),
    "itl_p50_ms": (("latency_s", "itl", "p50"), 1e3, False),
    "e2e_p50_ms": (("latency_s", "e2e", "p50"), 1e3, False),
    "e2e_p99_ms": (("latency_s", "e2e", "p99"), 1e3, False),
    "requests_per_s": (("throughput", "requests_per_s"), 1, True),
    "output_tokens_per_s": (("throughput", "output_tokens_per_s"), 1, True),
    "goodput_ratio": (("goodput", "ratio"), 1, False),
}


def _value(stage: dict, path: tuple[str, ...], scale: float) -> float | None:
    node = stage
    for key in path:
        node = node.get(key) if isinstance(node, dict) else None
    return None if node is None else node * scale


def compare(rounds_a: list[list[dict]], rounds_b: list[list[dict]]) -> list[dict]:
    """Per stage and figure: medians of A and B, and the spread of the per-round difference."""
    out = []
    for index, stage in enumerate(rounds_a[0]):
        figures = {}
        for name, (path, scale, throughput) in FIGURES.items():
            a = [_value(r[index], path, scale) for r in rounds_a]
            b = [_value(r[index], path, scale) for r in rounds_b]
            pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
            if not pairs:
                continue
            deltas = [y - x for x, y in pairs]
            entry = {
                "a_median": statistics.median(x for x, _ in pairs),
                "b_median": statistics.median(y for _, y in pairs),
                "delta_median": statistics.median(deltas),
                "delta_min": min(deltas),
                "delta_max": max(deltas),
                "delta_per_round": deltas,
            }
            if throughput:
                ratios = [y / x for x, y in pairs if x]
                entry["ratio_median"] = statistics.median(ratios) if ratios else None
                entry["ratio_per_round"] = ratios
            figures[name] = entry
        out.append({"label": stage["label"], "figures": figures})
    return out


def _arm(settings, url: str, keys, stages, slo, seed: int):
    workload = Workload(settings.workload_spec(keys), seed=seed)
    runner = Runner(url, workload, seed=seed, timeout_s=settings.timeout,
                    honor_retry_after=settings.honor_retry_after, progress=Progress(settings.progress))  # fmt: skip
    results = asyncio.run(runner.run(stages))
    return [summary.summarize_stage(r, slo) for r in results], [rec for r in results for rec in r.records]


def run(settings) -> dict:
    out = Path(settings.out)
    (out / "a").mkdir(parents=True, exist_ok=True)
    (out / "b").mkdir(parents=True, exist_ok=True)
    arms = {"a": (settings.url, settings.key), "b": (settings.url_b, settings.key_b if settings.key_b is not None else settings.key)}
    stages, slo = settings.stages(), settings.slo_s()
    per_round: dict[str, list[list[dict]]] = {"a": [], "b": []}
    files = {arm: (out / arm / "requests.jsonl").open("w") for arm in arms}
    try:
        for round_index in range(settings.rounds):
            order = ["a", "b"] if round_index % 2 == 0 else ["b", "a"]
            for arm in order:
                url, keys = arms[arm]
                figures, records = _arm(settings, url, keys, stages, slo, settings.seed)
                per_round[arm].append(figures)
                for record in records:
                    files[arm].write(json.dumps(record.to_json() | {"round": round_index}) + "\n")
    finally:
        for handle in files.values():
            handle.close()
    comparison = compare(per_round["a"], per_round["b"])
    doc = {
        "tool": "medgemma-loadtest ab",
        "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "a": settings.url,
        "b": settings.url_b,
        "rounds": settings.rounds,
        "config": settings.public_config(),
        "comparison": comparison,
        "rounds_a": per_round["a"],
        "rounds_b": per_round["b"],
        "warnings": [w for arm in per_round.values() for rnd in arm for s in rnd for w in s["warnings"]],
    }
    report.write_json(out / "ab.json", doc)
    (out / "ab.html").write_text(render_html(doc))
    print(terminal_table(doc))
    print(f"wrote {out / 'ab.json'}, {out / 'ab.html'}")
    return doc


def terminal_table(doc: dict) -> str:
    lines = [f"A = {doc['a']}   B = {doc['b']}   {doc['rounds']} rounds, interleaved"]
    for stage in doc["comparison"]:
        lines.append(f"\n{stage['label']}")
        lines.append(f"{'figure':<22} {'A':>10} {'B':>10} {'B-A median':>11} {'[min, max]':>22} {'B/A':>7}")
        for name, f in stage["figures"].items():
            ratio = f"{f['ratio_median']:.3f}" if f.get("ratio_median") is not None else ""
            spread = f"[{f['delta_min']:+.3f}, {f['delta_max']:+.3f}]"
            lines.append(f"{name:<22} {f['a_median']:>10.3f} {f['b_median']:>10.3f} {f['delta_median']:>+11.3f} {spread:>22} {ratio:>7}")
    return "\n".join(lines)


def render_html(doc: dict) -> str:
    sections = []
    for stage in doc["comparison"]:
        rows = "".join(
            f"<tr><th>{name}</th><td>{f['a_median']:.3f}</td><td>{f['b_median']:.3f}</td>"
            f"<td>{f['delta_median']:+.3f}</td><td>[{f['delta_min']:+.3f}, {f['delta_max']:+.3f}]</td>"
            f"<td>{'' if f.get('ratio_median') is None else format(f['ratio_median'], '.3f')}</td></tr>"
            for name, f in stage["figures"].items()
        )
        fig, ax = report.figure(f"B - A per round: {stage['label']}", "figure", "difference (ms or 1/s)")
        names = list(stage["figures"])
        for i, name in enumerate(names):
            deltas = stage["figures"][name]["delta_per_round"]
            ax.scatter([i] * len(deltas), deltas, color=report.COLORS[0], s=14)
            ax.hlines(statistics.median(deltas), i - 0.3, i + 0.3, color=report.COLORS[1])
        ax.axhline(0, color="#64748b", lw=0.8)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        plot = report.svg(fig)
        sections.append(
            f"<h2>{html.escape(stage['label'])}</h2><div class='plot'>{plot}</div><table><thead><tr><th>figure</th>"
            f"<th>A median</th><th>B median</th><th>B-A median</th><th>B-A [min, max]</th><th>B/A</th></tr></thead>"
            f"<tbody>{rows}</tbody></table>"
        )
    warnings = "".join(f"<div class='warn'>{html.escape(w)}</div>" for w in doc["warnings"])
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>MedGemma A/B load test</title>
<style>{report.CSS}</style></head><body><header><h1>MedGemma A/B load test</h1><p>A = {html.escape(doc['a'])}
 - B = {html.escape(doc['b'])} - {doc['rounds']} rounds, interleaved - {html.escape(doc['started_at'])}</p></header>
<main>{warnings}{''.join(sections)}</main><script>{report.SCRIPT}</script></body></html>
"""
