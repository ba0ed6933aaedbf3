"""Every CUDA kernel compiles with nvcc to PTX for sm_80 and sm_90, in float and __half.

One translation unit per architecture holds exactly the string CuPy's NVRTC compiles
(:func:`fastconv.gpu._source.module_source`: the kernel files, no include path) and explicitly
instantiates each kernel from the signature table the launchers use, so a kernel that does not
compile, or a table entry that drifts from the source, fails here. Both arches compile in
parallel. Nothing runs: there is no GPU in CI.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from fastconv.gpu import _source

NVCC = shutil.which("nvcc") or shutil.which("/usr/local/cuda/bin/nvcc")
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc (CUDA toolkit) is not installed")

ARCHES = ("sm_80", "sm_90")


@pytest.fixture(scope="module")
def ptx(tmp_path_factory):
    """Compile once per arch (concurrently); map arch -> (returncode, stderr, ptx text)."""
    tmp = tmp_path_factory.mktemp("nvcc")
    tu = tmp / "all_kernels.cu"
    tu.write_text(_source.module_source() + _source.explicit_instantiations())
    procs = {}
    for arch in ARCHES:
        ptx_file = tmp / f"{arch}.ptx"
        cmd = [NVCC, "--ptx", "-std=c++17", f"-arch={arch}", str(tu), "-o", str(ptx_file)]
        procs[arch] = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    out = {}
    for arch, p in procs.items():
        _, err = p.communicate(timeout=300)
        text = (tmp / f"{arch}.ptx").read_text() if p.returncode == 0 else ""
        out[arch] = (p.returncode, err, text)
    return out


@pytest.mark.parametrize("arch", ARCHES)
def test_all_kernels_compile(ptx, arch):
    rc, err, _ = ptx[arch]
    assert rc == 0, f"nvcc -arch={arch} failed:\n{err}"


@pytest.mark.parametrize("arch", ARCHES)
def test_every_kernel_and_precision_is_emitted(ptx, arch):
    rc, err, text = ptx[arch]
    assert rc == 0, err
    entries = re.findall(r"\.entry\s+(\w+)\(", text)
    # Mangled names start _Z<len><name>I<type>: f = float, 6__half = __half.
    for kernel in _source.SIGNATURES:
        for mangled_type in ("If", "I6__half"):
            prefix = f"_Z{len(kernel)}{kernel}{mangled_type}"
            assert any(e.startswith(prefix) for e in entries), (kernel, mangled_type, entries)
    assert len(entries) == 2 * len(_source.SIGNATURES)


def test_module_source_is_self_contained():
    """NVRTC gets one string with no include path: the local include must be inlined."""
    src = _source.module_source()
    assert '#include "common.cuh"' not in src
    for kernel in _source.SIGNATURES:
        assert re.search(rf"__global__ void {kernel}\(", src), kernel
    assert len(_source.name_expressions()) == 2 * len(_source.SIGNATURES)
