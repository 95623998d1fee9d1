"""The validated configuration: the only module that sees YAML and the environment.

``load_config`` reads ``handrail.yaml``, expands ``${VAR}`` (and ``${VAR:-default}``) from
the environment, and validates it; any problem is a ``ConfigError`` whose message names
the offending key path or file, which the CLI turns into exit status 2.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from proxy.errors import ConfigError

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_TOOL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

DEFAULT_REDACT = ("authorization", "password", "token", "secret", "api_key")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


class ListenConfig(_Model):
    host: str = "127.0.0.1"
    port: int = Field(8787, ge=0, le=65535)
    agent_id: str | None = None
    """Bind the sidecar's one agent: every call is this agent's, whatever X-Agent-Id says."""
    read_timeout_s: float = Field(60.0, gt=0, le=3600)
    """How long a connection may take to send a request's head (idle keep-alive included)
    and then its body: slow or stalled senders (slowloris) are cut off. Longer than the
    usual client pools' idle timeouts, so a reused keep-alive connection is rarely closed
    under a request in flight."""
    allowed_hosts: tuple[str, ...] | None = None
    """Host names (or ``name:port``) the data plane answers to, and the hosts an ``Origin``
    may name, against DNS rebinding; default: loopback names and ``host`` itself. ``*``
    allows any (only behind something that checks them)."""

    def hosts(self) -> frozenset[str]:
        if self.allowed_hosts is not None:
            return frozenset(h.lower() for h in self.allowed_hosts)
        own = {"127.0.0.1", "localhost", "::1"}
        if self.host not in ("0.0.0.0", "::", ""):
            own.add(self.host.lower())
        return frozenset(own)


class AdminConfig(_Model):
    host: str = "127.0.0.1"
    port: int = Field(8788, ge=0, le=65535)
    token: str | None = None
    """Bearer token for everything but the probes (/healthz, /readyz); required on a
    non-loopback host."""

    @field_validator("token")
    @classmethod
    def _empty_token_is_none(cls, value: str | None) -> str | None:
        return value or None

    @model_validator(mode="after")
    def _token_off_loopback(self) -> AdminConfig:
        if self.token is None and not is_loopback(self.host):
            raise ValueError(
                f"the admin plane on {self.host!r} (not loopback) needs admin.token: it serves "
                "captured calls and policy reloads"
            )
        return self


class IdempotencyConfig(_Model):
    mode: Literal["attach", "enforce", "off"] = "attach"
    ttl_s: float = Field(86400, gt=0)
    max_stored_bytes: int = Field(1_048_576, ge=0)
    """Responses up to this size are kept for replay; larger ones keep only their record."""
    exempt_read_only: bool = False
    """MCP: skip keys for tools whose annotations say ``readOnlyHint``."""
    lease_margin_s: float = Field(5.0, ge=0)
    """A claimed key outlives the tool's timeout by this much; past it, the holder is taken
    for dead and the key's outcome is ``unknown``."""
    derived_ttl_s: float = Field(60, gt=0)
    """A derived key (the agent sent none) replays its answer for this long after the call
    completed: long enough for a blind retry, short enough that a deliberate repeat minutes
    later runs. Keys the agent sends keep ``ttl_s``; an unknown outcome keeps ``ttl_s``."""
    upstream_dedupes: bool = False
    """The tool honours ``Idempotency-Key`` itself: a key whose outcome is unknown may be
    sent to it again (instead of 409 ``outcome_unknown``)."""
    release_on_5xx: bool = True
    """A 5xx the tool answered itself (MCP: a JSON-RPC internal error) frees the key so a
    retry runs; false keeps and replays it like any answer."""


class ToolConfig(_Model):
    upstream: str
    kind: Literal["http", "mcp"] = "http"
    timeout_s: float = Field(30, gt=0)
    """http: the whole exchange's deadline. mcp: the longest silence between the server's
    events (progress and server requests reset it)."""
    max_duration_s: float | None = Field(None, gt=0)
    """mcp: an optional deadline on a whole tools/call answer, however lively."""
    sensitive: bool = False
    """Its kept answers are sealed at rest (AES-GCM, ``store.encryption_key``)."""
    result_checks: Literal["optional", "required"] = "optional"
    """``required``: an answer the policy's ``result`` rule cannot check (an event stream,
    not JSON, over the capture limit) is blocked instead of passed unchecked."""
    max_streams_per_agent: int = Field(8, ge=1, le=10_000)
    """mcp: GET event streams one agent may hold open to this tool at once (429 past it)."""
    max_connections: int = Field(256, ge=1, le=100_000)
    """Connections to this tool at once, its own pool: one tool's load or idle MCP event
    streams cannot starve another tool. A call waits up to ``timeout_s`` for one."""
    headers: dict[str, str] = Field(default_factory=dict)
    idempotency: IdempotencyConfig = IdempotencyConfig()
    max_body_bytes: int = Field(1_048_576, gt=0)

    @field_validator("upstream")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"must be an http:// or https:// URL with a host, got {value!r}")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError("must not carry a query, fragment or credentials (use headers)")
        return value.rstrip("/")


class OpaConfig(_Model):
    url: str = "http://127.0.0.1:8181"
    timeout_ms: int = Field(250, gt=0)


class PolicyCacheConfig(_Model):
    max_entries: int = Field(4096, ge=0, le=10_000_000)
    """embedded: decisions kept for calls that repeat what the policy reads; 0: off."""


class PolicyConfig(_Model):
    engine: Literal["embedded", "opa"] = "embedded"
    path: Path = Path("policies")
    entrypoint: str = "handrail/decision"
    opa: OpaConfig = OpaConfig()
    watch: bool = True
    """embedded: re-compile when a file under ``path`` changes."""
    workers: int = Field(2, ge=1, le=64)
    """embedded: how many evaluators run at once (processes or threads, see isolation)."""
    isolation: Literal["process", "thread"] = "process"
    """embedded: evaluate in worker processes (a crash in the Rego engine cannot take the
    proxy down, and evaluation never contends for the proxy's GIL) or in threads."""
    cache: PolicyCacheConfig = PolicyCacheConfig()
    """embedded: the decision cache (``proxy.policy.cache``)."""
    shadow: Path | None = None
    """A directory of candidate policies: every live call is decided by them too, off the
    call's path; the live decision is enforced, the shadow one recorded and compared."""

    @field_validator("entrypoint")
    @classmethod
    def _entrypoint(cls, value: str) -> str:
        value = value.strip("/")
        if not value or not all(
            re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", p) for p in value.split("/")
        ):
            raise ValueError(
                f"must be a slash-separated data path like handrail/decision, got {value!r}"
            )
        return value

    @property
    def package(self) -> str:
        """The Rego package path holding the decision (``handrail`` for ``handrail/decision``)."""
        return self.entrypoint.rsplit("/", 1)[0] if "/" in self.entrypoint else ""


class NotifyConfig(_Model):
    url: str | None = None
    """A webhook that gets a JSON POST for each new approval request (Slack/Teams-ready)."""
    timeout_s: float = Field(5, gt=0)


class ApprovalsConfig(_Model):
    wait_s: float = Field(30, ge=0)
    """How long a held call waits for a decision before answering ``approval_pending``."""
    ttl_s: float = Field(86400, gt=0)
    """An approval request (and an approval not yet spent) expires after this long."""
    notify: NotifyConfig = NotifyConfig()
    ui_url: str | None = None
    """Where people open the approval page (links in notifications and MCP elicitations);
    default: the admin listener's ``/ui``."""
    signing_key: str | None = None
    """Signs approval links and MCP ``requestState``; set the same one on every replica
    (default: derived from ``admin.token``, else random per process)."""


class PinningConfig(_Model):
    mode: Literal["off", "hold"] = "off"
    """``hold``: an MCP tool whose definition changed since it was first listed is hidden
    and its calls held until a person approves the new definition."""

    @field_validator("mode", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        return "off" if value is False else value  # YAML 1.1 reads a bare off as false


def parse_key(text: str) -> bytes:
    """``store.encryption_key``: 32 bytes, base64 (``openssl rand -base64 32``)."""
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError("store.encryption_key must be base64 (openssl rand -base64 32)") from None
    if len(key) != 32:
        raise ConfigError(f"store.encryption_key must be 32 bytes once decoded, not {len(key)}")
    return key


class StoreConfig(_Model):
    url: str = "sqlite:///.handrail/handrail.db"
    encryption_key: str | None = None
    """Base64 of 32 bytes: seals the kept answers of tools marked ``sensitive``."""

    @field_validator("encryption_key")
    @classmethod
    def _key_or_none(cls, value: str | None) -> str | None:
        if not value:
            return None
        try:
            parse_key(value)
        except ConfigError as exc:
            raise ValueError(exc.message) from None
        return value

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        scheme = value.split(":", 1)[0]
        if scheme not in ("sqlite", "postgresql", "postgres"):
            raise ValueError(f"must start with sqlite:/// or postgresql://, got {value!r}")
        return value


class CaptureConfig(_Model):
    arguments: bool = True
    results: bool = True
    max_bytes: int = Field(16384, ge=0)
    redact: tuple[str, ...] = DEFAULT_REDACT


class JournalConfig(_Model):
    retention_days: float = Field(7, gt=0)
    max_rows: int = Field(1_000_000, gt=0)
    spool_dir: Path | None = None
    """Where each call's write-ahead entry is appended before the database has it (it
    survives kill -9 and a store outage); default: beside the SQLite store's file, or
    ``.handrail/journal-spool`` with PostgreSQL. Relative to the config file."""


class TracingConfig(_Model):
    exporter: Literal["otlp", "none"] = "none"
    endpoint: str | None = None
    protocol: Literal["http/protobuf", "grpc"] = "http/protobuf"
    service_name: str = "handrail"
    project_name: str | None = None
    """Sets ``openinference.project.name`` (Phoenix's project); defaults to service_name."""
    capture: CaptureConfig = CaptureConfig()
    journal: JournalConfig = JournalConfig()
    phoenix_url: str | None = None
    """Where ``handrail traces`` reads spans (Phoenix REST); defaults to the endpoint's host."""


class Config(_Model):
    listen: ListenConfig = ListenConfig()
    admin: AdminConfig = AdminConfig()
    tools: dict[str, ToolConfig] = Field(default_factory=dict)
    policy: PolicyConfig = PolicyConfig()
    approvals: ApprovalsConfig = ApprovalsConfig()
    pinning: PinningConfig = PinningConfig()
    store: StoreConfig = StoreConfig()
    tracing: TracingConfig = TracingConfig()

    @model_validator(mode="after")
    def _sensitive_needs_a_key(self) -> Config:
        sealed = [name for name, tool in self.tools.items() if tool.sensitive]
        if sealed and self.store.encryption_key is None:
            raise ValueError(
                f"tools {', '.join(sealed)} are sensitive: set store.encryption_key "
                "(openssl rand -base64 32) so their stored answers are sealed"
            )
        return self

    @field_validator("tools")
    @classmethod
    def _tool_names(cls, value: dict[str, ToolConfig]) -> dict[str, ToolConfig]:
        for name in value:
            if not _TOOL_NAME.match(name):
                raise ValueError(f"tool name {name!r} must be letters, digits, '_', '.' or '-'")
        return value


_SECRET_PATH = re.compile(r"^tools\.[^.]+\.headers\.")
"""Where a tool's credentials live: a reader of the journal or the store needs none of them."""


def expand_env(
    value: Any,
    path: str = "",
    environ: Mapping[str, str] | None = None,
    *,
    secrets_optional: bool = False,
) -> Any:
    """Replace ``${VAR}`` / ``${VAR:-default}`` in every string; a missing VAR is an error,
    except in a tool's ``headers`` when ``secrets_optional`` (read-only commands)."""
    env = os.environ if environ is None else environ
    if isinstance(value, dict):
        return {
            k: expand_env(
                v, f"{path}.{k}" if path else str(k), env, secrets_optional=secrets_optional
            )
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [
            expand_env(v, f"{path}[{i}]", env, secrets_optional=secrets_optional)
            for i, v in enumerate(value)
        ]
    if isinstance(value, str):

        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            if secrets_optional and _SECRET_PATH.match(path):
                return ""
            raise ConfigError(f"{path}: environment variable {name} is not set")

        return _ENV_REF.sub(substitute, value)
    return value


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    if first["type"] == "extra_forbidden":
        return f"{where}: unknown key"
    message = first["msg"].removeprefix("Value error, ")
    more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    return f"{where}: {message}{more}"


def parse_config(
    raw: Any,
    source: str = "config",
    base_dir: Path | None = None,
    *,
    secrets_optional: bool = False,
) -> Config:
    """Validate an already-parsed YAML document; relative paths (the policies, a SQLite
    store, the journal's spool) resolve against ``base_dir``, the config file's folder."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys")
    try:
        config = Config.model_validate(expand_env(raw, secrets_optional=secrets_optional))
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc.message}") from None
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_describe(exc)}") from None
    if base_dir is not None and not config.policy.path.is_absolute():
        policy = config.policy.model_copy(update={"path": base_dir / config.policy.path})
        config = config.model_copy(update={"policy": policy})
    shadow = config.policy.shadow
    if base_dir is not None and shadow is not None and not shadow.is_absolute():
        policy = config.policy.model_copy(update={"shadow": base_dir / shadow})
        config = config.model_copy(update={"policy": policy})
    store_url = config.store.url
    if base_dir is not None and store_url.startswith("sqlite:///"):
        rest = store_url[len("sqlite:///") :]
        if (
            rest
            and not rest.startswith("/")
            and rest != ":memory:"
            and not rest.startswith("file:")
        ):
            store = config.store.model_copy(update={"url": f"sqlite:///{base_dir / rest}"})
            config = config.model_copy(update={"store": store})
    spool = config.tracing.journal.spool_dir
    if base_dir is not None and spool is not None and not spool.is_absolute():
        journal = config.tracing.journal.model_copy(update={"spool_dir": base_dir / spool})
        tracing = config.tracing.model_copy(update={"journal": journal})
        config = config.model_copy(update={"tracing": tracing})
    return config


def load_config(path: str | Path | None, *, secrets_optional: bool = False) -> Config:
    """Load ``handrail.yaml``; ``None`` gives the embedded default. ``secrets_optional``:
    for commands that only read (the journal, the store, the policies), a tool credential
    whose variable is not set is left empty instead of stopping them."""
    if path is None:
        return default_config()
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read config file ({exc.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: not valid YAML ({exc})") from None
    return parse_config(raw, str(file), file.resolve().parent, secrets_optional=secrets_optional)


def redact_url(url: str) -> str:
    """A store URL fit for a log line: any password replaced."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def shipped_policies() -> Path:
    """The starter policies: ``proxy/_policies`` in a wheel, ``policies/`` in a checkout."""
    package_dir = Path(__file__).resolve().parent
    for candidate in (package_dir / "_policies", package_dir.parent / "policies"):
        if candidate.is_dir():
            return candidate
    raise ConfigError("the shipped policies/ directory is missing from this installation")


def default_config() -> Config:
    """The embedded default: shipped policies (or ./policies), SQLite under .handrail/."""
    local = Path("policies")
    path = local.resolve() if local.is_dir() else shipped_policies()
    return Config(policy=PolicyConfig(path=path))
