"""Python values to regopy inputs, straight through rego-cpp's C input API.

regopy's ``rego_input_from_value`` wraps every node in a Python function that checks its
return code; this calls the C functions directly (bound once, with argtypes) and checks the
input's sticky status once at the end (``regoInputValidate``: any failed call leaves it set).
The values and the order of type checks are regopy's: ``True``/``False`` before ints, then
ints, floats, strings, ``None``, sets, mappings, other sequences; anything else is a
``ValueError``. One deliberate difference: an int outside 64 bits goes in as a float, where
regopy lets ctypes wrap it (2**64 + 50 would pass a limit of 100). The input is freed on
every failure; the caller frees it on success.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterator, Mapping, Sequence, Set
from contextlib import contextmanager
from typing import Any

from regopy import rego_shared as rs

# PyDLL: these calls are tiny, so they keep the GIL. Through CDLL each of the ~100 calls per
# input would release and re-take it, and under load every re-take waits on the event loop.
_lib = ctypes.PyDLL(rs.rego._name)


def _bind(name: str, restype: Any, *argtypes: Any) -> Any:
    function = getattr(_lib, name)
    function.restype = restype
    function.argtypes = list(argtypes)
    return function


_POINTER = ctypes.c_void_p
_STATUS = ctypes.c_uint32
_new = _bind("regoNewInput", _POINTER)
_free = _bind("regoFreeInput", None, _POINTER)
_validate = _bind("regoInputValidate", _STATUS, _POINTER)
_int = _bind("regoInputInt", _STATUS, _POINTER, ctypes.c_int64)
_float = _bind("regoInputFloat", _STATUS, _POINTER, ctypes.c_double)
_string = _bind("regoInputString", _STATUS, _POINTER, ctypes.c_char_p)
_boolean = _bind("regoInputBoolean", _STATUS, _POINTER, ctypes.c_bool)
_null = _bind("regoInputNull", _STATUS, _POINTER)
_item = _bind("regoInputObjectItem", _STATUS, _POINTER)
_object = _bind("regoInputObject", _STATUS, _POINTER, ctypes.c_uint32)
_array = _bind("regoInputArray", _STATUS, _POINTER, ctypes.c_uint32)
_set = _bind("regoInputSet", _STATUS, _POINTER, ctypes.c_uint32)
_set_input = _bind("regoSetInput", _STATUS, _POINTER, _POINTER)

OK = 0
_INT_MIN, _INT_MAX = -(2**63), 2**63 - 1


class InputError(ValueError):
    """rego-cpp refused the input (its status code is in the message)."""


def _builder(handle: int) -> Callable[[Any], None]:
    """``add(value)``: push one value (and everything under it) onto the input's stack."""

    def add(value: Any) -> None:
        kind = type(value)
        if kind is str:
            _string(handle, value.encode("utf-8"))
        elif kind is dict:
            for key, item in value.items():
                add(key)
                add(item)
                _item(handle)
            _object(handle, len(value))
        elif kind is int:
            _int(handle, value) if _INT_MIN <= value <= _INT_MAX else _float(handle, value)
        elif kind is bool:
            _boolean(handle, value)
        elif value is None:
            _null(handle)
        elif kind is list or kind is tuple:
            for item in value:
                add(item)
            _array(handle, len(value))
        elif kind is float:
            _float(handle, value)
        else:
            add_other(value)

    def add_other(value: Any) -> None:
        """Subclasses and other containers, checked in regopy's order."""
        if value is True or value is False:
            _boolean(handle, value)
        elif isinstance(value, int):
            _int(handle, value) if _INT_MIN <= value <= _INT_MAX else _float(handle, value)
        elif isinstance(value, float):
            _float(handle, value)
        elif isinstance(value, str):
            _string(handle, value.encode("utf-8"))
        elif isinstance(value, Set):
            for item in value:
                add(item)
            _set(handle, len(value))
        elif isinstance(value, Mapping):
            for key, item in value.items():
                add(key)
                add(item)
                _item(handle)
            _object(handle, len(value))
        elif isinstance(value, Sequence):
            for item in value:
                add(item)
            _array(handle, len(value))
        else:
            raise ValueError(f"Cannot convert object of type {type(value)} to rego input")

    return add


def new_input(value: Any) -> int:
    """A new rego-cpp input holding ``value``; the caller must ``free_input`` it."""
    handle = _new()
    try:
        _builder(handle)(value)
        status = _validate(handle)
        if status != OK:
            raise InputError(f"rego-cpp refused the input (status {status})")
    except BaseException:
        _free(handle)
        raise
    return int(handle)


def free_input(handle: int) -> None:
    _free(handle)


@contextmanager
def built_input(value: Any) -> Iterator[int]:
    """``new_input`` freed when the block ends, however it ends."""
    handle = new_input(value)
    try:
        yield handle
    finally:
        _free(handle)


def set_input(interpreter: int, value: Any) -> None:
    """Replace the interpreter's input with ``value`` (rego-cpp copies it: ours is freed)."""
    with built_input(value) as handle:
        if _set_input(interpreter, handle) != OK:
            raise InputError(f"rego-cpp refused the input: {rs.rego_get_error(interpreter)}")
