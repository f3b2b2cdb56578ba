"""Data sources and the paper's preprocessing (Sec. 3).

A *source* (``fashion-mnist``, ``fashion-mnist:test``, a class subset ``fashion-mnist[2,3,6,7,8]``,
``digits``, ``folder:PATH``) gives uint8
images already at the model's stored size and channel count via ``source.get(indices)``;
:class:`Preprocess` turns them into the model's input space (scale, minus the per-pixel mean image,
then a 224 crop from 256 for the paper's models, or a 28 crop from a 2 px padded 28 for small ones).
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import tempfile
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from .errors import UserError

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = {  # SHA-256 of the official files (identical to Debian's dataset-fashion-mnist)
    "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".jpe"}


class DataError(UserError):
    """A user-facing data problem (missing path, bad download, empty folder)."""


# ----------------------------------------------------------------------------- Fashion-MNIST files

def fashion_mnist_dir() -> Path:
    """Directory holding the four Fashion-MNIST files, downloading them if needed.

    Debian's ``dataset-fashion-mnist`` is used when present, unless ``DECONVNET_DATA`` names
    another directory; there (or in ``~/.cache/deconvnet`` without the package) the official files
    are downloaded from ``DECONVNET_FASHION_URL`` (default: the official mirror) and SHA-256 checked.
    """
    override = os.environ.get("DECONVNET_DATA")
    if not override and all((FASHION_SYSTEM_DIR / f).is_file() for f in FASHION_FILES):
        return FASHION_SYSTEM_DIR
    cache = Path(override) if override else Path.home() / ".cache" / "deconvnet"
    target = cache / "fashion-mnist"
    base = os.environ.get("DECONVNET_FASHION_URL", FASHION_URL)
    for name, sha in FASHION_FILES.items():
        if not (target / name).is_file():
            download(base.rstrip("/") + "/" + name, target / name, sha)
    return target


def download(url: str, dest: Path, sha256: str) -> None:
    """Download ``url`` to ``dest`` atomically; nothing is left behind if the SHA-256 differs."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=60) as response:
                    total = int(response.headers.get("Content-Length") or 0) or None
                    with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {dest.name}",
                              disable=None, leave=False) as bar:
                        while chunk := response.read(1 << 20):
                            digest.update(chunk)
                            out.write(chunk)
                            bar.update(len(chunk))
            except OSError as e:
                raise DataError(f"cannot download {url}: {e}") from None
        if digest.hexdigest() != sha256:
            raise DataError(f"checksum mismatch for {url}: got sha256 {digest.hexdigest()}, "
                            f"expected {sha256}; nothing was cached")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_idx(path: Path) -> np.ndarray:
    """Read a (gzipped) IDX file of unsigned bytes into an array of its stated shape."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise DataError(f"{path} is truncated: {body.size} values for shape {shape}")
    return body.reshape(shape)


# ----------------------------------------------------------------------------- sources

class Source:
    """A labelled image set. ``get(indices)`` -> uint8 (B, channels, size, size)."""

    name: str
    classes: list[str]
    labels: torch.Tensor  # (N,) int64
    channels: int
    size: int

    def __len__(self) -> int:
        return len(self.labels)

    def get(self, indices) -> torch.Tensor:
        raise NotImplementedError


def _convert_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """(B, C, H, W) uint8 or float: grey -> RGB by repetition, RGB -> grey by luma (ITU-R 601)."""
    if x.shape[1] == channels:
        return x
    if x.shape[1] == 1:
        return x.expand(-1, channels, -1, -1)
    if channels == 1 and x.shape[1] == 3:
        w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (x.float() * w).sum(1, keepdim=True).round().clamp(0, 255).to(x.dtype)
    raise DataError(f"cannot convert {x.shape[1]}-channel images to {channels} channels")


class TensorSource(Source):
    """An image set held in memory as uint8 (N, C, H, W), resized per batch to ``size``."""

    def __init__(self, name: str, images: torch.Tensor, labels: torch.Tensor, classes: list[str],
                 size: int, channels: int):
        self.name, self.images, self.labels, self.classes = name, images, labels.long(), classes
        self.size, self.channels = size, channels

    def get(self, indices) -> torch.Tensor:
        x = self.images[torch.as_tensor(indices, dtype=torch.long)]
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x.float(), size=(self.size, self.size), mode="bilinear", align_corners=False)
            x = x.round().clamp(0, 255).to(torch.uint8)
        return _convert_channels(x, self.channels).contiguous()


def load_image(path: str | Path, size: int, channels: int, draft: bool = False) -> torch.Tensor:
    """Decode one PNG/JPEG; resize its short side to ``size`` and center-crop (Sec. 3) -> uint8 (C, S, S).

    Grey and RGBA are converted to RGB (or to grey for 1-channel models).
    """
    with Image.open(path) as img:
        if draft:  # decode JPEGs at reduced scale when only checking they are readable
            img.draft("RGB", (size, size))
        img = img.convert("RGBA") if img.mode in ("P", "LA") else img
        if img.mode == "RGBA":  # composite on white so transparent areas are not black
            background = Image.new("RGB", img.size, (255, 255, 255))
            background.paste(img, mask=img.getchannel("A"))
            img = background
        img = img.convert("L" if channels == 1 else "RGB")
        w, h = img.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((nw, nh), Image.BILINEAR)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
        arr = np.array(img, dtype=np.uint8)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(arr))


class FolderSource(Source):
    """ImageFolder layout: ``PATH/<class>/<image>.png|jpg``. Unreadable files are skipped and listed."""

    def __init__(self, root: str | Path, size: int, channels: int, check: bool = True):
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"folder data: {root} is not a directory")
        self.name, self.size, self.channels = f"folder:{root}", size, channels
        self.classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not self.classes:
            raise DataError(f"folder data: {root} has no class sub-folders (expected {root}/<class>/<image>)")
        files, labels = [], []
        for label, cls in enumerate(self.classes):
            for f in sorted((root / cls).rglob("*")):
                if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file():
                    files.append(f)
                    labels.append(label)
        self.skipped: list[str] = []
        if check:
            self.skipped = _unreadable(root, files, size, channels)
            unreadable = set(self.skipped)
            keep = [i for i, f in enumerate(files) if str(f) not in unreadable]
            files, labels = [files[i] for i in keep], [labels[i] for i in keep]
        if self.skipped:
            warnings.warn(f"{len(self.skipped)} unreadable image file(s) skipped under {root}: "
                          + ", ".join(self.skipped[:10]) + (" ..." if len(self.skipped) > 10 else ""))
        if not files:
            raise DataError(f"folder data: no readable PNG/JPEG images under {root}")
        self.files = files
        self.labels = torch.tensor(labels, dtype=torch.long)

    def get(self, indices) -> torch.Tensor:
        return torch.stack([load_image(self.files[int(i)], self.size, self.channels) for i in indices])


def _unreadable(root: Path, files: list[Path], size: int, channels: int) -> list[str]:
    """The files of a folder that do not decode, through the runner's cache: keyed by every file's
    path, size and modification time, so each analysis of the same folder decodes it once, and a
    changed or added file is checked again."""
    from .runner import cache_dir, cache_key, cached

    def check() -> list[str]:
        bad = []
        for f in tqdm(files, desc=f"checking {root.name}", unit="img", disable=None, leave=False):
            try:
                load_image(f, size, channels, draft=True)
            except Exception:  # noqa: BLE001 - any decode failure means "unreadable"
                bad.append(str(f))
        return bad

    stats = [(str(f), st.st_size, st.st_mtime_ns) for f in files for st in [f.stat()]]
    listing = hashlib.sha256(json.dumps(stats).encode()).hexdigest()
    key = cache_key(_unreadable, {"files": listing, "size": size, "channels": channels})
    return cached(cache_dir() / "folders" / f"{key[:32]}.json", key, check)[0]


# The two halves of Fashion-MNIST's classes for transfer inside one data set (Yosinski et al. 2014, the
# analogue of Sec. 5.2's ImageNet -> Caltech-101): pretrain on A, transfer to B. The rule, fixed before any
# result: group the classes by kind (tops 0, 2, 4, 6; other garments 1, 3; footwear 5, 7, 9; bags 8) and
# deal them alternately to A and B in that order, so each half holds tops, another garment and footwear
# (B is related to A) while no class is in both (B is new to the pretrained model).
SPLIT_A = (0, 1, 4, 5, 9)  # T-shirt/top, Trouser, Coat, Sandal, Ankle boot
SPLIT_B = (2, 3, 6, 7, 8)  # Pullover, Dress, Shirt, Sneaker, Bag
_SUBSET = re.compile(r"fashion-mnist\[([^\]]*)\](:train|:test)?")


def subset_spec(classes, split: str = "") -> str:
    """The data spec of Fashion-MNIST's ``classes`` (label numbers), e.g. ``fashion-mnist[2,3,6,7,8]:test``."""
    return f"fashion-mnist[{','.join(str(int(c)) for c in classes)}]" + (f":{split}" if split else "")


def _subset_classes(text: str, spec: str) -> list[int]:
    try:
        chosen = [int(c) for c in text.split(",")]
    except ValueError:
        chosen = []
    if not chosen or len(set(chosen)) != len(chosen) or not all(0 <= c < len(FASHION_CLASSES) for c in chosen):
        raise DataError(f"bad class subset in {spec!r}: give distinct class numbers 0-9, e.g. "
                        f"{subset_spec(SPLIT_B)}")
    return chosen


def open_source(spec: str, size: int = 28, channels: int = 1) -> Source:
    """Open a data spec: ``fashion-mnist``, ``fashion-mnist:test``, ``digits`` or ``folder:PATH``.

    ``fashion-mnist[2,3,6,7,8]`` (and ``...:test``) keeps only the listed classes, relabelled 0..k-1 in
    the listed order and named as in Fashion-MNIST; :data:`SPLIT_A` and :data:`SPLIT_B` are the halves
    of the transfer analogue (Sec. 5.2). ``size`` and ``channels`` are the stored image size and channel
    count of the model (see :func:`preprocess_for`): 28/1 for the small models, 256/3 for the paper's.
    """
    subset = _SUBSET.fullmatch(spec.replace(" ", ""))
    if subset:
        chosen = _subset_classes(subset.group(1), spec)
        whole = open_source("fashion-mnist" + (subset.group(2) or ""), size, channels)
        keep = torch.isin(whole.labels, torch.tensor(chosen)).nonzero().flatten()
        relabel = torch.full((len(FASHION_CLASSES),), -1, dtype=torch.long)
        relabel[torch.tensor(chosen)] = torch.arange(len(chosen))
        return TensorSource(subset_spec(chosen, (subset.group(2) or "")[1:]), whole.images[keep],
                            relabel[whole.labels[keep]], [FASHION_CLASSES[c] for c in chosen], size, channels)
    if spec in ("fashion-mnist", "fashion-mnist:train", "fashion-mnist:test"):
        d = fashion_mnist_dir()
        prefix = "t10k" if spec.endswith(":test") else "train"
        images = torch.from_numpy(read_idx(d / f"{prefix}-images-idx3-ubyte.gz").copy()).unsqueeze(1)
        labels = torch.from_numpy(read_idx(d / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64))
        return TensorSource(spec, images, labels, FASHION_CLASSES, size, channels)
    if spec == "digits":
        from sklearn.datasets import load_digits
        digits = load_digits()
        images = torch.from_numpy((digits.images * (255.0 / 16.0)).round().astype(np.uint8)).unsqueeze(1)
        labels = torch.from_numpy(digits.target.astype(np.int64))
        return TensorSource(spec, images, labels, [str(i) for i in range(10)], size, channels)
    if spec.startswith("folder:"):
        return FolderSource(spec[len("folder:"):], size, channels)
    raise DataError(f"unknown data spec {spec!r}; use fashion-mnist, fashion-mnist:test, "
                    f"fashion-mnist[CLASSES] (e.g. {subset_spec(SPLIT_B)}), digits or folder:PATH")


# ----------------------------------------------------------------------------- preprocessing

@dataclass
class Preprocess:
    """uint8 images at the stored size -> the model's input space (Sec. 3).

    ``(x / 255 * scale - mean) / std``, then a crop of ``input_size``: the paper's 10 sub-crops
    (4 corners + center, each optionally flipped) of the stored image padded by ``pad``. ``mean`` is
    the paper's per-pixel mean image (C, S, S) or a per-channel mean (C, 1, 1) as torchvision models
    use with ``std`` (C, 1, 1).
    """

    input_size: int
    stored_size: int
    channels: int
    mean: torch.Tensor  # (C, stored_size, stored_size) or (C, 1, 1), in scaled units
    scale: float = 1.0
    pad: int = 0
    std: torch.Tensor | None = None  # (C, 1, 1) per-channel divisor, in scaled units; None: 1

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) uint8 -> float, scaled, mean subtracted, divided by ``std``, padded by ``pad``
        (with the mean, i.e. 0)."""
        x = x.float() * (self.scale / 255.0) - self.mean.to(x.device)
        if self.std is not None:
            x = x / self.std.to(x.device)
        return F.pad(x, (self.pad,) * 4) if self.pad else x

    def crop(self, x: torch.Tensor, which: int) -> torch.Tensor:
        """Sub-crop ``which`` in 0..9 of normalised images: 0-4 = TL, TR, BL, BR, center; 5-9 flipped."""
        full, s = x.shape[-1], self.input_size
        m = full - s
        top, left = [(0, 0), (0, m), (m, 0), (m, m), (m // 2, m // 2)][which % 5]
        x = x[..., top:top + s, left:left + s]
        return x.flip(-1) if which >= 5 else x

    def train(self, x: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
        """Sub-crop ``which[i]`` (0..9, drawn at random by the trainer) of each sample (Sec. 3)."""
        x = self.normalise(x)
        out = torch.empty(len(x), x.shape[1], self.input_size, self.input_size, dtype=x.dtype, device=x.device)
        for w in which.unique().tolist():
            sel = (which == w).nonzero().flatten()
            out[sel] = self.crop(x[sel], w)
        return out

    def eval(self, x: torch.Tensor) -> torch.Tensor:
        """The center crop."""
        return self.crop(self.normalise(x), 4).contiguous()

    def ten_crops(self, x: torch.Tensor) -> torch.Tensor:
        """All 10 sub-crops -> (10, B, C, s, s); average the model's outputs over the first axis."""
        x = self.normalise(x)
        return torch.stack([self.crop(x, w) for w in range(10)])

    def to_dict(self) -> dict:
        d = {"input_size": self.input_size, "stored_size": self.stored_size, "channels": self.channels,
             "scale": self.scale, "pad": self.pad}
        if self.mean.shape[-1] == 1:  # per channel: small enough to state
            d["mean"] = self.mean.flatten().tolist()
        if self.std is not None:
            d["std"] = self.std.flatten().tolist()
        return d


def preprocess_for(input_size: int, channels: int, mean: torch.Tensor | None = None) -> Preprocess:
    """The preprocessing of Sec. 3 for a model's input size.

    224 px models: images stored at 256 and scaled to [0, 255] like the paper (so the RMS
    renormalisation radius of 0.1 means what it meant there); 10 crops of 224.
    Small models: stored at their input size, scaled to [0, 1], padded by 2 px so the 10 crops
    are shifts of up to 2 px.
    """
    if input_size >= 64:
        stored, scale, pad = round(input_size * 256 / 224), 255.0, 0
    else:
        stored, scale, pad = input_size, 1.0, 2
    if mean is None:
        mean = torch.zeros(channels, stored, stored)
    return Preprocess(input_size, stored, channels, mean, scale, pad)


def mean_image(source: Source, preprocess: Preprocess, indices=None, batch_size: int = 1000) -> torch.Tensor:
    """Per-pixel mean over (a subset of) the training set, in the scaled units of ``preprocess``."""
    indices = torch.arange(len(source)) if indices is None else torch.as_tensor(indices)
    total = torch.zeros(preprocess.channels, preprocess.stored_size, preprocess.stored_size, dtype=torch.float64)
    for start in tqdm(range(0, len(indices), batch_size), desc="mean image", disable=None, leave=False):
        batch = source.get(indices[start:start + batch_size])
        total += batch.double().sum(0)
    return (total / len(indices) * (preprocess.scale / 255.0)).float()


def default_workers(source: Source) -> int:
    """Decoding processes for a pass over ``source``: for a folder of image files, one per core but
    one (at most 8) beside the main process; none for data already in memory."""
    if not isinstance(source, FolderSource):
        return 0
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def batches(source: Source, indices: torch.Tensor, batch_size: int, workers: int | None = 0, pin: bool = False):
    """Yield uint8 image batches and labels for ``indices`` in order; folder images are decoded in
    ``workers`` DataLoader processes (None: :func:`default_workers`), in pinned memory with ``pin``
    (for non-blocking copies to a GPU). Memory stays bounded by a few batches."""
    workers = default_workers(source) if workers is None else workers
    if isinstance(source, FolderSource) and workers > 0:
        loader = torch.utils.data.DataLoader(
            _FolderItems(source, indices), batch_size=batch_size, num_workers=workers, shuffle=False,
            pin_memory=pin, persistent_workers=False, prefetch_factor=4)
        yield from loader
        return
    for start in range(0, len(indices), batch_size):
        idx = indices[start:start + batch_size]
        yield source.get(idx), source.labels[idx]


class _FolderItems(torch.utils.data.Dataset):
    def __init__(self, source: FolderSource, indices: torch.Tensor):
        self.source, self.indices = source, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        j = int(self.indices[i])
        return self.source.get([j])[0], self.source.labels[j]

