"""Checkpoints: pickle-free ``.npz`` archives with a JSON architecture, and their one loader.

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

Loading validates everything before it allocates anything the file does not hold: the archive
(zip structure and CRCs), every entry's presence, each array's shape and dtype (read from the
``.npy`` header before its data), the architecture's layer classes and arguments (weights are
declared from the architecture without being created, then compared with the stored shapes),
the optimizer and its state. Every problem raises :class:`CheckpointError`, naming the file.
"""

from __future__ import annotations

import io
import json
import math
import numbers
import os
import re
import zipfile

import numpy as np

from . import losses as losses_mod
from . import optimizers as optimizers_mod
from ._files import atomic_write
from .backend import check_backend_name, check_dtype
from .graph import Input
from .layers.base import LAYER_CLASSES

__all__ = [
    "CheckpointError", "save_model", "load_model", "model_from_config", "meta_problem",
    "FORMAT_VERSION",
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


# --- building from an architecture -------------------------------------------------------------


def _layer_from_spec(spec, where):
    if not isinstance(spec, dict) or not isinstance(spec.get("config"), dict):
        raise CheckpointError(f"{where}: a layer entry must be {{'class', 'config'}}, got {spec!r}")
    cls = LAYER_CLASSES.get(spec.get("class"))
    if cls is None:
        raise CheckpointError(
            f"{where}: unknown layer class {spec.get('class')!r} (user-defined layers must be "
            "registered with @fastconv.nn.register_layer before loading)"
        )
    try:
        return cls(**spec["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: bad arguments for {cls.__name__}: {e}") from None


def model_from_config(config, backend="cpu", dtype=None, allocate=True):
    """A model from :meth:`Model.get_config` output (format 2), weights fresh or, with
    ``allocate=False``, declared but not created (the loader fills them)."""
    from . import model as model_mod

    where = "architecture"
    if not isinstance(config, dict):
        raise CheckpointError(f"{where} must be a JSON object")
    kind = config.get("class")
    if kind not in ("Sequential", "Model"):
        raise CheckpointError(f"{where}: unknown model class {kind!r}")
    shape = config.get("input_shape")
    if (
        not isinstance(shape, list)
        or not shape
        or not all(
            isinstance(s, int) and not isinstance(s, bool) and 1 <= s <= 2**31 for s in shape
        )
    ):
        raise CheckpointError(
            f"{where}: input_shape must be a list of positive ints, got {shape!r}"
        )
    specs = config.get("layers")
    if not isinstance(specs, list) or not specs:
        raise CheckpointError(f"{where}: 'layers' must be a non-empty list")
    layers = [_layer_from_spec(s, f"{where}, layer {i}") for i, s in enumerate(specs)]
    kwargs = {"backend": backend, "dtype": dtype or config.get("dtype", "float32")}
    name = config.get("name")
    if name is not None and not isinstance(name, str):
        raise CheckpointError(f"{where}: name must be a string")
    token = model_mod.ALLOCATE_WEIGHTS.set(allocate)
    try:
        if kind == "Sequential":
            return model_mod.Sequential(layers, name=name, input_shape=tuple(shape), **kwargs)
        return _functional(config, layers, tuple(shape), name, kwargs)
    except CheckpointError:
        raise
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None
    finally:
        model_mod.ALLOCATE_WEIGHTS.reset(token)


def _functional(config, layers, shape, name, kwargs):
    from .model import Model

    by_name = {layer.name: layer for layer in layers}
    if len(by_name) != len(layers):
        raise CheckpointError("architecture: layer names are not unique")
    input_name = config.get("input_name", "input")
    if not isinstance(input_name, str):
        raise CheckpointError("architecture: input_name must be a string")
    inp = Input(shape, name=input_name)
    nodes = config.get("nodes")
    if not isinstance(nodes, list) or not nodes:
        raise CheckpointError("architecture: 'nodes' must be a non-empty list")
    tensors = []
    for i, node in enumerate(nodes):
        if not isinstance(node, dict) or node.get("layer") not in by_name:
            raise CheckpointError(f"architecture: node {i} names no known layer: {node!r}")
        refs = node.get("inputs")
        if not isinstance(refs, list) or not refs:
            raise CheckpointError(f"architecture: node {i} has no inputs")
        ins = []
        for r in refs:
            if r == input_name:
                ins.append(inp)
            elif isinstance(r, int) and not isinstance(r, bool) and 0 <= r < i:
                ins.append(tensors[r])
            else:  # only earlier nodes: a stored graph cannot have a cycle
                raise CheckpointError(f"architecture: node {i} has a bad input reference {r!r}")
        layer = by_name[node["layer"]]
        tensors.append(layer(ins if layer.multi_input else ins[0]))
    return Model(inp, tensors[-1], name=name, **kwargs)


def _format1_to_config(arch):
    """A format-1 (``fastconv.Sequential``) architecture as a format-2 config."""
    shape = arch.get("input_shape")
    if shape is None:
        raise CheckpointError("architecture: the model was saved unbuilt (no input_shape)")
    return {
        "class": "Sequential",
        "name": arch.get("name"),
        "dtype": arch.get("dtype", "float32"),
        "input_shape": shape,
        "layers": arch.get("layers"),
    }


# --- reading -----------------------------------------------------------------------------------


class _Archive:
    """Read access to a checkpoint's entries with headers checked before data is read."""

    def __init__(self, path):
        self.path = path
        try:
            self.zip = zipfile.ZipFile(path)
            bad = self.zip.testzip()  # reads every entry once: CRC check
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError) as e:
            raise CheckpointError(self._msg(f"damaged or not an .npz archive ({e})")) from None
        if bad is not None:
            raise CheckpointError(self._msg(f"damaged: entry {bad!r} fails its CRC check"))
        self.names = {n[:-4] for n in self.zip.namelist() if n.endswith(".npy")}

    def _msg(self, problem):
        return f"checkpoint {self.path}: {problem}"

    def error(self, problem):
        return CheckpointError(self._msg(problem))

    def header(self, key):
        """``(shape, dtype)`` of entry ``key`` from its .npy header, without its data."""
        if key not in self.names:
            raise self.error(f"missing entry {key!r}")
        try:
            with self.zip.open(key + ".npy") as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(f)
                elif version == (2, 0):
                    shape, _, dtype = np.lib.format.read_array_header_2_0(f)
                else:
                    raise ValueError(f".npy format version {version} is not supported")
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
            raise self.error(f"entry {key!r} is not a valid array ({e})") from None
        if dtype.hasobject:
            raise self.error(f"entry {key!r} holds Python objects (refused: never unpickled)")
        return tuple(shape), dtype

    def array(self, key, shape=None, kinds="f"):
        got_shape, dtype = self.header(key)
        if shape is not None and got_shape != tuple(shape):
            raise self.error(f"entry {key!r} has shape {got_shape}, expected {tuple(shape)}")
        if dtype.kind not in kinds:
            raise self.error(f"entry {key!r} has dtype {dtype}, expected {kinds!r} kinds")
        with self.zip.open(key + ".npy") as f:
            data = f.read()
        try:
            return np.load(io.BytesIO(data), allow_pickle=False)
        except ValueError as e:
            raise self.error(f"entry {key!r} cannot be read ({e})") from None

    def json(self, key):
        shape, dtype = self.header(key)
        if shape != () or dtype.kind != "U":
            raise self.error(f"entry {key!r} must be a JSON string")
        if self.zip.getinfo(key + ".npy").file_size > _MAX_JSON:
            raise self.error(f"entry {key!r} is larger than {_MAX_JSON} bytes")
        text = str(self.array(key, kinds="U")[()])
        depth = json_depth(text)
        if depth > MAX_JSON_DEPTH:
            raise self.error(
                f"entry {key!r} is nested {depth} levels deep (at most {MAX_JSON_DEPTH})"
            )
        try:
            return json.loads(text)
        # ValueError: also an integer of more than 4300 digits (Python's limit on int(str));
        # RecursionError: belt and braces, the depth is bounded above.
        except (ValueError, RecursionError) as e:
            raise self.error(f"entry {key!r} is not valid JSON ({type(e).__name__}: {e})") from None

    def close(self):
        self.zip.close()


def _magic_ok(path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def load_model(path, backend="cpu", dtype=None, compile=True):
    """Load a model saved by :meth:`Model.save` (formats 1 and 2), validating everything.

    The optimizer (with its state) is restored when the checkpoint has one and ``compile``;
    ``model.checkpoint_meta`` holds the saved epoch, generator state and extras, and the model's
    generator continues from the saved state.

    Raises
    ------
    FileNotFoundError
        No file at ``path``.
    CheckpointError
        (a ValueError) anything wrong with the file, naming it and the problem.
    """
    # The caller's arguments first, so that a bad one is blamed on the argument, not the file.
    check_backend_name(backend)
    if dtype is not None:
        check_dtype(dtype)
    if not isinstance(compile, (bool, np.bool_)):
        raise TypeError(f"compile must be a bool, got {type(compile).__name__}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    if os.path.isdir(path) or os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint {path}: empty or a directory, not an .npz archive")
    if not _magic_ok(path):
        raise CheckpointError(f"checkpoint {path}: not an .npz archive (a text file or damaged?)")
    archive = _Archive(path)
    try:
        return _load(archive, backend, dtype, compile)
    finally:
        archive.close()


def _load(ar: _Archive, backend, dtype, compile):
    if "__architecture__" not in ar.names:
        raise ar.error("not a fastconv checkpoint (no '__architecture__' entry)")
    arch = ar.json("__architecture__")
    if not isinstance(arch, dict):
        raise ar.error("'__architecture__' is not a JSON object")
    fmt, version = arch.get("format"), arch.get("version")
    if fmt == _FORMAT1 and version == 1:
        config, legacy = _format1_to_config(arch), True
    elif fmt == FORMAT and version == FORMAT_VERSION:
        config, legacy = arch, False
    elif fmt in (FORMAT, _FORMAT1):
        raise ar.error(f"unsupported format version {version!r} (this fastconv reads 1 and 2)")
    else:
        raise ar.error(f"not a fastconv checkpoint (format {fmt!r})")
    try:
        model = model_from_config(config, backend, dtype, allocate=False)
    except CheckpointError as e:
        raise ar.error(str(e)) from None

    entries = model.weight_entries()
    if legacy:
        keys = [f"weights/{i:03d}" for i in range(len(entries))]
    else:
        keys = [f"weights/{layer.name}/{name}" for layer, name in entries]
    stored = {n for n in ar.names if n.startswith("weights/")}
    if stored != set(keys):
        extra, missing = sorted(stored - set(keys)), sorted(set(keys) - stored)
        raise ar.error(
            f"weights do not match the architecture (missing {missing[:5]}, unexpected {extra[:5]})"
        )
    for key, (layer, name) in zip(keys, entries, strict=True):  # shapes first, then data
        spec_shape = _spec_shape(layer, name)
        got, _ = ar.header(key)
        if got != spec_shape:
            raise ar.error(f"{key} ({layer.name}/{name}) has shape {got}, expected {spec_shape}")
    fill_weights(model, [ar.array(k) for k in keys])

    meta = ar.json("__meta__") if "__meta__" in ar.names else {}
    problem = meta_problem(meta, strict=False)
    if problem:
        raise ar.error(f"'__meta__': {problem[1]}")
    if meta.get("rng_state"):
        try:
            model.rng.bit_generator.state = meta["rng_state"]
        except (TypeError, ValueError, KeyError, OverflowError) as e:
            raise ar.error(f"bad generator state in '__meta__' ({type(e).__name__}: {e})") from None
    model.checkpoint_meta = meta
    if compile and "__optimizer__" in ar.names:
        _restore_optimizer(ar, model, meta, legacy)
    return model


def _spec_shape(layer, name):
    for spec in layer.weight_specs(layer.input_shape):
        if spec.name == name:
            return tuple(spec.shape)
    raise KeyError(name)


def fill_weights(model, arrays) -> None:
    """Set every weight of a model built with ``allocate=False`` (or any model) from NumPy
    arrays in :meth:`Model.weight_entries` order, converting backend and dtype."""
    for (layer, name), value in zip(model.weight_entries(), arrays, strict=True):
        dtype = layer.weight_dtype(name, model.dtype)
        layer.set_weight(name, model.backend.asarray(np.array(value, copy=True), dtype))


def _restore_optimizer(ar: _Archive, model, meta, legacy):
    spec = ar.json("__optimizer__")
    if not isinstance(spec, dict) or not isinstance(spec.get("config"), dict):
        raise ar.error("'__optimizer__' must be {'class', 'config'}")
    cls = optimizers_mod.OPTIMIZER_CLASSES.get(spec.get("class"))
    if cls is None:
        raise ar.error(f"unknown optimizer class {spec.get('class')!r}")
    try:
        optimizer = cls(**spec["config"])
        loss = losses_mod.get(meta.get("loss") or "softmax_cross_entropy")
    except (TypeError, ValueError) as e:
        raise ar.error(f"bad optimizer or loss settings ({e})") from None
    model.compile(optimizer, loss)
    trainable = model.trainable_weight_keys()
    keys = [f"{a}/{b}" for a, b in trainable]
    params = model.parameters()
    file_keys = [str(i) for i in range(len(keys))] if legacy else keys
    iterations = int(ar.array("optimizer/iterations", shape=(), kinds="iu"))
    state = {"iterations": iterations}
    if iterations > 0:
        for fkey, p in zip(file_keys, params, strict=True):
            for slot in (*optimizer.slots, "master"):
                entry = f"optimizer/{slot}/{fkey}"
                if slot == "master" and entry not in ar.names:
                    continue
                state[f"{slot}/{fkey}"] = ar.array(entry, shape=tuple(p.shape))
    if legacy:  # index keys -> "layer/weight" keys
        state = {
            (k if k == "iterations" else f"{k.split('/')[0]}/{keys[int(k.split('/')[1])]}"): v
            for k, v in state.items()
        }
    try:
        optimizer.load_state_dict(state, params, keys)
    except ValueError as e:
        raise ar.error(str(e)) from None
