"""The top-k pass (Fig. 2) against a plain forward pass over the same data, in one process.

    .venv/bin/python benchmarks/bench_topk.py
    .venv/bin/python benchmarks/bench_topk.py --model torchvision:resnet18 --limit 1000

Default: ``zfnet-small`` over the first 3,000 Fashion-MNIST test images, layers conv1..conv5, k = 9,
batches of 256: ``topk_pass`` (data, preprocessing, forward to conv5, per-map maxima, streaming merge)
against the same loop running the whole model and nothing else. The bar: at most 1.1x.

``--model SPEC`` (e.g. ``torchvision:resnet18``, random weights) runs the model under study at its
input size (224 px) over a folder of JPEGs made from Fashion-MNIST test images (upscaled to 256,
tinted), layers: the model's default stages; both loops decode the same JPEGs.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from deconvnet.data import batches, open_source, preprocess_for
from deconvnet.models import build_model
from deconvnet.topk import topk_pass

LAYERS = ["conv1", "conv2", "conv3", "conv4", "conv5"]


def timed(fn) -> tuple[float, float]:
    """(wall-clock, CPU) seconds; CPU time is less disturbed by other jobs on a shared machine."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def jpeg_folder(root: Path, count: int) -> str:
    """``count`` JPEGs at 256 px from Fashion-MNIST test images, in ten class folders: ``folder:root``."""
    source = open_source("fashion-mnist:test", 256, 3)
    tints = np.random.default_rng(0).uniform(0.4, 1.0, (count, 3))
    for i in range(count):
        cls = root / source.classes[int(source.labels[i])].replace("/", "-")
        cls.mkdir(parents=True, exist_ok=True)
        pixels = (source.get([i])[0].permute(1, 2, 0).numpy() * tints[i]).astype(np.uint8)
        Image.fromarray(pixels).save(cls / f"{i}.jpg", quality=90)
    return f"folder:{root}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a model spec (default: zfnet-small, built here)")
    parser.add_argument("--limit", type=int, default=None, help="images (default 3000; 1000 with --model)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 256; 64 with --model")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    workdir = tempfile.TemporaryDirectory()
    if args.model:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from tv import import_torchvision  # torchvision's classes on a machine whose build lacks its ops
        from deconvnet.subject import load_subject

        import_torchvision()
        subject = load_subject(args.model)
        model, pre, layers, name = subject.model, subject.preprocess, subject.stages, args.model
        limit, batch_size = args.limit or 1000, args.batch_size or 64
        source = subject.open_data(jpeg_folder(Path(workdir.name), limit))
    else:
        model, pre, layers, name = build_model("zfnet-small", 10).eval(), preprocess_for(28, 1), LAYERS, "zfnet-small"
        limit, batch_size = args.limit or 3000, args.batch_size or 256
        source = open_source("fashion-mnist:test", 28, 1)
    indices = torch.arange(min(limit, len(source)))

    @torch.inference_mode()
    def plain():
        for raw, _ in batches(source, indices, batch_size):
            model(pre.eval(raw))

    def ours():
        return topk_pass(model, source, pre, layers, k=9, indices=indices, batch_size=batch_size)

    plain(), ours()  # warm-up
    plain_s, ours_s = [], []
    for _ in range(args.repeats):  # interleaved, so a load spike on the machine hits both alike
        plain_s.append(timed(plain))
        ours_s.append(timed(ours))
    plain_wall, plain_cpu = min(t[0] for t in plain_s), min(t[1] for t in plain_s)
    ours_wall, ours_cpu = min(t[0] for t in ours_s), min(t[1] for t in ours_s)
    print(json.dumps({
        "model": name, "input": pre.input_size, "images": len(indices), "layers": layers, "k": 9,
        "batch_size": batch_size, "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
        "plain_forward_s": round(plain_wall, 3), "top_k_s": round(ours_wall, 3),
        "ratio": round(ours_wall / plain_wall, 3),
        "plain_forward_cpu_s": round(plain_cpu, 3), "top_k_cpu_s": round(ours_cpu, 3),
        "ratio_cpu": round(ours_cpu / plain_cpu, 3),
    }, indent=1))


if __name__ == "__main__":
    main()
