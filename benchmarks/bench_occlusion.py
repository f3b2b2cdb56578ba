"""Occlusion sensitivity (Fig. 7) on ``zfnet`` at 224 px, 35 px square, stride 14 (15 x 15 positions):
``deconvnet.occlusion`` (incremental, Krypton-style) against Captum's ``Occlusion`` in one process.

    .venv/bin/pip install --no-deps captum   # the benchmark's only extra; the package never imports it
    .venv/bin/python benchmarks/bench_occlusion.py

Captum runs with several ``perturbations_per_eval`` (4 was slower than 16 when tried) and the best is
kept. Both map p(target) over the same 225 squares (the last row and column cut by the border);
Captum returns per-pixel attributions (the mean of p(clean) - p(occluded) over the squares covering a
pixel), so our grid is turned into the same per-pixel map and the two compared.
Our timing includes everything ``occlusion`` returns: maps (b), (d), (e) and the projection (c).
The model is ``zfnet`` with He init and fc8 rescaled so its logits have a trained net's spread (std 4):
at random init the logits reach the hundreds, where float32 rounding alone moves p by 1e-5.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from deconvnet.data import mean_image, open_source, preprocess_for
from deconvnet.models import build_model
from deconvnet.occlusion import occlusion


def per_pixel(result, clean: float, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Captum's attribution from our grid: mean over covering squares of p(clean) - p(occluded)."""
    total, count = torch.zeros(height, width, dtype=torch.float64), torch.zeros(height, width)
    for (t, l), p in zip(result.positions, result.probability.flatten().tolist()):
        total[t:t + result.size, l:l + result.size] += clean - p
        count[t:t + result.size, l:l + result.size] += 1
    return (total / count).float(), count > 0


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ppe", default="16,64,225", help="Captum perturbations_per_eval values to try")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each side (best kept)")
    args = parser.parse_args()
    from captum.attr import Occlusion

    torch.manual_seed(0)
    model = build_model("zfnet", 1000, init="kaiming").eval()  # He init: non-saturated outputs at random
    pre = preprocess_for(224, 3)
    source = open_source("fashion-mnist:test", pre.stored_size, 3)
    pre.mean = mean_image(source, pre, range(500))
    image = pre.eval(source.get([0]))[0]  # (3, 224, 224), an ankle boot, mean subtracted
    with torch.no_grad():
        logits = model(image[None])
        model.fc8.weight.mul_(4 / logits.std())
        model.fc8.bias.mul_(4 / logits.std())
        target = int(model(image[None]).argmax())

    def ours():
        return occlusion(model, image, target, size=35, stride=14, layer="conv5")

    def captum(ppe: int):
        def forward(x):
            return torch.softmax(model(x), dim=1)
        with torch.no_grad():
            return Occlusion(forward).attribute(image[None], sliding_window_shapes=(3, 35, 35), strides=(3, 14, 14),
                                                baselines=0.0, target=target, perturbations_per_eval=ppe)[0, 0]

    timed(ours)  # warm-up
    ours_s = []
    for _ in range(args.repeats):
        result, s = timed(ours)
        ours_s.append(s)
    sweep = {}
    for ppe in [int(v) for v in args.ppe.split(",")]:
        reference, sweep[ppe] = timed(lambda: captum(ppe))
    best = min(sweep, key=sweep.get)
    captum_s = [sweep[best]] + [timed(lambda: captum(best))[1] for _ in range(args.repeats - 1)]

    mine, covered = per_pixel(result, result.clean_probability, 224, 224)
    diff = float((mine - reference)[covered].abs().max())
    report = {
        "device": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "setting": f"zfnet 224 px, 35 px square, stride 14, {len(result.positions)} positions, layer conv5",
        "captum_s_by_ppe": {str(k): round(v, 3) for k, v in sweep.items()},
        "captum_best_ppe": best,
        "captum_s": round(min(captum_s), 3),
        "ours_s": round(min(ours_s), 3),
        "speedup": round(min(captum_s) / min(ours_s), 2),
        "max_abs_diff_per_pixel_attribution": diff,
        "p_range": [float(result.probability.min()), float(result.probability.max())],
        "same_numbers_1e-5": diff <= 1e-5,
    }
    print(json.dumps(report, indent=2))
    print(f"occlusion: {report['speedup']}x faster than Captum (ppe={best}), max |diff| {diff:.1e}")


if __name__ == "__main__":
    main()
