"""Ablation (Table 3): variant configs remove exactly the right layers; runs are reused and resumed; the
findings are contrasts judged against the baseline's seed noise."""
import json

import pytest
import torch

from deconvnet.ablation import (LABELS, Ablation, ablation, ablation_findings, ablation_to_json,
                                draw_ablation, variant_changes)
from deconvnet.errors import UserError
from deconvnet.models import build_model, model_config
from deconvnet.stats import HELD, INCONCLUSIVE, NOT_HELD, contrast_interval, seed_interval, t_quantile
from deconvnet.train import TrainConfig

ALL = {"conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"}


def _layers(model) -> set[str]:
    return {name for name, m in model.named_children() if name.startswith(("conv", "fc"))}


@pytest.mark.parametrize("variant, removed", [
    ("baseline", set()),
    ("no-3-4", {"conv3", "conv4"}),
    ("no-7", {"fc7"}),
    ("no-6-7", {"fc6", "fc7"}),
    ("no-3-4-6-7", {"conv3", "conv4", "fc6", "fc7"}),
    ("fc-half", set()), ("fc-double", set()), ("conv-wider", set()), ("conv-wider+fc-double", set()),
])
def test_variants_remove_exactly_the_right_layers(variant, removed):
    changes = variant_changes(model_config("zfnet-small"))[variant]
    json.dumps(changes)  # goes into config.json as is
    model = build_model("zfnet-small", num_classes=10, **changes)
    assert _layers(model) == ALL - removed
    names = {n for n, _ in model.named_children()}
    for layer in removed:  # the ReLU/dropout that belong to a removed layer go with it
        assert f"relu{layer[-1]}" not in names
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_variants_resize_the_right_layers():
    base = model_config("zfnet-small")
    changes = variant_changes(base)
    w6, w7 = base.fc
    widths = {v: (m.fc6.out_features, m.fc7.out_features)
              for v in ("baseline", "fc-half", "fc-double")
              for m in [build_model("zfnet-small", 10, **changes[v])]}
    assert widths == {"baseline": (w6, w7), "fc-half": (w6 // 2, w7 // 2), "fc-double": (2 * w6, 2 * w7)}
    wide = build_model("zfnet-small", 10, **changes["conv-wider"])
    c3, c4, c5 = (base.convs[k].out for k in ("conv3", "conv4", "conv5"))
    # Table 3: 384, 384, 256 -> 512, 1024, 512
    assert [wide.conv3.out_channels, wide.conv4.out_channels, wide.conv5.out_channels] == \
        [round(c3 * 4 / 3), round(c4 * 8 / 3), 2 * c5]
    assert wide.conv1.out_channels == base.convs["conv1"].out and wide.fc6.out_features == w6
    both = build_model("zfnet-small", 10, **changes["conv-wider+fc-double"])
    assert both.conv4.out_channels == round(c4 * 8 / 3) and both.fc7.out_features == 2 * w7
    assert set(changes) == set(LABELS)


def test_ablate_trains_reuses_and_resumes(tmp_path):
    base = TrainConfig(model="zfnet-small", data="digits", limit=200, epochs=1, batch_size=50)
    result = ablation(base, tmp_path, ["baseline", "no-6-7"], baseline_seeds=[1])
    assert list(result.rows) == ["baseline", "no-6-7"] and list(result.seeds) == [0, 1]
    assert result.seeds[0] is result.rows["baseline"] and (tmp_path / "baseline-seed1" / "final.pt").exists()
    assert json.loads((tmp_path / "baseline-seed1" / "config.json").read_text())["seed"] == 1
    for row in result.rows.values():
        assert 0 <= row["train_top1"] <= 100 and 0 <= row["test_top1"] <= 100 and 0 <= row["test_top5"] <= 100
    assert result.rows["no-6-7"]["params"] < result.rows["baseline"]["params"]
    config = json.loads((tmp_path / "no-6-7" / "config.json").read_text())
    assert config["model_changes"] == {"fc": [0, 0]}

    final = tmp_path / "baseline" / "final.pt"
    stamp = final.stat().st_mtime_ns
    (tmp_path / "no-6-7" / "final.pt").unlink()  # "interrupted" after its last epoch: resumed from last.pt
    again = ablation(base, tmp_path, ["baseline", "no-6-7"], baseline_seeds=[1])
    assert final.stat().st_mtime_ns == stamp  # finished: not retrained
    errors = tmp_path / "no-6-7" / "errors.json"
    assert errors.stat().st_mtime_ns >= (tmp_path / "no-6-7" / "final.pt").stat().st_mtime_ns  # re-measured
    assert again.rows["no-6-7"]["test_top1"] == pytest.approx(result.rows["no-6-7"]["test_top1"])

    assert again.seeds[1]["test_top1"] == pytest.approx(result.seeds[1]["test_top1"])  # reused
    body = ablation_to_json(again)
    assert set(body["rows"]) == {"baseline", "no-6-7"} and isinstance(body["findings"], list)
    assert body["seed_noise"]["seeds"] == [0, 1] and len(body["seed_noise"]["test_top1"]) == 2
    assert body["rows"]["no-6-7"]["interval"] is not None  # two baseline seeds: a spread to judge against
    draw_ablation(again, tmp_path / "ablation.png")
    assert (tmp_path / "ablation.png").stat().st_size > 0

    with pytest.raises(UserError, match="other settings"):
        ablation(TrainConfig(model="zfnet-small", data="digits", limit=200, epochs=2, batch_size=50), tmp_path,
               ["baseline"])
    with pytest.raises(UserError, match="unknown variant"):
        ablation(base, tmp_path, ["no-5"])
    with pytest.raises(UserError, match="baseline-seeds"):
        ablation(base, tmp_path, ["baseline"], baseline_seeds=[0])


def test_contrast_interval_by_hand():
    d, (low, high) = contrast_interval([(1, [5.0]), (-1, [1.0, 2.0, 3.0])])  # s = 1 over 2 degrees of freedom
    half = t_quantile(2) * (1 + 1 / 3) ** 0.5
    assert d == 3.0 and (low, high) == pytest.approx((3 - half, 3 + half))
    d2, interval2 = seed_interval([5.0], [1.0, 2.0, 3.0])  # its two-arm case
    assert d2 == d and interval2 == pytest.approx((low, high))
    d, interval = contrast_interval([(1, [5.0]), (-1, [4.0]), (0, [1.0, 2.0, 3.0])], extra_variance=0.5)
    half = t_quantile(2) * (2 + 0.5) ** 0.5  # the c = 0 term lends only its spread
    assert d == 1.0 and interval == pytest.approx((1 - half, 1 + half))
    assert contrast_interval([(1, [5.0]), (-1, [4.0])]) == (1.0, None)  # one run each: no spread


def _table(test_seeds: list[float], **test) -> Ablation:
    """A hand-made Table 3 (test top-1 errors; train errors 10 but for the widened pair), with the baseline
    trained with three seeds."""
    errors = {"baseline": test_seeds[0], "no-3-4": 22, "no-6-7": 21, "no-3-4-6-7": 35, "fc-half": 20.3,
              "fc-double": 19.8, "conv-wider": 17, "conv-wider+fc-double": 19.5, **test}
    train = {"conv-wider": 15, "conv-wider+fc-double": 10}
    rows = {k: {"train_top1": train.get(k, 10), "test_top1": v, "test_top5": 1, "params": 1} for k, v in errors.items()}
    seeds = {0: rows["baseline"], **{s: {"train_top1": 10 + (v - test_seeds[0]), "test_top1": v, "test_top5": 1,
                                         "params": 1} for s, v in zip((1, 2), test_seeds[1:])}}
    return Ablation("zfnet-small", "digits", 1, None, rows, seeds)


def test_findings_are_judged_against_the_seed_noise():
    quiet = ablation_findings(_table([20.0, 20.1, 19.9]))
    assert [f.verdict for f in quiet] == [HELD, HELD, HELD, HELD]
    assert all(f.n == 3 and f.unit == "baseline seeds" and f.interval is not None and f.if_not_held for f in quiet)
    depth = quiet[0]
    assert depth.estimate == pytest.approx(35 - 22 - 21 + 20)  # beyond the two removals added
    assert quiet[2].estimate == pytest.approx(20 - 17)  # wider conv3-5: baseline minus variant
    noisy = ablation_findings(_table([17.0, 20.0, 23.0]))  # the same means, a spread of 3 points
    assert [f.verdict for f in noisy] == [INCONCLUSIVE] * 4
    assert noisy[0].estimate == pytest.approx(depth.estimate)
    assert ablation_findings(_table([20.0, 20.1, 19.9], **{"no-3-4-6-7": 21}))[0].verdict == NOT_HELD  # 21 - 22 - 21 + 20 < 0
    far = ablation_findings(_table([20.0, 20.1, 19.9], **{"fc-half": 25}))[1]  # 5 points: beyond the 0.94 margin
    assert far.verdict == NOT_HELD and far.estimate == pytest.approx(5)


def test_findings_without_seed_noise_are_inconclusive():
    result = _table([20.0])
    assert list(result.seeds) == [0]
    findings = ablation_findings(result)
    assert len(findings) == 4 and all(f.verdict == INCONCLUSIVE and f.interval is None for f in findings)
    assert "--baseline-seeds" in findings[0].reading
