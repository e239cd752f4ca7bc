"""The exceptions fmi raises. Each also derives from the closest built-in exception, so
``except TimeoutError`` catches ``fmi.TimeoutError`` as well."""

from __future__ import annotations

import builtins

__all__ = [
    "Error",
    "TimeoutError",
    "PeerLostError",
    "TooLargeError",
    "InvalidRankError",
    "TypeMismatchError",
    "CountMismatchError",
    "UnsupportedOpError",
    "InvalidArgumentError",
    "ConfigError",
    "BootstrapError",
    "NestedRuntimeError",
    "ClosedError",
    "IoError",
]


class Error(Exception):
    """Base class of every fmi error. The message names the ranks involved and what to do;
    ``peer`` is the rank the error concerns, or ``None``."""

    peer: int | None = None


class TimeoutError(Error, builtins.TimeoutError):  # noqa: A001 - mirrors the Rust variant
    """A peer did not send or accept a message before the deadline."""


class PeerLostError(Error, ConnectionError):
    """A peer's process exited or its connection broke; the job cannot complete."""


class TooLargeError(Error, ValueError):
    """A message is larger than the channel can carry."""


class InvalidRankError(Error, ValueError):
    """A rank outside ``range(size)`` was given."""


class TypeMismatchError(Error, TypeError):
    """A received message is not a whole number of elements of the receive buffer's type."""


class CountMismatchError(Error, ValueError):
    """A message does not fit the buffer, or buffers or ranks have inconsistent lengths."""


class UnsupportedOpError(Error, TypeError):
    """A built-in reduction is not defined for the buffer's type (e.g. BAND on float64)."""


class InvalidArgumentError(Error, ValueError):
    """An argument is invalid: not a buffer, not contiguous, read-only, unsupported dtype..."""


class ConfigError(Error):
    """The job description is invalid: FMI_* variables, job id or configuration file."""


class BootstrapError(Error, ConnectionError):
    """Joining the job failed: rendezvous server unreachable or refusing, or peers missing."""


class NestedRuntimeError(Error, RuntimeError):
    """fmi was called from inside a tokio runtime, where blocking would deadlock."""


class ClosedError(Error):
    """The channel or request was closed."""


class IoError(Error, OSError):
    """An I/O error on a channel."""
