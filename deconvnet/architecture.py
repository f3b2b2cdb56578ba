"""Architecture selection (Sec. 4.1, Fig. 6): layer-1 filters and layer-2 projections of trained runs
side by side, with numbers for what the paper shows by eye.

Per run: the fraction of dead layer-1 filters (collapsed weights, or never active on the probe
images) and how much one filter dominates (Fig. 6a, b), the
energy of the layer-1 filters in low / mid / high spatial-frequency bands ("a mix of extremely high
and low frequency information, with little coverage of the mid frequencies"), two numbers for the
aliasing of Fig. 6(d) ("aliasing artifacts caused by the large stride 4 used in the 1st layer"): its
cause, the share of layer-1 filter energy above the Nyquist frequency of the conv1 stride (which the
stride folds back into the maps layer 2 reads), and its symptom, the high-band energy share of the
layer-2 projections; and the test accuracy. ``deconvnet compare --runs A,B,...`` takes run
directories (or checkpoints) of e.g. ``alexnet-small``, ``zfnet-small`` and ``zfnet-small
--no-renorm`` trained on the same data and budget. Budget: about 5 s for three 28 px runs on 2 CPU
cores (a top-1 pass over 1000 images each).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ._analysis import to_rgb
from .checkpoint import CheckpointInfo
from .data import Source
from .deconvnet import contrast_stretch
from .features import layer_output
from .topk import choose_maps, gallery, top_k
from .figures import finish, new_figure
from .findings import Finding
from .findings import to_json as to_findings_json

if TYPE_CHECKING:
    from matplotlib.figure import Figure

BANDS = ("low", "mid", "high")
BAND_EDGES = (1 / 6, 1 / 3)  # cycles per input pixel: thirds of the Nyquist frequency 0.5
SPECTRUM_SIZE = 32  # filters are zero-padded to 32x32 before the FFT, for a smooth spectrum
DEAD_RMS = 0.1  # a filter with RMS below 10% of the layer's median is dead (no structure left)


def band_energy(x: torch.Tensor) -> torch.Tensor:
    """Fraction of each image's spectral energy in the low / mid / high bands: (N, C, h, w) -> (N, 3).

    Images are zero-padded to at least ``SPECTRUM_SIZE``; the power is summed over channels; the band
    of a frequency is its radius in cycles per pixel (Nyquist = 0.5) against ``BAND_EDGES``. An image
    of zeros has no spectrum: its row is NaN.
    """
    size = max(SPECTRUM_SIZE, x.shape[-1], x.shape[-2])
    power = torch.fft.fft2(x.double(), s=(size, size)).abs().pow(2).sum(1)  # (N, size, size)
    f = torch.fft.fftfreq(size, dtype=torch.float64)
    radius = (f[:, None] ** 2 + f[None, :] ** 2).sqrt()
    band = torch.bucketize(radius, torch.tensor(BAND_EDGES, dtype=torch.float64), right=True)  # 0, 1, 2
    energy = torch.stack([power[:, band == b].sum(1) for b in range(len(BANDS))], 1)
    return (energy / energy.sum(1, keepdim=True)).float()  # NaN for an all-zero image


def aliased_energy(weights: torch.Tensor, stride: int) -> float:
    """Mean share of each filter's energy at frequencies above the Nyquist frequency of ``stride``
    (|fx| or |fy| > 1 / (2 stride) cycles/pixel): what sampling the filter's output every ``stride``
    pixels folds back onto lower frequencies. 0 for stride 1."""
    size = max(SPECTRUM_SIZE, weights.shape[-1])
    power = torch.fft.fft2(weights.detach().double(), s=(size, size)).abs().pow(2).sum(1)  # (F, size, size)
    f = torch.fft.fftfreq(size, dtype=torch.float64).abs()
    above = (f[:, None] > 0.5 / stride) | (f[None, :] > 0.5 / stride)
    return float((power[:, above].sum(1) / power.sum((1, 2))).nanmean())  # all-zero filters left out


def filter_metrics(weights: torch.Tensor) -> dict:
    """Numbers for a layer's filters (F, C, k, k), as Fig. 6(a-c) shows them by eye.

    ``rms`` per filter; ``dead``: fraction with RMS below ``DEAD_RMS`` times the median; ``dominance``:
    max RMS / median RMS (1 = no filter dominates); ``bands``: mean over filters of each filter's
    low / mid / high energy fractions (all-zero filters left out).
    """
    rms = weights.detach().double().pow(2).mean(dim=(1, 2, 3)).sqrt()
    median = rms.median().clamp_min(1e-30)
    bands = band_energy(weights.detach()).nanmean(0)
    return {"rms": rms.float(), "dead": float((rms < DEAD_RMS * median).double().mean()),
            "dominance": float(rms.max() / median),
            "bands": {name: float(v) for name, v in zip(BANDS, bands)}}


@dataclass
class RunSummary:
    """One run of Fig. 6: its layer-1 filters, layer-2 projections and their numbers."""

    label: str
    model: str
    renorm: bool
    accuracy: dict  # {"top1", "top5", "data", "n"} from the checkpoint
    filters: torch.Tensor  # (F, C, k, k) layer-1 weights
    metrics: dict  # filter_metrics(filters) without "rms", plus "silent"
    rms: list[float]
    maps: list[int]  # the layer-2 maps projected
    projections: torch.Tensor  # (M, C, R, R) each map's strongest activation projected, cut to its field
    aliasing: float  # aliased_energy of the layer-1 filters at the conv1 stride
    layer2_high: float  # mean high-band energy fraction of the layer-2 projections


def run_label(info: CheckpointInfo) -> str:
    """``zfnet-small`` or ``zfnet-small (no renorm)``."""
    renorm = info.train_config.get("renorm", True)
    return info.config.name + ("" if renorm else " (no renorm)")


def summarise(model: nn.Module, info: CheckpointInfo, source: Source, indices, maps: int = 16,
              seed: int = 0) -> RunSummary:
    """Fig. 6 for one trained model: layer-1 filter numbers (``silent``: the share of filters whose
    ReLU output is 0 everywhere on ``source[indices]``), and the strongest activation over those
    images of ``maps`` random layer-2 maps projected to pixels (Sec. 2.1)."""
    layer2 = layer_output(model, 2)
    tables = top_k(model, source, info.preprocess, ["relu1", layer2], k=1, indices=indices)
    table = tables[layer2]
    chosen = choose_maps(table, maps, seed)
    shown = gallery(model, source, info.preprocess, layer2, table, chosen)
    projections = shown.projections[:, 0]  # (M, C, R, R), NaN outside the image
    layer2_high = float(band_energy(projections.nan_to_num(0.0))[:, 2].nanmean()) if chosen else float("nan")
    filters = model.conv1.weight.detach().clone()
    metrics = filter_metrics(filters)
    rms = metrics.pop("rms").tolist()
    metrics["silent"] = float((tables["relu1"].values[:, 0] <= 0).double().mean())
    aliasing = aliased_energy(filters, model.conv1.stride[0])
    return RunSummary(run_label(info), info.config.name, bool(info.train_config.get("renorm", True)),
                      dict(info.accuracy), filters, metrics, rms, chosen, projections, aliasing, layer2_high)


TIE = 0.01  # relative differences below 1% count as no difference in the findings


def _below(a: float, b: float) -> bool:
    """``a`` clearly below ``b``: by more than ``TIE`` of the larger."""
    return b - a > TIE * max(abs(a), abs(b))


def _find(runs: list[RunSummary], model: str, renorm: bool) -> RunSummary | None:
    return next((r for r in runs if r.model == model and r.renorm == renorm), None)


def architecture_findings(runs: list[RunSummary]) -> list[Finding]:
    """Sec. 4.1's claims for the pairs present: ZFNet vs AlexNet (both renormalised), ZFNet with vs
    without renormalisation. Models are matched by name (``zfnet*`` against ``alexnet*`` of the same size).
    A claim holds only by a margin: values within ``TIE`` of each other are a tie."""
    out = []
    for zf in [r for r in runs if r.model.startswith("zfnet") and r.renorm]:
        alex = _find(runs, zf.model.replace("zfnet", "alexnet"), True)
        if alex is not None:
            pair = f"{zf.label} vs {alex.label}"
            dead = [r.metrics["dead"] + r.metrics["silent"] for r in (zf, alex)]
            out.append({"claim": f"{pair}: fewer dead layer-1 filters (collapsed or silent)",
                        "paper": "Fig. 6(b) vs (c)", "ours": {"dead": [zf.metrics["dead"], alex.metrics["dead"]],
                                                             "silent": [zf.metrics["silent"], alex.metrics["silent"]]},
                        "held": dead[0] < dead[1]})
            out.append({"claim": f"{pair}: no layer-1 filter dominates as much (max / median RMS)",
                        "paper": "Fig. 6(b) vs (c)", "ours": [zf.metrics["dominance"], alex.metrics["dominance"]],
                        "held": _below(zf.metrics["dominance"], alex.metrics["dominance"])})
            out.append({"claim": f"{pair}: more mid-frequency energy in layer 1 (AlexNet: 'little coverage "
                                 "of the mid frequencies')", "paper": "Sec. 4.1, Fig. 6(b) vs (c)",
                        "ours": [zf.metrics["bands"]["mid"], alex.metrics["bands"]["mid"]],
                        "held": _below(alex.metrics["bands"]["mid"], zf.metrics["bands"]["mid"])})
            out.append({"claim": f"{pair}: less aliasing from the layer-1 stride (share of layer-1 filter "
                                 "energy above the stride's Nyquist frequency)", "paper": "Sec. 4.1, Fig. 6(d) vs (e)",
                        "ours": [zf.aliasing, alex.aliasing], "held": _below(zf.aliasing, alex.aliasing)})
            out.append({"claim": f"{pair}: less high-frequency (aliasing) energy in the layer-2 projections",
                        "paper": "Sec. 4.1, Fig. 6(d) vs (e)", "ours": [zf.layer2_high, alex.layer2_high],
                        "held": _below(zf.layer2_high, alex.layer2_high)})
            out.append({"claim": f"{pair}: higher test accuracy", "paper": "Table 2: 38.4% vs 40.5% top-1 error",
                        "ours": [zf.accuracy.get("top1"), alex.accuracy.get("top1")],
                        "held": (zf.accuracy.get("top1") or 0) > (alex.accuracy.get("top1") or 0)})
        plain = _find(runs, zf.model, False)
        if plain is not None:
            out.append({"claim": f"{zf.model}: RMS renormalisation stops a few layer-1 filters dominating "
                                 "(max / median RMS, with vs without)", "paper": "Sec. 3, Fig. 6(a)",
                        "ours": [zf.metrics["dominance"], plain.metrics["dominance"]],
                        "held": _below(zf.metrics["dominance"], plain.metrics["dominance"])})
    return [Finding(**d, reading=_reading(d)) for d in out]


def _reading(claim: dict) -> str:
    """One sentence: the claim's subject and our two values (ZFNet's first)."""
    ours = claim["ours"]
    if isinstance(ours, dict):
        values = "; ".join(f"{k} {_fmt(v[0])} vs {_fmt(v[1])}" for k, v in ours.items())
    else:
        values = f"{_fmt(ours[0])} vs {_fmt(ours[1])}"
    return f"{claim['claim'].split(' (')[0]}: {values}, {'held' if claim['held'] else 'not held'} at this scale."


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3g}"


def architecture_to_json(runs: list[RunSummary]) -> dict:
    """Per-run numbers and the findings, ready for ``json.dump``."""
    return {"analysis": "architecture selection (Fig. 6)",
            "definitions": {"dead": f"fraction of layer-1 filters with RMS < {DEAD_RMS} x the median RMS",
                            "silent": "fraction of layer-1 filters whose ReLU output is 0 on every probe image",
                            "dominance": "max RMS / median RMS of the layer-1 filters",
                            "bands": f"mean fraction of a layer-1 filter's spectral energy at radius < "
                                     f"{BAND_EDGES[0]:.3f}, < {BAND_EDGES[1]:.3f}, >= {BAND_EDGES[1]:.3f} "
                                     "cycles/pixel (zero-padded to 32x32)",
                            "aliasing": "mean share of a layer-1 filter's energy above the Nyquist frequency of the "
                                        "conv1 stride (|fx| or |fy| > 1/(2 stride)); 0 for stride 1",
                            "layer2_high": "mean high-band energy fraction of the layer-2 projections"},
            "runs": [{"label": r.label, "model": r.model, "renorm": r.renorm, "accuracy": r.accuracy,
                      **r.metrics, "aliasing": r.aliasing, "layer2_high": r.layer2_high, "filter_rms": r.rms,
                      "layer2_maps": r.maps}
                     for r in runs],
            "findings": to_findings_json(architecture_findings(runs))}


def _grid(tiles: torch.Tensor, cols: int, shared_scale: bool) -> torch.Tensor:
    """(N, C, h, w) tiles -> one (C, H, W) image in [0, 1] with 1 px white gaps.

    ``shared_scale``: grey = 0 and one scale for all tiles (so a dominant filter stands out, Fig. 6a);
    otherwise each tile is contrast-stretched on its own (NaN = outside the image, drawn white).
    """
    n, c, h, w = tiles.shape
    if shared_scale:
        tiles = 0.5 + 0.5 * tiles / tiles.abs().max().clamp_min(1e-12)
    else:
        inside = ~tiles.isnan()
        tiles = contrast_stretch(torch.where(inside, tiles, tiles.nan_to_num(0.0).amin(dim=(1, 2, 3), keepdim=True)))
        tiles = torch.where(inside, tiles, torch.ones(()))
    rows = -(-n // cols)
    out = torch.ones(c, rows * (h + 1) - 1, cols * (w + 1) - 1)
    for i, tile in enumerate(tiles):
        y, x = divmod(i, cols)
        out[:, y * (h + 1):y * (h + 1) + h, x * (w + 1):x * (w + 1) + w] = tile
    return out


def draw_architecture(runs: list[RunSummary], path=None) -> Figure:
    """Fig. 6 with numbers: per run, its layer-1 filters (one shared grey scale), the layer-2
    projections (each stretched) and the sorted filter RMS."""
    fig, axes = new_figure(len(runs), 3, figsize=(13, 3.8 * len(runs)), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 1, 1.2]})
    for r, (a_filters, a_proj, a_rms) in zip(runs, axes):
        cols = int(np.ceil(np.sqrt(len(r.filters))))
        a_filters.imshow(to_rgb(_grid(r.filters, cols, True)), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        m, b = r.metrics, r.metrics["bands"]
        a_filters.set_title(f"{r.label}: layer-1 filters\ndead {m['dead']:.0%}, silent {m['silent']:.0%}, "
                            f"max/median RMS {m['dominance']:.2f}\n"
                            f"bands L/M/H {b['low']:.2f}/{b['mid']:.2f}/{b['high']:.2f}, aliased {r.aliasing:.2f}",
                            fontsize=9)
        a_filters.axis("off")
        if len(r.projections):
            a_proj.imshow(to_rgb(_grid(r.projections, int(np.ceil(np.sqrt(len(r.projections)))), False)),
                          cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        top1 = r.accuracy.get("top1")
        a_proj.set_title(f"layer-2 projections, high band {r.layer2_high:.2f}"
                         + (f"\ntest top-1 {top1:.1%}" if top1 is not None else ""), fontsize=9)
        a_proj.axis("off")
        a_rms.semilogy(sorted(r.rms, reverse=True), marker=".")
        a_rms.set_xlabel("layer-1 filter (sorted)")
        a_rms.set_ylabel("RMS")
        a_rms.set_title("filter RMS", fontsize=9)
    fig.suptitle("Architecture selection, cf. Fig. 6", fontsize=11)
    return finish(fig, path)
