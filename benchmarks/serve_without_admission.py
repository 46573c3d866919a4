"""``medgemma-serve`` with the admission layer left out: the benchmark's control arm.

Everything else is the product's launcher (settings, /ready, /health, metrics, the loading
responder, drain and engine watch), so comparing it with the admission arm isolates the
layer, and comparing it with vLLM's own server isolates the launcher. Benchmark use only.
"""

import sys

from serving import cli, launcher


class _NoController:
    """What the launcher's drain, engine watch and probes read from admission: nothing."""

    draining = False
    engine_failed = False

    def busy(self) -> int:
        return 0

    def fail_engine(self) -> int:
        self.engine_failed = True
        return 0


class _NoMiddleware:
    serving_count = 0

    async def end_all(self, message, outcome=None) -> None:
        return None


def _no_admission(app, engine_client, settings, metrics):
    app.state.admission = _NoController()
    app.state.admission_middleware = _NoMiddleware()
    return app.state.admission


if __name__ == "__main__":
    launcher.install = _no_admission
    sys.exit(cli.main())
