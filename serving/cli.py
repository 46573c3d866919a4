"""``medgemma-serve``: serve, engine-args, devmodel.

Guarantee: every ``serve``/``engine-args`` flag is generated from a ``ServeSettings``
field (its description is the help text), and all settings are validated before any
engine process starts. Exit status 2 means the settings were refused (the message says
what to fix).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from serving import config, devmodel, engine, hardware, layers
from serving.logs import configure_logging

logger = logging.getLogger("serving")


FILE_ONLY_SETTINGS = {"vllm_args", "model_costs", "redis_password"}  # lists, maps, secrets: YAML or env only


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    layers.add_setting_flags(
        parser, config.ServeSettings, skip=FILE_ONLY_SETTINGS, repeated={"remote_image_hosts"}
    )
    parser.add_argument(
        "--config", dest="config_file", default=None, help="YAML file of settings (lowest layer)."
    )


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medgemma-serve",
        description="Serve MedGemma-4b-it through vLLM's OpenAI-compatible API.",
        epilog="Extra vLLM arguments go after '--' and pass through untouched.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="Start the OpenAI-compatible server.")
    _add_setting_flags(serve)
    args_cmd = sub.add_parser("engine-args", help="Print the resolved vLLM arguments and exit.")
    _add_setting_flags(args_cmd)
    args_cmd.add_argument("--json", action="store_true", help="Print a JSON list.")
    sub.add_parser("profiles", help="Print the engine profile table as JSON.")
    from serving import keyscli

    keyscli.add_parser(sub)  # keys add/list/revoke/restore/rotate/expire/suspend/resume
    ray_cmd = sub.add_parser(
        "ray", help="Serve on a Ray cluster (Ray Serve replicas, cost-unit autoscaling)."
    )
    _add_setting_flags(ray_cmd)
    from serving.ray_app import ScalingSettings

    layers.add_setting_flags(ray_cmd, ScalingSettings, skip={"replica_resources"})
    ray_cmd.add_argument("--app-config", default=None,
                         help="YAML of build_app's args ({serve: ..., scaling: ...}); flags win.")  # fmt: skip
    ray_cmd.add_argument("--ray-address", default=None, help="Join this Ray cluster (default: start one).")
    ray_cmd.add_argument("--ray-temp-dir", default=None, help="Ray's temp/session folder.")
    ray_cmd.add_argument("--num-cpus", type=int, default=None, help="CPUs of a Ray cluster started here.")
    idle = sub.add_parser(
        "wait-idle",
        help="Wait until a server has no admitted request left (a Kubernetes preStop drain).",
    )
    idle.add_argument("--url", default="http://127.0.0.1:8000", help="The server's base URL.")
    idle.add_argument("--timeout-s", type=float, default=120.0, help="Give up after this long.")
    usage = sub.add_parser("usage", help="Report usage records per account/plan/key/day (billing, audit).")
    usage.add_argument("paths", nargs="+", metavar="PATH",
                       help="usage.jsonl files, directories (every usage.jsonl* in them) or globs.")  # fmt: skip
    usage.add_argument("--by", default="account", help="Group by these, comma-separated: account, plan, key, day, "
                       "priority, outcome (default: account).")  # fmt: skip
    usage.add_argument("--since", default=None,
                       help="From this time, inclusive: 2026-12-01 (00:00 UTC) or ISO with Z/offset.")  # fmt: skip
    usage.add_argument("--until", default=None, help="Up to this time, exclusive: same forms as --since.")
    usage.add_argument("--format", dest="output_format", choices=("table", "csv", "json"), default="table",
                       help="Aligned text, CSV (with a total row) or JSON.")  # fmt: skip
    dev = sub.add_parser("devmodel", help="Write the dev checkpoint (tiny random MedGemma).")
    dev.add_argument("path", help="Folder to write the checkpoint into.")
    dev.add_argument("--seed", type=int, default=0, help="Random seed (same seed, same bytes).")
    return parser


def _split_passthrough(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        cut = argv.index("--")
        return argv[:cut], argv[cut + 1 :]
    return argv, []


def resolve_engine_args(ns: argparse.Namespace, passthrough: list[str], for_serving: bool):
    """Settings layers -> validated EngineSettings -> vLLM argv. Raises SettingsError."""
    flags = {
        name: getattr(ns, name)
        for name in config.ServeSettings.model_fields
        if name not in FILE_ONLY_SETTINGS and getattr(ns, name, None) is not None
    }
    settings = config.load_settings(flags, ns.config_file)
    if passthrough:
        settings = settings.model_copy(update={"vllm_args": [*settings.vllm_args, *passthrough]})
    resolved = config.resolve(settings, hardware.detect_gpu(), serving=for_serving)
    return settings, resolved


def _keys_command(ns: argparse.Namespace) -> int:
    from serving import keyscli

    return keyscli.run(ns)


def _usage_command(ns: argparse.Namespace) -> int:
    from serving.usage import report
    from serving.usage.reader import UsageFileError, UsageReader, find_usage_files

    try:
        by = report.parse_group_keys(ns.by)
        since = report.parse_time_bound(ns.since, "--since") if ns.since else None
        until = report.parse_time_bound(ns.until, "--until") if ns.until else None
        reader = UsageReader(find_usage_files(ns.paths))
        result = report.build_report(reader, by, since, until)
    except (report.ReportArgumentError, UsageFileError) as exc:
        print(f"medgemma-serve usage: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file that vanished or failed mid-read
        print(f"medgemma-serve usage: cannot read {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    result["skipped_lines"] = reader.skipped_lines
    if reader.skipped_lines:
        print(f"medgemma-serve usage: skipped {reader.skipped_lines} unreadable line(s)", file=sys.stderr)
    sys.stdout.write(report.render(result, ns.output_format))
    return 0


def _ray_command(ns: argparse.Namespace, passthrough: list[str]) -> int:
    from serving.ray_app import ScalingSettings, run

    app_args = layers.read_yaml(ns.app_config) if ns.app_config else {}
    serve_args = dict(app_args.get("serve") or {})
    if ns.config_file:
        serve_args = {**layers.read_yaml(ns.config_file), **serve_args}
    serve_args.update({name: getattr(ns, name) for name in config.ServeSettings.model_fields
                       if name not in FILE_ONLY_SETTINGS and getattr(ns, name, None) is not None})  # fmt: skip
    if passthrough:
        serve_args["vllm_args"] = [*serve_args.get("vllm_args", []), *passthrough]
    scaling_args = dict(app_args.get("scaling") or {})
    scaling_args.update({name: getattr(ns, name) for name in ScalingSettings.model_fields
                         if getattr(ns, name, None) is not None})  # fmt: skip
    try:
        return run({"serve": serve_args, "scaling": scaling_args}, address=ns.ray_address,
                   temp_dir=ns.ray_temp_dir, num_cpus=ns.num_cpus)  # fmt: skip
    except config.SettingsError as exc:
        print(f"medgemma-serve: {exc}", file=sys.stderr)
        return 2


def api_processes(settings: config.ServeSettings, resolved: engine.EngineSettings) -> int:
    """API processes in front of the engine: the setting, else the profile's for this host's
    cores; each needs a share of at least one engine slot. Raises SettingsError."""
    processes = settings.api_processes or engine.sized_api_processes(
        engine.PROFILES[resolved.profile], hardware.available_cores()
    )
    max_num_seqs = int(engine.passthrough_value(tuple(engine.engine_args(resolved)), "--max-num-seqs"))
    if processes > max_num_seqs:
        raise config.SettingsError(f"--api-processes {processes} exceeds the engine's max_num_seqs "
                                   f"({max_num_seqs}); use at most {max_num_seqs}")  # fmt: skip
    return processes


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, passthrough = _split_passthrough(argv)
    ns = _build_parser().parse_args(ours)
    configure_logging("INFO")
    if ns.command == "devmodel":
        out = devmodel.build(ns.path, seed=ns.seed)
        print(f"wrote the dev checkpoint to {out}")
        return 0
    if ns.command == "keys":
        return _keys_command(ns)
    if ns.command == "ray":
        return _ray_command(ns, passthrough)
    if ns.command == "usage":
        return _usage_command(ns)
    if ns.command == "wait-idle":
        from serving.idle import wait_idle

        return wait_idle(ns.url, ns.timeout_s)
    if ns.command == "profiles":
        print(json.dumps(engine.profile_table(), indent=2))
        return 0
    try:
        settings, resolved = resolve_engine_args(ns, passthrough, for_serving=ns.command == "serve")
        if ns.command == "engine-args":
            vllm_argv = engine.engine_args(resolved)
            if ns.json:
                print(json.dumps(vllm_argv))
            else:
                import shlex

                print(shlex.join(vllm_argv))
            return 0
        processes = api_processes(settings, resolved)
        from serving.assembly import prepare_server

        configure_logging(settings.log_level.upper())
        vllm_argv, context = prepare_server(settings, resolved, api_processes=processes)
    except config.SettingsError as exc:
        print(f"medgemma-serve: {exc}", file=sys.stderr)
        return 2
    if processes > 1:
        from serving.apiprocs import serve_processes

        serve_processes(vllm_argv, settings, resolved, processes)
        return 0
    from serving.launcher import serve

    serve(vllm_argv, context)
    return 0


if __name__ == "__main__":
    sys.exit(main())
