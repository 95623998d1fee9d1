"""Starts a real Arize Phoenix (``phoenix serve``) on free loopback ports for the e2e tests."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.conftest import IN_CI, free_port

START_TIMEOUT_S = 90.0


def phoenix_installed() -> bool:
    return importlib.util.find_spec("phoenix") is not None


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@contextmanager
def running_phoenix(working_dir: Path) -> Iterator[str]:
    """Yields Phoenix's base URL (REST and OTLP/HTTP); stops it afterwards."""
    port, grpc_port = free_port(), free_port()
    env = {
        **os.environ,
        "PHOENIX_HOST": "127.0.0.1",
        "PHOENIX_PORT": str(port),
        "PHOENIX_GRPC_PORT": str(grpc_port),
        "PHOENIX_WORKING_DIR": str(working_dir),
        "PHOENIX_TELEMETRY_ENABLED": "false",
    }
    log = (working_dir / "phoenix.log").open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from phoenix.server.main import main; sys.exit(main())",
            "serve",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=working_dir,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _healthy(url):
            if process.poll() is not None or time.monotonic() > deadline:
                log.flush()
                tail = (working_dir / "phoenix.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"phoenix serve did not come up on {url}:\n{tail}")
            time.sleep(0.25)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


__all__ = ["IN_CI", "phoenix_installed", "running_phoenix"]
