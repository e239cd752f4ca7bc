"""Checks run on every rank of a job under ``fmi run -n N python suites.py SUITE...``.

Every rank can compute every other rank's data (seeded by rank), so each result is compared
with a numpy (or plain Python) reference computed locally. Prints ``rank R/N: SUITE ok`` per
suite; any mismatch raises, which makes the job fail.
"""

from __future__ import annotations

import functools
import operator
import sys

import numpy as np

import fmi

INTS = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64]
FLOATS = [np.float32, np.float64]
DTYPES = INTS + FLOATS + [np.bool_]
COUNTS = [0, 1, 7, 1000]

NP_OPS = {
    "SUM": np.add,
    "PROD": np.multiply,
    "MIN": np.minimum,
    "MAX": np.maximum,
    "LAND": lambda a, b: np.logical_and(a, b),
    "LOR": lambda a, b: np.logical_or(a, b),
    "LXOR": lambda a, b: np.logical_xor(a, b),
    "BAND": np.bitwise_and,
    "BOR": np.bitwise_or,
    "BXOR": np.bitwise_xor,
}


def ops_for(dtype) -> list[str]:
    if dtype in FLOATS:
        return ["SUM", "PROD", "MIN", "MAX"]
    if dtype is np.bool_:
        return [op for op in NP_OPS if op != "SUM"]
    return list(NP_OPS)


def data(rank: int, dtype, count: int, salt: int, op: str = "SUM") -> np.ndarray:
    """Rank ``rank``'s deterministic input."""
    rng = np.random.default_rng([salt, rank, count])
    if dtype is np.bool_:
        return rng.integers(0, 2, count).astype(bool)
    if op == "PROD":  # products stay exact (floats) and small
        values = [1, 2] if np.issubdtype(dtype, np.unsignedinteger) else [1, 2, -1]
        return rng.choice(values, count).astype(dtype)
    if op in ("LAND", "LOR", "LXOR"):
        return rng.integers(0, 3, count).astype(dtype)
    low = 0 if np.issubdtype(dtype, np.unsignedinteger) else -20
    return rng.integers(low, 21, count).astype(dtype)


def reference(op: str, arrays: list[np.ndarray], dtype) -> np.ndarray:
    with np.errstate(over="ignore"):
        return functools.reduce(NP_OPS[op], arrays).astype(dtype)


def check(got: np.ndarray, want: np.ndarray, what: str) -> None:
    if got.dtype != want.dtype or got.shape != want.shape or not np.array_equal(got, want):
        raise AssertionError(f"{what}: got {got!r}, want {want!r}")


def suite_p2p(comm: fmi.Communicator) -> None:
    r, p = comm.rank, comm.size
    right, left = (r + 1) % p, (r - 1) % p
    # objects
    assert comm.sendrecv({"from": r, "list": list(range(r))}, right, left) == {
        "from": left, "list": list(range(left))}
    if r == 0:
        comm.send(("tuple", 1.5, None), 1, tag=3)
        comm.send(b"", 1, tag=3)
    elif r == 1:
        assert comm.recv(0, tag=3) == ("tuple", 1.5, None)
        assert comm.recv(0, tag=3) == b""
    req = comm.irecv(left, tag=4)
    comm.isend([r] * 3, right, tag=4).wait()
    assert req.wait() == [left] * 3 and req.done
    # buffers of every type
    for dtype in DTYPES:
        out = data(r, dtype, 9, 1)
        got = np.zeros(9, dtype=dtype)
        assert comm.Sendrecv(out, right, got, left) == 9
        check(got, data(left, dtype, 9, 1), f"Sendrecv {dtype}")
    if r == 0:
        comm.Send(np.arange(5, dtype=np.int32), 1, tag=5)
        comm.Send(np.zeros(0, dtype=np.int32), 1, tag=5)
        comm.Send(bytearray(b"hello"), 1, tag=5)
    elif r == 1:
        buf = np.full(8, -1, dtype=np.int32)
        assert comm.Recv(buf, 0, tag=5) == 5
        check(buf, np.array([0, 1, 2, 3, 4, -1, -1, -1], dtype=np.int32), "Recv")
        assert comm.Recv(buf, 0, tag=5) == 0
        raw = bytearray(5)
        assert comm.Recv(raw, 0, tag=5) == 5 and raw == b"hello"
    # Isend/Irecv, completed by polling test()
    send = np.arange(6, dtype=np.float64) + r
    recv = np.zeros(6, dtype=np.float64)
    rreq = comm.Irecv(recv, left, tag=6)
    sreq = comm.Isend(send, right, tag=6)
    send[:] = -1  # Isend copied the buffer
    done, n = rreq.test()
    while not done:
        done, n = rreq.test()
    assert n == 6 and rreq.done
    check(recv, np.arange(6, dtype=np.float64) + left, "Irecv")
    assert sreq.wait() is None


def suite_objects(comm: fmi.Communicator) -> None:
    r, p = comm.rank, comm.size
    objs = [{"rank": s, "text": "x" * s} for s in range(p)]
    assert comm.bcast(objs[r] if r == p - 1 else None, root=p - 1) == objs[p - 1]
    gathered = comm.gather(objs[r], root=1 % p)
    assert gathered == (objs if r == 1 % p else None)
    assert comm.scatter([o["rank"] * 10 for o in objs] if r == 0 else None, root=0) == r * 10
    assert comm.allgather(r * r) == [s * s for s in range(p)]
    assert comm.alltoall([(r, d) for d in range(p)]) == [(s, r) for s in range(p)]
    assert comm.reduce(r + 1, op=fmi.SUM, root=0) == (p * (p + 1) // 2 if r == 0 else None)
    values = [s + 2 for s in range(p)]
    for name, fn in fmi._OBJECT_OPS.items():
        op = getattr(fmi, name.upper())
        assert comm.allreduce(values[r], op=op) == functools.reduce(fn, values), name
    # a non-commutative callable keeps rank order; numpy arrays are objects too
    assert comm.allreduce([r], op=operator.add) == list(range(p))
    assert comm.allreduce("ab"[r % 2], op=lambda a, b: a + b) == "".join("ab"[s % 2] for s in range(p))
    arr = comm.allreduce(np.full(3, r), op=fmi.SUM)
    check(arr, np.full(3, p * (p - 1) // 2), "allreduce of arrays")
    assert comm.scan([r], op=operator.add) == list(range(r + 1))
    assert comm.exscan(r + 1) == (None if r == 0 else r * (r + 1) // 2)
    comm.barrier()


def suite_buffers(comm: fmi.Communicator) -> None:
    r, p = comm.rank, comm.size
    for dtype in DTYPES:
        for count in COUNTS:
            name = f"{np.dtype(dtype).name} x{count}"
            root = count % p
            # Bcast
            buf = data(root, dtype, count, 2) if r == root else np.zeros(count, dtype=dtype)
            comm.Bcast(buf, root=root)
            check(buf, data(root, dtype, count, 2), f"Bcast {name}")
            # Gather
            mine = data(r, dtype, count, 3)
            everyone = np.concatenate([data(s, dtype, count, 3) for s in range(p)])
            out = np.zeros(count * p, dtype=dtype) if r == root else None
            comm.Gather(mine, out, root=root)
            if r == root:
                check(out, everyone, f"Gather {name}")
            # Scatter
            got = np.zeros(count, dtype=dtype)
            comm.Scatter(everyone if r == root else None, got, root=root)
            check(got, data(r, dtype, count, 3), f"Scatter {name}")
            # Allgather
            out = np.zeros(count * p, dtype=dtype)
            comm.Allgather(mine, out)
            check(out, everyone, f"Allgather {name}")
            # Alltoall: block d of rank s is data(s)[...] offset by d
            blocks = np.concatenate([data(r, dtype, count, 4 + d) for d in range(p)])
            out = np.zeros(count * p, dtype=dtype)
            comm.Alltoall(blocks, out)
            check(out, np.concatenate([data(s, dtype, count, 4 + r) for s in range(p)]),
                  f"Alltoall {name}")
            # reductions
            for op in ops_for(dtype):
                what = f"{op} {name}"
                fop = getattr(fmi, op)
                inputs = [data(s, dtype, count, 5, op) for s in range(p)]
                want = reference(op, inputs, dtype)
                out = np.zeros(count, dtype=dtype)
                comm.Allreduce(inputs[r], out, op=fop)
                check(out, want, f"Allreduce {what}")
                out = np.zeros(count, dtype=dtype)
                comm.Reduce(inputs[r], out if r == root else None, op=fop, root=root)
                if r == root:
                    check(out, want, f"Reduce {what}")
                out = np.zeros(count, dtype=dtype)
                comm.Scan(inputs[r], out, op=fop)
                check(out, reference(op, inputs[: r + 1], dtype), f"Scan {what}")
                out = np.full(count, 1, dtype=dtype)
                comm.Exscan(inputs[r], out, op=fop)
                want_ex = reference(op, inputs[:r], dtype) if r > 0 else np.full(count, 1, dtype=dtype)
                check(out, want_ex, f"Exscan {what}")
                blocks = [data(s, dtype, count * p, 6, op) for s in range(p)]
                out = np.zeros(count, dtype=dtype)
                comm.Reduce_scatter_block(blocks[r], out, op=fop)
                check(out, reference(op, blocks, dtype)[r * count:(r + 1) * count],
                      f"Reduce_scatter_block {what}")
    # in place
    buf = np.arange(4, dtype=np.int64) * (r + 1)
    comm.Allreduce(fmi.IN_PLACE, buf)
    check(buf, np.arange(4, dtype=np.int64) * (p * (p + 1) // 2), "Allreduce IN_PLACE")
    buf = np.full(2, r + 1, dtype=np.int32)
    comm.Scan(fmi.IN_PLACE, buf)
    check(buf, np.full(2, (r + 1) * (r + 2) // 2, dtype=np.int32), "Scan IN_PLACE")
    # the same array as input and output
    buf = np.full(3, r, dtype=np.float64)
    comm.Allreduce(buf, buf, op=fmi.MAX)
    check(buf, np.full(3, p - 1, dtype=np.float64), "Allreduce aliased")
    # other buffer types: bytearray and memoryview slices
    raw = bytearray([r]) * 4
    out = bytearray(4)
    comm.Allreduce(raw, out, op=fmi.BOR)
    assert out == bytearray([functools.reduce(operator.or_, range(p))]) * 4
    big = np.zeros(10, dtype=np.int16)
    comm.Allreduce(np.ones(5, dtype=np.int16), memoryview(big)[2:7])
    check(big, np.array([0, 0] + [p] * 5 + [0, 0, 0], dtype=np.int16), "memoryview slice")


def concat_digits(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a . b in decimal: associative, not commutative."""
    scale = np.ones_like(b)
    rest = b.copy()
    while (rest > 0).any():
        scale[rest > 0] *= 10
        rest //= 10
    return a * scale + b


def suite_userops(comm: fmi.Communicator) -> None:
    r, p = comm.rank, comm.size
    digits = [np.full(300, s + 1, dtype=np.int64) for s in range(p)]  # 2400 B: large algorithms
    want = functools.reduce(concat_digits, digits)
    for op in (concat_digits, fmi.Op(concat_digits)):
        out = np.zeros(300, dtype=np.int64)
        comm.Allreduce(digits[r], out, op=op)
        check(out, want, "Allreduce non-commutative")
        out = np.zeros(300, dtype=np.int64)
        comm.Reduce(digits[r], out if r == 0 else None, op=op, root=0)
        if r == 0:
            check(out, want, "Reduce non-commutative")
        out = np.zeros(300, dtype=np.int64)
        comm.Scan(digits[r], out, op=op)
        check(out, functools.reduce(concat_digits, digits[: r + 1]), "Scan non-commutative")
        out = np.zeros(300, dtype=np.int64)
        comm.Exscan(digits[r], out, op=op)
        if r > 0:
            check(out, functools.reduce(concat_digits, digits[:r]), "Exscan non-commutative")
        blocks = [np.full(2 * p, s + 1, dtype=np.int64) for s in range(p)]
        out = np.zeros(2, dtype=np.int64)
        comm.Reduce_scatter_block(blocks[r], out, op=op)
        check(out, functools.reduce(concat_digits, blocks)[: 2], "Reduce_scatter_block non-commutative")
    # a commutative op over floats, any order
    vals = np.linspace(0, 1, 5000) * (r + 1)
    out = np.zeros_like(vals)
    comm.Allreduce(vals, out, op=fmi.Op(np.maximum, commute=True))
    check(out, np.linspace(0, 1, 5000) * p, "Allreduce commutative user op")
    # a function that raises: the collective completes; the exception surfaces on the ranks
    # where the function ran (with fewer ranks some only forward data)
    def bad(a, b):
        raise ValueError("no thanks")
    raised = False
    try:
        comm.Allreduce(np.ones(4), np.zeros(4), op=bad)
    except ValueError as e:
        assert "no thanks" in str(e)
        raised = True
    assert any(comm.allgather(raised)) or p == 1
    # and the communicator still works afterwards
    assert comm.allreduce(1) == p


def suite_errors(comm: fmi.Communicator) -> None:
    r, p = comm.rank, comm.size
    if r == 0:
        comm.Send(np.arange(5, dtype=np.int32), 1, tag=8)
        comm.Send(bytearray(3), 1, tag=8)
        comm.Send(bytearray(3), 1, tag=8)
    elif r == 1:
        small = np.zeros(2, dtype=np.int32)
        try:
            comm.Recv(small, 0, tag=8)
        except fmi.CountMismatchError as e:
            assert "expected 2 elements, got 5 (from rank 0)" in str(e), e
        else:
            raise AssertionError("no CountMismatchError")
        try:
            comm.Recv(np.zeros(4, dtype=np.int32), 0, tag=8)
        except fmi.TypeMismatchError as e:
            assert e.peer == 0 and isinstance(e, TypeError), e
        else:
            raise AssertionError("no TypeMismatchError")
        req = comm.Irecv(np.zeros(4, dtype=np.int32), 0, tag=8)
        try:
            req.wait()
        except fmi.TypeMismatchError:
            pass
        else:
            raise AssertionError("no TypeMismatchError from Irecv")
        comm.set_deadline(0.3)
        try:
            comm.recv(0, tag=99)
        except fmi.TimeoutError as e:
            assert e.peer == 0 and "waiting for rank 0" in str(e), e
            assert isinstance(e, TimeoutError)
        else:
            raise AssertionError("no TimeoutError")
        comm.set_deadline(60)
    # found before any message moves, the same on every rank
    try:
        comm.Allreduce(np.ones(2), np.zeros(2), op=fmi.BAND)
    except fmi.UnsupportedOpError as e:
        assert "band" in str(e)
    else:
        raise AssertionError("no UnsupportedOpError")
    for bad_rank in (-1, p):
        try:
            comm.send(1, bad_rank)
        except fmi.InvalidRankError as e:
            assert f"dest {bad_rank} is not in this job of {p} ranks" in str(e), e
        else:
            raise AssertionError("no InvalidRankError")
    comm.barrier()


SUITES = {
    "p2p": suite_p2p,
    "objects": suite_objects,
    "buffers": suite_buffers,
    "userops": suite_userops,
    "errors": suite_errors,
}


def main() -> None:
    comm = fmi.Communicator.from_env()
    for name in sys.argv[1:]:
        SUITES[name](comm)
        print(f"rank {comm.rank}/{comm.size}: {name} ok", flush=True)


if __name__ == "__main__":
    main()
