"""Feature evolution during training (Sec. 4, Fig. 4): for chosen feature maps of layers 1-5, the
strongest activation over a fixed set of training images at each snapshot epoch, projected to pixels.

The paper judges by eye that "the lower layers converge within a few epochs, the upper layers only
after 40-50". It is measured twice here:

- by the paper's visual criterion: a map is *stable* from the first snapshot after which its
  strongest activation stays in the same image and each consecutive pair of projections correlates at
  least ``STABLE_CORRELATION``; the claim is judged on the maps' stable epochs (layers 4-5 minus
  layers 1-2, an interval over maps);
- by the representation as a whole: the linear CKA (Kornblith et al. 2019) of each layer's output on a
  fixed probe set against the same layer in the last snapshot; a layer *settles* at the first snapshot
  from which its CKA stays at least ``CKA_THRESHOLD``; the claim is judged on the settling epoch
  (layers 4-5 minus layers 1-2, an interval from a bootstrap over the probe images).

Both read the run's own last snapshot as "converged": a layer still moving at the end settles there.

Budget: with 5 maps per layer over 2000 images, about 2 s per snapshot for a 28 px model on 2 CPU
cores; CKA on 500 probe images about 9 s for 13 snapshots (4 s of Gram matrices, 5 s for 2,000 bootstrap
resamples, all computed at once).
Train with ``--snapshots 1,2,3,...`` to get every epoch (the default keeps Fig. 4's epochs).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ._analysis import callable_module, features, to_rgb
from .checkpoint import CheckpointInfo, load_checkpoint
from .data import Preprocess, Source, open_source
from .errors import UserError
from .runner import progress
from .topk import mosaic, choose_maps, gallery, topk_pass
from .figures import finish, new_figure
from .findings import Finding, unmeasured
from .findings import to_json as to_findings_json
from .stats import difference_interval, verdict

if TYPE_CHECKING:
    from matplotlib.figure import Figure

STABLE_CORRELATION = 0.9
# Fixed before any run: a layer has settled when its linear CKA with the last snapshot stays >= 0.9, the
# same bar as the visual criterion's correlation; linear CKA between a layer's states is 1 only when they
# differ by a rotation and a scale, and the paper's "converged" asks no more than that.
CKA_THRESHOLD = 0.9
CKA_PROBE = 500  # probe images (the run's validation data): a 500 x 500 Gram matrix per layer and snapshot (2 MB each)
CKA_RESAMPLES = 2000  # bootstrap resamples of the probe images, as every interval of the report (stats.RESAMPLES)
LOW, HIGH = (1, 2), (4, 5)  # the layers the claim compares


def snapshot_paths(run: str | Path) -> list[tuple[int, Path]]:
    """``[(epoch, path)]`` of ``RUN/checkpoints/epoch-K.pt``, in epoch order."""
    found = []
    for path in (Path(run) / "checkpoints").glob("epoch-*.pt"):
        match = re.fullmatch(r"epoch-(\d+)\.pt", path.name)
        if match:
            found.append((int(match.group(1)), path))
    if len(found) < 2:
        raise UserError(f"{run} has {len(found)} snapshot(s) under checkpoints/; feature evolution needs at "
                        "least 2 (train with --snapshots 1,2,3,...)")
    return sorted(found)


@dataclass
class LayerEvolution:
    """One layer of Fig. 4. ``images`` (M, S): the image holding each map's strongest activation at each
    snapshot; ``projections`` (M, S, C, R, R): its projection cut to the receptive field (NaN outside the
    image); ``correlation`` (M, S-1) between consecutive projections; ``stable_epoch`` per map."""

    layer: str
    maps: list[int]
    images: np.ndarray
    values: np.ndarray
    projections: torch.Tensor
    correlation: np.ndarray
    stable_epoch: list[int]

    @property
    def mean_stable_epoch(self) -> float:
        return float(np.mean(self.stable_epoch)) if self.stable_epoch else float("nan")


@dataclass
class CkaEvolution:
    """Fig. 4 on whole layers: per layer (1..5), the linear CKA of each snapshot's output with the last
    snapshot's on ``probe`` images, ``cka`` (S,), and its 95% band ``band`` (S, 2) over resamples of the
    probe images; ``settled``: the epoch from which CKA stays >= ``threshold``, with its interval;
    ``difference``: mean settled epoch of layers 4-5 minus layers 1-2, with its interval (None when
    the model lacks one of them)."""

    probe: int
    threshold: float
    resamples: int
    cka: dict[int, np.ndarray]
    band: dict[int, np.ndarray]
    settled: dict[int, tuple[float, tuple[float, float]]]
    difference: tuple[float, tuple[float, float]] | None


@dataclass
class Evolution:
    epochs: list[int]
    layers: dict[int, LayerEvolution]  # by layer number 1..5
    cka: CkaEvolution | None = None  # the same snapshots measured by CKA (see :func:`cka_evolution`)
    data: str = ""  # the data searched and the probe data, where given as specs
    probe_data: str = ""


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two projections (NaN = outside the image, counted as 0)."""
    a, b = a.nan_to_num(0.0).flatten().double(), b.nan_to_num(0.0).flatten().double()
    a, b = a - a.mean(), b - b.mean()
    denominator = (a.norm() * b.norm()).item()
    return float((a @ b).item() / denominator) if denominator > 0 else 0.0


def settled_from(epochs: list[int], ok) -> int:
    """The first snapshot epoch from which ``ok[i]`` (snapshot i has settled) holds at every later
    snapshot but the last, which is the reference (the last epoch if ``ok`` fails just before it)."""
    start = len(epochs) - 1
    for i in range(len(epochs) - 2, -1, -1):
        if not ok[i]:
            break
        start = i
    return epochs[start]


def stable_from(epochs: list[int], images: np.ndarray, correlation: np.ndarray,
                threshold: float = STABLE_CORRELATION) -> int:
    """The first snapshot epoch after which the strongest image stays the same and every consecutive
    projection pair correlates >= ``threshold`` (the last epoch if it never settles)."""
    ok = [images[i] == images[i + 1] and correlation[i] >= threshold for i in range(len(epochs) - 1)]
    return settled_from(epochs, ok)


def centred_gram(x) -> np.ndarray:
    """The Gram matrix (n, n) of the rows of ``x`` (n, d) after centring each column, in float64."""
    x = torch.as_tensor(x).double()
    x = x - x.mean(0)
    return (x @ x.T).numpy()


def _hsic_many(k: np.ndarray, l: np.ndarray, w: np.ndarray, wk: np.ndarray, wl: np.ndarray) -> np.ndarray:
    """:func:`hsic` for many count vectors at once: ``w`` (R, n) resamples' image counts, ``wk`` = w K and
    ``wl`` = w L (Gram matrices are symmetric; shared between calls): (R,)."""
    total = w.sum(1)
    u, v = wk / total[:, None], wl / total[:, None]
    return ((w @ (k * l)) * w).sum(1) - 2 * total * (w * u * v).sum(1) + (w * u).sum(1) * (w * v).sum(1)


def hsic(k: np.ndarray, l: np.ndarray, w: np.ndarray) -> float:
    """sum_ij w_i w_j Kc_ij Lc_ij, with Kc = (I - 1 w'/N) K (I - w 1'/N): the (unnormalised) HSIC of
    two Gram matrices whose images count ``w`` times each (a bootstrap resample's counts; ones for the
    plain centring HKH), written out so no resampled copy is made. ``N`` = sum(w)."""
    w = np.asarray(w, dtype=float)[None]
    return float(_hsic_many(k, l, w, w @ k, w @ l)[0])


def gram_cka(k: np.ndarray, l: np.ndarray, w: np.ndarray | None = None) -> float:
    """Linear CKA (Kornblith et al. 2019, CKA with linear kernels) from two Gram matrices of the same
    images: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)); ``w``: image counts (default one each). NaN when
    a representation is constant (no spread to compare)."""
    w = np.ones(len(k)) if w is None else np.asarray(w, dtype=float)
    denominator = np.sqrt(hsic(k, k, w) * hsic(l, l, w))
    return hsic(k, l, w) / denominator if denominator > 0 else float("nan")


def linear_cka(x, y) -> float:
    """Linear CKA of two representations (n, d1), (n, d2) of the same n images:
    ||Yc' Xc||_F^2 / (||Xc' Xc||_F ||Yc' Yc||_F), columns centred (Kornblith et al. 2019)."""
    return gram_cka(centred_gram(x), centred_gram(y))


def cka_from_grams(epochs: list[int], grams: dict[int, list[np.ndarray]], threshold: float = CKA_THRESHOLD,
                   resamples: int = CKA_RESAMPLES) -> CkaEvolution:
    """:class:`CkaEvolution` from each layer's centred Gram matrices, one per snapshot (the last is the
    reference). Every interval comes from one set of bootstrap resamples of the probe images, the
    resamples :func:`stats.bootstrap` draws (its seed), each resample's CKA curves computed for all
    resamples at once (matrix products over their image counts) and shared by every statistic."""
    from .stats import percentile_interval, resamples_of

    layers = list(grams)
    n = len(grams[layers[0]][0])
    counts = np.stack([np.bincount(pick, minlength=n) for pick in resamples_of(n, resamples)]).astype(float)
    everyone = np.ones((1, n))

    def curves(w: np.ndarray) -> np.ndarray:
        """(R, layers, snapshots): CKA with the last snapshot under image counts ``w`` (R, n)."""
        out = np.empty((len(w), len(layers), len(epochs)))
        for i, m in enumerate(layers):
            last = grams[m][-1]
            w_last = w @ last
            own = _hsic_many(last, last, w, w_last, w_last)
            for s, k in enumerate(grams[m]):
                wk = w @ k
                d = np.sqrt(_hsic_many(k, k, w, wk, wk) * own)
                with np.errstate(invalid="ignore", divide="ignore"):
                    out[:, i, s] = np.where(d > 0, _hsic_many(k, last, w, wk, w_last) / np.where(d > 0, d, 1), np.nan)
        return out

    full, drawn = curves(everyone)[0], curves(counts)  # (layers, snapshots), (R, layers, snapshots)

    def settled(c: np.ndarray, i: int) -> float:
        return settled_from(epochs, c[i] >= threshold)

    def interval(statistic) -> tuple[float, tuple[float, float]]:
        """The statistic of the curves on every image, with its percentile interval over the resamples."""
        return float(statistic(full)), percentile_interval(np.array([statistic(c) for c in drawn]))

    cka, band, when = {}, {}, {}
    for i, m in enumerate(layers):
        cka[m] = full[i]
        band[m] = np.array([percentile_interval(drawn[:, i, s]) for s in range(len(epochs))])
        when[m] = interval(lambda c, i=i: settled(c, i))
    difference = None
    low, high = [layers.index(m) for m in LOW if m in layers], [layers.index(m) for m in HIGH if m in layers]
    if low and high:
        difference = interval(lambda c: np.mean([settled(c, i) for i in high]) - np.mean([settled(c, i) for i in low]))
    return CkaEvolution(n, threshold, resamples, cka, band, when, difference)


def _layers_1_to_5(model: torch.nn.Module, preprocess: Preprocess) -> dict[int, str]:
    """The paper's layers 1-5 of the last snapshot, by the one layer rule (ours: Fig. 3; any other
    model: its stages)."""
    from .subject import Subject, model_layers

    subject = Subject(model, preprocess, [], type(model).__name__, [], {})
    return {n: name for n, name in model_layers(model, subject.calls)[1].items() if n <= 5}


def cka_evolution(snapshots: list[tuple[int, torch.nn.Module]], preprocess: Preprocess, source: Source, indices,
                  threshold: float = CKA_THRESHOLD, resamples: int = CKA_RESAMPLES) -> CkaEvolution:
    """Fig. 4 on whole layers: the linear CKA of each layer (1-5) at every snapshot with the same layer
    in the last snapshot, on the probe images ``source[indices]`` (center crop, eval mode).

    A conv layer's output is flattened whole (every map at every position, as Kornblith et al. treat
    a layer's activations): no pooling to choose, and in Gram form the size of the output costs only
    the one product per snapshot.
    """
    epochs = [e for e, _ in snapshots]
    names = _layers_1_to_5(snapshots[-1][1], preprocess)
    x = preprocess.eval(source.get(torch.as_tensor(list(indices), dtype=torch.long)))
    grams: dict[int, list[np.ndarray]] = {n: [] for n in names}
    for _, model in progress(snapshots, desc="CKA", unit="ckpt"):
        outputs = features(model, x, list(names.values()), batch_size=250)
        for n, name in names.items():
            grams[n].append(centred_gram(outputs[name]))
    return cka_from_grams(epochs, grams, threshold, resamples)


def projection_evolution(snapshots: list[tuple[int, torch.nn.Module]], preprocess: Preprocess, source: Source,
                         indices, maps: int = 5, seed: int = 0) -> Evolution:
    """Fig. 4 from ``[(epoch, model)]`` snapshots of one run, over the images ``source[indices]``.

    For each layer 1-5, ``maps`` maps are chosen at random among those alive in the last snapshot;
    at every snapshot their strongest activation is found and projected (Sec. 2.1).
    """
    epochs = [e for e, _ in snapshots]
    names = _layers_1_to_5(snapshots[-1][1], preprocess)
    per_snapshot = []  # [(tables, {layer: Gallery})]
    chosen: dict[int, list[int]] = {}
    for _, model in progress(snapshots[::-1], desc="snapshots", unit="ckpt"):  # the last first: it picks the maps
        tables = topk_pass(model, source, preprocess, list(names.values()), k=1, indices=indices)
        if not chosen:
            chosen = {n: choose_maps(tables[name], maps, seed) for n, name in names.items()}
        shown = {n: gallery(model, source, preprocess, name, tables[name], chosen[n]) for n, name in names.items()}
        per_snapshot.append((tables, shown))
    per_snapshot.reverse()
    layers = {}
    for n, name in names.items():
        images = np.stack([t[name].images[chosen[n], 0].numpy() for t, _ in per_snapshot], 1)  # (M, S)
        values = np.stack([t[name].values[chosen[n], 0].numpy() for t, _ in per_snapshot], 1)
        projections = torch.stack([g[n].projections[:, 0] for _, g in per_snapshot], 1)  # (M, S, C, R, R)
        correlation = np.array([[_correlation(p[s], p[s + 1]) for s in range(len(epochs) - 1)] for p in projections])
        stable = [stable_from(epochs, images[m], correlation[m]) for m in range(len(chosen[n]))]
        correlation = correlation.reshape(len(chosen[n]), len(epochs) - 1)  # (M, S-1), also when M = 0
        layers[n] = LayerEvolution(name, chosen[n], images, values, projections, correlation, stable)
    return Evolution(epochs, layers)


def load_snapshots(run: str | Path) -> tuple[list[tuple[int, torch.nn.Module]], CheckpointInfo]:
    """``([(epoch, model)], info of the last one)`` for a training run directory: its snapshots, and
    ``final.pt`` too when its epoch is later than the last snapshot's."""
    loaded = [(epoch, load_checkpoint(path)) for epoch, path in snapshot_paths(run)]
    final = Path(run) / "final.pt"
    if final.is_file():
        model, info = load_checkpoint(final)
        if info.epoch is not None and info.epoch > loaded[-1][0]:
            loaded.append((info.epoch, (model, info)))
    return [(epoch, model) for epoch, (model, _) in loaded], loaded[-1][1][1]



def evolution(snapshots, data=None, limit: int = 2000, maps: int = 5, probe: int = CKA_PROBE,
              probe_data=None, seed: int = 0, device: str = "auto") -> Evolution:
    """Fig. 4: the strongest activations of ``maps`` random maps of layers 1-5 projected at each
    snapshot (:func:`projection_evolution`, over the first ``limit`` images of ``data``), and each
    layer's linear CKA with the last snapshot on ``probe`` images of ``probe_data``
    (:func:`cka_evolution`).

    Args:
        snapshots: a ``deconvnet train`` run directory (its ``checkpoints/epoch-K.pt`` and
            ``final.pt``); or ``[(epoch, model)]`` of one architecture, each model a
            :class:`~deconvnet.subject.Subject` or an ``nn.Module`` (wrapped by
            :func:`~deconvnet.subject.as_subject`, the last one's preprocessing used for all).
        data: a data spec or an open source; default the run's training data (needed for a list).
        probe_data: default the run's validation data, else ``data``.
        device: where a run directory's snapshots are loaded (``auto``: CUDA when available).
    """
    from .subject import as_subject

    if isinstance(snapshots, (str, Path)):
        from .runner import device_of

        models, info = load_snapshots(snapshots)
        models = [(epoch, model.to(device_of(device))) for epoch, model in models]
        preprocess = info.preprocess
        data = data or info.train_config.get("data") or "fashion-mnist"
        probe_data = probe_data or info.train_config.get("val") or data
    else:
        if len(snapshots) < 2:
            raise UserError(f"feature evolution needs at least 2 snapshots, got {len(snapshots)}")
        if data is None:
            raise UserError("give the data whose images the snapshots are compared on")
        subjects = [(int(epoch), as_subject(model)) for epoch, model in snapshots]
        models, preprocess = [(epoch, s.model) for epoch, s in subjects], subjects[-1][1].preprocess
        probe_data = probe_data or data

    def opened(spec):
        return spec if isinstance(spec, Source) else open_source(spec, preprocess.stored_size, preprocess.channels)

    source, probe_source = opened(data), opened(probe_data)
    result = projection_evolution(models, preprocess, source, range(min(limit, len(source))), maps=maps, seed=seed)
    result.cka = cka_evolution(models, preprocess, probe_source, range(min(probe, len(probe_source))))
    result.data, result.probe_data = (spec if isinstance(spec, str) else spec.name for spec in (data, probe_data))
    return result

CLAIM = "lower layers converge within a few epochs, upper layers only later"
PAPER = "layers 1-2 settle within a few epochs; layers 4-5 only after 40-50 of 70"
# Written with the set-up: what a "not held" would say.
IF_NOT_HELD = ("A property of the set-up more than of the scale: the small recipe's one-cycle schedule keeps the "
               "learning rate high until its last epochs, so every layer can keep moving until it anneals, where "
               "the paper's 70 epochs at a stepwise-lowered rate leave the lower layers time to settle first; "
               "and the run's own last snapshot stands in for 'converged'.")


def _epochs(estimate: float, interval: tuple[float, float] | None) -> str:
    """``+3.0 epochs [+1.0, +5.0]``, or why there is no interval."""
    if interval is None:
        return f"{estimate:+.1f} epochs (no interval: no spread measured)"
    return f"{estimate:+.1f} epochs [{interval[0]:+.1f}, {interval[1]:+.1f}]"


def _span(values: dict[int, float]) -> str:
    return ", ".join(f"layer {n} {v:.1f}" for n, v in values.items())


def evolution_findings(result: Evolution) -> list[Finding]:
    """Fig. 4's claim measured twice: on the maps' strongest projections (the paper's criterion, an
    interval over maps) and on whole layers by CKA (an interval over probe images)."""
    out = []
    low = [e for n in LOW if n in result.layers for e in result.layers[n].stable_epoch]
    high = [e for n in HIGH if n in result.layers for e in result.layers[n].stable_epoch]
    claim = f"{CLAIM} (strongest projections: the maps of layers 4-5 stable later than those of layers 1-2)"
    stable = {n: layer.mean_stable_epoch for n, layer in result.layers.items()}
    if low and high:
        estimate, interval = difference_interval(high, low, paired=False)
        out.append(Finding(
            claim, PAPER, {f"layer{n}": round(v, 2) for n, v in stable.items()}, verdict(interval),
            f"Mean epoch from which a map's strongest image and its projection stop changing, over snapshots at "
            f"epochs {', '.join(map(str, result.epochs))}: {_span(stable)}; layers 4-5 minus 1-2: "
            f"{_epochs(estimate, interval)} over {len(low) + len(high)} maps "
            "(the interval covers the choice of maps, not the training run's seed).",
            quantity="stable epoch of the maps of layers 4-5 minus of layers 1-2 (means over maps)",
            estimate=estimate, interval=interval, n=len(low) + len(high), unit="maps", if_not_held=IF_NOT_HELD))
    else:
        out.append(unmeasured(claim, PAPER, "The model has no maps in layers 1-2 or 4-5 to follow.",
                              {f"layer{n}": v for n, v in stable.items()}))
    cka = result.cka
    if cka is None:
        return out
    claim = (f"{CLAIM} (linear CKA with the last snapshot: layers 4-5 reach {cka.threshold:g} for good later than "
             "layers 1-2)")
    settled = {n: e for n, (e, _) in cka.settled.items()}
    ours = {f"layer{n}": {"settled": e, "interval": list(i)} for n, (e, i) in cka.settled.items()}
    if cka.difference is None:
        out.append(unmeasured(claim, PAPER, "The model lacks layers 1-2 or 4-5.", ours))
        return out
    estimate, interval = cka.difference
    out.append(Finding(
        claim, PAPER, ours, verdict(interval),
        f"Epoch from which each layer's linear CKA with the last snapshot stays >= {cka.threshold:g}, on "
        f"{cka.probe} probe images: {_span(settled)}; layers 4-5 minus 1-2: {_epochs(estimate, interval)} "
        f"over {cka.resamples} resamples of the probe images (the "
        "interval covers the choice of probe images, not the training run's seed).",
        quantity=f"epoch from which CKA with the last snapshot stays >= {cka.threshold:g}, mean of layers 4-5 "
                 "minus mean of layers 1-2",
        estimate=estimate, interval=interval, n=cka.probe, unit="probe images", if_not_held=IF_NOT_HELD))
    return out


def evolution_to_json(result: Evolution) -> dict:
    """Per layer and map: the strongest image, its value and the consecutive correlations per snapshot."""
    return {"analysis": "feature evolution (Fig. 4)", "epochs": result.epochs,
            "stable_definition": f"first snapshot after which the strongest image is unchanged and consecutive "
                                 f"projections correlate >= {STABLE_CORRELATION}",
            "layers": {f"layer{n}": {"module": layer.layer, "mean_stable_epoch": layer.mean_stable_epoch,
                                     "maps": [{"map": c, "images": layer.images[m].tolist(),
                                               "values": [round(float(v), 4) for v in layer.values[m]],
                                               "correlation": [round(float(v), 4) for v in layer.correlation[m]],
                                               "stable_epoch": layer.stable_epoch[m]}
                                              for m, c in enumerate(layer.maps)]}
                       for n, layer in result.layers.items()},
            **({"cka": _cka_json(result.cka)} if result.cka is not None else {}),
            "findings": to_findings_json(evolution_findings(result))}


def _rounded(v: float) -> float | None:
    return round(float(v), 4) if np.isfinite(v) else None  # NaN: a layer without spread (all zero)


def _cka_json(cka: CkaEvolution) -> dict:
    return {"definition": f"linear CKA of each layer's flattened output on {cka.probe} probe images with the same "
                          f"layer in the last snapshot; settled: first snapshot from which it stays >= {cka.threshold:g}; "
                          f"95% intervals from {cka.resamples} bootstrap resamples of the probe images",
            "probe": cka.probe, "threshold": cka.threshold, "resamples": cka.resamples,
            "layers": {f"layer{n}": {"cka": [_rounded(v) for v in cka.cka[n]],
                                     "band": [[_rounded(a), _rounded(b)] for a, b in cka.band[n]],
                                     "settled": cka.settled[n][0], "settled_interval": list(cka.settled[n][1])}
                       for n in cka.cka}}


def draw_evolution_layer(result: Evolution, n: int, path=None) -> Figure:
    """Fig. 4 for layer ``n``: one row per map, one column per snapshot epoch (each tile stretched)."""
    layer = result.layers[n]
    rows, cols = len(layer.maps), len(result.epochs)
    fig, axes = new_figure(rows, cols, figsize=(1.2 * cols + 0.8, 1.2 * rows + 0.8), squeeze=False)
    for m, c in enumerate(layer.maps):
        for s, epoch in enumerate(result.epochs):
            ax = axes[m, s]
            ax.imshow(to_rgb(mosaic(layer.projections[m, s][None], stretch=True)), cmap="gray", vmin=0, vmax=1,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if m == 0:
                ax.set_title(f"epoch {epoch}", fontsize=8)
            if s == 0:
                ax.set_ylabel(f"map {c}", fontsize=8)
    fig.suptitle(f"Layer {n} ({layer.layer}): strongest activation projected per snapshot; "
                 f"stable from epoch {layer.mean_stable_epoch:.1f} (mean)", fontsize=9)
    return finish(fig, path)


def draw_evolution(result: Evolution, path=None) -> Figure:
    """The measured claim: mean stable epoch per layer (each map a dot)."""
    fig, ax = new_figure(figsize=(5, 3.6))
    for n, layer in result.layers.items():
        ax.scatter([n] * len(layer.stable_epoch), layer.stable_epoch, color="grey", s=12)
    ns = list(result.layers)
    ax.plot(ns, [result.layers[n].mean_stable_epoch for n in ns], marker="o", label="mean over maps")
    ax.set_xlabel("layer")
    ax.set_ylabel("stable from epoch")
    ax.set_xticks(ns)
    ax.set_title("When the strongest activation stops changing (Fig. 4)", fontsize=9)
    ax.legend(fontsize=8)
    return finish(fig, path)


def draw_evolution_cka(result: Evolution, path=None) -> Figure:
    """Linear CKA of each layer with the last snapshot against epoch, with 95% bands over probe resamples,
    the threshold and each layer's settling epoch."""
    cka = result.cka
    fig, ax = new_figure(figsize=(6, 4))
    for n, values in cka.cka.items():
        line = ax.plot(result.epochs, values, marker="o", ms=3,
                       label=f"layer {n} (settled at {cka.settled[n][0]:g})")[0]
        ax.fill_between(result.epochs, cka.band[n][:, 0], cka.band[n][:, 1], color=line.get_color(), alpha=0.2)
    ax.axhline(cka.threshold, color="grey", ls="--", lw=1)
    ax.set_xlabel("epoch")
    ax.set_ylabel("linear CKA with the last snapshot")
    ax.set_title(f"Feature evolution by CKA on {cka.probe} probe images (Fig. 4)", fontsize=9)
    ax.legend(fontsize=8)
    return finish(fig, path)


callable_module(__name__, evolution)
