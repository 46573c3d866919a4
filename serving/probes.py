"""The readiness and liveness probes (``/ready``, ``/health``) for Kubernetes and Ray.

Guarantees:
- ``/ready`` is 200 only while the engine can serve and no drain has begun: 503
  ``draining`` from the first moment of a drain, 503 ``engine_failed`` from the first moment
  the engine died or hung (``EngineHealth.failed``, which also reads vLLM's own flag, so a
  death is seen before ``EngineWatch`` looks).
- ``/health`` (liveness) is 200 while the process and its engine work, also while draining;
  503 ``engine_failed`` once the engine died or hung (the process exits right after).
- Both replace vLLM's ``/health``, which knows a dead engine but not a hung one.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse

from serving.vllm_app import replace_route

FAILED = {"status": "engine_failed"}


def attach_probes(app, health, admission, served_model_name: str) -> None:
    """Serve ``/ready`` and ``/health`` on ``app`` from ``health`` (``EngineHealth``) and
    ``admission`` (its ``draining``)."""

    async def ready(raw_request: Request) -> JSONResponse:
        """Readiness: 200 only while the engine can serve requests and no drain has begun."""
        if admission.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if health.failed:
            return JSONResponse(FAILED, status_code=503)
        return JSONResponse({"status": "ready", "model": served_model_name})

    async def live(raw_request: Request) -> JSONResponse:
        """Liveness: 200 while the process and its engine work (also while draining);
        503 once the engine died or hung (the process exits right after)."""
        if health.failed:
            return JSONResponse(FAILED, status_code=503)
        return JSONResponse({"status": "ok"})

    replace_route(app, "/health", live)
    replace_route(app, "/ready", ready)
