"""GPU benchmarks of issue 6, as one prepared script (about 2-4 minutes on an H100/H200).

    python benchmarks/gpu_bench.py --out DIR            # full run on CUDA; writes DIR/gpu_bench.json
    python benchmarks/gpu_bench.py --out DIR --smoke    # seconds, CPU allowed: checks the script runs

Sections (each one's results are written to the JSON as soon as it finishes):

1. checkpoint to GPU, ViT-B-32 (random weights, synthesized here): ``ImageEncoder.load(path,
   device="cuda")`` from the zip pickle and from safetensors, vs ``safetensors.torch.load_file(
   device="cuda")``, ``torch.load(map_location="cuda")`` and a host-to-device copy of the same
   bytes (pinned and pageable); median of 5 after a warm-up (warm page cache).
2. encoder throughput (images/s) of ViT-B-32 (batch 1024), ViT-B-16 (512), ViT-L-14 (256) at fp32,
   tf32, bf16 autocast and bf16 weights, with TFLOP/s from ``torch.utils.flop_counter``: our
   ImageEncoder beside open_clip's own ``create_model("<arch>-quickgelu", pretrained=None)`` model
   holding the same weights (built directly on the GPU: no minutes of CPU init).
3. a multi-head evaluation step (encoder + 8 classification heads, argmax per head), images/s.

Imports: torch, safetensors, open_clip and pool (arch, checkpoint, modeling, synth) only.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib
import torch

BATCH = {"ViT-B-32": 1024, "ViT-B-16": 512, "ViT-L-14": 256}
MODES = ("fp32", "tf32", "autocast_bf16", "bf16_weights")
HEAD_CLASSES = {"Cars": 196, "DTD": 47, "EuroSAT": 10, "GTSRB": 43, "MNIST": 10, "RESISC45": 45,
                "SUN397": 397, "SVHN": 10}


class Run:
    def __init__(self, out: Path, smoke: bool, budget_s: float) -> None:
        self.out, self.smoke, self.budget_s = out, smoke, budget_s
        self.start = time.perf_counter()
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.results: dict[str, Any] = {"kind": "pool gpu_bench", "smoke": smoke, "device": self.device,
                                        "env": env_info(), "load_to_gpu": {}, "throughput": {},
                                        "multi_head": {}, "notes": []}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def over_budget(self, what: str) -> bool:
        if self.elapsed() > self.budget_s:
            self.note(f"skipped {what}: time budget of {self.budget_s:.0f} s spent")
            return True
        return False

    def note(self, text: str) -> None:
        print(f"[gpu_bench] {text}", flush=True)
        self.results["notes"].append(text)

    def save(self) -> None:
        self.results["elapsed_s"] = round(self.elapsed(), 1)
        path = self.out / "gpu_bench.json"
        path.write_text(json.dumps(self.results, indent=1, default=str))

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()


def env_info() -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cuda": torch.version.cuda, "host_cpus": __import__("os").cpu_count()}
    for name in ("open_clip", "safetensors", "pool"):
        try:
            info[name] = str(getattr(__import__(name), "__version__", "?"))
        except ImportError as exc:
            info[name] = f"missing: {exc}"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_mem_gib=round(props.total_memory / 2**30, 1),
                    sms=props.multi_processor_count)
    return info


def timed(fn: Callable[[], Any], sync: Callable[[], None], rounds: int, warmup: int = 1) -> dict[str, Any]:
    """Wall-clock median of ``rounds`` calls, synchronising the device after each."""
    for _ in range(warmup):
        fn()
        sync()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "rounds": rounds}


# -- 1. checkpoint to GPU ----------------------------------------------------------------------
def load_to_gpu(run: Run) -> None:
    import safetensors.torch

    from pool.checkpoint import load_state_dict
    from pool.modeling import ImageEncoder

    files = benchlib.ensure_checkpoints("ViT-B-32", finetuned=0, log=run.note)
    dev, rounds = run.device, (1 if run.smoke else 5)
    sd = torch.load(files["state_dict"], mmap=True, weights_only=True)
    nbytes = sum(t.numel() * t.element_size() for t in sd.values())
    res: dict[str, Any] = {"arch": "ViT-B-32", "tensor_bytes": nbytes,
                           "file_bytes": {k: files[k].stat().st_size for k in ("zip", "safetensors", "state_dict")}}
    cases: dict[str, Callable[[], Any]] = {
        "ours: ImageEncoder.load(zip pickle, device)": lambda: ImageEncoder.load(files["zip"], device=dev),
        "ours: ImageEncoder.load(safetensors, device)": lambda: ImageEncoder.load(files["safetensors"], device=dev),
        "ours: load_state_dict(zip pickle, map_location)": lambda: load_state_dict(files["zip"], map_location=dev),
        "safetensors.torch.load_file(device)": lambda: safetensors.torch.load_file(str(files["safetensors"]), device=dev),
        "torch.load(state_dict, map_location)": lambda: torch.load(files["state_dict"], map_location=dev, weights_only=True),
        "torch.load(state_dict, mmap) + .to(device) per tensor": lambda: {
            k: v.to(dev, non_blocking=True) for k, v in torch.load(files["state_dict"], mmap=True, weights_only=True).items()},
    }
    if dev == "cuda":
        pageable = torch.empty(nbytes, dtype=torch.uint8)
        pageable.fill_(1)
        pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        pinned.fill_(1)
        target = torch.empty(nbytes, dtype=torch.uint8, device=dev)
        cases["host-to-device copy, pinned"] = lambda: target.copy_(pinned, non_blocking=True)
        cases["host-to-device copy, pageable"] = lambda: target.copy_(pageable, non_blocking=True)
    else:
        run.note("load_to_gpu: no CUDA, host-to-device copies skipped")
    timings = {}
    for name, fn in cases.items():
        timings[name] = timed(fn, run.sync, rounds)
        print(f"[gpu_bench] load {name}: {timings[name]['median_s'] * 1e3:.1f} ms", flush=True)
    res["timings"] = timings

    def ratio(a: str, b: str) -> float | None:
        return timings[a]["median_s"] / timings[b]["median_s"] if a in timings and b in timings else None

    pinned_key = "host-to-device copy, pinned"
    res["ratios"] = {
        "ours zip / pinned copy (target <= 2)": ratio("ours: ImageEncoder.load(zip pickle, device)", pinned_key),
        "ours safetensors / pinned copy (target <= 2)": ratio("ours: ImageEncoder.load(safetensors, device)", pinned_key),
        "ours zip / safetensors.load_file (target < 1)": ratio("ours: ImageEncoder.load(zip pickle, device)",
                                                               "safetensors.torch.load_file(device)"),
        "ours safetensors / safetensors.load_file (target < 1)": ratio(
            "ours: ImageEncoder.load(safetensors, device)", "safetensors.torch.load_file(device)"),
    }
    if dev == "cuda":
        res["pinned_copy_gb_per_s"] = nbytes / timings[pinned_key]["median_s"] / 1e9
        del pinned, pageable, target
    run.results["load_to_gpu"] = res
    run.save()


# -- 2. throughput ----------------------------------------------------------------------------------
def build_pair(name: str, device: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(ours, open_clip's) for ``name``, same random weights, both built on ``device``."""
    import open_clip

    from pool.modeling import ImageEncoder

    with torch.device(device):
        reference = open_clip.create_model(f"{name}-quickgelu", pretrained=None, device=device)
    reference.eval()
    sd = {k: v.detach().clone() for k, v in reference.state_dict().items() if not k.startswith("transformer.")}
    ours = ImageEncoder.from_state_dict(sd, model_name=name, device=device).eval()
    del reference.transformer  # text tower unused: free its memory (encode_image does not touch it)
    return ours, reference


class OpenCLIPImage(torch.nn.Module):
    """open_clip's model, called the way its users call it for images."""

    def __init__(self, clip: torch.nn.Module) -> None:
        super().__init__()
        self.clip = clip

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(images)


def set_tf32(on: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


def mode_context(mode: str, device: str):
    if mode == "autocast_bf16":
        return torch.autocast(device_type=device, dtype=torch.bfloat16)
    return nullcontext()


def throughput_of(run: Run, model: torch.nn.Module, images: torch.Tensor, mode: str, min_time: float) -> dict[str, Any]:
    """images/s: CUDA-event (or wall) time per batch, median over >= 3 batches and >= min_time."""
    dev = run.device
    iters_warm = 0 if run.smoke else 2
    with torch.inference_mode(), mode_context(mode, dev):
        for _ in range(iters_warm):
            model(images)
        run.sync()
        times: list[float] = []
        while len(times) < (1 if run.smoke else 3) or (sum(times) < min_time and len(times) < 50):
            if dev == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                model(images)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                model(images)
                times.append(time.perf_counter() - t0)
    per_batch = statistics.median(times)
    return {"batch_s": per_batch, "images_per_s": images.shape[0] / per_batch, "batches": len(times)}


def flops_per_image(model: torch.nn.Module, images: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    n = min(4, images.shape[0])
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(images[:n])
    return counter.get_total_flops() / n


def throughput(run: Run, archs: list[str]) -> None:
    dev = run.device
    min_time = 0.0 if run.smoke else 0.8
    for name in archs:
        if run.over_budget(f"throughput of {name}"):
            break
        batch = 2 if run.smoke else BATCH[name]
        t0 = time.perf_counter()
        ours, reference = build_pair(name, dev)
        ref = OpenCLIPImage(reference)
        build_s = time.perf_counter() - t0
        size = ours.model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        images = torch.randn(batch, 3, size, size, device=dev, generator=torch.Generator(dev).manual_seed(0))
        set_tf32(False)
        with torch.inference_mode():
            diff = (ours(images[:4]) - ref(images[:4])).abs().max().item()
        flops = flops_per_image(ours, images)
        entry: dict[str, Any] = {"batch": batch, "image_size": size, "gflop_per_image": flops / 1e9,
                                 "build_both_s": build_s, "max_abs_diff_fp32_ours_vs_open_clip": diff, "modes": {}}
        for mode in MODES if not run.smoke else ("fp32", "autocast_bf16", "bf16_weights"):
            if run.over_budget(f"{name} {mode}"):
                break
            set_tf32(mode != "fp32")
            x = images
            if mode == "bf16_weights":
                ours.to(torch.bfloat16)
                ref.to(torch.bfloat16)
                x = images.to(torch.bfloat16)
            row: dict[str, Any] = {}
            for label, model in (("ours", ours), ("open_clip", ref)):
                r = throughput_of(run, model, x, mode, min_time)
                r["tflop_per_s"] = flops * r["images_per_s"] / 1e12
                row[label] = r
            row["ours / open_clip"] = row["ours"]["images_per_s"] / row["open_clip"]["images_per_s"]
            entry["modes"][mode] = row
            print(f"[gpu_bench] {name} {mode:>14}: ours {row['ours']['images_per_s']:>9,.0f} img/s "
                  f"({row['ours']['tflop_per_s']:.0f} TFLOP/s), open_clip {row['open_clip']['images_per_s']:>9,.0f} "
                  f"img/s, ratio {row['ours / open_clip']:.3f}", flush=True)
        set_tf32(False)
        run.results["throughput"][name] = entry
        run.save()
        multi_head(run, name, ours, images)
        del ours, ref, reference, images
        if dev == "cuda":
            torch.cuda.empty_cache()


# -- 3. multi-head evaluation ----------------------------------------------------------------------
def multi_head(run: Run, name: str, encoder: torch.nn.Module, images: torch.Tensor) -> None:
    """Encoder + 8 heads on one batch (merged-model evaluation), bf16 weights and bf16 autocast."""
    from pool.modeling import ClassificationHead

    if run.over_budget(f"multi-head step of {name}"):
        return
    dev = run.device
    g = torch.Generator(dev).manual_seed(1)
    embed = encoder.embed_dim
    heads = [ClassificationHead(True, torch.randn(c, embed, device=dev, generator=g)).to(dev).eval()
             for c in HEAD_CLASSES.values()]
    min_time = 0.0 if run.smoke else 0.8
    out: dict[str, Any] = {"heads": HEAD_CLASSES, "batch": images.shape[0]}
    for mode in ("autocast_bf16", "bf16_weights"):
        dtype = torch.bfloat16 if mode == "bf16_weights" else torch.float32
        encoder.to(dtype)
        for head in heads:
            head.to(dtype)
        x = images.to(dtype)

        def step(batch: torch.Tensor) -> list[torch.Tensor]:
            features = encoder(batch)
            return [head(features).argmax(dim=-1) for head in heads]

        step_module = _Callable(step)
        set_tf32(True)
        with_heads = throughput_of(run, step_module, x, mode, min_time)
        alone = throughput_of(run, encoder, x, mode, min_time)
        out[mode] = {"encoder_plus_8_heads_images_per_s": with_heads["images_per_s"],
                     "encoder_alone_images_per_s": alone["images_per_s"],
                     "heads_overhead": alone["images_per_s"] / with_heads["images_per_s"] - 1}
        print(f"[gpu_bench] {name} multi-head {mode}: {with_heads['images_per_s']:,.0f} img/s with 8 heads, "
              f"{alone['images_per_s']:,.0f} encoder alone", flush=True)
    set_tf32(False)
    run.results["multi_head"][name] = out
    run.save()


class _Callable:
    def __init__(self, fn: Callable[[torch.Tensor], Any]) -> None:
        self.fn = fn

    def __call__(self, x: torch.Tensor) -> Any:
        return self.fn(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for gpu_bench.json")
    parser.add_argument("--smoke", action="store_true", help="tiny batches, one round, CPU allowed")
    parser.add_argument("--archs", default=None, help="comma separated (default: ViT-B-32,ViT-B-16,ViT-L-14; smoke: ViT-B-32)")
    parser.add_argument("--budget-s", type=float, default=270.0, help="skip what remains after this many seconds")
    parser.add_argument("--skip-load", action="store_true", help="skip the checkpoint-to-GPU section")
    parser.add_argument("--skip-throughput", action="store_true", help="skip throughput and multi-head")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.smoke:
        raise SystemExit("gpu_bench: no CUDA device; use --smoke to check the script on CPU")
    args.out.mkdir(parents=True, exist_ok=True)
    run = Run(args.out, args.smoke, args.budget_s)
    archs = args.archs.split(",") if args.archs else (["ViT-B-32"] if args.smoke else list(BATCH))
    print(f"[gpu_bench] {json.dumps(run.results['env'])}", flush=True)
    if not args.skip_load:
        load_to_gpu(run)
    if not args.skip_throughput:
        throughput(run, archs)
    run.save()
    print(f"[gpu_bench] done in {run.elapsed():.0f} s: {args.out / 'gpu_bench.json'}", flush=True)


if __name__ == "__main__":
    main()
