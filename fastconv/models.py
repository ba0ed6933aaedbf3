"""Ready-made models."""

from __future__ import annotations

from .nn import Conv2D, Dense, Dropout, Flatten, MaxPool2D, ReLU, Sequential

__all__ = ["deep_mnist_net"]


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
