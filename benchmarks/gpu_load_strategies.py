"""Ways to move a checkpoint file's bytes onto the GPU, timed side by side (warm page cache).

    python benchmarks/gpu_load_strategies.py FILE --out DIR [--smoke]

Measures, for one file: the pinned and pageable host-to-device copy of the same number of bytes
(the floor), a single-threaded read into pinned memory then one copy, parallel ``preadv`` into
pinned memory then one copy, a pipelined read/copy in chunks, and an mmap'd file copied with one
pageable copy (with and without ``MADV_POPULATE_READ``). Informs `pool`'s GPU load path.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

CHUNK = 64 << 20


def timed(fn, rounds: int) -> dict:
    fn()
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("file", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    size = args.file.stat().st_size
    rounds = 1 if args.smoke else 5
    pin = dev == "cuda"
    pinned = torch.empty(size, dtype=torch.uint8, pin_memory=pin)
    pinned_np = pinned.numpy()
    pageable = torch.empty(size, dtype=torch.uint8)
    pageable.fill_(1)
    target = torch.empty(size, dtype=torch.uint8, device=dev)
    fd = os.open(args.file, os.O_RDONLY)
    threads = min(16, os.cpu_count() or 4)
    pool = ThreadPoolExecutor(threads)

    def read_range(buf, start: int, stop: int) -> None:
        view = memoryview(buf)[start:stop]
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], start + done)
            if n <= 0:
                raise OSError("short read")
            done += n

    def single_read() -> None:
        read_range(pinned_np, 0, size)
        target.copy_(pinned, non_blocking=True)

    def parallel_read() -> None:
        step = -(-size // threads)
        list(pool.map(lambda i: read_range(pinned_np, i * step, min(size, (i + 1) * step)), range(threads)))
        target.copy_(pinned, non_blocking=True)

    def pipelined() -> None:
        futures = []
        for start in range(0, size, CHUNK):
            stop = min(size, start + CHUNK)
            futures.append((start, stop, pool.submit(read_range, pinned_np, start, stop)))
        for start, stop, fut in futures:
            fut.result()
            target[start:stop].copy_(pinned[start:stop], non_blocking=True)

    def mmap_copy(populate: bool) -> None:
        with open(args.file, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        if populate:
            mm.madvise(getattr(mmap, "MADV_POPULATE_READ", 22))
        src = torch.frombuffer(mm, dtype=torch.uint8)
        target.copy_(src)
        del src
        mm.close()

    cases = {
        "h2d pinned (floor)": lambda: target.copy_(pinned, non_blocking=True),
        "h2d pageable": lambda: target.copy_(pageable, non_blocking=True),
        "read 1 thread -> pinned -> h2d": single_read,
        f"preadv {threads} threads -> pinned -> h2d": parallel_read,
        f"pipelined {CHUNK >> 20} MiB chunks, {threads} threads": pipelined,
        "mmap -> h2d pageable": lambda: mmap_copy(False),
        "mmap + MADV_POPULATE_READ -> h2d pageable": lambda: mmap_copy(True),
    }
    results = {"file_bytes": size, "device": dev, "threads": threads,
               "gpu": torch.cuda.get_device_name(0) if dev == "cuda" else None, "cases": {}}
    for name, fn in cases.items():
        try:
            results["cases"][name] = timed(fn, rounds)
        except Exception as exc:  # noqa: BLE001 - record and go on: this is a measurement
            results["cases"][name] = {"error": f"{type(exc).__name__}: {exc}"}
        r = results["cases"][name]
        print(f"[strategies] {name}: {r.get('median_s', float('nan')) * 1e3:.1f} ms {r.get('error', '')}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_load_strategies.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
