"""Deletion curves of ``deconvnet.sanity`` against Quantus's ``PixelFlipping`` on a comparable setting,
side by side in one run: torchvision's ``resnet18`` (random weights, last layer rescaled to logits of
std 4, as bench_sanity.py) at 224 px, a few Fashion-MNIST test images, each image's strongest
``layer4`` unit projected by the three rules; each projection's ``|.|`` (summed over channels) and a
seeded random order rank the pixels, which are set to the mean pixel (0 after preprocessing) in
``--steps`` equal steps while the probability of the predicted class is tracked.

    python benchmarks/bench_pixel_flipping.py [--images 4] [--steps 16] [--threads 1]

Quantus is not a dependency of this project; this script needs it and what it imports
(``pip install quantus pandas opencv-python-headless cachetools``), so it runs in an environment of its
own with this repository on ``PYTHONPATH``.

Both sides get the same attributions, images, fill and steps. Quantus's features are the values of
the input array: an attribution per pixel (N, 1, H, W) is broadcast over the channels, and
``features_in_step`` must divide the pixels (``pixels / steps``), so each of its steps sets a third of
a step's pixels (all three channels of each in turn: a pixel's three values are equal in the
ranking) and it runs ``channels * steps`` passes where ours runs ``steps``; every third of its points
is ours. It computes deletion only; ours (``sanity``'s ``_deletion``, as ``sanity`` runs it)
computes deletion *and* insertion for every order, and the unit's activation alongside, so it does
twice the curves in the time measured. Every deletion point of ours is compared.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_sanity import build, rescale_logits  # noqa: E402 - the same model as bench_sanity.py

from deconvnet.data import open_source  # noqa: E402
from deconvnet.deconvnet import RULES, Deconvnet  # noqa: E402
from deconvnet.probe import activations  # noqa: E402
from deconvnet.sanity import _deletion, _units, step_counts  # noqa: E402
from deconvnet.subject import as_subject  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--steps", type=int, default=16, help="a divisor of the 50176 pixels")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import quantus

    model = build()
    subject = as_subject(model)
    raw = open_source("fashion-mnist:test", subject.preprocess.stored_size, 3).get(list(range(args.images)))
    x = subject.prepare(raw).float()
    rescale_logits(model, x)
    n_images, channels, height, width = x.shape
    pixels, layer = height * width, subject.stages[-1]
    if pixels % args.steps:
        raise SystemExit(f"--steps must divide the {pixels} pixels")
    with torch.no_grad():
        first = activations(model, x, [layer, subject.output])
        maps, scores = {layer: first[layer]}, first[subject.output].flatten(1)
        predicted = scores.argmax(1)
    units = {layer: [_units(maps[layer][n], 1) for n in range(n_images)]}
    projections = {layer: {rule: p.values for rule, p in Deconvnet(model).projections(
        x, layer, [u[0] for u in units[layer]], RULES).items()}}
    generator = torch.Generator().manual_seed(0)
    random_order = torch.stack([torch.randperm(pixels, generator=generator) for _ in range(n_images)])
    counts = step_counts(pixels, args.steps)
    fill = torch.zeros(channels)

    start = time.perf_counter()
    with torch.no_grad():
        ours, _ = _deletion(model, x, subject.output, maps, scores, fill, [layer], RULES, units, projections,
                            random_order, counts)
    ours_s = time.perf_counter() - start

    attributions = {rule: projections[layer][rule].abs().sum(1, keepdim=True).numpy() for rule in RULES}
    ranked = torch.empty(n_images, pixels)  # the random order as an attribution: first has the largest value
    ranked.scatter_(1, random_order, torch.arange(pixels, 0, -1, dtype=torch.float32).expand(n_images, -1))
    attributions["random"] = ranked.reshape(n_images, 1, height, width).numpy()
    metric = quantus.PixelFlipping(features_in_step=pixels // args.steps, perturb_baseline=0.0,
                                   normalise=False, abs=False, disable_warnings=True, display_progressbar=False)
    theirs, start = {}, time.perf_counter()
    for order, a in attributions.items():
        theirs[order] = np.array(metric(model=model, x_batch=x.numpy(), y_batch=predicted.numpy(), a_batch=a,
                                        channel_first=True, softmax=True, device="cpu", batch_size=n_images))
    theirs_s = time.perf_counter() - start

    worst = max(float(np.abs(ours[layer]["deletion_probability"][order][:, 0, 1:].numpy()
                             - theirs[order][:, channels - 1::channels]).max()) for order in theirs)
    report = {"device": f"{platform.machine()} {platform.processor() or ''}".strip()
                        + f", {os.cpu_count()} cores, {torch.get_num_threads()} thread(s), torch {torch.__version__}",
              "quantus": quantus.__version__, "model": "resnet18 (random weights), 224 px", "images": n_images,
              "layer": layer, "orders": list(attributions), "steps": args.steps,
              "ours_s (deletion and insertion)": round(ours_s, 2), "quantus_s (deletion)": round(theirs_s, 2),
              "speedup": round(theirs_s / ours_s, 2), "max_probability_difference": worst,
              "load_average": os.getloadavg()}
    print(json.dumps(report, indent=2))
    assert worst <= 1e-5, worst


if __name__ == "__main__":
    main()
