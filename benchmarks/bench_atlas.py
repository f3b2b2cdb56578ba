"""Atlas throughput (Fig. 2 for every map): ``build_atlas`` against a plain forward pass over the same images.

    .venv/bin/python benchmarks/bench_atlas.py --model zfnet-small --images 10000 [--checkpoint CKPT]
    .venv/bin/python benchmarks/bench_atlas.py --model zfnet --images 1000   # about 4 min on 2 cores

Fashion-MNIST test images (upscaled to 256 and center-cropped for ``zfnet``), layers conv1..conv5,
k = 9. The atlas is timed from scratch into a fresh directory, split into its phases (top-k pass,
projections, drawing the PNGs, the rest: pages, manifest, atomic writes), then a rerun of the
finished atlas (reuse). The baseline is the same images through the whole model in batches of 256
(data, preprocessing, forward), as ``bench_topk.py`` does. Without ``--checkpoint`` the weights are
random (He init): the work is the same.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import tempfile
import time

import torch

import deconvnet.atlas as atlas_module
from deconvnet.atlas import build_atlas
from deconvnet.checkpoint import load_checkpoint
from deconvnet.data import batches, open_source, preprocess_for
from deconvnet.models import build_model

LAYERS = ["conv1", "conv2", "conv3", "conv4", "conv5"]


@torch.inference_mode()
def plain_forward(model, source, pre, n: int, batch_size: int = 256) -> None:
    for raw, _ in batches(source, torch.arange(n), batch_size):
        model(pre.eval(raw))


def timed(phases: dict, name: str, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            phases[name] = phases.get(name, 0.0) + time.perf_counter() - start
    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="zfnet-small")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--out", default=None, help="atlas directory (default: a temporary one)")
    parser.add_argument("--sample-maps", type=int, default=None,
                        help="time only the top-k pass and the first N maps of each layer, and extrapolate")
    args = parser.parse_args()
    if args.checkpoint:
        model, info = load_checkpoint(args.checkpoint)
        pre = info.preprocess
    else:
        torch.manual_seed(0)
        model = build_model(args.model, 10, init="kaiming").eval()
        pre = preprocess_for(model.config.input_size, model.config.in_channels)
    source = open_source("fashion-mnist:test", pre.stored_size, pre.channels)
    n = min(args.images, len(source))
    out = args.out or tempfile.mkdtemp(prefix="bench-atlas-")

    if args.sample_maps:
        return sampled(model, source, pre, n, args)
    load = os.getloadavg()[0]
    phases: dict = {}
    originals = {name: getattr(atlas_module, name) for name in ("topk_pass", "gallery", "_png")}
    for name, fn in originals.items():
        setattr(atlas_module, name, timed(phases, name, fn))
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        summary = build_atlas(model, source, pre, LAYERS, out, k=9, indices=range(n))
        atlas_s, atlas_cpu = time.perf_counter() - wall, time.process_time() - cpu
        wall = time.perf_counter()
        again = build_atlas(model, source, pre, LAYERS, out, k=9, indices=range(n))
        rerun_s = time.perf_counter() - wall
    finally:
        for name, fn in originals.items():
            setattr(atlas_module, name, fn)
    assert again["projected"] == 0 and again["topk_reused"]
    plain_forward(model, source, pre, min(n, 256))  # warm-up
    wall, cpu = time.perf_counter(), time.process_time()
    plain_forward(model, source, pre, n)
    forward_s, forward_cpu = time.perf_counter() - wall, time.process_time() - cpu
    maps = sum(summary["maps"].values())
    projections = maps * 9
    print(json.dumps({
        "model": args.model, "weights": args.checkpoint or "random (He init)", "images": n, "layers": LAYERS,
        "maps": maps, "projections": projections, "out": out,
        "atlas_s": round(atlas_s, 1), "atlas_cpu_s": round(atlas_cpu, 1),
        "phases_s": {"topk_pass": round(phases["topk_pass"], 1),
                     "projections": round(phases["gallery"], 1), "png": round(phases["_png"], 1),
                     "rest": round(atlas_s - phases["topk_pass"] - phases["gallery"] - phases["_png"], 1)},
        "projections_per_s": round(projections / phases["gallery"], 1),
        "rerun_s": round(rerun_s, 1),
        "plain_forward_s": round(forward_s, 2), "plain_forward_cpu_s": round(forward_cpu, 2),
        "ratio_to_forward": round(atlas_s / forward_s, 1), "ratio_to_forward_cpu": round(atlas_cpu / forward_cpu, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
        "load_average_1min": [round(load, 2), round(os.getloadavg()[0], 2)],
    }, indent=1))


def sampled(model, source, pre, n: int, args) -> None:
    """The top-k pass over ``n`` images, then the first ``--sample-maps`` maps of each layer projected and
    drawn; the projections of all maps extrapolated per layer from those."""
    from deconvnet.topk import gallery, topk_pass

    wall = time.perf_counter()
    tables = topk_pass(model, source, pre, LAYERS, k=9, indices=range(n))
    topk_s = time.perf_counter() - wall
    per_layer, total = {}, 0.0
    for layer in LAYERS:
        maps = list(range(min(args.sample_maps, tables[layer].values.shape[0])))
        wall = time.perf_counter()
        g = gallery(model, source, pre, layer, tables[layer], maps)
        for m in range(len(maps)):
            atlas_module._png(g.projections[m], g.patches[m])
        s = time.perf_counter() - wall
        every = tables[layer].values.shape[0]
        per_layer[layer] = {"maps": every, "sampled": len(maps), "s": round(s, 1),
                            "extrapolated_s": round(s * every / len(maps), 1)}
        total += s * every / len(maps)
    plain_forward(model, source, pre, min(n, 64))
    wall = time.perf_counter()
    plain_forward(model, source, pre, n)
    forward_s = time.perf_counter() - wall
    maps = sum(t.values.shape[0] for t in tables.values())
    print(json.dumps({
        "model": args.model, "weights": args.checkpoint or "random (He init)", "images": n, "maps": maps,
        "projections": maps * 9, "topk_s": round(topk_s, 1), "per_layer": per_layer,
        "maps_extrapolated_s": round(total, 1), "projections_per_s": round(maps * 9 / total, 1),
        "plain_forward_s": round(forward_s, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
    }, indent=1))


if __name__ == "__main__":
    main()
