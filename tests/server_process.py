"""A real cispo-server in a subprocess on loopback, for end-to-end tests."""

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

READY = re.compile(r"cispo-server listening on port (\d+) metrics (-?\d+|None)(?: http (\d+))?")


class ServerProcess:
    """`python -m cispo.service` with the given flags; `.port`, `.metrics_port`, `.log()`."""

    def __init__(self, *args: str, checkpoint_dir: Path, env: dict | None = None, launcher: list[str] | None = None):
        # Sampler weights go beside the checkpoints unless `args` say otherwise (the last flag wins).
        cmd = [
            *(launcher or [sys.executable]),
            "-m",
            "cispo.service",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--checkpoint-dir",
            str(checkpoint_dir),
            "--sampler-dir",
            f"{checkpoint_dir}-sampler",
            *args,
        ]
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._ready = threading.Event()
        self.port = self.metrics_port = self.http_port = None
        threading.Thread(target=self._pump, daemon=True).start()
        if not self._ready.wait(120) or self.port is None:
            self.kill()
            raise RuntimeError("server did not start:\n" + self.log())

    def _pump(self):
        for line in self.proc.stdout:
            self.lines.append(line)
            m = READY.search(line)
            if m:
                self.port, self.metrics_port = int(m.group(1)), int(m.group(2))
                self.http_port = int(m.group(3)) if m.group(3) else None
                self._ready.set()
        self._ready.set()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return "".join(self.lines)

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM, then wait for the drain to finish; returns the exit code."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def wait_for_log(self, text: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{text!r} not in server log:\n{self.log()}")
            time.sleep(0.05)


def run_cli_in_process(*argv: str, env: dict | None = None) -> tuple[int, str]:
    """`cispo-server ARGV` in this process, for invocations that must stop before serving (a
    startup error, --help, --version): (exit code, stderr and stdout). `env` replaces the CISPO_*
    environment for the call. The gRPC and metrics ports default to 0 (a free one), so a call that
    gets further than expected never meets a port another process holds. Much faster than a
    subprocess, which imports torch first."""
    import contextlib
    import io
    import logging
    from unittest import mock

    from cispo.service import cli

    out = io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CISPO_")}
    try:
        with (
            mock.patch.dict(os.environ, {**clean, **(env or {})}, clear=True),
            contextlib.redirect_stderr(out),
            contextlib.redirect_stdout(out),
        ):
            try:
                cli.main(["--port", "0", "--metrics-port", "0", *argv])
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            else:
                raise AssertionError(f"cispo-server {' '.join(argv)} did not exit")
    finally:
        for handler in root.handlers[:]:
            root.removeHandler(handler)
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)
    return code, out.getvalue()
