"""The model zoo: the classic CNNs, built on :mod:`fastconv.nn`.

=================  ==========  ================  ==================================================
builder            input       parameters        layout
=================  ==========  ================  ==================================================
``lenet5``         1x32x32     61,706            LeCun et al. 1998 (tanh or ReLU)
``alexnet``        3x224x224   61,100,840        torchvision's AlexNet (Krizhevsky 2014 variant)
``vgg16``          3x224x224   138,357,544       torchvision's VGG-16 (configuration D)
``resnet18``       3x224x224   11,689,512        torchvision's ResNet-18 (BasicBlock, 2-2-2-2)
``resnet34``       3x224x224   21,797,672        torchvision's ResNet-34 (BasicBlock, 3-4-6-3)
``googlenet``      3x224x224   6,624,904         torchvision's GoogLeNet (Inception v1), no aux
``mobilenet_v2``   3x224x224   3,504,872         torchvision's MobileNetV2 (width 1.0)
``deep_mnist_net`` 1x28x28     123,552           *Deep Learning from Scratch*, ch. 8
``resnet_mnist``   1x28x28     77,754            a small residual net for digits
=================  ==========  ================  ==================================================

Parameter counts are torchvision's for the same architecture and 1000 classes (BatchNorm's
moving statistics excluded, as torchvision counts). Every builder takes ``num_classes``,
``input_shape`` (per sample, ``(C, H, W)``), ``seed``, ``dtype`` ("float32"/"float16") and
``backend`` ("cpu"/"gpu") and returns an uncompiled, built :class:`fastconv.nn.Model` (weights
created at once from the model's seeded generator: He-normal kernels, zero biases, BatchNorm
gamma 1 / beta 0; torchvision's initialisations differ, the architectures do not).

Layer names follow torchvision's module paths where those are meaningful (``layer2.0.conv1``,
``inception4a.branch2.1.conv``), and the classic names otherwise (AlexNet ``conv1``...``fc8``,
VGG ``conv3_2``...), so that errors and profiles name a layer one can find in a paper.

A builder asked for an input the architecture cannot take raises a ValueError naming the layer
where the spatial size runs out and the smallest square input that works, e.g. ``alexnet(
input_shape=(3, 28, 28))``. A model built for one size and called with another is refused by
the model (``x must have per-sample shape ...``) before any kernel runs.

The models compute in float32 or float16 on either backend; float16 is meant for inference
(``model.to(dtype="float16")`` or ``dtype="float16"`` here).
"""

from __future__ import annotations

import numbers

from . import _checks as chk
from .nn import (
    Add,
    AvgPool2D,
    BatchNorm2D,
    Concatenate,
    Conv2D,
    Dense,
    DepthwiseConv2D,
    Dropout,
    Flatten,
    GlobalAveragePooling2D,
    Input,
    MaxPool2D,
    Model,
    ReLU,
    ReLU6,
    Sequential,
    Tanh,
)
from .nn.layers.pooling import MaxPool2DCeil  # noqa: F401  (its former home, for imports)

__all__ = [
    "MODELS",
    "get_model",
    "lenet5",
    "alexnet",
    "vgg16",
    "resnet18",
    "resnet34",
    "googlenet",
    "mobilenet_v2",
    "deep_mnist_net",
    "resnet_mnist",
    "deep_mnist_bn_net",
]


# --- shared construction ----------------------------------------------------------------------


def _input_shape(input_shape, default) -> tuple:
    if input_shape is None:
        return default
    if not isinstance(input_shape, (tuple, list)) or len(input_shape) != 3:
        raise ValueError(
            f"input_shape must be a per-sample (C, H, W) tuple (no batch size), got {input_shape!r}"
        )
    return tuple(chk.as_int(s, f"input_shape[{i}]", 1) for i, s in enumerate(input_shape))


def _rate(value, name) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


def _smallest_square(graph, channels, limit) -> int | None:
    """The smallest ``S`` for which ``graph`` accepts ``(channels, S, S)`` (None if none up to
    ``limit``). Only the symbolic graph is built: no weights, so this costs milliseconds."""

    def fits(size):
        try:
            graph(Input((channels, size, size)))
            return True
        except ValueError:
            return False

    if not fits(limit):
        return None
    lo, hi = 1, limit  # the output sizes only grow with the input, so validity is monotone
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def _build(name, graph, input_shape, seed, dtype, backend) -> Model:
    """Wire ``graph`` (a function of the symbolic input) and build the model; an input the
    architecture cannot take is refused naming the layer, before any weight is created."""
    try:
        inp = Input(input_shape)
        out = graph(inp)
    except ValueError as e:
        smallest = _smallest_square(graph, input_shape[0], max(512, *input_shape[1:]))
        hint = f"; the smallest square input it takes is {smallest}x{smallest}" if smallest else ""
        raise ValueError(f"{name}(input_shape={input_shape}): {e}{hint}") from None
    return Model(inp, out, seed=seed, backend=backend, dtype=dtype, name=name)


def _conv_relu(x, filters, k, stride=1, pad=0, name=None):
    return Conv2D(filters, k, stride=stride, padding=pad, activation="relu", name=name)(x)


def _conv_bn(x, filters, k, stride=1, pad=0, name="conv", bn_name="bn", eps=1e-5):
    """Convolution without bias, then BatchNorm (its beta is the bias). PyTorch's momentum 0.1
    is our 0.9 (the weight of the old moving statistics)."""
    x = Conv2D(filters, k, stride=stride, padding=pad, use_bias=False, name=name)(x)
    return BatchNorm2D(momentum=0.9, epsilon=eps, name=bn_name)(x)


# --- LeNet-5 ----------------------------------------------------------------------------------


def lenet5(
    num_classes=10, input_shape=None, *, activation="tanh", seed=None, dtype="float32",
    backend="cpu",
) -> Model:  # fmt: skip
    """LeNet-5 (LeCun, Bottou, Bengio and Haffner, 1998), for 32x32 grey images.

    C1 conv5x5(6) - S2 avg pool 2x2 - C3 conv5x5(16) - S4 avg pool 2x2 - C5 conv5x5(120) -
    F6 Dense(84) - output Dense(``num_classes``); 61,706 parameters for 10 classes. C5 is a
    convolution, as in the paper (on 32x32 inputs its output is 1x1, so it equals a Dense layer
    on the 400 features; on larger inputs it is still a convolution and F6 sees more features).

    Differences from the 1998 network: C3 connects to all six S2 maps (the paper's table 1
    wires each C3 map to 3-6 of them); S2/S4 are plain averages (the paper scales them by a
    trainable coefficient, adds a bias and squashes); the activation is ``tanh`` (the paper's
    is ``1.7159 tanh(2x/3)``) or ``"relu"``; the output is a Dense layer for the softmax
    cross-entropy, not the paper's Euclidean RBF units. MNIST's 28x28 digits are padded to
    32x32 in the paper: do so, or pass ``input_shape=(1, 28, 28)`` (C5 then fails: its input
    is 4x4, and the error says so).

    Parameters
    ----------
    num_classes : int
    input_shape : (C, H, W), default (1, 32, 32)
    activation : "tanh" or "relu"
    seed, dtype, backend
        As :class:`fastconv.nn.Model`.
    """
    if activation not in ("tanh", "relu"):
        raise ValueError(f"activation must be 'tanh' or 'relu', got {activation!r}")
    num_classes = chk.as_int(num_classes, "num_classes", 1)
    shape = _input_shape(input_shape, (1, 32, 32))
    relu = activation == "relu"
    # Glorot suits tanh, He suits ReLU.
    init = "he_normal" if relu else "glorot_normal"
    fused = "relu" if relu else None

    def act(x):
        return x if relu else Tanh()(x)

    def conv(x, filters, name):
        return act(Conv2D(filters, 5, activation=fused, kernel_initializer=init, name=name)(x))

    def graph(inp):
        x = AvgPool2D(2, name="s2")(conv(inp, 6, "c1"))
        x = AvgPool2D(2, name="s4")(conv(x, 16, "c3"))
        x = Flatten(name="flatten")(conv(x, 120, "c5"))
        x = act(Dense(84, activation=fused, kernel_initializer=init, name="f6")(x))
        return Dense(num_classes, kernel_initializer=init, name="output")(x)

    return _build("lenet5", graph, shape, seed, dtype, backend)


# --- AlexNet ----------------------------------------------------------------------------------


def alexnet(
    num_classes=1000, input_shape=None, *, dropout=0.5, seed=None, dtype="float32", backend="cpu"
) -> Model:
    """AlexNet as torchvision builds it (61,100,840 parameters for 1000 classes).

    conv11x11/4(64) - maxpool 3x3/2 - conv5x5(192) - maxpool - conv3x3(384) - conv3x3(256) -
    conv3x3(256) - maxpool - [dropout] Dense(4096) - [dropout] Dense(4096) - Dense(classes),
    ReLU after every convolution and the two hidden Dense layers (fused into them). This is the
    "one weird trick" variant (Krizhevsky 2014) that torchvision ships: 64/192 filters in the
    first two layers instead of the 2012 paper's 96/256, one tower instead of two GPUs, and no
    local response normalisation.

    ``input_shape``: torchvision pools the last feature map to 6x6 (``AdaptiveAvgPool2d``)
    whatever the input size; at 224x224 it already is 6x6 and that pooling is the identity, so
    it is left out here. With another ``input_shape`` the feature map is flattened as it is
    and ``fc6`` gets ``256 * h * w`` inputs (the parameter count changes accordingly). The
    smallest input is 63x63 (a 1x1 feature map).

    Parameters
    ----------
    num_classes : int
    input_shape : (C, H, W), default (3, 224, 224)
    dropout : float in [0, 1)
        Before fc6 and fc7 (torchvision's default 0.5); 0 for deterministic training.
    seed, dtype, backend
        As :class:`fastconv.nn.Model`.
    """
    num_classes = chk.as_int(num_classes, "num_classes", 1)
    rate = _rate(dropout, "dropout")
    shape = _input_shape(input_shape, (3, 224, 224))

    def graph(inp):
        x = _conv_relu(inp, 64, 11, 4, 2, "conv1")
        x = MaxPool2D(3, 2, name="pool1")(x)
        x = _conv_relu(x, 192, 5, 1, 2, "conv2")
        x = MaxPool2D(3, 2, name="pool2")(x)
        x = _conv_relu(x, 384, 3, 1, 1, "conv3")
        x = _conv_relu(x, 256, 3, 1, 1, "conv4")
        x = _conv_relu(x, 256, 3, 1, 1, "conv5")
        x = MaxPool2D(3, 2, name="pool5")(x)
        x = Flatten(name="flatten")(x)
        x = Dense(4096, activation="relu", name="fc6")(Dropout(rate, name="drop6")(x))
        x = Dense(4096, activation="relu", name="fc7")(Dropout(rate, name="drop7")(x))
        return Dense(num_classes, name="fc8")(x)

    return _build("alexnet", graph, shape, seed, dtype, backend)


# --- VGG-16 -----------------------------------------------------------------------------------

_VGG16 = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


def vgg16(
    num_classes=1000, input_shape=None, *, dropout=0.5, seed=None, dtype="float32", backend="cpu"
) -> Model:
    """VGG-16 (Simonyan and Zisserman 2014, configuration D) as torchvision builds it, without
    BatchNorm: 138,357,544 parameters for 1000 classes.

    Five stages of 3x3 convolutions (padding 1, fused ReLU; 2-2-3-3-3 layers of 64-128-256-
    512-512 filters), each followed by a 2x2 max pool, then Dense(4096) - [dropout] -
    Dense(4096) - [dropout] - Dense(classes), as torchvision (ReLU, then dropout).

    ``input_shape``: torchvision pools the last feature map to 7x7 (``AdaptiveAvgPool2d``);
    at 224x224 it is 7x7 already, so that pooling is the identity and is left out here. With
    another ``input_shape`` fc6 gets ``512 * (H/32) * (W/32)`` inputs (e.g. 512 at 32x32).
    The smallest input is 32x32.

    Building it creates 138M weights (553 MB in float32); measured 2-4 s on the development
    machine.
    """
    num_classes = chk.as_int(num_classes, "num_classes", 1)
    rate = _rate(dropout, "dropout")
    shape = _input_shape(input_shape, (3, 224, 224))

    def graph(inp):
        x = inp
        for stage, widths in enumerate(_VGG16, start=1):
            for i, filters in enumerate(widths, start=1):
                x = _conv_relu(x, filters, 3, 1, 1, f"conv{stage}_{i}")
            x = MaxPool2D(2, name=f"pool{stage}")(x)
        x = Flatten(name="flatten")(x)
        x = Dropout(rate, name="drop6")(Dense(4096, activation="relu", name="fc6")(x))
        x = Dropout(rate, name="drop7")(Dense(4096, activation="relu", name="fc7")(x))
        return Dense(num_classes, name="fc8")(x)

    return _build("vgg16", graph, shape, seed, dtype, backend)


# --- ResNet -----------------------------------------------------------------------------------


def _basic_block(x, filters, stride, prefix):
    """torchvision's BasicBlock: two 3x3 conv-BN, the first with ``stride``; a 1x1 conv-BN
    projection on the shortcut when the shape changes; ReLU after the sum."""
    shortcut = x
    y = _conv_bn(x, filters, 3, stride, 1, f"{prefix}.conv1", f"{prefix}.bn1")
    y = ReLU(name=f"{prefix}.relu1")(y)
    y = _conv_bn(y, filters, 3, 1, 1, f"{prefix}.conv2", f"{prefix}.bn2")
    if stride != 1 or x.shape[0] != filters:
        shortcut = _conv_bn(x, filters, 1, stride, 0, f"{prefix}.downsample.0",
                            f"{prefix}.downsample.1")  # fmt: skip
    y = Add(name=f"{prefix}.add")([y, shortcut])
    return ReLU(name=f"{prefix}.relu2")(y)


def _resnet(name, blocks, num_classes, input_shape, seed, dtype, backend) -> Model:
    num_classes = chk.as_int(num_classes, "num_classes", 1)
    shape = _input_shape(input_shape, (3, 224, 224))

    def graph(inp):
        x = _conv_bn(inp, 64, 7, 2, 3, "conv1", "bn1")
        x = ReLU(name="relu")(x)
        x = MaxPool2D(3, 2, padding=1, name="maxpool")(x)
        for stage, (filters, count) in enumerate(zip((64, 128, 256, 512), blocks, strict=True)):
            for b in range(count):
                stride = 2 if stage > 0 and b == 0 else 1
                x = _basic_block(x, filters, stride, f"layer{stage + 1}.{b}")
        x = GlobalAveragePooling2D(name="avgpool")(x)
        return Dense(num_classes, name="fc")(x)

    return _build(name, graph, shape, seed, dtype, backend)


def resnet18(
    num_classes=1000, input_shape=None, *, seed=None, dtype="float32", backend="cpu"
) -> Model:
    """ResNet-18 (He et al. 2015) as torchvision builds it: 11,689,512 parameters.

    conv7x7/2(64)-BN-ReLU - maxpool 3x3/2 pad 1 - four stages of two BasicBlocks (64, 128,
    256, 512 filters; the first block of stages 2-4 has stride 2 and a 1x1 conv-BN projection
    shortcut) - global average pooling - Dense(classes). Convolutions have no bias (BatchNorm's
    beta plays it); BatchNorm epsilon 1e-5, momentum 0.9 here = PyTorch's 0.1.

    Global average pooling takes any feature-map size, so ``input_shape`` changes no weight
    and any input size works (below 33x33 the last stage sees 1x1 feature maps).
    """
    return _resnet("resnet18", (2, 2, 2, 2), num_classes, input_shape, seed, dtype, backend)


def resnet34(
    num_classes=1000, input_shape=None, *, seed=None, dtype="float32", backend="cpu"
) -> Model:
    """ResNet-34 as torchvision builds it (BasicBlocks 3-4-6-3): 21,797,672 parameters.
    Otherwise as :func:`resnet18`."""
    return _resnet("resnet34", (3, 4, 6, 3), num_classes, input_shape, seed, dtype, backend)


# --- GoogLeNet --------------------------------------------------------------------------------

# name: (1x1, 3x3 reduce, 3x3, "5x5" reduce, "5x5" (a 3x3 in torchvision), pool projection)
_INCEPTION = {
    "3a": (64, 96, 128, 16, 32, 32),
    "3b": (128, 128, 192, 32, 96, 64),
    "4a": (192, 96, 208, 16, 48, 64),
    "4b": (160, 112, 224, 24, 64, 64),
    "4c": (128, 128, 256, 24, 64, 64),
    "4d": (112, 144, 288, 32, 64, 64),
    "4e": (256, 160, 320, 32, 128, 128),
    "5a": (256, 160, 320, 32, 128, 128),
    "5b": (384, 192, 384, 48, 128, 128),
}


def _basic_conv(x, filters, k, stride=1, pad=0, prefix=""):
    """torchvision's BasicConv2d: conv (no bias) - BatchNorm (epsilon 1e-3) - ReLU."""
    x = _conv_bn(x, filters, k, stride, pad, f"{prefix}.conv", f"{prefix}.bn", eps=1e-3)
    return ReLU(name=f"{prefix}.relu")(x)


def _inception(x, name):
    c1, r3, c3, r5, c5, pool_proj = _INCEPTION[name]
    p = f"inception{name}"
    b1 = _basic_conv(x, c1, 1, prefix=f"{p}.branch1")
    b2 = _basic_conv(x, r3, 1, prefix=f"{p}.branch2.0")
    b2 = _basic_conv(b2, c3, 3, 1, 1, prefix=f"{p}.branch2.1")
    b3 = _basic_conv(x, r5, 1, prefix=f"{p}.branch3.0")
    b3 = _basic_conv(b3, c5, 3, 1, 1, prefix=f"{p}.branch3.1")
    # torchvision: MaxPool2d(3, 1, 1, ceil_mode=True); at stride 1 ceil mode changes nothing.
    b4 = MaxPool2D(3, 1, padding=1, name=f"{p}.branch4.0")(x)
    b4 = _basic_conv(b4, pool_proj, 1, prefix=f"{p}.branch4.1")
    return Concatenate(axis=1, name=f"{p}.concat")([b1, b2, b3, b4])


def googlenet(
    num_classes=1000, input_shape=None, *, dropout=0.2, seed=None, dtype="float32", backend="cpu"
) -> Model:
    """GoogLeNet (Inception v1) as torchvision builds it with ``aux_logits=False``:
    6,624,904 parameters for 1000 classes.

    conv7x7/2(64) - maxpool 3x3/2 - conv1x1(64) - conv3x3(192) - maxpool - inception 3a, 3b -
    maxpool - 4a...4e - maxpool 2x2/2 - 5a, 5b - global average pooling - [dropout 0.2] -
    Dense(classes). Every max pool between stages is in ceil mode
    (``MaxPool2D(ceil_mode=True)``), as torchvision's, so 112 -> 56 -> 28 -> 14 -> 7 at 224x224.

    Differences from the 2014 paper (Szegedy et al.), all torchvision's: every convolution is
    followed by BatchNorm (epsilon 1e-3) and has no bias (the paper predates BatchNorm; that
    adds 2 parameters per channel and removes the biases); the "5x5" branch of each inception
    module is a 3x3 convolution (a known torchvision quirk kept for its pretrained weights), so
    the count is 6.6M rather than the paper's ~7M; no local response normalisation after the
    first two convolutions; no auxiliary classifiers (``aux_logits=False``); dropout 0.2
    instead of 0.4 before the classifier.

    Global average pooling takes any feature-map size: ``input_shape`` changes no weight.
    """
    num_classes = chk.as_int(num_classes, "num_classes", 1)
    rate = _rate(dropout, "dropout")
    shape = _input_shape(input_shape, (3, 224, 224))

    def graph(inp):
        x = _basic_conv(inp, 64, 7, 2, 3, prefix="conv1")
        x = MaxPool2D(3, 2, name="maxpool1", ceil_mode=True)(x)
        x = _basic_conv(x, 64, 1, prefix="conv2")
        x = _basic_conv(x, 192, 3, 1, 1, prefix="conv3")
        x = MaxPool2D(3, 2, name="maxpool2", ceil_mode=True)(x)
        x = _inception(_inception(x, "3a"), "3b")
        x = MaxPool2D(3, 2, name="maxpool3", ceil_mode=True)(x)
        for name in ("4a", "4b", "4c", "4d", "4e"):
            x = _inception(x, name)
        x = MaxPool2D(2, 2, name="maxpool4", ceil_mode=True)(x)
        x = _inception(_inception(x, "5a"), "5b")
        x = GlobalAveragePooling2D(name="avgpool")(x)
        return Dense(num_classes, name="fc")(Dropout(rate, name="dropout")(x))

    return _build("googlenet", graph, shape, seed, dtype, backend)


# --- MobileNetV2 -----------------------------------------------------------------------------

# (expansion t, output channels c, blocks n, first block's stride s), torchvision's table
_MOBILENET_V2 = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                 (6, 160, 3, 2), (6, 320, 1, 1))  # fmt: skip


def _conv_bn_relu6(x, filters, k, stride, prefix, depthwise=False):
    """torchvision's Conv2dNormActivation: conv (no bias, padding ``(k - 1) // 2``), BatchNorm
    (epsilon 1e-5), ReLU6; ``depthwise``: one group per channel."""
    pad = (k - 1) // 2
    if depthwise:
        x = DepthwiseConv2D(k, stride, pad, use_bias=False, name=f"{prefix}.0")(x)
    else:
        x = Conv2D(filters, k, stride=stride, padding=pad, use_bias=False, name=f"{prefix}.0")(x)
    x = BatchNorm2D(momentum=0.9, epsilon=1e-5, name=f"{prefix}.1")(x)
    return ReLU6(name=f"{prefix}.2")(x)


def _inverted_residual(x, out, stride, t, prefix):
    """torchvision's InvertedResidual: 1x1 expansion to ``t`` times the channels (none when
    ``t`` is 1), 3x3 depthwise with ``stride``, 1x1 linear projection (conv-BN, no
    activation); the input added back when the shape is kept (stride 1, as many channels)."""
    inp = x.shape[0]
    y, i = x, 0
    if t != 1:
        y = _conv_bn_relu6(y, inp * t, 1, 1, f"{prefix}.conv.0")
        i = 1
    y = _conv_bn_relu6(y, None, 3, stride, f"{prefix}.conv.{i}", depthwise=True)
    y = Conv2D(out, 1, use_bias=False, name=f"{prefix}.conv.{i + 1}")(y)
    y = BatchNorm2D(momentum=0.9, epsilon=1e-5, name=f"{prefix}.conv.{i + 2}")(y)
    if stride == 1 and inp == out:
        y = Add(name=f"{prefix}.add")([y, x])  # into the branch's output (the twin: in place)
    return y


def mobilenet_v2(
    num_classes=1000, input_shape=None, *, dropout=0.2, seed=None, dtype="float32", backend="cpu"
) -> Model:
    """MobileNetV2 (Sandler et al. 2018) as torchvision builds it (width multiplier 1.0):
    3,504,872 parameters for 1000 classes.

    ``features``: conv3x3/2(32)-BN-ReLU6, then 17 inverted residual blocks
    (t, c, n, s = 1,16,1,1 / 6,24,2,2 / 6,32,3,2 / 6,64,4,2 / 6,96,3,1 / 6,160,3,2 /
    6,320,1,1: the first block of each row has stride s; each block expands to t times its
    input channels with a 1x1 conv-BN-ReLU6, filters with a 3x3 depthwise conv-BN-ReLU6, and
    projects to c channels with a linear 1x1 conv-BN, the input added back where stride is 1
    and the channels agree), then conv1x1(1280)-BN-ReLU6; global average pooling -
    [dropout 0.2] - Dense(classes). Convolutions have no bias; BatchNorm epsilon 1e-5,
    momentum 0.9 here = PyTorch's 0.1. Layer names are torchvision's module paths
    (``features.3.conv.1.0`` is block 3's depthwise convolution).

    Global average pooling takes any feature-map size: ``input_shape`` changes no weight
    (from 32x32 down the feature maps are 1x1 at the end).
    """
    num_classes = chk.as_int(num_classes, "num_classes", 1)
    rate = _rate(dropout, "dropout")
    shape = _input_shape(input_shape, (3, 224, 224))

    def graph(inp):
        x = _conv_bn_relu6(inp, 32, 3, 2, "features.0")
        index = 1
        for t, c, n, s in _MOBILENET_V2:
            for i in range(n):
                x = _inverted_residual(x, c, s if i == 0 else 1, t, f"features.{index}")
                index += 1
        x = _conv_bn_relu6(x, 1280, 1, 1, f"features.{index}")
        x = GlobalAveragePooling2D(name="avgpool")(x)
        x = Dropout(rate, name="classifier.0")(x)
        return Dense(num_classes, name="classifier.1")(x)

    return _build("mobilenet_v2", graph, shape, seed, dtype, backend)


# --- MNIST models -----------------------------------------------------------------------------


def deep_mnist_net(seed=None, *, dtype="float32", backend="cpu") -> Sequential:
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
        backend=backend,
        dtype=dtype,
        name="deep_mnist_net",
        input_shape=(1, 28, 28),
    )


def resnet_mnist(
    num_classes=10, input_shape=None, *, seed=None, dtype="float32", backend="cpu"
) -> Model:
    """A small residual net for 28x28 digits: 77,754 parameters for 10 classes.

    conv3x3(16)-BN-ReLU, then three BasicBlocks as in :func:`resnet18` (16 filters at 28x28,
    32 at 14x14 and 64 at 7x7, each downsampling block with a 1x1 projection shortcut), global
    average pooling and Dense(classes). The ResNet-18 building blocks at MNIST's scale: a
    training step at batch 100 costs about as much as the deep MNIST net's.
    """
    num_classes = chk.as_int(num_classes, "num_classes", 1)
    shape = _input_shape(input_shape, (1, 28, 28))

    def graph(inp):
        x = _conv_bn(inp, 16, 3, 1, 1, "conv1", "bn1")
        x = ReLU(name="relu")(x)
        x = _basic_block(x, 16, 1, "layer1.0")
        x = _basic_block(x, 32, 2, "layer2.0")
        x = _basic_block(x, 64, 2, "layer3.0")
        x = GlobalAveragePooling2D(name="avgpool")(x)
        return Dense(num_classes, name="fc")(x)

    return _build("resnet_mnist", graph, shape, seed, dtype, backend)


# --- registry ---------------------------------------------------------------------------------

#: command-line name -> builder (``fastconv profile --model NAME``)
MODELS = {
    "lenet5": lenet5,
    "alexnet": alexnet,
    "vgg16": vgg16,
    "resnet18": resnet18,
    "resnet34": resnet34,
    "googlenet": googlenet,
    "mobilenet_v2": mobilenet_v2,
    "deep-mnist": deep_mnist_net,
    "resnet-mnist": resnet_mnist,
}


def get_model(name: str, **kwargs) -> Model:
    """Build the zoo model ``name`` (a key of :data:`MODELS`) with the builder's arguments."""
    if name not in MODELS:
        raise ValueError(f"name must be one of {sorted(MODELS)}, got {name!r}")
    return MODELS[name](**kwargs)


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
