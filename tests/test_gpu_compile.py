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


# --- NVRTC: the compiler CuPy's RawModule actually uses ----------------------------------------


def _find_nvrtc():
    """(libnvrtc path, CUDA include dir holding cuda_fp16.h) or None."""
    import ctypes.util
    import glob
    import importlib.util
    import os

    libs = []
    spec = importlib.util.find_spec("nvidia")  # pip wheels nvidia-cuda-nvrtc(-cu12)
    for root in spec.submodule_search_locations if spec else []:
        libs += sorted(glob.glob(os.path.join(root, "*", "lib", "libnvrtc.so.*")))
    cuda_roots = [os.environ.get("CUDA_PATH", ""), "/usr/local/cuda"]
    cuda_roots += sorted(glob.glob("/usr/local/cuda-*"))
    for root in cuda_roots:
        libs += sorted(glob.glob(os.path.join(root, "lib64", "libnvrtc.so*")))
    found = ctypes.util.find_library("nvrtc")
    libs += [found] if found else []
    libs = [p for p in libs if "builtins" not in p and ".alt." not in p]
    include = next(
        (os.path.join(r, "include") for r in cuda_roots
         if r and os.path.exists(os.path.join(r, "include", "cuda_fp16.h"))),
        None,
    )  # fmt: skip
    return (libs[0], include) if libs and include else None


NVRTC = _find_nvrtc()


@pytest.mark.skipif(
    NVRTC is None, reason="libnvrtc (pip install nvidia-cuda-nvrtc) or CUDA headers not found"
)
@pytest.mark.parametrize("arch", ["compute_80", "compute_90"])
def test_nvrtc_compiles_the_module_with_every_name_expression(arch):
    """What cupy.RawModule(code=..., options=("-std=c++17",), name_expressions=...) does, through
    the NVRTC C API: compile the module string, then lower every name expression."""
    import ctypes
    import glob
    import os

    lib_path, include = NVRTC
    # libnvrtc dlopens its builtins library from its own directory; load it first by path.
    for builtins in glob.glob(os.path.join(os.path.dirname(lib_path), "libnvrtc-builtins.so*")):
        if ".alt." not in builtins:
            ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
    nvrtc = ctypes.CDLL(lib_path)
    prog = ctypes.c_void_p()
    src = _source.module_source().encode()
    assert nvrtc.nvrtcCreateProgram(ctypes.byref(prog), src, b"fastconv.cu", 0, None, None) == 0
    try:
        names = _source.name_expressions()
        for name in names:
            assert nvrtc.nvrtcAddNameExpression(prog, name.encode()) == 0, name
        opts = [b"-std=c++17", f"--gpu-architecture={arch}".encode(), f"-I{include}".encode()]
        rc = nvrtc.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        size = ctypes.c_size_t()
        nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        nvrtc.nvrtcGetProgramLog(prog, log)
        assert rc == 0, log.value.decode(errors="replace")
        lowered = set()
        for name in names:
            out = ctypes.c_char_p()
            assert nvrtc.nvrtcGetLoweredName(prog, name.encode(), ctypes.byref(out)) == 0, name
            kernel = name.split("<")[0]
            assert out.value.decode().startswith(f"_Z{len(kernel)}{kernel}I"), (name, out.value)
            lowered.add(out.value)
        assert len(lowered) == len(names)
    finally:
        nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))
