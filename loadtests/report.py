"""Report outputs: per-request JSONL, a summary JSON, a self-contained HTML page with plots,
and the terminal table.

The HTML embeds its plots as inline SVG (matplotlib, no network, no external files); a tiny
script marks the page ``data-report-ready`` once it has checked that every plot rendered, so
a headless browser can tell a good page from a broken one.
"""

from __future__ import annotations

import html
import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from loadtests.summary import DEFINITIONS, percentiles  # noqa: E402

COLORS = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2", "#be185d"]


def write_jsonl(path: Path, records) -> None:
    with path.open("w") as out:
        for record in records:
            out.write(json.dumps(record.to_json()) + "\n")


def write_json(path: Path, summary: dict) -> None:
    path.write_text(json.dumps(summary, indent=2, default=float) + "\n")


# --- plots ------------------------------------------------------------------------------
def svg(fig) -> str:
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buffer.getvalue()
    return text[text.index("<svg"):]


def figure(title: str, xlabel: str, ylabel: str):
    fig, ax = plt.subplots(figsize=(7.2, 3.4), dpi=100)
    ax.set_title(title, fontsize=11, loc="left")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return fig, ax


def plot_latency_over_time(records) -> str:
    fig, ax = figure("Latency over time (successful requests)", "request start (s)", "seconds")
    ok = [r for r in records if r.outcome == "ok" and r.ttft_s is not None]
    ax.scatter([r.start_s for r in ok], [r.e2e_s for r in ok], s=8, alpha=0.6, color=COLORS[0], label="E2E")
    ax.scatter([r.start_s for r in ok], [r.ttft_s for r in ok], s=8, alpha=0.6, color=COLORS[1], label="TTFT")
    bad = [r for r in records if r.outcome != "ok"]
    if bad:
        ax.scatter([r.start_s for r in bad], [r.e2e_s or 0 for r in bad], s=14, marker="x",
                   color=COLORS[3], label="not ok (429, errors)")  # fmt: skip
    ax.legend(loc="upper left", fontsize=8)
    return svg(fig)


def plot_throughput_over_time(timeline: dict, stages: list[dict]) -> str:
    fig, ax = figure("Throughput over time", "time (s)", "output tokens/s")
    ax.plot(timeline["t_s"], timeline["output_tokens_per_s"], color=COLORS[0], lw=1.5, label="output tokens/s")
    ax2 = ax.twinx()
    ax2.plot(timeline["t_s"], timeline["requests_per_s"], color=COLORS[2], lw=1, alpha=0.8, label="requests/s")
    ax2.set_ylabel("requests/s")
    for stage in stages:
        ax.axvspan(stage["window_start_s"], stage["window_end_s"], color="#94a3b8", alpha=0.12)
    ax.legend(loc="upper left", fontsize=8)
    ax2.legend(loc="upper right", fontsize=8)
    return svg(fig)


def plot_distribution(records, attribute: str, title: str) -> str:
    fig, ax = figure(title, "milliseconds", "requests")
    values = [getattr(r, attribute) * 1e3 for r in records if r.outcome == "ok" and getattr(r, attribute) is not None]
    if values:
        ax.hist(values, bins=min(40, max(5, len(values) // 4)), color=COLORS[0], alpha=0.8)
        stats = percentiles(values)  # the same percentiles as the tables
        for name, style in (("p50", "-"), ("p99", "--")):
            ax.axvline(stats[name], color=COLORS[1], ls=style, lw=1, label=f"{name} {stats[name]:.1f} ms")
        ax.legend(fontsize=8)
    return svg(fig)


def plot_ttft_by_images(records) -> str:
    fig, ax = figure("TTFT by images per request", "images", "TTFT (ms)")
    groups: dict[int, list[float]] = {}
    for r in records:
        if r.outcome == "ok" and r.ttft_s is not None:
            groups.setdefault(r.images, []).append(r.ttft_s * 1e3)
    if groups:
        keys = sorted(groups)
        ax.boxplot([groups[k] for k in keys], showfliers=False)
        ax.set_xticks(range(1, len(keys) + 1), [str(k) for k in keys])
    return svg(fig)


def plot_ttft_by_class(records) -> str:
    fig, ax = figure("TTFT over time by priority class", "request start (s)", "TTFT (ms)")
    classes = sorted({r.priority for r in records if r.priority})
    for i, cls in enumerate(classes):
        ok = [r for r in records if r.priority == cls and r.outcome == "ok" and r.ttft_s is not None]
        ax.scatter([r.start_s for r in ok], [r.ttft_s * 1e3 for r in ok], s=10, alpha=0.7,
                   color=COLORS[i % len(COLORS)], label=cls)  # fmt: skip
    ax.legend(loc="upper left", fontsize=8)
    return svg(fig)


def plot_goodput_vs_load(stages: list[dict]) -> str:
    kind = stages[0]["kind"]
    xlabel = "concurrency" if kind == "concurrency" else "offered rate (req/s)"
    fig, ax = figure("Goodput and throughput vs load", xlabel, "requests/s")
    loads = [s["load"] for s in stages]
    ax.plot(loads, [s["throughput"]["requests_per_s"] for s in stages], "o-", color=COLORS[0], label="throughput")
    ax.plot(loads, [s["goodput"]["requests_per_s"] for s in stages], "s-", color=COLORS[2], label="goodput")
    ax.legend(fontsize=8)
    return svg(fig)


# --- HTML -------------------------------------------------------------------------------
def _ms(value) -> str:
    return "-" if value is None else f"{value * 1e3:.1f}"


def _stage_table(stage: dict) -> str:
    rows = []
    for name, stats in stage["latency_s"].items():
        cells = "".join(f"<td>{_ms(stats[k])}</td>" for k in ("p50", "p90", "p95", "p99", "p99.9", "mean", "max"))
        rows.append(f"<tr><th>{name.upper()}</th>{cells}<td>{stats['count']}</td></tr>")
    head = "".join(f"<th>{h}</th>" for h in ("", "p50", "p90", "p95", "p99", "p99.9", "mean", "max", "n"))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _groups_table(stage: dict) -> str:
    """The stage's figures per stream, class and account, one row each."""
    rows = []
    for what, name, g in breakdowns(stage):
        lat, o = g["latency_s"], g["outcomes"]
        good = "-" if g["goodput"]["ratio"] is None else f"{g['goodput']['ratio']:.1%}"
        cells = [what, name, o.get("ok", 0), o.get("rate_limited", 0), sum(v for k, v in o.items() if k != "ok"),
                 f"{g['throughput']['requests_per_s']:.2f}", f"{g['throughput']['output_tokens_per_s']:.1f}",
                 _ms(lat["ttft"]["p50"]), _ms(lat["ttft"]["p95"]), _ms(lat["ttft"]["p99"]),
                 _ms(lat["tpot"]["p50"]), _ms(lat["e2e"]["p50"]), _ms(lat["e2e"]["p95"]), good]  # fmt: skip
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    if not rows:
        return ""
    head = "".join(f"<th>{h}</th>" for h in ("by", "", "ok", "429", "not ok", "req/s", "tok/s", "TTFT p50",
                                              "TTFT p95", "TTFT p99", "TPOT p50", "E2E p50", "E2E p95", "goodput"))  # fmt: skip
    return f"<table class='groups'><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _kv_table(items: dict) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in items.items())
    return f"<table class='kv'>{rows}</table>"


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f8fafc;color:#0f172a}
header{background:#0f172a;color:#f8fafc;padding:18px 28px}header h1{margin:0;font-size:20px}
header p{margin:4px 0 0;color:#cbd5e1;font-size:13px}main{padding:20px 28px;max-width:1500px}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:8px 0 18px}.card{background:#fff;border:1px solid #e2e8f0;
border-radius:8px;padding:10px 14px;min-width:150px}.card b{display:block;font-size:22px}.card span{color:#64748b;font-size:12px}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(560px,1fr));gap:14px}
.plot{background:#fff;border:1px solid #e2e8f0;border-radius:8px;padding:8px}.plot svg{width:100%;height:auto}
table{border-collapse:collapse;background:#fff;margin:8px 0 16px;font-size:13px}td,th{border:1px solid #e2e8f0;
padding:4px 9px;text-align:right}th{background:#f1f5f9}table.kv th{text-align:left}.warn{background:#fef3c7;
border:1px solid #f59e0b;padding:8px 12px;border-radius:6px;margin:6px 0}dl{font-size:13px}dt{font-weight:600}
"""

SCRIPT = """
window.addEventListener('load', function () {
  var plots = document.querySelectorAll('.plot svg');
  var drawn = 0;
  plots.forEach(function (svg) { var box = svg.getBoundingClientRect(); if (box.width > 0 && box.height > 0) drawn++; });
  document.body.setAttribute('data-plots', String(drawn));
  document.body.setAttribute('data-report-ready', drawn === plots.length && drawn > 0 ? 'ok' : 'broken');
});
"""


def render_html(summary: dict, records, timeline: dict) -> str:
    stages = summary["stages"]
    plots = [
        plot_latency_over_time(records),
        plot_throughput_over_time(timeline, stages),
        plot_distribution(records, "ttft_s", "TTFT distribution"),
        plot_distribution(records, "tpot_s", "TPOT distribution"),
        plot_ttft_by_images(records),
    ]
    if len(stages) > 1:
        plots.append(plot_goodput_vs_load(stages))
    if len({r.priority for r in records if r.priority}) > 1:
        plots.append(plot_ttft_by_class(records))
    first = stages[0]
    cards = {
        "requests ok": sum(s["requests"]["completed_ok"] for s in stages),
        "req/s": f"{first['throughput']['requests_per_s']:.2f}",
        "output tok/s": f"{first['throughput']['output_tokens_per_s']:.1f}",
        "TTFT p50 ms": _ms(first["latency_s"]["ttft"]["p50"]),
        "TPOT p50 ms": _ms(first["latency_s"]["tpot"]["p50"]),
        "goodput": "-" if first["goodput"]["ratio"] is None else f"{first['goodput']['ratio']:.1%}",
        "rate limited (429)": sum(s["outcomes"].get("rate_limited", 0) for s in stages),
    }
    card_html = "".join(f"<div class='card'><b>{html.escape(str(v))}</b><span>{k}</span></div>" for k, v in cards.items())
    warnings = "".join(f"<div class='warn'>{html.escape(w)}</div>" for w in summary["warnings"])
    stage_html = []
    for s in stages:
        extra = {"window (s)": f"{s['window_s']:.1f}", "peak concurrency": s["peak_concurrency"],
                 "outcomes": s["outcomes"], "by status": s["by_status"], "by error code": s["by_error_code"],
                 "image bytes/request (mean)": f"{s['image_bytes_per_request']['mean'] or 0:,.0f}",
                 "goodput SLOs (s)": s["goodput"]["slo_s"]}  # fmt: skip
        if "rate" in s:
            extra["offered / achieved req/s"] = f"{s['rate']['offered_per_s']:.2f} / {s['rate']['achieved_per_s']:.2f}"
        stage_html.append(f"<h3>{html.escape(s['label'])}</h3>{_stage_table(s)}{_kv_table(extra)}{_groups_table(s)}")
    definitions = "".join(f"<dt>{k}</dt><dd>{html.escape(v)}</dd>" for k, v in DEFINITIONS.items())
    config = html.escape(json.dumps(summary["config"], indent=1))
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>MedGemma load test - {html.escape(summary['url'])}</title><style>{CSS}</style></head>
<body><header><h1>MedGemma load test</h1><p>{html.escape(summary['url'])} - {html.escape(summary['started_at'])}
 - {html.escape(', '.join(s['label'] for s in stages))}</p></header><main>
<div class="cards">{card_html}</div>{warnings}
<div class="grid">{''.join(f'<div class="plot">{p}</div>' for p in plots)}</div>
<h2>Figures (ms unless noted)</h2>{''.join(stage_html)}
<h2>Definitions</h2><dl>{definitions}</dl>
<h2>Configuration</h2><pre>{config}</pre>
</main><script>{SCRIPT}</script></body></html>
"""


GROUPS = (("by_stream", "stream"), ("by_priority", "class"), ("by_key", "key"))


def breakdowns(stage: dict) -> list[tuple[str, str, dict]]:
    """(what, name, figures) for each group worth showing: every stream, and the classes or
    accounts when there is more than one (or any class was asked for)."""
    rows = []
    for field, what in GROUPS:
        groups = stage.get(field) or {}
        if field == "by_stream" or len(groups) > 1 or (field == "by_priority" and set(groups) - {"unspecified"}):
            rows += [(what, name, figures) for name, figures in groups.items()]
    return rows


def _row(label: str, s: dict) -> str:
    o = s["outcomes"]
    errors = sum(v for k, v in o.items() if k not in ("ok", "rate_limited"))
    lat = s["latency_s"]
    good = "-" if s["goodput"]["ratio"] is None else f"{s['goodput']['ratio']:.1%}"
    return (
        f"{label[:28]:<28} {o.get('ok', 0):>6} {o.get('rate_limited', 0):>5} {errors:>5} "
        f"{s['throughput']['requests_per_s']:>7.2f} {s['throughput']['output_tokens_per_s']:>8.1f} "
        f"{_ms(lat['ttft']['p50']):>9} {_ms(lat['ttft']['p95']):>8} {_ms(lat['ttft']['p99']):>8} "
        f"{_ms(lat['tpot']['p50']):>9} {_ms(lat['e2e']['p50']):>9} {good:>8}"
    )


def terminal_table(summary: dict) -> str:
    lines = []
    header = (f"{'stage':<28} {'ok':>6} {'429':>5} {'err':>5} {'req/s':>7} {'tok/s':>8} {'TTFT p50':>9} {'p95':>8} "
              f"{'p99':>8} {'TPOT p50':>9} {'E2E p50':>9} {'goodput':>8}")  # fmt: skip
    lines.append(header)
    lines.append("-" * len(header))
    for s in summary["stages"]:
        lines.append(_row(s["label"], s))
        for what, name, figures in breakdowns(s):
            lines.append(_row(f"  {what} {name}", figures))
    lines.append("(latencies in ms; 429 = the account's budget, counted apart from errors)")
    for warning in summary["warnings"]:
        lines.append(f"WARNING: {warning}")
    return "\n".join(lines)
