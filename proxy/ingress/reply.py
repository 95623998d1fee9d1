"""The agent's end of a streamed answer, shared by HTTP and MCP replies.

An agent may hang up at any moment: before the headers go out, mid-body, just before the
end. None of these is an error of the call: the tool ran, so its answer is still read to
its end and kept for the retry (``Call.client_gone`` notes the hang-up), and the call is
recorded with the status the tool gave.
"""

from __future__ import annotations

from aiohttp import web

from proxy.call import Call

_GONE = (ConnectionError, RuntimeError)
"""What aiohttp raises when writing to a connection the agent has closed."""


class AgentStream:
    def __init__(self, request: web.Request, response: web.StreamResponse, call: Call) -> None:
        self.request = request
        self.response = response
        self.call = call

    @property
    def gone(self) -> bool:
        return self.call.client_gone

    async def start(self) -> None:
        if self.request.transport is None or self.request.transport.is_closing():
            self.call.client_gone = True
            return
        try:
            await self.response.prepare(self.request)
        except _GONE:
            self.call.client_gone = True

    async def write(self, chunk: bytes) -> None:
        if self.gone or not chunk:
            return
        try:
            await self.response.write(chunk)
        except _GONE:
            self.call.client_gone = True

    async def finish(self) -> None:
        if self.gone:
            return
        try:
            await self.response.write_eof()
        except _GONE:
            self.call.client_gone = True


def note_gone(request: web.Request, call: Call) -> None:
    """An answer sent in one write after the call: note an agent that already left."""
    if request.transport is None or request.transport.is_closing():
        call.client_gone = True
