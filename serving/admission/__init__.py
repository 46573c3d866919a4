"""Request admission: per-account concurrency budgets, engine capacity and a fair queue.

Public surface: ``AdmissionController`` (decides, and ends what it admitted), each admitted
request's ``AdmittedRequest`` (owns its units until its one ``end``), ``AdmissionMiddleware``
(the thin ASGI adapter in front of vLLM's app), ``build_admission`` (all of it from settings
and a running engine), ``KeyStore``, the ledgers. docs/architecture.md walks a request.
"""
