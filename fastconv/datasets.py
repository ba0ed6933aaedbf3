"""MNIST from the four original IDX ``.gz`` files, verified by SHA-256 before parsing.

Where the files are looked for: the ``path`` argument when given; otherwise ``data/mnist`` of
the source checkout (next to the package) when it holds them, else the ``$FASTCONV_DATA``
environment variable (a directory with the four files, or with an ``mnist/`` subdirectory
holding them), as for an installed package without the checkout.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path

import numpy as np

__all__ = ["load_mnist", "MNIST_FILES", "default_mnist_dir"]

#: file name -> SHA-256 of the canonical distribution
MNIST_FILES = {
    "train-images-idx3-ubyte.gz": (
        "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"
    ),
    "train-labels-idx1-ubyte.gz": (
        "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"
    ),
    "t10k-images-idx3-ubyte.gz": (
        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"
    ),
    "t10k-labels-idx1-ubyte.gz": (
        "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"
    ),
}

_CHECKOUT_DIR = Path(__file__).resolve().parent.parent / "data" / "mnist"


def default_mnist_dir() -> Path:
    """The checkout's ``data/mnist`` if it holds the files, else ``$FASTCONV_DATA`` (or its
    ``mnist/`` subdirectory); the checkout directory when neither is available."""
    if any((_CHECKOUT_DIR / name).is_file() for name in MNIST_FILES):
        return _CHECKOUT_DIR
    env = os.environ.get("FASTCONV_DATA")
    if env:
        base = Path(env)
        sub = base / "mnist"
        return sub if any((sub / name).is_file() for name in MNIST_FILES) else base
    return _CHECKOUT_DIR


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _verified(directory: Path, name: str) -> Path:
    path = directory / name
    if not path.is_file():
        raise FileNotFoundError(
            f"MNIST file {path} is missing; put the four original MNIST .gz files "
            f"({', '.join(MNIST_FILES)}) in {directory}, or point load_mnist(path=...) or "
            "$FASTCONV_DATA at a directory holding them"
        )
    digest = _sha256(path)
    if digest != MNIST_FILES[name]:
        raise ValueError(
            f"MNIST file {path} is corrupt or not the original: SHA-256 {digest}, expected "
            f"{MNIST_FILES[name]}; replace it with the original file"
        )
    return path


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    header = np.frombuffer(raw, dtype=">u4", count=1 + ndim)
    if int(header[0]) != magic:
        raise ValueError(f"{path}: bad IDX magic number {int(header[0]):#x}, expected {magic:#x}")
    shape = tuple(int(s) for s in header[1:])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 * (1 + ndim))
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: holds {data.size} values, header says {shape}")
    return data.reshape(shape)


def load_mnist(path=None):
    """Load MNIST.

    Parameters
    ----------
    path : str or Path, optional
        Directory holding the four IDX ``.gz`` files (default: see the module docstring).

    Returns
    -------
    (x_train, y_train), (x_test, y_test)
        ``x`` float32 (N, 1, 28, 28) in [0, 1]; ``y`` int64 (N,). 60,000 / 10,000 samples.

    Raises
    ------
    FileNotFoundError
        A file is missing (the message names it and says where to put it).
    ValueError
        A file fails its SHA-256 check or is malformed.
    """
    directory = Path(path) if path is not None else default_mnist_dir()
    out = []
    for split in ("train", "t10k"):
        images = _read_idx(_verified(directory, f"{split}-images-idx3-ubyte.gz"), 0x803, 3)
        labels = _read_idx(_verified(directory, f"{split}-labels-idx1-ubyte.gz"), 0x801, 1)
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{split}: {images.shape[0]} images but {labels.shape[0]} labels")
        x = images.astype(np.float32)[:, None, :, :]
        x *= np.float32(1.0 / 255.0)
        out.append((x, labels.astype(np.int64)))
    return tuple(out)
