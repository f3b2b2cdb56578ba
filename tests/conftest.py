"""Fixtures shared by the test modules."""
import os

import pytest

from deconvnet.train import TrainConfig, train


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A zfnet-small checkpoint after one epoch on the first 256 Fashion-MNIST images (seconds)."""
    out = tmp_path_factory.mktemp("tiny-run")
    train(TrainConfig(model="zfnet-small", data="fashion-mnist", limit=256, batch_size=32, epochs=1), out)
    return out / "final.pt"


@pytest.fixture(scope="session", autouse=True)
def runner_cache(tmp_path_factory):
    """The runner's cache of this test session: empty at the start, never the user's ~/.cache."""
    path = tmp_path_factory.mktemp("deconvnet-cache")
    saved = os.environ.get("DECONVNET_CACHE")
    os.environ["DECONVNET_CACHE"] = str(path)
    yield path
    if saved is None:
        os.environ.pop("DECONVNET_CACHE", None)
    else:
        os.environ["DECONVNET_CACHE"] = saved
