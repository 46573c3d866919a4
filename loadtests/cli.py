"""``medgemma-loadtest``: run a load test, or an A/B comparison of two endpoints.

    medgemma-loadtest run --url http://127.0.0.1:8000 --concurrency 8 --duration 60 --images 1 --out results/
    medgemma-loadtest ab --url http://127.0.0.1:8000 --url-b http://127.0.0.1:8001 --concurrency 4 --requests 32
    medgemma-loadtest capacity --url http://127.0.0.1:8000 --scenario workload.yaml --slo-ttft-ms 2000 \
        --slo-tpot-ms 60 --duration 30 --out results/
    medgemma-loadtest plan --capacity-file results/capacity.json --keys-file keys.yaml --peak-utilisation 0.6 \
        --gpu-hour-price 2.5

Exit status: 0 after a run (whatever the server answered: outcomes are in the report) or
a capacity search that found a capacity, 1 when the SLO did not hold even at the search's
first concurrency, 2 for settings refused before any request was sent.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import sys
from pathlib import Path

from loadtests import ab, capacity_report, config, report, summary
from loadtests import plan as fleet
from loadtests import replay as replaying
from loadtests.capacity import CapacitySearch
from loadtests.profiles import Stage
from loadtests.runner import Progress, Runner
from loadtests.workload import Workload
from serving.admission.keysfile import KeysFileError
from serving.layers import SettingsError, add_setting_flags, read_yaml

LIST_SETTINGS = {"key", "key_b"}
SEARCH_SETTINGS = {"slo_percentile", "slo_min_ok", "search_start", "search_max", "search_resolution", "search_repeats",
                   "search_min_gain"}  # fmt: skip
# what a capacity search chooses itself, or does not use
NOT_FOR_CAPACITY = {"streams", "concurrency", "rate", "ramp_to", "sweep_concurrency", "sweep_rate", "arrival",
                    "burstiness", "max_concurrency", "url_b", "key_b", "rounds"}  # fmt: skip


def _add_setting_flags(parser: argparse.ArgumentParser, skip: set[str]) -> None:
    add_setting_flags(parser, config.LoadTestSettings, repeated=LIST_SETTINGS, skip=skip)
    parser.add_argument("--scenario", default=None, help="YAML scenario file of settings (lowest layer).")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medgemma-loadtest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    commands = parser.add_subparsers(dest="command", required=True)
    _add_setting_flags(commands.add_parser("run", help="Run a load test against one endpoint."),
                       {"streams"} | SEARCH_SETTINGS)  # fmt: skip
    _add_setting_flags(commands.add_parser("ab", help="Interleave the same workload against --url and --url-b."),
                       {"streams"} | SEARCH_SETTINGS)  # fmt: skip
    _add_setting_flags(commands.add_parser("capacity", help="Search for the highest concurrency one replica "
                                           "serves within the SLO; writes capacity.json."), NOT_FOR_CAPACITY)  # fmt: skip
    plan = commands.add_parser("plan", help="Replicas at peak, Ray min/max_replicas, headroom and cost per sold "
                               "unit, from a capacity and what is sold.")  # fmt: skip
    plan.add_argument("--capacity-file", required=True, help="capacity.json from `capacity`, or units per replica.")
    sold = plan.add_mutually_exclusive_group(required=True)
    sold.add_argument("--keys-file", help="The server's keys file: units sold = every active account's plan.")
    sold.add_argument("--sold-units", type=int, help="Units sold (concurrency units across every account).")
    plan.add_argument("--peak-utilisation", type=float, default=1.0,
                      help="Share of sold units in use at the busiest hour (default 1: every one).")  # fmt: skip
    plan.add_argument("--trough-utilisation", type=float, default=0.0,
                      help="Share in use at the quietest hour (sets min_replicas; default 0: one replica).")  # fmt: skip
    plan.add_argument("--target-utilisation", type=float, default=fleet.DEFAULT_TARGET_UTILISATION,
                      help="The autoscaler's target share of a replica's capacity (Ray scaling setting).")  # fmt: skip
    plan.add_argument("--gpu-hour-price", type=float, help="Price of one GPU-hour, for the cost figures.")
    plan.add_argument("--gpus-per-replica", type=int, default=1, help="GPUs one replica holds (default 1).")
    plan.add_argument("--json", action="store_true", help="Print the plan as JSON.")
    replay = commands.add_parser("replay", help="Replay a demand trace against the autoscaling policy: SLO "
                                 "attainment against replica-hours per target utilisation.")  # fmt: skip
    replay.add_argument("--capacity-file", required=True, help="capacity.json from `capacity`, or units per replica.")
    replay.add_argument("--trace", required=True, help="step:BEFORE,DURING,AFTER,STARTS_S,ENDS_S, "
                        "diurnal:MEAN,AMPLITUDE[,PERIOD_S] or poisson:RATE_PER_S,SERVICE_S[,SWING] (units in flight).")  # fmt: skip
    replay.add_argument("--duration-s", type=float, default=86_400.0, help="Seconds replayed (default a day).")
    replay.add_argument("--targets", default="0.5,0.6,0.75,0.9", help="Target utilisations to compare.")
    replay.add_argument("--start-s", type=float, default=180.0, help="Measured replica start: added -> serving.")
    replay.add_argument("--step-s", type=float, default=0.5, help="The replay's control-loop period.")
    replay.add_argument("--seed", type=int, default=0, help="Seed of a poisson trace.")
    replay.add_argument("--json", action="store_true", help="Also print every decision as JSON.")
    defaults = fleet_scaling_defaults()
    for name in ("min_replicas", "max_replicas", "upscale_delay_s", "downscale_delay_s", "look_back_period_s",
                 "metrics_interval_s"):  # fmt: skip
        kind = int if name.endswith("replicas") else float
        replay.add_argument("--" + name.replace("_", "-"), type=kind, default=defaults[name],
                            help=f"Ray Serve scaling setting (default {defaults[name]:g}).")  # fmt: skip
    return parser


def fleet_scaling_defaults() -> dict:
    from serving.ray_app import ScalingSettings

    return {name: field.default for name, field in ScalingSettings.model_fields.items()}


def replay_trace(args: argparse.Namespace) -> int:
    units, _ = fleet.units_from_capacity(args.capacity_file)
    try:
        targets = [float(t) for t in args.targets.split(",")]
        trace = replaying.parse_trace(args.trace, args.duration_s, args.seed)
        config = replaying.ReplayConfig(units, min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                                        upscale_delay_s=args.upscale_delay_s, downscale_delay_s=args.downscale_delay_s,
                                        look_back_period_s=args.look_back_period_s,
                                        metrics_interval_s=args.metrics_interval_s, start_s=args.start_s,
                                        step_s=args.step_s)  # fmt: skip
        results = replaying.compare_targets(trace, args.duration_s, config, targets)
    except ValueError as exc:
        raise SettingsError(str(exc)) from None
    print(f"{args.trace} over {args.duration_s:g} s; {units} units per replica, replicas {args.min_replicas}-"
          f"{args.max_replicas}, start {args.start_s:g} s, delays up {args.upscale_delay_s:g} s / down "
          f"{args.downscale_delay_s:g} s")  # fmt: skip
    print(replaying.render(results))
    if args.json:
        print(json.dumps([{"target": r.config.target_utilisation, "attainment": r.attainment,
                           "replica_hours": r.replica_hours, "decisions": r.decisions, "ready": r.ready}
                          for r in results], indent=1))  # fmt: skip
    return 0


def plan_fleet(args: argparse.Namespace) -> int:
    units, measured = fleet.units_from_capacity(args.capacity_file)
    sold = args.sold_units if args.sold_units is not None else fleet.sold_units_in(args.keys_file)
    result = fleet.fleet_plan(units, sold, peak_utilisation=args.peak_utilisation,
                              trough_utilisation=args.trough_utilisation, target_utilisation=args.target_utilisation,
                              gpus_per_replica=args.gpus_per_replica, gpu_hour_price=args.gpu_hour_price)  # fmt: skip
    print(json.dumps(result.to_json() | {"measured": measured}, indent=2) if args.json else fleet.render(result, measured))
    return 0


def capacity_settings(flags: dict, scenario: str | None) -> config.LoadTestSettings:
    """The settings of a capacity search: the workload and SLO from the layers, no load
    shape (the search picks each point's concurrency)."""
    given = set(read_yaml(scenario)) if scenario else set()
    given |= {name for name in NOT_FOR_CAPACITY if f"{config.ENV_PREFIX}{name}".upper() in os.environ}
    shaped = sorted(given & NOT_FOR_CAPACITY)
    if shaped:
        raise SettingsError(f"capacity chooses each point's concurrency itself: leave out {', '.join(shaped)}")
    settings = config.load_settings(flags | {"concurrency": 1}, scenario)
    try:
        settings.slo()
    except ValueError as exc:
        raise SettingsError(f"capacity: {exc}") from None
    return settings


def capacity(settings: config.LoadTestSettings) -> dict:
    """Run the search against ``settings.url``; write capacity.json and capacity.html."""
    started_at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    workload = Workload(settings.workload_spec(), seed=settings.seed)
    duration = settings.stages()[0].duration_s
    runs = 0

    def measure(concurrency: int):
        nonlocal runs
        runs += 1
        stage = Stage("concurrency", concurrency=concurrency, duration_s=duration, requests=settings.requests,
                      warmup_s=settings.warmup, cooldown_s=settings.cooldown)  # fmt: skip
        runner = Runner(settings.url, workload, seed=settings.seed + runs, timeout_s=settings.timeout,
                        honor_retry_after=settings.honor_retry_after, progress=Progress(settings.progress))  # fmt: skip
        [result] = asyncio.run(runner.run([stage]))
        low, high = result.window
        return result.records, high - low

    search = CapacitySearch(measure, settings.slo(), start=settings.search_start, max_concurrency=settings.search_max,
                            resolution=settings.search_resolution, repeats=settings.search_repeats,
                            min_gain=settings.search_min_gain,
                            on_point=lambda point: print(capacity_report.progress_line(point), flush=True))  # fmt: skip
    result = search.run()
    doc = capacity_report.document(
        result, settings.slo(), config=settings.public_config(), engine=capacity_report.engine_info(settings.url),
        url=settings.url, started_at=started_at,
        search={"start": settings.search_start, "max": settings.search_max, "resolution": settings.search_resolution,
                "repeats": settings.search_repeats, "min_gain": settings.search_min_gain, "duration_s": duration,
                "requests": settings.requests,
                "warmup_s": settings.warmup, "runs": runs},
    )  # fmt: skip
    out = Path(settings.out)
    capacity_report.write(out, doc)
    bracket = doc["bracket"]
    print(f"capacity: {doc['units_per_replica']} units per replica (held at {bracket['holds_at']}, missed at "
          f"{bracket['misses_at'] or '-'}; search {doc['stopped']}, {runs} runs)")  # fmt: skip
    print(f"wrote {out / 'capacity.json'}, {out / 'capacity.html'}")
    return doc


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
    try:
        if args.command == "plan":
            return plan_fleet(args)
        if args.command == "replay":
            return replay_trace(args)
    except (SettingsError, KeysFileError) as exc:
        print(f"medgemma-loadtest: {exc}", file=sys.stderr)
        return 2
    flags = {k: v for k, v in vars(args).items() if k not in ("command", "scenario")}
    try:
        if args.command == "capacity":
            settings = capacity_settings(flags, args.scenario)
            return 0 if capacity(settings)["units_per_replica"] else 1
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
