"""Ways to move a checkpoint's tensor bytes onto the GPU, timed side by side (issue 15; warm page cache).

    python benchmarks/gpu_load_strategies.py --out DIR            # CUDA: about a minute on an H200
    python benchmarks/gpu_load_strategies.py --out DIR --smoke    # seconds, on the CPU: checks the script

One standalone run on ViT-B-32 (random weights, synthesized by `benchlib.ensure_checkpoints`):
every variant is timed as the median of ``--rounds`` calls (device synchronised after each) after a
warm-up, checked once against the file's bytes, printed as one line with its ratio to the pinned
host-to-device copy of the same bytes, and written to ``DIR/gpu_load_strategies.json`` as it
finishes (so a crash in a later variant keeps the earlier ones).

1. floors: pinned and pageable host-to-device copies; 16 threads ``preadv`` into one preallocated
   pinned buffer, then one copy.
2. the transfer alone (the zip's ``data/*`` members, as `pool.transfer` reads them): the previous
   design (``v0``: a driver thread, 2 MiB pieces in a pool, 8 x 8 MiB pinned ring) at a few
   (chunk, ring, piece) settings; the current one (a worker per slot group, one ``preadv`` per
   chunk) over chunk x ring x threads; an mmap copied into the pinned ring by torch's own threads.
3. whole loads: ``load_state_dict(zip, map_location=cuda)`` and ``ImageEncoder.load(zip, device=cuda)``
   with the read overlapping the pickle parse or not, at several thread switch intervals, with the
   default settings and the fastest of section 2; safetensors for comparison; the parse alone and
   the encoder build alone.
4. ``cudaHostRegister`` of the file's read-only mmap (page cache pages, no CPU copy): register,
   copy, unregister, timed apart; last, as the one variant that could crash the process.

With ``--smoke`` the device is the CPU: the copies are CPU copies, the staged paths run through
`pool.transfer`'s CPU staging ring (``stage_cpu``), one round each, no ``cudaHostRegister``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import platform
import statistics
import sys
import time
import warnings
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib
import torch

from pool import transfer
from pool.containers import torchzip

MiB = 1 << 20
THREADS = min(16, os.cpu_count() or 4)


class Bench:
    def __init__(self, out: Path, smoke: bool, rounds: int) -> None:
        self.out, self.smoke, self.rounds = out, smoke, rounds
        self.cuda = torch.cuda.is_available() and not smoke
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.results: dict[str, Any] = {"kind": "pool gpu_load_strategies", "smoke": smoke, "env": env_info(),
                                        "variants": {}, "notes": []}
        self.floor_s: float | None = None
        self.start = time.perf_counter()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def note(self, text: str) -> None:
        print(f"[strategies] {text}", flush=True)
        self.results["notes"].append(text)

    def save(self) -> None:
        self.results["elapsed_s"] = round(time.perf_counter() - self.start, 1)
        (self.out / "gpu_load_strategies.json").write_text(json.dumps(self.results, indent=1, default=str))

    def time(self, name: str, fn: Callable[[], Any], *, check: Callable[[Any], bool] | None = None,
             group: str = "", **info: Any) -> float | None:
        """Median seconds of ``fn`` over the rounds (after a warm-up that is also checked)."""
        entry: dict[str, Any] = {"group": group, **info}
        try:
            out = fn()
            self.sync()
            if check is not None:
                entry["ok"] = bool(check(out))
            del out
            times = []
            for _ in range(self.rounds):
                t0 = time.perf_counter()
                fn()
                self.sync()
                times.append(time.perf_counter() - t0)
            entry.update(median_ms=statistics.median(times) * 1e3, min_ms=min(times) * 1e3, rounds=len(times))
            if self.floor_s:
                entry["x_pinned_copy"] = statistics.median(times) / self.floor_s
        except Exception as exc:  # noqa: BLE001 - a measurement: record it and go on
            entry["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        self.results["variants"][name] = entry
        ratio = f"{entry['x_pinned_copy']:5.2f}x" if "x_pinned_copy" in entry else "   -  "
        took = f"{entry['median_ms']:8.2f} ms (min {entry['min_ms']:.2f})" if "median_ms" in entry else ""
        flag = "" if entry.get("ok", True) else "  WRONG BYTES"
        print(f"[strategies] {name:<78} {took} {ratio}{flag} {entry.get('error', '')}", flush=True)
        self.save()
        return entry.get("median_ms", 0) / 1e3 or None


def env_info() -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cuda": torch.version.cuda, "host_cpus": os.cpu_count(),
                            "torch_threads": torch.get_num_threads(), "switch_interval": sys.getswitchinterval()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_mem_gib=round(props.total_memory / 2**30, 1))
    return info


# -- the previous transfer design (pool.transfer before issue 15), parameterised -------------------
class _NoEvent:
    def synchronize(self) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        pass

    def query(self) -> bool:
        return True


def _events(cuda: bool, n: int) -> list[Any]:
    return [torch.cuda.Event() if cuda else _NoEvent() for _ in range(n)]


def _stream(cuda: bool, device: torch.device) -> Any:
    return torch.cuda.Stream(device=device) if cuda else None


def _on(stream: Any) -> Any:
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


class V0:
    """The driver-thread ring: chunks of ``chunk`` bytes through ``ring`` pinned buffers, each chunk
    read as concurrent ``piece``-byte preadv calls in a pool of 16 threads."""

    def __init__(self, chunk: int, ring: int, piece: int, cuda: bool) -> None:
        self.chunk, self.piece, self.cuda = chunk, piece, cuda
        self.ring = [(torch.empty(chunk, dtype=torch.uint8, pin_memory=cuda), e) for e in _events(cuda, ring)]
        self.pool = ThreadPoolExecutor(THREADS)

    def read(self, path: Path, regions: list[tuple[int, int]], device: torch.device) -> torch.Tensor:
        total = sum(b - a for a, b in regions)
        target = torch.empty(total, dtype=torch.uint8, device=device)
        chunks, position = [], 0
        for start, stop in regions:
            for at in range(start, stop, self.chunk):
                size = min(self.chunk, stop - at)
                chunks.append((at, position, size))
                position += size
        stream = _stream(self.cuda, device)
        fd = transfer.open_regular(path)
        in_flight: deque = deque()

        def submit(i: int) -> None:
            staging, copied = self.ring[i % len(self.ring)]
            copied.synchronize()
            offset, _, size = chunks[i]
            view = memoryview(staging.numpy())
            in_flight.append((i, [self.pool.submit(transfer.pread_into, fd, view[a:min(size, a + self.piece)], offset + a)
                                  for a in range(0, size, self.piece)]))

        try:
            for i in range(min(len(self.ring), len(chunks))):
                submit(i)
            following = len(in_flight)
            while in_flight:
                i, futures = in_flight.popleft()
                wait(futures)
                for f in futures:
                    f.result()
                staging, copied = self.ring[i % len(self.ring)]
                _, position, size = chunks[i]
                with _on(stream):
                    target[position:position + size].copy_(staging[:size], non_blocking=True)
                    copied.record(stream)
                if following < len(chunks):
                    submit(following)
                    following += 1
        finally:
            for _, futures in in_flight:
                wait(futures)
            os.close(fd)
        if stream is not None:
            stream.synchronize()
        return target


class MmapCopy:
    """A read-only mmap copied chunk by chunk into a pinned ring by torch's own (intra-op) threads,
    each chunk then copied to the device on a side stream: one Python call per chunk and side."""

    def __init__(self, chunk: int, ring: int, cuda: bool) -> None:
        self.chunk, self.cuda = chunk, cuda
        self.ring = [(torch.empty(chunk, dtype=torch.uint8, pin_memory=cuda), e) for e in _events(cuda, ring)]

    def read(self, path: Path, regions: list[tuple[int, int]], device: torch.device) -> torch.Tensor:
        total = sum(b - a for a, b in regions)
        target = torch.empty(total, dtype=torch.uint8, device=device)
        stream = _stream(self.cuda, device)
        with open(path, "rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a read-only buffer: nothing writes to it
            source = torch.frombuffer(mapped, dtype=torch.uint8)
        turn, position = 0, 0
        for start, stop in regions:
            for at in range(start, stop, self.chunk):
                size = min(self.chunk, stop - at)
                staging, copied = self.ring[turn % len(self.ring)]
                turn += 1
                copied.synchronize()
                staging[:size].copy_(source[at:at + size])
                with _on(stream):
                    target[position:position + size].copy_(staging[:size], non_blocking=True)
                    copied.record(stream)
                position += size
        if stream is not None:
            stream.synchronize()
        del source
        mapped.close()
        return target


def read_all_pinned(path: Path, regions: list[tuple[int, int]], pinned: torch.Tensor, target: torch.Tensor,
                    pool: ThreadPoolExecutor) -> torch.Tensor:
    """16 threads preadv the regions into one preallocated pinned buffer; then one copy."""
    fd = transfer.open_regular(path)
    view = memoryview(pinned.numpy())
    jobs, position = [], 0
    for start, stop in regions:
        step = -(-(stop - start) // THREADS)
        for a in range(start, stop, step):
            b = min(stop, a + step)
            jobs.append(pool.submit(transfer.pread_into, fd, view[position + a - start:position + b - start], a))
        position += stop - start
    try:
        wait(jobs)
        for job in jobs:
            job.result()
    finally:
        os.close(fd)
    target.copy_(pinned[:position], non_blocking=True)
    return target


# -- the run ---------------------------------------------------------------------------------------
def fmt(nbytes: int) -> str:
    return f"{nbytes // MiB} MiB" if nbytes % MiB == 0 else f"{nbytes >> 10} KiB"


def checkpoints(args: argparse.Namespace, bench: Bench) -> tuple[Path, Path]:
    """(zip pickle, safetensors) of the architecture: the benchmarks' cached files, or for a smoke
    run without ``--arch`` a tiny encoder written under the output folder."""
    if args.smoke and args.arch is None:
        from pool import synth

        folder = args.out / "smoke_checkpoints"
        folder.mkdir(exist_ok=True)
        encoder = synth.make_original_encoder(synth.TINY, seed=0)
        zip_path = synth.save_module(encoder, folder / "zip.pt", "zip")
        st_path = synth.save_state_dict(encoder.state_dict(), folder / "model.safetensors", "safetensors")
        bench.results["arch"] = "tiny (smoke)"
        return Path(zip_path), Path(st_path)
    files = benchlib.ensure_checkpoints(args.arch or "ViT-B-32", finetuned=0, log=bench.note)
    bench.results["arch"] = args.arch or "ViT-B-32"
    return files["zip"], files["safetensors"]


def floors(bench: Bench, path: Path, regions: list[tuple[int, int]], expected: torch.Tensor,
           same: Callable[[torch.Tensor], bool]) -> None:
    """The host-to-device copies of the bytes (pinned: the floor every ratio divides by), and a
    parallel read into a preallocated pinned buffer followed by one copy."""
    nbytes, dev, cuda = expected.numel(), bench.device, bench.cuda
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
    pinned.copy_(expected.cpu())
    pageable = expected.cpu().clone()
    target = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    floor = bench.time("h2d copy, pinned (the floor)", lambda: target.copy_(pinned, non_blocking=True),
                       check=same, group="floor", bytes=nbytes)
    bench.floor_s = floor
    bench.results["variants"]["h2d copy, pinned (the floor)"]["x_pinned_copy"] = 1.0
    if cuda and floor:
        bench.results["pinned_gb_per_s"] = nbytes / floor / 1e9
    bench.time("h2d copy, pageable", lambda: target.copy_(pageable, non_blocking=True), check=same, group="floor")
    with ThreadPoolExecutor(THREADS) as pool:
        bench.time(f"preadv {THREADS} threads -> preallocated pinned -> 1 copy",
                   lambda: read_all_pinned(path, regions, pinned, target, pool), check=same, group="floor")


def timeline(bench: Bench, load: Callable[[], Any]) -> None:
    """Where an overlapped load's time goes: until the read starts (zip directory), until the
    parse hands over (``result`` called), waiting for the read, and after (tensors, checks)."""
    marks: dict[str, float] = {}
    real_start, real_result = torchzip.start_read, transfer.PendingRead.result

    def start(*args: Any, **kwargs: Any) -> Any:
        marks["started"] = time.perf_counter()
        return real_start(*args, **kwargs)

    def result(self: transfer.PendingRead, *args: Any, **kwargs: Any) -> Any:
        marks["parsed"] = time.perf_counter()
        try:
            return real_result(self, *args, **kwargs)
        finally:
            marks["read"] = time.perf_counter()

    rows: list[tuple[float, float, float, float]] = []
    torchzip.start_read, transfer.PendingRead.result = start, result  # type: ignore[method-assign]
    try:
        load()
        for _ in range(bench.rounds):
            marks.clear()
            t0 = time.perf_counter()
            load()
            bench.sync()
            t1 = time.perf_counter()
            rows.append((marks["started"] - t0, marks["parsed"] - marks["started"], marks["read"] - marks["parsed"],
                         t1 - marks["read"]))
    except Exception as exc:  # noqa: BLE001 - a measurement
        bench.note(f"timeline failed: {type(exc).__name__}: {exc}")
        return
    finally:
        torchzip.start_read, transfer.PendingRead.result = real_start, real_result  # type: ignore[method-assign]
    labels = ("until the read starts", "parse (read running)", "waiting for the read", "after the read")
    medians = {label: statistics.median(r[i] for r in rows) * 1e3 for i, label in enumerate(labels)}
    bench.results["overlap_timeline_ms"] = medians
    bench.note("overlapped load_state_dict(zip), default transfer, median ms: " +
               ", ".join(f"{k} {v:.2f}" for k, v in medians.items()))
    bench.save()


def build_alone(bench: Bench, path: Path) -> None:
    """The encoder build from a checkpoint already on the device."""
    from pool.checkpoint import read_checkpoint
    from pool.modeling import ImageEncoder

    on_device = read_checkpoint(path, map_location=bench.device, mmap=False, cache_dir=False)
    bench.time("build alone: ImageEncoder.from_checkpoint(checkpoint on the device)",
               lambda: ImageEncoder.from_checkpoint(on_device, device=bench.device), group="phase")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_load_strategies.json")
    parser.add_argument("--smoke", action="store_true", help="CPU, one round each: checks the script runs")
    parser.add_argument("--rounds", type=int, default=None, help="timed calls per variant (default 7; smoke 1)")
    parser.add_argument("--arch", default=None, help="open_clip name (default ViT-B-32; a smoke run: a tiny ViT)")
    parser.add_argument("--no-register", action="store_true", help="skip the cudaHostRegister variants")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.smoke:
        raise SystemExit("gpu_load_strategies: no CUDA device; use --smoke to check the script on the CPU")
    args.out.mkdir(parents=True, exist_ok=True)
    bench = Bench(args.out, args.smoke, args.rounds or (1 if args.smoke else 7))
    dev, cuda = bench.device, bench.cuda
    print(f"[strategies] {json.dumps(bench.results['env'])}", flush=True)

    from pool.checkpoint import load_state_dict, read_checkpoint
    from pool.containers.base import map_file
    from pool.modeling import ImageEncoder

    zip_path, st_path = checkpoints(args, bench)
    archive = torchzip.open_archive(map_file(zip_path), str(zip_path))
    spans = [transfer.Span(m.offset, m.size) for m in archive.records.values()]
    regions = transfer._regions(spans)
    nbytes = sum(b - a for a, b in regions)
    raw = zip_path.read_bytes()
    expected = torch.frombuffer(bytearray(b"".join(raw[a:b] for a, b in regions)), dtype=torch.uint8).to(dev)
    expected_spans = torch.frombuffer(bytearray(b"".join(raw[s.offset:s.offset + s.nbytes] for s in spans)),
                                      dtype=torch.uint8).to(dev)
    del raw
    bench.results.update(file_bytes=zip_path.stat().st_size, region_bytes=nbytes,
                         regions=len(regions), records=len(spans))
    old_settings = transfer.configure()
    old_overlap = torchzip.OVERLAP

    def same(buffer: torch.Tensor) -> bool:
        return buffer.numel() == expected.numel() and bool(torch.equal(buffer, expected))

    def same_storages(storages: list[torch.UntypedStorage]) -> bool:
        joined = torch.cat([torch.empty(0, dtype=torch.uint8, device=s.device).set_(s) for s in storages])
        return joined.numel() == expected_spans.numel() and bool(torch.equal(joined, expected_spans))

    reference = read_checkpoint(zip_path, cache_dir=False).state_dict

    def same_state(state: dict[str, torch.Tensor]) -> bool:
        return set(state) == set(reference) and all(
            state[k].device.type == dev.type and torch.equal(state[k].cpu(), v) for k, v in reference.items())

    # 1. floors -------------------------------------------------------------------------------------
    floors(bench, zip_path, regions, expected, same)

    # 2. the transfer alone -----------------------------------------------------------------------
    unit = 16 << 10 if args.smoke else MiB  # a smoke run's file is small: KiB chunks cycle the rings
    for chunk, ring, piece in ((8, 8, 2), (8, 8, 8), (16, 8, 4), (8, 16, 2)):
        v0 = V0(chunk * unit, ring, piece * unit, cuda)
        bench.time(f"v0 read_spans: chunk {fmt(chunk * unit)}, ring {ring}, piece {fmt(piece * unit)}" +
                   (" (the previous default)" if (chunk, ring, piece, unit) == (8, 8, 2, MiB) else ""),
                   lambda v0=v0: v0.read(zip_path, regions, dev), check=same, group="transfer-v0",
                   chunk=chunk * unit, ring=ring, piece=piece * unit)
        del v0
    sweep: list[tuple[int, int, int]] = [(2, 16, THREADS), (4, 16, THREADS), (8, 16, THREADS), (16, 16, THREADS),
                                         (2, 32, THREADS), (4, 32, THREADS), (8, 32, THREADS), (4, 48, THREADS),
                                         (4, 16, 8), (8, 16, 8), (4, 24, 12)]
    if args.smoke:
        sweep = [(4, 16, THREADS), (1, 4, 2), (2, 3, 3)]
    timed_settings: dict[str, tuple[float, transfer.TransferSettings]] = {}
    for chunk, ring, threads in sweep:
        s = transfer.TransferSettings(chunk=chunk * unit, ring=ring, threads=threads, stage_cpu=not cuda)
        name = f"read_spans: chunk {fmt(chunk * unit)}, ring {ring}, threads {threads}"
        if s == transfer.TransferSettings(stage_cpu=not cuda):
            name += " (the default)"
        took = bench.time(name, lambda s=s: transfer.read_spans(zip_path, spans, dev, settings=s),
                          check=same_storages, group="transfer", chunk=s.chunk, ring=ring, threads=threads)
        if took and bench.results["variants"][name].get("ok"):
            timed_settings[name] = (took, s)
    for chunk, ring in ((8, 8), (32, 4)):
        copier = MmapCopy(chunk * unit, ring, cuda)
        bench.time(f"mmap -> torch threads copy -> pinned ring ({fmt(chunk * unit)} x {ring}) -> h2d",
                   lambda c=copier: c.read(zip_path, regions, dev), check=same, group="transfer-mmap",
                   chunk=chunk * unit, ring=ring)
        del copier
    best_name = min(timed_settings, key=lambda k: timed_settings[k][0]) if timed_settings else None
    best = timed_settings[best_name][1] if best_name else transfer.settings()
    bench.results["best_transfer"] = {"name": best_name, "chunk": best.chunk, "ring": best.ring,
                                      "threads": best.threads}
    bench.note(f"fastest transfer settings: {best_name}")

    # 3. whole loads ------------------------------------------------------------------------------
    default = transfer.TransferSettings(stage_cpu=not cuda)
    bench.time("parse alone: read_checkpoint(zip) mapped on the CPU", lambda: read_checkpoint(zip_path, cache_dir=False),
               group="phase")
    build_alone(bench, zip_path)
    loads: list[tuple[str, Callable[[], Any], Callable[[Any], bool] | None]] = [
        ("load_state_dict(zip)", lambda: load_state_dict(zip_path, map_location=dev, mmap=False, cache_dir=False), same_state),
        ("ImageEncoder.load(zip)", lambda: ImageEncoder.load(zip_path, device=dev, mmap=False, cache_dir=False), None),
    ]
    for label, fn, check in loads:
        for settings_name, s in (("default", default), ("fastest", best)):
            if settings_name == "fastest" and s == default:
                continue
            for overlap, switch in ((False, None), (True, None), (True, 1e-3), (True, 2e-4), (True, 5e-5)):
                if label.startswith("ImageEncoder") and switch not in (None, default.switch_interval):
                    continue
                if settings_name == "fastest" and overlap and switch != default.switch_interval:
                    continue
                torchzip.OVERLAP = overlap
                transfer.configure(**{**vars(s), "switch_interval": switch if overlap else s.switch_interval})
                name = (f"{label}, {settings_name} transfer, overlap {'on' if overlap else 'off'}"
                        + (f", switch interval {switch * 1e3:g} ms" if overlap and switch else
                           ", switch interval left alone" if overlap else ""))
                bench.time(name, fn, check=check, group="load", overlap=overlap, switch_interval=switch,
                           transfer=settings_name)
    torchzip.OVERLAP = old_overlap
    transfer.configure(**vars(default))
    timeline(bench, lambda: load_state_dict(zip_path, map_location=dev, mmap=False, cache_dir=False))
    bench.time("load_state_dict(safetensors), default transfer",
               lambda: load_state_dict(st_path, map_location=dev, mmap=False, cache_dir=False), check=same_state, group="load")
    bench.time("ImageEncoder.load(safetensors), default transfer",
               lambda: ImageEncoder.load(st_path, device=dev, mmap=False, cache_dir=False), group="load")
    if cuda:
        import safetensors.torch
        bench.time("safetensors.torch.load_file(device)", lambda: safetensors.torch.load_file(str(st_path), device="cuda"),
                   group="load")
    transfer.configure(**vars(old_settings))

    # 4. cudaHostRegister of the page cache -------------------------------------------------------
    if cuda and not args.no_register:
        host_register(bench, zip_path, regions, expected)
    elif not cuda:
        bench.note("cudaHostRegister variants skipped: no CUDA")
    bench.save()
    print(f"[strategies] done in {time.perf_counter() - bench.start:.0f} s: {args.out / 'gpu_load_strategies.json'}",
          flush=True)


def host_register(bench: Bench, path: Path, regions: list[tuple[int, int]], expected: torch.Tensor) -> None:
    """Register the file's read-only shared mapping with CUDA, copy the regions from it, unregister."""
    import numpy as np

    cudart = torch.cuda.cudart()

    def ok(err: Any) -> bool:
        return int(getattr(err, "value", err)) == 0

    size = path.stat().st_size
    target = torch.empty(expected.numel(), dtype=torch.uint8, device="cuda")
    phases: dict[str, list[float]] = {"mmap_ms": [], "register_ms": [], "copy_ms": [], "unregister_ms": []}
    flags_used: dict[str, int] = {}

    def once() -> torch.Tensor:
        t0 = time.perf_counter()
        with open(path, "rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        array = np.frombuffer(mapped, dtype=np.uint8)
        pointer = array.ctypes.data
        t1 = time.perf_counter()
        for flags in ((flags_used["flags"],) if flags_used else (8, 8 | 1, 0)):  # ReadOnly, ReadOnly|Portable, default
            err = cudart.cudaHostRegister(pointer, size, flags)
            if ok(err):
                flags_used["flags"] = flags
                break
        else:
            raise RuntimeError(f"cudaHostRegister failed: {err}")
        t2 = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                source = torch.from_numpy(array)
            position = 0
            for start, stop in regions:
                target[position:position + stop - start].copy_(source[start:stop], non_blocking=True)
                position += stop - start
            torch.cuda.synchronize()
            t3 = time.perf_counter()
            del source
        finally:
            err = cudart.cudaHostUnregister(pointer)
        t4 = time.perf_counter()
        del array
        mapped.close()
        for key, value in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            phases[key].append(value * 1e3)
        return target

    bench.time("cudaHostRegister(read-only mmap) + copy + unregister", once,
               check=lambda t: bool(torch.equal(t, expected)), group="register")
    entry = bench.results["variants"]["cudaHostRegister(read-only mmap) + copy + unregister"]
    entry.update({k: statistics.median(v) for k, v in phases.items() if v}, flags=flags_used.get("flags"))
    bench.note("cudaHostRegister phases (median ms): " +
               ", ".join(f"{k} {statistics.median(v):.2f}" for k, v in phases.items() if v))
    bench.save()
    # registered once (outside the timing): the copy alone, DMA straight from the page cache
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    array = np.frombuffer(mapped, dtype=np.uint8)
    if flags_used and ok(cudart.cudaHostRegister(array.ctypes.data, size, flags_used["flags"])):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                source = torch.from_numpy(array)

            def copy() -> torch.Tensor:
                position = 0
                for start, stop in regions:
                    target[position:position + stop - start].copy_(source[start:stop], non_blocking=True)
                    position += stop - start
                return target

            bench.time("copy from a page cache registered beforehand (registration not timed)", copy,
                       check=lambda t: bool(torch.equal(t, expected)), group="register")
            del source
        finally:
            cudart.cudaHostUnregister(array.ctypes.data)
    del array
    mapped.close()


if __name__ == "__main__":
    main()
