"""Node 22 and the MCP conformance suite, installed once into a cache, and its scenario list.

The suite (npm ``@modelcontextprotocol/conformance``) needs Node >= 22 and machines here
ship Node 20, so Node itself comes from npm too (``node-linux-<arch>@22``, a plain binary).
Both go into ``$HANDRAIL_CONFORMANCE_DIR`` (default ``.cache/conformance`` in the repository)
with the machine's ``npm``; a cache that already holds the right versions is used as is.
Standard library only: ``.ci/run`` installs with it before anything else needs it.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SUITE_PACKAGE = "@modelcontextprotocol/conformance"
SUITE_VERSION = "0.1.16"
NODE_MAJOR = 22
INSTALL_TIMEOUT_S = 300.0

_SCENARIO_LINE = re.compile(r"^\s+- (\S+) \[([^\]]*)\]\s*$")


class SuiteUnavailable(RuntimeError):
    """Node 22 or the suite could not be installed or run here (no npm, no registry)."""


@dataclass(frozen=True, slots=True)
class Toolchain:
    node: Path
    cli: Path
    """The suite's ``dist/index.js``, run with ``node``."""
    sdk_version: str
    """The TypeScript SDK the suite resolved to: its clients are what the scenarios run."""

    def command(self, *args: str) -> list[str]:
        return [str(self.node), str(self.cli), *args]

    @property
    def node_version(self) -> str:
        return node_version(self.node) or "unknown"


def cache_dir() -> Path:
    return Path(os.environ.get("HANDRAIL_CONFORMANCE_DIR") or REPO / ".cache" / "conformance")


def node_package() -> str:
    """npm publishes Node's own binaries as ``node-<os>-<arch>``; pick this machine's."""
    arch = {"x86_64": "x64", "amd64": "x64", "aarch64": "arm64", "arm64": "arm64"}
    machine = platform.machine().lower()
    if sys.platform != "linux" or machine not in arch:
        raise SuiteUnavailable(f"no npm Node package for {sys.platform}/{machine}")
    return f"node-linux-{arch[machine]}"


def _npm_install(prefix: Path, spec: str) -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise SuiteUnavailable("npm is not on PATH: it installs Node 22 and the suite")
    prefix.mkdir(parents=True, exist_ok=True)
    command = [npm, "install", "--prefix", str(prefix), "--no-audit", "--no-fund"]
    command += ["--loglevel=error", spec]
    try:
        subprocess.run(
            command, check=True, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S
        )
    except subprocess.CalledProcessError as exc:
        raise SuiteUnavailable(f"npm install {spec} failed: {exc.stderr.strip()}") from exc
    except subprocess.TimeoutExpired as exc:
        raise SuiteUnavailable(f"npm install {spec} took over {INSTALL_TIMEOUT_S:.0f} s") from exc


def node_version(node: Path) -> str | None:
    if not node.exists():
        return None
    result = subprocess.run([str(node), "--version"], capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else None


def _package_version(package_dir: Path) -> str | None:
    try:
        return str(json.loads((package_dir / "package.json").read_text())["version"])
    except (OSError, ValueError, KeyError):
        return None


def _is_wanted_node(version: str | None) -> bool:
    return (version or "").startswith(f"v{NODE_MAJOR}.")


def ensure_node(cache: Path) -> Path:
    """Node 22 from npm: the machine's own Node is older than the suite accepts."""
    package = node_package()
    node = cache / "node" / "node_modules" / package / "bin" / "node"
    if not _is_wanted_node(node_version(node)):
        _npm_install(cache / "node", f"{package}@{NODE_MAJOR}")
    version = node_version(node)
    if not _is_wanted_node(version):
        raise SuiteUnavailable(f"{node} is {version}, not Node {NODE_MAJOR}")
    return node


def ensure_suite(cache: Path) -> Path:
    """The suite at exactly SUITE_VERSION; a cache holding another version is replaced."""
    package_dir = cache / "suite" / "node_modules" / SUITE_PACKAGE
    if _package_version(package_dir) != SUITE_VERSION:
        _npm_install(cache / "suite", f"{SUITE_PACKAGE}@{SUITE_VERSION}")
    if _package_version(package_dir) != SUITE_VERSION:
        raise SuiteUnavailable(f"{SUITE_PACKAGE}@{SUITE_VERSION} is not in {package_dir}")
    return package_dir / "dist" / "index.js"


def ensure_toolchain(cache: Path | None = None) -> Toolchain:
    cache = cache or cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    # The default cache is in the work tree: keep it out of git from the inside.
    (cache / ".gitignore").write_text("*\n")
    node, cli = ensure_node(cache), ensure_suite(cache)
    sdk = _package_version(cache / "suite" / "node_modules" / "@modelcontextprotocol" / "sdk")
    return Toolchain(node=node, cli=cli, sdk_version=sdk or "unknown")


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    spec_versions: tuple[str, ...]


def parse_scenario_list(text: str) -> list[Scenario]:
    """The server section of ``conformance list --server``: ``  - name [v1,v2]`` lines."""
    scenarios = []
    for line in text.splitlines():
        match = _SCENARIO_LINE.match(line)
        if match:
            versions = tuple(v for v in match.group(2).split(",") if v)
            scenarios.append(Scenario(match.group(1), versions))
    return scenarios


def list_server_scenarios(toolchain: Toolchain) -> list[Scenario]:
    """Every server scenario the suite has, pending ones included (``list`` shows all)."""
    result = subprocess.run(
        toolchain.command("list", "--server"), capture_output=True, text=True, timeout=60
    )
    scenarios = parse_scenario_list(result.stdout)
    if result.returncode != 0 or not scenarios:
        raise SuiteUnavailable(f"conformance list --server failed: {result.stderr.strip()}")
    return scenarios
