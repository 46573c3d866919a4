"""A real Prometheus server (Debian's prometheus package) scraping given targets and
evaluating our rule groups, queried through its HTTP API."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import httpx
import yaml

from tests.redis_server import free_port


class PrometheusServer:
    def __init__(self, workdir: Path, targets: dict[str, str], rule_groups: list[dict], interval_s: int = 2):
        binary = shutil.which("prometheus")
        if binary is None:
            raise RuntimeError("prometheus is not installed; `make test` installs it")
        self.binary, self.workdir, self.port = binary, workdir, free_port()
        self.targets, self.interval_s = targets, interval_s
        # Our groups evaluate every 15-30 s in production; a test has minutes, not hours.
        self.rule_groups = [{**g, "interval": f"{interval_s}s"} for g in rule_groups]
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> PrometheusServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "rules.yaml").write_text(yaml.safe_dump({"groups": self.rule_groups}, sort_keys=False))
        config = {
            "global": {"scrape_interval": f"{self.interval_s}s", "evaluation_interval": f"{self.interval_s}s"},
            "rule_files": [str(self.workdir / "rules.yaml")],
            "scrape_configs": [{
                "job_name": "medgemma",
                "static_configs": [{"targets": [address], "labels": {"replica": name}}
                                   for name, address in self.targets.items()],
            }],
        }  # fmt: skip
        (self.workdir / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        self.process = subprocess.Popen(
            [self.binary, f"--config.file={self.workdir / 'prometheus.yml'}",
             f"--storage.tsdb.path={self.workdir / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=(self.workdir / "prometheus.log").open("a"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/-/ready", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError("prometheus did not become ready:\n" + (self.workdir / "prometheus.log").read_text()[-3000:])

    def query(self, expr: str) -> list[dict]:
        body = httpx.get(self.url + "/api/v1/query", params={"query": expr}, timeout=10).json()
        assert body["status"] == "success", body
        return body["data"]["result"]

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)
        self.process = None
