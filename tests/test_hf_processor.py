"""A folder ``convert --to hf`` writes is a whole transformers CLIP folder (issue 24): ``CLIPProcessor``
and ``AutoProcessor`` load it, its tokenizer (built from open_clip's own BPE file, pool.hf_tokenizer)
gives open_clip's token ids, its image half does what open_clip's eval transform does, and the folder
is written byte for byte the same every time and still reads back in pool. The vocabulary checks need
only open_clip; the rest needs transformers (skipped without it). All offline.
"""

from __future__ import annotations

import gzip
import html
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import examples
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors import safe_open

from pool import ImageEncoder, PoolError, synth
from pool.checkpoint import read_checkpoint
from pool.cli import main
from pool.convert import convert_to_hf
from pool.hf_tokenizer import (
    BOS_TOKEN,
    CONTEXT_LENGTH,
    EOS_TOKEN,
    TOKENIZER_FILES,
    bpe_merges,
    bpe_path,
    clip_vocab,
    tokenizer_files,
)

try:
    import transformers
    HAS_TRANSFORMERS = transformers.utils.is_torch_available()  # a transformers too new for this torch: no
except ImportError:
    HAS_TRANSFORMERS = False
needs_transformers = pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is the optional extra pool[hf]")

#: the zero-shot templates task-arithmetic checkpoints are evaluated with (a sample), and class names
#: with capitals, digits, hyphens, apostrophes and slashes
TEMPLATES = ("a photo of a {}.", "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
             "a rendering of a {}.", "graffiti of a {}.", "a cropped photo of the {}.", "a tattoo of a {}.",
             "itap of a {}.", "a photo of the {}, a type of pet.", "a centered satellite photo of {}.",
             "a photo of a {}, a type of aircraft.", "a photo of my {}.", "a black and white photo of the {}.",
             "a low resolution photo of the {}.", "a {} texture.", "a photo of the number: \"{}\".",
             "a photo of a {}, a type of food.", "art of the {}.", "a pixelated photo of the {}.")
CLASSES = ("dog", "Golden Retriever", "2012 BMW M3 coupe", "Boeing 737-800", "AnnualCrop", "7", "banded",
           "St. Bernard", "jack-o'-lantern", "Ford F-150 Regular Cab 2007", "forest/woodland", "T-shirt")
#: punctuation, digits, mixed case and spacing that both tokenizers must split alike
OTHERS = ("", "   ", "Hello, World!", "WHAT?!...", "it's 3:45pm -- isn't it?", "e=mc^2 (1905)", "100%",
          "don't DON'T Don't", "mixedCASE camelCase snake_case", "tabs\tand\nnew lines", "$12.50 #1 @home",
          "a.b.c 1.2.3 x,y;z", "{}[]()<>|\\/~`", "ALLCAPS 123456789", "    leading and trailing    ")
PROMPTS = [t.format(c) for t in TEMPLATES for c in CLASSES] + list(OTHERS)


def open_clip_ids(texts: list[str]) -> list[list[int]]:
    """open_clip's ids without its padding (it pads with 0 to 77; transformers does not pad unless asked)."""
    import open_clip

    rows = open_clip.tokenize(texts).tolist()
    return [row[:row.index(49407) + 1] for row in rows]


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, Path]:
    """An encoder at 224 px (so that resizing and cropping happen) and its transformers folder."""
    root = tmp_path_factory.mktemp("hf_processor")
    arch = replace(synth.TINY, image_size=224, patch_size=32)
    src = synth.save_module(synth.make_original_encoder(arch, seed=0), root / "enc.pt", "zip")
    convert_to_hf(src, root / "hf")
    return src, root / "hf"


@pytest.fixture(scope="module")
def processor(converted):
    from transformers import CLIPProcessor

    return CLIPProcessor.from_pretrained(converted[1])


# -- the files, without transformers ---------------------------------------------------------------------
def test_vocabulary_and_merges_are_open_clips_own():
    """Token for token and rank for rank what open_clip's SimpleTokenizer builds from the same file
    (only the two special tokens are spelt the transformers way)."""
    from open_clip.tokenizer import SimpleTokenizer

    theirs = SimpleTokenizer()
    merges = bpe_merges(bpe_path())
    ours = clip_vocab(merges)
    renamed = {"<start_of_text>": BOS_TOKEN, "<end_of_text>": EOS_TOKEN}
    assert ours == {renamed.get(token, token): i for token, i in theirs.encoder.items()}
    assert len(ours) == 49408 and ours[BOS_TOKEN] == 49406 and ours[EOS_TOKEN] == 49407
    assert {m: i for i, m in enumerate(merges)} == theirs.bpe_ranks


def test_the_files_say_what_openais_clip_tokenizer_files_say():
    files = tokenizer_files()
    assert tuple(files) == TOKENIZER_FILES
    vocab = json.loads(files["vocab.json"])
    merges = files["merges.txt"].decode("utf-8").split("\n")
    assert merges[0] == "#version: 0.2" and merges[-1] == "" and len(merges) == 48894 + 2
    assert vocab == clip_vocab([tuple(line.split(" ")) for line in merges[1:-1]])
    config = json.loads(files["tokenizer_config.json"])
    assert config["tokenizer_class"] == "CLIPTokenizer" and config["model_max_length"] == CONTEXT_LENGTH == 77
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == (BOS_TOKEN, EOS_TOKEN, EOS_TOKEN)
    assert {k: v["content"] for k, v in config["added_tokens_decoder"].items()} == {"49406": BOS_TOKEN,
                                                                                 "49407": EOS_TOKEN}
    special = json.loads(files["special_tokens_map.json"])
    assert special["pad_token"] == EOS_TOKEN and special["bos_token"]["content"] == BOS_TOKEN


def test_a_damaged_bpe_file_is_a_pool_error_naming_it(tmp_path):
    short = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    short.write_bytes(gzip.compress(b"#version: 0.2\ni n\nt h\n"))
    with pytest.raises(PoolError, match=r"bpe_simple_vocab_16e6\.txt\.gz: expected 48894 merge lines.*found 3 "
                                        r"lines.*pip install --force-reinstall open_clip_torch"):
        bpe_merges(short)
    (tmp_path / "plain.gz").write_bytes(b"not gzip")
    with pytest.raises(PoolError, match=r"plain\.gz: expected open_clip's gzip-compressed BPE merges"):
        bpe_merges(tmp_path / "plain.gz")


def test_without_open_clip_the_error_says_how_to_install(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(PoolError, match=r"no open_clip package on sys\.path.*pip install"):
        bpe_path()


def test_a_folder_written_twice_is_byte_identical(converted, tmp_path):
    """Every JSON and text file byte for byte; model.safetensors tensor for tensor with the same
    metadata (safetensors writes its metadata keys in hash order, which changes from write to write)."""
    src, first = converted
    convert_to_hf(src, tmp_path / "again")
    convert_to_hf(src, tmp_path / "again", force=True)  # rewritten in place, file by file
    files = sorted(p.name for p in first.iterdir())
    assert files == sorted(p.name for p in (tmp_path / "again").iterdir())
    assert sorted({*TOKENIZER_FILES, "config.json", "preprocessor_config.json", "model.safetensors"}) == files
    for name in sorted(set(files) - {"model.safetensors"}):
        assert (first / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name
    with safe_open(first / "model.safetensors", "pt") as a, safe_open(tmp_path / "again" / "model.safetensors",
                                                                       "pt") as b:
        assert a.metadata() == b.metadata() and list(a.keys()) == list(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())


def test_the_folder_still_reads_back_in_pool(converted, tmp_path):
    src, folder = converted
    assert read_checkpoint(folder, cache_dir=False).root_type == "transformers CLIPVisionModelWithProjection"
    assert main(["convert", str(folder), str(tmp_path / "back.safetensors")]) == 0
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for path in (folder, tmp_path / "back.safetensors"):
            torch.testing.assert_close(ImageEncoder.load(path).eval()(x), ImageEncoder.load(src).eval()(x),
                                       atol=0, rtol=0)


# -- transformers ------------------------------------------------------------------------------------------
@needs_transformers
def test_clip_processor_and_auto_processor_load_the_folder(converted, processor):
    from transformers import AutoProcessor, AutoTokenizer, CLIPImageProcessor, CLIPProcessor, CLIPTokenizer

    auto = AutoProcessor.from_pretrained(converted[1])
    for loaded in (processor, auto):
        assert type(loaded) is CLIPProcessor
        assert isinstance(loaded.tokenizer, CLIPTokenizer) and isinstance(loaded.image_processor, CLIPImageProcessor)
    tokenizer = AutoTokenizer.from_pretrained(converted[1])
    assert isinstance(tokenizer, CLIPTokenizer) and len(tokenizer) == 49408
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (49406, 49407, 49407)
    assert tokenizer.model_max_length == 77


@needs_transformers
def test_token_ids_equal_open_clips_on_templates_punctuation_digits_and_case(processor):
    ids = processor.tokenizer(PROMPTS, truncation=True)["input_ids"]
    assert len(PROMPTS) == 255
    theirs = open_clip_ids(PROMPTS)
    assert [(p, a) for p, a, b in zip(PROMPTS, ids, theirs, strict=True) if a != b] == []


@needs_transformers
def test_long_prompts_are_cut_to_77_tokens_the_same_way(processor):
    texts = [" ".join(f"word{i}" for i in range(200)), "a photo of a " + "very " * 100 + "big dog."]
    ids = processor.tokenizer(texts, truncation=True)["input_ids"]
    assert [len(row) for row in ids] == [77, 77] and all(row[-1] == 49407 for row in ids)
    assert ids == open_clip_ids(texts)


@needs_transformers
def test_where_the_tokenizers_differ_is_open_clips_text_cleaning(processor):
    """open_clip runs ftfy.fix_text and unescapes HTML twice before tokenizing; transformers 5's
    CLIPTokenizer does neither (NFC, whitespace and lower case only), and it reads its own special
    tokens out of the text, which open_clip (spelling them <start_of_text>) does not. After open_clip's
    cleaning the ids are equal again: the vocabulary and merges are the same."""
    from open_clip.tokenizer import basic_clean

    for text in ("fish &amp; chips", "ﬁve ligatures", "caf\u00e9 &lt;3"):
        assert processor.tokenizer(text)["input_ids"] != open_clip_ids([text])[0], text
        assert processor.tokenizer(basic_clean(text))["input_ids"] == open_clip_ids([text])[0], text
    assert processor.tokenizer("<|endoftext|>")["input_ids"] == [49406, 49407, 49407]


# printable ASCII with tabs and new lines, but no "&": an HTML entity is the cleaning difference above
ASCII_TEXT = st.text(st.sampled_from([chr(c) for c in range(0x20, 0x7F) if chr(c) != "&"] + ["\t", "\n"]),
                     max_size=200)


@needs_transformers
@settings(max_examples=examples(300), deadline=None)
@given(text=ASCII_TEXT)
def test_token_ids_equal_open_clips_on_any_ascii_text(processor, text):
    assert html.unescape(text) == text
    assert processor.tokenizer(text, truncation=True)["input_ids"] == open_clip_ids([text])[0]


@needs_transformers
def test_the_image_half_does_what_the_eval_transform_does(converted, processor):
    """As tests/test_hf.py finds for CLIPImageProcessor alone: identical where no resizing happens,
    within 2 grey levels (0.028 after normalisation) where it does; text and images in one call."""
    transform = ImageEncoder.load(converted[0]).val_preprocess
    rng = np.random.default_rng(0)
    worst = 0.0
    texts = ["a photo of a dog.", "itap of a cat."]
    for size in ((224, 224), (300, 200), (640, 480), (97, 151)):
        image = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
        ours = transform(image)
        out = processor(text=texts, images=image, return_tensors="pt", padding=True)
        theirs = out["pixel_values"][0]
        assert ours.shape == theirs.shape == (3, 224, 224)
        if size == (224, 224):  # the same pixels; float rounding in the normalisation only
            torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
        worst = max(worst, float((ours - theirs).abs().max()))
        lengths = out["attention_mask"].sum(1).tolist()
        got = [row[:n] for row, n in zip(out["input_ids"].tolist(), lengths, strict=True)]
        assert got == open_clip_ids(texts)
    assert worst < 0.04


@needs_transformers
def test_the_model_still_loads_with_the_tokenizer_files_beside_it(converted):
    from transformers import CLIPVisionModelWithProjection

    model = CLIPVisionModelWithProjection.from_pretrained(converted[1]).eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=x).image_embeds, ImageEncoder.load(converted[0]).eval()(x),
                                   atol=1e-5, rtol=0)
