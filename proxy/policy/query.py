"""Running a compiled bundle on one input document, and reading the result as Python.

Each worker thread keeps one interpreter and replaces its input on every call (rego-cpp
copies the input in; the bundle holds the policy), so a decision pays for neither a new
interpreter nor regopy's per-node input wrappers. After any failure the thread's
interpreter is dropped and the next call starts on a fresh one.
"""

from __future__ import annotations

import ctypes
import json
import threading
from typing import Any

from regopy import NodeKind
from regopy import rego_shared as rs

from proxy.errors import PolicyUnavailable
from proxy.policy.bundle import describe_rego_error, new_interpreter
from proxy.policy.regoinput import set_input

_local = threading.local()


def _bind(name: str, restype: Any, *argtypes: Any) -> Any:
    function = getattr(_lib, name)
    function.restype = restype
    function.argtypes = list(argtypes)
    return function


# PyDLL: reading a result node is a tiny call, so it keeps the GIL (see regoinput.py).
_lib = ctypes.PyDLL(rs.rego._name)
_node_type = _bind("regoNodeType", ctypes.c_uint32, ctypes.c_void_p)
_node_size = _bind("regoNodeSize", ctypes.c_uint32, ctypes.c_void_p)
_node_get = _bind("regoNodeGet", ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint32)
_value_size = _bind("regoNodeValueSize", ctypes.c_uint32, ctypes.c_void_p)
_BUFFER = ctypes.POINTER(ctypes.c_char)
_value = _bind("regoNodeValue", ctypes.c_uint32, ctypes.c_void_p, _BUFFER, ctypes.c_uint32)
_WRAPPERS = (NodeKind.Term.value, NodeKind.Scalar.value)


def _text(node: int) -> str:
    size = _value_size(node)
    buffer = ctypes.create_string_buffer(size)
    if _value(node, buffer, size) != 0:
        raise ValueError("rego-cpp could not read a result value")
    return buffer.value.decode("utf-8")


def node_value(node: Any) -> Any:
    """A regopy result node as a Python value.

    Not ``Output``'s JSON: regopy does not escape quotes or backslashes in the strings it
    prints, so a reason quoting the input would not parse. Nodes hold the raw strings.
    A set comes out sorted, as OPA sorts it.
    """
    kind = _node_type(node)
    while kind in _WRAPPERS:
        node = _node_get(node, 0)
        kind = _node_type(node)
    if kind == NodeKind.String:
        return _string(_text(node))
    if kind == NodeKind.True_:
        return True
    if kind == NodeKind.False_:
        return False
    if kind == NodeKind.Int:
        return int(_text(node))
    if kind == NodeKind.Float:
        return float(_text(node))
    if kind == NodeKind.Null:
        return None
    if kind == NodeKind.Array:
        return [node_value(_node_get(node, i)) for i in range(_node_size(node))]
    if kind == NodeKind.Set:
        # OPA hands a set out sorted; rego-cpp in the order it was built. Sort it, so that
        # a set of reasons or paths comes out the same on both engines.
        members = [node_value(_node_get(node, i)) for i in range(_node_size(node))]
        return sorted(members, key=_opa_order) if len(members) > 1 else members
    if kind == NodeKind.Object:
        items: dict[Any, Any] = {}
        for i in range(_node_size(node)):
            item = _node_get(node, i)
            key = node_value(_node_get(item, 0))
            items[key if isinstance(key, str) else json.dumps(key)] = node_value(_node_get(item, 1))
        return items
    raise ValueError(f"unexpected result node {rs.rego_node_type_name(node)}")


def _opa_order(value: Any) -> tuple[Any, ...]:
    """OPA's order of values: null, booleans, numbers, strings (by code point, which is
    UTF-8 byte order), arrays, then objects (by their sorted items)."""
    if value is None:
        return (0,)
    if isinstance(value, bool):
        return (1, value)
    if isinstance(value, (int, float)):
        return (2, value)
    if isinstance(value, str):
        return (3, value)
    if isinstance(value, list):
        return (4, tuple(_opa_order(item) for item in value))
    items = sorted((_opa_order(k), _opa_order(v)) for k, v in value.items())
    return (5, tuple(items))


def _string(raw: str) -> str:
    """regopy hands some strings (e.g. ``concat``'s) back still JSON-quoted."""
    if len(raw) >= 2 and raw[0] == '"' and raw[-1] == '"':
        try:
            decoded = json.loads(raw)
        except ValueError:
            return raw
        if isinstance(decoded, str):
            return decoded
    return raw


def _first_value(output: Any) -> tuple[bool, Any]:
    root = rs.rego_output_node(output)
    if rs.rego_node_type(root) != NodeKind.Results or rs.rego_node_size(root) == 0:
        return False, None
    result = rs.rego_node_get(root, 0)
    for i in range(rs.rego_node_size(result)):
        terms = rs.rego_node_get(result, i)
        if rs.rego_node_type(terms) == NodeKind.Terms:
            if rs.rego_node_size(terms) == 0:
                return False, None
            return True, node_value(rs.rego_node_get(terms, 0))
    return False, None


def read_output(interpreter: Any, output: Any) -> tuple[bool, Any]:
    try:
        # A failed output kills the process when printed: check ok() before anything else.
        if not rs.rego_output_ok(output):
            error = rs.rego_get_error(interpreter._impl)
            raise PolicyUnavailable(f"policy evaluation failed: {describe_rego_error(error, {})}")
        return _first_value(output)
    except PolicyUnavailable:
        raise
    except Exception as exc:
        raise PolicyUnavailable(f"policy evaluation failed: {type(exc).__name__}: {exc}") from None
    finally:
        rs.rego_free_output(output)


def first_query_value(interpreter: Any, query: str) -> tuple[bool, Any]:
    """Run an ad-hoc query (re-parses the modules: for tests and tools, not per call)."""
    try:
        output = rs.rego_query(interpreter._impl, query)
    except Exception as exc:
        error = describe_rego_error(str(exc), {})
        raise PolicyUnavailable(f"policy evaluation failed: {error}") from None
    return read_output(interpreter, output)


def thread_interpreter() -> Any:
    """This thread's interpreter (created on first use)."""
    interpreter = getattr(_local, "interpreter", None)
    if interpreter is None:
        interpreter = _local.interpreter = new_interpreter()
    return interpreter


def evaluate(bundle: Any, entrypoint: str, document: Any) -> tuple[bool, Any]:
    """``(defined, value)`` of ``entrypoint`` for ``document``; failures raise 503."""
    interpreter = thread_interpreter()
    try:
        set_input(interpreter._impl, document)
        output = rs.rego_bundle_query_entrypoint(interpreter._impl, bundle._impl, entrypoint)
    except Exception as exc:
        _local.interpreter = None
        raise PolicyUnavailable(f"policy evaluation failed: {type(exc).__name__}: {exc}") from None
    try:
        return read_output(interpreter, output)
    except PolicyUnavailable:
        _local.interpreter = None
        raise
