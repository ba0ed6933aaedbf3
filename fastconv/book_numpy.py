"""A network done the book's way: NumPy, im2col + ``np.dot``, one class per layer.

A clean re-implementation of the approach of *Deep Learning from Scratch* ch. 7-8, used as a
baseline by the end-to-end benchmark (``fastconv bench``). :func:`from_model` builds it from a
fastconv model (so the architecture is defined once, in :mod:`fastconv.models`), with the
model's weights in float64. It deliberately keeps the book's performance traits:
everything is computed in float64 (inputs are upcast on entry), im2col/col2im are loops over
the kernel offsets with fancy slicing, max pooling goes through im2col too, and ReLU is a
separate layer. Dropout is *inverted* (scaled at training time, identity at test time) so that
it does the same work as PyTorch's and fastconv's.

The layers follow fastconv's layer contract (``name``, ``kind``, ``params``, ``grads``,
``forward(x, training)``, ``backward(dy)``) and the model has ``layers``, ``loss``,
``optimizer``, ``parameters()``, ``gradients()`` and ``train_on_batch``, so the profiler can
time it layer by layer as well.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "im2col",
    "col2im",
    "Conv",
    "Relu",
    "MaxPool",
    "Dense",
    "Dropout",
    "SoftmaxCrossEntropy",
    "Adam",
    "NumpyNet",
    "from_model",
]


def _out_size(size, k, stride, pad):
    return (size + 2 * pad - k) // stride + 1


def im2col(x, kh, kw, stride=1, pad=0, pad_value=0.0):
    """(N, C, H, W) -> (N*OH*OW, C*kh*kw), rows (n, oh, ow), columns (c, i, j)."""
    n, c, h, w = x.shape
    oh, ow = _out_size(h, kh, stride, pad), _out_size(w, kw, stride, pad)
    padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=pad_value)
    cols = np.empty((n, c, kh, kw, oh, ow), dtype=np.float64)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i, j] = padded[
                :, :, i : i + stride * oh : stride, j : j + stride * ow : stride
            ]
    return cols.transpose(0, 4, 5, 1, 2, 3).reshape(n * oh * ow, -1)


def col2im(cols, x_shape, kh, kw, stride=1, pad=0):
    """Adjoint of :func:`im2col`: add every column entry back onto its pixel."""
    n, c, h, w = x_shape
    oh, ow = _out_size(h, kh, stride, pad), _out_size(w, kw, stride, pad)
    cols = cols.reshape(n, oh, ow, c, kh, kw).transpose(0, 3, 4, 5, 1, 2)
    padded = np.zeros((n, c, h + 2 * pad, w + 2 * pad), dtype=np.float64)
    for i in range(kh):
        for j in range(kw):
            padded[:, :, i : i + stride * oh : stride, j : j + stride * ow : stride] += cols[
                :, :, i, j
            ]
    return padded[:, :, pad : pad + h, pad : pad + w]


class _Layer:
    kind = "other"

    def __init__(self, name):
        self.name = name
        self.params = {}
        self.grads = {}
        self.built = False

    def build(self, input_shape):
        self.built = True

    def output_shape(self, input_shape):
        return tuple(input_shape)


class Conv(_Layer):
    """3-D weights ``(F, C, kh, kw)``, im2col then one ``np.dot`` (the book's ``Convolution``)."""

    kind = "conv"

    def __init__(self, filters, kernel_size, stride=1, padding=0, name="conv", rng=None):
        super().__init__(name)
        self.filters, self.k, self.stride, self.pad = filters, kernel_size, stride, padding
        self.rng = rng if rng is not None else np.random.default_rng()

    def build(self, input_shape):
        c = input_shape[0]
        fan_in = c * self.k * self.k
        shape = (self.filters, c, self.k, self.k)
        self.params = {
            "W": self.rng.standard_normal(shape) * np.sqrt(2.0 / fan_in),
            "b": np.zeros(self.filters),
        }
        self.built = True

    def output_shape(self, input_shape):
        _, h, w = input_shape
        return (
            self.filters,
            _out_size(h, self.k, self.stride, self.pad),
            _out_size(w, self.k, self.stride, self.pad),
        )

    def forward(self, x, training=False):
        if not self.built:
            self.build(x.shape[1:])
        w = self.params["W"]
        n = x.shape[0]
        _, oh, ow = self.output_shape(x.shape[1:])
        self.x_shape = x.shape
        self.cols = im2col(x.astype(np.float64), self.k, self.k, self.stride, self.pad)
        self.w_cols = w.reshape(self.filters, -1).T
        y = np.dot(self.cols, self.w_cols) + self.params["b"]
        return y.reshape(n, oh, ow, -1).transpose(0, 3, 1, 2)

    def backward(self, dy):
        dy = dy.transpose(0, 2, 3, 1).reshape(-1, self.filters)
        self.grads = {
            "W": np.dot(self.cols.T, dy).T.reshape(self.params["W"].shape),
            "b": dy.sum(axis=0),
        }
        dcols = np.dot(dy, self.w_cols.T)
        return col2im(dcols, self.x_shape, self.k, self.k, self.stride, self.pad)


class Relu(_Layer):
    kind = "activation"

    def forward(self, x, training=False):
        self.mask = x <= 0
        y = x.copy()
        y[self.mask] = 0
        return y

    def backward(self, dy):
        dx = dy.copy()
        dx[self.mask] = 0
        return dx


class MaxPool(_Layer):
    """Max pooling through im2col and ``argmax`` (the first maximum gets the gradient)."""

    kind = "pool"

    def __init__(self, size=2, name="pool"):
        super().__init__(name)
        self.size = size

    def output_shape(self, input_shape):
        c, h, w = input_shape
        return (c, _out_size(h, self.size, self.size, 0), _out_size(w, self.size, self.size, 0))

    def forward(self, x, training=False):
        n, c = x.shape[:2]
        _, oh, ow = self.output_shape(x.shape[1:])
        cols = im2col(x, self.size, self.size, self.size).reshape(-1, self.size * self.size)
        self.x_shape = x.shape
        self.argmax = np.argmax(cols, axis=1)
        y = cols[np.arange(cols.shape[0]), self.argmax]
        return y.reshape(n, oh, ow, c).transpose(0, 3, 1, 2)

    def backward(self, dy):
        dy = dy.transpose(0, 2, 3, 1)
        window = self.size * self.size
        dcols = np.zeros((dy.size, window))
        dcols[np.arange(dy.size), self.argmax] = dy.ravel()
        # Back to im2col's layout: one row per (n, oh, ow), columns (c, i, j).
        dcols = dcols.reshape(-1, self.x_shape[1] * window)
        return col2im(dcols, self.x_shape, self.size, self.size, self.size)


class Dense(_Layer):
    """``x @ W + b`` with weights ``(in, out)``; flattens its input as the book's ``Affine``."""

    kind = "dense"

    def __init__(self, units, name="dense", rng=None):
        super().__init__(name)
        self.units = units
        self.rng = rng if rng is not None else np.random.default_rng()

    def build(self, input_shape):
        fan_in = int(np.prod(input_shape))
        self.params = {
            "W": self.rng.standard_normal((fan_in, self.units)) * np.sqrt(2.0 / fan_in),
            "b": np.zeros(self.units),
        }
        self.built = True

    def output_shape(self, input_shape):
        return (self.units,)

    def forward(self, x, training=False):
        if not self.built:
            self.build(x.shape[1:])
        self.x_shape = x.shape
        self.x = x.reshape(x.shape[0], -1).astype(np.float64)
        return np.dot(self.x, self.params["W"]) + self.params["b"]

    def backward(self, dy):
        self.grads = {"W": np.dot(self.x.T, dy), "b": dy.sum(axis=0)}
        return np.dot(dy, self.params["W"].T).reshape(self.x_shape)


class Dropout(_Layer):
    kind = "dropout"

    def __init__(self, rate=0.5, name="dropout", rng=None):
        super().__init__(name)
        self.rate = rate
        self.rng = rng if rng is not None else np.random.default_rng()

    def forward(self, x, training=False):
        if not training or self.rate == 0:
            self.scale = None
            return x
        keep = 1.0 - self.rate
        self.scale = (self.rng.random(x.shape) < keep) / keep
        return x * self.scale

    def backward(self, dy):
        return dy if self.scale is None else dy * self.scale


class SoftmaxCrossEntropy:
    """Mean cross-entropy of the softmax of ``scores``; ``y`` int labels or one-hot."""

    def forward(self, scores, y):
        shifted = scores - scores.max(axis=1, keepdims=True)
        exp = np.exp(shifted)
        self.probs = exp / exp.sum(axis=1, keepdims=True)
        y = np.asarray(y)
        self.labels = y.argmax(axis=1) if y.ndim == 2 else y.astype(np.intp)
        n = scores.shape[0]
        picked = self.probs[np.arange(n), self.labels]
        return float(-np.log(picked + 1e-12).mean())

    def backward(self):
        n = self.probs.shape[0]
        d = self.probs.copy()
        d[np.arange(n), self.labels] -= 1.0
        return d / n


class Adam:
    """Adam as in the book (bias correction folded into the step size)."""

    def __init__(self, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-7):
        self.lr, self.beta1, self.beta2, self.eps = lr, beta1, beta2, eps
        self.t = 0
        self.m = self.v = None

    def step(self, params, grads):
        if self.m is None:
            self.m = [np.zeros_like(p) for p in params]
            self.v = [np.zeros_like(p) for p in params]
        self.t += 1
        lr_t = self.lr * np.sqrt(1.0 - self.beta2**self.t) / (1.0 - self.beta1**self.t)
        for p, g, m, v in zip(params, grads, self.m, self.v, strict=True):
            m += (1.0 - self.beta1) * (g - m)
            v += (1.0 - self.beta2) * (g * g - v)
            p -= lr_t * m / (np.sqrt(v) + self.eps)


class NumpyNet:
    """A list of layers, a loss and an optimizer, with the Sequential-like methods the tools use."""

    backend = "cpu"
    dtype = "float64"

    def __init__(self, layers, loss=None, optimizer=None):
        self.layers = list(layers)
        self.loss = loss if loss is not None else SoftmaxCrossEntropy()
        self.optimizer = optimizer if optimizer is not None else Adam()

    def build(self, input_shape):
        shape = tuple(input_shape)
        for layer in self.layers:
            if not layer.built:
                layer.build(shape)
            shape = layer.output_shape(shape)

    def parameters(self):
        return [layer.params[k] for layer in self.layers for k in ("W", "b") if k in layer.params]

    def gradients(self):
        return [layer.grads[k] for layer in self.layers for k in ("W", "b") if k in layer.params]

    def set_parameters(self, arrays):
        """Copy ``arrays`` (order and shapes of :meth:`parameters`) into the model, in float64."""
        params = self.parameters()
        if len(arrays) != len(params):
            raise ValueError(f"expected {len(params)} arrays, got {len(arrays)}")
        for p, a in zip(params, arrays, strict=True):
            a = np.asarray(a)
            if a.shape != p.shape:
                raise ValueError(f"parameter shape mismatch: {a.shape} vs {p.shape}")
            p[...] = a

    def forward(self, x, training=False):
        out = np.asarray(x, dtype=np.float64)
        for layer in self.layers:
            out = layer.forward(out, training=training)
        return out

    def backward(self, dscores):
        d = dscores
        for layer in reversed(self.layers):
            d = layer.backward(d)
        return d

    def train_on_batch(self, x, y):
        scores = self.forward(x, training=True)
        loss = self.loss.forward(scores, y)
        self.backward(self.loss.backward())
        self.optimizer.step(self.parameters(), self.gradients())
        accuracy = float((scores.argmax(axis=1) == self.loss.labels).mean())
        return {"loss": loss, "accuracy": accuracy}

    def predict(self, x, batch_size=100):
        return np.concatenate(
            [self.forward(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)]
        )


def from_model(model) -> NumpyNet:
    """The book-style NumPy twin of a fastconv ``Sequential`` model, weights copied (float64).

    Supported layers: Conv2D (square kernel, one stride and padding for both axes, optional fused
    ReLU, which becomes a separate :class:`Relu` as in the book), MaxPool2D (square, stride =
    size, no padding), Flatten (the book's Affine flattens by itself), Dense (optional ReLU),
    ReLU and Dropout.
    """
    from .nn.backend import to_numpy

    layers = []
    for layer in model.layers:
        kind = type(layer).__name__
        if kind == "Conv2D":
            k, s, p = layer.kernel_size, layer.stride, layer.padding
            plain = len(p) == 2 and layer.groups == 1 and layer.dilation_rate == (1, 1)
            if not plain or k[0] != k[1] or s[0] != s[1] or p[0] != p[1] or not layer.use_bias:
                raise TypeError(
                    f"{layer.name}: the book-style net needs square, biased convs (one group, no "
                    "dilation, the same padding on every side)"
                )
            conv = Conv(layer.filters, k[0], s[0], p[0], name=layer.name)
            conv.params = {n: to_numpy(layer.params[n]).astype(np.float64) for n in ("W", "b")}
            conv.built = True
            layers.append(conv)
            if layer.activation == "relu":
                layers.append(Relu(name=f"{layer.name}_relu"))
        elif kind == "MaxPool2D":
            size = layer.size[0]
            if layer.size != (size, size) or layer.stride != layer.size or any(layer.pads):
                raise TypeError(f"{layer.name}: the book-style net pools square, unpadded windows")
            layers.append(MaxPool(size, name=layer.name))
        elif kind == "Dense":
            dense = Dense(layer.units, name=layer.name)
            dense.params = {n: to_numpy(layer.params[n]).astype(np.float64) for n in ("W", "b")}
            dense.built = True
            layers.append(dense)
            if layer.activation == "relu":
                layers.append(Relu(name=f"{layer.name}_relu"))
        elif kind == "ReLU":
            layers.append(Relu(name=layer.name))
        elif kind == "Dropout":
            layers.append(Dropout(layer.rate, name=layer.name, rng=np.random.default_rng(0)))
        elif kind != "Flatten":
            raise TypeError(f"{layer.name}: no book-style NumPy layer for {kind}")
    return NumpyNet(layers)
