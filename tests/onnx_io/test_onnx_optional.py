"""onnx is optional: ``import fastconv`` (and of ``fastconv.onnx`` itself) never imports it, and
without it export and load say what to install. These tests need no oracle: they run in every
CI stage."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fastconv import models
from fastconv import onnx as fc_onnx


def test_importing_fastconv_does_not_import_onnx():
    code = (
        "import sys, fastconv, fastconv.nn, fastconv.models, fastconv.onnx, fastconv.cli, "
        "fastconv.benchmark\n"
        "loaded = sorted(m for m in ('onnx', 'onnxruntime') if m in sys.modules)\n"
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_without_onnx_export_and_load_say_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now raises ImportError
    model = models.resnet_mnist(seed=0)
    for call in (
        lambda: fc_onnx.export(model, tmp_path / "m.onnx"),
        lambda: fc_onnx.to_onnx(model),
        lambda: fc_onnx.load(tmp_path / "m.onnx"),
    ):
        with pytest.raises(ImportError, match=r"pip install 'fastconv\[onnx\]'"):
            call()
    assert list(tmp_path.iterdir()) == []
