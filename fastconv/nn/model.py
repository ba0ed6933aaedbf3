"""``Sequential``: a stack of layers with Keras-like training, evaluation and checkpoints.

Checkpoints are ``.npz`` files read with ``allow_pickle=False``: an ``__architecture__`` JSON
string (layer class names and constructor configs, per-sample input shape, dtype), the weights
as ``weights/000``, ``weights/001``, ... (layer order, W then b), and optionally the optimizer
(``__optimizer__`` JSON plus ``optimizer/<slot>/<i>`` arrays) and a ``__meta__`` JSON (epoch,
random generator state, user extras) for resuming. Writes go to a temporary file in the same
directory that is renamed over the target, so a crash never leaves a truncated checkpoint.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import time

import numpy as np

from .. import _checks as chk
from . import losses as losses_mod
from . import optimizers as optimizers_mod
from ._xp import array_module, check_backend, check_dtype, to_backend, to_numpy
from .callbacks import Callback, History
from .layers import LAYER_CLASSES, Layer

__all__ = ["Sequential", "load_model"]

FORMAT = "fastconv.Sequential"
FORMAT_VERSION = 1


def _snake(name: str) -> str:
    """ "MaxPool2D" -> "max_pool2d", "ReLU" -> "relu"."""
    name = name.replace("ReLU", "Relu")
    out = []
    for i, ch in enumerate(name):
        if ch.isupper() and i and name[i - 1].islower():
            out.append("_")
        out.append(ch.lower())
    return "".join(out)


class Sequential:
    """A linear stack of layers.

    Parameters
    ----------
    layers : list of Layer
    seed : int, optional
        Seeds weight initialisation, shuffling and dropout (one :class:`numpy.random.Generator`).
    backend : "cpu" or "gpu"
    dtype : "float32" or "float16"
        Training is meant for float32; float16 models are for inference (see :meth:`to`).
    """

    def __init__(self, layers=(), seed=None, backend="cpu", dtype="float32", name="sequential"):
        self.layers: list[Layer] = []
        self.backend = check_backend(backend)
        self.dtype = check_dtype(dtype)
        self.name = name
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.loss = None
        self.optimizer = None
        self.metrics: list[str] = []
        self.input_shape: tuple | None = None
        self.built = False
        self.stop_training = False
        for layer in layers:
            self.add(layer)

    # -- structure ------------------------------------------------------------------------------
    def add(self, layer: Layer) -> None:
        if not isinstance(layer, Layer):
            raise TypeError(f"layers must be fastconv.nn Layer objects, got {type(layer).__name__}")
        if self.built:
            raise RuntimeError("cannot add layers to a model that is already built")
        names = {existing.name for existing in self.layers}
        if layer.name in names or layer.name == type(layer).__name__.lower():
            base = _snake(type(layer).__name__)
            k = sum(type(e) is type(layer) for e in self.layers) + 1
            while f"{base}_{k}" in names:
                k += 1
            layer.name = f"{base}_{k}"
        layer.rng = self.rng
        self.layers.append(layer)

    def build(self, input_shape) -> None:
        """Build every layer for per-sample ``input_shape`` (e.g. ``(1, 28, 28)``)."""
        if not self.layers:
            raise ValueError("the model has no layers")
        shape = tuple(chk.as_int(s, "input_shape entries", 1) for s in input_shape)
        self.input_shape = shape
        for layer in self.layers:
            if not layer.built:
                layer.build(shape)
                for key, value in layer.params.items():
                    layer.params[key] = to_backend(value, self.backend, self.dtype)
            shape = layer.output_shape(shape)
        self.output_shape = shape
        self.built = True

    def _ensure_built(self, x):
        if not self.built:
            self.build(x.shape[1:])

    def parameters(self) -> list:
        """Parameter arrays in layer order, W then b (the arrays themselves, not copies)."""
        return [layer.params[k] for layer in self.layers for k in _param_keys(layer)]

    def gradients(self) -> list:
        """Gradients from the last backward pass, in the order of :meth:`parameters`."""
        out = []
        for layer in self.layers:
            for k in _param_keys(layer):
                if k not in layer.grads:
                    raise RuntimeError(f"layer {layer.name!r} has no gradient yet; run backward")
                out.append(layer.grads[k])
        return out

    def compile(self, optimizer="adam", loss="softmax_cross_entropy", metrics=("accuracy",)):
        """Attach an optimizer (name or object) and a loss (name or object)."""
        self.optimizer = optimizers_mod.get(optimizer)
        self.loss = losses_mod.get(loss)
        metrics = list(metrics or [])
        for m in metrics:
            if m != "accuracy":
                raise ValueError(f"metrics may only contain 'accuracy', got {m!r}")
        self.metrics = metrics
        return self

    def _require_compiled(self):
        if self.optimizer is None or self.loss is None:
            raise RuntimeError("call model.compile(optimizer=..., loss=...) first")

    # -- passes ---------------------------------------------------------------------------------
    def forward(self, x, training: bool = False):
        self._ensure_built(x)
        for layer in self.layers:
            x = layer.forward(x, training=training)
        return x

    def backward(self, dy, need_dx: bool = True):
        """Backpropagate ``dy`` through all layers; returns the input gradient.

        With ``need_dx=False`` (as in :meth:`train_on_batch`) a first layer that can skip its
        input gradient (``can_skip_dx``, e.g. Conv2D) does, and None may be returned.
        """
        last = len(self.layers) - 1
        for i, layer in enumerate(reversed(self.layers)):
            if i == last and not need_dx and layer.can_skip_dx:
                return layer.backward(dy, need_dx=False)
            dy = layer.backward(dy)
        return dy

    def _prepare_x(self, x, name="x"):
        """Validate a user batch source; return it (batches are cast/moved lazily)."""
        if not (isinstance(x, np.ndarray) or chk.is_cupy_array(x)):
            raise TypeError(
                f"{name} must be a numpy.ndarray or cupy.ndarray, got {type(x).__name__}"
            )
        if x.dtype.kind not in "fiu":
            raise TypeError(f"{name} must hold real numbers, got dtype {x.dtype}")
        if x.ndim < 2:
            raise ValueError(f"{name} must have a batch dimension, got shape {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError(f"{name} must hold at least one sample")
        if self.built and tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"{name} must have per-sample shape {self.input_shape}, got {tuple(x.shape[1:])}"
            )
        return x

    def _batch(self, x):
        """A batch on the model's backend and dtype."""
        if self.backend == "gpu":
            x = to_backend(x, "gpu")
        elif chk.is_cupy_array(x):
            x = to_backend(x, "cpu")
        if x.dtype != self.dtype:
            x = x.astype(self.dtype)
        return x

    def _labels(self, y, n, name="y"):
        if isinstance(y, (list, tuple)):
            y = np.asarray(y)
        if not (isinstance(y, np.ndarray) or chk.is_cupy_array(y)):
            raise TypeError(f"{name} must be a numpy.ndarray, got {type(y).__name__}")
        num_classes = self.output_shape[0] if self.built else None
        if y.shape[:1] != (n,):
            raise ValueError(f"{name} must have {n} entries (one per sample), got shape {y.shape}")
        if num_classes is not None:
            losses_mod.check_labels(y, n, num_classes, name)
        return y

    def _labels_on_backend(self, y):
        if self.backend == "gpu" and not chk.is_cupy_array(y):
            import cupy

            return cupy.asarray(y)
        return y

    def train_on_batch(self, x, y) -> dict:
        """One optimisation step on a batch. Returns ``{"loss", "accuracy"}`` (floats)."""
        self._require_compiled()
        x = self._batch(self._prepare_x(x))
        self._ensure_built(x)
        y = self._labels_on_backend(self._labels(y, x.shape[0]))
        scores = self.forward(x, training=True)
        loss = self.loss.forward(scores, y)
        accuracy = _accuracy(scores, y)
        self.backward(self.loss.backward(), need_dx=False)
        self.optimizer.step(self.parameters(), self.gradients())
        return {"loss": loss, "accuracy": accuracy}

    def predict(self, x, batch_size: int = 100):
        """Scores (N, classes) for ``x``, dropout off, on the model's backend and dtype."""
        x = self._prepare_x(x)
        batch_size = chk.as_int(batch_size, "batch_size", 1)
        outs = []
        for start in range(0, x.shape[0], batch_size):
            outs.append(self.forward(self._batch(x[start : start + batch_size]), training=False))
        return array_module(outs[0]).concatenate(outs, axis=0)

    def evaluate(self, x, y, batch_size: int = 100) -> dict:
        """Mean loss and accuracy over ``(x, y)`` with dropout off."""
        x = self._prepare_x(x)
        batch_size = chk.as_int(batch_size, "batch_size", 1)
        loss_fn = self.loss or losses_mod.SoftmaxCrossEntropy()
        total_loss = total_correct = 0.0
        n = x.shape[0]
        self._ensure_built(self._batch(x[:1]))
        y = self._labels(y, n)
        for start in range(0, n, batch_size):
            xb = self._batch(x[start : start + batch_size])
            yb = self._labels_on_backend(y[start : start + batch_size])
            scores = self.forward(xb, training=False)
            m = xb.shape[0]
            total_loss += loss_fn.forward(scores, yb) * m
            total_correct += _accuracy(scores, yb) * m
        return {"loss": total_loss / n, "accuracy": total_correct / n}

    def fit(
        self,
        x,
        y,
        epochs=1,
        batch_size=100,
        validation_data=None,
        shuffle=True,
        callbacks=(),
        verbose=1,
        seed=None,
        initial_epoch=0,
        progress=None,
    ) -> History:
        """Train for epochs ``initial_epoch .. epochs-1``; each epoch visits every sample once
        (a permutation when ``shuffle``). Returns a :class:`History`.

        ``seed`` reseeds the model's generator (shuffling and dropout) before training.
        ``verbose``: 0 silent, 1 a progress bar per epoch and a summary line, 2 the line only.
        ``progress`` overrides whether the progress bar is shown.
        """
        self._require_compiled()
        x = self._prepare_x(x)
        n = x.shape[0]
        epochs = chk.as_int(epochs, "epochs", 0)
        initial_epoch = chk.as_int(initial_epoch, "initial_epoch", 0)
        batch_size = chk.as_int(batch_size, "batch_size", 1)
        self._ensure_built(self._batch(x[:1]))
        y = self._labels(y, n)
        if validation_data is not None:
            if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
                raise ValueError("validation_data must be a pair (x_val, y_val)")
            xv = self._prepare_x(validation_data[0], "validation_data[0]")
            yv = self._labels(validation_data[1], xv.shape[0], "validation_data[1]")
        if seed is not None:
            self.rng.bit_generator.state = np.random.default_rng(seed).bit_generator.state
        history = History()
        callbacks = [history, *callbacks]
        for cb in callbacks:
            if not isinstance(cb, Callback):
                raise TypeError(f"callbacks must be Callback objects, got {type(cb).__name__}")
            cb.set_model(self)
        self.stop_training = False
        self.history = history
        for cb in callbacks:
            cb.on_train_begin()
        n_batches = -(-n // batch_size)
        for epoch in range(initial_epoch, epochs):
            for cb in callbacks:
                cb.on_epoch_begin(epoch)
            t0 = time.perf_counter()
            order = self.rng.permutation(n) if shuffle else np.arange(n)
            sum_loss = sum_acc = 0.0
            seen = 0
            show_bar = verbose == 1 if progress is None else bool(progress)
            bar = _progress(n_batches, f"Epoch {epoch + 1}/{epochs}", show_bar)
            for b in range(n_batches):
                idx = order[b * batch_size : (b + 1) * batch_size]
                if chk.is_cupy_array(x):
                    idx = array_module(x).asarray(idx)
                logs = self.train_on_batch(x[idx], y[idx])
                m = len(idx)
                sum_loss += logs["loss"] * m
                sum_acc += logs["accuracy"] * m
                seen += m
                for cb in callbacks:
                    cb.on_batch_end(b, logs)
                if bar is not None:
                    bar.update(1)
                    if b % 20 == 0 or b == n_batches - 1:
                        bar.set_postfix(loss=f"{sum_loss / seen:.4f}", acc=f"{sum_acc / seen:.4f}")
            if bar is not None:
                bar.close()
            epoch_logs = {"loss": sum_loss / seen, "accuracy": sum_acc / seen}
            if validation_data is not None:
                val = self.evaluate(xv, yv, batch_size=max(batch_size, 100))
                epoch_logs.update(val_loss=val["loss"], val_accuracy=val["accuracy"])
            epoch_logs["time"] = time.perf_counter() - t0
            if verbose:
                parts = " - ".join(f"{k} {v:.4f}" for k, v in epoch_logs.items() if k != "time")
                print(f"epoch {epoch + 1}/{epochs} - {parts} - {epoch_logs['time']:.1f}s")
            for cb in callbacks:
                cb.on_epoch_end(epoch, epoch_logs)
            if self.stop_training:
                break
        for cb in callbacks:
            cb.on_train_end()
        return history

    # -- inspection -----------------------------------------------------------------------------
    def summary(self, print_fn=print) -> str:
        """Table of layer name, class, output shape and parameter count; printed and returned."""
        if not self.built:
            raise RuntimeError("the model is not built; call build(input_shape) or run it once")
        rows = [("Layer", "Type", "Output shape", "Params")]
        shape = self.input_shape
        total = 0
        for layer in self.layers:
            shape = layer.output_shape(shape)
            count = sum(int(np.prod(p.shape)) for p in layer.params.values())
            total += count
            rows.append((layer.name, type(layer).__name__, str(("N", *shape)), f"{count:,}"))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        line = "-" * (sum(widths) + 6)

        def fmt(r):
            a, b, c, d = (
                r[i].ljust(widths[i]) if i < 3 else r[i].rjust(widths[i]) for i in range(4)
            )
            return f"{a}  {b}  {c}  {d}"

        out = [fmt(rows[0]), line, *(fmt(r) for r in rows[1:]), line]
        out.append(f"Total params: {total:,}  (input {('N', *self.input_shape)}, {self.dtype})")
        text = "\n".join(out)
        if print_fn is not None:
            print_fn(text)
        return text

    def count_params(self) -> int:
        return sum(int(np.prod(p.shape)) for p in self.parameters())

    # -- weights --------------------------------------------------------------------------------
    def get_weights(self) -> list:
        """Copies of the parameters as NumPy arrays, layer order, W then b."""
        return [to_numpy(p).copy() for p in self.parameters()]

    def set_weights(self, weights) -> None:
        """Overwrite the parameters (same order and shapes as :meth:`get_weights`)."""
        if not self.built:
            raise RuntimeError("the model is not built; call build(input_shape) first")
        params = self.parameters()
        weights = list(weights)
        if len(weights) != len(params):
            raise ValueError(f"weights must be a list of {len(params)} arrays, got {len(weights)}")
        for i, (p, w) in enumerate(zip(params, weights, strict=True)):
            if not (isinstance(w, np.ndarray) or chk.is_cupy_array(w)):
                raise TypeError(f"weights[{i}] must be an array, got {type(w).__name__}")
            if w.dtype.kind != "f":
                raise TypeError(f"weights[{i}] must have a floating dtype, got {w.dtype}")
            if tuple(w.shape) != tuple(p.shape):
                raise ValueError(
                    f"weights[{i}] must have shape {tuple(p.shape)}, got {tuple(w.shape)}"
                )
        for p, w in zip(params, weights, strict=True):
            p[...] = to_backend(w, self.backend, self.dtype)
        if self.optimizer is not None:
            self.optimizer.sync(params)

    # -- config / checkpoints -------------------------------------------------------------------
    def get_config(self) -> dict:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "name": self.name,
            "dtype": str(self.dtype),
            "input_shape": list(self.input_shape) if self.input_shape else None,
            "layers": [
                {"class": type(layer).__name__, "config": layer.get_config()}
                for layer in self.layers
            ],
        }

    def save(self, path, include_optimizer=True, epoch=None, extra=None) -> None:
        """Write an ``.npz`` checkpoint atomically (see the module docstring for the format).

        ``epoch`` (number of finished epochs) and ``extra`` (JSON-serialisable dict) go into
        ``__meta__`` together with the random generator state, for resuming.
        """
        if not self.built:
            raise RuntimeError("cannot save a model that is not built")
        arrays = {"__architecture__": np.array(json.dumps(self.get_config()))}
        for i, w in enumerate(self.get_weights()):
            arrays[f"weights/{i:03d}"] = w
        if include_optimizer and self.optimizer is not None:
            opt = {"class": type(self.optimizer).__name__, "config": self.optimizer.get_config()}
            arrays["__optimizer__"] = np.array(json.dumps(opt))
            for key, value in self.optimizer.state_dict().items():
                arrays[f"optimizer/{key}"] = value
        meta = {
            "epoch": epoch,
            "rng_state": _jsonable_rng_state(self.rng),
            "loss": getattr(self.loss, "name", None),
            "extra": extra or {},
        }
        arrays["__meta__"] = np.array(json.dumps(meta))
        _savez_atomic(path, arrays)

    @classmethod
    def load(cls, path, backend="cpu", dtype=None):
        """Rebuild a model from :meth:`save` output (see :func:`load_model`)."""
        return load_model(path, backend=backend, dtype=dtype)

    def to(self, backend=None, dtype=None) -> Sequential:
        """A copy of the model on ``backend`` ("cpu"/"gpu") in ``dtype`` ("float32"/"float16").

        Weights are converted; the copy gets a fresh optimizer of the same kind and settings.
        """
        backend = check_backend(backend or self.backend)
        dtype = check_dtype(dtype or self.dtype)
        if backend == "gpu":
            from .. import ops

            if not ops.gpu_available():
                # to_gpu raises with the reason (no CuPy, no device...).
                ops.to_gpu(np.zeros(1, np.float32))
        new = _from_config(self.get_config(), backend, dtype)
        new.rng.bit_generator.state = copy.deepcopy(self.rng.bit_generator.state)
        if self.built:
            new.build(self.input_shape)
            new.set_weights(self.get_weights())
        if self.optimizer is not None:
            new.compile(
                type(self.optimizer)(**self.optimizer.get_config()),
                type(self.loss)() if self.loss is not None else "softmax_cross_entropy",
                self.metrics,
            )
        return new

    def __repr__(self):
        return (
            f"Sequential({len(self.layers)} layers, backend={self.backend!r}, dtype={self.dtype})"
        )


def _param_keys(layer):
    return [k for k in ("W", "b") if k in layer.params]


def _accuracy(scores, y) -> float:
    pred = scores.argmax(axis=1)
    if y.ndim == 2:
        y = y.argmax(axis=1)
    return float((pred == y).mean())


def _progress(total, desc, verbose):
    if not verbose:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="batch", leave=False, dynamic_ncols=True)


def _jsonable_rng_state(rng) -> dict:
    return rng.bit_generator.state  # PCG64 state: plain dicts and ints (JSON handles big ints)


def _savez_atomic(path, arrays) -> None:
    path = os.fspath(path)
    if not path.endswith(".npz"):
        raise ValueError(f"checkpoint path must end with .npz, got {path!r}")
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".npz")
    try:
        # mkstemp creates the file 0600; give the checkpoint the usual umask-based mode.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _from_config(config, backend="cpu", dtype=None) -> Sequential:
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} architecture")
    if config.get("version") != FORMAT_VERSION:
        raise ValueError(f"unsupported checkpoint version {config.get('version')!r}")
    layers = []
    for spec in config["layers"]:
        cls = LAYER_CLASSES.get(spec.get("class"))
        if cls is None:
            raise ValueError(f"unknown layer class {spec.get('class')!r} in checkpoint")
        layers.append(cls(**spec["config"]))
    return Sequential(
        layers,
        backend=backend,
        dtype=dtype or config.get("dtype", "float32"),
        name=config.get("name", "sequential"),
    )


def _json_entry(data, key, path):
    if key not in data.files:
        raise ValueError(f"{path} is not a fastconv checkpoint (no {key!r} entry)")
    return json.loads(str(data[key][()]))


def load_model(path, backend="cpu", dtype=None, compile=True) -> Sequential:
    """Load a model saved by :meth:`Sequential.save` (``allow_pickle=False``).

    The optimizer (with its state) is restored when the checkpoint has one and ``compile``;
    ``model.checkpoint_meta`` holds the saved epoch, generator state and extras, and the model's
    generator continues from the saved state.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    with np.load(path, allow_pickle=False) as data:
        config = _json_entry(data, "__architecture__", path)
        model = _from_config(config, backend, dtype)
        n_weights = sum(1 for k in data.files if k.startswith("weights/"))
        weights = [data[f"weights/{i:03d}"] for i in range(n_weights)]
        if config.get("input_shape"):
            model.build(config["input_shape"])
            model.set_weights(weights)
        meta = _json_entry(data, "__meta__", path) if "__meta__" in data.files else {}
        if meta.get("rng_state"):
            model.rng.bit_generator.state = meta["rng_state"]
        model.checkpoint_meta = meta
        if compile and "__optimizer__" in data.files:
            spec = _json_entry(data, "__optimizer__", path)
            cls = optimizers_mod.OPTIMIZER_CLASSES.get(spec.get("class"))
            if cls is None:
                raise ValueError(f"unknown optimizer class {spec.get('class')!r} in checkpoint")
            model.compile(cls(**spec["config"]), meta.get("loss") or "softmax_cross_entropy")
            state = {
                k[len("optimizer/") :]: data[k] for k in data.files if k.startswith("optimizer/")
            }
            if int(state.get("iterations", 0)) > 0:
                model.optimizer.load_state_dict(state, model.parameters())
    return model
