"""Export an image encoder as a Hugging Face transformers ``CLIPVisionModelWithProjection`` folder:
what ``python -m pool convert SRC DST --to hf`` runs.

`convert_to_hf` reads any checkpoint pool reads and writes the folder with `write_hf_folder`:
``config.json`` (`vision_config`: the activation is ``hidden_act``, ``quick_gelu`` for
OpenAI-derived weights), ``model.safetensors`` (the keys `pool.hf.to_hf` maps),
``preprocessor_config.json`` (`preprocessor_config`) and CLIP's tokenizer files
(`pool.hf_tokenizer.tokenizer_files`: ``vocab.json``, ``merges.txt``, ``tokenizer_config.json``,
``special_tokens_map.json``), so that ``CLIPProcessor.from_pretrained`` (FusionBench's
``load_processor``) loads the folder as well as ``CLIPVisionModelWithProjection`` does. Written into a
temporary folder and moved into place; the weights are read back and compared bit for bit.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from .arch import HEADS_METADATA, QUICK_GELU_METADATA, name_for_arch
from .checkpoint import read_checkpoint
from .convert_single import ConvertResult, sha256_file
from .errors import CheckpointError, DestinationExistsError
from .hf import HF_ACTIVATIONS, LAYER_NORM_EPS, to_hf
from .hf_tokenizer import tokenizer_files
from .keys import checkpoint_kind, to_clip_keys
from .modeling import ImageEncoder
from .writer import compare_tensors, contiguous_unshared, signals_as_exit, write_checked, written_mode

__all__ = ["convert_to_hf", "write_hf_folder", "vision_config", "preprocessor_config"]

log = logging.getLogger("pool.convert")  # one logger for every conversion, as --debug shows it


def convert_to_hf(source: str | Path, destination: str | Path, *, force: bool = False,
                  model_name: str | None = None) -> ConvertResult:
    """Write an encoder checkpoint (any form pool reads) as a transformers
    ``CLIPVisionModelWithProjection`` folder (`write_hf_folder`): ``config.json`` with
    the activation (``quick_gelu`` for OpenAI-derived weights), ``model.safetensors``,
    ``preprocessor_config.json`` and the tokenizer files (``vocab.json``, ``merges.txt``,
    ``tokenizer_config.json``, ``special_tokens_map.json``), which ``CLIPProcessor`` loads. The
    weights are read back from the folder by pool's own reader and compared bit for bit with the
    encoder's; the source is never modified.

    Args:
        source: an encoder checkpoint (a head has no transformers counterpart).
        destination: the folder to write (created; an existing non-empty folder needs ``force``).
        force: write into an existing, non-empty folder.
        model_name: an open_clip name to check the weights against.

    Returns:
        The `ConvertResult` (``kind="encoder"``, ``status="converted"``).

    Raises:
        DestinationExistsError: the destination is a file, or a non-empty folder without ``force``.
        CheckpointError: the source is no encoder, or cannot be read.
    """
    start = time.perf_counter()
    src, dst = Path(source).expanduser(), Path(destination).expanduser()
    a, b = src.resolve(), dst.resolve()
    if a == b or a in b.parents or b in a.parents:
        raise DestinationExistsError(f"{dst} is, holds or lies inside the source {src}; the source is never "
                                     "overwritten. Choose another folder.")
    if dst.exists() and not dst.is_dir():
        raise DestinationExistsError(f"{dst} is a file; --to hf writes a folder (config.json, model.safetensors, "
                                     "preprocessor_config.json, tokenizer files). Give a folder name.")
    if dst.is_dir() and any(dst.iterdir()) and not force:
        raise DestinationExistsError(f"{dst} exists and is not empty; refusing to write into it. Pass --force, "
                                     "or choose a new folder.")
    ckpt = read_checkpoint(src, cache_dir=False)
    digest = sha256_file(src)
    if checkpoint_kind(ckpt.state_dict) != "encoder":
        raise CheckpointError(f"{src}: not an image encoder; only encoders have a transformers counterpart "
                              "(CLIPVisionModelWithProjection).")
    encoder = ImageEncoder.from_checkpoint(ckpt, model_name=model_name)
    write_hf_folder(encoder, dst)
    expected = to_hf(to_clip_keys(encoder.state_dict()))
    compare_tensors(read_checkpoint(dst / "model.safetensors", mmap=False, cache_dir=False).state_dict,
                    {k: v.detach().contiguous().cpu() for k, v in expected.items()}, str(dst / "model.safetensors"))
    arch = encoder.arch
    res = ConvertResult(src, dst, "encoder", ok=True, status="converted", model_name=name_for_arch(arch),
                        architecture=arch.describe(), quick_gelu=arch.quick_gelu, tensors=len(expected),
                        bytes=sum(p.stat().st_size for p in dst.iterdir() if p.is_file()),
                        source_sha256=digest, seconds=time.perf_counter() - start)
    log.info("converted %s -> %s (transformers folder) in %.3f s", src, dst, res.seconds)
    return res


def vision_config(arch: Any) -> dict[str, Any]:
    """``config.json`` of a ``CLIPVisionModelWithProjection`` for a `pool.arch.VisionArch`.

    Args:
        arch: the encoder's architecture (its ``quick_gelu`` decides ``hidden_act``).

    Returns:
        The config as a dict, ready for ``json.dumps``.

    Example:
        >>> from pool.arch import arch_for_name
        >>> config = vision_config(arch_for_name("ViT-B-32"))
        >>> config["hidden_size"], config["num_attention_heads"], config["hidden_act"]
        (768, 12, 'quick_gelu')
    """
    return {
        "architectures": ["CLIPVisionModelWithProjection"],
        "model_type": "clip_vision_model",
        "hidden_size": arch.width,
        "intermediate_size": int(round(arch.width * arch.mlp_ratio)),
        "num_hidden_layers": arch.layers,
        "num_attention_heads": arch.heads,
        "image_size": arch.image_size,
        "patch_size": arch.patch_size,
        "projection_dim": arch.embed_dim,
        "num_channels": 3,
        "hidden_act": HF_ACTIVATIONS[bool(arch.quick_gelu)],
        "layer_norm_eps": LAYER_NORM_EPS,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        "torch_dtype": "float32",
    }


def preprocessor_config(image_size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> dict[str, Any]:
    """``preprocessor_config.json`` for ``CLIPImageProcessor``.

    Resize the shortest side (bicubic), center-crop, scale to [0, 1], normalise with the encoder's
    own mean and std. ``processor_class`` tells ``AutoProcessor`` to pair it with the tokenizer
    (``config.json``'s ``clip_vision_model`` names no processor).

    Args:
        image_size: the encoder's input resolution (the resize and the crop).
        mean: the per-channel mean to subtract.
        std: the per-channel standard deviation to divide by.

    Returns:
        The config as a dict, ready for ``json.dumps``.
    """
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True, "size": {"shortest_edge": image_size}, "resample": 3,
        "do_center_crop": True, "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": list(mean), "image_std": list(std),
        "do_convert_rgb": True,
        "processor_class": "CLIPProcessor",
    }


def _normalize_of(transform: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean and std the encoder's transform normalises with (OpenAI's when it names none)."""
    for step in getattr(transform, "transforms", []):
        if hasattr(step, "mean") and hasattr(step, "std"):
            return tuple(float(x) for x in step.mean), tuple(float(x) for x in step.std)
    # lazy: importing open_clip takes seconds, and an encoder's own transform usually says it
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    return tuple(OPENAI_DATASET_MEAN), tuple(OPENAI_DATASET_STD)


def write_hf_folder(encoder: Any, destination: str | os.PathLike[str]) -> Path:
    """Write an `ImageEncoder` as a transformers ``CLIPVisionModelWithProjection`` folder:
    ``config.json``, ``model.safetensors`` (written and read back by `pool.writer.write_checked`),
    ``preprocessor_config.json`` and the CLIP tokenizer files ``vocab.json``, ``merges.txt``,
    ``tokenizer_config.json`` and ``special_tokens_map.json`` (`pool.hf_tokenizer.tokenizer_files`,
    built from open_clip's BPE vocabulary; no download), so that ``CLIPProcessor`` and
    ``AutoProcessor`` load the folder too. Every file but ``model.safetensors`` is the same bytes
    each time (safetensors orders its metadata keys by hash; the tensors are equal). The files are
    written into a temporary folder beside it, then a new (or empty) folder is renamed into place
    in one step; in an existing folder each file is replaced atomically. An interrupted or failed
    write leaves no partial file and nothing of the temporary folder (SIGTERM / SIGHUP included:
    `pool.writer.signals_as_exit`). A new folder and its files get the modes ``mkdir`` and ``open``
    give under the umask; an existing folder and the files it replaces keep theirs
    (`pool.writer.written_mode`).

    Args:
        encoder: an `ImageEncoder` (its ``arch`` and ``val_preprocess`` are used).
        destination: the folder (``~`` is expanded).

    Returns:
        The folder.

    Raises:
        CorruptCheckpointError: ``model.safetensors`` did not read back identical.
        PoolError: open_clip's BPE vocabulary file is missing or damaged.
    """
    folder = Path(destination).expanduser()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tensors = contiguous_unshared(to_hf(to_clip_keys(encoder.state_dict())))
    # transformers reads only "format"; ours keep the weights file right when used on its own
    metadata = {"format": "pt", QUICK_GELU_METADATA: str(bool(encoder.arch.quick_gelu)).lower(),
                HEADS_METADATA: str(encoder.arch.heads)}
    mean, std = _normalize_of(encoder.val_preprocess)
    with signals_as_exit():
        staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
        try:
            os.chmod(staging, written_mode(folder, folder=True))  # mkdtemp makes it 0700
            write_checked(tensors, metadata, staging / "model.safetensors")
            for name, body in (("config.json", vision_config(encoder.arch)),
                               ("preprocessor_config.json", preprocessor_config(encoder.arch.image_size, mean, std))):
                (staging / name).write_text(json.dumps(body, indent=2) + "\n")
            for name, data in tokenizer_files().items():
                (staging / name).write_bytes(data)
            _publish(staging, folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return folder


def _publish(staging: Path, folder: Path) -> None:
    """Move a written folder into place: renamed whole where ``folder`` is new or empty, else file by
    file (each replace atomic)."""
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
    if not folder.exists():
        os.rename(staging, folder)
        return
    for item in staging.iterdir():
        os.chmod(item, written_mode(folder / item.name))  # a file replaced keeps its mode
        os.replace(item, folder / item.name)
