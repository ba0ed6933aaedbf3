"""fastconv.cpu prefers Numba's OpenMP threading layer unless the user chose one."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# A parallel kernel must run before numba.threading_layer() can answer (small pooling calls
# run serially: cpu.pool.SERIAL_POOL_VALUES).
PROGRAM = """
import numpy as np, numba, fastconv
fastconv.max_pool2d(np.zeros((1, 1, 256, 256), np.float32))  # above the serial threshold
print(numba.threading_layer())
"""


def _layer_in_subprocess(env_update):
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_THREADING_LAYER")}
    env.update(env_update)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run(
        [sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def test_default_prefers_omp():
    pytest.importorskip("numba.np.ufunc.omppool")
    assert _layer_in_subprocess({}) == "omp"


@pytest.mark.parametrize("layer", ["omp", "workqueue"])
def test_user_choice_is_kept(layer):
    pytest.importorskip("numba.np.ufunc.omppool")
    assert _layer_in_subprocess({"NUMBA_THREADING_LAYER": layer}) == layer
