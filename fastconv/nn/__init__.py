"""Keras-like layers, models (functional ``Model`` and ``Sequential``), losses, optimizers,
callbacks and checkpoints."""

from . import initializers, layers, metrics, regularizers
from .backend import Backend
from .callbacks import (
    Callback,
    CosineDecay,
    CSVLogger,
    EarlyStopping,
    ExponentialDecay,
    History,
    JSONLogger,
    LearningRateScheduler,
    LRSchedule,
    ModelCheckpoint,
    ProgressLogger,
    ReduceLROnPlateau,
    ResumableCheckpoint,
    StepDecay,
    TerminateOnNaN,
)
from .data import BackgroundBatches
from .distributed import DistributedError, DistributedSetupError, MPIDataParallel
from .ensemble import Ensemble
from .graph import Input, SymbolicTensor
from .layers import *  # noqa: F403  (every layer: layers.__all__)
from .loading import load_model
from .losses import BinaryCrossEntropy, MeanSquaredError, SoftmaxCrossEntropy
from .model import Hook, Model, Sequential
from .optimizers import SGD, AdaGrad, Adam, AdamW, Momentum, Nesterov, Optimizer, RMSProp
from .regularizers import L1, L1L2, L2
from .saving import CheckpointError

__all__ = [
    "initializers",
    "Backend",
    "Input",
    "SymbolicTensor",
    "Model",
    "Sequential",
    "Hook",
    *layers.__all__,
    "SoftmaxCrossEntropy",
    "BinaryCrossEntropy",
    "MeanSquaredError",
    "metrics",
    "regularizers",
    "L1",
    "L2",
    "L1L2",
    "Ensemble",
    "BackgroundBatches",
    "Optimizer",
    "SGD",
    "Momentum",
    "Nesterov",
    "AdaGrad",
    "RMSProp",
    "Adam",
    "AdamW",
    "load_model",
    "CheckpointError",
    "Callback",
    "History",
    "ModelCheckpoint",
    "ResumableCheckpoint",
    "EarlyStopping",
    "ProgressLogger",
    "LearningRateScheduler",
    "CSVLogger",
    "JSONLogger",
    "TerminateOnNaN",
    "MPIDataParallel",
    "DistributedError",
    "DistributedSetupError",
    "LRSchedule",
    "StepDecay",
    "ExponentialDecay",
    "CosineDecay",
    "ReduceLROnPlateau",
]
