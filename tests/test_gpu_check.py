"""bench/gpu_check.py, the one-shot GPU check, run end to end here against the stand-in CuPy.

On this CPU-only machine ``--fake-cupy`` proves the script's plumbing: every section runs on
the stand-in (emulated kernels, modelled cuBLAS, PyTorch on the CPU), the report is written,
a failing section is reported without stopping the others, and the time budget is honoured.
What the numbers mean on a device is for the real run (docs/gpu.md).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ emulates the kernels")


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(*args, timeout=600):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT)},
    )


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    done = _run("--out", str(tmp_path / "r"), "--dry-run")
    assert done.returncode == 0, done.stderr
    for section in ("environment", "tests", "compute_sanitizer", "fp16_over_2_31", "training"):
        assert section in done.stdout
    assert not (tmp_path / "r").exists()


def test_the_whole_check_runs_end_to_end_on_the_standin(torch, tmp_path):
    out = tmp_path / "report"
    done = _run("--out", str(out), "--fake-cupy")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    sections = report["sections"]
    assert list(sections) == list(_load().SECTIONS)
    expected_skips = {"compute_sanitizer"} if shutil.which("compute-sanitizer") is None else set()
    for name, entry in sections.items():
        want = "skipped" if name in expected_skips else "ok"
        assert entry["status"] == want, (name, entry)
    assert "passed" in sections["tests"]["data"]["summary"]
    dve = sections["device_vs_emulation"]["data"]
    assert dve["cases"] >= 20 and not dve["failures"]
    assert {"im2col float16", "conv2d_backward_dx float32"} <= set(dve["worst_relative_error"])
    rows = sections["layers"]["data"]["rows"]
    assert {r["layer"] for r in rows} >= {"conv1", "conv6", "pool3"}
    assert all(r["max_rel_diff_vs_torch"] < 1e-4 for r in rows)  # same results as PyTorch
    train = sections["training"]["data"]
    assert set(train["step_ms"]) == {"float32", "float16"} and train["fastconv_epoch_s"] > 0
    md = (out / "gpu_check.md").read_text()
    assert "| layers | ok |" in md and "| conv6 | float32 | backward |" in md


def test_a_failing_section_is_reported_and_the_rest_still_run(tmp_path, monkeypatch):
    from fastconv.gpu import _standin

    mod = _load()

    def broken(c):
        raise RuntimeError("planted failure")

    monkeypatch.setitem(mod.FUNCTIONS, "stream", broken)
    with _standin.activated():
        rc = mod.main(["--out", str(tmp_path), "--fake-cupy", "--only", "stream",
                       "launch_overhead"])  # fmt: skip
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rc == 1
    assert report["sections"]["stream"]["status"] == "failed"
    assert "planted failure" in report["sections"]["stream"]["error"]
    assert report["sections"]["launch_overhead"]["status"] == "ok"
    assert "planted failure" in (tmp_path / "gpu_check.md").read_text()


def test_sections_past_the_time_budget_are_skipped(tmp_path):
    from fastconv.gpu import _standin

    mod = _load()
    with _standin.activated():
        rc = mod.main(["--out", str(tmp_path), "--fake-cupy", "--budget-s", "1", "--only",
                       "environment", "layers", "training"])  # fmt: skip
    sections = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]
    assert rc == 0
    assert sections["environment"]["status"] == "ok"
    for name in ("layers", "training"):
        assert sections[name]["status"] == "skipped" and "time budget" in sections[name]["reason"]


def test_without_a_gpu_it_says_why_and_exits_2(tmp_path, monkeypatch):
    from fastconv import gpu

    mod = _load()
    monkeypatch.setitem(sys.modules, "cupy", None)
    gpu.reset()
    try:
        rc = mod.main(["--out", str(tmp_path)])
    finally:
        gpu.reset()
    assert rc == 2
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert "CuPy is not installed" in report["unavailable_reason"]
