"""Data augmentation on NCHW batches: affine transforms, flips, crops and elastic distortion.

Every transform is one bilinear resampling through :func:`fastconv.ops.warp_bilinear` (Numba on
the CPU, CUDA on the GPU): rotation, scaling, shear, shifts, flips and crops compose into one
affine map per sample, and elastic distortion (Simard et al., 2003) adds a smoothed random
displacement field to it, so an image is interpolated once however many transforms apply.

Geometry (pixel units, pixel centres at integer coordinates, rows down, columns right):
``rotation`` in degrees, positive counter-clockwise as shown on screen (``np.rot90``'s
direction), about the image centre; ``scale`` > 1 enlarges the content; ``shear`` in degrees
(x-shear); ``shift = (rows, cols)`` moves the content down and right; ``flip`` mirrors left and
right. Pixels that come from outside the source image are 0. Integer source coordinates copy
pixels exactly, so the identity returns the input, a 90-degree rotation equals ``np.rot90``, a
flip ``x[..., ::-1]`` and an integer shift ``np.roll`` on a zero-padded image.

Deterministic functions (:func:`affine`, :func:`hflip`, :func:`crop`, :func:`elastic`) take
their parameters; :class:`RandomTransform` draws them, per sample, from a
:class:`numpy.random.Generator`, so a seeded generator gives the same batch on every run and
on both backends (parameters and noise are drawn on the host).
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from . import _checks as chk
from . import ops
from .device import device_of

__all__ = [
    "affine_matrices",
    "affine",
    "hflip",
    "crop",
    "elastic_flow",
    "elastic",
    "RandomTransform",
]

# Matrix entries this close to an integer are taken as that integer, so maps that should be
# exact (flips, 90-degree rotations, integer shifts) are not blurred by float64 round-off such
# as cos(pi/2) = 6e-17. A millionth of a pixel is far below anything visible.
_SNAP = 1e-6


# --- parameter checks (ValueError naming the parameter) -----------------------------------------


_MAX_PIXELS = 1e6  # shifts and elastic displacements (RandomTransform)
_MAX_SIGMA = 1000.0  # elastic smoothing (RandomTransform)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _finite(value, name, minimum=None, maximum=None, strict_min=False):
    if not _is_real(value) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    value = float(value)
    if minimum is not None and (value <= minimum if strict_min else value < minimum):
        op = ">" if strict_min else ">="
        raise ValueError(f"{name} must be {op} {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value!r}")
    return value


def _per_sample(value, name, n, low=None, high=None, low_open=False, width=None):
    """A number (broadcast) or a per-sample array of ``n`` (or ``(n, width)``) numbers, each
    finite and in [low, high] (``low`` excluded if ``low_open``); float64 (n,) or (n, width).
    Arrays are checked as a whole (this runs for every augmented batch)."""
    shape = (n,) if width is None else (n, width)
    if isinstance(value, (list, tuple, np.ndarray)):
        a = np.asarray(value)
        if a.dtype.kind not in "iuf":
            raise ValueError(f"{name} must hold numbers, got {value!r}")
        a = a.astype(np.float64)
        if width is not None and a.shape == (width,):
            a = np.broadcast_to(a, shape)
        if a.shape != shape:
            raise ValueError(
                f"{name} must be a number or an array of shape {shape}, got shape {a.shape}"
            )
        bad = ~np.isfinite(a)
        if low is not None:
            bad |= (a <= low) if low_open else (a < low)
        if high is not None:
            bad |= a > high
        if bad.any():
            first = a[bad].flat[0]
            rng = f" in [{low}, {high}]" if low is not None or high is not None else ""
            raise ValueError(f"{name} must hold finite numbers{rng}, got {first!r}")
        return a
    return np.full(shape, _finite(value, name, low, high, strict_min=low_open), dtype=np.float64)


def _size(value, name):
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an int or a pair (h, w) of ints >= 1, got {value!r}")
    try:
        return chk.as_pair(value, name, 1)
    except TypeError:
        raise ValueError(
            f"{name} must be an int or a pair (h, w) of ints >= 1, got {value!r}"
        ) from None


def _image_batch(x):
    chk.check_array(x, "x", 4)
    if x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"x must have height and width >= 1, got shape {tuple(x.shape)}")
    return x


# --- affine maps ----------------------------------------------------------------------------


def affine_matrices(
    n,
    in_size,
    out_size=None,
    rotation=0.0,
    scale=1.0,
    shear=0.0,
    shift=(0.0, 0.0),
    flip=False,
):
    """The per-sample maps :func:`fastconv.ops.warp_bilinear` takes, from output pixels to
    source points: ``(n, 2, 3)`` float32.

    The content is flipped (if ``flip``), scaled, sheared and rotated about the centre of the
    source, then moved by ``shift`` and centred in the output. Each parameter is a number
    (every sample) or an array with one value per sample (``shift``: ``(n, 2)`` or a pair).
    """
    n = chk.as_int(n, "n", 1)
    H, W = _size(in_size, "in_size")
    OH, OW = (H, W) if out_size is None else _size(out_size, "out_size")
    rot = _per_sample(rotation, "rotation", n)
    sc = _per_sample(scale, "scale", n, low=0.0, low_open=True)
    sh = _per_sample(shear, "shear", n, low=-89.0, high=89.0)
    t = _per_sample(shift, "shift", n, width=2)
    if isinstance(flip, (list, tuple, np.ndarray)):
        fl = np.asarray(flip)
        if fl.shape != (n,) or fl.dtype.kind not in "biu":
            raise ValueError(f"flip must be a bool or {n} bools, got {flip!r}")
        fl = fl.astype(bool)
    elif isinstance(flip, (bool, np.bool_)):
        fl = np.full(n, bool(flip))
    else:
        raise ValueError(f"flip must be a bool or {n} bools, got {flip!r}")

    th = np.deg2rad(rot)
    c, s = np.cos(th), np.sin(th)
    k = np.tan(np.deg2rad(sh))
    f = np.where(fl, -1.0, 1.0)
    # Forward map of the content, (x right, y down): A = R(theta) @ Shear(k) @ S(scale) @ F.
    # R is counter-clockwise on screen: [[c, s], [-s, c]] with y pointing down.
    a = np.empty((n, 2, 2))
    a[:, 0, 0] = c * sc * f
    a[:, 0, 1] = (c * k + s) * sc
    a[:, 1, 0] = -s * sc * f
    a[:, 1, 1] = (-s * k + c) * sc
    b = np.linalg.inv(a)  # output -> source
    c_in = np.array([(W - 1) / 2.0, (H - 1) / 2.0])
    c_out = np.array([(OW - 1) / 2.0, (OH - 1) / 2.0])
    move = c_out + t[:, ::-1]  # shift is (rows, cols) = (y, x)
    theta = np.empty((n, 2, 3))
    theta[:, :, :2] = b
    theta[:, :, 2] = c_in - np.einsum("nij,nj->ni", b, move)
    near = np.round(theta)
    theta = np.where(np.abs(theta - near) < _SNAP, near, theta)
    return theta.astype(np.float32)


def _on_device(a, like):
    return device_of(like).asarray(a)


def affine(x, rotation=0.0, scale=1.0, shear=0.0, shift=(0.0, 0.0), flip=False, out_size=None):
    """Apply one affine transform per sample (see the module docstring for the geometry).

    Parameters
    ----------
    x : ndarray, (N, C, H, W), float32 or float16, NumPy or CuPy
    rotation, scale, shear : number or array (N,)
        Degrees counter-clockwise; zoom factor (> 0); x-shear in degrees (-89, 89).
    shift : (rows, cols) or array (N, 2)
        Pixels down and right.
    flip : bool or array (N,)
        Mirror left-right first.
    out_size : int or (h, w), optional
        Output size (default: the input's); the content stays centred.
    """
    _image_batch(x)
    theta = affine_matrices(x.shape[0], x.shape[2:], out_size, rotation, scale, shear, shift, flip)
    return ops.warp_bilinear(x, _on_device(theta, x), None, out_size)


def hflip(x):
    """Mirror every image left-right (``x[..., ::-1]``, through the warp kernel)."""
    return affine(x, flip=True)


def _crop_shift(offsets, in_hw, out_hw, padding):
    """The content shift that puts the window at ``offsets`` (top-left, in the padded image)
    of the output: the crop is an affine shift with a new output size."""
    H, W = in_hw
    OH, OW = out_hw
    centre = np.array([(H - OH) / 2.0, (W - OW) / 2.0])
    return centre - (offsets - padding)


def _check_crop(in_hw, size, padding):
    OH, OW = _size(size, "size")
    if isinstance(padding, bool) or not isinstance(padding, numbers.Integral) or padding < 0:
        raise ValueError(f"padding must be an int >= 0, got {padding!r}")
    padding = int(padding)
    H, W = in_hw
    if OH > H + 2 * padding or OW > W + 2 * padding:
        raise ValueError(
            f"size {(OH, OW)} must fit in the padded image {(H + 2 * padding, W + 2 * padding)} "
            f"(input {(H, W)}, padding {padding})"
        )
    return (OH, OW), padding


def crop(x, offsets, size, padding=0):
    """Crop windows of ``size`` out of the zero-padded images.

    Parameters
    ----------
    x : ndarray, (N, C, H, W)
    offsets : (top, left) or array (N, 2) of ints
        The window's top-left corner in the image padded by ``padding`` on every side,
        ``0 <= top <= H + 2*padding - size[0]`` (likewise ``left``).
    size : int or (h, w)
    padding : int >= 0

    Returns ``(N, C, h, w)``.
    """
    _image_batch(x)
    N, _, H, W = x.shape
    out_hw, padding = _check_crop((H, W), size, padding)
    o = np.asarray(offsets)
    if o.dtype.kind not in "iu":
        raise ValueError(f"offsets must be integers, got {offsets!r}")
    o = np.broadcast_to(o, (N, 2)) if o.shape == (2,) else o
    if o.shape != (N, 2):
        raise ValueError(f"offsets must be (top, left) or shape {(N, 2)}, got shape {o.shape}")
    hi = np.array([H + 2 * padding - out_hw[0], W + 2 * padding - out_hw[1]])
    if (o < 0).any() or (o > hi).any():
        raise ValueError(f"offsets must be in [0, {tuple(hi)}] (top, left), got {o.tolist()}")
    shift = _crop_shift(o.astype(np.float64), (H, W), out_hw, padding)
    return affine(x, shift=shift, out_size=out_hw)


# --- elastic distortion ---------------------------------------------------------------------


def elastic_flow(noise, alpha, sigma):
    """Simard et al.'s displacement field: ``alpha * gaussian_blur(noise, sigma)``.

    ``noise`` is float32 (N, 2, H, W), usually uniform in [-1, 1]; returns the same shape.
    """
    alpha = _finite(alpha, "alpha", 0.0)
    sigma = _finite(sigma, "sigma", 0.0, strict_min=True)
    if not chk.is_array(noise) or noise.ndim != 4:
        raise ValueError("noise must be an array of shape (N, 2, H, W)")
    if noise.shape[1] != 2:
        raise ValueError(f"noise must have shape (N, 2, H, W), got {tuple(noise.shape)}")
    N, _, H, W = noise.shape
    flow = ops.gaussian_blur(noise.reshape(N * 2, H, W), sigma)
    flow *= np.float32(alpha)
    return flow.reshape(N, 2, H, W)


def elastic(x, alpha, sigma, rng):
    """Elastic distortion of every image (Simard et al., 2003): each pixel moves by a random
    field, uniform in [-1, 1] per pixel and axis, smoothed by a Gaussian of ``sigma`` pixels
    and scaled by ``alpha``. ``rng``: a :class:`numpy.random.Generator`."""
    _image_batch(x)
    _check_rng(rng)
    N, _, H, W = x.shape
    noise = rng.uniform(-1.0, 1.0, (N, 2, H, W)).astype(np.float32)
    flow = elastic_flow(_on_device(noise, x), alpha, sigma)
    theta = affine_matrices(N, (H, W))
    return ops.warp_bilinear(x, _on_device(theta, x), flow)


def _check_rng(rng):
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")


# --- random transforms ----------------------------------------------------------------------


def _symmetric(value, name, maximum=None):
    """A range: a number v >= 0 means [-v, v]; a pair (lo, hi) with lo <= hi."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be a number >= 0 or a pair (low, high), got {value!r}")
        lo = _finite(value[0], f"{name}[0]")
        hi = _finite(value[1], f"{name}[1]")
        if lo > hi:
            raise ValueError(f"{name} must have low <= high, got {value!r}")
    else:
        v = _finite(value, name, 0.0)
        lo, hi = -v, v
    if maximum is not None and (lo < -maximum or hi > maximum):
        raise ValueError(f"{name} must lie within [-{maximum}, {maximum}], got {value!r}")
    return (lo, hi)


class RandomTransform:
    """Random augmentation drawn per sample; one bilinear resampling per image.

    Parameters
    ----------
    rotation : number >= 0 or (low, high)
        Degrees; a number r draws uniformly from [-r, r]; within [-360, 360].
    shift : number >= 0, (rows, cols) of numbers, or None
        Pixels; a number s draws each axis from [-s, s]; a pair gives per-axis maxima (at most
        10**6).
    scale : number in [0, 1) or (low, high) with 0 < low <= high
        Zoom; a number z draws from [1 - z, 1 + z].
    shear : number >= 0 or (low, high)
        Degrees of x-shear, within (-89, 89).
    flip : float in [0, 1]
        Probability of a left-right mirror (0 for digits: a mirrored 2 is no 2).
    crop : int or (h, w), optional
        Output size: a window of this size at a uniformly random integer position in the image
        zero-padded by ``padding`` (the CIFAR "random crop with padding"), taken after the
        other transforms (from the flipped, rotated... content).
    padding : int >= 0
    elastic_alpha, elastic_sigma : numbers
        Elastic distortion (Simard et al., 2003): displacement scale in pixels (0: off; at most
        10**6) and smoothing in pixels (> 0, at most 1000). Simard used alpha 34, sigma 4 for
        MNIST.

    ``transform(x, rng)`` (or calling the object) returns the augmented batch on ``x``'s
    backend and dtype; with ``rng`` a seeded :class:`numpy.random.Generator` it is reproducible.
    """

    def __init__(
        self,
        rotation=0.0,
        shift=0.0,
        scale=0.0,
        shear=0.0,
        flip=0.0,
        crop=None,
        padding=0,
        elastic_alpha=0.0,
        elastic_sigma=4.0,
    ):
        # Bounds that keep every value meaningful and finite in the float32 sampling grid
        # (rotation=1e308 overflowed NumPy's uniform mid-training): a rotation range within one
        # turn each way, shifts and elastic displacements up to a million pixels, a blur of at
        # most 1000 pixels (its taps are allocated: 6 per sigma).
        self.rotation = _symmetric(rotation, "rotation", maximum=360.0)
        if isinstance(shift, (tuple, list)):
            if len(shift) != 2:
                raise ValueError(
                    f"shift must be a number >= 0 or a pair (rows, cols), got {shift!r}"
                )
            self.shift = (
                _finite(shift[0], "shift[0]", 0.0, _MAX_PIXELS),
                _finite(shift[1], "shift[1]", 0.0, _MAX_PIXELS),
            )
        else:
            v = _finite(shift, "shift", 0.0, _MAX_PIXELS)
            self.shift = (v, v)
        if isinstance(scale, (tuple, list)):
            if len(scale) != 2:
                raise ValueError(f"scale must be a number in [0, 1) or a pair, got {scale!r}")
            lo = _finite(scale[0], "scale[0]", 0.0, strict_min=True)
            hi = _finite(scale[1], "scale[1]", 0.0, strict_min=True)
            if lo > hi:
                raise ValueError(f"scale must have low <= high, got {scale!r}")
            self.scale = (lo, hi)
        else:
            z = _finite(scale, "scale", 0.0)
            if z >= 1:
                raise ValueError(f"scale must be in [0, 1) (zoom 1 +- scale), got {scale!r}")
            self.scale = (1.0 - z, 1.0 + z)
        self.shear = _symmetric(shear, "shear", maximum=89.0)
        self.flip = _finite(flip, "flip", 0.0, 1.0)
        if isinstance(padding, bool) or not isinstance(padding, numbers.Integral) or padding < 0:
            raise ValueError(f"padding must be an int >= 0, got {padding!r}")
        self.padding = int(padding)
        self.crop = None if crop is None else _size(crop, "crop")
        if self.crop is None and self.padding:
            raise ValueError("padding only applies with crop=(h, w)")
        self.elastic_alpha = _finite(elastic_alpha, "elastic_alpha", 0.0, _MAX_PIXELS)
        self.elastic_sigma = _finite(
            elastic_sigma, "elastic_sigma", 0.0, _MAX_SIGMA, strict_min=True
        )

    def get_config(self) -> dict:
        return {
            "rotation": list(self.rotation),
            "shift": list(self.shift),
            "scale": list(self.scale),
            "shear": list(self.shear),
            "flip": self.flip,
            "crop": None if self.crop is None else list(self.crop),
            "padding": self.padding,
            "elastic_alpha": self.elastic_alpha,
            "elastic_sigma": self.elastic_sigma,
        }

    @classmethod
    def from_config(cls, config: dict) -> RandomTransform:
        c = dict(config)
        for key in ("rotation", "shift", "scale", "shear", "crop"):
            if isinstance(c.get(key), list):
                c[key] = tuple(c[key])
        return cls(**c)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"RandomTransform({args})"

    def draw(self, n: int, in_size, rng: np.random.Generator) -> dict:
        """Draw the parameters of ``n`` samples, always in the same order (so a generator gives
        the same parameters whatever the backend): ``rotation``, ``scale``, ``shear``,
        ``shift`` (n, 2), ``flip``, ``offsets`` (crop, n, 2) and ``noise`` (elastic)."""
        _check_rng(rng)
        H, W = _size(in_size, "in_size")
        out_hw = (H, W) if self.crop is None else self.crop
        if self.crop is not None:
            _check_crop((H, W), self.crop, self.padding)
        p = {
            "rotation": rng.uniform(*self.rotation, n),
            "scale": rng.uniform(*self.scale, n),
            "shear": rng.uniform(*self.shear, n),
            "shift": rng.uniform(-1.0, 1.0, (n, 2)) * np.array(self.shift),
            "flip": rng.random(n) < self.flip,
            "offsets": None,
            "noise": None,
        }
        if self.crop is not None:
            hi = np.array([H + 2 * self.padding - out_hw[0], W + 2 * self.padding - out_hw[1]])
            p["offsets"] = rng.integers(0, hi + 1, (n, 2))
        if self.elastic_alpha > 0:
            p["noise"] = rng.uniform(-1.0, 1.0, (n, 2, *out_hw)).astype(np.float32)
        return p

    def transform(self, x, rng: np.random.Generator):
        """The augmented batch (a new array); ``x`` is (N, C, H, W) float32/float16."""
        _image_batch(x)
        N, _, H, W = x.shape
        p = self.draw(N, (H, W), rng)
        out_hw = (H, W) if self.crop is None else self.crop
        shift = p["shift"]
        if p["offsets"] is not None:
            shift = shift + _crop_shift(p["offsets"], (H, W), out_hw, self.padding)
        theta = affine_matrices(
            N, (H, W), out_hw, p["rotation"], p["scale"], p["shear"], shift, p["flip"]
        )
        flow = None
        if p["noise"] is not None:
            flow = elastic_flow(_on_device(p["noise"], x), self.elastic_alpha, self.elastic_sigma)
        return ops.warp_bilinear(x, _on_device(theta, x), flow, out_hw)

    __call__ = transform
