"""Time `pool.pickle_scan.scan_pickle` on the pickles of real-size checkpoints, against another
version of the scanner loaded from a file, in the same run (issue 22: the scan's dispatch table).

Usage: ``python benchmarks/scan_bench.py [--before PATH] [--cache DIR] [--rounds N]``. ``--before``
is a copy of an older ``pool/pickle_scan.py`` (``git show REV:pool/pickle_scan.py > old.py``);
``--cache`` is a folder of synthesized ViT-B-32 checkpoints (``benchmarks/.cache/ViT-B-32``, made
by the benchmark suite with `pool.synth`). Each scanner runs ``--rounds`` times per pickle,
alternating; the best time of each is printed.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import logging
import pickle
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

from pool import pickle_scan

log = logging.getLogger("scan_bench")


def _load_scanner(path: Path) -> Callable:
    spec = importlib.util.spec_from_file_location("pool._scan_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)  # relative imports resolve in package pool
    return module.scan_pickle


def _legacy_main_pickle(data: bytes) -> tuple[bytes, int]:
    """The legacy file's bytes and where its fourth pickle (the object) starts."""
    stream = io.BytesIO(data)
    for _ in range(3):  # magic number, protocol version, system info
        pickle.load(stream)
    return data, stream.tell()


def _pickles(cache: Path) -> dict[str, tuple[bytes, int, int | None]]:
    """name -> (bytes, start, large_bytes) of each pickle to scan."""
    found: dict[str, tuple[bytes, int, int | None]] = {}
    for name in ("zip.pt", "state_dict.pt"):
        with zipfile.ZipFile(cache / name) as archive:
            member = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
            found[f"{name} data.pkl"] = (archive.read(member), 0, None)
    data, start = _legacy_main_pickle((cache / "legacy.pt").read_bytes())
    found["legacy.pt object pickle"] = (data, start, None)
    found["pickle.pt (plain, large bytes in place)"] = ((cache / "pickle.pt").read_bytes(), 0, 1 << 16)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True)
    parser.add_argument("--cache", type=Path, default=Path(__file__).parent / ".cache" / "ViT-B-32")
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    scanners = {"before": _load_scanner(args.before), "after": pickle_scan.scan_pickle}
    for name, (data, start, large) in _pickles(args.cache).items():
        best = {k: float("inf") for k in scanners}
        results = {}
        for _ in range(args.rounds):
            for label, scan in scanners.items():
                began = time.perf_counter()
                results[label] = scan(data, start=start, large_bytes=large)
                best[label] = min(best[label], time.perf_counter() - began)
        same = all(vars(r) == vars(results["after"]) for r in results.values())
        log.info("%-42s end=%d before %.2f ms  after %.2f ms  (after/before %.2f; results equal: %s)", name,
                 results["after"].end, best["before"] * 1e3, best["after"] * 1e3, best["after"] / best["before"],
                 same)


if __name__ == "__main__":
    main()
