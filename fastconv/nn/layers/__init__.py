"""Layers. Each follows the contract of :mod:`fastconv.nn.layers.base`; each module's
``__all__`` lists its layers, so a new layer is exported from its own module alone."""

from . import activation, conv, core, merge, normalization, pooling
from .activation import *  # noqa: F403
from .base import LAYER_CLASSES, Layer, WeightSpec, register_layer
from .conv import *  # noqa: F403
from .core import *  # noqa: F403
from .merge import *  # noqa: F403
from .normalization import *  # noqa: F403
from .pooling import *  # noqa: F403

__all__ = [
    "Layer",
    "WeightSpec",
    "register_layer",
    "LAYER_CLASSES",
    *conv.__all__,
    *pooling.__all__,
    *normalization.__all__,
    *core.__all__,
    *activation.__all__,
    *merge.__all__,
]
