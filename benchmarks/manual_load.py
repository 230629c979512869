"""BASELINE ONLY, never library code: the careful manual path people use today, run in a subprocess.

What a careful user does today to get a task-arithmetic encoder: ``torch.load(weights_only=False)``
(which RUNS whatever code the file carries) with ``src.modeling`` shimmed and old open_clip class
names aliased, then ``open_clip.create_model("<arch>-quickgelu", pretrained=None)`` (random init)
and ``load_state_dict``. The benchmarks run this script in its own process so its unsafe imports
and shims never touch the benchmark process. Prints one JSON line with per-round timings (import
time excluded, like the 3.6 s measured for it on the H200 machine the project started from).

    python benchmarks/manual_load.py --arch ViT-B-32 --rounds 3 PATH
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import types

import open_clip
import torch
from torch import nn


def install_shims() -> None:
    class ImageEncoder(nn.Module):  # task_vectors' src.modeling.ImageEncoder, as users re-declare it
        def forward(self, images):
            return self.model.encode_image(images)

    class ClassificationHead(nn.Linear):
        def forward(self, inputs):
            if self.normalize:
                inputs = inputs / inputs.norm(dim=-1, keepdim=True)
            return super().forward(inputs)

    src, modeling = types.ModuleType("src"), types.ModuleType("src.modeling")
    ImageEncoder.__module__ = ClassificationHead.__module__ = "src.modeling"
    modeling.ImageEncoder, modeling.ClassificationHead = ImageEncoder, ClassificationHead
    src.modeling = modeling
    sys.modules["src"], sys.modules["src.modeling"] = src, modeling
    # open_clip 2.0.2 class names the published pickles use
    import open_clip.model as ocm
    import open_clip.transformer as oct

    aliases = {"VisualTransformer": oct.VisionTransformer, "VisionTransformer": oct.VisionTransformer,
               "Transformer": oct.Transformer, "ResidualAttentionBlock": oct.ResidualAttentionBlock,
               "LayerNorm": oct.LayerNorm, "QuickGELU": oct.QuickGELU}
    for name, cls in aliases.items():
        if not hasattr(ocm, name):
            setattr(ocm, name, cls)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("path")
    parser.add_argument("--arch", default="ViT-B-32")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    install_shims()
    name = f"{args.arch}-quickgelu"
    unpickle, build, total = [], [], []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        obj = torch.load(args.path, weights_only=False, map_location="cpu")  # runs the file's code
        t1 = time.perf_counter()
        sd = {k.removeprefix("model."): v for k, v in obj.state_dict().items()}
        model = open_clip.create_model(name, pretrained=None)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        t2 = time.perf_counter()
        if unexpected or any(k.startswith("visual.") for k in missing):
            raise SystemExit(f"state dict did not fit {name}: unexpected {unexpected[:3]}, missing {missing[:3]}")
        unpickle.append(t1 - t0)
        build.append(t2 - t1)
        total.append(t2 - t0)
        del obj, sd, model
    print(json.dumps({"arch": args.arch, "model": name, "unpickle_s": unpickle, "create_and_load_s": build,
                      "total_s": total}))


if __name__ == "__main__":
    main()
