"""Deconvnet projections (Sec. 2.1) at 224 px: ``Deconvnet.project`` against Captum's
``NeuronDeconvolution`` in one process, on the same units of the same images, same outputs.

    .venv/bin/pip install --no-deps captum   # the benchmark's only extra; the package never imports it
    .venv/bin/python benchmarks/bench_project.py [--settings independent,project] [--threads 2,1]
    .venv/bin/python benchmarks/bench_project.py --interleaved --threads 1   # BENCHMARKS.md's table

Two settings, 9 images each, one unit per image per layer conv1..conv5 (45 projections): the
strongest position of a random map that fires on that image, as in the Fig. 2 gallery.

- ``independent``: the issue's setting, a ZFNet-224 *without* contrast normalisation written here,
  independently of the package (PyTorch's default init, padded floor-mode pools), on 9 random images.
- ``project``: the package's ``zfnet`` (with LRN after pool1/pool2, He init) on 9 Fashion-MNIST test
  images upscaled to 256 and center-cropped (the setting of BENCHMARKS.md's first table).

Captum runs the whole model at batch 1 for every projection. Both skip contrast normalisation on the
way down (the paper), Captum through a forward hook on each norm layer; Captum's gradient-of-a-unit
times the unit's value is our projection (we seed with the activation itself). Also timed:

- per layer, to show where the ratio comes from;
- the floating-point work of our projections (``torch.utils.flop_counter``) against the machine's
  measured fp32 matmul peak at the same thread count (the limit);
- the path ``Deconvnet.project`` took (``Deconvnet.projection(...).method``: ``cone`` on both
  models) and, for comparison, the receptive-field crops it used before (``_project_crops``, now its
  fallback where the cone does not apply) and whole images.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings
from collections import OrderedDict

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from deconvnet.data import open_source, preprocess_for
from deconvnet.deconvnet import Deconvnet, _project_crops, _Request, _SkipBackward
from deconvnet.models import build_model
from deconvnet.probe import activations

LAYERS = ["conv1", "conv2", "conv3", "conv4", "conv5"]


def independent_zfnet() -> nn.Sequential:
    """ZFNet (Fig. 3) at 224 px without contrast normalisation, as someone else would write it:
    224 -> 110 -> 55 -> 26 -> 13 -> 13 -> 13 -> 6, pools padded instead of ceil mode."""
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(3, 96, 7, stride=2, padding=1)), ("relu1", nn.ReLU(inplace=True)),
        ("pool1", nn.MaxPool2d(3, stride=2, padding=1)),
        ("conv2", nn.Conv2d(96, 256, 5, stride=2)), ("relu2", nn.ReLU(inplace=True)),
        ("pool2", nn.MaxPool2d(3, stride=2, padding=1)),
        ("conv3", nn.Conv2d(256, 384, 3, padding=1)), ("relu3", nn.ReLU(inplace=True)),
        ("conv4", nn.Conv2d(384, 384, 3, padding=1)), ("relu4", nn.ReLU(inplace=True)),
        ("conv5", nn.Conv2d(384, 256, 3, padding=1)), ("relu5", nn.ReLU(inplace=True)),
        ("pool5", nn.MaxPool2d(3, stride=2)),
        ("flatten", nn.Flatten()),
        ("fc6", nn.Linear(256 * 6 * 6, 4096)), ("relu6", nn.ReLU(inplace=True)), ("drop6", nn.Dropout()),
        ("fc7", nn.Linear(4096, 4096)), ("relu7", nn.ReLU(inplace=True)), ("drop7", nn.Dropout()),
        ("fc8", nn.Linear(4096, 1000)),
    ]))


def setting(name: str, images: int, seed: int) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    if name == "independent":
        model = independent_zfnet().eval()
        x = (torch.rand(images, 3, 224, 224) - 0.45) / 0.225  # random images, ImageNet-like scale
        return model, x
    model = build_model("zfnet", 1000, init="kaiming").eval()
    pre = preprocess_for(224, 3)
    return model, pre.eval(open_source("fashion-mnist:test", pre.stored_size, 3).get(range(images)))


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


def best(fn, repeats: int):
    """The first result and the smallest wall-clock and CPU times over ``repeats`` runs."""
    runs = []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn()
        runs.append((out, time.perf_counter() - wall, time.process_time() - cpu))
    return runs[0][0], min(r[1] for r in runs), min(r[2] for r in runs)


class CountFlops(TorchDispatchMode):
    """FLOPs of the convolutions and matmuls run inside (forward and backward), by
    ``torch.utils.flop_counter``'s formulas; without its module tracking, whose hooks
    ``torch.autograd.grad`` refuses. ``ops``: count only these (``torch.ops.aten`` packets)."""

    def __init__(self, ops=None):
        super().__init__()
        self.total = 0
        self.ops = set(flop_registry) if ops is None else set(ops)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func._overloadpacket in self.ops:
            self.total += flop_registry[func._overloadpacket](*args, **kwargs, out_val=out)
        elif func._overloadpacket is torch.ops.aten._slow_conv2d_backward:  # the image conv's input gradient
            grad, _, weight = args[:3]
            self.total += 2 * grad.numel() * weight[0].numel()
        return out


def matmul_peak(threads: int, n: int = 2048, repeats: int = 5) -> float:
    """Measured fp32 GFLOP/s of an n x n matmul at ``threads`` threads: the best of ``repeats``."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / min(times) / 1e9


# ----------------------------------------------------------------------------- one setting

def captum_projections(model: nn.Module, x: torch.Tensor, jobs: dict) -> dict[str, torch.Tensor]:
    """Captum's ``NeuronDeconvolution`` for every unit of ``jobs`` (layer -> units), the whole model at batch 1 each; contrast
    normalisation skipped on the way down (a forward hook on each norm layer), as the paper does."""
    from captum.attr import NeuronDeconvolution

    hooks = [m.register_forward_hook(lambda _m, inputs, output: _SkipBackward.apply(inputs[0], output.detach()))
             for m in model.modules() if isinstance(m, nn.LocalResponseNorm)]
    try:
        return {l: torch.cat([NeuronDeconvolution(model, getattr(model, l)).attribute(x[i:i + 1], neuron_selector=u)
                              for i, u in enumerate(units)]) for l, units in jobs.items()}
    finally:
        for h in hooks:
            h.remove()


def worst_difference(model: nn.Module, x: torch.Tensor, jobs: dict, reference: dict, outputs: list[dict]) -> float:
    """The largest difference of ``outputs`` from Captum's ``reference`` times the unit's value (we seed
    with the activation itself), relative to each projection's largest value."""
    with torch.no_grad():
        values = {layer: torch.tensor([float(a[i][u]) for i, u in enumerate(jobs[layer])]).view(-1, 1, 1, 1)
                  for layer, a in activations(model, x, LAYERS).items()}
    worst = 0.0
    for layer in LAYERS:
        expected = reference[layer] * values[layer]
        for got in outputs:
            err = ((got[layer] - expected).abs().amax((1, 2, 3)) / expected.abs().amax((1, 2, 3))).max().item()
            worst = max(worst, err)
    return worst


def run_setting(name: str, args) -> dict:
    """Captum, then ours per layer (best of ``--repeats``), the receptive-field crops and the full image."""
    model, x = setting(name, args.images, args.seed)
    jobs = units_for(model, x, args.seed)
    dn = Deconvnet(model)
    n = len(x) * len(LAYERS)
    warnings.filterwarnings("ignore")  # Captum warns that the input does not require grad
    captum_projections(model, x, {"conv5": jobs["conv5"]})  # warm-up
    reference, captum_s, captum_cpu = {}, {}, {}
    for layer in LAYERS:
        out, captum_s[layer], captum_cpu[layer] = best(lambda: captum_projections(model, x, {layer: jobs[layer]}),
                                                       args.repeats)
        reference[layer] = out[layer]

    for layer in LAYERS:
        dn.project(x, layer, jobs[layer])  # warm-up: the traced graph, one pass per shape
    result, ours_s, ours_cpu, methods = {}, {}, {}, set()
    for layer in LAYERS:
        projection, ours_s[layer], ours_cpu[layer] = best(lambda: dn.projection(x, layer, jobs[layer]), args.repeats)
        result[layer] = projection.values
        methods.add(projection.method)
    crops, crops_s = {}, 0.0
    for layer in LAYERS:  # the path the cone replaced (still the fallback)
        crops[layer], s, _ = best(lambda: _project_crops(_Request(model, layer), x, jobs[layer])[0], args.repeats)
        crops_s += s
    full, full_s = {}, 0.0
    for layer in LAYERS:  # batching alone: the same passes over whole images
        full[layer], s, _ = best(lambda: _Request(model, layer).run(x, jobs[layer])[0], 1)
        full_s += s

    with CountFlops() as counter:
        for layer in LAYERS:
            dn.project(x, layer, jobs[layer])
    flops = counter.total
    with CountFlops() as counter:
        for layer in LAYERS:
            _project_crops(_Request(model, layer), x, jobs[layer])
    crops_flops = counter.total
    with CountFlops() as counter:
        captum_projections(model, x, jobs)
    captum_flops = counter.total

    worst = worst_difference(model, x, jobs, reference, [result, crops, full])
    assert worst < 1e-4, f"outputs differ from Captum's: {worst:.2e}"
    total_c, total_o = sum(captum_s.values()), sum(ours_s.values())
    return {
        "setting": name, "projections": n, "method": sorted(methods),
        "captum_s": round(total_c, 3), "ours_s": round(total_o, 3), "ours_crops_s": round(crops_s, 3),
        "ours_full_image_s": round(full_s, 3),
        "captum_per_s": round(n / total_c, 2), "ours_per_s": round(n / total_o, 2),
        "speedup": round(total_c / total_o, 2),
        "speedup_cpu_time": round(sum(captum_cpu.values()) / sum(ours_cpu.values()), 2),
        "speedup_crops": round(total_c / crops_s, 2), "speedup_full_image": round(total_c / full_s, 2),
        "per_layer_speedup": {l: round(captum_s[l] / ours_s[l], 1) for l in LAYERS},
        "per_layer_ours_s": {l: round(ours_s[l], 3) for l in LAYERS},
        "per_layer_captum_s": {l: round(captum_s[l], 3) for l in LAYERS},
        "ours_gflop": round(flops / 1e9, 2), "ours_gflop_per_s": round(flops / total_o / 1e9, 1),
        "crops_gflop": round(crops_flops / 1e9, 2),
        "captum_gflop": round(captum_flops / 1e9, 2), "flop_ratio": round(captum_flops / flops, 2),
        "captum_gflop_per_s": round(captum_flops / total_c / 1e9, 1),
        "max_rel_diff": float(f"{worst:.2e}"),
    }


def interleaved(name: str, args) -> dict:
    """Captum, ours and the crops in turn for ``--rounds`` rounds; the smallest wall-clock and CPU time of
    each. On a shared machine the load changes within minutes; turns keep the comparison fair."""
    model, x = setting(name, args.images, args.seed)
    jobs = units_for(model, x, args.seed)
    dn = Deconvnet(model)
    fns = {"captum": lambda: captum_projections(model, x, jobs),
           "ours": lambda: {l: dn.project(x, l, jobs[l]) for l in LAYERS},
           "crops": lambda: {l: _project_crops(_Request(model, l), x, jobs[l])[0] for l in LAYERS}}
    warnings.filterwarnings("ignore")
    flops, wall, cpu, outputs = {}, {k: [] for k in fns}, {k: [] for k in fns}, {}
    for k, f in fns.items():
        outputs[k] = f()  # warm-up (the package traces the model's graph once)
        with CountFlops() as counter:
            f()
        flops[k] = counter.total
    method = dn.projection(x, LAYERS[-1], jobs[LAYERS[-1]]).method  # the path of the last projection
    worst = worst_difference(model, x, jobs, outputs["captum"], [outputs["ours"], outputs["crops"]])
    assert worst < 1e-4, f"outputs differ from Captum's: {worst:.2e}"
    load = os.getloadavg()[0]
    peak = matmul_peak(torch.get_num_threads())
    for _ in range(args.rounds):
        for k, f in fns.items():
            w, c = time.perf_counter(), time.process_time()
            f()
            wall[k].append(time.perf_counter() - w)
            cpu[k].append(time.process_time() - c)
    peak = max(peak, matmul_peak(torch.get_num_threads()))
    row = {"setting": name, "projections": len(x) * len(LAYERS), "threads": torch.get_num_threads(),
           "method": method, "max_rel_diff": float(f"{worst:.2e}"),
           "matmul_peak_gflop_per_s": round(peak, 1), "load_average_1min": [load, os.getloadavg()[0]]}
    for k in fns:
        row[k] = {"gflop": round(flops[k] / 1e9, 2), "wall_s": round(min(wall[k]), 3), "cpu_s": round(min(cpu[k]), 3),
                  "gflop_per_s": round(flops[k] / min(wall[k]) / 1e9, 1),
                  "share_of_peak": round(flops[k] / min(wall[k]) / 1e9 / peak, 3),
                  "vs_captum_wall": round(min(wall["captum"]) / min(wall[k]), 2),
                  "vs_captum_cpu": round(min(cpu["captum"]) / min(cpu[k]), 2)}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=9)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--settings", default="independent,project")
    parser.add_argument("--threads", default=str(torch.get_num_threads()),
                        help="comma-separated thread counts to run every setting at")
    parser.add_argument("--interleaved", action="store_true",
                        help="Captum, ours and the crops in turn, --rounds rounds, smallest times (the table)")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    if args.interleaved:
        for threads in [int(t) for t in args.threads.split(",")]:
            torch.set_num_threads(threads)
            for name in args.settings.split(","):
                print(json.dumps(interleaved(name, args)), flush=True)
        return
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for name in args.settings.split(","):
            before = matmul_peak(threads)
            row = run_setting(name, args)
            peak = max(before, matmul_peak(threads))  # the better of before and after: the load changes
            row.update(threads=threads, matmul_peak_gflop_per_s=round(peak, 1),
                       ours_share_of_peak=round(row["ours_gflop_per_s"] / peak, 3),
                       cpu=platform.processor() or platform.machine(), torch=torch.__version__)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
