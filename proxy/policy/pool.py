"""The parent side of the policy worker processes (``proxy.policy.worker``).

``workers`` long-lived children, each fed pipelined request frames over its stdin; a call
goes to the worker with the fewest in flight. Per call the parent pays one ``json.dumps``,
its share of one pipe write (the frames queued in one turn of the loop go out together, so
a busy proxy wakes each worker once per turn, not once per call) and of one read callback
(a ``SubprocessProtocol``, no stream coroutines): evaluation never holds the proxy's GIL,
and a crash in regorus ends a worker, not the proxy. A worker that dies or overruns a
call's deadline fails the call it was evaluating with ``PolicyUnavailable`` (fail closed)
and is restarted with backoff; the calls queued behind that one are tried once on another
worker, so one slow or crashing evaluation does not fail its bystanders.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
from collections import deque
from collections.abc import Callable
from typing import Any, cast

from proxy.errors import ConfigError, PolicyUnavailable
from proxy.policy.worker import (
    DECISION,
    DEFINED,
    FAILED,
    HEADER,
    LOAD,
    LOAD_FAILED,
    LOADED,
    RESULT,
    UNDEFINED,
    VISIBLE,
    frame,
)

logger = logging.getLogger(__name__)

LOAD_TIMEOUT_S = 30.0
STOP_GRACE_S = 2.0
RESTART_BACKOFF_S = (0.05, 5.0)
HEALTHY_AFTER_S = 10.0
"""A worker that lived this long restarts at the shortest backoff again."""

_encode = json.JSONEncoder(separators=(",", ":")).encode
_OPS = {"decision": DECISION, "visible": VISIBLE, "result": RESULT}
_Pending = tuple[int, "asyncio.Future[tuple[int, bytes]]", float]


class WorkerLost(PolicyUnavailable):
    """A call's worker died or overran another call's deadline before evaluating it."""


def _exit_text(code: int | None) -> str:
    if code is None:
        return "stopped"
    if code < 0:
        return f"was killed by signal {-code}"
    return f"exited with status {code}"


class _WorkerProcess(asyncio.SubprocessProtocol):
    """One child: frames out on stdin, answers matched in order to ``pending``."""

    def __init__(
        self, name: str, timeout_s: float, on_down: Callable[[_WorkerProcess], None]
    ) -> None:
        self.name = name
        self.on_down = on_down
        self.timeout_s = timeout_s
        self.loop = asyncio.get_running_loop()
        self.pending: deque[_Pending] = deque()
        self.next_id = 1
        self.alive = True
        self.exited: asyncio.Future[int | None] = self.loop.create_future()
        self.started = self.loop.time()
        self._buffer = bytearray()
        self._errors = bytearray()
        self._timer: asyncio.TimerHandle | None = None
        self._transport: asyncio.SubprocessTransport | None = None
        self._stdin: asyncio.WriteTransport | None = None
        self._outbox: list[bytes] = []
        """Frames queued in this turn of the loop, written together by ``_flush``."""

    @classmethod
    async def spawn(
        cls, name: str, timeout_s: float, on_down: Callable[[_WorkerProcess], None]
    ) -> _WorkerProcess:
        loop = asyncio.get_running_loop()
        _, worker = await loop.subprocess_exec(
            lambda: cls(name, timeout_s, on_down),
            sys.executable,
            "-m",
            "proxy.policy.worker",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        return worker

    @property
    def pid(self) -> int | None:
        return self._transport.get_pid() if self._transport else None

    # --- asyncio callbacks --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio's: trust the protocol, not isinstance.
        self._transport = cast(asyncio.SubprocessTransport, transport)
        self._stdin = cast(asyncio.WriteTransport, self._transport.get_pipe_transport(0))

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        if fd == 1:
            self._answers(data)
        else:
            self._log_errors(data)

    def process_exited(self) -> None:
        assert self._transport is not None
        code = self._transport.get_returncode()
        self._fail_all(f"the policy worker {_exit_text(code)}")
        if self._errors:
            self._log_errors(b"\n")
        if not self.exited.done():
            self.exited.set_result(code)
        if self._stdin is not None:
            self._stdin.close()  # so every pipe ends, and connection_lost closes the transport
        self.loop.call_later(STOP_GRACE_S, self._close_transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._close_transport()

    def _close_transport(self) -> None:
        if self._transport is not None:
            self._transport.close()

    # --- requests ----------------------------------------------------------------------

    def send(self, op: int, body: bytes, timeout_s: float) -> asyncio.Future[tuple[int, bytes]]:
        """Queue one request; the future gets ``(status, body)`` or ``PolicyUnavailable``."""
        future: asyncio.Future[tuple[int, bytes]] = self.loop.create_future()
        if not self.alive or self._stdin is None or self._stdin.is_closing():
            future.set_exception(PolicyUnavailable("the policy worker is not running"))
            return future
        ident = self.next_id
        self.next_id = ident + 1 if ident < 0xFFFFFFFF else 1
        deadline = self.loop.time() + timeout_s
        self.pending.append((ident, future, deadline))
        outbox = self._outbox
        outbox.append(frame(ident, op, body))
        if len(outbox) == 1:
            self.loop.call_soon(self._flush)
        if self._timer is None or deadline < self._timer.when():
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self.loop.call_at(deadline, self._check_deadlines)
        return future

    def _flush(self) -> None:
        """One pipe write (and one wake-up of the worker) for every frame of this turn."""
        outbox, self._outbox = self._outbox, []
        stdin = self._stdin
        if outbox and self.alive and stdin is not None and not stdin.is_closing():
            stdin.write(outbox[0] if len(outbox) == 1 else b"".join(outbox))

    def _answers(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        size, offset, pending = HEADER.size, 0, self.pending
        while len(buffer) - offset >= size:
            length, ident, status = HEADER.unpack_from(buffer, offset)
            end = offset + size + length
            if len(buffer) < end:
                break
            body = bytes(buffer[offset + size : end])
            offset = end
            if not pending or pending[0][0] != ident:
                self.kill(f"the policy worker answered out of turn (id {ident})")
                return
            _, future, _ = pending.popleft()
            if not future.done():
                future.set_result((status, body))
        del buffer[:offset]

    def _check_deadlines(self) -> None:
        self._timer = None
        if not self.pending:
            return
        now = self.loop.time()
        soonest = min(deadline for _, _, deadline in self.pending)
        if soonest > now:
            self._timer = self.loop.call_at(soonest, self._check_deadlines)
            return
        # The worker runs requests in order and cannot be interrupted: the overdue call
        # gets the timeout, the worker is replaced, and the calls queued behind it are
        # bystanders (``WorkerLost``), which the pool sends to another worker.
        for _, future, deadline in self.pending:
            if deadline <= now and not future.done():
                future.set_exception(
                    PolicyUnavailable(f"policy evaluation took longer than {self.timeout_s:g} s")
                )
        self.kill(f"policy worker {self.name} overran a deadline; restarting it")

    def _fail_all(self, why: str) -> None:
        """The worker is gone: the call it was evaluating (the first still pending) fails
        with it; the ones queued behind it did nothing wrong and may be tried elsewhere."""
        if self.alive:
            self.alive = False
            self.on_down(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        culprit = True
        while self.pending:
            _, future, _ = self.pending.popleft()
            if future.done():
                continue
            future.set_exception(PolicyUnavailable(why) if culprit else WorkerLost(why))
            culprit = False

    def kill(self, why: str) -> None:
        if self.alive:
            logger.error("%s", why, extra={"policy_worker": self.name, "pid": self.pid})
        self._fail_all(why if "restarting" not in why else "the policy worker was restarted")
        if self._transport is not None and self._transport.get_returncode() is None:
            with contextlib.suppress(ProcessLookupError):
                self._transport.kill()

    async def stop(self) -> None:
        """Close stdin (the worker exits at EOF), then kill it after a grace period."""
        self._fail_all("the policy engine is stopping")
        if self._stdin is not None:
            self._stdin.close()
        try:
            await asyncio.wait_for(asyncio.shield(self.exited), STOP_GRACE_S)
        except TimeoutError:
            self.kill(f"policy worker {self.name} did not stop; killing it")
            await asyncio.shield(self.exited)
        self._close_transport()

    def _log_errors(self, data: bytes) -> None:
        self._errors += data
        *lines, rest = bytes(self._errors).split(b"\n")
        self._errors = bytearray(rest)
        for line in lines:
            if line.strip():
                logger.warning(
                    "policy worker %s: %s",
                    self.name,
                    line.decode("utf-8", "replace"),
                    extra={"policy_worker": self.name},
                )


async def _load(worker: _WorkerProcess, message: bytes) -> dict[str, Any]:
    """Have ``worker`` compile and switch to ``message``: ``ConfigError`` if it does not."""
    try:
        status, body = await worker.send(LOAD, message, LOAD_TIMEOUT_S)
    except PolicyUnavailable as exc:
        raise ConfigError(f"the policy crashed the compiler: {exc.message}") from None
    if status == LOAD_FAILED:
        raise ConfigError(body.decode("utf-8", "replace"))
    if status != LOADED:
        raise ConfigError(f"policy worker answered a load with status {status}")
    summary: dict[str, Any] = json.loads(body)
    return summary


class WorkerPool:
    """``size`` worker processes serving one policy; ``load`` switches all of them."""

    def __init__(self, size: int, timeout_s: float) -> None:
        self.size = size
        self.timeout_s = timeout_s
        self._message = b""
        self._live: list[_WorkerProcess] = []
        self._spawned: set[_WorkerProcess] = set()
        """Every worker not yet reaped, live or dying: ``close`` waits for them all."""
        self._keepers: list[asyncio.Task[None]] = []
        self._closing = False
        self._down_since: float | None = None

    async def start(self, message: bytes) -> None:
        """Start every worker on ``message``; ``ConfigError`` if the policy does not load."""
        self._message = message
        workers = await asyncio.gather(
            *(self._spawn_loaded(f"#{i}") for i in range(self.size)), return_exceptions=True
        )
        started = [w for w in workers if isinstance(w, _WorkerProcess)]
        failed = [w for w in workers if isinstance(w, BaseException)]
        if failed:
            await asyncio.gather(*(w.stop() for w in started))
            raise failed[0]
        for i, worker in enumerate(started):
            self._live.append(worker)
            self._keepers.append(
                asyncio.create_task(self._keep(f"#{i}", worker), name=f"handrail-policy-{i}")
            )

    async def _spawn_loaded(self, name: str) -> _WorkerProcess:
        try:
            worker = await _WorkerProcess.spawn(name, self.timeout_s, self._drop)
        except OSError as exc:
            raise PolicyUnavailable(f"cannot start a policy worker: {exc}") from None
        self._spawned.add(worker)
        try:
            message: bytes | None = None
            while message is not self._message:  # a reload may land while this one loads
                message = self._message
                await _load(worker, message)
        except BaseException:
            await worker.stop()
            self._spawned.discard(worker)
            raise
        return worker

    async def _keep(self, name: str, worker: _WorkerProcess | None) -> None:
        """Restart the worker whenever it ends, with backoff, until the pool closes."""
        loop = asyncio.get_running_loop()
        backoff = RESTART_BACKOFF_S[0]
        while not self._closing:
            if worker is not None:
                code = await asyncio.shield(worker.exited)
                self._drop(worker)
                self._spawned.discard(worker)
                if self._closing:
                    return
                logger.error(
                    "policy worker %s %s; restarting it",
                    name,
                    _exit_text(code),
                    extra={"policy_worker": name},
                )
                if loop.time() - worker.started > HEALTHY_AFTER_S:
                    backoff = RESTART_BACKOFF_S[0]
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, RESTART_BACKOFF_S[1])
            try:
                worker = await self._spawn_loaded(name)
            except (ConfigError, PolicyUnavailable) as exc:
                logger.error("policy worker %s did not start: %s", name, exc.message)
                worker = None
                continue
            if self._closing:
                await worker.stop()
                return
            self._live.append(worker)
            self._down_since = None
            logger.info("policy worker %s is back (pid %s)", name, worker.pid)

    def _drop(self, worker: _WorkerProcess) -> None:
        if worker in self._live:
            self._live.remove(worker)
        if not self._live and self._down_since is None:
            self._down_since = asyncio.get_running_loop().time()

    async def evaluate(
        self, rule: str, document: Any, encoded: bytes | None = None
    ) -> tuple[bool, Any]:
        """``(defined, value)`` of ``rule`` for ``document`` (sent as ``encoded``, its JSON,
        when the caller has it); every failure is a 503."""
        try:
            body = encoded if encoded is not None else _encode(document).encode()
        except (TypeError, ValueError) as exc:
            raise PolicyUnavailable(f"policy input is not JSON: {exc}") from None
        live = self._live
        if not live:
            raise PolicyUnavailable("no policy worker is running (restarting)")
        worker = live[0] if len(live) == 1 else min(live, key=_in_flight)
        try:
            status, answer = await worker.send(_OPS[rule], body, self.timeout_s)
        except WorkerLost:
            # Another call broke the worker this one was queued on: once more, elsewhere.
            others = [w for w in self._live if w is not worker]
            if not others:
                raise
            retry = min(others, key=_in_flight)
            status, answer = await retry.send(_OPS[rule], body, self.timeout_s)
        if status == DEFINED:
            return True, json.loads(answer.decode())
        if status == UNDEFINED:
            return False, None
        if status == FAILED:
            raise PolicyUnavailable(answer.decode("utf-8", "replace"))
        raise PolicyUnavailable(f"policy worker answered with status {status}")

    async def check(self, message: bytes) -> dict[str, Any]:
        """Compile ``message`` in a throwaway worker: ``ConfigError`` if it does not load.

        A policy that crashes the compiler takes down only this worker.
        """
        worker = await _WorkerProcess.spawn("check", self.timeout_s, _ignore)
        try:
            return await _load(worker, message)
        finally:
            await worker.stop()

    async def load(self, message: bytes) -> None:
        """Switch every running worker (and every later restart) to ``message``."""
        self._message = message
        workers = list(self._live)
        results = await asyncio.gather(
            *(_load(w, message) for w in workers), return_exceptions=True
        )
        for worker, result in zip(workers, results, strict=True):
            if isinstance(result, BaseException):
                worker.kill(f"policy worker {worker.name} failed to load the policy: {result}")

    def problem(self) -> str | None:
        """Why no call can be decided right now, or ``None``."""
        if self._live or self._closing:
            return None
        return "no policy worker is running (restarting)"

    async def close(self) -> None:
        self._closing = True
        for keeper in self._keepers:
            keeper.cancel()
        for keeper in self._keepers:
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
        self._keepers.clear()
        self._live = []
        workers, self._spawned = self._spawned, set()
        await asyncio.gather(*(w.stop() for w in workers))


def _ignore(worker: _WorkerProcess) -> None:
    pass


def _in_flight(worker: _WorkerProcess) -> int:
    return len(worker.pending)
