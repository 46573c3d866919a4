"""``medgemma-serve`` with the admission layer left out: the benchmark's control arm.

Everything else is the product's server (settings, /ready, /health, metrics, the loading
responder, drain and engine watch), so comparing it with the admission arm isolates the
layer, and comparing it with vLLM's own server isolates the launcher. Benchmark use only.
"""

import sys

from serving import assembly, cli
from serving.admission.build import Admission


class _NoAdmission:
    """Admission's public surface as the drain, engine watch and probes use it: nothing."""

    draining = False
    running_count = 0

    def __init__(self, health):
        self.health = health

    def drain(self) -> None:
        self.draining = True

    def busy(self) -> int:
        return 0

    def fail_engine(self, why: str = "died") -> int:
        self.health.declare_failed(why)
        return 0

    async def end_running(self, outcome, message) -> None:
        return None


def _no_admission(engine_client, settings, metrics, health) -> Admission:
    return Admission(_NoAdmission(health), middleware=lambda app: app, tasks=[])


if __name__ == "__main__":
    assembly.build_admission = _no_admission
    sys.exit(cli.main())
