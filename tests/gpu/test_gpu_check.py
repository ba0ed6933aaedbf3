"""bench/gpu_check.py, the one-shot check for a lent GPU, proven here without one.

``--dry-run`` runs every section's code on the CPU against the stand-in CuPy (emulated
kernels, modelled cuBLAS, PyTorch on the CPU when installed) with tiny sizes. These tests run it
end to end, kill it mid-run and check the report keeps the finished sections, let a section
overrun its cap and check its whole process group dies, plant a failure, and take CuPy away.
What the numbers mean on a device is for the real run (docs/gpu.md).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.py"

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ emulates the kernels")


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "FASTCONV_GPU_CHECK_HOOK")}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def _run(*args, timeout=240, **env):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=_env(**env))  # fmt: skip


def _report(out: Path) -> dict:
    return json.loads((out / "gpu_check.json").read_text())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0): read its state.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _wait_dead(pids, seconds=10.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        alive = [p for p in pids if _alive(p)]
        if not alive:
            return []
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


def _kill(pids):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_plan_prints_and_writes_nothing(tmp_path):
    done = _run("--plan", OUT=str(tmp_path / "r"))
    assert done.returncode == 0, done.stderr
    for section in _load().SECTIONS:
        assert f"``{section}``" in done.stdout
    assert not (tmp_path / "r").exists()


def test_without_out_or_OUT_it_refuses_to_start(tmp_path):
    done = _run("--dry-run")
    assert done.returncode == 2
    assert "pass --out DIR or set $OUT" in done.stderr


# Marked torch but not skipped without it: the first CI stage checks the run without PyTorch
# (the comparison not judged, and why), the oracle stage the comparison itself.
@pytest.mark.torch
def test_dry_run_end_to_end_writes_to_OUT(tmp_path):
    """The whole script on the stand-in, report directory from $OUT (no --out)."""
    out = tmp_path / "report"
    done = _run("--dry-run", OUT=str(out))  # _run's time-out bounds a hang
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = _report(out)
    sections = report["sections"]
    assert list(sections) == list(_load().SECTIONS)  # ordered by value
    assert report["finished"] and report["failures"] == []
    has_torch = importlib.util.find_spec("torch") is not None
    for name, entry in sections.items():
        if name == "layers" and not has_torch:
            assert entry["status"] == "skipped" and "PyTorch" in entry["summary"], entry
        else:
            assert entry["status"] == "ok", (name, entry)
        # Nothing judged false; timing goals are not judged on the stand-in.
        assert all(g["met"] is not False for g in entry.get("goals", [])), (name, entry)
    correctness = sections["correctness"]
    assert len(correctness["goals"]) == 5 and all(g["met"] for g in correctness["goals"])
    assert correctness["data"]["tour_entries"] >= 90 and correctness["data"]["random"]["cases"]
    assert "passed" in sections["tests"]["summary"]
    tour = sections["sanitizer"]["data"]["runs"]["plain"]["coverage"]
    assert tour["missing"] == [] and tour["launched"] >= 2 * 27
    assert sections["chunked"]["data"]["forced"]["chunks"] == 4
    train = sections["training"]["data"]
    assert set(train["fastconv_step_ms"]["by_phase"]) >= {"forward", "backward", "update"}
    assert train["launches_per_step"]["kernels"] > 0 and train["launches_per_step"]["gemms"] > 0
    if not has_torch:  # fastconv's side measured, the comparison not judged, and why
        epoch_goal = next(g for g in sections["training"]["goals"] if "eager" in g["goal"])
        assert epoch_goal["met"] is None and "PyTorch is not installed" in epoch_goal["detail"]
    if has_torch:
        rows = sections["layers"]["data"]["rows"]
        assert {r["layer"] for r in rows} >= {"mnist conv1", "resnet conv5_x", "mnist pool3"}
        assert all(r["agrees_with_torch"] for r in rows)
        timing = [g for g in sections["layers"]["goals"] if "cuDNN" in g["goal"]]
        assert timing and timing[0]["met"] is None  # stand-in timings are not judged
        assert set(train["torch_step_ms"]) == {"forward", "loss", "backward", "update"}
    md = (out / "gpu_check.md").read_text()
    assert "| correctness | ok | 5/5 |" in md and "No failures" in md


def test_a_killed_run_keeps_the_sections_it_finished(tmp_path):
    """SIGKILL of the whole run (its process group) while the third section hangs: the report
    on disk holds the first two sections, complete; the hung section's child, in a process
    group of its own, notices its parent is gone and kills its group."""
    out = tmp_path / "report"
    p = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--dry-run", "--only", "environment", "correctness",
         "chunked", "fp16"],
        cwd=ROOT, env=_env(OUT=str(out), FASTCONV_GPU_CHECK_HOOK="hang:chunked"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    pids = []
    try:
        partial = out / "logs" / "chunked.partial.json"
        deadline = time.monotonic() + 120
        while not partial.exists():
            assert time.monotonic() < deadline, "the hung section never started"
            assert p.poll() is None, "the run ended before the hang"
            time.sleep(0.2)
        pids = json.loads(partial.read_text())["data"]["hook_pids"]
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
        report = _report(out)
        s = report["sections"]
        assert s["environment"]["status"] == "ok" and s["correctness"]["status"] == "ok"
        assert all(g["met"] for g in s["correctness"]["goals"])
        assert s["chunked"]["status"] == "running" and s["fp16"]["status"] == "pending"
        assert report["finished"] is False
        md = (out / "gpu_check.md").read_text()
        assert "NOT finished" in md and "| correctness | ok | 5/5 |" in md
        assert _wait_dead(pids) == [], "the hung section outlived the run"
    finally:
        _kill(pids)
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)


def test_a_section_over_its_cap_is_killed_with_its_process_group(tmp_path):
    """The hung section and the grandchild it started die at the cap (os.killpg of the
    section's group); the report says so, with the child's output as text, and the next
    section still runs."""
    out = tmp_path / "report"
    done = _run("--dry-run", "--only", "environment", "correctness", "chunked",
                "--cap", "correctness=8", OUT=str(out),
                FASTCONV_GPU_CHECK_HOOK="hang:correctness")  # fmt: skip
    report = _report(out)
    s = report["sections"]["correctness"]
    pids = s["data"]["hook_pids"]
    try:
        assert done.returncode == 1, done.stdout + done.stderr
        assert s["status"] == "timeout" and "8 s cap" in s["summary"]
        assert "this section hangs \u2014 ü ✓" in s["log_tail"]  # text, not a bytes repr
        assert "b'" not in s["log_tail"]
        assert _wait_dead(pids, 5) == [], "a process of the timed-out section survived"
        assert report["sections"]["chunked"]["status"] == "ok"
        assert any(f.startswith("correctness: timeout") for f in report["failures"])
        assert "FAILED: correctness: timeout" in done.stdout
    finally:
        _kill(pids)


def test_a_failing_section_is_reported_and_the_rest_still_run(tmp_path):
    out = tmp_path / "report"
    done = _run("--dry-run", "--only", "environment", "correctness", "chunked", OUT=str(out),
                FASTCONV_GPU_CHECK_HOOK="raise:correctness")  # fmt: skip
    assert done.returncode == 1
    report = _report(out)
    s = report["sections"]
    assert s["correctness"]["status"] == "failed"
    assert "planted failure" in s["correctness"]["error"]
    assert s["chunked"]["status"] == "ok"
    assert report["failures"] == ["correctness: failed: RuntimeError: planted failure (test hook)"]
    assert "planted failure" in (out / "gpu_check.md").read_text()


def test_missed_goals_are_failures_and_unjudged_ones_are_not():
    mod = _load()
    report = {
        "mode": "device", "started": "t", "budget_s": 470, "finished": True, "seconds": 1,
        "sections": {
            "layers": {"status": "ok", "goals": [
                {"goal": "every conv layer <= 1.5x cuDNN", "met": False, "detail": "conv3 2x"},
                {"goal": "agreement", "met": True, "detail": ""}]},
            "fp16": {"status": "ok", "goals": [
                {"goal": "float16 faster", "met": None, "detail": "dry"}]},
            "tests": {"status": "timeout", "summary": "killed", "goals": []},
        },
    }  # fmt: skip
    assert mod.failures(report) == [
        "layers: goal missed: every conv layer <= 1.5x cuDNN (conv3 2x)",
        "tests: timeout: killed",
    ]
    report["failures"] = mod.failures(report)
    md = mod.to_markdown(report)
    assert "goal MISSED: every conv layer" in md and "| layers | ok | 1/2 |" in md
    assert "| fp16 | ok | 0/0 (1 not judged) |" in md


def test_sections_past_the_time_budget_are_skipped(tmp_path, monkeypatch):
    mod = _load()

    def quick(args, name, cap, work, env):
        time.sleep(0.3)
        return {"status": "ok", "data": {"fastconv_gpu_available": True}, "goals": [],
                "seconds": 0.3}  # fmt: skip

    monkeypatch.setattr(mod, "_run_python_section", quick)
    rc = mod.main(["--out", str(tmp_path), "--dry-run", "--budget-s", "5.2", "--only",
                   "layers", "training"])  # fmt: skip
    sections = _report(tmp_path)["sections"]
    assert rc == 0
    assert sections["environment"]["status"] == "ok"
    for name in ("layers", "training"):
        assert sections[name]["status"] == "skipped" and "time budget" in sections[name]["summary"]


def test_the_tour_reports_kernels_it_did_not_launch(tmp_path, monkeypatch):
    """The sanitizer tour's coverage check can fail: a tour run in float32 only leaves every
    half instantiation unlaunched, and says which."""
    mod = _load()
    from fastconv_testing import cupy_standin as _standin

    tour = mod.kernel_tour
    monkeypatch.setattr(mod, "kernel_tour", lambda k, dev, host: tour(k, dev, host, ("float32",)))
    args = mod.parse_args(["--tour", "--dry-run", "--work", str(tmp_path), "--tour-label", "t"])
    with _standin.activated():
        rc = mod.tour_main(args)
        assert _standin.stats.allocators == [None]  # the pool was disabled first
    cov = json.loads((tmp_path / "tour-t.json").read_text())
    assert rc == 4 and ["dropout", "float16"] in cov["missing"]
    assert all(d == "float16" for _, d in cov["missing"])


def test_without_a_gpu_it_says_why_and_exits_2(tmp_path):
    """CuPy missing: the environment section says why, the rest are skipped, exit status 2."""
    fake = tmp_path / "no_cupy"
    fake.mkdir()
    (fake / "cupy.py").write_text("raise ImportError('no CuPy in this test')\n")
    out = tmp_path / "report"
    done = _run("--only", "environment", "correctness", OUT=str(out),
                PYTHONPATH=f"{fake}{os.pathsep}{ROOT}")  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    report = _report(out)
    assert "CuPy is not installed" in report["unavailable_reason"]
    assert report["sections"]["correctness"]["status"] == "skipped"
    assert "No usable GPU" in (out / "gpu_check.md").read_text()


def test_device_tests_pass_on_the_standin():
    """Every ``gpu``-marked test, run against the stand-in CuPy: a device test that cannot pass
    (a wrong expectation, not a device problem) shows up here instead of on a lent GPU."""
    from fastconv_testing import cupy_standin as _standin

    env = _env(PYTHONPATH=os.pathsep.join([str(ROOT), _standin.PATH_DIR]))
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests/"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and " failed" not in done.stdout
