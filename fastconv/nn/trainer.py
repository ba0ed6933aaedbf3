"""Training, evaluation and prediction loops: a mixin that :class:`fastconv.nn.Model` inherits.

Kept apart from the model's structure (Keras 3 does the same): everything here uses only the
model's execution API (``_run_forward``, ``_run_backward``), its backend and its weights.
"""

from __future__ import annotations

import math
import numbers
import time
import warnings

import numpy as np

from .. import _checks as chk
from . import data
from . import losses as losses_mod
from . import metrics as metrics_mod
from . import optimizers as optimizers_mod
from .backend import array_module, to_numpy
from .callbacks import Callback, CallbackList, History, ProgressLogger
from .data import EpochIterator
from .strategy import LOCAL, check_strategy

__all__ = ["Trainer"]

_F16_MAX = float(np.finfo(np.float16).max)  # 65504


class Trainer:
    """``compile``, ``train_on_batch``, ``fit``, ``evaluate`` and ``predict``."""

    def compile(self, optimizer="adam", loss="softmax_cross_entropy", metrics=None):
        """Attach an optimizer (name or object), a loss (name or object, see
        :mod:`fastconv.nn.losses`) and metrics (names or objects, see
        :mod:`fastconv.nn.metrics`; default: accuracy for classification losses)."""
        self.optimizer = optimizers_mod.get(optimizer)
        self.loss = losses_mod.get(loss)
        if metrics is None:
            classify = getattr(self.loss, "classification", True) or (
                getattr(self.loss, "name", None) == "binary_cross_entropy"
            )
            metrics = ["accuracy"] if classify else []
        if isinstance(metrics, (str, metrics_mod.Metric)):
            metrics = [metrics]
        if not isinstance(metrics, (list, tuple)):
            raise TypeError(
                "metrics must be a list of metric names or Metric objects, got "
                f"{type(metrics).__name__}"
            )
        self._metric_fns = [metrics_mod.get(m, self.loss) for m in metrics]
        names = [m.name for m in self._metric_fns]
        if len(set(names)) != len(names) or "loss" in names:
            raise ValueError(f"metrics must have distinct names other than 'loss', got {names}")
        self.metrics = list(metrics)
        return self

    def _metric_list(self):
        fns = getattr(self, "_metric_fns", None)
        if fns is None:  # compiled before metrics objects existed (or never): accuracy
            fns = self._metric_fns = [metrics_mod.Accuracy()]
        return fns

    def _require_compiled(self):
        if self.optimizer is None or self.loss is None:
            raise RuntimeError("call model.compile(optimizer=..., loss=...) first")

    # -- inputs ---------------------------------------------------------------------------------
    def _prepare_x(self, x, name="x"):
        """Validate a user batch source; batches are cast and moved lazily."""
        if not chk.is_array(x):
            raise TypeError(
                f"{name} must be a numpy.ndarray or cupy.ndarray, got {type(x).__name__}"
            )
        if x.dtype.kind not in "fiu":
            raise TypeError(f"{name} must hold real numbers, got dtype {x.dtype}")
        if x.ndim < 2:
            raise ValueError(f"{name} must have a batch dimension, got shape {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError(f"{name} must hold at least one sample")
        if x.dtype.kind in "iu":
            warnings.warn(
                f"{name} has dtype {x.dtype}: values are cast to {self.dtype} unscaled; image "
                f"pixels 0-255 usually need {name}.astype('float32') / 255",
                UserWarning,
                stacklevel=3,
            )
        if self.built:
            self._check_input_shape(x, name)
        return x

    @staticmethod
    def _check_finite(x, name):
        """Inputs or targets holding NaN or inf (once, before training)."""
        if x.dtype.kind != "f":
            return
        finite = array_module(x).isfinite(x).reshape(x.shape[0], -1).all(axis=1)
        if not bool(finite.all()):
            bad = np.flatnonzero(~to_numpy(finite))
            raise ValueError(
                f"{name} holds NaN or infinite values in {bad.size} samples (first: "
                f"{bad[:5].tolist()}); fix the data or pass check_finite=False"
            )

    def _check_range(self, x, name):
        """Inputs that the cast to a float16 model would turn into inf (once, before training;
        every batch is checked again where it is cast, see :meth:`_batch`)."""
        if self.dtype != np.float16 or x.dtype == np.float16:
            return
        xp = array_module(x)
        if -_F16_MAX <= float(x.min()) and float(x.max()) <= _F16_MAX:
            return  # no temporary the size of the data set in the common case
        big = ((xp.abs(x) > _F16_MAX) & xp.isfinite(x)).reshape(x.shape[0], -1).any(axis=1)
        if bool(big.any()):
            bad = np.flatnonzero(to_numpy(big))
            raise ValueError(
                f"{name} holds values beyond float16's range (|v| > {_F16_MAX:g}) in {bad.size} "
                f"samples (first: {bad[:5].tolist()}); this model computes in float16: scale "
                "the data or use a float32 model"
            )

    def _checked_cast(self, x, out, name="x"):
        """``out`` (``x`` cast to the model's dtype), or a ValueError when the cast overflowed
        (a finite value beyond float16's range became inf: NaN by the back door)."""
        if out.dtype != np.float16 or x.dtype == np.float16:
            return out
        if bool(array_module(out).isfinite(out).all()):  # the common case: one cheap pass
            return out
        xp = array_module(x)
        values = x[xp.isfinite(x)] if x.dtype.kind == "f" else x
        largest = float(xp.abs(values).max()) if values.size else 0.0
        if largest > _F16_MAX:
            raise ValueError(
                f"{name} holds values up to {largest:g}, beyond float16's range "
                f"(|v| <= {_F16_MAX:g}); this model computes in float16: scale the data or use "
                "a float32 model"
            )
        return out  # inf or NaN in x itself: the user's call (check_finite=False)

    def _batch(self, x):
        """A batch on the model's backend and dtype."""
        if type(x) is np.ndarray and x.dtype == self.dtype and self.backend.xp is np:
            return x  # already there: no cast (np.errstate costs ~4 us, twice a predict call)
        with np.errstate(over="ignore"):  # an overflow is an error below, not a warning
            return self._checked_cast(x, self.backend.asarray(x))

    def _cast_for_augment(self, x):
        """A batch in the model's dtype, on the library it already lives on (augmentation runs
        where the data is: Numba for NumPy arrays, CUDA for CuPy arrays)."""
        if x.dtype == self.dtype:
            return x
        with np.errstate(over="ignore"):
            return self._checked_cast(x, x.astype(self.dtype))

    def _labels(self, y, n, name="y"):
        if isinstance(y, (list, tuple)):
            y = np.asarray(y)
        if not chk.is_array(y):
            raise TypeError(f"{name} must be a numpy.ndarray, got {type(y).__name__}")
        if y.shape[:1] != (n,):
            raise ValueError(f"{name} must have {n} entries (one per sample), got shape {y.shape}")
        if self.built:
            loss = self.loss if hasattr(self.loss, "check_targets") else None
            if loss is not None:
                loss.check_targets(y, n, self.output_shape, name)
            else:
                losses_mod.check_labels(y, n, self.output_shape[0], name)
        return y

    # -- one step -------------------------------------------------------------------------------
    def _emit(self, event, what):
        for h in self.hooks:
            getattr(h, what)(event, None)

    def train_on_batch(self, x, y) -> dict:
        """One optimisation step on a batch. Returns ``{"loss", <metric>...}`` (floats; the
        loss includes the layers' weight penalties)."""
        self._require_compiled()
        x = self._prepare_x(x)
        self._ensure_built(self._batch(x[:1]))
        return self._train_step(x, self._labels(y, x.shape[0]))

    def _train_step(self, x, y) -> dict:
        """The step of :meth:`train_on_batch` on arguments already checked (``fit`` checks its
        data once, not every batch)."""
        x = self._batch(x)
        y = self.backend.labels(y)
        scores, caches = self._run_forward(x, training=True)
        self._emit("loss_forward", "begin")
        loss = self.loss.forward(scores, y)
        self._emit("loss_forward", "end")
        logs = {"loss": loss, **{m.name: m(scores, y) for m in self._metric_list()}}
        self._emit("loss_backward", "begin")
        dscores = self.loss.backward()
        self._emit("loss_backward", "end")
        strategy = getattr(self, "_strategy", LOCAL)  # fit's, during fit
        dscores = strategy.scale_loss_gradient(dscores)  # this rank's part of the mean loss
        # The last step's gradients (kept for gradients()) are dropped layer by layer as the
        # new ones are made (Model._run_backward), not held through this pass next to them.
        previous, self._grads = self._grads, None
        _, self._grads = self._run_backward(caches, dscores, need_dx=False, previous=previous)
        logs = strategy.reduce_gradients(self, self._grads, logs)  # the global batch's
        # After the reduction: the weights (and so the penalties) are the same on every rank.
        logs["loss"] += self._regularize(self._grads)
        self._apply_gradients(self._grads)
        return logs

    def _regularize(self, grads) -> float:
        """Add every trainable layer's weight penalties to ``grads``; return their sum."""
        total = 0.0
        for layer in self.layers:
            regs = getattr(layer, "regularizers", None)
            if not regs or not layer.trainable:
                continue
            for name, reg in regs.items():
                w = layer.params[name]
                total += reg.penalty(w)
                key = (layer.name, name)
                grads[key] = grads[key] + reg.gradient(w)
        return total

    def _apply_gradients(self, grads) -> None:
        keys = self.trainable_weight_keys()
        by_name = {layer.name: layer for layer in self.layers}
        params = [by_name[lname].params[w] for lname, w in keys]
        self._emit("update", "begin")
        self.optimizer.step(params, [grads[k] for k in keys], [f"{a}/{b}" for a, b in keys])
        for lname in dict.fromkeys(lname for lname, _ in keys):
            by_name[lname].weights_changed()
        self._emit("update", "end")

    # -- loops ----------------------------------------------------------------------------------
    def predict(self, x, batch_size: int = 100, probabilities: bool = False, prepared=None):
        """Outputs ``(N, ...)`` for ``x`` in inference mode (dropout off, BatchNorm on its
        moving statistics), on the model's backend and dtype.

        With ``probabilities`` the scores go through the loss's output function: softmax for
        softmax cross-entropy (the default loss), sigmoid for binary cross-entropy; float32.
        ``prepared``: None follows ``model.prepared`` (default True: weights transformed,
        packed and BatchNorm-folded once per weights version, ResNet's residual Add in the
        convolution's epilogue); False runs the unprepared path (every call from the layer's
        arrays; the same numbers up to the residual's float32 rounding order, see
        docs/architecture.md).
        """
        x = self._prepare_x(x)
        batch_size = chk.as_int(batch_size, "batch_size", 1)
        if not isinstance(probabilities, (bool, np.bool_)):
            raise TypeError(f"probabilities must be a bool, got {type(probabilities).__name__}")
        if prepared is not None and not isinstance(prepared, (bool, np.bool_)):
            raise TypeError(f"prepared must be None or a bool, got {type(prepared).__name__}")
        self._ensure_built(self._batch(x[:1]))
        outs = []
        for start in range(0, x.shape[0], batch_size):
            y, _ = self._run_forward(
                self._batch(x[start : start + batch_size]), training=False, prepared=prepared
            )
            outs.append(y)
        out = self.backend.xp.concatenate(outs, axis=0) if len(outs) > 1 else outs[0]
        if probabilities:
            out = (self.loss or losses_mod.SoftmaxCrossEntropy()).probabilities(out)
        return out

    def evaluate(self, x, y, batch_size: int = 100, strategy=None) -> dict:
        """Mean loss (without weight penalties) and metrics over ``(x, y)`` in inference
        mode: ``{"loss", <metric>...}``. With a ``strategy``
        (:class:`~fastconv.nn.MPIDataParallel`) each rank evaluates its share of ``(x, y)`` and
        every rank gets the means over all of it."""
        x = self._prepare_x(x)
        batch_size = chk.as_int(batch_size, "batch_size", 1)
        strategy = check_strategy(strategy)
        loss_fn = self.loss or losses_mod.SoftmaxCrossEntropy()
        metric_fns = self._metric_list() if self.loss is not None else [metrics_mod.Accuracy()]
        n = x.shape[0]
        self._ensure_built(self._batch(x[:1]))
        y = self._labels(y, n)
        totals = {"loss": 0.0, **{m.name: 0.0 for m in metric_fns}}
        first, stop = strategy.eval_range(n)
        for start in range(first, stop, batch_size):
            xb = self._batch(x[start : min(start + batch_size, stop)])
            yb = self.backend.labels(y[start : min(start + batch_size, stop)])
            scores, _ = self._run_forward(xb, training=False)
            m = xb.shape[0]
            totals["loss"] += loss_fn.forward(scores, yb) * m
            for fn in metric_fns:
                totals[fn.name] += fn(scores, yb) * m
        totals = dict(zip(totals, strategy.sum_over_ranks(*totals.values()), strict=True))
        return {k: v / n for k, v in totals.items()}

    def fit(
        self,
        x,
        y,
        epochs=1,
        batch_size=100,
        validation_data=None,
        validation_split=0.0,
        shuffle=True,
        callbacks=(),
        verbose=1,
        seed=None,
        initial_epoch=0,
        progress=None,
        check_finite=True,
        augment=None,
        strategy=None,
    ) -> History:
        """Train for epochs ``initial_epoch .. epochs-1``; each epoch visits every sample once
        (a permutation when ``shuffle``). Returns a :class:`History`.

        Parameters
        ----------
        validation_data : (x_val, y_val), optional
            Evaluated after every epoch as ``val_loss`` and ``val_accuracy``.
        validation_split : float in [0, 1)
            Hold out this fraction of the samples, taken from the end of ``x`` before any
            shuffling (as Keras), as validation data. Not with ``validation_data``.
        seed : int, optional
            Reseeds the model's generator (shuffling, dropout) before training.
        verbose : 0, 1 or 2
            Silent, a progress bar per epoch and a summary line, or the line only.
        progress : bool, optional
            Overrides whether the progress bar is shown.
        check_finite : bool
            Refuse inputs and targets holding NaN or inf (checked once, before training).
            Inputs beyond float16's range are refused for a float16 model whatever this says
            (the cast would make them inf).
        augment : callable, optional
            ``augment(x_batch, rng) -> x_batch``, e.g. a
            :class:`fastconv.augment.RandomTransform`: training batches are augmented in a
            background thread while the previous batch trains (:mod:`fastconv.nn.data`), with a
            generator seeded from the model's, so runs are reproducible and resumable.
            Validation data is never augmented.
        strategy : MPIDataParallel, optional
            Data-parallel training over MPI ranks (docs/distributed.md): ``batch_size`` is the
            global batch, split over the ranks; the logs are means over the ranks; only rank 0
            prints and runs file-writing callbacks. Each rank augments only its own share,
            with its own generator.

        A callback stops training by setting ``model.stop_training``; an epoch cut short that
        way (e.g. by :class:`TerminateOnNaN`) is not reported to ``on_epoch_end``, so nothing
        saves the weights of a half-finished, diverged epoch.

        NaN: as in Keras, ``fit`` does not stop on a non-finite loss by itself (a loss can
        recover, and stopping is a policy): pass ``callbacks=[TerminateOnNaN()]`` to stop at
        the first such batch (``fastconv train-mnist`` always does). Whatever the callbacks,
        :class:`ModelCheckpoint` never writes weights or a monitored value that are not finite.
        """
        x, y, val, epochs, initial_epoch, batch_size, callbacks, strategy = self._fit_inputs(
            x, y, epochs, batch_size, validation_data, validation_split, shuffle, callbacks,
            seed, initial_epoch, check_finite, augment, strategy,
        )  # fmt: skip
        callbacks, verbose, progress = strategy.begin(
            self, x=x, y=y, validation=val, batch_size=batch_size, epochs=epochs,
            initial_epoch=initial_epoch, shuffle=shuffle, callbacks=callbacks, verbose=verbose,
            progress=progress,
        )  # fmt: skip
        batches = EpochIterator(self, x, y, batch_size, shuffle, augment, strategy)
        history = self.history = History()
        show_bar = verbose == 1 if progress is None else bool(progress)
        logger = [ProgressLogger(bar=show_bar, line=bool(verbose))] if show_bar or verbose else []
        params = {"epochs": epochs, "steps": batches.steps, "samples": batches.samples,
                  "batch_size": batch_size}  # fmt: skip
        cbs = CallbackList([history, *logger, *callbacks], self, params)
        self._strategy, self.stop_training = strategy, False
        cbs.on_train_begin()
        for epoch in range(initial_epoch, epochs):
            cbs.on_epoch_begin(epoch)
            t0 = time.perf_counter()
            sums, seen = {}, 0
            epoch_batches = batches.epoch(epoch)
            for b, xb, yb, m in epoch_batches:
                logs = self._train_step(xb, yb)
                for k, v in logs.items():  # the logs are the global batch's means
                    sums[k] = sums.get(k, 0.0) + v * m
                seen += m
                cbs.on_batch_end(b, logs)
                # Agreed by every rank: one stopping alone would leave the others waiting.
                self.stop_training = strategy.agree_stop(self.stop_training)
                if self.stop_training:
                    break
            epoch_batches.close()
            if seen < batches.samples:  # cut short by a callback: not reported as an epoch
                break
            strategy.end_epoch(self)
            epoch_logs = {k: v / seen for k, v in sums.items()}
            if val is not None:
                scores = self.evaluate(*val, batch_size=max(batch_size, 100), strategy=strategy)
                epoch_logs.update({f"val_{k}": v for k, v in scores.items()})
            epoch_logs["time"] = time.perf_counter() - t0
            cbs.on_epoch_end(epoch, epoch_logs)
            self.stop_training = strategy.agree_stop(self.stop_training)
            if self.stop_training:
                break
        strategy.end(self)
        self._strategy = LOCAL
        cbs.on_train_end()
        return history

    def _fit_inputs(self, x, y, epochs, batch_size, validation_data, validation_split, shuffle,
                    callbacks, seed, initial_epoch, check_finite, augment, strategy):  # fmt: skip
        """fit's arguments checked once (batches are not checked again): ``(x, y, validation
        pair or None, epochs, initial_epoch, batch_size, callbacks, strategy)``, the model's
        generator reseeded when ``seed`` is given and ``epoch_log_keys`` set for callbacks."""
        self._require_compiled()
        x = self._prepare_x(x)
        epochs = chk.as_int(epochs, "epochs", 0)
        initial_epoch = chk.as_int(initial_epoch, "initial_epoch", 0)
        batch_size = chk.as_int(batch_size, "batch_size", 1)
        if not isinstance(shuffle, (bool, np.bool_)):  # "no" is truthy: it shuffled
            raise TypeError(f"shuffle must be a bool, got {type(shuffle).__name__}")
        seed = chk.as_seed(seed)
        strategy = check_strategy(strategy)
        self._ensure_built(self._batch(x[:1]))
        y = self._labels(y, x.shape[0])
        split = validation_split
        if isinstance(split, (bool, np.bool_)) or not isinstance(split, numbers.Real):
            raise TypeError(f"validation_split must be a number, got {type(split).__name__}")
        if not 0 <= split < 1:  # NumPy floats are numbers.Real: np.float32(0.1) is fine
            raise ValueError(f"validation_split must be in [0, 1), got {split!r}")
        split = float(split)
        if split and validation_data is not None:
            raise ValueError("pass validation_data or validation_split, not both")
        if split:
            n_val = int(math.ceil(x.shape[0] * split))
            if n_val >= x.shape[0]:
                raise ValueError(f"validation_split={split} leaves no training samples")
            validation_data = (x[-n_val:], y[-n_val:])
            x, y = x[:-n_val], y[:-n_val]
        val = None
        if validation_data is not None:
            if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
                raise ValueError("validation_data must be a pair (x_val, y_val)")
            xv = self._prepare_x(validation_data[0], "validation_data[0]")
            val = (xv, self._labels(validation_data[1], xv.shape[0], "validation_data[1]"))
        inputs, targets = [(x, "x")], [(y, "y")]
        if val is not None:
            inputs.append((val[0], "validation_data[0]"))
            targets.append((val[1], "validation_data[1]"))
        if check_finite:
            # Targets too: a NaN in one-hot, BCE or MSE targets trains the weights into NaN.
            for pair in zip(inputs, targets, strict=True):  # x, y, then the validation pair
                for a, name in pair:
                    self._check_finite(a, name)
        for a, name in inputs:
            self._check_range(a, name)
        data.check_transform(augment)
        if isinstance(callbacks, Callback) or not isinstance(callbacks, (list, tuple)):
            raise TypeError(
                f"callbacks must be a list of Callback objects, got {type(callbacks).__name__}"
            )
        for cb in callbacks:
            if not isinstance(cb, Callback):
                raise TypeError(f"callbacks must be Callback objects, got {type(cb).__name__}")
        if seed is not None:
            self.rng.bit_generator.state = np.random.default_rng(seed).bit_generator.state
        # The keys every epoch's logs will have, for callbacks to check at train begin (a
        # monitor or a checkpoint path naming a missing key fails now, not after an epoch).
        names = ["loss", *(m.name for m in self._metric_list())]
        val_names = [f"val_{k}" for k in names] if val is not None else []
        self.epoch_log_keys = (*names, *val_names, "time")
        return x, y, val, epochs, initial_epoch, batch_size, list(callbacks), strategy
