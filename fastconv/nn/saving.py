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

Loading validates everything before it allocates anything the file does not hold: the archive
(zip structure and CRCs), every entry's presence, each array's shape and dtype (read from the
``.npy`` header before its data), the architecture's layer classes and arguments (weights are
declared from the architecture without being created, then compared with the stored shapes),
the optimizer and its state. Every problem raises :class:`CheckpointError`, naming the file.
"""

from __future__ import annotations

import io
import json
import os
import zipfile

import numpy as np

from . import losses as losses_mod
from . import optimizers as optimizers_mod
from ._files import atomic_write
from .graph import Input
from .layers.base import LAYER_CLASSES

__all__ = ["CheckpointError", "save_model", "load_model", "model_from_config", "FORMAT_VERSION"]

FORMAT = "fastconv.Model"
FORMAT_VERSION = 2
_FORMAT1 = "fastconv.Sequential"
_MAX_JSON = 16 << 20  # bytes of one JSON entry


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: missing, damaged, or not what it claims to be."""


# --- writing -----------------------------------------------------------------------------------


def save_model(model, path, include_optimizer=True, epoch=None, extra=None) -> None:
    """Write ``model`` to ``path`` (``.npz``) atomically.

    ``epoch`` (finished epochs) and ``extra`` (a JSON-serialisable dict) go into ``__meta__``
    with the generator state, for resuming.
    """
    path = os.fspath(path)
    if not path.endswith(".npz"):
        raise ValueError(f"checkpoint path must end with .npz, got {path!r}")
    if not model.built:
        raise RuntimeError("cannot save a model that is not built")
    config = {"format": FORMAT, "version": FORMAT_VERSION, **model.get_config()}
    arrays = {"__architecture__": np.array(json.dumps(config))}
    for (layer, name), value in zip(model.weight_entries(), model.get_weights(), strict=True):
        arrays[f"weights/{layer.name}/{name}"] = value
    if include_optimizer and model.optimizer is not None:
        opt = {"class": type(model.optimizer).__name__, "config": model.optimizer.get_config()}
        arrays["__optimizer__"] = np.array(json.dumps(opt))
        for key, value in model.optimizer.state_dict().items():
            arrays[f"optimizer/{key}"] = value
    meta = {
        "epoch": epoch,
        "rng_state": model.rng.bit_generator.state,
        "loss": getattr(model.loss, "name", None),
        "extra": extra or {},
    }
    arrays["__meta__"] = np.array(json.dumps(meta))
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
        try:
            return json.loads(str(self.array(key, kinds="U")[()]))
        except json.JSONDecodeError as e:
            raise self.error(f"entry {key!r} is not valid JSON ({e})") from None

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
    if not isinstance(meta, dict):
        raise ar.error("'__meta__' is not a JSON object")
    if meta.get("rng_state"):
        try:
            model.rng.bit_generator.state = meta["rng_state"]
        except (TypeError, ValueError, KeyError) as e:
            raise ar.error(f"bad generator state in '__meta__' ({e})") from None
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
