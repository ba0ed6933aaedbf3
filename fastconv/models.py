"""Ready-made models."""

from __future__ import annotations

from .nn import Conv2D, Dense, Dropout, Flatten, MaxPool2D, ReLU, Sequential

__all__ = ["deep_mnist_net", "deep_mnist_bn_net"]


def deep_mnist_net(seed=None) -> Sequential:
    """The deep MNIST ConvNet of *Deep Learning from Scratch*, ch. 8 (``DeepConvNet``).

    conv3x3(16)-conv3x3(16)-pool - conv3x3(32)-conv3x3(32, pad 2)-pool -
    conv3x3(64)-conv3x3(64)-pool - Dense(50)-ReLU-Dropout(0.5)-Dense(10)-Dropout(0.5),
    every convolution with padding 1 (except conv4) and a fused ReLU, He-normal weights and zero
    biases. Built for inputs (N, 1, 28, 28) (weights created at once), uncompiled;
    ``get_weights()`` gives W1, b1, ..., W8, b8 with the book's shapes.
    """

    def conv(filters, pad):
        return Conv2D(filters, 3, stride=1, padding=pad, activation="relu")

    return Sequential(
        [
            conv(16, 1),
            conv(16, 1),
            MaxPool2D(2),
            conv(32, 1),
            conv(32, 2),
            MaxPool2D(2),
            conv(64, 1),
            conv(64, 1),
            MaxPool2D(2),
            Flatten(),
            Dense(50),
            ReLU(),
            Dropout(0.5),
            Dense(10),
            Dropout(0.5),
        ],
        seed=seed,
        name="deep_mnist_net",
        input_shape=(1, 28, 28),
    )


def deep_mnist_bn_net(seed=None, dropout=0.5) -> Sequential:
    """The deep MNIST ConvNet with batch normalisation (the ``augmented`` recipe's net).

    The book's topology, with every convolution bias-free and followed by BatchNorm2D and ReLU
    (fused at run time), and without the book's dropout on the output scores (which only adds
    noise to the loss): conv-BN-ReLU x2 - pool - x2 - pool - x2 - pool - Dense(50)-ReLU-
    Dropout(``dropout``)-Dense(10): 123,776 parameters (the book's net: 123,552).
    """
    from .nn import BatchNorm2D

    def block(filters, pad):
        return [Conv2D(filters, 3, padding=pad, use_bias=False), BatchNorm2D(), ReLU()]

    return Sequential(
        [
            *block(16, 1),
            *block(16, 1),
            MaxPool2D(2),
            *block(32, 1),
            *block(32, 2),
            MaxPool2D(2),
            *block(64, 1),
            *block(64, 1),
            MaxPool2D(2),
            Flatten(),
            Dense(50),
            ReLU(),
            Dropout(dropout),
            Dense(10),
        ],
        seed=seed,
        name="deep_mnist_bn_net",
        input_shape=(1, 28, 28),
    )
