"""Keras-like layers, losses, optimizers, callbacks and the ``Sequential`` model."""

from . import initializers
from .callbacks import (
    Callback,
    CSVLogger,
    EarlyStopping,
    History,
    JSONLogger,
    LearningRateScheduler,
    ModelCheckpoint,
)
from .layers import AvgPool2D, Conv2D, Dense, Dropout, Flatten, Layer, MaxPool2D, ReLU
from .losses import SoftmaxCrossEntropy
from .model import Sequential, load_model
from .optimizers import SGD, AdaGrad, Adam, Momentum, Nesterov, Optimizer, RMSProp

__all__ = [
    "initializers",
    "Layer",
    "Conv2D",
    "MaxPool2D",
    "AvgPool2D",
    "Dense",
    "ReLU",
    "Dropout",
    "Flatten",
    "SoftmaxCrossEntropy",
    "Optimizer",
    "SGD",
    "Momentum",
    "Nesterov",
    "AdaGrad",
    "RMSProp",
    "Adam",
    "Sequential",
    "load_model",
    "Callback",
    "History",
    "ModelCheckpoint",
    "EarlyStopping",
    "LearningRateScheduler",
    "CSVLogger",
    "JSONLogger",
]
