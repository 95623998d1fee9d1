"""Property tests of the canonical request (hypothesis): no input makes the form the policy
decides and the form the tool receives differ."""

from __future__ import annotations

import asyncio
import string
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.errors import BadRequest
from proxy.ingress.canonical import UNRESERVED, canonical_path, strict_loads
from tests.conftest import ProxyFactory, Seen

_HEX = "0123456789abcdefABCDEF"
_piece = st.one_of(
    st.sampled_from(list(string.ascii_letters + string.digits + "-._~/;#?\\:@!$&'()*+,= é")),
    st.builds(lambda a, b: "%" + a + b, st.sampled_from(_HEX), st.sampled_from(_HEX)),
    st.sampled_from(["%2e", "%2E", "%2f", "%25", "..", ".", "//", "%00", "%5c"]),
)
raw_paths = st.lists(_piece, min_size=0, max_size=16).map(lambda parts: "/" + "".join(parts))


def _decodes_to_unreserved(path: str) -> bool:
    return any(
        ch == "%" and chr(int(path[i + 1 : i + 3], 16)) in UNRESERVED for i, ch in enumerate(path)
    )


@given(raw_paths)
@settings(max_examples=3000, deadline=None)
def test_a_path_is_refused_or_has_exactly_one_reading(raw: str) -> None:
    try:
        path = canonical_path(raw)
    except BadRequest:
        return
    assert canonical_path(path) == path  # the tool, reading it again, reads the same
    assert not _decodes_to_unreserved(path)
    segments = path.split("/")[1:]
    assert path == "/" or all(s not in ("", ".", "..") for s in segments)
    assert "#" not in path and ";" not in path and "\\" not in path


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=30,
)


@given(json_values)
@settings(max_examples=500, deadline=None)
def test_json_written_by_a_strict_writer_reads_back_the_same(value: Any) -> None:
    import json

    text = json.dumps(value, allow_nan=False)
    assert strict_loads(text) == value


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(raw=raw_paths)
async def test_the_tool_receives_exactly_the_path_the_policy_decided(
    raw: str, tool: tuple[Any, Seen], make_proxy: ProxyFactory
) -> None:
    """End to end through the proxy, written by hand (clients normalise paths): a path the
    proxy does not refuse reaches the tool exactly in its canonical form."""
    server, seen = tool
    if id(seen) not in _PROXIES:  # one proxy for all the examples of this test run
        _PROXIES[id(seen)] = await make_proxy({"crm": {"upstream": str(server.make_url(""))}})
    proxy = _PROXIES[id(seen)]
    before = seen.count()
    target = "/tools/crm" + raw.replace(" ", "%20").replace("é", "%C3%A9")
    status = await _get(proxy, target)
    try:
        expected = canonical_path(target[len("/tools/crm") :].split("?", 1)[0])
    except BadRequest:
        assert status in (400, 404) and seen.count() == before
        return
    assert status == 200
    assert seen.requests[-1]["path"] == expected


_PROXIES: dict[str, Any] = {}


async def _get(proxy: Any, target: str) -> int:
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    head = f"GET {target} HTTP/1.1\r\nHost: {proxy.host}\r\nConnection: close\r\n\r\n"
    writer.write(head.encode())
    await writer.drain()
    data = await reader.read()
    writer.close()
    return int(data.split(b" ", 2)[1])
