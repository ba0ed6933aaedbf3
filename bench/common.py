"""What the benchmarks share: the deep-MNIST layer table, read from ``deep_mnist_net()`` itself,
and one description of the machine and its load (fastconv.benchmark.machine_line, which the
package's own benchmarks print too)."""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["MnistLayer", "deep_mnist_layers", "machine_line", "load_average"]


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
