"""The CUDA kernels' host emulation under AddressSanitizer + UndefinedBehaviorSanitizer.

The emulation library is rebuilt with ``-fsanitize=address,undefined`` (every finding fatal)
and every ``gpu_emulation``-marked test runs against it in a subprocess started with libasan
preloaded; a launch log proves that every kernel of ``SIGNATURES`` in both precisions ran
there, kernels added later included. Two tests test the tests: an out-of-bounds read planted in
a kernel (a bound check removed) and a signed overflow reached by bypassing validation must
each kill the sanitized process with the sanitizer's report.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fastconv.gpu import _source
from fastconv_testing import emulation as emu

ROOT = Path(__file__).resolve().parents[2]


def _sanitizer_env():
    if shutil.which("g++") is None:
        pytest.skip("g++ is needed to emulate CUDA")
    try:
        env = emu.sanitizer_env()
    except RuntimeError as e:
        pytest.skip(f"no AddressSanitizer runtime: {e}")
    env["PYTHONPATH"] = str(ROOT)
    return env


def _run(code: str, env, timeout=300):
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_emulation_tests_pass_under_asan_and_ubsan_and_cover_every_kernel(tmp_path):
    env = _sanitizer_env()
    log = tmp_path / "launches.log"
    env[emu.LOG_ENV] = str(log)
    # Fewer hypothesis examples: the sanitized build is slower and the point is memory safety.
    env["FASTCONV_HYPOTHESIS_MAX_EXAMPLES"] = "8"
    # A deliberate subset (-m gpu_emulation): the whole-run coverage gate is not its job here;
    # this test checks coverage itself, from the launch log below.
    env.pop("FASTCONV_REQUIRE_FULL_RUN", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
           "-m", "gpu_emulation", "tests/"]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-6000:]
    assert "passed" in out and "AddressSanitizer" not in out and "runtime error" not in out
    seen = {tuple(line.split()) for line in log.read_text().splitlines()}
    missing = {(k, d) for k in _source.SIGNATURES for d in _source.CTYPES} - seen
    assert not missing, f"kernels never run under the sanitizers: {sorted(missing)}"


def _drop_im2col_row_bound(name: str, text: str) -> str:
    if name != "im2col.cu":
        return text
    broken = text.replace(
        "if (h >= 0 && h < H && w >= 0 && w < W)", "if (h >= 0 && w >= 0 && w < W)"
    )
    assert broken != text, "the bound to break was not found in im2col.cu"
    return broken


def test_asan_catches_a_planted_out_of_bounds_read():
    """Test of the test: im2col without its `h < H` check reads past the end of x for the
    bottom padding rows of the last plane; the sanitized run must die with ASan's report."""
    env = _sanitizer_env()
    lib = emu.build_library(sanitize=True, mutate=_drop_im2col_row_bound)
    code = f"""
        import numpy as np
        from fastconv import _checks as chk
        from fastconv_testing import emulation as emu
        ops = emu.emulated_ops(emu.EmulatedLauncher({str(lib)!r}))
        x = np.ones((1, 1, 4, 4), np.float32)
        ops.im2col(x, chk.validate_im2col(x, 3, 3, 1, 1))
        print("NOT CAUGHT")
    """
    done = _run(code, env)
    assert done.returncode != 0 and "NOT CAUGHT" not in done.stdout, done.stdout + done.stderr
    assert "heap-buffer-overflow" in done.stderr, done.stderr[-3000:]
    # The intact library runs the same call cleanly under the same sanitizers.
    ok = _run(code.replace(repr(str(lib)), repr(str(emu.build_library(sanitize=True)))), env)
    assert ok.returncode == 0 and "NOT CAUGHT" in ok.stdout, ok.stderr[-3000:]


def test_ubsan_catches_the_int_overflow_that_validation_rules_out():
    """first_window's `t + s - 1` overflows int for a stride near 2^31: UBSan reports it when
    the kernel is launched directly, and KernelOps refuses the geometry before any launch."""
    env = _sanitizer_env()
    lib = emu.build_library(sanitize=True)
    code = f"""
        import numpy as np
        from fastconv import _checks as chk
        from fastconv_testing import emulation as emu
        launcher = emu.EmulatedLauncher({str(lib)!r})
        g = chk.validate_avg_pool_backward(
            np.ones((1, 1, 1, 1), np.float32), (1, 1, 2, 1), 1, (2**31 - 1, 1), (1, 0))
        dy, dx = np.ones((1, 1, 1, 1), np.float32), np.zeros((1, 1, 2, 1), np.float32)
        try:
            emu.emulated_ops(launcher).avg_pool2d_backward(dy, g)
        except ValueError as e:
            print("REFUSED:", e)
        launcher("avg_pool2d_backward", dx.size, dy, dx, *g)  # no validation on this path
        print("NOT CAUGHT")
    """
    done = _run(code, env)
    assert "REFUSED:" in done.stdout and "32-bit index range" in done.stdout, done.stdout
    assert done.returncode != 0 and "NOT CAUGHT" not in done.stdout, done.stdout + done.stderr
    assert "signed integer overflow" in done.stderr, done.stderr[-3000:]
