"""Layers. Each follows the contract of :mod:`fastconv.nn.layers.base`."""

from .activation import ReLU, Sigmoid, Softmax, Tanh
from .base import LAYER_CLASSES, Layer, WeightSpec, register_layer
from .conv import Conv2D
from .core import Dense, DropConnectDense, Dropout, Flatten
from .merge import Add, Concatenate
from .normalization import BatchNorm1D, BatchNorm2D
from .pooling import AvgPool2D, GlobalAveragePooling2D, MaxPool2D

__all__ = [
    "Layer",
    "WeightSpec",
    "register_layer",
    "LAYER_CLASSES",
    "Conv2D",
    "MaxPool2D",
    "AvgPool2D",
    "GlobalAveragePooling2D",
    "BatchNorm2D",
    "BatchNorm1D",
    "Dense",
    "DropConnectDense",
    "Dropout",
    "Flatten",
    "ReLU",
    "Sigmoid",
    "Tanh",
    "Softmax",
    "Add",
    "Concatenate",
]
