"""Intervals and verdicts (deconvnet.stats) against closed forms, and the findings that carry them."""
import json
import math

import numpy as np
import pytest
from scipy.stats import t as student

from deconvnet import stats
from deconvnet.findings import Finding, brief, interval_text, unmeasured
from deconvnet.report import findings_html, summary_html
from deconvnet.sections import BY_STEP


def test_bootstrap_interval_of_a_mean_matches_the_normal_closed_form():
    rng = np.random.default_rng(3)
    x = rng.normal(5.0, 2.0, 400)
    estimate, (low, high) = stats.mean_interval(x)
    half = 1.959964 * x.std(ddof=1) / math.sqrt(len(x))
    assert estimate == pytest.approx(x.mean())
    # the percentile bootstrap of a mean of normal samples is the z interval up to resampling noise
    assert low == pytest.approx(x.mean() - half, abs=0.08 * half)
    assert high == pytest.approx(x.mean() + half, abs=0.08 * half)
    assert stats.mean_interval(x) == (estimate, (low, high))  # a fixed seed: the same interval again


def test_few_values_get_students_t_interval():
    x = np.array([1.0, 2.0, 4.0, 3.5, 2.5])
    estimate, (low, high) = stats.mean_interval(x)
    half = student.ppf(0.975, 4) * x.std(ddof=1) / math.sqrt(5)
    assert (low, high) == pytest.approx((x.mean() - half, x.mean() + half))
    assert stats.mean_interval([3.0]) == (3.0, None)  # one value: no spread to measure


def test_difference_of_independent_groups_matches_welch_closed_form():
    rng = np.random.default_rng(4)
    a, b = rng.normal(1.0, 1.0, 300), rng.normal(0.0, 3.0, 500)
    d, (low, high) = stats.difference_interval(a, b, paired=False)
    half = 1.959964 * math.sqrt(a.var(ddof=1) / 300 + b.var(ddof=1) / 500)
    assert d == pytest.approx(a.mean() - b.mean())
    assert (high - low) / 2 == pytest.approx(half, rel=0.1)
    paired, _ = stats.difference_interval(a[:20], b[:20])
    assert paired == pytest.approx((a[:20] - b[:20]).mean())


def test_seed_interval_pools_the_measured_spread():
    baseline, variant = [30.0, 31.0, 32.0], [29.0]
    d, (low, high) = stats.seed_interval(variant, baseline)
    s = 1.0  # the baseline's seed spread; the variant's one run adds no degree of freedom
    half = student.ppf(0.975, 2) * s * math.sqrt(1 + 1 / 3)
    assert d == pytest.approx(-2.0) and (low, high) == pytest.approx((-2.0 - half, -2.0 + half))
    assert stats.seed_interval([1.0], [2.0]) == (-1.0, None)


def test_the_interval_decides_the_verdict():
    assert stats.verdict((0.01, 0.2)) == stats.HELD
    assert stats.verdict((-0.2, -0.01)) == stats.NOT_HELD
    assert stats.verdict((-0.01, 0.2)) == stats.INCONCLUSIVE
    assert stats.verdict(None) == stats.INCONCLUSIVE
    assert stats.verdict((0.5, 0.9), above=0.6) == stats.INCONCLUSIVE  # a margin the paper states
    # a verdict flips as more data narrow the interval around the same positive mean
    rng = np.random.default_rng(5)
    few = rng.normal(0.1, 1.0, 10)
    many = rng.normal(0.1, 1.0, 4000)
    assert stats.verdict(stats.mean_interval(few)[1]) == stats.INCONCLUSIVE
    assert stats.verdict(stats.mean_interval(many)[1]) == stats.HELD
    assert stats.verdict_within((-0.5, 0.5), 1.0) == stats.HELD
    assert stats.verdict_within((1.2, 3.0), 1.0) == stats.NOT_HELD
    assert stats.verdict_within((0.5, 3.0), 1.0) == stats.INCONCLUSIVE
    assert stats.all_of([stats.HELD, stats.HELD]) == stats.HELD
    assert stats.all_of([stats.HELD, stats.INCONCLUSIVE]) == stats.INCONCLUSIVE
    assert stats.all_of([stats.INCONCLUSIVE, stats.NOT_HELD]) == stats.NOT_HELD


def test_finding_carries_n_interval_and_verdict():
    f = Finding("a > b", "paper", {"a": 1}, stats.HELD, "reads", quantity="a - b", estimate=0.3,
                interval=(0.1, 0.5), n=200, unit="images")
    record = f.to_json()
    assert record["verdict"] == "held" and record["interval"] == [0.1, 0.5] and record["n"] == 200
    assert f.held is True and json.loads(json.dumps(record)) == record
    assert interval_text(record) == "0.3 [0.1, 0.5], n = 200 images"
    assert brief([record])[0] == {"claim": "a > b", "verdict": "held", "quantity": "a - b", "estimate": 0.3,
                                  "interval": [0.1, 0.5], "n": 200, "unit": "images"}
    missing = unmeasured("a > b", "paper", "no image had both kinds of square")
    assert missing.verdict == stats.INCONCLUSIVE and missing.n == 0 and missing.held is None
    with pytest.raises(ValueError):
        Finding("a > b", "paper", None, True)  # the old boolean verdict is refused


def test_report_renders_intervals_and_leads_with_the_summary(tmp_path):
    held = Finding("c1", "p1", 1, stats.HELD, "r1", quantity="q1", estimate=0.3, interval=(0.1, 0.5), n=200,
                   unit="images").to_json()
    not_held = Finding("c2", "p2", 2, stats.NOT_HELD, "r2", quantity="q2", estimate=-0.3, interval=(-0.5, -0.1),
                       n=30, unit="images", if_not_held="At 28 px the object fills the image.").to_json()
    section = BY_STEP["fig7"]
    (tmp_path / section.step).mkdir()
    (tmp_path / section.step / section.result).write_text(json.dumps({"findings": [held, not_held]}))
    page = summary_html(tmp_path, [section, BY_STEP["fig5"]])  # fig5 has not run: left out
    assert "2 claims, 1 held, 1 not held, 0 inconclusive" in page
    assert "at 95% on its own, not jointly: of 2 claims tested at once" in page  # the family is said
    assert 'href="#fig7"' in page and "q1: 0.3 [0.1, 0.5]" in page and "<td>200 images</td>" in page
    cells = findings_html([held, not_held])
    assert "<td class=held>held</td>" in cells and "<td class=not>not held</td>" in cells
    assert "At 28 px the object fills the image." in cells  # the sentence shown only for "not held"
    assert "At 28 px" not in findings_html([held])


def test_unit_interval_jackknife_of_a_mean_is_students_t():
    """For a plain mean of a few units the jackknife standard error is s / sqrt(n) exactly."""
    x = np.array([0.3, 1.1, -0.4, 0.9, 0.2, 0.7])
    estimate, (low, high) = stats.unit_interval(lambda idx: x[idx].mean(), len(x))
    mean, interval = stats.mean_interval(x)
    assert estimate == pytest.approx(mean) and (low, high) == pytest.approx(interval)
    many = np.random.default_rng(6).normal(0, 1, 200)  # from 20 units on, the bootstrap of the units
    assert stats.unit_interval(lambda idx: many[idx].mean(), 200)[1] == pytest.approx(stats.mean_interval(many)[1])


def test_small_independent_groups_get_welchs_t_interval():
    from scipy.stats import ttest_ind

    a, b = np.array([0.31, 0.12, 0.25]), np.array([0.05, 0.14, 0.02, 0.11])
    d, (low, high) = stats.difference_interval(a, b, paired=False)
    expected = ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert d == pytest.approx(a.mean() - b.mean())
    assert (low, high) == pytest.approx((expected.low, expected.high))
    assert stats.difference_interval([0.3], [0.1, 0.2], paired=False)[1] is None  # a group of one: no spread
    assert stats.difference_interval([0.3, 0.3], [0.1, 0.1], paired=False)[1] is None  # no spread in either


def test_no_zero_width_interval_from_a_few_equal_values_or_two_units():
    assert stats.mean_interval([1.0, 1.0, 1.0]) == (1.0, None)  # a t interval of width 0 would claim certainty
    assert stats.difference_interval([1.0, 2.0], [0.0, 1.0]) == (1.0, None)  # paired: every difference 1
    pairs = np.array([[0.0, 0.05], [0.05, 0.0]])  # two images, one pair: leaving one out leaves no pair
    estimate, interval = stats.unit_interval(lambda idx: pairs[np.ix_(idx, idx)].sum() / max(len(idx) * (len(idx) - 1), 1),
                                             2)
    assert estimate == pytest.approx(0.05) and interval is None
    assert stats.verdict(interval) == stats.INCONCLUSIVE
