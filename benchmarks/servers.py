"""Helpers for the scripts, benchmarks and tests that start vLLM servers themselves."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_ready(base_url: str, proc: subprocess.Popen, timeout: float = 900, log_hint: str = "") -> None:
    """Poll `{base_url}/models` until a started server answers; fail at once if it exits."""
    hint = f"; see {log_hint}" if log_hint else ""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server for {base_url} exited with code {proc.returncode}{hint}")
        try:
            urllib.request.urlopen(f"{base_url}/models", timeout=2)
            return
        except OSError:
            time.sleep(2)
    raise RuntimeError(f"server for {base_url} not ready after {timeout:.0f} s{hint}")
