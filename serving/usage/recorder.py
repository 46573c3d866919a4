"""Where a request's end becomes its usage record and its per-account figures.

Guarantees:
- ``UsageRecorder.finish`` runs once per request that reached a model endpoint (the
  middleware calls it in a ``finally``), whatever the end: success, error, refusal,
  disconnect, drain, engine failure. It emits exactly one record when a usage log is set,
  and updates the per-account metrics when they are on.
- Per-account labels have bounded cardinality (``AccountLabels``): only with
  ``--account-metrics``, the first ``account_metrics_max`` accounts seen get their own
  label, every later one is counted as ``other``; a refused key counts as ``none``.
  Account names come from the keys file (an operator's names), never from a client.
- Nothing here blocks or raises into the request: the log's ``emit`` only queues.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import TYPE_CHECKING

from serving.usage.record import RequestUsage, request_record

if TYPE_CHECKING:
    from serving.admission.request import AdmittedRequest
    from serving.metrics import ServingMetrics
    from serving.usage.engine_tokens import EngineTokens
    from serving.usage.tracing import RequestTracer
    from serving.usage.writer import UsageLog

logger = logging.getLogger(__name__)

OTHER_ACCOUNTS = "other"
NO_ACCOUNT = "none"


def replica_name() -> str:
    """This server in a record: host name and process id."""
    return f"{socket.gethostname()}:{os.getpid()}"[:128]


class AccountLabels:
    """Account -> its metric label: itself for the first ``cap`` accounts seen, else ``other``."""

    def __init__(self, cap: int):
        self.cap = cap
        self._labels: dict[str, str] = {}

    def of(self, account: str | None) -> str:
        if account is None:
            return NO_ACCOUNT
        label = self._labels.get(account)
        if label is None:
            label = account if len(self._labels) < self.cap else OTHER_ACCOUNTS
            self._labels[account] = label
        return label


class UsageRecorder:
    def __init__(self, metrics: ServingMetrics, log: UsageLog | None = None, *,
                 served_models: frozenset[str] = frozenset(), account_metrics_max: int | None = None,
                 replica: str | None = None, tracer: RequestTracer | None = None,
                 engine_tokens: EngineTokens | None = None):  # fmt: skip
        self.metrics = metrics
        self.engine_tokens = engine_tokens
        self.log = log
        self.tracer = tracer
        self.served_models = served_models
        self.accounts = AccountLabels(account_metrics_max) if account_metrics_max else None
        self._metric = {"requests": metrics.account_requests, "inflight": metrics.account_inflight_units,
                        "unit_seconds": metrics.account_unit_seconds, "tokens": metrics.account_tokens}  # fmt: skip
        self._children: dict[tuple[str, ...], object] = {}
        self.replica = replica or replica_name()

    def start(self, request_id: str, endpoint: str, arrived: float, scope=None) -> RequestUsage:
        usage = RequestUsage(request_id, endpoint, arrived)
        if self.tracer is not None:
            self.tracer.start(usage, scope or {})
        return usage

    def admitted(self, usage: RequestUsage, request: AdmittedRequest, scope=None) -> None:
        """Admitted: its units count as held; its trace context goes to vLLM (in ``scope``)."""
        usage.request = request
        if self.tracer is not None and scope is not None:
            self.tracer.admitted(usage, request, scope)
        if self.accounts is not None:
            self._child("inflight", self.accounts.of(request.account.name)).inc(request.units)

    def finish(self, usage: RequestUsage) -> None:
        """The request has ended: its record, its per-account figures."""
        if self.log is None and self.accounts is None and self.tracer is None:
            return
        now = time.monotonic()
        if usage.request is not None and usage.tally.prompt is None and self.engine_tokens is not None:
            self.engine_tokens.settle(usage.tally)  # its engine requests never left (engine failed)
        record = request_record(usage, self.replica, now)
        if self.log is not None:
            self.log.emit(record)
        if self.accounts is not None:
            self._count(usage, record)
        if self.tracer is not None:
            self.tracer.finish(usage, record, now)

    def _count(self, usage: RequestUsage, record: dict) -> None:
        label = self.accounts.of(record["account"])
        self._child("requests", label, record["outcome"]).inc()
        if usage.request is None:
            return
        self._child("inflight", label).dec(record["units"])
        self._child("unit_seconds", label).inc(record["unit_seconds"])
        if record["prompt_tokens"]:
            self._child("tokens", label, "prompt").inc(record["prompt_tokens"])
        if record["completion_tokens"]:
            self._child("tokens", label, "completion").inc(record["completion_tokens"])

    def _child(self, name: str, *labels: str):
        """A per-account metric's child for ``labels``, looked up once (``labels()`` costs
        microseconds; this runs on the event loop for every request)."""
        key = (name, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._metric[name].labels(*labels)
        return child
