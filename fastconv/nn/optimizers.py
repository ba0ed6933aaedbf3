"""Optimizers with the update rules of the book's ``common/optimizer.py``.

``step(params, grads)`` updates the parameter arrays in place. State (velocities, moments) is
float32. For float16 parameters a float32 master copy is kept and updated, then rounded into the
half parameter, so small updates are not lost to half rounding. Training is meant to run in
float32; float16 is for inference through ``Sequential.to(dtype="float16")``.
"""

from __future__ import annotations

import numbers

import numpy as np

from .. import ops
from ..device import device_of
from .backend import array_module

__all__ = [
    "Optimizer", "SGD", "Momentum", "Nesterov", "AdaGrad", "RMSProp", "Adam", "AdamW", "get",
]  # fmt: skip

_EPS = 1e-7  # the book's epsilon, added to sqrt(h) in AdaGrad/RMSProp/Adam
# Updates run in float32 (the state, the master copies): a hyper-parameter must be a finite,
# and where it must be nonzero a nonzero, float32. Adam(lr=1e39) was accepted and became inf.
_F32 = np.finfo(np.float32)
_F32_MAX = float(_F32.max)  # a Python float: comparing with the NumPy scalar casts to float32


def _positive(value, name):
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not ok or not 0 < value <= _F32_MAX or float(np.float32(value)) == 0.0:
        raise ValueError(
            f"{name} must be a positive finite number (in float32, where updates run: "
            f"{_F32.smallest_subnormal:.3g} to {_F32.max:.3g}), got {value!r}"
        )
    return float(value)


def _unit(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    if np.float32(value) == 1:  # 1 - value would be 0 in the float32 update
        raise ValueError(f"{name} must be a number in [0, 1) that float32 does not round to 1, "
                         f"got {value!r}")  # fmt: skip
    return float(value)


class Optimizer:
    """Base class: validates, keeps float32 state per parameter, calls ``_step``.

    Parameters are identified by keys (a model passes ``"layer_name/weight_name"``; plain lists
    get ``"0"``, ``"1"``...), so the state of a parameter survives freezing and unfreezing other
    layers. Subclasses implement ``_step(state, p, g)``: ``state`` maps each name in ``slots`` to
    that parameter's float32 array, ``p`` is the float32 parameter (itself, or its master copy
    for float16 parameters) and ``g`` its float32 gradient; it updates ``p`` in place.
    """

    #: names of the per-parameter state arrays (for checkpoints)
    slots: tuple = ()

    def __init__(self, lr):
        self.lr = lr
        self.iterations = 0
        self.state: dict[str, dict] = {}  # key -> {slot: float32 array}
        self._master: dict = {}  # key -> float32 master copy of a non-float32 parameter

    @property
    def lr(self) -> float:
        return self._lr

    @lr.setter
    def lr(self, value):
        self._lr = _positive(value, "lr")

    def get_config(self) -> dict:
        return {"lr": self.lr}

    def _state_for(self, key, p) -> dict:
        state = self.state.get(key)
        if state is None or any(tuple(a.shape) != tuple(p.shape) for a in state.values()):
            xp = array_module(p)
            state = {name: xp.zeros(p.shape, dtype=np.float32) for name in self.slots}
            self.state[key] = state
        return state

    def _master_for(self, key, p):
        if p.dtype == np.float32:
            return None
        master = self._master.get(key)
        if master is None or tuple(master.shape) != tuple(p.shape):
            master = self._master[key] = p.astype(np.float32)
        return master

    def step(self, params: list, grads: list, keys: list | None = None) -> None:
        """Update every array in ``params`` in place from the matching ``grads``."""
        if len(params) != len(grads):
            raise ValueError(
                f"params and grads must have the same length, got {len(params)} and {len(grads)}"
            )
        if keys is None:
            keys = [str(i) for i in range(len(params))]
        elif len(keys) != len(params):
            raise ValueError(f"keys must have {len(params)} entries, got {len(keys)}")
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            if tuple(p.shape) != tuple(g.shape):
                raise ValueError(
                    f"grads[{i}] must have shape {tuple(p.shape)} like params[{i}], "
                    f"got {tuple(g.shape)}"
                )
        self.iterations += 1
        self._begin_step()
        for key, p, g in zip(keys, params, grads, strict=True):
            g32 = g if g.dtype == np.float32 else g.astype(np.float32)
            state = self._state_for(key, p)
            master = self._master_for(key, p)
            if master is None:
                self._step(state, p, g32)
            else:
                self._step(state, master, g32)
                p[...] = master

    def _begin_step(self):
        pass

    def sync(self, params: list, keys: list | None = None) -> None:
        """Refresh the float32 master copies after the parameters were overwritten."""
        keys = keys or [str(i) for i in range(len(params))]
        for key, p in zip(keys, params, strict=True):
            if key in self._master:
                self._master[key][...] = p

    def _step(self, state, p, g):
        raise NotImplementedError

    # -- checkpointing --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Flat ``{"iterations": ..., "<slot>/<key>": array, "master/<key>": array}``
        (float32 NumPy arrays)."""
        from .backend import to_numpy

        out = {"iterations": np.array(self.iterations, dtype=np.int64)}
        for key, state in self.state.items():
            for name, a in state.items():
                out[f"{name}/{key}"] = to_numpy(a)
        for key, m in self._master.items():
            out[f"master/{key}"] = to_numpy(m)
        return out

    def load_state_dict(self, state: dict, params: list, keys: list | None = None) -> None:
        """Restore :meth:`state_dict` output for ``params`` (which fix shapes and backend).

        Raises ValueError when an entry is missing or has another shape than its parameter.
        """
        keys = keys or [str(i) for i in range(len(params))]
        if "iterations" not in state:
            raise ValueError("optimizer state is missing 'iterations'")
        iterations = int(np.asarray(state["iterations"]))
        if iterations < 0:
            raise ValueError(f"optimizer iterations must be >= 0, got {iterations}")
        self.state, self._master = {}, {}
        for key, p in zip(keys, params, strict=True):
            if iterations == 0:
                break
            slots = self._state_for(key, p)
            for name in self.slots:
                entry = f"{name}/{key}"
                if entry not in state:
                    raise ValueError(f"optimizer state is missing {entry!r}")
                _check_state_shape(state[entry], p, entry)
                slots[name][...] = _to_like(state[entry], p)
            master = self._master_for(key, p)
            if master is not None and f"master/{key}" in state:
                _check_state_shape(state[f"master/{key}"], p, f"master/{key}")
                master[...] = _to_like(state[f"master/{key}"], p)
        self.iterations = iterations

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


def _check_state_shape(a, p, entry):
    if tuple(np.shape(a)) != tuple(p.shape):
        raise ValueError(
            f"optimizer state {entry!r} must have shape {tuple(p.shape)}, got {tuple(np.shape(a))}"
        )


def _to_like(a, p):
    return device_of(p).asarray(a, np.float32)


class SGD(Optimizer):
    """``p -= lr * g``."""

    def __init__(self, lr=0.01):
        super().__init__(lr)

    def _step(self, state, p, g):
        ops.sgd_update(p, g, self.lr)  # fused on the CPU, bit-identical to the expression


class Momentum(Optimizer):
    """``v = momentum*v - lr*g;  p += v``."""

    slots = ("v",)

    def __init__(self, lr=0.01, momentum=0.9):
        super().__init__(lr)
        self.momentum = _unit(momentum, "momentum")

    def get_config(self):
        return {"lr": self.lr, "momentum": self.momentum}

    def _step(self, state, p, g):
        ops.momentum_update(p, g, state["v"], self.momentum, self.lr)


class Nesterov(Momentum):
    """The book's Nesterov form: ``v = momentum*v - lr*g;
    p += momentum*momentum*v - (1+momentum)*lr*g``."""

    def _step(self, state, p, g):
        ops.nesterov_update(p, g, state["v"], self.momentum, self.lr)


class AdaGrad(Optimizer):
    """``h += g*g;  p -= lr * g / (sqrt(h) + 1e-7)``."""

    slots = ("h",)

    def __init__(self, lr=0.01):
        super().__init__(lr)

    def _step(self, state, p, g):
        ops.adagrad_update(p, g, state["h"], self.lr, _EPS)


class RMSProp(Optimizer):
    """``h = decay_rate*h + (1-decay_rate)*g*g;  p -= lr * g / (sqrt(h) + 1e-7)``."""

    slots = ("h",)

    def __init__(self, lr=0.01, decay_rate=0.99):
        super().__init__(lr)
        self.decay_rate = _unit(decay_rate, "decay_rate")

    def get_config(self):
        return {"lr": self.lr, "decay_rate": self.decay_rate}

    def _step(self, state, p, g):
        ops.rmsprop_update(p, g, state["h"], self.decay_rate, self.lr, _EPS)


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

    def _step(self, state, p, g):
        # One fused pass on the CPU (fastconv.cpu.optim), bit-identical to the expressions.
        ops.adam_update(p, g, state["m"], state["v"], self.beta1, self.beta2, self._lr_t, _EPS)


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter, 2019), PyTorch's ``AdamW``
    order: first ``p -= lr * weight_decay * p`` (``lr`` the current, possibly scheduled, rate),
    then the Adam step above. Unlike an L2 penalty, the decay is not rescaled by Adam's
    per-weight step sizes. Applied to every trainable weight (biases and BatchNorm's gamma and
    beta included), as PyTorch does by default.
    """

    def __init__(self, lr=0.001, beta1=0.9, beta2=0.999, weight_decay=0.01):
        ok = isinstance(weight_decay, numbers.Real) and not isinstance(weight_decay, bool)
        if not ok or not 0 <= weight_decay <= _F32_MAX:
            raise ValueError(
                f"weight_decay must be a finite number >= 0 (in float32), got {weight_decay!r}"
            )
        self.weight_decay = float(weight_decay)
        super().__init__(lr, beta1, beta2)

    @Optimizer.lr.setter
    def lr(self, value):
        # The decay factor 1 - lr * weight_decay is a float32 too (also for scheduled rates).
        lr = _positive(value, "lr")
        if not abs(1.0 - lr * self.weight_decay) <= _F32_MAX:
            raise ValueError(
                f"lr * weight_decay must be finite in float32, got lr={lr!r} and "
                f"weight_decay={self.weight_decay!r}"
            )
        self._lr = lr

    def get_config(self):
        return {**super().get_config(), "weight_decay": self.weight_decay}

    def _step(self, state, p, g):
        if self.weight_decay:
            p *= np.float32(1.0 - self.lr * self.weight_decay)
        super()._step(state, p, g)


OPTIMIZER_CLASSES = {
    cls.__name__: cls for cls in (SGD, Momentum, Nesterov, AdaGrad, RMSProp, Adam, AdamW)
}
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
