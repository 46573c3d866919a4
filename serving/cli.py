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
import os
import sys

from serving import config, devmodel, engine, hardware
from serving.logs import configure_logging

logger = logging.getLogger("serving")

DEV_MODEL_BANNER = (
    "\n" + "!" * 78 + "\n"
    "!! DEV CHECKPOINT: tiny RANDOM weights (%s).\n"
    "!! Outputs are RANDOM TEXT, not medical answers. Pass --model for the real model.\n"
    + "!" * 78
)


FILE_ONLY_SETTINGS = {"vllm_args", "model_costs"}  # lists and maps: YAML or env (JSON) only


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    config.add_setting_flags(
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
    keys = sub.add_parser("keys", help="Manage API keys in a keys file.")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    add = keys_sub.add_parser("add", help="Create a key for an account; prints it once.")
    add.add_argument("--file", required=True, help="The keys file (created if missing).")
    add.add_argument("--account", required=True, help="Account the key belongs to.")
    add.add_argument("--plan", required=True, help="The account's plan (must exist in the file).")
    add.add_argument("--label", default=None, help="Free-text label stored beside the hash.")
    dev = sub.add_parser("devmodel", help="Write the dev checkpoint (tiny random MedGemma).")
    dev.add_argument("path", help="Folder to write the checkpoint into.")
    dev.add_argument("--seed", type=int, default=0, help="Random seed (same seed, same bytes).")
    return parser


def _split_passthrough(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        cut = argv.index("--")
        return argv[:cut], argv[cut + 1 :]
    return argv, []


def resolve_engine_args(ns: argparse.Namespace, passthrough: list[str], serving: bool):
    """Settings layers -> validated EngineSettings -> vLLM argv. Raises SettingsError."""
    flags = {
        name: getattr(ns, name)
        for name in config.ServeSettings.model_fields
        if name not in FILE_ONLY_SETTINGS and getattr(ns, name, None) is not None
    }
    settings = config.load_settings(flags, ns.config_file)
    if passthrough:
        settings = settings.model_copy(update={"vllm_args": [*settings.vllm_args, *passthrough]})
    resolved = config.resolve(settings, hardware.detect_gpu(), serving=serving)
    return settings, resolved


def _load_keys(settings: config.ServeSettings):
    from serving.admission.keys import KeysFileError, KeyStore

    if settings.keys_file is None:
        logger.warning(
            "no keys file: OPEN MODE, every request shares one anonymous account of %d "
            "units; pass --keys-file for per-account budgets",
            settings.open_budget,
        )
        return KeyStore.open(settings.open_budget)
    try:
        return KeyStore.load(settings.keys_file)
    except KeysFileError as exc:
        raise config.SettingsError(str(exc)) from None


def _keys_command(ns: argparse.Namespace) -> int:
    from serving.admission.keys import KeysFileError, add_key

    try:
        key = add_key(ns.file, ns.account, ns.plan, ns.label)
    except KeysFileError as exc:
        print(f"medgemma-serve: {exc}", file=sys.stderr)
        return 2
    print(key)
    print(f"(stored only as a SHA-256 hash in {ns.file}; this is the only time it is shown)", file=sys.stderr)
    return 0


def _prepare_model(settings: config.ServeSettings, resolved: engine.EngineSettings) -> None:
    """Before serving: build the dev checkpoint if needed, or check the model can be loaded."""
    if config.uses_dev_model(settings, resolved):
        devmodel.ensure(settings.dev_model_dir)
    else:
        config.check_model_access(resolved.model)


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
    if ns.command == "profiles":
        print(json.dumps(engine.profile_table(), indent=2))
        return 0
    try:
        serving = ns.command == "serve"
        settings, resolved = resolve_engine_args(ns, passthrough, serving)
        if serving:
            keys = _load_keys(settings)
            _prepare_model(settings, resolved)
    except config.SettingsError as exc:
        print(f"medgemma-serve: {exc}", file=sys.stderr)
        return 2
    vllm_argv = engine.engine_args(resolved)
    if ns.command == "engine-args":
        if ns.json:
            print(json.dumps(vllm_argv))
        else:
            import shlex

            print(shlex.join(vllm_argv))
        return 0

    from serving.admission.guard import GuardSettings
    from serving.admission.install import AdmissionSettings
    from serving.launcher import ServerContext, serve
    from serving.metrics import ServingMetrics

    configure_logging(settings.log_level.upper())
    os.environ.setdefault("VLLM_LOGGING_LEVEL", settings.log_level.upper())
    os.environ.update(engine.media_env(settings.remote_image_timeout_s, settings.remote_image_max_mib))
    if config.uses_dev_model(settings, resolved):
        logger.warning(DEV_MODEL_BANNER, resolved.model)
    logger.info("profile %s, model %s, settings %s", resolved.profile, resolved.model, config.describe(settings))
    context = ServerContext(
        profile=resolved.profile,
        model=resolved.model,
        served_model_name=resolved.served_model_name,
        metrics=ServingMetrics(),
        admission=AdmissionSettings(
            keys=keys,
            keys_file=settings.keys_file,
            queue_size=settings.queue_size,
            queue_timeout_s=settings.queue_timeout_s,
            engine_headroom=settings.engine_headroom,
            model_costs=settings.model_costs,
            redis_url=settings.redis_url,
            lease_ttl_s=settings.lease_ttl_s,
            redis_timeout_s=settings.redis_timeout_s,
            ledger_fallback=settings.ledger_fallback,
            stall_timeout_s=settings.stream_stall_timeout_s,
            guard=GuardSettings(
                max_body_bytes=int(settings.max_body_mib * 2**20),
                body_timeout_s=settings.body_timeout_s,
                max_image_pixels=settings.max_image_pixels,
                remote_image_hosts=frozenset(h.lower() for h in settings.remote_image_hosts),
                remote_image_private_networks=settings.remote_image_private_networks,
            ),
        ),
        drain_timeout_s=settings.drain_timeout_s,
        engine_hang_timeout_s=settings.engine_hang_timeout_s,
    )
    serve(vllm_argv, context)
    return 0


if __name__ == "__main__":
    sys.exit(main())
