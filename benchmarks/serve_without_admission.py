"""``medgemma-serve`` with the admission layer left out: the benchmark's control arm.

Everything else is the product's launcher (settings, /ready, metrics, the loading
responder), so comparing it with the admission arm isolates the layer, and comparing it
with vLLM's own server isolates the launcher. Benchmark use only.
"""

import sys

from serving import cli, launcher


def _no_admission(app, engine_client, settings, metrics):
    return None


if __name__ == "__main__":
    launcher.install = _no_admission
    sys.exit(cli.main())
