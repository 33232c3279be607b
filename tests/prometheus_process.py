"""A real Prometheus in a subprocess on loopback, scraping given targets every second and
evaluating given rule files every second, for end-to-end tests of metrics, rules and dashboards."""

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest
import requests
import yaml


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrometheusError(RuntimeError):
    """The HTTP API answered with status "error"."""


class PrometheusProcess:
    """`prometheus` with a temporary config and storage under `workdir`; `.url`, `.query()`, `.stop()`.

    targets: host:port of the /metrics endpoints, all in one job named `job`.
    """

    def __init__(
        self,
        targets: list[str],
        workdir: Path,
        rule_files: list[Path] = (),
        job: str = "cispo",
        interval: str = "1s",
        start_timeout: float = 60,
    ):
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail("prometheus not found: `make test-tools` installs it (Debian package prometheus)")
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_file = workdir / "prometheus.yml"
        self.config_file.write_text(
            yaml.safe_dump(
                {
                    "global": {
                        "scrape_interval": interval,
                        "scrape_timeout": interval,
                        "evaluation_interval": interval,
                    },
                    "rule_files": [str(Path(f).resolve()) for f in rule_files],
                    "scrape_configs": [{"job_name": job, "static_configs": [{"targets": list(targets)}]}],
                }
            )
        )
        self.log_file = workdir / "prometheus.log"
        self.proc: subprocess.Popen | None = None
        for _ in range(3):  # the free port can be taken between choosing it and binding it
            self.port = free_port()
            self.url = f"http://127.0.0.1:{self.port}"
            with self.log_file.open("w") as log:
                self.proc = subprocess.Popen(
                    [
                        binary,
                        f"--config.file={self.config_file}",
                        f"--storage.tsdb.path={workdir / 'data'}",
                        f"--web.listen-address=127.0.0.1:{self.port}",
                        "--log.level=warn",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            if self._wait_ready(start_timeout):
                return
            if "address already in use" not in self.log():
                break
        self.stop()
        raise RuntimeError(f"prometheus did not become ready:\n{self.log()}")

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                if requests.get(f"{self.url}/-/ready", timeout=2).status_code == 200:
                    return True
            except requests.ConnectionError:
                pass
            time.sleep(0.05)
        return False

    def log(self) -> str:
        return self.log_file.read_text() if self.log_file.exists() else ""

    # -- HTTP API -------------------------------------------------------------------------------

    def api(self, path: str, **params) -> dict | list:
        """The `data` of a GET /api/v1/<path>; PrometheusError unless its status is "success"."""
        response = requests.get(f"{self.url}/api/v1/{path}", params=params, timeout=30)
        try:
            body = response.json()
        except ValueError:
            raise PrometheusError(f"/api/v1/{path} {params}: HTTP {response.status_code}: {response.text}") from None
        if body.get("status") != "success":
            raise PrometheusError(f"/api/v1/{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, promql: str) -> list[dict]:
        """Instant query now: the result vector, each element {"metric": labels, "value": [t, "v"]}."""
        data = self.api("query", query=promql)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        assert data["resultType"] == "vector", f"{promql}: result type {data['resultType']}"
        return data["result"]

    def values(self, promql: str, *label_names: str) -> dict:
        """{label value tuple (or the single value, or () with no names): float} of an instant query."""
        out = {}
        for series in self.query(promql):
            key = tuple(series["metric"].get(name, "") for name in label_names)
            out[key[0] if len(key) == 1 else key] = float(series["value"][1])
        return out

    def scalar(self, promql: str) -> float:
        """The one value of an instant query that returns exactly one series."""
        result = self.query(promql)
        assert len(result) == 1, f"{promql}: expected one series, got {result}"
        return float(result[0]["value"][1])

    def wait_until(self, condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
        """Poll `condition` (queries) until it holds; TimeoutError naming `what` otherwise."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f"prometheus: timed out waiting for {what}\n{self.log()}")
            time.sleep(0.1)

    def wait_for_rule_evaluation(self, after: float, timeout: float = 30) -> None:
        """Poll until every rule group has been evaluated since the Unix time `after`."""

        def evaluated():
            groups = self.api("rules")["groups"]
            return bool(groups) and all(_unix_time(g["lastEvaluation"]) > after for g in groups)

        self.wait_until(evaluated, f"every rule group evaluated after {after}", timeout)

    # -- lifecycle ------------------------------------------------------------------------------

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM and wait for a clean exit; SIGKILL if it does not come."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def _unix_time(rfc3339: str) -> float:
    """Unix time of a Prometheus RFC 3339 timestamp (nanosecond fraction, Z or an offset)."""
    head, _, rest = rfc3339.partition(".")
    fraction, zone = "0", rest
    if rest:
        digits = len(rest) - len(rest.lstrip("0123456789"))
        fraction, zone = rest[:digits], rest[digits:]
    else:
        zone = head[19:]
        head = head[:19]
    zone = "+00:00" if zone in ("Z", "z") else zone
    return datetime.fromisoformat(head + zone).timestamp() + float("0." + fraction)
