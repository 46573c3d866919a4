"""``medgemma-loadtest``: run a load test, or an A/B comparison of two endpoints.

    medgemma-loadtest run --url http://127.0.0.1:8000 --concurrency 8 --duration 60 --images 1 --out results/
    medgemma-loadtest ab --url http://127.0.0.1:8000 --url-b http://127.0.0.1:8001 --concurrency 4 --requests 32

Exit status: 0 after a run (whatever the server answered: outcomes are in the report),
2 for settings refused before any request was sent.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import sys
from pathlib import Path

from loadtests import ab, config, report, summary
from loadtests.runner import Progress, Runner
from loadtests.workload import Workload
from serving.layers import SettingsError, add_setting_flags

LIST_SETTINGS = {"key", "key_b"}


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    add_setting_flags(parser, config.LoadTestSettings, repeated=LIST_SETTINGS, skip={"streams"})
    parser.add_argument("--scenario", default=None, help="YAML scenario file of settings (lowest layer).")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medgemma-loadtest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    commands = parser.add_subparsers(dest="command", required=True)
    _add_setting_flags(commands.add_parser("run", help="Run a load test against one endpoint."))
    _add_setting_flags(commands.add_parser("ab", help="Interleave the same workload against --url and --url-b."))
    return parser


def run(settings: config.LoadTestSettings) -> dict:
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    started_at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    workload = Workload(settings.workload_spec(), seed=settings.seed)
    runner = Runner(settings.url, workload, seed=settings.seed, timeout_s=settings.timeout,
                    honor_retry_after=settings.honor_retry_after, progress=Progress(settings.progress),
                    stream_workloads=settings.stream_workloads())  # fmt: skip
    results = asyncio.run(runner.run(settings.stages()))
    records = [r for result in results for r in result.records]
    stages = []
    for result in results:
        figures = summary.summarize_stage(result, settings.slo_s())
        figures["window_start_s"], figures["window_end_s"] = result.window
        stages.append(figures)
    timeline = summary.timeline(records)
    doc = {
        "tool": "medgemma-loadtest",
        "url": settings.url,
        "started_at": started_at,
        "config": settings.public_config(),
        "definitions": summary.DEFINITIONS,
        "stages": stages,
        "timeline": timeline,
        "warnings": [w for s in stages for w in s["warnings"]],
    }
    report.write_jsonl(out / "requests.jsonl", records)
    report.write_json(out / "summary.json", doc)
    (out / "report.html").write_text(report.render_html(doc, records, timeline))
    print(report.terminal_table(doc))
    print(f"wrote {out / 'summary.json'}, {out / 'requests.jsonl'}, {out / 'report.html'}")
    return doc


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    flags = {k: v for k, v in vars(args).items() if k not in ("command", "scenario")}
    try:
        settings = config.load_settings(flags, args.scenario)
        if args.command == "ab" and not settings.url_b:
            raise SettingsError("ab needs --url-b (the second endpoint)")
        if args.command == "ab" and settings.streams:
            raise SettingsError("ab runs one workload on both endpoints; run a streams scenario with 'run' per endpoint")
    except SettingsError as exc:
        print(f"medgemma-loadtest: {exc}", file=sys.stderr)
        return 2
    if args.command == "ab":
        ab.run(settings)
    else:
        run(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
