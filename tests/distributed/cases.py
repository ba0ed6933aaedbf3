"""Models, data and training runs shared by the MPI scripts and tests/nn/test_distributed.py.

The scripts run a case under ``mpiexec -n 2`` with :class:`fastconv.nn.MPIDataParallel`; the
test runs the same case in one plain process (which never imports MPI) as the oracle.
"""

from __future__ import annotations

import json

import numpy as np

from fastconv import nn

SHAPE = (1, 10, 10)
CLASSES = 4


def data(n=64, seed=5):
    """Learnable synthetic images: the class decides which quadrant is brighter."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    x = rng.normal(0.0, 0.5, (n, *SHAPE)).astype(np.float32)
    for i, c in enumerate(y):
        r, q = divmod(int(c), 2)
        x[i, 0, r * 5 : r * 5 + 5, q * 5 : q * 5 + 5] += 1.0
    return x, y


def plain_model(seed=0, units=16, dropout=0.0):
    layers = [
        nn.Conv2D(4, 3, padding=1, activation="relu"),
        nn.MaxPool2D(2),
        nn.Flatten(),
        nn.Dense(units),
        nn.ReLU(),
    ]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Dense(CLASSES))
    return nn.Sequential(layers, seed=seed, input_shape=SHAPE)


def l2_model(seed=0):
    """Weight penalties: added once, after the ranks' gradients are summed (added per rank
    before the sum, they would count twice)."""
    return nn.Sequential(
        [
            nn.Conv2D(4, 3, padding=1, activation="relu", kernel_regularizer=nn.L2(0.01)),
            nn.MaxPool2D(2),
            nn.Flatten(),
            nn.Dense(16, kernel_regularizer=nn.L2(0.01), bias_regularizer=nn.L1(0.001)),
            nn.ReLU(),
            nn.Dense(CLASSES),
        ],
        seed=seed,
        input_shape=SHAPE,
    )


def bn_model(seed=0):
    return nn.Sequential(
        [
            nn.Conv2D(4, 3, padding=1, use_bias=False),
            nn.BatchNorm2D(),
            nn.ReLU(),
            nn.MaxPool2D(2),
            nn.Flatten(),
            nn.Dense(8),
            nn.BatchNorm1D(),
            nn.ReLU(),
            nn.Dense(CLASSES),
        ],
        seed=seed,
        input_shape=SHAPE,
    )


# name -> (model builder, batch size, epochs, model dtype, sync_batch_norm). Training: Momentum
# SGD (its differences scale with the gradients' rounding; Adam's sign-like steps near zero
# gradients would amplify them).
CASES = {
    "plain": (plain_model, 16, 2, "float32", False),
    "uneven": (plain_model, 11, 2, "float32", False),  # shares 5/6 of 11; last batch 9 (4/5)
    "sync_bn": (bn_model, 16, 2, "float32", True),
    "half": (plain_model, 16, 2, "float16", False),
    "l2_top2": (l2_model, 16, 2, "float32", False),  # penalties, and a metric beyond accuracy
}


def train(case, strategy=None, epochs=None):
    """Train ``case`` from seed 0; returns (weights, history dict)."""
    build, batch, default_epochs, dtype, _ = CASES[case]
    model = build(seed=0)
    if dtype != "float32":
        model = model.to(dtype=dtype)
    model.compile(nn.Momentum(lr=0.05), metrics=["accuracy", nn.metrics.TopKAccuracy(2)])
    x, y = data()
    xv, yv = data(n=20, seed=6)
    hist = model.fit(
        x,
        y,
        epochs=epochs or default_epochs,
        batch_size=batch,
        validation_data=(xv, yv),
        verbose=0,
        strategy=strategy,
    )
    return model.get_weights(), hist.history


def save(path, weights, history):
    arrays = {f"arr_{i}": w for i, w in enumerate(weights)}
    np.savez(path, history=np.array(json.dumps(history)), **arrays)


def load(path):
    with np.load(path, allow_pickle=False) as f:
        weights = [f[f"arr_{i}"] for i in range(len(f.files) - 1)]
        return weights, json.loads(str(f["history"]))
