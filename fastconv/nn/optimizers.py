"""Optimizers with the update rules of the book's ``common/optimizer.py``.

``step(params, grads)`` updates the parameter arrays in place. State (velocities, moments) is
float32. For float16 parameters a float32 master copy is kept and updated, then rounded into the
half parameter, so small updates are not lost to half rounding. Training is meant to run in
float32; float16 is for inference through ``Sequential.to(dtype="float16")``.
"""

from __future__ import annotations

import numbers

import numpy as np

from ._xp import array_module

__all__ = ["Optimizer", "SGD", "Momentum", "Nesterov", "AdaGrad", "RMSProp", "Adam", "get"]

_EPS = 1e-7  # the book's epsilon, added to sqrt(h) in AdaGrad/RMSProp/Adam


def _positive(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def _unit(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


class Optimizer:
    """Base class: validates, keeps float32 state per parameter slot, calls ``_step``.

    Subclasses implement ``_step(i, p, g)`` where ``p`` is the float32 parameter (the
    parameter itself, or its master copy for float16 parameters) and ``g`` its float32 gradient,
    updating ``p`` in place.
    """

    #: names of the per-parameter state arrays (for checkpoints)
    slots: tuple = ()

    def __init__(self, lr):
        self.lr = _positive(lr, "lr")
        self.iterations = 0
        self.state: dict[str, list] = {name: [] for name in self.slots}
        self._master: list = []

    def get_config(self) -> dict:
        return {"lr": self.lr}

    def _init_state(self, params):
        for name in self.slots:
            self.state[name] = [array_module(p).zeros(p.shape, dtype=np.float32) for p in params]
        self._master = [p.astype(np.float32) if p.dtype != np.float32 else None for p in params]

    def step(self, params: list, grads: list) -> None:
        """Update every array in ``params`` in place from the matching ``grads``."""
        if len(params) != len(grads):
            raise ValueError(
                f"params and grads must have the same length, got {len(params)} and {len(grads)}"
            )
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            if tuple(p.shape) != tuple(g.shape):
                raise ValueError(
                    f"grads[{i}] must have shape {tuple(p.shape)} like params[{i}], "
                    f"got {tuple(g.shape)}"
                )
        if self.iterations == 0 or len(self._master) != len(params):
            self._init_state(params)
        self.iterations += 1
        self._begin_step()
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            g32 = g if g.dtype == np.float32 else g.astype(np.float32)
            master = self._master[i]
            if master is None:
                self._step(i, p, g32)
            else:
                self._step(i, master, g32)
                p[...] = master

    def _begin_step(self):
        pass

    def sync(self, params: list) -> None:
        """Refresh the float32 master copies after the parameters were overwritten."""
        for i, p in enumerate(params[: len(self._master)]):
            if self._master[i] is not None:
                self._master[i][...] = p

    def _step(self, i, p, g):
        raise NotImplementedError

    # -- checkpointing --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Flat ``{key: array}`` of the state (float32 NumPy arrays) plus the iteration count."""
        from ._xp import to_numpy

        out = {"iterations": np.array(self.iterations, dtype=np.int64)}
        for name, arrays in self.state.items():
            for i, a in enumerate(arrays):
                out[f"{name}/{i}"] = to_numpy(a)
        for i, m in enumerate(self._master):
            if m is not None:
                out[f"master/{i}"] = to_numpy(m)
        return out

    def load_state_dict(self, state: dict, params: list) -> None:
        """Restore :meth:`state_dict` output for ``params`` (which fixes shapes and backend)."""
        self._init_state(params)
        self.iterations = int(state["iterations"])
        for name in self.slots:
            for i, p in enumerate(params):
                key = f"{name}/{i}"
                if key not in state:
                    raise ValueError(f"optimizer state is missing {key!r}")
                self.state[name][i][...] = _to_like(state[key], p)
        for i, p in enumerate(params):
            key = f"master/{i}"
            if self._master[i] is not None:
                self._master[i][...] = _to_like(state[key], p) if key in state else p

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


def _to_like(a, p):
    from .._checks import is_cupy_array

    if is_cupy_array(p):
        import cupy

        return cupy.asarray(a, dtype=np.float32)
    return np.asarray(a, dtype=np.float32)


class SGD(Optimizer):
    """``p -= lr * g``."""

    def __init__(self, lr=0.01):
        super().__init__(lr)

    def _step(self, i, p, g):
        p -= np.float32(self.lr) * g


class Momentum(Optimizer):
    """``v = momentum*v - lr*g;  p += v``."""

    slots = ("v",)

    def __init__(self, lr=0.01, momentum=0.9):
        super().__init__(lr)
        self.momentum = _unit(momentum, "momentum")

    def get_config(self):
        return {"lr": self.lr, "momentum": self.momentum}

    def _step(self, i, p, g):
        v = self.state["v"][i]
        v *= np.float32(self.momentum)
        v -= np.float32(self.lr) * g
        p += v


class Nesterov(Momentum):
    """The book's Nesterov form: ``v = momentum*v - lr*g;
    p += momentum*momentum*v - (1+momentum)*lr*g``."""

    def _step(self, i, p, g):
        m, lr = np.float32(self.momentum), np.float32(self.lr)
        v = self.state["v"][i]
        v *= m
        v -= lr * g
        p += (m * m) * v
        p -= ((1 + m) * lr) * g


class AdaGrad(Optimizer):
    """``h += g*g;  p -= lr * g / (sqrt(h) + 1e-7)``."""

    slots = ("h",)

    def __init__(self, lr=0.01):
        super().__init__(lr)

    def _step(self, i, p, g):
        h = self.state["h"][i]
        h += g * g
        xp = array_module(p)
        p -= np.float32(self.lr) * g / (xp.sqrt(h) + np.float32(_EPS))


class RMSProp(Optimizer):
    """``h = decay_rate*h + (1-decay_rate)*g*g;  p -= lr * g / (sqrt(h) + 1e-7)``."""

    slots = ("h",)

    def __init__(self, lr=0.01, decay_rate=0.99):
        super().__init__(lr)
        self.decay_rate = _unit(decay_rate, "decay_rate")

    def get_config(self):
        return {"lr": self.lr, "decay_rate": self.decay_rate}

    def _step(self, i, p, g):
        h = self.state["h"][i]
        d = np.float32(self.decay_rate)
        h *= d
        h += (1 - d) * g * g
        xp = array_module(p)
        p -= np.float32(self.lr) * g / (xp.sqrt(h) + np.float32(_EPS))


class Adam(Optimizer):
    """The book's Adam: at step t (from 1),
    ``lr_t = lr * sqrt(1 - beta2**t) / (1 - beta1**t);  m += (1-beta1)*(g - m);
    v += (1-beta2)*(g*g - v);  p -= lr_t * m / (sqrt(v) + 1e-7)``."""

    slots = ("m", "v")

    def __init__(self, lr=0.001, beta1=0.9, beta2=0.999):
        super().__init__(lr)
        self.beta1 = _unit(beta1, "beta1")
        self.beta2 = _unit(beta2, "beta2")

    def get_config(self):
        return {"lr": self.lr, "beta1": self.beta1, "beta2": self.beta2}

    def _begin_step(self):
        t = self.iterations
        self._lr_t = np.float32(self.lr * np.sqrt(1.0 - self.beta2**t) / (1.0 - self.beta1**t))

    def _step(self, i, p, g):
        xp = array_module(p)
        m, v = self.state["m"][i], self.state["v"][i]
        m += np.float32(1 - self.beta1) * (g - m)
        v += np.float32(1 - self.beta2) * (g * g - v)
        p -= self._lr_t * m / (xp.sqrt(v) + np.float32(_EPS))


OPTIMIZER_CLASSES = {cls.__name__: cls for cls in (SGD, Momentum, Nesterov, AdaGrad, RMSProp, Adam)}
_BY_NAME = {name.lower(): cls for name, cls in OPTIMIZER_CLASSES.items()}


def get(optimizer, **kwargs):
    """An optimizer from a name (``"adam"``, ``"sgd"``, ...; extra kwargs go to it) or as is."""
    if isinstance(optimizer, str):
        try:
            return _BY_NAME[optimizer.lower()](**kwargs)
        except KeyError:
            raise ValueError(
                f"optimizer must be one of {sorted(_BY_NAME)}, got {optimizer!r}"
            ) from None
    if isinstance(optimizer, Optimizer):
        return optimizer
    raise TypeError(f"optimizer must be a name or an Optimizer, got {optimizer!r}")
