"""An in-process OpenTelemetry collector for tests: OTLP over gRPC, built from the
``opentelemetry-proto`` package's own service definition (no protocol code of ours).

``OtlpReceiver().start()`` listens on a free local port (``endpoint``: what
``--otlp-traces-endpoint`` takes) and keeps every span exported to it as a plain dict:
trace id, span id, parent span id (hex), name, attributes, start and end (ns).
"""

from __future__ import annotations

import threading
import time
from concurrent import futures


def _value(any_value):
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


class OtlpReceiver:
    def __init__(self):
        self.spans: list[dict] = []
        self.requests = 0
        self._lock = threading.Lock()
        self._server = None
        self.endpoint = ""

    def start(self) -> OtlpReceiver:
        import grpc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

        receiver = self

        class TraceService(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):  # noqa: N802 - the proto's name
                spans = []
                for resource_spans in request.resource_spans:
                    resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
                    for scope_spans in resource_spans.scope_spans:
                        for span in scope_spans.spans:
                            spans.append({
                                "trace_id": span.trace_id.hex(), "span_id": span.span_id.hex(),
                                "parent_span_id": span.parent_span_id.hex() or None, "name": span.name,
                                "attributes": {a.key: _value(a.value) for a in span.attributes},
                                "start_ns": span.start_time_unix_nano, "end_ns": span.end_time_unix_nano,
                                "scope": scope_spans.scope.name, "resource": resource,
                            })  # fmt: skip
                with receiver._lock:
                    receiver.spans.extend(spans)
                    receiver.requests += 1
                return trace_service_pb2.ExportTraceServiceResponse()

        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(TraceService(), self._server)
        port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()
        self.endpoint = f"127.0.0.1:{port}"
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=1).wait()

    def received(self) -> list[dict]:
        with self._lock:
            return list(self.spans)

    def wait_for(self, condition, timeout_s: float = 30.0) -> list[dict]:
        """Until ``condition(spans)`` holds; the spans received by then."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            spans = self.received()
            if condition(spans):
                return spans
            time.sleep(0.1)
        return self.received()
