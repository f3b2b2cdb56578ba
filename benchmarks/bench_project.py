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
- prototypes of speed-ups that leave ``deconvnet.py`` untouched: ``lean`` (the same crops through a
  copy of the model whose ReLUs are a deconvnet autograd function: no per-pass hooks or graph
  walks), the same in ``channels_last``, and ``cone`` (only the outputs each unit depends on, at
  every layer: the unit's cone instead of the whole crop, in the forward and the backward pass).
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import time
import warnings
from collections import OrderedDict

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from deconvnet.data import open_source, preprocess_for
from deconvnet.deconvnet import Deconvnet, _SkipBackward
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
    ``torch.autograd.grad`` refuses."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func._overloadpacket in flop_registry:
            self.total += flop_registry[func._overloadpacket](*args, **kwargs, out_val=out)
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


# ----------------------------------------------------------------------------- chain geometry (prototypes)
# The prototypes below handle plain chains (both models here): the conv/pool steps in order, with
# kernel, stride, padding and ceil mode; the package's own geometry (traced graphs) is not needed.

def chain_steps(model: nn.Sequential, layer: str) -> list[tuple]:
    """(name, kernel, stride, padding, ceil_mode) of each conv/max-pool up to ``layer``."""
    steps = []
    for name, m in model.named_children():
        if isinstance(m, nn.Conv2d):
            steps.append((name, m.kernel_size[0], m.stride[0], m.padding[0], False))
        elif isinstance(m, nn.MaxPool2d):
            steps.append((name, m.kernel_size, m.stride, m.padding, bool(m.ceil_mode)))
        if name == layer:
            return steps
    raise KeyError(layer)


def out_size(step: tuple, n: int) -> int:
    _, k, s, p, ceil = step
    out = (-(-(n + 2 * p - k) // s) if ceil else (n + 2 * p - k) // s) + 1
    return out - 1 if ceil and (out - 1) * s >= n + p else out


def field(steps: list[tuple], y: int) -> tuple[int, int]:
    """Input rows [top, bottom] seen by output row ``y`` of the last step."""
    top, bottom = y, y
    for _, k, s, p, _ in reversed(steps):
        top, bottom = top * s - p, bottom * s - p + k - 1
    return top, bottom


def crop_size(n: int, width: int, slack: int, stride: int) -> int:
    """The package's crop length (deconvnet._crop_size): aligned to ``stride``, fits every unit."""
    need = width + slack
    return n if need >= n else n - (n - need) // stride * stride


# ----------------------------------------------------------------------------- the lean prototype

class _DeconvReLU(torch.autograd.Function):
    """Forward: ReLU. Backward: the signal coming down, rectified (Sec. 2.1)."""

    @staticmethod
    def forward(ctx, x):
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad):
        return grad.clamp(min=0)


class _ReLUDown(nn.Module):
    def forward(self, x):
        return _DeconvReLU.apply(x)


class _NormSkip(nn.Module):
    """Contrast normalisation forward, identity on the way down (Sec. 2.1)."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm

    def forward(self, x):
        return _SkipBackward.apply(x, self.norm(x.detach()))


def lean_copy(model: nn.Sequential) -> nn.Sequential:
    """The model with the rule built in: no hooks, no graph walks per pass."""
    lean = copy.deepcopy(model)
    for name, m in list(lean.named_children()):
        if isinstance(m, nn.ReLU):
            setattr(lean, name, _ReLUDown())
        elif isinstance(m, nn.LocalResponseNorm):
            setattr(lean, name, _NormSkip(m))
    return lean


def lean_project(lean: nn.Sequential, model: nn.Module, x: torch.Tensor, layer: str, units, chunk: int) -> torch.Tensor:
    """The package's receptive-field crops, pushed through ``lean`` up to ``layer`` in chunks of ``chunk``."""
    import math

    steps = chain_steps(model, layer)
    h = x.shape[-1]
    stride = math.prod(st[2] for st in steps)
    top, bottom = field(steps, 0)
    crop = crop_size(h, bottom - top + 1, top % stride, stride)
    origins = []
    for _, y, xx in units:
        t, l = field(steps, y)[0], field(steps, xx)[0]
        origins.append((min(max(t, 0) // stride * stride, h - crop), min(max(l, 0) // stride * stride, h - crop)))
    upto = nn.Sequential(*list(lean.children())[:list(dict(lean.named_children())).index(layer) + 1])
    result = torch.zeros_like(x)
    for start in range(0, len(units), chunk):
        idx = range(start, min(start + chunk, len(units)))
        crops = torch.stack([x[i, :, origins[i][0]:origins[i][0] + crop, origins[i][1]:origins[i][1] + crop]
                             for i in idx]).requires_grad_(True)
        with torch.enable_grad():
            out = upto(crops)
            seed = torch.zeros_like(out)
            for n, i in enumerate(idx):
                c, y, xx = units[i]
                y, xx = y - origins[i][0] // stride, xx - origins[i][1] // stride
                seed[n, c, y, xx] = out[n, c, y, xx].detach()
            (grad,) = torch.autograd.grad(out, crops, seed)
        for n, i in enumerate(idx):
            result[i, :, origins[i][0]:origins[i][0] + crop, origins[i][1]:origins[i][1] + crop] = grad[n]
    return result


def cone_project(lean: nn.Sequential, model: nn.Module, x: torch.Tensor, layer: str, units) -> torch.Tensor:
    """Projections computing only the unit's cone: at every layer, just the outputs the unit depends on.

    Going up from the unit, each conv/pool step needs an input window of ``(s - 1) * stride + kernel``
    positions for ``s`` outputs. The windows are cut from the image once (one per unit, all the same
    size, so they batch) and every step runs without padding; positions of a window outside its layer's
    output (the border) are set to the padding value (0 before a conv, -inf before a max-pool), so
    the values, switches and gradients are those of the full image. ``lean``: the model with the rule
    built in (:func:`lean_copy`); ``model``: the original, for the geometry.
    """
    steps = chain_steps(model, layer)
    h = x.shape[-1]
    ranges = [h]  # valid positions of each step's input: [0, ranges[j])
    for step in steps:
        ranges.append(out_size(step, ranges[-1]))
    sizes, offsets = [], []  # per step: its input window's size, and (y, x) offsets per unit
    s, o = 1, torch.tensor([[u[1], u[2]] for u in units])
    for _, kernel, stride, padding, _ in reversed(steps):
        s, o = (s - 1) * stride + kernel, o * stride - padding
        sizes.append(s)
        offsets.append(o)
    sizes, offsets = sizes[::-1], offsets[::-1]
    margin = max(0, -int(offsets[0].min()), int((offsets[0] + sizes[0]).max()) - h)
    padded = nn.functional.pad(x, (margin,) * 4)
    windows = torch.stack([padded[i, :, y + margin:y + margin + sizes[0], xx + margin:xx + margin + sizes[0]]
                           for i, (y, xx) in enumerate(offsets[0].tolist())]).requires_grad_(True)
    masks = []
    for j in range(len(steps)):
        pos = offsets[j][:, :, None] + torch.arange(sizes[j])  # (N, 2, S)
        inside = (pos >= 0) & (pos < ranges[j])
        masks.append((inside[:, 0, :, None] & inside[:, 1, None, :])[:, None])  # (N, 1, S, S)
    names = list(dict(lean.named_children()))
    by_name = {st[0]: (j, st) for j, st in enumerate(steps)}
    with torch.enable_grad():
        t = windows
        for name in names[:names.index(layer) + 1]:
            m = getattr(lean, name)
            if name in by_name:
                j, st = by_name[name]
                if isinstance(m, nn.Conv2d):
                    t = nn.functional.conv2d(t.masked_fill(~masks[j], 0.0), m.weight, m.bias, st[2])
                else:
                    t = nn.functional.max_pool2d(t.masked_fill(~masks[j], -torch.inf), st[1], st[2])
            else:
                t = m(t)
        index = (torch.arange(len(units)), [u[0] for u in units], 0, 0)
        seed = torch.zeros_like(t)
        seed[index] = t.detach()[index]
        (grad,) = torch.autograd.grad(t, windows, seed)
    result = torch.zeros_like(x)
    for i, (y, xx) in enumerate(offsets[0].tolist()):
        y0, x0 = max(y, 0), max(xx, 0)
        y1, x1 = min(y + sizes[0], h), min(xx + sizes[0], h)
        result[i, :, y0:y1, x0:x1] = grad[i, :, y0 - y:y1 - y, x0 - xx:x1 - xx]
    return result


# ----------------------------------------------------------------------------- one setting

def prototypes(protos: dict, model, dn, x, jobs, ours, repeats: int) -> None:
    """Time the speed-up prototypes into ``protos``: name -> (outputs, wall s, CPU s)."""
    lean = lean_copy(model)
    for layer in LAYERS:
        lean_project(lean, model, x, layer, jobs[layer], 32)
    protos["lean"] = best(lambda: {l: lean_project(lean, model, x, l, jobs[l], 32) for l in LAYERS}, repeats)
    lean_cl = lean.to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    for layer in LAYERS:
        lean_project(lean_cl, model, x_cl, layer, jobs[layer], 32)
    protos["lean_channels_last"] = best(lambda: {l: lean_project(lean_cl, model, x_cl, l, jobs[l], 32) for l in LAYERS},
                                        repeats)
    for layer in LAYERS:
        cone_project(lean, model, x, layer, jobs[layer])
    protos["cone"] = best(lambda: {l: cone_project(lean, model, x, l, jobs[l]) for l in LAYERS}, repeats)
    with CountFlops() as counter:
        for layer in LAYERS:
            cone_project(lean, model, x, layer, jobs[layer])
    protos["cone_gflop"] = (None, counter.total / 1e9, None)


def run_setting(name: str, args) -> dict:
    from captum.attr import NeuronDeconvolution

    model, x = setting(name, args.images, args.seed)
    jobs = units_for(model, x, args.seed)
    with torch.no_grad():
        values = {layer: torch.tensor([float(a[i][u]) for i, u in enumerate(jobs[layer])]).view(-1, 1, 1, 1)
                  for layer, a in activations(model, x, LAYERS).items()}
    dn = Deconvnet(model)
    n = len(x) * len(LAYERS)

    def captum(layer):
        method = NeuronDeconvolution(model, getattr(model, layer))
        return torch.cat([method.attribute(x[i:i + 1], neuron_selector=u) for i, u in enumerate(jobs[layer])])

    skip = [m.register_forward_hook(lambda _m, inputs, output: _SkipBackward.apply(inputs[0], output.detach()))
            for m in model.modules() if isinstance(m, nn.LocalResponseNorm)]
    warnings.filterwarnings("ignore")  # Captum warns that the input does not require grad
    captum("conv5")  # warm-up
    reference, captum_s, captum_cpu = {}, {}, {}
    for layer in LAYERS:
        reference[layer], captum_s[layer], captum_cpu[layer] = best(lambda: captum(layer), args.repeats)
    for h in skip:
        h.remove()

    def ours(layer):
        return dn.project(x, layer, jobs[layer])

    for layer in LAYERS:
        ours(layer)  # warm-up: one pass per crop shape
    result, ours_s, ours_cpu = {}, {}, {}
    for layer in LAYERS:
        result[layer], ours_s[layer], ours_cpu[layer] = best(lambda: ours(layer), args.repeats)
    full, full_s = {}, 0.0
    for layer in LAYERS:  # batching alone: the same passes over whole images
        full[layer], s, _ = best(lambda: dn._run(x, layer, jobs[layer], "deconvnet"), 1)
        full_s += s

    with CountFlops() as counter:
        for layer in LAYERS:
            ours(layer)
    flops = counter.total
    with CountFlops() as counter:
        captum("conv1")
    captum_flops_each = counter.total / len(x)
    with CountFlops() as counter:
        for layer in LAYERS:
            captum(layer)
    captum_flops = counter.total

    protos = {}
    try:
        prototypes(protos, model, dn, x, jobs, ours, args.repeats)
    except (AttributeError, ImportError, TypeError) as e:  # the package's internals moved: no prototypes
        print(json.dumps({"prototypes_skipped": repr(e)}))

    worst = 0.0
    for layer in LAYERS:
        expected = reference[layer] * values[layer]
        outputs = [result[layer], full[layer]] + [p[0][layer] for p in protos.values() if p[0] is not None]
        for got in outputs:
            err = ((got - expected).abs().amax((1, 2, 3)) / expected.abs().amax((1, 2, 3))).max().item()
            worst = max(worst, err)
    assert worst < 1e-4, f"outputs differ from Captum's: {worst:.2e}"
    total_c, total_o = sum(captum_s.values()), sum(ours_s.values())
    return {
        "setting": name, "projections": n,
        "captum_s": round(total_c, 3), "ours_s": round(total_o, 3), "ours_full_image_s": round(full_s, 3),
        "captum_per_s": round(n / total_c, 2), "ours_per_s": round(n / total_o, 2),
        "speedup": round(total_c / total_o, 2),
        "speedup_cpu_time": round(sum(captum_cpu.values()) / sum(ours_cpu.values()), 2), "speedup_full_image": round(total_c / full_s, 2),
        "per_layer_speedup": {l: round(captum_s[l] / ours_s[l], 1) for l in LAYERS},
        "per_layer_ours_s": {l: round(ours_s[l], 3) for l in LAYERS},
        "per_layer_captum_s": {l: round(captum_s[l], 3) for l in LAYERS},
        "ours_gflop": round(flops / 1e9, 2), "ours_gflop_per_s": round(flops / total_o / 1e9, 1),
        "captum_gflop_per_conv1_projection": round(captum_flops_each / 1e9, 2),
        "captum_gflop": round(captum_flops / 1e9, 2), "flop_ratio": round(captum_flops / flops, 2),
        "captum_gflop_per_s": round(captum_flops / total_c / 1e9, 1),
        "prototypes_s": {k: round(v[1], 3) for k, v in protos.items() if k != "cone_gflop"},
        "prototypes_speedup": {k: round(total_c / v[1], 2) for k, v in protos.items() if k != "cone_gflop"},
        "cone_gflop": round(protos["cone_gflop"][1], 2) if "cone_gflop" in protos else None,
        "max_rel_diff": float(f"{worst:.2e}"),
    }


def interleaved(name: str, args) -> dict:
    """Captum, ours, lean and cone in turn for ``--rounds`` rounds; the smallest wall-clock and CPU time
    of each. On a shared machine the load changes within minutes; turns keep the comparison fair."""
    from captum.attr import NeuronDeconvolution

    model, x = setting(name, args.images, args.seed)
    jobs = units_for(model, x, args.seed)
    dn, lean = Deconvnet(model), lean_copy(model)

    def captum():
        hooks = [m.register_forward_hook(lambda _m, inputs, output: _SkipBackward.apply(inputs[0], output.detach()))
                 for m in model.modules() if isinstance(m, nn.LocalResponseNorm)]
        try:
            return {l: torch.cat([NeuronDeconvolution(model, getattr(model, l)).attribute(
                x[i:i + 1], neuron_selector=u) for i, u in enumerate(jobs[l])]) for l in LAYERS}
        finally:
            for h in hooks:
                h.remove()

    fns = {"captum": captum,
           "ours": lambda: {l: dn.project(x, l, jobs[l]) for l in LAYERS},
           "lean": lambda: {l: lean_project(lean, model, x, l, jobs[l], 32) for l in LAYERS},
           "cone": lambda: {l: cone_project(lean, model, x, l, jobs[l]) for l in LAYERS}}
    warnings.filterwarnings("ignore")
    flops, wall, cpu = {}, {k: [] for k in fns}, {k: [] for k in fns}
    for k, f in fns.items():
        f()  # warm-up (the package traces the model's graph once)
        with CountFlops() as counter:
            f()
        flops[k] = counter.total
    peak = matmul_peak(torch.get_num_threads())
    for _ in range(args.rounds):
        for k, f in fns.items():
            w, c = time.perf_counter(), time.process_time()
            f()
            wall[k].append(time.perf_counter() - w)
            cpu[k].append(time.process_time() - c)
    peak = max(peak, matmul_peak(torch.get_num_threads()))
    row = {"setting": name, "projections": len(x) * len(LAYERS), "threads": torch.get_num_threads(),
           "matmul_peak_gflop_per_s": round(peak, 1)}
    for k in fns:
        row[k] = {"gflop": round(flops[k] / 1e9, 2), "wall_s": round(min(wall[k]), 3), "cpu_s": round(min(cpu[k]), 3),
                  "gflop_per_cpu_s": round(flops[k] / min(cpu[k]) / 1e9, 1),
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
                        help="Captum, ours and the prototypes in turn, --rounds rounds, smallest times (the table)")
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
