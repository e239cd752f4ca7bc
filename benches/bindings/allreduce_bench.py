"""Allreduce latency through the Python binding; see run.sh and examples/allreduce_bench.rs (the
same measurement in Rust). For 8 B (1 float64) and 4 MiB (524288 float64): warm-up calls, a
barrier, then ITERS timed ``comm.Allreduce(send, recv, op=fmi.SUM)`` calls on numpy arrays;
rank 0 prints ``size_bytes mean_us``.

    target/release/fmi run -n 4 -- target/venv/bin/python benches/bindings/allreduce_bench.py 50
"""

import sys
import time

import numpy as np

import fmi

WARMUP = 5
COUNTS = (1, 1 << 19)


def main() -> int:
    iters = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    if iters <= 0:
        print("usage: allreduce_bench.py [ITERS > 0]", file=sys.stderr)
        return 2
    comm = fmi.Communicator.from_env()
    rank, size = comm.rank, comm.size
    for count in COUNTS:
        send = rank + np.arange(count, dtype=np.float64)
        recv = np.zeros(count, dtype=np.float64)
        for _ in range(WARMUP):
            comm.Allreduce(send, recv, op=fmi.SUM)
        comm.barrier()
        start = time.perf_counter()
        for _ in range(iters):
            comm.Allreduce(send, recv, op=fmi.SUM)
        mean_us = (time.perf_counter() - start) * 1e6 / iters
        last = count - 1
        if recv[last] != size * last + size * (size - 1) / 2:
            print(f"rank {rank}: wrong result {recv[last]}", file=sys.stderr)
            return 3
        if rank == 0:
            print(f"{count * 8} {mean_us:.1f}", flush=True)
    comm.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
