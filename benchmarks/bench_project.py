"""Deconvnet projections (Sec. 2.1) on ``zfnet`` at 224 px: ``Deconvnet.project`` against Captum's
``NeuronDeconvolution`` in one process, on the same units of the same images, same outputs.

    .venv/bin/pip install --no-deps captum   # the benchmark's only extra; the package never imports it
    .venv/bin/python benchmarks/bench_project.py

9 Fashion-MNIST test images at 224 px, one unit per image per layer conv1..conv5 (45 projections):
the strongest position of a random map that fires on that image, as in the Fig. 2 gallery.
Captum runs the whole model at batch 1 for every projection. Both skip contrast normalisation on the
way down (the paper), Captum through a forward hook on each norm layer; Captum's gradient-of-a-unit
times the unit's value is our projection (we seed with the activation itself). Also timed: our
projection without the receptive-field crop (full images, batched), to show what the crop adds.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
import warnings

import torch
from torch import nn

from deconvnet.data import open_source, preprocess_for
from deconvnet.deconvnet import Deconvnet, _SkipBackward
from deconvnet.models import build_model
from deconvnet.probe import activations

LAYERS = ["conv1", "conv2", "conv3", "conv4", "conv5"]


@torch.no_grad()
def units_for(model: nn.Module, x: torch.Tensor, seed: int) -> dict[str, list[tuple[int, int, int]]]:
    """Per layer, one unit per image: the strongest position of a random map that fires there."""
    acts = activations(model, x, LAYERS)
    g = torch.Generator().manual_seed(seed)
    jobs = {}
    for layer, a in acts.items():
        units = []
        for i in range(len(x)):
            alive = (a[i].flatten(1).amax(1) > 0).nonzero().flatten()
            c = int(alive[torch.randint(len(alive), (1,), generator=g)])
            units.append((c, *divmod(int(a[i, c].flatten().argmax()), a.shape[3])))
        jobs[layer] = units
    return jobs


def timed(fn):
    """(result, wall-clock s, CPU s); CPU time is less disturbed by other jobs on a shared machine."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def best(fn, repeats: int):
    """The first result and the smallest wall-clock and CPU times over ``repeats`` runs."""
    runs = [timed(fn) for _ in range(repeats)]
    return runs[0][0], min(r[1] for r in runs), min(r[2] for r in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=9)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from captum.attr import NeuronDeconvolution

    torch.manual_seed(args.seed)
    model = build_model("zfnet", 1000, init="kaiming").eval()
    pre = preprocess_for(224, 3)
    x = pre.eval(open_source("fashion-mnist:test", pre.stored_size, 3).get(range(args.images)))
    jobs = units_for(model, x, args.seed)
    with torch.no_grad():
        values = {layer: torch.tensor([float(a[i][u]) for i, u in enumerate(jobs[layer])]).view(-1, 1, 1, 1)
                  for layer, a in activations(model, x, LAYERS).items()}
    dn = Deconvnet(model)
    n = len(x) * len(LAYERS)

    def ours():
        return {layer: dn.project(x, layer, units) for layer, units in jobs.items()}

    def full_images():  # batching alone: the same passes over whole images
        return {layer: dn._run(x, layer, units, "deconvnet") for layer, units in jobs.items()}

    def captum():
        out = {}
        for layer, units in jobs.items():
            method = NeuronDeconvolution(model, getattr(model, layer))
            out[layer] = torch.cat([method.attribute(x[i:i + 1], neuron_selector=u) for i, u in enumerate(units)])
        return out

    skip = [m.register_forward_hook(lambda _m, inputs, output: _SkipBackward.apply(inputs[0], output.detach()))
            for m in model.modules() if isinstance(m, nn.LocalResponseNorm)]
    warnings.filterwarnings("ignore")  # Captum warns that the input does not require grad
    NeuronDeconvolution(model, model.conv5).attribute(x[:1], neuron_selector=jobs["conv5"][0])  # warm-up
    reference, captum_s, captum_cpu = best(captum, args.repeats)
    for h in skip:
        h.remove()
    ours()  # warm-up: one pass per crop shape
    result, ours_s, ours_cpu = best(ours, args.repeats)
    full, full_s, full_cpu = best(full_images, args.repeats)

    worst = 0.0
    for layer in LAYERS:
        expected = reference[layer] * values[layer]
        for got in (result[layer], full[layer]):
            err = ((got - expected).abs().amax((1, 2, 3)) / expected.abs().amax((1, 2, 3))).max().item()
            worst = max(worst, err)
    assert worst < 1e-4, f"outputs differ from Captum's: {worst:.2e}"
    print(json.dumps({
        "model": "zfnet", "input": 224, "projections": n, "layers": LAYERS,
        "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
        "captum_s": round(captum_s, 3), "ours_s": round(ours_s, 3), "ours_full_image_s": round(full_s, 3),
        "captum_per_s": round(n / captum_s, 2), "ours_per_s": round(n / ours_s, 2),
        "speedup": round(captum_s / ours_s, 2), "speedup_full_image": round(captum_s / full_s, 2),
        "speedup_cpu_time": round(captum_cpu / ours_cpu, 2),
        "speedup_full_image_cpu_time": round(captum_cpu / full_cpu, 2),
        "max_rel_diff": float(f"{worst:.2e}"),
    }, indent=1))


if __name__ == "__main__":
    main()
