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
