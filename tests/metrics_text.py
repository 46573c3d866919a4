"""Reading a server's /metrics with prometheus_client's own parser (no hand-written regexes)."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Every sample of Prometheus exposition text: (name, labels, value)."""
    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples]


def total(text: str, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels`` (0 when none)."""
    return sum(value for n, got, value in samples(text) if n == name and labels.items() <= got.items())


def scrape(url: str, timeout: float = 10) -> str:
    return httpx.get(url.rstrip("/") + "/metrics", timeout=timeout).text


def metric(url: str, name: str, **labels: str) -> float:
    """``total`` of one scrape of the server at ``url``."""
    return total(scrape(url), name, **labels)


class Sampler:
    """Scrapes a server's /metrics continuously in a thread and keeps every reading of the
    named samples (summed over labels, or over those that include ``labels``), so a test can
    assert on the highest one seen. Names are sample names (``x_total``, ``x_count``), not
    family names. A reading's ``_t`` is when it was read; the server produced it between
    ``_asked`` and ``_t``."""

    def __init__(self, url: str, *names: str, interval_s: float = 0.05, labels: dict[str, str] | None = None):
        import threading

        self.url, self.names, self.interval_s, self.labels = url, tuple(names), interval_s, labels or {}
        self.readings: list[dict[str, float]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import time

        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set():
                try:
                    asked = time.monotonic()
                    text = client.get(self.url.rstrip("/") + "/metrics").text
                    # only the named samples' lines are parsed: a vLLM server's whole text
                    # takes the parser a good part of a second on a busy host
                    found = samples("\n".join(line for line in text.splitlines() if line.startswith(self.names)))
                    reading = {name: 0.0 for name in self.names}
                    for name, labels, value in found:
                        if name in reading and self.labels.items() <= labels.items():
                            reading[name] += value
                except Exception as exc:  # noqa: BLE001 - kept, and raised by highest()
                    self.errors.append(repr(exc))
                    self._stop.wait(self.interval_s)
                    continue
                self.readings.append({"_asked": asked, "_t": time.monotonic(), **reading})
                self._stop.wait(self.interval_s)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(15)

    def latest(self, name: str) -> float | None:
        return self.readings[-1][name] if self.readings else None

    def highest(self, name: str, since: float = float("-inf"), until: float = float("inf")) -> float:
        """The highest reading of ``name`` taken between ``since`` and ``until`` (monotonic);
        an error if there is none (a sampler that read nothing proves nothing)."""
        values = [r[name] for r in self.readings if since <= r["_t"] <= until]
        assert values, f"no /metrics reading of {self.url} in that window; errors: {self.errors[-3:]}"
        return max(values)
