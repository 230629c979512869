"""FusionBench drop-in: `OpenCLIPVisionModelPool`, our pool as a ``fusion_bench`` ``BaseModelPool``.

FusionBench's merging algorithms (SimpleAverage, TaskArithmetic, TIES, MagMax, ...) accept only a
``BaseModelPool``; this class is `pool.OpenCLIPVisionModelPool` (every checkpoint form, loaded
safely) that is also one. Use it from FusionBench's shipped YAML by overriding the target::

    fusion_bench method=task_arithmetic \\
        modelpool=OpenCLIPVisionModelPool/ViT-B-32_TA_cars_dtd \\
        modelpool._target_=pool.fusion_bench.OpenCLIPVisionModelPool \\
        taskpool=dummy merged_model_save_path=merged.safetensors

or from Python: ``TaskArithmeticAlgorithm(scaling_factor=0.3).run(OpenCLIPVisionModelPool(...))``.

Imported only on demand: ``import pool`` never imports fusion_bench. FusionBench 0.2.33 needs
Python 3.12 or newer (it uses ``typing.override``); install it with
``pip install "openclip-pool[fusion-bench]"``.
"""

from __future__ import annotations

import sys
from typing import Any

from .modelpool import OpenCLIPVisionModelPool as _Pool

_REQUIRES = (3, 12)

if sys.version_info < _REQUIRES:
    raise ImportError(
        f"pool.fusion_bench needs Python {_REQUIRES[0]}.{_REQUIRES[1]} or newer: fusion-bench 0.2.33 imports "
        f"typing.override, which Python {sys.version_info.major}.{sys.version_info.minor} lacks. Use "
        "pool.OpenCLIPVisionModelPool directly on this Python, or run FusionBench on Python 3.12+.")

try:
    from fusion_bench.constants import FUSION_BENCH_VERSION
    from fusion_bench.modelpool import BaseModelPool
except ImportError as exc:  # fusion_bench missing, or broken in this environment
    raise ImportError(
        "pool.fusion_bench needs FusionBench: pip install \"openclip-pool[fusion-bench]\" (fusion-bench "
        f"0.2.33, Python 3.12+). Importing fusion_bench.modelpool failed: {exc}") from exc

__all__ = ["OpenCLIPVisionModelPool"]


class OpenCLIPVisionModelPool(_Pool, BaseModelPool):
    """`pool.OpenCLIPVisionModelPool` that FusionBench accepts as its own ``BaseModelPool``.

    Every method comes from `pool.OpenCLIPVisionModelPool` (loading, saving, datasets, config);
    FusionBench's base class contributes its type (algorithms check ``isinstance(pool,
    BaseModelPool)``), its metadata (``_usage_``, ``_version_``) and any helper we do not define.

    Args:
        models: the pool's models, in any form `pool.OpenCLIPVisionModelPool` reads.
        classification_heads: heads by name.
        train_datasets, val_datasets, test_datasets: datasets by name.
        _usage_, _version_, _recursive_: FusionBench's metadata keys (kept, not used for loading).
        kwargs: everything else `pool.OpenCLIPVisionModelPool` takes (``device``, ``dtype``, extra
            keys such as ``model_dir`` used in interpolations).

    Example:
        >>> from fusion_bench.method import TaskArithmeticAlgorithm  # doctest: +SKIP
        >>> merged = TaskArithmeticAlgorithm(scaling_factor=0.3).run(
        ...     OpenCLIPVisionModelPool.from_config("pool.yaml"))  # doctest: +SKIP
    """

    def __init__(self, models: Any = None, classification_heads: Any = None, train_datasets: Any = None,
                 val_datasets: Any = None, test_datasets: Any = None, *, _usage_: str | None = None,
                 _version_: str | None = None, _recursive_: bool = False, **kwargs: Any) -> None:
        _Pool.__init__(self, models, classification_heads, train_datasets, val_datasets, test_datasets, **kwargs)
        self._usage_ = _usage_
        self._version_ = FUSION_BENCH_VERSION if _version_ is None else _version_
        self._recursive_ = _recursive_
