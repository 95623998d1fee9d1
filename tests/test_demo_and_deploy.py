"""The newcomer's first command, and what the Dockerfile runs."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent


def test_demo_runs_from_an_empty_folder(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "demo"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert re.search(r"GET /tools/crm/contacts -> 200", out)
    assert "(Idempotent-Replayed)" in out
    assert "the tool ran create_contact 1 time(s)" in out
    assert "reason:" in out and "-> 403" in out
    assert "demo finished" in out
    run_id = re.search(r"--run (demo-[0-9a-f]+)", out).group(1)  # type: ignore[union-attr]
    listed = subprocess.run(
        [
            sys.executable,
            "-m",
            "proxy.cli",
            "calls",
            "-c",
            ".handrail/demo/handrail.yaml",
            "--run",
            run_id,
            "--json",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listed.returncode == 0, listed.stderr
    assert run_id in listed.stdout and "deny" in listed.stdout


def _dockerfile_command() -> list[str]:
    text = (ROOT / "Dockerfile").read_text()
    entry = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M).group(1))  # type: ignore[union-attr]
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))  # type: ignore[union-attr]
    return [*entry, *cmd]


def test_dockerfile_command_serves_the_shipped_sidecar_config(tmp_path: Path) -> None:
    command = _dockerfile_command()
    assert command[:2] == ["handrail", "serve"]
    # The image copies deploy/handrail.yaml to /etc/handrail/ and policies/ beside it.
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "handrail.yaml").write_text((ROOT / "deploy" / "handrail.yaml").read_text())
    (etc / "policies").symlink_to(ROOT / "policies")
    args = [a.replace("/etc/handrail", str(etc)) for a in command[1:]]
    port, admin = free_port(), free_port()
    config = (
        (etc / "handrail.yaml")
        .read_text()
        .replace("port: 8787", f"port: {port}")
        .replace("port: 8788", f"port: {admin}")
    )
    (etc / "handrail.yaml").write_text(config)
    env = {
        **os.environ,
        "HANDRAIL_HOST": "127.0.0.1",
        "HANDRAIL_ADMIN_HOST": "127.0.0.1",
        "HANDRAIL_STORE_URL": f"sqlite:///{tmp_path}/h.db",
        "HANDRAIL_ADMIN_TOKEN": "s3cret",
        "CRM_TOKEN": "crm-token",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                # The probe carries no token, as a kubelet's does.
                with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=1) as resp:
                    assert resp.status == 200
                    break
            except OSError:
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                assert time.monotonic() < deadline, "the sidecar did not become ready"
                time.sleep(0.2)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{admin}/calls", timeout=5)
        assert refused.value.code == 401
        authorized = urllib.request.Request(
            f"http://127.0.0.1:{admin}/calls", headers={"Authorization": "Bearer s3cret"}
        )
        with urllib.request.urlopen(authorized, timeout=5) as resp:
            assert resp.status == 200
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert f"listening on http://127.0.0.1:{port}" in out
    assert "engine: embedded" in out and "store: sqlite" in out, shlex.quote(out)


@pytest.mark.parametrize("missing", ["HANDRAIL_ADMIN_TOKEN", "CRM_TOKEN"])
def test_the_sidecar_config_refuses_to_start_without_its_secrets(
    tmp_path: Path, missing: str
) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("HANDRAIL_ADMIN_TOKEN", "CRM_TOKEN")}
    env.update({"HANDRAIL_ADMIN_TOKEN": "s3cret", "CRM_TOKEN": "crm-token"})
    del env[missing]
    proc = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "serve", "-c", str(ROOT / "deploy" / "handrail.yaml")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert missing in proc.stderr and "Traceback" not in proc.stderr
