"""Renderers return Figures and never touch matplotlib's global backend (a notebook user
who calls a figure function keeps the inline backend)."""
import subprocess
import sys


def test_figure_functions_leave_the_backend_alone(tmp_path):
    # a fresh interpreter, so that no other test has chosen the backend first
    code = f"""
import matplotlib
matplotlib.use("svg")
import torch
from deconvnet.invariance import Invariance, draw_invariance
from deconvnet.layer_features import LayerFeatures, draw_layer_features
r = Invariance(["a", "b"], torch.tensor([0, 1]), {{"scale": [1.0, 1.2]}},
               {{"scale": {{"a": torch.ones(2, 2), "b": torch.ones(2, 2)}}}}, {{"scale": torch.ones(2, 2)}},
               torch.ones(2), {{"a": torch.ones(2), "b": torch.ones(2)}})
fig = draw_invariance(r)
assert type(fig).__name__ == "Figure" and len(fig.axes) == 3, fig.axes
layers = LayerFeatures("t", {{1: "x", 2: "y"}}, [5], 2, {{1: 3, 2: 3}},
                     {{(k, 5, n): [0.5, 0.6] for k in ("svm", "softmax") for n in (1, 2)}})
draw_layer_features(layers, r"{tmp_path / 'layers.png'}")
from deconvnet.deconvnet import draw_projection
fig = draw_projection(torch.rand(3, 20, 20), torch.randn(3, 20, 20), (2, 3, 10, 12))
assert len(fig.axes) == 3
print(matplotlib.get_backend())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "svg"
    assert (tmp_path / "layers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_atomic_writes_take_the_umask_without_changing_it(tmp_path):
    import os

    from deconvnet.runner import atomic_write_text

    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "a" / "out.json", "{}")
        assert os.umask(0o027) == 0o027  # the process umask is left as it was
    finally:
        os.umask(old)
    assert (tmp_path / "a" / "out.json").stat().st_mode & 0o777 == 0o640
    assert os.listdir(tmp_path / "a") == ["out.json"]  # no temporary file left behind
