"""MNIST loading: shapes, dtypes, value range, checksum and missing-file errors."""

import shutil

import numpy as np
import pytest

from fastconv import datasets
from fastconv.datasets import MNIST_FILES, load_mnist


@pytest.fixture(scope="module")
def mnist():
    return load_mnist()


def test_load_mnist_shapes_dtypes_ranges(mnist):
    (x_train, y_train), (x_test, y_test) = mnist
    assert x_train.shape == (60000, 1, 28, 28) and x_test.shape == (10000, 1, 28, 28)
    assert x_train.dtype == np.float32 and y_train.dtype == np.int64
    assert x_train.min() == 0.0 and x_train.max() == 1.0
    assert y_test.shape == (10000,) and set(np.unique(y_train)) == set(range(10))
    assert y_train[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]  # the canonical first labels
    assert y_test[:5].tolist() == [7, 2, 1, 0, 4]
    counts = np.bincount(y_train, minlength=10)
    assert counts[1] == 6742 and counts[5] == 5421  # the published class counts
    # a digit looks like a digit: ink in the middle, blank corners
    assert x_train[0, 0, 10:18, 10:18].mean() > 0.2 and x_train[:, 0, :3, :3].mean() < 1e-3


# resolved at import, before any test points $FASTCONV_DATA elsewhere
SOURCE_DIR = datasets.default_mnist_dir()


def _copy_files(tmp_path, src=SOURCE_DIR):
    for name in MNIST_FILES:
        shutil.copy(src / name, tmp_path / name)
    return tmp_path


def test_missing_file_is_named(tmp_path):
    _copy_files(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte.gz is missing"):
        load_mnist(tmp_path)


def test_corrupt_file_fails_checksum(tmp_path):
    _copy_files(tmp_path)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.gz is corrupt.*SHA-256"):
        load_mnist(tmp_path)


def test_environment_variable_is_used_without_checkout_data(tmp_path, monkeypatch):
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    monkeypatch.setattr(datasets, "_CHECKOUT_DIR", checkout)  # a checkout without the files
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # empty: nothing cached
    env = tmp_path / "env"
    env.mkdir()
    monkeypatch.setenv("FASTCONV_DATA", str(env))
    with pytest.raises(FileNotFoundError, match=f"FASTCONV_DATA: {env}"):
        load_mnist(download=False)
    (env / "mnist").mkdir()
    _copy_files(env / "mnist")
    assert datasets.default_mnist_dir() == env / "mnist"
    (_, y_train), _ = load_mnist()
    assert y_train.shape == (60000,)
    # $FASTCONV_DATA comes before the checkout's copy (tests/cli/test_mnist_download.py: the order)
    _copy_files(checkout)
    assert datasets.default_mnist_dir() == env / "mnist"
    monkeypatch.delenv("FASTCONV_DATA")
    assert datasets.default_mnist_dir() == checkout
