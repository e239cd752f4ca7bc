"""Calling Python reduction functions from inside fmi's buffer reductions."""

from __future__ import annotations

import traceback
from typing import Any, Callable


def apply_user_op(function: Callable[[Any, Any], Any], lhs: memoryview, inout: memoryview,
                  dtype: str) -> None:
    """Stores ``function(lhs, inout)`` into ``inout``.

    ``lhs`` and ``inout`` are memoryviews over fmi's own buffers, valid only during this call.
    The function gets numpy copies it owns (so keeping them is harmless); the views are
    released before returning.
    """
    error = _call(function, lhs, inout, dtype)
    lhs.release()
    inout.release()
    if error is not None:
        raise error


def _call(function: Callable[[Any, Any], Any], lhs: memoryview, inout: memoryview,
          dtype: str) -> BaseException | None:
    import numpy

    try:
        a = numpy.frombuffer(lhs, dtype=dtype).copy()
        b = numpy.frombuffer(inout, dtype=dtype).copy()
        result = function(a, b)
        out = numpy.frombuffer(inout, dtype=dtype)
        out[...] = result
        del out
        return None
    except BaseException as e:  # noqa: BLE001 - re-raised by apply_user_op
        # The traceback's frames may hold views of fmi's buffers: keep its text, drop frames.
        e.add_note(f"raised by the reduction function {function!r}:\n"
                   + "".join(traceback.format_exception(e)).rstrip())
        e.__context__ = None
        return e.with_traceback(None)
