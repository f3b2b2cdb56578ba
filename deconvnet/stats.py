"""How sure a finding is: 95% intervals over what varies, and the verdict they decide.

Every claim of the paper is checked as one *compared quantity* (e.g. mean p(correct) with the square on
the background minus on the object, over images) with a 95% interval over what varies in the
experiment (images, pairs, feature maps, units, seeds). The interval, never the point estimate, decides:

- ``held``: the whole interval lies on the claim's side of its threshold (0 unless the paper states a
  margin);
- ``not held``: the whole interval lies on the other side;
- ``inconclusive``: the interval contains the threshold: the data cannot tell at this sample size.

Intervals are percentile bootstraps (Efron & Tibshirani 1993, ch. 13) with a fixed seed, so a rerun on
the same numbers gives the same interval; where only a few seeds vary (training-based claims), a
t interval from the measured seed-to-seed spread (:func:`seed_interval`).
"""
from __future__ import annotations

import math
from typing import Callable, Iterator, Sequence

import numpy as np

LEVEL = 0.95  # every interval of the report
RESAMPLES = 2000  # bootstrap resamples: the interval's ends move by well under 1% of its width between seeds
SEED = 0

HELD, NOT_HELD, INCONCLUSIVE = "held", "not held", "inconclusive"
VERDICTS = (HELD, NOT_HELD, INCONCLUSIVE)


def percentile_interval(draws: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The central ``level`` interval of bootstrap ``draws`` (percentile bootstrap)."""
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(draws, [tail, 100 - tail])
    return float(low), float(high)


def resamples_of(n: int, resamples: int = RESAMPLES, seed: int = SEED) -> Iterator[np.ndarray]:
    """The resamples :func:`bootstrap` draws for ``n`` paired values, one (n,) array of indices each."""
    rng = np.random.default_rng(seed)
    for _ in range(resamples):
        yield rng.integers(0, n, n)


def bootstrap(statistic: Callable[..., float], *samples: Sequence, level: float = LEVEL,
              resamples: int = RESAMPLES, seed: int = SEED, paired: bool = True) -> tuple[float, tuple[float, float]]:
    """``(statistic(*samples), (low, high))``: the statistic and its percentile-bootstrap interval.

    ``samples``: arrays whose first axis is what varies (images, pairs, maps, ...). ``paired``: the
    samples share that axis (the same images under two conditions) and are resampled together;
    otherwise each is resampled on its own (two independent groups, e.g. the maps of two layers).
    """
    arrays = [np.asarray(s, dtype=float) for s in samples]
    if any(len(a) == 0 for a in arrays):
        raise ValueError("bootstrap needs at least one value in every sample")
    if paired and len({len(a) for a in arrays}) != 1:
        raise ValueError("paired samples must have the same length")
    estimate = float(statistic(*arrays))
    draws = np.empty(resamples)
    if paired:
        for r, pick in enumerate(resamples_of(len(arrays[0]), resamples, seed)):
            draws[r] = statistic(*(a[pick] for a in arrays))
    else:
        rng = np.random.default_rng(seed)
        for r in range(resamples):
            draws[r] = statistic(*(a[rng.integers(0, len(a), len(a))] for a in arrays))
    return estimate, percentile_interval(draws, level)


SMALL = 20  # below this many values, a mean's interval is Student's t (the percentile bootstrap is too narrow)


def mean_interval(values: Sequence[float], level: float = LEVEL) -> tuple[float, tuple[float, float] | None]:
    """The mean of ``values`` and its 95% interval: the percentile bootstrap from :data:`SMALL` values
    on, Student's t below (5 folds, 3 seeds); None for a single value, or for fewer than :data:`SMALL`
    values that are all equal (no spread measured: a zero-width interval would claim certainty)."""
    v = np.asarray(values, dtype=float)
    if len(v) == 0:
        raise ValueError("mean_interval needs at least one value")
    if len(v) == 1:
        return float(v[0]), None
    if len(v) < SMALL:
        if float(v.std(ddof=1)) == 0.0:
            return float(v.mean()), None
        half = t_quantile(len(v) - 1, level) * float(v.std(ddof=1)) / math.sqrt(len(v))
        return float(v.mean()), (float(v.mean()) - half, float(v.mean()) + half)
    return bootstrap(np.mean, v, level=level)


def difference_interval(a: Sequence[float], b: Sequence[float], paired: bool = True,
                        level: float = LEVEL) -> tuple[float, tuple[float, float] | None]:
    """mean(a) - mean(b) and its 95% interval: over pairs when ``paired`` (a[i], b[i] measured on the
    same image, fold or map; :func:`mean_interval` of the differences), else over two independent
    groups (the maps of two layers): a bootstrap of each group from :data:`SMALL` values on, Welch's t
    interval below (no interval with a group of one value, or no spread in either)."""
    if paired:
        return mean_interval(np.asarray(a, dtype=float) - np.asarray(b, dtype=float), level)
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if min(len(x), len(y)) >= SMALL:
        return bootstrap(lambda u, v: np.mean(u) - np.mean(v), x, y, paired=False, level=level)
    estimate = float(x.mean() - y.mean())
    if min(len(x), len(y)) < 2:
        return estimate, None
    vx, vy = float(x.var(ddof=1)) / len(x), float(y.var(ddof=1)) / len(y)
    if vx + vy == 0.0:
        return estimate, None
    df = (vx + vy) ** 2 / (vx ** 2 / (len(x) - 1) + vy ** 2 / (len(y) - 1))  # Welch-Satterthwaite
    half = t_quantile(df, level) * math.sqrt(vx + vy)
    return estimate, (estimate - half, estimate + half)


def unit_interval(statistic: Callable[[np.ndarray], float], n: int,
                  level: float = LEVEL) -> tuple[float, tuple[float, float] | None]:
    """A statistic of ``n`` units (images) whose terms share units (pairs of images), with its interval
    over the units: ``statistic(indices)`` is computed on the units picked. From :data:`SMALL` units on,
    the percentile bootstrap of the units; below, the jackknife (leave one unit out) standard error with
    Student's t on n - 1 degrees of freedom, since a bootstrap of a few units is too narrow."""
    units = np.arange(n)
    if n < 3:  # leaving one of two units out leaves no pair: no spread to measure
        return float(statistic(units)), None
    if n >= SMALL:
        return bootstrap(lambda picked: statistic(picked.astype(int)), units, level=level)
    estimate = float(statistic(units))
    leave_one_out = np.array([statistic(np.delete(units, i)) for i in range(n)], dtype=float)
    if not np.isfinite(leave_one_out).all() or float(leave_one_out.std()) == 0.0:
        return estimate, None
    se = math.sqrt((n - 1) / n * float(((leave_one_out - leave_one_out.mean()) ** 2).sum()))
    half = t_quantile(n - 1, level) * se
    return estimate, (estimate - half, estimate + half)


def t_quantile(df: float, level: float = LEVEL) -> float:
    """The two-sided Student t quantile for ``df`` degrees of freedom."""
    from scipy.stats import t  # scipy comes with scikit-learn

    return float(t.ppf(0.5 + level / 2, df))


def seed_interval(variant: Sequence[float], baseline: Sequence[float],
                  level: float = LEVEL) -> tuple[float, tuple[float, float] | None]:
    """mean(variant) - mean(baseline) for training runs that differ by seed, with a t interval from the
    pooled seed-to-seed spread (:func:`contrast_interval` with terms ``[(1, variant), (-1, baseline)]``):
    ``d +- t(df) * s * sqrt(1/n_v + 1/n_b)``. With one run per arm there is no spread: no interval."""
    return contrast_interval([(1, variant), (-1, baseline)], level=level)


def contrast_interval(terms: Sequence[tuple[float, Sequence[float]]], extra_variance: float = 0.0,
                      level: float = LEVEL) -> tuple[float, tuple[float, float] | None]:
    """``sum_i c_i mean(runs_i)`` over training runs that differ by seed, with a t interval.

    ``terms``: ``(c_i, runs_i)``; a term with ``c_i = 0`` only lends its runs' spread. The seed-to-seed
    variance ``s^2`` is pooled over every term with several runs and taken to be the same for every run:
    ``+- t(df) * sqrt(s^2 * sum_i c_i^2 / n_i + extra_variance)`` (``extra_variance``: another independent
    source, e.g. the binomial spread of accuracies over test images). :func:`seed_interval`
    is the case ``[(1, variant), (-1, baseline)]``. No interval without a spread (every term one run).
    """
    arrays = [(float(c), np.asarray(runs, dtype=float)) for c, runs in terms if len(runs)]
    estimate = float(sum(c * runs.mean() for c, runs in arrays if c != 0))
    df = sum(len(runs) - 1 for _, runs in arrays)
    if df < 1:
        return estimate, None
    pooled = sum(((runs - runs.mean()) ** 2).sum() for _, runs in arrays) / df
    half = t_quantile(df, level) * math.sqrt(pooled * sum(c * c / len(runs) for c, runs in arrays) + extra_variance)
    return estimate, (estimate - half, estimate + half)


def verdict(interval: tuple[float, float] | None, above: float = 0.0) -> str:
    """The claim "the quantity exceeds ``above``" decided by its interval (see the module's doc)."""
    if interval is None or any(not math.isfinite(v) for v in interval):
        return INCONCLUSIVE
    low, high = interval
    if low > above:
        return HELD
    if high < above:
        return NOT_HELD
    return INCONCLUSIVE


def verdict_within(interval: tuple[float, float] | None, margin: float) -> str:
    """The claim "the quantity stays within +-``margin``" decided by its interval: held when the whole
    interval lies inside, not held when it lies wholly outside, else inconclusive."""
    if interval is None or any(not math.isfinite(v) for v in interval):
        return INCONCLUSIVE
    low, high = interval
    if -margin < low and high < margin:
        return HELD
    if low >= margin or high <= -margin:
        return NOT_HELD
    return INCONCLUSIVE


def all_of(verdicts: Sequence[str]) -> str:
    """A claim made of several parts, each with its own verdict: held when every part holds, not held
    when any part does not, else inconclusive."""
    if not verdicts:
        return INCONCLUSIVE
    if NOT_HELD in verdicts:
        return NOT_HELD
    return HELD if all(v == HELD for v in verdicts) else INCONCLUSIVE
