"""The autoscaling replay against Ray Serve's own decisions on the same load step.

The Ray tier's load step (tests/ray/test_ray_app.py::test_scales_out_under_load_and_back_with_no_failed_request)
scales the engine deployment 1 -> 2 -> 1 on a real Ray cluster. With
``MEDGEMMA_SCALING_TIMELINE_OUT`` set it writes its measured timeline, its scaling settings
and the demand the replicas reported (each replica's ``medgemma_demand_units``, sampled
from its /metrics about every 0.5-2 s, summed). This replays that demand through ``loadtests.replay`` with the same settings
and the measured replica start (second replica ready minus the scale-up decision), and
prints each event's time since the load began, measured and replayed, and their difference
as a share of the measured time.

    MEDGEMMA_SCALING_TIMELINE_OUT=/tmp/ray-step.json .venv/bin/python -m pytest -q \\
        "tests/ray/test_ray_app.py::test_scales_out_under_load_and_back_with_no_failed_request"
    .venv/bin/python benchmarks/replay_vs_ray.py /tmp/ray-step.json [more.json ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loadtests.replay import ReplayConfig, recorded_trace, replay  # noqa: E402

EVENTS = ("scale-up decision", "second replica ready", "scale-down decision", "back to one replica")


def compare(path: Path) -> list[tuple[str, float, float]]:
    run = json.loads(path.read_text())
    measured = run["timeline"]
    config = ReplayConfig(capacity_units=run["capacity_units"], target_utilisation=run["target_utilisation"],
                          min_replicas=run["min_replicas"], max_replicas=run["max_replicas"],
                          upscale_delay_s=run["upscale_delay_s"], downscale_delay_s=run["downscale_delay_s"],
                          look_back_period_s=run["look_back_period_s"], metrics_interval_s=run["metrics_interval_s"],
                          start_s=measured["second replica ready"] - measured["scale-up decision"], step_s=0.1)  # fmt: skip
    duration = max(t for t, _ in run["demand_units"]) + 1
    result = replay(recorded_trace(run["demand_units"]), duration, config)
    ups = [t for t, before, after in result.decisions if after > before]
    downs = [t for t, before, after in result.decisions if after < before]
    readies = [t for t, serving in result.ready[1:] if serving == 2]
    ones = [t for t, serving in result.ready[1:] if serving == 1]
    replayed = {"scale-up decision": ups[0] if ups else None, "second replica ready": readies[0] if readies else None,
                "scale-down decision": downs[0] if downs else None, "back to one replica": ones[0] if ones else None}  # fmt: skip
    return [(event, measured[event], replayed[event]) for event in EVENTS]


def main() -> None:
    for name in sys.argv[1:]:
        print(f"{name}:")
        print("| event | measured s | replayed s | difference |")
        print("| --- | --- | --- | --- |")
        for event, measured, replayed in compare(Path(name)):
            diff = "-" if replayed is None else f"{(replayed - measured) / measured:+.0%}"
            print(f"| {event} | {measured:.1f} | {'-' if replayed is None else f'{replayed:.1f}'} | {diff} |")


if __name__ == "__main__":
    main()
