"""Every method on a GPU, checked against the CPU and timed against Captum on the same GPU.

    .venv/bin/pip install --no-deps captum   # for the timings against Captum (optional)
    .venv/bin/python benchmarks/check_cuda.py [--device cuda:0]

On CUDA, with random-weight models: ``topk`` (ResNet-18 at 224 over 256 JPEG-decoded photos), ``project``
(ZFNet at 224, 45 units, the three rules), ``occlusion`` (ResNet-18 at 224, 35 px squares, stride 14),
``atlas`` (ZFNet-small over 200 Fashion-MNIST images), ``sanity`` (ZFNet-small, 4 images) and one
training epoch of ``zfnet`` at 224 (1,024 images, bf16 where the GPU computes it). Each result is
compared with the same call on the CPU (within float tolerance: projections to 1e-4 of their largest
value, probabilities to 1e-4, top-k tables exactly in their images up to ties). Prints JSON: the card,
each check's CPU and GPU seconds and largest difference, and Captum's time for the same projections and
occlusion maps. Exits 1 if a check fails; on a machine without CUDA it says so and exits 0.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from tv import import_torchvision  # noqa: E402 - torchvision's classes where its compiled ops cannot load


def timed(fn, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - started


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def check_topk(gpu, checks):
    from deconvnet.subject import as_subject
    from deconvnet.topk import topk_pass

    import_torchvision()
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    folder = Path(tempfile.mkdtemp())
    from skimage import data as photos

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(256):
        image = [photos.astronaut(), photos.coffee(), photos.chelsea()][i % 3]
        side = int(min(image.shape[:2]) * rng.uniform(0.5, 1.0))
        (folder / f"c{i % 4}").mkdir(exist_ok=True)
        Image.fromarray(image[:side, :side]).resize((300, 300)).save(folder / f"c{i % 4}" / f"{i}.jpg")
    subject = as_subject(model)
    source = subject.open_data(f"folder:{folder}")
    results = {}
    for label, device in (("cpu", torch.device("cpu")), ("gpu", gpu)):
        model.to(device)
        results[label], seconds = timed(lambda: topk_pass(model, source, subject.preprocess, subject.stages,
                                                             k=9, workers=2), device)
        checks.setdefault("topk", {})[f"{label}_s"] = round(seconds, 2)
    model.to("cpu")
    same = all(torch.equal(results["cpu"][n].images, results["gpu"][n].images) for n in subject.stages)
    values = max(relative(results["gpu"][n].values, results["cpu"][n].values) for n in subject.stages)
    checks["topk"].update(same_images=same, values_difference=values, ok=values < 1e-3)


def check_project(gpu, checks, use_captum: bool):
    from deconvnet.deconvnet import RULES, Deconvnet
    from deconvnet.models import build_model
    from deconvnet.probe import activations

    torch.manual_seed(0)
    model = build_model("zfnet", 10, fc=(64, 64)).eval()
    x = torch.randn(9, 3, 224, 224)
    jobs = []
    with torch.no_grad():
        maps = activations(model, x, ["conv1", "conv2", "conv3", "conv4", "conv5"])
    for layer, a in maps.items():
        for i in range(9):
            c = int(a[i].flatten(1).amax(1).argmax())
            y, xx = divmod(int(a[i, c].argmax()), a.shape[-1])
            jobs.append((layer, i, (c, y, xx)))
    out, worst = {}, 0.0
    for label, device in (("cpu", torch.device("cpu")), ("gpu", gpu)):
        model.to(device)
        total = 0.0
        for rule in RULES:
            for layer in maps:
                mine = [(i, u) for name, i, u in jobs if name == layer]
                images = x[[i for i, _ in mine]].to(device)
                got, seconds = timed(lambda: Deconvnet(model).project(images, layer, [u for _, u in mine], rule), device)
                total += seconds
                out[(label, rule, layer)] = got.cpu()
        checks.setdefault("project", {})[f"{label}_s"] = round(total, 2)
    for rule in RULES:
        for layer in maps:
            worst = max(worst, relative(out[("gpu", rule, layer)], out[("cpu", rule, layer)]))
    checks["project"].update(difference=worst, ok=worst < 1e-4)
    if use_captum:
        from captum.attr import NeuronDeconvolution

        model.to(gpu)
        norms = [m for m in model.modules() if isinstance(m, torch.nn.LocalResponseNorm)]
        hooks = [m.register_forward_hook(lambda _m, inputs, _o: inputs[0]) for m in norms]  # no LRN, as ours

        def captum():
            for layer, i, unit in jobs:
                NeuronDeconvolution(model, getattr(model, layer)).attribute(x[i:i + 1].to(gpu), unit)
        _, seconds = timed(captum, gpu)
        for h in hooks:
            h.remove()
        checks["project"]["captum_gpu_s"] = round(seconds, 2)
        model.to("cpu")


def check_occlusion(gpu, checks, use_captum: bool):
    from deconvnet.occlusion import occlude_image

    import_torchvision()
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    with torch.no_grad():
        model.fc.weight.mul_(4 / model.fc.weight.std() / 23)  # a trained net's logit spread
    image = torch.randn(3, 224, 224)
    results = {}
    for label, device in (("cpu", torch.device("cpu")), ("gpu", gpu)):
        model.to(device)
        results[label], seconds = timed(
            lambda: occlude_image(model, image.to(device), size=35, stride=14, layer="layer4"), device)
        checks.setdefault("occlusion", {})[f"{label}_s"] = round(seconds, 2)
        checks["occlusion"][f"{label}_method"] = results[label].method
    difference = float((results["gpu"].probability.cpu() - results["cpu"].probability).abs().max())
    checks["occlusion"].update(difference=difference, ok=difference < 1e-4)
    if use_captum:
        from captum.attr import Occlusion

        model.to(gpu)
        x = image[None].to(gpu)
        target = int(model(x).argmax())
        _, seconds = timed(lambda: Occlusion(lambda v: torch.softmax(model(v), 1)).attribute(
            x, sliding_window_shapes=(3, 35, 35), strides=(3, 14, 14), target=target, perturbations_per_eval=64), gpu)
        checks["occlusion"]["captum_gpu_s"] = round(seconds, 2)
        model.to("cpu")


def check_commands(gpu, checks):
    """atlas, sanity and a training epoch through the CLI on the GPU, against the CPU."""
    from deconvnet.cli import main

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        assert main(["train", "--model", "zfnet-small", "--limit", "512", "--epochs", "1", "--no-ten-crop",
                     "--out", str(tmp / "run"), "--device", str(gpu)]) == 0
        ckpt = str(tmp / "run" / "final.pt")
        for name, argv in (("atlas", ["atlas", "--checkpoint", ckpt, "--data", "fashion-mnist:test", "--limit", "200",
                                      "--layers", "conv1,conv2"]),
                           ("sanity", ["sanity", "--checkpoint", ckpt, "--data", "fashion-mnist:test", "--count", "4"])):
            seconds = {}
            for label, device in (("cpu", "cpu"), ("gpu", str(gpu))):
                started = time.perf_counter()
                code = main([*argv, "--device", device, "--out", str(tmp / f"{name}-{label}"), "--json"])
                seconds[label] = round(time.perf_counter() - started, 2)
                assert code == 0, f"{name} on {device} failed"
            a = json.loads((tmp / f"{name}-cpu" / f"{name}.json").read_text())
            b = json.loads((tmp / f"{name}-gpu" / f"{name}.json").read_text())
            same = a.get("layers") == b.get("layers") if name == "atlas" else \
                [f["verdict"] for f in a["findings"]] == [f["verdict"] for f in b["findings"]]
            checks[name] = {"cpu_s": seconds["cpu"], "gpu_s": seconds["gpu"], "same": same, "ok": same}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        code = main(["train", "--model", "zfnet", "--limit", "1024", "--epochs", "1", "--no-ten-crop",
                     "--out", str(Path(tmp) / "zfnet"), "--device", str(gpu)])
    checks["train_zfnet_224"] = {"gpu_s": round(time.perf_counter() - started, 1), "ok": code == 0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    gpu = torch.device(args.device)
    if gpu.type == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"cuda": False, "note": "no CUDA on this machine: nothing checked (--device cpu runs "
                                                 "every check CPU against CPU, to try the script itself)"}))
        return 0
    try:
        import captum  # noqa: F401
        use_captum = True
    except ImportError:
        use_captum = False
    checks: dict = {}
    for check in (check_topk, check_project, check_occlusion):
        try:
            check(gpu, checks, use_captum) if check is not check_topk else check(gpu, checks)
        except Exception as e:  # noqa: BLE001 - report every check, then fail
            checks[check.__name__.removeprefix("check_")] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    try:
        check_commands(gpu, checks)
    except Exception as e:  # noqa: BLE001
        checks["commands"] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    card = torch.cuda.get_device_name(gpu) if gpu.type == "cuda" else "cpu (dry run)"
    print(json.dumps({"card": card, "torch": torch.__version__, "captum": use_captum,
                      "checks": checks}, indent=1))
    return 0 if all(c.get("ok") for c in checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
