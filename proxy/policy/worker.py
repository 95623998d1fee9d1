"""A policy worker process: regorus runs here, never in the proxy's own process.

``python -m proxy.policy.worker`` reads request frames on stdin and answers each with one
frame on stdout, in order (requests are pipelined: many may be in flight). A frame is a
``HEADER`` (body length, request id, op or status) and a body:

- ``LOAD``: the policy files as JSON (``load_message``); the worker compiles them and switches
  to them only if they compile (``LOADED`` with the policy's summary, else ``LOAD_FAILED``
  with the ``file:line`` message: the old policy stays).
- ``DECISION`` / ``VISIBLE`` / ``RESULT``: the input document as JSON, handed to regorus as
  it came; the answer is ``DEFINED`` with the value as regorus's JSON, ``UNDEFINED`` (also
  when the policy has no such rule), or ``FAILED`` with a message (fail closed).

One thread does all the work: the engine is built and used on it (regorus requires that).
EOF on stdin ends the worker. Anything native code prints (a Rust panic's message, Rego
``print``) lands on stderr, which the parent logs: the protocol has its own copy of the
original stdout.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import sys
from pathlib import Path
from typing import Any

from proxy.errors import ConfigError, PolicyUnavailable
from proxy.policy.bundle import PolicyFiles, compile_files
from proxy.policy.query import adopt, evaluate_json

HEADER = struct.Struct("!IIB")
"""Body length, request id, op (requests) or status (responses)."""

DECISION, VISIBLE, LOAD, RESULT = 1, 2, 3, 4
DEFINED, UNDEFINED, FAILED, LOADED, LOAD_FAILED = 0, 1, 2, 3, 4


def frame(ident: int, code: int, body: bytes) -> bytes:
    return HEADER.pack(len(body), ident, code) + body


def load_message(root: Path, entrypoint: str, files: PolicyFiles) -> bytes:
    """The ``LOAD`` body for a ``PolicyFiles`` read by the parent (so every worker compiles
    the very sources the parent checked, not whatever is on disk a moment later)."""
    return json.dumps(
        {
            "root": str(root),
            "entrypoint": entrypoint,
            "modules": files.modules,
            "data": files.data,
            "revision": files.revision,
        },
        separators=(",", ":"),
    ).encode()


class _Worker:
    """The compiled policy and the request handlers (one thread: requests run in order)."""

    def __init__(self) -> None:
        self.compiled: Any = None

    def handle(self, ident: int, op: int, body: bytes) -> bytes:
        if op == LOAD:
            return self._load(ident, body)
        compiled = self.compiled
        if compiled is None:
            return frame(ident, FAILED, b"no policy loaded in the worker")
        if op == DECISION:
            entrypoint = compiled.decision
        elif op == VISIBLE:
            entrypoint = compiled.visible
        elif op == RESULT:
            entrypoint = compiled.result
        else:
            return frame(ident, FAILED, f"unknown request op {op}".encode())
        if entrypoint is None:
            return frame(ident, UNDEFINED, b"")
        try:
            value = evaluate_json(compiled, entrypoint, body.decode())
            if value is None:
                return frame(ident, UNDEFINED, b"")
            return frame(ident, DEFINED, value.encode())
        except PolicyUnavailable as exc:
            return frame(ident, FAILED, exc.message.encode())
        except Exception as exc:  # a bad request must not end the worker
            return frame(ident, FAILED, f"policy evaluation failed: {exc!r}".encode())

    def _load(self, ident: int, body: bytes) -> bytes:
        try:
            message = json.loads(body)
            files = PolicyFiles(
                modules=message["modules"], data=message["data"], revision=message["revision"]
            )
            compiled, engine = compile_files(Path(message["root"]), files, message["entrypoint"])
        except ConfigError as exc:
            return frame(ident, LOAD_FAILED, exc.message.encode())
        except Exception as exc:
            return frame(ident, LOAD_FAILED, f"policy load failed: {exc!r}".encode())
        adopt(compiled, engine)
        self.compiled = compiled
        summary = {"revision": compiled.revision, "modules": compiled.modules}
        return frame(ident, LOADED, json.dumps(summary).encode())


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def serve(in_fd: int, out_fd: int) -> int:
    worker = _Worker()
    buffer = bytearray()
    size = HEADER.size
    while True:
        chunk = os.read(in_fd, 1 << 16)
        if not chunk:
            return 0
        buffer += chunk
        offset = 0
        while len(buffer) - offset >= size:
            length, ident, op = HEADER.unpack_from(buffer, offset)
            end = offset + size + length
            if len(buffer) < end:
                break
            _write_all(out_fd, worker.handle(ident, op, bytes(buffer[offset + size : end])))
            offset = end
        del buffer[:offset]


def main() -> int:
    # Ctrl-C reaches the whole process group: the parent decides when workers stop (EOF).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    out_fd = os.dup(1)
    os.dup2(2, 1)  # whatever native code prints stays out of the protocol
    sys.stdout = sys.stderr
    return serve(0, out_fd)


if __name__ == "__main__":
    sys.exit(main())
