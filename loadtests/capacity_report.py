"""What a capacity search leaves behind: ``capacity.json`` and an HTML page with its plots.

``capacity.json`` is what the server reads (``medgemma-serve serve --capacity-file``) and
what ``medgemma-loadtest plan`` sizes a fleet from. Guarantees: it names the units one
replica carries (this model costs one unit per request in flight, so units = concurrency),
the SLO, the workload, the engine it was measured on (profile and vLLM version, read from
the server's ``medgemma_build_info``; None when the server does not say), how the search
ended, and every measured point with its confidence intervals. The page plots goodput,
TTFT and TPOT against concurrency with the SLO's limits and the chosen point.
"""

from __future__ import annotations

import html
import json

import httpx

from loadtests import report
from loadtests.capacity import HOLDS, Point, SearchResult, Slo

FORMAT = 1
UNITS_PER_REQUEST = 1  # medgemma-4b-it's cost in concurrency units (serving's model_costs)
ENGINE_FIELDS = ("profile", "vllm_version", "model", "served_model_name")
WORKLOAD_FIELDS = ("model", "images", "image_size", "image_mode", "image_format", "prompt_tokens", "output_tokens",
                   "fixed_output", "system_prompt", "priority", "keys")  # fmt: skip


def engine_info(url: str, timeout_s: float = 10.0) -> dict[str, str | None]:
    """The engine profile, model and vLLM version the server reports on /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    empty = dict.fromkeys(ENGINE_FIELDS)
    try:
        response = httpx.get(url.rstrip("/") + "/metrics", timeout=timeout_s)
        response.raise_for_status()
    except httpx.HTTPError:
        return empty
    for family in text_string_to_metric_families(response.text):
        if family.name == "medgemma_build_info":
            for sample in family.samples:
                if sample.value:
                    return {name: sample.labels.get(name) for name in ENGINE_FIELDS}
    return empty


def document(result: SearchResult, slo: Slo, *, config: dict, engine: dict, url: str, started_at: str,
             search: dict) -> dict:  # fmt: skip
    """The capacity file's contents."""
    return {
        "format": FORMAT,
        "tool": "medgemma-loadtest capacity",
        "units_per_replica": result.capacity * UNITS_PER_REQUEST,
        "concurrency": result.capacity,
        "units_per_request": UNITS_PER_REQUEST,
        "bracket": {"holds_at": result.capacity, "misses_at": result.misses_at, "width": result.resolution},
        "stopped": result.stopped,
        "slo": {"ttft_ms": None if slo.ttft_s is None else slo.ttft_s * 1e3,
                "tpot_ms": None if slo.tpot_s is None else slo.tpot_s * 1e3,
                "percentile": slo.percentile, "min_ok": slo.min_ok},  # fmt: skip
        "workload": {name: config.get(name) for name in WORKLOAD_FIELDS},
        "engine": engine,
        "url": url,
        "measured_at": started_at,
        "search": search,
        "points": [point.to_json() for point in result.points],
    }


def write(out, doc: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "capacity.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out / "capacity.html").write_text(render_html(doc))


# --- the page ---------------------------------------------------------------------------
def _chosen(ax, doc: dict) -> None:
    if doc["concurrency"]:
        ax.axvline(doc["concurrency"], color=report.COLORS[3], linestyle=":", label=f"capacity {doc['concurrency']}")


def plot_goodput(doc: dict) -> str:
    fig, ax = report.figure("Goodput and throughput vs concurrency", "concurrency", "requests/s")
    points = doc["points"]
    xs = [p["concurrency"] for p in points]
    ax.plot(xs, [p["requests_per_s"] for p in points], "o-", color=report.COLORS[0], label="throughput")
    ax.plot(xs, [p["goodput_per_s"] for p in points], "s-", color=report.COLORS[2], label="goodput (met the SLO)")
    _chosen(ax, doc)
    ax.legend(fontsize=8)
    return report.svg(fig)


def plot_latency(doc: dict, name: str) -> str:
    slo = doc["slo"]
    title = f"{name.upper()} p{slo['percentile']:g} vs concurrency (95% interval)"
    fig, ax = report.figure(title, "concurrency", "ms")
    key, limit = f"{name}_s", slo[f"{name}_ms"]
    shown = [p for p in doc["points"] if p[key]["value"] is not None]
    for verdict, marker, color in ((True, "o", report.COLORS[2]), (False, "x", report.COLORS[1])):
        group = [p for p in shown if (p["verdict"] == HOLDS) is verdict]
        if not group:
            continue
        values = [p[key]["value"] * 1e3 for p in group]
        lows = [v - (p[key]["low"] or 0) * 1e3 for v, p in zip(values, group, strict=True)]
        highs = [((p[key]["high"] or p[key]["value"]) * 1e3) - v for v, p in zip(values, group, strict=True)]
        ax.errorbar([p["concurrency"] for p in group], values, yerr=[lows, highs], fmt=marker, color=color,
                    capsize=3, label="held" if verdict else "missed")  # fmt: skip
    if limit is not None:
        ax.axhline(limit, color=report.COLORS[1], linestyle="--", label=f"SLO {limit:g} ms")
    _chosen(ax, doc)
    ax.legend(fontsize=8)
    return report.svg(fig)


def _points_table(doc: dict) -> str:
    head = ("concurrency", "verdict", "runs", "requests", "ok", "req/s", "goodput/s", "TTFT", "TTFT 95%", "TPOT",
            "TPOT 95%", "why")  # fmt: skip

    def ms(estimate: dict, field: str) -> str:
        value = estimate[field]
        return "-" if value is None else f"{value * 1e3:.0f}"

    rows = []
    for p in doc["points"]:
        cells = [p["concurrency"], p["verdict"] + (" (close)" if p["close"] else ""), p["runs"], p["requests"],
                 p["ok"], f"{p['requests_per_s']:.2f}", f"{p['goodput_per_s']:.2f}", ms(p["ttft_s"], "value"),
                 f"{ms(p['ttft_s'], 'low')}-{ms(p['ttft_s'], 'high')}", ms(p["tpot_s"], "value"),
                 f"{ms(p['tpot_s'], 'low')}-{ms(p['tpot_s'], 'high')}", "; ".join(p["reasons"])]  # fmt: skip
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    header = "".join(f"<th>{h}</th>" for h in head)
    return f"<table><thead><tr>{header}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def render_html(doc: dict) -> str:
    plots = [plot_goodput(doc), plot_latency(doc, "ttft")]
    if doc["slo"]["tpot_ms"] is not None or any(p["tpot_s"]["value"] is not None for p in doc["points"]):
        plots.append(plot_latency(doc, "tpot"))
    bracket = doc["bracket"]
    cards = {"units per replica": doc["units_per_replica"], "held at": bracket["holds_at"],
             "missed at": bracket["misses_at"] or "-", "search ended": doc["stopped"],
             "engine profile": doc["engine"].get("profile") or "-",
             "vLLM": doc["engine"].get("vllm_version") or "-"}  # fmt: skip
    card_html = "".join(f"<div class='card'><b>{html.escape(str(v))}</b><span>{k}</span></div>" for k, v in cards.items())
    settings = html.escape(json.dumps({k: doc[k] for k in ("slo", "workload", "engine", "search")}, indent=1))
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>MedGemma capacity - {html.escape(doc['url'])}</title><style>{report.CSS}</style></head>
<body><header><h1>MedGemma capacity: {doc['units_per_replica']} units per replica</h1>
<p>{html.escape(doc['url'])} - {html.escape(doc['measured_at'])}</p></header><main>
<div class="cards">{card_html}</div>
<div class="grid">{''.join(f'<div class="plot">{p}</div>' for p in plots)}</div>
<h2>Points</h2>{_points_table(doc)}
<h2>SLO, workload, engine, search</h2><pre>{settings}</pre>
</main><script>{report.SCRIPT}</script></body></html>
"""


def progress_line(point: Point) -> str:
    ttft, tpot = point.ttft_s.value, point.tpot_s.value
    return (f"concurrency {point.concurrency:>4}: {point.verdict}{' (close)' if point.close else ''}, "
            f"{point.runs} run(s), {point.requests_per_s:.2f} req/s, TTFT p {'-' if ttft is None else f'{ttft * 1e3:.0f}'} ms, "
            f"TPOT p {'-' if tpot is None else f'{tpot * 1e3:.0f}'} ms" + (f" ({'; '.join(point.reasons)})" if point.reasons else ""))  # fmt: skip
