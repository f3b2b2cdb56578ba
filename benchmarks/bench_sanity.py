"""Sanity checks (``deconvnet.sanity``) against the straightforward way on the same work: torchvision's
``resnet18`` (random weights, the last layer rescaled to logits of std 4 as in bench_occlusion.py) at
224 px, a few Fashion-MNIST test images (grey, resized, ImageNet preprocessing), the default layers
(``layer2``, ``layer4``), the three rules, 10 deletion steps, the strongest unit per image.

    .venv/bin/python benchmarks/bench_sanity.py [--images 4] [--threads 1] [--device cuda] [--flops]

The straightforward way computes every number ``sanity`` returns, with the same helpers for pixel
orders, seeds and specificity, but:

- cascading randomisation: for every layer, rule and step, a fresh ``copy.deepcopy`` of the model,
  re-initialised from the layer down to that step, then the layer's units projected (the images in
  one ``Deconvnet.project`` call, as ours);
- the measures one pair of maps at a time with SciPy's ``spearmanr`` and scikit-image's
  ``structural_similarity`` (Gaussian window, sigma 1.5, as ``sanity.ssim``);
- deletion and insertion: one forward pass per image, curve and step (batch 1, the curves' ends and
  random insertion included), the unit's activation and the class scores from the same pass.

Ours shares one randomised copy between the layers (``layer2``'s modules are a prefix of
``layer4``'s), re-initialises each module once, projects every rule from one forward pass on each
copy (``Deconvnet.projections``), computes the measures batched in PyTorch, runs each modified
image once (the clean and all-mean images once per image, random insertion reusing random
deletion's images) in batches of 16, channels-last. Specificity is the same code on both sides.
Every number is asserted equal (Spearman/SSIM to 1e-3: float rounding can swap near-ties; curve
points to 1e-4 relative). One intra-op thread by default: on two cores shared with other jobs, two
threads spent most of their time waiting on each other (a 64 px run took 59 s against 4 s with one).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
import warnings

import torch

from bench_project import CountFlops
from deconvnet.data import open_source
from deconvnet.deconvnet import RULES, Deconvnet
from deconvnet.probe import activations, resolve
from deconvnet.sanity import (_box, _specificity, _units, modified, parametrised_modules, pixel_order,
                              randomisation_steps, reinitialise, sanity, step_counts)
from deconvnet.subject import as_subject


def build() -> torch.nn.Module:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from tv import import_torchvision  # torchvision's model classes on this machine's CPU torch

    torch.manual_seed(0)
    return import_torchvision().models.resnet18().eval()


def rescale_logits(model, x: torch.Tensor) -> None:
    with torch.no_grad():
        scale = 4 / float(model(x).std())
        model.fc.weight.mul_(scale)
        model.fc.bias.mul_(scale)


MODEL_OPS = (torch.ops.aten.convolution, torch.ops.aten.convolution_backward, torch.ops.aten.addmm)
"""The model's convolutions and linear layers, forward and backward (the measures' matrix products are
not counted)."""


def similarity(original: torch.Tensor, other: torch.Tensor, box) -> tuple[float, float, float]:
    """The three measures of one pair of projections (C, H, W) within ``box``, as ``sanity`` defines
    them, with SciPy and scikit-image."""
    import numpy as np
    from scipy.stats import spearmanr
    from skimage.metrics import structural_similarity

    top, left, bottom, right = box
    a = original[:, top:bottom + 1, left:right + 1].double().cpu().numpy()
    b = other[:, top:bottom + 1, left:right + 1].double().cpu().numpy()
    abs_a, abs_b = np.abs(a).sum(0), np.abs(b).sum(0)
    structural = math.nan
    if abs_a.max() > 0 and abs_b.max() > 0:
        structural = structural_similarity(abs_a / abs_a.max(), abs_b / abs_b.max(), gaussian_weights=True,
                                           sigma=1.5, use_sample_covariance=False, data_range=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a constant map: NaN, as sanity's
        return (float(spearmanr(abs_a.ravel(), abs_b.ravel())[0]), float(structural),
                float(spearmanr(a.sum(0).ravel(), b.sum(0).ravel())[0]))


@torch.no_grad()
def straightforward(subject, raw: torch.Tensor, layers: list[str], rules, steps: int, seed: int) -> dict:
    """Every number of ``sanity`` the straightforward way (module docstring)."""
    model, other = subject.model, subject.other_activations
    device = next(model.parameters()).device
    x = subject.prepare(raw).float().to(device)
    n_images, channels, height, width = x.shape
    pixels = height * width
    maps = activations(model, x, layers)
    units = {layer: [_units(maps[layer][n], 1) for n in range(n_images)] for layer in layers}
    boxes = {layer: [[_box(model, layer, u, (height, width)) for u in per] for per in units[layer]] for layer in layers}
    flat_units = {layer: [per[0] for per in units[layer]] for layer in layers}
    projections = {layer: {rule: Deconvnet(model, other).project(x, layer, flat_units[layer], rule) for rule in rules}
                   for layer in layers}
    out = {layer: {"spearman": {}, "ssim": {}, "signed": {}, "deletion": {}, "insertion": {},
                   "deletion_probability": {}, "insertion_probability": {}} for layer in layers}
    for layer in layers:  # cascading randomisation: a fresh copy per step and rule
        names = parametrised_modules(model, x[:1], layer)
        groups = randomisation_steps(model, names)
        for rule in rules:
            values = {key: torch.empty(len(groups), n_images, 1) for key in ("spearman", "ssim", "signed")}
            for t in range(len(groups)):
                randomised = copy.deepcopy(model)
                named = dict(randomised.named_modules())
                for group in groups[:t + 1]:
                    for i in group:
                        reinitialise(named[names[i]], seed + i)
                p = Deconvnet(randomised, other).project(x, layer, flat_units[layer], rule)
                for n in range(n_images):
                    sims = similarity(projections[layer][rule][n], p[n], boxes[layer][n][0])
                    for key, v in zip(("spearman", "ssim", "signed"), sims):
                        values[key][t, n, 0] = v
            for key in values:
                out[layer][key][rule] = values[key]
    generator = torch.Generator().manual_seed(seed)
    random_order = torch.stack([torch.randperm(pixels, generator=generator) for _ in range(n_images)])
    fill = torch.zeros(channels)
    counts = step_counts(pixels, steps)
    predicted = model(x).argmax(1)
    for layer in layers:  # deletion and insertion: one forward pass per image and step
        module, call = resolve(model, layer)
        for order in [*rules, "random"]:
            for kind in ("deletion", "insertion"):
                act = torch.empty(n_images, 1, steps + 1)
                prob = torch.empty(n_images, 1, steps + 1)
                for n in range(n_images):
                    c, y, xx = units[layer][n][0]
                    ranking = random_order[n] if order == "random" else pixel_order(projections[layer][order][n])
                    if order == "random" and kind == "insertion":
                        ranking = ranking.flip(0)
                    for k, count in enumerate(counts):
                        image = modified(x[n].cpu(), ranking, count, fill, kind == "insertion").to(device)
                        seen = []

                        def hook(_m, _i, output):
                            seen.append(float(output[0, c, y, xx]))

                        handle = module.register_forward_hook(hook)
                        scores = model(image[None])
                        handle.remove()
                        act[n, 0, k] = seen[call]
                        prob[n, 0, k] = torch.softmax(scores.double(), 1)[0, predicted[n]].float()
                    clean = float(maps[layer][n, c, y, xx])
                    act[n, 0] /= clean if clean > 0 else float("nan")
                out[layer][kind][order] = act
                out[layer][f"{kind}_probability"][order] = prob
    out["_specificity"] = _specificity(model, other, x, layers, rules, maps, units, boxes,
                                       {layer: projections[layer] for layer in layers})
    return out


def compare(ours, theirs, layers, rules) -> dict:
    """Largest differences between the two computations, per kind of number."""
    worst = {"similarity": 0.0, "curve_relative": 0.0, "probability": 0.0, "specificity": 0.0}
    for layer in layers:
        r = ours.per_layer[layer]
        for rule in rules:
            for key in ("spearman", "ssim", "signed"):
                a, b = getattr(r, key)[rule], theirs[layer][key][rule]
                assert torch.equal(a.isnan(), b.isnan()), (layer, rule, key)
                worst["similarity"] = max(worst["similarity"], float((a - b).nan_to_num().abs().max()))
            for key in ("other_units", "edges", "other_images"):
                a, b = getattr(r, key)[rule], theirs["_specificity"][layer][key][rule]
                worst["specificity"] = max(worst["specificity"], float((a - b).nan_to_num().abs().max()))
        for order in [*rules, "random"]:
            for kind in ("deletion", "insertion"):
                a, b = getattr(r, kind)[order], theirs[layer][kind][order]
                scale = b.abs().clamp_min(1e-3)
                worst["curve_relative"] = max(worst["curve_relative"], float(((a - b).abs() / scale).nan_to_num().max()))
                a, b = getattr(r, f"{kind}_probability")[order], theirs[layer][f"{kind}_probability"][order]
                worst["probability"] = max(worst["probability"], float((a - b).abs().max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cpu", help="where the model runs, both sides (cpu, cuda, cuda:N)")
    parser.add_argument("--flops", action="store_true",
                        help="also count each side's model FLOPs (runs both once more, untimed)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = build().to(args.device)
    subject = as_subject(model)
    source = open_source("fashion-mnist:test", subject.preprocess.stored_size, 3)
    raw = source.get(list(range(args.images)))
    rescale_logits(model, subject.prepare(raw).to(args.device))
    layers = [subject.stages[len(subject.stages) // 2], subject.stages[-1]]
    where = (torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda")
             else f"{platform.machine()} {platform.processor() or ''}".strip())
    report = {"device": where + f", {os.cpu_count()} cores, {torch.get_num_threads()} thread(s), torch {torch.__version__}",
              "model": "resnet18 (random weights), 224 px", "images": args.images, "layers": layers,
              "rules": list(RULES), "steps": args.steps, "load_average_before": os.getloadavg()}

    start = time.perf_counter()
    ours = sanity(subject, raw, layers=layers, steps=args.steps, seed=0)
    report["ours_s"] = round(time.perf_counter() - start, 2)
    print(f"ours: {report['ours_s']} s", file=sys.stderr, flush=True)
    start = time.perf_counter()
    theirs = straightforward(subject, raw, layers, RULES, args.steps, 0)
    report["straightforward_s"] = round(time.perf_counter() - start, 2)
    print(f"straightforward: {report['straightforward_s']} s", file=sys.stderr, flush=True)
    report["speedup"] = round(report["straightforward_s"] / report["ours_s"], 2)
    report["max_differences"] = compare(ours, theirs, layers, RULES)
    report["randomisation_steps"] = {layer: len(ours.per_layer[layer].randomised) for layer in layers}
    if args.flops:  # what each side asks of the model: the floor of its time where FLOPs set the pace
        with CountFlops(MODEL_OPS) as ours_count:
            sanity(subject, raw, layers=layers, steps=args.steps, seed=0)
        with CountFlops(MODEL_OPS) as theirs_count:
            straightforward(subject, raw, layers, RULES, args.steps, 0)
        report["model_gflops"] = {"ours": round(ours_count.total / 1e9, 1),
                                  "straightforward": round(theirs_count.total / 1e9, 1),
                                  "ratio": round(theirs_count.total / ours_count.total, 2)}
    report["load_average_after"] = os.getloadavg()
    d = report["max_differences"]
    report["same_numbers"] = (d["similarity"] <= 1e-3 and d["specificity"] <= 1e-6 and d["curve_relative"] <= 1e-4
                              and d["probability"] <= 1e-5)
    print(json.dumps(report, indent=2))
    assert report["same_numbers"], report["max_differences"]


if __name__ == "__main__":
    main()
