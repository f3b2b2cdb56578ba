"""Fixtures shared by the test modules."""
import pytest

from deconvnet.train import TrainConfig, train


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A zfnet-small checkpoint after one epoch on the first 256 Fashion-MNIST images (seconds)."""
    out = tmp_path_factory.mktemp("tiny-run")
    train(TrainConfig(model="zfnet-small", data="fashion-mnist", limit=256, batch_size=32, epochs=1), out)
    return out / "final.pt"
