"""What the benchmarks share: the deep-MNIST layer table, read from ``deep_mnist_net()`` itself,
one description of the machine and its load (fastconv.benchmark.machine_line, which the
package's own benchmarks print too), and the writer of a marked region of a markdown file."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

__all__ = ["MnistLayer", "deep_mnist_layers", "machine_line", "load_average", "write_region",
           "check_region_target"]  # fmt: skip


class MnistLayer(NamedTuple):
    """One convolution or pooling layer of the book's deep MNIST net, at its input."""

    name: str  # conv1..conv6, pool1..pool3 (the book's numbering)
    kind: str  # "conv" or "pool"
    C: int  # input channels
    H: int  # input height = width
    F: int = 0  # output channels (conv)
    pad: int = 0  # padding (conv)


def deep_mnist_layers() -> list[MnistLayer]:
    """The conv and pool layers of :func:`fastconv.models.deep_mnist_net`, in order, with the
    shapes its 28x28 input gives them (conv4 pads 2, so pool2 sees 16x16)."""
    from fastconv.models import deep_mnist_net

    layers, counts = [], {"conv": 0, "pool": 0}
    for layer in deep_mnist_net(seed=0).layers:
        if layer.kind not in counts:
            continue
        counts[layer.kind] += 1
        C, H, _ = layer.input_shape
        name = f"{layer.kind}{counts[layer.kind]}"
        if layer.kind == "conv":
            layers.append(MnistLayer(name, "conv", C, H, layer.filters, layer.padding[0]))
        else:
            layers.append(MnistLayer(name, "pool", C, H))
    return layers


# The machine line is written once, in the package (fastconv bench prints it too); imported
# when called, as before, so that importing this module imports no fastconv.


def load_average() -> str:
    """The 1/5/15-minute load averages as ``a/b/c``."""
    from fastconv.benchmark import load_average_text

    return load_average_text()


def machine_line(torch_threads: int = 2) -> str:
    """One line: CPU, cores, library versions (PyTorch's threads), date and load average."""
    from fastconv.benchmark import machine_line as line

    return line(torch_threads)


def check_region_target(path) -> None:
    """Refuse, before a benchmark runs for minutes, a ``--out`` file that cannot be written
    (its folder missing, or the path a folder)."""
    path = Path(path)
    if path.is_dir() or not path.parent.is_dir():
        raise SystemExit(f"cannot write {path}: not a file in an existing folder")


def write_region(path, name: str, text: str) -> None:
    """Replace what lies between ``<!-- name:start -->`` and ``<!-- name:end -->`` in the
    markdown file ``path`` with ``text``; a file or a region that is missing is created (the
    region at the end of the file): :func:`fastconv.benchmark.write_markdown`."""
    from fastconv.benchmark import write_markdown

    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    write_markdown(path, text.rstrip(), start, end, header="")
