"""Occlusion sensitivity (Fig. 7) on ``zfnet`` and torchvision's ``resnet18`` at 224 px, 35 px square,
stride 14 (15 x 15 positions): ``deconvnet.occlusion`` (incremental, Krypton-style) against Captum's
``Occlusion`` in one process.

    .venv/bin/pip install --no-deps captum   # the benchmark's only extra; the package never imports it
    .venv/bin/python benchmarks/bench_occlusion.py [--model zfnet|resnet18|both]

Captum runs with several ``perturbations_per_eval`` (4 was slower than 16 when tried) and the best is
kept. Both map p(target) over the same 225 squares (the last row and column cut by the border);
Captum returns per-pixel attributions (the mean of p(clean) - p(occluded) over the squares covering a
pixel), so our grid is turned into the same per-pixel map and the two compared.
Our timing includes everything ``occlusion`` returns: maps (b), (d), (e) and the projection (c).
The models have random weights (``zfnet`` with He init, ``resnet18`` torchvision's own init) and the
last layer rescaled so the logits have a trained net's spread (std 4): at random init the logits
reach the hundreds, where float32 rounding alone moves p by 1e-5. ``recomputed``: the share of the
forward pass's conv multiply-adds the incremental pass recomputes per square.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

from deconvnet.data import mean_image, open_source, preprocess_for
from deconvnet.models import build_model
from deconvnet.occlusion import occlude_image


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


def build(name: str, image: torch.Tensor):
    """The model under test (eval, last layer rescaled to logits of std 4), its layer and target."""
    torch.manual_seed(0)
    if name == "zfnet":
        model, layer, last = build_model("zfnet", 1000, init="kaiming").eval(), "conv5", "fc8"
    else:
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
        from tv import import_torchvision  # torchvision's model classes on this machine's CPU torch
        model, layer, last = import_torchvision().models.resnet18().eval(), "layer3", "fc"
    with torch.no_grad():
        head = getattr(model, last)
        logits = model(image[None])
        head.weight.mul_(4 / logits.std())
        head.bias.mul_(4 / logits.std())
        target = int(model(image[None]).argmax())
    return model, layer, target


def run(name: str, image: torch.Tensor, ppes: list[int], repeats: int) -> dict:
    from captum.attr import Occlusion

    model, layer, target = build(name, image)

    def ours():
        return occlude_image(model, image, target, size=35, stride=14, layer=layer)

    def captum(ppe: int):
        def forward(x):
            return torch.softmax(model(x), dim=1)
        with torch.no_grad():
            return Occlusion(forward).attribute(image[None], sliding_window_shapes=(3, 35, 35), strides=(3, 14, 14),
                                                baselines=0.0, target=target, perturbations_per_eval=ppe)[0, 0]

    timed(ours)  # warm-up
    sweep, ours_s = {}, []
    for _ in range(repeats):  # alternated, so both sides see the same load
        result, s = timed(ours)
        ours_s.append(s)
        for ppe in ppes:
            reference, t = timed(lambda: captum(ppe))
            sweep[ppe] = min(t, sweep.get(ppe, t))
    best = min(sweep, key=sweep.get)
    mine, covered = per_pixel(result, result.clean_probability, 224, 224)
    diff = float((mine - reference)[covered].abs().max())
    return {
        "setting": f"{name} 224 px, 35 px square, stride 14, {len(result.positions)} positions, layer {layer}",
        "method": result.method, "recomputed": round(result.recomputed, 3) if result.recomputed is not None else None,
        "captum_s_by_ppe": {str(k): round(v, 3) for k, v in sweep.items()},
        "captum_best_ppe": best, "captum_s": round(sweep[best], 3),
        "ours_s_runs": [round(v, 3) for v in ours_s], "ours_s": round(min(ours_s), 3),
        "speedup": round(sweep[best] / min(ours_s), 2),
        "max_abs_diff_per_pixel_attribution": diff,
        "p_range": [float(result.probability.min()), float(result.probability.max())],
        "same_numbers_1e-5": diff <= 1e-5,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="both", choices=["zfnet", "resnet18", "both"])
    parser.add_argument("--ppe", default="16,64", help="Captum perturbations_per_eval values to try")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each side, alternated (best kept)")
    args = parser.parse_args()

    pre = preprocess_for(224, 3)
    source = open_source("fashion-mnist:test", pre.stored_size, 3)
    pre.mean = mean_image(source, pre, range(500))
    image = pre.eval(source.get([0]))[0]  # (3, 224, 224), an ankle boot, mean subtracted
    names = ["zfnet", "resnet18"] if args.model == "both" else [args.model]
    report = {"device": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
              "load_average_before": os.getloadavg()}
    for name in names:
        report[name] = run(name, image, [int(v) for v in args.ppe.split(",")], args.repeats)
        r = report[name]
        print(f"{name}: {r['speedup']}x Captum (ppe={r['captum_best_ppe']}), recomputed {r['recomputed']}, "
              f"max |diff| {r['max_abs_diff_per_pixel_attribution']:.1e}", flush=True)
    report["load_average_after"] = os.getloadavg()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
