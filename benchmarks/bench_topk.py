"""The top-k pass (Fig. 2) against a plain forward pass over the same data, in one process.

    .venv/bin/python benchmarks/bench_topk.py

``zfnet-small`` over the first 3,000 Fashion-MNIST test images, layers conv1..conv5, k = 9, batches of
256: ``top_k`` (data, preprocessing, forward to conv5, per-map maxima, streaming merge) against
the same loop running the whole model and nothing else. The bar: at most 1.1x.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from deconvnet.data import batches, open_source, preprocess_for
from deconvnet.models import build_model
from deconvnet.topk import top_k

LAYERS = ["conv1", "conv2", "conv3", "conv4", "conv5"]


def timed(fn) -> tuple[float, float]:
    """(wall-clock, CPU) seconds; CPU time is less disturbed by other jobs on a shared machine."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = build_model("zfnet-small", 10).eval()
    pre = preprocess_for(28, 1)
    source = open_source("fashion-mnist:test", 28, 1)
    indices = torch.arange(min(args.limit, len(source)))

    @torch.inference_mode()
    def plain():
        for raw, _ in batches(source, indices, args.batch_size):
            model(pre.eval(raw))

    def ours():
        return top_k(model, source, pre, LAYERS, k=9, indices=indices, batch_size=args.batch_size)

    plain(), ours()  # warm-up
    plain_s, ours_s = [], []
    for _ in range(args.repeats):  # interleaved, so a load spike on the machine hits both alike
        plain_s.append(timed(plain))
        ours_s.append(timed(ours))
    plain_wall, plain_cpu = min(t[0] for t in plain_s), min(t[1] for t in plain_s)
    ours_wall, ours_cpu = min(t[0] for t in ours_s), min(t[1] for t in ours_s)
    print(json.dumps({
        "model": "zfnet-small", "images": len(indices), "layers": LAYERS, "k": 9, "batch_size": args.batch_size,
        "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
        "plain_forward_s": round(plain_wall, 3), "top_k_s": round(ours_wall, 3),
        "ratio": round(ours_wall / plain_wall, 3),
        "plain_forward_cpu_s": round(plain_cpu, 3), "top_k_cpu_s": round(ours_cpu, 3),
        "ratio_cpu": round(ours_cpu / plain_cpu, 3),
    }, indent=1))


if __name__ == "__main__":
    main()
