"""A sample HTTP tool for examples/handrail.yaml: a tiny notes API on 127.0.0.1:9001.

    python examples/sample_tool.py [--port 9001]

GET /notes, POST /notes {"text": ...} -> 201 {"id": ...}, GET and DELETE /notes/{id}.
It prints each write it performs, so a replayed retry (which never reaches it) is visible.
"""

from __future__ import annotations

import argparse
import itertools

from aiohttp import web

NOTES: dict[str, dict[str, str]] = {}
IDS = itertools.count(1)


async def list_notes(request: web.Request) -> web.Response:
    return web.json_response({"notes": list(NOTES.values())})


async def create_note(request: web.Request) -> web.Response:
    body = await request.json()
    note = {"id": f"n-{next(IDS)}", "text": str(body.get("text", ""))}
    NOTES[note["id"]] = note
    print(f"created {note['id']} (Idempotency-Key {request.headers.get('Idempotency-Key')})")
    return web.json_response(note, status=201)


async def get_note(request: web.Request) -> web.Response:
    note = NOTES.get(request.match_info["id"])
    return (
        web.json_response(note)
        if note
        else web.json_response({"error": "no such note"}, status=404)
    )


async def delete_note(request: web.Request) -> web.Response:
    note = NOTES.pop(request.match_info["id"], None)
    print(f"deleted {request.match_info['id']}")
    return web.json_response({"deleted": bool(note)})


def app() -> web.Application:
    application = web.Application()
    application.router.add_get("/notes", list_notes)
    application.router.add_post("/notes", create_note)
    application.router.add_get("/notes/{id}", get_note)
    application.router.add_delete("/notes/{id}", delete_note)
    return application


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=9001, help="port on 127.0.0.1")
    web.run_app(app(), host="127.0.0.1", port=parser.parse_args().port)
