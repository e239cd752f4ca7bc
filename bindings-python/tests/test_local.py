"""In-process tests over ``fmi.local_world`` (one thread per rank): argument checks, errors,
the GIL, requests."""

from __future__ import annotations

import array
import threading
import time

import numpy as np
import pytest

import fmi


def run_ranks(world, fn, timeout: float = 30):
    """Runs ``fn(comm)`` on every rank in its own thread; returns the results by rank and
    re-raises the first exception."""
    results: list = [None] * len(world)
    errors: list = [None] * len(world)

    def body(c):
        try:
            results[c.rank] = fn(c)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors[c.rank] = e

    threads = [threading.Thread(target=body, args=(c,)) for c in world]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), "a rank did not finish"
    for e in errors:
        if e is not None:
            raise e
    return results


def test_module_surface() -> None:
    assert fmi.__version__
    for name in ["SUM", "PROD", "MIN", "MAX", "LAND", "LOR", "LXOR", "BAND", "BOR", "BXOR"]:
        op = getattr(fmi, name)
        assert isinstance(op, fmi.Op) and op.name == name.lower() and op.commute
        assert repr(op) == f"fmi.{name}"
    user = fmi.Op(lambda a, b: a, commute=True)
    assert user.name is None and user.commute and callable(user.function)
    with pytest.raises(fmi.InvalidArgumentError):
        fmi.Op(42)


def test_exception_hierarchy() -> None:
    for cls, builtin in [
        (fmi.TimeoutError, TimeoutError),
        (fmi.PeerLostError, ConnectionError),
        (fmi.InvalidRankError, ValueError),
        (fmi.TypeMismatchError, TypeError),
        (fmi.CountMismatchError, ValueError),
        (fmi.UnsupportedOpError, TypeError),
        (fmi.InvalidArgumentError, ValueError),
        (fmi.BootstrapError, ConnectionError),
        (fmi.IoError, OSError),
    ]:
        assert issubclass(cls, fmi.Error) and issubclass(cls, builtin), cls
    assert issubclass(fmi.ConfigError, fmi.Error)


def test_constructor_errors(monkeypatch) -> None:
    with pytest.raises(fmi.InvalidRankError, match="rank 4 is not in this job of 4 ranks"):
        fmi.Communicator(4, 4, "job")
    with pytest.raises(fmi.InvalidRankError):
        fmi.Communicator(-1, 4, "job")
    with pytest.raises(fmi.InvalidArgumentError, match="size 0"):
        fmi.Communicator(0, 0, "job")
    with pytest.raises(fmi.ConfigError, match="job id"):
        fmi.Communicator(0, 1, "no/slashes")
    with pytest.raises(fmi.ConfigError):
        fmi.Communicator(0, 1, "job", config="/nonexistent/fmi.toml")
    for var in ["FMI_RANK", "FMI_SIZE", "FMI_JOB"]:
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(fmi.ConfigError, match="FMI_"):
        fmi.Communicator.from_env()
    with pytest.raises(fmi.InvalidArgumentError):
        fmi.local_world(0)


def test_single_rank_job_needs_no_server() -> None:
    comm = fmi.Communicator(0, 1, "solo")
    assert (comm.rank, comm.size, comm.job) == (0, 1, "solo")
    assert comm.Get_rank() == 0 and comm.Get_size() == 1
    assert comm.allreduce(5) == 5
    out = np.zeros(3)
    comm.Allreduce(np.arange(3.0), out)
    assert out.tolist() == [0.0, 1.0, 2.0]
    assert "rank=0, size=1" in repr(comm)


def test_buffer_arguments_are_checked() -> None:
    (comm,) = fmi.local_world(1)
    out = np.zeros(4)
    with pytest.raises(fmi.InvalidArgumentError, match="buffer protocol"):
        comm.Allreduce([1.0, 2.0], out)
    with pytest.raises(fmi.InvalidArgumentError, match="not C-contiguous"):
        comm.Allreduce(np.zeros(8)[::2], out)
    with pytest.raises(fmi.InvalidArgumentError, match="read-only"):
        comm.Allreduce(np.zeros(4), b"\0" * 32)
    with pytest.raises(fmi.InvalidArgumentError, match="format"):
        comm.Allreduce(np.zeros(4, dtype=np.float16), np.zeros(4, dtype=np.float16))
    with pytest.raises(fmi.InvalidArgumentError, match="format"):
        comm.Send(np.zeros(2, dtype=np.complex128), 0)
    with pytest.raises(fmi.InvalidArgumentError, match="float64 but recvbuf holds int64"):
        comm.Allreduce(np.zeros(4), np.zeros(4, dtype=np.int64))
    with pytest.raises(fmi.CountMismatchError):
        comm.Allreduce(np.zeros(4), np.zeros(5))
    with pytest.raises(fmi.CountMismatchError):
        comm.Allgather(np.zeros(2), np.zeros(3))
    with pytest.raises(fmi.InvalidArgumentError, match="required at the root"):
        comm.Gather(np.zeros(2), None, root=0)
    with pytest.raises(fmi.UnsupportedOpError):
        comm.Allreduce(np.zeros(2), np.zeros(2), op=fmi.BXOR)
    with pytest.raises(fmi.UnsupportedOpError):
        comm.Allreduce(np.zeros(2, dtype=bool), np.zeros(2, dtype=bool), op=fmi.SUM)
    with pytest.raises(fmi.InvalidArgumentError):
        comm.Allreduce(np.zeros(2), np.zeros(2), op="sum")
    with pytest.raises(fmi.InvalidRankError):
        comm.Bcast(out, root=1)
    with pytest.raises(fmi.InvalidArgumentError, match="tag -1"):
        comm.Send(out, 0, tag=-1)
    with pytest.raises(fmi.InvalidArgumentError):
        comm.set_deadline(0)
    # 2-D and other buffer kinds work when contiguous
    grid = np.arange(6, dtype=np.int32).reshape(2, 3)
    res = np.zeros_like(grid)
    comm.Allreduce(grid, res)
    assert (res == grid).all()
    arr = array.array("d", [1.0, 2.0])
    res2 = array.array("d", [0.0, 0.0])
    comm.Allreduce(arr, res2, op=fmi.MAX)
    assert list(res2) == [1.0, 2.0]


def test_the_gil_is_released_while_waiting() -> None:
    world = fmi.local_world(2)
    world[1].set_deadline(5)
    got = []
    receiver = threading.Thread(target=lambda: got.append(world[1].recv(0)))
    receiver.start()
    # The receiver blocks in recv; if it held the GIL this thread could not run at all.
    counter = 0
    deadline = time.monotonic() + 0.3
    while time.monotonic() < deadline:
        counter += 1
    world[0].send("late", 1)
    receiver.join(10)
    assert got == ["late"] and counter > 1000


def test_timeouts_and_mismatches_name_the_peer() -> None:
    world = fmi.local_world(2)

    def body(c):
        if c.rank == 0:
            c.Send(np.arange(3, dtype=np.int64), 1)
            c.barrier()
            return None
        with pytest.raises(fmi.CountMismatchError, match="from rank 0") as info:
            c.Recv(np.zeros(2, dtype=np.int64), 0)
        assert info.value.peer == 0
        c.barrier()
        c.set_deadline(0.2)
        assert c.deadline == pytest.approx(0.2)
        with pytest.raises(fmi.TimeoutError, match="waiting for rank 0") as info:
            c.recv(0, tag=7)
        assert info.value.peer == 0
        return True

    assert run_ranks(world, body)[1] is True


def test_requests_complete_once() -> None:
    world = fmi.local_world(2)

    def body(c):
        other = 1 - c.rank
        buf = np.zeros(4, dtype=np.uint16)
        rreq = c.Irecv(buf, other, tag=1)
        sreq = c.Isend(np.full(4, c.rank + 7, dtype=np.uint16), other, tag=1)
        assert rreq.wait() == 4 and rreq.done
        with pytest.raises(fmi.InvalidArgumentError, match="already completed"):
            rreq.wait()
        assert sreq.wait() is None
        oreq = c.irecv(other, tag=2)
        c.isend({"rank": c.rank}, other, tag=2).wait()
        while True:
            done, value = oreq.test()
            if done:
                return buf.tolist(), value

    results = run_ranks(world, body)
    assert results[0] == ([8] * 4, {"rank": 1})
    assert results[1] == ([7] * 4, {"rank": 0})


def test_user_op_errors_and_kept_arguments() -> None:
    world = fmi.local_world(2)
    kept = []

    def keeps(a, b):
        kept.append(b)  # harmless: user ops get copies they own
        return a + b

    def body(c):
        raised = False
        try:
            c.Allreduce(np.ones(3), np.zeros(3), op=lambda a, b: 1 / 0)
        except ZeroDivisionError as e:
            assert any("reduction function" in n for n in e.__notes__)
            raised = True
        out = np.zeros(3)
        c.Allreduce(np.full(3, c.rank + 1.0), out, op=keeps)
        assert out.tolist() == [3.0] * 3
        return raised, c.allreduce(c.rank)

    results = run_ranks(world, body)
    assert any(raised for raised, _ in results)
    assert [total for _, total in results] == [1, 1]
    assert kept and all(k.tolist() in ([1.0] * 3, [2.0] * 3) for k in kept)


def test_lowercase_ops_on_objects() -> None:
    world = fmi.local_world(3)

    def body(c):
        r = c.rank
        return (
            c.allreduce({r}, op=fmi.BOR),
            c.allreduce(r, op=fmi.MAX),
            c.reduce([r], op=lambda a, b: a + b, root=2),
            c.scan(r + 1, op=fmi.PROD),
            c.exscan(r + 1),
            c.allreduce(r, op=fmi.Op(lambda a, b: a * 10 + b)),
        )

    results = run_ranks(world, body)
    assert results[0] == ({0, 1, 2}, 2, None, 1, None, 12)
    assert results[1] == ({0, 1, 2}, 2, None, 2, 1, 12)
    assert results[2] == ({0, 1, 2}, 2, [0, 1, 2], 6, 3, 12)
