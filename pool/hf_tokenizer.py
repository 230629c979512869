"""The CLIP tokenizer files of a transformers folder, built from open_clip's own BPE vocabulary:
what lets ``CLIPProcessor.from_pretrained`` (and so FusionBench's ``load_processor``) accept a folder
`pool.hf_export` writes. No download, and no transformers or tokenizers needed to write them.

open_clip's ``SimpleTokenizer`` and transformers' ``CLIPTokenizer`` use OpenAI's one vocabulary: the
256 byte symbols, the same with ``</w>`` (end of word), one token per merge of the first 48,894 lines
of ``bpe_simple_vocab_16e6.txt.gz``, then the two special tokens at 49406 and 49407 (open_clip calls
them ``<start_of_text>`` / ``<end_of_text>``, transformers ``<|startoftext|>`` / ``<|endoftext|>``).
`tokenizer_files` builds ``vocab.json`` and ``merges.txt`` from that file as both tokenizers read it,
plus the ``tokenizer_config.json`` and ``special_tokens_map.json`` OpenAI's CLIP folders carry.

No ``tokenizer.json``: transformers (4.x and 5.x) builds the CLIP tokenizer from ``vocab.json`` and
``merges.txt`` with its own normalizer and pre-tokenizer; a hand-written ``tokenizer.json`` would
repeat the vocabulary and merges (2 MB more) and, in transformers 4.x, replace that pipeline with a copy.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
import zlib
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .errors import PoolError

__all__ = ["tokenizer_files", "clip_vocab", "bpe_merges", "bpe_path", "BOS_TOKEN", "EOS_TOKEN",
           "CONTEXT_LENGTH", "TOKENIZER_FILES"]

log = logging.getLogger("pool.convert")

#: the file open_clip ships in its package (``open_clip.tokenizer.default_bpe()``)
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
#: how many of its merges CLIP uses (``SimpleTokenizer`` and ``CLIPTokenizer`` both read this many)
N_MERGES = 49152 - 256 - 2
BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"
#: CLIP's text context: 77 tokens, start and end included
CONTEXT_LENGTH = 77
#: the names `tokenizer_files` writes, in writing order
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


def bpe_path() -> Path:
    """Where open_clip's ``bpe_simple_vocab_16e6.txt.gz`` is, found without importing open_clip
    (an import costs seconds; finding the package's folder does not).

    Returns:
        The file's path.

    Raises:
        PoolError: open_clip is not installed, or its package lacks the file.
    """
    spec = importlib.util.find_spec("open_clip")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / BPE_FILE
        if path.is_file():
            return path
    where = ", ".join(folders) or "no open_clip package on sys.path"
    raise PoolError(f"{BPE_FILE}: open_clip's BPE vocabulary is needed for the tokenizer files of a transformers "
                    f"folder; expected it in the open_clip package, found none ({where}). Reinstall it: "
                    "pip install --force-reinstall open_clip_torch.")


def bpe_merges(path: Path) -> list[tuple[str, str]]:
    """The merges CLIP uses, read as ``SimpleTokenizer`` reads them: lines 2 to 48,895 of the file,
    each two symbols.

    Args:
        path: a ``bpe_simple_vocab_16e6.txt.gz``.

    Returns:
        48,894 ``(first, second)`` pairs, in rank order.

    Raises:
        PoolError: the file is not gzip, not UTF-8, or has too few or malformed merge lines.
    """
    try:
        with gzip.open(path) as handle:
            lines = handle.read().decode("utf-8").split("\n")[1:N_MERGES + 1]
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as exc:
        raise PoolError(f"{path}: expected open_clip's gzip-compressed BPE merges, found an unreadable file "
                        f"({exc}). Reinstall open_clip: pip install --force-reinstall open_clip_torch.") from None
    merges = [tuple(line.split()) for line in lines]
    bad = next((i for i, m in enumerate(merges) if len(m) != 2), None)
    if len(merges) != N_MERGES or bad is not None:
        found = f"{len(merges)} lines" if len(merges) != N_MERGES else f"line {bad + 2}: {lines[bad]!r}"
        raise PoolError(f"{path}: expected {N_MERGES} merge lines of two symbols each after the header, found "
                        f"{found}. Reinstall open_clip: pip install --force-reinstall open_clip_torch.")
    return merges  # type: ignore[return-value]  # every tuple has two items (checked)


def clip_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """CLIP's vocabulary, token -> id, as ``SimpleTokenizer`` numbers it (transformers' special-token names).

    Args:
        merges: the merges, from `bpe_merges`.

    Returns:
        49,408 tokens for OpenAI's merges; ``<|startoftext|>`` and ``<|endoftext|>`` last.

    Example:
        >>> vocab = clip_vocab([("t", "h"), ("th", "e</w>")])
        >>> vocab["!"], vocab["!</w>"], vocab["th"], vocab["the</w>"], vocab["<|endoftext|>"]
        (0, 256, 512, 513, 515)
    """
    # open_clip's own byte -> symbol table (printable bytes stand for themselves, the others are shifted
    # past 255); a writer of these files has built an encoder, so open_clip is imported already
    from open_clip.tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    tokens = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges), BOS_TOKEN, EOS_TOKEN]
    return {token: i for i, token in enumerate(tokens)}


def _special(content: str) -> dict[str, Any]:
    """A special token as OpenAI's CLIP tokenizer files write it (an ``AddedToken``)."""
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def _special_tokens_map() -> dict[str, Any]:
    """``special_tokens_map.json``: start, end, unknown and padding tokens (padding is the end token, as
    in OpenAI's CLIP; open_clip pads with id 0 instead, which no attention mask sees)."""
    return {"bos_token": _special(BOS_TOKEN), "eos_token": _special(EOS_TOKEN), "pad_token": EOS_TOKEN,
            "unk_token": _special(EOS_TOKEN)}


def _tokenizer_config(vocab: dict[str, int]) -> dict[str, Any]:
    """``tokenizer_config.json``: the class, the context length, the special tokens and their ids."""
    added = {str(vocab[t]): {**_special(t), "special": True} for t in (BOS_TOKEN, EOS_TOKEN)}
    return {"tokenizer_class": "CLIPTokenizer", "processor_class": "CLIPProcessor",
            "model_max_length": CONTEXT_LENGTH, "do_lower_case": True, "errors": "replace",
            "add_prefix_space": False, "clean_up_tokenization_spaces": False, "added_tokens_decoder": added,
            "bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN, "unk_token": EOS_TOKEN}


def _json_bytes(body: dict[str, Any]) -> bytes:
    """JSON the way every file here is written: UTF-8, keys in the order built, one final newline."""
    return (json.dumps(body, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


@lru_cache(maxsize=1)
def tokenizer_files() -> MappingProxyType[str, bytes]:
    """The CLIP tokenizer files, name -> bytes: ``vocab.json``, ``merges.txt`` (``#version: 0.2``
    header), ``tokenizer_config.json`` (``CLIPTokenizer``, 77 tokens) and ``special_tokens_map.json``.
    The same bytes on every call and every run; built once per process (about 0.1 s).

    Returns:
        A read-only mapping, in `TOKENIZER_FILES` order.

    Raises:
        PoolError: open_clip's BPE file is missing or damaged (`bpe_path`, `bpe_merges`).
    """
    path = bpe_path()
    merges = bpe_merges(path)
    vocab = clip_vocab(merges)
    log.debug("tokenizer files built from %s (%d tokens, %d merges)", path, len(vocab), len(merges))
    files = {
        "vocab.json": (json.dumps(vocab, ensure_ascii=False) + "\n").encode("utf-8"),
        "merges.txt": ("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)).encode("utf-8"),
        "tokenizer_config.json": _json_bytes(_tokenizer_config(vocab)),
        "special_tokens_map.json": _json_bytes(_special_tokens_map()),
    }
    return MappingProxyType(files)
