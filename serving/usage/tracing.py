"""Request traces: admission's spans and vLLM's own request span, in one trace.

With ``--otlp-traces-endpoint`` vLLM 0.32 exports a span per engine request (``llm_request``,
through the tracer provider it installs in this process) whose parent comes from the
``traceparent`` header vLLM's handler reads. ``RequestTracer`` gives each request to a model
endpoint a ``medgemma.request`` span (a child of the client's ``traceparent`` when it sent
one) with children for each step of admission, and hands vLLM the context of the
``admission.engine`` span, so vLLM's span lands under it:

    medgemma.request            arrival -> record written
      admission.authenticate    arrival -> key accepted
      admission.budget          decision began -> the plan's budget granted the units
      admission.queue           budget granted -> engine slot (the fair queue)
      admission.engine          admitted -> released (the engine slot held)
        llm_request             vLLM's span: its queue, prefill, decode, token counts
      admission.release         release -> the usage record handed to its writer

Guarantees:
- Attributes are ids, names, counts and times only (request id, account, key id, plan,
  class, outcome, status, error code, units, unit-seconds, tokens): never content.
- Off unless an endpoint is configured: then nothing here runs. The steps' spans are made
  at the end from the request's recorded instants (explicit start and end times), so the
  only spans opened while the request runs are the request's and the engine slot's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from serving.admission.request import AdmittedRequest
    from serving.usage.record import RequestUsage

TRACE_HEADERS = (b"traceparent", b"tracestate")
INSTRUMENTATION = "serving.admission"
ATTRIBUTES = ("request_id", "account", "key_id", "plan", "priority", "model", "endpoint", "stream", "outcome",
              "status", "error_code", "units", "unit_seconds", "prompt_tokens", "completion_tokens",
              "client_left", "images")  # fmt: skip


class _Spans:
    __slots__ = ("request", "engine")

    def __init__(self, request):
        self.request, self.engine = request, None


class RequestTracer:
    """Spans of requests on ``tracer`` (an OpenTelemetry ``Tracer``)."""

    def __init__(self, tracer):
        from opentelemetry.trace import SpanKind, Status, StatusCode, set_span_in_context
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.tracer = tracer
        self._propagator = TraceContextTextMapPropagator()
        self._in_context = set_span_in_context
        self._server, self._error = SpanKind.SERVER, Status(StatusCode.ERROR)

    def _ns(self, usage: RequestUsage, monotonic: float) -> int:
        """A monotonic instant of this request as wall-clock nanoseconds (what spans carry)."""
        return int((usage.arrived_wall + (monotonic - usage.arrived)) * 1e9)

    def start(self, usage: RequestUsage, scope) -> None:
        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", ()) if k in TRACE_HEADERS}
        parent = self._propagator.extract(carrier) if carrier else None
        span = self.tracer.start_span("medgemma.request", context=parent, kind=self._server,
                                      start_time=self._ns(usage, usage.arrived),
                                      attributes={"medgemma.request_id": usage.request_id})  # fmt: skip
        usage.spans = _Spans(span)

    def admitted(self, usage: RequestUsage, request: AdmittedRequest, scope) -> None:
        """Open the engine slot's span and make it the parent vLLM's handler reads."""
        spans = usage.spans
        spans.engine = self.tracer.start_span("admission.engine", context=self._in_context(spans.request),
                                              start_time=self._ns(usage, request.admitted_at))  # fmt: skip
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier, context=self._in_context(spans.engine))
        headers = [(k, v) for k, v in scope["headers"] if k not in TRACE_HEADERS]
        scope["headers"] = headers + [(k.encode(), v.encode()) for k, v in carrier.items()]

    def finish(self, usage: RequestUsage, record: dict, now: float) -> None:
        spans = usage.spans
        if spans is None:
            return
        root, request = spans.request, usage.request
        attributes = {f"medgemma.{name}": record[name] for name in ATTRIBUTES if record.get(name) is not None}
        root.set_attributes(attributes)
        if record["status"] is not None and record["status"] >= 500:
            root.set_status(self._error)
        context = self._in_context(root)
        steps = [("admission.authenticate", usage.arrived, usage.authenticated_at)]
        if request is not None:
            steps += [("admission.budget", usage.deciding_at, request.budget_at),
                      ("admission.queue", request.budget_at, request.admitted_at),
                      ("admission.release", request.released_at, now)]  # fmt: skip
        elif usage.deciding_at is not None:  # refused or left while deciding
            steps.append(("admission.budget", usage.deciding_at, now))
        for name, began, ended in steps:
            if began is not None and ended is not None:
                span = self.tracer.start_span(name, context=context, start_time=self._ns(usage, began))
                span.end(end_time=self._ns(usage, max(began, ended)))
        if spans.engine is not None:
            released = request.released_at if request.released_at is not None else now
            spans.engine.end(end_time=self._ns(usage, released))
        root.end(end_time=self._ns(usage, now))


def request_tracer(endpoint: str | None) -> RequestTracer | None:
    """The tracer for ``endpoint`` on the provider vLLM installed for it (``--otlp-traces-endpoint``
    runs vLLM's ``init_tracer`` in this process before the app is built); None when unset."""
    if not endpoint:
        return None
    from opentelemetry import trace

    return RequestTracer(trace.get_tracer(INSTRUMENTATION))
