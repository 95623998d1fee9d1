"""Config validation: every mistake is exit 2 with a one-line message naming the key or file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from proxy.config import load_config, parse_config
from proxy.errors import ConfigError


def handrail(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "handrail.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "named"),
    [
        (
            "tools:\n  crm:\n    upstream: http://127.0.0.1:9001\n    retries: 3\n",
            "tools.crm.retries: unknown key",
        ),
        ("listen: {host: 127.0.0.1, prot: 1}\n", "listen.prot: unknown key"),
        ("tools:\n  crm:\n    upstream: ftp://files\n", "tools.crm.upstream"),
        (
            "tools:\n  crm:\n    upstream: http://127.0.0.1:9001\n    idempotency: {mode: sometimes}\n",
            "tools.crm.idempotency.mode",
        ),
        ("store: {url: 'mysql://x'}\n", "store.url"),
        (
            "tools:\n  crm:\n    upstream: http://h\n    headers: {Authorization: 'Bearer ${HANDRAIL_TEST_UNSET_TOKEN}'}\n",
            "tools.crm.headers.Authorization: environment variable HANDRAIL_TEST_UNSET_TOKEN is not set",
        ),
        ("tools: [1, 2\n", "not valid YAML"),
    ],
)
def test_bad_config_exits_2_naming_the_key(tmp_path: Path, text: str, named: str) -> None:
    config = write(tmp_path, text)
    result = handrail("serve", "-c", str(config))  # a bad config stops it before it starts
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("handrail:")]
    assert len(lines) == 1 and named in lines[0], result.stderr
    assert str(config) in lines[0]


def test_missing_config_file_exits_2_naming_the_file(tmp_path: Path) -> None:
    result = handrail("serve", "-c", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert "nope.yaml" in result.stderr and "cannot read" in result.stderr


def test_env_vars_are_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRM_TOKEN", "abc")
    monkeypatch.setenv("CRM_PORT", "9009")
    config = load_config(
        write(
            tmp_path,
            "tools:\n  crm:\n    upstream: http://127.0.0.1:${CRM_PORT}\n    headers: {Authorization: 'Bearer ${CRM_TOKEN}'}\nadmin: {token: '${ADMIN_T:-}'}\n",
        )
    )
    assert config.tools["crm"].upstream == "http://127.0.0.1:9009"
    assert config.tools["crm"].headers["Authorization"] == "Bearer abc"
    assert config.admin.token is None


def test_relative_policy_path_is_relative_to_the_config_file(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "policy: {path: rules}\n"))
    assert config.policy.path == tmp_path / "rules"


def test_usage_error_exits_2() -> None:
    result = handrail("calls", "--limit", "lots")
    assert result.returncode == 2


@pytest.mark.parametrize("host", ["0.0.0.0", "10.0.0.7", "::"])
def test_an_admin_plane_off_loopback_needs_a_token(host: str) -> None:
    with pytest.raises(ConfigError, match="admin"):
        parse_config({"admin": {"host": host}})
    assert parse_config({"admin": {"host": host, "token": "t"}}).admin.token == "t"


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_an_admin_plane_on_loopback_may_go_without_a_token(host: str) -> None:
    assert parse_config({"admin": {"host": host}}).admin.token is None


def test_a_relative_sqlite_store_resolves_against_the_config_file(tmp_path: Path) -> None:
    folder = tmp_path / "conf"
    folder.mkdir()
    (folder / "handrail.yaml").write_text('store: {url: "sqlite:///state/h.db"}\n')
    config = load_config(folder / "handrail.yaml")
    assert config.store.url == f"sqlite:///{folder}/state/h.db"


def test_read_only_commands_need_no_tool_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CRM_TOKEN", raising=False)
    (tmp_path / "handrail.yaml").write_text(
        "tools:\n  crm:\n    upstream: http://127.0.0.1:9\n"
        '    headers: {Authorization: "Bearer ${CRM_TOKEN}"}\n'
    )
    with pytest.raises(ConfigError, match="CRM_TOKEN"):
        load_config(tmp_path / "handrail.yaml")
    assert load_config(tmp_path / "handrail.yaml", secrets_optional=True).tools["crm"]
    run = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "calls", "-c", str(tmp_path / "handrail.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert "reading the journal at" in run.stderr and "handrail-journal.db" in run.stderr


def test_a_port_in_use_stops_serve_in_one_line_before_anything_starts(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write(
            tmp_path,
            f"listen: {{port: {port}}}\nadmin: {{port: 0}}\n"
            f'store: {{url: "sqlite:///{tmp_path}/state/h.db"}}\n',
        )
        result = handrail("serve", "-c", str(config))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("handrail:")]
    assert len(lines) == 1 and f"listen: cannot listen on 127.0.0.1:{port}" in lines[0]
    assert not (tmp_path / "state").exists()  # the store was never opened


def test_an_unreachable_store_stops_serve_in_one_line(tmp_path: Path) -> None:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    config = write(
        tmp_path,
        "listen: {port: 0}\nadmin: {port: 0}\n"
        f'store: {{url: "postgresql://postgres@127.0.0.1:{closed}/test"}}\n',
    )
    result = handrail("serve", "-c", str(config))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "store.url (postgresql://postgres@127.0.0.1" in result.stderr


def test_every_option_of_every_command_has_help() -> None:
    import argparse

    from proxy.cli import build_parser

    missing = []

    def walk(parser: argparse.ArgumentParser, where: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{where} {name}")
            elif not isinstance(action, argparse._HelpAction) and not action.help:
                missing.append(f"{where}: {'/'.join(action.option_strings) or action.dest}")

    walk(build_parser(), "handrail")
    assert missing == []
