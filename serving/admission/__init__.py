"""Request admission: per-account concurrency budgets, engine capacity and a fair queue.

Public surface: ``AdmissionController`` (decides), ``AdmissionMiddleware`` (ASGI, attaches
to vLLM's app in-process), ``KeyStore`` (accounts and hashed keys), the ledgers.
"""
