"""Occlusion (Fig. 7) on ten torchvision classes at 224 px: which pass runs, what share of the forward
pass's conv multiply-adds it recomputes per square, and whether cells equal direct forward passes.

    .venv/bin/python benchmarks/check_occlusion_archs.py [--models resnet50,vgg11]

Random weights (torchvision's own init), one random image, the paper's 35 px square and stride 14
(225 squares). Four cells per model are checked against a forward pass of the occluded image (1e-5).
Exits 1 when a cell differs; prints one line per model and a JSON summary.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from tv import torchvision_model  # noqa: E402  torchvision's model classes on this machine's CPU torch

from deconvnet.occlusion import occlude_image  # noqa: E402

MODELS = {"resnet50": "layer3", "densenet121": "features.denseblock3", "googlenet": "inception4c",
          "vgg11": "features.15", "alexnet": "features.8", "mobilenet_v2": "features.10",
          "efficientnet_b0": "features.5", "regnet_y_400mf": "trunk_output.block3", "convnext_tiny": "features.5",
          "shufflenet_v2_x1_0": "stage3"}
CELLS = [0, 37, 112, 224]


def check(name: str, layer: str, image: torch.Tensor) -> dict:
    model = torchvision_model(name, 1000)
    start = time.perf_counter()
    result = occlude_image(model, image, layer=layer)
    seconds = time.perf_counter() - start
    worst = 0.0
    with torch.no_grad():
        for cell in CELLS:
            t, l = result.positions[cell]
            x = image.clone()
            x[:, t:t + result.size, l:l + result.size] = 0
            p = torch.softmax(model(x[None])[0], 0)[result.target]
            worst = max(worst, abs(float(result.probability.flatten()[cell]) - float(p)))
    return {"model": name, "layer": layer, "seconds": round(seconds, 1), "method": result.method,
            "recomputed": None if result.recomputed is None else round(result.recomputed, 3),
            "projection_missing": result.projection_missing, "max_abs_diff": worst, "exact": worst <= 1e-5}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated names from: " + ", ".join(MODELS))
    args = parser.parse_args()
    torch.manual_seed(1)
    image = torch.randn(3, 224, 224)
    rows = []
    for name in args.models.split(","):
        row = check(name, MODELS[name], image)
        rows.append(row)
        print(f"{name:20s} {row['seconds']:6.1f} s  {row['method'][:50]:50s} recomputed {row['recomputed']}  "
              f"max |diff| {row['max_abs_diff']:.1e}  (c): {row['projection_missing'] or 'yes'}", flush=True)
    print(json.dumps({"device": f"{torch.get_num_threads()} threads, torch {torch.__version__}",
                      "load_average": os.getloadavg(), "models": rows}, indent=2))
    sys.exit(0 if all(r["exact"] for r in rows) else 1)


if __name__ == "__main__":
    main()
