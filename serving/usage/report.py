"""The usage report: request records -> per-group totals, as a table, CSV or JSON.

What a billing job or an audit export runs (``medgemma-serve usage``). Guarantees:
- Only ``kind == "request"`` records count; ``since`` is inclusive and ``until`` exclusive on
  the record's ``time`` (when the request ended, UTC).
- Each group's integer metrics are the plain sums over that group's records, and the total
  row's are the plain sums over all selected records (so the groups add up to the total).
  Float sums (``unit_seconds``) are exact: correctly rounded, whatever the order the records
  came in; they are rounded only when rendered as a table or CSV (JSON keeps them whole).
- ``*_p95_s`` is the nearest-rank 95th percentile over the records where the value is not
  null, and null when there is none.
- A null account (refused before its key was accepted) groups as ``(unauthenticated)``;
  another null group value as ``(none)``.
- Everything here is a function over iterables of dicts (one pass, any size); reading the
  files is ``serving.usage.reader``.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timezone

from serving.usage.reader import parse_record_time

GROUP_KEYS = ("account", "plan", "key", "day", "priority", "outcome")
DEFAULT_GROUP_KEYS = ("account",)
UNAUTHENTICATED = "(unauthenticated)"
NO_VALUE = "(none)"
FORMATS = ("table", "csv", "json")
METRICS = (
    "requests", "completed", "refused", "evicted", "client_left", "unit_seconds", "unit_hours",
    "prompt_tokens", "completion_tokens", "images", "ttft_p95_s", "e2e_p95_s",
)  # fmt: skip
CSV_FLOAT_PLACES = 6


class ReportArgumentError(ValueError):
    """A report argument was refused (unknown group key, bad date); the message says why."""


def parse_group_keys(text: str) -> tuple[str, ...]:
    """``"account,day"`` -> ``("account", "day")``; refuses unknown or repeated keys."""
    keys = tuple(part.strip() for part in text.split(",") if part.strip())
    if not keys:
        raise ReportArgumentError(f"--by needs one or more of {', '.join(GROUP_KEYS)}")
    unknown = [k for k in keys if k not in GROUP_KEYS]
    if unknown:
        raise ReportArgumentError(f"unknown group key {unknown[0]!r} in --by (choose from {', '.join(GROUP_KEYS)})")
    if len(set(keys)) != len(keys):
        raise ReportArgumentError(f"--by names a key twice: {text!r}")
    return keys


def parse_time_bound(text: str, flag: str = "--since/--until") -> datetime:
    """``2026-12-01`` (00:00 UTC that day) or an ISO datetime with ``Z`` or an offset -> aware UTC."""
    text = text.strip()
    try:
        if len(text) == 10:
            return datetime.combine(date.fromisoformat(text), datetime.min.time(), timezone.utc)
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ReportArgumentError(f"{flag}: {text!r} is neither a date (2026-12-01) nor an ISO datetime") from None
    if moment.tzinfo is None:
        raise ReportArgumentError(f"{flag}: {text!r} has no time zone; add Z (UTC) or an offset like +01:00")
    return moment.astimezone(timezone.utc)


def select_requests(
    records: Iterable[dict], since: datetime | None = None, until: datetime | None = None
) -> Iterator[dict]:
    """The request records with ``since <= time < until`` (either bound may be None)."""
    for record in records:
        if record.get("kind") != "request":
            continue
        moment = parse_record_time(record)
        if moment is None:
            continue
        if since is not None and moment < since:
            continue
        if until is not None and moment >= until:
            continue
        yield record


def group_value(record: dict, key: str) -> str:
    """The value a record groups under for one group key (never None)."""
    if key == "account":
        return UNAUTHENTICATED if record.get("account") is None else str(record["account"])
    if key == "day":
        return parse_record_time(record).date().isoformat()
    value = record.get("key_id" if key == "key" else key)
    return NO_VALUE if value is None else str(value)


def nearest_rank_percentile(values: Sequence[float], percent: int) -> float | None:
    """The smallest value with at least ``percent``% of the values at or below it; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, (percent * len(ordered) + 99) // 100)  # ceil(percent/100 * n), in integers
    return ordered[rank - 1]


class ExactSum:
    """A running float sum without rounding error (Shewchuk's partials, as ``math.fsum``)."""

    def __init__(self) -> None:
        self._partials: list[float] = []

    def add(self, value: float) -> None:
        value = float(value)
        kept = 0
        for partial in self._partials:
            if abs(value) < abs(partial):
                value, partial = partial, value
            high = value + partial
            low = partial - (high - value)
            if low:
                self._partials[kept] = low
                kept += 1
            value = high
        self._partials[kept:] = [value]

    @property
    def value(self) -> float:
        return math.fsum(self._partials)


@dataclass
class GroupTotals:
    """The running metrics of one group (or of the total row)."""

    requests: int = 0
    completed: int = 0
    refused: int = 0
    evicted: int = 0
    client_left: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    images: int = 0
    unit_seconds: ExactSum = field(default_factory=ExactSum)
    ttft_values: list[float] = field(default_factory=list)
    e2e_values: list[float] = field(default_factory=list)

    def add(self, record: dict) -> None:
        outcome = str(record.get("outcome") or "")
        status = record.get("status")
        self.requests += 1
        self.completed += outcome == "completed" and status is not None and status < 400
        self.refused += outcome.startswith("rejected_")
        self.evicted += outcome.startswith("evicted_")
        self.client_left += record.get("client_left") is True
        self.prompt_tokens += record.get("prompt_tokens") or 0
        self.completion_tokens += record.get("completion_tokens") or 0
        self.images += record.get("images") or 0
        self.unit_seconds.add(record.get("unit_seconds") or 0)
        if record.get("ttft_s") is not None:
            self.ttft_values.append(record["ttft_s"])
        if record.get("e2e_s") is not None:
            self.e2e_values.append(record["e2e_s"])

    def metrics(self) -> dict:
        unit_seconds = self.unit_seconds.value
        return {
            "requests": self.requests,
            "completed": self.completed,
            "refused": self.refused,
            "evicted": self.evicted,
            "client_left": self.client_left,
            "unit_seconds": unit_seconds,
            "unit_hours": unit_seconds / 3600,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "images": self.images,
            "ttft_p95_s": nearest_rank_percentile(self.ttft_values, 95),
            "e2e_p95_s": nearest_rank_percentile(self.e2e_values, 95),
        }


def build_report(
    records: Iterable[dict],
    by: Sequence[str] = DEFAULT_GROUP_KEYS,
    since: datetime | None = None,
    until: datetime | None = None,
    skipped_lines: int = 0,
) -> dict:
    """One pass over the records -> the report (the JSON output's shape).

    When ``records`` is a lazy ``UsageReader``, its ``skipped_lines`` is known only after
    this pass: set ``report["skipped_lines"]`` from it afterwards.
    """
    by = tuple(by)
    groups: dict[tuple[str, ...], GroupTotals] = {}
    total = GroupTotals()
    for record in select_requests(records, since, until):
        group_id = tuple(group_value(record, key) for key in by)
        if group_id not in groups:
            groups[group_id] = GroupTotals()
        groups[group_id].add(record)
        total.add(record)
    return {
        "since": _iso(since),
        "until": _iso(until),
        "by": list(by),
        "groups": [{**dict(zip(by, group_id)), **groups[group_id].metrics()} for group_id in sorted(groups)],
        "total": total.metrics(),
        "skipped_lines": skipped_lines,
    }


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat().replace("+00:00", "Z")


def render(report: dict, output_format: str) -> str:
    """The report as ``table``, ``csv`` or ``json`` text (ends with a newline)."""
    if output_format == "json":
        return json.dumps(report, indent=2) + "\n"
    if output_format == "csv":
        return render_csv(report)
    if output_format == "table":
        return render_table(report)
    raise ReportArgumentError(f"unknown format {output_format!r} (choose from {', '.join(FORMATS)})")


def render_csv(report: dict) -> str:
    """Header + one row per group + a total row; the ``row`` column says which (group/total)."""
    by = report["by"]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["row", *by, *METRICS])
    for group in report["groups"]:
        writer.writerow(["group", *(group[k] for k in by), *(_csv_cell(group[m]) for m in METRICS)])
    writer.writerow(["total", *("" for _ in by), *(_csv_cell(report["total"][m]) for m in METRICS)])
    return out.getvalue()


def _csv_cell(value) -> str | int:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{CSV_FLOAT_PLACES}f}"
    return value


TABLE_FLOAT_PLACES = {"unit_seconds": 1, "unit_hours": 3, "ttft_p95_s": 3, "e2e_p95_s": 3}


def render_table(report: dict) -> str:
    """Aligned columns for a terminal: group keys left-aligned, numbers right-aligned, a TOTAL row."""
    by = report["by"]
    header = [*by, *METRICS]
    rows = [[*(group[k] for k in by), *(_table_cell(m, group[m]) for m in METRICS)] for group in report["groups"]]
    total_row = ["TOTAL", *("" for _ in by[1:]), *(_table_cell(m, report["total"][m]) for m in METRICS)]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, total_row)]

    def line(cells: list) -> str:
        parts = [
            str(cell).ljust(width) if index < len(by) else str(cell).rjust(width)
            for index, (cell, width) in enumerate(zip(cells, widths))
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * width for width in widths)
    lines = [line(header), rule, *(line(row) for row in rows), rule, line(total_row)]
    window = f"since {report['since'] or 'the start'} until {report['until'] or 'the end'}"
    lines.append(f"({window}; {len(rows)} group(s); {report['skipped_lines'] or 0} unreadable line(s) skipped)")
    return "\n".join(lines) + "\n"


def _table_cell(metric: str, value) -> str:
    if value is None:
        return "-"
    if metric in TABLE_FLOAT_PLACES:
        return f"{value:.{TABLE_FLOAT_PLACES[metric]}f}"
    return str(value)
