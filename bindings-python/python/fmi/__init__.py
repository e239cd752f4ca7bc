"""fmi: MPI-style message passing between serverless functions and HPC jobs.

The API follows mpi4py's conventions::

    import numpy as np
    import fmi

    comm = fmi.Communicator.from_env()          # FMI_RANK, FMI_SIZE, FMI_JOB, ... (fmi run)
    total = comm.allreduce(comm.rank + 1)       # lowercase: any picklable object
    data = np.arange(4.0) * comm.rank
    out = np.empty_like(data)
    comm.Allreduce(data, out, op=fmi.SUM)       # uppercase: buffers, no copies
    comm.barrier()

- Lowercase methods (``send``, ``recv``, ``bcast``, ``gather``, ``scatter``, ``allgather``,
  ``alltoall``, ``reduce``, ``allreduce``, ``scan``, ``exscan``, ``barrier``, ...) move any
  picklable object; reductions apply the op to the objects in rank order.
- Uppercase methods (``Send``, ``Recv``, ``Bcast``, ``Gather``, ``Scatter``, ``Allgather``,
  ``Alltoall``, ``Reduce``, ``Allreduce``, ``Reduce_scatter_block``, ``Scan``, ``Exscan``,
  ``Isend``, ``Irecv``) move numpy arrays or any C-contiguous buffer-protocol object in place;
  the element type comes from the buffer (bool, int8...int64, uint8...uint64, float32,
  float64).
- Ops: ``fmi.SUM, PROD, MIN, MAX, LAND, LOR, LXOR, BAND, BOR, BXOR``, or any callable
  ``f(a, b)`` returning ``a op b`` where ``a`` comes from the lower ranks (``fmi.Op(f,
  commute=True)`` lets fmi reorder). For uppercase methods ``f`` gets numpy arrays and must be
  element-wise.
- Every call has a deadline (60 s by default, ``set_deadline``); errors are ``fmi.Error``
  subclasses (``fmi.TimeoutError``, ``fmi.PeerLostError``, ...) with fmi's message. The GIL is
  released while a call waits, so other Python threads keep running.
"""

from __future__ import annotations

import functools
import operator
import pickle
from collections.abc import Callable, Sequence
from typing import Any, Union

from . import _fmi
from ._errors import (
    BootstrapError,
    ClosedError,
    ConfigError,
    CountMismatchError,
    Error,
    InvalidArgumentError,
    InvalidRankError,
    IoError,
    NestedRuntimeError,
    PeerLostError,
    TimeoutError,
    TooLargeError,
    TypeMismatchError,
    UnsupportedOpError,
)

__version__: str = _fmi.__version__

Op = _fmi.Op
SUM: Op = _fmi.SUM
PROD: Op = _fmi.PROD
MIN: Op = _fmi.MIN
MAX: Op = _fmi.MAX
LAND: Op = _fmi.LAND
LOR: Op = _fmi.LOR
LXOR: Op = _fmi.LXOR
BAND: Op = _fmi.BAND
BOR: Op = _fmi.BOR
BXOR: Op = _fmi.BXOR

#: An object supporting the buffer protocol: a numpy array, bytearray, array.array, memoryview.
Buffer = Any
#: A reduction: a built-in op, an ``fmi.Op`` or a callable ``f(a, b) -> a op b``.
OpLike = Union[Op, Callable[[Any, Any], Any]]


class _InPlace:
    __slots__ = ()

    def __repr__(self) -> str:
        return "fmi.IN_PLACE"


#: Pass as ``sendbuf`` of ``Allreduce``, ``Reduce`` (at the root), ``Scan`` or ``Exscan`` to
#: take the input from ``recvbuf`` and overwrite it with the result.
IN_PLACE = _InPlace()

__all__ = [
    "Communicator",
    "Request",
    "Op",
    "local_world",
    "IN_PLACE",
    "SUM",
    "PROD",
    "MIN",
    "MAX",
    "LAND",
    "LOR",
    "LXOR",
    "BAND",
    "BOR",
    "BXOR",
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

_PROTOCOL = pickle.HIGHEST_PROTOCOL

# The built-in ops on Python objects, as mpi4py applies them.
_OBJECT_OPS: dict[str, Callable[[Any, Any], Any]] = {
    "sum": operator.add,
    "prod": operator.mul,
    "min": min,
    "max": max,
    "land": lambda a, b: a and b,
    "lor": lambda a, b: a or b,
    "lxor": lambda a, b: bool(a) != bool(b),
    "band": operator.and_,
    "bor": operator.or_,
    "bxor": operator.xor,
}


def _dumps(obj: Any) -> bytes:
    return pickle.dumps(obj, protocol=_PROTOCOL)


def _object_fn(op: OpLike) -> Callable[[Any, Any], Any]:
    if isinstance(op, Op):
        if op.function is not None:
            return op.function
        return _OBJECT_OPS[op.name]
    if callable(op):
        return op
    raise InvalidArgumentError(f"op {op!r} is neither an fmi.Op nor a callable f(a, b)")


def _buffer_op(op: OpLike) -> Op:
    if isinstance(op, Op):
        return op
    if callable(op):
        return Op(op, commute=False)
    raise InvalidArgumentError(f"op {op!r} is neither an fmi.Op nor a callable f(a, b)")


def _fold(op: OpLike, objs: Sequence[Any]) -> Any:
    return functools.reduce(_object_fn(op), objs)


def _sendbuf(buf: Buffer) -> Buffer | None:
    return None if buf is IN_PLACE else buf


class Request:
    """A pending ``isend``/``irecv``/``Isend``/``Irecv``.

    ``wait()`` blocks (with the GIL released) until the operation completes and returns its
    result: ``None`` for sends, the received object for ``irecv``, the number of elements
    received for ``Irecv``. ``test()`` returns ``(done, result)`` without blocking.
    """

    __slots__ = ("_native", "_decode")

    def __init__(self, native: _fmi.Request, decode: bool = False) -> None:
        self._native = native
        self._decode = decode

    def wait(self) -> Any:
        """Blocks until the operation completes and returns its result."""
        result = self._native.wait()
        return pickle.loads(result) if self._decode else result

    def test(self) -> tuple[bool, Any]:
        """``(True, result)`` if the operation completed, else ``(False, None)``."""
        done, result = self._native.test()
        if done and self._decode:
            result = pickle.loads(result)
        return done, result

    @property
    def done(self) -> bool:
        """Whether ``wait()`` or a successful ``test()`` already returned the result."""
        return self._native.done

    def __repr__(self) -> str:
        return f"fmi.Request(done={self.done})"


class Communicator:
    """This process's membership of one fmi job (MPI's ``COMM_WORLD``).

    ``Communicator(rank, size, job, config=None, rendezvous=None, token=None, channel=None)``
    joins job ``job`` as ``rank`` of ``size`` with explicit settings (a Lambda handler gets them
    in its event); ``Communicator.from_env()`` reads them from the ``FMI_*`` variables that
    ``fmi run`` sets. Both block until every rank has joined.

    As in MPI, every rank calls the collectives in the same order with matching arguments.
    A communicator may be used from several threads.
    """

    __slots__ = ("_comm",)

    def __init__(
        self,
        rank: int,
        size: int,
        job: str,
        config: str | None = None,
        rendezvous: str | None = None,
        token: str | None = None,
        channel: str | None = None,
    ) -> None:
        self._comm = _fmi.Comm(rank, size, job, config, rendezvous, token, channel)

    @classmethod
    def _wrap(cls, native: _fmi.Comm) -> Communicator:
        self = cls.__new__(cls)
        self._comm = native
        return self

    @classmethod
    def from_env(cls) -> Communicator:
        """Joins the job described by ``FMI_RANK``, ``FMI_SIZE``, ``FMI_JOB``,
        ``FMI_RENDEZVOUS``, ``FMI_TOKEN``, ``FMI_CONFIG`` and ``FMI_CHANNEL``."""
        return cls._wrap(_fmi.Comm.from_env())

    @property
    def rank(self) -> int:
        """This process's rank, ``0 <= rank < size``."""
        return self._comm.rank

    @property
    def size(self) -> int:
        """The number of ranks."""
        return self._comm.size

    @property
    def job(self) -> str:
        """The job id."""
        return self._comm.job

    @property
    def channel(self) -> str:
        """The name of the channel messages travel on (``"tcp"``, ``"memory"``, ...)."""
        return self._comm.channel

    @property
    def deadline(self) -> float:
        """Seconds any call waits for a peer before raising ``fmi.TimeoutError``."""
        return self._comm.deadline

    def set_deadline(self, seconds: float) -> None:
        """Sets the deadline of every later call (default 60 s or the configuration's)."""
        self._comm.set_deadline(seconds)

    def Get_rank(self) -> int:  # noqa: N802 - mpi4py name
        """mpi4py spelling of ``rank``."""
        return self._comm.rank

    def Get_size(self) -> int:  # noqa: N802 - mpi4py name
        """mpi4py spelling of ``size``."""
        return self._comm.size

    def __repr__(self) -> str:
        return repr(self._comm)

    # ------------------------------------------------------------------ objects (pickle)

    def send(self, obj: Any, dest: int, tag: int = 0) -> None:
        """Sends a picklable object to ``dest``. Messages to one rank with one tag arrive in
        the order sent."""
        self._comm.send_bytes(_dumps(obj), dest, tag)

    def recv(self, source: int, tag: int = 0) -> Any:
        """Receives the next object ``source`` sent with ``tag``."""
        return pickle.loads(self._comm.recv_bytes(source, tag))

    def sendrecv(self, sendobj: Any, dest: int, source: int, sendtag: int = 0,
                 recvtag: int = 0) -> Any:
        """Sends to ``dest`` and receives from ``source`` at once (no deadlock in exchanges)."""
        return pickle.loads(self._comm.sendrecv_bytes(_dumps(sendobj), dest, source, sendtag,
                                                      recvtag))

    def isend(self, obj: Any, dest: int, tag: int = 0) -> Request:
        """Starts sending ``obj`` (pickled now); ``wait()`` returns ``None``."""
        return Request(self._comm.isend_bytes(_dumps(obj), dest, tag))

    def irecv(self, source: int, tag: int = 0) -> Request:
        """Starts receiving an object; ``wait()`` returns it."""
        return Request(self._comm.irecv_bytes(source, tag), decode=True)

    def barrier(self) -> None:
        """Returns once every rank has called ``barrier``."""
        self._comm.barrier()

    def bcast(self, obj: Any = None, root: int = 0) -> Any:
        """Returns root's ``obj`` on every rank (other ranks' ``obj`` is ignored)."""
        data = _dumps(obj) if self.rank == root else None
        return pickle.loads(self._comm.bcast_bytes(data, root))

    def gather(self, sendobj: Any, root: int = 0) -> list[Any] | None:
        """Root gets the list of every rank's object, in rank order; others get ``None``."""
        parts = self._comm.gather_bytes(_dumps(sendobj), root)
        return None if parts is None else [pickle.loads(p) for p in parts]

    def scatter(self, sendobj: Sequence[Any] | None = None, root: int = 0) -> Any:
        """Root passes one object per rank; rank r gets ``sendobj[r]``."""
        parts = None
        if self.rank == root:
            if sendobj is None:
                raise InvalidArgumentError("scatter: the root must pass one object per rank")
            parts = [_dumps(o) for o in sendobj]
        return pickle.loads(self._comm.scatter_bytes(parts, root))

    def allgather(self, sendobj: Any) -> list[Any]:
        """Every rank gets the list of every rank's object, in rank order."""
        return [pickle.loads(p) for p in self._comm.allgather_bytes(_dumps(sendobj))]

    def alltoall(self, sendobj: Sequence[Any]) -> list[Any]:
        """``sendobj[d]`` goes to rank d; returns what each rank sent here, by source rank."""
        parts = self._comm.alltoall_bytes([_dumps(o) for o in sendobj])
        return [pickle.loads(p) for p in parts]

    def reduce(self, sendobj: Any, op: OpLike = SUM, root: int = 0) -> Any:
        """Root gets ``x0 op x1 op ... op x(size-1)``; others get ``None``."""
        objs = self.gather(sendobj, root)
        return None if objs is None else _fold(op, objs)

    def allreduce(self, sendobj: Any, op: OpLike = SUM) -> Any:
        """Every rank gets ``x0 op x1 op ... op x(size-1)``."""
        return _fold(op, self.allgather(sendobj))

    def scan(self, sendobj: Any, op: OpLike = SUM) -> Any:
        """Rank r gets ``x0 op ... op xr``."""
        return _fold(op, self.allgather(sendobj)[: self.rank + 1])

    def exscan(self, sendobj: Any, op: OpLike = SUM) -> Any:
        """Rank r > 0 gets ``x0 op ... op x(r-1)``; rank 0 gets ``None``."""
        objs = self.allgather(sendobj)[: self.rank]
        return _fold(op, objs) if objs else None

    # ------------------------------------------------------------------ buffers

    def Send(self, buf: Buffer, dest: int, tag: int = 0) -> None:  # noqa: N802
        """Sends the contents of a buffer (numpy array, bytearray, ...)."""
        self._comm.send_buf(buf, dest, tag)

    def Recv(self, buf: Buffer, source: int, tag: int = 0) -> int:  # noqa: N802
        """Receives into a writable buffer; returns the number of elements received. A longer
        message raises ``CountMismatchError``, one of another element size
        ``TypeMismatchError``."""
        return self._comm.recv_buf(buf, source, tag)

    def Sendrecv(self, sendbuf: Buffer, dest: int, recvbuf: Buffer, source: int,  # noqa: N802
                 sendtag: int = 0, recvtag: int = 0) -> int:
        """Sends ``sendbuf`` to ``dest`` while receiving into ``recvbuf`` from ``source``;
        returns the number of elements received."""
        return self._comm.sendrecv_buf(sendbuf, dest, recvbuf, source, sendtag, recvtag)

    def Isend(self, buf: Buffer, dest: int, tag: int = 0) -> Request:  # noqa: N802
        """Starts sending a copy of the buffer (which may be reused at once)."""
        return Request(self._comm.isend_buf(buf, dest, tag))

    def Irecv(self, buf: Buffer, source: int, tag: int = 0) -> Request:  # noqa: N802
        """Starts receiving into ``buf``, which is written when the request completes and is
        kept alive until then; ``wait()`` returns the number of elements received."""
        return Request(self._comm.irecv_buf(buf, source, tag))

    def Bcast(self, buf: Buffer, root: int = 0) -> None:  # noqa: N802
        """Copies root's buffer into every rank's buffer (all of the same length)."""
        self._comm.bcast_buf(buf, root)

    def Gather(self, sendbuf: Buffer, recvbuf: Buffer | None = None,  # noqa: N802
               root: int = 0) -> None:
        """Root's ``recvbuf`` (``size * len(sendbuf)`` elements) gets every rank's ``sendbuf``
        in rank order; ``recvbuf`` is ignored elsewhere."""
        self._comm.gather_buf(sendbuf, recvbuf, root)

    def Scatter(self, sendbuf: Buffer | None, recvbuf: Buffer,  # noqa: N802
                root: int = 0) -> None:
        """Root's ``sendbuf`` holds ``size`` blocks of ``len(recvbuf)`` elements; rank r gets
        block r. ``sendbuf`` is ignored (may be ``None``) elsewhere."""
        self._comm.scatter_buf(sendbuf, recvbuf, root)

    def Allgather(self, sendbuf: Buffer, recvbuf: Buffer) -> None:  # noqa: N802
        """``recvbuf`` (``size * len(sendbuf)`` elements) gets every rank's ``sendbuf``."""
        self._comm.allgather_buf(sendbuf, recvbuf)

    def Alltoall(self, sendbuf: Buffer, recvbuf: Buffer) -> None:  # noqa: N802
        """``sendbuf`` holds ``size`` equal blocks, block d going to rank d; ``recvbuf`` gets
        the blocks sent here in source-rank order."""
        self._comm.alltoall_buf(sendbuf, recvbuf)

    def Reduce(self, sendbuf: Buffer, recvbuf: Buffer | None = None,  # noqa: N802
               op: OpLike = SUM, root: int = 0) -> None:
        """Root's ``recvbuf`` gets the element-wise reduction of every rank's ``sendbuf``
        (``sendbuf`` may be ``IN_PLACE`` at the root)."""
        self._comm.reduce_buf(_sendbuf(sendbuf), recvbuf, _buffer_op(op), root)

    def Allreduce(self, sendbuf: Buffer, recvbuf: Buffer, op: OpLike = SUM) -> None:  # noqa: N802
        """Every rank's ``recvbuf`` gets the element-wise reduction (``sendbuf`` may be
        ``IN_PLACE``)."""
        self._comm.allreduce_buf(_sendbuf(sendbuf), recvbuf, _buffer_op(op))

    def Reduce_scatter_block(self, sendbuf: Buffer, recvbuf: Buffer,  # noqa: N802
                             op: OpLike = SUM) -> None:
        """``sendbuf`` holds ``size`` blocks of ``len(recvbuf)`` elements; rank r's
        ``recvbuf`` gets block r of the element-wise reduction."""
        self._comm.reduce_scatter_block_buf(sendbuf, recvbuf, _buffer_op(op))

    def Scan(self, sendbuf: Buffer, recvbuf: Buffer, op: OpLike = SUM) -> None:  # noqa: N802
        """Rank r's ``recvbuf`` gets ``x0 op ... op xr`` (``sendbuf`` may be ``IN_PLACE``)."""
        self._comm.scan_buf(_sendbuf(sendbuf), recvbuf, _buffer_op(op), False)

    def Exscan(self, sendbuf: Buffer, recvbuf: Buffer, op: OpLike = SUM) -> None:  # noqa: N802
        """Rank r > 0's ``recvbuf`` gets ``x0 op ... op x(r-1)``; rank 0's is not touched."""
        self._comm.scan_buf(_sendbuf(sendbuf), recvbuf, _buffer_op(op), True)


def local_world(size: int) -> list[Communicator]:
    """The ``size`` communicators of an in-process job over the memory channel (index = rank),
    for tests and experiments: drive each from its own thread."""
    return [Communicator._wrap(c) for c in _fmi.Comm.local_world(size)]
