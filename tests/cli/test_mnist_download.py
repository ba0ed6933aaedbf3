"""MNIST found, fetched or cached: downloads from a local HTTP server on 127.0.0.1 (never the
network), into a temporary cache, with truncated, altered, missing and stalled files."""

import hashlib
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from fastconv import datasets
from fastconv.cli import main
from fastconv.datasets import (
    MNIST_FILES,
    MNISTDownloadError,
    MNISTError,
    MNISTNotFoundError,
    find_mnist,
    load_mnist,
)

REPO = Path(__file__).resolve().parents[2]
REAL = REPO / "data" / "mnist"  # the committed originals, served by the test server
FAST = {"backoff": 0.0, "progress": False}  # no waiting between tries, no output


class _Handler(BaseHTTPRequestHandler):
    """Serves ``server.root/<name>`` for ``GET /<prefix>/<name>``, misbehaving on request."""

    def do_GET(self):
        srv = self.server
        name = self.path.rsplit("/", 1)[-1]
        with srv.lock:
            srv.requests.append(name)
            nth = srv.requests.count(name)
        how = srv.behaviour.get(name)
        if how == "stall":  # accept the request, then say nothing
            srv.release.wait(30)
            return
        if how == "fail-once" and nth == 1:
            self.send_error(503)
            return
        if how == "together":  # hold each request until the other process asks too
            srv.barrier.wait(timeout=60)
        path = srv.root / name
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if how == "truncate":  # the promised length, half the bytes, then the connection closes
            data = data[: len(data) // 2]
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    for name in MNIST_FILES:
        shutil.copy(REAL / name, root / name)
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.root, srv.requests, srv.behaviour = root, [], {}
    srv.lock, srv.release, srv.barrier = threading.Lock(), threading.Event(), threading.Barrier(2)
    # no trailing slash: the base still names the directory
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/mnist"
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.release.set()
    srv.barrier.abort()
    srv.shutdown()
    srv.server_close()
    thread.join(10)


@pytest.fixture
def cache(tmp_path, monkeypatch, server):
    """As an installed package: no checkout data, no $FASTCONV_DATA, the cache in tmp_path."""
    monkeypatch.setattr(datasets, "_CHECKOUT_DIR", None)
    monkeypatch.delenv("FASTCONV_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("FASTCONV_MNIST_URL", server.url)
    return tmp_path / "xdg" / "fastconv" / "mnist"


def _verified_cache(directory):
    """The names in ``directory``; every MNIST file there has its published SHA-256."""
    names = sorted(os.listdir(directory))
    for name in names:
        digest = hashlib.sha256((directory / name).read_bytes()).hexdigest()
        assert digest == MNIST_FILES[name], name
    return names


def test_cache_directory_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert datasets.mnist_cache_dir() == tmp_path / "fastconv" / "mnist"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")  # ignored, as the XDG spec says
    monkeypatch.setattr(sys, "platform", "linux")
    assert datasets.mnist_cache_dir() == Path.home() / ".cache" / "fastconv" / "mnist"
    monkeypatch.setattr(sys, "platform", "darwin")
    assert datasets.mnist_cache_dir() == Path.home() / "Library/Caches/fastconv/mnist"
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "local"))
    assert datasets.mnist_cache_dir() == tmp_path / "local" / "fastconv" / "Cache" / "mnist"


def test_download_into_the_cache_then_reuse_it(cache, server, capsys):
    (x_train, y_train), (x_test, y_test) = load_mnist(backoff=0.0, progress=True)
    assert x_train.shape == (60000, 1, 28, 28) and x_test.dtype == np.float32
    assert y_train[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert _verified_cache(cache) == sorted(MNIST_FILES)  # and no .part file left
    assert sorted(server.requests) == sorted(MNIST_FILES)
    err = capsys.readouterr().err
    assert f"downloading {server.url}/train-images-idx3-ubyte.gz to {cache}" in err
    assert "train-images-idx3-ubyte.gz" in err and "B/s" in err  # the progress bar
    # found in the cache from now on: no request, no output
    assert find_mnist(**FAST) == cache == datasets.default_mnist_dir()
    load_mnist(backoff=0.0)
    assert len(server.requests) == 4
    assert capsys.readouterr().err == ""


def test_arguments_override_the_environment(tmp_path, cache, server, monkeypatch):
    monkeypatch.setenv("FASTCONV_MNIST_URL", "http://127.0.0.1:9/nothing-listens-here/")
    mine = tmp_path / "my-cache"
    assert find_mnist(cache_dir=mine, base_url=server.url + "/", **FAST) == mine
    assert _verified_cache(mine) == sorted(MNIST_FILES)
    assert not cache.exists()
    with pytest.raises(MNISTError, match="must be an http"):
        find_mnist(cache_dir=tmp_path / "other", base_url="ftp://example.org/mnist/")


def test_only_the_missing_files_are_fetched(cache, server):
    cache.mkdir(parents=True)
    shutil.copy(REAL / "train-images-idx3-ubyte.gz", cache)
    find_mnist(**FAST)
    assert sorted(server.requests) == sorted(set(MNIST_FILES) - {"train-images-idx3-ubyte.gz"})


def _assert_nothing_bad_kept(cache, name):
    assert not (cache / name).exists()
    _verified_cache(cache)  # the other files, if fetched, are the originals; no .part files


def test_truncated_download_is_retried_then_reported(cache, server):
    name = "t10k-labels-idx1-ubyte.gz"
    server.behaviour[name] = "truncate"
    with pytest.raises(MNISTDownloadError) as exc:
        find_mnist(retries=2, **FAST)
    msg = str(exc.value)
    assert f"{server.url}/{name}" in msg and MNIST_FILES[name] in msg
    assert "closed after" in msg and "after 2 tries" in msg
    assert exc.value.url == f"{server.url}/{name}"
    assert exc.value.expected_sha256 == MNIST_FILES[name]
    assert isinstance(exc.value, OSError) and isinstance(exc.value, ValueError)
    assert server.requests.count(name) == 2
    _assert_nothing_bad_kept(cache, name)


def test_wrong_file_is_reported_and_not_retried(cache, server):
    name = "train-labels-idx1-ubyte.gz"
    data = bytearray((server.root / name).read_bytes())
    data[100] ^= 0xFF
    (server.root / name).write_bytes(bytes(data))
    with pytest.raises(MNISTDownloadError) as exc:
        find_mnist(**FAST)
    msg = str(exc.value)
    assert f"{server.url}/{name}" in msg and f"expected SHA-256 {MNIST_FILES[name]}" in msg
    assert hashlib.sha256(data).hexdigest() in msg
    assert server.requests.count(name) == 1  # another try would fetch the same wrong file
    _assert_nothing_bad_kept(cache, name)


def test_http_404_is_reported_and_not_retried(cache, server):
    name = "t10k-images-idx3-ubyte.gz"
    (server.root / name).unlink()
    with pytest.raises(MNISTDownloadError, match="HTTP 404") as exc:
        find_mnist(**FAST)
    assert f"{server.url}/{name}" in str(exc.value)
    assert "FASTCONV_MNIST_URL" in str(exc.value)  # what to do
    assert server.requests.count(name) == 1
    _assert_nothing_bad_kept(cache, name)


def test_server_error_is_retried(cache, server):
    server.behaviour["train-labels-idx1-ubyte.gz"] = "fail-once"  # HTTP 503, then the file
    assert find_mnist(**FAST) == cache
    assert server.requests.count("train-labels-idx1-ubyte.gz") == 2
    assert _verified_cache(cache) == sorted(MNIST_FILES)


def test_stalled_server_times_out_quickly(cache, server):
    name = "train-images-idx3-ubyte.gz"
    server.behaviour[name] = "stall"
    # The message names the time-out in force (0.5 s, not the default 30 s), and the server
    # saw both tries: no wall-clock measurement needed.
    with pytest.raises(MNISTDownloadError, match=r"timed out \(no data for 0.5 s\)") as exc:
        find_mnist(timeout=0.5, retries=2, **FAST)
    assert MNIST_FILES[name] in str(exc.value)
    assert server.requests.count(name) == 2
    _assert_nothing_bad_kept(cache, name)


def test_corrupt_cached_file_is_downloaded_again(cache, server, capsys):
    find_mnist(**FAST)
    name = "train-labels-idx1-ubyte.gz"
    (cache / name).write_bytes(b"not mnist")
    find_mnist(backoff=0.0)
    err = capsys.readouterr().err
    assert f"cached MNIST file {cache / name} is corrupt" in err and "downloading it again" in err
    assert f"downloading {server.url}/{name} to {cache}" in err  # said even without a terminal
    assert "B/s" not in err  # but no progress bar then
    assert server.requests.count(name) == 2 and len(server.requests) == 5
    assert _verified_cache(cache) == sorted(MNIST_FILES)


def test_corrupt_cached_file_is_deleted_when_not_downloading(cache, server):
    find_mnist(**FAST)
    name = "t10k-images-idx3-ubyte.gz"
    (cache / name).write_bytes(b"not mnist")
    with pytest.raises(MNISTNotFoundError, match=f"corrupt and deleted: {name}"):
        find_mnist(download=False, **FAST)
    assert not (cache / name).exists()
    assert len(server.requests) == 4


def test_not_found_without_download_lists_where_it_looked(tmp_path, cache, server, monkeypatch):
    with pytest.raises(FileNotFoundError) as exc:
        load_mnist(download=False)
    assert isinstance(exc.value, MNISTNotFoundError)
    msg = str(exc.value)
    places = [
        "1. $FASTCONV_DATA: not set",
        "2. the source checkout's data/mnist: none (not running from a source checkout)",
        f"3. the user cache: {cache}",
    ]
    assert all(p in msg for p in places), msg
    assert [msg.index(p) for p in places] == sorted(msg.index(p) for p in places)
    for advice in ("load_mnist(path=DIR)", "--data DIR", "FASTCONV_DATA=DIR", "FASTCONV_MNIST_URL"):
        assert advice in msg
    assert "site-packages" not in msg
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("FASTCONV_DATA", str(empty))
    with pytest.raises(MNISTNotFoundError, match=f"1. \\$FASTCONV_DATA: {empty}"):
        load_mnist(download=False)
    assert server.requests == [] and not cache.exists()


def test_search_order(tmp_path, cache, server, monkeypatch):
    """$FASTCONV_DATA, then the checkout, then the cache; a directory in use must be whole."""
    checkout, env = tmp_path / "checkout", tmp_path / "env"
    for d in (checkout, env, cache):
        d.mkdir(parents=True)
        for name in MNIST_FILES:
            shutil.copy(REAL / name, d / name)
    monkeypatch.setattr(datasets, "_CHECKOUT_DIR", checkout)
    monkeypatch.setenv("FASTCONV_DATA", str(env))
    assert find_mnist(**FAST) == env
    monkeypatch.delenv("FASTCONV_DATA")
    assert find_mnist(**FAST) == checkout
    (checkout / "train-labels-idx1-ubyte.gz").unlink()  # part of a checkout: an error, no mix
    with pytest.raises(MNISTNotFoundError, match="git checkout -- data/mnist"):
        find_mnist(**FAST)
    monkeypatch.setattr(datasets, "_CHECKOUT_DIR", None)
    assert find_mnist(**FAST) == cache
    assert server.requests == []


def test_leftover_of_a_killed_download_is_removed(cache, server):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    pid = int(dead.stdout)  # a process that has exited
    cache.mkdir(parents=True)
    stale = cache / f"train-images-idx3-ubyte.gz.part-{pid}-0123abcd"
    live = cache / f"train-images-idx3-ubyte.gz.part-{os.getpid()}-0123abcd"
    stale.write_bytes(b"half")
    live.write_bytes(b"half")  # a download still running (this process) is left alone
    find_mnist(**FAST)
    assert not stale.exists() and live.exists()


_DOWNLOADER = """
import sys
from fastconv import datasets
datasets._CHECKOUT_DIR = None  # as an installed package
print(datasets.find_mnist(cache_dir=sys.argv[1], base_url=sys.argv[2], backoff=0.0,
                          progress=False, timeout=60))
"""


def test_two_processes_downloading_at_once(tmp_path, server):
    """Both fetch the same file at the same time (the server holds each request until both
    have asked); each renames its own complete copy, and neither sees a torn file."""
    for name in MNIST_FILES:
        server.behaviour[name] = "together"
    target = tmp_path / "shared-cache"
    env = {k: v for k, v in os.environ.items() if k != "FASTCONV_DATA"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-c", _DOWNLOADER, str(target), server.url]
    procs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
        assert out.strip() == str(target)
    assert _verified_cache(target) == sorted(MNIST_FILES)
    assert sorted(server.requests) == sorted(2 * list(MNIST_FILES))


def test_cli_no_download_says_where_it_looked(tmp_path, cache, server, capsys):
    out = tmp_path / "run"
    assert main(["train-mnist", "--no-download", "--quiet", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: MNIST not found") and f"3. the user cache: {cache}" in err
    assert server.requests == []
