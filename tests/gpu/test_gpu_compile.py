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
from conftest import need_oracle

from fastconv.gpu import _source

NVCC = shutil.which("nvcc") or shutil.which("/usr/local/cuda/bin/nvcc")
requires_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc (CUDA toolkit) is not installed")

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


@requires_nvcc
@pytest.mark.parametrize("arch", ARCHES)
def test_all_kernels_compile(ptx, arch):
    rc, err, _ = ptx[arch]
    assert rc == 0, f"nvcc -arch={arch} failed:\n{err}"


@requires_nvcc
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
    """(libnvrtc path, CUDA include dir holding cuda_fp16.h, how found) or None.

    First as CuPy >= 14 finds them (``cuda.pathfinder``: NVRTC's library, then the ``cudart``
    header directory, e.g. from ``pip install "cuda-toolkit[cudart,nvrtc]==13.*"``, which is
    what ``cupy-cuda13x[ctk]`` and this project's ``gpu-check`` extra install); else a local
    CUDA toolkit."""
    import ctypes.util
    import glob
    import os

    try:
        import cuda.pathfinder as pathfinder

        lib = pathfinder.load_nvidia_dynamic_lib("nvrtc").abs_path
        include = pathfinder.find_nvidia_header_directory("cudart")
        if lib and include and os.path.exists(os.path.join(include, "cuda_fp16.h")):
            return lib, include, "cuda.pathfinder (as CuPy)"
    except Exception:
        pass
    libs = []
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
    return (libs[0], include, "CUDA toolkit") if libs and include else None


NVRTC = _find_nvrtc()
# What CuPy adds to our options for every RawModule compile (cupy/cuda/compiler.py appends
# -ftz=true last; NVRTC takes the last value of a repeated option).
CUPY_APPENDED = ("-ftz=true",)


def _nvrtc_compile(arch: str, options):
    """Compile the module string as cupy.RawModule does; return (rc, log, ptx, lowered names)."""
    import ctypes
    import glob
    import os

    lib_path, include, _ = NVRTC
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
        opts = [o.encode() for o in options]
        opts += [f"--gpu-architecture={arch}".encode(), f"-I{include}".encode()]
        rc = nvrtc.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        size = ctypes.c_size_t()
        nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        nvrtc.nvrtcGetProgramLog(prog, log)
        if rc != 0:
            return rc, log.value.decode(errors="replace"), "", {}
        nvrtc.nvrtcGetPTXSize(prog, ctypes.byref(size))
        ptx = ctypes.create_string_buffer(size.value)
        nvrtc.nvrtcGetPTX(prog, ptx)
        lowered = {}
        for name in names:
            out = ctypes.c_char_p()
            assert nvrtc.nvrtcGetLoweredName(prog, name.encode(), ctypes.byref(out)) == 0, name
            lowered[name] = out.value.decode()
        return rc, log.value.decode(errors="replace"), ptx.value.decode(), lowered
    finally:
        nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))


@pytest.fixture
def nvrtc_available():
    need_oracle("nvrtc", None if NVRTC else "libnvrtc and the CUDA headers (cuda_fp16.h) not found")


def requires_nvrtc(test):
    """The ``nvrtc`` marker (CI's oracle stage) and the skip, or failure there, without it."""
    return pytest.mark.nvrtc(pytest.mark.usefixtures("nvrtc_available")(test))


@requires_nvrtc
@pytest.mark.parametrize("arch", ["compute_80", "compute_90"])
def test_nvrtc_compiles_the_module_with_every_name_expression(arch):
    """What cupy.RawModule(code=..., options=NVRTC_OPTIONS, name_expressions=...) does, through
    the NVRTC C API: compile the module string, then lower every name expression."""
    rc, log, _, lowered = _nvrtc_compile(arch, _source.NVRTC_OPTIONS + CUPY_APPENDED)
    assert rc == 0, log
    for name, mangled in lowered.items():
        kernel = name.split("<")[0]
        assert mangled.startswith(f"_Z{len(kernel)}{kernel}I"), (name, mangled)
    assert len(set(lowered.values())) == len(_source.name_expressions())


def _f32_arithmetic(ptx: str) -> list[str]:
    return re.findall(r"^\s+((?:add|sub|mul|fma|div|setp\.\w+)\.[\w.]*f32)\b", ptx, re.M)


@requires_nvrtc
def test_device_float_semantics_are_pinned_in_the_ptx():
    """The flags CuPy ends up giving NVRTC flush float32 subnormals (.ftz on every float32
    add/mul/compare) and never contract to FMA; NVRTC's defaults alone would emit fma.rn.f32
    (shown here too, so this test would notice if the options stopped mattering)."""
    rc, log, ptx, _ = _nvrtc_compile("compute_90", _source.NVRTC_OPTIONS + CUPY_APPENDED)
    assert rc == 0, log
    ops = _f32_arithmetic(ptx)
    assert ops, "no float32 arithmetic found in the PTX"
    assert all(".ftz" in op for op in ops), sorted(set(ops))
    assert not any(op.startswith("fma") for op in ops), sorted(set(ops))
    rc, log, default_ptx, _ = _nvrtc_compile("compute_90", ("-std=c++17",))
    assert rc == 0, log
    assert any(op.startswith("fma.rn.f32") for op in _f32_arithmetic(default_ptx))


@requires_nvrtc
def test_nvrtc_without_the_headers_fails_on_cuda_fp16_h(tmp_path):
    """Without the runtime headers (a CuPy install without [ctk]) the module cannot compile:
    the message fastconv's availability check turns into an install hint."""
    global NVRTC
    saved = NVRTC
    NVRTC = (saved[0], str(tmp_path), saved[2])  # an include dir without cuda_fp16.h
    try:
        rc, log, _, _ = _nvrtc_compile("compute_90", _source.NVRTC_OPTIONS)
    finally:
        NVRTC = saved
    assert rc != 0 and "cuda_fp16.h" in log, log
    from fastconv import gpu

    reason = gpu._compile_problem(RuntimeError(log), 13000)
    assert "cuda_fp16.h" in reason and "fastconv[gpu]" in reason and "cuda-toolkit" in reason
