"""PROVISIONAL GPU backend placeholder: replaced by the CuPy implementation."""


def available():
    return False


def to_gpu(x):
    raise RuntimeError("the GPU backend is not implemented yet")
