"""``deconvnet topk`` at data-set scale: a folder of JPEGs through torchvision's ResNet-18 at 224 px,
against a bare loop on the same images, in one process.

    .venv/bin/python benchmarks/bench_topk_folder.py              # 2,000 JPEGs, workers 0 and 2
    .venv/bin/python benchmarks/bench_topk_folder.py --images 500 --workers 2

The JPEGs are made once (cached in ``~/.cache/deconvnet/bench-photos-N``) from the photos scikit-image
and scikit-learn ship: random crops of 40-100% of a photo's short side, resized to 320-480 px (``--side``), so every
image is decoded, resized to 256 and center-cropped as a user's photos are. For each worker count:

- bare: a ``torch.utils.data.DataLoader`` with those workers decoding the files (PIL, short side 256,
  center crop 224, ImageNet normalisation) and ``model(x)`` under ``no_grad``;
- ours: the top-k pass of ``deconvnet topk`` (:func:`deconvnet.topk.topk_pass`, k = 9, the model's
  default stages relu, layer1..layer4: forward to layer4, per-map maxima, a streaming merge), its
  folder decoded by the same number of workers.

Prints images/s of each and the ratio ours / bare (the bar: at least 0.9), and workers 2 against 0.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from tv import import_torchvision  # noqa: E402 - torchvision's classes where its compiled ops cannot load

from deconvnet.subject import load_subject  # noqa: E402
from deconvnet.topk import topk_pass  # noqa: E402


def photos() -> list[np.ndarray]:
    """The photos scikit-image and scikit-learn ship, as RGB arrays."""
    import skimage.data as data
    from sklearn.datasets import load_sample_images

    found = []
    for name in ("astronaut", "coffee", "chelsea", "rocket", "cat", "retina", "immunohistochemistry", "hubble_deep_field"):
        try:
            image = getattr(data, name)()
        except Exception:  # noqa: BLE001 - some need a download; the bundled ones suffice
            continue
        if image.ndim == 3 and image.shape[2] == 3:
            found.append(image)
    return found + list(load_sample_images().images)


def jpeg_folder(count: int, side: tuple[int, int] = (320, 480)) -> Path:
    """``count`` JPEGs in 8 class folders, their long side drawn from ``side``, made once."""
    root = Path.home() / ".cache" / "deconvnet" / f"bench-photos-{count}-{side[0]}-{side[1]}"
    if (root / "done").is_file():
        return root
    rng = np.random.default_rng(0)
    sources = photos()
    for i in range(count):
        image = sources[i % len(sources)]
        h, w = image.shape[:2]
        cut = int(min(h, w) * rng.uniform(0.4, 1.0))
        top, left = rng.integers(0, h - cut + 1), rng.integers(0, w - cut + 1)
        crop = Image.fromarray(image[top:top + cut, left:left + cut])
        out_side = int(rng.integers(side[0], side[1] + 1))
        folder = root / f"class{i % 8}"
        folder.mkdir(parents=True, exist_ok=True)
        crop.resize((out_side, int(out_side * rng.uniform(0.75, 1.33)))).save(folder / f"{i:05d}.jpg", quality=90)
    (root / "done").write_text("")
    return root


class BareFolder(torch.utils.data.Dataset):
    """The images of a folder as a user's own loop reads them: PIL, short side 256, center crop 224."""

    def __init__(self, root: Path):
        self.files = sorted(p for p in root.rglob("*.jpg"))
        self.mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
        self.std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        with Image.open(self.files[i]) as img:
            img = img.convert("RGB")
            w, h = img.size
            scale = 256 / min(w, h)
            img = img.resize((max(256, round(w * scale)), max(256, round(h * scale))), Image.BILINEAR)
            left, top = (img.size[0] - 224) // 2, (img.size[1] - 224) // 2
            img = img.crop((left, top, left + 224, top + 224))
            x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255
        return (x - self.mean) / self.std


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--workers", default="0,2", help="worker counts to measure, comma-separated")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--side", default="320,480", help="the JPEGs' side in pixels, drawn from MIN,MAX "
                                                          "(camera photos: e.g. 2000,3000)")
    args = parser.parse_args()

    import_torchvision()
    side = tuple(int(v) for v in args.side.split(","))
    root = jpeg_folder(args.images, side)
    subject = load_subject("torchvision:resnet18", device="cpu")
    model, layers = subject.model, subject.stages
    source = subject.open_data(f"folder:{root}")
    indices = torch.arange(len(source))
    bare_data = BareFolder(root)

    def bare(workers: int) -> int:
        loader = torch.utils.data.DataLoader(bare_data, batch_size=args.batch_size, num_workers=workers,
                                             prefetch_factor=4 if workers else None)
        n = 0
        with torch.no_grad():
            for x in loader:
                model(x)
                n += len(x)
        return n

    def ours(workers: int) -> int:
        topk_pass(model, source, subject.preprocess, layers, k=9, indices=indices, batch_size=args.batch_size,
                  workers=workers)
        return len(indices)

    rows = {}
    for workers in [int(w) for w in args.workers.split(",")]:
        timings = {}
        for name, run in (("bare", bare), ("ours", ours)):
            started = time.perf_counter()
            n = run(workers)
            timings[name] = n / (time.perf_counter() - started)
        rows[workers] = {"bare_images_per_s": round(timings["bare"], 1), "topk_images_per_s": round(timings["ours"], 1),
                         "ratio": round(timings["ours"] / timings["bare"], 3)}
    result = {"model": "torchvision:resnet18 (random weights)", "input": 224, "images": len(indices),
              "jpeg_side": list(side),
              "layers": layers, "k": 9, "batch_size": args.batch_size, "threads": torch.get_num_threads(),
              "cores": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
              "load_average": [round(v, 1) for v in os.getloadavg()], "by_workers": rows}
    counts = sorted(rows)
    if len(counts) > 1:
        result["topk_workers_%d_vs_%d" % (counts[-1], counts[0])] = round(
            rows[counts[-1]]["topk_images_per_s"] / rows[counts[0]]["topk_images_per_s"], 3)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
