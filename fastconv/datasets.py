"""MNIST from the four original IDX ``.gz`` files, verified by SHA-256 before parsing.

Where the files are looked for, in this order (the first place holding any of them is used):

1. the ``path`` argument (``--data DIR``), when given: the only place looked at then;
2. ``$FASTCONV_DATA``: a directory with the four files, or with an ``mnist/`` subdirectory
   holding them;
3. ``data/mnist`` of the source checkout, when the package runs from one (an installed wheel
   has none);
4. the user cache, :func:`mnist_cache_dir`: ``$XDG_CACHE_HOME/fastconv/mnist`` when
   ``XDG_CACHE_HOME`` is set, else ``~/.cache/fastconv/mnist`` (Linux),
   ``~/Library/Caches/fastconv/mnist`` (macOS), ``%LOCALAPPDATA%\\fastconv\\Cache\\mnist``
   (Windows). The files missing there are downloaded into it, as Keras does, from
   ``$FASTCONV_MNIST_URL`` or :data:`DEFAULT_MNIST_URL` (the mirror torchvision uses), unless
   ``download=False``.

A download goes to ``<name>.part-<pid>-<random>`` in the cache and is renamed over ``<name>``
only after its SHA-256 matched :data:`MNIST_FILES`, so the cache never holds a partial or
corrupt file and two processes downloading at once each rename a complete, identical copy. A
cached file that fails its check is reported on stderr and replaced by a fresh download (by the
same atomic rename, so a process reading the cache at that moment sees the old or the new file,
never none); when downloading is off or fails, it is deleted.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import re
import secrets
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np

__all__ = [
    "load_mnist",
    "find_mnist",
    "MNIST_FILES",
    "DEFAULT_MNIST_URL",
    "default_mnist_dir",
    "mnist_cache_dir",
    "MNISTError",
    "MNISTNotFoundError",
    "MNISTDownloadError",
]

#: file name -> SHA-256 of the canonical distribution
MNIST_FILES = {
    "train-images-idx3-ubyte.gz": (
        "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"
    ),
    "train-labels-idx1-ubyte.gz": (
        "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"
    ),
    "t10k-images-idx3-ubyte.gz": (
        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"
    ),
    "t10k-labels-idx1-ubyte.gz": (
        "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"
    ),
}

#: where the four files are downloaded from unless ``$FASTCONV_MNIST_URL`` says otherwise: the
#: public mirror of the original files that torchvision downloads from
DEFAULT_MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"

_ROOT = Path(__file__).resolve().parent.parent
# Only a source checkout has pyproject.toml next to the package; installed, the parent is
# site-packages, which is no place to look for (or to suggest writing) data.
_CHECKOUT_DIR = _ROOT / "data" / "mnist" if (_ROOT / "pyproject.toml").is_file() else None

_PART = re.compile(r"\.part-(\d+)-[0-9a-f]+$")


class MNISTError(OSError, ValueError):
    """MNIST could not be found, fetched or verified.

    Both an ``OSError`` and a ``ValueError`` (as :class:`io.UnsupportedOperation` is), so code
    that caught either from earlier versions of :func:`load_mnist` still catches it.
    """


class MNISTNotFoundError(MNISTError, FileNotFoundError):
    """The files are not where they were looked for (and were not to be downloaded)."""


class MNISTDownloadError(MNISTError):
    """A download failed (network, time-out, HTTP error, short or wrong file).

    Attributes
    ----------
    url : str
        The file's URL.
    expected_sha256 : str
        The SHA-256 the file must have.
    """

    # url and expected_sha256 default to None so that the exception pickles (multiprocessing)
    def __init__(self, message: str, url: str | None = None, expected_sha256: str | None = None):
        super().__init__(message)
        self.url = url
        self.expected_sha256 = expected_sha256


def mnist_cache_dir() -> Path:
    """The user cache directory MNIST is downloaded into (see the module docstring)."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):  # the XDG spec: a relative value is to be ignored
        base = Path(xdg)
    elif sys.platform == "win32":
        local = os.environ.get("LOCALAPPDATA")
        base = Path(local) if local else Path.home() / "AppData" / "Local"
        return base / "fastconv" / "Cache" / "mnist"
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path.home() / ".cache"
    return base / "fastconv" / "mnist"


def _holds_any(directory: Path | None) -> bool:
    return directory is not None and any((directory / n).is_file() for n in MNIST_FILES)


def _env_dir() -> Path | None:
    env = os.environ.get("FASTCONV_DATA")
    if not env:
        return None
    base = Path(env).expanduser()
    sub = base / "mnist"
    return sub if _holds_any(sub) else base


def _places(cache: Path) -> list[tuple[str, Path | None]]:
    """The search order after an explicit path: (description, directory or None)."""
    return [
        ("$FASTCONV_DATA", _env_dir()),
        ("the source checkout's data/mnist", _CHECKOUT_DIR),
        ("the user cache", cache),
    ]


def default_mnist_dir(cache_dir=None) -> Path:
    """The first directory in the search order that holds any of the files, else the cache
    directory (where they would be downloaded to)."""
    cache = Path(cache_dir) if cache_dir is not None else mnist_cache_dir()
    for _, directory in _places(cache):
        if _holds_any(directory):
            return directory
    return cache


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _looked_at(cache: Path) -> str:
    lines = []
    for i, (what, directory) in enumerate(_places(cache), 1):
        if what == "$FASTCONV_DATA" and directory is None:
            where = "not set"
        elif directory is None:
            where = "none (not running from a source checkout)"
        else:
            where = str(directory)
        lines.append(f"  {i}. {what}: {where}")
    return "\n".join(lines)


def _what_to_do(cache: Path, url: str | None = None) -> str:
    """The remedies; ``url``: the base URL a download just failed from (None: none tried)."""
    local = (
        "pass the directory holding the four files (load_mnist(path=DIR), `fastconv "
        "train-mnist --data DIR`); set FASTCONV_DATA=DIR"
    )
    if url is None:
        return (
            f"To fix it, do one of: {local}; or allow the download (download=True, the "
            f"default; without --no-download) into {cache}, from $FASTCONV_MNIST_URL (a "
            f"mirror of the four files; default {DEFAULT_MNIST_URL})."
        )
    return (
        f"To fix it, do one of: check the connection (urllib honours https_proxy) and try "
        f"again; point $FASTCONV_MNIST_URL at another mirror of the four files (this try: "
        f"{url}); put the four files in {cache} yourself; or {local}."
    )


def _verified(directory: Path, name: str, hint: str) -> Path:
    path = directory / name
    if not path.is_file():
        raise MNISTNotFoundError(
            f"MNIST file {path} is missing; {hint} (the four original MNIST .gz files: "
            f"{', '.join(MNIST_FILES)})"
        )
    digest = _sha256(path)
    if digest != MNIST_FILES[name]:
        raise MNISTError(
            f"MNIST file {path} is corrupt or not the original: SHA-256 {digest}, expected "
            f"{MNIST_FILES[name]}; replace it with the original file"
        )
    return path


# what to do when a directory in use lacks a file, by where it came from
_HINTS = {
    "$FASTCONV_DATA": (
        "$FASTCONV_DATA points at a directory holding some of the files but not this one: put "
        "all four there, or unset FASTCONV_DATA to use the user cache (and the download)"
    ),
    "the source checkout's data/mnist": (
        "the source checkout's data/mnist holds some of the files but not this one: restore "
        "it (git checkout -- data/mnist), or point $FASTCONV_DATA at a directory holding all four"
    ),
}


def _base_url(base_url: str | None) -> str:
    url = base_url or os.environ.get("FASTCONV_MNIST_URL") or DEFAULT_MNIST_URL
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ("http", "https", "file"):
        raise MNISTError(
            f"the MNIST download URL {url!r} (argument, $FASTCONV_MNIST_URL or the default) must "
            "be an http://, https:// or file:// URL of a directory holding the four files"
        )
    # a base without the trailing slash still names the directory, not a file in its parent
    return url if url.endswith("/") else url + "/"


def _say(message: str, progress: bool | None) -> None:
    if progress is not False:
        print(message, file=sys.stderr, flush=True)


def _remove_stale_parts(cache: Path) -> None:
    """Delete ``*.part-<pid>-*`` files whose writer is no longer running (killed mid-download);
    a live writer's file is its own business."""
    from .nn._files import pid_alive

    try:
        names = os.listdir(cache)
    except OSError:
        return
    for name in names:
        m = _PART.search(name)
        if m and not pid_alive(int(m.group(1))):
            try:
                os.remove(cache / name)
            except OSError:
                pass


class _Retry(Exception):
    """A failure worth another try (the connection dropped, the file came short)."""


class _Wrong(Exception):
    """A failure another try would repeat (the server has a different file)."""


def _fetch_once(url: str, dest: Path, expected: str, timeout: float, bar: bool) -> None:
    from tqdm import tqdm

    tmp = dest.with_name(f"{dest.name}.part-{os.getpid()}-{secrets.token_hex(4)}")
    request = urllib.request.Request(url, headers={"User-Agent": "fastconv"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp, open(tmp, "xb") as f:
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            h, got = hashlib.sha256(), 0
            with tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=dest.name,
                disable=not bar,
                file=sys.stderr,
                leave=False,
            ) as meter:
                while chunk := resp.read(1 << 16):
                    f.write(chunk)
                    h.update(chunk)
                    got += len(chunk)
                    meter.update(len(chunk))
            # http.client returns a short body without an error when the server closes early
            if total is not None and got != total:
                raise _Retry(f"the connection closed after {got:,} of {total:,} bytes")
            digest = h.hexdigest()
            if digest != expected:
                raise _Wrong(f"the downloaded file ({got:,} bytes) has SHA-256 {digest}")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)  # gone after the rename; a failed try's partial file


def _download(url, dest, expected, *, timeout, retries, backoff, bar, notify, cache) -> None:
    """Fetch ``url`` into ``dest`` (atomic, verified), retrying transient failures; ``bar``:
    show a progress bar, ``notify``: say on stderr when a try failed."""
    for attempt in range(1, retries + 1):
        try:
            _fetch_once(url, dest, expected, timeout, bar)
            return
        except _Wrong as e:
            reason, final = str(e), True
        except urllib.error.HTTPError as e:
            reason = f"HTTP {e.code} {e.reason}"
            final = e.code < 500 and e.code not in (408, 429)  # 404 will stay a 404
        except (OSError, http.client.HTTPException, _Retry) as e:  # URLError, time-outs too
            inner = e.reason if isinstance(e, urllib.error.URLError) else e
            if isinstance(inner, TimeoutError):
                reason = f"timed out (no data for {timeout:g} s)"
            else:
                reason = str(inner) or type(inner).__name__
            final = False
        if final or attempt == retries:
            tries = f" (after {attempt} tries)" if attempt > 1 else ""
            raise MNISTDownloadError(
                f"could not download MNIST file {dest.name} from {url}: {reason}{tries}; "
                f"expected SHA-256 {expected}. No partial or corrupt file was kept in {cache}.\n"
                f"Looked for MNIST in, in order:\n{_looked_at(cache)}\n"
                + _what_to_do(cache, url.rsplit("/", 1)[0] + "/"),
                url,
                expected,
            ) from None
        wait = backoff * 2 ** (attempt - 1)
        _say(f"download of {url} failed: {reason}; trying again in {wait:g} s", notify)
        time.sleep(wait)


def find_mnist(
    path=None,
    *,
    download: bool = True,
    cache_dir=None,
    base_url: str | None = None,
    timeout: float = 30.0,
    retries: int = 3,
    backoff: float = 1.0,
    progress: bool | None = None,
) -> Path:
    """The directory holding the four verified MNIST files, downloading them when needed.

    Parameters
    ----------
    path : str or Path, optional
        Directory holding the four files; when given, the only place looked at.
    download : bool
        Download the files missing from the cache (default). False: raise instead.
    cache_dir : str or Path, optional
        The cache directory (default :func:`mnist_cache_dir`).
    base_url : str, optional
        URL of a directory holding the four files (default ``$FASTCONV_MNIST_URL``, else
        :data:`DEFAULT_MNIST_URL`).
    timeout : float
        Seconds a connection may go without data before a try fails.
    retries : int
        Tries per file for transient failures (dropped connection, time-out, HTTP 5xx).
    backoff : float
        Seconds before the second try, doubling after each further failure.
    progress : bool, optional
        Show a progress bar; default: when stderr is a terminal. False also silences the
        one-line notices (downloading, corrupt cache file).

    Returns
    -------
    Path

    Raises
    ------
    MNISTNotFoundError
        Not found and ``download`` is False, or a directory in use lacks one of the files.
    MNISTDownloadError
        A download failed; the message names the URL and the expected SHA-256.
    MNISTError
        A file outside the cache fails its SHA-256 check, or the URL is not http(s)/file.
    """
    if retries < 1:
        raise ValueError(f"retries must be >= 1, got {retries}")
    if path is not None:
        directory = Path(path).expanduser()
        for name in MNIST_FILES:
            _verified(
                directory, name, f"put all four in {directory}, or pass a directory holding them"
            )
        return directory
    cache = Path(cache_dir).expanduser() if cache_dir is not None else mnist_cache_dir()
    places = _places(cache)
    for where, directory in places[:-1]:
        if _holds_any(directory):
            for name in MNIST_FILES:
                _verified(directory, name, _HINTS[where])
            return directory

    # The cache: keep the verified files, fetch the others.
    missing, corrupt = [], []
    for name, expected in MNIST_FILES.items():
        file = cache / name
        if not file.is_file():
            missing.append(name)
            continue
        digest = _sha256(file)
        if digest != expected:
            corrupt.append(name)
            missing.append(name)
            _say(
                f"cached MNIST file {file} is corrupt: SHA-256 {digest}, expected {expected}; "
                + ("downloading it again" if download else "deleting it"),
                progress,
            )
    try:
        if not missing:
            return cache
        if not download:
            absent = "" if len(missing) == len(MNIST_FILES) else f" ({', '.join(missing)})"
            if corrupt:
                absent += f" (corrupt and deleted: {', '.join(corrupt)})"
            raise MNISTNotFoundError(
                f"MNIST not found{absent} and downloading is off (download=False / "
                f"--no-download). Looked for {', '.join(MNIST_FILES)} in, in order:\n"
                f"{_looked_at(cache)}\n{_what_to_do(cache)}"
            )
        url = _base_url(base_url)
        try:
            cache.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise MNISTError(
                f"cannot create the MNIST cache directory {cache} ({e.strerror or e}) to "
                "download into; set XDG_CACHE_HOME to a writable directory, or pass a directory "
                "holding the four files (load_mnist(path=DIR), `fastconv train-mnist --data "
                "DIR`, or FASTCONV_DATA=DIR)"
            ) from None
        _remove_stale_parts(cache)
        bar = sys.stderr.isatty() if progress is None else progress
        for name in missing:
            _say(f"downloading {url}{name} to {cache}", progress)
            _download(
                url + name,
                cache / name,
                MNIST_FILES[name],
                timeout=timeout,
                retries=retries,
                backoff=backoff,
                bar=bar,
                notify=progress is not False,
                cache=cache,
            )
        return cache
    finally:
        # A corrupt cached file that no download replaced is deleted: never leave one there.
        # Hashed again first, as another process may have renamed a good copy over it.
        for name in corrupt:
            file = cache / name
            try:
                if _sha256(file) != MNIST_FILES[name]:
                    file.unlink()
            except OSError:
                pass


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    header = np.frombuffer(raw, dtype=">u4", count=1 + ndim)
    if int(header[0]) != magic:
        raise ValueError(f"{path}: bad IDX magic number {int(header[0]):#x}, expected {magic:#x}")
    shape = tuple(int(s) for s in header[1:])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 * (1 + ndim))
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: holds {data.size} values, header says {shape}")
    return data.reshape(shape)


def load_mnist(
    path=None,
    *,
    download: bool = True,
    cache_dir=None,
    base_url: str | None = None,
    timeout: float = 30.0,
    retries: int = 3,
    backoff: float = 1.0,
    progress: bool | None = None,
):
    """Load MNIST, finding or downloading the files as the module docstring describes.

    Parameters
    ----------
    path : str or Path, optional
        Directory holding the four IDX ``.gz`` files; when given, the only place looked at.
    download, cache_dir, base_url, timeout, retries, backoff, progress
        As for :func:`find_mnist`: whether (and from where, into where, how patiently) the
        files missing from the cache are downloaded.

    Returns
    -------
    (x_train, y_train), (x_test, y_test)
        ``x`` float32 (N, 1, 28, 28) in [0, 1]; ``y`` int64 (N,). 60,000 / 10,000 samples.

    Raises
    ------
    MNISTNotFoundError
        A ``FileNotFoundError``: the files are not found and not to be downloaded (the message
        lists where they were looked for and what to do).
    MNISTDownloadError, MNISTError
        An ``OSError`` and a ``ValueError``: a download failed, or a file fails its SHA-256 check.
    ValueError
        A verified file is malformed (cannot happen with the original files).
    """
    directory = find_mnist(
        path,
        download=download,
        cache_dir=cache_dir,
        base_url=base_url,
        timeout=timeout,
        retries=retries,
        backoff=backoff,
        progress=progress,
    )
    out = []
    for split in ("train", "t10k"):
        images = _read_idx(directory / f"{split}-images-idx3-ubyte.gz", 0x803, 3)
        labels = _read_idx(directory / f"{split}-labels-idx1-ubyte.gz", 0x801, 1)
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{split}: {images.shape[0]} images but {labels.shape[0]} labels")
        x = images.astype(np.float32)[:, None, :, :]
        x *= np.float32(1.0 / 255.0)
        out.append((x, labels.astype(np.int64)))
    return tuple(out)
