"""Ablation (Table 3): variant configs remove exactly the right layers; runs are reused and resumed."""
import json

import pytest
import torch

from deconvnet.ablation import LABELS, ablate, draw_ablation, ablation_to_json, variant_changes
from deconvnet.errors import UserError
from deconvnet.models import build_model, model_config
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
    result = ablate(base, tmp_path, ["baseline", "no-6-7"])
    assert list(result.rows) == ["baseline", "no-6-7"]
    for row in result.rows.values():
        assert 0 <= row["train_top1"] <= 100 and 0 <= row["test_top1"] <= 100 and 0 <= row["test_top5"] <= 100
    assert result.rows["no-6-7"]["params"] < result.rows["baseline"]["params"]
    config = json.loads((tmp_path / "no-6-7" / "config.json").read_text())
    assert config["model_changes"] == {"fc": [0, 0]}

    final = tmp_path / "baseline" / "final.pt"
    stamp = final.stat().st_mtime_ns
    (tmp_path / "no-6-7" / "final.pt").unlink()  # "interrupted" after its last epoch: resumed from last.pt
    again = ablate(base, tmp_path, ["baseline", "no-6-7"])
    assert final.stat().st_mtime_ns == stamp  # finished: not retrained
    errors = tmp_path / "no-6-7" / "errors.json"
    assert errors.stat().st_mtime_ns >= (tmp_path / "no-6-7" / "final.pt").stat().st_mtime_ns  # re-measured
    assert again.rows["no-6-7"]["test_top1"] == pytest.approx(result.rows["no-6-7"]["test_top1"])

    body = ablation_to_json(again)
    assert set(body["rows"]) == {"baseline", "no-6-7"} and isinstance(body["findings"], list)
    draw_ablation(again, tmp_path / "ablation.png")
    assert (tmp_path / "ablation.png").stat().st_size > 0

    with pytest.raises(UserError, match="other settings"):
        ablate(TrainConfig(model="zfnet-small", data="digits", limit=200, epochs=2, batch_size=50), tmp_path,
               ["baseline"])
    with pytest.raises(UserError, match="unknown variant"):
        ablate(base, tmp_path, ["no-5"])


def test_findings_on_a_hand_made_table():
    from deconvnet.ablation import AblationResult, ablation_findings

    rows = {"baseline": 20, "no-3-4": 22, "no-6-7": 21, "no-3-4-6-7": 35, "fc-half": 21, "fc-double": 19.5,
            "conv-wider": 19, "conv-wider+fc-double": 19.5}
    train = {"conv-wider": 15, "conv-wider+fc-double": 10}
    result = AblationResult("zfnet-small", "digits", 1, None,
                            {k: {"train_top1": train.get(k, 10), "test_top1": v, "test_top5": 1, "params": 1}
                             for k, v in rows.items()})
    held = [f.held for f in ablation_findings(result)]
    assert held == [True, True, True, True]
    result.rows["no-3-4-6-7"]["test_top1"] = 23  # +3 is not twice the worse pair's +2
    assert ablation_findings(result)[0].held is False
