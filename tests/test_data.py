"""Data sources: Fashion-MNIST (system files and the checked download), digits, folders, preprocessing."""
import functools
import http.server
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deconvnet.data import (FASHION_CLASSES, FASHION_FILES, FASHION_SYSTEM_DIR, SPLIT_A, SPLIT_B, DataError,
                            FolderSource, mean_image, open_source, preprocess_for, read_idx, subset_spec)

needs_fashion = pytest.mark.skipif(not (FASHION_SYSTEM_DIR / "t10k-labels-idx1-ubyte.gz").exists(),
                                   reason="Debian's dataset-fashion-mnist is not installed")


@needs_fashion
def test_fashion_mnist_splits():
    train, test = open_source("fashion-mnist"), open_source("fashion-mnist:test")
    assert len(train) == 60000 and len(test) == 10000
    assert train.classes == FASHION_CLASSES
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    x = test.get([0, 1])
    assert x.dtype == torch.uint8 and x.shape == (2, 1, 28, 28)
    assert test.labels[0].item() == 9  # the first test image is an ankle boot


def test_transfer_halves_are_disjoint_cover_all_classes_and_mix_kinds():
    assert not set(SPLIT_A) & set(SPLIT_B) and sorted(SPLIT_A + SPLIT_B) == list(range(10))
    kinds = {"tops": {0, 2, 4, 6}, "footwear": {5, 7, 9}}
    for half in (SPLIT_A, SPLIT_B):  # each half holds tops and footwear: B is related to A
        assert all(set(half) & classes for classes in kinds.values())


@needs_fashion
def test_class_subset_keeps_its_images_relabelled():
    whole = open_source("fashion-mnist:test")
    b = open_source(subset_spec(SPLIT_B, "test"))
    assert b.name == "fashion-mnist[2,3,6,7,8]:test" and b.classes == ["Pullover", "Dress", "Shirt", "Sneaker", "Bag"]
    assert len(b) == 5000 and torch.bincount(b.labels).tolist() == [1000] * 5
    first = int(torch.isin(whole.labels, torch.tensor(SPLIT_B)).nonzero()[0])  # the first B image of the test set
    assert torch.equal(b.get([0]), whole.get([first])) and b.classes[b.labels[0]] == FASHION_CLASSES[whole.labels[first]]
    reordered = open_source("fashion-mnist[9, 0]")  # listed order gives the labels; train split by default
    assert reordered.classes == ["Ankle boot", "T-shirt/top"] and len(reordered) == 12000
    assert torch.equal(reordered.labels[:3], torch.tensor([0, 1, 1]))  # train labels start 9, 0, 0


@pytest.mark.parametrize("spec", ["fashion-mnist[]", "fashion-mnist[1,1]", "fashion-mnist[10]", "fashion-mnist[a]"])
def test_bad_class_subset_is_a_clear_error(spec):
    with pytest.raises(DataError, match="distinct class numbers 0-9"):
        open_source(spec)


@needs_fashion
def test_fashion_mnist_at_paper_size_is_rgb_256():
    x = open_source("fashion-mnist:test", size=256, channels=3).get([0])
    assert x.shape == (1, 3, 256, 256) and torch.equal(x[:, 0], x[:, 2])


@pytest.fixture()
def mirror(tmp_path):
    """A loopback HTTP server serving a copy of the official files; yields (url, files dir)."""
    served = tmp_path / "served"
    served.mkdir()
    for name in FASHION_FILES:
        shutil.copy(FASHION_SYSTEM_DIR / name, served / name)
    handler = functools.partial(QuietHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", served
    server.shutdown()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@needs_fashion
def test_download_verifies_and_caches(mirror, tmp_path, monkeypatch):
    url, _ = mirror
    cache = tmp_path / "cache"
    monkeypatch.setenv("DECONVNET_DATA", str(cache))
    monkeypatch.setenv("DECONVNET_FASHION_URL", url)
    test = open_source("fashion-mnist:test")
    assert len(test) == 10000 and test.labels[0].item() == 9
    assert sorted(p.name for p in (cache / "fashion-mnist").iterdir()) == sorted(FASHION_FILES)


@needs_fashion
def test_corrupted_download_is_a_clear_error_and_caches_nothing(mirror, tmp_path, monkeypatch):
    url, served = mirror
    data = bytearray((served / "t10k-labels-idx1-ubyte.gz").read_bytes())
    data[100] ^= 0xFF
    (served / "t10k-labels-idx1-ubyte.gz").write_bytes(bytes(data))
    cache = tmp_path / "cache"
    monkeypatch.setenv("DECONVNET_DATA", str(cache))
    monkeypatch.setenv("DECONVNET_FASHION_URL", url)
    with pytest.raises(DataError, match="checksum mismatch for .*t10k-labels"):
        open_source("fashion-mnist:test")
    left = sorted(p.name for p in (cache / "fashion-mnist").iterdir())
    assert "t10k-labels-idx1-ubyte.gz" not in left and not [n for n in left if n.startswith(".")]


def test_unreachable_mirror_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("DECONVNET_DATA", str(tmp_path))
    monkeypatch.setenv("DECONVNET_FASHION_URL", "http://127.0.0.1:9/")
    with pytest.raises(DataError, match="cannot download"):
        open_source("fashion-mnist")


def test_read_idx_rejects_truncated_files(tmp_path):
    header = bytes([0, 0, 8, 3]) + (2).to_bytes(4, "big") + (3).to_bytes(4, "big") + (3).to_bytes(4, "big")
    (tmp_path / "ok").write_bytes(header + bytes(range(18)))
    assert read_idx(tmp_path / "ok").shape == (2, 3, 3)
    (tmp_path / "short").write_bytes(header + bytes(10))
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "short")


def test_digits_upsampled_to_model_size():
    digits = open_source("digits", size=28, channels=1)
    assert len(digits) == 1797 and digits.classes == [str(i) for i in range(10)]
    x = digits.get([0])
    assert x.shape == (1, 1, 28, 28) and x.max() > 200


def _write_folder(root: Path) -> list[str]:
    """Two classes of good images in several modes, plus four bad files; returns the bad paths."""
    rng = np.random.default_rng(0)
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(root / "cat" / "rgb.jpg")
    Image.fromarray(rng.integers(0, 255, (50, 30), dtype=np.uint8)).save(root / "cat" / "grey.png")
    Image.fromarray(rng.integers(0, 255, (32, 32, 4), dtype=np.uint8), "RGBA").save(root / "dog" / "rgba.png")
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / "dog" / "big.jpg")
    jpeg = (root / "dog" / "big.jpg").read_bytes()
    bad = [root / "cat" / "empty.png", root / "cat" / "text.png", root / "dog" / "truncated.jpg",
           root / "dog" / "half.png"]
    bad[0].write_bytes(b"")
    bad[1].write_text("not an image")
    bad[2].write_bytes(jpeg[: len(jpeg) // 2])
    bad[3].write_bytes((root / "cat" / "grey.png").read_bytes()[:60])
    (root / "dog" / "notes.txt").write_text("ignored: not an image extension")
    return sorted(str(p) for p in bad)


def test_folder_skips_bad_files_and_lists_them(tmp_path):
    bad = _write_folder(tmp_path)
    with pytest.warns(UserWarning, match="4 unreadable image file"):
        source = FolderSource(tmp_path, size=24, channels=3)
    assert sorted(source.skipped) == bad
    assert source.classes == ["cat", "dog"] and len(source) == 4
    assert source.labels.tolist() == [0, 0, 1, 1]
    x = source.get(range(4))
    assert x.shape == (4, 3, 24, 24) and x.dtype == torch.uint8
    grey = source.get([0])[0]  # cat/grey.png (files sort by name): the three channels are equal
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])


def test_folder_check_is_cached_until_a_file_changes(tmp_path, monkeypatch):
    """Each analysis of a folder opens it; the decode check of its files runs once (runner's cache)."""
    import deconvnet.data as data

    bad = _write_folder(tmp_path)
    with pytest.warns(UserWarning, match="4 unreadable"):
        FolderSource(tmp_path, size=24, channels=3)
    decoded = []
    real = data.load_image
    monkeypatch.setattr(data, "load_image", lambda f, *a, **k: decoded.append(f) or real(f, *a, **k))
    with pytest.warns(UserWarning, match="4 unreadable"):
        again = FolderSource(tmp_path, size=24, channels=3)
    assert decoded == [] and sorted(again.skipped) == bad and len(again) == 4
    Image.fromarray(np.zeros((30, 30, 3), dtype=np.uint8)).save(tmp_path / "dog" / "half.png")  # repaired
    with pytest.warns(UserWarning, match="3 unreadable"):
        repaired = FolderSource(tmp_path, size=24, channels=3)
    assert len(decoded) == 8 and len(repaired) == 5  # checked again, every file


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="not a directory"):
        open_source(f"folder:{tmp_path / 'missing'}")
    with pytest.raises(DataError, match="no class sub-folders"):
        open_source(f"folder:{tmp_path}")
    (tmp_path / "a").mkdir()
    with pytest.raises(DataError, match="no readable PNG/JPEG"):
        open_source(f"folder:{tmp_path}")
    with pytest.raises(DataError, match="unknown data spec"):
        open_source("imagenet")


def test_paper_preprocessing_256_to_224_ten_crops():
    pre = preprocess_for(224, 3)
    assert (pre.stored_size, pre.scale, pre.pad) == (256, 255.0, 0)
    x = torch.arange(256, dtype=torch.float32).repeat(256, 1).expand(1, 3, 256, 256).to(torch.uint8)
    crops = pre.ten_crops(x)  # (10, 1, 3, 224, 224), values are the column index
    assert crops.shape == (10, 1, 3, 224, 224)
    lefts = [crops[w, 0, 0, 0, 0].item() for w in range(5)]
    assert lefts == [0, 32, 0, 32, 16]  # TL, TR, BL, BR, center
    assert crops[5, 0, 0, 0, 0].item() == 223 and crops[9, 0, 0, 0, 0].item() == 239  # flipped
    which = torch.tensor([4, 9])
    batch = pre.train(torch.cat([x, x]), which)
    assert torch.equal(batch[0], crops[4, 0]) and torch.equal(batch[1], crops[9, 0])
    assert torch.equal(pre.eval(x), crops[4])


def test_small_preprocessing_pads_and_subtracts_mean():
    source = open_source("digits", size=28, channels=1)
    pre = preprocess_for(28, 1)
    pre.mean = mean_image(source, pre, range(100))
    direct = source.get(range(100)).float().div(255).mean(0)
    assert torch.allclose(pre.mean, direct, atol=1e-6)
    x = source.get([0])
    centered = pre.eval(x)
    assert centered.shape == (1, 1, 28, 28)
    assert torch.allclose(centered, x.float() / 255 - pre.mean)
    corner = pre.crop(pre.normalise(x), 0)  # top-left of the 2 px padded image: shifted by 2
    assert torch.allclose(corner[..., 2:, 2:], centered[..., :26, :26]) and corner[..., :2, :].abs().sum() == 0
