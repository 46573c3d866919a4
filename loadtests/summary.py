"""Figures from request records: latency percentiles, throughput, goodput, outcomes.

Guarantees: only requests started inside a stage's window count; latency figures use
successful requests only, while goodput puts every windowed request (errors and 429s too)
in its denominator; token counts come from the server's ``usage``, and a disagreement with
the client's own chunk count is reported as a warning, never silently corrected. Every stage
also has its figures per priority class (``by_priority``: the class the server says it ran
in, else the one asked for, else ``unspecified``), per account label (``by_key``) and, for a
streams stage, per stream (``by_stream``), over the same window.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict

from loadtests.client import RequestRecord
from loadtests.runner import StageResult

PERCENTILES = (50, 90, 95, 99, 99.9)
RATE_SHORTFALL = 0.9  # warn below this fraction of the offered rate
TOKEN_MISMATCH = 0.10  # warn when client chunks and server tokens differ by more

DEFINITIONS = {
    "ttft": "Time to first token: from sending the request to the first streamed chunk with non-empty content.",
    "tpot": "Time per output token: (E2E - TTFT) / (output tokens - 1), output tokens from the server's usage.",
    "itl": "Inter-chunk latency: the gaps between consecutive content chunks of a stream.",
    "e2e": "End-to-end latency: from sending the request to the end of its stream.",
    "request_throughput": "Successful requests started in the window / window length.",
    "output_token_throughput": "Output tokens (server usage) of successful requests started in the window / window length.",
    "goodput": "Requests meeting every SLO / all requests started in the window (errors and 429s count as misses).",
    "window": "The stage's duration minus warm-up and cool-down; requests started outside it are excluded.",
    "peak_concurrency": "The most requests in flight at once, seen by the client.",
    "outcomes": "ok; rate_limited (429: the account's budget, not a failure of the server); "
    "overloaded (503); client_error (other 4xx); server_error (other 5xx); transport_error.",
    "by_priority": "The same figures per priority class: the class the server ran the request in "
    "(its x-priority response header), else the class asked for, else 'unspecified'.",
    "by_key": "The same figures per account (key label).",
}
UNSPECIFIED = "unspecified"


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"count": 0, "mean": None, "min": None, "max": None, **{f"p{p:g}": None for p in PERCENTILES}}
    ordered = sorted(values)
    out = {"count": len(ordered), "mean": sum(ordered) / len(ordered), "min": ordered[0], "max": ordered[-1]}
    for p in PERCENTILES:  # linear interpolation between closest ranks
        rank = (len(ordered) - 1) * p / 100
        low, high = math.floor(rank), math.ceil(rank)
        out[f"p{p:g}"] = ordered[low] + (ordered[high] - ordered[low]) * (rank - low)
    return out


def peak_concurrency(records: list[RequestRecord]) -> int:
    events = sorted([(r.start_s, 1) for r in records] + [(r.end_s, -1) for r in records])
    peak = current = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return peak


def meets(record: RequestRecord, slo: dict[str, float]) -> bool:
    if record.outcome != "ok":
        return False
    checks = {"ttft": record.ttft_s, "tpot": record.tpot_s, "e2e": record.e2e_s}
    for name, limit in slo.items():
        value = checks[name]
        if value is None and name == "tpot":
            continue  # a one-token answer has no TPOT
        if value is None or value > limit:
            return False
    return True


def group_figures(windowed: list[RequestRecord], window_s: float, slo: dict[str, float]) -> dict:
    """The figures of one group of a stage's windowed requests (a class, an account, a stream)."""
    ok = [r for r in windowed if r.outcome == "ok"]
    met = sum(1 for r in windowed if meets(r, slo))
    return {
        "requests": {"in_window": len(windowed), "completed_ok": len(ok)},
        "outcomes": dict(Counter(r.outcome for r in windowed)),
        "by_error_code": dict(Counter(r.error_code for r in windowed if r.error_code)),
        "latency_s": {
            "ttft": percentiles([r.ttft_s for r in ok if r.ttft_s is not None]),
            "tpot": percentiles([r.tpot_s for r in ok if r.tpot_s is not None]),
            "e2e": percentiles([r.e2e_s for r in ok if r.e2e_s is not None]),
        },
        "throughput": {
            "requests_per_s": len(ok) / window_s,
            "output_tokens_per_s": sum(r.output_tokens or 0 for r in ok) / window_s,
        },
        "goodput": {"met": met, "ratio": met / len(windowed) if windowed else None},
    }


def by_group(windowed: list[RequestRecord], label, window_s: float, slo: dict[str, float]) -> dict[str, dict]:
    groups: dict[str, list[RequestRecord]] = defaultdict(list)
    for record in windowed:
        groups[label(record)].append(record)
    return {name: group_figures(groups[name], window_s, slo) for name in sorted(groups)}


def summarize_stage(result: StageResult, slo: dict[str, float]) -> dict:
    stage = result.stage
    low, high = result.window
    window_s = high - low
    windowed = [r for r in result.records if r.in_window]
    ok = [r for r in windowed if r.outcome == "ok"]
    warnings: list[str] = []
    outcomes = Counter(r.outcome for r in windowed)
    by_status = Counter(str(r.status) if r.status is not None else "none" for r in windowed)
    by_code = Counter(r.error_code for r in windowed if r.error_code)
    output_tokens = sum(r.output_tokens or 0 for r in ok)
    met = sum(1 for r in windowed if meets(r, slo))
    by_images: dict[int, list[float]] = defaultdict(list)
    for r in ok:
        if r.ttft_s is not None:
            by_images[r.images].append(r.ttft_s)
    summary = {
        "index": result.index,
        "label": stage.label,
        "kind": stage.kind,
        "load": stage.load,
        "window_s": window_s,
        "requests": {
            "sent": len(result.records),
            "in_window": len(windowed),
            "completed_ok": len(ok),
            "excluded_warmup_cooldown": len(result.records) - len(windowed),
        },
        "outcomes": dict(outcomes),
        "by_status": dict(by_status),
        "by_error_code": dict(by_code),
        "latency_s": {
            "ttft": percentiles([r.ttft_s for r in ok if r.ttft_s is not None]),
            "tpot": percentiles([r.tpot_s for r in ok if r.tpot_s is not None]),
            "itl": percentiles([gap for r in ok for gap in r.itl_s]),
            "e2e": percentiles([r.e2e_s for r in ok if r.e2e_s is not None]),
        },
        "ttft_by_images_s": {str(n): percentiles(v) for n, v in sorted(by_images.items())},
        "throughput": {
            "requests_per_s": len(ok) / window_s,
            "output_tokens_per_s": output_tokens / window_s,
            "total_tokens_per_s": (output_tokens + sum(r.prompt_tokens or 0 for r in ok)) / window_s,
        },
        "tokens": {
            "prompt_total": sum(r.prompt_tokens or 0 for r in ok),
            "output_total": output_tokens,
            "output_per_request": percentiles([float(r.output_tokens) for r in ok if r.output_tokens is not None]),
        },
        "peak_concurrency": peak_concurrency(result.records),
        "image_bytes_per_request": percentiles([float(r.image_bytes) for r in windowed]),
        "images_per_request": percentiles([float(r.images) for r in windowed]),
        "goodput": {
            "slo_s": slo,
            "met": met,
            "ratio": met / len(windowed) if windowed else None,
            "requests_per_s": met / window_s,
        },
        "by_priority": by_group(windowed, lambda r: r.priority or UNSPECIFIED, window_s, slo),
        "by_key": by_group(windowed, lambda r: r.key, window_s, slo),
    }
    if stage.kind == "streams":
        summary["by_stream"] = by_group(windowed, lambda r: r.stream, window_s, slo)
        for stream in stage.streams:
            figures = summary["by_stream"].setdefault(stream.name, group_figures([], window_s, slo))
            if stream.shape.kind == "rate":
                offered = stream.shape.offered_requests(low - result.started_s, high - result.started_s) / window_s
                figures["rate"] = {"offered_per_s": offered, "achieved_per_s": figures["requests"]["in_window"] / window_s}
    if stage.kind in ("rate", "ramp"):
        offered = stage.offered_requests(low - result.started_s, high - result.started_s) / window_s
        achieved = len(windowed) / window_s
        lags = [r.start_s - r.scheduled_s for r in result.records if r.scheduled_s is not None]
        summary["rate"] = {
            "offered_per_s": offered,
            "achieved_per_s": achieved,
            "send_lag_s": percentiles(lags),
        }
        if achieved < RATE_SHORTFALL * offered:
            warnings.append(
                f"{stage.label}: achieved {achieved:.2f} req/s of {offered:.2f} offered "
                f"(send lag p99 {summary['rate']['send_lag_s']['p99'] or 0:.3f}s): the load generator "
                "or the arrival sample fell short; figures are for the achieved rate."
            )
    mismatched = [
        r for r in ok
        if r.output_tokens and abs(r.content_chunks - r.output_tokens) > TOKEN_MISMATCH * r.output_tokens
    ]  # fmt: skip
    if mismatched:
        warnings.append(
            f"{stage.label}: {len(mismatched)} of {len(ok)} responses streamed a number of content "
            "chunks that differs from usage.completion_tokens by more than "
            f"{TOKEN_MISMATCH:.0%}; token figures use the server's usage."
        )
    missing_usage = sum(1 for r in ok if r.output_tokens is None)
    if missing_usage:
        warnings.append(f"{stage.label}: {missing_usage} responses had no usage; their tokens are not counted.")
    if not windowed:
        warnings.append(f"{stage.label}: no request started inside the measured window.")
    summary["warnings"] = warnings
    return summary


def timeline(records: list[RequestRecord], bin_s: float | None = None) -> dict[str, list[float]]:
    """Completions and output tokens per second over the run, binned by when they ended
    (bins of about a fortieth of the run, at least a second, so the curve is readable)."""
    if not records:
        return {"t_s": [], "requests_per_s": [], "output_tokens_per_s": []}
    end = max(r.end_s for r in records)
    bin_s = bin_s or max(1.0, round(end / 40))
    bins = int(end // bin_s) + 1
    done, tokens = [0.0] * bins, [0.0] * bins
    for r in records:
        if r.outcome == "ok":
            i = int(r.end_s // bin_s)
            done[i] += 1 / bin_s
            tokens[i] += (r.output_tokens or 0) / bin_s
    return {"t_s": [i * bin_s for i in range(bins)], "requests_per_s": done, "output_tokens_per_s": tokens}
