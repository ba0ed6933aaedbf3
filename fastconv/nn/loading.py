"""Loading checkpoints (format in :mod:`fastconv.nn.saving`): the one validating loader.

Loading validates everything before it allocates anything the file does not hold: the archive
(zip structure and CRCs), every entry's presence, each array's shape and dtype (read from the
``.npy`` header before its data), the architecture's layer classes and arguments (weights are
declared from the architecture without being created, then compared with the stored shapes),
the metadata (:func:`fastconv.nn.saving.meta_problem`), the optimizer and its state. Every
problem raises :class:`~fastconv.nn.saving.CheckpointError`, naming the file.
"""

from __future__ import annotations

import io
import json
import os
import zipfile

import numpy as np

from . import losses as losses_mod
from . import optimizers as optimizers_mod
from .backend import check_backend_name, check_dtype
from .model import _spec_shape, fill_weights, model_from_config
from .saving import (
    _FORMAT1,
    _MAX_JSON,
    FORMAT,
    FORMAT_VERSION,
    MAX_JSON_DEPTH,
    CheckpointError,
    json_depth,
    meta_problem,
)

__all__ = ["load_model"]


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
