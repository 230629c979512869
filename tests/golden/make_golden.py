#!/usr/bin/env python
"""Write the golden checkpoints: tiny encoders and heads pickled the way task_vectors did.

Standalone on purpose: it imports neither ``pool`` nor anything from this repository. It needs the
*old* open_clip (2.0.2, the version the published task-vector checkpoints were written with) first
on the path::

    PYTHONPATH=/path/to/open_clip_torch-2.0.2 python tests/golden/make_golden.py tests/data/golden

(``pip install --no-deps --target /path/to/oc202 open_clip_torch==2.0.2``; it needs ftfy and regex,
which a current open_clip install brings along.)

What it writes, per architecture ``<arch>`` (see ``ARCHS``):

* ``enc_<arch>.zip.pt``        ``torch.save(encoder)``, torch's zip container
* ``enc_<arch>.legacy.pt``     ``torch.save(encoder, _use_new_zipfile_serialization=False)``
* ``enc_<arch>.pickle.pt``     ``pickle.dump(encoder, f)``: storages nested as legacy blobs through
                               ``torch.storage._load_from_bytes``; ``torch.load`` refuses it
* ``enc_<arch>.state_dict.pt`` ``torch.save(encoder.state_dict())`` (keys with the ``model.`` prefix)
* ``head_<arch>.zip.pt``       ``torch.save(ClassificationHead)``
* ``head_<arch>.pickle.pt``    ``pickle.dump(ClassificationHead, f)``
* ``expected_<arch>.safetensors``  float32 tensors: ``input``, ``features`` = encoder(input),
                               ``logits`` = head(features), ``state_dict.<key>`` for every key of
                               ``encoder.state_dict()``; the arch config in the safetensors metadata

and ``manifest.json`` (see ``tests/golden/manifest.py``) describing every file.

The encoder is a ``src.modeling.ImageEncoder`` exactly as mlfoundations/task_vectors defined it
(``.model``, ``.train_preprocess``, ``.val_preprocess``, ``.cache_dir``; text ``transformer``
deleted), built by ``open_clip.create_model_and_transforms(name, pretrained='')`` from a tiny config
registered in-process; no download. Weights are then perturbed with a seeded generator so that no
parameter keeps its trivial init (LayerNorm 1/0, zero biases) and the features are not degenerate.

After writing, the script re-reads every file (``torch.load(weights_only=False)`` / ``pickle.load``:
trusted, self-written files, *only* here) and checks state dicts and features; ``--no-verify`` skips.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import io
import json
import linecache
import os
import pickle
import pickletools
import platform
import shlex
import sys
import types
import zipfile
from pathlib import Path

import torch
from manifest import sha256_file  # sibling helper, dependency-free (the script's folder is on sys.path)

# --------------------------------------------------------------------------------------------
# src.modeling, as in mlfoundations/task_vectors (minus argparse plumbing and downloads).
# Compiled into a real module named ``src.modeling`` so pickles name ``src.modeling.ImageEncoder``.
# --------------------------------------------------------------------------------------------

_MODELING_SRC = """
import torch

import open_clip


class ImageEncoder(torch.nn.Module):
    def __init__(self, name, pretrained="", cache_dir=None, keep_lang=False):
        super().__init__()
        self.model, self.train_preprocess, self.val_preprocess = open_clip.create_model_and_transforms(
            name, pretrained=pretrained
        )
        self.cache_dir = cache_dir
        if not keep_lang and hasattr(self.model, "transformer"):
            delattr(self.model, "transformer")

    def forward(self, images):
        assert self.model is not None
        return self.model.encode_image(images)

    def __call__(self, inputs):
        return self.forward(inputs)


class ClassificationHead(torch.nn.Linear):
    def __init__(self, normalize, weights, biases=None):
        output_size, input_size = weights.shape
        super().__init__(input_size, output_size)
        self.normalize = normalize
        if weights is not None:
            self.weight = torch.nn.Parameter(weights.clone())
        if biases is not None:
            self.bias = torch.nn.Parameter(biases.clone())
        else:
            self.bias = torch.nn.Parameter(torch.zeros_like(self.bias))

    def forward(self, inputs):
        if self.normalize:
            inputs = inputs / inputs.norm(dim=-1, keepdim=True)
        return super().forward(inputs)

    def __call__(self, inputs):
        return self.forward(inputs)
"""


_MODELING_FILE = "src/modeling.py"


def install_src_modeling() -> types.ModuleType:
    """Register ``src`` and ``src.modeling`` in ``sys.modules`` (idempotent)."""
    if "src.modeling" in sys.modules:
        return sys.modules["src.modeling"]
    src = types.ModuleType("src")
    src.__path__ = []  # a package
    modeling = types.ModuleType("src.modeling")
    modeling.__file__ = _MODELING_FILE
    # Let inspect.getsource find it: legacy torch.save stores each nn.Module class's source.
    linecache.cache[_MODELING_FILE] = (
        len(_MODELING_SRC),
        None,
        _MODELING_SRC.splitlines(keepends=True),
        _MODELING_FILE,
    )
    exec(compile(_MODELING_SRC, _MODELING_FILE, "exec"), modeling.__dict__)
    src.modeling = modeling
    sys.modules["src"] = src
    sys.modules["src.modeling"] = modeling
    return modeling


# --------------------------------------------------------------------------------------------
# Tiny architectures (open_clip model-config format).
# --------------------------------------------------------------------------------------------

_TEXT_CFG = {"context_length": 8, "vocab_size": 100, "width": 32, "heads": 1, "layers": 1}

ARCHS: dict[str, dict] = {
    # 1 attention head (width 64 / head_width 64), 2 blocks, QuickGELU like OpenAI weights.
    "tiny-vit-quickgelu": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
        "text_cfg": dict(_TEXT_CFG),
        "quick_gelu": True,
    },
    # Same shapes, nn.GELU: only the pickled module classes tell them apart.
    "tiny-vit-gelu": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
        "text_cfg": dict(_TEXT_CFG),
        "quick_gelu": False,
    },
    # 2 heads (width 128 / head_width 64), another patch size (4x4 grid), one block, QuickGELU.
    # (Width 128 costs ~0.85 MB a file; a smaller patch keeps conv1 small.)
    "tiny-vit-w128-p4-quickgelu": {
        "embed_dim": 48,
        "vision_cfg": {"image_size": 16, "layers": 1, "width": 128, "patch_size": 4},
        "text_cfg": dict(_TEXT_CFG),
        "quick_gelu": True,
    },
}

NUM_CLASSES = {"tiny-vit-quickgelu": 5, "tiny-vit-gelu": 5, "tiny-vit-w128-p4-quickgelu": 7}
BATCH = 4
SEED = 1234
PICKLE_PROTOCOL = pickle.DEFAULT_PROTOCOL  # what task_vectors' plain pickle.dump used (py3.8+: 4)


def arch_seed(arch: str) -> int:
    return SEED + sorted(ARCHS).index(arch) * 1000


def open_clip_version(open_clip) -> str:
    # 2.0.2 has no top-level __version__; it lives in open_clip.version.
    v = getattr(open_clip, "__version__", None)
    if v is None:
        from open_clip import version as _v

        v = _v.__version__
    return v


def register_configs(open_clip) -> None:
    registry = open_clip.factory._MODEL_CONFIGS  # 2.0.2: plain dict name -> config
    for name, cfg in ARCHS.items():
        registry[name] = json.loads(json.dumps(cfg))


@torch.no_grad()
def perturb_(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Move every parameter off its trivial init, deterministically."""
    for _name, p in sorted(module.named_parameters()):
        scale = 1.0 + 0.5 * torch.randn(p.shape, generator=gen)
        shift = 0.05 * torch.randn(p.shape, generator=gen)
        p.mul_(scale).add_(shift)


def build_encoder(modeling, arch: str):
    torch.manual_seed(arch_seed(arch))
    enc = modeling.ImageEncoder(arch, pretrained="", cache_dir=None)
    gen = torch.Generator().manual_seed(arch_seed(arch) + 1)
    perturb_(enc, gen)
    # MLP pre-activations a bit wider so GELU vs QuickGELU shows clearly in the features.
    with torch.no_grad():
        for blk in enc.model.visual.transformer.resblocks:
            blk.mlp.c_fc.weight.mul_(2.0)
    return enc


def build_head(modeling, arch: str):
    torch.manual_seed(arch_seed(arch) + 2)
    n, d = NUM_CLASSES[arch], ARCHS[arch]["embed_dim"]
    weights = torch.randn(n, d)
    biases = 0.1 * torch.randn(n)
    return modeling.ClassificationHead(normalize=True, weights=weights, biases=biases)


def make_input(arch: str) -> torch.Tensor:
    s = ARCHS[arch]["vision_cfg"]["image_size"]
    torch.manual_seed(0)
    return torch.rand(BATCH, 3, s, s)


def module_class_names(module: torch.nn.Module) -> list[str]:
    return sorted({f"{type(m).__module__}.{type(m).__qualname__}" for m in module.modules()})


def activation_class_names(module: torch.nn.Module) -> list[str]:
    acts = []
    for m in module.modules():
        n = type(m).__name__
        if "GELU" in n or "ReLU" in n or "SiLU" in n or "Tanh" in n:
            acts.append(f"{type(m).__module__}.{type(m).__qualname__}")
    return sorted(set(acts))


# --------------------------------------------------------------------------------------------
# Pickle introspection (no unpickling): which globals does a file name?
# --------------------------------------------------------------------------------------------

_STR_OPS = {
    "SHORT_BINUNICODE",
    "BINUNICODE",
    "BINUNICODE8",
    "UNICODE",
    "SHORT_BINSTRING",
    "BINSTRING",
    "STRING",
}
_BYTES_OPS = {"SHORT_BINBYTES", "BINBYTES", "BINBYTES8"}


def _pickle_stream_globals(data: bytes, out: set[str], nested: bool = True, count: int = 0) -> int:
    """Scan ``count`` consecutive pickles in ``data`` (0: as many as start with PROTO)."""
    buf = io.BytesIO(data)
    seen = 0
    while buf.tell() < len(data) and data[buf.tell() : buf.tell() + 1] == b"\x80":
        if count and seen == count:
            break
        seen += 1
        memo: dict[int, object] = {}
        recent: list[object] = []
        last = None
        for op, arg, _pos in pickletools.genops(buf):
            name = op.name
            if name in _STR_OPS:
                last = arg
                recent.append(arg)
            elif name in _BYTES_OPS:
                last = arg
                recent.append(None)
                if nested and isinstance(arg, bytes | bytearray) and arg[:1] == b"\x80":
                    # torch.storage._load_from_bytes: a legacy-format torch.save blob
                    _pickle_stream_globals(bytes(arg), out, nested, count=5)
            elif name == "MEMOIZE":
                memo[len(memo)] = last
                continue
            elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
                memo[int(arg)] = last
                continue
            elif name in ("BINGET", "LONG_BINGET", "GET"):
                last = memo.get(int(arg))
                recent.append(last)
            elif name == "GLOBAL":
                mod, _, qual = arg.partition(" ")
                out.add(f"{mod}.{qual}")
                last = None
                recent.append(None)
            elif name == "STACK_GLOBAL":
                mod, qual = recent[-2], recent[-1]
                out.add(f"{mod}.{qual}")
                last = None
                recent.append(None)
            else:
                last = None
                recent.append(None)
            if name == "STOP":
                break
    return buf.tell()


def pickle_globals(path: Path, container: str) -> list[str]:
    out: set[str] = set()
    if container == "zip":
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if info.filename.endswith("data.pkl"):
                    _pickle_stream_globals(zf.read(info), out)
    elif container in ("legacy", "pickle"):
        data = path.read_bytes()
        if container == "legacy":
            # magic number, protocol, sys_info, object, storage keys: consecutive pickles, then raw data
            _pickle_stream_globals(data, out, nested=False, count=5)
        else:
            _pickle_stream_globals(data, out, nested=True)
    return sorted(out)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def write_container(obj, path: Path, container: str) -> None:
    if container == "zip":
        torch.save(obj, path)
    elif container == "legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    elif container == "pickle":
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=PICKLE_PROTOCOL)
    else:  # pragma: no cover
        raise ValueError(container)


def generate(outdir: Path, verify: bool = True) -> dict:
    import open_clip
    import safetensors
    import torchvision
    from safetensors.torch import save_file

    ver = open_clip_version(open_clip)
    assert ver == "2.0.2", f"need open_clip 2.0.2 first on PYTHONPATH, got {ver} from {open_clip.__file__}"
    assert hasattr(open_clip.model, "VisualTransformer"), "not open_clip 2.0.2's model module"

    modeling = install_src_modeling()
    register_configs(open_clip)
    torch.set_num_threads(1)  # stable float reductions between runs

    outdir.mkdir(parents=True, exist_ok=True)
    for old in list(outdir.iterdir()):  # the directory is wholly generated
        if old.is_file() and (old.suffix in (".pt", ".safetensors") or old.name == "manifest.json"):
            old.unlink()

    files: list[dict] = []
    archs_meta: dict[str, dict] = {}

    for arch, cfg in ARCHS.items():
        enc = build_encoder(modeling, arch)
        head = build_head(modeling, arch)
        x = make_input(arch)
        with torch.no_grad():
            feats = enc(x)
            logits = head(feats)
        sd = enc.state_dict()
        vc = cfg["vision_cfg"]
        heads = vc["width"] // vc.get("head_width", 64)
        acts = activation_class_names(enc)
        common = {"arch": arch, "arch_config": cfg}
        archs_meta[arch] = {
            "config": cfg,
            "vision_heads": heads,
            "image_size": vc["image_size"],
            "embed_dim": cfg["embed_dim"],
            "num_classes": NUM_CLASSES[arch],
            "seed": arch_seed(arch),
            "activation_classes": acts,
            "module_classes": module_class_names(enc),
            "state_dict_keys": list(sd.keys()),
            "non_persistent_buffers": sorted(
                f"{mn}.{b}" if mn else b
                for mn, m in enc.named_modules()
                for b in getattr(m, "_non_persistent_buffers_set", ())
            ),
            "training": enc.training,
        }

        def record(name: str, kind: str, container: str, obj_type: str, common=common, **extra) -> None:
            files.append(
                {"name": name, "kind": kind, "container": container, "object": obj_type, **common, **extra}
            )

        for container in ("zip", "legacy", "pickle"):
            name = f"enc_{arch}.{container}.pt"
            write_container(enc, outdir / name, container)
            record(name, "encoder", container, "src.modeling.ImageEncoder", activation_classes=acts)
        name = f"enc_{arch}.state_dict.pt"
        torch.save(sd, outdir / name)
        record(name, "state_dict", "zip", "collections.OrderedDict", key_prefix="model.")
        for container in ("zip", "pickle"):
            name = f"head_{arch}.{container}.pt"
            write_container(head, outdir / name, container)
            record(
                name,
                "head",
                container,
                "src.modeling.ClassificationHead",
                num_classes=NUM_CLASSES[arch],
                normalize=True,
            )

        tensors = {
            "input": x.float().contiguous(),
            "features": feats.float().contiguous(),
            "logits": logits.float().contiguous(),
        }
        for k, v in sd.items():
            tensors[f"state_dict.{k}"] = v.detach().float().contiguous().clone()
        name = f"expected_{arch}.safetensors"
        # one metadata key: safetensors writes its metadata map in no fixed order
        meta = {"arch": arch, "arch_config": cfg, "open_clip": ver, "torch": torch.__version__}
        save_file(tensors, str(outdir / name), metadata={"golden": json.dumps(meta, sort_keys=True)})
        record(
            name,
            "expected",
            "safetensors",
            "dict[str, Tensor]",
            keys=["input", "features", "logits", "state_dict.<key>"],
        )

    for entry in files:
        p = outdir / entry["name"]
        entry["size"] = p.stat().st_size
        entry["sha256"] = sha256_file(p)
        if entry["container"] in ("zip", "legacy", "pickle"):
            entry["pickle_globals"] = pickle_globals(p, entry["container"])

    manifest = {
        "format": "pool-golden-manifest/1",
        "generator": "tests/golden/make_golden.py",
        "command": "PYTHONPATH=/path/to/open_clip-2.0.2 python tests/golden/make_golden.py "
        + shlex.quote(os.path.relpath(outdir)),
        "argv": [os.path.basename(sys.argv[0])] + sys.argv[1:],
        "date": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "open_clip": ver,
        "safetensors": safetensors.__version__,
        "pickle_protocol_plain": PICKLE_PROTOCOL,
        "batch": BATCH,
        "archs": archs_meta,
        "files": sorted(files, key=lambda e: e["name"]),
    }
    (outdir / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")

    if verify:
        verify_outputs(outdir, manifest)
    return manifest


# --------------------------------------------------------------------------------------------
# Self-check (trusted, self-written files only)
# --------------------------------------------------------------------------------------------


def _load_trusted(path: Path, container: str):
    if container == "pickle":
        with open(path, "rb") as f:
            return pickle.load(f)
    return torch.load(path, map_location="cpu", weights_only=False)


def verify_outputs(outdir: Path, manifest: dict) -> None:
    from safetensors.torch import load_file

    install_src_modeling()
    problems: list[str] = []
    for arch in ARCHS:
        exp = load_file(str(outdir / f"expected_{arch}.safetensors"))
        ref_sd = {k[len("state_dict.") :]: v for k, v in exp.items() if k.startswith("state_dict.")}
        for container in ("zip", "legacy", "pickle", "state_dict"):
            p = outdir / f"enc_{arch}.{container}.pt"
            obj = _load_trusted(p, "zip" if container == "state_dict" else container)
            sd = obj if container == "state_dict" else obj.state_dict()
            # safetensors does not keep insertion order; the manifest does
            if list(sd) != manifest["archs"][arch]["state_dict_keys"] or set(sd) != set(ref_sd):
                problems.append(f"{p.name}: keys differ from expected")
            for k, v in ref_sd.items():
                if not torch.equal(sd[k], v):
                    problems.append(f"{p.name}: {k} differs")
            if container != "state_dict":
                with torch.no_grad():
                    f = obj(exp["input"])
                if not torch.equal(f, exp["features"]):
                    problems.append(f"{p.name}: features differ by {(f - exp['features']).abs().max():.3g}")
                obj.eval()
                with torch.no_grad():
                    f = obj(exp["input"])
                if not torch.allclose(f, exp["features"], atol=1e-6):
                    problems.append(f"{p.name}: eval() features differ")
        for container in ("zip", "pickle"):
            p = outdir / f"head_{arch}.{container}.pt"
            head = _load_trusted(p, container)
            with torch.no_grad():
                lg = head(exp["features"])
            if not torch.allclose(lg, exp["logits"], atol=1e-6):
                problems.append(f"{p.name}: logits differ")
    # the two activations must give clearly different features from the same weights
    a, b = "tiny-vit-quickgelu", "tiny-vit-gelu"
    if a in ARCHS and b in ARCHS:
        import open_clip

        exp_b = load_file(str(outdir / f"expected_{b}.safetensors"))
        sd_b = {
            k[len("state_dict.model.") :]: v for k, v in exp_b.items() if k.startswith("state_dict.model.")
        }
        cfg = ARCHS[b]
        m = open_clip.model.CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"], quick_gelu=True)
        del m.transformer
        m.load_state_dict(sd_b)
        with torch.no_grad():
            f = m.encode_image(exp_b["input"])
        d = (f - exp_b["features"]).abs().max().item()
        print(f"GELU weights run with QuickGELU: max |diff| = {d:.4g}")
        if d <= 1e-3:
            problems.append(f"GELU vs QuickGELU features differ only by {d:.3g} (want > 1e-3)")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from manifest import verify_manifest  # sibling helper, dependency-free

    problems += verify_manifest(outdir)
    if problems:
        raise SystemExit("golden self-check failed:\n  " + "\n  ".join(problems))
    print(f"self-check ok: {len(manifest['files'])} files in {outdir}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("outdir", nargs="?", default="tests/data/golden")
    ap.add_argument("--no-verify", action="store_true", help="skip re-reading the written files")
    args = ap.parse_args(argv)
    manifest = generate(Path(args.outdir), verify=not args.no_verify)
    for e in manifest["files"]:
        print(f"{e['size']:>9}  {e['sha256'][:12]}  {e['name']}")
    print(f"total {sum(e['size'] for e in manifest['files'])} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
