"""``torchrun --nproc-per-node N -m pool verify CONFIG``: verify sharded across processes.

Each rank checks its share of the entries (`pool.verify.shard_entries`: deterministic, balanced
by file size, a model with its head), loading ``_pretrained_`` itself for task vectors. The results
are gathered with ``torch.distributed`` (gloo on the CPU; NCCL for CUDA tensors when the device is
CUDA, objects still over gloo), so every rank ends with the same merged report and the same exit
status; rank 0 alone prints it and writes the JSON, whose entries record the ``rank`` that checked
them. A rank that dies or stalls makes the others fail after ``timeout`` seconds instead of
hanging (torchrun also stops the other workers when one exits with an error). Multi-node runs the
torchrun way: ``torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint
HOST:29500 -m pool verify CONFIG`` on every node.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist

from .entries import Entry
from .errors import DistributedError
from .lock import PoolLock
from .modelpool import OpenCLIPVisionModelPool
from .verify import shard_entries, verify_order, verify_pool
from .verify_report import EntryResult, VerifyReport, versions

__all__ = ["world", "verify_distributed", "DistributedError"]

log = logging.getLogger(__name__)


def world() -> tuple[int, int] | None:
    """Where this process stands in a torchrun launch.

    Returns:
        ``(rank, world_size)`` when ``RANK`` and ``WORLD_SIZE`` say there is more than one
        process (torchrun sets them), else None.
    """
    try:
        size, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    except ValueError:
        return None
    return (rank, size) if size > 1 else None


def verify_distributed(pool: OpenCLIPVisionModelPool, models: list[Entry], heads: list[Entry], *,
                       config_label: str, device: str | None = None, integrity: bool = True,
                       debug: bool = False, timeout_s: float = 1800.0,
                       on_result: Callable[[EntryResult], None] | None = None,
                       lock: PoolLock | None = None) -> tuple[VerifyReport, int]:
    """Check this rank's share of the entries, gather every rank's results and merge them.

    Args:
        pool, models, heads: what `pool.verify.prepare_pool` returned (the same on every rank).
        config_label, device, integrity, debug, on_result, lock: as for `pool.verify.verify_pool`
            (the integrity pass is on by default); ``device="cuda"`` means each rank's own GPU
            (``LOCAL_RANK``).
        timeout_s: how long a rank waits for the others before failing.

    Returns:
        ``(merged report, rank)``: the same report on every rank, entries in verify's order, each
        with the ``rank`` that checked it.

    Raises:
        DistributedError: the process group could not start, or a rank did not answer in time.
    """
    start = time.perf_counter()
    place = world()
    if place is None:
        raise DistributedError("not launched with several processes (WORLD_SIZE is unset or 1); run "
                               "`torchrun --nproc-per-node N -m pool verify CONFIG`.")
    rank, size = place
    cuda = device is not None and torch.device(device).type == "cuda"
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0")) % max(1, torch.cuda.device_count())  # more ranks than GPUs: shared
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
    try:
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    except Exception as exc:  # the rendezvous failed: a clear message, not a stack of c10d frames
        raise DistributedError(f"rank {rank}: could not join the process group ({backend}): {exc}") from exc
    try:
        mine_models, mine_heads = shard_entries(models, heads, rank, size)
        log.info("rank %d of %d checks %d models and %d heads", rank, size, len(mine_models), len(mine_heads))
        report = verify_pool(pool, mine_models, mine_heads, config_label=config_label, device=device,
                             integrity=integrity, debug=debug, on_result=on_result, lock=lock)
        for entry in report.entries:
            entry.rank = rank
        gathered: list[list[dict] | None] = [None] * size
        try:
            dist.all_gather_object(gathered, [e.as_dict() for e in report.entries])
        except Exception as exc:  # a rank died or stalled past the timeout
            raise DistributedError(f"rank {rank}: gathering the results failed ({exc}); another rank died or "
                                   f"did not finish within {timeout_s:.0f} s (see its output).") from exc
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    by_label = {}
    for part in gathered:
        for data in part or []:
            entry = EntryResult.from_dict(data)
            by_label[entry.label] = entry
    order = verify_order(models, heads)
    entries = [by_label[label] for label in order if label in by_label]
    label = f"{'cuda' if cuda else str(report.device)} x {size} ranks"
    merged = VerifyReport(config_label, label, integrity, entries, time.perf_counter() - start, versions=versions(),
                          allowed_globals=sorted(pool.allow_globals), cache_dir=report.cache_dir,
                          lock_file=report.lock_file)
    return merged, rank
