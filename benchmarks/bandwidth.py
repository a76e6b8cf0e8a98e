"""Measured memory read bandwidth of this machine, the physical floor of memory-bound batch-1 decode.

Every decoded token must read every weight the step uses once, so ``weight bytes / read bandwidth`` is the fastest a
step can possibly be when the weights do not fit in cache. The buffer is much larger than the last-level cache and
is read by ``threads`` threads at once (numpy releases the GIL in reductions), best of ``repeats``.
"""

from __future__ import annotations

import threading
import time

import numpy as np


def read_bandwidth_gbs(size_mib: int = 2048, threads: int = 2, repeats: int = 7) -> dict:
    """Bytes read per second (GB/s, 1e9) for a ``size_mib`` MiB float32 buffer split across ``threads`` readers."""
    data = np.ones(size_mib * 2**20 // 4, dtype=np.float32)
    parts = np.array_split(data, threads)
    sink = [0.0] * threads

    def read(i: int) -> None:
        sink[i] = float(np.add.reduce(parts[i]))

    samples = []
    for _ in range(repeats):
        workers = [threading.Thread(target=read, args=(i,)) for i in range(threads)]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        samples.append(data.nbytes / (time.perf_counter() - start) / 1e9)
    return {
        "read_gbs": max(samples),
        "read_gbs_median": float(np.median(samples)),
        "buffer_mib": size_mib,
        "threads": threads,
        "repeats": repeats,
    }


if __name__ == "__main__":
    print(read_bandwidth_gbs())
