"""Architecture selection (Sec. 4.1, Fig. 6): layer-1 filters and layer-2 projections of trained runs
side by side, with numbers for what the paper shows by eye.

Per run: the fraction of dead layer-1 filters (collapsed weights, or never active on the probe
images) and how much a few filters dominate (Fig. 6a, b), the
energy of the layer-1 filters in low / mid / high spatial-frequency bands ("a mix of extremely high
and low frequency information, with little coverage of the mid frequencies"), two numbers for the
aliasing of Fig. 6(d) ("aliasing artifacts caused by the large stride 4 used in the 1st layer"): its
cause, the share of layer-1 filter energy above the Nyquist frequency of the conv1 stride (which the
stride folds back into the maps layer 2 reads), and its symptom, the high-band energy share of the
layer-2 projections; and the test accuracy. ``deconvnet architecture --runs A,B,...`` takes run
directories (or checkpoints) of e.g. ``alexnet-small``, ``zfnet-small`` and ``zfnet-small
--no-renorm`` trained on the same data and budget. Budget: about 5 s for three 28 px runs on 2 CPU
cores (a top-1 pass over 1000 images each).

Every claim compares two runs with a 95% interval over what varies within them: the filter statistics
over layer-1 filters (two independent groups of filters, bootstrapped), the layer-2 statistic over the
projected maps, and the test accuracy over training seeds (the seed spread Table 3's baseline measured,
``seed_noise``) and test images (binomial).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from ._analysis import callable_module, to_rgb
from .checkpoint import CheckpointInfo
from .data import Source
from .deconvnet import contrast_stretch
from .errors import UserError
from .topk import choose_maps, gallery, topk_pass
from .figures import finish, new_figure
from .findings import Finding
from .findings import to_json as to_findings_json
from .stats import bootstrap, difference_interval, verdict

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
    f = torch.fft.fftfreq(size, dtype=torch.float64, device=x.device)
    radius = (f[:, None] ** 2 + f[None, :] ** 2).sqrt()
    band = torch.bucketize(radius, torch.tensor(BAND_EDGES, dtype=torch.float64, device=x.device), right=True)
    energy = torch.stack([power[:, band == b].sum(1) for b in range(len(BANDS))], 1)
    return (energy / energy.sum(1, keepdim=True)).float()  # NaN for an all-zero image


def aliased_shares(weights: torch.Tensor, stride: int) -> torch.Tensor:
    """Each filter's share of energy at frequencies above the Nyquist frequency of ``stride`` (|fx| or
    |fy| > 1 / (2 stride) cycles/pixel): what sampling the filter's output every ``stride`` pixels folds
    back onto lower frequencies. 0 for stride 1; NaN for an all-zero filter. (F,) float64."""
    size = max(SPECTRUM_SIZE, weights.shape[-1])
    power = torch.fft.fft2(weights.detach().double(), s=(size, size)).abs().pow(2).sum(1)  # (F, size, size)
    f = torch.fft.fftfreq(size, dtype=torch.float64, device=weights.device).abs()
    above = (f[:, None] > 0.5 / stride) | (f[None, :] > 0.5 / stride)
    return power[:, above].sum(1) / power.sum((1, 2))


def aliased_energy(weights: torch.Tensor, stride: int) -> float:
    """Mean of :func:`aliased_shares` over the filters (all-zero filters left out)."""
    return float(aliased_shares(weights, stride).nanmean())


def filter_metrics(weights: torch.Tensor) -> dict:
    """Numbers for a layer's filters (F, C, k, k), as Fig. 6(a-c) shows them by eye.

    ``rms`` per filter; ``dead``: fraction with RMS below ``DEAD_RMS`` times the median; ``dominance``:
    :func:`dominance` (1 = no filter dominates); ``bands``: mean over filters of each filter's
    low / mid / high energy fractions (all-zero filters left out). Per filter too: ``is_dead`` (F,) bool
    and ``band_fractions`` (F, 3), NaN rows for all-zero filters.
    """
    rms = weights.detach().double().pow(2).mean(dim=(1, 2, 3)).sqrt()
    is_dead = rms < DEAD_RMS * max(float(np.median(rms.numpy())), 1e-30)
    fractions = band_energy(weights.detach())
    return {"rms": rms.float(), "dead": float(is_dead.double().mean()), "dominance": dominance(rms.numpy()),
            "bands": {name: float(v) for name, v in zip(BANDS, fractions.nanmean(0))},
            "is_dead": is_dead, "band_fractions": fractions}


def dominance(rms) -> float:
    """How much a few filters dominate: the mean RMS of the strongest tenth of the filters (at least 2)
    over the median RMS (1 = none does). Not the single largest: a maximum has no bootstrap interval
    (no resample exceeds it), while the mean of the top tenth is a smooth statistic of the filters."""
    rms = np.sort(np.asarray(rms, dtype=float))
    top = rms[-max(2, math.ceil(0.1 * len(rms))):]
    return float(top.mean() / max(float(np.median(rms)), 1e-30))


@dataclass
class ArchitectureRun:
    """One run of Fig. 6: its layer-1 filters, layer-2 projections and their numbers."""

    label: str
    model: str
    renorm: bool
    accuracy: dict  # {"top1", "top5", "data", "n"} from the checkpoint
    filters: torch.Tensor  # (F, C, k, k) layer-1 weights
    metrics: dict  # filter_metrics(filters) without its per-filter entries, plus "silent"
    rms: list[float]
    maps: list[int]  # the layer-2 maps projected
    projections: torch.Tensor  # (M, C, R, R) each map's strongest activation projected, cut to its field
    aliasing: float  # aliased_energy of the layer-1 filters at the conv1 stride
    layer2_high: float  # mean high-band energy fraction of the layer-2 projections
    per_filter: dict  # per layer-1 filter: "dead_or_silent" (0/1), "mid" band fraction, "aliased" share
    layer2_high_maps: list[float]  # per projected layer-2 map: its high-band energy fraction


def run_label(info: CheckpointInfo) -> str:
    """``zfnet-small`` or ``zfnet-small (no renorm)``."""
    renorm = info.train_config.get("renorm", True)
    return info.config.name + ("" if renorm else " (no renorm)")


def architecture_run(model, source: Source, indices, maps: int = 16, seed: int = 0) -> ArchitectureRun:
    """Fig. 6 for one trained model (a :class:`~deconvnet.subject.Subject`): layer-1 filter numbers
    (``silent``: the share of filters whose output at layer 1 is 0 everywhere on ``source[indices]``),
    and the strongest activation over those images of ``maps`` random layer-2 maps projected to pixels
    (Sec. 2.1). The layer-1 filters are the first convolution's."""
    from .subject import as_subject

    subject = as_subject(model)
    net, info, preprocess = subject.model, subject.info, subject.preprocess
    layer1, layer2 = subject.layers(None, [1, 2])
    conv1 = next((m for m in net.modules() if isinstance(m, nn.Conv2d)), None)
    if conv1 is None:
        raise UserError(f"{subject.spec} has no convolution: Fig. 6 shows layer-1 filters")
    tables = topk_pass(net, source, preprocess, [layer1, layer2], k=1, indices=indices)
    table = tables[layer2]
    chosen = choose_maps(table, maps, seed)
    shown = gallery(net, source, preprocess, layer2, table, chosen, subject.other_activations)
    projections = shown.projections[:, 0]  # (M, C, R, R), NaN outside the image
    high = band_energy(projections.nan_to_num(0.0))[:, 2] if chosen else torch.zeros(0)
    layer2_high = float(high.nanmean()) if chosen else float("nan")
    filters = conv1.weight.detach().cpu().clone()  # results come back to the CPU
    metrics = filter_metrics(filters)
    rms = metrics.pop("rms").tolist()
    silent = tables[layer1].values[:, 0] <= 0
    if len(silent) != len(filters):  # layer 1 is not the first convolution's maps: no silence to read
        silent = torch.zeros(len(filters), dtype=torch.bool)
    metrics["silent"] = float(silent.double().mean())
    shares = aliased_shares(filters, conv1.stride[0])
    per_filter = {"dead_or_silent": (metrics.pop("is_dead") | silent).double().tolist(),
                  "mid": metrics.pop("band_fractions")[:, 1].tolist(), "aliased": shares.tolist()}
    label = run_label(info) if info else subject.spec
    renorm = bool(info.train_config.get("renorm", True)) if info else True
    return ArchitectureRun(label, info.config.name if info else subject.spec, renorm,
                           dict(info.accuracy) if info else {}, filters, metrics, rms, chosen, projections,
                           float(shares.nanmean()), layer2_high, per_filter, [float(v) for v in high])


def architecture(runs: list, data=None, limit: int = 1000, maps: int = 16, seed: int = 0,
                 device: str = "auto") -> list[ArchitectureRun]:
    """Fig. 6 for several trained models side by side (:func:`architecture_run` each).

    Args:
        runs: models under study: :class:`~deconvnet.subject.Subject`, ``nn.Module`` (wrapped by
            :func:`~deconvnet.subject.as_subject`), or model specs (a run directory or checkpoint).
        data: images searched for the strongest layer-2 activations (a spec or an open source);
            default each checkpoint's test data.
        limit: the first ``limit`` images.
        device: where the runs given as specs are loaded (``auto``: CUDA when available).
    """
    from .subject import as_subject, load_subject

    summaries = []
    for run in runs:
        subject = load_subject(str(run), device=device) if isinstance(run, (str, Path)) else as_subject(run)
        spec = data or (subject.info.accuracy.get("data") if subject.info else None) or "fashion-mnist:test"
        source = subject.open_data(spec) if isinstance(spec, str) else spec
        summaries.append(architecture_run(subject, source, range(min(limit, len(source))), maps=maps, seed=seed))
    return summaries


def _find(runs: list[ArchitectureRun], model: str, renorm: bool) -> ArchitectureRun | None:
    return next((r for r in runs if r.model == model and r.renorm == renorm), None)


def _values(values) -> np.ndarray:
    """The finite values (all-zero filters have no spectrum: NaN)."""
    v = np.asarray(values, dtype=float)
    return v[np.isfinite(v)]


ONE_RUN = " (one run each: the interval is over these runs' filters, not over training seeds)"


def _finding(claim: str, paper: str, ours, quantity: str, measured: tuple, n: int, unit: str, if_not_held: str,
             reading: str) -> Finding:
    estimate, interval = measured
    span = "no interval" if interval is None else f"[{interval[0]:.3g}, {interval[1]:.3g}]"
    return Finding(claim, paper, ours, verdict(interval), f"{reading}: {quantity} {estimate:.3g} {span}, n = {n} {unit}.",
                   quantity=quantity, estimate=estimate, interval=interval, n=n, unit=unit, if_not_held=if_not_held)


def accuracy_difference(a: dict, b: dict, seed_noise: list[float] | None) -> tuple[float, tuple[float, float] | None]:
    """Test top-1 accuracy of run ``a`` minus run ``b`` (one run each), with a t interval from the seed
    spread of ``seed_noise`` (accuracies of one model trained with several seeds, e.g. Table 3's baseline)
    plus each accuracy's binomial variance over its test images (taken as independent: conservative, as
    the two runs err on many of the same images). No interval without ``seed_noise`` or the test images'
    count ``n``."""
    from .stats import contrast_interval

    known = bool(seed_noise) and all(r.get("n") for r in (a, b))
    binomial = sum(r["top1"] * (1 - r["top1"]) / r["n"] for r in (a, b)) if known else 0.0
    estimate, interval = contrast_interval([(1, [a["top1"]]), (-1, [b["top1"]]), (0, seed_noise or [])], binomial)
    return estimate, (interval if known else None)


def architecture_findings(runs: list[ArchitectureRun], seed_noise: list[float] | None = None) -> list[Finding]:
    """Sec. 4.1's claims for the pairs present: ZFNet vs AlexNet (both renormalised), ZFNet with vs
    without renormalisation. Models are matched by name (``zfnet*`` against ``alexnet*`` of the same size).
    Each claim is a difference between two runs, held when its 95% interval lies above 0: filter
    statistics over the layer-1 filters of each run (two independent groups), the layer-2 statistic over
    the projected maps (so these compare the two runs: seed-to-seed variation is not in their interval,
    and each quantity says so), the accuracy over seeds (``seed_noise``: test top-1 accuracies of one model trained
    with several seeds at one budget) and test images."""
    out = []
    for zf in [r for r in runs if r.model.startswith("zfnet") and r.renorm]:
        alex = _find(runs, zf.model.replace("zfnet", "alexnet"), True)
        if alex is not None:
            pair, filters = f"{zf.label} vs {alex.label}", len(zf.rms) + len(alex.rms)
            dead = [zf.per_filter["dead_or_silent"], alex.per_filter["dead_or_silent"]]
            out.append(_finding(
                f"{pair}: fewer dead layer-1 filters (collapsed or silent)", "Fig. 6(b) vs (c)",
                {"dead": [zf.metrics["dead"], alex.metrics["dead"]], "silent": [zf.metrics["silent"], alex.metrics["silent"]]},
                f"share of dead or silent layer-1 filters, {alex.label} minus {zf.label}{ONE_RUN}",
                difference_interval(dead[1], dead[0], paired=False), filters, "filters",
                "Of the scale: alexnet-small's conv1 is 5x5 at stride 2 on 28 px (AlexNet's 11x11 at stride 4 on 224 "
                "px), and a few epochs leave filters little time to die.", "Dead or silent layer-1 filters"))
            out.append(_finding(
                f"{pair}: no few layer-1 filters dominate as much (top-tenth / median RMS)", "Fig. 6(b) vs (c)",
                [zf.metrics["dominance"], alex.metrics["dominance"]],
                f"mean RMS of the strongest tenth of the layer-1 filters / median RMS, {alex.label} minus {zf.label}{ONE_RUN}",
                bootstrap(lambda a, z: dominance(a) - dominance(z), alex.rms, zf.rms, paired=False), filters,
                "filters", "Of the set-up: both runs renormalise their filters to the same RMS radius, which caps "
                           "how far any one can dominate.", "Layer-1 dominance"))
            mid = [_values(zf.per_filter["mid"]), _values(alex.per_filter["mid"])]
            out.append(_finding(
                f"{pair}: more mid-frequency energy in layer 1 (AlexNet: 'little coverage of the mid frequencies')",
                "Sec. 4.1, Fig. 6(b) vs (c)", [zf.metrics["bands"]["mid"], alex.metrics["bands"]["mid"]],
                f"mid-band share of a layer-1 filter's energy, mean over filters, {zf.label} minus {alex.label}{ONE_RUN}",
                difference_interval(mid[0], mid[1], paired=False), len(mid[0]) + len(mid[1]), "filters",
                "Of the scale: 3x3 and 5x5 filters have few frequencies per band, unlike AlexNet's 11x11.",
                "Layer-1 mid-band energy"))
            aliased = [_values(zf.per_filter["aliased"]), _values(alex.per_filter["aliased"])]
            out.append(_finding(
                f"{pair}: less aliasing from the layer-1 stride (share of layer-1 filter energy above the stride's "
                "Nyquist frequency)", "Sec. 4.1, Fig. 6(d) vs (e)", [zf.aliasing, alex.aliasing],
                f"share of a layer-1 filter's energy above its stride's Nyquist frequency, mean over filters, "
                f"{alex.label} minus {zf.label}{ONE_RUN}",
                difference_interval(aliased[1], aliased[0], paired=False), len(aliased[0]) + len(aliased[1]),
                "filters", "Of the set-up: it compares the two conv1 strides, so a 'not held' would mean AlexNet's "
                           "filters learned to have no energy above their stride's Nyquist frequency.",
                "Layer-1 aliasing"))
            high = [_values(zf.layer2_high_maps), _values(alex.layer2_high_maps)]  # NaN: a blank projection
            if len(high[0]) and len(high[1]):
                out.append(_finding(
                    f"{pair}: less high-frequency (aliasing) energy in the layer-2 projections",
                    "Sec. 4.1, Fig. 6(d) vs (e)", [zf.layer2_high, alex.layer2_high],
                    f"high-band share of a layer-2 projection's energy, mean over maps, {alex.label} minus {zf.label}"
                    f"{ONE_RUN.replace('filters', 'maps')}",
                    difference_interval(high[1], high[0], paired=False), len(high[0]) + len(high[1]), "maps",
                    "Of the scale: at 28 px a layer-2 projection spans a few pixels, where aliasing has little room "
                    "to show.", "Layer-2 high-band energy"))
            if zf.accuracy.get("top1") is not None and alex.accuracy.get("top1") is not None:
                measured = accuracy_difference(zf.accuracy, alex.accuracy, seed_noise)
                seeds = len(seed_noise or [])
                out.append(_finding(
                    f"{pair}: higher test accuracy", "Table 2: 38.4% vs 40.5% top-1 error",
                    [zf.accuracy["top1"], alex.accuracy["top1"]],
                    f"test top-1 accuracy, {zf.label} minus {alex.label}", measured, seeds,
                    f"seeds (Table 3's baseline) and {zf.accuracy.get('n', '?')} test images",
                    "Of the scale: on 28 px Fashion-MNIST after a few epochs both nets may be as accurate, and the "
                    "paper's 2-point gap on ImageNet need not appear.",
                    "Test accuracy" if seed_noise else
                    "Test accuracy (no seed spread given: compare --seed-noise ABLATION.json)"))
        plain = _find(runs, zf.model, False)
        if plain is not None:
            out.append(_finding(
                f"{zf.model}: RMS renormalisation stops a few layer-1 filters dominating (top-tenth / median RMS, with "
                "vs without)", "Sec. 3, Fig. 6(a)", [zf.metrics["dominance"], plain.metrics["dominance"]],
                f"mean RMS of the strongest tenth of the layer-1 filters / median RMS, {plain.label} minus {zf.label}"
                f"{ONE_RUN}",
                bootstrap(lambda p, z: dominance(p) - dominance(z), plain.rms, zf.rms, paired=False),
                len(zf.rms) + len(plain.rms), "filters",
                "Of the set-up: with the small recipe's initialisation, weight decay and short schedule the filters "
                "may never grow past the radius, leaving renormalisation nothing to stop.",
                "Layer-1 dominance with vs without renormalisation"))
    return out


def architecture_to_json(runs: list[ArchitectureRun], seed_noise: list[float] | None = None) -> dict:
    """Per-run numbers and the findings, ready for ``json.dump``."""
    return {"analysis": "architecture selection (Fig. 6)",
            "definitions": {"dead": f"fraction of layer-1 filters with RMS < {DEAD_RMS} x the median RMS",
                            "silent": "fraction of layer-1 filters whose ReLU output is 0 on every probe image",
                            "dominance": "mean RMS of the strongest tenth of the layer-1 filters (at least 2) / median "
                                         "RMS",
                            "bands": f"mean fraction of a layer-1 filter's spectral energy at radius < "
                                     f"{BAND_EDGES[0]:.3f}, < {BAND_EDGES[1]:.3f}, >= {BAND_EDGES[1]:.3f} "
                                     "cycles/pixel (zero-padded to 32x32)",
                            "aliasing": "mean share of a layer-1 filter's energy above the Nyquist frequency of the "
                                        "conv1 stride (|fx| or |fy| > 1/(2 stride)); 0 for stride 1",
                            "layer2_high": "mean high-band energy fraction of the layer-2 projections"},
            "runs": [{"label": r.label, "model": r.model, "renorm": r.renorm, "accuracy": r.accuracy,
                      **r.metrics, "aliasing": r.aliasing, "layer2_high": r.layer2_high, "filter_rms": r.rms,
                      "layer2_maps": r.maps,
                      "per_filter": {k: [v if np.isfinite(v) else None for v in values]  # NaN: an all-zero filter
                                     for k, values in r.per_filter.items()},
                      "layer2_high_maps": [v if np.isfinite(v) else None for v in r.layer2_high_maps]}
                     for r in runs],
            "seed_noise": seed_noise,
            "findings": to_findings_json(architecture_findings(runs, seed_noise))}


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


def draw_architecture(runs: list[ArchitectureRun], path=None) -> Figure:
    """Fig. 6 with numbers: per run, its layer-1 filters (one shared grey scale), the layer-2
    projections (each stretched) and the sorted filter RMS."""
    fig, axes = new_figure(len(runs), 3, figsize=(13, 3.8 * len(runs)), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 1, 1.2]})
    for r, (a_filters, a_proj, a_rms) in zip(runs, axes):
        cols = int(np.ceil(np.sqrt(len(r.filters))))
        a_filters.imshow(to_rgb(_grid(r.filters, cols, True)), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        m, b = r.metrics, r.metrics["bands"]
        a_filters.set_title(f"{r.label}: layer-1 filters\ndead {m['dead']:.0%}, silent {m['silent']:.0%}, "
                            f"top-tenth/median RMS {m['dominance']:.2f}\n"
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


callable_module(__name__, architecture)
