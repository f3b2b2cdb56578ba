"""torchvision's own model classes for the tests, importable on these machines.

The tests install ``torchvision==0.28.0`` with ``--no-deps`` (a CUDA build: its compiled ops cannot
load beside the CPU torch here). Its import then fails in ``torchvision._meta_registrations``, which
registers meta kernels for those compiled ops; the model classes are pure Python and never need them.
So before importing torchvision we register an empty module under that name. Users with a normal
torchvision install need nothing of this.
"""
import sys
import types

import pytest
import torch
from torch import nn


def import_torchvision():
    """``torchvision``, or skip the test when it is not installed."""
    try:
        import torchvision  # noqa: F401
    except ModuleNotFoundError:
        pytest.skip("torchvision is not installed (make setup installs it)")
    except Exception:  # noqa: BLE001 - the CUDA build's compiled ops cannot load here; see above
        sys.modules.pop("torchvision", None)
        for name in [n for n in sys.modules if n.startswith("torchvision.")]:
            sys.modules.pop(name)
        sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
        import torchvision  # noqa: F401
    return sys.modules["torchvision"]


def torchvision_model(name: str, num_classes: int = 7) -> nn.Module:
    """torchvision's ``name`` with seeded random weights, in eval mode (GoogLeNet/Inception without
    their auxiliary heads)."""
    tv = import_torchvision()
    kwargs = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
    torch.manual_seed(0)
    return getattr(tv.models, name)(num_classes=num_classes, **kwargs).eval()


def no_hooks(model: nn.Module) -> bool:
    """Whether every module is free of hooks (the tools remove theirs, also after errors)."""
    return all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
               and not m._backward_pre_hooks for m in model.modules())
