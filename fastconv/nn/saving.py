"""Checkpoints: pickle-free ``.npz`` archives with a JSON architecture, and how they are written.

The one loader is :mod:`fastconv.nn.loading` (``load_model``); models are built from an
architecture by :func:`fastconv.nn.model.model_from_config`. This module imports neither, so
``Model.save`` can use it without an import circle.

Format 2 (written today; format 1, written before the model graph, still loads):

==========================================  ==================================================
``__architecture__``                         JSON: ``format`` "fastconv.Model", ``version`` 2,
                                             ``class`` ("Sequential"/"Model"), ``name``,
                                             ``dtype``, ``input_shape``, ``input_name``,
                                             ``layers`` [{class, config}], ``nodes`` (Model:
                                             [{layer, inputs: [node index or input name]}])
``weights/<layer>/<weight>``                 every weight (parameters and state)
``__optimizer__``                            JSON {class, config} (optional)
``optimizer/iterations``,                    optimizer state, float32
``optimizer/<slot>/<layer>/<weight>``
``__meta__``                                 JSON: epoch, rng_state, loss, extra
==========================================  ==================================================

``__meta__`` fields (checked on save and on load, :func:`meta_problem`): ``epoch`` None or an
int in [0, 2**31); ``rng_state`` None or a NumPy bit-generator state object; ``loss`` None or a
loss name; ``extra`` a JSON object of the caller's, with finite numbers only (strict JSON; on
load a NaN from an older file is let through where nothing compares it).
Four keys of ``extra`` are what ``fastconv train-mnist`` records and are checked as such:
``history`` (a list of per-epoch objects of numbers), ``best_score`` (a finite number),
``schedule_state`` ({best, wait, cooldown_left}) and ``args`` (an object of plain values).
Every JSON entry is at most 16 MiB and nested at most 64 levels deep (checked on the text,
before parsing: Python's parser recurses, and a deeper document would escape as RecursionError).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re

import numpy as np

from ._files import atomic_write

__all__ = [
    "CheckpointError", "save_model", "meta_problem", "json_depth", "FORMAT", "FORMAT_VERSION",
]  # fmt: skip

FORMAT = "fastconv.Model"
FORMAT_VERSION = 2
_FORMAT1 = "fastconv.Sequential"
_MAX_JSON = 16 << 20  # bytes of one JSON entry
# Nesting of one JSON entry. An architecture is 4 levels deep, train-mnist's metadata 4; Python's
# json module recurses once per level (RecursionError near 1000), so the bound leaves room.
MAX_JSON_DEPTH = 64
_MAX_EPOCH = 2**31 - 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: missing, damaged, or not what it claims to be."""


# --- metadata ----------------------------------------------------------------------------------

_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def json_depth(text: str) -> int:
    """How deeply JSON ``text`` nests arrays and objects, counted without parsing it: strings
    removed, then the running balance of brackets (overcounts only for invalid JSON)."""
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    if not brackets:
        return 0
    codes = np.frombuffer(brackets.encode("ascii"), np.uint8)
    step = np.where((codes == ord("[")) | (codes == ord("{")), 1, -1).astype(np.int32)
    return int(np.cumsum(step).max())


def _short(value, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters: a message names a crafted value, it does
    not print a 4000-digit number or a megabyte of JSON."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**limit:
        return f"an int of {len(str(abs(value)))} digits"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _json_problem(value, where, strict, depth=0):
    """``(exception class, message)`` if ``value`` is not JSON (string keys, at most
    MAX_JSON_DEPTH levels; with ``strict`` finite numbers only), else None."""
    if depth > MAX_JSON_DEPTH:
        return ValueError, f"{where} is nested deeper than {MAX_JSON_DEPTH} levels"
    if value is None or isinstance(value, (str, bool)) or _is_int(value):
        return None
    if isinstance(value, float):
        if strict and not math.isfinite(value):
            return ValueError, f"{where} is {value!r}: checkpoints hold strict JSON, finite only"
        return None
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                return TypeError, f"{where} has a key {_short(k)} that is not a str"
            problem = _json_problem(v, f"{where}[{k!r}]", strict, depth + 1)
            if problem:
                return problem
        return None
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            problem = _json_problem(v, f"{where}[{i}]", strict, depth + 1)
            if problem:
                return problem
        return None
    return TypeError, (
        f"{where} must hold JSON types (dict, list, str, int, float, bool, None), got "
        f"{type(value).__name__}"
    )


def _run_record_problem(extra):
    """The keys of ``extra`` that ``fastconv train-mnist`` records, checked as it reads them."""
    history = extra.get("history")
    if history is not None:
        if not isinstance(history, list):
            return TypeError, f"extra['history'] must be a list, got {type(history).__name__}"
        for i, record in enumerate(history):
            if not isinstance(record, dict):
                return TypeError, f"extra['history'][{i}] must be an object"
            for key, v in record.items():
                if key == "epoch" and not (_is_int(v) and 1 <= v <= _MAX_EPOCH):
                    return ValueError, f"extra['history'][{i}]['epoch'] must be an int >= 1"
                if v is not None and not _is_number(v):
                    return TypeError, (
                        f"extra['history'][{i}][{key!r}] must be a number or None, got {_short(v)}"
                    )
    best = extra.get("best_score", 0.0)
    if not _is_number(best) or not math.isfinite(best):
        kind = ValueError if _is_number(best) else TypeError
        return kind, f"extra['best_score'] must be a finite number, got {_short(best)}"
    state = extra.get("schedule_state")
    if state is not None:
        if not isinstance(state, dict) or set(state) != {"best", "wait", "cooldown_left"}:
            return ValueError, (
                "extra['schedule_state'] must be an object {best, wait, cooldown_left}"
            )
        best = state["best"]
        if best is not None and not (_is_number(best) and math.isfinite(best)):
            return TypeError, "extra['schedule_state']['best'] must be a finite number or None"
        for key in ("wait", "cooldown_left"):
            if not (_is_int(state[key]) and 0 <= state[key] <= _MAX_EPOCH):
                return ValueError, f"extra['schedule_state'][{key!r}] must be an int >= 0"
    args = extra.get("args")
    if args is not None:
        if not isinstance(args, dict):
            return TypeError, f"extra['args'] must be an object, got {type(args).__name__}"
        for key, v in args.items():
            if isinstance(v, (dict, list)):
                return TypeError, f"extra['args'][{key!r}] must be a plain value, got {_short(v)}"
    return None


def meta_problem(meta, strict=True):
    """``(exception class, message)`` for what is wrong with a checkpoint's ``__meta__``
    (see the module docstring), or None. Used on save (raised as is) and on load (raised as
    :class:`CheckpointError`), so that whatever is saved loads again. ``strict=False`` (load)
    lets NaN and inf through in ``extra``'s own values (older versions wrote them as bare NaN),
    never in the fields that a run compares (best scores)."""
    if not isinstance(meta, dict):
        return TypeError, "'__meta__' must be a JSON object"
    epoch = meta.get("epoch")
    if epoch is not None and not (_is_int(epoch) and 0 <= epoch <= _MAX_EPOCH):
        kind = ValueError if _is_int(epoch) else TypeError
        return kind, f"epoch must be None or an int in [0, {_MAX_EPOCH}], got {_short(epoch)}"
    rng_state = meta.get("rng_state")
    if rng_state is not None and not isinstance(rng_state, dict):
        return TypeError, f"rng_state must be a generator state object, got {_short(rng_state)}"
    loss = meta.get("loss")
    if loss is not None and not isinstance(loss, str):
        return TypeError, f"loss must be a loss name or None, got {_short(loss)}"
    extra = meta.get("extra", {})
    if not isinstance(extra, dict):
        return TypeError, f"extra must be a dict (JSON object), got {type(extra).__name__}"
    return _json_problem(extra, "extra", strict) or _run_record_problem(extra)


# --- writing -----------------------------------------------------------------------------------


def save_model(model, path, include_optimizer=True, epoch=None, extra=None) -> None:
    """Write ``model`` to ``path`` (``.npz``) atomically.

    ``epoch`` (finished epochs) and ``extra`` (a dict of JSON types, finite numbers only) go
    into ``__meta__`` with the generator state, for resuming. Metadata that would not load
    again (a NaN in ``extra``, an epoch that is not an int...) raises ValueError or TypeError
    here, before anything is written.
    """
    path = os.fspath(path)
    if not path.endswith(".npz"):
        raise ValueError(f"checkpoint path must end with .npz, got {path!r}")
    if not model.built:
        raise RuntimeError("cannot save a model that is not built")
    meta = {
        "epoch": epoch,
        "rng_state": model.rng.bit_generator.state,
        "loss": getattr(model.loss, "name", None),
        "extra": {} if extra is None else extra,
    }
    problem = meta_problem(meta)
    if problem:
        kind, message = problem
        raise kind(f"cannot save {path}: {message}")
    config = {"format": FORMAT, "version": FORMAT_VERSION, **model.get_config()}
    arrays = {"__architecture__": np.array(json.dumps(config))}
    for (layer, name), value in zip(model.weight_entries(), model.get_weights(), strict=True):
        arrays[f"weights/{layer.name}/{name}"] = value
    if include_optimizer and model.optimizer is not None:
        opt = {"class": type(model.optimizer).__name__, "config": model.optimizer.get_config()}
        arrays["__optimizer__"] = np.array(json.dumps(opt))
        for key, value in model.optimizer.state_dict().items():
            arrays[f"optimizer/{key}"] = value
    arrays["__meta__"] = np.array(json.dumps(meta, allow_nan=False))
    atomic_write(path, lambda f: np.savez(f, **arrays), suffix=".npz")
